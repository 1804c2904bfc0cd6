"""The Hermes mirror on real databases: what it stores, revisions, bounded waits, the plugin."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError

import hermes_orm
from hermes_orm import SessionStore
from hermes_orm.integrations.hermes.mirror import (
    EXIT_WAIT,
    SCAFFOLDING_FLAGS,
    Mirror,
    StatusFile,
    StoreFlush,
    conversation,
    same_turn,
)
from hermes_orm.integrations.hermes.plugin import make_hooks

# the Hermes plugin writes through a blocking SessionStore: its tests run on that API only.
pytestmark = pytest.mark.apis("sync")


def _turn(n: int) -> list[dict[str, Any]]:
    """Turn ``n`` as Hermes keeps it: user, a tool call, its result, the answer."""
    return [
        {"role": "user", "content": f"question {n}"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": f"call_{n}",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "a.txt"}'},
                }
            ],
            "finish_reason": "tool_calls",
        },
        {"role": "tool", "content": f"file {n}", "tool_call_id": f"call_{n}"},
        {"role": "assistant", "content": f"answer {n}", "finish_reason": "stop"},
    ]


@pytest.fixture
def status(tmp_path: Path) -> StatusFile:
    return StatusFile(tmp_path / "status.json")


@pytest.fixture
def mirror(db_url: str, status: StatusFile) -> Iterator[Mirror]:
    m = Mirror(db_url, status=status, wait=5.0)
    yield m
    m.close()


def _stored(store: SessionStore, session_id: str) -> list[dict[str, Any]]:
    return store.get_messages(session_id)


def test_hermes_marks_and_scaffolding_are_not_stored() -> None:
    history = [
        {"role": "user", "content": "hi", "_db_persisted": True},
        {"role": "assistant", "content": "(empty)", "_empty_terminal_sentinel": True},
        {"role": "assistant", "content": "hello", "_tool_output_risk": {"x": 1}},
    ]
    assert conversation(history) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert history[0]["_db_persisted"] is True  # Hermes' own dicts are left as they are


def test_scaffolding_flags_match_the_installed_hermes() -> None:
    run_agent = pytest.importorskip("run_agent")
    assert set(SCAFFOLDING_FLAGS) == set(run_agent._EPHEMERAL_SCAFFOLDING_FLAGS)


def test_turns_are_flushed_once_and_later_stamps_do_not_diverge(
    mirror: Mirror, store: SessionStore
) -> None:
    history = _turn(1)
    assert mirror.turn("s1", history, "gpt", "telegram")
    for message in history:  # Hermes marks what it saved, in place
        message["_db_persisted"] = True
    history[0]["timestamp"] = 1700000000.0  # and adds keys to old messages
    history += _turn(2)
    assert mirror.turn("s1", history)
    assert mirror.turn("s1", history)  # the same list again

    assert _stored(store, "s1") == _turn(1) + _turn(2)
    session = store.get_session("s1")
    assert session is not None
    assert (session["source"], session["model"], session["message_count"]) == ("telegram", "gpt", 8)
    assert store.get_session("s1#2") is None


def test_a_new_mirror_continues_a_reloaded_conversation(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    first = Mirror(db_url, status=status)
    assert first.turn("s1", _turn(1))
    first.close()
    # As Hermes reloads it from state.db: other keys, "" for a missing content.
    reloaded = [{**m, "timestamp": 1.0, "content": m["content"] or None} for m in _turn(1)]
    second = Mirror(db_url, status=status)
    assert second.turn("s1", reloaded + _turn(2))
    second.close()

    assert _stored(store, "s1") == _turn(1) + _turn(2)
    assert store.get_session("s1#2") is None


def test_a_rewritten_history_is_kept_beside_the_stored_one(
    mirror: Mirror, store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    assert mirror.turn("s1", _turn(1) + _turn(2), "gpt")
    compacted = [{"role": "user", "content": "[summary of turn 1]"}, *_turn(2)]
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        assert mirror.turn("s1", compacted)
    assert mirror.turn("s1", [*compacted, *_turn(3)])

    assert _stored(store, "s1") == _turn(1) + _turn(2)  # never appended to
    assert _stored(store, "s1#2") == [*compacted, *_turn(3)]
    revision = store.get_session("s1#2")
    assert revision is not None
    assert revision["parent_session_id"] == "s1"
    assert revision["extra"] == {"hermes_session_id": "s1", "revision": 2, "diverged_at": 0}
    assert revision["model"] == "gpt"
    original = store.get_session("s1")
    assert original is not None
    assert original["end_reason"] == "rewritten"
    assert "no longer continues its stored history" in caplog.text


def test_a_restarted_mirror_finds_the_revision_the_conversation_continues(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    first = Mirror(db_url, status=status)
    first.turn("s1", _turn(1))
    first.turn("s1", _turn(2))  # rewritten: revision 2
    first.close()
    second = Mirror(db_url, status=status)
    assert second.turn("s1", _turn(2) + _turn(3))
    second.close()

    assert _stored(store, "s1") == _turn(1)
    assert _stored(store, "s1#2") == _turn(2) + _turn(3)
    assert store.get_session("s1#3") is None


def test_a_stored_duplicate_is_reported_and_the_live_conversation_kept(
    mirror: Mirror, store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    # A history imported from a Hermes state.db holding one message twice.
    store.create_session("s1", source="cli")
    duplicated = _turn(1)
    store.flush("s1", [*duplicated[:3], duplicated[2], duplicated[3]])
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        assert mirror.turn("s1", _turn(1) + _turn(2))
    assert _stored(store, "s1#2") == _turn(1) + _turn(2)
    assert "message 3 differs" in caplog.text


def test_a_lagging_list_writes_nothing(mirror: Mirror, store: SessionStore) -> None:
    assert mirror.turn("s1", _turn(1) + _turn(2))
    assert mirror.turn("s1", _turn(1))
    assert _stored(store, "s1") == _turn(1) + _turn(2)
    assert store.get_session("s1#2") is None


def test_compression_child_is_linked_to_its_parent(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    hermes_rows = {
        "s1": {"source": "telegram", "user_id": "u1", "end_reason": "compression"},
        "s2": {"source": "telegram", "user_id": "u1", "parent_session_id": "s1"},
        "s3": {"source": "cli", "parent_session_id": "never-mirrored"},
    }
    m = Mirror(db_url, status=status, hermes_sessions=hermes_rows.get)
    m.turn("s1", _turn(1))
    m.turn("s2", [{"role": "user", "content": "[summary]"}, *_turn(2)])
    m.turn("s3", _turn(3))
    m.close()

    child = store.get_session("s2")
    assert child is not None
    assert (child["parent_session_id"], child["user_id"], child["source"]) == (
        "s1",
        "u1",
        "telegram",
    )
    parent = store.get_session("s1")
    assert parent is not None
    assert parent["end_reason"] == "compression"
    orphan = store.get_session("s3")
    assert orphan is not None
    assert orphan["parent_session_id"] is None
    assert orphan["extra"] == {"hermes_parent_session_id": "never-mirrored"}


def test_a_compression_after_a_rewrite_continues_the_newest_revision(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    """``/undo`` then a turn made ``s1#2``: the child of a later compression is linked to
    ``s1#2`` (the conversation compressed), which ends with Hermes' reason."""
    hermes_rows = {
        "s1": {"source": "cli", "end_reason": "compression"},
        "c1": {"source": "cli", "parent_session_id": "s1"},
    }
    m = Mirror(db_url, status=status, hermes_sessions=hermes_rows.get)
    m.turn("s1", [*_turn(1), *_turn(2)])
    m.turn("s1", [*_turn(1), *_turn(3)])  # the second turn taken back, another made
    m.turn("c1", [{"role": "user", "content": "[summary]"}, *_turn(4)])
    m.close()
    ends = {
        s["id"]: (s["parent_session_id"], s["end_reason"]) for s in store.list_sessions().sessions
    }
    assert ends == {
        "s1": (None, "rewritten"),
        "s1#2": ("s1", "compression"),
        "c1": ("s1#2", None),
    }


