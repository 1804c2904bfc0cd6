"""hermes_orm's SessionDB against Hermes Agent's own, call for call, on every backend.

The same sequence of calls runs against ``hermes_state.SessionDB`` (the real
package, on its own SQLite file) and against ours; every return value (or the
fact that both raise) must match, with the clock's readings set aside.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from hermes_orm import SessionStore, create_store_engine
from hermes_orm.errors import (
    DatabaseUnavailableError,
    HermesOrmError,
    InvalidArgumentError,
    InvalidMessageError,
    InvalidSessionError,
    SessionNotFoundError,
)
from hermes_orm.integrations.hermes import SessionDB, _hermes_sql
from tests.conftest import (
    fresh_store,
    in_threads,
    listening,
    meanwhile,
    table_name,
    unqualified,
)

# Hermes' SessionDB API is blocking: its tests run on that API only.
pytestmark = pytest.mark.apis("sync")

_CLOCK = {"started_at", "ended_at", "timestamp", "last_active", "session_started"}


def _no_clock(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: ("<time>" if k in _CLOCK and v is not None else _no_clock(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_no_clock(v) for v in value]
    return value


class Both:
    """Runs each call on Hermes' SessionDB and on ours, and compares."""

    def __init__(self, hermes: Any, ours: SessionDB) -> None:
        self.hermes, self.ours = hermes, ours
        self.calls = 0

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_repr"):  # (what a printer looks for, hypothesis' among them)
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            results = []
            for db in (self.hermes, self.ours):
                try:
                    results.append(("ok", getattr(db, name)(*args, **kwargs)))
                except Exception as exc:  # both must fail, not necessarily alike
                    results.append(("raised", exc))
            (h_kind, h_value), (o_kind, o_value) = results
            assert h_kind == o_kind, (name, args, results)
            if h_kind == "raised":
                # Ours is caught as Hermes' is (a ValueError stays one), and is typed
                # (a TypeError, Python's own error of a wrong type, may stay just that).
                if isinstance(h_value, ValueError | TypeError | LookupError):
                    # (Hermes' sqlite3 refusing text it cannot encode: a ValueError, typed here)
                    kind = ValueError if isinstance(h_value, UnicodeError) else type(h_value)
                    assert isinstance(o_value, kind), (name, args, results)
                if not isinstance(o_value, TypeError):
                    assert isinstance(o_value, HermesOrmError), (name, args, results)
            if h_kind == "ok":
                assert _no_clock(o_value) == _no_clock(h_value), (name, args)
                return h_value
            return None

        return call


@pytest.fixture
def both(store: SessionStore, tmp_path: Path) -> Any:
    from hermes_state import SessionDB as HermesSessionDB

    hermes = HermesSessionDB(tmp_path / "hermes-state.db")
    yield Both(hermes, SessionDB(store))
    hermes.close()


@pytest.fixture
def elsewhere(store: SessionStore, db_url: str) -> Iterator[SessionDB]:
    """A SessionDB on the same database through a store of its own (another process's).

    Made from the test's URL: in its schema, through its pooler, as the run says.
    """
    with SessionStore(db_url) as other:
        yield SessionDB(other)


def test_sessions_titles_and_lifecycle(both: Any) -> None:
    assert (
        both.create_session(
            "s1",
            "cli",
            model="openai/gpt-5",
            model_config={"temperature": 0.7, "max_tokens": 4096},
            system_prompt="You are Hermes.",
            user_id="u1",
        )
        == "s1"
    )
    both.create_session("s1", "telegram", model="other", cwd="/tmp")  # fills only NULLs
    both.ensure_session("s2", model="m2")
    both.ensure_session("child", source="cli", parent_session_id="s1")
    both.get_session("s1")
    both.get_session("child")
    both.get_session("missing")
    both.update_system_prompt("s1", "A new prompt ✨")
    both.update_session_model("s1", "anthropic/claude")
    both.end_session("s1", "user_exit")
    both.end_session("s1", "compression")  # the first end wins
    both.get_session("s1")
    both.reopen_session("s1")
    both.get_session("s1")
    both.end_session("missing", "x")
    assert both.set_session_title("s1", "  My\tfirst   session\u200b ") is True
    both.get_session_title("s1")
    both.get_session_by_title("My first session")
    both.set_session_title("s2", "My first session")  # taken: both raise
    both.set_session_title("s2", "x" * 101)  # too long: both raise
    assert both.set_session_title("missing", "Nobody") is False
    both.set_session_title("s1", "")  # clears it
    both.get_session_title("s1")
    both.get_session_by_title("My first session")
    assert both.get_session_by_title(None) is None  # untitled sessions are there
    both.resolve_session_id("s1")
    both.resolve_session_id("s")  # ambiguous
    both.resolve_session_id("chi")
    both.resolve_session_id("nope")
    both.create_session("s3", "cli", parent_session_id="no-such-parent")  # both refuse
    both.get_meta("last_vacuum")
    both.set_meta("last_vacuum", "2026-11-26")
    both.set_meta("last_vacuum", "2026-11-27")
    both.get_meta("last_vacuum")
    assert both.calls > 30


def test_messages_unicode_tools_multimodal(both: Any) -> None:
    both.create_session("s", "cli", model="m")
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "terminal", "arguments": '{"cmd": "ls"}'},
    }
    ids = [
        both.append_message("s", "user", content="数据库迁移失败了怎么办 🚀", timestamp=1.5),
        both.append_message(
            "s",
            "assistant",
            content=None,
            tool_calls=[call],
            finish_reason="tool_calls",
            reasoning="think 🤔",
            reasoning_details=[{"type": "reasoning.text", "text": "a"}],
            codex_reasoning_items=[{"id": "r1", "z": 1, "a": 2}],
        ),
        both.append_message(
            "s",
            "tool",
            content="README.md\n",
            tool_call_id="call_1",
            tool_name="terminal",
            token_count=12,
            effect_disposition="read",
        ),
        both.append_message(
            "s",
            "user",
            content=[
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
            observed=True,
            platform_message_id="tg-42",
        ),
        both.append_message(
            "s",
            "assistant",
            content="It is a logo.",
            api_content="It is a logo.",
            codex_message_items=[{"k": "v"}],
            reasoning_content="plain",
        ),
        both.append_message("s", "assistant", content="", tool_calls=[]),
    ]
    assert ids == sorted(ids)
    both.get_messages("s")
    both.get_messages("s", limit=2)
    both.get_messages("s", limit=2, offset=3)
    both.get_messages("s", offset=4)
    both.get_messages("s", include_inactive=True)
    both.get_messages("missing")
    both.message_count("s")
    both.message_count()
    both.get_session("s")  # message_count and tool_call_count
    both.append_message("missing", "user", content="x")  # both refuse
    both.clear_messages("s")
    both.get_messages("s")
    both.get_session("s")
    both.append_message("s", "user", content="after clearing")  # ids are never reused
    both.get_messages("s")


def test_the_gateways_session_meta_row_is_stored_as_hermes_stores_it(
    both: Any, store: SessionStore
) -> None:
    """Hermes' gateway opens each session's transcript with a ``session_meta`` row."""
    both.create_session("g", "telegram", model="m")
    # As gateway/session.py's _append_transcript_message writes it.
    both.append_message(
        session_id="g",
        role="session_meta",
        content=None,
        tool_name=None,
        tool_calls=None,
        tool_call_id=None,
        platform_message_id=None,
        observed=False,
        timestamp=10.0,
    )
    both.append_message("g", "user", content="hi", timestamp=11.0)
    both.append_message("g", "assistant", content="hello", timestamp=12.0)
    both.get_messages("g")
    both.get_messages_as_conversation("g")
    both.get_session("g")
    assert [m["role"] for m in store.get_messages("g")] == ["session_meta", "user", "assistant"]


def test_export_and_delete_with_delegates(both: Any, tmp_path: Path) -> None:
    both.create_session("root", "cli", model="m")
    both.create_session(
        "delegate",
        "cli",
        parent_session_id="root",
        model_config={"_delegate_from": "root", "role": "researcher"},
    )
    both.create_session(
        "grand", "cli", parent_session_id="delegate", model_config={"_delegate_from": "delegate"}
    )
    both.create_session("branch", "cli", parent_session_id="root")
    both.create_session("other", "telegram")
    for sid in ("root", "delegate", "branch", "other"):
        both.append_message(sid, "user", content=f"hello from {sid}", timestamp=10.0)
    both.append_message("other", "assistant", content="newest", timestamp=99.0)
    both.export_session("root")
    both.export_session("missing")
    both.search_sessions()
    both.search_sessions(source="telegram")
    both.search_sessions(limit=2, offset=1)
    both.export_all()
    both.export_all(source="cli")

    sessions_dir = tmp_path / "sessions"
    sessions_dir.mkdir()
    for name in ("root.json", "root.jsonl", "request_dump_root_1.json", "keep.json"):
        (sessions_dir / name).write_text("{}")
    assert both.delete_session("root", sessions_dir=sessions_dir) is True
    assert sorted(p.name for p in sessions_dir.iterdir()) == ["keep.json"]
    for sid in ("root", "delegate", "grand", "branch"):
        both.get_session(sid)  # delegates gone, the branch kept without its parent
    both.message_count()
    assert both.delete_session("root") is False


#: Hermes' walk of a session's lineage (its dashboard's), as it writes it.
_HERMES_WALK = (
    "\n            WITH RECURSIVE descendants(id, parent_session_id, started_at) AS (\n"
    "                SELECT id, parent_session_id, started_at FROM sessions WHERE id = ?\n"
    "                UNION\n"
    "                SELECT s.id, s.parent_session_id, s.started_at\n"
    "                FROM sessions s\n"
    "                JOIN descendants d ON s.parent_session_id = d.id\n"
    "            )\n"
    "            SELECT id, parent_session_id, started_at FROM descendants\n            "
)


def _numbers(backend: str) -> str:
    """A FROM item of the numbers 1 to the parameter ``n``, as column ``i``."""
    if backend == "postgresql":
        return "generate_series(1, :n) AS g(i)"
    return (
        "(WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < :n) "
        "SELECT i FROM g)"
    )


@pytest.mark.heavy
def test_a_prune_of_more_sessions_than_a_statement_may_name(
    store: SessionStore, backend: str
) -> None:
    """A gateway's many short sessions: 70,000 (PostgreSQL's protocol carries 65,535
    parameters; a SQLite build may take as few as 32,766), pruned at once with their
    messages, a child of one of them kept without its link."""
    count = 70_000
    numbers = _numbers(backend)

    def made() -> None:
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO hermes_sessions (id, source, started_at, ended_at) "
                    f"SELECT 'g' || i, 'telegram', 1000, 2000 FROM {numbers}"
                ),
                {"n": count},
            )
        store.create_session("child", source="cli", parent_session_id=f"g{count}")
        store.flush(f"g{count}", [{"role": "user", "content": "hi"}])

    def only_the_child_left() -> None:
        assert db.session_count() == 1
        child = store.get_session("child")
        assert child is not None
        assert child["parent_session_id"] is None
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM hermes_messages").scalar() == 0
        db.delete_session("child")

    db = SessionDB(store)
    made()
    assert db.prune_sessions(older_than_days=1) == count
    only_the_child_left()
    made()  # and named one by one
    assert db.delete_sessions([f"g{i}" for i in range(1, count + 1)]) == count
    only_the_child_left()


@pytest.mark.heavy
def test_listing_and_counting_more_sessions_than_a_statement_may_name(
    store: SessionStore, backend: str
) -> None:
    """70,000 sessions with a child each: the listing's previews and the picker's count of
    roots look their sessions up a part at a time, past PostgreSQL's 65,535 parameters."""
    count = 70_000
    numbers = _numbers(backend)
    with store.engine.begin() as conn:
        for made in ("'g' || i, NULL", "'c' || i, 'g' || i"):
            conn.execute(
                text(
                    "INSERT INTO hermes_sessions (id, parent_session_id, source, started_at) "
                    f"SELECT {made}, 'telegram', i FROM {numbers}"
                ),
                {"n": count},
            )
    store.flush("g1", [{"role": "user", "content": "the first"}])
    db = SessionDB(store)
    assert db.session_count(exclude_children=True) == count
    listed = db.list_sessions_rich(limit=-1)
    assert len(listed) == count
    assert {row["id"]: row["preview"] for row in listed}["g1"] == "the first"


@pytest.mark.heavy
def test_a_walk_and_a_delete_of_more_sessions_and_keys_than_a_statement_may_name(
    store: SessionStore, backend: str
) -> None:
    """Hermes' walk of a lineage (its recursive SQL on ``db._conn``) through one level of
    70,000 children, and a gateway forgetting 70,000 routing keys at once: each looks
    its ids up a part at a time, past PostgreSQL's 65,535 parameters."""
    count = 70_000
    store.create_session("root", source="telegram")
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO hermes_sessions (id, parent_session_id, source, started_at) "
                f"SELECT 'c' || i, 'root', 'telegram', i FROM {_numbers(backend)}"
            ),
            {"n": count},
        )
    db = SessionDB(store)
    found = db._conn.execute(_HERMES_WALK, ("root",)).fetchall()
    assert len(found) == count + 1
    assert {row["parent_session_id"] for row in found} == {None, "root"}
    db.replace_gateway_routing_entries({f"k{i}": "{}" for i in range(count + 1)})
    db.delete_gateway_routing_entries([f"k{i}" for i in range(count)])
    assert db.load_gateway_routing_entries() == {f"k{count}": "{}"}


