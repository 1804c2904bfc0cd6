"""``hermes_messages`` hash-partitioned by ``session_id`` (``upgrade(partitions=N)``).

The conversion of a fresh database and of one holding messages, what it
keeps (rows, ids, search, the sequence, the constraints), the store, search,
rebuild, schema check and the ORM path on it, and partition pruning in the
plans of the hot queries. The whole flush and search suites also run on a
partitioned schema in CI (``pytest tests/test_flush.py tests/test_search.py
-m postgresql --partitions 8``).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

import hermes_orm
from hermes_orm import (
    DatabaseError,
    InvalidArgumentError,
    Message,
    SchemaOutOfDateError,
    SessionStore,
    _dialects,
    migrations,
)
from tests.conftest import backend_terminated, listening, run_cli

pytestmark = [pytest.mark.postgresql, pytest.mark.direct("makes databases of its own")]

TURN = [
    {"role": "user", "content": "where is the lighthouse"},
    {"role": "assistant", "content": "灯台は北の岬にあります"},
    {"role": "tool", "content": "ok", "tool_call_id": "c1", "tool_name": "search"},
]


def _partitions(url: str) -> list[str]:
    with create_engine(url, poolclass=NullPool).connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "WHERE i.inhparent = 'hermes_messages'::regclass ORDER BY 1"
                )
            ).scalars()
        )


def test_a_fresh_database_migrates_partitioned_and_the_store_works_on_it(empty_pg: str) -> None:
    engine = create_engine(empty_pg, poolclass=NullPool)
    hermes_orm.upgrade(engine, partitions=4)
    assert _partitions(empty_pg) == [f"hermes_messages_part_{n:03d}" for n in range(4)]
    assert migrations.differences(engine) == []  # the models still match, partitions and all
    migrations.check(engine)
    store = SessionStore(empty_pg)
    for n in range(12):
        store.create_session(f"s{n}", source="cli")
        assert store.flush(f"s{n}", TURN).written == 3
        assert store.flush(f"s{n}", TURN).written == 0  # exactly once, as ever
    assert all(store.get_messages(f"s{n}") == TURN for n in range(12))
    assert len(store.search("lighthouse", limit=50).hits) == 12
    assert len(store.search("灯台", limit=50).hits) == 12
    assert store.rebuild_search_index() == 36
    assert len(store.search("lighthouse", limit=50).hits) == 12
    with create_engine(empty_pg, poolclass=NullPool).connect() as conn:
        spread = conn.execute(
            text("SELECT count(DISTINCT tableoid) FROM hermes_messages")
        ).scalar_one()
    assert spread > 1  # the sessions landed in several partitions
    store.close()


def test_a_database_holding_messages_keeps_them_all_when_split(empty_pg: str) -> None:
    store = SessionStore(empty_pg)
    store.upgrade()
    for n in range(20):
        store.create_session(f"s{n}", source="cli")
        store.flush(f"s{n}", TURN)
    engine = create_engine(empty_pg, poolclass=NullPool)
    with engine.connect() as conn:
        before = conn.execute(text("SELECT * FROM hermes_messages ORDER BY id")).all()
    assert migrations.partition_messages(engine, 8) is True
    assert migrations.partition_messages(engine, 8) is False  # already so: nothing done
    with engine.connect() as conn:
        after = conn.execute(text("SELECT * FROM hermes_messages ORDER BY id")).all()
        constraints = set(
            conn.execute(
                text(
                    "SELECT conname FROM pg_constraint WHERE conrelid = 'hermes_messages'::regclass"
                )
            ).scalars()
        )
    assert after == before  # every row, id and search column as it was
    assert constraints == {
        "pk_hermes_messages",
        "uq_hermes_messages_session_id_idx",
        "fk_hermes_messages_session_id_hermes_sessions",
    }
    store.forget_cursor("s0")
    assert store.flush("s0", [*TURN, {"role": "user", "content": "and then"}]).written == 1
    ids = [m["id"] for m in _rows(empty_pg, "s0")]
    assert ids[-1] > max(row.id for row in before)  # the sequence went with the table
    store.delete_session("s1")  # the cascade still holds
    assert _rows(empty_pg, "s1") == []
    assert migrations.differences(engine) == []
    store.close()


def _rows(url: str, session_id: str) -> list[dict[str, object]]:
    with create_engine(url, poolclass=NullPool).connect() as conn:
        rows = conn.execute(
            text("SELECT id, idx FROM hermes_messages WHERE session_id = :s ORDER BY idx"),
            {"s": session_id},
        )
        return [dict(r._mapping) for r in rows]


def test_the_orm_path_writes_into_the_partitions(empty_pg: str) -> None:
    engine = create_engine(empty_pg, poolclass=NullPool)
    hermes_orm.upgrade(engine, partitions=4)
    ours = sessionmaker(engine)
    hermes_orm.install_position_rule(ours)  # these sessions only, not the process's
    store = SessionStore(empty_pg)
    store.create_session("orm", source="cli")
    with ours() as session, session.begin():
        session.add(Message(session_id="orm", role="user", content="from the ORM"))
        session.add(Message(session_id="orm", role="assistant", content="placed"))
    assert [m["content"] for m in store.get_messages("orm")] == ["from the ORM", "placed"]
    assert store.get_session("orm")["flushed_idx"] == 2  # type: ignore[index]
    store.close()


def test_hot_queries_read_one_partition(empty_pg: str) -> None:
    engine = create_engine(empty_pg, poolclass=NullPool)
    hermes_orm.upgrade(engine, partitions=8)
    with engine.connect() as conn:
        plan = "\n".join(
            conn.execute(
                text(
                    "EXPLAIN SELECT * FROM hermes_messages WHERE session_id = 's' "
                    "AND idx >= 10 ORDER BY idx"
                )
            ).scalars()
        )
    assert plan.count("hermes_messages_part_") == 1, plan


def test_splitting_again_into_another_number_is_refused(empty_pg: str) -> None:
    engine = create_engine(empty_pg, poolclass=NullPool)
    hermes_orm.upgrade(engine, partitions=4)
    with pytest.raises(InvalidArgumentError, match="already split into 4"):
        migrations.partition_messages(engine, 8)
    assert len(_partitions(empty_pg)) == 4


def test_an_upgrade_whose_split_is_refused_leaves_the_schema_where_it_was(empty_pg: str) -> None:
    """The revisions and the split are one transaction: "nothing was changed" holds for both."""
    engine = create_engine(empty_pg, poolclass=NullPool)
    older = "0015_search_literal_nul_escape"
    hermes_orm.upgrade(engine, older)
    migrations.partition_messages(engine, 4)
    with pytest.raises(InvalidArgumentError, match="already split into 4"):
        hermes_orm.upgrade(engine, partitions=8)
    assert migrations.current(engine) == older
    result = run_cli("db", "upgrade", "--partitions", "8", env={"HERMES_ORM_URL": empty_pg})
    assert result.returncode == 2, result.stderr
    assert migrations.current(engine) == older
    hermes_orm.upgrade(engine, partitions=4)  # the same number: migrated, left as split
    assert migrations.current(engine) == migrations.head()
    assert len(_partitions(empty_pg)) == 4


def test_a_schema_not_migrated_yet_is_refused_not_read_through_the_path(empty_pg: str) -> None:
    """schema="agents" must not find public's hermes_messages further down the search_path."""
    engine = create_engine(empty_pg, poolclass=NullPool)
    hermes_orm.upgrade(engine)
    store = SessionStore(empty_pg)
    store.create_session("pub", source="cli")
    store.flush("pub", TURN)
    store.close()
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA agents")  # a tenant's, not migrated yet
    with pytest.raises(SchemaOutOfDateError, match=f"needs {migrations.head()}:"):
        migrations.partition_messages(engine, 4, schema="agents")
    assert _partitions(empty_pg) == []  # public's table left as it was
    store = SessionStore(empty_pg)
    assert len(store.get_messages("pub")) == 3
    store.close()
    engine.dispose()


