"""Reads from a streaming standby (``replica=``), writes to the primary.

A real primary and a hot standby cloned from it with pg_basebackup, on
loopback. Replay on the standby is paused to make it visibly behind: what a
read returns then says which server served it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.pool import NullPool

from devtools.postgres import PostgresServer, local_postgres, local_standby
from hermes_orm import (
    AsyncSessionStore,
    InvalidArgumentError,
    InvalidURLError,
    RetryPolicy,
    SessionStore,
)
from tests.conftest import BlockingStore

pytestmark = [pytest.mark.postgresql, pytest.mark.direct("starts a primary and a standby")]

APIS = ("sync", "async", "asyncpg")


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with local_postgres() as primary:
        SessionStore(primary.url).upgrade()
        with local_standby(primary) as standby:
            yield primary, standby


def _url(server: PostgresServer, api: str) -> str:
    driver = {"sync": "psycopg", "async": "psycopg_async", "asyncpg": "asyncpg"}[api]
    return make_url(server.url).set(drivername=f"postgresql+{driver}").render_as_string(False)


def _store(api: str, primary: str, replica: str, **options: Any) -> Any:
    if api == "sync":
        return SessionStore(primary, replica=replica, **options)
    check = create_engine(primary, poolclass=NullPool)
    return BlockingStore(AsyncSessionStore(primary, replica=replica, **options), check)


def _replay(standby: PostgresServer, primary: PostgresServer, *, paused: bool) -> None:
    """Let the standby catch up with the primary, then pause or resume its replay."""
    with create_engine(primary.url, poolclass=NullPool).connect() as conn:
        target = conn.execute(text("SELECT pg_current_wal_insert_lsn()")).scalar_one()
    with create_engine(standby.url, poolclass=NullPool).connect() as conn:
        conn.execute(text("SELECT pg_wal_replay_resume()"))
        deadline = time.monotonic() + 30
        while not conn.execute(
            text("SELECT pg_last_wal_replay_lsn() >= CAST(:lsn AS pg_lsn)"), {"lsn": target}
        ).scalar_one():
            assert time.monotonic() < deadline, "the standby did not catch up"
            time.sleep(0.02)
        if paused:
            conn.execute(text("SELECT pg_wal_replay_pause()"))
            # The pause takes effect at the next record the standby receives: send one.
            with create_engine(primary.url, poolclass=NullPool).connect() as writer:
                writer.execute(text("SELECT txid_current()"))
                writer.commit()
            while conn.execute(text("SELECT pg_get_wal_replay_pause_state()")).scalar() != "paused":
                assert time.monotonic() < deadline, "the standby did not pause"
                time.sleep(0.02)
        conn.commit()


def test_a_standby_in_recovery_is_a_server_to_wait_for(
    cluster: tuple[PostgresServer, PostgresServer],
) -> None:
    """A retry whose COMMIT went unanswered may reach a standby not promoted yet.

    Asking it for the run of the server fails there as on a read-only server
    (SQLSTATE 25006, whatever the language of its messages): a server to wait
    for, not an error to give up on (the write may have landed).
    """
    from sqlalchemy.exc import DBAPIError

    from hermes_orm import _dialects

    primary, standby = cluster
    with create_engine(primary.url, poolclass=NullPool).connect() as conn:
        _xid, timeline = _dialects.transaction_id(conn) or (0, "")
        conn.rollback()
    with (
        create_engine(standby.url, poolclass=NullPool).connect() as conn,
        pytest.raises(DBAPIError) as raised,
    ):
        _dialects.same_timeline(conn, timeline)
    assert _dialects.is_unreachable(raised.value)
    assert _dialects.is_transient(raised.value)
    assert getattr(raised.value.orig, "sqlstate", None) == "25006"


@pytest.mark.parametrize("api", APIS)
def test_listing_reading_and_search_come_from_the_standby(
    cluster: tuple[PostgresServer, PostgresServer], api: str
) -> None:
    primary, standby = cluster
    store = _store(api, _url(primary, api), _url(standby, api))
    first = f"first-{api}"
    try:
        store.create_session(first, source="cli")
        store.flush(first, [{"role": "user", "content": "where is the lighthouse"}])
        _replay(standby, primary, paused=True)
        try:
            later = f"later-{api}"
            store.create_session(later, source="cli")
            store.flush(later, [{"role": "user", "content": "harbour lights"}])
            turn = [
                {"role": "user", "content": "where is the lighthouse"},
                {"role": "assistant", "content": "past the harbour"},
            ]
            assert store.flush(first, turn).written == 1  # the primary took the write
            # The standby has replayed neither the new session nor the new message.
            assert store.get_messages(first) == turn[:1]
            listed = {s["id"] for s in store.list_sessions(limit=100).sessions}
            assert first in listed
            assert later not in listed
            assert store.search("harbour", session_id=first).hits == []
            assert store.get_session(later) is not None  # not a listed read: the primary's
            # A session the standby does not have yet is read from the primary, and
            # so is a search in it (the standby has no hit there).
            assert [m["content"] for m in store.get_messages(later)] == ["harbour lights"]
            assert [h.session_id for h in store.search("harbour", session_id=later).hits] == [later]
            assert store.search("nowhere", session_id=later).hits == []
        finally:
            _replay(standby, primary, paused=False)
        assert store.get_messages(first) == turn
        assert [h.session_id for h in store.search("harbour", session_id=first).hits] == [first]
    finally:
        store.close()


def test_what_a_write_is_decided_on_is_read_on_the_primary(
    cluster: tuple[PostgresServer, PostgresServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hermes retries an append whose COMMIT landed unanswered; the standby lags.

    The adapter looks for the row the failed try wrote: found on a standby
    that has not replayed it, it would seem missing, and the message would be
    stored twice.
    """
    from hermes_orm import DatabaseUnavailableError
    from hermes_orm.integrations.hermes import SessionDB

    primary, standby = cluster
    store = SessionStore(primary.url, replica=standby.url)
    db = SessionDB(store)
    session = "retried-on-a-lagging-standby"
    try:
        db.create_session(session, source="cli")
        db.append_message(session, "user", "question")
        _replay(standby, primary, paused=True)
        try:
            real = SessionStore.append_row

            def unanswered(self: SessionStore, sid: str, message: dict[str, Any]) -> Any:
                real(self, sid, message)
                raise DatabaseUnavailableError("the COMMIT went unanswered", attempts=1, seconds=0)

            with monkeypatch.context() as patch:
                patch.setattr(SessionStore, "append_row", unanswered)
                with pytest.raises(DatabaseUnavailableError):
                    db.append_message(session, "assistant", "answer")
            first = db.append_message(session, "assistant", "answer")  # Hermes' retry
            assert [m["content"] for m in store.get_messages(session)] == ["question"]
            assert [m["content"] for m in store.primary_messages(session)] == [
                "question",
                "answer",
            ]
        finally:
            _replay(standby, primary, paused=False)
        assert [m["id"] for m in db.get_messages(session)][-1] == first
        assert [m["content"] for m in store.get_messages(session)] == ["question", "answer"]
    finally:
        store.close()


