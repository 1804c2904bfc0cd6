"""Invariants 1-5 of the design: exact prefix, idempotent flush, divergence, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import multiprocessing
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import hermes_orm
from hermes_orm import (
    DatabaseBusyError,
    DatabaseError,
    FlushResult,
    HistoryDivergedError,
    InvalidArgumentError,
    InvalidMessageError,
    RetryPolicy,
    SessionNotFoundError,
    SessionStore,
    _dialects,
    _sa,
)
from hermes_orm import store as store_module
from hermes_orm.async_store import AsyncSessionStore
from hermes_orm.models import Message
from tests.conftest import (
    BlockingStore,
    count_rows,
    fresh_store,
    in_threads,
    listening,
    sync_engine,
    table_name,
    transient,
    unqualified,
)


def conversation(turns: int, tag: str = "") -> list[dict[str, Any]]:
    """A realistic transcript: user, assistant with a tool call, tool result, per turn."""
    out: list[dict[str, Any]] = []
    for t in range(turns):
        call = f"call_{tag}{t}"
        out.append(
            {"role": "user", "content": f"question {tag}{t}", "timestamp": 1_700_000_000.0 + t}
        )
        out.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call,
                        "type": "function",
                        "function": {"name": "search", "arguments": f'{{"q": "{t}"}}'},
                    }
                ],
                "finish_reason": "tool_calls",
            }
        )
        out.append(
            {
                "role": "tool",
                "content": f"result {t} ✓",
                "tool_call_id": call,
                "tool_name": "search",
            }
        )
    return out


def assert_exact(store: SessionStore, session_id: str, expected: list[dict[str, Any]]) -> None:
    """Invariant 1: idx 0..n-1 once each, in order, flushed_idx == n == message_count."""
    with sync_engine(store).connect() as conn:
        idxs = (
            conn.execute(
                select(Message.idx).where(Message.session_id == session_id).order_by(Message.idx)
            )
            .scalars()
            .all()
        )
    assert idxs == list(range(len(expected)))
    session = store.get_session(session_id)
    assert session is not None
    assert session["flushed_idx"] == len(expected) == session["message_count"]
    assert session["tool_call_count"] == sum(len(m.get("tool_calls") or []) for m in expected)
    assert store.get_messages(session_id) == expected


def test_flush_writes_only_the_new_suffix(store: SessionStore) -> None:
    store.create_session("s", source="cli")
    msgs = conversation(4)
    assert store.flush("s", msgs[:3]).written == 3
    result = store.flush("s", msgs)
    assert (result.written, result.cursor) == (9, 12)
    assert store.flush("s", msgs).written == 0
    assert_exact(store, "s", msgs)


def test_tool_call_count_is_of_the_live_messages(store: SessionStore) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    store.create_session("s", source="test")
    archived = {"role": "assistant", "content": None, "tool_calls": [call, call], "active": False}
    live = {"role": "assistant", "content": None, "tool_calls": [call]}
    store.flush("s", [archived, live])
    store.append("s", {**archived, "tool_calls": [call]})
    session = store.get_session("s")
    assert session is not None
    assert session["tool_call_count"] == 1


def test_append_takes_the_cursor(store: SessionStore) -> None:
    store.create_session("s", source="cli")
    msgs = conversation(2)
    assert [store.append("s", m) for m in msgs] == list(range(6))
    # flush after append continues from the same cursor
    more = msgs + conversation(1, "b")
    assert store.flush("s", more).written == 3
    assert_exact(store, "s", more)


def test_flush_unknown_session(store: SessionStore) -> None:
    with pytest.raises(SessionNotFoundError):
        store.flush("nope", conversation(1))
    with pytest.raises(SessionNotFoundError):
        store.append("nope", {"role": "user", "content": "x"})


def test_diverged_history_is_refused_and_nothing_written(store: SessionStore) -> None:
    store.create_session("s", source="cli")
    msgs = conversation(2)
    store.flush("s", msgs)
    rewritten = [*msgs[:5], {**msgs[5], "content": "compacted"}, *conversation(1, "x")]
    with pytest.raises(HistoryDivergedError) as err:
        store.flush("s", rewritten)
    assert err.value.index == 5
    with pytest.raises(HistoryDivergedError) as short:
        store.flush("s", [*msgs[:1], {"role": "user", "content": "summary of the rest"}])
    assert (short.value.stored, short.value.given, short.value.index) == (6, 2, 1)
    assert_exact(store, "s", msgs)


def test_a_lagging_writer_with_a_prefix_writes_nothing(store: SessionStore) -> None:
    """A second process whose list is behind the stored history is not an error."""
    store.create_session("s", source="cli")
    msgs = conversation(3)
    store.flush("s", msgs)
    for end in range(len(msgs) + 1):
        assert store.flush("s", msgs[:end]) == FlushResult(written=0, cursor=9)
        assert store.flush("s", msgs[:end], verify="full").written == 0
    assert_exact(store, "s", msgs)


def test_full_verify_finds_a_change_before_the_cursor(store: SessionStore) -> None:
    store.create_session("s", source="cli")
    msgs = conversation(2)
    store.flush("s", msgs)
    edited = [{"role": "user", "content": "edited"}, *msgs[1:], *conversation(1, "n")]
    # the O(1) check only looks at the message at the cursor...
    assert store.flush("s", edited[:6], verify="last").written == 0
    # ...the full check compares every stored digest
    with pytest.raises(HistoryDivergedError) as err:
        store.flush("s", edited, verify="full")
    assert err.value.index == 0
    assert store.flush("s", [*msgs, *conversation(1, "n")], verify="full").written == 3


def _rewrite(msgs: list[dict[str, Any]], how: str) -> int:
    """Rewrite an earlier message of ``msgs`` (not the last one) as agents do; its index."""
    if how == "summary replaces a middle message":
        msgs[3] = {"role": "user", "content": "summary of the first turn"}
        return 3
    if how == "tool output truncated in place":
        msgs[2]["content"] = msgs[2]["content"][:4]
        return 2
    if how == "tool call edited in place":
        msgs[4]["tool_calls"][0]["function"]["arguments"] = '{"q": "edited"}'
        return 4
    if how == "key removed in place":
        del msgs[5]["tool_call_id"]
        return 5
    if how == "message dropped":
        del msgs[1]
        return 1
    msgs[0]["timestamp"] = True  # "a number's type changed", to one it is not equal to
    return 0


REWRITES = [
    "summary replaces a middle message",
    "tool output truncated in place",
    "tool call edited in place",
    "key removed in place",
    "message dropped",
    "a number's type changed",
]


@pytest.mark.parametrize("checker", ["the writing store", "a store that never saw it"])
@pytest.mark.parametrize("how", REWRITES)
def test_a_rewrite_of_any_earlier_message_is_refused_by_default(
    store: SessionStore, how: str, checker: str
) -> None:
    """The default flush checks every stored message, not only the one at the cursor.

    The store that wrote them compares the caller's messages with its copies;
    a store that never saw the session compares them with the stored digests.
    """
    store.create_session("s", source="cli")
    msgs = conversation(3)
    store.flush("s", msgs)
    stored = copy.deepcopy(msgs)
    index = _rewrite(msgs, how)
    flusher = store if checker == "the writing store" else fresh_store(store)
    with pytest.raises(HistoryDivergedError) as err:
        flusher.flush("s", [*msgs, *conversation(1, "next")])
    assert err.value.index == index
    assert_exact(store, "s", stored)
    with pytest.raises(HistoryDivergedError):  # and again: what it remembers is unchanged
        flusher.flush("s", [*msgs, *conversation(1, "next")])
    assert flusher.flush("s", [*stored, *conversation(1, "next")]).written == 3


def _reordered(value: Any) -> Any:
    """``value`` with every dict's keys reversed and every int in a document as a float."""
    if isinstance(value, dict):
        return {k: _reordered(value[k]) for k in reversed(value)}
    if isinstance(value, list):
        return [_reordered(v) for v in value]
    if type(value) is int:
        return float(value)
    return value


@pytest.mark.parametrize("checker", ["the writing store", "a store that never saw it"])
def test_messages_equal_as_dicts_are_never_refused(store: SessionStore, checker: str) -> None:
    """Key order (at any depth) and ``1 == 1.0 == True`` inside documents change nothing."""
    store.create_session("s", source="cli")
    msgs = conversation(2)
    msgs[1]["tool_calls"][0]["function"]["limits"] = {"b": 1, "a": True, "c": [1, 2.0]}
    msgs[2]["meta"] = {"z": {"y": 1, "x": False}, "count": 3}  # an unknown key: extra
    store.flush("s", msgs)
    equal = [_reordered(m) for m in msgs]
    equal[1]["tool_calls"][0]["function"]["limits"]["a"] = 1
    assert equal == msgs
    assert [list(m) for m in equal] != [list(m) for m in msgs]  # truly reordered
    flusher = store if checker == "the writing store" else fresh_store(store)
    assert flusher.flush("s", [*equal, *conversation(1, "n")]).written == 3
    assert flusher.flush("s", [*equal, *conversation(1, "n")], verify="full").written == 0
    assert store.get_messages("s")[:6] == msgs


@pytest.mark.parametrize("verify", ["all", "full", "last"])
def test_a_zero_timestamp_of_either_sign_is_one_message(store: SessionStore, verify: str) -> None:
    """``-0.0 == 0.0 == 0``: SQLite reads -0.0 back as 0.0, and either continues the history."""
    store.create_session("s", source="cli")
    msgs = [{"role": "user", "content": "hi", "timestamp": -0.0}]
    store.flush("s", msgs)
    read = store.get_messages("s")
    assert read == msgs
    for zero in (read[0]["timestamp"], 0.0, 0, -0.0):
        given = [{**msgs[0], "timestamp": zero}]
        assert fresh_store(store).flush("s", given, verify=verify).written == 0
    assert fresh_store(store).flush("s", [*read, *conversation(1)], verify=verify).written == 3
    assert store.get_messages("s") == [*msgs, *conversation(1)]


def test_a_history_another_store_rewrote_is_continued_not_refused(store: SessionStore) -> None:
    """Copies of a history rewritten elsewhere (deleted, made anew) refuse nothing stored."""
    store.create_session("s", source="cli")
    store.flush("s", conversation(2, "old"))  # the store keeps copies of these
    other = fresh_store(store)
    assert other.delete_session("s")
    other.create_session("s", source="cli")
    new = conversation(2, "new")
    other.flush("s", new)  # the same length as before, other messages
    assert store.flush("s", [*new, *conversation(1, "more")]).written == 3
    assert_exact(store, "s", [*new, *conversation(1, "more")])
    with pytest.raises(HistoryDivergedError) as err:  # what the database does not hold
        store.flush("s", [*conversation(2, "old"), *conversation(2, "more")])
    assert err.value.index == 0


@pytest.mark.parametrize(
    "rewritten",
    [
        ["old0", "new1"],  # the same length, another last message
        ["new0", "old1"],  # the same length and last message: another history_id
        ["new0", "new1"],
        ["old0", "new1", "new2"],  # longer than the list below
        ["new0"],  # shorter
    ],
)
@pytest.mark.parametrize("how", ["deleted and made anew", "cleared and appended to"])
def test_a_history_another_store_rewrote_is_checked_against_the_database(
    store: SessionStore, how: str, rewritten: list[str]
) -> None:
    """A store's copies hold the history as it left it: once another writer moved the
    cursor (cut and rewrote the history), a list that continues the copies but not
    the stored history is refused, however long, by the stored digests; a list
    that continues what is stored is written on it."""
    message = {name: {"role": "user", "content": name} for name in ("old0", "old1", "new0")}
    message |= {name: {"role": "user", "content": name} for name in ("new1", "new2", "more")}
    ours = [message["old0"], message["old1"]]
    store.create_session("s", source="cli")
    store.flush("s", ours)  # the store keeps copies of these
    other = fresh_store(store)
    if how == "deleted and made anew":
        assert other.delete_session("s")
        other.create_session("s", source="cli")
        other.flush("s", [message[name] for name in rewritten])
    else:
        from hermes_orm.integrations.hermes import SessionDB

        SessionDB(SessionStore(sync_engine(store), check_schema=False)).clear_messages("s")
        for name in rewritten:
            other.append("s", message[name])
    stored = [message[name] for name in rewritten]
    for given in ([*ours, message["more"]], ours, ours[:1]):
        shared = min(len(given), len(stored))
        if given[:shared] != stored[:shared]:
            with pytest.raises(HistoryDivergedError) as err:
                store.flush("s", given)
            assert given[err.value.index] != stored[err.value.index]
        else:
            store.flush("s", given)
            stored = max(stored, given, key=len)
        assert_exact(store, "s", stored)


def test_a_message_another_process_edited_below_the_last_is_not_taken_as_stored(
    store: SessionStore,
) -> None:
    """Hermes' store mode edits a stored message in place (its ``api_content``) in another
    process; the last message, so the cursor and its digest, stay as they were. The
    session's history_id changes with it: the store's copies of the old message no
    longer stand for it, and a list holding the old one is refused."""
    from hermes_orm.integrations.hermes import SessionDB

    head = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]
    store.create_session("s", source="cli")
    store.flush("s", head)
    hermes = SessionDB(SessionStore(sync_engine(store), check_schema=False))
    assert hermes.set_latest_user_api_content("s", "question", "question, as sent") == 1
    more = {"role": "user", "content": "more"}
    with pytest.raises(HistoryDivergedError) as err:
        store.flush("s", [*head, more])
    assert err.value.index == 0
    edited = store.get_messages("s")
    assert edited[0]["api_content"] == "question, as sent"
    assert store.flush("s", [*edited, more]).written == 1
    assert_exact(store, "s", [*edited, more])


