"""Invariant 6: what goes in comes out; bad input is refused before anything is written."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text as sql_text

from hermes_orm import DatabaseError, InvalidMessageError, SessionNotFoundError, SessionStore
from hermes_orm._codec import BOOL_KEYS, JSON_KEYS, ROLES, TEXT_KEYS, message_digest
from tests.conftest import count_rows, sync_engine, table_name

_ids = itertools.count()
KNOWN = {"role", "content", "token_count", "timestamp", *TEXT_KEYS, *JSON_KEYS, *BOOL_KEYS}

# Any text UTF-8 can carry (no lone surrogates); NUL included, which PostgreSQL
# text cannot hold: such values are kept in the extra JSON.
text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
parts = st.lists(
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": text}),
        st.fixed_dictionaries(
            {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": text})}
        ),
    ),
    max_size=3,
)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {
            "id": text,
            "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": text, "arguments": text}),
        }
    ),
    max_size=3,
)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": draw(st.sampled_from(sorted(ROLES)))}
    if draw(st.booleans()):
        msg["content"] = draw(st.none() | text | parts)
    for key in TEXT_KEYS:
        if draw(st.integers(0, 4)) == 0:
            msg[key] = draw(st.none() | text)
    if draw(st.booleans()):
        msg["tool_calls"] = draw(st.none() | tool_calls)
    for key in JSON_KEYS[1:]:
        if draw(st.integers(0, 5)) == 0:
            msg[key] = draw(json_values)
    for key in BOOL_KEYS:
        if draw(st.integers(0, 5)) == 0:
            msg[key] = draw(st.none() | st.booleans())
    if draw(st.booleans()):
        msg["token_count"] = draw(st.none() | st.integers(-(2**63), 2**63 - 1))
    if draw(st.booleans()):
        msg["timestamp"] = draw(st.floats(0, 4e9) | st.integers(0, 4_000_000_000))
    extra = draw(st.dictionaries(text.filter(lambda k: k not in KNOWN), json_values, max_size=3))
    msg.update(extra)
    if draw(st.booleans()):  # keys in any order, role anywhere
        msg = {key: msg[key] for key in draw(st.permutations(list(msg)))}
    return msg


HYPOTHESIS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@HYPOTHESIS
@given(batch=st.lists(messages(), min_size=1, max_size=4))
def test_round_trip(store: SessionStore, batch: list[dict[str, Any]]) -> None:
    sid = f"rt-{next(_ids)}"
    store.create_session(sid, source="test")
    assert store.flush(sid, batch).written == len(batch)
    back = store.get_messages(sid)
    assert back == batch
    assert [list(m) for m in back] == [list(m) for m in batch]  # keys in their order
    # read back, the dicts continue the stored history (same digests)
    assert store.flush(sid, back, verify="full").written == 0


class Opaque:
    pass


def cycle() -> list[Any]:
    """A list that holds itself: JSON cannot write it."""
    loop: list[Any] = []
    loop.append(loop)
    return loop


BAD_VALUES: list[tuple[Any, str | None]] = [
    ("not a dict", None),
    ({"content": "no role"}, "role"),
    ({"role": "wizard", "content": "x"}, "role"),
    ({"role": 3, "content": "x"}, "role"),
    ({"role": "user", "content": b"bytes"}, "content"),
    ({"role": "user", "content": {"a": 1}}, "content"),
    ({"role": "user", "content": "lone \ud800 surrogate"}, "content"),
    ({"role": "user", "content": [{"type": "text", "text": math.nan}]}, "content"),
    ({"role": "user", "content": "x", "tool_calls": ({"id": 1},)}, "tool_calls"),
    ({"role": "user", "content": "x", "tool_calls": [{1: "int key"}]}, "tool_calls"),
    ({"role": "user", "content": "x", "tool_call_id": 7}, "tool_call_id"),
    ({"role": "user", "content": "x", "token_count": "7"}, "token_count"),
    ({"role": "user", "content": "x", "token_count": 2**64}, "token_count"),
    ({"role": "user", "content": "x", "token_count": True}, "token_count"),
    ({"role": "user", "content": "x", "timestamp": "2024-01-01"}, "timestamp"),
    ({"role": "user", "content": "x", "timestamp": math.inf}, "timestamp"),
    ({"role": "user", "content": "x", "observed": 1}, "observed"),
    ({"role": "user", "content": "x", "custom": {1, 2}}, "custom"),
    ({"role": "user", "content": "x", "custom": Opaque()}, "custom"),
    ({"role": "user", "content": "x", "custom": cycle()}, "custom"),
    ({"role": "user", "content": "x", "tool_calls": [{"args": cycle()}]}, "tool_calls"),
    ({"role": "user", "content": "x", 5: "int key"}, None),
    ({"role": "user", "content": "x", ("a",): "tuple key"}, None),
    ({"role": "user", "content": "x", None: None}, None),
]


@pytest.mark.parametrize(("bad", "key"), BAD_VALUES)
def test_bad_message_is_refused_before_writing(
    store: SessionStore, bad: Any, key: str | None
) -> None:
    store.create_session("s", source="test")
    good = {"role": "user", "content": "fine"}
    with pytest.raises(InvalidMessageError) as err:
        store.flush("s", [good, bad])
    assert err.value.index == 1
    assert err.value.key == key
    assert "nothing was written" in str(err.value)
    with pytest.raises(InvalidMessageError):
        store.append("s", bad)
    assert count_rows(sync_engine(store), "hermes_messages") == 0
    session = store.get_session("s")
    assert session is not None
    assert session["flushed_idx"] == 0


@pytest.mark.parametrize("bad", ["a string", b"bytes", {"role": "user"}, 42])
def test_messages_must_be_a_list(store: SessionStore, bad: Any) -> None:
    store.create_session("s", source="test")
    with pytest.raises(InvalidMessageError):
        store.flush("s", bad)


@HYPOTHESIS
@given(junk=st.lists(st.one_of(json_values, messages()), min_size=1, max_size=3))
def test_arbitrary_input_is_stored_exactly_or_refused_whole(
    store: SessionStore, junk: list[Any]
) -> None:
    sid = f"junk-{next(_ids)}"
    store.create_session(sid, source="test")
    try:
        store.flush(sid, junk)
    except InvalidMessageError:
        assert store.get_messages(sid) == []
    else:
        assert store.get_messages(sid) == junk


def test_get_messages_pages_by_idx(store: SessionStore) -> None:
    store.create_session("s", source="test")
    msgs = [{"role": "user", "content": str(i)} for i in range(10)]
    store.flush("s", msgs)
    assert store.get_messages("s", offset=3, limit=4) == msgs[3:7]
    assert store.get_messages("s", offset=8) == msgs[8:]
    assert store.get_messages("s", limit=0) == []
    assert store.get_messages("s", offset=20) == []
    # Bounds past idx's 32 bits (asyncpg types a parameter as its column).
    assert store.get_messages("s", offset=8, limit=2**63 - 9) == msgs[8:]
    assert store.get_messages("s", limit=2**31) == msgs
    assert store.get_messages("s", offset=2**31) == []
    with pytest.raises(ValueError, match="offset"):
        store.get_messages("s", offset=-1)
    with pytest.raises(SessionNotFoundError):
        store.get_messages("missing")


def test_json_numbers_keep_their_type(store: SessionStore) -> None:
    """1e300 and 0.0 stay floats, big ints stay ints, on both backends."""
    store.create_session("s", source="test")
    msg = {
        "role": "assistant",
        "content": None,
        "codex_message_items": 0.0,
        "reasoning_details": [1e300, 2**70, -0.5, True],
        "custom": {"n": 1.0},
    }
    store.flush("s", [msg])
    (back,) = store.get_messages("s")
    assert repr(back["codex_message_items"]) == "0.0"
    assert [type(v) for v in back["reasoning_details"]] == [float, int, float, bool]
    assert repr(back["custom"]["n"]) == "1.0"


def test_nul_characters_are_stored_losslessly(store: SessionStore) -> None:
    """Binary tool output with NUL bytes must not make a session unflushable."""
    store.create_session("s", source="test")
    msgs = [
        {"role": "tool", "content": "binary \x00 output", "tool_call_id": "c\x00", "n": "\x00"},
        {"role": "user", "content": "a literal \\u0000 is six characters", "k": ["\\u0000"]},
        {"role": "user", "content": [{"type": "text", "text": "part \x00"}], "k\x00": 1},
    ]
    store.flush("s", msgs)
    back = store.get_messages("s")
    assert back == msgs
    assert store.flush("s", back, verify="full").written == 0


class _Hiding(dict):  # type: ignore[type-arg]
    """A dict whose keys(), items() and iteration leave one of its keys out."""

    def keys(self) -> Any:
        return [k for k in dict.keys(self) if k != "hidden"]

    def items(self) -> Any:
        return [(k, self[k]) for k in self.keys()]

    def __iter__(self) -> Any:
        return iter(self.keys())


def test_a_dict_subclass_is_stored_as_the_dict_it_holds(store: SessionStore) -> None:
    """What == compares is stored, whatever the subclass's keys() or items() say."""
    store.create_session("s", source="test")
    msg = _Hiding(role="user", content="a", hidden=1)
    assert store.flush("s", [msg]).written == 1
    assert store.get_messages("s") == [msg]
    assert store.get_messages("s")[0]["hidden"] == 1
    assert store.flush("s", [msg, {"role": "user", "content": "b"}]).written == 1


