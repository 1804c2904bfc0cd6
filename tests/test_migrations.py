"""Migrations on both dialects: pytest-alembic's built-in tests, and every way to run them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from pytest_alembic.tests import (  # the four built-in tests, on each backend
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)
from sqlalchemy import Engine, create_engine, inspect, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import hermes_orm
from hermes_orm import (
    DatabaseError,
    HistoryDivergedError,
    InvalidArgumentError,
    InvalidURLError,
    SchemaOutOfDateError,
    SchemaTooNewError,
    SessionStore,
    create_store_engine,
    migrations,
)
from tests.conftest import (
    BlockingStore,
    backend_terminated,
    frozen_revision,
    listening,
    run_cli,
    transient,
)

__all__ = [
    "test_model_definitions_match_ddl",
    "test_single_head_revision",
    "test_up_down_consistency",
    "test_upgrade",
]

ROOT = Path(__file__).resolve().parents[1]
OUR_TABLES = {
    "hermes_sessions",
    "hermes_messages",
    "hermes_session_model_usage",
    "hermes_meta",
    "hermes_gateway_routing",
    "hermes_compression_locks",
    "hermes_telegram_topic_mode",
    "hermes_telegram_topic_bindings",
    "hermes_imported",
    "hermes_orm_alembic_version",
}


@contextlib.contextmanager
def store_before_0016(engine: Any) -> Iterator[hermes_orm.SessionStore]:
    """Today's store, writing into a schema older than 0016 (its column lent for the while).

    What it writes goes through that revision's triggers, as that revision's
    hermes_orm wrote it; the column goes again before the block's end.
    """
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "ALTER TABLE hermes_sessions ADD COLUMN history_id BIGINT NOT NULL DEFAULT 0"
        )
    try:
        yield hermes_orm.SessionStore(engine, check_schema=False)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE hermes_sessions DROP COLUMN history_id")


def _tables(url: str) -> set[str]:
    engine = create_store_engine(url, poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _alembic(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


#: The FTS5 tables of the search index and their shadow tables (SQLite only).
SQLITE_SEARCH_TABLES = {
    f"{table}{suffix}"
    for table in ("hermes_search", "hermes_search_cjk")
    for suffix in ("", "_config", "_data", "_idx")
} | {"hermes_search_cjk_content"}


def test_alembic_cli_from_repo_root_up_down_up(empty_db_url: str) -> None:
    search_tables = SQLITE_SEARCH_TABLES if empty_db_url.startswith("sqlite") else set()
    for step in (("upgrade", "head"), ("downgrade", "base"), ("upgrade", "head")):
        result = _alembic("-x", f"url={empty_db_url}", *step)
        assert result.returncode == 0, result.stderr
        expected = (
            OUR_TABLES | search_tables if step[0] == "upgrade" else {"hermes_orm_alembic_version"}
        )
        assert _tables(empty_db_url) == expected
    current = _alembic("-x", f"url={empty_db_url}", "current")
    assert migrations.head() in current.stdout


def test_python_api_and_check(empty_db_url: str) -> None:
    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    with pytest.raises(SchemaOutOfDateError):
        hermes_orm.check_schema(engine)
    hermes_orm.upgrade(engine)
    hermes_orm.check_schema(engine)
    assert migrations.current(engine) == migrations.head()
    hermes_orm.downgrade(engine, "base")
    assert migrations.current(engine) is None
    assert _tables(empty_db_url) == {"hermes_orm_alembic_version"}
    engine.dispose()


def test_the_python_api_takes_a_url_and_leaves_no_connection_open(empty_db_url: str) -> None:
    with pytest.raises(SchemaOutOfDateError):
        hermes_orm.check_schema(empty_db_url)
    assert migrations.current(empty_db_url) is None
    hermes_orm.upgrade(empty_db_url)
    hermes_orm.check_schema(empty_db_url)
    assert migrations.current(empty_db_url) == migrations.head()
    assert migrations.differences(empty_db_url) == []
    hermes_orm.downgrade(empty_db_url, "base")
    assert migrations.current(empty_db_url) is None
    hermes_orm.upgrade(bind=empty_db_url)  # the bind may be given by name, as before
    assert migrations.current(bind=empty_db_url) == migrations.head()
    hermes_orm.downgrade(bind=empty_db_url, revision="base")
    if empty_db_url.startswith("postgresql"):
        # The engine each call made is gone with its connections (NullPool, disposed).
        # (A closed connection's server process ends a moment after: a loaded machine
        # may still list it; one left open stays.)
        deadline = time.monotonic() + 10
        with create_store_engine(empty_db_url, poolclass=NullPool).connect() as conn:
            while True:
                others = conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).scalar_one()
                conn.rollback()  # (each look sees the processes as they are now)
                if others == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        assert others == 0


def test_a_sqlite_file_not_made_yet_is_only_created_by_an_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "not-yet" / "hermes.db"
    url = f"sqlite:///{path}"
    assert migrations.current(url) is None
    with pytest.raises(SchemaOutOfDateError, match="no hermes_orm schema"):
        hermes_orm.check_schema(url)
    assert migrations.differences(url)  # every table is missing
    hermes_orm.downgrade(url, "base")
    with pytest.raises(InvalidArgumentError, match="only PostgreSQL"):
        migrations.partition_messages(url, 4)
    assert not path.parent.exists()
    hermes_orm.upgrade(url)
    assert migrations.current(url) == migrations.head()
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "call",
    [
        hermes_orm.upgrade,
        hermes_orm.check_schema,
        migrations.current,
        migrations.differences,
        lambda bind: hermes_orm.downgrade(bind, "base"),
        lambda bind: migrations.partition_messages(bind, 4),
    ],
    ids=["upgrade", "check_schema", "current", "differences", "downgrade", "partition"],
)
def test_what_is_no_bind_is_refused_before_anything_connects(call: Any, tmp_path: Path) -> None:
    for bind in (None, 3, tmp_path / "hermes.db"):
        with pytest.raises(InvalidArgumentError, match=f"got {type(bind).__name__}$"):
            call(bind)
    path = tmp_path / "hermes.db"
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    with pytest.raises(InvalidArgumentError, match=r"got AsyncEngine: .*conn\.run_sync"):
        call(async_engine)
    for url in (f"sqlite+aiosqlite:///{path}", "postgresql+asyncpg://u:secret@localhost/db"):
        with pytest.raises(InvalidURLError, match="blocking driver") as raised:
            call(url)
        assert "secret" not in str(raised.value)
    assert not path.exists()


def test_an_async_engine_migrates_as_the_error_says(tmp_path: Path) -> None:
    path = tmp_path / "hermes.db"
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

    async def migrate() -> str | None:
        async with engine.begin() as conn:
            await conn.run_sync(hermes_orm.upgrade)
        async with engine.connect() as conn:
            await conn.run_sync(hermes_orm.check_schema)
            found: str | None = await conn.run_sync(migrations.current)
        await engine.dispose()
        return found

    assert asyncio.run(migrate()) == migrations.head()


def test_a_newer_schema_is_refused(db_url: str) -> None:
    engine = create_store_engine(db_url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE hermes_orm_alembic_version SET version_num = 'zzzz_future'")
    with pytest.raises(SchemaTooNewError, match="upgrade the hermes-orm-sessions package"):
        hermes_orm.check_schema(engine)
    # Migrating it either way is refused alike, before anything runs.
    for migrate, target in ((hermes_orm.upgrade, "head"), (hermes_orm.downgrade, "base")):
        with pytest.raises(SchemaTooNewError, match="zzzz_future"):
            migrate(engine, target)
    assert migrations.current(engine) == "zzzz_future"
    engine.dispose()


def test_a_revision_that_does_not_exist_is_an_argument_error(db_url: str) -> None:
    engine = create_store_engine(db_url, poolclass=NullPool)
    for migrate, target in (
        (hermes_orm.upgrade, "nosuch"),
        (hermes_orm.downgrade, "nosuch"),
        (hermes_orm.upgrade, "+5"),  # past the head
        (hermes_orm.upgrade, "head+1"),  # Alembic's walk upwards fails an assertion
        (hermes_orm.upgrade, "base+100"),
        (hermes_orm.downgrade, "head+1"),
    ):
        with pytest.raises(InvalidArgumentError, match=re.escape(f"cannot migrate to '{target}'")):
            migrate(engine, target)
        assert migrations.current(engine) == migrations.head()
    engine.dispose()


def test_an_upgrade_refused_for_its_arguments_makes_no_sqlite_file(tmp_path: Path) -> None:
    """A revision that names none, or partitions on SQLite: refused before the file is made."""
    path = tmp_path / "never.db"
    url = f"sqlite:///{path}"
    for revision, partitions, said in (
        ("nosuch", None, "cannot migrate to 'nosuch'"),
        ("", None, "revision must be 'head', 'base' or a revision id, got ''"),
        ("head", 4, "PostgreSQL"),
    ):
        with pytest.raises(InvalidArgumentError, match=re.escape(said)):
            hermes_orm.upgrade(url, revision, partitions=partitions)
        assert not path.exists()
        extra = () if partitions is None else ("--partitions", str(partitions))
        env = {**os.environ, "HERMES_HOME": str(tmp_path)}
        wrong = run_cli("db", "upgrade", revision, "--url", url, *extra, env=env)
        assert wrong.returncode == 2
        assert said in wrong.stderr
        assert "Traceback" not in wrong.stderr
        assert not path.exists()
    hermes_orm.upgrade(url, "head-0")  # counted from another: resolved as the run resolves it
    assert migrations.current(url) == migrations.head()


def _with_a_host_history(url: str, revision: str, table: str) -> Any:
    """An engine on ``url``, whose host application is at ``revision`` with its ``table``."""
    engine = create_store_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.exec_driver_sql(f"INSERT INTO alembic_version VALUES ('{revision}')")
        conn.exec_driver_sql(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)")
    return engine


def test_host_tables_and_version_table_untouched(empty_db_url: str) -> None:
    """Our migrations live beside a host app's own tables and alembic_version."""
    engine = _with_a_host_history(empty_db_url, "host_rev_1", "host_users")
    hermes_orm.upgrade(engine)
    hermes_orm.downgrade(engine, "base")
    hermes_orm.upgrade(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == (
            "host_rev_1"
        )
    assert {"host_users", "alembic_version"} <= set(inspect(engine).get_table_names())
    engine.dispose()
    assert migrations.include_name("host_users", "table") is True
    assert migrations.include_name("hermes_sessions", "table") is False
    assert migrations.include_name("hermes_orm_alembic_version", "table") is False


def test_upgrade_on_a_connection_hands_it_back_as_it_came(empty_db_url: str) -> None:
    """A host's env.py gets its connection back with no transaction open, or its own."""
    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    with engine.connect() as conn:
        hermes_orm.upgrade(conn)
        assert not conn.in_transaction()
        hermes_orm.upgrade(conn)  # at head: reads the version, must not leave that open
        assert not conn.in_transaction()
        conn.begin()
        hermes_orm.downgrade(conn, "0007_message_key_order")
        assert conn.in_transaction()  # the caller's to end
        conn.commit()
    assert migrations.current(engine) == "0007_message_key_order"
    # Inside the caller's transaction, the caller's rollback undoes the migration whole
    # (on SQLite too, where SQLAlchemy's transaction is no driver's before a write).
    with engine.connect() as conn:
        conn.begin()
        hermes_orm.upgrade(conn)
        conn.rollback()
    assert migrations.current(engine) == "0007_message_key_order"
    hermes_orm.upgrade(engine)  # (the tables are those of 0007: it runs)
    assert migrations.differences(engine) == []
    with engine.connect() as conn:
        conn.begin()
        hermes_orm.downgrade(conn, "0015_search_literal_nul_escape")
        conn.rollback()
    assert migrations.current(engine) == migrations.head()
    assert migrations.differences(engine) == []
    engine.dispose()


def _as_a_branch(engine: Any, revision: str, host_revision: str = "host_rev_1") -> None:
    """The state a host's ``alembic upgrade hermes_orm@REV`` leaves: ours in alembic_version."""
    hermes_orm.upgrade(engine, revision)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM hermes_orm_alembic_version")
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.exec_driver_sql(
            f"INSERT INTO alembic_version VALUES ('{host_revision}'), ('{revision}')"
        )


def test_a_branch_of_the_host_history_is_read_from_its_version_table(empty_db_url: str) -> None:
    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    _as_a_branch(engine, "0007_message_key_order")
    assert migrations.current(engine) == "0007_message_key_order"
    with pytest.raises(SchemaOutOfDateError, match="alembic upgrade hermes_orm@head"):
        hermes_orm.check_schema(engine)
    # hermes_orm's own runner would create the tables a second time: refused.
    with pytest.raises(hermes_orm.SchemaManagedByHostError, match="hermes_orm@head"):
        hermes_orm.upgrade(engine)
    # A downgrade says the host's downgrade, of the branch's own revisions.
    for given, command in (
        ("base", "alembic downgrade hermes_orm@base"),
        ("-1", "alembic downgrade hermes_orm@-1"),
        ("0006_digests_equal_as_dicts", "alembic downgrade 0006_digests_equal_as_dicts"),
    ):
        with pytest.raises(hermes_orm.SchemaManagedByHostError, match=re.escape(f"`{command}`")):
            hermes_orm.downgrade(engine, given)
    assert migrations.current(engine) == "0007_message_key_order"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE alembic_version SET version_num = '0099_a_later_change' "
            "WHERE version_num = '0007_message_key_order'"
        )
    # Our tables, and a revision named as ours are that this one does not know: newer.
    with pytest.raises(SchemaTooNewError, match="0099_a_later_change"):
        hermes_orm.check_schema(engine)
    engine.dispose()


