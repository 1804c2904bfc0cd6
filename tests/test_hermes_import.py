"""Importing a real Hermes Agent state.db: lossless, read-only, idempotent, resumable."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, event, func, select, text, update

from devtools.hermes_fixture import fixture_copy, grow
from hermes_orm import Message, ModelUsage, Session, SessionStore, create_store_engine
from hermes_orm.integrations.hermes import StateDbError, import_state_db, importer
from hermes_orm.integrations.hermes.importer import ImportReport
from tests._hermes import digest_file, expected_message, source_rows
from tests.conftest import fresh_store, meanwhile

# the importer writes through a blocking SessionStore: its tests run on that API only.
pytestmark = pytest.mark.apis("sync")

ROOT = Path(__file__).resolve().parents[1]
_BOOL_SESSION = {"expiry_finalized", "archived"}


@pytest.fixture(params=["thread", "process"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the import reads the source: a thread (small imports) or a child process (large)."""
    threshold = 0 if request.param == "process" else 10**12
    monkeypatch.setattr(importer, "PROCESS_READER_FROM", threshold)
    return str(request.param)


class _Children:
    """The reader processes an import started (``subprocess.Popen`` spied on, not replaced)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        real = subprocess.Popen

        def spy(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
            proc = real(*args, **kwargs)
            self.started.append(proc)
            return proc

        monkeypatch.setattr(importer.subprocess, "Popen", spy)

    def all_ended(self) -> bool:
        return all(proc.poll() is not None for proc in self.started)


@pytest.fixture
def reader_processes(monkeypatch: pytest.MonkeyPatch) -> _Children:
    return _Children(monkeypatch)


def _tool_calls(rows: list[dict[str, Any]]) -> int:
    return sum(len(json.loads(m["tool_calls"])) for m in rows if m["tool_calls"])


def _edit_source(source: Path, *statements: str) -> None:
    """Change a state.db behind Hermes' back (as another tool, or an older Hermes, would)."""
    conn = sqlite3.connect(source)  # foreign keys are off on a plain connection
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


def _real_hermes(tmp_path: Path) -> tuple[Path, Any]:
    """A new state.db and the real Hermes Agent's SessionDB writing it."""
    from hermes_state import SessionDB as HermesSessionDB

    source = tmp_path / "state.db"
    return source, HermesSessionDB(source)


def assert_same_as_source(store: SessionStore, source: Path) -> None:
    """Every session and message of the source, field by field, in the destination."""
    sessions, messages = source_rows(source)
    for row in sessions:
        got = store.get_session(row["id"])
        assert got is not None, row["id"]
        # Hermes' message_count leaves out the rows a compaction archived; ours counts
        # every row. tool_call_count is of the live rows (Hermes' still counts a
        # rewound turn's, until a compaction recounts).
        archived = [m for m in messages.get(row["id"], []) if m["compacted"]]
        live = [m for m in messages.get(row["id"], []) if m["active"] in (None, 1)]
        for key, value in row.items():
            if key == "model_config" and value is not None:
                assert got[key] == json.loads(value), key
            elif key in _BOOL_SESSION:
                assert got[key] == bool(value), key
            elif key == "message_count":
                assert got[key] == value + len(archived), row["id"]
            elif key == "tool_call_count":
                assert got[key] == _tool_calls(live), row["id"]
            else:
                assert got[key] == value, (row["id"], key)
        stored = store.get_messages(row["id"])
        assert stored == [expected_message(m) for m in messages.get(row["id"], [])], row["id"]
        assert got["flushed_idx"] == len(stored) == got["message_count"]


def test_fixture_imports_losslessly_and_twice_writes_nothing(
    store: SessionStore, tmp_path: Path, reader: str, reader_processes: _Children
) -> None:
    (tmp_path / "hermes").mkdir()
    source = fixture_copy(tmp_path / "hermes")
    before = digest_file(source)
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert (report.sessions_written, report.messages_written, report.usage_written) == (40, 877, 40)
    assert_same_as_source(store, source)
    # parent/child lineage came through
    children = [s for s in store.list_sessions(limit=100).sessions if s["parent_session_id"]]
    assert len(children) == 6
    with store.engine.connect() as conn:
        assert len(conn.execute(select(ModelUsage)).all()) == 40
        # each session a history of its own (what a flush's compare-and-swap checks)
        histories = conn.execute(select(Session.history_id)).scalars().all()
    assert len(set(histories)) == 40
    assert 0 not in histories

    again = import_state_db(source, store)
    assert (again.sessions_written, again.messages_written, again.usage_written) == (0, 0, 0)
    assert again.ok
    # the source was only read: same bytes, and no -wal/-shm appeared beside it
    assert digest_file(source) == before
    assert sorted(p.name for p in (tmp_path / "hermes").iterdir()) == ["state.db"]
    assert len(reader_processes.started) == (2 if reader == "process" else 0)
    assert reader_processes.all_ended()


def test_columns_of_a_newer_hermes_schema_come_through_in_extra(
    store: SessionStore, tmp_path: Path
) -> None:
    source = fixture_copy(tmp_path)
    conn = sqlite3.connect(source)
    conn.execute('ALTER TABLE sessions ADD COLUMN "mood ""quoted""" TEXT')
    conn.execute("ALTER TABLE messages ADD COLUMN sentiment REAL")
    sid = conn.execute("SELECT id FROM sessions ORDER BY id LIMIT 1").fetchone()[0]
    conn.execute('UPDATE sessions SET "mood ""quoted""" = ? WHERE id = ?', ("calm", sid))
    conn.execute("UPDATE messages SET sentiment = 0.5 WHERE session_id = ?", (sid,))
    conn.commit()
    conn.close()
    report = import_state_db(source, store)
    assert report.ok, report.table()
    got = store.get_session(sid)
    assert got is not None
    assert got["extra"] == {'mood "quoted"': "calm"}
    stored = store.get_messages(sid)
    assert {m["sentiment"] for m in stored} == {0.5}
    assert stored == [expected_message(m) for m in source_rows(source)[1][sid]]


def test_incremental_import_copies_only_what_hermes_appended(
    store: SessionStore, tmp_path: Path
) -> None:
    from hermes_state import SessionDB  # the real Hermes Agent

    source = fixture_copy(tmp_path)
    import_state_db(source, store)
    hermes = SessionDB(source)
    sid = source_rows(source)[0][0]["id"]
    hermes.append_message(sid, "user", content="one more, with 日本語")
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]
    hermes.append_message(sid, "assistant", content=parts)  # stored as "\x00json:[...]"
    hermes.create_session("brand-new", source="cli", model="m")
    hermes.append_message("brand-new", "user", content="hello")
    report = import_state_db(source, store)  # Hermes still has it open: the WAL path
    hermes.close()
    assert report.ok, report.table()
    assert report.messages_written == 3
    assert_same_as_source(store, source)
    assert store.get_messages(sid)[-1]["content"] == parts


@pytest.mark.heavy
def test_a_batch_of_a_thousand_short_sessions_and_more_is_imported(
    store: SessionStore, tmp_path: Path
) -> None:
    """A gateway's short sessions: one batch holds more sessions than one UPDATE may move
    (SQLite parses no chain of a thousand ORs), and so does a rerun after Hermes added a
    message to each."""
    source, hermes = _real_hermes(tmp_path)
    sessions = 1_100
    for n in range(sessions):
        hermes.create_session(f"g{n}", source="telegram")
        hermes.append_message(f"g{n}", "user", content=f"hi {n}")
        hermes.append_message(f"g{n}", "assistant", content=f"hello {n}")
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert (report.sessions_written, report.messages_written) == (sessions, 2 * sessions)
    for n in range(sessions):
        hermes.append_message(f"g{n}", "user", content="again")
    hermes.close()
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.messages_written == sessions
    assert_same_as_source(store, source)


@pytest.mark.backends("postgresql")
def test_a_prepared_write_of_more_sessions_than_a_statement_may_name(store: SessionStore) -> None:
    """7,000 new sessions' cursors at 10 parameters each: one UPDATE would hold more
    than the 65,535 PostgreSQL's protocol carries."""
    from sqlalchemy import insert

    from hermes_orm._codec import encode_message
    from hermes_orm.store import Chunk, flush_sql, prepare_many, write_prepared

    ids = [f"p{n}" for n in range(7_000)]
    with store.engine.begin() as conn:
        conn.execute(insert(Session), [{"id": sid, "source": "cli"} for sid in ids])
    message = {"role": "user", "content": "hi"}
    chunks = [Chunk(sid, 0, [encode_message(message, 0)], None) for sid in ids]
    with store.engine.begin() as conn:
        write_prepared(conn, prepare_many(flush_sql("postgresql"), chunks))
    for sid in (ids[0], ids[-1]):
        assert store.get_messages(sid) == [message]
        session = store.get_session(sid)
        assert session is not None
        assert session["flushed_idx"] == session["message_count"] == 1


