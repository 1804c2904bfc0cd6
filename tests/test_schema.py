"""hermes_orm's tables in a PostgreSQL schema of the host's choice.

By ``schema=``, by ``?schema=`` in the URL, and by an engine's
``schema_translate_map``: migrations, the store (sync and asyncio), the ORM
path and search, with pg_trgm wherever the database has it. The whole flush
suite also runs in a schema in CI (``pytest tests/test_flush.py -m postgresql
--in-schema agents``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.pool import NullPool

import hermes_orm
from hermes_orm import (
    AsyncSessionStore,
    DatabaseError,
    InvalidArgumentError,
    InvalidURLError,
    Message,
    SessionStore,
    create_store_engine,
    migrations,
)
from hermes_orm.verify import verify_database
from tests.conftest import meanwhile, run_cli

pytestmark = [pytest.mark.postgresql, pytest.mark.direct("makes databases of its own")]

TURN = [
    {"role": "user", "content": "where is the lighthouse"},
    {"role": "assistant", "content": "灯台は北の岬にあります"},
]


def _engine(url: str, **kwargs: Any) -> Engine:
    return create_engine(url, poolclass=NullPool, **kwargs)


def _tables(engine: Engine, schema: str | None) -> set[str]:
    return set(inspect(engine).get_table_names(schema=schema))


def test_migrations_place_everything_in_the_schema(empty_pg: str) -> None:
    engine = _engine(empty_pg)
    hermes_orm.upgrade(engine, schema="agents")
    assert _tables(engine, "agents") >= {
        "hermes_sessions",
        "hermes_messages",
        migrations.VERSION_TABLE,
    }
    assert not {t for t in _tables(engine, "public") if t.startswith("hermes_")}
    assert migrations.current(engine, schema="agents") == migrations.head()
    assert migrations.current(engine) is None  # nothing of ours where the default path looks
    assert migrations.differences(engine, schema="agents") == []
    hermes_orm.check_schema(engine, schema="agents")
    with engine.connect() as conn:  # the search trigger and indexes went with the table
        triggers = conn.scalars(
            text(
                "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'agents' AND c.relname = 'hermes_messages' "
                "AND NOT t.tgisinternal"
            )
        ).all()
        assert sorted(triggers) == ["hermes_search_index", "hermes_search_index_cjk"]
        indexes = set(
            conn.scalars(text("SELECT indexname FROM pg_indexes WHERE schemaname = 'agents'"))
        )
        assert {"ix_hermes_search_vector", "ix_hermes_search_cjk"} <= indexes
    hermes_orm.downgrade(engine, "base", schema="agents")
    assert _tables(engine, "agents") == {migrations.VERSION_TABLE}
    engine.dispose()


def test_a_downgrade_of_a_schema_not_there_makes_nothing(empty_pg: str) -> None:
    """A mistyped name (``?schema=agnets``): nothing to take down, and nothing made."""
    engine = _engine(empty_pg)
    hermes_orm.upgrade(engine, schema="agents")
    before = (inspect(engine).get_schema_names(), _tables(engine, "public"))
    hermes_orm.downgrade(engine, "base", schema="agnets")
    done = run_cli(
        "--url", f"{empty_pg}?schema=agnets", "db", "downgrade", "base", env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr
    assert (inspect(engine).get_schema_names(), _tables(engine, "public")) == before
    assert migrations.current(engine, schema="agents") == migrations.head()
    engine.dispose()


def test_every_way_of_naming_the_schema_reaches_the_same_tables(empty_pg: str) -> None:
    hermes_orm.upgrade(_engine(empty_pg), schema="agents")
    by_url = SessionStore(make_url(empty_pg).update_query_dict({"schema": "agents"}))
    by_url.create_session("s", source="cli", user_id="u")
    assert by_url.flush("s", TURN).written == 2

    plain = _engine(empty_pg)
    by_option = SessionStore(plain, schema="agents")
    translated = _engine(empty_pg, execution_options={"schema_translate_map": {None: "agents"}})
    by_map = SessionStore(translated)
    for store in (by_url, by_option, by_map):
        assert store.get_messages("s") == TURN
        assert [hit.session_id for hit in store.search("lighthouse").hits] == ["s"]
        assert [hit.session_id for hit in store.search("灯台").hits] == ["s"]  # trigram path
        assert [s["id"] for s in store.list_sessions().sessions] == ["s"]
        assert store.for_user("u").get_messages("s") == TURN
    assert by_map.append("s", {"role": "user", "content": "thanks"}) == 2
    assert by_option.rebuild_search_index() == 3
    assert by_url.delete_session("s")
    assert by_map.get_session("s") is None
    for store in (by_url, by_option, by_map):
        store.close()
    plain.dispose()
    translated.dispose()


def test_stores_on_one_engine_each_in_their_own_schema(empty_pg: str) -> None:
    engine = _engine(empty_pg)
    for schema in ("tenant_a", "tenant_b"):
        hermes_orm.upgrade(engine, schema=schema)
    a = SessionStore(engine, schema="tenant_a")
    b = SessionStore(engine, schema="tenant_b")
    a.create_session("s", source="cli")
    b.create_session("s", source="cli")
    a.flush("s", TURN)
    b.flush("s", TURN[:1])
    assert len(a.get_messages("s")) == 2
    assert len(b.get_messages("s")) == 1
    assert [h.session_id for h in b.search("灯台").hits] == []

    # A turn's flush on the remembered cursor is one statement that names its schema
    # (no search_path to set first), into that schema only.
    ran: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: ran.append(args[2]))
    b.flush("s", TURN)
    assert len(ran) == 1
    assert ran[0].startswith('WITH moved AS (UPDATE "tenant_b".hermes_sessions ')
    assert 'INSERT INTO "tenant_b".hermes_messages ' in ran[0]
    assert (len(a.get_messages("s")), len(b.get_messages("s"))) == (2, 2)
    for store in (a, b):  # (each session read at one moment, the schema set after)
        report = verify_database(store)
        assert (report.problems, report.sessions, report.messages) == ([], 1, 2)
    a.close()
    b.close()
    engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_asyncio_store_in_a_schema(empty_pg: str, driver: str) -> None:
    url = make_url(empty_pg).set(drivername=f"postgresql+{driver}")

    async def main() -> None:
        store = AsyncSessionStore(url.update_query_dict({"schema": "agents"}))
        await store.upgrade()
        await store.create_session("s", source="cli")
        assert (await store.flush("s", TURN)).written == 2
        assert await store.get_messages("s") == TURN
        assert [hit.session_id for hit in (await store.search("灯台")).hits] == ["s"]
        await store.close()

    asyncio.run(main())
    engine = _engine(empty_pg)
    assert "hermes_messages" in _tables(engine, "agents")
    engine.dispose()


def test_pg_trgm_is_found_in_a_schema_of_its_own(empty_pg: str) -> None:
    """An extension outside every search_path (as some hosts keep them) is still found."""
    engine = _engine(empty_pg)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA extensions")
        conn.exec_driver_sql("CREATE EXTENSION pg_trgm SCHEMA extensions")
    hermes_orm.upgrade(engine, schema="agents")
    store = SessionStore(engine, schema="agents")
    store.create_session("s", source="cli")
    store.flush("s", TURN)
    assert [hit.session_id for hit in store.search("灯台").hits] == ["s"]
    store.close()
    engine.dispose()


@pytest.mark.parametrize("installed", ["by the host", "by a schema's upgrade"])
def test_pg_trgm_outside_the_path_is_found_by_an_upgrade_of_the_default_schema(
    empty_pg: str, installed: str
) -> None:
    """The tables go to the path's first schema; the extension is found wherever it is."""
    engine = _engine(empty_pg)
    if installed == "by the host":
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE SCHEMA extensions")
            conn.exec_driver_sql("CREATE EXTENSION pg_trgm SCHEMA extensions")
    else:
        hermes_orm.upgrade(engine, schema="agents")  # installs pg_trgm in "agents"
        # Its tables would be found as the default schema's: refused, with the remedy.
        with pytest.raises(DatabaseError, match="ALTER EXTENSION pg_trgm SET SCHEMA public"):
            hermes_orm.upgrade(engine)
        assert _tables(engine, "public") == set()
        hermes_orm.downgrade(engine, "base")  # nothing there: nothing to refuse
        assert _tables(engine, "public") == set()
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER EXTENSION pg_trgm SET SCHEMA public")
    hermes_orm.upgrade(engine)
    assert "hermes_messages" in _tables(engine, "public")
    store = SessionStore(engine)
    store.create_session("s", source="cli")
    store.flush("s", TURN)
    assert [hit.session_id for hit in store.search("灯台").hits] == ["s"]
    if installed != "by the host":  # the other store still finds it where it went
        other = SessionStore(engine, schema="agents")
        other.create_session("t", source="cli")
        other.flush("t", TURN)
        assert [hit.session_id for hit in other.search("灯台").hits] == ["t"]
        other.close()
    with engine.connect() as conn:  # the path is the connection's own again
        assert conn.exec_driver_sql("SELECT current_setting('search_path')").scalar() == (
            '"$user", public'
        )
    store.close()
    engine.dispose()


