"""Import a Hermes Agent ``state.db`` into a hermes_orm database, losslessly.

The source is read, never written: opened read-only through SQLite's own
protocol when a Hermes process has it open (its ``-wal`` file exists) or a
rollback journal lies beside it (a hot one, a write never committed, is refused:
see :class:`Source`), and as an immutable file otherwise, so that not even a
``-wal`` or ``-shm`` file is created beside it. Its columns are introspected, so
any schema version works: columns hermes_orm has no place for go into the
``extra`` JSON of the row.

Messages keep Hermes' order (its row id) and get ``idx`` 0..n-1. They are
written with :meth:`SessionStore.flush` in batches, each its own transaction:
the session's cursor says how far an earlier run got, so a second run writes
nothing, a run after Hermes appended more copies only those, and a run killed
half-way is finished by the next one with every row once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import pickle
import queue
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, TextIO, TypeVar
from urllib.parse import quote, unquote, urlsplit

from sqlalchemy import URL, Connection, Engine, Table, bindparam, select
from sqlalchemy.exc import ArgumentError, IntegrityError

from hermes_orm import _codec, _dialects
from hermes_orm._codec import check_session_id
from hermes_orm.errors import (
    HermesOrmError,
    HistoryDivergedError,
    InvalidArgumentError,
    InvalidMessageError,
    InvalidSessionError,
    SessionNotFoundError,
)
from hermes_orm.integrations.hermes._seen import held_sessions, record_seen, seen_sessions
from hermes_orm.integrations.hermes._side_tables import copy_side_tables
from hermes_orm.integrations.hermes._text import may_escape_surrogates, scrub_json
from hermes_orm.integrations.hermes.mirror import revision_row, same_turn
from hermes_orm.models import MODEL_USAGE_KEY, Message, ModelUsage, Session, new_history_id
from hermes_orm.store import (
    SESSION_FIELDS,
    Chunk,
    CursorMoved,
    PreparedWrite,
    SessionStore,
    check_fields,
    flush_sql,
    on_title_races,
    prepare_many,
    take_lineage_turn,
    write_prepared,
)

_sessions: Table = Session.__table__  # type: ignore[assignment]
_messages: Table = Message.__table__  # type: ignore[assignment]
_usage: Table = ModelUsage.__table__  # type: ignore[assignment]

#: Prefix Hermes puts before JSON-encoded (multimodal) content.
CONTENT_JSON_PREFIX = "\x00json:"
#: Messages read and flushed per transaction. Into SQLite, a million messages went in
#: 15% faster in batches of 8,000 than of 2,000 (fewer commits, fewer and larger
#: search index segments to merge); 20,000 was no faster. A batch holds the
#: destination's write lock for well under a second.
BATCH = 8000
#: Characters of text (and bytes of blobs) after which a batch ends before its
#: ``batch`` messages: a Hermes message may hold a tool's output of megabytes, and a
#: batch is in memory whole (read, encoded, handed to the writer, a few at once), so
#: what an import holds follows its batches' bytes more than their messages.
BATCH_BYTES = 16 * 2**20
#: Most rows fetched at a time while a batch is read (fewer once they are seen to be large).
_FETCH_ROWS = 32
#: Session columns whose Hermes value is kept as is but whose meaning is ours.
_COUNTERS = ("message_count", "tool_call_count")
_BOOL_SESSION = frozenset({"expiry_finalized", "archived"})
_JSON_MESSAGE = frozenset(_codec.JSON_KEYS)
_BOOL_MESSAGE = frozenset(_codec.BOOL_KEYS)
_USAGE_KEY = MODEL_USAGE_KEY
_T = TypeVar("_T")
_log = logging.getLogger(__name__)


class StateDbError(HermesOrmError):
    """The source cannot be imported (not a Hermes state.db, unreadable)."""


@dataclass
class TableCount:
    """Rows of one table in the source and, after the import, in the destination."""

    source: int = 0
    destination: int = 0

    @property
    def ok(self) -> bool:
        """Both sides hold the same number of rows."""
        return self.source == self.destination


@dataclass
class ImportReport:
    """What an import did, and the verification of its result."""

    sessions_written: int = 0
    messages_written: int = 0
    usage_written: int = 0
    counts: dict[str, TableCount] = field(default_factory=dict)
    mismatched_sessions: list[str] = field(default_factory=list)
    diverged_sessions: list[str] = field(default_factory=list)
    grown_sessions: list[str] = field(default_factory=list)
    #: Sessions the source gained while the import ran: not copied (the next run copies them).
    appeared_sessions: list[str] = field(default_factory=list)
    invalid_sessions: dict[str, str] = field(default_factory=dict)
    retitled_sessions: list[str] = field(default_factory=list)
    #: Sessions whose title a newer session of the source also held (kept in their extra).
    deduplicated_titles: list[str] = field(default_factory=list)
    #: Sessions an earlier import saw that the destination deleted since: not copied again.
    deleted_sessions: list[str] = field(default_factory=list)
    #: Rows of Hermes' other tables deleted so (as the source still holds them), alike.
    deleted_rows: list[str] = field(default_factory=list)
    #: Topic bindings of the source whose session the destination bound anew since.
    replaced_rows: list[str] = field(default_factory=list)
    #: Sessions the Hermes mirror plugin continued in the destination: up to date, left alone.
    mirrored_sessions: list[str] = field(default_factory=list)
    #: Sessions whose parent link closed a loop of parents (kept in their extra).
    unlooped_sessions: list[str] = field(default_factory=list)
    #: Sessions whose copied rows Hermes changed in place since (columns an upgrade
    #: added): the copies kept as they are, the messages after them copied.
    amended_sessions: list[str] = field(default_factory=list)
    #: Messages of the source whose session has no sessions row, by session id: not imported.
    orphaned_messages: dict[str, int] = field(default_factory=dict)
    #: Rows of Hermes' other tables (settings, gateway routing, Telegram topics) written.
    settings_written: int = 0
    #: ``state_meta`` keys the destination held with another value: its value kept.
    kept_settings: list[str] = field(default_factory=list)
    #: Rows of those tables the store cannot hold, each with why: not imported.
    invalid_rows: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Nothing mismatched, diverged, invalid or left out.

        Sessions that grew, or appeared, in the source while the import ran are
        fine: what the run read is copied, and the next run copies the rest.
        """
        counts_ok = all(c.ok for c in self.counts.values()) or (
            self.grown_sessions and not self.mismatched_sessions
        )
        return (
            bool(counts_ok)
            and not self.mismatched_sessions
            and not self.diverged_sessions
            and not self.invalid_sessions
            and not self.orphaned_messages
            and not self.invalid_rows
        )

    def table(self) -> str:
        """The verification table, as text."""
        # (Session ids as Python writes them: a control character in one, an escape
        # sequence Hermes kept, is shown escaped, never sent to the reader's terminal.)
        lines = [f"{'table':<22} {'source':>10} {'destination':>12}  ok"]
        for name, count in self.counts.items():
            mark = "yes" if count.ok else "NO"
            lines.append(f"{name:<22} {count.source:>10,} {count.destination:>12,}  {mark}")
        for sid in self.mismatched_sessions[:10]:
            lines.append(f"session {sid!r}: message count differs")
        _more(lines, self.mismatched_sessions, "with a message count that differs")
        for sid in self.diverged_sessions[:10]:
            lines.append(f"session {sid!r}: stored messages differ from the source (diverged)")
        _more(lines, self.diverged_sessions, "diverged")
        for sid, reason in list(self.invalid_sessions.items())[:10]:
            lines.append(f"session {sid!r}: cannot be stored ({reason})")
        _more(lines, self.invalid_sessions, "that cannot be stored")
        for sid, n in list(self.orphaned_messages.items())[:10]:
            lines.append(f"session {sid!r}: {n:,} message(s) but no sessions row: not imported")
        if len(self.orphaned_messages) > 10:
            lines.append(
                f"{sum(self.orphaned_messages.values()):,} message(s) of "
                f"{len(self.orphaned_messages):,} sessions with no sessions row: not imported"
            )
        for row, reason in list(self.invalid_rows.items())[:10]:
            lines.append(f"{row}: cannot be stored ({reason}): not imported")
        if len(self.invalid_rows) > 10:
            lines.append(f"{len(self.invalid_rows):,} rows of other tables not imported")
        if self.kept_settings:
            lines.append(
                f"{len(self.kept_settings)} state_meta key(s) the destination held with another "
                f"value kept it: {', '.join(self.kept_settings[:5])}"
            )
        if self.deleted_sessions:
            lines.append(
                f"{len(self.deleted_sessions)} session(s) deleted in the destination since an "
                "earlier import were not copied again (--restore-deleted copies them)"
            )
        if self.deleted_rows:
            lines.append(
                f"{len(self.deleted_rows)} row(s) of Hermes' other tables deleted in the "
                "destination since an earlier import were not copied again "
                f"(--restore-deleted copies them): {', '.join(self.deleted_rows[:3])}"
            )
        if self.replaced_rows:
            lines.append(
                f"{len(self.replaced_rows)} topic binding(s) of the source whose session the "
                "destination bound anew since were left as the destination holds them"
            )
        if self.mirrored_sessions:
            lines.append(
                f"{len(self.mirrored_sessions)} session(s) continued by the Hermes mirror plugin "
                "in the destination: up to date, left as they are"
            )
        if self.unlooped_sessions:
            lines.append(
                f"{len(self.unlooped_sessions)} session(s) whose parent link closed a loop of "
                "parents were kept without it (in extra['parent_session_id'])"
            )
        if self.amended_sessions:
            lines.append(
                f"{len(self.amended_sessions)} session(s) whose copied messages Hermes changed "
                "in place since (columns a Hermes upgrade added): kept as copied, the messages "
                "after them copied"
            )
        if self.retitled_sessions:
            lines.append(
                f"{len(self.retitled_sessions)} session title(s) already used in the "
                "destination were kept in extra['title']"
            )
        if self.deduplicated_titles:
            lines.append(
                f"{len(self.deduplicated_titles)} session title(s) that a newer session of the "
                "source also held were kept in extra['title'] (the newest keeps the title, as "
                "Hermes' own migration does)"
            )
        if self.grown_sessions:
            lines.append(
                f"{len(self.grown_sessions)} session(s) grew in the source during the import: "
                "run it again to copy the rest"
            )
        if self.appeared_sessions:
            lines.append(
                f"{len(self.appeared_sessions)} session(s) appeared in the source during the "
                "import: run it again to copy them"
            )
        return "\n".join(lines)


def _more(lines: list[str], named: Collection[str], what: str) -> None:
    """Past the 10 sessions a report names: how many more there are (``ImportReport`` has all)."""
    if len(named) > 10:
        lines.append(f"... and {len(named) - 10:,} more session(s) {what}")


class NotUtf8(bytes):
    """A source text value that is not valid UTF-8, as its bytes (see :meth:`Source.execute`)."""


def _lenient_text(data: bytes) -> str | NotUtf8:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return NotUtf8(data)


#: Seconds a read of the source waits for a writer holding it locked.
SOURCE_BUSY_TIMEOUT = 30.0