def test_prune_sessions_with_filters(both: Any, tmp_path: Path) -> None:
    import time

    both.create_session("live", "cli", model="openai/gpt-5", cwd="/work/repo")
    both.create_session("done-cli", "cli", model="openai/gpt-5", cwd="/work/repo/sub")
    both.create_session("done-tg", "telegram", model="anthropic/claude", user_id="u9")
    both.create_session("done-child", "cli", parent_session_id="done-tg")
    for sid in ("done-cli", "done-tg", "done-child"):
        both.append_message(sid, "user", content="x", timestamp=1.0)
        both.end_session(sid, "user_exit")
    both.set_session_title("done-cli", "Refactor the Parser")
    # nothing is old enough by default
    assert both.prune_sessions() == 0
    assert both.prune_sessions(older_than_days=None, title_like="parser", source="cli") == 1
    both.get_session("done-cli")
    assert both.prune_sessions(older_than_days=None, model_like="CLAUDE", min_messages=2) == 0
    assert (
        both.prune_sessions(
            older_than_days=None,
            started_before=time.time() + 60,
            user_id="u9",
            cwd_prefix=None,
            max_tool_calls=0,
        )
        == 1
    )
    both.get_session("done-child")  # kept, parent link cleared
    both.prune_sessions(older_than_days=None, cwd_prefix="/work/repo")  # "live" is not ended
    both.get_session("live")
    both.prune_sessions(older_than_days=None, archived=False, min_cost=0, max_tokens=0)
    both.message_count()
    both.prune_sessions(no_such_filter=1)  # both refuse


@pytest.mark.parametrize(
    "bound", ["started_before", "max_messages", "max_tokens", "max_cost", "max_tool_calls"]
)
def test_a_nan_prune_bound_matches_nothing(both: Any, bound: str) -> None:
    """Hermes' sqlite3 binds NaN as NULL: nothing matches. PostgreSQL orders NaN above
    every number: every ended session matched, and a prune deleted them all."""
    both.create_session("done", "cli")
    both.end_session("done", "user_exit")
    assert both.list_prune_candidates(**{bound: math.nan}) == []
    assert both.prune_sessions(older_than_days=None, **{bound: math.nan}) == 0
    assert both.archive_sessions(**{bound: math.nan}) == 0
    both.get_session("done")


@pytest.mark.parametrize(
    "given",
    [
        {"started_before": "2030-01-01"},
        {"min_messages": "1"},
        {"max_cost": [1]},
        {"title_like": 5},
        {"cwd_prefix": 5},
        {"provider": b"x"},
        {"archived": "no"},
    ],
    ids=repr,
)
def test_a_prune_filter_of_the_wrong_kind_is_refused(
    store: SessionStore, given: dict[str, Any]
) -> None:
    """Hermes' file orders text above every number (its prune then takes every ended
    session), PostgreSQL refuses the comparison, and a text filter that is no text
    failed untyped: refused with InvalidArgumentError on either backend, nothing gone."""
    db = SessionDB(store)
    db.create_session("done", "cli")
    db.end_session("done", "user_exit")
    with pytest.raises(InvalidArgumentError):
        db.prune_sessions(older_than_days=None, **given)
    with pytest.raises(InvalidArgumentError):
        db.list_prune_candidates(**given)
    assert db.get_session("done") is not None
    # An int past 64 bits compares as the float it is near.
    assert [row["id"] for row in db.list_prune_candidates(max_messages=2**64)] == ["done"]


@pytest.mark.parametrize(
    "given",
    [
        {"estimated_cost_usd": math.nan},
        {"estimated_cost_usd": math.inf},
        {"model": "m\x00x"},
        {"task": "t\x00x"},
        {"input_tokens": 1.5},
        {"output_tokens": "lots"},
        {"reasoning_tokens": 2**64},
        {"model": b"bytes-model"},
    ],
    ids=repr,
)
def test_auxiliary_usage_no_column_holds_is_refused_before_the_session_is_made(
    store: SessionStore, given: dict[str, Any]
) -> None:
    db = SessionDB(store)
    options = {"task": "summary", "model": "m", **given}
    task = options.pop("task")
    with pytest.raises(InvalidSessionError):
        db.record_auxiliary_usage("aux", task, **options)
    assert db.get_session("aux") is None


def test_auxiliary_usage_takes_a_cost_as_hermes_floats_it(both: Any, store: SessionStore) -> None:
    """Hermes' pricing gives a Decimal; Hermes stores float() of the cost."""
    from decimal import Decimal

    both.create_session("aux", "cli")
    for cost in (Decimal("0.25"), "0.5", True):
        both.record_auxiliary_usage("aux", "summary", model="m", estimated_cost_usd=cost)
    total = "SELECT sum(estimated_cost_usd) FROM {} WHERE session_id = 'aux'"
    theirs = both.hermes._conn.execute(total.format("session_model_usage")).fetchone()[0]
    with store.engine.connect() as conn:
        ours = conn.execute(text(total.format("hermes_session_model_usage"))).scalar_one()
    assert theirs == ours == 1.75


def test_letter_case_in_filters_and_id_prefixes_is_read_as_hermes_reads_it(both: Any) -> None:
    """Hermes' SQLite folds the case of ASCII letters alone, in LIKE and lower(): an id
    prefix or a directory in another ASCII case is found, a title's ``Ü`` or ``П`` is
    matched by no filter (PostgreSQL folds every letter: a prune deleted more)."""
    both.create_session("20250612_153012_a1b2c3", "cli", cwd="/home/Me/Proj")
    both.create_session("win", "Telegram", cwd="C:\\Proj\\Sub")
    for sid, title in (("ru", "Привет мир"), ("de", "Über alles"), ("en", "Hello World")):
        both.create_session(sid, "cli", model="Ünicode-Model", cwd="/home/me/proj/x")
        both.set_session_title(sid, title)
        both.end_session(sid, "user_exit")
    both.update_token_counts("en", billing_provider="ÜberCloud")
    both.update_token_counts("de", billing_provider="OpenAI")
    assert both.resolve_session_id("20250612_153012_A1B2") == "20250612_153012_a1b2c3"
    assert both.session_count(cwd_prefix="/HOME/me/proj") == 3  # (equal to it: exactly)
    assert both.session_count(cwd_prefix="c:\\proj") == 1
    for needle in ("привет", "ПРИВЕТ", "über", "ÜBER", "hello", "WORLD"):
        both.list_prune_candidates(older_than_days=None, title_like=needle)
    both.list_prune_candidates(older_than_days=None, model_like="ünicode")
    both.list_prune_candidates(older_than_days=None, provider="übercloud")
    both.list_prune_candidates(older_than_days=None, provider="OPENAI")
    assert both.prune_sessions(older_than_days=None, title_like="über") == 0
    assert both.prune_sessions(older_than_days=None, title_like="WORLD") == 1
    for sid in ("ru", "de", "en"):
        both.get_session(sid)


@pytest.mark.parametrize("bad", ["\x00", "\ud800"], ids=repr)
def test_a_title_with_nul_or_a_lone_surrogate_names_no_session(
    store: SessionStore, bad: str
) -> None:
    """No stored title holds NUL or a lone surrogate: looked up (``/resume <title>``), it
    finds none and numbers nothing, where PostgreSQL would refuse to compare NUL (a
    DatabaseError) and both drivers fail to encode a lone surrogate."""
    db = SessionDB(store)
    db.create_session("s", "cli")
    db.set_session_title("s", "t")
    assert db.resolve_session_by_title(f"t{bad}u") is None
    assert db.get_next_title_in_lineage(f"t{bad}u") == f"t{bad}u"
    assert db.get_next_title_in_lineage(f"t{bad}u #4") == f"t{bad}u"
    assert db.resolve_session_by_title("t") == "s"  # (the lookups work)
    assert db.get_next_title_in_lineage("t") == "t #2"


@pytest.mark.parametrize("title", ["5", 5, "t\x00", "t\ud800", None, ["t"]], ids=repr)
def test_a_title_is_resolved_as_it_is_looked_up(store: SessionStore, title: Any) -> None:
    """``resolve_session_by_title`` reads a title as ``get_session_by_title`` does (a number
    as its text, what no title holds as none): it raised the driver's UnicodeEncodeError
    for a lone surrogate, and an AttributeError for what is no text."""
    db = SessionDB(store)
    db.create_session("s", "cli")
    db.set_session_title("s", "5")
    found = db.get_session_by_title(title)
    assert db.resolve_session_by_title(title) == (None if found is None else found["id"])
    assert (found is not None) is (title in ("5", 5))


def test_the_next_title_after_what_is_no_text_is_refused(both: Any) -> None:
    """Hermes' regex raises a TypeError; the adapter's error is typed."""
    for title in (5, None, ["t"]):
        with pytest.raises(TypeError):
            both.hermes.get_next_title_in_lineage(title)
        with pytest.raises(InvalidArgumentError, match="base_title must be text"):
            both.ours.get_next_title_in_lineage(title)


def test_a_search_by_id_refuses_a_query_or_a_limit_of_another_type(both: Any) -> None:
    """Hermes raises an AttributeError or a TypeError; the adapter's error is typed, as
    ``list_sessions_rich``'s for such a limit."""
    both.create_session("s1", "cli")
    for kwargs in ({"query": 1}, {"query": ["s"]}, {"query": "s", "limit": "x"}):
        with pytest.raises((AttributeError, TypeError)):
            both.hermes.search_sessions_by_id(**kwargs)
        with pytest.raises(InvalidArgumentError, match="must be"):
            both.ours.search_sessions_by_id(**kwargs)
    assert both.search_sessions_by_id("", limit="x") == []  # nothing to look for
    assert both.search_sessions_by_id(None) == []
    assert both.search_sessions_by_id("s", limit=-1) == []
    assert [row["id"] for row in both.search_sessions_by_id("S1", limit=True)] == ["s1"]


def test_a_title_that_is_no_text_is_refused_before_it_is_set(both: Any) -> None:
    """Hermes' regex raises a TypeError; the adapter's error is typed. An empty one
    clears the title, as in Hermes."""
    both.create_session("s", "cli")
    both.set_session_title("s", "t")
    for title in (5, 1.5, b"t", ["t"]):
        for set_title in ("set_session_title", "set_auto_title_if_empty"):
            with pytest.raises(TypeError):
                getattr(both.hermes, set_title)("s", title)
            with pytest.raises(InvalidSessionError, match="title must be text"):
                getattr(both.ours, set_title)("s", title)
    assert both.get_session_title("s") == "t"
    both.set_session_title("s", 0)
    assert both.get_session_title("s") is None


def test_filters_on_windows_paths_and_backslashes(both: Any) -> None:
    """A backslash in a filter is a backslash, as Hermes' SQLite LIKE reads it (PostgreSQL's
    LIKE would take it as its escape character); ``%`` and ``_`` stay wildcards."""
    both.create_session("a", "cli", cwd="C:\\proj")
    both.create_session("b", "cli", cwd="C:\\proj\\sub")
    both.create_session("c", "cli", cwd="C:\\project")
    both.set_session_title("b", "fix c:\\temp and 50% of it")
    for prefix in ("C:\\proj", "C:\\proj\\", "C:"):
        assert both.session_count(cwd_prefix=prefix) > 0
        both.list_sessions_rich(cwd_prefix=prefix)
    for done in ("a", "b", "c"):
        both.end_session(done, "user_exit")
    assert len(both.list_prune_candidates(title_like="c:\\temp")) == 1
    assert len(both.list_prune_candidates(title_like="50%_of")) == 1
    assert both.prune_sessions(older_than_days=None, cwd_prefix="C:\\proj") == 2


def test_session_count_filters(both: Any) -> None:
    both.create_session("root", "cli", cwd="/work/repo")
    both.create_session(
        "sub", "cli", parent_session_id="root", model_config={"_delegate_from": "root"}
    )
    both.create_session(
        "tagged-branch", "cli", parent_session_id="root", model_config={"_branched_from": "root"}
    )
    both.create_session("tg", "telegram", cwd="/work/repo/x")
    both.append_message("tg", "user", content="hi")
    both.end_session("root", "branched")
    both.create_session("late-branch", "cli", parent_session_id="root")  # after the branch end
    both.create_session("compressed", "cron")
    both.end_session("compressed", "compression")
    both.create_session("continuation", "cron", parent_session_id="compressed")
    assert both.session_count() == 7
    both.session_count(source="cli")
    both.session_count(exclude_sources=["cron"])
    both.session_count(cwd_prefix="/work/repo/")
    both.session_count(min_message_count=1)
    # roots and branches, not the delegate or the compression continuation
    assert both.session_count(exclude_children=True) == 5
    both.session_count(exclude_children=True, source="cron")
    both.session_count(archived_only=True)
    both.session_count(include_archived=True)


@pytest.mark.parametrize("method", ["session_count", "list_sessions_rich"])
def test_a_cwd_prefix_that_is_no_text_is_refused(both: Any, method: str) -> None:
    """Hermes' ``rstrip`` of it raises an AttributeError (bytes: a TypeError); the adapter's
    error is typed."""
    both.create_session("s", "cli", cwd="5")
    for prefix in (5, ["/w"], b"/w"):
        with pytest.raises((AttributeError, TypeError)):
            getattr(both.hermes, method)(cwd_prefix=prefix)
        with pytest.raises(InvalidArgumentError, match="cwd_prefix must be text"):
            getattr(both.ours, method)(cwd_prefix=prefix)
    getattr(both, method)(cwd_prefix=0)  # (none: every session, as in Hermes)


