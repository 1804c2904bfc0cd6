"""Hermes Agent's SessionDB, continued: context compression.

Locks and cooldowns, lineage, titles along a lineage, resuming.
A mixin of :class:`hermes_orm.integrations.hermes.sessiondb.SessionDB`.

A session's *lineage* is the session and its ancestors through
``parent_session_id`` (compression continuations, delegates, branches alike);
its *compression lineage* follows only the links of context compression: a
child of a session that ended with ``end_reason = "compression"``, not a
/branch child.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    Connection,
    Table,
    delete,
    func,
    literal_column,
    or_,
    select,
    update,
)

from hermes_orm import _codec, _dialects
from hermes_orm.errors import (
    DatabaseBusyError,
    DatabaseError,
    DatabaseUnavailableError,
    InvalidArgumentError,
)
from hermes_orm.integrations.hermes._gateway import _window
from hermes_orm.integrations.hermes._text import (
    ASCII_LOWER,
    ascii_like,
    like_escaped,
    lookup_key,
    scrub,
)
from hermes_orm.models import CompressionLock, Message, Session
from hermes_orm.store import on_title_races, title_race

_T = TypeVar("_T")

if TYPE_CHECKING:
    from hermes_orm.store import SessionStore

_sessions: Table = Session.__table__  # type: ignore[assignment]
_messages: Table = Message.__table__  # type: ignore[assignment]
_locks: Table = CompressionLock.__table__  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: Database failures the lock and cooldown writes report as Hermes does (a
#: warning, and the safe answer) rather than raise.
_DB_FAILURES = (DatabaseError, DatabaseBusyError, DatabaseUnavailableError)
#: Ancestors a lineage walk follows at most (a guard against malformed links).
_MAX_LINEAGE = 100
#: Descendants :meth:`LineageMethods.resolve_resume_session_id` follows at most.
_MAX_RESUME_HOPS = 32
#: Finalizing leaves a compression continuation alone for this long (seconds).
_ORPHAN_AGE = 7 * 86400
_NUMBERED = re.compile(r"^(.*?) #(\d+)$")
_NUMBER = re.compile(r"^.* #(\d+)$")


def _config(value: Any) -> dict[str, Any]:
    """A session's ``model_config`` as a dict ({} when it is none or not an object)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _is_branch(row: Any) -> bool:
    """Whether the session row is a /branch child (``model_config["_branched_from"]``)."""
    return _config(row.model_config).get("_branched_from") is not None


def _continues(row: Any) -> bool:
    """Whether a child row may continue its parent: no branch, delegate or tool run."""
    config = _config(row.model_config)
    return (
        config.get("_branched_from") is None
        and config.get("_delegate_from") is None
        and (row.source or "") != "tool"
    )


def _numbered_titles(base: str) -> Any:
    """The condition "title is ``base`` followed by `` #`` and anything".

    The prefix compares without regard to ASCII case, as Hermes' SQLite
    ``LIKE`` does; :func:`_is_numbered` makes that exact on every backend.
    """
    return ascii_like(_sessions.c.title, like_escaped(base) + " #%")


def _is_numbered(title: str | None, base: str) -> bool:
    """Whether ``title`` starts with ``base`` (ASCII case aside) and then `` #``."""
    if title is None or len(title) < len(base) + 2:
        return False
    head, tail = title[: len(base)], title[len(base) :]
    return tail.startswith(" #") and head.translate(ASCII_LOWER) == base.translate(ASCII_LOWER)


