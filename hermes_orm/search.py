"""Full-text search over stored messages, one query language on both backends.

A query is parsed here, never handed to the database as syntax:

- ``docker compose``: every word must match (whole words, any letter case);
- ``"exact phrase"``: the words next to each other, in this order;
- ``docker OR podman``: either; ``OR`` (upper case) binds tighter than the
  implicit AND, so ``docker OR podman compose`` means (docker or podman) and compose;
- ``-excluded`` / ``-"a phrase"``: hits must not contain it;
- ``deploy*``: words starting with ``deploy``.

Words are cut where FTS5's ``unicode61`` tokenizer cuts them (see
:mod:`hermes_orm._search_text`): ``foo.bar`` is the phrase ``"foo bar"``.
Tokens in scripts written without spaces (CJK, kana, Hangul, Thai, ...) match
anywhere inside the text, so ``部署`` finds ``我们部署项目``; a stretch without
spaces that joins such a token to others by punctuation is looked for as
written, so ``100%完成`` finds ``达成100%完成率`` but not ``达成100完成率``. Whatever string a
user types yields hits or a :class:`~hermes_orm.errors.SearchQueryError` (a
query with nothing to look for); quotes that do not close, a stray ``OR`` or
``-`` and punctuation are read leniently.

Hits come newest first (by message id, the order messages were written), so a
keyset cursor pages through them stably while new messages arrive. ``rank``
counts the places the query matched in the hit, and ``snippet`` shows the best
window with ``highlights`` giving the matched spans.

What is indexed is each message's *body*: text content, the text of its
content parts, its tool name and its tool calls' names and arguments, up to
``BODY_LIMIT`` characters (a huge tool output is searchable by its beginning).
"""

from __future__ import annotations

import hashlib
import re
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection

from hermes_orm import _codec
from hermes_orm._dialects import driver_sql, fetch_driver_rows, rows_for_values
from hermes_orm._search_text import (
    FOLDED,
    FOLDED_TO,
    fold,
    fold_lowered,
    is_unsegmented,
    lower,
    separator_class,
    token_class,
    token_pattern,
    tokens,
    word_cut,
)
from hermes_orm.errors import SearchQueryError

#: Longest query accepted, in characters.
MAX_QUERY_CHARS = 2_048
#: Most hits one page may hold.
MAX_LIMIT = 1_000
#: Most distinct values one filter (sources, roles) may list: each is a
#: parameter of the statement, and the drivers take a few tens of thousands.
MAX_FILTER_VALUES = 1_000
#: Characters of body shown around the matches.
SNIPPET_CHARS = 160


# -- the parsed query -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Leaf:
    """One thing a message must contain.

    ``words`` leaves are a word or a phrase (tokens next to each other, the last
    one a prefix when ``prefix``); a ``substring`` leaf is one token of a script
    written without spaces, matched anywhere in the text.
    """

    tokens: tuple[str, ...]
    substring: bool = False
    prefix: bool = False


