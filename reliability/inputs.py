"""Bad input by the thousand: every call stores exactly what it is given, or refuses, typed.

A seeded generator (:class:`Hostile`) makes hostile arguments for every
:class:`hermes_orm.SessionStore` call that takes input: session ids (NUL,
lone surrogates, empty, past 255 characters, not a str), session fields (huge
ints, NaN, JSON nested past 100 levels, wrong types, unknown names), message
lists (no dicts, no role, tuples, sets, bytes, surrogates, NUL, huge ints,
infinities, deep nesting, long strings), search queries (any unicode, emoji,
private use and combining characters, hundreds of words, very long words,
operators), listing filters, limits, offsets and cursors (forged ones too),
and the store's own settings.

Each call must either succeed with an exact round trip (the messages read
back equal the list flushed, the session fields read back equal those
given, listings and hits match their filters) or raise a
:class:`hermes_orm.HermesOrmError` having written nothing (the sessions table
and the message rows are as they were). Anything else is a failure: another
exception (untyped), an inexact round trip, or a refusal that wrote.
"""

from __future__ import annotations

import base64
import json
import math
import random
import time
import types
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from hermes_orm import (
    DatabaseBusyError,
    DatabaseUnavailableError,
    HermesOrmError,
    RetryPolicy,
    SessionStore,
)
from hermes_orm.store import SESSION_FIELDS
from reliability._common import Conversation, Database, Outcome

# -- the generator ------------------------------------------------------------------------------

