"""AsyncSessionStore: the SessionStore API as coroutines, with the same guarantees.

Both stores run the very same steps (:class:`hermes_orm.store.StoreCore`): what
an operation reads, checks, encodes and writes is decided once. This store only
runs each transaction differently: on a connection of an
:class:`~sqlalchemy.ext.asyncio.AsyncEngine`, through
``AsyncConnection.run_sync``, which runs the transaction's (synchronous) work
while every driver call awaits on the event loop. So the statements, the
events a tracer or failure injector attaches to ``engine.sync_engine``, the
retries and the errors are those of :class:`~hermes_orm.store.SessionStore`.

A task cancelled mid-operation leaves the database as it was before it, or as
the whole transaction left it: the cursor moves in the transaction that wrote
the messages, so flushing the same list again finishes the job exactly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import Pool

from hermes_orm import _dialects, _retry, _sa, migrations
from hermes_orm import search as _search
from hermes_orm import store as _store
from hermes_orm._retry import Retries, RetryPolicy
from hermes_orm.errors import (
    DatabaseError,
    InvalidArgumentError,
)
from hermes_orm.search import SearchPage
from hermes_orm.store import (
    Done,
    FlushResult,
    Run,
    SessionPage,
    Steps,
    StoreCore,
    Verify,
    attempt,
    check_bind,
    check_options,
    check_replica,
    check_schema,
    configure_engines,
    give_back_when_full,
    resume,
    turn_busy,
)

T = TypeVar("T")

logger = logging.getLogger("hermes_orm")


class _AsyncSessions(StoreCore):
    """The asyncio API on sessions and messages, of a store and of its user-scoped views."""

    async def _transaction(self, request: Run[T]) -> T:
        raise NotImplementedError

    async def _drive(self, steps: Steps[T]) -> T:
        """Run ``steps`` to their end, each transaction awaited (see :func:`store.drive`)."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                request = resume(steps, value, error)
            except Done as done:
                return done.value  # type: ignore[no-any-return]
            try:
                value, error = await self._transaction(request), None
            except Exception as exc:  # handed to the steps, which decide
                value, error = None, exc

    # -- the API (see SessionStore for each) -------------------------------------------

    async def create_session(self, session_id: str, source: str, **fields: Any) -> dict[str, Any]:
        """Create a session; see :meth:`SessionStore.create_session`."""
        return await self._drive(self._create_session(session_id, source, fields))

    async def ensure_session(self, session_id: str, source: str = "unknown", **fields: Any) -> bool:
        """Create the session unless it exists; see :meth:`SessionStore.ensure_session`."""
        return await self._drive(self._ensure_session(session_id, source, fields))

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        """The session as a dict of its columns, or None; see :meth:`SessionStore.get_session`."""
        return await self._drive(self._get_session(session_id))

    async def end_session(self, session_id: str, reason: str) -> None:
        """Mark the session ended now; see :meth:`SessionStore.end_session`."""
        await self._drive(self._end_session(session_id, reason))

    async def delete_session(self, session_id: str) -> bool:
        """Delete a session and its messages; see :meth:`SessionStore.delete_session`."""
        return await self._drive(self._delete_session(session_id)) == 1

    async def list_sessions(
        self,
        *,
        source: str | None = None,
        user_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> SessionPage:
        """Sessions newest first, one page at a time; see :meth:`SessionStore.list_sessions`."""
        return await self._drive(self._list_sessions(source, user_id, limit, cursor))

    async def flush(
        self,
        session_id: str,
        messages: Sequence[dict[str, Any]],
        *,
        verify: Verify = "all",
    ) -> FlushResult:
        """Write exactly ``messages[flushed_idx:]``; see :meth:`SessionStore.flush`."""
        return await self._drive(self._flush(session_id, messages, verify))

    async def append(self, session_id: str, message: dict[str, Any]) -> int:
        """Store one message at the session's cursor; see :meth:`SessionStore.append`."""
        return (await self._drive(self._append(session_id, message)))[0]

    async def get_messages(
        self, session_id: str, *, offset: int = 0, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Messages of a session in ``idx`` order; see :meth:`SessionStore.get_messages`."""
        return await self._drive(self._get_messages(session_id, offset, limit))

    async def search(
        self,
        query: str,
        *,
        session_id: str | None = None,
        source: str | Sequence[str] | None = None,
        user_id: str | None = None,
        role: str | Sequence[str] | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> SearchPage:
        """Messages matching ``query``, newest first; see :meth:`SessionStore.search`."""
        steps = self._search(
            query,
            session_id=session_id,
            source=source,
            user_id=user_id,
            role=role,
            limit=limit,
            cursor=cursor,
        )
        return await self._drive(steps)


#: Seconds a cancelled write waits for the server process of its dropped connection
#: to end, where the retry policy sets no try deadline; between looks.
_BACKEND_WAIT = 60.0
_BACKEND_POLL = 0.002


def _of_another_loop(exc: RuntimeError) -> bool:
    """Whether asyncio raised ``exc`` for a pool queue or a lock bound to another loop."""
    return "different event loop" in str(exc) or "different loop" in str(exc)


def _in_use_elsewhere() -> InvalidArgumentError:
    """The error of a call made while another event loop's calls on the store are under way."""
    return InvalidArgumentError(
        "this AsyncSessionStore is in use by another event loop at the same time: "
        "a store serves one event loop at a time (give each thread running a loop "
        "its own store)"
    )


def _other_loop(why: str) -> InvalidArgumentError:
    """The error of an application's engine used from another event loop, and ``why``."""
    return InvalidArgumentError(
        f"this AsyncSessionStore's engine was used from another event loop, and {why}: "
        "give each event loop its own engine (or store), or dispose of the engine first"
    )


def _of_replaced_pool(conn: AsyncConnection) -> bool:
    """:func:`_sa.of_replaced_pool` of an asyncio connection."""
    return _sa.of_replaced_pool(conn.sync_connection)  # type: ignore[arg-type]


async def _closed(conn: AsyncConnection, driver: Any) -> None:
    """Close ``conn``; on aiosqlite, then wait until its thread ran all it was given.

    ``driver``: ``conn``'s aiosqlite connection, taken before its work (one
    SQLAlchemy dropped no longer leads to it). A statement a cancellation
    interrupted runs on to its end there, and so does the rollback of a
    connection SQLAlchemy drops (see :func:`hermes_orm._sa.roll_back_invalidated`),
    which a second cancellation leaves unawaited: until then, the thread may
    hold the database's lock (a migration's write lock, a read's on a file not
    in WAL mode).
    """
    try:
        await conn.close()
    finally:
        if driver is not None:
            await _sa.aiosqlite_drained(driver)


def _left_in_transaction(conn: AsyncConnection) -> bool:
    """Whether ``conn``'s driver holds a transaction its adapter does not know of."""
    try:
        dbapi_connection = conn.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]
    except Exception:  # closed or invalidated meanwhile: nothing to keep
        return False
    return dbapi_connection is not None and _sa.asyncpg_transaction_left(dbapi_connection)


class AsyncSessionStore(_AsyncSessions):
    """Sessions and their messages in one database, written exactly once, from asyncio.

    Args:
        bind: A database URL or an :class:`~sqlalchemy.ext.asyncio.AsyncEngine`.
            ``sqlite:///path.db`` runs on aiosqlite, ``postgresql://...`` on
            psycopg 3's async connections, ``postgresql+asyncpg://...`` on asyncpg.
        retry: Bound on retries of transient errors.
        sqlite_synchronous: SQLite ``synchronous`` level (see :class:`SessionStore`).
        lock_timeout: Seconds one attempt waits for a lock (see :class:`SessionStore`).
        check_schema: Refuse a database whose schema is not at the shipped head.
        pgbouncer: Reached through PgBouncer in transaction mode (see :class:`SessionStore`;
            asyncpg engines, built or passed in, cache and name no statements).
        schema: The PostgreSQL schema of the tables (see :class:`SessionStore`).
        replica: A PostgreSQL standby (a URL or an AsyncEngine) serving
            ``list_sessions``, ``get_messages`` and ``search`` (see :class:`SessionStore`).

    Each operation takes a connection from the engine's pool and gives it back
    when its transaction ends; on aiosqlite the store keeps the last one, idle,
    for its next operation (as :class:`~hermes_orm.store.SessionStore` does),
    and :meth:`close` gives it back.

    Raises:
        UnsupportedBackendError: The backend is neither SQLite nor PostgreSQL.
    """

    def __init__(
        self,
        bind: str | URL | AsyncEngine,
        *,
        retry: RetryPolicy | None = None,
        sqlite_synchronous: str = "FULL",
        lock_timeout: float = _dialects.LOCK_TIMEOUT,
        check_schema: bool = True,
        pgbouncer: bool = False,
        schema: str | None = None,
        replica: str | URL | AsyncEngine | None = None,
    ) -> None:
        check_bind(bind, AsyncEngine)
        check_options(retry, check_schema)
        settings = _dialects.engine_settings(sqlite_synchronous, lock_timeout, pgbouncer)
        if replica is not None:
            check_replica(bind, replica, AsyncEngine)
        self._owns_engine = not isinstance(bind, AsyncEngine)
        if isinstance(bind, AsyncEngine):
            _dialects.check_transactional(bind.sync_engine)
            schema = _dialects.store_schema(bind.sync_engine, schema)
            engine = bind
        else:
            engine = _dialects.create_async_store_engine(bind, schema=schema, **settings)
            schema = _dialects.store_schema(engine.sync_engine)
        self._owns_replica = replica is not None and not isinstance(replica, AsyncEngine)
        # The replica made (and checked) before an application's engines are configured.
        if isinstance(replica, str | URL):
            built = _dialects.replica_settings(engine.sync_engine, settings, replica)
            replica = _dialects.create_async_store_engine(replica, schema=schema, **built)
        configure_engines(
            engine.sync_engine,
            None if replica is None else replica.sync_engine,
            settings,
            schema=schema,
            made=(self._owns_engine, self._owns_replica),
        )
        super().__init__(engine.sync_engine, retry=retry, check_schema=check_schema, schema=schema)
        self._async_engine = engine
        self._async_replica = replica
        self._read_from(None if replica is None else replica.sync_engine)
        self._parked: list[AsyncConnection] = []
        #: This store's calls waiting for a connection from the pool (see _checkin).
        self._awaiting = 0
        #: Bumped by close(): a connection taken before it is given back, never kept.
        self._closes = 0
        #: SQLite: the settings each connection the store takes gets for its work.
        self._sqlite = (
            _dialects.sqlite_settings(sqlite_synchronous, lock_timeout)
            if engine.dialect.name == "sqlite"
            else None
        )
        #: Its pool gives every checkout one connection (an in-memory database's).
        self._one_connection = _sa.shares_one_connection(engine.sync_engine.pool)
        self._parks = engine.dialect.driver == "aiosqlite" and _sa.may_keep_one(
            engine.sync_engine.pool
        )
        #: Work of its own on the pool, held till done (close() waits for it): releases the
        #: pool's checkout listener started (see _give_back), connections made to wake a
        #: call waiting in the pool (see _wake_a_waiter).
        self._releasing: set[asyncio.Task[None]] = set()
        #: The event loop each engine's pool serves, by id: asyncpg's (whose connections
        #: belong to it), and those the store gave a new pool (see _new_pool).
        self._loops: dict[int, asyncio.AbstractEventLoop] = {}
        #: The event loop whose calls are under way, and how many (see _transaction).
        self._busy_loop: asyncio.AbstractEventLoop | None = None
        self._busy_calls = 0
        self._busy_lock = threading.Lock()
        if self._parks:
            give_back_when_full(self, engine.sync_engine)

    @property
    def engine(self) -> AsyncEngine:
        """The asyncio engine this store runs on (its ``sync_engine`` carries the events)."""
        return self._async_engine

    def __repr__(self) -> str:
        url = _dialects.safe_url(self._async_engine.url)
        return f"AsyncSessionStore({url!r})"

    async def __aenter__(self) -> AsyncSessionStore:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Give back the idle connection; dispose of the engine if the store made it."""
        self._closes += 1
        # Each to its end, however often the task is cancelled meanwhile (raised after):
        # a pool's reset or close interrupted is logged as an error, its connection lost.
        await self._to_the_end(self._unpark())
        if self._releasing:
            # Shielded: a cancelled close() leaves them to end (their calls wait for them).
            await asyncio.shield(asyncio.gather(*self._releasing, return_exceptions=True))
        if self._owns_engine:
            await self._to_the_end(self._dispose(self._async_engine))
        if self._owns_replica and self._async_replica is not None:
            await self._to_the_end(self._dispose(self._async_replica))

    async def _dispose(self, engine: AsyncEngine) -> None:
        """Dispose of an engine the store made; from another event loop, asyncpg's unclosed.

        asyncpg's connections belong to the loop that opened them (see
        :meth:`_on_this_loop`): closed from another, they fail, and the pool
        logs each as an error. They are dropped instead, as a new loop drops them.
        """
        seen = self._loops.get(id(engine))
        here = seen is None or seen is asyncio.get_running_loop()
        await engine.dispose(close=here or engine.dialect.driver != "asyncpg")

    def for_user(self, user_id: str) -> AsyncUserStore:
        """This store, seeing only the sessions of ``user_id``; see :class:`AsyncUserStore`.

        Raises:
            InvalidSessionError: ``user_id`` is not a non-empty str.
        """
        return AsyncUserStore(self, user_id)

    # -- schema ------------------------------------------------------------------

    async def upgrade(self, revision: str = "head") -> None:
        """Run the shipped migrations up to ``revision``; see :meth:`SessionStore.upgrade`."""

        async def once() -> None:
            await self._unpark()  # the pool's connection (of one, it may be the only one)
            conn = await self._connect()
            driver = _sa.aiosqlite_connection(conn.sync_connection)  # type: ignore[arg-type]
            try:
                # No transaction begun here: upgrade() begins its own with the
                # migration lock (SQLite's BEGIN IMMEDIATE) and commits it.
                await conn.run_sync(migrations.upgrade, revision, schema=self._schema)
            finally:
                await self._to_the_end(_closed(conn, driver))

        await self._whole(self._retrying(self._async_engine, self._retry, once))
        self._schema_checked = False

    async def _ensure_schema(self) -> None:
        if not self._schema_checked:
            conn = await self._connect()
            driver = _sa.aiosqlite_connection(conn.sync_connection)  # type: ignore[arg-type]
            try:
                await conn.run_sync(check_schema, self._schema, self._retry.attempt_timeout)
            finally:
                await self._to_the_end(_closed(conn, driver))
            self._schema_checked = True

    # -- transactions --------------------------------------------------------------

    async def _transaction(self, request: Run[T]) -> T:
        """Run one transaction on a pooled connection, retried whole on transient errors.

        Raises:
            InvalidArgumentError: Another event loop uses the store at the same time
                (a pool, a lock, waits on one loop: see :meth:`_new_pool`).
        """
        loop = asyncio.get_running_loop()
        # Refused up front while another loop's calls are under way: the two would
        # share the pool's queue, whose waits belong to one loop. Woken from the
        # other loop's thread, a wait can miss its wake-up: that call never returned.
        with self._busy_lock:
            if self._busy_calls and self._busy_loop is not loop:
                raise _in_use_elsewhere()
            self._busy_loop = loop
            self._busy_calls += 1
        try:
            return await self._transaction_on_this_loop(request)
        except RuntimeError as exc:
            if not _of_another_loop(exc):
                raise
            raise _in_use_elsewhere() from exc
        finally:
            with self._busy_lock:
                self._busy_calls -= 1

    async def _transaction_on_this_loop(self, request: Run[T]) -> T:
        begin = self._sql.begin
        timeout = self._retry.attempt_timeout
        replica = self._async_replica
        if replica is not None and self._on_replica(request):
            read = self._replica_request(request)

            async def on_replica() -> T:
                conn = await self._connect(replica)
                try:
                    return await conn.run_sync(attempt, read, (), self._replica_settings, timeout)
                finally:
                    await self._to_the_end(conn.close())

            try:
                return await self._retrying(
                    replica, self._replica_retry, on_replica, name_holders=False
                )
            except self._REPLICA_MISSES as exc:
                self._replica_missed(exc)
            except DatabaseError as exc:
                if not self._replica_schema_moved(exc):
                    raise

        async def once() -> T:
            await self._ensure_schema()  # its connection's failures are retried too
            closes = self._closes
            conn = await self._checkout()
            # Taken now: a connection SQLAlchemy invalidates no longer leads to it.
            driver = _sa.aiosqlite_connection(conn.sync_connection)  # type: ignore[arg-type]
            backend = _dialects.backend(conn.sync_connection)  # type: ignore[arg-type]
            try:
                result = await conn.run_sync(attempt, request, begin, self._settings, timeout)
            except BaseException as exc:
                # Back to the pool, whose reset rolls back whatever a
                # cancellation interrupted; dropped if it was invalidated.
                # A cancelled write's server process is waited for (it may commit
                # still); a read's outcome is nobody's concern.
                cancelled = isinstance(exc, asyncio.CancelledError) and request.write
                release = self._release(
                    conn,
                    failed=True,
                    driver=driver,
                    backend=backend if cancelled else None,
                )
                await self._to_the_end(release)
                raise
            await self._checkin(conn, closes)
            return result

        async def on_primary() -> T:
            try:
                return await self._retrying(self._async_engine, self._retry, once)
            except DatabaseError as exc:
                if not self._schema_moved(exc):
                    raise
                await self._retrying(self._async_engine, self._retry, self._ensure_schema)
                raise

        return await self._whole(on_primary())

    async def _whole(self, work: Coroutine[Any, Any, T]) -> T:
        """``work`` (a call's transactions), run to its end on a pool sharing one connection.

        That connection is the database (in memory): SQLAlchemy invalidates, and
        so closes, a connection whose statement a cancellation interrupts. The
        calls of every store on that pool take turns: awaits come between a
        call's check that no transaction is open on it and its ``BEGIN``, and
        two calls inside one transaction would end each other's.
        """
        if not self._one_connection:
            return await work
        try:
            async with _turn(self._engine.pool):
                return await self._uninterrupted(work)
        finally:
            work.close()  # never started if the task was cancelled while waiting its turn

    @staticmethod
    async def _uninterrupted(work: Coroutine[Any, Any, T]) -> T:
        """``work`` awaited to its end however often the task is cancelled meanwhile.

        The first cancellation is raised once it ended, as it came (an anyio
        cancel scope knows its own by it); its result is then dropped.
        """
        task = asyncio.ensure_future(work)
        cancel: asyncio.CancelledError | None = None
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as exc:
                if task.cancelled():
                    raise
                cancel = cancel or exc
            except BaseException:  # the work's own error, raised below
                pass
        if cancel is not None:
            raise cancel
        return task.result()

    async def _retrying(
        self,
        engine: AsyncEngine,
        policy: RetryPolicy,
        once: Callable[[], Awaitable[T]],
        *,
        name_holders: bool = True,
    ) -> T:
        """Await ``once`` (one whole transaction) again on transient errors, within ``policy``.

        ``name_holders`` as for :func:`hermes_orm._retry.run_with_retry`.
        """
        retries = Retries(policy)
        while True:
            retries.begin()
            try:
                return await once()
            except DBAPIError as exc:
                delay = retries.after(exc)
                if delay is None:
                    holders = await self._busy_holders(exc, engine) if name_holders else []
                    raise retries.give_up(engine.sync_engine, exc, holders, self._schema) from exc
                retries.log(exc, delay)
                await asyncio.sleep(delay)

    async def _connect(self, engine: AsyncEngine | None = None) -> AsyncConnection:
        """A connection from ``engine``'s pool (the store's by default).

        asyncpg raises a refused connection or its connect timeout as it is
        (an OSError), not as a driver error: that is raised as a lost connection.
        """
        engine = engine or self._async_engine
        await self._on_this_loop(engine)
        pool = engine.sync_engine.pool  # (a dispose meanwhile replaces it; its waiters stay)
        _dialects.refuse_shared_transaction(pool)
        try:
            with _retry.connecting(self._retry.attempt_timeout):
                try:
                    conn = await engine.connect()
                except RuntimeError as exc:
                    if not _of_another_loop(exc):
                        raise
                    if not self._owns(engine):
                        why = "its pool waits on the event loop it first waited on"
                        raise _other_loop(why) from exc
                    await self._new_pool(engine)
                    pool = engine.sync_engine.pool
                    conn = await engine.connect()
        except asyncio.CancelledError:
            self._wake_a_waiter(pool)
            raise
        except PoolTimeoutError as exc:
            raise _dialects.pool_exhausted(exc) from exc
        except OSError as exc:
            if _dialects.refused_for_good(exc):  # (asyncpg: a server without the TLS asked for)
                raise DatabaseError(
                    f"{_dialects.safe_url(engine.url)}: the server refused the connection: {exc}"
                ) from exc
            reason = "connection timeout expired" if isinstance(exc, TimeoutError) else str(exc)
            raise OperationalError(
                "connect", None, ConnectionError(reason), connection_invalidated=True
            ) from exc
        except (TypeError, ValueError, OverflowError) as exc:
            # asyncpg checks its arguments as it connects (a parameter it does not
            # take, a port past 65535): as libpq's refusal of an option, not retried.
            if engine.dialect.driver != "asyncpg" or isinstance(exc, InvalidArgumentError):
                raise
            raise DatabaseError(
                f"{_dialects.safe_url(engine.url)}: asyncpg cannot connect with what the "
                f"URL or connect_args give it: {exc}"
            ) from exc
        if conn.dialect.name == "postgresql":
            try:
                _dialects.check_driver_transactional(conn.sync_connection)  # type: ignore[arg-type]
            except InvalidArgumentError:
                await self._to_the_end(conn.close())
                raise
        return conn

    def _wake_a_waiter(self, pool: Pool) -> None:
        """Make a connection of ``pool`` and give it back, for a call it leaves waiting.

        A connection cancelled as it is made frees its place in the pool without
        waking a task waiting in the pool's queue (only a connection given back
        does): that task would wait out the pool's timeout beside a free place.
        ``pool`` is the one the cancelled connection was of, which an engine's
        ``dispose()`` meanwhile has replaced but not emptied of its waiters. The
        connection is made as a task of its own, which :meth:`close` waits for
        (at most the connect timeout).
        """
        task = asyncio.get_running_loop().create_task(self._made_and_given_back(pool))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _made_and_given_back(self, pool: Pool) -> None:
        # Checked as the task starts: the pool's checkout then takes the free place
        # (or finds none) before anything is awaited, so this never waits in its queue.
        if not (_sa.pool_has_room(pool) and _sa.pool_has_waiters(pool)):
            return
        try:
            with _retry.connecting(self._retry.attempt_timeout):
                await _sa.round_trip(pool)
        except Exception as exc:  # (the waiting call fails or waits as it would have)
            logger.debug("hermes_orm: a connection to wake a waiting call failed: %r", exc)

    async def _on_this_loop(self, engine: AsyncEngine) -> None:
        """Make sure ``engine``'s pooled asyncpg connections serve the running event loop.

        asyncpg's belong to the loop that opened them: used from another (each
        ``asyncio.run`` makes its own), they fail with a bare RuntimeError, then
        "another operation is in progress". An engine the store made drops them
        (without closing them: their loop may be gone) and opens new ones; an
        application's engine is the application's to dispose of, and is refused.
        (aiosqlite's and psycopg's serve any loop; their pool's own wait on
        another loop is seen where it fails, in :meth:`_connect`.)
        """
        if engine.dialect.driver != "asyncpg":
            return
        loop = asyncio.get_running_loop()
        seen = self._loops.setdefault(id(engine), loop)
        if seen is loop:
            return
        if not self._owns(engine):
            raise _other_loop("asyncpg's connections belong to the loop that opened them")
        self._loops[id(engine)] = loop  # (before awaiting: another task does not dispose too)
        await engine.dispose(close=False)

    def _owns(self, engine: AsyncEngine) -> bool:
        """Whether the store made ``engine`` (its own, or its replica's)."""
        if engine is self._async_engine:
            return self._owns_engine
        return engine is self._async_replica and self._owns_replica

    async def _new_pool(self, engine: AsyncEngine) -> None:
        """Give ``engine``, which the store made, a new pool for the running event loop.

        Its pool's queue waits on the loop it first waited on (from another, a
        wait fails with a bare RuntimeError). The connections of the old pool,
        which serve any loop (aiosqlite's, psycopg's), are closed; one in use
        now is closed as it comes back (see :meth:`_release`).
        """
        loop = asyncio.get_running_loop()
        if self._loops.get(id(engine)) is loop:
            return  # another task of this loop gave it one already
        self._loops[id(engine)] = loop
        if engine is self._async_engine:
            await self._unpark()
        await engine.dispose()

    async def _unpark(self) -> None:
        """Give the idle connection the store kept back to the pool."""
        parked, self._parked = self._parked, []
        for conn in parked:
            await self._release(conn)

    async def _to_the_end(self, cleanup: Coroutine[Any, Any, None]) -> None:
        """Await ``cleanup`` of a connection to its end, however often the task is cancelled.

        A try interrupted by a cancellation leaves the driver finishing what it
        was given (aiosqlite runs it on its own thread: a flush waiting for the
        write lock commits when it gets it). The connection's cleanup comes
        after that work; until it ends, the call does not return (its caller
        raises the cancellation then), so a cancelled flush is done or not by
        the time its caller goes on: never afterwards, behind a later call of
        the same session (a delete, and a new session of that id). :meth:`close`
        waits for it too.
        """
        failing = sys.exc_info()[1]  # what the caller's except or finally is handling
        task = asyncio.ensure_future(cleanup)
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        # The first cancellation is the one raised afterwards, as it came: an anyio
        # cancel scope (which cancels again at every await) knows its own by it.
        cancel: asyncio.CancelledError | None = None
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as exc:
                if not task.cancelled():  # the caller's, not the cleanup's
                    cancel = cancel or exc
            except BaseException:  # the cleanup's own error, read below
                pass
        error: BaseException | None = (
            asyncio.CancelledError() if task.cancelled() else task.exception()
        )
        if cancel is not None:
            if error is not None:
                raise cancel from error
            raise cancel
        if error is not None:
            if failing is None:
                raise error
            # The caller's error goes on (a cleanup's must not turn a cancelled or
            # failed try into one retried); this one is only told.
            logger.debug("hermes_orm: cleaning a connection up failed too: %r", error)

    def _give_back(self) -> None:
        """The pool ran out: give the kept connection back as the event loop goes on.

        Called by the engine's pool ``checkout`` listener (on the loop's thread),
        which may not await: the release runs as a task of its own, which
        :meth:`close` waits for.
        """
        if not self._parked:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a checkout outside the loop (the sync engine used alone)
            return
        parked, self._parked = self._parked, []
        for conn in parked:
            task = loop.create_task(self._release(conn))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def _checkout(self) -> AsyncConnection:
        """The idle connection the store kept, else one from the pool."""
        if self._parked:
            kept = self._parked.pop()
            if not kept.invalidated and not _of_replaced_pool(kept):
                _sa.log_as_the_engine(kept.sync_connection)  # type: ignore[arg-type]
                return kept
            await self._to_the_end(self._release(kept))
        self._awaiting += 1
        try:
            conn = await self._connect()
        finally:
            self._awaiting -= 1
        if self._sqlite is not None:
            driver = _sa.aiosqlite_connection(conn.sync_connection)  # type: ignore[arg-type]
            try:
                await conn.run_sync(_dialects.take_sqlite, self._sqlite)
            except BaseException:
                await self._to_the_end(_closed(conn, driver))
                raise
        return conn

    async def _release(
        self,
        conn: AsyncConnection,
        *,
        failed: bool = False,
        driver: Any = None,
        backend: _dialects.Backend | None = None,
    ) -> None:
        """Give ``conn`` back to the pool with the settings it came with.

        One of a pool its engine no longer has (disposed of meanwhile, by
        :meth:`close` or by the application) is closed: that pool would keep it
        open, unused, until the garbage collector came by.

        After a ``failed`` try, a connection whose driver still holds a
        transaction nothing can end (asyncpg's, begun as the task was
        cancelled) is dropped instead. ``driver``: ``conn``'s aiosqlite
        connection, taken before the try; one SQLAlchemy dropped meanwhile (a
        cancellation interrupting the try's rollback), or that SQLAlchemy took for
        rolled back, still runs on its thread what it was given, a COMMIT perhaps:
        that work is waited for. ``backend``: the server process behind ``conn``
        (PostgreSQL), taken before a try a cancellation ended. psycopg cancels
        the statement on the server and waits for its end, but cancelled again
        meanwhile it drops the connection instead; asyncpg leaves the end to its
        next call. Either way the server may still run the statement, a flush's
        one statement to its commit. Unless the driver knows it ended, the
        connection is dropped and the end of its server process waited for
        (the process ends once it has run all it received).
        """
        unsettled = backend is not None and not backend.settled()
        if unsettled:  # (the deadline counts the driver's own close of the connection too)
            limit = self._retry.attempt_timeout or _BACKEND_WAIT
            deadline = asyncio.get_running_loop().time() + limit
        try:
            if _of_replaced_pool(conn):
                await conn.invalidate()
            elif self._sqlite is not None:
                await conn.run_sync(_dialects.give_back_sqlite)
            elif not conn.invalidated and (unsettled or (failed and _left_in_transaction(conn))):
                await conn.invalidate()
        finally:
            await _closed(conn, driver)
            if unsettled and backend is not None and backend.pid is not None:
                await self._backend_ended(backend.pid, deadline)

    async def _backend_ended(self, pid: int, deadline: float) -> None:
        """Wait until the server process ``pid`` has ended, until ``deadline`` (loop time).

        Looked for on another connection, each look in a transaction of its own
        (a transaction sees the server's activity as it first looked). Where
        that cannot be told (the server out of reach, the deadline passed), a
        warning says so. Behind PgBouncer the process is not known: nothing is
        waited for (a later flush still compares the cursor).
        """
        look = text(_dialects.BACKEND_ALIVE_SQL)
        try:
            async with asyncio.timeout_at(deadline):
                conn = await self._connect()
                try:
                    while (await conn.execute(look, {"pid": pid})).scalar():
                        await conn.rollback()
                        await asyncio.sleep(_BACKEND_POLL)
                finally:
                    await self._to_the_end(conn.close())
        except TimeoutError:
            logger.warning(
                "hermes_orm: the server's process %d still ran the statement of a cancelled "
                "write at the try's deadline: it may still commit",
                pid,
            )
        except Exception as exc:
            logger.warning(
                "hermes_orm: whether the server has ended the statement of a cancelled "
                "write is unknown (%s): it may still commit",
                _dialects.redact(str(exc)),
            )

    async def _checkin(self, conn: AsyncConnection, closes: int) -> None:
        """Keep ``conn`` (its transaction ended) for the next operation, or give it back.

        As :class:`~hermes_orm.store.SessionStore` does, and for the same reason,
        on aiosqlite only: each trip through the pool costs a call on the
        driver's thread (the reset's rollback), and its connections serve any
        event loop; other drivers' connections belong to the loop that made them.
        One taken before the store was closed (``closes``: the count of closes
        then) goes back, and so does one the pool has none beside: another
        task may be waiting. So does one while another call of this store waits
        for a connection: the pool may have room it does not tell the waiting call
        of (a connection that failed as it was made frees its place, and wakes no
        one), and only a connection given back would end the wait before the
        pool's timeout.
        """
        room = _sa.pool_has_room(self._async_engine.sync_engine.pool)
        if (
            self._parks
            and room
            and not self._awaiting
            and not conn.invalidated  # (see SessionStore._checkin)
            and not self._parked
            and closes == self._closes
            and _dialects.keeps_its_mode(conn.sync_connection)  # type: ignore[arg-type]
        ):
            self._parked.append(conn)
            return
        # To its end however often the task is cancelled meanwhile: the pool's reset
        # interrupted would be logged as an error and the connection thrown away.
        await self._to_the_end(self._release(conn))
        if not room:
            # The pool hands a connection to whoever asks first without awaiting: a
            # task waiting for one takes this one before this task asks again.
            await asyncio.sleep(0)

    async def _busy_holders(self, exc: DBAPIError, engine: AsyncEngine) -> list[Any]:
        """Who holds locks on the sessions on ``engine``'s server (PostgreSQL).

        None are asked of a server out of reach.
        """
        if self._engine.dialect.name != "postgresql" or _dialects.is_unreachable(exc):
            return []
        if not _sa.pool_has_room(engine.sync_engine.pool):
            return []  # (the error is not kept waiting for a connection; see describe_busy)
        try:
            conn = await self._connect(engine)
        except DBAPIError:
            return []
        driver = _sa.aiosqlite_connection(conn.sync_connection)  # type: ignore[arg-type]
        try:
            return await conn.run_sync(_dialects.busy_holders, self._schema)
        except DBAPIError:
            return []
        finally:
            await self._to_the_end(_closed(conn, driver))

    async def rebuild_search_index(self) -> int:
        """Rebuild the search index; see :meth:`SessionStore.rebuild_search_index`."""
        return await self._transaction(Run(_search.rebuild, write=True, bounded=False))


class _Turns:
    """Whose turn it is on a pool sharing one connection, in one event loop."""

    def __init__(self) -> None:
        self.busy = False
        #: The calls waiting, first come first served (each a future of the loop).
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()


#: For each pool that shares one connection, the turns of its stores' calls in each
#: event loop (by the loop's id). An entry is dropped as its last call ends: nothing
#: of a loop is kept once no call of it waits (an asyncio.Lock would keep the loop).
_TURNS: weakref.WeakKeyDictionary[Pool, dict[int, _Turns]] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def _turn(pool: Pool) -> AsyncIterator[None]:
    """Wait for this call's turn on ``pool`` (in the running event loop); hand it on after.

    Then for the turn of its event loop's thread among the others' (see
    :func:`_thread_turn`).
    """
    async with _loop_turn(pool), _thread_turn(pool):
        yield


#: Longest pause between two tries of a call waiting for another thread's turn to end.
_THREAD_TURN_POLL = 0.05


@contextlib.asynccontextmanager
async def _thread_turn(pool: Pool) -> AsyncIterator[None]:
    """The turn of this event loop's thread at ``pool``'s one connection, as blocking stores take.

    Stores of event loops in two threads (each ``asyncio.run`` of its own) on one
    ``StaticPool`` must not use its connection at once: SQLAlchemy's asyncio
    adapter waits for it on a lock of the first loop that waited, which a release
    from the other thread does not wake (the call never returned). The lock is the
    blocking stores' (:func:`hermes_orm._sa.thread_turn`), tried without blocking
    the loop, and waited for as long as they wait.

    Raises:
        DatabaseBusyError: Another thread's call held it for ``store.TURN_WAIT`` seconds.
    """
    turn = _sa.thread_turn(pool)
    if turn is None:
        yield
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _store.TURN_WAIT
    pause = 0.001
    # Given back only if taken: the thread may hold it otherwise (a blocking store's
    # connection() block open across an await), and a cancelled wait took nothing.
    taken = False
    try:
        while not (taken := turn.acquire(blocking=False)):
            if loop.time() >= deadline:
                raise turn_busy(pool)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _THREAD_TURN_POLL)
        yield
    finally:
        if taken:
            turn.release()


