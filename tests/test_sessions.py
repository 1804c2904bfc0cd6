"""Sessions: create, ensure (racing), read, end, delete, list with keyset pagination."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

import hermes_orm
from hermes_orm import (
    InvalidSessionError,
    SchemaOutOfDateError,
    SessionExistsError,
    SessionNotFoundError,
    SessionStore,
)
from tests.conftest import count_rows, meanwhile, sync_engine, table_name


def test_create_and_get(store: SessionStore) -> None:
    created = store.create_session(
        "s1",
        source="cli",
        model="openai/gpt-5",
        model_config={"temperature": 0.7},
        user_id="u1",
        title="first",
        extra={"labels": ["a"]},
        started_at=1700000000.5,
    )
    got = store.get_session("s1")
    assert got == created
    assert got is not None
    assert got["flushed_idx"] == 0 == got["message_count"]
    assert got["model_config"] == {"temperature": 0.7}
    assert got["extra"] == {"labels": ["a"]}
    assert got["started_at"] == 1700000000.5
    assert store.get_session("missing") is None


def test_create_twice_is_a_typed_error(store: SessionStore) -> None:
    store.create_session("s1", source="cli")
    with pytest.raises(SessionExistsError):
        store.create_session("s1", source="cli")


@pytest.mark.parametrize(
    ("session_id", "fields"),
    [
        ("", {}),
        ("x" * 256, {}),
        ("nul\x00", {}),
        (5, {}),
        ("ok", {"no_such_column": 1}),
        ("ok", {"flushed_idx": 3}),
        ("ok", {"message_count": 3}),
        ("ok", {"model": 5}),
        ("ok", {"input_tokens": "many"}),
        ("ok", {"input_tokens": True}),
        ("ok", {"started_at": float("nan")}),
        ("ok", {"archived": "yes"}),
        ("ok", {"extra": {"bad": {1, 2}}}),
        ("ok", {"model_config": {1: "int key"}}),
        ("ok", {"started_at": None}),
        ("ok", {"source": None}),
    ],
)
def test_bad_session_input_is_refused(
    store: SessionStore, session_id: Any, fields: dict[str, Any]
) -> None:
    fields = dict(fields)  # the parameter is shared between backends
    source = fields.pop("source", "cli")
    with pytest.raises(InvalidSessionError):
        store.create_session(session_id, source=source, **fields)
    assert count_rows(sync_engine(store), "hermes_sessions") == 0


def test_ensure_session_fills_only_missing_fields(store: SessionStore) -> None:
    assert store.ensure_session("s1", source="gateway", user_id="u1") is True
    assert (
        store.ensure_session(
            "s1",
            source="cli",
            model="m",
            user_id="other",
            model_config={"temperature": 0.5},
            extra={"k": [1]},
            started_at=5.0,
        )
        is False
    )
    got = store.get_session("s1")
    assert got is not None
    assert (got["source"], got["user_id"], got["model"]) == ("gateway", "u1", "m")
    assert (got["model_config"], got["extra"]) == ({"temperature": 0.5}, {"k": [1]})
    assert got["started_at"] != 5.0  # set at creation, never overwritten


def test_ensure_session_keeping_its_parent_does_not_look_at_the_one_given(
    store: SessionStore,
) -> None:
    """The parent already set stays: one given that is missing, or would loop, is not
    written, so it refuses nothing; the NULL columns are filled (Hermes' upsert too)."""
    store.create_session("p", source="cli")
    store.create_session("a", source="cli", parent_session_id="p")
    store.create_session("b", source="cli", parent_session_id="a")
    assert store.ensure_session("a", parent_session_id="gone", model="m") is False
    assert store.ensure_session("a", parent_session_id="b", title="t") is False  # b is a's child
    got = store.get_session("a")
    assert got is not None
    assert (got["parent_session_id"], got["model"], got["title"]) == ("p", "m", "t")
    # Without a parent yet, the one given is checked.
    with pytest.raises(InvalidSessionError, match="does not exist"):
        store.ensure_session("p", parent_session_id="gone")


def test_ensure_session_keeping_its_title_does_not_look_at_the_one_given(
    store: SessionStore,
) -> None:
    """A title already set stays: one given that another session holds is not written,
    so it refuses nothing, and the NULL columns are filled."""
    store.create_session("a", source="cli", title="x")
    store.create_session("b", source="cli", title="y")
    assert store.ensure_session("a", title="y", model="m") is False
    got = store.get_session("a")
    assert got is not None
    assert (got["title"], got["model"]) == ("x", "m")


@pytest.mark.parametrize("value", [{"k": "split \ud83d\ude00"}, {"\ud83d\ude00": 1}])
@pytest.mark.parametrize("field", ["extra", "model_config"])
def test_session_json_with_a_pair_split_in_two_is_refused(
    store: SessionStore, field: str, value: dict[str, Any]
) -> None:
    """A character held as two code units would read back as the one character: refused
    (a lone surrogate is kept, escaped, as Hermes keeps it)."""
    with pytest.raises(InvalidSessionError, match=f"{field}.*two code units"):
        store.create_session("s", source="cli", **{field: value})
    store.create_session("s", source="cli", **{field: {"lone": "\ud800"}})
    assert store.get_session("s")[field] == {"lone": "\ud800"}  # type: ignore[index]
    with pytest.raises(InvalidSessionError, match="two code units"):
        store.ensure_session("t", **{field: value})
    assert store.get_session("t") is None


def _parent_read(statement: str) -> bool:
    return "FOR KEY SHARE" in statement or "FOR SHARE" in statement


@pytest.mark.backends("postgresql")  # (SQLite's writers take turns on its write lock)
def test_a_parent_written_beside_a_transaction_updating_both_rows(engine: Engine) -> None:
    """An application's transaction updates the child, then the parent, while the store
    gives the child that parent (having read the parent): both commit, in turn, and
    neither is aborted as a deadlock."""
    store = SessionStore(engine)
    store.create_session("p", source="cli")
    store.create_session("a", source="cli")
    sessions = table_name(engine, "hermes_sessions")

    def application() -> None:
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {sessions} SET model = 'm' WHERE id = 'a'"))
            conn.execute(text(f"UPDATE {sessions} SET model = 'm' WHERE id = 'p'"))

    with meanwhile(engine, _parent_read, application, wait=0.3) as app:
        assert store.ensure_session("a", parent_session_id="p") is False
    assert app.thread is not None
    assert app.error is None, app.error
    a = store.get_session("a")
    assert a is not None
    assert (a["parent_session_id"], a["model"]) == ("p", "m")


def _walked(statement: str) -> bool:
    return "RECURSIVE" in statement.upper()


def test_parent_links_written_at_once_never_make_a_loop(engine: Engine) -> None:
    """``a -> b`` and ``b -> a`` set at once: the second write sees the first's link and
    is refused (on PostgreSQL it waits for the first's commit), never both."""
    store = SessionStore(engine)
    store.create_session("a", source="cli")
    store.create_session("b", source="cli")

    def other() -> bool:
        return store.ensure_session("b", parent_session_id="a")

    # After a's write looked for a loop (none yet), b's write runs.
    with meanwhile(engine, _walked, other) as b:
        try:
            store.ensure_session("a", parent_session_id="b")
            refused = None
        except InvalidSessionError as exc:
            refused = exc
    assert b.thread is not None  # (b's write ran)
    a, b_ = store.get_session("a"), store.get_session("b")
    assert a is not None
    assert b_ is not None
    links = (a["parent_session_id"], b_["parent_session_id"])
    refusals = [str(e) for e in (refused, b.error) if e is not None]
    assert len(refusals) == 1, (refusals, links)
    assert "the lineage would loop" in refusals[0]
    assert links == ((None, "a") if refused is not None else ("b", None))
    from hermes_orm.verify import verify_database

    assert verify_database(store).ok


def _title_checked(statement: str) -> bool:
    return statement.lstrip().startswith("SELECT hermes_sessions.id, hermes_sessions.user_id")


@pytest.mark.parametrize("make", ["create_session", "ensure_session"])
def test_a_title_taken_at_once_is_a_typed_error(engine: Engine, make: str) -> None:
    """Two sessions given one title at once: one is refused with InvalidSessionError
    (on PostgreSQL by the title's unique index: the other's title was not committed
    when this write looked), never a driver error."""
    store = SessionStore(engine)
    if make == "ensure_session":
        store.create_session("x", source="cli")

    def other() -> dict[str, Any]:
        return store.create_session("y", source="cli", title="t")

    with meanwhile(engine, _title_checked, other) as y:
        try:
            getattr(store, make)("x", source="cli", title="t")
            refused = None
        except InvalidSessionError as exc:
            refused = exc
    assert y.thread is not None  # (the other write ran)
    titles = {s["id"]: s["title"] for s in store.list_sessions().sessions}
    if refused is not None:
        assert "already used" in str(refused)
        assert y.error is None
        assert (titles.get("x"), titles["y"]) == (None, "t")
    else:
        assert isinstance(y.error, InvalidSessionError), y.error
        assert titles == {"x": "t"}


def _ensure(url: str, barrier: Any, results: Any) -> None:
    store = SessionStore(url)
    barrier.wait()
    results.put(store.ensure_session("raced", source="gateway"))
    store.close()


def test_ensure_session_race_between_processes(store: SessionStore, db_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(db_url, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(results.get(timeout=5) for _ in procs) == [False, False, True]
    assert count_rows(sync_engine(store), "hermes_sessions") == 1


def test_end_session(store: SessionStore) -> None:
    store.create_session("s1", source="cli")
    store.end_session("s1", "user_exit")
    got = store.get_session("s1")
    assert got is not None
    assert got["end_reason"] == "user_exit"
    assert got["ended_at"] >= got["started_at"]
    with pytest.raises(SessionNotFoundError):
        store.end_session("missing", "x")


def test_delete_session_removes_messages_and_unlinks_children(store: SessionStore) -> None:
    store.create_session("parent", source="cli")
    store.create_session("child", source="cli", parent_session_id="parent")
    store.create_session("other", source="cli")
    store.flush("parent", [{"role": "user", "content": "hi"}])
    store.flush("other", [{"role": "user", "content": "keep"}])
    assert store.delete_session("parent") is True
    assert store.delete_session("parent") is False
    assert store.get_session("parent") is None
    child = store.get_session("child")
    assert child is not None
    assert child["parent_session_id"] is None
    assert count_rows(sync_engine(store), "hermes_messages") == 1
    assert store.get_messages("other") == [{"role": "user", "content": "keep"}]


def test_list_sessions_keyset_pages_and_filters(store: SessionStore) -> None:
    for i in range(7):
        store.create_session(
            f"s{i}",
            source="cli" if i % 2 else "telegram",
            user_id=f"u{i % 3}",
            started_at=1000.0 + i // 2,
        )
    seen: list[str] = []
    cursor = None
    while True:
        page = store.list_sessions(limit=3, cursor=cursor)
        seen += [s["id"] for s in page.sessions]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    # newest first; ties on started_at broken by id, descending
    assert seen == ["s6", "s5", "s4", "s3", "s2", "s1", "s0"]
    assert [s["id"] for s in store.list_sessions(source="cli").sessions] == ["s5", "s3", "s1"]
    assert [s["id"] for s in store.list_sessions(user_id="u0").sessions] == ["s6", "s3", "s0"]
    with pytest.raises(InvalidSessionError):
        store.list_sessions(cursor="not-a-cursor")
    with pytest.raises(InvalidSessionError):
        store.list_sessions(limit=0)


def test_store_refuses_a_database_without_schema(empty_db_url: str) -> None:
    store = SessionStore(empty_db_url)
    with pytest.raises(SchemaOutOfDateError, match="hermes-orm db upgrade"):
        store.create_session("s", source="cli")
    store.upgrade()
    store.create_session("s", source="cli")
    store.close()


def test_repr_hides_the_password() -> None:
    store = SessionStore("postgresql://user:secret@127.0.0.1:1/db")
    assert "secret" not in repr(store)
    assert "***" in repr(store)


def test_other_backends_are_refused_with_a_typed_error() -> None:
    import types

    from sqlalchemy import create_engine

    from hermes_orm import UnsupportedBackendError

    driver = types.SimpleNamespace(paramstyle="format", version_info=(2, 2, 0), Error=Exception)
    engine = create_engine("mysql://user@127.0.0.1/db", module=driver)  # never connects
    with pytest.raises(UnsupportedBackendError, match="SQLite and PostgreSQL"):
        SessionStore(engine)


def test_missing_parent_and_taken_title_are_typed_errors(store: SessionStore) -> None:
    store.create_session("a", source="cli", title="Shared title")
    with pytest.raises(InvalidSessionError, match="parent session 'nope' does not exist"):
        store.create_session("b", source="cli", parent_session_id="nope")
    with pytest.raises(InvalidSessionError, match="already used by session 'a'"):
        store.create_session("b", source="cli", title="Shared title")
    with pytest.raises(InvalidSessionError, match="already used"):
        store.ensure_session("a2", source="cli", title="Shared title")
    assert store.get_session("b") is None
    assert store.ensure_session("a", source="cli", title="Shared title") is False


def test_a_lineage_loop_is_refused_before_it_is_written(store: SessionStore) -> None:
    """No parent link the store writes makes a loop (``hermes-orm verify`` reports one)."""
    for make in (store.create_session, store.ensure_session):
        with pytest.raises(InvalidSessionError, match="cannot be its own parent"):
            make("self", source="cli", parent_session_id="self")
    assert store.get_session("self") is None
    store.create_session("a", source="cli")
    store.create_session("b", source="cli", parent_session_id="a")
    store.create_session("c", source="cli", parent_session_id="b")
    # ensure_session fills a missing parent: a's, with its own grandchild, would loop.
    with pytest.raises(InvalidSessionError, match="'c' descends from session 'a'"):
        store.ensure_session("a", source="cli", parent_session_id="c")
    assert store.get_session("a")["parent_session_id"] is None  # type: ignore[index]
    assert store.ensure_session("c", source="cli", parent_session_id="b") is False
    # ensure_session keeps a parent already set: a given one that would loop is not written.
    assert store.ensure_session("b", source="cli", parent_session_id="c") is False
    assert store.get_session("b")["parent_session_id"] == "a"  # type: ignore[index]
    store.create_session("d", source="cli", parent_session_id="c")  # a longer line is fine
    from hermes_orm.verify import verify_database

    assert verify_database(SessionStore(sync_engine(store))).ok


_PRAGMAS = ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")


def _pragmas(conn: Any) -> tuple[Any, ...]:
    return tuple(conn.exec_driver_sql(f"PRAGMA {name}").scalar() for name in _PRAGMAS)


@pytest.mark.sqlite
def test_an_applications_sqlite_engine_is_left_as_it_was(tmp_path: Path) -> None:
    """The store's settings hold for its own work only; the app's connections keep theirs."""
    from sqlalchemy import create_engine

    host = create_engine(f"sqlite:///{tmp_path / 'app.db'}", pool_size=1, max_overflow=0)
    with host.connect() as conn:  # the one connection the app and the store share
        before = _pragmas(conn)
    assert before[:2] == ("delete", 0)
    hermes_orm.upgrade(host)
    store = SessionStore(host, sqlite_synchronous="NORMAL", lock_timeout=2.0)
    store.create_session("s", source="cli")
    store.flush("s", [{"role": "user", "content": "hi"}])
    # journal mode is the database file's: left as the app has it.
    assert store.read_transaction(_pragmas) == ("delete", 1, 2000, 1)
    store.close()
    with host.connect() as conn:
        assert _pragmas(conn) == before
    host.dispose()


@pytest.mark.sqlite
def test_an_async_call_waiting_for_a_connection_gets_the_one_the_store_would_keep(
    tmp_path: Path,
) -> None:
    """aiosqlite, the application's pool of two: a connection that failed as it was
    made frees its place without waking the call waiting for one, which only a
    connection given back wakes. The store keeps none while a call of its waits: the
    waiting call goes on at once, not at the pool's timeout."""
    import asyncio
    import time

    from sqlalchemy import event
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.util import await_only

    def named(name: str) -> bool:
        task = asyncio.current_task()
        return task is not None and task.get_name() == name

    async def main() -> float:
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
            pool_size=2,
            max_overflow=0,
            pool_timeout=60,
        )
        store = hermes_orm.AsyncSessionStore(engine)
        await store.upgrade()
        await store.create_session("s", source="cli")  # (its connection kept)
        holding, go_on, connecting, fail = (asyncio.Event() for _ in range(4))

        def hold(*_args: Any) -> None:
            if named("holder"):
                holding.set()
                await_only(go_on.wait())

        def broken(*_args: Any) -> None:
            if named("connector"):
                connecting.set()
                await_only(fail.wait())
                raise RuntimeError("connection refused")

        event.listen(engine.sync_engine, "before_cursor_execute", hold)
        event.listen(engine.sync_engine, "connect", broken)
        calls = {
            name: asyncio.create_task(store.get_messages("s"), name=name)
            for name in ("holder", "connector")
        }
        await holding.wait()  # the holder took the kept connection, and holds it
        await connecting.wait()  # the connector makes the pool's second one
        calls["waiter"] = asyncio.create_task(store.get_messages("s"), name="waiter")
        await asyncio.sleep(0.05)  # the waiter waits in the pool's queue
        fail.set()
        start = time.monotonic()
        await asyncio.gather(calls["connector"], return_exceptions=True)
        go_on.set()  # the holder's call ends: its connection goes back, not kept
        assert await calls["holder"] == []
        assert await calls["waiter"] == []
        took = time.monotonic() - start
        assert isinstance(calls["connector"].exception(), Exception)
        await store.close()
        await engine.dispose()
        return took

    assert asyncio.run(main()) < 20  # (not the 60 s of a wait to its end)


@pytest.mark.sqlite
def test_a_thread_waiting_for_a_connection_gets_the_one_the_store_would_keep(
    tmp_path: Path,
) -> None:
    """The application's pool of two: a connection that failed as it was made frees its
    place without waking the thread waiting for one, which only a connection given
    back wakes. The store keeps none while a call of its waits: the waiting call goes
    on at once, not at the pool's timeout."""
    import threading

    from sqlalchemy import create_engine, event

    engine = create_engine(
        f"sqlite:///{tmp_path / 'app.db'}", pool_size=2, max_overflow=0, pool_timeout=60
    )
    store = hermes_orm.SessionStore(engine)
    store.upgrade()
    store.create_session("s", source="cli")  # (its connection kept)
    holding, go_on, connecting, fail = (threading.Event() for _ in range(4))

    def hold(*_args: Any) -> None:
        if threading.current_thread().name == "holder":
            holding.set()
            go_on.wait(30)

    def broken(*_args: Any) -> None:
        if threading.current_thread().name == "connector":
            connecting.set()
            fail.wait(30)
            raise RuntimeError("connection refused")

    event.listen(engine, "before_cursor_execute", hold)
    event.listen(engine, "connect", broken)
    results: dict[str, Any] = {}

    def call(name: str) -> None:
        try:
            results[name] = store.get_messages("s")
        except Exception as exc:  # (looked at below)
            results[name] = exc

    threads = {
        name: threading.Thread(target=call, args=(name,), name=name)
        for name in ("holder", "connector", "waiter")
    }
    threads["holder"].start()  # takes the kept connection, and holds it
    assert holding.wait(30)
    threads["connector"].start()  # makes the pool's second one
    assert connecting.wait(30)
    threads["waiter"].start()  # the pool is full: it waits
    time.sleep(0.5)
    fail.set()  # the second connection fails: its place is free, and no one woken
    threads["connector"].join(30)
    start = time.monotonic()
    go_on.set()
    threads["holder"].join(90)
    threads["waiter"].join(90)
    took = time.monotonic() - start
    assert isinstance(results["connector"], RuntimeError)
    assert results["holder"] == results["waiter"] == []
    assert took < 20  # (not the 60 s of a wait to the pool's timeout)
    store.close()
    engine.dispose()


@pytest.mark.sqlite
def test_a_database_busy_at_the_schema_check_is_waited_for(tmp_path: Path) -> None:
    """The store's first call checks the schema: a writer holding the file meanwhile is
    waited out as the call's own work would be, not told as an error."""
    import sqlite3
    import threading

    from sqlalchemy import create_engine, event

    from hermes_orm import RetryPolicy

    url = f"sqlite:///{tmp_path / 'a.db'}"
    with SessionStore(url) as first:
        first.upgrade()
        first.create_session("s", source="cli")
    writer = sqlite3.connect(tmp_path / "a.db", isolation_level=None, check_same_thread=False)
    writer.execute("PRAGMA journal_mode=DELETE")  # (out of WAL: a writer blocks readers)
    engine = create_engine(url, connect_args={"timeout": 0.05})  # the application's
    store = SessionStore(engine, lock_timeout=0.05, retry=RetryPolicy(attempts=50, max_delay=0.05))
    began: list[threading.Timer] = []

    @event.listens_for(engine, "checkout")
    def another_writer_begins(*_: Any) -> None:
        if not began:
            writer.execute("BEGIN EXCLUSIVE")
            began.append(threading.Timer(0.3, writer.execute, ("COMMIT",)))
            began[0].start()

    try:
        assert [s["id"] for s in store.list_sessions().sessions] == ["s"]
    finally:
        began[0].join()
        store.close()
        engine.dispose()
        writer.close()


@pytest.mark.sqlite
def test_a_lock_wait_under_a_millisecond_is_one_not_none(tmp_path: Path) -> None:
    """SQLite's busy_timeout counts whole milliseconds, and 0 is no wait at all."""
    store = SessionStore(f"sqlite:///{tmp_path / 'a.db'}", lock_timeout=0.0004)
    store.upgrade()
    assert store.read_transaction(_pragmas)[2] == 1
    store.close()


@pytest.mark.sqlite
@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_store_reads_beside_a_writer_that_keeps_the_database_from_wal(
    tmp_path: Path, api: str
) -> None:
    """Another connection writing a database in rollback-journal mode (an application, a
    migration under way) keeps a new connection from switching it to WAL: the store reads
    beside it all the same, and switches it once the writer is done."""
    import asyncio
    import sqlite3

    from hermes_orm.async_store import AsyncSessionStore

    path = tmp_path / "app.db"
    hermes_orm.upgrade(f"sqlite:///{path}")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=DELETE")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE app_things (x)")
    url = f"sqlite:///{path}"
    if api == "sync":
        store = SessionStore(url, lock_timeout=0.2)
        listed, close = store.list_sessions, store.close
    else:
        runner = asyncio.Runner()
        async_store = AsyncSessionStore(url, lock_timeout=0.2)

        def listed() -> Any:
            return runner.run(async_store.list_sessions())

        def close() -> None:
            runner.run(async_store.close())
            runner.close()

    try:
        assert listed().sessions == []  # (it was a DatabaseBusyError)
        writer.execute("COMMIT")
        assert listed().sessions == []
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    finally:
        close()
        writer.close()


@pytest.mark.parametrize("api", ["sync", "async"])
def test_another_applications_database_is_refused_and_left_in_its_mode(
    tmp_path: Path, api: str
) -> None:
    """A store on a SQLite file of someone else's tables (a mistyped URL) refuses it for
    want of the schema, and leaves the file byte for byte as it was: not switched to WAL."""
    import asyncio
    import sqlite3

    from hermes_orm import SchemaOutOfDateError
    from hermes_orm.async_store import AsyncSessionStore

    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    conn.close()
    before = path.read_bytes()
    url = f"sqlite:///{path}"

    async def listed() -> None:
        store = AsyncSessionStore(url)
        try:
            await store.list_sessions()
        finally:
            await store.close()

    if api == "sync":
        with SessionStore(url) as store, pytest.raises(SchemaOutOfDateError):
            store.list_sessions()
    else:
        with pytest.raises(SchemaOutOfDateError):
            asyncio.run(listed())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_a_store_opened_before_the_hosts_migration_switches_the_file_once_migrated(
    tmp_path: Path,
) -> None:
    """The connection that found no tables of ours does not stay in the pool: the one
    after the migration switches the file to WAL (the pool kept it in rollback-journal
    mode for its life)."""
    import sqlite3

    path = tmp_path / "host.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE host_things (x)")
    conn.close()
    with SessionStore(f"sqlite:///{path}") as store:
        store.upgrade()
        assert store.list_sessions().sessions == []
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        conn.close()


