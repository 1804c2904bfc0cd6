"""What the scenarios share: deterministic conversations, databases, writers, the final check.

Message ``i`` of the session with key ``k`` is a pure function of ``(k, i)``,
and so is where each turn ends: any process can rebuild any conversation to
any length, and the check compares what the database holds with it.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import random
import selectors
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from hermes_orm import SessionStore
from hermes_orm.verify import verify_database

ROOT = Path(__file__).resolve().parents[1]

# -- deterministic conversations ------------------------------------------------------------

_WORDS = (
    "session", "flush", "cursor", "commit", "rollback", "sqlite", "postgres", "index",
    "transcript", "message", "tool", "result", "agent", "gateway", "retry", "lock",
    "exactly", "once", "prefix", "digest", "kill", "restart", "disk", "wal",
)  # fmt: skip
#: Text a conversation may hold: scripts, emoji sequences, private use and
#: combining characters, quoting and placeholder look-alikes.
_FRAGMENTS = (
    "Grüße aus Köln",
    "日本語のテキストを検索する",
    "中文搜索历史记录",
    "한국어 문장",
    "שלום עולם",
    "مرحبا بالعالم",
    "emoji 🎉 👩‍👩‍👧‍👦 🇺🇦 👍🏽",
    "e\u0301 a\u0308 combining",
    "\ue000\uf8ff private use",
    "zero\u200bwidth\u200djoiner",
    "tab\tand\nnew line\r\n",
    "'; DROP TABLE hermes_messages; --",
    "%s ? :name $1 %% {0} \\x00",
    "\U0001d518\U0001d52b\U0001d526\U0001d520 fraktur \U0010fffd",
    "Ω≈ç√∫ ∑∏ ≠ ≤",
)


def _text(rng: random.Random, size: int) -> str:
    parts: list[str] = []
    length = 0
    while length < size:
        part = rng.choice(_FRAGMENTS) if rng.random() < 0.2 else rng.choice(_WORDS)
        parts.append(part)
        length += len(part) + 1
    return " ".join(parts)[:size]


def _size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.02:
        return rng.randint(20_000, 80_000)
    if roll < 0.1:
        return rng.randint(1_000, 8_000)
    return rng.randint(5, 400)


#: How the messages of a turn of 1 to 4 messages follow each other.
_TURN_ROLES = {
    1: ("user",),
    2: ("user", "assistant"),
    3: ("user", "call", "tool"),
    4: ("user", "call", "tool", "assistant"),
}


def _message(key: int, i: int, kind: str) -> dict[str, Any]:
    rng = random.Random(f"message:{key}:{i}")
    stamp: float = 1_760_000_000 + key * 100_000 + i
    message: dict[str, Any] = {
        "role": "assistant" if kind == "call" else kind,
        "platform_message_id": f"{key}:{i}",
        "timestamp": stamp if rng.random() < 0.5 else stamp + 0.25,
    }
    if kind == "user":
        if rng.random() < 0.1:
            message["content"] = [
                {"type": "text", "text": _text(rng, _size(rng))},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{i:08x}"}},
            ]
        else:
            message["content"] = _text(rng, _size(rng))
    elif kind == "call":
        message["content"] = None if rng.random() < 0.5 else _text(rng, 40)
        message["tool_calls"] = [
            {
                "id": f"call_{key}_{i}_{n}",
                "type": "function",
                "function": {
                    "name": rng.choice(("terminal", "read_file", "web_search")),
                    "arguments": json.dumps({"q": _text(rng, 30), "n": n}, ensure_ascii=False),
                },
            }
            for n in range(rng.randint(1, 3))
        ]
        message["finish_reason"] = "tool_calls"
        if rng.random() < 0.3:
            message["reasoning"] = _text(rng, _size(rng))
    elif kind == "tool":
        message["content"] = _text(rng, _size(rng) * 2)
        message["tool_call_id"] = f"call_{key}_{i - 1}_0"
        message["tool_name"] = "terminal"
    else:
        message["content"] = _text(rng, _size(rng))
        message["finish_reason"] = "stop"
        if rng.random() < 0.3:
            message["token_count"] = rng.randint(1, 2**40)
    if rng.random() < 0.02 and isinstance(message.get("content"), str):
        message["content"] += "\x00 after a NUL"  # kept losslessly in the extra document
    if rng.random() < 0.1:
        message["custom"] = {"nested": [1, 2.5, True, None, _text(rng, 10)], "n": -(2**62)}
    return message


class Conversation:
    """The deterministic conversation of the session with key ``key`` (built lazily, cached).

    Turn ``t`` holds 1 to 4 messages (its size a pure function of ``(key, t)``);
    :meth:`end` is the conversation's length after ``t`` turns.
    """

    def __init__(self, key: int) -> None:
        self.key = key
        self._messages: list[dict[str, Any]] = []
        self._ends = [0]

    def end(self, turns: int) -> int:
        """Length of the conversation after its first ``turns`` turns."""
        while len(self._ends) <= turns:
            t = len(self._ends) - 1
            size = random.Random(f"turn:{self.key}:{t}").randint(1, 4)
            start = self._ends[-1]
            self._ends.append(start + size)
            roles = _TURN_ROLES[size]
            self._messages.extend(_message(self.key, start + n, roles[n]) for n in range(size))
        return self._ends[turns]

    def next_end(self, length: int) -> int:
        """The end of the first turn that ends past ``length`` messages."""
        while self._ends[-1] <= length:
            self.end(len(self._ends))
        return self._ends[bisect.bisect_right(self._ends, length)]

    def is_end(self, length: int) -> bool:
        """Whether ``length`` messages are whole turns."""
        return length == 0 or self.next_end(length - 1) == length

    def messages(self, length: int) -> list[dict[str, Any]]:
        """The first ``length`` messages (a new list; the dicts are shared, never changed)."""
        if length > len(self._messages):
            self.next_end(length)
        return self._messages[:length]


def session_id(slot: int, generation: int = 0, *, appended: bool = False) -> str:
    """Id of a scenario's session: ``s<key>``, key ``slot * 1000 + generation``.

    ``appended``: ``a<key>``, a session written a message at a time (``append``),
    which may end inside a turn.
    """
    return f"{'a' if appended else 's'}{slot * 1000 + generation}"


def key_of(sid: str) -> int:
    """The key of a session id made by :func:`session_id`."""
    return int(sid[1:])


# -- outcomes ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one scenario did on one backend, and what it found.

    Attributes:
        scenario: Its name (``kill``, ``contention``, ...).
        backend: ``sqlite`` or ``postgresql``.
        work: What it did, by name (``kills``, ``processes``, ``calls``, ...).
        flushes: Flushes that returned (each acknowledged its cursor).
        acknowledged: Messages acknowledged: over the sessions, the highest
            cursor a flush returned.
        stored: Messages the database holds at the end.
        duplicated: Messages held twice (or more: each extra copy counts).
        lost: Acknowledged messages not held at their position.
        typed: Typed errors seen, by type (those the scenario expects included).
        untyped: Exceptions that are no ``HermesOrmError``, by call and type.
        problems: Everything else found wrong (inexact round trips, broken
            invariants, unexpected typed errors, writers that died or hung).
        seconds: Wall time of the scenario.
        notes: Figures of the scenario's own, for the report.
        samples: The first message of each kind of error, for the report.
    """

    scenario: str
    backend: str
    work: dict[str, int] = field(default_factory=dict)
    flushes: int = 0
    acknowledged: int = 0
    stored: int = 0
    duplicated: int = 0
    lost: int = 0
    typed: Counter[str] = field(default_factory=Counter)
    untyped: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        """Untyped errors and problems: what makes the scenario fail."""
        return sum(self.untyped.values()) + len(self.problems)

    @property
    def ok(self) -> bool:
        """Nothing duplicated, nothing lost, no untyped error, no problem."""
        return not (self.duplicated or self.lost or self.failures)

    def sample(self, kind: str, detail: str) -> None:
        """Keep ``detail`` as the example of ``kind`` unless one is kept already."""
        self.samples.setdefault(kind, detail[:500])

    def problem(self, detail: str) -> None:
        """Record a problem (the first 200 in full; then only counted)."""
        self.problems.append(detail[:2000] if len(self.problems) < 200 else "(more)")

    def merge_errors(self, summary: Mapping[str, Any]) -> None:
        """Add a writer's error counts and samples (see :class:`WriterStats`)."""
        self.typed.update(summary.get("typed", {}))
        self.untyped.update(summary.get("untyped", {}))
        for kind, detail in summary.get("samples", {}).items():
            self.sample(kind, detail)

    def summary(self) -> str:
        """One line: the figures and the verdict."""
        work = ", ".join(f"{k} {v}" for k, v in self.work.items())
        typed = ", ".join(f"{k} {v}" for k, v in sorted(self.typed.items())) or "none"
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"{self.scenario}/{self.backend}: {work}; flushes {self.flushes}, acknowledged "
            f"{self.acknowledged}, stored {self.stored}, duplicated {self.duplicated}, lost "
            f"{self.lost}; typed errors: {typed}; untyped {sum(self.untyped.values())}, "
            f"problems {len(self.problems)}; {self.seconds:.1f}s: {verdict}"
        )