def _usage_rows(
    hermes: Any, ours: SessionDB
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    from sqlalchemy import select

    from hermes_orm import ModelUsage

    columns = [
        "session_id", "model", "billing_provider", "billing_base_url", "billing_mode", "task",
        "api_call_count", "input_tokens", "output_tokens", "cache_read_tokens",
        "cache_write_tokens", "reasoning_tokens", "estimated_cost_usd", "actual_cost_usd",
        "cost_status", "cost_source",
    ]  # fmt: skip
    theirs = [
        tuple(r)
        for r in hermes._conn.execute(
            f"SELECT {', '.join(columns)} FROM session_model_usage ORDER BY 1, 2, 3"
        ).fetchall()
    ]
    table = ModelUsage.__table__
    with ours.store.engine.connect() as conn:
        query = select(*(table.c[k] for k in columns)).order_by(
            table.c.session_id, table.c.model, table.c.billing_provider
        )
        mine = [tuple(r) for r in conn.execute(query)]
    return theirs, mine


def test_update_token_counts_and_model_usage(both: Any) -> None:
    both.create_session("s", "cli")
    both.update_token_counts(
        "s",
        input_tokens=100,
        output_tokens=20,
        model="openai/gpt-5",
        billing_provider="openrouter",
        api_call_count=1,
        estimated_cost_usd=0.5,
        cost_status="estimated",
    )
    both.update_token_counts(
        "s",
        input_tokens=50,
        cache_read_tokens=7,
        reasoning_tokens=3,
        api_call_count=1,
        actual_cost_usd=0.25,
        cost_source="provider",
    )
    both.update_token_counts(
        "s",
        input_tokens=5,
        model="anthropic/claude",
        billing_provider="anthropic",
        api_call_count=1,
    )
    both.get_session("s")
    both.update_token_counts(
        "s",
        input_tokens=1000,
        output_tokens=200,
        api_call_count=9,
        absolute=True,
        estimated_cost_usd=None,
        pricing_version="v2",
    )
    both.get_session("s")
    both.update_token_counts("new-session", output_tokens=3, model="m", api_call_count=1)
    both.get_session("new-session")
    both.update_token_counts("s")  # nothing accounted: no usage row
    both.get_session("s")
    theirs, mine = _usage_rows(both.hermes, both.ours)
    assert mine == theirs
    assert len(mine) == 3


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("session_count", {"source": "cli\ud800"}),
        ("list_sessions_rich", {"exclude_sources": ["\ud800"]}),
        ("search_sessions", {"source": "\ud800"}),
        ("prune_sessions", {"older_than_days": 0, "title_like": "t\x00\ud800"}),
        ("prune_sessions", {"older_than_days": 0, "chat_id": "\ud800"}),
    ],
)
def test_a_filter_holding_a_lone_surrogate_is_refused_as_hermes_refuses_it(
    both: Any, method: str, kwargs: dict[str, Any]
) -> None:
    """Hermes' sqlite3 cannot encode it (a ValueError); a prune cut at the NUL before
    the surrogate deleted what Hermes refused to."""
    both.create_session("s", "cli")
    both.set_session_title("s", "t")
    both.end_session("s", "done")
    getattr(both, method)(**kwargs)
    assert both.session_count() == 1


def test_update_token_counts_stores_a_number_given_as_the_model_as_its_text(both: Any) -> None:
    """Hermes' file keeps ``model=5`` as ``'5'``; PostgreSQL refused COALESCE(text, integer)."""
    both.update_token_counts("n", input_tokens=1, model=5, api_call_count=1)
    both.update_token_counts("n", input_tokens=2, model=5.5, billing_provider=7, api_call_count=1)
    both.get_session("n")
    theirs, mine = _usage_rows(both.hermes, both.ours)
    assert mine == theirs
    assert {row[1] for row in mine} == {"5", "5.5"}, mine


@pytest.mark.parametrize(
    ("method", "args", "kwargs"),
    [
        ("session_count", (), {"source": "cli\x00"}),
        ("session_count", (), {"exclude_sources": ["cli\x00"]}),
        ("session_count", (), {"cwd_prefix": "/w\x00"}),  # (SQLite's LIKE stops at NUL)
        ("list_sessions_rich", (), {"source": "cli\x00"}),
        ("list_sessions_rich", (), {"exclude_sources": ["cli\x00", "x"]}),
        ("search_sessions", (), {"source": "cli\x00"}),
        ("export_all", (), {"source": "cli\x00"}),
        ("search_messages", ("hello",), {"source_filter": ["cli\x00"]}),
        ("search_messages", ("hello",), {"source_filter": ["cli\x00", "cli"]}),
        ("search_messages", ("hello",), {"exclude_sources": ["cli\x00"]}),
        ("search_messages", ("hello",), {"role_filter": ["user\x00"]}),
        ("prune_sessions", (), {"older_than_days": 0, "source": "cli\x00"}),
        ("prune_sessions", (), {"older_than_days": 0, "title_like": "t\x00x"}),
        ("prune_sessions", (), {"older_than_days": 0, "title_like": "x\x00t"}),
        ("prune_sessions", (), {"older_than_days": 0, "provider": "p\x00"}),
    ],
)
def test_a_filter_holding_nul_is_compared_as_hermes_file_compares_it(
    both: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Hermes' file compares such text and finds no row (its LIKE reads a pattern up
    to the NUL); PostgreSQL refused the statement (DatabaseError), and the store's
    search the filter (SearchQueryError)."""
    both.create_session("s", "cli", cwd="/w")
    both.set_session_title("s", "t")
    both.append_message("s", "user", "hello world")
    both.end_session("s", "done")
    assert both.session_count() == 1
    if method == "search_messages":  # (the hits: Hermes' snippets differ, see test_search)
        ids = [
            [hit["id"] for hit in db.search_messages(*args, **kwargs)]
            for db in (both.hermes, both.ours)
        ]
        assert ids[0] == ids[1]
    else:
        getattr(both, method)(*args, **kwargs)
    both.session_count()


def test_messages_as_conversation_with_lineage(both: Any) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "t", "arguments": "{}"}}
    both.create_session("parent", "cli")
    both.append_message("parent", "user", content="  first question  ", timestamp=1.0)
    both.append_message(
        "parent",
        "assistant",
        content=None,
        tool_calls=[call],
        reasoning_details=[{"type": "reasoning.text", "text": "r"}],
    )
    both.append_message("parent", "tool", content="out", tool_call_id="c1", tool_name="t")
    both.append_message(
        "parent",
        "assistant",
        content="answer <memory-context>secret</memory-context> done",
        finish_reason="stop",
        reasoning_content="",
    )
    both.end_session("parent", "compression")
    both.create_session("child", "cli", parent_session_id="parent")
    both.append_message(
        "child",
        "user",
        content="first question",  # replayed by compression
        platform_message_id="tg-1",
        observed=True,
    )
    both.append_message(
        "child", "user", content="Review the conversation above and consider saving to memory"
    )
    both.append_message("child", "assistant", content="curator reply")
    both.append_message("child", "user", content="second")
    both.append_message("child", "user", content="second, again")  # user;user
    both.get_messages_as_conversation("child")
    both.get_messages_as_conversation("child", include_ancestors=True)
    both.get_messages_as_conversation("child", include_ancestors=True, repair_alternation=True)
    both.get_messages_as_conversation("parent", include_inactive=True)
    both.get_messages_as_conversation("missing")


# -- any message Hermes' append_message takes reads back the same through ours ---------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# any text: NUL, lone surrogates (both scrub them), CJK, emoji
_text = st.text(st.characters(exclude_categories=[]), max_size=30)
# JSON values: no lone surrogates (Hermes keeps them escaped; ours replaces them, documented)
_json_text = st.text(max_size=10)
# ... and a JSON string Hermes dumps from any other text (NUL, CJK, emoji)
_json_string = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _json_text}), max_size=2)
_calls = st.lists(
    st.fixed_dictionaries(
        {
            "id": _json_text,
            "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": _json_text, "arguments": _json_text}),
        }
    ),
    max_size=2,
)
_appends = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "tool", "system"])},
        optional={
            "content": st.none() | _text | _parts,
            "tool_calls": st.none() | _calls,
            "tool_call_id": st.none() | _text,
            "tool_name": st.none() | _text,
            "reasoning": st.none() | _text,
            "reasoning_details": st.none()
            | _json_string  # Hermes stores json.dumps of it
            | st.lists(st.dictionaries(_json_text, _json_text, max_size=2)),
            "codex_message_items": st.none() | _json_string | st.lists(_json_text, max_size=2),
            "token_count": st.none() | st.integers(0, 10**9),
            "finish_reason": st.none() | st.sampled_from(["stop", "tool_calls", "length"]),
            "observed": st.booleans(),
            "timestamp": st.floats(0, 4e9),
        },
    ),
    min_size=1,
    max_size=4,
)
_sequence = iter(range(10**9))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(appends=_appends, title=st.none() | _text)
def test_any_append_reads_back_as_hermes_gives_it(
    both: Any, appends: list[dict[str, Any]], title: str | None
) -> None:
    sid = f"h{next(_sequence)}"
    both.create_session(sid, "cli")
    for kwargs in appends:
        both.append_message(sid, **kwargs)
    both.get_messages(sid)
    both.get_messages_as_conversation(sid)
    both.get_session(sid)
    if title is not None:
        both.set_session_title(sid, title)  # both clean it, both may refuse it
        both.get_session_title(sid)


# What Hermes' SQLite columns make of a value of another type: a number given
# for a text column is SQLite's text of it, a whole float given for a count an int.
_CONVERTED = [
    ("tool_call_id", 123),
    ("platform_message_id", 456),
    ("finish_reason", 1),
    ("tool_name", True),
    ("effect_disposition", 2.5),
    ("reasoning", 5),
    ("token_count", True),
    ("token_count", 2.0),
    ("token_count", " 12 "),  # INTEGER affinity: text that is a number
    ("token_count", "12.0"),
    ("token_count", float("nan")),  # NULL
    ("content", 1e20),  # "1.0e+20", as SQLite writes it
    ("content", float("inf")),  # "Inf"
    ("content", float("nan")),  # NULL
    ("content", 7),
]


@pytest.mark.parametrize(("key", "value"), _CONVERTED, ids=repr)
def test_a_number_hermes_converts_is_stored_as_hermes_reads_it_back(
    both: Any, key: str, value: Any
) -> None:
    both.create_session("s", "cli")
    both.append_message("s", "assistant", **{key: value})
    both.replace_messages("s", [*both.get_messages("s"), {"role": "user", key: value}])
    both.get_messages("s")
    both.get_messages_as_conversation("s")


# What Hermes' json.dumps makes of values no JSON document holds as they are.
_JSON_SHAPES = [
    ("tool_calls", ({"id": "c1", "type": "function"},)),  # a tuple: a list
    ("tool_calls", [{"id": "c1", "args": {1: "one", None: "none", False: "no"}}]),  # keys: text
    ("content", ({"type": "text", "text": "a tuple of parts"},)),
    ("content", [{"type": "text", "text": "x", "ids": (1, 2)}]),
    ("content", [{"type": "text", "n": Decimal("1.5")}]),  # no JSON: stored as its str()
    ("reasoning_details", [{2: ["nested", ("tuple",)]}]),
    ("codex_message_items", ("one", "two")),
]


@pytest.mark.parametrize(("key", "value"), _JSON_SHAPES, ids=repr)
def test_json_values_are_stored_as_hermes_reads_its_json_back(
    both: Any, key: str, value: Any
) -> None:
    both.create_session("s", "cli", model_config={1: (0.5, "t")})
    both.get_session("s")
    both.append_message("s", "assistant", **{key: value})
    both.replace_messages("s", [*both.get_messages("s"), {"role": "assistant", key: value}])
    both.get_messages("s")
    both.get_messages_as_conversation("s")


@pytest.mark.parametrize("api_content", [42, 1.5, "with context", None])
def test_api_content_set_afterwards_is_stored_as_hermes_binds_it(
    both: Any, api_content: Any
) -> None:
    both.create_session("s", "cli")
    both.append_message("s", "user", content="q", api_content="q, first context")
    both.append_message("s", "assistant", content="a")
    assert both.set_latest_user_api_content("s", "q", api_content) == 1
    both.get_messages("s")


@pytest.mark.parametrize("key", ["user_id", "chat_id", "thread_id", "session_key", "model", "cwd"])
@pytest.mark.parametrize("value", [42, 1.5e300, False])
def test_a_number_given_for_a_session_text_field_is_stored_as_its_text(
    both: Any, key: str, value: Any
) -> None:
    both.create_session("s", "cli", **{key: value})
    both.create_session("t", 7)  # the source too
    both.get_session("s")
    both.get_session("t")


def test_sessions_started_at_one_time_are_listed_in_one_order_page_after_page(
    store: SessionStore,
) -> None:
    """Started the same second (a coarse clock, an import): pages repeat or skip none
    of them, though a title set between two pages moves its row on PostgreSQL."""
    db = SessionDB(store)
    for session_id in ("s3", "s1", "s4", "s2"):
        db.create_session(session_id, "cli")
    with store.engine.begin() as conn:
        sessions = table_name(store.engine, "hermes_sessions")
        conn.execute(text(f"UPDATE {sessions} SET started_at = 1000.0"))
    first = [row["id"] for row in db.list_sessions_rich(limit=2)]
    db.set_session_title(first[0], "renamed")
    second = [row["id"] for row in db.list_sessions_rich(limit=2, offset=2)]
    assert first + second == ["s1", "s2", "s3", "s4"]


def test_values_no_column_of_ours_can_hold_are_refused_before_anything_is_written(
    store: SessionStore,
) -> None:
    """Where Hermes' SQLite file stores what comes (the README lists these)."""
    ours = SessionDB(store)
    ours.create_session("s", "cli")
    for refused in ({"token_count": 1.5}, {"token_count": 9.3e18}, {"content": b"bytes"}):
        with pytest.raises(InvalidMessageError):
            ours.append_message("s", "assistant", **refused)
    for key in ("tool_calls", "reasoning_details", "codex_message_items"):  # Hermes: TypeError
        with pytest.raises(InvalidMessageError, match="not JSON") as err:
            ours.append_message("s", "assistant", **{key: [{"f": object()}]})
        assert err.value.key == key
    with pytest.raises(InvalidSessionError):
        ours.create_session("long", "x" * 513)
    assert ours.get_messages("s") == []
    assert ours.get_session("long") is None


