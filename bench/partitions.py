"""Partitioned messages as the table grows: the hot queries beside the plain table.

    python -m bench.partitions                          # 1M, 4M, 16M and 32M messages
    python -m bench.partitions --sizes 100000,200000    # a quick look

Two databases on one throwaway PostgreSQL server, grown side by side: one
with ``hermes_messages`` as migrated, one split into 16 hash partitions by
``session_id`` (``hermes_orm.upgrade(partitions=16)``). Sessions of 100
messages are loaded with SQL (search triggers off: search is not what is
measured); at each size, the same 200 random sessions of each database get a
turn's flush (three messages, ``verify="last"``) and a read of their last
page (50 messages), the two databases in turns, after a checkpoint. Printed
per size: the median of each, the partitioned one's ratio to the plain one,
and the largest index of a session's messages (the whole unique index, or
one partition's).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import hermes_orm
from devtools.postgres import local_postgres
from hermes_orm import SessionStore
from hermes_orm._codec import encode_message

PER_SESSION = 100
PARTITIONS = 16
SAMPLE = 200

#: The last stored message of every loaded session: the one a flush checks.
LAST = {"role": "assistant", "content": "the lighthouse is past the harbour"}
#: What a flush passes below the turn: with verify="last", only the last one is compared.
HISTORY = [{"role": "user", "content": "x"}] * (PER_SESSION - 1) + [LAST]
TURN = [
    {"role": "user", "content": "and after the harbour?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]},
    {"role": "tool", "content": "north cape", "tool_call_id": "c"},
]


def _load(engine: Engine, first: int, last: int) -> None:
    """Sessions ``first`` to ``last - 1``, of 100 messages each, written in SQL."""
    digest = encode_message(LAST, PER_SESSION - 1).digest
    with engine.begin() as conn:
        conn.exec_driver_sql("SET session_replication_role = replica")  # no triggers
        conn.execute(
            text(
                "INSERT INTO hermes_sessions (id, source, started_at, flushed_idx, "
                "message_count, flushed_digest) SELECT 's' || g, 'cli', g, :n, :n, :d "
                "FROM generate_series(:a, :b - 1) AS g"
            ),
            {"a": first, "b": last, "n": PER_SESSION, "d": digest},
        )
        n = PER_SESSION  # ints written into the SQL: psycopg binds small ones as smallint
        conn.exec_driver_sql(
            "INSERT INTO hermes_messages (session_id, idx, role, content, digest) "
            f"SELECT 's' || (g / {n}), mod(g, {n}), 'user', 'message ' || g || ' of a long "
            "conversation about lighthouses and harbours', '\\x00'::bytea "
            f"FROM generate_series({first * n}::bigint, {last * n - 1}) AS g "
            f"WHERE mod(g, {n}) <> {n - 1}"
        )
        conn.execute(
            text(
                "INSERT INTO hermes_messages (session_id, idx, role, content, digest) "
                "SELECT 's' || g, :i, 'assistant', :c, :d FROM generate_series(:a, :b - 1) AS g"
            ),
            {"a": first, "b": last, "i": PER_SESSION - 1, "c": LAST["content"], "d": digest},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE hermes_messages")
        conn.exec_driver_sql("CHECKPOINT")  # not during the measurements


def _medians_ms(runs: dict[str, Callable[[str], Any]], sessions: list[str]) -> dict[str, float]:
    """Median milliseconds of each run over ``sessions``, taken in turns (order alternating)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for n, sid in enumerate(sessions):
        for name in list(runs)[:: 1 if n % 2 else -1]:
            started = time.perf_counter()
            runs[name](sid)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(taken) * 1000 for name, taken in times.items()}


def _largest_index(engine: Engine) -> int:
    """Bytes of the largest index holding one session's positions."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT max(pg_relation_size(c.oid)) FROM pg_class c "
                    "WHERE c.relkind = 'i' AND (c.relname = 'uq_hermes_messages_session_id_idx' "
                    "OR c.relname LIKE 'hermes_messages_part_%session_id_idx%')"
                )
            ).scalar_one()
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.partitions")
    parser.add_argument(
        "--sizes", default="1000000,4000000,16000000,32000000", help="messages, ascending"
    )
    sizes = [int(n) for n in parser.parse_args(argv).sizes.split(",")]
    rng = random.Random(7)
    rows = []
    with local_postgres({"shared_buffers": "1GB", "max_wal_size": "8GB"}) as server:
        engines = {}
        for name, partitions in (("plain", None), ("partitioned", PARTITIONS)):
            admin = create_engine(server.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE DATABASE {name}")
            url = make_url(server.url).set(database=name)
            engines[name] = create_engine(url, poolclass=NullPool)
            hermes_orm.upgrade(engines[name], partitions=partitions)
        stores = {name: SessionStore(engine.url) for name, engine in engines.items()}
        loaded = 0
        flushed: set[int] = set()
        for size in sizes:
            sessions = size // PER_SESSION
            for engine in engines.values():
                _load(engine, loaded, sessions)
            loaded = sessions
            # Sessions across the whole table, each flushed once in the run.
            fresh = [n for n in range(sessions) if n not in flushed]
            picked = rng.sample(fresh, min(SAMPLE, len(fresh)))
            flushed.update(picked)
            sample = [f"s{n}" for n in picked]
            flush = _medians_ms(
                {
                    name: lambda sid, store=store: store.flush(
                        sid, [*HISTORY, *TURN], verify="last"
                    )
                    for name, store in stores.items()
                },
                sample,
            )
            page = _medians_ms(
                {
                    name: lambda sid, store=store: store.get_messages(sid, offset=53, limit=50)
                    for name, store in stores.items()
                },
                sample,
            )
            figures = {
                name: (flush[name], page[name], _largest_index(engines[name])) for name in stores
            }
            plain, split = figures["plain"], figures["partitioned"]
            rows.append(
                f"| {size:,} | {plain[0]:.2f} | {split[0]:.2f} | {split[0] / plain[0]:.2f}x "
                f"| {plain[1]:.2f} | {split[1]:.2f} | {split[1] / plain[1]:.2f}x "
                f"| {plain[2] / 2**20:.0f} MB | {split[2] / 2**20:.1f} MB |"
            )
            print(rows[-1], flush=True)
        for store in stores.values():
            store.close()
    print(
        "\n| messages | flush p50 plain (ms) | 16 partitions | ratio | last page p50 plain (ms) "
        "| 16 partitions | ratio | (session_id, idx) index: whole | largest partition's |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