class Source:
    """A Hermes state.db opened for reading only, creating and changing nothing beside it.

    While no Hermes process has the file open (no ``-wal``/``-shm`` beside it,
    and no rollback ``-journal``), it is read as an immutable file: no lock
    taken, no file created. Such a read is kept only if the file did not change
    from the moment it was opened until the read ended, and no WAL or journal
    appeared beside it (Hermes writes its WAL first, and changes the file itself
    only when it checkpoints). Otherwise the read is thrown away, and the file
    reopened through SQLite's read-only protocol, which is safe against a
    concurrent writer and uses the files that writer made; ``generation`` then
    counts one more.

    A file beside which a ``-journal`` lies (Hermes' rollback-journal fallback)
    is read that way from the start: its journal may hold the undo of a write
    that never committed, which an immutable read would take for data.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        try:
            if not self.path.is_file():
                raise StateDbError(_dialects.redact(f"no Hermes state.db at {self.path}"))
            self.live = self._writer_files()
            self._stamp = self._file_stamp()
            self.conn = self._connect()
        except (OSError, sqlite3.Error) as exc:  # a name too long, a file not ours to read
            raise StateDbError(f"cannot open {self.path}: {exc}") from exc
        #: How many times the source was reopened live (a read before may be of another state).
        self.generation = 0
        self._snapshot = False
        self._blocks_writers: bool | None = None
        try:
            tables = {
                r[0] for r in self.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except StateDbError as exc:
            self.close()
            if getattr(exc.__cause__, "sqlite_errorname", "") == "SQLITE_READONLY_ROLLBACK":
                raise StateDbError(
                    f"{self.path} holds a write that was never committed (a hot {self.path.name}"
                    "-journal beside it, left by a Hermes process that was killed mid-write), "
                    "which a read-only import cannot roll back: open it once with Hermes, or "
                    f"with `sqlite3 {self.path} 'PRAGMA quick_check'`, then import again"
                ) from None
            if getattr(exc.__cause__, "sqlite_errorname", "") == "SQLITE_BUSY":
                raise StateDbError(
                    f"{self.path} stayed locked by a writer for {SOURCE_BUSY_TIMEOUT:.0f} s "
                    "(Hermes, or another tool, in the middle of a write): import again once "
                    "it is done"
                ) from exc
            raise StateDbError(f"{self.path} is not a SQLite database: {exc.__cause__}") from exc
        if not {"sessions", "messages"} <= tables:
            self.close()
            raise StateDbError(
                f"{self.path} has no sessions/messages tables: not a Hermes state.db"
            )
        self.tables = tables

    def _file_stamp(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _writer_files(self) -> bool:
        """Whether a writer's files lie beside the source: its WAL, or a rollback journal."""
        if Path(f"{self.path}-wal").exists() or Path(f"{self.path}-shm").exists():
            return True
        journal = Path(f"{self.path}-journal")
        try:
            return journal.stat().st_size > 0  # an empty one is a committed write's leftover
        except OSError:
            return False

    def _connect(self) -> sqlite3.Connection:
        mode = "mode=ro" if self.live else "mode=ro&immutable=1"
        # The reader's own Source may be closed by whichever thread ends its generator.
        return sqlite3.connect(
            f"file:{quote(str(self.path))}?{mode}",
            uri=True,
            timeout=SOURCE_BUSY_TIMEOUT,
            check_same_thread=False,
        )

    def _go_live(self) -> None:
        self.conn.close()
        self.live = True
        self.generation += 1
        self.conn = self._connect()
        self._blocks_writers = None
        if self._snapshot:
            self._begin()

    def blocks_writers(self) -> bool:
        """Whether a read transaction here keeps the file's writers waiting until it ends.

        So it does on a file read live that is not in WAL mode (Hermes'
        rollback-journal fallback): the read's shared lock holds off every
        commit. In WAL mode, and on a file read as immutable, nothing waits.
        """
        if self._blocks_writers is None:
            mode = self.execute("PRAGMA journal_mode")[0][0] if self.live else "immutable"
            self._blocks_writers = self.live and str(mode).lower() != "wal"
        return self._blocks_writers

    def _begin(self) -> None:
        try:
            self.conn.execute("BEGIN")
        except sqlite3.Error as exc:
            raise StateDbError(f"reading {self.path} failed: {exc}") from exc

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Read the source as of one moment until the block ends.

        Live, that is one read transaction. An immutable file is one moment as
        long as it does not change; if it does, the source goes live (in a read
        transaction from then on) and ``generation`` says so: what the block read
        before may be of another state of the file.
        """
        self._snapshot = True
        if self.live:
            self._begin()
        try:
            yield
        finally:
            self._snapshot = False
            if self.conn.in_transaction:
                self.conn.rollback()  # it only read

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query and fetch all its rows (reopening live when Hermes shows up).

        A text value that is not valid UTF-8 comes back as :class:`NotUtf8`
        (its bytes) instead of failing the whole query.

        Raises:
            StateDbError: SQLite could not read the file.
        """
        if not self.live:
            try:
                rows = self._fetch(sql, params)
            except sqlite3.DatabaseError:
                rows = None  # pages changed under the read: a checkpoint ran
            if rows is not None and self._file_stamp() == self._stamp and not self._writer_files():
                return rows
            self._go_live()
        try:
            return self._fetch(sql, params)
        except sqlite3.Error as exc:
            raise StateDbError(f"reading {self.path} failed: {exc}") from exc

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "Could not decode to UTF-8" not in str(exc):
                raise
        # Text that is not UTF-8 is the row's problem, not the file's: read it again,
        # such values as bytes, for the caller to report their session.
        self.conn.text_factory = _lenient_text
        try:
            return self.conn.execute(sql, params).fetchall()
        finally:
            self.conn.text_factory = str

    def batches(
        self,
        sql: str,
        key: Any,
        *,
        start: int,
        count: int = -1,
        size: int,
        max_bytes: int | None = None,
    ) -> Generator[tuple[list[tuple[Any, ...]], bool], None, None]:
        """The rows of one query, ``size`` at a time, read as :meth:`execute` reads.

        Each item is a batch of rows and whether more may follow. A batch ends
        at ``size`` rows, or sooner once its text and blobs reach ``max_bytes``
        (None: :data:`BATCH_BYTES`; the rows are fetched a few at a time): a batch of
        large tool outputs is held in memory whole, and what a batch costs in
        memory follows its bytes more than its rows.

        ``sql`` takes ``(key, limit, offset)``: the rows from ``start`` on,
        ``count`` of them (-1: all). It runs once, its rows fetched batch by
        batch, so reading a long session costs its length: an ``OFFSET`` per
        batch read every row before it again (the session's rows sorted anew
        at each batch), quadratic in the session's length. Where
        :meth:`execute` would read again (the file changed under an immutable
        read, text that is not UTF-8), the query runs again from the first row
        not yet handed out. Other reads of the source may run between two
        batches; close the generator before the snapshot it reads in ends.

        Raises:
            StateDbError: SQLite could not read the file.
        """
        done = 0
        lenient = False
        bound = BATCH_BYTES if max_bytes is None else max_bytes
        cursor: sqlite3.Cursor | None = None
        generation = self.generation
        try:
            while True:
                if generation != self.generation:  # this read, or another, went live
                    cursor, generation = None, self.generation
                    if lenient:  # (the new connection reads text as this read did)
                        self.conn.text_factory = _lenient_text
                rows: list[tuple[Any, ...]] | None
                try:
                    if cursor is None:
                        limit = count if count < 0 else count - done
                        cursor = self.conn.execute(sql, (key, limit, start + done))
                    rows, more = _fetch_batch(cursor, size, bound)
                except sqlite3.OperationalError as exc:
                    if "Could not decode to UTF-8" in str(exc) and not lenient:
                        # As :meth:`_fetch` does: read again, such values as bytes.
                        lenient, cursor = True, None
                        self.conn.text_factory = _lenient_text
                        continue
                    if self.live:
                        raise StateDbError(f"reading {self.path} failed: {exc}") from exc
                    rows = None
                except sqlite3.DatabaseError as exc:
                    if self.live:
                        raise StateDbError(f"reading {self.path} failed: {exc}") from exc
                    rows = None  # pages changed under the read: a checkpoint ran
                except sqlite3.Error as exc:
                    raise StateDbError(f"reading {self.path} failed: {exc}") from exc
                if not self.live and (
                    rows is None or self._file_stamp() != self._stamp or self._writer_files()
                ):
                    self._go_live()  # (a new connection: taken up at the loop's top)
                    continue
                assert rows is not None  # (a live read's failure raised)
                done += len(rows)
                more = more and done != count
                yield rows, more
                if not more:
                    return
        finally:
            if cursor is not None and generation == self.generation:
                with contextlib.suppress(sqlite3.Error):  # (the source closed first)
                    cursor.close()
            if lenient:
                self.conn.text_factory = str

    def columns(self, table: str) -> list[str]:
        """Column names of ``table``, in ``SELECT *`` order."""
        return [row[1] for row in self.execute(f"PRAGMA table_info({table})")]

    def dicts(self, table: str) -> list[dict[str, Any]]:
        """Every row of a (small) table as a dict."""
        names = self.columns(table)
        return [
            dict(zip(names, row, strict=True)) for row in self.execute(f"SELECT * FROM {table}")
        ]

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


_SIZED = frozenset((str, bytes, NotUtf8))