def test_cli_db_commands(empty_db_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "HERMES_ORM_URL": empty_db_url, "HERMES_HOME": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=env)

    check = cli("db", "check")
    assert check.returncode == 2
    assert "hermes-orm db upgrade" in check.stderr
    assert cli("db", "upgrade").returncode == 0
    assert cli("db", "check").returncode == 0
    assert "up to date" in cli("db", "current").stdout
    wrong = cli("db", "downgrade", "nosuch")
    assert wrong.returncode == 2
    assert "cannot migrate to 'nosuch'" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    assert cli("db", "downgrade", "base").returncode == 0
    assert "no hermes_orm schema" in cli("db", "current").stdout


def test_search_still_speaks_the_frozen_schema_of_its_migration() -> None:
    """Queries use the partial indexes 0009 made only if they spell the same condition.

    And the trigger's scripts written without spaces (0010's trigger), and its
    body's bound, are those of the search code.
    """
    from hermes_orm import _search_text, search

    words_only = frozen_revision("0009_search_words_only")
    postgresql = " ".join(words_only._UPGRADE)
    assert f"WHERE {search._PG_UNSEGMENTED.removeprefix('m.')}" in postgresql
    assert search._pg_body("b").split("(")[0] in postgresql
    trigger = frozen_revision("0010_search_spaces_kept")
    assert _search_text.regex_class(_search_text.UNSEGMENTED_RANGES) == trigger._CJK
    assert f"{_search_text.BODY_LIMIT}" in trigger._BODY
    assert trigger._function(trigger._SEPARATORS_0009) in words_only._UPGRADE
    assert trigger._SEPARATORS_0010.startswith(r"[\u0001-\u0008\u000b\u000c\u000e-\u001f\u0021")
    # 0011 keeps the words between the blanks a query is cut at (str.split's).
    words = frozen_revision("0011_search_cjk_words")
    assert words._CJK == trigger._CJK
    blanks = [code for code in range(0x110000) if chr(code).isspace()]
    runs: list[tuple[int, int]] = []
    for code in blanks:
        if runs and runs[-1][1] == code - 1:
            runs[-1] = (runs[-1][0], code)
        else:
            runs.append((code, code))
    assert _search_text.regex_class(tuple(runs)) + "+" == words._BLANKS
    # 0012 folds the letters the search code folds, in the trigger 0010 made.
    folds = frozen_revision("0012_search_folds_like_fts5")
    assert (folds._FOLDED, folds._FOLDED_TO) == (_search_text.FOLDED, _search_text.FOLDED_TO)
    assert folds._function(fold=False) == trigger._function(trigger._SEPARATORS_0010)