def test_the_end_writes_a_last_turn_that_fired_no_hook(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    """A turn that failed (the model's API) or was interrupted fires no hook, yet Hermes
    stored its messages: the session's end writes them, when they continue the mirrored
    history; a Hermes conversation that does not is left alone (no revision)."""
    failed = [*_turn(1), {"role": "user", "content": "question 2"}, _turn(2)[1]]
    stored_by_hermes = {
        "s1": failed,
        "s2": _turn(9),  # not what the mirror holds of s2: Hermes' own write failed, say
        "s3": failed,  # its only turn failed: no hook ever fired for it
    }
    hermes_rows = {"s1": {"source": "cli"}, "s2": {"source": "cli"}, "s3": {"source": "tui"}}
    m = Mirror(
        db_url,
        status=status,
        hermes_sessions=hermes_rows.get,
        hermes_conversation=stored_by_hermes.get,
        wait=5.0,
    )
    m.turn("s1", _turn(1))
    m.turn("s2", _turn(1))
    for session_id in ("s1", "s2", "s3", "never-seen"):
        assert m.finalize(session_id, "cli_close")
    m.close()
    assert _stored(store, "s1") == failed
    assert _stored(store, "s2") == _turn(1)
    assert _stored(store, "s3") == failed
    ends = {s["id"]: (s["source"], s["end_reason"]) for s in store.list_sessions().sessions}
    assert ends == {
        "s1": ("cli", "cli_close"),
        "s2": ("cli", "cli_close"),
        "s3": ("tui", "cli_close"),
    }


def test_the_end_ends_a_session_whose_stored_turn_the_store_refuses(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    """What Hermes stored past the mirrored history holds a message the store refuses
    (a NaN in a tool call's arguments, which Hermes' JSON takes): the end is kept."""
    refused = {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "x": math.nan}]}
    stored_by_hermes = {"s1": [*_turn(1), {"role": "user", "content": "question 2"}, refused]}
    m = Mirror(db_url, status=status, hermes_conversation=stored_by_hermes.get, wait=5.0)
    m.turn("s1", _turn(1))
    assert m.finalize("s1", "cli_close")
    m.close()
    assert _stored(store, "s1") == _turn(1)
    ended = store.get_session("s1")
    assert ended is not None
    assert ended["end_reason"] == "cli_close"


def test_finalize_ends_the_current_revision(mirror: Mirror, store: SessionStore) -> None:
    mirror.turn("s1", _turn(1))
    mirror.turn("s1", _turn(2))
    assert mirror.finalize("s1", "shutdown")
    assert mirror.finalize("never-seen", "shutdown")  # nothing to end, no error
    revision = store.get_session("s1#2")
    assert revision is not None
    assert revision["end_reason"] == "shutdown"


def test_a_session_resumed_after_its_end_is_open_until_it_ends_again(
    mirror: Mirror, store: SessionStore
) -> None:
    """Hermes reopens a session it resumes: its copy is reopened by the next turn, and the
    next end is the one it keeps (Hermes' reason, the later time)."""
    mirror.turn("s1", _turn(1))
    assert mirror.finalize("s1", "cli_close")
    first = store.get_session("s1")
    assert first is not None
    assert first["end_reason"] == "cli_close"
    mirror.turn("s1", _turn(1) + _turn(2))
    resumed = store.get_session("s1")
    assert resumed is not None
    assert (resumed["ended_at"], resumed["end_reason"]) == (None, None)
    assert mirror.finalize("s1", "user_exit")
    ended = store.get_session("s1")
    assert ended is not None
    assert ended["end_reason"] == "user_exit"
    assert ended["ended_at"] >= first["ended_at"]
    assert _stored(store, "s1") == _turn(1) + _turn(2)
    # A new conversation under the id (one that does not continue it) leaves it ended.
    mirror.turn("s1", _turn(3))
    assert mirror.finalize("s1", "cli_close")
    kept = store.get_session("s1")
    assert kept is not None
    assert (kept["ended_at"], kept["end_reason"]) == (ended["ended_at"], "user_exit")
    revision = store.get_session("s1#2")
    assert revision is not None
    assert revision["end_reason"] == "cli_close"


class _Locked:
    """The mirror's database held by another writer (a real lock, not a mock)."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self._release: Any = None

    def __enter__(self) -> _Locked:
        if self.url.get_backend_name() == "sqlite":
            conn = sqlite3.connect(self.url.database, isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            self._release = lambda: (conn.execute("ROLLBACK"), conn.close())
        else:
            engine = create_engine(self.url)
            conn = engine.connect()
            conn.exec_driver_sql("LOCK TABLE hermes_sessions IN ACCESS EXCLUSIVE MODE")
            self._release = lambda: (conn.rollback(), conn.close(), engine.dispose())
        return self

    def __exit__(self, *_: Any) -> None:
        self._release()


def test_a_locked_database_costs_a_turn_at_most_the_wait_and_the_next_turn_catches_up(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    m = Mirror(db_url, status=status, wait=0.3)
    m.turn("s1", _turn(1))
    assert m._worker.drain(30)
    with _Locked(db_url):
        began = time.monotonic()
        assert not m.turn("s1", _turn(1) + _turn(2))  # the turn goes on ...
        waited = time.monotonic() - began
        assert m._worker.drain(30)  # ... while the write tries the store's whole schedule
        tried = time.monotonic() - began
    assert waited < tried / 2
    error = status.read()["error"]
    assert error["session_id"] == "s1"
    assert "catches up" in error["todo"]
    assert m.turn("s1", _turn(1) + _turn(2) + _turn(3))
    m.close()

    assert _stored(store, "s1") == _turn(1) + _turn(2) + _turn(3)
    assert "error" not in status.read()


def test_a_session_id_used_again_while_its_last_turn_waits_loses_nothing(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    """A conversation ended and its id used again (``/new``) while its last turn still queues.

    The new conversation's turns must not take the place of that turn's write,
    nor move the end of the old one after them.
    """
    m = Mirror(db_url, status=status, wait=0.05)
    m.turn("s1", _turn(1))
    assert m._worker.drain(30)
    with _Locked(db_url):
        m.turn("other", _turn(9))  # the writer waits for the lock with this one ...
        m.turn("s1", _turn(1) + _turn(2))  # ... and s1's next turn behind it
        m.finalize("s1", "session_reset")
        m.turn("s1", _turn(7))  # the id, used again for a new conversation
        m.finalize("s1", "shutdown")
    assert m._worker.drain(60)
    m.close()

    assert _stored(store, "s1") == _turn(1) + _turn(2)
    assert store.get_session("s1")["end_reason"] == "session_reset"  # type: ignore[index]
    assert _stored(store, "s1#2") == _turn(7)
    assert store.get_session("s1#2")["end_reason"] == "shutdown"  # type: ignore[index]
    assert _stored(store, "other") == _turn(9)


@pytest.mark.parametrize(
    "then",
    [
        "another turn",
        "exit",
        "written meanwhile",
        "resumed",
        "revised meanwhile",
        "exit locked",
        "ended again",
    ],
)
@pytest.mark.heavy
def test_an_end_the_locked_database_refused_is_written_onto_the_session_it_ended(
    db_url: str, status: StatusFile, store: SessionStore, then: str
) -> None:
    """``/new`` while another writer holds the database past the retries: the end is
    written once the database takes this process's writes again (another session's
    turn, or the exit), with the time and reason it was given, and the status cleared.
    A session written to meanwhile (another process resumed it), or resumed here, has
    moved on from the state that end closed: it is left open. So is one another process
    began a new revision of (its end of this one, as ``rewritten``, not yet written).
    Either way nothing is left to do, and the status says nothing. An exit with the
    database still locked leaves the end unwritten, and the status says that."""
    m = Mirror(db_url, status=status, wait=0.05)
    m.turn("s1", _turn(1))
    assert m._worker.drain(30)
    ended = time.time()
    with _Locked(db_url):
        m.finalize("s1", "new_session")
        assert m._worker.drain(60)  # the end's whole retry schedule, refused
        error = status.read()["error"]
        assert (error["session_id"], error["todo"]) == (
            "s1",
            "its end is written once the database takes this process's writes again (another "
            "session's turn, or the exit), unless the session is written to or resumed first",
        )
        if then == "exit locked":
            m.close(timeout=60)
    refused = time.time()
    assert (store.get_session("s1") or {})["ended_at"] is None
    if then == "written meanwhile":
        store.flush("s1", _turn(1) + _turn(2))
    if then == "resumed":  # (with nothing new yet: a turn here is this process's own)
        m.turn("s1", _turn(1))
    if then == "revised meanwhile":
        store.create_session("s1#2", source="cli", parent_session_id="s1")
    if then == "ended again":  # (Hermes ends it once more: that end is written at once)
        assert m.finalize("s1", "session_reset")
    if then == "exit locked":
        assert status.read()["error"]["todo"] == (
            "its end is not written: the mirrored copy stays open until a turn resumes it"
        )
        assert (store.get_session("s1") or {})["ended_at"] is None
        return
    if then not in ("exit", "ended again"):
        m.turn("s2", _turn(1))
        assert m._worker.drain(30)
    m.close()
    row = store.get_session("s1") or {}
    assert status.read().get("error") is None
    if then == "ended again":
        assert row["end_reason"] == "session_reset"
    elif then in ("another turn", "exit"):
        assert row["end_reason"] == "new_session"
        assert ended <= row["ended_at"] <= refused  # when it ended, not when written
    else:
        assert (row["ended_at"], row["end_reason"]) == (None, None)
        assert row["message_count"] == (8 if then == "written meanwhile" else 4)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://hermes:S3CRET@127.0.0.1:1/nowhere",
        "postgresql://hermes@127.0.0.1:1/nowhere?password=S3CRET&connect_timeout=1",
    ],
)
def test_an_unreachable_database_is_recorded_without_its_password(
    status: StatusFile, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    m = Mirror(url, status=status, wait=10)
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        assert m.turn("s1", _turn(1))  # ran, and failed
    m.close()
    error = status.read()["error"]
    assert "Connection refused" in error["message"]
    assert "catches up" in error["todo"]
    assert "127.0.0.1:1/nowhere" in caplog.text
    assert "S3CRET" not in status.path.read_text() + caplog.text


@pytest.mark.parametrize("mode", ["mirror", "store"])
def test_sessions_left_unwritten_at_exit_are_told_where_they_are(
    status: StatusFile, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A mirror's Hermes keeps them in its state.db (an import copies them); in store mode
    Hermes keeps its sessions in this database alone: no import has them to copy."""
    kind = Mirror if mode == "mirror" else StoreFlush
    m = kind("postgresql://hermes@127.0.0.1:1/nowhere", status=status, wait=10)
    assert m.turn("s1", _turn(1))  # ran, and failed
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        m.close(final=False)  # (the plugin's early close, then its last)
        m.close()
        m.close()  # (a close more gives nothing up twice)
    told = [r.getMessage() for r in caplog.records if "at exit" in r.getMessage()]
    assert len(told) == 1, caplog.text
    assert ("hermes orm import" in told[0]) is (mode == "mirror")
    assert ("kept nowhere else" in told[0]) is (mode == "store")
    # Store mode: a resumed turn does not write them: the status keeps the loss.
    given_up = status.read().get("given_up", [])
    assert [e["session_id"] for e in given_up] == (["s1"] if mode == "store" else [])
    assert ("catches up" in str(status.read().get("error"))) is (mode == "mirror")


