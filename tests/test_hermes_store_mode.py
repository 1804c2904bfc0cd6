"""Store mode end to end: Hermes keeps its sessions in the configured database itself.

With ``hermes_orm: {mode: store}`` in config.yaml the plugin makes
``hermes_state.SessionDB`` hermes_orm's adapter on the configured database. The
real ``hermes`` CLI (one-shot ``-z``, then ``chat -q --resume``) and a real
``AIAgent`` (``tests/_agent_runner.py``) run against a loopback
OpenAI-compatible server, on SQLite and on PostgreSQL; Hermes' own ``state.db``
never gets a message. Faults injected into Hermes' own appends (a turn's last
message, a whole batch) are repaired by the end-of-turn flush: the database
holds each conversation exactly once, in order.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hermes_orm import SessionStore
from hermes_orm.errors import InvalidArgumentError
from hermes_orm.integrations.hermes.plugin import resolve_mode
from tests._agent_runner import _config
from tests._hermes_agent import TOOL_FILES, AgentSpec, FakeLLM, run_agent
from tests.test_hermes_plugin import Core, core

STORE_MODE = {"hermes_orm": {"mode": "store"}}


class RecordingLLM(FakeLLM):
    """The loopback server, also keeping every chat request's body."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []

    def complete(self, body: dict[str, Any], path: str) -> dict[str, Any]:
        with self._lock:
            self.bodies.append(body)
        return super().complete(body, path)


@pytest.fixture
def llm() -> Iterator[RecordingLLM]:
    with RecordingLLM() as server:
        yield server


@pytest.fixture
def store(db_url: str) -> Iterator[SessionStore]:
    with SessionStore(db_url) as opened:
        yield opened


def sent(messages: list[dict[str, Any]]) -> list[Core]:
    """:func:`core`, tool call arguments as the JSON values they are."""
    return [
        (role, content, call_id, [(i, n, json.loads(a)) for i, n, a in calls])
        for role, content, call_id, calls in core(messages)
    ]


def _state_db_messages(home: Path) -> int:
    """How many messages Hermes' own ``state.db`` holds (none when it has no such table)."""
    path = home / "state.db"
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        if "messages" not in tables:
            return 0
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


def _assert_stored_exactly(
    store: SessionStore, session_id: str, expected: list[dict[str, Any]]
) -> None:
    stored = store.get_messages(session_id)
    assert core(stored) == core(expected)
    session = store.get_session(session_id)
    assert session is not None
    assert session["flushed_idx"] == session["message_count"] == len(expected)
    assert store.get_session(f"{session_id}#2") is None  # store mode makes no revisions


# -- the real hermes CLI --------------------------------------------------------------------


