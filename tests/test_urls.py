"""Database URLs as operators write them: libpq's forms, passwords, SQLite file names."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import stat
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from hermes_orm import AsyncSessionStore, InvalidURLError, SessionStore
from hermes_orm._dialects import normalize_url, redact, safe_url
from tests.conftest import _create_pg_database, _drop_pg_database


def test_the_multi_host_form_becomes_host_parameters() -> None:
    url = normalize_url(
        "postgresql://u:se%40cret@h1:5432,h2:5433/db?target_session_attrs=read-write"
    )
    assert url.query["host"] == ("h1:5432", "h2:5433")
    assert url.query["target_session_attrs"] == "read-write"
    assert (url.database, url.username, url.password) == ("db", "u", "se@cret")
    shown = safe_url("postgresql://u:se%40cret@h1:5432,h2:5433/db")
    assert "se%40cret" not in shown
    assert "se@cret" not in shown


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.postgresql
@pytest.mark.direct("names the test server's host and port itself")
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_a_store_reaches_the_first_host_that_answers(
    pg_server_url: str, pg_template: str, driver: str
) -> None:
    """The first host is down (a failed primary): the store connects to the next."""
    db_url = _create_pg_database(pg_server_url, pg_template)
    real = make_url(db_url)
    hosts = f"127.0.0.1:{_closed_port()},{real.host}:{real.port}"
    url = f"postgresql+{driver}://{real.username}@{hosts}/{real.database}"
    if driver == "psycopg":
        store = SessionStore(url + "?target_session_attrs=read-write")
        store.create_session("s", source="cli")
        assert store.flush("s", [{"role": "user", "content": "hi"}]).cursor == 1
        store.close()
    else:
        asyncio.run(_flush_once_async(url))
    _drop_pg_database(pg_server_url, db_url)


async def _flush_once_async(url: str) -> None:
    """An AsyncSessionStore on ``url`` creates a session and flushes a message into it."""
    store = AsyncSessionStore(url)
    await store.create_session("s", source="cli")
    assert (await store.flush("s", [{"role": "user", "content": "hi"}])).cursor == 1
    await store.close()


@pytest.mark.postgresql
@pytest.mark.direct("writes the URL's parameters itself")
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_libpq_parameters_in_a_url_work_on_either_driver(
    pg_server_url: str, pg_template: str, driver: str
) -> None:
    """``connect_timeout`` and ``sslmode`` are libpq's names; asyncpg calls them otherwise."""
    db_url = _create_pg_database(pg_server_url, pg_template)
    real = make_url(db_url)
    url = (
        f"postgresql+{driver}://{real.username}@{real.host}:{real.port}/{real.database}"
        "?connect_timeout=5&sslmode=disable"
    )
    try:
        asyncio.run(_flush_once_async(url))
    finally:
        _drop_pg_database(pg_server_url, db_url)


