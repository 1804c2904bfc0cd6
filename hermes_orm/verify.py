"""Check every invariant over a whole database, and repair what is derived.

``hermes-orm verify`` runs :func:`verify_database`. Per session it checks that
the messages sit at positions 0..n-1, that ``flushed_idx == n == message_count``,
the tool call count, each message's digest against its stored columns and the
session's ``flushed_digest`` against its last message; then that every parent
session exists and no lineage loops; then the search index.

A repair fixes derived data only and never deletes a message: positions with
holes are closed up in their order, the cursor and the counts are set from the
rows, digests are recomputed from the stored columns, a missing parent is
unlinked, and the search index is rebuilt. A loop in the lineage is reported,
not repaired (which link is wrong is the application's call).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Table, bindparam, select, update
from sqlalchemy.exc import DBAPIError

from hermes_orm import _codec
from hermes_orm import search as _search
from hermes_orm.models import Message, Session
from hermes_orm.store import SessionStore

_sessions: Table = Session.__table__  # type: ignore[assignment]
_messages: Table = Message.__table__  # type: ignore[assignment]
_READ = [_messages.c[name] for name in _codec.READ_COLUMNS]


@dataclass(frozen=True, slots=True)
class Problem:
    """One invariant found broken.

    Attributes:
        check: Which invariant (``positions``, ``cursor``, ``message_count``,
            ``tool_call_count``, ``digest``, ``flushed_digest``, ``parent``,
            ``lineage``, ``search``).
        session_id: The session it concerns (None for the search index).
        detail: What was found.
        repaired: A repair fixed it.
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
        }


def verify_database(store: SessionStore, *, repair: bool = False) -> Report:
    """Check the invariants of every session of ``store``'s database; repair if asked.

    Each session is checked (and repaired) in a transaction of its own, holding
    its row lock (its write lock on SQLite), so flushes can go on meanwhile.
    """
    report = Report()
    ids = store.read_transaction(
        lambda conn: list(conn.execute(select(_sessions.c.id).order_by(_sessions.c.id)).scalars())
    )
    for session_id in ids:
        found = store.write_transaction(
            functools.partial(_check_session, session_id=session_id, repair=repair)
        )
        report.sessions += 1
        report.messages += found[0]
        report.problems.extend(found[1])
    report.problems.extend(store.write_transaction(lambda conn: _check_lineage(conn, repair)))
    report.problems.extend(store.write_transaction(lambda conn: _check_search(conn, repair)))
    if repair and any(p.repaired for p in report.problems):
        for session_id in {p.session_id for p in report.problems if p.session_id}:
            store.forget_cursor(session_id)
    return report


def _check_session(conn: Connection, session_id: str, repair: bool) -> tuple[int, list[Problem]]:
    session = conn.execute(
        select(_sessions).where(_sessions.c.id == session_id).with_for_update()
    ).first()
    if session is None:  # deleted since it was listed
        return 0, []
    rows = conn.execute(
        select(_messages.c.id, _messages.c.idx, _messages.c.digest, *_READ)
        .where(_messages.c.session_id == session_id)
        .order_by(_messages.c.idx)
    ).all()
    problems: list[Problem] = []

    def found(check: str, detail: str) -> None:
        problems.append(Problem(check, session_id, detail, repaired=repair))

    n = len(rows)
    idxs = [row.idx for row in rows]
    if idxs != list(range(n)):
        holes = sorted(set(range(max(idxs, default=-1) + 1)) - set(idxs))[:10]
        found("positions", f"{n} messages at positions other than 0..{n - 1} (holes at {holes})")
        if repair:
            _close_up(conn, [row.id for row in rows])
    if session.flushed_idx != n:
        found("cursor", f"flushed_idx is {session.flushed_idx}, {n} messages are stored")
    if session.message_count != n:
        found("message_count", f"message_count is {session.message_count}, {n} are stored")
    digests: list[bytes] = []
    calls = 0
    for row in rows:
        encoded = _codec.encode_message(
            # Read through the columns' types: documents parsed, booleans as bools.
            _codec.decode_row(row[3:], driver_parses_json=True),
            row.idx,
        )
        calls += encoded.tool_calls
        digests.append(encoded.digest)
        if bytes(row.digest) != encoded.digest:
            found("digest", f"the message at position {row.idx} does not match its digest")
            if repair:
                conn.execute(
                    update(_messages).where(_messages.c.id == row.id).values(digest=encoded.digest)
                )
    if session.tool_call_count != calls:
        found("tool_call_count", f"tool_call_count is {session.tool_call_count}, {calls} stored")
    last = digests[-1] if digests else None
    stored_last = None if session.flushed_digest is None else bytes(session.flushed_digest)
    if stored_last != last:
        found("flushed_digest", "flushed_digest is not the digest of the last message")
    if repair and problems:
        conn.execute(
            update(_sessions)
            .where(_sessions.c.id == session_id)
            .values(flushed_idx=n, message_count=n, tool_call_count=calls, flushed_digest=last)
        )
    return n, problems


