"""Run the shipped Alembic migrations from Python, and check a database is current.

The migration scripts live in the repository's top-level ``alembic/`` and ship
inside the package (``hermes_orm/alembic``), so the same revisions run from a
repository checkout, from ``hermes-orm db ...``, from an installed wheel and
from a host application's own Alembic. Two ways inside a host's Alembic:

- side by side: :func:`upgrade` on the host's connection, the revisions
  recording their state in their own version table,
  ``hermes_orm_alembic_version``, so the host's ``alembic_version`` is never
  touched;
- as a branch of the host's history (:data:`VERSION_LOCATION` in its
  ``version_locations``, label :data:`BRANCH`), their state in the host's
  ``alembic_version``.

:func:`check` accepts a database migrated either way.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from functools import cache, wraps
from pathlib import Path
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar, cast

import alembic.context
import alembic.op
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util.exc import CommandError
from sqlalchemy import URL, Connection, Engine, MetaData, inspect, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool, SingletonThreadPool

from hermes_orm import _dialects, _partitions, _retry, _sa
from hermes_orm._dialects import refuse_shared_transaction, store_schema
from hermes_orm.errors import (
    DatabaseError,
    InvalidArgumentError,
    InvalidURLError,
    SchemaManagedByHostError,
    SchemaOutOfDateError,
    SchemaTooNewError,
)
from hermes_orm.models import Base

VERSION_TABLE = "hermes_orm_alembic_version"
#: The version table of a host whose history runs the revisions as a branch.
HOST_VERSION_TABLE = "alembic_version"

logger = logging.getLogger(__name__)


#: The shipped scripts: ``hermes_orm/alembic`` (in a checkout, a link to the
#: repository's top-level ``alembic/``).
SCRIPT_LOCATION = str(
    Path(__file__).with_name("alembic")
    if Path(__file__).with_name("alembic").joinpath("env.py").is_file()
    # A checkout whose git wrote the link as a plain file (Windows without symlinks).
    else Path(__file__).resolve().parents[1] / "alembic"
)
#: Where a host's Alembic finds the revisions to run them as a branch of its own
#: history: ``version_locations = %(here)s/versions hermes_orm:alembic/versions``.
VERSION_LOCATION = "hermes_orm:alembic/versions"
#: The branch label of the revisions: ``alembic upgrade hermes_orm@head``.
BRANCH = "hermes_orm"
#: The prefix of the names of hermes_orm's tables. Only the exact names below
#: are hermes_orm's (:func:`owns_table`): a host's ``hermes_invoices`` is its own.
TABLE_PREFIX = "hermes_"
#: The tables of the models.
MODEL_TABLES = frozenset(Base.metadata.tables)
#: Tables and views of the search index (SQLite's FTS5 tables and their shadow
#: tables), written as SQL by the migrations, outside the models.
SEARCH_TABLES = frozenset(
    {
        f"{table}{suffix}"
        for table in ("hermes_search", "hermes_search_cjk")
        for suffix in ("", "_config", "_content", "_data", "_docsize", "_idx")
    }
    | {"hermes_search_source", "hermes_search_cjk_source"}
)
#: The search index's indexes and columns on PostgreSQL, outside the models too.
SEARCH_INDEXES = frozenset(
    {"ix_hermes_search_cjk", "ix_hermes_search_cjk_id", "ix_hermes_search_vector"}
)
SEARCH_COLUMNS = frozenset({"search_cjk", "search_vector"})
#: With the partitions of ``hermes_messages`` (:func:`partition_messages`) and the
#: table's old self while it is rebuilt.
_OWNED_TABLES = (
    MODEL_TABLES | SEARCH_TABLES | _partitions.PARTITION_NAMES | {VERSION_TABLE, _partitions.ASIDE}
)

Bind = Engine | Connection
_P = ParamSpec("_P")
_T = TypeVar("_T")


def _takes_a_url(
    name: str, *, creates: Callable[..., None] | None = None
) -> Callable[
    [Callable[Concatenate[Bind, _P], _T]], Callable[Concatenate[Bind | str | URL, _P], _T]
]:
    """Let a function of a ``bind`` take a database URL too: an engine is made for the call.

    ``name``: the function as the user calls it, for the errors. Unless it
    ``creates`` the database, a SQLite file not made yet is not created: the
    function looks at an empty database instead, which is what the file would hold.
    ``creates``: a check of the function's other arguments, run before such a
    file is created for it (it raises what the function would).

    The function then raises, before it connects:
        InvalidArgumentError: ``bind`` is not a URL, an Engine or a Connection
            (an ``AsyncEngine`` included: its connections run it through
            ``run_sync``).
        InvalidURLError: ``bind`` is a str that is no database URL, or a URL
            of an asyncio driver.
    """
    run_sync = f"on a connection of an AsyncEngine, `await conn.run_sync({name})`"

    def decorate(
        fn: Callable[Concatenate[Bind, _P], _T],
    ) -> Callable[Concatenate[Bind | str | URL, _P], _T]:
        @wraps(fn)
        def bound(*args: Any, **kwargs: Any) -> _T:
            if "bind" in kwargs:  # (it may be given by name)
                bind = kwargs.pop("bind")
            elif args:
                bind, args = args[0], args[1:]
            else:
                return fn(*args, **kwargs)  # Python says what is missing
            if isinstance(bind, Engine | Connection):
                return _refusals_typed(name, fn, bind, *args, **kwargs)
            if not isinstance(bind, str | URL):
                remedy = f": run it {run_sync}" if hasattr(bind, "sync_engine") else ""
                raise InvalidArgumentError(
                    f"{name}() takes a database URL, an Engine or a Connection, "
                    f"got {type(bind).__name__}{remedy}"
                )
            parsed = _dialects.normalize_url(bind)
            if _dialects.asyncio_driver(parsed):
                raise InvalidURLError(
                    f"{_dialects.safe_url(parsed)}: {name}() needs the URL of a blocking "
                    f"driver (sqlite:///..., postgresql://...); with an asyncio driver, "
                    f"run it {run_sync}"
                )
            url: str | URL = parsed
            if _dialects.missing_sqlite_file(parsed) is not None:
                if creates is None:
                    url = "sqlite://"
                else:
                    creates(*args, **kwargs)
            engine = _dialects.create_store_engine(url, poolclass=NullPool)
            try:
                with _retry.connecting(_dialects.CONNECT_SECONDS):
                    return _refusals_typed(name, fn, engine, *args, **kwargs)
            finally:
                engine.dispose()

        return cast(Callable[Concatenate[Bind | str | URL, _P], _T], bound)

    return decorate


def _refusals_typed(name: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)``, a refusal of the database typed.

    Refused credentials, a database that does not exist, a pooler refusing the
    startup options: raised as :class:`DatabaseError`, as a store tells them,
    with what to do where it is known. A connection lost, a server out of
    reach, or a transient error (a lock, a serialization failure) is raised as
    the driver's: whether a migration committed is then unknown (see
    :func:`upgrade`), and a store runs its own calls (its schema check) again
    on those.
    """
    try:
        return fn(*args, **kwargs)
    except DBAPIError as exc:
        _raise_if_lost(exc)
        if _dialects.is_transient(exc):
            raise
        raise DatabaseError(
            f"{name}(): database error: {_dialects.said(exc)}{_dialects.pooler_hint(exc)}"
        ) from exc


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
def _connected(bind: Bind, schema: str | None = None) -> Iterator[Connection]:
    """A connection on ``bind``; one passed in is left in the transaction state it came in.

    With ``schema``, that schema is first on the connection's ``search_path``
    for the work (:func:`_placed`).
    """
    if isinstance(bind, Engine):
        refuse_shared_transaction(bind.pool)
        with bind.begin() as conn, _placed(conn, schema):
            yield conn
        return
    with _own_transaction(bind), _placed(bind, schema):
        yield bind


