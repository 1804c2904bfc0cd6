"""``hermes_messages`` hash-partitioned by ``session_id`` (PostgreSQL).

Every hot query names its session (the flush's insert and cursor, reading a
history, the unique ``(session_id, idx)`` index), so each touches one
partition and its indexes stay a fraction of the table's. The conversion
rebuilds the table in one transaction, under the migration lock:

- the table's definitions are read first: its indexes, triggers and
  constraints, as PostgreSQL prints them (whatever revisions made them);
- the table is renamed aside and those objects are dropped from it, which
  frees their names;
- a table of the same columns and defaults is created ``PARTITION BY HASH
  (session_id)`` with its partitions; its primary key becomes ``(id,
  session_id)``, as a partitioned table's must include the partition key (ids
  still come from the one sequence, so they stay unique);
- the rows are copied with their search columns as they are, then the
  indexes and triggers are created again from the definitions read, and the
  old table is dropped.

The table is locked for the copy: readers and writers of messages wait.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Connection

from hermes_orm import _dialects
from hermes_orm.errors import DatabaseError, InvalidArgumentError, SchemaOutOfDateError

#: The most partitions a store's messages may be split into.
MAX_PARTITIONS = 1024


def partition_name(remainder: int) -> str:
    """The partition of that hash remainder: ``hermes_messages_part_007``, ..., ``_1023``."""
    return f"hermes_messages_part_{remainder:03d}"


#: Every name a partition may have.
PARTITION_NAMES = frozenset(partition_name(n) for n in range(MAX_PARTITIONS))
#: Where the plain table waits while its partitioned successor is built.
ASIDE = "hermes_messages_unpartitioned"


def check_partitions(partitions: Any, dialect: str) -> int:
    """``partitions``, checked before anything connects.

    Raises:
        InvalidArgumentError: Not an int from 2 to 1024, or not on PostgreSQL.
    """
    if (
        isinstance(partitions, bool)
        or not isinstance(partitions, int)
        or not 2 <= partitions <= MAX_PARTITIONS
    ):
        raise InvalidArgumentError(
            f"partitions must be an int from 2 to {MAX_PARTITIONS}, got {partitions!r}"
        )
    if dialect != "postgresql":
        raise InvalidArgumentError(
            f"partitions={partitions}: only PostgreSQL partitions tables (this is {dialect})"
        )
    return partitions


def partition_count(conn: Connection, schema: str | None = None) -> int | None:
    """How many partitions ``hermes_messages`` has (None: it is a plain table).

    The table is the one ``conn``'s ``search_path`` finds; with ``schema``, it
    must be in that schema: a schema not migrated yet would otherwise find
    another schema's table further down the path.

    Raises:
        SchemaOutOfDateError: There is no ``hermes_messages`` (in ``schema``): migrate first.
    """
    row = conn.exec_driver_sql(
        "SELECT c.relkind::text, (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid), "
        "n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass('hermes_messages')"
    ).first()
    if row is None or (schema is not None and row[2] != schema):
        raise SchemaOutOfDateError(None, "0001_baseline")
    return int(row[1]) if row[0] == "p" else None


def _refuse_what_a_rebuild_drops(conn: Connection) -> None:
    """Refuse a ``hermes_messages`` with settings of the host a rebuild would drop unsaid.

    Row-level security and its policies, membership in a publication, rules
    and a replica identity other than the default belong to the table itself:
    a new table has none of them. Identity and generated columns cannot be
    copied into as the rebuild copies the rows.

    Raises:
        DatabaseError: The table has any of them (nothing was changed).
    """
    secured, policies, publications, rules, identity, made = conn.exec_driver_sql(
        "SELECT c.relrowsecurity OR c.relforcerowsecurity, "
        "(SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid), "
        "(SELECT string_agg(p.pubname, ', ' ORDER BY p.pubname) FROM pg_publication_rel r "
        "JOIN pg_publication p ON p.oid = r.prpubid WHERE r.prrelid = c.oid), "
        "(SELECT string_agg(r.rulename, ', ' ORDER BY r.rulename) FROM pg_rewrite r "
        "WHERE r.ev_class = c.oid), "
        "c.relreplident <> 'd', "
        "(SELECT string_agg(a.attname, ', ' ORDER BY a.attnum) FROM pg_attribute a "
        "WHERE a.attrelid = c.oid AND NOT a.attisdropped "
        "AND (a.attidentity <> '' OR a.attgenerated <> '')) "
        "FROM pg_class c WHERE c.oid = to_regclass('hermes_messages')"
    ).one()
    held = [
        *(["row-level security"] if secured else []),
        *([f"{policies} row-level security policies"] if policies else []),
        *([f"membership in the publications {publications}"] if publications else []),
        *([f"the rules {rules}"] if rules else []),
        *(["a replica identity other than the default"] if identity else []),
        *([f"identity or generated columns ({made})"] if made else []),
    ]
    if held:
        raise DatabaseError(
            f"hermes_messages has {' and '.join(held)}, which belong to the table itself: "
            "partitioning rebuilds it, and the new table would have none. Take them off, "
            "partition, then set them again on hermes_messages; nothing was changed"
        )


#: ``pg_trigger.tgenabled`` other than enabled (``O``), as ALTER TABLE sets it again.
_TRIGGER_STATES = {"D": "DISABLE", "R": "ENABLE REPLICA", "A": "ENABLE ALWAYS"}


def _quoted(name: str) -> str:
    """``name`` as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    """``value`` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def partition(conn: Connection, partitions: int, schema: str | None = None) -> bool:
    """Rebuild ``hermes_messages`` as ``partitions`` hash partitions, in ``conn``'s transaction.

    ``schema``: the schema the table must be in (first on ``conn``'s ``search_path``).

    Returns:
        False when it already had that many (nothing done), True otherwise.

    Raises:
        InvalidArgumentError: It is partitioned already, into another number.
        DatabaseError: It has row-level security, policies or publications (see
            :func:`_refuse_what_a_rebuild_drops`).
    """
    current = partition_count(conn, schema)
    if current == partitions:
        return False
    if current is not None:
        raise InvalidArgumentError(
            f"hermes_messages is already split into {current} partitions, not {partitions}: "
            "a partitioned table is not split again"
        )
    sql = functools.partial(_dialects.run_as_written, conn)  # (the catalog's text may hold %)
    table = "to_regclass('hermes_messages')"
    _refuse_what_a_rebuild_drops(conn)
    comment = sql(f"SELECT obj_description({table}, 'pg_class')").scalar()
    indexes = sql(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        f"JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = {table} "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid) "
        "ORDER BY c.relname"
    ).all()
    triggers = sql(
        "SELECT tgname, pg_get_triggerdef(oid), tgenabled::text FROM pg_trigger "
        f"WHERE tgrelid = {table} AND NOT tgisinternal ORDER BY tgname"
    ).all()
    owner, options = sql(
        "SELECT CASE WHEN pg_get_userbyid(relowner) <> current_user "
        f"THEN pg_get_userbyid(relowner) END, reloptions FROM pg_class WHERE oid = {table}"
    ).one()
    targets = sql(
        "SELECT attname, attstattarget FROM pg_attribute "
        f"WHERE attrelid = {table} AND attnum > 0 AND NOT attisdropped AND attstattarget >= 0"
    ).all()
    statistics = (
        sql(f"SELECT pg_get_statisticsobjdef(oid) FROM pg_statistic_ext WHERE stxrelid = {table}")
        .scalars()
        .all()
    )
    constraints = sql(
        "SELECT conname, contype::text, pg_get_constraintdef(oid) FROM pg_constraint "
        f"WHERE conrelid = {table} ORDER BY contype <> 'p', conname"
    ).all()
    primary = [c for c in constraints if c.contype == "p"]
    if len(primary) != 1:
        raise DatabaseError("hermes_messages has no primary key: it is not a table hermes_orm made")
    sql(f"ALTER TABLE hermes_messages RENAME TO {ASIDE}")
    for name, _ in indexes:
        sql(f"DROP INDEX {_quoted(name)}")
    for name, *_ in triggers:
        sql(f"DROP TRIGGER {_quoted(name)} ON {ASIDE}")
    for name, *_ in reversed(constraints):  # foreign keys and checks, then the keys
        sql(f"ALTER TABLE {ASIDE} DROP CONSTRAINT {_quoted(name)}")
    sql(
        f"CREATE TABLE hermes_messages (LIKE {ASIDE} INCLUDING DEFAULTS INCLUDING STORAGE "
        "INCLUDING COMMENTS) PARTITION BY HASH (session_id)"
    )
    # The new tables are the old one's owner's (the ids' sequence, which must be the
    # table's owner's, is theirs); the old one's storage settings go to each partition.
    parts = [partition_name(remainder) for remainder in range(partitions)]
    if owner is not None:
        sql(f"ALTER TABLE hermes_messages OWNER TO {_quoted(owner)}")
    # The ids' sequence goes with the new table (dropping the old one would take it).
    sequence = sql(f"SELECT pg_get_serial_sequence('{ASIDE}', 'id')").scalar()
    if sequence is not None:
        sql(f"ALTER SEQUENCE {sequence} OWNED BY hermes_messages.id")
    for remainder, part in enumerate(parts):
        sql(
            f"CREATE TABLE {part} PARTITION OF hermes_messages "
            f"FOR VALUES WITH (MODULUS {partitions}, REMAINDER {remainder})"
        )
        if owner is not None:
            sql(f"ALTER TABLE {part} OWNER TO {_quoted(owner)}")
        if options:
            settings = ", ".join(
                f"{name} = {_literal(value)}"
                for name, _, value in (option.partition("=") for option in options)
            )
            sql(f"ALTER TABLE {part} SET ({settings})")
    for column, target in targets:
        sql(f"ALTER TABLE hermes_messages ALTER COLUMN {_quoted(column)} SET STATISTICS {target}")
    key = primary[0].conname
    sql(f"ALTER TABLE hermes_messages ADD CONSTRAINT {_quoted(key)} PRIMARY KEY (id, session_id)")
    for name, kind, definition in constraints:
        if kind != "p":
            sql(f"ALTER TABLE hermes_messages ADD CONSTRAINT {_quoted(name)} {definition}")
    if comment is not None:  # (LIKE copies the columns' comments, not the table's)
        sql(f"COMMENT ON TABLE hermes_messages IS {_literal(str(comment))}")
    sql(f"INSERT INTO hermes_messages SELECT * FROM {ASIDE}")  # before the triggers: as stored
    for _, definition, *_ in (*indexes, *triggers):
        sql(definition)  # they name hermes_messages, as they did when read
    for name, _, enabled in triggers:  # (made enabled, whatever the old one's state)
        if enabled in _TRIGGER_STATES:
            sql(f"ALTER TABLE hermes_messages {_TRIGGER_STATES[enabled]} TRIGGER {_quoted(name)}")
    sql(f"DROP TABLE {ASIDE}")
    for definition in statistics:  # (named as the old table's were: made once it is gone)
        sql(definition)
    sql("ANALYZE hermes_messages")
    return True