#: Texts holding the password "s3cret" or "sec ret" that are no database URL:
#: libpq's key=value strings, and URLs whose port is not a number.
NOT_URLS = [
    "host=db user=u password=s3cret dbname=x",
    "host=db PASSWORD = s3cret",
    "host=db sslpassword=s3cret",
    "host=db password='sec ret' dbname=x",
    r"host=db password='it\'s sec ret' dbname=x",
    "postgresql://u:sec ret@h:abc/db",
    "postgresql://u@h:abc/db?sslmode=require&Password=s3cret",
    "postgresql://u@h:abc/db?password=sec ret&sslmode=require",
    # The @host left out: SQLAlchemy reads the password as a host's port.
    "postgresql://admin:s3cret/db",
    "postgresql://admin:s3cret",
    # A password holding an @: SQLAlchemy cuts it there and reads the rest as the host.
    "postgresql://admin:p@s3cret@127.0.0.1/db",
    "postgresql://admin:se?c@ret@127.0.0.1:1/db",
    # The @host left out, the password holding what ends a port.
    "postgresql://admin:Xy7/s3c+ret=/db",
    "postgresql://admin:s3c'ret/db",
    "postgresql://admin:s3cret,x/db",
    # A password holding an @ and a /: its rest read as a host and a database.
    "postgresql://admin:s3c@ret/x@127.0.0.1:1/db",
    "postgresql://admin:s3c@ret/@127.0.0.1:1/db",
    # A password holding an @, then a blank, a ? or a / with a blank after it.
    "postgresql://u:p@s3c ret@127.0.0.1:5432/db",
    "postgresql://u:Tr0ub@s3c?ret@127.0.0.1:5432/db",
    "postgresql://u:p@s3c/x ret@127.0.0.1:5432/db",
    "postgresql://u:p@s3c:w/o?r#d ret@127.0.0.1/db",
]
#: URLs that parse, with a password SQLAlchemy reads as such.
URLS = [
    "postgresql://u:sec ret@h/db",
    "postgresql://user@srv:s3cret@h/db",
    "postgresql://u:s3c/r:et@h/db",
    "postgresql://u@h/db?Password=s3cret",
    "postgresql://u:s3c,ret@127.0.0.1:5/db",  # a comma: no list of hosts
]


@pytest.mark.parametrize("text", NOT_URLS + URLS)
def test_no_password_form_is_shown(text: str) -> None:
    """libpq's key=value strings, blanks, ``@`` in the user, any case: never the password."""
    for shown in (redact(text), safe_url(text), redact(f"invalid choice: {text!r} (choose)")):
        for secret in ("s3c", "ret"):
            assert secret not in shown, shown
        assert "***" in shown


@pytest.mark.parametrize("text", NOT_URLS)
def test_an_invalid_url_error_holds_no_password(text: str) -> None:
    with pytest.raises(InvalidURLError) as raised:
        SessionStore(text)
    assert "ret" not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{tmp}/a:b@c/x@y.db",  # a path may hold : and @
        "sqlite:///file:{tmp}/a@b@c.db?uri=true",
    ],
)
def test_a_sqlite_path_holding_at_signs_and_colons_is_a_file_there(
    tmp_path: Path, url: str
) -> None:
    (tmp_path / "a:b@c").mkdir()
    store = SessionStore(url.format(tmp=tmp_path))
    store.upgrade()
    store.create_session("s", source="cli")
    store.close()
    assert [p.name for p in tmp_path.rglob("*.db")] in (["x@y.db"], ["a@b@c.db"])


def test_an_at_sign_in_a_postgresql_database_name_is_written_percent_40() -> None:
    """After a password, an @ may be the password's own: written as is, it is refused."""
    parsed = normalize_url("postgresql://u:p@host/d%40b")
    assert (parsed.host, parsed.database) == ("host", "d@b")
    assert normalize_url("postgresql://u@host/d@b").database == "d@b"  # no password: no doubt
    with pytest.raises(InvalidURLError, match="written %40"):
        normalize_url("postgresql://u:p@host/d@b")
    # In the query an @ is a value's: the query begins at a ? and a parameter's name.
    for query in ("?application_name=me@laptop", "?sslrootcert=/home/me@corp/root.crt"):
        url = f"postgresql://hermes:pw@db.internal:5432/hermes{query}"
        parsed = normalize_url(url)
        assert (parsed.host, parsed.database) == ("db.internal", "hermes")
        assert safe_url(url).startswith("postgresql://hermes:***@db.internal:5432/hermes?")


