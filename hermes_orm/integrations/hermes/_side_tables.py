"""Hermes' tables beside its sessions and messages, copied by an import.

Hermes keeps, in the same ``state.db``, a key/value store (``state_meta``: a
session's goals, maintenance marks), its gateways' routing of chat keys to
sessions (``gateway_routing``) and Telegram's topic mode (two tables). Store
mode serves them from hermes_orm's own tables; an import copies them so a
gateway switched over finds its chats where it left them.

A row the destination does not hold is written. One it holds is replaced only
by a newer row (a greater ``updated_at``); ``state_meta`` has no time, so a
key the destination holds keeps its value there (store mode may have written
it since), and the report names each such key whose value differs. A row the
store cannot hold (text that is not UTF-8 or holds NUL, a key longer than its
column, a number that is none or past its column's size, a required value
missing, a topic bound to a session the destination does not hold, or bound by
another writer as the import writes) is left out and reported with its reason.
A session is bound to one topic: of the source's binding and the
destination's, the newer stays. A row an earlier import saw that the
destination deleted since (store mode did) is not copied again, unless the
source's is newer than the one seen (see :mod:`._seen`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Integer,
    String,
    Table,
    delete,
    select,
    tuple_,
)
from sqlalchemy.exc import IntegrityError

from hermes_orm import _dialects
from hermes_orm.errors import InvalidArgumentError
from hermes_orm.integrations.hermes._gateway import _text
from hermes_orm.integrations.hermes._seen import record_rows, seen_rows
from hermes_orm.models import GatewayRoute, Meta, Session, TelegramTopicBinding, TelegramTopicMode

if TYPE_CHECKING:
    from hermes_orm.integrations.hermes.importer import ImportReport, Source
    from hermes_orm.store import SessionStore

_sessions: Table = Session.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class SideTable:
    """One of Hermes' tables and the store's table holding its rows."""

    source: str
    table: Table
    #: The column whose greater value makes a row newer; None: the destination's row is kept.
    stamp: str | None = None
    #: The column naming the row's session (which the destination must hold).
    session: str | None = None

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.table.primary_key)


SIDE_TABLES = (
    SideTable("state_meta", Meta.__table__),  # type: ignore[arg-type]
    SideTable("gateway_routing", GatewayRoute.__table__, stamp="updated_at"),  # type: ignore[arg-type]
    SideTable(
        "telegram_dm_topic_mode",
        TelegramTopicMode.__table__,  # type: ignore[arg-type]
        stamp="updated_at",
    ),
    SideTable(
        "telegram_dm_topic_bindings",
        TelegramTopicBinding.__table__,  # type: ignore[arg-type]
        stamp="updated_at",
        session="session_id",
    ),
)

_INT64, _INT32 = 2**63, 2**31


def _problem(column: Column[Any], value: Any, *, key: bool) -> str | None:
    """Why ``column`` cannot hold ``value`` as read from Hermes' file (None: it can)."""
    if value is None:
        fine = not key and (column.nullable or column.server_default is not None)
        return None if fine else f"{column.name} is NULL"
    kind = column.type
    if isinstance(kind, Integer):
        bound = _INT64 if isinstance(kind, BigInteger) else _INT32
        fine, what = (
            type(value) is int and -bound <= value < bound,
            f"a {bound.bit_length()}-bit integer",
        )
    elif isinstance(kind, Float):
        fine, what = type(value) in (int, float) and math.isfinite(value), "a finite number"
    elif type(value) is str:
        try:
            _text(column.name, value, max_length=kind.length if isinstance(kind, String) else None)
        except InvalidArgumentError as exc:
            return str(exc)
        return None
    else:
        fine, what = False, "text"
    if fine:
        return None
    if isinstance(value, bytes):  # (NotUtf8 too: text the import read as its bytes)
        return f"{column.name} holds a BLOB or text that is not UTF-8"
    return f"{column.name} holds {_shown(value)}, not {what}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _label(side: SideTable, row: dict[str, Any]) -> str:
    return f"{side.source} ({', '.join(_shown(row.get(name)) for name in side.key)})"


