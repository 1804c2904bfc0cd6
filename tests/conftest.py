"""One suite over both backends: every ``engine``/``store`` test runs on SQLite and PostgreSQL.

PostgreSQL is a real server this session starts itself (see ``devtools/postgres.py``).
It never skips: a server that cannot start is an error, and a run in which no
PostgreSQL test passed fails (``CI`` set, or ``--require-postgresql``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_alembic import Config as AlembicTestConfig
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

import hermes_orm
from devtools.pgbouncer import pgbouncer
from devtools.postgres import postgres_server
from hermes_orm import SessionStore, _dialects, create_store_engine
from hermes_orm.async_store import AsyncSessionStore
from hermes_orm.migrations import SCRIPT_LOCATION

API = ["sync", "async", "asyncpg"]
BACKENDS = [
    pytest.param("sqlite", marks=pytest.mark.sqlite),
    pytest.param("postgresql", marks=pytest.mark.postgresql),
]
# Per process: pytest-xdist workers may share one server (HERMES_ORM_TEST_PG_URL).
_TEMPLATE_DB = f"hermes_orm_template_{os.getpid()}"
_counter = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-postgresql",
        action="store_true",
        help="fail the run unless PostgreSQL tests ran and passed (implied by CI=true)",
    )
    parser.addoption(
        "--in-schema",
        metavar="NAME",
        default=None,
        help="place hermes_orm's tables in this PostgreSQL schema in each PostgreSQL test "
        "database (the URL says ?schema=NAME); nothing of ours is left in public",
    )
    parser.addoption(
        "--partitions",
        metavar="N",
        type=int,
        default=None,
        help="hash-partition hermes_messages into N partitions in each PostgreSQL test "
        "database (hermes_orm.upgrade(partitions=N))",
    )
    parser.addoption(
        "--through-pgbouncer",
        action="store_true",
        help="reach each PostgreSQL test database through a PgBouncer in transaction "
        "pooling mode that the run starts (the URL says ?pgbouncer=true)",
    )


_pg_passed: list[str] = []


@pytest.hookimpl(tryfirst=True)  # before -m selects by markers
def pytest_itemcollected(item: pytest.Item) -> None:
    """A module's ``HEAVY_ON`` backends: its tests on them are marked ``heavy``."""
    module = getattr(item, "module", None)
    heavy_on = getattr(module, "HEAVY_ON", ())
    if any(backend in item.keywords for backend in heavy_on):
        item.add_marker(pytest.mark.heavy)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``--through-pgbouncer``, ``--in-schema`` or ``--partitions``, leave out the tests
    marked ``direct``."""
    if not any(config.getoption(o) for o in ("--through-pgbouncer", "--in-schema", "--partitions")):
        return
    kept = [item for item in items if item.get_closest_marker("direct") is None]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed and "postgresql" in report.keywords:
        _pg_passed.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return  # a pytest-xdist worker: the controlling process gets every report and checks
    required = session.config.getoption("--require-postgresql") or os.environ.get("CI")
    if required and exitstatus == 0 and not _pg_passed:
        session.exitstatus = 1
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("ERROR: no PostgreSQL test passed; PostgreSQL must run here.")


# -- PostgreSQL server and databases ----------------------------------------------------


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def pgbouncer_url(pg_server_url: str) -> Iterator[str]:
    """A PgBouncer in transaction pooling mode in front of the test server."""
    with pgbouncer(pg_server_url) as url:
        yield url


def through_pgbouncer(pooler_url: str, database_url: str) -> str:
    """``database_url``'s database, reached through the pooler, as a store is told so."""
    pooler = make_url(pooler_url)
    return (
        make_url(database_url)
        .set(host=pooler.host, port=pooler.port)
        .update_query_dict({"pgbouncer": "true"})
        .render_as_string(hide_password=False)
    )


def _pg_admin(server_url: str) -> Engine:
    return create_engine(
        make_url(server_url).set(drivername="postgresql+psycopg"),
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
    )


