"""An application's engine whose pool gives every checkout one connection (SQLite).

``StaticPool`` (an in-memory database in an application's tests) and
``SingletonThreadPool`` (SQLAlchemy's default for ``sqlite://``) hand the store
the connection the application holds: a store call made while the
application's transaction is open there is refused before anything runs, and
the application's work stays the application's to commit or roll back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import SingletonThreadPool, StaticPool

import hermes_orm
from hermes_orm import AsyncSessionStore, InvalidArgumentError, SessionStore, async_store
from tests.conftest import ctrl_c_at_each_c_return, in_threads

pytestmark = pytest.mark.sqlite

TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _engine(kind: str, tmp_path: Path) -> Engine:
    if kind == "static, in memory":
        return create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    if kind == "static, a file":
        return create_engine(f"sqlite:///{tmp_path / 'app.db'}", poolclass=StaticPool)
    engine = create_engine("sqlite://")  # SQLAlchemy's own choice for it
    assert isinstance(engine.pool, SingletonThreadPool)
    return engine


def _orders(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT note FROM orders ORDER BY id").scalars())


CALLS: dict[str, Callable[[SessionStore], Any]] = {
    "get_session": lambda store: store.get_session("s"),
    "get_messages": lambda store: store.get_messages("s"),
    "list_sessions": lambda store: store.list_sessions(),
    "flush": lambda store: store.flush("s", [*TURN, *TURN]),
    "append": lambda store: store.append("s", {"role": "user", "content": "more"}),
    "create_session": lambda store: store.create_session("t", source="app"),
    "upgrade": lambda store: store.upgrade(),
    "hermes_orm.upgrade": lambda store: hermes_orm.upgrade(store.engine),
    "hermes_orm.check_schema": lambda store: hermes_orm.check_schema(store.engine),
    "migrations.current": lambda store: hermes_orm.migrations.current(store.engine),
}


@pytest.mark.parametrize("watched", [False, True], ids=["plain", "with a listener"])
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("kind", ["static, in memory", "static, a file", "singleton thread"])
def test_a_call_inside_the_application_s_transaction_is_refused_and_ends_nothing(
    kind: str, call: str, watched: bool, tmp_path: Path
) -> None:
    """Whatever the application does with its transaction afterwards is what happens."""
    engine = _engine(kind, tmp_path)
    if watched:  # a tracing hook: the store's statements go through SQLAlchemy then
        event.listen(engine, "before_cursor_execute", lambda *_args: None)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, note TEXT)")
    store = SessionStore(engine)
    store.upgrade()
    store.create_session("s", source="app")
    store.flush("s", TURN)
    for end, kept in (("rollback", []), ("commit", ["kept"])):
        with engine.connect() as conn:
            conn.execute(text("INSERT INTO orders (note) VALUES ('kept')"))
            with pytest.raises(InvalidArgumentError, match="a transaction is open on it"):
                CALLS[call](store)
            getattr(conn, end)()
        assert _orders(engine) == kept
    # Nothing of the refused call was written; outside a transaction the call runs.
    assert store.get_messages("s") == TURN
    assert store.get_session("t") is None
    CALLS[call](store)
    store.close()
    engine.dispose()


def test_the_application_s_connection_keeps_its_settings_between_calls() -> None:
    """The store keeps no connection of such a pool: the one it gives back is as it was."""
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )

    def settings() -> list[Any]:
        with engine.connect() as conn:
            return [
                conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("busy_timeout", "foreign_keys", "synchronous")
            ]

    before = settings()
    store = SessionStore(engine)
    store.upgrade()
    store.create_session("s", source="app")
    store.flush("s", TURN)
    assert settings() == before
    assert store._parked == []
    store.close()
    engine.dispose()


def test_an_async_call_inside_the_application_s_transaction_is_refused() -> None:
    """aiosqlite in memory: SQLAlchemy's StaticPool, one connection for every task."""

    async def main() -> None:
        engine = create_async_engine("sqlite+aiosqlite://")
        assert isinstance(engine.sync_engine.pool, StaticPool)
        async with engine.begin() as conn:
            await conn.exec_driver_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, note TEXT)")
        store = AsyncSessionStore(engine)
        await store.upgrade()
        await store.create_session("s", source="app")
        async with engine.connect() as conn:
            await conn.execute(text("INSERT INTO orders (note) VALUES ('kept')"))
            with pytest.raises(InvalidArgumentError, match="a transaction is open on it"):
                await store.flush("s", TURN)
            await conn.rollback()
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("SELECT count(*) FROM orders")).scalar() == 0
        assert (await store.flush("s", TURN)).written == 2
        assert store._parked == []
        await store.close()
        await engine.dispose()

    asyncio.run(main())