@contextmanager
def _placed(conn: Connection, schema: str | None, *, create: bool = False) -> Iterator[None]:
    """Put ``schema`` first on the transaction's ``search_path``; restore it afterwards.

    The revisions name their tables, triggers and indexes without a schema: with
    the schema first, they are created (and found) there. The schema of the
    pg_trgm extension comes next, wherever the database installed it, then the
    path as it was. ``create`` makes the schema if it does not exist yet. The
    path is restored before the transaction goes on with its owner's work.
    """
    if schema is None:
        yield
        return
    quoted = f'"{schema}"'
    # Created only when missing: a role that owns its schema may lack the right
    # to create schemas in the database, which CREATE SCHEMA IF NOT EXISTS checks first.
    if create:
        _refuse_shadowing(conn, schema)
        if _missing_schema(conn, schema):
            conn.exec_driver_sql(f"CREATE SCHEMA {quoted}")
    before = conn.exec_driver_sql("SELECT current_setting('search_path')").scalar()
    path = ", ".join(part for part in (quoted, _extension_schema(conn), before) if part)
    with _search_path(conn, path, before):
        yield


def _refuse_shadowing(conn: Connection, schema: str) -> None:
    """Refuse to put a store's tables where one on the ``search_path`` would find them first.

    ``"$user"`` on the path (as by default) names the schema called as the
    connecting role, before ``public``: tables made there, a store found
    through that path (``schema=None``) would take them for its own.

    Raises:
        InvalidArgumentError: ``schema`` is named as the role, ``"$user"`` is on
            the connection's path, and the path finds another schema's store.
    """
    user, path = conn.exec_driver_sql("SELECT current_user, current_setting('search_path')").one()
    if user != schema:
        return
    found = conn.exec_driver_sql(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass('hermes_sessions')"
    ).scalar()
    if found is None or found == schema:
        return
    names = _path_names(str(path))
    if "$user" not in names:
        return
    # Found through the path, it is on it (refused where it cannot be placed there).
    if found in names and names.index(found) < names.index("$user"):
        return
    raise InvalidArgumentError(
        f'schema {schema!r} is named as the role connecting, and "$user" is on the '
        f"search_path ({path}): its tables would come first there, and the hermes_orm "
        f"store that path finds now (in {found!r}) would find them instead. Name the "
        'schema otherwise, or take "$user" off the search_path; nothing was migrated'
    )


#: One name of a ``search_path``: quoted (``""`` a quote in it), or as written.
_PATH_NAME = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([^,]*?))\s*(?:,|$)')
#: What PostgreSQL folds in a name not quoted: ASCII letters only.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _path_names(path: str) -> list[str]:
    """The schema names of a ``search_path`` setting, as PostgreSQL reads them."""
    names = []
    for match in _PATH_NAME.finditer(path):
        quoted, plain = match.groups()
        if quoted is not None:
            names.append(quoted.replace('""', '"'))
        elif plain:
            names.append(plain.translate(_ASCII_LOWER))
        if match.end() == len(path):
            break
    return names


def _missing_schema(conn: Connection, schema: str | None) -> bool:
    """Whether ``schema`` is named but not in the database (None, the default, always is)."""
    if schema is None:
        return False
    found = conn.execute(text("SELECT to_regnamespace(:s)"), {"s": f'"{schema}"'}).scalar()
    return found is None


@contextmanager
def _extension_found(conn: Connection, schema: str | None) -> Iterator[None]:
    """For revisions run in the default schema, pg_trgm's schema last on the ``search_path``.

    Only if the path lacks it (:func:`_placed` puts it on the path of a schema's).

    Installed by the host in a schema of its own, its operator classes would
    not be found otherwise. A schema holding another store's tables (where a
    store's upgrade into its own schema installed it) cannot go on the path:
    those tables would be found as this one's.

    Raises:
        DatabaseError: pg_trgm is in another hermes_orm store's schema.
    """
    if schema is not None or conn.dialect.name != "postgresql":
        yield
        return
    before = conn.exec_driver_sql("SELECT current_setting('search_path')").scalar()
    extension = _extension_schema(conn)
    searched = conn.exec_driver_sql("SELECT current_schemas(true)").scalar() or []
    if extension is None or extension.strip('"') in searched:
        yield
        return
    found = conn.execute(text("SELECT to_regclass(:t)"), {"t": f"{extension}.{VERSION_TABLE}"})
    if found.scalar() is not None:
        raise DatabaseError(
            f"pg_trgm is installed in schema {extension}, which holds another hermes_orm "
            "store's tables, and this migration's search_path does not name it: move the "
            "extension where every store finds it (ALTER EXTENSION pg_trgm SET SCHEMA "
            "public), then migrate again; nothing was migrated"
        )
    with _search_path(conn, f"{before}, {extension}" if before else extension, before):
        yield


@contextmanager
def extension_on_path(conn: Connection) -> Iterator[None]:
    """pg_trgm found by hermes_orm's revisions run as a branch of a host's history.

    Three of them create trigram indexes, naming pg_trgm's operator class
    without a schema: a database that has the extension in a schema its
    ``search_path`` does not name (as some managed services install it) fails
    them (``operator class "gin_trgm_ops" does not exist``, nothing migrated).
    hermes_orm's own runner looks for it; a host's ``env.py`` wraps its run of
    the migrations, inside their transaction::

        with context.begin_transaction(), hermes_orm.migrations.extension_on_path(connection):
            context.run_migrations()

    For the while, the extension's schema is last on the transaction's path; a
    no-op where the path finds it already, and on SQLite. Side by side, the
    host's own revisions need none of this (:func:`upgrade` finds the extension
    itself): leave it out, for an extension the upgrade installed in the store's
    own schema is refused here.

    Raises:
        DatabaseError: pg_trgm is in another hermes_orm store's schema.
    """
    with _extension_found(conn, None):
        yield


