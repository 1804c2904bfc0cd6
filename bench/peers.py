"""hermes_orm beside the session stores users would pick instead: speed, and what a failure costs.

    python -m bench.peers            # 20 sessions x 25 turns, 3 rounds; prints Markdown
    python -m bench.peers --quick    # small sizes, one round

Every library persists the same agent workload (:func:`bench._workload.conversations`:
a user message, an assistant message with a tool call and reasoning, the tool's
result, per turn) through its own natural API, at its own default settings, into
a fresh database of its own: a SQLite file, or a PostgreSQL database created on
a server running at PostgreSQL's default durability. The sessions take their
turns round-robin, as behind a gateway; a library's time per turn is its total
over sessions x turns, the median over rounds whose order rotates.

The failure pass injects one failure into the real write path of each library
(driver statements and commits, through SQLAlchemy's events and the dialect's
``do_commit``, or wrappers around a bare ``sqlite3``/``psycopg`` connection),
lets the agent react as it naturally would, and counts the messages stored
twice and the messages never stored, against what the agent produced:

- *mid-persist*: the turn's persist fails as its second message row is written
  (its first row written; uncommitted where the turn is one transaction); the
  agent calls the persist of that turn again.
- *lost ack*: the commit that makes the turn's last message durable succeeds,
  and the caller gets an error anyway; the agent calls the persist again.
- *not retried*: as mid-persist, but the agent goes on with its next turn
  (hermes_orm's next flush still carries the whole list; an append API's next
  call carries the next turn only).

A statement that is a transaction of its own (hermes_orm's flush on
PostgreSQL, autocommitted) is where its failure hits: its rows are written and
it then fails, rolled back (mid-persist), or it commits and its answer is
replaced by an error (lost ack). Calling the persist again means: for
hermes_orm, the same ``flush`` of the whole list; for a call per message (ADK),
going on from the call that failed; for Hermes, what its agent does (each
message of the list not yet marked written is appended, and marked once its
append returned). The statement listeners make hermes_orm run its statements
through SQLAlchemy's execution, as it does on any engine an application watches
(its test suite injects the same failures into the driver path).

A library that is not installed is skipped, with a note in the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sqlite3
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn, Protocol

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from bench._common import DEFAULT_DURABILITY, hermes_append, libpq, rotations
from bench._workload import conversations, history

Msg = dict[str, Any]
Conversations = list[list[list[Msg]]]

SQLITE = "SQLite"
POSTGRESQL = "PostgreSQL"
BACKENDS = (SQLITE, POSTGRESQL)

HERMES_ORM = "hermes_orm flush"
HERMES = "Hermes 0.19 append_message x3"
OPENAI = "OpenAI Agents SDK SQLAlchemySession.add_items"
LANGCHAIN = "LangChain SQLChatMessageHistory.add_messages"
LANGCHAIN_PG = "langchain-postgres PostgresChatMessageHistory"
ADK = "Google ADK DatabaseSessionService.append_event x3"
LLAMAINDEX = "LlamaIndex SQLAlchemyChatStore"

#: The failure scenarios, as named in the results (after the backend).
MID, ACK, DROP = "mid-persist", "lost ack", "not retried"
SCENARIOS = (MID, ACK, DROP)
#: Calls of a turn's persist an agent makes before it gives the turn up.
ATTEMPTS = 3

#: A real server-side error (SQLSTATE 53100, disk_full): PostgreSQL aborts the transaction.
_PG_FAILURE = (
    "DO $$ BEGIN RAISE EXCEPTION 'injected: could not extend file' "
    "USING ERRCODE = 'disk_full'; END $$"
)
_SQLITE_FAILURE = "disk I/O error (injected)"
_LOST_ACK = "injected: the COMMIT was applied, its acknowledgement lost"


@dataclass
class PeerResults:
    """What :func:`run` measured; a missing backend key means the library does not support it."""

    #: library -> backend -> seconds per turn (a round's total over its turns; the median
    #: of the rounds), or the failure text.
    flush: dict[str, dict[str, float | str]] = field(default_factory=dict)
    #: library -> backend -> seconds of one read of the long session (median), or failure text.
    read: dict[str, dict[str, float | str]] = field(default_factory=dict)
    #: library -> "SQLite mid-persist" etc. -> (duplicated, lost), or failure text.
    failures: dict[str, dict[str, tuple[int, int] | str]] = field(default_factory=dict)
    #: library -> installed version (or why it was skipped).
    versions: dict[str, str] = field(default_factory=dict)
    #: What the run did, for the Markdown's header.
    workload: str = ""
    #: Things a reader of the tables should know (a failure absorbed by a retry, ...).
    notes: list[str] = field(default_factory=list)
    #: backend -> library -> seconds of the whole workload, one per round (in order).
    rounds: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def flush_ratio(self, backend: str, library: str = HERMES_ORM) -> tuple[float, str] | None:
        """``library``'s time over the fastest other library's, round by round (median).

        Within a round every library ran once, seconds apart, so the drift of a
        shared machine stays out of the ratio. None when no other library ran.
        """
        times = self.rounds.get(backend, {})
        ours = times.get(library, [])
        others = {name: t for name, t in times.items() if name != library and t}
        if not ours or not others:
            return None
        fastest = min(others, key=lambda name: statistics.median(others[name]))
        ratios = [
            mine / min(t[r] for t in others.values() if len(t) > r) for r, mine in enumerate(ours)
        ]
        return statistics.median(ratios), fastest


# -- databases -------------------------------------------------------------------------


@dataclass
class _Target:
    """One fresh database: its backend and URLs."""

    backend: str
    url: str  # SQLAlchemy URL: sqlite:///... or postgresql+psycopg://...
    path: Path | None = None  # the SQLite file

    def async_url(self) -> str:
        driver = "sqlite+aiosqlite" if self.backend == SQLITE else "postgresql+asyncpg"
        return make_url(self.url).set(drivername=driver).render_as_string(hide_password=False)

    def libpq(self) -> str:
        return libpq(self.url)


class _Databases:
    """Fresh databases: a SQLite file in a directory of its own, or a new PostgreSQL database."""

    def __init__(self, workdir: Path, pg_url: str | None) -> None:
        self.workdir = workdir
        self.pg_url = pg_url
        self._n = 0
        self._admin: Engine | None = None
        if pg_url is not None:
            self._admin = create_engine(
                make_url(pg_url), poolclass=NullPool, isolation_level="AUTOCOMMIT"
            )

    @contextlib.contextmanager
    def fresh(self, backend: str) -> Iterator[_Target]:
        self._n += 1
        name = f"peers_{os.getpid()}_{self._n}"
        if backend == SQLITE:
            folder = self.workdir / name
            folder.mkdir()
            path = folder / "state.db"
            try:
                yield _Target(SQLITE, f"sqlite:///{path}", path)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            return
        assert self._admin is not None
        assert self.pg_url is not None
        with self._admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = make_url(self.pg_url).set(database=name).render_as_string(hide_password=False)
        try:
            yield _Target(POSTGRESQL, url)
        finally:
            with self._admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self._admin is not None:
            self._admin.dispose()


# -- failure injection -----------------------------------------------------------------


class _Fault:
    """One failure, injected once into a library's write path while armed.

    The write path reports each statement before and after it runs, and each
    commit; the fault says where the failure hits (see the module's docstring).
    """

    def __init__(self, scenario: str, table: str, *, one_call: bool) -> None:
        self.scenario = scenario
        self._insert = re.compile(rf'\binsert\s+(or\s+\w+\s+)?into\s+"?{table}"?[\s(]', re.I)
        #: The turn is one persist call: its commit is the first chance for a mid failure.
        self.one_call = one_call
        self.armed = False
        #: Per-message APIs: whether the call under way writes the turn's last message.
        self.last_call = True
        self.wrote = False  # a message row of the armed turn was written
        self.fired = False

    def arm(self) -> None:
        self.armed, self.wrote, self.last_call = True, False, True

    def disarm(self) -> None:
        self.armed = False

    def _live(self) -> bool:
        return self.armed and not self.fired

    def before_statement(self, sql: str, rows: int, *, alone: bool = False) -> str:
        """``run``, ``fail`` (before it runs), ``first`` (its first row only, then fail).

        ``alone``: the statement is a transaction of its own (autocommitted): one
        that writes the turn's message rows is where the failure hits, as
        ``inside`` (its rows written, then the statement fails and they are
        rolled back) or, for a lost acknowledgement, ``ack`` (it commits, then
        the caller is told it failed).
        """
        if not self._live():
            return "run"
        if alone and self._insert.search(sql) and (self.scenario != ACK or self.last_call):
            self.fired = self.wrote = True
            return "ack" if self.scenario == ACK else "inside"
        if self.scenario == ACK:
            return "run"
        # One transaction a turn: its next statement; one call a message: the next message.
        if self.wrote and (self.one_call or self._insert.search(sql)):
            self.fired = True
            return "fail"
        if rows > 1 and self._insert.search(sql):
            self.fired = self.wrote = True
            return "first"
        return "run"

    def after_statement(self, sql: str) -> None:
        if self._live() and self._insert.search(sql):
            self.wrote = True

    def before_commit(self) -> bool:
        """Whether the commit fails instead of committing."""
        if self._live() and self.scenario != ACK and self.wrote and self.one_call:
            self.fired = True
            return True
        return False

    def after_commit(self) -> bool:
        """Whether the caller is told the commit that just succeeded failed."""
        if self._live() and self.scenario == ACK and self.wrote and self.last_call:
            self.fired = True
            return True
        return False


def _watch_engine(engine: Engine, fault: _Fault) -> None:
    """Route ``engine``'s driver statements and commits through ``fault``.

    A statement fails as the driver would fail it: on PostgreSQL by a real
    server error (the server aborts the transaction), on SQLite by
    ``sqlite3.OperationalError``; SQLAlchemy wraps it as it wraps any driver error.
    """
    dialect = engine.dialect
    dbapi: Any = dialect.loaded_dbapi
    postgres = dialect.name == "postgresql"

    def fail(cursor: Any) -> NoReturn:
        if postgres:
            cursor.execute(_PG_FAILURE)
        raise dbapi.OperationalError(_SQLITE_FAILURE)

    def fail_commit(dbapi_connection: Any) -> NoReturn:
        # A failed COMMIT ends the transaction (PostgreSQL's, and SQLite's I/O error).
        try:
            fail(dbapi_connection.cursor())
        finally:
            dbapi_connection.rollback()

    def statement(cursor: Any, sql: str, params: Any, rows: int) -> bool | None:
        # (psycopg's connection says; an asyncio driver's cursor has none)
        alone = postgres and getattr(getattr(cursor, "connection", None), "autocommit", 0) is True
        action = fault.before_statement(sql, rows, alone=alone)
        if action == "fail":
            fail(cursor)
        if action == "first":
            cursor.executemany(sql, list(params)[:1])
            fail(cursor)
        if action == "inside":
            cursor.execute("BEGIN")  # its rows written, never committed
            try:
                cursor.execute(sql, params)
                fail(cursor)
            finally:
                cursor.execute("ROLLBACK")
        if action == "ack":
            cursor.execute(sql, params)  # committed: its answer is what is lost
            raise dbapi.OperationalError(_LOST_ACK)
        return None

    def do_execute(cursor: Any, sql: str, params: Any, _context: Any) -> bool | None:
        return statement(cursor, sql, params, 1)

    def do_execute_no_params(cursor: Any, sql: str, _context: Any) -> bool | None:
        return statement(cursor, sql, (), 1)

    def do_executemany(cursor: Any, sql: str, params: Any, _context: Any) -> bool | None:
        return statement(cursor, sql, params, len(params))

    def after(*args: Any) -> None:
        fault.after_statement(args[2])

    event.listen(engine, "do_execute", do_execute)
    event.listen(engine, "do_execute_no_params", do_execute_no_params)
    event.listen(engine, "do_executemany", do_executemany)
    event.listen(engine, "after_cursor_execute", after)
    commit = dialect.do_commit

    def do_commit(dbapi_connection: Any) -> None:
        if fault.before_commit():
            fail_commit(dbapi_connection)
        commit(dbapi_connection)
        if fault.after_commit():
            raise dbapi.OperationalError(_LOST_ACK)

    dialect.do_commit = do_commit  # type: ignore[method-assign]


class _FaultySqlite:
    """A ``sqlite3.Connection`` whose statements and commits go through a fault first."""

    def __init__(self, conn: sqlite3.Connection, fault: _Fault) -> None:
        self._conn = conn
        self._fault = fault

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        if self._fault.before_statement(sql, 1) != "run":
            raise sqlite3.OperationalError(_SQLITE_FAILURE)
        cursor = self._conn.execute(sql, params)
        self._fault.after_statement(sql)
        return cursor

    def executemany(self, sql: str, params: Sequence[Any]) -> sqlite3.Cursor:
        action = self._fault.before_statement(sql, len(params))
        if action == "first":
            self._conn.executemany(sql, list(params)[:1])
        if action != "run":
            raise sqlite3.OperationalError(_SQLITE_FAILURE)
        cursor = self._conn.executemany(sql, params)
        self._fault.after_statement(sql)
        return cursor

    def commit(self) -> None:
        if self._fault.before_commit():
            self._conn.rollback()  # a failed COMMIT ends the transaction
            raise sqlite3.OperationalError(_SQLITE_FAILURE)
        self._conn.commit()
        if self._fault.after_commit():
            raise sqlite3.OperationalError(_LOST_ACK)


def _faulty_psycopg(libpq: str, fault: _Fault) -> Any:
    """A psycopg connection whose cursors' statements and whose commits go through ``fault``."""
    import psycopg

    def text(conn: Any, query: Any) -> str:
        return query if isinstance(query, str) else str(query.as_string(conn))

    class Cursor(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            sql = text(self.connection, query)
            if fault.before_statement(sql, 1) != "run":
                super().execute(_PG_FAILURE)
            result = super().execute(query, params, **kwargs)
            fault.after_statement(sql)
            return result

        def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
            sql = text(self.connection, query)
            params = list(params_seq)
            action = fault.before_statement(sql, len(params))
            if action == "first":
                super().executemany(query, params[:1], **kwargs)
            if action != "run":
                super().execute(_PG_FAILURE)
            super().executemany(query, params, **kwargs)
            fault.after_statement(sql)

    class Connection(psycopg.Connection[Any]):
        def commit(self) -> None:
            if fault.before_commit():
                try:
                    self.execute(_PG_FAILURE)
                finally:
                    self.rollback()  # a failed COMMIT ends the transaction
            super().commit()
            if fault.after_commit():
                raise psycopg.OperationalError(_LOST_ACK)

    return Connection.connect(libpq, cursor_factory=Cursor)


# -- the libraries ---------------------------------------------------------------------


class _Handle(Protocol):
    """One library open on one database, holding ``sessions`` sessions."""

    async def persist(self, s: int, turn: list[Msg], whole: list[Msg]) -> None:
        """Persist session ``s``'s new ``turn``; ``whole`` is the agent's list so far."""

    async def recover(self, s: int, exc: BaseException) -> None:
        """What the agent does after a failed persist, before it goes on."""

    async def texts(self, s: int) -> list[str]:
        """The stored messages of session ``s``, each by its text, in order."""

    async def read(self, s: int) -> int:
        """Read session ``s``'s history through the library's read API; its length."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class _Peer:
    """A library: how to open it on a database, and what it supports."""

    name: str
    distribution: str
    module: str  # imported to tell whether it is installed
    backends: tuple[str, ...]
    table: str  # where its message rows go (the fault looks for their INSERTs)
    calls_per_turn: int  # persist calls of one turn
    open: Callable[[_Target, int, _Fault | None], Any]  # async -> _Handle


def _text(m: Msg) -> str:
    return str(m["content"])


def _args(call: Msg) -> Any:
    return json.loads(call["function"]["arguments"])


# hermes_orm


class _HermesOrm:
    def __init__(self, store: Any) -> None:
        self.store = store

    async def persist(self, s: int, turn: list[Msg], whole: list[Msg]) -> None:
        self.store.flush(f"s{s}", whole)

    async def recover(self, s: int, exc: BaseException) -> None:
        return None

    async def texts(self, s: int) -> list[str]:
        return [_text(m) for m in self.store.get_messages(f"s{s}")]

    async def read(self, s: int) -> int:
        return len(self.store.get_messages(f"s{s}"))

    async def close(self) -> None:
        self.store.close()


async def _open_hermes_orm(target: _Target, sessions: int, fault: _Fault | None) -> _Handle:
    import hermes_orm

    store = hermes_orm.SessionStore(target.url)
    store.upgrade()
    for s in range(sessions):
        store.create_session(f"s{s}", source="bench")
    store.get_session("s0")  # schema check and a warm connection, as in a live agent
    if fault is not None:
        _watch_engine(store.engine, fault)
    return _HermesOrm(store)


# Hermes Agent's SessionDB


class _Hermes:
    """Hermes' agent: each message of its list not yet marked written is appended.

    A message is marked once its append returned (``run_agent``'s
    ``_db_persisted``): a retry, or the next turn, sends what a failure left
    unmarked. The marks here are a count per session (the messages before it
    are marked), not keys on the workload's shared dicts.
    """

    def __init__(self, db: Any, fault: _Fault | None) -> None:
        self.db = db
        self.fault = fault
        self.marked: Counter[int] = Counter()

    async def persist(self, s: int, turn: list[Msg], whole: list[Msg]) -> None:
        for i in range(self.marked[s], len(whole)):
            if self.fault is not None:
                self.fault.last_call = i == len(whole) - 1
            hermes_append(self.db, f"s{s}", whole[i])
            self.marked[s] = i + 1

    async def recover(self, s: int, exc: BaseException) -> None:
        return None

    async def texts(self, s: int) -> list[str]:
        return [_text(m) for m in self.db.get_messages(f"s{s}")]

    async def read(self, s: int) -> int:
        return len(self.db.get_messages(f"s{s}"))

    async def close(self) -> None:
        self.db.close()


async def _open_hermes(target: _Target, sessions: int, fault: _Fault | None) -> _Handle:
    from hermes_state import SessionDB

    assert target.path is not None
    db = SessionDB(target.path)
    for s in range(sessions):
        db.create_session(f"s{s}", source="bench")
    if fault is not None:
        db._conn = _FaultySqlite(db._conn, fault)
    return _Hermes(db, fault)


# OpenAI Agents SDK


def _openai_items(m: Msg) -> list[dict[str, Any]]:
    """A message as Responses API input items, as the SDK stores a run's items."""
    if m["role"] == "user":
        return [{"role": "user", "content": m["content"]}]
    if m["role"] == "tool":
        return [
            {"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]}
        ]
    calls = m.get("tool_calls") or []
    ref = calls[0]["id"] if calls else "0"
    items: list[dict[str, Any]] = []
    if m.get("reasoning"):
        summary = [{"type": "summary_text", "text": m["reasoning"]}]
        items.append({"type": "reasoning", "id": f"rs_{ref}", "summary": summary})
    items.append(
        {
            "type": "message",
            "id": f"msg_{ref}",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": m["content"], "annotations": []}],
        }
    )
    items += [
        {
            "type": "function_call",
            "call_id": c["id"],
            "name": c["function"]["name"],
            "arguments": c["function"]["arguments"],
        }
        for c in calls
    ]
    return items


def _openai_text(item: dict[str, Any]) -> str | None:
    if item.get("role") == "user":
        return str(item["content"])
    if item.get("type") == "message":
        return str(item["content"][0]["text"])
    if item.get("type") == "function_call_output":
        return str(item["output"])
    return None  # reasoning and function_call items belong to the assistant message


class _OpenAI:
    def __init__(self, engine: Any, sessions: list[Any]) -> None:
        self.engine = engine
        self.sessions = sessions

    async def persist(self, s: int, turn: list[Msg], whole: list[Msg]) -> None:
        await self.sessions[s].add_items([item for m in turn for item in _openai_items(m)])

    async def recover(self, s: int, exc: BaseException) -> None:
        return None

    async def texts(self, s: int) -> list[str]:
        items = await self.sessions[s].get_items()
        return [t for t in map(_openai_text, items) if t is not None]

    async def read(self, s: int) -> int:
        return len(await self.sessions[s].get_items())

    async def close(self) -> None:
        await self.engine.dispose()


async def _open_openai(target: _Target, sessions: int, fault: _Fault | None) -> _Handle:
    from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(target.async_url())
    handles = [
        SQLAlchemySession(f"s{s}", engine=engine, create_tables=True) for s in range(sessions)
    ]
    for session in handles:
        await session.get_items()  # creates the tables
    if fault is not None:
        _watch_engine(engine.sync_engine, fault)
    return _OpenAI(engine, handles)


# LangChain


def _langchain_message(m: Msg) -> Any:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    if m["role"] == "user":
        return HumanMessage(content=m["content"])
    if m["role"] == "tool":
        return ToolMessage(
            content=m["content"], tool_call_id=m["tool_call_id"], name=m["tool_name"]
        )
    calls = [
        {"name": c["function"]["name"], "args": _args(c), "id": c["id"], "type": "tool_call"}
        for c in m.get("tool_calls") or []
    ]
    kwargs = {"reasoning_content": m["reasoning"]} if m.get("reasoning") else {}
    return AIMessage(content=m["content"], tool_calls=calls, additional_kwargs=kwargs)


class _LangChain:
    def __init__(self, engine: Engine, histories: list[Any]) -> None:
        self.engine = engine
        self.histories = histories

    async def persist(self, s: int, turn: list[Msg], whole: list[Msg]) -> None:
        self.histories[s].add_messages([_langchain_message(m) for m in turn])

    async def recover(self, s: int, exc: BaseException) -> None:
        return None

    async def texts(self, s: int) -> list[str]:
        return [str(m.content) for m in self.histories[s].messages]

    async def read(self, s: int) -> int:
        return len(self.histories[s].messages)

    async def close(self) -> None:
        self.engine.dispose()


async def _open_langchain(target: _Target, sessions: int, fault: _Fault | None) -> _Handle:
    from langchain_community.chat_message_histories import SQLChatMessageHistory

    engine = create_engine(target.url)
    histories = [SQLChatMessageHistory(f"s{s}", connection=engine) for s in range(sessions)]
    if fault is not None:
        _watch_engine(engine, fault)
    return _LangChain(engine, histories)


# langchain-postgres


class _LangChainPostgres:
    def __init__(self, conn: Any, histories: list[Any]) -> None:
        self.conn = conn
        self.histories = histories

    async def persist(self, s: int, turn: list[Msg], whole: list[Msg]) -> None:
        self.histories[s].add_messages([_langchain_message(m) for m in turn])

    async def recover(self, s: int, exc: BaseException) -> None:
        # The application owns the psycopg connection; add_messages leaves a failed
        # transaction open on it, and nothing works on it until it is rolled back.
        self.conn.rollback()

    async def texts(self, s: int) -> list[str]:
        return [str(m.content) for m in self.histories[s].get_messages()]

    async def read(self, s: int) -> int:
        return len(self.histories[s].get_messages())

    async def close(self) -> None:
        self.conn.close()


async def _open_langchain_pg(target: _Target, sessions: int, fault: _Fault | None) -> _Handle:
    import psycopg
    from langchain_postgres import PostgresChatMessageHistory

    conn = (
        psycopg.connect(target.libpq()) if fault is None else _faulty_psycopg(target.libpq(), fault)
    )
    PostgresChatMessageHistory.create_tables(conn, "chat_history")
    histories = [
        PostgresChatMessageHistory(
            "chat_history", str(uuid.uuid5(uuid.NAMESPACE_URL, f"s{s}")), sync_connection=conn
        )
        for s in range(sessions)
    ]
    return _LangChainPostgres(conn, histories)


# Google ADK


def _adk_event(m: Msg) -> Any:
    from google.adk.events import Event
    from google.genai import types

    if m["role"] == "user":
        content = types.Content(role="user", parts=[types.Part(text=m["content"])])
        return Event(invocation_id="bench", author="user", content=content)
    if m["role"] == "tool":
        response = types.FunctionResponse(
            id=m["tool_call_id"], name=m["tool_name"], response={"output": m["content"]}
        )
        content = types.Content(role="user", parts=[types.Part(function_response=response)])
        return Event(invocation_id="bench", author="agent", content=content)
    parts = [types.Part(text=m["reasoning"], thought=True)] if m.get("reasoning") else []
    parts.append(types.Part(text=m["content"]))
    parts += [
        types.Part(
            function_call=types.FunctionCall(id=c["id"], name=c["function"]["name"], args=_args(c))
        )
        for c in m.get("tool_calls") or []
    ]
    content = types.Content(role="model", parts=parts)
    return Event(invocation_id="bench", author="agent", content=content)


def _adk_text(event: Any) -> str | None:
    for part in event.content.parts if event.content is not None else []:
        if part.function_response is not None:
            return str(part.function_response.response["output"])
        if part.text is not None and not part.thought:
            return str(part.text)
    return None


class _Adk:
    def __init__(self, service: Any, sessions: list[Any], fault: _Fault | None) -> None:
        self.service = service
        self.sessions = sessions
        self.fault = fault
        #: The events the agent made for a turn, and how many of them were appended.
        self.events: dict[int, list[Any]] = {}
        self.appended: Counter[int] = Counter()

    async def persist(self, s: int, turn: list[Msg], whole: list[Msg]) -> None:
        key = id(turn)
        # The agent makes a turn's events once; a retry goes on from the event whose
        # append failed (the same event again: it may have been stored).
        events = self.events.setdefault(key, [_adk_event(m) for m in turn])
        for i in range(self.appended[key], len(events)):
            if self.fault is not None:
                self.fault.last_call = i == len(events) - 1
            await self.service.append_event(self.sessions[s], events[i])
            self.appended[key] = i + 1
        if self.fault is None:  # (the timed runs: nothing kept)
            del self.events[key]
            self.appended.pop(key, None)

    async def recover(self, s: int, exc: BaseException) -> None:
        from google.adk.errors import StaleSessionError

        if isinstance(exc, StaleSessionError):  # the remedy ADK's message names: reload
            self.sessions[s] = await self._get(s)

    async def _get(self, s: int) -> Any:
        return await self.service.get_session(app_name="bench", user_id="u", session_id=f"s{s}")

    async def texts(self, s: int) -> list[str]:
        session = await self._get(s)
        return [t for t in map(_adk_text, session.events) if t is not None]

    async def read(self, s: int) -> int:
        return len((await self._get(s)).events)

    async def close(self) -> None:
        await self.service.close()


async def _open_adk(target: _Target, sessions: int, fault: _Fault | None) -> _Handle:
    from google.adk.sessions import DatabaseSessionService

    service = DatabaseSessionService(db_url=target.async_url())
    handles = [
        await service.create_session(app_name="bench", user_id="u", session_id=f"s{s}")
        for s in range(sessions)
    ]
    if fault is not None:
        _watch_engine(service.db_engine.sync_engine, fault)
    return _Adk(service, handles, fault)


# LlamaIndex


def _llama_message(m: Msg) -> Any:
    from llama_index.core.llms import ChatMessage, MessageRole

    if m["role"] == "user":
        return ChatMessage(role=MessageRole.USER, content=m["content"])
    if m["role"] == "tool":
        extra = {"tool_call_id": m["tool_call_id"], "name": m["tool_name"]}
        return ChatMessage(role=MessageRole.TOOL, content=m["content"], additional_kwargs=extra)
    extra = {"tool_calls": m.get("tool_calls") or [], "reasoning": m.get("reasoning")}
    return ChatMessage(role=MessageRole.ASSISTANT, content=m["content"], additional_kwargs=extra)


class _Llama:
    def __init__(self, store: Any, engine: Any) -> None:
        self.store = store
        self.engine = engine

    async def persist(self, s: int, turn: list[Msg], whole: list[Msg]) -> None:
        await self.store.add_messages(f"s{s}", [_llama_message(m) for m in turn])

    async def recover(self, s: int, exc: BaseException) -> None:
        return None

    async def texts(self, s: int) -> list[str]:
        return [str(m.content) for m in await self.store.get_messages(f"s{s}")]

    async def read(self, s: int) -> int:
        return len(await self.store.get_messages(f"s{s}"))

    async def close(self) -> None:
        await self.engine.dispose()


async def _open_llama(target: _Target, sessions: int, fault: _Fault | None) -> _Handle:
    from llama_index.core.storage.chat_store.sql import SQLAlchemyChatStore
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(target.async_url())  # what the store makes from a URI
    store = SQLAlchemyChatStore(table_name="llama_chat", async_engine=engine)
    await store.get_messages("s0")  # creates the table
    if fault is not None:
        _watch_engine(engine.sync_engine, fault)
    return _Llama(store, engine)


PEERS: tuple[_Peer, ...] = (
    _Peer(HERMES_ORM, "hermes-orm-sessions", "hermes_orm", BACKENDS, "hermes_messages", 1,
          _open_hermes_orm),
    _Peer(HERMES, "hermes-agent", "hermes_state", (SQLITE,), "messages", 3, _open_hermes),
    _Peer(OPENAI, "openai-agents", "agents.extensions.memory.sqlalchemy_session", BACKENDS,
          "agent_messages", 1, _open_openai),
    _Peer(LANGCHAIN, "langchain-community", "langchain_community.chat_message_histories",
          BACKENDS, "message_store", 1, _open_langchain),
    _Peer(LANGCHAIN_PG, "langchain-postgres", "langchain_postgres", (POSTGRESQL,),
          "chat_history", 1, _open_langchain_pg),
    _Peer(ADK, "google-adk", "google.adk.sessions", BACKENDS, "events", 3, _open_adk),
    _Peer(LLAMAINDEX, "llama-index-core", "llama_index.core.storage.chat_store.sql", BACKENDS,
          "llama_chat", 1, _open_llama),
)  # fmt: skip


# -- measurements ----------------------------------------------------------------------


def _failure_text(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"failed: {type(exc).__name__}: {first}"[:160]


async def _timed_turns(peer: _Peer, target: _Target, convs: Conversations) -> float:
    """Seconds of the whole workload: every session's turn t before any session's t+1."""
    handle: _Handle = await peer.open(target, len(convs), None)
    lists: list[list[Msg]] = [[] for _ in convs]
    os.sync()  # the setup's writes are not flushed during the timed run
    start = time.perf_counter()
    for t in range(len(convs[0])):
        for s, conv in enumerate(convs):
            lists[s].extend(conv[t])
            await handle.persist(s, conv[t], lists[s])
    elapsed = time.perf_counter() - start
    await handle.close()
    return elapsed


def _flush_pass(
    dbs: _Databases,
    backend: str,
    peers: list[_Peer],
    convs: Conversations,
    *,
    rounds: int,
    progress: Callable[[str], None],
) -> tuple[dict[str, float | str], dict[str, list[float]]]:
    """Per-turn time of each peer on ``backend`` (median over rounds of total / turns).

    And each peer's totals, round by round.
    """
    times: dict[str, list[float]] = {p.name: [] for p in peers}
    failed: dict[str, str] = {}
    by_name = {p.name: p for p in peers}
    turns = len(convs) * len(convs[0])
    for r, order in enumerate(rotations(list(by_name), rounds)):
        for name in order:
            if name in failed:
                continue
            progress(f"{backend} turns, round {r + 1}/{rounds}: {name}")
            with dbs.fresh(backend) as target:
                try:
                    times[name].append(asyncio.run(_timed_turns(by_name[name], target, convs)))
                except Exception as exc:
                    failed[name] = _failure_text(exc)
                    progress(f"  {failed[name]}")
    p50 = {name: failed.get(name) or statistics.median(times[name]) / turns for name in by_name}
    return p50, {name: times[name] for name in by_name if name not in failed}


async def _timed_reads(peer: _Peer, target: _Target, length: int, repeat: int) -> float:
    """Median seconds of reading a ``length``-message session back, after a warm-up read."""
    handle: _Handle = await peer.open(target, 1, None)
    msgs = history(length)
    await handle.persist(0, msgs, msgs)
    await handle.read(0)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        await handle.read(0)
        samples.append(time.perf_counter() - start)
    stored = await handle.texts(0)
    await handle.close()
    if stored != [_text(m) for m in msgs]:
        raise RuntimeError(f"read back {len(stored)} messages, not the {length} written")
    return statistics.median(samples)


async def _failure_run(
    peer: _Peer, target: _Target, convs: Conversations, scenario: str
) -> tuple[int, int, list[str]]:
    """Duplicated and lost messages after one injected failure; the errors the agent saw."""
    fault = _Fault(scenario, peer.table, one_call=peer.calls_per_turn == 1)
    handle: _Handle = await peer.open(target, len(convs), fault)
    victim = (len(convs) // 2, len(convs[0]) // 2)
    lists: list[list[Msg]] = [[] for _ in convs]
    seen: list[str] = []
    for t in range(len(convs[0])):
        for s, conv in enumerate(convs):
            lists[s].extend(conv[t])
            if (s, t) == victim:
                fault.arm()
            for _ in range(1 if scenario == DROP else ATTEMPTS):
                try:
                    await handle.persist(s, conv[t], lists[s])
                    break
                except Exception as exc:
                    seen.append(type(exc).__name__)
                    await handle.recover(s, exc)
            fault.disarm()
    if not fault.fired:
        await handle.close()
        raise RuntimeError("the injected failure was never reached")
    duplicated = lost = 0
    for s, conv in enumerate(convs):
        stored = Counter(await handle.texts(s))
        for m in (m for turn in conv for m in turn):
            n = stored[_text(m)]
            duplicated += max(0, n - 1)
            lost += n == 0
    await handle.close()
    return duplicated, lost, seen


def _read_pass(dbs: _Databases, backend: str, peer: _Peer, length: int, repeat: int) -> float | str:
    with dbs.fresh(backend) as target:
        try:
            return asyncio.run(_timed_reads(peer, target, length, repeat))
        except Exception as exc:
            return _failure_text(exc)


def _failure_pass(
    dbs: _Databases, backend: str, peer: _Peer, convs: Conversations, scenario: str
) -> tuple[tuple[int, int] | str, str]:
    """(duplicated, lost) or the failure text; the errors the agent saw, comma-separated."""
    with dbs.fresh(backend) as target:
        try:
            dup, lost, seen = asyncio.run(_failure_run(peer, target, convs, scenario))
        except Exception as exc:
            return _failure_text(exc), ""
    return (dup, lost), ", ".join(seen)


def _available(peer: _Peer) -> str | None:
    """The installed version, or None when the library cannot be imported."""
    try:
        __import__(peer.module)
    except Exception:
        return None
    try:
        return metadata.version(peer.distribution)
    except metadata.PackageNotFoundError:
        return "unknown version"


def run(
    pg_url: str | None,
    workdir: Path,
    *,
    sessions: int = 20,
    turns: int = 25,
    rounds: int = 3,
    quick: bool = False,
    progress: Callable[[str], None] = print,
) -> PeerResults:
    """Measure every installed library on SQLite and, given ``pg_url``, on PostgreSQL.

    Args:
        pg_url: A SQLAlchemy URL of a PostgreSQL server's maintenance database
            (``postgresql+psycopg://``); the run creates and drops databases on it.
        workdir: Where the SQLite files go.
        sessions: Sessions of the per-turn workload.
        turns: Turns of each session.
        rounds: Rounds of the per-turn workload (the per-turn time is their median).
        quick: Small sizes (a few sessions and turns, one round): a smoke run.
        progress: Told what runs next.
    """
    if quick:
        sessions, turns, rounds = min(sessions, 4), min(turns, 5), 1
    read_length, read_repeat = (200, 3) if quick else (1_000, 5)
    fail_sessions, fail_turns = (2, 4) if quick else (3, 6)
    results = PeerResults(
        workload=(
            f"{sessions} sessions x {turns} turns (3 messages a turn), {rounds} round(s); "
            f"read of a {read_length:,}-message session, median of {read_repeat}; "
            f"failure pass {fail_sessions} sessions x {fail_turns} turns"
        )
    )
    # hermes_orm's sqlite3 adapters serve the whole process once a store exists:
    # registered first, every sqlite3 side (Hermes) binds alike from the start.
    from hermes_orm import _dialects

    _dialects.register_sqlite_adapters()
    peers = []
    for peer in PEERS:
        version = _available(peer)
        if version is None:
            results.versions[peer.name] = f"not installed (pip install {peer.distribution})"
        else:
            results.versions[peer.name] = version
            peers.append(peer)
    backends = [SQLITE] + ([POSTGRESQL] if pg_url is not None else [])
    dbs = _Databases(workdir, pg_url)
    try:
        convs = conversations(sessions, turns)
        for backend in backends:
            on = [p for p in peers if backend in p.backends]
            p50, totals = _flush_pass(dbs, backend, on, convs, rounds=rounds, progress=progress)
            for name, value in p50.items():
                results.flush.setdefault(name, {})[backend] = value
            results.rounds[backend] = totals
        for backend in backends:
            for peer in (p for p in peers if backend in p.backends):
                progress(f"{backend} read of {read_length:,} messages: {peer.name}")
                results.read.setdefault(peer.name, {})[backend] = _read_pass(
                    dbs, backend, peer, read_length, read_repeat
                )
        small = conversations(fail_sessions, fail_turns, seed=23)
        for backend in backends:
            for peer in (p for p in peers if backend in p.backends):
                for scenario in SCENARIOS:
                    progress(f"{backend} failure, {scenario}: {peer.name}")
                    outcome, seen = _failure_pass(dbs, backend, peer, small, scenario)
                    results.failures.setdefault(peer.name, {})[f"{backend} {scenario}"] = outcome
                    if isinstance(outcome, tuple):
                        progress(f"  {outcome[0]} / {outcome[1]}; the agent saw: {seen or '-'}")
                        if not seen:
                            results.notes.append(
                                f"{peer.name}, {backend} {scenario}: the library's own "
                                "retry absorbed the failure (the agent saw no error)."
                            )
    finally:
        dbs.close()
    return results


# -- report ----------------------------------------------------------------------------


def _ms(value: float | str | None) -> str:
    if value is None:
        return "not supported"
    if isinstance(value, str):
        return value.replace("|", "/")
    return f"{value * 1000:.2f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results: PeerResults) -> str:
    """The results as Markdown: per-turn time, read time, failure counts, versions."""
    names = list(results.versions)
    measured = [n for n in names if n in results.flush or n in results.read]
    backends = [b for b in BACKENDS if any(b in results.flush.get(n, {}) for n in names)]
    skipped = "not installed"

    def cell(table: dict[str, dict[str, float | str]], name: str, backend: str) -> str:
        if name not in measured:
            return skipped
        return _ms(table.get(name, {}).get(backend))

    flush = _table(
        ["library", *(f"{b} ms per turn (median of the rounds)" for b in backends)],
        [[n, *(cell(results.flush, n, b) for b in backends)] for n in names],
    )
    read = _table(
        ["library", *(f"{b} read ms (median)" for b in backends)],
        [[n, *(cell(results.read, n, b) for b in backends)] for n in names],
    )
    columns = [f"{b} {s}" for b in backends for s in SCENARIOS]

    def failure(name: str, column: str) -> str:
        if name not in measured:
            return skipped
        value = results.failures.get(name, {}).get(column)
        if value is None:
            return "not supported"
        return value.replace("|", "/") if isinstance(value, str) else f"{value[0]} / {value[1]}"

    failures = _table(
        ["library (duplicated / lost)", *columns],
        [[n, *(failure(n, c) for c in columns)] for n in names],
    )
    versions = "\n".join(f"- {n}: {v}" for n, v in results.versions.items())
    notes = "\n".join(f"- {n}" for n in results.notes)
    parts = [
        f"Workload: {results.workload}." if results.workload else "",
        "### Persist per turn",
        flush,
        "### Read of one long session",
        read,
        "### Failure injection (messages duplicated / lost)",
        failures,
        f"Notes:\n\n{notes}" if notes else "",
        f"Versions:\n\n{versions}",
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def chart(results: PeerResults, path: Path) -> None:
    """A horizontal bar chart of the per-turn time (ms), one bar per backend, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results.versions if n in results.flush]
    backends = [b for b in BACKENDS if any(b in results.flush[n] for n in names)]
    height = 0.8 / max(1, len(backends))
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.5))
    for i, backend in enumerate(backends):
        ys = [y + i * height for y in range(len(names))]
        values = [results.flush[n].get(backend) for n in names]
        ms = [v * 1000 if isinstance(v, float) else 0.0 for v in values]
        bars = ax.barh(ys, ms, height=height, label=backend)
        for bar, v in zip(bars, values, strict=True):
            label = (
                f"{v * 1000:.1f}" if isinstance(v, float) else ("n/a" if v is None else "failed")
            )
            ax.annotate(
                label,
                (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
    ax.set_yticks([y + height * (len(backends) - 1) / 2 for y in range(len(names))], names)
    ax.invert_yaxis()
    ax.margins(x=0.1)  # room for the labels past the longest bar
    ax.set_xlabel("ms per turn (p50; lower is better)")
    ax.set_title("Persisting an agent turn (3 messages)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from devtools.postgres import postgres_server

    parser = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--chart", type=Path, help="also write the bar chart to this PNG")
    args = parser.parse_args(argv)

    def progress(msg: str) -> None:
        print(f"... {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hermes-orm-peers-")))
        pg = None if args.no_postgres else stack.enter_context(postgres_server(DEFAULT_DURABILITY))
        results = run(pg, tmp, quick=args.quick, progress=progress)
    print(markdown(results))
    if args.chart:
        chart(results, args.chart)
    progress(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