def test_the_orm_path_with_a_schema_translate_map(empty_pg: str) -> None:
    hermes_orm.upgrade(_engine(empty_pg), schema="agents")
    engine = _engine(empty_pg, execution_options={"schema_translate_map": {None: "agents"}})
    store = SessionStore(engine)
    store.create_session("s", source="cli")
    store.flush("s", TURN[:1])
    hermes_orm.install_position_rule(OrmSession)
    try:
        with OrmSession(engine) as orm:
            orm.get_one(hermes_orm.Session, "s").messages.add(
                Message.from_dict({"role": "user", "content": "thanks"})
            )
            orm.commit()
    finally:
        hermes_orm.remove_position_rule(OrmSession)
    messages = store.get_messages("s")
    assert messages[0] == TURN[0]
    assert messages[-1] == {"role": "user", "content": "thanks"}
    assert [hit.session_id for hit in store.search("thanks").hits] == ["s"]
    store.close()
    engine.dispose()


def test_a_host_transaction_keeps_its_own_search_path(empty_pg: str) -> None:
    """upgrade() on a connection inside the host's transaction puts the path back."""
    engine = _engine(empty_pg)
    with engine.connect() as conn:
        conn.begin()
        before = conn.exec_driver_sql("SHOW search_path").scalar()
        hermes_orm.upgrade(conn, schema="agents")
        assert conn.exec_driver_sql("SHOW search_path").scalar() == before
        conn.exec_driver_sql("CREATE TABLE host_table (id int)")  # where the host meant it
        conn.commit()
    assert "host_table" in _tables(engine, "public")
    assert "hermes_sessions" in _tables(engine, "agents")
    engine.dispose()


