"""Values as Hermes Agent's SQLite file keeps them, made storable.

Hermes replaces lone surrogates in its text columns as it writes them, but
keeps them, escaped, inside its JSON columns and its multimodal content. A
message here holds valid Unicode only (it is searched and digested), so the
SessionDB adapter and the importer replace them in messages alike; a session's
``model_config`` keeps them, escaped in its JSON, as Hermes does.

Hermes writes its JSON columns with ``json.dumps`` and reads them back parsed:
the adapter stores what Hermes would read back (:func:`hermes_json`).

Hermes binds whatever it is given into its SQLite columns, whose affinity
converts it: a number given for a text column is stored (and read back) as
SQLite's text of it, a whole float given for an integer column as the int.
The adapter converts such values alike (:func:`sqlite_text`,
:func:`sqlite_integer`) instead of refusing them.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sqlite3
import string
from typing import Any

from sqlalchemy import Text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from hermes_orm import _codec
from hermes_orm.errors import InvalidArgumentError, InvalidMessageError

_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
#: A lone surrogate as JSON text writes it escaped (``\ud83d``), any case.
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


#: ``str.translate`` table folding ASCII letters alone, as SQLite's ``lower`` and ``LIKE`` do.
ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


class _AsciiLower(FunctionElement[str]):
    """``lower(x)`` as Hermes' SQLite computes it (see :func:`ascii_lower`)."""

    type = Text()
    name = "ascii_lower"
    inherit_cache = True


@compiles(_AsciiLower)
def _ascii_lower_sqlite(element: _AsciiLower, compiler: SQLCompiler, **kw: Any) -> str:
    return f"lower({compiler.process(element.clauses, **kw)})"


@compiles(_AsciiLower, "postgresql")
def _ascii_lower_postgresql(element: _AsciiLower, compiler: SQLCompiler, **kw: Any) -> str:
    # Under the C collation lower() folds ASCII letters alone (and costs less than
    # under a locale's; a translate() of the 26 letters costs ten times more).
    return f'lower(({compiler.process(element.clauses, **kw)}) COLLATE pg_catalog."C")'


def ascii_lower(value: Any) -> Any:
    """``value`` (an SQL expression) with ASCII letters folded, no others, as SQLite folds.

    SQLite's ``lower`` (and its ``LIKE``) folds ``A`` to ``Z`` only; PostgreSQL's
    ``lower`` folds every letter (and its ``LIKE`` none), so a filter Hermes reads
    as ``LOWER(title) LIKE ?`` would match more there (``Über`` for ``über``: a
    prune deleting what Hermes keeps).
    """
    return _AsciiLower(value)


def like_escaped(text: str) -> str:
    """``text`` as a LIKE pattern of itself: its wildcards and escape (a backslash) escaped."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def ascii_like(value: Any, pattern: str) -> Any:
    """``value LIKE pattern`` (a backslash escaping) as Hermes' SQLite matches it.

    The case of ASCII letters, and of no others, is ignored (:func:`ascii_lower`
    of ``value``; the pattern folded likewise here).
    """
    return ascii_lower(value).like(pattern.translate(ASCII_LOWER), escape="\\")


def scrub(value: Any) -> Any:
    """``value`` with lone surrogates replaced, if it is text; anything else as it is."""
    if isinstance(value, str) and not value.isascii() and _LONE_SURROGATE.search(value):
        return _LONE_SURROGATE.sub("\ufffd", value)
    return value


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate, which no UTF-8 database stores."""
    return _LONE_SURROGATE.search(text) is not None


def scrub_json(value: Any) -> Any:
    """:func:`scrub` through a JSON structure, keys included: a copy of its dicts and lists.

    An object two of whose keys would then be one keeps its keys as they are
    (one value would be lost otherwise): the store refuses it, typed, where it
    is written. (Numbers, None and ASCII text, most of a message, are taken as
    they are with no call: the Hermes mirror copies every new message so.)
    """
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [
            v
            if (t := type(v)) is not dict and t is not list and (t is not str or v.isascii())
            else scrub_json(v)
            for v in value
        ]
    if isinstance(value, dict):
        out = {
            k if type(k) is not str or k.isascii() else scrub(k): v
            if (t := type(v)) is not dict and t is not list and (t is not str or v.isascii())
            else scrub_json(v)
            for k, v in value.items()
        }
        if len(out) < len(value):
            return {k: scrub_json(v) for k, v in value.items()}
        return out
    return value


def hermes_json(value: Any) -> Any:
    """``value`` as Hermes reads back the ``json.dumps`` of it that it stores.

    Tuples come back as lists, dict keys that are numbers, bools or None as
    their JSON text.

    Raises:
        TypeError, ValueError: ``json.dumps`` cannot write it (Hermes raises so too).
    """
    return json.loads(json.dumps(value))


def message_json(key: str, value: Any) -> Any:
    """A message's JSON field ``key`` (``tool_calls``, ...) as Hermes stores it.

    None for a falsy value (Hermes stores NULL), else :func:`hermes_json` of
    it, lone surrogates replaced (a message holds valid Unicode only).

    Raises:
        InvalidMessageError: ``json.dumps`` cannot write it (Hermes raises its
            ``TypeError``), before anything is written.
    """
    if not value:
        return None
    try:
        return scrub_json(hermes_json(value))
    except (TypeError, ValueError) as exc:
        raise InvalidMessageError(f"not JSON: {exc}", key=key) from None


