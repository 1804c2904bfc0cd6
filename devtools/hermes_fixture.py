"""The Hermes Agent state.db fixture: where it is, a writable copy of it, a grown copy.

The fixture, ``tests/fixtures/hermes-state.db``, is synthetic: written by
``scripts/make_hermes_fixture.py`` through the real hermes-agent, and checked
against the script by ``tests/test_fixture.py``.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "hermes-state.db"
SCRIPT = ROOT / "scripts" / "make_hermes_fixture.py"


def fixture_copy(directory: Path, name: str = "state.db") -> Path:
    """A writable copy of the fixture in ``directory`` (the original is never written to)."""
    if not FIXTURE.exists():
        raise FileNotFoundError(
            f"the Hermes fixture is missing: {FIXTURE} (write it with: python {SCRIPT} {FIXTURE})"
        )
    target = directory / name
    shutil.copyfile(FIXTURE, target)
    target.chmod(0o644)
    return target


def grow(path: Path, copies: int) -> int:
    """Add ``copies`` clones of every session (and its messages) with new ids.

    Clone ``k`` of session ``s`` is ``s-c{k}``, its parent renamed alike and no
    title (titles are unique). Returns the number of messages the file then holds.
    """
    conn = sqlite3.connect(path)
    triggers = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type='trigger' AND tbl_name='messages'"
    ).fetchall()
    for name, _ in triggers:  # FTS upkeep is not what the clones are for
        conn.execute(f'DROP TRIGGER "{name}"')
    sessions = [c[1] for c in conn.execute("PRAGMA table_info(sessions)")]
    messages = [c[1] for c in conn.execute("PRAGMA table_info(messages)") if c[1] != "id"]
    # The sessions to clone, fixed before the first clone exists.
    conn.execute("CREATE TEMP TABLE originals AS SELECT id FROM sessions")
    s_cols, m_cols = ", ".join(sessions), ", ".join(messages)
    for k in range(copies):
        renamed = {
            "id": f"id || '-c{k}'",
            "parent_session_id": f"parent_session_id || '-c{k}'",  # NULL stays NULL
            "title": "NULL",
        }
        s_vals = ", ".join(renamed.get(c, c) for c in sessions)
        conn.execute(
            f"INSERT INTO sessions ({s_cols}) SELECT {s_vals} FROM sessions "
            "WHERE id IN (SELECT id FROM originals)"
        )
        m_vals = ", ".join(f"session_id || '-c{k}'" if c == "session_id" else c for c in messages)
        conn.execute(
            f"INSERT INTO messages ({m_cols}) SELECT {m_vals} FROM messages "
            "WHERE session_id IN (SELECT id FROM originals) ORDER BY id"
        )
    conn.execute("DROP TABLE originals")
    conn.commit()
    for _, sql in triggers:
        conn.execute(sql)
    conn.commit()
    total = int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    conn.close()
    return total
