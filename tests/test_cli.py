"""The hermes-orm command line, run as a user would: a real process on a real database."""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from hermes_orm import DatabaseError, SessionStore, migrations
from tests.conftest import run_cli

run = run_cli


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HERMES_ORM_URL"}
    env["HERMES_HOME"] = str(home)
    return env


def session_made(tmp_path: Path, session_id: str, messages: list[dict[str, Any]]) -> str:
    """The URL of a new database in ``tmp_path`` holding one session of ``messages``."""
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    with SessionStore(url) as store:
        store.upgrade()
        store.create_session(session_id, source="cli")
        store.flush(session_id, messages)
    return url


def sessions_made(tmp_path: Path, count: int, fields: Callable[[int], dict[str, Any]]) -> str:
    """The URL of a new database in ``tmp_path`` holding sessions ``s0``.. with ``fields(n)``."""
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    with SessionStore(url) as store:
        store.upgrade()
        for n in range(count):
            store.create_session(f"s{n}", **fields(n))
    return url


def test_demo_on_the_embedded_default(tmp_path: Path) -> None:
    home = tmp_path / "users" / "hermes"
    result = run("demo", env=clean_env(home))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "FAIL" not in out
    assert out.count("ok   ") == 4
    assert "cursor 4, 4 rows" in out  # the failed flush left nothing half-written
    assert "second process exit status: 0" in out
    assert f"schema:   created at {migrations.head()}" in out
    db = home / "hermes_orm.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE(home.parent.stat().st_mode) == 0o700  # every directory it made
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


def test_listings_page_on_with_the_arguments_they_print(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    with SessionStore(url) as store:
        store.upgrade()
        for n in range(3):
            store.create_session(f"s{n}", source="cli", started_at=1_000 + n)
        store.create_session("other", source="gateway", started_at=999)  # after the page
        store.create_session("found", source="api")
        store.flush("found", [{"role": "user", "content": f"needle {n}"} for n in range(3)])
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url}
    first = run("sessions", "list", "--source", "cli", "--limit", "2", env=env)
    assert first.returncode == 0, first.stderr
    more = re.search(r"^more: (.*--cursor \S+)$", first.stdout, re.MULTILINE)
    assert more is not None, first.stdout
    assert ("s2" in first.stdout, "s0" in first.stdout) == (True, False)
    rest = run("sessions", "list", *shlex.split(more[1]), env=env)  # the next page as it says
    assert "s0" in rest.stdout
    assert "s2" not in rest.stdout
    assert "other" not in rest.stdout  # the same filter
    assert "more:" not in rest.stdout  # the last page
    as_json = run("sessions", "list", "--source", "cli", "--limit", "2", "--json", env=env)
    assert [s["id"] for s in json.loads(as_json.stdout)] == ["s2", "s1"]
    assert f"more: {more[1]}" in as_json.stderr
    hits = run("search", "needle", "--role", "user", "--limit", "2", env=env)
    more = re.search(r"^more: (.*--cursor \S+)$", hits.stdout, re.MULTILINE)
    assert more is not None, hits.stdout
    last = run("search", *shlex.split(more[1]), env=env)
    assert last.stdout.splitlines() == ["found[0] user      [needle] 0"]
    hits_json = run("search", "needle", "--role", "user", "--limit", "2", "--json", env=env)
    assert len(json.loads(hits_json.stdout)["hits"]) == 2
    assert f"more: {more[1]}" in hits_json.stderr  # as the listing says it


def test_an_error_leaves_json_output_empty(tmp_path: Path) -> None:
    """With --json, stdout holds JSON or nothing: an error is a line on stderr, exit 2.

    An empty --session (an unset shell variable) is such an error: no session
    has that id, and an empty page would hide the mistake.
    """
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    with SessionStore(url) as store:
        store.upgrade()
        store.create_session("s", source="cli")
        store.flush("s", [{"role": "user", "content": "needle"}])
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url}
    for json_args in ((), ("--json",)):
        refused = run("search", "needle", "--session", "", *json_args, env=env)
        assert (refused.returncode, refused.stdout) == (2, ""), refused
        assert "session_id must be a session's id" in refused.stderr
    missing = run("sessions", "show", "gone", "--json", env=env)
    assert (missing.returncode, missing.stdout) == (1, ""), missing
    assert "no session 'gone'" in missing.stderr


def test_search_rebuild_prints_json_when_asked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    with SessionStore(url) as store:
        store.upgrade()
        store.create_session("s", source="cli")
        store.flush("s", [{"role": "user", "content": "needle"}, {"role": "user", "content": "x"}])
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url}
    rebuilt = run("search", "rebuild", "--json", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout) == {"rebuilt": True, "messages": 2}
    said = run("search", "rebuild", env=env)
    assert said.stdout.strip().endswith("search index rebuilt over 2 messages")


