"""Hermes Agent's SessionDB, continued: upkeep.

Rewriting and archiving messages, deleting and pruning, imports, metadata.
A mixin of :class:`hermes_orm.integrations.hermes.sessiondb.SessionDB`.

Every rewrite of a session's messages keeps the store's invariants: the rows
sit at positions ``0..n-1``, ``flushed_idx == message_count == n``, each row's
digest is that of the message it now holds and ``flushed_digest`` that of the
last one (``hermes-orm verify`` finds nothing to repair). A flag Hermes flips
on a row (``active``, ``compacted``, ``api_content``) is a change of the
message, made through the codec; new rows are written by the store's own
insert, which moves the cursor with them. So ``message_count`` counts every
stored row, archived ones included, where Hermes counts the live ones after
:meth:`UpkeepMethods.archive_and_compact` and ``replace_messages(...,
active_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy import (
    Connection,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    func,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from hermes_orm import _codec, _dialects
from hermes_orm.errors import (
    DatabaseError,
    InvalidArgumentError,
    InvalidMessageError,
    InvalidSessionError,
    SessionNotFoundError,
)
from hermes_orm.integrations.hermes._gateway import _window
from hermes_orm.integrations.hermes._text import (
    least_row_id_from,
    lookup_key,
    message_json,
    row_id_equal_to,
    scrub,
    scrub_json,
    scrubbed_text,
    sqlite_integer,
    sqlite_text,
)
from hermes_orm.migrations import MODEL_TABLES
from hermes_orm.models import Message, ModelUsage, Session, new_history_id
from hermes_orm.store import refuse_orphans, take_lineage_turn, title_taken

_T = TypeVar("_T")

if TYPE_CHECKING:
    from hermes_orm.store import SessionStore

_sessions: Table = Session.__table__  # type: ignore[assignment]
_messages: Table = Message.__table__  # type: ignore[assignment]
_usage: Table = ModelUsage.__table__  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: Of a message that active rows hold: a NULL ``active`` (a flush without the key) is active.
_ACTIVE = func.coalesce(_messages.c.active, True).is_(True)
#: The search indexes :meth:`UpkeepMethods.optimize_fts` merges, per backend.
_SQLITE_SEARCH_TABLES = ("hermes_search", "hermes_search_cjk")
_PG_SEARCH_INDEXES = ("ix_hermes_search_vector", "ix_hermes_search_cjk")
#: The session columns :meth:`UpkeepMethods.import_sessions` takes as text.
_IMPORT_SESSION_TEXT = (
    "source", "user_id", "model", "system_prompt", "end_reason", "cwd", "git_branch",
    "git_repo_root", "billing_provider", "billing_base_url", "billing_mode", "cost_status",
    "cost_source", "pricing_version", "title",
)  # fmt: skip
#: The message keys :meth:`UpkeepMethods.import_sessions` takes as text (besides ``role``).
_IMPORT_MESSAGE_TEXT = (
    "tool_call_id", "tool_name", "effect_disposition", "finish_reason", "reasoning",
    "reasoning_content", "platform_message_id", "message_id",
)  # fmt: skip
_IMPORT_COUNTERS = (
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "reasoning_tokens", "api_call_count",
)  # fmt: skip
_REASONING_JSON = ("reasoning_details", "codex_reasoning_items", "codex_message_items")


def _stamp(value: Any, default: float) -> float:
    """Hermes' reading of an explicit timestamp (a datetime or a number); else ``default``."""
    if value is None:
        return default
    try:
        return float(value.timestamp() if hasattr(value, "timestamp") else value)
    except (TypeError, ValueError, OverflowError):
        return default


def _how_many(name: str, value: Any) -> Any:
    """A number of messages Hermes compares with 0 first: a negative one is 0.

    Raises:
        InvalidArgumentError: No number (Hermes' comparison raises a TypeError).
    """
    if not isinstance(value, int | float):
        raise InvalidArgumentError(f"{name} must be a number, got {_codec.shown(value)}")
    return max(0, value)


def _stored_message(msg: dict[str, Any], stamp: float) -> dict[str, Any]:
    """The message Hermes writes for a transcript rewrite of ``msg`` (as ``append_message`` does).

    Only the keys Hermes keeps: reasoning fields of assistant messages only,
    ``message_id`` taken as ``platform_message_id``, falsy JSON values as
    nothing; the row is active and not compacted.
    """
    from hermes_orm.integrations.hermes.sessiondb import hermes_content

    role = msg.get("role", "unknown")
    assistant = role == "assistant"
    api_content = msg.get("api_content")
    message: dict[str, Any] = {"role": role, "content": hermes_content(msg.get("content"))}
    optional = {
        "tool_call_id": sqlite_text(msg.get("tool_call_id")),
        "tool_calls": message_json("tool_calls", msg.get("tool_calls")),
        "tool_name": scrubbed_text(msg.get("tool_name")),
        "effect_disposition": sqlite_text(msg.get("effect_disposition")),
        "token_count": sqlite_integer(msg.get("token_count")),
        "finish_reason": sqlite_text(msg.get("finish_reason")),
        "reasoning": scrubbed_text(msg.get("reasoning")) if assistant else None,
        "reasoning_content": (scrubbed_text(msg.get("reasoning_content")) if assistant else None),
        **{key: message_json(key, msg.get(key)) if assistant else None for key in _REASONING_JSON},
        "platform_message_id": sqlite_text(msg.get("platform_message_id") or msg.get("message_id")),
        "api_content": scrub(api_content) if isinstance(api_content, str) else None,
    }
    message.update({k: v for k, v in optional.items() if v is not None})
    message.update(
        timestamp=stamp, observed=bool(msg.get("observed")), active=True, compacted=False
    )
    return message


def _encode_all(messages: Iterable[dict[str, Any]]) -> list[_codec.EncodedMessage]:
    """Hermes' rows of a rewrite, validated and encoded before any transaction.

    Timestamps as Hermes gives them: each one's own, else now, always rising
    by at least a microsecond from one row to the next.

    Raises:
        InvalidMessageError: A message cannot be stored; nothing was written.
    """
    now = time.time()
    encoded = []
    for index, msg in enumerate(messages):
        stamp = _stamp(msg.get("timestamp"), now)
        encoded.append(_codec.encode_message(_stored_message(msg, stamp), index))
        now = max(now + 1e-6, stamp + 1e-6)
    return encoded


def _executes(sql: str) -> Callable[[Connection], None]:
    """The work of a transaction that runs one SQL statement."""

    def work(conn: Connection) -> None:
        conn.exec_driver_sql(sql)

    return work


def _preview_text(content: Any) -> str:
    """The text of a message's content a picker shows (parts' text joined)."""
    if isinstance(content, list):
        texts = [
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        ]
        return " ".join(t for t in texts if t).strip() or "[multimodal content]"
    return content if isinstance(content, str) else ""


def _has_text(message: dict[str, Any]) -> bool:
    """Whether Hermes' ``length(content) > 0`` holds: text before any NUL.

    Structured content, which Hermes keeps behind a NUL prefix, has none.
    """
    from hermes_orm.integrations.hermes.sessiondb import _hermes_content_text

    text = _hermes_content_text(message)
    return text is not None and text.split("\x00", 1)[0] != ""