def test_a_cancelled_call_on_an_in_memory_async_store_keeps_the_database() -> None:
    """SQLAlchemy invalidates (closes) a connection whose statement a cancellation
    interrupts: on StaticPool, the in-memory database itself. A call there ends once its
    transaction has, then raises the cancellation; the flush is done or not, whole."""
    history = [{"role": "user", "content": f"message {i} " + "x" * 200} for i in range(3000)]

    async def main() -> list[str]:
        engine = create_async_engine("sqlite+aiosqlite://")
        store = AsyncSessionStore(engine)
        await store.upgrade()
        outcomes = []
        for delay in (0.0, 0.001, 0.003, 0.01, 0.03, 0.1):
            await store.delete_session("s")
            await store.create_session("s", source="app")
            task = asyncio.ensure_future(store.flush("s", history))
            await asyncio.sleep(delay)
            task.cancel()
            try:
                await task
                outcomes.append("done")
            except asyncio.CancelledError:
                outcomes.append("cancelled")
            assert await store.get_messages("s") in ([], history)
        await store.close()
        await engine.dispose()
        return outcomes

    assert "cancelled" in asyncio.run(main())


@pytest.mark.parametrize("where", ["in memory", "a file"])
def test_concurrent_async_calls_on_one_shared_connection_take_turns(
    where: str, tmp_path: Path
) -> None:
    """Tasks of two stores on one StaticPool: each call has the connection to itself.

    Awaits come between a call's check that no transaction is open there and its
    BEGIN: without turns, two calls would share (and end) one transaction.
    """
    url = "sqlite+aiosqlite://" if where == "in memory" else f"sqlite+aiosqlite:///{tmp_path}/a.db"

    async def main() -> None:
        engine = create_async_engine(url, poolclass=StaticPool)
        stores = [AsyncSessionStore(engine), AsyncSessionStore(engine)]
        await stores[0].upgrade()
        sessions = [f"s{n}" for n in range(8)]
        for session_id in sessions:
            await stores[0].create_session(session_id, source="app")
        acknowledged: dict[str, list[dict[str, Any]]] = {}

        async def writer(n: int, session_id: str) -> None:
            history: list[dict[str, Any]] = []
            for i in range(15):
                history.append({"role": "user", "content": f"{session_id} {i}"})
                await stores[n % 2].flush(session_id, history)
                acknowledged[session_id] = list(history)
                await stores[1 - n % 2].get_messages(session_id)

        async def cancelled_reader() -> None:
            for _ in range(20):  # cancelled waiting its turn, or during its call
                task = asyncio.ensure_future(stores[1].list_sessions())
                await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        await asyncio.gather(*(writer(n, s) for n, s in enumerate(sessions)), cancelled_reader())
        for session_id in sessions:
            assert await stores[0].get_messages(session_id) == acknowledged[session_id]
            assert (await stores[1].get_session(session_id) or {})["flushed_idx"] == 15
        # Nothing of this event loop is kept once its calls ended (it would keep the loop).
        assert async_store._TURNS.get(engine.sync_engine.pool) == {}
        for store in stores:
            await store.close()
        await engine.dispose()

    # In a thread of its own: two calls sharing one transaction can hang the loop for good.
    failed: list[BaseException] = []
    runner = threading.Thread(target=_recorded(lambda: asyncio.run(main()), failed), daemon=True)
    runner.start()
    runner.join(180)
    assert not runner.is_alive(), "the tasks hung"
    if failed:
        raise failed[0]


IN_MEMORY = [
    "sqlite://",
    "sqlite:///:memory:",
    "sqlite:///file::memory:?uri=true",
    "sqlite:///file:x?vfs=memdb&uri=true",
]


def _flushed_in_threads(store: SessionStore, threads: int, turns: int) -> None:
    """Each of ``threads`` threads flushes a session of its own, ``turns`` times, at once;
    then each session holds its list."""
    written: dict[str, list[dict[str, Any]]] = {}
    failed: list[BaseException] = []

    def agent(n: int) -> None:
        session_id = f"s{n}"
        history: list[dict[str, Any]] = []
        try:
            store.create_session(session_id, source="app")
            for i in range(turns):
                history.append({"role": "user", "content": f"{session_id} {i}"})
                store.flush(session_id, history)
        except BaseException as exc:  # (raised below)
            failed.append(exc)
        written[session_id] = history

    in_threads(agent, threads)
    if failed:
        raise failed[0]
    for session_id, history in written.items():
        assert store.get_messages(session_id) == history


