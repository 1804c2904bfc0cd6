"""``hermes-orm verify``: every invariant checked over a database; --repair never deletes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.pool import NullPool

import hermes_orm
from hermes_orm import (
    DatabaseError,
    RetryPolicy,
    SessionNotFoundError,
    SessionStore,
    search,
    verify,
)
from hermes_orm.verify import _check_orphans, verify_database
from tests.conftest import count_rows, fresh_store, listening, run_cli, table_name
from tests.test_cli import clean_env
from tests.test_flush import conversation

pytestmark = pytest.mark.apis("sync")  # verify runs on a SessionStore


def _breakage(engine: Engine) -> None:
    """Break every invariant verify checks, as a bug or a hand edit would, below the store."""
    with engine.begin() as conn:
        sql = conn.exec_driver_sql
        if engine.dialect.name == "sqlite":
            sql("PRAGMA foreign_keys=OFF")
            one = "SELECT rowid FROM hermes_search_cjk LIMIT 1"
            sql(f"DELETE FROM hermes_search_cjk WHERE rowid IN ({one})")
        else:
            sql("SET session_replication_role = replica")  # no foreign key checks
            sql("UPDATE hermes_messages SET search_vector = NULL WHERE session_id = 'holes'")
        sql("UPDATE hermes_messages SET idx = idx + 10 WHERE session_id = 'holes' AND idx >= 2")
        sql("UPDATE hermes_sessions SET flushed_idx = 2 WHERE id = 'cursor'")
        sql(
            "UPDATE hermes_sessions SET message_count = 99, tool_call_count = 7 WHERE id = 'counts'"
        )
        edit = "UPDATE hermes_messages SET content = 'edited by hand'"
        sql(f"{edit} WHERE session_id = 'digest' AND idx = 0")
        sql("UPDATE hermes_sessions SET flushed_digest = NULL WHERE id = 'last'")
        sql("UPDATE hermes_sessions SET parent_session_id = 'gone' WHERE id = 'orphan'")
        sql("UPDATE hermes_sessions SET parent_session_id = 'loop-b' WHERE id = 'loop-a'")
        sql("UPDATE hermes_sessions SET parent_session_id = 'loop-a' WHERE id = 'loop-b'")


#: The sessions :func:`_populate` makes, each broken its own way (but ``fine``).
_SESSIONS = ("holes", "cursor", "counts", "digest", "last", "orphan", "loop-a", "loop-b", "fine")


def _populate(store: SessionStore) -> dict[str, list[dict[str, Any]]]:
    lists = {}
    for sid in _SESSIONS:
        store.create_session(sid, source="cli")
        lists[sid] = [*conversation(2, sid), {"role": "user", "content": f"检索历史 {sid}"}]
        store.flush(sid, lists[sid])
    return lists


def test_a_sound_database_verifies(store: SessionStore, db_url: str, tmp_path: Path) -> None:
    _populate(store)
    report = verify_database(store)
    assert (report.ok, report.sessions, report.messages, report.problems) == (True, 9, 63, [])
    result = run_cli("verify", "--json", "--url", db_url, env=clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True


def test_every_broken_invariant_is_found_and_repair_deletes_nothing(
    store: SessionStore, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    lists = _populate(store)
    _breakage(engine)
    env = clean_env(tmp_path)
    found = run_cli("verify", "--json", "--url", db_url, env=env)
    assert found.returncode == 1
    problems = {(p["check"], p["session_id"]) for p in json.loads(found.stdout)["problems"]}
    assert problems == {
        ("positions", "holes"),
        ("cursor", "cursor"),
        ("message_count", "counts"),
        ("tool_call_count", "counts"),
        ("digest", "digest"),
        ("flushed_digest", "last"),
        ("parent", "orphan"),
        ("lineage", "loop-a"),
        ("search", None),
    }
    messages = count_rows(engine, "hermes_messages")

    def histories() -> dict[str, int]:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT id, history_id FROM hermes_sessions")
            return dict(rows.all())  # type: ignore[arg-type]

    before = histories()
    repaired = run_cli("verify", "--repair", "--url", db_url, env=env)
    assert "(repaired)" in repaired.stdout
    assert repaired.returncode == 1  # the lineage loop is the application's to break
    assert count_rows(engine, "hermes_messages") == messages  # nothing deleted
    after = verify_database(store)
    assert [(p.check, p.session_id) for p in after.problems] == [("lineage", "loop-a")]
    # A session whose cursor or digests were set again is another history for every store.
    drawn = {sid for sid, history in histories().items() if history != before[sid]}
    assert drawn == {"holes", "cursor", "counts", "digest", "last"}

    # What was derived is right again: each session continues exactly (for a store that
    # starts afresh: this one's copies predate the edit made below it).
    store = fresh_store(store)
    for sid, msgs in lists.items():
        stored = store.get_messages(sid)
        if sid == "digest":
            msgs[0] = {**msgs[0], "content": "edited by hand"}  # the row holds the edit
        assert stored == msgs, sid
        assert store.flush(sid, [*msgs, {"role": "user", "content": "more"}]).written == 1
    assert store.search("edited").hits[0].session_id == "digest"
    assert {h.session_id for h in store.search("question").hits} >= {"holes"}


def _rows(engine: Engine) -> list[tuple[Any, ...]]:
    """Every message row as stored (ids, positions and contents), for before/after checks."""
    with engine.connect() as conn:
        return list(
            conn.exec_driver_sql(
                "SELECT id, session_id, role, content, extra, key_order, tool_calls, token_count"
                " FROM hermes_messages ORDER BY id"
            ).all()
        )


#: One damage per session, as a hand edit or another tool could leave it (SQLite stores
#: any type in any column): (session, statement, check reported, repaired).
_DAMAGE = [
    (
        "digest-text",
        "UPDATE hermes_messages SET digest = 'abc' WHERE {s} AND idx = 1",
        "digest",
        True,
    ),
    (
        "last-text",
        "UPDATE hermes_sessions SET flushed_digest = 'abc' WHERE id = '{sid}'",
        "flushed_digest",
        True,
    ),
    (  # (text, not UTF-8: sqlite3 refused to fetch it, the session left unchecked)
        "digest-cast",
        "UPDATE hermes_messages SET digest = CAST(digest AS TEXT) WHERE {s} AND idx = 1",
        "digest",
        True,
    ),
    (
        "last-cast",
        "UPDATE hermes_sessions SET flushed_digest = CAST(X'FF00FE' AS TEXT) WHERE id = '{sid}'",
        "flushed_digest",
        True,
    ),
    (
        "cursor-cast",
        "UPDATE hermes_sessions SET flushed_idx = CAST(X'FF' AS TEXT) WHERE id = '{sid}'",
        "cursor",
        True,
    ),
    ("idx-real", "UPDATE hermes_messages SET idx = 5.5 WHERE {s} AND idx = 6", "positions", True),
    ("idx-text", "UPDATE hermes_messages SET idx = 'x' WHERE {s} AND idx = 6", "positions", False),
    (
        "idx-text-1",
        "UPDATE hermes_messages SET idx = 'x' WHERE {s} AND idx = 1",
        "positions",
        False,
    ),
    (
        "extra-bad",
        "UPDATE hermes_messages SET extra = '{{bad' WHERE {s} AND idx = 0",
        "message",
        False,
    ),
    (
        "extra-list",
        "UPDATE hermes_messages SET extra = '[1, 2]' WHERE {s} AND idx = 0",
        "message",
        False,
    ),
    (
        "extra-number",
        "UPDATE hermes_messages SET extra = '5' WHERE {s} AND idx = 0",
        "message",
        False,
    ),
    (
        "calls-deep",
        "UPDATE hermes_messages SET tool_calls = '"
        + "[" * 5000
        + "]" * 5000
        + "' WHERE {s} AND idx = 1",
        "message",
        False,
    ),
    (
        "order-deep",
        "UPDATE hermes_messages SET key_order = '"
        + "[" * 5000
        + "]" * 5000
        + "' WHERE {s} AND idx = 0",
        "message",
        False,
    ),
    (
        "order-bad",
        """UPDATE hermes_messages SET key_order = '["role", "zzz"]' WHERE {s} AND idx = 0""",
        "message",
        False,
    ),
    (
        "role-bad",
        "UPDATE hermes_messages SET role = 'bogus' WHERE {s} AND idx = 0",
        "message",
        False,
    ),
    (
        "tokens-text",
        "UPDATE hermes_messages SET token_count = 'lots' WHERE {s} AND idx = 0",
        "message",
        False,
    ),
    (
        "calls-bad",
        "UPDATE hermes_messages SET tool_calls = '[{{' WHERE {s} AND idx = 1",
        "message",
        False,
    ),
]


@pytest.mark.backends("sqlite")  # PostgreSQL's column types refuse these rows
def test_a_damaged_row_is_its_sessions_problem_and_the_others_are_checked(
    store: SessionStore, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    for sid, *_ in _DAMAGE:
        store.create_session(sid, source="cli")
        store.flush(sid, [*conversation(2, sid), {"role": "user", "content": "last"}])
    store.create_session("zz-after", source="cli")  # checked after every damaged one
    store.flush("zz-after", conversation(1))
    with engine.begin() as conn:
        for sid, statement, *_ in _DAMAGE:
            conn.exec_driver_sql(statement.format(s=f"session_id = '{sid}'", sid=sid))
        conn.exec_driver_sql("UPDATE hermes_sessions SET message_count = 99 WHERE id = 'zz-after'")
    before = _rows(engine)
    env = clean_env(tmp_path)

    found = run_cli("verify", "--json", "--url", db_url, env=env)
    assert (found.returncode, found.stderr) == (1, "")
    report = json.loads(found.stdout)
    assert report["sessions"] == len(_DAMAGE) + 1
    problems = {(p["session_id"], p["check"]): p["detail"] for p in report["problems"]}
    for sid, _, check, _ in _DAMAGE:
        assert (sid, check) in problems, sid
    assert ("zz-after", "message_count") in problems
    assert "position 0 (id " in problems["role-bad", "message"]
    assert "unknown role 'bogus'" in problems["role-bad", "message"]
    assert "nothing was written" not in problems["role-bad", "message"]
    assert "extra is not valid JSON" in problems["extra-bad", "message"]
    assert "tool_calls is not valid JSON" in problems["calls-bad", "message"]
    assert "key_order names 'zzz'" in problems["order-bad", "message"]
    assert "tool_calls is JSON nested too deep" in problems["calls-deep", "message"]
    assert "key_order is JSON nested too deep" in problems["order-deep", "message"]
    assert "stored as str" in problems["digest-text", "digest"]
    assert "stored as str" in problems["digest-cast", "digest"]
    assert "not whole numbers: ['x']" in problems["idx-text", "positions"]  # (ASCII as is)
    assert problems["cursor-cast", "cursor"] == "flushed_idx is X'FF', 7 messages are stored"
    # Which message is last is unknown while a position is no number: not judged.
    assert ("idx-text-1", "flushed_digest") not in problems

    repaired = run_cli("verify", "--json", "--repair", "--url", db_url, env=env)
    assert (repaired.returncode, repaired.stderr) == (1, "")
    done = {(p["session_id"], p["check"]): p for p in json.loads(repaired.stdout)["problems"]}
    for sid, _, check, fixed in _DAMAGE:
        assert done[sid, check]["repaired"] is fixed, sid
        if check == "message":
            assert "not repaired" in done[sid, check]["detail"]
    assert done["zz-after", "message_count"]["repaired"] is True
    assert ("idx-text-1", "flushed_digest") not in done  # (nor "repaired" by a guess)
    after = _rows(engine)  # no message deleted, none rewritten
    assert [row[:1] + row[2:] for row in after] == [row[:1] + row[2:] for row in before]
    left = verify_database(store)
    assert {p.session_id for p in left.problems} == {
        sid for sid, _, _, fixed in _DAMAGE if not fixed
    }
    assert store.get_messages("digest-text") == fresh_store(store).get_messages("digest-text")


def test_json_nested_too_deep_is_that_message_s_problem_and_the_rest_is_checked(
    store: SessionStore, engine: Engine
) -> None:
    """Other SQL stored tool calls nested deeper than Python's parser goes (PostgreSQL's
    json takes them): the message at fault is named, and the session's other damage
    is found and repaired all the same."""
    store.create_session("deep", source="cli")
    store.flush("deep", conversation(2, "deep"))
    deep = "[" * 3000 + "]" * 3000
    with engine.begin() as conn:
        conn.execute(
            text(
                f"UPDATE {table_name(engine, 'hermes_messages')} SET tool_calls = :deep "
                "WHERE session_id = 'deep' AND idx = 1"
            ),
            {"deep": deep},
        )
        conn.exec_driver_sql(
            f"UPDATE {table_name(engine, 'hermes_sessions')} SET message_count = 99 "
            "WHERE id = 'deep'"
        )

    for repair in (False, True):
        report = verify_database(store, repair=repair)
        problems = {p.check: p for p in report.problems if p.session_id == "deep"}
        assert set(problems) == {"message", "message_count"}, report.problems
        assert "position 1 (id " in problems["message"].detail
        assert "tool_calls is JSON nested too deep" in problems["message"].detail
        assert problems["message_count"].repaired is repair
    left = verify_database(store)
    assert [p.check for p in left.problems] == ["message"]


def test_damage_verify_reads_past_leaves_the_session_checked_and_each_message_s_named(
    store: SessionStore, engine: Engine
) -> None:
    """Other SQL damaged what verify has no check of: a sessions column (JSON nested
    deeper than Python's parser goes), a key_order holding a list, tool calls stored as
    JSON null that the key order names. The session is checked all the same (its wrong
    message count found and repaired), and each damage is said in words (the sessions
    column's too: the store cannot read the row)."""
    store.create_session("s", source="cli")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    store.flush(
        "s",
        [  # keys out of the read order: each row keeps its key_order
            {"content": "hi", "role": "user"},
            {"tool_calls": [call], "role": "assistant", "content": ""},
            {"role": "tool", "content": "done", "tool_call_id": "c1"},
        ],
    )
    messages, sessions = (
        table_name(engine, "hermes_messages"),
        table_name(engine, "hermes_sessions"),
    )
    with engine.begin() as conn:
        for statement, value in (
            (
                f"UPDATE {sessions} SET extra = :v, message_count = 9 WHERE id = 's'",
                "[" * 3000 + "]" * 3000,
            ),
            (
                f"UPDATE {messages} SET key_order = :v WHERE session_id = 's' AND idx = 0",
                '["role", ["x"]]',
            ),
            (f"UPDATE {messages} SET tool_calls = :v WHERE session_id = 's' AND idx = 1", "null"),
            (f"UPDATE {messages} SET extra = :v WHERE session_id = 's' AND idx = 2", "null"),
        ):
            conn.execute(text(statement), {"v": value})

    for repair in (False, True):
        report = verify_database(store, repair=repair)
        assert {p.check for p in report.problems} == {"session", "message", "message_count"}
        assert [p.repaired for p in report.problems if p.check == "message_count"] == [repair]
        (row,) = [p for p in report.problems if p.check == "session"]
        assert "the session's row holds a value that cannot be read (RecursionError" in row.detail
        assert not row.repaired
        said = [p.detail for p in report.problems if p.check == "message"]
        assert len(said) == 2  # (extra's JSON null reads as no extra keys: no damage)
        assert "position 0 (id " in said[0]
        assert "key_order holds ['x'], which is no key" in said[0]
        assert "position 1 (id " in said[1]
        assert (
            "key_order names 'tool_calls', which the row does not hold (its column holds JSON null)"
            in said[1]
        )
    assert {p.check for p in verify_database(store).problems} == {"session", "message"}


@pytest.mark.backends("sqlite")
def test_text_that_is_not_utf8_is_that_message_s_problem_and_the_rest_is_checked(
    store: SessionStore, engine: Engine
) -> None:
    """Other SQL stored bytes that are no UTF-8 as a message's text, which sqlite3
    refuses to fetch: the message is named, the session's other damage found."""
    store.create_session("bytes", source="cli")
    store.flush("bytes", conversation(2, "bytes"))
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE hermes_messages SET content = CAST(X'66FF6F' AS TEXT) "
            "WHERE session_id = 'bytes' AND idx = 2"
        )
        conn.exec_driver_sql("UPDATE hermes_sessions SET message_count = 99 WHERE id = 'bytes'")

    for repair in (False, True):
        report = verify_database(store, repair=repair)
        problems = {p.check: p for p in report.problems}
        assert set(problems) == {"message", "message_count"}, report.problems
        assert "position 2 (id " in problems["message"].detail
        assert "Could not decode to UTF-8 column 'content'" in problems["message"].detail
        assert problems["message_count"].repaired is repair
        assert report.messages == 6
    assert [p.check for p in verify_database(store).problems] == ["message"]


@pytest.mark.backends("sqlite")
def test_a_large_position_costs_no_memory_of_its_size(
    store: SessionStore, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    store.create_session("far", source="cli")
    store.flush("far", conversation(1))
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE hermes_messages SET idx = 1000000000000 WHERE idx = 2")
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31)); "
    cli = f"{limit}from hermes_orm.cli import main; raise SystemExit(main())"
    result = subprocess.run(
        [sys.executable, "-c", cli, "verify", "--json", "--url", db_url],
        capture_output=True,
        text=True,
        env=clean_env(tmp_path),
        check=False,
        timeout=120,
    )
    assert (result.returncode, result.stderr) == (1, "")
    (problem,) = json.loads(result.stdout)["problems"]
    assert problem["check"] == "positions"
    assert f"holes at {list(range(2, 12))}" in problem["detail"]


