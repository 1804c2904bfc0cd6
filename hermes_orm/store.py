"""SessionStore: the repository of sessions and their messages.

Every write is one transaction, retried whole on transient errors. The flush
cursor (``hermes_sessions.flushed_idx``) is read under the session row's write
lock and advanced in the same transaction as the message inserts, so whatever
fails, the database holds a prefix of the conversation and the cursor is its
length: a retry, a restart or a second process all continue from there.

The hot path runs Core statements on the model tables; the ORM models define
the schema and serve applications that use the ORM themselves.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import operator
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, NamedTuple, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    String,
    Table,
    and_,
    bindparam,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import Pool

from hermes_orm import _codec, _dialects, _retry, _sa, migrations
from hermes_orm import search as _search
from hermes_orm._codec import check_session_id
from hermes_orm._retry import RetryPolicy
from hermes_orm.errors import (
    DatabaseBusyError,
    DatabaseError,
    DatabaseUnavailableError,
    HermesOrmError,
    HistoryDivergedError,
    InvalidArgumentError,
    InvalidMessageError,
    InvalidSessionError,
    SchemaOutOfDateError,
    SchemaTooNewError,
    SearchQueryError,
    SessionExistsError,
    SessionNotFoundError,
    UnsupportedBackendError,
)
from hermes_orm.models import Message, Session
from hermes_orm.search import SearchPage

#: Where a store warns of acknowledged writes the database no longer holds.
logger = logging.getLogger("hermes_orm")

T = TypeVar("T")

_sessions: Table = Session.__table__  # type: ignore[assignment]
_messages: Table = Message.__table__  # type: ignore[assignment]

#: Columns set by the store itself, never by callers.
_MANAGED = frozenset(
    {"id", "flushed_idx", "flushed_digest", "history_id", "message_count", "tool_call_count"}
)
#: Session fields a caller may set, with the Python type each accepts.
SESSION_FIELDS: dict[str, type] = {
    c.name: c.type.python_type if c.name not in ("model_config", "extra") else object
    for c in _sessions.columns
    if c.name not in _MANAGED
}
_NULLABLE = frozenset(c.name for c in _sessions.columns if c.nullable)

#: ``SELECT cursor ... WHERE id = :session_id FOR UPDATE``: the row lock on
#: PostgreSQL. On SQLite the write lock is already held (``BEGIN IMMEDIATE``)
#: and the dialect renders no ``FOR UPDATE``.
_LOCK_SESSION = (
    select(
        _sessions.c.flushed_idx,
        _sessions.c.flushed_digest,
        _sessions.c.history_id,
        _sessions.c.tool_call_count,
        _sessions.c.user_id,
    )
    .where(_sessions.c.id == bindparam("session_id"))
    .with_for_update()
)

_INSERT_COLUMNS = ("session_id", "idx", *_codec.PARAM_COLUMNS)
#: Their PostgreSQL types (``text`` for bounded strings: the table's column bounds them).
_INSERT_TYPES = tuple(
    "json"
    if name in _codec.JSON_COLUMNS
    else "text"
    if isinstance(_messages.c[name].type, String)
    else _messages.c[name].type.compile(dialect=postgresql.dialect()).lower()  # type: ignore[no-untyped-call]
    for name in _INSERT_COLUMNS
)
#: Text session fields that are indexed, and their bound: an index entry of
#: PostgreSQL holds about 2,700 bytes, so 512 characters (at most 2,048 bytes of
#: UTF-8) always fit, on both backends alike.
_INDEXED_TEXT = frozenset({"source", "user_id", "title"})
_INDEXED_TEXT_MAX = 512
_INT64 = 2**63
#: The largest float: an int beyond it is no number a float column can hold.
_MAX_FLOAT = sys.float_info.max
#: Sessions whose cursor a store remembers; past this it forgets the half it
#: flushed least recently (a gateway's idle sessions), not the busy ones.
_HINTS_MAX = 10_000
#: Messages per INSERT of a flush; a longer flush streams in batches of this size.
_BATCH = 500
#: Characters of text an INSERT of a flush holds at most, but for a row alone (at
#: most 4 bytes each in UTF-8: far below the 1 GiB a PostgreSQL statement may carry).
_STATEMENT_BYTES = 64 * 2**20


#: Messages a store remembers (copies of what it stored or verified, over all the
#: sessions it remembers): past this it forgets the copies of the sessions
#: flushed least recently, which then check against the database once more.
_REMEMBERED_MAX = 200_000
_TOOL_CALLS = operator.attrgetter("tool_calls")
Verify = Literal["all", "last", "full"]
_VERIFY = ("all", "last", "full")


@dataclass(slots=True)
class _Hint:
    """What a store knows of a session after its last write or check there.

    ``cursor``, ``digest`` and ``history`` are where the store left the stored
    cursor, and the ``history_id`` it stood on then (a hint: every use is
    verified in the database). ``copies``, when not None,
    holds a copy of each message the database holds below ``len(copies)``, as
    the caller passed it: a caller's message equal to its copy is one the
    database holds, with no digest to take.
    """

    cursor: int
    digest: bytes | None
    history: int
    copies: list[Any] | None
    #: The session's user when the store last read or wrote it (None: no user).
    owner: str | None = None


class _Memory:
    """The hints of a store, shared with the user-scoped stores made from it.

    A hint is only ever a guess verified in the database, and a scoped store's
    verification includes the owner. A user's view uses only the hints of that
    user's sessions (see :meth:`StoreCore._hint`): comparing a list with the
    copies of another user's session, before the database refused it, would
    tell whether the list is that session's history.
    """

    __slots__ = ("floor", "forgets", "forgotten", "hints", "lock", "remembered")

    def __init__(self) -> None:
        # session id -> what the store knows of it, most recently used last.
        self.hints: dict[str, _Hint] = {}
        self.remembered = 0  # messages in the hints' copies, about (see remember)
        self.lock = threading.Lock()
        # Forgets so far; each forgotten session's count at its last forget (a bounded
        # record: cleared whole past _HINTS_MAX, every stamp taken before then refused).
        self.forgets = 0
        self.forgotten: dict[str, int] = {}
        self.floor = 0

    def stamp(self) -> int:
        """Taken before a write, given to :meth:`remember` after it as ``since``."""
        return self.forgets

    def remember(
        self,
        session_id: str,
        cursor: int,
        digest: bytes | None,
        written: Sequence[Any] | None = None,
        start: int = 0,
        *,
        history: int,
        copy: bool = True,
        owner: str | None = None,
        since: int | None = None,
    ) -> None:
        """Remember a session's stored cursor, digest and history after a write or a check.

        Below ``cursor`` the database holds what the store's copies of the
        session hold below ``start``, then ``written`` (copies, by :func:`_codec.copied`,
        of the messages checked or written just now, taken as they were encoded;
        None when unknown). They join the copies below
        ``start``; if those are missing, the store keeps no copies (its next
        flush there checks in the database). Without ``copy``, copies the store
        has are kept up to date, and none are started (a ``verify="last"``
        flush, an append: nothing compares them yet). ``owner``: the session's
        user as the write or check saw it. ``since``: the :meth:`stamp` taken
        before the write; if the session was forgotten since (deleted, or its
        history rewritten, by another task or thread of the store while this
        write's result was on its way), nothing is remembered: what the write
        stored may be gone, and another history may stand at the same cursor.
        """
        with self.lock:
            if since is not None and self.forgotten_since(session_id, since):
                return
            hints = self.hints
            old = hints.pop(session_id, None)  # re-inserted last: the dict's order is recency
            copies = None if old is None else old.copies
            if copies is not None:
                self.remembered -= len(copies)
                if old is not None and old.history != history:
                    copies = None  # of a history since deleted or rewritten
            if written is not None and len(written) == cursor - start:
                if start == 0 and (copy or copies is not None):
                    copies = []  # a new list: other threads may be reading the old one
                elif copies is None or len(copies) < start:
                    copies = None
                if copies is not None:
                    del copies[start:]  # only above every remembered cursor: never read
                    copies.extend(written)
            elif copies is not None and len(copies) != cursor:
                copies = None
            if copies is not None:
                self.remembered += len(copies)
            hints[session_id] = _Hint(cursor, digest, history, copies, owner)
            if len(hints) > _HINTS_MAX or self.remembered > _REMEMBERED_MAX:
                self.shed(session_id)

    def shed(self, keep: str) -> None:
        """Forget the sessions flushed least recently, or their copies, back under the bounds."""
        hints = self.hints
        if len(hints) > _HINTS_MAX:
            for stale in list(hints)[: len(hints) // 2]:
                forgotten = hints.pop(stale)
                if forgotten.copies is not None:
                    self.remembered -= len(forgotten.copies)
        for sid, hint in list(hints.items()):
            if self.remembered <= _REMEMBERED_MAX // 2:
                break
            if sid != keep and hint.copies is not None:
                self.remembered -= len(hint.copies)
                hint.copies = None

    def forgotten_since(self, session_id: str, since: int) -> bool:
        """Whether the session was (or may have been) forgotten since ``since`` (a stamp)."""
        return since < self.floor or self.forgotten.get(session_id, -1) > since

    def forget(self, session_id: str) -> None:
        """Drop what is remembered of a session, and what writes under way would remember."""
        with self.lock:
            hint = self.hints.pop(session_id, None)
            if hint is not None and hint.copies is not None:
                self.remembered -= len(hint.copies)
            self.forgets += 1
            if len(self.forgotten) >= _HINTS_MAX:
                self.forgotten.clear()
                self.floor = self.forgets
            self.forgotten[session_id] = self.forgets


# Forks of this process so far, as the child sees it: a connection kept from
# before a fork is the parent's, never used in the child (checked per call,
# so cheaper than os.getpid(), a system call).
_forks = [0]
if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


class Chunk(NamedTuple):
    """Messages of one session to store from a cursor."""

    session_id: str
    cursor: int
    messages: list[_codec.EncodedMessage]
    #: The digest stored at ``cursor`` (None at 0).
    digest: bytes | None
    #: The session's history_id (checked above cursor 0 by :func:`prepare_many`'s write).
    history: int = 0


@dataclass(frozen=True, slots=True)
class PreparedWrite:
    """Driver statements storing several sessions' messages, built ahead of the write."""

    inserts: list[tuple[str, tuple[Any, ...]]]
    #: The UPDATEs moving the cursors, each with how many sessions it moves.
    advances: list[tuple[str, tuple[Any, ...], int]]


class CursorMoved(Exception):
    """A compare-and-swap found the stored cursor elsewhere; its transaction rolls back."""


@dataclass(frozen=True, slots=True)
class FlushResult:
    """What a flush did.

    Attributes:
        written: Messages this call inserted (0 when everything was stored already).
        cursor: The session's ``flushed_idx`` afterwards: the number of stored messages.
    """

    written: int
    cursor: int


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of :meth:`SessionStore.list_sessions`.

    Attributes:
        sessions: Session dicts, newest first.
        next_cursor: Pass as ``cursor=`` for the next page; ``None`` on the last.
    """

    sessions: list[dict[str, Any]]
    next_cursor: str | None


def _is_ancestor(session_id: str, parent: str) -> Any:
    """A query of a row when ``session_id`` is ``parent`` or one of its ancestors.

    UNION, not UNION ALL: a loop already stored ends the walk.
    """
    up = (
        select(_sessions.c.parent_session_id.label("id"))
        .where(_sessions.c.id == parent)
        .cte("up", recursive=True)
    )
    above = _sessions.alias("above")
    up = up.union(select(above.c.parent_session_id).where(above.c.id == up.c.id))
    return select(up.c.id).where(up.c.id == session_id)


def take_lock(conn: Connection, *key: str) -> None:
    """On PostgreSQL, hermes_orm's advisory lock of ``key``, to the end of the transaction.

    Keyed by the sessions table the transaction's search_path finds too, whatever
    path found it: stores on other tables of the database (other schemas) do not
    wait for it.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(
            text(
                "SELECT pg_advisory_xact_lock(hashtextextended('hermes_orm ' || :key || ' ' "
                "|| to_regclass('hermes_sessions')::oid, 0))"
            ),
            {"key": " ".join(key)},
        )


def _lock_children(conn: Connection, session_ids: Sequence[str]) -> None:
    """On PostgreSQL, lock the children of ``session_ids`` in lock order, before their links go.

    The UPDATE that cuts the links would lock them as it finds them, while a
    writer taking several of them in lock order (an ORM flush into several
    sessions) holds some: the two could deadlock. Taken as that UPDATE takes
    them (``FOR NO KEY UPDATE``: a foreign key's check of a child still
    passes), in :func:`_dialects.lock_order`. A user view and the Hermes
    adapter lock the sessions themselves first, as they pick them (a writer
    holding a key-share lock on one, having made a child, is then waited for
    before any child is taken; an ORM flush into a session and a child that
    comes first in lock order can still deadlock with them);
    ``SessionStore.delete_session`` locks its session last (the opposite
    trade). ``session_ids`` is at most one ``IN`` list's worth; a delete of
    more goes a part at a time, its children in lock order within a part.
    """
    dialect = conn.dialect.name
    if dialect != "postgresql":
        return  # SQLite's writer holds the whole database
    c = _sessions.c
    conn.execute(
        select(c.id)
        .where(c.parent_session_id.in_(session_ids))
        .order_by(_dialects.lock_order(c.id, dialect))
        .with_for_update(key_share=True)
    ).all()


def take_lineage_turn(conn: Connection) -> None:
    """On PostgreSQL, the turn of writes setting parent links on these tables (to the commit).

    Each looks for a loop after taking it, so two of them never each miss
    the link the other adds (see StoreCore._check_references).
    """
    take_lock(conn, "lineage")


#: How many tries a write setting a title gets when the title is taken meanwhile each time.
_TITLE_TRIES = 3
#: The unique index of session titles.
_TITLE_INDEX = "ix_hermes_sessions_title_unique"


def title_taken(exc: IntegrityError) -> bool:
    """Whether ``exc`` is the title's unique index refusing a title another session holds.

    PostgreSQL names the index; SQLite the column.
    """
    said = str(exc.orig)
    return _TITLE_INDEX in said or "hermes_sessions.title" in said


def on_title_races(write: Callable[[], T]) -> T:
    """``write()``, run again while a title it sets was taken meanwhile; the last try's error.

    A write reads who holds a title before it sets one; on PostgreSQL the read
    sees committed titles only, and the title's unique index refuses one taken
    by a write under way. Each try reads again.
    """
    for _ in range(_TITLE_TRIES - 1):
        try:
            return write()
        except DatabaseError as exc:
            if not title_race(exc):
                raise
    return write()


def title_race(exc: DatabaseError) -> bool:
    """Whether the store's ``exc`` is the title's unique index refusing a title taken meanwhile."""
    return isinstance(exc.__cause__, IntegrityError) and title_taken(exc.__cause__)


@contextlib.contextmanager
def _title_taken(values: dict[str, Any]) -> Iterator[None]:
    """A title a write under way took first (its unique index): InvalidSessionError.

    The check before the write sees committed titles only (PostgreSQL).
    """
    try:
        yield
    except IntegrityError as exc:
        if values.get("title") is None or not title_taken(exc):
            raise
        raise InvalidSessionError(
            f"title {values['title']!r} is already used by another session"
        ) from None


def _check_filter(name: str, value: Any) -> str | None:
    """A str filter of a listing (or None): a str a database can compare."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidSessionError(f"{name} must be a str or None, got {type(value).__name__}")
    problem = _codec.text_problem(value)
    if problem is not None:
        raise InvalidSessionError(f"{name} {value!r} {problem}")
    return value


#: A high surrogate followed by a low one: a character held as two code units.
_SPLIT_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate caller-supplied session fields before anything is written."""
    for name, value in fields.items():
        expected = SESSION_FIELDS.get(name)
        if expected is None:
            hint = "it is managed by the store" if name in _MANAGED else "no such column"
            raise InvalidSessionError(
                f"unknown session field {name!r} ({hint}); put free-form data in extra={{...}}"
            )
        if value is None:
            if name not in _NULLABLE:
                raise InvalidSessionError(f"session field {name!r} may not be None")
            continue
        if expected is object:
            if name == "extra" and not isinstance(value, dict):
                raise InvalidSessionError(
                    "session field 'extra' must be a dict (a JSON object), "
                    f"got {type(value).__name__}"
                )
            try:
                _codec._check_json(value, None, name)
            except InvalidMessageError as exc:
                raise InvalidSessionError(f"session field {name!r}: {exc.reason}") from None
            # Lone surrogates are kept (escaped in the JSON text, as Hermes keeps them);
            # a pair held as two code units would read back as the one character.
            if _SPLIT_PAIR.search(json.dumps(value, ensure_ascii=False)):
                raise InvalidSessionError(
                    f"session field {name!r} holds a surrogate pair as two code units "
                    "(it would read back as the one character they make): store that character"
                )
        elif expected is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidSessionError(f"session field {name!r} must be a number")
            if (isinstance(value, int) and abs(value) > _MAX_FLOAT) or not math.isfinite(value):
                raise InvalidSessionError(f"session field {name!r} must be a finite number")
            if isinstance(value, int) and float(value) != value:
                # The column holds a float: this int would read back as another number.
                raise InvalidSessionError(
                    f"session field {name!r}: {value} has no exact float (beyond 2**53)"
                )
        elif expected is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidSessionError(f"session field {name!r} must be an int")
            if not -(2**63) <= value < 2**63:
                raise InvalidSessionError(f"session field {name!r} must be a 64-bit int")
        elif not isinstance(value, expected):
            raise InvalidSessionError(
                f"session field {name!r} must be {expected.__name__}, got {type(value).__name__}"
            )
        elif isinstance(value, str) and (problem := _codec.text_problem(value)) is not None:
            raise InvalidSessionError(f"session field {name!r} {problem}")
        elif name in _INDEXED_TEXT and isinstance(value, str) and len(value) > _INDEXED_TEXT_MAX:
            raise InvalidSessionError(
                f"session field {name!r} holds at most {_INDEXED_TEXT_MAX} characters "
                f"(it is indexed), got {len(value)}"
            )
    return fields


def _session_dict(row: Row[Any]) -> dict[str, Any]:
    data = dict(row._mapping)
    data.pop("history_id", None)  # the flush's own check, no field of the session
    digest = data.get("flushed_digest")
    if digest is not None and not isinstance(digest, bytes | memoryview):
        raise DatabaseError(
            f"session {data.get('id')!r} holds a flushed_digest of type "
            f"{type(digest).__name__}, not bytes; nothing hermes_orm writes is so: "
            "`hermes-orm verify --repair` sets it from the rows"
        )
    data["flushed_digest"] = None if digest is None else digest.hex()
    return data


def _encode_cursor(started_at: float, session_id: str) -> str:
    raw = json.dumps([started_at, session_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        started_at, session_id = json.loads(raw)
        if isinstance(started_at, bool) or not isinstance(started_at, int | float):
            raise TypeError
        if not math.isfinite(float(started_at)):
            raise ValueError
        if not isinstance(session_id, str) or _codec.text_problem(session_id) is not None:
            raise TypeError
    except (binascii.Error, ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidSessionError(
            f"invalid pagination cursor {_codec.shown(cursor)}: pass back a SessionPage.next_cursor"
        ) from None
    return float(started_at), session_id


@dataclass(frozen=True, slots=True)
class Run(Generic[T]):
    """One transaction a store's steps ask for: ``work`` on a connection, retried whole.

    A write's transaction opens holding the write lock and commits when
    ``work`` returns, unless ``whole`` says ``work`` runs the whole transaction
    itself: the statements that open it (``FlushSQL.begin``) first, then its
    commit or rollback.

    ``once``: the write must not run twice (an append, a create), where a
    flush, which compares the cursor, may. On PostgreSQL each try then learns
    its transaction id, and when a try's COMMIT got no answer (the connection
    dropped), the next one first asks the server whether it committed, and if
    so returns its result without running ``work`` again. (A SQLite commit is
    a local call: it returns or fails, it cannot go unanswered.)
    """

    work: Callable[[Connection], T]
    write: bool
    whole: bool = False
    once: bool = False
    #: Each try has the store's deadline (``RetryPolicy.attempt_timeout``).
    bounded: bool = True
    #: A read the store's replica may serve (``replica=``), if it has one.
    replica: bool = False
    #: Given the replica's connection and result: raises :class:`SessionNotFoundError`
    #: when the result may only show that the replica lags (the primary then reads).
    lagging: Callable[[Connection, T], None] | None = field(default=None, compare=False)
    #: A read whose statements all see one moment of the database, locking nothing
    #: (see :func:`_dialects.begin_snapshot`).
    snapshot: bool = False
    #: After a failover, whether the try whose COMMIT went unanswered is in the
    #: database, by what it wrote (given that try's result); None: by its
    #: transaction id, as on the server that gave it.
    found: Callable[[Connection, T], bool] | None = field(default=None, compare=False)
    #: The transaction id, timeline and result of the try whose COMMIT is unanswered.
    landed: list[Any] = field(default_factory=list, compare=False, repr=False)


#: What an operation does, without doing I/O: it yields the transactions it
#: needs, gets each one's result (or its exception) back, and returns its own.
#: :class:`SessionStore` drives steps with blocking calls, ``AsyncSessionStore``
#: with ``await``: one write path for both.
Steps = Generator[Run[Any], Any, T]


def _read(
    work: Callable[[Connection], T],
    *,
    replica: bool = False,
    lagging: Callable[[Connection, T], None] | None = None,
) -> Steps[T]:
    return (yield Run(work, write=False, replica=replica, lagging=lagging))  # type: ignore[no-any-return]


@contextlib.contextmanager
def _readable(what: str) -> Iterator[None]:
    """A stored value other SQL damaged, read in the block, as a :class:`DatabaseError`."""
    try:
        yield
    except _DAMAGED as exc:
        raise DatabaseError(
            f"{what} holds a value that cannot be read ({type(exc).__name__}: {exc}); nothing "
            "hermes_orm writes is so: `hermes-orm verify` reports it"
        ) from exc


#: What reading a row other SQL damaged raises: JSON that is none (ValueError), or
#: nested too deep to be read, or of another shape than the column's (a list for
#: the extra keys, an object for their order), a value of another type.
_DAMAGED = (ValueError, RecursionError, TypeError, KeyError, AttributeError)


#: Seconds a blocking store's call waits for its turn at a ``StaticPool``'s one
#: connection (another thread's call holds it for as long as its transaction).
TURN_WAIT = 300.0


def turn_busy(pool: Pool) -> DatabaseBusyError:
    """What a call that waited :data:`TURN_WAIT` seconds for its turn at ``pool`` raises."""
    return DatabaseBusyError(
        f"another thread's call held the engine's one connection "
        f"({type(pool).__name__}) for {TURN_WAIT:.0f} s",
        attempts=1,
    )


@contextlib.contextmanager
def _turn(pool: Pool) -> Iterator[None]:
    """The thread's turn at ``pool``'s connection, if threads take turns there.

    See :func:`_sa.thread_turn`.

    Raises:
        DatabaseBusyError: Another thread's call held it for :data:`TURN_WAIT`
            seconds (one waiting for this thread's own call, say).
    """
    turn = _sa.thread_turn(pool)
    # A thread's own call within one (its store call inside a store.connection()
    # block, say) goes on in the turn it holds: it neither takes nor gives one.
    if turn is None or turn._is_owned():  # type: ignore[attr-defined]  # (RLock's own)
        yield
        return
    # Taken inside the try: a Ctrl-C as the acquire returns (where Python runs signal
    # handlers) gives the turn back, where it would keep it from every other thread.
    try:
        if not turn.acquire(timeout=TURN_WAIT):
            raise turn_busy(pool)
        yield
    finally:
        # No call before the release (a Ctrl-C could come after it): a turn that was
        # never taken (the wait cut short, or timed out) is not this thread's to give.
        try:  # noqa: SIM105 - contextlib.suppress() would be such a call
            turn.release()
        except RuntimeError:
            pass


def _write(work: Callable[[Connection], T]) -> Steps[T]:
    return (yield Run(work, write=True, once=True))  # type: ignore[no-any-return]


class Done(Exception):
    """The steps ended; ``value`` is what the operation returns."""

    def __init__(self, value: Any) -> None:
        self.value = value


def resume(steps: Steps[Any], value: Any, error: BaseException | None) -> Run[Any]:
    """Hand the last transaction's result (or its error) to ``steps``; their next request.

    Raises:
        Done: The steps returned.
    """
    try:
        return steps.throw(error) if error is not None else steps.send(value)
    except StopIteration as stop:
        raise Done(stop.value) from None


def drive(steps: Steps[T], run: Callable[[Run[Any]], Any]) -> T:
    """Run ``steps`` to their end with ``run`` doing each transaction (blocking)."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = resume(steps, value, error)
        except Done as done:
            return done.value  # type: ignore[no-any-return]
        try:
            value, error = run(request), None
        except Exception as exc:  # handed to the steps, which decide
            value, error = None, exc


def attempt(
    conn: Connection,
    request: Run[T],
    begin: Sequence[tuple[str, Sequence[Any]]],
    settings: Sequence[tuple[str, Sequence[Any]]] = (),
    timeout: float | None = None,
) -> T:
    """One try of ``request`` in ``conn``: begin, work, commit (or roll back on any error).

    A write opens with ``begin``, a read with ``settings`` (the part of
    ``begin`` that is not about taking the write lock). ``timeout``: seconds
    the try may take on PostgreSQL before its connection is abandoned
    (:attr:`RetryPolicy.attempt_timeout`), unless ``request`` is unbounded.

    After a failure the driver connection is rolled back too: after a failed
    COMMIT, SQLAlchemy considers the transaction over while the driver may
    still hold it open. A connection that cannot even roll back, or whose
    server cannot take the work now, is invalidated.
    """
    if not request.bounded or timeout is None or conn.dialect.name != "postgresql":
        return _attempt(conn, request, begin, settings)
    with _retry.watched(conn, timeout) as watch:
        result = _attempt(conn, request, begin, settings)
    if watch is not None and watch.fired and not conn.invalidated:
        conn.invalidate()  # it ended as its socket was shut down
    return result


def check_schema(conn: Connection, schema: str | None, timeout: float | None) -> None:
    """:func:`migrations.check` on ``conn``, within a try's deadline of ``timeout`` seconds."""
    with _retry.watched(conn, timeout):
        migrations.check(conn, schema=schema)


def _attempt(
    conn: Connection,
    request: Run[T],
    begin: Sequence[tuple[str, Sequence[Any]]],
    settings: Sequence[tuple[str, Sequence[Any]]],
) -> T:
    try:
        if request.whole:
            return request.work(conn)
        opening = begin if request.write else settings
        if request.snapshot:
            _dialects.begin_snapshot(conn)  # (before any statement of the transaction)
        if opening:
            _dialects.execute_driver_script(conn, opening)
        landed = request.landed
        if landed:  # the last try's COMMIT went unanswered
            if _landed(conn, request, *landed):
                _dialects.end_transaction(conn, commit=False)
                return landed[2]  # type: ignore[no-any-return]
            landed.clear()
        xid = _dialects.transaction_id(conn) if request.once else None
        result = request.work(conn)
        if xid is not None:
            landed[:] = (*xid, result)
        # A read ends too: no snapshot or idle transaction is kept. It commits,
        # which changes nothing it read, where a ROLLBACK would make psycopg
        # forget every statement it prepared (see search.py's _pg_words).
        _dialects.end_transaction(conn, commit=True)
        landed.clear()
        return result
    except BaseException as exc:
        if conn.invalidated:  # a lost connection: rolling back would open a new one
            raise
        if isinstance(exc, DBAPIError) and _dialects.is_unreachable(exc):
            conn.invalidate()  # a server that cannot take the work now: connect afresh
            raise
        try:
            conn.rollback()
            dbapi_connection = conn.connection.dbapi_connection
            if dbapi_connection is not None:
                dbapi_connection.rollback()
        except Exception:
            with contextlib.suppress(Exception):  # the connection is beyond use
                conn.invalidate()
        raise _sa.interrupt_behind(exc)  # noqa: B904 (the interrupt, its own traceback kept)


def check_bind(bind: Any, engine: type) -> None:
    """Refuse a ``bind`` that is neither a URL nor the kind of engine the store takes.

    A connection, an ORM session or the other kind of engine would otherwise be
    read as a URL, and refused as one that is not.

    Raises:
        InvalidArgumentError: ``bind`` is of another type.
    """
    if isinstance(bind, str | URL | engine):
        _refuse_async_driver(bind)
        return
    got = type(bind).__name__
    if isinstance(bind, Engine) or isinstance(getattr(bind, "sync_engine", None), Engine):
        hint = " (SessionStore takes an Engine, AsyncSessionStore an AsyncEngine)"
    elif hasattr(bind, "engine") or hasattr(bind, "bind"):
        hint = " (pass the engine it is on)"
    else:
        hint = ""
    raise InvalidArgumentError(
        f"a store takes a database URL or an {engine.__name__}, got {got}{hint}"
    )


def _refuse_async_driver(bind: Any) -> None:
    """Refuse an Engine of an asyncio driver (an AsyncEngine's ``sync_engine``) outside run_sync.

    Its connections work inside ``run_sync`` only; elsewhere the first call
    would fail with SQLAlchemy's ``MissingGreenlet``.
    """
    if isinstance(bind, Engine) and bind.dialect.is_async and not _sa.in_run_sync():
        raise InvalidArgumentError(
            f"the engine's driver {bind.dialect.driver!r} is for asyncio: use "
            "AsyncSessionStore with its AsyncEngine (or make the SessionStore inside "
            "`await conn.run_sync(...)`, on conn.engine, and use it there)"
        )


def check_replica(primary: Any, replica: Any, engine: type) -> None:
    """Refuse a ``replica=`` that cannot serve the store's reads, before anything connects.

    ``engine``: the kind of engine the store takes (``Engine``, or ``AsyncEngine``).

    Raises:
        InvalidArgumentError: The replica is neither a URL nor such an engine,
            or the store or its replica is not on PostgreSQL, or the replica
            engine autocommits.
    """
    if not isinstance(replica, str | URL | engine):
        raise InvalidArgumentError(
            f"replica must be a URL or an {engine.__name__}, got {type(replica).__name__}"
        )
    _refuse_async_driver(replica)
    backends = [_backend_of(bind) for bind in (primary, replica)]
    if backends != ["postgresql", "postgresql"]:
        raise InvalidArgumentError(
            "replica= reads from a PostgreSQL standby of a PostgreSQL primary; "
            f"got a {backends[0]} store and a {backends[1]} replica"
        )
    if isinstance(replica, engine):
        # A read's settings (the store's schema first on the search_path) last its
        # transaction: on an autocommitting replica, one statement only.
        _dialects.check_transactional(cast(Engine, getattr(replica, "sync_engine", replica)))


def check_replica_schema(replica: Engine, schema: str | None) -> None:
    """Refuse a replica whose engine puts hermes_orm's tables in another schema than the store.

    (By its ``?schema=`` or ``schema_translate_map``; one naming none reads the
    store's, as the store sets it.) Its reads would list another schema's
    sessions beside this one's messages.

    Raises:
        InvalidArgumentError: The two name different schemas.
    """
    theirs = _dialects.store_schema(replica)
    if theirs is not None and theirs != schema:

        def named(found: str | None) -> str:
            return "the default schema" if found is None else f"schema {found!r}"

        raise InvalidArgumentError(
            f"the replica's engine puts hermes_orm's tables in {named(theirs)}, the "
            f"store's in {named(schema)}: name the same schema for both"
        )


def configure_engines(
    engine: Engine,
    replica: Engine | None,
    settings: dict[str, Any],
    *,
    schema: str | None,
    made: tuple[bool, bool],
) -> None:
    """Give an application's engines (not ``made`` by the store) the store's settings.

    Both are checked first, the replica's schema too: a store refused leaves
    them as they were. (The replica gets the pooler's rules too.)

    Raises:
        InvalidArgumentError: The replica puts hermes_orm's tables in another
            schema, or an engine serves stores behind PgBouncer with another
            ``lock_timeout``.
    """
    if replica is not None:
        check_replica_schema(replica, schema)
    theirs = [e for e, own in ((engine, made[0]), (replica, made[1])) if e is not None and not own]
    for app_engine in theirs:
        _dialects.check_configurable(app_engine, **settings)
    for app_engine in theirs:
        _dialects.configure_engine(app_engine, **settings)


def _backend_of(bind: Any) -> str:
    if isinstance(bind, str | URL):
        return _dialects.normalize_url(bind).get_backend_name()
    return str(bind.dialect.name)


#: Seconds reads go to the primary after the replica was found out of reach.
REPLICA_COOL_DOWN = 30.0


def _landed(conn: Connection, request: Run[T], xid: int, timeline: str, result: T) -> bool:
    """Whether the try of ``request`` whose COMMIT went unanswered committed.

    The server that gave its transaction id says so, in the same run. After a
    failover (a new timeline) or a restart the id tells nothing: the promoted
    standby may never have seen it, the restarted server may have lost it (a
    crash before its commit reached the WAL), and either may have given it to
    another transaction. What the try wrote decides then, where ``request``
    can tell; otherwise the server's answer about the id is taken, and the
    doubt logged.
    """
    if _dialects.same_timeline(conn, timeline):
        return _dialects.committed(conn, xid)
    if request.found is not None:
        return request.found(conn, result)
    logger.warning(
        "a write's COMMIT went unanswered and the server failed over or restarted since: "
        "its outcome is taken from transaction id %d, which that server may have lost",
        xid,
    )
    return _dialects.committed(conn, xid)


def check_options(retry: Any, check_schema: Any) -> None:
    """Refuse a store's options before anything is made of them (an engine, a SQLite file).

    Raises:
        InvalidArgumentError: ``retry`` is no RetryPolicy, or ``check_schema`` no bool.
    """
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise InvalidArgumentError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
    if not isinstance(check_schema, bool):
        raise InvalidArgumentError(f"check_schema must be True or False, got {check_schema!r}")


class StoreCore:
    """What a store does, for :class:`SessionStore` and ``AsyncSessionStore`` alike.

    Every operation is a generator of :class:`Run` requests (its *steps*): the
    decisions (the cursor check, the encoding, the statements, what a stale
    cursor means) are made here once; the stores only run the transactions.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        retry: RetryPolicy | None,
        check_schema: bool,
        user: str | None = None,
        memory: _Memory | None = None,
        schema: str | None = None,
    ) -> None:
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise UnsupportedBackendError(engine.dialect.name)
        #: The PostgreSQL schema of the tables (None: the database's search_path finds them).
        self._schema = schema
        #: What each read runs first (see :func:`_dialects.transaction_settings`).
        self._settings = _dialects.transaction_settings(engine, schema)
        self._engine = engine
        self._retry = retry or RetryPolicy()  # (checked by the stores: check_options)
        #: The standby serving the reads it may (see :meth:`_read_from`).
        self._replica_of: Engine | None = None
        self._checks_schema = check_schema
        self._schema_checked = not check_schema
        #: The only user whose sessions this store sees (None: every session).
        self._user = user
        self._memory = memory or _Memory()
        opening = _dialects.write_begin(engine.dialect.name)
        begin = (*opening, *_dialects.transaction_settings(engine, schema))
        sql = flush_sql(engine.dialect.name, scoped=user is not None, schema=schema)
        # A transaction that must run a setting first (the lock timeout behind
        # PgBouncer) is more than one statement. The flush's statements name the
        # tables' schema, so they need no search path: a turn's flush in a schema
        # is still one statement.
        several = bool(opening or _dialects.transaction_settings(engine))
        self._sql = dataclasses.replace(
            sql, begin=begin, once_heads=None if several else sql.once_heads
        )
        self._lock_session = (
            _LOCK_SESSION
            if user is None
            else _LOCK_SESSION.where(_sessions.c.user_id == bindparam("user_id"))
        )

    @property
    def schema(self) -> str | None:
        """The PostgreSQL schema holding the tables (None: where ``search_path`` finds them)."""
        return self._schema

    def _read_from(self, replica: Engine | None) -> None:
        """Serve listing, message reads and search from ``replica`` (None: the primary)."""
        self._replica_of = replica
        if replica is None:
            return
        _dialects.watch_new_connections(replica)
        self._replica_settings = _dialects.transaction_settings(replica, self._schema)
        #: Whether the replica's schema was found at this hermes_orm's head (or
        #: the store checks none: ``check_schema=False``).
        self._replica_schema_checked = self._schema_checked
        # A replica out of reach is not waited for: the read goes to the primary (a
        # dropped connection of its pool gets a new one first). Nor is one busy: a
        # standby whose replay waits for a lock a long read holds (or that cancels a
        # read in conflict with its recovery) holds up every read for as long.
        self._replica_retry = dataclasses.replace(self._retry, unavailable_for=0.5, attempts=1)
        self._replica_back_at = 0.0  # while the monotonic clock is below it, reads skip it

    def _schema_moved(self, exc: DatabaseError) -> bool:
        """Whether ``exc`` may come of the schema migrated under the store; then it checks again.

        A store checks the schema on its first call. A statement refused for a
        table or a column the database does not have (a downgrade since, say)
        sends it to check the schema again: one that moved is then told as such,
        with what to do. Not for a store that checks none (``check_schema=False``).
        """
        if not self._checks_schema or not _dialects.names_what_is_not_there(exc.__cause__):
            return False
        self._schema_checked = False
        return True

    def _replica_schema_moved(self, exc: DatabaseError) -> bool:
        """As :meth:`_schema_moved`, for the replica's read: a miss, which the primary reads.

        The replica is skipped for a while, said as a WARNING, and its schema
        checked again when it is tried next (a downgrade it replayed is then
        told as its schema; a table that differs from what its revision says,
        as on a replica of another kind, again as this miss).
        """
        if not self._checks_schema or not _dialects.names_what_is_not_there(exc.__cause__):
            return False
        self._replica_schema_checked = False
        self._replica_missed(exc)
        return True

    def _on_replica(self, request: Run[Any]) -> bool:
        """Whether ``request`` goes to the replica (it has one, and it is not cooling down)."""
        return (
            request.replica
            and self._replica_of is not None
            and time.monotonic() >= self._replica_back_at
        )

    def _replica_request(self, request: Run[T]) -> Run[T]:
        """``request`` as the replica runs it: first checking its schema, until it passed once.

        A standby that has not replayed an upgrade yet (or a replica that is
        another database) would fail the read on a missing column or table.
        """
        work, lagging = request.work, request.lagging
        if self._replica_schema_checked and lagging is None:
            return request

        def checked(conn: Connection) -> T:
            if not self._replica_schema_checked:
                migrations.check(conn, schema=self._schema)
                self._replica_schema_checked = True
            result = work(conn)
            if lagging is not None:
                lagging(conn, result)
            return result

        return dataclasses.replace(request, work=checked)

    #: What sends a read from the replica to the primary.
    _REPLICA_MISSES = (
        DatabaseUnavailableError,
        DatabaseBusyError,
        SessionNotFoundError,
        SchemaOutOfDateError,
        SchemaTooNewError,
    )

    def _replica_missed(self, exc: HermesOrmError) -> None:
        """The replica could not serve a read: it goes to the primary.

        Out of reach, busy (a lock wait past ``lock_timeout``: a standby's replay
        of a lock waits for a long read, and every read behind it), or at another
        schema revision than this hermes_orm's, the replica is skipped for
        :data:`REPLICA_COOL_DOWN` seconds (said as a WARNING, with the server's
        own words, by the reads under way then); a session it does not have yet
        (it lags behind the primary), or a read its recovery cancelled (a
        conflict with what it replayed, one read's), is read from the primary
        that once.
        """
        if isinstance(exc, SessionNotFoundError) or (
            isinstance(exc, DatabaseBusyError)
            and isinstance(exc.__cause__, DBAPIError)
            and _dialects.sqlstate(exc.__cause__.orig) == "40001"
        ):
            return
        self._replica_back_at = time.monotonic() + REPLICA_COOL_DOWN
        if isinstance(exc, DatabaseUnavailableError | DatabaseBusyError):
            why = "unreachable" if isinstance(exc, DatabaseUnavailableError) else "busy"
            cause = exc.__cause__
            detail = (
                _dialects.redact(str(cause.orig)).strip().splitlines()[0]
                + _retry.abandoned_note(cause)
                if isinstance(cause, DBAPIError) and str(cause.orig).strip()
                else str(exc)
            )
        else:  # (or its tables are not what its schema's revision says)
            why, detail = "not at the schema", str(exc)
        logger.warning(
            "replica %s, reading from the primary for %.0f s: %s", why, REPLICA_COOL_DOWN, detail
        )

    def _hint(self, session_id: str) -> _Hint | None:
        """What this store remembers of a session: a user's view, of that user's sessions only."""
        hint = self._memory.hints.get(session_id)
        if hint is None or self._user is None or hint.owner == self._user:
            return hint
        return None

    def _remembered(self, session_id: str, stored: int, history: int) -> _Hint | None:
        """What the store remembers of a session whose stored cursor is ``stored``.

        A stored cursor behind the remembered one is said (WARNING): commits
        this store saw were lost, or another process cut the history. Where the
        stored ``history`` (its ``history_id``) is another than the one
        remembered, it may also be another session of that id (deleted and
        made anew elsewhere), or a history rewritten: the warning says so.
        """
        hint = self._hint(session_id)
        if hint is not None and stored < hint.cursor:
            anew = hint.history != history
            logger.warning(
                "session %r: the database holds %d messages%s, but this store saw %d "
                "committed: %sacknowledged writes were lost (a promoted asynchronous standby, "
                "a restored backup) or another process cut the history; writing on from "
                "message %d, so a flush of the whole list puts back what was lost",
                session_id,
                stored,
                " under another history" if anew else "",
                hint.cursor,
                "another process made the session anew or rewrote it, or " if anew else "",
                stored,
            )
        return hint

    def _view(self, store: StoreCore, user_id: Any) -> None:
        """Become ``store`` seeing only ``user_id``'s sessions (a user-scoped view of it)."""
        StoreCore.__init__(
            self,
            store._engine,
            retry=store._retry,
            check_schema=False,  # the store's transactions check it
            user=_check_user_id(user_id),
            memory=store._memory,
            schema=store._schema,
        )
        self._viewed = store

    @property
    def user_id(self) -> str | None:
        """The only user whose sessions this store sees (None: it sees every session)."""
        return self._user

    def __repr__(self) -> str:
        return f"{self._viewed!r}.for_user({self._user!r})"

    def _owned(self, session_id: str) -> ColumnElement[bool]:
        """``id = session_id``, and on a user-scoped store: of its user."""
        clause = _sessions.c.id == session_id
        return clause if self._user is None else and_(clause, _sessions.c.user_id == self._user)

    def _locked_cursor(self, conn: Connection, session_id: str) -> Any:
        """The session's cursor, read under its row's write lock (None: no such session)."""
        params = {"session_id": session_id}
        if self._user is not None:
            params["user_id"] = self._user
        row = conn.execute(self._lock_session, params).first()
        if row is not None:
            for name in ("flushed_idx", "history_id"):
                value = getattr(row, name)
                if not _codec.whole_int64(value):
                    # Set so by other SQL (SQLite keeps any value): no write could move
                    # it, nor be told apart from another writer's.
                    raise DatabaseError(
                        f"session {session_id!r} holds {name} {value!r}, not an integer from 0 "
                        "to 2**63 - 1; nothing was written (`hermes-orm verify --repair` "
                        "sets it)"
                    )
        return row

    # -- sessions ----------------------------------------------------------------------

    def _session_values(
        self, session_id: str, source: str, fields: dict[str, Any]
    ) -> dict[str, Any]:
        check_session_id(session_id)
        if self._user is not None:
            owner = fields.setdefault("user_id", self._user)
            if owner != self._user:
                raise InvalidSessionError(
                    f"a store scoped to user {self._user!r} makes only that user's sessions, "
                    f"not user {owner!r}'s"
                )
        values = check_fields({"source": source, **fields})
        values["id"] = session_id
        if values.get("started_at") is None:
            values["started_at"] = time.time()
        return values

    def _create_session(
        self, session_id: str, source: str, fields: dict[str, Any]
    ) -> Steps[dict[str, Any]]:
        values = self._session_values(session_id, source, fields)

        def work(conn: Connection) -> dict[str, Any]:
            self._check_references(conn, session_id, values)
            with _title_taken(values):
                inserted = conn.execute(self._insert_ignore(values)).rowcount
            if inserted != 1:
                raise SessionExistsError(session_id)
            refuse_orphans(conn, session_id)
            row = conn.execute(select(_sessions).where(_sessions.c.id == session_id)).one()
            return _session_dict(row)

        def found(conn: Connection, _created: dict[str, Any]) -> bool:
            return (
                conn.execute(select(_sessions.c.id).where(self._owned(session_id))).first()
                is not None
            )

        return (yield Run(work, write=True, once=True, found=found))  # type: ignore[no-any-return]

    def _ensure_session(self, session_id: str, source: str, fields: dict[str, Any]) -> Steps[bool]:
        values = self._session_values(session_id, source, fields)

        def work(conn: Connection) -> bool:
            self._check_references(conn, session_id, values)
            with _title_taken(values):
                inserted = conn.execute(self._insert_ignore(values)).rowcount
            if inserted == 1:
                refuse_orphans(conn, session_id)
                return True
            if (
                self._user is not None
                and conn.execute(select(_sessions.c.id).where(self._owned(session_id))).first()
                is None
            ):
                raise SessionExistsError(session_id, another_user=True)
            fill = {
                # typed bind: a JSON column's value is serialized like the column's
                name: func.coalesce(
                    _sessions.c[name], bindparam(None, value, type_=_sessions.c[name].type)
                )
                for name, value in fields.items()
                if value is not None and name in _NULLABLE
            }
            if fill:
                with _title_taken(values):
                    conn.execute(update(_sessions).where(self._owned(session_id)).values(fill))
            return False

        return _write(work)

    def _check_references(self, conn: Connection, session_id: str, values: dict[str, Any]) -> None:
        """Refuse a missing parent, a loop of parents, or a title another session holds.

        Before writing, of what the write would set: ``ensure_session`` keeps a
        parent or a title already set, and then neither the given one's
        existence nor where it would lead matters. A user-scoped store sees its
        user's sessions only: another user's parent is missing to it, and
        another user's session holding the title goes unnamed, even the one of
        ``session_id`` (the refusal is the same whichever id is asked for, so it
        tells no one which session holds a title).

        On PostgreSQL the checks hold until the commit, as SQLite's write lock
        makes them hold there. The session's own row is locked as it is read
        (what it keeps is not unlinked meanwhile); the parent's row is read
        ``FOR KEY SHARE`` (not deleted meanwhile; that blocks none of its
        updates, so no deadlock with a transaction updating both rows); and
        writes that set a parent in the same schema then take turns on an
        advisory lock, so two of them never each miss the link the other adds
        (``a -> b`` beside ``b -> a``). A title taken by a write under way is
        refused by its unique index (:func:`_title_taken`). (A parent given to
        another user meanwhile needs no lock: the child was made while it was
        this user's, as if before.)

        In a user's view, an id another user's session holds (or a session of no
        user) gets no loop check, which would tell where the parent's lineage leads
        through that user's sessions: the insert refuses the id as taken, as it
        refuses any, that session's row locked ``FOR KEY SHARE`` until then.
        """
        parent = values.get("parent_session_id")
        title = values.get("title")
        if parent == session_id:
            raise InvalidSessionError(f"session {session_id!r} cannot be its own parent")
        if parent is None and title is None:
            return
        # (Of this store's sessions only: another user's is none of a scoped store's.)
        kept = conn.execute(
            select(_sessions.c.parent_session_id, _sessions.c.title)
            .where(self._owned(session_id))
            .with_for_update(key_share=True)
        ).first()
        if parent is not None and (kept is None or kept.parent_session_id is None):
            if not self._exists_locked(conn, self._owned(parent)):
                raise InvalidSessionError(f"parent session {parent!r} does not exist")
            take_lineage_turn(conn)
            # An id another user's session holds (or one of no user): the insert refuses it
            # as taken, as it refuses any. Looked for, a loop would tell where the parent's
            # lineage leads through that user's sessions. (Locked: not deleted meanwhile.)
            elsewhere = (
                kept is None
                and self._user is not None
                and self._exists_locked(conn, _sessions.c.id == session_id)
            )
            if not elsewhere and conn.execute(_is_ancestor(session_id, parent)).first() is not None:
                raise InvalidSessionError(
                    f"parent session {parent!r} descends from session {session_id!r}: "
                    "the lineage would loop"
                )
        if title is not None and (kept is None or kept.title is None):
            other = _sessions.c.id != session_id
            if self._user is not None:  # any session not the user's own, of no user too
                other = or_(other, _sessions.c.user_id.is_distinct_from(self._user))
            holder = conn.execute(
                select(_sessions.c.id, _sessions.c.user_id).where(_sessions.c.title == title, other)
            ).first()
            if holder is not None:
                by = (
                    "another user's session"
                    if self._user is not None and holder.user_id != self._user
                    else f"session {holder.id!r}"
                )
                raise InvalidSessionError(f"title {title!r} is already used by {by}")

    @staticmethod
    def _exists_locked(conn: Connection, condition: Any) -> bool:
        """Whether a session meets ``condition``, its row read ``FOR KEY SHARE``.

        (PostgreSQL: not deleted, nor its id changed, until the commit; none of its
        updates blocked.)
        """
        found = select(_sessions.c.id).where(condition).with_for_update(read=True, key_share=True)
        return conn.execute(found).first() is not None

    def _insert_ignore(self, values: dict[str, Any]) -> Any:
        make = _dialects.insert_maker(self._engine.dialect.name)
        # rowcount of an INSERT is only kept when asked for (SQLAlchemy 2).
        return (
            make(_sessions)
            .values(values)
            .on_conflict_do_nothing(index_elements=["id"])
            .execution_options(preserve_rowcount=True)
        )

    def _get_session(self, session_id: str) -> Steps[dict[str, Any] | None]:
        check_session_id(session_id)

        def work(conn: Connection) -> dict[str, Any] | None:
            with _readable(f"session {session_id!r}"):
                row = conn.execute(select(_sessions).where(self._owned(session_id))).first()
            return None if row is None else _session_dict(row)

        return _read(work)

    def _end_session(self, session_id: str, reason: str) -> Steps[None]:
        check_session_id(session_id)
        if not isinstance(reason, str):
            raise InvalidSessionError(f"end reason must be a str, got {type(reason).__name__}")
        check_fields({"end_reason": reason})

        def work(conn: Connection) -> None:
            done = conn.execute(
                update(_sessions)
                .where(self._owned(session_id))
                .values(ended_at=time.time(), end_reason=reason)
            ).rowcount
            if done != 1:
                raise SessionNotFoundError(session_id)

        def found(conn: Connection, _result: None) -> bool:
            row = conn.execute(
                select(_sessions.c.end_reason).where(
                    self._owned(session_id), _sessions.c.ended_at.is_not(None)
                )
            ).first()
            return row is not None and row.end_reason == reason

        return (yield Run(work, write=True, once=True, found=found))  # type: ignore[no-any-return]

    def _delete_session(self, session_id: str) -> Steps[int]:
        check_session_id(session_id)
        if self._user is None:
            # Not read first: messages left by a delete with SQLite's foreign keys off go
            # too. Its row is locked last (the DELETE), after its children in lock order
            # (see _lock_children), as an ORM flush into it and a child takes them.
            return self._delete_sessions_steps(lambda _conn: [session_id])
        # Locked as it is picked (PostgreSQL): a session given to another user
        # meanwhile is not picked, and is not given away before it is deleted.
        mine = select(_sessions.c.id).where(self._owned(session_id)).with_for_update()
        return self._delete_sessions_steps(lambda conn: conn.execute(mine).scalars().all())

    def _delete_sessions_steps(self, pick: Callable[[Connection], Sequence[str]]) -> Steps[int]:
        """Delete the sessions ``pick`` names (in the same transaction) and their messages.

        Their children lose the parent link. Returns how many sessions went.
        """
        picked: list[str] = []

        def work(conn: Connection) -> int:
            ids = list(pick(conn))
            picked[:] = ids
            deleted = 0
            for some in _dialects.in_parts(ids):  # (a prune may pick many thousands)
                # Explicit, so it holds on engines without SQLite's foreign_keys pragma.
                conn.execute(delete(_messages).where(_messages.c.session_id.in_(some)))
                _lock_children(conn, some)
                conn.execute(
                    update(_sessions)
                    .where(_sessions.c.parent_session_id.in_(some))
                    .values(parent_session_id=None)
                )
                # Forgotten before the commit: a caller cancelled once it is done (an
                # asyncio task) must leave no cursor that a session made anew under
                # the same id would be checked against (and warned about).
                for session_id in some:
                    self.forget_cursor(session_id)
                gone = conn.execute(delete(_sessions).where(_sessions.c.id.in_(some)))
                deleted += int(gone.rowcount)
            return deleted

        def found(conn: Connection, _deleted: int) -> bool:
            return all(
                conn.execute(select(_sessions.c.id).where(_sessions.c.id.in_(some))).first() is None
                for some in _dialects.in_parts(picked)
            )

        deleted: int = yield Run(work, write=True, once=True, found=found)
        return deleted

    def _list_sessions(
        self, source: str | None, user_id: str | None, limit: int, cursor: str | None
    ) -> Steps[SessionPage]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidSessionError(f"limit must be an int from 1 to 1000, got {limit!r}")
        source, user_id = _check_filter("source", source), _check_filter("user_id", user_id)
        query = select(_sessions)
        if source is not None:
            query = query.where(_sessions.c.source == source)
        # A scoped store's filter narrows the listing further, never widens it.
        for owner in (user_id, self._user):
            if owner is not None:
                query = query.where(_sessions.c.user_id == owner)
        if cursor is not None:
            started_at, last_id = _decode_cursor(cursor)
            query = query.where(
                or_(
                    _sessions.c.started_at < started_at,
                    and_(_sessions.c.started_at == started_at, _sessions.c.id < last_id),
                )
            )
        query = query.order_by(_sessions.c.started_at.desc(), _sessions.c.id.desc()).limit(
            limit + 1
        )

        def work(conn: Connection) -> SessionPage:
            with _readable("a session of this page"):
                rows = conn.execute(query).all()
            page = [_session_dict(r) for r in rows[:limit]]
            more = len(rows) > limit
            next_cursor = (
                _encode_cursor(page[-1]["started_at"], page[-1]["id"]) if more and page else None
            )
            return SessionPage(sessions=page, next_cursor=next_cursor)

        return _read(work, replica=True)

    # -- messages -----------------------------------------------------------------------

    def _flush(
        self, session_id: str, messages: Sequence[dict[str, Any]], verify: str
    ) -> Steps[FlushResult]:
        check_session_id(session_id)
        if type(messages) is not list and (
            isinstance(messages, str | bytes) or not isinstance(messages, Sequence)
        ):
            raise InvalidMessageError(
                f"messages must be a list of dicts, got {type(messages).__name__}"
            )
        if verify not in _VERIFY:
            raise InvalidArgumentError(f"verify must be one of {_VERIFY}, got {verify!r}")

        # Before the hint is read: what the store knows of the session may go (a
        # delete, a rewrite) from then on, and with it what this flush checks against.
        since = self._memory.stamp()
        hint = self._hint(session_id) if verify != "full" else None
        if hint is not None and len(messages) > hint.cursor:
            try:
                return (yield from self._flush_on_hint(session_id, messages, hint, verify, since))
            except CursorMoved:
                pass

        result: FlushResult
        result, digest, start, taken, owner, history = yield Run(
            lambda conn: self._flush_locked(conn, session_id, messages, verify), write=True
        )
        # A bulk flush streams: it starts no copies of what it wrote (the next flush does).
        copy = verify != "last" and result.written <= _BATCH
        self._memory.remember(
            session_id,
            result.cursor,
            digest,
            taken,
            start or 0,
            history=history,
            copy=copy,
            owner=owner,
            since=since,
        )
        return result

    def flush_in(
        self,
        conn: Connection,
        session_id: str,
        messages: Sequence[dict[str, Any]],
        verify: str = "all",
    ) -> tuple[FlushResult, bytes | None, int | None]:
        """The flush inside a write transaction: read the cursor under the row lock, then write.

        Several of these can share one transaction (a bulk import of many short
        sessions); a :class:`HistoryDivergedError` is raised before anything of
        this session is written.

        Returns:
            The result, the digest at the new cursor, and where the messages
            this call checked or wrote begin (None when the list ends before
            the stored history): below it, the store's copies are the stored
            messages; from it to the new cursor, ``messages`` are.
        """
        return self._flush_locked(conn, session_id, messages, verify)[:3]

    def _flush_locked(
        self,
        conn: Connection,
        session_id: str,
        messages: Sequence[dict[str, Any]],
        verify: str,
    ) -> tuple[FlushResult, bytes | None, int | None, list[Any] | None, str | None, int]:
        """:meth:`flush_in`; the copies it took (None: none kept), the user, the ``history_id``.

        The copies are taken as the messages are checked and encoded, before
        any statement writes them: a list the caller changes while the write is
        under way (an asyncio task streaming into its last message) leaves them
        what the database holds.
        """
        stored = self._locked_cursor(conn, session_id)
        if stored is None:
            raise SessionNotFoundError(session_id)
        cursor = stored.flushed_idx
        owner: str | None = stored.user_id
        history = int(stored.history_id)
        hint = self._remembered(session_id, cursor, history)
        # The copies hold the history as this store left it. Where the stored cursor,
        # its digest or the history is not what it left, another writer moved it since
        # (appended, or cut, rewrote or made the session anew): the stored digests decide.
        as_left = hint is not None and (hint.cursor, hint.digest, hint.history) == (
            cursor,
            stored.flushed_digest,
            history,
        )
        copies = hint.copies if hint is not None and as_left and verify == "all" else None
        start = self._check_continues(
            conn,
            session_id,
            messages,
            cursor=cursor,
            digest=stored.flushed_digest,
            verify=verify,
            copies=copies,
        )
        digest = stored.flushed_digest
        if len(messages) < cursor:
            return FlushResult(written=0, cursor=cursor), digest, None, None, owner, history
        taken = None
        batches: Iterable[list[_codec.EncodedMessage]]
        if len(messages) - cursor <= _BATCH:
            encode = _codec.encode_message
            batches = [[encode(messages[i], i) for i in range(cursor, len(messages))]]
            if verify != "last" or (hint is not None and hint.copies is not None):
                # (none to keep up to date, else)
                taken = list(map(_codec.copied, messages[start:]))
        else:  # streamed: no copies (the store's next flush checks in the database)
            batches = _encode_batches(messages, cursor)
        if len(messages) == cursor:
            return FlushResult(written=0, cursor=cursor), digest, start, taken, owner, history
        end, last = self._insert(conn, session_id, cursor, digest, batches, history=history)
        return FlushResult(end - cursor, end), last, start, taken, owner, history

    def _flush_on_hint(
        self,
        session_id: str,
        messages: Sequence[dict[str, Any]],
        hint: _Hint,
        verify: str,
        since: int,
    ) -> Steps[FlushResult]:
        """Flush on the remembered cursor: no read, the UPDATE checks it in the database.

        The inserts and the cursor's compare-and-swap are one transaction; if
        the stored cursor or digest is not the remembered one, it rolls back and
        :class:`CursorMoved` sends the caller to the locked read. ``messages``
        must continue the history below the cursor: each message there equals
        the store's copy of it (``all``), or the one at the cursor does (``last``);
        where the store has no copy, the locked read checks.
        """
        cursor, digest, copies = hint.cursor, hint.digest, hint.copies
        if cursor:
            if copies is not None and len(copies) == cursor:
                # Every message (or, for "last", the one at the cursor) equal to its copy.
                if verify == "all":
                    if not all(map(operator.eq, messages, copies)):
                        raise CursorMoved  # the locked read finds which one and says so
                elif messages[cursor - 1] != copies[cursor - 1]:
                    raise CursorMoved
            elif verify == "all" or _digest_or_none(messages[cursor - 1], cursor - 1) != digest:
                raise CursorMoved
        statements: list[tuple[str, Sequence[Any]]] | None = None
        taken: list[Any] | None = None  # copies of the messages a short flush writes
        written: tuple[int, bytes | None] = (cursor, digest)  # where a short flush ends
        #: The one statement that writes the rows and moves the cursor, or nothing (PostgreSQL).
        once: tuple[str, Sequence[Any]] | None = None
        if len(messages) - cursor <= _BATCH:
            # Validated before the transaction begins: bad input never takes a lock.
            encoded = [_codec.encode_message(messages[i], i) for i in range(cursor, len(messages))]
            # Copied as encoded: the caller may change its list while the write is under way.
            if verify != "last" or copies is not None:
                taken = list(map(_codec.copied, messages[cursor:]))
            written = (len(messages), encoded[-1].digest)
            inserts = _insert_statements(self._sql, [Chunk(session_id, cursor, encoded, None)])
            sql, params = _advance(
                self._sql,
                self._user,
                session_id,
                cursor,
                digest,
                history=hint.history,
                end=written[0],
                last=written[1],
                tool_calls=sum(map(_TOOL_CALLS, encoded)),
            )
            statements = [*self._sql.begin, *inserts, (sql, params)]
            if self._sql.once_heads is not None and len(inserts) == 1:
                rows = len(encoded)
                once = (
                    self._sql.write_once(rows, checks_digest=bool(cursor)),
                    params + inserts[0][1],
                )

        def stale() -> None:
            if self._memory.forgotten_since(session_id, since):
                # Deleted or rewritten by another thread or task of this store since the
                # hint was read: another history may stand at the same cursor and digest.
                raise CursorMoved

        def work(conn: Connection) -> tuple[int, bytes | None]:
            stale()
            try:
                if statements is None:
                    # A longer flush streams (bounded memory; errors roll back) from
                    # a new stream on every attempt: a retry never resumes a used one.
                    # (SQLite's write lock is held since the transaction began.)
                    batches = _encode_batches(messages, cursor)
                    return self._insert(
                        conn, session_id, cursor, digest, batches, history=hint.history, stale=stale
                    )
                if once is not None and _dialects.can_autocommit(conn):
                    # One statement, sent right after the check (a session deleted and
                    # made anew meanwhile has another history_id: it writes nothing).
                    if _dialects.execute_driver_script(conn, [once], autocommit=True) != rows:
                        raise CursorMoved  # it wrote nothing
                else:
                    script = _checked_before_last(statements, stale)
                    if _dialects.execute_driver_script(conn, script, commit_if=1) != 1:
                        raise CursorMoved  # rolled back
                return written
            except IntegrityError:
                # Positions taken (another writer) or the session is gone.
                raise CursorMoved from None

        end, last = yield Run(work, write=True, whole=statements is not None)
        if statements is None:  # a bulk flush streams: no copies of all it wrote
            self._memory.remember(
                session_id, end, last, history=hint.history, owner=hint.owner, since=since
            )
        else:
            self._memory.remember(
                session_id,
                end,
                last,
                taken,
                cursor,
                history=hint.history,
                copy=verify != "last",
                owner=hint.owner,
                since=since,
            )
        return FlushResult(written=end - cursor, cursor=end)

    def forget_cursor(self, session_id: str) -> None:
        """Drop what the store remembers of a session (before rewriting its history)."""
        self._memory.forget(session_id)

    def _append(
        self, session_id: str, message: dict[str, Any], *, row_id: bool = False
    ) -> Steps[tuple[int, int | None]]:
        """Store ``message`` at the cursor: its ``idx``, and its row id if ``row_id``.

        The row id is read in the write's own transaction: a later one could
        find another message at that ``idx`` (the session rewritten meanwhile).
        """
        check_session_id(session_id)
        encoded = _codec.encode_message(message)
        taken = [_codec.copied(message)]  # as encoded (see _flush_locked)
        owner = [self._user]  # the session's user, as the locked read finds it
        history = [0]  # the session's history_id, as it finds it
        c = _messages.c

        def work(conn: Connection) -> tuple[int, int | None]:
            stored = self._locked_cursor(conn, session_id)
            if stored is None:
                raise SessionNotFoundError(session_id)
            owner[0] = stored.user_id
            idx = int(stored.flushed_idx)
            if idx and stored.flushed_digest is None:
                # Its row set by hand (an UPDATE, the ORM's bulk API): no digest tells
                # what the cursor stands on, and no message may be written above it.
                raise DatabaseError(
                    f"session {session_id!r} has its cursor at {idx} but no digest of the "
                    "message below it; nothing was written (`hermes-orm verify --repair` "
                    "sets the cursor from the rows)"
                )
            history[0] = int(stored.history_id)
            self._remembered(session_id, idx, history[0])
            self._insert(
                conn, session_id, idx, stored.flushed_digest, [[encoded]], history=history[0]
            )
            if not row_id:
                return idx, None
            query = select(c.id).where(c.session_id == session_id, c.idx == idx)
            return idx, int(conn.execute(query).scalar_one())

        def found(conn: Connection, written: tuple[int, int | None]) -> bool:
            idx, message_id = written
            query = select(c.digest).where(c.session_id == session_id, c.idx == idx)
            if message_id is not None:
                query = query.where(c.id == message_id)
            stored = conn.execute(query).scalar_one_or_none()
            return stored is not None and bytes(stored) == encoded.digest

        since = self._memory.stamp()
        written: tuple[int, int | None] = yield Run(work, write=True, once=True, found=found)
        idx = written[0]
        self._memory.remember(
            session_id,
            idx + 1,
            encoded.digest,
            taken,
            idx,
            history=history[0],
            copy=False,
            owner=owner[0],
            since=since,
        )
        return written

    @staticmethod
    def _check_continues(
        conn: Connection,
        session_id: str,
        messages: Sequence[dict[str, Any]],
        *,
        cursor: int,
        digest: bytes | None,
        verify: str,
        copies: list[Any] | None = None,
    ) -> int:
        """Refuse ``messages`` unless it is a prefix or a continuation of the stored history.

        ``all`` and ``full`` check every message below the cursor: against the
        store's ``copies`` where it has them (``all``), else against the stored
        digests. ``last`` checks the one at the end of what the two share. A
        list shorter than the stored history is a lagging writer (another
        process got there first) when its messages are the stored ones; it
        then writes nothing.

        Returns:
            Where the messages it checked against the database begin: below it,
            they equal the store's copies.
        """
        given = len(messages)
        overlap = min(given, cursor)
        if overlap == 0:
            return 0
        if verify == "last":
            if overlap < cursor:
                digest = conn.execute(
                    select(_messages.c.digest).where(
                        _messages.c.session_id == session_id, _messages.c.idx == overlap - 1
                    )
                ).scalar_one_or_none()
            if _digest_or_none(messages[overlap - 1], overlap - 1) != digest:
                raise HistoryDivergedError(
                    session_id, stored=cursor, given=given, index=overlap - 1
                )
            return cursor  # below it, the store's copies (if it has them) are still its own
        known = 0
        if copies is not None and len(copies) <= cursor:  # longer: the history was cut since
            known = min(len(copies), overlap)
            if not all(map(operator.eq, itertools.islice(messages, known), copies)):
                # Stale copies (another process rewrote the history since) must not
                # refuse what the database holds: its digests decide.
                known = 0
        if known < overlap:
            stored = conn.execute(
                select(_messages.c.digest)
                .where(
                    _messages.c.session_id == session_id,
                    _messages.c.idx >= known,
                    _messages.c.idx < overlap,
                )
                .order_by(_messages.c.idx)
            ).scalars()
            # Read whole before comparing: a result left open by the refusal
            # below would hold SQLite's read snapshot as long as the error lives.
            digests = stored.all()
            if len(digests) != overlap - known:
                # Rows written around the store (its cursor set by hand, rows deleted):
                # a flush on top would take the missing messages as stored.
                raise DatabaseError(
                    f"session {session_id!r} has its cursor at {cursor} but "
                    f"{overlap - known - len(digests)} of the messages below it are not "
                    "stored; nothing was written (`hermes-orm verify --repair` sets the "
                    "cursor from the rows)"
                )
            for i, stored_digest in enumerate(digests, known):
                if _digest_or_none(messages[i], i) != stored_digest:
                    raise HistoryDivergedError(session_id, stored=cursor, given=given, index=i)
        return known

    def _insert(
        self,
        conn: Connection,
        session_id: str,
        cursor: int,
        digest: bytes | None,
        batches: Iterable[list[_codec.EncodedMessage]],
        *,
        history: int,
        stale: Callable[[], None] | None = None,
    ) -> tuple[int, bytes | None]:
        """Write the rows at ``cursor`` and move the cursor past them, if it is still there.

        There: the stored cursor is ``cursor``, at ``digest`` on history ``history``.

        ``stale``, if given, runs just before the cursor's move (see
        :func:`_checked_before_last`).

        Returns:
            The new cursor and the digest at it.

        Raises:
            CursorMoved: The stored cursor is not there.
        """
        sql = self._sql
        end, last, tool_calls = cursor, digest, 0
        pending: list[tuple[str, tuple[Any, ...]]] = []
        for batch in batches:
            if pending:  # a bulk flush streams: each batch goes before the next is encoded
                _dialects.execute_driver_script(conn, pending)
                _retry.progress()
            pending = _insert_statements(sql, [Chunk(session_id, end, batch, None)])
            end += len(batch)
            last = batch[-1].digest
            tool_calls += sum(map(_TOOL_CALLS, batch))
        # The last batch and the cursor's move in one call (one trip on aiosqlite).
        user = self._user
        pending.append(
            _advance(
                sql,
                user,
                session_id,
                cursor,
                digest,
                history=history,
                end=end,
                last=last,
                tool_calls=tool_calls,
            )
        )
        script = pending if stale is None else _checked_before_last(pending, stale)
        if _dialects.execute_driver_script(conn, script) != 1:
            raise CursorMoved
        return end, last

    def _get_messages(
        self, session_id: str, offset: int, limit: int | None, *, replica: bool = True
    ) -> Steps[list[dict[str, Any]]]:
        check_session_id(session_id)
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < _INT64:
            raise InvalidArgumentError(f"offset must be an int from 0 to 2**63 - 1, got {offset!r}")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit < _INT64
        ):
            raise InvalidArgumentError(
                f"limit must be None or an int from 0 to 2**63 - 1, got {limit!r}"
            )
        if limit is not None:
            limit = min(limit, _INT64 - 1 - offset)  # (offset + limit is bound as a 64-bit int)
        # idx is dense, so a range on the unique (session_id, idx) index pages
        # in O(limit) where OFFSET would scan the skipped rows.
        sql = self._sql
        where = sql.read_where
        params: list[Any] = [session_id]
        if offset:
            where += sql.read_from
            params.append(offset)
        if limit is not None:
            where += sql.read_until
            params.append(offset + limit)
        # The session's row is checked by the statement that reads (one snapshot), so
        # a session deleted, or given to another user, meanwhile yields nothing.
        if self._user is not None:
            where += sql.read_owned
            params.append(self._user)
        else:
            where += sql.read_alive
            params.append(session_id)
        statement = f"{sql.read_messages}{where} ORDER BY idx"
        session = select(_sessions.c.id).where(self._owned(session_id))

        def work(conn: Connection) -> list[dict[str, Any]]:
            rows = _dialects.fetch_driver_rows(conn, statement, params)
            if not rows and conn.execute(session).first() is None:
                raise SessionNotFoundError(session_id)
            try:
                return _codec.decode_rows(rows)
            except _DAMAGED:
                for at, row in enumerate(rows):  # which one: raised by the first it is
                    with _readable(
                        f"session {session_id!r}: the message at position {offset + at}"
                    ):
                        _codec.decode_rows([row])
                raise

        return _read(work, replica=replica)

    # -- search ------------------------------------------------------------------------

    def _search(
        self,
        query: str,
        *,
        session_id: str | None,
        source: str | Sequence[str] | None,
        user_id: str | None,
        role: str | Sequence[str] | None,
        limit: int,
        cursor: str | None,
    ) -> Steps[SearchPage]:
        _search.check_query(query)
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= _search.MAX_LIMIT
        ):
            raise SearchQueryError(
                f"limit must be an int from 1 to {_search.MAX_LIMIT}, got {limit!r}"
            )
        user_id = _optional_str("user_id", user_id)
        filters = _search.Filters(
            session_id=_session_filter(session_id),
            sources=_str_tuple("source", source),
            user_id=user_id if self._user is None else self._user,
            roles=_str_tuple("role", role),
        )
        after = None if cursor is None else _search.decode_cursor(cursor, query, filters)
        if self._user is not None and user_id not in (None, self._user):
            # A scoped store's filter narrows, never widens: another user's
            # messages are not there.
            return _read(lambda _conn: SearchPage(hits=[], next_cursor=None))
        session_id = filters.session_id

        def lagging(conn: Connection, page: SearchPage) -> None:
            # No hit in a session the replica does not have yet: the primary may have some.
            if session_id is not None and not page.hits and _missing(conn, session_id):
                raise SessionNotFoundError(session_id)

        return _read(
            lambda conn: _search.run(conn, query, filters, after, limit, schema=self._schema),
            replica=True,
            lagging=lagging,
        )


class _Sessions(StoreCore):
    """The blocking API on sessions and messages, of a store and of its user-scoped views."""

    def _transaction(self, request: Run[Any]) -> Any:
        raise NotImplementedError

    # -- the API --------------------------------------------------------------------------

    def create_session(self, session_id: str, source: str, **fields: Any) -> dict[str, Any]:
        """Create a session and return it as :meth:`get_session` would.

        Args:
            session_id: The new session's id (at most 255 characters).
            source: Where it comes from (``cli``, ``telegram``, ...).
            **fields: Any other session column (``model``, ``user_id``,
                ``parent_session_id``, ``title``, ``extra={...}``, ...).

        Raises:
            SessionExistsError: The id is taken.
            InvalidSessionError: Unknown field or a value of the wrong type.
        """
        return drive(self._create_session(session_id, source, fields), self._transaction)

    def ensure_session(self, session_id: str, source: str = "unknown", **fields: Any) -> bool:
        """Create the session unless it exists; safe when processes race to create it.

        On an existing session, fields given here fill columns that are still
        NULL and never overwrite a value already set.

        Returns:
            True when this call created the session.
        """
        return drive(self._ensure_session(session_id, source, fields), self._transaction)

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        """The session as a dict of its columns (``flushed_digest`` in hex), or None."""
        return drive(self._get_session(session_id), self._transaction)

    def end_session(self, session_id: str, reason: str) -> None:
        """Mark the session ended now, with ``reason``.

        Raises:
            SessionNotFoundError: No such session.
        """
        drive(self._end_session(session_id, reason), self._transaction)

    def delete_session(self, session_id: str) -> bool:
        """Delete a session and its messages; its children lose their parent link.

        Returns:
            True when a session was deleted, False when there was none.
        """
        return drive(self._delete_session(session_id), self._transaction) == 1

    def list_sessions(
        self,
        *,
        source: str | None = None,
        user_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> SessionPage:
        """Sessions newest first (by ``started_at``, then id), one page at a time.

        Args:
            source: Only sessions from this source.
            user_id: Only sessions of this user.
            limit: Page size, 1 to 1000.
            cursor: ``next_cursor`` of the previous page.
        """
        return drive(self._list_sessions(source, user_id, limit, cursor), self._transaction)

    def flush(
        self,
        session_id: str,
        messages: Sequence[dict[str, Any]],
        *,
        verify: Verify = "all",
    ) -> FlushResult:
        """Write exactly ``messages[flushed_idx:]`` and advance the cursor with them.

        Call it with the whole conversation list whenever you like (end of turn,
        error, shutdown): what is stored already is skipped, and a failure at
        any point leaves the session as it was, so calling again is the retry.
        A list shorter than the stored history, whose messages match it, comes
        from a writer that lags behind another and writes nothing.

        Args:
            session_id: An existing session.
            messages: The conversation so far, oldest first.
            verify: What of ``messages`` below the cursor is checked against
                the stored history. ``"all"`` (default): every message. Each
                equal to the store's copy of what it stored there costs one
                comparison of dicts; the rest (a store's first flush of the
                session, say) are digested and compared with the stored
                digests. ``"full"``: every message, always against the stored
                digests. ``"last"``: only the message just below the cursor
                (O(1)), for lists too long to compare; a rewrite of an earlier
                message goes unseen.

        Raises:
            SessionNotFoundError: No such session.
            HistoryDivergedError: ``messages`` no longer continues the stored
                history; nothing was written.
            InvalidMessageError: A new message cannot be stored; nothing was written.
            InvalidArgumentError: ``verify`` is none of the modes.
            DatabaseBusyError: Transient errors outlasted the retry bound.
            DatabaseUnavailableError: The database stayed out of reach (see
                ``RetryPolicy.unavailable_for``).
            DatabaseError: Any other database error, such as a cursor above
                rows that are not stored (``hermes-orm verify --repair``); nothing
                was written.
        """
        return drive(self._flush(session_id, messages, verify), self._transaction)

    def append(self, session_id: str, message: dict[str, Any]) -> int:
        """Store one message at the session's cursor; returns its ``idx``.

        Raises:
            SessionNotFoundError: No such session.
            InvalidMessageError: The message cannot be stored; nothing was written.
        """
        return drive(self._append(session_id, message), self._transaction)[0]

    def get_messages(
        self, session_id: str, *, offset: int = 0, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Messages of a session in ``idx`` order, as the dicts that were flushed.

        Args:
            session_id: An existing session.
            offset: First ``idx`` to return.
            limit: Most messages to return (all when None).

        Raises:
            SessionNotFoundError: No such session.
        """
        return drive(self._get_messages(session_id, offset, limit), self._transaction)

    def search(
        self,
        query: str,
        *,
        session_id: str | None = None,
        source: str | Sequence[str] | None = None,
        user_id: str | None = None,
        role: str | Sequence[str] | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> SearchPage:
        """Messages matching ``query``, newest first, one page at a time.

        The query language (words, ``"phrases"``, ``OR``, ``-excluded``,
        ``prefix*``, substrings in CJK-like scripts) is described in
        :mod:`hermes_orm.search`; it is the same on SQLite and PostgreSQL.

        Args:
            query: What to look for, as a user typed it.
            session_id: Only messages of this session (an id no session can
                have, such as "", is refused).
            source: Only sessions of this source (or of any of these).
            user_id: Only sessions of this user.
            role: Only messages of this role (or of any of these).
            limit: Most hits on the page, 1 to ``search.MAX_LIMIT``.
            cursor: ``next_cursor`` of the previous page.

        Raises:
            SearchQueryError: Nothing to look for in ``query``, or a bad limit,
                cursor or filter.
        """
        steps = self._search(
            query,
            session_id=session_id,
            source=source,
            user_id=user_id,
            role=role,
            limit=limit,
            cursor=cursor,
        )
        return drive(steps, self._transaction)


def refuse_orphans(conn: Connection, session_id: str) -> None:
    """Refuse a session just created (rolled back) if messages of that id are stored.

    Left by a delete of their session with SQLite's foreign keys off (another
    client's), they would read as the new session's, whoever creates it.

    Raises:
        DatabaseError: Such messages are stored.
    """
    orphan = select(_messages.c.idx).where(_messages.c.session_id == session_id).limit(1)
    if conn.execute(orphan).first() is not None:
        raise DatabaseError(
            f"session {session_id!r} cannot be created: messages of a deleted session of "
            "that id are still stored (their session row was deleted with foreign keys off); "
            "restore its session row or delete them (hermes-orm verify lists them)"
        )


#: The stores keeping a connection of each engine's pool, for the engine's one
#: ``checkout`` listener (never removed: removing a listener while another thread
#: dispatches the event fails that thread's checkout).
_keepers: weakref.WeakKeyDictionary[Engine, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()
_keepers_lock = threading.Lock()


def give_back_when_full(store: Any, engine: Engine) -> None:
    """Have ``store`` give its kept connection back whenever ``engine``'s pool runs out.

    When a checkout leaves the pool empty, the engine's pool ``checkout``
    listener calls each of its stores' ``_give_back()``. Stores are held weakly.
    """
    with _keepers_lock:
        stores = _keepers.get(engine)
        if stores is None:
            stores = _keepers[engine] = weakref.WeakSet()
            event.listen(engine, "checkout", _on_checkout(weakref.ref(engine)))
        stores.add(store)


def _on_checkout(engine_ref: weakref.ref[Engine]) -> Callable[..., None]:
    def on_checkout(*_args: Any) -> None:
        engine = engine_ref()
        if engine is None or _sa.pool_has_room(engine.pool):
            return
        for store in list(_keepers.get(engine, ())):
            store._give_back()  # takes the store's lock: never misses one being kept

    return on_checkout


class SessionStore(_Sessions):
    """Sessions and their messages in one database, written exactly once.

    Args:
        bind: A database URL (``sqlite:///path.db``, ``postgresql://...``) or an
            existing :class:`~sqlalchemy.Engine`. A bare ``postgresql://`` URL
            uses psycopg 3. A SQLite engine given here is left as it is: each
            connection the store takes gets ``busy_timeout``, ``foreign_keys=ON``
            and ``sqlite_synchronous`` for the store's work, and its own values
            back when the store returns it.
        retry: Bound on retries of transient errors (busy database, lost
            connection, serialization failure).
        sqlite_synchronous: SQLite ``synchronous`` level for connections this
            store configures. ``FULL`` (default) also survives power loss;
            ``NORMAL`` in WAL mode survives process crashes and is faster.
        lock_timeout: Seconds one attempt waits for a lock: SQLite's
            ``busy_timeout``, and PostgreSQL's ``lock_timeout`` on engines built
            from a URL (an Engine passed in keeps its own PostgreSQL settings).
        check_schema: Refuse to work on a database whose schema is not at the
            shipped head revision (the first operation checks once).
        pgbouncer: The PostgreSQL server is reached through PgBouncer in
            transaction pooling mode (also ``?pgbouncer=true`` in the URL): the
            store then sets ``lock_timeout`` in each of its transactions, and an
            engine it builds prepares no statements. A psycopg Engine passed in
            (a replica's too) is given ``prepare_threshold=None`` at each
            checkout, and its transactions ``lock_timeout`` (an asyncpg
            AsyncEngine passed to the async store makes its connections with no
            statement cache and unnamed statements; see the README).
        schema: The PostgreSQL schema holding hermes_orm's tables (also
            ``?schema=NAME`` in the URL, or the engine's ``schema_translate_map``
            entry for tables with no schema). Each transaction puts it first on
            its ``search_path``; migrate with the same schema.
        replica: A PostgreSQL standby (a URL or an Engine) that serves
            :meth:`list_sessions`, :meth:`get_messages` and :meth:`search`;
            everything else, writes included, goes to ``bind``. A replica out
            of reach is skipped: the read goes to the primary (logged as a
            WARNING). It shows the primary's commits once it has applied them;
            see docs/scale-out.md.

    Each operation ends its transaction and gives its connection back, except
    that the store keeps one idle connection, the last it used, for its next
    operation (saving a trip through the pool): however many threads use it,
    a store holds the connections of the work in flight plus at most one, and
    :meth:`close` gives that one back.

    Raises:
        UnsupportedBackendError: The backend is neither SQLite nor PostgreSQL.
    """

    def __init__(
        self,
        bind: str | URL | Engine,
        *,
        retry: RetryPolicy | None = None,
        sqlite_synchronous: str = "FULL",
        lock_timeout: float = _dialects.LOCK_TIMEOUT,
        check_schema: bool = True,
        pgbouncer: bool = False,
        schema: str | None = None,
        replica: str | URL | Engine | None = None,
    ) -> None:
        check_bind(bind, Engine)
        check_options(retry, check_schema)
        settings = _dialects.engine_settings(sqlite_synchronous, lock_timeout, pgbouncer)
        if replica is not None:
            check_replica(bind, replica, Engine)
        self._owns_engine = not isinstance(bind, Engine)
        if isinstance(bind, Engine):
            _dialects.check_transactional(bind)
            schema = _dialects.store_schema(bind, schema)
            engine = bind
        else:
            engine = _dialects.create_store_engine(bind, schema=schema, **settings)
            schema = _dialects.store_schema(engine)
        self._owns_replica = replica is not None and not isinstance(replica, Engine)
        # The replica made (and checked) before an application's engines are configured.
        if isinstance(replica, str | URL):
            built = _dialects.replica_settings(engine, settings, replica)
            replica = _dialects.create_store_engine(replica, schema=schema, **built)
        configure_engines(
            engine, replica, settings, schema=schema, made=(self._owns_engine, self._owns_replica)
        )
        super().__init__(engine, retry=retry, check_schema=check_schema, schema=schema)
        self._read_from(replica)
        self._forks_seen = _forks[0]
        # The last connection used, idle, kept for the next operation (at most one).
        self._parked: list[Connection] = []
        self._parks = _sa.may_keep_one(engine.pool)
        #: Whether its threads take turns at the pool's one connection (a pool given
        #: anew by dispose() is of the same class).
        self._takes_turns = _sa.thread_turn(engine.pool) is not None
        self._parked_lock = threading.Lock()
        #: How many of its calls wait for a connection of the pool (under ``_parked_lock``).
        self._waiting = 0
        if self._parks:
            # The kept connection goes back as the pool runs out: the application's
            # threads (and other stores on the engine) do not wait for it (but see
            # _checkin: a failed connect frees a place without waking anyone).
            give_back_when_full(self, engine)
        #: Bumped by close(): a connection taken before it is given back, never kept.
        self._closes = 0
        #: SQLite: the settings each connection the store takes gets for its work.
        self._sqlite = (
            _dialects.sqlite_settings(sqlite_synchronous, lock_timeout)
            if engine.dialect.name == "sqlite"
            else None
        )

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine this store runs on."""
        return self._engine

    def __repr__(self) -> str:
        return f"SessionStore({_dialects.safe_url(self._engine.url)!r})"

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give back the idle connection; dispose of the engine if the store made it."""
        with self._parked_lock:
            self._closes += 1
        self._unpark()
        if self._owns_engine:
            self._engine.dispose()
        if self._owns_replica and self._replica_of is not None:
            self._replica_of.dispose()

    def for_user(self, user_id: str) -> UserStore:
        """This store, seeing only the sessions of ``user_id``; see :class:`UserStore`.

        Raises:
            InvalidSessionError: ``user_id`` is not a non-empty str.
        """
        return UserStore(self, user_id)

    # -- schema ------------------------------------------------------------------

    def upgrade(self, revision: str = "head") -> None:
        """Run the shipped migrations up to ``revision`` (default: the head).

        A database out of reach is waited for, as every call of the store waits
        (its ``retry`` policy); the migrations run whole or not at all, so a
        try a lost connection ended is run again from where the schema stands.
        Another process's migration of the database is waited for however long
        it takes (:func:`hermes_orm.upgrade`), outside the retry bound.
        """
        self._after_fork()

        def once() -> None:
            self._unpark()  # the pool's connection (of one, it may be the only one)
            try:
                with _turn(self._engine.pool), _retry.connecting(self._retry.attempt_timeout):
                    migrations.upgrade(self._engine, revision, schema=self._schema)
            except PoolTimeoutError as exc:
                raise _dialects.pool_exhausted(exc) from exc

        _retry.run_with_retry(self._engine, self._retry, once, self._schema)
        self._schema_checked = False

    def _ensure_schema(self) -> None:
        if not self._schema_checked:
            with _turn(self._engine.pool), self._connect() as conn:
                check_schema(conn, self._schema, self._retry.attempt_timeout)
            self._schema_checked = True

    # -- transactions --------------------------------------------------------------

    def _run(self, work: Callable[[Connection], T], *, write: bool, snapshot: bool = False) -> T:
        """Run ``work`` in one transaction on a pooled connection, retried whole.

        A write runs once (see :class:`Run`): the integrations' writes are not
        all idempotent.
        """
        request = Run(work, write, once=write, snapshot=snapshot)
        return self._transaction(request)  # type: ignore[no-any-return]

    def _after_fork(self) -> None:
        """In a forked child: drop the parent's connections, pooled or kept, and its locks.

        A child must not use them, nor wait for a lock another of the parent's
        threads may have held.
        """
        if self._forks_seen != _forks[0]:
            self._parked = []
            self._parked_lock = threading.Lock()
            self._waiting = 0  # (the parent's threads are not in this process)
            self._engine.dispose(close=False)
            if self._replica_of is not None:
                self._replica_of.dispose(close=False)
            self._forks_seen = _forks[0]

    def _transaction(self, request: Run[Any]) -> Any:
        self._after_fork()
        begin = self._sql.begin
        timeout = self._retry.attempt_timeout
        if self._on_replica(request):
            try:
                return self._from_replica(self._replica_request(request), timeout)
            except self._REPLICA_MISSES as exc:
                self._replica_missed(exc)
            except DatabaseError as exc:
                if not self._replica_schema_moved(exc):
                    raise

        def run() -> Any:
            self._ensure_schema()  # its connection's failures are retried as the work's
            closes = self._closes
            conn = self._checkout()
            try:
                result = attempt(conn, request, begin, self._settings, timeout)
            except BaseException:
                self._release(conn)  # the pool drops it if it was invalidated
                raise
            self._checkin(conn, closes)
            return result

        def once() -> Any:
            if not self._takes_turns:  # (no context manager on the hot path)
                return run()
            with _turn(self._engine.pool):
                return run()

        try:
            return _retry.run_with_retry(self._engine, self._retry, once, self._schema)
        except DatabaseError as exc:
            if not self._schema_moved(exc):
                raise
            _retry.run_with_retry(self._engine, self._retry, self._ensure_schema, self._schema)
            raise

    def _from_replica(self, request: Run[Any], timeout: float | None) -> Any:
        replica = self._replica_of
        assert replica is not None

        def once() -> Any:
            with _turn(replica.pool), self._connect(replica) as conn:
                return attempt(conn, request, (), self._replica_settings, timeout)

        return _retry.run_with_retry(
            replica, self._replica_retry, once, self._schema, name_holders=False
        )

    def _connect(self, engine: Engine | None = None) -> Connection:
        """A connection from ``engine``'s pool (the store's by default).

        A pool with none to give in time is as a database out of reach.
        """
        engine = engine or self._engine
        _dialects.refuse_shared_transaction(engine.pool)
        try:
            with _retry.connecting(self._retry.attempt_timeout):
                conn = engine.connect()
        except PoolTimeoutError as exc:
            raise _dialects.pool_exhausted(exc) from exc
        if conn.dialect.name == "postgresql":
            try:
                _dialects.check_driver_transactional(conn)
            except InvalidArgumentError:
                conn.close()
                raise
        return conn

    def _give_back(self) -> None:
        """The pool ran out: the idle connection the store kept goes back to it."""
        self._unpark()

    def _unpark(self) -> None:
        """Give the idle connection the store kept back to the pool."""
        with self._parked_lock:
            parked, self._parked = self._parked, []
        for conn in parked:
            self._release(conn)

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        """A connection of the pool for work outside the store's transactions (``VACUUM``).

        The idle connection the store kept goes back first: a pool of one still
        has one to give.
        """
        self._after_fork()
        self._unpark()
        with _turn(self._engine.pool):
            conn = self._connect()
            try:
                yield conn
            finally:
                conn.close()

    def _checkout(self) -> Connection:
        """The idle connection the store kept, else one from the pool."""
        with self._parked_lock:
            kept = self._parked.pop() if self._parked else None
        if kept is not None:
            if not kept.invalidated and not _sa.of_replaced_pool(kept):
                return _sa.log_as_the_engine(kept)
            self._release(kept)
        with self._parked_lock:
            self._waiting += 1
        try:
            conn = self._connect()
        finally:
            with self._parked_lock:
                self._waiting -= 1
        if self._sqlite is not None:
            try:
                _dialects.take_sqlite(conn, self._sqlite)
            except BaseException:
                conn.close()
                raise
        return conn

    def _release(self, conn: Connection) -> None:
        """Give ``conn`` back to the pool with the settings it came with.

        One of a pool its engine no longer has (disposed of meanwhile, by
        :meth:`close` or by the application) is closed: that pool would keep it
        open, unused, until the garbage collector came by.
        """
        try:
            if _sa.of_replaced_pool(conn):
                conn.invalidate()
            _dialects.give_back_sqlite(conn)
        finally:
            conn.close()

    def _checkin(self, conn: Connection, closes: int) -> None:
        """Keep ``conn`` (its transaction ended) for the next operation, or give it back.

        One idle connection saves the next operation a trip through the pool
        (a large share of the CPU time of a turn's flush on SQLite); more would
        take connections from the application's share. One taken before the
        store was closed (``closes``: the count of closes then) goes back, and
        so does one the pool has none beside: another thread may be waiting. So
        does one while another call of this store waits for a connection: the
        pool may have room it does not tell the waiting call of (a connection
        that failed as it was made frees its place, and wakes no one), and only
        a connection given back would end the wait before the pool's timeout.
        One invalidated (its try outlasted ``attempt_timeout`` as it ended, say)
        goes back at once: asked anything, it would take a connection from the
        pool, under the lock the pool's checkout listener takes.
        """
        if not self._parks or conn.invalidated:
            self._release(conn)
            return
        with self._parked_lock:
            room = _sa.pool_has_room(self._engine.pool)
            if (
                room
                and not self._waiting
                and not self._parked
                and closes == self._closes
                and _dialects.keeps_its_mode(conn)
            ):
                self._parked.append(conn)
                return
        self._release(conn)
        if not room:
            # The pool hands a connection to whoever asks first, and this thread,
            # holding the GIL, would ask again before a waiting one woke up.
            time.sleep(0)

    # -- the internal API of hermes_orm's integrations (importer, Hermes adapter) ------

    def write_transaction(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in one write transaction (holding the write lock), retried whole."""
        return self._run(work, write=True)

    def read_transaction(self, work: Callable[[Connection], T], *, snapshot: bool = False) -> T:
        """Run ``work`` in one read transaction, retried whole.

        ``snapshot``: its statements all see one moment of the database (each sees
        its own otherwise), taking no lock a writer waits for.
        """
        return self._run(work, write=False, snapshot=snapshot)

    def primary_messages(
        self, session_id: str, *, offset: int = 0, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """:meth:`get_messages`, read on the primary even where a replica serves reads.

        What a write is decided on must be what is stored now: a standby that
        lags would show a message just committed as missing, and it would be
        written again.
        """
        steps = self._get_messages(session_id, offset, limit, replica=False)
        return drive(steps, self._transaction)

    def locked_cursor(self, conn: Connection, session_id: str) -> Any:
        """In a write transaction: the session's cursor row, under its write lock (None: none).

        The row has ``flushed_idx``, ``flushed_digest``, ``history_id`` and ``tool_call_count``.
        """
        return self._locked_cursor(conn, session_id)

    def append_row(self, session_id: str, message: dict[str, Any]) -> tuple[int, int]:
        """:meth:`append`, returning the message's ``idx`` and its row id."""
        idx, message_id = drive(self._append(session_id, message, row_id=True), self._transaction)
        assert message_id is not None  # asked for with row_id
        return idx, message_id

    def insert_rows(
        self,
        conn: Connection,
        session_id: str,
        cursor: int,
        digest: bytes | None,
        encoded: list[_codec.EncodedMessage],
        *,
        history: int,
    ) -> None:
        """In a write transaction: store ``encoded`` at ``cursor`` and move the cursor past them.

        The flush's own write: ``cursor``, ``digest`` and ``history`` are the
        session's, as :meth:`locked_cursor` read them (else :class:`CursorMoved`).
        """
        self._insert(conn, session_id, cursor, digest, [encoded], history=history)

    def delete_sessions(self, pick: Callable[[Connection], Sequence[str]]) -> int:
        """Delete the sessions ``pick`` names, in its transaction; see :meth:`delete_session`."""
        return drive(self._delete_sessions_steps(pick), self._transaction)

    def rebuild_search_index(self) -> int:
        """Rebuild the search index from the stored messages; returns how many there are.

        Triggers keep the index in step with every write; a rebuild repairs an
        index damaged outside hermes_orm, or compacts one after heavy deletes.
        """
        # Unbounded: on a large store the rebuild outlasts any deadline of one try.
        return self._transaction(Run(_search.rebuild, write=True, bounded=False))  # type: ignore[no-any-return]


class UserStore(_Sessions):
    """A store's view of one user's sessions (``SessionStore.for_user(user_id)``).

    It has the store's API on sessions and messages, as if the database held
    that user's sessions only (``user_id`` equal to it) and no other:

    - ``create_session`` and ``ensure_session`` make sessions of the user (a
      ``user_id=`` field naming anyone else is an error); a parent session must
      be the user's too;
    - ``get_session`` returns None for another user's session; ``end_session``,
      ``flush``, ``append`` and ``get_messages`` raise
      :class:`SessionNotFoundError`; ``delete_session`` deletes nothing and
      returns False;
    - ``list_sessions`` and ``search`` find the user's sessions and messages
      only; a ``user_id=`` filter naming another user finds nothing.

    Session ids and titles are unique in the whole database, so an id or a
    title another user's session holds is refused (:class:`SessionExistsError`,
    :class:`InvalidSessionError`) without naming that session.

    Every check is made in the database, in the transaction of the operation
    (a session given to another user since is not written by this view). The
    view shares its store's connections and what it remembers of cursors, so
    making one per request costs nothing; closing the store ends it too.
    """

    def __init__(self, store: SessionStore, user_id: str) -> None:
        self._view(store, user_id)
        self._store = store

    def _transaction(self, request: Run[Any]) -> Any:
        return self._store._transaction(request)


def _check_user_id(user_id: Any) -> str:
    """The user of a scoped store: a non-empty str a database can compare."""
    if not isinstance(user_id, str) or not user_id:
        raise InvalidSessionError(f"a user id must be a non-empty str, got {user_id!r}")
    if len(user_id) > _INDEXED_TEXT_MAX:  # (no session may hold it: its writes would fail)
        raise InvalidSessionError(
            f"a user id holds at most {_INDEXED_TEXT_MAX} characters, got {len(user_id)}"
        )
    return _check_filter("user_id", user_id)  # type: ignore[return-value]


def _optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise SearchQueryError(f"{name} must be a str or None, got {type(value).__name__}")
    if value is not None and (problem := _codec.text_problem(value)) is not None:
        raise SearchQueryError(f"{name} {value!r} {problem}")
    return value


def _missing(conn: Connection, session_id: str) -> bool:
    """Whether the database ``conn`` reads holds no session ``session_id``."""
    return conn.execute(select(_sessions.c.id).where(_sessions.c.id == session_id)).first() is None


def _session_filter(session_id: Any) -> str | None:
    """The ``session_id`` filter of a search: None, or what a session's id may be.

    An id no session can have (empty, past 255 characters) is refused rather
    than matching nothing: it is a caller's mistake (an unset variable), which
    an empty page would hide.
    """
    given = _optional_str("session_id", session_id)
    if given is not None and not 0 < len(given) <= 255:
        raise SearchQueryError(
            "session_id must be a session's id, a non-empty str of at most 255 characters, "
            f"got {_codec.shown(given)}"
        )
    return given


def _str_tuple(name: str, value: Any) -> tuple[str, ...] | None:
    """A filter given as one str or a sequence of them."""
    if value is None:
        return None
    values = (value,) if isinstance(value, str) else value
    if (
        not isinstance(values, Sequence)
        or not values
        or not all(isinstance(v, str) for v in values)
    ):
        raise SearchQueryError(f"{name} must be a str or a non-empty list of str, got {value!r}")
    return tuple(values)  # (each checked as search.Filters takes it)


def flush_sql(
    dialect: str, *, scoped: bool = False, schema: str | None = None
) -> _dialects.FlushSQL:
    """The flush's statements for ``dialect`` (``sqlite`` or ``postgresql``).

    ``scoped``: for a user-scoped store, whose cursor moves only on its user's
    sessions (see :func:`_advance`). ``schema``: the tables' PostgreSQL schema,
    named in the statements.
    """
    # JSON columns are read as their text, which _codec parses faster than the
    # PostgreSQL drivers do (docs/benchmarks.md: get_messages vs the driver's fetch).
    read = tuple(
        f"{column}::text" if dialect == "postgresql" and column in _codec.JSON_COLUMNS else column
        for column in _codec.READ_COLUMNS
    )
    return _dialects.render_flush_sql(
        dialect,
        _INSERT_COLUMNS,
        _INSERT_TYPES,
        read,
        scoped=scoped,
        schema=schema,
    )


def prepare_many(sql: _dialects.FlushSQL, chunks: Sequence[Chunk]) -> PreparedWrite:
    """Statements that store each chunk's rows and move each cursor past them.

    Pure Python, so any thread or process may build them; :func:`write_prepared`
    runs them. Every session may appear once.
    """
    if len({chunk[0] for chunk in chunks}) != len(chunks):
        raise ValueError("a session may appear once in a prepared write")
    advances = []
    for some in _dialects.in_parts(chunks, sql.advance_sessions_max):
        cursors: list[Any] = []
        digests: list[Any] = []
        calls: list[Any] = []
        expected: list[Any] = []
        for session_id, cursor, batch, digest, history in some:
            cursors += (session_id, cursor + len(batch))
            digests += (session_id, batch[-1].digest if batch else digest)
            calls += (session_id, sum(map(_TOOL_CALLS, batch)))
            expected += (session_id, cursor, digest, history) if cursor else (session_id, cursor)
        advance = sql.advance_many([chunk.cursor != 0 for chunk in some])
        advances.append((advance, (*cursors, *cursors, *digests, *calls, *expected), len(some)))
    return PreparedWrite(_insert_statements(sql, chunks), advances)


def write_prepared(conn: Connection, prepared: PreparedWrite) -> None:
    """Run a :func:`prepare_many` write in ``conn``'s transaction.

    Raises:
        CursorMoved: A cursor was not where the chunk said (nothing to keep:
            the caller rolls the transaction back).
    """
    if prepared.inserts:
        _dialects.execute_driver_script(conn, prepared.inserts)
    for advance, params, sessions in prepared.advances:
        if _dialects.execute_driver_script(conn, [(advance, params)]) != sessions:
            raise CursorMoved


def _advance(
    sql: _dialects.FlushSQL,
    user: str | None,
    session_id: str,
    cursor: int,
    digest: bytes | None,
    *,
    history: int,
    end: int,
    last: bytes | None,
    tool_calls: int,
) -> tuple[str, tuple[Any, ...]]:
    """The UPDATE moving the cursor from ``cursor`` (at ``digest``) to ``end`` (at ``last``).

    It changes one row only if the stored cursor, digest and ``history_id``
    (``history``; at cursor 0, an empty history, the cursor alone) are still those
    (and, for a store scoped to ``user``, the session is that user's: ``sql``
    is then rendered ``scoped``); ``tool_calls`` is how many the new messages carry.
    """
    params: tuple[Any, ...] = (end, end, last, tool_calls, session_id, cursor)
    if cursor:
        params = (*params, digest, history)
    if user is not None:
        params = (*params, user)
    return (sql.advance_if_digest if cursor else sql.advance), params


def _checked_before_last(
    statements: Sequence[tuple[str, Sequence[Any]]], check: Callable[[], None]
) -> Iterator[tuple[str, Sequence[Any]]]:
    """``statements``, ``check`` run just before the last one (the cursor's move) is taken.

    A flush on a remembered cursor checks that no other task or thread of the
    store forgot the session since (a delete, a rewrite: they forget before
    they commit). Checked before the transaction only, a flush waiting for
    SQLite's write lock meanwhile would find, once it has it, a session deleted
    and made anew with the same cursor and digest, and write on top of another
    history. Here the write lock is held (SQLite, since ``BEGIN IMMEDIATE``),
    or the session's row is (PostgreSQL: the inserts' foreign key check), so
    such a forget is either seen or comes after the commit.
    """
    yield from statements[:-1]
    check()
    yield statements[-1]


def _insert_statements(
    sql: _dialects.FlushSQL, chunks: Iterable[Chunk]
) -> list[tuple[str, tuple[Any, ...]]]:
    """Multi-row INSERTs of the chunks' rows (``idx`` from each chunk's cursor on).

    Each holds at most ``sql.insert_rows_max`` rows and, unless one row is
    more, :data:`_STATEMENT_BYTES` characters of text: PostgreSQL refuses a
    statement of more than 1 GiB by closing the connection.
    """
    most = sql.insert_rows_max
    statements: list[tuple[str, tuple[Any, ...]]] = []
    params: list[Any] = []
    rows = size = 0
    for session_id, cursor, batch, *_ in chunks:
        for idx, item in enumerate(batch, cursor):
            size += item.size
            if rows and size > _STATEMENT_BYTES:
                statements.append((sql.insert_messages(rows), tuple(params)))
                params, rows, size = [], 0, item.size
            params += (session_id, idx)
            params += item.params
            rows += 1
            if rows == most:
                statements.append((sql.insert_messages(rows), tuple(params)))
                params, rows, size = [], 0, 0
    if rows:
        statements.append((sql.insert_messages(rows), tuple(params)))
    return statements


def _encode_batches(
    messages: Sequence[dict[str, Any]], start: int
) -> Iterator[list[_codec.EncodedMessage]]:
    """Encode ``messages[start:]`` in batches of :data:`_BATCH` (bulk flushes stream)."""
    for first in range(start, len(messages), _BATCH):
        stop = min(first + _BATCH, len(messages))
        yield [_codec.encode_message(messages[i], i) for i in range(first, stop)]


def _digest_or_none(message: Any, index: int) -> bytes | None:
    """Digest of a caller's already-stored message; None when it is no longer valid."""
    try:
        return _codec.message_digest(message, index)
    except InvalidMessageError:
        return None