def _lineage_ids(conn: Connection, session_id: str) -> list[str]:
    """The session's ancestors and itself, root first, in one query.

    At most :data:`_MAX_LINEAGE` sessions; a cycle in the parent links ends
    the walk. A missing session (or a parent link to one) ends it too, after
    that id.
    """
    if not session_id:
        return [session_id]
    up = _sessions.alias("up")
    walk = (
        select(_sessions.c.id, _sessions.c.parent_session_id, literal_column("1").label("depth"))
        .where(_sessions.c.id == session_id)
        .cte("lineage", recursive=True)
    )
    walk = walk.union_all(
        select(up.c.id, up.c.parent_session_id, walk.c.depth + literal_column("1")).where(
            up.c.id == walk.c.parent_session_id, walk.c.depth < _MAX_LINEAGE
        )
    )
    parents = {row.id: row.parent_session_id for row in conn.execute(select(walk))}
    chain: list[str] = []
    current: str | None = session_id
    while current and current not in chain and len(chain) < _MAX_LINEAGE:
        chain.append(current)
        if current not in parents:
            break
        current = parents[current]
    return chain[::-1] or [session_id]


def _is_compression_ancestor(conn: Connection, ancestor_id: str, descendant_id: str) -> bool:
    """Whether ``ancestor_id`` precedes ``descendant_id`` through compression links.

    A link from a child to its parent counts when the parent ended with
    ``end_reason = "compression"``.
    """
    if not ancestor_id or not descendant_id or ancestor_id == descendant_id:
        return False
    parent = _sessions.alias("parent")
    hop = select(parent.c.id, parent.c.end_reason).select_from(
        _sessions.join(parent, parent.c.id == _sessions.c.parent_session_id)
    )
    seen = {descendant_id}
    current = descendant_id
    while True:
        row = conn.execute(hop.where(_sessions.c.id == current)).first()
        if row is None or row.end_reason != "compression":
            return False
        if row.id == ancestor_id:
            return True
        if row.id in seen:
            return False
        seen.add(row.id)
        current = row.id


