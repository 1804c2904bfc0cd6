"""A writer process: ``python -m reliability._child MODE JSON``.

It flushes deterministic conversations (see :class:`reliability._common.Conversation`)
and tells its parent what happened, one line each on stdout, each written with
one ``write`` the moment it is known:

- ``F <session> <length>``: a flush of the first ``length`` messages begins;
- ``A <session> <cursor> <written> <µs>``: that flush returned (acknowledged
  ``cursor``) after that many microseconds;
- ``E [session, kind, detail]`` (JSON): it raised (``kind``: the error's type,
  after ``call: `` when it is no ``HermesOrmError``; ``detail``: its message);
- ``S <json>``: the writer's summary, when it ends on its own.

Modes: ``kill`` (flushes until killed), ``writer`` (contention and lost
connections: flushes until a deadline or a stop file), ``appender`` (lost
connections: appends to a session of its own until a stop file), ``disk`` (one
full-disk episode: a filled tmpfs, or a file size limit).
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hermes_orm import (
    DatabaseBusyError,
    DatabaseUnavailableError,
    FlushResult,
    HermesOrmError,
    RetryPolicy,
    SessionStore,
)
from reliability._common import Conversation, session_id


def emit(line: str) -> None:
    """Tell the parent ``line`` (one write: a kill never leaves half a line but at the end)."""
    os.write(1, f"{line}\n".encode())


@dataclass
class WriterStats:
    """What a writer counts; its summary line is this as JSON."""

    flushes: int = 0
    written: int = 0
    acked: dict[str, int] = field(default_factory=dict)
    typed: Counter[str] = field(default_factory=Counter)
    untyped: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def flushed(self, sid: str, result: FlushResult, seconds: float = 0.0) -> None:
        """Count a flush that returned; tell the parent (with how long it took, in µs)."""
        self.flushes += 1
        self.written += result.written
        self.acked[sid] = max(self.acked.get(sid, 0), result.cursor)
        emit(f"A {sid} {result.cursor} {result.written} {round(seconds * 1e6)}")

    def failed(self, sid: str, call: str, exc: Exception) -> str:
        """Count ``exc`` (typed or not); returns its kind."""
        typed = isinstance(exc, HermesOrmError)
        kind = type(exc).__name__ if typed else f"{call}: {type(exc).__name__}"
        (self.typed if typed else self.untyped)[kind] += 1
        cause = exc.__cause__
        detail = f"{type(exc).__name__}: {exc}"
        if cause is not None:
            detail += f" (cause: {type(cause).__name__}: {cause})"
        self.samples.setdefault(kind, detail[:500])
        emit("E " + json.dumps([sid, kind, detail[:500]]))
        return kind

    def summary(self) -> None:
        emit(
            "S "
            + json.dumps(
                {
                    "flushes": self.flushes,
                    "written": self.written,
                    "acked": self.acked,
                    "typed": self.typed,
                    "untyped": self.untyped,
                    "samples": self.samples,
                    "extra": self.extra,
                }
            )
        )


class Sessions:
    """A writer's sessions: one per slot, moving to the slot's next generation when full."""

    def __init__(self, store: SessionStore, slots: int) -> None:
        self.store = store
        self.generation = [0] * slots
        self.conversations: dict[str, Conversation] = {}

    def sid(self, slot: int) -> str:
        return session_id(slot, self.generation[slot])

    def conversation(self, sid: str) -> Conversation:
        found = self.conversations.get(sid)
        if found is None:
            found = self.conversations[sid] = Conversation(int(sid[1:]))
        return found

    def next_generation(self, slot: int) -> str:
        """Move the slot to a new session (created here unless another writer did)."""
        self.conversations.pop(self.sid(slot), None)
        self.generation[slot] += 1
        sid = self.sid(slot)
        self.store.ensure_session(sid, source="reliability", started_at=1_760_000_000.0)
        return sid


def kill_writer(args: dict[str, Any]) -> None:
    """Flush a turn at a time, round-robin over the sessions, until killed.

    Nothing is trusted from a previous life: each session's cursor is read from
    the database, and every flush is given the whole conversation up to the
    end of the next turn.
    """
    store = SessionStore(args["url"])
    rng = random.Random(args["seed"])
    sessions = Sessions(store, args["slots"])
    cap = args["cap"]
    targets: dict[int, int] = {}
    for slot in range(args["slots"]):
        while True:
            stored = store.get_session(sessions.sid(slot))
            if stored is None:
                store.ensure_session(sessions.sid(slot), source="reliability")
                stored = {"flushed_idx": 0}
            if stored["flushed_idx"] < cap:
                break
            sessions.generation[slot] += 1
        conversation = sessions.conversation(sessions.sid(slot))
        targets[slot] = conversation.next_end(stored["flushed_idx"])
    stats = WriterStats()
    slots = list(targets)
    while True:
        rng.shuffle(slots)
        for slot in slots:
            sid = sessions.sid(slot)
            conversation = sessions.conversation(sid)
            messages = conversation.messages(targets[slot])
            emit(f"F {sid} {targets[slot]}")
            began = time.perf_counter()
            try:
                result = store.flush(sid, messages)
            except Exception as exc:  # counted by the parent from the E line
                stats.failed(sid, "flush", exc)
                time.sleep(0.05)
                continue
            stats.flushed(sid, result, time.perf_counter() - began)
            if result.cursor >= cap:
                sid = sessions.next_generation(slot)
                result = FlushResult(0, 0)
            targets[slot] = sessions.conversation(sid).next_end(result.cursor)


def writer(args: dict[str, Any]) -> None:
    """Flush the shared sessions at this writer's own pace until the deadline.

    Each writer keeps its own count of turns per session, growing it with
    probability ``grow`` at each flush; with probability ``lag`` it flushes a
    list a few turns short (a lagging writer: it must write nothing new).
    With ``recover``, a flush that raised ``DatabaseUnavailableError`` or
    ``DatabaseBusyError`` is tried again with the same list after a pause.
    """
    retry = RetryPolicy(**args["retry"]) if args.get("retry") else None
    store = SessionStore(args["url"], retry=retry)
    rng = random.Random(args["seed"])
    slots = args["slots"]
    sessions = Sessions(store, slots)
    turns = [0] * slots
    stats = WriterStats()
    stop = Path(args["stop_file"]) if args.get("stop_file") else None
    transient = (DatabaseUnavailableError, DatabaseBusyError)

    # A writer slow to start (imports, its first connection, on a loaded machine) past
    # the others' deadline still flushes for a second: a run always has flushes to check.
    until = args["until"]

    def stopping() -> bool:
        return time.time() >= until or (stop is not None and stop.exists())

    def call(sid: str, name: str, what: Any) -> Any:
        """Run ``what()``; on a transient error, again if recovering. None: it failed."""
        while True:
            try:
                return what()
            except transient as exc:
                stats.failed(sid, name, exc)
                if not args["recover"] or stopping():
                    return None
                time.sleep(rng.uniform(0.02, 0.1))
            except Exception as exc:
                stats.failed(sid, name, exc)
                return None

    time.sleep(max(0.0, args["start_at"] - time.time()))
    until = max(until, time.time() + 1.0)
    while not stopping():
        slot = rng.randrange(slots)
        sid = sessions.sid(slot)
        conversation = sessions.conversation(sid)
        if rng.random() < args["grow"]:
            turns[slot] = min(turns[slot] + 1, args["cap_turns"])
        turn = turns[slot]
        if rng.random() < args["lag"]:
            turn = max(0, turn - rng.randint(1, 4))
        messages = conversation.messages(conversation.end(turn))
        emit(f"F {sid} {len(messages)}")
        result = call(sid, "flush", lambda: store.flush(sid, messages))  # noqa: B023
        if result is not None:
            stats.flushed(sid, result)
        if turns[slot] >= args["cap_turns"]:
            turns[slot] = 0
            call(sid, "ensure_session", lambda: sessions.next_generation(slot))  # noqa: B023
        if args["pace"]:
            time.sleep(rng.uniform(0, 2 * args["pace"]))
    store.close()
    stats.summary()


def appender(args: dict[str, Any]) -> None:
    """Append the next message of its own session, one at a time, until the stop file appears.

    After ``DatabaseUnavailableError`` or ``DatabaseBusyError`` the append
    may or may not have been stored (its commit's answer may be what was
    lost): the writer waits a little, reads the session's cursor, and goes on
    from there. A store that ran a committed append again would store the
    message twice.
    """
    retry = RetryPolicy(**args["retry"]) if args.get("retry") else None
    store = SessionStore(args["url"], retry=retry)
    sid = args["session"]
    conversation = Conversation(int(sid[1:]))
    stop = Path(args["stop_file"])
    stats = WriterStats()
    stats.extra["acknowledgements lost"] = 0
    transient = (DatabaseUnavailableError, DatabaseBusyError)
    time.sleep(max(0.0, args["start_at"] - time.time()))

    def stored() -> int:
        while True:
            try:
                session = store.get_session(sid)
                assert session is not None, "the parent creates the session"
                return int(session["flushed_idx"])
            except transient as exc:
                stats.failed(sid, "get_session", exc)
                time.sleep(0.05)

    n = stored()
    while not stop.exists():
        message = conversation.messages(n + 1)[n]
        emit(f"F {sid} {n + 1}")
        try:
            idx = store.append(sid, message)
        except transient as exc:
            stats.failed(sid, "append", exc)
            time.sleep(0.05)
            now = stored()
            stats.extra["acknowledgements lost"] += now > n
            n = now
            continue
        except Exception as exc:
            stats.failed(sid, "append", exc)
            break
        stats.flushed(sid, FlushResult(1, idx + 1))
        n = idx + 1
    store.close()
    stats.summary()


def disk_writer(args: dict[str, Any]) -> None:
    """One full-disk episode: flush until writes fail, then free space and flush again.

    ``method`` is how the disk fills up, a real I/O failure either way:

    - ``enospc``: the database is on a small file system (a tmpfs) and a
      ballast file takes all its free space but ``margin`` bytes or fewer; a
      write past that fails with ``ENOSPC``, which SQLite reports as
      ``SQLITE_FULL`` ("database or disk is full"). Freeing space deletes the
      ballast;
    - ``rlimit``: the file size limit (``RLIMIT_FSIZE``, ``SIGXFSZ`` ignored)
      is set up to ``margin`` bytes past the database file's size; a write
      past it fails with ``EFBIG`` (SQLite: an I/O error). Needs no privilege.
      Freeing space raises the limit again.

    Before it, the WAL is checkpointed and truncated, so the next writes that
    grow either file fail. The writer ends without closing its store, leaving
    its WAL behind for the next process to open.
    """
    path = Path(args["path"])
    store = SessionStore(f"sqlite:///{path}")
    rng = random.Random(args["seed"])
    slots = args["slots"]
    sessions = Sessions(store, slots)
    stats = WriterStats()
    targets = {}
    for slot in range(slots):
        stored = store.get_session(sessions.sid(slot))
        assert stored is not None, "the parent creates the sessions"
        targets[slot] = sessions.conversation(sessions.sid(slot)).next_end(stored["flushed_idx"])
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw.close()
    margin = rng.randint(0, args["margin"])
    ballast = path.with_name("ballast")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if args["method"] == "enospc":
        free = os.statvfs(path.parent)
        with ballast.open("wb") as file:
            os.posix_fallocate(file.fileno(), 0, max(1, free.f_bavail * free.f_frsize - margin))
    else:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + margin, hard))
    full = True

    def flush(slot: int) -> bool:
        sid = sessions.sid(slot)
        emit(f"F {sid} {targets[slot]}")
        try:
            result = store.flush(sid, sessions.conversation(sid).messages(targets[slot]))
        except Exception as exc:
            kind = stats.failed(sid, "flush", exc)
            cause = getattr(exc.__cause__, "orig", exc.__cause__)
            name = getattr(cause, "sqlite_errorname", type(cause).__name__)
            statement = str(getattr(exc.__cause__, "statement", "") or "").split(" ")[0]
            where = "full" if full else "after space was freed"
            stats.extra.setdefault("errors", []).append([kind, name, statement, where])
            return False
        stats.flushed(sid, result)
        targets[slot] = sessions.conversation(sid).next_end(result.cursor)
        return True

    flushes_to_full = 0
    while flushes_to_full < args["max_flushes"]:
        if not flush(rng.randrange(slots)):
            break
        flushes_to_full += 1
    stats.extra["flushes_to_full"] = flushes_to_full
    for _ in range(args["retries_full"]):  # the same lists again, the disk still full
        flush(rng.randrange(slots))
    full = False
    if args["method"] == "enospc":
        ballast.unlink()  # space freed
    else:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space freed
    stats.extra["after_freed"] = sum(flush(slot) for slot in range(slots))
    for _ in range(args["after"]):
        flush(rng.randrange(slots))
    stats.summary()
    # Gone without closing the store, as a process that dies: the WAL stays for the next opener.
    os._exit(0)


def main(argv: list[str]) -> int:
    """Run the writer ``argv[1]`` with the JSON arguments ``argv[2]``."""
    modes = {"kill": kill_writer, "writer": writer, "appender": appender, "disk": disk_writer}
    modes[argv[1]](json.loads(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
