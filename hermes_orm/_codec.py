"""Message dicts to rows and back, validation, and digests.

The mapping is one rule: a key with a column of its own stores a non-``None``
value there; every other key, any known key given as ``None``, and text with
NUL characters (which PostgreSQL text cannot hold) go into the row's ``extra``
JSON. Reading a row applies the rule backwards, so a dict
reads back equal to the dict flushed, and its digest is unchanged by the trip.
An integer ``timestamp`` is the one value kept in both: its column holds it
as a float (for ordering), ``extra`` the int itself, which is what reads back.

Validation happens here, before any statement runs: a message that cannot be
stored exactly raises :class:`~hermes_orm.errors.InvalidMessageError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from hermes_orm.errors import InvalidMessageError, InvalidSessionError

#: The roles a message may have: the chat APIs' and ``session_meta``, the row Hermes
#: Agent's gateway opens each session's transcript with (no message for a model:
#: Hermes skips it when it loads a conversation).
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "session_meta"})

#: Keys stored in a text column.
TEXT_KEYS = (
    "tool_call_id",
    "tool_name",
    "reasoning",
    "reasoning_content",
    "finish_reason",
    "effect_disposition",
    "platform_message_id",
    "api_content",
)
#: Keys stored in a JSON column, any JSON value.
JSON_KEYS = ("tool_calls", "reasoning_details", "codex_reasoning_items", "codex_message_items")
#: Keys stored in a boolean column.
BOOL_KEYS = ("observed", "active", "compacted")

#: Every column ``encode_message`` fills, besides ``session_id`` and ``idx``.
ROW_COLUMNS = (
    "role",
    "content",
    "content_parts",
    *TEXT_KEYS,
    *JSON_KEYS,
    "token_count",
    "timestamp",
    *BOOL_KEYS,
    "digest",
    "extra",
    "key_order",
)

_INT64 = 2**63


def whole_int64(value: Any) -> bool:
    """Whether a stored value is an int from 0 to 2**63 - 1 (a cursor's, a ``history_id``'s).

    Other SQL may leave another there (SQLite keeps text, a real, a larger number).
    """
    return type(value) is int and 0 <= value < _INT64


#: Deepest nesting of lists and dicts a JSON document may have (drivers and the
#: JSON readers of both backends handle it without running out of stack).
MAX_DEPTH = 100


def shown(value: Any, most: int = 80) -> str:
    """``repr(value)`` for an error message, cut to about ``most`` characters.

    A cut one says how long the value is (text in characters, bytes in bytes: what a
    limit counts), else how long it is written out.
    """
    text = repr(value)
    if len(text) <= most:
        return text
    if isinstance(value, str):
        size = f"{len(value):,} characters"
    elif isinstance(value, bytes | bytearray):
        size = f"{len(value):,} bytes"
    else:
        size = f"{len(text):,} characters written out"
    return f"{text[: most - 15]}... ({size})"


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as a database string, or None when it can.

    PostgreSQL text holds no NUL character, and neither backend can store a
    lone surrogate (not valid Unicode, so not UTF-8).
    """
    if "\x00" in text:
        return "contains NUL characters"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains lone surrogate characters (not valid Unicode)"
    return None