def _delegates_of(conn: Connection, parents: Iterable[str]) -> list[str]:
    """The delegate sub-agent sessions of ``parents``, followed down their own delegates.

    Sessions marked ``_delegate_from`` in their ``model_config`` are delegates
    of that session and of their parent; the parents themselves never count.
    """
    seeds = set(parents)
    delegate_of: dict[str, set[str]] = {}
    rows = conn.execute(
        select(_sessions.c.id, _sessions.c.parent_session_id, _sessions.c.model_config).where(
            _sessions.c.model_config.is_not(None)
        )
    )
    for sid, parent_id, config in rows:
        marker = config.get("_delegate_from") if isinstance(config, dict) else None
        if marker is None:
            continue
        for owner in {marker, parent_id} - {None}:
            delegate_of.setdefault(owner, set()).add(sid)
    found = set(seeds)
    frontier = list(seeds)
    while frontier:
        frontier = [c for p in frontier for c in delegate_of.get(p, ()) if c not in found]
        found.update(frontier)
    return sorted(found - seeds)


def _text_or_none(value: Any, field: str) -> str | None:
    """An imported text field.

    Raises:
        InvalidArgumentError: Neither text nor None.
    """
    if value is None or isinstance(value, str):
        return value
    raise InvalidArgumentError(f"{field} must be a string")


def _json_object_or_none(value: Any, field: str) -> dict[str, Any] | None:
    """An imported JSON object (given as one, or as its JSON text).

    Raises:
        InvalidArgumentError: Not a JSON object.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidArgumentError(f"{field} must be valid JSON") from exc
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{field} must be a JSON object")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{field} must be JSON serializable") from exc
    return value


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _int_or_default(value: Any, default: int = 0) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def _json_size(value: Any) -> int | None:
    """Bytes of ``value`` as compact UTF-8 JSON; None when it is no JSON."""
    try:
        return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    except (TypeError, ValueError):  # UnicodeEncodeError (a lone surrogate) included
        return None


def _import_error(index: int, session_id: str, error: str) -> dict[str, Any]:
    item: dict[str, Any] = {"index": index, "error": error}
    if session_id:
        item["session_id"] = session_id
    return item


@contextlib.contextmanager
def _title_in_use(title: str | None) -> Iterator[None]:
    """A title the unique index finds taken (by a write since the check): Hermes' refusal."""
    try:
        yield
    except IntegrityError as exc:
        if title is None or not title_taken(exc):
            raise
        raise InvalidArgumentError(f"Title '{title}' is already in use") from None


def _picked_under_lock(conn: Connection, query: Any) -> list[str]:
    """The session ids ``query`` picks, checked again once their rows are locked.

    A flush holds its session's row lock until it commits: on PostgreSQL, a
    session found empty is locked (waiting for any writer) and checked once
    more, so a message that writer stored keeps its session. On SQLite the
    write transaction holds the database's write lock already.
    """
    ids = list(conn.execute(query).scalars())
    if not ids or conn.dialect.name != "postgresql":
        return ids
    ids.sort()  # (locked in id order, a part at a time)
    kept: list[str] = []
    order = _dialects.lock_order(_sessions.c.id, conn.dialect.name)
    for some in _dialects.in_parts(ids):
        mine = _sessions.c.id.in_(some)
        conn.execute(select(_sessions.c.id).where(mine).order_by(order).with_for_update())
        kept += conn.execute(query.where(mine)).scalars()
    return kept


def started_before(older_than_days: Any) -> float:
    """The time ``older_than_days`` days ago.

    Raises:
        InvalidArgumentError: Not a finite number of days (Hermes would multiply
            a str by the seconds of a day).
    """
    if (
        isinstance(older_than_days, bool)
        or not isinstance(older_than_days, int | float)
        or not math.isfinite(older_than_days)
    ):
        raise InvalidArgumentError(
            f"older_than_days must be a number of days or None, got {older_than_days!r:.80}"
        )
    return time.time() - older_than_days * 86400


def sessions_dir_path(sessions_dir: Any) -> Path | None:
    """The directory of Hermes' transcript files a deletion removes too (None: none).

    Raises:
        InvalidArgumentError: ``sessions_dir`` is no path: before anything is deleted.
    """
    if sessions_dir is None:
        return None
    if not isinstance(sessions_dir, str | os.PathLike) or isinstance(
        os.fspath(sessions_dir), bytes
    ):
        raise InvalidArgumentError(
            f"sessions_dir must be None or a directory's path (a str or Path), got "
            f"{type(sessions_dir).__name__}"
        )
    return Path(sessions_dir)


class Repairs(Protocol):
    """Store mode's end-of-turn repairs, told of Hermes' rewrites through the adapter.

    The plugin's :class:`~hermes_orm.integrations.hermes.mirror.StoreFlush`
    (the only one) sets itself on the adapters of the configured database.
    """

    def before_rewrite(self, session_id: str) -> None:
        """Before a rewrite of the session's history: the repairs not written yet, first."""

    def rewritten(self, session_id: str) -> None:
        """The session's history was rewritten (a rewind, a compression, a clear) or deleted."""


