"""Benchmarks of hermes_orm, side by side in one run, as ratios against baselines.

    python -m bench                 # full run; writes docs/benchmarks.md and the chart
    python -m bench --quick         # tiny sizes, nothing written, targets not enforced
    python -m bench --only search   # one part, nothing written

Each measurement runs its baseline in the same process on an identical fresh
database; ratios are of medians over repeated runs (the per-turn flushes: of
the ratios within each round of runs). The run exits non-zero when a target is
missed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import hermes_orm
from bench import _plugin, _scale, _search, peers
from bench._common import DEFAULT_DURABILITY, hermes_append, libpq, rotations
from bench._replay import record, replay_psycopg, replay_sqlite
from bench._workload import conversations, history
from devtools.hermes_fixture import fixture_copy, grow
from devtools.postgres import postgres_server
from hermes_orm import _dialects
from hermes_orm.store import Verify, flush_sql

_K = TypeVar("_K")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@dataclass
class Row:
    """One line of the results table."""

    name: str
    ours: str
    baseline: str
    ratio: float | None
    target: str
    ok: bool | None

    def cells(self) -> list[str]:
        # A missed target shows by how much: 1.204x, not a 1.20x that reads as met.
        places = 3 if self.ok is False else 2
        ratio = "" if self.ratio is None else f"{self.ratio:.{places}f}x"
        verdict = {True: "met", False: "MISSED", None: ""}[self.ok]
        return [self.name, self.ours, self.baseline, ratio, self.target, verdict]


@dataclass
class Sizes:
    sessions: int
    turns: int
    lengths: tuple[int, ...]
    flat_turns: int
    bulk: int
    import_copies: int
    import_repeat: int
    read: int
    repeat: int
    turn_repeat: int
    search: int
    search_repeat: int
    plugin_lengths: tuple[int, ...]
    plugin_turns: int
    #: Sessions in the small and the large store; messages in the short and the long session.
    scale_sessions: tuple[int, int]
    scale_messages: tuple[int, int]
    peer_rounds: int


FULL = Sizes(
    sessions=20,
    turns=25,
    lengths=(10, 10_000, 100_000),
    flat_turns=120,
    bulk=100_000,
    read=10_000,
    repeat=5,
    turn_repeat=15,
    import_copies=1140,  # the 877-message fixture and 1,140 clones: 1,000,657 messages
    import_repeat=3,
    search=1_000_000,
    search_repeat=5,
    plugin_lengths=(10, 1_000, 5_000),
    plugin_turns=120,
    scale_sessions=(1_000, 1_000_000),
    scale_messages=(1_000, 1_000_000),
    peer_rounds=3,
)
QUICK = Sizes(
    sessions=2,
    turns=3,
    lengths=(10, 200),
    flat_turns=3,
    bulk=500,
    read=100,
    repeat=1,
    turn_repeat=1,
    import_copies=0,
    import_repeat=1,
    search=3_000,
    search_repeat=1,
    plugin_lengths=(10, 200),
    plugin_turns=3,
    scale_sessions=(100, 2_000),
    scale_messages=(100, 2_000),
    peer_rounds=1,
)


# -- databases ----------------------------------------------------------------------------


class Databases:
    """Fresh, identical databases: SQLite files copied from a template, PG from a template DB."""

    def __init__(self, workdir: Path, pg_url: str | None) -> None:
        self.workdir = workdir
        self.pg_url = pg_url
        self._n = 0

    def _name(self) -> str:
        self._n += 1
        return f"bench_{self._n}"

    @staticmethod
    def _seed(url: str, sessions: int) -> None:
        """Migrate the database at ``url`` and create sessions s0, s1, ..."""
        store = hermes_orm.SessionStore(url)
        store.upgrade()
        for s in range(sessions):
            store.create_session(f"s{s}", source="bench", started_at=1.0)
        store.close()

    def sqlite_template(self, sessions: int) -> Path:
        path = self.workdir / f"{self._name()}.db"
        self._seed(f"sqlite:///{path}", sessions)
        return path

    def sqlite_copy(self, template: Path) -> Path:
        path = self.workdir / f"{self._name()}.db"
        shutil.copyfile(template, path)
        return path

    def _pg_admin(self) -> Engine:
        assert self.pg_url is not None
        return create_engine(
            make_url(self.pg_url), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )

    def _create_pg_database(self, template: str, strategy: str = "") -> str:
        name = self._name()
        admin = self._pg_admin()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}" {strategy}')
        admin.dispose()
        return name

    def pg_template(self, sessions: int) -> str:
        name = self._create_pg_database("template0")
        self._seed(self._pg_db_url(name), sessions)
        return name

    def pg_copy(self, template: str) -> str:
        return self._pg_db_url(self._create_pg_database(template, "STRATEGY FILE_COPY"))

    def _pg_db_url(self, name: str) -> str:
        assert self.pg_url is not None
        return make_url(self.pg_url).set(database=name).render_as_string(hide_password=False)


# -- measurements ---------------------------------------------------------------------------


def _turn_workload(
    store: hermes_orm.SessionStore, convs: list[list[list[dict[str, Any]]]]
) -> float:
    """Flush every session after each of its turns, interleaved as a gateway would."""
    lists: list[list[dict[str, Any]]] = [[] for _ in convs]
    start = time.perf_counter()
    for t in range(len(convs[0])):
        for s, conv in enumerate(convs):
            lists[s].extend(conv[t])
            store.flush(f"s{s}", lists[s])
    return time.perf_counter() - start


@dataclass
class Rounds:
    """Seconds of each contender, one entry per round."""

    times: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median over the rounds of ``name``'s time over ``baseline``'s in the same round."""
        return statistics.median(
            a / b for a, b in zip(self.times[name], self.times[baseline], strict=True)
        )