def _extension_schema(conn: Connection) -> str | None:
    """The schema the database installed pg_trgm in (quoted); None when it is not installed."""
    found = conn.exec_driver_sql(
        "SELECT quote_ident(n.nspname) FROM pg_extension e "
        "JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_trgm'"
    ).scalar()
    return None if found is None else str(found)


@contextmanager
def _search_path(conn: Connection, path: str, before: Any) -> Iterator[None]:
    """``path`` as the transaction's ``search_path`` for the while; ``before`` afterwards."""
    conn.execute(text("SELECT set_config('search_path', :path, true)"), {"path": path})
    try:
        yield
    finally:
        if conn.in_transaction() and not conn.invalidated:
            try:
                with conn.begin_nested():  # a failed transaction cannot run it: nothing to restore
                    conn.execute(
                        text("SELECT set_config('search_path', :path, true)"), {"path": before}
                    )
            except DBAPIError:
                pass


@contextmanager
def _own_transaction(conn: Connection) -> Iterator[None]:
    """End the transaction the work began on a caller's connection, if it began one.

    A host's ``env.py`` that calls :func:`upgrade` on its connection before its
    own ``context.begin_transaction()`` must get the connection back with no
    transaction open: Alembic runs the host's migrations inside a transaction
    it finds open and never commits it, so they would be rolled back. A
    transaction the caller had open is the caller's to end.
    """
    began = not conn.in_transaction()
    try:
        yield
    except BaseException:
        if began and conn.in_transaction():
            conn.rollback()
        raise
    if began and conn.in_transaction():
        conn.commit()


#: Seconds of waiting for the migration lock worth a line in the log.
_LONG_WAIT = 1.0
#: Seconds between the log's lines while a migration waits for another's.
_TELL_EVERY = 30.0
#: Seconds between tries of SQLite's write lock, at least (``busy_timeout`` waits within each).
_SQLITE_RETRY = 0.1

#: The PostgreSQL advisory lock a migration holds (the bytes of "hermesOR"):
#: processes migrating one database at once take turns.
_MIGRATION_LOCK = 0x6865726D65734F52


def _refuse_autocommit(bind: Bind) -> None:
    """Refuse a ``bind`` on which every statement commits alone, before anything runs.

    The revisions run in one transaction under the migration lock: on such a
    bind the lock would be gone at once and a failure would leave revisions
    half applied. Detected as the stores detect it (:func:`_sa.isolation_level`).

    Raises:
        InvalidArgumentError: ``bind`` is set to ``isolation_level="AUTOCOMMIT"``
            (its driver's own autocommit: see :func:`_refuse_driver_autocommit`).
    """
    if (_sa.isolation_level(bind) or "").upper() == "AUTOCOMMIT":
        raise InvalidArgumentError(_AUTOCOMMITS.format("isolation_level='AUTOCOMMIT'"))


_AUTOCOMMITS = (
    "this engine or connection autocommits every statement ({}), so no migration "
    "could run whole or not at all on it, nor hold the migration lock: migrate on an "
    "engine or connection without it"
)


def _refuse_driver_autocommit(conn: Connection) -> None:
    """Refuse a connection whose driver commits each statement (its ``autocommit``).

    :func:`_refuse_autocommit` sees SQLAlchemy's setting; ``autocommit=True``
    among an engine's ``connect_args`` is seen on its connections only: psycopg's,
    and sqlite3's (Python 3.12+), whose ``commit()`` and ``rollback()`` then do
    nothing, so the migration's own ``BEGIN IMMEDIATE`` would never end. (SQLite's
    ``isolation_level=None`` is no such thing: that ``BEGIN`` holds the statements
    together, and its commit ends it.)

    sqlite3's ``autocommit=False`` (a transaction open at all times) is refused
    too: the migration's ``BEGIN IMMEDIATE`` could never begin.

    Raises:
        InvalidArgumentError: It autocommits, or keeps a transaction open; nothing
            was run on it.
    """
    if _dialects.driver_autocommits(conn):
        raise InvalidArgumentError(_AUTOCOMMITS.format("autocommit=True among its connect_args"))
    if conn.dialect.name == "sqlite":
        _dialects.check_sqlite_transaction_control(conn.connection.dbapi_connection)


@contextmanager
def _told_while_waiting(asked: float) -> Iterator[None]:
    """Log a line every :data:`_TELL_EVERY` seconds until the block ends."""
    done = threading.Event()

    def tell() -> None:
        while not done.wait(_TELL_EVERY):
            logger.warning(
                "waiting for another process's migration of the database (%.0f s so far)",
                time.monotonic() - asked,
            )

    teller = threading.Thread(target=tell, name="hermes_orm-migration-wait", daemon=True)
    teller.start()
    try:
        yield
    finally:
        done.set()
        teller.join()


def _pg_migration_lock(conn: Connection, asked: float) -> None:
    """Take the migration's advisory lock, however long another migration holds it.

    A migration of a large database takes minutes, and one whose process died
    releases the lock with its connection: the wait has no ``lock_timeout``.
    The one in force comes back right after, for the migration's own statements.
    """
    if not conn.exec_driver_sql(f"SELECT pg_try_advisory_xact_lock({_MIGRATION_LOCK})").scalar():
        before = conn.exec_driver_sql("SELECT current_setting('lock_timeout')").scalar()
        conn.exec_driver_sql("SELECT set_config('lock_timeout', '0', true)")
        with _told_while_waiting(asked):
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        conn.execute(text("SELECT set_config('lock_timeout', :before, true)"), {"before": before})
    # Behind PgBouncer the server connection has no lock_timeout of the store's (a
    # startup option): the migration's statements get it for the transaction, as a
    # store's writes do.
    for statement, _ in _dialects.transaction_settings(conn.engine):
        conn.exec_driver_sql(statement)


def _sqlite_write_lock(conn: Connection, asked: float) -> None:
    """``BEGIN IMMEDIATE`` on ``conn``, tried again for as long as the database is locked.

    Each try waits ``busy_timeout``; the one that fails leaves no transaction behind
    (but the caller's, which SQLAlchemy had begun already, if ``conn`` was in one).
    """
    callers = conn.in_transaction()

    def took() -> bool:
        try:
            _dialects.begin_immediate(conn)
        except OperationalError as exc:
            if not _dialects.is_transient(exc):
                raise
            if not callers:
                conn.rollback()
            return False
        return True

    if took():
        return
    with _told_while_waiting(asked):
        while True:
            tried = time.monotonic()
            if took():
                return
            time.sleep(max(0.0, _SQLITE_RETRY - (time.monotonic() - tried)))


