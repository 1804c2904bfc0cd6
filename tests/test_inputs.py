"""Hostile input: every call does exactly what it says or raises a typed error, writing nothing.

Each class of input the store takes (session ids, session fields, filters,
search queries, numbers, nesting, URLs) is tried on both backends and both
APIs; open classes (any string) are tried property-based.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hermes_orm
from hermes_orm import (
    HermesOrmError,
    InvalidMessageError,
    InvalidSessionError,
    InvalidURLError,
    SearchQueryError,
    SessionStore,
    UnsupportedBackendError,
)
from hermes_orm._dialects import normalize_url
from tests.conftest import count_rows, sync_engine

_ids = itertools.count()
#: Strings of every kind a caller may pass: lone surrogates and NUL among them.
hostile_text = st.text(
    st.one_of(
        st.characters(),
        st.sampled_from(["\ud800", "\udfff", "\x00", "\U0001f600", "é", "%", "_", "'", '"']),
    ),
    max_size=30,
)
_SLOW = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _rows(store: Any) -> tuple[int, int]:
    engine = sync_engine(store)
    return count_rows(engine, "hermes_sessions"), count_rows(engine, "hermes_messages")


@_SLOW
@given(session_id=hostile_text)
def test_any_session_id_is_stored_exactly_or_refused(store: SessionStore, session_id: str) -> None:
    before = _rows(store)
    try:
        store.create_session(session_id, source="cli")
    except InvalidSessionError:
        assert _rows(store) == before
        for call in (
            lambda: store.get_session(session_id),
            lambda: store.flush(session_id, []),
            lambda: store.append(session_id, {"role": "user", "content": "x"}),
            lambda: store.get_messages(session_id),
            lambda: store.end_session(session_id, "done"),
            lambda: store.delete_session(session_id),
        ):
            with pytest.raises(InvalidSessionError):
                call()
        assert _rows(store) == before
        return
    session = store.get_session(session_id)
    assert session is not None
    assert session["id"] == session_id
    store.delete_session(session_id)


@_SLOW
@given(value=hostile_text)
def test_any_text_field_and_filter_is_stored_exactly_or_refused(
    store: SessionStore, value: str
) -> None:
    sid = f"f{next(_ids)}"
    before = _rows(store)
    try:
        store.create_session(sid, source=value, user_id=value, model=value, title=f"t{sid}{value}")
    except InvalidSessionError:
        assert _rows(store) == before
        with pytest.raises(InvalidSessionError):
            store.list_sessions(source=value)
        with pytest.raises(SearchQueryError):
            store.search("hello", source=value)
        return
    session = store.get_session(sid)
    assert session is not None
    assert (session["source"], session["user_id"], session["model"]) == (value, value, value)
    assert [s["id"] for s in store.list_sessions(source=value, user_id=value).sessions] == [sid]
    store.search("hello", source=value, user_id=value, session_id=sid)


@_SLOW
@given(query=hostile_text)
def test_any_search_query_finds_or_is_refused(store: SessionStore, query: str) -> None:
    try:
        page = store.search(query)
    except SearchQueryError:
        return
    assert page.hits == [] or all(hit.session_id for hit in page.hits)


@pytest.mark.parametrize("words", [100, 300, 680])
@pytest.mark.parametrize(
    "form", ["words", "alternatives", "phrase", "exclusions", "prefixes", "one long word"]
)
def test_long_queries_find_or_are_refused(store: SessionStore, words: int, form: str) -> None:
    """Up to the length limit, a query of many terms runs on both backends, or is refused."""
    store.create_session("q", source="cli")
    terms = [f"w{i}" for i in range(words)]
    text = " ".join(terms)
    store.flush("q", [{"role": "user", "content": f"{text} needle"}])
    query = {
        "words": text,
        "alternatives": " OR ".join(terms),
        "phrase": f'"{text}"',
        "exclusions": " ".join(f"-x{t}" for t in terms) + " needle",
        "prefixes": " ".join(f"{t}*" for t in terms),
        "one long word": "w" * 2048,
    }[form]
    try:
        page = store.search(query)
    except SearchQueryError:  # typed: what any other error would not be
        return
    if form != "one long word":
        assert [hit.session_id for hit in page.hits] == ["q"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input_tokens", 2**63),
        ("input_tokens", -(2**63) - 1),
        ("api_call_count", 2**70),
        ("started_at", 10**400),
        ("estimated_cost_usd", -(10**400)),
    ],
)
def test_session_numbers_beyond_the_columns_are_refused(
    store: SessionStore, field: str, value: int
) -> None:
    before = _rows(store)
    with pytest.raises(InvalidSessionError):
        store.create_session(f"n{next(_ids)}", source="cli", **{field: value})
    assert _rows(store) == before


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": "x", "timestamp": 10**400},
        {"role": "user", "content": "x", "timestamp": -(10**400)},
        {"role": "user", "content": "x", "token_count": 2**63},
        {"role": 2**70, "content": "x"},
        {"role": "user", "content": "x\ud800"},
        {"role": "user", "content": "x", "custom": "\udfff"},
        {"role": "user", "content": "x", "\ud800": 1},
    ],
)
def test_message_values_beyond_what_is_stored_are_refused(
    store: SessionStore, message: dict[str, Any]
) -> None:
    store.create_session("m", source="cli")
    before = _rows(store)
    with pytest.raises(InvalidMessageError):
        store.flush("m", [message])
    assert _rows(store) == before


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("content", "x\ud800"),
        ("content", [{"type": "text", "text": "\udfff"}]),
        ("tool_call_id", "c\ud800"),
        ("custom", {"nested": ["\udbff"]}),
        ("\ud800", 1),
    ],
)
def test_a_lone_surrogate_is_refused_naming_its_key(
    store: SessionStore, key: str, value: Any
) -> None:
    store.create_session("m", source="cli")
    message = {"role": "tool", "content": "x", "tool_name": "t", key: value}
    with pytest.raises(InvalidMessageError, match="lone surrogate") as err:
        store.flush("m", [{"role": "user", "content": "fine"}, message])
    assert (err.value.index, err.value.key) == (1, key)
    assert store.get_messages("m") == []


@pytest.mark.parametrize("where", ["extra", "model_config"])
def test_a_session_int_json_cannot_carry_is_refused_by_name(
    store: SessionStore, where: str
) -> None:
    """An int of more digits than Python writes as text (``sys.get_int_max_str_digits``)."""
    before = _rows(store)
    with pytest.raises(InvalidSessionError, match=f"'{where}'.*more digits"):
        store.create_session(f"n{next(_ids)}", source="cli", **{where: {"n": [10**5000]}})
    assert _rows(store) == before
    sid = f"n{next(_ids)}"
    store.create_session(sid, source="cli", **{where: {"n": [10**1000]}})  # 1,001 digits
    assert store.get_session(sid)[where] == {"n": [10**1000]}


@pytest.mark.parametrize("key", ["tool_calls", "custom"])
def test_a_message_int_json_cannot_carry_is_refused_by_its_key(
    store: SessionStore, key: str
) -> None:
    store.create_session("m", source="cli")
    before = _rows(store)
    with pytest.raises(InvalidMessageError, match="more digits") as err:
        store.flush("m", [{"role": "assistant", "content": "x", key: [{"n": -(10**5000)}]}])
    assert err.value.key == key
    assert _rows(store) == before


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize("depth", [1, 99, 100, 101, 500, 5000])
@pytest.mark.parametrize("key", ["tool_calls", "custom"])
def test_nesting_is_stored_and_read_back_or_refused(
    store: SessionStore, depth: int, key: str
) -> None:
    """Up to the bound a document reads back equal; past it, nothing is written."""
    store.create_session("d", source="cli")
    message = {"role": "assistant", "content": "x", key: _nested(depth)}
    if depth <= hermes_orm._codec.MAX_DEPTH:
        store.flush("d", [message])
        assert store.get_messages("d") == [message]
        return
    with pytest.raises(InvalidMessageError) as err:
        store.flush("d", [message])
    assert err.value.key == key
    assert "nested deeper" in str(err.value)
    assert store.get_messages("d") == []


@pytest.mark.parametrize(
    "host", ["2001:db8::", "::ffff:10.0.0.1", "fe80::1%25eth0", "[::1]", "/var/run/postgresql"]
)
def test_one_host_in_the_query_reaches_the_driver_as_given(host: str) -> None:
    """libpq reads one ``host`` parameter itself: an IPv6 address, a socket directory."""
    url = normalize_url(f"postgresql://u@/db?host={host}")
    assert url.query["host"] == host.replace("%25", "%")


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("postgresql://u:SECRET@localhost:abc/db", InvalidURLError),
        ("postgresql://u:SECRET@h1:abc,h2:5432/db", InvalidURLError),  # libpq's several hosts
        ("postgresql://u:SECRET@[::1]:5432,[::2]:5433/db", InvalidURLError),
        ("postgresql://u:SECRET@h1:5432,fe80::1/db", InvalidURLError),
        ("postgresql://u:SECRET@/db?host=::1&host=h2:5433", InvalidURLError),
        ("postgresql://u:SECRET@[::1/db", InvalidURLError),
        ("not a url", InvalidURLError),
        ("mysql://u:SECRET@localhost/db", UnsupportedBackendError),
        ("oracle://u:SECRET@localhost/db", UnsupportedBackendError),
        ("postgresql+nodriver://u:SECRET@localhost/db", UnsupportedBackendError),
        ("sqlite+nodriver:///{tmp}/x.db", UnsupportedBackendError),
    ],
)
def test_urls_that_cannot_work_are_refused_without_the_password(
    url: str, error: type[HermesOrmError], tmp_path: Path
) -> None:
    url = url.replace("{tmp}", str(tmp_path))
    with pytest.raises(error) as err:
        SessionStore(url)
    assert list(tmp_path.iterdir()) == []  # no database file made on the way
    assert "SECRET" not in str(err.value)
    assert err.value.__cause__ is None  # nor in a chained exception's text
    from hermes_orm.async_store import AsyncSessionStore

    with pytest.raises(error):
        AsyncSessionStore(url)


@pytest.mark.parametrize(
    ("url", "api"),
    [
        ("postgresql+asyncpg://u:SECRET@localhost/db", "sync"),
        ("postgresql+psycopg_async://u:SECRET@localhost/db", "sync"),
        ("sqlite+aiosqlite:///{tmp}/x.db", "sync"),
        ("postgresql+psycopg2://u:SECRET@localhost/db", "async"),
    ],
)
def test_a_driver_of_the_other_api_is_refused_by_name(url: str, api: str, tmp_path: Path) -> None:
    from hermes_orm.async_store import AsyncSessionStore

    make, instead = (
        (SessionStore, "use AsyncSessionStore")
        if api == "sync"
        else (AsyncSessionStore, "use SessionStore")
    )
    with pytest.raises(InvalidURLError, match=instead) as err:
        make(url.replace("{tmp}", str(tmp_path)))
    assert "SECRET" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_is_down_is_reported_unreachable_not_busy() -> None:
    """A store's first call on a port nobody listens on: retried, then said as it is."""
    import socket

    from hermes_orm import DatabaseUnavailableError, RetryPolicy

    with socket.socket() as probe:  # a port just freed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://u:SECRET@127.0.0.1:{port}/db"
    # Retried for unavailable_for seconds, however few busy retries the policy allows.
    policy = RetryPolicy(attempts=1, base_delay=0.01, unavailable_for=0.3)
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError) as err:
        SessionStore(url, retry=policy).get_session("x")
    assert 0.3 <= time.monotonic() - started < 5
    assert err.value.attempts > 1
    assert err.value.seconds is not None
    assert err.value.seconds >= 0.3
    assert "SECRET" not in str(err.value)
    assert "unreachable for" in str(err.value)
    assert "busy" not in str(err.value)
    assert "lock" not in str(err.value)

    import asyncio

    from hermes_orm.async_store import AsyncSessionStore

    async def first_call() -> None:
        await AsyncSessionStore(url, retry=policy).get_session("x")

    with pytest.raises(DatabaseUnavailableError):
        asyncio.run(first_call())