# -- databases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """A fresh, empty database of one backend, migrated by the scenario that gets it."""

    backend: str
    url: str
    #: The SQLite file (None on PostgreSQL).
    path: Path | None = None


def sqlite_database(workdir: Path, name: str) -> Database:
    """A new SQLite file database in ``workdir``."""
    path = workdir / f"{name}-{uuid.uuid4().hex[:8]}.db"
    return Database("sqlite", f"sqlite:///{path}", path)


def _admin(server_url: str) -> Any:
    return create_engine(
        make_url(server_url).set(drivername="postgresql+psycopg"),
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
    )


@contextlib.contextmanager
def postgres_database(server_url: str, name: str) -> Iterator[Database]:
    """A new database on the server at ``server_url``, dropped afterwards.

    Its commits are synchronous (``synchronous_commit=on``, set on the
    database, so whatever the server's default): a commit acknowledged to a
    writer is in the WAL before the writer hears of it.
    """
    database = f"hermes_reliability_{name}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = _admin(server_url)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{database}" TEMPLATE template0')
        conn.exec_driver_sql(f'ALTER DATABASE "{database}" SET synchronous_commit = on')
    url = (
        make_url(server_url)
        .set(drivername="postgresql+psycopg", database=database)
        .render_as_string(hide_password=False)
    )
    try:
        yield Database("postgresql", url)
    finally:
        with contextlib.suppress(Exception), admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.dispose()