def _too_deep(value: Any, start: int = 0) -> bool:
    """Whether lists and dicts in ``value`` nest deeper than :data:`MAX_DEPTH` (no recursion).

    ``start`` is the depth of ``value`` itself (-1: a wrapper of the values checked).
    """
    stack: list[tuple[Any, int]] = [(value, start)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


class EncodedMessage(NamedTuple):
    """A validated message ready to insert.

    Attributes:
        params: Every column in :data:`PARAM_COLUMNS` order, ``None`` where it
            holds nothing, JSON columns as their JSON text (for the flush's
            driver-level statement).
        digest: 16-byte BLAKE2b of the stored column values.
        tool_calls: How many tool calls the message carries (none counted for a
            message marked ``active: False``: a session's ``tool_call_count`` is
            of its live messages, as Hermes Agent counts them).
        documents: The JSON columns that hold a value, as the Python objects
            their text encodes; ``None`` when there are none.
        size: The characters its text columns hold (JSON as stored), for the
            bound of a statement's size.
    """

    params: tuple[Any, ...]
    digest: bytes
    tool_calls: int
    documents: dict[str, Any] | None
    size: int

    @property
    def row(self) -> dict[str, Any]:
        """Every column of :data:`ROW_COLUMNS` as Python objects (``None``: it holds nothing)."""
        row = dict(zip(PARAM_COLUMNS, self.params, strict=True))
        if self.documents:
            row.update(self.documents)
        return row


#: Ints longer than this are written as text once to see that Python will (at least
#: 640 digits are, whatever the interpreter's limit is set to).
_LONG_INT_BITS = 2_000


def _check_json(value: Any, index: int | None, key: str, depth: int = 0) -> None:
    """Refuse what JSON cannot carry exactly (tuples, sets, bytes, NaN, non-str keys)."""
    if depth > MAX_DEPTH:
        raise InvalidMessageError(
            f"JSON nested deeper than {MAX_DEPTH} levels", index=index, key=key
        )
    if isinstance(value, str):
        pass
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidMessageError(
                f"{value!r} is not a finite number (JSON has no NaN or infinity)",
                index=index,
                key=key,
            )
    elif isinstance(value, bool | int) or value is None:
        if value is not None and value.bit_length() > _LONG_INT_BITS:
            try:
                int.__repr__(value)
            except ValueError:  # more digits than sys.get_int_max_str_digits() allows
                raise InvalidMessageError(
                    f"an int of {value.bit_length():,} bits has more digits than Python "
                    f"writes as text ({sys.get_int_max_str_digits():,}): JSON cannot carry it",
                    index=index,
                    key=key,
                ) from None
    elif isinstance(value, list):
        for item in value:
            _check_json(item, index, key, depth + 1)
    elif isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise InvalidMessageError(
                    f"JSON object keys must be strings, got {type(k).__name__}",
                    index=index,
                    key=key,
                )
            _check_json(item, index, key, depth + 1)
    else:
        raise InvalidMessageError(
            f"{type(value).__name__} is not a JSON value (use str, int, float, bool, "
            "None, list or dict)",
            index=index,
            key=key,
        )


# Keys keep their order: the text stored is the document as given, so it reads
# back in the same order (both backends keep JSON text as written), and digests
# of the stored text agree before and after the round trip.
_loads = json.loads


def _make_dumps(*, sort_keys: bool = False) -> Callable[[Any], str]:
    """``JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode``.

    Each message's JSON values are encoded on every flush (and, keys sorted,
    digested), so where CPython's C encoder is there, it is made once and
    called directly (``encode`` makes a new one each call). It has no check
    for circular references: a cycle fails at the recursion limit instead,
    and is reported as too deep.
    """
    encoder = json.JSONEncoder(
        ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=sort_keys
    )
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    basestring = json.encoder.encode_basestring
    chunks = make(None, encoder.default, basestring, None, ":", ",", sort_keys, False, False)
    return lambda value: "".join(chunks(value, 0))


_dumps = _make_dumps()
#: Only ever given documents ``_dumps`` encoded (str keys, no cycle).
_dumps_sorted = _make_dumps(sort_keys=True)


def _as_compared(value: Any) -> Any:
    """``value`` with every bool and integral float as the int it equals (``True == 1 == 1.0``)."""
    kind = type(value)
    if kind is dict:
        return {k: _as_compared(v) for k, v in value.items()}
    if kind is list:
        return [_as_compared(v) for v in value]
    if kind is bool or (kind is float and value.is_integer()):
        return int(value)
    return value


def _digest_text(value: Any, text: str) -> str:
    """The JSON text a document is digested as: one text for every value equal to it.

    Messages equal as dicts must digest the same, so the digest reads a
    document with its keys sorted and its numbers as Python compares them
    (``True``, ``1`` and ``1.0`` alike), while the stored ``text`` keeps the
    document as given. Only a text that may hold a bool or an integral float
    (``true``, ``false``, ``.0``, ``e+``) is rewritten number by number.
    """
    if "true" in text or "false" in text or ".0" in text or "e+" in text:
        return _dumps_sorted(_as_compared(value))
    return _dumps_sorted(value) if "{" in text else text


# Parses text that _dumps wrote (nothing around the document): (value, end).
_parse_dumped: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]