def test_schema_names_and_conflicts_are_refused(empty_pg: str, tmp_path: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="plain identifier"):
        SessionStore(_engine(empty_pg), schema='bad"name')
    with pytest.raises(InvalidURLError, match="plain identifier"):
        create_store_engine(make_url(empty_pg).update_query_dict({"schema": "1st"}))
    translated = _engine(empty_pg, execution_options={"schema_translate_map": {None: "a"}})
    with pytest.raises(InvalidArgumentError, match="schema_translate_map"):
        SessionStore(translated, schema="b")
    with pytest.raises(InvalidArgumentError, match="only PostgreSQL"):
        SessionStore("sqlite://", schema="agents")
    with pytest.raises(InvalidURLError, match="only postgresql"):
        create_store_engine("sqlite:///x.db?schema=agents")
    with pytest.raises(InvalidArgumentError, match="only PostgreSQL"):
        create_store_engine(f"sqlite:///{tmp_path / 'never.db'}", schema="agents")
    assert not (tmp_path / "never.db").exists()
    with pytest.raises(InvalidArgumentError, match="plain identifier"):
        SessionStore(_engine(empty_pg), schema="pg_agents")
    translated.dispose()


def test_a_schema_named_as_the_role_that_would_hide_the_default_store_is_refused(
    empty_pg: str,
) -> None:
    """The default search_path begins with "$user": a schema named as the role would come
    before public, and the store there would find that schema's tables as its own."""
    engine = _engine(empty_pg)
    hermes_orm.upgrade(engine)
    with SessionStore(engine) as store:
        store.create_session("mine", source="cli")
    with engine.connect() as conn:
        role = conn.exec_driver_sql("SELECT current_user").scalar()
    with pytest.raises(InvalidArgumentError, match="named as the role connecting"):
        hermes_orm.upgrade(engine, schema=role)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT to_regnamespace(:s)"), {"s": role}).scalar() is None
    with engine.begin() as conn:  # made already, empty (as by CREATE SCHEMA AUTHORIZATION)
        conn.exec_driver_sql(f"CREATE SCHEMA {role}")
    with pytest.raises(InvalidArgumentError, match="named as the role connecting"):
        hermes_orm.upgrade(engine, schema=role)
    assert not _tables(engine, role)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {role}")
    with SessionStore(engine) as store:
        assert [s["id"] for s in store.list_sessions().sessions] == ["mine"]
    hermes_orm.upgrade(engine, schema="agents")  # named otherwise: made
    with engine.begin() as conn:  # and with "$user" after public, the role's name too
        conn.exec_driver_sql(f'ALTER ROLE {role} SET search_path = public, "$user"')
    try:
        hermes_orm.upgrade(engine, schema=role)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER ROLE {role} RESET search_path")
    assert migrations.current(engine, schema=role) == migrations.head()
    engine.dispose()


