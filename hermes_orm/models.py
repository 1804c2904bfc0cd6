"""The schema: declarative models for sessions and their messages.

Tables are prefixed with ``hermes_`` so they can live in a host application's
database beside its own tables. Alembic migrations (``alembic/``) own
the schema; these models are the definition the migrations are checked against.

Times are Unix epoch seconds as ``float`` (UTC by definition, so no naive or
aware datetime can be confused with another), the representation Hermes Agent
uses too.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, WriteOnlyMapped, mapped_column, relationship

NAMING_CONVENTION = {
    # The table's name, not its schema-qualified label: the same index names
    # wherever the tables are placed (hermes_orm.upgrade(bind, schema=...)).
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: A 64-bit integer primary key that SQLite still numbers itself: BIGINT, but
#: INTEGER on SQLite, where only an ``INTEGER PRIMARY KEY`` is the rowid. On
#: :class:`Base` an ``int`` column is BIGINT: a host model's integer key takes
#: this type (``mapped_column(BigId, primary_key=True)``), as messages' ids do.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class _SQLiteJSONText(sqlite.JSON):
    """JSON stored in a TEXT column on SQLite.

    A column declared ``JSON`` has NUMERIC affinity there, which turns the
    document ``0.0`` into the integer ``0``; TEXT affinity keeps it as written.
    """

    cache_ok = True


@compiles(_SQLiteJSONText, "sqlite")
def _compile_sqlite_json_text(_type: Any, _compiler: Any, **_kw: Any) -> str:
    return "TEXT"


#: JSON documents kept as written (``json``, not ``jsonb``, on PostgreSQL; TEXT on
#: SQLite): numbers and strings read back exactly as flushed, and nothing
#: queries inside them on a hot path.
JSON_DOCUMENT = JSON(none_as_null=True).with_variant(_SQLiteJSONText(none_as_null=True), "sqlite")


class Flag(TypeDecorator[bool]):
    """A boolean column that reads only booleans back.

    SQLite stores them as 0 and 1, and SQLAlchemy's ``Boolean`` reads any other
    value (``'false'`` written by other SQL) as ``bool(value)``: True. This type
    reads such a value as the damage it is, a :class:`~hermes_orm.errors.DatabaseError`
    naming the column, as the store's own reads of messages do. (PostgreSQL's
    ``boolean`` holds nothing else.)
    """

    impl = Boolean
    cache_ok = True
    #: ``flag.is_(True)`` renders ``IS true``, as on a ``Boolean`` (not a bound value).
    coerce_to_is_types = (type(None), bool)

    def __init__(self, column: str) -> None:
        super().__init__()
        self.column = column

    def __repr__(self) -> str:
        return f"Flag({self.column!r})"  # (as a migration would write it)

    @property
    def python_type(self) -> type[bool]:
        """``bool`` (SQLAlchemy before 2.1 has no default for a TypeDecorator)."""
        return bool

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        """The driver's booleans as they are; SQLite's 0 and 1, and nothing else."""
        if dialect.supports_native_boolean:
            return super().result_processor(dialect, coltype)
        from hermes_orm._codec import Flags
        from hermes_orm.errors import DatabaseError

        flags = Flags(self.column)

        def read(value: Any) -> bool | None:
            if value is None:
                return None
            try:
                return flags[value]
            except ValueError as exc:
                raise DatabaseError(
                    f"{exc}: other SQL wrote it (hermes_orm writes 0 and 1)"
                ) from None

        return read


def new_history_id() -> int:
    """A new :attr:`Session.history_id`: random, from 1 to 2**63 - 1 (0 is a pre-0016 row's)."""
    return 1 + secrets.randbelow(2**63 - 1)


class Base(DeclarativeBase):
    """Declarative base of every hermes_orm model; one MetaData with stable names."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads it as a class attribute
        float: Double(),
        int: BigInteger(),
        str: Text(),
        bytes: LargeBinary(),
    }


class Session(Base):
    """An agent session: one conversation and its flush cursor.

    ``flushed_idx`` is the number of messages stored for the session and the
    ``idx`` the next one gets; ``flushed_digest`` is the digest of the message
    at ``flushed_idx - 1``. Both advance in the same transaction as the message
    inserts, which is what makes a flush exactly-once.

    ``history_id`` names the stored history: drawn at random when the session
    is made, and again whenever hermes_orm changes its stored messages other
    than by appending (a rewrite, an edit, a clear). The cursor's
    compare-and-swap checks it with the digest, so a store's remembered cursor
    stands only on the history it was read on: a session deleted and made anew
    under the same id, or rewritten, with as many messages and the same last
    one, is not taken for the one the store knew. Rows written before revision
    0016, or by SQL that does not set it, hold 0.
    """

    __tablename__ = "hermes_sessions"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    flushed_idx: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    flushed_digest: Mapped[bytes | None]
    message_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    tool_call_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    history_id: Mapped[int] = mapped_column(default=new_history_id, server_default=text("0"))

    # Everything Hermes Agent keeps on its sessions row (state.db schema v22).
    source: Mapped[str]
    user_id: Mapped[str | None]
    session_key: Mapped[str | None]
    chat_id: Mapped[str | None]
    chat_type: Mapped[str | None]
    thread_id: Mapped[str | None]
    display_name: Mapped[str | None]
    origin_json: Mapped[str | None]
    expiry_finalized: Mapped[bool] = mapped_column(
        Flag("expiry_finalized"), default=False, server_default=text("false")
    )
    model: Mapped[str | None]
    model_config: Mapped[Any] = mapped_column(JSON_DOCUMENT, nullable=True)
    system_prompt: Mapped[str | None]
    parent_session_id: Mapped[str | None] = mapped_column(
        String(255), ForeignKey("hermes_sessions.id", ondelete="SET NULL"), index=True
    )
    #: Made through the ORM without one: the time of its INSERT, as the store's.
    started_at: Mapped[float] = mapped_column(default=time.time)
    ended_at: Mapped[float | None]
    end_reason: Mapped[str | None]
    input_tokens: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    output_tokens: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    cache_read_tokens: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    cache_write_tokens: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    reasoning_tokens: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    cwd: Mapped[str | None]
    git_branch: Mapped[str | None]
    git_repo_root: Mapped[str | None]
    billing_provider: Mapped[str | None]
    billing_base_url: Mapped[str | None]
    billing_mode: Mapped[str | None]
    estimated_cost_usd: Mapped[float | None]
    actual_cost_usd: Mapped[float | None]
    cost_status: Mapped[str | None]
    cost_source: Mapped[str | None]
    pricing_version: Mapped[str | None]
    title: Mapped[str | None]
    api_call_count: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    handoff_state: Mapped[str | None]
    handoff_platform: Mapped[str | None]
    handoff_error: Mapped[str | None]
    compression_failure_cooldown_until: Mapped[float | None]
    compression_failure_error: Mapped[str | None]
    compression_fallback_streak: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    profile_name: Mapped[str | None]
    rewind_count: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    archived: Mapped[bool] = mapped_column(
        Flag("archived"), default=False, server_default=text("false")
    )
    extra: Mapped[Any] = mapped_column(JSON_DOCUMENT, nullable=True)

    messages: WriteOnlyMapped[Message] = relationship(
        back_populates="session",
        order_by="Message.idx",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    __table_args__ = (
        Index("ix_hermes_sessions_started_at_id", "started_at", "id"),
        Index("ix_hermes_sessions_source_started_at", "source", "started_at"),
        Index("ix_hermes_sessions_user_id_started_at", "user_id", "started_at"),
        Index(
            "ix_hermes_sessions_title_unique",
            "title",
            unique=True,
            sqlite_where=text("title IS NOT NULL"),
            postgresql_where=text("title IS NOT NULL"),
        ),
    )

    def __repr__(self) -> str:
        return f"<Session {self.id!r} flushed_idx={self.flushed_idx}>"


class Message(Base):
    """One message of a session at position ``idx`` (0-based, dense, unique).

    A message dict maps onto columns by key (see ``hermes_orm._codec``): text
    ``content`` goes to ``content``, a list of parts to ``content_parts``, and
    keys without a column (or given as ``None``, or text with NUL) to ``extra``, so the dict
    reads back equal to the one flushed. Keyword construction
    (``Message(role="user", content="hi")``) cannot tell a key set to ``None``
    from a missing one; :meth:`from_dict` keeps a dict's exact shape.
    """

    __tablename__ = "hermes_messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("hermes_sessions.id", ondelete="CASCADE")
    )
    idx: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(32))
    content: Mapped[str | None]
    content_parts: Mapped[Any] = mapped_column(JSON_DOCUMENT, nullable=True)
    tool_calls: Mapped[Any] = mapped_column(JSON_DOCUMENT, nullable=True)
    tool_call_id: Mapped[str | None]
    tool_name: Mapped[str | None]
    reasoning: Mapped[str | None]
    reasoning_content: Mapped[str | None]
    reasoning_details: Mapped[Any] = mapped_column(JSON_DOCUMENT, nullable=True)
    codex_reasoning_items: Mapped[Any] = mapped_column(JSON_DOCUMENT, nullable=True)
    codex_message_items: Mapped[Any] = mapped_column(JSON_DOCUMENT, nullable=True)
    finish_reason: Mapped[str | None]
    token_count: Mapped[int | None]
    timestamp: Mapped[float | None]
    effect_disposition: Mapped[str | None]
    platform_message_id: Mapped[str | None]
    observed: Mapped[bool | None] = mapped_column(Flag("observed"))
    active: Mapped[bool | None] = mapped_column(Flag("active"))
    compacted: Mapped[bool | None] = mapped_column(Flag("compacted"))
    api_content: Mapped[str | None]
    digest: Mapped[bytes]
    extra: Mapped[Any] = mapped_column(JSON_DOCUMENT, nullable=True)
    #: The message's keys in the order it had them, where that differs from the
    #: order it reads back in otherwise (see ``hermes_orm._codec``).
    key_order: Mapped[Any] = mapped_column(JSON_DOCUMENT, nullable=True)

    session: Mapped[Session] = relationship(back_populates="messages")

    # AUTOINCREMENT on SQLite: ids are never reused, as on PostgreSQL.
    __table_args__ = (UniqueConstraint("session_id", "idx"), {"sqlite_autoincrement": True})

    def to_dict(self) -> dict[str, Any]:
        """Return the message dict this row stores."""
        from hermes_orm._codec import row_to_message

        return row_to_message(self)

    @classmethod
    def from_dict(cls, message: dict[str, Any]) -> Message:
        """Build an unsaved row from a message dict (validated when flushed)."""
        from hermes_orm._codec import encode_message

        return cls(**encode_message(message).row)

    def __repr__(self) -> str:
        return f"<Message {self.session_id!r}[{self.idx}] {self.role}>"


class ModelUsage(Base):
    """Tokens and cost of one session per model and billing route (Hermes' per-model usage)."""

    __tablename__ = "hermes_session_model_usage"

    session_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("hermes_sessions.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(Text, primary_key=True)
    billing_provider: Mapped[str] = mapped_column(Text, primary_key=True, server_default="")
    billing_base_url: Mapped[str] = mapped_column(Text, primary_key=True, server_default="")
    billing_mode: Mapped[str] = mapped_column(Text, primary_key=True, server_default="")
    task: Mapped[str] = mapped_column(Text, primary_key=True, server_default="")
    api_call_count: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    input_tokens: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    output_tokens: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    cache_read_tokens: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    cache_write_tokens: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    reasoning_tokens: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    estimated_cost_usd: Mapped[float] = mapped_column(default=0.0, server_default=text("0"))
    actual_cost_usd: Mapped[float] = mapped_column(default=0.0, server_default=text("0"))
    cost_status: Mapped[str | None]
    cost_source: Mapped[str | None]
    first_seen: Mapped[float | None]
    last_seen: Mapped[float | None]


#: The columns that identify a per-model usage row (its primary key), in order.
MODEL_USAGE_KEY: tuple[str, ...] = tuple(c.name for c in ModelUsage.__table__.primary_key)


class Meta(Base):
    """Key/value settings of the store (Hermes' ``state_meta``)."""

    __tablename__ = "hermes_meta"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str | None]


class Imported(Base):
    """What imports of a Hermes ``state.db`` have seen, kept when it is deleted here.

    ``kind`` 'session' and ``key`` a session id: an import copied the session,
    or found it stored. ``kind`` one of Hermes' other tables (``state_meta``,
    ``gateway_routing``, ...) and ``key`` the SHA-256 (hex) of the JSON list of
    a row's key: the same, of that row, whose ``updated_at`` was ``version``. A later import
    leaves what was deleted since deleted (see
    :func:`hermes_orm.integrations.hermes.import_state_db`).
    """

    __tablename__ = "hermes_imported"

    kind: Mapped[str] = mapped_column(String(40), primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    seen_at: Mapped[float]
    version: Mapped[float | None]


class GatewayRoute(Base):
    """A Hermes gateway's routing entry for one session key (Hermes' ``gateway_routing``)."""

    __tablename__ = "hermes_gateway_routing"

    #: A gateway's sessions directory, or "" (paths of any length: text).
    scope: Mapped[str] = mapped_column(Text, primary_key=True, server_default="")
    session_key: Mapped[str] = mapped_column(Text, primary_key=True)
    entry_json: Mapped[str]
    updated_at: Mapped[float]


class CompressionLock(Base):
    """Who compresses a session's context, until when (Hermes' ``compression_locks``)."""

    __tablename__ = "hermes_compression_locks"

    session_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    holder: Mapped[str]
    acquired_at: Mapped[float]
    expires_at: Mapped[float]


class TelegramTopicMode(Base):
    """A Telegram private chat run in topic mode (Hermes' ``telegram_dm_topic_mode``).

    Flags are integers 0/1 (or NULL: not yet known), as Hermes keeps them.
    """

    __tablename__ = "hermes_telegram_topic_mode"

    chat_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_id: Mapped[str]
    enabled: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    activated_at: Mapped[float]
    updated_at: Mapped[float]
    has_topics_enabled: Mapped[int | None] = mapped_column(Integer)
    allows_users_to_create_topics: Mapped[int | None] = mapped_column(Integer)
    capability_checked_at: Mapped[float | None]
    intro_message_id: Mapped[str | None]
    pinned_message_id: Mapped[str | None]


class TelegramTopicBinding(Base):
    """A Telegram topic bound to a session (Hermes' ``telegram_dm_topic_bindings``)."""

    __tablename__ = "hermes_telegram_topic_bindings"

    chat_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    thread_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_id: Mapped[str]
    session_key: Mapped[str]
    session_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("hermes_sessions.id", ondelete="CASCADE")
    )
    managed_mode: Mapped[str] = mapped_column(server_default="auto")
    linked_at: Mapped[float]
    updated_at: Mapped[float]

    __table_args__ = (
        Index("ix_hermes_telegram_topic_bindings_session_id", "session_id", unique=True),
        Index("ix_hermes_telegram_topic_bindings_user_id_chat_id", "user_id", "chat_id"),
    )