def _close_up(conn: Connection, message_ids: Sequence[int]) -> None:
    """Give the messages (ids in position order) positions 0..n-1, keeping their order."""
    # Out of the way first (negative), so no step collides with UNIQUE(session_id, idx).
    change = (
        update(_messages)
        .where(_messages.c.id == bindparam("message_id"))
        .values(idx=bindparam("position"))
    )
    conn.execute(change, [{"message_id": m, "position": -1 - i} for i, m in enumerate(message_ids)])
    conn.execute(change, [{"message_id": m, "position": i} for i, m in enumerate(message_ids)])


def _check_lineage(conn: Connection, repair: bool) -> list[Problem]:
    parents = dict(
        conn.execute(
            select(_sessions.c.id, _sessions.c.parent_session_id).where(
                _sessions.c.parent_session_id.is_not(None)
            )
        ).all()
    )
    known = set(conn.execute(select(_sessions.c.id)).scalars())
    problems = []
    for child, parent in parents.items():
        if parent not in known:
            problems.append(
                Problem("parent", child, f"parent session {parent!r} does not exist", repair)
            )
            if repair:
                conn.execute(
                    update(_sessions).where(_sessions.c.id == child).values(parent_session_id=None)
                )
    looped: set[str] = set()
    for start in parents:
        seen = [start]
        node = parents.get(start)
        while node is not None and node not in looped:
            if node in seen:
                loop = seen[seen.index(node) :]
                looped.update(loop)
                problems.append(Problem("lineage", node, f"parent links loop: {' -> '.join(loop)}"))
                break
            seen.append(node)
            node = parents.get(node)
    return problems


def _check_search(conn: Connection, repair: bool) -> list[Problem]:
    """The search index covers every message (SQLite: FTS5's own checks too)."""
    problems = []
    if conn.dialect.name == "sqlite":
        for table in ("hermes_search", "hermes_search_cjk"):
            try:
                conn.exec_driver_sql(f"INSERT INTO {table}({table}) VALUES ('integrity-check')")
            except DBAPIError as exc:
                problems.append(Problem("search", None, f"{table}: {exc.orig}", repair))
        stale = conn.exec_driver_sql(
            "SELECT (SELECT count(*) FROM hermes_search_cjk)"
            " - (SELECT count(*) FROM hermes_search_cjk_source)"
        ).scalar_one()
    else:  # the trigger gives every row its vector, empty ones included
        stale = conn.exec_driver_sql(
            "SELECT count(*) FROM hermes_messages WHERE search_vector IS NULL"
        ).scalar_one()
    if stale:
        problems.append(Problem("search", None, f"{abs(stale)} messages out of the index", repair))
    if repair and problems:
        _search.rebuild(conn)
    return problems
