"""The mirror: Hermes Agent's live conversations, flushed exactly once into a hermes_orm store.

Hermes calls the plugin once per completed turn with the whole conversation
(:mod:`hermes_orm.integrations.hermes.plugin`). The mirror flushes it with
:meth:`SessionStore.flush`, so the stored cursor decides what is new: a turn
whose flush failed is carried by the next one, and a second process mirroring
the same session writes nothing twice.

What is stored is each message as the agent sends it: Hermes' internal keys
(``_db_persisted`` and the other ``_``-prefixed marks it stamps in place, some a
turn later) are left out, and so are the recovery scaffolding messages Hermes
never persists either.

Continuity is judged by what a conversation is made of (role, content, tool
calls and their ids), not by the dict's every key: Hermes adds keys to old
messages, and a conversation reloaded from Hermes' own ``state.db`` or imported
with ``hermes-orm import`` carries columns the live dicts lack. A live list that
still continues the stored history is flushed as the stored messages followed by
the new ones. A list that no longer does (Hermes compressed it in place,
``/undo``, an edited message) is never appended: the stored history stays as it
was, and the new one is kept as a *revision*, the session ``<id>#2`` (then
``#3``, ...), whose ``parent_session_id`` is the history it replaced and whose
``extra`` names the Hermes session. A warning says so.

Writes happen on one background thread; a turn waits for its own write at most
``wait`` seconds, so a database that is down or locked never stalls the agent
for longer. A failed write is logged once, with what to do, and recorded in a
status file that ``hermes orm status`` shows; the next turn catches up exactly.

In store mode Hermes writes its sessions into the database itself (through
hermes_orm's ``SessionDB``), and :class:`StoreFlush` takes the mirror's place:
at the end of each turn it stores, after Hermes' own rows, the messages Hermes'
writes missed, and marks them as Hermes marks what it stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import operator
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from hermes_orm import _codec, migrations
from hermes_orm._dialects import create_store_engine, redact, safe_url
from hermes_orm._retry import RetryPolicy
from hermes_orm.errors import (
    DatabaseBusyError,
    DatabaseError,
    DatabaseUnavailableError,
    HermesOrmError,
    HistoryDivergedError,
    InvalidMessageError,
    SchemaOutOfDateError,
    SchemaTooNewError,
    SessionNotFoundError,
)
from hermes_orm.integrations.hermes._text import scrub_json
from hermes_orm.models import Message, Session
from hermes_orm.store import SessionStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a turn waits for its write before the agent goes on (the write goes on).
DEFAULT_WAIT = 1.0
#: Seconds the process waits at exit for writes still queued.
EXIT_WAIT = 5.0
#: Seconds a close waits after an earlier one gave up on queued writes.
_CLOSED_AGAIN_WAIT = 1.0
#: Seconds one write attempt waits for a lock, and the retries after it: a locked
#: database gives up after a few seconds and the next turn tries again.
_LOCK_TIMEOUT = 1.0
_RETRY = RetryPolicy(
    attempts=3, base_delay=0.05, max_delay=0.5, unavailable_for=5.0, attempt_timeout=10.0
)
#: Sessions whose stored history the mirror keeps in memory (the most recent).
_TRACKED_MAX = 1000
#: Given-up writes the status keeps (the newest).
_GIVEN_UP_KEPT = 20
#: Runs of lists of one session kept for a later write after theirs failed, each run
#: a rewrite of the one before (compression, a rewind). Past this many, the oldest
#: is given up, and said so.
_PENDING_MAX = 4
#: Lists kept of each run of lists extending the one before while their writes fail:
#: the newest, and those before it that stand in if the store refuses what it added.
_FALLBACKS = 3
#: What :meth:`Mirror._guarded` did with a write: ran it; saw the database fail it
#: (out of reach, busy, behind on migrations: every write would fail now); saw it
#: fail otherwise (it may run later, and the next list may run now); saw the store
#: refuse its messages (it never will).
_Outcome = Literal["ran", "down", "busy", "failed", "refused"]
#: What a database that will take the write again soon raises (locked, out of reach):
#: "busy", a kind of "down".
_BUSY = (DatabaseBusyError, DatabaseUnavailableError)
#: The failures of the database itself (its errors wrapped, or its driver's, or the
#: network's): a write of another list would fail alike now.
_DOWN = (DatabaseError, DatabaseUnavailableError, DatabaseBusyError, SQLAlchemyError, OSError)
#: Marks of Hermes' recovery scaffolding: messages Hermes never persists
#: (hermes-agent 0.19 ``run_agent._EPHEMERAL_SCAFFOLDING_FLAGS``).
SCAFFOLDING_FLAGS = (
    "_empty_recovery_synthetic",
    "_empty_terminal_sentinel",
    "_thinking_prefill",
    "_verification_stop_synthetic",
    "_pre_verify_synthetic",
    "_kanban_stop_synthetic",
)
#: Hermes session columns (text) copied onto a mirrored session when it is first seen.
_SESSION_FIELDS = ("user_id", "model", "system_prompt", "cwd", "profile_name")
REVISION_MARK = "#"


def clean(message: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``message`` without Hermes' internal ``_``-prefixed keys.

    Lists and dicts are copied too: Hermes edits its messages in place (tool
    call arguments, surrogates), and what the mirror holds must stay as it was.

    Lone surrogates, which a database of UTF-8 text cannot hold, are replaced
    (U+FFFD) wherever they are: Hermes keeps them in its live list (a tool's
    output, a tool call's arguments) and replaces or escapes them where it
    stores them, so a message holding one is stored, not refused with its
    whole session. A dict two of whose keys would then be one keeps its keys
    as they are (:func:`scrub_json`): the store refuses it (nothing is lost unsaid).
    """
    kept = {k: v for k, v in message.items() if not (type(k) is str and k[:1] == "_")}
    return scrub_json(kept)  # type: ignore[no-any-return]


def is_scaffolding(message: Mapping[str, Any]) -> bool:
    """Whether ``message`` is recovery scaffolding that Hermes itself never persists."""
    return any(message.get(flag) for flag in SCAFFOLDING_FLAGS)


def conversation(history: Sequence[Any]) -> list[dict[str, Any]]:
    """The messages of Hermes' live list as the mirror stores them."""
    return [clean(m) for m in history if isinstance(m, dict) and not is_scaffolding(m)]


def _calls(message: Mapping[str, Any]) -> list[tuple[Any, Any, Any]]:
    calls = message.get("tool_calls") or ()
    out = []
    for call in calls if isinstance(calls, list) else ():
        if isinstance(call, dict):
            function = call.get("function") or {}
            out.append((call.get("id"), function.get("name"), function.get("arguments")))
    return out