def test_a_rewritten_source_session_is_reported_not_overwritten(
    store: SessionStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    source = fixture_copy(tmp_path)
    with caplog.at_level(logging.INFO, logger="hermes_orm"):
        import_state_db(source, store)
    said = [r for r in caplog.records if r.name.startswith("hermes_orm.integrations.hermes")]
    assert "importing" in said[0].getMessage()
    assert said[-1].levelno == logging.INFO
    assert "verified" in said[-1].getMessage()
    caplog.clear()
    sid = source_rows(source)[0][0]["id"]
    conn = sqlite3.connect(source)
    last = conn.execute("SELECT max(id) FROM messages WHERE session_id = ?", (sid,)).fetchone()[0]
    conn.execute("UPDATE messages SET content = 'edited' WHERE id = ?", (last,))
    conn.execute(
        "INSERT INTO messages (session_id, role, content, timestamp) VALUES (?, 'user', 'x', 1)",
        (sid,),
    )
    conn.commit()
    conn.close()
    with caplog.at_level(logging.INFO, logger="hermes_orm"):
        report = import_state_db(source, store)
    assert report.diverged_sessions == [sid]
    assert not report.ok
    assert "diverged" in report.table()
    (last_word,) = [r for r in caplog.records if "NOT verified" in r.getMessage()]
    assert last_word.levelno == logging.WARNING
    assert "1 diverged" in last_word.getMessage()


def test_a_session_whose_last_copied_message_hermes_added_a_column_to_is_up_to_date(
    store: SessionStore, tmp_path: Path
) -> None:
    """Hermes backfills ``api_content`` on the copied message that is the session's
    last (a turn under way): nothing to copy, the copies kept; not diverged, run
    after run (the last messages' digests differ, as they should)."""
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", source="cli")
    for role, content in (("user", "hello"), ("assistant", "hi"), ("user", "question")):
        hermes.append_message("s", role, content=content)
    assert import_state_db(source, store).ok
    assert hermes.set_latest_user_api_content("s", "question", "question, with context") == 1
    hermes.close()
    stored = store.get_messages("s")
    for _ in range(2):
        report = import_state_db(source, store)
        assert report.ok, report.table()
        assert report.diverged_sessions == report.amended_sessions == []
        assert report.messages_written == 0
        assert store.get_messages("s") == stored
    # a later edit of that message is still a divergence
    _edit_source(source, "UPDATE messages SET content = 'edited' WHERE content = 'question'")
    assert import_state_db(source, store).diverged_sessions == ["s"]


def test_a_session_deleted_in_the_destination_since_an_import_is_not_copied_again(
    store: SessionStore, tmp_path: Path
) -> None:
    """Store mode, the command line or the API deleted an imported session: a later
    import of the state.db still holding it leaves it deleted (even one Hermes wrote
    to since), and says so; restore_deleted copies it again."""
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("a", source="cli")
    hermes.create_session("b", source="cli")
    hermes.create_session("c", source="cli", parent_session_id="a")
    for sid in ("a", "b", "c"):
        hermes.append_message(sid, "user", content=f"hello {sid}")
    assert import_state_db(source, store).ok
    assert store.delete_session("a")
    hermes.append_message("a", "assistant", content="Hermes wrote on")
    hermes.close()
    for _ in range(2):
        report = import_state_db(source, store)
        assert report.ok, report.table()
        assert report.deleted_sessions == ["a"]
        assert report.messages_written == 0
        assert "1 session(s) deleted in the destination" in report.table()
        assert store.get_session("a") is None
    # The child's link to the parent gone: kept in its extra, as any dangling link.
    child = store.get_session("c") or {}
    assert child["parent_session_id"] is None
    assert child["extra"] == {"parent_session_id": "a"}
    report = import_state_db(source, store, restore_deleted=True)
    assert report.ok, report.table()
    assert report.deleted_sessions == []
    assert [m["content"] for m in store.get_messages("a")] == ["hello a", "Hermes wrote on"]
    assert (store.get_session("c") or {})["parent_session_id"] == "a"
    assert import_state_db(source, store).deleted_sessions == []


def test_a_session_deleted_while_an_import_copies_its_new_messages_is_reported(
    store: SessionStore, tmp_path: Path
) -> None:
    """Store mode deletes a session the import is about to continue: reported diverged
    (not a crash), then deleted since on the next run."""
    source, hermes = _real_hermes(tmp_path)
    for sid in ("a", "b"):
        hermes.create_session(sid, source="cli")
        hermes.append_message(sid, "user", content=f"hi {sid}")
    assert import_state_db(source, store).ok
    for sid in ("a", "b"):
        hermes.append_message(sid, "assistant", content=f"more {sid}")
    hermes.close()

    def delete_b(sid: str, _cursor: int) -> None:
        if sid == "a" and store.get_session("b") is not None:
            assert store.delete_session("b")

    report = import_state_db(source, store, on_batch=delete_b, batch=1)
    assert report.diverged_sessions == ["b"]
    assert store.get_session("b") is None
    again = import_state_db(source, store)
    assert again.ok, again.table()
    assert again.deleted_sessions == ["b"]


def test_sessions_hermes_makes_or_deletes_while_an_import_runs_are_reported(
    store: SessionStore, tmp_path: Path
) -> None:
    """The import lists the source's sessions once, as it begins. One Hermes deleted
    before the copy reached it stayed in the destination, empty, and the report was ok;
    one Hermes made meanwhile was named nowhere (exit 0, every count "yes")."""
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("a", source="cli")
    hermes.append_message("a", "user", content="hi a")
    hermes.create_session("empty", source="cli")
    hermes.close()
    changed: list[bool] = []

    def hermes_goes_on(_sid: str, _cursor: int) -> None:
        if changed:
            return
        changed.append(True)
        live = _real_hermes(tmp_path)[1]
        live.delete_session("empty")
        for sid in ("new", "also new"):
            live.create_session(sid, source="cli")
            live.append_message(sid, "user", content="made meanwhile")
        live.close()

    report = import_state_db(source, store, on_batch=hermes_goes_on)
    assert changed
    assert report.diverged_sessions == ["empty"]
    assert report.appeared_sessions == ["new", "also new"]  # in the source's order
    assert "2 session(s) appeared in the source during the import" in report.table()
    assert not report.ok  # (the deleted one: appeared ones alone are fine, as grown ones)
    again = import_state_db(source, store)
    assert [m["content"] for m in store.get_messages("also new")] == ["made meanwhile"]
    assert again.appeared_sessions == []


def test_a_report_says_how_many_sessions_it_does_not_name(
    store: SessionStore, tmp_path: Path
) -> None:
    source, hermes = _real_hermes(tmp_path)
    for n in range(12):
        hermes.create_session(f"s{n:02}", source="cli")
        hermes.append_message(f"s{n:02}", "user", content="one")
    hermes.close()
    assert import_state_db(source, store).ok
    _edit_source(source, "UPDATE messages SET content = 'rewritten'")
    table = import_state_db(source, store).table()
    assert table.count("(diverged)") == 10
    assert "... and 2 more session(s) diverged" in table


def test_a_new_invalid_parent_of_a_new_invalid_child_leaves_no_row_either(
    store: SessionStore, tmp_path: Path
) -> None:
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("p", source="cli")
    hermes.create_session("c", source="cli", parent_session_id="p")
    for sid in ("p", "c"):
        hermes.append_message(sid, "user", content="hello")
    hermes.close()
    _edit_source(source, "UPDATE messages SET content = CAST(x'c3' AS TEXT)")
    report = import_state_db(source, store)
    assert set(report.invalid_sessions) == {"p", "c"}
    assert report.sessions_written == 0
    assert store.get_session("p") is None
    assert store.get_session("c") is None


def test_a_session_deleted_while_an_import_runs_is_not_made_again(
    store: SessionStore, tmp_path: Path
) -> None:
    """Store mode deletes a session the run has nothing to copy of (its usage row only):
    the run's update of the sessions makes no empty row of it, nor its usage, and
    reports it diverged; the next run leaves it deleted."""
    source, hermes = _real_hermes(tmp_path)
    for sid in ("a", "b"):
        hermes.create_session(sid, source="cli")
        hermes.append_message(sid, "user", content=f"hi {sid}")
    hermes.close()
    _edit_source(source, "INSERT INTO session_model_usage (session_id, model) VALUES ('b', 'm')")
    assert import_state_db(source, store).ok
    hermes = _real_hermes(tmp_path)[1]
    hermes.append_message("a", "assistant", content="more a")
    hermes.close()

    def delete_b(sid: str, _cursor: int) -> None:
        if sid == "a" and store.get_session("b") is not None:
            assert store.delete_session("b")

    report = import_state_db(source, store, on_batch=delete_b)
    assert report.diverged_sessions == ["b"]
    assert report.mismatched_sessions == []
    assert store.get_session("b") is None
    again = import_state_db(source, store)
    assert again.ok, again.table()
    assert again.deleted_sessions == ["b"]
    assert store.get_session("b") is None


def test_a_session_an_import_could_not_store_is_copied_once_it_can_be(
    store: SessionStore, tmp_path: Path
) -> None:
    """Only sessions the destination held once an import was done count as seen: one
    left out (a message that is not UTF-8) is copied by the run after Hermes fixed it,
    not taken for one deleted since."""
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", source="cli")
    hermes.append_message("s", "user", content="hello")
    hermes.close()
    _edit_source(source, "UPDATE messages SET content = CAST(x'c3' AS TEXT)")
    assert "s" in import_state_db(source, store).invalid_sessions
    assert store.get_session("s") is None
    _edit_source(source, "UPDATE messages SET content = 'hello'")
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.deleted_sessions == []
    assert [m["content"] for m in store.get_messages("s")] == ["hello"]


def test_a_copied_message_hermes_added_a_column_to_is_kept_and_the_rest_copied(
    store: SessionStore, tmp_path: Path
) -> None:
    """An ``api_content`` Hermes backfills on a copied message: the copy stays as it was."""
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", source="cli")
    hermes.create_session("t", source="cli")
    for sid in ("s", "t"):
        hermes.append_message(sid, "user", content="question")
        hermes.append_message(sid, "assistant", content="answer")
        hermes.append_message(sid, "assistant", content="and more")
    assert import_state_db(source, store).ok
    # Hermes backfills the newest user message: the first of three, copied already.
    assert hermes.set_latest_user_api_content("s", "question", "question, with context") == 1
    hermes.append_message("s", "user", content="next")
    hermes.append_message("t", "user", content="next")
    hermes.close()
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.amended_sessions == ["s"]
    assert report.diverged_sessions == report.grown_sessions == report.mismatched_sessions == []
    assert report.messages_written == 2
    assert "api_content" not in store.get_messages("s")[0]
    for sid in ("s", "t"):
        assert [m["content"] for m in store.get_messages(sid)] == [
            "question",
            "answer",
            "and more",
            "next",
        ]


@pytest.mark.parametrize("cut", ["cleared", "made anew", "deleted"])
def test_a_session_another_writer_cuts_during_the_import_is_reported_once(
    store: SessionStore, tmp_path: Path, cut: str
) -> None:
    """Cut after its first batch was copied, it is left as it is, and a run after copies it."""
    from hermes_orm.integrations.hermes import SessionDB

    source, hermes = _real_hermes(tmp_path)
    for sid in ("s", "t"):
        hermes.create_session(sid, source="cli")
        for n in range(9):
            hermes.append_message(sid, "user", content=f"{sid}{n}")
    hermes.close()
    ours = SessionDB(store)

    def cut_once(sid: str, _cursor: int) -> None:
        if sid != "s" or not ours.get_messages("s"):
            return
        if cut == "cleared":
            ours.clear_messages("s")
            return
        ours.delete_session("s")
        if cut == "made anew":
            ours.create_session("s", "cli")

    report = import_state_db(source, store, batch=3, on_batch=cut_once)
    assert report.diverged_sessions == ["s"], report.table()
    assert report.mismatched_sessions == report.grown_sessions == []
    assert [m["content"] for m in store.get_messages("t")] == [f"t{n}" for n in range(9)]
    if cut == "deleted":
        assert store.get_session("s") is None
        return
    assert store.get_messages("s") == []
    again = import_state_db(source, store)
    assert again.ok, again.table()
    assert [m["content"] for m in store.get_messages("s")] == [f"s{n}" for n in range(9)]


@pytest.mark.parametrize("session", ["held before the run", "made by the run"])
def test_a_session_made_anew_with_the_same_last_message_during_the_import_is_not_written_on(
    store: SessionStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, session: str
) -> None:
    """Another writer makes the session anew (or rewrites it) while the import runs: as
    many messages, the same last one. Its history_id differs: the import writes nothing
    on it, and reports it diverged; the other sessions are copied."""
    from hermes_orm.integrations.hermes import importer

    source, hermes = _real_hermes(tmp_path)
    for sid in ("s", "t"):
        hermes.create_session(sid, source="cli")
    for n in range(9):
        if n == 3 and session == "held before the run":
            assert import_state_db(source, store).ok  # s and t hold 3 messages each
        for sid in ("s", "t"):
            hermes.append_message(sid, "user", content=f"{sid}{n}")
    hermes.close()
    remade: list[list[dict[str, Any]]] = []

    def make_anew() -> None:
        stored = store.get_messages("s")
        others = [{"role": "user", "content": f"other {n}"} for n in range(len(stored) - 1)]
        store.delete_session("s")
        store.create_session("s", source="elsewhere")
        store.flush("s", [*others, stored[-1]])
        remade.append(store.get_messages("s"))

    on_batch = None
    if session == "held before the run":
        real = importer._cursors

        def then_made_anew(*args: Any) -> Any:
            read = real(*args)
            make_anew()
            return read

        monkeypatch.setattr(importer, "_cursors", then_made_anew)
    else:

        def on_batch(sid: str, cursor: int) -> None:
            if sid == "s" and not remade:
                make_anew()

    report = import_state_db(source, store, batch=3, on_batch=on_batch)
    assert report.diverged_sessions == ["s"], report.table()
    assert store.get_messages("s") == remade[0]
    assert [m["content"] for m in store.get_messages("t")] == [f"t{n}" for n in range(9)]


def test_a_session_another_writer_made_first_is_copied_on_its_history_id(
    store: SessionStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its row made by another writer (another run, say) between this run's read and its
    insert: the batches go on that row's history_id, checked against the source once at
    most, not before every batch."""
    from hermes_orm.integrations.hermes import importer

    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", source="cli")
    for n in range(30):
        hermes.append_message("s", "user", content=f"s{n}")
    hermes.close()
    real_cursors, real_check = importer._cursors, importer._holds_source_prefix
    checks: list[str] = []

    def then_made_elsewhere(*args: Any) -> Any:
        read = real_cursors(*args)
        SessionStore(store.engine, check_schema=False).create_session("s", source="cli")
        return read

    def counted(*args: Any) -> bool:
        checks.append(args[3])
        return bool(real_check(*args))

    monkeypatch.setattr(importer, "_cursors", then_made_elsewhere)
    monkeypatch.setattr(importer, "_holds_source_prefix", counted)
    report = import_state_db(source, store, batch=3)
    assert report.ok, report.table()
    assert [m["content"] for m in store.get_messages("s")] == [f"s{n}" for n in range(30)]
    assert len(checks) <= 1


def test_a_session_another_writer_made_first_on_another_history_is_not_written_on(
    store: SessionStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made first, between this run's read and its insert, with other messages but as
    many as a batch and the source's last one of them: its history_id is not the run's,
    and its messages are not the source's, so the session is reported, left as it is."""
    from hermes_orm.integrations.hermes import importer

    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", source="cli")
    for n in range(9):
        hermes.append_message("s", "user", content=f"s{n}")
    hermes.close()
    reference = SessionStore(f"sqlite:///{tmp_path / 'reference.db'}")
    reference.upgrade()
    import_state_db(source, reference)
    as_imported = reference.get_messages("s")[2]  # the source's third, as the run stores it
    reference.close()
    foreign = [{"role": "user", "content": f"foreign {n}"} for n in range(2)]
    real_cursors = importer._cursors

    def then_made_elsewhere(*args: Any) -> Any:
        read = real_cursors(*args)
        other = SessionStore(store.engine, check_schema=False)
        other.create_session("s", source="cli")
        other.flush("s", [*foreign, as_imported])
        return read

    monkeypatch.setattr(importer, "_cursors", then_made_elsewhere)
    report = import_state_db(source, store, batch=3)
    assert report.diverged_sessions == ["s"], report.table()
    assert store.get_messages("s") == [*foreign, as_imported]


def test_an_invalid_session_another_writer_made_first_keeps_its_row(
    store: SessionStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source's session cannot be stored; an agent makes a session of that id in the
    destination between this run's read and its insert (which then leaves it as it
    is). The rows this run made of invalid sessions go, and that one was taken for
    one: the agent's session, its title and extra, went, and its next flush failed."""
    from hermes_orm.integrations.hermes import importer

    source, hermes = _real_hermes(tmp_path)
    for sid in ("x", "y"):
        hermes.create_session(sid, source="cli")
        hermes.append_message(sid, "assistant", "hi", tool_calls=[{"id": "c", "n": float("nan")}])
    hermes.close()
    real_cursors = importer._cursors
    agent = SessionStore(store.engine, check_schema=False)

    def then_made_by_an_agent(*args: Any) -> Any:
        read = real_cursors(*args)
        agent.ensure_session("x", source="telegram", title="the agent's", extra={"of": "it"})
        return read

    monkeypatch.setattr(importer, "_cursors", then_made_by_an_agent)
    report = import_state_db(source, store)
    assert sorted(report.invalid_sessions) == ["x", "y"], report.table()
    kept = store.get_session("x")
    assert kept is not None
    assert (kept["source"], kept["title"], kept["extra"]) == (
        "telegram",
        "the agent's",
        {"of": "it"},
    )
    assert store.get_session("y") is None  # this run's own row of it went
    assert report.sessions_written == 0
    agent.flush("x", [{"role": "user", "content": "the agent's first"}])
    assert [m["content"] for m in store.get_messages("x")] == ["the agent's first"]


@pytest.mark.parametrize("change", ["rewritten shorter", "deleted"])
def test_a_session_hermes_shortens_after_the_import_read_it_is_reported_diverged(
    store: SessionStore, tmp_path: Path, change: str
) -> None:
    """Hermes rewrites a session shorter (its retry, undo, compression) or deletes it
    after the import copied what it read: the copy is what was read, and the session is
    reported diverged, as the next run finds it; it was reported a mismatch."""
    source, hermes = _real_hermes(tmp_path)
    for sid in ("a", "b"):
        hermes.create_session(sid, source="cli")
        for n in range(5):
            hermes.append_message(sid, "user", content=f"{sid}{n}")

    def hermes_goes_on(sid: str, _cursor: int) -> None:
        if sid == "b":
            if change == "deleted":
                hermes.delete_session("a")
            else:
                hermes.replace_messages("a", [{"role": "user", "content": "retried"}])

    report = import_state_db(source, store, batch=5, on_batch=hermes_goes_on)
    hermes.close()
    assert (report.diverged_sessions, report.mismatched_sessions) == (["a"], []), report.table()
    assert [m["content"] for m in store.get_messages("a")] == [f"a{n}" for n in range(5)]
    assert [m["content"] for m in store.get_messages("b")] == [f"b{n}" for n in range(5)]
    again = import_state_db(source, store)
    assert again.mismatched_sessions == []
    assert again.diverged_sessions == ([] if change == "deleted" else ["a"])


def test_a_run_beside_another_reads_each_session_as_one_snapshot(
    store: SessionStore, tmp_path: Path
) -> None:
    """Another import commits a session just before this one reads its digests.

    The cursor and the digests it is checked against come from one snapshot
    (PostgreSQL gives each statement its own): nothing is taken as diverged.
    """
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", source="cli")
    for n in range(4):
        hermes.append_message("s", "user", content=f"m{n}")
    assert import_state_db(source, store).ok
    for n in range(4, 6):
        hermes.append_message("s", "user", content=f"m{n}")
    hermes.close()
    other: list[ImportReport] = []
    started = threading.Event()

    def before_digests(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not started.is_set() and "digest" in statement and "ORDER BY" in statement:
            started.set()
            other.append(import_state_db(source, store))  # on connections of its own

    event.listen(store.engine, "before_cursor_execute", before_digests)
    try:
        report = import_state_db(source, store)
    finally:
        event.remove(store.engine, "before_cursor_execute", before_digests)
    assert [r.messages_written for r in other] == [2]
    assert report.ok, report.table()
    assert report.messages_written == 0
    assert [m["content"] for m in store.get_messages("s")] == [f"m{n}" for n in range(6)]


@pytest.mark.backends("postgresql")
def test_a_rerun_on_psycopg2_reads_in_a_child_process(
    store: SessionStore, tmp_path: Path, reader: str
) -> None:
    """psycopg2 reads the stored digests as memoryviews: the reader's job still pickles."""
    url = store.engine.url.set(drivername="postgresql+psycopg2")
    on_psycopg2 = SessionStore(url.render_as_string(hide_password=False))
    source = fixture_copy(tmp_path)
    try:
        assert import_state_db(source, on_psycopg2).ok
        grow(source, 1)  # more sessions, and the stored ones read back
        report = import_state_db(source, on_psycopg2)
        assert report.ok, report.table()
        assert report.messages_written > 0
        assert_same_as_source(on_psycopg2, source)
    finally:
        on_psycopg2.close()


def test_not_a_state_db_is_a_typed_error(store: SessionStore, tmp_path: Path) -> None:
    with pytest.raises(StateDbError):
        import_state_db(tmp_path / "missing.db", store)
    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite")
    with pytest.raises(StateDbError):
        import_state_db(junk, store)


@pytest.mark.parametrize(
    ("arguments", "refused"),
    [
        ({"batch": 0}, "batch must be an int from 1"),
        ({"batch": -1}, "batch must be an int from 1"),
        ({"batch": False}, "batch must be an int from 1"),
        ({"batch": None}, "batch must be an int from 1"),
        ({"batch": "8000"}, "batch must be an int from 1"),
        ({"batch": 2**70}, "batch must be an int from 1"),
        ({"progress": "stderr"}, "progress must be None or a text stream"),
        ({"progress": True}, "progress must be None or a text stream"),
        ({"on_batch": "print"}, "on_batch must be None or a callable"),
        ({"restore_deleted": 1}, "restore_deleted must be a bool"),
        ({"source": None}, "source must be the path of a Hermes state.db"),
        ({"source": b"state.db"}, "source must be the path of a Hermes state.db"),
        ({"source": ""}, "source is an empty path"),
        ({"source": "a\x00b.db"}, "is no file name"),
        ({"source": "a\ud800.db"}, "is no file name"),
        ({"destination": 42}, "destination must be a SessionStore, a database URL or an Engine"),
    ],
)
def test_arguments_it_cannot_use_are_refused_before_anything_is_written(
    tmp_path: Path, arguments: dict[str, Any], refused: str
) -> None:
    from hermes_orm import InvalidArgumentError

    destination = tmp_path / "hermes.db"
    call: dict[str, Any] = {
        "source": fixture_copy(tmp_path),
        "destination": f"sqlite:///{destination}",
        **arguments,
    }
    with pytest.raises(InvalidArgumentError, match=refused):
        import_state_db(call.pop("source"), call.pop("destination"), **call)
    assert not destination.exists()


@pytest.mark.parametrize("kind", ["url", "engine"])
def test_a_destination_given_as_a_url_object_or_an_engine_is_imported_into(
    tmp_path: Path, kind: str
) -> None:
    from sqlalchemy import make_url

    from hermes_orm import create_store_engine

    url = f"sqlite:///{tmp_path / 'hermes.db'}"
    engine = create_store_engine(url)
    destination: Any = make_url(url) if kind == "url" else engine
    report = import_state_db(fixture_copy(tmp_path), destination)
    assert report.ok
    assert report.messages_written > 0
    with SessionStore(engine) as store:
        assert_same_as_source(store, tmp_path / "state.db")
    engine.dispose()


def test_progress_goes_to_any_writer_and_on_batch_sees_every_batch(
    store: SessionStore, tmp_path: Path
) -> None:
    class Lines:  # a writer with no isatty() nor flush()
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> None:
            self.text += text

    lines, batches = Lines(), []
    report = import_state_db(
        fixture_copy(tmp_path),
        store,
        progress=lines,
        batch=50,
        on_batch=lambda *b: batches.append(b),
    )
    assert report.ok
    assert lines.text.endswith("msg/s\n")
    assert sum(1 for _ in batches) >= report.messages_written // 50


def _reader_processes_alive() -> list[int]:
    """Pids of running import reader processes (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if entry.name.isdigit() and importer._READER_MODULE.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def test_killed_import_resumes_with_every_row_once(
    db_url: str, tmp_path: Path, reader: str
) -> None:
    source = fixture_copy(tmp_path)
    total = grow(source, 15)
    code = (
        "import sys\n"
        "from hermes_orm.integrations.hermes import import_state_db, importer\n"
        f"importer.PROCESS_READER_FROM = {importer.PROCESS_READER_FROM}\n"
        "import_state_db(sys.argv[1], sys.argv[2], batch=20)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(source), db_url], cwd=ROOT)
    store = SessionStore(db_url, check_schema=False)
    deadline = time.monotonic() + 120
    copied = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with store.engine.connect() as conn:
                copied = conn.exec_driver_sql("SELECT count(*) FROM hermes_messages").scalar_one()
        except Exception:  # the schema may not be there yet
            copied = 0
        if copied > total // 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the import finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < copied < total
    # An orphaned reader ends at its next write to the pipe nobody reads.
    deadline = time.monotonic() + 30
    while _reader_processes_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _reader_processes_alive() == []
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.counts["messages"].destination == total
    assert_same_as_source(store, source)
    store.close()


@pytest.mark.heavy
def test_import_while_hermes_is_writing(store: SessionStore, tmp_path: Path, reader: str) -> None:
    from hermes_state import SessionDB

    source = fixture_copy(tmp_path)
    grow(source, 3)
    sid = source_rows(source)[0][0]["id"]
    stop = threading.Event()
    errors: list[BaseException] = []

    def hermes_writer() -> None:
        db = SessionDB(source)
        try:
            n = 0
            while not stop.is_set() and n < 400:
                db.append_message(sid, "user", content=f"live {n}")
                db.append_message("live-session", "assistant", content=f"live {n}") if n else (
                    db.create_session("live-session", source="cli")
                )
                n += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            db.close()

    writer = threading.Thread(target=hermes_writer)
    writer.start()
    first = import_state_db(source, store, batch=50)
    stop.set()
    writer.join()
    assert errors == []
    assert not first.mismatched_sessions, first.table()
    assert not first.diverged_sessions, first.table()
    second = import_state_db(source, store)
    assert second.ok, second.table()
    assert_same_as_source(store, source)


def test_a_session_another_writer_filled_meanwhile_gets_only_the_rest(
    db_url: str, tmp_path: Path, reader: str
) -> None:
    """The import writes on the cursors it read at the start, each checked as it moves.

    Here another process flushes half of a session the import has not reached
    yet; the import's write of that session must see the cursor moved, and
    store only the other half, under the row lock.
    """
    source = fixture_copy(tmp_path)
    _, messages = source_rows(source)
    store = SessionStore(db_url, check_schema=False)
    other = SessionStore(db_url, check_schema=False)
    # Sessions are imported in the source's row order; the last long one is reached late.
    import_order = [r[0] for r in sqlite3.connect(source).execute("SELECT id FROM sessions")]
    target = next(sid for sid in reversed(import_order) if len(messages.get(sid, [])) >= 4)
    wanted = [expected_message(m) for m in messages[target]]
    half = len(wanted) // 2
    moved: list[int] = []

    def meanwhile(session_id: str, _cursor: int) -> None:
        if not moved and session_id != target:
            moved.append(other.flush(target, wanted[:half]).written)

    report = import_state_db(source, store, batch=40, on_batch=meanwhile)
    assert moved == [half]
    assert report.ok, report.table()
    assert report.messages_written == sum(len(v) for v in messages.values()) - half
    assert_same_as_source(store, source)
    other.close()
    store.close()


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hermes-import-reader"]


def test_a_failing_write_stops_the_reader_and_a_rerun_finishes(
    store: SessionStore, tmp_path: Path, reader: str, reader_processes: _Children
) -> None:
    source = fixture_copy(tmp_path)
    inserts = {"n": 0}

    def fail_third_insert(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if statement.startswith("INSERT INTO hermes_messages"):
            inserts["n"] += 1
            if inserts["n"] == 3:
                raise RuntimeError("disk full")

    event.listen(store.engine, "before_cursor_execute", fail_third_insert)
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            import_state_db(source, store, batch=20)
    finally:
        event.remove(store.engine, "before_cursor_execute", fail_third_insert)
    assert _reader_threads() == []
    assert reader_processes.all_ended()
    assert len(reader_processes.started) == (reader == "process")
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert_same_as_source(store, source)


def test_the_reader_runs_while_sessions_are_written_and_stops_if_they_fail(
    store: SessionStore,
    tmp_path: Path,
    reader: str,
    reader_processes: _Children,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = fixture_copy(tmp_path)
    seen: list[tuple[int, int]] = []
    write_sessions = importer._upsert_sessions

    def sessions_then_fail(*args: Any, **kwargs: Any) -> int:
        alive = [proc for proc in reader_processes.started if proc.poll() is None]
        seen.append((len(_reader_threads()), len(alive)))
        write_sessions(*args, **kwargs)
        raise RuntimeError("lost the database")

    monkeypatch.setattr(importer, "_upsert_sessions", sessions_then_fail)
    with pytest.raises(RuntimeError, match="lost the database"):
        import_state_db(source, store)
    # Already reading (a thread; for a child process, the thread feeding it too).
    assert seen == [(1, 1 if reader == "process" else 0)]
    assert _reader_threads() == []
    assert reader_processes.all_ended()
    monkeypatch.setattr(importer, "_upsert_sessions", write_sessions)
    assert import_state_db(source, store).ok
    assert_same_as_source(store, source)


def test_a_failing_source_read_is_a_typed_error_and_a_rerun_finishes(
    store: SessionStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = fixture_copy(tmp_path)
    real = sqlite3.Connection.execute
    calls = {"n": 0}

    class Failing(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
            if " FROM messages WHERE session_id = ?" in sql:  # the reader's reads
                calls["n"] += 1
                if calls["n"] >= 5:  # and when read again, live
                    raise sqlite3.OperationalError("disk I/O error")
            return real(self, sql, *args)

    connect = sqlite3.connect
    monkeypatch.setattr(
        importer.sqlite3, "connect", lambda *a, **k: connect(*a, **k, factory=Failing)
    )
    with pytest.raises(StateDbError, match="disk I/O error"):
        import_state_db(source, store, batch=20)
    assert _reader_threads() == []
    monkeypatch.undo()
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert_same_as_source(store, source)


def _corrupt_a_message_page(path: Path) -> None:
    """Overwrite one page of the messages table (its indexes stay whole).

    Counting messages per session reads an index only, so the import gets as far
    as reading the messages themselves, and fails there: a real read error.
    """
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = [
        r[0]
        for r in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'messages' AND pagetype = 'leaf'"
        )
    ]
    conn.close()
    with path.open("r+b") as f:
        f.seek((pages[len(pages) // 2] - 1) * page_size)
        f.write(b"\xff" * page_size)


def test_a_corrupt_source_is_a_typed_error_and_a_rerun_after_repair_finishes(
    store: SessionStore, tmp_path: Path, reader: str, reader_processes: _Children
) -> None:
    source = fixture_copy(tmp_path)
    intact = tmp_path / "intact.db"
    intact.write_bytes(source.read_bytes())
    _corrupt_a_message_page(source)
    with pytest.raises(StateDbError, match="malformed"):
        import_state_db(source, store, batch=20)
    assert _reader_threads() == []
    assert reader_processes.all_ended()
    source.write_bytes(intact.read_bytes())  # the user restores a backup
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert_same_as_source(store, source)


def test_a_killed_reader_process_is_a_typed_error_and_a_rerun_finishes(
    store: SessionStore,
    tmp_path: Path,
    reader_processes: _Children,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importer, "PROCESS_READER_FROM", 0)
    source = fixture_copy(tmp_path)

    def kill_reader(_session_id: str, _cursor: int) -> None:
        for proc in reader_processes.started:
            proc.kill()

    with pytest.raises(StateDbError, match=r"reader process stopped \(exit code -9\)"):
        import_state_db(source, store, batch=20, on_batch=kill_reader)
    assert _reader_threads() == []
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert_same_as_source(store, source)


def test_a_reader_process_that_cannot_start_leaves_the_reading_to_a_thread(
    store: SessionStore,
    tmp_path: Path,
    reader_processes: _Children,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As when sys.executable is not a Python that can import hermes_orm.
    monkeypatch.setattr(importer, "PROCESS_READER_FROM", 0)
    monkeypatch.setattr(importer, "_READER_MODULE", "hermes_orm_reader_that_is_not_there")
    source = fixture_copy(tmp_path)
    with caplog.at_level(logging.WARNING, logger=importer.__name__):
        report = import_state_db(source, store, batch=20)
    assert report.ok, report.table()
    assert_same_as_source(store, source)
    assert len(reader_processes.started) == 1
    assert reader_processes.all_ended()
    assert _reader_threads() == []
    [warning] = [r.getMessage() for r in caplog.records]
    assert "did not start (exit code 1; it said: " in warning
    assert "No module named hermes_orm_reader_that_is_not_there" in warning


def test_reader_frames_carry_whole_items_and_a_cut_one_is_an_eof() -> None:
    out = io.BytesIO()
    importer.write_frame(out, ("batch", [1, "two", b"3"]))
    importer.write_frame(out, ("done", None))
    whole = out.getvalue()
    inp = io.BytesIO(whole)
    assert importer._read_frame(inp) == ("batch", [1, "two", b"3"])
    assert importer._read_frame(inp) == ("done", None)
    with pytest.raises(EOFError):
        importer._read_frame(io.BytesIO(whole[:3]))  # inside the length
    inp = io.BytesIO(whole[:-1])
    importer._read_frame(inp)
    with pytest.raises(EOFError):
        importer._read_frame(inp)  # inside the item


def test_cli_import(db_url: str, tmp_path: Path) -> None:
    source = fixture_copy(tmp_path)
    env = {**os.environ, "HERMES_HOME": str(tmp_path)}
    run: Any = subprocess.run(
        [sys.executable, "-m", "hermes_orm.cli", "import", str(source), "--url", db_url],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "messages" in run.stdout
    assert "877" in run.stdout
    assert "sessions 40/40" in run.stderr  # plain progress lines when not on a terminal


def test_cli_import_shows_a_session_id_escaped(tmp_path: Path) -> None:
    """A session id Hermes kept with an escape sequence in it (refused here: a control
    character) is named in the report escaped, never sent to the reader's terminal."""
    from hermes_state import SessionDB as HermesSessionDB

    odd = "x\x1b]0;PWNED\x07"
    hermes = HermesSessionDB(tmp_path / "state.db")
    hermes.create_session(odd, "cli")
    hermes.append_message(odd, "user", "hi")
    hermes.close()
    with sqlite3.connect(tmp_path / "state.db") as conn:  # (a count no column holds)
        conn.execute("UPDATE messages SET token_count = 'many'")
    source, url = str(tmp_path / "state.db"), f"sqlite:///{tmp_path / 'orm.db'}"
    run: Any = subprocess.run(
        [sys.executable, "-m", "hermes_orm.cli", "import", source, "--url", url],
        capture_output=True,
        text=True,
        env={**os.environ, "HERMES_HOME": str(tmp_path)},
        check=False,
    )
    assert "\x1b" not in run.stdout + run.stderr
    assert f"session {odd!r}: cannot be stored" in run.stdout, run.stdout


class _OnceWhole:
    """An ``on_batch`` that calls ``then(session id, cursor)`` once: for the first
    session written whole whose length is no multiple of ``batch`` (the reader
    is then done with it: its last read came back short)."""

    def __init__(self, counts: dict[str, int], batch: int, then: Any) -> None:
        self.counts, self.batch, self.then = counts, batch, then
        self.sessions: list[str] = []

    def __call__(self, session_id: str, cursor: int) -> None:
        if not self.sessions and cursor == self.counts[session_id] and cursor % self.batch:
            self.sessions.append(session_id)
            self.then(session_id, cursor)


def test_the_verification_counts_stored_rows(store: SessionStore, tmp_path: Path) -> None:
    """A message missing from the destination is a mismatch, whatever the cursor says."""
    source = fixture_copy(tmp_path)
    counts = {sid: len(m) for sid, m in source_rows(source)[1].items()}

    def lose_last(session_id: str, cursor: int) -> None:
        lost = delete(Message).where(Message.session_id == session_id, Message.idx == cursor - 1)
        with store.engine.begin() as conn:
            assert conn.execute(lost).rowcount == 1

    on_batch = _OnceWhole(counts, 40, lose_last)
    report = import_state_db(source, store, batch=40, on_batch=on_batch)
    assert report.mismatched_sessions == on_batch.sessions
    assert not report.ok
    assert report.counts["messages"].destination == sum(counts.values()) - 1
    assert "message count differs" in report.table()


def test_a_session_hermes_appended_to_after_it_was_read_grew(
    store: SessionStore, tmp_path: Path, reader: str
) -> None:
    source = fixture_copy(tmp_path)
    counts = {sid: len(m) for sid, m in source_rows(source)[1].items()}

    def hermes_appends(session_id: str, _cursor: int) -> None:
        from hermes_state import SessionDB

        db = SessionDB(source)
        db.append_message(session_id, "user", content="one more")
        db.close()

    on_batch = _OnceWhole(counts, 40, hermes_appends)
    report = import_state_db(source, store, batch=40, on_batch=on_batch)
    assert report.grown_sessions == on_batch.sessions
    assert report.mismatched_sessions == []
    assert report.ok, report.table()
    again = import_state_db(source, store)
    assert again.messages_written == 1
    assert again.ok, again.table()
    assert again.grown_sessions == []
    assert_same_as_source(store, source)


def test_a_message_that_cannot_be_stored_is_reported(store: SessionStore, tmp_path: Path) -> None:
    import sqlite3

    source = fixture_copy(tmp_path)
    sessions, _ = source_rows(source)
    bad = sessions[1]["id"]
    conn = sqlite3.connect(source)
    conn.execute(
        "INSERT INTO messages (session_id, role, content, timestamp) VALUES (?, 'tool', ?, ?)",
        (bad, "binary \x00 output is fine", "not a time"),  # SQLite stores any type
    )
    conn.commit()
    conn.close()
    report = import_state_db(source, store)
    assert list(report.invalid_sessions) == [bad]
    assert "timestamp" in report.invalid_sessions[bad]
    assert report.grown_sessions == report.mismatched_sessions == []  # reported once, as invalid
    assert not report.ok
    assert "cannot be stored" in report.table()
    # every other session came through whole
    others = [s["id"] for s in sessions if s["id"] != bad]
    assert all(store.get_session(sid) is not None for sid in others)
    # the bad session is left out whole: its messages, and the row made for them
    assert store.get_session(bad) is None
    assert report.sessions_written == len(others)  # (its row, taken back, is not counted)
    assert report.counts["messages"].destination == 877 - (len(source_rows(source)[1][bad]) - 1)


def _a_message_no_store_takes(source: Path, sid: str) -> None:
    _edit_source(
        source,
        "INSERT INTO messages (session_id, role, content, timestamp) "
        f"VALUES ('{sid}', 'tool', 'output', 'not a time')",  # SQLite stores any type
    )


@pytest.mark.heavy  # (66,000 sessions read one by one: about a minute on PostgreSQL)
def test_more_new_sessions_found_invalid_than_a_statement_may_name_leave_no_row(
    store: SessionStore, tmp_path: Path
) -> None:
    """66,000 new sessions each with a message the store cannot take: their rows, made
    before their messages were read, go again a part at a time. One IN list named them
    all, past PostgreSQL's 65,535 parameters, and the import failed at its end."""
    count = 66_000
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("good", source="cli")
    hermes.append_message("good", "user", content="hi")
    hermes.close()
    _edit_source(
        source,
        "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < 66000) "
        "INSERT INTO sessions (id, source, started_at) SELECT 'bad' || i, 'cli', i FROM g",
        "INSERT INTO messages (session_id, role, content, timestamp) "
        "SELECT id, 'tool', 'output', 'not a time' FROM sessions WHERE id LIKE 'bad%'",
    )
    report = import_state_db(source, store)
    assert len(report.invalid_sessions) == count
    assert report.sessions_written == 1
    assert [m["content"] for m in store.get_messages("good")] == ["hi"]
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Session)).scalar() == 1


def test_the_empty_row_an_interrupted_run_made_of_an_invalid_session_goes(
    store: SessionStore, tmp_path: Path
) -> None:
    """A run stopped after it wrote a new session's row, before it found the session's
    messages invalid, leaves that row (empty); the next run takes it back, as a run not
    stopped does, and counts no session written. Another writer's row of that id stays."""
    source = fixture_copy(tmp_path)
    sessions, messages = source_rows(source)
    bad, other, titled = (sessions[n]["id"] for n in (1, 2, 3))
    held = tmp_path / "held"
    held.mkdir()
    # The state an interrupted run leaves: the rows of the sessions, not their messages.
    interrupted = fixture_copy(held)
    _edit_source(
        interrupted, f"DELETE FROM messages WHERE session_id IN ('{bad}', '{other}', '{titled}')"
    )
    import_state_db(interrupted, store)
    assert store.get_session(bad)["message_count"] == 0
    store.delete_session(other)
    store.create_session(other, source="elsewhere")  # another writer's row of that id
    store.write_transaction(  # another writer titled the import's row, nothing else
        lambda conn: conn.execute(
            update(Session).where(Session.id == titled).values(title="the user's")
        )
    )
    for sid in (bad, other, titled):
        _a_message_no_store_takes(source, sid)
    report = import_state_db(source, store)
    assert set(report.invalid_sessions) == {bad, other, titled}
    assert store.get_session(bad) is None
    assert store.get_session(other)["source"] == "elsewhere"
    assert store.get_session(titled)["title"] == "the user's"
    assert report.sessions_written == 0  # (every other session was copied before)
    again = import_state_db(source, store)
    assert again.sessions_written == again.messages_written == 0
    assert store.get_session(bad) is None
    assert sum(len(m) for m in messages.values()) > 0


def test_an_earlier_run_s_row_whose_title_it_kept_in_extra_goes_too(
    store: SessionStore, tmp_path: Path
) -> None:
    """An earlier run found the title held by another session and kept it in the row's
    extra: that row is still the import's own, taken back once its session is invalid."""
    source = fixture_copy(tmp_path)
    sessions, _ = source_rows(source)
    parents = {s["parent_session_id"] for s in sessions}
    titled = next(
        s for s in sessions if s["title"] and not s["parent_session_id"] and s["id"] not in parents
    )
    sid = titled["id"]
    store.create_session("holder", source="cli")
    store.write_transaction(
        lambda conn: conn.execute(
            update(Session).where(Session.id == "holder").values(title=titled["title"])
        )
    )
    held = tmp_path / "held"
    held.mkdir()
    earlier = fixture_copy(held)
    _edit_source(earlier, f"DELETE FROM messages WHERE session_id = '{sid}'")
    assert import_state_db(earlier, store).retitled_sessions == [sid]
    assert store.get_session(sid)["extra"]["title"] == titled["title"]
    _a_message_no_store_takes(source, sid)
    assert sid in import_state_db(source, store).invalid_sessions
    assert store.get_session(sid) is None


def test_an_id_the_source_holds_twice_is_reported_and_neither_row_copied(
    store: SessionStore, tmp_path: Path
) -> None:
    """A sessions table without its primary key (damaged, or made by hand) may hold an id
    twice: which row is the session cannot be told, so the session is reported invalid."""
    source = fixture_copy(tmp_path)
    sessions, _ = source_rows(source)
    twice = sessions[0]["id"]
    _edit_source(
        source,
        "CREATE TABLE copy AS SELECT * FROM sessions",
        f"INSERT INTO copy SELECT * FROM sessions WHERE id = '{twice}'",
        "UPDATE copy SET model = 'another' WHERE rowid = (SELECT max(rowid) FROM copy)",
        "PRAGMA foreign_keys = OFF",
        "DROP TABLE sessions",
        "ALTER TABLE copy RENAME TO sessions",
    )
    report = import_state_db(source, store)
    assert "2 rows of this id" in report.invalid_sessions[twice]
    assert not report.ok
    assert store.get_session(twice) is None
    others = [s["id"] for s in sessions if s["id"] != twice]
    assert all(store.get_session(sid) is not None for sid in others)


def test_a_title_already_used_in_the_destination_is_kept_in_extra(
    store: SessionStore, tmp_path: Path
) -> None:
    source = fixture_copy(tmp_path)
    sessions, _ = source_rows(source)
    titled = [s for s in sessions if s["title"]]
    assert titled, "the fixture has titled sessions"
    store.create_session("app-own", source="app", title=titled[0]["title"])
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.retitled_sessions == [titled[0]["id"]]
    got = store.get_session(titled[0]["id"])
    assert got is not None
    assert got["title"] is None
    assert got["extra"]["title"] == titled[0]["title"]
    assert "kept in extra['title']" in report.table()
    again = import_state_db(source, store)  # stable: nothing to rewrite
    assert again.sessions_written == 0


def test_an_immutable_read_is_not_trusted_once_the_file_changed(tmp_path: Path) -> None:
    import sqlite3

    from hermes_orm.integrations.hermes.importer import Source

    source = fixture_copy(tmp_path)
    src = Source(source)
    assert not src.live  # nobody had it open: read as an immutable file
    before = src.execute("SELECT count(*) FROM messages")[0][0]
    writer = sqlite3.connect(source)  # a writer comes and goes, checkpointing into the file
    writer.execute(
        "INSERT INTO messages (session_id, role, content, timestamp) "
        "SELECT id, 'user', 'late', 1 FROM sessions LIMIT 1"
    )
    writer.commit()
    writer.close()
    assert src.execute("SELECT count(*) FROM messages")[0][0] == before + 1
    assert src.live
    src.close()


def test_text_not_utf8_in_a_batch_read_again_live_is_still_only_its_sessions_problem(
    tmp_path: Path,
) -> None:
    """The file changed under a batch holding text that is not UTF-8: read again on the
    live connection, that text still comes back as bytes. The new connection read it as
    text, and the whole import failed with a StateDbError."""
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", source="cli")
    for i in range(12):
        hermes.append_message("s", "user", content=f"m{i}")
    hermes.close()
    _edit_source(source, "UPDATE messages SET content = CAST(X'FF41' AS TEXT) WHERE content = 'm2'")
    src = importer.open_source(source)
    assert not src.live
    columns = importer.MessageColumns.of(src.columns("messages"))
    stat = source.stat()  # a checkpoint changes the file under the read
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with src.snapshot():
        batches = list(src.batches(columns.read_many, "s", start=0, size=5))
    assert src.live
    rows = [row for batch, _ in batches for row in batch]
    assert len(rows) == 12
    assert [v for row in rows for v in row if type(v) is importer.NotUtf8] == [b"\xffA"]
    src.close()


def test_a_hermes_that_starts_writing_after_the_source_was_opened_is_seen(
    tmp_path: Path,
) -> None:
    """Opened as an immutable file, the source goes live once a WAL appears beside it."""
    path = fixture_copy(tmp_path)
    src = importer.open_source(path)
    assert not src.live
    count = "SELECT count(*) FROM messages"
    before = src.execute(count)[0][0]
    hermes = sqlite3.connect(path)  # the fixture is in WAL mode: this write stays in the WAL
    hermes.execute(
        "INSERT INTO messages (session_id, role, content, timestamp) "
        "SELECT session_id, 'user', 'late', 1.0 FROM messages LIMIT 1"
    )
    hermes.commit()
    try:
        assert src.execute(count)[0][0] == before + 1
        assert src.live
    finally:
        hermes.close()
        src.close()


def test_dict_content_hermes_stored_is_imported_as_hermes_reads_it(
    store: SessionStore, tmp_path: Path
) -> None:
    from hermes_orm.integrations.hermes import SessionDB

    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("d", source="cli")
    hermes.append_message("d", "user", content={"kind": "card", "n": 1})
    expected = hermes.get_messages("d")[0]["content"]
    hermes.close()
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert SessionDB(store).get_messages("d")[0]["content"] == expected == {"kind": "card", "n": 1}


def _write_lone_surrogates(db: Any, sid: str) -> None:
    """Hermes calls carrying lone surrogates where Hermes keeps them: JSON and multimodal parts."""
    db.create_session(sid, source="cli", model_config={"k\ud800": "v\udfff"})
    db.append_message(sid, "user", content="plain \ud83d text")
    db.append_message(
        sid,
        "assistant",
        content=[{"type": "text", "text": "part \ud800"}],
        tool_calls=[{"id": "c\udc00", "type": "function", "function": {"name": "f"}}],
        reasoning_details=[{"text": "\udbff"}],
    )


def test_lone_surrogates_hermes_keeps_are_imported_as_the_adapter_stores_them(
    store: SessionStore, tmp_path: Path
) -> None:
    from hermes_orm.integrations.hermes import SessionDB

    source, hermes = _real_hermes(tmp_path)
    _write_lone_surrogates(hermes, "imported")
    assert "\ud800" in hermes.get_messages("imported")[1]["content"][0]["text"]  # kept by Hermes
    hermes.close()
    report = import_state_db(source, store)
    assert report.ok, report.table()
    db = SessionDB(store)
    _write_lone_surrogates(db, "adapted")  # the same calls through the adapter

    def kept(sid: str) -> tuple[Any, ...]:
        session = db.get_session(sid)
        assert session is not None
        return (
            session["model_config"],
            [
                {k: v for k, v in m.items() if k not in ("id", "session_id", "timestamp")}
                for m in db.get_messages(sid)
            ],
        )

    assert kept("imported") == kept("adapted")
    assert kept("imported")[1][1]["content"] == [{"type": "text", "text": "part \ufffd"}]


def _two_sessions(tmp_path: Path) -> tuple[Path, Any]:
    """A state.db written by the real Hermes Agent: sessions a and b, a message each."""
    source, hermes = _real_hermes(tmp_path)
    for sid in ("a", "b"):
        hermes.create_session(sid, source="cli")
        hermes.append_message(sid, "user", content=f"hi {sid}")
    return source, hermes


def test_a_hot_rollback_journal_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A writer killed mid-transaction left uncommitted pages and their journal: never read."""
    source, hermes = _two_sessions(tmp_path)
    hermes.close()
    conn = sqlite3.connect(source)
    conn.execute("PRAGMA journal_mode=DELETE")  # Hermes' fallback where WAL cannot work
    conn.close()
    killed = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA cache_size=1')\n"  # pages spill into the file before the commit
        "c.execute('BEGIN')\n"
        "for i in range(3):\n"
        '    c.execute("INSERT INTO messages (session_id, role, content, timestamp)'
        " VALUES ('a', 'user', ?, 2.0)\", ('uncommitted ' + 'x' * 500,))\n"
        "os._exit(9)\n"
    )
    subprocess.run([sys.executable, "-c", killed, str(source)], check=False)
    journal = Path(f"{source}-journal")
    assert journal.stat().st_size > 0
    before = digest_file(source)
    destination = tmp_path / "dest.db"
    with pytest.raises(StateDbError, match=r"never committed.*then import again") as raised:
        import_state_db(source, f"sqlite:///{destination}")
    assert "\n" not in str(raised.value)
    assert not destination.exists()
    assert digest_file(source) == before
    assert journal.stat().st_size > 0


def test_a_source_a_writer_keeps_locked_is_said_to_be_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer holding a rollback-journal state.db locked (mid-write) past the wait: the
    import says so (not that the file is no database), and writes nothing."""
    monkeypatch.setattr(importer, "SOURCE_BUSY_TIMEOUT", 0.2)
    source = fixture_copy(tmp_path)
    writer = sqlite3.connect(source, isolation_level=None)
    writer.execute("PRAGMA journal_mode=DELETE")
    writer.execute("BEGIN EXCLUSIVE")
    writer.execute("UPDATE messages SET content = content || ' (being edited)'")
    destination = tmp_path / "dest.db"
    try:
        with pytest.raises(StateDbError, match=r"stayed locked by a writer.*import again"):
            import_state_db(source, f"sqlite:///{destination}")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert not destination.exists()


def test_a_long_session_of_a_rollback_journal_source_keeps_hermes_waiting_for_its_read_only(
    store: SessionStore, tmp_path: Path, reader: str
) -> None:
    """In rollback-journal mode a read transaction holds every writer of the file off.

    A session is read as of one moment, however many transactions the destination
    takes to write it: Hermes' commit, tried as the first of those lands, must
    wait for the read alone, not for the rest of the copy.
    """
    source = fixture_copy(tmp_path)
    conn = sqlite3.connect(source, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")  # Hermes' fallback where WAL cannot work
    first = conn.execute("SELECT id FROM sessions ORDER BY rowid LIMIT 1").fetchone()[0]
    conn.execute(
        "INSERT INTO sessions (id, source, started_at, message_count) "
        "VALUES ('long', 'cli', 1, 200)"
    )
    conn.executemany(
        "INSERT INTO messages (session_id, role, content, timestamp) VALUES ('long', ?, ?, ?)",
        [("user" if n % 2 else "assistant", f"{n} " + "x" * 2000, n) for n in range(200)],
    )
    # Hermes mid-write: its -journal makes the import read through SQLite's locks.
    hermes = sqlite3.connect(source, isolation_level=None, timeout=0.5)
    hermes.execute("BEGIN IMMEDIATE")
    hermes.execute(
        "INSERT INTO messages (session_id, role, content, timestamp) VALUES (?, 'user', 'new', 2)",
        (first,),
    )
    hermes.execute("UPDATE sessions SET message_count = message_count + 1 WHERE id = ?", (first,))
    committed: list[str] = []

    def commit_once(session_id: str, cursor: int) -> None:
        if session_id == "long" and not committed:
            try:
                hermes.execute("COMMIT")
                committed.append("ok")
            except sqlite3.OperationalError as exc:
                committed.append(str(exc))
                hermes.execute("ROLLBACK")  # (its pending lock would hold the import's reads)

    try:
        report = import_state_db(source, store, batch=10, on_batch=commit_once)
    finally:
        if hermes.in_transaction:
            hermes.execute("ROLLBACK")
        hermes.close()
        conn.close()
    assert committed == ["ok"]
    assert not report.diverged_sessions, report.table()
    assert not report.mismatched_sessions, report.table()
    assert [m["content"].split()[0] for m in store.get_messages("long")] == [
        str(n) for n in range(200)
    ]
    assert import_state_db(source, store).ok
    assert_same_as_source(store, source)


def test_a_session_hermes_compacts_between_its_batches_is_not_stored_torn(
    store: SessionStore, tmp_path: Path, reader: str
) -> None:
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", source="cli")
    for n in range(60):
        hermes.append_message("s", "user" if n % 2 == 0 else "assistant", content=f"m{n}")
    hermes.close()
    compacted: list[int] = []

    def compact(_sid: str, cursor: int) -> None:
        if not compacted:
            from hermes_state import SessionDB

            db = SessionDB(source)
            db.archive_and_compact("s", [{"role": "user", "content": "summary"}])
            db.close()
            compacted.append(cursor)

    report = import_state_db(source, store, batch=5, on_batch=compact)
    assert compacted
    # What was copied is one state of the session: the one before the compaction,
    # whole if the reader had read it all by then (a child process reads far ahead).
    stored = store.get_messages("s")
    assert [m["content"] for m in stored] == [f"m{n}" for n in range(len(stored))]
    assert all(m["active"] for m in stored)
    if len(stored) < 60:
        assert report.diverged_sessions == ["s"], report.table()
        assert not report.ok
    else:
        assert report.grown_sessions == ["s"], report.table()
    again = import_state_db(source, store)
    assert again.diverged_sessions == ["s"]
    assert store.get_messages("s") == stored


def test_the_verification_compares_each_session_s_last_message(
    store: SessionStore, tmp_path: Path
) -> None:
    """Hermes edits a session's last message after the import read it: not verified."""
    source, hermes = _two_sessions(tmp_path)
    hermes.close()

    def edit(sid: str, _cursor: int) -> None:
        if sid == "a":
            _edit_source(source, "UPDATE messages SET content = 'edited' WHERE session_id = 'a'")

    report = import_state_db(source, store, on_batch=edit)
    assert report.diverged_sessions == ["a"], report.table()
    assert not report.ok


def test_messages_without_a_sessions_row_are_reported(
    store: SessionStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source, hermes = _two_sessions(tmp_path)
    hermes.append_message("b", "assistant", content="and more")
    hermes.close()
    _edit_source(source, "DELETE FROM sessions WHERE id = 'b'")
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        report = import_state_db(source, store)
    assert report.orphaned_messages == {"b": 2}
    assert not report.ok
    assert "session 'b': 2 message(s) but no sessions row: not imported" in report.table()
    assert store.get_session("b") is None
    assert [m["content"] for m in store.get_messages("a")] == ["hi a"]
    assert any("no sessions row" in r.getMessage() for r in caplog.records)


def test_a_rerun_leaves_a_session_that_went_on_in_the_destination_as_it_is(
    store: SessionStore, tmp_path: Path
) -> None:
    from hermes_orm.integrations.hermes import SessionDB

    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("a", source="cli", model="m1")
    hermes.set_session_title("a", "first title")
    hermes.append_message("a", "user", content="q1")
    hermes.update_token_counts("a", input_tokens=10, output_tokens=5, model="m1")
    hermes.close()
    assert import_state_db(source, store).ok
    ours = SessionDB(store)  # Hermes in store mode goes on with it
    ours.append_message("a", "assistant", content="a1 in store mode")
    ours.update_token_counts("a", input_tokens=100, output_tokens=50, model="m1")
    ours.set_session_title("a", "renamed in store mode")
    ours.end_session("a", "user_exit")
    before = store.get_session("a")
    with store.engine.connect() as conn:
        usage = conn.execute(select(ModelUsage)).all()
    report = import_state_db(source, store)
    assert report.diverged_sessions == ["a"]
    assert report.sessions_written == report.usage_written == 0
    assert store.get_session("a") == before
    with store.engine.connect() as conn:
        assert conn.execute(select(ModelUsage)).all() == usage


def _mirror_two_turns(store: SessionStore, tmp_path: Path, sid: str, platform: str) -> None:
    """The Hermes mirror plugin's turn of the conversation q1 a1 q2 a2, as the agent has it."""
    live = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    _mirror_turn(store, tmp_path, sid, live, platform)


def _mirror_turn(
    store: SessionStore, tmp_path: Path, sid: str, live: list[dict[str, Any]], platform: str
) -> None:
    """The Hermes mirror plugin's turn of the agent's list ``live``."""
    from hermes_orm.integrations.hermes.mirror import Mirror, StatusFile

    mirror = Mirror(
        store.engine.url.render_as_string(hide_password=False),
        status=StatusFile(tmp_path / "status.json"),
        wait=10,
    )
    try:
        assert mirror.turn(sid, live, model="m", platform=platform)
    finally:
        mirror.close()


def _imported_then_a_turn(tmp_path: Path, store: SessionStore) -> tuple[Path, Any]:
    """Session s: q1 a1 imported, then q2 a2 appended in Hermes; its state.db and SessionDB."""
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", source="cli", model="m")
    hermes.append_message("s", "user", content="q1")
    hermes.append_message("s", "assistant", content="a1")
    assert import_state_db(source, store).ok
    hermes.append_message("s", "user", content="q2")
    hermes.append_message("s", "assistant", content="a2")
    return source, hermes


#: What an older Hermes' state.db looked like: messages without the ``active`` and
#: ``compacted`` columns (``dropped``), or ``active`` added without a default (NULL),
#: or without ``observed``, or without all three (``first``).
_OLDER_MESSAGES = {
    "dropped": [
        "ALTER TABLE messages DROP COLUMN active",
        "ALTER TABLE messages DROP COLUMN compacted",
    ],
    "no observed": ["ALTER TABLE messages DROP COLUMN observed"],
    "first": [
        "ALTER TABLE messages DROP COLUMN active",
        "ALTER TABLE messages DROP COLUMN compacted",
        "ALTER TABLE messages DROP COLUMN observed",
    ],
    "null": [
        "ALTER TABLE messages DROP COLUMN active",
        "ALTER TABLE messages ADD COLUMN active INTEGER",
    ],
}


def _older(source: Path) -> list[str]:
    """Drop the indexes on ``active``/``compacted``, before those columns change."""
    conn = sqlite3.connect(source)
    indexes = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages' "
        "AND (sql LIKE '%active%' OR sql LIKE '%compacted%' OR sql LIKE '%observed%')"
    ).fetchall()
    conn.close()
    return [f'DROP INDEX "{name}"' for (name,) in indexes]


def _imported_then_upgraded(store: SessionStore, tmp_path: Path, older: str) -> tuple[Path, Any]:
    """Session s (q1, a1) of an ``older`` Hermes' file, imported; then Hermes 0.19 opening it."""
    from hermes_state import SessionDB as HermesSessionDB

    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", source="cli", model="m")
    hermes.append_message("s", "user", content="q1")
    hermes.append_message("s", "assistant", content="a1")
    hermes.close()
    _edit_source(source, *_older(source), *_OLDER_MESSAGES[older])
    assert import_state_db(source, store).ok
    return source, HermesSessionDB(source)  # its start-up changes the rows


@pytest.mark.parametrize("older", sorted(_OLDER_MESSAGES))
def test_rows_hermes_changed_in_place_after_an_upgrade_do_not_stop_the_next_import(
    store: SessionStore, tmp_path: Path, older: str
) -> None:
    """Imported from an older Hermes' file; Hermes upgraded (its rows get ``active``, 1) goes on.

    The copies stay as they are; the messages after them are copied, not taken
    for the mirror's (which would leave them out with the report ok).
    """
    source, hermes = _imported_then_upgraded(store, tmp_path, older)
    copied = store.get_messages("s")
    assert {"active", "observed"} - set(copied[0])  # a column the older file lacked
    hermes.append_message("s", "user", content="q2")
    hermes.append_message("s", "assistant", content="a2")
    hermes.close()
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.amended_sessions == ["s"]
    assert report.mirrored_sessions == report.diverged_sessions == []
    assert report.messages_written == 2
    assert "kept as copied, the messages after them copied" in report.table()
    stored = store.get_messages("s")
    assert stored[:2] == copied
    assert [m["content"] for m in stored] == ["q1", "a1", "q2", "a2"]
    assert stored[2]["active"] is True  # copied as the source holds it now
    again = import_state_db(source, store)  # and after that, as any session
    assert again.ok
    assert again.messages_written == 0
    assert again.amended_sessions == []


def test_copies_hermes_withdrew_after_an_upgrade_are_a_divergence(
    store: SessionStore, tmp_path: Path
) -> None:
    """Compacted since: the copies (no ``active``: live) no longer stand for the rows."""
    source, hermes = _imported_then_upgraded(store, tmp_path, "dropped")
    hermes.archive_and_compact("s", [{"role": "user", "content": "summary of q1 and a1"}])
    hermes.append_message("s", "user", content="q2")
    hermes.close()
    report = import_state_db(source, store)
    assert report.diverged_sessions == ["s"]
    assert report.amended_sessions == report.mirrored_sessions == []
    assert not report.ok
    assert [m["content"] for m in store.get_messages("s")] == ["q1", "a1"]


def test_a_copy_hermes_changed_in_content_is_still_a_divergence(
    store: SessionStore, tmp_path: Path
) -> None:
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", source="cli", model="m")
    hermes.append_message("s", "user", content="q1")
    assert import_state_db(source, store).ok
    hermes.append_message("s", "assistant", content="a1")
    hermes.close()
    _edit_source(source, "UPDATE messages SET content = 'q1 edited' WHERE content = 'q1'")
    report = import_state_db(source, store)
    assert report.diverged_sessions == ["s"]
    assert not report.ok
    assert [m["content"] for m in store.get_messages("s")] == ["q1"]


@pytest.mark.parametrize("first", ["import", "mirror"])
def test_a_gateway_session_the_mirror_keeps_is_up_to_date_whoever_came_first(
    store: SessionStore, tmp_path: Path, first: str
) -> None:
    """Its session_meta row (state.db's, and an import's copy) is no turn of the agent's list."""
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("g", source="telegram", model="m")
    hermes.append_message("g", "user", content="q1")
    hermes.append_message("g", "assistant", content="a1")
    # What Hermes' gateway appends after a new session's first turn.
    hermes.append_message("g", role="session_meta", content=None)
    if first == "import":
        assert import_state_db(source, store).ok
    hermes.append_message("g", "user", content="q2")
    hermes.append_message("g", "assistant", content="a2")
    _mirror_two_turns(store, tmp_path, "g", "telegram")
    assert store.get_session("g#2") is None  # continued, not taken for a rewrite
    stored = store.get_messages("g")
    assert [m["content"] for m in stored if m["role"] != "session_meta"] == [
        "q1",
        "a1",
        "q2",
        "a2",
    ]
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.mirrored_sessions == ["g"]
    assert store.get_messages("g") == stored


def test_a_session_the_mirror_continued_is_up_to_date(store: SessionStore, tmp_path: Path) -> None:
    """README: state.db imported first, mirror plugin enabled after; then imported again."""
    source, hermes = _imported_then_a_turn(tmp_path, store)
    _mirror_two_turns(store, tmp_path, "s", "cli")
    hermes.append_message("s", "user", content="q3")  # the mirror stores it at the turn's end
    stored = store.get_messages("s")
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.mirrored_sessions == ["s"]
    assert report.diverged_sessions == []
    assert report.messages_written == report.sessions_written == 0
    assert "continued by the Hermes mirror plugin" in report.table()
    assert store.get_messages("s") == stored
    # a later edit of a message the import copied is still a divergence
    hermes.set_latest_user_api_content("s", "q3", "q3, with context")
    _edit_source(source, "UPDATE messages SET content = 'q1 edited' WHERE content = 'q1'")
    hermes.close()
    assert import_state_db(source, store).diverged_sessions == ["s"]


@pytest.mark.parametrize("mirrored_before", [True, False], ids=["plugin on", "plugin off"])
def test_a_session_the_mirror_revised_after_hermes_compacted_it(
    store: SessionStore, tmp_path: Path, mirrored_before: bool
) -> None:
    """README order: import, plugin on, then Hermes compacts in place (its default): up to
    date. Turns Hermes kept while the plugin was off are in neither ID nor ID#2: diverged."""
    source, hermes = _imported_then_a_turn(tmp_path, store)
    if mirrored_before:
        _mirror_two_turns(store, tmp_path, "s", "cli")
    summary = {"role": "user", "content": "summary of q1 to a2"}
    hermes.archive_and_compact("s", [summary])
    hermes.append_message("s", "assistant", content="a3")
    hermes.close()
    # the agent's list after the compaction: the plugin keeps it as s#2
    _mirror_turn(store, tmp_path, "s", [summary, {"role": "assistant", "content": "a3"}], "cli")
    assert store.get_session("s")["end_reason"] == "rewritten"  # type: ignore[index]
    kept = {sid: store.get_messages(sid) for sid in ("s", "s#2")}
    report = import_state_db(source, store)
    assert report.ok is mirrored_before, report.table()
    assert (report.mirrored_sessions, report.diverged_sessions) == (
        (["s"], []) if mirrored_before else ([], ["s"])
    )
    assert report.messages_written == 0
    assert {sid: store.get_messages(sid) for sid in ("s", "s#2")} == kept
    if mirrored_before:  # an edit of a message the import copied is a divergence all the same
        _edit_source(source, "UPDATE messages SET content = 'q1 edited' WHERE content = 'q1'")
        assert import_state_db(source, store).diverged_sessions == ["s"]


def test_a_gateway_session_opened_by_its_session_meta_row_is_imported(
    store: SessionStore, tmp_path: Path
) -> None:
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("g", source="telegram")
    # As Hermes' gateway opens a new session's transcript (gateway/session.py).
    hermes.append_message("g", role="session_meta", content=None, timestamp=10.0)
    hermes.append_message("g", "user", content="hi", timestamp=11.0)
    hermes.append_message("g", "assistant", content="hello", timestamp=12.0)
    hermes.close()
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert [m["role"] for m in store.get_messages("g")] == ["session_meta", "user", "assistant"]
    assert_same_as_source(store, source)


@pytest.mark.parametrize("change", ["swapped", "moved"])
def test_titles_hermes_moved_between_sessions_are_moved_alike(
    store: SessionStore, tmp_path: Path, change: str
) -> None:
    source, hermes = _real_hermes(tmp_path)
    for sid in ("b", "a"):  # b first in the source's order
        hermes.create_session(sid, source="cli")
        hermes.append_message(sid, "user", content=f"hi {sid}")
    hermes.set_session_title("a", "alpha")
    hermes.set_session_title("b", "beta")
    assert import_state_db(source, store).ok
    if change == "swapped":
        hermes.set_session_title("a", "tmp")
        hermes.set_session_title("b", "alpha")
        hermes.set_session_title("a", "beta")
    else:
        hermes.set_session_title("a", "alpha (old)")
        hermes.set_session_title("b", "alpha")
    hermes.append_message("b", "assistant", content="new answer")
    hermes.close()
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.retitled_sessions == []
    titles = {sid: (store.get_session(sid) or {})["title"] for sid in ("a", "b")}
    assert titles == (
        {"a": "beta", "b": "alpha"} if change == "swapped" else {"a": "alpha (old)", "b": "alpha"}
    )
    assert [m["content"] for m in store.get_messages("b")] == ["hi b", "new answer"]


def test_a_title_moved_to_a_new_session_is_set_once_its_holder_let_it_go(
    store: SessionStore, tmp_path: Path
) -> None:
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("a", source="cli")
    hermes.set_session_title("a", "report")
    hermes.close()
    assert import_state_db(source, store).ok
    hermes = _real_hermes(tmp_path)[1]
    hermes.set_session_title("a", "report (old)")
    hermes.create_session("n", source="cli")
    hermes.set_session_title("n", "report")
    hermes.close()
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert (store.get_session("a") or {})["title"] == "report (old)"
    assert (store.get_session("n") or {})["title"] == "report"
    assert report.sessions_written == 2  # "n" made, then titled, counted once


def test_duplicate_titles_of_an_old_state_db_are_left_to_the_newest_session(
    store: SessionStore, tmp_path: Path
) -> None:
    source, hermes = _two_sessions(tmp_path)
    hermes.close()
    _edit_source(
        source,
        "DROP INDEX idx_sessions_title_unique",  # as before Hermes made titles unique
        "UPDATE sessions SET title = 'My chat'",
    )
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.deduplicated_titles == ["a"]
    assert "as Hermes' own migration does" in report.table()
    a, b = store.get_session("a") or {}, store.get_session("b") or {}
    assert (a["title"], a["extra"]) == (None, {"title": "My chat"})
    assert b["title"] == "My chat"
    assert import_state_db(source, store).sessions_written == 0


@pytest.mark.parametrize("column", ["input_tokens", "api_call_count", "expiry_finalized"])
def test_null_in_a_column_hermes_leaves_nullable_is_its_default(
    store: SessionStore, tmp_path: Path, column: str
) -> None:
    source, hermes = _two_sessions(tmp_path)
    hermes.close()
    _edit_source(source, f"UPDATE sessions SET {column} = NULL WHERE id = 'b'")
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert (store.get_session("b") or {})[column] in (0, False)


@pytest.mark.parametrize(
    "columns", ["", ", source TEXT, started_at REAL"], ids=["no such columns", "NULL in them"]
)
def test_a_hand_made_sessions_table_without_a_source_or_start_is_imported_with_the_defaults(
    store: SessionStore, tmp_path: Path, columns: str
) -> None:
    """Columns hermes_orm keeps NOT NULL, missing from the table or NULL in it: its source is
    'unknown' and its start 0.0, as a NULL in a Hermes table reads. A missing one failed the
    whole import with a NOT NULL error, after the destination was migrated; a NULL start
    became the column's default, a function, and the session was refused."""
    source = tmp_path / "state.db"
    with sqlite3.connect(source) as conn:
        conn.execute(f"CREATE TABLE sessions (id TEXT PRIMARY KEY, title TEXT{columns})")
        conn.execute(
            "CREATE TABLE messages "
            "(id INTEGER PRIMARY KEY, session_id TEXT, role TEXT, content TEXT)"
        )
        conn.execute("INSERT INTO sessions (id, title) VALUES ('a', 'by hand')")
        conn.execute("INSERT INTO messages (session_id, role, content) VALUES ('a', 'user', 'hi')")
    conn.close()
    report = import_state_db(source, store)
    assert report.ok, report.table()
    got = store.get_session("a") or {}
    assert (got["source"], got["started_at"], got["title"]) == ("unknown", 0.0, "by hand")
    assert [m["content"] for m in store.get_messages("a")] == ["hi"]


def test_text_that_is_not_utf8_makes_only_its_session_invalid(
    store: SessionStore, tmp_path: Path
) -> None:
    (tmp_path / "hermes").mkdir()
    source, hermes = _two_sessions(tmp_path / "hermes")
    hermes.create_session("c", source="cli")
    hermes.close()
    conn = sqlite3.connect(source)
    conn.execute("UPDATE messages SET content = CAST(X'6869FF21' AS TEXT) WHERE session_id = 'b'")
    conn.execute("UPDATE sessions SET title = CAST(X'FF' AS TEXT) WHERE id = 'c'")
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for beside in ("-wal", "-shm"):
        Path(f"{source}{beside}").unlink(missing_ok=True)
    report = import_state_db(source, store)
    assert report.invalid_sessions == {
        "b": "message 0, column 'content': text that is not valid UTF-8",
        "c": "its column 'title' holds text that is not valid UTF-8",
    }
    assert not report.ok
    assert [m["content"] for m in store.get_messages("a")] == ["hi a"]
    assert store.get_session("c") is None
    assert sorted(p.name for p in (tmp_path / "hermes").iterdir()) == ["state.db"]


@pytest.mark.parametrize("column", ["cwd", "newcol"])
def test_a_blob_in_a_sessions_column_makes_its_session_invalid(
    store: SessionStore, tmp_path: Path, column: str
) -> None:
    source, hermes = _two_sessions(tmp_path)
    hermes.close()
    # newcol: a column hermes_orm keeps in extra
    added = ["ALTER TABLE sessions ADD COLUMN newcol BLOB"] if column == "newcol" else []
    _edit_source(source, *added, f"UPDATE sessions SET {column} = X'00FF10' WHERE id = 'b'")
    report = import_state_db(source, store)
    assert report.invalid_sessions == {"b": f"its column {column!r} holds a BLOB, not text"}
    assert "session 'b': cannot be stored" in report.table()
    assert store.get_session("b") is None
    assert [m["content"] for m in store.get_messages("a")] == ["hi a"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("system_prompt = 'a prompt with ' || char(0) || ' in it'", "'system_prompt' contains NUL"),
        ("cwd = char(0)", "'cwd' contains NUL"),
        ("started_at = 'yesterday'", "'started_at' must be a number"),
        ("input_tokens = 'lots'", "'input_tokens' must be an int"),
        ("input_tokens = 1e20", "'input_tokens' must be an int"),
    ],
)
def test_a_session_value_the_store_refuses_makes_only_its_session_invalid(
    store: SessionStore, tmp_path: Path, change: str, reason: str
) -> None:
    """As the store's API refuses it: the session named with the column, the rest imported."""
    source, hermes = _two_sessions(tmp_path)
    hermes.close()
    _edit_source(source, f"UPDATE sessions SET {change} WHERE id = 'b'")
    report = import_state_db(source, store)
    assert list(report.invalid_sessions) == ["b"]
    assert reason in report.invalid_sessions["b"]
    assert not report.ok
    assert store.get_session("b") is None
    assert [m["content"] for m in store.get_messages("a")] == ["hi a"]


def test_parent_links_that_loop_are_kept_in_extra_and_reported(
    store: SessionStore, tmp_path: Path
) -> None:
    """Hermes lets a session be its own parent, and its upsert closes ``a -> b -> a``."""
    from hermes_orm.verify import verify_database

    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("self", source="cli", parent_session_id="self")
    hermes.create_session("a", source="cli")
    hermes.create_session("b", source="cli", parent_session_id="a")
    hermes.create_session("a", source="cli", parent_session_id="b")  # fills a's parent
    hermes.create_session("c", source="cli", parent_session_id="b")  # below the loop
    for sid in ("self", "a", "b", "c"):
        hermes.append_message(sid, "user", content=f"hi {sid}")
    hermes.close()
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert sorted(report.unlooped_sessions) == ["b", "self"]
    assert "closed a loop of parents" in report.table()
    parents = {}
    for sid in ("self", "a", "b", "c"):
        session = store.get_session(sid)
        assert session is not None
        parents[sid] = (
            session["parent_session_id"],
            (session["extra"] or {}).get("parent_session_id"),
        )
    assert parents == {
        "self": (None, "self"),
        "a": ("b", None),
        "b": (None, "a"),
        "c": ("b", None),
    }
    assert verify_database(store).ok
    assert import_state_db(source, store).ok  # again: nothing new, still no loop
    assert verify_database(store).ok


@pytest.mark.backends("sqlite")  # PostgreSQL's foreign keys keep orphans out
def test_a_session_whose_id_orphaned_messages_hold_in_the_destination_is_invalid(
    store: SessionStore, engine: Any, tmp_path: Path
) -> None:
    """Messages left by a delete with foreign keys off would read as the imported session's."""
    store.create_session("b", source="cli")
    store.flush("b", [{"role": "user", "content": "someone else's"}])
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.exec_driver_sql("DELETE FROM hermes_sessions WHERE id = 'b'")
    source, hermes = _two_sessions(tmp_path)
    hermes.close()
    report = import_state_db(source, store)
    assert list(report.invalid_sessions) == ["b"]
    assert "holds messages of a deleted session of that id" in report.invalid_sessions["b"]
    assert not report.ok
    assert store.get_session("b") is None
    assert [m["content"] for m in store.get_messages("a")] == ["hi a"]

    from hermes_orm import DatabaseError
    from hermes_orm.integrations.hermes import SessionDB

    with pytest.raises(DatabaseError, match="messages of a deleted session of that id"):
        SessionDB(store).import_sessions([{"id": "b", "source": "cli", "messages": []}])
    assert store.get_session("b") is None


def test_a_session_id_longer_than_the_store_takes_is_invalid(
    store: SessionStore, tmp_path: Path
) -> None:
    source, hermes = _real_hermes(tmp_path)
    long_id = "x" * 300
    for sid in ("ok", long_id):
        hermes.create_session(sid, source="cli")
        hermes.append_message(sid, "user", content="hi")
    hermes.close()
    report = import_state_db(source, store)
    assert list(report.invalid_sessions) == [long_id]
    assert "at most 255" in report.invalid_sessions[long_id]
    assert [m["content"] for m in store.get_messages("ok")] == ["hi"]


@pytest.mark.parametrize("reader", ["thread", "process"], indirect=True)
def test_a_session_invalid_past_its_first_batch_leaves_nothing_of_it(
    store: SessionStore, tmp_path: Path, reader: str
) -> None:
    """Nothing is written of a session with a message the store refuses, wherever it is.

    One longer than a batch had its first batches written before the message
    was read; one whose first message is refused kept the row made for it.
    """
    source, hermes = _real_hermes(tmp_path)
    for sid, bad_at in (("long", 25), ("first", 0), ("ok", None)):
        hermes.create_session(sid, source="cli")
        for i in range(30):
            role = "narrator" if i == bad_at else ("user", "assistant")[i % 2]
            hermes.append_message(sid, role, content=f"{sid} message {i}")
    hermes.close()
    report = import_state_db(source, store, batch=10)
    assert sorted(report.invalid_sessions) == ["first", "long"]
    assert "unknown role 'narrator'" in report.invalid_sessions["long"]
    assert store.get_session("long") is None
    assert store.get_session("first") is None
    assert len(store.get_messages("ok")) == 30
    assert report.messages_written == 30
    again = import_state_db(source, store, batch=10)  # a re-run: the same, nothing more
    assert sorted(again.invalid_sessions) == ["first", "long"]
    assert again.messages_written == 0


@pytest.mark.parametrize("reader", ["thread", "process", "a process that cannot start"])
def test_an_interrupted_import_stops_its_reader_before_checking_a_long_session_whole(
    store: SessionStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    reader: str,
) -> None:
    """A Ctrl-C as the import writes, its reader checking a session longer than a batch:
    the check ends between two batches, and the Ctrl-C reaches the caller then. It went
    on to the session's end (seconds to minutes for a long one); a child reader,
    killed, was taken for one that never started, and the source read again here."""
    monkeypatch.setattr(importer, "PROCESS_READER_FROM", 10**12 if reader == "thread" else 0)
    if reader == "a process that cannot start":  # (the thread then reads the source)
        monkeypatch.setattr(importer, "_READER_MODULE", "hermes_orm.no_such_module")
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("long", source="cli")
    for i in range(200):
        hermes.append_message("long", ("user", "assistant")[i % 2], content=f"message {i}")
    hermes.close()
    checking = threading.Event()
    pages: list[int] = []
    real_batches = importer.Source.batches

    def slow_pages(self: Any, *args: Any, **kwargs: Any) -> Any:
        for rows in real_batches(self, *args, **kwargs):  # a batch of the long session
            pages.append(1)
            checking.set()
            time.sleep(0.05)
            yield rows

    def interrupted(*_args: Any, **_kwargs: Any) -> Any:
        if reader != "process":  # (the child's own pages are not seen here)
            checking.wait(30)
        raise KeyboardInterrupt

    monkeypatch.setattr(importer.Source, "batches", slow_pages)
    monkeypatch.setattr(SessionStore, "write_transaction", interrupted)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        import_state_db(source, store, batch=5)
    assert ("did not start" in caplog.text) is (reader == "a process that cannot start")
    assert len(pages) < 10  # of its 40 batches


def test_the_work_of_reading_a_session_grows_with_its_length_not_its_square(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session twice as long costs SQLite about twice the work to read (counted in its
    virtual machine's steps, on the source's connection). Each batch was read with an
    OFFSET, which read every row before it again: four times the work (an import of a
    300,000-message session took twice as long as its writes)."""
    monkeypatch.setattr(importer, "PROCESS_READER_FROM", 10**12)  # (the reader here)
    steps = [0]
    real_connect = importer.Source._connect

    def counted(self: Any) -> sqlite3.Connection:
        conn = real_connect(self)

        def step() -> int:
            steps[0] += 1
            return 0

        conn.set_progress_handler(step, 100)
        return conn

    monkeypatch.setattr(importer.Source, "_connect", counted)
    work = []
    for length in (1_500, 3_000):
        source, hermes = _real_hermes(tmp_path / str(length))
        hermes.create_session("long", source="cli")
        hermes.close()
        with sqlite3.connect(source) as conn:
            conn.executemany(
                "INSERT INTO messages (session_id, role, content, timestamp) "
                "VALUES ('long', 'user', ?, ?)",
                [(f"message {i}", float(i)) for i in range(length)],
            )
        conn.close()
        steps[0] = 0
        report = import_state_db(source, f"sqlite:///{tmp_path / f'{length}.db'}", batch=50)
        assert report.ok, report.table()
        assert report.messages_written == length
        work.append(steps[0])
    assert work[1] < 2.5 * work[0], work


def test_a_session_with_a_usage_row_the_store_cannot_hold_is_left_whole(
    store: SessionStore, tmp_path: Path
) -> None:
    """Hermes stores any model name (NUL included): that session is invalid, the rest copied."""
    source, hermes = _real_hermes(tmp_path)
    for sid, model in (("s1", "weird\x00model"), ("s2", "gpt-5")):
        hermes.create_session(sid, "cli", model="gpt-5")
        hermes.append_message(sid, "user", content=f"hello {sid}")
        hermes.update_token_counts(sid, input_tokens=10, output_tokens=5, model="gpt-5")
        hermes.update_token_counts(sid, input_tokens=1, output_tokens=1, model=model)
    hermes.create_session("child", "cli", parent_session_id="s1")  # s1 continued elsewhere
    hermes.append_message("child", "user", content="hello child")
    hermes.close()
    report = import_state_db(source, store)
    assert list(report.invalid_sessions) == ["s1"]
    assert "usage row of model" in report.invalid_sessions["s1"]
    assert store.get_session("s1") is None
    assert [m["content"] for m in store.get_messages("s2")] == ["hello s2"]
    child = store.get_session("child")  # its link to the session left out kept in extra
    assert child is not None
    assert child["parent_session_id"] is None
    assert child["extra"] == {"parent_session_id": "s1"}
    with store.engine.connect() as conn:
        usage = conn.exec_driver_sql(
            "SELECT session_id, input_tokens FROM hermes_session_model_usage"
        ).all()
    assert [tuple(row) for row in usage] == [("s2", 11)]


def _import_by_cli(source: Path, url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``hermes-orm import SOURCE --url URL`` in a new process, ``env`` added to its own."""
    return subprocess.run(
        [sys.executable, "-m", "hermes_orm.cli", "import", str(source), "--url", url],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_cli_refuses_to_import_into_a_file_named_as_the_state_dbs_wal_or_journal(
    tmp_path: Path, suffix: str
) -> None:
    """SQLite takes such a file for the state.db's own: Hermes' next open deletes it."""
    source, hermes = _two_sessions(tmp_path)
    hermes.close()
    beside = sorted(p.name for p in tmp_path.iterdir())
    run = _import_by_cli(source, f"sqlite:///{source}{suffix}", HERMES_HOME=str(tmp_path))
    assert run.returncode == 2
    assert f"named as the {suffix[1:]} file SQLite keeps beside" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == beside  # nothing made beside it
    # A link of that name to a file elsewhere: SQLite still looks there by the name.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / f"{source.name}{suffix}").symlink_to(elsewhere / "hermes_orm.db")
    run = _import_by_cli(source, f"sqlite:///{source}{suffix}", HERMES_HOME=str(tmp_path))
    assert run.returncode == 2
    assert list(elsewhere.iterdir()) == []


def test_cli_import_into_a_url_whose_password_reads_as_a_port_is_a_clear_error(
    tmp_path: Path,
) -> None:
    source, hermes = _two_sessions(tmp_path)
    hermes.close()
    run = _import_by_cli(source, "postgresql://admin:S3CRET/db", HERMES_HOME=str(tmp_path))
    assert run.returncode == 2
    assert run.stderr.startswith("hermes-orm: not a database URL: postgresql://admin:*** (its port")
    assert "Traceback" not in run.stderr
    assert "S3CRET" not in run.stdout + run.stderr


@pytest.mark.parametrize("spelled", ["absolute", "home"])
def test_cli_refuses_to_import_into_the_state_db_itself(tmp_path: Path, spelled: str) -> None:
    source, hermes = _two_sessions(tmp_path)
    hermes.close()
    before = digest_file(source)
    url = f"sqlite:///{source}" if spelled == "absolute" else f"sqlite:///~/{source.name}"
    run = _import_by_cli(source, url, HERMES_HOME=str(tmp_path), HOME=str(source.parent))
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1
    assert "is the Hermes state.db being imported" in run.stderr
    assert digest_file(source) == before


@pytest.mark.backends("postgresql")  # (on SQLite the import's write lock keeps the agent out)
def test_a_session_an_agent_makes_as_the_import_writes_its_sessions_is_left_to_it(
    store: SessionStore, db_url: str, tmp_path: Path
) -> None:
    """Each statement sees its own moment on PostgreSQL: a session made after the import
    read which exist, and before it inserts them, is the agent's. It is reported
    diverged, as one the destination held before; the others are imported."""
    source, hermes = _two_sessions(tmp_path)
    hermes.close()
    agent = SessionStore(db_url)
    made: list[str] = []

    def agent_opens_a(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO hermes_sessions") and not made:
            made.append("a")
            agent.ensure_session("a", source="agent")
            agent.flush("a", [{"role": "user", "content": "the agent's own"}])

    event.listen(store.engine, "before_cursor_execute", agent_opens_a)
    report = import_state_db(source, store)
    event.remove(store.engine, "before_cursor_execute", agent_opens_a)
    agent.close()
    assert made == ["a"]
    assert report.diverged_sessions == ["a"], report.table()
    assert store.get_messages("a") == [{"role": "user", "content": "the agent's own"}]
    assert [m["content"] for m in store.get_messages("b")] == ["hi b"]
    assert import_state_db(source, store).messages_written == 0


def test_json_keys_the_replacement_would_make_one_make_the_session_invalid(
    store: SessionStore, tmp_path: Path
) -> None:
    """Hermes keeps both keys escaped; U+FFFD for both would lose one value: not imported."""
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("k", source="cli")
    merged = {chr(0xD83D): "first", chr(0xDE00): "second"}
    hermes.append_message(
        "k", "assistant", content="", tool_calls=[{"id": "c1", "function": {"name": "f"}, **merged}]
    )
    hermes.close()
    report = import_state_db(source, store)
    assert not report.ok
    table = report.table()
    assert "session 'k'" in table
    assert "not valid Unicode" in table
    assert store.get_session("k") is None


def test_messages_of_a_session_refused_for_its_row_are_counted_in_the_source(
    store: SessionStore, tmp_path: Path
) -> None:
    """The table counts every message of the source: those not copied show as a difference."""
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("ok", source="cli")
    hermes.append_message("ok", "user", content="hi")
    hermes.close()
    conn = sqlite3.connect(source)
    conn.execute(
        "INSERT INTO sessions (id, source, started_at, title) "
        "VALUES ('t', 'cli', 1.0, CAST(x'c3' AS TEXT))"  # a title that is no UTF-8
    )
    conn.execute(
        "INSERT INTO messages (session_id, role, content, timestamp) VALUES ('t', 'user', 'x', 2)"
    )
    conn.execute("INSERT INTO session_model_usage (session_id, model) VALUES ('t', 'm')")
    conn.commit()
    conn.close()
    report = import_state_db(source, store)
    assert "t" in report.invalid_sessions
    assert (report.counts["messages"].source, report.counts["messages"].destination) == (2, 1)
    assert report.counts["session_model_usage"].source == 1
    assert not report.ok


def test_a_title_and_a_parent_link_written_as_the_import_writes_sessions(
    store: SessionStore, db_url: str, tmp_path: Path
) -> None:
    """Other writers go on as the import writes its sessions: a title one takes once the
    import read who holds titles is kept in the import's ``extra`` as one held before
    (not the database's error); a parent link one sets waits for the import's session
    write, then is refused as it would close a loop with the import's links."""
    from hermes_orm import InvalidSessionError
    from hermes_orm.verify import verify_database

    source, hermes = _real_hermes(tmp_path)
    for sid in ("A", "B"):
        hermes.create_session(sid, source="cli")
    hermes.set_session_title("A", "Trip plan")
    hermes.close()
    other = SessionStore(db_url)

    def titles_read(statement: str) -> bool:
        return "SELECT id, title FROM hermes_sessions WHERE title IN" in statement

    def take_the_title() -> None:
        other.create_session("mine", source="api", title="Trip plan")

    with meanwhile(store.engine, titles_read, take_the_title) as taken:
        report = import_state_db(source, store)
    assert report.ok, report.table()
    assert taken.thread is not None
    if taken.error is None:  # (on SQLite the import's write lock keeps it out first)
        assert report.retitled_sessions == ["A"]
        assert store.get_session("A")["extra"] == {"title": "Trip plan"}  # type: ignore[index]
    else:
        assert isinstance(taken.error, InvalidSessionError), taken.error
        assert store.get_session("A")["title"] == "Trip plan"  # type: ignore[index]

    with sqlite3.connect(source) as conn:  # Hermes links B under A
        conn.execute("UPDATE sessions SET parent_session_id = 'A' WHERE id = 'B'")
    conn.close()

    def rows_read(statement: str) -> bool:
        return statement.lstrip().startswith(
            "SELECT hermes_sessions.id, hermes_sessions.flushed_idx"
        )

    def link_a_under_b() -> None:
        other.ensure_session("A", parent_session_id="B")

    with meanwhile(store.engine, rows_read, link_a_under_b) as linked:
        assert import_state_db(source, store).ok
    other.close()
    assert linked.thread is not None
    assert isinstance(linked.error, InvalidSessionError), linked.error
    assert "loop" in str(linked.error)
    links = [store.get_session(sid)["parent_session_id"] for sid in "AB"]  # type: ignore[index]
    assert links == [None, "A"]
    assert verify_database(store).ok


def test_hermes_settings_routes_and_telegram_topics_come_through_as_hermes_reads_them(
    store: SessionStore, tmp_path: Path
) -> None:
    """A gateway switched to store mode after an import finds its chats where it left them:
    Hermes' key/value settings (a session's goals), its routing of chat keys to sessions
    and Telegram's topic mode, read through the store's SessionDB as Hermes reads them."""
    from hermes_orm.integrations.hermes import SessionDB

    source, hermes = _real_hermes(tmp_path)
    for sid in ("s1", "s2"):
        hermes.create_session(sid, "telegram")
    hermes.set_meta("goal:s1", '{"goal": "ship the release", "done": false}')
    hermes.save_gateway_routing_entry("agent:main:telegram:dm:42", '{"session_id": "s1"}')
    hermes.save_gateway_routing_entry("agent:main:cli", '{"session_id": "s2"}', scope="/srv/a")
    hermes.enable_telegram_topic_mode(chat_id="42", user_id="7", has_topics_enabled=True)
    hermes.bind_telegram_topic(
        chat_id="42", thread_id="9", user_id="7", session_key="agent:main:t:42:9", session_id="s1"
    )
    reads = [
        lambda db: db.get_meta("goal:s1"),
        lambda db: db.get_meta("telegram_dm_topic_schema_version"),
        lambda db: db.load_gateway_routing_entries(),
        lambda db: db.load_gateway_routing_entries(scope="/srv/a"),
        lambda db: db.is_telegram_topic_mode_enabled(chat_id="42", user_id="7"),
        lambda db: db.get_telegram_topic_binding(chat_id="42", thread_id="9"),
        lambda db: db.list_telegram_topic_bindings_for_chat(chat_id="42"),
    ]
    expected = [read(hermes) for read in reads]
    hermes.close()
    assert all(expected[:4])
    assert expected[-1]

    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.settings_written == 6  # 2 settings, 2 routes, a chat's mode, a binding
    assert [read(SessionDB(store)) for read in reads] == expected
    for table, rows in (("state_meta", 2), ("gateway_routing", 2), ("telegram_dm_topic_mode", 1)):
        assert (report.counts[table].source, report.counts[table].destination) == (rows, rows)
    assert "telegram_dm_topic_bindings" in report.table()

    again = import_state_db(source, store)
    assert (again.ok, again.settings_written, again.kept_settings) == (True, 0, [])


def test_rows_store_mode_deleted_since_an_import_are_not_copied_again(
    store: SessionStore, tmp_path: Path
) -> None:
    """A route, a topic binding and a setting the destination deleted after an import
    stay deleted on the next import; a row Hermes changed after that import (newer than
    the one the import saw) is copied; restore_deleted copies the others again. So is
    the binding of a session deleted since (its row went with it)."""
    from hermes_orm.integrations.hermes import SessionDB
    from hermes_orm.models import Meta

    source, hermes = _real_hermes(tmp_path)
    for sid in ("s1", "s2"):
        hermes.create_session(sid, "telegram")
    hermes.set_meta("goal:s1", "ship it")
    for key in ("k1", "k2"):
        hermes.save_gateway_routing_entry(key, '{"session_id": "s1"}')
    hermes.enable_telegram_topic_mode(chat_id="42", user_id="7", has_topics_enabled=True)
    for thread, sid in (("9", "s1"), ("10", "s2")):
        hermes.bind_telegram_topic(
            chat_id="42", thread_id=thread, user_id="7", session_key=f"t:{thread}", session_id=sid
        )
    assert import_state_db(source, store).ok
    live = SessionDB(store)  # store mode, after the switch
    live.delete_gateway_routing_entries(["k1", "k2"])
    assert live.delete_telegram_topic_binding(chat_id="42", thread_id="9") == 1
    store.write_transaction(lambda conn: conn.execute(delete(Meta)))
    assert store.delete_session("s2")  # its binding goes with it
    hermes.save_gateway_routing_entry("k2", '{"session_id": "s1", "again": true}')
    hermes.close()

    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.deleted_sessions == ["s2"]
    assert sorted(report.deleted_rows) == [
        "gateway_routing ('', 'k1')",
        "state_meta ('goal:s1')",
        "state_meta ('telegram_dm_topic_schema_version')",
        "telegram_dm_topic_bindings ('42', '10')",
        "telegram_dm_topic_bindings ('42', '9')",
    ]
    assert report.settings_written == 1  # k2, newer in the source than the one seen
    assert live.load_gateway_routing_entries() == {"k2": '{"session_id": "s1", "again": true}'}
    assert live.get_telegram_topic_binding(chat_id="42", thread_id="9") is None
    assert live.get_meta("goal:s1") is None
    assert "row(s) of Hermes' other tables deleted in the destination" in report.table()

    restored = import_state_db(source, store, restore_deleted=True)
    assert restored.ok, restored.table()
    assert restored.deleted_rows == []
    assert set(live.load_gateway_routing_entries()) == {"k1", "k2"}
    assert live.get_meta("goal:s1") == "ship it"
    for thread in ("9", "10"):
        assert live.get_telegram_topic_binding(chat_id="42", thread_id=thread) is not None


def test_the_topic_binding_of_a_session_deleted_since_goes_unrecorded_too(
    store: SessionStore, tmp_path: Path
) -> None:
    """A binding no import recorded (an import of an older release) of a session the
    destination deleted since is left out with it, not refused as bound to a session
    the destination lacks."""
    from hermes_orm.models import Imported

    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", "telegram")
    hermes.bind_telegram_topic(
        chat_id="42", thread_id="9", user_id="7", session_key="t:9", session_id="s"
    )
    hermes.close()
    assert import_state_db(source, store).ok
    store.write_transaction(
        lambda conn: conn.execute(delete(Imported).where(Imported.kind != "session"))
    )
    assert store.delete_session("s")
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.deleted_sessions == ["s"]
    assert report.deleted_rows == ["telegram_dm_topic_bindings ('42', '9')"]


def test_a_topic_store_mode_bound_anew_after_its_session_was_deleted_is_kept(
    store: SessionStore, tmp_path: Path
) -> None:
    """A ``/reset`` in a topic binds it to a new session; the old one is deleted. The next
    import keeps the new binding, counts it, and calls nothing deleted."""
    from hermes_orm.integrations.hermes import SessionDB

    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s1", "telegram")
    topic = {"chat_id": "42", "thread_id": "9", "user_id": "7", "session_key": "t:9"}
    hermes.bind_telegram_topic(**topic, session_id="s1")
    hermes.close()
    assert import_state_db(source, store).ok
    live = SessionDB(store)
    live.create_session("s3", "telegram")
    live.bind_telegram_topic(**topic, session_id="s3")
    assert store.delete_session("s1")
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert report.deleted_sessions == ["s1"]
    assert report.deleted_rows == []
    assert (live.get_telegram_topic_binding(chat_id="42", thread_id="9") or {})[
        "session_id"
    ] == "s3"


@pytest.mark.parametrize("how", ["restore_deleted", "no record"])
def test_a_binding_whose_session_store_mode_bound_anew_is_no_mismatch(
    store: SessionStore, tmp_path: Path, how: str
) -> None:
    """Store mode moved a session to another topic (newer): the source's binding of it
    is left out and said so, not counted against the destination, whether the record
    would call it deleted or there is none (restore_deleted; an older import's
    destination)."""
    from hermes_orm.integrations.hermes import SessionDB
    from hermes_orm.models import Imported

    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s1", "telegram")
    topic = {"chat_id": "42", "user_id": "7", "session_key": "t"}
    hermes.bind_telegram_topic(**topic, thread_id="9", session_id="s1")
    hermes.close()
    assert import_state_db(source, store).ok
    live = SessionDB(store)
    live.delete_telegram_topic_binding(chat_id="42", thread_id="9")
    live.bind_telegram_topic(**topic, thread_id="12", session_id="s1")
    if how == "no record":
        store.write_transaction(lambda conn: conn.execute(delete(Imported)))
    report = import_state_db(source, store, restore_deleted=how == "restore_deleted")
    assert report.ok, report.table()
    assert report.replaced_rows == ["telegram_dm_topic_bindings ('42', '9')"]
    assert "whose session the destination bound anew" in report.table()
    bound = live.get_telegram_topic_binding_by_session(session_id="s1") or {}
    assert bound["thread_id"] == "12"


def test_a_route_of_a_key_past_an_index_entry_s_size_is_recorded(
    store: SessionStore, tmp_path: Path
) -> None:
    """A chat key of 700 CJK characters (2,100 bytes of UTF-8, past what a PostgreSQL
    btree entry holds once escaped in JSON) is copied, recorded, and left deleted."""
    from hermes_orm.integrations.hermes import SessionDB

    rng = random.Random(1)  # (text an index entry's compression does not shrink enough)
    key = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(700))
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s1", "telegram")
    hermes.save_gateway_routing_entry(key, '{"session_id": "s1"}')
    hermes.close()
    assert import_state_db(source, store).ok
    live = SessionDB(store)
    assert list(live.load_gateway_routing_entries()) == [key]
    live.delete_gateway_routing_entries([key])
    report = import_state_db(source, store)
    assert report.ok, report.table()
    assert len(report.deleted_rows) == 1
    assert live.load_gateway_routing_entries() == {}


def test_settings_the_destination_changed_are_kept_and_newer_rows_win(
    store: SessionStore, tmp_path: Path
) -> None:
    """After a switch to store mode the destination is the live store: a setting it holds
    keeps its value (state_meta has no time to say which is newer; the report names it),
    and a route or topic row is replaced only by a newer one. Rows the store cannot hold
    are reported, and the rest imported."""
    from hermes_orm.integrations.hermes import SessionDB
    from hermes_orm.models import GatewayRoute

    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s1", "telegram")
    hermes.set_meta("mode", "from hermes")
    hermes.set_meta("only-in-hermes", "1")
    hermes.save_gateway_routing_entry("old", '{"session_id": "hermes"}')
    hermes.save_gateway_routing_entry("new", '{"session_id": "hermes"}')
    hermes.save_gateway_routing_entry("bad", '{"session_id": "x\x00"}')
    hermes.enable_telegram_topic_mode(chat_id="42", user_id="7")
    hermes.bind_telegram_topic(
        chat_id="42", thread_id="1", user_id="7", session_key="k1", session_id="s1"
    )
    hermes.close()
    _edit_source(
        source,
        "UPDATE gateway_routing SET updated_at = 100 WHERE session_key = 'old'",
        "UPDATE gateway_routing SET updated_at = 300 WHERE session_key = 'new'",
        "INSERT INTO telegram_dm_topic_bindings"
        " VALUES ('42', '2', '7', 'k2', 'ghost', 'auto', 1, 1)",
        f"INSERT INTO state_meta VALUES ('{'k' * 256}', 'too long a key')",
    )
    ours = SessionDB(store)
    ours.set_meta("mode", "live")
    ours.save_gateway_routing_entry("old", '{"session_id": "live"}')
    ours.save_gateway_routing_entry("new", '{"session_id": "live"}')
    with store.engine.begin() as conn:  # the live rows' times: between the source's two
        conn.execute(update(GatewayRoute).values(updated_at=200))

    report = import_state_db(source, store)
    assert not report.ok
    assert ours.get_meta("mode") == "live"
    assert report.kept_settings == ["state_meta ('mode')"]
    assert ours.get_meta("only-in-hermes") == "1"
    assert ours.load_gateway_routing_entries() == {
        "old": '{"session_id": "live"}',  # the destination's is newer
        "new": '{"session_id": "hermes"}',
    }
    assert set(report.invalid_rows) == {
        "gateway_routing ('', 'bad')",
        "telegram_dm_topic_bindings ('42', '2')",
        f"state_meta ({'k' * 256!r:.37}...)",
    }
    assert "NUL" in report.invalid_rows["gateway_routing ('', 'bad')"]
    assert "'ghost' is not in the destination" in report.table()
    assert ours.get_telegram_topic_binding(chat_id="42", thread_id="1")["session_id"] == "s1"
    assert ours.get_telegram_topic_binding(chat_id="42", thread_id="2") is None
    assert (report.counts["gateway_routing"].source, report.counts["gateway_routing"].ok) == (
        3,
        False,
    )


def _two_bound_sessions(tmp_path: Path, stamp: float, *edits: str) -> Path:
    """A state.db of the real Hermes: Telegram chat 42's topics 1 and 2 bound to sessions s1
    and s2 at ``stamp``, then ``edits`` made by hand."""
    source, hermes = _real_hermes(tmp_path)
    hermes.enable_telegram_topic_mode(chat_id="42", user_id="7")
    for thread, sid in (("1", "s1"), ("2", "s2")):
        hermes.create_session(sid, "telegram")
        hermes.bind_telegram_topic(
            chat_id="42", thread_id=thread, user_id="7", session_key=f"k{thread}", session_id=sid
        )
    hermes.close()
    _edit_source(source, f"UPDATE telegram_dm_topic_bindings SET updated_at = {stamp}", *edits)
    return source


def test_the_newest_binding_of_a_telegram_session_wins(store: SessionStore, tmp_path: Path) -> None:
    """A session is bound to one topic. After a switch to store mode, a binding made
    there that is newer than the source's stays (the source's, which it replaced, left
    deleted); one the source's is newer than gives way to it (Hermes bound the session
    anew). A flag PostgreSQL's column cannot hold is that row's problem, not the whole
    copy's."""
    from hermes_orm.integrations.hermes import SessionDB
    from hermes_orm.models import TelegramTopicBinding

    source = _two_bound_sessions(
        tmp_path,
        100,
        "INSERT INTO telegram_dm_topic_mode (chat_id, user_id, enabled, activated_at, updated_at,"
        " has_topics_enabled) VALUES ('43', '8', 1, 1, 1, 4294967296)",
    )
    first = import_state_db(source, store)
    assert set(first.invalid_rows) == {"telegram_dm_topic_mode ('43')"}
    assert "32-bit integer" in first.invalid_rows["telegram_dm_topic_mode ('43')"]
    assert SessionDB(store).is_telegram_topic_mode_enabled(chat_id="42", user_id="7")

    ours = SessionDB(store)
    for thread, sid, when in (("1", "s1", 200.0), ("2", "s2", 50.0)):  # store mode binds anew
        ours.delete_telegram_topic_binding(chat_id="42", thread_id=thread)
        ours.bind_telegram_topic(
            chat_id="42", thread_id=f"{thread}0", user_id="7", session_key="k", session_id=sid
        )
        with store.engine.begin() as conn:
            conn.execute(
                update(TelegramTopicBinding)
                .where(TelegramTopicBinding.session_id == sid)
                .values(updated_at=when)
            )
    # Hermes binds s2 anew (its terminal UI still on the state.db), after store mode did.
    _edit_source(
        source, "UPDATE telegram_dm_topic_bindings SET updated_at = 150 WHERE thread_id = '2'"
    )
    again = import_state_db(source, store)
    assert set(again.invalid_rows) == {"telegram_dm_topic_mode ('43')"}  # nothing else refused
    assert again.deleted_rows == ["telegram_dm_topic_bindings ('42', '1')"]
    assert again.settings_written == 1
    bound = {
        sid: ours.get_telegram_topic_binding_by_session(session_id=sid) for sid in ("s1", "s2")
    }
    assert (bound["s1"] or {})["thread_id"] == "10"  # store mode's, newer: kept
    assert (bound["s2"] or {})["thread_id"] == "2"  # the source's, newer: back
    assert ours.get_telegram_topic_binding(chat_id="42", thread_id="20") is None


def _import_while(
    store: SessionStore, source: Path, statement: str, meanwhile: Callable[[], Any]
) -> ImportReport:
    """Import ``source``, another writer doing ``meanwhile`` just before the import's first
    statement that begins with ``statement`` (which it must run)."""
    ran: list[bool] = []

    def hook(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        if sql.startswith(statement) and not ran:
            ran.append(True)
            meanwhile()

    event.listen(store.engine, "before_cursor_execute", hook)
    try:
        report = import_state_db(source, store)
    finally:
        event.remove(store.engine, "before_cursor_execute", hook)
    assert ran, f"the import ran no {statement}"
    return report


@pytest.mark.backends("postgresql")
def test_a_binding_a_gateway_makes_as_the_import_writes_is_reported_and_the_rest_copied(
    store: SessionStore, tmp_path: Path
) -> None:
    """A store-mode gateway binds a session to a topic just as the import writes the
    source's binding of it: that row is reported, and the other rows are copied."""
    from hermes_orm.integrations.hermes import SessionDB

    source, hermes = _real_hermes(tmp_path)
    hermes.enable_telegram_topic_mode(chat_id="42", user_id="7")
    hermes.create_session("s1", "telegram")
    hermes.bind_telegram_topic(
        chat_id="42", thread_id="1", user_id="7", session_key="k1", session_id="s1"
    )
    hermes.set_meta("goal:s1", "ship")
    hermes.close()
    gateway = SessionDB(fresh_store(store))
    report = _import_while(
        store,
        source,
        "INSERT INTO hermes_telegram_topic_bindings",
        lambda: gateway.bind_telegram_topic(
            chat_id="42", thread_id="9", user_id="7", session_key="k9", session_id="s1"
        ),
    )
    assert report.invalid_rows == {
        "telegram_dm_topic_bindings ('42', '1')": "its session 's1' was bound to another meanwhile"
    }
    assert SessionDB(store).get_meta("goal:s1") == "ship"
    assert SessionDB(store).get_telegram_topic_binding(chat_id="42", thread_id="9") is not None


@pytest.mark.backends("postgresql")
def test_a_binding_a_gateway_renews_as_the_import_replaces_it_stays(
    store: SessionStore, tmp_path: Path
) -> None:
    """The import replaces the destination's older binding of a session with the source's
    newer one; a gateway renews that older binding just before: the gateway's stays, and
    the source's row is reported (the binding was read before the gateway's write)."""
    from hermes_orm.integrations.hermes import SessionDB
    from hermes_orm.models import TelegramTopicBinding

    source, hermes = _real_hermes(tmp_path)
    hermes.enable_telegram_topic_mode(chat_id="42", user_id="7")
    hermes.create_session("s2", "telegram")
    hermes.bind_telegram_topic(
        chat_id="42", thread_id="20", user_id="7", session_key="k", session_id="s2"
    )
    hermes.close()
    _edit_source(source, "UPDATE telegram_dm_topic_bindings SET updated_at = 100")
    store.create_session("s2", source="telegram")
    ours = SessionDB(store)
    ours.enable_telegram_topic_mode(chat_id="42", user_id="7")
    ours.bind_telegram_topic(
        chat_id="42", thread_id="2", user_id="7", session_key="k", session_id="s2"
    )
    renew = update(TelegramTopicBinding).where(TelegramTopicBinding.session_id == "s2")
    with store.engine.begin() as conn:
        conn.execute(renew.values(updated_at=50))
    gateway = fresh_store(store)

    def renewed() -> None:
        with gateway.engine.begin() as conn:
            conn.execute(renew.values(updated_at=time.time()))

    report = _import_while(store, source, "DELETE FROM hermes_telegram_topic_bindings", renewed)
    assert report.invalid_rows == {
        "telegram_dm_topic_bindings ('42', '20')": "its session 's2' was bound to another meanwhile"
    }
    assert (ours.get_telegram_topic_binding_by_session(session_id="s2") or {})["thread_id"] == "2"
    gateway.close()


def test_a_topic_moved_to_another_session_frees_that_session_for_its_own_binding(
    store: SessionStore, tmp_path: Path
) -> None:
    """The source moved topic 1 from s2 to s1 and bound s2 to topic 2, both newer than the
    destination's binding of topic 1 to s2: both are copied, whatever their order (the
    second was refused as "bound meanwhile", s2 left bound nowhere)."""
    from hermes_orm.integrations.hermes import SessionDB
    from hermes_orm.models import TelegramTopicBinding

    source = _two_bound_sessions(tmp_path, 300)
    for sid in ("s1", "s2"):
        store.create_session(sid, source="telegram")
    ours = SessionDB(store)
    ours.enable_telegram_topic_mode(chat_id="42", user_id="7")
    ours.bind_telegram_topic(
        chat_id="42", thread_id="1", user_id="7", session_key="k", session_id="s2"
    )
    with store.engine.begin() as conn:
        conn.execute(update(TelegramTopicBinding).values(updated_at=100))
    report = import_state_db(source, store)
    assert report.ok, report.table()
    by_session = ours.get_telegram_topic_binding_by_session
    assert [(by_session(session_id=sid) or {}).get("thread_id") for sid in ("s1", "s2")] == [
        "1",
        "2",
    ]


def _large_outputs(tmp_path: Path, count: int, chars: int) -> Path:
    """A state.db the real Hermes wrote: session "big" of ``count`` tool outputs of
    ``chars`` characters, and session "small" of two short messages."""
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("big", source="cli")
    for i in range(count):
        hermes.append_message(
            "big", "tool", content=f"{i:03}" + "o" * chars, tool_call_id=f"c{i}", tool_name="read"
        )
    hermes.create_session("small", source="cli")
    hermes.append_message("small", "user", content="hi")
    hermes.append_message("small", "assistant", content="hello")
    hermes.close()
    return source


def test_the_records_of_an_import_fit_a_sqlite_of_999_parameters_a_statement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 sessions and 300 routing entries recorded (four values a record) on a SQLite
    taking 999 parameters a statement (before 3.32): 500 records went in one INSERT,
    refused once everything else was written."""
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    source, hermes = _real_hermes(tmp_path)
    for i in range(300):
        hermes.create_session(f"s{i}", source="cli")
        hermes.append_message(f"s{i}", "user", content="hi")
        hermes.save_gateway_routing_entry(f"k{i}", "{}")
    hermes.close()
    engine = create_store_engine(f"sqlite:///{tmp_path / 'small.db'}")

    @event.listens_for(engine, "connect")
    def bounded(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    with SessionStore(engine) as store:
        store.upgrade()
        report = import_state_db(source, store)
        assert report.ok, report.table()
        with engine.connect() as conn:
            kinds = conn.execute(
                text("SELECT kind, count(*), count(version) FROM hermes_imported GROUP BY kind")
            ).all()
    assert sorted(map(tuple, kinds)) == [("gateway_routing", 300, 300), ("session", 300, 0)]
    engine.dispose()


def test_a_batch_of_large_messages_ends_at_its_bound_in_text(
    store: SessionStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    """Tool outputs of megabytes: a batch (a transaction, and what the import holds in
    memory a few at a time) ends once its messages hold BATCH_BYTES of text, however
    few they are. It ended at 8,000 messages only: 400 outputs of 1 MB held 600 MB."""
    monkeypatch.setattr(importer, "BATCH_BYTES", 250_000)
    source = _large_outputs(tmp_path, 12, 100_000)
    batches: list[tuple[str, int]] = []
    report = import_state_db(source, store, on_batch=lambda *b: batches.append(b))
    assert report.ok
    assert [cursor for sid, cursor in batches if sid == "big"] == [3, 6, 9, 12]
    assert ("small", 2) in batches
    assert_same_as_source(store, source)


def test_a_session_split_by_its_bytes_is_checked_whole_before_its_first_batch(
    store: SessionStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    """A session longer than one batch by its text, not its count: a message it cannot
    take near its end still leaves nothing of the session written."""
    monkeypatch.setattr(importer, "BATCH_BYTES", 250_000)
    source = _large_outputs(tmp_path, 12, 100_000)
    _a_message_no_store_takes(source, "big")
    report = import_state_db(source, store)
    assert set(report.invalid_sessions) == {"big"}
    assert store.get_session("big") is None
    assert [m["content"] for m in store.get_messages("small")] == ["hi", "hello"]


def test_a_batch_of_large_rows_after_many_short_ones_stays_near_its_bound(
    tmp_path: Path,
) -> None:
    """300 short messages, then 100 of 1,000 characters: the rows so far say nothing of
    the next ones, so a fetch takes at most _FETCH_ROWS of them, sized by the largest so
    far. As many rows as so far (up to 256) were fetched at once: all 100 large ones."""
    source, hermes = _real_hermes(tmp_path)
    hermes.create_session("s", source="cli")
    for i in range(400):
        hermes.append_message("s", "tool", content=f"{i:03}" + "o" * (1_000 if i >= 300 else 0))
    hermes.close()
    src = importer.open_source(source)
    columns = importer.MessageColumns.of(src.columns("messages"))
    with src.snapshot():
        batches = list(src.batches(columns.read_many, "s", start=0, size=500, max_bytes=5_000))
    src.close()
    content = columns.names.index("content")
    texts = [sum(len(row[content]) for row in rows) for rows, _ in batches]
    assert sum(len(rows) for rows, _ in batches) == 400
    assert max(texts) <= 5_000 + importer._FETCH_ROWS * 1_003 < 100 * 1_003


def test_the_verification_reads_the_last_messages_a_batch_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every session's last message is read to check the copy, each one possibly a large
    output: a batch at a time (its bound in text), not all at once."""
    import tracemalloc

    monkeypatch.setattr(importer, "BATCH_BYTES", 200_000)
    source, hermes = _real_hermes(tmp_path)
    for i in range(30):
        hermes.create_session(f"s{i}", source="cli")
        hermes.append_message(f"s{i}", "tool", content=f"{i:03}" + "o" * 100_000)
    hermes.close()
    src = importer.open_source(source)
    tracemalloc.start()
    try:
        with src.snapshot():
            digests = importer._last_digests(src, [f"s{i}" for i in range(30)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        src.close()
    assert sorted(digests) == sorted(f"s{i}" for i in range(30))
    assert None not in digests.values()
    assert peak < 1_500_000  # (all 30 at once: over 3,000,000)


def test_the_source_reads_a_batch_a_few_rows_at_a_time_up_to_its_bound(
    tmp_path: Path,
) -> None:
    """``Source.batches`` fetches one row, then as many as the ones so far say fit in
    what is left: a batch of large rows stops near the bound, and says whether more
    may follow (a full one may be the last: the next is then empty; one that ends
    the ``count`` asked for says none)."""
    source = _large_outputs(tmp_path, 7, 1_000)
    src = importer.open_source(source)
    columns = importer.MessageColumns.of(src.columns("messages"))
    with src.snapshot():
        by_bytes = list(src.batches(columns.read_many, "big", start=0, size=100, max_bytes=2_500))
        by_count = list(src.batches(columns.read_many, "big", start=1, size=3, max_bytes=10**9))
        counted = list(src.batches(columns.read_many, "big", start=0, count=6, size=3))
    src.close()
    assert [(len(rows), more) for rows, more in by_bytes] == [(3, True), (3, True), (1, False)]
    assert [(len(rows), more) for rows, more in by_count] == [(3, True), (3, True), (0, False)]
    assert [(len(rows), more) for rows, more in counted] == [(3, True), (3, False)]
    contents = [row[columns.names.index("content")][:3] for rows, _ in by_bytes for row in rows]
    assert contents == [f"{i:03}" for i in range(7)]
