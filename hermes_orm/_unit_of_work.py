"""The exactly-once rule inside an application's own ORM session.

Once :func:`install_position_rule` put it on the application's sessions,
adding :class:`~hermes_orm.models.Message` objects to a session's ``messages``
(or with ``session_id`` set) assigns their ``idx`` from the stored
``flushed_idx`` and advances it in the same ORM flush. The cursor is moved
first, by one atomic ``UPDATE ... RETURNING`` that takes the write lock, so
concurrent writers queue instead of reading the same cursor;
``UNIQUE(session_id, idx)`` stands behind it. Without the rule, a ``Message``
added through the ORM is refused before anything is written.

The rule covers the ORM's statements on ``hermes_messages`` too: an
``insert(Message)`` executed with its rows as parameters gets its positions the
same way (one ``UPDATE ... RETURNING`` per session, in the same transaction),
and ``update``/``delete`` statements are refused. Stored messages are the
history: deleting one, or moving it (its ``idx`` or ``session_id``), is refused
in every ORM session, with the rule or without it. The legacy
``bulk_save_objects``/``bulk_insert_mappings``/``bulk_update_mappings`` run no
ORM event: the rule watches its sessions' connections and refuses their writes
into ``hermes_messages``.

A session's counters (``flushed_idx``, ``message_count``, ``tool_call_count``,
``flushed_digest``) move only with its messages: setting them on a
:class:`~hermes_orm.models.Session` object (a new one, or a stored one) is
refused in every ORM session, and so is an ``update(Session)`` or
``insert(Session)`` statement that sets them in a session with the rule
(``values()``, rows, ``from_select()``, ``ON CONFLICT DO UPDATE``, ``INSERT
OR REPLACE``).

What the rule sets on new objects in a flush that does not land (a failed
flush, a rolled-back transaction or savepoint) stays on them; flushed once
more, those values count as unset: a new Session's counters start at 0
again, a Message's ``idx`` (and the id the database gave it) are placed
again. Values changed by hand since are checked as such (see ``_rule_set``).

Deleting a :class:`~hermes_orm.models.Session` through the ORM takes its
messages and the rows that hang on it along, by the database's ``ON DELETE``
rules; on a SQLite connection with ``foreign_keys`` off (SQLite's default, an
application's engine) the same rules are applied here: for a Session object
in every ORM session, for a ``delete(Session)`` statement (which runs no
mapper event) in a session with the rule. Without the rule, such a statement
relies on the database's foreign keys.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Delete,
    Insert,
    Table,
    Update,
    event,
    false,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Result
from sqlalchemy.orm import (
    ORMExecuteState,
    SessionTransaction,
    UOWTransaction,
    object_session,
    scoped_session,
    sessionmaker,
)
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key
from sqlalchemy.sql import ClauseElement

from hermes_orm import _codec, _dialects, _sa
from hermes_orm.errors import (
    DatabaseError,
    InvalidArgumentError,
    InvalidMessageError,
    InvalidSessionError,
    SessionNotFoundError,
)
from hermes_orm.models import Message, Session

_sessions: Table = Session.__table__  # type: ignore[assignment]
#: The name of the sessions' primary key (an ON CONFLICT may name it).
_PRIMARY_KEY = str(_sessions.primary_key.name)
_messages: Table = Message.__table__  # type: ignore[assignment]
#: Marks a flush whose new messages the rule already placed, and a statement
#: whose rows it placed or that it runs itself (an execution option): let through.
_PLACED = "hermes_orm.positions_placed"
#: The keys a row of ``insert(Message)`` may have: Message's column attributes.
_ROW_KEYS = frozenset(prop.key for prop in Message.__mapper__.column_attrs)
_SUPPORTED = (
    "insert messages with their rows as parameters, "
    "session.execute(insert(Message), [{'session_id': ..., 'role': ..., ...}, ...]) "
    "(RETURNING allowed), or with SessionStore.flush/append"
)
#: A session row's counters, which move only with its messages.
_COUNTERS = ("flushed_idx", "message_count", "tool_call_count", "flushed_digest")
#: Drawn when a session is made and when hermes_orm rewrites its messages: never
#: copied, never set (a stored session given an old one would pass for that history).
_HISTORY_ID = "history_id"
_HISTORY_ID_DRAWN = (
    "a session's history_id is drawn when it is made (the model's default) and when "
    "hermes_orm rewrites its messages; it is not set"
)
_COUNTERS_MOVE = (
    "a session's flushed_idx, message_count, tool_call_count and flushed_digest move only "
    "with its messages (SessionStore.flush/append, or Message objects added through the "
    "position rule)"
)
#: In a flush's unit of work (``UOWTransaction.attributes``): the token of that
#: flush, which what the rule sets in it is remembered with.
_TOKEN = "hermes_orm.flush_token"
#: In a flush's unit of work: the new messages (by ``id()``) pending as the rule ran
#: that the objects given to ``flush(objects)`` left out.
_LEFT_OUT = "hermes_orm.left_out"
#: What the rule set on new objects (a new Session's counters, a new Message's
#: ``idx``), with the token of the flush it set them in. A rolled-back flush
#: leaves those values on the objects (SQLAlchemy expunges the new objects of a
#: transaction it rolls back, and keeps their attributes); flushed once more,
#: in a later flush, a value still equal to what the rule set is a leftover of
#: a flush that did not land: it counts as unset (a counter starts at 0 again,
#: an idx is placed again). A value that differs was set by hand, and is
#: refused as such. (A flush that landed leaves its objects stored: they are
#: not new again, unless made transient by hand, when starting over is right too.)
_rule_set: weakref.WeakKeyDictionary[object, tuple[object, dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)
#: What a new session's counters hold before it has messages.
_STARTS: dict[str, Any] = {
    "flushed_idx": 0,
    "message_count": 0,
    "tool_call_count": 0,
    "flushed_digest": None,
}
#: What a new message holds before the rule placed it and the database gave it an id.
_IDX_STARTS: dict[str, Any] = {"idx": None, "id": None}
_HISTORY = (
    "stored messages are the session's history and their positions 0..n-1 stay dense; "
    "delete the whole session (SessionStore.delete_session, or its Session object) "
    "or store a rewritten conversation in a new session"
)


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
            process, the default), a subclass, a ``sessionmaker``, a
            ``scoped_session`` or one session.

    Raises:
        InvalidArgumentError: ``target`` is none of those (an ``AsyncSession``'s
            rule goes on its ``sync_session_class``, or on its ``sync_session``).
    """
    _check_target(target, "install_position_rule")
    for name, listener in _LISTENERS:
        if not event.contains(target, name, listener):
            event.listen(target, name, listener)


