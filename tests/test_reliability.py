"""The reliability suite's quick form (``python -m reliability --quick``), scenario by scenario.

Each scenario must leave every session exact (nothing duplicated, nothing
lost), raise no untyped error, and show that it did its work: writers killed,
backends terminated, disks filled, calls made. What the suite once found in
hermes_orm (a refused flush that kept SQLite's read snapshot, untyped errors for
bad arguments, float fields that read back another number) has a test of its own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.postgres import local_postgres
from hermes_orm import (
    HermesOrmError,
    HistoryDivergedError,
    InvalidSessionError,
    RetryPolicy,
    SessionStore,
)
from reliability import connections, contention, disk, inputs, kill
from reliability.__main__ import PG_SETTINGS, QUICK
from reliability._common import Database, Outcome, postgres_database, sqlite_database


@pytest.fixture
def database(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A fresh, empty database of the test's backend (PostgreSQL: on the session's server)."""
    if backend == "sqlite":
        yield sqlite_database(tmp_path, "reliability")
        return
    with postgres_database(request.getfixturevalue("pg_server_url"), "test") as db:
        yield db


def assert_exact(outcome: Outcome) -> None:
    """Nothing duplicated or lost, no untyped error, no other failure."""
    assert outcome.duplicated == 0, outcome.problems[:5]
    assert outcome.lost == 0, outcome.problems[:5]
    assert not outcome.untyped, outcome.samples
    assert not outcome.problems, outcome.problems[:5]
    assert outcome.ok


def test_kill(database: Database) -> None:
    outcome = kill.run(database, kills=QUICK.kills)
    assert_exact(outcome)
    assert outcome.work["kills"] == QUICK.kills
    assert outcome.work["kills that landed inside a flush call"] > 0
    assert outcome.flushes > QUICK.kills  # every writer acknowledged a flush before it died
    assert 0 < outcome.acknowledged <= outcome.stored


def test_contention(database: Database) -> None:
    processes = {"sqlite": QUICK.contention_sqlite, "postgresql": QUICK.contention_postgresql}
    outcome = contention.run(
        database, processes=processes[database.backend], seconds=QUICK.contention_seconds
    )
    assert_exact(outcome)
    assert outcome.flushes > 0
    assert outcome.stored > 0
    written = outcome.notes["messages written (sum over writers)"]
    assert int(written.replace(",", "")) == outcome.stored
    assert set(outcome.typed) <= {"DatabaseBusyError"}


@pytest.mark.postgresql
def test_connections() -> None:
    with local_postgres(PG_SETTINGS) as server:
        outcome = connections.run(server, terminations=QUICK.terminations)
    assert_exact(outcome)
    assert outcome.work["terminations"] == QUICK.terminations
    assert outcome.work["restarts"] == 2
    assert {"restart -m fast", "restart -m immediate"} <= set(outcome.notes)
    assert outcome.acknowledged > 0
    assert set(outcome.typed) <= {"DatabaseUnavailableError", "DatabaseBusyError"}


@pytest.mark.sqlite
def test_disk(tmp_path: Path) -> None:
    outcome = disk.run(tmp_path, episodes=QUICK.disk_episodes)
    assert_exact(outcome)
    assert outcome.work["disk-full errors"] > 0
    assert set(outcome.typed) == {"DatabaseError"}
    assert outcome.notes["PRAGMA integrity_check"] == "ok"
    assert outcome.acknowledged > 0


# -- inputs, and what the suite once found -----------------------------------------------------


def test_inputs(database: Database) -> None:
    outcome = inputs.run(database, calls=QUICK.inputs)
    assert outcome.work["calls"] == QUICK.inputs
    assert outcome.work["successes"] > QUICK.inputs // 5
    assert outcome.work["typed refusals"] > QUICK.inputs // 5
    assert outcome.duplicated == outcome.lost == 0
    assert not outcome.untyped, {kind: outcome.samples[kind] for kind in outcome.untyped}
    assert not outcome.problems, outcome.problems[:5]
    assert outcome.ok