@pytest.mark.postgresql
def test_0011_narrows_the_cjk_text_a_populated_database_holds(empty_pg: str) -> None:
    """Rows written at 0010 (whole bodies) keep only their CJK-like words, found the same.

    The downgrade puts the whole bodies back.
    """
    from sqlalchemy import text

    engine = create_store_engine(empty_pg, poolclass=NullPool)
    migrations.upgrade(engine, "0010_search_spaces_kept")
    written = [
        "deploy 部署\uff0c数据库。 then 100%完成 ok",
        "plain words",
        "設定ファイル\u3000here",
    ]
    with store_before_0016(engine) as store:
        store.create_session("s", source="cli")
        store.flush("s", [{"role": "user", "content": t} for t in written])

    def kept() -> list[str | None]:
        with engine.connect() as conn:
            return list(
                conn.execute(text("SELECT search_cjk FROM hermes_messages ORDER BY idx")).scalars()
            )

    assert kept() == [f"{written[0]}\n\n\n", None, f"{written[2]}\n\n\n"]
    migrations.upgrade(engine)
    assert kept() == ["部署\uff0c数据库。 100%完成", None, "設定ファイル"]
    store = hermes_orm.SessionStore(engine)
    for query, idx in (("数据库", 0), ("100%完成", 0), ("ファイル", 2)):
        assert [hit.idx for hit in store.search(query).hits] == [idx]
    migrations.downgrade(engine, "0010_search_spaces_kept")
    assert kept() == [f"{written[0]}\n\n\n", None, f"{written[2]}\n\n\n"]
    migrations.upgrade(engine)
    engine.dispose()


def test_a_round_trip_below_0006_leaves_digests_only_a_repair_recomputes(
    empty_db_url: str,
) -> None:
    """As the README says: an int timestamp's message, after a downgrade below 0006 and an
    upgrade again, keeps a digest today's flush does not compute; refused until
    ``verify --repair``, which changes nothing else."""
    from hermes_orm.verify import verify_database

    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    migrations.upgrade(engine)
    messages = [{"role": "user", "content": "hi", "timestamp": 1_700_000_000}]
    with hermes_orm.SessionStore(engine) as store:
        store.create_session("s", source="cli")
        store.flush("s", messages)
    migrations.downgrade(engine, "0005_search_from_new_row")
    migrations.upgrade(engine)
    with hermes_orm.SessionStore(engine) as store:
        assert store.get_messages("s") == messages
        assert {p.check for p in verify_database(store).problems} == {"digest", "flushed_digest"}
        with pytest.raises(HistoryDivergedError):
            store.flush("s", messages)
        assert all(p.repaired for p in verify_database(store, repair=True).problems)
        assert store.flush("s", [*messages, {"role": "user", "content": "on"}]).written == 1
        assert store.get_messages("s")[0] == messages[0]
    engine.dispose()


def test_0013_recounts_the_tool_calls_of_live_messages(empty_db_url: str) -> None:
    """Sessions counted before 0013 counted the tool calls of archived messages too."""
    from hermes_orm.verify import verify_database

    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    migrations.upgrade(engine, "0012_search_folds_like_fts5")
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    archived = {"role": "assistant", "content": None, "tool_calls": [call, call], "active": False}
    with store_before_0016(engine) as store:
        store.create_session("old", source="cli")
        store.flush("old", [archived, {"role": "assistant", "content": None, "tool_calls": [call]}])
        store.create_session("plain", source="cli")
        store.flush("plain", [{"role": "assistant", "content": None, "tool_calls": [call]}])

    def counts() -> dict[str, int]:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT id, tool_call_count FROM hermes_sessions")
            return dict(rows.all())  # type: ignore[arg-type]

    with engine.begin() as conn:  # as 0012's hermes_orm counted them
        conn.exec_driver_sql("UPDATE hermes_sessions SET tool_call_count = 3 WHERE id = 'old'")
    migrations.upgrade(engine)
    assert counts() == {"old": 1, "plain": 1}
    assert verify_database(hermes_orm.SessionStore(engine)).problems == []
    migrations.downgrade(engine, "0012_search_folds_like_fts5")
    assert counts() == {"old": 3, "plain": 1}
    migrations.upgrade(engine)
    engine.dispose()


def test_0016_gives_the_sessions_made_before_it_history_id_0(empty_db_url: str) -> None:
    """Sessions made before 0016 hold 0, and flushes on a remembered cursor go on there;
    sessions made after it draw their own. The downgrade drops the column."""
    from sqlalchemy import text

    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    migrations.upgrade(engine, "0015_search_literal_nul_escape")
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with store_before_0016(engine) as store:
        store.create_session("old", source="cli")
        store.flush("old", turn)
    migrations.upgrade(engine)

    def histories() -> dict[str, int]:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, history_id FROM hermes_sessions"))
            return dict(rows.all())  # type: ignore[arg-type]

    assert histories() == {"old": 0}
    store = hermes_orm.SessionStore(engine)
    for n in (2, 3):  # a locked read, then the remembered cursor
        assert store.flush("old", turn * n).written == 2
    assert store._memory.hints["old"].history == 0
    store.create_session("new", source="cli")
    assert histories()["new"] != 0
    assert store.get_messages("old") == turn * 3
    migrations.downgrade(engine, "0015_search_literal_nul_escape")
    columns = {c["name"] for c in inspect(engine).get_columns("hermes_sessions")}
    assert "history_id" not in columns
    migrations.upgrade(engine)
    assert histories() == {"old": 0, "new": 0}
    engine.dispose()


@pytest.mark.postgresql
def test_0014_replaces_the_trigger_function_and_its_downgrade_puts_0012s_back(
    empty_pg: str,
) -> None:
    engine = create_store_engine(empty_pg, poolclass=NullPool)

    def definition() -> str:
        with engine.connect() as conn:
            statement = "SELECT pg_get_functiondef('hermes_search_index'::regproc)"
            return str(conn.exec_driver_sql(statement).scalar_one())

    migrations.upgrade(engine, "0013_tool_calls_of_live_messages")
    at_0013 = definition()
    migrations.upgrade(engine)
    assert "wide := octet_length(body) <> length(body)" in definition()
    migrations.downgrade(engine, "0013_tool_calls_of_live_messages")
    assert definition() == at_0013


@pytest.mark.postgresql
def test_0012_folds_the_vectors_a_populated_database_holds(empty_pg: str) -> None:
    """Messages written at 0011 with final sigma (and the like) are found by every form after it.

    The downgrade makes their vectors as 0011 made them.
    """
    engine = create_store_engine(empty_pg, poolclass=NullPool)
    migrations.upgrade(engine, "0011_search_cjk_words")
    # (long s: 2 bytes in UTF-8, s 1: a word too long to index until it is folded)
    written = ["ΟΔΟΣ", "ο δρόμος, η οδος", "plain words", "\u03d0eta", "\u017f" * 1100]  # noqa: RUF001
    with store_before_0016(engine) as store:
        store.create_session("s", source="cli")
        store.flush("s", [{"role": "user", "content": t} for t in written])

    def found(query: str) -> list[int]:
        return sorted(hit.idx for hit in store.search(query).hits)

    def vectors() -> list[str]:
        with engine.connect() as conn:
            statement = "SELECT search_vector::text FROM hermes_messages ORDER BY idx"
            return list(conn.exec_driver_sql(statement).scalars())

    as_0011 = vectors()
    assert found("ΟΔΟΣ") == [0]  # each form alone
    migrations.upgrade(engine)
    store = hermes_orm.SessionStore(engine)
    assert found("ΟΔΟΣ") == found("οδος") == found("οδοσ") == [0, 1]
    assert found("δρόμοσ") == [1]
    assert found("βeta") == found("\u03d0eta") == [3]
    assert found("plain") == [2]
    assert vectors()[2] == as_0011[2]  # a message without such letters is not rewritten
    assert found("ssss*") == [4]
    upgraded = vectors()
    with engine.begin() as conn:  # the trigger makes each row's vector anew
        conn.exec_driver_sql("UPDATE hermes_messages SET content = content")
    assert vectors() == upgraded
    migrations.downgrade(engine, "0011_search_cjk_words")
    assert vectors() == as_0011
    migrations.upgrade(engine)
    engine.dispose()


def test_0015_indexes_again_the_messages_holding_a_literal_nul_escape(db_url: str) -> None:
    """Messages written at 0014 holding the text ``\\u0000`` are found by it after 0015.

    Only they are indexed again; the index stays whole (verify finds nothing),
    and the downgrade indexes them as 0014 did.
    """
    from hermes_orm.verify import verify_database
    from tests.test_search import LITERAL_NUL_ESCAPES, body_of, search_bodies

    engine = create_store_engine(db_url, poolclass=NullPool)
    migrations.downgrade(engine, "base")
    migrations.upgrade(engine, "0014_search_trigger_skips_steps")
    with store_before_0016(engine) as store:
        store.create_session("s", source="cli")
        store.flush("s", [{"role": "user", "content": "plain u0000 words"}, *LITERAL_NUL_ESCAPES])

    def found() -> list[int]:
        return sorted(hit.idx for hit in store.search("u0000").hits)

    as_0014 = search_bodies(engine)
    assert found() == [0]  # the text was made \u0020
    migrations.upgrade(engine)
    store = hermes_orm.SessionStore(engine)
    assert found() == [0, 1, 2]
    assert search_bodies(engine) == [body_of(m) for m in store.get_messages("s")]
    assert verify_database(store).problems == []
    migrations.downgrade(engine, "0014_search_trigger_skips_steps")
    assert search_bodies(engine) == as_0014
    with store_before_0016(engine) as store:
        assert found() == [0]
        assert verify_database(store).problems == []
    migrations.upgrade(engine)
    engine.dispose()


