"""Alembic environment of hermes_orm.

Uses the connection injected through ``config.attributes["connection"]`` when
there is one (``hermes_orm.upgrade``, the CLI, pytest-alembic, a host app), and
only builds an engine otherwise, from ``-x url=...``, ``sqlalchemy.url``,
``HERMES_ORM_URL`` or the embedded SQLite default, in that order.
"""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, Engine, pool

from hermes_orm._dialects import create_store_engine, default_url
from hermes_orm.migrations import VERSION_TABLE, only_hermes_objects
from hermes_orm.models import Base

config = context.config
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        # hermes_orm.upgrade(bind, schema=...) places the tables in a schema.
        version_table_schema=config.attributes.get("schema"),
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


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _configure(connection)
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
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
    finally:
        if not injected:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