def test_messages_keep_their_key_order_at_every_level(store: SessionStore) -> None:
    """Read back byte for byte: a message re-sent to an API serializes the same."""
    store.create_session("s", source="test")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msg = {"role": "assistant", "content": None, "tool_calls": [call], "zeta": {"b": 1, "a": 2}}
    tool = {"role": "tool", "tool_call_id": "c1", "content": "done", "timestamp": 5}
    reordered = {"zeta": None, "content": "hi", "token_count": None, "role": "user"}
    store.flush("s", [msg, tool, reordered])
    back = store.get_messages("s")
    assert list(back[0]["tool_calls"][0]) == ["id", "type", "function"]
    assert list(back[0]["zeta"]) == ["b", "a"]
    assert [list(m) for m in back] == [list(m) for m in (msg, tool, reordered)]


def test_messages_in_the_usual_order_store_no_key_order(store: SessionStore) -> None:
    """The read order is that of agents' messages: only others pay for keeping theirs."""
    from hermes_orm._codec import MESSAGE_FIELDS as _FIELDS

    assert sorted(_FIELDS) == sorted(
        (*TEXT_KEYS, *JSON_KEYS, *BOOL_KEYS, "token_count", "timestamp")
    )
    store.create_session("s", source="test")
    usual = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "reasoning": "think",
            "finish_reason": "tool_calls",
            "reasoning_content": "think",
            "tool_calls": [{"id": "c1"}],
        },
        {"role": "assistant", "content": "ok", "tool_calls": [], "custom": 1},
    ]
    store.flush("s", [*usual, {"role": "tool", "tool_call_id": "c1", "content": "x"}])
    with sync_engine(store).connect() as conn:
        orders = conn.execute(
            sql_text("SELECT key_order FROM hermes_messages WHERE session_id = 's' ORDER BY idx")
        ).scalars()
        assert [o is None for o in orders] == [True, True, True, False]


