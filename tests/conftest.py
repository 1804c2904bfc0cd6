"""One suite over both backends: every ``engine``/``store`` test runs on SQLite and PostgreSQL.

PostgreSQL is a real server this session starts itself (see ``_postgres.py``).
It never skips: a server that cannot start is an error, and a run in which no
PostgreSQL test passed fails (``CI`` set, or ``--require-postgresql``).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_alembic import Config as AlembicTestConfig
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import hermes_orm
from hermes_orm import SessionStore, create_store_engine
from hermes_orm.migrations import SCRIPT_LOCATION
from tests._postgres import postgres_server

BACKENDS = [
    pytest.param("sqlite", marks=pytest.mark.sqlite),
    pytest.param("postgresql", marks=pytest.mark.postgresql),
]
_TEMPLATE_DB = "hermes_orm_template"
_counter = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-postgresql",
        action="store_true",
        help="fail the run unless PostgreSQL tests ran and passed (implied by CI=true)",
    )


_pg_passed: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed and "postgresql" in report.keywords:
        _pg_passed.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
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
def pg_template(pg_server_url: str) -> str:
    """A database migrated to head, copied for each test."""
    admin = _pg_admin(pg_server_url)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{_TEMPLATE_DB}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{_TEMPLATE_DB}" TEMPLATE template0')
    admin.dispose()
    url = make_url(pg_server_url).set(drivername="postgresql+psycopg", database=_TEMPLATE_DB)
    engine = create_engine(url, poolclass=NullPool)
    hermes_orm.upgrade(engine)
    engine.dispose()
    return _TEMPLATE_DB


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "hermes.db"
    engine = create_store_engine(f"sqlite:///{path}", poolclass=NullPool)
    hermes_orm.upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
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
    yield url
    _drop_pg_database(server, url)


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


@pytest.fixture
def store(engine: Engine) -> SessionStore:
    return SessionStore(engine)


# -- pytest-alembic ----------------------------------------------------------------------------


@pytest.fixture
def alembic_config() -> AlembicTestConfig:
    return AlembicTestConfig(config_options={"script_location": SCRIPT_LOCATION})


@pytest.fixture
def alembic_engine(empty_db_url: str) -> Iterator[Engine]:
    eng = create_store_engine(empty_db_url, poolclass=NullPool)
    yield eng
    eng.dispose()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``hermes-orm ARGS`` in a new process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "hermes_orm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )


def count_rows(engine: Engine, table: str, **where: Any) -> int:
    clause = " AND ".join(f"{k} = :{k}" for k in where) or "1 = 1"
    with engine.connect() as conn:
        return int(
            conn.execute(text(f"SELECT count(*) FROM {table} WHERE {clause}"), where).scalar_one()
        )