_TEXTS = (
    "",
    " ",
    "hello",
    "\x00",
    "nul\x00inside",
    "\ud800",
    "lone \udfff surrogate",
    "\U0001f600\U0001f4a9 emoji",
    "👩‍👩‍👧‍👦 🇺🇦 👍🏽",
    "\ue000\uf8ff\U000f0000 private use",
    "e\u0301\u0301\u0301 combining",
    "\u200b\u200d\ufeff zero width",
    "\uffff\ufffe noncharacters",
    "\U0010ffff",
    "日本語 中文 한국어",
    "עברית العربية",
    "'; DROP TABLE hermes_sessions; --",
    "%s %% ? :x $1 {0} \\",
    "line\nbreak\r\ttab",
    "\x7f\x1b[31m control",
)
_OPERATORS = ("OR", "-", "*", '"', "AND", "NOT", "NEAR", "(", ")", "^", ":", "+", "~", "--", "**")
#: Where a random character comes from: (cumulative probability, first, last code point).
_CHARACTERS = (
    (0.5, 0x20, 0x7E),
    (0.7, 0xA0, 0xD7FF),
    (0.8, 0x1F300, 0x1FAFF),
    (0.85, 0xE000, 0xF8FF),
    (0.9, 0x300, 0x36F),
    (0.99, 0x10000, 0x10FFFF),
)
#: Nobody else holds a lock for long here: a store that finds the database busy is
#: wrong, and says so within a second or two.
_LOCK_TIMEOUT = 0.5
_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.1)
_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class Hostile:
    """Hostile values from a seeded :class:`random.Random` (the same seed, the same values)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def chance(self, p: float) -> bool:
        """True with probability ``p``."""
        return self.rng.random() < p

    def char(self) -> str:
        """A character: ASCII, any BMP letter, emoji, private use, combining, astral, or worse."""
        roll = self.rng.random()
        for below, first, last in _CHARACTERS:
            if roll < below:
                return chr(self.rng.randint(first, last))
        return chr(self.rng.choice((0, 1, 0x1F, 0x7F, 0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xFFFF)))

    def text(self, long: float = 0.05) -> str:
        """A string: a known nasty one, random characters, or a long one."""
        roll = self.rng.random()
        if roll < 0.2:
            return self.rng.choice(_TEXTS)
        if roll < 1 - long:
            return "".join(self.char() for _ in range(self.rng.randint(1, 30)))
        size = self.rng.choice((255, 256, 1000, 10_000, 100_000))
        return (self.rng.choice(_TEXTS[2:]) or "x") * (size // 4 + 1)

    def clean_text(self) -> str:
        """A string that a database can store (no NUL, no lone surrogate)."""
        value = self.text()
        return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")

    def not_a_str(self) -> Any:
        """A value of some other type."""
        return self.rng.choice(
            (None, 0, 1, -1, 2**64, 1.5, math.nan, True, b"bytes", ["a"], ("a",), {"a": 1}, {"a"})
        )

    def session_id(self, known: Sequence[str]) -> Any:
        """A session id: often one of ``known``, else anything."""
        roll = self.rng.random()
        if roll < 0.5 and known:
            return self.rng.choice(known)
        if roll < 0.58:
            return self.not_a_str()
        if roll < 0.65:
            return self.rng.choice(("", "x" * 255, "x" * 256, "é" * 255, "\U0001f600" * 256))
        return self.text()

    def number(self) -> Any:
        """A number at or past the edges: 64-bit bounds, huge, tiny, NaN, infinities, bools."""
        return self.rng.choice(
            (
                0,
                -1,
                2**31,
                2**53 + 1,
                2**63 - 1,
                2**63,
                -(2**63),
                -(2**63) - 1,
                10**400,
                -0.0,
                1e308,
                5e-324,
                math.inf,
                -math.inf,
                math.nan,
                True,
                False,
                self.rng.uniform(-1e9, 1e9),
                self.rng.randint(-(2**70), 2**70),
            )
        )

    def json(self, depth: int = 0) -> Any:
        """A JSON-like value, possibly not JSON at all (tuples, sets, bytes, NaN, odd keys)."""
        roll = self.rng.random()
        if depth > 6 or roll < 0.45:
            return self.rng.choice(
                (
                    self.text(long=0.01),
                    self.number(),
                    None,
                    True,
                    b"\x00bytes",
                    (1, 2),
                    {1, 2},
                    object(),
                    complex(1, 2),
                )
                if self.chance(0.15)
                else (self.text(long=0.01), self.number(), None, True, False)
            )
        if roll < 0.55:
            return self.nested(self.rng.choice((50, 99, 100, 101, 150, 1000, 5000)))
        if roll < 0.8:
            return [self.json(depth + 1) for _ in range(self.rng.randint(0, 4))]
        keys: list[Any] = [self.text(long=0) for _ in range(self.rng.randint(0, 4))]
        if self.chance(0.1):
            keys.append(self.rng.choice((1, None, (1, 2), 1.5, True)))
        return {key: self.json(depth + 1) for key in keys}

    def nested(self, depth: int) -> Any:
        """Dicts and lists nested ``depth`` deep."""
        value: Any = "leaf"
        for level in range(depth):
            value = [value] if level % 2 else {"k": value}
        return value

    def field_value(self, name: str) -> Any:
        """A value for the session field ``name``: of its type or not."""
        kind = SESSION_FIELDS.get(name, str)
        if self.chance(0.1):  # anything at all
            return self.rng.choice((self.not_a_str(), self.number(), self.text(), self.json()))
        if kind is str:
            return self.text()
        if kind is bool:
            return self.rng.choice((True, False, 0, 1, None, "true"))
        if kind is int:
            return self.rng.choice((self.number(), self.rng.randint(0, 10_000), None))
        if kind is float:
            return self.rng.choice((self.number(), self.rng.uniform(0, 2e9), None))
        return self.json()

    def fields(self, known: Sequence[str]) -> dict[str, Any]:
        """Session fields: known names mostly, some unknown or managed by the store."""
        names = list(SESSION_FIELDS)
        fields: dict[str, Any] = {}
        for _ in range(self.rng.randint(0, 5)):
            roll = self.rng.random()
            if roll < 0.04:
                name = self.rng.choice(
                    ("id", "flushed_idx", "message_count", "nope", "", "model config", "\ud800")
                )
            else:
                name = self.rng.choice(names)
            if name == "parent_session_id" and known and self.chance(0.5):
                fields[name] = self.rng.choice(known)
            elif name == "source":
                continue  # the positional argument
            else:
                fields[name] = self.field_value(name)
        return fields

    def message(self) -> Any:
        """A message: half of them valid, the others with hostile values in them (or no dict)."""
        roll = self.rng.random()
        if roll < 0.5:
            return {"role": self.rng.choice(_ROLES), "content": self.clean_text()}
        if roll < 0.53:
            return self.rng.choice(
                (None, "user", ["role", "user"], (("role", "user"),), 3, b"{}", {"role"})
            )
        message: dict[Any, Any] = {}
        if not self.chance(0.05):
            message["role"] = (
                self.rng.choice(_ROLES)
                if self.chance(0.85)
                else self.rng.choice(("", "User", "bot", None, 1, "\ud800", "user\x00"))
            )
        content_roll = self.rng.random()
        if content_roll < 0.6:
            message["content"] = self.text(long=0.05)
        elif content_roll < 0.7:
            message["content"] = [
                {"type": "text", "text": self.text()} for _ in range(self.rng.randint(0, 3))
            ]
        elif content_roll < 0.8:
            message["content"] = self.rng.choice((None, self.json(), self.not_a_str()))
        for _ in range(self.rng.randint(0, 4)):
            key = self.rng.choice(
                (
                    "tool_calls",
                    "tool_call_id",
                    "tool_name",
                    "reasoning",
                    "finish_reason",
                    "timestamp",
                    "token_count",
                    "observed",
                    "reasoning_details",
                    "custom",
                    "\ud800",
                    "",
                    1,
                    None,
                    ("t",),
                )
            )
            if key == "timestamp":
                message[key] = self.rng.choice((self.number(), time.time(), "now", None))
            elif key == "token_count":
                message[key] = self.rng.choice((self.number(), 5, "5"))
            elif key == "observed":
                message[key] = self.rng.choice((True, False, 1, None, "yes"))
            elif key in ("tool_call_id", "tool_name", "reasoning", "finish_reason"):
                message[key] = self.text() if self.chance(0.8) else self.not_a_str()
            else:
                message[key] = self.json()
        if self.chance(0.05):
            return types.MappingProxyType(message)
        return message

    def messages(self, stored: list[dict[str, Any]]) -> Any:
        """A list to flush: the stored messages (or most of them), then new ones."""
        roll = self.rng.random()
        if roll < 0.05:
            return self.rng.choice((None, "text", b"bytes", {"role": "user"}, 5, set(), range(3)))
        given: list[Any] = list(stored)
        if stored and self.chance(0.1):
            given = given[: self.rng.randrange(len(stored))]  # a lagging writer
        elif stored and self.chance(0.05):
            i = self.rng.randrange(len(stored))
            given[i] = {**given[i], "content": "rewritten"}  # history diverges
        given += [self.message() for _ in range(self.rng.randint(0, 4))]
        if self.chance(0.05):
            return tuple(given)
        if self.chance(0.03):
            return iter(given)
        return given

    def limit(self, top: int) -> Any:
        """A page size: 1 to ``top``, or past it, or no int."""
        return self.rng.choice(
            (1, 2, 10, top, top + 1, 0, -1, 2**63, True, 1.5, "10", None, math.nan)
            if self.chance(0.5)
            else (self.rng.randint(1, 50),)
        )

    def query(self) -> Any:
        """A search query: words, operators, any characters, hundreds of words, long words."""
        roll = self.rng.random()
        if roll < 0.05:
            return self.not_a_str()
        if roll < 0.15:
            return " ".join(self.text(long=0) for _ in range(self.rng.randint(100, 400)))
        if roll < 0.2:
            return self.rng.choice(("w" * 2048, "w" * 2049, "漢" * 3000, "x" * 300 + "*"))
        words = []
        for _ in range(self.rng.randint(0, 8)):
            pick = self.rng.random()
            if pick < 0.3:
                words.append(self.rng.choice(_OPERATORS))
            elif pick < 0.5:
                words.append(self.rng.choice(("session", "flush", "hello", "检索", "Grüße")))
            else:
                words.append(self.text(long=0.01))
        return " ".join(words)

    def list_cursor(self, pool: Sequence[str]) -> Any:
        """A listing cursor: none, a real one from ``pool``, a forged one, or anything."""
        roll = self.rng.random()
        if roll < 0.4:
            return None
        if roll < 0.55 and pool:
            return self.rng.choice(pool)
        if roll < 0.8:  # forged: base64 of JSON, as real ones are
            value = self.rng.choice(
                (
                    [self.number(), self.text()],
                    [1.0],
                    {"a": 1},
                    "x",
                    [1.0, 2, 3],
                    [self.text(), 1.0],
                    [10**400, "a"],
                )
            )
            raw = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
            return base64.urlsafe_b64encode(raw).decode().rstrip("=")
        return self.rng.choice((self.text(), self.not_a_str()))

    def search_cursor(self, pool: Sequence[str]) -> Any:
        """A search cursor: none, a real one from ``pool``, a forged one, or anything."""
        roll = self.rng.random()
        if roll < 0.5:
            return None
        if roll < 0.65 and pool:
            return self.rng.choice(pool)
        return self.rng.choice(
            (
                "m0",
                "m-1",
                "m1.5",
                f"m{2**63 - 1}",
                f"m{2**63}",
                "m" + "9" * 40,
                "m\u0663",
                "m",
                "x12",
                self.text(),
                self.not_a_str(),
            )
        )

    def filter(self, known: Sequence[str]) -> Any:
        """A filter: none, one of ``known``, a list, anything."""
        roll = self.rng.random()
        if roll < 0.5:
            return None
        if roll < 0.65 and known:
            return self.rng.choice(known)
        if roll < 0.75:
            return [self.text(long=0) for _ in range(self.rng.randint(0, 3))]
        if roll < 0.8:
            return self.not_a_str()
        return self.text(long=0.01)


# -- the calls -----------------------------------------------------------------------------------


class Inexact(Exception):
    """A call succeeded but its round trip was not exact (a failure)."""


def _short(value: Any, limit: int = 300) -> str:
    try:
        shown = repr(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deep to show>"
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(shown)} chars)"


class Caller:
    """One backend's run: the store, what it holds (as far as the calls know), the tallies."""

    def __init__(self, store: SessionStore, rng: random.Random, outcome: Outcome) -> None:
        self.store = store
        self.checker: Engine = create_engine(store.engine.url, poolclass=NullPool)
        self.rng = rng
        self.hostile = Hostile(rng)
        self.outcome = outcome
        #: Every session there is, with the messages it holds.
        self.known: dict[str, list[dict[str, Any]]] = {}
        self.list_cursors: list[str] = []
        self.search_cursors: list[str] = []
        self.made = 0
        #: Another store on the database (another process, say), and its writes so far.
        self.other = SessionStore(store.engine.url, lock_timeout=_LOCK_TIMEOUT, retry=_RETRY)
        self.others = 0
        #: The session a flush or an append is about to write.
        self.target: str | None = None
        self.calls: Counter[str] = Counter()
        self.successes: Counter[str] = Counter()

    def fingerprint(self) -> tuple[Any, ...]:
        """All of the sessions table, and the message rows' count and highest id.

        Read on a connection of its own, opened for the purpose: what any new
        reader of the database sees.
        """
        with self.checker.connect() as conn:
            sessions = conn.execute(text("SELECT * FROM hermes_sessions ORDER BY id")).all()
            messages = conn.execute(text("SELECT count(*), max(id) FROM hermes_messages")).one()
        return repr(sessions), tuple(messages)

    def replenish(self) -> None:
        """Keep four sessions or more, with a conversation to continue (not a call counted)."""
        while len(self.known) < 4:
            key = self.made = self.made + 1
            sid = f"base-{key}"
            self.store.create_session(sid, source="reliability", user_id=f"u{key % 2 + 1}")
            conversation = Conversation(key)
            self.store.flush(sid, conversation.messages(conversation.end(self.rng.randint(0, 5))))
            self.known[sid] = self.store.get_messages(sid)

    def restart(self) -> None:
        """After a failure: a new store (as a restarted process would have) and what is stored.

        One failure so found is counted once, not again in every call that
        its aftermath would fail.
        """
        self.store.close()
        self.store = SessionStore(self.store.engine.url, lock_timeout=_LOCK_TIMEOUT, retry=_RETRY)
        self.known = {}
        cursor = None
        while True:
            page = self.other.list_sessions(limit=1000, cursor=cursor)
            for session in page.sessions:
                self.known[session["id"]] = self.other.get_messages(session["id"])
            cursor = page.next_cursor
            if cursor is None:
                return

    def has(self, sid: Any) -> bool:
        """Whether ``sid`` names a session there is."""
        return isinstance(sid, str) and sid in self.known

    def ids(self) -> list[str]:
        """The sessions there are, in order."""
        return sorted(self.known)

    def one(self) -> None:
        """Make one call with hostile arguments and judge its outcome."""
        ops: dict[str, tuple[float, Callable[[], tuple[str, Callable[[], None]]]]] = {
            "create_session": (12, self.create_session),
            "ensure_session": (8, self.ensure_session),
            "flush": (25, self.flush),
            "append": (8, self.append),
            "get_messages": (7, self.get_messages),
            "get_session": (4, self.get_session),
            "end_session": (4, self.end_session),
            "delete_session": (5, self.delete_session),
            "list_sessions": (8, self.list_sessions),
            "search": (14, self.search),
            "for_user": (2, self.for_user),
            "SessionStore": (3, self.new_store),
        }
        name = self.rng.choices(list(ops), weights=[w for w, _ in ops.values()])[0]
        self.target = None
        shown, call = ops[name][1]()
        self.calls[name] += 1
        before = self.fingerprint()
        try:
            call()
        except Inexact as exc:
            self.outcome.problem(f"{name}: inexact: {exc} in {shown}")
            self.restart()
            return
        except HermesOrmError as exc:
            kind = type(exc).__name__
            self.outcome.typed[kind] += 1
            self.outcome.sample(kind, f"{shown} -> {exc}")
            if self.fingerprint() != before:
                self.outcome.problem(f"{name} refused ({kind}) but wrote: {shown}")
            if isinstance(exc, DatabaseBusyError | DatabaseUnavailableError):
                self.outcome.problem(f"{name}: {kind} with no other writer: {shown}")
            if self.target is not None and self.has(self.target):
                self.still_current(self.target, after=f"{kind} from {name}")
            return
        except Exception as exc:
            kind = f"{name}: {type(exc).__name__}"
            self.outcome.untyped[kind] += 1
            self.outcome.sample(kind, f"{shown} -> {type(exc).__name__}: {exc}")
            return
        self.successes[name] += 1

    def still_current(self, sid: str, after: str) -> None:
        """After a refusal, another writer adds to ``sid``: the store must see it, and go on.

        Run while the refusal's exception is still alive (the caller handling
        it, logging it): whatever the store kept of the refused call must not
        pin an old view of the database.
        """
        self.others += 1
        theirs = {"role": "user", "content": f"from another writer {self.others}"}
        mine = {"role": "assistant", "content": f"after another writer {self.others}"}
        stored = self.known[sid]
        found = None
        try:
            self.other.flush(sid, [*stored, theirs])
            back = self.store.get_messages(sid)
            if back != [*stored, theirs]:
                found = f"reads {len(back)} messages of {sid!r}, not the {len(stored) + 1} stored"
            else:
                result = self.store.flush(sid, [*stored, theirs, mine])
                if result.cursor != len(stored) + 2:
                    found = f"flushes {result} where {len(stored) + 2} messages are"
        except HermesOrmError as exc:
            found = f"raises {type(exc).__name__}: {exc}"
        if found is not None:
            self.outcome.problem(f"after {after}, the store {found}")
            self.restart()
        else:
            self.known[sid] = [*stored, theirs, mine]

    # Each makes a call's arguments and returns how the call reads, and the call
    # itself, which checks its result (raising Inexact).

    def create_session(self) -> tuple[str, Callable[[], None]]:
        """``create_session``: the fields read back as given."""
        sid = self.hostile.session_id(self.ids())
        source = self.hostile.text() if self.hostile.chance(0.9) else self.hostile.not_a_str()
        fields = self.hostile.fields(self.ids())

        def call() -> None:
            self.store.create_session(sid, source, **fields)
            self.known[sid] = []
            self.check_fields(sid, {"source": source, **fields}, None)

        return f"create_session({_short(sid)}, {_short(source)}, **{_short(fields)})", call

    def ensure_session(self) -> tuple[str, Callable[[], None]]:
        """``ensure_session``: created as given, or NULL fields filled."""
        sid = self.hostile.session_id(self.ids())
        source = self.hostile.text()
        fields = self.hostile.fields(self.ids())
        before = self.store.get_session(sid) if self.has(sid) else None

        def call() -> None:
            created = self.store.ensure_session(sid, source, **fields)
            if created != (not self.has(sid)):
                raise Inexact(f"created is {created}, the session was {'not ' * created}there")
            self.known.setdefault(sid, [])
            self.check_fields(sid, {"source": source, **fields}, before)

        return f"ensure_session({_short(sid)}, {_short(source)}, **{_short(fields)})", call

    def check_fields(
        self, sid: str, given: Mapping[str, Any], before: dict[str, Any] | None
    ) -> None:
        """Session fields read back equal to those given (ensure_session: fills NULLs only)."""
        back = self.store.get_session(sid)
        if back is None:
            raise Inexact("the session is not there")
        for name, value in given.items():
            if before is None:
                if name == "started_at" and value is None:
                    continue  # set to the time of creation
                want = value
            elif name != "source" and before[name] is None and value is not None:
                want = value
            else:
                want = before[name]
            if back[name] != want:
                raise Inexact(f"{name} reads back {_short(back[name])}, not {_short(want)}")

    def flush(self) -> tuple[str, Callable[[], None]]:
        """``flush``: the messages read back are the list flushed (or the stored ones)."""
        sid = (
            self.hostile.session_id(self.ids())
            if self.hostile.chance(0.2) or not self.known
            else self.rng.choice(self.ids())
        )
        stored = self.known.get(sid, []) if isinstance(sid, str) else []
        self.target = sid if self.has(sid) else None
        messages = self.hostile.messages(stored)
        given = list(messages) if isinstance(messages, list | tuple) else None
        verify: Any = (
            self.rng.choice(("all", "last", "full"))
            if self.hostile.chance(0.95)
            else self.rng.choice(("none", "", None, 1, "ALL"))
        )

        def call() -> None:
            result = self.store.flush(sid, messages, verify=verify)
            if given is None or not self.has(sid):
                raise Inexact(f"flushed {type(messages).__name__} of session {sid!r} unknown")
            overlap = min(len(given), len(stored))
            if verify == "last":  # documented: only the message below the cursor is compared
                diverged = overlap > 0 and given[overlap - 1] != stored[overlap - 1]
            else:
                diverged = given[:overlap] != stored[:overlap]
            if diverged:
                raise Inexact(f"a list that rewrites the stored history was taken ({result})")
            want = [*stored, *given[len(stored) :]]
            if result.cursor != len(want) or result.written != len(want) - len(stored):
                raise Inexact(f"{result} for {len(given)} given, {len(stored)} stored")
            back = self.store.get_messages(sid)
            if back != want:
                first = next(
                    (i for i, (a, b) in enumerate(zip(back, want, strict=False)) if a != b), None
                )
                raise Inexact(f"read back differs (at {first}, {len(back)} vs {len(want)})")
            self.known[sid] = back

        shown = f"flush({_short(sid)}, {_short(messages, 600)}, verify={verify!r})"
        return shown, call

    def append(self) -> tuple[str, Callable[[], None]]:
        """``append``: the message read back at the returned position."""
        sid = (
            self.hostile.session_id(self.ids())
            if self.hostile.chance(0.2) or not self.known
            else self.rng.choice(self.ids())
        )
        message = self.hostile.message()
        self.target = sid if self.has(sid) else None

        def call() -> None:
            idx = self.store.append(sid, message)
            if not self.has(sid):
                raise Inexact("appended to a session that is not there")
            stored = self.known[sid]
            back = self.store.get_messages(sid)
            if idx != len(stored) or back != [*stored, message]:
                raise Inexact(f"append returned {idx}; read back differs")
            self.known[sid] = back

        return f"append({_short(sid)}, {_short(message)})", call

    def get_messages(self) -> tuple[str, Callable[[], None]]:
        """``get_messages``: the stored slice."""
        sid = self.hostile.session_id(self.ids())
        offset = (
            self.rng.choice((0, 0, 1, 5)) if self.hostile.chance(0.7) else self.hostile.number()
        )
        limit = (
            self.rng.choice((None, None, 1, 3))
            if self.hostile.chance(0.7)
            else self.hostile.limit(10)
        )

        def call() -> None:
            got = self.store.get_messages(sid, offset=offset, limit=limit)
            if not self.has(sid):
                raise Inexact("read a session that is not there")
            stored = self.known[sid]
            if got != stored[offset : None if limit is None else offset + limit]:
                raise Inexact("the messages read differ from those stored")

        return f"get_messages({_short(sid)}, offset={offset!r}, limit={limit!r})", call

    def get_session(self) -> tuple[str, Callable[[], None]]:
        """``get_session``: found exactly when it is there."""
        sid = self.hostile.session_id(self.ids())

        def call() -> None:
            got = self.store.get_session(sid)
            if (got is None) != (not self.has(sid)):
                raise Inexact(f"found {got is not None}, expected {self.has(sid)}")
            if got is not None and (got["id"] != sid or got["flushed_idx"] != len(self.known[sid])):
                raise Inexact(f"id {got['id']!r}, flushed_idx {got['flushed_idx']}")

        return f"get_session({_short(sid)})", call

    def end_session(self) -> tuple[str, Callable[[], None]]:
        """``end_session``: the reason read back."""
        sid = self.hostile.session_id(self.ids())
        reason = self.hostile.text() if self.hostile.chance(0.9) else self.hostile.not_a_str()

        def call() -> None:
            self.store.end_session(sid, reason)
            got = self.store.get_session(sid)
            if got is None or got["end_reason"] != reason or got["ended_at"] is None:
                raise Inexact("end_reason or ended_at not stored")

        return f"end_session({_short(sid)}, {_short(reason)})", call

    def delete_session(self) -> tuple[str, Callable[[], None]]:
        """``delete_session``: True exactly when it was there, and gone."""
        sid = self.hostile.session_id(self.ids())

        def call() -> None:
            deleted = self.store.delete_session(sid)
            if deleted != (self.has(sid)):
                raise Inexact(f"deleted is {deleted}")
            self.known.pop(sid, None)
            if self.store.get_session(sid) is not None:
                raise Inexact("still there")

        return f"delete_session({_short(sid)})", call

    def list_sessions(self) -> tuple[str, Callable[[], None]]:
        """``list_sessions``: a page of sessions there are, matching the filters."""
        source = self.hostile.filter(["cli", "reliability"])
        user_id = self.hostile.filter(["u1", "u2"])
        limit = self.hostile.limit(1000)
        cursor = self.hostile.list_cursor(self.list_cursors)

        def call() -> None:
            page = self.store.list_sessions(
                source=source, user_id=user_id, limit=limit, cursor=cursor
            )
            if len(page.sessions) > limit:
                raise Inexact(f"{len(page.sessions)} sessions on a page of {limit}")
            for session in page.sessions:
                if session["id"] not in self.known:
                    raise Inexact(f"listed {session['id']!r}, which is not there")
                if source is not None and session["source"] != source:
                    raise Inexact(f"listed a session of source {session['source']!r}")
                if user_id is not None and session["user_id"] != user_id:
                    raise Inexact(f"listed a session of user {session['user_id']!r}")
            if page.next_cursor is not None:
                self.list_cursors.append(page.next_cursor)

        shown = f"list_sessions(source={_short(source)}, user_id={_short(user_id)}, "
        return f"{shown}limit={limit!r}, cursor={_short(cursor)})", call

    def search(self) -> tuple[str, Callable[[], None]]:
        """``search``: hits on stored messages, matching the filters."""
        query = self.hostile.query()
        session_id = self.hostile.filter(self.ids()) if self.hostile.chance(0.3) else None
        source = self.hostile.filter(["cli", "reliability"])
        user_id = self.hostile.filter(["u1"]) if self.hostile.chance(0.2) else None
        role = self.hostile.filter(_ROLES)
        limit = self.hostile.limit(1000)
        cursor = self.hostile.search_cursor(self.search_cursors)

        def call() -> None:
            page = self.store.search(
                query,
                session_id=session_id,
                source=source,
                user_id=user_id,
                role=role,
                limit=limit,
                cursor=cursor,
            )
            roles = (role,) if isinstance(role, str) else role
            if len(page.hits) > limit:
                raise Inexact(f"{len(page.hits)} hits on a page of {limit}")
            for hit in page.hits:
                stored = self.known.get(hit.session_id, [])
                if not 0 <= hit.idx < len(stored) or stored[hit.idx]["role"] != hit.role:
                    raise Inexact(f"hit {hit.session_id!r}/{hit.idx} is no stored message")
                if session_id is not None and hit.session_id != session_id:
                    raise Inexact(f"hit in session {hit.session_id!r}")
                if roles is not None and hit.role not in roles:
                    raise Inexact(f"hit of role {hit.role!r}")
            if page.next_cursor is not None:
                self.search_cursors.append(page.next_cursor)

        shown = (
            f"search({_short(query)}, session_id={_short(session_id)}, source={_short(source)}, "
            f"user_id={_short(user_id)}, role={_short(role)}, limit={limit!r}, "
            f"cursor={_short(cursor)})"
        )
        return shown, call

    def for_user(self) -> tuple[str, Callable[[], None]]:
        """``for_user``: the view lists its user's sessions only."""
        user_id = self.hostile.filter(["u1", "u2"])

        def call() -> None:
            view = self.store.for_user(user_id)
            for session in view.list_sessions(limit=1000).sessions:
                if session["user_id"] != user_id:
                    raise Inexact(f"the view of {user_id!r} lists {session['user_id']!r}'s")

        return f"for_user({_short(user_id)}).list_sessions()", call

    def new_store(self) -> tuple[str, Callable[[], None]]:
        """``SessionStore(url, ...)`` with odd settings: it reads what is stored."""
        settings: dict[str, Any] = {}
        if self.hostile.chance(0.5):
            settings["sqlite_synchronous"] = self.rng.choice(
                ("FULL", "normal", "OFF", "EXTRA", "", "fast", None, 1)
            )
        if self.hostile.chance(0.5):
            settings["lock_timeout"] = self.rng.choice((0, 0.5, 5, -1, math.nan, math.inf, "5"))
        url = self.store.engine.url

        def call() -> None:
            store = SessionStore(url, **settings)
            try:
                sid = self.rng.choice(self.ids())
                if store.get_messages(sid) != self.known[sid]:
                    raise Inexact("a new store reads other messages")
            finally:
                store.close()

        return f"SessionStore(url, **{settings!r})", call


def run(db: Database, *, calls: int, seed: int = 0) -> Outcome:
    """Make ``calls`` hostile calls on ``db``; each must be exact or a typed refusal.

    Args:
        db: A fresh database.
        calls: Calls to make.
        seed: Seeds the generator: the same seed makes the same calls.
    """
    outcome = Outcome("inputs", db.backend)
    started = time.perf_counter()
    caller = Caller(
        SessionStore(db.url, lock_timeout=_LOCK_TIMEOUT, retry=_RETRY), random.Random(seed), outcome
    )
    try:
        caller.store.upgrade()
        for _ in range(calls):
            caller.replenish()
            caller.one()
    finally:
        caller.checker.dispose()
        caller.other.close()
        caller.store.close()
    outcome.work = {
        "calls": sum(caller.calls.values()),
        "successes": sum(caller.successes.values()),
        "typed refusals": sum(outcome.typed.values()),
        "failures": outcome.failures,
    }
    outcome.notes["calls by method (successes)"] = ", ".join(
        f"{name} {count} ({caller.successes[name]})" for name, count in sorted(caller.calls.items())
    )
    outcome.seconds = time.perf_counter() - started
    return outcome