#: Leaves that must all match (a quoted phrase mixing scripts gives several).
Term = tuple[Leaf, ...]


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: every group must match (one of its terms), no excluded term may."""

    groups: tuple[tuple[Term, ...], ...]
    excluded: tuple[Term, ...]


@dataclass(frozen=True, slots=True)
class _Item:
    text: str
    negated: bool
    prefix: bool
    quoted: bool


_ITEM = re.compile(r'(-?)(?:"([^"]*)"?|([^\s"]+))(\**)')


def _items(query: str) -> list[_Item]:
    items = []
    for match in _ITEM.finditer(query):
        minus, phrase, word, stars = match.groups()
        if phrase is not None:
            items.append(_Item(phrase, bool(minus), bool(stars), True))
            continue
        word += stars
        negated = bool(minus)
        if word.startswith("-"):  # "--x": one minus is enough
            word = word.lstrip("-")
            negated = True
        stripped = word.rstrip("*")
        items.append(_Item(stripped, negated, stripped != word, False))
    return items


def _written_together(chunk: str) -> str | None:
    """The text a stretch of query without spaces is looked for as, if it is one substring.

    A stretch that joins a token of a script written without spaces to other
    tokens by punctuation (``100%完成``, ``部署,测试``) is text written without
    spaces: it is looked for as written, from its first token to its last,
    punctuation included. None for any other stretch (its tokens are leaves).
    """
    found = list(token_pattern().finditer(chunk))
    if len(found) < 2 or any(word_cut(m.group()) is not None for m in found):
        return None
    if not any(is_unsegmented(m.group()) for m in found):
        return None
    return chunk[found[0].start() : found[-1].end()]


def _term(item: _Item) -> Term:
    leaves: list[Leaf] = []
    run: list[str] = []
    for chunk in item.text.split():
        together = _written_together(chunk)
        if together is not None:
            if run:
                leaves.append(Leaf(tuple(run)))
                run = []
            leaves.append(Leaf((together,), substring=True))
            continue
        run = _add_tokens(tokens(chunk), leaves, run)
    if run:
        leaves.append(Leaf(tuple(run), prefix=item.prefix))
    return tuple(leaves)


def _add_tokens(found: list[str], leaves: list[Leaf], run: list[str]) -> list[str]:
    """Add the leaves of ``found`` (tokens in order) to ``leaves``; returns the open phrase."""
    for token in found:
        cut = word_cut(token)
        if cut is not None:
            # Longer words are not indexed on PostgreSQL: match by their start.
            run.append(cut)
            leaves.append(Leaf(tuple(run), prefix=True))
            run = []
        elif is_unsegmented(token):
            if run:
                leaves.append(Leaf(tuple(run)))
                run = []
            leaves.append(Leaf((token,), substring=True))
        else:
            run.append(token)
    return run


@lru_cache(maxsize=512)
def _check(query: str) -> None:
    parse_query(query)


def check_query(query: Any) -> None:
    """Refuse what :func:`parse_query` refuses (a search checks it before it connects).

    Raises:
        SearchQueryError: As :func:`parse_query`.
    """
    if not isinstance(query, str):
        raise SearchQueryError(f"a search query must be a str, got {type(query).__name__}")
    _check(query)  # (remembered by text, as the statements made of it are)


def parse_query(query: str) -> Query:
    """Parse ``query`` into a :class:`Query`.

    Raises:
        SearchQueryError: ``query`` is not a string, is too long, or has nothing
            to look for (only spaces, punctuation or exclusions).
    """
    if not isinstance(query, str):
        raise SearchQueryError(f"a search query must be a str, got {type(query).__name__}")
    if len(query) > MAX_QUERY_CHARS:
        raise SearchQueryError(
            f"a search query holds at most {MAX_QUERY_CHARS} characters, got {len(query)}"
        )
    problem = _codec.text_problem(query)
    if problem is not None:
        raise SearchQueryError(f"a search query {problem}")
    # The items that say something, each with its term (None: an OR). An item of no
    # words (`!!!`, a lone `-`) is dropped, and a run of ORs is one, so that neither
    # turns the OR around it into the word "or": `a OR OR b`, `a OR !!! OR b`,
    # `a OR - b` are `a OR b`.
    kept: list[tuple[_Item, Term | None]] = []
    for item in _items(query):
        if item.text == "OR" and not item.quoted and not item.negated and not item.prefix:
            if not kept or kept[-1][1] is not None:
                kept.append((item, None))
        elif words := _term(item):
            kept.append((item, words))
    groups: list[list[Term]] = []
    excluded: list[Term] = []
    join_next = False
    for position, (item, found) in enumerate(kept):
        term = found
        if term is None:
            following = kept[position + 1][0] if position + 1 < len(kept) else None
            # OR joins the positive term after it to the last positive term before
            # it (an exclusion between them aside: `a -b OR c` is (a OR c) -b); at
            # the start, at the end or before an exclusion, it is the word "or".
            if groups and following is not None and not following.negated:
                join_next = True
                continue
            term = _term(_Item("or", False, False, True))
        if item.negated:
            excluded.append(term)
        elif join_next:
            groups[-1].append(term)
        else:
            groups.append([term])
        join_next = False
    if not groups:
        raise SearchQueryError(
            f"search query {query!r} has nothing to look for: give at least one word "
            "(exclusions alone are not a search)"
        )
    return Query(tuple(tuple(group) for group in groups), tuple(excluded))


# -- hits ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A message that matched.

    Attributes:
        session_id, idx: Where the message is (``get_messages(session_id)[idx]``).
        message_id: The row id; hits are ordered by it, newest first.
        role, timestamp: Of the message.
        rank: How many places of the message the query matched.
        snippet: The best window of the message's text, on one line.
        highlights: ``(start, end)`` offsets of the matches in ``snippet``.
    """

    session_id: str
    idx: int
    message_id: int
    role: str
    timestamp: float | None
    rank: float
    snippet: str
    highlights: tuple[tuple[int, int], ...]

    def marked(self, before: str = "[", after: str = "]") -> str:
        """The snippet with every match wrapped in ``before`` ... ``after``."""
        parts = []
        position = 0
        for start, end in self.highlights:
            parts += [self.snippet[position:start], before, self.snippet[start:end], after]
            position = end
        parts.append(self.snippet[position:])
        return "".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the hit."""
        return {
            "session_id": self.session_id,
            "idx": self.idx,
            "message_id": self.message_id,
            "role": self.role,
            "timestamp": self.timestamp,
            "rank": self.rank,
            "snippet": self.snippet,
            "highlights": [list(span) for span in self.highlights],
        }


@dataclass(frozen=True, slots=True)
class SearchPage:
    """One page of hits; pass ``next_cursor`` back as ``cursor`` for the next page."""

    hits: list[SearchHit]
    next_cursor: str | None


@lru_cache(maxsize=256)
def _leaf_pattern(leaf: Leaf) -> re.Pattern[str]:
    """``leaf`` as the index matches it: a substring lowered, words folded.

    The start of a word leaf must also follow a separator; :func:`_leaf_spans`
    checks that, as a look-behind on the large token class slows the scan 30x.
    """
    if leaf.substring:
        return re.compile(re.escape(lower(leaf.tokens[0])))
    token = token_class()
    words = (separator_class() + "+").join(re.escape(_fold(t)) for t in leaf.tokens)
    end = token + "*" if leaf.prefix else f"(?!{token})"
    return re.compile(words + end)


def _leaf_spans(leaf: Leaf, body: str) -> Iterator[tuple[int, int]]:
    """Where ``leaf`` occurs in ``body`` (lowered, or folded for words), by a scan.

    Linear in the body for a substring or one word; a phrase costs the body's
    words times its own (:func:`_phrase_spans` finds those).
    """
    pattern = _leaf_pattern(leaf)
    follows_token = token_pattern().fullmatch
    position = 0
    while (found := pattern.search(body, position)) is not None:
        start = found.start()
        if leaf.substring or start == 0 or follows_token(body[start - 1]) is None:
            yield found.span()
            position = max(found.end(), start + 1)
        else:
            position = start + 1


def _phrase_spans(leaf: Leaf, folded: str) -> Iterator[tuple[int, int]]:
    """Where the phrase ``leaf`` (2 tokens or more) occurs in ``folded``, as its regex finds it.

    The same spans as :func:`_leaf_spans` (leftmost, none overlapping the one
    before), found over the text's tokens rather than by a scan trying the
    phrase at every word: in time linear in the text and the phrase, where the
    scan takes their product (a long quoted phrase over a long message, tens of
    seconds a page). Its tokens but the last are found by Knuth-Morris-Pratt:
    each the whole token, as the scan's separators after it demand; the last
    whole too, or its start where ``leaf.prefix``.
    """
    head, last, fallback = _phrase_plan(leaf)
    found = [(m.start(), m.end(), m.group()) for m in token_pattern().finditer(folded)]
    words = [word for _, _, word in found]
    after = 0  # where the next span may begin (a token index)
    k = 0
    for i, word in enumerate(words):
        while k and word != head[k]:
            k = fallback[k - 1]
        if word == head[k]:
            k += 1
        if k < len(head):
            continue
        first = i - len(head) + 1
        k = fallback[k - 1]
        if first < after or i + 1 == len(words):
            continue
        end = words[i + 1]
        if end == last or (leaf.prefix and end.startswith(last)):
            yield found[first][0], found[i + 1][1]
            after = i + 2


@lru_cache(maxsize=256)
def _phrase_plan(leaf: Leaf) -> tuple[tuple[str, ...], str, tuple[int, ...]]:
    """The phrase's words but the last, folded; its last; the Knuth-Morris-Pratt table.

    (Made once per phrase, not once per hit: each hit of a page is marked with it.)
    """
    *head, last = map(_fold, leaf.tokens)  # as _leaf_pattern looks for them in the folded text
    fallback = [0] * len(head)  # longest proper border of each prefix of head
    k = 0
    for i in range(1, len(head)):
        while k and head[i] != head[k]:
            k = fallback[k - 1]
        if head[i] == head[k]:
            k += 1
        fallback[i] = k
    return tuple(head), last, tuple(fallback)


def _fold(token: str) -> str:
    """A query word as :func:`match_spans` looks for it: :func:`lower`, then folded.

    (A highlight keeps ``İ`` one letter, as PostgreSQL lowers it.)
    """
    return fold_lowered(lower(token))


def match_spans(query: Query, body: str) -> list[tuple[int, int]]:
    """Where the positive terms of ``query`` occur in ``body``, sorted, not overlapping.

    In time linear in the body and the query: a phrase is found over the
    text's tokens (:func:`_phrase_spans`), a word or a substring by a scan
    that tries one literal.
    """
    # Words compare folded (as the indexes hold them), substrings only lowered (as
    # LIKE compares them): a character for each either way, so offsets hold.
    lowered = lower(body)
    folded = fold_lowered(lowered)
    spans: set[tuple[int, int]] = set()
    # Each distinct leaf once: a query may repeat one hundreds of times.
    leaves = {leaf: None for group in query.groups for term in group for leaf in term}
    for leaf in leaves:
        if leaf.substring:
            spans.update(_leaf_spans(leaf, lowered))
        elif len(leaf.tokens) > 1:
            spans.update(_phrase_spans(leaf, folded))
        else:
            spans.update(_leaf_spans(leaf, folded))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def snippet(body: str, spans: list[tuple[int, int]]) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The window of ``body`` with the most matches, and their offsets in it.

    Whitespace in the window is folded to single spaces, so a snippet is one line.
    """
    start = 0
    if spans:
        best, first, window_start = 0, 0, spans[0][0]
        for last, (_, end) in enumerate(spans):  # sliding window over sorted spans
            while end - spans[first][0] > SNIPPET_CHARS and first < last:
                first += 1
            if last - first + 1 > best:
                best, window_start = last - first + 1, spans[first][0]
        start = max(0, window_start - SNIPPET_CHARS // 4)
        space = body.find(" ", start, window_start)
        if start and space != -1:
            start = space + 1  # begin at a word
    stop = min(len(body), start + SNIPPET_CHARS)
    if stop < len(body):
        space = body.rfind(" ", start, stop)
        if space > start + SNIPPET_CHARS // 2:
            stop = space  # end at a word
    chars: list[str] = []
    offsets = {}
    for position in range(start, stop):
        offsets[position] = len(chars)
        char = body[position]
        if not char.isspace():
            chars.append(char)
        elif chars and chars[-1] != " ":
            chars.append(" ")
    offsets[stop] = len(chars)
    text = "".join(chars).rstrip()
    # A match running past the window (a word, a phrase longer than it) is
    # highlighted as far as the window shows it.
    shown = (
        (offsets[max(s, start)], offsets[min(e, stop)]) for s, e in spans if s < stop and e > start
    )
    highlights = tuple((s, min(e, len(text))) for s, e in shown if s < min(e, len(text)))
    if start > 0:
        text = "…" + text
        highlights = tuple((s + 1, e + 1) for s, e in highlights)
    if body[stop:].strip():
        text += "…"
    return text, highlights


def encode_cursor(message_id: int, query: str, filters: Filters) -> str:
    """The opaque cursor of the page that follows message ``message_id`` in one listing.

    It carries a tag of the query and the filters it pages through: given
    with others (or cut short, or made by hand) it is refused, not read as a
    place in a listing it does not belong to.
    """
    return f"m{message_id}.{_listing_tag(message_id, query, filters)}"


def _listing_tag(message_id: int, query: str, filters: Filters) -> str:
    # The filters by name: a field added to Filters one day leaves the cursors of
    # searches without it as they were (add it here only if it changes a listing).
    listing = (
        message_id,
        query,
        filters.session_id,
        filters.sources,
        filters.user_id,
        filters.roles,
        filters.excluded_sources,
        filters.skip_rewound,
        filters.oldest_first,
    )
    return hashlib.blake2b(
        repr(listing).encode("utf-8", "surrogatepass"), digest_size=6
    ).hexdigest()


def decode_cursor(cursor: str, query: str, filters: Filters) -> int:
    """The message id a cursor from :func:`encode_cursor` stands for, in the same listing.

    Raises:
        SearchQueryError: ``cursor`` did not come from a :class:`SearchPage`
            of this query and these filters.
    """
    place, _, tag = cursor.partition(".") if isinstance(cursor, str) else ("", "", "")
    digits = place[1:] if place.startswith("m") else ""
    if not (digits.isascii() and digits.isdecimal() and len(digits) <= 19 and int(digits) < 2**63):
        raise SearchQueryError(
            f"{_codec.shown(cursor)} is not a cursor from SearchPage.next_cursor"
        )
    message_id = int(digits)  # (a message id: a 64-bit int)
    if tag != _listing_tag(message_id, query, filters):
        raise SearchQueryError(
            f"{_codec.shown(cursor)} is the cursor of another search (or not a cursor): "
            "give it with the query and filters of the page it came from"
        )
    return message_id


# -- SQL ----------------------------------------------------------------------------------


def _fts_leaf(leaf: Leaf) -> str:
    return '"' + " ".join(leaf.tokens) + '"' + ("*" if leaf.prefix else "")


def _any_of_all(
    terms: Sequence[Term],
    leaf_sql: Callable[[Leaf], str],
    conjunction: str = " AND ",
    disjunction: str = " OR ",
) -> str:
    """``terms`` as one expression: any of the terms, each with all of its leaves.

    ``leaf_sql`` is called on the leaves in order (it may collect parameters),
    each leaf of a term once; a term's ``AND`` nests in halves (:func:`_all_of`:
    a phrase of a thousand CJK characters is a thousand leaves).
    """

    def all_of(term: Term) -> str:
        leaves = [leaf_sql(leaf) for leaf in dict.fromkeys(term)]
        return _all_of(leaves) if conjunction == " AND " else conjunction.join(leaves)

    return "(" + disjunction.join("(" + all_of(term) + ")" for term in terms) + ")"


def _fts_terms(terms: Sequence[Term]) -> str:
    """An FTS5 expression of ``terms`` (OR), each an AND of word leaves."""
    return _any_of_all(terms, _fts_leaf)


#: A number in scientific notation opening a word and followed by a letter
#: (``3e4f9a1``, a hash): PostgreSQL's parser cuts the word after the number, where
#: FTS5 keeps it whole, so the vector holds its two parts, side by side.
_PG_NUMBER_HEAD = re.compile(r"[0-9]+e[0-9]+(?=[^\W0-9_])", re.IGNORECASE)


def _pg_parts(token: str, blanks: frozenset[str]) -> list[str]:
    """The words PostgreSQL's parser makes of one of the tokens FTS5 cuts.

    ``blanks``: characters the parser takes for blanks (see :func:`_pg_blanks`).
    """
    pieces = [token]
    if blanks and not blanks.isdisjoint(token):
        pieces = re.split("[" + re.escape("".join(sorted(blanks))) + "]", token)
    parts = []
    for piece in filter(None, pieces):
        head = _PG_NUMBER_HEAD.match(piece)
        parts += [piece] if head is None else [head.group(), piece[head.end() :]]
    return parts


def _pg_leaf(leaf: Leaf, blanks: frozenset[str]) -> Leaf:
    """``leaf`` as PostgreSQL's vectors hold its words: a phrase of their parts.

    ``H₂O`` is the phrase ``h o`` there (the parser takes ``₂`` for a blank, as it
    does in the text). A leaf with nothing the parser keeps (``½``) stays as it
    is: no vector holds it. A prefix stays on the last part, unless the leaf ends
    with a blank (``x²*`` is ``x``: what follows the blank is another word).
    """
    if leaf.substring:
        return leaf
    parts = [part for token in leaf.tokens for part in _pg_parts(token, blanks)]
    if not parts:
        return leaf
    return Leaf(tuple(parts), prefix=leaf.prefix and leaf.tokens[-1][-1] not in blanks)


def _pg_query(query: Query, blanks: frozenset[str]) -> Query:
    """``query`` with each words leaf as :func:`_pg_leaf` has it."""

    def term(found: Term) -> Term:
        return tuple(_pg_leaf(leaf, blanks) for leaf in found)

    return Query(
        tuple(tuple(map(term, group)) for group in query.groups),
        tuple(map(term, query.excluded)),
    )


def _tsquery_leaf(leaf: Leaf, phrases: bool = True) -> str:
    # A phrase: its words next to each other, by their positions in the vector
    # (without ``phrases``, anywhere in it: what the index alone can tell).
    joiner = " <-> " if phrases else " & "
    return joiner.join(f"'{token}'" for token in leaf.tokens) + (":*" if leaf.prefix else "")


def _tsquery_terms(terms: Sequence[Term], phrases: bool = True) -> str:
    return _any_of_all(terms, lambda leaf: _tsquery_leaf(leaf, phrases), " & ", " | ")


def _words_only(terms: Sequence[Term]) -> bool:
    return all(not leaf.substring for term in terms for leaf in term)


def _substring_only(terms: Sequence[Term]) -> bool:
    return all(leaf.substring for term in terms for leaf in term)


@dataclass(frozen=True, slots=True)
class Filters:
    """Restrictions besides the query (None: no restriction)."""

    session_id: str | None = None
    sources: tuple[str, ...] | None = None
    user_id: str | None = None
    roles: tuple[str, ...] | None = None
    excluded_sources: tuple[str, ...] | None = None
    #: Leave out messages a Hermes user took back (``active`` false, not compacted).
    skip_rewound: bool = False
    #: Oldest hits first (the cursor then pages forward in time).
    oldest_first: bool = False
    #: Hits in the order of their messages' timestamps (no timestamp last; ties by
    #: storage order, the same way round), where a message's place in the store
    #: orders them otherwise: the two differ for messages written with their times
    #: given, or imported session by session. One page only, no cursor (see run()).
    by_time: bool = False

    def __post_init__(self) -> None:
        for name in ("sources", "roles", "excluded_sources"):
            values = getattr(self, name)
            for value in values or ():
                problem = (
                    "is not a str" if not isinstance(value, str) else _codec.text_problem(value)
                )
                if problem is not None:
                    raise SearchQueryError(f"{name}: {value!r} {problem}")
            if values is not None and len(values) > MAX_FILTER_VALUES:
                distinct = tuple(dict.fromkeys(values))
                if len(distinct) > MAX_FILTER_VALUES:
                    raise SearchQueryError(
                        f"a filter lists at most {MAX_FILTER_VALUES:,} values, "
                        f"{name} has {len(distinct):,}"
                    )
                object.__setattr__(self, name, distinct)


class _Builder:
    """Collects SQL fragments and their positional parameters."""

    def __init__(self, placeholder: str) -> None:
        self.mark = placeholder
        self.where: list[str] = []
        self.params: list[Any] = []

    def add(self, sql: str, *params: Any) -> None:
        self.where.append(sql)
        self.params.extend(params)


def _like_escaped(text: str) -> str:
    """``text`` in a LIKE pattern, its wildcards and the escape character (backslash) literal."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _sqlite_like(text: str, column: str, params: list[Any], *, indexed: bool) -> str:
    """SQLite's "``column`` contains ``text``" (ASCII letters in any case), literally.

    With ``indexed``, the trigram index may serve it. Tokens hold no LIKE
    wildcard; a substring written with punctuation may, and is then matched
    with an ESCAPE clause, which the index does not serve: it is checked row by row.
    """
    if "%" in text or "_" in text:
        params.append(f"%{_like_escaped(text)}%")
        return f"+{column} LIKE ? ESCAPE '\\'"
    params.append(f"%{text}%")
    # FTS5 answers a LIKE of fewer than 3 characters with no rows (SQLite
    # 3.40): "+" keeps such a pattern out of the index, checked row by row.
    unindexed = "" if indexed and len(text) >= 3 else "+"
    return f"{unindexed}{column} LIKE ?"


def _sqlite_leaf(leaf: Leaf, row: str, params: list[Any]) -> str:
    if leaf.substring:
        like = _sqlite_like(leaf.tokens[0], "body", params, indexed=False)
        return f"EXISTS (SELECT 1 FROM hermes_search_cjk WHERE rowid = {row} AND {like})"
    params.append(_fts_leaf(leaf))
    return f"EXISTS (SELECT 1 FROM hermes_search WHERE hermes_search MATCH ? AND rowid = {row})"


def _sqlite_terms(terms: Sequence[Term], row: str, params: list[Any]) -> str:
    return _any_of_all(terms, lambda leaf: _sqlite_leaf(leaf, row, params))


def _sqlite_like_terms(terms: Sequence[Term], column: str, params: list[Any]) -> str:
    return _any_of_all(
        terms, lambda leaf: _sqlite_like(leaf.tokens[0], column, params, indexed=True)
    )


def _filters(
    filters: Filters, builder: _Builder, dialect: str, sessions: _Builder | None = None
) -> bool:
    """Add the filters to ``builder``; True when they need the sessions table (``s``).

    With ``sessions``, the conditions on the sessions table go there instead.
    """
    mark = builder.mark
    on_sessions = builder if sessions is None else sessions
    if filters.session_id is not None:
        builder.add(f"m.session_id = {mark}", filters.session_id)
    if filters.roles is not None:
        builder.add(f"m.role IN ({', '.join(mark for _ in filters.roles)})", *filters.roles)
    if filters.sources is not None:
        marks = ", ".join(mark for _ in filters.sources)
        on_sessions.add(f"s.source IN ({marks})", *filters.sources)
    if filters.excluded_sources:
        marks = ", ".join(mark for _ in filters.excluded_sources)
        on_sessions.add(f"s.source NOT IN ({marks})", *filters.excluded_sources)
    if filters.user_id is not None:
        on_sessions.add(f"s.user_id = {mark}", filters.user_id)
    if filters.skip_rewound:
        builder.add(
            "(m.active IS NOT 0 OR m.compacted = 1)"
            if dialect == "sqlite"
            else "(m.active IS NOT FALSE OR m.compacted IS TRUE)"
        )
    return bool(
        filters.sources is not None or filters.user_id is not None or filters.excluded_sources
    )


_SELECT = "SELECT m.id, m.session_id, m.idx, m.role, m.timestamp"


def sqlite_statement(
    query: Query, filters: Filters, paged: bool, limit: int
) -> tuple[str, list[Any]]:
    """The SQLite SELECT of one page of hits, and its parameters.

    With ``paged``, the last placeholder is the message id the page starts below.

    One table drives the scan in descending rowid order, so a page stops after
    ``limit`` rows: the word index when the query has word-only groups (with
    a session given, over the range of its message ids only), else the
    session's messages when a session is given, else the CJK index (then
    outermost whatever the filters); every other condition is a per-row
    check. (A word check of each of a session's messages would run the word
    query once a message: a prefix's expansion over the whole index each time.)
    """
    words = [g for g in query.groups if _words_only(g)]
    substrings = [g for g in query.groups if _substring_only(g)]
    driver_params: list[Any] = []
    checks: list[str] = []
    check_params: list[Any] = []
    if words:
        expression = " AND ".join(_fts_terms(g) for g in words)
        word_excluded = [t for t in query.excluded if _words_only([t])]
        if word_excluded:
            expression += " NOT " + _fts_terms(word_excluded)
        # FTS5 tables keep their name (no alias): MATCH names the table.
        source = "hermes_search JOIN hermes_messages m ON m.id = hermes_search.rowid"
        row = "hermes_search.rowid"
        checks.append("hermes_search MATCH ?")
        driver_params.append(expression)
        if filters.session_id is not None:
            checks.append(
                f"{row} BETWEEN (SELECT min(id) FROM hermes_messages WHERE session_id = ?) "
                "AND (SELECT max(id) FROM hermes_messages WHERE session_id = ?)"
            )
            driver_params += [filters.session_id, filters.session_id]
        rest = [g for g in query.groups if g not in words]
        excluded = [t for t in query.excluded if t not in word_excluded]
    elif filters.session_id is not None:
        source, row = "hermes_messages m", "m.id"
        rest = list(query.groups)
        excluded = list(query.excluded)
    elif substrings:
        # CROSS JOIN keeps the CJK index outermost: given a filter on the sessions,
        # SQLite would otherwise walk the sessions' messages, a LIKE on each.
        source = "hermes_search_cjk CROSS JOIN hermes_messages m ON m.id = hermes_search_cjk.rowid"
        row = "hermes_search_cjk.rowid"
        for group in substrings:
            checks.append(_sqlite_like_terms(group, "hermes_search_cjk.body", driver_params))
        rest = [g for g in query.groups if g not in substrings]
        excluded = list(query.excluded)
    else:
        source, row = "hermes_messages m", "m.id"
        rest = list(query.groups)
        excluded = list(query.excluded)
    # Per-row checks name m.id: inside them the FTS5 tables are the inner ones.
    for group in rest:
        checks.append(_sqlite_terms(group, "m.id", check_params))
    for term in excluded:
        checks.append("NOT " + _sqlite_terms([term], "m.id", check_params))
    builder = _Builder("?")
    builder.where, builder.params = checks, driver_params + check_params
    if _filters(filters, builder, "sqlite"):
        join = " CROSS JOIN" if " CROSS JOIN " in source else " JOIN"
        source += f"{join} hermes_sessions s ON s.id = m.session_id"
    later, order = (">", "ASC") if filters.oldest_first else ("<", "DESC")
    if paged:
        builder.add(f"{row} {later} ?")
    where = _all_of(builder.where) or "1"
    ordered = _ordered(filters, row, order)
    statement = f"{_SELECT} FROM {source} WHERE {where} ORDER BY {ordered} LIMIT {limit}"
    return statement, builder.params


def _ordered(filters: Filters, key: str, order: str, stamp: str = "m.timestamp") -> str:
    """The ORDER BY of hits: by ``key`` (their ids), or by ``stamp`` first (``by_time``).

    Written out the same on both backends: a NULL sorts first in one, last in the other.
    """
    if filters.by_time:
        return f"{stamp} {order} NULLS LAST, {key} {order}"
    return f"{key} {order}"


def _all_of(conditions: Sequence[str]) -> str:
    """``conditions`` joined by AND, nested in halves.

    SQLite refuses an expression nested deeper than 1,000 levels, as a flat
    chain of a long query's conditions (one per word, when a session is given)
    is; halves nest only as deep as the log of their number. SQLite's planner
    reads the terms of nested ANDs as it reads a chain's.
    """
    if len(conditions) <= 8:
        return " AND ".join(conditions)
    half = len(conditions) // 2
    return f"({_all_of(conditions[:half])}) AND ({_all_of(conditions[half:])})"


#: CJK-like bodies (only those have a ``search_cjk``), as the partial indexes of
#: migration 0009 spell it, so they apply.
_PG_UNSEGMENTED = "m.search_cjk IS NOT NULL"


def _pg_match(condition: str, by_index: bool) -> str:
    """``condition`` as an index may serve it, or (``IS TRUE``) as only a row filter."""
    return condition if by_index else f"({condition}) IS TRUE"


def _pg_words(by_index: bool) -> str:
    """The vector matching the tsquery of a parameter, as :func:`_pg_match` writes it.

    As a row filter the tsquery is made once per statement (a scalar subquery):
    written inline, a prepared statement's generic plan, which knows no
    parameter's value, lowers and parses it again for every row it checks. As
    an index condition it stays inline, where a custom plan estimates the
    words' shares from it.
    """
    if by_index:
        return f"m.search_vector @@ {_PG_TSQUERY}"
    return _pg_match(f"m.search_vector @@ (SELECT {_PG_TSQUERY})", by_index)


#: A tsquery parameter as the vectors hold words: lowered, then the letters FTS5
#: folds further folded, as the trigger folds them (after lower(), which may
#: make a final sigma of a capital one).
_PG_TSQUERY = f"translate(lower(%s), '{FOLDED}', '{FOLDED_TO}')::tsquery"


def _uncased(text: str) -> bool:
    """Whether ``text`` has no letter with a case (CJK, kana, digits, ...)."""
    return text.lower() == text == text.upper()


def _pg_terms(terms: Sequence[Term], builder: _Builder, by_index: bool) -> str:
    def condition(leaf: Leaf) -> str:
        if leaf.substring:
            # A literal substring: backslash is PostgreSQL's LIKE escape by default.
            # Without cased letters ILIKE finds what LIKE finds, at twice the cost.
            token = leaf.tokens[0]
            operator = "LIKE" if _uncased(token) else "ILIKE"
            builder.params.append(f"%{_like_escaped(token)}%")
            match = _pg_match(f"m.search_cjk {operator} %s", by_index)
            return f"({_PG_UNSEGMENTED} AND {match})"
        builder.params.append(_tsquery_leaf(leaf))
        return _pg_words(by_index)

    return _any_of_all(terms, condition)


def _pg_body(alias: str) -> str:
    """A hit's body, by the function migration 0009 made (of message ``alias``)."""
    columns = ("content", "content_parts", "tool_name", "tool_calls")
    return f"hermes_search_body({', '.join(f'{alias}.{c}' for c in columns)})"


#: Newest message ids a PostgreSQL search scans first, in id order (see _pg_rows()).
PG_WINDOW = 5_000
#: The same for words PostgreSQL's statistics show rare: a word common only since
#: the statistics were gathered is still found there, in the newest messages.
PG_RARE_WINDOW = 200


@dataclass(frozen=True, slots=True)
class _PgStatement:
    """A PostgreSQL SELECT of hits (with bodies), and its parameters.

    Its placeholders: ``before``, the id range (both ends excluded), ``after``,
    and last the LIMIT.
    """

    sql: str
    before: tuple[Any, ...]
    after: tuple[Any, ...] = ()

    def args(self, bounds: tuple[int, int], limit: int) -> tuple[Any, ...]:
        return (*self.before, *bounds, *self.after, limit)


def postgresql_statement(query: Query, filters: Filters, by_index: bool) -> _PgStatement:
    """The PostgreSQL SELECT of hits (with bodies).

    ``by_index`` orders by an expression the primary key cannot provide,
    so the rows come from the search indexes (bitmap scans) and are then sorted;
    without it the search conditions are row filters only, so the rows come in
    id order from the primary key (or the CJK-like bodies' index) over the range.

    A phrase is a recheck of each row's vector (positions are not in the
    index): by the indexes, the rows holding its words are found first, and the
    phrase is checked on them in id order, only until the page is full.
    """
    builder = _Builder("%s")
    # Substrings first: a cheap test on the few CJK-like rows spares the others'
    # vectors (PostgreSQL checks conditions of equal cost in the order written).
    words = [g for g in query.groups if _words_only(g)]
    for group in query.groups:
        if group not in words:
            builder.where.append(_pg_terms(group, builder, by_index))
    word_excluded = [t for t in query.excluded if _words_only([t])] if words else []
    for term in query.excluded:
        if term not in word_excluded:
            builder.where.append("NOT " + _pg_terms([term], builder, by_index))
    exact = relaxed = ""
    if words:
        exact = " & ".join(_tsquery_terms(g) for g in words)
        relaxed = " & ".join(_tsquery_terms(g, phrases=False) for g in words)
        if word_excluded:
            excluded = " & !" + _tsquery_terms(word_excluded)
            exact, relaxed = exact + excluded, relaxed + excluded
        searched = relaxed if by_index else exact
        builder.add(_pg_words(by_index), searched)
    source = "hermes_messages m"
    if by_index:
        if _filters(filters, builder, "postgresql"):
            source += " JOIN hermes_sessions s ON s.id = m.session_id"
    else:
        # In id order, each row's session is looked up as the walk reaches it (a
        # subquery, kept one by OFFSET 0), so the walk still stops at a full
        # page: a join could be planned to read every session and the whole
        # range first, where the words' share is unknown (a generic plan).
        sessions = _Builder(builder.mark)
        if _filters(filters, builder, "postgresql", sessions):
            builder.add(
                "EXISTS (SELECT FROM hermes_sessions s WHERE s.id = m.session_id AND "
                f"{' AND '.join(sessions.where)} OFFSET 0)",
                *sessions.params,
            )
    # By the indexes, the id range is no index condition either: a plan made for
    # any parameters (a prepared statement's generic plan) must not walk the
    # primary key over what it takes for a narrow range.
    key = "m.id + 0" if by_index else "m.id"
    builder.add(f"{key} > %s AND {key} < %s")
    order = "ASC" if filters.oldest_first else "DESC"
    where = " AND ".join(builder.where)
    if by_index and exact != relaxed:
        kept = ("id", "session_id", *(("timestamp",) if filters.by_time else ()))
        candidates = f"SELECT {', '.join(f'm.{c}' for c in kept)} FROM {source} WHERE {where}"
        checked = (
            f"{_SELECT}, {_pg_body('m')} FROM hermes_messages m "
            "WHERE m.id = o.id AND m.session_id = o.session_id "
            f"AND {_pg_words(by_index=False)} LIMIT 1"
        )
        statement = (
            f"WITH c AS MATERIALIZED ({candidates}) SELECT h.* FROM "
            f"(SELECT {', '.join(kept)} FROM c ORDER BY "
            f"{_ordered(filters, 'id', order, 'timestamp')}) AS o "
            f"CROSS JOIN LATERAL ({checked}) AS h "
            f"ORDER BY {_ordered(filters, 'o.id', order, 'o.timestamp')} LIMIT %s"
        )
        return _PgStatement(statement, tuple(builder.params), (exact,))
    ordered = _ordered(filters, key, order)
    hits = f"{_SELECT} FROM {source} WHERE {where} ORDER BY {ordered} LIMIT %s"
    # The body (for the snippet) of the hits only: it is computed, not stored.
    statement = (
        f"SELECT h.*, {_pg_body('b')} FROM ({hits}) AS h JOIN hermes_messages b "
        f"ON b.id = h.id AND b.session_id = h.session_id "
        f"ORDER BY {_ordered(filters, 'h.id', order, 'h.timestamp')}"
    )
    return _PgStatement(statement, tuple(builder.params))


@dataclass(frozen=True, slots=True)
class _PgPlan:
    """A query's statements on PostgreSQL, and what chooses between them."""

    parsed: Query
    in_order: _PgStatement
    by_index: _PgStatement
    #: The groups of words only (what the statistics can tell the share of).
    words: tuple[tuple[Term, ...], ...]
    #: Some group is only substrings too short for trigrams (the index cannot narrow it).
    short: bool
    #: Some group of substrings the trigram index narrows (3 characters or more each).
    trigrams: bool


@lru_cache(maxsize=512)
def _pg_compiled(query: str, filters: Filters, blanks: frozenset[str]) -> _PgPlan:
    """The plan of ``query``, whose characters in ``blanks`` the parser takes for blanks."""
    parsed = parse_query(query)
    words = _pg_query(parsed, blanks)
    substrings = [g for g in parsed.groups if _substring_only(g)]

    def lengths(group: Sequence[Term]) -> list[int]:
        return [len(leaf.tokens[0]) for term in group for leaf in term]

    return _PgPlan(
        parsed,
        postgresql_statement(words, filters, by_index=False),
        postgresql_statement(words, filters, by_index=True),
        words=tuple(g for g in words.groups if _words_only(g)),
        short=any(max(lengths(g)) < 3 for g in substrings),
        trigrams=any(min(lengths(g)) >= 3 for g in substrings),
    )


@lru_cache(maxsize=512)
def _word_characters(query: str) -> frozenset[str]:
    """The characters past ASCII of the words ``query`` looks for (not its substrings)."""
    parsed = parse_query(query)
    return frozenset(
        character
        for group in (*parsed.groups, parsed.excluded)
        for term in group
        for leaf in term
        if not leaf.substring
        for token in leaf.tokens
        if not token.isascii()
        for character in token
        if not character.isascii()
    )


#: Whether PostgreSQL's text search parser takes a character into a word (False: it
#: is a blank there), by engine: the database's locale decides, so it is asked.
_word_character: weakref.WeakKeyDictionary[Any, dict[str, bool]] = weakref.WeakKeyDictionary()
#: Characters remembered by engine, at most (then it is asked again).
_WORD_CHARACTER_MAX = 65_536
#: A character is part of a word if ``a``, it and ``b`` make one word.
_WORD_CHARACTER_SQL = (
    "SELECT c, length(to_tsvector('simple'::regconfig, 'a' || c || 'b')) = 1 "
    "FROM unnest(%s::text[]) AS c"
)


def _pg_blanks(conn: Connection, characters: frozenset[str]) -> frozenset[str]:
    """Those of ``characters`` that PostgreSQL's parser takes for blanks.

    FTS5 takes into a word some characters the database's locale calls neither
    a letter nor a digit (``₂``, ``²``, ``½``, emoji newer than Unicode 6.1): the
    parser cuts the text there, and a query's words are cut alike. Asked of the
    server once per character (the ones new to this engine, in one statement).
    """
    if not characters:
        return frozenset()
    known = _word_character.setdefault(conn.engine, {})
    answers = {c: known.get(c) for c in characters}  # (another thread may clear ``known``)
    new = sorted(c for c, answer in answers.items() if answer is None)
    if new:
        rows = conn.exec_driver_sql(driver_sql(conn, _WORD_CHARACTER_SQL), (new,)).all()
        found: dict[str, bool] = {c: bool(is_word) for c, is_word in rows}
        answers.update(found)
        if len(known) + len(found) > _WORD_CHARACTER_MAX:
            known.clear()
        known.update(found)
    return frozenset(c for c, answer in answers.items() if not answer)


@dataclass(frozen=True, slots=True)
class _Frequencies:
    """Shares of messages holding the commonest words, from PostgreSQL's statistics."""

    of: dict[str, float]
    #: A word not listed is in fewer messages than this share.
    unlisted: float


#: The words' shares PostgreSQL's ANALYZE (or autovacuum) gathered on the vectors.
_FREQUENCIES_SQL = (
    "SELECT s.most_common_elems::text::text[], s.most_common_elem_freqs FROM pg_stats s "
    "JOIN pg_namespace n ON n.nspname = s.schemaname "
    "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.tablename "
    "WHERE c.oid = 'hermes_messages'::regclass AND s.attname = 'search_vector' "
    "ORDER BY s.inherited DESC LIMIT 1"
)
#: Seconds the statistics are kept before they are read again.
FREQUENCIES_TTL = 600.0
#: By engine, then by schema (stores on one engine may each have their own).
_frequencies_cache: weakref.WeakKeyDictionary[
    Any, dict[str | None, tuple[float, _Frequencies | None]]
] = weakref.WeakKeyDictionary()


def _frequencies(conn: Connection, schema: str | None) -> _Frequencies | None:
    """The statistics of the words in the vectors (None: not gathered yet), cached a while.

    ``schema``: the store's (its ``hermes_messages`` is the one ``conn`` finds).
    """
    now = time.monotonic()
    by_schema = _frequencies_cache.setdefault(conn.engine, {})
    cached = by_schema.get(schema)
    if cached is not None and cached[0] > now:
        return cached[1]
    row = conn.exec_driver_sql(_FREQUENCIES_SQL).first()
    found = None
    if row is not None and row[0] and row[1]:
        words, shares = list(row[0]), [float(share) for share in row[1]]
        # After the words' shares come their lowest, highest, and the share of nulls.
        found = _Frequencies(dict(zip(words, shares, strict=False)), min(shares[: len(words)]))
    by_schema[schema] = (now + FREQUENCIES_TTL, found)
    return found


def _share(groups: Sequence[Sequence[Term]], frequencies: _Frequencies) -> float:
    """At most about this share of the messages hold words matching every group.

    A word not among the commonest counts as half the least common of those
    (as PostgreSQL's planner estimates it); a prefix or a substring, as any message.
    """

    def word(token: str) -> float:
        return frequencies.of.get(fold(token), frequencies.unlisted / 2)

    def leaf(found: Leaf) -> float:
        exact = found.tokens[:-1] if found.prefix else found.tokens
        return 1.0 if found.substring or not exact else min(map(word, exact))

    return min(
        (min(1.0, sum(min(map(leaf, term)) for term in group)) for group in groups),
        default=1.0,
    )


def _pg_rows(
    conn: Connection,
    query: str,
    filters: Filters,
    after: int | None,
    wanted: int,
    *,
    schema: str | None,
) -> tuple[Query, list[Any]]:
    """Hits newest (or oldest) first, each step fast whatever the words' frequency.

    Ordered by id with a LIMIT, PostgreSQL walks the primary key until enough
    rows match, which for a rare word means the whole table (seconds on a
    million messages), while a GIN scan of a common word fetches every match.
    So the newest ``PG_WINDOW`` ids are searched first, in id order (bounded
    work); only if they hold too few hits is the rest searched through the
    indexes, where the words are known to be rare. Words PostgreSQL's
    statistics show too rare to fill a page from that window get a window of
    ``PG_RARE_WINDOW`` ids only.
    """
    plan = _pg_compiled(query, filters, _pg_blanks(conn, _word_characters(query)))
    oldest = filters.oldest_first
    low, high = -(2**63), 2**63 - 1
    if filters.by_time:
        # No id order to walk: the indexes find every hit, then sorted (as Hermes'
        # FTS5 search in time order sorts all its hits).
        every = plan.by_index
        return plan.parsed, list(
            conn.exec_driver_sql(driver_sql(conn, every.sql), every.args((low, high), wanted))
        )
    words = plan.words
    frequencies = _frequencies(conn, schema) if words else None
    window = PG_WINDOW
    if frequencies is not None and _share(words, frequencies) * PG_WINDOW < wanted:
        window = min(PG_WINDOW, PG_RARE_WINDOW)
    # Past the window, a substring too short for trigrams is found by walking the
    # CJK-like rows in id order (bounded by how many there are), unless another
    # group narrows the search through an index: substrings of 3 characters or
    # more, or words not known to be common.
    common = frequencies is not None and window == PG_WINDOW
    walk = plan.short and not plan.trigrams and (common or not words)
    if after is None:
        edge = conn.exec_driver_sql(
            f"SELECT {'min' if oldest else 'max'}(id) FROM hermes_messages"
        ).scalar()
        if edge is None:
            return plan.parsed, []
        after = edge - 1 if oldest else edge + 1
    if oldest:
        bounds, rest = (after, after + window), (after + window - 1, high)
    else:
        bounds, rest = (after - window, after), (low, after - window + 1)
    in_order = driver_sql(conn, plan.in_order.sql)
    rows = list(conn.exec_driver_sql(in_order, plan.in_order.args(bounds, wanted)))
    if len(rows) < wanted:
        then = plan.in_order if walk else plan.by_index
        statement = in_order if walk else driver_sql(conn, then.sql)
        rows += conn.exec_driver_sql(statement, then.args(rest, wanted - len(rows)))
    return plan.parsed, rows


@lru_cache(maxsize=512)
def _sqlite_compiled(
    query: str, filters: Filters, paged: bool, limit: int
) -> tuple[Query, str, tuple[Any, ...]]:
    """Parsed query, statement and parameters, kept for queries asked again."""
    parsed = parse_query(query)
    statement, params = sqlite_statement(parsed, filters, paged, limit)
    return parsed, statement, tuple(params)


def run(
    conn: Connection,
    query: str,
    filters: Filters,
    after: int | None,
    limit: int,
    *,
    schema: str | None = None,
) -> SearchPage:
    """One page of hits for ``query`` on ``conn`` (SQLite or PostgreSQL).

    ``schema``: the store's, where it has one of its own (PostgreSQL). With
    ``filters.by_time`` the page is the first ``limit`` hits in time order,
    from the first (``after`` None), and has no next cursor.

    Raises:
        SearchQueryError: ``query`` has nothing to look for.
    """
    if filters.by_time and after is not None:
        raise ValueError("a search in time order has one page: it takes no cursor")
    dialect = conn.dialect.name
    if dialect == "sqlite":
        parsed, statement, params = _sqlite_compiled(query, filters, after is not None, limit + 1)
        if after is not None:
            params += (after,)
        # The driver's cursor straight away when nothing watches the engine: a
        # SELECT opens no transaction in pysqlite, and the result needs none of
        # SQLAlchemy's processing.
        rows = fetch_driver_rows(conn, statement, params)
    else:
        parsed, rows = _pg_rows(conn, query, filters, after, limit + 1, schema=schema)
    more = len(rows) > limit
    rows = rows[:limit]
    if dialect == "sqlite":
        bodies = dict(_sqlite_bodies(conn, [row[0] for row in rows]))
    else:
        bodies = {row[0]: row[5] for row in rows}
    hits = []
    for row in rows:
        body = bodies.get(row[0]) or ""
        spans = match_spans(parsed, body)
        text, highlights = snippet(body, spans)
        hits.append(
            SearchHit(
                session_id=row[1],
                idx=row[2],
                message_id=row[0],
                role=row[3],
                timestamp=row[4],
                rank=float(len(spans)),
                snippet=text,
                highlights=highlights,
            )
        )
    if filters.by_time:  # a place in id order is none in time order
        return SearchPage(hits, None)
    return SearchPage(hits, encode_cursor(rows[-1][0], query, filters) if more and rows else None)


def _sqlite_bodies(conn: Connection, ids: list[int]) -> list[Any]:
    # As bytes: a lone surrogate escaped in a JSON document (written by some other
    # client) comes out of SQLite's JSON functions as bytes that are not UTF-8.
    rows = rows_for_values(
        conn, "SELECT id, CAST(body AS BLOB) FROM hermes_search_source WHERE id IN ({values})", ids
    )
    return [(row[0], bytes(row[1]).decode("utf-8", "replace")) for row in rows]


#: The PostgreSQL triggers computing each message's search columns as it is
#: written, as the migrations make them (on ``{table}``, in the functions' ``{schema}``).
#: They fire in name order: the second narrows what the first put in ``search_cjk``.
PG_TRIGGERS = {
    "hermes_search_index": (
        "CREATE TRIGGER hermes_search_index BEFORE INSERT OR UPDATE OF content, content_parts, "
        "tool_name, tool_calls ON {table} FOR EACH ROW "
        "EXECUTE FUNCTION {schema}.hermes_search_index()"
    ),
    "hermes_search_index_cjk": (
        "CREATE TRIGGER hermes_search_index_cjk BEFORE INSERT OR UPDATE OF content, "
        "content_parts, tool_name, tool_calls ON {table} FOR EACH ROW "
        "WHEN (NEW.search_cjk IS NOT NULL) EXECUTE FUNCTION {schema}.hermes_search_cjk_words()"
    ),
}


#: Index the new row's body (as hermes_search_source computes it).
_SQLITE_INDEX_WORDS = (
    "INSERT INTO hermes_search(rowid, body) VALUES (new.id, "
    "substr(\n    coalesce(new.content, '') || char(10) ||\n "
    "   coalesce((SELECT group_concat(json_extract(p.value, "
    "'$.text'), char(10))\n              FROM json_each(CASE "
    "WHEN json_valid(new.content_parts) THEN CASE WHEN json_type(new.content_parts) "
    "= 'array' THEN replace(replace(replace(new.content_parts, "
    "'\\\\', char(1)), '\\u0000', '\\u0020'), char(1), '\\\\') "
    "END END) AS p\n              WHERE CASE WHEN p.type = "
    "'object' THEN json_type(p.value, '$.text') END = 'text'),\n "
    "            '') || char(10) ||\n    coalesce(new.tool_name, "
    "'') || char(10) ||\n    coalesce((SELECT group_concat(\n "
    "                 coalesce(CASE WHEN c.type = 'object'\n "
    "                          THEN json_extract(c.value, '$.function.name') "
    "END, '')\n                  || char(10) ||\n          "
    "        coalesce(CASE WHEN c.type = 'object'\n        "
    "                   THEN json_extract(c.value, '$.function.arguments') "
    "END, ''),\n                  char(10))\n              "
    "FROM json_each(CASE WHEN json_valid(new.tool_calls) THEN "
    "CASE WHEN json_type(new.tool_calls) = 'array' THEN replace(replace(replace(new.too"
    "l_calls, '\\\\', char(1)), '\\u0000', '\\u0020'), char(1), "
    "'\\\\') END END) AS c),\n             ''),\n    1, 16384)); "
    "END"
)
#: Index the new row's body as CJK-like text, where it may hold some.
_SQLITE_INDEX_CJK = (
    " WHEN length(CAST(new.content AS BLOB)) != length(new.content) "
    "OR length(CAST(new.content_parts AS BLOB)) != length(new.content_parts) "
    "OR length(CAST(new.tool_name AS BLOB)) != length(new.tool_name) "
    "OR length(CAST(new.tool_calls AS BLOB)) != length(new.tool_calls) "
    "OR instr(new.content, '\\u') > 0 OR instr(new.content_parts, "
    "'\\u') > 0 OR instr(new.tool_name, '\\u') > 0 OR instr(new.tool_calls, "
    "'\\u') > 0 BEGIN INSERT INTO hermes_search_cjk(rowid, "
    "body) SELECT id, body FROM hermes_search_cjk_source WHERE "
    "id = new.id; END"
)
#: Take the old row's words and text out of the index.
_SQLITE_FORGET = (
    "\n        INSERT INTO hermes_search(hermes_search, rowid, "
    "body)\n            SELECT 'delete', id, body FROM hermes_search_source "
    "WHERE id = old.id;\n        DELETE FROM hermes_search_cjk "
    "WHERE rowid = old.id;\n    END"
)
_SQLITE_WATCHED = "UPDATE OF id, content, content_parts, tool_name, tool_calls ON hermes_messages"
#: The SQLite triggers keeping the search index in step with the messages, as the
#: migrations leave them at head (a test holds the two together): one missing (a
#: tool rebuilding the table drops them all) is made again from here.
SQLITE_TRIGGERS = {
    "hermes_search_cjk_insert": (
        "CREATE TRIGGER hermes_search_cjk_insert AFTER INSERT ON hermes_messages"
        + _SQLITE_INDEX_CJK
    ),
    "hermes_search_cjk_update_new": (
        f"CREATE TRIGGER hermes_search_cjk_update_new AFTER {_SQLITE_WATCHED}{_SQLITE_INDEX_CJK}"
    ),
    "hermes_search_delete": (
        "CREATE TRIGGER hermes_search_delete BEFORE DELETE ON hermes_messages BEGIN"
        + _SQLITE_FORGET
    ),
    "hermes_search_insert": (
        "CREATE TRIGGER hermes_search_insert AFTER INSERT ON hermes_messages BEGIN "
        + _SQLITE_INDEX_WORDS
    ),
    "hermes_search_update_new": (
        f"CREATE TRIGGER hermes_search_update_new AFTER {_SQLITE_WATCHED} BEGIN "
        + _SQLITE_INDEX_WORDS
    ),
    "hermes_search_update_old": (
        f"CREATE TRIGGER hermes_search_update_old\n    BEFORE {_SQLITE_WATCHED} BEGIN"
        + _SQLITE_FORGET
    ),
}


def sqlite_trigger_gaps(conn: Connection) -> list[str]:
    """SQLite: the search triggers missing from ``hermes_messages`` (messages go unindexed).

    By name, as PostgreSQL's are checked. :data:`SQLITE_TRIGGERS` holds their
    definitions at head, the revision a store works on (it refuses an older one).
    """
    found = set(
        conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'hermes_messages'"
        ).scalars()
    )
    return [name for name in SQLITE_TRIGGERS if name not in found]


