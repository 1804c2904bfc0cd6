"""Real Hermes Agent state.db files for tests: the shared fixture, copied, and grown."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any


def _find_fixture(name: str = "hermes-state-v22.db") -> Path:
    """``$HERMES_ORM_FIXTURES/NAME``, else ``shared/fixtures/NAME`` beside the checkout."""
    env = os.environ.get("HERMES_ORM_FIXTURES")
    if env:
        return Path(env) / name
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "fixtures" / name
        if candidate.exists():
            return candidate
    return Path(__file__).resolve().parents[2] / "shared" / "fixtures" / name


FIXTURE = _find_fixture()
_JSON_COLUMNS = {"tool_calls", "reasoning_details", "codex_reasoning_items", "codex_message_items"}
_BOOL_COLUMNS = {"observed", "active", "compacted"}


def fixture_copy(directory: Path, name: str = "state.db") -> Path:
    """A writable copy of the Hermes v22 fixture (never write to the original)."""
    if not FIXTURE.exists():
        raise FileNotFoundError(f"the Hermes fixture is missing: {FIXTURE}")
    target = directory / name
    shutil.copyfile(FIXTURE, target)
    target.chmod(0o644)
    return target


def grow(path: Path, copies: int) -> int:
    """Add ``copies`` clones of every session (and its messages) with new ids.

    Returns the number of messages the file then holds.
    """
    conn = sqlite3.connect(path)
    triggers = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type='trigger' AND tbl_name='messages'"
    ).fetchall()
    for name, _ in triggers:  # FTS upkeep is not what these tests are about
        conn.execute(f'DROP TRIGGER "{name}"')
    sessions = [c[1] for c in conn.execute("PRAGMA table_info(sessions)")]
    messages = [c[1] for c in conn.execute("PRAGMA table_info(messages)") if c[1] != "id"]
    for k in range(copies):
        s_cols = ", ".join(sessions)
        renamed = {
            "id": f"id || '-c{k}'",
            "parent_session_id": f"parent_session_id || '-c{k}'",  # NULL stays NULL
            "title": "NULL",  # titles are unique
        }
        s_vals = ", ".join(renamed.get(c, c) for c in sessions)
        conn.execute(
            f"INSERT INTO sessions ({s_cols}) SELECT {s_vals} FROM sessions "
            "WHERE id NOT LIKE '%-c%'"
        )
        m_cols = ", ".join(messages)
        m_vals = ", ".join(f"session_id || '-c{k}'" if c == "session_id" else c for c in messages)
        conn.execute(
            f"INSERT INTO messages ({m_cols}) SELECT {m_vals} FROM messages "
            "WHERE session_id NOT LIKE '%-c%' ORDER BY id"
        )
    conn.commit()
    for _, sql in triggers:
        conn.execute(sql)
    conn.commit()
    total = int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    conn.close()
    return total


def digest_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_rows(path: Path) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Sessions and, per session in Hermes order, messages, as raw column dicts."""
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    conn.row_factory = sqlite3.Row
    sessions = [dict(r) for r in conn.execute("SELECT * FROM sessions ORDER BY id")]
    by_session: dict[str, list[dict[str, Any]]] = {}
    for r in conn.execute("SELECT * FROM messages ORDER BY id"):
        by_session.setdefault(r["session_id"], []).append(dict(r))
    conn.close()
    return sessions, by_session


def expected_message(row: dict[str, Any]) -> dict[str, Any]:
    """What a Hermes messages row must read back as, written independently of the importer."""
    out: dict[str, Any] = {"content": None}
    for key, value in row.items():
        if key in ("id", "session_id") or value is None:
            continue
        if key == "content" and value.startswith("\x00json:"):
            out[key] = json.loads(value[len("\x00json:") :])
        elif key in _JSON_COLUMNS:
            out[key] = json.loads(value)
        elif key in _BOOL_COLUMNS:
            out[key] = bool(value)
        else:
            out[key] = value
    return out
