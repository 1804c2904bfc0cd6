"""Record what hermes_orm sends to the driver, and replay it with the bare driver.

The replay is the floor of every flush benchmark: the very statements,
parameters and transaction boundaries hermes_orm emitted, run by ``sqlite3`` or
``psycopg`` alone on an identical fresh database. What it costs is the database
work; what hermes_orm costs beyond it is our overhead.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event

from hermes_orm._dialects import _numbered

COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"


@dataclass
class Recording:
    """Driver calls in order: ``(sql, params, executemany, autocommit)``, or COMMIT/ROLLBACK.

    ``autocommit``: the statement ran as a transaction of its own (the driver
    connection in autocommit), as a PostgreSQL flush's one statement does.
    """

    calls: list[tuple[str, Any, bool, bool]] = field(default_factory=list)

    @property
    def statements(self) -> int:
        return sum(1 for sql, *_ in self.calls if sql not in (COMMIT, ROLLBACK))


@contextmanager
def record(engine: Engine) -> Iterator[Recording]:
    """Record the engine's driver calls while the block runs."""
    rec = Recording()

    def on_execute(conn: Any, _cur: Any, sql: str, params: Any, _ctx: Any, many: bool) -> None:
        autocommit = bool(getattr(conn.connection.dbapi_connection, "autocommit", False))
        rec.calls.append((sql, params, many, autocommit))

    def on_commit(conn: Any) -> None:
        if not getattr(conn.connection.dbapi_connection, "autocommit", False):
            rec.calls.append((COMMIT, None, False, False))

    def on_rollback(_c: Any) -> None:
        rec.calls.append((ROLLBACK, None, False, False))

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", on_commit)
    event.listen(engine, "rollback", on_rollback)
    try:
        yield rec
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "commit", on_commit)
        event.remove(engine, "rollback", on_rollback)


def _replay(
    conn: Any, cur: Any, commit: Any, rollback: Any, rec: Recording, *, raw: Any = None
) -> float:
    """Run the recorded calls on a driver cursor; returns seconds.

    ``raw``: a cursor taking ``$1`` placeholders, for the statements with
    positional parameters (numbered before the clock starts).
    """
    calls = [
        (_numbered(sql), params, many, autocommit, raw)
        if raw is not None and sql not in (COMMIT, ROLLBACK) and isinstance(params, tuple | list)
        else (sql, params, many, autocommit, cur)
        for sql, params, many, autocommit in rec.calls
    ]
    start = time.perf_counter()
    for sql, params, many, autocommit, on in calls:
        if sql is COMMIT:
            commit()
        elif sql is ROLLBACK:
            rollback()
        elif many:
            on.executemany(sql, params)
        else:
            if autocommit:
                conn.autocommit = True
            on.execute(sql, params)
            if on.description is not None:
                on.fetchall()
            if autocommit:
                conn.autocommit = False
    return time.perf_counter() - start


def replay_sqlite(path: str, rec: Recording, synchronous: str) -> float:
    """Replay on the SQLite file at ``path`` (the pragmas hermes_orm sets); returns seconds."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA synchronous={synchronous}")

    def end(statement: str) -> None:
        if conn.in_transaction:
            conn.execute(statement)

    elapsed = _replay(conn, conn.cursor(), lambda: end("COMMIT"), lambda: end("ROLLBACK"), rec)
    conn.close()
    return elapsed


def replay_psycopg(url: str, rec: Recording) -> float:
    """Replay on the PostgreSQL database at ``url`` (libpq form); returns seconds.

    On a ``RawCursor``, its placeholders numbered beforehand, as hermes_orm runs
    its hot statements: psycopg converts nothing while the replay is timed.
    """
    import psycopg

    conn = psycopg.connect(url)
    elapsed = _replay(
        conn, conn.cursor(), conn.commit, conn.rollback, rec, raw=psycopg.RawCursor(conn)
    )
    conn.close()
    return elapsed