def _create_pg_database(server_url: str, template: str = "template0") -> str:
    name = f"hermes_test_{os.getpid()}_{next(_counter)}"
    admin = _pg_admin(server_url)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
    admin.dispose()
    return (
        make_url(server_url)
        .set(drivername="postgresql+psycopg", database=name)
        .render_as_string(hide_password=False)
    )


def _drop_pg_database(server_url: str, url: str) -> None:
    admin = _pg_admin(server_url)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A database migrated to head, copied for each test (dropped after the run)."""
    admin = _pg_admin(pg_server_url)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{_TEMPLATE_DB}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{_TEMPLATE_DB}" TEMPLATE template0')
    admin.dispose()
    url = make_url(pg_server_url).set(drivername="postgresql+psycopg", database=_TEMPLATE_DB)
    engine = create_engine(url, poolclass=NullPool)
    hermes_orm.upgrade(
        engine,
        schema=request.config.getoption("--in-schema"),
        partitions=request.config.getoption("--partitions"),
    )
    engine.dispose()
    yield _TEMPLATE_DB
    _drop_pg_database(pg_server_url, url.render_as_string(hide_password=False))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "hermes.db"
    engine = create_store_engine(f"sqlite:///{path}", poolclass=NullPool)
    hermes_orm.upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The test's backend: parametrized by :func:`pytest_generate_tests`."""
    return str(request.param)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh database migrated to head, on the test's backend."""
    if backend == "sqlite":
        path = tmp_path / "hermes.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    server = request.getfixturevalue("pg_server_url")
    url = _create_pg_database(server, request.getfixturevalue("pg_template"))
    schema = request.config.getoption("--in-schema")
    if schema:
        url = make_url(url).update_query_dict({"schema": schema}).render_as_string(False)
    if request.config.getoption("--through-pgbouncer"):
        yield through_pgbouncer(request.getfixturevalue("pgbouncer_url"), url)
    else:
        yield url
    _drop_pg_database(server, url)


@pytest.fixture
def empty_pg(pg_server_url: str) -> Iterator[str]:
    """URL of a fresh PostgreSQL database with no schema at all, for a test's own setup."""
    url = _create_pg_database(pg_server_url)
    yield url
    _drop_pg_database(pg_server_url, url)


@pytest.fixture
def empty_db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh database with no schema at all."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    server = request.getfixturevalue("pg_server_url")
    url = _create_pg_database(server)
    yield url
    _drop_pg_database(server, url)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_store_engine(db_url, poolclass=NullPool)
    yield eng
    eng.dispose()


class BlockingStore:
    """An :class:`AsyncSessionStore` called like a :class:`SessionStore`, for the shared tests.

    Every coroutine method runs to its end on this store's own event loop, so
    one test body exercises both APIs (``api`` is ``sync`` or ``async``).
    ``engine`` is the async engine's ``sync_engine``: the events a test
    attaches to it see the async store's statements and commits.
    """

    def __init__(
        self, store: AsyncSessionStore, check_engine: Engine, runner: asyncio.Runner | None = None
    ) -> None:
        self.async_store = store
        #: A blocking engine on the same database, for a test's own queries.
        self.check_engine = check_engine
        # Stores on one async engine share its loop: its connections belong to it.
        self._runner = runner or asyncio.Runner()
        self._owns_runner = runner is None
        #: Stores made by :func:`fresh_store` on this one's engine, closed with it.
        self.others: list[BlockingStore] = []

    @property
    def engine(self) -> Engine:
        return self.async_store.engine.sync_engine

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.async_store, name)
        if not inspect.iscoroutinefunction(value):
            return value

        def blocking(*args: Any, **kwargs: Any) -> Any:
            return self._runner.run(value(*args, **kwargs))

        return blocking

    def for_user(self, user_id: Any) -> BlockingStore:
        """The async store's user-scoped view, called like the blocking one."""
        return BlockingStore(
            self.async_store.for_user(user_id),  # type: ignore[arg-type]
            self.check_engine,
            self._runner,
        )

    def close(self) -> None:
        for other in self.others:
            other.close()
        self._runner.run(self.async_store.close())
        if self._owns_runner:
            self._runner.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests of ``store`` run on every backend and API, but as marked ``apis``/``backends``.

    ``async`` is aiosqlite on SQLite and psycopg's async connections on
    PostgreSQL; ``asyncpg`` is PostgreSQL's other asyncio driver.
    """
    if "backend" not in metafunc.fixturenames:
        return
    on = metafunc.definition.get_closest_marker("backends")
    backends = ("sqlite", "postgresql") if on is None else on.args
    if "api" not in metafunc.fixturenames:
        metafunc.parametrize("backend", [b for b in BACKENDS if b.values[0] in backends])
        return
    only = metafunc.definition.get_closest_marker("apis")
    wanted = set(API) if only is None else set(only.args)
    combos = [
        pytest.param(backend, api, marks=getattr(pytest.mark, backend), id=f"{backend}-{api}")
        for backend, apis in (("sqlite", API[:2]), ("postgresql", API))
        if backend in backends
        for api in apis
        if api in wanted
    ]
    metafunc.parametrize(("backend", "api"), combos)


@pytest.fixture
def store(engine: Engine, db_url: str, api: str) -> Iterator[SessionStore]:
    """The store of the test's backend, blocking (``sync``) or asyncio (``async``)."""
    if api == "sync":
        yield SessionStore(engine)
        return
    url = make_url(db_url)
    if api == "asyncpg":
        url = url.set(drivername="postgresql+asyncpg")
    blocking = BlockingStore(AsyncSessionStore(url), engine)
    yield blocking  # type: ignore[misc]
    blocking.close()