# Digests of these messages as every release since migration 0006 stores them. A
# database holds them in flushed_digest and in each message row: if the digest
# changed without a migration rewriting them, its sessions would no longer continue.
# (0006 rewrote the digests of messages holding JSON documents; LEGACY_DIGESTS are
# the ones before it.)
STORED_DIGESTS: list[tuple[dict[str, Any], str]] = [
    (
        {"role": "user", "content": "héllo 世界", "timestamp": 1760000000.5},
        "8f873d04d0be58b49e9fa0cc022ed7bf",
    ),
    (
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "terminal", "arguments": '{"cmd": "ls"}'},
                }
            ],
            "reasoning": "think",
            "finish_reason": "tool_calls",
            "token_count": 42,
            "observed": True,
        },
        "e15837dc9b594577fc59106a4b8b69cb",
    ),
    (
        {
            "role": "tool",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "data:,"}},
            ],
            "tool_call_id": "c1",
            "tool_name": "terminal\x00x",
            "custom": {"k": [1, 2.5, None]},
        },
        "5f23abb9715289eeceeaf5e1e3224175",
    ),
]
#: The same messages' digests as releases before migration 0006 stored them.
LEGACY_DIGESTS = [
    "8f873d04d0be58b49e9fa0cc022ed7bf",
    "9c32934a5e83163c18e4ff7aad46e93e",
    "e6525a8bf8496cce9bd4d9728e489aec",
]


