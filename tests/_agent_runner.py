"""Child process of ``tests/_hermes_agent.py``: one real Hermes ``AIAgent`` over some turns.

Usage: ``python tests/_agent_runner.py SPEC_JSON_PATH OUT_PATH``

Everything that isolates Hermes (``HERMES_HOME``, config.yaml, the environment) is set
up before ``run_agent``/``hermes_state`` are imported: Hermes computes its home and
installs its log handlers at import time, and ``import run_agent`` discovers (and
registers) the enabled plugins.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if not __package__:
    # Run by path, this script has its own directory as sys.path[0]; the checkout root
    # instead makes the harness importable under the name the tests use.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tests._hermes_agent import TOOL_FILES, AgentSpec

# Keys of the caller's environment that could route Hermes elsewhere or change it.
_SCRUBBED_PREFIXES = ("HERMES_",)
_SCRUBBED_NAMES = ("OPENAI_BASE_URL", "OPENROUTER_BASE_URL")


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _config(spec: AgentSpec) -> dict[str, Any]:
    """config.yaml for the agent (read by ``hermes_cli.config.load_config``)."""
    compression: dict[str, Any] = {
        "enabled": True,
        # Small protected ends so one [compress] turn has something to summarise.
        "protect_first_n": 0,
        "protect_last_n": 3,
    }
    if spec.compression_in_place is not None:
        compression["in_place"] = spec.compression_in_place
    config: dict[str, Any] = {
        # An explicit window skips the /models context probe; 64,000 is the
        # smallest Hermes accepts, so [compress]'s 60,000 prompt tokens cross it.
        "model": {"context_length": 64_000},
        "agent": {"environment_probe": False},  # no python3/pip probe subprocesses
        "memory": {
            # The review fork needs a memory store; nudge_interval 0 disables it.
            "memory_enabled": spec.review,
            "user_profile_enabled": False,
            "nudge_interval": 1 if spec.review else 0,
        },
        "skills": {"creation_nudge_interval": 0},  # no skill review fork
        "compression": compression,
        "plugins": {"enabled": ["hermes_orm"] if spec.plugin_enabled else []},
    }
    return _deep_merge(config, spec.extra_config)


def _prepare(spec: AgentSpec) -> None:
    """Isolate this process's Hermes: environment, config.yaml and the tool files."""
    home = spec.hermes_home
    work = home.with_name(home.name + ".work")
    tmp = home.with_name(home.name + ".tmp")
    for directory in (home, work, tmp):
        directory.mkdir(parents=True, exist_ok=True)
    for key in list(os.environ):
        if key.startswith(_SCRUBBED_PREFIXES) or key.endswith("_API_KEY") or key in _SCRUBBED_NAMES:
            del os.environ[key]  # no real provider keys or Hermes settings leak in
    os.environ["HERMES_HOME"] = str(home)
    os.environ["TERMINAL_CWD"] = str(work)  # read_file resolves relative paths here
    os.environ["TMPDIR"] = str(tmp)  # the terminal backend writes hermes-snap-*.sh here
    if spec.mirror_url:
        os.environ["HERMES_ORM_URL"] = spec.mirror_url
    # JSON is YAML, and spares this script a YAML dependency.
    (home / "config.yaml").write_text(json.dumps(_config(spec), indent=2))
    for name in TOOL_FILES:
        (work / name).write_text(f"contents of {name}\n")


class _Lock:
    """Another connection holding the write lock of the database at ``url`` while taken.

    SQLite: the file's (``BEGIN EXCLUSIVE``); PostgreSQL: the messages table's
    (``EXCLUSIVE``: rows can be read, none written).
    """

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self.url = make_url(url)
        self._conn: Any = None
        self._mutex = threading.Lock()

    def take(self) -> None:
        with self._mutex:
            if self.url.get_backend_name() == "sqlite":
                conn: Any = sqlite3.connect(
                    str(self.url.database), isolation_level=None, check_same_thread=False
                )
                conn.execute("BEGIN EXCLUSIVE")
            else:
                import psycopg

                dsn = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
                conn = psycopg.connect(dsn)
                conn.execute("LOCK TABLE hermes_messages IN EXCLUSIVE MODE")
            self._conn = conn

    def release(self) -> None:
        with self._mutex:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.rollback()
                conn.close()