#: JSON-typed columns, in :data:`ROW_COLUMNS` order.
JSON_COLUMNS = frozenset(("content_parts", *JSON_KEYS, "extra", "key_order"))
#: Columns of :attr:`EncodedMessage.params`, in order (``digest`` last).
PARAM_COLUMNS = (*(c for c in ROW_COLUMNS if c != "digest"), "digest")
# Apart from the digest, the params are in ROW_COLUMNS order, the order the
# digest takes the columns in: its input is each non-NULL param behind its
# prefix, in slot order.
_DIGEST_PREFIXES = tuple(f"{column}\x00" for column in PARAM_COLUMNS)
_NO_PARAMS: list[Any] = [None] * len(PARAM_COLUMNS)
_SLOT = {column: i for i, column in enumerate(PARAM_COLUMNS)}
_CONTENT_PARTS = _SLOT["content_parts"]
_EXTRA = _SLOT["extra"]
_KEY_ORDER = _SLOT["key_order"]
_BLAKE2B_128 = hashlib.blake2b(digest_size=16)
_ROLE_PREFIX = _DIGEST_PREFIXES[0]
# EncodedMessage without its generated __new__'s Python frame (the hot path).
_new_encoded = tuple.__new__
#: Most bytes a message's columns may hold: SQLite's longest row (SQLITE_MAX_LENGTH,
#: as it is built by default), below the 1 GiB a PostgreSQL statement may carry.
ROW_BYTES_MAX = 1_000_000_000
#: Characters of text a row holds within ROW_BYTES_MAX whatever they are (UTF-8: at
#: most 4 bytes each); past them, its bytes are counted.
_ROW_CHARACTERS_SURE = ROW_BYTES_MAX // 4 - 1024

#: The keys with a column of their own besides role and content, in the order a
#: message reads back: that of assistant messages as agents build them (text and
#: reasoning, then tool calls), so most messages need no ``key_order`` of their own.
MESSAGE_FIELDS = (
    "reasoning",
    "finish_reason",
    "reasoning_content",
    "reasoning_details",
    "codex_reasoning_items",
    "codex_message_items",
    "tool_calls",
    "tool_call_id",
    "tool_name",
    "effect_disposition",
    "platform_message_id",
    "api_content",
    "token_count",
    "timestamp",
    *BOOL_KEYS,
)
_RANK = {key: rank for rank, key in enumerate(("role", "content", *MESSAGE_FIELDS))}
_FIELD_SET = frozenset(MESSAGE_FIELDS)
#: Where every other key reads back: after them, in the order it was given.
_OTHERS_RANK = len(_RANK)


# What a message key holds, its column's slot in the params, and its read rank.
_ROLE, _CONTENT, _TEXT, _BOOL, _STAMP, _COUNT, _JSON, _OTHER = range(8)
_KINDS = {
    "role": _ROLE,
    "content": _CONTENT,
    **dict.fromkeys(TEXT_KEYS, _TEXT),
    **dict.fromkeys(BOOL_KEYS, _BOOL),
    "timestamp": _STAMP,
    "token_count": _COUNT,
    **dict.fromkeys(JSON_KEYS, _JSON),
}
_KEYS: dict[str, tuple[int, int, int]] = {
    key: (kind, _SLOT[key], _RANK[key]) for key, kind in _KINDS.items()
}
_UNKNOWN = (_OTHER, _EXTRA, _OTHERS_RANK)
_STR_KINDS = frozenset((_CONTENT, _TEXT))


def _find_problem(message: Mapping[str, Any], index: int | None) -> InvalidMessageError | None:
    """Walk ``message`` for what makes it unstorable, for a precise error (the slow path)."""
    for key, value in message.items():
        if not isinstance(key, str):
            return InvalidMessageError(
                f"message keys must be strings, got {type(key).__name__} {key!r}", index=index
            )
        try:
            _check_json(value, index, key)
        except InvalidMessageError as exc:
            return exc
    return None