@pytest.mark.postgresql
def test_0015_indexes_a_message_written_under_0014_while_it_runs(empty_pg: str) -> None:
    """A write in progress under 0014's function ends before 0015 looks for messages to index."""
    import json
    import threading

    from sqlalchemy import text

    engine = create_store_engine(empty_pg, poolclass=NullPool)
    migrations.upgrade(engine, "0014_search_trigger_skips_steps")
    with store_before_0016(engine) as store:
        store.create_session("s", source="cli")
    parts = json.dumps([{"type": "text", "text": "literal \\u0000 koala"}])
    writer = engine.connect()
    writer.execute(
        text(
            "INSERT INTO hermes_messages (session_id, idx, role, content_parts, digest) "
            "VALUES ('s', 0, 'user', CAST(:parts AS json), :digest)"
        ),
        {"parts": parts, "digest": b"0" * 16},
    )
    upgraded = threading.Event()
    upgrade = threading.Thread(target=lambda: (migrations.upgrade(engine), upgraded.set()))
    upgrade.start()
    assert not upgraded.wait(2)  # it waits for the write
    writer.commit()
    writer.close()
    upgrade.join(60)
    assert upgraded.is_set()
    with engine.connect() as conn:
        vector = conn.exec_driver_sql("SELECT search_vector::text FROM hermes_messages").scalar()
    assert vector == "'koala':3 'literal':1 'u0000':2"
    engine.dispose()


@pytest.mark.postgresql
def test_0015_replaces_the_search_functions_and_its_downgrade_puts_them_back(
    empty_pg: str,
) -> None:
    engine = create_store_engine(empty_pg, poolclass=NullPool)

    def definitions() -> list[str]:
        with engine.connect() as conn:
            statement = "SELECT pg_get_functiondef(%s::regproc)"
            return [
                str(conn.exec_driver_sql(statement, (name,)).scalar_one())
                for name in ("hermes_search_index", "hermes_search_body")
            ]

    migrations.upgrade(engine, "0014_search_trigger_skips_steps")
    at_0014 = definitions()
    migrations.upgrade(engine)
    assert all("\\\\u0000|" in definition for definition in definitions())
    migrations.downgrade(engine, "0014_search_trigger_skips_steps")
    assert definitions() == at_0014
    engine.dispose()


def test_0015_puts_the_sqlite_view_and_triggers_back(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    engine = create_store_engine(f"sqlite:///{path}", poolclass=NullPool)
    statement = (
        "SELECT type, name, sql FROM sqlite_master WHERE name LIKE 'hermes_search%' "
        "ORDER BY type, name"
    )

    def definitions() -> list[Any]:
        with engine.connect() as conn:
            return list(conn.exec_driver_sql(statement).all())

    migrations.upgrade(engine, "0014_search_trigger_skips_steps")
    at_0014 = definitions()
    migrations.upgrade(engine)
    assert definitions() != at_0014
    migrations.downgrade(engine, "0014_search_trigger_skips_steps")
    assert definitions() == at_0014
    engine.dispose()


def test_0006_rewrites_the_digests_a_populated_database_holds(db_url: str) -> None:
    """Messages stored before 0006 (with the digests of then) continue after it.

    The database is built at 0005, with rows as that release wrote them: after
    the upgrade each message and session holds the digest a flush compares
    with, so flushing the same list (its keys now in another order) writes
    only the new message.
    """
    from sqlalchemy import text

    from tests.test_messages import LEGACY_DIGESTS, STORED_DIGESTS

    engine = create_store_engine(db_url, poolclass=NullPool)
    migrations.downgrade(engine, "base")
    migrations.upgrade(engine, "0005_search_from_new_row")
    messages = [message for message, _ in STORED_DIGESTS]
    encoded = [hermes_orm._codec.encode_message(m, i) for i, m in enumerate(messages)]
    columns = ("session_id", "idx", *hermes_orm._codec.PARAM_COLUMNS)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO hermes_sessions (id, source, started_at, flushed_idx,"
                " flushed_digest, message_count, tool_call_count)"
                " VALUES ('old', 'cli', 1, 3, :digest, 3, 1)"
            ),
            {"digest": bytes.fromhex(LEGACY_DIGESTS[-1])},
        )
        for idx, (item, legacy) in enumerate(zip(encoded, LEGACY_DIGESTS, strict=True)):
            values = dict(zip(columns, ("old", idx, *item.params), strict=True))
            values["digest"] = bytes.fromhex(legacy)
            del values["key_order"]  # (from 0007 on)
            names = ", ".join(values)
            marks = ", ".join(f":{name}" for name in values)
            conn.execute(text(f"INSERT INTO hermes_messages ({names}) VALUES ({marks})"), values)
    migrations.upgrade(engine)
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT digest FROM hermes_messages WHERE session_id = 'old' ORDER BY idx")
        ).scalars()
        assert [bytes(d).hex() for d in stored] == [d for _, d in STORED_DIGESTS]
    store = hermes_orm.SessionStore(engine)
    reordered = [dict(reversed(list(m.items()))) for m in messages]
    assert store.flush("old", [*reordered, {"role": "user", "content": "more"}]).written == 1
    assert store.get_messages("old")[:3] == messages
    assert store.search("terminal", session_id="old").hits  # the search index kept its rows
    migrations.downgrade(engine, "0005_search_from_new_row")
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT digest FROM hermes_messages WHERE session_id = 'old' ORDER BY idx")
        ).scalars()
        assert [bytes(d).hex() for d in stored][:3] == LEGACY_DIGESTS
    store.close()
    engine.dispose()


def test_data_written_at_every_revision_survives_to_head(db_url: str) -> None:
    """Sessions written at each shipped revision are all there at head, searchable and sound.

    At each revision (base to the one before head) a session is written as
    that release stored it, digests of its time included; after the upgrade to
    head every one reads back equal, is found by search, passes ``verify``, and
    continues with a flush.
    """
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    from hermes_orm._codec import PARAM_COLUMNS, encode_message
    from hermes_orm.migrations import SCRIPT_LOCATION
    from hermes_orm.verify import verify_database
    from tests.test_flush import conversation

    script = ScriptDirectory(SCRIPT_LOCATION)
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    frozen = frozen_revision("0006_digests_equal_as_dicts")

    engine = create_store_engine(db_url, poolclass=NullPool)
    migrations.downgrade(engine, "base")
    written: dict[str, list[dict[str, Any]]] = {}
    for n, revision in enumerate(revisions[:-1]):
        migrations.upgrade(engine, revision)
        sid = f"rev{n}"
        # (the tag's "_" keeps "rev1" + turn 0 from reading as "rev10")
        messages = [*conversation(2, f"{sid}_"), {"role": "user", "content": f"检索历史记录 {sid}"}]
        legacy = revisions.index("0006_digests_equal_as_dicts") > n
        rows = []
        for idx, message in enumerate(messages):
            columns = dict(zip(PARAM_COLUMNS, encode_message(message, idx).params, strict=True))
            if revisions.index("0007_message_key_order") > n:
                del columns["key_order"]  # the releases before kept no order
            if legacy:  # the digest as the releases before 0006 stored it
                stored = [columns[c] for c in frozen._COLUMNS]
                columns["digest"] = frozen._digest(stored, as_compared=False)
            rows.append({"session_id": sid, "idx": idx, **columns})
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO hermes_sessions (id, source, started_at, flushed_idx,"
                    " flushed_digest, message_count, tool_call_count)"
                    " VALUES (:id, 'cli', :n, :count, :digest, :count, 2)"
                ),
                {"id": sid, "n": n, "count": len(rows), "digest": rows[-1]["digest"]},
            )
            names = list(rows[0])
            conn.execute(
                text(
                    f"INSERT INTO hermes_messages ({', '.join(names)})"
                    f" VALUES ({', '.join(':' + name for name in names)})"
                ),
                rows,
            )
        written[sid] = messages
    migrations.upgrade(engine)
    store = hermes_orm.SessionStore(engine)
    assert verify_database(store).problems == []
    for sid, messages in written.items():
        assert store.get_messages(sid) == messages
        assert {h.session_id for h in store.search(sid).hits} == {sid}
        assert len(store.search("历史记录", session_id=sid).hits) == 1
        assert len(store.search("question", session_id=sid).hits) == 2
        more = {"role": "user", "content": "more"}
        assert store.flush(sid, [*messages, more]).written == 1
    store.close()
    engine.dispose()


