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
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import operator
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from hermes_orm import migrations
from hermes_orm._dialects import RetryPolicy, create_store_engine, redact, safe_url
from hermes_orm.errors import (
    HermesOrmError,
    HistoryDivergedError,
    SchemaOutOfDateError,
    SchemaTooNewError,
    SessionNotFoundError,
)
from hermes_orm.store import SessionStore

logger = logging.getLogger(__name__)

#: Seconds a turn waits for its write before the agent goes on (the write goes on).
DEFAULT_WAIT = 1.0
#: Seconds the process waits at exit for writes still queued.
EXIT_WAIT = 5.0
#: Seconds one write attempt waits for a lock, and the retries after it: a locked
#: database gives up after a few seconds and the next turn tries again.
_LOCK_TIMEOUT = 1.0
_RETRY = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.5)
#: Sessions whose stored history the mirror keeps in memory (the most recent).
_TRACKED_MAX = 1000
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
    """``message`` without Hermes' internal ``_``-prefixed keys (a new dict)."""
    return {k: v for k, v in message.items() if not (type(k) is str and k[:1] == "_")}


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
    content equals a missing one, as Hermes' ``state.db`` round-trips them.
    """
    return (
        a.get("role") == b.get("role")
        and (a.get("content") or None) == (b.get("content") or None)
        and (a.get("tool_call_id") or None) == (b.get("tool_call_id") or None)
        and _calls(a) == _calls(b)
    )


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
    return {name: _text(row.get(name)) for name in _SESSION_FIELDS if _text(row.get(name))}


def shared_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items of ``a`` and ``b`` are the very same objects (C-speed loop)."""
    same = list(map(operator.is_, a, b))
    return same.index(False) if False in same else len(same)


def revision_id(session_id: str, revision: int) -> str:
    """The mirrored session holding revision ``revision`` (1 is the session itself)."""
    return session_id if revision == 1 else f"{session_id}{REVISION_MARK}{revision}"


@dataclass
class _Tracked:
    """What the writer knows of one Hermes session.

    ``stored`` is what its current revision holds, as passed to (or read from)
    the store; ``seen`` is the last snapshot written, whose leading messages are
    those of ``stored`` by content: a later snapshot sharing them (the very same
    objects) needs no comparison.
    """

    revision: int
    stored: list[dict[str, Any]]
    source: str
    seen: list[dict[str, Any]] = field(default_factory=list)


_CONTENT = itertools.repeat("content")
_TOOL_CALLS_KEY = itertools.repeat("tool_calls")


@dataclass
class _Snapshot:
    """Hermes' list as the last turn of a session saw it, and the cleaned copies made of it.

    The next turn cleans only what is new or changed: a message that is the same
    dict, holding the same content and tool calls objects, keeps its copy.
    ``counts[i]`` is how many copies ``history[:i]`` gave (scaffolding gives none).
    """

    history: list[Any]
    contents: list[Any]
    calls: list[Any]
    cleaned: list[dict[str, Any]]
    counts: list[int]

    @classmethod
    def of(cls, history: list[Any], previous: _Snapshot | None) -> _Snapshot:
        keep = 0
        if previous is not None:
            keep = shared_prefix(history, previous.history)
            if keep:
                head = history[:keep]
                keep = min(
                    keep,
                    shared_prefix(list(map(_get, head, _CONTENT)), previous.contents),
                    shared_prefix(list(map(_get, head, _TOOL_CALLS_KEY)), previous.calls),
                )
        new = history[keep:]
        fresh = [m if isinstance(m, dict) else {} for m in new]
        copies = conversation(new)
        if previous is None or keep == 0:
            counts, cleaned = [0], copies
            contents: list[Any] = []
            calls: list[Any] = []
        else:
            counts = previous.counts[: keep + 1]
            cleaned = previous.cleaned[: counts[-1]] + copies
            contents, calls = previous.contents[:keep], previous.calls[:keep]
        total = counts[-1]
        for message in new:
            total += isinstance(message, dict) and not is_scaffolding(message)
            counts.append(total)
        contents += [m.get("content") for m in fresh]
        calls += [m.get("tool_calls") for m in fresh]
        return cls(list(history), contents, calls, cleaned, counts)