def may_escape_surrogates(json_text: str) -> bool:
    """Whether decoding ``json_text`` may give lone surrogates (a cheap test before walking it).

    Every surrogate pair JSON escapes is also matched: the walk then changes nothing.
    """
    return "\\u" in json_text and _ESCAPED_SURROGATE.search(json_text) is not None


def _stored_as(value: Any, column_type: str) -> Any:
    """What a SQLite column of ``column_type`` affinity holds of ``value``: SQLite's own conversion.

    A value the sqlite3 module cannot bind is returned as it is.
    """
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        conn.execute(f"CREATE TABLE t (v {column_type})")
        try:
            conn.execute("INSERT INTO t VALUES (?)", (value,))
        except (sqlite3.Error, TypeError, ValueError, OverflowError):
            return value
        return conn.execute("SELECT v FROM t").fetchone()[0]


def lookup_key(key: Any) -> str | None:
    """``key`` (a session id, a meta key) as Hermes' file compares it; None if no row holds it.

    A number is compared as its text (SQLite compares it so with a TEXT
    column); text with NUL or a lone surrogate, or what is no text, names no
    row: a lookup by it finds nothing, instead of failing on PostgreSQL's
    stricter types (or on the encoding, as in Hermes' file).
    """
    text = key if isinstance(key, str) else sqlite_text(key)
    return text if isinstance(text, str) and _codec.text_problem(text) is None else None


def sqlite_text(value: Any) -> Any:
    """``value`` as a TEXT column of Hermes' SQLite file holds it.

    Text is as it is: Hermes binds it so, and the sqlite3 module refuses a lone
    surrogate (the store refuses it too, typed; Hermes itself replaces them in
    a message's content, tool name, reasoning and api_content only: those go
    through :func:`scrub` as well). A bool is ``"1"``/``"0"``, an int its
    digits, a float the text SQLite makes of it (``1e20`` is ``"1.0e+20"``,
    infinity ``"Inf"``, NaN is NULL: None). Anything else is returned as it
    is, for the store to take or refuse.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, int):  # bool included: SQLite binds it as 1 or 0
        return str(int(value))
    if isinstance(value, float):  # SQLite's text of a REAL is no Python repr
        return _stored_as(value, "TEXT")
    return value


def scrubbed_text(value: Any) -> Any:
    """:func:`sqlite_text` of a field Hermes stores with its lone surrogates replaced.

    A message's content, tool name, reasoning and ``api_content``: elsewhere
    Hermes binds text as it is.
    """
    return scrub(sqlite_text(value))


def sqlite_integer(value: Any) -> Any:
    """``value`` as an INTEGER column of Hermes' SQLite file reads it back.

    A bool is the int it binds as; a float equal to an int of 64 bits, or text
    that is such a number (``" 12 "``, ``"12.0"``), that int; NaN is NULL
    (None). Anything else is returned as it is, or as the float SQLite keeps
    (a fraction is no count: the store refuses it).
    """
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float | str):
        return _stored_as(value, "INTEGER")
    return value


_ROW_IDS = range(-(2**63), 2**63)


def _row_id_operand(name: str, value: Any) -> Any:
    """``value`` as SQLite compares it with an INTEGER column (its affinity applied).

    An int past 64 bits, which Hermes' sqlite3 cannot bind, is no row's id (as
    elsewhere in the adapter: a lookup by it finds nothing).

    Raises:
        InvalidArgumentError: ``value`` is nothing the sqlite3 module binds.
    """
    if value is not None and not isinstance(value, int | float | str | bytes):
        raise InvalidArgumentError(f"{name} must be a message id, got {_codec.shown(value)}")
    return sqlite_integer(value)


def row_id_equal_to(name: str, value: Any) -> int | None:
    """The message id ``id = value`` matches in Hermes' file; None when no row's can.

    A bool is 1 or 0, text that is a number that number (SQLite's affinity);
    a fraction, other text, bytes, NULL and NaN match no row id (on
    PostgreSQL they would fail the comparison with a bigint instead).
    """
    operand = _row_id_operand(name, value)
    return operand if type(operand) is int and operand in _ROW_IDS else None


def least_row_id_from(name: str, value: Any) -> int | None:
    """The least message id ``id >= value`` admits in Hermes' file; None when none.

    As :func:`row_id_equal_to` reads ``value``; a fraction admits the ids
    above it; text that is no number and bytes sort above every integer in
    SQLite, NULL and NaN compare with nothing: neither admits an id.
    """
    operand = _row_id_operand(name, value)
    if type(operand) is int:  # (one past 64 bits, which Hermes' sqlite3 cannot bind: none)
        return operand if operand in _ROW_IDS else None
    if not isinstance(operand, float) or operand == math.inf:  # (NaN is NULL already)
        return None  # text, bytes, NULL: no id; or past every id
    least = -(2**63) if operand == -math.inf else math.ceil(operand)
    return max(least, -(2**63)) if least < 2**63 else None
