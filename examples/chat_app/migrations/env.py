"""The chat app's Alembic environment, with hermes_orm's tables beside its own.

Side by side (the ``[alembic]`` section), ``hermes_orm.upgrade(connection)``
migrates hermes_orm's tables first, on the same connection, and hands it back
with no transaction open. As a branch (``-n branch``), hermes_orm's revisions
are part of this history and run like the app's own. Both ways, autogenerate
leaves hermes_orm's tables alone (``hermes_orm.migrations.include_name`` and
``include_object``).
"""

import os
from contextlib import nullcontext
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

import hermes_orm
from chat_app.models import Base

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

URL = os.environ.get("CHAT_APP_DATABASE_URL", "sqlite:///chat_app.db")
SIDE_BY_SIDE = config.get_main_option("hermes_orm", "side_by_side") == "side_by_side"


def run_migrations_online() -> None:
    engine = create_engine(URL, poolclass=pool.NullPool)
    with engine.connect() as connection:
        if SIDE_BY_SIDE:
            # On every alembic command (check and downgrade included): at head it
            # only reads the version; hermes_orm's downgrades are its own command.
            hermes_orm.upgrade(connection)
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            include_name=hermes_orm.migrations.include_name,
            include_object=hermes_orm.migrations.include_object,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        # As a branch, hermes_orm's revisions find pg_trgm in a schema of its own too
        # (side by side, hermes_orm.upgrade found it: the app's revisions need nothing).
        on_path = hermes_orm.migrations.extension_on_path
        with context.begin_transaction(), nullcontext() if SIDE_BY_SIDE else on_path(connection):
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("the chat app migrates online only")
run_migrations_online()
