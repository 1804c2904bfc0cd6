"""The ORM unit of work: Message objects added in the app's own Session get idx and cursor."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Connection,
    Engine,
    String,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InvalidRequestError
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.pool import NullPool

from hermes_orm import (
    DatabaseBusyError,
    DatabaseError,
    InvalidArgumentError,
    InvalidMessageError,
    InvalidSessionError,
    Message,
    RetryPolicy,
    Session,
    SessionNotFoundError,
    SessionStore,
    install_position_rule,
    remove_position_rule,
    upgrade,
)
from tests.conftest import count_rows


@pytest.fixture(autouse=True)
def position_rule() -> Iterator[None]:
    """ORM sessions get the rule when the application asks: these tests ask for all of them."""
    install_position_rule()
    yield
    remove_position_rule()


def test_without_the_rule_a_message_is_refused_before_anything_is_written(engine: Engine) -> None:
    remove_position_rule()
    with OrmSession(engine) as orm:
        orm.add(Session(id="plain", source="app", started_at=1.0))
        orm.commit()
        orm.add(Message(session_id="plain", role="user", content="hello"))
        with pytest.raises(InvalidMessageError, match="install_position_rule"):
            orm.commit()
    assert SessionStore(engine).get_messages("plain") == []


def test_the_rule_can_be_put_on_one_sessionmaker(engine: Engine) -> None:
    remove_position_rule()
    ours = sessionmaker(engine)
    install_position_rule(ours)
    with ours() as orm:
        orm.add(Session(id="made", source="app", started_at=1.0))
        orm.commit()
        orm.add(Message(session_id="made", role="user", content="hello"))
        orm.commit()
    with OrmSession(engine) as other:
        other.add(Message(session_id="made", role="user", content="again"))
        with pytest.raises(InvalidMessageError):
            other.commit()
    remove_position_rule(ours)
    assert SessionStore(engine).get_messages("made") == [{"role": "user", "content": "hello"}]


def test_adding_messages_assigns_idx_and_advances_cursor(engine: Engine) -> None:
    store = SessionStore(engine)
    with OrmSession(engine) as orm:
        chat = Session(id="orm", source="app", started_at=1.0)
        orm.add(chat)
        chat.messages.add(Message(role="user", content="hello"))
        # from_dict keeps the dict's exact shape, "content": None included
        chat.messages.add(
            Message.from_dict(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                }
            )
        )
        orm.commit()
        assert chat.flushed_idx == 2
        assert chat.history_id != 0  # the model draws one: a history of its own

    with OrmSession(engine) as orm:
        chat = orm.get_one(Session, "orm")
        chat.messages.add(Message.from_dict({"role": "tool", "content": "ok", "tool_call_id": "c"}))
        orm.commit()

    assert store.get_messages("orm") == [
        {"role": "user", "content": "hello"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "ok", "tool_call_id": "c"},
    ]
    session = store.get_session("orm")
    assert session is not None
    assert (session["flushed_idx"], session["message_count"], session["tool_call_count"]) == (
        3,
        3,
        1,
    )
    # the store continues where the ORM left off, and vice versa
    stored = store.get_messages("orm")
    assert store.flush("orm", [*stored, {"role": "user", "content": "next"}]).written == 1


def test_messages_by_session_id_without_loading_the_session(engine: Engine) -> None:
    store = SessionStore(engine)
    store.create_session("s", source="app")
    store.flush("s", [{"role": "user", "content": "from the store"}])
    with OrmSession(engine) as orm:
        orm.add_all([Message(session_id="s", role="assistant", content=f"a{i}") for i in range(3)])
        orm.commit()
    assert [m["content"] for m in store.get_messages("s")] == ["from the store", "a0", "a1", "a2"]
    session = store.get_session("s")
    assert session is not None
    assert session["flushed_idx"] == 4
    # the digest at the cursor is the last ORM message's: a flush continues cleanly
    assert store.flush("s", store.get_messages("s")).written == 0


def test_a_new_session_and_messages_naming_it_by_id_are_one_commit(engine: Engine) -> None:
    """Messages naming a Session added in the same ORM session by its id go in after it."""
    store = SessionStore(engine)
    with OrmSession(engine) as orm:
        orm.add(Message(session_id="n1", role="user", content="first"))  # before its session
        orm.add(Session(id="n1", source="app", started_at=1.0))
        orm.add(Message(session_id="n1", role="assistant", content="second"))
        orm.commit()
    assert [m["content"] for m in store.get_messages("n1")] == ["first", "second"]
    session = store.get_session("n1")
    assert session is not None
    assert (session["flushed_idx"], session["message_count"]) == (2, 2)
    assert store.flush("n1", store.get_messages("n1")).written == 0  # the digest at the cursor


def test_a_session_made_through_the_orm_without_a_start_time_starts_now(
    engine: Engine,
) -> None:
    before = time.time()
    with OrmSession(engine) as orm:
        orm.add(Session(id="t1", source="app"))
        orm.commit()
    session = SessionStore(engine).get_session("t1")
    assert session is not None
    assert before <= session["started_at"] <= time.time()


def test_invalid_orm_message_is_refused(engine: Engine) -> None:
    store = SessionStore(engine)
    store.create_session("s", source="app")
    with OrmSession(engine) as orm:
        orm.add(Message(session_id="s", role="wizard", content="x"))
        with pytest.raises(InvalidMessageError):
            orm.commit()
    with OrmSession(engine) as orm:
        orm.add(Message(session_id="missing", role="user", content="x"))
        with pytest.raises(SessionNotFoundError):
            orm.commit()
    with OrmSession(engine) as orm:
        orm.add(Message(session_id="s", role="user", content="x", idx=7))
        with pytest.raises(InvalidMessageError, match="idx"):
            orm.commit()
    assert store.get_messages("s") == []


@pytest.mark.parametrize("bad", ["", "a\x00b", "x" * 256, "lone \ud800", 5, b"bytes"])
def test_a_session_id_a_store_refuses_is_refused_on_the_orm_path_too(
    engine: Engine, bad: Any
) -> None:
    """Written, it could be reached by no call of a store (nor the command line); the
    driver's own errors (NUL, a lone surrogate, a number) would not say what is wrong."""
    SessionStore(engine).create_session("s", source="app")

    def added(orm: OrmSession, obj: Any) -> None:
        orm.add(obj)
        orm.commit()

    attempts = (
        lambda orm: added(orm, Session(id=bad, source="app", started_at=1.0)),
        lambda orm: added(orm, Message(session_id=bad, role="user", content="x")),
        lambda orm: orm.execute(insert(Message), [{"session_id": bad, "role": "user"}]),
        lambda orm: orm.execute(insert(Session), [{"id": bad, "source": "app"}]),
        lambda orm: orm.execute(insert(Session).values(id=bad, source="app")),
    )
    for attempt in attempts:
        with OrmSession(engine) as orm:
            with pytest.raises((InvalidSessionError, InvalidMessageError)) as refused:
                attempt(orm)
            if isinstance(bad, str):  # (a non-str id of a row: InvalidMessageError, as before)
                assert isinstance(refused.value, InvalidSessionError)
    assert count_rows(engine, "hermes_sessions") == 1
    assert count_rows(engine, "hermes_messages") == 0


@pytest.mark.parametrize(
    "columns",
    [
        {"content": "a", "extra": [1, 2]},
        {"content": "a", "key_order": ["role", "content", "not there"]},
        {"content": "a", "extra": {"role": "assistant"}},
        {"content": "a", "extra": {"content": "another"}},
        {"content": "a", "extra": {"reasoning": "b"}, "reasoning": "c"},
        {"content": "a", "content_parts": [{"type": "text", "text": "b"}]},
        {"content": "a", "idx": 2**31},
    ],
    ids=["extra list", "order", "role twice", "content twice", "field twice", "both", "idx"],
)
def test_a_message_whose_columns_disagree_is_refused(engine: Engine, columns: Any) -> None:
    """Columns set by hand that make no one message (or another than they say) are
    refused before anything is written, whichever way the message is written."""
    SessionStore(engine).create_session("s", source="app")

    def added(orm: OrmSession) -> None:
        orm.add(Message(session_id="s", role="user", **columns))
        orm.commit()

    for write in (
        added,
        lambda orm: orm.execute(insert(Message), [{"session_id": "s", "role": "user", **columns}]),
    ):
        with OrmSession(engine) as orm, pytest.raises(InvalidMessageError):
            write(orm)
    assert count_rows(engine, "hermes_messages") == 0
    with OrmSession(engine) as orm:  # built from a dict, the same keys make one message
        for given in (
            {"role": "user", "content": "a", "reasoning": None},
            {"role": "user", "content": "b", "timestamp": 1_733_390_000_123_456_789},  # ns
        ):
            message = Message.from_dict(given)
            message.session_id = "s"
            orm.add(message)
        orm.commit()
    assert SessionStore(engine).get_messages("s") == [
        {"role": "user", "content": "a", "reasoning": None},
        {"role": "user", "content": "b", "timestamp": 1_733_390_000_123_456_789},
    ]


def test_concurrent_orm_writers_never_duplicate(engine: Engine) -> None:
    """Racing ORM sessions either commit at the cursor or fail; none writes a position twice."""
    store = SessionStore(engine)
    store.create_session("s", source="app")
    committed: list[int] = []
    failures: list[BaseException] = []

    def writer(n: int) -> None:
        for i in range(5):
            for _attempt in range(50):
                try:
                    with OrmSession(engine) as orm:
                        orm.add(Message(session_id="s", role="user", content=f"w{n}-{i}"))
                        orm.commit()
                    committed.append(n)
                    break
                except DBAPIError:
                    continue  # busy/locked: the app's retry
            else:  # pragma: no cover - reported below
                failures.append(RuntimeError("gave up"))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    with engine.connect() as conn:
        idxs = conn.execute(select(Message.idx).where(Message.session_id == "s")).scalars().all()
    assert sorted(idxs) == list(range(len(committed))) == list(range(15))


def _orm_message_dict(obj: Any) -> dict[str, Any]:
    return dict(obj.to_dict())


def test_to_dict_from_dict_round_trip() -> None:
    msg = {"role": "user", "content": [{"type": "text", "text": "hi"}], "custom": [1]}
    assert _orm_message_dict(Message.from_dict(msg)) == msg


def test_messages_naming_their_session_both_ways_share_one_cursor(engine: Engine) -> None:
    store = SessionStore(engine)
    store.create_session("s", source="app")
    with OrmSession(engine) as orm:
        chat = orm.get_one(Session, "s")
        chat.messages.add(Message(role="user", content="by object"))
        orm.add(Message(session_id="s", role="assistant", content="by id"))
        chat.messages.add(Message(role="user", content="by object again"))
        orm.commit()
    assert [m["content"] for m in store.get_messages("s")] == [
        "by object",
        "by id",
        "by object again",
    ]


