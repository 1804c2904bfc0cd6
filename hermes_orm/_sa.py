"""The private attributes of SQLAlchemy (and of aiosqlite) hermes_orm relies on, in one place.

The flush runs its statements straight on the driver's cursor when nothing
watches the connection (see :func:`hermes_orm._dialects.execute_driver_script`);
for that it must know whether anything watches, and raise a driver error the
way SQLAlchemy itself does. Both need attributes SQLAlchemy keeps private.
On aiosqlite, those statements run in one call on the driver's thread (each
call from the event loop is a trip between threads); that needs the attributes
SQLAlchemy's own aiosqlite adapter uses. They are read here only; pyproject
bounds SQLAlchemy below its next minor release, and CI runs the store's tests
against the newest release too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sqlite3
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

from sqlalchemy import Connection
from sqlalchemy.pool import (
    AssertionPool,
    NullPool,
    Pool,
    QueuePool,
    SingletonThreadPool,
    StaticPool,
)
from sqlalchemy.util import await_only, greenlet_spawn
from sqlalchemy.util.concurrency import in_greenlet

T = TypeVar("T")

#: The connection argument SQLAlchemy's asyncpg adapter takes the connect
#: coroutine function from (``asyncpg.connect`` when not given): what its own
#: ``async_creator`` passes, taking the URL's arguments here too.
ASYNCPG_CONNECT = "async_creator_fn"


def observed(conn: Connection) -> bool:
    """Whether anything watches ``conn``'s statements: event listeners or SQL logging.

    SQLAlchemy keeps these flags on the connection, its engine and its dialect
    and checks them before every statement it runs; they are read the same way.
    """
    return bool(
        conn._has_events or conn.engine._has_events or conn.dialect._has_events or conn._echo
    )


def log_as_the_engine(conn: Connection) -> Connection:
    """``conn``, logging its statements if its engine logs them now; returns ``conn``.

    SQLAlchemy reads the engine's logging once, as a connection is made: a
    connection a store keeps idle between calls would otherwise go on unseen
    by ``echo`` turned on later (or seen after it was turned off).
    """
    conn._echo = conn.engine._should_log_info()
    return conn


def interrupt_behind(exc: BaseException) -> BaseException:
    """The interrupt an assertion of SQLAlchemy's transaction bookkeeping hid, else ``exc``.

    ``RootTransaction.commit`` (and its rollback) asserts in a ``finally`` that
    the transaction ended: a Ctrl-C or a cancellation landing as the COMMIT
    begins comes out as that ``AssertionError``, an ``Exception`` an
    application's ``except Exception`` takes for a failed write (and swallows),
    the interrupt in its ``__context__``.
    """
    if type(exc) is AssertionError:
        context = exc.__context__
        if context is not None and not isinstance(context, Exception):
            return context
    return exc


def pool_has_room(pool: Pool) -> bool:
    """Whether ``pool`` could give out another connection now, without waiting.

    A bounded ``QueuePool`` (the default of file databases, and its asyncio
    variant) is full when ``pool_size + max_overflow`` connections are out;
    the bound on overflow is kept privately. Other pools have no bound.
    """
    if not isinstance(pool, QueuePool):
        return True
    overflow = getattr(pool, "_max_overflow", -1)
    return bool(overflow < 0 or pool.checkedout() < pool.size() + overflow)


def pool_has_waiters(pool: Pool) -> bool:
    """Whether a task waits in ``pool``'s asyncio queue for a connection given back.

    Only a bounded ``QueuePool`` makes a checkout wait. Read from the waiting
    getters of the queue it keeps privately; where they are not found (another
    SQLAlchemy), taken to be so.
    """
    if not isinstance(pool, QueuePool):
        return False
    queue = getattr(getattr(pool, "_pool", None), "_queue", None)
    getters = getattr(queue, "_getters", None)
    if getters is None:
        return True
    return any(not getter.done() for getter in getters)


async def round_trip(pool: Pool) -> None:
    """Take a connection from ``pool`` (an asyncio one: made if none is idle) and give it back.

    As an ``AsyncEngine`` checks out, on the running event loop; the pool's
    listeners (the engine's, which a dispose carries over) run as they do there.
    """
    fairy = await greenlet_spawn(pool.connect)
    await greenlet_spawn(fairy.close)


def may_keep_one(pool: Pool) -> bool:
    """Whether a store may keep the last connection it used, idle, from ``pool``.

    Not from a ``NullPool``, whose users chose to hold no connection between
    calls; nor an ``AssertionPool``, which has one to give at all; nor a pool
    sharing one connection: the application's own would be it.
    """
    return not isinstance(pool, NullPool | AssertionPool) and not shares_one_connection(pool)


def shares_one_connection(pool: Pool) -> bool:
    """Whether ``pool`` gives every checkout one connection (or one per thread).

    ``StaticPool`` (an in-memory SQLite database, an application's tests) and
    ``SingletonThreadPool`` (SQLAlchemy's default for ``sqlite://``) do: the
    application's own connection and the store's are then one.
    """
    return isinstance(pool, StaticPool | SingletonThreadPool)


#: Per ``StaticPool``: the lock under which a blocking store uses its one connection.
_THREAD_TURNS: weakref.WeakKeyDictionary[Pool, threading.RLock] = weakref.WeakKeyDictionary()
_THREAD_TURNS_LOCK = threading.Lock()


def _no_turns_held() -> None:
    """In a forked child, whose only thread holds none of its parent's turns (nor locks)."""
    global _THREAD_TURNS_LOCK  # noqa: PLW0603 - made anew for the child alone
    _THREAD_TURNS_LOCK = threading.Lock()
    _THREAD_TURNS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_no_turns_held)


def thread_turn(pool: Pool) -> threading.RLock | None:
    """The lock a blocking store holds while it uses ``pool``'s connection (None: none).

    A ``StaticPool`` gives every thread its one connection: two threads' calls
    at once would run in one transaction, on a driver connection that must not
    be used by two threads at a time. The stores' calls on it take turns (a
    thread's own call within one goes on, and finds the transaction open). Other
    pools give each its own connection: nothing is held.
    """
    if not isinstance(pool, StaticPool):
        return None
    with _THREAD_TURNS_LOCK:
        turn = _THREAD_TURNS.get(pool)
        if turn is None:
            turn = _THREAD_TURNS[pool] = threading.RLock()
    return turn


def shared_connection_in_transaction(pool: Pool) -> bool:
    """Whether the connection ``pool`` would give this thread is one with a transaction open.

    Only a pool that shares one connection can give out one like that (see
    :func:`shares_one_connection`): the transaction is then whoever holds the
    connection's, the application's say. Asked before the checkout, for
    returning a connection to such a pool rolls its transaction back. The
    connection is where the pool keeps it: ``StaticPool``'s ``connection``
    (made on first use), ``SingletonThreadPool``'s per-thread record.
    """
    if isinstance(pool, StaticPool):
        record = pool.__dict__.get("connection")
    elif isinstance(pool, SingletonThreadPool):
        current = getattr(pool._conn, "current", None)
        record = current() if current is not None else None
    else:
        return False
    dbapi_connection = getattr(record, "dbapi_connection", None)
    return dbapi_connection is not None and bool(driver_in_transaction(dbapi_connection))


def raise_driver_error(
    conn: Connection,
    exc: BaseException,
    statement: str | None = None,
    params: Sequence[Any] | None = None,
    cursor: Any = None,
) -> NoReturn:
    """Raise the driver error ``exc`` as SQLAlchemy would have, had it run the statement.

    Its ``DBAPIError`` subclass, the connection invalidated on a disconnect,
    ``handle_error`` listeners called.
    """
    conn._handle_dbapi_exception(exc, statement, params, cursor, None)
    raise AssertionError("SQLAlchemy did not raise")  # pragma: no cover


#: Marks a dialect whose ``do_ping`` :func:`before_ping` wrapped (the hook it runs).
_PING_HOOK = "_hermes_orm_before_ping"


def before_ping(dialect: Any, hook: Callable[[Any], None]) -> None:
    """Have ``hook(dbapi_connection)`` run before each ping of ``dialect``'s pools' connections.

    A pool with ``pre_ping`` pings a connection in its checkout, before the
    ``checkout`` event, with no event before it; the dialect's public
    ``do_ping``, which that ping calls, is wrapped on the dialect instance
    (the engine's own, and its copies' made by ``execution_options``). Once
    per dialect.
    """
    with _wrapping:
        if getattr(dialect, _PING_HOOK, None) is not None:
            return
        ping = dialect.do_ping

        def do_ping(dbapi_connection: Any) -> bool:
            hook(dbapi_connection)
            return bool(ping(dbapi_connection))

        dialect.do_ping = do_ping
        setattr(dialect, _PING_HOOK, hook)


_wrapping = threading.Lock()


def of_replaced_pool(conn: Connection) -> bool:
    """Whether ``conn``, open and valid, is of a pool its engine's ``dispose()`` replaced.

    (Asked for its connection, an invalidated one would take a new one from the pool.)
    """
    if conn.invalidated or conn.closed:
        return False
    return getattr(conn.connection, "_pool", conn.engine.pool) is not conn.engine.pool


def aiosqlite_connection(conn: Connection) -> Any:
    """``conn``'s ``aiosqlite.Connection``; None when ``conn`` is not on aiosqlite."""
    if conn.dialect.driver != "aiosqlite":
        return None
    driver = getattr(conn.connection.dbapi_connection, "_connection", None)
    # None too if SQLAlchemy's adapter or aiosqlite changed shape, or the connection
    # is closed (its _conn then raises ValueError): the caller then goes through the
    # adapter's cursor, as any other driver, which raises the driver's error.
    try:
        return driver if hasattr(driver, "_execute") and hasattr(driver, "_conn") else None
    except ValueError:
        return None


async def aiosqlite_drained(driver: Any) -> None:
    """Wait until the thread of aiosqlite ``driver`` ran everything it was given so far.

    Its queue is first in, first out: a running connection's thread runs a
    call given now after them; a stopped one's ends after them.
    """
    thread = getattr(driver, "_thread", None)
    if thread is None and isinstance(driver, threading.Thread):
        thread = driver  # aiosqlite < 0.22: the connection is its own thread
    if thread is None or not thread.is_alive():
        return
    if getattr(driver, "_running", False) and getattr(driver, "_connection", None) is not None:
        await driver._execute(_nothing)
    else:
        await asyncio.to_thread(thread.join)


def _nothing() -> None:
    """What :func:`aiosqlite_drained` has the driver's thread run."""


def on_driver_thread(driver: Any, work: Callable[[Any], T]) -> T:
    """``work(sqlite3_connection)`` in one call on the thread of aiosqlite ``driver``."""
    result: T = await_only(driver._execute(work, driver._conn))
    return result


def awaited(awaitable: Awaitable[T]) -> T:
    """The result of ``awaitable``, awaited from SQLAlchemy's greenlet (inside ``run_sync``)."""
    result: T = await_only(awaitable)
    return result


def in_run_sync() -> bool:
    """Whether this runs where an asyncio driver's blocking calls work (``run_sync``'s greenlet)."""
    return bool(in_greenlet())


def sqlite3_connection(dbapi_connection: Any) -> Any:
    """The ``sqlite3.Connection`` of a SQLite driver connection (pysqlite's, or aiosqlite's).

    On SQLAlchemy's aiosqlite adapter, None once aiosqlite closed it. Any other
    driver connection comes back as it is.
    """
    driver = getattr(dbapi_connection, "_connection", None)  # the adapter's aiosqlite.Connection
    if driver is None or isinstance(dbapi_connection, sqlite3.Connection):
        return dbapi_connection
    return getattr(driver, "_connection", None)


def roll_back_invalidated(dbapi_connection: Any, _record: Any, _exc: Any) -> None:
    """End what a SQLite connection SQLAlchemy is about to close after an error holds.

    A pool ``invalidate`` listener. SQLAlchemy invalidates a connection whose
    statement was interrupted (a cancelled task, a Ctrl-C), and leaves that
    statement's cursor open. sqlite3 closes a connection whose cursors still
    hold statements only when those are freed (the exception's traceback holds
    one), so until the garbage collector ran the closed connection held its
    locks: its open write transaction kept every other writer out, the store's
    own next calls included; a read cut short between its first row and its
    last kept, on a database not in WAL mode, every writer from committing.
    So its transaction is rolled back, and (not in WAL mode) every cursor of
    the connection closed first, on the connection's own thread.
    """
    if isinstance(dbapi_connection, sqlite3.Connection):  # pysqlite
        _end_statements(dbapi_connection)
        return
    connection = sqlite3_connection(dbapi_connection)
    if connection is None or connection is dbapi_connection or not in_greenlet():
        return  # at garbage collection nothing can be awaited; closing is all there is
    driver = dbapi_connection._connection
    with contextlib.suppress(Exception):
        await_only(asyncio.shield(driver._execute(_end_statements, connection)))


def _end_statements(connection: sqlite3.Connection) -> None:
    """Roll back ``connection``'s transaction; not in WAL mode, close its cursors first.

    Errors are ignored.

    In WAL mode a statement left open blocks no writer (only a checkpoint past
    it, until the garbage collector frees it), and the rollback ends what a
    write holds. In the other modes a read left open keeps its lock, so its
    cursor is closed. sqlite3 offers no list of a connection's cursors; each
    holds the connection, so the garbage collector's referrers are the list:
    a scan of every object, a few milliseconds to a tenth of a second, paid
    only as such a connection is dropped after an error.
    """
    try:
        cursor = connection.cursor()
        try:
            wal = cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            cursor.close()
    except sqlite3.Error:
        wal = False
    if not wal:
        for referrer in gc.get_referrers(connection):
            if isinstance(referrer, sqlite3.Cursor) and referrer.connection is connection:
                with contextlib.suppress(sqlite3.Error):
                    referrer.close()
    with contextlib.suppress(sqlite3.Error):
        connection.rollback()


def isolation_level(engine: Any) -> str | None:
    """The isolation level ``engine`` gives its connections, if one was set on it.

    Set by ``create_engine(isolation_level=...)`` (kept on the dialect, privately)
    or by ``engine.execution_options(isolation_level=...)`` (public).
    """
    level = engine.get_execution_options().get("isolation_level")
    if level is None:
        level = getattr(engine.dialect, "_on_connect_isolation_level", None)
    return None if level is None else str(level)


def insert_clauses(statement: Any) -> list[str]:
    """What an ORM ``INSERT`` carries besides its target and RETURNING.

    The position rule places rows given as parameters only. ``values()``,
    ``ON CONFLICT`` and prefixes (``OR IGNORE``) sit on private attributes;
    SQLAlchemy's own ORM reads ``_values``/``_multi_values`` and
    ``_post_values_clause`` the same way. An attribute gone in a later release
    reads as present: the statement is refused, never placed wrongly.
    """
    found = []
    if statement.select is not None:
        found.append("from_select()")
    if getattr(statement, "_values", True) or getattr(statement, "_multi_values", True):
        found.append("values()")
    if getattr(statement, "_post_values_clause", True) is not None:
        found.append("ON CONFLICT")
    if getattr(statement, "_prefixes", True):
        found.append("prefix_with()")
    return found


def statement_values(statement: Any) -> list[dict[str, Any]] | None:
    """The rows an INSERT or UPDATE's ``values()`` gives, by column name; None: unreadable.

    A value is the Python value of its bound parameter, else the SQL expression.
    They sit on private attributes (``_values``, ``_multi_values``,
    ``_ordered_values``), as :func:`insert_clauses` reads them; an attribute
    gone in a later release reads as None, and the caller refuses the statement.
    """
    try:
        rows: list[Any] = []
        if statement._values:
            rows.append(dict(statement._values))
        for multi in statement._multi_values:
            rows.extend(dict(row) if isinstance(row, dict) else None for row in multi)
        ordered = getattr(statement, "_ordered_values", None)
        if ordered:
            rows.append(dict(ordered))
    except (AttributeError, TypeError, ValueError):
        return None
    if any(row is None for row in rows):
        return None  # positional rows of a multi-VALUES insert
    return [
        {getattr(key, "key", key): getattr(value, "value", value) for key, value in row.items()}
        for row in rows
    ]


def driver_in_transaction(dbapi_connection: Any) -> bool | None:
    """Whether the driver connection has a transaction open; None where it does not tell.

    psycopg (its connection, or the one inside SQLAlchemy's async adapter) and
    psycopg2 report their transaction status, sqlite3 (and the
    ``aiosqlite.Connection`` inside SQLAlchemy's adapter) ``in_transaction``;
    SQLAlchemy's asyncpg adapter keeps the transaction it started (``_transaction``).
    """
    for candidate in (dbapi_connection, getattr(dbapi_connection, "_connection", None)):
        status = getattr(getattr(candidate, "info", None), "transaction_status", None)
        if status is not None:
            return int(status) != 0  # psycopg.pq.TransactionStatus.IDLE
        try:
            in_transaction = getattr(candidate, "in_transaction", None)  # sqlite3, aiosqlite
        except ValueError:  # aiosqlite's, closed: "no active connection"
            return None
        if isinstance(in_transaction, bool):
            return in_transaction
    if hasattr(dbapi_connection, "_transaction"):  # SQLAlchemy's asyncpg adapter
        return dbapi_connection._transaction is not None
    status_of = getattr(dbapi_connection, "get_transaction_status", None)  # psycopg2
    if callable(status_of):
        return int(status_of()) != 0  # TRANSACTION_STATUS_IDLE
    return None


def insert_select_names(statement: Any) -> list[str] | None:
    """The columns an ``INSERT ... FROM SELECT`` fills, by name; [] without a SELECT.

    ``from_select()`` keeps them on a private attribute (``_select_names``),
    which SQLAlchemy's compiler reads the same way. None: unreadable (an
    attribute gone in a later release); the caller refuses the statement.
    """
    if getattr(statement, "select", None) is None:
        return []
    names = getattr(statement, "_select_names", None)
    if not isinstance(names, list | tuple):
        return None
    keys: list[Any] = [getattr(name, "key", name) for name in names]
    return [str(key) for key in keys] if all(isinstance(key, str) for key in keys) else None


def on_conflict_sets(statement: Any) -> list[tuple[str, Any, Any]] | None:
    """What the ``ON CONFLICT DO UPDATE`` clauses of an INSERT set: (column name, value, clause).

    [] without one (or with ``DO NOTHING`` only). SQLite's and PostgreSQL's
    ``on_conflict_do_update()`` put their clauses on a private attribute
    (``_post_values_clause``; several in a list on SQLite); what they set is
    public on each clause (``update_values_to_set``), and so is their target.
    None: a clause of another kind, or unreadable; the caller refuses the
    statement.
    """
    from sqlalchemy.dialects.postgresql import dml as postgresql_dml
    from sqlalchemy.dialects.sqlite import dml as sqlite_dml

    clause = getattr(statement, "_post_values_clause", False)
    if clause is None:
        return []
    if clause is False:
        return None
    clauses = getattr(clause, "clauses", None)
    found: list[tuple[str, Any, Any]] = []
    for each in clauses if isinstance(clauses, list | tuple) else (clause,):
        if isinstance(each, sqlite_dml.OnConflictDoNothing | postgresql_dml.OnConflictDoNothing):
            continue
        if not isinstance(each, sqlite_dml.OnConflictDoUpdate | postgresql_dml.OnConflictDoUpdate):
            return None
        sets = each.update_values_to_set
        for key, value in sets.items() if isinstance(sets, dict) else sets:
            name = getattr(key, "key", key)
            if not isinstance(name, str):
                return None
            found.append((name, value, each))
    return found


def statement_prefixes(statement: Any) -> list[str] | None:
    """The text of a statement's ``prefix_with()`` prefixes; None: unreadable.

    They sit on a private attribute (``_prefixes``: pairs of a clause and the
    dialect it is for), as :func:`insert_clauses` reads it.
    """
    try:
        return [str(clause) for clause, _dialect in statement._prefixes]
    except (AttributeError, TypeError, ValueError):
        return None


def asyncpg_transaction_left(dbapi_connection: Any) -> bool:
    """Whether asyncpg holds a transaction SQLAlchemy's asyncpg adapter does not know of.

    A task cancelled while asyncpg starts a transaction (its ``BEGIN`` in
    flight) leaves asyncpg's own transaction object (``_top_xact``) in place,
    and the server in the transaction, while the adapter's (``_transaction``)
    stays None: rolling back through the adapter, and the pool's reset, then
    do nothing, and every later transaction on the connection would be a
    savepoint inside that one, never committed. False for other drivers.
    """
    if not hasattr(dbapi_connection, "_transaction") or dbapi_connection._transaction is not None:
        return False
    driver = getattr(dbapi_connection, "_connection", None)
    if driver is None:
        return False
    if getattr(driver, "_top_xact", None) is not None:
        return True
    in_transaction = getattr(driver, "is_in_transaction", None)
    return bool(callable(in_transaction) and in_transaction())