def _search_checks(report: Any) -> list[tuple[str, bool]]:
    return [(p.detail, p.repaired) for p in report.problems if p.check == "search"]


@pytest.mark.backends("sqlite")
def test_the_main_search_index_is_checked_row_by_row(
    store: SessionStore, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    lists = _populate(store)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO hermes_search(hermes_search) VALUES ('delete-all')")
    assert store.search("question").hits == []
    result = run_cli("verify", "--url", db_url, env=clean_env(tmp_path))
    assert result.returncode == 1
    assert "63 messages are missing from hermes_search" in result.stdout
    assert "hermes_search holds 0 rows, 63 messages are stored" in result.stdout

    repaired = verify_database(store, repair=True)
    assert repaired.ok
    assert _search_checks(repaired)
    assert all(fixed for _, fixed in _search_checks(repaired))
    assert verify_database(store).problems == []
    assert {h.session_id for h in store.search("question").hits} == set(lists)

    # A row for a message that is gone (its delete skipped the index) and a message
    # missing (inserted around it), the row count staying right.
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO hermes_search(rowid, body) VALUES (9999, 'ghost')")
        conn.exec_driver_sql(
            "INSERT INTO hermes_search(hermes_search, rowid, body) SELECT 'delete', id, body"
            " FROM hermes_search_source WHERE id = (SELECT min(id) FROM hermes_messages)"
        )
    details = [detail for detail, _ in _search_checks(verify_database(store))]
    assert details == [
        "hermes_search indexes 1 messages that are gone (ids [9999])",
        "1 messages are missing from hermes_search (ids [1])",
    ]
    assert verify_database(store, repair=True).ok
    assert verify_database(store).problems == []


@pytest.mark.backends("sqlite")
def test_a_main_search_index_whose_averages_record_other_sql_wrote_is_rebuilt(
    store: SessionStore, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """FTS5 keeps a blob in that record: text there was a TypeError out of verify (and
    --repair), where it is a problem a rebuild repairs."""
    lists = _populate(store)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE hermes_search_data SET block = 'garbage' WHERE id = 1")
    env = clean_env(tmp_path)
    found = run_cli("verify", "--json", "--url", db_url, env=env)
    assert found.returncode == 1, found.stderr
    details = [p["detail"] for p in json.loads(found.stdout)["problems"]]
    assert "hermes_search's averages record holds str data, not FTS5's" in details
    repaired = run_cli("verify", "--repair", "--url", db_url, env=env)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert run_cli("verify", "--url", db_url, env=env).returncode == 0
    assert {h.session_id for h in store.search("question").hits} == set(lists)


@pytest.mark.backends("sqlite")
def test_a_cjk_index_with_damaged_text_is_rebuilt_for_real(
    store: SessionStore, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    _populate(store)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE hermes_search_cjk_content SET c0 = 'garbage'")
    env = clean_env(tmp_path)
    assert run_cli("verify", "--url", db_url, env=env).returncode == 1
    repaired = run_cli("verify", "--repair", "--url", db_url, env=env)
    assert repaired.returncode == 0, repaired.stdout
    again = run_cli("verify", "--url", db_url, env=env)
    assert again.returncode == 0, again.stdout
    assert {h.session_id for h in store.search("检索历史").hits} == set(_SESSIONS)


def test_a_repair_is_marked_only_when_the_recheck_finds_it_gone(
    store: SessionStore, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _populate(store)
    _breakage(engine)
    # Inject failures: closing up positions and rebuilding the index do nothing.
    monkeypatch.setattr(verify, "_close_up", lambda *args: None)
    monkeypatch.setattr(search, "rebuild", lambda conn: 0)
    report = verify_database(store, repair=True)
    marked = {(p.check, p.session_id): p.repaired for p in report.problems}
    assert marked["positions", "holes"] is False
    assert marked["search", None] is False
    assert marked["cursor", "cursor"] is True  # these repairs did work
    assert marked["digest", "digest"] is True
    assert not report.ok


@pytest.mark.backends("sqlite")  # PostgreSQL's foreign keys keep them out
def test_messages_of_no_session_are_reported_and_kept(
    store: SessionStore, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    _populate(store)
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.exec_driver_sql("DELETE FROM hermes_sessions WHERE id IN ('fine', 'last')")
    messages = count_rows(engine, "hermes_messages")
    for args in (("verify", "--json"), ("verify", "--json", "--repair")):
        result = run_cli(*args, "--url", db_url, env=clean_env(tmp_path))
        assert result.returncode == 1
        problems = json.loads(result.stdout)["problems"]
        assert [(p["check"], p["session_id"], p["repaired"]) for p in problems] == [
            ("orphans", "fine", False),
            ("orphans", "last", False),
        ]
        assert problems[0]["detail"].startswith(
            "7 messages belong to session 'fine', which does not exist; not repaired"
        )
        assert count_rows(engine, "hermes_messages") == messages
    # They would read as a new session's of that id, whoever made it: refused, nothing made.
    for create in (store.create_session, store.ensure_session):
        with pytest.raises(DatabaseError, match="messages of a deleted session of that id"):
            create("fine", "cli")
    assert store.get_session("fine") is None
    with pytest.raises(DatabaseError, match="restore its session row or delete them"):
        store.for_user("bob").create_session("last", "cli")
    assert count_rows(engine, "hermes_sessions") == len(_SESSIONS) - 2
    store.create_session("new", "cli")  # an id no orphan holds
    # Nor are they read as the messages of a session of that id: there is none.
    for read in (store.get_messages, store.for_user("bob").get_messages):
        with pytest.raises(SessionNotFoundError):
            read("fine")


def _between_reading_the_links_and_the_rest(store: SessionStore, then: Any) -> None:
    """Run ``then()`` once, from another connection, right after verify read the parent links."""
    _once_after(store, "parent_session_id IS NOT NULL", then)


def _once_after(store: SessionStore, marker: str, then: Any) -> list[bool]:
    """Run ``then()`` once, right after ``store`` ran a statement holding ``marker``.

    Returns a list that holds True once it ran.
    """
    done: list[bool] = []

    def after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if marker in statement and not done:
            done.append(True)
            then()

    event.listen(store.engine, "after_cursor_execute", after)
    return done


def test_a_flush_landing_while_a_session_is_checked_is_neither_blocked_nor_a_problem(
    store: SessionStore, db_url: str
) -> None:
    """The check reads the session row, then its messages: it locks nothing (an agent
    writing it, or on SQLite any session, goes on), and reads them at one moment (the
    flush is not seen half: a cursor past the messages read)."""
    messages = conversation(4)
    store.create_session("s", source="cli")
    store.flush("s", messages[:2])
    agent = SessionStore(db_url, retry=RetryPolicy(attempts=1))  # (a wait would fail it)
    done = _once_after(
        store,
        "AS flushed_digest",  # (the read of the columns checked; in a schema too)
        lambda: agent.flush("s", messages),
    )
    try:
        report = verify_database(store)
    finally:
        agent.close()
    assert done == [True]
    assert report.problems == []
    assert report.messages == 2  # the moment before the flush
    after = verify_database(store)
    assert (after.problems, after.messages) == ([], len(messages))


@pytest.mark.backends("sqlite")  # (PostgreSQL's column types refuse these values)
@pytest.mark.parametrize("column", ["tool_call_count", "flushed_digest"])
def test_a_counter_the_store_cannot_read_is_said_while_its_check_cannot_run(
    store: SessionStore, engine: Engine, column: str
) -> None:
    """Text that is not UTF-8 in a column checked against the messages, which cannot be
    checked while a message is unreadable: still reported (not repaired: nothing to set
    it from), where it went unsaid and the store's reads of the session kept failing."""
    store.create_session("s", source="cli")
    store.flush("s", conversation(2))
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE hermes_messages SET tool_calls = '{bad' WHERE session_id = 's' AND idx = 5"
        )
        conn.exec_driver_sql(f"UPDATE hermes_sessions SET {column} = CAST(X'FF' AS TEXT)")
    report = verify_database(store, repair=True)
    found = {p.check: p for p in report.problems}
    assert found["message"].repaired is False
    assert found[column].repaired is False
    assert "X'FF'" in found[column].detail


@pytest.mark.backends("postgresql")
def test_the_orphan_check_stays_a_join_past_the_memory_of_a_hashed_list(
    store: SessionStore, engine: Engine
) -> None:
    """Messages whose session is missing are found by an anti-join. ``NOT IN (SELECT id
    ...)`` is hashed only while the ids fit in ``work_mem`` (times hash_mem_multiplier);
    past that PostgreSQL reads every id again for each message: 200,000 sessions took
    over 90 s on the default 4 MB. Here 5,000 sessions outgrow a 64 kB ``work_mem``."""
    store.create_session("s", source="cli")
    store.flush("s", conversation(1))
    sessions = table_name(engine, "hermes_sessions")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"INSERT INTO {sessions} (id, source, started_at) "
            "SELECT 'g' || i, 'cli', 1 FROM generate_series(1, 5000) i"
        )
        conn.exec_driver_sql(f"ANALYZE {sessions}")
    ran: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        ran.append((statement, params))

    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL work_mem = '64kB'")
        with listening(engine, "before_cursor_execute", seen):
            assert _check_orphans(conn) == []
        statement, params = ran[-1]
        plan = [row[0] for row in conn.exec_driver_sql(f"EXPLAIN {statement}", params)]
    assert any("Anti Join" in line for line in plan), plan
    assert not any("SubPlan" in line for line in plan), plan


@pytest.mark.backends("postgresql")  # (SQLite's write lock keeps writers out meanwhile)
def test_a_parent_deleted_as_verify_reads_the_links_is_no_missing_parent(
    store: SessionStore, db_url: str
) -> None:
    """Each statement of a transaction sees its own moment on PostgreSQL: links read in
    one, the sessions in another, would take a parent deleted in between for one missing."""
    store.create_session("parent", source="cli")
    store.create_session("child", source="cli", parent_session_id="parent")
    agent = SessionStore(db_url)
    _between_reading_the_links_and_the_rest(store, lambda: agent.delete_session("parent"))
    report = verify_database(store)
    agent.close()
    assert report.problems == []
    assert store.get_session("child")["parent_session_id"] is None  # type: ignore[index]
    assert verify_database(store).ok


@pytest.mark.backends("postgresql")
def test_a_repair_unlinks_a_missing_parent_only_if_the_link_still_names_it(
    store: SessionStore, engine: Engine
) -> None:
    """An agent links the child to a parent that exists while the repair runs: kept."""
    store.create_session("child", source="cli")
    store.create_session("new-parent", source="cli")
    with engine.begin() as conn:
        conn.exec_driver_sql("SET session_replication_role = replica")  # no foreign key checks
        conn.exec_driver_sql(
            "UPDATE hermes_sessions SET parent_session_id = 'gone' WHERE id = 'child'"
        )

    def relink() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE hermes_sessions SET parent_session_id = 'new-parent' WHERE id = 'child'"
            )

    _between_reading_the_links_and_the_rest(store, relink)
    report = verify_database(store, repair=True)
    assert [p for p in report.problems if p.check == "parent"] == []
    assert store.get_session("child")["parent_session_id"] == "new-parent"  # type: ignore[index]
    assert verify_database(store).ok


def test_rows_of_another_shape_are_read_as_a_database_error_naming_them(
    store: SessionStore, engine: Engine
) -> None:
    """JSON of the wrong shape (a list for the extra keys, an object for their order), a
    digest of text: a DatabaseError naming the session, where a TypeError or KeyError was."""
    for sid in ("a", "b", "c"):
        store.create_session(sid, source="cli")
        store.flush(sid, [{"role": "user", "content": "hi"}])
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE hermes_messages SET extra = '[1, 2]' WHERE session_id = 'a'")
        conn.exec_driver_sql(
            """UPDATE hermes_messages SET key_order = '{"a": 1}' WHERE session_id = 'c'"""
        )
    for sid in ("a", "c"):
        with pytest.raises(DatabaseError, match=f"session '{sid}': the message at position 0"):
            store.get_messages(sid)
    assert verify_database(store).problems  # and verify names them too
    if engine.dialect.name == "sqlite":  # (PostgreSQL's bytea column takes no text)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE hermes_sessions SET flushed_digest = 'abc' WHERE id = 'b'")
        with pytest.raises(DatabaseError, match="session 'b' holds a flushed_digest of type str"):
            store.list_sessions()
        with pytest.raises(DatabaseError, match="verify --repair"):
            store.get_session("b")


def test_a_history_id_other_sql_set_to_no_64_bit_integer_is_refused_then_repaired(
    store: SessionStore, engine: Engine
) -> None:
    """Typed where a ValueError, an OverflowError or the store's internal retry signal was."""
    values = ["-1"] + (["'h'", "1.5", "1e30"] if engine.dialect.name == "sqlite" else [])
    first = [{"role": "user", "content": "hi"}]
    for n, value in enumerate(values):
        sid = f"s{n}"
        store.create_session(sid, source="cli")
        store.flush(sid, first)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"UPDATE hermes_sessions SET history_id = {value} WHERE id = '{sid}'"
            )
        fresh = SessionStore(engine)  # (no copy of its own of the session)
        with pytest.raises(DatabaseError, match=f"session '{sid}' holds history_id"):
            fresh.flush(sid, [*first, {"role": "user", "content": "more"}])
        with pytest.raises(DatabaseError, match="verify --repair"):
            fresh.append(sid, {"role": "user", "content": "more"})
        assert fresh.get_messages(sid) == first  # nothing written
    found = verify_database(store, repair=True).problems
    assert sorted((p.check, p.session_id, p.repaired) for p in found) == [
        ("history_id", f"s{n}", True) for n in range(len(values))
    ]
    assert verify_database(store).ok
    for n in range(len(values)):
        assert SessionStore(engine).append(f"s{n}", {"role": "user", "content": "more"}) == 1


def test_a_repair_closes_up_positions_near_the_column_s_least(
    store: SessionStore, engine: Engine
) -> None:
    """Parked out of the way on free positions near 0, not below the least one held."""
    least = -(2**63) if engine.dialect.name == "sqlite" else -(2**31)
    store.create_session("s", source="cli")
    store.flush("s", [{"role": "user", "content": f"m{n}"} for n in range(3)])
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE hermes_messages SET idx = {least} WHERE idx = 0")
        conn.exec_driver_sql("UPDATE hermes_messages SET idx = -2 WHERE idx = 2")
    repaired = verify_database(store, repair=True)
    assert {(p.check, p.repaired) for p in repaired.problems} == {
        ("positions", True),
        ("flushed_digest", True),  # (the last message is another one now)
    }
    assert [m["content"] for m in fresh_store(store).get_messages("s")] == ["m0", "m2", "m1"]


def test_a_deep_lineage_is_walked_once(store: SessionStore, engine: Engine) -> None:
    """3,000 compactions in a row, and a loop at the end of another chain: each session
    is walked once (the walk took time cubic in the depth: minutes here)."""
    import threading

    depth = 3_000
    rows = [{"id": "c0", "parent": None}] + [
        {"id": f"c{n}", "parent": f"c{n - 1}"} for n in range(1, depth)
    ]
    rows += [{"id": "x", "parent": "y"}, {"id": "y", "parent": "x"}, {"id": "z", "parent": "x"}]
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO hermes_sessions (id, source, started_at) VALUES (:id, 'cli', 0)"),
            rows,
        )
        conn.execute(
            text("UPDATE hermes_sessions SET parent_session_id = :parent WHERE id = :id"), rows
        )
    found: list[list[Any]] = []

    def check() -> None:
        found.append(store.read_transaction(lambda conn: verify._check_lineage(conn, False)))

    walk = threading.Thread(target=check)
    walk.start()
    walk.join(timeout=60)
    assert not walk.is_alive(), "the lineage check walked the chain over and over"
    assert [(p.check, p.session_id, p.detail) for p in found[0]] == [
        ("lineage", "x", "parent links loop: x -> y")
    ]


