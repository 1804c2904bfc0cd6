"""The ORM unit of work: Message objects added in the app's own Session get idx and cursor."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

from hermes_orm import (
    InvalidMessageError,
    Message,
    Session,
    SessionNotFoundError,
    SessionStore,
    install_position_rule,
    remove_position_rule,
)


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
    finally:
        remove_position_rule(ours)
    store = SessionStore(engine)
    assert [m["content"] for m in store.get_messages("twice")] == ["hello", "hi"]
    session = store.get_session("twice")
    assert session is not None
    assert session["flushed_idx"] == 2