def test_lone_surrogates_in_json_values_become_replacement_characters(store: SessionStore) -> None:
    ours = SessionDB(store)
    ours.create_session("s", "cli")
    ours.append_message(
        "s",
        "assistant",
        content=[{"type": "text", "text": "a\ud800"}],
        reasoning_details=[{"k\udfff": "v"}],
    )
    (row,) = ours.get_messages("s")
    assert row["content"] == [{"type": "text", "text": "a\ufffd"}]
    assert row["reasoning_details"] == '[{"k\\ufffd": "v"}]'


def test_json_keys_the_replacement_would_make_one_are_refused(store: SessionStore) -> None:
    """Keys told apart by lone surrogates only would lose a value once replaced: refused."""
    ours = SessionDB(store)
    ours.create_session("s", "cli")
    merged = {chr(0xD83D): "first", chr(0xDE00): "second"}
    with pytest.raises(InvalidMessageError, match="not valid Unicode") as caught:
        ours.append_message("s", "assistant", content="", reasoning_details=[merged])
    assert caught.value.key == "reasoning_details"
    with pytest.raises(InvalidMessageError, match="not valid Unicode"):
        ours.append_message("s", "user", content=[{"type": "text", "text": "a", **merged}])
    assert ours.get_messages("s") == []


def test_list_sessions_rich(both: Any) -> None:
    both.create_session("a-root", "cli", model="m1", cwd="/work/a")
    both.append_message("a-root", "system", content="system first", timestamp=1.0)
    both.append_message("a-root", "user", content="line one\nline two " + "x" * 80, timestamp=2.0)
    both.set_session_title("a-root", "AN-94 rifle notes")
    both.end_session("a-root", "compression")
    both.create_session("a-cont", "cli", parent_session_id="a-root", model="m2")
    both.append_message("a-cont", "user", content="continued", timestamp=50.0)
    both.set_session_title("a-cont", "AN-94 rifle notes #2")
    both.create_session("b", "telegram")
    both.append_message(
        "b", "user", content=[{"type": "text", "text": "see image"}], timestamp=30.0
    )
    both.create_session(
        "b-delegate", "telegram", parent_session_id="b", model_config={"_delegate_from": "b"}
    )
    both.create_session("c", "cli")
    both.append_message("c", "user", content=None, timestamp=5.0)
    both.append_message("c", "user", content="  \r\n  ", timestamp=6.0)
    both.list_sessions_rich()
    both.list_sessions_rich(include_children=True)
    both.list_sessions_rich(project_compression_tips=False)
    both.list_sessions_rich(order_by_last_active=True)
    both.list_sessions_rich(order_by_last_active=True, search_query="an94")
    both.list_sessions_rich(order_by_last_active=True, search_query="RIFLE")
    both.list_sessions_rich(order_by_last_active=True, id_query="cont")
    both.list_sessions_rich(order_by_last_active=True, id_query="zzz")
    both.list_sessions_rich(compact_rows=True, source="cli")
    both.list_sessions_rich(exclude_sources=["cli"], limit=1)
    both.list_sessions_rich(cwd_prefix="/work", min_message_count=1)
    both.list_sessions_rich(limit=2, offset=1)
    both.list_sessions_rich(limit=-1)  # as SQLite's LIMIT -1: all (Hermes' plugins ask so)
    both.list_sessions_rich(limit=-1, offset=1)
    both.list_sessions_rich(offset=-3)
    both.get_compression_tip("a-root")
    both.get_compression_tip("b")


def _search_view(results: list[dict[str, Any]], ordered: bool) -> list[dict[str, Any]]:
    """Search results without their snippets (each engine cuts its own), in order or by id."""
    rows = [{k: v for k, v in r.items() if k != "snippet"} for r in results]
    return rows if ordered else sorted(rows, key=lambda r: r["id"])


def test_search_messages(both: Any) -> None:
    hermes, ours = both.hermes, both.ours
    for db in (hermes, ours):
        db.create_session("a", "cli", model="m1")
        db.create_session("b", "telegram", model="m2")
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "terminal", "arguments": '{"cmd": "docker compose up"}'},
    }
    turns = [
        ("a", "user", {"content": "How do I deploy with docker compose?"}),
        ("a", "assistant", {"content": None, "tool_calls": [call]}),
        ("a", "tool", {"content": "compose started", "tool_name": "terminal"}),
        ("a", "assistant", {"content": "Deployed. 数据库迁移完成了"}),
        ("b", "user", {"content": "docker swarm or podman? 迁移计划"}),
        ("b", "assistant", {"content": [{"type": "text", "text": "podman deployment notes"}]}),
        ("b", "user", {"content": "thanks, deploying now"}),
    ]
    for n, (session_id, role, fields) in enumerate(turns):
        for db in (hermes, ours):
            db.append_message(session_id, role, timestamp=100.0 + n, **fields)
    cases: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        (("docker",), {}),
        (("docker compose",), {}),
        (('"compose up"',), {}),
        (("deploy*",), {}),
        (("docker OR podman",), {}),
        (("docker NOT swarm",), {}),
        (("NOT docker",), {}),  # an operator that begins or ends the query is dropped
        (("docker NOT",), {}),
        (("OR podman",), {}),
        (("docker and",), {}),
        (("数据库迁移",), {}),
        (("迁移",), {}),
        (("docker",), {"role_filter": ["user"]}),
        (("docker",), {"source_filter": ["telegram"]}),
        (("docker",), {"exclude_sources": ["telegram"]}),
        (("docker",), {"source_filter": []}),
        (("deploy*",), {"sort": "newest"}),
        (("deploy*",), {"sort": "oldest"}),
        (("deploy*",), {"sort": "newest", "limit": 2, "offset": 1}),
        (("deploy*",), {"sort": "newest", "limit": -1}),  # every hit
        (("deploy*",), {"sort": "oldest", "limit": -1, "offset": 1}),
        (("deploy*",), {"limit": 0}),
        (("",), {}),
        (("   ",), {}),
        (("nothinglikethis",), {}),
        # Longer than 2,048 characters: both search the first 2,048.
        (("docker" + " " * 3_000 + "podman",), {}),
        ((" " * 2_048 + "docker",), {}),
    ]
    for args, kwargs in cases:
        expected = hermes.search_messages(*args, **kwargs)
        got = ours.search_messages(*args, **kwargs)
        ordered = kwargs.get("sort") is not None
        assert _no_clock(_search_view(got, ordered)) == _no_clock(
            _search_view(expected, ordered)
        ), (args, kwargs)
        for result in got:
            assert ">>>" in result["snippet"], (args, result)
    assert len(ours.search_messages("deploy*")) == 4  # the cases above are not all empty
    assert len(ours.search_messages("docker" + " " * 3_000 + "podman")) == 3


def test_search_sorted_newest_or_oldest_goes_by_the_messages_times(both: Any) -> None:
    """As Hermes: by timestamp, whatever order the messages were stored in (an import
    stores a user's history session by session; a caller may give the times)."""
    hermes, ours = both.hermes, both.ours
    stamps = {"late": (2000.0, 2002.0, 2004.0), "early": (1001.0, 1003.0, 3005.0)}
    texts = (
        "deploy the stack trace collector",
        "stack trace after deploy",
        "部署说明 deploy notes",
    )
    for db in (hermes, ours):
        for session_id, times in stamps.items():  # stored late first
            db.create_session(session_id, "cli")
            for n, (stamp, content) in enumerate(zip(times, texts, strict=True)):
                role = "user" if n % 2 == 0 else "assistant"
                db.append_message(session_id, role, content, timestamp=stamp)
    # (CJK of 3 characters or more: Hermes' search of shorter ones ignores the sort)
    for query in ("deploy", '"stack trace"', "部署说明", "deploy NOT collector"):
        for kwargs in (
            {"sort": "newest"},
            {"sort": "oldest"},
            {"sort": "newest", "limit": 2},
            {"sort": " Oldest ", "limit": 2, "offset": 1},
            {"sort": "newest", "limit": -1, "offset": 2},
            {"sort": "oldest", "role_filter": ["user"]},
        ):
            expected = hermes.search_messages(query, **kwargs)
            got = ours.search_messages(query, **kwargs)
            assert _no_clock(_search_view(got, True)) == _no_clock(_search_view(expected, True)), (
                query,
                kwargs,
            )
    newest = [
        (r["session_id"], r["timestamp"]) for r in ours.search_messages("deploy", sort="newest")
    ]
    assert newest[:2] == [("early", 3005.0), ("late", 2004.0)]


def test_search_in_time_order_puts_messages_with_no_time_last(store: SessionStore) -> None:
    """Messages flushed with no timestamp have none: last, newest first or oldest, on
    both backends alike (one sorts NULL first, the other last)."""
    db = SessionDB(store)
    db.create_session("s", "cli")
    store.flush(
        "s",
        [
            {"role": "user", "content": "needle one"},
            {"role": "user", "content": "needle two", "timestamp": 10.0},
            {"role": "user", "content": "needle three", "timestamp": 20.0},
            {"role": "user", "content": "needle four"},
        ],
    )
    for sort, order in (("newest", [20.0, 10.0, None, None]), ("oldest", [10.0, 20.0, None, None])):
        hits = db.search_messages("needle", sort=sort)
        assert [hit["timestamp"] for hit in hits] == order, sort
    for sort, stored in (("oldest", ["one", "four"]), ("newest", ["four", "one"])):
        ties = [hit["snippet"] for hit in db.search_messages("needle", sort=sort)][2:]
        assert ties == [f">>>needle<<< {word}" for word in stored], sort


def test_a_hit_next_to_structured_content_shows_it_as_hermes_does(both: Any) -> None:
    """Content given as a dict is kept as Hermes keeps it (JSON text behind a mark):
    around a hit, the value Hermes reads back, shown as no text, never the mark."""
    hermes, ours = both.hermes, both.ours
    for db in (hermes, ours):
        db.create_session("d", "cli")
        db.append_message("d", "user", "before the lighthouse", timestamp=1.0)
        db.append_message("d", "tool", {"status": "ok", "detail": "x"}, timestamp=2.0)
    expected = hermes.search_messages("lighthouse")
    got = ours.search_messages("lighthouse")
    assert [c["content"] for c in got[0]["context"]] == ["before the lighthouse", ""]
    assert _no_clock(_search_view(got, False)) == _no_clock(_search_view(expected, False))


def test_history_rewrites_keep_the_store_whole(both: Any, store: SessionStore) -> None:
    from hermes_orm.verify import verify_database

    both.create_session("s1", "cli")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turns: list[tuple[str, Any, dict[str, Any]]] = [
        ("user", "first", {}),
        ("assistant", "one", {"tool_calls": [call]}),
        ("tool", "result", {"tool_name": "f", "tool_call_id": "c1"}),
        ("user", {"parts": [{"text": "a dict"}]}, {"platform_message_id": "p-1"}),
        ("assistant", "two", {}),
        ("user", "third", {}),
        ("assistant", "three", {"reasoning": "because"}),
    ]
    for n, (role, content, fields) in enumerate(turns):
        both.append_message("s1", role, content, timestamp=10.0 + n, **fields)
    both.get_messages("s1")
    assert both.has_platform_message_id("s1", "p-1") is True
    both.rewind_to_message("s1", 4)
    both.rewind_to_message("s1", 4)  # again: nothing left to take back, counted still
    both.rewind_to_message("s1", 2)  # not a user message: both raise
    both.rewind_to_message("s1", 999)  # no such message: both raise
    both.get_messages("s1")
    both.get_messages("s1", include_inactive=True)
    both.get_session("s1")
    assert both.has_archived_messages("s1") is True
    both.list_recent_user_messages("s1")
    both.list_recent_user_messages("s1", limit=2, include_inactive=True)
    assert both.restore_rewound("s1", 6) == 2
    both.get_messages_around("s1", 4, window=2)
    both.get_messages_around("s1", 999)
    both.get_anchored_view("s1", 3, window=1, bookend=2)
    both.get_anchored_view("s1", 5, window=1, bookend=1, keep_roles=None)
    assert verify_database(store).problems == []

    assert both.archive_and_compact("s1", [{"role": "user", "content": "summary"}]) == 1
    both.get_messages("s1")
    both.get_messages("s1", include_inactive=True)
    both.get_messages_as_conversation("s1")
    assert both.set_latest_user_api_content("s1", "summary", "summary + memory") == 1
    assert both.set_latest_user_api_content("s1", "not it", "x") == 0
    both.replace_messages(
        "s1",
        [
            {"role": "user", "content": "again", "message_id": "ext-1", "timestamp": 50.0},
            {"role": "assistant", "content": [{"type": "text", "text": "parts"}], "timestamp": 51},
        ],
        active_only=True,
    )
    both.get_messages("s1", include_inactive=True)
    assert verify_database(store).problems == []
    both.replace_messages("s1", [{"role": "user", "content": "only", "timestamp": 60.0}])
    both.get_messages("s1", include_inactive=True)
    both.get_session("s1")
    with pytest.raises(InvalidMessageError):  # a role the store has no place for
        both.ours.replace_messages("s1", [{"role": "wizard", "content": "x"}])
    both.get_messages("s1")  # as it was
    assert verify_database(store).problems == []


def test_deleting_archiving_and_importing(both: Any, store: SessionStore, tmp_path: Path) -> None:
    from hermes_orm.verify import verify_database

    both.create_session("root", "tui", cwd="/repo/a")
    both.append_message("root", "user", "hello", timestamp=1.0)
    both.end_session("root", "compression")
    both.create_session("tip", "tui", parent_session_id="root", cwd="/repo/a")
    both.create_session("empty", "cli", cwd="/repo/b")
    both.end_session("empty", "done")
    both.create_session("titled", "cli")
    both.set_session_title("titled", "Keep me")
    both.update_session_cwd("tip", "/repo/a/src", git_branch="main", git_repo_root="")
    both.backfill_repo_roots({"/repo/a/src": "/repo/a", "/repo/b": "/repo/b"})
    both.distinct_session_cwds()
    assert both.set_session_archived("tip", True) is True  # the compressed root goes too
    both.get_session("root")
    both.distinct_session_cwds(include_archived=True)
    assert both.set_session_archived("missing", True) is False
    both.list_prune_candidates(older_than_days=None)
    assert both.count_empty_sessions() == 1
    assert both.delete_session_if_empty("titled") is False
    assert both.delete_empty_sessions(sessions_dir=tmp_path) == 1
    exported = both.export_session("root")
    assert both.delete_sessions(["root", "root", "", None, "ghost"]) == 1
    both.get_session("tip")
    exported["parent_session_id"] = "tip"
    both.import_sessions([exported])
    both.import_sessions([exported])  # skipped: it exists
    both.import_sessions([{"id": "bad", "model_config": "{", "messages": []}])
    both.get_messages("root")
    both.update_session_billing_route("tip", provider="p", base_url="https://p/v1")
    both.update_session_meta("tip", '{"temperature": 0.5}', model="m")
    both.get_session("tip")
    assert verify_database(store).problems == []