def same_turn(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two message dicts are the same message of a conversation.

    Role, content, tool calls (id, name, arguments) and tool call id decide;
    other keys (timestamps, token counts, Hermes' columns) do not, and an empty
    content equals a missing one, as Hermes' ``state.db`` round-trips them. A
    list of content parts (an image sent with the text), or a multimodal tool
    result, equals the text Hermes stores for it (:func:`loop_content`), which
    a conversation resumed from ``state.db`` holds.
    """
    return (
        a.get("role") == b.get("role")
        and _turn_content(a) == _turn_content(b)
        and (a.get("tool_call_id") or None) == (b.get("tool_call_id") or None)
        and _calls(a) == _calls(b)
    )


def _turn_content(message: Mapping[str, Any]) -> Any:
    """A message's content as Hermes' ``state.db`` holds it (None for none)."""
    return loop_content(message.get("content")) or None


def first_difference(live: Sequence[Mapping[str, Any]], stored: Sequence[Mapping[str, Any]]) -> int:
    """Index of the first stored message ``live`` does not repeat; -1 if it continues them all.

    A ``live`` list shorter than ``stored`` that repeats its beginning continues it
    (a lagging writer: nothing to do).
    """
    for i in range(min(len(live), len(stored))):
        if not same_turn(live[i], stored[i]):
            return i
    return -1


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value and "\x00" not in value else None


def _text_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The text columns of a session row worth copying (Hermes' or the mirror's own)."""
    return {name: value for name in _SESSION_FIELDS if (value := _text(row.get(name)))}


def shared_prefix(a: Sequence[Any], b: Sequence[Any], same: Any = operator.is_) -> int:
    """How many leading items of ``a`` and ``b`` are ``same`` (identical), at C speed."""
    flags = list(map(same, a, b))
    return flags.index(False) if False in flags else len(flags)


def revision_id(session_id: str, revision: int) -> str:
    """The mirrored session holding revision ``revision`` (1 is the session itself)."""
    return session_id if revision == 1 else f"{session_id}{REVISION_MARK}{revision}"


def revision_row(store: SessionStore, session_id: str, revision: int) -> dict[str, Any] | None:
    """The stored row of a revision; None: none, or its id is longer than a store takes."""
    stored = revision_id(session_id, revision)
    return None if len(stored) > _codec.SESSION_ID_MAX else store.get_session(stored)


@dataclass
class _Tracked:
    """What the writer knows of one Hermes session.

    ``stored`` is what its current revision holds, as passed to (or read from)
    the store; ``seen`` is the last list written, whose leading messages match
    ``stored``: a later list sharing those very copies needs no comparison
    (copies never change).
    """

    revision: int
    stored: list[dict[str, Any]]
    source: str
    seen: list[dict[str, Any]] = field(default_factory=list)
    #: The revision's rows, where they hold more than ``stored``: rows that are no
    #: message of the conversation (the ``session_meta`` row of a Hermes gateway
    #: session, brought by an import). None: ``stored`` is all of them.
    rows: list[dict[str, Any]] | None = None

    @classmethod
    def of_rows(cls, revision: int, rows: list[dict[str, Any]], source: str) -> _Tracked:
        """What a revision's stored ``rows`` hold of the conversation."""
        stored = conversation_rows(rows)
        return cls(revision, stored, source, rows=None if len(stored) == len(rows) else rows)


def conversation_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored ``rows`` without those that are no message of the conversation.

    Hermes' gateway opens each session's transcript with a ``session_meta`` row
    (its state.db, and an import of it, hold it); the agent's list never does.
    """
    if not any(row.get("role") == "session_meta" for row in rows):
        return rows
    return [row for row in rows if row.get("role") != "session_meta"]


_CONTENT = itertools.repeat("content")
_TOOL_CALLS = itertools.repeat("tool_calls")


def _get(message: Any, key: str) -> Any:
    return message.get(key) if isinstance(message, dict) else None


def _values(messages: list[Any], keys: Iterator[str]) -> list[Any]:
    """Each message's value of the key (None for a non-dict), at C speed when all are dicts."""
    try:
        return list(map(dict.get, messages, keys))
    except TypeError:  # an item that is not a dict
        return list(map(_get, messages, keys))


@dataclass
class _Snapshot:
    """Hermes' list as a session's last turn saw it, and the copies the mirror made of it.

    The next turn copies only what is new or changed: the same dict whose
    content and tool calls still equal those of its copy keeps the copy. (A
    role or tool call id changed in place on the same dict is not looked for.)
    ``counts[i]`` is how many copies ``history[:i]`` gave (scaffolding gives
    none); ``contents`` and ``calls`` hold each message's values as copied
    (as the list holds them where the copy has surrogates replaced).
    """

    history: list[Any]
    contents: list[Any]
    calls: list[Any]
    cleaned: list[dict[str, Any]]
    counts: list[int]

    def extended_by(self, history: list[Any]) -> _Snapshot:
        """The snapshot of ``history``, the session's list one turn later."""
        keep = shared_prefix(history, self.history)
        if keep:
            head = history[:keep]
            keep = min(
                keep,
                shared_prefix(_values(head, _CONTENT), self.contents, operator.eq),
                shared_prefix(_values(head, _TOOL_CALLS), self.calls, operator.eq),
            )
        counts = self.counts[: keep + 1]
        kept = _Snapshot(
            self.history,
            self.contents[:keep],
            self.calls[:keep],
            self.cleaned[: counts[-1]],
            counts,
        )
        return kept.grown(history, keep)

    @classmethod
    def of(cls, history: list[Any]) -> _Snapshot:
        """The first snapshot of a session's list."""
        return cls([], [], [], [], [0]).grown(history, 0)

    def grown(self, history: list[Any], keep: int) -> _Snapshot:
        """This snapshot of ``history[:keep]``, with ``history[keep:]`` copied after it."""
        for message in history[keep:]:
            kept = isinstance(message, dict) and not is_scaffolding(message)
            source = clean(message) if kept else message if isinstance(message, dict) else {}
            if kept:
                self.cleaned.append(source)
            self.counts.append(len(self.cleaned))
            self.contents.append(_compared(message, source, "content"))
            self.calls.append(_compared(message, source, "tool_calls"))
        self.history = list(history)
        return self


def _compared(message: Any, copy: Mapping[str, Any], key: str) -> Any:
    """What the next turn compares the live ``message[key]`` with: its value in ``copy``.

    Where replacing lone surrogates made the copy's value another, a copy of
    the live one (else every turn would take the message for changed).
    """
    value = copy.get(key)
    if copy is message:
        return value
    live = message.get(key)
    if type(live) is str:
        return live
    if type(live) is list and live != value:
        return _codec.copied(live)
    return value


@dataclass(frozen=True)
class Turn:
    """One completed turn: the conversation as the mirror stores it, copied when the hook ran.

    ``history`` is the list the hook was given (Hermes' live message dicts), for
    :class:`StoreFlush` to mark what it stored; the mirror itself never reads it.
    ``history_length`` is its length then (Hermes may append to it meanwhile).
    ``made``: when it was made, in the mirror's count of events (see
    :meth:`StoreFlush.rewritten`).
    """

    session_id: str
    messages: list[dict[str, Any]]
    model: str | None = None
    platform: str | None = None
    history: list[Any] | None = None
    history_length: int = 0
    made: int = 0


@dataclass
class _Job:
    run: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)


class _Worker:
    """One daemon thread running queued writes in the order they were last queued.

    A write queued under the key of one still waiting replaces it (whoever
    waits for the older one is released by the newer): the mirror queues a
    session's turns under one key while each list extends the one before, so
    the newest carries whatever an older one held.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: OrderedDict[tuple[str, str, int], _Job] = OrderedDict()
        self._busy = False
        self._current: tuple[str, str, int] | None = None  # the key of the write running
        self._thread: threading.Thread | None = None

    def submit(self, key: tuple[str, str, int], run: Callable[[], None]) -> threading.Event:
        with self._cond:
            queued = self._queue.get(key)
            job = _Job(run, queued.done if queued is not None else threading.Event())
            self._queue[key] = job
            self._queue.move_to_end(key)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="hermes-orm-mirror", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        return job.done

    def withdraw(self, key: tuple[str, str, int], done: threading.Event) -> bool:
        """Take back the write queued under ``key`` whose waiters wait on ``done``.

        Returns:
            True if it was still waiting (it will not run); False if it ran or runs.
        """
        with self._cond:
            queued = self._queue.get(key)
            if queued is None or queued.done is not done:
                return False
            del self._queue[key]
            done.set()  # (whoever else waits for it is released too)
            return True

    def holds(self, session_id: str, kinds: tuple[str, ...]) -> bool:
        """Whether a write of one of ``kinds`` for the session is queued or running."""
        return any(kind in kinds and sid == session_id for kind, sid, _ in self._keys())

    def sessions(self) -> list[str]:
        """The sessions whose writes are queued or running, in order."""
        return list(dict.fromkeys(sid for _, sid, _ in self._keys() if sid))

    def _keys(self) -> list[tuple[str, str, int]]:
        with self._cond:
            return [*self._queue, *([self._current] if self._current is not None else [])]

    def drain(self, timeout: float) -> bool:
        """Wait until every queued write ran, at most ``timeout`` seconds; True if they did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                self._current, job = self._queue.popitem(last=False)
                self._busy = True
            try:
                job.run()
            except Exception:  # the thread must outlive any failure
                logger.exception("hermes_orm mirror: unexpected error")
            finally:
                job.done.set()
                with self._cond:
                    self._busy = False
                    self._current = None
                    self._cond.notify_all()


class StatusFile:
    """The mirror's last error, kept where ``hermes orm status`` (another process) reads it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        """The recorded status; empty when there is none or it cannot be read."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write(self, **values: Any) -> None:
        """Record ``values`` (None removes a key); failures to write are only logged."""

        def change(data: dict[str, Any]) -> None:
            for key, value in values.items():
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value

        self.update(change)

    def add(self, key: str, entry: dict[str, Any], keep: int) -> None:
        """Append ``entry`` to the list recorded at ``key``, its newest ``keep`` kept."""

        def change(data: dict[str, Any]) -> None:
            entries = data.get(key)
            entries = entries if isinstance(entries, list) else []
            data[key] = [*entries, entry][-keep:]

        self.update(change)

    def update(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Apply ``change`` to the record (in place) under the file's lock; failures only logged."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with self._held():
                data = self.read()
                change(data)
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")  # (one at a time)
                fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump(data, out, indent=2)
                os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("hermes_orm mirror: cannot write %s: %s", self.path, exc)

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """The file's lock, held across a write's read and replace.

        Mirrors of other processes (and threads) record their errors in the same
        file: without it, one's write could put back a key another had just
        changed, or drop one it had just added. (Where ``fcntl`` is missing,
        on Windows, writes go unlocked.)
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - POSIX everywhere the suite runs
            yield
            return
        fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # (and the lock with it)


#: The marks of this process's mirrors not closed yet (see Mirror._writer).
_OPEN_MARKS: set[str] = set()


def _clears(error: Mapping[str, Any], session_id: str, writer: str) -> bool:
    """Whether the mirror ``writer``, which just wrote ``session_id``, takes ``error`` off.

    It does when the error is its own, or of that session (written now), or
    left by a process that is gone (or names none: an older version's).
    Another mirror still running keeps its error on record (two Hermes
    processes on one home directory).
    """
    recorded = error.get("process")
    if not isinstance(recorded, str) or recorded == writer:
        return True
    if error.get("session_id") == session_id:
        return True
    pid, _, mark = recorded.partition(":")
    if pid == str(os.getpid()):  # this process's pid: a mirror of it still open, or of a
        return mark not in _OPEN_MARKS  # process before it given the same pid (a container)
    return not _running(pid)


def _running(pid: str) -> bool:
    """Whether a process ``pid`` names runs (one of another user's does too)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OverflowError):
        return False  # no pid: not a process's record
    except OSError:
        return True  # (another user's: there)
    return True


#: Reads Hermes' own row of a session (a dict of its columns), or None.
HermesSessions = Callable[[str], dict[str, Any] | None]
#: Reads the conversation Hermes stored for a session (as a resume loads it), or None.
HermesConversation = Callable[[str], list[dict[str, Any]] | None]

_CATCH_UP = "the next completed turn of the session catches up"
_END_LOST = (
    "its end is written once the database takes this process's writes again (another "
    "session's turn, or the exit), unless the session is written to or resumed first"
)
#: What a refused end that could not be written after all leaves.
_END_GIVEN_UP = "its end is not written: the mirrored copy stays open until a turn resumes it"


@dataclass(frozen=True)
class _LostEnd:
    """An end the database refused, and the session as this process left it.

    It is written later only onto that state: the revision still open, holding
    the rows it held, and no newer revision. Anything else means another
    writer, or a resume, or a compression, moved the session on: its end is
    theirs to write.
    """

    revision: int
    rows: int
    reason: str
    at: float


class Mirror:
    """Flushes Hermes' conversations into a hermes_orm database, one background writer.

    Args:
        url: The database URL.
        status: Where failures are recorded for ``hermes orm status``.
        hermes_sessions: Reads Hermes' own session row (source, user, model,
            parent); without it, sessions get the hook's platform and model.
        wait: Seconds a turn waits for its write.
        hermes_conversation: Reads the conversation Hermes stored for a
            session: at a session's end, what it holds past the mirrored
            history (a last turn that failed or was interrupted fires no
            hook) is written before the end.
    """

    #: What becomes of lists given up unwritten (at the exit, past the bound), as said.
    _left = (
        "a resumed session's next turn catches up; Hermes' state.db holds them "
        "(`hermes orm import` copies what is missing)"
    )

    def __init__(
        self,
        url: str,
        *,
        status: StatusFile,
        hermes_sessions: HermesSessions | None = None,
        wait: float = DEFAULT_WAIT,
        hermes_conversation: HermesConversation | None = None,
    ) -> None:
        self.url = url
        self.wait = wait
        self.status = status
        self._hermes_conversation = hermes_conversation
        #: This mirror, as the status file names the writer of an error: its
        #: process, told apart from a later one given the same pid.
        self._mark = os.urandom(4).hex()
        _OPEN_MARKS.add(self._mark)
        self._hermes_sessions = hermes_sessions
        self._store: SessionStore | None = None
        self._tracked: OrderedDict[str, _Tracked] = OrderedDict()
        # Hook side: per session, its last snapshot and the number of its list's
        # line (the key its writes queue under): a list that extends the one
        # before keeps it, any other takes a new one, unique in the process (a
        # session forgotten, ended or evicted, and then used again, must not
        # queue under the key of a write still waiting for an older list).
        self._snapshots: OrderedDict[str, tuple[_Snapshot, int]] = OrderedDict()
        self._lines = itertools.count(1)
        self._snapshots_lock = threading.Lock()
        self._worker = _Worker()
        # Writer side: the sessions whose last write failed, with the error as the
        # status records it (the latest last), and the turns of each not written
        # yet, oldest first (see _write).
        self._failing: dict[str, dict[str, Any]] = {}
        self._unwritten: OrderedDict[str, list[Turn]] = OrderedDict()
        #: The session whose lists :meth:`_catch_up` writes now (taken out of _unwritten).
        self._catching_up: str | None = None
        #: Whether a close gave up waiting for writes still queued, and the sessions
        #: (their writes, their refused ends) closes told of (see :meth:`close`).
        self._closed_undrained = False
        self._told_at_exit: set[str] = set()
        self._ends_told_at_exit: set[str] = set()
        #: Sessions a final close gave up (see :meth:`close`).
        self._given_up_at_exit: set[str] = set()
        #: The ends the database refused, to write once it takes writes again.
        self._lost_ends: OrderedDict[str, _LostEnd] = OrderedDict()
        self._status_checked = False

    # -- hooks (Hermes' thread): copy, queue, wait a bounded time --------------------------

    def turn(
        self,
        session_id: str,
        history: list[Any],
        model: str | None = None,
        platform: str | None = None,
    ) -> bool:
        """Queue the flush of Hermes' live list ``history``; wait for it at most ``wait`` s.

        The list is copied now (:func:`conversation`): what Hermes changes
        afterwards is the next turn's. Messages unchanged since the session's
        previous turn keep their copies, so a turn costs about its new messages.

        Returns:
            True if the write ran (or failed, and said so) within ``wait``.
        """
        return self._waited(session_id, *self._queued(session_id, history, model, platform))

    def _waited(
        self, session_id: str, key: tuple[str, str, int], done: threading.Event, job: Turn | None
    ) -> bool:
        """Wait for the write queued under ``key`` (``job``'s, if a turn's) at most ``wait`` s."""
        return done.wait(self.wait)

    def _queued(
        self, session_id: str, history: list[Any], model: str | None, platform: str | None
    ) -> tuple[tuple[str, str, int], threading.Event, Turn]:
        """Queue the flush of ``history``: its key, what its waiters wait on, the turn."""
        with self._snapshots_lock:
            previous, line = self._snapshots.pop(session_id, (None, 0))
            if previous is None:
                snapshot = _Snapshot.of(history)
                line = next(self._lines)
            else:
                snapshot = previous.extended_by(history)
                if shared_prefix(snapshot.cleaned, previous.cleaned) < len(previous.cleaned):
                    line = next(self._lines)  # not an extension: both lists must be written
            self._snapshots[session_id] = (snapshot, line)
            while len(self._snapshots) > _TRACKED_MAX:
                self._snapshots.popitem(last=False)
        job = Turn(
            session_id, snapshot.cleaned, model, platform, history, len(history), next(self._lines)
        )
        key = ("flush", session_id, line)
        return key, self._worker.submit(key, lambda: self._flush(job)), job

    def finalize(self, session_id: str, reason: str) -> bool:
        """Queue the end of a session (after its queued flushes); True if it ran in ``wait``."""
        with self._snapshots_lock:
            self._snapshots.pop(session_id, None)
        # Each end in its place: a later one (the id used again) must not move it.
        end = ("end", session_id, next(self._lines))
        done = self._worker.submit(end, lambda: self._end(session_id, reason))
        return done.wait(self.wait)

    def close(self, timeout: float = EXIT_WAIT, *, final: bool = True) -> bool:
        """Wait for queued writes (at most ``timeout`` seconds), then close the store.

        Lists whose write failed are tried once more first: no turn of theirs
        comes after the exit to catch them up. What is still not written is
        told on the log (each session once, however many closes), and, by the
        ``final`` close only, given up: an earlier one (the plugin's, before
        the exit steps of what was set up since) leaves it to the writer, and
        to the CLI's session end, until the last.
        """
        if self._closed_undrained:
            # An earlier close found the database not taking the writes: waiting
            # that long again would double the exit's wait.
            timeout = min(timeout, _CLOSED_AGAIN_WAIT)
        deadline = time.monotonic() + timeout
        drained = self._worker.drain(timeout)
        if drained and (self._unwritten or self._lost_ends):
            self._worker.submit(("catch up", "", next(self._lines)), self._catch_up_all)
            drained = self._worker.drain(max(0.0, deadline - time.monotonic()))
        if not drained:
            self._closed_undrained = True
            # (The writer still runs: its lists are read as they stand, not changed.)
            # _unwritten read on both sides of the session being caught up: one it takes
            # out is named by one of the three, until written.
            pending = [*self._worker.sessions(), *list(self._unwritten)]
            catching_up = self._catching_up
            pending += [*([catching_up] if catching_up else []), *list(self._unwritten)]
            left = list(dict.fromkeys(pending))
            told = self._not_yet(self._told_at_exit, left)
            if told:
                logger.warning(
                    "hermes_orm mirror: writes still queued at exit (%s); %s",
                    ", ".join(map(repr, told[:5])),
                    self._left,
                )
            for session_id in self._not_yet(self._given_up_at_exit, left) if final else ():
                when = "at the exit"
                if session_id not in self._unwritten and session_id != catching_up:
                    when += " (the session's end-of-turn check was still queued: if any)"
                self._given_up(session_id, when)
            self._tell_lost_ends(final)
            return False
        unwritten = list(self._unwritten)
        told = self._not_yet(self._told_at_exit, unwritten)
        if told:
            logger.warning(
                "hermes_orm mirror: at exit, %d session(s) still not written (%s); %s",
                len(told),
                ", ".join(map(repr, told[:5])),
                self._left,
            )
        for session_id in self._not_yet(self._given_up_at_exit, unwritten) if final else ():
            self._given_up(session_id, "at the exit")
            self._unwritten.pop(session_id, None)  # (the writer idle: not tried again)
        self._tell_lost_ends(final)
        _OPEN_MARKS.discard(self._mark)  # (its errors on record: another's to take off)
        store, self._store = self._store, None
        if store is not None:
            store.close()
            store.engine.dispose()  # made by _open: the store does not own it
        return True

    @staticmethod
    def _not_yet(done: set[str], what: list[str]) -> list[str]:
        """Those of ``what`` not in ``done`` (told of, or given up, by a close), now added."""
        new = [item for item in what if item not in done]
        done.update(new)
        return new

    def _tell_lost_ends(self, final: bool) -> None:
        """Tell of the ends the database refused (each once); the ``final`` close gives up."""
        ends = self._not_yet(self._ends_told_at_exit, list(self._lost_ends))
        if ends:
            logger.warning(
                "hermes_orm mirror: at exit, the end of %d session(s) is still not written "
                "(%s): their mirrored copies stay open until a turn resumes them",
                len(ends),
                ", ".join(map(repr, ends[:5])),
            )
        for session_id in list(self._lost_ends) if final else ():
            self._give_up_end(session_id)  # (the status only: safe while the writer runs)

    # -- the writer thread ---------------------------------------------------------------

    def _open(self) -> SessionStore:
        if self._store is None:
            engine_kwargs: dict[str, Any] = {}
            if make_url(self.url).get_backend_name() == "postgresql":
                # A server that does not answer fails the attempt, not the agent.
                engine_kwargs["connect_args"] = {"connect_timeout": 2}
            engine = create_store_engine(self.url, lock_timeout=_LOCK_TIMEOUT, **engine_kwargs)
            try:
                self._create_schema(engine)
            except BaseException:
                engine.dispose()
                raise
            self._store = SessionStore(engine, retry=_RETRY, lock_timeout=_LOCK_TIMEOUT)
        return self._store

    @staticmethod
    def _create_schema(engine: Any) -> None:
        """Give a database without hermes_orm's schema the schema.

        One behind the shipped head is left to its operator: the store refuses
        it, naming the command. Another process may be creating it at the same
        moment: its success is as good as ours.
        """
        if migrations.current(engine) is not None:
            return
        try:
            migrations.upgrade(engine)
        except Exception:
            if migrations.current(engine) is None:
                raise

    def _guarded(
        self,
        session_id: str,
        work: Callable[[SessionStore], None],
        *,
        catches_up: bool = True,
        todo: str = _CATCH_UP,
    ) -> _Outcome:
        """Run ``work``; a failure is recorded, not raised. Returns what became of it.

        Without ``catches_up``, its success clears no failure of the session's
        (an end written says nothing of a conversation left unwritten). ``todo``
        is what a failure of the database leaves to do, as the status says it.
        """
        try:
            work(self._open())
        except (SchemaOutOfDateError, SchemaTooNewError) as exc:
            if isinstance(exc, SchemaOutOfDateError) and not exc.branch:
                # The plugin's own command: it upgrades the database the plugin writes to.
                exc = SchemaOutOfDateError(exc.current, exc.expected, fix="`hermes orm db upgrade`")
            self._failed(session_id, exc, "the mirror writes nothing until then")
            return "down"
        except InvalidMessageError as exc:
            self._failed(
                session_id,
                exc,
                "this session is not mirrored while that message is in its conversation",
            )
            return "refused"
        except (HermesOrmError, SQLAlchemyError, OSError) as exc:
            self._failed(session_id, exc, todo)
            if isinstance(exc, _BUSY):
                return "busy"
            if isinstance(exc, _DOWN):
                return "down"
        except Exception as exc:
            logger.exception("hermes_orm mirror: unexpected error writing session %r", session_id)
            self._failed(session_id, exc, todo)
        else:
            if catches_up or session_id not in self._failing:
                self._succeeded(session_id)
            return "ran"
        return "failed"

    def _failed(self, session_id: str, exc: BaseException, todo: str) -> None:
        message = redact(f"{type(exc).__name__}: {exc}")
        before = self._failing.pop(session_id, None)
        if before is None or before["message"] != message:  # once per new failure, not per turn
            logger.warning(
                "hermes_orm mirror: session %r not written to %s (%s); %s",
                session_id,
                safe_url(self.url),
                message,
                todo,
            )
        error = {
            "at": time.time(),
            "url": safe_url(self.url),
            "session_id": session_id,
            "message": message,
            "todo": todo,
            "process": self._writer(),
        }
        self._failing[session_id] = error
        self._tracked.pop(session_id, None)  # read again from the database next time
        self.status.write(error=error)

    def _writer(self) -> str:
        return f"{os.getpid()}:{self._mark}"

    def _succeeded(self, session_id: str) -> None:
        """The session's failure on record is over: said, and cleared."""
        if self._failing.pop(session_id, None) is not None:
            logger.warning(
                "hermes_orm mirror: session %r is written to %s again, caught up",
                session_id,
                safe_url(self.url),
            )
        elif self._status_checked:
            return
        self._status_checked = True
        error = self.status.read().get("error")
        if not isinstance(error, dict) or error.get("url") not in (None, safe_url(self.url)):
            return  # another database's
        if self._failing:
            # Another session still fails: its error (the latest) stays on record,
            # in place of this session's.
            if error.get("session_id") == session_id:
                self.status.write(error=list(self._failing.values())[-1])
        elif _clears(error, session_id, self._writer()):
            self.status.write(error=None)

    def _catch_up(self, session_id: str) -> bool:
        """Write the session's lists not written yet; whether the database was busy for them."""
        # Named before it leaves _unwritten, until it is written or back there (see close()).
        self._catching_up = session_id
        try:
            jobs = self._unwritten.pop(session_id, None)
            return self._write(session_id, jobs) if jobs else False
        finally:
            self._catching_up = None

    def _catch_up_all(self) -> None:
        """Write every session's lists not written yet, and lost ends (at exit: no turn will)."""
        for session_id in list(self._unwritten):
            self._catch_up(session_id)
        self._write_lost_ends()

    def _write_lost_ends(self) -> None:
        """Write the ends the database refused, each onto the state it was refused on.

        One that the session has moved on from since (see :class:`_LostEnd`) is
        given up: the state it ended is gone.
        """
        for session_id, lost in list(self._lost_ends.items()):
            written: list[bool] = []
            write = functools.partial(_end_as_left, session_id=session_id, lost=lost, out=written)
            outcome = self._guarded(session_id, write, catches_up=False, todo=_END_LOST)
            if outcome in ("busy", "down"):
                return  # still refused: the next write tries again
            del self._lost_ends[session_id]
            pending = self._failing.get(session_id, {}).get("todo") == _END_LOST
            if written == [True] and pending:
                self._succeeded(session_id)  # (the end's refusal was the last on record)
            elif written == [False]:
                logger.info(
                    "hermes_orm mirror: the end of session %r, refused earlier, is not written: "
                    "the session was written to or resumed since",
                    session_id,
                )
                if pending:  # (nothing is left to do: the session went on)
                    self._forget_failure(session_id)
            else:  # another failure: given up, and the status says so
                self._give_up_end(session_id)

    def _forget_failure(self, session_id: str) -> None:
        """Take the session's failure off this process's record, and off the status.

        Off the status only as this process's error there: another process's error
        of the session is that process's to clear.
        """
        self._failing.pop(session_id, None)
        if self._on_record(session_id):
            self.status.write(error=list(self._failing.values())[-1] if self._failing else None)

    def _on_record(self, session_id: str) -> bool:
        """Whether the status's error on record is this process's, of the session."""
        recorded = self.status.read().get("error")
        return (
            isinstance(recorded, dict)
            and recorded.get("session_id") == session_id
            and recorded.get("process") == self._writer()
        )

    def _given_up(self, session_id: str, when: str) -> None:
        """The session's lists not written are dropped ``when``: a resumed turn writes them.

        (The mirror writes the whole conversation each turn; see
        :meth:`StoreFlush._given_up` for what store mode keeps nowhere else.)
        """

    def _give_up_end(self, session_id: str) -> None:
        """Record that the session's refused end will not be written after all."""
        error = self._failing.get(session_id)
        if error is None or error.get("todo") != _END_LOST:
            return
        error = self._failing[session_id] = {**error, "todo": _END_GIVEN_UP}
        if self._on_record(session_id):
            self.status.write(error=error)

    def _flush(self, turn: Turn) -> None:
        """Write ``turn``'s list, after the session's earlier lists not written yet.

        An earlier list the new one extends is written by it (or, if the store
        refuses what the new one added, instead of it). One it does not extend
        (the conversation was rewritten since: compression, a rewind) holds
        messages the new list lacks: it is written first, into the revision it
        continues, and the new list then starts the next revision.
        """
        self._lost_ends.pop(turn.session_id, None)  # resumed: its end is the next one
        busy = self._write(turn.session_id, [*self._unwritten.pop(turn.session_id, []), turn])
        if self._lost_ends and not busy and turn.session_id not in self._unwritten:
            self._write_lost_ends()

    def _write(self, session_id: str, jobs: list[Turn]) -> bool:
        """Flush ``jobs`` (oldest first) in order; keep those that fail for a later write.

        Returns whether the database refused a write for a while (locked, out of
        reach: :data:`_BUSY`).

        Each run of lists extending the one before goes as its newest: it writes
        the others. A list the store refuses (a message it cannot hold) is given
        up, and the one before it in the run is written in its stead. When the
        database fails a write (out of reach, busy), that run and the later
        ones wait, in order. A run that fails otherwise waits alone: the next
        may go (each list goes into the revision it continues, whenever it is
        written).
        """
        kept: list[list[Turn]] = []
        runs = _runs(jobs)
        busy = False
        for at, run in enumerate(runs):
            left = list(run)  # the newest first; those it refused dropped
            outcome: _Outcome = "refused"
            while left and outcome == "refused":
                write = functools.partial(self._flush_in, turn=left[-1])
                outcome = self._guarded(session_id, write, catches_up=not kept)
                if outcome == "refused":
                    left.pop()
            if outcome in ("down", "busy"):
                kept += [left, *runs[at + 1 :]]
                busy = outcome == "busy"
                break
            if outcome == "failed":
                kept.append(left)
        if kept:
            self._keep(session_id, kept)
        return busy

    def _keep(self, session_id: str, runs: list[list[Turn]]) -> None:
        """Keep ``runs`` (oldest first) as the session's lists not written yet.

        Of each run of lists extending the one before, the newest
        :data:`_FALLBACKS` (the newest writes the others; those before it stand
        in if the store refuses what it added); of the runs, the newest
        :data:`_PENDING_MAX` (each a rewrite of the one before), the others
        given up and said so.
        """
        runs = [run[-_FALLBACKS:] for run in runs if run]
        if len(runs) > _PENDING_MAX:
            logger.warning(
                "hermes_orm mirror: session %r was rewritten %d times while its writes failed; "
                "the oldest %d of its unwritten conversations are given up",
                session_id,
                len(runs) - 1,
                len(runs) - _PENDING_MAX,
            )
            runs = runs[-_PENDING_MAX:]
        self._unwritten[session_id] = [job for run in runs for job in run]
        self._unwritten.move_to_end(session_id)
        while len(self._unwritten) > _TRACKED_MAX:
            dropped, lists = self._unwritten.popitem(last=False)
            self._given_up(dropped, f"past {_TRACKED_MAX:,} sessions with lists not written")
            logger.warning(
                "hermes_orm mirror: %d sessions have lists not written; the oldest, session "
                "%r, is given up (%d list(s)): %s",
                _TRACKED_MAX,
                dropped,
                len(lists),
                self._left,
            )

    def _flush_in(self, store: SessionStore, turn: Turn) -> None:
        sid, live = turn.session_id, turn.messages
        tracked = self._tracked.get(sid)
        if tracked is None:
            tracked = self._resolve(store, turn)
        self._tracked.move_to_end(sid)
        if not _continues(live, tracked):
            # Read what is stored now: another process may have written this list,
            # or made the revision it continues.
            tracked = self._resolve(store, turn)
            if not _continues(live, tracked):
                tracked = self._revise(store, turn, tracked)
        if len(live) > len(tracked.stored):
            new = live[len(tracked.stored) :]
            rows = (tracked.stored if tracked.rows is None else tracked.rows) + new
            try:
                store.flush(revision_id(sid, tracked.revision), rows)
            except HistoryDivergedError:
                self._tracked.pop(sid, None)  # another writer moved on: the next turn reads it
                raise
            if tracked.rows is None:
                tracked.stored = rows
            else:
                tracked.stored, tracked.rows = tracked.stored + new, rows
        tracked.seen = live

    def _revisions(self, store: SessionStore, session_id: str) -> list[dict[str, Any]]:
        """The stored revisions of a Hermes session, oldest first."""
        rows: list[dict[str, Any]] = []
        while (row := revision_row(store, session_id, len(rows) + 1)) is not None:
            rows.append(row)
        return rows

    def _resolve(self, store: SessionStore, turn: Turn) -> _Tracked:
        """The newest stored revision the live list continues, else the newest one.

        A session seen for the first time is created, with Hermes' own fields.
        """
        sid = turn.session_id
        revisions = self._revisions(store, sid)
        if not revisions:
            tracked = _Tracked(1, [], self._create(store, turn))
        else:
            source = str(revisions[0]["source"])
            newest = _Tracked(len(revisions), [], source)
            empty: _Tracked | None = None  # the newest revision still empty
            for revision in range(len(revisions), 0, -1):
                candidate = _Tracked.of_rows(
                    revision, store.primary_messages(revision_id(sid, revision)), source
                )
                if revision == len(revisions):
                    newest = candidate
                if candidate.stored:
                    if _continues(turn.messages, candidate):
                        tracked = candidate
                        break
                elif empty is None:
                    # One made for a rewrite whose first write failed continues any
                    # list: only one that repeats no stored history is its.
                    empty = candidate
            else:
                tracked = empty or newest
            row = revisions[tracked.revision - 1]
            if (
                row["ended_at"] is not None
                and row["end_reason"] != "rewritten"
                and tracked.stored
                and _continues(turn.messages, tracked)
            ):
                # A turn continuing a session ended (finalized): Hermes resumed it,
                # reopening its own row; so is its copy, which the next end ends again.
                # (A list that does not continue it is a new conversation under the
                # id, the next revision: the ended one keeps its end.)
                self._reopen(store, revision_id(sid, tracked.revision))
        self._track(sid, tracked)
        return tracked

    @staticmethod
    def _reopen(store: SessionStore, revision: str) -> None:
        reopen = update(Session).where(Session.id == revision)
        store.write_transaction(
            lambda conn: conn.execute(reopen.values(ended_at=None, end_reason=None))
        )

    def _track(self, session_id: str, tracked: _Tracked) -> None:
        self._tracked[session_id] = tracked
        self._tracked.move_to_end(session_id)
        while len(self._tracked) > _TRACKED_MAX:
            self._tracked.popitem(last=False)

    def _create(self, store: SessionStore, turn: Turn, extra: dict[str, Any] | None = None) -> str:
        """Create the mirrored session from Hermes' row (and ``extra``); returns its source."""
        hermes = self._hermes_row(turn.session_id)
        fields = _text_fields(hermes)
        if extra:
            fields["extra"] = dict(extra)
        fields.setdefault("model", turn.model or None)
        source = _text(hermes.get("source")) or turn.platform or "cli"
        started_at = hermes.get("started_at")
        if isinstance(started_at, int | float) and not isinstance(started_at, bool):
            fields["started_at"] = float(started_at)
        parent = hermes.get("parent_session_id")
        if parent:
            # Hermes moved the conversation on to this session (compression, a branch):
            # no turn of the parent comes after to catch up its lists not written,
            # before its end.
            self._catch_up(parent)
            revisions = self._revisions(store, parent)
            if revisions:
                # The parent's newest revision is the conversation moved on from (an
                # older one was rewritten); each still open ends with Hermes' reason.
                fields["parent_session_id"] = revisions[-1]["id"]
                if hermes.get("parent_end_reason"):
                    _end_open(store, revisions, hermes["parent_end_reason"])
                    self._tracked.pop(parent, None)
            else:  # Hermes' parent was never mirrored: name it without a link
                fields["extra"] = {**fields.get("extra", {}), "hermes_parent_session_id": parent}
        store.ensure_session(turn.session_id, source, **fields)
        return source

    def _hermes_row(self, session_id: str) -> dict[str, Any]:
        row = _from_hermes(self._hermes_sessions, session_id, "row") or {}
        parent = row.get("parent_session_id")
        if parent:
            parent_row = _from_hermes(self._hermes_sessions, parent, "row") or {}
            row = {**row, "parent_end_reason": parent_row.get("end_reason")}
        return row

    def _revise(self, store: SessionStore, turn: Turn, tracked: _Tracked) -> _Tracked:
        """A new, empty revision of the session for ``turn``'s list, linked to ``tracked``'s."""
        sid = turn.session_id
        old = revision_id(sid, tracked.revision)
        at = first_difference(turn.messages, tracked.stored)
        revision = len(self._revisions(store, sid)) + 1
        new = revision_id(sid, revision)
        old_row = store.get_session(old) or {}
        store.ensure_session(
            new,
            tracked.source,
            parent_session_id=old,
            extra={"hermes_session_id": sid, "revision": revision, "diverged_at": at},
            **_text_fields(old_row),
        )
        with contextlib.suppress(SessionNotFoundError):
            if old_row.get("ended_at") is None:
                store.end_session(old, "rewritten")
        logger.warning(
            "hermes_orm mirror: session %r no longer continues its stored history (message %d "
            "differs: compression, an edit or a rewind); the stored history is kept as %r and "
            "the new one as %r",
            sid,
            at,
            old,
            new,
        )
        revised = _Tracked(revision, [], tracked.source)
        self._track(sid, revised)
        return revised

    def _catch_up_from_hermes(self, store: SessionStore, session_id: str) -> None:
        """Write what Hermes stored of the session past the mirrored history.

        A turn that failed (the model's API, past Hermes' retries) or was
        interrupted fires no hook, yet Hermes stores its messages (the user's,
        the tool calls made, their results): the session's next completed turn
        carries them, but none comes after its end. Only a conversation that
        continues the mirrored history is written (a session never mirrored
        is created): one that does not (Hermes' own write failed, or the mirror
        was written by another) is left alone, never made a revision.
        """
        stored = _from_hermes(self._hermes_conversation, session_id, "messages")
        if not stored:
            return
        turn = Turn(session_id, conversation(stored))
        tracked = self._tracked.get(session_id)
        if tracked is None or not _continues(turn.messages, tracked):
            tracked = self._resolve(store, turn)
        if not _continues(turn.messages, tracked):
            logger.info(
                "hermes_orm mirror: Hermes' stored conversation of session %r does not continue "
                "the mirrored one; what it holds past it is not mirrored",
                session_id,
            )
        elif len(turn.messages) > len(tracked.stored):
            self._flush_in(store, turn)

    def _end(self, session_id: str, reason: str) -> None:
        # No turn comes after the end to catch up: the lists not written are tried now.
        self._write(session_id, self._unwritten.pop(session_id, []))

        if session_id not in self._unwritten:  # (its lists written: the database took them)
            # On its own: a refusal (a message the store cannot hold) ends the session still.
            self._guarded(
                session_id,
                lambda store: self._catch_up_from_hermes(store, session_id),
                catches_up=False,
            )

        def work(store: SessionStore) -> None:
            self._tracked.pop(session_id, None)
            # Every revision still open: the live one, and any a list written late
            # (into the history it continues) left open; one rewritten keeps its reason.
            _end_open(store, self._revisions(store, session_id), reason)

        self._lost_ends.pop(session_id, None)  # (this end is the session's last)
        tracked, at = self._tracked.get(session_id), time.time()
        # Still failing, its error stays on record: the session ends without all of it.
        outcome = self._guarded(session_id, work, catches_up=False, todo=_END_LOST)
        if (
            outcome in ("busy", "down")
            and tracked is not None
            and session_id not in self._unwritten
        ):
            # (Its whole conversation written: the state to end is the one this process knows.)
            rows = len(tracked.stored if tracked.rows is None else tracked.rows)
            self._lost_ends[session_id] = _LostEnd(tracked.revision, rows, reason, at)
            while len(self._lost_ends) > _TRACKED_MAX:
                self._give_up_end(self._lost_ends.popitem(last=False)[0])
        elif outcome == "ran":
            if self._failing.get(session_id, {}).get("todo") in (_END_LOST, _END_GIVEN_UP):
                self._succeeded(session_id)  # (an earlier end's refusal: this end is written)
            if self._lost_ends:
                self._write_lost_ends()
        else:  # not to be tried again (refused otherwise, or no state known to end)
            self._give_up_end(session_id)


def _end_as_left(store: SessionStore, *, session_id: str, lost: _LostEnd, out: list[bool]) -> None:
    """End the session as ``lost`` says, if it is still as it was then; ``out`` gets whether."""
    revision = revision_id(session_id, lost.revision)
    if revision_row(store, session_id, lost.revision + 1) is not None:
        out.append(False)  # rewritten since, by a process that made the next revision
        return
    end = (
        update(Session)
        .where(
            Session.id == revision,
            Session.ended_at.is_(None),
            Session.flushed_idx == lost.rows,
        )
        .values(ended_at=lost.at, end_reason=lost.reason)
    )
    out.append(store.write_transaction(lambda conn: conn.execute(end).rowcount) == 1)


def _end_open(store: SessionStore, revisions: list[dict[str, Any]], reason: str) -> None:
    """End each of a session's stored ``revisions`` still open, with ``reason``."""
    for row in revisions:
        if row["ended_at"] is None:
            store.end_session(row["id"], reason)


def _from_hermes(read: Callable[[str], T | None] | None, session_id: str, what: str) -> T | None:
    """What ``read`` finds of the session in Hermes' own store (None: nothing, or no reader).

    Hermes' store is a nicety here, never a blocker: a failure to read it is None.
    """
    if read is None:
        return None
    try:
        return read(session_id)
    except Exception as exc:
        logger.debug("hermes_orm mirror: cannot read Hermes' %s of %r: %s", what, session_id, exc)
        return None


def _runs(jobs: list[Turn]) -> list[list[Turn]]:
    """``jobs`` (oldest first) cut into runs, each list of a run extending the one before."""
    runs: list[list[Turn]] = []
    for job in jobs:
        if runs and _extends(job.messages, runs[-1][-1].messages):
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs


def _extends(new: list[dict[str, Any]], old: list[dict[str, Any]]) -> bool:
    """Whether ``new`` begins with all of ``old`` (writing ``new`` writes ``old`` too)."""
    if len(new) < len(old):
        return False
    return shared_prefix(new, old) == len(old) or first_difference(new, old) < 0


def _continues(live: list[dict[str, Any]], tracked: _Tracked) -> bool:
    """Whether ``live`` repeats what ``tracked`` holds (the very copies, or the same messages)."""
    stored = tracked.stored
    same = shared_prefix(live, tracked.seen)
    return same >= len(stored) or first_difference(live[same:], stored[same:]) < 0


# -- store mode: Hermes writes into the store itself; the end of each turn repairs it --------

#: Seconds a turn waits in store mode for its flush: long enough for it to run to
#: its end (its attempts are bounded: a few seconds when the database is down), so
#: that what it stored is marked before Hermes writes again.
STORE_WAIT = 10.0
#: Seconds store mode's hook waits at most for an end-of-turn flush under way (its
#: attempts end well before: :data:`_RETRY`).
_REPAIR_MAX = 60.0
#: The key of a session's ``extra`` marking it as store mode's copy of a session
#: Hermes writes elsewhere (its TUI's): kept as the mirror keeps its sessions.
COPY_MARK = "hermes_orm_copy"
#: The mark Hermes stamps on a message dict once its own write loop stored it
#: (hermes-agent 0.19 ``run_agent._DB_PERSISTED_MARKER``); marked messages are
#: never written again.
PERSISTED_MARK = "_db_persisted"

_messages_table: Any = Message.__table__
_sessions_table: Any = Session.__table__
_ACTIVE_ROW = func.coalesce(_messages_table.c.active, True).is_(True)


def _text_of_parts(content: list[Any]) -> str | None:
    """A list of content parts as Hermes stores it: the text parts, an image as ``[screenshot]``."""
    texts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        elif isinstance(part, dict) and part.get("type") in {"image", "image_url", "input_image"}:
            texts.append("[screenshot]")
    return "\n".join(texts) if texts else None


def _replayed_differently(content: str) -> bool:
    """Whether Hermes' replay of ``content`` (its ``sanitize_context``) differs from the text."""
    try:
        from agent.memory_manager import sanitize_context
    except ImportError:  # without Hermes there is no replay to differ from
        return False
    return bool(sanitize_context(content).strip() != content.strip())


def _multimodal_summary(content: Any) -> str | None:
    """The text Hermes stores for a multimodal tool result; None for any other content."""
    try:
        from agent.tool_dispatch_helpers import (
            _is_multimodal_tool_result,
            _multimodal_text_summary,
        )
    except ImportError:
        return None
    return str(_multimodal_text_summary(content)) if _is_multimodal_tool_result(content) else None


def loop_content(content: Any) -> Any:
    """The content Hermes' write loop stores for a live message's ``content``.

    A multimodal tool result is its text summary, a list of content parts
    their text (an image ``[screenshot]``); text and anything else as it is.
    """
    if content is None or isinstance(content, str):
        return content
    summary = _multimodal_summary(content)
    if summary is not None:
        return summary
    return _text_of_parts(content) if isinstance(content, list) else content


def hermes_message(message: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The message Hermes' own write loop stores for a message of its live list.

    What hermes-agent 0.19's ``_flush_messages_to_session_db`` hands
    ``append_message``, stored as hermes_orm's ``SessionDB`` stores it: a
    multimodal tool result as its text summary, a list of content parts as
    their text, the reasoning fields of assistant messages only, ``api_content``
    when Hermes' replay would change the text, the message's own ``timestamp``
    (else ``now``); the row active, not compacted, not observed.
    """
    from hermes_orm.integrations.hermes._upkeep import _stamp, _stored_message

    role = message.get("role", "unknown")
    content = message.get("content")
    api_content = message.get("api_content")
    if not isinstance(api_content, str) or api_content == content:
        api_content = None
    if (
        api_content is None
        and role in ("user", "assistant")
        and isinstance(content, str)
        and content
        and _replayed_differently(content)
    ):
        api_content = content
    content = loop_content(content)
    tool_calls = message.get("tool_calls")
    written = {
        "role": role,
        "content": content,
        "tool_name": message.get("tool_name"),
        "tool_calls": tool_calls if isinstance(tool_calls, list) else None,
        "tool_call_id": message.get("tool_call_id"),
        "finish_reason": message.get("finish_reason"),
        "reasoning": message.get("reasoning"),
        "reasoning_content": message.get("reasoning_content"),
        "reasoning_details": message.get("reasoning_details"),
        "codex_reasoning_items": message.get("codex_reasoning_items"),
        "codex_message_items": message.get("codex_message_items"),
        "api_content": api_content,
    }
    return _stored_message(written, _stamp(message.get("timestamp"), now))


def _kept(history: Sequence[Any]) -> list[dict[str, Any]]:
    """The dicts of Hermes' live list that :func:`conversation` keeps, themselves (not copies)."""
    return [m for m in history if isinstance(m, dict) and not is_scaffolding(m)]


def _confirmed(turn: Turn) -> int:
    """How many of the turn's messages Hermes' write loop confirmed.

    Hermes marks each message it stores, or takes as stored (its history), in
    order, and stops at the first write that fails: the messages up to the last
    one marked are confirmed. 0 when none is marked (a Hermes that does not mark).
    """
    history, unmarked = turn.history or (), 0
    for at in range(min(turn.history_length, len(history)) - 1, -1, -1):
        message = history[at]
        if isinstance(message, dict) and not is_scaffolding(message):
            if message.get(PERSISTED_MARK):
                return max(len(turn.messages) - unmarked, 0)
            unmarked += 1
    return 0


def _missed_from(
    active: list[dict[str, Any]], written: list[dict[str, Any]], confirmed: int
) -> int | None:
    """Where, in ``written``, the messages Hermes' writes missed begin; None: unknown.

    ``written[:confirmed]`` Hermes confirmed (:func:`_confirmed`); the first of
    the rest is stored too when a row after the last confirmed one holds it (a
    write that committed, then raised). Rows that are no message of the
    conversation are passed over: another writer's (a delivery Hermes' gateway
    mirrors into the session, ``gateway/mirror.py``) and those Hermes' replay
    merged into one message (its alternation repair). None when Hermes
    confirmed nothing, or no row holds any of its last confirmed messages.
    """
    unconfirmed = written[confirmed:]
    if not confirmed or not unconfirmed:
        return confirmed or None
    # The anchor: the newest row holding a confirmed message as it is (one Hermes'
    # replay merged has no row of its own: the one before it is taken).
    for back in range(confirmed - 1, max(confirmed - _ANCHOR_BACK, -1), -1):
        anchor = next(
            (i for i in range(len(active) - 1, -1, -1) if same_turn(active[i], written[back])),
            None,
        )
        if anchor is not None:
            break
    else:
        return None
    if back == confirmed - 1 and same_turn(unconfirmed[0], written[back]):
        # The same message again (the user said "ok" twice): the newest row like it
        # may be the unconfirmed one, stored before its write raised.
        repeated = _repeat_stored(active[: anchor + 1], written[:confirmed])
        if repeated is not None:
            return confirmed + repeated
    # Hermes' write loop stops at the first write that raises, and its next flush
    # writes an unmarked message again: of the unconfirmed, only the first can be
    # stored (committed, then raised), and only after the anchor.
    return confirmed + any(same_turn(row, unconfirmed[0]) for row in active[anchor + 1 :])


def _repeat_stored(rows: list[dict[str, Any]], confirmed: list[dict[str, Any]]) -> bool | None:
    """Whether ``rows`` (up to the newest like the last confirmed message) hold one more.

    The confirmed messages end with a run of messages alike; going back from the
    newest row, the rows like them are counted up to the row of the message
    before that run: more than the run holds, and the newest is the first
    unconfirmed message, alike too. None when no row holds the message before
    the run (Hermes' replay merged it, say): unknown.
    """
    last = confirmed[-1]
    run = 1
    while run < len(confirmed) and same_turn(confirmed[-1 - run], last):
        run += 1
    before = confirmed[-1 - run] if run < len(confirmed) else None
    alike = 0
    for row in reversed(rows):
        if same_turn(row, last):
            alike += 1
        elif before is not None and same_turn(row, before):
            return alike > run
    return None if before is not None else alike > run


#: Seconds :meth:`StoreFlush.before_turn` tries the repairs again while the database
#: refuses them: as long as Hermes' own appends wait for it (``RetryPolicy.unavailable_for``).
CATCH_UP_PATIENCE = 90.0
#: Seconds between those tries.
_CATCH_UP_PAUSE = 0.5

#: How many confirmed messages :func:`_missed_from` looks back past for its anchor.
_ANCHOR_BACK = 8


class StoreFlush(Mirror):
    """Store mode's end of turn: what Hermes' own writes missed, stored exactly once.

    In store mode Hermes writes its sessions through hermes_orm's ``SessionDB``
    into this database itself, one ``append_message`` at the cursor at a time.
    Hermes' write loop gives up on the rest of a batch when one append fails,
    and the next turn takes the whole conversation as stored: the turn's last
    message, or every message of a batch from the failed one on, would be lost.
    At the end of every turn this flush compares the conversation with the
    session's live (active) rows and, when Hermes' rows are a prefix of it,
    stores the missing messages after them, as Hermes' write loop would have
    (:func:`hermes_message`), with one :meth:`SessionStore.flush` that checks the
    stored history under the session's lock: a row Hermes writes meanwhile makes
    it write nothing. It then stamps Hermes' own mark (``_db_persisted``) on the
    messages it stored, so Hermes' later flushes (at exit, say) skip them.

    Hermes' rows are the history of record. A conversation that does not
    continue them as they are (another writer appended a row: Hermes' gateway
    mirrors deliveries into a session from outside its turns; Hermes' replay
    merged rows into one message; Hermes rewrote them: compression, ``/undo``)
    is stored as Hermes' own marks say: what its write loop left unmarked after
    the last message it marked, less what its last rows hold already, goes
    after the rows (:func:`_missed_from`); without a mark it is left as Hermes
    stored it. No revision is made, and a session is never ended here (Hermes
    ends its own). Reading the rows happens only when the conversation is
    longer than the session's live rows, or Hermes left messages unmarked;
    otherwise a turn costs one count. The ``session_meta`` row Hermes' gateway
    opens a session with is no message of the conversation: neither counted
    nor compared.

    A session Hermes writes elsewhere (a SessionDB it opened before the plugin
    loaded: its TUI) is created here and is a copy, this flush's alone, marked
    so in its ``extra`` (:data:`COPY_MARK`) for every later process: each turn
    stores its conversation, one that no longer continues the copy goes on in
    a new revision (``ID#2``), as the mirror keeps them, and Hermes' marks on
    its messages are left alone (its own writes go elsewhere).
    """

    # Hermes keeps these sessions in this database alone: nothing else holds the repairs.
    _left = (
        "what Hermes' own writes missed is lost: kept nowhere else, and no later turn "
        "writes it (`hermes orm status` lists it)"
    )

    def __init__(self, url: str, *, status: StatusFile, wait: float = STORE_WAIT) -> None:
        super().__init__(url, status=status, wait=wait)
        # Hermes' side: per session, when Hermes last rewrote its history in the
        # store (see rewritten), the most recent last.
        self._rewrites: OrderedDict[str, int] = OrderedDict()
        self._rewrites_lock = threading.Lock()

    def _pending(self, session_id: str) -> bool:
        """Whether the session has turns not written yet, or a flush of one queued or running."""
        return session_id in self._unwritten or self._worker.holds(session_id, ("flush", "pend"))

    def before_turn(self, session_id: str) -> bool:
        """Before Hermes writes a turn (``pre_llm_call``): the failed repairs of earlier turns.

        Hermes takes the messages of its history as stored when its next turn
        begins, marking them without writing them: a message its write and the
        repair both missed would be lost, or stored after the new turn's. So
        those repairs go first, while the new turn's messages are not written
        yet; while the database is busy or out of reach, tried again for up to
        :data:`CATCH_UP_PATIENCE` seconds. True if nothing is left to write.

        A session with none, and no flush of its own queued or running (nor one
        taken back, on its way to those lists), costs nothing: the writer is not
        asked (the lists are the writer's; a membership test of its dict is one
        atomic step).
        """
        if not self._pending(session_id):
            return True
        # While the database refuses the repairs (locked, out of reach), they are
        # tried again, as long as Hermes' own appends would wait for it: the
        # turn's messages must not land before them.
        deadline = time.monotonic() + CATCH_UP_PATIENCE
        while True:
            busy = [False]

            def catch_up(busy: list[bool] = busy) -> None:
                busy[0] = self._catch_up(session_id)

            key = ("catch-up", session_id, next(self._lines))
            ran = self._waited(session_id, key, self._worker.submit(key, catch_up), None)
            if not self._pending(session_id):
                return True
            if not ran or not busy[0] or time.monotonic() >= deadline:
                return False
            time.sleep(_CATCH_UP_PAUSE)

    def before_rewrite(self, session_id: str) -> None:
        """Before Hermes rewrites the session's history in the store: its repairs first.

        The rewrite then applies to them as to Hermes' own rows (``/undo``
        takes back the turn's missed answer with the turn, a compression
        archives it). Lists still unwritten after are dropped once the rewrite
        is done (:meth:`rewritten`).
        """
        self.before_turn(session_id)

    def rewritten(self, session_id: str) -> None:
        """Hermes rewrote the session's history in the store (rewind, compression) or deleted it.

        The lists of its turns made before, not written yet (the database
        refused them before the rewrite), are of the history before that: what
        they hold past Hermes' rows is what the rewrite took away (the turn
        ``/undo`` took back) or wrote itself. None of them is written
        (:meth:`_flush_in` drops them).
        """
        with self._rewrites_lock:
            self._rewrites[session_id] = next(self._lines)
            self._rewrites.move_to_end(session_id)
            while len(self._rewrites) > _TRACKED_MAX:
                self._rewrites.popitem(last=False)

    def _waited(
        self, session_id: str, key: tuple[str, str, int], done: threading.Event, job: Turn | None
    ) -> bool:
        """Return once the write ran, or once it surely will not.

        Hermes writes again after the hook returns (its exit's flush writes what
        it left unmarked), so a flush still under way then could store a message
        Hermes stores too. One not started within ``wait`` (the writer busy with
        others) is taken back, a turn's kept for the session's next turn
        (:meth:`before_turn`); one started is waited for: its attempts are
        bounded (:data:`_RETRY`).
        """
        if done.wait(self.wait):
            return True
        if self._worker.withdraw(key, done):
            if job is not None:  # kept, as a failed write is, for the next turn
                pend = ("pend", session_id, next(self._lines))
                self._worker.submit(pend, lambda: self._keep_turn(session_id, job))
            return False
        if not done.wait(_REPAIR_MAX):
            logger.warning(
                "hermes_orm store: the end-of-turn flush of session %r still runs after %.0f s",
                session_id,
                _REPAIR_MAX,
            )
        return False

    def _keep_turn(self, session_id: str, job: Turn) -> None:
        self._keep(session_id, _runs([*self._unwritten.pop(session_id, []), job]))

    def finalize(self, session_id: str, reason: str) -> bool:
        """Forget the session's last turn; Hermes ends the session in the store itself.

        Its turns whose repair failed are tried once more now, then given up: no
        turn of this process comes to write them where they belong, and kept to
        the exit they would land after the turns of another process that
        resumed the session meanwhile.
        """
        with self._snapshots_lock:
            self._snapshots.pop(session_id, None)
        end = ("end", session_id, next(self._lines))
        # Waited for as a turn's repair is: Hermes writes what it has not marked once
        # the hook returns (``/new``), and must find the marks of what this stored.
        return self._waited(
            session_id,
            end,
            self._worker.submit(end, functools.partial(self._last_try, session_id)),
            None,
        )

    def _last_try(self, session_id: str) -> None:
        self._catch_up(session_id)
        left = self._unwritten.pop(session_id, None)
        if left:
            logger.warning(
                "hermes_orm store: session %r ended with the messages Hermes' own writes "
                "missed in its last turn(s) still not stored; they are given up: %s",
                session_id,
                self._left,
            )
            self._given_up(session_id, "at the session's end")

    def _given_up(self, session_id: str, when: str) -> None:
        """Record on the status that the session's repairs are dropped ``when``: lost.

        No later turn writes them (Hermes resumes the session from the rows it
        finds, without them), so the session's failure on record, which says
        the next turn catches up, goes, and the status keeps the loss instead,
        until ``hermes orm status --clear``.
        """
        error = self._failing.get(session_id, {})
        self._forget_failure(session_id)
        entry = {
            "at": time.time(),
            "url": safe_url(self.url),
            "session_id": session_id,
            "message": error.get("message"),
            "what": (
                f"the messages Hermes' own writes missed were given up {when}: no later turn "
                "writes them (only a session Hermes keeps in its state.db, as its terminal UI "
                "does, still has them there)"
            ),
        }
        self.status.add("given_up", entry, keep=_GIVEN_UP_KEPT)

    @staticmethod
    def _live_rows(store: SessionStore, session_id: str) -> tuple[int | None, bool]:
        """How many live rows the session has (None: no such session), and if it is a copy.

        Live rows are the active ones that are messages (not the ``session_meta``
        row Hermes' gateway opens a session with). A copy of a session Hermes
        writes elsewhere is marked so in its ``extra`` (see :meth:`_flush_in`).
        """
        c = _messages_table.c
        session = select(_sessions_table.c.extra).where(_sessions_table.c.id == session_id)
        count = (
            select(func.count())
            .select_from(_messages_table)
            .where(c.session_id == session_id, _ACTIVE_ROW, c.role != "session_meta")
        )

        def work(conn: Any) -> tuple[int | None, bool]:
            row = conn.execute(session).first()
            if row is None:
                return None, False
            copy = isinstance(row.extra, dict) and row.extra.get(COPY_MARK) is True
            return int(conn.execute(count).scalar_one()), copy

        return store.read_transaction(work)

    def _flush_in(self, store: SessionStore, turn: Turn) -> None:
        sid, live = turn.session_id, turn.messages
        with self._rewrites_lock:
            rewritten = self._rewrites.get(sid, 0)
        if turn.made < rewritten:
            logger.info(
                "hermes_orm store: session %r: a conversation from before Hermes rewrote "
                "the session is not written",
                sid,
            )
            return
        count, copy = self._live_rows(store, sid)
        if count is None:
            self._create(store, turn, {COPY_MARK: True})
            logger.warning(
                "hermes_orm store: session %r was not in %s: Hermes writes it elsewhere (a "
                "session database opened before the plugin loaded) or could not create it; "
                "its conversation is stored here at the end of each turn",
                sid,
                safe_url(self.url),
            )
            count, copy = 0, True
        # A copy (Hermes writes the session elsewhere) is this flush's alone: a
        # rewritten conversation goes on in a new revision, as the mirror keeps one.
        revision = len(self._revisions(store, sid)) if copy else 1
        confirmed = _confirmed(turn)
        if not copy and len(live) <= count and confirmed in (0, len(live)):
            # Hermes stored as many messages as the conversation has, or more, and it
            # confirmed them all (rows another writer appended count too) or marks none
            return
        target = revision_id(sid, revision)
        rows = store.primary_messages(target)
        active = [row for row in conversation_rows(rows) if row.get("active") is not False]
        now = time.time()  # rising by a microsecond per message, as Hermes' rewrites stamp them
        written = [hermes_message(m, now + i * 1e-6) for i, m in enumerate(live)]
        at = first_difference(written, active)
        start: int | None = len(active)
        if at >= 0 and copy:
            source = str((store.get_session(sid) or {}).get("source") or "cli")
            current = _Tracked(revision, active, source)
            revised_to = self._revise(store, dataclasses.replace(turn, messages=written), current)
            target, rows, start = revision_id(sid, revised_to.revision), [], 0
        elif at >= 0:
            start = _missed_from(active, written, confirmed)
        if start is None:
            logger.debug(
                "hermes_orm store: session %r differs from its stored rows at message %d; "
                "left as Hermes stored it",
                sid,
                at,
            )
            return
        if len(written) > start:
            store.flush(target, rows + written[start:])
        if copy:
            return  # Hermes' own writes go elsewhere: its marks are its own
        # Marked from the first message Hermes did not confirm: those the rows held
        # already too, or its next flush (at /new, at exit) would write them again.
        marked_from = min(confirmed, start) if confirmed else start
        if turn.history is not None and marked_from < len(live):
            for message in _kept(turn.history)[marked_from : len(live)]:
                message[PERSISTED_MARK] = True
        if len(written) <= start:
            return
        logger.warning(
            "hermes_orm store: session %r: stored %d message(s) Hermes' own writes missed "
            "(messages %d to %d)",
            sid,
            len(live) - start,
            start,
            len(live) - 1,
        )