# -- pytest-alembic ----------------------------------------------------------------------------


@pytest.fixture
def alembic_config() -> AlembicTestConfig:
    return AlembicTestConfig(config_options={"script_location": SCRIPT_LOCATION})


@pytest.fixture
def alembic_engine(empty_db_url: str) -> Iterator[Engine]:
    eng = create_store_engine(empty_db_url, poolclass=NullPool)
    yield eng
    eng.dispose()


def frozen_revision(name: str) -> Any:
    """A migration revision's module, loaded from its file as Alembic loads it."""
    import importlib.util

    path = Path(SCRIPT_LOCATION) / "versions" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"frozen_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    revision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(revision)
    return revision


def in_threads(agent: Callable[[int], None], count: int) -> None:
    """``agent(n)`` for n in ``range(count)``, each in a thread of its own, all at once."""
    threads = [threading.Thread(target=agent, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class Meanwhile:
    """What :func:`meanwhile` ran in its other thread, and when it ended."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.done = threading.Event()
        #: ``do`` ended before the statement's thread went on (nothing held it up).
        self.first = False
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self, do: Callable[[], Any]) -> None:
        try:
            self.result = do()
        except BaseException as exc:  # (the test looks at it)
            self.error = exc
        finally:
            self.done.set()


#: A schema naming a table of hermes_orm's in a statement (``agents.hermes_sessions``).
_QUALIFIER = re.compile(r'(?:"[^"]+"|\w+)\.(?=hermes_)')


def unqualified(statement: str) -> str:
    """``statement`` with its tables' schema left out (as run under ``--in-schema``)."""
    return _QUALIFIER.sub("", statement)


@contextlib.contextmanager
def listening(target: Any, name: str, fn: Callable[..., Any]) -> Iterator[None]:
    """``fn`` listens to ``target``'s event ``name`` while the block runs."""
    event.listen(target, name, fn)
    try:
        yield
    finally:
        event.remove(target, name, fn)


def transient(backend: str) -> OperationalError:
    """A transient error of ``backend`` as SQLAlchemy raises it, for a listener to inject."""
    if backend == "sqlite":
        import sqlite3

        orig: Exception = sqlite3.OperationalError("database is locked")
        orig.sqlite_errorcode = 5  # type: ignore[attr-defined]
    else:
        import psycopg

        orig = psycopg.errors.SerializationFailure("could not serialize access")
    return OperationalError("injected", {}, orig)


@contextlib.contextmanager
def meanwhile(
    engine: Engine, when: Callable[[str], bool], do: Callable[[], Any], wait: float = 1.0
) -> Iterator[Meanwhile]:
    """Run ``do`` in another thread once a statement ``when`` accepts ran in this one.

    That statement's transaction is still open: its thread waits for ``do`` up
    to ``wait`` seconds (a lock it holds keeps ``do`` waiting that long), then
    goes on. The block's end waits for ``do`` to end. ``when`` is given the
    statement with its tables' schema left out (as run under ``--in-schema``).
    """
    caller = threading.current_thread()
    state = Meanwhile()

    def ran(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if threading.current_thread() is not caller or state.thread is not None:
            return
        if when(unqualified(statement)):
            state.thread = threading.Thread(target=state.run, args=(do,))
            state.thread.start()
            state.first = state.done.wait(wait)

    event.listen(engine, "after_cursor_execute", ran)
    try:
        yield state
    finally:
        event.remove(engine, "after_cursor_execute", ran)
        if state.thread is not None:
            state.thread.join(60)


def ctrl_c_at_each_c_return(
    call: Callable[[], Any], within: Any = None, points: int = 500
) -> Iterator[tuple[int, str]]:
    """Run ``call`` once per point, a KeyboardInterrupt raised as its point-th C call
    returns (where Python runs signal handlers); only in frames of code ``within``, if
    given. Yields each point reached, with the name of the C function that returned
    there, once ``call`` ended; stops after the last.
    """
    for point in range(1, points):
        returns = 0
        name = ""

        def interrupt(frame: Any, event: str, arg: Any) -> None:
            nonlocal returns, name
            if event == "c_return" and (within is None or frame.f_code is within):
                returns += 1
                if returns == point:  # noqa: B023 - this round's point
                    sys.setprofile(None)
                    name = getattr(arg, "__qualname__", repr(arg))
                    raise KeyboardInterrupt

        sys.setprofile(interrupt)
        try:
            call()
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
        if returns < point:
            return
        yield point, name


def run_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``hermes-orm ARGS`` in a new process, as a user would (in ``cwd``, if given)."""
    return subprocess.run(
        [sys.executable, "-m", "hermes_orm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
        timeout=300,
    )


def fresh_store(store: Any) -> Any:
    """A store with no memory of its own, on ``store``'s engine and API."""
    if isinstance(store, BlockingStore):
        fresh = BlockingStore(
            AsyncSessionStore(store.async_store.engine, check_schema=False),
            store.check_engine,
            store._runner,
        )
        store.others.append(fresh)
        return fresh
    return SessionStore(store.engine, check_schema=False)


def sync_engine(store: Any) -> Engine:
    """A blocking engine on ``store``'s database, for a test's own queries (either API)."""
    return store.check_engine if isinstance(store, BlockingStore) else store.engine


def table_name(engine: Engine, table: str) -> str:
    """``table`` as raw SQL names it on ``engine``: in its schema under ``--in-schema``."""
    schema = _dialects.store_schema(engine)
    return table if schema is None else f'"{schema}".{table}'


def count_rows(engine: Engine, table: str, **where: Any) -> int:
    clause = " AND ".join(f"{k} = :{k}" for k in where) or "1 = 1"
    table = table_name(engine, table)
    with engine.connect() as conn:
        return int(
            conn.execute(text(f"SELECT count(*) FROM {table} WHERE {clause}"), where).scalar_one()
        )


@contextlib.contextmanager
def backend_terminated(engine: Engine, statement: str | None = None) -> Iterator[None]:
    """The server ends the first connection of ``engine`` that runs ``statement`` (a piece of its
    SQL), or that commits when None, just before it does; the block runs meanwhile.

    A connection lost as a failover or a restart loses it (PostgreSQL only).
    """
    killer = create_engine(engine.url, poolclass=NullPool)
    fired: list[int] = []

    def terminate(conn: Any) -> None:
        if fired:
            return
        pid = conn.connection.dbapi_connection.info.backend_pid
        fired.append(pid)
        with killer.connect() as other:  # (waits for the backend to be gone)
            other.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})

    def on_statement(conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        if statement is not None and statement in sql:
            terminate(conn)

    def on_commit(conn: Any) -> None:
        if statement is None:
            terminate(conn)

    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine, "commit", on_commit)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine, "commit", on_commit)
        killer.dispose()
    assert fired, "no connection of the engine ran it"