@pytest.mark.apis("sync")
@pytest.mark.backends("postgresql")  # a local SQLite commit has no acknowledgement to lose
def test_append_message_whose_commit_ack_was_lost_stores_one_row(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hermes' write path is exactly once: the store's retry asks the server first."""
    from tests.test_flush import _commit_then_drop

    db = SessionDB(store)
    db.create_session("s", source="cli")
    dropped = _commit_then_drop(store, monkeypatch)
    message_id = db.append_message("s", role="user", content="once")
    assert dropped == [1]
    monkeypatch.undo()
    rows = db.get_messages("s")
    assert [(m["id"], m["content"]) for m in rows] == [(message_id, "once")]
    assert store.get_session("s")["message_count"] == 1


def test_append_message_returns_its_own_rows_id_when_another_process_rewrites_at_once(
    store: SessionStore, elsewhere: SessionDB
) -> None:
    """The id comes from the write's own transaction, not a later look-up by position."""
    ours, other = SessionDB(store), elsewhere
    ours.create_session("s", "cli")
    first = ours.append_message("s", "user", "first")
    armed = [True]

    def rewrite_elsewhere(*_args: Any) -> None:
        # Once our append's connection goes back to the pool, its write committed.
        if armed[0]:
            armed[0] = False
            other.clear_messages("s")
            other.append_message("s", "user", "other-0")
            other.append_message("s", "user", "other-1")  # where ours was

    event.listen(store.engine, "checkin", rewrite_elsewhere)
    try:
        mine = ours.append_message("s", "assistant", "mine")
    finally:
        event.remove(store.engine, "checkin", rewrite_elsewhere)
    assert not armed[0]
    after = ours.get_messages("s")
    assert [m["content"] for m in after] == ["other-0", "other-1"]
    assert mine > first
    assert mine not in {m["id"] for m in after}


def test_a_title_moves_off_a_compressed_ancestor_on_a_rename_as_in_hermes(both: Any) -> None:
    both.create_session("root", "cli")
    assert both.set_session_title("root", "My project") is True
    both.end_session("root", "compression")
    both.create_session("tip", "cli", parent_session_id="root")
    both.create_session("other", "cli")
    assert both.set_session_title("tip", "My project") is True  # the ancestor gives it up
    both.get_session("root")
    both.get_session("tip")
    both.resolve_session_by_title("My project")
    both.set_session_title("other", "My project")  # not an ancestor: both refuse
    both.get_session("tip")


@pytest.mark.backends("postgresql")  # SQLite's write lock orders the two writers
def test_a_title_taken_by_another_process_meanwhile_is_a_value_error(
    store: SessionStore, elsewhere: SessionDB
) -> None:
    ours, other = SessionDB(store), elsewhere
    ours.create_session("a", "cli")
    ours.create_session("b", "cli")
    armed = [True]

    def take_it_first(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if armed[0] and unqualified(statement).startswith("UPDATE hermes_sessions SET title"):
            armed[0] = False
            other.set_session_title("b", "Shared")  # commits before our UPDATE runs

    with (
        listening(store.engine, "before_cursor_execute", take_it_first),
        pytest.raises(InvalidArgumentError, match="already in use by session b"),
    ):
        ours.set_session_title("a", "Shared")
    assert not armed[0]
    assert ours.get_session("a")["title"] is None


@pytest.mark.backends("postgresql")
def test_a_title_taken_meanwhile_on_every_try_is_a_value_error(
    store: SessionStore, elsewhere: SessionDB
) -> None:
    """Each try finds the title free, and another session takes it before the try's
    UPDATE: the write gives up after its tries with Hermes' error, changing nothing."""
    ours, other = SessionDB(store), elsewhere
    for sid in ("a", "b", "c"):
        ours.create_session(sid, "cli")
    takers = iter(["b", "c", "b"])
    tries = []

    def take_it_first(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if unqualified(statement).startswith("SELECT hermes_sessions.id") and "title" in statement:
            for sid in ("b", "c"):  # free again: the try finds no holder
                other.set_session_title(sid, "")
        elif unqualified(statement).startswith("UPDATE hermes_sessions SET title"):
            tries.append(statement)
            other.set_session_title(next(takers), "Shared")  # commits before our UPDATE

    with (
        listening(store.engine, "before_cursor_execute", take_it_first),
        pytest.raises(InvalidArgumentError, match="in use by another session"),
    ):
        ours.set_session_title("a", "Shared")
    assert len(tries) == 3
    assert ours.get_session("a")["title"] is None


def test_negative_limits_and_offsets_read_as_sqlite_reads_them(both: Any) -> None:
    both.create_session("s", "cli")
    for n in range(4):
        both.append_message("s", "user", f"m{n}", timestamp=float(n))
    both.get_messages("s", limit=-1)
    both.get_messages("s", offset=-1)
    both.get_messages("s", limit=2, offset=-5)
    both.get_messages("s", limit=-1, offset=2)
    both.search_sessions(limit=-1)
    both.search_sessions(offset=-1)
    both.search_sessions(limit=-1, offset=-1)


def test_search_messages_pages_past_a_thousand_hits(store: SessionStore) -> None:
    db = SessionDB(store)
    db.create_session("s", "cli")
    store.flush("s", [{"role": "user", "content": f"needle {n}"} for n in range(1_250)])
    assert len(db.search_messages("needle", limit=1_200)) == 1_200
    assert len(db.search_messages("needle", limit=5_000)) == 1_250
    assert len(db.search_messages("needle", limit=-1)) == 1_250
    assert len(db.search_messages("needle", limit=100, offset=1_200)) == 50


@pytest.mark.backends("sqlite")
def test_a_search_in_time_order_reads_bodies_of_more_hits_than_a_statement_may_name(
    tmp_path: Path,
) -> None:
    """Every hit of a search in time order comes in one page: their bodies are read in
    parts, on a SQLite taking 999 parameters a statement (before 3.32; a build may set
    its own bound)."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'small.db'}"
    with SessionStore(url) as store:
        store.upgrade()
        store.create_session("s", source="cli")
        store.flush(
            "s",
            [
                {"role": "user", "content": f"needle {n}", "timestamp": float(n)}
                for n in range(1_250)
            ],
        )
    engine = create_store_engine(url)

    @event.listens_for(engine, "connect")
    def bounded(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    with SessionStore(engine) as store:
        db = SessionDB(store)
        hits = db.search_messages("needle", sort="oldest", limit=-1)
        assert [hit["timestamp"] for hit in hits] == [float(n) for n in range(1_250)]
        assert [hit["timestamp"] for hit in db.search_messages("needle", sort="newest")] == [
            float(n) for n in range(1_249, 1_229, -1)
        ]
    engine.dispose()


def test_a_search_in_time_order_takes_no_cursor(store: SessionStore) -> None:
    """A place in id order is none in time order: refused, not read on one backend and
    left out on the other."""
    from hermes_orm import search

    with store.engine.connect() as conn, pytest.raises(ValueError, match="takes no cursor"):
        search.run(conn, "needle", search.Filters(by_time=True), 5, 10)


def test_a_search_reads_its_hits_as_of_one_moment(
    store: SessionStore, elsewhere: SessionDB
) -> None:
    """Another process replacing the session's messages (/retry, /undo, /compress)
    between the statement that finds the hits and those that read their sessions and
    neighbours takes none of them away: the search answers as of its first statement."""
    db = SessionDB(store)
    db.create_session("s", "cli")
    db.append_message("s", "user", "please deploy the service")
    db.append_message("s", "assistant", "deploying now")
    before = db.search_messages("deploy*")
    assert len(before) == 2
    found = re.compile(r"search_vector|hermes_search MATCH|hermes_search_cjk")

    def retry() -> None:
        elsewhere.replace_messages("s", [{"role": "user", "content": "please deploy the service"}])

    with meanwhile(store.engine, lambda sql: bool(found.search(sql)), retry) as other:
        during = db.search_messages("deploy*")
    assert other.error is None
    assert other.first  # it landed before the search read on
    assert during == before
    assert len(db.search_messages("deploy*")) == 1


def test_search_filters_that_are_not_text_are_refused_on_every_backend(
    store: SessionStore,
) -> None:
    """A source or role is text: any other value is refused before the search runs (a
    database would compare it by its own rules, each differently)."""
    from hermes_orm import SearchQueryError

    db = SessionDB(store)
    db.create_session("s", "cli")
    db.append_message("s", "user", "docker here")
    for filters in (
        {"source_filter": [1]},
        {"role_filter": ["user", 1]},
        {"exclude_sources": [None]},
        {"source_filter": ["cli", "\ud800"]},
    ):
        with pytest.raises(SearchQueryError, match=r"is not a str|surrogate"):
            db.search_messages("docker", **filters)  # type: ignore[arg-type]
    assert [hit["snippet"] for hit in db.search_messages("docker", source_filter=["cli"])] == [
        ">>>docker<<< here"
    ]


def test_a_read_only_sessiondb_writes_nothing(store: SessionStore) -> None:
    """As Hermes' own, opened ``read_only`` (its dashboard's): every write is refused
    before anything is written; reads work."""
    from hermes_orm import DatabaseError

    writer = SessionDB(store)
    writer.create_session("s", "cli")
    writer.append_message("s", "user", "keep me")
    reader = SessionDB(store, read_only=True)
    for write in (
        lambda: reader.create_session("t", "cli"),
        lambda: reader.append_message("s", "user", "written through a read-only handle"),
        lambda: reader.set_session_title("s", "renamed"),
        lambda: reader.end_session("s", "done"),
        lambda: reader.update_token_counts("s", input_tokens=5),
        lambda: reader.clear_messages("s"),
        lambda: reader.replace_messages("s", [{"role": "user", "content": "x"}]),
        lambda: reader.delete_session("s"),
        lambda: reader.prune_sessions(older_than_days=0),
        lambda: reader.set_meta("k", "v"),
        reader.rebuild_fts,
        reader.vacuum,
    ):
        with pytest.raises(DatabaseError, match="opened read_only"):
            write()
    assert [m["content"] for m in reader.get_messages("s")] == ["keep me"]
    assert reader.get_session("s")["title"] is None
    assert reader.get_session("t") is None
    assert [r["session_id"] for r in reader.search_messages("keep")] == ["s"]


def test_tool_calls_count_the_live_messages_after_compaction_as_in_hermes(both: Any) -> None:
    call = [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]

    def tool_calls() -> list[int]:  # (message_count differs: it counts archived rows here)
        return [db.get_session("s")["tool_call_count"] for db in (both.hermes, both.ours)]

    both.create_session("s", "cli")
    both.append_message("s", "user", "hi")
    both.append_message("s", "assistant", None, tool_calls=call)
    both.append_message("s", "tool", "res", tool_call_id="t1")
    assert tool_calls() == [1, 1]
    both.archive_and_compact("s", [{"role": "user", "content": "summary"}])
    assert tool_calls() == [0, 0]
    both.append_message("s", "assistant", None, tool_calls=call)
    assert tool_calls() == [1, 1]
    both.replace_messages("s", [{"role": "user", "content": "x"}], active_only=True)
    assert tool_calls() == [0, 0]


def test_a_none_token_counter_counts_as_zero(store: SessionStore) -> None:
    db = SessionDB(store)
    db.update_token_counts("t", input_tokens=None, output_tokens=3, api_call_count=None)
    session = db.get_session("t")
    assert session is not None
    assert (session["input_tokens"], session["output_tokens"], session["api_call_count"]) == (
        0,
        3,
        0,
    )


def test_every_public_method_of_hermes_sessiondb_is_there() -> None:
    import inspect

    from hermes_state import SessionDB as HermesSessionDB

    def public(cls: type) -> set[str]:
        return {n for n, v in inspect.getmembers(cls) if not n.startswith("_") and callable(v)}

    assert len(public(HermesSessionDB)) >= 107
    assert sorted(public(HermesSessionDB) - public(SessionDB)) == []


@pytest.mark.apis("sync")
@pytest.mark.parametrize("how", ["delete_session_if_empty", "clear_messages"])
def test_a_message_stored_meanwhile_outlives_an_emptiness_check(
    store: SessionStore, how: str
) -> None:
    """A flush holds its session's row until it commits: the check waits, then sees it."""
    import threading
    import time

    store.create_session("ghost", source="cli")
    db = SessionDB(fresh_store(store))
    flushed: list[Any] = []

    def writer() -> None:
        def work(conn: Any) -> Any:
            result = store.flush_in(conn, "ghost", [{"role": "user", "content": "important"}])
            time.sleep(0.6)  # the write's transaction still open
            return result

        flushed.append(store.write_transaction(work))

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.2)
    if how == "delete_session_if_empty":
        assert db.delete_session_if_empty("ghost") is False
        expected = [{"role": "user", "content": "important"}]
    else:
        db.clear_messages("ghost")  # after the write: it clears the message, whole
        expected = []
    thread.join()
    assert flushed[0][0].written == 1
    assert store.get_messages("ghost") == expected
    from hermes_orm.verify import verify_database

    assert verify_database(store).problems == []


@pytest.mark.parametrize(
    "session",
    [
        {"id": "x" * 300, "messages": [{"role": "user", "content": "hi"}]},
        {"id": "nul\x00id", "messages": []},
        {"id": "nul-title", "title": "a\x00b", "messages": []},
        {"id": "huge", "input_tokens": 2**70, "messages": []},
        {"id": "nan", "started_at": "nan", "messages": []},
        {"id": "inf", "started_at": "inf", "messages": []},
        {"id": "long-source", "source": "s" * 5000, "messages": []},
    ],
    ids=["long id", "NUL in id", "NUL in title", "64-bit", "NaN start", "inf start", "source"],
)
def test_an_import_the_store_could_not_hold_is_refused_whole(
    store: SessionStore, session: dict[str, Any]
) -> None:
    """As every other call: a typed refusal (here Hermes' ``ok: False``), nothing written."""
    db = SessionDB(store)
    good = {"id": "fine", "messages": [{"role": "user", "content": "hi"}]}
    result = db.import_sessions([good, session])
    assert result["ok"] is False
    assert [e["index"] for e in result["errors"]] == [1]
    assert store.list_sessions().sessions == []


def test_a_session_whose_extra_another_tool_wrote_as_a_list_reads(store: SessionStore) -> None:
    """Not an object (written by hand, or an older tool): Hermes' view of it has no extra keys."""
    from sqlalchemy import text

    from tests.conftest import sync_engine, table_name

    ours = SessionDB(store)
    ours.create_session("s", "cli", model="m1")
    engine = sync_engine(store)
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE {table_name(engine, 'hermes_sessions')} SET extra = :x WHERE id = 's'"),
            {"x": '["tag-a", "tag-b"]'},
        )
    session = ours.get_session("s")
    assert session is not None
    assert (session["id"], session["model"]) == ("s", "m1")
    assert [row["id"] for row in ours.list_sessions_rich()] == ["s"]