@pytest.mark.backends("sqlite")
def test_checks_without_repair_hold_no_write_lock_but_fts5_s_own(store: SessionStore) -> None:
    """SQLite's write lock would keep every agent's flush waiting for the whole walk of the
    lineage, and for each session's check (seconds, for a session of a million messages).
    Only FTS5's integrity-check takes it: that command is a write."""
    for sid in ("a", "b"):
        store.create_session(sid, source="cli", parent_session_id="a" if sid == "b" else None)
    begun: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("BEGIN IMMEDIATE"):
            begun.append(statement)

    event.listen(store.engine, "before_cursor_execute", seen)
    try:
        verify_database(store)
        checked = len(begun)
        begun.clear()
        verify_database(store, repair=True)  # (nothing to repair)
        repaired = len(begun)
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)
    assert checked == 1  # the search check's
    assert repaired == 4  # and a repair's of each session, and of the lineage


@pytest.mark.backends("sqlite")
def test_a_writer_holding_the_lock_throughout_leaves_only_fts5_s_own_check_undone(
    store: SessionStore, db_url: str
) -> None:
    """An agent's long write holds SQLite's write lock past the store's waits: a check
    still reports what it found, and says which check it could not run; a repair, which
    must write, is refused with the busy error."""
    store.create_session("s", source="cli")
    store.flush("s", conversation(2, "s"))
    patient = SessionStore(db_url, retry=RetryPolicy(attempts=1), lock_timeout=0.2)
    holder = create_engine(db_url, poolclass=NullPool)
    with holder.connect() as conn:
        conn.exec_driver_sql("UPDATE hermes_sessions SET message_count = 9 WHERE id = 's'")
        conn.commit()
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        report = verify_database(patient)
        assert [(p.check, p.session_id) for p in report.problems] == [("message_count", "s")]
        assert report.unchecked == [
            f"search: {table}'s integrity-check (another writer held the write lock throughout)"
            for table in ("hermes_search", "hermes_search_cjk")
        ]
        with pytest.raises(hermes_orm.DatabaseBusyError):
            verify_database(patient, repair=True)
        conn.rollback()
    assert verify_database(patient).unchecked == []
    patient.close()
    holder.dispose()