def _fetch_batch(
    cursor: sqlite3.Cursor, size: int, max_bytes: int
) -> tuple[list[tuple[Any, ...]], bool]:
    """Up to ``size`` rows of ``cursor``, fewer if they hold ``max_bytes``; more may follow.

    The rows come a few at a time: one, then as many as fit in what is left
    were each the largest so far, at most :data:`_FETCH_ROWS`; so a batch ends
    at most that many rows past the bound, not at ``size`` megabyte messages.
    """
    rows: list[tuple[Any, ...]] = []
    held = largest = 0
    step = 1
    while True:
        fetched = cursor.fetchmany(step)
        rows += fetched
        for row in fetched:
            length = sum(len(v) for v in row if v.__class__ in _SIZED)
            held += length
            largest = max(largest, length)
        if len(fetched) < step:
            return rows, False
        if len(rows) >= size or held >= max_bytes:
            return rows, True
        step = max(1, min(size - len(rows), _FETCH_ROWS, (max_bytes - held) // (largest + 1)))


def open_source(path: str | Path) -> Source:
    """Open a Hermes state.db for reading only (see :class:`Source`)."""
    return Source(path)


def _counts_by_session(src: Source) -> dict[str, int]:
    rows = src.execute("SELECT session_id, count(*) FROM messages GROUP BY session_id")
    return {str(r[0]): int(r[1]) for r in rows}


def _has_table(src: Source, table: str) -> bool:
    return table in src.tables


def _json_or_text(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _parsed_json(value: Any) -> Any:
    """JSON text of a Hermes message decoded, lone surrogates in it made U+FFFD.

    Hermes keeps them escaped in its messages' JSON; a message cannot hold them
    (they are no Unicode), and the SessionDB adapter replaces them alike.
    (A session's ``model_config`` holds them as Hermes does: not scrubbed.)
    """
    decoded = _json_or_text(value)
    return scrub_json(decoded) if decoded is not value and may_escape_surrogates(value) else decoded


@functools.cache
def _session_columns(keys: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Of a Hermes sessions row's columns: those copied as fields, and those kept in ``extra``.

    Not copied: the id, and the counters, which ours count from what is stored
    (they are checked, not copied). ``model_config`` is a field, decoded from
    JSON; the flags are fields, made bools.
    """
    skipped = ("id", *_COUNTERS)
    fields = tuple(k for k in keys if k in SESSION_FIELDS and k != "extra" and k not in skipped)
    return fields, tuple(k for k in keys if k not in fields and k not in skipped)


def session_rows(src: Source, report: ImportReport | None = None) -> list[dict[str, Any]]:
    """Every Hermes sessions row as hermes_orm session fields, ``id`` first.

    Columns hermes_orm has no field for go into ``extra``. Each row goes from
    the driver's tuple to its fields in one step (not through a dict of every
    column): an import of tens of thousands of sessions spent a second there.

    A row hermes_orm cannot store (an id the store refuses, a BLOB or text
    that is not UTF-8 in any column) is left out, and put in ``report``'s
    invalid sessions, as are the rows of an id several rows hold. NULL in a
    column hermes_orm keeps NOT NULL is the column's default. A title that a
    newer row (a larger rowid) also holds, as in databases from before Hermes
    made titles unique, is left to the newest, as Hermes' own migration does,
    and kept in the others' ``extra["title"]``.
    """
    copied, kept = _session_columns(tuple(src.columns("sessions")))
    keys = ("id", *copied)
    names = (*keys, *kept)
    select_list = ", ".join(map(_quoted, names))
    bools = sorted(_BOOL_SESSION.intersection(copied))
    defaults = [(k, v) for k, v in _SESSION_DEFAULTS.items() if k in copied]
    # A column the table lacks (a table made by hand, not by Hermes) reads as NULL.
    absent = [(k, v) for k, v in _SESSION_DEFAULTS.items() if k not in copied]
    rows = []
    rows_of: Counter[Any] = Counter()
    for row in src.execute(f"SELECT {select_list} FROM sessions ORDER BY rowid"):
        rows_of[row[0]] += 1
        problem = _session_problem(names, row)
        if problem is not None:
            if report is not None:
                report.invalid_sessions[_shown(row[0])] = problem
            continue
        fields = dict(zip(keys, row, strict=False))  # up to the last field; the rest is kept
        if "model_config" in fields:
            fields["model_config"] = _json_or_text(fields["model_config"])
        for key, default in defaults:
            if fields[key] is None:
                fields[key] = default
        fields.update(absent)
        for key in bools:
            value = fields[key]
            fields[key] = None if value is None else bool(value)
        fields["extra"] = dict(zip(kept, row[len(keys) :], strict=True)) or None
        try:  # what the store refuses of its API's callers (NUL, a count as text, ...)
            check_fields({k: v for k, v in fields.items() if k != "id"})
        except InvalidSessionError as exc:
            if report is not None:
                report.invalid_sessions[fields["id"]] = str(exc)
            continue
        rows.append(fields)
    # A sessions table without its primary key (a damaged or hand-made file) may hold
    # an id twice: which row is the session's cannot be told, so neither is copied.
    doubled = {sid for sid, n in rows_of.items() if n > 1}
    if doubled:
        for sid in doubled:
            if report is not None:
                report.invalid_sessions[_shown(sid)] = (
                    f"the source's sessions table holds {rows_of[sid]} rows of this id"
                )
        rows = [fields for fields in rows if fields["id"] not in doubled]
    holders: set[str] = set()
    for fields in reversed(rows):  # the newest first
        title = fields.get("title")
        if title is None:
            continue
        if title in holders:
            fields["extra"] = {**(fields["extra"] or {}), "title": title}
            fields["title"] = None
            if report is not None:
                report.deduplicated_titles.append(fields["id"])
        holders.add(title)
    return rows


#: What NULL in a Hermes sessions column becomes where hermes_orm's column is NOT NULL.
_SESSION_DEFAULTS: dict[str, Any] = {
    **{
        c.name: c.default.arg  # type: ignore[attr-defined]
        for c in _sessions.columns
        if not c.nullable and c.default is not None and c.name in SESSION_FIELDS
    },
    # (after the columns' defaults: started_at's is the time of the insert, a function)
    "source": "unknown",
    "started_at": 0.0,
}
#: Types of values a session cannot hold: BLOBs, and text that is not UTF-8.
_BINARY = frozenset({bytes, NotUtf8})


def _session_problem(names: Sequence[str], row: Sequence[Any]) -> str | None:
    """Why a sessions row (its ``names`` columns, the id first) cannot be stored, or None."""
    if not _BINARY.isdisjoint(map(type, row)):
        name, value = next((n, v) for n, v in zip(names, row, strict=True) if type(v) in _BINARY)
        held = "text that is not valid UTF-8" if type(value) is NotUtf8 else "a BLOB, not text"
        return f"its column {name!r} holds {held}"
    try:
        check_session_id(row[0])
    except InvalidSessionError as exc:
        return str(exc)
    return None


def _shown(value: Any) -> str:
    """A source value as a report names it (bytes decoded, what is not UTF-8 replaced)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _quoted(name: str) -> str:
    return '"{}"'.format(name.replace('"', '""'))


@dataclass(frozen=True)
class MessageColumns:
    """How a Hermes messages table is read: the queries, and the dict each row becomes."""

    names: tuple[str, ...]
    read_one: str
    read_many: str
    json_keys: tuple[str, ...]
    bool_keys: tuple[str, ...]

    @classmethod
    def of(cls, columns: Sequence[str]) -> MessageColumns:
        """For a messages table of ``columns`` (any schema version)."""
        names = tuple(c for c in columns if c not in ("id", "session_id"))
        head = f"SELECT {', '.join(map(_quoted, names))} FROM messages WHERE session_id = ?"
        return cls(
            names,
            f"{head} ORDER BY id LIMIT 1 OFFSET ?",
            f"{head} ORDER BY id LIMIT ? OFFSET ?",
            tuple(c for c in names if c in _JSON_MESSAGE),
            tuple(c for c in names if c in _BOOL_MESSAGE),
        )

    def message(self, row: Sequence[Any]) -> dict[str, Any]:
        """The message dict of a row of ``read_one``/``read_many``.

        NULL columns are left out, but ``content`` is always there.
        """
        # Every column as is, then the few that need converting.
        message = {k: v for k, v in zip(self.names, row, strict=True) if v is not None}
        content = message.get("content")
        if content is None:
            message["content"] = None
        elif isinstance(content, str) and content.startswith(CONTENT_JSON_PREFIX):
            parts = _parsed_json(content[len(CONTENT_JSON_PREFIX) :])
            # A list of parts is content a message holds; any other JSON (a dict)
            # stays the text Hermes wrote, which the SessionDB adapter reads back
            # decoded, as Hermes does.
            if isinstance(parts, list):
                message["content"] = parts
        for key in self.json_keys:
            value = message.get(key)
            if value is not None:
                message[key] = _parsed_json(value)
        for key in self.bool_keys:
            value = message.get(key)
            if value is not None and not isinstance(value, bytes):  # bytes: refused as they are
                message[key] = bool(value)
        return message


class _Tail(Sequence[dict[str, Any]]):
    """A conversation of ``offset + len(batch)`` messages of which only the tail is at hand.

    ``flush`` reads the message at the stored cursor minus one (to check the
    history continues) and the ones after it; this sequence holds exactly those.
    """

    def __init__(self, offset: int, before: dict[str, Any] | None, batch: list[dict[str, Any]]):
        self._offset, self._before, self._batch = offset, before, batch

    def __len__(self) -> int:
        return self._offset + len(self._batch)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if index >= self._offset:
            return self._batch[index - self._offset]
        if index == self._offset - 1 and self._before is not None:
            return self._before
        raise _NotRead(f"message {index} was not read from the source")


class _NotRead(IndexError):
    """A flush asked a :class:`_Tail` for a message before it: another writer cut the session."""


@dataclass
class _Progress:
    out: TextIO
    total_sessions: int
    total_messages: int
    sessions: int = 0
    messages: int = 0
    started: float = field(default_factory=time.monotonic)
    last: float = 0.0

    def update(self, *, sessions: int = 0, messages: int = 0, final: bool = False) -> None:
        self.sessions += sessions
        self.messages += messages
        now = time.monotonic()
        isatty = getattr(self.out, "isatty", None)
        tty = bool(isatty()) if callable(isatty) else False
        if not final and now - self.last < (0.1 if tty else 5.0):
            return
        self.last = now
        rate = self.messages / max(now - self.started, 1e-9)
        line = (
            f"sessions {self.sessions:,}/{self.total_sessions:,}  "
            f"messages {self.messages:,}/{self.total_messages:,}  {rate:,.0f} msg/s"
        )
        if tty:
            done = self.messages / self.total_messages if self.total_messages else 1.0
            bar = "#" * int(done * 30)
            self.out.write(f"\r[{bar:<30}] {line}")
            if final:
                self.out.write("\n")
        else:
            self.out.write(line + "\n")
        flush = getattr(self.out, "flush", None)
        if callable(flush):
            flush()


#: The largest ``batch`` of :func:`import_state_db` (messages per transaction).
BATCH_MAX = 1_000_000


#: A URL's beginning (``scheme:/``, blanks before it), which a state.db path does not hold
#: (a drive letter, ``C:/``, is no scheme: a scheme here is two characters or more).
_LOOKS_LIKE_A_URL = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]+:/")


def _check_import(source: Any, destination: Any, progress: Any, batch: Any, on_batch: Any) -> None:
    """Refuse :func:`import_state_db` arguments it cannot use, with what they must be."""
    if not isinstance(source, str | os.PathLike) or isinstance(os.fspath(source), bytes):
        raise InvalidArgumentError(
            f"source must be the path of a Hermes state.db (a str or Path), got "
            f"{type(source).__name__}"
        )
    if not os.fspath(source):
        raise InvalidArgumentError("source is an empty path: name the Hermes state.db")
    try:
        if "\x00" in os.fsencode(source).decode("utf-8", "surrogateescape"):
            raise ValueError("NUL")
    except (UnicodeError, ValueError):
        raise InvalidArgumentError(
            _dialects.redact(f"source {str(source)!r} is no file name (a NUL, or a lone surrogate)")
        ) from None
    given = os.fsdecode(source)
    if (url := _LOOKS_LIKE_A_URL.match(given)) and not os.path.exists(given):
        # Named by its scheme alone: what follows may hold a password in any form.
        raise InvalidArgumentError(
            f"source is a URL ({url[0].strip()}...), not the path of a Hermes state.db (the "
            "destination goes after it: `hermes-orm import PATH --url URL`)"
        )
    if not isinstance(destination, SessionStore | str | URL | Engine):
        raise InvalidArgumentError(
            "destination must be a SessionStore, a database URL or an Engine, got "
            f"{type(destination).__name__}"
        )
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= BATCH_MAX:
        raise InvalidArgumentError(f"batch must be an int from 1 to {BATCH_MAX:,}, got {batch!r}")
    if progress is not None and not callable(getattr(progress, "write", None)):
        raise InvalidArgumentError(
            f"progress must be None or a text stream (with a write method), got "
            f"{type(progress).__name__}"
        )
    if on_batch is not None and not callable(on_batch):
        raise InvalidArgumentError(
            f"on_batch must be None or a callable, got {type(on_batch).__name__}"
        )


def import_state_db(
    source: str | Path,
    destination: SessionStore | str | URL | Engine,
    *,
    progress: TextIO | None = None,
    batch: int = BATCH,
    on_batch: Callable[[str, int], None] | None = None,
    restore_deleted: bool = False,
) -> ImportReport:
    """Copy every session, message and per-model usage row of a Hermes state.db.

    Hermes' settings (``state_meta``), gateway routing and Telegram topic tables
    come too (see :mod:`hermes_orm.integrations.hermes._side_tables`). A session
    an earlier import saw that the destination deleted since is not copied
    again (``report.deleted_sessions``), nor is a row of those tables
    (``report.deleted_rows``; see :mod:`._seen`).

    Args:
        source: Path of the Hermes ``state.db`` (read-only; never modified).
        destination: A :class:`SessionStore`, or a database URL or an Engine
            (migrated to head).
        progress: Where to show progress (a bar on a terminal, lines otherwise).
        batch: Messages per transaction (fewer once they hold :data:`BATCH_BYTES`).
        on_batch: Called after each committed batch with (session id, cursor).
        restore_deleted: Copy the sessions and rows deleted since an earlier import too.

    Returns:
        What was written and the verification of source against destination.

    Raises:
        InvalidArgumentError: ``source`` is no path, ``destination`` no store,
            URL or Engine, ``batch`` no int from 1 to 1,000,000, ``progress``
            has no ``write``, ``on_batch`` is not callable, or
            ``restore_deleted`` no bool: before anything is read or written.
    """
    _check_import(source, destination, progress, batch, on_batch)
    if not isinstance(restore_deleted, bool):
        raise InvalidArgumentError(
            f"restore_deleted must be a bool, got {type(restore_deleted).__name__}"
        )
    started = time.monotonic()
    # Whatever makes the source unreadable, and a destination that is the source
    # itself, is found before anything is written.
    src = open_source(source)
    store: SessionStore | None = None
    report = ImportReport()
    try:
        _refuse_same_file(src, destination)
        store = destination if isinstance(destination, SessionStore) else SessionStore(destination)
        if not isinstance(destination, SessionStore):
            store.upgrade()
        rows = session_rows(src, report)
        listed = {*(r["id"] for r in rows), *report.invalid_sessions}  # the source's, then
        recorded, deleted = seen_sessions(store, [r["id"] for r in rows])
        if not restore_deleted and deleted:
            gone = set(deleted)
            report.deleted_sessions = [r["id"] for r in rows if r["id"] in gone]
            rows = [r for r in rows if r["id"] not in gone]
        if _has_table(src, "session_model_usage"):
            # A session whose usage rows the store cannot hold is left as it is, whole
            # (before the links are made: a child's link to it goes to its extra).
            unusable = _usage_problems(src, {r["id"] for r in rows})
            report.invalid_sessions.update(unusable)
            rows = [r for r in rows if r["id"] not in unusable]
        sessions = _linked(_without_orphans(store, rows, report), report)
        total = int(src.execute("SELECT count(*) FROM messages")[0][0])
        bar = _Progress(progress, len(sessions), total) if progress is not None else None
        ids = [r["id"] for r in sessions]
        by_id = {r["id"]: r for r in sessions}
        cursors, histories = _cursors(store, ids)  # what the sessions' upsert leaves as it is
        # The history_id of each session this run makes, drawn now: its batches past
        # the first check it, as those of the sessions held check theirs.
        drawn = {sid: new_history_id() for sid in ids if sid not in histories}
        job = ReadJob(
            src.path,
            store.engine.dialect.name,
            ids,
            cursors,
            batch,
            BATCH_BYTES,
            {**histories, **drawn},
        )
        # About what is left to copy (sessions the destination holds more of make it low).
        remaining = total - sum(c.cursor for c in cursors.values())
        _log.info(
            "importing %s: %d sessions, %d messages (%d stored already)",
            src.path,
            len(sessions),
            total,
            total - remaining,
        )
        reading = _read_in_process if remaining >= PROCESS_READER_FROM else _read_in_thread
        seen = {sid: c.cursor for sid, c in cursors.items()}
        titled_later: set[str] = set()  # new sessions whose title the second upsert sets
        # The reader starts first: it reads the first batches while new sessions are written.
        with reading(job) as batches:
            report.sessions_written = _upsert_sessions(
                store, sessions, report, new_only=True, histories=drawn, titled_later=titled_later
            )
            _copy_messages(
                store,
                src,
                batches,
                bar=bar,
                on_batch=on_batch,
                report=report,
                seen=seen,
                histories=job.histories,
            )
        held = [sid for sid in report.diverged_sessions if cursors.get(sid, _NOTHING_COPIED)[0]]
        as_before: set[str] = set()  # up to date, their copies kept as Hermes added to them
        for sid in held:
            theirs = _source_messages(src, sid)
            if _continued_by_mirror(store, theirs, sid) or _revised_by_mirror(store, theirs, sid):
                report.diverged_sessions.remove(sid)
                report.mirrored_sessions.append(sid)
                continue
            written = _continue_earlier_copies(store, theirs, sid)
            if written is not None:  # (none written: copied by an earlier run, up to date)
                report.diverged_sessions.remove(sid)
                if written:
                    report.amended_sessions.append(sid)
                    report.messages_written += written
                else:
                    as_before.add(sid)
        # A session not copied (diverged, invalid, the mirror's) is left as it is, row and usage;
        # the rows of new ones found invalid with their messages go (none was written), and
        # so do those an interrupted run made of them: empty, as this run would write them.
        invalid = [sid for sid in report.invalid_sessions if sid in ids]
        report.sessions_written -= _forget_new(
            store,
            {sid: (by_id[sid], drawn[sid]) for sid in invalid if sid not in cursors},
            {sid: by_id[sid] for sid in invalid if sid in cursors and not cursors[sid].cursor},
        )
        left = {*report.diverged_sessions, *report.invalid_sessions, *report.mirrored_sessions}
        report.sessions_written += _upsert_sessions(
            store, sessions, report, skip=left, titled_later=titled_later
        )
        if _has_table(src, "session_model_usage"):
            report.usage_written = _upsert_usage(store, src, {*ids} - left)
        side = copy_side_tables(store, src, report, restore_deleted=restore_deleted)
        record_seen(store, [sid for sid in ids if sid not in recorded])
        if bar is not None:
            bar.update(final=True)
        _verify(store, src, ids, seen, report, as_before=as_before, listed=listed)
        report.counts.update((name, TableCount(*pair)) for name, pair in side.items())
    finally:
        src.close()
        if store is not None and not isinstance(destination, SessionStore):
            store.close()
    report.seconds = time.monotonic() - started
    _log.log(
        logging.INFO if report.ok else logging.WARNING,
        "import of %s %s in %.1f s: %d sessions, %d messages, %d usage rows written; "
        "%d diverged, %d invalid, %d mismatched",
        source,
        "verified" if report.ok else "NOT verified",
        report.seconds,
        report.sessions_written,
        report.messages_written,
        report.usage_written,
        len(report.diverged_sessions),
        len(report.invalid_sessions),
        len(report.mismatched_sessions),
    )
    return report


def _parents_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order sessions so that every parent is written before its children."""
    by_id = {r["id"]: r for r in rows}
    ordered: list[dict[str, Any]] = []
    seen: set[str] = set()

    def visit(row: dict[str, Any]) -> None:
        chain = []
        while row["id"] not in seen:
            seen.add(row["id"])
            chain.append(row)
            parent = row.get("parent_session_id")
            if parent is None or parent not in by_id:
                break
            row = by_id[parent]
        ordered.extend(reversed(chain))

    for row in rows:
        visit(row)
    return ordered


def _loop_closers(rows: list[dict[str, Any]]) -> set[str]:
    """The sessions whose parent link closes a loop of parents (one a loop, ``a`` of ``a -> a``).

    Hermes' own ``create_session`` lets a session be its own parent, and its
    upsert lets ``a -> b -> a`` happen; hermes_orm's lineage never loops.
    """
    by_id = {r["id"]: r for r in rows}
    walked: set[str] = set()
    closers: set[str] = set()
    for first in rows:
        chain: set[str] = set()
        row = first
        while row["id"] not in walked:
            walked.add(row["id"])
            chain.add(row["id"])
            parent = row.get("parent_session_id")
            if parent is None or parent not in by_id:
                break
            if parent in chain:
                closers.add(row["id"])
                break
            row = by_id[parent]
    return closers


def _linked(rows: list[dict[str, Any]], report: ImportReport | None = None) -> list[dict[str, Any]]:
    """The sessions parents first; a parent link that dangles or loops is kept in extra.

    A link to a session not among them (its row is gone), or one that closes
    a loop of parents, is no foreign key: it goes to the session's
    ``extra["parent_session_id"]`` (a loop's, reported in ``report``).
    """
    ids = {r["id"] for r in rows}
    closers = _loop_closers(rows)
    ordered = _parents_first(rows)
    for fields in ordered:
        parent = fields.get("parent_session_id")
        if parent is not None and (parent not in ids or fields["id"] in closers):
            fields["extra"] = {**(fields["extra"] or {}), "parent_session_id": parent}
            fields["parent_session_id"] = None
            if fields["id"] in closers and report is not None:
                report.unlooped_sessions.append(fields["id"])
    return ordered


def _upsert_sessions(
    store: SessionStore,
    rows: list[dict[str, Any]],
    report: ImportReport | None = None,
    *,
    new_only: bool = False,
    histories: Mapping[str, int] | None = None,
    skip: Collection[str] = (),
    titled_later: set[str] | None = None,
) -> int:
    """Insert new sessions and update changed ones; returns how many rows were written.

    ``rows`` are :func:`_linked`'s. With ``new_only``, only the sessions the
    destination lacks are inserted (before their messages), those whose title
    the destination holds yet without it (added to ``titled_later``); a second
    call, once the messages are copied, updates the others, but those in
    ``skip``, and sets those titles (their rows not counted again). It inserts
    none: one the destination no longer holds was deleted as the import ran
    (:func:`_verify` reports it).

    Titles are unique: the titles that change are cleared first, then set, in
    one transaction, so sessions may swap or pass on titles. A title that a
    session of the destination the import does not update holds is kept in
    the imported session's ``extra`` instead, and reported.
    """
    wanted = {f["id"]: f for f in rows if f["id"] not in skip}

    def work(conn: Connection) -> int:
        # A parent link another writer sets is not written meanwhile (it waits, then
        # looks for a loop with this import's links). A session made meanwhile is
        # left to its writer (see _insert_sessions); a title taken meanwhile, below.
        take_lineage_turn(conn)
        present = held_sessions(conn, list(wanted))
        titles = {f["title"]: sid for sid, f in wanted.items() if f.get("title") is not None}
        # Who holds each title now; a holder the import updates gives it up below.
        holders = dict(_dialects.rows_for_values(conn, _TITLE_HOLDERS, list(titles)))
        held = {title: holder for holder, title in holders.items()}
        todo = {}
        taken = []
        for sid, fields in wanted.items():
            if new_only and sid in present:
                continue
            todo[sid] = fields
            title = fields.get("title")
            holder = held.get(title)
            if holder is None or holder == sid:
                continue
            if new_only:  # set by the second call, once its holder let it go
                todo[sid] = {**fields, "title": None}
                if titled_later is not None:
                    titled_later.add(sid)
            elif holder not in wanted:
                taken.append(sid)
                todo[sid] = {
                    **fields,
                    "title": None,
                    "extra": {**(fields["extra"] or {}), "title": title},
                }
        if not new_only and report is not None:
            report.retitled_sessions = sorted(taken)
        # The rows the destination holds (typed, to compare).
        existing = {}
        update = [sid for sid in todo if sid in present]
        for chunk in _dialects.in_parts(update):
            for r in conn.execute(select(_sessions).where(_sessions.c.id.in_(chunk))):
                existing[r.id] = r._mapping
        # One statement each, run for many rows: every row has the same keys.
        drawn = histories or {}
        new = [
            {**f, "history_id": drawn[sid]} if sid in drawn else f
            for sid, f in todo.items()
            if sid not in present and new_only
        ]
        changed = [
            {"b_id": sid, **f}
            for sid, f in todo.items()
            if sid in existing and any(existing[sid][k] != v for k, v in f.items())
        ]
        # Cleared first, so the order of the updates never matters.
        cleared = [
            c["b_id"] for c in changed if existing[c["b_id"]]["title"] not in (None, c["title"])
        ]
        for chunk in _dialects.in_parts(cleared):
            conn.execute(_sessions.update().where(_sessions.c.id.in_(chunk)).values(title=None))
        inserted = _insert_sessions(conn, new) if new else 0
        if changed:
            keys = [k for k in changed[0] if k not in ("b_id", "id")]
            conn.execute(
                _sessions.update()
                .where(_sessions.c.id == bindparam("b_id"))
                .values({k: bindparam(k) for k in keys}),
                changed,
            )
        again = titled_later or set()
        return inserted + sum(1 for c in changed if c["b_id"] not in again)

    if not wanted:
        return 0
    # A title taken since the transaction read who holds them: read again, and keep it
    # in extra, as one held before.
    return on_title_races(lambda: store.write_transaction(work))


_TITLE_HOLDERS = f"SELECT id, title FROM {_sessions.name} WHERE title IN ({{values}})"


#: Of the sessions a destination lacks, those some of whose messages it holds
#: (their session row deleted with SQLite's foreign keys off): orphans.
_ORPHANED = f"SELECT DISTINCT session_id FROM {_messages.name} WHERE session_id IN ({{values}})"


def _without_orphans(
    store: SessionStore, rows: list[dict[str, Any]], report: ImportReport
) -> list[dict[str, Any]]:
    """``rows`` but the sessions the destination lacks and holds messages of (reported invalid).

    Such messages would read as the imported session's (the store's API
    refuses to create their session alike: :func:`hermes_orm.store.refuse_orphans`).
    """

    def work(conn: Connection) -> set[str]:
        ids = [r["id"] for r in rows]
        present = held_sessions(conn, ids)
        missing = [sid for sid in ids if sid not in present]
        return {sid for (sid,) in _dialects.rows_for_values(conn, _ORPHANED, missing)}

    orphaned = store.read_transaction(work)
    for sid in orphaned:
        report.invalid_sessions[sid] = (
            "the destination holds messages of a deleted session of that id (their session "
            "row was deleted with foreign keys off): delete them, or restore their session row"
        )
    return [r for r in rows if r["id"] not in orphaned]


def _insert_sessions(conn: Connection, rows: list[dict[str, Any]]) -> int:
    """INSERT new session rows (all with the same keys), many a statement; how many went in.

    Each value goes through its column's bind processor (JSON documents,
    booleans), so the driver gets what ``conn.execute(insert, rows)`` would
    give it, without that call's per-row cost: most of the time an import of
    tens of thousands of sessions spent writing them.

    On PostgreSQL, a session another writer made since this transaction read
    which ones exist (each statement sees its own moment) is left as that
    writer made it: its messages are then copied, or reported diverged, as
    those of a session the destination held before. (On SQLite the write
    lock the transaction began with keeps other writers out.)
    """
    # Each a history of its own (see Session.history_id), drawn here where the caller
    # drew none (no default runs), last in every row: all hold the same keys.
    rows = [
        {
            **{k: v for k, v in row.items() if k != "history_id"},
            "history_id": row.get("history_id") or new_history_id(),
        }
        for row in rows
    ]
    keys = list(rows[0])
    dialect = conn.dialect
    processors = [
        (i, processor)
        for i, key in enumerate(keys)
        if (processor := _sessions.c[key].type.dialect_impl(dialect).bind_processor(dialect))
    ]
    # The keys are our column names (session_fields' output): plain identifiers.
    head, row_marks, per_statement = _dialects.rows_insert(dialect.name, _sessions.name, keys)
    tail = " ON CONFLICT (id) DO NOTHING" if dialect.name == "postgresql" else ""
    written = 0
    for start in range(0, len(rows), per_statement):
        part = rows[start : start + per_statement]
        params: list[Any] = []
        for row in part:
            values = list(row.values())
            for i, processor in processors:
                values[i] = processor(values[i])
            params += values
        statement = head + ", ".join([row_marks] * len(part)) + tail
        written += _dialects.execute_driver_sql(conn, statement, params)
    return written


@dataclass(frozen=True)
class _Batch:
    """One transaction's worth of messages, read, encoded and rendered by the reader.

    ``pieces`` names each session's part: (session id, cursor, how many).
    """

    pieces: list[tuple[str, int, int]]
    prepared: PreparedWrite | None
    sessions_done: int
    invalid: dict[str, str]
    diverged: list[str]


@dataclass(frozen=True)
class ReadJob:
    """What the reader needs: it opens the source itself, in its thread or process."""

    source: Path
    dialect: str
    session_ids: list[str]
    cursors: dict[str, Copied]
    batch: int
    #: A batch's bound in characters of text (see :data:`BATCH_BYTES`).
    batch_bytes: int
    #: Each session's history_id: as read (those held), as drawn (those made).
    histories: dict[str, int]


def read_batches(job: ReadJob, stopping: threading.Event | None = None) -> Iterator[_Batch]:
    """Read and encode what each session lacks, and render the statements that write it.

    ``stopping``: set as the import ends early (an interrupt); a long check of
    one session then ends without its answer, as nothing more is taken.
    """
    src = open_source(job.source)
    sql = flush_sql(job.dialect)
    scratch = ImportReport()
    try:
        for group, finished in _read_groups(
            src,
            job.session_ids,
            job.cursors,
            job.histories,
            batch=job.batch,
            batch_bytes=job.batch_bytes,
            report=scratch,
            stopping=stopping,
        ):
            yield _Batch(
                [(chunk.session_id, chunk.cursor, len(chunk.messages)) for chunk in group],
                prepare_many(sql, group) if group else None,
                finished,
                dict(scratch.invalid_sessions),
                list(scratch.diverged_sessions),
            )
            scratch.invalid_sessions.clear()
            scratch.diverged_sessions.clear()
    finally:
        src.close()


#: Messages to copy from which the reader runs in a process of its own.
PROCESS_READER_FROM = 50_000


def _copy_messages(
    store: SessionStore,
    src: Source,
    batches: Iterator[_Batch],
    *,
    bar: _Progress | None,
    on_batch: Callable[[str, int], None] | None,
    report: ImportReport,
    seen: dict[str, int],
    histories: dict[str, int],
) -> None:
    """Write the reader's batches: what the destination does not hold yet, a transaction each.

    ``histories``: each session's history_id as the run began (or as it made
    the session). One found with another is written on only if its messages
    below the cursor are still the source's (another run made or wrote it);
    else (rewritten, made anew) it is reported as diverged.

    ``seen`` gets, for each session the reader read messages of, how many the
    source held as far as the reader read it.

    Short sessions share a transaction; a long one takes several. Each
    transaction is whole or nothing, and the cursors say where a re-run resumes.
    A transaction first writes on the cursors read at the start, each checked
    by the cursor's compare-and-swap; if any moved (another writer), it is
    rolled back and written again reading each cursor under its row lock.

    Reading the source and encoding the messages run ahead of the writer, in a
    thread, or, when :data:`PROCESS_READER_FROM` messages or more are to be
    copied, in a child process: that Python work then runs on another core instead of
    taking turns with the writer's for the interpreter lock.
    """
    columns = MessageColumns.of(src.columns("messages"))

    def on_cursors(item: _Batch, prepared: PreparedWrite) -> Callable[[Connection], list[Any]]:
        def work(conn: Connection) -> list[tuple[str, int, int]]:
            try:
                write_prepared(conn, prepared)
            except IntegrityError:
                raise CursorMoved from None
            return [(sid, count, cursor + count) for sid, cursor, count in item.pieces]

        return work

    def locked(item: _Batch) -> Callable[[Connection], list[tuple[str, int, int]]]:
        # Read again from the source: the reader sends statements, not messages.
        tails = []
        for sid, cursor, n in item.pieces:
            with src.snapshot():
                tails.append((sid, cursor, _source_tail(src, columns, sid, cursor, n)))

        def work(conn: Connection) -> list[tuple[str, int, int]]:
            done = []
            for sid, cursor, tail in tails:
                stored = store.locked_cursor(conn, sid) if cursor else None
                if stored is not None and stored.history_id != histories[sid]:
                    if not _holds_source_prefix(conn, src, columns, sid, cursor):
                        # Rewritten or made anew since its messages were checked (Hermes'
                        # store mode, another tool): the tail continues another history.
                        done.append((sid, -1, -1))
                        continue
                    # The source's messages (another run made or wrote it): its history_id is
                    # the one checked from now on (by the reader's batches too, as a thread).
                    histories[sid] = stored.history_id
                try:
                    # The tail holds the source's messages from the one below the
                    # stored cursor on: that one is what is checked (the reader
                    # checked those up to the cursor it read; another writer
                    # stored the rest since, from the same source).
                    result = store.flush_in(conn, sid, tail, verify="last")[0]
                except (HistoryDivergedError, _NotRead, SessionNotFoundError):
                    # Raised before this session wrote anything: another writer
                    # rewrote, cut or deleted it since it was read. It is left
                    # as it is, reported as diverged once committed (a run
                    # after copies a cut session from where it stands).
                    done.append((sid, -1, -1))
                    continue
                done.append((sid, result.written, result.cursor))
            return done

        return work

    for item in batches:
        seen.update((sid, cursor + n) for sid, cursor, n in item.pieces)
        report.invalid_sessions.update(item.invalid)
        report.diverged_sessions.extend(item.diverged)
        if item.prepared is not None:
            try:
                done = store.write_transaction(on_cursors(item, item.prepared))
            except CursorMoved:
                done = store.write_transaction(locked(item))
            for sid, written, cursor in done:
                if written < 0:
                    if sid not in report.diverged_sessions:  # once, whatever the batches
                        report.diverged_sessions.append(sid)
                    continue
                report.messages_written += written
                if on_batch is not None:
                    on_batch(sid, cursor)
        if bar is not None:
            bar.update(messages=sum(n for _, _, n in item.pieces), sessions=item.sessions_done)


def _source_messages(src: Source, sid: str) -> list[dict[str, Any]]:
    """Every message of the source's session ``sid``, read as of one moment."""
    columns = MessageColumns.of(src.columns("messages"))
    with src.snapshot():
        rows = src.execute(columns.read_many, (sid, -1, 0))  # all (a diverged session's only)
    return [columns.message(r) for r in rows]