def _restore_sqlite_triggers(conn: Connection) -> None:
    """Make the search triggers missing again (see :func:`sqlite_trigger_gaps`)."""
    for name in sqlite_trigger_gaps(conn):
        conn.exec_driver_sql(SQLITE_TRIGGERS[name])


def _pg_trigger_states(conn: Connection) -> list[tuple[str, str, str | None]]:
    """``(table, trigger, tgenabled)`` of each search trigger on each table of messages.

    ``hermes_messages`` first, then its partitions; None: the trigger is missing.
    """
    names = ", ".join(f"('{name}')" for name in PG_TRIGGERS)
    rows = conn.exec_driver_sql(
        "WITH tables AS (SELECT 'hermes_messages'::regclass AS relid, 0 AS level "
        "UNION SELECT relid, level FROM pg_partition_tree('hermes_messages')) "
        "SELECT tables.relid::regclass::text, n.name, t.tgenabled::text "
        f"FROM tables CROSS JOIN (VALUES {names}) AS n(name) "
        "LEFT JOIN pg_trigger t ON t.tgrelid = tables.relid AND t.tgname = n.name "
        "ORDER BY tables.level, 1, 2"
    ).all()
    return [(table, name, state) for table, name, state in rows]


#: ``pg_trigger.tgenabled`` of a trigger that fires for the stores' writes.
_FIRES = ("O", "A")