def test_a_session_loaded_before_another_writer_committed_continues_after_it(
    engine: Engine,
) -> None:
    store = SessionStore(engine)
    store.create_session("s", source="app")
    with OrmSession(engine) as first:
        chat = first.get_one(Session, "s")  # loaded with flushed_idx 0
        with OrmSession(engine) as second:
            second.add(Message(session_id="s", role="user", content="second writer"))
            second.commit()
        chat.messages.add(Message(role="assistant", content="first writer"))
        first.commit()
        assert chat.flushed_idx == 2
    assert [m["content"] for m in store.get_messages("s")] == ["second writer", "first writer"]
    session = store.get_session("s")
    assert session is not None
    assert session["flushed_idx"] == session["message_count"] == 2


def test_the_rule_installed_twice_over_places_each_message_once(engine: Engine) -> None:
    """On the Session class and on a sessionmaker: both fire for that maker's sessions."""
    ours = sessionmaker(engine)
    install_position_rule(ours)
    try:
        with ours() as orm:
            orm.add(Session(id="twice", source="app", started_at=1.0))
            orm.commit()
            orm.add(Message(session_id="twice", role="user", content="hello"))
            orm.add(Message(session_id="twice", role="assistant", content="hi"))
            orm.commit()
            orm.execute(
                insert(Message), [{"session_id": "twice", "role": "user", "content": "bulk"}]
            )
            orm.commit()
    finally:
        remove_position_rule(ours)
    store = SessionStore(engine)
    assert [m["content"] for m in store.get_messages("twice")] == ["hello", "hi", "bulk"]
    session = store.get_session("twice")
    assert session is not None
    assert session["flushed_idx"] == 3


# -- ORM statements on hermes_messages -------------------------------------------------------

_CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def _state(engine: Engine) -> tuple[list[tuple[str, int, str | None]], list[tuple[Any, ...]]]:
    """Every message (session, idx, content) and every session's counters, to compare."""
    with engine.connect() as conn:
        messages = conn.execute(
            select(Message.session_id, Message.idx, Message.content).order_by(
                Message.session_id, Message.idx
            )
        ).all()
        sessions = conn.execute(
            select(
                Session.id,
                Session.flushed_idx,
                Session.message_count,
                Session.tool_call_count,
                Session.flushed_digest,
            ).order_by(Session.id)
        ).all()
    return [tuple(m) for m in messages], [tuple(s) for s in sessions]


def _two_sessions(engine: Engine) -> SessionStore:
    store = SessionStore(engine)
    store.create_session("a", source="app")
    store.create_session("b", source="app")
    store.flush("a", [{"role": "user", "content": "a0"}])
    return store


def test_bulk_insert_takes_positions_from_each_sessions_cursor(engine: Engine) -> None:
    store = _two_sessions(engine)
    with OrmSession(engine) as orm:
        chat = orm.get_one(Session, "a")  # loaded: kept in step
        placed = orm.execute(
            insert(Message).returning(Message.session_id, Message.idx),
            [
                {"session_id": "a", "role": "assistant", "tool_calls": [_CALL]},
                {"session_id": "b", "role": "user", "content": "b0"},
                {"session_id": "a", "role": "tool", "content": "ok", "tool_call_id": "c"},
                {"session_id": "b", "role": "assistant", "content": "b1"},
            ],
        ).all()
        assert [tuple(row) for row in placed] == [("a", 1), ("b", 0), ("a", 2), ("b", 1)]
        assert (chat.flushed_idx, chat.message_count, chat.tool_call_count) == (3, 3, 1)
        orm.execute(insert(Message), {"session_id": "b", "role": "user", "content": "b2"})
        orm.commit()

    a = store.get_messages("a")
    assert a == [
        {"role": "user", "content": "a0"},
        {"role": "assistant", "tool_calls": [_CALL]},
        {"role": "tool", "content": "ok", "tool_call_id": "c"},
    ]
    assert [m["content"] for m in store.get_messages("b")] == ["b0", "b1", "b2"]
    for session_id, counts in (("a", (3, 3, 1)), ("b", (3, 3, 0))):
        session = store.get_session(session_id)
        assert session is not None
        assert (
            session["flushed_idx"],
            session["message_count"],
            session["tool_call_count"],
        ) == counts
    # The store that flushed "a" before continues after the ORM's rows: the full
    # list writes nothing twice, and what follows lands at the cursor.
    assert store.flush("a", a).written == 0
    assert store.flush("a", [*a, {"role": "user", "content": "a3"}]).written == 1
    assert store.flush("b", store.get_messages("b")).written == 0
    assert [idx for _, idx, _ in _state(engine)[0]] == [0, 1, 2, 3, 0, 1, 2]


def test_bulk_insert_follows_what_was_added_before(engine: Engine) -> None:
    store = _two_sessions(engine)
    with OrmSession(engine) as orm:
        orm.add(Message(session_id="a", role="assistant", content="added"))
        orm.execute(insert(Message), [{"session_id": "a", "role": "user", "content": "bulk"}])
        orm.commit()
    assert [m["content"] for m in store.get_messages("a")] == ["a0", "added", "bulk"]


def test_bulk_insert_takes_idx_set_by_hand_only_at_the_cursor(engine: Engine) -> None:
    store = _two_sessions(engine)
    with OrmSession(engine) as orm:
        orm.execute(
            insert(Message),
            [
                {"session_id": "a", "idx": 1, "role": "user", "content": "a1"},
                {"session_id": "a", "role": "user", "content": "a2"},
            ],
        )
        orm.commit()
    before = _state(engine)
    for rows in (
        [{"session_id": "a", "idx": 1, "role": "user", "content": "again"}],  # taken
        [{"session_id": "a", "idx": 9, "role": "user", "content": "hole"}],  # past the cursor
        [  # disagree with each other
            {"session_id": "a", "idx": 3, "role": "user", "content": "x"},
            {"session_id": "a", "idx": 3, "role": "user", "content": "y"},
        ],
        [  # right for "b", wrong for "a": nothing moves for either
            {"session_id": "b", "idx": 0, "role": "user", "content": "b0"},
            {"session_id": "a", "idx": 0, "role": "user", "content": "a0"},
        ],
    ):
        with OrmSession(engine) as orm:
            with pytest.raises(InvalidMessageError, match="idx"):
                orm.execute(insert(Message), rows)
            orm.commit()
        assert _state(engine) == before
    assert [m["content"] for m in store.get_messages("a")] == ["a0", "a1", "a2"]


def test_bulk_insert_refuses_rows_and_shapes_it_cannot_place(engine: Engine) -> None:
    _two_sessions(engine)
    before = _state(engine)
    dialect_insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    row = {"session_id": "a", "role": "user", "content": "x"}
    refused: list[tuple[Any, Any, type[Exception], str]] = [
        (insert(Message).values(**row), None, InvalidMessageError, "values()"),
        (insert(Message).values([row, row]), None, InvalidMessageError, "values()"),
        (insert(Message).values(idx=7), [row], InvalidMessageError, "values()"),
        (
            insert(Message).from_select(["session_id", "role"], select(literal("a"), literal("u"))),
            None,
            InvalidMessageError,
            "from_select",
        ),
        (dialect_insert(Message).on_conflict_do_nothing(), [row], InvalidMessageError, "ON CONF"),
        (insert(Message).prefix_with("OR IGNORE"), [row], InvalidMessageError, "prefix_with"),
        (
            select(Message).from_statement(insert(Message).returning(Message)),
            [row],
            InvalidMessageError,
            "not supported",
        ),
        (insert(Message), [], InvalidMessageError, "needs its rows"),
        (insert(Message), [{**row, "custom": 1}], InvalidMessageError, "custom"),
        (insert(Message), [{"role": "user", "content": "x"}], InvalidMessageError, "session"),
        (insert(Message), [row, {**row, "role": "wizard"}], InvalidMessageError, "role"),
        (insert(Message), [row, {**row, "session_id": "missing"}], SessionNotFoundError, "missing"),
        (insert(Message), [{**row, "session_id": "missing"}], SessionNotFoundError, "missing"),
        (insert(Message.__table__), [row, {**row, "idx": 5}], InvalidMessageError, "idx"),
    ]
    for statement, rows, error, match in refused:
        with OrmSession(engine) as orm:
            with pytest.raises(error, match=match):
                orm.execute(statement, rows)
            orm.commit()
        assert _state(engine) == before, statement


def test_a_failed_bulk_insert_leaves_no_cursor_moved(engine: Engine) -> None:
    """The INSERT fails after the cursors moved: the transaction is rolled back with it."""
    store = _two_sessions(engine)
    with engine.connect() as conn:
        taken = conn.execute(select(Message.id)).scalar_one()
    before = _state(engine)
    with OrmSession(engine) as orm:
        with pytest.raises(IntegrityError):
            orm.execute(
                insert(Message),
                [
                    {"session_id": "b", "role": "user", "content": "b0"},
                    {"session_id": "a", "role": "user", "content": "a1", "id": taken},
                ],
            )
        orm.commit()  # what a caller might do next: nothing of the insert is left
    assert _state(engine) == before
    assert store.flush("a", [*store.get_messages("a"), {"role": "user"}]).written == 1


def test_update_and_delete_statements_on_messages_are_refused(engine: Engine) -> None:
    _two_sessions(engine)
    before = _state(engine)
    with engine.connect() as conn:
        message_id = conn.execute(select(Message.id)).scalar_one()
    statements: list[tuple[Any, Any]] = [
        (update(Message).values(content="changed"), None),
        (update(Message).where(Message.session_id == "a").values(idx=Message.idx + 1), None),
        (update(Message), [{"id": message_id, "content": "bulk by primary key"}]),
        (delete(Message).where(Message.idx == 0), None),
        (delete(Message.__table__), None),  # Core, through the ORM session
    ]
    _each_refused(engine, statements, InvalidMessageError, "history")
    assert _state(engine) == before


def _each_refused(
    engine: Engine, statements: list[tuple[Any, Any]], error: type[Exception], match: str
) -> None:
    """Each statement, run in an ORM session of its own, raises ``error``; the commit after it
    finds nothing to write."""
    for statement, params in statements:
        with OrmSession(engine) as orm:
            with pytest.raises(error, match=match):
                orm.execute(statement, params)
            orm.commit()


@pytest.mark.parametrize("rule", [True, False], ids=["rule", "no-rule"])
def test_a_stored_message_is_never_deleted_moved_or_changed(engine: Engine, rule: bool) -> None:
    """With the rule or without it: mapper events of Message, not of the app's sessions."""
    store = _two_sessions(engine)
    store.flush("a", [{"role": "user", "content": "a0"}, {"role": "user", "content": "a1"}])
    if not rule:
        remove_position_rule()
    before = _state(engine)

    def first(orm: OrmSession) -> Message:
        return orm.scalars(select(Message).where(Message.session_id == "a", Message.idx == 0)).one()

    changes = [
        (lambda orm: orm.delete(first(orm)), "deleted"),
        (lambda orm: orm.get_one(Session, "a").messages.remove(first(orm)), "stored message"),
        (lambda orm: setattr(first(orm), "idx", 5), "idx"),
        (lambda orm: setattr(first(orm), "session_id", "b"), "session_id"),
        (lambda orm: setattr(first(orm), "session", orm.get_one(Session, "b")), "moved or taken"),
        # Its digest is of what it holds: an edit would read as a rewritten history.
        (lambda orm: setattr(first(orm), "content", "[redacted]"), "changed .content"),
        (lambda orm: setattr(first(orm), "active", False), "changed .active"),
        (lambda orm: setattr(first(orm), "digest", b"x" * 16), "changed .digest"),
    ]
    for change, match in changes:
        with OrmSession(engine) as orm:
            change(orm)
            with pytest.raises(InvalidMessageError, match=match):
                orm.commit()
        assert _state(engine) == before

    # A message goes with its whole session, loaded or not.
    with OrmSession(engine) as orm:
        chat, message = orm.get_one(Session, "a"), first(orm)
        orm.delete(message)
        orm.delete(chat)
        orm.commit()
    with OrmSession(engine) as orm:
        orm.scalars(select(Message).where(Message.session_id == "b")).all()
        orm.delete(orm.get_one(Session, "b"))
        orm.commit()
    assert count_rows(engine, "hermes_messages") == 0


