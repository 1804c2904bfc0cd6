"""A session's tool_call_count counts the tool calls of its live messages only.

Messages marked ``active: False`` (archived by a compaction, taken back by a
rewind) count no tool calls, as Hermes Agent counts them. Sessions holding such
a message with tool calls are recounted (on both backends); the downgrade
counts every message's again.

Revision ID: 0013_tool_calls_of_live_messages
Revises: 0012_search_folds_like_fts5
Create Date: 2026-12-03

Its statements are frozen as this revision rendered them when it was released
(a released revision never changes, so it reads no live code).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013_tool_calls_of_live_messages"
down_revision: str | None = "0012_search_folds_like_fts5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# How many tool calls a message's tool_calls column holds: a list, its length; a
# JSON null, none; any other value, one.
_CALLS = {
    "sqlite": (
        "CASE json_type(m.tool_calls) WHEN 'array' THEN json_array_length(m.tool_calls) "
        "WHEN 'null' THEN 0 ELSE 1 END"
    ),
    "postgresql": (
        "CASE json_typeof(m.tool_calls) WHEN 'array' THEN json_array_length(m.tool_calls) "
        "WHEN 'null' THEN 0 ELSE 1 END"
    ),
}
_ARCHIVED = {"sqlite": "m.active = 0", "postgresql": "m.active = false"}
_LIVE = {"sqlite": "coalesce(m.active, 1) <> 0", "postgresql": "coalesce(m.active, true)"}


def _recount(live_only: bool) -> None:
    dialect = op.get_context().dialect.name
    counted = f" AND {_LIVE[dialect]}" if live_only else ""
    op.execute(
        "UPDATE hermes_sessions SET tool_call_count = ("
        f"SELECT coalesce(sum({_CALLS[dialect]}), 0) FROM hermes_messages m "
        f"WHERE m.session_id = hermes_sessions.id AND m.tool_calls IS NOT NULL{counted}"
        ") WHERE id IN (SELECT m.session_id FROM hermes_messages m "
        f"WHERE {_ARCHIVED[dialect]} AND m.tool_calls IS NOT NULL)"
    )


def upgrade() -> None:
    _recount(live_only=True)


def downgrade() -> None:
    _recount(live_only=False)