def _untyped_on_bad_arguments(store: SessionStore) -> list[str]:
    """Calls whose bad arguments raise an exception that is no ``HermesOrmError``."""

    def forged(value: object) -> str:
        raw = json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    store.create_session("s", source="cli")
    calls: dict[str, Callable[[], object]] = {
        "get_messages(offset=-1)": lambda: store.get_messages("s", offset=-1),
        "get_messages(limit='3')": lambda: store.get_messages("s", limit="3"),  # type: ignore[arg-type]
        "get_messages(offset=2**63)": lambda: store.get_messages("s", offset=2**63),
        "flush(verify='none')": lambda: store.flush("s", [], verify="none"),  # type: ignore[arg-type]
        "list_sessions(cursor=[10**400, 's'])": lambda: store.list_sessions(
            cursor=forged([10**400, "s"])
        ),
        "list_sessions(cursor=[1.0, lone surrogate])": lambda: store.list_sessions(
            cursor=base64.urlsafe_b64encode(b'[1.0, "\\ud800"]').decode()
        ),
        "search(cursor='m' + 40 digits)": lambda: store.search("hello", cursor="m" + "9" * 40),
        "list_sessions(cursor=2,000 brackets)": lambda: store.list_sessions(
            cursor=base64.urlsafe_b64encode(b"[" * 2000).decode()
        ),
        # Each more than SQLite's expression depth (1,000) as a chain of conditions.
        "search(1,000 words in a session)": lambda: store.search(
            " ".join(["a"] * 1000), session_id="s"
        ),
        "search(997 CJK characters)": lambda: store.search(" ".join(["部"] * 997)),
        "search(source=70,000 distinct)": lambda: store.search(
            "hello", source=[f"s{i}" for i in range(70_000)]
        ),
        "search(role=70,000 distinct)": lambda: store.search(
            "hello", role=[f"r{i}" for i in range(70_000)]
        ),
        "RetryPolicy(attempts=0)": lambda: RetryPolicy(attempts=0),
        "RetryPolicy(attempts='x')": lambda: RetryPolicy(attempts="x"),  # type: ignore[arg-type]
        "SessionStore(retry=5)": lambda: SessionStore(store.engine.url, retry=5),  # type: ignore[arg-type]
        "SessionStore(sqlite file with NUL)": lambda: SessionStore("sqlite:////tmp/a\x00.db"),
        "SessionStore(sqlite file, lone surrogate)": lambda: SessionStore(
            "sqlite:////tmp/a\ud800.db"
        ),
        "SessionStore(lock_timeout=-1)": lambda: SessionStore(store.engine.url, lock_timeout=-1),
        "SessionStore(lock_timeout=inf)": lambda: SessionStore(
            store.engine.url, lock_timeout=float("inf")
        ),
        "SessionStore(sqlite_synchronous=None)": lambda: SessionStore(
            store.engine.url,
            sqlite_synchronous=None,  # type: ignore[arg-type]
        ),
    }
    found = []
    for name, call in calls.items():
        try:
            call()
        except HermesOrmError:
            pass
        except Exception as exc:
            found.append(f"{name}: {type(exc).__name__}")
    return found


def _stale_after_diverged_flush(url: str) -> str | None:
    """After a refused (diverged) flush, does the store still see other writers' commits?"""
    writer, other = SessionStore(url), SessionStore(url)
    writer.upgrade()
    writer.create_session("s", source="cli")
    messages = [{"role": "user", "content": f"m{i}"} for i in range(3)]
    writer.flush("s", messages)
    rewritten = [messages[0], {"role": "user", "content": "rewritten"}, *messages[2:]]
    refusal = None
    try:
        other.flush("s", rewritten)  # a store with no copies compares the stored digests
    except HistoryDivergedError as exc:
        refusal = exc  # kept a while, as by a caller handling (logging) it
    assert refusal is not None
    try:
        writer.flush("s", [*messages, {"role": "user", "content": "m3"}])
        seen = other.get_session("s")
        assert seen is not None
        if seen["flushed_idx"] != 4:
            return f"after HistoryDivergedError: flushed_idx {seen['flushed_idx']}, not 4"
        return None
    finally:
        writer.close()
        other.close()


def _inexact_float_fields(store: SessionStore) -> list[str]:
    """Session float fields given ints a float cannot hold: refused, or read back equal?"""
    found = []
    for name in ("started_at", "estimated_cost_usd"):
        try:
            store.create_session(f"f-{name}", source="cli", **{name: 2**53 + 1})
        except InvalidSessionError:
            assert store.get_session(f"f-{name}") is None  # nothing written
            continue
        back = store.get_session(f"f-{name}")
        assert back is not None
        if back[name] != 2**53 + 1:
            found.append(f"{name}=2**53+1 reads back {back[name]!r}")
    return found


def test_a_diverged_flush_leaves_no_stale_snapshot(db_url: str) -> None:
    """A refused flush ends its read: the store then sees what others commit."""
    assert _stale_after_diverged_flush(db_url) is None


def test_bad_arguments_raise_typed_errors(db_url: str) -> None:
    with SessionStore(db_url) as store:
        assert _untyped_on_bad_arguments(store) == []


def test_float_session_fields_read_back_exactly_or_are_refused(db_url: str) -> None:
    with SessionStore(db_url) as store:
        assert _inexact_float_fields(store) == []