@pytest.mark.heavy
def test_only_the_last_close_gives_up_what_the_database_would_not_take(
    db_url: str, status: StatusFile, store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The plugin's early close, before the exit steps of what was set up since it
    loaded, tells of it; the last, after them, writes it once the database takes it,
    and records a loss only of what is still not written."""
    m = StoreFlush(db_url, status=status, wait=10)
    with caplog.at_level(logging.WARNING, logger="hermes_orm"), _Locked(db_url):
        assert m.turn("s1", _turn(1))  # ran, and failed: kept
        m.close(final=False)
    told = [r.getMessage() for r in caplog.records if "at exit" in r.getMessage()]
    assert len(told) == 1, caplog.text
    assert "given_up" not in status.read()
    assert m.close()  # the database back: written
    assert [(row["role"], row["content"]) for row in _stored(store, "s1")] == [
        (row["role"], row["content"]) for row in _turn(1)
    ]
    assert "given_up" not in status.read()
    assert len([r for r in caplog.records if "at exit" in r.getMessage()]) == 1


@pytest.mark.parametrize("mode", ["mirror", "store"])
def test_writes_still_queued_at_exit_are_told_and_in_store_mode_recorded_lost(
    tmp_path: Path, status: StatusFile, mode: str
) -> None:
    """The writer still busy past the exit's wait: the lists kept unwritten and the
    writes queued are given up; store mode's are lost, and the status says so."""
    kind = Mirror if mode == "mirror" else StoreFlush
    (tmp_path / "not-a-directory").write_text("")
    m = kind(f"sqlite:///{tmp_path / 'not-a-directory' / 'x.db'}", status=status, wait=10)
    assert m.turn("s1", _turn(1))  # ran, and failed: kept
    block = threading.Event()
    m._worker.submit(("flush", "s2", 10**9), lambda: block.wait(10))  # a write that hangs
    try:
        assert not m.close(timeout=0.5, final=False)  # (the plugin's early close)
        began = time.monotonic()
        assert not m.close()  # its last: a short wait, nothing twice
        assert time.monotonic() - began < EXIT_WAIT / 2
    finally:
        block.set()
    recorded = status.read()
    lost = sorted(e["session_id"] for e in recorded.get("given_up", []))
    assert lost == ([] if mode == "mirror" else ["s1", "s2"])
    assert ("catches up" in str(recorded.get("error"))) is (mode == "mirror")


def test_a_mirror_leaves_another_running_one_s_error_on_record(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    """Two Hermes processes on one home directory share the status file: one's success
    takes off its own errors, and those of processes gone, not the other's."""
    refused = {"role": "assistant", "content": "x", "tool_calls": [{"id": "c", "x": float("nan")}]}
    gateway = Mirror(db_url, status=status, wait=10)
    cli = Mirror(db_url, status=status, wait=10)
    try:
        assert gateway.turn("a", [{"role": "user", "content": "hi"}, refused])
        assert status.read()["error"]["session_id"] == "a"
        assert cli.turn("b", _turn(1))
        assert status.read()["error"]["session_id"] == "a"  # the gateway still fails on it
        assert gateway.turn("a", _turn(1))  # a conversation it can store: its own, taken off
        assert "error" not in status.read()
        for gone in ("999999999:0", f"{os.getpid()}:0"):  # the same pid: a container's
            status.write(error={"session_id": "z", "message": "an old error", "process": gone})
            later = Mirror(db_url, status=status, wait=10)  # a process started since
            assert later.turn("c", _turn(1))
            later.close()
            assert "error" not in status.read(), gone  # left by a process that is gone
    finally:
        gateway.close()
        cli.close()
    assert _stored(store, "b") == _turn(1)


def test_background_review_turns_are_left_out(mirror: Mirror, store: SessionStore) -> None:
    hooks = make_hooks(mirror)
    history = _turn(1)
    hooks["post_llm_call"](session_id="s1", conversation_history=history, model="m", platform="")
    review = [*history, {"role": "user", "content": "Review the conversation above"}]
    fork = threading.Thread(
        target=hooks["post_llm_call"],
        kwargs={"session_id": "s1", "conversation_history": review, "platform": ""},
        name="bg-review",
    )
    fork.start()
    fork.join()
    assert _stored(store, "s1") == _turn(1)
    session = store.get_session("s1")
    assert session is not None
    assert session["source"] == "cli"  # "" platform: the default
    assert session["ended_at"] is None


def test_hooks_record_failures_instead_of_raising(status: StatusFile, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")  # no directory can be made under a file
    m = Mirror(f"sqlite:///{tmp_path / 'a-file' / 'y.db'}", status=status)
    hooks = make_hooks(m)
    hooks["post_llm_call"](session_id="s1", conversation_history=_turn(1))
    hooks["post_llm_call"](session_id=None, conversation_history="not a list")
    hooks["on_session_finalize"](session_id="s1", platform="cli", reason="shutdown")
    m.close()
    assert status.read()["error"]["session_id"] == "s1"


def test_a_multimodal_tool_result_is_the_same_turn_as_the_text_hermes_stores() -> None:
    """Hermes writes its text summary to state.db: what a resumed conversation holds."""
    envelope = {
        "_multimodal": True,
        "content": [
            {"type": "text", "text": "shot taken"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
        "text_summary": "a screenshot of the desk",
    }
    live = {"role": "tool", "content": envelope, "tool_call_id": "c1"}
    resumed = {"role": "tool", "content": "a screenshot of the desk", "tool_call_id": "c1"}
    assert same_turn(live, resumed)
    assert not same_turn(live, {**resumed, "content": "shot taken"})


def _turn_of_a_new_process(
    db_url: str, status: StatusFile, session_id: str, history: list[dict[str, Any]]
) -> None:
    """One turn through a mirror of its own, as a new Hermes process has it."""
    mirror = Mirror(db_url, status=status, wait=5.0)
    try:
        assert mirror.turn(session_id, history)
    finally:
        mirror.close()


def test_a_conversation_with_an_image_resumed_from_state_db_goes_on(
    db_url: str, store: SessionStore, status: StatusFile
) -> None:
    """Hermes stores a list of content parts as their text (an image as ``[screenshot]``).

    A conversation resumed from its ``state.db`` (``hermes --resume``, the
    gateway's every turn) holds that text where the live list had the parts:
    the same turn, not a rewrite stored again whole as ``s1#2``.
    """
    parts = [
        {"type": "text", "text": "what is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    live = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": parts},
        {"role": "assistant", "content": "a lighthouse"},
    ]
    _turn_of_a_new_process(db_url, status, "s1", live)
    resumed = [
        *live[:2],
        {"role": "user", "content": "what is in this picture?\n[screenshot]"},
        live[3],
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "the sea"},
    ]
    _turn_of_a_new_process(db_url, status, "s1", resumed)  # hermes --resume
    assert store.get_session("s1#2") is None
    assert _stored(store, "s1") == [*live, *resumed[4:]]
    assert status.read().get("error") is None


def test_lone_surrogates_in_the_live_list_are_stored_replaced(
    mirror: Mirror, store: SessionStore, status: StatusFile
) -> None:
    """Hermes' live list keeps what a tool or the model gave (a lone surrogate there too).

    The mirror stores such a message with U+FFFD in its place, as Hermes' own
    file replaces or escapes it, instead of refusing the whole session; and
    Hermes replacing them in place later (its retry after an encoding error)
    changes nothing stored.
    """
    from agent.message_sanitization import _sanitize_messages_surrogates

    history = _turn(1)
    history[1]["tool_calls"][0]["function"]["arguments"] = '{"path": "\ud83d.txt"}'
    history[1]["reasoning"] = "think \udc00"
    history[2].update(content="scraped \ud83d text", tool_name="read\ud800")
    assert mirror.turn("s1", history)
    history += _turn(2)
    assert mirror.turn("s1", history)
    replaced = _turn(1) + _turn(2)
    replaced[1]["tool_calls"][0]["function"]["arguments"] = '{"path": "\ufffd.txt"}'
    replaced[1]["reasoning"] = "think \ufffd"
    replaced[2].update(content="scraped \ufffd text", tool_name="read\ufffd")
    assert _stored(store, "s1") == replaced
    assert status.read().get("error") is None

    assert _sanitize_messages_surrogates(history)
    history += _turn(3)
    assert mirror.turn("s1", history)
    assert _stored(store, "s1") == replaced + _turn(3)
    assert store.get_session("s1#2") is None


def test_a_message_with_lone_surrogates_is_copied_once(mirror: Mirror, store: SessionStore) -> None:
    """The next turn keeps the copies of messages it has seen, surrogates replaced or not."""
    history = _turn(1)
    history[1]["tool_calls"][0]["function"]["arguments"] = '{"path": "\ud83d.txt"}'
    history[2]["content"] = [{"type": "text", "text": "scraped \ud83d"}]
    history[3]["content"] = "answer \udc00"
    assert mirror.turn("s1", history)
    first = list(mirror._snapshots["s1"][0].cleaned)
    assert mirror.turn("s1", history + _turn(2))
    again = mirror._snapshots["s1"][0].cleaned
    assert all(a is b for a, b in zip(first, again[: len(first)], strict=True))
    assert len(_stored(store, "s1")) == 8
    assert store.get_session("s1#2") is None


def test_a_dict_whose_keys_the_replacement_would_make_one_is_refused(
    mirror: Mirror, store: SessionStore, status: StatusFile
) -> None:
    """Two keys told apart by lone surrogates only are not merged (a value lost): refused."""
    history = _turn(1)
    history[3]["meta"] = {chr(0xD83D): "first", chr(0xDE00): "second"}
    assert mirror.turn("s1", history)
    assert _stored(store, "s1") == []
    assert "InvalidMessageError" in status.read()["error"]["message"]


def test_an_imported_session_with_an_escaped_surrogate_goes_on_when_resumed(
    db_url: str, store: SessionStore, status: StatusFile, tmp_path: Path
) -> None:
    """Hermes keeps a tool call's lone surrogate escaped in its file, and a resumed
    conversation holds it again; the import stored U+FFFD: the same turn, no rewrite."""
    from hermes_state import SessionDB

    from hermes_orm.integrations.hermes import import_state_db

    hermes = SessionDB(db_path=tmp_path / "state.db")
    try:
        hermes.create_session("s1", source="cli")
        for message in _turn(1):
            if message.get("tool_calls"):
                message["tool_calls"][0]["function"]["arguments"] = '{"q": "\ud83d"}'
            hermes.append_message(
                "s1",
                message["role"],
                content=message["content"],
                tool_calls=message.get("tool_calls"),
                tool_call_id=message.get("tool_call_id"),
            )
        assert import_state_db(tmp_path / "state.db", store).ok
        resumed = hermes.get_messages_as_conversation("s1")
    finally:
        hermes.close()
    assert "\ud83d" in resumed[1]["tool_calls"][0]["function"]["arguments"]
    _turn_of_a_new_process(db_url, status, "s1", [*resumed, *_turn(2)])
    assert store.get_session("s1#2") is None
    session = store.get_session("s1")
    assert session is not None
    assert (session["message_count"], session["end_reason"]) == (8, None)
    assert status.read().get("error") is None


@contextmanager
def _inserts_failing() -> Iterator[None]:
    """Every engine's INSERT of messages fails meanwhile (an error the database raised)."""

    def fail(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "INSERT INTO hermes_messages" in statement:
            raise OperationalError(statement, (), Exception("injected: the disk is gone"))

    event.listen(Engine, "before_cursor_execute", fail)
    try:
        yield
    finally:
        event.remove(Engine, "before_cursor_execute", fail)


def _s1_after_turn_1(mirror: Mirror) -> tuple[Callable[[list[Any]], None], Callable[[], None]]:
    """Hermes' hooks for session s1, its first turn written: post a turn's list, end it."""
    hooks = make_hooks(mirror)
    hooks["post_llm_call"](session_id="s1", conversation_history=_turn(1))

    def post(history: list[Any]) -> None:
        hooks["post_llm_call"](session_id="s1", conversation_history=history)

    def end() -> None:
        hooks["on_session_finalize"](session_id="s1", platform="cli", reason="cli_close")

    return post, end


#: A list the store refuses (NaN is no JSON): it is never written.
_REFUSED = [*_turn(1), {"role": "user", "content": "q", "score": float("nan")}]
#: A compression's list: the summary of turns 1 and 2, then turn 3.
_COMPACTED = [{"role": "user", "content": "[summary of turns 1 and 2]"}, *_turn(3)]


def test_a_last_turn_that_failed_is_written_when_the_session_ends(
    mirror: Mirror, store: SessionStore, status: StatusFile
) -> None:
    """No turn comes after the end to catch up: the end writes the last list first."""
    post, end = _s1_after_turn_1(mirror)
    history = _turn(1) + _turn(2)
    with _inserts_failing():
        post(history)
    assert status.read()["error"]["session_id"] == "s1"
    assert len(_stored(store, "s1")) == 4
    end()
    assert _stored(store, "s1") == history
    session = store.get_session("s1")
    assert session is not None
    assert session["end_reason"] == "cli_close"
    assert status.read().get("error") is None


def test_a_failed_turn_of_a_session_compressed_into_another_is_written_before_its_end(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    """Compression moves the conversation to a new id: no turn of the parent comes after
    to catch up its failed one, and Hermes says nothing of the parent. Making the child
    writes the parent's list first, then ends the parent."""
    hermes_rows = {
        "s1": {"source": "cli", "end_reason": "compression"},
        "s2": {"source": "cli", "parent_session_id": "s1"},
    }
    m = Mirror(db_url, status=status, hermes_sessions=hermes_rows.get)
    m.turn("s1", _turn(1))
    with _inserts_failing():
        m.turn("s1", _turn(1) + _turn(2))
    assert len(_stored(store, "s1")) == len(_turn(1))
    m.turn("s2", _COMPACTED)
    assert _stored(store, "s1") == _turn(1) + _turn(2)
    parent = store.get_session("s1")
    assert parent is not None
    assert parent["end_reason"] == "compression"
    assert _stored(store, "s2") == _COMPACTED
    assert status.read().get("error") is None
    m.close()


def test_a_failed_turn_no_turn_comes_after_is_written_at_exit(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    """A session whose last write failed, neither continued nor ended before the exit."""
    m = Mirror(db_url, status=status)
    m.turn("s1", _turn(1))
    with _inserts_failing():
        m.turn("s1", _turn(1) + _turn(2))
    assert status.read()["error"]["session_id"] == "s1"
    assert m.close()
    assert _stored(store, "s1") == _turn(1) + _turn(2)
    assert status.read().get("error") is None


def test_a_session_ending_with_its_last_turn_unwritten_keeps_the_error(
    mirror: Mirror, store: SessionStore, status: StatusFile
) -> None:
    post, end = _s1_after_turn_1(mirror)
    post(_REFUSED)
    end()
    assert len(_stored(store, "s1")) == 4
    session = store.get_session("s1")
    assert session is not None
    assert session["end_reason"] == "cli_close"  # ended all the same
    error = status.read()["error"]
    assert error["session_id"] == "s1"
    assert "InvalidMessageError" in error["message"]


def test_a_failed_turn_then_a_rewrite_keeps_both_lists(
    mirror: Mirror, store: SessionStore, status: StatusFile
) -> None:
    """The list that failed holds messages the rewritten one lacks: it is written first."""
    post, _ = _s1_after_turn_1(mirror)
    history = _turn(1) + _turn(2)
    with _inserts_failing():
        post(history)
    post(_COMPACTED)
    assert _stored(store, "s1") == history
    assert _stored(store, "s1#2") == _COMPACTED
    assert status.read().get("error") is None


def test_lists_rewritten_while_writes_fail_are_written_in_order_at_the_end(
    mirror: Mirror, store: SessionStore, status: StatusFile
) -> None:
    post, end = _s1_after_turn_1(mirror)
    history = _turn(1) + _turn(2)
    with _inserts_failing():
        post(history)
        post(_COMPACTED)
        post([*_COMPACTED, *_turn(4)])
    assert status.read()["error"]["session_id"] == "s1"
    end()
    assert _stored(store, "s1") == history
    assert _stored(store, "s1#2") == [*_COMPACTED, *_turn(4)]
    assert store.get_session("s1#3") is None
    assert status.read().get("error") is None


def test_a_refused_list_does_not_hold_back_the_rewrite_after_it(
    mirror: Mirror, store: SessionStore, status: StatusFile
) -> None:
    """A list the store refuses never will be written: the next list is written all the same."""
    post, _ = _s1_after_turn_1(mirror)
    post(_REFUSED)
    assert "InvalidMessageError" in status.read()["error"]["message"]
    compacted = [{"role": "user", "content": "[summary of turn 1]"}, *_turn(2)]
    post(compacted)
    assert _stored(store, "s1") == _turn(1)
    assert _stored(store, "s1#2") == compacted
    assert status.read().get("error") is None


def _fails_unexpectedly(
    monkeypatch: pytest.MonkeyPatch, messages: list[dict[str, Any]]
) -> Callable[[], None]:
    """The mirror's write of the list ``messages`` fails (not the database's failure);
    returns what undoes it."""
    real = Mirror._flush_in

    def flush_in(self: Mirror, store: SessionStore, turn: Any) -> None:
        if turn.messages == messages:
            raise RuntimeError("injected: an unexpected failure of this list")
        real(self, store, turn)

    monkeypatch.setattr(Mirror, "_flush_in", flush_in)
    return lambda: monkeypatch.setattr(Mirror, "_flush_in", real)


def test_a_list_failing_for_another_reason_does_not_hold_back_the_rewrite_after_it(
    mirror: Mirror, store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the database's failure (it is up): the next list is written now, and the one
    that failed later, into the history it continues."""
    post, _ = _s1_after_turn_1(mirror)
    history = _turn(1) + _turn(2)
    undo = _fails_unexpectedly(monkeypatch, history)
    post(history)
    post(_COMPACTED)
    assert _stored(store, "s1") == _turn(1)
    assert _stored(store, "s1#2") == _COMPACTED  # written all the same
    undo()
    post([*_COMPACTED, *_turn(4)])  # the next turn writes the one left behind too
    assert _stored(store, "s1") == history
    assert _stored(store, "s1#2") == [*_COMPACTED, *_turn(4)]


def test_a_list_left_behind_goes_to_its_history_not_to_a_revision_left_empty(
    mirror: Mirror, store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rewrite's revision made while its first write failed holds nothing: the earlier
    list, written later, goes into the history it continues, not into that one."""
    post, _ = _s1_after_turn_1(mirror)
    history = _turn(1) + _turn(2)
    undo = _fails_unexpectedly(monkeypatch, history)
    post(history)
    with _inserts_failing():
        post(_COMPACTED)  # its revision is made, its messages are not written
    assert store.get_session("s1#2") is not None
    assert _stored(store, "s1#2") == []
    undo()
    post([*_COMPACTED, *_turn(4)])
    assert _stored(store, "s1") == history
    assert _stored(store, "s1#2") == [*_COMPACTED, *_turn(4)]
    assert store.get_session("s1#3") is None


def test_a_list_waiting_is_written_when_the_one_extending_it_is_refused(
    mirror: Mirror, store: SessionStore, status: StatusFile
) -> None:
    """The next list extends the waiting one but holds a message the store refuses: the
    waiting one is written in its stead, not given up with it."""
    post, _ = _s1_after_turn_1(mirror)
    history = _turn(1) + _turn(2)
    with _inserts_failing():
        post(history)
    post([*history, _REFUSED[-1]])
    assert _stored(store, "s1") == history
    post(_COMPACTED)
    assert _stored(store, "s1#2") == _COMPACTED


def test_the_end_ends_the_live_revision_after_a_list_written_late(
    mirror: Mirror, store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list written late goes into the history it continues; the end then ends the
    revision still open (the live one), and the rewritten one keeps its reason."""
    post, end = _s1_after_turn_1(mirror)
    history = _turn(1) + _turn(2)
    undo = _fails_unexpectedly(monkeypatch, history)
    post(history)
    post(_COMPACTED)
    undo()
    end()
    assert _stored(store, "s1") == history
    assert store.get_session("s1")["end_reason"] == "rewritten"  # type: ignore[index]
    assert store.get_session("s1#2")["end_reason"] == "cli_close"  # type: ignore[index]


# -- the plugin as Hermes loads it ------------------------------------------------------------


def _hermes_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    return {**env, "HERMES_HOME": str(home), **extra}


def _write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.yaml").write_text(text)


_DISCOVER = """
import json
from hermes_cli.plugins import PluginManager

pm = PluginManager()
pm.discover_and_load(force=True)
print(json.dumps({
    "plugins": {p["name"]: p for p in pm.list_plugins()},
    "post_llm_call": pm.has_hook("post_llm_call"),
    "on_session_finalize": pm.has_hook("on_session_finalize"),
}, default=str))
"""


def _discover(home: Path, **env: str) -> dict[str, Any]:
    import json

    done = subprocess.run(
        [sys.executable, "-c", _DISCOVER],
        env=_hermes_env(home, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_hermes_discovers_the_plugin_only_when_enabled(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _write_config(home, "model:\n  default: x\n")
    off = _discover(home)
    assert off["plugins"]["hermes_orm"]["enabled"] is False
    assert not off["post_llm_call"]

    _write_config(home, "plugins:\n  enabled: [hermes_orm]\n")
    on = _discover(home)
    assert on["plugins"]["hermes_orm"]["enabled"] is True
    assert on["post_llm_call"]
    assert on["on_session_finalize"]

    safe = _discover(home, HERMES_SAFE_MODE="1")
    assert "hermes_orm" not in safe["plugins"]


def _hermes(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    hermes = Path(sys.executable).with_name("hermes")
    return subprocess.run(
        [str(hermes), *args],
        env=_hermes_env(home, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_hermes_orm_status_says_what_is_wrong_without_the_password(tmp_path: Path) -> None:
    home = tmp_path / "home"
    url = "postgresql://hermes:S3CRET@127.0.0.1:1/nowhere?password=S3CRET"
    _write_config(home, f"plugins:\n  enabled: [hermes_orm]\nhermes_orm:\n  url: '{url}'\n")
    down = _hermes(home, "orm", "status")
    assert down.returncode == 1, down.stderr
    assert "unreachable" in down.stdout
    assert "config.yaml hermes_orm.url" in down.stdout
    assert "S3CRET" not in down.stdout + down.stderr

    _write_config(home, "plugins:\n  enabled: [hermes_orm]\nhermes_orm:\n  url: mysql://x@h/db\n")
    off = _hermes(home, "orm", "status")
    assert off.returncode == 1
    assert "plugin:    off" in off.stdout
    assert "UnsupportedBackendError" in off.stdout


def test_hermes_orm_argument_errors_do_not_show_the_password(tmp_path: Path) -> None:
    """Hermes' own parser holds ``hermes orm``: its errors name arguments, redacted too."""
    home = tmp_path / "home"
    _write_config(home, "plugins:\n  enabled: [hermes_orm]\n")
    url = "postgresql://hermes:S3CRET@db.example/hermes"
    for args in (
        [url],  # no such command
        ["sessions", "list", "--limit", url],  # a sub-command's bad value
        ["db", "upgrade", f"--bogus={url}"],  # an argument nothing knows
    ):
        refused = _hermes(home, "orm", *args)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "S3CRET" not in refused.stdout + refused.stderr, args
        assert "hermes:***@db.example" in refused.stderr, refused.stderr


@pytest.mark.heavy
def test_hermes_orm_commands_work_on_the_mirror_database(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _write_config(home, "plugins:\n  enabled: [hermes_orm]\n")
    url = f"sqlite:///{home / 'hermes_orm.db'}"
    m = Mirror(url, status=StatusFile(home / "hermes_orm_status.json"))
    m.turn("s1", _turn(1))
    m.close()

    status = _hermes(home, "orm", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "1 sessions, 4 messages" in status.stdout
    assert "last error: none" in status.stdout
    listing = _hermes(home, "orm", "sessions", "list")
    assert "s1" in listing.stdout
    found = _hermes(home, "orm", "search", "answer")
    assert "s1[3]" in found.stdout
    # Behind the head, the command named is the plugin's, which finds this database.
    hermes_orm.downgrade(url, "0015_search_literal_nul_escape")
    behind = _hermes(home, "orm", "status")
    assert behind.returncode == 1
    assert "run `hermes orm db upgrade`" in behind.stdout, behind.stdout
    assert "hermes-orm db upgrade" not in behind.stdout
    for command in (("sessions", "list"), ("search", "answer"), ("verify",), ("db", "check")):
        refused = _hermes(home, "orm", *command)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.startswith("hermes orm: "), refused.stderr
        assert "run `hermes orm db upgrade`" in refused.stderr, refused.stderr
    # A mirror database not there yet: the command that makes it is the plugin's too.
    _write_config(home, f"plugins:\n  enabled: [hermes_orm]\nhermes_orm:\n  url: {url}x\n")
    missing = _hermes(home, "orm", "sessions", "list")
    assert (missing.returncode, missing.stdout) == (2, ""), missing.stderr
    assert "`hermes orm db upgrade` creates it" in missing.stderr, missing.stderr


def test_hermes_orm_output_cut_short_or_unwritable_ends_without_a_traceback(
    tmp_path: Path,
) -> None:
    """``hermes orm sessions list | head -1``, or ``> /dev/full``: as ``hermes-orm`` ends."""
    home = tmp_path / "home"
    _write_config(home, "plugins:\n  enabled: [hermes_orm]\n")
    with SessionStore(f"sqlite:///{home / 'hermes_orm.db'}") as store:
        store.upgrade()
        for n in range(2000):
            store.create_session(f"s{n}", source="cli", title="x" * 200 + str(n))
    command = [str(Path(sys.executable).with_name("hermes")), "orm", "sessions", "list"]
    listing = subprocess.Popen(
        [*command, "--limit", "1000"],
        env=_hermes_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert listing.stdout is not None
    assert listing.stderr is not None
    listing.stdout.readline()
    listing.stdout.close()  # the reader goes away, as head does
    errors = listing.stderr.read().decode()
    assert listing.wait(timeout=120) == 1
    assert "Traceback" not in errors, errors
    if Path("/dev/full").exists():
        with Path("/dev/full").open("w") as full:
            done = subprocess.run(
                command,
                env=_hermes_env(home),
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
                check=False,
            )
        assert done.returncode == 1
        assert done.stderr == "hermes orm: cannot write the output: No space left on device\n"


def test_a_message_edited_in_place_is_a_rewrite_not_an_append(
    mirror: Mirror, store: SessionStore
) -> None:
    """Hermes' live dicts are reused from turn to turn; a changed content is still seen."""
    hooks = make_hooks(mirror)
    history = _turn(1)
    hooks["post_llm_call"](session_id="s1", conversation_history=history)
    history[2]["content"] = "file 1 [truncated]"  # an old tool output cut in place
    history += _turn(2)
    hooks["post_llm_call"](session_id="s1", conversation_history=history)

    assert _stored(store, "s1") == _turn(1)
    assert [m["content"] for m in _stored(store, "s1#2")][2] == "file 1 [truncated]"
    assert len(_stored(store, "s1#2")) == 8


def test_scaffolding_dropped_later_does_not_shift_the_history(
    mirror: Mirror, store: SessionStore
) -> None:
    hooks = make_hooks(mirror)
    nudge = {"role": "user", "content": "continue", "_verification_stop_synthetic": True}
    history = [*_turn(1)[:2], nudge, *_turn(1)[2:]]
    hooks["post_llm_call"](session_id="s1", conversation_history=history)
    history.remove(nudge)  # Hermes pops its scaffolding
    history += _turn(2)
    hooks["post_llm_call"](session_id="s1", conversation_history=history)
    assert _stored(store, "s1") == _turn(1) + _turn(2)
    assert store.get_session("s1#2") is None


def test_a_database_without_the_schema_gets_it_on_the_first_turn(
    empty_db_url: str, status: StatusFile
) -> None:
    m = Mirror(empty_db_url, status=status, wait=60)  # (the whole migration, on a busy machine)
    assert m.turn("s1", _turn(1))
    m.close()
    store = SessionStore(empty_db_url)
    assert _stored(store, "s1") == _turn(1)
    store.close()


def test_a_schema_behind_the_head_is_left_to_its_operator(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    hermes_orm.downgrade(store.engine, "0004")
    m = Mirror(db_url, status=status)
    assert m.turn("s1", _turn(1))
    m.close()
    assert hermes_orm.migrations.current(store.engine) == "0004_search_upkeep"
    error = status.read()["error"]
    # The plugin's command, which upgrades the database the plugin writes to (the
    # standalone CLI's would find its own default without --url).
    assert "`hermes orm db upgrade`" in error["message"]
    assert "hermes-orm db upgrade" not in error["message"] + error["todo"]
    with store.engine.connect() as conn:  # nothing was written
        assert conn.exec_driver_sql("SELECT count(*) FROM hermes_messages").scalar_one() == 0


def test_two_processes_rewriting_one_session_make_one_revision(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    gateway, cli = (Mirror(db_url, status=status) for _ in range(2))
    for m in (gateway, cli):
        assert m.turn("s1", _turn(1))
    compacted = [{"role": "user", "content": "[summary]"}, *_turn(2)]
    for m in (gateway, cli):
        assert m.turn("s1", [dict(x) for x in compacted])
    for m in (gateway, cli):
        m.close()
    assert _stored(store, "s1#2") == compacted
    assert store.get_session("s1#3") is None


def test_a_rewrite_queued_behind_a_slow_write_loses_no_turn(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    m = Mirror(db_url, status=status, wait=0.05)
    m.turn("s1", _turn(1))
    assert m._worker.drain(30)
    history = _turn(1) + _turn(2)
    with _Locked(db_url):
        m.turn("other", _turn(9))  # the writer waits for the lock with this one ...
        m.turn("s1", history)  # ... while these two queue behind it
        m.turn("s1", [{"role": "user", "content": "[summary]"}, *_turn(3)])
    assert m.close(60)
    assert _stored(store, "s1") == history
    assert _stored(store, "s1#2")[1:] == _turn(3)


def test_store_modes_copy_of_a_session_stays_one_in_every_process(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    """A session Hermes writes elsewhere (its TUI): copied, marked so in the database."""
    from hermes_orm.integrations.hermes.mirror import PERSISTED_MARK

    def turn_in_a_new_process(messages: list[dict[str, Any]]) -> None:
        flush = StoreFlush(db_url, status=status, wait=30)
        assert flush.turn("tui", messages)
        flush.close()

    turn_in_a_new_process(_turn(1))
    resumed = [dict(m) for m in _turn(1)] + _turn(2)
    turn_in_a_new_process(resumed)
    assert not [m for m in resumed if PERSISTED_MARK in m]  # Hermes' marks are its own there
    compressed = [{"role": "user", "content": "[summary]"}, *_turn(3)]
    turn_in_a_new_process(compressed)
    assert [m["content"] for m in _stored(store, "tui")] == [m["content"] for m in resumed]
    assert store.get_session("tui")["end_reason"] == "rewritten"  # type: ignore[index]
    assert [m["content"] for m in _stored(store, "tui#2")] == [m["content"] for m in compressed]


def test_store_modes_repair_not_begun_within_wait_is_kept_for_the_next_turn(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    """Queued behind another session's repair past ``wait``: taken back, written next turn.

    Taken back, it cannot be written after the hook returned (Hermes writes
    again then); kept, it is written by the session's next ``pre_llm_call``.
    """
    from hermes_orm.integrations.hermes.mirror import PERSISTED_MARK, StoreFlush
    from tests._agent_runner import _Lock

    for sid in ("a", "b"):  # as Hermes left them: its user message stored, its answer not
        store.create_session(sid, source="cli")
        store.flush(sid, [{"role": "user", "content": f"question {sid}"}])
    lists = {
        sid: [
            {"role": "user", "content": f"question {sid}", PERSISTED_MARK: True},
            {"role": "assistant", "content": f"answer {sid}"},
        ]
        for sid in ("a", "b")
    }
    flush = StoreFlush(db_url, status=status, wait=0.3)
    lock = _Lock(db_url)
    lock.take()
    first = threading.Thread(target=flush.turn, args=("a", lists["a"]))
    first.start()
    time.sleep(0.2)  # a's repair runs (waiting for the lock)
    assert not flush.turn("b", lists["b"])  # not begun within wait: taken back
    assert PERSISTED_MARK not in lists["b"][1]  # so Hermes' own writes still try it
    started = time.monotonic()
    assert flush.before_turn("c")  # nothing kept for it: the busy writer is not waited for
    assert time.monotonic() - started < flush.wait / 2  # (else it waits wait, then gives up)
    lock.release()
    first.join()
    assert flush.before_turn("b")
    flush.close()
    for sid in ("a", "b"):
        stored = [m["content"] for m in store.get_messages(sid)]
        assert stored == [f"question {sid}", f"answer {sid}"]
        assert lists[sid][1][PERSISTED_MARK] is True


def test_store_modes_turn_start_asks_the_writer_while_its_last_flush_still_runs(
    db_url: str, status: StatusFile, store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush outliving its hook (past ``wait`` and the bound after it) is not passed by.

    The session's next turn start then asks the writer, which is still on that
    flush: it waits ``wait`` for it and says it did not run.
    """
    from hermes_orm.integrations.hermes import mirror as mirror_module
    from hermes_orm.integrations.hermes.mirror import StoreFlush
    from tests._agent_runner import _Lock

    monkeypatch.setattr(mirror_module, "_REPAIR_MAX", 0.1)
    store.create_session("a", source="cli")
    store.flush("a", [{"role": "user", "content": "question"}])
    history = [
        {"role": "user", "content": "question", "_db_persisted": True},
        {"role": "assistant", "content": "answer"},
    ]
    flush = StoreFlush(db_url, status=status, wait=0.3)
    lock = _Lock(db_url)
    lock.take()
    assert not flush.turn("a", history)  # its hook gave up; the flush waits for the lock
    started = time.monotonic()
    assert not flush.before_turn("a")
    assert time.monotonic() - started >= flush.wait
    lock.release()
    flush.close()
    assert [m["content"] for m in store.get_messages("a")] == ["question", "answer"]


def _hermes_missed_its_answer(
    db_url: str, question: str, answer: str
) -> tuple[SessionStore, Any, list[dict[str, Any]]]:
    """Store mode's session ``a`` as Hermes left it: its question stored, its answer's
    append failed. Returns the store under Hermes' SessionDB (one try per write), the
    SessionDB, and Hermes' live list of the turn."""
    from hermes_orm import RetryPolicy
    from hermes_orm.integrations.hermes import SessionDB
    from hermes_orm.integrations.hermes.mirror import PERSISTED_MARK

    hermes = SessionStore(db_url, retry=RetryPolicy(attempts=1), lock_timeout=0.2)
    db = SessionDB(hermes)
    db.create_session("a", "cli")
    db.append_message("a", "user", question)
    history = [
        {"role": "user", "content": question, PERSISTED_MARK: True},
        {"role": "assistant", "content": answer},
    ]
    return hermes, db, history


@pytest.mark.heavy
def test_store_modes_rewrite_takes_the_repairs_first_and_a_failed_one_drops_none(
    db_url: str, status: StatusFile, store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compression while a repair waits: the repair is written first, then archived with the rest.

    A rewrite the database refused (locked) drops no repair: it is still
    written, first, by the rewrite that goes through.
    """
    from hermes_orm import DatabaseBusyError
    from hermes_orm.integrations.hermes import mirror as mirror_module
    from hermes_orm.integrations.hermes.mirror import PERSISTED_MARK, StoreFlush
    from tests._agent_runner import _Lock

    monkeypatch.setattr(mirror_module, "CATCH_UP_PATIENCE", 0.5)
    _, db, history = _hermes_missed_its_answer(db_url, "question", "answer")
    flush = StoreFlush(db_url, status=status, wait=30)
    db._repairs = flush
    lock = _Lock(db_url)
    lock.take()
    flush.turn("a", history)  # the end-of-turn repair finds the database locked
    assert PERSISTED_MARK not in history[1]
    with pytest.raises(DatabaseBusyError):
        db.archive_and_compact("a", [{"role": "user", "content": "[summary]"}])
    lock.release()
    assert store.get_messages("a")[-1]["content"] == "question"  # nothing written meanwhile
    db.archive_and_compact("a", [{"role": "user", "content": "[summary]"}])
    stored = [(m["content"], m["active"]) for m in store.get_messages("a")]
    assert stored == [("question", False), ("answer", False), ("[summary]", True)]
    assert history[1][PERSISTED_MARK] is True
    flush.close()


@pytest.mark.parametrize("lock", ["released before the end", "held past the end"])
@pytest.mark.heavy
def test_store_modes_failed_repair_is_tried_at_the_sessions_end_then_given_up(
    db_url: str,
    status: StatusFile,
    store: SessionStore,
    lock: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``/new`` after a turn whose repair found the database locked: the repair is tried
    then, in its place, before the hook returns (Hermes then writes what it has not
    marked), or given up. It was kept to the exit, when another process may have
    resumed the session and written turns: it went after them, out of order."""
    from hermes_orm.integrations.hermes import SessionDB
    from hermes_orm.integrations.hermes.mirror import PERSISTED_MARK, StoreFlush
    from tests._agent_runner import _Lock

    hermes, _, history = _hermes_missed_its_answer(db_url, "question 1", "answer 1")
    flush = StoreFlush(db_url, status=status, wait=30)
    locked = _Lock(db_url)
    locked.take()
    flush.turn("a", history)  # the end-of-turn repair finds the database locked
    if lock == "released before the end":
        locked.release()
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        ended = flush.finalize("a", "new_session")
        # Stored and marked before the hook returns: Hermes then writes what is unmarked.
        assert ended
        assert history[1].get(PERSISTED_MARK) is (
            True if lock == "released before the end" else None
        )
    if lock == "held past the end":
        locked.release()
    other = SessionDB(store)  # another process resumes the session
    other.append_message("a", "user", "question 2")
    other.append_message("a", "assistant", "answer 2")
    flush.close()
    hermes.close()
    contents = [m["content"] for m in store.get_messages("a")]
    if lock == "released before the end":
        assert contents == ["question 1", "answer 1", "question 2", "answer 2"]
    else:
        assert contents == ["question 1", "question 2", "answer 2"]
        assert "still not stored; they are given up" in caplog.text
        # Lost: the status no longer says a next turn catches up, and keeps the loss.
        recorded = status.read()
        assert "catches up" not in str(recorded.get("error"))
        (entry,) = recorded["given_up"]
        assert entry["session_id"] == "a"
        assert "given up at the session's end" in entry["what"]


def test_the_writer_says_which_sessions_it_holds_writes_of() -> None:
    """Queued or running, by kind; a write that ran is let go."""
    from hermes_orm.integrations.hermes.mirror import _Worker

    worker = _Worker()
    running, release = threading.Event(), threading.Event()

    def blocked() -> None:
        running.set()
        release.wait(10)

    first = worker.submit(("flush", "a", 1), blocked)
    assert running.wait(10)
    worker.submit(("pend", "b", 2), lambda: None)
    assert worker.holds("a", ("flush",))  # running
    assert worker.holds("b", ("flush", "pend"))  # queued
    assert not worker.holds("b", ("flush",))
    assert not worker.holds("c", ("flush", "pend"))
    release.set()
    assert first.wait(10)
    assert worker.drain(10)
    assert not worker.holds("a", ("flush",))
    assert not worker.holds("b", ("pend",))


def test_a_tool_call_edited_in_place_is_seen(mirror: Mirror, store: SessionStore) -> None:
    history = _turn(1)
    history[1]["tool_calls"][0]["function"]["arguments"] = ""
    assert mirror.turn("s1", history)
    history[1]["tool_calls"][0]["function"]["arguments"] = "{}"  # as Hermes repairs it
    assert mirror.turn("s1", history + _turn(2))
    assert _stored(store, "s1")[1]["tool_calls"][0]["function"]["arguments"] == ""
    assert _stored(store, "s1#2")[1]["tool_calls"][0]["function"]["arguments"] == "{}"


def test_an_error_left_by_an_earlier_process_is_cleared_by_a_write(
    db_url: str, status: StatusFile
) -> None:
    status.write(error={"at": 1.0, "session_id": "old", "message": "M", "todo": "T"})
    m = Mirror(db_url, status=status)
    assert m.turn("s1", _turn(1))
    m.close()
    assert "error" not in status.read()


def test_a_failing_session_keeps_its_error_while_others_are_written(
    db_url: str, status: StatusFile, store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    m = Mirror(db_url, status=status)
    bad = [{"role": "user", "content": "x", "score": float("nan")}]
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        for _ in range(2):
            assert m.turn("bad", bad)
            assert m.turn("good", _turn(1))
    m.close()
    error = status.read()["error"]
    assert error["session_id"] == "bad"
    assert "not mirrored while that message is in its conversation" in error["todo"]
    assert caplog.text.count("session 'bad' not written") == 1  # once, not once a turn
    assert "again" not in caplog.text
    assert _stored(store, "good") == _turn(1)


def test_a_session_id_is_logged_as_one_escaped_line(
    db_url: str, status: StatusFile, caplog: pytest.LogCaptureFixture
) -> None:
    """A session id is the caller's text: a newline or a terminal escape in it forges nothing."""
    forged = "bad\nhermes_orm mirror: session ok is written again\x1b[2J"
    m = Mirror(db_url, status=status)
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        assert m.turn(forged, [{"role": "user", "content": "x", "score": float("nan")}])
    m.close()
    told = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
    assert told, caplog.text
    assert all("\n" not in line and "\x1b" not in line for line in told)
    assert repr(forged) in told[0]


def test_a_session_written_again_hands_the_status_to_one_still_failing(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    m = Mirror(db_url, status=status)
    bad = [{"role": "user", "content": "x", "score": float("nan")}]
    assert m.turn("first", bad)
    assert m.turn("second", bad)
    assert status.read()["error"]["session_id"] == "second"
    assert m.turn("second", _turn(1))  # its conversation without the refused message
    assert _stored(store, "second") == _turn(1)
    assert status.read()["error"]["session_id"] == "first"  # still failing, on record
    assert m.turn("first", _turn(1))
    m.close()
    assert "error" not in status.read()


def test_status_shows_the_mirror_error_only_for_its_database(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hermes_orm.integrations.hermes.plugin import print_status, status_file

    monkeypatch.setenv("HERMES_HOME", str(tmp_path))
    mirrored = "postgresql://hermes@127.0.0.1:1/nowhere?password=S3CRET"
    m = Mirror(mirrored, status=status_file(), wait=10)
    m.turn("s1", _turn(1))
    m.close()

    assert print_status(mirrored) == 1
    out = capsys.readouterr().out
    assert "last error:" in out
    assert "session s1" in out
    assert "S3CRET" not in out
    assert print_status(db_url) == 0  # another database: not its error
    assert "last error: none" in capsys.readouterr().out


def _record_in_turns(path: str, key: str, times: int, go: Any) -> None:
    status = StatusFile(Path(path))
    go.wait(60)  # (both processes started: their writes overlap)
    for n in range(times):
        status.write(**{key: n})


@pytest.mark.heavy
def test_writers_of_one_status_file_keep_each_others_records(tmp_path: Path) -> None:
    """Two Hermes processes on one home record their errors in one file: neither's write
    puts back what the other had just changed."""
    import multiprocessing

    path = tmp_path / "hermes_orm_status.json"
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    writers = [
        context.Process(target=_record_in_turns, args=(str(path), key, 1000, go)) for key in "ab"
    ]
    for writer in writers:
        writer.start()
    time.sleep(1.5)  # (spawned interpreters importing hermes_orm)
    go.set()
    seen = {"a": -1, "b": -1}
    went_back = []
    deadline = time.monotonic() + 120
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        for key, value in StatusFile(path).read().items():
            if value < seen[key]:  # a write put back what the other process had changed
                went_back.append((key, seen[key], value))
            seen[key] = max(seen[key], value)
    for writer in writers:
        writer.join(timeout=10)
        assert writer.exitcode == 0
    assert went_back == []
    assert StatusFile(path).read() == {"a": 999, "b": 999}


@pytest.mark.parametrize("mode", ["mirror", "store"])
def test_a_session_s_lists_given_up_past_the_bound_are_said_to_be(
    tmp_path: Path, status: StatusFile, monkeypatch: pytest.MonkeyPatch, caplog: Any, mode: str
) -> None:
    """Lists kept for a later write are bounded in sessions: the oldest session's are
    given up, and that is said, with where they are still kept (store mode: nowhere,
    which the status keeps)."""
    from hermes_orm.integrations.hermes import mirror
    from hermes_orm.integrations.hermes.mirror import StoreFlush

    monkeypatch.setattr(mirror, "_TRACKED_MAX", 2)
    (tmp_path / "not-a-directory").write_text("")
    kind = Mirror if mode == "mirror" else StoreFlush
    m = kind(f"sqlite:///{tmp_path / 'not-a-directory' / 'x.db'}", status=status, wait=10)
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        for sid in ("s1", "s2", "s3"):
            assert m.turn(sid, _turn(1))  # ran, and failed: kept
    given_up = [r.getMessage() for r in caplog.records if "is given up" in r.getMessage()]
    left = (
        "a resumed session's next turn catches up; Hermes' state.db holds them (`hermes orm "
        "import` copies what is missing)"
        if mode == "mirror"
        else "what Hermes' own writes missed is lost: kept nowhere else, and no later turn "
        "writes it (`hermes orm status` lists it)"
    )
    assert given_up == [
        "hermes_orm mirror: 2 sessions have lists not written; the oldest, session 's1', is "
        f"given up (1 list(s)): {left}"
    ]
    assert list(m._unwritten) == ["s2", "s3"]
    recorded = [e["session_id"] for e in status.read().get("given_up", [])]
    assert recorded == ([] if mode == "mirror" else ["s1"])
    m.close(timeout=1)


def test_an_end_refused_for_a_session_this_process_never_wrote_is_said_to_be_given_up(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    """Another process wrote the session; this one knows no state to end it onto later."""
    first = Mirror(db_url, status=status, wait=10)
    assert first.turn("s1", _turn(1))
    first.close()
    m = Mirror(db_url, status=status, wait=0.05)
    with _Locked(db_url):
        m.finalize("s1", "new_session")
        assert m._worker.drain(60)
    m.close()
    assert status.read()["error"]["todo"] == (
        "its end is not written: the mirrored copy stays open until a turn resumes it"
    )
    assert (store.get_session("s1") or {})["ended_at"] is None


def test_a_session_whose_id_leaves_no_room_for_a_revision_mark_is_ended(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    """Its next revision's id would be longer than any a store holds: there is none to look
    up (the lookup was refused, and the end with it, every time)."""
    sid = "a" * 254
    m = Mirror(db_url, status=status, wait=10)
    assert m.turn(sid, _turn(1))
    assert m.finalize(sid, "new_session")
    m.close()
    assert (store.get_session(sid) or {})["end_reason"] == "new_session"
    assert status.read().get("error") is None


@pytest.mark.heavy
def test_a_refused_end_is_given_up_by_the_last_close_with_the_writer_busy(
    db_url: str, status: StatusFile
) -> None:
    """The early close told of it; the last, its wait run out, gives it up all the same."""
    m = Mirror(db_url, status=status, wait=5)
    assert m.turn("s1", _turn(1))
    with _Locked(db_url):
        m.finalize("s1", "user_exit")
        assert m._worker.drain(30)
        assert "written once the database takes" in status.read()["error"]["todo"]
        m.close(timeout=60, final=False)  # (the database still refuses it)
    block = threading.Event()
    m._worker.submit(("flush", "s2", 10**9), lambda: block.wait(10))  # a write that hangs
    try:
        assert not m.close(timeout=0.5)
    finally:
        block.set()
    assert "not written: the mirrored copy stays open" in status.read()["error"]["todo"]


@pytest.mark.heavy
def test_a_refused_end_given_up_leaves_another_process_s_error_of_the_session(
    db_url: str, status: StatusFile, store: SessionStore
) -> None:
    """Another process's turn of the session failed too, its list still unwritten: this
    process giving up its end (another writer moved the session on) must not take that
    error off the status."""
    p1 = Mirror(db_url, status=status, wait=5)
    p2 = Mirror(db_url, status=status, wait=5)
    assert p1.turn("s1", _turn(1))
    with _Locked(db_url):
        p1.finalize("s1", "new_session")
        assert p1._worker.drain(30)
        p2.turn("s1", _turn(1) + _turn(2))
        assert p2._worker.drain(30)
    assert status.read()["error"]["process"] == p2._writer()
    store.flush("s1", _turn(1) + _turn(3))  # a third writer moves s1 on
    assert p1.turn("s2", _turn(1))
    assert p1._worker.drain(30)
    error = status.read()["error"]
    assert (error["process"], error["session_id"]) == (p2._writer(), "s1")
    assert "catches up" in error["todo"]
    assert list(p2._unwritten) == ["s1"]
    p1.close()
    p2.close(timeout=1)
