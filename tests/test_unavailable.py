"""An unreachable database is not a busy one: retried for a span of time, then said so.

Real servers and sockets: a PostgreSQL backend stopped with SIGSTOP (a hung
server: its kernel still acknowledges everything), a listener that never
answers, a database turned read-only as a demoted primary is. Every driver:
psycopg and psycopg2 (blocking), psycopg's async connections and asyncpg.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from hermes_orm import (
    AsyncSessionStore,
    DatabaseError,
    DatabaseUnavailableError,
    RetryPolicy,
    SessionStore,
    create_async_store_engine,
    create_store_engine,
)
from tests.conftest import _create_pg_database, _drop_pg_database, ctrl_c_at_each_c_return

pytestmark = [pytest.mark.postgresql, pytest.mark.direct("signals the server's own processes")]

DRIVERS = ("psycopg", "psycopg2", "psycopg_async", "asyncpg")
TURN = [{"role": "user", "content": "is the lighthouse lit"}]


@pytest.fixture
def pg_db(pg_server_url: str) -> Iterator[str]:
    """A database of the test's own: only the store under test connects to it."""
    url = _create_pg_database(pg_server_url)
    SessionStore(url).upgrade()
    yield url
    _drop_pg_database(pg_server_url, url)


def _url(url: str, driver: str, **query: str) -> str:
    return (
        make_url(url)
        .set(drivername=f"postgresql+{driver}")
        .update_query_dict(query)
        .render_as_string(hide_password=False)
    )


def _flusher(url: str, driver: str, policy: RetryPolicy, **engine: Any) -> Callable[..., Any]:
    """A blocking ``flush(session_id, messages)`` of a store on ``driver`` (sync or asyncio)."""
    if driver in ("psycopg", "psycopg2"):
        store = SessionStore(create_store_engine(_url(url, driver), **engine), retry=policy)
        store.create_session("s", source="cli")
        return store.flush
    loop = asyncio.new_event_loop()
    async_store = AsyncSessionStore(
        create_async_store_engine(_url(url, driver), **engine), retry=policy
    )
    loop.run_until_complete(async_store.create_session("s", source="cli"))

    def flush(session_id: str, messages: list[dict[str, Any]]) -> Any:
        return loop.run_until_complete(async_store.flush(session_id, messages))

    return flush


def _backends(server_url: str, database: str) -> list[int]:
    admin = create_engine(server_url, poolclass=NullPool)
    with admin.connect() as conn:
        pids = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = :db"), {"db": database}
        ).scalars()
        return list(pids)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_hung_server_connection_is_abandoned_at_the_deadline_and_the_flush_goes_on(
    pg_server_url: str, pg_db: str, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's connection stops answering: the try is abandoned, the next one writes."""
    policy = RetryPolicy(attempt_timeout=1.0, unavailable_for=30.0)
    flush = _flusher(pg_db, driver, policy)
    assert flush("s", TURN).written == 1  # its connection now waits in the pool
    stopped = _backends(pg_server_url, make_url(pg_db).database or "")
    assert stopped, "the store's connection has a server process"
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="hermes_orm"):
            result = flush("s", [*TURN, {"role": "assistant", "content": "it is"}])
        took = time.monotonic() - started
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert result.written == 1
    assert result.cursor == 2
    assert 1.0 <= took < 10.0
    told = [r.getMessage() for r in caplog.records if r.name == "hermes_orm"]
    assert any("no answer within attempt_timeout" in m for m in told), told


def test_a_statement_of_more_parameters_than_the_protocol_carries_is_no_outage(
    pg_db: str,
) -> None:
    """libpq refuses it before sending anything, as an error without a SQLSTATE, as it
    says a connection is lost: no try would do better, so it is not waited out."""
    from sqlalchemy.exc import DBAPIError

    from hermes_orm._dialects import is_unreachable

    engine = create_engine(pg_db, poolclass=NullPool)
    with engine.connect() as conn:
        with pytest.raises(DBAPIError) as err:
            conn.exec_driver_sql("SELECT " + ", ".join(["%s"] * 70_000), tuple(range(70_000)))
        assert "number of parameters" in str(err.value)
        assert not is_unreachable(err.value)
        conn.rollback()
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1  # (the connection is fine)
    engine.dispose()