@pytest.mark.backends("postgresql")
def test_the_search_check_walks_the_ids_there_are_not_the_gaps_between(
    store: SessionStore, engine: Engine
) -> None:
    """A sequence set far ahead (rows restored with their ids): two messages, two batches."""
    from sqlalchemy import event

    store.create_session("s", source="cli")
    messages = [{"role": "user", "content": "before"}]
    store.flush("s", messages)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "SELECT setval(pg_get_serial_sequence('hermes_messages', 'id'), 10000000000000)"
        )
    store.flush("s", [*messages, {"role": "user", "content": "after"}])
    batches: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith(f"INSERT INTO {verify._PG_PROBE}"):
            batches.append(statement)

    event.listen(store.engine, "before_cursor_execute", seen)
    try:
        assert verify_database(store).ok
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)
    assert len(batches) == 2  # the batch of both messages, then an empty one


@pytest.mark.backends("postgresql")
def test_each_message_s_words_are_checked_against_what_its_triggers_compute(
    store: SessionStore, engine: Engine
) -> None:
    """Emptied, left out or stale: a vector or CJK-like text out of step with the message
    is found (search misses it meanwhile), and a repair indexes it afresh."""
    store.create_session("s", source="cli")
    messages = [
        {"role": "user", "content": "hello zebra"},
        {"role": "user", "content": "東京タワーへ行く"},
        {"role": "user", "content": "a stale one"},
        {"role": "user", "content": "left alone"},
    ]
    store.flush("s", messages)
    store.create_session("t", source="cli")
    call = {"id": "c", "type": "function", "function": {"name": "grep", "arguments": "{}"}}
    store.flush(  # every shape the triggers index
        "t",
        [
            {"role": "user", "content": "café naïve ΣΑΣ İstanbul ß ½ x² \u0000 nul"},
            {"role": "user", "content": [{"type": "text", "text": "部署 parts"}, {"type": "x"}]},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "done", "tool_name": "grep", "tool_call_id": "c"},
            {"role": "user", "content": ""},
        ],
    )
    assert _search_checks(verify_database(store)) == []  # every shape, as its trigger made it
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE hermes_messages SET search_vector = ''::tsvector "
            "WHERE session_id = 's' AND idx = 0"
        )
        conn.exec_driver_sql(
            "UPDATE hermes_messages SET search_cjk = NULL WHERE session_id = 's' AND idx = 1"
        )
        conn.exec_driver_sql(
            "UPDATE hermes_messages SET search_vector = to_tsvector('simple', 'other words') "
            "WHERE session_id = 's' AND idx = 2"
        )
    assert store.search("zebra").hits == []
    found = _search_checks(verify_database(store))
    assert len(found) == 1, found
    assert found[0][0].startswith("3 messages out of step"), found
    assert _search_checks(verify_database(store, repair=True)) == [(found[0][0], True)]
    assert [h.idx for h in store.search("zebra").hits] == [0]
    assert [h.idx for h in store.search("東京").hits] == [1]
    assert store.search("other").hits == []
    assert _search_checks(verify_database(store)) == []


