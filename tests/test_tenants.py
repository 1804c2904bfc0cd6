"""A user-scoped store (``store.for_user(user_id)``) sees its user's sessions only.

Every public method of the view is tried on another user's session and on a
session of no user: each acts as if the session were not there, and the
session is left exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text

from hermes_orm import (
    InvalidSessionError,
    SessionExistsError,
    SessionNotFoundError,
    SessionStore,
)
from hermes_orm.async_store import AsyncUserStore
from hermes_orm.store import UserStore
from tests.conftest import count_rows, meanwhile, sync_engine, table_name


def _turn(n: int, word: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": f"{word} question {i}"}
        if i % 2 == 0
        else {"role": "assistant", "content": f"{word} answer {i}"}
        for i in range(n)
    ]


def _state(store: Any, session_id: str) -> tuple[Any, Any]:
    return store.get_session(session_id), store.get_messages(session_id)


@pytest.fixture
def others(store: SessionStore) -> dict[str, tuple[Any, Any]]:
    """Bob's session and a session of no user, each with messages, as they stand."""
    store.create_session("bob-1", source="cli", user_id="bob", title="bob's plans")
    store.flush("bob-1", _turn(4, "zanzibar"))
    store.create_session("nobody-1", source="cli")
    store.flush("nobody-1", _turn(2, "zanzibar"))
    return {sid: _state(store, sid) for sid in ("bob-1", "nobody-1")}


#: Every public name of a user-scoped store, and the tests below that try it.
_TRIED = {
    "create_session",
    "ensure_session",
    "get_session",
    "end_session",
    "delete_session",
    "list_sessions",
    "flush",
    "append",
    "get_messages",
    "search",
    "user_id",
    "schema",
    "forget_cursor",
    "flush_in",
}


@pytest.mark.parametrize("kind", [UserStore, AsyncUserStore])
def test_every_public_name_of_a_user_store_is_tried_here(kind: type) -> None:
    assert {name for name in dir(kind) if not name.startswith("_")} == _TRIED


def test_a_user_store_cannot_reach_another_users_session(
    store: SessionStore, others: dict[str, tuple[Any, Any]]
) -> None:
    alice = store.for_user("alice")
    alice.create_session("alice-1", source="cli", title="alice's plans")
    alice.flush("alice-1", _turn(2, "zanzibar"))
    for sid, (session, messages) in others.items():
        assert alice.get_session(sid) is None
        with pytest.raises(SessionNotFoundError):
            alice.get_messages(sid)
        with pytest.raises(SessionNotFoundError):
            alice.end_session(sid, "closed by alice")
        assert alice.delete_session(sid) is False
        # The very messages stored (the store remembers them, for its own scope
        # only), or a wrong guess of them, then a message that can be stored or
        # one that cannot: one refusal, so nothing tells a right guess.
        for history in (messages, _turn(len(messages), "guess")):
            for tail in ({"role": "user", "content": "mine now"}, {"role": "nobody"}):
                for verify in ("all", "last", "full"):
                    with pytest.raises(SessionNotFoundError):
                        alice.flush(sid, [*history, tail], verify=verify)
        with pytest.raises(SessionNotFoundError):
            alice.append(sid, {"role": "user", "content": "mine now"})
        with pytest.raises(SessionExistsError) as taken:
            alice.ensure_session(sid, source="cli", title="taken over")
        assert "another user" in str(taken.value)
        with pytest.raises(SessionExistsError):
            alice.create_session(sid, source="cli")
        with pytest.raises(InvalidSessionError, match="does not exist"):
            alice.create_session("alice-child", source="cli", parent_session_id=sid)
        alice.forget_cursor(sid)  # forgetting never reaches the database
        assert (store.get_session(sid), store.get_messages(sid)) == (session, messages)

    with pytest.raises(InvalidSessionError) as title:
        alice.create_session("alice-2", source="cli", title="bob's plans")
    assert "bob-1" not in str(title.value)
    # Asked with the id of the session holding it, the same refusal: which of
    # Bob's sessions holds the title is not told.
    for make in (alice.create_session, alice.ensure_session):
        with pytest.raises(InvalidSessionError) as same:
            make("bob-1", source="cli", title="bob's plans")
        assert str(same.value) == str(title.value)
    # Whether another user's session has a parent is not told either.
    store.create_session("bob-child", source="cli", user_id="bob", parent_session_id="bob-1")
    refused = set()
    for sid in ("bob-1", "bob-child"):
        with pytest.raises(InvalidSessionError) as missing:
            alice.ensure_session(sid, source="cli", parent_session_id="nowhere")
        refused.add(str(missing.value))
    assert refused == {"parent session 'nowhere' does not exist"}
    # Nor where another user's sessions lead: a parent of Alice's whose lineage runs
    # through Bob's (a session given to her), given with the id of one of those, is
    # refused as any taken id is.
    store.create_session("alice-fork", source="cli", user_id="alice", parent_session_id="bob-child")
    store.create_session("bob-3", source="cli", user_id="bob")  # (off that lineage)
    taken_ids = set()
    for sid in ("bob-1", "bob-child", "bob-3"):
        for make in (alice.create_session, alice.ensure_session):
            with pytest.raises(SessionExistsError) as held:
                make(sid, source="cli", parent_session_id="alice-fork")
            taken_ids.add((make.__name__, str(held.value).replace(sid, "ID")))
    assert len(taken_ids) == 2, taken_ids  # one refusal per method, whichever id
    store.delete_session("alice-fork")
    # ... and a session of no user, asked with its id or another one.
    store.create_session("nobody-2", source="cli", title="free plans")
    refusals = set()
    for sid in ("nobody-2", "alice-4"):
        with pytest.raises(InvalidSessionError) as taken_title:
            alice.create_session(sid, source="cli", title="free plans")
        refusals.add(str(taken_title.value))
    assert len(refusals) == 1
    with pytest.raises(InvalidSessionError, match="only that user's sessions"):
        alice.create_session("alice-3", source="cli", user_id="bob")
    assert alice.get_session("alice-2") is None is alice.get_session("alice-3")

    listed = alice.list_sessions()
    assert [s["id"] for s in listed.sessions] == ["alice-1"]
    assert alice.list_sessions(user_id="bob").sessions == []
    assert [s["id"] for s in alice.list_sessions(user_id="alice").sessions] == ["alice-1"]

    hits = alice.search("zanzibar")
    assert {h.session_id for h in hits.hits} == {"alice-1"}
    assert alice.search("zanzibar", user_id="bob").hits == []
    assert alice.search("zanzibar", session_id="bob-1").hits == []
    assert len(store.search("zanzibar").hits) == 8  # all of it is there to find