@pytest.mark.parametrize("rule", [True, False], ids=["rule", "no-rule"])
def test_a_sessions_counters_move_only_with_its_messages(engine: Engine, rule: bool) -> None:
    """Counters set on a Session object, stored or new, are refused before anything is written."""
    store = _two_sessions(engine)
    if not rule:
        remove_position_rule()
    before = _state(engine)
    changes: list[tuple[str, Any]] = [
        ("flushed_idx", 0),
        ("flushed_idx", 5),
        ("message_count", 9),
        ("tool_call_count", 3),
        ("flushed_digest", b"x" * 16),
    ]
    for key, value in changes:
        with OrmSession(engine) as orm:
            setattr(orm.get_one(Session, "a"), key, value)
            with pytest.raises(InvalidSessionError, match=f"{key} cannot be changed"):
                orm.commit()
        assert _state(engine) == before
        with OrmSession(engine) as orm:
            orm.add(Session(id="new", source="app", started_at=1.0, **{key: value or 1}))
            with pytest.raises(InvalidSessionError, match=f"starts with no messages \\({key}"):
                orm.commit()
        assert _state(engine) == before

    # What a session with no messages holds, and every other column, may be set.
    with OrmSession(engine) as orm:
        orm.add(Session(id="new", source="app", started_at=1.0, flushed_idx=0, message_count=0))
        orm.get_one(Session, "a").title = "renamed"
        orm.commit()
    assert store.get_session("a")["title"] == "renamed"
    assert store.flush("new", [{"role": "user", "content": "n0"}]).written == 1


def test_a_new_session_with_a_cursor_is_refused_with_its_messages(engine: Engine) -> None:
    """A new Session claiming stored messages would leave positions 0..n-1 empty."""
    with OrmSession(engine) as orm:
        chat = Session(id="gap", source="app", started_at=1.0, flushed_idx=3)
        orm.add(chat)
        chat.messages.add(Message(role="user", content="hello"))
        with pytest.raises(InvalidSessionError, match="starts with no messages"):
            orm.commit()
    assert count_rows(engine, "hermes_sessions") == 0
    assert count_rows(engine, "hermes_messages") == 0


def test_statements_setting_a_sessions_counters_are_refused(engine: Engine) -> None:
    store = _two_sessions(engine)
    before = _state(engine)
    statements: list[tuple[Any, Any]] = [
        (update(Session).values(flushed_idx=0), None),
        (
            update(Session).where(Session.id == "a").values(message_count=Session.flushed_idx + 1),
            None,
        ),
        (update(Session.__table__).values({"flushed_digest": None}), None),  # Core, via the ORM
        (update(Session).ordered_values((Session.tool_call_count, 4)), None),
        (update(Session), [{"id": "a", "flushed_idx": 7}]),  # bulk by primary key
        (insert(Session).values(id="c", source="app", started_at=1.0, flushed_idx=2), None),
        (insert(Session), [{"id": "c", "source": "app", "started_at": 1.0, "message_count": 1}]),
    ]
    _each_refused(engine, statements, InvalidSessionError, "cannot be set")
    assert _state(engine) == before
    with OrmSession(engine) as orm:
        orm.execute(update(Session).where(Session.id == "a").values(title="t"))
        orm.execute(insert(Session), [{"id": "c", "source": "app", "started_at": 1.0}])
        orm.execute(insert(Session).values(id="d", source="app", started_at=1.0, flushed_idx=0))
        orm.commit()
    assert store.get_session("a")["title"] == "t"
    assert [store.get_session(s)["message_count"] for s in ("c", "d")] == [0, 0]


def _bulk_insert_is_refused(orm: OrmSession, *, idx: int) -> None:
    """``bulk_insert_mappings`` of a message placed by hand: refused, then rolled back."""
    row = {"session_id": "a", "role": "user", "content": "x", "digest": b"d", "idx": idx}
    with pytest.raises(InvalidMessageError, match="legacy bulk API"):
        orm.bulk_insert_mappings(Message, [row])
    orm.rollback()


def test_the_legacy_bulk_api_is_refused_before_a_message_is_written(engine: Engine) -> None:
    """bulk_save_objects/bulk_insert_mappings/bulk_update_mappings run no ORM event:
    the rule refuses their writes into hermes_messages at the connection."""
    _two_sessions(engine)
    before = _state(engine)
    placed_by_hand = Message(session_id="a", role="user", content="x", digest=b"d", idx=99)
    with OrmSession(engine) as orm:
        with pytest.raises(InvalidMessageError, match="legacy bulk API"):
            orm.bulk_save_objects([placed_by_hand])
        orm.rollback()
        _bulk_insert_is_refused(orm, idx=99)
        first_id = orm.scalars(select(Message.id).order_by(Message.id)).first()
        with pytest.raises(InvalidMessageError, match="legacy bulk API"):
            orm.bulk_update_mappings(Message, [{"id": first_id, "idx": 7}])
        orm.rollback()
        assert _state(engine) == before  # nothing of any of them was written
        # The session goes on working through the rule's own paths.
        orm.add(Message(session_id="a", role="user", content="placed"))
        orm.commit()
    after = _state(engine)
    assert after != before
    with OrmSession(engine) as orm:
        last = orm.scalars(
            select(Message).where(Message.session_id == "a").order_by(Message.idx.desc())
        ).first()
        assert last is not None
        assert last.content == "placed"


def test_a_core_insert_on_a_connection_the_rule_watches_is_refused_as_such(
    engine: Engine,
) -> None:
    """Once an ORM session with the rule began on the application's connection, a Core
    INSERT of a message there is refused (it places nothing), and the error says so,
    not only the legacy bulk API."""
    _two_sessions(engine)
    before = _state(engine)
    row = {"session_id": "a", "idx": 5, "role": "user", "content": "core", "digest": b"d"}
    with engine.connect() as conn:
        with OrmSession(bind=conn) as orm:
            orm.add(Message(session_id="b", role="user", content="placed"))
            orm.flush()
        conn.rollback()
        with pytest.raises(InvalidMessageError, match="or a Core statement"):
            conn.execute(insert(Message.__table__), [row])
        conn.rollback()
    assert _state(engine) == before


def test_the_legacy_bulk_api_moves_no_session_counter(engine: Engine) -> None:
    """Its writes into hermes_sessions run no ORM event either: the rule refuses a
    counter they set (or start above 0) at the connection; other columns stay open."""
    store = _two_sessions(engine)
    before = _state(engine)
    with OrmSession(engine) as orm:
        for bulk in (
            lambda: orm.bulk_update_mappings(Session, [{"id": "a", "flushed_idx": 7}]),
            lambda: orm.bulk_update_mappings(Session, [{"id": "b", "message_count": 0}]),
            lambda: orm.bulk_save_objects([Session(id="c", source="app", flushed_idx=4)]),
            lambda: orm.bulk_insert_mappings(
                Session, [{"id": "d", "source": "app", "started_at": 1.0, "tool_call_count": 2}]
            ),
        ):
            with pytest.raises(InvalidSessionError, match="cannot be set"):
                bulk()
            orm.rollback()
        assert _state(engine) == before
        orm.bulk_update_mappings(Session, [{"id": "a", "title": "kept"}])
        orm.bulk_insert_mappings(Session, [{"id": "e", "source": "app", "started_at": 1.0}])
        orm.commit()
    assert store.get_session("a")["title"] == "kept"  # type: ignore[index]
    assert store.get_session("e")["flushed_idx"] == 0  # type: ignore[index]


def test_an_append_on_a_cursor_set_by_hand_is_refused(engine: Engine) -> None:
    """A cursor above 0 with no digest (set around the store): nothing is written above it."""
    store = _two_sessions(engine)
    with engine.begin() as conn:
        conn.execute(update(Session).where(Session.id == "b").values(flushed_idx=4))
    with pytest.raises(DatabaseError, match="cursor at 4 but no digest"):
        store.append("b", {"role": "user", "content": "z"})
    assert count_rows(engine, "hermes_messages", session_id="b") == 0


def test_a_refused_flush_leaves_the_bulk_guard_on(engine: Engine) -> None:
    """The rule refusing a flush (before SQLAlchemy's own transaction) must not switch
    off its watch over the legacy bulk API for the rest of the session."""
    _two_sessions(engine)
    before = _state(engine)
    with OrmSession(engine) as orm:
        orm.add(Message(session_id="nobody", role="user", content="x"))
        with pytest.raises(SessionNotFoundError):
            orm.flush()
        orm.rollback()
        _bulk_insert_is_refused(orm, idx=7)
    assert _state(engine) == before


@pytest.mark.backends("sqlite")
def test_deleting_a_session_on_an_engine_without_foreign_keys_takes_what_hangs_on_it(
    tmp_path: Any,
) -> None:
    """An application's SQLite engine has foreign keys off: the ON DELETE rules still hold."""
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    upgrade(engine)
    store = SessionStore(engine)
    store.create_session("a", source="app")
    store.create_session("child", source="app", parent_session_id="a")
    store.flush("a", [{"role": "user", "content": "old words"}])
    store.close()
    with OrmSession(engine) as orm:
        assert orm.connection().exec_driver_sql("PRAGMA foreign_keys").scalar() == 0
        orm.delete(orm.get_one(Session, "a"))
        orm.commit()
    assert count_rows(engine, "hermes_messages") == 0
    store = SessionStore(engine)
    assert store.get_session("child")["parent_session_id"] is None  # type: ignore[index]
    store.create_session("a", source="app")  # the same id again: nothing of the old one
    assert store.get_messages("a") == []
    assert store.search("words").hits == []
    store.close()
    engine.dispose()