@pytest.mark.parametrize("stamp", [1_760_000_000, 2**53 + 1, -(2**62), 0, 1_760_000_000.25])
def test_timestamps_read_back_exactly_int_or_float(store: SessionStore, stamp: float) -> None:
    """An int timestamp reads back as that int (beyond 2**53 too), a float as that float."""
    from tests.conftest import fresh_store

    sid = f"ts{next(_ids)}"
    store.create_session(sid, source="cli")
    message = {"role": "user", "content": "x", "timestamp": stamp, "custom": 1}
    store.flush(sid, [message])
    [back] = fresh_store(store).get_messages(sid)
    assert back == message
    assert type(back["timestamp"]) is type(stamp)
    # A number equal to it is the same message, for a store that never saw it too.
    equal = {**message, "timestamp": float(stamp) if float(stamp) == stamp else stamp}
    assert fresh_store(store).flush(sid, [equal, {"role": "user", "content": "y"}]).written == 1


def test_an_int_timestamp_beyond_a_float_changed_by_one_is_a_change(store: SessionStore) -> None:
    from hermes_orm import HistoryDivergedError
    from tests.conftest import fresh_store

    store.create_session("big", source="cli")
    store.flush("big", [{"role": "user", "content": "x", "timestamp": 2**53 + 1}])
    changed = {"role": "user", "content": "x", "timestamp": 2**53}  # the same float
    for checker in (store, fresh_store(store)):
        with pytest.raises(HistoryDivergedError):
            checker.flush("big", [changed, {"role": "user", "content": "y"}])