def test_a_search_path_is_read_as_postgresql_reads_it(empty_pg: str) -> None:
    """Quoted names (a comma, a doubled quote in them) as written, others folded as ASCII."""
    from hermes_orm.migrations import _path_names

    written = ['"$user"', "$user", '"a,b"', '"a""b"', "Public", "Ärzte", '"Mixed Case"']
    with _engine(empty_pg).connect() as conn:
        for path in (", ".join(written), ",".join(written)):
            conn.execute(text("SELECT set_config('search_path', :p, false)"), {"p": path})
            setting = conn.exec_driver_sql("SELECT current_setting('search_path')").scalar()
            assert _path_names(str(setting)) == [
                "$user",
                "$user",
                "a,b",
                'a"b',
                "public",
                "Ärzte",
                "Mixed Case",
            ]
    assert _path_names("") == []


def test_the_command_line_migrates_into_the_schema_of_its_url(empty_pg: str) -> None:
    import os

    url = make_url(empty_pg).update_query_dict({"schema": "agents"}).render_as_string(False)
    result = run_cli("--url", url, "db", "upgrade", env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    engine = _engine(empty_pg)
    assert "hermes_messages" in _tables(engine, "agents")
    assert not {t for t in _tables(engine, "public") if t.startswith("hermes_")}
    engine.dispose()
    result = run_cli("--url", url, "db", "check", env=dict(os.environ))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("made_first", [False, True])
def test_alembic_from_a_checkout_migrates_into_the_schema_of_its_url(
    empty_pg: str, made_first: bool
) -> None:
    """``alembic -x url=...?schema=agents upgrade head``: as hermes_orm.upgrade places it."""
    import subprocess
    import sys
    from pathlib import Path

    engine = _engine(empty_pg)
    hermes_orm.upgrade(engine)  # the default tenant's store, in public
    if made_first:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE SCHEMA agents")
    url = make_url(empty_pg).update_query_dict({"schema": "agents"}).render_as_string(False)
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", "upgrade", "head"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert migrations.current(engine, schema="agents") == migrations.head()
    assert migrations.current(engine) == migrations.head()
    assert migrations.differences(engine, schema="agents") == []
    assert migrations.VERSION_TABLE in _tables(engine, "agents")
    store = SessionStore(url)
    store.create_session("a", source="cli")
    store.flush("a", TURN)
    assert [hit.session_id for hit in store.search("lighthouse").hits] == ["a"]
    store.close()
    public = SessionStore(empty_pg)
    assert public.search("lighthouse").hits == []
    public.close()
    engine.dispose()


def test_a_role_that_owns_its_schema_but_cannot_create_schemas(empty_pg: str) -> None:
    """The common least-privilege layout: the DBA makes the schema and the extension."""
    admin = _engine(empty_pg)
    database = make_url(empty_pg).database
    with admin.begin() as conn:
        conn.exec_driver_sql("DROP ROLE IF EXISTS chat_app_owner")
        conn.exec_driver_sql("CREATE ROLE chat_app_owner LOGIN")
        conn.exec_driver_sql(f'REVOKE CREATE ON DATABASE "{database}" FROM PUBLIC')
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        conn.exec_driver_sql("CREATE SCHEMA agents AUTHORIZATION chat_app_owner")
    url = make_url(empty_pg).set(username="chat_app_owner")
    engine = _engine(url.render_as_string(False))
    hermes_orm.upgrade(engine, schema="agents")
    hermes_orm.upgrade(engine, schema="agents")  # at head: nothing to create
    store = SessionStore(engine, schema="agents")
    store.create_session("s", source="cli")
    assert store.flush("s", TURN).written == 2
    store.close()
    engine.dispose()
    with admin.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA agents CASCADE")
        conn.exec_driver_sql("DROP ROLE chat_app_owner")
    admin.dispose()


def test_a_failed_upgrade_gives_the_host_its_search_path_back(empty_pg: str) -> None:
    engine = _engine(empty_pg)
    with engine.connect() as conn:
        conn.begin()
        before = conn.exec_driver_sql("SHOW search_path").scalar()
        with pytest.raises(Exception, match="no_such_revision"):
            hermes_orm.upgrade(conn, "no_such_revision", schema="agents")
        assert conn.exec_driver_sql("SHOW search_path").scalar() == before
        conn.rollback()
    engine.dispose()


def test_the_hermes_adapter_keeps_house_in_the_schema(empty_pg: str) -> None:
    """SessionDB's upkeep names the tables by schema where it runs outside a store transaction."""
    from hermes_orm.integrations.hermes import SessionDB

    hermes_orm.upgrade(_engine(empty_pg), schema="agents")
    store = SessionStore(make_url(empty_pg).update_query_dict({"schema": "agents"}))
    db = SessionDB(store)
    db.create_session("s", source="cli")
    db.append_message("s", role="user", content="kept in agents")
    db.vacuum()
    assert [m["content"] for m in db.get_messages("s")] == ["kept in agents"]
    store.close()


def test_the_hermes_adapter_s_session_locks_are_the_schema_s(empty_pg: str) -> None:
    """A session id being made in one schema holds up no one making it in another."""
    from hermes_orm.integrations.hermes import SessionDB

    dbs = []
    for schema in ("agents", "others"):
        hermes_orm.upgrade(_engine(empty_pg), schema=schema)
        dbs.append(SessionDB(SessionStore(empty_pg, schema=schema)))
    ours, theirs = dbs

    def locks(statement: str) -> bool:
        return "pg_advisory_xact_lock(hashtextextended(" in statement

    def look_for_x(db: SessionDB) -> Any:  # as Hermes' API server does, making a session
        return db._execute_write(
            lambda conn: conn.execute("SELECT id FROM sessions WHERE id = ?", ("x",)).fetchall()
        )

    with meanwhile(ours.store.engine, locks, lambda: look_for_x(theirs), 5) as m:
        look_for_x(ours)
    assert m.thread is not None
    assert m.error is None
    assert m.first  # looked while the first schema's maker held its lock
    for db in dbs:
        db.store.close()


def test_the_hermes_adapter_s_session_locks_hold_across_search_paths_to_one_table(
    empty_pg: str,
) -> None:
    """Two stores finding the same tables by different paths (the role's schema first,
    empty, or not at all) take the same locks: the second waits for the first."""
    from hermes_orm.integrations.hermes import SessionDB

    hermes_orm.upgrade(_engine(empty_pg))
    admin = _engine(empty_pg)
    with admin.begin() as conn:
        role = conn.exec_driver_sql("SELECT current_user").scalar()
        conn.exec_driver_sql(f"CREATE SCHEMA {role}")  # "$user" finds it first, empty
    ours = SessionDB(SessionStore(empty_pg))
    public_only = _engine(empty_pg, connect_args={"options": "-csearch_path=public"})
    theirs = SessionDB(SessionStore(public_only))

    def look_for_x(db: SessionDB) -> Any:
        return db._execute_write(
            lambda conn: conn.execute("SELECT id FROM sessions WHERE id = ?", ("x",)).fetchall()
        )

    def locks(statement: str) -> bool:
        return "pg_advisory_xact_lock(hashtextextended(" in statement

    with meanwhile(ours.store.engine, locks, lambda: look_for_x(theirs), 1) as m:
        look_for_x(ours)
    assert m.thread is not None
    assert m.error is None
    assert not m.first  # it waited for the first one's transaction to end
    ours.store.create_session("p", source="cli")  # and the stores' lineage turn
    with meanwhile(
        ours.store.engine,
        locks,
        lambda: theirs.store.create_session("d", source="cli", parent_session_id="p"),
        1,
    ) as m:
        ours.store.create_session("c", source="cli", parent_session_id="p")
    assert m.thread is not None
    assert m.error is None
    assert not m.first
    for db in (ours, theirs):
        db.store.close()
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {role}")
    admin.dispose()


def test_the_hermes_vacuum_in_a_schema_leaves_a_host_s_models_on_the_base_alone(
    empty_pg: str,
) -> None:
    """The host's table (its models on hermes_orm's Base) is in public, not in the schema."""
    from sqlalchemy import Column, Integer, Table

    from hermes_orm.integrations.hermes import SessionDB
    from hermes_orm.models import Base

    accounts = Table("accounts_of_the_host", Base.metadata, Column("id", Integer, primary_key=True))
    engine = _engine(empty_pg)
    try:
        accounts.create(engine)
        hermes_orm.upgrade(engine, schema="agents")
        store = SessionStore(engine, schema="agents")
        store.create_session("s", source="cli")
        SessionDB(store).vacuum()
        assert store.get_session("s") is not None
        store.close()
    finally:
        Base.metadata.remove(accounts)
        engine.dispose()
