"""``hermes-orm demo``: a simulated agent conversation that tries to break the store.

It flushes after every turn, fails a flush half-way (the messages are inserted,
then the cursor update fails), loses a commit acknowledgement, and lets a
second process flush the same session at the same time; then it shows what the
database holds and checks it against the conversation in memory.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, select

from hermes_orm import migrations
from hermes_orm._dialects import safe_url, sqlite_in_memory
from hermes_orm.errors import HermesOrmError
from hermes_orm.models import Message
from hermes_orm.store import SessionStore


class InjectedFailure(RuntimeError):
    """The failure the demo injects on purpose."""


def _turn(n: int, question: str, tool: str, answer: str) -> list[dict[str, Any]]:
    call = f"call_{n}"
    now = time.time()
    return [
        {"role": "user", "content": question, "timestamp": now},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call,
                    "type": "function",
                    "function": {"name": tool, "arguments": json.dumps({"q": question})},
                }
            ],
            "finish_reason": "tool_calls",
            "timestamp": now,
        },
        {
            "role": "tool",
            "content": f"{tool} output for turn {n}",
            "tool_call_id": call,
            "tool_name": tool,
            "timestamp": now,
        },
        {"role": "assistant", "content": answer, "finish_reason": "stop", "timestamp": now},
    ]


TURNS = [
    ("What is in the repo?", "terminal", "A Python package and its tests."),
    ("Run the tests.", "terminal", "All tests pass."),
    ("Summarise the design.", "read_file", "The cursor lives in the session row."),
    ("Translate: 正確に一度", "translate", "Exactly once. ✅"),
    ("Thanks!", "memory", "You're welcome 🚀"),
]


#: The statement that advances the cursor: an UPDATE of its own (SQLite), or the
#: UPDATE inside the one statement that also inserts the rows (PostgreSQL).
_ADVANCES = re.compile(r"\bUPDATE\s+(\S+\.)?\"?hermes_sessions\"?\s+SET\b", re.IGNORECASE)


@contextmanager
def _fail_cursor_update(store: SessionStore) -> Iterator[None]:
    """Fail the statement that advances the cursor, the turn's INSERT run or not."""

    def hook(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if _ADVANCES.search(statement):
            raise InjectedFailure("connection reset while advancing the cursor")

    event.listen(store.engine, "before_cursor_execute", hook)
    try:
        yield
    finally:
        event.remove(store.engine, "before_cursor_execute", hook)


@contextmanager
def _lose_commit_ack(store: SessionStore) -> Iterator[None]:
    """Let COMMIT succeed, then fail as if the acknowledgement never arrived."""
    dialect = store.engine.dialect
    real = dialect.do_commit

    def commit(dbapi_connection: Any) -> None:
        real(dbapi_connection)
        raise InjectedFailure("acknowledgement of COMMIT lost")

    dialect.do_commit = commit  # type: ignore[method-assign]
    try:
        yield
    finally:
        dialect.do_commit = real  # type: ignore[method-assign]


def _second_writer(
    where: str | SessionStore | Any, session_id: str, messages: list[dict[str, Any]]
) -> None:
    """Flush ``messages`` one more at a time.

    Through a store of its own (on a URL or an engine), or the one given.
    """
    store = where if isinstance(where, SessionStore) else SessionStore(where)
    for end in range(1, len(messages) + 1):
        store.flush(session_id, messages[:end])
    if store is not where:
        store.close()


def _race_a_second_writer(
    store: SessionStore, url: str, session_id: str, conversation: list[dict[str, Any]]
) -> None:
    """Flush ``conversation`` message by message here and in a second writer at once.

    The second writer is a process of its own, but for a database in memory,
    which only this process holds: there it is a thread with a store of its own.
    """
    if sqlite_in_memory(url):
        print("turn 4: a second writer (a thread: a database in memory is this process's")
        print("        alone) flushes the same conversation at the same time")
        failed: list[BaseException] = []

        def write() -> None:
            try:
                _second_writer(store.engine, session_id, conversation)
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=write)
        thread.start()
        _second_writer(store, session_id, conversation)
        thread.join(60)
        print(f"        second writer: {failed[0] if failed else 'done'}")
        return
    print("turn 4: a second process flushes the same conversation at the same time")
    ctx = multiprocessing.get_context("spawn")
    other = ctx.Process(target=_second_writer, args=(url, session_id, conversation))
    other.start()
    _second_writer(store, session_id, conversation)
    other.join(60)
    print(f"        second process exit status: {other.exitcode}")