def _continued_by_mirror(store: SessionStore, source: list[dict[str, Any]], sid: str) -> bool:
    """Whether the destination's copy of ``sid`` differs from the source only by the mirror.

    The import's own rows are the source's, digest for digest; the Hermes
    mirror plugin stores the rows after them as the agent had them. So the
    stored messages must match the source's digests up to some message, and
    from there on each be the same turn as the source's (``same_turn``: role,
    content, tool calls and their ids) in another form than the import's
    (which carries every column of Hermes' row, but an ``api_content`` Hermes
    may add later): then the mirror continued the session, and it is up to date.
    ``source``: the source's messages of the session (:func:`_source_messages`).
    """
    stored = store.read_transaction(
        lambda conn: [
            bytes(d)
            for (d,) in conn.execute(
                select(_messages.c.digest)
                .where(_messages.c.session_id == sid)
                .order_by(_messages.c.idx)
            )
        ]
    )
    if not stored:
        return False
    try:
        theirs = [_codec.message_digest(m) for m in source]
    except InvalidMessageError:
        return False
    start = next(
        (i for i, (a, b) in enumerate(zip(theirs, stored, strict=False)) if a != b),
        min(len(theirs), len(stored)),
    )
    if start == len(stored):
        return False
    mirrored = store.primary_messages(sid, offset=start)
    if len(mirrored) != len(stored) - start:
        return False
    # The mirror stores the agent's list, which has no session_meta row (the one
    # Hermes' gateway opens a session with): such rows pair with nothing.
    ours = [(j, m) for j, m in enumerate(mirrored, start) if m["role"] != "session_meta"]
    hermes = [(i, m) for i, m in enumerate(source[start:], start) if m["role"] != "session_meta"]
    return 0 < len(ours) <= len(hermes) and all(
        theirs[i] != stored[j]
        and set(theirs_message).difference(our_message, _ADDED_IN_PLACE)  # no copy of ours
        and not _import_copy(theirs_message, our_message)
        and same_turn(theirs_message, our_message)
        for (i, theirs_message), (j, our_message) in zip(hermes, ours, strict=False)
    )


