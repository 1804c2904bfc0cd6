"""Full-text search: one query language, the same hits on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.pool import NullPool

import hermes_orm
from devtools.hermes_fixture import fixture_copy
from hermes_orm import SearchQueryError, SessionStore, create_store_engine, search
from hermes_orm._search_text import BODY_LIMIT, SEPARATOR_RANGES, is_unsegmented, tokens
from hermes_orm.integrations.hermes import import_state_db
from hermes_orm.search import Leaf, Query, parse_query
from tests.conftest import _create_pg_database, _drop_pg_database, frozen_revision, run_cli

# -- the query language ---------------------------------------------------------------


def words(*tokens: str, prefix: bool = False) -> tuple[Leaf, ...]:
    return (Leaf(tokens, prefix=prefix),)


def cjk(token: str) -> tuple[Leaf, ...]:
    return (Leaf((token,), substring=True),)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("docker", Query(((words("docker"),),), ())),
        ("docker  compose", Query(((words("docker"),), (words("compose"),)), ())),
        ('"compose up"', Query(((words("compose", "up"),),), ())),
        ("deploy*", Query(((words("deploy", prefix=True),),), ())),
        ('"compose up"*', Query(((words("compose", "up", prefix=True),),), ())),
        # OR binds tighter than the implicit AND
        (
            "docker OR podman compose",
            Query(((words("docker"), words("podman")), (words("compose"),)), ()),
        ),
        ("a OR b OR c", Query(((words("a"), words("b"), words("c")),), ())),
        ("docker -swarm", Query(((words("docker"),),), (words("swarm"),))),
        ('docker -"docker swarm"', Query(((words("docker"),),), (words("docker", "swarm"),))),
        # punctuation inside a word makes a phrase, as in the index
        ("foo.bar", Query(((words("foo", "bar"),),), ())),
        ("don't", Query(((words("don", "t"),),), ())),
        # CJK-like scripts: substrings
        ("部署", Query(((cjk("部署"),),), ())),
        ('"大别山 项目"', Query(((cjk("大别山") + cjk("项目"),),), ())),
        ("python教程", Query(((cjk("python教程"),),), ())),
        ('"deploy 部署 now"', Query(((words("deploy") + cjk("部署") + words("now"),),), ())),
        # text written without spaces, punctuation and all: one substring, as written
        ("100%完成", Query(((cjk("100%完成"),),), ())),
        ("你好、世界。", Query(((cjk("你好、世界"),),), ())),
        (
            '"deploy 100%完成 now"',
            Query(((words("deploy") + cjk("100%完成") + words("now"),),), ()),
        ),
        # lenient reading of what is not syntax
        ('"unterminated phrase', Query(((words("unterminated", "phrase"),),), ())),
        ("OR docker", Query(((words("or"),), (words("docker"),)), ())),
        ("docker OR", Query(((words("docker"),), (words("or"),)), ())),
        ("docker OR -swarm", Query(((words("docker"),), (words("or"),)), (words("swarm"),))),
        ('"OR"', Query(((words("OR"),),), ())),
        ("docker or podman", Query(((words("docker"),), (words("or"),), (words("podman"),)), ())),
        ("--x y", Query(((words("y"),),), (words("x"),))),
        ("** docker ! ?", Query(((words("docker"),),), ())),
        ("NOT AND", Query(((words("NOT"),), (words("AND"),)), ())),
        # a doubled OR, or nothing between two, is one OR (not the word "or")
        ("docker OR OR podman", Query(((words("docker"), words("podman")),), ())),
        ("docker OR !!! OR podman", Query(((words("docker"), words("podman")),), ())),
        ("docker OR - podman", Query(((words("docker"), words("podman")),), ())),
        ("docker OR OR", Query(((words("docker"),), (words("or"),)), ())),
        ("OR OR docker", Query(((words("or"),), (words("docker"),)), ())),
    ],
)
def test_parse_query(query: str, expected: Query) -> None:
    assert parse_query(query) == expected


@pytest.mark.parametrize("query", ["", "   ", "!!! ???", "-docker", '""', "*", "-", "- -x"])
def test_a_query_with_nothing_to_look_for_is_a_typed_error(query: str) -> None:
    with pytest.raises(SearchQueryError, match="nothing to look for"):
        parse_query(query)


def test_not_a_string_or_too_long_is_a_typed_error() -> None:
    with pytest.raises(SearchQueryError, match="must be a str"):
        parse_query(b"docker")  # type: ignore[arg-type]
    with pytest.raises(SearchQueryError, match="at most"):
        parse_query("docker " * 1000)


def test_separators_are_exactly_those_of_sqlite_unicode61() -> None:
    """The code point table sits between FTS5 and PostgreSQL: prove it is FTS5's.

    Every character of the Basic and Supplementary Multilingual Planes goes
    through the tokenizer of the SQLite in use; those that make no token are
    the separators.
    """
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='unicode61 remove_diacritics 0')")
    conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
    codes = [c for c in range(1, 0x20000) if not 0xD800 <= c <= 0xDFFF]
    conn.executemany("INSERT INTO t(rowid, x) VALUES (?, ?)", ((c, chr(c)) for c in codes))
    tokenized = {doc for (doc,) in conn.execute("SELECT doc FROM v")}
    separators = {c for c in codes if c not in tokenized}
    table = {c for first, last in SEPARATOR_RANGES for c in range(first, last + 1) if c < 0x20000}
    table.discard(0)  # NUL: a separator of ours, never in stored text
    assert separators == table
    assert tokens("a,b c—d 你好。x") == ["a", "b", "c", "d", "你好", "x"]


# -- an oracle: the query language evaluated in Python over message dicts -----------------


def body_of(message: dict[str, Any]) -> str:
    """What the index holds for a message, computed here independently of the SQL."""
    content = message.get("content")
    parts = content if isinstance(content, list) else []
    part_texts = [
        p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
    ]
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        function = function if isinstance(function, dict) else {}
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, str):
            arguments = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)
        calls.append(f"{function.get('name') or ''}\n{arguments or ''}")
    fields = [
        content if isinstance(content, str) else "",
        "\n".join(part_texts),
        message.get("tool_name") or "",
        "\n".join(calls),
    ]
    return "\n".join(fields).replace("\x00", " ")[:BODY_LIMIT]


def leaf_matches(leaf: Leaf, body: str) -> bool:
    if leaf.substring:
        return leaf.tokens[0].lower() in body.lower()
    found = [t.lower() for t in tokens(body)]
    wanted = [t.lower() for t in leaf.tokens]
    for i in range(len(found) - len(wanted) + 1):
        head, last = found[i : i + len(wanted) - 1], found[i + len(wanted) - 1]
        if head == wanted[:-1] and (
            last.startswith(wanted[-1]) if leaf.prefix else last == wanted[-1]
        ):
            return True
    return False


def oracle(query: Query, body: str) -> bool:
    def term(t: tuple[Leaf, ...]) -> bool:
        return all(leaf_matches(leaf, body) for leaf in t)

    return all(any(term(t) for t in group) for group in query.groups) and not any(
        term(t) for t in query.excluded
    )


# -- the fixture, imported into both backends ----------------------------------------------


@pytest.fixture(scope="module")
def fixture_stores(
    tmp_path_factory: pytest.TempPathFactory, pg_server_url: str, pg_template: str
) -> Iterator[dict[str, SessionStore]]:
    """The fixture in SQLite and in two PostgreSQL databases: one whose statistics
    were never gathered (autovacuum off), one analyzed."""
    directory = tmp_path_factory.mktemp("search")
    source = fixture_copy(directory)
    pg_urls = {
        name: _create_pg_database(pg_server_url, pg_template)
        for name in ("postgresql", "postgresql analyzed")
    }
    stores = {
        "sqlite": SessionStore(create_store_engine(f"sqlite:///{directory / 'hermes.db'}")),
        **{
            name: SessionStore(create_store_engine(url, poolclass=NullPool))
            for name, url in pg_urls.items()
        },
    }
    for name, store in stores.items():
        store.upgrade()
        if name == "postgresql":
            with store.engine.begin() as conn:
                # (a partitioned table's partitions hold the setting, not itself)
                leaves = conn.exec_driver_sql(
                    "SELECT relid::regclass::text FROM pg_partition_tree('hermes_messages') "
                    "WHERE isleaf"
                ).scalars()
                for leaf in list(leaves):
                    conn.exec_driver_sql(f"ALTER TABLE {leaf} SET (autovacuum_enabled = false)")
        assert import_state_db(source, store).ok
    with stores["postgresql analyzed"].engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE hermes_messages")
    yield stores
    for store in stores.values():
        store.close()
        store.engine.dispose()
    for url in pg_urls.values():
        _drop_pg_database(pg_server_url, url)


@pytest.fixture(scope="module")
def fixture_bodies(fixture_stores: dict[str, SessionStore]) -> dict[tuple[str, int], str]:
    store = fixture_stores["sqlite"]
    bodies = {}
    for session in store.list_sessions(limit=1000).sessions:
        for idx, message in enumerate(store.get_messages(session["id"])):
            bodies[(session["id"], idx)] = body_of(message)
    return bodies


def all_hits(store: SessionStore, query: str, **filters: Any) -> list[tuple[str, int, str]]:
    hits: list[tuple[str, int, str]] = []
    cursor = None
    while True:
        page = store.search(query, limit=7, cursor=cursor, **filters)
        hits += [(h.session_id, h.idx, h.marked()) for h in page.hits]
        if page.next_cursor is None:
            return hits
        cursor = page.next_cursor


PARITY_QUERIES = [
    # (query, at least this many hits in the fixture)
    ("postgres", 50),
    ("Postgres SQLITE", 10),
    ('"exactly once"', 0),
    ('"flush message"', 1),
    ("migrat*", 50),
    ("sess*", 50),
    ("cursor OR rollback", 100),
    ("cursor OR rollback alembic", 20),
    ("postgres -sqlite", 10),
    ('transcript -"once transcript"', 10),
    ("検索", 1),
    ("セッション", 1),
    ("セッションの検索", 1),
    ("検索 -セッション", 0),
    ("检索 OR 検索", 1),
    ("search 検索", 0),
    ("postgres 検索", 0),
    ("検索 -postgres", 0),
    ("duplicate OR 検索", 10),
    # A phrase beside substrings (checked with them, not by the words' query).
    ('"flush message" OR 検索', 2),
    ('検索 -"flush message"', 1),
    ('"flush message" -検索', 1),
    ("agent's", 0),
    ("'postgres'", 50),
    ('"postgres', 50),
    ("postgres)", 50),
    ("(sqlite", 50),
    ("sqlite:postgres", 0),
    ("AND", 0),
    ("NOT postgres", 0),
    ("^retry", 10),
    ("retry*", 10),
    ("%", None),
    ("_", None),
]


#: How PostgreSQL finds the hits: (database, newest ids searched first, and for
#: words the statistics show rare).
PG_PLANS = {
    # The newest ids hold every hit of the fixture.
    "newest first": ("postgresql", search.PG_WINDOW, search.PG_RARE_WINDOW),
    # Past 3 ids the indexes (or, for short substrings, the CJK-like rows in
    # order) find the rest; phrases are checked on the rows holding their words.
    "past the newest": ("postgresql", 3, 3),
    # With statistics, words too rare to fill a page from the newest ids get a
    # window of 2, then the indexes; common words the whole window, and short
    # substrings beside them a walk of the CJK-like rows.
    "by the statistics": ("postgresql analyzed", search.PG_WINDOW, 2),
}


@pytest.fixture(params=list(PG_PLANS))
def pg_fixture_store(
    request: pytest.FixtureRequest,
    fixture_stores: dict[str, SessionStore],
    monkeypatch: pytest.MonkeyPatch,
) -> SessionStore:
    """The PostgreSQL store of the fixture, searched the way ``PG_PLANS`` names."""
    database, window, rare = PG_PLANS[request.param]
    monkeypatch.setattr(search, "PG_WINDOW", window)
    monkeypatch.setattr(search, "PG_RARE_WINDOW", rare)
    return fixture_stores[database]


@pytest.mark.postgresql
@pytest.mark.parametrize(("query", "at_least"), PARITY_QUERIES)
def test_same_hits_on_sqlite_and_postgresql_as_the_oracle(
    fixture_stores: dict[str, SessionStore],
    pg_fixture_store: SessionStore,
    fixture_bodies: dict[tuple[str, int], str],
    query: str,
    at_least: int | None,
) -> None:
    if at_least is None:
        with pytest.raises(SearchQueryError):
            fixture_stores["sqlite"].search(query)
        with pytest.raises(SearchQueryError):
            pg_fixture_store.search(query)
        return
    on_sqlite = all_hits(fixture_stores["sqlite"], query)
    on_postgresql = all_hits(pg_fixture_store, query)
    assert on_sqlite == on_postgresql  # same hits, order, snippets and highlights
    parsed = parse_query(query)
    expected = {key for key, body in fixture_bodies.items() if oracle(parsed, body)}
    assert {(s, i) for s, i, _ in on_sqlite} == expected
    assert len(expected) >= at_least
    assert len(on_sqlite) == len(expected)  # no hit twice across pages


def test_the_fixture_has_what_the_parity_table_needs(
    fixture_bodies: dict[tuple[str, int], str],
) -> None:
    assert sum(is_unsegmented(body) for body in fixture_bodies.values()) >= 10
    assert any("'" in body or '"' in body for body in fixture_bodies.values())


# -- behaviour on each backend ---------------------------------------------------------------------


def turn(text_: str, **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": text_, **extra}


def test_hits_carry_where_they_are_and_a_marked_snippet(store: SessionStore) -> None:
    store.create_session("s1", "cli")
    store.flush(
        "s1",
        [
            turn("How do I deploy with Docker compose?", timestamp=10.0),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "terminal", "arguments": '{"cmd": "docker ps"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "tool_name": "terminal", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "see 部署项目 here"}]},
        ],
    )
    page = store.search("docker")
    assert [(h.session_id, h.idx, h.role) for h in page.hits] == [
        ("s1", 1, "assistant"),
        ("s1", 0, "user"),
    ]
    assert page.next_cursor is None
    first = page.hits[1]
    assert first.timestamp == 10.0
    assert first.marked() == "How do I deploy with [Docker] compose?"
    assert first.marked("<b>", "</b>") == "How do I deploy with <b>Docker</b> compose?"
    assert first.rank == 1.0
    assert page.hits[0].marked() == 'terminal {"cmd": "[docker] ps"}'
    # tool name, and multimodal text parts, are searched
    assert [h.idx for h in store.search("terminal").hits] == [2, 1]
    assert store.search("部署").hits[0].marked() == "see [部署]项目 here"
    assert store.search("docker compose").hits[0].rank == 2.0


def test_a_word_opening_with_a_number_in_scientific_notation_is_found(
    store: SessionStore,
) -> None:
    """A hash like ``3e4f9a1`` is one word, as FTS5 has it (PostgreSQL's parser cuts it)."""
    store.create_session("s1", "cli")
    bodies = ["commit 3e4f9a1 landed", "image 1E5AB0C9 pulled", "took 2e3e4 steps", "plain 1e5"]
    store.flush("s1", [{"role": "user", "content": body} for body in bodies])
    for query, idx in (
        ("3e4f9a1", 0),
        ("3E4F9A1", 0),
        ("3e4f*", 0),
        ('"commit 3e4f9a1 landed"', 0),
        ("1e5ab0c9", 1),
        ("2e3e4", 2),
    ):
        assert [h.idx for h in store.search(query).hits] == [idx], query
    # (PostgreSQL also finds 1e5 at the head of 1E5AB0C9: README, differences.)
    assert store.search("1e5").hits[0].idx == 3
    assert store.search("3e4f9a1").hits[0].marked() == "commit [3e4f9a1] landed"
    assert store.search("3e4f9a1 -landed").hits == []


def test_a_match_longer_than_the_snippet_is_highlighted_as_far_as_shown(
    store: SessionStore,
) -> None:
    word = "x" * 150
    phrase = " ".join(f"w{i}" for i in range(60))
    store.create_session("s1", "cli")
    store.flush(
        "s1",
        [
            {"role": "user", "content": f"some text before the long word {word} and after"},
            {"role": "user", "content": f"a phrase: {phrase} ends here"},
        ],
    )
    for query in (word, f'"{phrase}"'):
        (hit,) = store.search(query).hits
        assert hit.highlights, query
        for start, end in hit.highlights:
            shown = hit.snippet[start:end]
            assert shown.strip() == shown != ""
            assert shown.rstrip("…") in (word if query == word else phrase)


def test_an_engine_watched_by_listeners_sees_the_search_statement(store: SessionStore) -> None:
    """Tracing and failure injection see a search's SQL on every backend and API."""
    store.create_session("s", source="test")
    store.flush("s", [turn("a needle here")])
    seen: list[str] = []

    def record(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        assert [hit.idx for hit in store.search("needle").hits] == [0]
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    matched = [s for s in seen if "MATCH" in s or "search_vector" in s]
    assert matched, seen


def test_keyset_pages_are_stable_while_messages_arrive(store: SessionStore) -> None:
    store.create_session("s", "cli")
    store.flush("s", [turn(f"needle {i}") for i in range(45)])
    first = store.search("needle", limit=20)
    assert [h.idx for h in first.hits] == list(range(44, 24, -1))
    store.flush("s", [turn(f"needle {i}") for i in range(50)])  # 5 newer ones
    seen = [h.idx for h in first.hits]
    cursor = first.next_cursor
    while cursor is not None:
        page = store.search("needle", limit=20, cursor=cursor)
        seen += [h.idx for h in page.hits]
        cursor = page.next_cursor
    assert seen == list(range(44, -1, -1))


def test_a_cursor_pages_only_the_search_it_came_from(store: SessionStore) -> None:
    """Given with another query or other filters, cut short or made by hand, it is refused:
    read as a place in another listing, it would skip hits without a word."""
    store.create_session("s", "cli")
    store.flush("s", [turn(f"docker {i}") for i in range(30)] + [turn("podman")])
    cursor = store.search("docker", limit=2).next_cursor
    assert cursor is not None
    assert [h.idx for h in store.search("docker", limit=2, cursor=cursor).hits] == [27, 26]
    for query, filters in (
        ("docker OR podman", {}),
        ("docker", {"role": "user"}),
        ("docker", {"session_id": "s"}),
    ):
        with pytest.raises(SearchQueryError, match="the cursor of another search"):
            store.search(query, limit=2, cursor=cursor, **filters)
    for forged in (cursor[:-1], cursor.split(".")[0], "m2", cursor.replace("m", "m1", 1)):
        with pytest.raises(SearchQueryError):
            store.search("docker", limit=2, cursor=forged)
    with pytest.raises(SearchQueryError, match="the cursor of another search"):
        store.for_user("u").search("docker", limit=2, cursor=cursor)


def test_filters(store: SessionStore) -> None:
    store.create_session("a", "cli", user_id="u1")
    store.create_session("b", "telegram", user_id="u2")
    store.flush("a", [turn("alpha note"), {"role": "assistant", "content": "alpha reply"}])
    store.flush("b", [turn("alpha other")])

    def found(**filters: Any) -> list[tuple[str, int]]:
        return [(h.session_id, h.idx) for h in store.search("alpha", **filters).hits]

    assert found() == [("b", 0), ("a", 1), ("a", 0)]
    assert found(session_id="a") == [("a", 1), ("a", 0)]
    assert found(source="telegram") == [("b", 0)]
    assert found(source=["cli", "telegram"]) == [("b", 0), ("a", 1), ("a", 0)]
    assert found(user_id="u1") == [("a", 1), ("a", 0)]
    assert found(role="assistant") == [("a", 1)]
    assert found(role=["user"], session_id="a") == [("a", 0)]
    assert found(session_id="missing") == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": True}, "limit"),
        ({"cursor": "42"}, "cursor"),
        ({"cursor": 42}, "cursor"),
        ({"role": []}, "role"),
        ({"source": [1]}, "source"),
        ({"session_id": 5}, "session_id"),
        ({"session_id": ""}, "session_id must be a session's id"),  # (an unset variable, say)
        ({"session_id": "s" * 256}, "session_id must be a session's id"),
    ],
)
def test_bad_arguments_are_typed_errors(
    store: SessionStore, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(SearchQueryError, match=message):
        store.search("docker", **kwargs)


def test_a_session_s_hits_are_its_hits_among_all(store: SessionStore) -> None:
    """Sessions written in turns (their message ids interleave): the filter is exact, paged too."""
    for n in range(12):
        for session_id in ("a", "b", "c"):
            if n == 0:
                store.create_session(session_id, "cli")
            history = [turn(f"{session_id} deploy step {n} docker 部署 {'rare' * (n % 5 == 0)}")]
            stored = store.get_messages(session_id)
            store.flush(session_id, [*stored, *history])
    queries = ["docker", "deploy*", "docker -rare", "rare OR 部署", "部署 docker", '"deploy step"']
    for query in queries:
        everywhere = [(h.session_id, h.idx) for h in store.search(query, limit=100).hits]
        expected = [hit for hit in everywhere if hit[0] == "b"]
        assert expected, query
        paged, cursor = [], None
        while True:
            page = store.search(query, session_id="b", limit=4, cursor=cursor)
            paged += [(h.session_id, h.idx) for h in page.hits]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert paged == expected, query


@pytest.mark.sqlite
def test_a_session_s_word_search_is_driven_by_the_word_index(tmp_path: Path) -> None:
    """Not a word query per message of the session (a prefix expanded each time: minutes)."""
    with SessionStore(f"sqlite:///{tmp_path / 'a.db'}") as store:
        store.upgrade()
        store.create_session("s", "cli")
        store.flush("s", [turn("docker deploy")])
    for query in ("docker", "deploy*", "docker -rare", "docker 部署"):
        statement, params = search.sqlite_statement(
            parse_query(query), search.Filters(session_id="s"), paged=False, limit=5
        )
        with sqlite3.connect(tmp_path / "a.db") as conn:
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", params)]
        assert plan[0].startswith("SCAN hermes_search VIRTUAL TABLE"), (query, plan)
        assert not any("TEMP B-TREE" in step for step in plan), (query, plan)


@pytest.mark.sqlite
def test_a_filtered_substring_search_is_driven_by_the_cjk_index(tmp_path: Path) -> None:
    """Not a LIKE on each message of the sessions a source or a user has (seconds on a
    store of 100,000 messages): the CJK index drives, the sessions are looked up."""
    path = tmp_path / "a.db"
    with SessionStore(f"sqlite:///{path}") as store:
        store.upgrade()
        for n in range(20):
            store.create_session(f"s{n}", "cli", user_id="alice")
            store.flush(f"s{n}", [turn(f"部署配置文件 {n}") for _ in range(10)])
        store.create_session("t", "telegram", user_id="bob")
        store.flush("t", [turn("部署配置文件")])
        expected = [(h.session_id, h.idx) for h in store.search("配置文件", limit=500).hits]
        for filters in ({"source": "cli"}, {"user_id": "alice"}):
            hits = store.search("配置文件", limit=500, **filters).hits
            assert [(h.session_id, h.idx) for h in hits] == [e for e in expected if e[0] != "t"]
        assert [h.session_id for h in store.for_user("bob").search("配置文件").hits] == ["t"]
    with sqlite3.connect(path) as conn:
        conn.execute("ANALYZE")
        for filters in (search.Filters(sources=("cli",)), search.Filters(user_id="alice")):
            statement, params = search.sqlite_statement(
                parse_query("配置文件"), filters, paged=False, limit=5
            )
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", params)]
            assert plan[0].startswith("SCAN hermes_search_cjk VIRTUAL TABLE"), plan
            assert not any("TEMP B-TREE" in step for step in plan), plan


def test_deleting_a_session_removes_its_hits(store: SessionStore) -> None:
    for session_id in ("keep", "drop"):
        store.create_session(session_id, "cli")
        store.flush(session_id, [turn("shared words 共享文字"), turn("more")])
    assert store.delete_session("drop")
    assert [h.session_id for h in store.search("shared").hits] == ["keep"]
    assert [h.session_id for h in store.search("共享").hits] == ["keep"]
    assert [h.session_id for h in store.search("共享文字").hits] == ["keep"]


def test_updating_a_message_updates_its_hits(store: SessionStore, engine: Engine) -> None:
    store.create_session("s", "cli")
    store.flush("s", [turn("original wording 旧的内容")])
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE hermes_messages SET content = :c WHERE session_id = 's'"),
            {"c": "revised wording 新的文本"},
        )
    assert store.search("original").hits == []
    assert store.search("旧的内容").hits == []
    assert store.search("旧的").hits == []
    assert [h.idx for h in store.search("revised").hits] == [0]
    assert [h.idx for h in store.search("新的文本").hits] == [0]
    assert [h.idx for h in store.search("wording").hits] == [0]