def _to_json(value: Any, index: int | None, key: str, whole: Mapping[str, Any]) -> str:
    """JSON text of ``value`` (keys in their order), refused unless it parses back equal."""
    try:
        text = _dumps(value)
    except (TypeError, ValueError, RecursionError):
        raise _find_problem(whole, index) or InvalidMessageError(
            "not a JSON value", index=index, key=key
        ) from None
    if _parse_dumped(text, 0)[0] != value:
        # Tuples, non-str keys: JSON would read them back as something else.
        raise _find_problem(whole, index) or InvalidMessageError(
            "does not survive a JSON round trip", index=index, key=key
        )
    # Only a text with that many brackets can nest that deep: most are looked at no further.
    # (The extra document gathers a message's own values: it is no level of theirs.)
    if text.count("[") + text.count("{") > MAX_DEPTH and _too_deep(value, -(key == "extra")):
        raise _find_problem(whole, index) or InvalidMessageError(
            f"JSON nested deeper than {MAX_DEPTH} levels", index=index, key=key
        )
    return text


def _column_value(key: str, value: Any, index: int | None) -> Any:
    """Type-check the value of a key that has a scalar column; return what it stores."""
    if key in TEXT_KEYS:
        if not isinstance(value, str):
            raise InvalidMessageError(
                f"must be a str or None, got {type(value).__name__}", index=index, key=key
            )
        return value if type(value) is str else str.__str__(value)
    if key in BOOL_KEYS:
        if not isinstance(value, bool):
            raise InvalidMessageError(
                f"must be a bool or None, got {type(value).__name__}", index=index, key=key
            )
        return value
    if key == "token_count":
        if isinstance(value, bool) or not isinstance(value, int) or not -_INT64 <= value < _INT64:
            raise InvalidMessageError("must be a 64-bit int or None", index=index, key=key)
        return int(value)
    # timestamp: its column holds the float (an int also goes to extra, see encode_message)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessageError(
            "must be Unix epoch seconds (int or float) or None", index=index, key=key
        )
    try:
        stamp = float(value)
    except OverflowError:
        stamp = math.inf
    if not math.isfinite(stamp):
        raise InvalidMessageError("must be a finite number", index=index, key=key)
    return stamp


