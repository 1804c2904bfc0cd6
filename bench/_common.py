"""Helpers every benchmark of ``bench`` shares."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

from sqlalchemy.engine import make_url

_K = TypeVar("_K")

#: PostgreSQL as installed: each library at its default durability, the server's too.
DEFAULT_DURABILITY = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "200",
}


def rotations(names: list[_K], rounds: int) -> Iterator[list[_K]]:
    """The order of each round: every name once, the first one moving on a place each round."""
    for round_ in range(rounds):
        first = round_ % len(names)
        yield names[first:] + names[:first]


def libpq(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as libpq (psycopg.connect) takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def hermes_append(db: Any, session_id: str, message: dict[str, Any]) -> None:
    """Store ``message`` with Hermes' ``SessionDB.append_message``, as Hermes does a turn's."""
    db.append_message(
        session_id,
        message["role"],
        content=message.get("content"),
        tool_name=message.get("tool_name"),
        tool_calls=message.get("tool_calls"),
        tool_call_id=message.get("tool_call_id"),
        finish_reason=message.get("finish_reason"),
        reasoning=message.get("reasoning"),
        timestamp=message.get("timestamp"),
    )