def test_output_a_stream_cannot_hold_is_escaped_and_a_closed_one_is_nowhere(
    tmp_path: Path,
) -> None:
    """An ASCII locale's terminal, or ``>&-``: the command does its work, no traceback."""
    url = session_made(tmp_path, "東京", [{"role": "user", "content": "héllo"}])
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url, "PYTHONIOENCODING": "ascii"}
    for args in (("sessions", "list"), ("sessions", "show", "東京"), ("search", "héllo")):
        done = run(*args, env=env)
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        assert "\\u6771\\u4eac" in done.stdout or "\\xe9" in done.stdout, done.stdout
    closed = subprocess.run(
        [sys.executable, "-m", "hermes_orm.cli", "verify", "--json"],
        env={**env, "PYTHONIOENCODING": "utf-8"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.close(1),  # (the child's stdout, closed)
        check=False,
        timeout=120,
    )
    assert (closed.returncode, closed.stderr) == (0, "")


def test_stored_control_characters_do_not_reach_the_terminal(tmp_path: Path) -> None:
    """An escape sequence in a title or a message is shown as the symbol of each control
    character, never sent raw to the reader's terminal (its title, its screen)."""
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    title, content = "\x1b]0;pwned\x07\nmore: --cursor FORGED", "needle \x1b[2J\r\x9b done"
    with SessionStore(url) as store:
        store.upgrade()
        store.create_session("s\x1b[31m", source="cli", title=title)
        store.flush("s\x1b[31m", [{"role": "user", "content": content}])
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url}
    for command in (
        ("sessions", "list"),
        ("sessions", "show", "s\x1b[31m"),
        ("search", "needle"),
        ("search", "done"),
    ):
        shown = run(*command, env=env)
        assert (shown.returncode, shown.stderr) == (0, ""), shown.stderr
        lines = shown.stdout.splitlines()
        assert not re.search(r"[\x00-\x1f\x7f-\x9f]", "".join(lines)), command
        assert not any(line.startswith("more:") for line in lines), command
        assert "\u241b" in shown.stdout, command  # the picture of ESC
    found = run("search", "done", env=env).stdout
    assert "[done]" in found  # the highlight where the match is, the symbols one for one
    as_json = json.loads(run("sessions", "show", "s\x1b[31m", "--json", env=env).stdout)
    assert as_json["messages"][0]["content"] == content  # JSON keeps the text as stored


def test_rows_other_sql_damaged_are_one_line_errors_naming_them(tmp_path: Path) -> None:
    """JSON columns a hand-written UPDATE broke (SQLite keeps any text): a DatabaseError
    that says where, from the store and the command line, where a traceback was."""
    path = tmp_path / "agents.db"
    url = f"sqlite:///{path}"
    with SessionStore(url) as store:
        store.upgrade()
        store.create_session("a", source="cli")
        store.flush("a", [{"role": "user", "content": f"m{n}"} for n in range(3)])
        store.create_session("b", source="cli")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE hermes_messages SET tool_calls = '{bad' WHERE idx = 1")
        conn.execute("UPDATE hermes_sessions SET extra = 'not json' WHERE id = 'b'")
    with SessionStore(url) as store:
        with pytest.raises(DatabaseError, match="session 'a': the message at position 1"):
            store.get_messages("a")
        assert len(store.get_messages("a", limit=1)) == 1  # the rows before it read
        with pytest.raises(DatabaseError, match="session 'b' holds a value that cannot be read"):
            store.get_session("b")
        with pytest.raises(DatabaseError, match="a session of this page"):
            store.list_sessions()
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url}
    for command, said in (
        (("sessions", "show", "a"), "position 1"),
        (("sessions", "show", "b"), "session 'b'"),
        (("sessions", "list"), "a session of this page"),
    ):
        refused = run(*command, env=env)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert len(refused.stderr.splitlines()) == 1, refused.stderr
        assert said in refused.stderr
        assert "hermes-orm verify" in refused.stderr


def _without_write_permission() -> list[str]:
    """A command prefix that runs as the caller, minus root's power to write any file."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", "--bounding-set", caps, "--inh-caps", caps]


def _read_only_copy(tmp_path: Path, *damage: str) -> tuple[Path, list[str]]:
    """A database of one session (``damage``: SQL run on it first) this process may only
    read, and the command prefix of ``hermes-orm`` run so."""
    path = tmp_path / "agents.db"
    with SessionStore(f"sqlite:///{path}") as store:
        store.upgrade()
        store.create_session("s", source="cli")
        store.flush("s", [{"role": "user", "content": "needle"}])
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")  # (a WAL file needs its -shm written)
        for statement in damage:
            conn.execute(statement)
    conn.close()
    path.chmod(0o444)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)  # not root's: without its capabilities, read-only
    return path, [*_without_write_permission(), sys.executable, "-m", "hermes_orm.cli"]


def test_a_read_only_database_file_is_read(tmp_path: Path) -> None:
    """A file not ours to write (a copy an operator may only read): listed and searched."""
    path, command = _read_only_copy(tmp_path)
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": f"sqlite:///{path}"}
    for args in (("sessions", "list"), ("search", "needle"), ("db", "current"), ("verify",)):
        done = subprocess.run(
            [*command, *args], env=env, capture_output=True, text=True, check=False, timeout=120
        )
        assert (done.returncode, done.stderr) == (0, ""), (args, done.stderr)
    # FTS5 checks its tables' structure by a write: not done, said, and no problem.
    assert "not checked: search: hermes_search's integrity-check" in done.stdout
    assert done.stdout.endswith("1 sessions, 1 messages: ok\n"), done.stdout
    written = subprocess.run(
        [*command, "db", "upgrade"], env=env, capture_output=True, text=True, check=False
    )
    assert written.returncode == 0, written.stderr  # at head: nothing to write
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_a_repair_of_a_read_only_copy_says_so_and_verify_still_reports(tmp_path: Path) -> None:
    """Each session's repair failing to write would hide what verify finds: one error instead."""
    path, command = _read_only_copy(tmp_path, "UPDATE hermes_sessions SET message_count = 7")
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": f"sqlite:///{path}"}
    checked, repaired = (
        subprocess.run(
            [*command, *args], env=env, capture_output=True, text=True, check=False, timeout=120
        )
        for args in (("verify",), ("verify", "--repair"))
    )
    assert checked.returncode == 1, checked.stderr
    assert "session 's': message_count: message_count is 7, 1 are stored" in checked.stdout
    assert repaired.returncode == 2, repaired.stdout + repaired.stderr
    assert "may only be read here" in repaired.stderr
    assert "verify without --repair" in repaired.stderr