def _check_target(target: Any, name: str) -> None:
    """Refuse a ``target`` that has no ORM session events (see :func:`install_position_rule`)."""
    if (isinstance(target, type) and issubclass(target, OrmSession | scoped_session)) or (
        isinstance(target, OrmSession | sessionmaker | scoped_session)
    ):
        return
    given = f"the class {target.__name__}" if isinstance(target, type) else type(target).__name__
    asynchronous = getattr(target, "class_", target)  # (an async_sessionmaker's sessions)
    remedy = ""
    if hasattr(asynchronous, "sync_session_class") or hasattr(target, "sync_session"):
        remedy = (
            ": an AsyncSession runs a Session, whose class (its sync_session_class) or "
            "instance (its sync_session) takes the rule"
        )
    raise InvalidArgumentError(
        f"{name}() takes the Session class, a subclass, a sessionmaker, a scoped_session "
        f"or one Session, got {given}{remedy}"
    )


def remove_position_rule(target: Any = OrmSession) -> None:
    """Take the position rule off ``target`` (where :func:`install_position_rule` put it).

    Raises:
        InvalidArgumentError: As :func:`install_position_rule`.
    """
    _check_target(target, "remove_position_rule")
    for name, listener in _LISTENERS:
        if event.contains(target, name, listener):
            event.remove(target, name, listener)


# -- what writes messages outside the rule's paths ------------------------------------
#
# The legacy bulk API (bulk_save_objects, bulk_insert_mappings,
# bulk_update_mappings) runs no ORM event: its rows reach the connection
# without positions. The rule watches the connections its sessions begin on
# and refuses a write into hermes_messages that neither a flush it placed nor a
# statement it placed sent.

#: The connections whose writes the rule watches, with every ORM session that
#: began a transaction on each (sessions bound to an application's own
#: connection share it, one after the other or side by side), held weakly.
_watched: weakref.WeakKeyDictionary[Connection, weakref.WeakSet[OrmSession]] = (
    weakref.WeakKeyDictionary()
)


#: In an ORM session's ``info``: the unit of work of its flush under way.
_FLUSH = "hermes_orm.flush"


#: In an ORM session's ``info``: the transaction in which the rule moved a stored
#: session's cursor for a flush whose rows are not written yet. Taken off when
#: that flush ends or that transaction rolls back. Still there at the next
#: flush or commit: a ``before_flush`` hook raised after the rule's (or the
#: rule failed after a move), so the flush never ran.
_MOVED = "hermes_orm.cursor_moved"


def _flush_begins(session: OrmSession, ctx: UOWTransaction, _instances: Any) -> None:
    session.info[_FLUSH] = ctx


def _flush_ends(session: OrmSession, *_args: Any) -> None:
    session.info.pop(_FLUSH, None)
    session.info.pop(_MOVED, None)


#: In an ORM session's ``info``: the ids of the stored sessions whose cursor the rule
#: moved inside a savepoint, by that savepoint (its ``SessionTransaction``). Rolling
#: a savepoint back expires only the objects the application changed in it; the
#: counters the rule set, as committed values, on a loaded session object would
#: keep what the savepoint undid.
_MOVED_IN_SAVEPOINT = "hermes_orm.moved_in_savepoint"


def _rolled_back(session: OrmSession, previous: SessionTransaction) -> None:
    """A rollback: the counters of sessions moved in the savepoints it undid are expired.

    A transaction rolls back to its nearest savepoint or the root (a flush that
    fails in a savepoint rolls back its own subtransaction, and so the savepoint).
    """
    session.info.pop(_FLUSH, None)
    moved = session.info.get(_MOVED_IN_SAVEPOINT)
    if not moved:
        return
    undone = previous
    while not undone.nested and undone.parent is not None:
        undone = undone.parent
    for savepoint in [t for t in moved if _within(t, undone)]:
        for session_id in moved.pop(savepoint):
            loaded = _loaded_session(session, session_id)
            if loaded is not None:
                session.expire(loaded, _COUNTERS)  # read again at their next use


def _within(transaction: SessionTransaction | None, outer: SessionTransaction) -> bool:
    """Whether ``transaction`` is ``outer`` or was begun inside it."""
    while transaction is not None:
        if transaction is outer:
            return True
        transaction = transaction.parent
    return False


def _transaction_ended(session: OrmSession, transaction: SessionTransaction) -> None:
    """A transaction ended (rolled back, closed, reset): a move made in it is undone."""
    moved_in = session.info.get(_MOVED)
    if moved_in is not None and (transaction is moved_in or transaction.parent is None):
        del session.info[_MOVED]
    if transaction.parent is None:
        session.info.pop(_MOVED_IN_SAVEPOINT, None)  # (a whole rollback expires everything)


def _refuse_abandoned_move(session: OrmSession, *_args: Any) -> None:
    """Refuse to go on in a transaction where a cursor moved for rows no flush wrote.

    Nothing is rolled back here (a hook may not end the transaction a commit
    or flush is under way in): every flush and commit is refused until the
    application rolls back, which moves the cursor back.

    Raises:
        InvalidSessionError: A flush was abandoned after its messages took positions.
    """
    if session.info.get(_MOVED) is not None:
        raise InvalidSessionError(
            "a flush was abandoned (an exception in a before_flush hook, or a refusal) "
            "after its new messages took their positions: roll the transaction back "
            "(session.rollback()), which moves the cursor back, and add them again"
        )


def _in_flush(session: OrmSession) -> bool:
    """Whether ``session``'s statements now are those of a flush's unit of work.

    A flush gets its transaction only once every ``before_flush`` hook ran: one
    that a hook refused never had one, and its writes never reach a
    connection, so the mark it left behind lets nothing through.
    (SQLAlchemy's own flushing state is set by the legacy bulk API too.)
    """
    ctx = session.info.get(_FLUSH)
    return ctx is not None and getattr(ctx, "transaction", None) is not None


def _flush_token(ctx: UOWTransaction) -> object:
    """The token of the flush ``ctx`` is the unit of work of (made on first use)."""
    token = ctx.attributes.get(_TOKEN)
    if token is None:
        token = ctx.attributes[_TOKEN] = object()
    return token


def _token_of(session: OrmSession | None) -> object | None:
    """The token of ``session``'s flush under way; None if the rule gave it none."""
    ctx = session.info.get(_FLUSH) if session is not None else None
    return None if ctx is None else ctx.attributes.get(_TOKEN)


