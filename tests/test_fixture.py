"""The committed Hermes fixture: what its script writes, and what the import tests need of it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from devtools.hermes_fixture import FIXTURE, ROOT, SCRIPT

#: The tables whose rows are the fixture's content, each in its key order.
TABLES = {
    "schema_version": "version",
    "sessions": "id",
    "messages": "id",
    "session_model_usage": "session_id, model, billing_provider, billing_base_url, "
    "billing_mode, task",
}


def _rows(path: Path, table: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        columns = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
        return columns, conn.execute(f"SELECT * FROM {table} ORDER BY {TABLES[table]}").fetchall()
    finally:
        conn.close()


def test_the_script_writes_the_committed_fixture(tmp_path: Path) -> None:
    out = tmp_path / "state.db"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)],
        cwd=tmp_path,
        env={**os.environ, "HERMES_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    regenerate = f"python {SCRIPT.relative_to(ROOT)} {FIXTURE.relative_to(ROOT)}"
    for table in TABLES:
        assert _rows(out, table) == _rows(FIXTURE, table), f"{table} differs: {regenerate}"


def _dicts(table: str) -> list[dict[str, Any]]:
    columns, rows = _rows(FIXTURE, table)
    return [dict(zip(columns, row, strict=True)) for row in rows]


def test_the_fixture_has_what_the_import_tests_need() -> None:
    by_id = {s["id"]: s for s in _dicts("sessions")}
    messages = _dicts("messages")
    assert (len(by_id), len(messages), len(_dicts("session_model_usage"))) == (40, 877, 40)
    assert FIXTURE.stat().st_size < 2 * 2**20

    children = [s for s in by_id.values() if s["parent_session_id"]]
    assert len(children) == 6
    assert sum(by_id[c["parent_session_id"]]["end_reason"] == "compression" for c in children) >= 3
    assert any(s["ended_at"] is None for s in by_id.values())
    assert any(s["ended_at"] is not None for s in by_id.values())
    assert any(s["archived"] for s in by_id.values())
    assert len({s["source"] for s in by_id.values()}) >= 4
    titles = [s["title"] for s in by_id.values() if s["title"]]
    assert len(titles) == len(set(titles)) >= 10

    # Rewound rows (inactive) and compacted ones, which Hermes' counters leave out.
    assert {(m["active"], m["compacted"]) for m in messages} == {(1, 0), (0, 0), (0, 1)}
    compacted = {m["session_id"] for m in messages if m["compacted"]}
    assert all(
        by_id[sid]["message_count"] < sum(m["session_id"] == sid for m in messages)
        for sid in compacted
    )
    assert any(m["content"] is None for m in messages)
    assert any((m["content"] or "").startswith("\x00json:[") for m in messages)
    assert sum(len(m["content"] or "") > 20_000 for m in messages) >= 3
    assert any(len(json.loads(m["tool_calls"] or "[]")) > 1 for m in messages)  # parallel calls
    for key in (
        "reasoning",
        "reasoning_content",
        "reasoning_details",
        "codex_reasoning_items",
        "codex_message_items",
        "finish_reason",
        "token_count",
        "platform_message_id",
        "effect_disposition",
        "api_content",
    ):
        assert any(m[key] is not None for m in messages), key
    assert any(m["observed"] for m in messages)
