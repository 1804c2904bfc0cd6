"""The built wheel works with no repository in sight: install, import, migrate."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_migrates_from_its_own_files(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
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
    (wheel,) = dist.glob("hermes_orm-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    db = elsewhere / "fresh.db"
    script = (
        "import hermes_orm, pathlib, sys\n"
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
