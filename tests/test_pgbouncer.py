"""A store behind a real PgBouncer in transaction pooling mode, and PostgreSQL URL options.

The whole flush suite also runs through PgBouncer in CI
(``pytest tests/test_flush.py -m postgresql --through-pgbouncer``); these tests
pin what only the pooler shows: startup options refused, prepared statements
meeting another client's server connection, settings that must live in the
transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

import hermes_orm
from devtools.pgbouncer import pgbouncer
from hermes_orm import (
    AsyncSessionStore,
    DatabaseBusyError,
    DatabaseError,
    InvalidArgumentError,
    InvalidURLError,
    RetryPolicy,
    SessionStore,
    create_store_engine,
)
from tests.conftest import through_pgbouncer

pytestmark = [pytest.mark.postgresql, pytest.mark.direct("starts PgBouncers of its own")]


def _turns(n: int, tag: str) -> list[dict[str, Any]]:
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{tag}-{i}"} for i in range(n)
    ]


@pytest.fixture
def pg_db(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database migrated to head on the test server, reached directly."""
    from tests.conftest import _create_pg_database, _drop_pg_database

    server = request.getfixturevalue("pg_server_url")
    url = _create_pg_database(server, request.getfixturevalue("pg_template"))
    yield url
    _drop_pg_database(server, url)


@pytest.fixture
def pooled(pg_db: str, pgbouncer_url: str) -> str:
    """The same database through the shared PgBouncer, with ``?pgbouncer=true``."""
    return through_pgbouncer(pgbouncer_url, pg_db)


def _stripped(url: str) -> str:
    return make_url(url).difference_update_query(["pgbouncer"]).render_as_string(False)


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_startup_options_refused_by_the_pooler_say_what_to_do(pooled: str, driver: str) -> None:
    url = make_url(_stripped(pooled)).set(drivername=f"postgresql+{driver}")
    retry = RetryPolicy(attempts=8, base_delay=0.5)
    started = time.monotonic()
    if driver == "psycopg":
        store = SessionStore(url, retry=retry)
        with pytest.raises(DatabaseError, match=r"add \?pgbouncer=true to the URL"):
            store.create_session("s", source="cli")
        store.close()
    else:

        async def main() -> None:
            store = AsyncSessionStore(url, retry=retry)
            try:
                await store.create_session("s", source="cli")
            finally:
                await store.close()

        with pytest.raises(DatabaseError, match=r"add \?pgbouncer=true to the URL"):
            asyncio.run(main())
    assert time.monotonic() - started < 3  # refused for good: not retried for seconds


def test_migration_functions_and_the_command_line_say_what_to_do_too(
    pooled: str, pg_db: str
) -> None:
    """hermes_orm.upgrade(url) and the rest connect as a store does: the same refusal."""
    from hermes_orm import migrations
    from tests.conftest import run_cli

    url = _stripped(pooled)
    # An application's engine, given instead of a URL, on a database that is not there.
    engine = create_engine(make_url(pg_db).set(database="no_such_database"))
    for call in (hermes_orm.upgrade, hermes_orm.check_schema, migrations.current):
        with pytest.raises(DatabaseError, match=r"add \?pgbouncer=true to the URL"):
            call(url)
        with pytest.raises(DatabaseError, match="no_such_database"):
            call(engine)
    engine.dispose()
    done = run_cli("--url", url, "db", "upgrade", env=dict(os.environ))
    assert done.returncode == 2
    assert "add ?pgbouncer=true to the URL" in done.stderr
    assert "Traceback" not in done.stderr


def test_options_and_the_pooler_do_not_go_together(pooled: str) -> None:
    with pytest.raises(InvalidURLError, match="PgBouncer refuses startup options"):
        create_store_engine(make_url(pooled).update_query_dict({"options": "-c work_mem=64MB"}))


def test_writers_sharing_server_connections_store_each_message_once(pooled: str) -> None:
    """More threads than server connections, each flushing many times: exact."""
    store = SessionStore(create_store_engine(pooled, pool_size=8, max_overflow=0))
    sessions = [f"s{i}" for i in range(4)]
    for session_id in sessions:
        store.create_session(session_id, source="cli")
    full = {session_id: _turns(40, session_id) for session_id in sessions}
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for end in range(1, 41):
                session_id = sessions[(n + end) % len(sessions)]
                store.flush(session_id, full[session_id][:end])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for session_id in sessions:
        store.flush(session_id, full[session_id])
        assert store.get_messages(session_id) == full[session_id]
        assert store.get_session(session_id)["message_count"] == 40  # type: ignore[index]
    store.close()