@pytest.mark.parametrize("url", IN_MEMORY)
def test_an_in_memory_store_made_from_a_url_is_one_database_for_every_thread(url: str) -> None:
    """Each connection to it would open a database of its own, empty: the store's engine
    keeps one connection, which the threads' calls take in turns."""
    store = SessionStore(url)
    store.upgrade()
    _flushed_in_threads(store, 4, 15)
    store.close()


@pytest.mark.parametrize("url", IN_MEMORY)
def test_an_in_memory_async_store_made_from_a_url_is_one_database(url: str) -> None:
    """Calls at once each went to a connection of their own, an empty database."""

    async def main() -> None:
        store = AsyncSessionStore(url.replace("sqlite://", "sqlite+aiosqlite://"))
        await store.upgrade()

        async def flushes(session_id: str) -> list[dict[str, Any]]:
            await store.create_session(session_id, source="app")
            history: list[dict[str, Any]] = []
            for i in range(10):
                history.append({"role": "user", "content": f"{session_id} {i}"})
                await store.flush(session_id, history)
            return history

        sessions = [f"s{n}" for n in range(4)]
        written = await asyncio.gather(*(flushes(s) for s in sessions))
        for session_id, history in zip(sessions, written, strict=True):
            assert await store.get_messages(session_id) == history
        await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("where", ["in memory", "a file"])
def test_threads_of_a_store_on_the_application_s_static_pool_take_turns(
    where: str, tmp_path: Path
) -> None:
    """The application's engine shares one connection with every thread: two threads'
    calls at once would use it together (and end each other's transaction)."""
    engine = create_engine(
        "sqlite://" if where == "in memory" else f"sqlite:///{tmp_path / 'app.db'}",
        poolclass=StaticPool,
        connect_args={"check_same_thread": False},
    )
    store = SessionStore(engine)
    store.upgrade()
    _flushed_in_threads(store, 4, 25)
    store.close()
    engine.dispose()


def test_async_stores_of_event_loops_in_two_threads_take_turns_at_one_connection() -> None:
    """Each thread runs an event loop of its own, with a store of its own, on one engine
    of one in-memory connection. SQLAlchemy's asyncio adapter waits for that connection
    on a lock of one loop: used by both at once, calls were refused, then one never
    returned, its transaction left open on the database."""
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    turns = 40

    async def prepare() -> None:
        store = AsyncSessionStore(engine)
        await store.upgrade()
        for n in range(2):
            await store.create_session(f"t{n}", source="app")

    asyncio.run(prepare())
    errors: list[BaseException] = []

    def agent(n: int) -> None:
        async def main() -> None:
            store = AsyncSessionStore(engine)
            history: list[dict[str, Any]] = []
            for i in range(turns):
                history.append({"role": "user", "content": f"t{n} {i}"})
                await store.flush(f"t{n}", history)

        try:
            asyncio.run(main())
        except BaseException as exc:  # (the test looks at it)
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(n,), daemon=True) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not [thread for thread in threads if thread.is_alive()], "a call never returned"
    assert errors == []

    async def read() -> list[list[str]]:
        store = AsyncSessionStore(engine)
        stored = [await store.get_messages(f"t{n}") for n in range(2)]
        await engine.dispose()
        return [[m["content"] for m in messages] for messages in stored]

    assert asyncio.run(read()) == [[f"t{n} {i}" for i in range(turns)] for n in range(2)]


def test_an_in_memory_url_keeps_a_pool_chosen_and_refuses_a_size_of_more_connections() -> None:
    """Each connection more would open a database of its own, empty: a queue pool's size
    is refused; a pool class given is the caller's choice."""
    from sqlalchemy.pool import SingletonThreadPool

    from hermes_orm import create_store_engine

    for url in ("sqlite://", "sqlite:///file::memory:?uri=true"):
        with pytest.raises(InvalidArgumentError, match="pool_size"):
            create_store_engine(url, pool_size=3)
    engine = create_store_engine("sqlite://", poolclass=SingletonThreadPool)
    assert isinstance(engine.pool, SingletonThreadPool)
    engine.dispose()


