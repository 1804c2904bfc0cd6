"""Alembic environment of hermes_orm.

Uses the connection injected through ``config.attributes["connection"]`` when
there is one (``hermes_orm.upgrade``, the CLI, pytest-alembic, a host app), and
only builds an engine otherwise, from ``-x url=...``, ``sqlalchemy.url``,
``HERMES_ORM_URL`` or the embedded SQLite default, in that order: on it, the
revisions run as ``hermes_orm.upgrade`` runs them (one transaction under the
migration lock, in the URL's ``?schema=``). Offline mode (``--sql``) is refused.
"""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, Engine, pool

from hermes_orm._dialects import create_store_engine, default_url
from hermes_orm.errors import InvalidArgumentError
from hermes_orm.migrations import VERSION_TABLE, migration_connection, only_hermes_objects
from hermes_orm.models import Base

config = context.config
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _configure(connection: Connection, schema: str | None) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        # The store's schema (hermes_orm.upgrade(bind, schema=...), ?schema= in a URL).
        version_table_schema=schema,
        include_name=only_hermes_objects,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=False,
        transaction_per_migration=True,
    )


def _url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or default_url()
    )


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _configure(connection, config.attributes.get("schema"))
        with context.begin_transaction():
            context.run_migrations()
        return
    # An injected Engine (some tools pass one) is used as is, never disposed here.
    injected = isinstance(connection, Engine)
    if isinstance(connection, Engine):
        engine = connection
    else:
        engine = create_store_engine(_url(), poolclass=pool.NullPool)
    try:
        # What hermes_orm.upgrade() does first, on the same path: the migration
        # lock, the store's schema (?schema= in the URL) placed, the refusals.
        with migration_connection(engine) as (conn, schema):
            _configure(conn, schema)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        if not injected:
            engine.dispose()


if context.is_offline_mode():
    # 0006 reads the stored messages to recompute their digests in Python: its
    # SQL cannot be written out without a database to read (nor can the schema
    # placement and migration lock of the online path).
    raise InvalidArgumentError(
        "hermes_orm's migrations do not run in offline mode (--sql): revision "
        "0006_digests_equal_as_dicts reads the stored messages to rewrite them. Run "
        "them against the database instead: `alembic -x url=... upgrade head` without "
        "--sql, or `hermes-orm db upgrade`"
    )
run_migrations_online()
