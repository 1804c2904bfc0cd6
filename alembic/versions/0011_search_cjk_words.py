"""PostgreSQL search: a CJK-like message keeps only its words in such scripts as text.

A token of a script written without spaces (CJK, kana, Hangul, Thai, ...) is
looked for as a substring of ``search_cjk`` (LIKE, through a trigram index),
which held the whole body of every message with such text. What a query looks
for that way never holds a blank (a query is cut at blanks first, as Python's
``str.split`` cuts), so it is found in a body exactly when it is found in one
of the body's blank-separated words that holds a character of those scripts.
``search_cjk`` now holds those words only, joined by spaces: the same hits,
from a fraction of the text (the trigram index and the column about a fifth of
what they were on a corpus where 1 message in 20 mixes in such text), and less
to write for each of those messages.

A second trigger, ``hermes_search_index_cjk``, narrows what
``hermes_search_index`` (which fires first: triggers fire in name order) put
in ``search_cjk``, only where it put something (its WHEN clause). The upgrade
narrows the stored values in place (no trigger fires) and builds the trigram
index again; the downgrade computes the whole bodies back. SQLite is not
touched: its trigram table holds the bodies and finds the same.

Revision ID: 0011_search_cjk_words
Revises: 0010_search_spaces_kept
Create Date: 2026-12-03

Its statements are frozen as this revision rendered them when it was released
(a released revision never changes, so it reads no live code).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011_search_cjk_words"
down_revision: str | None = "0010_search_spaces_kept"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Scripts written without spaces, as 0003 spells them.
_CJK = r"""[\u0e00-\u0eff\u1000-\u109f\u1100-\u11ff\u1780-\u17ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0002fa1f\U00030000-\U0003134f]"""
# Blanks: the characters Python's str.split cuts a query at (str.isspace).
_BLANKS = r"""[\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028-\u2029\u202f\u205f\u3000]+"""


def _words(column: str) -> str:
    """The blank-separated words of ``column`` that hold a CJK-like character, in order."""
    return (
        "(SELECT string_agg(w.word, ' ' ORDER BY w.n) "
        f"FROM regexp_split_to_table({column}, '{_BLANKS}') WITH ORDINALITY AS w(word, n) "
        f"WHERE w.word ~ '{_CJK}')"
    )


_INDEX = (
    "CREATE INDEX ix_hermes_search_cjk ON hermes_messages USING gin (search_cjk gin_trgm_ops) "
    "WHERE search_cjk IS NOT NULL"
)

_UPGRADE = [
    "CREATE FUNCTION hermes_search_cjk_words() RETURNS trigger LANGUAGE plpgsql AS $fn$\n"
    "BEGIN\n"
    f"    NEW.search_cjk := {_words('NEW.search_cjk')};\n"
    "    RETURN NEW;\n"
    "END\n"
    "$fn$",
    "CREATE TRIGGER hermes_search_index_cjk BEFORE INSERT OR UPDATE OF content, content_parts, "
    "tool_name, tool_calls ON hermes_messages FOR EACH ROW WHEN (NEW.search_cjk IS NOT NULL) "
    "EXECUTE FUNCTION hermes_search_cjk_words()",
    "DROP INDEX ix_hermes_search_cjk",
    f"UPDATE hermes_messages SET search_cjk = {_words('search_cjk')} WHERE search_cjk IS NOT NULL",
    _INDEX,
]

_DOWNGRADE = [
    "DROP TRIGGER hermes_search_index_cjk ON hermes_messages",
    "DROP FUNCTION hermes_search_cjk_words()",
    "DROP INDEX ix_hermes_search_cjk",
    "UPDATE hermes_messages SET search_cjk = "
    "hermes_search_body(content, content_parts, tool_name, tool_calls) "
    "WHERE search_cjk IS NOT NULL",
    _INDEX,
]


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for statement in _UPGRADE:
            op.execute(statement)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for statement in _DOWNGRADE:
            op.execute(statement)