def test_prepared_statements_meeting_on_one_server_connection(
    pg_server_url: str, pg_db: str
) -> None:
    """psycopg prepares a statement its connection ran 5 times; behind one shared
    server connection, the second client's prepare collides with the first's.
    An engine the store builds for the pooler prepares nothing."""
    with pgbouncer(pg_server_url, pool_size=1) as pooler_url:
        url = _stripped(through_pgbouncer(pooler_url, pg_db))
        plain = create_engine(url)  # an application's engine, made with no thought of the pooler
        first, second = SessionStore(plain), SessionStore(plain)  # a client connection each
        first.create_session("p1", source="cli")
        second.create_session("p2", source="cli")
        for end in range(1, 8):
            first.flush("p1", _turns(end, "p1"))

        def flush_as_the_first_did() -> None:
            for end in range(1, 8):
                second.flush("p2", _turns(end, "p2"))

        with pytest.raises(DatabaseError, match="prepare_threshold"):
            flush_as_the_first_did()
        first.close()
        second.close()
        plain.dispose()

        first, second = SessionStore(url + "?pgbouncer=true"), SessionStore(url + "?pgbouncer=true")
        for store, session_id in ((first, "q1"), (second, "q2")):
            store.create_session(session_id, source="cli")
            for end in range(1, 8):
                store.flush(session_id, _turns(end, session_id))
            assert store.get_messages(session_id) == _turns(7, session_id)
        first.close()
        second.close()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg_async"])
def test_an_engine_passed_in_with_the_flag_prepares_nothing(
    pg_server_url: str, pg_db: str, driver: str
) -> None:
    """Two applications' engines made with psycopg's defaults (and their replicas' engines),
    each told to the store it is behind the pooler: their clients share its one server
    connection, and no statement
    one prepared there runs as the other's. Each prepared its own 6th call's statement
    under the same name: the second's collided, or ran the first's, another session's
    row returned as the one asked for."""
    with pgbouncer(pg_server_url, pool_size=1) as pooler_url:
        url = make_url(_stripped(through_pgbouncer(pooler_url, pg_db))).set(
            drivername=f"postgresql+{driver}"
        )

        async def calls(first: Any, second: Any) -> None:
            async def run(result: Any) -> Any:
                return await result if asyncio.iscoroutine(result) else result

            await run(first.create_session("seven", source="cli", title="seven"))
            await run(second.create_session("other", source="cli", title="other"))
            for _ in range(7):
                assert (await run(first.get_session("seven")))["title"] == "seven"
                for store in (first, second):
                    listed = await run(store.list_sessions(limit=5))
                    assert sorted(row["id"] for row in listed.sessions) == ["other", "seven"]
                assert (await run(second.get_session("other")))["title"] == "other"
            for store in (first, second):
                await run(store.close())

        # Each with a replica engine of its own too (the same database), serving the lists.
        if driver == "psycopg":
            engines = [create_engine(url) for _ in range(4)]
            pairs = zip(engines[::2], engines[1::2], strict=True)
            asyncio.run(calls(*(SessionStore(e, pgbouncer=True, replica=r) for e, r in pairs)))
            for engine in engines:
                engine.dispose()
        else:

            async def main() -> None:
                engines = [create_async_engine(url) for _ in range(4)]
                pairs = zip(engines[::2], engines[1::2], strict=True)
                await calls(*(AsyncSessionStore(e, pgbouncer=True, replica=r) for e, r in pairs))
                for engine in engines:
                    await engine.dispose()

            asyncio.run(main())