def test_odd_values_hermes_callers_pass_are_taken_as_hermes_takes_them(both: Any) -> None:
    """Numbers where Hermes keeps text, lookups by what no row holds: as in Hermes' file."""
    both.create_session("12345", "cli")
    both.create_session("s", "cli")
    both.end_session("s", True)  # stored as SQLite's text of it: "1"
    both.update_session_model("s", math.nan)  # NaN binds as NULL
    both.update_session_model("12345", 3.0)  # "3.0"
    both.update_system_prompt("s", 42)  # "42"
    both.get_session("s")
    both.get_session("12345")
    both.get_session(12345)  # compared as its text
    both.get_session("a\x00b")
    assert both.get_session(12345) is not None
    # Hermes' sqlite3 raises UnicodeEncodeError; no row holds it: none found (not the
    # session whose id holds the replacement character, which a write would store).
    both.ours.create_session("a\ufffd", "cli")
    assert both.ours.get_session("a\ud800") is None
    assert both.ours.delete_session("a\ud800") is False
    assert both.ours.get_session("a\ufffd") is not None
    both.has_platform_message_id("s", 7)
    both.get_meta(12345)
    both.delete_session(12345)
    both.get_session("12345")


def test_values_hermes_file_stores_that_no_column_of_ours_holds_are_refused_first(
    store: SessionStore,
) -> None:
    ours = SessionDB(store)
    ours.create_session("s", "cli")
    before = ours.get_session("s")
    refused: list[tuple[str, Any]] = [
        ("update_system_prompt", ("s", ["a"])),
        ("update_session_model", ("s", b"model")),
    ]
    for name, args in refused:
        with pytest.raises(InvalidSessionError, match="must be text"):
            getattr(ours, name)(*args)
    for kwargs in (
        {"input_tokens": 1.5},
        {"output_tokens": 2**70},
        {"reasoning_tokens": "many"},
        {"estimated_cost_usd": math.nan},
        {"actual_cost_usd": math.inf},
        {"estimated_cost_usd": "1.0"},
        {"billing_provider": ["x"]},
    ):
        with pytest.raises(InvalidSessionError):
            ours.update_token_counts("s", **kwargs)
        with pytest.raises(InvalidSessionError):
            ours.update_token_counts("new", **kwargs)  # refused before the session is made
    assert ours.get_session("s") == before
    assert ours.get_session("new") is None
    ours.update_token_counts("s", input_tokens=2.0, output_tokens=True, estimated_cost_usd=0.5)
    session = ours.get_session("s")
    assert session is not None
    assert (session["input_tokens"], session["output_tokens"]) == (2, 1)


def test_lookups_hermes_callers_make_with_what_no_row_holds(both: Any) -> None:
    both.create_session("s", "cli")
    both.find_session_by_origin(platform="telegram", chat_id="a\x00")
    assert both.ours.find_session_by_origin(platform="telegram", chat_id="a\x00") is None
    for call in (
        lambda db: db.get_messages("s", limit=math.nan),
        lambda db: db.get_messages("s", limit="many"),
        lambda db: db.search_messages("hello", limit=None),
    ):
        with pytest.raises(InvalidArgumentError, match="limit and offset must be integers"):
            call(both.ours)
        with pytest.raises(Exception):  # noqa: B017, PT011 - Hermes' file refuses them too
            call(both.hermes)


def test_a_compression_cooldown_of_none_is_stored_as_none(both: Any) -> None:
    both.create_session("s", "cli")
    both.record_compression_failure_cooldown("s", time.time() + 600, "too long")
    for db in (both.hermes, both.ours):  # (remaining_seconds differ by the clock)
        assert db.get_compression_failure_cooldown("s")["error"] == "too long"
    both.record_compression_failure_cooldown("s", None)  # Hermes stores NULL: none running
    assert both.get_compression_failure_cooldown("s") is None


def test_a_compression_cooldown_or_lock_expiry_of_nan_is_none(both: Any) -> None:
    """Hermes' sqlite3 binds NaN as NULL: no cooldown, and no lock (its expiry may
    not be NULL). PostgreSQL stored the NaN: a lock that never expired."""
    both.create_session("s", "cli")
    both.record_compression_failure_cooldown("s", math.nan, "too long")
    assert both.get_compression_failure_cooldown("s") is None
    assert both.try_acquire_compression_lock("s", "me", ttl_seconds=math.nan) is False
    assert both.try_acquire_compression_lock("s", "other") is True
    assert both.refresh_compression_lock("s", "other", ttl_seconds=math.nan) is False
    assert both.get_compression_lock_holder("s") == "other"


def test_what_postgresql_text_cannot_hold_in_compression_state(store: SessionStore) -> None:
    """A cooldown's error (shown to the user) keeps the cooldown, its NUL replaced; a
    lock's holder with NUL or a lone surrogate is refused, on either backend (PostgreSQL
    refused it only as it wrote: the cooldown was lost, the lock taken on SQLite alone)."""
    db = SessionDB(store)
    db.create_session("s", "cli")
    db.record_compression_failure_cooldown("s", time.time() + 600, "bad\x00byte")
    assert db.get_compression_failure_cooldown("s")["error"] == "bad\ufffdbyte"  # type: ignore[index]
    for holder in ("h\x00", "h\ud800"):
        with pytest.raises(InvalidArgumentError, match="holder"):
            db.try_acquire_compression_lock("s", holder)
        with pytest.raises(InvalidArgumentError, match="holder"):
            db.refresh_compression_lock("s", holder)
    assert db.get_compression_lock_holder("s") is None
    with pytest.raises(InvalidArgumentError, match="64 bits"):
        db.set_compression_fallback_streak("s", 2**63)
    assert db.get_compression_fallback_streak("s") == 0


def test_a_recent_messages_limit_past_64_bits_is_no_limit(store: SessionStore) -> None:
    """As every other window of the adapter reads it (SQLite could not bind it)."""
    db = SessionDB(store)
    db.create_session("s", "cli")
    db.append_message("s", "user", content="hello")
    assert [m["preview"] for m in db.list_recent_user_messages("s", limit=2**64)] == ["hello"]


def _append_lost_at_commit(monkeypatch: pytest.MonkeyPatch, committed: bool) -> None:
    """``SessionStore.append_row`` raises as the database goes out of reach at the COMMIT.

    With ``committed``, the COMMIT landed first (its acknowledgement lost).
    """
    real = SessionStore.append_row

    def lost(self: SessionStore, session_id: str, message: dict[str, Any]) -> Any:
        if committed:
            real(self, session_id, message)
        raise DatabaseUnavailableError("connection lost at COMMIT", attempts=3, seconds=5.0)

    monkeypatch.setattr(SessionStore, "append_row", lost)


@pytest.mark.parametrize("before", ["other", "equal"], ids=["after-another", "after-an-equal"])
@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not-committed"])
@pytest.mark.parametrize("timed", [True, False], ids=["timestamp", "no-timestamp"])
def test_an_append_whose_outcome_was_unknown_is_not_stored_twice_by_hermes_retry(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch, committed: bool, timed: bool, before: str
) -> None:
    """The database out of reach past the retry bound as the COMMIT went: Hermes appends again.

    If the first append committed, its row is the session's last: its id comes
    back and nothing is written twice; if it did not, the message is stored,
    even right after an equal one ("continue", sent twice).
    """
    db = SessionDB(store)
    db.create_session("s", source="cli")
    stamp = 1_767_000_000.5 if timed else None
    answer = {"role": "assistant", "content": "answer", "finish_reason": "stop", "timestamp": stamp}
    if before == "equal":
        db.append_message("s", **answer)
    else:
        db.append_message("s", "user", "question")
    _append_lost_at_commit(monkeypatch, committed)
    with pytest.raises(DatabaseUnavailableError):
        db.append_message("s", **answer)
    monkeypatch.undo()
    row_id = db.append_message("s", **answer)
    rows = db.get_messages("s")
    assert [r["content"] for r in rows] == [
        "answer" if before == "equal" else "question",
        "answer",
    ]
    assert rows[-1]["id"] == row_id
    # The next message, the same again or not, is a message of its own.
    db.append_message("s", **answer)
    assert len(db.get_messages("s")) == 3


