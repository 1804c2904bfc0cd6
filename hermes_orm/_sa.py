"""The private SQLAlchemy attributes hermes_orm relies on, all of them, in one place.

The flush runs its statements straight on the driver's cursor when nothing
watches the connection (see :func:`hermes_orm._dialects.execute_driver_script`);
for that it must know whether anything watches, and raise a driver error the
way SQLAlchemy itself does. Both need attributes SQLAlchemy keeps private.
They are read here only; pyproject bounds SQLAlchemy below its next minor
release, and CI runs the store's tests against the newest release too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

from sqlalchemy import Connection


def observed(conn: Connection) -> bool:
    """Whether anything watches ``conn``'s statements: event listeners or SQL logging.

    SQLAlchemy keeps these flags on the connection, its engine and its dialect
    and checks them before every statement it runs; they are read the same way.
    """
    return bool(
        conn._has_events or conn.engine._has_events or conn.dialect._has_events or conn._echo
    )


def raise_driver_error(
    conn: Connection,
    exc: BaseException,
    statement: str | None = None,
    params: Sequence[Any] | None = None,
    cursor: Any = None,
) -> NoReturn:
    """Raise the driver error ``exc`` as SQLAlchemy would have, had it run the statement.

    Its ``DBAPIError`` subclass, the connection invalidated on a disconnect,
    ``handle_error`` listeners called.
    """
    conn._handle_dbapi_exception(exc, statement, params, cursor, None)
    raise AssertionError("SQLAlchemy did not raise")  # pragma: no cover