def copy_side_tables(
    store: SessionStore, src: Source, report: ImportReport, *, restore_deleted: bool = False
) -> dict[str, tuple[int, int]]:
    """Copy each of Hermes' side tables the source holds into ``store`` (see the module).

    Returns, per table copied, its rows in the source (but those deleted in the
    destination since an earlier import, left so unless ``restore_deleted``,
    and bindings of sessions the destination bound anew since) and the
    destination's rows of those keys afterwards.
    """
    counts = {}
    for side in SIDE_TABLES:
        if side.source in src.tables:
            # Columns the store has no place for (a newer Hermes') are not copied.
            rows = [
                {name: value for name, value in row.items() if name in side.table.c}
                for row in src.dicts(side.source)
            ]
            counts[side.source] = _copy(store, side, rows, report, restore_deleted)
    return counts


@dataclass
class _Outcome:
    """What one table's copy did (kept apart until its transaction commits)."""

    written: int = 0
    kept: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    #: Keys of rows left out as deleted since, with their labels.
    deleted: dict[tuple[Any, ...], str] = field(default_factory=dict)
    #: Keys of rows left out as their session's newer binding in the destination replaced them.
    replaced: dict[tuple[Any, ...], str] = field(default_factory=dict)
    found: int = 0


def _copy(
    store: SessionStore,
    side: SideTable,
    rows: list[dict[str, Any]],
    report: ImportReport,
    restore_deleted: bool,
) -> tuple[int, int]:
    """Write the usable ``rows`` of ``side``; returns (rows, rows of their keys stored)."""
    table, key = side.table, side.key
    usable: list[dict[str, Any]] = []
    for row in rows:
        problem = next(
            filter(None, (_problem(c, row.get(c.name), key=c.name in key) for c in table.c)),
            None,
        )
        if problem is not None:
            report.invalid_rows[_label(side, row)] = problem
        else:
            # A NULL where the store's column has a default: the default, as Hermes' would be.
            usable.append({k: v for k, v in row.items() if v is not None or table.c[k].nullable})
    keys = [tuple(row.get(k) for k in key) for row in rows]
    looked_up = [k for k in keys if all(type(v) is str for v in k)]
    gone = set(report.deleted_sessions)

    def work(conn: Connection) -> _Outcome:
        done = _Outcome()
        idents = [tuple(row[k] for k in key) for row in usable]
        held = _held(conn, side, idents)
        seen = seen_rows(conn, side.source, idents)
        owners = _owners(conn, side, usable)
        for row in usable:
            ident = tuple(row[k] for k in key)
            have = held.get(ident)
            if have is None and ident in seen and not restore_deleted:
                version = seen[ident]
                if side.stamp is None or version is None or not row[side.stamp] > version:
                    done.deleted[ident] = _label(side, row)
                    continue  # deleted since an import saw it as the source holds it still
            if side.session is not None and row[side.session] in gone:
                if have is None:  # (its session deleted so: it went too)
                    done.deleted[ident] = _label(side, row)
                continue  # (a key the destination bound anew keeps that binding)
            if have is not None:
                if all(have.get(k) == v for k, v in row.items()):
                    continue
                if side.stamp is None:
                    done.kept.append(_label(side, row))
                    continue
                if not row[side.stamp] > have[side.stamp]:
                    continue  # the destination's is as new, or newer
            if side.session is None or side.stamp is None:
                done.written += _write(conn, side, row)
                continue
            owner = owners[row[side.session]]
            refusal = _bound(conn, side, row, owner, side.stamp)
            if refusal is None:
                done.written += 1
                # What this write changed, for the rows after it: the session's binding
                # moved here (its old row gone), and the session this key bound before
                # (if another) bound nowhere now.
                if owner:
                    held.pop(tuple(owner[k] for k in key), None)
                if have is not None and have[side.session] != row[side.session]:
                    owners[have[side.session]] = {}
                owners[row[side.session]] = held[ident] = row
            elif refusal:
                done.refused[_label(side, row)] = refusal
            else:  # its session bound anew in the destination since: that binding stays
                done.replaced[ident] = _label(side, row)
        now = _held(conn, side, looked_up)
        done.found = len(now)
        # One a writer made again meanwhile (a gateway in store mode) is no longer left out.
        done.deleted = {k: label for k, label in done.deleted.items() if k not in now}
        done.replaced = {k: label for k, label in done.replaced.items() if k not in now}
        versions = {
            ident: row.get(side.stamp) if side.stamp else None
            for ident, row in zip(idents, usable, strict=True)
            if ident in now
        }
        record_rows(
            conn,
            side.source,
            {i: v for i, v in versions.items() if i not in seen or seen[i] != v},
        )
        return done

    done = store.write_transaction(work)
    report.settings_written += done.written
    report.kept_settings += done.kept
    report.invalid_rows.update(done.refused)
    report.deleted_rows += done.deleted.values()
    report.replaced_rows += done.replaced.values()
    return len(rows) - len(done.deleted) - len(done.replaced), done.found


