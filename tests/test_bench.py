"""The benchmark runner at tiny sizes, so it cannot rot (its numbers are not checked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_bench_quick_run(pg_server_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "HERMES_ORM_TEST_PG_URL": pg_server_url, "HERMES_HOME": str(tmp_path)}
    result = _bench("bench", "--quick", env=env)
    out = result.stdout
    for name in (
        "SQLite flush per turn",
        "synchronous=NORMAL",
        "synchronous=FULL",
        "Hermes SessionDB.append_message",
        "PostgreSQL flush per turn",
        "stored messages",
        "get_messages",
        "bulk flush",
        "Peak memory",
        "Import of a Hermes state.db",
        "SQLite search p50",
        "SQLite search p95",
        "PostgreSQL search p95",
        "queries slower than Hermes search_messages",
        "SQLite search index vs the text it indexes",
        "PostgreSQL search columns and indexes",
        "(of them positions",
        "| `docker 部署` |",
        "Hermes plugin: post_llm_call of a turn",
        "SQLite AsyncSessionStore flush per turn",
        "PostgreSQL AsyncSessionStore flush per turn",
    ):
        assert name in out, name
    assert "hermes-agent not installed" not in out
    assert "VERIFICATION FAILED" not in out


def test_a_missed_ratio_shows_how_far_off_it_is() -> None:
    from bench.__main__ import Row

    missed = Row("flush", "0.9 ms", "0.8 ms", 1.2041, "<= 1.2x", False)
    met = Row("flush", "0.9 ms", "0.8 ms", 1.1961, "<= 1.2x", True)
    assert missed.cells()[3:] == ["1.204x", "<= 1.2x", "MISSED"]
    assert met.cells()[3:] == ["1.20x", "<= 1.2x", "met"]


def test_each_round_rotates_the_order_of_what_it_measures() -> None:
    from bench.__main__ import rotations

    assert list(rotations(["a", "b", "c"], 4)) == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def test_partitions_bench_quick_run() -> None:
    result = _bench("bench.partitions", "--sizes", "2000,4000")
    table = [line for line in result.stdout.splitlines() if line.startswith("| 4,000 |")]
    assert len(table) == 2  # printed as measured, and in the table
    assert table[0].count("x |") == 2  # both ratios


def test_the_failure_pass_hits_hermes_orms_one_statement_on_postgresql(
    pg_server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush is one autocommitted statement there: a failure at the commit after it
    would hit a turn already stored. It hits the statement: rows written then rolled
    back (mid-persist, not retried), or committed with its answer lost."""
    from bench import peers

    actions: list[str] = []
    before = peers._Fault.before_statement

    def watched(fault: Any, sql: str, rows: int, *, alone: bool = False) -> str:
        actions.append(before(fault, sql, rows, alone=alone))
        return actions[-1]

    monkeypatch.setattr(peers._Fault, "before_statement", watched)
    dbs = peers._Databases(tmp_path, pg_server_url)
    small = peers.conversations(2, 3, seed=23)
    hermes_orm = next(p for p in peers.PEERS if p.name == peers.HERMES_ORM)
    try:
        for scenario, action, seen in (
            (peers.MID, "inside", "DatabaseError"),
            (peers.ACK, "ack", ""),  # (the store's own retry finds the turn stored)
            (peers.DROP, "inside", "DatabaseError"),
        ):
            actions.clear()
            outcome = peers._failure_pass(dbs, peers.POSTGRESQL, hermes_orm, small, scenario)
            assert outcome == ((0, 0), seen), scenario
            assert [a for a in actions if a != "run"] == [action], scenario
    finally:
        dbs.close()