@pytest.mark.backends("postgresql")
@pytest.mark.parametrize("damage", ["missing", "disabled"])
def test_search_triggers_that_would_not_fire_are_found_and_made_to_again(
    store: SessionStore, engine: Engine, damage: str
) -> None:
    """Messages written meanwhile go unindexed, the fresh words the check computes too
    (its table copies the triggers): each trigger is told, and a repair makes it again as
    the migrations made it (or enables it), then indexes what it missed."""
    from hermes_orm.search import PG_TRIGGERS

    messages = [{"role": "user", "content": "hello"}]
    store.create_session("s", source="cli")
    store.flush("s", messages)
    messages.append({"role": "user", "content": "zebra 部署 words"})
    table = table_name(engine, "hermes_messages")
    definitions = (
        "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid), tgenabled::text "
        "FROM pg_trigger WHERE tgname LIKE 'hermes\\_search%%' ORDER BY 1, 2"
    )
    with engine.begin() as conn:
        made = conn.exec_driver_sql(definitions).all()
        for name in PG_TRIGGERS:
            if damage == "missing":
                conn.exec_driver_sql(f"DROP TRIGGER {name} ON {table}")
            else:
                conn.exec_driver_sql(f"ALTER TABLE {table} DISABLE TRIGGER {name}")
    store.flush("s", messages)
    assert store.search("zebra").hits == []
    found = [problem for problem, _ in _search_checks(verify_database(store))]
    told = ": messages written there are not indexed as they should be"
    assert len(found) == 3, found
    assert found[0].endswith(
        f"hermes_messages: the search trigger hermes_search_index is {damage}{told}"
    )
    assert found[1].endswith(
        f"hermes_messages: the search trigger hermes_search_index_cjk is {damage}{told}"
    )
    assert found[2] == "1 messages out of step with the index (the first: message id 2)"
    assert _search_checks(verify_database(store, repair=True)) == [(p, True) for p in found]
    with engine.connect() as conn:
        assert conn.exec_driver_sql(definitions).all() == made
    assert [hit.idx for hit in store.search("zebra").hits] == [1]
    assert [hit.idx for hit in store.search("部署").hits] == [1]
    assert verify_database(store).ok


