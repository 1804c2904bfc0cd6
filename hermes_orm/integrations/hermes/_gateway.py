"""Hermes Agent's SessionDB, continued: gateways.

Routing entries, handoffs, peers and origins, Telegram topics, cron runs.
A mixin of :class:`hermes_orm.integrations.hermes.sessiondb.SessionDB`.

Text arguments are stored as Hermes' SQLite file stores them: numbers as their
text, lone surrogates as U+FFFD. Text with NUL characters, or of another type,
is refused with a ``ValueError``/``TypeError`` on every backend (PostgreSQL
cannot store NUL), before anything is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Table, delete, exists, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from hermes_orm import _codec, _dialects
from hermes_orm.errors import HermesOrmError, InvalidArgumentError, SessionNotFoundError
from hermes_orm.integrations.hermes._text import (
    ascii_lower,
    has_lone_surrogate,
    lookup_key,
    sqlite_text,
)
from hermes_orm.models import (
    GatewayRoute,
    Message,
    Meta,
    Session,
    TelegramTopicBinding,
    TelegramTopicMode,
)

_T = TypeVar("_T")

if TYPE_CHECKING:
    from sqlalchemy.dialects.postgresql import Insert as PgInsert
    from sqlalchemy.dialects.sqlite import Insert as SqliteInsert

    from hermes_orm.store import SessionStore

_log = logging.getLogger(__name__)

_sessions: Table = Session.__table__  # type: ignore[assignment]
_messages: Table = Message.__table__  # type: ignore[assignment]
_meta: Table = Meta.__table__  # type: ignore[assignment]
_routes: Table = GatewayRoute.__table__  # type: ignore[assignment]
_topic_mode: Table = TelegramTopicMode.__table__  # type: ignore[assignment]
_bindings: Table = TelegramTopicBinding.__table__  # type: ignore[assignment]

#: End reasons a gateway may still resume a session from: ends written by
#: mistake (an old gateway cleanup, a TUI reaper), not conversation boundaries.
RECOVERABLE_END_REASONS = ("agent_close", "ws_orphan_reap")
#: The ``hermes_meta`` key Hermes sets once Telegram topic mode was opted into.
TOPIC_SCHEMA_KEY = "telegram_dm_topic_schema_version"
_TOPIC_SCHEMA_VERSION = "2"
#: Handoff states a new handoff may replace (none, or a finished one).
_HANDOFF_SETTLED = ("completed", "failed")
_MAX_KEY = 255
_MAX_HANDOFF_ERROR = 500


def _text(name: str, value: Any, *, max_length: int | None = None) -> str | None:
    """``value`` as the text Hermes' SQLite file would hold (None stays None).

    Raises:
        TypeError: Neither text nor a number.
        InvalidArgumentError: Text with NUL characters or lone surrogates, or longer than
            ``max_length``.
    """
    text = sqlite_text(value)
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if "\x00" in text:
        raise InvalidArgumentError(f"{name} contains NUL characters, which cannot be stored")
    if has_lone_surrogate(text):  # (Hermes' sqlite3 refuses them too)
        raise InvalidArgumentError(f"{name} contains lone surrogate characters (not valid Unicode)")
    if max_length is not None and len(text) > max_length:
        raise InvalidArgumentError(f"{name} is longer than {max_length} characters")
    return text


def _key(name: str, value: Any, *, max_length: int | None = _MAX_KEY) -> str:
    """A required value's text, for key columns at most 255 characters; None is refused.

    Raises:
        TypeError: None, or neither text nor a number.
        InvalidArgumentError: See :func:`_text`.
    """
    text = _text(name, value, max_length=max_length)
    if text is None:
        raise TypeError(f"{name} must be a string, got None")
    return text


def _insert(conn: Connection, table: Table) -> PgInsert | SqliteInsert:
    """The backend's INSERT, which has ``ON CONFLICT``."""
    return _dialects.insert_maker(conn.dialect.name)(table)  # type: ignore[no-any-return]


def _last_active() -> Any:
    """A session's newest message time, else its start (Hermes' ``last_active``)."""
    newest = (
        select(func.max(_messages.c.timestamp))
        .where(_messages.c.session_id == _sessions.c.id)
        .scalar_subquery()
    )
    return func.coalesce(newest, _sessions.c.started_at).label("last_active")