def _set_by_rule(obj: object, token: object | None, starts: Mapping[str, Any]) -> bool:
    """Whether the rule set ``obj``'s values in the flush of ``token``.

    Values it set in another flush (one that did not land, see ``_rule_set``)
    are forgotten, and each one ``obj`` still holds is put back to its value
    in ``starts``; a value changed since is left as it is, set by hand.
    """
    remembered = _rule_set.get(obj)
    if remembered is None:
        return False
    set_in, values = remembered
    if token is not None and set_in is token:
        return True
    del _rule_set[obj]
    held = inspect(obj).dict
    for key, value in values.items():
        if key in held and type(held[key]) is type(value) and held[key] == value:
            setattr(obj, key, starts[key])
    return False


def _watch(session: OrmSession, _transaction: Any, connection: Connection) -> None:
    """Watch the writes the session sends on ``connection`` (a new transaction's)."""
    sessions = _watched.get(connection)
    if sessions is None:
        sessions = _watched[connection] = weakref.WeakSet()
        event.listen(connection, "before_execute", _refuse_unplaced)
    sessions.add(session)


def _refuse_unplaced(
    conn: Connection, statement: Any, multi: Any, params: Any, options: Any
) -> None:
    """Refuse what the legacy bulk API writes around the rule: messages, a session's counters."""
    if not isinstance(statement, Insert | Update | Delete):
        return
    if statement.table is not _messages and statement.table is not _sessions:
        return
    if options.get(_PLACED) or any(_in_flush(session) for session in _watched.get(conn, ())):
        return
    if statement.table is _sessions:
        if not isinstance(statement, Delete):
            rows = [*(multi or ()), *([params] if params else [])]
            _refuse_counters(statement, rows, insert=isinstance(statement, Insert))
        return
    raise InvalidMessageError(
        "a write to hermes_messages outside a flush, on a connection an ORM session with "
        "the position rule began on (the legacy bulk API: bulk_save_objects, "
        "bulk_insert_mappings, bulk_update_mappings; or a Core statement), writes messages "
        f"without positions: {_SUPPORTED}"
    )


# -- placing new messages ----------------------------------------------------------------


class _Claim(NamedTuple):
    """The cursor that ``idx`` values set by hand claim for a session's new messages."""

    cursor: int
    #: The first hand-set message: its idx, and its index for the error message.
    idx: int
    at: int

    def refused(self, cursor: int) -> InvalidMessageError:
        given = cursor + self.idx - self.cursor
        return InvalidMessageError(
            f"idx {self.idx} was set by hand but the session's cursor gives {given}; "
            "leave idx unset",
            index=self.at,
        )


class _RowView:
    """A row of ``insert(Message)`` parameters, read like a Message by the codec."""

    __slots__ = ("row",)

    def __init__(self, row: Mapping[str, Any]) -> None:
        self.row = row

    def __getattr__(self, name: str) -> Any:
        return self.row.get(name)


def _encode(row: Any, index: int) -> _codec.EncodedMessage:
    """Validate and encode the message a Message (or a row of its columns) holds.

    Raises:
        InvalidMessageError: Its columns do not make one message (see
            :func:`_refuse_disagreeing_columns`), or the message is not one a
            store takes.
    """
    _refuse_disagreeing_columns(row, index)
    try:
        message = _codec.row_to_message(row)
    except (TypeError, KeyError, ValueError) as exc:  # (key_order naming a key not there)
        raise InvalidMessageError(
            f"its columns do not make a message: {type(exc).__name__}: {exc}", index=index
        ) from None
    return _codec.encode_message(message, index)


def _refuse_disagreeing_columns(row: Any, index: int) -> None:
    """Refuse a Message whose columns say two things of one key.

    Set by hand (not by ``Message.from_dict``): ``extra`` holding a key its own
    column holds too, content in both ``content`` and ``content_parts``; or an
    ``idx`` no position can be.

    Raises:
        InvalidMessageError: It does.
    """
    extra = row.extra
    if extra is not None and not isinstance(extra, dict):
        raise InvalidMessageError(
            f"extra must be a dict of the keys without a column, got {type(extra).__name__}",
            index=index,
            key="extra",
        )
    held = {"role"} if row.role is not None else set()
    if row.content is not None or row.content_parts is not None:
        if row.content is not None and row.content_parts is not None:
            raise InvalidMessageError(
                "content is held by content or by content_parts, not both", index=index
            )
        held.add("content")
    held.update(key for key in _codec.MESSAGE_FIELDS if getattr(row, key) is not None)
    for key in held.intersection(extra or ()):
        if key == "timestamp" and extra is not None and _same_time(extra[key], row.timestamp):
            continue  # (the int as given, its column the float)
        raise InvalidMessageError(
            f"{key!r} is held by its own column and by extra, which disagree; build the "
            "Message with Message.from_dict",
            index=index,
            key=key,
        )
    idx = row.idx
    if type(idx) is int and not 0 <= idx < _IDX_LIMIT:
        raise InvalidMessageError(f"idx must be from 0 to {_IDX_LIMIT - 1}", index=index, key="idx")


#: Positions are 32-bit ints (PostgreSQL's INTEGER).
_IDX_LIMIT = 2**31


def _same_time(given: Any, column: Any) -> bool:
    """Whether ``given`` (a timestamp in ``extra``) is an int whose float ``column`` holds.

    (An int past 2**53, nanoseconds say, differs from its float by a few units.)
    """
    if type(given) is not int:
        return False
    try:
        return bool(float(given) == column)
    except OverflowError:
        return False


def _claim(given: Sequence[tuple[Any, int]]) -> _Claim | None:
    """The cursor the hand-set ``idx`` values claim, ``(idx or None, index)`` in order.

    Raises:
        InvalidMessageError: An idx that is not an int, or two that disagree.
    """
    claim: _Claim | None = None
    for offset, (idx, index) in enumerate(given):
        if idx is None:
            continue
        if type(idx) is not int:
            raise InvalidMessageError(
                f"idx must be an int, got {type(idx).__name__}", index=index, key="idx"
            )
        if claim is None:
            claim = _Claim(idx - offset, idx, index)
        elif idx - offset != claim.cursor:
            raise InvalidMessageError(
                f"idx {idx} was set by hand but gives a position other than "
                f"{claim.cursor + offset} (after idx {claim.idx}); leave idx unset",
                index=index,
            )
    return claim


def _messages_bind() -> dict[str, Any]:
    """Where the rule's own statements go: the bind of hermes_orm's messages (a new dict).

    An ORM session may bind tables to several databases (``binds=``, by class or
    by declarative base). The cursor must move in the database, and the
    transaction, its messages are inserted in, which the ORM finds by their
    mapper: a Core statement on the sessions table would go to the session's
    default bind instead.
    """
    return {"mapper": inspect(Message)}


