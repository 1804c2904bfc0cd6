"""The built wheel works with no repository in sight: install, import, migrate.

It is installed, each time into a fresh virtual environment, on every Python the
classifiers name (3.11, 3.12, 3.13); a missing interpreter fails the test. The
distribution's name is checked against the public index: no one else has it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ["3.11", "3.12", "3.13"]


def _project() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        project: dict[str, Any] = tomllib.load(f)["project"]
    return project


DIST_NAME: str = _project()["name"]
# PEP 503 for the index, underscores (PEP 427 escaping) for the wheel's file name.
NORMALIZED = re.sub(r"[-_.]+", "-", DIST_NAME).lower()
WHEEL_PREFIX = NORMALIZED.replace("-", "_")


def _reports_version(python: str, version: str) -> bool:
    """Whether ``python`` runs and is ``version`` (a pyenv shim may be neither)."""
    try:
        result = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError:
        return False
    return result.returncode == 0 and result.stdout.strip() == version


def _find_python(version: str) -> str:
    """``pythonX.Y`` on PATH, else the newest ``~/.pyenv/versions/X.Y.*``; else fail."""
    candidates: list[str] = []
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(on_path)
    installs = []
    for exe in Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"):
        patch = exe.parent.parent.name.removeprefix(f"{version}.")
        if patch.isdigit():
            installs.append((int(patch), str(exe)))
    candidates += [exe for _, exe in sorted(installs, reverse=True)]
    for python in candidates:
        if _reports_version(python, version):
            return python
    pytest.fail(
        f"Python {version} interpreter missing: no working python{version} on PATH "
        f"(tried {on_path or 'none'}) nor under ~/.pyenv/versions/{version}.*/bin "
        f"(tried {[exe for _, exe in installs] or 'none'}); the wheel must be tested on it"
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (built,) = dist.glob(f"{WHEEL_PREFIX}-*.whl")
    return built


def test_wheel_carries_the_license(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        license_files = [n for n in names if re.fullmatch(r"[^/]+\.dist-info/licenses/LICENSE", n)]
        assert license_files, names
        assert "Copyright (c) 2026 the hermes_orm authors" in zf.read(license_files[0]).decode()


_METADATA_SCRIPT = """\
import importlib.metadata as m, json, sys
dist = m.distribution(sys.argv[1])
md = dist.metadata
print(json.dumps({
    "name": md["Name"],
    "license_expression": md.get("License-Expression"),
    "license": md.get("License"),
    "classifiers": md.get_all("Classifier") or [],
    "files": [str(f) for f in dist.files or []],
    "plugins": [ep.value for ep in m.entry_points(group="hermes_agent.plugins")],
}))
"""


@pytest.mark.parametrize(
    "version",
    # The running Python in the default suite; the others in CI's heavy step.
    [pytest.param(v, marks=pytest.mark.heavy) if v != "3.11" else v for v in PYTHONS],
)
def test_wheel_installs_and_migrates_from_its_own_files(
    version: str, wheel: Path, tmp_path: Path
) -> None:
    interpreter = _find_python(version)
    env_dir = tmp_path / "venv"
    subprocess.run(
        [interpreter, "-m", "venv", str(env_dir)], check=True, capture_output=True, text=True
    )
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    db = elsewhere / "fresh.db"
    script = (
        "import hermes_orm, pathlib, sys\n"
        f"assert sys.version_info[:2] == {tuple(map(int, version.split('.')))}, sys.version\n"
        "assert 'site-packages' in hermes_orm.__file__, hermes_orm.__file__\n"
        "assert pathlib.Path(hermes_orm.__file__).with_name('py.typed').exists()\n"
        "from hermes_orm import migrations\n"
        "package = pathlib.Path(hermes_orm.__file__).parent\n"
        "assert pathlib.Path(migrations.SCRIPT_LOCATION) == package / 'alembic'\n"
        f"store = hermes_orm.SessionStore('sqlite:///{db}')\n"
        "store.upgrade()\n"
        "store.create_session('w', source='wheel')\n"
        "print(store.flush('w', [{'role': 'user', 'content': 'from the wheel'}]))\n"
    )
    result = subprocess.run(
        [python, "-c", script], cwd=elsewhere, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "FlushResult(written=1, cursor=1)" in result.stdout
    cli = subprocess.run(
        [env_dir / "bin" / "hermes-orm", "--url", f"sqlite:///{db}", "db", "check"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr

    meta = subprocess.run(
        [python, "-c", _METADATA_SCRIPT, DIST_NAME],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=False,
    )
    assert meta.returncode == 0, meta.stderr
    installed = json.loads(meta.stdout)
    assert installed["name"] == DIST_NAME
    assert "MIT" in (installed["license_expression"], installed["license"]), installed
    for v in PYTHONS:
        assert f"Programming Language :: Python :: {v}" in installed["classifiers"]
    assert not [c for c in installed["classifiers"] if c.startswith("License ::")]
    assert any(re.search(r"\.dist-info/licenses/LICENSE$", f) for f in installed["files"])
    assert installed["plugins"] == ["hermes_orm.integrations.hermes.plugin"]


def test_distribution_name_is_not_taken_on_pypi() -> None:
    """No one else has released ``[project].name`` on the public index."""
    url = f"https://pypi.org/pypi/{NORMALIZED}/json"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            info = json.load(response)["info"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return  # free: no project of that name on PyPI
        pytest.fail(f"{url}: HTTP {exc.code} {exc.reason}; cannot tell whether {DIST_NAME} is free")
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        pytest.fail(f"{url} unreachable ({exc}); cannot tell whether {DIST_NAME} is free on PyPI")
    project = _project()
    ours = {
        value.strip().lower()
        for author in project.get("authors", [])
        for value in (author.get("name"), author.get("email"))
        if value
    }
    theirs = " ".join(str(info.get(field) or "") for field in ("author", "author_email")).lower()
    our_urls = {u.rstrip("/") for u in project.get("urls", {}).values()}
    their_urls = {str(u).rstrip("/") for u in (info.get("project_urls") or {}).values()}
    assert any(o in theirs for o in ours) or our_urls & their_urls, (
        f"{DIST_NAME!r} is taken on PyPI by someone else: {info.get('name')} "
        f"{info.get('version')} by {info.get('author')!r} <{info.get('author_email')!r}>, "
        f"{info.get('project_urls')}; pick another distribution name in pyproject.toml"
    )