@pytest.mark.parametrize("partitions", [1, 0, 1025, "8", True, 2.5])
def test_a_partition_count_out_of_range_is_refused_before_anything(
    empty_pg: str, partitions: object
) -> None:
    engine = create_engine(empty_pg, poolclass=NullPool)
    with pytest.raises(InvalidArgumentError, match="partitions must be"):
        hermes_orm.upgrade(engine, partitions=partitions)  # type: ignore[arg-type]
    assert migrations.current(engine) is None  # not even migrated


def _migrated_with_a_turn(url: str) -> Engine:
    """Migrate the database at ``url``, store TURN as session s1; an engine of it (no pool)."""
    hermes_orm.upgrade(create_engine(url, poolclass=NullPool))
    with SessionStore(url) as store:
        store.create_session("s1", "cli")
        store.flush("s1", TURN)
    return create_engine(url, poolclass=NullPool)


@pytest.mark.parametrize(
    "dependent",
    [
        "CREATE VIEW host_recent AS SELECT id, session_id FROM hermes_messages",
        "CREATE TABLE host_notes (message_id bigint REFERENCES hermes_messages (id))",
    ],
)
def test_a_host_object_on_the_messages_refuses_the_split_and_changes_nothing(
    empty_pg: str, dependent: str
) -> None:
    """The database's refusal is a DatabaseError naming the remedy, the table left as it was."""
    engine = _migrated_with_a_turn(empty_pg)
    with engine.begin() as conn:
        conn.exec_driver_sql(dependent)
    for split in (
        lambda: migrations.partition_messages(engine, 4),
        lambda: hermes_orm.upgrade(engine, partitions=4),
    ):
        with pytest.raises(DatabaseError, match="cannot split hermes_messages into 4") as caught:
            split()
        assert "drop them, partition, then make them again" in str(caught.value)
        assert "nothing was changed" in str(caught.value)
    assert _partitions(empty_pg) == []
    with SessionStore(empty_pg) as store:
        assert store.get_messages("s1") == TURN
    result = run_cli("db", "upgrade", "--partitions", "4", env={"HERMES_ORM_URL": empty_pg})
    assert result.returncode == 2
    assert "cannot split hermes_messages" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("held", "said"),
    [
        (["ALTER TABLE hermes_messages ENABLE ROW LEVEL SECURITY"], "row-level security"),
        (
            ["CREATE POLICY mine ON hermes_messages USING (session_id = current_user)"],
            "1 row-level security policies",
        ),
        (["CREATE PUBLICATION feed FOR TABLE hermes_messages"], "publications feed"),
        (
            ["CREATE RULE keep AS ON DELETE TO hermes_messages DO INSTEAD NOTHING"],
            "the rules keep",
        ),
        (["ALTER TABLE hermes_messages REPLICA IDENTITY FULL"], "replica identity"),
        (
            ["ALTER TABLE hermes_messages ADD COLUMN n bigint GENERATED ALWAYS AS IDENTITY"],
            r"identity or generated columns \(n\)",
        ),
        (
            [
                "ALTER TABLE hermes_messages ADD COLUMN size int "
                "GENERATED ALWAYS AS (length(content)) STORED"
            ],
            r"identity or generated columns \(size\)",
        ),
    ],
    ids=["rls", "policy", "publication", "rule", "replica identity", "identity", "generated"],
)
def test_what_a_rebuild_would_drop_unsaid_refuses_the_split(
    empty_pg: str, held: list[str], said: str
) -> None:
    engine = _migrated_with_a_turn(empty_pg)
    with engine.begin() as conn:
        for statement in held:
            conn.exec_driver_sql(statement)
    with pytest.raises(DatabaseError, match=said) as caught:
        migrations.partition_messages(engine, 4)
    assert "nothing was changed" in str(caught.value)
    assert _partitions(empty_pg) == []
    engine.dispose()