def _revised_by_mirror(store: SessionStore, source: list[dict[str, Any]], sid: str) -> bool:
    """Whether the Hermes mirror plugin holds ``sid``'s history on, in revisions of its own.

    When Hermes compacts a session in place, it keeps the rows it summarised
    (flagged) and appends the new ones; the plugin ends the stored session as
    ``rewritten`` and keeps the agent's new list as ``ID#2`` (then ``#3``...).
    The stored rows, the import's copies among them, then no longer match the
    source's flags, but the session is up to date, as one the plugin continued
    is, when the revisions one after another hold the source's messages, each
    the same turn at its place (the last ones may still be to come, as there):
    content edited since, or messages in neither revision, are a divergence.
    ``source``: the source's messages of the session.
    """
    row = store.get_session(sid)
    if row is None or row["end_reason"] != "rewritten":
        return False
    revisions = [sid]
    while (revision := revision_row(store, sid, len(revisions) + 1)) is not None:
        extra = revision["extra"]
        if not isinstance(extra, dict) or extra.get("hermes_session_id") != sid:
            return False
        revisions.append(revision["id"])
    if len(revisions) < 2:
        return False
    # The agent's lists, which the plugin stores, have no session_meta row.
    ours = [
        m for rev in revisions for m in store.primary_messages(rev) if m["role"] != "session_meta"
    ]
    hermes = [m for m in source if m["role"] != "session_meta"]
    return 0 < len(ours) <= len(hermes) and all(map(same_turn, hermes, ours))