def encode_message(message: Any, index: int | None = None) -> EncodedMessage:
    """Validate ``message`` and map it onto the columns of ``hermes_messages``.

    Keys with a column of their own must hold that column's type; JSON values
    must parse back equal from their JSON text (keys in order, no NaN);
    no string may hold a lone surrogate. The digest is taken of the stored
    column values, so a message read back digests the same.

    Args:
        message: A message dict (``role`` required, see the module docstring).
        index: Its position in the caller's list, for error messages.

    Returns:
        The row values (without ``session_id`` and ``idx``), the digest, and
        the number of tool calls the message carries.

    Raises:
        InvalidMessageError: The message cannot be stored exactly.
    """
    if type(message) is not dict:
        if not isinstance(message, Mapping):
            raise InvalidMessageError(
                f"a message must be a dict, got {type(message).__name__}", index=index
            )
        # A dict subclass is stored as the dict it holds (what == compares), even
        # if its keys() or items() leave some out; another Mapping, as it reads.
        message = dict(dict.items(message)) if isinstance(message, dict) else dict(message)
    role = message.get("role")
    if role is None:
        raise InvalidMessageError("missing 'role'", index=index, key="role")
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidMessageError(
            f"unknown role {role!r}; expected one of {sorted(ROLES)}", index=index, key="role"
        )

    # Every flush encodes each new message: the common cases cost one dict
    # lookup and an exact type check; anything else takes the long way.
    params = _NO_PARAMS.copy()
    params[0] = role
    # Each column's part of the digest input, by slot (see _DIGEST_PREFIXES).
    pieces = _NO_PARAMS.copy()
    pieces[0] = _ROLE_PREFIX + role
    documents: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    exact_stamp: int | None = None
    tool_calls = 0
    size = 0  # characters of the text columns (the rest are numbers, a digest: bounded)
    last = 0  # the read rank of the key before
    in_read_order = True
    for key, value in message.items():
        # A key that is not a str finds no column: it goes to extra, whose JSON
        # round trip refuses it (with _find_problem's precise error).
        kind, slot, rank = _KEYS.get(key, _UNKNOWN)
        if rank < last:
            in_read_order = False
        last = rank
        if kind == _ROLE:
            continue
        if value is None or kind == _OTHER:
            extra[key] = value
            continue
        stored = value  # what the column holds
        if kind in _STR_KINDS:
            if type(value) is not str:
                if isinstance(value, str):
                    stored = str.__str__(value)
                elif kind == _TEXT:
                    stored = _column_value(key, value, index)  # raises: not a str
                elif isinstance(value, list):
                    documents["content_parts"] = value
                    slot = _CONTENT_PARTS
                    stored = _to_json(value, index, key, message)  # escapes any NUL
                    params[slot] = stored
                    size += len(stored)
                    pieces[slot] = f"{_DIGEST_PREFIXES[slot]}{_digest_text(value, stored)}"
                    continue
                else:
                    raise InvalidMessageError(
                        "content must be a str, a list of parts or None, "
                        f"got {type(value).__name__}",
                        index=index,
                        key=key,
                    )
            if "\x00" in stored:
                # PostgreSQL text cannot hold NUL; the extra JSON can (escaped), losslessly.
                extra[key] = stored
                continue
            size += len(stored)
        elif (kind == _STAMP and type(value) is float and math.isfinite(value)) or (
            kind == _COUNT and type(value) is int and -_INT64 <= value < _INT64
        ):
            pass  # stored as given
        elif kind == _JSON:
            documents[key] = value
            if key == "tool_calls":
                tool_calls = tool_call_count(value)
            params[slot] = stored = _to_json(value, index, key, message)
            size += len(stored)
            pieces[slot] = f"{_DIGEST_PREFIXES[slot]}{_digest_text(value, stored)}"
            continue
        elif kind != _BOOL or type(value) is not bool:
            stored = _column_value(key, value, index)
            if kind == _STAMP and isinstance(value, int):
                # The int reads back (from extra) as given; digested as the number
                # it is: as the float when that is equal to it, else as itself.
                exact_stamp = int(value)
                if stored != exact_stamp:
                    params[slot] = stored
                    pieces[slot] = f"{_DIGEST_PREFIXES[slot]}{exact_stamp}"
                    continue
        params[slot] = stored
        # -0.0 equals 0.0 (and SQLite reads it back so): one piece for both.
        digested = (stored or 0.0) if kind == _STAMP else stored
        pieces[slot] = f"{_DIGEST_PREFIXES[slot]}{digested}"
    if extra:
        params[_EXTRA] = text = _to_json(extra, index, "extra", message)
        pieces[_EXTRA] = _DIGEST_PREFIXES[_EXTRA] + _digest_text(extra, text)
        documents["extra"] = extra
    if exact_stamp is not None:  # after the digest's piece: equal numbers digest alike
        stored_extra = {**extra, "timestamp": exact_stamp}
        params[_EXTRA] = _dumps(stored_extra)
        documents["extra"] = stored_extra
    if not in_read_order:
        # Kept only where it differs from the read order, and outside the digest:
        # messages equal as dicts are the same message, whatever their order.
        documents["key_order"] = order = list(message)
        params[_KEY_ORDER] = _dumps(order)

    try:
        raw = "\x00".join(filter(None, pieces)).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessageError(
            "text is not valid Unicode (lone surrogate characters cannot be stored)",
            index=index,
            key=_surrogate_key(message),
        ) from exc
    if params[_EXTRA] is not None:
        size += len(params[_EXTRA])
    if params[_KEY_ORDER] is not None:
        size += len(params[_KEY_ORDER])
    if size > _ROW_CHARACTERS_SURE:
        stored_bytes = sum(len(p.encode("utf-8")) for p in params if type(p) is str)
        if stored_bytes > ROW_BYTES_MAX:
            raise InvalidMessageError(
                f"the message takes {stored_bytes:,} bytes of text stored, more than a row "
                f"may hold ({ROW_BYTES_MAX:,})",
                index=index,
            )
    hasher = _BLAKE2B_128.copy()
    hasher.update(raw)
    params[-1] = digest = hasher.digest()
    if tool_calls and message.get("active") is False:
        tool_calls = 0
    return _new_encoded(
        EncodedMessage, (tuple(params), digest, tool_calls, documents or None, size)
    )