@pytest.mark.backends("sqlite")
def test_sqlite_search_triggers_dropped_are_found_and_made_again(
    store: SessionStore, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """A tool rebuilding the table drops its triggers: messages written then go
    unindexed, and went on so after a repair that only rebuilt the index."""
    from hermes_orm.search import SQLITE_TRIGGERS

    messages = [{"role": "user", "content": "hello"}]
    store.create_session("s", source="cli")
    store.flush("s", messages)
    with engine.begin() as conn:
        for name in SQLITE_TRIGGERS:
            conn.exec_driver_sql(f"DROP TRIGGER {name}")
    messages.append({"role": "user", "content": "zebra 部署 words"})
    store.flush("s", messages)
    assert store.search("zebra").hits == []
    found = [problem for problem, _ in _search_checks(verify_database(store))]
    told = ": messages written there are not indexed as they should be"
    assert found[: len(SQLITE_TRIGGERS)] == [
        f"hermes_messages: the search trigger {name} is missing{told}" for name in SQLITE_TRIGGERS
    ]
    env = clean_env(tmp_path)
    repaired = run_cli("verify", "--repair", "--url", db_url, env=env)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    with engine.connect() as conn:
        made = conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
        ).all()
    assert dict(made) == SQLITE_TRIGGERS
    messages.append({"role": "user", "content": "giraffe 部署说明 later"})
    store.flush("s", messages)  # indexed as it is written again
    assert [hit.idx for hit in store.search("zebra").hits] == [1]
    assert [hit.idx for hit in store.search("giraffe").hits] == [2]
    assert [hit.idx for hit in store.search("部署说明").hits] == [2]
    assert run_cli("verify", "--url", db_url, env=env).returncode == 0