def test_what_the_host_set_on_the_table_is_carried_over(empty_pg: str) -> None:
    """Its owner, a trigger's state, storage settings, statistics targets and objects."""
    engine = _migrated_with_a_turn(empty_pg)
    role = f"app_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        for statement in (
            f"CREATE ROLE {role}",
            f"ALTER TABLE hermes_messages OWNER TO {role}",
            "CREATE FUNCTION host_block() RETURNS trigger LANGUAGE plpgsql "
            "AS $$BEGIN RAISE EXCEPTION 'the host blocks writes'; END$$",
            "CREATE TRIGGER host_block BEFORE INSERT ON hermes_messages "
            "FOR EACH ROW EXECUTE FUNCTION host_block()",
            "ALTER TABLE hermes_messages DISABLE TRIGGER host_block",
            "ALTER TABLE hermes_messages SET (autovacuum_vacuum_scale_factor = 0.01)",
            "ALTER TABLE hermes_messages ALTER COLUMN role SET STATISTICS 500",
            "CREATE STATISTICS host_pairs ON session_id, role FROM hermes_messages",
        ):
            conn.exec_driver_sql(statement)
    assert migrations.partition_messages(engine, 4)
    with engine.connect() as conn:

        def rows(sql: str) -> list[Any]:
            return [tuple(row) for row in conn.exec_driver_sql(sql)]

        tables = "SELECT inhrelid FROM pg_inherits WHERE inhparent = 'hermes_messages'::regclass"
        owners = f"SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid IN ({tables})"
        assert set(rows(f"{owners} OR oid = 'hermes_messages'::regclass")) == {(role,)}
        assert rows(
            "SELECT tgenabled FROM pg_trigger WHERE tgname = 'host_block' "
            "AND tgrelid = 'hermes_messages'::regclass"
        ) == [("D",)]
        assert (
            rows(f"SELECT reloptions FROM pg_class WHERE oid IN ({tables})")
            == [(["autovacuum_vacuum_scale_factor=0.01"],)] * 4
        )
        assert rows(
            "SELECT attstattarget FROM pg_attribute "
            "WHERE attrelid = 'hermes_messages'::regclass AND attname = 'role'"
        ) == [(500,)]
        assert rows(
            "SELECT stxname FROM pg_statistic_ext WHERE stxrelid = 'hermes_messages'::regclass"
        ) == [("host_pairs",)]
    with SessionStore(empty_pg) as store:  # the disabled trigger stays out of the way
        store.flush("s1", [*TURN, {"role": "user", "content": "after"}])
        assert len(store.get_messages("s1")) == len(TURN) + 1
    engine.dispose()