@contextlib.asynccontextmanager
async def _loop_turn(pool: Pool) -> AsyncIterator[None]:
    """Wait for this call's turn on ``pool`` among the calls of the running event loop."""
    loop = asyncio.get_running_loop()
    of_pool = _TURNS.setdefault(pool, {})
    turns = of_pool.setdefault(id(loop), _Turns())
    if turns.busy:
        waiter = loop.create_future()
        turns.waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                _hand_on(of_pool, id(loop), turns)  # given the turn as it was cancelled
            elif waiter in turns.waiting:
                turns.waiting.remove(waiter)
            raise
    turns.busy = True
    try:
        yield
    finally:
        _hand_on(of_pool, id(loop), turns)


def _hand_on(of_pool: dict[int, _Turns], key: int, turns: _Turns) -> None:
    """Give the turn to the first call still waiting, or leave the pool idle in this loop."""
    while turns.waiting:
        waiter = turns.waiting.popleft()
        if not waiter.done():  # (one cancelled meanwhile is passed over)
            waiter.set_result(None)
            return
    turns.busy = False
    if of_pool.get(key) is turns:
        del of_pool[key]


class AsyncUserStore(_AsyncSessions):
    """An asyncio store's view of one user's sessions (``AsyncSessionStore.for_user``).

    What it sees and refuses is what :class:`hermes_orm.store.UserStore` does.
    """

    def __init__(self, store: AsyncSessionStore, user_id: str) -> None:
        self._view(store, user_id)
        self._store = store

    async def _transaction(self, request: Run[T]) -> T:
        return await self._store._transaction(request)