def _has_messages() -> Any:
    """The session holds at least one message."""
    stored = exists().where(_messages.c.session_id == _sessions.c.id)
    return or_(func.coalesce(_sessions.c.message_count, 0) > 0, stored)


def _recoverable() -> Any:
    """Live, or ended only by a mistaken end a gateway may undo."""
    return or_(_sessions.c.ended_at.is_(None), _sessions.c.end_reason.in_(RECOVERABLE_END_REASONS))


def _window(limit: Any, offset: Any) -> tuple[int | None, int]:
    """SQLite's LIMIT/OFFSET reading: a negative limit is none, a negative offset 0.

    One past 64 bits (which SQLite could not bind) is read as no limit, or an
    offset past every row.

    Raises:
        InvalidArgumentError: A limit or offset that is no integer (None, NaN, a
            word): Hermes' SQLite file refuses it too (a datatype mismatch).
    """
    try:
        size, start = int(limit), int(offset)
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError(
            f"limit and offset must be integers, got {_codec.shown(limit)} and "
            f"{_codec.shown(offset)}"
        ) from None
    # Past what a 64-bit column can count: every row (a limit), none (an offset).
    return (None if not 0 <= size < 2**63 else size), min(max(0, start), 2**63 - 1)


def _mark_topic_schema(conn: Connection) -> None:
    """Record, as Hermes does, that Telegram topic mode's tables are in place."""
    statement = _insert(conn, _meta).values(key=TOPIC_SCHEMA_KEY, value=_TOPIC_SCHEMA_VERSION)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=["key"], set_={"value": statement.excluded.value}
        )
    )


