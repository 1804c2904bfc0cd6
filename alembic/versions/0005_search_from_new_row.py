"""SQLite: the search triggers index the new row as it is; what is indexed is unchanged.

- 0004's insert and update triggers read every new row back through the
  ``hermes_search_source`` view (a lookup by id) to build its body. Here they
  build the very same body from ``new.*``.
- The trigram table's filter concatenated the four text columns, twice, to test
  the result for a character outside ASCII or a ``\\u`` escape. Here it tests
  each column on its own, which copies nothing. Only a ``\\u`` split across two
  columns passed the old filter and not this one; it is no JSON escape, and the
  body of such a message is plain ASCII, which the trigram table never holds.
- At a million messages this took about a tenth off the database work of an
  import (the index's pages, byte for byte, are the same).

The view stays: the delete triggers, ``rebuild`` and snippets read it.
PostgreSQL is not touched.

Revision ID: 0005_search_from_new_row
Revises: 0004_search_upkeep
Create Date: 2026-11-26

Its statements are frozen as this revision rendered them when it was released
(a released revision never changes, so it reads no live code).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005_search_from_new_row"
down_revision: str | None = "0004_search_upkeep"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UPGRADE: dict[str, list[str]] = {
    "sqlite": [
        "DROP TRIGGER hermes_search_cjk_update_new",
        "DROP TRIGGER hermes_search_update_new",
        "DROP TRIGGER hermes_search_cjk_insert",
        "DROP TRIGGER hermes_search_insert",
        r"""CREATE TRIGGER hermes_search_insert AFTER INSERT ON hermes_messages BEGIN INSERT INTO hermes_search(rowid, body) VALUES (new.id, substr(
    coalesce(new.content, '') || char(10) ||
    coalesce((SELECT group_concat(json_extract(p.value, '$.text'), char(10))
              FROM json_each(CASE WHEN json_valid(new.content_parts) THEN CASE WHEN json_type(new.content_parts) = 'array' THEN replace(new.content_parts, '\u0000', '\u0020') END END) AS p
              WHERE CASE WHEN p.type = 'object' THEN json_type(p.value, '$.text') END = 'text'),
             '') || char(10) ||
    coalesce(new.tool_name, '') || char(10) ||
    coalesce((SELECT group_concat(
                  coalesce(CASE WHEN c.type = 'object'
                           THEN json_extract(c.value, '$.function.name') END, '')
                  || char(10) ||
                  coalesce(CASE WHEN c.type = 'object'
                           THEN json_extract(c.value, '$.function.arguments') END, ''),
                  char(10))
              FROM json_each(CASE WHEN json_valid(new.tool_calls) THEN CASE WHEN json_type(new.tool_calls) = 'array' THEN replace(new.tool_calls, '\u0000', '\u0020') END END) AS c),
             ''),
    1, 16384)); END""",
        r"CREATE TRIGGER hermes_search_cjk_insert AFTER INSERT ON hermes_messages WHEN length(CAST(new.content AS BLOB)) != length(new.content) OR length(CAST(new.content_parts AS BLOB)) != length(new.content_parts) OR length(CAST(new.tool_name AS BLOB)) != length(new.tool_name) OR length(CAST(new.tool_calls AS BLOB)) != length(new.tool_calls) OR instr(new.content, '\u') > 0 OR instr(new.content_parts, '\u') > 0 OR instr(new.tool_name, '\u') > 0 OR instr(new.tool_calls, '\u') > 0 BEGIN INSERT INTO hermes_search_cjk(rowid, body) SELECT id, body FROM hermes_search_cjk_source WHERE id = new.id; END",
        r"""CREATE TRIGGER hermes_search_update_new AFTER UPDATE OF id, content, content_parts, tool_name, tool_calls ON hermes_messages BEGIN INSERT INTO hermes_search(rowid, body) VALUES (new.id, substr(
    coalesce(new.content, '') || char(10) ||
    coalesce((SELECT group_concat(json_extract(p.value, '$.text'), char(10))
              FROM json_each(CASE WHEN json_valid(new.content_parts) THEN CASE WHEN json_type(new.content_parts) = 'array' THEN replace(new.content_parts, '\u0000', '\u0020') END END) AS p
              WHERE CASE WHEN p.type = 'object' THEN json_type(p.value, '$.text') END = 'text'),
             '') || char(10) ||
    coalesce(new.tool_name, '') || char(10) ||
    coalesce((SELECT group_concat(
                  coalesce(CASE WHEN c.type = 'object'
                           THEN json_extract(c.value, '$.function.name') END, '')
                  || char(10) ||
                  coalesce(CASE WHEN c.type = 'object'
                           THEN json_extract(c.value, '$.function.arguments') END, ''),
                  char(10))
              FROM json_each(CASE WHEN json_valid(new.tool_calls) THEN CASE WHEN json_type(new.tool_calls) = 'array' THEN replace(new.tool_calls, '\u0000', '\u0020') END END) AS c),
             ''),
    1, 16384)); END""",
        r"CREATE TRIGGER hermes_search_cjk_update_new AFTER UPDATE OF id, content, content_parts, tool_name, tool_calls ON hermes_messages WHEN length(CAST(new.content AS BLOB)) != length(new.content) OR length(CAST(new.content_parts AS BLOB)) != length(new.content_parts) OR length(CAST(new.tool_name AS BLOB)) != length(new.tool_name) OR length(CAST(new.tool_calls AS BLOB)) != length(new.tool_calls) OR instr(new.content, '\u') > 0 OR instr(new.content_parts, '\u') > 0 OR instr(new.tool_name, '\u') > 0 OR instr(new.tool_calls, '\u') > 0 BEGIN INSERT INTO hermes_search_cjk(rowid, body) SELECT id, body FROM hermes_search_cjk_source WHERE id = new.id; END",
    ],
    "postgresql": [],
}

_DOWNGRADE: dict[str, list[str]] = {
    "sqlite": [
        "DROP TRIGGER hermes_search_cjk_update_new",
        "DROP TRIGGER hermes_search_update_new",
        "DROP TRIGGER hermes_search_cjk_insert",
        "DROP TRIGGER hermes_search_insert",
        "CREATE TRIGGER hermes_search_insert AFTER INSERT ON hermes_messages BEGIN INSERT INTO hermes_search(rowid, body) SELECT id, body FROM hermes_search_source WHERE id = new.id; END",
        r"CREATE TRIGGER hermes_search_cjk_insert AFTER INSERT ON hermes_messages WHEN length(CAST((coalesce(new.content, '') || coalesce(new.content_parts, '') || coalesce(new.tool_name, '') || coalesce(new.tool_calls, '')) AS BLOB)) != length((coalesce(new.content, '') || coalesce(new.content_parts, '') || coalesce(new.tool_name, '') || coalesce(new.tool_calls, ''))) OR instr((coalesce(new.content, '') || coalesce(new.content_parts, '') || coalesce(new.tool_name, '') || coalesce(new.tool_calls, '')), '\u') > 0 BEGIN INSERT INTO hermes_search_cjk(rowid, body) SELECT id, body FROM hermes_search_cjk_source WHERE id = new.id; END",
        "CREATE TRIGGER hermes_search_update_new AFTER UPDATE OF id, content, content_parts, tool_name, tool_calls ON hermes_messages BEGIN INSERT INTO hermes_search(rowid, body) SELECT id, body FROM hermes_search_source WHERE id = new.id; END",
        r"CREATE TRIGGER hermes_search_cjk_update_new AFTER UPDATE OF id, content, content_parts, tool_name, tool_calls ON hermes_messages WHEN length(CAST((coalesce(new.content, '') || coalesce(new.content_parts, '') || coalesce(new.tool_name, '') || coalesce(new.tool_calls, '')) AS BLOB)) != length((coalesce(new.content, '') || coalesce(new.content_parts, '') || coalesce(new.tool_name, '') || coalesce(new.tool_calls, ''))) OR instr((coalesce(new.content, '') || coalesce(new.content_parts, '') || coalesce(new.tool_name, '') || coalesce(new.tool_calls, '')), '\u') > 0 BEGIN INSERT INTO hermes_search_cjk(rowid, body) SELECT id, body FROM hermes_search_cjk_source WHERE id = new.id; END",
    ],
    "postgresql": [],
}


def upgrade() -> None:
    for statement in _UPGRADE[op.get_context().dialect.name]:
        op.execute(statement)


def downgrade() -> None:
    for statement in _DOWNGRADE[op.get_context().dialect.name]:
        op.execute(statement)