def pg_trigger_gaps(conn: Connection) -> list[tuple[str, str, bool]]:
    """PostgreSQL: the search triggers that would not fire, on the tables of messages.

    ``hermes_messages``, and each of its partitions, as ``(table, trigger,
    missing)``: missing, or there but disabled (or set to fire for replication
    only). Messages written there go unindexed. A partition's gap that is the
    partitioned table's too is told with it.
    """
    states = _pg_trigger_states(conn)
    root = states[0][0]
    at_root = {(name, state) for table, name, state in states if table == root}
    return [
        (table, name, state is None)
        for table, name, state in states
        if state not in _FIRES and (table == root or (name, state) not in at_root)
    ]


def pg_trigger_sql(conn: Connection, name: str, table: str) -> str:
    """The search trigger ``name``'s ``CREATE TRIGGER`` on ``table``."""
    schema = conn.exec_driver_sql(
        "SELECT quote_ident(n.nspname) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = 'hermes_messages'::regclass"
    ).scalar_one()
    return PG_TRIGGERS[name].format(table=table, schema=schema)


def _restore_pg_triggers(conn: Connection) -> None:
    """Make the search triggers fire on every table of messages again (see pg_trigger_gaps)."""
    states = _pg_trigger_states(conn)
    root = states[0][0]
    missing_at_root = {name for table, name, state in states if table == root and state is None}
    for table, name, state in states:
        if state is None:
            # Made on the partitioned table, it is made on each partition too.
            if table == root or name not in missing_at_root:
                conn.exec_driver_sql(pg_trigger_sql(conn, name, table))
        elif state not in _FIRES:
            conn.exec_driver_sql(f"ALTER TABLE {table} ENABLE TRIGGER {name}")