def tool_call_count(value: Any) -> int:
    """How many tool calls a ``tool_calls`` value holds: a list its length, None none, else one."""
    if value is None:
        return 0
    return len(value) if isinstance(value, list) else 1


def _surrogate_key(message: dict[Any, Any]) -> Any:
    """The first key of ``message`` whose name or value holds a lone surrogate (None: none)."""

    def holds(value: Any) -> bool:
        if isinstance(value, str):
            return text_problem(value.replace("\x00", "")) is not None
        if isinstance(value, list):
            return any(map(holds, value))
        if isinstance(value, dict):
            return any(holds(k) or holds(v) for k, v in value.items())
        return False

    return next((key for key, value in message.items() if holds(key) or holds(value)), None)


def message_digest(message: Any, index: int | None = None) -> bytes:
    """Digest of a message as :func:`encode_message` would store it."""
    return encode_message(message, index).digest


#: Columns a message is read back from, in the order :func:`decode_row` expects.
READ_COLUMNS = ("extra", "key_order", "role", "content", "content_parts", *MESSAGE_FIELDS)
_READ_JSON = frozenset(i for i, c in enumerate(READ_COLUMNS) if c in JSON_COLUMNS)


def _read_json(text: str) -> Any:
    """The value of a stored JSON text (what ``json.loads`` returns, without its overhead).

    The scanner reads one value from the start; a text it does not take whole
    (whitespace around it, written by another tool) goes to the full parser.
    """
    try:
        value, end = _parse_dumped(text, 0)
    except StopIteration:
        return _loads(text)
    return value if end == len(text) else _loads(text)


class Flags(dict[Any, bool]):
    """A boolean column's stored values as Python's: SQLite's 0 and 1, PostgreSQL's own.

    Another value (text other SQL wrote, ``'false'``, or ``2``) is none of them:
    a ValueError naming the column, where ``bool`` would read it as True.
    """

    def __init__(self, column: str) -> None:
        super().__init__({False: False, True: True})
        self.column = column

    def __missing__(self, value: Any) -> bool:
        raise ValueError(f"the column {self.column} holds {value!r}, not a boolean (0 or 1)")


#: The boolean columns' readers, by their place in :data:`READ_COLUMNS`.
_READ_BOOL = {i: Flags(c) for i, c in enumerate(READ_COLUMNS) if c in BOOL_KEYS}
#: The names a compiled decoder reads (see :func:`_read_expression`).
_DECODER_NAMES = {"_read_json": _read_json} | {f"_flag{i}": f for i, f in _READ_BOOL.items()}


def decode_row(values: Sequence[Any], *, driver_parses_json: bool) -> dict[str, Any]:
    """Rebuild the message dict from driver values in :data:`READ_COLUMNS` order.

    Args:
        values: One row as the driver returned it.
        driver_parses_json: The driver returns JSON columns parsed (psycopg);
            otherwise they are text (sqlite3), and booleans are 0/1.
    """
    if not driver_parses_json:
        values = [
            None
            if v is None
            else _read_json(v)
            if i in _READ_JSON
            else _READ_BOOL[i][v]
            if i in _READ_BOOL
            else v
            for i, v in enumerate(values)
        ]
    return _assemble(values)


