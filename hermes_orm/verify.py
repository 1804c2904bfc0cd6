"""Check every invariant over a whole database, and repair what is derived.

``hermes-orm verify`` runs :func:`verify_database`. Per session it checks that
the messages sit at positions 0..n-1, that ``flushed_idx == n == message_count``,
that every message can be read, the tool call count, each message's digest
against its stored columns and the session's ``flushed_digest`` against its last
message; then that every message belongs to a session, that every parent
session exists and no lineage loops; then the search index (on SQLite: FTS5's
own checks, every message in both tables and no row for a message that is gone).

A damaged row is reported as a problem of its session, and the other sessions
are checked all the same.

A repair fixes derived data only and never deletes or rewrites a message's
content: positions with holes are closed up in their order, the cursor and the
counts are set from the rows, digests (one stored as anything but bytes
included) are recomputed from the stored columns, a missing parent is unlinked,
and the search index is rebuilt. After repairing, the same checks run again: a
problem is marked repaired only when that re-check finds it gone. Reported, not
repaired: a message that cannot be read (its content is the application's to
correct or restore), a position that is not a number (its order is unknown), a
loop in the lineage (which link is wrong is the application's call), and
messages whose session does not exist (orphans: only the application knows
whether to restore their session row, after which a repair sets its counts, or
to delete them, which frees the session id for a new session).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Table,
    Text,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal,
    select,
    type_coerce,
    update,
)
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.types import NullType

from hermes_orm import _codec, _dialects
from hermes_orm import search as _search
from hermes_orm.errors import (
    DatabaseBusyError,
    DatabaseError,
    DatabaseUnavailableError,
    InvalidMessageError,
)
from hermes_orm.models import Message, Session, new_history_id
from hermes_orm.store import SessionStore

_sessions: Table = Session.__table__  # type: ignore[assignment]
_messages: Table = Message.__table__  # type: ignore[assignment]
#: A message's columns as stored, by dialect. PostgreSQL's JSON ones are read as their
#: text: its driver would parse them as it fetches, and a value it cannot parse (nested
#: too deep) would leave the whole session unchecked, where the check of each row names
#: the message at fault. (SQLite's are text already, unless other SQL stored another type.)
_READ = {
    dialect: [
        type_coerce(
            _messages.c[name].cast(Text)
            if dialect == "postgresql" and name in _codec.JSON_COLUMNS
            else _messages.c[name],
            NullType(),
        )
        for name in _codec.READ_COLUMNS
    ]
    for dialect in ("sqlite", "postgresql")
}
_SHOWN = 10  # positions, ids and the like listed in a problem's detail
#: The session columns a check reads.
_CHECKED = ("flushed_idx", "message_count", "tool_call_count", "history_id", "flushed_digest")


#: The characters text of ASCII only is made of (trimmed away: nothing left).
_ASCII = "".join(map(chr, range(1, 128)))


def _as_stored(column: Any, dialect: str) -> Any:
    """``column`` read as stored, for its check (a position, a count, a digest).

    On SQLite another client may store text in it, not always UTF-8 (``CAST(x AS
    TEXT)`` of a digest), which ``sqlite3`` refuses to fetch: text with other than
    ASCII characters is read as its bytes in a literal (``X'FF00'``), still text,
    so found stored as text and repaired from the rows.
    """
    if dialect == "sqlite":
        ascii_only = func.trim(column, literal(_ASCII)) == ""
        shown = literal("X'") + func.hex(column) + literal("'")
        column = case((and_(func.typeof(column) == "text", ~ascii_only), shown), else_=column)
    return type_coerce(column, NullType())


@dataclass(frozen=True, slots=True)
class Problem:
    """One invariant found broken.

    Attributes:
        check: Which invariant (``session`` for a session that could not be
            checked at all, ``positions``, ``cursor``, ``message_count``,
            ``message``, ``tool_call_count``, ``digest``, ``flushed_digest``,
            ``orphans``, ``parent``, ``lineage``, ``search``).
        session_id: The session it concerns (None for the search index).
        detail: What was found.
        repaired: A repair fixed it (a re-check found it gone).
    """

    check: str
    session_id: str | None
    detail: str
    repaired: bool = False


@dataclass(slots=True)
class Report:
    """What :func:`verify_database` looked at and found."""

    sessions: int = 0
    messages: int = 0
    problems: list[Problem] = field(default_factory=list)
    #: What could not be checked, and why (not a problem of the database).
    unchecked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem is left (none found, or every one repaired)."""
        return all(problem.repaired for problem in self.problems)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``hermes-orm verify --json``)."""
        return {
            "ok": self.ok,
            "sessions": self.sessions,
            "messages": self.messages,
            "problems": [
                {
                    "check": p.check,
                    "session_id": p.session_id,
                    "detail": p.detail,
                    "repaired": p.repaired,
                }
                for p in self.problems
            ],
            "unchecked": list(self.unchecked),
        }


def verify_database(store: SessionStore, *, repair: bool = False) -> Report:
    """Check the invariants of every session of ``store``'s database; repair if asked.

    Each session is checked in a transaction of its own, so flushes can go on
    meanwhile: it reads one moment of the database and takes no lock (a repair
    holds the session's row lock, SQLite's write lock). A
    session that cannot be checked is reported and the others are checked all
    the same (a database out of reach still raises).
    """
    report = Report()
    read_only = None
    if store.engine.dialect.name == "postgresql":
        read_only = store.read_transaction(_pg_read_only)
    if repair and read_only is not None:
        where = "on the primary" if "standby" in read_only else "as a role that may write"
        raise DatabaseError(
            f"{read_only}, which may only be read (a repair cannot write it): repair "
            f"{where}, or verify without --repair here"
        )
    ids = store.read_transaction(
        lambda conn: list(conn.execute(select(_sessions.c.id).order_by(_sessions.c.id)).scalars())
    )
    for session_id in ids:
        check = functools.partial(_check_session, session_id=session_id, repair=repair)
        try:
            if repair:
                found = store.write_transaction(check)
            else:
                # One moment: statements read at several would take a flush landing
                # between them for a problem (a cursor past the messages read).
                found = store.read_transaction(check, snapshot=True)
        except (DatabaseUnavailableError, DatabaseBusyError):
            raise
        except Exception as exc:  # a row none of the checks foresaw: this session only
            if repair and _refused_as_read_only(exc):  # (every session's repair would be)
                raise DatabaseError(
                    "the database may only be read here (a repair cannot write it): "
                    "verify without --repair checks it"
                ) from exc
            found = (0, [Problem("session", session_id, f"could not be checked: {_why(exc)}")])
        report.sessions += 1
        report.messages += found[0]
        report.problems.extend(found[1])
    report.problems.extend(store.read_transaction(_check_orphans))
    # (A check alone only reads: SQLite's write lock would hold agents' flushes meanwhile.)
    lineage = store.write_transaction if repair else store.read_transaction
    report.problems.extend(lineage(lambda conn: _check_lineage(conn, repair)))
    # (The checks of the search index write: a table of the transaction's own, FTS5's
    # integrity-check. A standby gives no write transaction: its check only reads.)
    transaction = store.write_transaction if read_only is None else store.read_transaction
    try:
        search, report.unchecked = transaction(lambda conn: _check_search(conn, repair))
    except DatabaseBusyError:
        if repair or store.engine.dialect.name != "sqlite":
            raise
        # Another writer held SQLite's write lock throughout, which FTS5's integrity-check
        # (a statement that writes) waits for: the rest of the check only reads.
        search, report.unchecked = store.read_transaction(
            lambda conn: _check_search(conn, repair, integrity=False)
        )
    report.problems.extend(search)
    if repair and any(p.repaired for p in report.problems):
        for session_id in {p.session_id for p in report.problems if p.session_id}:
            store.forget_cursor(session_id)
    return report


def _pg_read_only(conn: Connection) -> str | None:
    """PostgreSQL: why every transaction here may only read (None: they may write).

    A standby (in recovery), or a role whose transactions are read-only by
    default (``default_transaction_read_only``), which the store's writes take
    for a standby, and wait.
    """
    standby, by_default = conn.exec_driver_sql(
        "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only') = 'on'"
    ).one()
    if standby:
        return "the server is a standby"
    return "transactions are read-only here (default_transaction_read_only)" if by_default else None


#: PostgreSQL's refusals of a write to what the role may only read: insufficient_privilege,
#: read_only_sql_transaction.
_PG_READ_ONLY = ("42501", "25006")


def _refused_as_read_only(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it came from, refuses a write to what may only be read.

    SQLite refusing a read-only file; PostgreSQL refusing the role the right to
    write, or a read-only transaction.
    """
    error: BaseException | None = exc
    while error is not None:
        if isinstance(error, DBAPIError) and (
            _dialects.sqlite_read_only(error.orig)
            or _dialects.sqlstate(error.orig) in _PG_READ_ONLY
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _why(exc: BaseException) -> str:
    """An exception as a problem's detail says it."""
    if isinstance(exc, InvalidMessageError):  # its text ends "nothing was written"
        return f"{exc.key}: {exc.reason}" if exc.key else exc.reason
    if isinstance(exc, DBAPIError):
        return str(exc.orig)
    return f"{type(exc).__name__}: {exc}"


def _check_session(conn: Connection, session_id: str, repair: bool) -> tuple[int, list[Problem]]:
    """The session's problems; repaired if asked, then checked again."""
    found = _inspect_session(conn, session_id, repair)
    if found is None:  # deleted since it was listed
        return 0, []
    n, problems = found
    if repair and any(p.repaired for p in problems):
        again = _inspect_session(conn, session_id, repair=False)
        left = again[1] if again is not None else []
        still = {p.check for p in left}
        problems = [replace(p, repaired=p.repaired and p.check not in still) for p in problems]
        checks = {p.check for p in problems}
        problems.extend(p for p in left if p.check not in checks)
    return n, problems


def _holes(positions: Sequence[int]) -> list[int]:
    """The first missing positions of 0..max (``positions`` sorted), without listing 0..max."""
    holes: list[int] = []
    expected = 0
    for position in positions:
        if position > expected:
            holes.extend(range(expected, min(position, expected + _SHOWN - len(holes))))
            if len(holes) >= _SHOWN:
                break
        expected = max(expected, position + 1)
    return holes


def _unreadable(values: Sequence[Any]) -> str | None:
    """What makes a row's columns (READ_COLUMNS order, as stored) no message, if it says."""
    held: set[Any] = set()
    nulls: set[str] = set()
    for column, value in zip(_codec.READ_COLUMNS, values, strict=True):
        if column in _codec.JSON_COLUMNS and isinstance(value, str):
            try:
                if json.loads(value) is None:
                    nulls.add(column)  # JSON null (another client's): no value, as a NULL
                    continue
            except ValueError:
                return f"{column} is not valid JSON"
            except RecursionError:
                return f"{column} is JSON nested too deep to be read"
        if value is not None:
            held.add("content" if column == "content_parts" else column)
    extra, order = values[0], values[1]
    if "extra" in held and not isinstance(json.loads(extra), dict):
        return "extra is not a JSON object"
    if "key_order" in held:
        names = json.loads(order)
        if not isinstance(names, list):
            return "key_order is not a JSON list"
        keys = held | set(json.loads(extra)) if "extra" in held else held
        return _order_problem(names, keys, nulls)
    return None


def _order_problem(names: list[Any], held: set[Any], nulls: set[str]) -> str | None:
    """What makes ``key_order``'s ``names`` no order of the keys ``held``, if anything.

    ``nulls``: the JSON columns holding JSON null.
    """
    for name in names:
        if not isinstance(name, str):
            return f"key_order holds {_codec.shown(name)}, which is no key"
        if name not in held:
            null = " (its column holds JSON null)" if name in nulls else ""
            return f"key_order names {name!r}, which the row does not hold{null}"
    return None


def _cannot_read(values: Sequence[Any], exc: BaseException) -> str:
    """Why a row's columns decode to no message: what :func:`_unreadable` finds, else ``exc``."""
    try:
        found = _unreadable(values)
    except Exception:  # damage it has no words for: the decoder's own error says it
        found = None
    return found or _why(exc)


#: What ``sqlite3`` says of a text value it cannot fetch.
_NOT_UTF8 = "Could not decode to UTF-8"


class _Undecodable(NamedTuple):
    """A message row the driver could not fetch (its position, for the report)."""

    id: int
    idx: Any


def _message_rows(conn: Connection, session_id: str) -> tuple[Sequence[Any], dict[int, str]]:
    """The session's message rows in order, and why those that could not be fetched.

    Other SQL may store text that is not UTF-8 in a SQLite column, which ``sqlite3``
    refuses to fetch: the whole read would fail, where each such row is the problem
    of one message. The rows are then fetched one at a time, the refused ones as
    :class:`_Undecodable` (by id).
    """
    dialect = conn.dialect.name
    read = (
        select(
            _messages.c.id,
            _as_stored(_messages.c.idx, dialect).label("idx"),
            _as_stored(_messages.c.digest, dialect).label("digest"),
            *_READ[dialect],
        )
        .where(_messages.c.session_id == session_id)
        .order_by(_messages.c.idx, _messages.c.id)
    )
    try:
        return conn.execute(read).all(), {}
    except OperationalError as exc:
        if _NOT_UTF8 not in str(exc.orig):
            raise
    rows: list[Any] = []
    undecodable: dict[int, str] = {}
    positions = read.with_only_columns(_messages.c.id, read.selected_columns.idx)
    for row_id, idx in conn.execute(positions):
        try:
            rows.extend(conn.execute(read.where(_messages.c.id == row_id)))
        except OperationalError as exc:
            if _NOT_UTF8 not in str(exc.orig):
                raise
            undecodable[row_id] = str(exc.orig)
            rows.append(_Undecodable(row_id, idx))
    return rows, undecodable


def _inspect_session(
    conn: Connection, session_id: str, repair: bool
) -> tuple[int, list[Problem]] | None:
    # Only the columns checked, as stored: damage to another (JSON nested too deep, a
    # flag holding a word) is no reason to leave the session's messages unchecked.
    read = select(
        *(_as_stored(_sessions.c[name], conn.dialect.name).label(name) for name in _CHECKED)
    ).where(_sessions.c.id == session_id)
    session = conn.execute(read.with_for_update() if repair else read).first()
    if session is None:
        return None
    stored_last = session.flushed_digest
    unreadable: str | None = None
    try:
        with conn.begin_nested():  # the rest of the row, as the store reads it
            rest = [c for c in _sessions.c if c.name not in _CHECKED]
            conn.execute(select(*rest).where(_sessions.c.id == session_id)).first()
    except Exception as exc:  # (the checks below read only what they check)
        unreadable = _why(exc)
    rows, undecodable = _message_rows(conn, session_id)
    problems: list[Problem] = []

    def found(check: str, detail: str, *, fixable: bool = True) -> None:
        problems.append(Problem(check, session_id, detail, repaired=repair and fixable))

    if unreadable is not None:
        found(
            "session",
            f"the session's row holds a value that cannot be read ({unreadable}); not "
            "repaired: verify never rewrites a session's own fields (correct the row)",
            fixable=False,
        )
    n = len(rows)
    idxs = [row.idx for row in rows]
    order_known = True  # (which message is the last)
    if idxs != list(range(n)):
        whole = [i for i in idxs if type(i) is int]
        odd = [i for i in idxs if type(i) is not int]
        holes = _holes(sorted(whole))
        what = [f"holes at {holes}"] if holes else []
        if any(i < 0 for i in whole):
            what.append(f"negative positions {[i for i in whole if i < 0][:_SHOWN]}")
        if odd:
            what.append(f"positions that are not whole numbers: {odd[:_SHOWN]!r}")
        detail = f"{n} messages at positions other than 0..{n - 1} ({'; '.join(what)})"
        order_known = all(isinstance(i, int | float) for i in idxs)
        if order_known:
            found("positions", detail)
            if repair:
                _close_up(conn, [row.id for row in rows], idxs)
        else:
            found(
                "positions",
                f"{detail}; not repaired: the order of a position that is not a number is "
                "unknown (set it by hand, then repair)",
                fixable=False,
            )
    if session.flushed_idx != n:
        found("cursor", f"flushed_idx is {session.flushed_idx}, {n} messages are stored")
    if session.message_count != n:
        found("message_count", f"message_count is {session.message_count}, {n} are stored")
    history = session.history_id
    if not _codec.whole_int64(history):
        # (A repair draws a new one, as it does for any repair of the session.)
        found("history_id", f"history_id is {history!r}, not an integer from 0 to 2**63 - 1")
    digests: list[bytes | None] = []
    calls: int | None = 0
    for row in rows:
        why = undecodable.get(row.id)
        if why is None:
            try:
                message = _codec.decode_row(row[3:], driver_parses_json=False)
                encoded = _codec.encode_message(message)
            except Exception as exc:  # any damage to the row's columns
                why = _cannot_read(row[3:], exc)
        if why is not None:
            found(
                "message",
                f"the message at position {row.idx!r} (id {row.id}) cannot be read: {why}; "
                "not repaired: verify never rewrites a message (correct or restore the row)",
                fixable=False,
            )
            digests.append(None)
            calls = None
            continue
        if calls is not None:
            calls += encoded.tool_calls
        digests.append(encoded.digest)
        stored = row.digest
        if not isinstance(stored, bytes | memoryview):
            found(
                "digest",
                f"the digest of the message at position {row.idx!r} is stored as "
                f"{type(stored).__name__}, not bytes",
            )
        elif bytes(stored) != encoded.digest:
            found("digest", f"the message at position {row.idx!r} does not match its digest")
        else:
            continue
        if repair:
            conn.execute(
                update(_messages).where(_messages.c.id == row.id).values(digest=encoded.digest)
            )
    if calls is not None and session.tool_call_count != calls:
        found("tool_call_count", f"tool_call_count is {session.tool_call_count}, {calls} stored")
    last = digests[-1] if digests else None
    if not order_known or (digests and last is None):
        pass  # which message is last, or its digest, is unknown (reported above)
    elif not isinstance(stored_last, bytes | memoryview | None):
        found("flushed_digest", f"flushed_digest is stored as {type(stored_last).__name__}")
    elif (None if stored_last is None else bytes(stored_last)) != last:
        found("flushed_digest", "flushed_digest is not the digest of the last message")
    for name in ("tool_call_count", "flushed_digest"):
        # Not checked while the messages above are unread (nothing to set it from), it
        # still may hold text, which the store cannot read: said, not repaired.
        value = getattr(session, name)
        if isinstance(value, str) and not any(p.check == name for p in problems):
            found(
                name,
                f"{name} is stored as text ({value}); not repaired until the messages "
                "are (then set from them)",
                fixable=False,
            )
    if repair and any(p.repaired for p in problems):
        # A history the stores that remember this session's cursor must not take as theirs.
        values: dict[str, Any] = {"flushed_idx": n, "message_count": n}
        values["history_id"] = new_history_id()
        if calls is not None:
            values["tool_call_count"] = calls
        if order_known and (not digests or last is not None):
            values["flushed_digest"] = last
        conn.execute(update(_sessions).where(_sessions.c.id == session_id).values(**values))
    return n, problems


def _close_up(conn: Connection, message_ids: Sequence[int], positions: Sequence[Any]) -> None:
    """Give the messages (ids in position order) positions 0..n-1, keeping their order.

    ``positions``: the ones they hold now.
    """
    # Out of the way first, so no step collides with UNIQUE(session_id, idx): on the
    # negative positions nearest 0 that none holds (a position near the column's
    # least would take those below it out of range).
    held = set(positions)
    parking: list[int] = []
    for position in itertools.count(-1, -1):
        if len(parking) == len(message_ids):
            break
        if position not in held:
            parking.append(position)
    change = (
        update(_messages)
        .where(_messages.c.id == bindparam("message_id"))
        .values(idx=bindparam("position"))
    )
    parked = zip(message_ids, parking, strict=True)
    conn.execute(change, [{"message_id": m, "position": p} for m, p in parked])
    conn.execute(change, [{"message_id": m, "position": i} for i, m in enumerate(message_ids)])


def _check_orphans(conn: Connection) -> list[Problem]:
    """Messages whose session does not exist: reported, never repaired (see the module)."""
    orphans = conn.execute(
        select(_messages.c.session_id, func.count())
        # (an anti-join: NOT IN (SELECT ...) is hashed only while the ids fit in
        # PostgreSQL's hash_mem, then rescanned for every message)
        .where(~exists().where(_sessions.c.id == _messages.c.session_id))
        .group_by(_messages.c.session_id)
        .order_by(_messages.c.session_id)
    ).all()
    return [
        Problem(
            "orphans",
            session_id,
            f"{count} messages belong to session {session_id!r}, which does not exist; "
            "not repaired: verify never deletes a message (restore the session row to keep "
            "them, then repair; or delete them, which frees the id for a new session)",
        )
        for session_id, count in orphans
    ]


def _check_lineage(conn: Connection, repair: bool) -> list[Problem]:
    """Parents that exist, links without a loop; a missing parent unlinked if asked.

    The links and whether each parent exists are read in one statement: one
    moment of the database (on PostgreSQL each statement of a transaction sees
    its own), so a parent deleted, or a link set, by an agent meanwhile is
    never taken for a missing parent. An unlink changes the link only if it
    still names that parent and the parent is still missing; one that changes
    nothing (the link moved on) reports no problem: there is none now.
    """
    parent = _sessions.alias("parent")
    rows = conn.execute(
        select(_sessions.c.id, _sessions.c.parent_session_id, parent.c.id.is_not(None))
        .select_from(_sessions.outerjoin(parent, parent.c.id == _sessions.c.parent_session_id))
        .where(_sessions.c.parent_session_id.is_not(None))
    ).all()
    parents = {child: parent_id for child, parent_id, _ in rows}
    problems = []
    for child, parent_id, found in rows:
        if found:
            continue
        detail = f"parent session {parent_id!r} does not exist"
        if not repair:
            problems.append(Problem("parent", child, detail))
        elif conn.execute(_UNLINK, {"child": child, "parent": parent_id}).rowcount == 1:
            problems.append(Problem("parent", child, detail, repaired=True))
    # Each session is walked once: a walk stops at a root, at a session an earlier
    # walk went through, or where it meets itself (a loop), in time linear in the
    # sessions however deep a lineage goes.
    walked: set[str] = set()
    for start in parents:
        path: dict[str, int] = {}  # the walk's sessions, at their place on it
        node: str | None = start
        while node is not None and node not in walked:
            if node in path:
                loop = list(path)[path[node] :]
                problems.append(Problem("lineage", node, f"parent links loop: {' -> '.join(loop)}"))
                break
            path[node] = len(path)
            node = parents.get(node)
        walked.update(path)
    return problems


_missing = _sessions.alias("missing")
#: Unlink a child from a parent that is missing, if it still is and the link still names it.
_UNLINK = (
    update(_sessions)
    .where(
        _sessions.c.id == bindparam("child"),
        _sessions.c.parent_session_id == bindparam("parent"),
        ~select(_missing.c.id).where(_missing.c.id == bindparam("parent")).exists(),
    )
    .values(parent_session_id=None)
)


def _check_search(
    conn: Connection, repair: bool, *, integrity: bool = True
) -> tuple[list[Problem], list[str]]:
    """The search index covers every message; rebuilt if asked, then checked again.

    Returns the problems, and what could not be checked (without ``integrity``,
    SQLite's FTS5 integrity-checks, which wait for the write lock).
    """
    unchecked: list[str] = []
    found = [
        Problem("search", None, detail)
        for detail in _search_problems(conn, unchecked, integrity=integrity)
    ]
    if not (repair and found):
        return found, unchecked
    try:
        with conn.begin_nested():  # (a rebuild the database refuses leaves the index as it was)
            _search.rebuild(conn)
    except DBAPIError as exc:
        if _dialects.is_unreachable(exc):
            raise
        failed = f"a rebuild failed: {_dialects.said(exc)}"
        return [*found, Problem("search", None, failed)], unchecked
    left = _search_problems(conn, [])
    if not left:
        return [replace(p, repaired=True) for p in found], unchecked
    return [*found, *(Problem("search", None, f"after a rebuild: {d}") for d in left)], unchecked


def _search_problems(
    conn: Connection, unchecked: list[str], *, integrity: bool = True
) -> list[str]:
    if conn.dialect.name != "sqlite":
        read_only = _pg_read_only(conn)
        if read_only is not None:
            # The fresh words are computed in a table of the transaction's own, which
            # a read-only transaction cannot make: its triggers are checked alone.
            unchecked.append(
                "search: each message's words against what its triggers compute "
                f"({read_only}, which may only be read)"
            )
            return _pg_trigger_problems(conn)
        return _pg_search_problems(conn)
    problems = _sqlite_trigger_problems(conn)
    for table in ("hermes_search", "hermes_search_cjk"):
        if not integrity:
            unchecked.append(
                f"search: {table}'s integrity-check (another writer held the write lock throughout)"
            )
            continue
        try:
            conn.exec_driver_sql(f"INSERT INTO {table}({table}) VALUES ('integrity-check')")
        except DBAPIError as exc:
            if _dialects.sqlite_read_only(exc.orig):
                # FTS5 checks its index by a statement that writes: a copy this
                # process may only read is checked by what it holds (below) alone.
                unchecked.append(f"search: {table}'s integrity-check (the database is read-only)")
                continue
            problems.append(f"{table}: {exc.orig}")
    try:
        problems.extend(_words_coverage(conn))
    except DBAPIError as exc:
        problems.append(f"hermes_search cannot be read: {exc.orig}")
    try:
        problems.extend(_cjk_coverage(conn))
    except DBAPIError as exc:
        problems.append(f"hermes_search_cjk cannot be read: {exc.orig}")
    return problems


#: Messages a PostgreSQL search check indexes afresh at a time (see _pg_search_problems).
_PG_PROBE_BATCH = 20_000


def _pg_trigger_problems(conn: Connection) -> list[str]:
    """PostgreSQL: the search triggers that would not fire (see search.pg_trigger_gaps)."""
    return [
        _trigger_problem(table, name, "missing" if missing else "disabled")
        for table, name, missing in _search.pg_trigger_gaps(conn)
    ]


def _sqlite_trigger_problems(conn: Connection) -> list[str]:
    """SQLite: the search triggers that are missing (see search.sqlite_trigger_gaps)."""
    return [
        _trigger_problem("hermes_messages", name, "missing")
        for name in _search.sqlite_trigger_gaps(conn)
    ]


def _trigger_problem(table: str, name: str, state: str) -> str:
    return (
        f"{table}: the search trigger {name} is {state}: "
        "messages written there are not indexed as they should be"
    )


def _pg_search_problems(conn: Connection) -> list[str]:
    """PostgreSQL: each message's words and CJK-like text are what its triggers compute.

    The messages are copied, a batch at a time, into a temporary table of the
    connection's own that has the same search triggers, which index them
    afresh; a stored vector or CJK-like text that differs from the fresh one is
    out of step (emptied, left behind by an old version, changed by hand).
    """
    sql = conn.exec_driver_sql
    problems = _pg_trigger_problems(conn)
    # Made in the check's transaction: gone with it, should a statement fail.
    sql(f"CREATE TEMP TABLE {_PG_PROBE} (LIKE hermes_messages INCLUDING DEFAULTS)")
    triggers = sql(
        "SELECT pg_get_triggerdef(t.oid), quote_ident(n.nspname) || '.' || quote_ident(c.relname) "
        "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE t.tgrelid = 'hermes_messages'::regclass AND NOT t.tgisinternal "
        "AND t.tgname LIKE 'hermes\\_search%%'"
    ).all()
    for definition, table in triggers:
        # The table as the definition names it (its schema's name may hold blanks).
        probe = definition.replace(f" ON {table} FOR EACH ", f" ON {_PG_PROBE} FOR EACH ", 1)
        if probe == definition:
            raise DatabaseError(f"the search trigger's definition is not understood: {definition}")
        _dialects.run_as_written(conn, probe)
    copied = {definition.split(" ", 3)[2] for definition, _ in triggers}
    for name in _search.PG_TRIGGERS.keys() - copied:  # (what it computes is checked all the same)
        sql(_search.pg_trigger_sql(conn, name, _PG_PROBE))
    stale, first, last = 0, None, None
    while True:
        # The next batch of the ids there are (ranges of ids would walk the gaps too:
        # a sequence set far ahead, rows restored with their ids).
        after = "" if last is None else f"WHERE id > {last} "
        sql(
            f"INSERT INTO {_PG_PROBE} SELECT * FROM hermes_messages {after}"
            f"ORDER BY id LIMIT {_PG_PROBE_BATCH}"
        )
        last = sql(f"SELECT max(id) FROM {_PG_PROBE}").scalar()
        if last is None:
            break
        count, lowest = sql(
            f"SELECT count(*), min(m.id) FROM hermes_messages m JOIN {_PG_PROBE} p "
            "ON p.id = m.id WHERE m.search_vector IS DISTINCT FROM p.search_vector "
            "OR m.search_cjk IS DISTINCT FROM p.search_cjk"
        ).one()
        stale += count
        first = first if first is not None else lowest
        sql(f"TRUNCATE {_PG_PROBE}")
    sql(f"DROP TABLE {_PG_PROBE}")
    if stale:
        problems.append(
            f"{stale} messages out of step with the index (the first: message id {first})"
        )
    return problems


_PG_PROBE = "hermes_verify_search_probe"


def _varint(data: bytes) -> int:
    """SQLite's variable-length integer at the start of ``data``."""
    value = 0
    for i, byte in enumerate(data[:9]):
        if i == 8:  # the ninth byte gives all its 8 bits
            return (value << 8) | byte
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            break
    return value


_TEMP = (
    "hermes_verify_words",
    "hermes_verify_probe_words",
    "hermes_verify_probe",
    "hermes_verify_indexed",
)


def _words_coverage(conn: Connection) -> list[str]:
    """SQLite: ``hermes_search`` (contentless) holds a row for each message and no other.

    Being contentless without a docsize table, it is read through its index: the
    row count of its averages record, and the rowids its words are indexed under
    (an ``fts5vocab`` table). A message whose body has no word is only in the count:
    a message missing from the rowids is missing when its body, indexed the same
    way in a table of the connection's own, has a word.
    """
    sql = conn.exec_driver_sql
    problems = []
    block = sql("SELECT block FROM hermes_search_data WHERE id = 1").scalar()
    messages = sql("SELECT count(*) FROM hermes_messages").scalar_one()
    if block is not None and not isinstance(block, bytes):
        # Other SQL wrote it: FTS5 keeps a blob there (its row count first).
        problems.append(
            f"hermes_search's averages record holds {type(block).__name__} data, not FTS5's"
        )
    elif (rows := _varint(block) if block else 0) != messages:
        problems.append(f"hermes_search holds {rows} rows, {messages} messages are stored")
    definition = sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'hermes_search'"
    ).scalar_one()
    probe = re.sub(
        r"^\s*CREATE\s+VIRTUAL\s+TABLE\s+\S+",
        "CREATE VIRTUAL TABLE temp.hermes_verify_probe",
        definition,
        flags=re.IGNORECASE,
    )
    try:
        for table in _TEMP:
            sql(f"DROP TABLE IF EXISTS temp.{table}")
        sql(
            "CREATE VIRTUAL TABLE temp.hermes_verify_words "
            "USING fts5vocab(main, hermes_search, instance)"
        )
        sql("CREATE TEMP TABLE hermes_verify_indexed(id INTEGER PRIMARY KEY)")
        sql("INSERT OR IGNORE INTO temp.hermes_verify_indexed SELECT doc FROM hermes_verify_words")
        extra = list(
            sql(
                "SELECT id FROM temp.hermes_verify_indexed "
                "WHERE id NOT IN (SELECT id FROM hermes_messages) ORDER BY id"
            ).scalars()
        )
        if extra:
            problems.append(
                f"hermes_search indexes {len(extra)} messages that are gone (ids {extra[:_SHOWN]})"
            )
        sql(probe)
        sql(
            "INSERT INTO temp.hermes_verify_probe(rowid, body) SELECT id, body "
            "FROM hermes_search_source WHERE id NOT IN (SELECT id FROM temp.hermes_verify_indexed)"
        )
        sql(
            "CREATE VIRTUAL TABLE temp.hermes_verify_probe_words "
            "USING fts5vocab(temp, hermes_verify_probe, instance)"
        )
        missing = list(
            sql("SELECT DISTINCT doc FROM temp.hermes_verify_probe_words ORDER BY doc").scalars()
        )
        if missing:
            problems.append(
                f"{len(missing)} messages are missing from hermes_search (ids {missing[:_SHOWN]})"
            )
    finally:
        # A connection SQLAlchemy dropped (a Ctrl-C cut a statement short) took its
        # temporary tables with it; a statement on it would raise in the interrupt's place.
        if not conn.invalidated:
            for table in _TEMP:
                sql(f"DROP TABLE IF EXISTS temp.{table}")
    return problems


def _cjk_coverage(conn: Connection) -> list[str]:
    """SQLite: ``hermes_search_cjk`` holds the body of each message it is for, and no other."""
    sql = conn.exec_driver_sql
    problems = []
    missing = sql(
        "SELECT count(*) FROM hermes_search_cjk_source AS s WHERE NOT EXISTS "
        "(SELECT 1 FROM hermes_search_cjk AS c WHERE c.rowid = s.id AND c.body IS s.body)"
    ).scalar_one()
    if missing:
        problems.append(f"{missing} messages missing or out of date in hermes_search_cjk")
    extra = sql(
        "SELECT count(*) FROM hermes_search_cjk "
        "WHERE rowid NOT IN (SELECT id FROM hermes_search_cjk_source)"
    ).scalar_one()
    if extra:
        problems.append(f"hermes_search_cjk holds {extra} rows for no message of its")
    return problems
