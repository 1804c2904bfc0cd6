"""What imports have seen of a ``state.db``: what was deleted since is not copied back.

An import records each session of the source that the destination holds once
it is done (copied by it, or by an earlier run, the mirror plugin, store
mode), in ``hermes_imported`` (:class:`~hermes_orm.models.Imported`). The
record outlives the session: one deleted in the destination afterwards (by
store mode's Hermes, the store's API, an application's SQL) is left
deleted by the next import of a ``state.db`` that still holds it, and
reported. A run interrupted before its end records nothing; the next run
records what it finds.

Rows of Hermes' other tables are recorded alike (by a digest of their key), in
the transaction that copies their table, with the ``updated_at`` the source's
row had: a row
deleted since is copied again only if the source's is newer than that (Hermes
changed it after), and a ``state_meta`` key, which has no time, never.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table, literal, select

from hermes_orm import _dialects
from hermes_orm.models import Imported, Session
from hermes_orm.store import SessionStore

_imported: Table = Imported.__table__  # type: ignore[assignment]
_sessions: Table = Session.__table__  # type: ignore[assignment]

#: The kind of the records of sessions.
SESSION = "session"

_SEEN = f"SELECT key FROM {_imported.name} WHERE kind = '{SESSION}' AND key IN ({{values}})"
_HELD = f"SELECT id FROM {_sessions.name} WHERE id IN ({{values}})"


def held_sessions(conn: Connection, session_ids: Sequence[str]) -> set[str]:
    """Those of ``session_ids`` the destination holds a sessions row of."""
    return {sid for (sid,) in _dialects.rows_for_values(conn, _HELD, session_ids)}


def seen_sessions(store: SessionStore, session_ids: Sequence[str]) -> tuple[set[str], list[str]]:
    """Of ``session_ids``, those an earlier import saw, and of them those deleted since.

    (Deleted: the destination no longer holds them.)
    """

    def work(conn: Connection) -> tuple[set[str], list[str]]:
        seen = [key for (key,) in _dialects.rows_for_values(conn, _SEEN, session_ids)]
        held = held_sessions(conn, seen)
        return set(seen), [sid for sid in seen if sid not in held]

    return store.read_transaction(work) if session_ids else (set(), [])


def record_seen(store: SessionStore, session_ids: Sequence[str]) -> None:
    """Record those of ``session_ids`` the destination holds (the caller leaves out those seen)."""
    if not session_ids:
        return
    now = time.time()

    def work(conn: Connection) -> None:
        insert = _dialects.insert_maker(conn.dialect.name)
        for part in _dialects.in_parts(session_ids):
            held = select(literal(SESSION), _sessions.c.id, literal(now)).where(
                _sessions.c.id.in_(part)
            )
            conn.execute(
                insert(_imported)
                .from_select(["kind", "key", "seen_at"], held)
                .on_conflict_do_nothing(index_elements=["kind", "key"])
            )

    store.write_transaction(work)


def _key_text(key: tuple[Any, ...]) -> str:
    """The record's key of a row's key: the SHA-256 (hex) of its JSON list.

    A fixed size: a route's key is text of any length, past what a btree index
    entry holds on PostgreSQL (about 2.7 kB).
    """
    return hashlib.sha256(json.dumps(list(key), ensure_ascii=False).encode()).hexdigest()


def seen_rows(
    conn: Connection, kind: str, keys: Sequence[tuple[Any, ...]]
) -> dict[tuple[Any, ...], float | None]:
    """Of the rows of table ``kind`` with ``keys``, those an earlier import saw: their version."""
    by_text = {_key_text(key): key for key in keys}
    texts = list(by_text)
    found: dict[tuple[Any, ...], float | None] = {}
    c = _imported.c
    for part in _dialects.in_parts(texts):
        query = select(c.key, c.version).where(c.kind == kind, c.key.in_(part))
        found.update((by_text[text], version) for text, version in conn.execute(query))
    return found


def record_rows(
    conn: Connection, kind: str, versions: Mapping[tuple[Any, ...], float | None]
) -> None:
    """Record the rows of table ``kind`` by key, each with its version (its ``updated_at``)."""
    if not versions:
        return
    now = time.time()
    insert = _dialects.insert_maker(conn.dialect.name)
    values = [
        {"kind": kind, "key": _key_text(key), "seen_at": now, "version": version}
        for key, version in versions.items()
    ]
    # (four values a record: within the parameters a statement may hold, 999 on SQLite
    # before 3.32)
    for part in _dialects.in_parts(values, _dialects.rows_per_statement(conn.dialect.name, 4)):
        statement = insert(_imported).values(part)
        conn.execute(
            statement.on_conflict_do_update(
                index_elements=["kind", "key"],
                set_={"seen_at": statement.excluded.seen_at, "version": statement.excluded.version},
            )
        )