class GatewayMethods:
    """SessionDB methods on gateways."""

    if TYPE_CHECKING:
        _store: SessionStore

        def _write(self, work: Callable[[Connection], _T]) -> _T: ...

        def _refuse_read_only(self) -> None: ...

        def hermes_session(self, row: Any) -> dict[str, Any]: ...

    def _sessions_with(self, conn: Connection, query: Any) -> list[dict[str, Any]]:
        """Hermes' session dicts of ``query``'s rows, with ``last_active`` when selected."""
        out = []
        for row in conn.execute(query):
            session = self.hermes_session(row)
            if "last_active" in row._fields:
                session["last_active"] = row.last_active
            out.append(session)
        return out

    def _sessions_with_previews(self, conn: Connection, query: Any) -> list[dict[str, Any]]:
        """:meth:`_sessions_with` plus ``preview``: the first user message, as listed."""
        from hermes_orm.integrations.hermes.sessiondb import _previews

        sessions = self._sessions_with(conn, query)
        previews = _previews(conn, [s["id"] for s in sessions])
        for session in sessions:
            session["preview"] = previews.get(session["id"], "")
        return sessions

    # -- gateway peers and origins -----------------------------------------------------

    def record_gateway_session_peer(
        self,
        session_id: str,
        *,
        source: str,
        user_id: str | None = None,
        session_key: str | None = None,
        chat_id: str | None = None,
        chat_type: str | None = None,
        thread_id: str | None = None,
        display_name: str | None = None,
        origin_json: str | None = None,
    ) -> None:
        """Store the gateway peer of an existing session (nothing without id or key).

        ``source``, ``user_id``, ``session_key``, ``chat_id``, ``chat_type`` and
        ``thread_id`` are all set (None clears); ``display_name`` and
        ``origin_json`` are set only when given. A missing session is a no-op.

        Raises:
            TypeError: ``source`` is None, or a value is neither text nor a number.
            InvalidArgumentError: A value holds NUL characters.
        """
        if not session_id or not session_key:
            return
        values: dict[str, Any] = {
            "session_key": _text("session_key", session_key),
            "source": _key("source", source, max_length=None),
            "user_id": _text("user_id", user_id),
            "chat_id": _text("chat_id", chat_id),
            "chat_type": _text("chat_type", chat_type),
            "thread_id": _text("thread_id", thread_id),
        }
        for name, value in (("display_name", display_name), ("origin_json", origin_json)):
            if value is not None:
                values[name] = _text(name, value)

        def work(conn: Connection) -> None:
            conn.execute(update(_sessions).where(_sessions.c.id == session_id).values(values))

        self._write(work)

    def set_expiry_finalized(self, session_id: str, finalized: bool = True) -> None:
        """Set (or clear) the session's ``expiry_finalized`` flag; no-op without an id."""
        if not session_id:
            return

        def work(conn: Connection) -> None:
            statement = update(_sessions).where(_sessions.c.id == session_id)
            conn.execute(statement.values(expiry_finalized=bool(finalized)))

        self._write(work)

    def find_latest_gateway_session_for_peer(
        self,
        *,
        source: str,
        user_id: str | None = None,
        session_key: str | None = None,
        chat_id: str | None = None,
        chat_type: str | None = None,
        thread_id: str | None = None,
    ) -> dict[str, Any] | None:
        """The newest session a gateway may resume for this peer, or None.

        Candidates hold messages and are live or ended only by ``agent_close``
        or ``ws_orphan_reap`` (ends written by mistake); found by
        ``session_key`` and ``source``, else, when ``chat_id`` and ``chat_type``
        are given, by the whole peer (user, chat, chat type, thread; a missing
        value matches an empty one). None without a ``session_key``.
        """
        if not session_key:
            return None
        c = _sessions.c
        key = _text("session_key", session_key)
        wanted = _text("source", source)
        base = (
            select(_sessions)
            .where(_recoverable(), _has_messages())
            .order_by(c.started_at.desc(), c.id.desc())
            .limit(1)
        )
        by_key = base.where(c.session_key == key, c.source == wanted)
        by_peer = None
        if chat_id is not None and chat_type is not None:
            peer = {
                c.user_id: user_id,
                c.chat_id: chat_id,
                c.chat_type: chat_type,
                c.thread_id: thread_id,
            }
            by_peer = base.where(
                c.source == wanted,
                *(
                    func.coalesce(column, "") == (_text(column.name, value) or "")
                    for column, value in peer.items()
                ),
            )

        def work(conn: Connection) -> dict[str, Any] | None:
            for query in (by_key, by_peer):
                if query is not None:
                    found = self._sessions_with(conn, query)
                    if found:
                        return found[0]
            return None

        return self._store.read_transaction(work)

    def find_session_by_origin(
        self,
        *,
        platform: str,
        chat_id: str,
        thread_id: str | None = None,
        user_id: str | None = None,
    ) -> str | None:
        """The newest live gateway session of a platform chat (and thread), or None.

        Sessions with a ``session_key`` whose source is ``platform`` (any case)
        and chat ``chat_id``; with ``thread_id``, of that thread (an empty one
        for sessions without). Of several, the one of ``user_id`` when given;
        None when none is theirs, or when no user is given and the sessions
        belong to different users, so one user's message never lands in
        another's session.
        """
        # Text with NUL: no stored session holds it (Hermes' file finds none either).
        if (
            not platform
            or chat_id in (None, "")
            or any("\x00" in str(sqlite_text(v)) for v in (platform, chat_id, thread_id, user_id))
        ):
            return None
        c = _sessions.c
        query = (
            select(c.id, c.user_id)
            .where(
                ascii_lower(c.source) == ascii_lower(_text("platform", platform)),
                c.session_key.is_not(None),
                c.chat_id == _text("chat_id", chat_id),
                c.ended_at.is_(None),
            )
            .order_by(c.started_at.desc(), c.id.desc())
        )
        if thread_id is not None:
            query = query.where(func.coalesce(c.thread_id, "") == _text("thread_id", thread_id))
        rows = self._store.read_transaction(lambda conn: conn.execute(query).all())
        if not rows:
            return None
        if user_id:
            wanted = _text("user_id", user_id)
            for row in rows:
                if (row.user_id or "") == wanted:
                    return str(row.id)
            if len(rows) > 1:
                return None
        elif len(rows) > 1:
            users = {(row.user_id or "").strip() for row in rows} - {""}
            if len(users) > 1:
                return None
        return str(rows[0].id)

    def list_gateway_sessions(
        self, *, platform: str | None = None, active_only: bool = True
    ) -> list[dict[str, Any]]:
        """Gateway sessions, one per ``session_key`` (the newest), most recently active first.

        Each is Hermes' session dict with ``last_active``. ``platform`` keeps
        sessions of that source (any case); ``active_only`` those not ended
        (a key whose newest session ended is left out, not replaced by an
        older one).
        """
        c = _sessions.c
        newer = _sessions.alias("newer")
        newest = (
            select(func.max(newer.c.started_at))
            .where(newer.c.session_key == c.session_key)
            .scalar_subquery()
        )
        last_active = _last_active()
        query = select(_sessions, last_active).where(
            c.session_key.is_not(None), c.started_at == newest
        )
        if platform:
            query = query.where(ascii_lower(c.source) == ascii_lower(_text("platform", platform)))
        if active_only:
            query = query.where(c.ended_at.is_(None))
        query = query.order_by(last_active.desc(), c.id.desc())
        return self._store.read_transaction(lambda conn: self._sessions_with(conn, query))

    def promote_to_session_reset(self, session_id: str, reason: str = "session_reset") -> bool:
        """End the session with ``reason``, a reset boundary a gateway never resumes from.

        Applies to live sessions and to those ended only by ``agent_close`` or
        ``ws_orphan_reap``; a session ended for another reason keeps it.
        Returns whether the session was changed: False when kept, missing,
        without an id, or when the database could not be written (logged).
        """
        if not session_id:
            return False
        ended = _text("reason", reason)

        def work(conn: Connection) -> int:
            statement = (
                update(_sessions)
                .where(_sessions.c.id == session_id, _recoverable())
                .values(ended_at=time.time(), end_reason=ended)
            )
            return int(conn.execute(statement).rowcount)

        try:
            return self._write(work) > 0
        except (SQLAlchemyError, HermesOrmError) as exc:
            _log.warning("promote_to_session_reset(%r) failed: %s", session_id, exc)
            return False

    # -- gateway routing index -----------------------------------------------------------

    def save_gateway_routing_entry(
        self, session_key: str, entry_json: str, *, scope: str = ""
    ) -> None:
        """Store (or replace) the routing entry of ``session_key`` in ``scope``.

        A key or entry that is empty is not stored.

        Raises:
            TypeError: A value that is neither text nor a number.
            InvalidArgumentError: NUL characters in a key or the scope.
        """
        if not session_key or not entry_json:
            return
        values = {
            "scope": _key("scope", scope, max_length=None),
            "session_key": _key("session_key", session_key, max_length=None),
            "entry_json": _text("entry_json", entry_json),
        }

        def work(conn: Connection) -> None:
            statement = _insert(conn, _routes).values(**values, updated_at=time.time())
            excluded = statement.excluded
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["scope", "session_key"],
                    set_={"entry_json": excluded.entry_json, "updated_at": excluded.updated_at},
                )
            )

        self._write(work)

    def replace_gateway_routing_entries(self, entries: dict[str, str], *, scope: str = "") -> None:
        """Make ``entries`` (key: entry JSON) the whole routing index of ``scope``, atomically.

        Keys not in ``entries`` leave the scope; other scopes are untouched;
        pairs with an empty key or entry are skipped.

        Raises:
            TypeError: A value that is neither text nor a number.
            InvalidArgumentError: NUL characters in a key or the scope.
        """
        where = _key("scope", scope, max_length=None)
        rows = [
            {
                "scope": where,
                "session_key": _key("session_key", key, max_length=None),
                "entry_json": _text("entry_json", entry),
            }
            for key, entry in entries.items()
            if key and entry
        ]

        def work(conn: Connection) -> None:
            conn.execute(delete(_routes).where(_routes.c.scope == where))
            if rows:
                now = time.time()
                conn.execute(_routes.insert(), [{**row, "updated_at": now} for row in rows])

        self._write(work)

    def load_gateway_routing_entries(self, *, scope: str = "") -> dict[str, str]:
        """The routing index of ``scope``: ``{session_key: entry_json}``."""
        query = select(_routes.c.session_key, _routes.c.entry_json).where(
            _routes.c.scope == _key("scope", scope, max_length=None)
        )

        def work(conn: Connection) -> dict[str, str]:
            return {key: entry for key, entry in conn.execute(query)}

        return self._store.read_transaction(work)

    def delete_gateway_routing_entries(self, session_keys: list[str], *, scope: str = "") -> None:
        """Remove the routing entries of ``session_keys`` from ``scope``."""
        if not session_keys:
            return
        keys = [_key("session_key", key, max_length=None) for key in session_keys]
        where = _key("scope", scope, max_length=None)

        def work(conn: Connection) -> None:
            for part in _dialects.in_parts(keys):  # (any number of keys, one transaction)
                conn.execute(
                    delete(_routes).where(_routes.c.scope == where, _routes.c.session_key.in_(part))
                )

        self._write(work)

    # -- handoffs -----------------------------------------------------------------------------

    def request_handoff(self, session_id: str, platform: str) -> bool:
        """Ask for the session to be handed off to ``platform`` (state ``pending``).

        Returns False when the session is missing or a handoff of it is
        already in flight (``pending`` or ``running``).
        """
        c = _sessions.c
        target = _text("platform", platform)

        def work(conn: Connection) -> int:
            statement = (
                update(_sessions)
                .where(
                    c.id == session_id,
                    or_(c.handoff_state.is_(None), c.handoff_state.in_(_HANDOFF_SETTLED)),
                )
                .values(handoff_state="pending", handoff_platform=target, handoff_error=None)
            )
            return int(conn.execute(statement).rowcount)

        return self._write(work) > 0

    def claim_handoff(self, session_id: str) -> bool:
        """Move a ``pending`` handoff to ``running``; True for the one caller that did.

        Atomic: of concurrent claims (threads, processes, gateways) exactly one
        succeeds, on SQLite and on PostgreSQL.
        """

        def work(conn: Connection) -> int:
            statement = (
                update(_sessions)
                .where(_sessions.c.id == session_id, _sessions.c.handoff_state == "pending")
                .values(handoff_state="running")
            )
            return int(conn.execute(statement).rowcount)

        return self._write(work) > 0

    def complete_handoff(self, session_id: str) -> None:
        """Mark the session's handoff ``completed`` (its error cleared)."""
        self._set_handoff(session_id, state="completed", error=None)

    def fail_handoff(self, session_id: str, error: str) -> None:
        """Mark the session's handoff ``failed`` with ``error`` (its first 500 characters).

        Raises:
            TypeError: ``error`` is not a string.
        """
        if not isinstance(error, str):
            raise TypeError(f"error must be a string, got {type(error).__name__}")
        self._set_handoff(
            session_id, state="failed", error=_text("error", error[:_MAX_HANDOFF_ERROR])
        )

    def _set_handoff(self, session_id: str, *, state: str, error: str | None) -> None:
        def work(conn: Connection) -> None:
            statement = update(_sessions).where(_sessions.c.id == session_id)
            conn.execute(statement.values(handoff_state=state, handoff_error=error))

        self._write(work)

    def get_handoff_state(self, session_id: str) -> dict[str, Any] | None:
        """The session's handoff as ``{"state", "platform", "error"}``; None for no session.

        Also None when the database could not be read (logged), so a poll
        loop keeps polling.
        """
        c = _sessions.c
        query = select(c.handoff_state, c.handoff_platform, c.handoff_error).where(
            c.id == session_id
        )
        try:
            row = self._store.read_transaction(lambda conn: conn.execute(query).first())
        except (SQLAlchemyError, HermesOrmError) as exc:
            _log.warning("get_handoff_state(%r) failed: %s", session_id, exc)
            return None
        if row is None:
            return None
        return {
            "state": row.handoff_state,
            "platform": row.handoff_platform,
            "error": row.handoff_error,
        }

    def list_pending_handoffs(self) -> list[dict[str, Any]]:
        """Sessions whose handoff is ``pending``, oldest first.

        ``[]`` when the database could not be read (logged), so a watcher
        keeps watching.
        """
        query = (
            select(_sessions)
            .where(_sessions.c.handoff_state == "pending")
            .order_by(_sessions.c.started_at, _sessions.c.id)
        )
        try:
            return self._store.read_transaction(lambda conn: self._sessions_with(conn, query))
        except (SQLAlchemyError, HermesOrmError) as exc:
            _log.warning("list_pending_handoffs() failed: %s", exc)
            return []

    # -- cron -------------------------------------------------------------------------------

    def list_cron_job_runs(
        self, job_id: str, limit: int = 20, offset: int = 0
    ) -> list[dict[str, Any]]:
        """The run sessions of one cron job, newest first, with ``last_active`` and ``preview``.

        Runs are the ``cron`` sessions whose id starts with ``cron_<job_id>_``
        (case-sensitive; ``cron_<job_id>2_...`` is another job's). A job id
        with NUL or a lone surrogate, which no session id holds, has none.
        """
        c = _sessions.c
        prefix = lookup_key(f"cron_{job_id}_")
        size, start = _window(limit, offset)
        if prefix is None:
            return []
        query = (
            select(_sessions, _last_active())
            .where(
                c.source == "cron",
                func.substr(c.id, 1, len(prefix)) == prefix,
            )
            .order_by(c.started_at.desc(), c.id.desc())
            .limit(size)
            .offset(start)
        )
        return self._store.read_transaction(lambda conn: self._sessions_with_previews(conn, query))

    # -- Telegram topics ------------------------------------------------------------------

    def apply_telegram_topic_migration(self) -> None:
        """Opt into Telegram topic mode: record its schema version (2) in the meta store.

        The tables are part of hermes_orm's schema already (migration 0008).
        """
        self._write(_mark_topic_schema)

    def enable_telegram_topic_mode(
        self,
        *,
        chat_id: str,
        user_id: str,
        has_topics_enabled: bool | None = None,
        allows_users_to_create_topics: bool | None = None,
    ) -> None:
        """Turn topic mode on for a private chat, with the chat's known capabilities.

        The first enabling sets ``activated_at``; each one sets the user, the
        capability flags (0/1, None: unknown) and when they were checked.
        """
        now = time.time()
        values = {
            "chat_id": _key("chat_id", str(chat_id)),
            "user_id": _text("user_id", str(user_id)),
            "enabled": 1,
            "activated_at": now,
            "updated_at": now,
            "has_topics_enabled": None
            if has_topics_enabled is None
            else int(bool(has_topics_enabled)),
            "allows_users_to_create_topics": None
            if allows_users_to_create_topics is None
            else int(bool(allows_users_to_create_topics)),
            "capability_checked_at": now,
        }

        def work(conn: Connection) -> None:
            _mark_topic_schema(conn)
            statement = _insert(conn, _topic_mode).values(**values)
            excluded = statement.excluded
            changed = (
                "user_id",
                "enabled",
                "updated_at",
                "has_topics_enabled",
                "allows_users_to_create_topics",
                "capability_checked_at",
            )
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["chat_id"], set_={name: excluded[name] for name in changed}
                )
            )

        self._write(work)

    def disable_telegram_topic_mode(self, *, chat_id: str, clear_bindings: bool = True) -> None:
        """Turn topic mode off for a chat; with ``clear_bindings``, drop its topic bindings."""
        chat = _key("chat_id", str(chat_id))

        def work(conn: Connection) -> None:
            conn.execute(
                update(_topic_mode)
                .where(_topic_mode.c.chat_id == chat)
                .values(enabled=0, updated_at=time.time())
            )
            if clear_bindings:
                conn.execute(delete(_bindings).where(_bindings.c.chat_id == chat))

        self._write(work)

    def is_telegram_topic_mode_enabled(self, *, chat_id: str, user_id: str) -> bool:
        """Whether topic mode is on for this chat and user."""
        query = select(_topic_mode.c.enabled).where(
            _topic_mode.c.chat_id == _key("chat_id", str(chat_id)),
            _topic_mode.c.user_id == _text("user_id", str(user_id)),
        )
        enabled = self._store.read_transaction(lambda conn: conn.execute(query).scalar())
        return bool(enabled)

    def bind_telegram_topic(
        self,
        *,
        chat_id: str,
        thread_id: str,
        user_id: str,
        session_key: str,
        session_id: str,
        managed_mode: str = "auto",
    ) -> None:
        """Bind a chat's topic to a session (rebinding the topic replaces its session).

        A session has one topic at most: binding it again to its topic only
        refreshes the binding.

        Raises:
            InvalidArgumentError: The session is bound to another topic.
            SessionNotFoundError: No such session.
        """
        values = {
            "chat_id": _key("chat_id", str(chat_id)),
            "thread_id": _key("thread_id", str(thread_id)),
            "user_id": _text("user_id", str(user_id)),
            "session_key": _text("session_key", str(session_key)),
            "session_id": _key("session_id", str(session_id)),
            "managed_mode": _key("managed_mode", managed_mode, max_length=None),
        }
        sid = values["session_id"]

        def work(conn: Connection) -> None:
            _mark_topic_schema(conn)
            # The session's row lock (PostgreSQL; SQLite holds the write lock)
            # makes the one-topic check and the write one step.
            locked = select(_sessions.c.id).where(_sessions.c.id == sid).with_for_update()
            if conn.execute(locked).first() is None:
                raise SessionNotFoundError(str(sid))
            bound = conn.execute(
                select(_bindings.c.chat_id, _bindings.c.thread_id).where(
                    _bindings.c.session_id == sid
                )
            ).first()
            if bound is not None and (bound.chat_id, bound.thread_id) != (
                values["chat_id"],
                values["thread_id"],
            ):
                raise InvalidArgumentError("session is already linked to another Telegram topic")
            now = time.time()
            statement = _insert(conn, _bindings).values(**values, linked_at=now, updated_at=now)
            excluded = statement.excluded
            changed = ("user_id", "session_key", "session_id", "managed_mode", "updated_at")
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["chat_id", "thread_id"],
                    set_={name: excluded[name] for name in changed},
                )
            )

        self._write(work)

    def delete_telegram_topic_binding(self, *, chat_id: str, thread_id: str) -> int:
        """Remove one topic's binding; returns how many were removed (0 or 1).

        When it was the chat's last binding, topic mode is turned off for the
        chat in the same transaction.
        """
        chat = _key("chat_id", str(chat_id))
        thread = _key("thread_id", str(thread_id))

        def work(conn: Connection) -> int:
            removed = int(
                conn.execute(
                    delete(_bindings).where(
                        _bindings.c.chat_id == chat, _bindings.c.thread_id == thread
                    )
                ).rowcount
                or 0
            )
            if removed:
                remaining = conn.execute(
                    select(_bindings.c.thread_id).where(_bindings.c.chat_id == chat).limit(1)
                ).first()
                if remaining is None:
                    conn.execute(
                        update(_topic_mode)
                        .where(_topic_mode.c.chat_id == chat)
                        .values(enabled=0, updated_at=time.time())
                    )
            return removed

        return self._write(work)

    def _bindings_where(self, *where: Any) -> list[dict[str, Any]]:
        query = select(_bindings).where(*where).order_by(_bindings.c.updated_at.desc())

        def work(conn: Connection) -> list[dict[str, Any]]:
            return [dict(row._mapping) for row in conn.execute(query)]

        return self._store.read_transaction(work)

    def get_telegram_topic_binding(self, *, chat_id: str, thread_id: str) -> dict[str, Any] | None:
        """The binding of a chat's topic (Hermes' binding row as a dict), or None."""
        found = self._bindings_where(
            _bindings.c.chat_id == _key("chat_id", str(chat_id)),
            _bindings.c.thread_id == _key("thread_id", str(thread_id)),
        )
        return found[0] if found else None

    def get_telegram_topic_binding_by_session(self, *, session_id: str) -> dict[str, Any] | None:
        """The binding of the session's topic, or None."""
        found = self._bindings_where(_bindings.c.session_id == _key("session_id", str(session_id)))
        return found[0] if found else None

    def is_telegram_session_linked_to_topic(self, *, session_id: str) -> bool:
        """Whether the session is bound to a topic."""
        return self.get_telegram_topic_binding_by_session(session_id=session_id) is not None

    def list_telegram_topic_bindings_for_chat(self, *, chat_id: str) -> list[dict[str, Any]]:
        """The chat's topic bindings, most recently updated first."""
        return self._bindings_where(_bindings.c.chat_id == _key("chat_id", str(chat_id)))

    def list_unlinked_telegram_sessions_for_user(
        self, *, chat_id: str, user_id: str, limit: int = 10
    ) -> list[dict[str, Any]]:
        """The user's Telegram sessions bound to no topic, most recently active first.

        Each is Hermes' session dict with ``last_active`` and ``preview``.
        ``chat_id`` is accepted as Hermes takes it; sessions of every chat of
        the user are listed.
        """
        del chat_id  # not a filter: the user's sessions of every chat are listed
        c = _sessions.c
        size, _ = _window(limit, 0)
        last_active = _last_active()
        bound = exists().where(_bindings.c.session_id == c.id)
        query = (
            select(_sessions, last_active)
            .where(c.source == "telegram", c.user_id == _text("user_id", str(user_id)), ~bound)
            .order_by(last_active.desc(), c.started_at.desc(), c.id.desc())
            .limit(size)
        )
        return self._store.read_transaction(lambda conn: self._sessions_with_previews(conn, query))
