"""Scale: a store of many sessions, and one session of many messages, against small ones.

Each figure is the median of repeated operations on the large store over the
same operation on a small one built the same way, so a ratio near 1 means the
cost stays flat as the store grows. The sessions are written straight in SQL
(a million ``create_session`` calls would only time the setup); the long
session is written by ``SessionStore.flush`` in batches, as a bulk flush does.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import create_engine, text

import hermes_orm
from bench._workload import history, turn

#: Session sources, one in ten sessions comes from each; user ids, one session in 100 each.
_SOURCES = 10
_USERS_EVERY = 100


@dataclass
class Scaled:
    """Seconds of one operation on the small store and on the large one (medians)."""

    name: str
    small: float
    large: float

    @property
    def ratio(self) -> float:
        return self.large / self.small


def _fill_sessions(url: str, count: int) -> None:
    """``count`` sessions s0..s{count-1}, newest last, in one statement."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        series = (
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < :count) "
            "SELECT 's' || i, 'src' || (i % :sources), 'user' || (i / :users), 1.0 * i FROM n"
        )
    else:
        series = (
            "SELECT 's' || i, 'src' || (i % :sources), 'user' || (i / :users), i::float8 "
            "FROM generate_series(0, :count - 1) AS i"
        )
    with engine.begin() as conn:
        conn.execute(
            text(f"INSERT INTO hermes_sessions (id, source, user_id, started_at) {series}"),
            {"count": count, "sources": _SOURCES, "users": _USERS_EVERY},
        )
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE hermes_sessions")
    engine.dispose()


def _median(operation: Callable[[], Any], repeat: int) -> float:
    operation()  # warm: connections, statement caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        operation()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _session_ops(url: str, count: int, repeat: int) -> dict[str, float]:
    """List the first page, list one source's, flush a turn into the newest session."""
    _fill_sessions(url, count)
    store = hermes_orm.SessionStore(url)
    newest = f"s{count - 1}"
    messages: list[dict[str, Any]] = []
    turns = iter(range(10**9))
    rng = random.Random(5)

    def flush() -> None:
        messages.extend(turn(0, next(turns), rng))
        store.flush(newest, messages)

    ops = {
        "list the first page of 50": lambda: store.list_sessions(limit=50),
        "list the first page of one source": lambda: store.list_sessions(source="src3", limit=50),
        "list the first page of one user": lambda: store.list_sessions(
            user_id=f"user{count // _USERS_EVERY // 2}", limit=50
        ),
        "flush a turn into one of them": flush,
    }
    out = {name: _median(op, repeat) for name, op in ops.items()}
    store.close()
    return out


def _long_session_ops(url: str, length: int, repeat: int) -> dict[str, float]:
    """Flush a turn into a session of ``length`` messages; read its last page."""
    store = hermes_orm.SessionStore(url)
    store.create_session("long", source="bench")
    messages = history(length)
    store.flush("long", messages)
    rng = random.Random(6)
    turns = iter(range(10**9))

    def flush() -> None:
        messages.extend(turn(0, next(turns), rng))
        store.flush("long", messages, verify="last")

    def last_page() -> None:
        got = store.get_messages("long", offset=len(messages) - 50, limit=50)
        assert len(got) == 50

    ops = {
        "flush a turn into it (verify='last')": flush,
        "read its last page of 50": last_page,
    }
    out = {name: _median(op, repeat) for name, op in ops.items()}
    store.close()
    return out


def run(
    fresh: dict[str, Callable[[], str]],
    *,
    sessions: tuple[int, int],
    messages: tuple[int, int],
    repeat: int,
    progress: Callable[[str], None],
) -> list[tuple[str, Scaled]]:
    """Every operation on a small and a large store, per backend.

    ``fresh``: per backend name, a maker of fresh, migrated, empty databases (URLs).
    """
    results: list[tuple[str, Scaled]] = []
    (few, many), (short, long_) = sessions, messages
    for backend, make in fresh.items():
        progress(f"{backend}: {few:,} and {many:,} sessions")
        small, large = _session_ops(make(), few, repeat), _session_ops(make(), many, repeat)
        for name in small:
            label = f"{name} ({many:,} vs {few:,} sessions)"
            results.append((backend, Scaled(label, small[name], large[name])))
        progress(f"{backend}: sessions of {short:,} and {long_:,} messages")
        small = _long_session_ops(make(), short, repeat)
        large = _long_session_ops(make(), long_, repeat)
        for name in small:
            label = f"{name} ({long_:,} vs {short:,} messages)"
            results.append((backend, Scaled(label, small[name], large[name])))
    return results