def _on_a_static_pool(tmp_path: Path) -> SessionStore:
    """A store on an application's engine of one connection (a file), with session s."""
    engine = create_engine(
        f"sqlite:///{tmp_path / 'app.db'}",
        poolclass=StaticPool,
        connect_args={"check_same_thread": False},
    )
    store = SessionStore(engine)
    store.upgrade()
    store.create_session("s", source="app")
    return store


def test_a_call_waiting_for_its_turn_past_the_bound_is_a_busy_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store call made from another thread inside a store call's work waits for a turn
    the first holds until the second returns: bounded, it is a DatabaseBusyError."""
    import concurrent.futures

    from hermes_orm import DatabaseBusyError
    from hermes_orm import store as store_module

    monkeypatch.setattr(store_module, "TURN_WAIT", 0.5)
    store = _on_a_static_pool(tmp_path)
    engine = store.engine
    with concurrent.futures.ThreadPoolExecutor(1) as other:

        def work(_conn: Any) -> BaseException | None:
            return other.submit(store.get_session, "s").exception(timeout=30)

        raised = store.read_transaction(work)
    assert isinstance(raised, DatabaseBusyError), raised
    assert "another thread's call held the engine's one connection" in str(raised)
    assert (store.get_session("s") or {})["id"] == "s"
    store.close()
    engine.dispose()


def test_an_async_call_waiting_for_another_thread_s_turn_past_the_bound_is_a_busy_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another thread holds the turn at the engine's one connection (a blocking store's
    call in its transaction): an event loop's call waits for it as long, then says so."""
    from hermes_orm import DatabaseBusyError
    from hermes_orm import store as store_module

    monkeypatch.setattr(store_module, "TURN_WAIT", 0.5)
    engine, store, turn = _an_in_memory_async_store()
    with turn:  # held by this thread; the store's call runs in another's loop
        raised = _in_another_loop(store.get_session("s"))
    assert isinstance(raised, DatabaseBusyError), raised
    assert "another thread's call held the engine's one connection" in str(raised)
    assert _in_another_loop(store.get_session("s")) is None  # (its turn now)
    asyncio.run(engine.dispose())


def test_an_async_call_cancelled_as_it_waits_for_another_thread_s_turn_takes_none() -> None:
    """Cancelled while another thread holds the turn: it ends there, and the turn, once
    given back, is every thread's again."""
    engine, store, turn = _an_in_memory_async_store()
    with turn:
        raised = _in_another_loop(asyncio.wait_for(store.get_session("s"), 0.2))
    assert isinstance(raised, TimeoutError), raised
    assert _in_another_loop(asyncio.wait_for(store.get_session("s"), 0.2)) is None
    assert turn.acquire(blocking=False)  # nobody kept it
    turn.release()
    asyncio.run(engine.dispose())


def _an_in_memory_async_store() -> tuple[Any, AsyncSessionStore, Any]:
    """An engine of one in-memory connection, a store holding session "s", and the turn."""
    from hermes_orm import _sa

    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    store = AsyncSessionStore(engine)

    async def prepare() -> None:
        await store.upgrade()
        await store.create_session("s", source="app")

    asyncio.run(prepare())
    turn = _sa.thread_turn(engine.sync_engine.pool)
    assert turn is not None
    return engine, store, turn


def _in_another_loop(call: Coroutine[Any, Any, Any]) -> BaseException | None:
    """What ``call`` raised, run to its end in an event loop of another thread."""
    raised: list[BaseException | None] = [None]

    def run() -> None:
        try:
            asyncio.run(call)
        except BaseException as exc:  # (the test looks at it)
            raised[0] = exc

    other = threading.Thread(target=run)
    other.start()
    other.join(30)
    assert not other.is_alive()
    return raised[0]


def test_a_ctrl_c_as_a_call_takes_its_turn_leaves_the_turn_to_the_others(tmp_path: Path) -> None:
    """At whichever C call of taking or giving back the turn a Ctrl-C comes (where
    Python runs signal handlers), another thread's call gets the connection at once:
    a turn kept would have every other thread wait minutes, then fail."""
    from hermes_orm import store as store_module

    store = _on_a_static_pool(tmp_path)
    turn = store_module._turn.__wrapped__.__code__
    points = 0
    for point, _ in ctrl_c_at_each_c_return(lambda: store.get_session("s"), within=turn):
        points += 1
        other = threading.Thread(target=store.get_session, args=("s",), daemon=True)
        other.start()
        other.join(timeout=10)
        assert not other.is_alive(), f"the turn was kept (point {point})"
    assert points >= 2
    store.close()
    store.engine.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.parametrize("call", ["connection", "upgrade"])