def _lock_migration(conn: Connection) -> None:
    """Take the database's migration lock on ``conn``, waiting as long as it takes.

    PostgreSQL: the advisory lock, for the transaction. SQLite: the write lock,
    by beginning the transaction with ``BEGIN IMMEDIATE``; a connection whose
    driver is in a transaction already is its owner's to have locked.

    A caller's transaction that SQLAlchemy began but the driver has not yet (pysqlite
    begins its own before the first INSERT, UPDATE or DELETE only) is begun here
    too: the revisions' DDL would otherwise each commit on its own, and the
    caller's rollback would undo the version row alone, leaving tables and
    revision apart.
    """
    asked = time.monotonic()
    if conn.dialect.name == "postgresql":
        _pg_migration_lock(conn, asked)
    elif conn.dialect.name == "sqlite" and (
        not conn.in_transaction()
        or _sa.driver_in_transaction(conn.connection.dbapi_connection) is False
    ):
        _sqlite_write_lock(conn, asked)
    waited = time.monotonic() - asked
    if waited >= _LONG_WAIT:
        logger.info("waited %.1f s for another process's migration of the database", waited)


@contextmanager
def _migrating(
    bind: Bind, schema: str | None = None, *, create: bool = True
) -> Iterator[Connection]:
    """A connection holding the database's migration lock, in one transaction.

    Processes that open a store on a database that needs migrating often do
    so at once (a gateway and a cron job after an upgrade): each waits for the
    one before it, however long it takes, then finds the schema at head and
    does nothing (:func:`_lock_migration`). ``create``: make ``schema`` if it
    is not there yet.
    """
    if not isinstance(bind, Engine):
        _refuse_driver_autocommit(bind)
        began = not bind.in_transaction()
        with _own_transaction(bind):
            if began:
                _read_committed(bind)
            _lock_migration(bind)
            with _placed(bind, schema, create=create):
                yield bind
        return
    refuse_shared_transaction(bind.pool)
    with bind.connect() as conn:
        _refuse_driver_autocommit(conn)
        _read_committed(conn)
        _lock_migration(conn)
        with _placed(conn, schema, create=create):
            yield conn
        conn.commit()


def _read_committed(conn: Connection) -> None:
    """Run the migration's transaction, not begun yet, at READ COMMITTED (PostgreSQL).

    At REPEATABLE READ or SERIALIZABLE (an engine's ``isolation_level``), the
    statement that takes the migration lock would fix the transaction's
    snapshot before it waits: once the migration before it committed, this
    one would not see it, and would run the same revisions again.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")


@contextmanager
def _host_alembic_kept() -> Iterator[None]:
    """Leave a host's running Alembic command as it was found.

    A command installs its ``EnvironmentContext`` and ``Operations`` as the
    module-level proxies ``alembic.context`` and ``alembic.op`` and removes
    them when it ends. Run from a host's ``env.py`` (or from one of its
    revisions), the nested command would remove the host's proxies and its
    ``context.configure`` would then fail: the modules' names are put back as
    they were.
    """
    saved = [(vars(module), dict(vars(module))) for module in (alembic.context, alembic.op)]
    try:
        yield
    finally:
        for names, before in saved:
            for name in names.keys() - before.keys():
                del names[name]
            names.update(before)


@contextmanager
def _prepared(
    bind: Bind, schema: str | None, *, create: bool = True
) -> Iterator[tuple[Connection, str | None, _Located]]:
    """The connection the revisions run on: locked, placed, its revision read.

    ``schema`` as for :func:`upgrade`; yielded as resolved. ``create``: make it
    if it is not there yet.

    Raises:
        InvalidArgumentError: ``bind`` autocommits (nothing run).
    """
    _refuse_autocommit(bind)
    schema = store_schema(bind, schema)
    with _migrating(bind, schema, create=create) as conn:
        yield conn, schema, _located(conn, schema)


def _refuse(
    conn: Connection, schema: str | None, before: _Located, downgrade_to: str | None = None
) -> None:
    """Refuse to run the revisions on a database they would break (a downgrade to ``downgrade_to``).

    Raises:
        SchemaManagedByHostError: Their state is in the host's ``alembic_version``.
        SchemaTooNewError: A revision this hermes_orm does not know.
        DatabaseError: Tables named as hermes_orm's are there, but no revision of it.
    """
    if before.table == HOST_VERSION_TABLE:
        if downgrade_to is None:
            raise SchemaManagedByHostError(before.revision)
        # The branch's own: its base, or steps back from its own head (a revision
        # id names itself).
        relative = downgrade_to == "base" or downgrade_to.lstrip("-").isdigit()
        target = f"hermes_orm@{downgrade_to}" if relative else downgrade_to
        raise SchemaManagedByHostError(before.revision, f"downgrade {target}")
    if before.revision is not None and before.revision not in _known_revisions():
        raise SchemaTooNewError(before.revision)
    if before.revision is None:
        _refuse_unversioned_tables(conn, schema)


@contextmanager
def migration_connection(bind: Bind) -> Iterator[tuple[Connection, str | None]]:
    """The connection an Alembic command on hermes_orm's scripts runs the revisions on.

    What :func:`upgrade` does before it runs them, for ``env.py`` when it builds
    its own engine (``alembic -x url=... upgrade head``): the migration lock, the
    store's schema (from ``bind``'s ``schema_translate_map``, as ``?schema=`` in
    a URL sets it) first on the ``search_path`` and created if missing, and the
    same refusals, pg_trgm found off the path. Yields the connection, in the
    transaction committed at the end, and the schema for ``version_table_schema``.
    """
    with _prepared(bind, None) as (conn, schema, before):
        _refuse(conn, schema, before)
        with _extension_found(conn, schema):
            yield conn, schema


def _at_head(bind: Bind, given: str | None) -> bool:
    """Whether the schema is at the shipped head, read without the migration lock.

    A store's ``upgrade()`` at start-up mostly has nothing to do: it need not
    wait for the lock (on SQLite, the write lock any writer holds a while).
    """
    _refuse_autocommit(bind)
    schema = store_schema(bind, given)
    if isinstance(bind, Engine):
        refuse_shared_transaction(bind.pool)
        with bind.connect() as conn:
            return _located(conn, schema).revision == head()
    began = not bind.in_transaction()
    try:
        return _located(bind, schema).revision == head()
    finally:
        if began and bind.in_transaction():
            bind.rollback()  # it only read: the connection is handed back as it came


def _raise_if_lost(exc: DBAPIError) -> None:
    """Raise ``exc`` itself if the connection was lost (or the server is out of reach).

    Whether its transaction was committed is then unknown (a commit may have
    been lost on its way back): the error is not told as "nothing was
    changed" but raised as the driver's, as a connection lost anywhere else,
    which a store's ``upgrade`` tries again. Running a migration again is
    safe: a schema at its target, a table split already, is left as it is.
    """
    if _dialects.is_unreachable(exc):
        raise exc


#: The models' tables each revision creates, which its downgrade drops (a test
#: checks this against what each step of the revisions does).
TABLES_MADE_BY: dict[str, tuple[str, ...]] = {
    "0001_baseline": ("hermes_sessions", "hermes_messages"),
    "0002_model_usage_and_meta": ("hermes_session_model_usage", "hermes_meta"),
    "0008_hermes_gateway_and_locks": (
        "hermes_gateway_routing",
        "hermes_compression_locks",
        "hermes_telegram_topic_bindings",
        "hermes_telegram_topic_mode",
    ),
    "0017_imported_ledger": ("hermes_imported",),
}


def _host_references(conn: Connection) -> list[tuple[str, str]]:
    """SQLite: the other tables' foreign keys to the models' tables there, as (table, ours).

    PostgreSQL refuses to drop a table another table's foreign key names;
    SQLite drops it, after deleting its rows as each foreign key's ``ON
    DELETE`` says (with foreign keys on): the host's rows would be deleted, or
    their column cleared. Empty on PostgreSQL, which needs no check. (SQLite's
    names are ASCII case-insensitive: compared lower-cased.)
    """
    if conn.dialect.name != "sqlite":
        return []
    tables = list(
        conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
        ).scalars()
    )
    present = {table.lower() for table in tables}
    found = []
    for table in tables:
        if table.lower() in MODEL_TABLES:
            continue
        quoted = table.replace('"', '""')
        for row in conn.exec_driver_sql(f'PRAGMA foreign_key_list("{quoted}")'):
            ours = str(row[2]).lower()
            if ours in MODEL_TABLES and ours in present:
                found.append((table, ours))
    return found


def _dangling(references: list[tuple[str, str]], dropped: Iterable[str], target: str) -> None:
    """Refuse a migration to ``target`` dropping a table of ours ``references`` name.

    Raises:
        DatabaseError: It does.
    """
    gone = set(dropped)
    for table, ours in references:
        if ours in gone:
            raise DatabaseError(
                f"cannot migrate to {target!r}: table {table} has a foreign key to {ours}, "
                "which this migration drops (SQLite would delete or change its rows); drop "
                "the foreign key first; nothing was migrated"
            )


def _drops(before: str | None, target: str) -> list[str] | None:
    """The models' tables a downgrade from ``before`` to ``target`` drops (None: unknown)."""
    if before is None:
        return []
    script = ScriptDirectory.from_config(alembic_config())
    try:
        undone = [rev.revision for rev in script.iterate_revisions(before, target)]
    except Exception:  # a relative or odd target: Alembic itself says what is wrong
        return None
    return [table for revision in undone for table in TABLES_MADE_BY.get(revision, ())]