def _check_sessions(session: OrmSession, claims: Mapping[str, _Claim | None]) -> None:
    """Refuse, before any cursor moves, sessions that are missing or not at a claimed cursor.

    Needed when several sessions' cursors move in one go: a refusal after the
    first one moved would leave it moved. The rows are locked (``FOR UPDATE``
    on PostgreSQL), in id order, 500 at a time; on SQLite, which has no row locks, the
    database's write lock is taken first (a write that changes nothing), so no
    other writer moves a cursor between the check and the moves.
    """
    if len(claims) < 2:
        return  # one guarded UPDATE refuses before it writes
    c = _sessions.c
    bind = _messages_bind()
    connection = session.connection(bind_arguments=bind)
    dialect = connection.dialect.name
    if dialect == "sqlite":
        _take_sqlite_write_lock(connection)
    stored: dict[str, int] = {}
    order = _dialects.lock_order(c.id, dialect)
    for part in _dialects.in_parts(sorted(claims)):  # (each IN list within the driver's bounds)
        rows = session.execute(
            select(c.id, c.flushed_idx).where(c.id.in_(part)).order_by(order).with_for_update(),
            bind_arguments=bind,
        )
        stored.update((row.id, row.flushed_idx) for row in rows)
    for session_id, claim in claims.items():
        if session_id not in stored:
            raise SessionNotFoundError(session_id)
        if claim is not None and claim.cursor != stored[session_id]:
            raise claim.refused(stored[session_id])


def _take_sqlite_write_lock(connection: Connection) -> None:
    """Take SQLite's write lock on ``connection`` now: a write that changes nothing.

    Until a transaction writes, another writer may commit between two of its
    reads (sqlite3 begins it at its first write).
    """
    c = _sessions.c
    connection.execute(
        update(_sessions).where(false()).values(flushed_idx=c.flushed_idx),
        execution_options={_PLACED: True},  # the rule's own statement
    )


def _move_cursor(
    session: OrmSession,
    session_id: str,
    encoded: Sequence[_codec.EncodedMessage],
    claim: _Claim | None,
    parent: Session | None,
) -> int:
    """Take ``len(encoded)`` positions of a stored session; the first one's idx.

    One ``UPDATE ... SET flushed_idx = flushed_idx + n ... RETURNING
    flushed_idx`` moves the cursor: it takes the row's write lock
    (PostgreSQL) or the database's (SQLite) before the messages are written,
    so a concurrent writer waits rather than reading the same cursor. With a
    ``claim`` it moves only from the claimed cursor; when nothing moved,
    nothing was written.
    """
    count = len(encoded)
    tool_calls = sum(e.tool_calls for e in encoded)
    digest = encoded[-1].digest
    c = _sessions.c
    # A cursor other SQL set to no position (SQLite keeps any value) moves nothing.
    statement = update(_sessions).where(c.id == session_id, c.flushed_idx >= 0)
    bind = _messages_bind()
    if session.connection(bind_arguments=bind).dialect.name == "sqlite":
        statement = statement.where(func.typeof(c.flushed_idx) == "integer")
    if claim is not None:
        statement = statement.where(c.flushed_idx == claim.cursor)
    moved = session.execute(
        statement.values(
            flushed_idx=c.flushed_idx + count,
            message_count=c.flushed_idx + count,
            tool_call_count=c.tool_call_count + tool_calls,
            flushed_digest=digest,
        ).returning(c.flushed_idx, c.tool_call_count),
        execution_options={_PLACED: True},
        bind_arguments=bind,
    ).first()
    if moved is None:
        stored = session.execute(
            select(c.flushed_idx).where(c.id == session_id), bind_arguments=bind
        ).first()
        if stored is None:
            raise SessionNotFoundError(session_id)
        cursor = stored.flushed_idx
        if not _codec.whole_int64(cursor):
            raise DatabaseError(
                f"session {session_id!r} holds flushed_idx {cursor!r}, not a position; nothing "
                "was written (`hermes-orm verify --repair` sets it from the rows)"
            )
        if claim is None:  # (not reached: only a row gone or damaged moves nothing here)
            raise SessionNotFoundError(session_id)
        raise claim.refused(cursor)
    savepoint = session.get_nested_transaction()
    if savepoint is not None:
        session.info.setdefault(_MOVED_IN_SAVEPOINT, {}).setdefault(savepoint, set()).add(
            session_id
        )
    if parent is not None:
        # Keep the loaded object in step without flushing it again.
        for column, value in (
            ("flushed_idx", moved.flushed_idx),
            ("message_count", moved.flushed_idx),
            ("tool_call_count", moved.tool_call_count),
            ("flushed_digest", digest),
        ):
            set_committed_value(parent, column, value)
    return int(moved.flushed_idx) - count


def _loaded_session(session: OrmSession, session_id: str) -> Session | None:
    loaded = session.identity_map.get(identity_key(Session, session_id))
    return loaded if isinstance(loaded, Session) else None


