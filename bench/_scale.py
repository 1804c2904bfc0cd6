"""Scale: a store of many sessions, and one session of many messages, against small ones.

Each figure is the median of repeated operations on the large store over the
same operation on a small one built the same way, so a ratio near 1 means the
cost stays flat as the store grows. The two stores are open side by side and
take turns, so the drift of a shared machine over the run weighs on both. The
sessions are written straight in SQL (a million ``create_session`` calls would
only time the setup); the long session is written by ``SessionStore.flush`` in
batches, as a bulk flush does.
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


#: Operations by name, each ready to run on a store that ``close`` ends.
_Ops = tuple[dict[str, Callable[[], Any]], Callable[[], None]]


def _session_ops(url: str, count: int) -> _Ops:
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
    return ops, store.close


def _long_session_ops(url: str, length: int) -> _Ops:
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
    return ops, store.close


def _side_by_side(small: _Ops, large: _Ops, repeat: int) -> dict[str, tuple[float, float]]:
    """Median seconds of each operation on the small store and on the large one.

    The two run in turns (small then large, then large then small, ...), so a
    shared machine's drift over the seconds of the run weighs on both alike;
    each is warmed first (connections, statement caches).
    """
    out = {}
    for name in small[0]:
        pair = (small[0][name], large[0][name])
        times: tuple[list[float], list[float]] = ([], [])
        for operation in pair:
            operation()
        for round_ in range(repeat):
            for side in (0, 1) if round_ % 2 == 0 else (1, 0):
                start = time.perf_counter()
                pair[side]()
                times[side].append(time.perf_counter() - start)
        out[name] = (statistics.median(times[0]), statistics.median(times[1]))
    for _, close in (small, large):
        close()
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
        pairs = _side_by_side(_session_ops(make(), few), _session_ops(make(), many), repeat)
        for name, (small, large) in pairs.items():
            label = f"{name} ({many:,} vs {few:,} sessions)"
            results.append((backend, Scaled(label, small, large)))
        progress(f"{backend}: sessions of {short:,} and {long_:,} messages")
        pairs = _side_by_side(
            _long_session_ops(make(), short), _long_session_ops(make(), long_), repeat
        )
        for name, (small, large) in pairs.items():
            label = f"{name} ({long_:,} vs {short:,} messages)"
            results.append((backend, Scaled(label, small, large)))
    return results
