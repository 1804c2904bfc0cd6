"""The SQL parts of Hermes run on its ``SessionDB``'s own connection, served by the store.

A few places in hermes-agent 0.19 reach past ``SessionDB``'s methods to its
private sqlite3 connection (``db._conn.execute(...)``) or write helper
(``db._execute_write(fn)``, ``fn`` given that connection):

- the CLI, resuming a session (``--resume``, ``/resume``), reopens its row;
- the API server's platform creates a session (``POST /api/sessions``), checking
  its id and title and reading the row back, in one write transaction;
- the dashboard walks a session's descendants, and ``session_search`` finds the
  session a message belongs to (both look for the connection first).

:class:`HermesConnection` stands in for that connection: it runs those
statements, each known by its text, on the store's tables. Any other statement
(the dashboard's and ``hermes insights``' analytics, written for SQLite) is
refused with ``sqlite3.OperationalError`` naming it, the error Hermes' callers
take from a database that cannot run it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Table, delete, insert, select, update

from hermes_orm._codec import check_session_id, shown
from hermes_orm._dialects import in_parts
from hermes_orm.integrations.hermes._text import row_id_equal_to
from hermes_orm.models import Message, Session
from hermes_orm.store import check_fields, refuse_orphans, take_lock

if TYPE_CHECKING:
    from hermes_orm.integrations.hermes.sessiondb import SessionDB

_sessions: Table = Session.__table__  # type: ignore[assignment]
_messages: Table = Message.__table__  # type: ignore[assignment]


class Row:
    """A result row as ``sqlite3.Row`` gives it: by position, by column name, ``dict(row)``."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: Sequence[str], values: Sequence[Any]) -> None:
        self._names = tuple(names)
        self._values = tuple(values)

    def keys(self) -> list[str]:
        return list(self._names)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._names.index(key)]
            except ValueError:
                raise IndexError(f"No item with that key: {key!r}") from None
        return self._values[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._names, self._values, strict=True))!r})"


class Cursor:
    """What ``execute`` returns: the statement's rows, fetched already, and its rowcount."""

    def __init__(self, rows: list[Row], rowcount: int = -1) -> None:
        self._rows = rows
        self.rowcount = rowcount
        self.lastrowid = None

    def fetchone(self) -> Row | None:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[Row]:
        rows, self._rows = self._rows, []
        return rows

    def __iter__(self) -> Iterator[Row]:
        return iter(self.fetchall())


def _rows(names: Sequence[str], found: Any) -> Cursor:
    return Cursor([Row(names, tuple(row)) for row in found])


@dataclass(frozen=True)
class _Statement:
    """One statement Hermes runs on its connection, as the store runs it."""

    writes: bool
    run: Callable[[SessionDB, Connection, tuple[Any, ...]], Cursor]


def _reopen(_db: SessionDB, conn: Connection, params: tuple[Any, ...]) -> Cursor:
    (session_id,) = params
    done = conn.execute(
        update(_sessions).where(_sessions.c.id == session_id).values(ended_at=None, end_reason=None)
    )
    return Cursor([], done.rowcount)


def _locked(conn: Connection, kind: str, value: Any) -> None:
    """On PostgreSQL, ``value``'s lock of ``kind`` (an id, a title), to the end of the transaction.

    Hermes checks, then writes, holding SQLite's write lock: a second creator of
    the id, or of a session of the title, waits and finds the first's row.
    PostgreSQL locks no row that is not there: this lock does it instead. It is
    the sessions table's (the one the transaction's search_path finds), whatever
    path found it: stores on other tables of the database do not wait for it.
    """
    if isinstance(value, str):
        take_lock(conn, kind, value)


def _id_of(_db: SessionDB, conn: Connection, params: tuple[Any, ...]) -> Cursor:
    (session_id,) = params
    _locked(conn, "id", session_id)
    return _rows(["id"], conn.execute(select(_sessions.c.id).where(_sessions.c.id == session_id)))


def _create(_db: SessionDB, conn: Connection, params: tuple[Any, ...]) -> Cursor:
    session_id, source, model, system_prompt, started_at = params
    # The store's rules for a session it makes, refused before anything is written.
    values = check_fields(
        {"source": source, "model": model, "system_prompt": system_prompt, "started_at": started_at}
    )
    values["id"] = check_session_id(session_id)
    refuse_orphans(conn, session_id)
    conn.execute(insert(_sessions).values(values))
    return Cursor([], 1)


def _titled_other(_db: SessionDB, conn: Connection, params: tuple[Any, ...]) -> Cursor:
    title, session_id = params
    _locked(conn, "title", title)
    query = select(_sessions.c.id).where(_sessions.c.title == title, _sessions.c.id != session_id)
    return _rows(["id"], conn.execute(query))


def _delete(_db: SessionDB, conn: Connection, params: tuple[Any, ...]) -> Cursor:
    (session_id,) = params
    # (Hermes deletes here the session it has just made: it holds no message.)
    done = conn.execute(delete(_sessions).where(_sessions.c.id == session_id))
    return Cursor([], done.rowcount)


