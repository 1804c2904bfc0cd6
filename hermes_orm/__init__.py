"""hermes_orm: exactly-once persistence of LLM-agent sessions on SQLAlchemy 2.x.

The session row holds the flush cursor (``flushed_idx``), advanced in the same
transaction as the message inserts: whatever fails, the database holds a
prefix of the conversation and the cursor is its length.
"""

from typing import TYPE_CHECKING

from hermes_orm._dialects import create_async_store_engine, create_store_engine
from hermes_orm._retry import RetryPolicy
from hermes_orm._unit_of_work import install_position_rule, remove_position_rule
from hermes_orm.errors import (
    DatabaseBusyError,
    DatabaseError,
    DatabaseUnavailableError,
    HermesOrmError,
    HistoryDivergedError,
    InvalidArgumentError,
    InvalidMessageError,
    InvalidSessionError,
    InvalidURLError,
    SchemaManagedByHostError,
    SchemaOutOfDateError,
    SchemaTooNewError,
    SearchQueryError,
    SessionExistsError,
    SessionNotFoundError,
    UnsupportedBackendError,
)
from hermes_orm.migrations import check as check_schema
from hermes_orm.migrations import downgrade, upgrade
from hermes_orm.models import Base, Message, Meta, ModelUsage, Session
from hermes_orm.search import SearchHit, SearchPage
from hermes_orm.store import FlushResult, SessionPage, SessionStore, UserStore

if TYPE_CHECKING:
    from hermes_orm.async_store import AsyncSessionStore, AsyncUserStore


def __getattr__(name: str) -> object:
    # The asyncio store needs SQLAlchemy's asyncio extension (greenlet), an
    # optional dependency: imported when first asked for.
    if name in ("AsyncSessionStore", "AsyncUserStore"):
        from hermes_orm import async_store

        return getattr(async_store, name)
    raise AttributeError(f"module 'hermes_orm' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "AsyncSessionStore",
    "AsyncUserStore",
    "Base",
    "DatabaseBusyError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "FlushResult",
    "HermesOrmError",
    "HistoryDivergedError",
    "InvalidArgumentError",
    "InvalidMessageError",
    "InvalidSessionError",
    "InvalidURLError",
    "Message",
    "Meta",
    "ModelUsage",
    "RetryPolicy",
    "SchemaManagedByHostError",
    "SchemaOutOfDateError",
    "SchemaTooNewError",
    "SearchHit",
    "SearchPage",
    "SearchQueryError",
    "Session",
    "SessionExistsError",
    "SessionNotFoundError",
    "SessionPage",
    "SessionStore",
    "UnsupportedBackendError",
    "UserStore",
    "check_schema",
    "create_async_store_engine",
    "create_store_engine",
    "downgrade",
    "install_position_rule",
    "remove_position_rule",
    "upgrade",
]