def assign_message_positions(session: OrmSession, ctx: UOWTransaction, instances: Any) -> None:
    """Give new messages their ``idx`` and advance their session's cursor.

    Deleting or moving a stored message is refused first, before anything is
    written; so is anything wrong with the new messages and sessions. A flush
    of some objects only (``session.flush(objects)``) places those only.
    """
    # Once a flush, wherever the rule was installed (the Session class and a
    # sessionmaker both fire for that sessionmaker's sessions).
    if ctx.attributes.get(_PLACED):
        return
    ctx.attributes[_PLACED] = True
    _refuse_abandoned_move(session)
    token = _flush_token(ctx)
    _refuse_history_changes(session)
    # Grouped by session id, whether a message names its session by object or
    # by id: one group per session, so one cursor read and one range of idx.
    groups: dict[str, tuple[Session | str, list[Message]]] = {}
    # New sessions by id: a message may name one by id (no relationship set).
    pending: dict[str, Session] = {}
    flushed: Iterable[Any] = session.new
    # New sessions a flush of some objects leaves out, by id: none of their messages goes.
    left_out: dict[str, Session] = {}
    if instances is not None:  # insertion ordered still: idx follows the order of add()
        given = set(map(id, instances))
        flushed = [obj for obj in flushed if id(obj) in given]
        ctx.attributes[_LEFT_OUT] = {
            id(obj) for obj in session.new if isinstance(obj, Message) and id(obj) not in given
        }
        left_out = {
            obj.id: obj
            for obj in session.new
            if isinstance(obj, Session) and id(obj) not in given and isinstance(obj.id, str)
        }
    for obj in flushed:  # insertion ordered: idx follows the order of add()
        if isinstance(obj, Session):
            pending[_codec.check_session_id(obj.id)] = obj  # as a store takes ids
        elif isinstance(obj, Message):
            key = _session_key(obj)
            session_id = key.id if isinstance(key, Session) else key
            if session_id is None:
                raise InvalidMessageError("a Message's session has no id yet")
            if type(session_id) is not str or session_id not in groups:  # (once a session)
                _codec.check_session_id(session_id)
            known, members = groups.setdefault(session_id, (key, []))
            if isinstance(key, Session) and not isinstance(known, Session):
                groups[session_id] = (key, members)
            members.append(obj)
    placed = []
    for session_id, (key, new) in groups.items():
        parent = key if isinstance(key, Session) else pending.get(session_id)
        if parent is None:
            parent = left_out.get(session_id) or _loaded_session(session, session_id)
        if left_out and parent is not None and left_out.get(session_id) is parent:
            # It would go in later, its counters then at 0 under the messages placed now.
            raise InvalidSessionError(
                f"session {session_id!r} is new and not among the objects flushed: flush it "
                "with its messages"
            )
        encoded = [_encode(message, offset) for offset, message in enumerate(new)]
        for message in new:
            _set_by_rule(message, token, _IDX_STARTS)  # an idx left by a failed flush: unset
        claim = _claim([(message.idx, offset) for offset, message in enumerate(new)])
        placed.append((session_id, parent, new, encoded, claim))
    if not placed:
        return
    _refuse_autocommit(session)
    # New sessions first: what is refused there is refused before any cursor moves.
    placed.sort(key=lambda group: group[1] is None or group[1] not in session.new)
    stored = {
        session_id: claim
        for session_id, parent, _, _, claim in placed
        if parent is None or parent not in session.new
    }
    _check_sessions(session, stored)
    moved = False
    try:
        for session_id, parent, new, encoded, claim in placed:
            moved = (
                _advance(
                    session, session_id, parent, new, encoded=encoded, claim=claim, token=token
                )
                or moved
            )
    finally:
        if moved:  # taken off when this flush ends (its rows written) or rolls back
            session.info[_MOVED] = _innermost(session)


def _innermost(session: OrmSession) -> SessionTransaction | None:
    """``session``'s innermost transaction: its savepoint, if one is open."""
    return session.get_nested_transaction() or session.get_transaction()


def _refuse_autocommit(session: OrmSession) -> None:
    """Refuse placing messages on a connection whose statements commit one by one.

    The cursor would be committed moved without the rows a failing statement
    of the same flush was to write. So it would in a session that binds
    ``Message`` and ``Session`` to two databases (two transactions).

    Raises:
        InvalidArgumentError: The session's connection for hermes_orm's tables
            autocommits, or its binds split them.
    """
    if session.get_bind(mapper=inspect(Message)) is not session.get_bind(mapper=inspect(Session)):
        raise InvalidArgumentError(
            "this ORM session binds hermes_orm's Message and Session to different databases: "
            "a message and its session's cursor are written in one transaction, so bind "
            "both to one (binds={hermes_orm.models.Base: engine}); nothing was written"
        )
    conn = session.connection(bind_arguments=_messages_bind())
    _dialects.check_transactional(conn)
    if conn.dialect.name == "postgresql":
        _dialects.check_driver_transactional(conn)
    elif conn.dialect.name == "sqlite":
        _dialects.check_sqlite_transactional(conn)


def _advance(
    session: OrmSession,
    session_id: str,
    parent: Session | None,
    new: list[Message],
    *,
    encoded: list[_codec.EncodedMessage],
    claim: _Claim | None,
    token: object,
) -> bool:
    """Take positions for ``new`` by moving the session's cursor first.

    If the flush fails later, the rollback moves it back. What is set on the
    objects is remembered with the flush's ``token`` (see ``_rule_set``).

    Returns:
        Whether a stored session's cursor moved (a statement ran).
    """
    if parent is not None and parent in session.new:
        cursor = 0  # not stored yet: nobody else can write it
        if not _set_by_rule(parent, token, _STARTS):
            error = _refused_counters(parent, new_object=True)
            if error is not None:
                raise error
        if claim is not None and claim.cursor != cursor:
            raise claim.refused(cursor)
        parent.flushed_idx = parent.message_count = cursor + len(new)
        parent.tool_call_count = sum(e.tool_calls for e in encoded)
        parent.flushed_digest = encoded[-1].digest
        _rule_set[parent] = (token, {key: getattr(parent, key) for key in _COUNTERS})
        moved = False
    else:
        cursor = _move_cursor(session, session_id, encoded, claim, parent)
        moved = True
        if parent is not None:
            # Made in this transaction, a rollback makes it new again, holding these.
            _rule_set[parent] = (token, {key: getattr(parent, key) for key in _COUNTERS})
    for offset, (message, item) in enumerate(zip(new, encoded, strict=True)):
        for column, value in item.row.items():
            setattr(message, column, value)
        message.idx = cursor + offset
        _rule_set[message] = (token, {"idx": message.idx})
    return moved


# -- statements on hermes_messages -------------------------------------------------------


def _on_table(state: ORMExecuteState, table: Table) -> bool:
    """Whether the statement writes ``table`` (through the ORM or as Core)."""
    mapper = state.bind_mapper
    if mapper is not None:
        return table in mapper.tables
    statement = state.statement
    return isinstance(statement, (Insert, Update, Delete)) and (
        statement.entity_description["table"] is table
    )


def _refuse_counter_statement(state: ORMExecuteState) -> None:
    """Refuse an UPDATE of ``hermes_sessions`` that sets a counter, an INSERT that starts one.

    The columns come from the statement's ``values()`` and from its rows given
    as parameters; an INSERT may give a counter 0 or None (a session with no
    messages yet). An INSERT may not fill a counter from a SELECT, nor set one
    in ``ON CONFLICT DO UPDATE`` (a stored session's: other columns may be
    upserted), nor be an ``INSERT OR REPLACE`` (which would put a stored
    session back at 0, its messages left behind where foreign keys are off).
    A statement whose columns cannot be read is refused.
    """
    params = state.parameters
    rows = [params] if isinstance(params, Mapping) else list(params or [])
    # A list of rows is SQLAlchemy's bulk UPDATE by primary key (their "id" names the
    # row); one dict of parameters gives the SET clause, "id" included.
    _refuse_counters(
        state.statement, rows, insert=state.is_insert, rows_set_id=isinstance(params, Mapping)
    )