def test_the_tables_comment_is_carried_over(empty_pg: str) -> None:
    engine = _migrated_with_a_turn(empty_pg)
    said = "the agents' messages: 100% of them, %s and %(x)s"
    with engine.begin() as conn:
        conn.execute(text("SELECT set_config('app.said', :said, true)"), {"said": said})
        conn.exec_driver_sql(
            "DO $$ BEGIN EXECUTE format('COMMENT ON TABLE hermes_messages IS %%L', "
            "current_setting('app.said')); END $$"
        )
    assert migrations.partition_messages(engine, 4)
    with engine.connect() as conn:
        comment = conn.exec_driver_sql(
            "SELECT obj_description('hermes_messages'::regclass, 'pg_class')"
        ).scalar()
    assert comment == said
    engine.dispose()


def _definitions(conn: Any) -> set[tuple[str, str]]:
    """The host's constraints, indexes, triggers and statistics on hermes_messages, as printed."""
    table = "'hermes_messages'::regclass"
    rows = conn.exec_driver_sql(
        f"SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = {table} "
        "AND conname LIKE 'host%%' UNION ALL "
        "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        f"JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = {table} "
        "AND c.relname LIKE 'host%%' UNION ALL "
        f"SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = {table} "
        "AND tgname LIKE 'host%%' UNION ALL "
        "SELECT stxname, pg_get_statisticsobjdef(oid) FROM pg_statistic_ext "
        f"WHERE stxrelid = {table}"
    )
    # (an index of a partitioned table is printed as made ON ONLY it)
    return {(name, definition.replace(" ON ONLY ", " ON ")) for name, definition in rows}


def test_definitions_holding_percent_signs_and_quotes_are_made_again_as_they_were(
    empty_pg: str,
) -> None:
    """The driver reads % as its placeholders: a definition holding one is not changed by
    the rebuild, nor refused; names holding quotes and % are kept."""
    engine = _migrated_with_a_turn(empty_pg)
    with engine.begin() as conn:
        for statement in (
            "ALTER TABLE hermes_messages ADD CONSTRAINT host_no_double_percent "
            "CHECK (strpos(coalesce(content, ''), '%%%%') = 0)",
            'CREATE INDEX "host_links_100%%" ON hermes_messages (session_id) '
            "WHERE content LIKE 'http%%'",
            'CREATE INDEX "host_by""role" ON hermes_messages (role)',
            "CREATE FUNCTION host_note() RETURNS trigger LANGUAGE plpgsql "
            "AS $$BEGIN RETURN NEW; END$$",
            'CREATE TRIGGER "host_%%s" BEFORE INSERT ON hermes_messages FOR EACH ROW '
            "WHEN (NEW.content LIKE '%%100%%%%') EXECUTE FUNCTION host_note()",
            'CREATE STATISTICS "host_%%(x)s" ON session_id, role FROM hermes_messages',
        ):
            conn.exec_driver_sql(statement)
        before = _definitions(conn)
    assert len(before) == 5
    assert migrations.partition_messages(engine, 4)
    with engine.connect() as conn:
        assert _definitions(conn) == before
    with SessionStore(empty_pg) as store:  # the check still takes one %, refuses two
        store.flush("s1", [*TURN, {"role": "user", "content": "yes, 100% sure"}])
        with pytest.raises(DatabaseError, match="host_no_double_percent"):
            store.append("s1", {"role": "user", "content": "100%% sure"})
        assert len(store.get_messages("s1")) == len(TURN) + 1
    engine.dispose()