def test_an_empty_filter_of_another_user_still_checks_the_query(store: SessionStore) -> None:
    from hermes_orm import SearchQueryError

    with pytest.raises(SearchQueryError):
        store.for_user("alice").search("   ", user_id="bob")


@pytest.mark.apis("sync")
def test_flush_in_a_transaction_of_a_user_store_sees_only_its_user(
    store: SessionStore, others: dict[str, tuple[Any, Any]]
) -> None:
    alice = store.for_user("alice")
    messages = others["bob-1"][1]
    with pytest.raises(SessionNotFoundError):
        store.write_transaction(
            lambda conn: alice.flush_in(
                conn, "bob-1", [*messages, {"role": "user", "content": "x"}]
            )
        )
    assert store.get_messages("bob-1") == messages


def test_a_user_store_does_everything_on_its_own_sessions(store: SessionStore) -> None:
    alice = store.for_user("alice")
    assert alice.user_id == "alice"
    assert alice.schema == store.schema  # the view's tables are its store's
    assert alice.ensure_session("a1", source="cli") is True
    assert alice.ensure_session("a1", source="cli", model="m") is False
    created = alice.create_session("a2", source="web", parent_session_id="a1", title="t")
    assert created["user_id"] == "alice" == store.get_session("a1")["user_id"]
    assert store.get_session("a1")["model"] == "m"

    messages = _turn(3, "quokka")
    assert alice.flush("a1", messages).written == 3
    assert alice.append("a1", {"role": "user", "content": "quokka again"}) == 3
    messages = alice.get_messages("a1")
    assert alice.flush("a1", [*messages, {"role": "assistant", "content": "ok"}]).written == 1
    assert alice.get_messages("a1", offset=3, limit=1) == [messages[3]]
    assert [h.idx for h in alice.search("quokka", session_id="a1").hits] == [3, 2, 1, 0]

    page = alice.list_sessions(limit=1)
    rest = alice.list_sessions(limit=1, cursor=page.next_cursor)
    assert {s["id"] for s in page.sessions + rest.sessions} == {"a1", "a2"}
    assert alice.list_sessions(source="web").sessions[0]["id"] == "a2"

    alice.end_session("a2", "done")
    assert store.get_session("a2")["end_reason"] == "done"
    assert alice.delete_session("a2") is True
    assert store.get_session("a2") is None
    assert store.get_session("a1")["message_count"] == 5


def test_a_session_given_to_another_user_is_no_longer_written(store: SessionStore) -> None:
    """The cursor the view remembers is checked with its owner, in the database."""
    alice = store.for_user("alice")
    alice.create_session("a1", source="cli")
    messages = _turn(2, "w")
    alice.flush("a1", messages)
    with sync_engine(store).begin() as conn:
        conn.execute(text("UPDATE hermes_sessions SET user_id = 'bob' WHERE id = 'a1'"))
    with pytest.raises(SessionNotFoundError):
        alice.flush("a1", [*messages, {"role": "user", "content": "after the move"}])
    with pytest.raises(SessionNotFoundError):
        alice.append("a1", {"role": "user", "content": "after the move"})
    assert count_rows(sync_engine(store), "hermes_messages", session_id="a1") == 2
    assert store.for_user("bob").get_messages("a1") == messages