def test_a_cancelled_read_on_a_hung_connection_is_not_waited_for_as_a_write(
    pg_server_url: str, pg_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancelled write's server process is waited for (it may still commit); a read's
    is not: the call ends with its cancellation, and nothing warns of a write."""
    policy = RetryPolicy(attempt_timeout=6.0, unavailable_for=30.0)

    async def cancelled_read() -> float:
        store = AsyncSessionStore(_url(pg_db, "asyncpg"), retry=policy)
        try:
            await store.create_session("s", source="cli")
            await store.flush("s", TURN)
            stopped = _backends(pg_server_url, make_url(pg_db).database or "")
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(store.get_messages("s"), 0.5)
                return time.monotonic() - started
            finally:
                for pid in stopped:
                    os.kill(pid, signal.SIGCONT)
        finally:
            await store.close()

    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        took = asyncio.run(cancelled_read())
    assert took < 0.5 + 4  # not the 6 s a write's server process is waited for
    assert not [r for r in caplog.records if "cancelled write" in r.getMessage()]


class _Silent:
    """A TCP listener that takes connections and never says a word (a hung server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)  # the kernel completes handshakes; nobody ever reads
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_server_that_never_answers_is_reported_unreachable_within_the_span(
    driver: str,
) -> None:
    silent = _Silent()
    try:
        url = f"postgresql+{driver}://u:SECRET@127.0.0.1:{silent.port}/db"
        policy = RetryPolicy(unavailable_for=2.5)
        # One connection attempt gives up after 2 s (libpq's least; the default is 10).
        connect_args = {"timeout": 2} if driver == "asyncpg" else {"connect_timeout": 2}
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError) as err:
            _flusher(url, driver, policy, connect_args=connect_args)
        took = time.monotonic() - started
    finally:
        silent.close()
    # Tries until 2.5 s have passed since the first began; the last one takes its 2 s.
    assert 2.5 <= took < 2.5 + 2 + 1.5
    assert err.value.attempts >= 2
    assert "SECRET" not in str(err.value)
    assert "unreachable for" in str(err.value)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_first_host_that_never_answers_is_passed_over_for_the_next(
    pg_db: str, driver: str
) -> None:
    """A hung old primary first in a failover URL: each host has its own connect deadline."""
    silent = _Silent()
    live = make_url(pg_db)
    url = live.set(drivername=f"postgresql+{driver}", host=None, port=None).update_query_dict(
        {
            "host": [f"127.0.0.1:{silent.port}", f"{live.host}:{live.port}"],
            "target_session_attrs": "read-write",
            "timeout" if driver == "asyncpg" else "connect_timeout": "2",
        }
    )
    try:
        started = time.monotonic()
        flush = _flusher(url.render_as_string(False), driver, RetryPolicy(unavailable_for=6.0))
        assert flush("s", TURN).written == 1
        took = time.monotonic() - started
    finally:
        silent.close()
    assert took < 6.0  # the hung host's 2 s, per connection made, not the whole span


def _set_read_only(server_url: str, database: str, on: bool) -> None:
    admin = create_engine(server_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        setting = "SET default_transaction_read_only = on" if on else "RESET ALL"
        conn.exec_driver_sql(f'ALTER DATABASE "{database}" {setting}')
        # Its connections then see it, as a demoted primary's clients do.
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :db AND pid <> pg_backend_pid()"
            ),
            {"db": database},
        )
    admin.dispose()


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_read_only_server_is_waited_out_like_a_failover(
    pg_server_url: str, pg_db: str, driver: str
) -> None:
    """Writes refused as read-only are retried on new connections until the server takes them."""
    database = make_url(pg_db).database or ""
    flush = _flusher(pg_db, driver, RetryPolicy(unavailable_for=30.0))
    assert flush("s", TURN).written == 1
    _set_read_only(pg_server_url, database, True)
    timer = threading.Timer(1.0, _set_read_only, (pg_server_url, database, False))
    timer.start()
    try:
        started = time.monotonic()
        result = flush("s", [*TURN, {"role": "assistant", "content": "it is"}])
        took = time.monotonic() - started
    finally:
        timer.join()
    assert result.written == 1
    assert took >= 0.9