def _refuse_counters(
    statement: Any, rows: Sequence[Mapping[str, Any]], *, insert: bool, rows_set_id: bool = True
) -> None:
    """:func:`_refuse_counter_statement` of an UPDATE or INSERT (``insert``) given ``rows``."""
    given = _sa.statement_values(statement)
    selected: list[str] | None = []
    on_conflict: list[str] | None = []
    prefixes: list[str] | None = []
    if insert:
        selected = _sa.insert_select_names(statement)
        sets = _sa.on_conflict_sets(statement)
        on_conflict = (
            None
            if sets is None
            else [
                key
                for key, value, clause in sets
                if not (key == "id" and _keeps_the_id(clause, value))
            ]
        )
        prefixes = _sa.statement_prefixes(statement)
    if given is None or selected is None or on_conflict is None or prefixes is None:
        raise InvalidSessionError(
            f"this form of {'INSERT' if insert else 'UPDATE'} on hermes_sessions "
            f"cannot be checked: {_COUNTERS_MOVE}"
        )
    for key in selected:
        if key in _COUNTERS:
            raise InvalidSessionError(f"{key} cannot be set from a SELECT: {_COUNTERS_MOVE}")
        if key == _HISTORY_ID:
            raise InvalidSessionError(f"{key} cannot be set from a SELECT: {_HISTORY_ID_DRAWN}")
    for key in on_conflict:
        if key in _COUNTERS:
            raise InvalidSessionError(f"{key} cannot be set ON CONFLICT: {_COUNTERS_MOVE}")
        if key == _HISTORY_ID:
            raise InvalidSessionError(f"{key} cannot be set ON CONFLICT: {_HISTORY_ID_DRAWN}")
    if any("REPLACE" in prefix.upper() for prefix in prefixes):
        raise InvalidSessionError(
            f"INSERT OR REPLACE would start a stored session's counters over: {_COUNTERS_MOVE}"
        )
    setting = [*given, *(rows if rows_set_id else ())]
    if "id" in on_conflict or (not insert and any("id" in row for row in setting)):
        # (An UPDATE's rows given as parameters name the sessions they update by id.)
        raise InvalidSessionError(f"a stored session's id cannot be changed: {_ID_STAYS}")
    for row in [*given, *rows]:
        for key, value in row.items():
            if key in _COUNTERS and (not insert or not _a_start(value)):
                raise InvalidSessionError(f"{key} cannot be set: {_COUNTERS_MOVE}")
            if key == _HISTORY_ID and not insert:
                raise InvalidSessionError(f"{key} cannot be set: {_HISTORY_ID_DRAWN}")
            if key == "id" and insert and not isinstance(value, ClauseElement):
                _codec.check_session_id(value)  # (as the store takes ids)


def _keeps_the_id(clause: Any, value: Any) -> bool:
    """Whether ``SET id = value`` in the ON CONFLICT ``clause`` leaves the id as it is.

    So it does as ``excluded.id`` on a conflict of the ``id`` column alone, or
    of the primary key by name: the row met holds that very id (an upsert
    setting every column it inserts).
    """
    targets = [getattr(e, "key", e) for e in clause.inferred_target_elements or ()]
    return (
        (
            targets == ["id"]
            or (not targets and getattr(clause, "constraint_target", None) == _PRIMARY_KEY)
        )
        and clause.inferred_target_whereclause is None
        and getattr(getattr(value, "table", None), "name", None) == "excluded"
        and getattr(value, "key", None) == "id"
    )


def _delete_sessions(state: ORMExecuteState) -> Result[Any] | None:
    """Run a DELETE statement on ``hermes_sessions`` with its ON DELETE rules applied.

    Where SQLite does not apply them (``foreign_keys`` off), the ids of the
    sessions the statement's WHERE picks are read first; after the DELETE, the
    rows that hang on those of them now gone are deleted (or their column
    cleared), in the same transaction, as for a deleted Session object. (After,
    not before: a WHERE may look at those rows.) If that fails, the session's
    transaction (or its innermost savepoint) is rolled back, so no session goes
    without them, nor they without their session.
    """
    session = state.session
    connection = session.connection(bind_arguments=state.bind_arguments)
    if not _sqlite_leaves_them(connection):
        return None  # the database applies them itself
    statement = state.statement
    if not isinstance(statement, Delete):  # what picks its rows cannot be read
        raise InvalidSessionError(
            "this form of DELETE on hermes_sessions cannot be run with its ON DELETE rules "
            "applied; delete Session objects, or use SessionStore.delete_session"
        )
    # Locked first: a session another writer makes meanwhile is either picked here or
    # made after the DELETE, never deleted without what hangs on it.
    _take_sqlite_write_lock(connection)
    chosen = select(_sessions.c.id)
    if statement.whereclause is not None:
        chosen = chosen.where(statement.whereclause)
    params = state.parameters
    each = [params] if isinstance(params, Mapping) else list(params or [{}])
    picked = {
        session_id for row in each for session_id in connection.execute(chosen, row).scalars()
    }
    result = state.invoke_statement()  # failing, it wrote nothing: the caller's to handle
    try:
        ids = sorted(picked)
        for some in _dialects.in_parts(ids):
            still = select(_sessions.c.id).where(_sessions.c.id.in_(some))
            kept = set(connection.execute(still).scalars())
            gone = [session_id for session_id in some if session_id not in kept]
            if gone:
                _apply_on_delete(connection, gone)
        return result
    except BaseException:
        nested = session.get_nested_transaction()
        (nested if nested is not None else session).rollback()
        raise


