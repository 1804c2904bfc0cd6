"""The README's Python examples run as written, on real databases.

Each ```python block is executed as the README shows it; only the placeholder
PostgreSQL URL is replaced with a real server's, and the ORM example gets the
``engine`` its text assumes (the first example's database).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hermes_orm import SessionStore

README = Path(__file__).parent.parent / "README.md"
#: The placeholder URL of the README's examples.
PLACEHOLDER = "postgresql://user:pw@host/db"


def _example(first_line: str) -> str:
    """The README's ```python block that begins with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"the README has {len(found)} examples starting {first_line!r}"
    return str(found[0])


@pytest.mark.sqlite
def test_the_python_examples_run_as_written(tmp_path: Path) -> None:
    """In a process of their own: the ORM example installs the position rule process-wide."""
    script = "\n".join(
        [
            _example("from hermes_orm import SessionStore\n"),
            "engine = store.engine",
            _example("from sqlalchemy.orm import Session as OrmSession\n"),
        ]
    )
    # sqlite:///agent.db is a file of the working directory
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    with SessionStore(f"sqlite:///{tmp_path / 'agent.db'}") as store:
        stored = store.get_messages("s1")
    assert len(stored) == 6
    assert stored[3] == {"role": "assistant", "content": "A Python package."}
    assert [m["content"] for m in stored[4:]] == ["hi", "hello"]


@pytest.mark.postgresql
@pytest.mark.direct("makes a database of its own")
def test_the_asyncio_example_runs_as_written(empty_pg: str) -> None:
    source = _example("import asyncio\n")
    assert PLACEHOLDER in source
    exec(source.replace(PLACEHOLDER, empty_pg), {})
    with SessionStore(empty_pg) as store:
        assert store.get_messages("s1") == [{"role": "user", "content": "hi"}]