def test_deleting_a_session_takes_it_after_its_children_as_a_flush_into_both_does(
    pg_server_url: str,
) -> None:
    """An ORM flush into a session ``P`` and its child ``C`` locks ``C``, then ``P`` (the
    lock order). ``SessionStore.delete_session("P")`` takes ``C`` before ``P`` too: had
    it locked ``P`` as it began, each would hold a row the other waits for."""
    with _own_database(pg_server_url, "hermes_parent_last") as engine:
        store = SessionStore(engine)
        store.create_session("P", source="app")
        store.create_session("C", source="app", parent_session_id="P")
        before = _deadlocks(engine)
        failures: list[BaseException] = []
        flush = _flush_into(engine, "PC", failures)

        flusher = threading.Thread(target=flush)
        deleter = threading.current_thread()

        def flush_now(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if threading.current_thread() is not deleter or flusher.ident is not None:
                return  # (once)
            if "FOR UPDATE" not in statement and not statement.startswith("DELETE"):
                return  # (the store's own settings, before the delete's work)
            flusher.start()  # after the delete's first statement
            flusher.join(3)  # done, unless it waits for a row the delete holds

        event.listen(engine, "after_cursor_execute", flush_now)
        try:
            assert store.delete_session("P")
        finally:
            event.remove(engine, "after_cursor_execute", flush_now)
        flusher.join(30)
        store.close()
        assert _settled(engine, before, failures) == [("C", None, 1)]


@pytest.mark.parametrize("how", ["user", "hermes", "hermes many", "hermes empty"])
def test_deleting_a_parent_waits_for_a_writer_that_made_a_child_before_taking_children(
    pg_server_url: str, how: str
) -> None:
    """A transaction that made a child of ``P`` holds a key-share lock on ``P`` (its
    foreign key) and may then write into another child, ``C``. A user view and the
    Hermes adapter lock ``P`` first, so they wait for that transaction before they take
    ``C`` (``C`` comes first in the lock order: locking the children first would
    deadlock here). ``SessionStore.delete_session`` takes ``P`` last, as an ORM flush
    into ``P`` and ``C`` does: it deadlocks here, and retries."""
    with _own_database(pg_server_url, "hermes_made_child") as engine:
        store = SessionStore(engine)
        owned = store.for_user("u")
        owned.create_session("P", source="app")
        owned.end_session("P", "done")
        owned.create_session("C", source="app", parent_session_id="P")
        before = _deadlocks(engine)
        deleter = threading.Thread(target=_deleter(store, how))
        with OrmSession(engine) as orm:
            orm.add(Session(id="N", source="app", parent_session_id="P"))
            orm.flush()  # a key-share lock on P, to the commit
            deleter.start()
            _lock_waiters(engine, 1)  # the delete waits for P
            orm.add(Message(session_id="C", role="user", content="m"))
            orm.commit()
        deleter.join(30)
        store.close()
        assert _settled(engine, before, []) == [("C", None, 1), ("N", None, 0)]


# -- objects flushed once more after a flush that did not land ------------------------------


def _fail_to_commit(orm: OrmSession) -> None:
    """Commit what ``orm`` holds with a Session whose title is taken: refused, rolled back."""
    orm.add(Session(id="clash", source="app", started_at=2.0, title="taken"))
    with pytest.raises(IntegrityError):
        orm.commit()
    orm.rollback()


@pytest.mark.parametrize("how", ["flushed-then-rolled-back", "commit-failed"])
def test_a_new_session_flushed_again_after_a_rollback_starts_at_zero(
    engine: Engine, how: str
) -> None:
    """Counters the rule set in a flush that did not land are not stored without its messages:
    the session starts at 0 again, and the next flush writes from position 0."""
    store = SessionStore(engine)
    store.create_session("taken", source="app", title="taken")
    chat = Session(id="new", source="app", started_at=1.0)
    draft = Message.from_dict({"role": "user", "content": "draft"})
    with OrmSession(engine) as orm:
        orm.add(chat)
        chat.messages.add(draft)
        if how == "flushed-then-rolled-back":
            orm.flush()
            orm.rollback()
        else:
            _fail_to_commit(orm)
    assert chat.flushed_idx == 1  # what the rule set, left on the object
    with OrmSession(engine) as orm:
        if how == "commit-failed":
            chat.messages.remove(draft)  # still pending in the collection: the session goes alone
        orm.add(chat)
        assert list(orm.new) == [chat]
        orm.commit()
    stored = store.get_session("new")
    assert stored is not None
    assert (stored["flushed_idx"], stored["message_count"], stored["tool_call_count"]) == (0, 0, 0)
    assert stored["flushed_digest"] is None
    assert store.flush("new", [{"role": "user", "content": "hello"}]).cursor == 1
    assert store.get_messages("new") == [{"role": "user", "content": "hello"}]


def test_a_new_session_retried_with_its_messages_is_placed_from_zero(engine: Engine) -> None:
    store = SessionStore(engine)
    store.create_session("taken", source="app", title="taken")
    chat = Session(id="new", source="app", started_at=1.0)
    with OrmSession(engine) as orm:
        orm.add(chat)
        chat.messages.add(Message.from_dict({"role": "user", "content": "m0"}))
        chat.messages.add(Message.from_dict({"role": "assistant", "content": "m1"}))
        _fail_to_commit(orm)
    with OrmSession(engine) as orm:
        orm.add(chat)
        orm.commit()
    assert store.get_messages("new") == [
        {"role": "user", "content": "m0"},
        {"role": "assistant", "content": "m1"},
    ]
    assert store.get_session("new")["flushed_idx"] == 2  # type: ignore[index]
    assert _state(engine)[0] == [("new", 0, "m0"), ("new", 1, "m1")]


@pytest.mark.parametrize("rule", [True, False], ids=["rule", "no-rule"])
def test_counters_set_by_hand_after_a_rolled_back_flush_are_still_refused(
    engine: Engine, rule: bool
) -> None:
    chat = Session(id="new", source="app", started_at=1.0)
    with OrmSession(engine) as orm:
        orm.add(chat)
        chat.messages.add(Message.from_dict({"role": "user", "content": "draft"}))
        orm.flush()
        orm.rollback()
    if not rule:
        remove_position_rule()
    chat.flushed_idx = 5  # by hand: not what the rule set
    with OrmSession(engine) as orm:
        orm.add(chat)
        with pytest.raises(InvalidSessionError, match="starts with no messages \\(flushed_idx"):
            orm.commit()
    assert count_rows(engine, "hermes_sessions") == 0
    # The counters the rule left, and flushed_idx put back by hand, start at 0.
    chat.flushed_idx = 0
    with OrmSession(engine) as orm:
        orm.add(chat)
        orm.commit()
    assert _state(engine)[1] == [("new", 0, 0, 0, None)]


def test_a_message_flushed_again_after_a_rollback_is_placed_again(engine: Engine) -> None:
    """An idx the rule set in a flush that did not land counts as unset."""
    store = _two_sessions(engine)
    retried = Message.from_dict({"role": "user", "content": "retried"})
    with OrmSession(engine) as orm:
        orm.add(retried)
        retried.session_id = "a"
        orm.flush()
        assert retried.idx == 1
        orm.rollback()
    store.append("a", {"role": "assistant", "content": "meanwhile"})  # takes idx 1
    with OrmSession(engine) as orm:
        orm.add(retried)
        orm.flush()
        assert retried.idx == 2
        orm.commit()
    assert [m["content"] for m in store.get_messages("a")] == ["a0", "meanwhile", "retried"]
    # An idx set by hand is still checked against the cursor.
    with OrmSession(engine) as orm:
        orm.add(Message(session_id="a", role="user", content="x", idx=1))
        with pytest.raises(InvalidMessageError, match="idx 1 was set by hand"):
            orm.commit()


def test_no_writer_moves_a_cursor_between_the_check_of_several_and_their_moves(
    engine: Engine,
) -> None:
    """A flush placing messages in several sessions checks them all before any cursor
    moves (a refusal then leaves none moved): another writer waits from that check to
    the commit, on SQLite (no row locks: the database's) as on PostgreSQL (the rows')."""
    store = _two_sessions(engine)
    store.flush("b", [{"role": "user", "content": "b0"}])
    other = SessionStore(
        engine.url.render_as_string(hide_password=False),
        lock_timeout=0.2,
        retry=RetryPolicy(attempts=1),
    )
    between: list[BaseException] = []

    def another_writer_after_the_check(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("UPDATE hermes_sessions") and "+" in statement and not between:
            try:
                other.append("b", {"role": "user", "content": "other"})
            except DatabaseBusyError as exc:
                between.append(exc)
            else:
                between.append(AssertionError("another writer moved b's cursor"))

    event.listen(engine, "before_cursor_execute", another_writer_after_the_check)
    try:
        with OrmSession(engine) as orm:
            orm.add(Message(session_id="a", role="user", content="a1"))
            orm.add(Message(session_id="b", role="user", content="b1", idx=1))  # b's cursor
            orm.commit()
    finally:
        event.remove(engine, "before_cursor_execute", another_writer_after_the_check)
        other.close()
    assert [type(exc) for exc in between] == [DatabaseBusyError]
    assert [m["content"] for m in store.get_messages("a")] == ["a0", "a1"]
    assert [m["content"] for m in store.get_messages("b")] == ["b0", "b1"]


@pytest.mark.heavy  # (66,000 cursors moved one UPDATE each: about 90 s on PostgreSQL)
def test_an_orm_flush_into_more_sessions_than_a_statement_may_name(
    engine: Engine, backend: str
) -> None:
    """A message into each of 66,000 sessions in one ORM flush: their check before any
    cursor moves locks them a part at a time (in id order still). It named them all in
    one IN list, past PostgreSQL's 65,535 parameters (and a SQLite build's 32,766)."""
    count = 66_000
    numbers = (
        "generate_series(1, :n) AS g(i)"
        if backend == "postgresql"
        else "(WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < :n)"
        " SELECT i FROM g)"
    )
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO hermes_sessions (id, source, started_at) "
                f"SELECT 'g' || i, 'app', 1000 FROM {numbers}"
            ),
            {"n": count},
        )
    with OrmSession(engine) as orm:
        orm.add_all(
            Message(session_id=f"g{i}", role="user", content=f"m{i}") for i in range(1, count + 1)
        )
        orm.commit()
    with engine.connect() as conn:
        placed = conn.execute(
            text(
                "SELECT count(*), min(idx), max(idx), count(DISTINCT session_id)"
                " FROM hermes_messages"
            )
        ).one()
        cursors = conn.execute(
            text("SELECT min(flushed_idx), max(flushed_idx) FROM hermes_sessions")
        ).one()
    assert tuple(placed) == (count, 0, 0, count)
    assert tuple(cursors) == (1, 1)


