"""The hermes-orm command line, run as a user would: a real process on a real database."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from hermes_orm import SessionStore
from tests.conftest import run_cli

run = run_cli


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HERMES_ORM_URL"}
    env["HERMES_HOME"] = str(home)
    return env


def test_demo_on_the_embedded_default(tmp_path: Path) -> None:
    home = tmp_path / "hermes"
    result = run("demo", env=clean_env(home))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "FAIL" not in out
    assert out.count("ok   ") == 4
    assert "cursor 4, 4 rows" in out  # the failed flush left nothing half-written
    assert "second process exit status: 0" in out
    db = home / "hermes_orm.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    store = SessionStore(f"sqlite:///{db}")
    (session,) = store.list_sessions().sessions
    assert session["flushed_idx"] == session["message_count"] == 20
    assert len(store.get_messages(session["id"])) == 20
    store.close()


def test_sessions_list_and_show(db_url: str, tmp_path: Path) -> None:
    store = SessionStore(db_url)
    store.create_session("abc", source="cli", model="m1", title="T")
    store.flush(
        "abc",
        [
            {"role": "user", "content": "héllo 世界"},
            {
                "role": "assistant",
                "content": "hi",
                "tool_calls": [{"id": "1", "function": {"name": "grep"}}],
            },
        ],
    )
    store.close()
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": db_url}
    listing = run("sessions", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "abc" in listing.stdout
    assert "m1" in listing.stdout
    as_json = json.loads(run("sessions", "list", "--json", env=env).stdout)
    assert [s["id"] for s in as_json] == ["abc"]
    show = run("sessions", "show", "abc", env=env)
    assert "héllo 世界" in show.stdout
    assert "calls grep" in show.stdout
    shown = json.loads(run("sessions", "show", "abc", "--json", env=env).stdout)
    assert shown["messages"][0] == {"role": "user", "content": "héllo 世界"}
    missing = run("sessions", "show", "nope", env=env)
    assert missing.returncode == 1


def test_passwords_are_never_printed(tmp_path: Path) -> None:
    url = "postgresql://hermes:s3cret-pw@127.0.0.1:9/none"
    result = run("--url", url, "db", "current", env=clean_env(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "hermes:***@127.0.0.1:9/none" in result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("sessions", "list", "--url", "{refused}"),
        ("--url", "{refused}", "db", "current"),
        ("db", "upgrade", "--url", "{refused}?password=s3cret-pw"),
        ("search", "hello", "--url", "{refused}"),
        ("sessions", "show", "x", "--url={refused}"),
        ("sessions", "list", "--url", "postgresql://u:s3cret-pw@127.0.0.1:abc/db"),
        ("sessions", "list", "--url", "postgresql://u:s3cret-pw@[::1/db"),
        ("sessions", "list", "--url", "mysql://u:s3cret-pw@127.0.0.1/db"),
        ("--no-such-option", "--url", "{refused}"),
        ("sessions", "list", "--url", "{refused}", "--no-such-option"),
    ],
)
def test_no_argument_order_or_error_prints_a_password(tmp_path: Path, args: tuple[str]) -> None:
    """Refused connections, bad URLs, unknown backends, bad arguments: never the password."""
    refused = "postgresql://hermes:s3cret-pw@127.0.0.1:9/none"
    result = run(*(a.replace("{refused}", refused) for a in args), env=clean_env(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_url_option_beats_environment(tmp_path: Path) -> None:
    target = tmp_path / "explicit.db"
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": f"sqlite:///{tmp_path / 'env.db'}"}
    assert run("--url", f"sqlite:///{target}", "db", "upgrade", env=env).returncode == 0
    assert target.exists()
    assert not (tmp_path / "env.db").exists()
