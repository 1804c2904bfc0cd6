"""End to end: a real Hermes ``AIAgent`` with the plugin loaded by Hermes' own discovery.

Each run is a child process (``tests/_agent_runner.py``) with its own
``HERMES_HOME``; the model is a loopback OpenAI-compatible server
(``tests/_hermes_agent.FakeLLM``) that answers with parallel tool calls. After
every scenario the mirror holds each session's conversation exactly once, in
order, equal to what the agent had in memory at the end of its last turn; what
Hermes' own ``state.db`` holds in the same run is checked too (it duplicates or
loses a message where its append fails).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hermes_orm import SessionStore
from hermes_orm.integrations.hermes import import_state_db
from hermes_orm.integrations.hermes.mirror import Mirror, StatusFile
from tests._hermes_agent import (
    AgentSpec,
    FakeLLM,
    kill_agent,
    read_result,
    run_agent,
    start_agent,
)

#: Real agent turns in subprocesses: on PostgreSQL they run in CI's heavy step
#: (the store's own tests cover PostgreSQL in the default suite).
HEAVY_ON = ("postgresql",)

# the Hermes plugin writes through a blocking SessionStore: its tests run on that API only.
pytestmark = pytest.mark.apis("sync")

Core = tuple[str, Any, Any, list[tuple[Any, Any, Any]]]


def core(messages: list[dict[str, Any]]) -> list[Core]:
    """What a conversation is made of: role, content, tool call id, tool calls."""
    return [
        (
            m["role"],
            m.get("content") or None,
            m.get("tool_call_id"),
            [
                (c["id"], c["function"]["name"], c["function"]["arguments"])
                for c in m.get("tool_calls") or []
            ],
        )
        for m in messages
    ]


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


@pytest.fixture
def spec(tmp_path: Path, llm: FakeLLM, db_url: str, backend: str, request: Any) -> AgentSpec:
    admin = request.getfixturevalue("pg_server_url") if backend == "postgresql" else None
    return AgentSpec(
        hermes_home=tmp_path / "home",
        llm_url=llm.base_url,
        session_id="s1",
        turns=["[tools] one", "[tools] two", "three"],
        mirror_url=db_url,
        mirror_admin_url=admin,
    )


def _hermes_rows(spec: AgentSpec, session_id: str) -> list[dict[str, Any]]:
    """The active rows of Hermes' own ``state.db`` for a session."""
    conn = sqlite3.connect(f"file:{spec.hermes_home / 'state.db'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT role, content, tool_call_id, tool_calls FROM messages "
            "WHERE session_id = ? AND active = 1 ORDER BY id",
            (session_id,),
        ).fetchall()
    finally:
        conn.close()
    return [{**r, "tool_calls": json.loads(r["tool_calls"] or "null")} for r in map(dict, rows)]


def _assert_mirrored(store: SessionStore, session_id: str, expected: list[dict[str, Any]]) -> None:
    stored = store.get_messages(session_id)
    assert core(stored) == core(expected)
    assert not any(k.startswith("_") for m in stored for k in m)
    session = store.get_session(session_id)
    assert session is not None
    assert session["flushed_idx"] == session["message_count"] == len(expected)


def _last_turn_of(result: dict[str, Any], session_id: str) -> list[dict[str, Any]]:
    """What the agent had in memory at the end of its last turn under ``session_id``."""
    turns = [t for t in result["turns"] if t["session_id"] == session_id]
    assert turns, f"no completed turn under {session_id}"
    messages: list[dict[str, Any]] = turns[-1]["messages"]
    return messages