@contextlib.contextmanager
def _own_database(pg_server_url: str, name: str, options: str = "") -> Iterator[Engine]:
    """A database of its own on the test server, migrated, dropped after (with ``options``)."""
    admin = create_engine(pg_server_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    name = f"{name}_{os.getpid()}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE template0 {options}')
    engine = create_engine(make_url(pg_server_url).set(database=name), poolclass=NullPool)
    try:
        upgrade(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _deadlocks(bind: Engine | Connection) -> int:
    """How many deadlocks PostgreSQL has broken in ``bind``'s database so far."""
    query = text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    if isinstance(bind, Connection):
        return int(bind.execute(query).scalar_one())
    with bind.connect() as conn:
        return int(conn.execute(query).scalar_one())


def _settled(engine: Engine, before: int, failures: list[BaseException]) -> list[tuple[Any, ...]]:
    """After a race: no writer failed, no deadlock was broken; each session's id, parent
    link and cursor."""
    assert failures == []
    with engine.connect() as conn:
        assert _deadlocks(conn) == before
        rows = conn.execute(
            text("SELECT id, parent_session_id, flushed_idx FROM hermes_sessions ORDER BY id")
        ).all()
    return [tuple(row) for row in rows]


def _flush_into(
    engine: Engine, ids: Iterable[str], failures: list[BaseException]
) -> Callable[[], None]:
    """An ORM flush of one message into each session of ``ids``, its failure kept."""

    def flush() -> None:
        try:
            with OrmSession(engine) as orm:
                orm.add_all(Message(session_id=sid, role="user", content="m") for sid in ids)
                orm.commit()
        except BaseException as exc:
            failures.append(exc)

    return flush


def _lock_waiters(engine: Engine, count: int) -> None:
    """Wait (up to 20 s) until ``count`` connections to ``engine``'s database wait for a lock."""
    deadline = time.monotonic() + 20
    with engine.connect() as conn:
        while (
            conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ).scalar_one()
            < count
        ):
            assert time.monotonic() < deadline, f"fewer than {count} waiting for a lock"
            conn.rollback()  # (a transaction reads pg_stat_activity once)
            time.sleep(0.05)


@pytest.mark.heavy
def test_rows_locked_a_part_at_a_time_come_in_one_order_whatever_the_collation(
    pg_server_url: str,
) -> None:
    """An ORM flush into 501 sessions locks their rows 500 at a time, in the order Python
    sorts their ids; a flush into two of them (one statement) takes them in that order
    too. On a database of ICU's collation (``a`` before ``B``; by code points ``B``
    comes first) that one statement took ``a``, then waited for ``B``, which the first
    flush held while it waited for ``a``: a deadlock, and one flush refused."""
    with _own_database(
        pg_server_url, "hermes_icu", "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'"
    ) as engine:
        many = [f"A{i:03}" for i in range(499)] + ["B", "a"]
        store = SessionStore(engine)
        for sid in many:
            store.create_session(sid, source="app")
        store.close()
        first = threading.current_thread()
        failures: list[BaseException] = []
        other = threading.Thread(target=_flush_into(engine, ["a", "B"], failures))
        started: list[bool] = []

        def second_flush_waits(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if "FOR UPDATE" not in statement or threading.current_thread() is not first:
                return
            if started:
                return
            started.append(True)  # the first part locked (B among them): the other flush now
            other.start()
            _lock_waiters(engine, 1)

        event.listen(engine, "after_cursor_execute", second_flush_waits)
        _flush_into(engine, many, failures)()
        other.join(30)
        assert failures == []
        with engine.connect() as conn:
            counts = dict(
                conn.execute(
                    select(Message.session_id, func.count()).group_by(Message.session_id)
                ).all()
            )
        assert counts == {**dict.fromkeys(many, 1), "a": 2, "B": 2}


def _deleter(store: SessionStore, how: str) -> Callable[[], object]:
    """A call deleting session ``P`` through ``how``."""
    if how == "store":
        return lambda: store.delete_session("P")
    if how == "user":
        return lambda: store.for_user("u").delete_session("P")
    from hermes_orm.integrations.hermes import SessionDB

    if how == "hermes":
        return lambda: SessionDB(store).delete_session("P")
    if how == "hermes empty":
        return lambda: SessionDB(store).delete_empty_sessions()
    return lambda: SessionDB(store).delete_sessions(["P"])


@pytest.mark.parametrize("how", ["store", "user", "hermes", "hermes many", "hermes empty"])
def test_deleting_a_parent_takes_its_childrens_rows_in_the_order_a_flush_does(
    pg_server_url: str, how: str
) -> None:
    """Deleting a session locks its children's rows in the lock order before it
    unlinks them. The UPDATE of their links took them as it scanned them (``b``,
    made first, then ``a``), while an ORM flush into both took ``a`` and waited for
    ``b`` (held here a moment by a third transaction): a deadlock, which PostgreSQL
    broke by refusing one of them."""
    with _own_database(pg_server_url, "hermes_unlink") as engine:
        store = SessionStore(engine)
        owned = store.for_user("u")
        owned.create_session("P", source="app")
        owned.end_session("P", "done")  # (ended and empty: what delete_empty_sessions takes)
        for child in ("b", "a"):
            owned.create_session(child, source="app", parent_session_id="P")
        before = _deadlocks(engine)
        failures: list[BaseException] = []
        flush = _flush_into(engine, "ab", failures)

        with engine.connect() as holder:
            # A key-share lock on b (as a message insert takes): the flush's FOR UPDATE
            # waits for it, an UPDATE of b's link does not.
            holder.execute(text("SELECT 1 FROM hermes_sessions WHERE id = 'b' FOR KEY SHARE"))
            flusher = threading.Thread(target=flush)
            flusher.start()
            _lock_waiters(engine, 1)  # the flush holds a and waits for b
            deleter = threading.Thread(target=_deleter(store, how))
            deleter.start()
            _lock_waiters(engine, 2)
            holder.commit()
        flusher.join(30)
        deleter.join(30)
        store.close()
        assert _settled(engine, before, failures) == [("a", None, 1), ("b", None, 1)]


def test_without_the_rule_a_message_left_placed_by_a_rollback_is_refused(engine: Engine) -> None:
    store = _two_sessions(engine)
    retried = Message(session_id="a", role="user", content="retried")
    with OrmSession(engine) as orm:
        orm.add(retried)
        orm.flush()
        orm.rollback()
    remove_position_rule()
    with OrmSession(engine) as orm:
        orm.add(retried)
        with pytest.raises(InvalidMessageError, match="install_position_rule"):
            orm.commit()
    assert [m["content"] for m in store.get_messages("a")] == ["a0"]


def _savepoint_recipe(engine: Engine) -> Engine:
    """SQLAlchemy's documented pysqlite recipe for SAVEPOINT, on a SQLite engine."""
    if engine.dialect.name == "sqlite":
        _savepoint_recipe_on(engine)
    return engine


def test_a_message_of_a_rolled_back_savepoint_is_placed_again(engine: Engine) -> None:
    store = _two_sessions(_savepoint_recipe(engine))
    with OrmSession(engine) as orm:
        chat = orm.get_one(Session, "a")
        savepoint = orm.begin_nested()
        first = Message.from_dict({"role": "user", "content": "in savepoint"})
        chat.messages.add(first)
        orm.flush()
        assert first.idx == 1
        savepoint.rollback()
        after = Message.from_dict({"role": "user", "content": "after"})
        chat.messages.add(after)
        orm.flush()
        assert after.idx == 1
        chat.messages.add(first)
        orm.flush()
        assert first.idx == 2
        orm.commit()
    assert [m["content"] for m in store.get_messages("a")] == ["a0", "after", "in savepoint"]
    assert store.get_session("a")["flushed_idx"] == 3  # type: ignore[index]


def test_a_detached_session_merged_after_its_messages_moved_on_is_refused(
    engine: Engine,
) -> None:
    store = _two_sessions(engine)
    with OrmSession(engine) as orm:
        stale = orm.get_one(Session, "a")
    store.flush("a", [{"role": "user", "content": "a0"}, {"role": "user", "content": "a1"}])
    stale.title = "renamed"
    with OrmSession(engine) as orm:
        orm.merge(stale)
        with pytest.raises(InvalidSessionError, match="flushed_idx cannot be changed"):
            orm.commit()
    with OrmSession(engine) as orm:
        orm.get_one(Session, "a").title = "renamed"  # as the README says instead
        orm.commit()
    assert store.get_session("a")["title"] == "renamed"  # type: ignore[index]
    assert store.get_session("a")["flushed_idx"] == 2  # type: ignore[index]


def test_a_loaded_session_s_counters_follow_a_savepoint_a_failed_flush_rolled_back(
    engine: Engine,
) -> None:
    """A flush that fails in a savepoint rolls the savepoint back (SQLAlchemy rolls back
    the flush's own subtransaction, up to it): the counters the rule moved go back too."""
    store = _two_sessions(_savepoint_recipe(engine))
    with OrmSession(engine) as orm:
        chat = orm.get_one(Session, "a")
        savepoint = orm.begin_nested()
        orm.add(Message(session_id="a", role="user", content="x"))
        orm.add(Session(id="b", source="again"))  # b exists: the flush fails
        with pytest.raises(IntegrityError):
            orm.flush()
        savepoint.close()  # (what leaving a `with orm.begin_nested()` block does)
        assert chat.flushed_idx == 1
        orm.add(Message(session_id="a", role="user", content="after"))
        orm.commit()
    assert [m["content"] for m in store.get_messages("a")] == ["a0", "after"]


@pytest.mark.parametrize("how", ["by id", "statement", "loaded later"])
def test_a_loaded_session_s_counters_follow_a_savepoint_rolled_back(
    engine: Engine, how: str
) -> None:
    """The rule keeps a loaded session object's counters in step (as committed values):
    a savepoint rolled back undoes them in the object too, as in the row, including
    inner savepoints released into it and objects loaded inside it."""
    store = _two_sessions(_savepoint_recipe(engine))
    counters = select(Session.flushed_idx, Session.message_count, Session.tool_call_count)
    with OrmSession(engine) as orm:
        chat = orm.get_one(Session, "a") if how != "loaded later" else None
        outer = orm.begin_nested()
        with orm.begin_nested():  # released into the outer one
            if how == "statement":
                orm.execute(insert(Message), [{"session_id": "a", "role": "user"}])
            else:
                orm.add(Message(session_id="a", role="assistant", tool_calls=[_CALL]))
                orm.flush()
        if chat is None:
            chat = orm.get_one(Session, "a")
        assert chat.flushed_idx == 2
        outer.rollback()
        stored = orm.execute(counters.where(Session.id == "a")).one()
        assert (chat.flushed_idx, chat.message_count, chat.tool_call_count) == tuple(stored)
        assert stored.flushed_idx == 1
        orm.add(Message(session_id="a", role="user", content="after"))
        orm.commit()
    assert [m["content"] for m in store.get_messages("a")] == ["a0", "after"]


# -- statements on hermes_sessions ------------------------------------------------------------


def _insert_for(engine: Engine) -> Any:
    return sqlite.insert if engine.dialect.name == "sqlite" else postgresql.insert


def test_a_stored_session_s_history_id_is_never_set(engine: Engine) -> None:
    """Given another session's (one deleted, say), a session would pass for its history
    where a store remembers that one: it is drawn, never set."""
    _two_sessions(engine)

    def histories() -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(select(Session.history_id).order_by(Session.id)).all())

    before = histories()
    with OrmSession(engine) as orm:
        orm.get_one(Session, "a").history_id = 5
        with pytest.raises(InvalidSessionError, match="history_id cannot be changed"):
            orm.commit()
    upsert = _insert_for(engine)
    row = {"id": "a", "source": "app", "started_at": 1.0}
    statements: list[tuple[Any, Any]] = [
        (update(Session).where(Session.id == "a").values(history_id=5), None),
        (update(Session), [{"id": "a", "history_id": 5}]),
        (
            upsert(Session)
            .values(**row)
            .on_conflict_do_update(index_elements=["id"], set_={"history_id": 5}),
            None,
        ),
        (
            insert(Session).from_select(
                ["id", "source", "started_at", "history_id"],
                select(
                    literal("copy"), Session.source, Session.started_at, Session.history_id
                ).where(Session.id == "a"),
            ),
            None,
        ),
    ]
    _each_refused(engine, statements, InvalidSessionError, "history_id cannot be set")
    assert histories() == before


def test_insert_from_select_and_upserts_setting_counters_are_refused(engine: Engine) -> None:
    store = _two_sessions(engine)
    before = _state(engine)
    upsert = _insert_for(engine)
    row = {"id": "a", "source": "app", "started_at": 1.0}
    statements: list[tuple[Any, Any]] = [
        (
            insert(Session).from_select(
                ["id", "source", "started_at", "flushed_idx", Session.message_count],
                select(literal("c"), literal("app"), literal(1.0), literal(7), literal(7)),
            ),
            None,
        ),
        (
            upsert(Session)
            .values(**row)
            .on_conflict_do_update(index_elements=["id"], set_={"flushed_idx": 0}),
            None,
        ),
        (
            upsert(Session)
            .values(**row)
            .on_conflict_do_update(
                index_elements=["id"], set_={"title": "t", Session.message_count: 0}
            ),
            None,
        ),
    ]
    if engine.dialect.name == "sqlite":
        try:
            double = (
                upsert(Session)
                .values(**row)
                .on_conflict_do_update(index_elements=["id"], set_={"title": "t"})
                .on_conflict_do_update(index_elements=["title"], set_={"tool_call_count": 0})
            )
        except InvalidRequestError:  # SQLAlchemy 2.0 builds one ON CONFLICT clause only
            pass
        else:
            statements.append((double, None))
        statements.append((insert(Session).prefix_with("OR REPLACE").values(**row), None))
    _each_refused(engine, statements, InvalidSessionError, "cannot be set|start a stored")
    assert _state(engine) == before
    # Upserts of other columns, and a SELECT of other columns, stay open.
    with OrmSession(engine) as orm:
        orm.execute(
            upsert(Session)
            .values(**row)
            .on_conflict_do_update(index_elements=["id"], set_={"title": "upserted"})
        )
        orm.execute(upsert(Session).values(**row).on_conflict_do_nothing())
        orm.execute(
            insert(Session).from_select(
                ["id", "source", "started_at"],
                select(literal("c"), literal("app"), literal(1.0)),
            )
        )
        orm.commit()
    assert store.get_session("a")["title"] == "upserted"  # type: ignore[index]
    assert _state(engine)[1][0][:3] == ("a", 1, 1)
    assert store.get_session("c")["flushed_idx"] == 0  # type: ignore[index]


@pytest.mark.parametrize("rule", [True, False], ids=["rule", "no-rule"])
def test_a_delete_statement_takes_the_sessions_messages(engine: Engine, rule: bool) -> None:
    """On the store's engine (foreign keys on, on SQLite too), with the rule or without it."""
    store = _two_sessions(engine)
    store.flush("b", [{"role": "user", "content": "b0"}])
    if not rule:
        remove_position_rule()
    with OrmSession(engine) as orm:
        orm.execute(delete(Session).where(Session.id == "a"))
        orm.commit()
    assert _state(engine)[0] == [("b", 0, "b0")]


def _app_engine_without_foreign_keys(tmp_path: Any) -> tuple[Engine, SessionStore]:
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    upgrade(engine)
    store = SessionStore(engine)
    store.create_session("a", source="app")
    store.create_session("b", source="app")
    store.create_session("child", source="app", parent_session_id="a")
    store.flush("a", [{"role": "user", "content": "old words"}])
    store.flush("b", [{"role": "user", "content": "b0"}])
    return engine, store


@pytest.mark.backends("sqlite")
def test_a_delete_statement_on_an_engine_without_foreign_keys_takes_what_hangs_on_it(
    tmp_path: Any,
) -> None:
    """A delete(Session) statement runs no mapper event: the rule applies the ON DELETE rules."""
    engine, store = _app_engine_without_foreign_keys(tmp_path)
    with OrmSession(engine) as orm:
        assert orm.connection().exec_driver_sql("PRAGMA foreign_keys").scalar() == 0
        orm.execute(delete(Session).where(Session.id == "a"))
        orm.commit()
    assert _state(engine)[0] == [("b", 0, "b0")]
    assert store.get_session("child")["parent_session_id"] is None  # type: ignore[index]
    store.create_session("a", source="app")  # the same id again: nothing of the old one
    assert store.get_messages("a") == []
    assert store.flush("a", [{"role": "user", "content": "new"}]).cursor == 1
    store.close()
    engine.dispose()


@pytest.mark.backends("sqlite")
def test_delete_session_takes_the_messages_a_delete_without_foreign_keys_left(
    tmp_path: Any,
) -> None:
    """Another client deleted a session row with foreign keys off: its messages stay,
    and block the id. delete_session of that id deletes them (no row is needed)."""
    engine, store = _app_engine_without_foreign_keys(tmp_path)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM hermes_sessions WHERE id = 'b'"))
    assert store.delete_session("b") is False  # no session of that id
    store.create_session("b", source="app")
    assert store.get_messages("b") == []
    store.close()
    engine.dispose()


@pytest.mark.backends("sqlite")
def test_a_delete_statement_whose_where_reads_the_messages_takes_them(tmp_path: Any) -> None:
    engine, store = _app_engine_without_foreign_keys(tmp_path)
    with OrmSession(engine) as orm:
        said = select(Message.session_id).where(Message.content == "old words")
        orm.execute(delete(Session).where(Session.id.in_(said)))
        orm.commit()
    assert _state(engine)[0] == [("b", 0, "b0")]
    assert [row[0] for row in _state(engine)[1]] == ["b", "child"]
    store.close()
    engine.dispose()


@pytest.mark.backends("sqlite")
def test_a_failed_delete_statement_leaves_what_hangs_on_its_sessions(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Applying the ON DELETE rules fails after the DELETE ran: the session is rolled back."""
    from hermes_orm import _unit_of_work

    engine, store = _app_engine_without_foreign_keys(tmp_path)
    before = _state(engine)

    def fail(*_args: Any) -> None:
        raise RuntimeError("the ON DELETE rules failed")

    with OrmSession(engine) as orm:
        monkeypatch.setattr(_unit_of_work, "_apply_on_delete", fail)  # injected failure
        with pytest.raises(RuntimeError, match="ON DELETE rules failed"):
            orm.execute(delete(Session).where(Session.id == "a"))
        monkeypatch.undo()
        orm.commit()
    assert _state(engine) == before
    assert store.get_session("child")["parent_session_id"] == "a"  # type: ignore[index]
    store.close()
    engine.dispose()


def test_a_delete_statement_that_fails_leaves_the_callers_transaction(tmp_path: Any) -> None:
    """The DELETE itself refused by the database wrote nothing: the caller's work stands."""
    engine, store = _app_engine_without_foreign_keys(tmp_path)

    def refuse(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM HERMES_SESSIONS"):
            raise sqlite3.OperationalError("database is locked")  # injected failure

    with OrmSession(engine) as orm:
        orm.add(Session(id="mine", source="app", started_at=1.0))
        orm.flush()
        event.listen(engine, "before_cursor_execute", refuse)
        try:
            # (SQLAlchemy 2.0 raises a listener's driver error as it is, 2.1 wraps it.)
            with pytest.raises((DBAPIError, sqlite3.OperationalError), match="database is locked"):
                orm.execute(delete(Session).where(Session.id == "a"))
        finally:
            event.remove(engine, "before_cursor_execute", refuse)
        orm.commit()  # what the transaction held before the DELETE is still there
    assert store.get_session("mine") is not None
    assert store.get_session("a") is not None
    store.close()
    engine.dispose()


# -- connections, engines --------------------------------------------------------------------


def test_two_sessions_with_the_rule_share_one_connection(engine: Engine) -> None:
    """Each ORM session that began on a connection is watched: a flush of either goes through."""
    _two_sessions(engine)
    with engine.connect() as conn:
        first = OrmSession(bind=conn, join_transaction_mode="create_savepoint")
        second = OrmSession(bind=conn, join_transaction_mode="create_savepoint")
        first.get(Session, "a")  # first begins on conn
        second.get(Session, "b")  # then second
        first.add(Message(session_id="a", role="user", content="from first"))
        first.flush()
        second.add(Message(session_id="b", role="user", content="from second"))
        second.flush()
        placed = conn.execute(
            select(Message.session_id, Message.idx, Message.content).order_by(Message.id)
        ).all()
        assert [tuple(row) for row in placed] == [
            ("a", 0, "a0"),
            ("a", 1, "from first"),
            ("b", 0, "from second"),
        ]
        # The legacy bulk API stays refused.
        row = {"session_id": "a", "role": "user", "content": "x", "digest": b"d", "idx": 9}
        with pytest.raises(InvalidMessageError, match="legacy bulk API"):
            second.bulk_insert_mappings(Message, [row])
        first.close()
        second.close()
        conn.rollback()


def _savepoint_recipe_on(sync_engine: Engine) -> None:
    """SQLAlchemy's pysqlite/aiosqlite recipe: no driver BEGIN, a ``begin`` listener emits one."""

    @event.listens_for(sync_engine, "connect")
    def _no_driver_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


def _writes_on_the_recipe(store: Any) -> None:
    store.create_session("s", source="app")
    assert store.flush("s", [{"role": "user", "content": "m0"}]).cursor == 1
    assert store.append("s", {"role": "assistant", "content": "m1"}) == 1
    conversation = [
        {"role": "user", "content": "m0"},
        {"role": "assistant", "content": "m1"},
        {"role": "user", "content": "m2"},
    ]
    assert store.flush("s", conversation).written == 1
    assert [m["content"] for m in store.get_messages("s")] == ["m0", "m1", "m2"]


@pytest.mark.backends("sqlite")
def test_the_store_writes_on_an_engine_with_the_savepoint_recipe(tmp_path: Any) -> None:
    """The host's ``begin`` listener opens the driver's transaction: the store's BEGIN
    IMMEDIATE must still take the write lock, not fail inside it."""
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    _savepoint_recipe_on(engine)
    upgrade(engine)  # the migration lock's BEGIN IMMEDIATE too
    store = SessionStore(engine)
    _writes_on_the_recipe(store)
    # The ORM's savepoints, which the recipe is for, work beside it.
    with OrmSession(engine) as orm:
        with orm.begin_nested():
            orm.add(Message(session_id="s", role="user", content="m3"))
        orm.commit()
    assert store.get_session("s")["flushed_idx"] == 4  # type: ignore[index]
    store.close()
    engine.dispose()


@pytest.mark.backends("sqlite")
def test_the_async_store_writes_on_an_engine_with_the_savepoint_recipe(tmp_path: Any) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    from hermes_orm import AsyncSessionStore
    from tests.conftest import BlockingStore

    path = tmp_path / "app.db"
    check = create_engine(f"sqlite:///{path}")
    upgrade(check)
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    _savepoint_recipe_on(engine.sync_engine)
    with asyncio.Runner() as runner:
        store = BlockingStore(AsyncSessionStore(engine), check, runner)
        try:
            _writes_on_the_recipe(store)
        finally:
            store.close()
            runner.run(engine.dispose())
            check.dispose()


def _stored(engine: Engine, session_id: str) -> tuple[list[int], int, int]:
    """A session's stored idx values, its cursor and its message count."""
    with engine.connect() as conn:
        idxs = conn.exec_driver_sql(
            "SELECT idx FROM hermes_messages WHERE session_id = ? ORDER BY idx"
            if engine.dialect.name == "sqlite"
            else "SELECT idx FROM hermes_messages WHERE session_id = %s ORDER BY idx",
            (session_id,),
        ).scalars()
        row = conn.execute(
            select(Session.flushed_idx, Session.message_count).where(Session.id == session_id)
        ).one()
        return list(idxs), row.flushed_idx, row.message_count


def test_a_refused_new_session_moves_no_stored_session_s_cursor(engine: Engine) -> None:
    """One flush: a message for a stored session, a new session the rule refuses.

    The refusal comes before any cursor moves: the application fixes its
    mistake in the same transaction and commits, and both sessions are exact.
    """
    store = SessionStore(engine)
    store.create_session("kept", source="app")
    with OrmSession(engine) as orm:
        orm.add(Message(session_id="kept", role="user", content="hello"))
        wrong = Session(id="wrong", source="app", started_at=0.0, flushed_idx=5)
        wrong.messages.add(Message(role="user", content="first"))
        orm.add(wrong)
        with pytest.raises(InvalidSessionError, match="flushed_idx"):
            orm.flush()
        assert orm.is_active
        wrong.flushed_idx = 0
        orm.commit()
    assert _stored(engine, "kept") == ([0], 1, 1)
    assert _stored(engine, "wrong") == ([0], 1, 1)
    assert store.get_messages("kept") == [{"role": "user", "content": "hello"}]


def test_a_before_flush_hook_raising_after_the_rule_leaves_no_cursor_moved(
    engine: Engine,
) -> None:
    """The application's own hook, run after the rule's, refuses the flush once.

    The cursor the rule moved stands in the transaction without its rows:
    every flush and commit is refused until the application rolls back.
    """
    store = SessionStore(engine)
    store.create_session("hooked", source="app")
    store.flush("hooked", [{"role": "user", "content": "q"}])
    made = sessionmaker(engine)
    install_position_rule(made)
    refusals = [ValueError("the application's own check")]

    @event.listens_for(made, "before_flush")
    def check(*_args: Any) -> None:
        if refusals:
            raise refusals.pop()

    try:
        with made() as orm:
            orm.add(Message(session_id="hooked", role="assistant", content="a"))
            with pytest.raises(ValueError, match="own check"):
                orm.flush()
            with pytest.raises(InvalidSessionError, match="roll the transaction back"):
                orm.commit()
            with pytest.raises(InvalidSessionError, match="roll the transaction back"):
                orm.flush()
            orm.rollback()
            assert _stored(engine, "hooked") == ([0], 1, 1)
            orm.add(Message(session_id="hooked", role="assistant", content="a"))
            orm.commit()
    finally:
        remove_position_rule(made)
    assert _stored(engine, "hooked") == ([0, 1], 2, 2)
    assert (
        store.flush(
            "hooked", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        ).written
        == 0
    )


def test_a_rolled_back_savepoint_takes_its_cursor_move_with_it(engine: Engine) -> None:
    store = SessionStore(engine)
    store.create_session("saved", source="app")
    with OrmSession(engine) as orm:
        orm.add(Message(session_id="saved", role="user", content="kept"))
        orm.flush()
        savepoint = orm.begin_nested()
        orm.add(Message(session_id="saved", role="user", content="undone"))
        orm.flush()
        savepoint.rollback()
        orm.add(Message(session_id="saved", role="user", content="after"))
        orm.commit()
    assert _stored(engine, "saved") == ([0, 1], 2, 2)
    assert [m["content"] for m in store.get_messages("saved")] == ["kept", "after"]


def test_a_flush_of_some_objects_places_only_those(engine: Engine) -> None:
    store = SessionStore(engine)
    store.create_session("part", source="app")
    with OrmSession(engine) as orm:
        first = Message(session_id="part", role="user", content="one")
        second = Message(session_id="part", role="assistant", content="two")
        orm.add_all([first, second])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # flush(objects) in 2.1
            orm.flush([first])
        assert (first.idx, second.idx) == (0, None)
        orm.commit()
    assert _stored(engine, "part") == ([0, 1], 2, 2)
    assert [m["content"] for m in store.get_messages("part")] == ["one", "two"]


@pytest.mark.parametrize("named", ["by object", "by id"])
def test_a_flush_of_messages_without_their_new_session_is_refused(
    engine: Engine, named: str
) -> None:
    """The session would go in later, its counters then at 0 under its stored message:
    its cursor behind its messages, and every later write to it refused."""
    with OrmSession(engine) as orm:
        chat = Session(id="fresh", source="app")
        orm.add(chat)
        message = (
            Message(session=chat, role="user", content="hi")
            if named == "by object"
            else Message(session_id="fresh", role="user", content="hi")
        )
        orm.add(message)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # flush(objects) in 2.1
            with pytest.raises(InvalidSessionError, match="not among the objects flushed"):
                orm.flush([message])
            assert message.idx is None  # nothing placed
            orm.flush([chat, message])
        orm.commit()
    assert _stored(engine, "fresh") == ([0], 1, 1)


def test_a_new_session_whose_cursor_moved_is_added_again_after_a_rollback(
    engine: Engine,
) -> None:
    """A new session flushed alone, then a message into it (its cursor moved by the
    UPDATE of a stored row), then the transaction rolled back: both are new again,
    and the session's counters count as unset, as the README says."""
    with OrmSession(engine) as orm:
        chat = Session(id="again", source="app")
        orm.add(chat)
        orm.flush()  # as an autoflush would
        message = Message(session=chat, role="user", content="hi")
        orm.add(message)
        orm.flush()
        assert chat.flushed_idx == 1
        orm.rollback()
        orm.add_all([chat, message])
        orm.commit()
    assert _stored(engine, "again") == ([0], 1, 1)


@pytest.mark.backends("sqlite")
def test_a_session_made_while_a_delete_statement_runs_keeps_its_messages(
    tmp_path: Any,
) -> None:
    """On SQLite with foreign keys off, the rule reads the ids a delete(Session) picks,
    then deletes and applies the ON DELETE rules to them. It read them before the
    transaction held the write lock: a session another writer made in between, of the
    statement's WHERE, went without its messages."""
    engine, store = _app_engine_without_foreign_keys(tmp_path)
    store.create_session("made meanwhile", source="app")
    store.flush("made meanwhile", [{"role": "user", "content": "m0"}])
    writer = SessionStore(create_engine(engine.url))  # another process, in real life
    finished: list[BaseException | None] = []

    def write() -> None:
        try:
            writer.create_session("late", source="tmp")
            writer.flush("late", [{"role": "user", "content": "l0"}])
            finished.append(None)
        except BaseException as exc:
            finished.append(exc)

    thread = threading.Thread(target=write)

    def between(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if statement.startswith("SELECT hermes_sessions.id") and not thread.is_alive():
            thread.start()
            thread.join(1)  # done meanwhile, unless it waits for this transaction

    event.listen(engine, "after_cursor_execute", between)
    try:
        with OrmSession(engine) as orm:
            orm.execute(delete(Session).where(Session.source == "tmp"))
            orm.commit()
    finally:
        event.remove(engine, "after_cursor_execute", between)
    thread.join(30)
    assert finished == [None]
    orphans = (
        "SELECT count(*) FROM hermes_messages m WHERE NOT EXISTS "
        "(SELECT 1 FROM hermes_sessions s WHERE s.id = m.session_id)"
    )
    with engine.connect() as conn:
        assert conn.exec_driver_sql(orphans).scalar_one() == 0
    assert [m["content"] for m in writer.get_messages("late")] == ["l0"]
    writer.close()
    store.close()
    engine.dispose()


def test_an_autocommit_connection_is_refused_before_anything_is_written(
    engine: Engine,
) -> None:
    """Each statement would commit alone: a cursor moved for rows that then failed."""
    store = SessionStore(engine)
    store.create_session("auto", source="app")
    store.flush("auto", [{"role": "user", "content": "q"}])
    autocommitting = engine.execution_options(isolation_level="AUTOCOMMIT")
    with OrmSession(autocommitting) as orm:
        orm.add(Message(session_id="auto", role="assistant", content="a"))
        with pytest.raises(InvalidArgumentError, match="autocommits"):
            orm.commit()
    with (
        OrmSession(autocommitting) as orm,
        pytest.raises(InvalidArgumentError, match="autocommits"),
    ):
        orm.execute(insert(Message), [{"session_id": "auto", "role": "user", "content": "b"}])
    assert _stored(engine, "auto") == ([0], 1, 1)


def test_an_orm_session_closed_after_a_failed_flush_is_used_again(engine: Engine) -> None:
    """The flush's body fails (a duplicate row) after the rule moved a cursor; the
    application closes the session (as ``with`` does on an exception) and goes on."""
    store = SessionStore(engine)
    store.create_session("s", source="app")
    store.create_session("dup", source="app")
    orm = OrmSession(engine)
    orm.add(Message(session_id="s", role="user", content="a"))
    orm.add(Session(id="dup", source="app", started_at=0.0))
    with pytest.raises(IntegrityError):
        orm.commit()
    orm.close()
    orm.add(Message(session_id="s", role="user", content="b"))
    orm.commit()
    orm.close()
    assert _stored(engine, "s") == ([0], 1, 1)
    assert store.get_messages("s") == [{"role": "user", "content": "b"}]


@pytest.mark.parametrize("rule", [True, False], ids=["rule", "no-rule"])
def test_a_stored_sessions_id_stays(engine: Engine, rule: bool) -> None:
    """Its messages, and the rows that hang on it, keep the id they were stored under."""
    store = _two_sessions(engine)
    if not rule:
        remove_position_rule()
    before = _state(engine)
    with OrmSession(engine) as orm:
        orm.get_one(Session, "a").id = "z"
        with pytest.raises(InvalidSessionError, match="session 'a': its id cannot be changed"):
            orm.commit()
    assert _state(engine) == before
    if rule:
        table = Session.__table__
        changes = [
            lambda orm: orm.execute(update(Session).where(Session.id == "a").values(id="z")),
            lambda orm: orm.execute(update(Session).where(Session.id == "a"), {"id": "z"}),
            lambda orm: orm.connection().execute(
                table.update().where(table.c.id == "a"), {"id": "z"}
            ),
        ]
        for change in changes:
            with (
                OrmSession(engine) as orm,
                pytest.raises(InvalidSessionError, match="id cannot be changed"),
            ):
                change(orm)
        assert _state(engine) == before
        with OrmSession(engine) as orm:
            # Rows given as parameters name the sessions they update by id.
            orm.execute(update(Session), [{"id": "a", "title": "kept"}])
            orm.commit()
        assert store.get_session("a")["title"] == "kept"  # type: ignore[index]
    assert _state(engine) == before
    assert store.flush("a", [{"role": "user", "content": "a0"}]).written == 0


@pytest.mark.parametrize("rule", [True, False], ids=["rule", "no-rule"])
def test_a_session_deleted_and_added_again_in_one_flush_is_refused(
    engine: Engine, rule: bool
) -> None:
    """SQLAlchemy would update the stored row in place, its messages kept under the new one."""
    store = _two_sessions(engine)
    if not rule:
        remove_position_rule()
    before = _state(engine)
    with OrmSession(engine) as orm:
        orm.delete(orm.get_one(Session, "a"))
        again = Session(id="a", source="app", started_at=2.0)
        orm.add(again)
        if rule:
            again.messages.add(Message(role="user", content="new0"))
        with pytest.raises(InvalidSessionError, match="deleted and added again in one flush"):
            orm.commit()
    assert _state(engine) == before
    # The delete flushed first, the new session starts with no messages.
    with OrmSession(engine) as orm:
        orm.delete(orm.get_one(Session, "a"))
        orm.flush()
        orm.add(Session(id="a", source="app", started_at=2.0))
        orm.commit()
    assert store.get_messages("a") == []
    assert store.flush("a", [{"role": "user", "content": "new0"}]).written == 1


def test_without_the_rule_a_message_with_idx_set_by_hand_is_refused(engine: Engine) -> None:
    """Nothing places it: written, it would stand past a cursor that did not move."""
    store = _two_sessions(engine)
    remove_position_rule()
    before = _state(engine)
    with OrmSession(engine) as orm:
        orm.add(Message(session_id="a", idx=1, role="assistant", content="a1"))
        with pytest.raises(InvalidMessageError, match="needs the position rule"):
            orm.commit()
    assert _state(engine) == before
    history = [{"role": "user", "content": "a0"}, {"role": "assistant", "content": "a1"}]
    assert store.flush("a", history).written == 1


def test_a_message_added_by_a_hook_after_the_rule_is_refused_saying_why(engine: Engine) -> None:
    """The rule placed the flush's messages before the hook added one; registered first,
    the hook's message is placed with the others."""
    _two_sessions(engine)
    before = _state(engine)

    def hook(orm: OrmSession, *_args: Any) -> None:
        if not any(isinstance(obj, Message) for obj in orm.new):
            orm.add(Message(session_id="a", role="assistant", content="from the hook"))

    event.listen(OrmSession, "before_flush", hook)
    try:
        with OrmSession(engine) as orm:
            orm.get_one(Session, "a").title = "touched"
            with pytest.raises(InvalidMessageError, match="added to the flush after the position"):
                orm.commit()
        assert _state(engine) == before
        remove_position_rule()
        event.remove(OrmSession, "before_flush", hook)
        event.listen(OrmSession, "before_flush", hook)
        install_position_rule()
        with OrmSession(engine) as orm:
            orm.get_one(Session, "a").title = "touched"
            orm.commit()
    finally:
        event.remove(OrmSession, "before_flush", hook)
    assert _stored(engine, "a") == ([0, 1], 2, 2)


@pytest.mark.backends("sqlite")
def test_a_sqlite_connection_committing_each_statement_is_refused(tmp_path: Any) -> None:
    """sqlite3 with isolation_level=None opens no transaction: each statement of a flush
    would commit alone, the cursor moved for rows that then fail. With a BEGIN of the
    application's (the savepoint recipe), its statements hold together."""
    from sqlalchemy import create_engine

    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = create_engine(url, connect_args={"isolation_level": None})
    upgrade(engine)
    store = SessionStore(engine)
    store.create_session("s", source="app")
    store.flush("s", [{"role": "user", "content": "m0"}])
    with OrmSession(engine) as orm:
        orm.add(Message(session_id="s", role="assistant", content="m1"))
        with pytest.raises(InvalidArgumentError, match="commit each statement on its own"):
            orm.commit()
    assert _stored(engine, "s") == ([0], 1, 1)
    store.close()
    engine.dispose()
    recipe = create_engine(url)
    _savepoint_recipe_on(recipe)
    with OrmSession(recipe) as orm:
        orm.add(Message(session_id="s", role="assistant", content="m1"))
        orm.commit()
    assert _stored(recipe, "s") == ([0, 1], 2, 2)
    recipe.dispose()


def test_an_upsert_setting_the_id_it_conflicts_on_is_no_change_of_id(engine: Engine) -> None:
    """``SET id = excluded.id`` on a conflict of the id leaves it as it is; on a conflict
    of the title, it would give the stored session the new row's id."""
    store = _two_sessions(engine)
    before = _state(engine)
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    row = {"id": "a", "source": "app", "started_at": 1.0, "title": "upserted"}
    upsert = dialect.insert(Session).values(row)
    keeps = upsert.on_conflict_do_update(
        index_elements=[Session.id], set_={k: upsert.excluded[k] for k in row}
    )
    with OrmSession(engine) as orm:
        orm.execute(keeps)
        orm.commit()
    assert store.get_session("a")["title"] == "upserted"  # type: ignore[index]
    assert _state(engine) == before
    other = dialect.insert(Session).values({**row, "id": "z"})
    moves = other.on_conflict_do_update(
        index_elements=[Session.title],
        index_where=Session.title.is_not(None),
        set_={"id": other.excluded.id},
    )
    with OrmSession(engine) as orm, pytest.raises(InvalidSessionError, match="id cannot"):
        orm.execute(moves)
    assert _state(engine) == before
    if dialect is postgresql:  # (SQLite's ON CONFLICT names no constraint)
        by_name = postgresql.insert(Session).values(row)
        named = by_name.on_conflict_do_update(
            constraint="pk_hermes_sessions", set_={k: by_name.excluded[k] for k in row}
        )
        with OrmSession(engine) as orm:
            orm.execute(named)
            orm.commit()
        assert _state(engine) == before


def test_a_message_flushed_with_its_listed_session_but_not_listed_is_refused_saying_so(
    engine: Engine,
) -> None:
    _two_sessions(engine)
    before = _state(engine)
    with OrmSession(engine) as orm:
        chat = orm.get_one(Session, "a")
        chat.messages.add(Message(role="assistant", content="a1"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # flush(objects) in 2.1
            with pytest.raises(InvalidMessageError, match="list it too, or flush everything"):
                orm.flush([chat])
    assert _state(engine) == before

    def hook(orm: OrmSession, *_args: Any) -> None:
        chat = orm.get_one(Session, "a")
        if not any(isinstance(obj, Message) for obj in orm.new):
            chat.messages.add(Message(role="assistant", content="from the hook"))

    event.listen(OrmSession, "before_flush", hook)
    try:
        with OrmSession(engine) as orm, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            chat = orm.get_one(Session, "a")
            chat.title = "touched"
            with pytest.raises(InvalidMessageError, match="added to the flush after the position"):
                orm.flush([chat])
    finally:
        event.remove(OrmSession, "before_flush", hook)
    assert _state(engine) == before


def test_a_cursor_other_sql_set_to_no_position_is_refused_on_the_orm_path(engine: Engine) -> None:
    """As a store's flush refuses it: nothing written, a DatabaseError naming it."""
    store = SessionStore(engine)
    values = ["-5"] + (["'x'", "2.5"] if engine.dialect.name == "sqlite" else [])
    for n, value in enumerate(values):
        sid = f"s{n}"
        store.create_session(sid, source="cli")
        store.flush(sid, [{"role": "user", "content": "m0"}, {"role": "user", "content": "m1"}])
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"UPDATE hermes_sessions SET flushed_idx = {value} WHERE id = '{sid}'"
            )
        orm = OrmSession(engine)
        with pytest.raises(DatabaseError, match=f"session '{sid}' holds flushed_idx"), orm.begin():
            orm.add(Message(session_id=sid, role="user", content="via the ORM"))
        orm.close()
        assert count_rows(engine, "hermes_messages", session_id=sid) == 2


def test_a_host_model_on_the_base_numbers_its_key_with_big_id(engine: Engine) -> None:
    """On the base an int is BIGINT, which SQLite does not number: BigId is numbered on
    both backends (a table of the host's, made and dropped here)."""
    from hermes_orm.models import Base, BigId

    # (A class name of each backend's own: the base's registry keeps the one made before.)
    invoice: Any = type(
        f"Invoice{engine.dialect.name.title()}",
        (Base,),
        {
            "__tablename__": "host_invoices",
            "__annotations__": {"id": Mapped[int], "label": Mapped[str]},
            "id": mapped_column(BigId, primary_key=True),
            "label": mapped_column(String(40)),
        },
    )
    table = invoice.__table__
    try:
        table.create(engine)
        with OrmSession(engine) as orm:
            orm.add_all([invoice(label="a"), invoice(label="b")])
            orm.commit()
            assert orm.scalars(select(invoice.id).order_by(invoice.id)).all() == [1, 2]
    finally:
        table.drop(engine)
        Base.metadata.remove(table)


def test_the_rule_moves_the_cursor_where_the_session_s_binds_put_the_messages(
    engine: Engine, tmp_path: Any
) -> None:
    """A host whose ORM session binds hermes_orm's models to their own database beside its
    default one: the cursor moves in the database, and the transaction, the messages go
    to. It moved in the default database (which here holds hermes_orm's tables too): the
    rows in one, the cursor in the other, silently."""
    from sqlalchemy import create_engine

    from hermes_orm.models import Base

    app = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    upgrade(app)
    for where in (SessionStore(engine), SessionStore(app)):
        for sid in ("a", "b"):
            where.create_session(sid, source="app")
    with OrmSession(bind=app, binds={Base: engine}) as orm:
        orm.add_all(  # two sessions in one flush: both checked, then both moved
            [
                Message(session_id="a", role="user", content="to a"),
                Message(session_id="b", role="user", content="to b"),
                Message(session_id="a", role="assistant", content="again a"),
            ]
        )
        orm.commit()
    ours, theirs = SessionStore(engine), SessionStore(app)
    assert [m["content"] for m in ours.get_messages("a")] == ["to a", "again a"]
    assert [(s["flushed_idx"], s["message_count"]) for s in map(ours.get_session, "ab")] == [
        (2, 2),
        (1, 1),
    ]
    assert [
        (s["flushed_idx"], theirs.get_messages(s["id"])) for s in map(theirs.get_session, "ab")
    ] == [
        (0, []),
        (0, []),
    ]
    app.dispose()


def test_an_orm_session_that_splits_messages_and_sessions_between_databases_is_refused(
    engine: Engine, tmp_path: Any
) -> None:
    """A message and its session's cursor are written in one transaction: binds that put
    them in two databases are refused, before anything is written."""
    from sqlalchemy import create_engine

    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    upgrade(other)
    for where in (SessionStore(engine), SessionStore(other)):
        where.create_session("a", source="app")
    with OrmSession(binds={Message: engine, Session: other}) as orm:
        orm.add(Message(session_id="a", role="user", content="split"))
        with pytest.raises(InvalidArgumentError, match="binds hermes_orm's Message and Session"):
            orm.commit()
    for where in (SessionStore(engine), SessionStore(other)):
        assert where.get_messages("a") == []
        assert (where.get_session("a") or {})["flushed_idx"] == 0
    other.dispose()
