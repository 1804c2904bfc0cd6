"""What Hermes Agent keeps besides sessions and messages: gateway routes, locks, Telegram topics.

Hermes' gateway routing entries (``gateway_routing``), its context-compression
locks (``compression_locks``) and its Telegram private-chat topics
(``telegram_dm_topic_mode`` and ``telegram_dm_topic_bindings``), as
``hermes_*`` tables, for the SessionDB adapter. A topic binding goes with its
session.

Revision ID: 0008_hermes_gateway_and_locks
Revises: 0007_message_key_order
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_hermes_gateway_and_locks"
down_revision: str | None = "0007_message_key_order"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hermes_gateway_routing",
        sa.Column("scope", sa.Text(), server_default="", nullable=False),
        sa.Column("session_key", sa.Text(), nullable=False),
        sa.Column("entry_json", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "session_key", name=op.f("pk_hermes_gateway_routing")),
    )
    op.create_table(
        "hermes_compression_locks",
        sa.Column("session_id", sa.String(length=255), nullable=False),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("acquired_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_hermes_compression_locks")),
    )
    op.create_table(
        "hermes_telegram_topic_mode",
        sa.Column("chat_id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("activated_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("has_topics_enabled", sa.Integer(), nullable=True),
        sa.Column("allows_users_to_create_topics", sa.Integer(), nullable=True),
        sa.Column("capability_checked_at", sa.Double(), nullable=True),
        sa.Column("intro_message_id", sa.Text(), nullable=True),
        sa.Column("pinned_message_id", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("chat_id", name=op.f("pk_hermes_telegram_topic_mode")),
    )
    op.create_table(
        "hermes_telegram_topic_bindings",
        sa.Column("chat_id", sa.String(length=255), nullable=False),
        sa.Column("thread_id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("session_key", sa.Text(), nullable=False),
        sa.Column("session_id", sa.String(length=255), nullable=False),
        sa.Column("managed_mode", sa.Text(), server_default="auto", nullable=False),
        sa.Column("linked_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["hermes_sessions.id"],
            name=op.f("fk_hermes_telegram_topic_bindings_session_id_hermes_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "chat_id", "thread_id", name=op.f("pk_hermes_telegram_topic_bindings")
        ),
    )
    op.create_index(
        "ix_hermes_telegram_topic_bindings_session_id",
        "hermes_telegram_topic_bindings",
        ["session_id"],
        unique=True,
    )
    op.create_index(
        "ix_hermes_telegram_topic_bindings_user_id_chat_id",
        "hermes_telegram_topic_bindings",
        ["user_id", "chat_id"],
    )


def downgrade() -> None:
    op.drop_index(
        "ix_hermes_telegram_topic_bindings_user_id_chat_id", "hermes_telegram_topic_bindings"
    )
    op.drop_index("ix_hermes_telegram_topic_bindings_session_id", "hermes_telegram_topic_bindings")
    op.drop_table("hermes_telegram_topic_bindings")
    op.drop_table("hermes_telegram_topic_mode")
    op.drop_table("hermes_compression_locks")
    op.drop_table("hermes_gateway_routing")