#: A contender of :func:`_rounds`: it prepares its run (its database copied), and
#: returns the run, which returns the seconds it timed.
Contender = Callable[[], Callable[[], float]]


def _store_run(
    url: str, convs: list[list[list[dict[str, Any]]]], **options: Any
) -> Callable[[], float]:
    """The run of the turn workload ``convs`` through a ``SessionStore`` on ``url``."""

    def run() -> float:
        store = hermes_orm.SessionStore(url, **options)
        store.get_session("s0")  # schema check and a warm connection, as in a live agent
        elapsed = _turn_workload(store, convs)
        store.close()
        return elapsed

    return run


def _rounds(runs: dict[str, Contender], repeat: int) -> Rounds:
    """Run every contender once a round, ``repeat`` rounds, the order rotating each round.

    A shared machine drifts (clock, disk, neighbours) over seconds: taking each
    ratio within a round, between runs seconds apart, keeps the drift out of it.
    Every contender of a round prepares first; then the disk is synced, so no
    timed run flushes the copies made for it or for another.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for order in rotations(list(runs), repeat):
        ready = {name: runs[name]() for name in order}
        os.sync()
        for name in order:
            times[name].append(ready[name]())
    return Rounds(times)


def sqlite_turns(dbs: Databases, sizes: Sizes, synchronous: str, *, hermes: bool) -> Rounds:
    """Rounds of ours, the sqlite3 replay and, if asked and installed, Hermes' SessionDB."""
    convs = conversations(sizes.sessions, sizes.turns)
    template = dbs.sqlite_template(sizes.sessions)
    rec_store = hermes_orm.SessionStore(
        f"sqlite:///{dbs.sqlite_copy(template)}", sqlite_synchronous=synchronous
    )
    rec_store.get_session("s0")
    with record(rec_store.engine) as rec:
        _turn_workload(rec_store, convs)
    rec_store.close()

    def ours() -> Callable[[], float]:
        url = f"sqlite:///{dbs.sqlite_copy(template)}"
        return _store_run(url, convs, sqlite_synchronous=synchronous)

    def floor() -> Callable[[], float]:
        path = dbs.sqlite_copy(template)
        return lambda: replay_sqlite(str(path), rec, synchronous)

    runs: dict[str, Contender] = {"ours": ours, "floor": floor}
    session_db = hermes_session_db() if hermes else None
    if session_db is not None:
        runs["hermes"] = lambda: hermes_turns(session_db, dbs, convs, synchronous)
    return _rounds(runs, sizes.turn_repeat)


def hermes_session_db() -> Any:
    """Hermes Agent's ``SessionDB`` class, or None when hermes-agent is not installed."""
    try:
        from hermes_state import SessionDB
    except ImportError:
        return None
    return SessionDB


def hermes_turns(
    session_db: Any, dbs: Databases, convs: list[list[list[dict[str, Any]]]], synchronous: str
) -> Callable[[], float]:
    """The workload through Hermes Agent's ``SessionDB.append_message``, its sessions made."""
    db = session_db(dbs.workdir / f"hermes-{time.monotonic_ns()}.db")
    db._conn.execute(f"PRAGMA synchronous={synchronous}")
    for s in range(len(convs)):
        db.create_session(f"s{s}", source="bench")

    def run() -> float:
        start = time.perf_counter()
        for t in range(len(convs[0])):
            for s, conv in enumerate(convs):
                for m in conv[t]:
                    hermes_append(db, f"s{s}", m)
        elapsed = time.perf_counter() - start
        db.close()
        return elapsed

    return run


def pg_turns(dbs: Databases, sizes: Sizes) -> Rounds:
    """Rounds of ours and of the psycopg replay."""
    convs = conversations(sizes.sessions, sizes.turns)
    template = dbs.pg_template(sizes.sessions)
    rec_store = hermes_orm.SessionStore(dbs.pg_copy(template))
    rec_store.get_session("s0")
    with record(rec_store.engine) as rec:
        _turn_workload(rec_store, convs)
    rec_store.close()

    def ours() -> Callable[[], float]:
        return _store_run(dbs.pg_copy(template), convs)

    def floor() -> Callable[[], float]:
        url = libpq(dbs.pg_copy(template))
        return lambda: replay_psycopg(url, rec)

    return _rounds({"ours": ours, "floor": floor}, sizes.turn_repeat)


def async_turns(dbs: Databases, sizes: Sizes, backend: str) -> Rounds:
    """Rounds of the turn workload through SessionStore and through AsyncSessionStore."""
    import asyncio

    from hermes_orm.async_store import AsyncSessionStore

    convs = conversations(sizes.sessions, sizes.turns)
    if backend == "sqlite":
        template = dbs.sqlite_template(sizes.sessions)

        def url() -> str:
            return f"sqlite:///{dbs.sqlite_copy(template)}"
    else:
        pg_template = dbs.pg_template(sizes.sessions)

        def url() -> str:
            return dbs.pg_copy(pg_template)

    def sync() -> Callable[[], float]:
        return _store_run(url(), convs)

    def async_() -> Callable[[], float]:
        copy = url()
        return lambda: asyncio.run(workload(copy))

    async def workload(copy: str) -> float:
        store = AsyncSessionStore(copy)
        await store.get_session("s0")
        lists: list[list[dict[str, Any]]] = [[] for _ in convs]
        start = time.perf_counter()
        for t in range(len(convs[0])):
            for s, conv in enumerate(convs):
                lists[s].extend(conv[t])
                await store.flush(f"s{s}", lists[s])
        elapsed = time.perf_counter() - start
        await store.close()
        return elapsed

    return _rounds({"sync": sync, "async": async_}, sizes.turn_repeat)