@contextlib.contextmanager
def _statements(store: Any) -> Iterator[list[str]]:
    """The statements ``store``'s engine runs inside the block."""
    from sqlalchemy import event

    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)


def test_views_share_what_the_store_remembers(store: SessionStore) -> None:
    """A view made per request still flushes on the remembered cursor (no locked read)."""
    store.create_session("a1", source="cli", user_id="alice")
    messages = _turn(2, "w")
    store.for_user("alice").flush("a1", messages)
    with _statements(store) as statements:
        store.for_user("alice").flush("a1", [*messages, {"role": "user", "content": "3"}])
    assert not [
        s for s in statements if s.lstrip().upper().startswith("SELECT") and "set_config" not in s
    ]
    # The cursor's compare-and-swap (alone, or in the one statement of a PostgreSQL flush).
    assert any("UPDATE hermes_sessions" in s and "user_id = " in s for s in statements)


def test_a_store_and_its_users_view_take_turns_on_the_remembered_cursor(
    store: SessionStore,
) -> None:
    """A session flushed by the store and by its owner's view in turns: no locked read."""
    store.create_session("a1", source="cli", user_id="alice")
    messages = _turn(2, "w")
    store.flush("a1", messages)
    with _statements(store) as statements:
        for n in range(4):
            messages = [*messages, {"role": "user", "content": f"turn {n}"}]
            flusher = store.for_user("alice") if n % 2 == 0 else store
            assert flusher.flush("a1", messages).written == 1
    assert not [s for s in statements if "digest" in s and s.lstrip().upper().startswith("SELECT")]
    assert store.get_messages("a1") == messages


@pytest.mark.parametrize("user_id", [None, "", 5, "nul\x00", "\ud800", "u" * 513])
def test_a_user_store_needs_a_user_id_a_database_can_compare(
    store: SessionStore, user_id: Any
) -> None:
    with pytest.raises(InvalidSessionError):
        store.for_user(user_id)


@pytest.mark.apis("sync")  # (the hook runs another store's calls inside this one's statement)
def test_a_session_given_away_between_check_and_read_yields_nothing(store: SessionStore) -> None:
    """The owner is checked by the statement that reads the messages, not one before it."""
    from sqlalchemy import event

    from tests.conftest import fresh_store

    store.create_session("t1", source="cli", user_id="alice")
    alice = store.for_user("alice")
    other = fresh_store(store)
    fired: list[int] = []

    def give_away(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if statement.lstrip().startswith("SELECT extra") and not fired:
            fired.append(1)  # another process gives the session to bob, who writes
            with sync_engine(other).begin() as conn:
                conn.execute(text("UPDATE hermes_sessions SET user_id = 'bob' WHERE id = 't1'"))
            other.flush("t1", [{"role": "user", "content": "bob's secret"}])

    event.listen(store.engine, "before_cursor_execute", give_away)
    try:
        with pytest.raises(SessionNotFoundError):
            alice.get_messages("t1")
    finally:
        event.remove(store.engine, "before_cursor_execute", give_away)
    assert fired == [1]


def _give_to_bob(engine: Engine, session_id: str) -> int:
    """Another process gives ``session_id`` to bob; how many rows it changed."""
    sessions = table_name(engine, "hermes_sessions")
    with engine.begin() as conn:
        return int(
            conn.execute(
                text(f"UPDATE {sessions} SET user_id = 'bob' WHERE id = :id"), {"id": session_id}
            ).rowcount
        )


def _picked(statement: str) -> bool:
    """The statement of a view that picks its session (``id`` and ``user_id``) first."""
    return statement.lstrip().startswith("SELECT hermes_sessions.id \nFROM hermes_sessions")


def test_a_view_deletes_no_session_given_to_another_user_meanwhile(engine: Engine) -> None:
    """Given to bob once alice's view picked it: either bob got it first, and the view
    deletes nothing, or the view's delete goes first (it holds the row), and bob's
    change finds nothing; never bob's session deleted."""
    store = SessionStore(engine)
    store.create_session("d", source="cli", user_id="alice")
    with meanwhile(engine, _picked, lambda: _give_to_bob(engine, "d")) as bob:
        deleted = store.for_user("alice").delete_session("d")
    assert bob.error is None
    if bob.first:
        assert deleted is False
        assert store.get_session("d")["user_id"] == "bob"  # type: ignore[index]
    else:
        assert deleted is True
        assert (bob.result, store.get_session("d")) == (0, None)