@pytest.mark.sqlite
def test_a_reader_keeping_the_database_from_wal_does_not_hold_up_each_call(
    tmp_path: Path,
) -> None:
    """A long read transaction on a database in rollback-journal mode keeps it from
    switching to WAL; each new connection tried for the whole busy_timeout (5 s), where
    reads beside that reader need no wait. It tries a moment, and the file switches once
    the reader is done."""
    import sqlite3

    path = tmp_path / "app.db"
    hermes_orm.upgrade(f"sqlite:///{path}")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("PRAGMA journal_mode=DELETE")
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM hermes_sessions").fetchall()
    store = SessionStore(f"sqlite:///{path}", lock_timeout=5)
    try:
        began = time.monotonic()
        for _ in range(3):
            assert store.list_sessions().sessions == []
        assert time.monotonic() - began < 4  # (each waited 5 s: 15 s)
        reader.execute("COMMIT")
        store.create_session("s", source="cli")
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    finally:
        store.close()
        reader.close()


@pytest.mark.sqlite
def test_stores_on_one_sqlite_engine_each_keep_their_settings(tmp_path: Path) -> None:
    """Stores with other settings share an engine; none leaks into another's work."""
    from hermes_orm import create_store_engine

    engine = create_store_engine(f"sqlite:///{tmp_path / 'one.db'}")  # FULL, 5 s
    full = SessionStore(engine)
    full.upgrade()
    normal = SessionStore(engine, sqlite_synchronous="NORMAL", lock_timeout=1.0)
    for _ in range(3):  # in turns, on connections either may have used before
        assert full.read_transaction(_pragmas) == ("wal", 1, 5000, 2)
        assert normal.read_transaction(_pragmas) == ("wal", 1, 1000, 1)
    full.close()
    normal.close()
    with engine.connect() as conn:  # the engine's own setting, on every connection
        assert _pragmas(conn) == ("wal", 1, 5000, 2)
    engine.dispose()


@pytest.mark.sqlite
def test_an_async_store_leaves_an_applications_aiosqlite_engine_as_it_was(
    tmp_path: Path,
) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from hermes_orm.async_store import AsyncSessionStore

    async def main() -> None:
        host = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
        async with host.connect() as conn:
            before = await conn.run_sync(_pragmas)
        store = AsyncSessionStore(host, sqlite_synchronous="NORMAL")
        await store.upgrade()
        await store.create_session("s", source="cli")
        assert (await store.flush("s", [{"role": "user", "content": "hi"}])).cursor == 1
        await store.close()
        async with host.connect() as conn:
            assert await conn.run_sync(_pragmas) == before
        await host.dispose()

    asyncio.run(main())