def _set_title(_db: SessionDB, conn: Connection, params: tuple[Any, ...]) -> Cursor:
    title, session_id = params
    done = conn.execute(update(_sessions).where(_sessions.c.id == session_id).values(title=title))
    return Cursor([], done.rowcount)


def _session_row(db: SessionDB, conn: Connection, params: tuple[Any, ...]) -> Cursor:
    (session_id,) = params
    row = conn.execute(select(_sessions).where(_sessions.c.id == session_id)).first()
    if row is None:
        return Cursor([])
    session = db.hermes_session(row)
    return Cursor([Row(list(session), list(session.values()))])


def _session_of_message(_db: SessionDB, conn: Connection, params: tuple[Any, ...]) -> Cursor:
    (given,) = params
    message_id = row_id_equal_to("id", given)  # as SQLite compares it with the column
    if message_id is None:
        return Cursor([])  # no row has such an id
    query = select(_messages.c.session_id).where(_messages.c.id == message_id)
    return _rows(["session_id"], conn.execute(query))


def _descendants(_db: SessionDB, conn: Connection, params: tuple[Any, ...]) -> Cursor:
    (session_id,) = params
    columns = (_sessions.c.id, _sessions.c.parent_session_id, _sessions.c.started_at)
    found = list(conn.execute(select(*columns).where(_sessions.c.id == session_id)))
    seen = {row[0] for row in found}
    level = list(seen)
    while level:  # (a UNION: a loop in the links ends where it meets a session seen)
        parents, level = level, []
        for part in in_parts(parents):
            children = conn.execute(select(*columns).where(_sessions.c.parent_session_id.in_(part)))
            for row in children:
                if row[0] not in seen:
                    seen.add(row[0])
                    found.append(row)
                    level.append(row[0])
    return _rows(["id", "parent_session_id", "started_at"], found)


def normalized(sql: str) -> str:
    """``sql`` with its words and punctuation one space apart: how a statement is known."""
    for mark in "(),":
        sql = sql.replace(mark, f" {mark} ")
    return " ".join(sql.split())


#: The statements, as hermes-agent 0.19 writes them, by their normalized text.
_STATEMENTS: dict[str, _Statement] = {
    normalized(sql): statement
    for sql, statement in (
        (
            "UPDATE sessions SET ended_at = NULL, end_reason = NULL WHERE id = ?",
            _Statement(True, _reopen),
        ),
        ("SELECT id FROM sessions WHERE id = ?", _Statement(False, _id_of)),
        (
            "INSERT INTO sessions (id, source, model, system_prompt, started_at) "
            "VALUES (?, ?, ?, ?, ?)",
            _Statement(True, _create),
        ),
        ("SELECT id FROM sessions WHERE title = ? AND id != ?", _Statement(False, _titled_other)),
        ("DELETE FROM sessions WHERE id = ?", _Statement(True, _delete)),
        ("UPDATE sessions SET title = ? WHERE id = ?", _Statement(True, _set_title)),
        ("SELECT * FROM sessions WHERE id = ?", _Statement(False, _session_row)),
        ("SELECT session_id FROM messages WHERE id = ?", _Statement(False, _session_of_message)),
        (
            "WITH RECURSIVE descendants(id, parent_session_id, started_at) AS ("
            " SELECT id, parent_session_id, started_at FROM sessions WHERE id = ?"
            " UNION"
            " SELECT s.id, s.parent_session_id, s.started_at"
            " FROM sessions s"
            " JOIN descendants d ON s.parent_session_id = d.id"
            ") SELECT id, parent_session_id, started_at FROM descendants",
            _Statement(False, _descendants),
        ),
    )
}


class HermesConnection:
    """``SessionDB._conn`` of the adapter: the statements Hermes runs there, on the store.

    Outside :meth:`SessionDB._execute_write`, each statement runs in a
    transaction of its own (a write commits as it returns: :meth:`commit` has
    nothing left to do); inside, on that write transaction's connection.
    """

    def __init__(self, db: SessionDB, conn: Connection | None = None) -> None:
        self._db = db
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Cursor:
        """Run ``sql``, one of the statements Hermes runs on its connection.

        Raises:
            sqlite3.OperationalError: Another statement (written for Hermes'
                own SQLite file, it is not run on this database).
        """
        statement = _STATEMENTS.get(normalized(sql)) if isinstance(sql, str) else None
        if statement is None:
            raise sqlite3.OperationalError(
                "hermes_orm stores this SessionDB's sessions: SQL written for Hermes' own "
                f"state.db is not run on its database: {shown(normalized(str(sql)), 120)}"
            )
        params = tuple(parameters)
        if self._conn is not None:
            return statement.run(self._db, self._conn, params)
        work: Callable[[Connection], Cursor] = lambda conn: statement.run(  # noqa: E731
            self._db, conn, params
        )
        return self._db.run_hermes_sql(work, write=statement.writes)

    def commit(self) -> None:
        """Nothing to commit: each statement committed as it ran (see the class)."""

    def rollback(self) -> None:
        """Nothing to roll back: each statement committed as it ran (see the class)."""
