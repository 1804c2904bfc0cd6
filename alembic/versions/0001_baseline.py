"""Baseline: sessions with their flush cursor, and messages at dense positions.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# JSON as written: ``json`` on PostgreSQL, TEXT on SQLite (a column declared JSON
# has NUMERIC affinity there and would turn the document "0.0" into 0).
JSON_DOCUMENT = sa.JSON(none_as_null=True).with_variant(sa.Text(), "sqlite")

revision: str = "0001_baseline"
down_revision: str | None = None
# The label names the branch in a host's history (`alembic upgrade hermes_orm@head`);
# Alembic keeps labels in the scripts, never in the database, so adding it after
# release changes nothing a database recorded.
branch_labels: str | Sequence[str] | None = ("hermes_orm",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hermes_sessions",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("flushed_idx", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("flushed_digest", sa.LargeBinary(), nullable=True),
        sa.Column("message_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("tool_call_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=True),
        sa.Column("session_key", sa.Text(), nullable=True),
        sa.Column("chat_id", sa.Text(), nullable=True),
        sa.Column("chat_type", sa.Text(), nullable=True),
        sa.Column("thread_id", sa.Text(), nullable=True),
        sa.Column("display_name", sa.Text(), nullable=True),
        sa.Column("origin_json", sa.Text(), nullable=True),
        sa.Column(
            "expiry_finalized", sa.Boolean(), server_default=sa.text("(false)"), nullable=False
        ),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("model_config", JSON_DOCUMENT, nullable=True),
        sa.Column("system_prompt", sa.Text(), nullable=True),
        sa.Column("parent_session_id", sa.String(length=255), nullable=True),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("ended_at", sa.Double(), nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.Column("input_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "cache_read_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False
        ),
        sa.Column(
            "cache_write_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False
        ),
        sa.Column("reasoning_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("cwd", sa.Text(), nullable=True),
        sa.Column("git_branch", sa.Text(), nullable=True),
        sa.Column("git_repo_root", sa.Text(), nullable=True),
        sa.Column("billing_provider", sa.Text(), nullable=True),
        sa.Column("billing_base_url", sa.Text(), nullable=True),
        sa.Column("billing_mode", sa.Text(), nullable=True),
        sa.Column("estimated_cost_usd", sa.Double(), nullable=True),
        sa.Column("actual_cost_usd", sa.Double(), nullable=True),
        sa.Column("cost_status", sa.Text(), nullable=True),
        sa.Column("cost_source", sa.Text(), nullable=True),
        sa.Column("pricing_version", sa.Text(), nullable=True),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("api_call_count", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("handoff_state", sa.Text(), nullable=True),
        sa.Column("handoff_platform", sa.Text(), nullable=True),
        sa.Column("handoff_error", sa.Text(), nullable=True),
        sa.Column("compression_failure_cooldown_until", sa.Double(), nullable=True),
        sa.Column("compression_failure_error", sa.Text(), nullable=True),
        sa.Column(
            "compression_fallback_streak",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
        ),
        sa.Column("profile_name", sa.Text(), nullable=True),
        sa.Column("rewind_count", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("archived", sa.Boolean(), server_default=sa.text("(false)"), nullable=False),
        sa.Column("extra", JSON_DOCUMENT, nullable=True),
        sa.ForeignKeyConstraint(
            ["parent_session_id"],
            ["hermes_sessions.id"],
            name=op.f("fk_hermes_sessions_parent_session_id_hermes_sessions"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hermes_sessions")),
    )
    op.create_index(
        op.f("ix_hermes_sessions_parent_session_id"), "hermes_sessions", ["parent_session_id"]
    )
    op.create_index(
        "ix_hermes_sessions_source_started_at", "hermes_sessions", ["source", "started_at"]
    )
    op.create_index("ix_hermes_sessions_started_at_id", "hermes_sessions", ["started_at", "id"])
    op.create_index(
        "ix_hermes_sessions_user_id_started_at", "hermes_sessions", ["user_id", "started_at"]
    )
    op.create_index(
        "ix_hermes_sessions_title_unique",
        "hermes_sessions",
        ["title"],
        unique=True,
        sqlite_where=sa.text("title IS NOT NULL"),
        postgresql_where=sa.text("title IS NOT NULL"),
    )

    op.create_table(
        "hermes_messages",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("session_id", sa.String(length=255), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("content", sa.Text(), nullable=True),
        sa.Column("content_parts", JSON_DOCUMENT, nullable=True),
        sa.Column("tool_calls", JSON_DOCUMENT, nullable=True),
        sa.Column("tool_call_id", sa.Text(), nullable=True),
        sa.Column("tool_name", sa.Text(), nullable=True),
        sa.Column("reasoning", sa.Text(), nullable=True),
        sa.Column("reasoning_content", sa.Text(), nullable=True),
        sa.Column("reasoning_details", JSON_DOCUMENT, nullable=True),
        sa.Column("codex_reasoning_items", JSON_DOCUMENT, nullable=True),
        sa.Column("codex_message_items", JSON_DOCUMENT, nullable=True),
        sa.Column("finish_reason", sa.Text(), nullable=True),
        sa.Column("token_count", sa.BigInteger(), nullable=True),
        sa.Column("timestamp", sa.Double(), nullable=True),
        sa.Column("effect_disposition", sa.Text(), nullable=True),
        sa.Column("platform_message_id", sa.Text(), nullable=True),
        sa.Column("observed", sa.Boolean(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=True),
        sa.Column("compacted", sa.Boolean(), nullable=True),
        sa.Column("api_content", sa.Text(), nullable=True),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column("extra", JSON_DOCUMENT, nullable=True),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["hermes_sessions.id"],
            name=op.f("fk_hermes_messages_session_id_hermes_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hermes_messages")),
        sa.UniqueConstraint("session_id", "idx", name=op.f("uq_hermes_messages_session_id_idx")),
        sqlite_autoincrement=True,  # ids never reused, as on PostgreSQL
    )


def downgrade() -> None:
    op.drop_table("hermes_messages")
    op.drop_index("ix_hermes_sessions_title_unique", table_name="hermes_sessions")
    op.drop_index("ix_hermes_sessions_user_id_started_at", table_name="hermes_sessions")
    op.drop_index("ix_hermes_sessions_started_at_id", table_name="hermes_sessions")
    op.drop_index("ix_hermes_sessions_source_started_at", table_name="hermes_sessions")
    op.drop_index(op.f("ix_hermes_sessions_parent_session_id"), table_name="hermes_sessions")
    op.drop_table("hermes_sessions")
