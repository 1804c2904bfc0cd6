"""Hermes Agent's own SessionDB tests, run against hermes_orm's adapter on both backends.

The tests come from the hermes-agent sdist of the pinned release
(``scripts/fetch_hermes_tests.py``, run here when they are missing). They run
in a pytest process of their own, in which ``hermes_state.SessionDB`` is the
adapter (``devtools/hermes_suite.py``). The tests listed in
``tests/hermes_suite_status.py`` are accounted for there: those that read
Hermes' SQLite internals, which the adapter does not have, with the reason;
and those still failing, a list that may only shrink. Every other test must
pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import hermes_orm
from devtools.hermes_suite import TEMPLATE
from scripts.fetch_hermes_tests import fetch
from tests.hermes_suite_status import FAILING, NOT_APPLICABLE, SESSIONDB_TESTS

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """Run the SessionDB tests; each test's outcome by its node id."""
    suite = fetch()
    report = tmp_path / "report.xml"
    deselected = [arg for nodeid in NOT_APPLICABLE for arg in ("--deselect", nodeid)]
    subprocess.run(
        [
            sys.executable,
            *("-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings"),
            *("-p", "devtools.hermes_suite", f"--junitxml={report}", *deselected),
            *SESSIONDB_TESTS,
        ],
        cwd=suite,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        check=False,
        timeout=1800,
    )
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).iter("testcase"):
        module, _, cls = case.get("classname", "").removeprefix("tests.").partition(".")
        nodeid = "::".join(
            filter(None, (f"tests/{module.replace('.', '/')}.py", cls, case.get("name")))
        )
        failed = case.find("failure") is not None or case.find("error") is not None
        outcomes[nodeid] = (
            "skipped" if case.find("skipped") is not None else "failed" if failed else "passed"
        )
    return outcomes


def _check(outcomes: dict[str, str]) -> None:
    failed = {nodeid for nodeid, outcome in outcomes.items() if outcome == "failed"}
    passed = {nodeid for nodeid, outcome in outcomes.items() if outcome == "passed"}
    assert len(outcomes) > 800  # the suite ran
    assert sorted(failed - FAILING) == []  # newly failing
    assert sorted(FAILING & passed) == []  # passing now: strike them off the list
    assert not set(NOT_APPLICABLE) & set(outcomes)  # (deselected)


@pytest.mark.sqlite
@pytest.mark.heavy
def test_hermes_sessiondb_suite_on_sqlite(tmp_path: Path) -> None:
    _check(_run(tmp_path, {}))


@pytest.mark.postgresql
@pytest.mark.heavy  # (CI runs it on both backends)
def test_hermes_sessiondb_suite_on_postgresql(tmp_path: Path, pg_server_url: str) -> None:
    server = make_url(pg_server_url).set(drivername="postgresql+psycopg")
    admin = create_engine(server, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{TEMPLATE}" TEMPLATE template0')
    template = create_engine(server.set(database=TEMPLATE), poolclass=NullPool)
    hermes_orm.upgrade(template)
    template.dispose()
    admin.dispose()
    _check(_run(tmp_path, {"HERMES_ORM_SUITE_PG": server.render_as_string(False)}))