def _write(conn: Connection, side: SideTable, row: dict[str, Any]) -> int:
    """Insert ``row``, or update the stored row of its key (only by a newer one); rows written."""
    table, key = side.table, side.key
    statement = _dialects.insert_maker(conn.dialect.name)(table).values(**row)
    index = [table.c[k] for k in key]
    if side.stamp is None:
        statement = statement.on_conflict_do_nothing(index_elements=index)
    else:
        statement = statement.on_conflict_do_update(
            index_elements=index,
            set_={k: statement.excluded[k] for k in row if k not in key},
            # A writer's newer row, made meanwhile, stays.
            where=table.c[side.stamp] < statement.excluded[side.stamp],
        )
    # (Counted by what RETURNING gives: an INSERT's rowcount is not every driver's.)
    return len(conn.execute(statement.returning(index[0])).all())


class _Moved(Exception):
    """A row read is not as it was read: another writer changed it meanwhile."""


def _bound(
    conn: Connection,
    side: SideTable,
    row: dict[str, Any],
    owner: dict[str, Any] | None,
    stamp: str,
) -> str | None:
    """Write ``row``, which binds a session: None, or why it is not written ("": skipped).

    ``owner``: the destination's row binding that session, as read ({} none,
    None: no such session). A session is bound to one row at most: another row
    binding it goes if ``row`` is newer (the session was bound anew in Hermes);
    if that one is as new or newer, ``row`` is not written, and that is no
    problem. Both happen in a savepoint: a binding another writer made or
    changed meanwhile (a gateway in store mode) stays, and ``row`` is reported.
    """
    if owner is None:
        return f"its session {row[side.session or '']!r} is not in the destination"
    table, key = side.table, side.key
    replaces = bool(owner) and any(owner[k] != row[k] for k in key)
    if replaces and not row[stamp] > owner[stamp]:
        return ""
    try:
        with conn.begin_nested():
            if replaces:
                as_read = [table.c[k] == owner[k] for k in (*key, side.session or "", stamp)]
                if conn.execute(delete(table).where(*as_read)).rowcount != 1:
                    raise _Moved
            if not _write(conn, side, row):
                raise _Moved  # (a newer row of its key, written meanwhile)
    except (IntegrityError, _Moved):
        return f"its session {row[side.session or '']!r} was bound to another meanwhile"
    return None


#: Keys looked up per statement (SQLite binds at most 32,766 values; a key has two).
_CHUNK = 5_000


def _held(
    conn: Connection, side: SideTable, keys: list[tuple[Any, ...]]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The destination's rows of ``keys``, by key."""
    table, names = side.table, side.key
    columns = [table.c[name] for name in names]
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    for at in range(0, len(keys), _CHUNK):
        part = keys[at : at + _CHUNK]
        where = (
            columns[0].in_([k[0] for k in part])
            if len(columns) == 1
            else tuple_(*columns).in_(part)
        )
        for row in conn.execute(select(table).where(where)):
            mapping = dict(row._mapping)
            found[tuple(mapping[name] for name in names)] = mapping
    return found


def _owners(
    conn: Connection, side: SideTable, rows: list[dict[str, Any]]
) -> dict[str, dict[str, Any] | None]:
    """Per session ``rows`` name: the stored row binding it, {} none, None: no such session."""
    if side.session is None:
        return {}
    table, column = side.table, side.table.c[side.session]
    wanted = sorted({row[side.session] for row in rows})
    owners: dict[str, dict[str, Any] | None] = dict.fromkeys(wanted)
    for at in range(0, len(wanted), _CHUNK):
        part = wanted[at : at + _CHUNK]
        stored = conn.execute(select(_sessions.c.id).where(_sessions.c.id.in_(part))).scalars()
        owners.update((sid, {}) for sid in stored)
        for bound in conn.execute(select(table).where(column.in_(part))):
            owners[bound._mapping[side.session]] = dict(bound._mapping)
    return owners