def test_a_huge_body_is_searchable_by_its_beginning(store: SessionStore) -> None:
    store.create_session("s", "cli")
    filler = "lorem " * (BODY_LIMIT // 6)
    store.flush("s", [{"role": "tool", "content": "headword " + filler + " tailword"}])
    assert [h.idx for h in store.search("headword").hits] == [0]
    assert store.search("tailword").hits == []


def test_json_text_that_postgresql_cannot_extract_is_indexed_not_refused(
    store: SessionStore, engine: Engine
) -> None:
    """NUL and lone surrogates are valid JSON escapes; ``->>`` refuses them.

    A message holding one must still be written (the index is computed in the
    same INSERT) and be found by its other words.
    """
    store.create_session("s", "cli")
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "run", "arguments": "left\x00right"},
    }
    store.flush("s", [{"role": "assistant", "content": None, "tool_calls": [call]}])
    with engine.begin() as conn:  # as another client could write them
        conn.execute(
            text(
                "INSERT INTO hermes_messages (session_id, idx, role, content_parts, digest) "
                "VALUES ('s', 1, 'user', :parts, :digest)"
            ),
            {
                "parts": '[{"type": "text", "text": "lone \\ud800 high \\udc00 low"}]',
                "digest": b"0" * 16,
            },
        )
    assert [h.idx for h in store.search("left right").hits] == [0]
    assert store.search("leftright").hits == []
    assert [h.idx for h in store.search("lone high low").hits] == [1]