def prepare(url: str, sessions: list[str]) -> None:
    """Migrate the database at ``url`` to head and create ``sessions`` (before any writer)."""
    store = SessionStore(url)
    try:
        store.upgrade()
        for sid in sessions:
            store.create_session(sid, source="reliability", started_at=1_760_000_000.0)
    finally:
        store.close()


# -- the final check --------------------------------------------------------------------------


def check(
    url: str, acked: Mapping[str, int], outcome: Outcome, *, whole_turns: bool = True
) -> None:
    """Check every session of the database against its deterministic conversation.

    Per session: the messages read back are the conversation's first
    ``flushed_idx`` messages (so no message is held twice, none changed), at
    positions 0..n-1, ``flushed_idx == message_count == rows``; every cursor
    acknowledged to a writer is at most the stored one (no acknowledged
    message lost); with ``whole_turns``, the cursor ends a turn (a flush wrote
    all of its messages or none). Then ``hermes-orm verify`` checks every
    invariant of the database. Adds to ``outcome``'s figures and problems.
    """
    store = SessionStore(url)
    try:
        ids: list[str] = []
        cursor: str | None = None
        while True:
            page = store.list_sessions(limit=1000, cursor=cursor)
            ids += [s["id"] for s in page.sessions]
            cursor = page.next_cursor
            if cursor is None:
                break
        for sid in sorted(ids):
            _check_session(store, sid, acked.get(sid, 0), outcome, whole_turns)
        for sid, cursor_acked in acked.items():
            if sid not in ids and cursor_acked:
                outcome.lost += cursor_acked
                outcome.problem(f"{sid}: acknowledged up to {cursor_acked}, session missing")
        outcome.acknowledged += sum(acked.values())
        report = verify_database(store)
        for found in report.problems:
            outcome.problem(f"verify: {found.check} {found.session_id}: {found.detail}")
    finally:
        store.close()


def _check_session(
    store: SessionStore, sid: str, acked: int, outcome: Outcome, whole_turns: bool
) -> None:
    session = store.get_session(sid)
    if session is None:  # deleted since it was listed: nobody here deletes
        outcome.problem(f"{sid}: listed, then not found")
        return
    n = session["flushed_idx"]
    with store.engine.connect() as conn:
        idxs = list(
            conn.execute(
                text("SELECT idx FROM hermes_messages WHERE session_id = :sid ORDER BY idx"),
                {"sid": sid},
            ).scalars()
        )
    got = store.get_messages(sid)
    outcome.stored += len(got)
    conversation = Conversation(key_of(sid))
    expected = conversation.messages(max(n, len(got), acked))
    tags = [m.get("platform_message_id") for m in got]
    outcome.duplicated += len(tags) - len(set(tags))
    lost = sum(1 for i in range(acked) if i >= len(got) or got[i] != expected[i])
    outcome.lost += lost
    if lost:
        outcome.problem(f"{sid}: {lost} of {acked} acknowledged messages not held (cursor {n})")
    if session["message_count"] != n or len(idxs) != n or len(got) != n:
        outcome.problem(
            f"{sid}: flushed_idx {n}, message_count {session['message_count']}, "
            f"{len(idxs)} rows, {len(got)} read back"
        )
    if idxs != list(range(len(idxs))):
        outcome.problem(f"{sid}: positions are not 0..{len(idxs) - 1}")
    wrong = [i for i in range(len(got)) if got[i] != expected[i]]
    if wrong:
        outcome.problem(
            f"{sid}: {len(wrong)} messages differ from the conversation, first {wrong[0]}"
        )
    if whole_turns and not sid.startswith("a") and not conversation.is_end(n):
        outcome.problem(f"{sid}: cursor {n} is inside a turn (a flush written in part)")