def rebuild(conn: Connection) -> int:
    """Rebuild the search index from the messages; returns how many messages it covers.

    The triggers keeping it in step are made again first where they are
    missing, or enabled where they would not fire (PostgreSQL).
    """
    if conn.dialect.name == "sqlite":
        _restore_sqlite_triggers(conn)
        for statement in (
            "INSERT INTO hermes_search(hermes_search) VALUES ('delete-all')",
            "INSERT INTO hermes_search(rowid, body) SELECT id, body FROM hermes_search_source",
            "INSERT INTO hermes_search(hermes_search) VALUES ('optimize')",
            # A DELETE removes each row's words as its stored text gives them: a text
            # damaged in place would leave words behind. Emptied, the content is
            # indexed afresh (to nothing) by FTS5's own 'rebuild', then refilled.
            "DELETE FROM hermes_search_cjk_content",
            "INSERT INTO hermes_search_cjk(hermes_search_cjk) VALUES ('rebuild')",
            "INSERT INTO hermes_search_cjk(rowid, body) "
            "SELECT id, body FROM hermes_search_cjk_source",
            "INSERT INTO hermes_search_cjk(hermes_search_cjk) VALUES ('optimize')",
        ):
            conn.exec_driver_sql(statement)
    else:
        _restore_pg_triggers(conn)
        # Setting a watched column fires the trigger that computes body and tsvector.
        conn.exec_driver_sql("UPDATE hermes_messages SET content = content")
        for index in ("ix_hermes_search_vector", "ix_hermes_search_cjk", "ix_hermes_search_cjk_id"):
            # A partitioned table's index is reindexed partition by partition: as a
            # whole it cannot be, inside a transaction.
            leaves = conn.exec_driver_sql(
                f"SELECT relid::regclass::text FROM pg_partition_tree('{index}') WHERE isleaf"
            ).scalars()
            for leaf in list(leaves):
                conn.exec_driver_sql(f"REINDEX INDEX {leaf}")
    count = conn.exec_driver_sql("SELECT count(*) FROM hermes_messages").scalar_one()
    return int(count)