def test_a_url_is_shown_as_before() -> None:
    url = "postgresql+psycopg://hermes:s3cret-pw@127.0.0.1:9/none?sslmode=require&password=x"
    assert safe_url(url) == (
        "postgresql+psycopg://hermes:***@127.0.0.1:9/none?password=***&sslmode=require"
    )
    assert redact(f"error at {url}\nrefused") == (
        "error at postgresql+psycopg://hermes:***@127.0.0.1:9/none?sslmode=require&password=***"
        "\nrefused"
    )
    assert redact("connection to server at 127.0.0.1, port 9 failed") == (
        "connection to server at 127.0.0.1, port 9 failed"
    )
    assert safe_url("sqlite:////tmp/a b/agent.db") == "sqlite:////tmp/a b/agent.db"
    assert safe_url("postgresql://h1:5432,h2:5433/db") == "postgresql://h1:5432,h2:5433/db"
    hint = "connection to http://proxy:3128/ refused\nHINT: ask dba@corp.example"
    assert redact(hint) == hint  # a password is not looked for past the end of the line
    said = "cannot reach postgresql://u:pw@db.example.com:5432/app (contact dba@example.com)"
    assert redact(said) == said.replace(":pw@", ":***@")  # an @ after the URL is not its own
    # A URL's password with a blank, beside another URL on the line: each is its own.
    both = redact("copy postgresql://h1/db to postgresql://u:p@s3c ret@h2/db now")
    assert both == "copy postgresql://h1/db to postgresql://u:***@h2/db now"
    with pytest.raises(InvalidURLError) as refused:
        normalize_url("postgresql://u:p@s3c ret@h2/db")
    assert redact(str(refused.value)) == str(refused.value)  # a message shown twice reads alike
    # No host part after the blank: hidden up to the last @ of the line still.
    for host in ("db.example.com", "db.example.com?sslmode=require"):
        line = f"connecting to postgresql://u:p@s3c ret@{host} failed"
        assert redact(line) == f"connecting to postgresql://u:***@{host} failed"


def test_a_long_line_is_redacted_in_one_pass() -> None:
    """A URL and then a long word (a blob in a log line): no pattern backtracks over it."""
    import time

    for line in (
        "postgresql://u:p@h " + "a" * 200_000,
        "postgresql://u:pw@db/x " + "b@" * 100_000,
        "postgresql://h/db " * 20_000,
    ):
        start = time.perf_counter()
        redact(line)
        assert time.perf_counter() - start < 5.0  # (a walk back over the word: minutes)


def test_an_undecodable_file_name_is_shown_escaped() -> None:
    """A path byte that is not UTF-8 (a lone surrogate in ``str``) prints as ``\\xff``."""
    url = "sqlite:////tmp/d\udcff/x.db"
    for shown in (safe_url(url), safe_url(make_url(url)), redact(url)):
        shown.encode("utf-8")  # printable on any UTF-8 stream
        assert "xff" in shown
    assert safe_url(url) == "sqlite:////tmp/d\\xff/x.db"


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_sqlite_file_that_cannot_be_created_is_an_invalid_url(tmp_path: Path, api: str) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    url = f"sqlite:///{not_a_directory}/x.db"
    store_class = SessionStore if api == "sync" else AsyncSessionStore
    with pytest.raises(InvalidURLError, match="cannot create the SQLite file"):
        store_class(url)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_tilde_is_the_home_directory_for_the_file_and_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    """SQLite would open ``./~/x.db``: the engine opens the file created 0600 in $HOME."""
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    (elsewhere / "~").mkdir()  # where SQLite alone would put the file
    url = "sqlite:///~/x.db"
    if api == "sync":
        with SessionStore(url) as store:
            store.upgrade()
            store.create_session("s", source="cli")
    else:

        async def main() -> None:
            store = AsyncSessionStore(url)
            await store.upgrade()
            await store.create_session("s", source="cli")
            await store.close()

        asyncio.run(main())
    assert stat.S_IMODE((home / "x.db").stat().st_mode) == 0o600
    with sqlite3.connect(home / "x.db") as conn:
        assert conn.execute("SELECT id FROM hermes_sessions").fetchall() == [("s",)]
    assert list((elsewhere / "~").iterdir()) == []


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_sqlite_file_named_by_a_file_uri_is_created_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    """As one named by a path: read as a URI (``uri=true``) or as a name, ``file:`` and all;
    a URI whose mode creates no file (``ro``) makes none."""
    monkeypatch.chdir(tmp_path)
    made = {
        f"sqlite:///file:{tmp_path / 'uri.db'}?uri=true": tmp_path / "uri.db",
        "sqlite:///file:relative.db?uri=true&cache=shared": tmp_path / "relative.db",
        "sqlite:///file:name.db": tmp_path / "file:name.db",
    }
    read_only = f"sqlite:///file:{tmp_path / 'ro.db'}?uri=true&mode=ro"
    for url in [*made, read_only]:
        if api == "sync":
            SessionStore(url).close()
        else:

            async def make(url: str = url) -> None:
                await AsyncSessionStore(url).close()

            asyncio.run(make())
    for path in made.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert not (tmp_path / "ro.db").exists()


