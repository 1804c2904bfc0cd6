"""The order of a message's keys, where it differs from the order it reads back in.

A message reads back with ``role`` and ``content`` first, then the other keys
with a column of their own, then the rest as given. A message whose keys came
in another order keeps that order in ``hermes_messages.key_order`` (a JSON
list of its keys), so it reads back as it was flushed, top-level keys included.
Rows stored before this revision have none and read back in the standard order.

Revision ID: 0007_message_key_order
Revises: 0006_digests_equal_as_dicts
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_message_key_order"
down_revision: str | None = "0006_digests_equal_as_dicts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# JSON as written: ``json`` on PostgreSQL, TEXT on SQLite (as in 0001).
JSON_DOCUMENT = sa.JSON(none_as_null=True).with_variant(sa.Text(), "sqlite")


def upgrade() -> None:
    op.add_column("hermes_messages", sa.Column("key_order", JSON_DOCUMENT, nullable=True))


def downgrade() -> None:
    # In place on both backends; on SQLite that needs 3.35 or newer (2021; a
    # batch copy of the table would trip over the search view that reads it).
    # The upgrade runs on any SQLite.
    op.execute("ALTER TABLE hermes_messages DROP COLUMN key_order")
