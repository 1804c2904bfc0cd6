"""What imports of a Hermes ``state.db`` have seen: kept when the destination deletes it.

An import writes a ``hermes_imported`` row for each session it copies or finds
already stored (``kind`` 'session', ``key`` its id), and for each row of
Hermes' other tables (``kind`` the table's name, ``key`` the SHA-256, in hex,
of the JSON list of the row's key, ``version`` its ``updated_at``). The row
stays when the session or row is deleted in hermes_orm's database (by store
mode's Hermes, the store's API, an application's SQL), so a later import of
the same ``state.db`` leaves it deleted instead of copying it back. The table
is new and empty; the downgrade drops it.

Revision ID: 0017_imported_ledger
Revises: 0016_session_history_id
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017_imported_ledger"
down_revision: str | None = "0016_session_history_id"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hermes_imported",
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("seen_at", sa.Double(), nullable=False),
        sa.Column("version", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("kind", "key", name=op.f("pk_hermes_imported")),
    )


def downgrade() -> None:
    op.drop_table("hermes_imported")