#: How many times a migration of its own transaction is run when PostgreSQL ends it to
#: break a deadlock with the stores' writers (the last try's error is raised).
_DEADLOCK_TRIES = 3


def _run(
    bind: Bind,
    given: str | None,
    fn: Any,
    revision: Any,
    *,
    then: Callable[[Connection, str | None], Any] | None = None,
) -> bool:
    """:func:`_run_once`, run again when PostgreSQL broke a deadlock by ending it.

    A revision takes its tables' locks in its own order (a table's lock, then
    another's ALTER), which writers running meanwhile may take the other way
    round; rolled back whole, the migration runs again once they are through.
    Not on a caller's transaction: there the error is raised, the transaction
    the caller's to end.
    """
    own = not isinstance(bind, Connection) or not bind.in_transaction()
    for tried in range(1, _DEADLOCK_TRIES if own else 1):
        try:
            return _run_once(bind, given, fn, revision, then=then)
        except DatabaseError as exc:
            if _dialects.sqlstate(getattr(exc.__cause__, "orig", None)) != "40P01":
                raise
            logger.warning(
                "hermes_orm migration ended by PostgreSQL to break a deadlock (try %d of %d), "
                "running it again: %s",
                tried,
                _DEADLOCK_TRIES,
                exc,
            )
    return _run_once(bind, given, fn, revision, then=then)


def _run_once(
    bind: Bind,
    given: str | None,
    fn: Any,
    revision: Any,
    *,
    then: Callable[[Connection, str | None], Any] | None = None,
) -> bool:
    """Run Alembic's ``fn`` (upgrade or downgrade) to ``revision`` under the migration lock.

    ``then``: more work for the migration's transaction, once the revisions
    ran (given the connection and the schema). Returns whether the
    transaction ran (False: at the head already, nothing done).
    """
    _check_revision(revision)
    args = (revision,)
    if fn is command.upgrade and args == ("head",) and _at_head(bind, given):
        return False  # a store's upgrade() on start-up, say
    config = alembic_config()
    downgrade = fn is command.downgrade
    with (
        _host_alembic_kept(),
        _prepared(bind, given, create=not downgrade) as (
            conn,
            schema,
            before,
        ),
    ):
        if downgrade and _missing_schema(conn, schema):
            return True  # nothing of hermes_orm's to take down (a mistyped name, say)
        if downgrade and before.revision is None and args == ("base",):
            # Nothing of hermes_orm's to take down, unless tables named as its are
            # there without a revision of its (refused, as an upgrade refuses them):
            # no revision runs, no version table is made, wherever pg_trgm is.
            _refuse_unversioned_tables(conn, schema)
            return True
        if (
            before.table == HOST_VERSION_TABLE
            and fn is command.upgrade
            and args == ("head",)
            and before.revision == head()
        ):
            return False  # at head already: a store's upgrade() on start-up has nothing to do
        _refuse(conn, schema, before, args[0] if fn is command.downgrade else None)
        config.attributes["connection"] = conn
        config.attributes["schema"] = schema
        try:
            # Only a downgrade drops tables: an upgrade reads no foreign keys.
            references = _host_references(conn) if downgrade else []
            dropped = _drops(before.revision, args[0]) if downgrade else []
            if references and dropped is not None:
                _dangling(references, dropped, args[0])  # before anything is written
            if then is None:
                with _extension_found(conn, schema):
                    fn(config, *args)
            else:  # the revisions and what follows are undone together (_in_savepoint)

                def migrate() -> None:
                    with _extension_found(conn, schema):
                        fn(config, *args)
                    then(conn, schema)

                _in_savepoint(conn, migrate)
            if references and dropped is None:  # the tables it dropped, seen afterwards
                left = {table.lower() for table in inspect(conn).get_table_names()}
                _dangling(references, MODEL_TABLES - left, args[0])
            after = _located(conn, schema).revision
        except CommandError as exc:  # a revision Alembic cannot find or reach, nothing run
            raise InvalidArgumentError(f"cannot migrate to {args[0]!r}: {exc}") from None
        except AssertionError:
            # Alembic's walk past the ends of the history upwards ('head+1', 'base+99')
            # fails an assertion, before any revision runs (a downgrade's says so).
            raise InvalidArgumentError(f"cannot migrate to {args[0]!r}: Walked too far") from None
        except DBAPIError as exc:  # the revisions' transaction is rolled back whole
            _raise_if_lost(exc)
            raise DatabaseError(
                f"cannot migrate to {args[0]!r}: {_dialects.said(exc)}; nothing was migrated"
            ) from exc
    if after != before.revision:
        logger.info("hermes_orm schema migrated from %s to %s", before.revision or "base", after)
    return True


