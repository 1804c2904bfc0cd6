"""Typed exceptions raised by hermes_orm.

Every error the library raises on purpose derives from :class:`HermesOrmError`,
so callers can catch the whole family with one ``except`` clause. Each message
says what happened and what to do about it.
"""

from __future__ import annotations


class HermesOrmError(Exception):
    """Base class of every error hermes_orm raises."""


class SessionNotFoundError(HermesOrmError, LookupError):
    """The session id names no stored session."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(
            f"no session {session_id!r}: create it first with "
            "SessionStore.create_session() or ensure_session()"
        )


class SessionExistsError(HermesOrmError):
    """``create_session`` was given an id that is already stored.

    Session ids are unique in the database: a user-scoped store that asks for
    an id another user's session holds gets this error (and learns no more).
    """

    def __init__(self, session_id: str, *, another_user: bool = False) -> None:
        self.session_id = session_id
        super().__init__(
            f"session id {session_id!r} is taken by another user's session"
            if another_user
            else f"session {session_id!r} already exists; use ensure_session() to "
            "create it only when missing"
        )


class UnsupportedBackendError(HermesOrmError, ValueError):
    """The database is neither SQLite nor PostgreSQL."""

    def __init__(self, dialect: str, detail: str | None = None) -> None:
        self.dialect = dialect
        super().__init__(
            detail
            or f"hermes_orm runs on SQLite and PostgreSQL, not {dialect}: use a sqlite:/// "
            "or postgresql:// URL"
        )


class InvalidURLError(HermesOrmError, ValueError):
    """A database URL that cannot be parsed or used (its password is never shown)."""


class InvalidArgumentError(HermesOrmError, ValueError):
    """An argument a call does not take (an offset, a limit, a cursor, a mode, a setting).

    The errors for what a call stores or looks for derive from it:
    :class:`InvalidSessionError`, :class:`InvalidMessageError`,
    :class:`SearchQueryError`.
    """


class InvalidSessionError(InvalidArgumentError):
    """Session fields that cannot be stored (unknown name, wrong type)."""


class InvalidMessageError(InvalidArgumentError):
    """A message that cannot be stored; raised before anything is written.

    Attributes:
        index: Position of the offending message in the list given to ``flush``
            (``None`` for a single message).
        key: The offending key of the message dict, when one is to blame.
    """

    def __init__(self, reason: str, *, index: int | None = None, key: str | None = None) -> None:
        self.reason = reason
        self.index = index
        self.key = key
        where = []
        if index is not None:
            where.append(f"message {index}")
        if key is not None:
            where.append(f"key {key!r}")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(f"{prefix}{reason}; nothing was written")


class HistoryDivergedError(HermesOrmError):
    """The messages given no longer continue the stored history.

    The stored session holds ``stored`` messages; the caller's list of
    ``given`` messages differs from them at position ``index``. This happens when a
    conversation was rewritten (compaction, edits) after it was flushed. Nothing
    was written: start a new session for the rewritten conversation, or clear
    the stored one deliberately.
    """

    def __init__(self, session_id: str, *, stored: int, given: int, index: int) -> None:
        self.session_id = session_id
        self.stored = stored
        self.given = given
        self.index = index
        super().__init__(
            f"history of session {session_id!r} diverged: message {index} of the "
            f"{given} given differs from the stored one ({stored} stored); nothing was "
            "written (a rewritten conversation belongs in a new session)"
        )


class DatabaseBusyError(HermesOrmError):
    """Another writer held a lock past the retry bound (``RetryPolicy.attempts``)."""

    def __init__(self, detail: str, *, attempts: int) -> None:
        self.attempts = attempts
        super().__init__(
            f"database still busy after {attempts} attempts: {detail}; another "
            "writer held the lock for longer than the retry bound, so check for "
            "long-running transactions or raise SessionStore(retry=...)"
        )


class DatabaseUnavailableError(HermesOrmError):
    """The database could not be reached, or could not take writes, for the retry span.

    Connections refused, lost or unanswered, a server starting up or shutting
    down, or a read-only one (a failover under way), for longer than
    ``RetryPolicy.unavailable_for``. Nothing was left half-written: calling
    again later is the retry.
    """

    def __init__(self, detail: str, *, attempts: int, seconds: float | None = None) -> None:
        self.attempts = attempts
        self.seconds = seconds
        span = "" if seconds is None else f" for {seconds:.1f} s"
        super().__init__(
            f"database unreachable{span} ({attempts} attempts): {detail}; check that the "
            "server is up and reachable, or raise RetryPolicy(unavailable_for=...) to wait "
            "longer"
        )


class SchemaOutOfDateError(HermesOrmError):
    """The database schema is not at the revision this hermes_orm expects."""

    def __init__(
        self, current: str | None, expected: str, *, branch: bool = False, fix: str | None = None
    ) -> None:
        self.current = current
        self.expected = expected
        self.branch = branch
        if current is None:
            state = "has no hermes_orm schema"
        else:
            state = f"is at schema revision {current}"
        if fix is None:
            if branch:
                fix = "your application's `alembic upgrade hermes_orm@head`"
            else:
                fix = "`hermes-orm db upgrade` (or hermes_orm.upgrade(engine))"
        super().__init__(f"the database {state}, this hermes_orm needs {expected}: run {fix}")


class SchemaManagedByHostError(HermesOrmError):
    """hermes_orm's revisions run as a branch of the host's Alembic history.

    Their state is in the host's ``alembic_version``: the host's own Alembic
    migrates them (``alembic upgrade hermes_orm@head``), not hermes_orm's
    side-by-side runner, which would create the tables a second time.
    """

    def __init__(self, current: str | None, command: str = "upgrade hermes_orm@head") -> None:
        self.current = current
        super().__init__(
            f"the database's hermes_orm schema (at {current}) is migrated as a branch of "
            f"your Alembic history (alembic_version): run `alembic {command}` "
            "with your application's Alembic configuration"
        )


class SchemaTooNewError(HermesOrmError):
    """The database was migrated by a newer hermes_orm than the one running."""

    def __init__(self, current: str) -> None:
        self.current = current
        super().__init__(
            f"the database is at schema revision {current}, which this "
            "hermes_orm does not know: upgrade the hermes-orm-sessions package"
        )


class DatabaseError(HermesOrmError):
    """A database error that is neither transient nor caused by the input."""


class SearchQueryError(InvalidArgumentError):
    """A search that cannot run: a query with nothing to look for, a bad limit or cursor."""