@pytest.mark.parametrize("driver", ["psycopg", "psycopg_async"])
def test_the_flag_in_the_primarys_url_holds_for_a_replica_url_without_its_own(
    pg_server_url: str, pg_db: str, driver: str
) -> None:
    """``?pgbouncer=true`` said once, in the primary's URL: the replica URL without the
    flag is behind the pooler too (its startup option was refused by the pooler). A
    replica URL saying ``pgbouncer=false`` (a standby reached directly) is taken at its
    word, and a replica engine the application passes is left as it is: it is theirs,
    perhaps shared by stores with other settings (``pgbouncer=True`` says it is behind)."""
    from hermes_orm import _dialects

    with pgbouncer(pg_server_url, pool_size=1) as pooler_url:
        flagged = make_url(through_pgbouncer(pooler_url, pg_db)).set(
            drivername=f"postgresql+{driver}"
        )
        bare = make_url(_stripped(flagged.render_as_string(False)))
        direct = make_url(pg_db).set(drivername=f"postgresql+{driver}")
        blocking = driver == "psycopg"
        kind: Any = SessionStore if blocking else AsyncSessionStore

        def engine_of(replica: Any) -> Any:
            return replica if blocking else replica.sync_engine

        async def calls() -> None:
            async def run(result: Any) -> Any:
                return await result if asyncio.iscoroutine(result) else result

            stores = [kind(flagged, replica=bare) for _ in range(2)]
            for n, store in enumerate(stores):
                await run(store.create_session(f"s{n}", source="cli"))
            for _ in range(7):  # (psycopg prepares a statement at its 6th run)
                for store in stores:
                    listed = await run(store.list_sessions(limit=5))
                    assert sorted(row["id"] for row in listed.sessions) == ["s0", "s1"]
            said = kind(flagged, replica=direct.update_query_dict({"pgbouncer": "false"}))
            assert [r["id"] for r in (await run(said.list_sessions())).sessions] == ["s1", "s0"]
            assert said._replica_of not in _dialects._per_transaction
            make = create_engine if blocking else create_async_engine
            theirs = make(direct)
            for timeout in (5, 2):  # two stores' settings, one shared engine: both built
                await run(kind(flagged, replica=theirs, lock_timeout=timeout).close())
            assert engine_of(theirs) not in _dialects._per_transaction
            await run(theirs.dispose())
            for store in (*stores, said):
                await run(store.close())

        asyncio.run(calls())


def test_an_asyncpg_engine_passed_in_with_the_flag_leaves_no_statement_on_the_server(
    pg_server_url: str, pg_db: str
) -> None:
    """asyncpg names the statements it caches from a counter each process starts at 1,
    and they stay on the pooler's server connection, where another process's statement
    of the same name runs in their place. An application's engines made with asyncpg's
    defaults (the primary's and a replica's), told to a store with the flag, prepare no
    named statement from then on: a connection made before is replaced, and the
    application's own queries on them are made the same way. An engine a store builds
    for the pooler prepares none either."""
    with pgbouncer(pg_server_url, pool_size=1) as pooler_url:
        url = make_url(_stripped(through_pgbouncer(pooler_url, pg_db))).set(
            drivername="postgresql+asyncpg"
        )
        named = text("SELECT name FROM pg_prepared_statements")

        async def main() -> None:
            engine, replica = create_async_engine(url), create_async_engine(url)
            for one in (engine, replica):
                async with one.connect() as conn:  # pooled, with asyncpg's caches
                    before = set((await conn.execute(named)).scalars())
            assert before  # asyncpg's own, left on the one server connection
            store = AsyncSessionStore(engine, pgbouncer=True, replica=replica)
            await store.create_session("s", source="cli")
            for end in range(1, 5):
                await store.flush("s", _turns(end, "s"))
                assert await store.get_messages("s") == _turns(end, "s")
                assert [row["id"] for row in (await store.list_sessions()).sessions] == ["s"]
            for one in (engine, replica):
                async with one.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                    assert set((await conn.execute(named)).scalars()) == before
            await store.close()
            # A store that builds its engine from the URL: the same.
            built = AsyncSessionStore(url.render_as_string(False) + "?pgbouncer=true")
            await built.create_session("b", source="cli")
            for end in range(1, 5):
                await built.flush("b", _turns(end, "b"))
                assert await built.get_messages("b") == _turns(end, "b")
            await built.close()
            async with engine.connect() as conn:
                assert set((await conn.execute(named)).scalars()) == before
            for one in (engine, replica):
                await one.dispose()

        asyncio.run(main())