class _Fault:
    """Make ``SessionDB.append_message`` raise once (or ``times`` times), for one turn's row.

    With ``locked``, a write that fails before its commit leaves another
    connection holding the database's write lock: ``"turn"``, until that turn
    ends (Hermes' end-of-turn hooks find it locked); a number, for that many
    seconds.
    """

    def __init__(self, fault: dict[str, Any], url: str | None) -> None:
        self.turn = int(fault["turn"])
        self.when = str(fault["when"])
        self.target = str(fault["target"])
        self.times = int(fault.get("times", 1))
        if self.when not in ("before", "after") or self.target not in ("call", "tool", "final"):
            raise ValueError(f"bad hermes_fault: {fault}")
        self.locked: str | float | None = fault.get("locked")
        self.lock = _Lock(url) if self.locked is not None and url else None
        self.current_turn = -1
        self.fired: list[dict[str, Any]] = []

    def _lock_the_database(self) -> None:
        if self.lock is None:
            return
        self.lock.take()
        if self.locked != "turn":
            threading.Timer(float(self.locked or 0), self.lock.release).start()

    def turn_ended(self) -> None:
        """The turn ended: a lock held until then is let go."""
        if self.lock is not None and self.locked == "turn":
            self.lock.release()

    def _hits(self, role: str, content: Any, tool_calls: Any) -> bool:
        if len(self.fired) >= self.times or self.current_turn != self.turn:
            return False
        if self.target == "call":  # the assistant message carrying the tool calls
            return role == "assistant" and bool(tool_calls)
        if self.target == "tool":
            return role == "tool"
        return (
            role == "assistant"
            and not tool_calls
            and isinstance(content, str)
            and content.startswith("Answer to:")
        )

    def install(self, session_db_class: Any) -> None:
        original: Callable[..., Any] = session_db_class.append_message
        signature = inspect.signature(original)
        fault = self

        def append_message(db: Any, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(db, *args, **kwargs)
            hit = fault._hits(
                bound.arguments["role"],
                bound.arguments.get("content"),
                bound.arguments.get("tool_calls"),
            )
            if hit and fault.when == "before":
                fault.fired.append({"turn": fault.turn, "when": "before", "row_id": None})
                fault._lock_the_database()
                raise RuntimeError("injected append_message failure (before commit)")
            row_id = original(db, *args, **kwargs)
            if hit:
                fault.fired.append({"turn": fault.turn, "when": "after", "row_id": row_id})
                raise RuntimeError("injected append_message failure (after commit)")
            return row_id

        session_db_class.append_message = append_message


@contextlib.contextmanager
def _mirror_down(spec: AgentSpec) -> Iterator[None]:
    """Keep the mirror database unavailable to this process's plugin for the block."""
    if not spec.mirror_url:
        yield
        return
    from sqlalchemy.engine import make_url

    url = make_url(spec.mirror_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        # An exclusive transaction from another connection: every write (and, in
        # rollback-journal mode, every read) gets SQLITE_BUSY until ROLLBACK. In WAL
        # mode readers still get through; only writes are refused.
        conn = sqlite3.connect(url.database or "", timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()
    elif backend == "postgresql":
        if not spec.mirror_admin_url:
            raise ValueError("mirror_down_turns on PostgreSQL needs mirror_admin_url")
        import psycopg
        from psycopg import sql

        admin = make_url(spec.mirror_admin_url).set(drivername="postgresql")
        database = sql.Identifier(url.database or "")
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as pg:
            # Refuse new connections, then drop the pooled ones the plugin holds.
            pg.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(database))
            pg.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (url.database,),
            )
            try:
                yield
            finally:
                pg.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(database))
    else:
        raise ValueError(f"mirror_down_turns: unsupported mirror URL {spec.mirror_url!r}")


#: Contexts held until the process exits (``AgentSpec.mirror_down_at_exit``).
_HELD = contextlib.ExitStack()


