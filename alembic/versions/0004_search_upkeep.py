"""SQLite: cheaper search-index upkeep on every insert; what is indexed is unchanged.

- 0003's insert and update triggers filled both search tables in one trigger,
  and the trigram table's filter computed the body of every message (twice)
  to find the few with CJK-like text. Here that filter has a trigger of its
  own whose ``WHEN`` clause looks at the raw columns first: text with no
  character outside ASCII and JSON with no ``\\u`` escape cannot hold
  CJK-like text, so for most messages the trigram table costs nothing.
- ``hermes_search`` merges its segments four at a time again (FTS5's default;
  0003 set two): at a million messages, merging two at a time made every
  insert ~50% dearer, for a query cost that stays in the milliseconds either way.

PostgreSQL is not touched.

Revision ID: 0004_search_upkeep
Revises: 0003_search
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004_search_upkeep"
down_revision: str | None = "0003_search"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WATCHED = "id, content, content_parts, tool_name, tool_calls"

#: Every text column the body is made of, in one string (NULLs as empty).
_RAW = (
    "(coalesce(new.content, '') || coalesce(new.content_parts, '') || "
    "coalesce(new.tool_name, '') || coalesce(new.tool_calls, ''))"
)
#: True unless the body surely has no CJK-like text (a cheap, conservative test).
_MAY_HOLD_CJK = f"length(CAST({_RAW} AS BLOB)) != length({_RAW}) OR instr({_RAW}, '\\u') > 0"

_INDEX_WORDS = (
    "INSERT INTO hermes_search(rowid, body) "
    "SELECT id, body FROM hermes_search_source WHERE id = new.id;"
)
_INDEX_CJK = (
    "INSERT INTO hermes_search_cjk(rowid, body) "
    "SELECT id, body FROM hermes_search_cjk_source WHERE id = new.id;"
)

_UPGRADE = [
    "INSERT INTO hermes_search(hermes_search, rank) VALUES ('automerge', 4)",
    "DROP TRIGGER hermes_search_insert",
    "DROP TRIGGER hermes_search_update_new",
    f"CREATE TRIGGER hermes_search_insert AFTER INSERT ON hermes_messages BEGIN {_INDEX_WORDS} END",
    f"CREATE TRIGGER hermes_search_cjk_insert AFTER INSERT ON hermes_messages "
    f"WHEN {_MAY_HOLD_CJK} BEGIN {_INDEX_CJK} END",
    f"CREATE TRIGGER hermes_search_update_new AFTER UPDATE OF {_WATCHED} ON hermes_messages "
    f"BEGIN {_INDEX_WORDS} END",
    f"CREATE TRIGGER hermes_search_cjk_update_new AFTER UPDATE OF {_WATCHED} ON hermes_messages "
    f"WHEN {_MAY_HOLD_CJK} BEGIN {_INDEX_CJK} END",
]

# 0003's triggers and merge setting, as they were.
_DOWNGRADE = [
    "INSERT INTO hermes_search(hermes_search, rank) VALUES ('automerge', 2)",
    "DROP TRIGGER hermes_search_cjk_update_new",
    "DROP TRIGGER hermes_search_update_new",
    "DROP TRIGGER hermes_search_cjk_insert",
    "DROP TRIGGER hermes_search_insert",
    f"CREATE TRIGGER hermes_search_insert AFTER INSERT ON hermes_messages "
    f"BEGIN {_INDEX_WORDS} {_INDEX_CJK} END",
    f"CREATE TRIGGER hermes_search_update_new AFTER UPDATE OF {_WATCHED} ON hermes_messages "
    f"BEGIN {_INDEX_WORDS} {_INDEX_CJK} END",
]


def _execute(statements: list[str]) -> None:
    if op.get_context().dialect.name == "sqlite":
        for statement in statements:
            op.execute(statement)


def upgrade() -> None:
    _execute(_UPGRADE)


def downgrade() -> None:
    _execute(_DOWNGRADE)