@pytest.mark.parametrize("extra", [["tag-a", "tag-b"], "x", 5])
def test_a_session_s_extra_must_be_a_json_object(store: SessionStore, extra: Any) -> None:
    with pytest.raises(InvalidSessionError, match="'extra' must be a dict"):
        store.create_session("odd", source="api", extra=extra)
    assert store.get_session("odd") is None


@pytest.mark.parametrize("revision", ["", "  ", None, 3])
def test_a_revision_that_is_no_name_is_refused(engine: Any, revision: Any) -> None:
    before = hermes_orm.migrations.current(engine)
    for migrate in (hermes_orm.upgrade, hermes_orm.downgrade):
        with pytest.raises(hermes_orm.InvalidArgumentError, match="revision must be"):
            migrate(engine, revision)
    with pytest.raises(hermes_orm.InvalidArgumentError, match="revision must be"):
        SessionStore(engine).upgrade(revision)
    assert hermes_orm.migrations.current(engine) == before


@pytest.mark.parametrize("query", ["timeout=abc", "check_same_thread=maybe"])
def test_a_sqlite_url_value_the_driver_cannot_take_is_an_invalid_url(
    tmp_path: Path, query: str
) -> None:
    path = tmp_path / "odd.db"
    with pytest.raises(InvalidURLError, match="the engine cannot be made"):
        SessionStore(f"sqlite:///{path}?{query}")
    assert not path.exists()