def _undo(agent: Any, db: Any, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Take back the last exchange as Hermes' CLI ``/undo`` does (``HermesCLI.undo_last``)."""
    cut = max(i for i, m in enumerate(history) if m.get("role") == "user")
    recents = db.list_recent_user_messages(agent.session_id, limit=10)
    if recents:
        db.rewind_to_message(agent.session_id, recents[0]["id"])
    agent._last_flushed_db_idx = cut
    return history[:cut]


def _write_result(out: Path, result: dict[str, Any]) -> None:
    """Replace ``out`` atomically, so a killed run leaves the last complete result."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out)


def _public(message: dict[str, Any]) -> dict[str, Any]:
    """A message without Hermes' internal ``_``-prefixed bookkeeping keys."""
    return {k: v for k, v in message.items() if not k.startswith("_")}


def main(spec_path: str, out_path: str) -> None:
    """Run the spec's turns and write the result after each one."""
    spec = AgentSpec.from_json(Path(spec_path).read_text())
    out = Path(out_path)
    _prepare(spec)

    import hermes_state

    early = hermes_state.SessionDB() if spec.db_before_plugins else None
    import run_agent  # type: ignore[import-untyped]  # (loads the plugins)

    fault = _Fault(spec.hermes_fault, spec.mirror_url) if spec.hermes_fault else None
    if fault is not None:
        fault.install(hermes_state.SessionDB)

    # $HERMES_HOME/state.db (or the plugin's store); AIAgent never opens one itself
    db = early if early is not None else hermes_state.SessionDB()
    session_id = spec.session_id
    history: list[dict[str, Any]] | None = None
    if spec.resume:
        # What `hermes --resume ID` does (hermes_cli/cli_agent_setup_mixin.py): follow a
        # compression chain to its live tip, load that transcript with the alternation
        # repair used for live replay, and reopen the ended session row.
        session_id = db.resolve_resume_session_id(session_id) or session_id
        history = [
            m
            for m in db.get_messages_as_conversation(session_id, repair_alternation=True)
            if m.get("role") != "session_meta"
        ]
        db.reopen_session(session_id)

    sessions: list[str] = []

    def seen(sid: str | None) -> None:
        if sid and sid not in sessions:
            sessions.append(sid)

    def on_event(name: str, data: dict[str, Any]) -> None:
        # Compression may rotate the session id mid-turn (in_place: false).
        if name == "session:compress":
            seen(data.get("session_id"))

    review = spec.review
    agent = run_agent.AIAgent(
        base_url=spec.llm_url,
        api_key="sk-fake",
        provider="custom",
        model="fake-model",
        quiet_mode=True,
        enabled_toolsets=["file", "memory"] if review else ["file"],
        skip_context_files=True,  # no AGENTS.md / SOUL.md from the working directory
        skip_memory=not review,  # the memory review fork needs a MemoryStore
        session_db=db,
        session_id=session_id,
        max_iterations=10,
        tool_delay=0,
        event_callback=on_event,
    )
    seen(agent.session_id)
    result: dict[str, Any] = {"turns": [], "sessions": sessions, "faults": []}
    _write_result(out, result)
    for index, text in enumerate(spec.turns):
        if fault is not None:
            fault.current_turn = index
        if index in spec.undo_before_turns and history:
            history = _undo(agent, db, history)
        if spec.mirror_down_at_exit and index == len(spec.turns) - 1:
            # Never left: the lock is held through the exit handlers, to the process's end.
            _HELD.enter_context(_mirror_down(spec))
        down = _mirror_down(spec) if index in spec.mirror_down_turns else contextlib.nullcontext()
        with down:
            started = time.perf_counter()
            res = agent.run_conversation(text, conversation_history=history)
            seconds = time.perf_counter() - started
        if fault is not None:
            fault.turn_ended()
        history = res["messages"]
        seen(agent.session_id)
        result["turns"].append(
            {
                "session_id": agent.session_id,
                "messages": [_public(m) for m in history],
                "seconds": seconds,
            }
        )
        result["faults"] = fault.fired if fault is not None else []
        _write_result(out, result)
        if spec.gateway:
            if index == 0:
                # What gateway/run.py appends after a new session's first turn (through
                # gateway/session.py's append_to_transcript): the transcript's opening row.
                db.append_message(
                    session_id=agent.session_id,
                    role="session_meta",
                    content=None,
                    timestamp=time.time(),
                )
            # The gateway's next message starts from the transcript as stored, without
            # its metadata rows (gateway/run.py's history loading).
            history = [
                m
                for m in db.get_messages_as_conversation(agent.session_id, repair_alternation=True)
                if m.get("role") not in ("session_meta", "system")
            ]

    if spec.close_persist and history is not None:
        # What the CLI's close does (cli.py _persist_active_session_before_close): its
        # conversation_history is the live list itself, so no baseline is passed.
        agent._persist_session(history, None)

    if spec.finalize is not None:
        # What the CLI's exit does (cli.py): the session's end, through the plugins.
        from hermes_cli.plugins import invoke_hook

        invoke_hook(
            "on_session_finalize",
            session_id=agent.session_id,
            platform="cli",
            reason=spec.finalize,
        )

    # The review forks are daemon threads: exiting now would cut them off mid-request.
    for thread in threading.enumerate():
        if thread.name == "bg-review":
            thread.join(timeout=60)
    # close() kills tool subprocesses and terminal sandboxes, closes the HTTP client and
    # ends the session row in Hermes' state.db (end_reason 'agent_close'). It fires no
    # plugin hook: on_session_end fired after every turn, and on_session_finalize only
    # comes from the CLI/gateway shutdown paths, not from AIAgent.
    agent.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: _agent_runner.py SPEC_JSON_PATH OUT_PATH")
    main(sys.argv[1], sys.argv[2])