@pytest.mark.backends("sqlite")
def test_the_sqlite_triggers_verify_holds_to_are_those_the_migrations_make(
    tmp_path: Path,
) -> None:
    """Both are written out (a migration never changes after release): a migration that
    makes them anew must come with the same change to search.SQLITE_TRIGGERS."""
    from hermes_orm.search import SQLITE_TRIGGERS

    path = tmp_path / "fresh.db"
    hermes_orm.upgrade(f"sqlite:///{path}")
    with create_engine(f"sqlite:///{path}").connect() as conn:
        made = conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
            "AND tbl_name = 'hermes_messages'"
        ).all()
    assert dict(made) == SQLITE_TRIGGERS


@pytest.mark.postgresql
@pytest.mark.direct("makes a database of its own")
def test_the_search_check_runs_on_tables_in_a_schema_whose_name_holds_a_blank(
    empty_pg: str,
) -> None:
    """A store finding its tables through search_path, in a schema PostgreSQL quotes."""
    with create_engine(empty_pg, poolclass=NullPool).begin() as conn:
        conn.exec_driver_sql('CREATE SCHEMA "app data"')
    engine = create_engine(
        empty_pg, poolclass=NullPool, connect_args={"options": r'-csearch_path="app\ data"'}
    )
    hermes_orm.upgrade(engine)
    with SessionStore(engine) as store:
        store.create_session("s", source="cli")
        store.flush("s", [{"role": "user", "content": "hello zebra"}])
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE hermes_messages SET search_vector = ''::tsvector")
        found = _search_checks(verify_database(store))
        assert [problem for problem, _ in found] == [
            "1 messages out of step with the index (the first: message id 1)"
        ]
        assert _search_checks(verify_database(store, repair=True)) == [(found[0][0], True)]
        assert [hit.idx for hit in store.search("zebra").hits] == [0]
    with create_engine(empty_pg, poolclass=NullPool).connect() as conn:
        assert (
            conn.exec_driver_sql(  # (where search_path put them)
                'SELECT count(*) FROM "app data".hermes_messages'
            ).scalar()
            == 1
        )
    engine.dispose()


