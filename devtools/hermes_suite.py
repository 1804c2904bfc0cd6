"""pytest plugin: Hermes Agent's own tests, with hermes_orm's SessionDB in hermes_state.

Loaded into a pytest run of Hermes' tests (``-p devtools.hermes_suite``, see
``tests/test_hermes_suite.py``) before they are collected, so every
``from hermes_state import SessionDB`` in Hermes and in its tests gets the
adapter. Each database file a test names is, on PostgreSQL, a database of its
own (made from a template at the shipped head), so tests stay apart as they
do with files.

Environment:
    HERMES_ORM_SUITE_PG: a PostgreSQL server URL; unset: SQLite files, where
        Hermes puts its own.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import hermes_state
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from hermes_orm.integrations.hermes.sessiondb import SessionDB

_SERVER = os.environ.get("HERMES_ORM_SUITE_PG")
#: The database every test database is copied from (made by the runner, at head).
TEMPLATE = "hermes_suite_template"
_made: dict[str, str] = {}
_making = threading.Lock()


def database_for(server: str, path: Path) -> str:
    """The URL of the PostgreSQL database standing for SQLite file ``path`` (made once)."""
    name = "hs_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:20]
    with _making:
        if name not in _made:
            admin = create_engine(server, poolclass=NullPool, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                exists = conn.exec_driver_sql(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
                ).first()
                if exists is None:
                    conn.exec_driver_sql(
                        f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}" STRATEGY FILE_COPY'
                    )
            admin.dispose()
            _made[name] = make_url(server).set(database=name).render_as_string(False)
        return _made[name]


class SuiteSessionDB(SessionDB):
    """The adapter, opened on the database standing for Hermes' ``db_path``."""

    def __init__(self, db_path: Any = None, read_only: bool = False) -> None:
        path = Path(db_path) if db_path is not None else Path(hermes_state.DEFAULT_DB_PATH)
        if _SERVER is None:
            super().__init__(path, read_only=read_only)
        else:
            super().__init__(database_for(_SERVER, path), read_only=read_only)
        self.db_path = path


def pytest_configure(config: Any) -> None:
    """Put the adapter in ``hermes_state`` before any test module is collected.

    (On loading the plugin, not on importing this module: a process that only
    reads its names keeps Hermes' own class.)
    """
    hermes_state.SessionDB = SuiteSessionDB
