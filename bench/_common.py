"""Helpers every benchmark of ``bench`` shares."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from sqlalchemy.engine import make_url

_K = TypeVar("_K")


def rotations(names: list[_K], rounds: int) -> Iterator[list[_K]]:
    """The order of each round: every name once, the first one moving on a place each round."""
    for round_ in range(rounds):
        first = round_ % len(names)
        yield names[first:] + names[:first]


def libpq(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as libpq (psycopg.connect) takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
