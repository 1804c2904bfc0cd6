"""Hermes Agent's ``SessionDB`` API on top of :class:`SessionStore`.

Code written against ``hermes_state.SessionDB`` (hermes-agent 0.19) keeps its
calls and gets the same return shapes, on any database hermes_orm runs on:
session dicts with Hermes' ``sessions`` columns, message dicts with Hermes'
``messages`` columns (``content`` and ``tool_calls`` decoded, the other JSON
columns as JSON text, flags as 0/1), ids and counts as Hermes gives them.

Every public method of Hermes' class is here: sessions and messages in this
module; context compression (locks, cooldowns, lineage, titles, resuming) in
``_lineage``; gateways (routing, peers, handoffs, Telegram topics, cron runs) in
``_gateway``; rewrites, deletes, pruning, imports and maintenance in ``_upkeep``.
Hermes' own SessionDB tests run against it on both backends
(``tests/test_hermes_suite.py``), and the calls are compared with the real
class (``tests/test_hermes_sessiondb.py``). Known differences: ``search_messages``
reads queries with hermes_orm's language, orders hits newest first where Hermes
ranks by relevance, and makes its own snippets; lone surrogates inside a
message's JSON values become U+FFFD (Hermes keeps them escaped, see ``_text``);
``create_session`` on an existing session also fills a missing ``user_id``; a
session's ``message_count`` counts its archived (compacted) rows too, its
``tool_call_count`` the tool calls of live rows only (Hermes' still counts a
rewound turn's); roles are
those hermes_orm stores; no write triggers a search-index optimize (none is
needed). Numbers given for text fields are stored as Hermes' SQLite file stores
them (see ``_text``); values no column here holds are refused (the README lists
them).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import operator
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Table, delete, false, func, or_, select, update

from hermes_orm import _codec, _dialects
from hermes_orm import search as _search
from hermes_orm._codec import check_session_id
from hermes_orm.errors import (
    DatabaseError,
    DatabaseUnavailableError,
    InvalidArgumentError,
    InvalidSessionError,
    SearchQueryError,
    SessionNotFoundError,
)
from hermes_orm.integrations.hermes._gateway import GatewayMethods, _window
from hermes_orm.integrations.hermes._hermes_sql import HermesConnection
from hermes_orm.integrations.hermes._lineage import LineageMethods
from hermes_orm.integrations.hermes._text import (
    ascii_like,
    ascii_lower,
    has_lone_surrogate,
    hermes_json,
    like_escaped,
    lookup_key,
    message_json,
    scrub,
    scrub_json,
    scrubbed_text,
    sqlite_integer,
    sqlite_text,
)
from hermes_orm.integrations.hermes._upkeep import (
    UpkeepMethods,
    _delegates_of,
    _picked_under_lock,
    started_before,
)
from hermes_orm.models import MODEL_USAGE_KEY, Message, Meta, ModelUsage, Session, new_history_id
from hermes_orm.store import SessionStore

_T = TypeVar("_T")

_sessions: Table = Session.__table__  # type: ignore[assignment]
_messages: Table = Message.__table__  # type: ignore[assignment]
_meta: Table = Meta.__table__  # type: ignore[assignment]
_usage: Table = ModelUsage.__table__  # type: ignore[assignment]

#: Hermes Agent's ``sessions`` columns (state.db schema v22), in its order.
SESSION_COLUMNS = (
    "id", "source", "user_id", "session_key", "chat_id", "chat_type", "thread_id",
    "display_name", "origin_json", "expiry_finalized", "model", "model_config",
    "system_prompt", "parent_session_id", "started_at", "ended_at", "end_reason",
    "message_count", "tool_call_count", "input_tokens", "output_tokens",
    "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "cwd", "git_branch",
    "git_repo_root", "billing_provider", "billing_base_url", "billing_mode",
    "estimated_cost_usd", "actual_cost_usd", "cost_status", "cost_source", "pricing_version",
    "title", "api_call_count", "handoff_state", "handoff_platform", "handoff_error",
    "compression_failure_cooldown_until", "compression_failure_error",
    "compression_fallback_streak", "profile_name", "rewind_count", "archived",
)  # fmt: skip
#: Hermes Agent's ``messages`` columns, in its order.
MESSAGE_COLUMNS = (
    "id", "session_id", "role", "content", "tool_call_id", "tool_calls", "tool_name",
    "effect_disposition", "timestamp", "token_count", "finish_reason", "reasoning",
    "reasoning_content", "reasoning_details", "codex_reasoning_items",
    "codex_message_items", "platform_message_id", "observed", "active", "compacted",
    "api_content",
)  # fmt: skip
_FLAG_SESSION = ("expiry_finalized", "archived")
_TEXT_JSON_MESSAGE = ("reasoning_details", "codex_reasoning_items", "codex_message_items")
_FLAG_MESSAGE = ("observed", "active", "compacted")
#: Fields ``create_session`` takes besides id and source (Hermes' keyword arguments).
_CREATE_FIELDS = (
    "model", "model_config", "system_prompt", "user_id", "session_key", "chat_id",
    "chat_type", "thread_id", "parent_session_id", "cwd", "profile_name",
)  # fmt: skip
MAX_TITLE_LENGTH = 100
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_INVISIBLE = re.compile(r"[\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufffc\ufff9-\ufffb]")
#: What Hermes puts before structured content it keeps as JSON text.
CONTENT_JSON_PREFIX = "\x00json:"


def hermes_content(content: Any) -> Any:
    """A message's ``content`` as this adapter stores it, where Hermes stores it as text.

    Text and None are stored as they are (lone surrogates replaced); a list of
    parts as Hermes reads back the JSON it writes of it (:func:`hermes_json`;
    one JSON cannot write, as its text, as Hermes does); a number as the text
    Hermes' text column makes of it; any other JSON value (a dict) as Hermes
    writes it, :data:`CONTENT_JSON_PREFIX` and its JSON, which
    :func:`hermes_content_value` reads back.
    """
    if content is None or isinstance(content, str | bytes):
        return scrub(content)  # bytes: refused by the store, no column holds them
    if isinstance(content, list | tuple):
        try:
            return scrub_json(hermes_json(content))
        except (TypeError, ValueError):
            return scrub(str(content))
    if isinstance(content, bool | int | float):
        return sqlite_text(content)
    try:
        return CONTENT_JSON_PREFIX + json.dumps(content)
    except (TypeError, ValueError):
        return scrub(str(content))


def hermes_content_value(content: Any) -> Any:
    """A stored ``content`` as Hermes returns it: JSON text behind the prefix decoded."""
    if isinstance(content, str) and content.startswith(CONTENT_JSON_PREFIX):
        try:
            return json.loads(content[len(CONTENT_JSON_PREFIX) :])
        except ValueError:
            return content
    return content


def sanitize_title(title: str | None) -> str | None:
    """Clean a title as Hermes does; None for an empty one.

    Raises:
        InvalidArgumentError: Longer than :data:`MAX_TITLE_LENGTH` once cleaned.
        InvalidSessionError: No text (Hermes' regex raises a TypeError).
    """
    if not title:
        return None
    if not isinstance(title, str):
        raise InvalidSessionError(f"a title must be text, got {_codec.shown(title)}")
    cleaned = _INVISIBLE.sub("", _CONTROL.sub("", scrub(title)))
    cleaned = re.sub(r"\s+", " ", cleaned).strip()
    if not cleaned:
        return None
    if len(cleaned) > MAX_TITLE_LENGTH:
        raise InvalidArgumentError(f"Title too long ({len(cleaned)} chars, max {MAX_TITLE_LENGTH})")
    return cleaned


def _json_text(value: Any) -> str | None:
    """A JSON column as Hermes returns it: the text ``json.dumps`` wrote.

    A string too (Hermes stores ``json.dumps("text")``, ``'"text"'``, and reads
    it back so); an import keeps the value Hermes' JSON held, or the text where
    it held none.
    """
    if value is None:
        return None
    return json.dumps(value)


#: What a compressed conversation's listing entry takes from its live continuation.
_TIP_KEYS = (
    "id", "ended_at", "end_reason", "message_count", "tool_call_count", "title",
    "last_active", "preview", "model", "system_prompt", "cwd", "git_branch", "git_repo_root",
)  # fmt: skip


def _hermes_content_text(message: dict[str, Any]) -> str | None:
    """The ``content`` text Hermes would hold for a message (structured: its JSON form)."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content
    return "\x00json:" + json.dumps(content)


def _hermes_search_query(query: str) -> str:
    """Hermes' FTS5 exclusion (``a NOT b``) in hermes_orm's spelling (``a -b``).

    ``AND`` (implied anyway) is dropped, and so is an operator (any case) that
    begins or ends the query, as Hermes' sanitizer drops it (``NOT deploy`` is
    ``deploy``).
    """
    query = re.sub(r"(?i)^(AND|OR|NOT)\b\s*", "", query.strip())
    query = re.sub(r"(?i)\s+(AND|OR|NOT)\s*$", "", query.strip())
    query = re.sub(r"(?<![^\s(])NOT\s+(?=\S)", "-", query)
    return re.sub(r"(?<!\S)AND(?!\S)", " ", query)


def _preview(message: dict[str, Any]) -> str:
    """A message's text as Hermes shows it around a search hit (200 characters).

    Structured content kept as JSON text (:data:`CONTENT_JSON_PREFIX`) is the
    value Hermes reads back, which it shows as no text.
    """
    content = hermes_content_value(message.get("content"))
    if isinstance(content, list):
        texts = [
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        ]
        preview = " ".join(t for t in texts if t).strip() or "[multimodal content]"
    else:
        preview = content if isinstance(content, str) else ""
    return preview[:200]


def _previews(conn: Connection, session_ids: list[str]) -> dict[str, str]:
    """Each session's first user message (by time, then insertion), as Hermes previews it."""
    from hermes_orm._codec import row_to_message

    previews: dict[str, str] = {}
    rows = (
        row
        for some in _dialects.in_parts(session_ids)  # (a listing of every session: many)
        for row in conn.execute(
            select(_messages)
            .where(_messages.c.session_id.in_(some), _messages.c.role == "user")
            .order_by(_messages.c.session_id, _messages.c.timestamp, _messages.c.id)
        )
    )
    for row in rows:
        if row.session_id in previews:
            continue
        text = _hermes_content_text(row_to_message(row))
        if text is None:
            continue
        # SQLite's text functions, which Hermes previews with, stop at a NUL.
        text = text.split("\x00", 1)[0]
        raw = text.replace("\n", " ").replace("\r", " ")[:63].strip()
        previews[row.session_id] = raw[:60] + ("..." if len(raw) > 60 else "") if raw else ""
    return previews


#: Hits whose details one statement reads (an OR of a condition each: SQLite's
#: expression trees are at most 1,000 deep).
_SEARCH_DETAILS_BATCH = 200
#: The LIMIT of a search in time order asked for every hit (SQLite's LIMIT -1).
_EVERY_HIT = 2**62


class _Sessions:
    """Every session row and its last activity, for lineage walks done in Python."""

    def __init__(self, rows: dict[str, Any], last: dict[str, float]) -> None:
        self.rows, self.last = rows, last
        self.children: dict[str, list[Any]] = {}
        for row in rows.values():
            if row.parent_session_id is not None:
                self.children.setdefault(row.parent_session_id, []).append(row)

    @classmethod
    def load(cls, conn: Connection) -> _Sessions:
        rows = {r.id: r for r in conn.execute(select(_sessions))}
        newest = select(_messages.c.session_id, func.max(_messages.c.timestamp)).group_by(
            _messages.c.session_id
        )
        return cls(rows, {sid: ts for sid, ts in conn.execute(newest) if ts is not None})

    def last_active(self, session_id: str) -> float:
        found = self.last.get(session_id)
        return float(found if found is not None else self.rows[session_id].started_at)

    def continuations(self, session_id: str) -> list[Any]:
        """Children that continue a compressed session (no branches, delegates, tools)."""
        parent = self.rows.get(session_id)
        if parent is None or parent.end_reason != "compression":
            return []
        out = []
        for child in self.children.get(session_id, []):
            config = child.model_config if isinstance(child.model_config, dict) else {}
            if config.get("_branched_from") is not None:
                continue
            if config.get("_delegate_from") is not None or (child.source or "") == "tool":
                continue
            out.append(child)
        return out

    def chain(self, root: str) -> list[str]:
        """``root`` and every session reached through compression continuations."""
        found, frontier = [root], [root]
        while frontier:
            frontier = [
                child.id
                for sid in frontier
                for child in self.continuations(sid)
                if child.id not in found
            ]
            found.extend(frontier)
        return found

    def chain_last_active(self, root: str) -> float:
        return max(self.last_active(sid) for sid in self.chain(root))

    def tip(self, session_id: str) -> str:
        """Follow the best continuation forward: compressed again, then live, then latest."""
        current, seen = session_id, {session_id}
        for _ in range(100):
            children = self.continuations(current)
            if not children:
                return current
            best = min(
                children,
                key=lambda ch: (
                    0 if ch.end_reason == "compression" else 1 if ch.ended_at is None else 2,
                    -self.last_active(ch.id),
                    -ch.started_at,
                    _Descending(ch.id),
                ),
            )
            if best.id in seen:
                return current
            seen.add(best.id)
            current = best.id
        return current

    def matches(self, root: str, id_query: str | None, search_query: str | None) -> bool:
        """Hermes' id/title search over a conversation's compression chain."""
        members = self.chain(root)
        id_needle = (id_query or "").strip().lower()
        if id_needle and not any(id_needle in sid.lower() for sid in members):
            return False
        needle = (search_query or "").strip().lower()
        if not needle:
            return True
        compact = re.sub(r"[\W_]+", "", needle)
        for sid in members:
            title = (self.rows[sid].title or "").lower()
            squeezed = title.replace("-", "").replace("_", "").replace(".", "").replace(" ", "")
            if needle in title or needle in sid.lower() or (compact and compact in squeezed):
                return True
        return False

    def rich(self, session: dict[str, Any], previews: dict[str, str]) -> dict[str, Any]:
        """A listing entry: the session with ``preview`` and ``last_active``."""
        sid = session["id"]
        return {**session, "preview": previews.get(sid, ""), "last_active": self.last_active(sid)}


class _Descending(str):
    """A string that sorts in reverse, for one key of a mixed ascending sort."""

    __slots__ = ()

    def __lt__(self, other: str) -> bool:
        return str.__gt__(self, other)


def _filter_text(value: Any) -> Any:
    """``value``, a filter's; refused if it is text with a lone surrogate.

    Raises:
        InvalidArgumentError: It is (Hermes' sqlite3 cannot encode it either).
    """
    if isinstance(value, str) and has_lone_surrogate(value):
        raise InvalidArgumentError(
            f"a filter holds a lone surrogate (not valid Unicode): {_codec.shown(value)}"
        )
    return value


def _equal(column: Any, value: Any) -> Any:
    """``column = value`` as Hermes' file compares it (a number as its text).

    Text with NUL, which no row holds, matches nothing, where PostgreSQL would
    refuse to compare it; text with a lone surrogate is refused.
    """
    key = lookup_key(_filter_text(value))
    return false() if key is None else column == key


def _held(values: Iterable[Any]) -> tuple[Any, ...]:
    """A filter's items but text with NUL, which no row holds (nor matches in Hermes' file).

    Other items stay, for the search to refuse what is no text.
    """
    return tuple(v for v in values if not (isinstance(v, str) and "\x00" in v))


def _like(value: Any, pattern: str) -> Any:
    """``value LIKE pattern`` as Hermes' SQLite reads it: wildcards, and no escape character.

    ``%`` and ``_`` are wildcards, a backslash is a backslash (PostgreSQL's LIKE
    would take it as its escape character). SQLite's LIKE reads its pattern up
    to a NUL, so the pattern ends there; one with a lone surrogate is refused.
    It ignores the case of ASCII letters, and of no others (PostgreSQL's LIKE
    minds every case): both sides are folded so.
    """
    pattern = _filter_text(pattern).partition("\x00")[0]
    return ascii_like(value, pattern.replace("\\", "\\\\"))


def _contains(column: Any, needle: str) -> Any:
    """Hermes' case-insensitive substring match (its LIKE wildcards included).

    Hermes lowers the needle in Python (every letter) and the column in SQLite
    (ASCII letters): a title's ``Ü`` is matched by no needle.
    """
    return _like(func.coalesce(column, ""), f"%{needle.lower()}%")


def _under(cwd_prefix: str) -> Any:
    """Hermes' "cwd is this directory or below it" condition."""
    prefix = cwd_prefix.rstrip("/\\") or cwd_prefix
    cwd = _sessions.c.cwd
    return or_(_equal(cwd, prefix), _like(cwd, f"{prefix}/%"), _like(cwd, f"{prefix}\\%"))


def _listing_where(
    *,
    source: str | None,
    exclude_sources: list[str] | None,
    cwd_prefix: str | None,
    min_message_count: int,
    include_archived: bool,
    archived_only: bool,
) -> list[Any]:
    """The filters ``session_count`` and ``list_sessions_rich`` share, as conditions.

    As Hermes binds them: ``exclude_sources`` as the items it holds (a str, its
    characters), a bool ``min_message_count`` as 1 or 0.

    Raises:
        InvalidArgumentError: ``exclude_sources`` holds nothing to compare (no
            list of text), ``cwd_prefix`` is no text (Hermes' ``rstrip`` raises an
            AttributeError), or ``min_message_count`` is no number.
    """
    c = _sessions.c
    where: list[Any] = []
    if source:
        where.append(_equal(c.source, source))
    if exclude_sources:
        excluded = list(exclude_sources) if isinstance(exclude_sources, Iterable) else None
        if excluded is None or not all(isinstance(s, str) for s in excluded):
            raise InvalidArgumentError(
                f"exclude_sources must be a list of sources, got {_codec.shown(exclude_sources)}"
            )
        held = tuple(map(_filter_text, _held(excluded)))
        if held:  # (a source no row holds excludes nothing)
            where.append(c.source.not_in(held))
    if cwd_prefix:
        if not isinstance(cwd_prefix, str):
            raise InvalidArgumentError(f"cwd_prefix must be text, got {_codec.shown(cwd_prefix)}")
        where.append(_under(cwd_prefix))
    if not isinstance(min_message_count, int | float) or math.isnan(min_message_count):
        raise InvalidArgumentError(
            f"min_message_count must be a number, got {_codec.shown(min_message_count)}"
        )
    if min_message_count > 0:
        where.append(c.message_count >= float(min_message_count))
    if archived_only:
        where.append(c.archived.is_(True))
    elif not include_archived:
        where.append(c.archived.is_(False))
    return where


def _listable(row: Any, parents: dict[str, Any]) -> bool:
    """Hermes' picker rule: roots and /branch children, never delegate sub-agents."""
    config = row.model_config if isinstance(row.model_config, dict) else {}
    if config.get("_delegate_from") is not None:
        return False
    if row.parent_session_id is None or config.get("_branched_from") is not None:
        return True
    parent = parents.get(row.parent_session_id)
    return (
        parent is not None
        and parent.end_reason == "branched"
        and parent.ended_at is not None
        and row.started_at >= parent.ended_at
    )


def _prune_where(
    *,
    started_before: float | None = None,
    started_after: float | None = None,
    source: str | None = None,
    title_like: str | None = None,
    end_reason: str | None = None,
    cwd_prefix: str | None = None,
    min_messages: int | None = None,
    max_messages: int | None = None,
    archived: bool | None = None,
    model_like: str | None = None,
    provider: str | None = None,
    user_id: str | None = None,
    chat_id: str | None = None,
    chat_type: str | None = None,
    branch_like: str | None = None,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    min_cost: float | None = None,
    max_cost: float | None = None,
    min_tool_calls: int | None = None,
    max_tool_calls: int | None = None,
) -> list[Any]:
    """The prune filters of Hermes' ``SessionDB`` as conditions (only ended sessions).

    Raises:
        InvalidArgumentError: A bound that is no number (Hermes' file orders text
            above every number: every session would match), a text filter that
            is no text, or ``archived`` that is no bool.
    """
    c = _sessions.c
    where: list[Any] = [c.ended_at.is_not(None)]
    if started_before is not None:
        where.append(_bounded(c.started_at, operator.lt, "started_before", started_before))
    if started_after is not None:
        where.append(_bounded(c.started_at, operator.ge, "started_after", started_after))
    exact = {
        c.source: source,
        c.end_reason: end_reason,
        c.user_id: user_id,
        c.chat_id: chat_id,
        c.chat_type: chat_type,
    }
    where += [_equal(column, value) for column, value in exact.items() if value]
    for name, column, needle in (
        ("title_like", c.title, title_like),
        ("model_like", c.model, model_like),
        ("branch_like", c.git_branch, branch_like),
    ):
        if needle:
            where.append(_contains(column, _filter_str(name, needle)))
    if provider:
        provider = _filter_str("provider", provider)
        where.append(_equal(ascii_lower(func.coalesce(c.billing_provider, "")), provider.lower()))
    if cwd_prefix:
        where.append(_under(_filter_str("cwd_prefix", cwd_prefix)))
    tokens = func.coalesce(c.input_tokens, 0) + func.coalesce(c.output_tokens, 0)
    cost = func.coalesce(c.actual_cost_usd, c.estimated_cost_usd, 0)
    tool_calls = func.coalesce(c.tool_call_count, 0)
    bounds = (
        ("messages", c.message_count, min_messages, max_messages),
        ("tokens", tokens, min_tokens, max_tokens),
        ("cost", cost, min_cost, max_cost),
        ("tool_calls", tool_calls, min_tool_calls, max_tool_calls),
    )
    for name, expression, low, high in bounds:
        if low is not None:
            where.append(_bounded(expression, operator.ge, f"min_{name}", low))
        if high is not None:
            where.append(_bounded(expression, operator.le, f"max_{name}", high))
    if archived is not None:
        if not isinstance(archived, bool | int) or archived not in (0, 1):
            raise InvalidArgumentError(f"archived must be a bool, got {_codec.shown(archived)}")
        where.append(c.archived.is_(bool(archived)))
    return where


def _bounded(expression: Any, compare: Callable[[Any, Any], Any], name: str, bound: Any) -> Any:
    """``compare(expression, bound)``, a prune filter's bound, as Hermes' file compares it.

    NaN, which Hermes' sqlite3 binds as NULL, matches nothing (PostgreSQL would
    order it above every number); a bool is its int; an int past 64 bits
    compares as the float it is near.

    Raises:
        InvalidArgumentError: ``bound`` is no number.
    """
    if not isinstance(bound, int | float):
        raise InvalidArgumentError(f"{name} must be a number, got {_codec.shown(bound)}")
    if isinstance(bound, float) and math.isnan(bound):
        return false()
    if isinstance(bound, int):
        bound = int(bound) if -(2**63) <= bound < 2**63 else float(bound)
    return compare(expression, bound)


def _filter_str(name: str, value: Any) -> str:
    """A text filter's value (its lone surrogates refused by :func:`_filter_text`).

    Raises:
        InvalidArgumentError: It is no text.
    """
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be text, got {_codec.shown(value)}")
    return cast(str, _filter_text(value))


def _add_usage(
    conn: Connection,
    *,
    session_id: str,
    model: str,
    billing_provider: str,
    billing_base_url: str,
    billing_mode: str,
    counts: dict[str, Any],
    cost_status: str | None,
    cost_source: str | None,
) -> None:
    """Accumulate one call's usage into the per-model row (created on first use)."""
    now = time.time()
    make = _dialects.insert_maker(conn.dialect.name)
    statement = make(_usage).values(
        session_id=session_id,
        model=model,
        billing_provider=billing_provider,
        billing_base_url=billing_base_url,
        billing_mode=billing_mode,
        task="",
        cost_status=cost_status,
        cost_source=cost_source,
        first_seen=now,
        last_seen=now,
        **counts,
    )
    excluded = statement.excluded
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=list(MODEL_USAGE_KEY),
            set_={
                **{k: _usage.c[k] + excluded[k] for k in counts},
                "cost_status": func.coalesce(excluded.cost_status, _usage.c.cost_status),
                "cost_source": func.coalesce(excluded.cost_source, _usage.c.cost_source),
                "last_seen": excluded.last_seen,
            },
        )
    )