def test_a_postgresql_url_value_the_driver_cannot_take_is_an_invalid_url() -> None:
    with pytest.raises(InvalidURLError, match="non-integer port") as raised:
        SessionStore("postgresql://u:SECRET@127.0.0.1:1/db?port=abc")
    assert "SECRET" not in str(raised.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"echo": -1}, {"echo": "yes"}, {"poolclass": "QueuePool"}, {"pool_size": "x"}],
    ids=repr,
)
def test_an_engine_argument_sqlalchemy_refuses_is_an_argument_error(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(hermes_orm.InvalidArgumentError, match="the engine cannot be made"):
        hermes_orm.create_store_engine(f"sqlite:///{tmp_path / 'x.db'}", **kwargs)
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize(
    "target",
    [
        None,
        "Session",
        1,
        "engine",
        "async_session_class",
        "async_sessionmaker",
        "sessionmaker_class",
    ],
)
def test_the_position_rule_goes_only_on_orm_sessions(target: Any) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
    from sqlalchemy.orm import scoped_session, sessionmaker

    given = {
        "engine": create_engine("sqlite://"),
        "async_session_class": AsyncSession,
        "async_sessionmaker": async_sessionmaker(),
        "sessionmaker_class": sessionmaker,  # (its instances take it)
    }.get(target, target)
    remedy = "sync_session_class" if str(target).startswith("async") else "takes the Session class"
    for call in (hermes_orm.install_position_rule, hermes_orm.remove_position_rule):
        with pytest.raises(hermes_orm.InvalidArgumentError, match=remedy):
            call(given)

    class Scoped(scoped_session):  # type: ignore[type-arg]  # (what SQLAlchemy takes, taken)
        pass

    for taken in (Scoped, sessionmaker(), scoped_session(sessionmaker())):
        hermes_orm.install_position_rule(taken)
        hermes_orm.remove_position_rule(taken)


@pytest.mark.parametrize("schema", [1, b"agents", ["agents"]])
def test_a_schema_that_is_no_str_is_refused(schema: Any) -> None:
    with pytest.raises(hermes_orm.InvalidArgumentError, match="schema must be one plain"):
        SessionStore("postgresql://u@127.0.0.1:1/db", schema=schema)


def test_an_error_message_shows_a_long_input_cut_short(store: SessionStore) -> None:
    """A megabyte id or cursor is not copied into the message (nor into the log); its
    length is told as a limit counts it (characters, not those of its written-out form)."""
    huge = "x" * 1_000_000
    for call, error, size in (
        (lambda: store.get_session(huge), InvalidSessionError, "1,000,000"),
        (lambda: store.list_sessions(cursor=huge), InvalidSessionError, "1,000,000"),
        (lambda: store.search("hello", cursor=huge), SearchQueryError, "1,000,000"),
        (
            lambda: store.create_session("a\x00" + huge, source="x"),
            InvalidSessionError,
            "1,000,002",
        ),
        (lambda: store.create_session("i" * 256, source="x"), InvalidSessionError, "256"),
        (lambda: store.create_session("\x01" * 300, source="x"), InvalidSessionError, "300"),
    ):
        with pytest.raises(error) as raised:
            call()
        assert len(str(raised.value)) < 300
        assert f"({size} characters)" in str(raised.value)  # how long it was


def test_an_engine_argument_sqlalchemy_refuses_is_no_url_error(tmp_path: Path) -> None:
    from hermes_orm import create_store_engine

    with pytest.raises(hermes_orm.InvalidArgumentError, match="pool_sise") as raised:
        create_store_engine(f"sqlite:///{tmp_path / 'x.db'}", pool_sise=3)
    assert not isinstance(raised.value, InvalidURLError)


@pytest.mark.parametrize("store_class", [hermes_orm.SessionStore, hermes_orm.AsyncSessionStore])
@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("retry", 3, "retry must be a RetryPolicy"),
        ("check_schema", "no", "check_schema must be True or False"),
        ("check_schema", None, "check_schema must be True or False"),
    ],
)
def test_a_store_option_of_the_wrong_kind_is_refused_before_a_file_is_made(
    tmp_path: Path, store_class: Any, option: str, value: Any, said: str
) -> None:
    path = tmp_path / "not-yet" / "agents.db"
    with pytest.raises(hermes_orm.InvalidArgumentError, match=said):
        store_class(f"sqlite:///{path}", **{option: value})
    assert not path.parent.exists()