def _check_revision(revision: Any) -> None:
    """Refuse a ``revision`` that is no text, or blank.

    Raises:
        InvalidArgumentError: It is.
    """
    if not isinstance(revision, str) or not revision.strip():
        raise InvalidArgumentError(
            f"revision must be 'head', 'base' or a revision id, got {revision!r}"
        )


#: A revision counted from another (``head-1``, ``+2``): resolved against the database.
_RELATIVE = re.compile(r".*[+-]\d+")


def check_upgrade_arguments(
    revision: Any = "head", *, partitions: Any = None, dialect: str = "sqlite"
) -> None:
    """Refuse an upgrade to ``revision`` that names none, or ``partitions`` not for ``dialect``.

    Run before a new SQLite file is made for the upgrade (nothing is left behind).

    Raises:
        InvalidArgumentError: As :func:`upgrade` raises it.
    """
    if partitions is not None:
        _partitions.check_partitions(partitions, dialect)
    _check_revision(revision)
    if _RELATIVE.fullmatch(revision):
        return  # (told as the run tells it)
    try:
        ScriptDirectory.from_config(alembic_config()).revision_map.get_revisions(revision)
    except (ResolutionError, CommandError, AssertionError) as exc:  # ('' fails an assertion)
        raise InvalidArgumentError(f"cannot migrate to {revision!r}: {exc}") from None


def _upgrade_arguments(
    revision: Any = "head", *, schema: Any = None, partitions: Any = None
) -> None:
    check_upgrade_arguments(revision, partitions=partitions)


@_takes_a_url("hermes_orm.upgrade", creates=_upgrade_arguments)
def upgrade(
    bind: Bind, revision: str = "head", *, schema: str | None = None, partitions: int | None = None
) -> None:
    """Migrate the database behind ``bind`` up to ``revision`` (default: head).

    ``schema`` (or ``bind``'s ``schema_translate_map``) places the tables, their
    triggers and indexes, and the version table in that PostgreSQL schema,
    created if missing; extensions stay wherever the database has them.

    ``partitions`` (PostgreSQL): then hash-partition ``hermes_messages`` by
    ``session_id`` into that many partitions, as :func:`partition_messages`,
    in the migration's transaction: a split the database refuses leaves the
    schema at the revision it was.

    On a connection, the work is done in the transaction the connection is in,
    or in one of its own that it commits: the connection is handed back with
    no transaction open if it had none, so a host's ``env.py`` may call this
    before (or after) running its own migrations on the same connection.

    The migration holds the database's migration lock: another process
    migrating it at the same time waits for it, however long it takes (a
    warning on the ``hermes_orm`` log every 30 s meanwhile), then finds the
    schema at head; a database at the head already is left without taking the
    lock. PostgreSQL: an advisory lock for the transaction. SQLite:
    the write lock, by beginning the transaction with ``BEGIN IMMEDIATE``; on a
    connection already in a transaction, the caller's to have taken.

    Raises:
        SchemaManagedByHostError: The revisions run as a branch of the host's
            history (their state is in its ``alembic_version``): the host's
            ``alembic upgrade hermes_orm@head`` migrates them.
        InvalidArgumentError: ``partitions`` is not an int from 2 to 1024, or
            not on PostgreSQL, or ``revision`` names no revision, or ``bind``
            autocommits (``isolation_level="AUTOCOMMIT"``); raised before
            anything is migrated.
        SchemaTooNewError: The database was migrated by a newer hermes_orm.
        DatabaseError: Tables named as hermes_orm's are in the database (or
            schema) with no hermes_orm revision recorded: someone else's, or
            made without the migrations; nothing is written. Or the database
            refused a revision; nothing is migrated.
        sqlalchemy.exc.DBAPIError: The connection was lost, or the server is
            out of reach: whether the migration was committed is unknown;
            upgrading again is safe.
    """
    if partitions is None:
        _run(bind, schema, command.upgrade, revision)
        return
    count = _partitions.check_partitions(partitions, bind.dialect.name)

    def split(conn: Connection, placed: str | None) -> bool:
        # In the migration's transaction: refused, it leaves the schema as it was.
        return _split(conn, count, placed)

    if not _run(bind, schema, command.upgrade, revision, then=split):
        partition_messages(bind, count, schema=schema)  # nothing to migrate: the split alone


@_takes_a_url("hermes_orm.migrations.partition_messages")
def partition_messages(bind: Bind, partitions: int, *, schema: str | None = None) -> bool:
    """Hash-partition ``hermes_messages`` by ``session_id`` into ``partitions`` (PostgreSQL).

    Every hot query names its session, so each reads and writes one partition.
    The table is rebuilt in one transaction under the migration lock (its
    rows copied, its indexes, triggers and constraints made again); readers
    and writers of messages wait for it. Its primary key becomes ``(id,
    session_id)``. A table already split into ``partitions`` is left as it is.
    Its owner, comment, triggers' states, storage settings, statistics
    targets and extended statistics are carried over; privileges granted on
    the table itself are not: grant them again. A table with row-level
    security, policies, publications, rules, a replica identity other than
    the default, or identity or generated columns is refused: the new one
    would have none (see docs/scale-out.md).

    Returns:
        Whether the table was rebuilt.

    Raises:
        InvalidArgumentError: ``partitions`` is not an int from 2 to 1024, not
            on PostgreSQL, the table is split into another number already, or
            ``bind`` autocommits.
        SchemaOutOfDateError: There is no ``hermes_messages`` yet (in ``schema``).
        DatabaseError: The database refused the rebuild (objects of the
            application depend on the table), or the table has what the
            rebuild would drop (above); nothing is changed.
        sqlalchemy.exc.DBAPIError: The connection was lost, or the server is
            out of reach: whether the split was committed is unknown; running
            it again is safe.
    """
    _partitions.check_partitions(partitions, bind.dialect.name)
    _refuse_autocommit(bind)
    schema = store_schema(bind, schema)
    with _migrating(bind, schema) as conn:
        return _in_savepoint(conn, lambda: _split(conn, partitions, schema))