def _remove_session_files(sessions_dir: Path | None, session_id: str) -> None:
    """Remove the transcript files Hermes keeps for a session, if any."""
    if sessions_dir is None:
        return
    paths = [sessions_dir / f"{session_id}{suffix}" for suffix in (".json", ".jsonl")]
    paths += sessions_dir.glob(f"request_dump_{session_id}_*.json")
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


#: Longest key of the key/value store (its column's length).
_META_KEY_MAX = 255


def _text_of(name: str, value: Any) -> str | None:
    """``value`` for a text column, as Hermes' SQLite file stores it; refused if it is no text.

    Raises:
        InvalidSessionError: A value SQLite would not bind as text (a list, bytes),
            text with a lone surrogate (Hermes' sqlite3 refuses it too), or with
            NUL, which PostgreSQL text cannot hold (refused on either backend, as
            :class:`SessionStore` refuses it).
    """
    stored = sqlite_text(value)
    if stored is not None and not isinstance(stored, str):
        raise InvalidSessionError(f"{name} must be text, got {type(value).__name__}")
    problem = None if stored is None else _codec.text_problem(stored)
    if problem is not None:
        raise InvalidSessionError(f"{name} {problem}, got {_codec.shown(stored)}")
    return stored


def _count(name: str, value: Any) -> int | None:
    """A token or call count, as Hermes' file keeps it (a whole float, a bool: the int).

    Raises:
        InvalidSessionError: A fraction, a number no 64-bit int holds, or no number.
    """
    stored = sqlite_integer(value)
    if stored is None or (type(stored) is int and -(2**63) <= stored < 2**63):
        return stored
    raise InvalidSessionError(
        f"{name} must be a whole number of 64 bits, got {_codec.shown(value)}"
    )


