"""Full-text search over message text: FTS5 on SQLite, tsvector and pg_trgm on PostgreSQL.

What is searched is a message's *body*: its text content, the text of its
content parts, its tool name and its tool calls' names and arguments, joined by
newlines and cut at ``BODY_LIMIT`` characters. Both backends compute it in SQL,
so rows written by any client are indexed.

SQLite: ``hermes_search_source`` is a view of each message's body; the FTS5
table ``hermes_search`` (unicode61 words, contentless: the text is not stored
twice) and ``hermes_search_cjk`` (trigram substrings, only
for the bodies that contain CJK-like scripts, text stored in the table) are kept
in step by triggers. A later migration that rebuilds ``hermes_messages`` in
batch mode must create the triggers again.

PostgreSQL: the trigger ``hermes_search_index`` computes the body into the
column ``search_body`` and its tsvector into ``search_vector`` (GIN index) on
every insert and on updates of the text columns; pg_trgm indexes the bodies
with CJK-like scripts for substring matching. ``CREATE EXTENSION pg_trgm``
needs the CREATE privilege on the database (pg_trgm is a trusted extension).

Revision ID: 0003_search
Revises: 0002_model_usage_and_meta
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

from hermes_orm._search_text import (
    BODY_LIMIT,
    SEPARATOR_RANGES,
    UNSEGMENTED_RANGES,
    glob_class,
    regex_class,
)

revision: str = "0003_search"
down_revision: str | None = "0002_model_usage_and_meta"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# -- SQLite -----------------------------------------------------------------

#: The document if it is a JSON array, else NULL. A NUL escape becomes a space
#: escape (SQLite's JSON functions end a string at NUL; PostgreSQL's refuse it);
#: the same plain replacement runs on PostgreSQL, so both index the same text.
_SQLITE_JSON_ARRAY = (
    "CASE WHEN json_valid({0}) THEN CASE WHEN json_type({0}) = 'array' "
    "THEN replace({0}, '\\u0000', '\\u0020') END END"
)


_SQLITE_BODY = f"""substr(
    coalesce(m.content, '') || char(10) ||
    coalesce((SELECT group_concat(json_extract(p.value, '$.text'), char(10))
              FROM json_each({_SQLITE_JSON_ARRAY.format("m.content_parts")}) AS p
              WHERE CASE WHEN p.type = 'object' THEN json_type(p.value, '$.text') END = 'text'),
             '') || char(10) ||
    coalesce(m.tool_name, '') || char(10) ||
    coalesce((SELECT group_concat(
                  coalesce(CASE WHEN c.type = 'object'
                           THEN json_extract(c.value, '$.function.name') END, '')
                  || char(10) ||
                  coalesce(CASE WHEN c.type = 'object'
                           THEN json_extract(c.value, '$.function.arguments') END, ''),
                  char(10))
              FROM json_each({_SQLITE_JSON_ARRAY.format("m.tool_calls")}) AS c),
             ''),
    1, {BODY_LIMIT})"""

_SQLITE_UPGRADE = [
    f"CREATE VIEW hermes_search_source AS SELECT m.id AS id, {_SQLITE_BODY} AS body "
    "FROM hermes_messages AS m",
    # GLOB with a character class costs ~60 us on a message: only bodies with a
    # character outside ASCII (more bytes than characters) go through it.
    "CREATE VIEW hermes_search_cjk_source AS SELECT id, body FROM hermes_search_source "
    "WHERE CASE WHEN length(CAST(body AS BLOB)) = length(body) THEN 0 "
    f"ELSE body GLOB {_literal('*' + glob_class(UNSEGMENTED_RANGES) + '*')} END",
    # Words: no copy of the text (contentless; the view has it) and no per-row
    # sizes (columnsize=0: hits are not ranked by bm25), which keeps the index small.
    # Not external content over the view: FTS5 cannot read a view that uses JSON
    # table functions ('rebuild' fails), and snippets are cut from the view's
    # body by hermes_orm, so FTS5 never needs the text back.
    "CREATE VIRTUAL TABLE hermes_search USING fts5(body, content='', columnsize=0, "
    "tokenize='unicode61 remove_diacritics 0')",
    "CREATE VIRTUAL TABLE hermes_search_cjk USING fts5(body, columnsize=0, tokenize='trigram')",
    # A query opens every segment of an index: merge two at a time (FTS5's
    # default is four), for ~25% less fixed cost per query at the same write cost.
    "INSERT INTO hermes_search(hermes_search, rank) VALUES ('automerge', 2)",
    # BEFORE triggers read the row as it still is, so 'delete' gets the very
    # values that were indexed.
    """CREATE TRIGGER hermes_search_insert AFTER INSERT ON hermes_messages BEGIN
        INSERT INTO hermes_search(rowid, body)
            SELECT id, body FROM hermes_search_source WHERE id = new.id;
        INSERT INTO hermes_search_cjk(rowid, body)
            SELECT id, body FROM hermes_search_cjk_source WHERE id = new.id;
    END""",
    """CREATE TRIGGER hermes_search_delete BEFORE DELETE ON hermes_messages BEGIN
        INSERT INTO hermes_search(hermes_search, rowid, body)
            SELECT 'delete', id, body FROM hermes_search_source WHERE id = old.id;
        DELETE FROM hermes_search_cjk WHERE rowid = old.id;
    END""",
    """CREATE TRIGGER hermes_search_update_old
    BEFORE UPDATE OF id, content, content_parts, tool_name, tool_calls ON hermes_messages BEGIN
        INSERT INTO hermes_search(hermes_search, rowid, body)
            SELECT 'delete', id, body FROM hermes_search_source WHERE id = old.id;
        DELETE FROM hermes_search_cjk WHERE rowid = old.id;
    END""",
    """CREATE TRIGGER hermes_search_update_new
    AFTER UPDATE OF id, content, content_parts, tool_name, tool_calls ON hermes_messages BEGIN
        INSERT INTO hermes_search(rowid, body)
            SELECT id, body FROM hermes_search_source WHERE id = new.id;
        INSERT INTO hermes_search_cjk(rowid, body)
            SELECT id, body FROM hermes_search_cjk_source WHERE id = new.id;
    END""",
    "INSERT INTO hermes_search(rowid, body) SELECT id, body FROM hermes_search_source",
    "INSERT INTO hermes_search_cjk(rowid, body) SELECT id, body FROM hermes_search_cjk_source",
]

_SQLITE_DOWNGRADE = [
    "DROP TRIGGER hermes_search_update_new",
    "DROP TRIGGER hermes_search_update_old",
    "DROP TRIGGER hermes_search_delete",
    "DROP TRIGGER hermes_search_insert",
    "DROP TABLE hermes_search_cjk",
    "DROP TABLE hermes_search",
    "DROP VIEW hermes_search_cjk_source",
    "DROP VIEW hermes_search_source",
]

# -- PostgreSQL -------------------------------------------------------------

#: A JSON escape of a lone surrogate (valid JSON, which ``->>`` cannot turn into
#: text), preceded by an even run of backslashes (so it is an escape).
_PG_LONE_SURROGATE = (
    r"(?<!\\)((?:\\\\)*)(?:\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f][0-9a-f]{2})"
    r"|(?<!\\ud[89ab][0-9a-f]{2})\\ud[c-f][0-9a-f]{2})"
)


def _pg_json_array(document: str) -> str:
    """The document if it is a JSON array, NUL and lone surrogate escapes made
    space escapes (as on SQLite); else NULL."""
    text = f"replace({document}::text, '\\u0000', '\\u0020')"
    return (
        f"CASE WHEN json_typeof({document}) = 'array' THEN regexp_replace({text}, "
        f"'{_PG_LONE_SURROGATE}', '\\1\\\\u0020', 'gi')::json END"
    )


#: A BEFORE trigger computes a row's body and tsvector once per write; PL/pgSQL
#: keeps its plans for the session (generated columns calling an SQL function
#: planned that function's subqueries again for every row: 12x slower inserts).
_PG_INDEX_FUNCTION = f"""
CREATE FUNCTION hermes_search_index() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    words text;
    tokens text[];