def test_a_wal_copy_in_a_directory_not_ours_opens_as_the_readme_says(tmp_path: Path) -> None:
    """SQLite reads a WAL file only where it may write its -shm: the README's immutable URL."""
    folder = tmp_path / "copies"
    folder.mkdir()
    path = folder / "agents.db"
    with SessionStore(f"sqlite:///{path}") as store:
        store.upgrade()
        store.create_session("s", source="cli")
        store.flush("s", [{"role": "user", "content": "needle"}])
    path.chmod(0o444)
    folder.chmod(0o555)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        os.chown(folder, 65534, 65534)
    command = [*_without_write_permission(), sys.executable, "-m", "hermes_orm.cli"]
    url = f"sqlite:///file:{path}?immutable=1&uri=true"
    try:
        for args in (("sessions", "list"), ("search", "needle"), ("verify", "--json")):
            done = subprocess.run(
                [*command, "--url", url, *args],
                env=clean_env(tmp_path),
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            assert (done.returncode, done.stderr) == (0, ""), (args, done.stderr)
        report = json.loads(done.stdout)
        assert (report["ok"], report["messages"], report["problems"]) == (True, 1, [])
        assert len(report["unchecked"]) == 2
    finally:
        folder.chmod(0o755)


def test_bytes_your_own_sql_wrote_are_shown_not_a_traceback(tmp_path: Path) -> None:
    """Columns your own SQL gave BLOBs (an id, a count, a role) are shown as ``b'...'``
    by sessions list, sessions show and search."""
    path = tmp_path / "agents.db"
    with SessionStore(f"sqlite:///{path}") as store:
        store.upgrade()
        store.create_session("abc", source="cli")
        store.flush("abc", [{"role": "user", "content": "hello there"}])
        store.create_session("other", source="cli")
        store.flush("other", [{"role": "user", "content": "hello again"}])
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE hermes_sessions SET id = x'616263', source = x'636c69' WHERE id = 'abc'"
        )
        conn.execute("UPDATE hermes_sessions SET message_count = x'01' WHERE id = 'other'")
        conn.execute("UPDATE hermes_messages SET role = CAST('user' AS BLOB)")
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": f"sqlite:///{path}"}
    table = run("sessions", "list", env=env)
    assert (table.returncode, table.stderr) == (0, "")
    rows = sorted(line.split()[:3] for line in table.stdout.splitlines()[1:])
    assert rows == [["b'abc'", "b'cli'", "1"], ["other", "cli", "b'\\x01'"]]
    shown = run("sessions", "show", "other", env=env)
    assert (shown.returncode, shown.stderr) == (0, "")
    assert "[0] b'user'   hello again" in shown.stdout
    found = run("search", "hello", env=env)
    assert (found.returncode, found.stderr) == (0, "")
    assert "other[0] b'user'" in found.stdout
    as_json = run("sessions", "list", "--json", env=env)
    assert (as_json.returncode, as_json.stderr) == (0, "")
    listed = {(s["id"], s["source"]) for s in json.loads(as_json.stdout)}
    assert listed == {("b'abc'", "b'cli'"), ("other", "cli")}


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_output_to_a_full_device_is_a_one_line_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    with SessionStore(url) as store:
        store.upgrade()
        store.create_session("s", source="cli")
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url}
    for args in (
        ("sessions", "list"),
        ("sessions", "list", "--json"),
        ("db", "current"),
        ("--help",),  # (argparse itself passes a failed write of its help over)
        ("search", "--help"),
    ):
        with Path("/dev/full").open("w") as full:
            done = subprocess.run(
                [sys.executable, "-m", "hermes_orm.cli", *args],
                env=env,
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                check=False,
                timeout=120,
            )
        assert done.returncode == 1
        assert done.stderr == "hermes-orm: cannot write the output: No space left on device\n"


def test_an_empty_url_is_refused_not_replaced_by_the_default(tmp_path: Path) -> None:
    """``--url "$UNSET"`` must not write to the default database (nor HERMES_ORM_URL's)."""
    default = tmp_path / "default.db"
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": f"sqlite:///{default}"}
    for args in (("db", "upgrade"), ("sessions", "list")):
        refused = run(*args, "--url", "", env=env)
        assert refused.returncode == 2
        assert "not a database URL" in refused.stderr
    assert not default.exists()