def place_statement_rows(state: ORMExecuteState) -> Result[Any] | None:
    """Place the rows of an ``insert(Message)``; refuse UPDATE and DELETE of messages.

    The rows (the statement's parameters) are validated and encoded as
    :meth:`SessionStore.flush <hermes_orm.SessionStore.flush>` would, grouped by
    session in their order; each session's cursor moves by one ``UPDATE ...
    RETURNING`` and the rows get the positions it moved past, in the same
    transaction. Anything refused is refused before anything is written; if
    the INSERT itself fails after a cursor moved, the session's transaction
    (or its innermost savepoint) is rolled back, as a failed flush rolls it back.
    """
    if not (state.is_insert or state.is_update or state.is_delete):
        return None
    if state.execution_options.get(_PLACED):
        return None
    if not _on_table(state, _messages):
        if not _on_table(state, _sessions):
            return None
        if state.is_delete:
            return _delete_sessions(state)
        _refuse_counter_statement(state)
        return None
    statement = state.statement
    if not state.is_insert:
        verb = "UPDATE" if state.is_update else "DELETE"
        raise InvalidMessageError(f"{verb} statements on hermes_messages are refused: {_HISTORY}")
    if not isinstance(statement, Insert):
        raise InvalidMessageError(f"this form of INSERT is not supported: {_SUPPORTED}")
    unsupported = _sa.insert_clauses(statement)
    if unsupported:
        raise InvalidMessageError(
            f"insert(Message) with {', '.join(unsupported)} is not supported: {_SUPPORTED}"
        )
    params = state.parameters
    rows: Any = [params] if isinstance(params, Mapping) else params or []
    if not isinstance(rows, list) or not rows:
        raise InvalidMessageError(
            "insert(Message) needs its rows as parameters (a dict or a list of dicts); "
            + _SUPPORTED
        )

    groups: dict[str, list[tuple[int, _codec.EncodedMessage, Any]]] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InvalidMessageError("a row must be a dict of Message columns", index=index)
        for key in row:
            if key not in _ROW_KEYS:
                raise InvalidMessageError(
                    "not a column of hermes_messages (keys without a column of their "
                    "own go in 'extra'; SessionStore.flush takes message dicts)",
                    index=index,
                    key=key,
                )
        session_id = row.get("session_id")
        if not isinstance(session_id, str):
            raise InvalidMessageError(
                "a message row needs its session's id", index=index, key="session_id"
            )
        _codec.check_session_id(session_id)
        item = _encode(_RowView(row), index)
        groups.setdefault(session_id, []).append((index, item, row.get("idx")))
    claims = {
        session_id: _claim([(idx, index) for index, _, idx in members])
        for session_id, members in groups.items()
    }

    session = state.session
    if session.autoflush and state.execution_options.get("autoflush", True):
        session.flush()  # what was added before goes first, as the INSERT's autoflush would
    _refuse_autocommit(session)
    _check_sessions(session, claims)
    placed: list[dict[str, Any]] = [{} for _ in rows]
    moved = False
    try:
        for session_id in sorted(groups):  # in id order, as _check_sessions locked them
            members = groups[session_id]
            cursor = _move_cursor(
                session,
                session_id,
                [item for _, item, _ in members],
                claims[session_id],
                _loaded_session(session, session_id),
            )
            moved = True
            for offset, (index, item, _) in enumerate(members):
                placed[index] = {**item.row, "idx": cursor + offset}
        return state.invoke_statement(
            params=placed if state.is_executemany else placed[0],
            execution_options={_PLACED: True},
        )
    except BaseException:
        if moved:
            # Never a moved cursor without its rows, whatever the caller does next.
            nested = session.get_nested_transaction()
            (nested if nested is not None else session).rollback()
        raise


# -- stored messages: never deleted, moved or changed through the ORM -------------------


#: A stored message's columns: its digest (and its session's) are of what they hold.
_MESSAGE_COLUMNS = tuple(column.key for column in Message.__table__.columns)


def _refused_change(message: Message, keys: Sequence[str]) -> InvalidMessageError | None:
    """The error for a stored message that would move or change; None if it stays as stored.

    Its digest, checked by every flush that continues the history, is of the
    values stored: an edit would make the history the caller holds look rewritten.
    """
    attrs = inspect(message).attrs
    for key in keys:
        if attrs[key].history.has_changes():
            moved = key in ("idx", "session_id", "session")
            what = "moved or taken from its session" if moved else "changed"
            return InvalidMessageError(
                f"a stored message cannot be {what} ({key} changed): {_HISTORY}", key=key
            )
    return None


def _refused_delete(message: Message) -> InvalidMessageError:
    return InvalidMessageError(
        f"message {message.idx} of session {message.session_id!r} is stored and cannot be "
        f"deleted: {_HISTORY}"
    )


def _refuse_history_changes(session: OrmSession) -> None:
    """Refuse deleting or moving stored messages, before the flush writes anything.

    A message may go with its session (both deleted in the same flush).
    """
    deleted = session.deleted
    if deleted:
        gone = {inspect(obj).identity for obj in deleted if isinstance(obj, Session)}
        for obj in deleted:
            if isinstance(obj, Message) and (obj.session_id,) not in gone:
                raise _refused_delete(obj)
        for obj in session.new:
            if isinstance(obj, Session) and (obj.id,) in gone:
                raise _refused_replacement(obj)
    for obj in session.dirty:
        if isinstance(obj, Message):
            error = _refused_change(obj, ("session", *_MESSAGE_COLUMNS))
            if error is not None:
                raise error
        elif isinstance(obj, Session):
            changed = _refused_stored_change(obj)
            if changed is not None:
                raise changed


def _refused_replacement(obj: Session) -> InvalidSessionError:
    """The error for a new Session of the id of one deleted in the same flush.

    SQLAlchemy would turn the pair into an UPDATE of the stored row (a "row
    switch"): the stored messages would stay, under the new session's values.
    """
    return InvalidSessionError(
        f"session {obj.id!r} is deleted and added again in one flush, which would update "
        "the stored row in place and keep its messages: flush the delete first "
        "(session.flush()), then add the new session"
    )


def _replaces_a_deleted(target: Session) -> bool:
    """Whether ``target``, a new Session, has the id of one its ORM session deletes."""
    session = object_session(target)
    return session is not None and any(
        isinstance(obj, Session) and inspect(obj).identity == (target.id,)
        for obj in session.deleted
    )


def _a_start(value: Any) -> bool:
    """Whether ``value`` is what a counter of a session with no messages holds: 0 or None."""
    return value is None or (type(value) is int and value == 0)


def _refused_counters(obj: Session, *, new_object: bool) -> InvalidSessionError | None:
    """The error for a Session object whose counters were set; None if they were not.

    A new one may hold 0 or None (what it starts with); a stored one, no change.
    """
    state = inspect(obj)
    for key in _COUNTERS:
        if new_object:
            if not _a_start(state.dict.get(key)):
                return InvalidSessionError(
                    f"a new session starts with no messages ({key} given): {_COUNTERS_MOVE}"
                )
        elif state.attrs[key].history.has_changes():
            return InvalidSessionError(
                f"session {obj.id!r}: {key} cannot be changed: {_COUNTERS_MOVE}"
            )
    return None


#: Why a stored session keeps its id.
_ID_STAYS = (
    "its messages, and the rows that hang on it, stay on the id they were stored under; "
    "store the conversation in a new session instead"
)


def _refused_stored_change(obj: Session) -> InvalidSessionError | None:
    """The error for a stored Session object whose id or counters changed; None if neither."""
    state = inspect(obj)
    if state.attrs["id"].history.has_changes():
        stored = state.identity[0] if state.identity else obj.id
        return InvalidSessionError(f"session {stored!r}: its id cannot be changed: {_ID_STAYS}")
    if state.attrs[_HISTORY_ID].history.has_changes():
        return InvalidSessionError(
            f"session {obj.id!r}: {_HISTORY_ID} cannot be changed: {_HISTORY_ID_DRAWN}"
        )
    return _refused_counters(obj, new_object=False)