BEGIN
    NEW.search_body := left(
        coalesce(NEW.content, '') || E'\\n' ||
        coalesce((SELECT string_agg(p.value ->> 'text', E'\\n' ORDER BY p.ord)
                  FROM json_array_elements({_pg_json_array("NEW.content_parts")})
                       WITH ORDINALITY AS p(value, ord)
                  WHERE json_typeof(p.value -> 'text') = 'string'),
                 '') || E'\\n' ||
        coalesce(NEW.tool_name, '') || E'\\n' ||
        coalesce((SELECT string_agg(
                      coalesce(c.value -> 'function' ->> 'name', '') || E'\\n' ||
                      coalesce(c.value -> 'function' ->> 'arguments', ''),
                      E'\\n' ORDER BY c.ord)
                  FROM json_array_elements({_pg_json_array("NEW.tool_calls")})
                       WITH ORDINALITY AS c(value, ord)),
                 ''),
        {BODY_LIMIT});
    -- Separators become spaces, so PostgreSQL's parser sees the tokens FTS5 sees.
    words := regexp_replace(
        NEW.search_body, {_literal(regex_class(SEPARATOR_RANGES) + "+")}, ' ', 'g');
    -- Each pair of neighbouring words is a lexeme too ("stack trace"): GIN has no
    -- positions, so a phrase is checked on every row holding its words; the pairs
    -- narrow that to the rows holding the phrase.
    -- (unnest of two slices: subscripting the array in a loop is quadratic)
    tokens := string_to_array(lower(btrim(words)), ' ');
    NEW.search_vector := to_tsvector('simple'::regconfig, words) || array_to_tsvector(
        ARRAY(SELECT a || ' ' || b
              FROM unnest(tokens[1:cardinality(tokens) - 1], tokens[2:]) AS pair(a, b)
              WHERE octet_length(a) + octet_length(b) < 1000));
    RETURN NEW;