@pytest.mark.parametrize("api", APIS)
def test_a_standby_behind_an_upgrade_sends_reads_to_the_primary(
    cluster: tuple[PostgresServer, PostgresServer], api: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Its tables lack what this hermes_orm reads: its schema is checked, as the primary's."""
    from hermes_orm import migrations

    primary, standby = cluster
    database = f"behind_{api}"
    with create_engine(
        primary.url, isolation_level="AUTOCOMMIT", poolclass=NullPool
    ).connect() as c:
        c.execute(text(f"CREATE DATABASE {database}"))
    on_primary, on_standby = (
        make_url(_url(server, api)).set(database=database).render_as_string(False)
        for server in (primary, standby)
    )
    sync_url = make_url(primary.url).set(database=database).render_as_string(False)
    migrations.upgrade(sync_url, "0015_search_literal_nul_escape")
    _replay(standby, primary, paused=True)
    try:
        migrations.upgrade(sync_url)  # the standby has not replayed it
        store = _store(api, on_primary, on_standby)
        try:
            store.create_session("s", source="cli")
            store.flush("s", [{"role": "user", "content": "after the upgrade"}])
            with caplog.at_level(logging.WARNING, logger="hermes_orm"):
                assert [s["id"] for s in store.list_sessions().sessions] == ["s"]
                assert store.get_messages("s") == [{"role": "user", "content": "after the upgrade"}]
                assert [h.idx for h in store.search("upgrade").hits] == [0]
            told = [r.getMessage() for r in caplog.records if "not at the schema" in r.getMessage()]
            assert len(told) == 1, told
            assert "0015_search_literal_nul_escape" in told[0]
        finally:
            store.close()
    finally:
        _replay(standby, primary, paused=False)


@pytest.mark.parametrize("api", APIS)
def test_a_replica_out_of_reach_sends_reads_to_the_primary(
    cluster: tuple[PostgresServer, PostgresServer], api: str, caplog: pytest.LogCaptureFixture
) -> None:
    primary, _ = cluster
    gone = make_url(_url(primary, api)).set(port=1).render_as_string(False)  # nobody there
    store = _store(api, _url(primary, api), gone)
    session = f"fallback-{api}"
    try:
        store.create_session(session, source="cli")
        store.flush(session, [{"role": "user", "content": "anyone there"}])
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="hermes_orm"):
            for _ in range(3):
                assert store.get_messages(session) == [{"role": "user", "content": "anyone there"}]
        assert time.monotonic() - started < 5  # not the unreachable span of a write
        # Said once: the reads after the first skip the replica for a while.
        told = [r for r in caplog.records if "replica unreachable" in r.getMessage()]
        assert len(told) == 1
    finally:
        store.close()