def test_a_server_read_only_past_the_span_says_how_to_find_the_primary(
    pg_server_url: str, pg_db: str
) -> None:
    database = make_url(pg_db).database or ""
    store = SessionStore(pg_db, retry=RetryPolicy(attempts=1, unavailable_for=0.5))
    store.create_session("s", source="cli")
    _set_read_only(pg_server_url, database, True)
    try:
        with pytest.raises(DatabaseUnavailableError) as err:
            store.flush("s", TURN)
    finally:
        _set_read_only(pg_server_url, database, False)
    assert "read-only" in str(err.value)
    assert "target_session_attrs=read-write" in str(err.value)
    assert err.value.attempts >= 2  # more than the one busy try the policy allows
    assert store.flush("s", TURN).written == 1


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_pool_with_no_connection_to_give_is_waited_out_then_typed(pg_db: str, api: str) -> None:
    """Every connection taken (as a hung server keeps them): the same span, the same error."""
    policy = RetryPolicy(unavailable_for=1.0)
    kwargs: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}
    if api == "sync":
        engine = create_store_engine(pg_db, **kwargs)
        store: Any = SessionStore(engine, retry=policy)
        holder = engine.connect()  # the pool's only connection
        call: Callable[[], Any] = lambda: store.get_messages("s")  # noqa: E731
    else:
        async_engine = create_async_store_engine(_url(pg_db, "psycopg_async"), **kwargs)
        async_store = AsyncSessionStore(async_engine, retry=policy)
        loop = asyncio.new_event_loop()
        holder = loop.run_until_complete(async_engine.connect())
        call = lambda: loop.run_until_complete(async_store.get_messages("s"))  # noqa: E731
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError, match="no connection from the pool"):
        call()
    assert time.monotonic() - started >= 1.0
    if api == "sync":
        holder.close()
    else:
        loop.run_until_complete(holder.close())