class Cli:
    """The ``hermes`` console script in an isolated ``HERMES_HOME``, in store mode."""

    def __init__(self, root: Path, llm: FakeLLM, url: str) -> None:
        self.home = root / "home"
        self.work = root / "work"
        for directory in (self.home, self.work):
            directory.mkdir(parents=True, exist_ok=True)
        for name in TOOL_FILES:
            (self.work / name).write_text(f"contents of {name}\n")
        spec = AgentSpec(hermes_home=self.home, llm_url=llm.base_url, session_id="", turns=[])
        config = _config(spec)
        config["model"].update(
            {"default": "fake-model", "provider": "custom", "base_url": llm.base_url}
        )
        config["hermes_orm"] = {"mode": "store", "url": url}
        (self.home / "config.yaml").write_text(json.dumps(config, indent=2))

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        """``hermes ARGS``; it must exit 0 when ``ok``."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("HERMES_") and not k.endswith("_API_KEY")
        }
        env.update(
            HERMES_HOME=str(self.home),
            OPENAI_API_KEY="sk-fake",
            TERMINAL_CWD=str(self.work),  # read_file resolves a.txt here
            TMPDIR=str(self.work),
        )
        done = subprocess.run(
            [str(Path(sys.executable).with_name("hermes")), *args],
            env=env,
            cwd=self.work,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0 or not ok, done.stdout + done.stderr
        return done


@pytest.mark.heavy
def test_the_hermes_cli_keeps_its_session_in_the_database_and_resumes_it(
    tmp_path: Path, llm: RecordingLLM, db_url: str, store: SessionStore
) -> None:
    cli = Cli(tmp_path, llm, db_url)
    usage = tmp_path / "usage.json"
    one_shot = cli.run("-z", "[tools] hello", "-t", "file", "--usage-file", str(usage))
    assert one_shot.stdout.strip() == "Answer to: [tools] hello"
    session_id = json.loads(usage.read_text())["session_id"]

    first = store.get_messages(session_id)
    assert [(m["role"], m.get("content") or None) for m in first] == [
        ("user", "[tools] hello"),
        ("assistant", None),  # the two parallel read_file calls
        ("tool", first[2]["content"]),
        ("tool", first[3]["content"]),
        ("assistant", "Answer to: [tools] hello"),
    ]
    assert [c["function"]["name"] for c in first[1]["tool_calls"]] == ["read_file"] * 2
    session = store.get_session(session_id)
    assert session is not None
    assert (session["source"], session["model"]) == ("cli", "fake-model")
    assert session["end_reason"] == "agent_close"  # Hermes ended it, in this database
    assert _state_db_messages(cli.home) == 0

    # Hermes' resume path reads the session back from the database and replays it.
    llm.bodies.clear()
    resumed = cli.run("chat", "-Q", "-q", "second", "--resume", session_id, "-t", "file")
    assert "Answer to: second" in resumed.stdout
    (request,) = llm.bodies
    replayed = [m for m in request["messages"] if m["role"] != "system"]
    # (Hermes sends tool call arguments as compact JSON.)
    assert sent(replayed) == sent([*first, {"role": "user", "content": "second"}])
    now = store.get_messages(session_id)
    assert now[: len(first)] == first
    assert core(now[len(first) :]) == core(
        [
            {"role": "user", "content": "second"},
            {"role": "assistant", "content": "Answer to: second"},
        ]
    )
    assert _state_db_messages(cli.home) == 0
    # Hermes reopens the session it resumes, with SQL of its own on its SessionDB's
    # connection; its `chat -q` does not end it again (as on Hermes' own state.db).
    reopened = store.get_session(session_id)
    assert reopened is not None
    assert (reopened["ended_at"], reopened["end_reason"]) == (None, None)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@127.0.0.1:1/db?schema=hermes-prod",
        "postgresql://u@127.0.0.1:1/db?options=-cstatement_timeout%3D5s&pgbouncer=true",
        "postgresql+asyncpg://u@127.0.0.1:1/db",
        "sqlite:///{tmp}/x.db?timeout=soon",
    ],
)
def test_a_url_no_store_can_be_made_from_leaves_hermes_on_its_state_db(
    tmp_path: Path, llm: RecordingLLM, url: str
) -> None:
    """Refused where a store is made, not where the URL is read: every SessionDB Hermes
    opened raised, and it kept its sessions nowhere. The plugin is off, and says why."""
    cli = Cli(tmp_path, llm, url.format(tmp=tmp_path))
    assert cli.run("-z", "hello").stdout.strip() == "Answer to: hello"
    assert _state_db_messages(cli.home) == 2
    status = cli.run("orm", "status", ok=False)
    assert status.returncode == 1
    assert "plugin:    off since" in status.stdout, status.stdout
    assert "InvalidURLError" in status.stdout, status.stdout
    assert not (tmp_path / "x.db").exists()


# -- a real AIAgent -------------------------------------------------------------------------


@pytest.fixture
def spec(tmp_path: Path, llm: FakeLLM, db_url: str) -> AgentSpec:
    return AgentSpec(
        hermes_home=tmp_path / "home",
        llm_url=llm.base_url,
        session_id="s1",
        turns=["[tools] one", "[tools] two", "three"],
        mirror_url=db_url,  # HERMES_ORM_URL
        extra_config=STORE_MODE,
    )


def test_a_real_agent_keeps_its_session_in_the_database(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    result = run_agent(spec, tmp_path / "out.json")
    final = result["turns"][-1]["messages"]
    assert len(final) == 12  # 2 x (user, 2 parallel calls, 2 results, answer) + 2
    _assert_stored_exactly(store, "s1", final)
    # Stored by Hermes itself, through the adapter: its columns on every row.
    assert all(m["active"] is True and "timestamp" in m for m in store.get_messages("s1"))
    session = store.get_session("s1")
    assert session is not None
    assert (session["source"], session["model"]) == ("cli", "fake-model")
    assert session["end_reason"] == "agent_close"
    assert _state_db_messages(spec.hermes_home) == 0
    log = (spec.hermes_home / "logs" / "agent.log").read_text()
    assert "Hermes' own writes missed" not in log  # nothing to repair


@pytest.mark.parametrize(
    ("fault", "lost"),
    [
        # Turn 1's answer: the next turn takes it as stored, Hermes never retries it.
        ({"turn": 1, "when": "before", "target": "final"}, 1),
        # The first tool result of turn 1 fails every time Hermes tries it in that
        # turn (the tool-progress flush and the end-of-turn one): each batch stops
        # there, and the next turn takes the results and the answer as stored.
        ({"turn": 1, "when": "before", "target": "tool", "times": 10}, 3),
        # The last turn's answer: the CLI's close flushes the list again, and would
        # write it a second time unless the end-of-turn flush marked it stored.
        ({"turn": 2, "when": "before", "target": "final"}, 1),
    ],
    ids=["last-message", "batched-turn", "last-message-then-close"],
)
def test_what_hermes_own_writes_miss_is_stored_exactly_once(
    spec: AgentSpec, store: SessionStore, tmp_path: Path, fault: dict[str, Any], lost: int
) -> None:
    spec.hermes_fault = fault
    spec.close_persist = True
    result = run_agent(spec, tmp_path / "out.json")
    assert result["faults"], "the fault was injected"
    final = result["turns"][-1]["messages"]
    _assert_stored_exactly(store, "s1", final)  # nothing lost, nothing twice
    # The repaired rows are stored as Hermes' own appends store theirs.
    assert all(m["active"] is True and "timestamp" in m for m in store.get_messages("s1"))
    log = (spec.hermes_home / "logs" / "agent.log").read_text()
    assert "Session DB append_message failed" in log
    assert f"session 's1': stored {lost} message(s) Hermes' own writes missed" in log
    assert _state_db_messages(spec.hermes_home) == 0


@pytest.mark.heavy
def test_a_repair_that_failed_is_stored_before_the_next_turn_in_its_place(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    """The end-of-turn repair finds the database locked; the next turn begins with it.

    Hermes takes its history as stored when a turn begins: the answer its write
    and the repair both missed is stored then (``pre_llm_call``), before the new
    turn's messages, not lost behind them.
    """
    spec.turns = ["one", "two"]
    spec.hermes_fault = {"turn": 0, "when": "before", "target": "final", "locked": "turn"}
    result = run_agent(spec, tmp_path / "out.json")
    assert result["faults"], "the fault was injected"
    final = result["turns"][-1]["messages"]
    _assert_stored_exactly(store, "s1", final)
    log = (spec.hermes_home / "logs" / "agent.log").read_text()
    assert "session 's1' not written to" in log  # the end-of-turn repair failed
    assert "session 's1': stored 1 message(s) Hermes' own writes missed" in log


@pytest.mark.heavy
def test_a_repair_the_next_turn_still_finds_locked_keeps_that_turn_behind_it(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    """The lock outlives the end-of-turn repair and the first try at the next turn's start.

    Hermes marks the missed answer stored when it writes the new turn's first
    message, as soon as the lock goes: ``pre_llm_call`` tries the repair again
    for as long as Hermes' appends would wait, so the answer is stored in its
    place, not lost.
    """
    spec.turns = ["one", "two", "three"]
    spec.hermes_fault = {"turn": 1, "when": "before", "target": "final", "locked": 6.5}
    _stored_exactly_past_a_failed_repair(spec, store, tmp_path)


@pytest.mark.heavy
def test_hermes_writing_the_message_its_failed_repair_holds_stores_it_once(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    """The repair failed; Hermes' close writes the answer itself: it is stored once."""
    spec.turns = ["one"]
    spec.close_persist = True
    spec.hermes_fault = {"turn": 0, "when": "before", "target": "final", "locked": "turn"}
    _stored_exactly_past_a_failed_repair(spec, store, tmp_path)