def _in_savepoint(conn: Connection, work: Callable[[], _T]) -> _T:
    """``work()`` in a savepoint of ``conn``'s transaction, rolled back to if it fails.

    On a caller's transaction (a host's ``env.py``), a failure the server did
    not see (an error of the driver) would otherwise leave what ``work`` did
    so far in it, for the caller to commit; one it did see would leave the
    transaction unusable.
    """
    savepoint = conn.begin_nested()
    try:
        result = work()
    except BaseException:
        if savepoint.is_active and not conn.invalidated:
            with suppress(Exception):  # (the error raised tells what happened)
                savepoint.rollback()
        raise
    savepoint.commit()
    return result


def _split(conn: Connection, partitions: int, schema: str | None) -> bool:
    """:func:`_partitions.partition` in ``conn``'s transaction (callers undo it if it fails).

    Raises:
        SchemaOutOfDateError: There is no ``hermes_messages`` (in ``schema``).
        DatabaseError: The database refused the rebuild (its error, redacted).
        sqlalchemy.exc.DBAPIError: The connection was lost.
    """
    try:
        done = _partitions.partition(conn, partitions, schema)
    except SchemaOutOfDateError as exc:  # no hermes_messages: the head is what it needs
        raise SchemaOutOfDateError(exc.current, head()) from None
    except DBAPIError as exc:
        _raise_if_lost(exc)
        # 2BP01: the table is renamed hermes_messages_unpartitioned while it is
        # rebuilt, and dropping it (or its primary key) is refused.
        depends = _dialects.sqlstate(exc.orig) == "2BP01"
        remedy = (
            " (objects of the application depend on hermes_messages, such as a view or a "
            "foreign key: drop them, partition, then make them again)"
            if depends
            else ""
        )
        raise DatabaseError(
            f"cannot split hermes_messages into {partitions} partitions: "
            f"{_dialects.said(exc)}{remedy}; nothing was changed"
        ) from exc
    if done:
        logger.info("hermes_messages split into %d hash partitions by session_id", partitions)
    return done


@_takes_a_url("hermes_orm.downgrade")
def downgrade(bind: Bind, revision: str, *, schema: str | None = None) -> None:
    """Migrate the database behind ``bind`` down to ``revision`` (``base`` drops it all).

    Raises:
        SchemaManagedByHostError, SchemaTooNewError, DatabaseError: As for :func:`upgrade`.
        InvalidArgumentError: ``revision`` names no revision below the current one,
            or ``bind`` autocommits.
    """
    _run(bind, schema, command.downgrade, revision)


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


#: How hermes_orm names its revisions (0001_baseline, ...).
_OUR_NAMING = re.compile(r"\d{4}_[a-z0-9_]+")


class _Located(NamedTuple):
    """Where the database records its hermes_orm revision, and which it is."""

    revision: str | None
    #: VERSION_TABLE (side by side), HOST_VERSION_TABLE (a branch of the
    #: host's history), or None (no hermes_orm schema).
    table: str | None


def _versions(conn: Connection, table: str, schema: str | None = None) -> list[str]:
    context = MigrationContext.configure(
        conn, opts={"version_table": table, "version_table_schema": schema}
    )
    return list(context.get_current_heads())


def _located(conn: Connection, schema: str | None = None) -> _Located:
    """The hermes_orm revision of the database, and the version table holding it.

    Side by side, the revisions record themselves in :data:`VERSION_TABLE`.
    Run as a branch of a host's history, they share the host's
    ``alembic_version`` with the host's own revisions: the one of ours there is
    the revision. Tables of ours with a revision named as ours are but unknown
    were migrated by a newer hermes_orm. A schema of their own is side by side only.
    """
    own = _versions(conn, VERSION_TABLE, schema)
    if own:
        return _Located(own[0], VERSION_TABLE)
    inspector = inspect(conn)
    if schema is not None or not inspector.has_table(HOST_VERSION_TABLE):
        return _Located(None, None)  # (a branch of the host's history is never placed)
    shared = _versions(conn, HOST_VERSION_TABLE)
    if not (
        inspector.has_table("hermes_sessions")
        and "flushed_idx" in {column["name"] for column in inspector.get_columns("hermes_sessions")}
    ):
        # Every revision of ours leaves a sessions table with our cursor: without one,
        # a revision there named as one of ours (a host's own 0001_baseline) is the host's.
        return _Located(None, None)
    known = _known_revisions()
    ours = [revision for revision in shared if revision in known]
    if ours:
        return _Located(ours[0], HOST_VERSION_TABLE)
    # Named as ours are (NNNN_words), numbered past ours: a newer hermes_orm's. The
    # host's own revisions (its 0003_add_users) are not ours to report.
    last = max(int(revision[:4]) for revision in known)
    newer = [
        revision
        for revision in shared
        if _OUR_NAMING.fullmatch(revision) and int(revision[:4]) > last
    ]
    if newer:
        return _Located(", ".join(sorted(newer)), HOST_VERSION_TABLE)
    return _Located(None, None)


def _refuse_unversioned_tables(conn: Connection, schema: str | None) -> None:
    """Refuse a database (or schema) holding tables named as ours with no revision of ours.

    The revisions would fail half-way on the first of them ("already exists"),
    and ``hermes-orm db upgrade`` cannot fix that: they are someone else's
    tables (a host's ``hermes_meta``), or hermes_orm's made without its
    migrations (``create_all``) or left without their version table.

    Raises:
        DatabaseError: Such tables are there.
    """
    found = sorted(
        name
        for name in inspect(conn).get_table_names(schema=schema)
        if owns_table(name, conn.dialect.name) and name != VERSION_TABLE  # (emptied by a downgrade)
    )
    if not found:
        return
    where = f"schema {schema!r}" if schema is not None else "the database"
    shared = (
        _versions(conn, HOST_VERSION_TABLE)
        if schema is None and inspect(conn).has_table(HOST_VERSION_TABLE)
        else []
    )
    theirs = f"; {HOST_VERSION_TABLE} holds {', '.join(sorted(shared))}, not a revision of ours"
    ours = (
        f"{VERSION_TABLE} is empty"
        if inspect(conn).has_table(VERSION_TABLE, schema=schema)
        else f"no {VERSION_TABLE}"
    )
    # A revision of the host's that depends on ours (depends_on, a merge) leaves only
    # its own in alembic_version: our revision is then nowhere to be read.
    depended = (
        f". If a revision of yours depends on hermes_orm's (depends_on, or a merge of the "
        f"branches), {HOST_VERSION_TABLE} names only yours: keep the branches apart "
        "(see the README: as a branch of your history)"
        if shared
        else ""
    )
    raise DatabaseError(
        f"{where} has tables named as hermes_orm's ({', '.join(found)}) but no hermes_orm "
        f"schema revision ({ours}{theirs if shared else ''}): they are not "
        "hermes_orm's, or were made without its migrations, and migrating would collide "
        "with them; nothing was changed. Move or rename them, or give hermes_orm another "
        f"database (or PostgreSQL schema, schema=...){depended}"
    )