def test_an_unknown_outcome_of_a_first_append_is_not_guessed(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This object appended nothing to the session before: an equal last row may be another's."""
    db, other = SessionDB(store), SessionDB(store)
    other.create_session("s", source="cli")
    other.append_message("s", "user", "continue")
    monkeypatch.setattr(
        SessionStore,
        "append_row",
        lambda *_: (_ for _ in ()).throw(DatabaseUnavailableError("lost", attempts=3)),
    )
    with pytest.raises(DatabaseUnavailableError):
        db.append_message("s", "user", "continue")
    monkeypatch.undo()
    db.append_message("s", "user", "continue")
    assert [r["content"] for r in db.get_messages("s")] == ["continue", "continue"]


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not-committed"])
@pytest.mark.parametrize(
    "scenario", ["first-append", "another-before", "another-between", "cleared", "replaced"]
)
def test_a_retried_append_is_settled_among_other_writers_and_rewrites(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch, committed: bool, scenario: str
) -> None:
    """Whatever else wrote or rewrote the session, Hermes' retry stores its message once."""
    db, other = SessionDB(store), SessionDB(store)
    other.create_session("s", source="cli")
    message = "continue" if scenario == "first-append" else "m"
    if scenario == "first-append":
        other.append_message("s", "user", "continue")  # an equal message, not this object's
    else:
        db.append_message("s", "user", "q")
    if scenario == "another-before":
        other.append_message("s", "user", "from another")
    elif scenario == "cleared":
        db.clear_messages("s")
    elif scenario == "replaced":
        db.replace_messages("s", [{"role": "user", "content": "r"}])
    _append_lost_at_commit(monkeypatch, committed)
    with pytest.raises(DatabaseUnavailableError):
        db.append_message("s", "user", message)
    monkeypatch.undo()
    if scenario == "another-between":
        other.append_message("s", "user", "from another")
    db.append_message("s", "user", message)
    expected = {
        "first-append": ["continue", "continue"],
        "another-before": ["q", "from another", "m"],
        "another-between": ["q", "m", "from another"] if committed else ["q", "from another", "m"],
        "cleared": ["m"],
        "replaced": ["r", "m"],
    }[scenario]
    assert [r["content"] for r in db.get_messages("s")] == expected


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not-committed"])
def test_an_equal_message_another_writer_stores_before_the_retry_is_its_own(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    """'yes' from another writer between the failure and the retry is not the failed 'yes'."""
    db, other = SessionDB(store), SessionDB(store)
    db.create_session("s", source="cli")
    db.append_message("s", "user", "q")
    _append_lost_at_commit(monkeypatch, committed)
    with pytest.raises(DatabaseUnavailableError):
        db.append_message("s", "user", "yes")
    monkeypatch.undo()
    other.append_message("s", "user", "yes")
    db.append_message("s", "user", "yes")
    assert [r["content"] for r in db.get_messages("s")] == ["q", "yes", "yes"]


def test_a_retry_whose_own_read_fails_is_settled_by_the_next(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = SessionDB(store)
    db.create_session("s", source="cli")
    db.append_message("s", "user", "q")
    real_append, real_read = SessionStore.append_row, SessionStore.read_transaction

    def unreachable(self: SessionStore, work: Any) -> Any:
        raise DatabaseUnavailableError("still out of reach", attempts=3, seconds=5.0)

    _append_lost_at_commit(monkeypatch, committed=True)
    with pytest.raises(DatabaseUnavailableError):
        db.append_message("s", "assistant", "m", timestamp=1_767_000_000.0)
    monkeypatch.setattr(SessionStore, "append_row", real_append)
    monkeypatch.setattr(SessionStore, "read_transaction", unreachable)
    with pytest.raises(DatabaseUnavailableError):  # the retry cannot even look
        db.append_message("s", "assistant", "m", timestamp=1_767_000_000.0)
    monkeypatch.setattr(SessionStore, "read_transaction", real_read)
    db.append_message("s", "assistant", "m", timestamp=1_767_000_000.0)
    assert [r["content"] for r in db.get_messages("s")] == ["q", "m"]


#: Session ids no row can hold: text no backend stores or compares, and what is no text.
_NO_ROW_IDS = ["a\ud800b", "a\x00b", ["s"], {"s": 1}, b"s"]


@pytest.mark.parametrize("bad", _NO_ROW_IDS, ids=repr)
def test_a_session_id_no_row_can_hold_finds_nothing_and_makes_nothing(
    store: SessionStore, bad: Any
) -> None:
    db = SessionDB(store)
    db.create_session("s", "cli")
    db.append_message("s", "user", "hello")
    assert db.get_session(bad) is None
    assert db.get_messages(bad) == []
    assert db.message_count(bad) == 0
    assert db.end_session(bad, "x") is None
    assert db.get_session_title(bad) is None
    assert db.list_recent_user_messages(bad) == []
    assert db.has_archived_messages(bad) is False
    assert db.delete_session(bad) is False
    for makes in (
        lambda: db.create_session(bad, "cli"),
        lambda: db.ensure_session(bad),
        lambda: db.append_message(bad, "user", "x"),
        lambda: db.append_message(session_id=bad, role="user", content="x"),
        lambda: db.try_acquire_compression_lock(bad, "me"),
    ):
        with pytest.raises(InvalidSessionError):
            makes()
    assert [s["id"] for s in store.list_sessions().sessions] == ["s"]
    assert db.message_count() == 1  # (None: every session's, as Hermes counts)
    # What a lookup returns of the id it was given is that id, as on Hermes' file.
    assert db.get_compression_tip(bad) == bad
    assert db.get_conversation_root(bad) == bad
    assert db.resolve_resume_session_id(bad) == bad
    assert db.get_telegram_topic_binding_by_session(session_id=bad) is None
    assert db.is_telegram_session_linked_to_topic(session_id=bad) is False
    # Methods that only change a session that exists change nothing.
    assert db.request_handoff(bad, "telegram") is False
    assert db.record_compression_failure_cooldown(bad, 60.0, "too long") is None
    assert db.update_session_billing_route(bad, provider="p", base_url="u") is None
    with pytest.raises(
        SessionNotFoundError, match=re.escape(repr(bad if isinstance(bad, str) else repr(bad)))
    ):
        db.replace_messages(bad, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("bad", _NO_ROW_IDS, ids=repr)
def test_a_bulk_delete_skips_the_ids_no_row_can_hold(store: SessionStore, bad: Any) -> None:
    """Hermes' file finds no row for an id with NUL; PostgreSQL refused to compare it (a
    DatabaseError), and both backends' drivers failed to encode a lone surrogate."""
    db = SessionDB(store)
    db.create_session("s", "cli")
    assert db.delete_sessions([bad]) == 0
    assert db.delete_sessions([bad, "s"]) == 1


@pytest.mark.parametrize("bad", _NO_ROW_IDS, ids=repr)
def test_a_cron_job_whose_id_no_session_id_can_hold_has_no_runs(
    store: SessionStore, bad: Any
) -> None:
    """Hermes' file finds no run of a job id with NUL; PostgreSQL refused to compare it (a
    DatabaseError), and both backends' drivers failed to encode a lone surrogate."""
    db = SessionDB(store)
    db.create_session("cron_j_1", "cron")
    assert db.list_cron_job_runs(bad) == []
    assert [run["id"] for run in db.list_cron_job_runs("j")] == ["cron_j_1"]


def test_a_topic_binding_without_a_managed_mode_is_refused_before_anything_is_written(
    store: SessionStore,
) -> None:
    """Hermes' file refuses ``managed_mode=None`` (its column is NOT NULL); the text
    ``'None'`` is not stored in its place."""
    db = SessionDB(store)
    db.create_session("s", "telegram")
    topic = {"chat_id": "c", "thread_id": "t", "user_id": "u", "session_key": "k"}
    with pytest.raises(TypeError, match="managed_mode"):
        db.bind_telegram_topic(**topic, session_id="s", managed_mode=None)  # type: ignore[arg-type]
    assert db.get_telegram_topic_binding(chat_id="c", thread_id="t") is None
    db.bind_telegram_topic(**topic, session_id="s")
    assert db.get_telegram_topic_binding(chat_id="c", thread_id="t")["managed_mode"] == "auto"


def test_a_session_id_given_as_a_number_is_its_text(store: SessionStore) -> None:
    db = SessionDB(store)
    db.create_session(123, "cli")
    db.append_message(session_id=123, role="user", content="hello")
    assert db.get_session("123")["id"] == "123"  # type: ignore[index]
    assert [m["content"] for m in db.get_messages(123)] == ["hello"]
    assert db.get_messages(2**70) == []  # (no int the database would have to hold)


def test_deletions_take_a_directory_as_text_and_refuse_what_is_no_path_first(
    store: SessionStore, tmp_path: Path
) -> None:
    db = SessionDB(store)
    for sid in ("a", "b"):
        db.create_session(sid, "cli")
    (tmp_path / "a.json").write_text("{}")
    assert db.delete_session("a", sessions_dir=str(tmp_path))
    assert not (tmp_path / "a.json").exists()
    for bad in (1, ["dir"], b"/tmp"):
        with pytest.raises(InvalidArgumentError, match="sessions_dir"):
            db.delete_session("b", sessions_dir=bad)
        with pytest.raises(InvalidArgumentError, match="sessions_dir"):
            db.delete_sessions(["b"], sessions_dir=bad)
        with pytest.raises(InvalidArgumentError, match="sessions_dir"):
            db.prune_sessions(older_than_days=-1, sessions_dir=bad)
    assert db.get_session("b") is not None


@pytest.mark.parametrize("days", ["30", "x" * 100_000, math.nan, math.inf, True, [30]], ids=repr)
def test_a_number_of_days_that_is_none_is_refused(store: SessionStore, days: Any) -> None:
    db = SessionDB(store)
    for call in (db.prune_sessions, db.list_prune_candidates, db.archive_sessions):
        with pytest.raises(InvalidArgumentError, match="older_than_days must be a number"):
            call(older_than_days=days)


def test_a_meta_key_no_row_can_hold_is_refused_and_a_number_is_its_text(
    store: SessionStore,
) -> None:
    db = SessionDB(store)
    for key in ("k\ud800", "k\x00", b"k", ["k"]):
        with pytest.raises(InvalidArgumentError, match="meta key"):
            db.set_meta(key, "v")
    with pytest.raises(InvalidSessionError, match="value must be text"):
        db.set_meta("k", ["v"])
    db.set_meta(5, "v")
    assert db.get_meta("5") == db.get_meta(5) == "v"


def test_filters_given_as_hermes_binds_them_read_as_its_file_reads_them(both: Any) -> None:
    for sid, source in (("s1", "cli"), ("s2", "telegram")):
        both.create_session(sid, source)
        both.append_message(sid, "user", "hello")
    both.set_session_title("s2", "123")
    both.session_count(exclude_sources="cli")  # its characters, as Hermes binds a str
    both.session_count(exclude_sources=["cli"])
    both.session_count(min_message_count=True)
    both.restore_rewound("s1", None)
    both.get_session_by_title(123)
    both.resolve_session_id("s")  # (two match)
    ours = both.ours
    assert ours.resolve_session_id(2**70) is None  # Hermes' file: AttributeError
    assert ours.resolve_session_id("a\ud800") is None
    assert ours.get_session_by_title(2**70) is None  # Hermes' file: OverflowError
    assert [m["content"] for m in ours.get_messages("s1", limit=2**70)] == ["hello"]
    assert ours.get_messages("s1", offset=2**70) == []
    assert ours.restore_rewound("s1", 2**70) == 0
    for call, refused in (
        (lambda: ours.session_count(exclude_sources=5), "exclude_sources must be a list"),
        (lambda: ours.session_count(exclude_sources=[1]), "exclude_sources must be a list"),
        (lambda: ours.session_count(min_message_count="2"), "min_message_count must be"),
        (lambda: ours.restore_rewound("s1", [3]), "since_message_id must be"),
    ):
        with pytest.raises(InvalidArgumentError, match=refused):
            call()
    with pytest.raises(InvalidSessionError, match="model_config_json must be JSON"):
        ours.update_session_meta("s1", b"{}")


# -- Hermes' SQL on its SessionDB's own connection ------------------------------------------

#: The hermes-agent modules that run SQL on a SessionDB's connection (``db._conn``,
#: ``db._execute_write``) rather than through its methods.
_SQL_USERS = (
    "hermes_cli.cli_agent_setup_mixin",
    "gateway.platforms.api_server",
    "hermes_cli.web_server",
    "tools.session_search_tool",
    "hermes_cli.main",
)


def test_the_statements_served_are_hermes_own_as_its_source_writes_them() -> None:
    """Each statement the adapter's connection serves is known by its text: that text
    must be one Hermes' code holds (an edit of either would leave it unserved)."""
    import ast
    import importlib.util

    written = set()
    for module in _SQL_USERS:
        spec = importlib.util.find_spec(module)
        assert spec is not None, module
        assert spec.origin is not None, module
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        written |= {
            _hermes_sql.normalized(node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
    assert set(_hermes_sql._STATEMENTS) <= written


def _stored_alike(both: Any) -> None:
    """The same sessions (a lineage among them) and messages, through each SessionDB."""
    both.create_session("root", "cli")
    both.create_session("child", "cli", parent_session_id="root")
    both.create_session("grandchild", "cli", parent_session_id="child")
    both.create_session("other", "telegram")
    both.set_session_title("other", "Taken")
    for session_id in ("root", "child", "other"):
        both.append_message(session_id, "user", f"hello from {session_id}")
    both.end_session("root", "cli_close")


def test_hermes_sql_on_the_connection_answers_as_on_hermes_own(both: Any) -> None:
    """The statements Hermes runs on ``db._conn`` (the CLI's resume, the dashboard's walk of
    a lineage, session_search's owner of a message), against Hermes' own file."""
    _stored_alike(both)
    hermes, ours = both.hermes, both.ours

    def rows(sql: str, *params: Any) -> list[dict[str, Any]]:
        answers = []
        for db in (hermes, ours):
            found = db._conn.execute(sql, params).fetchall()
            for row in found:  # by name and by position alike
                assert tuple(row) == tuple(row[i] for i in range(len(row)))
                assert [row[k] for k in row.keys()] == list(row)  # noqa: SIM118 (rows iterate values)
            answers.append(sorted((dict(row) for row in found), key=repr))
        assert _no_clock(answers[0]) == _no_clock(answers[1]), sql
        return answers[1]

    walk = _HERMES_WALK
    assert [r["id"] for r in rows(walk, "root")] == ["child", "grandchild", "root"]
    assert rows(walk, "missing") == []
    message_id = ours.get_messages("child")[0]["id"]
    assert rows("SELECT session_id FROM messages WHERE id = ?", message_id) == [
        {"session_id": "child"}
    ]
    assert rows("SELECT session_id FROM messages WHERE id = ?", str(message_id)) == [
        {"session_id": "child"}
    ]
    assert rows("SELECT session_id FROM messages WHERE id = ?", 10**6) == []
    for odd in (f"{message_id}.0", f"{message_id}e0", float(message_id), True, "\u0662", "²"):
        rows("SELECT session_id FROM messages WHERE id = ?", odd)  # as SQLite reads them
    assert rows("SELECT id FROM sessions WHERE title = ? AND id != ?", "Taken", "x")[0]["id"]
    # The CLI's resume: Hermes reopens the row, then commits.
    for db in (hermes, ours):
        db._conn.execute(
            "UPDATE sessions SET ended_at = NULL, end_reason = NULL WHERE id = ?", ("root",)
        )
        db._conn.commit()
    both.get_session("root")
    assert ours.get_session("root")["ended_at"] is None
    with pytest.raises(sqlite3.OperationalError, match=r"SQL written for Hermes' own state\.db"):
        ours._conn.execute("SELECT date(started_at, 'unixepoch') FROM sessions")


def test_the_api_server_creates_sessions_as_on_hermes_own(both: Any) -> None:
    """``POST /api/sessions`` of Hermes' API server platform runs its check, insert and title
    in one ``db._execute_write``: the same answers, and sessions, as on Hermes' own file."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from gateway.config import PlatformConfig
    from gateway.platforms.api_server import APIServerAdapter

    both.create_session("existing", "cli")
    both.set_session_title("existing", "Taken")
    requests = [
        {"id": "api-1", "title": "Plan", "system_prompt": "Be brief.", "model": "m"},
        {"id": "api-1"},  # exists: 409
        {"id": "api-2", "title": "Taken"},  # a title in use: 400, and no session made
        {"id": "api-3"},
        {"id": "existing"},
    ]

    async def answers(db: Any) -> list[list[Any]]:
        adapter = APIServerAdapter(PlatformConfig(enabled=True, extra={"key": ""}))
        adapter._session_db = db  # (Hermes' own override of the profile's database)
        app = web.Application()
        app.router.add_post("/api/sessions", adapter._handle_create_session)
        out = []
        async with TestClient(TestServer(app)) as client:
            for body in requests:
                response = await client.post("/api/sessions", json=body)
                out.append([response.status, await response.json()])
        return out

    hermes = asyncio.run(answers(both.hermes))
    ours = asyncio.run(answers(both.ours))
    assert [status for status, _ in ours] == [201, 409, 400, 201, 409]
    assert _no_clock(ours) == _no_clock(hermes)
    for session_id in ("api-1", "api-2", "api-3"):
        both.get_session(session_id)
    assert both.ours.get_session("api-1")["title"] == "Plan"
    assert both.ours.get_session("api-2") is None


@pytest.mark.parametrize(
    "given", ["2", " 2 ", "2.0", "1e0", "-1e30", 2.0, 2.5, True, "x", b"2", None, -1]
)
def test_a_message_id_of_any_type_is_read_as_hermes_file_reads_it(both: Any, given: Any) -> None:
    """SQLite compares an INTEGER column with the number a text holds, and a fraction, other
    text or bytes with no id; PostgreSQL refused to compare a bigint with text or a bool."""
    both.create_session("s", "cli")
    ids = [both.append_message("s", "user", f"m{n}") for n in range(4)]
    both.get_messages_around("s", given, window=1)
    both.get_anchored_view("s", given, window=1)
    both.rewind_to_message("s", ids[1])  # ids[1:] taken back
    both.restore_rewound("s", given)
    both.get_messages("s", include_inactive=True)
    both.rewind_to_message("s", given)
    both.get_messages("s", include_inactive=True)
    # Past 64 bits (Hermes' sqlite3: OverflowError), no message's id: nothing found.
    ours = both.ours
    assert ours.get_messages_around("s", 2**70)["window"] == []
    assert ours.restore_rewound("s", 2**70) == 0
    assert ours.restore_rewound("s", -(2**70)) == 0
    with pytest.raises(InvalidArgumentError, match="not found"):
        ours.rewind_to_message("s", 2**70)


def test_a_window_or_bookend_that_is_no_number_is_refused(both: Any) -> None:
    """Hermes compares them with 0 first (a TypeError); the adapter's error is typed."""
    both.create_session("s", "cli")
    first = both.append_message("s", "user", "hello")
    for name, value in (("window", "3"), ("window", None), ("bookend", "3"), ("bookend", None)):
        views = ["get_anchored_view"] + (["get_messages_around"] if name == "window" else [])
        for view in views:
            with pytest.raises(TypeError):
                getattr(both.hermes, view)("s", first, **{name: value})
            with pytest.raises(InvalidArgumentError, match=f"{name} must be a number"):
                getattr(both.ours, view)("s", first, **{name: value})
    both.get_anchored_view("s", first, window=-1, bookend=True)


def test_a_window_past_what_a_position_holds_is_the_whole_session(both: Any) -> None:
    """Positions are 32-bit on PostgreSQL: a window of 2**31 or more failed there alone
    (and one past 64 bits on SQLite, untyped), where Hermes reads the whole session."""
    both.create_session("s", "cli")
    ids = [both.append_message("s", "user", f"m{n}") for n in range(3)]
    around = both.get_messages_around("s", ids[1], window=2**40)
    assert around["messages_before"] == around["messages_after"] == 1
    both.get_anchored_view("s", ids[1], window=2**40)
    whole = both.ours.get_messages_around("s", ids[1], window=2**64)
    assert [m["content"] for m in whole["window"]] == ["m0", "m1", "m2"]


def test_a_lone_surrogate_is_refused_where_hermes_binds_the_text_as_given(both: Any) -> None:
    """Hermes replaces lone surrogates in a message's content, tool name and reasoning only;
    elsewhere its sqlite3 refuses them (a ValueError, nothing written): so does the adapter."""
    both.create_session("s", "cli")
    for key in ("tool_call_id", "finish_reason", "platform_message_id", "effect_disposition"):
        both.append_message("s", "assistant", "x", **{key: "a\udc00"})
    for key in ("content", "tool_name", "reasoning", "reasoning_content"):  # replaced
        both.append_message("s", "assistant", **{"content": "x", key: "a\udc00"})
    both.end_session("s", "done\ud800")
    both.update_system_prompt("s", "prompt\ud800")
    both.update_session_model("s", "model\ud800")
    both.create_session("t", "cli\ud800")
    both.get_messages("s")
    both.get_session("s")
    both.get_session("t")


def test_session_text_holding_nul_is_refused_on_either_backend_before_any_write(
    store: SessionStore,
) -> None:
    """PostgreSQL text holds no NUL: there the server refused it (untyped), after
    update_token_counts had made the session; SQLite kept what SessionStore refuses."""
    db = SessionDB(store)
    db.create_session("s", "cli")
    for call in (
        lambda: db.update_system_prompt("s", "a\x00b"),
        lambda: db.update_session_model("s", "m\x00"),
        lambda: db.end_session("s", "r\x00"),
        lambda: db.set_meta("k", "v\x00"),
        lambda: db.update_token_counts("new", input_tokens=1, cost_status="ok\x00"),
    ):
        with pytest.raises(InvalidSessionError, match="contains NUL"):
            call()
    with pytest.raises(InvalidArgumentError, match="at most 255 characters"):
        db.set_meta("k" * 256, "v")
    session = db.get_session("s")
    assert (session["system_prompt"], session["model"], session["ended_at"]) == (None, None, None)
    assert db.get_meta("k") is None
    assert db.get_session("new") is None
    db.set_meta("k" * 255, "v")
    assert db.get_meta("k" * 255) == "v"


@pytest.mark.parametrize("bad", ["/w\x00", "/w\ud800"], ids=repr)
def test_a_cwd_no_session_can_hold_is_refused_before_it_is_written(
    store: SessionStore, bad: str
) -> None:
    """SQLite kept NUL, which PostgreSQL text cannot hold (a DatabaseError there); a lone
    surrogate raised the driver's UnicodeEncodeError on both."""
    db = SessionDB(store)
    db.create_session("s", "cli")
    for args in ((bad,), ("/w", bad), ("/w", "main", bad), (["/w"],), ("/w", 5), ("/w", "", 5)):
        with pytest.raises(InvalidSessionError):
            db.update_session_cwd("s", *args)
    session = db.get_session("s")
    assert session is not None
    assert (session["cwd"], session["git_branch"], session["git_repo_root"]) == (None,) * 3
    db.update_session_cwd("s", 5, " main ")  # (a number is its text, as in Hermes' file)
    session = db.get_session("s")
    assert session is not None
    assert (session["cwd"], session["git_branch"]) == ("5", "main")


def test_repo_roots_are_backfilled_by_cwd_as_hermes_file_compares_it(both: Any) -> None:
    """A number is compared as its text, text with NUL matches no cwd: PostgreSQL refused
    both comparisons (a DatabaseError), after SQLite had answered as Hermes' file does."""
    both.create_session("s", "cli")
    both.create_session("t", "cli")
    both.update_session_cwd("s", "1")
    both.update_session_cwd("t", "/w")
    both.backfill_repo_roots({"/w\x00": "/nul", 1: "/one", b"/w": "/bytes"})
    assert both.get_session("s")["git_repo_root"] == "/one"
    assert both.get_session("t")["git_repo_root"] is None
    both.backfill_repo_roots({"/w\ud800": "/r"})  # Hermes' sqlite3 cannot encode it: both raise


def test_a_repo_root_no_session_can_hold_is_refused_before_any_is_backfilled(
    store: SessionStore,
) -> None:
    """SQLite kept a root with NUL, which PostgreSQL text cannot hold (a DatabaseError)."""
    db = SessionDB(store)
    db.create_session("s", "cli")
    db.update_session_cwd("s", "/w")
    for root in ("/r\x00", "/r\ud800", ["/r"]):
        with pytest.raises(InvalidSessionError, match="git_repo_root"):
            db.backfill_repo_roots({"/w": "/ok", "/v": root})
    assert db.get_session("s")["git_repo_root"] is None  # type: ignore[index]


_API_INSERT = (
    "INSERT INTO sessions (id, source, model, system_prompt, started_at) VALUES (?, ?, ?, ?, ?)"
)


def _api_create(session_id: str, **values: Any) -> Callable[[Any], Any]:
    """Hermes' API server's check, insert and title, as its ``_execute_write`` function
    runs them (``title``: given one, after ``pause`` seconds)."""

    def create(conn: Any) -> str:
        if conn.execute("SELECT id FROM sessions WHERE id = ?", (session_id,)).fetchone():
            return "exists"
        time.sleep(values.get("pause", 0))
        row = (values.get("source", "api_server"), None, values.get("prompt"), time.time())
        conn.execute(_API_INSERT, (session_id, *row))
        title = values.get("title")
        if title is not None:
            clash = conn.execute(
                "SELECT id FROM sessions WHERE title = ? AND id != ?", (title, session_id)
            ).fetchone()
            if clash:
                conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
                return f"title in use by {clash['id']}"
            time.sleep(values.get("pause", 0))
            conn.execute("UPDATE sessions SET title = ? WHERE id = ?", (title, session_id))
        return "made"

    return create


def test_a_session_hermes_sql_makes_keeps_the_store_s_rules(store: SessionStore) -> None:
    """An id or a field the store would refuse from create_session is refused there too,
    before anything is written (a session no turn could then be stored in)."""
    db = SessionDB(store)
    with pytest.raises(InvalidSessionError, match="at most 255 characters"):
        db._execute_write(_api_create("x" * 256))
    with pytest.raises(InvalidSessionError, match="NUL"):
        db._execute_write(_api_create("nul", prompt="a\x00b"))
    assert (db.get_session("nul"), store.list_sessions().sessions) == (None, [])
    assert db._execute_write(_api_create("fine")) == "made"
    assert db._execute_write(_api_create("fine")) == "exists"


@pytest.mark.backends("postgresql")
def test_two_creators_of_one_session_through_hermes_sql_are_made_one_after_the_other(
    store: SessionStore,
) -> None:
    """Hermes checks, then inserts, under SQLite's write lock: the second creator finds the
    first's row. PostgreSQL locks no row that is not there: the id's own lock does."""
    db = SessionDB(store)
    said: list[Any] = []

    def create(n: int) -> None:
        # Two of one id, then two of one title (ids of their own).
        session_id, title = ("same", None) if n < 2 else (f"titled-{n}", "Same")
        try:
            said.append(db._execute_write(_api_create(session_id, pause=0.5, title=title)))
        except Exception as exc:  # a unique key's violation, without the lock
            said.append(exc)

    in_threads(create, 4)
    told = sorted(map(str, said))
    assert told[:3] == ["exists", "made", "made"], told
    assert told[3] in ("title in use by titled-2", "title in use by titled-3"), told


def test_prune_keeps_a_session_resumed_once_it_was_picked(
    store: SessionStore, elsewhere: SessionDB
) -> None:
    """Another process resumes an old ended session and writes to it while a prune picks
    it: a message it was told is stored is never deleted (the prune checks again under
    the rows' locks, or goes first and the write finds no session)."""
    db = SessionDB(store)
    db.create_session("old", "cli")
    db.append_message("old", "user", "first")
    db.end_session("old", "user_exit")
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE {table_name(store.engine, 'hermes_sessions')} "
            "SET started_at = started_at - 100 * 86400 WHERE id = 'old'"
        )

    def resume() -> Any:
        elsewhere.reopen_session("old")
        return elsewhere.append_message("old", "user", "resumed")

    def picked(statement: str) -> bool:
        return statement.lstrip().startswith("SELECT hermes_sessions.id") and (
            "ended_at IS NOT NULL" in statement
        )

    with meanwhile(store.engine, picked, resume) as other:
        pruned = db.prune_sessions(older_than_days=90)
    assert other.thread is not None
    if other.error is None:  # acknowledged: kept
        assert pruned == 0
        assert [m["content"] for m in elsewhere.get_messages("old")] == ["first", "resumed"]
    else:
        assert pruned == 1
        assert elsewhere.get_session("old") is None


def test_a_delegate_made_while_its_parent_is_deleted_does_not_outlive_it(
    store: SessionStore, elsewhere: SessionDB
) -> None:
    """Delegates go with the session deleted: one another process makes meanwhile is
    refused (its parent's row is held, then gone), never left unlinked."""
    db = SessionDB(store)
    db.create_session("P", "cli")

    def spawn() -> None:
        config = {"_delegate_from": "P"}
        elsewhere.create_session("D", "cli", parent_session_id="P", model_config=config)
        elsewhere.append_message("D", "user", "a delegated task")

    def delegates_read(statement: str) -> bool:
        return "model_config IS NOT NULL" in statement

    with meanwhile(store.engine, delegates_read, spawn) as delegate:
        assert db.delete_session("P")
    assert delegate.thread is not None
    assert isinstance(delegate.error, InvalidSessionError), delegate.error
    assert elsewhere.get_session("D") is None


def test_import_sessions_beside_a_writer_of_the_same_id_and_title(
    store: SessionStore, elsewhere: SessionDB
) -> None:
    """A session of the id, or a title, another process writes once import_sessions
    checked them: the session is skipped, as one there before; the title refused with
    Hermes' error (nothing imported), never the database's own error."""
    db = SessionDB(store)

    def id_checked(statement: str) -> bool:
        return statement.lstrip().startswith("SELECT hermes_sessions.id \nFROM") and (
            "title" not in statement
        )

    messages = [{"role": "user", "content": "hi"}]
    with meanwhile(store.engine, id_checked, lambda: elsewhere.create_session("x", "cli")) as x:
        result = db.import_sessions([{"id": "x", "source": "import", "messages": messages}])
    assert x.thread is not None
    assert x.error is None
    if x.first:  # made before the import's insert (PostgreSQL): skipped
        assert (result["imported_ids"], result["skipped_ids"]) == ([], ["x"]), result
        assert elsewhere.get_messages("x") == []
    else:  # (on SQLite the import's write lock keeps it out first)
        assert result["imported_ids"] == ["x"], result

    elsewhere.create_session("y", "cli")

    def title_checked(statement: str) -> bool:
        return "hermes_sessions.title =" in statement

    def take_it() -> None:
        elsewhere.set_session_title("y", "T")

    with meanwhile(store.engine, title_checked, take_it) as y:
        try:
            db.import_sessions([{"id": "z", "source": "import", "title": "T", "messages": []}])
            refused = None
        except InvalidArgumentError as exc:
            refused = exc
    assert y.thread is not None
    if y.first:  # taken before the import's insert (PostgreSQL)
        assert refused is not None
        assert "already in use" in str(refused)
        assert db.get_session("z") is None
    else:
        assert refused is None
        assert db.get_session("z")["title"] == "T"  # type: ignore[index]