def _replay_waits_for_a_lock(standby: PostgresServer) -> None:
    """Wait until the standby's recovery process waits for a lock (a replayed one)."""
    deadline = time.monotonic() + 30
    with create_engine(standby.url, poolclass=NullPool).connect() as conn:
        while not conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'startup' AND wait_event_type = 'Lock'"
            )
        ).scalar_one():
            conn.rollback()  # (a new snapshot of the activity each look)
            assert time.monotonic() < deadline, "the standby's replay never waited"
            time.sleep(0.05)


@pytest.mark.parametrize("api", APIS)
def test_a_standby_whose_replay_waits_for_a_lock_sends_reads_to_the_primary(
    cluster: tuple[PostgresServer, PostgresServer], api: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A long read on the standby holds up the replay of a lock (a VACUUM truncating the
    table, a migration), and every read behind the replay waits: past ``lock_timeout``
    the replica is busy, and the read goes to the primary, not waited out again."""
    primary, standby = cluster
    store = _store(api, _url(primary, api), _url(standby, api), lock_timeout=1)
    session = f"busy-{api}"
    report = create_engine(standby.url, poolclass=NullPool).connect()
    asked: list[int | None] = []  # the ports of servers asked who held locks

    def look(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "pg_locks" in statement:
            asked.append(conn.engine.url.port)

    event.listen(Engine, "before_cursor_execute", look)
    try:
        store.create_session(session, source="cli")
        store.flush(session, [{"role": "user", "content": "on both"}])
        _replay(standby, primary, paused=False)  # the standby has the session
        report.execute(text("SELECT count(*) FROM hermes_messages")).scalar()  # held open
        with create_engine(primary.url, poolclass=NullPool).begin() as conn:
            conn.execute(text("LOCK TABLE hermes_messages IN ACCESS EXCLUSIVE MODE"))
        _replay_waits_for_a_lock(standby)  # replayed: the standby's recovery waits for the report
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="hermes_orm"):
            for _ in range(3):
                assert store.get_messages(session) == [{"role": "user", "content": "on both"}]
        assert time.monotonic() - started < 1 + 3  # one lock_timeout, then the primary
        told = [r.getMessage() for r in caplog.records if "replica busy" in r.getMessage()]
        assert len(told) == 1, told
        assert "lock timeout" in told[0]
        assert "another writer" not in told[0]
        # Nobody asked the standby who held its locks: the read's error is not raised.
        assert make_url(standby.url).port not in asked
    finally:
        event.remove(Engine, "before_cursor_execute", look)
        report.rollback()
        report.close()
        store.close()


@pytest.mark.heavy  # (a primary and a standby of its own)
def test_a_read_the_standby_cancels_in_conflict_goes_to_the_primary_that_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A standby that cancels a read in conflict with its recovery (here at once:
    ``max_standby_streaming_delay=0``) cancels that one read: it goes to the primary, and
    the replica serves the next, with no cool-down and no WARNING."""
    with local_postgres() as primary:
        SessionStore(primary.url).upgrade()
        settings = {"max_standby_streaming_delay": "0"}
        with local_standby(primary, settings=settings) as standby:
            store = SessionStore(primary.url, replica=standby.url, lock_timeout=20)
            store.create_session("s", source="cli")
            store.flush("s", [{"role": "user", "content": "hi"}])
            _replay(standby, primary, paused=False)
            on_primary = create_engine(primary.url, poolclass=NullPool)
            sessions = on_primary.connect()  # the read waits for hermes_sessions...
            sessions.execute(text("LOCK TABLE hermes_sessions IN ACCESS EXCLUSIVE MODE"))
            with on_primary.connect() as conn:
                conn.execute(text("SELECT pg_switch_wal()"))
                conn.commit()
            time.sleep(1)
            read: dict[str, Any] = {}
            reader = threading.Thread(target=lambda: read.update(got=store.get_messages("s")))
            reader.start()
            time.sleep(1)  # ...holding hermes_messages, whose replayed lock cancels it
            messages = on_primary.connect()
            messages.execute(text("LOCK TABLE hermes_messages IN ACCESS EXCLUSIVE MODE"))
            with on_primary.connect() as conn:
                conn.execute(text("SELECT pg_switch_wal()"))
                conn.commit()
            time.sleep(1)
            sessions.rollback()
            messages.rollback()
            sessions.close()
            messages.close()
            with caplog.at_level(logging.WARNING, logger="hermes_orm"):
                reader.join(60)
                assert read == {"got": [{"role": "user", "content": "hi"}]}
            with create_engine(standby.url, poolclass=NullPool).connect() as conn:
                cancelled = conn.execute(
                    text(
                        "SELECT confl_lock FROM pg_stat_database_conflicts "
                        "WHERE datname = current_database()"
                    )
                ).scalar_one()
            assert cancelled == 1  # the read was cancelled there, and served by the primary
            assert not [r for r in caplog.records if "replica" in r.getMessage()]
            assert store._replica_back_at <= time.monotonic()  # no cool-down
            store.close()
            on_primary.dispose()


def test_a_replica_needs_postgresql_on_both_sides(tmp_path: Path) -> None:
    path = tmp_path / "agents.db"
    with pytest.raises(InvalidArgumentError, match="PostgreSQL standby"):
        SessionStore(f"sqlite:///{path}", replica="postgresql://u@h/db")
    with pytest.raises(InvalidArgumentError, match="PostgreSQL standby"):
        AsyncSessionStore("postgresql://u@h/db", replica=f"sqlite:///{path}")
    assert not path.exists()  # refused before anything was made
    from sqlalchemy.ext.asyncio import create_async_engine

    with pytest.raises(InvalidArgumentError, match="replica must be a URL or an Engine"):
        SessionStore(
            "postgresql://u@h/db", replica=create_async_engine("postgresql+asyncpg://h/db")
        )


def test_an_autocommitting_replica_engine_is_refused() -> None:
    """A read's settings (the store's schema on the search_path) last its transaction."""
    from sqlalchemy.ext.asyncio import create_async_engine

    replica = create_engine("postgresql+psycopg://u@h/db", isolation_level="AUTOCOMMIT")
    with pytest.raises(InvalidArgumentError, match="AUTOCOMMIT"):
        SessionStore("postgresql+psycopg://u@h/db", schema="tenant_a", replica=replica)
    async_replica = create_async_engine("postgresql+asyncpg://u@h/db", isolation_level="AUTOCOMMIT")
    with pytest.raises(InvalidArgumentError, match="AUTOCOMMIT"):
        AsyncSessionStore("postgresql+asyncpg://u@h/db", replica=async_replica)


def test_a_replica_in_another_schema_is_refused() -> None:
    """Its listing would show another schema's sessions beside the store's messages."""
    from sqlalchemy.ext.asyncio import create_async_engine

    url, async_url = "postgresql+psycopg://u@h/db", "postgresql+asyncpg://u@h/db"
    other = {"schema_translate_map": {None: "other"}}
    refused: list[tuple[Any, Any, dict[str, Any]]] = [
        (SessionStore, url, {"replica": f"{url}?schema=other"}),
        (SessionStore, url, {"replica": create_engine(url, execution_options=other)}),
        (
            SessionStore,
            url,
            {"schema": "public", "replica": create_engine(url, execution_options=other)},
        ),
        (AsyncSessionStore, async_url, {"replica": f"{async_url}?schema=other"}),
        (
            AsyncSessionStore,
            f"{async_url}?schema=mine",
            {"replica": create_async_engine(async_url, execution_options=other)},
        ),
    ]
    for store_class, bind, options in refused:
        with pytest.raises(InvalidArgumentError, match="name the same schema for both"):
            store_class(bind, **options)
    # One naming no schema reads the store's; one naming the same agrees.
    for store_class, bind, options in [
        (SessionStore, url, {"schema": "mine", "replica": url}),
        (SessionStore, url, {"schema": "mine", "replica": create_engine(url)}),
        (SessionStore, f"{url}?schema=mine", {"replica": f"{url}?schema=mine"}),
        (AsyncSessionStore, async_url, {"schema": "mine", "replica": async_url}),
    ]:
        store_class(bind, **options)


def test_a_refused_replica_leaves_the_engines_as_they_were() -> None:
    """Refused before the store gives either engine its settings: another store behind
    the pooler, with another lock_timeout, may still run on each."""
    from sqlalchemy.ext.asyncio import create_async_engine

    other = {"schema_translate_map": {None: "other"}}
    for store_class, url, make in [
        (SessionStore, "postgresql+psycopg://u@h/db", create_engine),
        (AsyncSessionStore, "postgresql+asyncpg://u@h/db", create_async_engine),
    ]:
        for primary in (url, make(url)):
            replica = make(url, execution_options=other)
            with pytest.raises(InvalidArgumentError, match="name the same schema for both"):
                store_class(primary, pgbouncer=True, lock_timeout=1, replica=replica)
            store_class(replica, pgbouncer=True, lock_timeout=2)
            store_class(primary, pgbouncer=True, lock_timeout=2)
        # A replica engine serving stores with another lock_timeout: the primary untouched.
        primary, replica = make(url), make(url)
        store_class(replica, pgbouncer=True, lock_timeout=1)
        with pytest.raises(InvalidArgumentError, match="lock_timeout=1 s, not 5 s"):
            store_class(primary, pgbouncer=True, lock_timeout=5, replica=replica)
        store_class(primary, pgbouncer=True, lock_timeout=2)
        # A replica URL refused as it is made leaves the application's engine alike.
        for refused in (f"{url}?schema=other", f"{url}?pgbouncer=maybe"):
            primary = make(url)
            with pytest.raises((InvalidArgumentError, InvalidURLError)):
                store_class(primary, pgbouncer=True, lock_timeout=1, replica=refused)
            store_class(primary, pgbouncer=True, lock_timeout=2)


@pytest.mark.parametrize("driver", ["psycopg_async", "asyncpg"])
def test_a_write_waits_for_a_standby_to_be_promoted(driver: str) -> None:
    """The URL asks for a server that takes writes; the one reachable is a standby, until
    it is promoted (a failover under way): the write waits for it, on either driver."""
    import asyncio
    import threading

    with local_postgres() as primary:
        SessionStore(primary.url).upgrade()
        SessionStore(primary.url).create_session("s", source="cli")
        with local_standby(primary) as standby:
            url = (
                make_url(standby.url)
                .set(drivername=f"postgresql+{driver}")
                .update_query_dict({"target_session_attrs": "read-write"})
                .render_as_string(False)
            )
            primary.stop()

            async def flush() -> Any:
                store = AsyncSessionStore(url)
                try:
                    return await store.flush("s", [{"role": "user", "content": "after"}])
                finally:
                    await store.close()

            promotion = threading.Timer(1.5, standby.promote)
            promotion.start()
            try:
                started = time.monotonic()
                assert asyncio.run(flush()).written == 1
                assert time.monotonic() - started >= 1.0  # it did wait
            finally:
                promotion.join()
            assert SessionStore(standby.url).get_messages("s") == [
                {"role": "user", "content": "after"}
            ]


def _every_host(url: str, driver: str, servers: list[Any], attrs: str) -> str:
    """A URL naming ``servers`` in order (``?host=`` form), asking for ``attrs``."""
    return (
        make_url(url)
        .set(drivername=f"postgresql+{driver}", host=None, port=None)
        .update_query_dict(
            {
                "host": [f"127.0.0.1:{server.port}" for server in servers],
                "target_session_attrs": attrs,
            }
        )
        .render_as_string(False)
    )


@pytest.mark.parametrize("driver", ["psycopg_async", "asyncpg"])
def test_a_standby_first_in_the_url_is_passed_over_for_the_primary(driver: str) -> None:
    """Each host tried in turn: one not of the kind asked for gives way to the next."""
    import asyncio

    with local_postgres() as primary, local_standby(primary) as standby:
        SessionStore(primary.url).upgrade()
        SessionStore(primary.url).create_session("s", source="cli")
        url = _every_host(primary.url, driver, [standby, primary], "read-write")

        async def flush() -> Any:
            store = AsyncSessionStore(url, retry=RetryPolicy(unavailable_for=5.0))
            try:
                return await store.flush("s", [{"role": "user", "content": "on the primary"}])
            finally:
                await store.close()

        assert asyncio.run(flush()).written == 1
        assert SessionStore(primary.url).get_messages("s") == [
            {"role": "user", "content": "on the primary"}
        ]


@pytest.mark.parametrize("driver", ["psycopg_async", "asyncpg"])
def test_prefer_standby_finds_the_standby_behind_the_primary(driver: str) -> None:
    """One URL naming every host, the primary first, still reaches the standby."""
    import asyncio

    from sqlalchemy import text

    from hermes_orm import create_async_store_engine

    with local_postgres() as primary, local_standby(primary) as standby:
        url = _every_host(primary.url, driver, [primary, standby], "prefer-standby")

        async def in_recovery() -> Any:
            engine = create_async_store_engine(url)
            try:
                async with engine.connect() as conn:
                    return (await conn.execute(text("SELECT pg_is_in_recovery()"))).scalar()
            finally:
                await engine.dispose()

        assert asyncio.run(in_recovery()) is True
        standby.stop()  # none left: any server will do
        assert asyncio.run(in_recovery()) is False


def test_verify_on_a_standby_checks_what_it_may_read_and_refuses_a_repair(
    cluster: tuple[PostgresServer, PostgresServer],
) -> None:
    """Its search check ran in a write transaction, which a standby never gives: verify
    waited for the server, then said it was out of reach. What needs a table of its own
    is told as not checked; a repair is refused up front, saying where to run it."""
    from hermes_orm import DatabaseError
    from hermes_orm.verify import verify_database

    primary, standby = cluster
    with SessionStore(primary.url) as writer:
        writer.create_session("verified-on-standby", source="cli")
        writer.flush("verified-on-standby", [{"role": "user", "content": "hello"}])
    _replay(standby, primary, paused=False)
    with SessionStore(standby.url, retry=RetryPolicy(unavailable_for=0.5)) as store:
        report = verify_database(store)
        assert report.ok, report.problems
        assert report.messages >= 1
        assert len(report.unchecked) == 1, report.unchecked
        assert "standby" in report.unchecked[0]
        with pytest.raises(DatabaseError, match="the server is a standby"):
            verify_database(store, repair=True)
