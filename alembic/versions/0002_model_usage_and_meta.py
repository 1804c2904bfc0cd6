"""Per-model usage of sessions, and key/value meta (what a Hermes state.db keeps besides).

Revision ID: 0002_model_usage_and_meta
Revises: 0001_baseline
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_model_usage_and_meta"
down_revision: str | None = "0001_baseline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hermes_session_model_usage",
        sa.Column("session_id", sa.String(length=255), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("billing_provider", sa.Text(), server_default="", nullable=False),
        sa.Column("billing_base_url", sa.Text(), server_default="", nullable=False),
        sa.Column("billing_mode", sa.Text(), server_default="", nullable=False),
        sa.Column("task", sa.Text(), server_default="", nullable=False),
        sa.Column("api_call_count", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "cache_read_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False
        ),
        sa.Column(
            "cache_write_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False
        ),
        sa.Column("reasoning_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("estimated_cost_usd", sa.Double(), server_default=sa.text("0"), nullable=False),
        sa.Column("actual_cost_usd", sa.Double(), server_default=sa.text("0"), nullable=False),
        sa.Column("cost_status", sa.Text(), nullable=True),
        sa.Column("cost_source", sa.Text(), nullable=True),
        sa.Column("first_seen", sa.Double(), nullable=True),
        sa.Column("last_seen", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["hermes_sessions.id"],
            name=op.f("fk_hermes_session_model_usage_session_id_hermes_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "session_id",
            "model",
            "billing_provider",
            "billing_base_url",
            "billing_mode",
            "task",
            name=op.f("pk_hermes_session_model_usage"),
        ),
    )
    op.create_table(
        "hermes_meta",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("value", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_hermes_meta")),
    )


def downgrade() -> None:
    op.drop_table("hermes_meta")
    op.drop_table("hermes_session_model_usage")