@pytest.mark.parametrize(("message", "digest"), STORED_DIGESTS)
def test_digests_do_not_change_between_releases(message: dict[str, Any], digest: str) -> None:
    assert message_digest(message).hex() == digest


def _read_with_no_decoder_yet(
    store: SessionStore, session_id: str, batch: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Flush ``batch``, forget every decoder, and read it back: equal, keys in their order."""
    from hermes_orm import _codec

    store.flush(session_id, batch)
    _codec._DECODERS.clear()
    _codec._GUESSES.clear()
    back = store.get_messages(session_id)
    assert back == batch
    assert [list(m) for m in back] == [list(m) for m in batch]
    return back


def test_messages_alike_are_read_by_one_decoder(store: SessionStore) -> None:
    """Rows with the same columns and key order share a decoder; others get their own."""
    from hermes_orm import _codec

    sid = f"shapes-{next(_ids)}"
    store.create_session(sid, source="test")
    asked = [{"role": "user", "content": f"q{i}", "timestamp": 1.5 + i} for i in range(40)]
    answered = [{"content": f"a{i}", "role": "assistant", "observed": True} for i in range(40)]
    batch = [m for pair in zip(asked, answered, strict=True) for m in pair]
    back = _read_with_no_decoder_yet(store, sid, batch)
    assert back[1]["observed"] is True
    assert len(_codec._DECODERS) == len(_codec._GUESSES) == 2


def test_rows_of_as_many_nulls_but_other_columns_read_as_written(store: SessionStore) -> None:
    """Shapes with the same number of NULLs and key order, in turn, each read as flushed.

    A row's decoder is guessed from its NULLs' number and its key order; a
    row the guess does not fit (other columns hold its values) is found.
    """
    from hermes_orm import _codec

    sid = f"same-nulls-{next(_ids)}"
    store.create_session(sid, source="test")
    call = {"id": "c1", "type": "function", "function": {"name": "t", "arguments": "{}"}}
    shapes = [
        {"role": "assistant", "content": "a", "tool_calls": [call], "finish_reason": "tool_calls"},
        {"role": "assistant", "content": "b", "reasoning": "r", "finish_reason": "stop"},
        {"role": "tool", "content": "c", "tool_call_id": "c1", "tool_name": "t"},
        {"role": "tool", "content": "", "tool_name": "t", "observed": False},
        {"role": "user", "content": [{"type": "text", "text": "d"}], "timestamp": 1.5},
        {"role": "user", "content": "e", "active": True},
    ]
    _read_with_no_decoder_yet(store, sid, [shapes[i % len(shapes)] for i in range(24)])
    # Shapes of one key taking turns keep their decoders side by side.
    assert sorted(map(len, _codec._GUESSES.values())) == [1, 2, 3]


def test_an_applications_row_factory_is_read_through(tmp_path: Any) -> None:
    """An engine whose sqlite3 connections return ``sqlite3.Row`` reads messages as any other."""
    import sqlite3

    from sqlalchemy import create_engine, event

    engine = create_engine(f"sqlite:///{tmp_path / 'rows.db'}")

    @event.listens_for(engine, "connect")
    def rows_by_name(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.row_factory = sqlite3.Row

    store = SessionStore(engine)
    store.upgrade()
    sid = f"row-factory-{next(_ids)}"
    store.create_session(sid, source="test")
    batch = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function"}]},
    ]
    store.flush(sid, batch)
    assert store.get_messages(sid) == batch
    engine.dispose()


def test_json_text_written_by_another_client_reads_as_its_value(
    store: SessionStore, engine: Any
) -> None:
    """JSON another client wrote with spaces, escapes and key order of its own reads as its value.

    The store writes compact JSON and reads it as text on both backends;
    text in any other valid form is parsed whole.
    """
    sid = f"json-text-{next(_ids)}"
    store.create_session(sid, source="test")
    call = {"id": "c1", "type": "function", "function": {"name": "t", "arguments": "{}"}}
    store.flush(sid, [{"role": "assistant", "content": "hi", "tool_calls": [call]}] * 3)
    table = table_name(engine, "hermes_messages")
    written = {
        0: ' [ {"id" : "c\\u00e9", "function": {"name": "t"}} ] ',
        1: '[{"id":"c2"}]\n',
    }
    with engine.begin() as conn:
        for idx, value in written.items():
            conn.execute(
                sql_text(f"UPDATE {table} SET tool_calls = :v WHERE session_id = :s AND idx = :i"),
                {"v": value, "s": sid, "i": idx},
            )
    back = store.get_messages(sid)
    assert [m["tool_calls"] for m in back] == [
        [{"id": "c\u00e9", "function": {"name": "t"}}],
        [{"id": "c2"}],
        [call],
    ]


def test_a_json_null_written_by_another_client_reads_as_no_key(
    store: SessionStore, engine: Any
) -> None:
    """A JSON column holding JSON null (not SQL NULL) reads back as the key left out."""
    sid = f"json-null-{next(_ids)}"
    store.create_session(sid, source="test")
    call = {"id": "c1", "type": "function", "function": {"name": "t", "arguments": "{}"}}
    store.flush(sid, [{"role": "assistant", "content": "hi", "tool_calls": [call]}] * 2)
    table = table_name(engine, "hermes_messages")
    with engine.begin() as conn:
        conn.execute(
            sql_text(f"UPDATE {table} SET tool_calls = 'null' WHERE session_id = :s AND idx = 0"),
            {"s": sid},
        )
    back = store.get_messages(sid)
    assert back == [
        {"role": "assistant", "content": "hi"},
        {"role": "assistant", "content": "hi", "tool_calls": [call]},
    ]


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("tool_calls", "[" * 5000 + "]" * 5000),  # JSON nested deeper than Python reads
        ("key_order", "[" * 5000 + "]" * 5000),
        ("key_order", "{}"),
        ("key_order", '{"content": 0, "role": 1}'),
        ("key_order", '""'),
        ("key_order", '["role", "zzz"]'),
        ("extra", '["ab"]'),
        ("extra", "0"),
    ],
)
def test_a_row_other_sql_damaged_is_a_database_error(
    store: SessionStore, engine: Any, column: str, value: str
) -> None:
    """A value no message is made of, read back, raises DatabaseError naming its place."""
    sid = f"damaged-{next(_ids)}"
    store.create_session(sid, source="test")
    call = {"id": "c1", "type": "function", "function": {"name": "t", "arguments": "{}"}}
    store.flush(sid, [{"role": "assistant", "content": "hi", "tool_calls": [call]}])
    table = table_name(engine, "hermes_messages")
    with engine.begin() as conn:
        conn.execute(
            sql_text(f"UPDATE {table} SET {column} = :v WHERE session_id = :s"),
            {"v": value, "s": sid},
        )
    with pytest.raises(DatabaseError, match="the message at position 0 holds a value that cannot"):
        store.get_messages(sid)


@pytest.mark.backends("sqlite")  # (PostgreSQL's boolean column holds nothing else)
@pytest.mark.parametrize("value", ["false", "no", 2, b"\x00"])
def test_a_boolean_column_other_sql_gave_another_value_is_a_database_error(
    store: SessionStore, engine: Any, value: Any
) -> None:
    """SQLite keeps what it is given: read as a truth value, text ``'false'`` came back
    True, and verify --repair digested the message so misread."""
    sid = f"flag-{next(_ids)}"
    store.create_session(sid, source="test")
    store.flush(sid, [{"role": "user", "content": "hi", "observed": False}])
    with engine.begin() as conn:
        conn.execute(
            sql_text("UPDATE hermes_messages SET observed = :v WHERE session_id = :s"),
            {"v": value, "s": sid},
        )
    with pytest.raises(DatabaseError, match=r"position 0 .* the column observed holds"):
        store.get_messages(sid)


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("value", ["false", 2])
def test_the_models_read_a_boolean_column_holding_another_value_as_damage(
    store: SessionStore, engine: Any, value: Any
) -> None:
    """The ORM and Core reads of the models (``Message.to_dict()``, the Hermes
    adapter) took SQLite's ``'false'`` for True too, through SQLAlchemy's Boolean."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session as OrmSession

    from hermes_orm.models import Message, Session

    sid = f"orm-flag-{next(_ids)}"
    store.create_session(sid, source="test")
    store.flush(sid, [{"role": "user", "content": "hi", "observed": False}])
    with OrmSession(engine) as orm:
        assert orm.scalars(select(Message)).one().to_dict()["observed"] is False
        assert orm.get(Session, sid).archived is False  # type: ignore[union-attr]
    with engine.begin() as conn:
        conn.execute(
            sql_text("UPDATE hermes_messages SET observed = :v WHERE session_id = :s"),
            {"v": value, "s": sid},
        )
        conn.execute(
            sql_text("UPDATE hermes_sessions SET archived = :v WHERE id = :s"),
            {"v": value, "s": sid},
        )
    with OrmSession(engine) as orm:
        with pytest.raises(DatabaseError, match=f"the column observed holds {value!r}, not a"):
            orm.scalars(select(Message).where(Message.session_id == sid)).one()
        with pytest.raises(DatabaseError, match=f"the column archived holds {value!r}, not a"):
            orm.get(Session, sid)


def test_keys_a_key_order_set_by_other_sql_leaves_out_are_read_after_it(
    store: SessionStore, engine: Any
) -> None:
    """A value is never dropped for want of its place in ``key_order``: it comes after."""
    sid = f"order-short-{next(_ids)}"
    store.create_session(sid, source="test")
    store.flush(sid, [{"content": "hi", "role": "user", "timestamp": 1.5}])
    table = table_name(engine, "hermes_messages")
    with engine.begin() as conn:
        conn.execute(
            sql_text(f"UPDATE {table} SET key_order = :v WHERE session_id = :s"),
            {"v": '["timestamp"]', "s": sid},
        )
    (back,) = store.get_messages(sid)
    assert list(back.items()) == [("timestamp", 1.5), ("role", "user"), ("content", "hi")]


@pytest.mark.postgresql
def test_reads_keep_the_statements_psycopg_prepared(empty_pg: str) -> None:
    """psycopg prepares a statement a connection runs again and again (parsed and
    planned once); a store's reads end with COMMIT, as at a ROLLBACK psycopg
    forgets every statement it prepared."""
    from hermes_orm import create_store_engine

    engine = create_store_engine(empty_pg, pool_size=1, max_overflow=0)
    store = SessionStore(engine)
    store.upgrade()
    store.create_session("s", source="cli")
    history = [{"role": "user", "content": f"m{i}"} for i in range(3)]
    store.flush("s", history)
    for _ in range(8):
        assert store.get_messages("s") == history
        assert [hit.idx for hit in store.search("m1").hits] == [1]
    store.close()  # its connection back in the pool of one
    with engine.connect() as conn:
        prepared = conn.exec_driver_sql("SELECT statement FROM pg_prepared_statements").all()
    statements = " ".join(row[0] for row in prepared)
    assert "hermes_search_body" in statements, statements  # the search
    assert "WHERE session_id = $1 AND EXISTS" in statements, statements  # get_messages
    engine.dispose()