def _stored(store: SessionStore, session_id: str) -> tuple[int, int]:
    session = store.get_session(session_id)
    assert session is not None
    return session["flushed_idx"], len(store.get_messages(session_id))


def run_demo(url: str) -> int:
    """Run the demo against ``url``; returns 0 when the database is exact."""
    shown = safe_url(url)
    store = SessionStore(url)
    print(f"database: {shown}")
    before = migrations.current(store.engine)
    store.upgrade()
    after = migrations.head()
    if before is None:
        print(f"schema:   created at {after}")
    elif before != after:  # (said: an older program sharing the database reads it no more)
        print(f"schema:   upgraded from {before} to {after}")
    session_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    store.create_session(session_id, source="demo", model="demo/echo", title=None)
    print(f"session:  {session_id}\n")

    conversation: list[dict[str, Any]] = []
    for n, (question, tool, answer) in enumerate(TURNS, start=1):
        conversation.extend(_turn(n, question, tool, answer))
        if n == 2:
            print(f"turn {n}: flush fails as it advances the cursor, its rows sent ...")
            try:
                with _fail_cursor_update(store):
                    store.flush(session_id, conversation)
            except (InjectedFailure, HermesOrmError) as exc:
                cursor, rows = _stored(store, session_id)
                print(f"        failed: {exc}")
                print(
                    f"        database: cursor {cursor}, {rows} rows (the rows rolled back with it)"
                )
            else:
                print("        (no failure came: the flush found no cursor update to fail)")
        if n == 3:
            print(f"turn {n}: the COMMIT lands but its acknowledgement is lost ...")
            try:
                with _lose_commit_ack(store):
                    store.flush(session_id, conversation)
            except InjectedFailure as exc:
                cursor, rows = _stored(store, session_id)
                print(f"        failed: {exc}")
                print(f"        database: cursor {cursor}, {rows} rows (the turn is stored)")
        if n == 4:
            _race_a_second_writer(store, url, session_id, conversation)
        result = store.flush(session_id, conversation)
        print(f"turn {n}: flush wrote {result.written} new messages, cursor {result.cursor}")

    print("\nwhat the database holds:")
    with store.engine.connect() as conn:
        stored_rows = conn.execute(
            select(Message.idx, Message.role, Message.content, Message.tool_name)
            .where(Message.session_id == session_id)
            .order_by(Message.idx)
        ).all()
    for row in stored_rows:
        text = row.content if row.content is not None else f"(calls {TURNS[row.idx // 4][1]})"
        print(f"  [{row.idx:>2}] {row.role:<9} {text}")

    session = store.get_session(session_id)
    assert session is not None
    stored = store.get_messages(session_id)
    checks = [
        (
            "positions are 0..n-1, each once",
            [r.idx for r in stored_rows] == list(range(len(stored_rows))),
        ),
        (
            "flushed_idx == rows == message_count",
            session["flushed_idx"] == len(stored_rows) == session["message_count"],
        ),
        ("every message reads back equal to the one in memory", stored == conversation),
        ("no message lost, none duplicated", len(stored) == len(conversation)),
    ]
    print(f"\n{len(conversation)} messages in memory, {len(stored_rows)} rows stored:")
    for label, ok in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {label}")
    print(
        "\nWhy it is exact: the cursor (flushed_idx) is in the session row and moves in "
        "the same transaction\nas the inserts, under the row's write lock. A failed flush "
        "rolls both back; a retry, a restart or\na second process reads the same cursor, "
        "so each message is written once."
    )
    store.close()
    return 0 if all(ok for _, ok in checks) else 1
