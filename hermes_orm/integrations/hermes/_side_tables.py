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
column, a number that is no number, a required value missing, a topic bound to
a session the destination does not hold, or to one another topic holds there)
is left out and reported with its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, Connection, Float, Integer, String, Table, select, tuple_

from hermes_orm import _dialects
from hermes_orm.errors import InvalidArgumentError
from hermes_orm.integrations.hermes._gateway import _text
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

_INT64 = 2**63


def _problem(column: Column[Any], value: Any, *, key: bool) -> str | None:
    """Why ``column`` cannot hold ``value`` as read from Hermes' file (None: it can)."""
    if value is None:
        fine = not key and (column.nullable or column.server_default is not None)
        return None if fine else f"{column.name} is NULL"
    kind = column.type
    if isinstance(kind, Integer):
        fine, what = type(value) is int and -_INT64 <= value < _INT64, "an integer"
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
    store: SessionStore, src: Source, report: ImportReport
) -> dict[str, tuple[int, int]]:
    """Copy each of Hermes' side tables the source holds into ``store`` (see the module).

    Returns, per table copied, its rows in the source and the destination's
    rows of those keys afterwards.
    """
    counts = {}
    for side in SIDE_TABLES:
        if side.source in src.tables:
            # Columns the store has no place for (a newer Hermes') are not copied.
            rows = [
                {name: value for name, value in row.items() if name in side.table.c}
                for row in src.dicts(side.source)
            ]
            counts[side.source] = _copy(store, side, rows, report)
    return counts


def _copy(
    store: SessionStore, side: SideTable, rows: list[dict[str, Any]], report: ImportReport
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

    def work(conn: Connection) -> tuple[int, int]:
        held = _held(conn, side, [tuple(row[k] for k in key) for row in usable])
        owners = _owners(conn, side, usable)
        written = 0
        make = _dialects.insert_maker(conn.dialect.name)
        for row in usable:
            ident = tuple(row[k] for k in key)
            if side.session is not None:
                owner = owners[row[side.session]]
                if owner is None or (owner and owner != ident):
                    whose = "not in the destination" if owner is None else "bound to another there"
                    report.invalid_rows[_label(side, row)] = (
                        f"its session {row[side.session]!r} is {whose}"
                    )
                    continue
            have = held.get(ident)
            if have is not None:
                if all(have.get(k) == v for k, v in row.items()):
                    continue
                if side.stamp is None:
                    report.kept_settings.append(_label(side, row))
                    continue
                if not row[side.stamp] > have[side.stamp]:
                    continue  # the destination's is as new, or newer
            statement = make(table).values(**row)
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
            conn.execute(statement)
            written += 1
        keys = [tuple(row.get(k) for k in key) for row in rows]
        return written, len(_held(conn, side, [k for k in keys if all(type(v) is str for v in k)]))

    written, found = store.write_transaction(work)
    report.settings_written += written
    return len(rows), found


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
) -> dict[str, tuple[Any, ...] | None]:
    """Per session ``rows`` name: the key of the row of it stored, () none, None no session."""
    if side.session is None:
        return {}
    table, column = side.table, side.table.c[side.session]
    wanted = sorted({row[side.session] for row in rows})
    owners: dict[str, tuple[Any, ...] | None] = dict.fromkeys(wanted)
    for at in range(0, len(wanted), _CHUNK):
        part = wanted[at : at + _CHUNK]
        stored = conn.execute(select(_sessions.c.id).where(_sessions.c.id.in_(part))).scalars()
        owners.update((sid, ()) for sid in stored)
        bound = select(column, *(table.c[name] for name in side.key)).where(column.in_(part))
        for sid, *ident in conn.execute(bound):
            owners[sid] = tuple(ident)
    return owners