def _get(message: Any, key: str) -> Any:
    return message.get(key) if isinstance(message, dict) else None


@dataclass(frozen=True)
class Turn:
    """One completed turn as the hook saw it: the conversation, cleaned, at that moment."""

    session_id: str
    messages: list[dict[str, Any]]
    model: str | None = None
    platform: str | None = None


@dataclass
class _Job:
    run: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)


class _Worker:
    """One daemon thread running queued writes in order; a newer write replaces its queued twin.

    The cursor makes the newest snapshot of a conversation enough: it carries
    whatever an older, not yet written one held.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: OrderedDict[tuple[str, str], _Job] = OrderedDict()
        self._busy = False
        self._thread: threading.Thread | None = None

    def submit(self, key: tuple[str, str], run: Callable[[], None]) -> threading.Event:
        with self._cond:
            queued = self._queue.get(key)
            # Whoever waits for the replaced write is released by this one.
            job = _Job(run, queued.done if queued is not None else threading.Event())
            self._queue[key] = job
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="hermes-orm-mirror", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        return job.done

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
                _, job = self._queue.popitem(last=False)
                self._busy = True
            try:
                job.run()
            except Exception:  # the thread must outlive any failure
                logger.exception("hermes_orm mirror: unexpected error")
            finally:
                job.done.set()
                with self._cond:
                    self._busy = False
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
        data = self.read()
        for key, value in values.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=2)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("hermes_orm mirror: cannot write %s: %s", self.path, exc)


#: Reads Hermes' own row of a session (a dict of its columns), or None.
HermesSessions = Callable[[str], dict[str, Any] | None]


class Mirror:
    """Flushes Hermes' conversations into a hermes_orm database, one background writer.

    Args:
        url: The database URL.
        status: Where failures are recorded for ``hermes orm status``.
        hermes_sessions: Reads Hermes' own session row (source, user, model,
            parent); without it, sessions get the hook's platform and model.
        wait: Seconds a turn waits for its write.
    """

    def __init__(
        self,
        url: str,
        *,
        status: StatusFile,
        hermes_sessions: HermesSessions | None = None,
        wait: float = DEFAULT_WAIT,
    ) -> None:
        self.url = url
        self.wait = wait
        self.status = status
        self._hermes_sessions = hermes_sessions
        self._store: SessionStore | None = None
        self._tracked: OrderedDict[str, _Tracked] = OrderedDict()
        self._snapshots: OrderedDict[str, _Snapshot] = OrderedDict()
        self._snapshots_lock = threading.Lock()
        self._worker = _Worker()
        self._failing: str | None = None

    # -- hooks (Hermes' thread): snapshot, queue, wait a bounded time -------------------

    def snapshot(self, session_id: str, history: list[Any]) -> list[dict[str, Any]]:
        """Hermes' live list as the mirror stores it (:func:`conversation`), at this moment.

        Messages unchanged since the session's previous snapshot keep their
        copies, so a turn costs about the new messages, not the whole list.
        """
        with self._snapshots_lock:
            previous = self._snapshots.pop(session_id, None)
            snap = _Snapshot.of(history, previous)
            self._snapshots[session_id] = snap
            while len(self._snapshots) > _TRACKED_MAX:
                self._snapshots.popitem(last=False)
        return snap.cleaned

    def turn(self, turn: Turn) -> bool:
        """Queue ``turn``'s flush and wait for it at most ``wait`` seconds; True if it ran."""
        done = self._worker.submit(("flush", turn.session_id), lambda: self._flush(turn))
        return done.wait(self.wait)

    def finalize(self, session_id: str, reason: str) -> bool:
        """Queue the end of a session (after its queued flush); True if it ran in ``wait``."""
        done = self._worker.submit(("end", session_id), lambda: self._end(session_id, reason))
        return done.wait(self.wait)

    def close(self, timeout: float = EXIT_WAIT) -> bool:
        """Wait for queued writes (at most ``timeout`` seconds), then close the store."""
        drained = self._worker.drain(timeout)
        if not drained:
            logger.warning(
                "hermes_orm mirror: writes still queued at exit; the next turn of those "
                "sessions (or `hermes-orm import`) catches up"
            )
        store, self._store = self._store, None
        if store is not None and drained:
            store.close()
        return drained

    # -- the writer thread ---------------------------------------------------------------

    def _open(self) -> SessionStore:
        if self._store is None:
            engine_kwargs: dict[str, Any] = {}
            if make_url(self.url).get_backend_name() == "postgresql":
                # A server that does not answer fails the attempt, not the agent.
                engine_kwargs["connect_args"] = {"connect_timeout": 2}
            engine = create_store_engine(self.url, lock_timeout=_LOCK_TIMEOUT, **engine_kwargs)
            try:
                if migrations.current(engine) is None:
                    # A database that has no hermes_orm schema yet gets it; one
                    # behind the shipped head is left to its operator (the store
                    # refuses it, naming the command).
                    migrations.upgrade(engine)
            except BaseException:
                engine.dispose()
                raise
            self._store = SessionStore(engine, retry=_RETRY, lock_timeout=_LOCK_TIMEOUT)
        return self._store

    def _guarded(self, session_id: str, work: Callable[[SessionStore], None]) -> None:
        try:
            work(self._open())
        except (SchemaOutOfDateError, SchemaTooNewError) as exc:
            self._failed(session_id, exc, f"{exc}")
        except HermesOrmError as exc:
            self._failed(session_id, exc, "the next completed turn catches up")
        except Exception as exc:  # driver, network, disk: the next turn retries
            self._failed(
                session_id, exc, "the database is unreachable; the next completed turn catches up"
            )
        else:
            if self._failing is not None:
                logger.warning(
                    "hermes_orm mirror: %s is reachable again; the mirror has caught up",
                    safe_url(self.url),
                )
                self._failing = None
                self.status.write(error=None)

    def _failed(self, session_id: str, exc: BaseException, todo: str) -> None:
        message = redact(f"{type(exc).__name__}: {exc}")
        if message != self._failing:  # one line per new failure, not one per turn
            logger.warning(
                "hermes_orm mirror: session %s not written to %s (%s); %s",
                session_id,
                safe_url(self.url),
                message,
                todo,
            )
        self._failing = message
        self._tracked.pop(session_id, None)  # read again from the database next time
        self.status.write(
            error={"at": time.time(), "session_id": session_id, "message": message, "todo": todo}
        )

    def _flush(self, turn: Turn) -> None:
        self._guarded(turn.session_id, lambda store: self._flush_in(store, turn))

    def _flush_in(self, store: SessionStore, turn: Turn) -> None:
        tracked = self._tracked.get(turn.session_id)
        if tracked is None:
            tracked = self._resolve(store, turn)
        else:
            self._tracked.move_to_end(turn.session_id)
        live, stored = turn.messages, tracked.stored
        same = shared_prefix(live, tracked.seen)
        if same < len(stored) and first_difference(live[same:], stored[same:]) >= 0:
            self._revise(store, turn, tracked)
            return
        tracked.seen = live
        if len(live) <= len(stored):
            return
        messages = stored + live[len(stored) :]
        try:
            store.flush(revision_id(turn.session_id, tracked.revision), messages)
        except HistoryDivergedError:
            # Another writer stored something else meanwhile: decide on what is stored.
            self._tracked.pop(turn.session_id, None)
            tracked = self._resolve(store, turn)
            if first_difference(live, tracked.stored) >= 0:
                self._revise(store, turn, tracked)
                return
            messages = tracked.stored + live[len(tracked.stored) :]
            store.flush(revision_id(turn.session_id, tracked.revision), messages)
            tracked.seen = live
        tracked.stored = messages

    def _resolve(self, store: SessionStore, turn: Turn) -> _Tracked:
        """The session's revision the live list continues, read from the database.

        A session seen for the first time is created, with Hermes' own fields.
        """
        sid = turn.session_id
        revisions: list[dict[str, Any]] = []
        while (row := store.get_session(revision_id(sid, len(revisions) + 1))) is not None:
            revisions.append(row)
        if not revisions:
            source = self._create(store, turn)
            tracked = _Tracked(1, [], source)
        else:
            source = revisions[0]["source"]
            tracked = _Tracked(len(revisions), [], source)
            for revision in range(len(revisions), 0, -1):
                stored = store.get_messages(revision_id(sid, revision))
                if first_difference(turn.messages, stored) < 0:
                    tracked = _Tracked(revision, stored, source)
                    break
            else:  # continues none: the next turn's check makes a new revision
                tracked.stored = store.get_messages(revision_id(sid, len(revisions)))
        self._track(sid, tracked)
        return tracked

    def _track(self, session_id: str, tracked: _Tracked) -> None:
        self._tracked[session_id] = tracked
        self._tracked.move_to_end(session_id)
        while len(self._tracked) > _TRACKED_MAX:
            self._tracked.popitem(last=False)

    def _create(self, store: SessionStore, turn: Turn) -> str:
        """Create the mirrored session from Hermes' row; returns its source."""
        hermes = self._hermes_row(turn.session_id)
        fields = _text_fields(hermes)
        fields.setdefault("model", turn.model or None)
        source = _text(hermes.get("source")) or turn.platform or "cli"
        started_at = hermes.get("started_at")
        if isinstance(started_at, int | float) and not isinstance(started_at, bool):
            fields["started_at"] = float(started_at)
        parent = hermes.get("parent_session_id")
        if parent:
            parent_row = store.get_session(parent)
            if parent_row is not None:
                fields["parent_session_id"] = parent
                if parent_row["ended_at"] is None and hermes.get("parent_end_reason"):
                    store.end_session(parent, hermes["parent_end_reason"])
            else:  # Hermes' parent was never mirrored: name it without a link
                fields["extra"] = {"hermes_parent_session_id": parent}
        store.ensure_session(turn.session_id, source, **fields)
        return str(source)

    def _hermes_row(self, session_id: str) -> dict[str, Any]:
        if self._hermes_sessions is None:
            return {}
        try:
            row = self._hermes_sessions(session_id) or {}
            parent = row.get("parent_session_id")
            if parent:
                parent_row = self._hermes_sessions(parent) or {}
                row = {**row, "parent_end_reason": parent_row.get("end_reason")}
            return row
        except Exception as exc:  # Hermes' own store is a nicety here, never a blocker
            logger.debug("hermes_orm mirror: cannot read Hermes' row of %s: %s", session_id, exc)
            return {}

    def _revise(self, store: SessionStore, turn: Turn, tracked: _Tracked) -> None:
        """Keep ``turn``'s list as a new revision of the session, linked to the one it replaces."""
        sid = turn.session_id
        old = revision_id(sid, tracked.revision)
        at = first_difference(turn.messages, tracked.stored)
        revision = tracked.revision + 1
        while store.get_session(revision_id(sid, revision)) is not None:
            revision += 1  # another process made one meanwhile
        new = revision_id(sid, revision)
        old_row = store.get_session(old) or {}
        fields = _text_fields(old_row)
        store.ensure_session(
            new,
            tracked.source,
            parent_session_id=old,
            extra={"hermes_session_id": sid, "revision": revision, "diverged_at": at},
            **fields,
        )
        store.flush(new, turn.messages)
        with contextlib.suppress(SessionNotFoundError):
            if old_row.get("ended_at") is None:
                store.end_session(old, "rewritten")
        logger.warning(
            "hermes_orm mirror: session %s no longer continues its stored history (message %d "
            "differs: compression, an edit or a rewind); the stored history is kept as %s and "
            "the new one as %s",
            sid,
            at,
            old,
            new,
        )
        self._track(sid, _Tracked(revision, turn.messages, tracked.source, turn.messages))

    def _end(self, session_id: str, reason: str) -> None:
        def work(store: SessionStore) -> None:
            tracked = self._tracked.get(session_id)
            revision = tracked.revision if tracked is not None else 1
            if tracked is None:
                while store.get_session(revision_id(session_id, revision + 1)) is not None:
                    revision += 1
            with contextlib.suppress(SessionNotFoundError):  # never mirrored: nothing to end
                store.end_session(revision_id(session_id, revision), reason)

        self._guarded(session_id, work)
