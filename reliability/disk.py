"""A full disk (SQLite): writes fail mid-flush, then space is freed and flushing goes on.

Each episode is a writer process (:func:`reliability._child.disk_writer`)
that fills the disk up to a few hundred KB, flushes until a flush fails,
tries the same lists again while the disk is still full, then frees the
space and flushes the same lists again, which must succeed. Two real I/O
failures, in turns:

- ``enospc``: the database lives on a small tmpfs, and a ballast file takes
  its free space: writes fail with ``ENOSPC``, which SQLite reports as
  ``SQLITE_FULL`` ("database or disk is full"). Mounting needs privilege:
  where ``mount`` fails, every episode is an ``rlimit`` one;
- ``rlimit``: the writer's file size limit (``RLIMIT_FSIZE``, ``SIGXFSZ``
  ignored) is set just past the database file's size: writes past it fail
  with ``EFBIG``, which SQLite reports as an I/O error (``SQLITE_IOERR_WRITE``).

The store's answer to either is :class:`hermes_orm.DatabaseError` (not
transient: retrying at once cannot help), with SQLAlchemy's error, and
SQLite's under it, as its cause. At the end the database must open with its
WAL, pass ``PRAGMA integrity_check``, and hold exactly what was acknowledged.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from reliability._common import (
    Database,
    Outcome,
    Reader,
    check,
    finish_writer,
    prepare,
    session_id,
    spawn,
)

#: What a full disk may raise: typed, and not retried.
_EXPECTED = ("DatabaseError",)
#: The tmpfs the ``enospc`` episodes fill: a base, and room for what each episode
#: adds. It must hold the database twice over (an ``rlimit`` episode's WAL grows
#: as large as the database file before a write fails).
_TMPFS_MB = 64
_TMPFS_MB_PER_EPISODE = 4


def run(
    workdir: Path,
    *,
    episodes: int,
    sessions: int = 3,
    margin: int = 256 * 1024,
    tmpfs: bool = True,
    seed: int = 0,
) -> Outcome:
    """Run ``episodes`` full-disk episodes on a new SQLite database in ``workdir``; check it.

    Args:
        workdir: An empty directory (a tmpfs is mounted in it when possible).
        episodes: Writer processes, each filling the disk once.
        sessions: Sessions each writer flushes.
        margin: The disk is full but for 0 to this many bytes.
        tmpfs: Try to mount a tmpfs for ``enospc`` episodes (else ``rlimit`` only).
        seed: Seeds the limits and the writers.
    """
    outcome = Outcome("disk", "sqlite")
    started = time.perf_counter()
    size_mb = _TMPFS_MB + _TMPFS_MB_PER_EPISODE * episodes
    with _small_filesystem(workdir / "fs", size_mb if tmpfs else 0) as mounted:
        _episodes(
            workdir / "fs",
            mounted=mounted,
            outcome=outcome,
            episodes=episodes,
            sessions=sessions,
            margin=margin,
            seed=seed,
        )
    outcome.seconds = time.perf_counter() - started
    return outcome


@contextlib.contextmanager
def _small_filesystem(where: Path, size_mb: int) -> Iterator[bool]:
    """Mount a tmpfs of ``size_mb`` MB (0: none) at ``where`` if allowed; whether it is mounted."""
    where.mkdir(parents=True)
    mounted = False
    if size_mb and os.geteuid() == 0 and shutil.which("mount"):
        options = f"size={size_mb}m,mode=0700"
        command = ["mount", "-t", "tmpfs", "-o", options, "hermes-reliability", str(where)]
        mounted = subprocess.run(command, capture_output=True, check=False).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def _episodes(
    where: Path,
    *,
    mounted: bool,
    outcome: Outcome,
    episodes: int,
    sessions: int,
    margin: int,
    seed: int,
) -> None:
    path = where / "hermes.db"
    db = Database("sqlite", f"sqlite:///{path}", path)
    rng = random.Random(seed)
    methods: Counter[str] = Counter()
    prepare(db.url, [session_id(slot) for slot in range(sessions)])
    acked: dict[str, int] = {}
    causes: Counter[str] = Counter()
    full_errors = 0
    for n in range(episodes):
        if mounted and _room(path) < 2 * path.stat().st_size + (16 << 20):
            outcome.problem(f"episode {n}: the tmpfs is too small for the database; stopped")
            break
        method = "enospc" if mounted and n % 2 == 0 else "rlimit"
        methods[method] += 1
        args = {
            "method": method,
            "path": str(path),
            "slots": sessions,
            "seed": rng.randrange(2**32),
            "margin": margin,
            "max_flushes": 5000,
            "retries_full": 2,
            "after": 5,
        }
        process, stderr = spawn("disk", args)
        reader = Reader(process)
        reader.start()
        _, summary = finish_writer(
            process,
            stderr,
            reader,
            name=f"episode {n}: the writer",
            timeout=300,
            outcome=outcome,
            acked=acked,
            expected=_EXPECTED,
        )
        if summary is None:
            continue
        errors = summary["extra"].get("errors", [])
        full = [e for e in errors if e[3] == "full"]
        full_errors += len(full)
        causes.update(
            f"{kind} from {name}" + (f" at {statement}" if statement else "")
            for kind, name, statement, _ in full
        )
        if not full:
            outcome.problem(f"episode {n}: no write failed within 5000 flushes")
        for kind, name, statement, _ in (e for e in errors if e[3] != "full"):
            outcome.problem(f"episode {n}: {kind} ({name} at {statement}) after space was freed")
        if summary["extra"].get("after_freed") != sessions:
            outcome.problem(f"episode {n}: a flush of the same lists failed after space was freed")
    outcome.work = {
        "episodes": episodes,
        "ENOSPC episodes (tmpfs)": methods["enospc"],
        "EFBIG episodes (RLIMIT_FSIZE)": methods["rlimit"],
        "disk-full errors": full_errors,
    }
    outcome.notes["what a full disk raised"] = "; ".join(
        f"{cause} ({count})" for cause, count in causes.most_common()
    )
    _check_file(db, outcome)
    check(db.url, acked, outcome)


def _room(path: Path) -> int:
    """Bytes free on the file system of ``path``, plus what its WAL (truncated next) holds."""
    stat = os.statvfs(path.parent)
    wal = path.with_name(path.name + "-wal")
    return stat.f_bavail * stat.f_frsize + (wal.stat().st_size if wal.exists() else 0)


def _check_file(db: Database, outcome: Outcome) -> None:
    """The database opens with its WAL (recovered by a plain sqlite3) and is intact."""
    assert db.path is not None
    wal = db.path.with_name(db.path.name + "-wal")
    outcome.notes["files left by the last writer"] = (
        f"database {db.path.stat().st_size:,} bytes, WAL "
        + (f"{wal.stat().st_size:,} bytes" if wal.exists() else "absent")
    )
    if not wal.exists():
        outcome.problem("the last writer left no WAL to recover")
    conn = sqlite3.connect(db.path)
    try:
        integrity = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    outcome.notes["PRAGMA integrity_check"] = "; ".join(integrity)
    if integrity != ["ok"]:
        outcome.problem(f"integrity_check: {integrity[:5]}")
    if mode != "wal":
        outcome.problem(f"journal_mode is {mode}, not wal")