def test_an_asyncpg_engine_splits_the_messages_as_psycopg_does(empty_pg: str) -> None:
    """asyncpg reads the catalog's one-character codes as bytes, and takes % as it is."""
    engine = _migrated_with_a_turn(empty_pg)
    with engine.begin() as conn:
        for statement in (
            "ALTER TABLE hermes_messages ADD CONSTRAINT host_no_double_percent "
            "CHECK (strpos(coalesce(content, ''), '%%%%') = 0)",
            "CREATE FUNCTION host_note() RETURNS trigger LANGUAGE plpgsql "
            "AS $$BEGIN RETURN NEW; END$$",
            "CREATE TRIGGER host_note BEFORE INSERT ON hermes_messages "
            "FOR EACH ROW EXECUTE FUNCTION host_note()",
            "ALTER TABLE hermes_messages DISABLE TRIGGER host_note",
        ):
            conn.exec_driver_sql(statement)
        before = _definitions(conn)

    async def split() -> list[bool]:
        url = make_url(empty_pg).set(drivername="postgresql+asyncpg")
        async_engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with async_engine.begin() as conn:
                done = [await conn.run_sync(migrations.partition_messages, 4) for _ in range(2)]
        finally:
            await async_engine.dispose()
        return done

    assert asyncio.run(split()) == [True, False]  # the second finds it split
    assert len(_partitions(empty_pg)) == 4
    with engine.connect() as conn:
        assert _definitions(conn) == before
        assert conn.exec_driver_sql(
            "SELECT tgenabled::text FROM pg_trigger WHERE tgname = 'host_note' "
            "AND tgrelid = 'hermes_messages'::regclass"
        ).all() == [("D",)]
    engine.dispose()


def test_a_refusal_names_the_dependent_object_on_every_driver(empty_pg: str) -> None:
    """The server's DETAIL, which asyncpg keeps apart from its message, is told too."""
    engine = _migrated_with_a_turn(empty_pg)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW host_recent AS SELECT id FROM hermes_messages")
    with pytest.raises(DatabaseError) as blocking:
        migrations.partition_messages(engine, 4)

    async def split_on_asyncpg() -> None:
        url = make_url(empty_pg).set(drivername="postgresql+asyncpg")
        async_engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with async_engine.begin() as conn:
                await conn.run_sync(migrations.partition_messages, 4)
        finally:
            await async_engine.dispose()

    with pytest.raises(DatabaseError) as blocking_async:
        asyncio.run(split_on_asyncpg())
    for refused in (blocking, blocking_async):
        assert "DETAIL:  view host_recent depends on" in str(refused.value), refused.value
    engine.dispose()


def test_what_the_database_said_reads_alike_on_psycopg_and_asyncpg(empty_pg: str) -> None:
    """Each of DETAIL, HINT and CONTEXT told once, even where its text is in the message
    already."""
    raising = (
        "DO $$ BEGIN RAISE EXCEPTION 'boom' USING DETAIL = 'the detail', HINT = 'boom'; END $$"
    )
    with (
        create_engine(empty_pg, poolclass=NullPool).connect() as conn,
        pytest.raises(DBAPIError) as psycopg_said,
    ):
        conn.exec_driver_sql(raising)

    async def on_asyncpg() -> None:
        url = make_url(empty_pg).set(drivername="postgresql+asyncpg")
        async_engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with async_engine.connect() as conn:
                await conn.exec_driver_sql(raising)
        finally:
            await async_engine.dispose()

    with pytest.raises(DBAPIError) as asyncpg_said:
        asyncio.run(on_asyncpg())
    for said in (psycopg_said, asyncpg_said):
        lines = _dialects.said(said.value).splitlines()
        assert lines == [
            "boom",
            "DETAIL:  the detail",
            "HINT:  boom",
            "CONTEXT:  PL/pgSQL function inline_code_block line 1 at RAISE",
        ], lines


