"""``hermes-orm verify``: every invariant checked over a database; --repair never deletes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from hermes_orm import SessionStore
from hermes_orm.verify import verify_database
from tests.conftest import count_rows, fresh_store, run_cli
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


def _populate(store: SessionStore) -> dict[str, list[dict[str, Any]]]:
    lists = {}
    for sid in (
        "holes",
        "cursor",
        "counts",
        "digest",
        "last",
        "orphan",
        "loop-a",
        "loop-b",
        "fine",
    ):
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

    repaired = run_cli("verify", "--repair", "--url", db_url, env=env)
    assert "(repaired)" in repaired.stdout
    assert repaired.returncode == 1  # the lineage loop is the application's to break
    assert count_rows(engine, "hermes_messages") == messages  # nothing deleted
    after = verify_database(store)
    assert [(p.check, p.session_id) for p in after.problems] == [("lineage", "loop-a")]

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
