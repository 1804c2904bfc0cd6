"""A session's ``history_id``: what a flush's compare-and-swap checks besides the cursor.

A store that remembers where it left a session's cursor writes on it without
reading it first: the UPDATE moving the cursor compares the stored cursor and
the digest of the message below it with the remembered ones. A session
deleted and made anew under the same id, or rewritten, holding as many
messages with the same last one, passed that comparison, and the flush wrote
on top of a history its list does not continue. ``history_id`` is drawn at
random when a session is made and again when hermes_orm changes its stored
messages other than by appending; the UPDATE compares it too.

The column is added with the default 0 (instant on both backends: no row is
rewritten); sessions made before keep 0 until their history is rewritten. The
downgrade drops it.

Revision ID: 0016_session_history_id
Revises: 0015_search_literal_nul_escape
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016_session_history_id"
down_revision: str | None = "0015_search_literal_nul_escape"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "hermes_sessions",
        sa.Column("history_id", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )


def downgrade() -> None:
    # In place on both backends (SQLite 3.35 or newer, as 0007's downgrade).
    op.execute("ALTER TABLE hermes_sessions DROP COLUMN history_id")
