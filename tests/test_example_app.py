"""The example app (examples/chat_app): its own Alembic, its own tables, a real web server.

Both ways of migrating hermes_orm inside a host's Alembic run here, on both
backends, with the real ``alembic`` command line and uvicorn: side by side
(the app's ``env.py`` calls ``hermes_orm.upgrade(connection)``) and as a
branch of the app's history (``version_locations``, label ``hermes_orm``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from hermes_orm import DatabaseError, SessionStore, migrations

APP = Path(__file__).resolve().parents[1] / "examples" / "chat_app"
HOST_REVISION = "app_0001_accounts"


def _alembic(url: str, mode: str, *args: str, app: Path = APP) -> subprocess.CompletedProcess[str]:
    """``alembic [-n branch] ARGS`` in the app's folder, as its developer runs it."""
    section = ["-n", "branch"] if mode == "branch" else []
    result = subprocess.run(
        [sys.executable, "-m", "alembic", *section, *args],
        cwd=app,
        env={**os.environ, "CHAT_APP_DATABASE_URL": url},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _hermes_tables(url: str) -> set[str]:
    return {table for table in _tables(url) if table.startswith("hermes_")}


def _versions(url: str, table: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table(table):
                return set()
            return set(conn.scalars(text(f"SELECT version_num FROM {table}")))
    finally:
        engine.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Client:
    """JSON over HTTP to the app's uvicorn."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, Any]:
        """The status and the JSON answered; ``raw``: a body sent as it is, as text."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        kind = "text/plain" if raw is not None else "application/json"
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"content-type": kind}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """Start ``uvicorn chat_app.service:app`` on a database; stopped after the test."""
    servers: list[subprocess.Popen[bytes]] = []

    def start(url: str) -> Client:
        port = _free_port()
        log = (tmp_path / f"uvicorn-{port}.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "chat_app.service:app", "--port", str(port)],
            cwd=APP,
            env={**os.environ, "CHAT_APP_DATABASE_URL": url},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        servers.append(server)
        client = Client(port)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.call("GET", "/accounts")
                return client
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.close()
                    output = (tmp_path / f"uvicorn-{port}.log").read_text()
                    raise AssertionError(f"uvicorn did not start:\n{output}") from None
                time.sleep(0.1)

    yield start
    for server in servers:
        server.terminate()
        server.wait(timeout=30)


def _use_the_app(client: Client) -> None:
    """A few requests a user of the app makes; each shows one promise."""
    status, alice = client.call("POST", "/accounts", {"name": "alice"})
    assert status == 200, alice
    status, bob = client.call("POST", "/accounts", {"name": "bob"})
    assert status == 200, bob

    turn = [
        {"role": "user", "content": "where is the lighthouse"},
        {"role": "assistant", "content": "on the northern cape"},
    ]
    status, saved = client.call("POST", "/chats/c1", {"account_id": alice["id"], "messages": turn})
    assert (status, saved) == (200, {"written": 2, "cursor": 2})
    # The same conversation sent again (a retried request): nothing twice.
    status, saved = client.call("POST", "/chats/c1", {"account_id": alice["id"], "messages": turn})
    assert (status, saved) == (200, {"written": 0, "cursor": 2})
    longer = [*turn, {"role": "user", "content": "and the harbour"}]
    status, saved = client.call(
        "POST", "/chats/c1", {"account_id": alice["id"], "messages": longer}
    )
    assert (status, saved) == (200, {"written": 1, "cursor": 3})
    rewritten = [{"role": "user", "content": "something else"}, *longer[1:]]
    status, refused = client.call(
        "POST", "/chats/c1", {"account_id": alice["id"], "messages": rewritten}
    )
    assert status == 409, refused

    status, chat = client.call("GET", f"/chats/c1?account_id={alice['id']}")
    assert (status, chat) == (200, {"messages": longer})
    status, found = client.call("GET", f"/search?q=lighthouse&account_id={alice['id']}")
    assert status == 200
    assert [hit["chat_id"] for hit in found["hits"]] == ["c1"]
    # Another account sees neither the chat nor its words.
    assert client.call("GET", f"/chats/c1?account_id={bob['id']}")[0] == 404
    assert client.call("GET", f"/search?q=lighthouse&account_id={bob['id']}") == (
        200,
        {"hits": []},
    )
    # A well-formed account id that names no account: 404 to save, nothing found.
    nobody = alice["id"] + bob["id"] + 1000
    status, refused = client.call("POST", "/chats/c9", {"account_id": nobody, "messages": turn})
    assert (status, refused) == (404, {"detail": f"no account {nobody}"})
    assert client.call("GET", f"/search?q=lighthouse&account_id={nobody}") == (200, {"hits": []})
    # Another account's chat id: 409, and nothing of it written.
    status, refused = client.call("POST", "/chats/c1", {"account_id": bob["id"], "messages": turn})
    assert status == 409, refused
    assert client.call("GET", f"/chats/c1?account_id={alice['id']}") == (200, {"messages": longer})
    _bad_requests_are_refused(client, alice["id"])


def _bad_requests_are_refused(client: Client, account: int) -> None:
    """What the app or hermes_orm refuses is the client's to correct (422), never a 500."""
    accounts = client.call("GET", "/accounts")
    turn = {"account_id": account, "messages": [{"role": "user", "content": "hi"}]}
    for method, path, body in [
        ("POST", "/chats/c%00x", turn),  # a chat id hermes_orm refuses
        ("POST", "/chats/" + "c" * 300, turn),
        ("POST", "/chats/c2", {**turn, "account_id": 2**70}),  # no 64-bit id
        ("POST", "/chats/c2", {**turn, "account_id": 2**31}),  # no id of the column's
        ("POST", "/chats/c2", {**turn, "messages": [{"role": 7}]}),  # no message
        ("GET", f"/chats/c%00?account_id={account}", None),
        ("GET", f"/search?q=%21%21%21&account_id={account}", None),  # nothing to look for
        ("GET", f"/search?q=a%00&account_id={account}", None),
        ("GET", "/search?q=lighthouse&account_id=0", None),
        ("POST", "/accounts", {"name": "n" * 200}),
        ("POST", "/accounts", {"name": "a\u0000"}),
        ("POST", "/accounts", {"name": ""}),
        ("POST", "/accounts", {"name": "\ud800"}),  # no Unicode text (a lone surrogate)
    ]:
        status, refused = client.call(method, path, body)
        assert status == 422, (path, body, refused)
    for raw in (b"\xff", b'"\xed\xa0\x80"'):  # not UTF-8, and not sent as JSON
        status, refused = client.call("POST", "/chats/c2", raw=raw)
        assert status == 422, (raw, refused)
    assert client.call("GET", "/accounts") == accounts  # nothing made
    # The chat the refused message was for is made (ensure_session) but holds nothing.
    assert client.call("GET", f"/chats/c2?account_id={account}") == (200, {"messages": []})


def _a_locked_database_is_unavailable_for_now(url: str, client: Client) -> None:
    """The database locked past the app's wait (SQLite: another writer, a long flush): 503,
    to try again; not the app's error (500), nor the client's."""
    if not url.startswith("sqlite"):
        return
    import sqlite3

    path = url.removeprefix("sqlite:///")
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        status, answer = client.call("POST", "/accounts", {"name": "while locked"})
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert status == 503, answer
    assert client.call("POST", "/accounts", {"name": "after"})[0] == 200
    # Any other database error is the app's (a missing table: SQLite says
    # OperationalError too): a 500, not a 503 that says to try again.
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE accounts RENAME TO accounts_aside")
    try:
        request = urllib.request.Request(client.base + "/accounts")
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(request, timeout=30)
        assert failed.value.code == 500
    finally:
        with sqlite3.connect(path) as conn:
            conn.execute("ALTER TABLE accounts_aside RENAME TO accounts")


def _served_after_the_server_drops_its_connections(url: str, client: Client) -> None:
    """A PostgreSQL restart or idle timeout ends the pooled connections: no request fails."""
    if not url.startswith("postgresql"):
        return
    accounts = client.call("GET", "/accounts")[1]
    # Requests at once leave the app's pool holding several connections.
    with ThreadPoolExecutor(8) as burst:
        assert set(burst.map(lambda _: client.call("GET", "/accounts")[0], range(32))) == {200}
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ended = conn.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
    finally:
        engine.dispose()
    assert ended  # the app's pooled connections
    # The app's own queries first: hermes_orm's calls retry on a lost connection,
    # and SQLAlchemy then drops every connection the pool held.
    for n in range(8):
        status, made = client.call("POST", "/accounts", {"name": f"carol{n}"})
        assert status == 200, made
    assert len(client.call("GET", "/accounts")[1]) == len(accounts) + 8
    assert client.call("GET", f"/chats/c1?account_id={accounts[0]['id']}")[0] == 200


def _autogenerate_is_silent(url: str, mode: str) -> None:
    """The app's ``alembic check`` proposes nothing, and neither does hermes_orm's."""
    result = _alembic(url, mode, "check")
    assert "No new upgrade operations detected" in result.stdout + result.stderr
    engine = create_engine(url)
    try:
        assert migrations.differences(engine) == []
    finally:
        engine.dispose()


def test_side_by_side(empty_db_url: str, serve: Any) -> None:
    url = empty_db_url
    _alembic(url, "side_by_side", "upgrade", "head")
    assert _versions(url, "alembic_version") == {HOST_REVISION}
    assert _versions(url, migrations.VERSION_TABLE) == {migrations.head()}
    assert {"accounts", "hermes_sessions", "hermes_messages"} <= _tables(url)

    # The app's tables go and come back while hermes_orm's stay at head: the
    # upgrade that finds hermes_orm at head hands the connection back with no
    # transaction open, so the app's own migration and its stamp are kept.
    _alembic(url, "side_by_side", "downgrade", "base")
    assert "accounts" not in _tables(url)
    assert _versions(url, "alembic_version") == set()
    _alembic(url, "side_by_side", "upgrade", "head")
    assert "accounts" in _tables(url)
    assert _versions(url, "alembic_version") == {HOST_REVISION}

    _autogenerate_is_silent(url, "side_by_side")
    client = serve(url)
    _use_the_app(client)
    _served_after_the_server_drops_its_connections(url, client)
    _a_locked_database_is_unavailable_for_now(url, client)

    _alembic(url, "side_by_side", "downgrade", "base")
    assert "accounts" not in _tables(url)
    store = SessionStore(url)
    assert len(store.get_messages("c1")) == 3  # hermes_orm's own, untouched
    store.close()
    engine = create_engine(url)
    migrations.downgrade(engine, "base")
    engine.dispose()
    assert _hermes_tables(url) == {migrations.VERSION_TABLE}
    assert _versions(url, migrations.VERSION_TABLE) == set()


@pytest.mark.heavy
def test_as_a_branch(empty_db_url: str, serve: Any) -> None:
    url = empty_db_url
    if url.startswith("postgresql"):  # pg_trgm where the path does not look (a managed service)
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE SCHEMA extensions")
            conn.exec_driver_sql("CREATE EXTENSION pg_trgm SCHEMA extensions")
        engine.dispose()
    result = _alembic(url, "branch", "heads")
    assert f"{migrations.head()} (hermes_orm)" in result.stdout.replace(" (head)", "")
    _alembic(url, "branch", "upgrade", "hermes_orm@head")
    assert _versions(url, "alembic_version") == {migrations.head()}
    _alembic(url, "branch", "upgrade", "heads")
    assert _versions(url, "alembic_version") == {HOST_REVISION, migrations.head()}
    assert _versions(url, migrations.VERSION_TABLE) == set()

    # The store accepts the database, and its side-by-side runner leaves it alone.
    engine = create_engine(url)
    try:
        migrations.check(engine)
        assert migrations.current(engine) == migrations.head()
        SessionStore(engine).upgrade()  # at head already: nothing to do
        # (what to run instead is the host's own downgrade of the branch, below)
        with pytest.raises(
            migrations.SchemaManagedByHostError, match="`alembic downgrade hermes_orm@base`"
        ):
            migrations.downgrade(engine, "base")
    finally:
        engine.dispose()

    _autogenerate_is_silent(url, "branch")
    _use_the_app(serve(url))

    _alembic(url, "branch", "downgrade", "hermes_orm@base")
    assert _versions(url, "alembic_version") == {HOST_REVISION}
    assert _hermes_tables(url) == set()
    assert "accounts" in _tables(url)
    _alembic(url, "branch", "downgrade", "chat_app@base")
    assert "accounts" not in _tables(url)


def test_a_revision_of_the_app_depending_on_ours_is_named_in_the_refusal(
    empty_db_url: str, tmp_path: Path
) -> None:
    """Alembic then records only the app's revision: the store cannot tell which of ours
    the tables are at, and its refusal says why and what to do."""
    app = tmp_path / "chat_app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__", "*.db"))
    (app / "migrations" / "versions" / "app_0002_links.py").write_text(
        f"""\"\"\"Links to chats, after hermes_orm's tables.\"\"\"

import sqlalchemy as sa
from alembic import op

revision = "app_0002_links"
down_revision = "{HOST_REVISION}"
branch_labels = None
depends_on = "{migrations.head()}"


def upgrade() -> None:
    op.create_table(
        "links",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("session_id", sa.String(255), sa.ForeignKey("hermes_sessions.id")),
    )


def downgrade() -> None:
    op.drop_table("links")
"""
    )
    _alembic(empty_db_url, "branch", "upgrade", "heads", app=app)
    assert _versions(empty_db_url, "alembic_version") == {"app_0002_links"}
    with pytest.raises(DatabaseError, match="depends on hermes_orm's") as refused:
        SessionStore(empty_db_url).get_session("s")
    assert "keep the branches apart" in str(refused.value)
