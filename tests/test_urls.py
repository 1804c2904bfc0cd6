"""PostgreSQL URLs as operators write them: libpq's multi-host form."""

from __future__ import annotations

import asyncio
import socket

import pytest
from sqlalchemy.engine import make_url

from hermes_orm import AsyncSessionStore, SessionStore
from hermes_orm._dialects import normalize_url, safe_url
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

        async def main() -> None:
            store = AsyncSessionStore(url)
            await store.create_session("s", source="cli")
            assert (await store.flush("s", [{"role": "user", "content": "hi"}])).cursor == 1
            await store.close()

        asyncio.run(main())
    _drop_pg_database(pg_server_url, db_url)
