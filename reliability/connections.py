"""Lost connections and server restarts (PostgreSQL).

Writer processes (:func:`reliability._child.writer`, in ``recover`` mode)
flush shared sessions in a loop. Meanwhile the parent terminates their
backends with ``pg_terminate_backend``, preferably while they run a statement
or hold a transaction open, then restarts the server (``pg_ctl restart -m
fast``, then ``-m immediate``, which stops it as a crash would). A store
retries a lost connection on its own; what outlasts its retry bound reaches
the writer as ``DatabaseUnavailableError`` (or ``DatabaseBusyError``), after
which the writer waits a little and flushes the same list again: the
documented recovery. Other writers append, a message at a time, each to a
session of its own; after such an error they read the session's cursor and
go on from there. Half the writers have a short retry bound, so the restarts
reach them. The server commits synchronously.

A flush whose commit's acknowledgement was lost with its connection is
retried by the store and writes nothing the second time: the writers then
report fewer messages written than are stored, never more. An append so
retried must not store its message a second time.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from devtools.postgres import PostgresServer
from reliability._common import (
    Outcome,
    Reader,
    check,
    finish_writer,
    postgres_database,
    prepare,
    session_id,
    spawn,
)

#: ``application_name`` of the writers' connections: how their backends are found.
APPLICATION = "hermes-reliability-writer"
_EXPECTED = ("DatabaseUnavailableError", "DatabaseBusyError")
#: The retry policy of the writers that give up quickly.
_QUICK = {"attempts": 2, "base_delay": 0.01, "max_delay": 0.05, "unavailable_for": 0.05}
#: Seconds the writers may take to flush again after a restart.
_RECOVERY = 60.0


def run(
    server: PostgresServer,
    *,
    terminations: int,
    restarts: tuple[str, ...] = ("fast", "immediate"),
    writers: int = 4,
    appenders: int = 2,
    sessions: int = 3,
    cap_turns: int = 60,
    seed: int = 0,
) -> Outcome:
    """Terminate ``terminations`` writer backends, restart the server; check the database.

    Args:
        server: A server of this run's own (it is restarted).
        terminations: Backends of the writers to terminate.
        restarts: ``pg_ctl restart`` modes, one restart each, after the terminations.
        writers: Writer processes that flush.
        appenders: Writer processes that append, each to a session of its own.
        sessions: Sessions flushed at once (as in :mod:`reliability.contention`).
        cap_turns: Turns of a session before it is replaced.
        seed: Seeds the moments and the writers.
    """
    outcome = Outcome("connections", "postgresql")
    started = time.perf_counter()
    rng = random.Random(seed)
    with (
        postgres_database(server.url, "connections") as db,
        tempfile.TemporaryDirectory() as tmp,
    ):
        appended = [session_id(p, appended=True) for p in range(appenders)]
        prepare(db.url, [session_id(slot) for slot in range(sessions)] + appended)
        url = make_url(db.url).update_query_dict({"application_name": APPLICATION})
        stop = Path(tmp) / "stop"
        start_at = time.time() + 1.0 + 0.3 * (writers + appenders)
        running = []
        for p in range(writers):
            args: dict[str, Any] = {
                "url": url.render_as_string(hide_password=False),
                "seed": seed * 100_003 + p,
                "slots": sessions,
                "cap_turns": cap_turns,
                "start_at": start_at,
                "until": start_at + 3600,
                "stop_file": str(stop),
                "pace": rng.uniform(0.0, 0.005),
                "grow": rng.uniform(0.5, 1.0),
                "lag": rng.uniform(0.0, 0.2),
                "recover": True,
                # Half the writers give up quickly: the restarts reach them as errors.
                "retry": _QUICK if p % 2 else None,
            }
            process, stderr = spawn("writer", args)
            reader = Reader(process)
            reader.start()
            running.append((process, stderr, reader))
        for p, sid in enumerate(appended):
            args = {
                "url": url.render_as_string(hide_password=False),
                "session": sid,
                "start_at": start_at,
                "stop_file": str(stop),
                "retry": _QUICK if p % 2 else None,
            }
            process, stderr = spawn("appender", args)
            reader = Reader(process)
            reader.start()
            running.append((process, stderr, reader))
        readers = [reader for _, _, reader in running]
        admin = create_engine(server.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            if not _acks_after(readers, 0.0, timeout=60.0):
                outcome.problem("the writers acknowledged nothing in 60s")
            done, while_busy = _terminate(admin, terminations, rng)
            outcome.work = {
                "writers that flush": writers,
                "writers that append": appenders,
                "terminations": done,
                "terminations mid-statement or mid-transaction": while_busy,
                "restarts": len(restarts),
            }
            for mode in restarts:
                time.sleep(0.5)
                mark = time.monotonic()
                took = server.restart(mode)
                back = _acks_after(readers, mark + took, timeout=_RECOVERY)
                if back is None:
                    outcome.problem(
                        f"no flush acknowledged {_RECOVERY:.0f}s after restart -m {mode}"
                    )
                    continue
                outcome.notes[f"restart -m {mode}"] = (
                    f"pg_ctl {took:.2f}s; writers flushing again {back - mark:.2f}s after it began"
                )
            time.sleep(0.5)
        finally:
            stop.touch()
            admin.dispose()
        acked: dict[str, int] = {}
        written = appends_lost = 0
        for n, (process, stderr, reader) in enumerate(running):
            _, summary = finish_writer(
                process,
                stderr,
                reader,
                name=f"writer {n}",
                timeout=120,
                outcome=outcome,
                acked=acked,
                expected=_EXPECTED,
            )
            if summary is not None and n < writers:
                written += summary["written"]
            if summary is not None and n >= writers:
                appends_lost += summary["extra"]["acknowledgements lost"]
        check(db.url, acked, outcome)
        flushed_stored = outcome.stored - sum(acked.get(sid, 0) for sid in appended)
    outcome.notes["messages the flushing writers wrote (their sum)"] = f"{written:,}"
    outcome.notes["flushed messages whose commit's acknowledgement was lost"] = (
        f"{flushed_stored - written:,}"
    )
    outcome.notes["appends whose commit's acknowledgement was lost"] = f"{appends_lost:,}"
    if written > flushed_stored:
        outcome.problem(f"writers wrote {written} messages in all, only {flushed_stored} stored")
    outcome.seconds = time.perf_counter() - started
    return outcome


def _acks_after(readers: list[Reader], since: float, timeout: float) -> float | None:
    """When the first flush acknowledged after ``since`` (monotonic) came; None: none did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = [
            at
            for reader in readers
            for at, line in reader.snapshot()
            if at >= since and line.startswith("A ")
        ]
        if times:
            return min(times)
        time.sleep(0.01)
    return None


def _terminate(admin: Any, count: int, rng: random.Random) -> tuple[int, int]:
    """Terminate ``count`` writer backends; how many were, and how many mid-work.

    A backend running a statement or holding a transaction open is picked
    when there is one; otherwise an idle one (between two flushes).
    """
    done = busy = 0
    deadline = time.monotonic() + 60 + count
    query = text(
        "SELECT pid, state FROM pg_stat_activity WHERE application_name = :name "
        "AND pid <> pg_backend_pid()"
    )
    while done < count and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.01, 0.06))
        with contextlib.suppress(Exception), admin.connect() as conn:
            rows = conn.execute(query, {"name": APPLICATION}).all()
            working = [row.pid for row in rows if row.state in ("active", "idle in transaction")]
            for _ in range(20):  # a few looks for one at work, a few ms apart
                if working:
                    break
                time.sleep(0.002)
                rows = conn.execute(query, {"name": APPLICATION}).all()
                working = [r.pid for r in rows if r.state in ("active", "idle in transaction")]
            candidates = working or [row.pid for row in rows]
            if not candidates:
                continue
            pid = rng.choice(candidates)
            if conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar():
                done += 1
                busy += bool(working)
    return done, busy