def test_a_poolers_refusals_are_not_retried() -> None:
    """PgBouncer refuses an unknown database or user with SQLSTATE 08P01: for good."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    from hermes_orm import _dialects

    for message in ("no such database: agents", "no such user: app", "certificate verify failed"):
        refusal = psycopg.OperationalError(message)
        assert not _dialects.is_transient(OperationalError("connect", None, refusal))
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    assert _dialects.is_unreachable(OperationalError("select", None, lost))


_BAD_OPTIONS = [("sslmode", "bogus"), ("target_session_attrs", "bogus")]


@pytest.mark.parametrize(
    ("driver", "option", "value"),
    [(driver, *option) for driver in DRIVERS for option in _BAD_OPTIONS]
    # libpq reads service files; asyncpg has none.
    + [(driver, "service", "hermes-orm-no-such-service") for driver in DRIVERS[:3]]
    + [(driver, "port", "99999") for driver in DRIVERS]  # invalid port number
    + [("asyncpg", "no_such_parameter", "1")],  # asyncpg takes no parameter it does not know
)
def test_a_connection_option_the_driver_cannot_use_is_not_retried(
    pg_server_url: str, driver: str, option: str, value: str
) -> None:
    """A mistyped option in the URL says so at once; no server is down, none comes up."""
    flush = _flusher_of(_url(pg_server_url, driver, **{option: value}), driver)
    with pytest.raises(DatabaseError, match=option) as err:
        flush("s", TURN)
    # Retried, the same error would come back as unreachable after the whole span.
    assert not isinstance(err.value, DatabaseUnavailableError)


@pytest.fixture(scope="module")
def refusing_server(pg_server_url: str) -> Iterator[str]:
    """The test server with a role that may not log in.

    (A database closed to connections is maintenance, waited out: the Hermes plugin's
    tests make the mirror's database unavailable so.)
    """
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE ROLE hermes_orm_nologin NOLOGIN")
    yield pg_server_url
    with admin.connect() as conn:
        conn.exec_driver_sql("DROP ROLE hermes_orm_nologin")
    admin.dispose()


_SERVER_REFUSALS = {
    "a startup option's bad value": ({"options": "-c lock_timeout=5s0"}, "lock_timeout"),
    "a mistyped startup option": ({"options": "-c lock_timout=5000"}, "lock_timout"),
    "a setting no session may change": ({"options": "-c shared_buffers=1MB"}, "shared_buffers"),
    "a role that may not log in": ({"username": "hermes_orm_nologin"}, "log in"),
    # (libpq: "does not support SSL"; asyncpg: "rejected SSL upgrade")
    "TLS asked of a server without it": ({"sslmode": "require"}, "SSL"),
}


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("case", list(_SERVER_REFUSALS))
def test_a_connection_the_server_refuses_for_good_is_not_retried(
    refusing_server: str, driver: str, case: str
) -> None:
    """The server answered (a FATAL error): no server is down, trying again changes nothing."""
    change, said = _SERVER_REFUSALS[case]
    url = make_url(refusing_server).set(drivername=f"postgresql+{driver}")
    url = url.set(**change) if "username" in change else url.update_query_dict(change)
    started = time.monotonic()
    flush = _flusher_of(url.render_as_string(hide_password=False), driver)
    with pytest.raises(DatabaseError, match=said) as err:
        flush("s", TURN)
    assert not isinstance(err.value, DatabaseUnavailableError)
    assert time.monotonic() - started < 10  # (retried, it would take the policy's 30 s)


def _flusher_of(url: str, driver: str) -> Callable[[str, list[dict[str, Any]]], Any]:
    """A blocking flush of a store at ``url`` that has not connected yet (a long span)."""
    policy = RetryPolicy(unavailable_for=30)
    if driver in ("psycopg", "psycopg2"):
        return SessionStore(url, retry=policy).flush
    async_store = AsyncSessionStore(url, retry=policy)

    def flush(session_id: str, messages: list[dict[str, Any]]) -> Any:
        async def run() -> Any:
            try:
                return await async_store.flush(session_id, messages)
            finally:
                await async_store.close()

        return asyncio.run(run())

    return flush


def test_an_unreachable_database_is_never_retried_at_once() -> None:
    from sqlalchemy.exc import OperationalError

    from hermes_orm._retry import Retries

    retries = Retries(RetryPolicy(base_delay=0, max_delay=0, unavailable_for=10))
    retries.begin()
    lost = OperationalError("x", None, ConnectionError("lost"), connection_invalidated=True)
    delay = retries.after(lost)
    assert delay is not None
    assert delay >= 0.05


def test_asyncpgs_timeout_in_the_url_is_seconds() -> None:
    from hermes_orm import InvalidURLError

    create_async_store_engine("postgresql+asyncpg://u@127.0.0.1/db?timeout=2.5")
    with pytest.raises(InvalidURLError, match="timeout='soon'"):
        create_async_store_engine("postgresql+asyncpg://u@127.0.0.1/db?timeout=soon")


def _armed(watchdog: Any, fd: int, seconds: float) -> Any:
    """A watch of the socket ``fd`` armed on ``watchdog`` (None: ``fd`` is no socket)."""
    from hermes_orm._retry import Watch

    watch = Watch.of(fd, seconds)
    if watch is not None:
        watchdog.arm(watch)
    return watch


def test_a_deadline_shuts_the_socket_it_watched_not_one_that_took_its_number() -> None:
    """The driver may close its descriptor first: the number's next owner is left alone."""
    from hermes_orm._retry import Watchdog

    watchdog = Watchdog()
    ours, peer = socket.socketpair()
    watch = _armed(watchdog, ours.fileno(), 0.1)
    assert watch is not None
    number = ours.fileno()
    other, other_peer = socket.socketpair()
    ours.close()  # as libpq closes a connection it saw drop
    os.dup2(other.fileno(), number)  # the number now names another connection's socket
    taken = socket.socket(fileno=number)
    deadline = time.monotonic() + 5
    while not watch.fired:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    watchdog.disarm(watch)
    other.sendall(b"still open")
    assert other_peer.recv(32) == b"still open"
    assert peer.recv(32) == b""  # the watched socket was shut down
    for sock in (peer, taken, other, other_peer):
        sock.close()


def test_a_watch_disarmed_twice_closes_its_duplicate_once(tmp_path: Path) -> None:
    """A Ctrl-C as the first disarm returns has its caller's cleanup disarm again: the
    number, which a file of the application may hold by then, is left alone."""
    from hermes_orm._retry import Watchdog

    watchdog = Watchdog()
    ours, peer = socket.socketpair()
    watch = _armed(watchdog, ours.fileno(), 60)
    assert watch is not None
    number = watch.fd
    with (tmp_path / "app").open("w") as app:
        watchdog.disarm(watch)
        os.dup2(app.fileno(), number)  # the number now names the application's file
        watchdog.disarm(watch)
        os.write(number, b"still open")
        os.close(number)
    ours.close()
    peer.close()


def test_a_ctrl_c_anywhere_in_a_watched_try_leaves_no_watch_armed(pg_server_url: str) -> None:
    """At whichever C call of a watched try a Ctrl-C comes, from finding the socket to
    disarming, no watch is left armed (it would shut the kept connection's socket at
    its deadline, under another call) and no descriptor stays open: but one, where
    it comes as the socket's descriptor is duplicated, before anything holds it."""
    from hermes_orm._retry import watchdog, watched

    def try_once() -> None:
        with watched(conn, 60):
            pass

    engine = create_engine(pg_server_url, poolclass=NullPool)
    points = 0
    with engine.connect() as conn:
        try_once()  # (the watcher's thread started)
        armed = set(watchdog._watches)
        before = len(os.listdir("/proc/self/fd"))
        for point, name in ctrl_c_at_each_c_return(try_once):
            points += 1
            assert set(watchdog._watches) == armed, f"a watch left armed (point {point}, {name})"
            leaked = len(os.listdir("/proc/self/fd")) - before
            assert leaked == (name == "dup"), f"{leaked} descriptors (point {point}, {name})"
            before += leaked
    assert points >= 10
    engine.dispose()


def test_a_ctrl_c_as_a_new_connection_is_watched_leaves_no_watch_armed() -> None:
    """A checkout's new connection is watched from its ``connect`` listener, and the
    watch is settled by the checkout (or the block's end): at whichever C call of
    arming a Ctrl-C comes, the settling disarms what was armed."""
    from hermes_orm._retry import _Connecting, watchdog

    ours, peer = socket.socketpair()

    def connect_and_settle() -> None:
        connecting = _Connecting(60)
        try:
            connecting.arm(ours.fileno())
        finally:
            connecting.settled()

    connect_and_settle()  # (the watcher's thread started)
    armed = set(watchdog._watches)
    points = 0
    for point, name in ctrl_c_at_each_c_return(connect_and_settle):
        points += 1
        assert set(watchdog._watches) == armed, f"a watch left armed (point {point}, {name})"
    assert points >= 5
    ours.close()
    peer.close()


def test_a_ctrl_c_as_a_watch_is_armed_or_disarmed_leaves_the_watcher_usable() -> None:
    """At whichever C call of arming or disarming a Ctrl-C comes, the watcher's lock
    is free afterwards: held, every later try of the process would wait for it."""
    from hermes_orm._retry import Watchdog

    watchdog = Watchdog()
    ours, peer = socket.socketpair()

    def arm_and_disarm() -> None:
        watch = _armed(watchdog, ours.fileno(), 60)
        if watch is not None:
            watchdog.disarm(watch)

    points = 0
    for point, _ in ctrl_c_at_each_c_return(arm_and_disarm):
        points += 1
        # Another thread arms and disarms in time: the lock is not held.
        again = threading.Thread(target=arm_and_disarm, daemon=True)
        again.start()
        again.join(timeout=5)
        assert not again.is_alive(), f"the watcher's lock stayed held (point {point})"
    assert points >= 5
    ours.close()
    peer.close()


def test_a_forked_child_has_none_of_its_parents_deadlines() -> None:
    from hermes_orm._retry import watchdog

    ours, peer = socket.socketpair()
    watch = _armed(watchdog, ours.fileno(), 60)
    assert watch is not None
    duplicate = watch.fd
    pid = os.fork()
    if pid == 0:  # the child: no watch, a lock it can take, the parent's duplicate closed
        clean = not watchdog._watches and watchdog._mutex.acquire(timeout=1) and watch.fd == -1
        try:
            os.fstat(duplicate)
        except OSError:
            os._exit(0 if clean else 1)
        os._exit(2)
    _, status = os.waitpid(pid, 0)
    watchdog.disarm(watch)
    ours.close()
    peer.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_deadline_watcher_outlives_a_deadline_too_far_and_a_file(tmp_path: Path) -> None:
    """Neither a deadline past what a wait can take nor a file's descriptor stops the thread."""
    from hermes_orm._retry import Watch, Watchdog

    watchdog = Watchdog()
    with (tmp_path / "file").open("w") as file:
        assert Watch.of(file.fileno(), 0.05) is None  # no socket: nothing to shut down
    far_end, far_peer = socket.socketpair()
    far = _armed(watchdog, far_end.fileno(), 1e10)
    soon_end, soon_peer = socket.socketpair()
    soon = _armed(watchdog, soon_end.fileno(), 0.1)
    assert far is not None
    assert soon is not None
    deadline = time.monotonic() + 5
    while not soon.fired:
        assert time.monotonic() < deadline, "the watcher stopped"
        time.sleep(0.05)
    assert not far.fired
    watchdog.disarm(far)
    watchdog.disarm(soon)
    assert soon_peer.recv(8) == b""  # shut down
    far_end.sendall(b"open")
    assert far_peer.recv(8) == b"open"
    for sock in (far_end, far_peer, soon_end, soon_peer):
        sock.close()


def test_connections_carry_deadlines_unless_the_url_or_libpq_sets_them(
    pg_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def parameters(url: str) -> dict[str, str]:
        engine = create_store_engine(url)
        with engine.connect() as conn:
            found = dict(conn.connection.dbapi_connection.info.get_parameters())  # type: ignore[union-attr]
        engine.dispose()
        return found

    ours = parameters(pg_db)
    assert ours["connect_timeout"] == "10"
    assert ours["keepalives_idle"] == "30"
    assert ours["tcp_user_timeout"] == "30000"
    assert parameters(_url(pg_db, "psycopg", connect_timeout="3"))["connect_timeout"] == "3"
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "7")
    assert parameters(pg_db)["connect_timeout"] == "7"  # libpq's environment, not ours


@pytest.mark.backends("postgresql")  # deadlines are PostgreSQL's
def test_a_bulk_flush_longer_than_the_deadline_completes_while_it_makes_progress(
    db_url: str, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch a bulk flush writes starts its deadline again: a long write is not abandoned.

    Every batch is slowed by 0.4 s against a deadline of 1 s (the rest of the
    deadline is the batch's own insert, on a busy machine too): the whole flush
    (five batches) takes twice the deadline, and lands once.
    """
    from hermes_orm import RetryPolicy, create_store_engine
    from hermes_orm import store as store_module

    store = SessionStore(create_store_engine(db_url), retry=RetryPolicy(attempt_timeout=1.0))
    store.create_session("bulk", source="cli")
    real = store_module._dialects.execute_driver_script

    def slow(conn: Any, statements: Any, **kwargs: Any) -> int:
        time.sleep(0.4)
        return real(conn, statements, **kwargs)

    monkeypatch.setattr(store_module._dialects, "execute_driver_script", slow)
    messages = [{"role": "user", "content": f"m{i}"} for i in range(5 * store_module._BATCH)]
    assert store.flush("bulk", messages).written == len(messages)
    monkeypatch.undo()
    assert store.get_session("bulk")["message_count"] == len(messages)
    store.close()
    store.engine.dispose()


class _LateListener:
    """A port that refuses connections until ``after`` seconds, then forwards them to ``target``.

    A server coming up (a restart, a failover's new primary taking the address).
    """

    def __init__(self, target: tuple[str, int], after: float) -> None:
        # Bound but not listening: connections are refused, and no one else takes the port.
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._target, self._after = target, after
        self._stop = threading.Event()
        self._listening = threading.Thread(target=self._listen, daemon=True)
        self._listening.start()

    def _listen(self) -> None:
        with self._server as server:
            if self._stop.wait(self._after):
                return
            server.listen()
            server.settimeout(0.1)
            while not self._stop.is_set():
                try:
                    client, _ = server.accept()
                except TimeoutError:
                    continue
                upstream = socket.create_connection(self._target)
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._listening.join()


@pytest.mark.parametrize("driver", DRIVERS)
def test_an_upgrade_waits_for_a_server_coming_up(pg_server_url: str, driver: str) -> None:
    """``upgrade`` (a store's first work, as the CLI's import and demo start) waits it out."""
    url = _create_pg_database(pg_server_url)
    server = make_url(url)
    late = _LateListener((server.host or "127.0.0.1", server.port or 5432), after=1.0)
    through = make_url(_url(url, driver)).set(port=late.port).render_as_string(hide_password=False)
    policy = RetryPolicy(base_delay=0.05, unavailable_for=30)
    started = time.monotonic()
    try:
        if driver in ("psycopg", "psycopg2"):
            store = SessionStore(through, retry=policy)
            store.upgrade()
            assert store.create_session("s", source="cli")["id"] == "s"
            store.close()
        else:

            async def upgrade() -> None:
                async with AsyncSessionStore(through, retry=policy) as store:
                    await store.upgrade()
                    assert (await store.create_session("s", source="cli"))["id"] == "s"

            asyncio.run(upgrade())
        assert time.monotonic() - started >= 1.0  # it did wait for the server
    finally:
        late.close()
        _drop_pg_database(pg_server_url, url)


# -- a crash before the COMMIT reached the WAL ---------------------------------------------


@pytest.fixture(scope="module")
def crashing_server() -> Iterator[Any]:
    """A server of this module's own, which a test may crash (``restart("immediate")``)."""
    from devtools.postgres import local_postgres

    with local_postgres({"synchronous_commit": "on"}) as server:  # acknowledged is durable
        yield server


@pytest.mark.parametrize("operation", ["append", "create_session", "delete_session", "end_session"])
def test_a_write_lost_in_a_crash_is_not_taken_for_the_one_that_reused_its_id(
    crashing_server: Any, operation: str
) -> None:
    """The server crashes as the write commits; restarted, it gives the write's id to another.

    Its commit never reached the WAL, so the restarted server hands that
    transaction id out again: another client's transaction takes it and
    commits. The retry must not read that as its own commit (``txid_status``):
    it looks for what it wrote, finds nothing, and writes it.
    """
    from sqlalchemy import event

    url = _create_pg_database(crashing_server.url)
    store = SessionStore(url, retry=RetryPolicy(unavailable_for=60, base_delay=0.05))
    try:
        store.upgrade()
        store.create_session("s", source="cli")
        store.flush("s", [{"role": "user", "content": "hi"}])
        other = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        crashed: list[int] = []

        def crash_at_commit(_conn: Any) -> None:
            if crashed:
                return
            crashed.append(1)
            crashing_server.restart("immediate")
            with other.connect() as conn:  # takes the id the lost transaction had
                conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS other_work (x int)")

        event.listen(store.engine, "commit", crash_at_commit)
        try:
            if operation == "append":
                assert store.append("s", {"role": "assistant", "content": "kept"}) == 1
            elif operation == "create_session":
                store.create_session("s2", source="cli")
            elif operation == "delete_session":
                assert store.delete_session("s") is True
            else:
                store.end_session("s", "done")
        finally:
            event.remove(store.engine, "commit", crash_at_commit)
        assert crashed
        other.dispose()
        check = SessionStore(url)
        if operation == "append":
            assert [m["content"] for m in check.get_messages("s")] == ["hi", "kept"]
        elif operation == "create_session":
            assert check.get_session("s2") is not None
        elif operation == "delete_session":
            assert check.get_session("s") is None
        else:
            assert check.get_session("s")["end_reason"] == "done"  # type: ignore[index]
        check.close()
    finally:
        store.close()
        _drop_pg_database(crashing_server.url, url)


def test_a_new_connections_deadline_ends_with_its_checkout(pg_server_url: str) -> None:
    """What a block runs on a connection after its checkout is not cut by the checkout's
    deadline (the command line's and an upgrade's blocks run long migrations so)."""
    from hermes_orm import _retry

    engine = create_store_engine(pg_server_url)
    try:
        with _retry.connecting(0.5), engine.connect() as conn:
            assert conn.execute(text("SELECT pg_sleep(1.5), 1")).one()[1] == 1
    finally:
        engine.dispose()
