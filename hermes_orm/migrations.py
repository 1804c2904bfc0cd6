"""Run the shipped Alembic migrations from Python, and check a database is current.

The migration scripts live in the repository's top-level ``alembic/`` and ship
inside the wheel as package data (``hermes_orm/alembic``), so the same
revisions run from a repository checkout, from ``hermes-orm db ...`` and from an
installed wheel. They record their state in their own version table,
``hermes_orm_alembic_version``, so a host application's ``alembic_version`` is
never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

from hermes_orm.errors import SchemaOutOfDateError, SchemaTooNewError

VERSION_TABLE = "hermes_orm_alembic_version"


def _script_location() -> Path:
    """Where the migration scripts are.

    In the package when installed from a wheel (which maps the repository's
    top-level ``alembic/`` there), else beside it (a checkout, an editable install).
    """
    packaged = Path(__file__).with_name("alembic")
    # env.py, not the folder: a checkout may keep an old hermes_orm/alembic/__pycache__.
    if (packaged / "env.py").is_file():
        return packaged
    return Path(__file__).resolve().parents[1] / "alembic"


SCRIPT_LOCATION = str(_script_location())
#: Tables the migrations own; host apps pass :func:`include_name` to their autogenerate.
TABLE_PREFIX = "hermes_"
#: Tables, views and indexes of the search index, and its PostgreSQL columns;
#: written as SQL by the migrations, outside the models.
SEARCH_PREFIX = "hermes_search"
SEARCH_COLUMNS = frozenset({"search_body", "search_vector"})

Bind = Engine | Connection


def alembic_config(url: str | None = None) -> Config:
    """An Alembic ``Config`` for the shipped scripts, built without any ini file.

    Args:
        url: Database URL for ``env.py`` to connect to when no connection is
            injected through ``config.attributes["connection"]``.
    """
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if url is not None:
        # ConfigParser interpolates "%": escape it so passwords survive.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextmanager
def _connected(bind: Bind) -> Iterator[Connection]:
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            yield conn
    else:
        yield bind


#: The PostgreSQL advisory lock a migration holds (the bytes of "hermesOR"):
#: processes migrating one database at once take turns.
_MIGRATION_LOCK = 0x6865726D65734F52


@contextmanager
def _migrating(bind: Bind) -> Iterator[Connection]:
    """A connection holding the database's migration lock, in one transaction.

    Processes that open a store on a database that needs migrating often do
    so at once (a gateway and a cron job after an upgrade): each waits for the
    one before it, then finds the schema at head and does nothing. PostgreSQL:
    an advisory lock for the transaction (the caller's, for a connection it
    passes). SQLite: the write lock from the start (``BEGIN IMMEDIATE``), for an
    engine; a connection passed in is the caller's to have locked.
    """
    if not isinstance(bind, Engine):
        if bind.dialect.name == "postgresql":
            bind.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        yield bind
        return
    with bind.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        yield conn
        conn.commit()


def _run(bind: Bind, fn: Any, *args: Any) -> None:
    config = alembic_config()
    with _migrating(bind) as conn:
        config.attributes["connection"] = conn
        fn(config, *args)


def upgrade(bind: Bind, revision: str = "head") -> None:
    """Migrate the database behind ``bind`` up to ``revision`` (default: head)."""
    _run(bind, command.upgrade, revision)


def downgrade(bind: Bind, revision: str) -> None:
    """Migrate the database behind ``bind`` down to ``revision`` (``base`` drops it all)."""
    _run(bind, command.downgrade, revision)


@cache
def head() -> str:
    """The single head revision of the shipped scripts.

    Raises:
        RuntimeError: The scripts have more than one head (a broken install).
    """
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"hermes_orm migrations must have one head, found {sorted(heads)}")
    return heads[0]


@cache
def _known_revisions() -> frozenset[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return frozenset(rev.revision for rev in script.walk_revisions())


def current(bind: Bind) -> str | None:
    """The revision the database is at, or ``None`` when it has no hermes_orm schema."""
    with _connected(bind) as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def check(bind: Bind) -> None:
    """Refuse a database whose schema is not at :func:`head`.

    Raises:
        SchemaOutOfDateError: Missing or older schema; ``hermes-orm db upgrade`` fixes it.
        SchemaTooNewError: Migrated by a newer hermes_orm.
    """
    revision = current(bind)
    expected = head()
    if revision == expected:
        return
    if revision is not None and revision not in _known_revisions():
        raise SchemaTooNewError(revision)
    raise SchemaOutOfDateError(revision, expected)


def include_name(name: str | None, type_: str, _parent_names: Any = None) -> bool:
    """Alembic ``include_name`` hook that leaves hermes_orm's tables out.

    A host application passes it (or combines it with its own) to
    ``context.configure(include_name=...)`` so its autogenerate never proposes
    to drop or alter the tables hermes_orm migrates itself.
    """
    if type_ == "table" and name is not None:
        return not (name.startswith(TABLE_PREFIX) or name == VERSION_TABLE)
    return True
