"""Fetch Hermes Agent's own tests from its sdist on the package index, once.

    python scripts/fetch_hermes_tests.py     # prints where they are

hermes_orm's SessionDB adapter is tested with Hermes Agent's own SessionDB
tests (``tests/test_hermes_suite.py``). They ship in the sdist of the pinned
release, which pip downloads from the package index like any dependency;
nothing of them is kept in this repository. They are unpacked into
``.cache/hermes-agent-<version>/`` at the repository root (the tests and the
project's pytest settings), and fetched again only when missing.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.19.0"
ROOT = Path(__file__).resolve().parent.parent


def fetch(version: str = VERSION, root: Path = ROOT) -> Path:
    """The directory holding ``tests/`` and ``pyproject.toml`` of hermes-agent ``version``."""
    dest = root / ".cache" / f"hermes-agent-{version}"
    if (dest / "tests").is_dir() and (dest / "pyproject.toml").is_file():
        return dest
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [
                sys.executable,
                *("-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"),
                *("--dest", download, f"hermes-agent=={version}"),
            ],
            check=True,
        )
        (sdist,) = Path(download).glob(f"hermes_agent-{version}.tar.gz")
        prefix = f"hermes_agent-{version}/"
        partial = dest.with_name(dest.name + ".partial")
        with tarfile.open(sdist) as archive:
            members = []
            for member in archive.getmembers():
                name = member.name.removeprefix(prefix)
                if name == "pyproject.toml" or name.startswith("tests/"):
                    member.name = name
                    members.append(member)
            archive.extractall(partial, members=members, filter="data")
        partial.rename(dest)  # whole or not at all: an interrupted fetch starts over
    return dest


if __name__ == "__main__":
    print(fetch())