def test_clean_turns_are_mirrored_exactly(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    result = run_agent(spec, tmp_path / "out.json")
    final = result["turns"][-1]["messages"]
    assert len(final) == 12  # 2 x (user, 2 parallel calls, 2 results, answer) + 2
    _assert_mirrored(store, "s1", final)
    assert core(_hermes_rows(spec, "s1")) == core(final)
    session = store.get_session("s1")
    assert session is not None
    assert (session["source"], session["model"]) == ("cli", "fake-model")
    assert session["ended_at"] is None  # on_session_end after each turn ends nothing
    assert store.get_session("s1#2") is None


@pytest.mark.parametrize(
    "fault",
    [
        ("after", "tool", "a duplicate"),  # committed, then raised: Hermes writes it again
        ("before", "final", "a loss"),  # the turn's last append failed: never retried
        ("before", "tool", "all"),
        ("after", "final", "all"),
        ("before", "call", "all"),
        ("after", "call", "a duplicate"),
    ],
    ids=[
        "after-commit-tool-result",
        "before-commit-final-answer",
        "before-commit-tool-result",
        "after-commit-final-answer",
        "before-commit-tool-call",
        "after-commit-tool-call",
    ],
)
def test_hermes_own_store_failing_mid_turn_leaves_the_mirror_exact(
    spec: AgentSpec, store: SessionStore, tmp_path: Path, fault: tuple[str, str, str]
) -> None:
    when, target, hermes_has = fault
    spec.hermes_fault = {"turn": 1, "when": when, "target": target}
    result = run_agent(spec, tmp_path / "out.json")
    assert result["faults"], "the fault was injected"
    final = result["turns"][-1]["messages"]
    _assert_mirrored(store, "s1", final)

    hermes = _hermes_rows(spec, "s1")
    if hermes_has == "a duplicate":
        assert len(hermes) == len(final) + 1
    elif hermes_has == "a loss":
        assert len(hermes) == len(final) - 1
        assert "Answer to: [tools] two" not in [r["content"] for r in hermes]
    else:
        assert core(hermes) == core(final)


@pytest.mark.parametrize("in_place", [True, False], ids=["in-one-session", "compressed-away"])
@pytest.mark.heavy
def test_a_last_turn_that_failed_is_mirrored_by_the_sessions_end(
    spec: AgentSpec, store: SessionStore, tmp_path: Path, llm: FakeLLM, in_place: bool
) -> None:
    """The model's API fails the last turn past Hermes' retries: no hook fires, yet
    Hermes stored the turn (the user's message, the tool calls made, their results).
    The CLI's exit ends the session, and the mirror then holds what Hermes holds; a
    failed turn that first compressed into a new session makes that child, the
    parent ended ``compression``."""
    spec.compression_in_place = None if in_place else False
    spec.turns = ["[tools] one", "[tools] two [fail]" if in_place else "[tools] [compress] [fail]"]
    spec.finalize = "cli_close"
    result = run_agent(spec, tmp_path / "out.json")
    assert "failed" in llm.kinds()
    session_id = result["turns"][-1]["session_id"]
    assert (session_id == "s1") is in_place
    hermes = _hermes_rows(spec, session_id)
    assert core(hermes) == core(result["turns"][-1]["messages"])
    _assert_mirrored(store, session_id, result["turns"][-1]["messages"])
    ended = store.get_session(session_id)
    assert ended is not None
    assert ended["end_reason"] == "cli_close"
    if not in_place:
        assert ended["parent_session_id"] == "s1"
        parent = store.get_session("s1")
        assert parent is not None
        assert parent["end_reason"] == "compression"


@pytest.mark.heavy
def test_a_turn_with_the_mirror_unavailable_loses_nothing(
    spec: AgentSpec, store: SessionStore, tmp_path: Path, backend: str
) -> None:
    spec.mirror_down_turns = [1]
    result = run_agent(spec, tmp_path / "out.json")
    _assert_mirrored(store, "s1", result["turns"][-1]["messages"])
    log = (spec.hermes_home / "logs" / "agent.log").read_text()
    # The file is locked (SQLite), or the database refuses connections
    # (PostgreSQL, retried as out of reach for the mirror's 5 s): the turn goes
    # on after its bounded wait, and the write completes once the database is back.
    assert "the agent goes on" in log
    assert "not written to" not in log
    assert "error" not in StatusFile(spec.hermes_home / "hermes_orm_status.json").read()


@pytest.mark.backends("sqlite")
@pytest.mark.heavy
def test_writes_left_at_exit_are_told_in_the_agents_log(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    """An application's own AIAgent, made after the plugin loaded, sets up Hermes' logging
    with an exit handler that stops its log writer: the mirror's close, which warns of
    the writes it gives up at exit, runs before it."""
    spec.turns = ["one", "two"]
    spec.mirror_down_at_exit = True
    result = run_agent(spec, tmp_path / "out.json")
    log = (spec.hermes_home / "logs" / "agent.log").read_text()
    assert "writes still queued at exit ('s1')" in log, log[-2000:]
    status = StatusFile(spec.hermes_home / "hermes_orm_status.json").read()
    assert "s1" in json.dumps(status)  # (recorded there too, as before)
    # The next turn of the session, in another process, catches up exactly.
    spec.mirror_down_at_exit, spec.resume, spec.turns = False, True, ["three"]
    result = run_agent(spec, tmp_path / "out2.json")
    _assert_mirrored(store, "s1", result["turns"][-1]["messages"])


@pytest.mark.parametrize("first_hook", ["a turn", "at exit"])
def test_the_mirror_closes_before_and_after_exit_handlers_registered_since(
    first_hook: str,
) -> None:
    """Registered as the plugin loads, close runs after Hermes' CLI cleanup (which ends
    the session through the hooks); once a turn ran, also before the exit handler of
    the logging an AIAgent set up since the plugin loaded. A first hook call as the
    process exits leaves the late close in place."""
    script = f"""
import atexit
from hermes_orm.integrations.hermes.plugin import _CloseAtExit
at_exit = _CloseAtExit(lambda final=True: print("close", final, flush=True))
hook = at_exit.hook(lambda **kw: print("hook", kw["event"], flush=True))
atexit.register(lambda: hook(event="finalize"))  # the CLI's cleanup
atexit.register(lambda: print("logging stops", flush=True))  # an AIAgent made since
if {first_hook == "a turn"}:
    hook(event="turn")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stdout.splitlines()
    if first_hook == "a turn":
        assert lines == [
            "hook turn",
            "close False",  # (it tells; the final one gives up)
            "logging stops",
            "hook finalize",
            "close True",
        ]
    else:
        assert lines == ["logging stops", "hook finalize", "close True"]


@pytest.mark.heavy
def test_the_background_review_never_enters_the_users_session(
    spec: AgentSpec, store: SessionStore, tmp_path: Path, llm: FakeLLM
) -> None:
    spec.review = True
    result = run_agent(spec, tmp_path / "out.json")
    assert "review" in llm.kinds()
    final = result["turns"][-1]["messages"]
    _assert_mirrored(store, "s1", final)
    assert not any("Review the conversation" in str(m["content"]) for m in store.get_messages("s1"))


def test_compression_into_a_new_session_is_linked_to_its_parent(
    spec: AgentSpec, store: SessionStore, tmp_path: Path, llm: FakeLLM
) -> None:
    spec.compression_in_place = False
    spec.turns = ["[tools] one", "[tools] [compress] two", "[tools] three"]
    result = run_agent(spec, tmp_path / "out.json")
    assert "compression" in llm.kinds()
    first, child = result["sessions"]
    assert first == "s1"
    assert child != "s1"
    _assert_mirrored(store, "s1", _last_turn_of(result, "s1"))
    _assert_mirrored(store, child, _last_turn_of(result, child))
    mirrored = store.get_session(child)
    assert mirrored is not None
    assert mirrored["parent_session_id"] == "s1"
    parent = store.get_session("s1")
    assert parent is not None
    assert parent["end_reason"] == "compression"


def test_compression_in_place_keeps_both_histories(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    spec.compression_in_place = True
    spec.turns = ["[tools] one", "[tools] [compress] two", "[tools] three"]
    result = run_agent(spec, tmp_path / "out.json")
    assert result["sessions"] == ["s1"]
    _assert_mirrored(store, "s1", result["turns"][0]["messages"])
    _assert_mirrored(store, "s1#2", result["turns"][-1]["messages"])
    revision = store.get_session("s1#2")
    assert revision is not None
    assert revision["parent_session_id"] == "s1"
    assert revision["extra"]["hermes_session_id"] == "s1"
    log = (spec.hermes_home / "logs" / "agent.log").read_text()
    assert "no longer continues its stored history" in log


def test_a_process_killed_mid_turn_is_resumed_exactly(
    spec: AgentSpec, store: SessionStore, tmp_path: Path, llm: FakeLLM
) -> None:
    spec.turns = ["[tools] one", "[tools] [hang] two"]
    out = tmp_path / "killed.json"
    proc = start_agent(spec, out)
    try:
        assert llm.hung.wait(120), "the agent reached the hanging request"
    finally:
        kill_agent(proc)
    assert len(read_result(out)["turns"]) == 1
    llm.release.set()

    spec.resume, spec.turns = True, ["[tools] three"]
    resumed = run_agent(spec, tmp_path / "resumed.json")
    final = resumed["turns"][-1]["messages"]
    # The killed turn's user message, call and results (saved by Hermes) come back.
    assert "[tools] [hang] two" in [m["content"] for m in final]
    _assert_mirrored(store, "s1", final)


@pytest.mark.heavy
def test_imported_history_is_continued_without_duplicates(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    spec.plugin_enabled, spec.turns = False, ["[tools] one", "[tools] two"]
    run_agent(spec, tmp_path / "before.json")
    report = import_state_db(spec.hermes_home / "state.db", store)
    assert report.ok
    imported = store.get_messages("s1")

    spec.plugin_enabled, spec.resume, spec.turns = True, True, ["[tools] three"]
    result = run_agent(spec, tmp_path / "after.json")
    final = result["turns"][-1]["messages"]
    _assert_mirrored(store, "s1", final)
    assert store.get_messages("s1")[: len(imported)] == imported  # kept as imported
    assert store.get_session("s1#2") is None


def test_a_duplicate_in_hermes_file_gives_way_to_the_live_conversation(
    spec: AgentSpec, db_url: str, store: SessionStore, tmp_path: Path
) -> None:
    spec.plugin_enabled, spec.turns = False, ["[tools] one", "[tools] two"]
    spec.hermes_fault = {"turn": 0, "when": "after", "target": "tool"}
    result = run_agent(spec, tmp_path / "out.json")
    live = result["turns"][-1]["messages"]
    assert len(_hermes_rows(spec, "s1")) == len(live) + 1  # Hermes stored one twice
    assert import_state_db(spec.hermes_home / "state.db", store).ok

    mirror = Mirror(db_url, status=StatusFile(tmp_path / "status.json"))
    assert mirror.turn("s1", live)
    mirror.close()
    _assert_mirrored(store, "s1#2", live)
    assert len(store.get_messages("s1")) == len(live) + 1  # the import, as Hermes had it