def test_a_forked_child_waits_for_no_turn_its_parent_s_thread_held(call: str) -> None:
    """A thread of the parent was inside a call at the fork: the child's lock was held
    for good, by a thread the child does not have."""
    import signal

    store = SessionStore("sqlite://")
    store.upgrade()
    inside, leave = threading.Event(), threading.Event()

    def hold(_conn: Any) -> None:
        inside.set()
        leave.wait(30)

    holder = threading.Thread(target=store.write_transaction, args=(hold,))
    holder.start()
    assert inside.wait(30)
    try:
        pid = os.fork()
        if pid == 0:  # the child: a hang is ended by the alarm, and fails the test
            signal.alarm(20)
            done = 3
            try:
                if call == "connection":
                    with store.connection() as conn:
                        conn.exec_driver_sql("SELECT 1")
                else:
                    store.upgrade()
                done = 0
            finally:
                os._exit(done)
        _, status = os.waitpid(pid, 0)
    finally:
        leave.set()
        holder.join()
        store.close()
    assert os.waitstatus_to_exitcode(status) == 0, status


def test_a_thread_s_own_empty_database_in_memory_is_told_with_what_to_do() -> None:
    """SQLAlchemy's default pool for ``sqlite://`` opens a database per thread: the one
    migrated is another thread's."""
    engine = create_engine("sqlite://")
    store = SessionStore(engine)
    store.upgrade()
    store.create_session("s", source="app")

    told: list[BaseException] = []

    def other_thread(_: int) -> None:
        try:
            store.get_session("s")
        except hermes_orm.SchemaOutOfDateError as exc:
            told.append(exc)

    in_threads(other_thread, 1)
    assert len(told) == 1
    assert "poolclass=StaticPool" in str(told[0]), told
    assert (store.get_session("s") or {})["id"] == "s"
    store.close()
    engine.dispose()


def _recorded(call: Callable[[], Any], failed: list[BaseException]) -> Callable[[], None]:
    def run() -> None:
        try:
            call()
        except BaseException as exc:
            failed.append(exc)

    return run


def test_a_cancelled_upgrade_of_an_in_memory_async_store_keeps_the_database() -> None:
    """The application's own table stays, and the schema ends migrated, cancelled or not."""

    async def main() -> None:
        for delay in (0.0, 0.005, 0.02):
            engine = create_async_engine("sqlite+aiosqlite://")
            async with engine.begin() as conn:
                await conn.exec_driver_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
                await conn.exec_driver_sql("INSERT INTO orders DEFAULT VALUES")
            store = AsyncSessionStore(engine)
            task = asyncio.ensure_future(store.upgrade())
            await asyncio.sleep(delay)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            async with engine.connect() as conn:
                assert (await conn.exec_driver_sql("SELECT count(*) FROM orders")).scalar() == 1
            await store.create_session("s", source="app")  # at head: the upgrade ran whole
            await store.close()
            await engine.dispose()

    asyncio.run(main())


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_pool_of_one_connection_at_a_time_gets_it_back_after_each_call(
    tmp_path: Path, api: str
) -> None:
    """``AssertionPool`` has one connection to give: a store keeping it idle between
    calls would leave the application none (its checkout fails at once)."""
    from sqlalchemy.pool import AssertionPool

    path = tmp_path / "app.db"
    hermes_orm.upgrade(f"sqlite:///{path}")
    if api == "sync":
        engine = create_engine(f"sqlite:///{path}", poolclass=AssertionPool)
        store = SessionStore(engine)
        store.create_session("s", source="cli")
        store.flush("s", TURN)
        with engine.connect() as conn:  # the application's turn
            assert conn.execute(text("SELECT count(*) FROM hermes_messages")).scalar() == 2
        store.close()
        engine.dispose()
        return

    async def main() -> int:
        async_engine = create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=AssertionPool)
        store = AsyncSessionStore(async_engine)
        await store.create_session("s", source="cli")
        await store.flush("s", TURN)
        try:
            async with async_engine.connect() as conn:
                return int(
                    (await conn.execute(text("SELECT count(*) FROM hermes_messages"))).scalar_one()
                )
        finally:
            await store.close()
            await async_engine.dispose()

    assert asyncio.run(main()) == 2