class _Injected(Exception):
    """A failure of the driver's side, in the middle of a split."""


@pytest.mark.parametrize("failure", ["driver", "server"])
def test_a_split_failing_in_the_callers_transaction_leaves_it_as_it_was(
    empty_pg: str, failure: str
) -> None:
    """On a host's transaction (its env.py), a failed split is rolled back alone: the host's
    own work in the transaction goes on and commits, the table as it was, searched."""
    engine = _migrated_with_a_turn(empty_pg)

    def fail(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if failure == "driver" and statement.startswith("INSERT INTO hermes_messages SELECT"):
            raise _Injected

    expected = _Injected if failure == "driver" else DatabaseError
    with engine.connect() as conn, listening(engine, "before_cursor_execute", fail):
        with conn.begin():
            if failure == "server":
                conn.exec_driver_sql("CREATE VIEW host_recent AS SELECT id FROM hermes_messages")
            with pytest.raises(expected):
                migrations.partition_messages(conn, 4)
            conn.exec_driver_sql("CREATE TABLE host_audit (n int)")  # the host goes on
        tables = conn.exec_driver_sql(
            "SELECT relname, relkind FROM pg_class WHERE relname IN "
            "('hermes_messages', 'hermes_messages_unpartitioned', 'host_audit')"
        ).all()
    assert sorted(tables) == [("hermes_messages", "r"), ("host_audit", "r")]
    assert _partitions(empty_pg) == []
    with SessionStore(empty_pg) as store:
        store.flush("s1", [*TURN, {"role": "user", "content": "a beacon offshore"}])
        assert [hit.session_id for hit in store.search("beacon").hits] == ["s1"]
    engine.dispose()


def test_an_upgrade_whose_split_fails_in_the_callers_transaction_migrates_nothing(
    empty_pg: str,
) -> None:
    """The revisions and the split are undone together: the host's transaction goes on,
    its schema at the revision it was."""
    engine = create_engine(empty_pg, poolclass=NullPool)
    hermes_orm.upgrade(engine, "0015_search_literal_nul_escape")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW host_recent AS SELECT id FROM hermes_messages")
    with engine.connect() as conn:
        with conn.begin():
            with pytest.raises(DatabaseError, match="nothing was changed"):
                hermes_orm.upgrade(conn, partitions=4)
            conn.exec_driver_sql("CREATE TABLE host_audit (n int)")  # the host goes on
        assert conn.exec_driver_sql("SELECT to_regclass('host_audit')").scalar() is not None
    assert migrations.current(engine) == "0015_search_literal_nul_escape"
    assert _partitions(empty_pg) == []
    engine.dispose()


def test_sqlite_is_not_partitioned(tmp_path: Path) -> None:
    path = tmp_path / "agents.db"
    result = run_cli(
        "db", "upgrade", "--partitions", "4", env={"HERMES_ORM_URL": f"sqlite:///{path}"}
    )
    assert result.returncode != 0
    assert "only PostgreSQL partitions tables" in result.stderr
    assert not path.exists()


def test_the_command_line_splits_the_messages(empty_pg: str) -> None:
    result = run_cli("db", "upgrade", "--partitions", "4", env={"HERMES_ORM_URL": empty_pg})
    assert result.returncode == 0, result.stderr
    assert "messages in 4 partitions" in result.stdout
    assert len(_partitions(empty_pg)) == 4


def test_a_split_whose_connection_was_lost_at_commit_is_not_told_as_nothing_changed(
    empty_pg: str,
) -> None:
    """Whether it was committed is unknown: the driver's error, and running it again is safe."""
    engine = _migrated_with_a_turn(empty_pg)
    with pytest.raises(DBAPIError) as caught, backend_terminated(engine):
        migrations.partition_messages(engine, 4)
    assert caught.value.connection_invalidated
    assert migrations.partition_messages(engine, 4) is True  # the lost one was not committed
    assert len(_partitions(empty_pg)) == 4
    with SessionStore(empty_pg) as store:
        assert store.get_messages("s1") == TURN