class UpkeepMethods:
    """SessionDB methods on upkeep."""

    #: Told of rewrites, in store mode (see :class:`Repairs`).
    _repairs: Repairs | None = None

    #: Most sessions one :meth:`import_sessions` call takes.
    _IMPORT_MAX_SESSIONS = 500
    #: Most messages of one imported session.
    _IMPORT_MAX_MESSAGES_PER_SESSION = 10_000
    #: Most messages of one import.
    _IMPORT_MAX_TOTAL_MESSAGES = 50_000
    #: Largest imported session, in bytes of its compact JSON.
    _IMPORT_MAX_SESSION_BYTES = 5 * 1024 * 1024
    #: Largest import, in bytes of its sessions' compact JSON.
    _IMPORT_MAX_TOTAL_BYTES = 25 * 1024 * 1024

    if TYPE_CHECKING:
        _store: SessionStore

        def _write(self, work: Callable[[Connection], _T]) -> _T: ...

        def _refuse_read_only(self) -> None: ...

        def _hermes_message(self, row: Any) -> dict[str, Any]: ...

        def ensure_session(
            self,
            session_id: str,
            source: str = "unknown",
            model: str | None = None,
            **kwargs: Any,
        ) -> str: ...

        def prune_sessions(
            self,
            older_than_days: float | None = 90,
            source: str | None = None,
            sessions_dir: Path | None = None,
            **filters: Any,
        ) -> int: ...

        def get_meta(self, key: str) -> str | None: ...

        def set_meta(self, key: str, value: str) -> None: ...

    # -- rewriting a session's messages ---------------------------------------------------

    def _rewrite(
        self, session_id: str, work: Callable[[Connection], Any], *, history: bool = True
    ) -> Any:
        """Run a rewrite of the session's history in one write transaction.

        What the store remembers of the session goes before and after, so no
        flush of this process trusts a history that changed under it. Store
        mode's repairs of the session are written first (the rewrite takes them
        as Hermes' own rows); those the database still refused are dropped once
        it is done. Without ``history``, the messages stay the messages they
        were (a column of one changes): the repairs go on.
        """
        if history and self._repairs is not None:
            self._repairs.before_rewrite(session_id)
        self._store.forget_cursor(session_id)
        try:
            result = self._write(work)
        finally:
            self._store.forget_cursor(session_id)
        if history:
            self._history_rewritten(session_id)
        return result

    def _history_rewritten(self, session_id: str) -> None:
        """Tell store mode's repairs (if any) the session's history was rewritten, or is gone."""
        if self._repairs is not None:
            self._repairs.rewritten(session_id)

    def _change_rows(
        self,
        conn: Connection,
        session_id: str,
        where: Any,
        change: Callable[[dict[str, Any]], None],
    ) -> list[int]:
        """Change the messages of rows matching ``where`` in place; their ids, in order.

        ``change`` edits each message dict; its row then holds exactly the
        changed message (columns, digest), and the session's ``flushed_digest``
        follows if the last row changed, its ``tool_call_count`` if a row's
        live tool calls did (see :class:`~hermes_orm._codec.EncodedMessage`),
        its ``history_id`` if any row changed.
        """
        stored = self._store.locked_cursor(conn, session_id)
        if stored is None:
            return []
        rows = conn.execute(
            select(_messages)
            .where(_messages.c.session_id == session_id, where)
            .order_by(_messages.c.idx)
        ).all()
        calls = 0  # live tool calls gained
        changed: dict[str, Any] = {}  # the session's columns to set
        for row in rows:
            message = _codec.row_to_message(row)
            if row.active is not False:
                calls -= _codec.tool_call_count(row.tool_calls)
            change(message)
            encoded = _codec.encode_message(message, row.idx)
            calls += encoded.tool_calls
            current = row._mapping
            values = {k: v for k, v in encoded.row.items() if current[k] != v}
            if values:
                conn.execute(update(_messages).where(_messages.c.id == row.id).values(values))
                changed["history_id"] = new_history_id()
            if row.idx == stored.flushed_idx - 1:
                changed["flushed_digest"] = encoded.digest
        if calls:
            changed["tool_call_count"] = _sessions.c.tool_call_count + calls
        if changed:
            conn.execute(update(_sessions).where(_sessions.c.id == session_id).values(changed))
        return [row.id for row in rows]

    def _replace_rows(
        self,
        conn: Connection,
        session_id: str,
        where: Any,
        prepare: Callable[[Connection], None] | None,
        encoded: list[_codec.EncodedMessage],
    ) -> bool:
        """Delete the rows matching ``where`` (None: none), then store ``encoded`` after the rest.

        ``prepare`` runs on what is left before the new rows go in. The rows
        left keep their order at positions ``0..k-1``; the new ones follow,
        written by the store's insert, which moves the cursor with them.
        Returns False when there is no such session.
        """
        if self._store.locked_cursor(conn, session_id) is None:
            return False
        if where is not None:
            conn.execute(delete(_messages).where(_messages.c.session_id == session_id, where))
        if prepare is not None:
            prepare(conn)
        live = _ACTIVE.label("live")
        kept = conn.execute(
            select(
                _messages.c.id, _messages.c.idx, _messages.c.digest, _messages.c.tool_calls, live
            )
            .where(_messages.c.session_id == session_id)
            .order_by(_messages.c.idx)
        ).all()
        moves = [{"row": row.id, "position": i} for i, row in enumerate(kept) if row.idx != i]
        if moves:  # in rising order, each position is free when a row moves onto it
            statement = (
                update(_messages)
                .where(_messages.c.id == bindparam("row"))
                .values(idx=bindparam("position"))
            )
            for move in moves:
                conn.execute(statement, move)
        last = bytes(kept[-1].digest) if kept else None
        history = new_history_id()
        conn.execute(
            update(_sessions)
            .where(_sessions.c.id == session_id)
            .values(
                flushed_idx=len(kept),
                message_count=len(kept),
                flushed_digest=last,
                history_id=history,
                # Of the live rows only, as Hermes counts them (archived ones are kept).
                tool_call_count=sum(
                    _codec.tool_call_count(row.tool_calls) for row in kept if row.live
                ),
            )
        )
        if encoded:
            self._store.insert_rows(conn, session_id, len(kept), last, encoded, history=history)
        return True

    def replace_messages(
        self, session_id: str, messages: list[dict[str, Any]], active_only: bool = False
    ) -> None:
        """Replace the session's stored messages with ``messages``, in one transaction.

        Each message is stored as Hermes rewrites a transcript (its keys
        Hermes keeps, active). Every row goes first; with ``active_only``, only
        the live ones (rows archived by compaction or taken back by a rewind
        stay, before the new ones).

        Raises:
            InvalidMessageError: A message cannot be stored; nothing was written.
            SessionNotFoundError: No such session, and there are messages to store.
        """
        encoded = _encode_all(messages)
        where = _ACTIVE if active_only else true()

        def work(conn: Connection) -> bool:
            return self._replace_rows(conn, session_id, where, None, encoded)

        if not self._rewrite(session_id, work) and encoded:
            raise SessionNotFoundError(session_id)

    def archive_and_compact(self, session_id: str, compacted_messages: list[dict[str, Any]]) -> int:
        """Archive the live messages and store ``compacted_messages`` after them, atomically.

        The live rows stay, marked inactive and compacted (search still finds
        them; :meth:`get_messages` with ``include_inactive`` returns them); the
        new rows are the live transcript. Returns how many were stored.

        Raises:
            InvalidMessageError: A message cannot be stored; nothing was written.
            SessionNotFoundError: No such session, and there are messages to store.
        """
        encoded = _encode_all(compacted_messages)

        def archive(conn: Connection) -> None:
            self._change_rows(
                conn, session_id, _ACTIVE, lambda m: m.update(active=False, compacted=True)
            )

        def work(conn: Connection) -> bool:
            return self._replace_rows(conn, session_id, None, archive, encoded)

        if not self._rewrite(session_id, work) and encoded:
            raise SessionNotFoundError(session_id)
        return len(encoded)

    def has_archived_messages(self, session_id: str) -> bool:
        """Whether the session has rows that are not live (archived or taken back)."""
        query = select(
            exists().where(_messages.c.session_id == session_id, _messages.c.active.is_(False))
        )
        return bool(self._store.read_transaction(lambda conn: conn.execute(query).scalar()))

    def rewind_to_message(self, session_id: str, target_message_id: int) -> dict[str, Any]:
        """Take back the user message ``target_message_id`` and everything after it.

        The rows stay, inactive (``get_messages(..., include_inactive=True)``
        shows them); the session's ``rewind_count`` goes up by one even when
        they were taken back already.

        Returns:
            ``rewound_count`` (rows this call made inactive), ``target_message``
            (the target row as it was, ``tool_calls`` as JSON text) and
            ``new_head_id`` (the last live row's id, or None).

        Raises:
            InvalidArgumentError: No such message in the session, or not a user message.
        """
        from hermes_orm.integrations.hermes.sessiondb import _json_text

        target_id = row_id_equal_to("target_message_id", target_message_id)

        def work(conn: Connection) -> dict[str, Any]:
            row = None
            if target_id is not None:
                row = conn.execute(
                    select(_messages).where(
                        _messages.c.id == target_id, _messages.c.session_id == session_id
                    )
                ).first()
            if row is None:
                raise InvalidArgumentError(
                    f"message {target_message_id} not found in session {session_id}"
                )
            target = self._hermes_message(row)
            if target["role"] != "user":
                raise InvalidArgumentError(
                    f"rewind target must be a 'user' message (got role={target['role']!r}, "
                    f"id={target_message_id})"
                )
            target["tool_calls"] = _json_text(target["tool_calls"])
            rewound = self._change_rows(
                conn,
                session_id,
                and_(_messages.c.idx >= row.idx, _ACTIVE),
                lambda m: m.update(active=False),
            )
            conn.execute(
                update(_sessions)
                .where(_sessions.c.id == session_id)
                .values(rewind_count=func.coalesce(_sessions.c.rewind_count, 0) + 1)
            )
            head = conn.execute(
                select(func.max(_messages.c.id)).where(
                    _messages.c.session_id == session_id, _ACTIVE
                )
            ).scalar()
            return {
                "rewound_count": len(rewound),
                "target_message": target,
                "new_head_id": None if head is None else int(head),
            }

        result: dict[str, Any] = self._rewrite(session_id, work)
        return result

    def restore_rewound(self, session_id: str, since_message_id: int) -> int:
        """Make the session's inactive rows from ``since_message_id`` on live again; how many.

        ``since_message_id`` is read as Hermes' file compares it (see
        :func:`least_row_id_from`): None names no row (as SQL's ``id >= NULL``): 0.

        Raises:
            InvalidArgumentError: ``since_message_id`` is nothing SQLite binds.
        """
        since = least_row_id_from("since_message_id", since_message_id)
        if since is None:
            return 0

        def work(conn: Connection) -> int:
            restored = self._change_rows(
                conn,
                session_id,
                and_(_messages.c.id >= since, _messages.c.active.is_(False)),
                lambda m: m.update(active=True),
            )
            return len(restored)

        count: int = self._rewrite(session_id, work)
        return count

    def set_latest_user_api_content(self, session_id: str, content: Any, api_content: str) -> int:
        """Set ``api_content`` on the newest live user message, if its content is ``content``.

        Returns how many rows changed (0 or 1): none when the newest live user
        message holds other content (the transcript changed meanwhile).
        """
        from hermes_orm.integrations.hermes.sessiondb import hermes_content

        expected = hermes_content(content)
        value = scrubbed_text(api_content)  # (append_message takes text only)

        def set_api_content(message: dict[str, Any]) -> None:
            if value is None:
                message.pop("api_content", None)
            else:
                message["api_content"] = value

        def work(conn: Connection) -> int:
            newest = conn.execute(
                select(_messages)
                .where(_messages.c.session_id == session_id, _messages.c.role == "user", _ACTIVE)
                .order_by(_messages.c.idx.desc())
                .limit(1)
            ).first()
            if newest is None or _codec.row_to_message(newest).get("content") != expected:
                return 0
            return len(
                self._change_rows(conn, session_id, _messages.c.id == newest.id, set_api_content)
            )

        count: int = self._rewrite(session_id, work, history=False)
        return count

    # -- reading around a message ---------------------------------------------------------

    def has_platform_message_id(self, session_id: str, platform_message_id: str) -> bool:
        """Whether the session holds a message with this platform message id."""
        message_key = lookup_key(platform_message_id)  # (the session id is one: see _keyed)
        if message_key is None:
            return False
        query = select(
            exists().where(
                _messages.c.session_id == session_id,
                _messages.c.platform_message_id == message_key,
            )
        )
        return bool(self._store.read_transaction(lambda conn: conn.execute(query).scalar()))

    def get_messages_around(
        self, session_id: str, around_message_id: int, window: int = 5
    ) -> dict[str, Any]:
        """Up to ``window`` messages on each side of a message, with it, in order.

        Inactive rows included. ``messages_before``/``messages_after`` count
        those returned on each side (less than ``window``: the session ends
        there); a message not in the session gives an empty window.

        Raises:
            InvalidArgumentError: ``window`` is no number.
        """
        window = _how_many("window", window)
        c = _messages.c
        around = row_id_equal_to("around_message_id", around_message_id)

        def work(conn: Connection) -> dict[str, Any]:
            anchor = None
            if around is not None:
                anchor = conn.execute(
                    select(c.idx).where(c.id == around, c.session_id == session_id)
                ).scalar()
            if anchor is None:
                return {"window": [], "messages_before": 0, "messages_after": 0}
            # Within the positions' range (32-bit ints, as the ORM rule bounds them on
            # both backends): a window past it is all.
            low, high = max(anchor - window, 0), min(anchor + window, 2**31 - 1)
            rows = conn.execute(
                select(_messages)
                .where(c.session_id == session_id, c.idx.between(low, high))
                .order_by(c.idx)
            ).all()
            return {
                "window": [self._hermes_message(r) for r in rows],
                "messages_before": sum(1 for r in rows if r.idx < anchor),
                "messages_after": sum(1 for r in rows if r.idx > anchor),
            }

        result: dict[str, Any] = self._store.read_transaction(work)
        return result

    def get_anchored_view(
        self,
        session_id: str,
        around_message_id: int,
        window: int = 5,
        bookend: int = 3,
        keep_roles: tuple[str, ...] | None = ("user", "assistant"),
    ) -> dict[str, Any]:
        """The window around a message plus the session's first and last messages (bookends).

        The window keeps the roles in ``keep_roles`` (and always the anchor);
        ``bookend_start``/``bookend_end`` are the first/last ``bookend``
        messages of those roles with text, outside the window. ``keep_roles``
        None keeps every role. A message not in the session gives empty lists.

        Raises:
            InvalidArgumentError: ``window`` or ``bookend`` is no number.
        """
        bookend = _how_many("bookend", bookend)
        around = self.get_messages_around(session_id, around_message_id, window=window)
        rows: list[dict[str, Any]] = around["window"]
        empty: dict[str, Any] = {"bookend_start": [], "bookend_end": []}
        if not rows:
            return {"window": [], "messages_before": 0, "messages_after": 0, **empty}
        keep = None if keep_roles is None else set(keep_roles)
        shown = [
            m for m in rows if keep is None or m["id"] == around_message_id or m["role"] in keep
        ]
        c = _messages.c

        def ends(conn: Connection, before: bool) -> list[dict[str, Any]]:
            edge = rows[0]["id"] if before else rows[-1]["id"]
            edge_idx = conn.execute(select(c.idx).where(c.id == edge)).scalar_one()
            query = select(_messages).where(
                c.session_id == session_id,
                c.idx < edge_idx if before else c.idx > edge_idx,
                or_(c.content != "", c.extra.is_not(None)),
            )
            if keep is not None:
                query = query.where(c.role.in_(sorted(keep)))
            query = query.order_by(c.idx if before else c.idx.desc())
            found: list[dict[str, Any]] = []
            for row in conn.execute(query):
                if len(found) == bookend:
                    break
                if _has_text(_codec.row_to_message(row)):
                    found.append(self._hermes_message(row))
            return found if before else found[::-1]

        def work(conn: Connection) -> dict[str, Any]:
            if not bookend:
                return empty
            return {"bookend_start": ends(conn, True), "bookend_end": ends(conn, False)}

        return {
            "window": shown,
            "messages_before": around["messages_before"],
            "messages_after": around["messages_after"],
            **self._store.read_transaction(work),
        }

    def list_recent_user_messages(
        self, session_id: str, limit: int = 20, include_inactive: bool = False
    ) -> list[dict[str, Any]]:
        """The newest user messages first: ``id``, ``timestamp`` and an 80-character ``preview``."""
        from hermes_orm.integrations.hermes.sessiondb import hermes_content_value

        query = select(_messages).where(
            _messages.c.session_id == session_id, _messages.c.role == "user"
        )
        if not include_inactive:
            query = query.where(_ACTIVE)
        query = query.order_by(_messages.c.idx.desc())
        size, _ = _window(limit, 0)  # a negative limit is none, as in SQLite
        if size is not None:
            query = query.limit(size)

        def work(conn: Connection) -> list[dict[str, Any]]:
            out = []
            for row in conn.execute(query):
                message = _codec.row_to_message(row)
                preview = " ".join(
                    _preview_text(hermes_content_value(message.get("content"))).split()
                )
                if len(preview) > 80:
                    preview = preview[:77] + "..."
                out.append({"id": row.id, "timestamp": row.timestamp, "preview": preview})
            return out

        return self._store.read_transaction(work)

    # -- usage ----------------------------------------------------------------------------------

    def record_auxiliary_usage(
        self,
        session_id: str,
        task: str,
        *,
        model: str | None = None,
        billing_provider: str | None = None,
        billing_base_url: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        estimated_cost_usd: float | None = None,
    ) -> None:
        """Add an auxiliary call's usage to the session's per-model usage, under ``task``.

        The session's own counters stay as they are; the session is created
        if missing. Its route is the call's own (``unknown`` model and empty
        provider when not given), never the session's.

        Raises:
            InvalidSessionError: A count, cost or text no column holds (as
                :meth:`update_token_counts` refuses it), before anything is written.
        """
        from hermes_orm.integrations.hermes.sessiondb import _count, _text_of

        if not session_id or not task:
            return
        # Checked before the session is made: what no column holds is refused first.
        route = {
            name: _text_of(name, value)
            for name, value in (
                ("task", task),
                ("model", model or "unknown"),
                ("billing_provider", billing_provider or ""),
                ("billing_base_url", billing_base_url or ""),
            )
        }
        tokens = {
            name: _count(name, value) or 0
            for name, value in (
                ("input_tokens", input_tokens),
                ("output_tokens", output_tokens),
                ("cache_read_tokens", cache_read_tokens),
                ("cache_write_tokens", cache_write_tokens),
                ("reasoning_tokens", reasoning_tokens),
            )
        }
        try:  # what Hermes' float() takes (its pricing gives a Decimal), but NaN or infinity
            cost = float(estimated_cost_usd or 0.0)
        except (TypeError, ValueError, OverflowError):
            cost = math.nan
        if not math.isfinite(cost):
            raise InvalidSessionError(
                "estimated_cost_usd must be a finite number, got "
                f"{_codec.shown(estimated_cost_usd)}"
            )
        self.ensure_session(session_id, "unknown")
        now = time.time()
        counts = {
            "api_call_count": 1,
            **tokens,
            "estimated_cost_usd": cost,
            "actual_cost_usd": 0.0,
        }

        def work(conn: Connection) -> None:
            make = _dialects.insert_maker(conn.dialect.name)
            statement = make(_usage).values(
                session_id=session_id,
                **route,
                billing_mode="",
                first_seen=now,
                last_seen=now,
                **counts,
            )
            excluded = statement.excluded
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[c.name for c in _usage.primary_key],
                    set_={
                        **{k: _usage.c[k] + excluded[k] for k in counts},
                        "last_seen": excluded.last_seen,
                    },
                )
            )

        self._write(work)

    # -- deleting -------------------------------------------------------------------------

    def _delete_picked(
        self, pick: Callable[[Connection], list[str]], sessions_dir: Path | None
    ) -> list[str]:
        """Delete the sessions ``pick`` names in its transaction (their files too); their ids.

        Raises:
            InvalidArgumentError: ``sessions_dir`` is no path (nothing is deleted).
        """
        from hermes_orm.integrations.hermes.sessiondb import _remove_session_files

        self._refuse_read_only()
        directory = sessions_dir_path(sessions_dir)
        picked: list[str] = []

        def chosen(conn: Connection) -> list[str]:
            picked[:] = pick(conn)
            return picked

        if self._store.delete_sessions(chosen) == 0:
            return []
        for session_id in picked:
            self._history_rewritten(session_id)
            _remove_session_files(directory, session_id)
        return picked

    def delete_sessions(self, session_ids: list[str], sessions_dir: Path | None = None) -> int:
        """Delete the listed sessions (and their delegate sub-agent sessions) at once.

        Ids that are not sessions, not strings or empty are skipped, as are
        ids no row can hold (with NUL or a lone surrogate); each id counts
        once; other children of a deleted session lose the link. With
        ``sessions_dir``, their transcript files there go too. Returns how
        many of the listed sessions were deleted.
        """
        ids = session_ids or ()
        wanted = sorted({sid for sid in ids if isinstance(sid, str) and lookup_key(sid)})
        if not wanted:
            return 0
        listed: list[str] = []

        def pick(conn: Connection) -> list[str]:
            # Their rows locked first (PostgreSQL), as delete_session's: in id order.
            order = _dialects.lock_order(_sessions.c.id, conn.dialect.name)
            listed[:] = [
                sid
                for some in _dialects.in_parts(wanted)
                for sid in conn.execute(
                    select(_sessions.c.id)
                    .where(_sessions.c.id.in_(some))
                    .order_by(order)
                    .with_for_update()
                ).scalars()
            ]
            return [*listed, *_delegates_of(conn, listed)] if listed else []

        return len(listed) if self._delete_picked(pick, sessions_dir) else 0

    def delete_session_if_empty(self, session_id: str, sessions_dir: Path | None = None) -> bool:
        """Delete the session if it never held anything: no message, no title, no child.

        Checked and deleted in one transaction. With ``sessions_dir``, its
        transcript files there go too. Returns whether it was deleted.
        """
        s = _sessions.c

        def pick(conn: Connection) -> list[str]:
            query = select(s.id).where(
                s.id == session_id,
                s.title.is_(None),
                ~exists().where(_messages.c.session_id == s.id),
                ~exists().where(_sessions.alias("child").c.parent_session_id == s.id),
            )
            return _picked_under_lock(conn, query)

        return bool(self._delete_picked(pick, sessions_dir))

    @staticmethod
    def _empty_where() -> list[Any]:
        s = _sessions.c
        return [s.message_count == 0, s.ended_at.is_not(None), s.archived.is_(False)]

    def count_empty_sessions(self) -> int:
        """How many sessions are ended, not archived and without messages."""
        query = select(func.count()).select_from(_sessions).where(*self._empty_where())
        return int(self._store.read_transaction(lambda conn: conn.execute(query).scalar_one()))

    def delete_empty_sessions(self, sessions_dir: Path | None = None) -> int:
        """Delete every ended, unarchived session without messages; returns how many.

        Their children lose the link; with ``sessions_dir``, their transcript
        files there go too.
        """
        query = select(_sessions.c.id).where(*self._empty_where())
        return len(self._delete_picked(lambda c: _picked_under_lock(c, query), sessions_dir))

    def prune_empty_ghost_sessions(self, sessions_dir: Path | None = None) -> int:
        """Delete ended ``tui`` sessions over a day old with no message and no title.

        Their children lose the link; with ``sessions_dir``, their transcript
        files there go too. Returns how many went.
        """
        s = _sessions.c
        query = select(s.id).where(
            s.source == "tui",
            s.title.is_(None),
            s.ended_at.is_not(None),
            s.started_at < time.time() - 86400,
            ~exists().where(_messages.c.session_id == s.id),
        )
        return len(self._delete_picked(lambda c: _picked_under_lock(c, query), sessions_dir))

    def list_prune_candidates(
        self, older_than_days: float | None = None, source: str | None = None, **filters: Any
    ) -> list[dict[str, Any]]:
        """The sessions ``prune_sessions``/``archive_sessions`` with these filters would take.

        Oldest first, each with ``id``, ``source``, ``title``, ``model``,
        ``started_at``, ``ended_at``, ``message_count`` and ``archived`` (0/1).

        Raises:
            TypeError: A filter Hermes does not have.
        """
        from hermes_orm.integrations.hermes.sessiondb import _prune_where

        if filters.get("started_before") is None and older_than_days is not None:
            filters["started_before"] = started_before(older_than_days)
        s = _sessions.c
        query = (
            select(
                s.id,
                s.source,
                s.title,
                s.model,
                s.started_at,
                s.ended_at,
                s.message_count,
                s.archived,
            )
            .where(*_prune_where(source=source, **filters))
            .order_by(s.started_at, s.id)
        )

        def work(conn: Connection) -> list[dict[str, Any]]:
            return [{**row._mapping, "archived": int(row.archived)} for row in conn.execute(query)]

        return self._store.read_transaction(work)

    # -- archiving --------------------------------------------------------------------------

    def set_session_archived(self, session_id: str, archived: bool) -> bool:
        """Archive (or unarchive) the session with its whole compression chain.

        The chain: the compressed sessions it continues, back to the root, and
        the continuations of compressed sessions after it. Returns False when
        there is no such session.
        """
        s = _sessions.c

        child = _sessions.alias("child")

        def work(conn: Connection) -> int:
            chain = {session_id}
            current = session_id
            while True:  # back through the compressed sessions it continues
                parent = conn.execute(
                    select(s.id)
                    .select_from(child.join(_sessions, s.id == child.c.parent_session_id))
                    .where(child.c.id == current, s.end_reason == "compression")
                ).scalar()
                if parent is None or parent in chain:
                    break
                chain.add(parent)
                current = parent
            frontier = [session_id]
            while frontier:  # forward through the continuations of compressed sessions
                found = conn.execute(
                    select(child.c.id)
                    .select_from(_sessions.join(child, child.c.parent_session_id == s.id))
                    .where(s.id.in_(frontier), s.end_reason == "compression")
                ).scalars()
                frontier = [sid for sid in found if sid not in chain]
                chain.update(frontier)
            statement = update(_sessions).where(s.id.in_(chain)).values(archived=bool(archived))
            return int(conn.execute(statement).rowcount)

        return self._write(work) > 0

    def archive_sessions(
        self, older_than_days: float | None = None, source: str | None = None, **filters: Any
    ) -> int:
        """Archive every session the prune filters select (unarchived ones by default).

        Each goes with its compression chain (:meth:`set_session_archived`);
        nothing is deleted. Returns how many sessions matched.

        Raises:
            TypeError: A filter Hermes does not have.
        """
        filters.setdefault("archived", False)
        rows = self.list_prune_candidates(older_than_days=older_than_days, source=source, **filters)
        for row in rows:
            self.set_session_archived(row["id"], True)
        return len(rows)

    # -- search index and space ---------------------------------------------------------

    def optimize_fts(self) -> int:
        """Merge the search indexes' pending parts; returns how many indexes were merged.

        SQLite: FTS5's ``optimize`` on both search tables (words, and the
        trigrams of CJK-like text). PostgreSQL: ``gin_clean_pending_list`` on
        both GIN search indexes (which only their owner may run). Search results
        are unchanged; an index that cannot be merged is logged and skipped.
        """
        if self._store.engine.dialect.name == "sqlite":
            statements = [
                f"INSERT INTO {t}({t}) VALUES ('optimize')" for t in _SQLITE_SEARCH_TABLES
            ]
        else:
            statements = [
                f"SELECT gin_clean_pending_list('{i}'::regclass)" for i in _PG_SEARCH_INDEXES
            ]
        merged = 0
        for statement in statements:
            try:
                self._write(_executes(statement))
            except (DBAPIError, DatabaseError) as exc:  # (the store's, for a refusal)
                logger.warning("search index merge failed (%s): %s", statement, exc)
            else:
                merged += 1
        return merged

    def rebuild_fts(self) -> int:
        """Rebuild the search index from the stored messages; returns how many indexes (2).

        SQLite: both FTS5 tables are refilled from the messages. PostgreSQL:
        every message's search body and vector are computed again and the
        search indexes reindexed (:meth:`SessionStore.rebuild_search_index`).
        """
        self._refuse_read_only()
        self._store.rebuild_search_index()
        return len(_SQLITE_SEARCH_TABLES)

    def vacuum(self) -> int:
        """Merge the search indexes, then give space back; returns :meth:`optimize_fts`'s count.

        SQLite: a WAL checkpoint, then ``VACUUM`` (the file shrinks; it waits
        for other writers). PostgreSQL: ``VACUUM (ANALYZE)`` of hermes_orm's
        tables (dead rows reclaimed, planner statistics refreshed; tables this
        user does not own are skipped by the server with a warning). Both run
        outside any transaction.
        """
        self._refuse_read_only()
        optimized = 0
        try:
            optimized = self.optimize_fts()
        except Exception as exc:  # the merge is an optimization: the vacuum still runs
            logger.warning("search index merge before VACUUM failed: %s", exc)
        engine = self._store.engine
        with self._store.connection() as pooled:
            conn = pooled.execution_options(isolation_level="AUTOCOMMIT")
            if engine.dialect.name == "sqlite":
                try:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                except DBAPIError as exc:
                    logger.debug("WAL checkpoint before VACUUM failed: %s", exc.orig)
                conn.exec_driver_sql("VACUUM")
            else:
                quote = engine.dialect.identifier_preparer.quote
                schema = self._store.schema
                prefix = "" if schema is None else f"{quote(schema)}."
                # hermes_orm's own (a host's models on its Base are the host's).
                tables = ", ".join(prefix + quote(name) for name in sorted(MODEL_TABLES))
                conn.exec_driver_sql(f"VACUUM (ANALYZE) {tables}")
        return optimized

    def maybe_auto_prune_and_vacuum(
        self,
        retention_days: int = 90,
        min_interval_hours: int = 24,
        vacuum: bool = True,
        sessions_dir: Path | None = None,
    ) -> dict[str, Any]:
        """Prune old ended sessions and vacuum, at most once per ``min_interval_hours``.

        The time of the last run is kept in the meta store
        (``last_auto_prune``); within the interval the call is skipped. The
        vacuum (:meth:`vacuum`) runs only when sessions were pruned. Never
        raises: a failure is logged and returned under ``error``.

        Returns:
            ``skipped``, ``pruned`` (sessions deleted), ``vacuumed``, and
            ``error`` when something failed.
        """
        result: dict[str, Any] = {"skipped": False, "pruned": 0, "vacuumed": False}
        try:
            now = time.time()
            last = _float_or_none(self.get_meta("last_auto_prune"))
            if last is not None and now - last < min_interval_hours * 3600:
                result["skipped"] = True
                return result
            pruned = self.prune_sessions(older_than_days=retention_days, sessions_dir=sessions_dir)
            result["pruned"] = pruned
            if vacuum and pruned > 0:
                try:
                    self.vacuum()
                    result["vacuumed"] = True
                except Exception as exc:
                    logger.warning("VACUUM after auto-prune failed: %s", exc)
            self.set_meta("last_auto_prune", str(now))
        except Exception as exc:  # maintenance never stops the caller's startup
            logger.warning("auto-maintenance failed: %s", exc)
            result["error"] = str(exc)
        return result

    # -- import ---------------------------------------------------------------------------

    def import_sessions(self, sessions: list[dict[str, Any]]) -> dict[str, Any]:
        """Import sessions as :meth:`export_session` / ``export_all`` give them.

        All or nothing: any invalid session makes the result ``ok`` False with
        its ``errors`` (index, session id, reason), and nothing is written.
        Sessions whose id exists are skipped. A parent link is kept when the
        parent exists (or is imported too) and makes no loop, else dropped
        (counted in ``detached``). Live runtime state (handoffs, rewinds,
        gateway fields) is not imported; messages are stored live, as
        :meth:`replace_messages` stores them.

        Raises:
            InvalidArgumentError: ``sessions`` is not a list, or holds too many; a title
                another session holds.
        """
        if not isinstance(sessions, list):
            raise InvalidArgumentError("sessions must be a list")
        if len(sessions) > self._IMPORT_MAX_SESSIONS:
            raise InvalidArgumentError(
                f"sessions must contain at most {self._IMPORT_MAX_SESSIONS} entries"
            )
        valid, errors = self._import_checked(sessions)
        if errors:
            return {"ok": False, "imported": 0, "skipped": 0, "detached": 0, "errors": errors}
        for _, session, _ in valid:
            self._store.forget_cursor(session["id"])
        return self._write(lambda conn: self._import_into(conn, valid))

    def _import_checked(
        self, sessions: list[Any]
    ) -> tuple[list[tuple[int, dict[str, Any], list[_codec.EncodedMessage]]], list[dict[str, Any]]]:
        """The sessions to import (index, fields, encoded messages), and what is wrong."""
        valid: list[tuple[int, dict[str, Any], list[_codec.EncodedMessage]]] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        total_messages = total_bytes = 0
        for index, raw in enumerate(sessions):
            if not isinstance(raw, dict):
                errors.append(_import_error(index, "", "session must be an object"))
                continue
            session_id = str(raw.get("id") or "").strip()
            messages = raw.get("messages") or []
            problem = None
            if not session_id:
                problem = "session id is required"
            elif session_id in seen:
                problem = "duplicate session id"
            elif not isinstance(messages, list):
                problem = "messages must be a list"
            elif len(messages) > self._IMPORT_MAX_MESSAGES_PER_SESSION:
                problem = "messages exceeds the per-session import limit"
            elif any(not isinstance(m, dict) for m in messages):
                problem = "messages must contain only objects"
            if problem is None:
                size = _json_size(raw)
                if size is None:
                    problem = "session must be JSON serializable"
                elif size > self._IMPORT_MAX_SESSION_BYTES:
                    problem = "session exceeds the import size limit"
                else:
                    total_bytes += size
                    if total_bytes > self._IMPORT_MAX_TOTAL_BYTES:
                        problem = "import exceeds the total size limit"
            if problem is None:
                try:
                    fields, encoded = self._import_session(session_id, raw, messages)
                except ValueError as exc:
                    problem = str(exc)
                else:
                    total_messages += len(encoded)
                    if total_messages > self._IMPORT_MAX_TOTAL_MESSAGES:
                        problem = "messages exceeds the total import limit"
            if problem is not None:
                errors.append(_import_error(index, session_id, problem))
                continue
            seen.add(session_id)
            valid.append((index, fields, encoded))
        return valid, errors

    @staticmethod
    def _import_session(
        session_id: str, raw: dict[str, Any], messages: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], list[_codec.EncodedMessage]]:
        """An imported session's fields and its messages, encoded.

        Raises:
            InvalidArgumentError: A field or a message that cannot be imported.
        """
        config = _json_object_or_none(raw.get("model_config"), "model_config")
        parent = _text_or_none(raw.get("parent_session_id"), "parent_session_id")
        text = {f: scrub(_text_or_none(raw.get(f), f)) for f in _IMPORT_SESSION_TEXT}
        cleaned = []
        for i, message in enumerate(messages):
            role = message.get("role")
            if not isinstance(role, str) or not role:
                raise InvalidArgumentError(f"messages[{i}].role must be a non-empty string")
            clean = dict(message)
            for key in _IMPORT_MESSAGE_TEXT:
                clean[key] = _text_or_none(message.get(key), key)
            token_count = message.get("token_count")
            try:
                clean["token_count"] = None if token_count is None else int(token_count)
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidArgumentError("token_count must be an integer") from exc
            for key in _REASONING_JSON:
                value = clean.get(key)
                if isinstance(value, str):
                    with contextlib.suppress(ValueError):
                        clean[key] = json.loads(value)
            cleaned.append(clean)
        try:
            encoded = _encode_all(cleaned)
        except InvalidMessageError as exc:  # what the store cannot hold
            key = "" if exc.key is None else f".{exc.key}"
            raise InvalidArgumentError(f"messages[{exc.index}]{key}: {exc.reason}") from None
        started = _float_or_none(raw.get("started_at"))
        fields: dict[str, Any] = {
            **text,
            "id": session_id,
            "source": text["source"] or "import",
            "model_config": scrub_json(config) or None,
            "parent_session_id": (parent or "").strip() or None,
            "started_at": time.time() if started is None else started,
            "ended_at": _float_or_none(raw.get("ended_at")),
            "estimated_cost_usd": _float_or_none(raw.get("estimated_cost_usd")),
            "actual_cost_usd": _float_or_none(raw.get("actual_cost_usd")),
            "archived": bool(raw.get("archived")),
            **{name: _int_or_default(raw.get(name)) for name in _IMPORT_COUNTERS},
        }
        # What the store checks of any session, before anything is written.
        from hermes_orm._codec import check_session_id
        from hermes_orm.store import check_fields

        try:
            check_session_id(session_id)
            check_fields({k: v for k, v in fields.items() if k != "id"})
        except InvalidSessionError as exc:
            raise InvalidArgumentError(str(exc)) from None
        return fields, encoded

    def _import_into(
        self,
        conn: Connection,
        valid: list[tuple[int, dict[str, Any], list[_codec.EncodedMessage]]],
    ) -> dict[str, Any]:
        """Write the checked sessions in ``conn``'s transaction; the import's result."""
        s = _sessions.c
        imported: list[str] = []
        skipped: list[str] = []
        links: list[tuple[str, str]] = []
        for _, fields, encoded in valid:
            session_id = fields["id"]
            if conn.execute(select(s.id).where(s.id == session_id)).first() is not None:
                skipped.append(session_id)
                continue
            title = fields["title"]
            if title is not None:
                holder = conn.execute(select(s.id).where(s.title == title)).scalar()
                if holder is not None:
                    raise InvalidArgumentError(
                        f"Title '{title}' is already in use by session {holder}"
                    )
            parent = fields["parent_session_id"]  # linked once every session is in
            # A session of the id made since the check (PostgreSQL) is skipped too; a
            # title taken since is refused as one held before.
            with _title_in_use(title):
                made = conn.execute(
                    _dialects.insert_maker(conn.dialect.name)(_sessions)
                    .values({**fields, "parent_session_id": None})
                    .on_conflict_do_nothing(index_elements=["id"])
                    .execution_options(preserve_rowcount=True)
                ).rowcount
            if made != 1:
                skipped.append(session_id)
                continue
            refuse_orphans(conn, session_id)
            if encoded:
                self._store.insert_rows(conn, session_id, 0, None, encoded, history=0)
            if parent:
                links.append((session_id, parent))
            imported.append(session_id)
        parent_of = dict(links)

        def loops(child: str, parent: str) -> bool:
            seen = {child}
            current: str | None = parent
            while current:
                if current in seen:
                    return True
                seen.add(current)
                if current in parent_of:
                    current = parent_of[current]
                    continue
                current = conn.execute(select(s.parent_session_id).where(s.id == current)).scalar()
            return False

        detached = 0
        if links:
            take_lineage_turn(conn)  # (links set meanwhile are seen by the walks below)
        for child, parent in links:
            # Not deleted before this transaction commits (PostgreSQL).
            held = select(s.id).where(s.id == parent).with_for_update(read=True, key_share=True)
            found = conn.execute(held).first() is not None
            if found and not loops(child, parent):
                conn.execute(
                    update(_sessions).where(s.id == child).values(parent_session_id=parent)
                )
            else:
                parent_of.pop(child, None)
                detached += 1
        return {
            "ok": True,
            "imported": len(imported),
            "skipped": len(skipped),
            "detached": detached,
            "imported_ids": imported,
            "skipped_ids": skipped,
            "errors": [],
        }

    # -- session metadata -------------------------------------------------------------------

    def _update_session(self, session_id: str, values: dict[str, Any]) -> None:
        def work(conn: Connection) -> None:
            conn.execute(update(_sessions).where(_sessions.c.id == session_id).values(values))

        self._write(work)

    def update_session_cwd(
        self,
        session_id: str,
        cwd: str,
        git_branch: str | None = None,
        git_repo_root: str | None = None,
    ) -> None:
        """Record the session's working directory, and its git branch and repo root if known.

        An empty branch or repo root (a failed probe) leaves the one recorded;
        an empty ``cwd`` or session id does nothing.

        Raises:
            InvalidSessionError: A value no session can hold (NUL, a lone
                surrogate, no text), before anything is written.
        """
        from hermes_orm.integrations.hermes.sessiondb import _text_of

        if not session_id or not cwd:
            return
        for name, value in (("git_branch", git_branch), ("git_repo_root", git_repo_root)):
            if value and not isinstance(value, str):  # (Hermes' strip() fails on it)
                raise InvalidSessionError(f"{name} must be text, got {_codec.shown(value)}")
        values: dict[str, Any] = {"cwd": _text_of("cwd", cwd)}
        branch = (git_branch or "").strip()
        root = (git_repo_root or "").strip()
        if branch:
            values["git_branch"] = _text_of("git_branch", branch)
        if root:
            values["git_repo_root"] = _text_of("git_repo_root", root)
        self._update_session(session_id, values)

    def backfill_repo_roots(self, cwd_to_root: dict[str, str]) -> None:
        """Give sessions without a git repo root the one resolved for their cwd.

        A recorded root is never replaced; empty roots and cwds are ignored. A
        cwd is compared as Hermes' file compares it: a number as its text, text
        with NUL or what is no text with no session's.

        Raises:
            InvalidArgumentError: A cwd with a lone surrogate (Hermes' sqlite3
                cannot encode it either).
            InvalidSessionError: A root no session can hold (NUL, a lone
                surrogate, no text), before anything is written.
        """
        from hermes_orm.integrations.hermes.sessiondb import _equal, _text_of

        s = _sessions.c
        pairs = [
            (_equal(s.cwd, cwd), _text_of("git_repo_root", root))
            for cwd, root in cwd_to_root.items()
            if cwd and root
        ]
        if not pairs:
            return

        def work(conn: Connection) -> None:
            for at_cwd, root in pairs:
                conn.execute(
                    update(_sessions)
                    .where(at_cwd, func.coalesce(s.git_repo_root, "") == "")
                    .values(git_repo_root=root)
                )

        self._write(work)

    def distinct_session_cwds(self, include_archived: bool = False) -> list[dict[str, Any]]:
        """Every non-blank session cwd: how many sessions ran there and when one last did.

        Each entry: ``cwd``, ``sessions`` and ``last_active`` (latest end, else
        start), by cwd; archived sessions count only with ``include_archived``.
        """
        s = _sessions.c
        where = [s.cwd.is_not(None), func.trim(s.cwd) != ""]
        if not include_archived:
            where.append(s.archived.is_(False))
        query = (
            select(
                s.cwd,
                func.count().label("sessions"),
                func.max(func.coalesce(s.ended_at, s.started_at, 0)).label("last_active"),
            )
            .where(*where)
            .group_by(s.cwd)
            .order_by(s.cwd)
        )

        def work(conn: Connection) -> list[dict[str, Any]]:
            return [
                {
                    "cwd": row.cwd,
                    "sessions": int(row.sessions or 0),
                    "last_active": float(row.last_active or 0),
                }
                for row in conn.execute(query)
            ]

        return self._store.read_transaction(work)

    def update_session_meta(
        self, session_id: str, model_config_json: str, model: str | None = None
    ) -> None:
        """Set the session's ``model_config`` (JSON text) and, if given, its model.

        The JSON the text holds is kept, read back as ``json.dumps`` of it (as
        Hermes' ``create_session`` writes a config); text that is not JSON is
        kept as a JSON string, read back as ``json.dumps`` of the text.

        Raises:
            InvalidSessionError: A value that is no JSON (bytes, NaN).
        """
        config: Any = model_config_json
        if isinstance(config, str):
            with contextlib.suppress(ValueError):
                config = json.loads(config)
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError):
            raise InvalidSessionError(
                f"model_config_json must be JSON text, got {type(model_config_json).__name__}"
            ) from None
        values: dict[str, Any] = {"model_config": scrub_json(config)}
        if model is not None:
            values["model"] = model
        self._update_session(session_id, values)

    def update_session_billing_route(
        self,
        session_id: str,
        *,
        provider: str,
        base_url: str,
        billing_mode: str | None = None,
    ) -> None:
        """Set the session's billing provider and base URL (and mode, if given).

        Unlike the first-wins fill of ``update_token_counts``, this overwrites
        (after a provider switch). The system prompt snapshot, which names the
        old route, is cleared so the next turn rebuilds it.
        """
        values: dict[str, Any] = {
            "billing_provider": provider,
            "billing_base_url": base_url,
            "system_prompt": None,
        }
        if billing_mode is not None:
            values["billing_mode"] = billing_mode
        self._update_session(session_id, values)