@_takes_a_url("hermes_orm.migrations.current")
def current(bind: Bind, *, schema: str | None = None) -> str | None:
    """The revision the database is at, or ``None`` when it has no hermes_orm schema.

    Found in hermes_orm's own version table, or in the host's ``alembic_version``
    for revisions run as a branch of the host's history.
    """
    schema = store_schema(bind, schema)
    with _connected(bind, schema) as conn:
        return _located(conn, schema).revision


@_takes_a_url("hermes_orm.check_schema")
def check(bind: Bind, *, schema: str | None = None) -> None:
    """Refuse a database whose schema is not at :func:`head`.

    Either way of migrating is accepted: side by side or as a branch.

    Raises:
        SchemaOutOfDateError: Missing or older schema; ``hermes-orm db upgrade``
            (or, for a branch, the host's ``alembic upgrade hermes_orm@head``) fixes it.
        SchemaTooNewError: Migrated by a newer hermes_orm.
        DatabaseError: Tables named as hermes_orm's with no hermes_orm revision
            (see :func:`upgrade`): an upgrade would not fix it.
    """
    schema = store_schema(bind, schema)
    fix = None
    with _connected(bind, schema) as conn:
        located = _located(conn, schema)
        revision = located.revision
        if revision is None:
            _refuse_unversioned_tables(conn, schema)  # an upgrade would fail on them
            fix = _fix_of_a_thread_s_own_memory(conn)
    expected = head()
    if revision == expected:
        return
    if revision is not None and revision not in _known_revisions():
        raise SchemaTooNewError(revision)
    raise SchemaOutOfDateError(
        revision, expected, branch=located.table == HOST_VERSION_TABLE, fix=fix
    )


def _fix_of_a_thread_s_own_memory(conn: Connection) -> str | None:
    """What to do about an empty in-memory database each thread has one of (None: not one).

    SQLAlchemy's default pool for ``sqlite://`` (``SingletonThreadPool``) opens
    a database for each thread: the one the application migrated is another
    thread's.
    """
    if not isinstance(conn.engine.pool, SingletonThreadPool) or not _dialects.sqlite_in_memory(
        conn.engine.url
    ):
        return None
    return (
        "`hermes_orm.upgrade(engine)` in this thread: the engine's pool (SingletonThreadPool, "
        "SQLAlchemy's default for an in-memory database) gives each thread a database of its "
        "own. To share one, make the engine with poolclass=StaticPool and "
        'connect_args={"check_same_thread": False}, or let hermes_orm make it from the URL'
    )


def owns_table(name: str | None, dialect: str | None = None) -> bool:
    """Whether hermes_orm's migrations make (and may drop) a table of that name.

    The exact names: the models' tables, the search index's, the partitions of
    ``hermes_messages`` and its version table; not every name that starts with
    ``hermes_``, which a host's own tables may. On ``dialect`` ``postgresql``
    the search index's tables (SQLite's FTS5 tables) are not among them.
    """
    if name is None or (dialect == "postgresql" and name in SEARCH_TABLES):
        return False
    return name in _OWNED_TABLES


def _migrated_dialect() -> str | None:
    """The dialect of the Alembic run under way (a host's autogenerate), if any."""
    try:
        return str(alembic.context.get_context().dialect.name)
    except Exception:  # no Alembic run under way (NameError from its proxy, among others)
        return None


def only_hermes_objects(name: str | None, type_: str, _parent_names: Any = None) -> bool:
    """Alembic ``include_name`` hook that keeps hermes_orm's own tables only.

    hermes_orm's autogenerate (``env.py``, :func:`differences`) compares its
    models with these and never proposes to drop a host's table; the search
    index, which the revisions write as SQL the models do not describe, is
    left out too.
    """
    if type_ == "table":
        return name in MODEL_TABLES
    if type_ == "column":
        return name not in SEARCH_COLUMNS
    if type_ == "index":
        return name not in SEARCH_INDEXES
    return True


@_takes_a_url("hermes_orm.migrations.differences")
def differences(bind: Bind, *, schema: str | None = None) -> list[Any]:
    """What hermes_orm's autogenerate would change in the database's hermes_orm tables.

    Empty when the tables match the models, whichever way they were migrated;
    the host's tables are never looked at. ``schema`` as for :func:`upgrade`.
    """
    schema = store_schema(bind, schema)
    opts: dict[str, Any] = {
        "include_name": only_hermes_objects,
        "compare_type": True,
        "compare_server_default": False,
    }
    # The models' own tables (a host's models on hermes_orm's Base are the host's),
    # placed in the schema if one is given.
    target = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        if not owns_table(table.name):
            continue
        if schema is None:
            table.to_metadata(target)
        else:
            table.to_metadata(target, schema=schema)
    if schema is not None:
        # Compared with that schema only.

        def in_schema(name: str | None, type_: str, parents: Any) -> bool:
            if type_ == "schema":
                return name == schema
            return only_hermes_objects(name, type_, parents)

        opts.update(include_schemas=True, include_name=in_schema)
    with _connected(bind) as conn:
        context = MigrationContext.configure(conn, opts=opts)
        found: list[Any] = compare_metadata(context, target)
    return found


def include_name(name: str | None, type_: str, _parent_names: Any = None) -> bool:
    """Alembic ``include_name`` hook that leaves hermes_orm's tables out.

    A host application passes it (or combines it with its own) to
    ``context.configure(include_name=...)`` so its autogenerate never reads,
    drops or alters the tables hermes_orm migrates itself; tables whose names
    merely start with ``hermes_`` stay the host's (:func:`owns_table`). With
    hermes_orm's models in the host's ``target_metadata`` too, pass
    :func:`include_object` as well.
    """
    if type_ == "table":
        return not owns_table(name, _migrated_dialect())
    return True


def include_object(
    object_: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic ``include_object`` hook that leaves hermes_orm's tables out, models included.

    :func:`include_name` keeps the database's hermes_orm tables from the
    host's autogenerate; a host whose ``target_metadata`` holds hermes_orm's
    models as well (its models subclass :class:`hermes_orm.models.Base`, or it
    lists ``Base.metadata``) passes this too, to
    ``context.configure(include_object=...)``, or its autogenerate proposes to
    create our tables and indexes. Either hook alone also drops our tables
    found in the database.
    """
    dialect = _migrated_dialect()
    if type_ == "table":
        return not owns_table(name, dialect)
    table = getattr(object_, "table", None)
    return not (table is not None and owns_table(getattr(table, "name", None), dialect))