def test_an_asyncpg_engine_made_by_a_creator_is_refused_with_the_flag(pg_db: str) -> None:
    """A creator makes its connections with SQLAlchemy's statement cache whatever the
    store is told, and no ``do_connect`` runs to change it: a typed refusal saying what
    to do, before anything is written (it was SQLAlchemy's "This connection is
    closed", on every checkout)."""
    url = make_url(pg_db).set(drivername="postgresql+asyncpg")

    async def main() -> None:
        import asyncpg

        async def connect() -> Any:
            return await asyncpg.connect(
                host=url.host, port=url.port, user=url.username, database=url.database
            )

        engine = create_async_engine(url, async_creator=connect)
        store = AsyncSessionStore(engine, pgbouncer=True)
        with pytest.raises(InvalidArgumentError, match="makes its connections with a creator"):
            await store.create_session("s", source="cli")
        await store.close()
        await engine.dispose()
        assert SessionStore(pg_db).get_session("s") is None

    asyncio.run(main())


def test_the_prepared_statement_hint_names_the_drivers_own_settings() -> None:
    """asyncpg's adapter error (as PgBouncer makes it): asyncpg's settings, not psycopg's."""
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi
    from sqlalchemy.exc import DBAPIError

    from hermes_orm._dialects import pooler_hint

    missing = AsyncAdapt_asyncpg_dbapi.ProgrammingError(
        'prepared statement "__asyncpg_stmt_1b__" does not exist'
    )
    hint = pooler_hint(DBAPIError("SELECT 1", (), missing))
    assert "'statement_cache_size': 0" in hint
    assert "prepared_statement_name_func" in hint
    assert "prepare_threshold" not in hint


def test_startup_options_from_pgoptions_are_named(
    pooled: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """?pgbouncer=true given, the options come from libpq's environment: that is named."""
    monkeypatch.setenv("PGOPTIONS", "-c work_mem=8MB")
    store = SessionStore(pooled, retry=RetryPolicy(attempts=1))
    with pytest.raises(DatabaseError, match="PGOPTIONS in the environment gives some too"):
        store.get_session("s")
    store.close()


def test_lock_timeout_is_set_in_each_transaction(pooled: str, pg_db: str) -> None:
    """The pooler keeps no session settings: the lock wait still ends, set per transaction."""
    store = SessionStore(pooled, lock_timeout=0.2, retry=RetryPolicy(attempts=2, base_delay=0.01))
    store.create_session("s", source="cli")
    holder = create_engine(pg_db)
    outcome: list[BaseException | None] = []
    with holder.begin() as conn:
        conn.execute(text("SELECT 1 FROM hermes_sessions WHERE id = 's' FOR UPDATE"))

        def flush() -> None:
            try:
                store.flush("s", _turns(2, "s"))
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=flush)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive(), "a flush behind PgBouncer waited for the lock without bound"
    assert len(outcome) == 1, outcome
    assert isinstance(outcome[0], DatabaseBusyError), outcome
    assert store.get_messages("s") == []
    store.close()
    holder.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg_async", "asyncpg"])
def test_a_read_behind_a_held_lock_is_bounded_too(pooled: str, pg_db: str, driver: str) -> None:
    """A migration's lock (or VACUUM FULL's): reads wait no longer than writes, and say busy."""
    url = make_url(pooled).set(drivername=f"postgresql+{driver}").render_as_string(False)
    policy = RetryPolicy(attempts=2, base_delay=0.01, attempt_timeout=20)
    SessionStore(pooled).create_session("s", source="cli")
    holder = create_engine(pg_db)
    try:
        with holder.begin() as conn:
            conn.exec_driver_sql("LOCK TABLE hermes_messages IN ACCESS EXCLUSIVE MODE")
            if driver == "psycopg":
                store = SessionStore(url, lock_timeout=0.2, retry=policy)
                with pytest.raises(DatabaseBusyError):
                    store.get_messages("s")
                store.close()
            else:

                async def read() -> None:
                    store = AsyncSessionStore(url, lock_timeout=0.2, retry=policy)
                    try:
                        with pytest.raises(DatabaseBusyError):
                            await store.get_messages("s")
                    finally:
                        await store.close()

                asyncio.run(read())
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            ).scalar()
            assert waiting == 0  # no server process left queued on the lock
    finally:
        holder.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg_async", "asyncpg"])
