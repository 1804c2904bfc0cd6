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
"""

import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

revision: str = "0005_search_from_new_row"
down_revision: str | None = "0004_search_upkeep"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _earlier(name: str) -> ModuleType:
    """An earlier revision's module, for the SQL it rendered (reused, never retyped)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_hermes_orm_revision_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_0003 = _earlier("0003_search")
_0004 = _earlier("0004_search_upkeep")

#: The view's body expression, on the trigger's new row instead of the view's ``m``.
_BODY = re.sub(r"\bm\.", "new.", _0003._SQLITE_BODY)
_TEXT_COLUMNS = ("content", "content_parts", "tool_name", "tool_calls")
#: True unless no column can hold CJK-like text (conservative, as 0004's, but copy-free).
_MAY_HOLD_CJK = " OR ".join(
    [f"length(CAST(new.{c} AS BLOB)) != length(new.{c})" for c in _TEXT_COLUMNS]
    + [f"instr(new.{c}, '\\u') > 0" for c in _TEXT_COLUMNS]
)
_INDEX_WORDS = f"INSERT INTO hermes_search(rowid, body) VALUES (new.id, {_BODY});"

_DROP = [
    "DROP TRIGGER hermes_search_cjk_update_new",
    "DROP TRIGGER hermes_search_update_new",
    "DROP TRIGGER hermes_search_cjk_insert",
    "DROP TRIGGER hermes_search_insert",
]


def _triggers(index_words: str, may_hold_cjk: str) -> list[str]:
    """The four triggers that index a new or updated row, in the order 0004 made them."""
    watched, index_cjk = _0004._WATCHED, _0004._INDEX_CJK
    return [
        f"CREATE TRIGGER hermes_search_insert AFTER INSERT ON hermes_messages "
        f"BEGIN {index_words} END",
        f"CREATE TRIGGER hermes_search_cjk_insert AFTER INSERT ON hermes_messages "
        f"WHEN {may_hold_cjk} BEGIN {index_cjk} END",
        f"CREATE TRIGGER hermes_search_update_new AFTER UPDATE OF {watched} ON hermes_messages "
        f"BEGIN {index_words} END",
        f"CREATE TRIGGER hermes_search_cjk_update_new AFTER UPDATE OF {watched} "
        f"ON hermes_messages WHEN {may_hold_cjk} BEGIN {index_cjk} END",
    ]


def upgrade() -> None:
    _0004._execute(_DROP + _triggers(_INDEX_WORDS, _MAY_HOLD_CJK))  # on SQLite only


def downgrade() -> None:
    _0004._execute(_DROP + _triggers(_0004._INDEX_WORDS, _0004._MAY_HOLD_CJK))