@pytest.mark.parametrize("database", ["agent.db", ":memory:", ""])
def test_sqlite_uri_options_on_a_name_that_is_no_uri_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str
) -> None:
    """SQLite reads a name as a URI only when it begins with ``file:``: it would open a
    file named ``agent.db?mode=ro``. Refused by either store and the CLI; nothing made."""
    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{database}?mode=ro&uri=true&timeout=1"
    with pytest.raises(InvalidURLError, match=r"begins with 'file:'.* mode would do nothing"):
        SessionStore(url)
    with pytest.raises(InvalidURLError, match="begins with 'file:'"):
        AsyncSessionStore(url.replace("sqlite://", "sqlite+aiosqlite://"))
    listed = run_cli("sessions", "list", "--url", url, env={**os.environ}, cwd=tmp_path)
    assert listed.returncode == 2, listed
    assert "sqlite:///file:" in listed.stderr, listed.stderr
    assert list(tmp_path.iterdir()) == []
    with SessionStore(f"sqlite:///{database}?uri=true&timeout=1") as store:  # (no URI options)
        store.upgrade()


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_sqlite_file_named_by_a_uri_is_switched_to_wal(tmp_path: Path, api: str) -> None:
    """As one named by a path: readers and the writer then do not wait for each other."""
    url = f"sqlite:///file:{tmp_path / 'uri.db'}?uri=true&cache=private"
    if api == "sync":
        with SessionStore(url) as store:
            store.upgrade()
    else:

        async def main() -> None:
            store = AsyncSessionStore(url)
            await store.upgrade()
            await store.close()

        asyncio.run(main())
    with sqlite3.connect(tmp_path / "uri.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_store_shows_no_password_of_its_url() -> None:
    """repr() of either store, as a log line or a traceback would show it."""
    from hermes_orm import AsyncSessionStore

    url = "postgresql://hermes:s3cret@127.0.0.1:9/none?password=ret-in-query"
    for shown in (repr(SessionStore(url)), repr(AsyncSessionStore(url))):  # never connects
        assert "s3cret" not in shown, shown
        assert "ret-in-query" not in shown, shown
        assert "hermes:***@127.0.0.1:9/none" in shown


def test_each_store_takes_the_sqlite_driver_of_its_api(tmp_path: Path) -> None:
    """pysqlite is taken as aiosqlite by the asyncio store; aiosqlite is refused by the
    blocking one, which could not run it."""

    async def main() -> str:
        store = AsyncSessionStore(f"sqlite+pysqlite:///{tmp_path / 'a.db'}")
        await store.upgrade()
        await store.create_session("s", source="cli")
        driver = store.engine.dialect.driver
        await store.close()
        return driver

    assert asyncio.run(main()) == "aiosqlite"
    with pytest.raises(InvalidURLError, match="'aiosqlite' is not for SessionStore"):
        SessionStore(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    assert not (tmp_path / "b.db").exists()


def test_a_sqlite_database_in_memory_is_told_from_a_file(tmp_path: Path) -> None:
    """Without uri=true SQLite takes a file: name for a file's, whatever its query."""
    from hermes_orm._dialects import sqlite_in_memory

    for memory in (
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file::memory:?uri=true",
        "sqlite:///file:x?mode=memory&uri=true",
        "sqlite:///file:/x.db?vfs=memdb&uri=true",
    ):
        assert sqlite_in_memory(memory), memory
    for file in (
        f"sqlite:///{tmp_path / 'x.db'}",
        "sqlite:///file:x.db?vfs=memdb",
        "sqlite:///file:x.db?mode=memory",
        f"sqlite:///file:{tmp_path / 'vfs=memdb.db'}?uri=true",
        "postgresql://u@h/db",
    ):
        assert not sqlite_in_memory(file), file


def test_a_store_given_neither_a_url_nor_its_kind_of_engine_says_so(tmp_path: Path) -> None:
    """A connection, an ORM session, the other kind of engine: refused as what they are."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.orm import Session

    from hermes_orm import InvalidArgumentError

    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    with engine.connect() as conn, Session(engine) as orm:
        for store, bind, hint in (
            (SessionStore, conn, "pass the engine it is on"),
            (SessionStore, orm, "pass the engine it is on"),
            (SessionStore, async_engine, "AsyncSessionStore an AsyncEngine"),
            (AsyncSessionStore, engine, "SessionStore takes an Engine"),
            (SessionStore, 5, "got int"),
        ):
            with pytest.raises(InvalidArgumentError, match="takes a database URL") as refused:
                store(bind)
            assert hint in str(refused.value)
    engine.dispose()
    asyncio.run(async_engine.dispose())


def test_the_sync_engine_of_an_async_engine_is_refused_outside_run_sync(tmp_path: Path) -> None:
    """Its connections block only inside ``run_sync``: elsewhere the store says what to use,
    connecting to nothing; inside, a store made on ``conn.engine`` works there."""
    from sqlalchemy import Connection
    from sqlalchemy.ext.asyncio import create_async_engine

    from hermes_orm import InvalidArgumentError

    path = tmp_path / "app.db"
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    for call in (
        lambda: SessionStore(async_engine.sync_engine),
        lambda: SessionStore(f"sqlite:///{path}", replica=async_engine.sync_engine),
    ):
        with pytest.raises(InvalidArgumentError, match="'aiosqlite' is for asyncio: use Async"):
            call()
    assert async_engine.sync_engine.pool.checkedout() == 0

    def inside(conn: Connection) -> list[str]:
        with SessionStore(conn.engine) as store:
            store.upgrade()
            store.create_session("s", source="cli")
            return [session["id"] for session in store.list_sessions().sessions]

    async def run() -> list[str]:
        async with async_engine.connect() as conn:
            return await conn.run_sync(inside)

    assert asyncio.run(run()) == ["s"]
    asyncio.run(async_engine.dispose())


def test_a_url_holding_a_byte_that_is_not_utf8_is_an_invalid_url() -> None:
    """A command's argument keeps such a byte as a lone surrogate: no connection string
    can carry it to the server, and the driver's own error would be a traceback."""
    import os

    for url in (
        os.fsdecode(b"postgresql://u:secr\xffet@127.0.0.1:1/db"),
        os.fsdecode(b"postgresql://u:secret@127.0.0.1:1/db?application_name=\xff"),
    ):
        for store_class in (SessionStore, AsyncSessionStore):
            with pytest.raises(InvalidURLError, match="not UTF-8") as refused:
                store_class(url)
            assert "secr" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:secret@127.0.0.1:1/post%00gres",
        "postgresql://u%00x:secret@127.0.0.1:1/db",
        "postgresql://u:sec%00ret@127.0.0.1:1/db",
        "postgresql://u:secret@127.0.0.1:1/db?application_name=a%00b",
    ],
)
def test_a_postgresql_url_holding_a_nul_is_an_invalid_url(url: str) -> None:
    """libpq stops reading its connection string at a NUL: the user, password and port
    after it were dropped, and the store dialled another server as another user."""
    for store_class in (SessionStore, AsyncSessionStore):
        with pytest.raises(InvalidURLError, match="NUL character") as refused:
            store_class(url)
        assert "secret" not in str(refused.value)
        assert "sec%00ret" not in str(refused.value)