#: Message columns Hermes may fill in on a row it stored before (the import's copy lacks them).
_ADDED_IN_PLACE = ("api_content",)


def _continue_earlier_copies(
    store: SessionStore, source: list[dict[str, Any]], sid: str
) -> int | None:
    """Copy what follows the stored messages of ``sid`` if each is an :func:`_earlier_copy`.

    ``source``: the source's messages of the session. The stored copies stay as
    they are (a stored message never changes), and the source's messages after
    them are flushed as an import copies them; returns how many, or None (the
    session is left as it is: diverged; or deleted meanwhile).
    """
    try:
        stored = store.primary_messages(sid)
    except SessionNotFoundError:
        return None  # (another writer deleted it as the import ran)
    if not stored or len(source) < len(stored):
        return None
    if not all(map(_earlier_copy, source, stored)):
        return None
    tail = _Tail(len(stored), stored[-1], source[len(stored) :])
    try:
        return store.flush(sid, tail, verify="last").written
    except (HistoryDivergedError, InvalidMessageError, SessionNotFoundError):
        return None  # another writer changed it meanwhile, or a message cannot be stored


#: Keys Hermes adds to a row it stored before, and whether a value there means
#: what the key's absence meant (a live row): an upgrade adds ``active`` (1),
#: ``compacted`` (0) and ``observed`` (0), or fills a NULL ``active`` with 1;
#: ``api_content`` is filled in.
_ADDED_AS_BEFORE: dict[str, Callable[[Any], bool]] = {
    "active": lambda value: value is True,
    "compacted": lambda value: value is False,
    "observed": lambda value: value is False,
    "api_content": lambda value: True,
}


def _import_copy(source: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Whether ``stored`` is an import's copy of the ``source`` row as it was, not the mirror's.

    An import copies every column the row had, its timestamp (NOT NULL in
    Hermes) included, where the agent's list, which the mirror stores, has
    none; such a copy holds the source's value at each of its keys (the
    source may hold keys more: columns Hermes added since).
    """
    return "timestamp" in stored and all(
        key in source and source[key] == value for key, value in stored.items()
    )


def _earlier_copy(source: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Whether ``stored`` is an :func:`_import_copy` of ``source`` that still stands for it.

    The source's keys beyond the copy's must be ones Hermes adds in place,
    holding what their absence meant (:data:`_ADDED_AS_BEFORE`): a row Hermes
    since withdrew (``active`` 0: a rewind, a compaction) is not what its copy says.
    """
    return _import_copy(source, stored) and all(
        key in _ADDED_AS_BEFORE and _ADDED_AS_BEFORE[key](value)
        for key, value in source.items()
        if key not in stored
    )


def _source_tail(
    src: Source, columns: MessageColumns, session_id: str, cursor: int, count: int
) -> _Tail:
    """The source's messages ``cursor`` to ``cursor + count`` of a session, and the one before."""
    before = None
    if cursor:
        found = src.execute(columns.read_one, (session_id, cursor - 1))
        before = columns.message(found[0]) if found else None
    rows = src.execute(columns.read_many, (session_id, count, cursor))
    return _Tail(cursor, before, [columns.message(r) for r in rows])


#: Batches read and encoded ahead of the writer.
_READ_AHEAD = 2
_READER_MODULE = "hermes_orm.integrations.hermes._reader"
#: What reading the reader's pipe raises when the child is gone or its output is garbled.
_PIPE_BROKEN = (EOFError, pickle.UnpicklingError, OSError)


@contextlib.contextmanager
def _read_in_thread(job: ReadJob) -> Iterator[Iterator[_Batch]]:
    """Run :func:`read_batches` in a thread, from now until the block ends."""
    stopping = threading.Event()
    with _read_ahead(read_batches(job, stopping), on_stop=stopping.set) as batches:
        yield batches


@contextlib.contextmanager
def _read_in_process(job: ReadJob) -> Iterator[Iterator[_Batch]]:
    """Run :func:`read_batches` in a child Python (``python -m`` of our reader module).

    The child starts at once (its start-up overlaps whatever the block does
    first). The job goes to its stdin and the batches come back on its stdout
    (:func:`write_frame`), through a thread that reads ahead of the writer.
    The child is killed when the block ends, however it ends; if the importing
    process dies, the child's next write to the closed pipe ends it.

    A child that ends before its first batch (``sys.executable`` cannot import
    hermes_orm: an embedded interpreter, a path added at run time) is not an
    error: that thread reads the source itself, as for a small import, and a
    warning logs what the child wrote to stderr. A child that ends later is a
    :class:`StateDbError` carrying the same.
    """
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", _READER_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        into, out = proc.stdin, proc.stdout
        stopping = threading.Event()

        def stop() -> None:
            stopping.set()
            proc.kill()

        def batches() -> Iterator[_Batch]:
            try:
                with into:
                    pickle.dump(job, into)
                kind, payload = _read_frame(out)
            except _PIPE_BROKEN:
                if stopping.is_set():  # killed as the import ended (an interrupt): no fallback
                    return
                said = _said(proc, errors)
                _log.warning("the import's reader process did not start (%s); reading here", said)
                yield from read_batches(job, stopping)
                return
            while kind == "batch":
                yield payload
                try:
                    kind, payload = _read_frame(out)
                except _PIPE_BROKEN as exc:
                    said = _said(proc, errors)
                    raise StateDbError(
                        f"the import's reader process stopped ({said}): {exc!r}"
                    ) from None
            if kind == "error":
                raise payload

        try:
            with _read_ahead(batches(), on_stop=stop) as items:
                yield items
        finally:
            proc.kill()
            proc.wait()
            out.close()
            with contextlib.suppress(OSError):  # a job the child never took
                into.close()


def _said(proc: subprocess.Popen[bytes], errors: IO[bytes]) -> str:
    """The exit code of a reader process that ended (or is made to), and the end of its stderr."""
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # alive, but its output made no sense
        proc.kill()
        code = proc.wait()
    errors.seek(0)
    lines = errors.read().decode(errors="replace").strip().splitlines()
    return f"exit code {code}" + (f"; it said: {lines[-1]}" if lines else "")


def write_frame(out: IO[bytes], item: Any) -> None:
    """Write ``item`` pickled, behind its length (8 bytes, little-endian)."""
    data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(len(data).to_bytes(8, "little"))
    out.write(data)
    out.flush()


def _read_frame(inp: IO[bytes]) -> Any:
    """Read one :func:`write_frame` item.

    The whole frame is read first, then unpickled in one call: unpickling
    straight from the pipe took a system call, and a hand-over of the
    interpreter lock with the writing thread, every few kilobytes, which
    held the writer back.

    Raises:
        EOFError: The pipe ended before a whole frame.
    """
    head = inp.read(8)
    if len(head) < 8:
        raise EOFError("the reader's output ended")
    size = int.from_bytes(head, "little")
    data = inp.read(size)
    if len(data) < size:
        raise EOFError("the reader's output ended inside a frame")
    return pickle.loads(data)