#: Messages holding the text ``\\u0000`` (an escaped backslash before ``u0000`` in
#: their JSON) beside NUL characters (the escape ``\\u0000``, a blank to the index).
LITERAL_NUL_ESCAPES: list[dict[str, Any]] = [
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c",
                "type": "function",
                "function": {
                    "name": "write",
                    "arguments": json.dumps({"code": 's.replace("\\u0000", "") zebra'}),
                },
            }
        ],
    },
    {"role": "user", "content": [{"type": "text", "text": "literal \\u0000 koala"}]},
    {"role": "user", "content": [{"type": "text", "text": "nul \u0000 lemur \\\u0000 both"}]},
]


def search_bodies(engine: Engine) -> list[str]:
    """Each message's body as the database computes it (the index's text), in id order."""
    if engine.dialect.name == "sqlite":
        statement = "SELECT body FROM hermes_search_source ORDER BY id"
    else:
        statement = (
            "SELECT hermes_search_body(content, content_parts, tool_name, tool_calls) "
            "FROM hermes_messages ORDER BY id"
        )
    with engine.connect() as conn:
        return list(conn.exec_driver_sql(statement).scalars())


def test_an_escaped_backslash_before_u0000_is_text_not_a_nul(
    store: SessionStore, engine: Engine
) -> None:
    """Only the escape ``\\u0000`` is a NUL (a blank); after an escaped backslash it is text."""
    store.create_session("s", "cli")
    store.flush("s", LITERAL_NUL_ESCAPES)
    assert search_bodies(engine) == [body_of(m) for m in LITERAL_NUL_ESCAPES]
    hits = store.search("u0000").hits
    assert [h.idx for h in hits] == [1, 0]
    assert all("\\u0000" in h.snippet and "u0020" not in h.snippet for h in hits)
    assert [h.idx for h in store.search('"nul lemur"').hits] == [2]
    assert [h.idx for h in store.search("zebra").hits] == [0]