def _upgrade_when_told(url: str, go: Any) -> None:
    go.wait()
    engine = create_store_engine(url, poolclass=NullPool)
    try:
        migrations.upgrade(engine)
    finally:
        engine.dispose()


def test_processes_upgrading_one_database_at_once_take_turns(empty_db_url: str) -> None:
    """A gateway and a cron job starting after an upgrade: both succeed, the schema at head."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    go = context.Event()
    workers = [
        context.Process(target=_upgrade_when_told, args=(empty_db_url, go)) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    go.set()
    _all_done_at_head(workers, empty_db_url)


def _all_done_at_head(workers: list[Any], url: str) -> None:
    """Wait for ``workers`` (processes that migrate ``url``): each ended well, at the head."""
    for worker in workers:
        worker.join(120)
    for worker in workers:
        if worker.is_alive():  # hung: fail without leaving it behind
            worker.terminate()
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    engine = create_store_engine(url, poolclass=NullPool)
    assert migrations.current(engine) == migrations.head()
    engine.dispose()


def _take_the_migration_lock(conn: Any) -> None:
    """What a migration in another process holds, as far as locks go."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({migrations._MIGRATION_LOCK})")


def test_a_migration_that_waited_for_another_says_so(
    empty_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import threading

    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    with engine.connect() as holder:  # another process's migration, as far as locks go
        _take_the_migration_lock(holder)
        timer = threading.Timer(1.5, holder.rollback)
        timer.start()
        with caplog.at_level(logging.INFO, logger="hermes_orm"):
            hermes_orm.upgrade(engine)
        timer.join()
    assert "waited" in caplog.text
    assert "another process's migration" in caplog.text
    assert migrations.current(engine) == migrations.head()
    engine.dispose()


def test_an_upgrade_with_nothing_to_do_waits_for_no_lock(db_url: str) -> None:
    """A store's upgrade() on start-up, while a writer holds SQLite's write lock a while."""
    import threading

    engine = create_store_engine(db_url, poolclass=NullPool)
    released = threading.Event()
    with engine.connect() as holder:
        _take_the_migration_lock(holder)

        def release() -> None:  # only if upgrade() waited (it would wait for ever)
            released.set()
            holder.rollback()

        timer = threading.Timer(60, release)
        timer.start()
        hermes_orm.upgrade(engine)
        assert not released.is_set()  # it returned while the lock was held
        timer.cancel()
        holder.rollback()
    engine.dispose()


def test_the_hosts_own_revisions_are_never_taken_for_ours(empty_db_url: str) -> None:
    """Our tables without our version, beside a host's alembic_version: no revision of ours."""
    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    hermes_orm.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM hermes_orm_alembic_version")
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('app_0001_accounts')")
    assert migrations.current(engine) is None
    # An upgrade would collide with the tables: not an out-of-date schema, which it would fix.
    with pytest.raises(DatabaseError, match="no hermes_orm schema revision"):
        hermes_orm.check_schema(engine)
    engine.dispose()


def _tables_left(engine: Any) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_an_autocommit_bind_is_refused_before_anything_runs(empty_db_url: str) -> None:
    """The migration lock and all-or-nothing revisions need a transaction: refused at once."""
    engine = create_store_engine(empty_db_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with pytest.raises(InvalidArgumentError, match="AUTOCOMMIT"):
        hermes_orm.upgrade(engine)
    with pytest.raises(InvalidArgumentError, match="AUTOCOMMIT"):
        hermes_orm.downgrade(engine, "base")
    if engine.dialect.name == "postgresql":
        with pytest.raises(InvalidArgumentError, match="AUTOCOMMIT"):
            migrations.partition_messages(engine, 4)
    engine.dispose()
    plain = create_store_engine(empty_db_url, poolclass=NullPool)
    with plain.connect() as conn:
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        with pytest.raises(InvalidArgumentError, match="AUTOCOMMIT"):
            hermes_orm.upgrade(autocommit)
    assert _tables_left(plain) == set()  # nothing ran, not even the version table
    hermes_orm.upgrade(plain)  # an ordinary engine then migrates from scratch
    assert migrations.current(plain) == migrations.head()
    plain.dispose()


def test_a_driver_that_autocommits_is_refused_before_anything_runs(empty_pg: str) -> None:
    """psycopg's ``autocommit=True`` among the connect args: each revision would commit alone."""
    engine = create_store_engine(empty_pg, poolclass=NullPool, connect_args={"autocommit": True})
    for migrate in (hermes_orm.upgrade, lambda bind: migrations.partition_messages(bind, 4)):
        with pytest.raises(InvalidArgumentError, match="autocommit=True among its connect_args"):
            migrate(engine)
    with (
        engine.connect() as conn,
        pytest.raises(InvalidArgumentError, match="autocommit=True among its connect_args"),
    ):
        hermes_orm.upgrade(conn)
    plain = create_store_engine(empty_pg, poolclass=NullPool)
    assert _tables_left(plain) == set()
    engine.dispose()
    plain.dispose()


def test_a_sqlite3_connection_that_autocommits_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    """sqlite3's ``autocommit=True`` (Python 3.12+): its commit() and rollback() do
    nothing, so the migration's BEGIN IMMEDIATE would never end (its write lock held
    on the pooled connection, the migration lost with it). Made here as that
    attribute makes it, on the Python of the run."""
    import sqlite3

    class Autocommitting(sqlite3.Connection):
        autocommit = True

    path = tmp_path / "auto.db"
    engine = create_engine(
        "sqlite://", creator=lambda: sqlite3.connect(path, factory=Autocommitting)
    )
    with engine.connect() as conn:
        for bind in (engine, conn):
            with pytest.raises(InvalidArgumentError, match="autocommits every statement"):
                hermes_orm.upgrade(bind)
    assert inspect(create_engine(f"sqlite:///{path}")).get_table_names() == []
    engine.dispose()


def test_an_async_upgrade_cancelled_twice_ends_once_its_driver_let_the_lock_go(
    tmp_path: Path,
) -> None:
    """aiosqlite, an application's engine: a task cancelled as a migration's statement
    goes to the driver's thread, and cancelled again while SQLAlchemy drops that
    connection. The second cancellation cut short the wait for the dropped
    connection's rollback: upgrade() ended while the driver's thread still ran the
    migration, its write lock held, and other writers were refused."""
    import sqlite3
    import time

    from sqlalchemy import event

    path = tmp_path / "app.db"

    async def main() -> list[str]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        store = hermes_orm.AsyncSessionStore(engine)
        cut: list[str] = []
        busy: list[asyncio.Future[Any]] = []

        def slow(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if not cut and "CREATE TABLE" in statement:  # in the migration's transaction
                cut.append(statement)
                sleep = conn.connection.driver_connection._execute(time.sleep, 0.5)
                busy.append(asyncio.ensure_future(sleep))  # its thread busy next, the lock held
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
                asyncio.get_running_loop().call_later(0.1, task.cancel)  # and again

        event.listen(engine.sync_engine, "before_cursor_execute", slow)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.ensure_future(store.upgrade())
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("CREATE TABLE theirs (x)")
        other.execute("COMMIT")  # no one holds the write lock
        other.close()
        await store.close()
        await engine.dispose()
        return cut

    assert len(asyncio.run(main())) == 1
    hermes_orm.upgrade(create_engine(f"sqlite:///{path}"))  # (the cancelled one left nothing)
    assert migrations.current(create_engine(f"sqlite:///{path}")) == migrations.head()


def _keeps_a_transaction_open() -> dict[str, Any]:
    """The connect args of sqlite3's ``autocommit=False`` (Python 3.12+), a transaction
    always open; on an older Python, a connection given that attribute as 3.12 has it."""
    import sqlite3

    if sys.version_info >= (3, 12):
        return {"autocommit": False}

    class KeepsATransactionOpen(sqlite3.Connection):
        autocommit = False

    return {"factory": KeepsATransactionOpen}


def test_a_sqlite3_connection_always_in_a_transaction_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    """sqlite3's ``autocommit=False`` (Python 3.12+) begins a transaction as it connects
    and after each commit: no BEGIN IMMEDIATE can begin, no PRAGMA change. The
    migrations and both stores refuse it, on an application's engine and on one
    hermes_orm made, with a typed error before anything runs; the driver's "cannot
    start a transaction within a transaction" was all they said."""
    path = tmp_path / "kept.db"
    url = f"sqlite:///{path}"
    args = _keeps_a_transaction_open()
    refused = pytest.raises(InvalidArgumentError, match="keep a transaction open at all times")
    app = create_engine(url, connect_args=args)
    with refused:
        hermes_orm.upgrade(app)
    with app.connect() as conn, refused:
        hermes_orm.upgrade(conn)
    assert inspect(create_engine(url)).get_table_names() == []
    hermes_orm.upgrade(create_engine(url))  # an ordinary engine migrates it
    for engine in (app, create_store_engine(url, connect_args=args)):
        with refused:
            hermes_orm.SessionStore(engine).create_session("s", source="cli")
        engine.dispose()

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args=args)
        with refused:
            await hermes_orm.AsyncSessionStore(engine).create_session("s", source="cli")
        await engine.dispose()

    asyncio.run(main())
    assert hermes_orm.SessionStore(url).list_sessions().sessions == []


@pytest.mark.parametrize(
    "setup",
    [
        # someone else's table, named as one of ours
        ["CREATE TABLE hermes_meta (k TEXT)", "INSERT INTO hermes_meta VALUES ('theirs')"],
        # another application's hermes_sessions, its history numbered as ours are
        [
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)",
            "INSERT INTO alembic_version VALUES ('0003_add_users')",
            "CREATE TABLE hermes_sessions (id TEXT PRIMARY KEY, who TEXT)",
        ],
    ],
    ids=["hermes_meta", "another_apps_history"],
)
def test_tables_named_as_ours_without_our_revision_are_refused(
    empty_db_url: str, setup: list[str]
) -> None:
    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    with engine.begin() as conn:
        for statement in setup:
            conn.exec_driver_sql(statement)
    before = _tables_left(engine)
    assert migrations.current(engine) is None  # never taken for a revision of ours
    store = SessionStore(engine)
    calls = [
        lambda: hermes_orm.check_schema(engine),
        lambda: hermes_orm.upgrade(engine),
        store.upgrade,
    ]
    for call in calls:
        with pytest.raises(DatabaseError, match="no hermes_orm schema revision") as raised:
            call()
        assert "not hermes_orm's" in str(raised.value)
        if "0003_add_users" in " ".join(setup):
            assert "alembic_version holds 0003_add_users, not a revision of ours" in str(
                raised.value
            )
    assert _tables_left(engine) == before  # nothing written
    store.close()
    engine.dispose()


def test_a_hosts_autogenerate_sees_only_its_own_tables(empty_db_url: str) -> None:
    """Exact names, not the prefix; our models in the host's metadata left out too."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table

    from hermes_orm.models import Base

    host = MetaData()
    Table(
        "accounts",
        host,
        Column("id", Integer, primary_key=True),
        Column("session_id", String(255), ForeignKey(hermes_orm.models.Session.id)),
    )
    Table("hermes_invoices", host, Column("id", Integer, primary_key=True))  # the host's own
    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    with engine.begin() as conn:
        hermes_orm.upgrade(conn)
        host.create_all(conn)
    assert migrations.differences(engine) == []  # hermes_invoices is not ours to drop
    hooks = {
        "include_name": migrations.include_name,
        "include_object": migrations.include_object,
        "compare_type": True,
    }
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts=hooks)
        assert compare_metadata(context, host) == []
        # A host whose target_metadata holds our models as well.
        assert compare_metadata(context, [host, Base.metadata]) == []
        # Its own table missing is still proposed, and ours in the database never dropped.
        conn.exec_driver_sql("DROP TABLE hermes_invoices")
        found = compare_metadata(context, [host, Base.metadata])
    assert [(op[0], op[1].name) for op in found] == [("add_table", "hermes_invoices")]
    assert migrations.include_name("hermes_invoices", "table") is True
    assert migrations.include_name("hermes_messages_part_007", "table") is False
    assert migrations.include_name("hermes_messages_part_1023", "table") is False  # the last
    for other in (
        "hermes_messages_part_1024",
        "hermes_messages_part_0007",
        "hermes_messages_part_7",
    ):
        assert migrations.include_name(other, "table") is True
    assert migrations.owns_table("hermes_search_cjk_docsize")
    assert not migrations.owns_table("hermes_searches")
    engine.dispose()


def test_a_hosts_table_named_as_sqlites_search_index_is_its_own_on_postgresql(
    empty_pg: str,
) -> None:
    """hermes_search is an FTS5 table of ours on SQLite only: on PostgreSQL a host may have one."""
    engine = create_store_engine(empty_pg, poolclass=NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE hermes_search (id integer PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO hermes_search VALUES (1)")
    hermes_orm.upgrade(engine)  # not taken for ours left without a revision
    assert migrations.current(engine) == migrations.head()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT id FROM hermes_search").scalar() == 1
    assert not migrations.owns_table("hermes_search", "postgresql")
    assert migrations.owns_table("hermes_search", "sqlite")
    engine.dispose()


def test_a_hosts_own_revision_named_as_one_of_ours_is_the_hosts(empty_db_url: str) -> None:
    """A host history whose first revision is also called 0001_baseline: no branch of ours."""
    engine = _with_a_host_history(empty_db_url, "0001_baseline", "orders")
    assert migrations.current(engine) is None
    with pytest.raises(SchemaOutOfDateError, match="hermes-orm db upgrade"):
        hermes_orm.check_schema(engine)
    hermes_orm.upgrade(engine)  # side by side, in its own version table
    assert migrations.current(engine) == migrations.head()
    with engine.connect() as conn:
        hosts = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
    assert hosts == ["0001_baseline"]
    engine.dispose()


def test_offline_mode_is_refused_with_a_clear_error(empty_db_url: str) -> None:
    result = _alembic("-x", f"url={empty_db_url}", "upgrade", "head", "--sql")
    assert result.returncode != 0
    assert "InvalidArgumentError" in result.stderr
    assert "offline mode (--sql)" in result.stderr
    assert "AttributeError" not in result.stderr
    assert "CREATE TABLE" not in result.stdout  # refused before any SQL is written


def _upgrade_as(how: str, url: str, ready: Any) -> None:
    """Migrate ``url`` as a process of a deployment would, once every process is ready."""
    import asyncio

    if how == "async_store":

        async def main() -> None:
            store = hermes_orm.AsyncSessionStore(url, check_schema=False)
            try:
                ready.wait()
                await store.upgrade()
            finally:
                await store.close()

        asyncio.run(main())
        return
    engine = create_store_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:  # a host's env.py, as the README shows it
            ready.wait()
            migrations.upgrade(connection)
    finally:
        engine.dispose()


@pytest.mark.parametrize("how", ["async_store", "host_connection"])
def test_processes_upgrading_at_once_take_turns_whatever_they_call(
    empty_db_url: str, how: str
) -> None:
    """SQLite's write lock taken first by the async store and on a host's connection too."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(3)
    workers = [
        context.Process(target=_upgrade_as, args=(how, empty_db_url, ready)) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    _all_done_at_head(workers, empty_db_url)


def _hold_the_migration_lock(url: str, held: Any, seconds: float, releasing: Any = None) -> None:
    """Another process's long migration, as far as locks go."""
    import time

    engine = create_store_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        _take_the_migration_lock(conn)
        held.set()
        time.sleep(seconds)
        if releasing is not None:
            releasing.set()
        conn.rollback()
    engine.dispose()


HOLD = 3.0


@pytest.mark.parametrize("how", ["upgrade", "store", "async_store"])
def test_a_migration_waits_for_another_however_long_it_takes(
    empty_db_url: str,
    how: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past lock_timeout and the retry bound: a migration of a big database takes minutes."""
    import asyncio
    import logging
    import multiprocessing

    from hermes_orm import AsyncSessionStore, RetryPolicy

    engine = create_store_engine(empty_db_url, poolclass=NullPool, lock_timeout=0.2)
    monkeypatch.setattr(migrations, "_TELL_EVERY", 1.0)
    context = multiprocessing.get_context("spawn")
    held, releasing = context.Event(), context.Event()
    holder = context.Process(
        target=_hold_the_migration_lock, args=(empty_db_url, held, HOLD, releasing)
    )
    holder.start()
    assert held.wait(60)
    quick = {"lock_timeout": 0.2, "retry": RetryPolicy(attempts=2)}
    with caplog.at_level(logging.INFO, logger="hermes_orm"):
        if how == "upgrade":
            hermes_orm.upgrade(engine)
        elif how == "store":
            store = SessionStore(empty_db_url, **quick)  # type: ignore[arg-type]
            store.upgrade()
            store.close()
        else:

            async def main() -> None:
                store = AsyncSessionStore(empty_db_url, **quick)  # type: ignore[arg-type]
                await store.upgrade()
                await store.close()

            asyncio.run(main())
    assert releasing.is_set()  # it returned only once the other let the lock go
    holder.join(60)
    assert holder.exitcode == 0
    assert "waiting for another process's migration of the database" in caplog.text
    assert "waited" in caplog.text
    assert migrations.current(engine) == migrations.head()
    engine.dispose()


@pytest.mark.postgresql
def test_the_migration_keeps_its_lock_timeout_after_waiting(empty_pg: str) -> None:
    """Only the wait for the lock is unbounded; the migration's own DDL keeps its limit."""
    import multiprocessing

    engine = create_store_engine(empty_pg, poolclass=NullPool, lock_timeout=0.2)
    context = multiprocessing.get_context("spawn")
    held = context.Event()
    holder = context.Process(target=_hold_the_migration_lock, args=(empty_pg, held, 1.5))
    holder.start()
    assert held.wait(60)
    with migrations._migrating(engine) as conn:
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "200ms"
    holder.join(60)
    engine.dispose()


@pytest.mark.postgresql
@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_migration_waiting_at_a_stricter_isolation_level_sees_the_one_before(
    empty_pg: str, level: str
) -> None:
    """An engine of the host's at ``level``: the migration that waited for another finds the
    schema that one committed, not the snapshot its wait began in."""
    import threading
    import time

    engine = create_store_engine(empty_pg, poolclass=NullPool)
    strict = create_engine(
        empty_pg.replace("postgresql://", "postgresql+psycopg://"),
        poolclass=NullPool,
        isolation_level=level,
    )
    outcome: list[BaseException | None] = []

    def upgrade() -> None:
        try:
            hermes_orm.upgrade(strict)
            outcome.append(None)
        except BaseException as exc:  # the test reads it
            outcome.append(exc)

    with engine.connect() as holder, engine.connect() as watcher:
        _take_the_migration_lock(holder)
        waiter = threading.Thread(target=upgrade)
        waiter.start()
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        deadline = time.monotonic() + 30
        while not watcher.exec_driver_sql(waiting).scalar():
            assert time.monotonic() < deadline, "the second migration did not wait"
            time.sleep(0.02)
            watcher.rollback()
        hermes_orm.upgrade(holder)  # the first migration, in the lock's transaction
        holder.commit()
    waiter.join(60)
    assert outcome == [None]
    assert migrations.current(engine) == migrations.head()
    strict.dispose()
    engine.dispose()


@pytest.mark.postgresql
def test_a_migration_through_pgbouncer_keeps_the_stores_lock_timeout(
    pgbouncer_url: str, empty_pg: str
) -> None:
    """Behind PgBouncer the server connection has no lock_timeout of the store's: the
    migration's transaction sets it, as the store's writes do."""
    from tests.conftest import through_pgbouncer

    engine = create_store_engine(through_pgbouncer(pgbouncer_url, empty_pg), lock_timeout=0.2)
    with migrations._migrating(engine) as conn:
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "200ms"
    engine.dispose()


@pytest.mark.postgresql
def test_a_downgrade_the_database_refuses_is_a_database_error(empty_pg: str) -> None:
    """A host table's foreign key keeps hermes_sessions: nothing is dropped, and it says why."""
    from sqlalchemy import create_engine

    engine = create_engine(empty_pg.replace("postgresql://", "postgresql+psycopg://"))
    hermes_orm.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE chat_links (id int PRIMARY KEY, "
            "session_id varchar REFERENCES hermes_sessions (id))"
        )
    with pytest.raises(DatabaseError, match=r"(?s)cannot migrate to 'base'.*chat_links"):
        hermes_orm.downgrade(engine, "base")
    assert hermes_orm.migrations.current(engine) == hermes_orm.migrations.head()
    assert "hermes_sessions" in inspect(engine).get_table_names()
    engine.dispose()


def test_a_downgrade_to_base_without_a_revision_of_ours(empty_db_url: str) -> None:
    """Nothing of hermes_orm's: nothing done, no version table made. Tables named as its
    without a revision of its (``create_all``): refused, as an upgrade refuses them."""
    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    hermes_orm.downgrade(engine, "base")
    assert inspect(engine).get_table_names() == []
    hermes_orm.models.Base.metadata.create_all(engine)
    made = set(inspect(engine).get_table_names())
    with pytest.raises(DatabaseError, match=r"tables named as hermes_orm's.*no hermes_orm_alembic"):
        hermes_orm.downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) == made
    with engine.begin() as conn:  # (as a migration other SQL cut short leaves it)
        conn.exec_driver_sql("CREATE TABLE hermes_orm_alembic_version (version_num varchar(32))")
    with pytest.raises(DatabaseError, match=r"\(hermes_orm_alembic_version is empty\)"):
        hermes_orm.upgrade(engine)
    engine.dispose()


def test_differences_leave_out_a_host_s_models_on_hermes_orm_s_base(empty_db_url: str) -> None:
    """A host's models may subclass hermes_orm's Base: the tables they add are the host's."""
    from sqlalchemy import Column, ForeignKey, Integer, String, Table

    from hermes_orm.models import Base

    links = Table(
        "chat_links_of_the_host",
        Base.metadata,
        Column("id", Integer, primary_key=True),
        Column("session_id", String(255), ForeignKey("hermes_sessions.id")),
    )
    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    try:
        hermes_orm.upgrade(engine)
        assert migrations.differences(engine) == []  # its table not made yet: not ours
        links.create(engine)
        assert migrations.differences(engine) == []
    finally:
        Base.metadata.remove(links)
        engine.dispose()


@pytest.mark.postgresql
def test_alembic_s_own_command_finds_pg_trgm_off_the_path(empty_pg: str) -> None:
    """``alembic -x url=... upgrade head`` (the scripts' env.py), as upgrade() does."""
    from sqlalchemy import create_engine

    engine = create_engine(empty_pg.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA extensions")
        conn.exec_driver_sql("CREATE EXTENSION pg_trgm SCHEMA extensions")
    result = _alembic("-x", f"url={empty_pg}", "upgrade", "head")
    assert result.returncode == 0, result.stderr
    assert migrations.current(engine) == migrations.head()
    engine.dispose()


@pytest.mark.postgresql
def test_a_migration_whose_connection_was_lost_is_run_again_by_the_store(empty_pg: str) -> None:
    """Lost in the revisions: the driver's error, not "nothing was migrated", so the store
    tries again, as it says; the function, called alone, raises it for its caller to."""
    engine = create_store_engine(empty_pg, poolclass=NullPool)
    with pytest.raises(DBAPIError) as caught, backend_terminated(engine, "CREATE TABLE"):
        migrations.upgrade(engine)
    assert caught.value.connection_invalidated
    assert migrations.current(engine) is None
    store = SessionStore(empty_pg)
    with backend_terminated(store.engine, "CREATE TABLE"):
        store.upgrade()
    assert migrations.current(store.engine) == migrations.head()
    store.create_session("s1", "cli")
    store.close()


def test_each_revision_makes_the_model_tables_its_downgrade_is_said_to_drop(
    empty_db_url: str,
) -> None:
    """migrations.TABLES_MADE_BY, which the refusal below reads, is what the revisions do."""
    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    script = ScriptDirectory.from_config(migrations.alembic_config())
    made: dict[str, set[str]] = {}
    before: set[str] = set()
    for revision in reversed([rev.revision for rev in script.walk_revisions()]):
        migrations.upgrade(engine, revision)
        now = set(inspect(engine).get_table_names()) & migrations.MODEL_TABLES
        if now - before:
            made[revision] = now - before
        before = now
    assert made == {rev: set(tables) for rev, tables in migrations.TABLES_MADE_BY.items()}
    engine.dispose()


@pytest.mark.parametrize(
    ("action", "parent"),
    [("ON DELETE CASCADE", "hermes_sessions"), ("ON DELETE SET NULL", "HERMES_SESSIONS")],
)
def test_a_downgrade_dropping_a_table_a_host_table_refers_to_is_refused(
    empty_db_url: str, action: str, parent: str
) -> None:
    """PostgreSQL refuses the drop; SQLite would make it, deleting (or clearing) the host's
    rows first: refused there too, before anything is written, in a transaction of the
    caller's as well."""
    engine = create_store_engine(empty_db_url, poolclass=NullPool)
    migrations.upgrade(engine)
    with SessionStore(engine) as store:
        store.create_session("s", "cli")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE invoices (id INTEGER PRIMARY KEY, "
            f"session_id VARCHAR(255) REFERENCES {parent}(id) {action})"
        )
        conn.exec_driver_sql("INSERT INTO invoices (id, session_id) VALUES (1, 's')")
    with pytest.raises(DatabaseError, match="cannot migrate to 'base'") as caught:
        migrations.downgrade(engine, "base")
    assert "nothing was migrated" in str(caught.value)
    with engine.connect() as conn:
        conn.begin()  # the caller's: what it holds after the refusal is the caller's to commit
        with pytest.raises(DatabaseError, match="cannot migrate to 'base'"):
            migrations.downgrade(conn, "base")
        if engine.dialect.name == "sqlite":  # (PostgreSQL's is aborted by the refusal)
            conn.commit()
    assert migrations.current(engine) == migrations.head()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT session_id FROM invoices").all() == [("s",)]
    migrations.downgrade(engine, "0012_search_folds_like_fts5")  # drops none of those
    assert migrations.current(engine) == "0012_search_folds_like_fts5"


def test_a_store_running_while_its_schema_is_downgraded_says_what_to_do(
    store: hermes_orm.SessionStore, engine: Engine
) -> None:
    """It checked the schema on its first call: a statement refused for a column the
    downgrade took is told as the schema being out of date (nothing written), and once
    upgraded again the store goes on."""
    hi = {"role": "user", "content": "hi"}
    store.create_session("s", source="cli")
    store.flush("s", [hi])
    migrations.downgrade(engine, "0015_search_literal_nul_escape")
    for call in (
        lambda: store.flush("s", [hi, {"role": "user", "content": "on"}]),
        lambda: store.create_session("t", source="cli"),
        lambda: store.get_session("s"),
    ):
        with pytest.raises(SchemaOutOfDateError, match="hermes-orm db upgrade"):
            call()
    migrations.upgrade(engine)
    assert store.flush("s", [hi, {"role": "user", "content": "on"}]).written == 1
    assert [s["id"] for s in store.list_sessions().sessions] == ["s"]


def test_a_store_checking_its_schema_again_retries_a_transient_error(
    store: hermes_orm.SessionStore, engine: Engine, backend: str
) -> None:
    """The check a missing column sends the store to runs under the retry policy: a
    transient error on it is tried again, and the schema is still told out of date."""
    store.create_session("s", source="cli")
    migrations.downgrade(engine, "0015_search_literal_nul_escape")
    failed: list[str] = []

    def busy_once(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        if not failed and migrations.VERSION_TABLE in statement:
            failed.append(statement)
            raise transient(backend)

    with (
        listening(store.engine, "before_cursor_execute", busy_once),
        pytest.raises(SchemaOutOfDateError, match="hermes-orm db upgrade"),
    ):
        store.get_session("s")
    assert failed
    migrations.upgrade(engine)
    assert store.get_session("s") is not None


@pytest.mark.postgresql
@pytest.mark.direct("makes a database of its own")
def test_an_upgrade_ended_to_break_a_deadlock_with_a_writer_runs_again(
    empty_pg: str, caplog: pytest.LogCaptureFixture
) -> None:
    """0015 locks the messages, 0016 alters the sessions; a writer holding a session's row
    that then inserts a message deadlocks with it. PostgreSQL ends the migration (it waited
    first); it runs again once the writer is through, and migrates."""
    import threading

    engine = create_engine(empty_pg, poolclass=NullPool)
    migrations.upgrade(engine, "0012_search_folds_like_fts5")
    writer = engine.connect()
    writer.exec_driver_sql(
        "INSERT INTO hermes_sessions (id, source, started_at) VALUES ('s', 'cli', 0)"
    )
    writer.commit()
    writer.exec_driver_sql("SELECT 1 FROM hermes_sessions WHERE id = 's' FOR UPDATE")
    done: list[BaseException | None] = []

    def upgrade() -> None:
        try:
            migrations.upgrade(engine)
            done.append(None)
        except BaseException as exc:  # (the test looks at it)
            done.append(exc)

    caplog.set_level("WARNING", logger="hermes_orm")
    thread = threading.Thread(target=upgrade)
    thread.start()
    with engine.connect() as watcher:  # the migration waits for the row's lock
        for _ in range(500):
            waiting = watcher.exec_driver_sql(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation IS NOT NULL"
            ).scalar()
            if waiting:
                break
            time.sleep(0.01)
    assert waiting
    writer.exec_driver_sql(
        "INSERT INTO hermes_messages (session_id, idx, role, digest) "
        "VALUES ('s', 0, 'user', '\\x00')"
    )
    writer.commit()
    writer.close()
    thread.join(60)
    assert done == [None]
    assert "to break a deadlock" in caplog.text
    assert migrations.current(engine) == migrations.head()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM hermes_messages").scalar() == 1
    engine.dispose()


@pytest.mark.postgresql
@pytest.mark.direct("makes a database of its own")
@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_replica_read_refused_for_a_column_a_downgrade_took_goes_to_the_primary(
    empty_pg: str, api: str
) -> None:
    """The replica's schema was checked once: its read refused for a missing column is
    read on the primary, which says what to do."""
    migrations.upgrade(create_engine(empty_pg, poolclass=NullPool))
    if api == "sync":
        store: Any = hermes_orm.SessionStore(empty_pg, replica=empty_pg)
    else:
        url = make_url(empty_pg).set(drivername="postgresql+psycopg_async")
        check = create_engine(empty_pg, poolclass=NullPool)
        store = BlockingStore(hermes_orm.AsyncSessionStore(url, replica=url), check)
    store.create_session("s", source="cli")
    assert [s["id"] for s in store.list_sessions().sessions] == ["s"]  # (on the replica)
    engine = create_engine(empty_pg, poolclass=NullPool)
    migrations.downgrade(engine, "0015_search_literal_nul_escape")
    for _ in range(2):
        with pytest.raises(SchemaOutOfDateError, match="hermes-orm db upgrade"):
            store.list_sessions()
    migrations.upgrade(engine)
    assert [s["id"] for s in store.list_sessions().sessions] == ["s"]
    store.close()
    engine.dispose()


def test_a_store_that_checks_no_schema_is_not_made_to_by_a_missing_column(
    tmp_path: Path,
) -> None:
    """``check_schema=False``: a host's trigger naming a column that is not there gives the
    database's error, and the store's next call works, whatever revision is recorded."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = create_engine(url, poolclass=NullPool)
    migrations.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '9999_newer'")
        conn.exec_driver_sql("CREATE TABLE host_audit (id TEXT)")
        conn.exec_driver_sql(
            "CREATE TRIGGER host_audit_delete AFTER DELETE ON hermes_sessions "
            "BEGIN INSERT INTO host_audit (nope) VALUES (old.id); END"
        )
    with hermes_orm.SessionStore(url, check_schema=False) as store:
        store.create_session("s", source="cli")
        with pytest.raises(DatabaseError, match="no column named nope"):
            store.delete_session("s")
        store.create_session("t", source="cli")
        assert store.get_session("s") is not None
    engine.dispose()


@pytest.mark.postgresql
@pytest.mark.direct("makes a database of its own")
def test_a_replica_whose_table_differs_from_its_revision_is_a_miss_said_once(
    empty_pg: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Its schema passes the check, its read fails on a missing column: the primary reads,
    the replica is skipped for a while with a WARNING, the primary's schema is not doubted."""
    engine = create_engine(empty_pg, poolclass=NullPool)
    migrations.upgrade(engine)
    migrations.upgrade(engine, schema="standby")
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE standby.hermes_sessions DROP COLUMN history_id")
    replica = create_engine(empty_pg, connect_args={"options": "-csearch_path=standby,public"})
    caplog.set_level("WARNING", logger="hermes_orm")
    with hermes_orm.SessionStore(empty_pg, replica=replica) as store:
        store.create_session("s", source="cli")
        for _ in range(3):
            assert [s["id"] for s in store.list_sessions().sessions] == ["s"]
        warned = [r for r in caplog.records if "replica" in r.getMessage()]
        assert len(warned) == 1, [r.getMessage() for r in caplog.records]
        assert "history_id" in warned[0].getMessage()
    replica.dispose()
    engine.dispose()
