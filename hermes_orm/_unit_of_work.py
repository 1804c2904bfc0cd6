"""The exactly-once rule inside an application's own ORM session.

Once :func:`install_position_rule` put it on the application's sessions,
adding :class:`~hermes_orm.models.Message` objects to a session's ``messages``
(or with ``session_id`` set) assigns their ``idx`` from the stored
``flushed_idx`` and advances it in the same ORM flush. The cursor is moved
first, by one atomic ``UPDATE ... RETURNING`` that takes the write lock, so
concurrent writers queue instead of reading the same cursor;
``UNIQUE(session_id, idx)`` stands behind it. Without the rule, a ``Message``
added through the ORM is refused before anything is written.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, event, update
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import UOWTransaction
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from hermes_orm import _codec
from hermes_orm.errors import InvalidMessageError, SessionNotFoundError
from hermes_orm.models import Message, Session

_sessions: Table = Session.__table__  # type: ignore[assignment]
#: Marks a flush whose new messages the rule already placed.
_PLACED = "hermes_orm.positions_placed"


def _session_key(message: Message) -> Session | str:
    parent = message.session
    if parent is not None:
        return parent
    if message.session_id is None:
        raise InvalidMessageError("a Message needs a session (or session_id) to be flushed")
    return message.session_id


def install_position_rule(target: Any = OrmSession) -> None:
    """Put the position rule on ``target``'s ORM sessions (idempotent).

    Args:
        target: What :func:`sqlalchemy.event.listen` takes for session events:
            the :class:`sqlalchemy.orm.Session` class (every session of the
            process, the default), a subclass, a ``sessionmaker`` or one session.
    """
    if not event.contains(target, "before_flush", assign_message_positions):
        event.listen(target, "before_flush", assign_message_positions)


def remove_position_rule(target: Any = OrmSession) -> None:
    """Take the position rule off ``target`` (where :func:`install_position_rule` put it)."""
    if event.contains(target, "before_flush", assign_message_positions):
        event.remove(target, "before_flush", assign_message_positions)


def assign_message_positions(session: OrmSession, ctx: UOWTransaction, _instances: Any) -> None:
    """Give new messages their ``idx`` and advance their session's cursor."""
    # Once a flush, wherever the rule was installed (the Session class and a
    # sessionmaker both fire for that sessionmaker's sessions).
    if ctx.attributes.get(_PLACED):
        return
    ctx.attributes[_PLACED] = True
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
    """Take positions for ``new`` by moving the session's cursor first.

    For a stored session, one ``UPDATE ... SET flushed_idx = flushed_idx + n
    ... RETURNING flushed_idx`` moves the cursor: it takes the row's write
    lock (PostgreSQL) or the database's (SQLite) before anything else of the
    flush is written, so a concurrent writer waits rather than reading the
    same cursor. If the flush fails later, the rollback moves it back.
    """
    if isinstance(key, Session):
        parent: Session | None = key
    else:
        loaded = session.identity_map.get(identity_key(Session, key))
        parent = loaded if isinstance(loaded, Session) else None

    encoded = []
    for offset, message in enumerate(new):
        item = _codec.encode_message(_codec.row_to_message(message), offset)
        encoded.append(item)
    count = len(new)
    tool_calls = sum(e.tool_calls for e in encoded)
    digest = encoded[-1].digest

    if parent is not None and parent in session.new:
        cursor = parent.flushed_idx or 0  # not stored yet: nobody else can write it
        parent.flushed_idx = parent.message_count = cursor + count
        parent.tool_call_count = (parent.tool_call_count or 0) + tool_calls
        parent.flushed_digest = digest
    else:
        session_id = parent.id if parent is not None else key
        assert isinstance(session_id, str)
        c = _sessions.c
        moved = session.execute(
            update(_sessions)
            .where(c.id == session_id)
            .values(
                flushed_idx=c.flushed_idx + count,
                message_count=c.flushed_idx + count,
                tool_call_count=c.tool_call_count + tool_calls,
                flushed_digest=digest,
            )
            .returning(c.flushed_idx, c.tool_call_count)
        ).first()
        if moved is None:
            raise SessionNotFoundError(session_id)
        cursor = moved.flushed_idx - count
        if parent is not None:
            # Keep the loaded object in step without flushing it again.
            for column, value in (
                ("flushed_idx", moved.flushed_idx),
                ("message_count", moved.flushed_idx),
                ("tool_call_count", moved.tool_call_count),
                ("flushed_digest", digest),
            ):
                set_committed_value(parent, column, value)

    for offset, (message, item) in enumerate(zip(new, encoded, strict=True)):
        idx = cursor + offset
        if message.idx is not None and message.idx != idx:
            raise InvalidMessageError(
                f"idx {message.idx} was set by hand but the session's cursor gives {idx}; "
                "leave idx unset",
                index=offset,
            )
        for column, value in item.row.items():
            setattr(message, column, value)
        message.idx = idx