def test_cjk_text_written_as_json_escapes_is_found(store: SessionStore, engine: Engine) -> None:
    """Another client may write JSON with ``\\uXXXX`` escapes and no raw CJK character.

    On SQLite the trigram table is filled only for messages whose raw columns
    may hold CJK-like text; escapes must count as such, plain ASCII must not.
    """
    store.create_session("s", "cli")
    store.flush("s", [turn("plain ascii words only")])
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO hermes_messages (session_id, idx, role, content_parts, digest) "
                "VALUES ('s', 1, 'user', :parts, :digest)"
            ),
            {"parts": '[{"type": "text", "text": "\\u90e8\\u7f72 escaped"}]', "digest": b"0" * 16},
        )
        conn.execute(
            text("UPDATE hermes_messages SET content = :c WHERE session_id = 's' AND idx = 0"),
            {"c": "now with 中文内容 after an update"},
        )
    assert [h.idx for h in store.search("部署").hits] == [1]
    assert [h.idx for h in store.search("中文内容").hits] == [0]
    assert [h.idx for h in store.search("escaped").hits] == [1]
    if engine.dialect.name == "sqlite":
        store.create_session("t", "cli")
        store.flush("t", [turn(f"ascii {i} \\u escape-like") for i in range(3)])
        with engine.connect() as conn:
            cjk = conn.exec_driver_sql("SELECT rowid FROM hermes_search_cjk").scalars().all()
            ids = conn.exec_driver_sql(
                "SELECT id FROM hermes_messages WHERE session_id = 's' ORDER BY id"
            ).scalars()
            assert sorted(cjk) == list(ids)  # the ASCII messages never went in


def test_rebuild_restores_a_damaged_index(store: SessionStore, engine: Engine) -> None:
    store.create_session("s", "cli")
    store.flush("s", [turn("rebuild me 重建索引")])
    with engine.begin() as conn:  # damage it: the index forgets everything
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("INSERT INTO hermes_search(hermes_search) VALUES ('delete-all')")
            conn.exec_driver_sql("DELETE FROM hermes_search_cjk")
        else:
            conn.exec_driver_sql("UPDATE hermes_messages SET search_cjk = NULL, search_vector = ''")
    assert store.search("rebuild").hits == []
    assert store.search("重建索引").hits == []
    assert store.rebuild_search_index() == 1
    assert [h.idx for h in store.search("rebuild").hits] == [0]
    assert [h.idx for h in store.search("重建索引").hits] == [0]
    # and the triggers still work after a rebuild
    store.flush("s", [turn("rebuild me 重建索引"), turn("after the rebuild")])
    assert [h.idx for h in store.search("rebuild").hits] == [1, 0]