def test_asyncio_stores_behind_the_pooler(pooled: str, driver: str) -> None:
    url = make_url(pooled).set(drivername=f"postgresql+{driver}").render_as_string(False)

    async def main() -> None:
        store = AsyncSessionStore(url)
        await store.create_session("a", source="cli")
        full = _turns(30, "a")

        async def writer() -> None:
            for end in range(1, 31):
                await store.flush("a", full[:end])

        await asyncio.gather(*(writer() for _ in range(6)))
        assert await store.get_messages("a") == full
        await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("driver", ["psycopg", "psycopg_async", "asyncpg"])
def test_no_prepared_statement_is_left_on_the_poolers_server_connections(
    pg_server_url: str, pg_db: str, driver: str
) -> None:
    """Nothing builds up on the server connections the pooler shares between clients.

    asyncpg closes a named statement it no longer needs with the connection's
    next query, which the pooler may send to another server connection: each
    one left the statement (and its memory) where it was prepared.
    """
    with pgbouncer(pg_server_url, pool_size=3) as pooler_url:
        pooled = make_url(through_pgbouncer(pooler_url, pg_db))
        url = pooled.set(drivername=f"postgresql+{driver}").render_as_string(False)

        async def work() -> None:
            store = AsyncSessionStore(url)

            async def writer(session_id: str) -> None:
                await store.create_session(session_id, source="cli")
                for end in range(1, 41):
                    await store.flush(session_id, _turns(end, session_id))
                    await store.get_messages(session_id, offset=end - 1)

            await asyncio.gather(*(writer(f"w{k}") for k in range(6)))
            await store.close()

        asyncio.run(work())
        # Three clients, each in a transaction: each holds a server connection of its own.
        engine = create_engine(_stripped(pooled.render_as_string(False)))
        conns = [engine.connect() for _ in range(3)]
        left = [
            conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar_one()
            for conn in conns
        ]
        for conn in conns:
            conn.close()
        engine.dispose()
    assert left == [0, 0, 0]


def test_an_engine_passed_in_sets_lock_timeout_per_transaction_too(pooled: str) -> None:
    engine = create_engine(_stripped(pooled), connect_args={"prepare_threshold": None})
    store = SessionStore(engine, pgbouncer=True, lock_timeout=0.3)
    store.create_session("e", source="cli")
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    store.flush("e", _turns(3, "e"))
    assert seen[0] == "SELECT set_config('lock_timeout', '300', true)", seen
    assert store.get_messages("e") == _turns(3, "e")
    with pytest.raises(InvalidArgumentError, match="lock_timeout"):
        SessionStore(engine, pgbouncer=True, lock_timeout=2)  # one setting per engine
    store.close()
    engine.dispose()


def test_the_urls_own_options_are_kept_beside_the_lock_timeout(pg_db: str) -> None:
    url = make_url(pg_db).update_query_dict({"options": "-c statement_timeout=4321"})
    engine = create_store_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "4321ms"
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "5s"
    engine.dispose()
    # Options from the URL and from connect_args both go, beside ours.
    engine = create_store_engine(url, connect_args={"options": "-c work_mem=7MB"})
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "4321ms"
        assert conn.exec_driver_sql("SHOW work_mem").scalar() == "7MB"
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "5s"
    engine.dispose()
    # A lock_timeout of the URL's own wins, its name written either way; a value naming
    # it is no setting of it.
    for options, shown in (
        ("-c lock_timeout=777", "777ms"),
        ("-c lock-timeout=778", "778ms"),
        ("--lock-timeout=779", "779ms"),
        ("-c application_name=my_lock_timeout", "5s"),
    ):
        engine = create_store_engine(make_url(pg_db).update_query_dict({"options": options}))
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == shown, options
        engine.dispose()


def test_a_lock_timeout_under_a_millisecond_is_one_not_none(pooled: str, pg_db: str) -> None:
    """PostgreSQL's lock_timeout counts whole milliseconds, and 0 is no limit at all."""
    engine = create_store_engine(pg_db, lock_timeout=0.0004)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "1ms"
    engine.dispose()
    store = SessionStore(pooled, lock_timeout=0.0004)  # set in each write transaction
    assert (
        store.write_transaction(lambda conn: conn.exec_driver_sql("SHOW lock_timeout").scalar())
        == "1ms"
    )
    store.close()