END
$fn$
"""

_PG_UNSEGMENTED = f"search_body ~ {_literal(regex_class(UNSEGMENTED_RANGES))}"

_PG_UPGRADE = [
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "ALTER TABLE hermes_messages ADD COLUMN search_body text, ADD COLUMN search_vector tsvector",
    _PG_INDEX_FUNCTION,
    "CREATE TRIGGER hermes_search_index BEFORE INSERT OR UPDATE OF content, content_parts, "
    "tool_name, tool_calls ON hermes_messages FOR EACH ROW EXECUTE FUNCTION hermes_search_index()",
    # Index the rows already there (setting a watched column fires the trigger).
    "UPDATE hermes_messages SET content = content",
    "CREATE INDEX ix_hermes_search_vector ON hermes_messages USING gin (search_vector)",
    "CREATE INDEX ix_hermes_search_cjk ON hermes_messages USING gin (search_body gin_trgm_ops) "
    f"WHERE {_PG_UNSEGMENTED}",
    # Newest-first scans of the CJK-like bodies, for terms too short for trigrams.
    f"CREATE INDEX ix_hermes_search_cjk_id ON hermes_messages (id) WHERE {_PG_UNSEGMENTED}",
]

_PG_DOWNGRADE = [
    "DROP INDEX ix_hermes_search_cjk_id",
    "DROP INDEX ix_hermes_search_cjk",
    "DROP INDEX ix_hermes_search_vector",
    "DROP TRIGGER hermes_search_index ON hermes_messages",
    "DROP FUNCTION hermes_search_index()",
    "ALTER TABLE hermes_messages DROP COLUMN search_vector, DROP COLUMN search_body",
    # pg_trgm stays: other objects of the database may use it.
]


def _execute(statements: list[str]) -> None:
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        _execute(_SQLITE_UPGRADE)
    else:
        _execute(_PG_UPGRADE)


def downgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        _execute(_SQLITE_DOWNGRADE)
    else:
        _execute(_PG_DOWNGRADE)