def test_a_store_over_its_memory_bound_still_checks_every_message(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound on remembered messages, copies go; the check reads digests instead."""
    monkeypatch.setattr(store_module, "_REMEMBERED_MAX", 8)
    lists = {sid: conversation(2, sid) for sid in ("a", "b", "c")}
    for sid, msgs in lists.items():
        store.create_session(sid, source="cli")
        store.flush(sid, msgs)
    assert store._memory.remembered <= 8
    for sid, msgs in lists.items():
        stored = copy.deepcopy(msgs)
        msgs[1]["tool_calls"][0]["id"] = "edited"
        with pytest.raises(HistoryDivergedError) as err:
            store.flush(sid, [*msgs, {"role": "user", "content": "more"}])
        assert err.value.index == 1
        assert store.flush(sid, [*stored, {"role": "user", "content": "more"}]).written == 1
        assert_exact(store, sid, [*stored, {"role": "user", "content": "more"}])
    assert store._memory.remembered <= 8


def test_only_a_check_that_compares_copies_makes_them(store: SessionStore) -> None:
    """``verify="last"`` flushes and appends keep no copies; an ``all`` flush starts them."""
    store.create_session("s", source="cli")
    msgs = conversation(2)
    store.flush("s", msgs, verify="last")
    store.append("s", {"role": "user", "content": "appended"})
    appended = [*msgs, {"role": "user", "content": "appended"}, *conversation(1, "n")]
    store.flush("s", appended, verify="last")
    assert store._memory.remembered == 0
    msgs = [*msgs, {"role": "user", "content": "appended"}, *conversation(2, "n")]
    store.flush("s", msgs)
    assert store._memory.remembered == len(msgs)
    store.append("s", {"role": "user", "content": "kept up to date"})
    assert store._memory.remembered == len(msgs) + 1


def test_a_bulk_flush_keeps_no_copies_and_the_next_flush_still_checks_everything(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush that streams (more than a batch) holds no copies of all it wrote."""
    monkeypatch.setattr(store_module, "_BATCH", 4)
    store.create_session("s", source="cli")
    msgs = conversation(4)  # 12 messages: three batches
    store.flush("s", msgs)
    assert store._memory.remembered == 0
    msgs[1]["tool_calls"][0]["id"] = "edited"
    with pytest.raises(HistoryDivergedError) as err:  # checked against the stored digests
        store.flush("s", [*msgs, {"role": "user", "content": "more"}])
    assert err.value.index == 1
    msgs[1]["tool_calls"][0]["id"] = "call_0"
    assert store.flush("s", [*msgs, {"role": "user", "content": "more"}]).written == 1
    assert store._memory.remembered == 13  # a turn's flush starts them


def test_invalid_message_writes_nothing(store: SessionStore) -> None:
    store.create_session("s", source="cli")
    msgs = conversation(1)
    store.flush("s", msgs)
    bad = [*msgs, {"role": "user", "content": "fine"}, {"role": "user", "content": b"bytes"}]
    with pytest.raises(InvalidMessageError) as err:
        store.flush("s", bad)
    assert err.value.index == 4
    assert_exact(store, "s", msgs)


def test_stored_messages_read_back_continue_the_history(store: SessionStore) -> None:
    """A restarted agent reloads its history from the store and keeps flushing."""
    store.create_session("s", source="cli")
    msgs = [{"role": "user", "content": "int stamp", "timestamp": 1700000000}, *conversation(1)]
    store.flush("s", msgs)
    reloaded = store.get_messages("s")
    assert store.flush("s", [*reloaded, {"role": "user", "content": "again"}]).written == 1


# -- failures at every statement, and lost acknowledgements ----------------------------


class Boom(Exception):
    """The injected failure."""


@pytest.fixture
def statements(store: SessionStore) -> Iterator[list[str]]:
    """SQL statements the store's engine runs, recorded (either API: its events are sync)."""
    seen: list[str] = []

    def record(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    yield seen
    event.remove(store.engine, "before_cursor_execute", record)


#: The INSERT of a flush's rows, the tables in their schema or not.
_INSERT_MESSAGES = re.compile(r'\s*INSERT INTO ("\w+"\.)?hermes_messages ', re.IGNORECASE)
#: A flush's first write: its INSERT, its cursor's UPDATE, or the one statement of both.
_FLUSH_WRITE = re.compile(
    r'\s*(INSERT INTO|UPDATE|WITH moved AS \(UPDATE) ("\w+"\.)?hermes_', re.IGNORECASE
)


def _fail_at(engine: Engine, n: int, exc: Exception) -> Any:
    """Make the engine's ``n``-th statement from now raise ``exc``."""
    count = {"i": 0}

    def hook(*_a: Any) -> None:
        count["i"] += 1
        if count["i"] == n:
            raise exc

    event.listen(engine, "before_cursor_execute", hook)
    return hook


def test_messages_go_in_as_one_multi_row_insert_per_batch(store: SessionStore) -> None:
    """A row per statement would make SQLite's FTS5 write a segment per message.

    (A statement whose triggers write into FTS5 opens a savepoint, and FTS5
    flushes its pending terms at every savepoint.)
    """
    inserts: list[tuple[int, bool]] = []

    def record(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
        if _INSERT_MESSAGES.match(statement):
            inserts.append((statement.count("), ("), many))

    most = store._sql.insert_rows_max
    store.create_session("s", source="cli")
    event.listen(store.engine, "before_cursor_execute", record)
    try:
        store.flush("s", conversation(1))
        assert inserts == [(2, False)]  # three rows, one statement
        inserts.clear()
        turns = (2 * most) // 3 + 2  # a little over two statements' worth
        msgs = conversation(turns)
        store.flush("s", msgs)
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    rows = [n + 1 for n, _ in inserts]
    assert rows == [most, most, len(msgs) - 3 - 2 * most]
    assert not any(many for _, many in inserts)
    assert_exact(store, "s", msgs)


def test_a_turns_insert_is_rendered_once_and_a_bulk_ones_each_time(store: SessionStore) -> None:
    """The statement of a small flush is kept (the driver finds it in its cache
    by a hash computed once); those of long flushes are not kept in memory."""
    sql = store._sql
    small, large = 3, sql.insert_rows_max
    for rows in (small, large):
        rendered = sql.insert_head + ", ".join([sql.insert_row] * rows)
        assert sql.insert_messages(rows) == rendered
    assert sql.insert_messages(small) is sql.insert_messages(small)
    assert sql.insert_messages(large) is not sql.insert_messages(large)
    assert large not in sql.inserts


def _flusher(path: str, store: SessionStore) -> Callable[[], SessionStore]:
    """The store that flushes on ``path``.

    A store remembers the cursor it last wrote and verifies it in the UPDATE
    ("remembered cursor"); a store that knows nothing reads it under the row
    lock first ("locked read").
    """
    if path == "remembered cursor":
        return lambda: store
    return lambda: fresh_store(store)  # a store with no memory, on the same engine


def _reads(statement: str) -> bool:
    """Whether ``statement`` reads (the transaction's settings, behind PgBouncer or in
    a schema of its own, are a SELECT of set_config that reads nothing)."""
    words = statement.lstrip().upper()
    return words.startswith("SELECT") and not words.startswith("SELECT SET_CONFIG")


def _statements_per_flush(path: str, engine: Engine) -> int:
    """A flush's statements on ``path``; writes begin with BEGIN IMMEDIATE on SQLite,
    with the transaction's settings behind PgBouncer or in a schema of their own.

    A store's first flush of a session that holds messages reads their digests
    (to check them all) after the cursor. On PostgreSQL, with no settings to run
    first, a flush on the remembered cursor is one statement; the schema is no
    such setting (the statement names it).
    """
    settings = _dialects.transaction_settings(engine, _dialects.store_schema(engine))
    opening = len(_dialects.write_begin(engine.dialect.name)) + len(settings)
    unsettled = len(_dialects.write_begin(engine.dialect.name)) + len(
        _dialects.transaction_settings(engine)
    )
    if path == "remembered cursor" and engine.dialect.name == "postgresql" and not unsettled:
        return 1
    return {"remembered cursor": 2, "locked read": 4}[path] + opening


def test_a_full_cursor_memory_forgets_the_sessions_flushed_least_recently(
    store: SessionStore, statements: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush on a remembered cursor reads nothing; past the bound, idle sessions are forgotten."""
    monkeypatch.setattr(store_module, "_HINTS_MAX", 4)
    lists = {f"s{i}": [{"role": "user", "content": f"first {i}"}] for i in range(5)}
    for sid in lists:
        store.create_session(sid, "cli")

    def flush(sid: str) -> bool:
        """Flush one more message; True if the cursor was read (the session was forgotten)."""
        lists[sid].append({"role": "user", "content": f"more {len(lists[sid])}"})
        statements.clear()
        store.flush(sid, lists[sid])
        return any(_reads(s) for s in statements)

    for sid in ("s0", "s1", "s2", "s3"):
        assert flush(sid)  # new to this store: read under the row lock
    assert not flush("s0")  # remembered, and now the most recent
    assert flush("s4")  # the memory is full: s1 and s2, the least recent, are forgotten
    assert [flush(sid) for sid in ("s0", "s3", "s4")] == [False, False, False]
    assert [flush(sid) for sid in ("s1", "s2")] == [True, True]


@pytest.mark.parametrize("path", ["remembered cursor", "locked read"])
def test_failure_at_every_statement_then_retry_is_exact(
    store: SessionStore, engine: Engine, statements: list[str], path: str
) -> None:
    """Fail each statement of a flush in turn; the retry must leave exactly one copy.

    Both paths (see :func:`_flusher`) are broken at every statement.
    """
    history = conversation(2)
    turn = [*history, *conversation(1, "t")]
    writer = _flusher(path, store)
    store.create_session("probe", source="cli")
    store.flush("probe", history)
    statements.clear()
    writer().flush("probe", turn)
    per_flush = len(statements)
    assert per_flush == _statements_per_flush(path, engine)

    for n in range(1, per_flush + 1):
        sid = f"fail-{n}"
        store.create_session(sid, source="cli")
        store.flush(sid, history)
        hook = _fail_at(store.engine, n, Boom(f"statement {n}"))
        try:
            with pytest.raises((Boom, DatabaseError)):
                writer().flush(sid, turn)
        finally:
            event.remove(store.engine, "before_cursor_execute", hook)
        assert_exact(store, sid, history)  # nothing half-written
        assert writer().flush(sid, turn).written == 3
        assert_exact(store, sid, turn)


class _DriverTrap:
    """Driver cursors that count their statements and can fail the ``n``-th one.

    The failure is injected below SQLAlchemy, in the driver connection's own
    cursors, so it reaches a flush that runs its statements straight on the
    driver as well as one that goes through SQLAlchemy.
    """

    def __init__(self) -> None:
        self.count = 0
        self.fail_at = 0
        self.exc: Exception | None = None
        #: Raised once the ``fail_at``-th statement ran (its answer lost).
        self.after: Exception | None = None
        #: Called (on the driver's thread, for aiosqlite) at the ``fail_at``-th statement.
        self.action: Callable[[], None] | None = None

    def hit(self) -> None:
        self.count += 1
        if self.count == self.fail_at and self.action is not None:
            self.action()
        if self.count == self.fail_at and self.exc is not None:
            raise self.exc

    def ran(self) -> None:
        if self.count == self.fail_at and self.after is not None:
            after, self.after = self.after, None
            raise after

    def arm(self, n: int, exc: Exception | None) -> None:
        self.count, self.fail_at, self.exc = 0, n, exc

    def connect_args(self, backend: str, api: str = "sync") -> dict[str, Any]:
        trap = self
        if backend == "sqlite":  # aiosqlite opens its connection with sqlite3 too
            import sqlite3

            class SqliteCursor(sqlite3.Cursor):
                def execute(self, *args: Any) -> Any:
                    trap.hit()
                    return super().execute(*args)

            class SqliteConnection(sqlite3.Connection):
                def cursor(self, factory: Any = SqliteCursor) -> Any:
                    return super().cursor(factory)

            return {"factory": SqliteConnection}
        import psycopg

        class PgCursor(psycopg.Cursor[Any]):
            def execute(self, *args: Any, **kwargs: Any) -> Any:
                trap.hit()
                result = super().execute(*args, **kwargs)
                trap.ran()
                return result

        class AsyncPgCursor(psycopg.AsyncCursor[Any]):
            async def execute(self, *args: Any, **kwargs: Any) -> Any:
                trap.hit()
                result = await super().execute(*args, **kwargs)
                trap.ran()
                return result

        return {"cursor_factory": PgCursor if api == "sync" else AsyncPgCursor}

    def trap_own_cursors(self, monkeypatch: pytest.MonkeyPatch, engine: Engine) -> None:
        """Trap psycopg's own cursor classes on ``engine``'s connections, which keep them.

        A connection with psycopg's default cursor class runs a flush on its
        ``RawCursor`` (``AsyncRawCursor``, awaited from SQLAlchemy's greenlet);
        those inherit ``execute`` from ``Cursor`` (``AsyncCursor``), patched
        here for the connections ``engine`` opens, and only for them.
        """
        import psycopg

        assert psycopg.RawCursor.execute is psycopg.Cursor.execute
        assert psycopg.AsyncRawCursor.execute is psycopg.AsyncCursor.execute
        trap = self
        mine: list[Any] = []  # the driver connections engine opened

        @event.listens_for(engine, "connect")
        def opened(dbapi_connection: Any, _record: Any) -> None:
            mine.append(getattr(dbapi_connection, "driver_connection", dbapi_connection))

        def ours(cursor: Any) -> bool:
            return any(cursor.connection is conn for conn in mine)

        sync_execute, async_execute = psycopg.Cursor.execute, psycopg.AsyncCursor.execute

        def execute(cursor: Any, *args: Any, **kwargs: Any) -> Any:
            if not ours(cursor):
                return sync_execute(cursor, *args, **kwargs)
            trap.hit()
            result = sync_execute(cursor, *args, **kwargs)
            trap.ran()
            return result

        async def execute_async(cursor: Any, *args: Any, **kwargs: Any) -> Any:
            if not ours(cursor):
                return await async_execute(cursor, *args, **kwargs)
            trap.hit()
            result = await async_execute(cursor, *args, **kwargs)
            trap.ran()
            return result

        monkeypatch.setattr(psycopg.Cursor, "execute", execute)
        monkeypatch.setattr(psycopg.AsyncCursor, "execute", execute_async)


def _driver_transient(backend: str) -> Exception:
    """A transient error as the driver itself raises it (not yet wrapped by SQLAlchemy)."""
    if backend == "sqlite":
        import sqlite3

        return sqlite3.OperationalError("database is locked")
    import psycopg.errors

    return psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")


@pytest.mark.backends("postgresql")
@pytest.mark.apis("sync", "async")  # psycopg's two connections; asyncpg numbers its own
def test_an_unwatched_psycopg_flush_runs_on_a_raw_cursor(
    db_url: str, engine: Engine, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg converts a ``%s`` statement of over 50 parameters anew at every execution.

    With the connection's default cursor class, a flush's statements go to
    psycopg's ``RawCursor`` (``AsyncRawCursor``) written with ``$1``
    placeholders, which it sends as they are; the rows are the same.
    """
    import psycopg

    from hermes_orm import create_store_engine
    from hermes_orm._dialects import create_async_store_engine
    from tests.conftest import BlockingStore

    raw: Any = psycopg.RawCursor if api == "sync" else psycopg.AsyncRawCursor
    original = raw.execute
    sent: list[tuple[str, int]] = []

    def seen(query: Any, params: Any) -> None:
        sent.append((str(query), len(params or ())))

    if api == "sync":

        def execute(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
            seen(query, params)
            return original(self, query, params, **kwargs)

    else:

        async def execute(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
            seen(query, params)
            return await original(self, query, params, **kwargs)

    monkeypatch.setattr(raw, "execute", execute)
    store: Any
    if api == "sync":
        store = SessionStore(create_store_engine(db_url))
    else:
        store = BlockingStore(AsyncSessionStore(create_async_store_engine(db_url)), engine)
    store.create_session("s", source="cli")
    history = conversation(2)
    store.flush("s", history)  # the locked read's statements
    turn = [*history, *conversation(2, "t")]
    store.flush("s", turn)  # the remembered cursor's one statement
    wide = [query for query, count in sent if count > 50]
    assert len(wide) >= 2, sent
    assert all("$1" in query and "%s" not in query for query in wide)
    assert_exact(store, "s", turn)
    store.close()
    sync_engine(store).dispose()


def _unwatched_store(
    db_url: str,
    engine: Engine,
    api: str,
    connect_args: dict[str, Any],
    own_cursors: tuple[_DriverTrap, pytest.MonkeyPatch] | None = None,
) -> Any:
    """A store of ``api`` on an engine of its own that nothing watches.

    With ``own_cursors``, psycopg's own cursors are trapped on that engine.
    """
    from hermes_orm import _sa, create_store_engine
    from hermes_orm._dialects import create_async_store_engine
    from tests.conftest import BlockingStore

    store: Any
    if api == "sync":
        own = create_store_engine(db_url, connect_args=connect_args)
        store = SessionStore(own)
    else:
        async_engine = create_async_store_engine(db_url, connect_args=connect_args)
        own = async_engine.sync_engine
        store = BlockingStore(AsyncSessionStore(async_engine), engine)
    if own_cursors is not None:
        trap, monkeypatch = own_cursors
        trap.trap_own_cursors(monkeypatch, own)
    if api == "sync":
        with store.engine.connect() as conn:
            assert not _sa.observed(conn)
    else:

        async def observed() -> bool:
            async with async_engine.connect() as conn:
                return await conn.run_sync(_sa.observed)

        assert not store._runner.run(observed())
    return store


def _break_every_statement(store: Any, path: str, failure: str, trap: _DriverTrap) -> None:
    """Fail each statement of a flush of ``store`` in turn (see the tests below)."""
    backend = sync_engine(store).dialect.name
    history = conversation(2)
    turn = [*history, *conversation(1, "t")]
    writer = _flusher(path, store)
    store.create_session("probe", source="cli")
    store.flush("probe", history)
    flusher = writer()
    flusher.get_session("probe")  # its connection is open (and kept) before counting
    trap.arm(0, Boom("never"))
    flusher.flush("probe", turn)
    per_flush = trap.count
    assert per_flush == _statements_per_flush(path, sync_engine(store))

    for n in range(1, per_flush + 1):
        sid = f"fail-{n}"
        store.create_session(sid, source="cli")
        store.flush(sid, history)
        flusher = writer()
        flusher.get_session(sid)
        if failure == "transient":
            trap.arm(n, _driver_transient(backend))
            assert flusher.flush(sid, turn).written == 3
            assert trap.count == per_flush + n  # the whole transaction ran again
        else:
            trap.arm(n, Boom(f"statement {n}"))
            with pytest.raises((Boom, DatabaseError)):
                flusher.flush(sid, turn)
            assert_exact(store, sid, history)  # nothing half-written
            assert writer().flush(sid, turn).written == 3
        assert_exact(store, sid, turn)
    store.close()
    store.engine.dispose()


# asyncpg has no cursor class to trap; the listener path covers it (below).
@pytest.mark.apis("sync", "async")
@pytest.mark.parametrize("failure", ["fatal", "transient"])
@pytest.mark.parametrize("path", ["remembered cursor", "locked read"])
def test_a_driver_failure_at_every_statement_of_an_unwatched_flush(
    db_url: str, engine: Engine, api: str, path: str, failure: str
) -> None:
    """With nothing listening to the engine, a flush runs its statements on the driver cursor.

    (On aiosqlite, all of them in one call on the driver's thread; on psycopg,
    on the cursor class the application chose.) Break each of them there: a
    fatal error leaves the session as it was and a re-flush is exact; a
    transient one is retried inside the same call.
    """
    trap = _DriverTrap()
    connect_args = trap.connect_args(engine.dialect.name, api)
    _break_every_statement(_unwatched_store(db_url, engine, api, connect_args), path, failure, trap)


@pytest.mark.backends("postgresql")
@pytest.mark.apis("sync", "async")
@pytest.mark.parametrize("failure", ["fatal", "transient"])
@pytest.mark.parametrize("path", ["remembered cursor", "locked read"])
def test_a_driver_failure_at_every_statement_on_psycopg_raw_cursors(
    db_url: str,
    engine: Engine,
    api: str,
    *,
    path: str,
    failure: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, with psycopg's default cursor class: a flush runs on its raw cursors.

    On psycopg's async connections these are awaited from SQLAlchemy's greenlet.
    """
    trap = _DriverTrap()
    store = _unwatched_store(db_url, engine, api, {}, (trap, monkeypatch))
    _break_every_statement(store, path, failure, trap)


@pytest.mark.parametrize("path", ["remembered cursor", "locked read"])
def test_failed_commit_then_retry_is_exact(
    store: SessionStore, engine: Engine, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    store.create_session("s", source="cli")
    history = conversation(2)
    store.flush("s", history)
    turn = [*history, *conversation(1, "t")]
    writer = _flusher(path, store)()
    writer.get_session("s")

    def refuse(_dbapi_connection: Any) -> None:
        raise Boom("COMMIT failed")

    monkeypatch.setattr(store.engine.dialect, "do_commit", refuse)
    if _statements_per_flush(path, engine) == 1:
        # One statement, its own transaction: no COMMIT is sent that could fail.
        assert writer.flush("s", turn).written == 3
        monkeypatch.undo()  # (reads end with a COMMIT)
        assert_exact(store, "s", turn)
        return
    with pytest.raises(Boom):
        writer.flush("s", turn)
    monkeypatch.undo()
    assert_exact(store, "s", history)
    assert writer.flush("s", turn).written == 3
    assert_exact(store, "s", turn)


@pytest.mark.parametrize("path", ["remembered cursor", "locked read"])
def test_lost_commit_acknowledgement_then_retry_is_exact(
    store: SessionStore, engine: Engine, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    store.create_session("s", source="cli")
    history = conversation(2)
    store.flush("s", history)
    turn = [*history, *conversation(1, "t")]
    writer = _flusher(path, store)()
    writer.get_session("s")
    real_commit = store.engine.dialect.do_commit

    def commit_then_lose_ack(dbapi_connection: Any) -> None:
        real_commit(dbapi_connection)
        raise Boom("connection dropped after COMMIT")

    monkeypatch.setattr(store.engine.dialect, "do_commit", commit_then_lose_ack)
    if _statements_per_flush(path, engine) == 1:
        # No COMMIT is sent (test_a_lost_answer_to_the_one_statement_flush loses its answer).
        assert writer.flush("s", turn).written == 3
        monkeypatch.undo()  # (reads end with a COMMIT)
        assert_exact(store, "s", turn)
        return
    with pytest.raises(Boom):
        writer.flush("s", turn)
    monkeypatch.undo()
    assert_exact(store, "s", turn)  # the commit did land
    assert writer.flush("s", turn).written == 0  # the client's retry writes nothing
    assert_exact(store, "s", turn)


@pytest.mark.backends("postgresql")  # the one-statement flush is PostgreSQL's
@pytest.mark.apis("sync", "async")  # asyncpg has no cursor class to trap
@pytest.mark.direct("with no settings to run first, a flush is one statement")
@pytest.mark.parametrize("cursors", ["chosen", "psycopg's own"])
@pytest.mark.parametrize("lost", ["the connection", "the answer only"])
def test_a_lost_answer_to_the_one_statement_flush_then_retry_is_exact(
    db_url: str,
    engine: Engine,
    api: str,
    *,
    lost: str,
    cursors: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The statement that writes a turn and moves the cursor commits, and its answer is lost.

    Lost with the connection (a disconnect: the store retries on a new one) or
    as an error on a connection that lives on: either way the retry, and any
    later flush of the list, find the cursor moved and write nothing twice.
    The statement runs on the cursor class the application chose, or on
    psycopg's raw cursor.
    """
    import psycopg

    trap = _DriverTrap()
    if lost == "the connection":
        trap.after = psycopg.OperationalError("server closed the connection unexpectedly")
    else:
        trap.after = Boom("the answer was lost")
    if cursors == "chosen":
        store = _unwatched_store(db_url, engine, api, trap.connect_args("postgresql", api))
    else:
        store = _unwatched_store(db_url, engine, api, {}, (trap, monkeypatch))
    assert _statements_per_flush("remembered cursor", sync_engine(store)) == 1
    store.create_session("s", source="cli")
    history = conversation(2)
    store.flush("s", history)
    turn = [*history, *conversation(1, "t")]
    trap.arm(1, None)
    if lost == "the connection":  # retried on a new connection within the flush
        assert store.flush("s", turn).cursor == len(turn)
    else:
        with pytest.raises(Boom):
            store.flush("s", turn)
    assert trap.count >= 1
    assert_exact(store, "s", turn)  # it landed, once
    assert store.flush("s", turn).written == 0
    assert_exact(store, "s", turn)
    store.close()
    sync_engine(store).dispose()


def test_transient_error_mid_flush_is_retried_inside_flush(
    store: SessionStore,
    engine: Engine,
    backend: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store.create_session("s", source="cli")
    history = conversation(2)
    store.flush("s", history)
    turn = [*history, *conversation(1, "t")]
    failed: list[str] = []

    def hook(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        # fail the flush's first write: the retry must start from a fresh transaction
        if not failed and _FLUSH_WRITE.match(statement):
            failed.append(statement)
            raise transient(backend)

    event.listen(store.engine, "before_cursor_execute", hook)
    try:
        with caplog.at_level(logging.INFO, logger="hermes_orm"):
            assert store.flush("s", turn).written == 3
    finally:
        event.remove(store.engine, "before_cursor_execute", hook)
    assert_exact(store, "s", turn)
    (retry,) = [r for r in caplog.records if r.name == "hermes_orm"]  # the retry is told
    assert "transient database error" in retry.getMessage()
    assert "try 2 of 8" in retry.getMessage()


def test_retry_bound_raises_a_typed_busy_error(engine: Engine, backend: str) -> None:
    store = SessionStore(engine, retry=RetryPolicy(attempts=3, base_delay=0.001))
    store.create_session("s", source="cli")

    def always(*_a: Any) -> None:
        raise transient(backend)

    event.listen(engine, "before_cursor_execute", always)
    try:
        with pytest.raises(DatabaseBusyError) as err:
            store.flush("s", conversation(1))
    finally:
        event.remove(engine, "before_cursor_execute", always)
    assert err.value.attempts == 3
    assert count_rows(engine, "hermes_messages") == 0


def _plain(count: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"line {i}"} for i in range(count)]


@pytest.mark.apis("sync")  # (the hook below watches this thread's calls)
@pytest.mark.parametrize("call", ["create_session", "end_session"])
def test_a_ctrl_c_as_the_commit_begins_reaches_the_caller_as_itself(
    store: SessionStore, call: str
) -> None:
    """SQLAlchemy asserts, as its commit ends, that the transaction did: a Ctrl-C landing
    as the COMMIT begins came out as that AssertionError, which an application's
    ``except Exception`` (Hermes' own write loop) takes for a failed write and swallows."""
    store.create_session("s", source="cli")
    store.flush("s", _plain(1))

    def ctrl_c(frame: Any, event: str, _arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "_do_commit":
            sys.setprofile(None)
            raise KeyboardInterrupt

    work = functools.partial(store.create_session, "t", source="cli")
    if call == "end_session":
        work = functools.partial(store.end_session, "s", "done")
    sys.setprofile(ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            work()
    finally:
        sys.setprofile(None)
    assert ((store.get_session("s") or {})["ended_at"], store.get_session("t")) == (None, None)
    assert store.flush("s", _plain(2)).written == 1  # (nothing left held)


def _lose_last_commits(engine: Engine, session_id: str, kept: int) -> None:
    """Make the database forget every message from ``kept`` on, as a failover to an
    asynchronous standby that never received those commits does."""
    messages, sessions = (
        table_name(engine, "hermes_messages"),
        table_name(engine, "hermes_sessions"),
    )
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"DELETE FROM {messages} WHERE session_id = '{session_id}' AND idx >= {kept}"
        )
        conn.exec_driver_sql(
            f"UPDATE {sessions} SET flushed_idx = {kept}, message_count = {kept}, "
            f"flushed_digest = (SELECT digest FROM {messages} "
            f"WHERE session_id = '{session_id}' AND idx = {kept - 1}) WHERE id = '{session_id}'"
        )


def test_sql_logging_turned_on_between_calls_shows_the_store_s_statements(
    store: SessionStore, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The store keeps a connection idle between calls: SQL logging (``echo``, or the
    logger) the application turns on later shows the store's statements all the same."""
    from tests.conftest import BlockingStore

    # (The tests' blocking engines pool nothing: this one has the default pool.)
    kept = store if isinstance(store, BlockingStore) else SessionStore(db_url)
    try:
        kept.create_session("s", source="cli")
        history = _plain(4)
        kept.flush("s", history[:2])  # (a connection kept)
        with caplog.at_level(logging.INFO, logger="sqlalchemy.engine.Engine"):
            kept.flush("s", history)
        logged = [r.getMessage() for r in caplog.records if r.name.startswith("sqlalchemy.engine")]
        assert any("INSERT INTO" in m and "hermes_messages" in m for m in logged), logged
        caplog.clear()
        kept.flush("s", [*history, *_plain(1)])  # off again: nothing more is logged
        assert not [r for r in caplog.records if r.name.startswith("sqlalchemy.engine")]
        assert_exact(kept, "s", [*history, *_plain(1)])
    finally:
        if kept is not store:
            kept.close()
            kept.engine.dispose()


@pytest.mark.parametrize("verify", ["all", "last", "full"])
def test_acknowledged_writes_the_database_lost_are_told_and_put_back(
    store: SessionStore, engine: Engine, verify: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The stored cursor is behind what this store saw committed: said, then repaired."""
    store.create_session("s", source="cli")
    history = _plain(6)
    store.flush("s", history, verify=verify)
    _lose_last_commits(engine, "s", 2)
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        result = store.flush("s", history, verify=verify)
    assert result.written == len(history) - 2
    assert_exact(store, "s", history)
    (told,) = [r for r in caplog.records if r.name == "hermes_orm"]
    assert told.levelno == logging.WARNING
    assert f"holds 2 messages, but this store saw {len(history)} committed" in told.getMessage()


def test_an_append_after_lost_writes_says_so(
    store: SessionStore, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    store.create_session("s", source="cli")
    history = _plain(4)
    store.flush("s", history)
    _lose_last_commits(engine, "s", 1)
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        assert store.append("s", {"role": "user", "content": "again"}) == 1
    assert any("acknowledged writes were lost" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("call", ["flush", "append"])
def test_a_session_made_anew_elsewhere_is_said_as_such(
    store: SessionStore, engine: Engine, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleted and made anew by another process (another history_id): said as such, not
    only as lost writes (a restored backup of another history looks the same)."""
    store.create_session("s", source="cli")
    store.flush("s", _plain(4))
    other = SessionStore(engine)
    other.delete_session("s")
    other.create_session("s", source="cli")
    other.flush("s", _plain(1))
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        if call == "flush":  # (its first message is the new session's: it continues it)
            assert store.flush("s", _plain(4)).written == 3
        else:
            assert store.append("s", {"role": "user", "content": "again"}) == 1
    (told,) = [r.getMessage() for r in caplog.records if r.name == "hermes_orm"]
    assert "holds 1 messages under another history, but this store saw 4 committed" in told
    assert "another process made the session anew or rewrote it, or acknowledged" in told


def test_a_history_cut_by_this_store_is_no_loss(
    store: SessionStore, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that forgot its cursor before cutting the history warns of nothing."""
    store.create_session("s", source="cli")
    history = _plain(4)
    store.flush("s", history)
    store.forget_cursor("s")
    _lose_last_commits(engine, "s", 1)
    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        store.flush("s", history)
    assert not [r for r in caplog.records if r.name == "hermes_orm"]
    assert_exact(store, "s", history)


def test_unique_session_idx_backs_the_cursor(store: SessionStore, engine: Engine) -> None:
    """Invariant 5: even a writer that ignores the cursor cannot store a position twice."""
    store.create_session("s", source="cli")
    store.flush("s", conversation(1))
    from hermes_orm._codec import encode_message

    row = {**encode_message({"role": "user", "content": "dup"}).row, "session_id": "s", "idx": 0}
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(Message.__table__.insert(), [row])


# -- concurrent writers ----------------------------------------------------------------------


def _writer(url: str, session_id: str, rounds: int, barrier: Any) -> None:
    store = SessionStore(url, retry=RetryPolicy(attempts=50, base_delay=0.005, max_delay=0.1))
    full = conversation(rounds)
    barrier.wait()
    # Each process holds the same growing conversation (gateway + CLI) and flushes
    # after every message, as an agent loop with several exit paths would.
    for end in range(1, len(full) + 1):
        store.flush(session_id, full[:end])
    store.close()


def test_two_processes_flushing_one_session(store: SessionStore, db_url: str) -> None:
    store.create_session("shared", source="gateway")
    rounds = 15
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_writer, args=(db_url, "shared", rounds, barrier)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert_exact(store, "shared", conversation(rounds))


@pytest.mark.apis("sync")  # threads share a blocking store; tasks share an async one, below
def test_threads_flushing_one_session(store: SessionStore) -> None:
    store.create_session("shared", source="gateway")
    full = conversation(10)
    errors: list[BaseException] = []

    def run(_n: int) -> None:
        try:
            for end in range(1, len(full) + 1):
                store.flush("shared", full[:end])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    in_threads(run, 4)
    assert errors == []
    assert_exact(store, "shared", full)


def _async_url(db_url: str) -> str:
    return db_url  # AsyncSessionStore picks aiosqlite, or psycopg's async connections


@pytest.mark.postgresql
def test_an_asyncpg_store_serves_one_event_loop_after_another(
    empty_pg: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each asyncio.run makes a loop of its own, and asyncpg's connections belong to the
    loop that opened them: a store on an engine it made opens new ones for the new loop
    (and, closed from another loop, drops the old loop's without an error); on an
    application's engine it refuses with a typed error, not the driver's."""
    SessionStore(empty_pg).upgrade()
    url = make_url(empty_pg).set(drivername="postgresql+asyncpg")
    store = AsyncSessionStore(url)
    asyncio.run(store.create_session("loops", source="cli"))
    for n in (1, 2, 3):
        assert asyncio.run(store.flush("loops", conversation(n))).cursor == 3 * n
    assert asyncio.run(store.get_messages("loops")) == conversation(3)
    with caplog.at_level(logging.WARNING):
        asyncio.run(store.close())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text

    async def made_here() -> Any:
        return create_async_engine(url)

    engine = asyncio.run(made_here())
    theirs = AsyncSessionStore(engine)
    asyncio.run(theirs.get_session("loops"))
    with pytest.raises(InvalidArgumentError, match="another event loop"):
        asyncio.run(theirs.get_session("loops"))


def test_a_store_serves_one_event_loop_after_another_however_busy_its_pool(
    db_url: str,
) -> None:
    """aiosqlite's and psycopg's connections serve any loop, but a pool's queue waits on
    the loop it first waited on: an engine the store made gets a new pool in a new loop,
    bursts larger than the pool go through in each; an application's engine whose pool
    waited in another loop is refused with a typed error, not asyncio's RuntimeError."""
    from hermes_orm._dialects import create_async_store_engine

    store = AsyncSessionStore(_async_url(db_url))  # its own engine: a pool of 5 + 10
    asyncio.run(store.create_session("loops", source="cli"))

    async def burst(on: AsyncSessionStore, calls: int) -> list[Any]:
        return await asyncio.gather(
            *(on.get_messages("loops") for _ in range(calls)), return_exceptions=True
        )

    for _ in range(3):
        assert asyncio.run(burst(store, 20)) == [[]] * 20
    asyncio.run(store.close())

    async def made_here() -> Any:
        return create_async_store_engine(db_url, pool_size=1, max_overflow=0)

    engine = asyncio.run(made_here())
    theirs = AsyncSessionStore(engine)
    assert asyncio.run(burst(theirs, 2)) == [[], []]  # one waited for the other
    refused = asyncio.run(burst(theirs, 2))
    assert [type(r) for r in refused if isinstance(r, BaseException)] == [InvalidArgumentError]
    assert "another event loop" in str(next(r for r in refused if isinstance(r, Exception)))


def test_two_event_loops_using_one_store_at_once_get_a_typed_error(db_url: str) -> None:
    """A store serves one event loop at a time: two threads each running loops on it
    swap its pool under each other, and a call that meets the other loop's pool or
    lock raises InvalidArgumentError (asyncio's RuntimeError before); the data stay exact."""
    store = AsyncSessionStore(_async_url(db_url))
    asyncio.run(store.create_session("loops", source="cli"))
    outcomes: list[Any] = []

    def loops(_n: int) -> None:
        async def burst() -> list[Any]:
            return await asyncio.gather(
                *(store.get_messages("loops") for _ in range(30)), return_exceptions=True
            )

        for _ in range(6):
            outcomes.extend(asyncio.run(burst()))

    errors: list[BaseException] = []
    for _ in range(40):  # until the loops met (most often at once; slower through a pooler)
        in_threads(loops, 2)
        errors = [r for r in outcomes if isinstance(r, BaseException)]
        if errors:
            break
    assert errors, "the two loops never met"
    assert {type(e) for e in errors} == {InvalidArgumentError}, errors[:3]
    assert all("another event loop at the same time" in str(e) for e in errors)
    assert all(r == [] for r in outcomes if not isinstance(r, BaseException))
    asyncio.run(store.flush("loops", conversation(1)))
    assert asyncio.run(store.get_messages("loops")) == conversation(1)
    asyncio.run(store.close())


def test_a_call_from_another_loop_while_one_is_under_way_is_refused_up_front(
    db_url: str,
) -> None:
    """Not left to meet the other loop's pool: the two would share its queue, and a
    wait woken from the other loop's thread could miss its wake-up (a call that never
    returned). Once the first loop's calls are done, another loop's are served."""
    store = AsyncSessionStore(_async_url(db_url))
    asyncio.run(store.create_session("loops", source="cli"))
    reading, go_on = threading.Event(), threading.Event()

    def held(*_args: Any) -> None:
        if threading.current_thread().name == "first" and not reading.is_set():
            reading.set()
            go_on.wait(30)

    event.listen(store.engine.sync_engine, "before_cursor_execute", held)
    first = threading.Thread(
        target=lambda: asyncio.run(store.get_messages("loops")), name="first", daemon=True
    )
    first.start()
    assert reading.wait(30)
    with pytest.raises(InvalidArgumentError, match="another event loop at the same time"):
        asyncio.run(store.get_messages("loops"))
    go_on.set()
    first.join(30)
    assert not first.is_alive()
    event.remove(store.engine.sync_engine, "before_cursor_execute", held)
    assert asyncio.run(store.get_messages("loops")) == []
    asyncio.run(store.close())


@pytest.mark.postgresql
def test_a_store_closed_with_a_call_under_way_leaves_no_connection_open(empty_pg: str) -> None:
    """close() disposes of the engine the store made; the connection of the call under way
    comes back after that, to the old pool: it is closed, not kept open there."""
    url = make_url(empty_pg).update_query_dict({"application_name": "closed-under-way"})
    admin = create_engine(empty_pg, poolclass=NullPool)

    def open_connections() -> int:
        with admin.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'closed-under-way'"
                ).scalar_one()
            )

    store = SessionStore(url)
    store.upgrade()
    store.create_session("s", source="cli")

    def close_now(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if _FLUSH_WRITE.match(statement):
            store.close()

    event.listen(store.engine, "before_cursor_execute", close_now)
    assert store.flush("s", _plain(2)).written == 2
    assert open_connections() == 0

    async def main() -> None:
        async_store = AsyncSessionStore(url)
        loop = asyncio.get_running_loop()
        closing: list[asyncio.Task[None]] = []

        def close_soon(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
            if _FLUSH_WRITE.match(statement) and not closing:
                closing.append(loop.create_task(async_store.close()))  # runs during the write

        event.listen(async_store.engine.sync_engine, "before_cursor_execute", close_soon)
        assert (await async_store.flush("s", _plain(3))).written == 1
        await closing[0]
        assert open_connections() == 0

    asyncio.run(main())
    admin.dispose()


@pytest.mark.sqlite
def test_an_aiosqlite_connection_closed_under_sqlalchemy_is_no_driver_to_use(
    tmp_path: Path,
) -> None:
    """aiosqlite's closed connection raises ValueError when asked for its sqlite3 one: the
    store takes it for none (its calls then raise the driver's error), not an untyped error."""

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'closed.db'}")
        conn = await engine.connect()
        sync = conn.sync_connection
        assert sync is not None
        driver = _sa.aiosqlite_connection(sync)
        assert driver is not None
        await driver.close()  # (as a connection shared by two tasks, one cancelled, may be)
        assert _sa.aiosqlite_connection(sync) is None
        assert _sa.driver_in_transaction(sync.connection.dbapi_connection) is None
        await conn.invalidate()
        await conn.close()
        await engine.dispose()

    asyncio.run(main())


def test_tasks_flushing_one_session(db_url: str) -> None:
    """Concurrent tasks of one event loop (an async web app) on one async store."""

    async def main() -> None:
        store = AsyncSessionStore(_async_url(db_url))
        await store.create_session("shared", source="gateway")
        full = conversation(10)

        async def run() -> None:
            for end in range(1, len(full) + 1):
                await store.flush("shared", full[:end])

        await asyncio.gather(*(run() for _ in range(4)))
        assert await store.get_messages("shared") == full
        session = await store.get_session("shared")
        assert session is not None
        assert session["flushed_idx"] == session["message_count"] == len(full)
        await store.close()

    asyncio.run(main())


def _assert_write_lock_free(engine: Engine) -> None:
    """On SQLite, that no transaction was left open: another writer gets the lock at once.

    (A PostgreSQL server rolls back the transaction of a connection that closes.)
    """
    if engine.dialect.name != "sqlite":
        return
    with engine.connect() as conn:  # engine's NullPool: this setting goes with the connection
        conn.exec_driver_sql("PRAGMA busy_timeout=0")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        conn.exec_driver_sql("ROLLBACK")


def test_a_task_cancelled_at_any_statement_leaves_the_session_exact(
    db_url: str, engine: Engine
) -> None:
    """Cancel a flush at each of its statements (and at its commit); a re-flush is exact."""

    async def main() -> None:
        store = AsyncSessionStore(_async_url(db_url))
        history, turn = conversation(2), [*conversation(2), *conversation(1, "t")]
        seen: list[str] = []
        target: dict[str, Any] = {}

        def record(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
            seen.append(statement)
            if len(seen) == target.get("at"):
                target["task"].cancel()

        def at_commit(_conn: Any) -> None:
            if target.get("at") == "commit":
                target["task"].cancel()

        sync = store.engine.sync_engine
        event.listen(sync, "before_cursor_execute", record)
        event.listen(sync, "commit", at_commit)
        await store.create_session("probe", source="cli")
        await store.flush("probe", history)
        seen.clear()
        await store.flush("probe", turn)
        points: list[Any] = [*range(1, len(seen) + 1), "commit"]
        for point in points:
            sid = f"cancel-{point}"
            await store.create_session(sid, source="cli")
            await store.flush(sid, history)
            seen.clear()
            target["at"] = point
            target["task"] = asyncio.ensure_future(store.flush(sid, turn))
            with contextlib.suppress(asyncio.CancelledError):
                await target["task"]
            target.clear()
            _assert_write_lock_free(engine)
            stored = await store.get_messages(sid)
            assert stored in (history, turn)  # all of the transaction, or none of it
            await store.flush(sid, turn)
            assert await store.get_messages(sid) == turn
            assert_exact(SessionStore(engine), sid, turn)
        await store.close()

    asyncio.run(main())


@pytest.mark.apis("async")
def test_a_task_cancelled_as_its_work_commits_leaves_no_trace(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled as a delete (or a flush) commits: a session made anew under the deleted
    id is no session whose writes were lost (no warning), and is written exactly."""

    async def main() -> None:
        store = AsyncSessionStore(_async_url(db_url))
        target: dict[str, Any] = {}

        def at_commit(_conn: Any) -> None:
            if "task" in target:
                target.pop("task").cancel()

        event.listen(store.engine.sync_engine, "commit", at_commit)
        for n in range(3):
            sid = f"gone-{n}"
            await store.create_session(sid, source="cli")
            await store.flush(sid, conversation(2))
            task = asyncio.ensure_future(store.delete_session(sid))
            target["task"] = task
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert await store.get_session(sid) is None  # it committed
            await store.create_session(sid, source="cli")
            assert (await store.flush(sid, conversation(1))).cursor == 3
            task = asyncio.ensure_future(store.flush(sid, conversation(2)))
            target["task"] = task
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert await store.get_messages(sid) == conversation(2)
        await store.close()
        await store.engine.dispose()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    noted = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert noted == [], noted


def test_a_pool_of_one_connection_serves_upgrade_and_vacuum(db_url: str, api: str) -> None:
    """The idle connection the store keeps goes back before work that takes its own."""
    from hermes_orm import create_async_store_engine, create_store_engine
    from hermes_orm.integrations.hermes import SessionDB

    one = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 1}
    if api == "sync":
        store = SessionStore(create_store_engine(db_url, **one))
        store.create_session("s", source="test")  # its connection now kept, idle
        store.upgrade()
        store.flush("s", conversation(1))
        SessionDB(store).vacuum()
        assert store.get_messages("s") == conversation(1)
        store.close()
        return

    async def main() -> None:
        url = make_url(db_url)
        driver = "aiosqlite" if url.get_backend_name() == "sqlite" else "psycopg_async"
        driver = "asyncpg" if api == "asyncpg" else driver
        async_url = url.set(drivername=f"{url.get_backend_name()}+{driver}")
        store = AsyncSessionStore(create_async_store_engine(async_url, **one))
        await store.create_session("s", source="test")
        await store.upgrade()
        await store.flush("s", conversation(1))
        assert await store.get_messages("s") == conversation(1)
        await store.close()

    asyncio.run(main())


def test_many_short_lived_threads_share_a_small_pool(db_url: str) -> None:
    """A store holds a connection only while it works: 50 threads, a pool of 2+2."""
    from hermes_orm import create_store_engine

    engine = create_store_engine(db_url, pool_size=2, max_overflow=2, pool_timeout=10)
    store = SessionStore(engine)
    errors: list[BaseException] = []

    def agent(n: int) -> None:
        try:
            sid = f"t{n}"
            store.create_session(sid, source="gateway")
            for end in range(1, 4):
                store.flush(sid, conversation(end))
            store.get_messages(sid)
            with engine.connect() as conn:  # the application's own work keeps its share
                conn.exec_driver_sql("SELECT 1")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    in_threads(agent, 50)
    assert errors == []
    # At most one idle connection kept (none if the last call ended with the pool full).
    assert engine.pool.checkedout() <= 1
    with store:  # closes it on the way out
        for n in range(50):
            assert_exact(store, f"t{n}", conversation(3))
    assert engine.pool.checkedout() == 0
    engine.dispose()


def test_threads_sharing_a_store_on_a_pool_of_one_connection_each_get_it(db_url: str) -> None:
    """The connection the store would keep goes back to the pool while others wait for it.

    Three threads append for a while: each gets its turn well within the
    pool's timeout (a thread giving the connection back does not take it
    again before a waiting one woke up), and the session is exact.
    """
    from hermes_orm import create_store_engine

    engine = create_store_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=1)
    store = SessionStore(engine, retry=RetryPolicy(unavailable_for=1.5))
    store.create_session("shared", source="gateway")
    errors: list[BaseException] = []
    appended = [0, 0, 0]
    deadline = time.monotonic() + 2.5

    def agent(n: int) -> None:
        while time.monotonic() < deadline:
            try:
                store.append("shared", {"role": "user", "content": f"{n}-{appended[n]}"})
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return
            appended[n] += 1

    in_threads(agent, 3)
    assert errors == []
    assert all(appended), appended
    stored = store.get_messages("shared")
    assert len(stored) == sum(appended) == store.get_session("shared")["flushed_idx"]  # type: ignore[index]
    for n in range(3):
        mine = [m["content"] for m in stored if m["content"].startswith(f"{n}-")]
        assert mine == [f"{n}-{i}" for i in range(appended[n])]
    store.close()
    engine.dispose()


@pytest.mark.sqlite  # the async store keeps a connection on aiosqlite only
def test_tasks_sharing_an_async_store_on_a_pool_of_one_connection_each_get_it(
    tmp_path: Path,
) -> None:
    """Two tasks flush back to back: the one waiting in the pool gets the connection
    as the other's call ends (given back, not kept; and taken by the waiting task
    before the other asks again)."""
    from hermes_orm import create_async_store_engine

    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    SessionStore(url.replace("+aiosqlite", "")).upgrade()

    async def main() -> None:
        engine = create_async_store_engine(url, pool_size=1, max_overflow=0, pool_timeout=0.5)
        # A wait in the pool that outlasts the retry bound fails the call.
        store = AsyncSessionStore(engine, retry=RetryPolicy(unavailable_for=0.1))
        lists: list[list[dict[str, Any]]] = [[], []]
        for n in range(2):
            await store.create_session(f"s{n}", source="gateway")
        deadline = time.monotonic() + 1.5

        async def agent(n: int) -> None:
            while time.monotonic() < deadline:
                lists[n].append({"role": "user", "content": f"{len(lists[n])}"})
                await store.flush(f"s{n}", lists[n])

        await asyncio.gather(agent(0), agent(1))
        for n in range(2):
            assert lists[n]
            assert await store.get_messages(f"s{n}") == lists[n]
        await store.close()
        await engine.dispose()

    asyncio.run(main())


@pytest.mark.sqlite  # the async store keeps a connection on aiosqlite only
def test_async_stores_sharing_an_engine_give_back_the_connection_they_keep(
    tmp_path: Path,
) -> None:
    """A pool of two: one store keeps one, the application holds the other, a second
    store needs one: the first store's goes back as the application's checkout
    leaves the pool empty."""
    from hermes_orm import create_async_store_engine

    url = f"sqlite+aiosqlite:///{tmp_path / 'two.db'}"
    SessionStore(url.replace("+aiosqlite", "")).upgrade()

    async def main() -> None:
        engine = create_async_store_engine(url, pool_size=2, max_overflow=0, pool_timeout=0.5)
        first = AsyncSessionStore(engine, retry=RetryPolicy(unavailable_for=0.1))
        second = AsyncSessionStore(engine, retry=RetryPolicy(unavailable_for=0.1))
        await first.create_session("a", source="test")
        assert engine.sync_engine.pool.checkedout() == 1  # kept, idle
        async with engine.connect() as held:
            await held.exec_driver_sql("SELECT 1")
            await second.create_session("b", source="test")
            await second.flush("b", conversation(1))
        assert await first.get_messages("a") == []
        assert await second.get_messages("b") == conversation(1)
        await first.close()
        await second.close()
        await engine.dispose()

    asyncio.run(main())


def test_the_kept_connection_goes_back_when_the_application_needs_it(db_url: str) -> None:
    """A pool of two: the store idle with one kept, the application takes both."""
    from hermes_orm import create_store_engine

    engine = create_store_engine(db_url, pool_size=2, max_overflow=0, pool_timeout=0.5)
    store = SessionStore(engine)
    store.create_session("s", source="test")
    store.flush("s", conversation(1))
    assert engine.pool.checkedout() == 1  # kept, idle
    with engine.connect() as one, engine.connect() as two:
        assert (
            one.exec_driver_sql("SELECT 1").scalar() == two.exec_driver_sql("SELECT 2").scalar() - 1
        )
    store.flush("s", conversation(2))  # and the store goes on
    assert_exact(store, "s", conversation(2))
    store.close()
    assert engine.pool.checkedout() == 0
    engine.dispose()


@pytest.mark.postgresql
def test_the_kept_connection_goes_when_the_application_disposes_of_its_engine(
    empty_pg: str,
) -> None:
    """engine.dispose() (a failover, new credentials): the connection the store kept between
    calls is of the pool it replaced; the store's next call closes it and opens a new one,
    and close() leaves nothing open."""
    hermes_orm.upgrade(empty_pg)
    url = make_url(empty_pg).update_query_dict({"application_name": "disposed-of"})
    admin = create_engine(empty_pg, poolclass=NullPool)

    def server_processes() -> list[int]:
        with admin.connect() as conn:
            statement = "SELECT pid FROM pg_stat_activity WHERE application_name = 'disposed-of'"
            return sorted(conn.exec_driver_sql(statement).scalars())

    def once_ended(*pids: int) -> list[int]:
        """The server processes, once those of ``pids`` (none given: all) ended.

        (A server process ends a moment after its client closed the connection;
        one that does not end within 10 s is still there, and counted.)
        """
        deadline = time.monotonic() + 10
        while True:
            now = server_processes()
            if not set(pids or now) & set(now) or time.monotonic() > deadline:
                return now
            time.sleep(0.05)

    engine = create_engine(url, pool_size=2, max_overflow=2)
    store = SessionStore(engine)
    store.create_session("s", source="web")
    kept = server_processes()
    assert len(kept) == 1
    engine.dispose()
    store.flush("s", conversation(1))
    now = once_ended(*kept)
    assert len(now) == 1
    assert now != kept
    engine.dispose()
    store.close()
    assert once_ended() == []

    async def main() -> None:
        async_engine = create_async_engine(url)
        async_store = AsyncSessionStore(async_engine)
        await async_store.flush("s", conversation(2))
        await async_engine.dispose()
        await async_store.flush("s", conversation(3))
        await async_engine.dispose()
        await async_store.close()
        assert once_ended() == []

    asyncio.run(main())
    admin.dispose()


@pytest.mark.sqlite
def test_the_kept_aiosqlite_connection_goes_when_the_application_disposes_of_its_engine(
    tmp_path: Path,
) -> None:
    """As on PostgreSQL: the kept connection, of the pool dispose() replaced, is closed
    by the store's next call, which runs on a new one."""

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'kept.db'}")
        store = AsyncSessionStore(engine)
        await store.upgrade()
        await store.create_session("s", source="web")
        kept = _sa.aiosqlite_connection(store._parked[0].sync_connection)
        await engine.dispose()
        await store.flush("s", conversation(1))
        assert kept is not None
        assert kept._connection is None  # closed (aiosqlite's own record of it)
        assert _sa.aiosqlite_connection(store._parked[0].sync_connection) is not kept
        await store.close()
        await engine.dispose()

    asyncio.run(main())


def test_a_connection_invalidated_as_its_try_ends_goes_back_at_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A try's deadline firing as the try ends leaves its connection invalidated: a pool
    of one, the store gives it back without asking it anything (which would take the
    pool's only connection under the store's own lock) and goes on."""
    from hermes_orm import create_store_engine

    engine = create_store_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=2)
    store = SessionStore(engine)
    store.create_session("s", source="test")
    real = store_module.attempt

    def then_invalidated(conn: Any, *args: Any) -> Any:
        result = real(conn, *args)
        conn.invalidate()  # the deadline's watchdog, as the try ended
        return result

    monkeypatch.setattr(store_module, "attempt", then_invalidated)
    done = threading.Event()
    flushing = threading.Thread(
        target=lambda: (store.flush("s", conversation(1)), done.set()), daemon=True
    )
    flushing.start()
    assert done.wait(10)
    monkeypatch.undo()
    store.flush("s", conversation(2))
    assert_exact(store, "s", conversation(2))
    store.close()
    assert engine.pool.checkedout() == 0
    engine.dispose()


def test_a_flush_cancelled_again_and_again_ends_before_its_task_does(tmp_path: Path) -> None:
    """aiosqlite runs a flush on its own thread, waiting there for the write lock: however
    often its task is cancelled (an anyio cancel scope cancels at every await), the call
    ends after the flush does, never to land later on a session made anew under its id."""
    head = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "same"}]
    old = [*head, {"role": "user", "content": "old a"}, {"role": "assistant", "content": "old b"}]
    new = [{"role": "user", "content": "another start"}, head[1]]  # the same last message

    async def main() -> None:
        path = tmp_path / "cancelled.db"
        store = AsyncSessionStore(f"sqlite:///{path}")
        await store.upgrade()
        await store.create_session("s", source="cli")
        await store.flush("s", head)  # the store now flushes s on the cursor it remembers
        holder = _waiting_for_the_write_lock(path)
        task = asyncio.ensure_future(store.flush("s", old))
        await asyncio.sleep(0.2)
        for _ in range(3):
            task.cancel()
            await asyncio.sleep(0.05)
        assert not task.done()  # its flush still waits for the lock
        holder.execute("ROLLBACK")
        holder.close()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert await store.get_messages("s") in (head, old)  # done or not, by now
        assert await store.delete_session("s")
        await store.create_session("s", source="cli")
        assert (await store.flush("s", new)).written == 2
        await asyncio.sleep(0.3)
        assert await store.get_messages("s") == new
        await store.close()

    asyncio.run(main())


def _waiting_for_the_write_lock(path: Path) -> sqlite3.Connection:
    """Another writer holding SQLite's write lock on ``path`` until its ROLLBACK."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_an_anyio_deadline_on_a_flush_is_the_scope_s_own_cancellation(tmp_path: Path) -> None:
    """A cancel scope (FastAPI's deadlines are anyio's) moves on after the flush ends, and
    knows the cancellation as its own: it does not escape to cancel the whole task."""
    import anyio

    path = tmp_path / "deadline.db"

    async def main() -> bool:
        store = AsyncSessionStore(f"sqlite:///{path}")
        await store.upgrade()
        await store.create_session("s", source="cli")
        holder = _waiting_for_the_write_lock(path)
        asyncio.get_running_loop().call_later(0.5, holder.execute, "ROLLBACK")
        with anyio.move_on_after(0.1) as scope:
            await store.flush("s", conversation(1))
        holder.close()
        assert await store.get_messages("s") in ([], conversation(1))  # done or not
        await store.close()
        return scope.cancelled_caught

    assert asyncio.run(main()) is True


def test_a_cancelled_flush_whose_cleanup_fails_is_cancelled_not_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection's cleanup failing (a transient error) must not stand in for the
    cancellation: the store would take it for the try's and run the flush again."""
    path = tmp_path / "cleanup.db"
    real = _dialects.give_back_sqlite
    failed: list[int] = []

    def fails_once(conn: Any) -> None:
        if not failed:
            failed.append(1)
            raise OperationalError("ROLLBACK", (), sqlite3.OperationalError("database is locked"))
        real(conn)

    async def main() -> None:
        store = AsyncSessionStore(f"sqlite:///{path}")
        await store.upgrade()
        await store.create_session("s", source="cli")
        holder = _waiting_for_the_write_lock(path)
        task = asyncio.ensure_future(store.flush("s", conversation(1)))
        await asyncio.sleep(0.2)
        monkeypatch.setattr(_dialects, "give_back_sqlite", fails_once)
        task.cancel()
        await asyncio.sleep(0.1)
        holder.execute("ROLLBACK")
        holder.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert failed == [1]
        assert await store.get_messages("s") in ([], conversation(1))
        await store.close()

    asyncio.run(main())


@pytest.mark.apis("async")  # asyncpg has no cursor class to trap; the listener path covers it
def test_a_task_cancelled_at_any_statement_of_an_unwatched_flush(
    db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancel a flush whose statements go straight to the driver (one call, on aiosqlite).

    The task is cancelled while each statement runs: the session is as before
    the flush or as the whole flush left it, and a re-flush is exact. On
    psycopg, on the cursor class the application chose and on psycopg's own
    (a flush runs on its ``AsyncRawCursor``).
    """
    from hermes_orm._dialects import create_async_store_engine

    backend = make_url(db_url).get_backend_name()
    trap = _DriverTrap()

    async def main(cursors: str) -> None:
        loop = asyncio.get_running_loop()
        connect_args = trap.connect_args(backend, "async") if cursors == "chosen" else {}
        async_engine = create_async_store_engine(db_url, connect_args=connect_args)
        if cursors != "chosen":
            trap.trap_own_cursors(monkeypatch, async_engine.sync_engine)
        store = AsyncSessionStore(async_engine)
        history, turn = conversation(2), [*conversation(2), *conversation(1, "t")]
        for path in ("remembered cursor", "locked read"):
            for n in range(1, _statements_per_flush(path, async_engine.sync_engine) + 1):
                sid = f"cancel-{cursors}-{path}-{n}"
                await store.create_session(sid, source="cli")
                await store.flush(sid, history)
                flusher = store if path == "remembered cursor" else AsyncSessionStore(async_engine)
                await flusher.get_session(sid)
                task = asyncio.ensure_future(flusher.flush(sid, turn))
                trap.arm(n, Boom("never raised"))
                trap.exc = None
                trap.action = lambda task=task: loop.call_soon_threadsafe(task.cancel)
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                trap.action = None
                assert task.cancelled() or task.result().written == 3
                _assert_write_lock_free(engine)
                assert await store.get_messages(sid) in (history, turn)
                assert (await flusher.flush(sid, turn)).cursor == len(turn)
                assert_exact(SessionStore(engine), sid, turn)
                if flusher is not store:
                    await flusher.close()
        await store.close()
        await async_engine.dispose()

    for cursors in ("chosen", "psycopg's own") if backend == "postgresql" else ("chosen",):
        asyncio.run(main(cursors))


@pytest.mark.apis("async", "asyncpg")
def test_many_tasks_share_a_small_pool(db_url: str, api: str) -> None:
    """An async store holds a connection only while it works: 50 tasks, a pool of 2+2.

    On aiosqlite it keeps one idle connection between calls (its connections
    serve any event loop) and ``close`` gives it back; on PostgreSQL's drivers
    it keeps none.
    """
    from sqlalchemy.engine import make_url

    from hermes_orm._dialects import create_async_store_engine

    url = make_url(db_url)
    if api == "asyncpg":
        url = url.set(drivername="postgresql+asyncpg")
    kept = 1 if url.get_backend_name() == "sqlite" else 0

    async def main() -> None:
        engine = create_async_store_engine(url, pool_size=2, max_overflow=2, pool_timeout=10)
        store = AsyncSessionStore(engine)

        async def agent(n: int) -> None:
            sid = f"t{n}"
            await store.create_session(sid, source="gateway")
            for end in range(1, 4):
                await store.flush(sid, conversation(end))
            await store.get_messages(sid)
            async with engine.connect() as conn:  # the application's own work keeps its share
                await conn.exec_driver_sql("SELECT 1")

        await asyncio.gather(*(agent(n) for n in range(50)))
        # At most one kept (none if the last call ended with the pool full).
        assert engine.pool.checkedout() <= kept
        async with store:  # closes it on the way out
            for n in range(50):
                assert await store.get_messages(f"t{n}") == conversation(3)
        assert engine.pool.checkedout() == 0
        await engine.dispose()

    asyncio.run(main())


@pytest.mark.apis("async", "asyncpg")
@pytest.mark.parametrize("waiter", ["store", "application"])
@pytest.mark.parametrize("disposed", [False, True], ids=["pool kept", "engine disposed"])
def test_a_connect_cancelled_in_a_full_pool_wakes_the_call_waiting_for_one(
    db_url: str, api: str, waiter: str, disposed: bool
) -> None:
    """A pool of two, the application holding one: a call cancelled as its connection
    is made frees its place, which wakes no one waiting in the pool's queue. The store
    makes a connection and gives it back: the waiting call (the store's, or the
    application's own checkout) goes on at once, not at the pool's timeout. So it does
    when the application disposed of its engine meanwhile: the waiting call waits in
    the pool that was, where the place was freed."""
    from sqlalchemy.engine import make_url

    from hermes_orm import create_async_store_engine

    url = make_url(db_url)
    if api == "asyncpg":
        url = url.set(drivername="postgresql+asyncpg")
    elif url.get_backend_name() == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite")

    async def main(steps: int) -> float:
        engine = create_async_store_engine(url, pool_size=2, max_overflow=0, pool_timeout=60)
        store = AsyncSessionStore(engine)
        await store.ensure_session("s", source="cli")
        await store.close()  # (aiosqlite: the connection it keeps, given back, is the one held)
        async with engine.connect() as held:
            await held.exec_driver_sql("SELECT 1")
            cancelled = asyncio.ensure_future(store.get_messages("s"))
            for _ in range(steps):
                await asyncio.sleep(0)
            if waiter == "store":
                waiting: asyncio.Future[Any] = asyncio.ensure_future(store.get_messages("s"))
            else:
                waiting = asyncio.ensure_future(engine.connect().start())
            await asyncio.sleep(0.001)  # the first connection under way, the waiter queued
            if disposed:
                await engine.dispose()
            cancelled.cancel()
            start = time.monotonic()
            await asyncio.gather(cancelled, return_exceptions=True)
            got = await waiting
            took = time.monotonic() - start
            if waiter == "store":
                assert got == []
            else:
                await got.close()
        await store.close()
        await engine.dispose()
        return took

    for steps in range(4):  # (cancelled at several points of the connection's making)
        assert asyncio.run(main(steps)) < 20, steps  # (not the 60 s of a wait to its end)


# -- the same harness against the design this library replaces -----------------------------


class InMemoryCursorFlusher:
    """A cursor kept in process memory, one commit per message, advanced after the loop."""

    def __init__(self, engine: Engine, session_id: str) -> None:
        self.engine, self.session_id, self.cursor = engine, session_id, 0

    def flush(self, messages: list[dict[str, Any]]) -> None:
        from hermes_orm._codec import encode_message

        for offset, message in enumerate(messages[self.cursor :]):
            row = {
                **encode_message(message).row,
                "session_id": self.session_id,
                "idx": self.cursor + offset,
            }
            with self.engine.begin() as conn:
                conn.execute(Message.__table__.insert(), [row])
        self.cursor = len(messages)


def test_the_failure_harness_catches_an_in_memory_cursor(
    store: SessionStore, engine: Engine
) -> None:
    """Proof that the failure test has teeth: the old design cannot pass it."""
    store.create_session("naive", source="cli")
    naive = InMemoryCursorFlusher(engine, "naive")
    turn = conversation(1)
    hook = _fail_at(engine, 2, Boom("second message fails"))
    try:
        with pytest.raises(Boom):
            naive.flush(turn)
    finally:
        event.remove(engine, "before_cursor_execute", hook)
    # the retry rewrites message 0: only UNIQUE(session_id, idx) stops the duplicate
    with pytest.raises(IntegrityError):
        naive.flush(turn)
    with pytest.raises(AssertionError):
        assert_exact(store, "naive", turn)


def test_a_held_lock_ends_in_a_busy_error_that_names_the_holder(db_url: str, backend: str) -> None:
    from hermes_orm import create_store_engine

    store = SessionStore(
        create_store_engine(db_url, lock_timeout=0.2),
        lock_timeout=0.2,
        retry=RetryPolicy(attempts=2, base_delay=0.01),
    )
    store.create_session("s", source="cli")
    holder = create_store_engine(
        db_url, connect_args={"application_name": "long-writer"} if backend == "postgresql" else {}
    )
    with holder.connect() as conn:
        if backend == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            sessions = table_name(holder, "hermes_sessions")
            conn.exec_driver_sql(f"SELECT 1 FROM {sessions} WHERE id = 's' FOR UPDATE")
        with pytest.raises(DatabaseBusyError) as err:
            store.flush("s", conversation(1))
        conn.rollback()
    assert err.value.attempts == 2
    if backend == "sqlite":
        assert "held the SQLite write lock" in str(err.value)
    else:
        assert "long-writer" in str(err.value)
    assert store.flush("s", conversation(1)).written == 3
    holder.dispose()
    store.close()


@pytest.mark.postgresql
def test_who_held_the_lock_is_not_waited_for_from_a_pool_with_none_to_give(
    empty_pg: str,
) -> None:
    """Another thread took the connection a busy flush gave back: its error comes at once."""
    from hermes_orm import create_store_engine

    engine = create_store_engine(empty_pg, pool_size=1, max_overflow=0, pool_timeout=5)
    with engine.connect() as conn:  # the pool's only connection, another thread's
        with pytest.raises(DBAPIError) as failed:
            conn.exec_driver_sql("SELECT 1 / 0")
        start = time.monotonic()
        said = _dialects.describe_busy(engine, failed.value)
        assert time.monotonic() - start < 1
    assert said.startswith("PostgreSQL reported"), said
    engine.dispose()

    async def main() -> None:  # the same, from an AsyncSessionStore
        async_engine = _dialects.create_async_store_engine(
            empty_pg, pool_size=1, max_overflow=0, pool_timeout=5
        )
        store = AsyncSessionStore(async_engine)
        async with async_engine.connect():
            start = time.monotonic()
            assert await store._busy_holders(failed.value, async_engine) == []
            assert time.monotonic() - start < 1
        await async_engine.dispose()

    asyncio.run(main())


def test_a_remembered_cursor_is_always_verified(store: SessionStore, engine: Engine) -> None:
    """Another store moving the cursor, or recreating the session, is never missed."""
    other = fresh_store(store)
    store.create_session("s", source="cli")
    first, second, third = conversation(1, "a"), conversation(1, "b"), conversation(1, "c")
    store.flush("s", first)  # store now remembers cursor 3
    other.flush("s", [*first, *second])  # ...which another writer moves to 6
    assert store.flush("s", [*first, *second, *third]) == FlushResult(written=3, cursor=9)
    assert_exact(store, "s", [*first, *second, *third])

    other.delete_session("s")  # the session is recreated empty behind store's back
    other.create_session("s", source="cli")
    assert store.flush("s", [*first, *second]) == FlushResult(written=6, cursor=6)
    assert_exact(store, "s", [*first, *second])


@pytest.mark.parametrize(
    "change",
    ["text replaced", "key added", "key removed", "tool call edited inside"],
)
def test_a_stored_message_changed_in_place_is_refused(store: SessionStore, change: str) -> None:
    """The next flush sees a change to the caller's last stored dict, however it was made."""
    store.create_session("s", source="cli")
    msgs = conversation(1)
    if change == "tool call edited inside":
        msgs.pop()  # the assistant message with its tool call list is last
    store.flush("s", msgs)
    last = msgs[-1]
    if change == "text replaced":
        last["content"] = "result 0 (edited)"
    elif change == "key added":
        last["reasoning"] = "added after the flush"
    elif change == "key removed":
        del last["tool_call_id"]
    else:
        last["tool_calls"][0]["function"]["arguments"] = '{"q": "edited"}'
    with pytest.raises(HistoryDivergedError):
        store.flush("s", [*msgs, {"role": "user", "content": "next"}])
    assert store.get_session("s")["flushed_idx"] == len(msgs)


def test_a_turn_encodes_only_its_new_messages(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No stored message is digested again while it equals the store's copy of it.

    The copy is taken all the way down, so this holds for a message holding
    lists and dicts (a tool call) too.
    """
    from hermes_orm import _codec

    encoded: list[dict[str, Any]] = []
    encode = _codec.encode_message

    def counting(message: Any, index: int | None = None) -> _codec.EncodedMessage:
        encoded.append(message)
        return encode(message, index)

    monkeypatch.setattr(_codec, "encode_message", counting)
    store.create_session("s", source="cli")
    msgs = conversation(1)
    store.flush("s", msgs)  # ends with the tool result: text only
    encoded.clear()
    msgs += conversation(1, "b")[:2]  # ends with the assistant's tool call
    store.flush("s", msgs)
    assert encoded == msgs[3:]
    encoded.clear()
    msgs.append(conversation(1, "b")[2])
    store.flush("s", msgs)
    assert encoded == [msgs[5]]


def test_no_transaction_is_left_open_between_calls(
    store: SessionStore, engine: Engine, backend: str
) -> None:
    """A kept connection holds no lock, snapshot or idle transaction after any call."""
    store.create_session("s", source="cli")
    store.flush("s", conversation(2))
    store.get_messages("s")
    store.get_session("s")
    with pytest.raises(HistoryDivergedError):
        store.flush("s", [{"role": "user", "content": "rewritten"}])
    with engine.connect() as conn:
        if backend == "sqlite":
            busy, _, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
            assert busy == 0
        else:
            idle = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND state = 'idle in transaction'"
            ).scalar_one()
            assert idle == 0


def test_a_bulk_flush_streams_in_batches_and_stays_atomic(store: SessionStore) -> None:
    from hermes_orm.store import _BATCH

    store.create_session("bulk", source="import")
    msgs = [{"role": "user", "content": f"m{i}"} for i in range(2 * _BATCH + 7)]
    store.flush("bulk", msgs[:3])
    bad = [*msgs, {"role": "user", "content": float("nan")}]
    with pytest.raises(InvalidMessageError) as err:
        store.flush("bulk", bad)  # the bad message is in the last batch
    assert err.value.index == len(msgs)
    assert_exact(store, "bulk", msgs[:3])
    assert store.flush("bulk", msgs).written == len(msgs) - 3
    assert_exact(store, "bulk", msgs)


@pytest.mark.parametrize("path", ["remembered cursor", "locked read"])
def test_a_flush_of_many_bytes_is_split_into_inserts_of_a_bounded_size(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """PostgreSQL refuses a statement of more than 1 GiB by closing the connection, which
    the store took for a server out of reach: it sent the whole INSERT again for
    ``unavailable_for``, then said to check the server. (The bound made small here.)"""
    from hermes_orm import store as store_module

    monkeypatch.setattr(store_module, "_STATEMENT_BYTES", 20_000)
    store.create_session("big", source="cli")
    history = [{"role": "user", "content": "hi"}]
    store.flush("big", history)
    if path == "locked read":
        store = fresh_store(store)
    turn = [*history, *({"role": "tool", "content": f"{i} " + "x" * 8_000} for i in range(5))]
    inserts: list[int] = []

    def seen(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
        if "INSERT INTO" in unqualified(statement) and "hermes_messages" in statement:
            inserts.append(len(params))

    with listening(store.engine, "before_cursor_execute", seen):
        assert store.flush("big", turn).written == 5
    assert len(inserts) == 3, inserts  # 2 + 2 + 1 rows of about 8,000 bytes
    assert_exact(store, "big", turn)
    assert store.flush("big", turn).written == 0


def test_a_message_larger_than_a_row_may_hold_is_refused_before_anything_is_written(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite refused it as 'string or blob too big', PostgreSQL by closing the
    connection: now an InvalidMessageError naming the message. (The bound made small.)"""
    from hermes_orm import _codec

    monkeypatch.setattr(_codec, "ROW_BYTES_MAX", 10_000)
    monkeypatch.setattr(_codec, "_ROW_CHARACTERS_SURE", 2_000)
    store.create_session("big", source="cli")
    fits = {"role": "user", "content": "é" * 4_500}  # 9,000 bytes
    # Counted as stored: JSON's false (digested as 0), 1e300 (digested as its 301 digits).
    big_floats = {"role": "user", "content": "ok", "tool_calls": [1e300] * 40}
    too_big = [
        {"role": "user", "content": "é" * 5_001},
        {"role": "tool", "content": "ok", "tool_calls": [{"a": "y" * 10_000}]},
        {"role": "tool", "content": "ok", "tool_calls": [False] * 1_700},
    ]
    for message in too_big:
        with pytest.raises(InvalidMessageError, match="more than a row may hold") as refused:
            store.flush("big", [fits, message])
        assert refused.value.index == 1
    assert_exact(store, "big", [])
    assert store.flush("big", [fits, big_floats]).written == 2


@pytest.mark.parametrize("path", ["remembered cursor", "locked read"])
def test_a_bulk_flush_retried_after_a_transient_error_is_exact(
    store: SessionStore, engine: Engine, backend: str, path: str
) -> None:
    """The retry of a streamed flush must re-encode from the start, not resume a stream."""
    from hermes_orm.store import _BATCH

    store.create_session("bulk", source="import")
    store.flush("bulk", [{"role": "user", "content": "first"}])
    msgs = [{"role": "user", "content": "first"}]
    msgs += [{"role": "user", "content": f"m{i}"} for i in range(2 * _BATCH + 3)]
    writer = store if path == "remembered cursor" else fresh_store(store)
    inserts = {"n": 0}

    def fail_second_insert(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if _INSERT_MESSAGES.match(statement):
            inserts["n"] += 1
            if inserts["n"] == 2:
                raise transient(backend)

    event.listen(store.engine, "before_cursor_execute", fail_second_insert)
    try:
        assert writer.flush("bulk", msgs).written == len(msgs) - 1
    finally:
        event.remove(store.engine, "before_cursor_execute", fail_second_insert)
    assert inserts["n"] > 3  # the whole transaction ran again
    assert_exact(store, "bulk", msgs)


_ADAPTED = ((type(None), None), (bytes, b"\x00digest"))


def test_a_sqlite_store_binds_none_and_bytes_through_adapters_that_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for kind, _ in _ADAPTED:
        monkeypatch.delitem(sqlite3.adapters, (kind, sqlite3.PrepareProtocol), raising=False)
    store = SessionStore(f"sqlite:///{tmp_path / 'a.db'}")
    for kind, value in _ADAPTED:
        assert sqlite3.adapters[(kind, sqlite3.PrepareProtocol)](value) is value
    plain = sqlite3.connect(":memory:")
    assert plain.execute("SELECT ? IS NULL, typeof(?)", (None, b"x")).fetchone() == (1, "blob")
    plain.close()
    store.upgrade()
    store.create_session("s", "cli")
    store.flush("s", [{"role": "user", "content": None}, {"role": "user", "content": "x"}])
    with store.engine.connect() as conn:
        row = conn.exec_driver_sql(
            "SELECT content IS NULL, typeof(digest) FROM hermes_messages WHERE idx = 0"
        ).one()
    assert tuple(row) == (1, "blob")
    assert store.get_messages("s")[0]["content"] is None
    store.close()


def test_an_adapter_the_application_registered_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def theirs(value: Any) -> Any:
        return value

    for kind, _ in _ADAPTED:
        monkeypatch.setitem(sqlite3.adapters, (kind, sqlite3.PrepareProtocol), theirs)
    SessionStore(f"sqlite:///{tmp_path / 'a.db'}").close()
    for kind, _ in _ADAPTED:
        assert sqlite3.adapters[(kind, sqlite3.PrepareProtocol)] is theirs


def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    """A connection pooled by the parent is never used by a child it forks."""
    store = SessionStore(f"sqlite:///{tmp_path / 'forked.db'}")
    store.upgrade()
    store.create_session("s", source="cli")
    store.flush("s", conversation(1))

    def pooled() -> int:  # the driver connection the next operation would get
        with store.engine.connect() as conn:
            return id(conn.connection.dbapi_connection)

    inherited = pooled()
    results: Any = multiprocessing.get_context("fork").SimpleQueue()

    def child() -> None:
        store.flush("s", conversation(2))
        results.put(pooled() != inherited)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert results.get() is True
    assert pooled() == inherited  # the parent keeps its own
    assert_exact(store, "s", conversation(2))
    store.close()


def _commit_then_drop(store: Any, monkeypatch: pytest.MonkeyPatch, times: int = 1) -> list[int]:
    """Every COMMIT of the next ``times`` lands, then the connection drops (a lost ack)."""
    dialect = store.engine.dialect
    real_commit = dialect.do_commit
    dropped: list[int] = []

    def commit_then_drop(dbapi_connection: Any) -> None:
        real_commit(dbapi_connection)
        if len(dropped) < times:
            dropped.append(1)
            raise dialect.loaded_dbapi.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(dialect, "do_commit", commit_then_drop)
    return dropped


@pytest.mark.backends("postgresql")  # a local SQLite commit has no acknowledgement to lose
def test_a_write_whose_commit_ack_was_lost_is_not_run_again(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's own retry asks the server whether the earlier try committed, first."""
    store.create_session("s", source="cli")
    store.flush("s", conversation(1))
    dropped = _commit_then_drop(store, monkeypatch)
    assert store.append("s", {"role": "user", "content": "once"}) == 3
    assert dropped == [1]
    dropped = _commit_then_drop(store, monkeypatch)
    assert store.create_session("t", source="cli")["id"] == "t"
    assert dropped == [1]
    dropped = _commit_then_drop(store, monkeypatch)
    assert store.delete_session("t") is True
    assert dropped == [1]
    monkeypatch.undo()
    assert [m["content"] for m in store.get_messages("s")][-1] == "once"
    assert_exact(store, "s", [*conversation(1), {"role": "user", "content": "once"}])


@pytest.mark.backends("postgresql")
def test_a_write_whose_commit_failed_unanswered_runs_again(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server says the earlier try did not commit: the retry writes, once."""
    store.create_session("s", source="cli")
    dialect = store.engine.dialect
    failed: list[int] = []

    def drop_before_commit(dbapi_connection: Any) -> None:
        if not failed:
            failed.append(1)
            dbapi_connection.rollback()
            raise dialect.loaded_dbapi.OperationalError("server closed the connection unexpectedly")
        type(dialect).do_commit(dialect, dbapi_connection)

    monkeypatch.setattr(dialect, "do_commit", drop_before_commit)
    assert store.append("s", {"role": "user", "content": "once"}) == 0
    assert failed == [1]
    monkeypatch.undo()
    assert_exact(store, "s", [{"role": "user", "content": "once"}])


@pytest.mark.direct("builds plain engines on the URL, as an application would")
@pytest.mark.parametrize("how", ["create_engine", "execution_options"])
def test_an_autocommit_engine_is_refused_before_anything_is_written(db_url: str, how: str) -> None:
    """On it each statement would commit alone: no flush could be all-or-nothing."""
    from sqlalchemy import create_engine

    from hermes_orm import InvalidArgumentError, create_async_store_engine
    from hermes_orm.async_store import AsyncSessionStore

    if how == "create_engine":
        engine = create_engine(db_url, isolation_level="AUTOCOMMIT")
    else:
        engine = create_engine(db_url).execution_options(isolation_level="AUTOCOMMIT")
    with pytest.raises(InvalidArgumentError, match="AUTOCOMMIT"):
        SessionStore(engine)
    async_engine = create_async_store_engine(db_url, isolation_level="AUTOCOMMIT")
    with pytest.raises(InvalidArgumentError, match="AUTOCOMMIT"):
        AsyncSessionStore(async_engine)
    assert count_rows(engine, "hermes_sessions") == 0
    store = SessionStore(create_engine(db_url))  # the same database, a transactional engine
    store.create_session("s", source="cli")
    assert store.flush("s", conversation(1)).written == 3
    store.close()
    engine.dispose()


@pytest.mark.backends("postgresql")
@pytest.mark.apis("sync")  # both APIs below
@pytest.mark.direct("builds plain engines on the URL, as an application would")
def test_an_engine_whose_driver_autocommits_is_refused_before_anything_is_written(
    db_url: str, api: str
) -> None:
    """psycopg's ``autocommit=True`` as a connect argument: seen once a connection is taken."""
    from sqlalchemy import create_engine

    from hermes_orm import InvalidArgumentError
    from hermes_orm.async_store import AsyncSessionStore

    store = SessionStore(create_engine(db_url, connect_args={"autocommit": True}))
    with pytest.raises(InvalidArgumentError, match="autocommit"):
        store.create_session("s", source="cli")
    store.close()

    async def main() -> None:
        url = make_url(db_url).set(drivername="postgresql+psycopg_async")
        engine = create_async_engine(url, connect_args={"autocommit": True})
        async_store = AsyncSessionStore(engine)
        with pytest.raises(InvalidArgumentError, match="autocommit"):
            await async_store.create_session("s", source="cli")
        await async_store.close()
        await engine.dispose()

    asyncio.run(main())
    plain = create_engine(db_url)
    assert count_rows(plain, "hermes_sessions") == 0
    plain.dispose()


@pytest.mark.backends("postgresql")
@pytest.mark.apis("sync")  # psycopg2 has no asyncio connections
@pytest.mark.direct("its psycopg2 engine sets lock_timeout as a startup option")
def test_psycopg2_lock_timeouts_are_retried_like_psycopgs(store: SessionStore, db_url: str) -> None:
    """psycopg2 reports a server error's SQLSTATE as ``pgcode``: it is retried all the same."""
    import threading
    import time

    from sqlalchemy import create_engine

    store.create_session("s", source="cli")
    url = make_url(db_url).set(drivername="postgresql+psycopg2")
    engine = create_engine(url, connect_args={"options": "-c lock_timeout=50"})
    psycopg2_store = SessionStore(engine, retry=RetryPolicy(attempts=50, base_delay=0.01))
    holder = create_engine(db_url)
    held = threading.Event()

    def hold_the_row() -> None:
        with holder.begin() as conn:
            conn.exec_driver_sql("SELECT 1 FROM hermes_sessions WHERE id = 's' FOR UPDATE")
            held.set()
            time.sleep(0.4)

    thread = threading.Thread(target=hold_the_row)
    thread.start()
    held.wait()
    try:
        assert psycopg2_store.flush("s", conversation(1)).written == 3  # after the lock waits
    finally:
        thread.join()
        psycopg2_store.close()
        engine.dispose()
        holder.dispose()
    assert_exact(store, "s", conversation(1))


@pytest.mark.backends("postgresql")  # the one-statement flush is PostgreSQL's
@pytest.mark.direct("with no settings to run first, a flush is one statement")
def test_a_transaction_left_open_on_the_driver_connection_gets_a_whole_flush(
    db_url: str, engine: Engine, api: str
) -> None:
    """A checkout listener that runs SQL leaves the driver in a transaction: no autocommit then.

    The flush runs as a transaction of its own statements and commits them; the
    messages are there for every other connection, exactly once.
    """
    from sqlalchemy.pool import NullPool

    from hermes_orm import create_store_engine
    from hermes_orm._dialects import create_async_store_engine
    from tests.conftest import BlockingStore

    def leave_open(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT 1")
        cursor.close()

    store: Any
    if api == "sync":
        own = create_store_engine(db_url, poolclass=NullPool)
        event.listen(own, "checkout", leave_open)
        store = SessionStore(own)
    else:
        async_engine = create_async_store_engine(db_url, poolclass=NullPool)
        event.listen(async_engine.sync_engine, "checkout", leave_open)
        store = BlockingStore(AsyncSessionStore(async_engine), engine)
    store.create_session("s", source="cli")
    history = conversation(2)
    store.flush("s", history)
    turn = [*history, *conversation(1, "t")]
    assert store.flush("s", turn).written == 3  # on the remembered cursor
    assert_exact(store, "s", turn)
    assert count_rows(engine, "hermes_messages", session_id="s") == len(turn)  # seen elsewhere
    store.close()
    sync_engine(store).dispose()


@pytest.mark.parametrize("path", ["remembered cursor", "locked read"])
def test_a_message_changed_while_its_flush_writes_is_refused_after(store: Any, path: str) -> None:
    """The store's copy of a message is the one it stored, not what the list holds afterwards.

    An agent streams into its last message while the flush of the list is
    under way (an asyncio task's, or another thread's): the database holds the
    text as it was encoded, so the next flush of the list, changed below the
    cursor, is refused as a fresh store refuses it.
    """
    store.create_session("s", source="cli")
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
    store.flush("s", messages)
    if path == "locked read":
        store.forget_cursor("s")
    messages.append({"role": "assistant", "content": "Hel"})

    def stream_on(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if _FLUSH_WRITE.match(statement) and messages[-1]["content"] == "Hel":
            messages[-1]["content"] += "lo world"

    event.listen(store.engine, "before_cursor_execute", stream_on)
    try:
        assert store.flush("s", messages).written == 1
    finally:
        event.remove(store.engine, "before_cursor_execute", stream_on)
    assert messages[-1]["content"] == "Hello world"  # the change happened during the write
    assert store.get_messages("s")[1]["content"] == "Hel"
    for flusher in (store, fresh_store(store)):
        with pytest.raises(HistoryDivergedError) as err:
            flusher.flush("s", [*messages, {"role": "user", "content": "next"}])
        assert err.value.index == 1
    assert_exact(store, "s", [messages[0], {"role": "assistant", "content": "Hel"}])


def test_a_cursor_above_missing_rows_is_refused_not_written_over(store: Any) -> None:
    """Rows gone below the stored cursor (written around the store) are not taken as stored.

    Otherwise the flush of the agent's list would take the missing messages as
    the database's and write only what follows: they would never be stored.
    """
    store.create_session("s", source="cli")
    store.flush("s", _plain(3))
    with sync_engine(store).begin() as conn:
        conn.execute(Message.__table__.delete().where(Message.idx == 1))
    # A store that remembers the session trusts its copies (README: restart it after
    # rows were changed below it); one that reads the stored digests finds the hole.
    for flusher, verify in ((fresh_store(store), "all"), (store, "full")):
        with pytest.raises(DatabaseError, match="1 of the messages below it are not stored"):
            flusher.flush("s", _plain(4), verify=verify)
    assert count_rows(sync_engine(store), "hermes_messages") == 2


def test_a_store_closed_during_a_call_keeps_no_connection(db_url: str) -> None:
    """close() while a call is under way: that call's connection goes back to the pool."""
    from hermes_orm import create_store_engine
    from hermes_orm._dialects import create_async_store_engine

    engine = create_store_engine(db_url)
    store = SessionStore(engine)
    store.create_session("s", source="cli")

    def close_now(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if _FLUSH_WRITE.match(statement):
            store.close()

    event.listen(engine, "before_cursor_execute", close_now)
    assert store.flush("s", _plain(2)).written == 2
    event.remove(engine, "before_cursor_execute", close_now)
    assert engine.pool.checkedout() == 0
    assert store.flush("s", _plain(3)).written == 1  # a closed store may be used again
    store.close()
    engine.dispose()

    async def main() -> None:
        async_engine = create_async_store_engine(db_url)
        async_store = AsyncSessionStore(async_engine)
        await async_store.create_session("a", source="cli")
        loop = asyncio.get_running_loop()
        closing: list[asyncio.Task[None]] = []

        def close_soon(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
            if _FLUSH_WRITE.match(statement) and not closing:
                closing.append(loop.create_task(async_store.close()))  # runs during the write

        sync = async_engine.sync_engine
        event.listen(sync, "before_cursor_execute", close_soon)
        assert (await async_store.flush("a", _plain(2))).written == 2
        event.remove(sync, "before_cursor_execute", close_soon)
        await closing[0]
        assert async_engine.pool.checkedout() == 0
        await async_engine.dispose()

    asyncio.run(main())


class _Stepped:
    """Await ``coro``, calling ``each(n, resolved)`` around its n-th suspension (n from 1).

    Before the awaited future is handed on (``resolved`` False), ``each`` may
    cancel the running task: the suspension then raises CancelledError. After
    it resolved (True), ``each`` may return a coroutine, run whole before
    ``coro`` goes on.
    """

    def __init__(self, coro: Any, each: Callable[[int, bool], Any]) -> None:
        self.coro, self.each = coro, each

    def __await__(self) -> Any:
        steps, value, error, n = self.coro.__await__(), None, None, 0
        while True:
            try:
                future = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as stop:
                return stop.value
            error = None
            n += 1
            self.each(n, False)
            try:
                value = yield future
            except BaseException as exc:  # handed back to the coroutine
                error, value = exc, None
            then = self.each(n, True)
            if then is not None:
                yield from asyncio.ensure_future(then).__await__()


def cancel_at(k: int) -> Callable[[int, bool], None]:
    """For :class:`_Stepped`: cancel the running task as it suspends for the ``k``-th time."""

    def each(n: int, resolved: bool) -> None:
        if n == k and not resolved:
            asyncio.current_task().cancel()  # type: ignore[union-attr]

    return each


@pytest.mark.sqlite  # (on PostgreSQL the flush's last await is its statement: no hold after)
def test_a_flush_done_as_its_session_is_made_anew_leaves_nothing_to_check_against(
    tmp_path: Path,
) -> None:
    """Between a flush's COMMIT and its return, the same store deletes the session,
    makes it anew and flushes another history (same length, same last message).

    What the first flush wrote is no longer there: the store must not take it
    for the new session's history, so a list continuing the old one is refused.
    """
    path = tmp_path / "anew.db"
    SessionStore(f"sqlite:///{path}").upgrade()
    old = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"}]
    old.append({"role": "user", "content": "ok"})
    new = [old[0], {"role": "assistant", "content": "two"}, old[2]]

    async def main() -> None:
        store = AsyncSessionStore(f"sqlite+aiosqlite:///{path}")
        await store.create_session("s", source="test")
        await store.flush("s", old[:1])

        async def made_anew() -> None:
            await store.delete_session("s")
            await store.create_session("s", source="test")
            await store.flush("s", new)

        committed: list[bool] = []
        engine = store.engine.sync_engine

        def on_commit(_conn: Any) -> None:
            committed.append(True)

        event.listen(engine, "commit", on_commit)
        try:
            held: list[bool] = []

            def hold_after_commit(_n: int, resolved: bool) -> Any:
                if resolved and committed and not held:
                    held.append(True)
                    return made_anew()
                return None

            flushed = await _Stepped(store.flush("s", old), hold_after_commit)
        finally:
            event.remove(engine, "commit", on_commit)
        assert flushed.cursor == 3
        with pytest.raises(HistoryDivergedError):
            await store.flush("s", [*old, {"role": "assistant", "content": "next"}])
        assert await store.get_messages("s") == new
        await store.close()

    asyncio.run(main())


def test_what_a_write_under_way_would_remember_of_a_session_forgotten_meanwhile_is_dropped() -> (
    None
):
    """The store's memory, as any write path (either API, either backend) uses it."""
    memory = store_module._Memory()
    memory.remember("s", 1, b"d" * 16, [{"role": "user"}], 0, history=1)
    since = memory.stamp()  # a flush of "s" begins
    memory.forget("s")  # deleted (or rewritten) meanwhile, by another task of the store
    memory.remember("s", 3, b"e" * 16, [{"role": "user"}] * 2, 1, history=1, since=since)
    assert "s" not in memory.hints
    other = memory.stamp()  # a write begun after the forget is remembered
    memory.remember("s", 2, b"f" * 16, [{"role": "user"}] * 2, 0, history=1, since=other)
    assert memory.hints["s"].cursor == 2
    # Past the bound on what it records of forgets, every earlier stamp is refused.
    for n in range(store_module._HINTS_MAX + 1):
        memory.forget(f"gone{n}")
    memory.remember("t", 1, None, None, history=1, since=other)
    assert "t" not in memory.hints
    memory.remember("t", 1, None, None, history=1, since=memory.stamp())
    assert memory.hints["t"].cursor == 1


def test_the_memory_keeps_no_copies_of_another_history_of_a_session() -> None:
    """Copies taken on one history_id are not joined to what a write on another stored."""
    memory = store_module._Memory()
    memory.remember("s", 2, b"d" * 16, [{"role": "user"}] * 2, 0, history=1)
    assert memory.hints["s"].copies == [{"role": "user"}] * 2
    # A write above them on the same history extends them ...
    memory.remember("s", 3, b"e" * 16, [{"role": "tool"}], 2, history=1)
    assert memory.hints["s"].copies == [{"role": "user"}] * 2 + [{"role": "tool"}]
    # ... one on another history (the session made anew, rewritten) starts none from them.
    memory.remember("s", 4, b"f" * 16, [{"role": "tool"}], 3, history=2)
    hint = memory.hints["s"]
    assert (hint.cursor, hint.history, hint.copies) == (4, 2, None)
    assert memory.remembered == 0


@pytest.mark.sqlite
def test_a_flush_waiting_for_the_write_lock_sees_a_delete_made_meanwhile(tmp_path: Path) -> None:
    """Another thread of the store deletes the session, makes it anew and flushes another
    history of the same length and last message while a flush on the remembered cursor
    waits for SQLite's write lock: that flush refuses its list, it writes nothing."""
    store = SessionStore(f"sqlite:///{tmp_path / 'agents.db'}")
    store.upgrade()
    head = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "same"}]
    old = [*head, {"role": "user", "content": "old a"}, {"role": "assistant", "content": "old b"}]
    new = [{"role": "user", "content": "another start"}, head[1]]  # same cursor, same digest
    store.create_session("s", source="cli")
    store.flush("s", head)  # remembered: cursor 2
    remade: list[bool] = []

    def meanwhile(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement == "BEGIN IMMEDIATE" and not remade:  # the flush's, before it has the lock
            remade.append(True)
            store.delete_session("s")
            store.create_session("s", source="cli")
            store.flush("s", new)

    event.listen(store.engine, "before_cursor_execute", meanwhile)
    with pytest.raises(HistoryDivergedError):
        store.flush("s", old)
    event.remove(store.engine, "before_cursor_execute", meanwhile)
    assert remade == [True]
    assert store.get_messages("s") == new
    store.close()


@pytest.mark.sqlite
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_a_close_cancelled_as_it_puts_the_application_s_settings_back(
    tmp_path: Path, k: int
) -> None:
    """The application's engine sets busy_timeout=0, synchronous=OFF on its connections.

    Cancelled at any point while the store gives its kept connection back,
    the store's work afterwards still runs with its own settings.
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", pool_size=2)

    @event.listens_for(engine.sync_engine, "connect")
    def application_settings(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=0")
        cursor.execute("PRAGMA synchronous=OFF")
        cursor.close()

    async def pragmas(conn: Any) -> list[Any]:
        return [
            (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
            for name in ("busy_timeout", "synchronous")
        ]

    async def main() -> None:
        store = AsyncSessionStore(engine)
        await store.upgrade()
        await store.create_session("s", source="test")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.ensure_future(_Stepped(store.close(), cancel_at(k)))
        for end in (1, 2):
            await store.flush("s", conversation(end))
            async with engine.connect() as conn:  # another of the pool's, as the application has it
                assert await pragmas(conn) == [0, 0]
            assert await pragmas(store._parked[0]) == [5000, 2]  # the one it keeps, idle
        await store.close()
        await engine.dispose()

    asyncio.run(main())


def _refused_as_made_anew_at(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch, target: Any, name: str
) -> None:
    """The store flushed a history; ``target.name``, at its first call, returns, then
    another thread of the store deletes the session, makes it anew and flushes another
    history of the same length and last message: the flush under way refuses its list
    and writes nothing."""
    old = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"}]
    old.append({"role": "user", "content": "ok"})
    new = [old[0], {"role": "assistant", "content": "two"}, old[2]]
    store.create_session("s", source="test")
    store.flush("s", old)
    real = getattr(target, name)
    done: list[bool] = []

    def then_made_anew(*args: Any) -> Any:
        found = real(*args)
        if not done:
            done.append(True)
            store.delete_session("s")
            store.create_session("s", source="test")
            store.flush("s", new)
        return found

    monkeypatch.setattr(target, name, then_made_anew)
    with pytest.raises(HistoryDivergedError):
        store.flush("s", [*old, {"role": "assistant", "content": "next"}])
    assert done
    assert store.get_messages("s") == new
    store.close()


def test_a_session_made_anew_as_a_flush_reads_its_hint_is_checked_in_the_database(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made anew just after this flush read what the store knew of it: the cursor and
    digest match, the copies are of the old history."""
    store = SessionStore(db_url)
    _refused_as_made_anew_at(store, monkeypatch, store, "_hint")


@pytest.mark.postgresql
def test_a_session_made_anew_while_a_flush_s_one_statement_is_on_its_way_is_not_written(
    empty_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made anew after the flush on the remembered cursor checked the store's own
    deletes, before its one statement reaches the server: the statement's
    compare-and-swap finds another history_id and writes nothing."""
    SessionStore(empty_pg).upgrade()
    store = SessionStore(empty_pg)
    _refused_as_made_anew_at(store, monkeypatch, store_module._dialects, "can_autocommit")


def test_a_session_another_process_made_anew_is_not_taken_for_the_one_remembered(
    db_url: str,
) -> None:
    """Made anew elsewhere with as many messages and the same last one, under the same id,
    the session has another history_id: a store's remembered cursor and copies of the
    old one refuse a list continuing it (its digests decide), on every write path."""
    store = SessionStore(db_url)
    old = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"}]
    old.append({"role": "user", "content": "ok"})
    new = [old[0], {"role": "assistant", "content": "two"}, old[2]]
    store.create_session("s", source="test")
    store.flush("s", old)
    other = fresh_store(store)
    assert other.delete_session("s")
    other.create_session("s", source="test")
    other.flush("s", new)
    with pytest.raises(HistoryDivergedError) as err:
        store.flush("s", [*old, {"role": "assistant", "content": "next"}])
    assert err.value.index == 1
    # A long list (written in batches, on the remembered cursor) too.
    with pytest.raises(HistoryDivergedError):
        store.flush("s", [*old, *conversation(400, "bulk")])
    assert store.get_messages("s") == new
    # What continues the stored history is written on it, and remembered on its history_id.
    assert store.flush("s", [*new, {"role": "assistant", "content": "next"}]).written == 1
    assert store._memory.hints["s"].history == other._memory.hints["s"].history != 0
    store.close()
    other.close()


def test_stores_made_and_dropped_on_an_engine_share_one_pool_listener(db_url: str) -> None:
    """A listener added or removed while another thread checks out fails that checkout."""
    import gc

    from hermes_orm import create_store_engine

    engine = create_store_engine(db_url)
    before = len(engine.pool.dispatch.checkout)
    stores = [SessionStore(engine) for _ in range(20)]
    for store in stores:
        store.get_session("x")
    assert len(engine.pool.dispatch.checkout) == before + 1
    del stores, store
    gc.collect()  # nothing taken off either
    assert len(engine.pool.dispatch.checkout) == before + 1
    engine.dispose()


def test_a_ctrl_c_after_a_statement_of_a_write_leaves_no_sqlite_lock_held(tmp_path: Path) -> None:
    """SQLAlchemy closes the connection of a statement a KeyboardInterrupt cut short;
    sqlite3 keeps it open, its write transaction and lock too, while the exception's
    traceback holds its cursor: every other writer, the agent's save on its way out
    among them, was refused (DatabaseBusyError) until the garbage collector ran."""
    import gc
    import sys

    path = tmp_path / "agent.db"
    store = SessionStore(f"sqlite:///{path}")
    store.upgrade()
    store.create_session("s", source="cli")
    store.flush("s", conversation(1))
    seen = 0

    def interrupt(frame: Any, event: str, _arg: Any) -> None:
        nonlocal seen
        if event == "call" and frame.f_code.co_name == "post_exec":  # a statement ran
            seen += 1
            sys.settrace(None)
            raise KeyboardInterrupt

    collecting = gc.isenabled()
    gc.disable()  # (the collector's next run not yet due)
    try:
        sys.settrace(interrupt)
        with contextlib.suppress(KeyboardInterrupt):  # after append's BEGIN IMMEDIATE
            store.append("s", {"role": "assistant", "content": "hello"})
        sys.settrace(None)
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # no one holds the write lock
        other.execute("ROLLBACK")
        other.close()
    finally:
        sys.settrace(None)
        if collecting:
            gc.enable()
    assert seen == 1
    store.append("s", {"role": "user", "content": "again"})
    session = store.get_session("s")
    assert session["flushed_idx"] == session["message_count"] == len(store.get_messages("s"))
    store.close()


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_read_cut_short_after_its_first_row_leaves_no_sqlite_lock_held(
    tmp_path: Path, api: str
) -> None:
    """An application's SQLite database, not in WAL mode. A read a Ctrl-C (or a task's
    cancellation) cut short after its first row left its statement open in the
    connection SQLAlchemy closed: that connection kept its read lock, and every other
    writer's commit was refused (database is locked) until the garbage collector ran."""
    import gc
    import sys

    path = tmp_path / "app.db"
    store: Any
    if api == "sync":
        store = SessionStore(create_engine(f"sqlite:///{path}"))
    else:
        app = create_async_engine(f"sqlite+aiosqlite:///{path}")
        store = BlockingStore(AsyncSessionStore(app), create_engine(f"sqlite:///{path}"))
    store.upgrade()
    store.create_session("s", source="cli")
    store.flush("s", conversation(3))
    cut: list[str] = []

    def interrupt(frame: Any, event: str, _arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "post_exec":  # a statement ran
            sys.settrace(None)
            cut.append("read")
            raise KeyboardInterrupt

    def cancel(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not cut and statement.startswith("SELECT"):  # cancelled as the driver runs it
            cut.append(statement)
            task = asyncio.current_task()
            assert task is not None
            task.cancel()

    collecting = gc.isenabled()
    gc.disable()  # (the collector's next run not yet due)
    try:
        if api == "sync":
            sys.settrace(interrupt)
            with contextlib.suppress(KeyboardInterrupt):
                store.list_sessions()
            sys.settrace(None)
        else:
            with (
                listening(store.async_store.engine.sync_engine, "before_cursor_execute", cancel),
                contextlib.suppress(asyncio.CancelledError),
            ):
                store.list_sessions()
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE hermes_sessions SET title = 'kept' WHERE id = 's'")
        other.execute("COMMIT")  # no one holds a lock
        other.close()
    finally:
        sys.settrace(None)
        if collecting:
            gc.enable()
    assert len(cut) == 1
    assert store.get_session("s")["title"] == "kept"
    store.close()


@pytest.mark.parametrize("call", ["flush", "append"])
def test_a_write_cancelled_at_its_commit_again_and_again_is_done_when_the_call_ends(
    tmp_path: Path, call: str
) -> None:
    """aiosqlite: an anyio scope cancelled as the COMMIT goes to the driver's thread cancels
    the cleanup's rollback too, and SQLAlchemy drops the connection; its thread still runs
    the COMMIT. The call ends after it has: what is stored then stays so."""
    import anyio

    path = tmp_path / "commit.db"
    history = conversation(3)

    def stored() -> int:
        with sqlite3.connect(path) as conn:
            return int(conn.execute("SELECT count(*) FROM hermes_messages").fetchone()[0])

    async def main() -> tuple[int, int]:
        store = AsyncSessionStore(f"sqlite:///{path}")
        await store.upgrade()
        await store.create_session("s", source="cli")
        await store.flush("s", history[:2])
        store.forget_cursor("s")  # as in a new process: the cursor read under the lock
        scopes: list[anyio.CancelScope] = []

        @event.listens_for(store.engine.sync_engine, "commit")
        def cancel_as_it_commits(conn: Any) -> None:
            if scopes:
                scopes.pop().cancel()
                # The driver's thread busy a while: the COMMIT waits in its queue.
                # (A future nobody awaits: aiosqlite before 0.22 resolves one per item.)
                driver = _sa.aiosqlite_connection(conn)
                busy = asyncio.get_event_loop().create_future()
                driver._tx.put_nowait((busy, functools.partial(time.sleep, 0.3)))

        with anyio.CancelScope() as scope:
            scopes.append(scope)
            if call == "flush":
                await store.flush("s", history)
            else:
                await store.append("s", history[2])
        assert scope.cancelled_caught
        when_it_ended = stored()
        await anyio.sleep(0.5)
        later = stored()
        await store.close()
        return when_it_ended, later

    when_it_ended, later = anyio.run(main)
    assert when_it_ended == later


#: A trigger holding each message's INSERT until ``gate`` opens, deaf to the server's
#: cancel: a statement past the point where a cancel still stops it.
_HELD_UNTIL_THE_GATE_OPENS = """
CREATE TABLE gate (open boolean NOT NULL);
INSERT INTO gate VALUES (false);
CREATE FUNCTION held() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    LOOP
        BEGIN
            EXIT WHEN (SELECT open FROM gate);
            PERFORM pg_sleep(0.01);
        EXCEPTION WHEN query_canceled THEN NULL;
        END;
    END LOOP;
    RETURN NEW;
END $$;
CREATE TRIGGER held BEFORE INSERT ON hermes_messages FOR EACH ROW EXECUTE FUNCTION held();
"""


@pytest.mark.postgresql
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_a_flush_cancelled_again_and_again_on_postgresql_is_done_when_the_call_ends(
    empty_pg: str, driver: str
) -> None:
    """The driver gives up on a statement the server still runs (its one statement, which
    commits as it ends): psycopg cancelled again as it cancels drops the connection,
    asyncpg leaves the statement's end to its next call. The call ends once the server's
    process of that connection has: what is stored then stays so."""
    from sqlalchemy.pool import NullPool

    from hermes_orm import create_store_engine

    SessionStore(empty_pg).upgrade()
    check = create_store_engine(empty_pg, poolclass=NullPool)
    history = conversation(3)

    def stored(sid: str) -> int:
        with check.connect() as conn:
            count = "SELECT count(*) FROM hermes_messages WHERE session_id = %s"
            return int(conn.exec_driver_sql(count, (sid,)).scalar_one())

    def gate(open_: bool) -> None:
        with check.begin() as conn:
            conn.exec_driver_sql("UPDATE gate SET open = %s", (open_,))

    async def main() -> list[tuple[int, int]]:
        url = make_url(empty_pg)
        if driver == "asyncpg":
            url = url.set(drivername="postgresql+asyncpg")
        store = AsyncSessionStore(url)
        with check.begin() as conn:
            conn.exec_driver_sql(_HELD_UNTIL_THE_GATE_OPENS.replace("false", "true"))
        seen = []
        # Where the cancellation lands in the driver's own cancelling varies: a few rounds.
        for sid in ("s1", "s2", "s3"):
            await store.create_session(sid, source="cli")
            await store.flush(sid, history[:1])  # the cursor remembered: one statement next
            gate(False)
            opener = threading.Timer(1.0, gate, (True,))
            opener.start()
            try:
                task = asyncio.ensure_future(store.flush(sid, history))
                await asyncio.sleep(0.3)
                while not task.done():  # as an anyio scope does: again at every await
                    task.cancel()
                    await asyncio.sleep(0)
                assert task.cancelled()
            finally:
                opener.join()
            when_it_ended = stored(sid)
            await asyncio.sleep(0.3)
            seen.append((when_it_ended, stored(sid)))
        await store.close()
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        check.dispose()
    assert seen == [(len(history), len(history))] * 3


def test_a_cancelled_close_ends_its_work_and_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """close() cancelled at any point ends what it began: the kept connection goes back
    to the application's pool (not dropped), an engine the store made is disposed of
    whole (interrupted, the pool logs an error and drops the connection)."""
    from hermes_orm import create_async_store_engine

    url = f"sqlite:///{tmp_path / 'close.db'}"
    SessionStore(url).upgrade()

    async def cancelled_closes(make: Callable[[], AsyncSessionStore]) -> int:
        cancelled = 0
        for steps in range(1, 12):
            store = make()
            await store.ensure_session("s", source="cli")  # (its connection kept after)
            closing = asyncio.ensure_future(store.close())
            for _ in range(steps):
                await asyncio.sleep(0)
            closing.cancel()
            try:
                await closing
            except asyncio.CancelledError:
                cancelled += 1
            await store.close()
        return cancelled

    async def main() -> tuple[int, int, int]:
        owned = await cancelled_closes(lambda: AsyncSessionStore(url))
        engine = create_async_store_engine(url)
        connects = []
        event.listen(engine.sync_engine, "connect", lambda *_: connects.append(1))
        shared = await cancelled_closes(lambda: AsyncSessionStore(engine))
        await engine.dispose()
        return owned, shared, len(connects)

    with caplog.at_level(logging.ERROR, logger="sqlalchemy.pool"):
        owned, shared, connects = asyncio.run(main())
    assert owned > 0
    assert shared > 0
    assert connects == 1  # the application's connection, given back by every close
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_write_cancelled_as_its_connection_goes_back_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With a pool of one, the store gives its connection back after each write: a task
    cancelled then (its write committed) lets the pool's reset finish, which SQLAlchemy
    would otherwise log as an error, the connection thrown away."""
    from hermes_orm import create_async_store_engine

    path = tmp_path / "reset.db"
    SessionStore(f"sqlite:///{path}").upgrade()

    async def main() -> int:
        engine = create_async_store_engine(f"sqlite:///{path}", pool_size=1, max_overflow=0)
        store = AsyncSessionStore(engine)
        cancelled = 0
        for k in range(1, 16):
            sid = f"s{k}"
            await store.create_session(sid, source="cli")
            try:
                await asyncio.ensure_future(
                    _Stepped(store.flush(sid, conversation(1)), cancel_at(k))
                )
            except asyncio.CancelledError:
                cancelled += 1
            assert await store.get_messages(sid) in ([], conversation(1))
            assert engine.sync_engine.pool.checkedout() == 0
        await store.close()
        await engine.dispose()
        return cancelled

    with caplog.at_level(logging.ERROR, logger="sqlalchemy.pool"):
        assert asyncio.run(main()) > 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