def test_asyncpg_takes_the_urls_options_and_application_name_as_server_settings(
    pg_db: str,
) -> None:
    """libpq's startup parameters, which asyncpg refuses by name, reach the server."""
    from hermes_orm._dialects import create_async_store_engine

    query = {"options": "-c statement_timeout=4321 -cwork_mem=7MB", "application_name": "agents"}
    url = make_url(pg_db).set(drivername="postgresql+asyncpg").update_query_dict(query)

    async def shown(url: Any, **engine: Any) -> list[str]:
        async_engine = create_async_store_engine(url, **engine)
        try:
            async with async_engine.connect() as conn:
                names = ("statement_timeout", "work_mem", "application_name", "lock_timeout")
                return [(await conn.exec_driver_sql(f"SHOW {n}")).scalar_one() for n in names]
        finally:
            await async_engine.dispose()

    assert asyncio.run(shown(url)) == ["4321ms", "7MB", "agents", "5s"]
    # A lock_timeout of the URL's own wins; connect_args' options go too, a name with
    # dashes read as the server reads it (a value's dashes kept).
    url = url.update_query_dict({"options": "-c lock-timeout=777"}).difference_update_query(
        ["application_name"]
    )
    given = {"options": "--work-mem=9MB --application-name=web-1"}
    assert asyncio.run(shown(url, connect_args=given))[1:] == ["9MB", "web-1", "777ms"]
    assert given == {"options": "--work-mem=9MB --application-name=web-1"}  # the caller's, as given
    with pytest.raises(InvalidURLError, match="asyncpg takes only settings"):
        create_async_store_engine(url.update_query_dict({"options": "-X nonsense"}))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h/db?pgbouncer=maybe",
        "sqlite:///x.db?pgbouncer=true",
    ],
)
def test_a_bad_pgbouncer_flag_is_refused(url: str) -> None:
    with pytest.raises(InvalidURLError, match="pgbouncer"):
        create_store_engine(url)
    with pytest.raises(InvalidArgumentError, match="pgbouncer"):
        SessionStore("sqlite://", pgbouncer="yes")  # type: ignore[arg-type]


