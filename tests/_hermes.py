"""A Hermes Agent state.db as the tests expect it back (the fixture itself: ``devtools``)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

_JSON_COLUMNS = {"tool_calls", "reasoning_details", "codex_reasoning_items", "codex_message_items"}
_BOOL_COLUMNS = {"observed", "active", "compacted"}


def digest_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_rows(path: Path) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Sessions and, per session in Hermes order, messages, as raw column dicts."""
    # Immutable (nothing made beside it) unless a WAL is there: its last commits
    # are read through it then (a reader still open kept Hermes' checkpoint back).
    wal = Path(f"{path}-wal").exists()
    conn = sqlite3.connect(f"file:{path}?mode=ro{'' if wal else '&immutable=1'}", uri=True)
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