def test_output_cut_short_by_its_reader_ends_without_a_traceback(tmp_path: Path) -> None:
    """``hermes-orm sessions list --json | head``: the pipe closes under the listing."""
    url = sessions_made(tmp_path, 1000, lambda n: {"source": "cli", "title": "x" * 200 + str(n)})
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url}
    command = [sys.executable, "-m", "hermes_orm.cli", "sessions", "list", "--json"]
    listing = subprocess.Popen(
        [*command, "--limit", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert listing.stdout is not None
    assert listing.stderr is not None
    assert listing.stdout.read(100)
    listing.stdout.close()
    errors = listing.stderr.read().decode()
    assert listing.wait(60) == 1
    assert "Traceback" not in errors


def test_a_reader_gone_from_one_output_leaves_the_other_s_whole(tmp_path: Path) -> None:
    """The ``more:`` line's reader (stderr) gone: the listing (stdout) still arrives whole;
    a short listing whose reader is gone ends quietly too (not at the interpreter's exit)."""
    url = sessions_made(tmp_path, 2, lambda _: {"source": "cli"})
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url}
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as a user's terminal pipeline has it
    command = [sys.executable, "-m", "hermes_orm.cli", "sessions", "list", "--json"]
    no_more = subprocess.Popen(
        [*command, "--limit", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert no_more.stderr is not None
    no_more.stderr.close()  # before the process writes its more: line there
    out, _ = no_more.communicate(timeout=60)
    assert no_more.returncode == 1
    assert [s["id"] for s in json.loads(out)] == ["s1"]
    no_listing = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert no_listing.stdout is not None
    no_listing.stdout.close()
    _, errors = no_listing.communicate(timeout=60)
    assert no_listing.returncode == 1
    assert errors == b""


def test_json_output_holds_a_lone_surrogate_of_a_session_field(tmp_path: Path) -> None:
    """Hermes writes one in a session's JSON fields (the import keeps it): escaped, no crash."""
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    with SessionStore(url) as store:
        store.upgrade()
        store.create_session("s", source="cli", model_config={"note": "half \ud83d", "é": 1})
        store.flush("s", [{"role": "user", "content": "héllo"}])
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url}
    listing = run("sessions", "list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)[0]["model_config"] == {"note": "half \ud83d", "é": 1}
    shown = run("sessions", "show", "s", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["session"]["model_config"]["note"] == "half \ud83d"
    assert document["messages"] == [{"role": "user", "content": "héllo"}]


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


@pytest.mark.parametrize("args", [("db", "upgrade"), ("db", "downgrade"), ("sessions", "show")])
def test_a_url_typed_as_a_revision_or_a_session_is_not_printed_with_its_password(
    tmp_path: Path, args: tuple[str]
) -> None:
    """A URL where a revision or a session id goes (``--url`` forgotten) passes the parser."""
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": f"sqlite:///{tmp_path / 'agents.db'}"}
    assert run("db", "upgrade", env=env).returncode == 0
    result = run(*args, "postgresql://hermes:s3cret-pw@db.example/x", env=env)
    assert result.returncode in (1, 2), result.stdout + result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert "hermes:***@db.example" in result.stderr


def test_url_option_beats_environment(tmp_path: Path) -> None:
    target = tmp_path / "explicit.db"
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": f"sqlite:///{tmp_path / 'env.db'}"}
    assert run("--url", f"sqlite:///{target}", "db", "upgrade", env=env).returncode == 0
    assert target.exists()
    assert not (tmp_path / "env.db").exists()


CONNINFO = "host=db user=u password=s3cret-pw dbname=x"
BLANK = "postgresql://u:s3cret pw@127.0.0.1:abc/db"


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (("--url", CONNINFO, "db", "current"), 2),
        (("--url", CONNINFO, "status"), 1),
        ((CONNINFO,), 2),
        (("--url", BLANK, "db", "current"), 2),
        (("--url", BLANK, "status"), 1),
        (("search", "x", "--url", BLANK), 2),
        ((BLANK,), 2),
        (("--url", BLANK, "demo"), 2),
    ],
)
def test_no_password_of_a_conninfo_or_with_a_blank_is_printed(
    tmp_path: Path, args: tuple[str], status: int
) -> None:
    """libpq's key=value string and a password with a blank, as --url or a stray argument."""
    result = run(*args, env=clean_env(tmp_path))
    assert result.returncode == status
    assert "Traceback" not in result.stderr
    for secret in ("s3cret", " pw@"):
        assert secret not in result.stdout + result.stderr
    assert "***" in result.stdout + result.stderr


def test_the_demo_says_when_it_upgrades_a_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    older = "0015_search_literal_nul_escape"
    with SessionStore(url) as store:
        store.upgrade(older)
    upgraded = run("--url", url, "demo", env=clean_env(tmp_path))
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"schema:   upgraded from {older} to {migrations.head()}\n" in upgraded.stdout
    again = run("--url", url, "demo", env=clean_env(tmp_path))  # at the head: nothing to say
    assert again.returncode == 0, again.stderr
    assert "schema:" not in again.stdout


def test_demo_hides_a_password_in_the_query(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}?password=s3cret-pw"
    result = run("--url", url, "demo", env=clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"database: sqlite:///{tmp_path / 'demo.db'}?password=***" in result.stdout
    assert "s3cret-pw" not in result.stdout + result.stderr


#: The commands that only read a database.
READING = [
    ("db", "current"),
    ("db", "check"),
    ("db", "downgrade", "base"),
    ("sessions", "list"),
    ("sessions", "show", "s1"),
    ("verify",),
    ("verify", "--repair"),
    ("search", "foo"),
    ("search", "rebuild"),
]


@pytest.mark.parametrize("command", READING)
def test_a_command_that_reads_creates_no_sqlite_file(tmp_path: Path, command: tuple[str]) -> None:
    """A mistyped path is said, and leaves no file or directory behind."""
    target = tmp_path / "typo" / "x.db"
    result = run("--url", f"sqlite:///{target}", *command, env=clean_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"hermes-orm: no database at '{target}': nothing is stored there "
        "(check the URL; `hermes-orm db upgrade` creates it)"
    ]
    assert not target.parent.exists()


@pytest.mark.parametrize("command", [READING[0], READING[3], READING[5], ("status",)])
@pytest.mark.parametrize("uri", [True, False], ids=["uri=true", "a file named file:..."])
def test_a_command_that_reads_creates_no_file_a_file_uri_names(
    tmp_path: Path, command: tuple[str], uri: bool
) -> None:
    """``sqlite:///file:x.db?uri=true`` names x.db (SQLite reads the URI); without
    ``uri=true``, a file named ``file:x.db``: neither is made by a command that reads."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    url = "sqlite:///file:x.db" + ("?uri=true" if uri else "")
    # In workdir: the relative name is the file's there.
    result = run("--url", url, *command, env=clean_env(tmp_path), cwd=workdir)
    if command == ("status",):
        assert "none yet (no file yet" in result.stdout, result.stdout + result.stderr
    else:
        assert result.returncode == 2
        assert "nothing is stored there" in result.stderr
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("value", ["true", "1", "yes", "True"])
def test_a_file_uri_any_true_uri_value_names_is_read(tmp_path: Path, value: str) -> None:
    """SQLAlchemy opens the name as a URI for any true ``uri=`` value: so is it looked for."""
    with SessionStore(f"sqlite:///{tmp_path / 'x.db'}") as store:
        store.upgrade()
        store.create_session("here", source="cli")
    url = f"sqlite:///file:x.db?uri={value}"
    result = run("--url", url, "sessions", "list", env=clean_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "here" in result.stdout


def test_status_of_a_database_holding_tables_named_as_ours_says_so(tmp_path: Path) -> None:
    """Someone else's hermes_* tables, no revision of ours: the mirror could never make the
    schema there (a migration would collide with them), so status says what is wrong."""
    path = tmp_path / "foreign.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE hermes_sessions (id TEXT PRIMARY KEY)")
    conn.close()
    result = run("--url", f"sqlite:///{path}", "status", env=clean_env(tmp_path))
    assert result.returncode == 1, result.stdout
    assert "tables named as hermes_orm's" in result.stdout
    assert "none yet" not in result.stdout


@pytest.mark.heavy
def test_commands_that_read_leave_another_applications_database_as_it_was(
    tmp_path: Path,
) -> None:
    """A mistyped URL naming another application's SQLite file: refused or read, and
    not a byte of it changed (its journal mode switched to WAL was a write)."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.execute("INSERT INTO users VALUES ('ada')")
    conn.close()
    before = path.read_bytes()
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": f"sqlite:///{path}"}
    commands = [
        ("sessions", "list"),
        ("sessions", "show", "x"),
        ("search", "foo"),
        ("verify",),
        ("db", "current"),
        ("db", "check"),
        ("status",),
    ]
    for args in commands:
        result = run(*args, env=env)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert path.read_bytes() == before, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # no -wal, no -shm
    assert run("sessions", "list", env=env).returncode == 2  # (no hermes_orm schema)
    upgraded = run("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    with sqlite3.connect(path) as conn:  # the application's rows kept, the tables added
        assert conn.execute("SELECT name FROM users").fetchall() == [("ada",)]
    conn.close()
    assert run("sessions", "list", env=env).returncode == 0
    with sqlite3.connect(path) as conn:  # a store that uses it switches it
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


@pytest.mark.heavy
def test_status_of_a_server_that_answered_with_an_error_does_not_call_it_unreachable(
    empty_pg: str, tmp_path: Path
) -> None:
    """A lock held past the store's lock_timeout is the server's answer, not an outage."""
    SessionStore(empty_pg).upgrade()
    locker = create_engine(empty_pg)
    try:
        with locker.connect() as conn:
            conn.exec_driver_sql("LOCK TABLE hermes_sessions IN ACCESS EXCLUSIVE MODE")
            result = run("--url", empty_pg, "status", env=clean_env(tmp_path))
    finally:
        locker.dispose()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "database:  error: canceling statement due to lock timeout" in result.stdout
    assert "unreachable" not in result.stdout


def test_status_says_when_no_file_can_be_made_where_the_url_points(tmp_path: Path) -> None:
    """A file where a directory of the path should be: the mirror's first write would fail,
    so status reports a problem, not a database the mirror will make."""
    (tmp_path / "blocker").write_text("")
    target = tmp_path / "blocker" / "home" / "hermes_orm.db"
    result = run("--url", f"sqlite:///{target}", "status", env=clean_env(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        f"schema:    none, and no file can be made there: {str(tmp_path / 'blocker')!r} "
        "is not a directory"
    ) in result.stdout


def test_status_of_a_database_not_made_yet_creates_none(tmp_path: Path) -> None:
    target = tmp_path / "home" / "hermes_orm.db"
    result = run("--url", f"sqlite:///{target}", "status", env=clean_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "schema:    none yet (no file yet" in result.stdout
    assert not target.parent.exists()
    assert (
        run("--url", f"sqlite:///{target}", "db", "upgrade", env=clean_env(tmp_path)).returncode
        == 0
    )
    made = run("--url", f"sqlite:///{target}", "status", env=clean_env(tmp_path))
    assert "stored:    0 sessions, 0 messages" in made.stdout, made.stdout


@pytest.mark.parametrize(
    "command",
    [
        ("db", "upgrade"),
        ("import", str(Path(__file__).parent / "fixtures" / "hermes-state.db")),
        ("demo",),
    ],
)
def test_a_sqlite_file_that_cannot_be_created_is_one_line(
    tmp_path: Path, command: tuple[str]
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    result = run("--url", f"sqlite:///{not_a_directory}/x.db", *command, env=clean_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"hermes-orm: sqlite:///{not_a_directory}/x.db: cannot create the SQLite file "
        f"'{not_a_directory}/x.db': File exists: '{not_a_directory}'"
    ]


def test_import_of_an_empty_path_is_refused_not_taken_for_the_default(tmp_path: Path) -> None:
    target = tmp_path / "x.db"
    result = run("--url", f"sqlite:///{target}", "import", "", env=clean_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "hermes-orm: source is an empty path: name the Hermes state.db"
    ]
    assert not target.exists()


@pytest.mark.parametrize(
    "command", [("sessions", "list"), ("db", "current"), ("verify",), ("search", "x")]
)
def test_a_file_name_too_long_to_look_for_is_a_one_line_error(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    url = f"sqlite:///{tmp_path}/{'x' * 300}.db"
    result = run("--url", url, *command, env=clean_env(tmp_path))
    assert (result.returncode, result.stdout) == (2, "")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "cannot look for" in result.stderr
    assert "File name too long" in result.stderr


def test_import_of_a_path_too_long_to_open_is_a_one_line_error(tmp_path: Path) -> None:
    source = tmp_path / ("x" * 300 + ".db")
    target = tmp_path / "x.db"
    result = run("--url", f"sqlite:///{target}", "import", str(source), env=clean_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"hermes-orm: cannot open {source}: [Errno 36] File name too long: '{source}'"
    ]
    assert not target.exists()


def test_import_restores_the_sessions_deleted_since_only_when_asked(tmp_path: Path) -> None:
    from hermes_state import SessionDB as HermesSessionDB

    source, target = tmp_path / "state.db", f"sqlite:///{tmp_path / 'x.db'}"
    hermes = HermesSessionDB(source)
    hermes.create_session("s", source="cli")
    hermes.append_message("s", "user", content="hello")
    hermes.close()
    env = clean_env(tmp_path)
    assert run("--url", target, "import", str(source), env=env).returncode == 0
    with SessionStore(target) as store:
        assert store.delete_session("s")
    again = run("--url", target, "import", str(source), env=env)
    assert again.returncode == 0, again.stdout
    assert "1 session(s) deleted in the destination since an earlier import" in again.stdout
    assert "wrote 0 sessions, 0 messages" in again.stdout
    restored = run("--url", target, "import", str(source), "--restore-deleted", env=env)
    assert restored.returncode == 0, restored.stdout
    assert "wrote 1 sessions, 1 messages" in restored.stdout


def test_the_next_page_is_listed_with_a_filter_beginning_with_a_dash(tmp_path: Path) -> None:
    url = sessions_made(tmp_path, 3, lambda n: {"source": "-tg", "started_at": 1_000 + n})
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url}
    first = run("sessions", "list", "--source=-tg", "--limit", "2", env=env)
    more = re.search(r"^more: (.*--cursor \S+)$", first.stdout, re.MULTILINE)
    assert more is not None, first.stdout
    rest = run("sessions", "list", *shlex.split(more[1]), env=env)
    assert (rest.returncode, rest.stderr) == (0, "")
    assert [line.split()[0] for line in rest.stdout.splitlines()[1:]] == ["s0"]


def test_the_next_page_of_a_query_beginning_with_a_dash_is_listed_as_it_says(
    tmp_path: Path,
) -> None:
    turns = [{"role": "user", "content": f"docker {n}"} for n in range(3)]
    url = session_made(tmp_path, "s", turns)
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url}
    # (No space in the query: argparse would take it for an option.)
    first = run("search", "--limit", "2", "--", '-"swarm"docker', env=env)
    assert first.returncode == 0, first.stderr
    more = re.search(r"^more: (.*)$", first.stdout, re.MULTILINE)
    assert more is not None, first.stdout
    rest = run("search", *shlex.split(more[1]), env=env)
    assert (rest.returncode, rest.stderr) == (0, "")
    assert rest.stdout.splitlines() == ["s[0] user      [docker] 0"]


def test_a_file_name_that_is_not_utf8_is_printed_escaped(tmp_path: Path) -> None:
    directory = os.fsdecode(bytes(tmp_path) + b"/d\xff")
    os.mkdir(directory)
    url = f"sqlite:///{directory}/x.db"
    shown = f"sqlite:///{tmp_path}/d\\xff/x.db"
    upgrade = run("--url", url, "db", "upgrade", env=clean_env(tmp_path))
    assert upgrade.returncode == 0, upgrade.stderr
    assert upgrade.stdout.startswith(f"{shown}: at ")
    current = run("--url", url, "db", "current", env=clean_env(tmp_path))
    assert current.returncode == 0, current.stderr
    assert current.stdout.endswith("(up to date)\n")
    assert current.stdout.startswith(f"{shown}: ")


def test_a_tilde_in_a_sqlite_url_is_the_home_directory(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {**clean_env(tmp_path), "HOME": str(home)}
    result = run("--url", "sqlite:///~/x.db", "db", "upgrade", env=env)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((home / "x.db").stat().st_mode) == 0o600
    current = run("--url", f"sqlite:///{home / 'x.db'}", "db", "current", env=env)
    assert current.stdout.endswith("(up to date)\n")


def test_sessions_show_renders_any_tool_calls(tmp_path: Path) -> None:
    """Whatever JSON the store accepted as tool calls, shown without a crash."""
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    calls: list[Any] = [
        [{"id": "1", "type": "function", "function": "terminal"}],
        [{"id": "2", "function": None}],
        [{"id": "3", "function": {"name": 5}}],
        [{"id": "4", "function": {"arguments": "{}"}}],
        ["bare", 7, {"id": "5", "function": {"name": "ls"}}],
        {"id": "6", "function": {"name": "grep"}},
        "one call",
        42,
    ]
    with SessionStore(url) as store:
        store.upgrade()
        store.create_session("s", source="cli")
        store.flush(
            "s",
            [{"role": "assistant", "content": None, "tool_calls": each} for each in calls],
        )
    show = run("--url", url, "sessions", "show", "s", env=clean_env(tmp_path))
    assert show.returncode == 0, show.stderr
    lines = [line for line in show.stdout.splitlines() if line.startswith("[")]
    assert lines == [
        "[0] assistant -> calls terminal",
        "[1] assistant -> calls ?",
        "[2] assistant -> calls 5",
        "[3] assistant -> calls ?",
        "[4] assistant -> calls bare, 7, ls",
        "[5] assistant -> calls grep",
        "[6] assistant -> calls one call",
        "[7] assistant -> calls 42",
    ]


_IN_MEMORY = [
    "sqlite:///:memory:",
    "sqlite:///file::memory:?uri=true",
    "sqlite:///file:mine?mode=memory&cache=shared&uri=true",
    "sqlite:///file:/mine.db?vfs=memdb&uri=true",
]


@pytest.mark.parametrize(
    ("url", "command"),
    [("sqlite://", c) for c in [("db", "upgrade"), ("import",), *READING]]
    + [(url, ("db", "upgrade")) for url in _IN_MEMORY],
)
def test_a_sqlite_database_in_memory_is_refused(
    tmp_path: Path, url: str, command: tuple[str]
) -> None:
    """What a command writes there would be gone when it ends: it says so, and does nothing."""
    result = run("--url", url, *command, env=clean_env(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"hermes-orm: {url} is a SQLite database in memory, gone when this command ends: "
        "give a file (sqlite:///path/to/hermes_orm.db)"
    ]
    assert result.stdout == ""


def test_the_demo_runs_on_a_sqlite_database_in_memory(tmp_path: Path) -> None:
    """Whole in one process: its second writer is a thread (a process of its own would
    find a database in memory of its own, empty)."""
    result = run("--url", "sqlite://", "demo", env=clean_env(tmp_path))
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr
    assert "second writer: done" in result.stdout
    assert "cursor 4, 4 rows" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_status_of_a_sqlite_database_in_memory_still_reads_the_mirror_s_record(
    tmp_path: Path,
) -> None:
    """Why the mirror is off is in its status file, whatever the database."""
    (tmp_path / "hermes_orm_status.json").write_text(
        json.dumps({"register_error": {"at": 1_760_000_000, "message": "bad url"}})
    )
    result = run("--url", "sqlite://", "status", env=clean_env(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "schema:    not seen: a SQLite database in memory is the process's own" in result.stdout
    assert "plugin:    off since" in result.stdout
    assert "bad url" in result.stdout


@pytest.mark.parametrize("revision", ["", "  "])
def test_a_blank_revision_is_refused_before_a_file_is_made(tmp_path: Path, revision: str) -> None:
    target = tmp_path / "new" / "x.db"
    result = run("--url", f"sqlite:///{target}", "db", "upgrade", revision, env=clean_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"hermes-orm: revision must be 'head', 'base' or a revision id, got {revision!r}"
    ]
    assert not target.parent.exists()


_ESCAPES = "esc\x1b]0;PWNED\x07\x1b[2J\n"


def test_the_more_line_pastes_back_a_session_with_escapes_and_sends_none(tmp_path: Path) -> None:
    """The ``more:`` line names the session as bash's ``$'...'`` word: pasted, it lists the
    next page of that very session; printed, no escape reaches the terminal and no line
    break splits it from the last line."""
    url = session_made(
        tmp_path, _ESCAPES, [{"role": "user", "content": f"needle {n}"} for n in range(3)]
    )
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": url}
    first = run("search", "needle", "--session", _ESCAPES, "--limit", "2", env=env)
    assert first.returncode == 0, first.stderr
    assert "\x1b" not in first.stdout
    last = first.stdout.splitlines()[-1]
    assert last.startswith("more: needle $'--session=esc\\x1b]0;PWNED\\x07\\x1b[2J\\x0a'")
    pasted = subprocess.run(
        ["bash", "-c", f'printf "%s\\0" {last.removeprefix("more: ")}'],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")[:-1]
    rest = run("search", *(word.decode() for word in pasted), env=env)
    assert rest.stdout.splitlines()[-1].endswith("[needle] 0"), rest.stdout + rest.stderr


def test_sessions_show_prints_a_blob_a_row_holds_as_json_output_does(tmp_path: Path) -> None:
    url = session_made(tmp_path, "s", [{"role": "user", "content": "fine"}])
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:  # another tool's write
        conn.execute("UPDATE hermes_messages SET content = x'ff00fe'")
    shown = run("sessions", "show", "s", "--url", url, env=clean_env(tmp_path))
    assert (shown.returncode, shown.stderr) == (0, "")
    assert "b'\\xff\\x00\\xfe'" in shown.stdout


def test_status_shows_a_session_id_and_error_with_escapes_inert(tmp_path: Path) -> None:
    (tmp_path / "hermes_orm_status.json").write_text(
        json.dumps(
            {
                "error": {
                    "at": 1_760_000_000,
                    "session_id": _ESCAPES,
                    "message": f"DatabaseError: session {_ESCAPES}",
                    "todo": "the next completed turn of the session catches up",
                },
                "register_error": {"at": 1_760_000_000, "message": f"bad {_ESCAPES}"},
            }
        )
    )
    url = f"sqlite:///{tmp_path / 'none.db'}"
    result = run("--url", url, "status", env=clean_env(tmp_path))
    assert "\x1b" not in result.stdout
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("last error:")]
    assert "session esc␛]0;PWNED␇␛[2J␊: DatabaseError" in line
    assert "bad esc␛]0;PWNED" in result.stdout


def test_status_lists_the_writes_given_up_until_cleared(tmp_path: Path) -> None:
    """Store mode's repairs given up are lost: said until ``status --clear``; another
    database's record stays."""
    url = f"sqlite:///{tmp_path / 'none.db'}"
    other = f"sqlite:///{tmp_path / 'other.db'}"
    path = tmp_path / "hermes_orm_status.json"

    def given_up(where: str, session_id: str) -> dict[str, Any]:
        what = "the messages Hermes' own writes missed were given up at the exit"
        return {"at": 1, "url": where, "session_id": session_id, "message": "Busy", "what": what}

    error = {"at": 1, "url": url, "session_id": "a", "message": "Busy", "todo": "later"}
    recorded = {"error": error, "given_up": [given_up(url, "a"), given_up(other, "b")]}
    path.write_text(json.dumps(recorded))
    env = clean_env(tmp_path)
    shown = run("--url", url, "status", env=env)
    assert shown.returncode == 1
    lines = [x for x in shown.stdout.splitlines() if x.startswith("given up:")]
    assert len(lines) == 1
    assert "session a: the messages Hermes' own writes missed were given up" in lines[0]
    cleared = run("--url", url, "status", "--clear", env=env)
    assert cleared.returncode == 1  # (what it showed, before it cleared it)
    assert "given up:" in cleared.stdout
    after = run("--url", url, "status", env=env)
    assert (after.returncode, "given up:" in after.stdout) == (0, False)
    assert "last error: none" in after.stdout
    assert json.loads(path.read_text()) == {"given_up": [given_up(other, "b")]}


def test_status_clear_forgets_only_what_it_showed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write given up as the status was shown (a Hermes still running) stays on record."""
    from hermes_orm.integrations.hermes.mirror import StatusFile
    from hermes_orm.integrations.hermes.plugin import clear_status

    monkeypatch.setenv("HERMES_HOME", str(tmp_path))
    url = f"sqlite:///{tmp_path / 'none.db'}"
    status = StatusFile(tmp_path / "hermes_orm_status.json")
    shown_entry = {"at": 1, "url": url, "session_id": "a", "what": "lost"}
    status.add("given_up", shown_entry, keep=20)
    status.write(error={"at": 1, "url": url, "session_id": "a", "message": "m", "todo": "t"})
    shown = status.read()
    newer = {"at": 2, "url": url, "session_id": "b", "what": "lost"}
    status.add("given_up", newer, keep=20)  # recorded after the status was shown
    status.write(error={"at": 2, "url": url, "session_id": "b", "message": "m", "todo": "t"})
    clear_status(url, shown)
    recorded = status.read()
    assert recorded["given_up"] == [newer]
    assert recorded["error"]["session_id"] == "b"


def test_a_database_url_given_as_the_state_db_is_refused_without_its_password(
    tmp_path: Path,
) -> None:
    url = "postgresql://bob:S3cretPW@db.example:5432/hermes"
    result = run("import", url, "--url", f"sqlite:///{tmp_path / 'x.db'}", env=clean_env(tmp_path))
    assert result.returncode == 2
    assert "S3cretPW" not in result.stdout + result.stderr
    assert "source is a URL (postgresql:/...), not the path of a Hermes state.db" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_hermes_home_of_blanks_is_no_value_as_hermes_reads_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**clean_env(tmp_path), "HERMES_HOME": "  ", "HOME": str(home)}
    result = run("db", "upgrade", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (home / ".hermes" / "hermes_orm.db").exists()
    assert not (tmp_path / "  ").exists()


def test_an_empty_hermes_orm_url_is_unset(tmp_path: Path) -> None:
    """An empty variable (``HERMES_ORM_URL=`` in a shell script) names no database: the
    default file, where an empty ``--url`` is refused."""
    env = {**clean_env(tmp_path), "HERMES_ORM_URL": ""}
    result = run("db", "upgrade", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hermes_orm.db").exists()
    assert run("--url", "", "db", "current", env=env).returncode == 2


@pytest.mark.backends("postgresql")
def test_the_demo_fails_a_flush_half_way_on_postgresql(db_url: str, tmp_path: Path) -> None:
    """PostgreSQL advances the cursor inside the statement that inserts the rows: the demo's
    failure is injected there, and the turn is seen rolled back whole."""
    result = run("--url", db_url, "demo", env=clean_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed: connection reset while advancing the cursor" in result.stdout
    assert "cursor 4, 4 rows" in result.stdout
    assert "second process exit status: 0" in result.stdout


def test_search_rebuild_refuses_a_search_s_options_it_would_pass_over(tmp_path: Path) -> None:
    url = session_made(tmp_path, "s", [{"role": "user", "content": "rebuild me"}])
    env = clean_env(tmp_path)
    refused = run("search", "rebuild", "--session", "s", "--limit", "5", "--url", url, env=env)
    assert refused.returncode == 2
    assert "search rebuild rebuilds the whole index: --session, --limit belong to a search" in (
        refused.stderr
    )
    rebuilt = run("search", "rebuild", "--url", url, env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "search index rebuilt over 1 messages" in rebuilt.stdout
    found = run("search", '"rebuild"', "--limit", "5", "--url", url, env=env)
    assert "[rebuild] me" in found.stdout


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
@pytest.mark.parametrize(
    "text",
    ["plain", "it's", "esc\x1b]0;PWNED\x07", "back\\slash\nC1\x85\x9b5m", "bad\udcffbyte", "東京"],
)
def test_a_word_of_the_more_line_pastes_back_in_bash_and_prints_no_control(
    text: str, locale: str
) -> None:
    from hermes_orm.cli import _word, inert

    word = _word(text)
    assert word == inert(word)
    assert not re.search("[\ud800-\udfff]", word)
    pasted = subprocess.run(
        ["bash", "-c", f"printf %s {word}"],
        capture_output=True,
        check=True,
        env={**os.environ, "LC_ALL": locale},
    ).stdout
    assert pasted.decode("utf-8", "surrogateescape") == text