def test_a_task_cancelled_as_its_transaction_begins_leaves_no_connection_behind(
    pooled: str, pg_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush's task is cancelled while the driver's BEGIN is on its way.

    asyncpg then keeps a transaction that SQLAlchemy's adapter does not know
    of: given back to the pool, its connection would run every later
    transaction as a savepoint inside it, reported committed and never
    committed. What a direct connection sees is the judge.
    """
    import asyncpg.connection

    url = make_url(pooled).set(drivername="postgresql+asyncpg").render_as_string(False)
    armed: list[asyncio.Task[Any]] = []
    plain = asyncpg.connection.Connection.execute

    async def execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if armed and query.startswith("BEGIN"):  # injected: cancelled while BEGIN is in flight
            asyncio.get_running_loop().call_soon(armed.pop().cancel)
        return await plain(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "execute", execute)
    history, turn = _turns(4, "h"), _turns(7, "h")

    async def main() -> None:
        store = AsyncSessionStore(url)
        await store.create_session("s", source="cli")
        await store.flush("s", history)
        task = asyncio.ensure_future(store.flush("s", turn, verify="full"))  # the locked path
        armed.append(task)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert (await store.flush("s", turn, verify="full")).cursor == len(turn)
        await store.create_session("s2", source="cli")
        await store.close()

    asyncio.run(main())
    direct = SessionStore(pg_db)
    assert direct.get_messages("s") == turn
    assert direct.get_session("s2") is not None
    direct.close()


def test_a_cancelled_write_behind_the_pooler_looks_for_no_server_process(
    pooled: str, pg_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The id asyncpg knows is the pooler's: no server process has it. The store
    drops the connection and looks nowhere for it (README: not waited for)."""
    import logging

    url = make_url(pooled).set(drivername="postgresql+asyncpg").render_as_string(False)
    history, turn = _turns(2, "c"), _turns(4, "c")
    asked: list[str] = []

    async def main() -> None:
        store = AsyncSessionStore(url)
        event.listen(
            store.engine.sync_engine,
            "before_cursor_execute",
            lambda _c, _cur, statement, *_a: asked.append(statement),
        )
        await store.create_session("s", source="cli")
        await store.flush("s", history)
        holder = create_engine(pg_db)
        with holder.begin() as conn:  # the flush waits for the session's row
            conn.exec_driver_sql("SELECT 1 FROM hermes_sessions WHERE id = 's' FOR UPDATE")
            task = asyncio.ensure_future(store.flush("s", turn))
            await asyncio.sleep(0.5)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        holder.dispose()
        assert task.cancelled()
        assert (await store.flush("s", turn)).cursor == len(turn)
        assert await store.get_messages("s") == turn
        await store.close()

    with caplog.at_level(logging.WARNING, logger="hermes_orm"):
        asyncio.run(main())
    assert not [s for s in asked if "pg_stat_activity" in s], asked
    assert not [r for r in caplog.records if "cancelled write" in r.getMessage()]


@contextlib.contextmanager
def _pooler_of_a_server_down() -> Iterator[str]:
    """A store's URL through PgBouncer (``?pgbouncer=true``) to a database migrated to head,
    whose server PgBouncer has met, and which is then stopped."""
    from devtools.postgres import local_postgres

    with local_postgres() as server, pgbouncer(server.url) as pooler_url:
        url = through_pgbouncer(pooler_url, server.url)
        with SessionStore(url) as store:
            store.upgrade()
        server.stop()
        yield url


#: The other drivers and entries of a deadline test run in CI's heavy step (each
#: starts a server and a pooler of its own).
_ALSO_HEAVY = pytest.mark.heavy


@pytest.mark.parametrize(
    ("driver", "call"),
    [
        ("psycopg", "read"),
        pytest.param("psycopg", "upgrade", marks=_ALSO_HEAVY),
        pytest.param("asyncpg", "read", marks=_ALSO_HEAVY),
        pytest.param("psycopg_async", "read", marks=_ALSO_HEAVY),
    ],
)
def test_a_first_connection_the_pooler_answers_for_a_server_down_keeps_the_deadline(
    driver: str, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PgBouncer answers a login itself once it has met its server, whatever the server's
    state since; SQLAlchemy's first statements on a new engine then wait in its queue
    (120 s by default).

    A new store's first call (a read, an upgrade), with the server down,
    gives up as the retry policy says (each try bounded by
    ``attempt_timeout``, all by ``unavailable_for``), on every driver.
    """
    with _pooler_of_a_server_down() as pooled:
        url = make_url(pooled).set(drivername=f"postgresql+{driver}")
        policy = RetryPolicy(unavailable_for=3, attempt_timeout=2)

        def first_call() -> None:
            if driver == "psycopg":
                store = SessionStore(url, retry=policy)
                try:
                    if call == "upgrade":
                        store.upgrade()
                    else:
                        store.get_session("s")
                finally:
                    store.close()
                return

            async def read() -> None:
                store = AsyncSessionStore(url, retry=policy)
                try:
                    await store.get_session("s")
                finally:
                    await store.close()

            asyncio.run(read())

        started = time.monotonic()
        with (
            caplog.at_level("INFO", logger="hermes_orm"),
            pytest.raises(hermes_orm.DatabaseUnavailableError),
        ):
            first_call()
        assert time.monotonic() - started < 3 + 2 + 5  # the span, its last try, slack
        if (driver, call) == ("psycopg", "read"):  # the first try, abandoned at its deadline
            assert "no answer within attempt_timeout, 2 s" in caplog.text


@pytest.mark.parametrize(
    "driver", ["psycopg_async", pytest.param("psycopg", marks=_ALSO_HEAVY), "asyncpg"]
)
def test_a_pooled_connection_pinged_for_a_server_down_keeps_the_deadline(driver: str) -> None:
    """An application's engine with ``pool_pre_ping`` pings a pooled connection in the
    checkout. Behind PgBouncer with the server down since, that ping waits in its queue
    (120 s by default): the store's try is bounded by ``attempt_timeout`` there too.

    (The asynchronous store keeps no connection on PostgreSQL: each call checks one out;
    the blocking one here has to, as another store left it in the pool.)
    """
    from devtools.postgres import local_postgres

    policy = RetryPolicy(unavailable_for=3, attempt_timeout=2)
    with local_postgres() as server, pgbouncer(server.url) as pooler_url:
        url = make_url(through_pgbouncer(pooler_url, server.url))
        with SessionStore(url) as store:
            store.upgrade()
            store.create_session("s", source="cli")
        # The application's engine: its URL without the store's own option.
        url = url.set(drivername=f"postgresql+{driver}", query={})

        def read_before_and_after_the_stop() -> None:
            if driver == "psycopg":
                engine = create_engine(url, pool_pre_ping=True)
                with SessionStore(engine, retry=policy, pgbouncer=True) as first:
                    assert first.get_session("s") is not None  # the pool keeps its connection
                server.stop()
                try:
                    SessionStore(engine, retry=policy, pgbouncer=True).get_session("s")
                finally:
                    engine.dispose()
                return

            async def reads() -> None:
                engine = create_async_engine(url, pool_pre_ping=True)
                store = AsyncSessionStore(engine, retry=policy, pgbouncer=True)
                try:
                    assert await store.get_session("s") is not None
                    server.stop()
                    await store.get_session("s")
                finally:
                    await store.close()
                    await engine.dispose()

            asyncio.run(reads())

        started = time.monotonic()
        with pytest.raises(hermes_orm.DatabaseUnavailableError):
            read_before_and_after_the_stop()
        assert time.monotonic() - started < 3 + 2 + 5  # the span, its last try, slack


@pytest.mark.parametrize(
    "command", [("status",), pytest.param(("db", "current"), marks=_ALSO_HEAVY)]
)
def test_a_first_command_the_pooler_answers_for_a_server_down_ends_within_a_connect(
    command: tuple[str, ...], tmp_path: Any
) -> None:
    """``hermes-orm status`` and ``db`` say a database behind PgBouncer is out of reach
    within a connect's time, not PgBouncer's 120 s queue wait."""
    from tests.conftest import run_cli
    from tests.test_cli import clean_env

    with _pooler_of_a_server_down() as url:
        started = time.monotonic()
        done = run_cli(*command, "--url", url, env=clean_env(tmp_path))
        took = time.monotonic() - started
    assert done.returncode != 0
    assert took < 10 + 15  # a connect's time, and a process's start


def test_a_migration_function_given_a_url_ends_within_a_connect_too() -> None:
    """``hermes_orm.migrations.current(url)`` with the server behind PgBouncer down: the
    driver's error (as for any connection lost) within a connect's time, not 120 s."""
    from sqlalchemy.exc import OperationalError

    with _pooler_of_a_server_down() as url:
        started = time.monotonic()
        with pytest.raises(OperationalError):
            hermes_orm.migrations.current(url)
        assert time.monotonic() - started < 10 + 5


@_ALSO_HEAVY
def test_a_replica_engine_passed_in_behind_the_pooler_gives_way_within_the_deadline(
    pg_db: str,
) -> None:
    """A replica engine the application made, behind PgBouncer, its server down: the
    first read goes to the primary once the try's deadline passed, not after 120 s."""
    from devtools.postgres import local_postgres

    with local_postgres() as server, pgbouncer(server.url) as pooler_url:
        replica = create_engine(
            make_url(server.url).set(
                host=make_url(pooler_url).host, port=make_url(pooler_url).port
            ),
            connect_args={"prepare_threshold": None},
        )
        met = create_engine(replica.url, connect_args={"prepare_threshold": None})
        with met.connect() as conn:  # PgBouncer has met the server: it answers logins itself
            conn.execute(text("SELECT 1"))
        met.dispose()
        server.stop()
        store = SessionStore(pg_db, replica=replica, retry=RetryPolicy(attempt_timeout=2))
        try:
            store.create_session("s", source="cli")
            store.flush("s", _turns(1, "r"))
            started = time.monotonic()
            assert store.get_messages("s") == _turns(1, "r")
            assert time.monotonic() - started < 2 + 5
        finally:
            store.close()
            replica.dispose()