def _cost(name: str, value: Any) -> float | None:
    """A cost in USD: a finite number, or None.

    Raises:
        InvalidSessionError: NaN, an infinity, or no number.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSessionError(f"{name} must be a number, got {type(value).__name__}")
    try:
        cost = float(value)
    except OverflowError:
        cost = math.inf
    if not math.isfinite(cost):
        raise InvalidSessionError(f"{name} must be a finite number, got {_codec.shown(value)}")
    return cost


#: Sessions whose last appended row a SessionDB keeps (the most recent).
_APPENDED_MAX = 10_000


def _same_append(a: tuple[dict[str, Any], bool], b: tuple[dict[str, Any], bool]) -> bool:
    """Whether two appends store the same message: every key, the time too when both gave it."""
    timed = a[1] and b[1]
    return {k: v for k, v in a[0].items() if timed or k != "timestamp"} == {
        k: v for k, v in b[0].items() if timed or k != "timestamp"
    }


class SessionDB(LineageMethods, GatewayMethods, UpkeepMethods):
    """Hermes Agent's ``SessionDB`` calls, stored by a :class:`SessionStore`.

    Constructed as Hermes constructs its own: ``SessionDB()``,
    ``SessionDB(db_path=path)``, ``SessionDB(db_path, read_only=True)``.

    Args:
        db_path: A store, a database URL, or a ``Path`` to a SQLite file (as
            Hermes takes); None: the URL in ``HERMES_ORM_URL``, else the
            embedded default (``hermes_orm.db`` in Hermes' home directory).
            A database this object opens is migrated to the newest schema.
        read_only: Open without migrating; the schema must be at the head.
    """

    MAX_TITLE_LENGTH = MAX_TITLE_LENGTH

    def __init__(
        self, db_path: SessionStore | str | Path | None = None, read_only: bool = False
    ) -> None:
        self.read_only = read_only
        if isinstance(db_path, SessionStore):
            self._store, self._owned = db_path, False
        else:
            url = _dialects.default_url() if db_path is None else db_path
            url = f"sqlite:///{url}" if isinstance(url, Path) else url
            self._store, self._owned = SessionStore(url), True
            if not read_only:
                self._store.upgrade()
        #: Per session, the message of an append whose outcome is unknown (see
        #: :meth:`append_message`), with whether its timestamp was given and a
        #: row id its row's exceeds.
        self._unsettled: dict[str, tuple[dict[str, Any], bool, int]] = {}
        #: Per session, a row id every row appended by this object from now on
        #: exceeds (ids only grow: SQLite's AUTOINCREMENT, PostgreSQL's sequence).
        self._appended: OrderedDict[str, int] = OrderedDict()
        self._appended_lock = threading.Lock()
        #: Stands in for Hermes' sqlite3 connection, which parts of Hermes use
        #: directly (see :mod:`._hermes_sql`).
        self._conn = HermesConnection(self)
        engine_url = self._store.engine.url
        #: The SQLite file underneath (None on PostgreSQL), as Hermes' attribute.
        self.db_path = (
            Path(engine_url.database)
            if engine_url.get_backend_name() == "sqlite" and engine_url.database
            else None
        )

    @property
    def store(self) -> SessionStore:
        """The store underneath."""
        return self._store

    def _refuse_read_only(self) -> None:
        """Refuse a write through an object opened ``read_only``, as Hermes' own does.

        Raises:
            DatabaseError: It was.
        """
        if self.read_only:
            raise DatabaseError(
                "this SessionDB was opened read_only: it writes nothing (as Hermes' own "
                "refuses); open one without read_only to write"
            )

    def _write(self, work: Callable[[Connection], _T]) -> _T:
        """Run ``work`` in one write transaction of the store (refused when ``read_only``)."""
        self._refuse_read_only()
        return self._store.write_transaction(work)

    def _execute_write(self, work: Callable[[HermesConnection], _T]) -> _T:
        """Hermes' write helper: ``work`` given its connection, in one write transaction."""
        return self._write(lambda conn: work(HermesConnection(self, conn)))

    def run_hermes_sql(self, work: Callable[[Connection], _T], *, write: bool) -> _T:
        """Run a statement of Hermes' connection (:mod:`._hermes_sql`) in its own transaction."""
        return self._write(work) if write else self._store.read_transaction(work)

    def close(self) -> None:
        """Release the store's connections (and its engine, if this object made it)."""
        if self._owned:
            self._store.close()

    sanitize_title = staticmethod(sanitize_title)

    # -- sessions ---------------------------------------------------------------------------

    def create_session(self, session_id: str, source: str, **kwargs: Any) -> str:
        """Create the session, or fill its missing fields; returns its id."""
        return self.ensure_session(session_id, source, **kwargs)

    def ensure_session(
        self, session_id: str, source: str = "unknown", model: str | None = None, **kwargs: Any
    ) -> str:
        """Like Hermes: insert, or fill the fields still NULL; returns the id."""
        unknown = set(kwargs) - set(_CREATE_FIELDS)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        fields = {
            # model_config keeps lone surrogates, escaped in its JSON as Hermes keeps them
            k: (hermes_json(v) if v else None) if k == "model_config" else sqlite_text(v)
            for k, v in {"model": model, **kwargs}.items()
            if v is not None
        }
        if fields.get("model_config") is None:
            fields.pop("model_config", None)  # Hermes stores a falsy config as NULL
        self._refuse_read_only()
        self._store.ensure_session(
            session_id, sqlite_text(source), started_at=time.time(), **fields
        )
        return session_id

    def _set_text(self, session_id: str, name: str, value: Any) -> int:
        """Set a text column as Hermes' file stores the value (numbers as its text)."""
        return self._set(session_id, **{name: _text_of(name, value)})

    def _set(self, session_id: str, **values: Any) -> int:
        def work(conn: Connection) -> int:
            statement = update(_sessions).where(_sessions.c.id == session_id).values(**values)
            return int(conn.execute(statement).rowcount)

        return self._write(work)

    def end_session(self, session_id: str, end_reason: str) -> None:
        """End the session; the first end wins (no-op on an ended or missing one)."""
        reason = _text_of("end_reason", end_reason)

        def work(conn: Connection) -> None:
            conn.execute(
                update(_sessions)
                .where(_sessions.c.id == session_id, _sessions.c.ended_at.is_(None))
                .values(ended_at=time.time(), end_reason=reason)
            )

        self._write(work)

    def reopen_session(self, session_id: str) -> None:
        """Clear ``ended_at`` and ``end_reason``."""
        self._set(session_id, ended_at=None, end_reason=None)

    def update_system_prompt(self, session_id: str, system_prompt: str) -> None:
        """Store the assembled system prompt."""
        self._set_text(session_id, "system_prompt", system_prompt)

    def update_session_model(self, session_id: str, model: str) -> None:
        """Set the session's model (after a mid-session switch)."""
        self._set_text(session_id, "model", model)

    def update_token_counts(  # noqa: PLR0917 - Hermes' signature
        self,
        session_id: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
        model: str | None = None,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        estimated_cost_usd: float | None = None,
        actual_cost_usd: float | None = None,
        cost_status: str | None = None,
        cost_source: str | None = None,
        pricing_version: str | None = None,
        billing_provider: str | None = None,
        billing_base_url: str | None = None,
        billing_mode: str | None = None,
        api_call_count: int = 0,
        absolute: bool = False,
    ) -> None:
        """Add (or, with ``absolute``, set) token and cost counters, as Hermes does.

        Creates the session if missing, fills its model and billing route on
        the first accounted call, and, for deltas, accumulates the per-model
        usage row (:class:`~hermes_orm.models.ModelUsage`).
        """
        # Checked before anything is written. A None counter counts as 0 (Hermes'
        # file stores NULL, a column here holds none).
        counted = {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_read_tokens": cache_read_tokens,
            "cache_write_tokens": cache_write_tokens,
            "reasoning_tokens": reasoning_tokens,
            "api_call_count": api_call_count,
        }
        (
            input_tokens,
            output_tokens,
            cache_read_tokens,
            cache_write_tokens,
            reasoning_tokens,
            api_call_count,
        ) = (_count(name, value) or 0 for name, value in counted.items())
        estimated_cost_usd = _cost("estimated_cost_usd", estimated_cost_usd)
        actual_cost_usd = _cost("actual_cost_usd", actual_cost_usd)
        texts = {
            "model": model,
            "cost_status": cost_status,
            "cost_source": cost_source,
            "pricing_version": pricing_version,
            "billing_provider": billing_provider,
            "billing_base_url": billing_base_url,
            "billing_mode": billing_mode,
        }
        (
            model,
            cost_status,
            cost_source,
            pricing_version,
            billing_provider,
            billing_base_url,
            billing_mode,
        ) = (_text_of(name, value) for name, value in texts.items())
        self.ensure_session(session_id, "unknown", model=model)
        c = _sessions.c
        accounted = bool(
            input_tokens or output_tokens or cache_read_tokens or cache_write_tokens
            or reasoning_tokens or api_call_count or estimated_cost_usd or actual_cost_usd
        )  # fmt: skip
        counters = {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_read_tokens": cache_read_tokens,
            "cache_write_tokens": cache_write_tokens,
            "reasoning_tokens": reasoning_tokens,
        }
        values: dict[str, Any]
        if absolute:
            values = dict(counters)
            values["estimated_cost_usd"] = estimated_cost_usd or 0.0
            values["api_call_count"] = api_call_count
            if actual_cost_usd is not None:
                values["actual_cost_usd"] = actual_cost_usd
        else:
            values = {k: c[k] + v for k, v in counters.items()}
            values["estimated_cost_usd"] = func.coalesce(c.estimated_cost_usd, 0.0) + (
                estimated_cost_usd or 0.0
            )
            values["api_call_count"] = func.coalesce(c.api_call_count, 0) + api_call_count
            if actual_cost_usd is not None:
                values["actual_cost_usd"] = func.coalesce(c.actual_cost_usd, 0.0) + actual_cost_usd
        for name, value in (
            ("cost_status", cost_status),
            ("cost_source", cost_source),
            ("pricing_version", pricing_version),
        ):
            if value is not None:
                values[name] = value
        if accounted:
            for name, value in (
                ("billing_provider", billing_provider),
                ("billing_base_url", billing_base_url),
                ("billing_mode", billing_mode),
                ("model", model),
            ):
                if value is not None:
                    values[name] = func.coalesce(c[name], value)
        usage_delta = (not absolute) and bool(
            input_tokens or output_tokens or cache_read_tokens or cache_write_tokens
            or reasoning_tokens or api_call_count or estimated_cost_usd
        )  # fmt: skip

        def work(conn: Connection) -> None:
            row = conn.execute(
                select(c.model, c.billing_provider, c.api_call_count).where(c.id == session_id)
            ).first()
            first_route = (
                int((row.api_call_count if row is not None else 0) or 0) == 0
                and accounted
                and bool(model)
                and bool(billing_provider)
                and (row is None or row.model != model or row.billing_provider != billing_provider)
            )
            if first_route:
                conn.execute(
                    update(_sessions)
                    .where(c.id == session_id)
                    .values(
                        model=model,
                        billing_provider=billing_provider,
                        billing_base_url=billing_base_url,
                        billing_mode=billing_mode,
                    )
                )
            conn.execute(update(_sessions).where(c.id == session_id).values(values))
            if usage_delta:
                route = conn.execute(
                    select(c.model, c.billing_provider, c.billing_base_url, c.billing_mode).where(
                        c.id == session_id
                    )
                ).first()
                _add_usage(
                    conn,
                    session_id=session_id,
                    model=model or (route.model if route else None) or "unknown",
                    billing_provider=billing_provider
                    or (route.billing_provider if route else None)
                    or "",
                    billing_base_url=billing_base_url
                    or (route.billing_base_url if route else None)
                    or "",
                    billing_mode=billing_mode or (route.billing_mode if route else None) or "",
                    counts={
                        "api_call_count": api_call_count or 0,
                        **{k: v or 0 for k, v in counters.items()},
                        "estimated_cost_usd": float(estimated_cost_usd or 0.0),
                        "actual_cost_usd": float(actual_cost_usd or 0.0),
                    },
                    cost_status=cost_status,
                    cost_source=cost_source,
                )

        self._write(work)

    def hermes_session(self, row: Any) -> dict[str, Any]:
        """A row of the sessions table as Hermes' sessions row."""
        data = dict(row._mapping)
        extra = data.get("extra")
        if not isinstance(extra, dict):  # none, or written by another tool as another JSON value
            extra = {}
        out: dict[str, Any] = {}
        for column in SESSION_COLUMNS:
            value = data[column] if column in data else extra.get(column)
            if column in _FLAG_SESSION and value is not None:
                value = int(value)
            elif column == "model_config":
                value = _json_text(value)
            out[column] = value
        for key, value in extra.items():  # columns of newer Hermes schemas, imported
            out.setdefault(key, value)
        return out

    def _one_session(self, *where: Any) -> dict[str, Any] | None:
        def work(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(select(_sessions).where(*where)).first()
            return None if row is None else self.hermes_session(row)

        return self._store.read_transaction(work)

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        """The session as Hermes' sessions row, or None."""
        return self._one_session(_sessions.c.id == session_id)

    def get_session_by_title(self, title: str) -> dict[str, Any] | None:
        """The session with exactly this title, or None (for no title: SQL's ``= NULL``).

        A number is compared as its text, as Hermes' file compares it.
        """
        key = lookup_key(title)
        return None if key is None else self._one_session(_sessions.c.title == key)

    def get_session_title(self, session_id: str) -> str | None:
        """The session's title, or None."""
        session = self.get_session(session_id)
        return None if session is None else session["title"]

    def resolve_session_id(self, session_id_or_prefix: str) -> str | None:
        """The id itself if it exists, else the one id it is a unique prefix of.

        A number is its text; what no id can begin with (NUL, a lone surrogate,
        no text) resolves to None.
        """
        key = lookup_key(session_id_or_prefix)
        if key is None:
            return None
        if self.get_session(key) is not None:
            return key

        def work(conn: Connection) -> list[str]:
            query = (
                select(_sessions.c.id)
                .where(ascii_like(_sessions.c.id, f"{like_escaped(key)}%"))
                .order_by(_sessions.c.started_at.desc())
                .limit(2)
            )
            return list(conn.execute(query).scalars())

        matches = self._store.read_transaction(work)
        return matches[0] if len(matches) == 1 else None

    # -- messages ---------------------------------------------------------------------------

    def append_message(  # noqa: PLR0917 - Hermes' signature, positional arguments included
        self,
        session_id: str,
        role: str,
        content: Any = None,
        tool_name: str | None = None,
        tool_calls: Any = None,
        tool_call_id: str | None = None,
        token_count: int | None = None,
        finish_reason: str | None = None,
        reasoning: str | None = None,
        reasoning_content: str | None = None,
        reasoning_details: Any = None,
        codex_reasoning_items: Any = None,
        codex_message_items: Any = None,
        platform_message_id: str | None = None,
        observed: bool = False,
        effect_disposition: str | None = None,
        timestamp: Any = None,
        api_content: str | None = None,
    ) -> int:
        """Store one message at the end of the session; returns its row id.

        When an append raises :class:`DatabaseUnavailableError` (the database out
        of reach past the retry bound), its COMMIT may have landed. Hermes then
        appends the same message again (its next flush writes the first message
        it did not mark): if a row of the session made since that append began
        (a row id above every one it knew of then) is the message that append
        was to store (its time included), its row id is returned and nothing is
        written a second time. The first append of this object to a session
        reads the highest row id first.
        """
        stamp = time.time()
        if timestamp is not None:
            with contextlib.suppress(TypeError, ValueError):  # Hermes ignores a bad one too
                stamp = float(
                    timestamp.timestamp() if hasattr(timestamp, "timestamp") else timestamp
                )
        message: dict[str, Any] = {"role": role, "content": hermes_content(content)}
        optional = {
            "tool_call_id": sqlite_text(tool_call_id),
            # Hermes stores falsy JSON values as NULL
            "tool_calls": message_json("tool_calls", tool_calls),
            "tool_name": scrubbed_text(tool_name),
            "effect_disposition": sqlite_text(effect_disposition),
            "token_count": sqlite_integer(token_count),
            "finish_reason": sqlite_text(finish_reason),
            "reasoning": scrubbed_text(reasoning),
            "reasoning_content": scrubbed_text(reasoning_content),
            "reasoning_details": message_json("reasoning_details", reasoning_details),
            "codex_reasoning_items": message_json("codex_reasoning_items", codex_reasoning_items),
            "codex_message_items": message_json("codex_message_items", codex_message_items),
            "platform_message_id": sqlite_text(platform_message_id),
            "api_content": scrub(api_content) if isinstance(api_content, str) else None,
        }
        message.update({k: v for k, v in optional.items() if v is not None})
        message.update(timestamp=stamp, observed=bool(observed), active=True, compacted=False)
        timed = timestamp is not None
        unsettled = self._unsettled.get(session_id)
        if unsettled is not None:
            if _same_append(unsettled[:2], (message, timed)):
                # (a read that fails here leaves it unsettled for the next retry)
                stored = self._row_since(session_id, unsettled[0], unsettled[2])
                if stored is not None:
                    self._unsettled.pop(session_id, None)
                    self._appended_at(session_id, stored)
                    return stored
            self._unsettled.pop(session_id, None)
        with self._appended_lock:
            floor = self._appended.get(session_id)
        if floor is None:
            floor = self._highest_row()
        self._refuse_read_only()
        try:
            row_id = self._store.append_row(session_id, message)[1]
        except DatabaseUnavailableError:
            self._unsettled[session_id] = (message, timed, floor)
            raise
        self._appended_at(session_id, row_id)
        return row_id

    def _appended_at(self, session_id: str, row_id: int) -> None:
        with self._appended_lock:
            self._appended[session_id] = max(row_id, self._appended.get(session_id, row_id))
            self._appended.move_to_end(session_id)
            while len(self._appended) > _APPENDED_MAX:
                self._appended.popitem(last=False)

    def _highest_row(self) -> int:
        """The highest row id of any message (0: none): one step down the primary key."""
        highest = select(func.max(_messages.c.id))
        return int(self._store.read_transaction(lambda conn: conn.execute(highest).scalar()) or 0)

    def _row_since(self, session_id: str, message: dict[str, Any], floor: int) -> int | None:
        """The id of the row of the session above ``floor`` that is ``message`` exactly, or None.

        Exactly: its time too (what the failed append was to store), so an equal
        message another writer stored meanwhile is not taken for it.
        """
        c = _messages.c
        since = select(c.id, c.idx).where(c.session_id == session_id, c.id > floor)
        rows = self._store.read_transaction(lambda conn: conn.execute(since.order_by(c.id)).all())
        for row in rows:
            stored = self._store.primary_messages(session_id, offset=row.idx, limit=1)
            if stored and stored[0] == message:
                return int(row.id)
        return None

    def _hermes_message(self, row: Any) -> dict[str, Any]:
        from hermes_orm._codec import row_to_message

        message = row_to_message(row)
        out: dict[str, Any] = {}
        for column in MESSAGE_COLUMNS:
            own = column in ("id", "session_id")
            value = getattr(row, column) if own else message.get(column)
            if column == "content":
                value = hermes_content_value(value)
            elif column in _TEXT_JSON_MESSAGE:
                value = _json_text(value)
            elif column in _FLAG_MESSAGE:
                # NULL: written through flush() without the key (active, not compacted)
                value = int(value) if value is not None else (1 if column == "active" else 0)
            out[column] = value
        return out

    def get_messages(
        self,
        session_id: str,
        include_inactive: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """The session's messages in insertion order, as Hermes' rows."""
        query = select(_messages).where(_messages.c.session_id == session_id)
        if not include_inactive:
            # NULL: written through flush() without an "active" key, i.e. active
            query = query.where(func.coalesce(_messages.c.active, True).is_(True))
        query = query.order_by(_messages.c.idx)
        if limit is not None or offset:
            size, start = _window(-1 if limit is None else limit, offset)  # as SQLite reads them
            query = query.offset(start).limit(size)

        def work(conn: Connection) -> list[dict[str, Any]]:
            return [self._hermes_message(r) for r in conn.execute(query)]

        return self._store.read_transaction(work)

    def _lineage(self, session_id: str) -> list[str]:
        """The session's ancestors and itself, root first (at most 100, cycles cut)."""

        def work(conn: Connection) -> list[str]:
            chain: list[str] = []
            current: str | None = session_id
            while current is not None and current not in chain and len(chain) < 100:
                chain.append(current)
                current = conn.execute(
                    select(_sessions.c.parent_session_id).where(_sessions.c.id == current)
                ).scalar()
            return chain[::-1]

        return self._store.read_transaction(work) if session_id else [session_id]

    def get_messages_as_conversation(
        self,
        session_id: str,
        include_ancestors: bool = False,
        include_inactive: bool = False,
        repair_alternation: bool = False,
    ) -> list[dict[str, Any]]:
        """The conversation as the agent replays it (role + content dicts).

        The content clean-ups are Hermes Agent's own (``sanitize_context``,
        dropping background-review prompts, and with ``repair_alternation``
        its ``repair_message_sequence``), taken from the installed
        ``hermes-agent`` so a replay matches it exactly.

        Raises:
            ModuleNotFoundError: hermes-agent is not installed.
        """
        sessions = self._lineage(session_id) if include_ancestors else [session_id]
        query = select(_messages).where(_messages.c.session_id.in_(sessions))
        if not include_inactive:
            query = query.where(func.coalesce(_messages.c.active, True).is_(True))
        query = query.order_by(_messages.c.id)

        def work(conn: Connection) -> list[dict[str, Any]]:
            return [self._hermes_message(r) for r in conn.execute(query)]

        rows = self._store.read_transaction(work)
        return self._conversation(
            rows, include_ancestors=include_ancestors, repair_alternation=repair_alternation
        )

    def search_messages(  # noqa: PLR0917 - Hermes' signature
        self,
        query: str,
        source_filter: list[str] | None = None,
        exclude_sources: list[str] | None = None,
        role_filter: list[str] | None = None,
        limit: int = 20,
        offset: int = 0,
        sort: str | None = None,
        include_inactive: bool = False,
    ) -> list[dict[str, Any]]:
        """Messages matching ``query``, with a snippet and their neighbours as context.

        The query is read by hermes_orm's search (:mod:`hermes_orm.search`), with
        Hermes' ``NOT term`` taken as ``-term``; a query with nothing to look for
        gives ``[]``, as in Hermes, and a longer one than 2,048 characters is
        cut there, as Hermes cuts it. Hits come newest first in the order the
        messages were stored, where Hermes' default order is FTS5 relevance,
        which this index does not compute; ``sort="newest"`` and ``"oldest"``
        order them by the messages' times, as Hermes does (ties newest or
        oldest stored first, where Hermes ranks them). Messages taken back (``active`` 0, not
        compacted) are left out unless ``include_inactive``.
        """
        if not isinstance(query, str):
            return []
        # Hermes searches the first 2,048 characters of a longer query, as hermes_orm's limit.
        query = query[: _search.MAX_QUERY_CHARS]
        # An item with NUL matches no row, as in Hermes' file: no filter of none left.
        sources = None if source_filter is None else _held(source_filter)
        roles = _held(role_filter) if role_filter else None
        if not query.strip() or sources == () or roles == ():
            return []
        order = sort.strip().lower() if isinstance(sort, str) else None
        filters = _search.Filters(
            sources=sources,
            excluded_sources=_held(exclude_sources or ()) or None,
            roles=roles,
            skip_rewound=not include_inactive,
            oldest_first=order == "oldest",
            # As Hermes orders them: by the messages' times, ties by storage order
            # (Hermes' by relevance, which this index does not compute).
            by_time=order in ("newest", "oldest"),
        )
        size, first = _window(limit, offset)  # a negative limit: every hit
        end = None if size is None else first + size
        if end is not None and end <= first:
            return []
        text = _hermes_search_query(query)

        def work(conn: Connection) -> list[dict[str, Any]]:
            hits: list[_search.SearchHit] = []
            after = None
            try:
                if filters.by_time:  # one page: time order has no cursor
                    hits = _search.run(conn, text, filters, None, end or _EVERY_HIT).hits
                else:
                    while end is None or len(hits) < end:  # pages of at most MAX_LIMIT hits
                        wanted = _search.MAX_LIMIT if end is None else end - len(hits)
                        page_size = min(wanted, _search.MAX_LIMIT)
                        page = _search.run(conn, text, filters, after, page_size)
                        hits += page.hits
                        if page.next_cursor is None:
                            break
                        after = _search.decode_cursor(page.next_cursor, text, filters)
            except SearchQueryError:
                return []
            return self._search_results(conn, hits[first:end])

        # One snapshot: a hit another writer deletes between the statements that
        # find it and the one that reads its session and neighbours is still there.
        return self._store.read_transaction(work, snapshot=True)

    @staticmethod
    def _search_results(conn: Connection, hits: list[_search.SearchHit]) -> list[dict[str, Any]]:
        """Hermes' result dicts of ``hits``: two queries for the whole page."""
        from hermes_orm._codec import row_to_message

        details: dict[int, Any] = {}
        neighbours: dict[tuple[str, int], dict[str, Any]] = {}
        for start in range(0, len(hits), _SEARCH_DETAILS_BATCH):  # (SQLite's depth limit)
            part = hits[start : start + _SEARCH_DETAILS_BATCH]
            found = select(
                _messages.c.id,
                _messages.c.tool_name,
                _sessions.c.source,
                _sessions.c.model,
                _sessions.c.started_at,
            ).join(_sessions, _sessions.c.id == _messages.c.session_id)
            ids = [hit.message_id for hit in part]
            details.update(
                (row.id, row) for row in conn.execute(found.where(_messages.c.id.in_(ids)))
            )
            around = or_(
                *(
                    (_messages.c.session_id == hit.session_id)
                    & _messages.c.idx.between(hit.idx - 1, hit.idx + 1)
                    for hit in part
                )
            )
            neighbours.update(
                ((row.session_id, row.idx), row_to_message(row))
                for row in conn.execute(select(_messages).where(around))
            )
        results = []
        for hit in hits:
            context = []
            for idx in (hit.idx - 1, hit.idx, hit.idx + 1):
                message = neighbours.get((hit.session_id, idx))
                if message is not None:
                    context.append({"role": message["role"], "content": _preview(message)})
            snippet = hit.marked(">>>", "<<<")
            if snippet.startswith("…"):
                snippet = "..." + snippet[1:]
            if snippet.endswith("…"):
                snippet = snippet[:-1] + "..."
            row = details[hit.message_id]
            results.append(
                {
                    "id": hit.message_id,
                    "session_id": hit.session_id,
                    "role": hit.role,
                    "snippet": snippet,
                    "timestamp": hit.timestamp,
                    "tool_name": row.tool_name,
                    "source": row.source,
                    "model": row.model,
                    "session_started": row.started_at,
                    "context": context,
                }
            )
        return results

    def message_count(self, session_id: str | None = None) -> int:
        """Messages of one session, or of all."""

        def work(conn: Connection) -> int:
            query = select(func.count()).select_from(_messages)
            if session_id:
                query = query.where(_messages.c.session_id == session_id)
            return int(conn.execute(query).scalar_one())

        return self._store.read_transaction(work)

    def clear_messages(self, session_id: str) -> None:
        """Delete the session's messages and reset its counters (and cursor)."""

        def work(conn: Connection) -> None:
            # The session's row lock first (a flush holds it until it commits), so
            # no message a writer is storing outlives the reset of the cursor.
            conn.execute(
                select(_sessions.c.id).where(_sessions.c.id == session_id).with_for_update()
            )
            conn.execute(delete(_messages).where(_messages.c.session_id == session_id))
            conn.execute(
                update(_sessions)
                .where(_sessions.c.id == session_id)
                .values(
                    flushed_idx=0,
                    flushed_digest=None,
                    history_id=new_history_id(),
                    message_count=0,
                    tool_call_count=0,
                )
            )

        self._store.forget_cursor(session_id)
        self._write(work)
        self._history_rewritten(session_id)

    def session_count(  # noqa: PLR0917 - Hermes' signature
        self,
        source: str | None = None,
        cwd_prefix: str | None = None,
        min_message_count: int = 0,
        include_archived: bool = False,
        archived_only: bool = False,
        exclude_children: bool = False,
        exclude_sources: list[str] | None = None,
    ) -> int:
        """Count sessions as Hermes does, with its filters.

        ``exclude_children`` counts what Hermes' session pickers list: roots and
        /branch children, not sub-agent runs or compression continuations.
        """
        c = _sessions.c
        where = _listing_where(
            source=source,
            exclude_sources=exclude_sources,
            cwd_prefix=cwd_prefix,
            min_message_count=min_message_count,
            include_archived=include_archived,
            archived_only=archived_only,
        )

        def work(conn: Connection) -> int:
            if not exclude_children:
                query = select(func.count()).select_from(_sessions).where(*where)
                return int(conn.execute(query).scalar_one())
            rows = conn.execute(
                select(c.id, c.parent_session_id, c.model_config, c.started_at).where(*where)
            ).all()
            parent_ids = sorted({r.parent_session_id for r in rows} - {None})
            parents = {
                p.id: p
                for some in _dialects.in_parts(parent_ids)
                for p in conn.execute(select(c.id, c.end_reason, c.ended_at).where(c.id.in_(some)))
            }
            return sum(1 for r in rows if _listable(r, parents))

        return self._store.read_transaction(work)

    def get_compression_tip(self, session_id: str) -> str | None:
        """The live end of the compression chain that starts at ``session_id``."""
        return self._store.read_transaction(lambda conn: _Sessions.load(conn).tip(session_id))

    def list_sessions_rich(  # noqa: PLR0917 - Hermes' signature
        self,
        source: str | None = None,
        exclude_sources: list[str] | None = None,
        cwd_prefix: str | None = None,
        limit: int = 20,
        offset: int = 0,
        include_children: bool = False,
        min_message_count: int = 0,
        project_compression_tips: bool = True,
        order_by_last_active: bool = False,
        include_archived: bool = False,
        archived_only: bool = False,
        id_query: str | None = None,
        search_query: str | None = None,
        compact_rows: bool = False,
    ) -> list[dict[str, Any]]:
        """Sessions for a picker, as Hermes lists them: preview, last activity, tips.

        Children are left out unless asked for (roots and /branch children
        stay); a compressed conversation shows as its live continuation; with
        ``order_by_last_active`` the order (and ``id_query``/``search_query``)
        follows each conversation's whole compression chain.
        """
        c = _sessions.c
        where = _listing_where(
            source=source,
            exclude_sources=exclude_sources,
            cwd_prefix=cwd_prefix,
            min_message_count=min_message_count,
            include_archived=include_archived,
            archived_only=archived_only,
        )

        def work(conn: Connection) -> list[dict[str, Any]]:
            known = _Sessions.load(conn)
            ids = set(conn.execute(select(c.id).where(*where)).scalars())
            rows = [r for sid, r in known.rows.items() if sid in ids]
            if not include_children:
                rows = [r for r in rows if _listable(r, known.rows)]
            if order_by_last_active:
                rows = [r for r in rows if known.matches(r.id, id_query, search_query)]
                rows.sort(
                    key=lambda r: (known.chain_last_active(r.id), r.started_at, r.id),
                    reverse=True,
                )
            else:
                # Ties in id order: the rows come in no order of their own (PostgreSQL's
                # change as a row is updated), and pages must not repeat or skip one.
                rows.sort(key=lambda r: r.id)
                rows.sort(key=lambda r: r.started_at, reverse=True)
            size, start = _window(limit, offset)  # as SQLite's LIMIT/OFFSET: -1 is all
            page = rows[start:] if size is None else rows[start : start + size]
            tips = {}
            if project_compression_tips and not include_children:
                tips = {r.id: known.tip(r.id) for r in page if r.end_reason == "compression"}
            previews = _previews(conn, [r.id for r in page] + list(tips.values()))
            out = []
            for row in page:
                entry = known.rich(self.hermes_session(row), previews)
                tip = tips.get(row.id)
                if tip is not None and tip != row.id and tip in known.rows:
                    tip_entry = known.rich(self.hermes_session(known.rows[tip]), previews)
                    for key in _TIP_KEYS:
                        entry[key] = tip_entry[key]
                    entry["_lineage_root_id"] = row.id
                if compact_rows:
                    entry.pop("system_prompt", None)
                out.append(entry)
            return out

        return self._store.read_transaction(work)

    # -- export and delete --------------------------------------------------------------

    def export_session(self, session_id: str) -> dict[str, Any] | None:
        """The session with its messages under ``"messages"``, or None."""
        session = self.get_session(session_id)
        if session is None:
            return None
        return {**session, "messages": self.get_messages(session_id)}

    def search_sessions(
        self, source: str | None = None, limit: int = 20, offset: int = 0
    ) -> list[dict[str, Any]]:
        """Sessions most recently active first, each with ``last_active``.

        ``last_active`` is the newest message's timestamp, else ``started_at``.
        """
        newest = (
            select(_messages.c.session_id, func.max(_messages.c.timestamp).label("last"))
            .group_by(_messages.c.session_id)
            .subquery()
        )
        last_active = func.coalesce(newest.c.last, _sessions.c.started_at).label("last_active")
        query = select(_sessions, last_active).outerjoin(
            newest, newest.c.session_id == _sessions.c.id
        )
        if source:
            query = query.where(_equal(_sessions.c.source, source))
        size, start = _window(limit, offset)  # as SQLite reads them
        query = (
            query.order_by(last_active.desc(), _sessions.c.started_at.desc(), _sessions.c.id.desc())
            .limit(size)
            .offset(start)
        )

        def work(conn: Connection) -> list[dict[str, Any]]:
            return [
                {**self.hermes_session(row), "last_active": row.last_active}
                for row in conn.execute(query)
            ]

        return self._store.read_transaction(work)

    def export_all(self, source: str | None = None) -> list[dict[str, Any]]:
        """Every session (of ``source``) with its messages, most recently active first."""
        return [
            {**session, "messages": self.get_messages(session["id"])}
            for session in self.search_sessions(source=source, limit=100000)
        ]

    def delete_session(self, session_id: str, sessions_dir: Path | None = None) -> bool:
        """Delete a session, its messages and its delegate sub-agent sessions.

        Delegate children (``model_config["_delegate_from"]``, followed down their
        own delegates) go with it; other children keep living without the parent
        link. With ``sessions_dir``, their transcript files there go too.
        Returns False when there was no such session.
        """

        def pick(conn: Connection) -> list[str]:
            # Its row locked first (PostgreSQL): a delegate made meanwhile waits, and
            # finds no parent, rather than being missed and left behind unlinked.
            found = conn.execute(
                select(_sessions.c.id).where(_sessions.c.id == session_id).with_for_update()
            )
            if found.first() is None:
                return []
            return [session_id, *_delegates_of(conn, [session_id])]

        return bool(self._delete_picked(pick, sessions_dir))

    def prune_sessions(
        self,
        older_than_days: float | None = 90,
        source: str | None = None,
        sessions_dir: Path | None = None,
        **filters: Any,
    ) -> int:
        """Delete ended sessions matching the filters (Hermes' set); returns how many.

        Without filters: ended sessions started more than ``older_than_days``
        days ago (of ``source``). Children of pruned sessions lose the link.

        Raises:
            TypeError: A filter Hermes does not have.
        """
        if filters.get("started_before") is None and older_than_days is not None:
            filters["started_before"] = started_before(older_than_days)
        where = _prune_where(source=source, **filters)

        # Checked again under the rows' locks (PostgreSQL): one reopened and written
        # meanwhile (a resumed session) is no longer ended, and is kept.
        query = select(_sessions.c.id).where(*where)
        return len(self._delete_picked(lambda c: _picked_under_lock(c, query), sessions_dir))

    # -- meta ---------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """A value of the key/value store, or None."""
        found = lookup_key(key)
        if found is None:
            return None

        def work(conn: Connection) -> str | None:
            return conn.execute(select(_meta.c.value).where(_meta.c.key == found)).scalar()

        return self._store.read_transaction(work)

    def set_meta(self, key: str, value: str) -> None:
        """Set a value of the key/value store.

        Raises:
            InvalidArgumentError: ``key`` is no text a row can hold (NUL, a lone
                surrogate, more than 255 characters).
            InvalidSessionError: ``value`` is no text.
        """
        found = lookup_key(key)
        if found is None or len(found) > _META_KEY_MAX:
            raise InvalidArgumentError(
                f"a meta key must be text of at most {_META_KEY_MAX} characters without NUL "
                f"or lone surrogates, got {key!r:.80}"
            )
        text = _text_of("value", value)

        def work(conn: Connection) -> None:
            make = _dialects.insert_maker(conn.dialect.name)
            statement = make(_meta).values(key=found, value=text)
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["key"], set_={"value": statement.excluded.value}
                )
            )

        self._write(work)


#: The session id a lookup by an id no row can hold uses: no session has an empty id
#: (the store refuses one), so the call finds nothing, as it would on Hermes' file;
#: what it returns of the id is the id given.
_NO_SESSION = ""
#: Methods that make rows for the session they are given: an id no row can hold
#: is refused (InvalidSessionError) instead of finding nothing.
_MAKES_ROWS = frozenset(
    {
        "append_message",
        "create_session",
        "ensure_session",
        "record_auxiliary_usage",
        "try_acquire_compression_lock",
        "update_token_counts",
    }
)
#: What a method whose empty id means something else (every session) returns for an
#: id no row can hold.
_NOTHING: dict[str, Any] = {"message_count": 0}


def _given_back(result: Any, given: Any) -> Any:
    """``result`` with the id the call was made with where it holds the one it ran with."""
    if isinstance(result, str) and result == _NO_SESSION:
        return given
    if isinstance(result, list | tuple) and _NO_SESSION in result:
        back = [given if isinstance(item, str) and item == _NO_SESSION else item for item in result]
        return back if isinstance(result, list) else tuple(back)
    return result


def _keyed(method: Callable[..., Any], *, makes_rows: bool) -> Callable[..., Any]:
    """``method`` with its ``session_id`` compared as Hermes' file compares it (``lookup_key``).

    A number is its text; an id no row can hold (NUL, a lone surrogate, no
    text at all) finds nothing, or, for a method that makes rows, is refused;
    None goes as it is.
    """
    name = method.__name__

    @functools.wraps(method)
    def keyed(self: Any, *args: Any, **kwargs: Any) -> Any:
        named = "session_id" in kwargs
        if not named and not args:
            return method(self, *args, **kwargs)  # Python says what is missing
        given = kwargs["session_id"] if named else args[0]
        if given is None:  # (where it may be left out, it means none, or all)
            return method(self, *args, **kwargs)
        key = lookup_key(given)
        if key is None:
            if makes_rows:
                check_session_id(given)  # raises: it says why
            if name in _NOTHING:
                return _NOTHING[name]
        if named:
            kwargs["session_id"] = _NO_SESSION if key is None else key
        else:
            args = (_NO_SESSION if key is None else key, *args[1:])
        if key is not None:
            return method(self, *args, **kwargs)
        try:
            return _given_back(method(self, *args, **kwargs), given)
        except SessionNotFoundError:
            raise SessionNotFoundError(given if isinstance(given, str) else repr(given)) from None

    return keyed


# Every method of the adapter whose first argument is a session id takes it so (the
# methods themselves then have the id as the database compares it).
for _name in dir(SessionDB):
    _method = getattr(SessionDB, _name)
    if _name.startswith("_") or not inspect.isfunction(_method):
        continue
    if list(inspect.signature(_method).parameters)[1:2] == ["session_id"]:
        setattr(SessionDB, _name, _keyed(_method, makes_rows=_name in _MAKES_ROWS))