@contextlib.contextmanager
def _read_ahead(
    items_in: Iterator[_T], on_stop: Callable[[], None] | None = None
) -> Iterator[Iterator[_T]]:
    """Run ``items_in`` in a thread of its own, up to ``_READ_AHEAD`` items ahead.

    Reading the source and encoding messages is Python work; writing them is
    mostly SQLite work, done without the GIL: the two overlap. The thread
    starts at once and stops when the block ends (an error, an interrupt, or
    the last item taken): it is told to (``on_stop`` too, to end what it
    waits on), and waited for, so no reading goes on once the import has
    returned.
    """
    items: queue.Queue[tuple[bool, Any]] = queue.Queue(_READ_AHEAD)
    stop = threading.Event()

    def put(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items_in:
                if not put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put((False, exc))
            return
        finally:
            if isinstance(items_in, Generator):
                items_in.close()  # what it holds open (the source) is let go here
        put((False, None))

    def take() -> Iterator[_T]:
        while True:
            more, item = items.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item

    reader = threading.Thread(target=read, name="hermes-import-reader", daemon=True)
    reader.start()
    try:
        yield take()
    finally:
        stop.set()
        if on_stop is not None:
            on_stop()
        reader.join()


def _read_groups(
    src: Source,
    session_ids: list[str],
    cursors: dict[str, Copied],
    histories: dict[str, int],
    *,
    batch: int,
    batch_bytes: int,
    report: ImportReport,
    stopping: threading.Event | None = None,
) -> Iterator[tuple[list[Chunk], int]]:
    """Read and encode what each session lacks; yield groups of about ``batch`` messages.

    Each item is a group to write in one transaction and how many sessions
    were finished while reading it; a group also ends once its messages hold
    ``batch_bytes`` characters of text. A session the destination holds messages
    of is first checked: the source's first messages must be those stored
    (their fingerprints match), else it is reported as diverged.

    Each session is read as of one moment (:meth:`Source.snapshot`), however
    many batches it takes: Hermes may rewrite a session in place meanwhile. If
    the source changed between two of its reads (it went live), what was read
    of it before must be what it holds now, else the session is reported as
    diverged, its copy left at what was read before. Where that read holds the
    source's writers off (:meth:`Source.blocks_writers`), a session's groups are
    kept in a :class:`_Spool` and handed on once its read has ended.
    """
    columns = MessageColumns.of(src.columns("messages"))
    group: list[Chunk] = []
    size = held = finished = 0
    for sid in session_ids:
        cursor, stored = cursors.get(sid, _NOTHING_COPIED)
        prefix = functools.partial(
            _checked_prefix, src, columns, sid, batch=batch, max_bytes=batch_bytes
        )
        spool: _Spool | None = None
        with src.snapshot(), contextlib.ExitStack() as spooled:
            generation = src.generation
            fingerprint = _fingerprint()  # of the digests of the messages up to the cursor
            before_digest = None
            if cursor:
                before_digest = prefix(cursor, fingerprint=fingerprint)
                if src.generation != generation:  # read again, as of one moment
                    generation, fingerprint = src.generation, _fingerprint()
                    before_digest = prefix(cursor, fingerprint=fingerprint)
                if before_digest is None or fingerprint.digest() != stored:
                    report.diverged_sessions.append(sid)
                    finished += 1
                    continue
            checked = False
            reading = src.batches(
                columns.read_many, sid, start=cursor, size=batch, max_bytes=batch_bytes
            )
            with contextlib.closing(reading):
                for rows, more in reading:
                    if src.generation != generation:
                        generation = src.generation
                        again = _fingerprint()
                        if cursor and (
                            prefix(cursor, fingerprint=again) is None
                            or again.digest() != fingerprint.digest()
                        ):
                            report.diverged_sessions.append(sid)
                            break
                    if rows:
                        messages = [columns.message(r) for r in rows]
                        problem = None
                        if not checked and more:
                            # Longer than a batch: its first is written before the rest
                            # is read, so all of it is checked first (nothing of an
                            # invalid session is written).
                            problem = _first_problem(
                                src,
                                columns,
                                sid,
                                cursor + len(rows),
                                batch,
                                max_bytes=batch_bytes,
                                stopping=stopping,
                            )
                        checked = True
                        try:
                            encoded = [
                                _codec.encode_message(m, cursor + i) for i, m in enumerate(messages)
                            ]
                        except InvalidMessageError as exc:
                            problem = _not_utf8(messages, cursor) or str(exc)
                        if problem is not None:
                            report.invalid_sessions[sid] = problem
                            break
                        group.append(Chunk(sid, cursor, encoded, before_digest, histories[sid]))
                        for message in encoded:
                            fingerprint.update(message.digest)
                        size += len(rows)
                        held += sum(message.size for message in encoded)
                        cursor, before_digest = cursor + len(rows), encoded[-1].digest
                    if not more:
                        break  # read whole: its snapshot is let go before the group is handed on
                    if size >= batch or held >= batch_bytes:
                        if spool is None and src.blocks_writers():
                            spool = spooled.enter_context(_Spool())
                        if spool is None:
                            yield group, finished
                        elif stopping is not None and stopping.is_set():
                            break  # (nothing more is taken)
                        else:
                            spool.put((group, finished))
                        group, size, held, finished = [], 0, 0, 0
            if spool is not None:
                spooled.pop_all()  # (read back below, once the read transaction has ended)
        if spool is not None:
            with spool:
                yield from spool.items()
        finished += 1
        if size >= batch or held >= batch_bytes:
            yield group, finished
            group, size, held, finished = [], 0, 0, 0
    yield group, finished


class _Spool:
    """Groups of one session kept on disk while the source's read holds its writers off.

    A session is read as of one moment, a read transaction on the source. In
    Hermes' rollback-journal mode that transaction's shared lock keeps every
    Hermes commit waiting; handed on group by group, a long session would hold
    it for as long as the destination takes to write it. Its groups are
    written here instead and handed on once the read has ended: Hermes waits
    for the read alone.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by __exit__)

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._file.close()

    def put(self, item: tuple[list[Chunk], int]) -> None:
        write_frame(self._file, item)  # (framed as the reader process's output is)

    def items(self) -> Iterator[tuple[list[Chunk], int]]:
        self._file.seek(0)
        while True:
            try:
                item = _read_frame(self._file)
            except EOFError:  # (the last one read)
                return
            yield item


def _first_problem(
    src: Source,
    columns: MessageColumns,
    session_id: str,
    start: int,
    batch: int,
    *,
    max_bytes: int,
    stopping: threading.Event | None = None,
) -> str | None:
    """Why a message of the session from ``start`` (1 or more) on cannot be stored, or None.

    Read a batch at a time by one query (:meth:`Source.batches`). Once
    ``stopping`` is set, it ends between two batches (its answer then taken by
    no one).
    """
    reading = src.batches(
        columns.read_many, session_id, start=start, size=batch, max_bytes=max_bytes
    )
    with contextlib.closing(reading):
        for rows, _ in reading:
            messages = [columns.message(r) for r in rows]
            try:
                for i, message in enumerate(messages, start):
                    _codec.encode_message(message, i)
            except InvalidMessageError as exc:
                return _not_utf8(messages, start) or str(exc)
            if stopping is not None and stopping.is_set():
                return None
            start += len(rows)
    return None


def _not_utf8(messages: list[dict[str, Any]], first: int) -> str | None:
    """Which message (``first`` is the first one's position) holds text that is not UTF-8."""
    for i, message in enumerate(messages, first):
        for key, value in message.items():
            if type(value) is NotUtf8:
                return f"message {i}, column {key!r}: text that is not valid UTF-8"
    return None


def _holds_source_prefix(
    conn: Connection, src: Source, columns: MessageColumns, sid: str, cursor: int
) -> bool:
    """Whether the destination's messages of ``sid`` below ``cursor`` are the source's ones.

    Compared by their digests' fingerprints (the stored ones read in ``conn``'s
    transaction, under the session's lock).
    """
    source = _fingerprint()
    with src.snapshot():
        if _checked_prefix(src, columns, sid, cursor, batch=500, fingerprint=source) is None:
            return False
    stored = _fingerprint()
    rows = conn.execute(
        select(_messages.c.digest)
        .where(_messages.c.session_id == sid, _messages.c.idx < cursor)
        .order_by(_messages.c.idx)
    )
    count = 0
    for (digest,) in rows:
        stored.update(bytes(digest))
        count += 1
    return count == cursor and stored.digest() == source.digest()


def _checked_prefix(
    src: Source,
    columns: MessageColumns,
    sid: str,
    cursor: int,
    *,
    batch: int,
    fingerprint: Any,
    max_bytes: int | None = None,
) -> bytes | None:
    """The digest of the source's message ``cursor - 1``; those up to it fed to ``fingerprint``.

    None if the source holds fewer messages, or one of them cannot be digested.
    """
    digest = None
    read = 0
    reading = src.batches(
        columns.read_many, sid, start=0, count=cursor, size=batch, max_bytes=max_bytes
    )
    with contextlib.closing(reading):
        for rows, _ in reading:
            for row in rows:
                try:
                    digest = _codec.message_digest(columns.message(row))
                except InvalidMessageError:
                    return None
                fingerprint.update(digest)
            read += len(rows)
    return digest if read == cursor else None  # fewer: fewer than were imported


def _fingerprint() -> Any:
    """What the digests of a session's messages, fed in order, sum up to: 16 bytes."""
    return hashlib.blake2b(digest_size=16)


class Copied(NamedTuple):
    """What the destination holds of a session: how many messages, and what they are."""

    cursor: int
    #: The fingerprint of its messages' digests, in order.
    fingerprint: bytes


_NOTHING_COPIED = Copied(0, _fingerprint().digest())

_READ_CURSORS = f"SELECT id, flushed_idx, history_id FROM {_sessions.name} WHERE id IN ({{values}})"
# One statement, so one snapshot: each session's cursor with the digests below it.
_READ_DIGESTS = (
    f"SELECT s.id, s.flushed_idx, m.digest FROM {_sessions.name} s"
    f" JOIN {_messages.name} m ON m.session_id = s.id AND m.idx < s.flushed_idx"
    " WHERE s.id IN ({values}) ORDER BY s.id, m.idx"
)
#: Sessions whose digests one read transaction reads.
_DIGESTS_PER_READ = 100


def _cursors(
    store: SessionStore, session_ids: list[str]
) -> tuple[dict[str, Copied], dict[str, int]]:
    """What the destination holds of each session, and each one's history_id.

    Every stored message's digest is read (streamed, a read transaction per
    :data:`_DIGESTS_PER_READ` sessions), to check a re-run's source still
    begins with them; only the fingerprints are kept.
    """

    def cursors(conn: Connection) -> dict[str, tuple[int, int]]:
        rows = _dialects.rows_for_values(conn, _READ_CURSORS, session_ids)
        return {sid: (int(n), int(history)) for sid, n, history in rows}

    read = store.read_transaction(cursors)
    stored = {sid: n for sid, (n, _) in read.items()}
    histories = {sid: history for sid, (_, history) in read.items()}
    copied = dict.fromkeys(stored, _NOTHING_COPIED)  # the held ones' are read below
    held = [sid for sid, n in stored.items() if n]

    def digests(part: list[str]) -> Callable[[Connection], dict[str, Copied]]:
        def work(conn: Connection) -> dict[str, Copied]:
            found: dict[str, tuple[int, Any]] = {}
            for sid, cursor, digest in _dialects.stream_rows_for_values(conn, _READ_DIGESTS, part):
                if sid not in found:
                    found[sid] = (cursor, _fingerprint())
                found[sid][1].update(digest)
            return {sid: Copied(n, fp.digest()) for sid, (n, fp) in found.items()}

        return work

    for start in range(0, len(held), _DIGESTS_PER_READ):
        copied.update(store.read_transaction(digests(held[start : start + _DIGESTS_PER_READ])))
    return copied, histories


def _forget_new(
    store: SessionStore,
    new: Mapping[str, tuple[dict[str, Any], int]],
    made: Mapping[str, dict[str, Any]],
) -> int:
    """Delete the rows an import made of sessions before finding them invalid.

    Returns how many of this run's own went (it counted them written).

    ``new``: ones the destination did not hold when this run read it, with the
    fields this run writes of each and the history_id it drew: a row of
    another history_id is another writer's, made between that read and this
    run's insert (which then left it as it was). ``made``: ones the destination
    held when this run began (an interrupted run may have made them), with the
    fields this run writes of each. A row goes only if it holds those fields
    as written and nothing in the others (another writer's row of that id
    differs: a title, a count, a setting of its own), and holds no message and
    is parent to no session (a session another writer began meanwhile keeps
    its row).
    """
    wanted = [*new, *made]
    if not wanted:
        return 0
    s, child = _sessions.alias("s"), _sessions.alias("child")
    empty = (
        select(s)
        .where(s.c.flushed_idx == 0)
        .where(~select(child.c.id).where(child.c.parent_session_id == s.c.id).exists())
        .where(~select(_messages.c.id).where(_messages.c.session_id == s.c.id).exists())
    )

    def as_imported(row: Any) -> bool:
        if row.id in new:
            fields, history = new[row.id]
            if row.history_id != history:
                return False  # another writer's, made before this run's insert
        else:
            fields = made[row.id]
        stored = row._mapping
        # Every field as a run writes it (its title, or none where another session held
        # that title, then kept in extra), every other column as a new row holds it: empty.
        title, extra = fields.get("title"), fields.get("extra")
        moved = title is not None and stored.get("title") is None
        return all(
            stored[name] == fields[name]
            or (name == "title" and moved)
            or (name == "extra" and moved and stored[name] == {**(extra or {}), "title": title})
            if name in fields
            else stored[name] is None or stored[name] is False or stored[name] == 0
            for name in stored
            if name not in ("id", "history_id")  # (drawn for every row made)
        )

    def work(conn: Connection) -> int:
        gone: list[str] = []
        went = True
        # Again once some went: a parent to none of the rest now (its child went) goes too.
        while went:
            went = False
            for part in _dialects.in_parts(wanted):  # (a run may find many invalid)
                ids = [
                    row.id
                    for row in conn.execute(empty.where(s.c.id.in_(part)))
                    if as_imported(row)
                ]
                if ids:
                    conn.execute(_sessions.delete().where(_sessions.c.id.in_(ids)))
                    gone += ids
                    went = True
        return sum(1 for sid in gone if sid in new)

    return store.write_transaction(work)


#: Usage columns by what their values must be: text, a whole number, a number.
_USAGE_TEXT = frozenset(c.name for c in _usage.columns if c.type.python_type is str)
_USAGE_INT = frozenset(c.name for c in _usage.columns if c.type.python_type is int)


def _usage_row(row: dict[str, Any]) -> dict[str, Any]:
    """A source usage row as the store keeps it: its key's NULLs empty, its counts' 0."""
    values = {k: v for k, v in row.items() if k in _usage.columns}
    for key in _USAGE_KEY[1:]:
        if values.get(key) is None:
            values[key] = ""
    for column in _usage.columns:
        if values.get(column.name) is None and not column.nullable and column.default is not None:
            values[column.name] = column.default.arg  # type: ignore[attr-defined]
    return values


def _usage_problem(values: dict[str, Any]) -> str | None:
    """Why the store cannot hold a usage row (:func:`_usage_row`'s values), or None."""
    for key, value in values.items():
        if value is None:
            continue
        kind = type(value)
        if key in _USAGE_TEXT:
            wrong = kind is not str or "\x00" in value
        elif key in _USAGE_INT:
            wrong = kind is not int
        else:
            wrong = kind not in (int, float)
        if wrong:
            shown = "text that is not valid UTF-8" if kind is NotUtf8 else repr(value)[:40]
            return f"its usage row of model {_shown(values.get('model'))!r}: {key!r} holds {shown}"
    return None


def _usage_problems(src: Source, sessions: Collection[str]) -> dict[str, str]:
    """The sessions of ``sessions`` with a usage row the store cannot hold, and why."""
    found: dict[str, str] = {}
    for row in src.dicts("session_model_usage"):
        sid = row.get("session_id")
        if isinstance(sid, str) and sid in sessions and sid not in found:
            problem = _usage_problem(_usage_row(row))
            if problem is not None:
                found[sid] = problem
    return found


def _upsert_usage(store: SessionStore, src: Source, sessions: Collection[str]) -> int:
    """Copy the per-model usage rows of ``sessions``, writing only new or changed ones."""
    rows = [
        _usage_row(row)
        for row in src.dicts("session_model_usage")
        if row.get("session_id") in sessions
    ]
    if not rows:
        return 0
    key_cols = [_usage.c[k] for k in _USAGE_KEY]

    def work(conn: Connection) -> int:
        existing = {
            tuple(r[k] for k in _USAGE_KEY): r
            for r in (m._mapping for m in conn.execute(select(_usage)))
        }
        # (A session another writer deleted as the import ran gets none: verify says so.)
        wanted = sorted({values["session_id"] for values in rows})
        held = held_sessions(conn, wanted)
        written = 0
        make = _dialects.insert_maker(conn.dialect.name)
        for values in rows:
            if values["session_id"] not in held:
                continue
            key = tuple(values[k] for k in _USAGE_KEY)
            have = existing.get(key)
            if have is not None and all(have[k] == v for k, v in values.items()):
                continue
            stmt = make(_usage).values(**values)
            stmt = stmt.on_conflict_do_update(
                index_elements=key_cols,
                set_={k: stmt.excluded[k] for k in values if k not in _USAGE_KEY},
            )
            conn.execute(stmt)
            written += 1
        return written

    return store.write_transaction(work)


#: Each session, its stored messages counted as rows, and its last one's digest.
_COUNT_MESSAGES = (
    f"SELECT s.id, (SELECT count(*) FROM {_messages.name} m WHERE m.session_id = s.id),"
    f" s.flushed_digest FROM {_sessions.name} s WHERE s.id IN ({{values}})"
)
_COUNT_USAGE = (
    f"SELECT session_id, count(*) FROM {_usage.name} WHERE session_id IN ({{values}})"
    " GROUP BY session_id"
)
#: Each source session's messages, counted, and whether its sessions row is there.
_SOURCE_COUNTS = (
    "SELECT c.session_id, c.n, EXISTS (SELECT 1 FROM sessions s WHERE s.id = c.session_id)"
    " FROM (SELECT session_id, count(*) AS n FROM messages GROUP BY session_id) AS c"
)


def _verify(
    store: SessionStore,
    src: Source,
    ids: list[str],
    seen: dict[str, int],
    report: ImportReport,
    *,
    as_before: Collection[str],
    listed: Collection[str],
) -> None:
    """Count what the destination holds against what the source holds now.

    Messages are counted as rows on both sides, per session, and the digest
    of each session's last message in the destination is compared with the
    source's last message's; an earlier message Hermes changed after the
    import read it is found by the next run, which compares them all. Hermes
    may append while the import runs: a session whose destination count is
    what the reader found in the source (``seen``), and less than the source
    holds now, grew meanwhile (the next run copies the rest); more than the
    source holds now, it was rewritten shorter (a retry, an undo, a
    compression) or deleted there meanwhile, and is reported diverged, as the
    next run would find it; so is one another writer deleted in the
    destination meanwhile. Any other difference is a mismatch. Sessions the
    mirror plugin continued are left out, and messages whose session has no
    sessions row are reported. ``as_before``: sessions found up to date whose
    stored copies Hermes only added to (``api_content`` filled in): their last
    message's digest differs from the source's, as it should. ``listed``: the
    sessions the source held as the import began; one it holds now beside them
    appeared meanwhile (the next run copies it), and one it no longer holds was
    deleted there meanwhile: diverged, even if it had no message to copy.
    """
    ids = [sid for sid in ids if sid not in report.mirrored_sessions]

    def work(conn: Connection) -> tuple[dict[str, tuple[int, Any]], dict[str, int]]:
        counted = _dialects.rows_for_values(conn, _COUNT_MESSAGES, ids)
        usage = _dialects.rows_for_values(conn, _COUNT_USAGE, ids)
        return {sid: (n, digest) for sid, n, digest in counted}, dict(usage)

    counts, usage = store.read_transaction(work)  # a session missing here is not in the destination
    with src.snapshot():
        now = {}
        for sid, n, has_row in src.execute(_SOURCE_COUNTS):
            if has_row:
                now[_shown(sid)] = n
            else:
                report.orphaned_messages[_shown(sid)] = n
        last = _last_digests(src, [sid for sid in ids if counts.get(sid, (0,))[0]])
        # (In the source's order, as the report's other lists; a dict for the lookups.)
        present = dict.fromkeys(
            _shown(sid) for (sid,) in src.execute("SELECT id FROM sessions ORDER BY rowid")
        )
        source_usage = (
            dict(src.execute("SELECT session_id, count(*) FROM session_model_usage GROUP BY 1"))
            if _has_table(src, "session_model_usage")
            else None
        )
    invalid = report.invalid_sessions.keys() - set(ids)  # rows left out of ``ids``
    report.counts["sessions"] = TableCount(len(ids) + len(invalid), len(counts))
    report.counts["messages"] = TableCount(
        sum(now.get(sid, 0) for sid in [*ids, *invalid]), sum(n for n, _ in counts.values())
    )
    for sid in ids:
        have, digest = counts.get(sid, (-1, None))
        after = now.get(sid, 0)
        if sid in report.diverged_sessions or sid in report.invalid_sessions:
            continue  # reported already, as what stopped its copy
        if have < 0 or sid not in present:  # deleted as the import ran (here, or there)
            report.diverged_sessions.append(sid)
            continue
        if have == after:
            if have and sid not in as_before and (digest is None or bytes(digest) != last.get(sid)):
                report.diverged_sessions.append(sid)  # changed since it was read
            continue
        if have != seen.get(sid, 0):
            report.mismatched_sessions.append(sid)
        elif have < after:
            report.grown_sessions.append(sid)
        else:  # what was read is copied; the source holds less of it now
            report.diverged_sessions.append(sid)
    report.appeared_sessions = [sid for sid in present if sid not in listed]
    if source_usage is not None:
        report.counts["session_model_usage"] = TableCount(
            sum(source_usage.get(sid, 0) for sid in [*ids, *invalid]), sum(usage.values())
        )
    if report.orphaned_messages:
        _log.warning(
            "%s: %d message(s) of %d session(s) with no sessions row were not imported: %s",
            src.path,
            sum(report.orphaned_messages.values()),
            len(report.orphaned_messages),
            ", ".join(map(repr, list(report.orphaned_messages)[:10])),  # (escapes shown)
        )


def _last_digests(src: Source, session_ids: list[str]) -> dict[str, bytes | None]:
    """The digest of each session's last message in the source (None: none it can digest)."""
    columns = MessageColumns.of(src.columns("messages"))
    wanted = set(session_ids)
    # Read a batch at a time (the last message of every session may be a large output).
    last = (
        f"SELECT session_id, {', '.join(map(_quoted, columns.names))} FROM messages"
        " WHERE id IN (SELECT max(id) FROM messages WHERE session_id IS NOT ?"
        " GROUP BY session_id) ORDER BY id LIMIT ? OFFSET ?"
    )
    digests: dict[str, bytes | None] = {}
    reading = src.batches(last, None, start=0, size=BATCH)
    with contextlib.closing(reading):
        for rows, _ in reading:
            for sid, *row in rows:
                if sid in wanted:
                    try:
                        digests[sid] = _codec.message_digest(columns.message(row))
                    except InvalidMessageError:
                        digests[sid] = None
    return digests


#: The files SQLite keeps beside a database while it is open (its WAL and the
#: WAL's index, or its rollback journal), by the suffix of their names.
_BESIDE = ("-wal", "-shm", "-journal")


def _refuse_same_file(src: Source, destination: SessionStore | str | URL | Engine) -> None:
    """Raise if the destination is a SQLite file that is the source or one SQLite keeps beside it.

    Raises:
        StateDbError: It is: hermes_orm's tables would be written into Hermes'
            file, or into one named as its WAL or journal (which SQLite deletes,
            or reads as Hermes' own changes, when Hermes next opens its file).
    """
    try:
        url = (
            destination.engine.url
            if isinstance(destination, SessionStore)
            else destination.url
            if isinstance(destination, Engine)
            else _dialects.normalize_url(destination)  # (the file the store would open)
        )
        path = url.database
        backend = url.get_backend_name()
    except (ArgumentError, ValueError):
        return  # not a URL: the store says so
    if backend != "sqlite" or not path or path == ":memory:":
        return
    if path.startswith("file:"):  # a URI filename (?uri=true)
        path = unquote(urlsplit(path).path)
    path = os.path.expanduser(path)  # as the store opens it
    with contextlib.suppress(OSError):
        if os.path.samefile(path, src.path):
            raise StateDbError(
                f"the destination {path} is the Hermes state.db being imported: "
                "give another database (--url) to import into"
            )
    # By its name beside the source (SQLite looks there, whatever it links to),
    # and by the file it is.
    source, real = os.path.abspath(src.path), os.path.realpath(src.path)
    named, named_real = os.path.abspath(path), os.path.realpath(path)
    for suffix in _BESIDE:
        if named == source + suffix or named_real == real + suffix:
            raise StateDbError(
                f"the destination {path} is named as the {suffix[1:]} file SQLite keeps "
                f"beside the Hermes state.db being imported (it would delete it, or take it "
                "for Hermes' own changes): give another database (--url) to import into"
            )


def main_import(
    path: str, url: str, out: TextIO = sys.stderr, *, restore_deleted: bool = False
) -> int:
    """``hermes-orm import``: import, print the verification table, exit 1 on mismatch."""
    report = import_state_db(path, url, progress=out, restore_deleted=restore_deleted)
    print(report.table())
    rate = report.messages_written / report.seconds if report.seconds else 0.0
    print(
        f"wrote {report.sessions_written:,} sessions, {report.messages_written:,} messages, "
        f"{report.usage_written:,} usage rows, {report.settings_written:,} rows of other tables "
        f"in {report.seconds:.1f}s ({rate:,.0f} msg/s)"
    )
    return 0 if report.ok else 1