def async_section(dbs: Databases, sizes: Sizes, progress: Callable[[str], None]) -> list[Row]:
    """AsyncSessionStore's flush per turn against SessionStore's, on each backend."""
    rows = []
    backends = ["sqlite"] + (["postgresql"] if dbs.pg_url is not None else [])
    per_turn = sizes.sessions * sizes.turns
    for backend in backends:
        progress(f"{backend} turns, async against sync")
        rounds = async_turns(dbs, sizes, backend)
        ratio = rounds.ratio("async", "sync")
        driver = "aiosqlite" if backend == "sqlite" else "psycopg async"
        rows.append(
            Row(
                f"{'SQLite' if backend == 'sqlite' else 'PostgreSQL'} AsyncSessionStore "
                f"flush per turn ({driver}) vs SessionStore",
                _ms(rounds.median("async") / per_turn),
                _ms(rounds.median("sync") / per_turn) + " SessionStore",
                ratio,
                "<= 1.5x (report)",
                None,
            )
        )
    return rows


def flush_cost_by_length(url: str, sizes: Sizes) -> dict[str, dict[int, float]]:
    """Median seconds of one turn's flush into a session already holding N messages.

    Per ``verify`` mode: ``all`` (the default: every stored message the list
    holds is compared with the store's copy) and ``last`` (only the one below
    the cursor). The sessions of every length and mode take the same turns in
    rotation, one flush each a round, the order rotating: a drift of the
    machine during the run falls on every length alike, instead of on
    whichever length ran last.
    """
    store = hermes_orm.SessionStore(url)
    extra = conversations(1, sizes.flat_turns, seed=99)[0]
    modes: tuple[Verify, ...] = ("all", "last")
    keys = [(mode, length) for mode in modes for length in sizes.lengths]
    lists: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for mode, length in keys:
        store.create_session(f"len{length}-{mode}", source="bench")
        lists[mode, length] = history(length)
        store.flush(f"len{length}-{mode}", lists[mode, length], verify=mode)
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
    for turn_msgs, order in zip(extra, rotations(keys, len(extra)), strict=True):
        for mode, length in order:
            msgs = lists[mode, length]
            msgs.extend(turn_msgs)
            start = time.perf_counter()
            store.flush(f"len{length}-{mode}", msgs, verify=mode)
            samples[mode, length].append(time.perf_counter() - start)
    store.close()
    return {
        mode: {length: statistics.median(samples[mode, length]) for length in sizes.lengths}
        for mode in modes
    }


def read_vs_raw(url: str, length: int, repeat: int) -> tuple[float, float]:
    """get_messages of a ``length``-message session vs the bare driver's fetch of its rows.

    The baseline runs, on ``sqlite3`` or ``psycopg`` alone, the statement
    get_messages runs (its columns, the JSON ones as text) and fetches its
    tuples; the store parses the JSON and builds each message's dict.
    """
    store = hermes_orm.SessionStore(url)
    sid = f"read-{length}"
    store.create_session(sid, source="bench")
    store.flush(sid, history(length))
    sql = flush_sql(make_url(url).get_backend_name())
    query = f"{sql.read_messages}{sql.read_where}{sql.read_alive} ORDER BY idx"
    if url.startswith("sqlite"):
        import sqlite3

        conn: Any = sqlite3.connect(make_url(url).database or "")
    else:
        import psycopg

        conn = psycopg.connect(libpq(url))
    ours, raw = [], []
    for _ in range(max(5, repeat * 3)):
        start = time.perf_counter()
        got = store.get_messages(sid)
        ours.append(time.perf_counter() - start)
        assert len(got) == length
        del got
        start = time.perf_counter()
        rows = conn.execute(query, (sid, sid)).fetchall()
        raw.append(time.perf_counter() - start)
        assert len(rows) == length
        del rows
        if not url.startswith("sqlite"):
            conn.commit()
    conn.close()
    store.close()
    return statistics.median(ours), statistics.median(raw)


def import_rate(workdir: Path, copies: int, repeat: int) -> tuple[int, float, float, bool]:
    """Import a grown copy of the Hermes fixture into SQLite, ``repeat`` times.

    Each round imports into a fresh file, then replays with sqlite3, on
    another fresh file, the statements that import ran. Returns the messages,
    the median of the imports' msg/s, the median of the replays' msg/s, and
    whether every import verified.
    """
    from hermes_orm.integrations.hermes import import_state_db

    source_dir = workdir / f"hermes-{copies}"
    source_dir.mkdir()
    source = fixture_copy(source_dir)
    total = grow(source, copies)
    rates: list[float] = []
    floors: list[float] = []
    verified = True
    for round_ in range(repeat):
        paths = [workdir / f"import-{copies}-{round_}-{side}.db" for side in ("ours", "replay")]
        for path in paths:
            hermes_orm.SessionStore(f"sqlite:///{path}").upgrade()
        os.sync()  # nothing written before is flushed during the timed run
        store = hermes_orm.SessionStore(f"sqlite:///{paths[0]}")
        with record(store.engine) as rec:
            start = time.perf_counter()
            report = import_state_db(source, store)
            elapsed = time.perf_counter() - start
        store.close()
        os.sync()
        floor = replay_sqlite(str(paths[1]), rec, "FULL")
        rates.append(report.messages_written / elapsed)
        floors.append(report.messages_written / floor)
        verified = verified and report.ok
        for path in paths:
            for file in path.parent.glob(f"{path.name}*"):
                file.unlink()
    return total, statistics.median(rates), statistics.median(floors), verified