@pytest.mark.backends("sqlite")
def test_a_rebuild_the_database_refuses_is_reported_with_what_was_repaired(
    store: SessionStore, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """The sessions' repairs are committed one by one before the index is rebuilt: a
    rebuild that fails is a problem of the report, which still says what was repaired."""
    store.create_session("a", source="cli")
    store.flush("a", conversation(2))
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE hermes_sessions SET flushed_idx = 7 WHERE id = 'a'")
        conn.exec_driver_sql("DROP TABLE hermes_search_cjk")
    done = run_cli("verify", "--repair", "--url", db_url, env=clean_env(tmp_path))
    assert done.returncode == 1, done.stderr
    assert "session 'a': cursor: flushed_idx is 7, 6 messages are stored (repaired)" in done.stdout
    assert "database: search: a rebuild failed: no such table" in done.stdout
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.endswith(": 3 problem(s), 1 repaired"), summary
    assert store.get_session("a")["flushed_idx"] == 6  # type: ignore[index]


@pytest.mark.postgresql
@pytest.mark.direct("makes a database and a role of its own")
@pytest.mark.parametrize("kind", ["granted SELECT only", "read-only transactions"])
def test_a_repair_by_a_role_that_may_only_read_is_refused_saying_so(
    empty_pg: str, kind: str
) -> None:
    """Each session's repair was refused by the server in turn, and the report said
    'could not be checked: permission denied' in place of what was wrong; a role whose
    transactions are read-only was taken for a standby, waited for, then called out of
    reach, with or without --repair."""
    import uuid

    hermes_orm.upgrade(empty_pg)
    with SessionStore(empty_pg) as store:
        store.create_session("s", source="cli")
        store.flush("s", conversation(1))
    role = f"reader_{uuid.uuid4().hex[:8]}"
    owner = create_engine(empty_pg, poolclass=NullPool)
    with owner.begin() as conn:
        conn.exec_driver_sql("UPDATE hermes_sessions SET message_count = 9")
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
        conn.exec_driver_sql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
        if kind == "read-only transactions":
            conn.exec_driver_sql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
            conn.exec_driver_sql(f"ALTER ROLE {role} SET default_transaction_read_only = on")
    url = make_url(empty_pg).set(username=role, password="pw")
    try:
        with SessionStore(url, retry=RetryPolicy(unavailable_for=5)) as store:
            found = verify_database(store)
            details = [p.detail for p in found.problems]
            assert details == ["message_count is 9, 3 are stored"], details
            assert len(found.unchecked) == (kind == "read-only transactions"), found.unchecked
            with pytest.raises(DatabaseError, match="may only be read"):
                verify_database(store, repair=True)
    finally:
        with owner.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
        owner.dispose()


@pytest.mark.parametrize("repair", [False, True])
def test_a_ctrl_c_during_the_sqlite_index_check_is_raised_as_it_came(
    tmp_path: Path, repair: bool
) -> None:
    """A KeyboardInterrupt cutting short a statement of the search index's check: its
    cleanup ran a statement on the connection SQLAlchemy dropped, and raised
    PendingRollbackError in the interrupt's place (an ``except Exception`` took it,
    and the CLI said it was a database error)."""
    store = SessionStore(f"sqlite:///{tmp_path / 's.db'}")
    store.upgrade()
    store.create_session("s", source="cli")
    store.flush("s", [{"role": "user", "content": "hello world"}])
    armed: list[str] = []

    def arm(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "INTO temp.hermes_verify_indexed" in statement:
            armed.append(statement)

    def interrupt(frame: Any, event_name: str, _arg: Any) -> None:
        if event_name == "call" and frame.f_code.co_name == "post_exec" and armed:
            sys.settrace(None)
            raise KeyboardInterrupt

    event.listen(store.engine, "before_cursor_execute", arm)
    sys.settrace(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            verify_database(store, repair=repair)
    finally:
        sys.settrace(None)
    assert len(armed) == 1
    event.remove(store.engine, "before_cursor_execute", arm)
    assert verify_database(store).ok
    store.close()