# -- writer processes -------------------------------------------------------------------------


def spawn(mode: str, args: Mapping[str, Any]) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Start ``python -m reliability._child MODE ARGS``; the process and its stderr file.

    Its stdout is a pipe of protocol lines (see :mod:`reliability._child`); its
    stderr goes to a temporary file, read after it ends (see :func:`stderr_tail`).
    """
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the caller closes it
    process = subprocess.Popen(
        [sys.executable, "-m", "reliability._child", mode, json.dumps(dict(args))],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    return process, stderr


def stderr_tail(stderr: IO[bytes], chars: int = 1500) -> str:
    """The end of what a writer wrote to stderr."""
    stderr.seek(0)
    return stderr.read().decode(errors="replace")[-chars:].strip()


class Lines:
    """Complete lines read from a writer's stdout, as they come (without blocking)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self._fd = process.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self._buffer = b""
        self.eof = False

    def read(self, timeout: float) -> list[str]:
        """Lines that arrive within ``timeout`` seconds (all that are there, at least)."""
        if self.eof:
            return []
        if not self._selector.select(timeout):
            return []
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [line.decode() for line in lines]

    def close(self) -> None:
        """Stop watching the pipe."""
        self._selector.close()


class Reader(threading.Thread):
    """Reads a writer's protocol lines in the background, noting when each arrived."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        """Read until the writer's stdout closes."""
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode().rstrip("\n")
            with self.lock:
                self.lines.append((time.monotonic(), line))

    def snapshot(self) -> list[tuple[float, str]]:
        """The lines read so far."""
        with self.lock:
            return list(self.lines)


def parse_summary(lines: list[str]) -> dict[str, Any] | None:
    """The writer's summary (its ``S`` line), if it wrote one."""
    for line in reversed(lines):
        if line.startswith("S "):
            summary: dict[str, Any] = json.loads(line[2:])
            return summary
    return None


def note_error(line: str, outcome: Outcome, expected: tuple[str, ...]) -> None:
    """Count the error an ``E`` line reports: typed (a problem unless ``expected``) or not."""
    sid, kind, detail = json.loads(line[2:])
    if ":" in kind:
        outcome.untyped[kind] += 1
    else:
        outcome.typed[kind] += 1
        if kind not in expected:
            outcome.problem(f"{sid}: unexpected {detail}")
    outcome.sample(kind, detail)


def note_acks(lines: list[str], acked: dict[str, int]) -> int:
    """Raise ``acked`` to the cursors the ``A`` lines acknowledge; how many there were."""
    flushes = 0
    for line in lines:
        if line.startswith("A "):
            sid, cursor = line.split(" ")[1:3]
            acked[sid] = max(acked.get(sid, 0), int(cursor))
            flushes += 1
    return flushes


def finish_writer(
    process: subprocess.Popen[bytes],
    stderr: IO[bytes],
    reader: Reader,
    *,
    name: str,
    timeout: float,
    outcome: Outcome,
    acked: dict[str, int],
    expected: tuple[str, ...],
) -> tuple[list[str], dict[str, Any] | None]:
    """Wait for a writer (killed past ``timeout``), then count what it said.

    Its acknowledged cursors go to ``acked``, its flushes and errors to
    ``outcome`` (an error not ``expected``, a hang or a failed exit is a
    problem). Returns the lines it wrote and its summary (None if it gave none).
    """
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
        outcome.problem(f"{name} did not end within {timeout:.0f}s (hung)")
    reader.join()
    lines = [line for _, line in reader.snapshot()]
    summary = parse_summary(lines)
    if code != 0 or summary is None:
        outcome.problem(f"{name} failed ({code}): {stderr_tail(stderr)}")
    stderr.close()
    outcome.flushes += note_acks(lines, acked)
    for line in lines:
        if line.startswith("E "):
            note_error(line, outcome, expected=expected)
    return lines, summary