def bulk_flush(path: Path, count: int) -> tuple[float, float]:
    """Messages/s of one flush of ``count`` messages, and its peak traced memory in MiB."""
    store = hermes_orm.SessionStore(f"sqlite:///{path}", sqlite_synchronous="NORMAL")
    msgs = history(count)
    store.create_session("bulk", source="bench")
    start = time.perf_counter()
    store.flush("bulk", msgs)
    rate = count / (time.perf_counter() - start)
    store.create_session("bulk-mem", source="bench")
    tracemalloc.start()
    store.flush("bulk-mem", msgs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    store.close()
    return rate, peak / 2**20


def search_section(
    dbs: Databases, sizes: Sizes, progress: Callable[[str], None]
) -> tuple[list[Row], str]:
    """Search latency on both backends and Hermes' on one corpus; index sizes.

    Returns the rows of the results table and a per-query markdown table.
    """
    corpus = _search.Corpus(sizes.search)
    progress(f"search: {sizes.search:,} messages into SQLite")
    sqlite_path = dbs.workdir / "search.db"
    stores = {"SQLite": _search.load_ours(f"sqlite:///{sqlite_path}", corpus)}
    if dbs.pg_url is not None:
        progress(f"search: {sizes.search:,} messages into PostgreSQL")
        pg_store = _search.load_ours(dbs.pg_copy(dbs.pg_template(0)), corpus)
        with pg_store.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE hermes_messages")  # as autovacuum would
            conn.commit()
        stores["PostgreSQL"] = pg_store
    progress(f"search: {sizes.search:,} messages into a Hermes state.db")
    hermes_path = dbs.workdir / "hermes-search.db"
    hermes = _search.load_hermes(hermes_path, corpus)
    progress("search: queries")
    baseline = _search.time_queries(_search.hermes_runner(hermes), sizes.search_repeat)
    timings = {
        name: _search.time_queries(_search.ours_runner(store), sizes.search_repeat)
        for name, store in stores.items()
    }
    hits = {
        query: len(stores["SQLite"].search(query, **filters).hits)
        for query, filters in _search.QUERIES
    }
    rows = []
    count = f"{sizes.search:,} messages, {len(_search.QUERIES)} queries"
    hermes_p50, hermes_p95 = baseline.percentile(0.5), baseline.percentile(0.95)
    for name, timing in timings.items():
        p50, p95 = timing.percentile(0.5), timing.percentile(0.95)
        rows += [
            Row(f"{name} search p50 ({count})", _ms(p50), f"{_ms(hermes_p50)} Hermes",
                p50 / hermes_p50, "< 5 ms", p50 < 0.005),
            Row(f"{name} search p95 ({count})", _ms(p95), f"{_ms(hermes_p95)} Hermes",
                p95 / hermes_p95, "< 50 ms", p95 < 0.050),
        ]  # fmt: skip
        slower = [q for q in timing.medians if timing.medians[q] > baseline.medians[q]]
        rows.append(
            Row(
                f"{name} queries slower than Hermes search_messages (median of each)",
                f"{len(slower)} of {len(timing.medians)}",
                ", ".join(slower),
                None,
                "none",
                not slower,
            )
        )
    index = _search.sqlite_index_bytes(sqlite_path, "hermes_search")
    text = _search.sqlite_text_bytes(sqlite_path)
    hermes_index = _search.sqlite_index_bytes(hermes_path, "messages_fts")
    rows.append(
        Row(
            "SQLite search index vs the text it indexes",
            f"{index / 2**20:,.1f} MiB",
            f"{text / 2**20:,.1f} MiB text (Hermes FTS5: {hermes_index / 2**20:,.1f} MiB)",
            index / text,
            "<= 1.5x",
            index / text <= 1.5,
        )
    )
    if "PostgreSQL" in stores:
        sizes_pg = _search.postgresql_sizes(stores["PostgreSQL"])
        rows.append(
            Row(
                "PostgreSQL search columns and indexes vs the text",
                f"{sizes_pg.total / 2**20:,.1f} MiB ({sizes_pg.parts()})",
                f"{sizes_pg.text / 2**20:,.1f} MiB text",
                sizes_pg.total / sizes_pg.text,
                "<= 2x",
                sizes_pg.total / sizes_pg.text <= 2.0,
            )
        )
    head = ["query", "filter", "hits (page of 20)", *(f"{n} ms" for n in timings), "Hermes ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for query, filters in _search.QUERIES:
        cells = [f"`{query}`", ", ".join(f"{k}={v}" for k, v in filters.items()), str(hits[query])]
        cells += [f"{t.medians[query] * 1000:.2f}" for t in timings.values()]
        cells.append(f"{baseline.medians[query] * 1000:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    for store in stores.values():
        store.close()
    hermes.close()
    return rows, "\n".join(lines)


# -- report ----------------------------------------------------------------------------------


@contextmanager
def postgres(skip: bool) -> Iterator[str | None]:
    if skip:
        yield None
        return
    with postgres_server() as url:
        yield url


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def commit() -> str:
    """The checkout's commit (short), with ``+changes`` when its tree differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    try:
        head, changes = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain")
    except OSError:
        return "unknown"
    return (f"{head}+changes" if changes else head) if head else "unknown"


def flush_section(
    dbs: Databases, sizes: Sizes, progress: Callable[[str], None]
) -> tuple[list[Row], dict[str, dict[int, float]]]:
    """Flush, read, bulk and import measurements; rows and the flush-cost curves."""
    rows: list[Row] = []
    curves: dict[str, dict[int, float]] = {}
    pg = dbs.pg_url
    n_msgs = sizes.sessions * sizes.turns * 3
    label = f"{sizes.sessions} sessions x {sizes.turns} turns"
    for sync, limit in (("NORMAL", 2.0), ("FULL", 1.2)):
        progress(f"sqlite turns, synchronous={sync}")
        rounds = sqlite_turns(dbs, sizes, sync, hermes=sync == "FULL")
        ours = rounds.median("ours")
        ratio = rounds.ratio("ours", "floor")
        rows.append(
            Row(
                f"SQLite flush per turn ({label}), synchronous={sync}",
                _ms(ours / (n_msgs / 3)),
                _ms(rounds.median("floor") / (n_msgs / 3)) + " sqlite3 replay",
                ratio,
                f"<= {limit}x",
                ratio <= limit,
            )
        )
        if sync != "FULL":
            continue
        if "hermes" not in rounds.times:
            rows.append(
                Row(
                    "Messages/s vs Hermes SessionDB.append_message",
                    f"{n_msgs / ours:,.0f}/s",
                    "hermes-agent not installed",
                    None,
                    ">= 4x",
                    False,
                )
            )
        else:
            # Messages/s ours over theirs: their time over ours, round by round.
            speedup = rounds.ratio("hermes", "ours")
            rows.append(
                Row(
                    f"Messages/s vs Hermes SessionDB.append_message, synchronous={sync}",
                    f"{n_msgs / ours:,.0f}/s",
                    f"{n_msgs / rounds.median('hermes'):,.0f}/s",
                    speedup,
                    ">= 4x",
                    speedup >= 4.0,
                )
            )
    if pg is not None:
        progress("postgresql turns")
        rounds = pg_turns(dbs, sizes)
        ratio = rounds.ratio("ours", "floor")
        rows.append(
            Row(
                f"PostgreSQL flush per turn ({label})",
                _ms(rounds.median("ours") / (n_msgs / 3)),
                _ms(rounds.median("floor") / (n_msgs / 3)) + " psycopg replay",
                ratio,
                "<= 1.3x",
                ratio <= 1.3,
            )
        )
    backends = [("SQLite", f"sqlite:///{dbs.sqlite_template(0)}")]
    if pg is not None:
        backends.append(("PostgreSQL", dbs.pg_copy(dbs.pg_template(0))))
    for name, url in backends:
        progress(f"{name} flush cost by session length")
        by_mode = flush_cost_by_length(url, sizes)
        for mode, costs in by_mode.items():
            curves[f"{name}, verify={mode!r}"] = costs
            lo, hi = min(costs), max(costs)
            ratio = costs[hi] / costs[lo]
            # "last" is O(1) in the length; "all" compares each stored message once.
            flat = mode == "last"
            rows.append(
                Row(
                    f"{name} flush of a turn into {hi:,} vs {lo:,} stored messages, "
                    f"verify={mode!r}",
                    _ms(costs[hi]),
                    _ms(costs[lo]),
                    ratio,
                    "<= 1.2x" if flat else "report",
                    ratio <= 1.2 if flat else None,
                )
            )
    reads = [("SQLite", f"sqlite:///{dbs.sqlite_template(0)}", "sqlite3")]
    if pg is not None:
        reads.append(("PostgreSQL", dbs.pg_copy(dbs.pg_template(0)), "psycopg"))
    for name, url, driver in reads:
        for length in (sizes.read // 10, sizes.read):
            progress(f"{name} get_messages of {length:,} vs the driver's fetch")
            ours, raw = read_vs_raw(url, length, sizes.repeat)
            target = length >= 10_000
            rows.append(
                Row(
                    f"{name} get_messages of {length:,} messages (dicts) "
                    f"vs {driver} fetchall of its statement (tuples)",
                    _ms(ours),
                    _ms(raw),
                    ours / raw,
                    "<= 1.3x" if target else "report",
                    ours / raw <= 1.3 if target else None,
                )
            )
    progress("bulk flush")
    rate, peak = bulk_flush(dbs.sqlite_template(0), sizes.bulk)
    _, small_peak = bulk_flush(dbs.sqlite_template(0), sizes.bulk // 10)
    rows.append(
        Row(
            f"SQLite bulk flush of {sizes.bulk:,} messages (synchronous=NORMAL)",
            f"{rate:,.0f} msg/s",
            "",
            None,
            ">= 10,000 msg/s",
            rate >= 10_000,
        )
    )
    rows.append(
        Row(
            f"Peak memory of that flush vs one of {sizes.bulk // 10:,}",
            f"{peak:.1f} MiB",
            f"{small_peak:.1f} MiB",
            peak / small_peak,
            "<= 2x (streams in chunks)",
            peak / small_peak <= 2.0,
        )
    )
    progress("import of a Hermes state.db")
    total, rate, floor_rate, verified = import_rate(
        dbs.workdir, sizes.import_copies, sizes.import_repeat
    )
    rows.append(
        Row(
            f"Import of a Hermes state.db of {total:,} messages into SQLite"
            + ("" if verified else " (VERIFICATION FAILED)"),
            f"{rate:,.0f} msg/s",
            f"{floor_rate:,.0f} msg/s sqlite3 replay",
            floor_rate / rate,
            ">= 20,000 msg/s",
            verified and rate >= 20_000,
        )
    )
    return rows, curves


def plugin_section(dbs: Databases, sizes: Sizes, progress: Callable[[str], None]) -> list[Row]:
    """What the Hermes plugin's hook costs a turn, against a bare flush of the same turn."""
    progress("hermes plugin hook per turn")
    template = dbs.sqlite_template(0)
    costs = _plugin.plugin_cost(
        lambda: f"sqlite:///{dbs.sqlite_copy(template)}", sizes.plugin_lengths, sizes.plugin_turns
    )
    return [
        Row(
            f"Hermes plugin: post_llm_call of a turn, {length:,} messages in the conversation",
            _ms(hook),
            _ms(flush) + " SessionStore.flush",
            hook / flush,
            "report",
            None,
        )
        for length, (hook, flush) in costs.items()
    ]


def run(
    sizes: Sizes, *, skip_pg: bool, progress: Callable[[str], None], only: str | None = None
) -> tuple[list[Row], dict[str, dict[int, float]], str]:
    """Every measurement (or ``only`` one part); rows, curves and the per-query table."""
    rows: list[Row] = []
    curves: dict[str, dict[int, float]] = {}
    search_table = ""
    extras.clear()
    # hermes_orm's sqlite3 adapters serve the whole process once a store exists:
    # registered first, every sqlite3 side (replays, Hermes) binds alike from the start.
    _dialects.register_sqlite_adapters()
    with tempfile.TemporaryDirectory(prefix="hermes-orm-bench-") as tmp, postgres(skip_pg) as pg:
        dbs = Databases(Path(tmp), pg)
        if only in (None, "flush"):
            rows, curves = flush_section(dbs, sizes, progress)
        if only in (None, "async"):
            rows += async_section(dbs, sizes, progress)
        if only in (None, "plugin"):
            rows += plugin_section(dbs, sizes, progress)
        if only in (None, "search"):
            search_rows, search_table = search_section(dbs, sizes, progress)
            rows += search_rows
        if only in (None, "scale"):
            rows += scale_section(dbs, sizes, progress)
    if only in (None, "peers"):
        peer_rows, peer_results = peers_section(sizes, skip_pg=skip_pg, progress=progress)
        rows += peer_rows
        extras["peers"] = peer_results
    return rows, curves, search_table


#: What the last run measured besides its rows (the peers' results), for the docs.
extras: dict[str, Any] = {}


def peers_section(
    sizes: Sizes, *, skip_pg: bool, progress: Callable[[str], None]
) -> tuple[list[Row], peers.PeerResults]:
    """hermes_orm beside the stores users would pick instead (see bench/peers.py)."""
    quick = sizes is QUICK
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hermes-orm-peers-")))
        url = None if skip_pg else stack.enter_context(postgres_server(DEFAULT_DURABILITY))
        results = peers.run(url, tmp, rounds=sizes.peer_rounds, quick=quick, progress=progress)
    rows = []
    for backend in (peers.SQLITE, peers.POSTGRESQL):
        compared = results.flush_ratio(backend)
        ours = results.flush.get(peers.HERMES_ORM, {}).get(backend)
        if compared is None or not isinstance(ours, float):
            continue
        ratio, fastest = compared
        theirs = results.flush[fastest][backend]
        rows.append(
            Row(
                f"{backend} flush per turn vs the fastest peer (default durability)",
                _ms(ours),
                f"{_ms(theirs) if isinstance(theirs, float) else theirs} {fastest}",
                ratio,
                "<= 1.0x",
                ratio <= 1.0,
            )
        )
        reads = {
            name: by[backend]
            for name, by in results.read.items()
            if isinstance(by.get(backend), float)
        }
        mine = reads.pop(peers.HERMES_ORM, None)
        if mine is not None and reads:
            best = min(reads, key=lambda name: reads[name])
            rows.append(
                Row(
                    f"{backend} read of a 1,000-message history vs the fastest peer",
                    _ms(mine),
                    f"{_ms(reads[best])} {best.split(' ')[0]}",
                    mine / reads[best],
                    "<= 1.0x",
                    mine / reads[best] <= 1.0,
                )
            )
    outcomes = list(results.failures.get(peers.HERMES_ORM, {}).values())
    if outcomes:
        counted = [o for o in outcomes if isinstance(o, tuple)]
        duplicated = sum(d for d, _ in counted)
        lost = sum(lost for _, lost in counted)
        rows.append(
            Row(
                f"hermes_orm after injected failures ({len(outcomes)} cases): duplicated / lost",
                f"{duplicated} / {lost}",
                "",
                None,
                "0 / 0",
                len(counted) == len(outcomes) and duplicated == lost == 0,
            )
        )
    return rows, results


_PEERS_DOC = """
## Beside the peers

The stores users would pick instead, with the same workload (the turns above:
20 sessions x 25 turns, 3 messages a turn, the sessions in round-robin), each
through its natural API: hermes_orm's `flush` of the agent's whole list, the
others' append of the turn's messages. Each library at its default
durability, on a fresh database each round, the order of the libraries
rotating across the rounds; PostgreSQL runs with its default settings
(`fsync` and `synchronous_commit` on). The ratios in the table above are
hermes_orm's time over the fastest other library's within each round.

The failure pass runs a smaller workload (3 sessions x 6 turns) once per
library, backend and failure, and counts what is stored against what the agent
produced:

- **mid-persist**: the persist of one turn fails after its first message's row
  was written, before the transaction commits (a real error from the database:
  a server-side `disk_full` on PostgreSQL, `disk I/O error` on SQLite; a
  statement that is a transaction of its own, as hermes_orm's flush on
  PostgreSQL, fails after writing its rows); the agent retries that turn the
  library's way: hermes_orm, the same list flushed again; a batch append, the
  turn's messages appended again; ADK, the turn's events from the one that
  failed; Hermes, as its agent does, every message of the list its appends have
  not yet marked written;
- **lost ack**: the turn's COMMIT (or its one statement's) lands, and its
  acknowledgement is lost (the caller gets an error); the agent retries as above;
- **not retried**: as mid-persist, but the agent drops that turn's persist and
  goes on (a batch append then never stores the turn; hermes_orm's next flush
  holds the whole list, and so does Hermes' next append of what is unmarked).

`python -m bench.peers` runs this part alone (`--quick` for a smoke run).

{tables}

![per-turn persist, beside the peers](peers.png)
"""


def scale_section(dbs: Databases, sizes: Sizes, progress: Callable[[str], None]) -> list[Row]:
    """A million sessions, and a session of a million messages, against small ones."""
    fresh = {"SQLite": lambda: f"sqlite:///{dbs.sqlite_template(0)}"}
    if dbs.pg_url is not None:
        fresh["PostgreSQL"] = lambda: dbs.pg_copy(dbs.pg_template(0))
    results = _scale.run(
        fresh,
        sessions=sizes.scale_sessions,
        messages=sizes.scale_messages,
        repeat=max(9, sizes.repeat * 5),
        progress=progress,
    )
    return [
        Row(
            f"{backend} {scaled.name}",
            _ms(scaled.large),
            _ms(scaled.small),
            scaled.ratio,
            "<= 1.5x (flat)",
            scaled.ratio <= 1.5,
        )
        for backend, scaled in results
    ]


def table(rows: list[Row]) -> str:
    head = ["measurement", "hermes_orm", "baseline", "ratio", "target", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def chart(curves: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, costs in curves.items():
        xs = sorted(costs)
        ax.plot(xs, [costs[x] * 1000 for x in xs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("messages already stored in the session")
    ax.set_ylabel("flush of one turn (ms, median)")
    ax.set_title("hermes_orm: flush cost vs session length")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.machine()
    import sqlite3

    pg = "PostgreSQL version unknown"
    with contextlib.suppress(OSError):
        pg = subprocess.run(
            ["psql", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    return (
        f"{cpu}, {os.cpu_count()} cores; Linux {platform.release()}; Python "
        f"{platform.python_version()}; SQLAlchemy {sqlalchemy.__version__}; "
        f"SQLite {sqlite3.sqlite_version}; {pg}"
    )


def write_docs(
    rows: list[Row], curves: dict[str, dict[int, float]], search_table: str, sizes: Sizes
) -> None:
    measured = commit()  # (before the charts are drawn anew: the checkout as measured)
    DOCS.mkdir(exist_ok=True)
    chart(curves, DOCS / "flush-vs-length.png")
    peer_results: peers.PeerResults | None = extras.get("peers")
    beside = ""
    if peer_results is not None:
        peers.chart(peer_results, DOCS / "peers.png")
        beside = _PEERS_DOC.format(tables=peers.markdown(peer_results))
    text = f"""# Benchmarks

Generated by `python -m bench` (from the repository root, after
`pip install -e '.[bench]'`, which brings the peers below) on
{time.strftime("%Y-%m-%d")}, at commit {measured}. Every ratio
compares hermes_orm with its baseline measured in the same run, as medians of
repeated runs ({sizes.repeat} or more; the import and the peers
{sizes.import_repeat} and {sizes.peer_rounds} rounds, as said with them). The per-turn flush
measurements run in {sizes.turn_repeat} rounds: each round runs
hermes_orm, its replay floor and (at `synchronous=FULL`) Hermes once each, in
an order that rotates, and a ratio is the median of the rounds' ratios, so the
drift of a shared machine over seconds stays out of it. The run exits non-zero
when a target is missed.

Machine: {machine()}.

PostgreSQL: a server of this run, with `fsync`, `synchronous_commit` and
`full_page_writes` off for every measurement but the peers' (both sides of a
ratio run on it alike: its absolute times are not a durable server's); the
peers run on one at PostgreSQL's default durability (all three on).

{table(rows)}

- **Replay floor.** The baseline of a flush is the bare driver (`sqlite3` or
  `psycopg`) replaying the very statements, parameters and transaction
  boundaries hermes_orm emitted for the workload (recorded with SQLAlchemy's
  `before_cursor_execute`/`commit` events, in a run of its own: with a listener
  attached a flush sends its statements through SQLAlchemy, without one, in the
  timed runs, the same statements go straight to the driver's cursor): the
  database work alone, on the same schema, so the search index's triggers run
  in both.
- **Workload.** One turn is a user message, an assistant message with a tool
  call and reasoning, and the tool's result; each of the sessions gets a turn in
  round-robin, and the agent flushes its whole list after each turn.
- **Hermes Agent** (`hermes-agent` from PyPI) stores the same messages with
  `SessionDB.append_message`, one transaction per message, with its FTS5
  triggers; both sides run at the same `synchronous` level.
- **Cost by length.** A flush writes only the new messages and moves the
  cursor in the same statement that checks it, whatever the stored history.
  What grows with it is the check of the caller's list: with `verify="last"`
  it compares one message (flat, the target), with the default
  `verify="all"` every stored message the list holds, each against the
  store's copy of it (a dict comparison, reported). Sessions holding
  {", ".join(f"{n:,}" for n in sizes.lengths)} messages, one per mode and
  length, each take {sizes.flat_turns} more turns, in rotation (the order
  rotating each turn), and each figure is the median of its flushes.
- **Import.** The Hermes fixture (`tests/fixtures/hermes-state.db`, schema v22,
  synthetic: `scripts/make_hermes_fixture.py` writes it with hermes-agent) grown
  with clones of its sessions under new ids, imported by `import_state_db` into
  a fresh SQLite file at the default `synchronous=FULL`; the time includes the
  verification, and the search index's triggers index every message as it goes
  in. A child process reads and encodes the source while the importing process
  writes. Its baseline is the replay of the statements it ran, as for a flush,
  recorded during the timed import itself (so its statements, 500 rows each, go
  through SQLAlchemy's `exec_driver_sql`). It runs in {sizes.import_repeat} rounds, each
  an import into a fresh file and the replay of its statements into another;
  both rates are medians of the rounds. The disk of a shared machine makes the
  absolute rates vary from run to run, the replay's as much as the import's.

- **Reads.** `get_messages` of a session's 1,000 and 10,000 messages (dicts)
  against the bare driver (`sqlite3`, `psycopg`) running the statement
  `get_messages` runs for the rows (its JSON columns read as text) and
  fetching their tuples; the store then parses the JSON and builds the
  dicts; medians.
- **Scale.** The same operation on a store of 1,000 sessions and on one of a
  million (written straight in SQL; sources and users spread evenly), and on a
  session of 1,000 messages and one of a million (written by a bulk flush);
  each figure is the large store's median over the small one's, the two
  stores open side by side and taking turns at each repetition.
- **Async.** The same turn workload through `AsyncSessionStore` (aiosqlite;
  psycopg's async connections) and through `SessionStore`, at the default
  `synchronous=FULL`, in rounds as above; the ratio is the async store's time
  over the blocking one's.
- **Hermes plugin.** The time Hermes spends in the plugin's `post_llm_call`
  hook per turn (what the plugin adds to a healthy turn: snapshotting Hermes'
  live list, handing it to the writer thread and waiting for the write),
  against `SessionStore.flush` of the same turn on an identical database.
  Hermes' list grows by a turn of three messages each time, with its
  `_db_persisted` marks; {sizes.plugin_turns} turns per length, in rotation
  with the bare flushes, medians. A turn's hook looks at every message of the
  conversation (a rewrite anywhere is caught), at C speed for the messages
  unchanged since the previous turn.

![flush cost vs session length](flush-vs-length.png)

## Search

{_search.__doc__.split(chr(10), 2)[2].strip()}

Each of the {len(_search.QUERIES)} queries asks for the first page of 20 hits
(with snippets; Hermes also reads each hit's neighbours, as its
`search_messages` always does), once to warm up and then {sizes.search_repeat}
times; p50 and p95 are over all those runs, and a query counts as slower than
Hermes when its median is. Exclusion is written `NOT` for Hermes. PostgreSQL's
statistics are gathered (`ANALYZE`) after the load, as autovacuum would. The
index size counts every table of the search index (dbstat), against the bytes of
the text it indexes.

On PostgreSQL a search first scans the newest 5,000 message ids in id order and
goes to the indexes only when they hold too few hits; for words PostgreSQL's
statistics show too rare for that, after the newest 200 only (see
`hermes_orm.search`). Words that are each frequent but rarely together (`retry
failed worker`), or rarely side by side (`"stack trace"`: its words' rows are
found by the index, the phrase checked on them in id order), pay both steps.
Hermes' FTS5 index, in process, answers those, and a word found nowhere
(`zzyzx`, in microseconds: less than one round trip to a server), faster.

{search_table}
{beside}"""
    (DOCS / "benchmarks.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes; nothing written; targets reported, not enforced",
    )
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/")
    parser.add_argument("--repeat", type=int, help="runs (or rounds) per measurement (median)")
    parser.add_argument(
        "--only",
        choices=("flush", "async", "plugin", "search", "scale", "peers"),
        help="run one part; docs/ is not written",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeat:
        sizes.repeat = sizes.turn_repeat = sizes.import_repeat = args.repeat

    def progress(msg: str) -> None:
        print(f"... {msg}", file=sys.stderr, flush=True)

    rows, curves, search_table = run(
        sizes, skip_pg=args.no_postgres, progress=progress, only=args.only
    )
    print(table(rows))
    if search_table:
        print("\n" + search_table)
    if not (args.quick or args.no_write or args.only):
        write_docs(rows, curves, search_table, sizes)
        print(f"\nwrote {DOCS / 'benchmarks.md'} and {DOCS / 'flush-vs-length.png'}")
    missed = [r.name for r in rows if r.ok is False]
    if missed and not args.quick:
        print(f"\nmissed {len(missed)} target(s): " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