def _stored_exactly_past_a_failed_repair(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    """Run ``spec``: its fault injected, the end-of-turn repair failed, the session exact."""
    result = run_agent(spec, tmp_path / "out.json")
    assert result["faults"], "the fault was injected"
    _assert_stored_exactly(store, "s1", result["turns"][-1]["messages"])
    log = (spec.hermes_home / "logs" / "agent.log").read_text()
    assert "session 's1' not written to" in log  # the end-of-turn repair failed


@pytest.mark.heavy
def test_a_turn_undone_while_its_repair_waited_stays_undone(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    """``/undo`` takes back a turn whose answer the repair has not stored yet: it stays back."""
    spec.turns = ["one", "two", "three"]
    spec.hermes_fault = {"turn": 1, "when": "before", "target": "final", "locked": "turn"}
    spec.undo_before_turns = [2]
    result = run_agent(spec, tmp_path / "out.json")
    assert result["faults"], "the fault was injected"
    final = result["turns"][-1]["messages"]
    assert [m["content"] for m in final if m["role"] == "user"] == ["one", "three"]
    live = [m for m in store.get_messages("s1") if m.get("active") is not False]
    assert [(m["role"], m.get("content")) for m in live] == [
        (m["role"], m.get("content")) for m in final
    ]
    # The rows the undo took back stay inactive, the answer the repair held for that
    # turn with them (written before the rewind took the turn back); none is live again.
    rows = store.get_messages("s1")
    assert [str(m.get("content")) for m in rows].count("two") == 1
    held = [m for m in rows if str(m.get("content")).startswith("Answer to: two")]
    assert [m["active"] for m in held] == [False]


def test_a_repair_outliving_the_turns_wait_is_waited_for_not_raced(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    """A repair still running when ``wait`` is up is waited for: Hermes' exit then skips it.

    Before, the hook returned while the repair waited for the lock, and Hermes'
    close (its flush of what it left unmarked) stored the answer a second time.
    """
    spec.turns = ["one"]
    spec.close_persist = True
    spec.extra_config = {"hermes_orm": {"mode": "store", "wait": 0.5}}
    spec.hermes_fault = {"turn": 0, "when": "before", "target": "final", "locked": 1.2}
    result = run_agent(spec, tmp_path / "out.json")
    assert result["faults"], "the fault was injected"
    _assert_stored_exactly(store, "s1", result["turns"][-1]["messages"])
    log = (spec.hermes_home / "logs" / "agent.log").read_text()
    assert "session 's1': stored 1 message(s) Hermes' own writes missed" in log


def test_a_gateway_session_is_repaired_past_the_row_that_opens_it(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    """Hermes' gateway opens a transcript with a ``session_meta`` row: no message to count."""
    spec.gateway = True
    spec.hermes_fault = {"turn": 1, "when": "before", "target": "final"}
    result = run_agent(spec, tmp_path / "out.json")
    assert result["faults"], "the fault was injected"
    second, final = result["turns"][1]["messages"], result["turns"][-1]["messages"]
    stored = store.get_messages("s1")
    assert [m["role"] for m in stored].count("session_meta") == 1
    messages = [m for m in stored if m["role"] != "session_meta"]
    # The second turn's answer, whose append failed, is stored once, in its place.
    assert core(messages[: len(second)]) == core(second)
    assert core(messages) == core(final)
    log = (spec.hermes_home / "logs" / "agent.log").read_text()
    assert "session 's1': stored 1 message(s) Hermes' own writes missed" in log


def test_a_session_hermes_writes_elsewhere_is_copied_on_past_a_compression(
    spec: AgentSpec, store: SessionStore, tmp_path: Path
) -> None:
    """Hermes' SessionDB opened before the plugin loaded (its TUI): copied as the mirror does."""
    spec.db_before_plugins = True
    spec.compression_in_place = True
    spec.turns = ["[tools] one", "[compress] [tools] two", "three", "four"]
    result = run_agent(spec, tmp_path / "out.json")
    final = result["turns"][-1]["messages"]
    assert _state_db_messages(spec.hermes_home) > 0  # Hermes wrote its own file
    first = store.get_session("s1")
    assert first is not None
    assert first["end_reason"] == "rewritten"  # the history before the compression, kept
    assert core(store.get_messages("s1#2")) == core(final)
    assert store.get_session("s1#3") is None


# -- Hermes' SessionDB in store mode ----------------------------------------------------------

_OPEN = """
import json, sys
from pathlib import Path
from hermes_cli.plugins import discover_plugins
discover_plugins()
import hermes_state
home, other = Path(sys.argv[1]), Path(sys.argv[2])
opened = {
    "default": hermes_state.SessionDB(),
    "read_only": hermes_state.SessionDB(read_only=True),
    "home_state_db": hermes_state.SessionDB(db_path=home / "state.db"),
    "other_state_db": hermes_state.SessionDB(db_path=other / "state.db"),
}
opened["default"].create_session("s1", "cli")
print(json.dumps({
    "classes": {name: type(db).__module__ + "." + type(db).__name__ for name, db in opened.items()},
    "shared": opened["default"].store is opened["home_state_db"].store,
    "seen": opened["read_only"].get_session("s1") is not None,
}))
"""


def test_hermes_sessiondb_opens_the_configured_database_for_this_profile_only(
    tmp_path: Path,
) -> None:
    home, other = tmp_path / "home", tmp_path / "other"
    home.mkdir()
    other.mkdir()
    url = f"sqlite:///{tmp_path / 'orm.db'}"
    config = {"plugins": {"enabled": ["hermes_orm"]}, "hermes_orm": {"mode": "store", "url": url}}
    (home / "config.yaml").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    done = subprocess.run(
        [sys.executable, "-c", _OPEN, str(home), str(other)],
        env={**env, "HERMES_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ours = "hermes_orm.integrations.hermes.plugin.StoreSessionDB"
    assert result["classes"] == {
        "default": ours,
        "read_only": ours,
        "home_state_db": ours,
        "other_state_db": "hermes_state.SessionDB",  # another profile's file stays Hermes'
    }
    assert result["shared"]
    assert result["seen"]
    with SessionStore(url) as opened:
        assert opened.get_session("s1") is not None
    # Hermes' own file is there (parts of Hermes look for it first), empty.
    assert _state_db_messages(home) == 0
    with sqlite3.connect(home / "state.db") as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone() == (0,)


_DASHBOARD = """
import json, sys
from hermes_cli.plugins import discover_plugins
discover_plugins()
import hermes_state
db = hermes_state.SessionDB()
db.create_session("s1", "cli", model="m")
db.append_message("s1", "user", content="hello there")
from fastapi.testclient import TestClient
from hermes_cli import web_server
client = TestClient(web_server.app)
headers = {"X-Hermes-Session-Token": "token"}
listed = client.get("/api/profiles/sessions", headers=headers).json()
print(json.dumps({
    "listed": [s["id"] for s in listed["sessions"]],
    "active": web_server._count_status_active_sessions(),
}))
"""


def test_the_dashboard_lists_the_sessions_of_the_store(tmp_path: Path) -> None:
    """Its lists open a profile's SessionDB only where its state.db file is."""
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{tmp_path / 'orm.db'}"
    config = {"plugins": {"enabled": ["hermes_orm"]}, "hermes_orm": {"mode": "store", "url": url}}
    (home / "config.yaml").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    env.update(HERMES_HOME=str(home), HERMES_DASHBOARD_SESSION_TOKEN="token")
    done = subprocess.run(
        [sys.executable, "-c", _DASHBOARD],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"listed": ["s1"], "active": 1}
    assert _state_db_messages(home) == 0


def test_store_mode_goes_on_when_the_empty_state_db_cannot_be_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hermes_orm.integrations.hermes import plugin

    class Refusing:
        def __init__(self, db_path: Path) -> None:
            raise OSError(f"{db_path}: read-only file system")

    monkeypatch.setenv("HERMES_HOME", str(tmp_path))
    monkeypatch.setattr(plugin.StoreSessionDB, "hermes_class", Refusing)
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        plugin._hermes_state_db_placed()  # logs, raises nothing
    assert "cannot make an empty" in caplog.text
    assert not (tmp_path / "state.db").exists()


def test_the_mode_is_mirror_or_store() -> None:
    assert resolve_mode({}) == "mirror"
    assert resolve_mode({"hermes_orm": {"mode": "store"}}) == "store"
    with pytest.raises(InvalidArgumentError, match="mirror or store"):
        resolve_mode({"hermes_orm": {"mode": "stored"}})


# -- a gateway's delivery mirror -------------------------------------------------------------

#: tests/_agent_runner.py as Hermes' gateway runs a session: after every turn its
#: session store records the chat the session belongs to (gateway/session.py), and
#: gateway/mirror.py's ``mirror_to_session`` appends a delivery to the session from
#: outside the agent: after turn ``turn``, or while that turn runs its tools (as
#: Hermes' ``send_message`` tool does). Beside this file: the plan (``.json``) and,
#: written by it, what each ``mirror_to_session`` returned (``delivered.json``).
_DELIVERING_RUNNER = """
import json, sys, threading
from pathlib import Path

here = Path(__file__)
plan = json.loads(here.with_suffix(".json").read_text())
sys.path.insert(0, plan["root"])
from tests import _agent_runner as runner

prepare = runner._prepare


def prepared(spec):
    prepare(spec)  # before Hermes is imported: it reads its home and config then
    import hermes_state
    import run_agent
    from gateway.mirror import mirror_to_session
    from tools.registry import ToolRegistry

    gateway_db = hermes_state.SessionDB()
    turn, delivered, lock = [-1], [], threading.Lock()

    def deliver():
        ok = mirror_to_session("telegram", "chat-1", plan["text"], role=plan["role"])
        delivered.append(ok)
        here.with_name("delivered.json").write_text(json.dumps(delivered))

    run_conversation = run_agent.AIAgent.run_conversation

    def run(agent, *args, **kwargs):
        turn[0] += 1
        result = run_conversation(agent, *args, **kwargs)
        gateway_db.record_gateway_session_peer(
            agent.session_id,
            source="telegram",
            user_id="u1",
            session_key="agent:main:telegram:dm:chat-1",
            chat_id="chat-1",
            chat_type="dm",
        )
        if turn[0] == plan["turn"] and not plan["during"]:
            deliver()
        return result

    dispatch = ToolRegistry.dispatch

    def dispatched(registry, name, args, **kwargs):
        with lock:
            if turn[0] == plan["turn"] and plan["during"] and not delivered:
                deliver()
        return dispatch(registry, name, args, **kwargs)

    run_agent.AIAgent.run_conversation = run
    ToolRegistry.dispatch = dispatched


runner._prepare = prepared
runner.main(sys.argv[1], sys.argv[2])
"""


def _delivering(
    spec: AgentSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **plan: Any
) -> Path:
    """Run ``spec`` as a gateway session that gets a delivery; returns ``delivered.json``."""
    runner = tmp_path / "delivering_runner.py"
    runner.write_text(_DELIVERING_RUNNER)
    root = str(Path(__file__).resolve().parents[1])
    runner.with_suffix(".json").write_text(json.dumps({"root": root, **plan}))
    monkeypatch.setattr("tests._hermes_agent.RUNNER", runner)
    spec.gateway = True
    return runner.with_name("delivered.json")


def _assert_kept_with_the_delivery(
    store: SessionStore, spec: AgentSpec, expected: list[dict[str, Any]]
) -> None:
    stored = store.get_messages("s1")
    assert [m["role"] for m in stored].count("session_meta") == 1
    assert core([m for m in stored if m["role"] != "session_meta"]) == core(expected)
    session = store.get_session("s1")
    assert session is not None
    assert session["flushed_idx"] == session["message_count"] == len(stored)
    assert store.get_session("s1#2") is None
    log = (spec.hermes_home / "logs" / "agent.log").read_text()
    assert "session 's1': stored 1 message(s) Hermes' own writes missed" in log
    assert "no longer continues" not in log
    assert "not written to" not in log


@pytest.mark.parametrize(
    "delivery",
    [
        # send_message's mirror of what it sent to the chat
        {"role": "assistant", "content": "The weekly report, as sent to this chat."},
        # a cron job's delivery to the chat
        {"role": "user", "content": "[Cron delivery: weekly]\nThe weekly report."},
    ],
    ids=["send-message", "cron"],
)
def test_a_delivery_between_turns_is_kept_and_the_next_turn_repaired(
    spec: AgentSpec,
    store: SessionStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    delivery: dict[str, str],
) -> None:
    """The next turn replays the delivery merged into a neighbour, and its answer is missed.

    Hermes' alternation repair merges the delivery into the answer before it (an
    assistant delivery) or the user message after it (a user one): the agent's list
    holds one message fewer than the rows, none of them the delivery.
    """
    role, text = delivery["role"], delivery["content"]
    delivered = _delivering(spec, tmp_path, monkeypatch, turn=1, during=False, role=role, text=text)
    spec.hermes_fault = {"turn": 2, "when": "before", "target": "final"}
    result = run_agent(spec, tmp_path / "out.json")
    assert json.loads(delivered.read_text()) == [True]
    assert result["faults"], "the fault was injected"
    second, final = result["turns"][1]["messages"], result["turns"][-1]["messages"]
    assert len(final) == len(second) + 2  # the delivery is no message of the agent's list
    expected = [*second, delivery, {"role": "user", "content": "three"}, final[-1]]
    _assert_kept_with_the_delivery(store, spec, expected)


def test_a_delivery_during_a_turn_is_kept_and_that_turn_repaired(
    spec: AgentSpec, store: SessionStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivered while the turn runs its tools: the agent's list never holds it.

    Its row comes after the assistant message calling the tools (Hermes stores that
    before running them) and before their results; the turn's answer is missed.
    """
    text = "The weekly report, as sent to this chat."
    delivered = _delivering(
        spec, tmp_path, monkeypatch, turn=1, during=True, role="assistant", text=text
    )
    spec.hermes_fault = {"turn": 1, "when": "before", "target": "final"}
    result = run_agent(spec, tmp_path / "out.json")
    assert json.loads(delivered.read_text()) == [True]
    assert result["faults"], "the fault was injected"
    first, second = result["turns"][0]["messages"], result["turns"][1]["messages"]
    assert not any(m.get("content") == text for m in second)
    calls = next(i for i, m in enumerate(second) if i >= len(first) and m.get("tool_calls"))
    final = result["turns"][-1]["messages"]
    delivery = {"role": "assistant", "content": text}
    expected = [*second[: calls + 1], delivery, *second[calls + 1 :], *final[-2:]]
    _assert_kept_with_the_delivery(store, spec, expected)


# -- the end-of-turn repair past rows it cannot pair, on a real store -------------------------


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _answer(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


DELIVERY = _answer("The weekly report, as sent to this chat.")


class _Session:
    """A store-mode session on a real SQLite store, with Hermes' write loop and its marks."""

    def __init__(self, tmp_path: Path) -> None:
        from hermes_orm.integrations.hermes.mirror import StatusFile, StoreFlush

        url = f"sqlite:///{tmp_path / 'store.db'}"
        self.store = SessionStore(url)
        self.store.upgrade()
        self.store.create_session("s1", source="telegram")
        self.flusher = StoreFlush(url, status=StatusFile(tmp_path / "status.json"))

    def row(self, message: dict[str, Any]) -> None:
        """What one of Hermes' writes (or ``mirror_to_session``) stores."""
        from hermes_orm.integrations.hermes.mirror import hermes_message

        self.store.append_row("s1", hermes_message(message, 1.0))

    def hermes_writes(self, *messages: dict[str, Any]) -> None:
        from hermes_orm.integrations.hermes.mirror import PERSISTED_MARK

        for message in messages:
            self.row(message)
            message[PERSISTED_MARK] = True

    def end_turn(self, history: list[dict[str, Any]]) -> None:
        from hermes_orm.integrations.hermes.mirror import Turn, conversation

        turn = Turn("s1", conversation(history), None, "telegram", history, len(history))
        self.flusher._flush_in(self.store, turn)

    def contents(self) -> list[tuple[str, str]]:
        return [(m["role"], m["content"]) for m in self.store.get_messages("s1")]


def _marked(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    """Hermes' history as it loads it: copies, each marked as stored."""
    from hermes_orm.integrations.hermes.mirror import PERSISTED_MARK

    return [{**message, PERSISTED_MARK: True} for message in messages]


def test_a_repeated_message_missed_past_a_delivery_is_stored(tmp_path: Path) -> None:
    """The user says "ok" again; an older "ok" row is not taken for the one Hermes missed."""
    session = _Session(tmp_path)
    hello, hi, ok, sure = _user("hello"), _answer("Hi."), _user("ok"), _answer("Sure.")
    session.hermes_writes(hello, hi, ok, sure)
    session.row(DELIVERY)
    # The gateway's replay merges the delivery into the answer before it.
    merged = {**sure, "content": "Sure.\nThe weekly report, as sent to this chat."}
    session.end_turn([*_marked(hello, hi, ok, merged), _user("ok"), _answer("Fine.")])
    assert session.contents()[-3:] == [
        ("assistant", DELIVERY["content"]),
        ("user", "ok"),
        ("assistant", "Fine."),
    ]


def test_an_answer_like_the_last_one_missed_past_a_cron_delivery_is_stored(
    tmp_path: Path,
) -> None:
    """The replay merges the user's message into a delivery; the new "Done." is missed."""
    session = _Session(tmp_path)
    asked, done = _user("stretch reminder at 5"), _answer("Done.")
    session.hermes_writes(asked, done)
    delivery, again = _user("[Cron delivery: hydrate]\nDrink water."), _user("and water at 6")
    session.row(delivery)
    session.row(again)  # Hermes' write of the turn's user message
    merged = {**delivery, "content": f"{delivery['content']}\n\n{again['content']}"}
    session.end_turn([*_marked(asked, done, merged), _answer("Done.")])
    assert session.contents() == [
        ("user", "stretch reminder at 5"),
        ("assistant", "Done."),
        ("user", delivery["content"]),
        ("user", "and water at 6"),
        ("assistant", "Done."),
    ]


def test_an_answer_stored_before_its_write_raised_is_marked_not_written_again(
    tmp_path: Path,
) -> None:
    """Found stored past a delivery, it gets Hermes' mark: its next flush (/new) skips it."""
    from hermes_orm.integrations.hermes.mirror import PERSISTED_MARK

    session = _Session(tmp_path)
    hello, hi, three, answer = _user("hello"), _answer("Hi."), _user("three"), _answer("Three.")
    session.hermes_writes(hello, hi, three)
    session.row(answer)  # committed, then the write raised: left unmarked
    session.row(DELIVERY)
    session.end_turn([hello, hi, three, answer])
    assert answer.get(PERSISTED_MARK) is True
    assert [content for _, content in session.contents()].count("Three.") == 1


@pytest.mark.parametrize("said", [1, 2], ids=["said once before", "said twice before"])
@pytest.mark.parametrize("stored", [True, False], ids=["stored", "not stored"])
def test_a_repeated_message_stored_before_its_write_raised_is_not_stored_again(
    tmp_path: Path, stored: bool, said: int
) -> None:
    """The user says "ok" again; a delivery came after the last "ok" Hermes confirmed,
    and the new one's write committed, then raised (or did not commit). The newest "ok"
    row is then the new message, not the confirmed one: it is stored once either way."""
    session = _Session(tmp_path)
    hello, hi = _user("hello"), _answer("Hi.")
    oks = [_user("ok") for _ in range(said)]
    session.hermes_writes(hello, hi, *oks)
    session.row(DELIVERY)
    again = _user("ok")
    if stored:
        session.row(again)  # committed, then the write raised: left unmarked
    session.end_turn([hello, hi, *oks, again])
    assert session.contents() == [
        ("user", "hello"),
        ("assistant", "Hi."),
        *[("user", "ok")] * said,
        ("assistant", DELIVERY["content"]),
        ("user", "ok"),
    ]


def test_a_database_out_of_reach_at_start_is_waited_for_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hermes opens several SessionDBs as it starts: the first waits out the store's
    span for the database; the next ones, within a minute, are told at once."""
    from hermes_orm import DatabaseUnavailableError, RetryPolicy
    from hermes_orm.integrations.hermes import plugin

    url = "postgresql+psycopg://u@127.0.0.1:1/nowhere"  # nobody listens on port 1
    tries: list[str] = []
    real_upgrade = SessionStore.upgrade

    def short(bind: str) -> SessionStore:  # the store's span, shortened for the test
        return SessionStore(bind, retry=RetryPolicy(unavailable_for=0.3))

    def counted(self: SessionStore, *args: Any, **kwargs: Any) -> None:
        tries.append("upgrade")
        real_upgrade(self, *args, **kwargs)

    monkeypatch.setattr(plugin, "SessionStore", short)
    monkeypatch.setattr(SessionStore, "upgrade", counted)
    try:
        with pytest.raises(DatabaseUnavailableError) as first:
            plugin.shared_store(url)
        assert first.value.attempts > 0
        for upgrade in (True, True, False):  # Hermes' next SessionDB() calls, read-only too
            with pytest.raises(DatabaseUnavailableError, match="tried again after that"):
                plugin.shared_store(url, upgrade=upgrade)
        assert tries == ["upgrade"]
        plugin._unreachable.clear()
        with pytest.raises(DatabaseUnavailableError):  # a read-only opener's look, typed
            plugin.shared_store(url, upgrade=False)
        assert tries == ["upgrade"]
        with pytest.raises(DatabaseUnavailableError, match="tried again after that"):
            plugin.shared_store(url)  # (and remembered too)
        assert tries == ["upgrade"]
        plugin._unreachable[url] = (0.0, first.value)  # the minute is over
        with pytest.raises(DatabaseUnavailableError):
            plugin.shared_store(url)
        assert tries == ["upgrade", "upgrade"]
    finally:
        plugin._close_shared()