class LineageMethods:
    """SessionDB methods on context compression."""

    if TYPE_CHECKING:
        _store: SessionStore

        def _write(self, work: Callable[[Connection], _T]) -> _T: ...

        def _refuse_read_only(self) -> None: ...

        def hermes_session(self, row: Any) -> dict[str, Any]: ...

        def _hermes_message(self, row: Any) -> dict[str, Any]: ...

        def get_compression_tip(self, session_id: str) -> str | None: ...

        list_sessions_rich: Callable[..., list[dict[str, Any]]]

    # -- compression failure cooldown and fallback streak ----------------------------------

    def record_compression_failure_cooldown(
        self, session_id: str, cooldown_until: float | None, error: str | None = None
    ) -> None:
        """Remember that compressing the session failed: no new try before ``cooldown_until``.

        Args:
            session_id: The session (nothing happens for an empty id or a missing session).
            cooldown_until: Unix time until which compression waits (None: none, as
                Hermes stores it).
            error: What failed, shown to the user.

        Raises:
            ValueError: ``cooldown_until`` is no number.
            TypeError: ``cooldown_until`` is no number.

        A database failure is logged, not raised (as in Hermes).
        """
        if not session_id:
            return
        until = None if cooldown_until is None else float(cooldown_until)
        if until is not None and math.isnan(until):
            until = None  # as Hermes' sqlite3 binds NaN: no cooldown
        # Shown to the user only: what PostgreSQL text cannot hold is replaced, not
        # refused (the cooldown would be lost with it).
        message = None if error is None else scrub(str(error)).replace("\x00", "\ufffd")

        def work(conn: Connection) -> None:
            conn.execute(
                update(_sessions)
                .where(_sessions.c.id == session_id)
                .values(compression_failure_cooldown_until=until, compression_failure_error=message)
            )

        try:
            self._write(work)
        except _DB_FAILURES as exc:
            logger.warning("record_compression_failure_cooldown(%r) failed: %s", session_id, exc)

    def get_compression_failure_cooldown(self, session_id: str) -> dict[str, Any] | None:
        """The session's compression cooldown still running, or None.

        Returns:
            ``{"cooldown_until", "remaining_seconds", "error"}``; None when there
            is none, it has run out, or there is no such session.
        """
        if not session_id:
            return None
        now = time.time()
        query = select(
            _sessions.c.compression_failure_cooldown_until, _sessions.c.compression_failure_error
        ).where(_sessions.c.id == session_id)
        row = self._store.read_transaction(lambda conn: conn.execute(query).first())
        if row is None or row.compression_failure_cooldown_until is None:
            return None
        until = float(row.compression_failure_cooldown_until)
        if until <= now:
            return None
        return {
            "cooldown_until": until,
            "remaining_seconds": until - now,
            "error": row.compression_failure_error,
        }

    def clear_compression_failure_cooldown(self, session_id: str) -> None:
        """Forget the session's compression cooldown (a database failure is logged, not raised)."""
        if not session_id:
            return

        def work(conn: Connection) -> None:
            conn.execute(
                update(_sessions)
                .where(_sessions.c.id == session_id)
                .values(compression_failure_cooldown_until=None, compression_failure_error=None)
            )

        try:
            self._write(work)
        except _DB_FAILURES as exc:
            logger.warning("clear_compression_failure_cooldown(%r) failed: %s", session_id, exc)

    def get_compression_fallback_streak(self, session_id: str) -> int:
        """How many compressions in a row fell back to the deterministic summary (0 if none)."""
        if not session_id:
            return 0
        query = select(_sessions.c.compression_fallback_streak).where(_sessions.c.id == session_id)
        value = self._store.read_transaction(lambda conn: conn.execute(query).scalar())
        return max(0, int(value or 0))

    def set_compression_fallback_streak(self, session_id: str, streak: int) -> None:
        """Store the session's fallback streak (negative values as 0).

        Raises:
            ValueError: ``streak`` is no integer.
            TypeError: ``streak`` is no integer.
            InvalidArgumentError: ``streak`` is past what a 64-bit column holds.
        """
        if not session_id:
            return
        normalized = max(0, int(streak))
        if normalized >= 2**63:
            raise InvalidArgumentError(f"a fallback streak past 64 bits: {normalized}")

        def work(conn: Connection) -> None:
            conn.execute(
                update(_sessions)
                .where(_sessions.c.id == session_id)
                .values(compression_fallback_streak=normalized)
            )

        self._write(work)

    # -- compression locks ------------------------------------------------------------------

    def try_acquire_compression_lock(
        self, session_id: str, holder: str, ttl_seconds: float = 300.0
    ) -> bool:
        """Take the session's compression lock for ``ttl_seconds``, if no one else holds it.

        One transaction removes an expired lock, inserts this one unless a lock
        is there, and reads who holds it: among concurrent callers (threads or
        processes, SQLite or PostgreSQL) exactly one gets True. A holder asking
        again while it holds the lock gets True (its expiry unchanged).

        Returns:
            True when ``holder`` now holds the lock (and must release it); False
            when another holder does, for an empty session id or holder None,
            or when the database failed (logged).
        """
        if not session_id or holder is None:
            return False
        holder = _holder(holder)
        now = time.time()
        expires_at = now + float(ttl_seconds)
        if math.isnan(expires_at):
            return False  # Hermes' file stores no such lock (NaN binds as NULL)

        def work(conn: Connection) -> bool:
            conn.execute(
                delete(_locks).where(_locks.c.session_id == session_id, _locks.c.expires_at < now)
            )
            make = _dialects.insert_maker(conn.dialect.name)
            conn.execute(
                make(_locks)
                .values(
                    session_id=session_id, holder=holder, acquired_at=now, expires_at=expires_at
                )
                .on_conflict_do_nothing(index_elements=["session_id"])
            )
            owner = conn.execute(
                select(_locks.c.holder).where(_locks.c.session_id == session_id)
            ).scalar()
            return owner == holder

        try:
            return self._write(work)
        except _DB_FAILURES as exc:
            logger.warning("try_acquire_compression_lock(%r) failed: %s", session_id, exc)
            return False

    def refresh_compression_lock(
        self, session_id: str, holder: str, ttl_seconds: float = 300.0
    ) -> bool:
        """Extend the lock to ``ttl_seconds`` from now, if ``holder`` still holds it unexpired.

        Returns:
            Whether it did (False too when the database failed, logged).
        """
        if not session_id or not holder:
            return False
        holder = _holder(holder)
        now = time.time()
        expires_at = now + float(ttl_seconds)
        if math.isnan(expires_at):
            return False  # Hermes' file stores no NaN expiry (it binds as NULL)

        def work(conn: Connection) -> bool:
            statement = (
                update(_locks)
                .where(
                    _locks.c.session_id == session_id,
                    _locks.c.holder == holder,
                    _locks.c.expires_at >= now,
                )
                .values(expires_at=expires_at)
            )
            return int(conn.execute(statement).rowcount) > 0

        try:
            return self._write(work)
        except _DB_FAILURES as exc:
            logger.warning("refresh_compression_lock(%r) failed: %s", session_id, exc)
            return False

    def release_compression_lock(self, session_id: str, holder: str) -> None:
        """Release the session's lock if ``holder`` holds it; else nothing happens.

        A database failure is logged, not raised: the lock then expires.
        """
        if not session_id or holder is None:
            return

        def work(conn: Connection) -> None:
            conn.execute(
                delete(_locks).where(
                    _locks.c.session_id == session_id, _locks.c.holder == str(holder)
                )
            )

        try:
            self._write(work)
        except _DB_FAILURES as exc:
            logger.warning("release_compression_lock(%r) failed: %s", session_id, exc)

    def get_compression_lock_holder(self, session_id: str) -> str | None:
        """Who holds the session's unexpired compression lock, or None."""
        if not session_id:
            return None
        query = select(_locks.c.holder).where(
            _locks.c.session_id == session_id, _locks.c.expires_at >= time.time()
        )
        return self._store.read_transaction(lambda conn: conn.execute(query).scalar())

    # -- lineage ----------------------------------------------------------------------------

    def get_conversation_root(self, session_id: str) -> str:
        """The root of the session's lineage (itself when it has no parent): one query."""
        chain = self._store.read_transaction(lambda conn: _lineage_ids(conn, session_id))
        return chain[0] if chain and chain[0] else session_id

    def _compression_lineage(self, conn: Connection, session_id: str) -> list[str]:
        """:meth:`get_compression_lineage` in ``conn``."""
        c = _sessions.c
        fields = select(c.id, c.parent_session_id, c.end_reason, c.model_config, c.started_at)
        session = conn.execute(fields.where(c.id == session_id)).first()
        if session is None:
            return []
        if _is_branch(session):
            return [session_id]
        root, seen = session, {session.id}
        while root.parent_session_id is not None and not _is_branch(root):
            parent = conn.execute(fields.where(c.id == root.parent_session_id)).first()
            if parent is None or parent.end_reason != "compression" or parent.id in seen:
                break
            root = parent
            seen.add(root.id)
        lineage = [root.id]
        current = root
        while current.end_reason == "compression":
            children = conn.execute(
                fields.where(c.parent_session_id == current.id).order_by(c.started_at, c.id)
            ).all()
            follower = next((child for child in children if not _is_branch(child)), None)
            if follower is None or follower.id in lineage:
                break
            lineage.append(follower.id)
            current = follower
        return lineage if session_id in lineage else [session_id]

    def get_compression_lineage(self, session_id: str) -> list[str]:
        """The session's compression lineage, oldest first, the session included.

        Walks up while the parent ended with ``"compression"``, then down from
        that root, at each compressed session to its earliest-started child
        that is no /branch child. A /branch child is a lineage of its own
        (``[session_id]``); a missing session gives ``[]``. Cycles end the walk.
        """
        return self._store.read_transaction(
            lambda conn: self._compression_lineage(conn, session_id)
        )

    def export_session_lineage(self, session_id: str) -> dict[str, Any] | None:
        """The session's compression lineage exported as one session, or None if missing.

        The newest segment's fields, with ``segments`` (each segment's export:
        session and active messages), ``lineage_session_ids``, every segment's
        ``messages`` in order, and ``message_count`` their number. Read in one
        transaction.
        """
        by_session = _messages.c.session_id

        def work(conn: Connection) -> dict[str, Any] | None:
            segments = []
            for sid in self._compression_lineage(conn, session_id):
                row = conn.execute(select(_sessions).where(_sessions.c.id == sid)).first()
                if row is None:
                    continue
                query = (
                    select(_messages)
                    .where(by_session == sid, func.coalesce(_messages.c.active, True).is_(True))
                    .order_by(_messages.c.idx)
                )
                messages = [self._hermes_message(m) for m in conn.execute(query)]
                segments.append({**self.hermes_session(row), "messages": messages})
            if not segments:
                return None
            every = [message for segment in segments for message in segment["messages"]]
            return {
                **segments[-1],
                "segments": segments,
                "lineage_session_ids": [segment["id"] for segment in segments],
                "message_count": len(every),
                "messages": every,
            }

        return self._store.read_transaction(work)

    def finalize_orphaned_compression_sessions(self) -> int:
        """End compression continuations left open: ``end_reason = "orphaned_compression"``.

        Targets sessions started over 7 days ago, still open (no ``ended_at``,
        no ``end_reason``), with messages, no API call, and a parent that ended
        with ``"compression"``. Their messages stay. Returns how many it ended.
        """
        s = _sessions
        parent = _sessions.alias("parent")
        parent_compressed = (
            select(parent.c.id)
            .where(
                parent.c.id == s.c.parent_session_id,
                parent.c.end_reason == "compression",
                parent.c.ended_at.is_not(None),
            )
            .exists()
        )
        has_messages = select(_messages.c.id).where(_messages.c.session_id == s.c.id).exists()

        def work(conn: Connection) -> int:
            now = time.time()
            statement = (
                update(s)
                .where(
                    s.c.api_call_count == 0,
                    s.c.end_reason.is_(None),
                    s.c.ended_at.is_(None),
                    s.c.started_at < now - _ORPHAN_AGE,
                    s.c.parent_session_id.is_not(None),
                    parent_compressed,
                    has_messages,
                )
                .values(ended_at=now, end_reason="orphaned_compression")
            )
            return int(conn.execute(statement).rowcount)

        return self._write(work)

    # -- resuming ---------------------------------------------------------------------------

    def resolve_resume_session_id(self, session_id: str) -> str:
        """The session a resume of ``session_id`` should load: where its messages went on.

        First the live end of its compression chain (``get_compression_tip``),
        then, from there, down the most recently started children that may
        continue it (no /branch, delegate or tool runs; at most 32): the last
        of those holding messages, else the tip. Database failures give the
        id reached so far (logged), as in Hermes.
        """
        if not session_id:
            return session_id
        try:
            start = self.get_compression_tip(session_id) or session_id
        except _DB_FAILURES as exc:
            logger.warning("resolve_resume_session_id(%r): %s", session_id, exc)
            start = session_id
        c = _sessions.c

        def work(conn: Connection) -> str:
            current, seen, best = start, {start}, None
            for _ in range(_MAX_RESUME_HOPS):
                held = select(_messages.c.id).where(_messages.c.session_id == current).limit(1)
                if conn.execute(held).first() is not None:
                    best = current
                children = [
                    child
                    for child in conn.execute(
                        select(c.id, c.model_config, c.source, c.started_at).where(
                            c.parent_session_id == current
                        )
                    )
                    if _continues(child)
                ]
                if not children:
                    break
                latest = max(children, key=lambda child: (child.started_at, child.id))
                if latest.id in seen:
                    break
                seen.add(latest.id)
                current = latest.id
            return best if best is not None else start

        try:
            return self._store.read_transaction(work)
        except _DB_FAILURES as exc:
            logger.warning("resolve_resume_session_id(%r): %s", session_id, exc)
            return start

    @staticmethod
    def _is_duplicate_replayed_user_message(
        messages: list[dict[str, Any]], msg: dict[str, Any]
    ) -> bool:
        """Whether ``msg`` repeats a user prompt already there since the last answer.

        A resumed session replays its last user prompt; on a lineage read the
        copy is left out. True when ``msg`` is a user message with text that
        an earlier user message has, with no assistant answer (content or tool
        calls) between them.
        """
        if msg.get("role") != "user":
            return False
        content = msg.get("content")
        if not isinstance(content, str) or not content:
            return False
        for previous in reversed(messages):
            if previous.get("role") == "user" and previous.get("content") == content:
                return True
            if previous.get("role") == "assistant" and (
                previous.get("content") or previous.get("tool_calls")
            ):
                return False
        return False

    def _conversation(
        self, rows: list[dict[str, Any]], *, include_ancestors: bool, repair_alternation: bool
    ) -> list[dict[str, Any]]:
        """Message rows (Hermes' shape, in id order) as the agent replays them.

        The same projection as ``get_messages_as_conversation``, with Hermes
        Agent's content clean-ups (it must be installed).
        """
        import hermes_state
        from agent.memory_manager import sanitize_context

        from hermes_orm.integrations.hermes.sessiondb import _TEXT_JSON_MESSAGE

        messages: list[dict[str, Any]] = []
        for row in rows:
            content = row["content"]
            if row["role"] in {"user", "assistant"} and isinstance(content, str):
                content = sanitize_context(content).strip()
            msg: dict[str, Any] = {"role": row["role"], "content": content}
            for column, key in (
                ("api_content", "api_content"),
                ("timestamp", "timestamp"),
                ("tool_call_id", "tool_call_id"),
                ("tool_name", "tool_name"),
                ("effect_disposition", "effect_disposition"),
                ("tool_calls", "tool_calls"),
                ("platform_message_id", "message_id"),
            ):
                if row[column]:
                    msg[key] = row[column]
            if row["observed"]:
                msg["observed"] = True
            if row["role"] == "assistant":
                for column in ("finish_reason", "reasoning"):
                    if row[column]:
                        msg[column] = row[column]
                if row["reasoning_content"] is not None:
                    msg["reasoning_content"] = row["reasoning_content"]
                for column in _TEXT_JSON_MESSAGE:
                    if row[column]:
                        try:
                            msg[column] = json.loads(row[column])
                        except (ValueError, TypeError):  # as Hermes: text another tool wrote
                            msg[column] = None
            if include_ancestors and self._is_duplicate_replayed_user_message(messages, msg):
                continue
            messages.append(msg)
        messages = hermes_state._strip_background_review_harness(messages)
        if repair_alternation and messages:
            from agent.agent_runtime_helpers import repair_message_sequence

            repair_message_sequence(None, messages)
        return messages

    def _lineage_rows(self, session_id: str) -> tuple[list[str], list[dict[str, Any]]]:
        """The session's lineage (root first) and its active messages in id order, one read."""

        def work(conn: Connection) -> tuple[list[str], list[dict[str, Any]]]:
            lineage = _lineage_ids(conn, session_id)
            query = (
                select(_messages)
                .where(
                    _messages.c.session_id.in_(lineage),
                    func.coalesce(_messages.c.active, True).is_(True),
                )
                .order_by(_messages.c.id)
            )
            return lineage, [self._hermes_message(row) for row in conn.execute(query)]

        return self._store.read_transaction(work)

    def get_resume_conversations(
        self, session_id: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(model_history, display_history)`` of a resume, from one read.

        ``model_history`` equals ``get_messages_as_conversation(session_id,
        repair_alternation=True)``, ``display_history`` equals
        ``get_messages_as_conversation(session_id, include_ancestors=True)``;
        both come from the same snapshot.
        """
        _, rows = self._lineage_rows(session_id)
        own = [row for row in rows if row["session_id"] == session_id]
        model_history = self._conversation(own, include_ancestors=False, repair_alternation=True)
        display_history = self._conversation(rows, include_ancestors=True, repair_alternation=False)
        return model_history, display_history

    def get_ancestor_display_prefix(self, session_id: str) -> list[dict[str, Any]]:
        """The display messages of the session's ancestors only ([] without ancestors).

        What ``get_messages_as_conversation(session_id, include_ancestors=True)``
        shows before the session's own messages: the ancestors' active
        messages, replayed prompts left out.
        """
        lineage, rows = self._lineage_rows(session_id)
        if len(lineage) <= 1:
            return []
        theirs = [row for row in rows if row["session_id"] != session_id]
        if not theirs:
            return []
        return self._conversation(theirs, include_ancestors=True, repair_alternation=False)

    # -- titles along a lineage -------------------------------------------------------------

    def resolve_session_by_title(self, title: str) -> str | None:
        """The session a title names, preferring the newest numbered continuation.

        When sessions titled ``"<title> #<anything>"`` exist, the most recently
        started of them; else the session titled exactly ``title``; else None.
        The numbered prefix compares without regard to ASCII case, as in Hermes.
        The title is read as ``get_session_by_title`` reads it: a number as its
        text; text with NUL or a lone surrogate, or what is no text, names none
        (no stored title holds it).
        """
        c = _sessions.c
        key = lookup_key(title)
        if key is None:
            return None

        def work(conn: Connection) -> str | None:
            numbered = conn.execute(
                select(c.id, c.title)
                .where(_numbered_titles(key))
                .order_by(c.started_at.desc(), c.id.desc())
            ).all()
            for row in numbered:
                if _is_numbered(row.title, key):
                    return str(row.id)
            exact = conn.execute(select(c.id).where(c.title == key).limit(1)).scalar()
            return None if exact is None else str(exact)

        return self._store.read_transaction(work)

    def get_next_title_in_lineage(self, base_title: str) -> str:
        """The title for the next continuation: ``"<base> #<highest number + 1>"``.

        A ``" #N"`` suffix of ``base_title`` is dropped first; the base alone
        counts as #1, so the first continuation gets #2. When no session has
        the base title or a numbered one (none has a title with NUL or a lone
        surrogate), the base itself.

        Raises:
            InvalidArgumentError: ``base_title`` is no text (Hermes' regex raises a
                TypeError).
        """
        if not isinstance(base_title, str):
            raise InvalidArgumentError(f"base_title must be text, got {_codec.shown(base_title)}")
        match = _NUMBERED.match(base_title)
        base = match.group(1) if match else base_title
        if lookup_key(base) is None:
            return base
        c = _sessions.c

        def work(conn: Connection) -> list[str]:
            query = select(c.title).where(or_(c.title == base, _numbered_titles(base)))
            return [t for t in conn.execute(query).scalars() if t == base or _is_numbered(t, base)]

        existing = self._store.read_transaction(work)
        if not existing:
            return base
        highest = 1
        for title in existing:
            number = _NUMBER.match(title)
            if number:
                highest = max(highest, int(number.group(1)))
        return f"{base} #{highest + 1}"

    def set_session_title(self, session_id: str, title: str) -> bool:
        """Set (or, with an empty title, clear) the title; False for a missing session.

        A compressed ancestor of the session holding the title gives it up (it is
        hidden from the session list: the user could not free it otherwise).

        Raises:
            ValueError: Too long, used by another session, or no text.
        """
        return self._set_title(session_id, title, only_if_empty=False)

    def set_auto_title_if_empty(self, session_id: str, title: str) -> bool:
        """Set a generated title only while the session has none, in one transaction.

        The title is cleaned, and taken from a compressed ancestor, as by
        ``set_session_title``.

        Returns:
            True when the title was set; False for a session that has a title
            or does not exist.

        Raises:
            ValueError: The title is too long, another session has it, or it is no text.
        """
        return self._set_title(session_id, title, only_if_empty=True)

    def _set_title(self, session_id: str, title: str, *, only_if_empty: bool) -> bool:
        from hermes_orm.integrations.hermes.sessiondb import sanitize_title

        cleaned = sanitize_title(title)
        c = _sessions.c

        def work(conn: Connection) -> bool:
            if only_if_empty:
                current = conn.execute(select(c.title).where(c.id == session_id)).first()
                if current is None or current.title is not None:
                    return False
            if cleaned:
                holder = conn.execute(
                    select(c.id).where(c.title == cleaned, c.id != session_id)
                ).scalar()
                if holder is not None:
                    if not _is_compression_ancestor(conn, holder, session_id):
                        raise InvalidArgumentError(
                            f"Title '{cleaned}' is already in use by session {holder}"
                        )
                    conn.execute(update(_sessions).where(c.id == holder).values(title=None))
            statement = update(_sessions).where(c.id == session_id)
            if only_if_empty:
                statement = statement.where(c.title.is_(None))
            return int(conn.execute(statement.values(title=cleaned)).rowcount) > 0

        try:
            return on_title_races(lambda: self._write(work))
        except DatabaseError as exc:
            if not title_race(exc):
                raise
            raise InvalidArgumentError(
                f"Title '{cleaned}' is already in use by another session (taken as it was set)"
            ) from exc

    # -- search -----------------------------------------------------------------------------

    def search_sessions_by_id(
        self, query: str, limit: int = 20, include_archived: bool = True
    ) -> list[dict[str, Any]]:
        """Listed sessions whose id (or compression chain's ids) contain ``query``.

        Case-insensitive. Entries are ``list_sessions_rich`` rows (a compressed
        conversation shows as its live continuation, with ``_lineage_root_id``);
        exact id matches come first, then prefix matches, then the rest, each
        group most recently active first.

        Raises:
            InvalidArgumentError: ``query`` is no text, or ``limit`` no integer
                (as ``list_sessions_rich`` reads it; Hermes raises an
                AttributeError or a TypeError).
        """
        if query and not isinstance(query, str):
            raise InvalidArgumentError(f"query must be text, got {_codec.shown(query)}")
        needle = (query or "").strip().lower()
        if needle:
            _window(limit, 0)  # (one that is no integer: refused as list_sessions_rich refuses it)
            limit = int(limit)
        if not needle or limit <= 0:
            return []
        candidates = self.list_sessions_rich(
            limit=max(limit * 4, limit),
            offset=0,
            include_archived=include_archived,
            order_by_last_active=True,
            id_query=needle,
        )

        def rank(entry: dict[str, Any]) -> int:
            ids = [str(entry.get(key) or "").lower() for key in ("id", "_lineage_root_id")]
            ids = [value for value in ids if value]
            if needle in ids:
                return 0
            return 1 if any(value.startswith(needle) for value in ids) else 2

        order = sorted(range(len(candidates)), key=lambda i: (rank(candidates[i]), i))
        return [candidates[i] for i in order[:limit]]


def _holder(holder: Any) -> str:
    """A compression lock's holder, as its text.

    Raises:
        InvalidArgumentError: It holds NUL or a lone surrogate, which PostgreSQL
            text cannot hold (nor Hermes' sqlite3 encode).
    """
    text = str(holder)
    problem = _codec.text_problem(text)
    if problem is not None:
        raise InvalidArgumentError(f"a compression lock's holder {problem}: {_codec.shown(text)}")
    return text