# In every ORM session, with the rule or without it (mapper events of our own
# class: nothing is registered on the application's sessions). Raised inside
# the flush, which rolls its transaction back: nothing is written.


@event.listens_for(Message, "before_update")
def _refuse_moving_a_stored_message(_mapper: Any, _connection: Any, target: Message) -> None:
    error = _refused_change(target, _MESSAGE_COLUMNS)
    if error is not None:
        raise error


@event.listens_for(Session, "before_insert")
def _refuse_a_new_session_with_counters(_mapper: Any, _connection: Any, target: Session) -> None:
    """Refuse counters set by hand; those the rule set in a flush that did not land start over.

    And a new session replacing one deleted in the same flush (see ``_refused_replacement``).

    A mapper's ``before_insert`` may change column attributes: the INSERT
    sends what they hold afterwards.
    """
    if _replaces_a_deleted(target):
        raise _refused_replacement(target)
    if not _set_by_rule(target, _token_of(object_session(target)), _STARTS):
        error = _refused_counters(target, new_object=True)
        if error is not None:
            raise error


@event.listens_for(Message, "before_insert", insert=True)
def _unset_a_leftover_idx(_mapper: Any, _connection: Any, target: Message) -> None:
    """An idx the rule set in a flush that did not land counts as unset.

    Put first among ``Message``'s ``before_insert`` listeners: the message is
    then refused as one the rule did not place (``_refuse_a_message_not_placed``).
    """
    if _set_by_rule(target, _token_of(object_session(target)), _IDX_STARTS) and target.id is None:
        _rule_set[target][1]["id"] = None  # the database gives it: _note_a_new_id


@event.listens_for(Message, "before_insert")
def _refuse_a_message_not_placed(_mapper: Any, _connection: Any, target: Message) -> None:
    """Refuse a Message the position rule did not place in this flush, before it is written.

    Without the rule nothing placed it, whatever its ``idx`` (one set by hand
    would be written with the cursor left behind it). With the rule, a message
    it did not place was added once it had run: by a ``before_flush`` hook
    that runs after it.
    """
    session = object_session(target)
    token = _token_of(session)
    remembered = _rule_set.get(target)
    if token is not None and remembered is not None and remembered[0] is token:
        return
    if token is None:
        raise InvalidMessageError(
            "a Message added through the ORM needs the position rule: call "
            "hermes_orm.install_position_rule() (or pass your sessionmaker), "
            "or store messages with SessionStore.flush"
        )
    if session is not None and id(target) in session.info[_FLUSH].attributes.get(_LEFT_OUT, ()):
        raise InvalidMessageError(
            "this Message goes with the objects given to session.flush(objects) (with its "
            "session) but is not one of them, and the position rule places only those: "
            "list it too, or flush everything"
        )
    raise InvalidMessageError(
        "this Message was added to the flush after the position rule had placed its "
        "messages (by a before_flush hook that runs after the rule's): register that hook "
        "before install_position_rule(), or add the message before the flush"
    )


@event.listens_for(Message, "after_insert")
def _note_a_new_id(_mapper: Any, _connection: Any, target: Message) -> None:
    """Remember the id the database gave a message the rule placed.

    On SQLite a rolled-back transaction gives its ids out again; the message,
    flushed once more, must not bring one along that another row now holds.
    """
    remembered = _rule_set.get(target)
    if remembered is not None and "id" in remembered[1]:
        remembered[1]["id"] = target.id


@event.listens_for(Session, "before_update")
def _refuse_a_changed_id_or_counter(_mapper: Any, _connection: Any, target: Session) -> None:
    error = _refused_stored_change(target)
    if error is not None:
        raise error


@event.listens_for(Message, "before_delete")
def _refuse_deleting_a_stored_message(_mapper: Any, _connection: Any, target: Message) -> None:
    session = object_session(target)
    parent = _loaded_session(session, target.session_id) if session is not None else None
    if parent is None or session is None or parent not in session.deleted:
        raise _refused_delete(target)


#: The rule's listeners on an ORM session target, in the order they are put on.
_LISTENERS: tuple[tuple[str, Any], ...] = (
    ("before_flush", _flush_begins),
    ("after_flush_postexec", _flush_ends),
    ("after_soft_rollback", _rolled_back),
    ("after_transaction_end", _transaction_ended),
    ("before_flush", assign_message_positions),
    ("before_commit", _refuse_abandoned_move),
    ("do_orm_execute", place_statement_rows),
    ("after_begin", _watch),
)


#: What hangs on a session row, by the ON DELETE rule of its foreign key:
#: (table, column, delete it (CASCADE) or clear the column (SET NULL)).
_DEPENDENTS: tuple[tuple[Table, Any, bool], ...] = tuple(
    (fk.parent.table, fk.parent, (fk.ondelete or "").upper() == "CASCADE")
    for table in Session.metadata.sorted_tables
    for fk in table.foreign_keys
    if fk.column.table is _sessions and (fk.ondelete or "").upper() in ("CASCADE", "SET NULL")
)


def _sqlite_leaves_them(connection: Connection) -> bool:
    """Whether ``connection`` is SQLite's with foreign keys off: ON DELETE rules unapplied."""
    if connection.dialect.name != "sqlite":
        return False
    return not connection.exec_driver_sql("PRAGMA foreign_keys").scalar()


def _apply_on_delete(connection: Connection, session_ids: Any, params: Any = None) -> None:
    """Apply the ON DELETE rules of the sessions ``session_ids`` (ids, or a SELECT of them)."""
    for table, column, cascade in _DEPENDENTS:
        statement: Any = (
            table.delete().where(column.in_(session_ids))
            if cascade
            else table.update().where(column.in_(session_ids)).values({column: None})
        )
        # Placed: the rule's own statements, which it must not refuse.
        connection.execute(statement, params, execution_options={_PLACED: True})


@event.listens_for(Session, "before_delete")
def _cascade_where_sqlite_does_not(_mapper: Any, connection: Connection, target: Session) -> None:
    """Apply the ON DELETE rules on a SQLite connection whose foreign keys are off.

    SQLite enforces foreign keys only on connections that ask for it; an
    application's engine usually does not. Without this, deleting a session
    through the ORM there would leave its messages behind, and a new session
    of the same id would show them. (A ``delete(Session)`` statement runs no
    mapper event: the position rule applies them to it, see ``_delete_sessions``.)
    """
    if _sqlite_leaves_them(connection):
        _apply_on_delete(connection, [target.id])
