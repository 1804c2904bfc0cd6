"""Text as Hermes Agent keeps it, made storable: lone surrogates become U+FFFD.

Hermes replaces lone surrogates in its text columns as it writes them, but
keeps them, escaped, inside its JSON columns and its multimodal content. No
database this package stores into can hold them (they are not valid Unicode),
so the SessionDB adapter and the importer replace them everywhere alike.
"""

from __future__ import annotations

import re
from typing import Any

_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
#: A lone surrogate as JSON text writes it escaped (``\ud83d``), any case.
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def scrub(value: Any) -> Any:
    """``value`` with lone surrogates replaced, if it is text; anything else as it is."""
    if isinstance(value, str) and _LONE_SURROGATE.search(value):
        return _LONE_SURROGATE.sub("\ufffd", value)
    return value


def scrub_json(value: Any) -> Any:
    """:func:`scrub` through a JSON structure, keys included."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [scrub_json(v) for v in value]
    if isinstance(value, dict):
        return {scrub(k) if isinstance(k, str) else k: scrub_json(v) for k, v in value.items()}
    return value


def may_escape_surrogates(json_text: str) -> bool:
    """Whether decoding ``json_text`` may give lone surrogates (a cheap test before walking it).

    Every surrogate pair JSON escapes is also matched: the walk then changes nothing.
    """
    return "\\u" in json_text and _ESCAPED_SURROGATE.search(json_text) is not None