#: A row decoder made by :func:`_decoder`: the message, or None where the row is
#: not of the decoder's shape (a column it reads is NULL) or a JSON column holds
#: JSON null (written by another client), which reads as no key, as a NULL does.
_Decoder = Callable[[Sequence[Any]], dict[str, Any] | None]
#: The decoders, by (the columns holding values, key_order): see :func:`_shape`.
_DECODERS: dict[tuple[int, str | None], _Decoder | None] = {}
#: The decoders of rows of a key_order and a number of NULLs, the newest first:
#: rows of one shape share them (see :func:`decode_rows`).
_GUESSES: dict[tuple[str | None, int], tuple[_Decoder, ...]] = {}
#: How many decoders :data:`_GUESSES` keeps per key: an agent's rows of alike
#: columns (an assistant's tool call and a tool's result) take turns.
_GUESSED = 4
_DECODERS_MAX = 4_096


def decode_rows(rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """:func:`decode_row` of each row (driver values in :data:`READ_COLUMNS` order).

    The rows hold their JSON columns as text (on PostgreSQL too: the store
    reads them as text, which is parsed here faster than the driver parses
    them) and booleans as booleans or 0/1.

    Rows alike (the same columns holding values, the same ``key_order``) are
    decoded by one function written for them: a dict display of just those
    columns, in the message's key order, with no loop per column. A
    transcript holds a handful of such shapes; reading 10,000 messages then
    costs little beyond the driver's fetch of them.

    A row's decoder is found from its ``key_order`` and its number of NULLs
    (one C call), not from its columns one by one: each decoder of rows so
    far of that key is tried, the newest first. A decoder checks that
    the columns it reads hold values, before it parses any, which with as
    many NULLs means the others are NULL: a row it does not fit is found at
    once. A row none fits has its shape computed and gets its own.
    """
    out: list[dict[str, Any]] = []
    append = out.append
    guesses = _GUESSES
    for row in rows:
        if row[0] is None:  # no extra keys (those go the general way)
            key = (row[1], row.count(None))
            message = None
            tried = guesses.get(key, ())
            for decode in tried:
                message = decode(row)
                if message is not None:
                    break
            else:
                exact = _decoder_of(row)
                if exact is not None and exact not in tried:
                    if len(guesses) >= _DECODERS_MAX:
                        guesses.clear()
                    guesses[key] = (exact, *tried[: _GUESSED - 1])
                    message = exact(row)
            if message is not None:
                append(message)
                continue
        append(decode_row(row, driver_parses_json=False))
    return out


def _decoder_of(row: Sequence[Any]) -> _Decoder | None:
    """The decoder of ``row``'s shape (made once, then kept)."""
    key = (_shape(row), row[1])
    try:
        return _DECODERS[key]
    except KeyError:
        if len(_DECODERS) >= _DECODERS_MAX:
            _DECODERS.clear()
        decode = _DECODERS[key] = _decoder(*key)
        return decode


def _shape(row: Sequence[Any]) -> int:
    """A bit per column from ``content`` on (in :data:`READ_COLUMNS` order) holding a value."""
    return sum(1 << bit for bit, value in enumerate(row[3:]) if value is not None)


def _decoder(present: int, order: str | None) -> _Decoder | None:
    """The decoder of rows with the ``present`` columns and the ``order`` of keys; None: none fits.

    It is compiled from a dict display whose keys are this module's column
    names only (a ``key_order`` naming anything else gets no decoder).
    """
    values: dict[str, str] = {"role": "r[2]"}
    columns = READ_COLUMNS[3:]
    holds = [column for bit, column in enumerate(columns) if present >> bit & 1]
    if "content" in holds or "content_parts" in holds:
        column = "content" if "content" in holds else "content_parts"
        values["content"] = _read_expression(column)
    for column in holds:
        if column in _FIELD_SET:
            values[column] = _read_expression(column)
    keys: Any = list(values)
    if order is not None:
        try:
            keys = json.loads(order)
        except ValueError:
            return None
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(values):
            return None
    # Not of this shape: a column read is NULL. A JSON column's value is read
    # once, into a name the display then uses.
    misfits = [f"r[{READ_COLUMNS.index(column)}] is None" for column in ("role", *holds)]
    for number, key in enumerate(values):
        column = "content_parts" if key == "content" and "content" not in holds else key
        if column in JSON_COLUMNS:
            misfits.append(f"(v{number} := {values[key]}) is None")
            values[key] = f"v{number}"
    body = ", ".join(f"{key!r}: {values[key]}" for key in keys)
    source = f"None if {' or '.join(misfits)} else {{{body}}}"
    function: _Decoder = eval(f"lambda r: {source}", _DECODER_NAMES)
    return function


def _read_expression(column: str) -> str:
    """How a decoder reads ``column`` (a value there) from row ``r``."""
    place = READ_COLUMNS.index(column)
    if column in JSON_COLUMNS:
        return f"_read_json(r[{place}])"
    return f"_flag{place}[r[{place}]]" if column in BOOL_KEYS else f"r[{place}]"


def row_to_message(row: Any) -> dict[str, Any]:
    """Rebuild the message dict from a row (an ORM object or a Core row)."""
    return _assemble([getattr(row, column) for column in READ_COLUMNS])


def _assemble(values: Sequence[Any]) -> dict[str, Any]:
    """The message of a row's values (parsed, in :data:`READ_COLUMNS` order).

    Its keys come in the order ``key_order`` holds, else in the read order:
    ``role``, ``content``, the other keys with a column (in :data:`MESSAGE_FIELDS`
    order), then the keys ``extra`` alone holds, as they came.
    """
    extra, order, role, content, parts = values[:5]
    fields = values[5:]
    if extra is not None and type(extra) is not dict:
        raise TypeError(f"the extra keys are {type(extra).__name__}, not an object")
    if order is not None and type(order) is not list:
        raise TypeError(f"the key order is {type(order).__name__}, not a list")
    message: dict[str, Any] = {"role": role}
    if content is not None:
        message["content"] = content
    elif parts is not None:
        message["content"] = parts
    if extra and "content" not in message and "content" in extra:
        message["content"] = extra["content"]  # None, or text with NUL
    if not extra or _FIELD_SET.isdisjoint(extra):
        for key, value in zip(MESSAGE_FIELDS, fields, strict=True):
            if value is not None:
                message[key] = value
        if extra:
            message.update(extra)
    else:
        # Keys given as None or as text with NUL, an int timestamp: in their place.
        for key, value in zip(MESSAGE_FIELDS, fields, strict=True):
            if value is not None:
                message[key] = value
            elif key in extra:
                message[key] = extra[key]
        for key, value in extra.items():
            if key not in _RANK:
                message[key] = value
        if "timestamp" in extra:  # the int, as given (its column holds the float)
            message["timestamp"] = extra["timestamp"]
    if order is not None:  # (keys it does not name, set by other SQL, after those it names)
        ordered = {key: message[key] for key in order}
        message = ordered | message if len(ordered) < len(message) else ordered
    return message


#: The longest session id a store takes (the column's length).
SESSION_ID_MAX = 255


def check_session_id(session_id: Any) -> str:
    """``session_id``, if a store takes it as one (else :class:`InvalidSessionError`)."""
    if not isinstance(session_id, str) or not session_id or len(session_id) > SESSION_ID_MAX:
        raise InvalidSessionError(
            "a session id must be a non-empty str of at most 255 characters, "
            f"got {shown(session_id)}"
        )
    problem = text_problem(session_id)
    if problem is not None:
        raise InvalidSessionError(f"session id {shown(session_id)} {problem}")
    return session_id


#: Values a copy takes as they are: nothing changes them in place.
_LEAVES = frozenset({str, int, float, bool, type(None)})


def copied(value: Any) -> Any:
    """A copy of a message (its dicts and lists copied, all the way down) to compare with later.

    The strings and numbers in it are the caller's own (they cannot change);
    a dict or list the caller changes in place afterwards no longer equals it.
    """
    kind = type(value)
    if kind is dict:
        return {k: v if type(v) in _LEAVES else copied(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _LEAVES else copied(v) for v in value]
    if isinstance(value, Mapping):
        # A dict subclass is the dict it holds (as == compares it), whatever its items() say.
        items = dict.items(value) if isinstance(value, dict) else value.items()
        return {k: copied(v) for k, v in items}
    if isinstance(value, list):
        return [copied(v) for v in value]
    return value
