"""The exactly-once rule inside an application's own ORM session.

Adding :class:`~hermes_orm.models.Message` objects to a session's ``messages``
(or with ``session_id`` set) in any :class:`sqlalchemy.orm.Session` assigns
their ``idx`` from the stored ``flushed_idx`` and advances it in the same ORM
flush. The cursor is read with ``SELECT ... FOR UPDATE`` (PostgreSQL); on
SQLite a concurrent writer that committed since this transaction's snapshot
makes the flush fail with "database is locked" rather than write a duplicate.
``UNIQUE(session_id, idx)`` stands behind both.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, event, select, update
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import UOWTransaction
from sqlalchemy.orm.util import identity_key

from hermes_orm import _codec
from hermes_orm.errors import InvalidMessageError, SessionNotFoundError
from hermes_orm.models import Message, Session

_sessions: Table = Session.__table__  # type: ignore[assignment]


def _session_key(message: Message) -> Session | str:
    parent = message.session
    if parent is not None:
        return parent
    if message.session_id is None:
        raise InvalidMessageError("a Message needs a session (or session_id) to be flushed")
    return message.session_id


@event.listens_for(OrmSession, "before_flush")
def assign_message_positions(session: OrmSession, _ctx: UOWTransaction, _instances: Any) -> None:
    """Give new messages their ``idx`` and advance their session's cursor."""
    # Grouped by session id, whether a message names its session by object or
    # by id: one group per session, so one cursor read and one range of idx.
    groups: dict[str, tuple[Session | str, list[Message]]] = {}
    for obj in session.new:  # insertion ordered: idx follows the order of add()
        if isinstance(obj, Message):
            key = _session_key(obj)
            session_id = key.id if isinstance(key, Session) else key
            if session_id is None:
                raise InvalidMessageError("a Message's session has no id yet")
            known, members = groups.setdefault(session_id, (key, []))
            if isinstance(key, Session) and not isinstance(known, Session):
                groups[session_id] = (key, members)
            members.append(obj)
    for key, new in groups.values():
        _advance(session, key, new)


def _advance(session: OrmSession, key: Session | str, new: list[Message]) -> None:
    if isinstance(key, Session):
        parent: Session | None = key
    else:
        loaded = session.identity_map.get(identity_key(Session, key))
        parent = loaded if isinstance(loaded, Session) else None
    pending = parent is not None and parent in session.new
    if pending:
        assert parent is not None
        cursor = parent.flushed_idx or 0
        tool_calls = parent.tool_call_count or 0
    else:
        session_id = parent.id if parent is not None else key
        assert isinstance(session_id, str)
        stored = session.execute(
            select(_sessions.c.flushed_idx, _sessions.c.tool_call_count)
            .where(_sessions.c.id == session_id)
            .with_for_update()
        ).first()
        if stored is None:
            raise SessionNotFoundError(session_id)
        cursor, tool_calls = stored.flushed_idx, stored.tool_call_count

    digest = b""
    for offset, message in enumerate(new):
        encoded = _codec.encode_message(_codec.row_to_message(message), offset)
        idx = cursor + offset
        if message.idx is not None and message.idx != idx:
            raise InvalidMessageError(
                f"idx {message.idx} was set by hand but the session's cursor gives {idx}; "
                "leave idx unset",
                index=offset,
            )
        for column, value in encoded.row.items():
            setattr(message, column, value)
        message.idx = idx
        tool_calls += encoded.tool_calls
        digest = encoded.digest
    end = cursor + len(new)
    values = {
        "flushed_idx": end,
        "message_count": end,
        "flushed_digest": digest,
        "tool_call_count": tool_calls,
    }
    if parent is not None:
        for column, value in values.items():
            setattr(parent, column, value)
    else:
        session.execute(
            update(_sessions)
            .where(_sessions.c.id == key, _sessions.c.flushed_idx == cursor)
            .values(values)
        )
