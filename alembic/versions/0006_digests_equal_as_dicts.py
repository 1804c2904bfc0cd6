"""Digests that read JSON documents with keys sorted and numbers as Python compares them.

A flush compares the caller's messages with the stored ones by digest
(``hermes_messages.digest``; the session's ``flushed_digest`` is that of its
last message). Up to 0005 a digest read each JSON document of a message (tool
calls, content parts, the ``extra`` keys) as stored, in its key order, so the
same conversation reloaded with its keys in another order could never be
flushed again. From this revision on, a digest reads every JSON document with
its keys sorted and every bool and integral float as the int it equals
(``True == 1 == 1.0``): messages equal as dicts digest the same.

This revision recomputes the digest of every message that holds a JSON
document, and each session's ``flushed_digest`` from its last message. No
stored text changes, and the search index is not touched (its triggers watch
other columns). The downgrade recomputes them the way 0005 reads them: each
document's text as stored.

Revision ID: 0006_digests_equal_as_dicts
Revises: 0005_search_from_new_row
Create Date: 2026-12-01

The digest is frozen here as this revision computes it (a released revision
never changes, so it reads no live code).
"""

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006_digests_equal_as_dicts"
down_revision: str | None = "0005_search_from_new_row"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The columns a digest reads, in its order.
_COLUMNS = (
    "role",
    "content",
    "content_parts",
    "tool_call_id",
    "tool_name",
    "reasoning",
    "reasoning_content",
    "finish_reason",
    "effect_disposition",
    "platform_message_id",
    "api_content",
    "tool_calls",
    "reasoning_details",
    "codex_reasoning_items",
    "codex_message_items",
    "token_count",
    "timestamp",
    "observed",
    "active",
    "compacted",
    "extra",
)
_JSON = (
    "content_parts",
    "tool_calls",
    "reasoning_details",
    "codex_reasoning_items",
    "codex_message_items",
    "extra",
)
_BOOL = ("observed", "active", "compacted")
_BATCH = 2000


def _as_compared(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _as_compared(v) for k, v in value.items()}
    if kind is list:
        return [_as_compared(v) for v in value]
    if kind is bool or (kind is float and value.is_integer()):
        return int(value)
    return value


def _digest(row: Sequence[Any], *, as_compared: bool) -> bytes:
    """The digest of a message from its stored columns, in :data:`_COLUMNS` order.

    ``as_compared``: this revision's way of reading a JSON document; else 0005's
    (the text as stored).
    """
    pieces = []
    for column, stored in zip(_COLUMNS, row, strict=True):
        if stored is None:
            continue
        text = stored
        if column in _JSON and as_compared:
            text = json.dumps(
                _as_compared(json.loads(stored)),
                ensure_ascii=False,
                separators=(",", ":"),
                sort_keys=True,
            )
        elif column in _BOOL:
            text = bool(stored)
        pieces.append(f"{column}\x00{text}")
    return hashlib.blake2b("\x00".join(pieces).encode("utf-8"), digest_size=16).digest()


def upgrade() -> None:
    _recompute(as_compared=True)


def downgrade() -> None:
    _recompute(as_compared=False)


def _recompute(*, as_compared: bool) -> None:
    """Give every message holding a JSON document its digest; sessions the last one's."""
    conn = op.get_bind()
    messages = sa.table(
        "hermes_messages",
        sa.column("id", sa.BigInteger),
        sa.column("digest", sa.LargeBinary),
        *(sa.column(c) for c in _COLUMNS),
    )
    # JSON documents as their text (psycopg would parse a json column).
    selected = [sa.cast(messages.c[c], sa.Text) if c in _JSON else messages.c[c] for c in _COLUMNS]
    holds_json = sa.or_(*(messages.c[c].isnot(None) for c in _JSON))
    change = (
        sa.update(messages)
        .where(messages.c.id == sa.bindparam("row_id"))
        .values(digest=sa.bindparam("new_digest"))
    )
    last = -1
    while True:
        rows = conn.execute(
            sa.select(messages.c.id, messages.c.digest, *selected)
            .where(holds_json, messages.c.id > last)
            .order_by(messages.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        last = rows[-1][0]
        changed = [
            {"row_id": row[0], "new_digest": digest}
            for row in rows
            if (digest := _digest(row[2:], as_compared=as_compared)) != bytes(row[1])
        ]
        if changed:
            conn.execute(change, changed)
    conn.execute(
        sa.text(
            "UPDATE hermes_sessions SET flushed_digest = (SELECT m.digest FROM hermes_messages m"
            " WHERE m.session_id = hermes_sessions.id AND m.idx = hermes_sessions.flushed_idx - 1)"
            " WHERE flushed_idx > 0"
        )
    )