#: Rows as other clients may write them: every shape the search triggers distinguish.
_INDEXED_ROWS: list[dict[str, Any]] = [
    {"content": "plain ascii words"},
    {"content": "café naïve, outside ASCII but not CJK"},
    {"content": "部署 docker 中文内容", "tool_name": "search"},
    {
        "content": None,
        "content_parts": json.dumps(
            [
                {"type": "text", "text": "\u90e8\u7f72 escaped"},
                {"type": "image_url", "image_url": {"url": "x"}},
                {"type": "text", "text": "nul \u0000 inside"},
            ]
        ),
    },
    {"content": "raw parts", "content_parts": '[{"type": "text", "text": "\\u90e8"}]'},
    {
        "content": "",
        "tool_calls": json.dumps(
            [{"type": "function", "function": {"name": "run", "arguments": '{"q": "中"}'}}]
        ),  # json.dumps writes the ideograph as a \\u escape: the column is ASCII
    },
    {"content": "calls that are not JSON", "tool_calls": "not json {"},
    {"content": "parts that are no array", "content_parts": '{"text": "hidden"}'},
    {"content": "ends in a backslash \\", "content_parts": "u then text, not JSON"},
    {"content": "long " * (BODY_LIMIT // 4)},
]


def _fetch(path: Path, statement: str) -> list[Any]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(statement).fetchall()
    finally:
        conn.close()


def _search_shadow_tables(path: Path) -> dict[str, list[Any]]:
    return {
        table: _fetch(path, f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in (
            "hermes_search_data",
            "hermes_search_idx",
            "hermes_search_cjk_data",
            "hermes_search_cjk_idx",
            "hermes_search_cjk_content",
        )
    }


_TRIGGERS = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"


def test_sqlite_triggers_index_exactly_what_the_previous_revision_did(tmp_path: Path) -> None:
    """0005 builds each body from the new row instead of reading it back: same index, byte for byte.

    The same rows, inserted and updated in the same transactions under 0004's
    triggers and under head's, leave identical pages in every search table; a
    downgrade to 0004 puts its triggers back as they were.
    """
    previous, head = tmp_path / "0004.db", tmp_path / "head.db"
    for path, revision in ((previous, "0004_search_upkeep"), (head, "head")):
        engine = create_store_engine(f"sqlite:///{path}", poolclass=NullPool)
        hermes_orm.upgrade(engine, revision)
        engine.dispose()
        conn = sqlite3.connect(path)
        with conn:
            conn.execute(
                "INSERT INTO hermes_sessions (id, source, started_at) VALUES ('s', 'cli', 0)"
            )
        for first in range(0, len(_INDEXED_ROWS), 4):  # several transactions, several segments
            with conn:
                for idx, row in enumerate(_INDEXED_ROWS[first : first + 4], first):
                    conn.execute(
                        "INSERT INTO hermes_messages (session_id, idx, role, content, "
                        "content_parts, tool_calls, tool_name, digest) "
                        "VALUES ('s', ?, 'user', ?, ?, ?, ?, ?)",
                        (
                            idx,
                            row["content"],
                            row.get("content_parts"),
                            row.get("tool_calls"),
                            row.get("tool_name"),
                            b"0" * 16,
                        ),
                    )
        with conn:
            conn.execute("UPDATE hermes_messages SET content = '更新 updated' WHERE idx = 0")
            conn.execute("UPDATE hermes_messages SET tool_name = 'grep' WHERE idx = 2")
        conn.close()
    tables = _search_shadow_tables(head)
    assert len(tables["hermes_search_cjk_content"]) == 5  # rows 0 (updated), 2, 3, 4, 5
    assert tables == _search_shadow_tables(previous)
    engine = create_store_engine(f"sqlite:///{head}", poolclass=NullPool)
    hermes_orm.downgrade(engine, "0004_search_upkeep")
    engine.dispose()
    assert _fetch(head, _TRIGGERS) == _fetch(previous, _TRIGGERS)


def test_punctuation_inside_text_written_without_spaces_is_literal(store: SessionStore) -> None:
    store.create_session("s1", "cli")
    store.create_session("s2", "cli")
    store.flush("s1", [turn("达成100%完成率"), turn("a_b部署")])
    store.flush("s2", [turn("达成100完成率是目标"), turn("axb部署 a\\b部署")])
    assert [(h.session_id, h.marked()) for h in store.search("100%完成").hits] == [
        ("s1", "达成[100%完成]率")
    ]
    assert [h.session_id for h in store.search("a_b部署").hits] == ["s1"]
    assert [h.session_id for h in store.search("a\\b部署").hits] == ["s2"]
    assert len(store.search("完成率").hits) == 2


_QUERY_PIECES = st.sampled_from(
    [
        '"', "-", "*", "OR", "AND", "NOT", "(", ")", ":", "'", "\\", "^", "%", "_", "NEAR",
        "docker", "部署", "検", "a", " ", "  ", "\x00", "\n", "é", "🙂", "--", "**", "{", "}",
    ]
)  # fmt: skip


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    query=st.one_of(
        st.text(max_size=60),
        st.lists(st.one_of(_QUERY_PIECES, st.text(max_size=4)), max_size=12).map("".join),
    )
)
def test_any_string_gives_hits_or_the_typed_error(store: SessionStore, query: str) -> None:
    if not store.list_sessions().sessions:
        store.create_session("s", "cli")
        store.flush("s", [turn('docker "quoted" 部署 é 🙂 a_b a-b NEAR(x) 100%')])
    try:
        page = store.search(query)
    except SearchQueryError:
        with pytest.raises(SearchQueryError):  # the query itself, nothing else, was refused
            parse_query(query)
        return
    assert all(hit.session_id == "s" for hit in page.hits)


# -- the CLI ----------------------------------------------------------------------------------


def test_cli_search_and_rebuild(db_url: str, tmp_path: Path) -> None:
    engine = create_store_engine(db_url, poolclass=NullPool)
    store = SessionStore(engine)
    store.create_session("s", "cli")
    store.flush("s", [turn("the deploy finished"), turn("部署完成了")])
    store.close()
    engine.dispose()
    env = {"HERMES_ORM_URL": db_url, "PATH": "/usr/bin:/bin"}
    shown = run_cli("search", "deploy", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "s[0] user      the [deploy] finished" in shown.stdout
    as_json = run_cli("search", "部署", "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    hits = json.loads(as_json.stdout)["hits"]
    assert [(h["session_id"], h["idx"], h["snippet"]) for h in hits] == [("s", 1, "部署完成了")]
    assert hits[0]["highlights"] == [[0, 2]]
    rebuilt = run_cli("search", "rebuild", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "2 messages" in rebuilt.stdout
    empty = run_cli("search", "!!!", env=env)
    assert empty.returncode == 2
    assert "nothing to look for" in empty.stderr


def test_where_the_backends_differ_is_as_the_readme_says(store: SessionStore, backend: str) -> None:
    bodies = {
        "emoji": "I love 🍕 pizza and 🚀 rockets",
        "private": "glyph \ue000\ue001 here",
        "combining": "cafe\u0301 and more",
        "long": "x" * 3000 + " tail",
        "late emoji": "thinking🤔done",  # U+1F914: past Unicode 6.1
        "capital sigma": "ΟΔΟΣ",
        "final sigma": "οδος",
        "dotted I": "İstanbul",
    }
    store.create_session("s", source="test")
    store.flush("s", [{"role": "user", "content": body} for body in bodies.values()])
    names = list(bodies)

    def found(query: str) -> list[str]:
        return sorted(names[hit.idx] for hit in store.search(query).hits)

    postgresql = backend == "postgresql"
    assert found("🚀 rockets") == ["emoji"]
    with pytest.raises(SearchQueryError):
        store.search("🍕")
    assert found("\ue000\ue001") == ([] if postgresql else ["private"])
    assert found("\ue000\ue001*") == ([] if postgresql else ["private"])
    assert found("cafe") == (["combining"] if postgresql else [])
    assert found("cafe\u0301") == (["combining"] if postgresql else [])
    assert found("cafe\u0301*") == ["combining"]
    assert found("caf\u00e9") == []  # precomposed: no normalization on either
    assert found("x" * 100 + "*") == ([] if postgresql else ["long"])
    assert found("tail") == ["long"]
    assert found("thinking") == (["late emoji"] if postgresql else [])
    assert found("thinking🤔done") == ["late emoji"]
    assert found("istanbul") == (["dotted I"] if postgresql else [])


def test_a_word_holding_what_postgresql_takes_for_blanks_is_found_on_both(
    store: SessionStore, backend: str
) -> None:
    """``H₂O``, ``x²``: FTS5 keeps them whole; PostgreSQL finds them as phrases of their parts."""
    bodies = [
        "H₂O boils",
        "x² plus y",
        "½ cup",
        "thinking🤔done",
        "h o apart",
        "x²abc",
        "xylophone",
        "H₂Oxygen",
    ]
    store.create_session("s", source="test")
    store.flush("s", [{"role": "user", "content": body} for body in bodies])

    def found(query: str) -> list[int]:
        return sorted(hit.idx for hit in store.search(query).hits)

    postgresql = backend == "postgresql"
    # Where the parser sees blanks it cannot tell them from spaces: a superset.
    assert found("H₂O") == ([0, 4] if postgresql else [0])
    assert found('"H₂O boils"') == [0]
    assert found("H₂O -boils") == ([4] if postgresql else [])
    assert found("h₂o*") == ([0, 4, 7] if postgresql else [0, 7])
    assert found("x²") == ([1, 5] if postgresql else [1])
    # A prefix after a blank is another word's: x alone there, never xylophone.
    assert found("x²*") == [1, 5]
    assert found("thinking🤔done") == [3]
    assert found("thinking🤔do*") == [3]
    # A word of blanks only is found nowhere on PostgreSQL (no vector holds it).
    assert found("½") == ([] if postgresql else [2])
    assert found("½ cup") == ([] if postgresql else [2])
    assert found("cup -½") == ([2] if postgresql else [])
    assert [h.marked() for h in store.search("H₂O").hits if h.idx == 0] == ["[H₂O] boils"]


def test_a_long_query_word_is_looked_for_whole_below_the_index_s_limit(
    store: SessionStore,
) -> None:
    """Words of 500 to 2,000 bytes are in both indexes: a query word that long finds the
    messages holding it, not every word it begins; past 2,000 bytes it is looked for by
    its beginning (PostgreSQL's index leaves words of 2,047 bytes and more out)."""
    postgresql = store.engine.dialect.name == "postgresql"
    store.create_session("s", source="test")
    store.flush(
        "s",
        [
            {"role": "user", "content": "x" * 500 + " end"},
            {"role": "user", "content": "x" * 500 + "TAIL other"},
            {"role": "user", "content": "x" * 600 + " more"},
            {"role": "user", "content": "é" * 1100 + " z"},  # 2,200 bytes
            {"role": "user", "content": "i" * 700},
            {"role": "user", "content": "i" * 701},
        ],
    )

    def found(query: str) -> list[int]:
        return sorted(hit.idx for hit in store.search(query).hits)

    assert found("x" * 600) == [2]
    assert found("x" * 500) == [0]
    assert found("x" * 500 + "Q") == []
    assert found(f'"{"x" * 501} end"') == []
    assert found("x" * 500 + "*") == [0, 1, 2]
    assert found("é" * 1100) == ([] if postgresql else [3])  # by its first 2,000 bytes
    assert found("é" * 1000) == []  # (2,000 bytes: a word of its own)
    # 1,400 bytes, lowered as PostgreSQL lowers it (to i, not str.lower's i and a dot):
    # looked for whole; SQLite's index does not lower İ at all.
    assert found("İ" * 700) == ([4] if postgresql else [])


@pytest.mark.parametrize("session_id", [None, "s"])
def test_a_phrase_of_a_thousand_characters_written_without_spaces_is_searched(
    store: SessionStore, session_id: str | None
) -> None:
    """Each CJK character of a phrase is a substring to find: a thousand of them (in a
    query of 2,048 characters) are a thousand conditions, which SQLite nests no deeper
    than 1,000 levels."""
    characters = [chr(0x4E00 + i) for i in range(1000)]
    store.create_session("s", source="test")
    store.flush(
        "s",
        [
            {"role": "user", "content": "".join(characters)},
            {"role": "user", "content": "".join(characters[:-1])},
        ],
    )
    phrase = '"' + " ".join(characters) + '"'
    assert [hit.idx for hit in store.search(phrase, session_id=session_id).hits] == [0]
    repeated = '"' + "一 " * 1000 + '"'
    assert len(store.search(repeated, session_id=session_id).hits) == 2


@pytest.mark.backends("postgresql")
def test_the_characters_asked_of_the_server_may_outgrow_their_cache(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hermes_orm import search

    monkeypatch.setattr(search, "_WORD_CHARACTER_MAX", 2)
    store.create_session("s", source="test")
    store.flush("s", [{"role": "user", "content": "H₂O and x² and café"}])
    for query in ("H₂O", "H₂O x²", "café x² H₂O", "x²"):
        assert [hit.idx for hit in store.search(query).hits] == [0], query


def test_letters_fts5_folds_are_one_word_on_both_backends(store: SessionStore) -> None:
    """Final sigma, the Greek symbol forms, long s, the micro sign: as FTS5 folds them."""
    from hermes_orm._search_text import FOLDED, FOLDED_TO

    greek = ["ΟΔΟΣ", "οδος", "οδοσ", "Οδος"]
    bodies = [*greek, *(f"x{letter}y" for letter in FOLDED)]
    store.create_session("s", source="test")
    store.flush("s", [{"role": "user", "content": body} for body in bodies])

    def found(query: str) -> list[int]:
        return sorted(hit.idx for hit in store.search(query).hits)

    for form in greek:
        assert found(form) == [0, 1, 2, 3], form
        assert found(f'"{form}"') == [0, 1, 2, 3], form
        assert found(form[:3] + "*") == [0, 1, 2, 3], form
    hits = store.search("οδος").hits
    assert all(hit.rank == 1 for hit in hits)  # the place it matched, highlighted
    # Substrings (scripts without spaces) are matched as written, not folded:
    # a highlight counts only the place the query matched.
    store.create_session("cjk", source="test")
    store.flush("cjk", [{"role": "user", "content": "ς東 σ東"}, {"role": "user", "content": "ς東"}])
    ((hit,),) = [store.search("σ東", session_id="cjk").hits]
    assert (hit.idx, hit.rank) == (0, 1)

    for n, (letter, folded) in enumerate(zip(FOLDED, FOLDED_TO, strict=True), start=len(greek)):
        assert found(f"x{letter}y") == found(f"x{folded}y") == [n], letter


def test_a_word_lowering_makes_longer_is_highlighted(store: SessionStore) -> None:
    """``İ`` lowers to two characters in Python: the hit's place is still found."""
    store.create_session("s", source="test")
    store.flush("s", [{"role": "user", "content": "İSTANBUL ΣİΣ λόγος"}])
    for query in ("İSTANBUL", "İstanbul", "ΣİΣ", "λόγοσ"):
        ((hit,),) = [store.search(query).hits]
        assert hit.rank == 1, query


@pytest.mark.postgresql
@pytest.mark.direct("creates a database of the ICU locale provider itself")
def test_a_database_whose_lower_knows_final_sigma_finds_every_form(
    pg_server_url: str, tmp_path: Path
) -> None:
    """ICU's lower() makes ΟΔΟΣ οδος (final sigma); the vectors hold οδοσ: folded after lowering."""
    from sqlalchemy import create_engine

    from tests.conftest import _drop_pg_database

    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    name = f"icu_{os.getpid()}"
    with admin.connect() as conn:
        conn.exec_driver_sql(
            f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'und' "
            "LOCALE 'C.UTF-8'"
        )
    admin.dispose()
    url = make_url(pg_server_url).set(drivername="postgresql+psycopg", database=name)
    store = SessionStore(url.render_as_string(hide_password=False))
    try:
        store.upgrade()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT lower('ΟΔΟΣ')").scalar_one() == "οδος"
        store.create_session("s", source="test")
        store.flush("s", [{"role": "user", "content": c} for c in ("ΟΔΟΣ", "ΛΌΓΟΣ ΔΡΌΜΟΣ")])
        for query, found in (("ΟΔΟΣ", [0]), ("οδος", [0]), ('"ΛΌΓΟΣ ΔΡΌΜΟΣ"', [1]), ("λόγοσ", [1])):
            assert sorted(hit.idx for hit in store.search(query).hits) == found, query
    finally:
        store.close()
        _drop_pg_database(pg_server_url, url.render_as_string(hide_password=False))


def test_the_letters_search_folds_are_those_fts5_folds() -> None:
    """Checked against the tokenizer of the SQLite in use, as the separators are."""
    import sqlite3

    from hermes_orm._search_text import FOLDED, FOLDED_TO, fold

    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(b, tokenize='unicode61 remove_diacritics 0')")
    conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
    conn.executemany("INSERT INTO t(rowid, b) VALUES (?, ?)", enumerate(FOLDED, start=1))
    folded = dict(conn.execute("SELECT doc, term FROM v"))
    assert [folded[n] for n in range(1, len(FOLDED) + 1)] == list(FOLDED_TO)
    assert all(letter.lower() == letter != fold(letter) for letter in FOLDED)


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows the scans of an EXPLAIN (ANALYZE, FORMAT JSON) plan read, kept or not."""
    return sum(
        node["Actual Rows"] * node["Actual Loops"]
        + node.get("Rows Removed by Filter", 0)
        + node.get("Rows Removed by Index Recheck", 0)
        for node in _nodes(plan)
        if "Scan" in node["Node Type"] and node.get("Relation Name") == "hermes_messages"
    )


@pytest.mark.postgresql
@pytest.mark.parametrize("query", ["needle", '"needle point"', "needle -filler"])
def test_a_prepared_search_finds_a_rare_word_by_the_index(empty_pg: str, query: str) -> None:
    """Drivers that prepare statements (asyncpg; psycopg after a few runs) may get
    PostgreSQL's generic plan, made for any parameter values: it must still read
    only the rows the index gives a rare word, not walk the messages."""
    store = SessionStore(create_store_engine(empty_pg, poolclass=NullPool))
    store.upgrade()
    store.create_session("s", source="test")
    store.flush("s", [turn("needle point")] + [turn(f"filler {i}") for i in range(3000)])
    sent: list[tuple[str, tuple[Any, ...]]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "m.id + 0" in statement:  # past the newest ids (their walk is bounded)
            sent.append((statement, tuple(params)))

    with store.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE hermes_messages")  # "needle" is known to be rare
        conn.commit()
    event.listen(store.engine, "before_cursor_execute", record)
    assert [hit.idx for hit in store.search(query).hits] == [0]
    event.remove(store.engine, "before_cursor_execute", record)
    assert sent
    with store.engine.connect() as conn:
        for number, (statement, params) in enumerate(sent):
            plan = _prepared_plan(conn, f"generic{number}", statement, params)
            assert _rows_read(plan) < 20, json.dumps(plan, indent=1)
    store.close()


def _prepared_plan(
    conn: Any, name: str, statement: str, params: tuple[Any, ...], mode: str = "generic"
) -> Any:
    """The plan (EXPLAIN ANALYZE, as JSON) of ``statement`` prepared as ``name``, generic
    (or, with ``mode="custom"``, planned for its parameters)."""
    conn.exec_driver_sql(f"SET plan_cache_mode = force_{mode}_plan")
    parts = statement.split("%s")
    prepared = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
    types = ", ".join("bigint" if isinstance(p, int) else "text" for p in params)
    conn.exec_driver_sql(f"PREPARE {name}({types}) AS {prepared}")
    values = ", ".join(
        str(p) if isinstance(p, int) else "'" + p.replace("'", "''") + "'" for p in params
    )
    explained = conn.exec_driver_sql(
        f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name}({values})"
    ).scalar_one()
    return explained[0]["Plan"]


@pytest.mark.postgresql
@pytest.mark.parametrize("query", ["common", '"common word"', "common -rare"])
def test_a_prepared_search_walks_the_newest_messages_to_a_full_page(
    empty_pg: str, query: str
) -> None:
    """A common word is looked for among the newest messages in id order, stopping at a
    full page; in a generic plan too (asyncpg's, psycopg's after a few runs), the
    tsquery is made once, not for each row walked, and each row's session is looked
    up as the walk reaches it (no join that reads every session and the whole range)."""
    store = SessionStore(create_store_engine(empty_pg, poolclass=NullPool))
    store.upgrade()
    for n in range(200):
        store.create_session(f"s{n}", source=("test", "other")[n % 2])
        store.flush(f"s{n}", [turn(f"common word {n} {i}") for i in range(10)])
    with store.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        conn.commit()
    sent: list[tuple[str, tuple[Any, ...]]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "hermes_search_body" in statement:
            sent.append((statement, tuple(params)))

    event.listen(store.engine, "before_cursor_execute", record)
    hits = store.search(query, source=["test", "cli"], limit=5).hits
    event.remove(store.engine, "before_cursor_execute", record)
    assert [(hit.session_id, hit.idx) for hit in hits] == [("s198", i) for i in range(9, 4, -1)]
    assert len(sent) == 1  # the page is full from the newest messages
    for mode in ("generic", "custom"):
        with store.engine.connect() as conn:
            plan = _prepared_plan(conn, "walk", *sent[0], mode=mode)
        nodes = list(_nodes(plan))
        assert _rows_read(plan) < 30, json.dumps(plan, indent=1)  # the page, its bodies, of 2,000
        assert not [node for node in nodes if node["Node Type"] == "Hash Join"], json.dumps(plan)
        assert not [node for node in nodes if "lower(" in node.get("Filter", "")], json.dumps(plan)
    store.close()


def _session_of(store: SessionStore, texts: list[str]) -> str:
    """A new session of ``store`` holding a user message of each of ``texts``; its id."""
    sid = uuid.uuid4().hex
    store.create_session(sid, source="test")
    store.flush(sid, [turn(t) for t in texts])
    return sid


#: Text to index: words of several scripts between runs of blanks, ASCII separators
#: and other separators (where PostgreSQL's parser sees hyphenated words, hosts,
#: files, versions, tags, and so on).
_INDEXED_TEXT = st.lists(
    st.tuples(
        st.sampled_from(["a", "Xy", "db2", "1", "0.5", "é", "ß", "e\u0301", "٣", "部署", "ファ"]),
        st.text(
            alphabet=st.sampled_from(
                [
                    *(chr(c) for c in range(1, 0x30)),
                    *":;<=>?@[\\]^_`{|}~\x7f\u00a0\u00b7\u2014\u3000\ue000🚀\u200b\ufeff",
                ]
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    max_size=20,
).map(lambda pieces: "".join(word + between for word, between in pieces))


@pytest.mark.postgresql
def test_the_trigger_indexes_what_the_previous_revision_did(empty_pg: str) -> None:
    """0010's trigger (blanks left to the parser) writes the vectors 0009's wrote."""
    previous = frozen_revision("0010_search_spaces_kept")._SEPARATORS_0009
    store = SessionStore(create_store_engine(empty_pg, poolclass=NullPool))
    store.upgrade()

    @settings(max_examples=40, deadline=None)
    @given(texts=st.lists(_INDEXED_TEXT, min_size=1, max_size=30))
    def check(texts: list[str]) -> None:
        sid = _session_of(store, texts)
        with store.engine.connect() as conn:
            differ = conn.execute(
                text(
                    "SELECT count(*) FROM hermes_messages WHERE session_id = :s AND "
                    "search_vector IS DISTINCT FROM to_tsvector('simple'::regconfig, "
                    "regexp_replace(hermes_search_body(content, content_parts, tool_name, "
                    "tool_calls), :previous, ' ', 'g'))"
                ),
                {"s": sid, "previous": previous},
            ).scalar_one()
        assert differ == 0

    check()
    # A long run of blanks is one space too: no blank token over the parser's limit.
    notices: list[str] = []
    with store.engine.connect() as conn:
        conn.connection.dbapi_connection.add_notice_handler(  # type: ignore[union-attr]
            lambda diagnostic: notices.append(diagnostic.message_primary or "")
        )
        store.create_session("blanks", source="test")
        store.flush("blanks", [turn("x")])
        conn.exec_driver_sql(  # the trigger runs on an UPDATE as on an INSERT
            "UPDATE hermes_messages SET content = "
            "'head' || repeat(E' \\t\\n\\r', 600) || 'tail' WHERE session_id = 'blanks'"
        )
        vector = conn.exec_driver_sql(
            "SELECT search_vector::text FROM hermes_messages WHERE session_id = 'blanks'"
        ).scalar_one()
        conn.rollback()
    assert vector == "'head':1 'tail':2"
    assert notices == []
    store.close()


#: JSON texts of the columns the body gathers, as any client may write them: arrays
#: of parts or calls (text or not), other JSON values, and escapes of every kind
#: (NUL, lone and paired surrogates, an escaped backslash before a ``u``, CJK).
_ESCAPED = st.sampled_from(
    [
        "\\u0000",
        "\\ud800",
        "\\udc00",
        "\\ud83d\\ude80",
        "\\\\u0041",
        "\\\\u0000",
        "\\\\\\u0000",
        "\\u90e8",
        "\\u03c2",
        "\\n",
    ]
)
_JSON_TEXT = st.builds(
    lambda words, escape: json.dumps(words)[:-1] + escape + '"', _INDEXED_TEXT, _ESCAPED
)
_PART = st.one_of(
    _JSON_TEXT.map(lambda t: f'{{"type": "text", "text": {t}}}'),
    st.just('{"type": "image_url", "image_url": {"url": "x"}}'),
    st.just('{"type": "text", "text": 7}'),
    st.just('"bare"'),
)
_CALL = st.builds(
    lambda name, arguments: (
        f'{{"id": "c", "function": {{"name": {name}, "arguments": {arguments}}}}}'
    ),
    _JSON_TEXT,
    _JSON_TEXT,
) | st.just('{"id": "c"}')
_GATHERED = st.one_of(
    st.none(),
    st.lists(_PART, max_size=3).map(lambda parts: "[" + ", ".join(parts) + "]"),
    st.sampled_from(['{"type": "text", "text": "not a list"}', '"a string"', "null", "3"]),
)
_ROW = st.fixed_dictionaries(
    {
        "content": st.one_of(
            st.none(), _INDEXED_TEXT, st.sampled_from(["ΟΔΟΣ \u017f \u00b5", "部署 数据库", ""])
        ),
        "content_parts": _GATHERED,
        "tool_name": st.none() | st.sampled_from(["terminal", "读取文件"]),
        "tool_calls": st.one_of(
            st.none(), st.lists(_CALL, max_size=3).map(lambda c: "[" + ", ".join(c) + "]")
        ),
    }
)


def _beside_0012(store: SessionStore) -> Callable[[list[dict[str, Any]]], int]:
    """What writes rows into ``hermes_messages`` and, filled by 0012's function, a copy.

    (0012's function cleaning JSON text as 0015 does: its vectors differ only
    where an escaped backslash comes before ``u0000``.)

    Returns a function writing rows (``_ROW``'s columns) into both and counting
    the rows whose vector or CJK words differ.
    """
    previous = frozen_revision("0014_search_trigger_skips_steps")._function_0012()
    # ... but for how it cleans JSON text: as 0015 does (a NUL escape only).
    cleaning = frozen_revision("0015_search_literal_nul_escape")
    for column in ("NEW.content_parts::text", "NEW.tool_calls::text"):
        assert cleaning._pg_cleaned_0003(column) in previous
        previous = previous.replace(cleaning._pg_cleaned_0003(column), cleaning._pg_cleaned(column))
    with store.engine.begin() as conn:
        conn.exec_driver_sql(previous.replace("hermes_search_index()", "search_index_0012()", 1))
        conn.exec_driver_sql(
            "CREATE TABLE as_0012 (LIKE hermes_messages INCLUDING DEFAULTS INCLUDING IDENTITY)"
        )
        conn.exec_driver_sql(  # named as on hermes_messages: the same order of the two
            "CREATE TRIGGER hermes_search_index BEFORE INSERT ON as_0012 "
            "FOR EACH ROW EXECUTE FUNCTION search_index_0012()"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER hermes_search_index_cjk BEFORE INSERT ON as_0012 FOR EACH ROW "
            "WHEN (NEW.search_cjk IS NOT NULL) EXECUTE FUNCTION hermes_search_cjk_words()"
        )
    store.create_session("s", source="test")
    rows = itertools.count()

    def differ(written: list[dict[str, Any]]) -> int:
        with store.engine.begin() as conn:
            for row in written:
                values = {**row, "idx": next(rows), "digest": b"0" * 16}
                for table in ("hermes_messages", "as_0012"):
                    conn.execute(
                        text(
                            f"INSERT INTO {table} (session_id, idx, role, content, content_parts, "
                            "tool_name, tool_calls, digest) VALUES ('s', :idx, 'user', :content, "
                            "CAST(:content_parts AS json), :tool_name, CAST(:tool_calls AS json), "
                            ":digest)"
                        ),
                        values,
                    )
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM hermes_messages m JOIN as_0012 o USING (idx) "
                    "WHERE m.search_vector IS DISTINCT FROM o.search_vector "
                    "OR m.search_cjk IS DISTINCT FROM o.search_cjk"
                ).scalar_one()
            )

    return differ


@pytest.mark.postgresql
def test_the_trigger_indexes_what_0012s_did(empty_pg: str) -> None:
    """0014's trigger (steps a message does not need skipped) writes 0012's vectors and CJK words.

    Each row, as another client may write it, goes into ``hermes_messages`` and
    into a table of the same columns where 0012's function fills them.
    """
    store = SessionStore(create_store_engine(empty_pg, poolclass=NullPool))
    store.upgrade()
    differ = _beside_0012(store)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(written=st.lists(_ROW, min_size=1, max_size=8))
    def check(written: list[dict[str, Any]]) -> None:
        assert differ(written) == 0

    check()
    with store.engine.connect() as conn:  # (the rows are indexed at all)
        assert conn.exec_driver_sql(
            "SELECT count(*) FROM hermes_messages WHERE search_vector <> ''"
        ).scalar_one()
    store.close()


@pytest.mark.postgresql
def test_the_trigger_indexes_what_0012s_did_in_a_database_not_in_utf8(pg_server_url: str) -> None:
    """In SQL_ASCII a character past ASCII is bytes: 0014 takes every step there, as 0012."""
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"hermes_ascii_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(
            f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    url = make_url(pg_server_url).set(database=name).update_query_dict({"client_encoding": "utf8"})
    try:
        store = SessionStore(create_store_engine(url, poolclass=NullPool))
        store.upgrade()
        differ = _beside_0012(store)
        texts = ["plain words", "\u00b5 micro \u017f long s \u03c2 final", "中文字符", "κόσμος ϐ"]
        rows = [
            {"content": t, "content_parts": None, "tool_name": None, "tool_calls": None}
            for t in texts
        ]
        assert differ(rows) == 0
        store.close()
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


#: Words of scripts written without spaces (some joined to others by punctuation),
#: between blanks of every kind Python's ``str.split`` cuts at, and separators.
_CJK_WORDS = ["部署", "数据库", "ファイル", "100%完成", "a部署b", "設定,ok", "x", "ê", "한국어"]
_CJK_TEXT = st.lists(
    st.tuples(
        st.sampled_from(_CJK_WORDS),
        st.sampled_from(
            [" ", "\t", "\x1c", "\x85", "\u2028", "\u3000", "\uff0c", ", ", "-", "\n\n"]
        ),
    ),
    min_size=1,
    max_size=12,
).map(lambda pieces: "".join(word + between for word, between in pieces))


@pytest.mark.postgresql
@pytest.mark.heavy
def test_a_cjk_like_message_keeps_only_its_words_in_such_scripts(empty_pg: str) -> None:
    """``search_cjk`` holds the body's blank-separated words that hold a CJK-like character.

    What a search looks for as a substring never holds a blank, so each is
    found there exactly as in the whole body (which SQLite's trigram table
    holds): every such word of the text is found, on both backends.
    """
    store = SessionStore(create_store_engine(empty_pg, poolclass=NullPool))
    store.upgrade()

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(texts=st.lists(_CJK_TEXT, min_size=1, max_size=6))
    def check(texts: list[str]) -> None:
        sid = _session_of(store, texts)
        with store.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT hermes_search_body(content, content_parts, tool_name, tool_calls), "
                    "search_cjk FROM hermes_messages WHERE session_id = :s ORDER BY idx"
                ),
                {"s": sid},
            ).all()
        for body, kept in rows:
            words = [word for word in body.split() if is_unsegmented(word)]
            assert kept == (" ".join(words) or None)
        for idx, written in enumerate(texts):
            for word in _CJK_WORDS:
                if word in written and is_unsegmented(word):
                    hits = store.search(word, session_id=sid, limit=100).hits
                    assert idx in [hit.idx for hit in hits], (word, written)

    check()
    store.close()


@pytest.mark.postgresql
def test_statistics_choose_the_window_per_store(empty_pg: str) -> None:
    """A word the statistics show rare gets the short window; a common one, and a
    word common only since the statistics were gathered, are found in the newest
    messages; two stores on one engine, in two schemas, each read their own."""
    engine = create_store_engine(empty_pg, poolclass=NullPool)
    stores = {name: SessionStore(engine, schema=name) for name in ("tenant_a", "tenant_b")}
    for name, store in stores.items():
        store.upgrade()
        store.create_session("s", source="test")
        word = "filler" if name == "tenant_a" else "needle"
        store.flush("s", [turn("needle point")] + [turn(f"{word} {i}") for i in range(3000)])
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ANALYZE {name}.hermes_messages")
    windows: list[int] = []
    by_index: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "m.id > %s AND m.id < %s" in statement:
            low, high = params[-3:-1]
            windows.append(high - low)
        elif "m.id + 0 > %s" in statement:
            by_index.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    a, b = stores["tenant_a"], stores["tenant_b"]
    assert [hit.idx for hit in a.search("needle").hits] == [0]
    assert windows == [search.PG_RARE_WINDOW]
    assert len(by_index) == 1
    windows.clear()
    assert len(a.search("filler").hits) == 20
    assert windows == [search.PG_WINDOW]
    windows.clear()
    assert len(b.search("needle").hits) == 20  # common in this schema
    assert windows == [search.PG_WINDOW]
    a.flush("s", a.get_messages("s") + [turn(f"newword {i}") for i in range(100)])
    by_index.clear()
    windows.clear()
    assert len(a.search("newword").hits) == 20
    assert windows == [search.PG_RARE_WINDOW]
    assert by_index == []  # found in the newest messages, not by fetching every match
    event.remove(engine, "before_cursor_execute", record)
    for store in stores.values():
        store.close()
    engine.dispose()


def test_a_term_repeated_in_a_query_is_looked_for_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """670 copies of ``a*`` (under the length limit) scan a long body once, not 680 times."""
    scanned: list[search.Leaf] = []
    real, real_phrase = search._leaf_spans, search._phrase_spans

    def spy(leaf: search.Leaf, body: str) -> Any:
        scanned.append(leaf)
        return real(leaf, body)

    def spy_phrase(leaf: search.Leaf, body: str) -> Any:
        scanned.append(leaf)
        return real_phrase(leaf, body)

    monkeypatch.setattr(search, "_leaf_spans", spy)
    monkeypatch.setattr(search, "_phrase_spans", spy_phrase)
    query = search.parse_query(" ".join(["a*"] * 670) + ' "b c" OR "b c"')
    spans = search.match_spans(query, " ".join(["a"] * 100) + " b c")
    assert len(scanned) == len(set(scanned)) == 2
    assert len(spans) == 101


_PHRASE_WORDS = ["a", "ab", "b", "A", "Ab", "aB", "ς", "Σ"]


@settings(max_examples=300, deadline=None)
@given(
    body=st.lists(
        st.tuples(st.sampled_from(_PHRASE_WORDS), st.sampled_from([" ", "-", " . ", "\n"])),
        max_size=40,
    ),
    phrase=st.lists(st.sampled_from(_PHRASE_WORDS), min_size=2, max_size=5),
    prefix=st.booleans(),
)
def test_a_phrase_is_marked_where_the_phrase_scan_marks_it(
    body: list[tuple[str, str]], phrase: list[str], prefix: bool
) -> None:
    """Over the text's tokens, in linear time, the very spans the regular expression finds
    (leftmost, each after the one before), trying the phrase at every word in turn."""
    text = "".join(word + gap for word, gap in body).lower()
    leaf = Leaf(tuple(phrase), prefix=prefix)
    assert list(search._phrase_spans(leaf, text)) == list(search._leaf_spans(leaf, text))


def test_a_capital_dotted_i_is_one_letter_where_hits_are_marked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``İ`` lowers to ``i`` and a combining dot (a separator) by ``str.lower``; marked as
    one letter ``i``, as PostgreSQL lowers it: a word holding it is one word, never two,
    and a phrase holding it, or over a body holding it, is found over the tokens (a scan
    would try it at each of the body's words: seconds a hit, for a long query over a
    long tool output)."""
    scanned: list[search.Leaf] = []
    real = search._leaf_spans

    def spy(leaf: search.Leaf, body: str) -> Any:
        scanned.append(leaf)
        return real(leaf, body)

    monkeypatch.setattr(search, "_leaf_spans", spy)

    def marked(query: str, body: str) -> list[str]:
        return [body[a:b] for a, b in search.match_spans(search.parse_query(query), body)]

    body = "İzmir, then İstanbul trip; 部署 after İ"
    assert marked('"İstanbul trip" OR İzmir OR 部署 OR "0 0 İ"', body) == [
        "İzmir",
        "İstanbul trip",
        "部署",
    ]
    assert all(len(leaf.tokens) == 1 for leaf in scanned)  # a word, a substring: no phrase
    assert marked("zmir", "İzmir and zmir") == ["zmir"]  # not a piece of İzmir
    assert marked("\u03c3", "\u03a3\u0130\u03a3 \u03c3 \u03c2") == ["\u03c3", "\u03c2"]  # sigmas
    # PostgreSQL finds İstanbul by istanbul: marked there, as the hit it is.
    assert marked('istanbul OR "istanbul trip"', "İstanbul trip, ISTANBUL") == [
        "İstanbul trip",
        "ISTANBUL",
    ]
    words = [f"w{i}" for i in range(17)]
    body = "İzmir notes: " + " ".join(words) + " end"
    start = body.index("w0")
    assert search.match_spans(search.parse_query('"' + " ".join(words) + '"'), body) == [
        (start, start + len(" ".join(words)))
    ]


def test_a_long_phrase_over_a_long_message_is_marked_where_it_ends() -> None:
    """The phrase is tried at each of the message's thousands of words (each try hundreds
    of words long): one place holds it, marked whole."""
    words = 330
    leaf = Leaf(("a",) * words + ("b",))
    body = "a " * 7_500 + "a " * words + "b"
    assert list(search._phrase_spans(leaf, body)) == [(len(body) - 2 * words - 1, len(body))]


def test_a_scientific_notation_word_s_tail_and_parts_apart_are_found_on_postgresql_only(
    store: SessionStore,
) -> None:
    """PostgreSQL's parser cuts ``4e1abc2`` in two words (README, differences)."""
    store.create_session("s", "cli")
    store.flush(
        "s",
        [
            {"role": "user", "content": "checked out 4e1abc2 on main"},
            {"role": "user", "content": "hash 3e4 f9a1 split"},
        ],
    )
    postgres = store.engine.dialect.name == "postgresql"
    tail = store.search("abc2").hits
    assert [h.idx for h in tail] == ([0] if postgres else [])
    assert [h.rank for h in tail] == ([0.0] if postgres else [])
    assert [h.idx for h in store.search("3e4f9a1").hits] == ([1] if postgres else [])


def test_a_word_opening_with_a_mark_newer_than_unicode_6_1_is_whole_on_sqlite_only(
    store: SessionStore,
) -> None:
    """FTS5 keeps U+1AB0 in the word it opens; PostgreSQL's parser drops it there."""
    store.create_session("s", "cli")
    store.flush("s", [{"role": "user", "content": "x \u1ab0abc y"}])
    postgres = store.engine.dialect.name == "postgresql"
    assert [h.idx for h in store.search("\u1ab0abc").hits] == ([] if postgres else [0])
    assert [h.idx for h in store.search("abc").hits] == ([0] if postgres else [])


def test_a_query_with_nothing_to_look_for_is_refused_before_connecting() -> None:
    """As a bad limit or cursor is: no database is asked, none needs to be reachable."""
    import asyncio

    from hermes_orm import AsyncSessionStore, RetryPolicy

    nowhere = "postgresql+{}://u@127.0.0.1:1/none"  # nobody listens on port 1
    policy = RetryPolicy(unavailable_for=1)
    store = SessionStore(nowhere.format("psycopg"), retry=policy)
    async_store = AsyncSessionStore(nowhere.format("asyncpg"), retry=policy)
    for query in ("", "-excluded", "x" * (search.MAX_QUERY_CHARS + 1), "nul\x00"):
        with pytest.raises(SearchQueryError):
            store.search(query)
        with pytest.raises(SearchQueryError):
            asyncio.run(async_store.search(query))
    with pytest.raises(SearchQueryError):
        store.for_user("u").search("", user_id="someone else")
    store.close()
