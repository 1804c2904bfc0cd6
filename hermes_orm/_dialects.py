"""What differs per backend: engine setup, write locks, transient errors.

SQLite: WAL, ``busy_timeout``, ``foreign_keys=ON`` on every connection, and
write transactions open with ``BEGIN IMMEDIATE`` so the write lock is taken
before the cursor is read (a deferred transaction that upgrades its lock later
is what fails with "database is locked" half-way through).

PostgreSQL: the cursor is read with ``SELECT ... FOR UPDATE`` on the session
row, which serialises writers of one session and nobody else.
"""

from __future__ import annotations

import contextvars
import errno
import itertools
import os
import re
import sqlite3
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InvalidRequestError,
    NoSuchModuleError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import Pool, StaticPool
from sqlalchemy.util import asbool

from hermes_orm import _sa
from hermes_orm.errors import (
    DatabaseUnavailableError,
    InvalidArgumentError,
    InvalidURLError,
    UnsupportedBackendError,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")

#: Default seconds one attempt waits for a lock: SQLite ``busy_timeout``, and
#: PostgreSQL ``lock_timeout`` on engines built from a URL.
LOCK_TIMEOUT = 5.0

_SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
# SQLITE_BUSY, SQLITE_LOCKED (primary codes; extended codes keep them in the low byte).
_SQLITE_TRANSIENT = {5, 6}
# serialization_failure, deadlock_detected, lock_not_available, admin/crash shutdown,
# cannot_connect_now; class 08 is "connection exception".
_PG_TRANSIENT = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "25006"}
# Of those, the ones that say this server cannot do the work now, however long
# the locks are free: shut down, starting up, or read-only (read_only_sql_transaction:
# a standby, or a primary demoted by a failover).
_PG_UNREACHABLE = {"57P01", "57P02", "57P03", "25006"}


def hermes_home() -> Path:
    """Directory of the embedded default database: ``$HERMES_HOME`` or ``~/.hermes``.

    Blanks around ``$HERMES_HOME`` are no part of it, and blanks alone are no
    value, as Hermes Agent reads it.
    """
    return Path((os.environ.get("HERMES_HOME") or "").strip() or Path.home() / ".hermes")


def default_url() -> str:
    """URL from ``HERMES_ORM_URL``, else the SQLite file ``hermes_orm.db`` in hermes_home()."""
    env = os.environ.get("HERMES_ORM_URL")
    if env:
        return env
    return f"sqlite:///{hermes_home() / 'hermes_orm.db'}"


#: A password in a URL's user part, as SQLAlchemy reads it: ``scheme://user:PASSWORD@``,
#: the user up to the first ``:`` (it may hold ``@`` and blanks), the password up to
#: the next ``@`` (blanks, ``/`` and ``:`` included), not reaching into another URL
#: nor past the end of the line.
#: A password holding an @ of its own (``user:p@ss@host``, which SQLAlchemy cuts
#: at its first @) is hidden up to the last @ before the host's ``/``.
_USER_PASSWORD = re.compile(
    r"(?P<head>(?<![\w+.-])[A-Za-z][\w+.-]*://[^:/\n]*:)(?:(?!://)[^@\n])*@(?:[^@/\s]*@)*"
)
#: What may be a password where the ``@host`` was left out (``scheme://user:PASSWORD/db``,
#: which SQLAlchemy reads as a host and a port): a "port" that is no number, and
#: all of the URL after it (the password may hold ``/``, ``?``, ``#``).
_PORT_NO_NUMBER = re.compile(
    r"(?P<head>(?<![\w+.-])[A-Za-z][\w+.-]*://[^:/@\s\[\]]*:)"
    r"(?!\d+(?:,[^,:/@\s?#\[\]]+:\d+)+(?:[/?#\s]|$))(?=[^/@\s?#]*[^\d/@\s?#])[^@\s]+"
)
#: A password given as a parameter: in a URL's query (``?password=``, ``&sslpassword=``;
#: up to the next ``&`` or the end of the line), or in libpq's key=value connection
#: string (``password=s3cret``, ``password = 'sec ret'``: up to a blank, or quoted,
#: its backslash escapes doubled or not, as a ``repr`` shows them).
#: Any case; a value already hidden is left as it is.
_PASSWORD_PARAMETER = re.compile(
    r"(?P<query>[?&][\w.-]*password=)(?!\*\*\*(?:[&\s]|$))[^&\n]*"
    r"|(?P<key>(?<![\w?&])\w*password\s*=\s*)"
    r"(?!\*\*\*(?:\s|$))(?:'(?:[^'\\\n]|\\+.)*'?|[^\s']\S*)",
    re.IGNORECASE,
)


def _hide_parameter(found: re.Match[str]) -> str:
    return f"{found['query'] or found['key']}***"


def said(exc: DBAPIError) -> str:
    """What the database said of ``exc``, its passwords hidden (:func:`redact`), stripped.

    psycopg's text holds the server's DETAIL, HINT and CONTEXT lines (the
    object a refused DROP depends on, the function that raised); asyncpg's
    gives the first line alone, and keeps them apart: they are added as
    psycopg writes them.
    """
    text = str(exc.orig)
    cause = getattr(exc.orig, "__cause__", None)
    for label, name in (("DETAIL", "detail"), ("HINT", "hint"), ("CONTEXT", "context")):
        value = getattr(cause, name, None)
        if isinstance(value, str) and value and f"\n{label}:" not in text:
            text += f"\n{label}:  {value}"
    return redact(text).strip()


def redact(text: str) -> str:
    """``text`` with every password of a URL or a libpq connection string in it as ``***``.

    Meant for any message: it hides what may be a password rather than show
    one (``scheme://word:...@`` is taken for a user and a password), and its
    result prints on any UTF-8 stream (see :func:`printable`).
    """
    hidden = _hide_urls(text)
    hidden = _USER_PASSWORD.sub(r"\g<head>***@", hidden)
    hidden = _PORT_NO_NUMBER.sub(r"\g<head>***", hidden)
    return printable(_PASSWORD_PARAMETER.sub(_hide_parameter, hidden))


def printable(text: str) -> str:
    r"""``text`` with what no UTF-8 stream can write as backslash escapes.

    That is the undecodable bytes of a file name (``\xff``) and lone surrogates.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


#: A PostgreSQL URL in a text, up to a blank (see :func:`_hide_urls` for past one).
_POSTGRESQL_URL = re.compile(r"(?<![\w+.-])postgres(?:ql)?(?:\+\w+)?://\S*", re.IGNORECASE)
#: Where any URL begins (a PostgreSQL URL in a text runs past no other).
_ANY_URL = re.compile(r"(?<![\w+.-])[A-Za-z][\w+.-]*://")
#: An ``@host/`` or ``@host:port``, and the rest of its word.
_AT_HOST = re.compile(r"@[^\s/@?#]*(?:/|:\d)\S*")
#: Any @, and the rest of its word.
_ANY_AT = re.compile(r"@\S*")
#: The start of a URL's authority that is a host and a port, no user.
_HOST_PORT = re.compile(r"[^:/?#@]*:\d+(?:[/?#]|$)")


def _hide_urls(text: str) -> str:
    """``text`` with each PostgreSQL URL in it holding several @ hidden up to the last.

    A URL ends at a blank, but a password may hold blanks: it runs on, within
    its line and up to another URL, to the last ``@host/`` or ``@host:port``
    after it, or, if what comes before the blank ends no authority (a password
    and no host, a host and no port or path), to the last @ after it. Each step
    is one pass over the text (no pattern that backtracks over a long word).
    """
    out: list[str] = []
    done = 0
    while (found := _POSTGRESQL_URL.search(text, done)) is not None:
        start, end = found.span()
        another = _ANY_URL.search(text, end)
        limit = len(text) if another is None else another.start()
        newline = text.find("\n", end, limit)
        limit = limit if newline < 0 else newline
        last = _last_match(_AT_HOST, text, end, limit)
        if last is None and not _ends_an_authority(found[0]):
            last = _last_match(_ANY_AT, text, end, limit)
        if last is not None:
            end = last.end()
        out += (text[done:start], _hidden_to_last_at(text[start:end]))
        done = end
    out.append(text[done:])
    return "".join(out)


def _last_match(pattern: re.Pattern[str], text: str, start: int, end: int) -> re.Match[str] | None:
    """The last match of ``pattern`` in ``text[start:end]``."""
    matches = list(pattern.finditer(text, start, end))
    return matches[-1] if matches else None


def _ends_an_authority(url: str) -> bool:
    """Whether ``url`` (up to a blank) is whole: no password, or a host with a port or path."""
    rest = url.partition("://")[2]
    if _HOST_PORT.match(rest) or not re.match(r"[^:/?#@]*:", rest):
        return True  # a host and its port, or no password
    if "@" not in rest:
        return False
    return re.search(r"/|:\d", rest.rsplit("@", 1)[1]) is not None


def _hidden_to_last_at(url: str) -> str:
    """``url`` with all between its user and its last @ hidden, if it holds several @."""
    last = _last_of_several_ats(url)
    if last is None:
        return url
    head = url[: url.index("://") + 3]
    return f"{head}{url[len(head) :].partition(':')[0]}:***{url[last:]}"


def safe_url(url: str | URL) -> str:
    """``url`` as it may be shown: its password hidden, in its user part and query.

    Whatever ``url`` holds, this returns printable text: a string that does
    not parse is shown through :func:`redact`.
    """
    if isinstance(url, str) and (cut := _hidden_to_last_at(url)) != url:
        return redact(cut)  # ``user:p@ss@host``: hidden up to the last @
    try:
        parsed = make_url(url)
    except Exception:  # unparsable: shown without anything that may be a secret
        return redact(str(url))
    if parsed.host is not None and "@" in parsed.host:
        # A password holding an @ (``user:p@ss@host``): SQLAlchemy cuts it at its
        # first @ and takes the rest for the host. All of it is hidden.
        parsed = parsed.set(password="***", host=parsed.host.rsplit("@", 1)[1])
    hidden = [key for key in parsed.query if key.lower().endswith("password")]
    if hidden:
        parsed = parsed.update_query_dict(dict.fromkeys(hidden, "***"))
    try:
        return redact(parsed.render_as_string(hide_password=True))
    except (UnicodeError, ValueError, TypeError):  # a part no URL can encode (a lone surrogate)
        if isinstance(url, str):
            return redact(url)
        return redact(_printable_url(parsed).render_as_string(hide_password=True))


def _printable_url(url: URL) -> URL:
    """``url`` with every text part made :func:`printable` (so it renders)."""
    return url.set(
        username=None if url.username is None else printable(url.username),
        host=None if url.host is None else printable(url.host),
        database=None if url.database is None else printable(url.database),
        query={
            printable(key): (
                printable(value) if isinstance(value, str) else tuple(map(printable, value))
            )
            for key, value in url.query.items()
        },
    )


def _utf8(url: URL) -> bool:
    """Whether every part of ``url`` is text UTF-8 can write."""
    try:
        url.render_as_string(hide_password=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _holds_nul(url: URL) -> bool:
    """Whether a part of ``url`` (a name, the password, a query key or value) holds a NUL."""
    parts = [url.username, url.password, url.host, url.database]
    for key, value in url.query.items():
        parts += [key, *_values(value)]
    return any(part is not None and "\x00" in str(part) for part in parts)


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``; a bare ``postgresql://`` URL gets the psycopg (3) driver.

    Raises:
        InvalidURLError: ``url`` is not a URL, or its port is not a number.
        UnsupportedBackendError: It names neither SQLite nor PostgreSQL.
    """
    if isinstance(url, str) and _last_of_several_ats(url) is not None:
        raise InvalidURLError(
            f"not a database URL: {safe_url(url)} (an @ in the password or the database "
            "name is written %40)"
        )
    reason = None
    # A port that is no number is not shown: its text may be a password
    # (``user:PASSWORD/db``, the ``@host`` left out).
    try:
        parsed = make_url(_hosts_as_query(url) if isinstance(url, str) else url)
        if isinstance(url, str) and parsed.database and not _DECODES_DATABASE:
            parsed = parsed.set(database=urllib.parse.unquote(parsed.database))
    except ValueError:
        reason = "its port is not a number"
    except (ArgumentError, TypeError) as exc:
        reason = redact(str(exc))
    else:
        try:
            parsed.port  # noqa: B018 - parsed lazily (some versions): one that is no number raises
        except ValueError:
            reason = "its port is not a number"
        else:
            try:
                _check_hosts(parsed)
            except ValueError as exc:
                reason = redact(str(exc))
            if parsed.host is not None and "@" in parsed.host:
                # ``user:p@ss@host``: SQLAlchemy cuts the password at its first @ and
                # would connect to (and name, in the driver's errors) the rest as the host.
                reason = "its host holds an @: an @ in the password is written %40"
            elif parsed.get_backend_name() != "sqlite" and not _utf8(parsed):
                # A byte that is no UTF-8 in a command's argument (Python keeps it as a
                # lone surrogate): no server connection string can hold it. (A SQLite
                # file's name is the file system's to take.)
                reason = "it holds a byte that is not UTF-8 text"
            elif parsed.get_backend_name() != "sqlite" and _holds_nul(parsed):
                # libpq stops reading a connection string at one: what follows it (the
                # user, the password, the port) would be dropped without a word.
                reason = "it holds a NUL character (%00)"
    if reason is not None:
        shown = safe_url(url).encode("utf-8", "replace").decode("utf-8")
        raise InvalidURLError(
            f"not a database URL: {shown} ({reason}); "
            "expected sqlite:///path.db or postgresql://user:password@host:port/database"
        )
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise UnsupportedBackendError(parsed.get_backend_name())
    return parsed


#: Whether SQLAlchemy decodes a URL's database name (``%40`` is ``@``), as 2.1 does; 2.0
#: keeps it as written, and :func:`normalize_url` decodes it then: one URL names one
#: database (or file) whichever release runs.
_DECODES_DATABASE = make_url("sqlite:///%41").database == "A"

#: Where a URL's query begins: a ``?`` and a parameter's name.
_QUERY = re.compile(r"\?(?=[\w.-]+=)")


def _last_of_several_ats(url: str) -> int | None:
    """Where the last @ is in a PostgreSQL URL holding several after its user (None: not so).

    ``user:p@ss@host/db``: SQLAlchemy cuts the password at its first @ and reads
    the rest as the host, or (the password holding a ``/``, a ``?`` or a blank
    too) as the database or the query. An @ in a database name is as
    ambiguous. Counted up to the query: a ``?`` followed by a parameter's
    ``name=`` (one followed by anything else is the password's).
    """
    scheme, found, rest = url.partition("://")
    if not found or not scheme.lower().startswith(("postgresql", "postgres")):
        return None
    user = re.match(r"[^:/?#]*:", rest)  # (a user holds no / ? #; a password may)
    if user is None:
        return None
    after_user = _QUERY.split(rest[user.end() :], 1)[0]
    if after_user.count("@") < 2:
        return None
    return len(url) - len(rest) + user.end() + after_user.rindex("@")


def _check_hosts(url: URL) -> None:
    """Refuse several ``host`` parameters (libpq's several hosts) SQLAlchemy would misread.

    SQLAlchemy splits each at its colons into a host and a port: the port must
    be a number, and an IPv6 address cannot be among them. One host is passed
    to the driver as it is.

    Raises:
        ValueError: Such a host.
    """
    hosts = url.query.get("host", ())
    if isinstance(hosts, str):
        return
    for host in hosts:
        if host.startswith("/"):
            continue  # a socket directory
        if "[" in host or host.count(":") > 1:
            raise ValueError(  # (the host not shown: it may be a password, ``user:p:w,x@h``)
                "SQLAlchemy takes no IPv6 address among several hosts (name them instead)"
            )
        name, colon, port = host.partition(":")
        if colon and not port.isdigit():  # (not shown: it may be a password, ``user:pw,x@h``)
            raise ValueError(f"the port of host {name!r} is not a number")


#: A URL whose authority lists several hosts, as libpq writes it (and
#: ``pg_autoctl show uri`` prints it): ``postgresql://u@h1:p1,h2:p2/db?...``.
_MULTI_HOST = re.compile(
    r"^(?P<scheme>[^:/?#]+)://(?:(?P<auth>[^@/?#]*)@)?(?P<hosts>[^/?#@]*,[^/?#@]*)"
    r"(?P<rest>(?:[/#][^@?]*)?(?:\?.*)?)$"
)


def _hosts_as_query(url: str) -> str:
    """Libpq's multi-host form, rewritten as SQLAlchemy parses it: ``?host=h1:p1&host=h2:p2``.

    SQLAlchemy reads only one host in the authority part (the rest becomes a
    port that is not a number); the same hosts as ``host`` parameters reach
    psycopg and asyncpg, which try them in order (with the URL's
    ``target_session_attrs``).
    """
    found = _MULTI_HOST.match(url)
    if found is None:
        return url
    auth = found["auth"]
    head = f"{found['scheme']}://{auth + '@' if auth is not None else ''}"
    path, _, query = found["rest"].partition("?")
    hosts = "&".join(f"host={host.strip()}" for host in found["hosts"].split(",") if host.strip())
    return f"{head}{path or '/'}?{hosts}{'&' + query if query else ''}"


def _create(
    make: Callable[..., T], url: URL, kwargs: dict[str, Any], *, make_file: bool = True
) -> T:
    """The engine ``make(url, **kwargs)``; a driver that is not installed told as such.

    An SQLite file (named by a path or a ``file:`` URI) is then created
    owner-only (unless not ``make_file``), before SQLite opens it (on the
    engine's first connection) world-readable; a ``~`` at the start of a path
    is the home directory, for the engine too, so that the file SQLite opens
    is the one created.

    Raises:
        InvalidURLError: The SQLite file cannot be created.
    """
    path = None
    if url.get_backend_name() == "sqlite":
        path = _sqlite_file(url)
        if sqlite_in_memory(url) and _CHOSEN_POOL.isdisjoint(kwargs):
            kwargs = _one_database_in_memory(make, kwargs)
        if path is not None and url.database and url.database.startswith("~"):
            url = url.set(database=str(path))
        elif path is None and _values(url.query.get("mode", "rwc")) == ("rwc",):
            path = _file_uri_path(url)  # (a URI of another mode creates no file)
        if not make_file:
            path = None
    try:
        engine = make(url, **kwargs)
    except (ImportError, NoSuchModuleError) as exc:
        driver = url.get_driver_name()
        extra = "async" if "async" in driver or driver == "aiosqlite" else "postgres"
        raise UnsupportedBackendError(
            url.get_backend_name(),
            f"the {url.get_backend_name()} driver {driver!r} is not installed or not "
            f"known ({exc}); pip install 'hermes-orm-sessions[{extra}]'",
        ) from None
    except InvalidRequestError:  # create_async_engine: the driver has no asyncio connections
        if make is create_engine:
            raise
        raise _other_api(url, "AsyncSessionStore", "SessionStore") from None
    except (ArgumentError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # A query value SQLAlchemy's dialect converts for the driver (?timeout=abc,
        # ?check_same_thread=maybe, ?port=abc): told without the password.
        detail = f"a value it does not take, {exc}" if isinstance(exc, KeyError) else str(exc)
        if url.password:
            detail = detail.replace(str(url.password), "***")
        # Without a query, what SQLAlchemy refused is a keyword argument of the caller's
        # (as is an argument it names as sent to create_engine).
        given = not url.query or "sent to create_engine" in detail
        error = InvalidArgumentError if given else InvalidURLError
        raise error(f"{safe_url(url)}: the engine cannot be made: {detail}") from None
    if isinstance(engine, Engine) and engine.dialect.is_async:
        engine.dispose()
        raise _other_api(url, "SessionStore", "AsyncSessionStore")
    if path is not None:
        try:
            _create_private_file(path)
        except OSError as exc:
            if isinstance(engine, Engine):
                engine.dispose()
            where = "" if exc.filename is None else f": {os.fsdecode(exc.filename)!r}"
            raise InvalidURLError(
                f"{safe_url(url)}: cannot create the SQLite file {str(path)!r}: "
                f"{exc.strerror or exc}{where}"
            ) from None
    return engine


#: Engine arguments that choose a pool: given one, an engine on a database in memory
#: has the pool it says. (Sizes of a queue pool alone are refused: a private database
#: in memory is one connection's, and another would open one of its own, empty.)
_CHOSEN_POOL = frozenset(("poolclass", "pool"))


def _one_database_in_memory(make: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` giving an engine on a database in memory its one connection, for every thread.

    Every connection to a private in-memory database opens a database of its
    own, empty: SQLAlchemy's pools would give another one to each thread
    (``SingletonThreadPool``), or to each call at once (a queue pool, for the
    URIs it takes for files). A ``StaticPool`` keeps one, which the stores take
    in turns (:func:`_sa.thread_turn`).
    """
    kwargs = {**kwargs, "poolclass": StaticPool}
    if make is create_engine:
        kwargs["connect_args"] = {"check_same_thread": False, **kwargs.get("connect_args", {})}
    return kwargs


def _sqlite_file(url: URL) -> Path | None:
    """The SQLite file ``url`` names (None: in memory, or a ``file:`` URI SQLite reads).

    A leading ``~`` or ``~user`` is expanded to that home directory.

    Raises:
        InvalidURLError: No file can have that name.
    """
    database = url.database
    if not (database or "").startswith("file:") and _as_uri(url):
        _refuse_uri_options_of_a_name(url, database or "")
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    reason = "it holds a NUL character" if "\x00" in database else None
    try:
        os.fsencode(database)
    except UnicodeError:
        reason = "it holds a lone surrogate"
    if reason is not None:
        raise InvalidURLError(f"{database!r} cannot be the name of a SQLite file: {reason}")
    return Path(os.path.expanduser(database))


#: The query keys SQLAlchemy gives sqlite3 (or aiosqlite) itself; with ``uri=true``
#: it adds the others to the database name, as a URI's query.
_SQLITE_DRIVER_KEYS = frozenset(
    ("uri", "timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements")
)


def _refuse_uri_options_of_a_name(url: URL, database: str) -> None:
    """Refuse SQLite URI options on a database name that is no ``file:`` URI.

    SQLAlchemy adds them to the name (``agent.db?mode=ro``), and SQLite reads a
    name as a URI only when it begins with ``file:``: it would open, or create,
    a file named so, the options doing nothing.

    Raises:
        InvalidURLError: ``url`` has such options.
    """
    options = sorted(set(url.query) - _SQLITE_DRIVER_KEYS)
    if not options:
        return
    named = f"{database}?" + "&".join(f"{key}=..." for key in options)
    raise InvalidURLError(
        f"{safe_url(url)}: with uri=true SQLite reads the database name as a URI only when "
        f"it begins with 'file:'; it would open a file named {named!r}, and "
        f"{', '.join(options)} would do nothing. Name it as a URI: "
        f"sqlite:///file:{database or ':memory:'}?...&uri=true"
    )


def sqlite_in_memory(url: str | URL) -> bool:
    """Whether ``url`` names a SQLite database in memory, gone with its last connection.

    ``sqlite://`` and ``:memory:``; with ``uri=true`` (else SQLite takes the
    name for a file's), ``file::memory:`` and URIs of ``mode=memory`` or
    ``vfs=memdb``.

    Raises:
        InvalidURLError: ``url`` is not a URL, or has SQLite URI options on a
            name that is no URI.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    if not database.startswith("file:") and _as_uri(parsed):
        _refuse_uri_options_of_a_name(parsed, database)
    if database in ("", ":memory:"):
        return True
    query = parsed.query
    if not _as_uri(parsed) or not database.startswith("file:"):
        return False
    return (
        database.startswith("file::memory:")
        or "memory" in _values(query.get("mode", ()))
        or "memdb" in _values(query.get("vfs", ()))
    )


def _as_uri(url: URL) -> bool:
    """Whether SQLite opens ``url``'s database name as a URI (``?uri=`` true).

    True as SQLAlchemy reads it: ``true``, ``1``, ``yes``...; a value it cannot
    read fails its connect.
    """

    def true(value: str) -> bool:
        try:
            return bool(asbool(value))
        except ValueError:
            return False

    return any(map(true, _values(url.query.get("uri", ()))))


def _values(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """A URL query's value(s) of one key (SQLAlchemy gives a repeated key as a tuple)."""
    return (value,) if isinstance(value, str) else tuple(value)


def asyncio_driver(url: URL) -> bool:
    """Whether ``url`` names a driver of asyncio (aiosqlite, asyncpg, psycopg_async).

    An unknown driver is not: making its engine tells what is wrong with it.
    """
    try:
        return bool(url.get_dialect().is_async)
    except NoSuchModuleError:
        return False


def missing_sqlite_file(url: str | URL) -> Path | None:
    """The SQLite file ``url`` names when there is none yet (None: it exists, or no file).

    What a command that only reads checks before it makes an engine, which
    would create the file (and its directory).

    Raises:
        InvalidURLError: ``url`` is not a URL, or no file can have that name.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    path = _sqlite_file(parsed) or _file_uri_path(parsed)
    try:
        return None if path is None or path.exists() else path
    except OSError as exc:  # a name too long, a directory not ours to look in
        raise InvalidURLError(
            f"{safe_url(parsed)}: cannot look for {path}: {exc.strerror}"
        ) from None


def _file_uri_path(url: URL) -> Path | None:
    """The file a SQLite database named ``file:...`` is in (None: in memory, or none).

    With ``uri=true``, SQLite reads the name as a URI, its path the file's
    (``file:agent.db``, ``file:///var/lib/agent.db``); without, as a file name,
    ``file:`` and all.
    """
    database = url.database or ""
    if not database.startswith("file:") or sqlite_in_memory(url):
        return None
    if not _as_uri(url):
        return Path(database)
    path = urllib.parse.unquote(urllib.parse.urlsplit(database).path)
    return Path(path) if path else None


def _other_api(url: URL, store: str, instead: str) -> InvalidURLError:
    """The error for a URL whose driver belongs to the other API (asyncio or blocking)."""
    return InvalidURLError(
        f"{safe_url(url)}: the driver {url.get_driver_name()!r} is not for {store}; "
        f"use {instead} with this URL"
    )


def _create_private_file(path: Path) -> None:
    """Create the SQLite file owner-only (0600) before SQLite creates it world-readable.

    Each missing directory on its way is made owner-only (0700) too.
    """
    missing = []
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    if not directory.is_dir():  # a file where a directory must be: named as mkdir names it
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(directory))
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


#: Longest lock wait a store takes, in seconds (a day: past it, a writer is stuck).
_LOCK_TIMEOUT_MAX = 86_400.0


def engine_settings(
    sqlite_synchronous: Any, lock_timeout: Any, pgbouncer: Any = False
) -> dict[str, Any]:
    """A store's settings, as :func:`create_store_engine` and :func:`configure_engine` take them.

    Raises:
        InvalidArgumentError: A level SQLite does not have, a lock wait that
            is not a number of seconds above 0 and at most a day, or a
            ``pgbouncer`` that is not a bool.
    """
    if not isinstance(pgbouncer, bool):
        raise InvalidArgumentError(f"pgbouncer must be True or False, got {pgbouncer!r}")
    if not isinstance(sqlite_synchronous, str) or (
        sqlite_synchronous.upper() not in _SQLITE_SYNCHRONOUS
    ):
        raise InvalidArgumentError(
            f"sqlite_synchronous must be one of {_SQLITE_SYNCHRONOUS}, got {sqlite_synchronous!r}"
        )
    if (
        isinstance(lock_timeout, bool)
        or not isinstance(lock_timeout, int | float)
        or not 0 < lock_timeout <= _LOCK_TIMEOUT_MAX  # (NaN compares false)
    ):
        raise InvalidArgumentError(
            f"lock_timeout must be seconds above 0 and at most {_LOCK_TIMEOUT_MAX:.0f}, "
            f"got {lock_timeout!r}"
        )
    return {
        "sqlite_synchronous": sqlite_synchronous,
        "lock_timeout": float(lock_timeout),
        "pgbouncer": pgbouncer,
    }


def replica_settings(
    engine: Engine, settings: dict[str, Any], replica: str | URL
) -> dict[str, Any]:
    """The settings of the engine a store on ``engine`` builds from its ``replica`` URL.

    Behind PgBouncer when the primary is, whichever said so (``pgbouncer=True``,
    or ``?pgbouncer=true`` in the primary's URL), unless the replica's URL says
    ``pgbouncer=`` itself: a standby read directly rather than through the
    pooler loses only its prepared statements. (A replica engine an application
    passes is its own, shared perhaps: only ``pgbouncer=True`` says it is behind
    the pooler.)
    """
    if "pgbouncer" in normalize_url(replica).query:
        return settings
    return {**settings, "pgbouncer": settings["pgbouncer"] or engine in _per_transaction}


def create_store_engine(
    url: str | URL,
    *,
    sqlite_synchronous: str = "FULL",
    lock_timeout: float = LOCK_TIMEOUT,
    pgbouncer: bool = False,
    schema: str | None = None,
    **engine_kwargs: Any,
) -> Engine:
    """Create an engine set up for hermes_orm from a URL.

    SQLite files are created 0600 with their directory; PostgreSQL connections
    get a ``lock_timeout`` so a writer stuck behind a held row lock fails (and
    is retried, then reported) instead of waiting for ever: as a startup
    option, merged with the URL's own ``options``, or, behind PgBouncer
    (``pgbouncer=True``, or ``?pgbouncer=true`` in the URL), in each
    transaction. ``schema`` (or ``?schema=NAME`` in the URL) places hermes_orm's
    tables in that PostgreSQL schema: the engine gets a ``schema_translate_map``
    for them, which stores on it follow. ``engine_kwargs`` go to
    :func:`sqlalchemy.create_engine`.
    """
    return _store_engine(
        create_engine, url, engine_kwargs, (sqlite_synchronous, lock_timeout, pgbouncer, schema)
    )


#: A store engine's settings: ``sqlite_synchronous``, ``lock_timeout``, ``pgbouncer``,
#: ``schema``.
_Settings = tuple[str, float, bool, "str | None"]


def _store_engine(
    make: Callable[..., T], url: str | URL, engine_kwargs: dict[str, Any], settings: _Settings
) -> T:
    """The engine ``make`` (blocking or asyncio) gives for a store, set up."""
    parsed, kwargs, pgbouncer = _store_url(url, engine_kwargs, settings)
    if make is not create_engine and parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    engine = _create(make, parsed, kwargs)
    blocking: Engine = getattr(engine, "sync_engine", None) or cast(Engine, engine)
    configure_engine(
        blocking,
        sqlite_synchronous=settings[0],
        lock_timeout=settings[1],
        pgbouncer=pgbouncer,
        owned=True,
    )
    return engine


def _store_url(
    url: str | URL,
    engine_kwargs: dict[str, Any],
    settings: _Settings = ("FULL", LOCK_TIMEOUT, False, None),
) -> tuple[URL, dict[str, Any], bool]:
    """The URL, keyword arguments and PgBouncer setting of a store's engine, all checked."""
    sqlite_synchronous, lock_timeout, pgbouncer, schema = settings
    parsed, pgbouncer, schema = _url_options(normalize_url(url), pgbouncer, schema)
    engine_settings(sqlite_synchronous, lock_timeout, pgbouncer)  # checked before anything
    kwargs: dict[str, Any] = _with_schema(parsed, engine_kwargs, schema)
    if parsed.get_backend_name() == "postgresql":
        parsed = _pg_connect_args(parsed, _own_connect_args(kwargs), lock_timeout, pgbouncer)
    return parsed, kwargs, pgbouncer


def check_store_url(url: str | URL) -> None:
    """Refuse ``url`` as :func:`create_store_engine` refuses it; nothing is created.

    No connection is made and no SQLite file created: what is checked is the
    URL, its options and its driver, for the blocking store.

    Raises:
        InvalidURLError: The URL, or an option in it, cannot work.
        UnsupportedBackendError: Another backend, or a driver not installed.
    """
    parsed, kwargs, _ = _store_url(url, {})
    _create(create_engine, parsed, kwargs, make_file=False).dispose()


def create_async_store_engine(
    url: str | URL,
    *,
    sqlite_synchronous: str = "FULL",
    lock_timeout: float = LOCK_TIMEOUT,
    pgbouncer: bool = False,
    schema: str | None = None,
    **engine_kwargs: Any,
) -> AsyncEngine:
    """Create an asyncio engine set up for hermes_orm from a URL.

    ``sqlite://`` runs on aiosqlite, a bare ``postgresql://`` on psycopg's
    async connections (``postgresql+asyncpg://`` on asyncpg); otherwise as
    :func:`create_store_engine`.
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    return _store_engine(
        create_async_engine,
        url,
        engine_kwargs,
        (sqlite_synchronous, lock_timeout, pgbouncer, schema),
    )


async def _host_by_host(*args: Any, **kwargs: Any) -> Any:
    """Connect on asyncpg, each host of a multi-host URL within ``timeout`` of its own.

    asyncpg's ``timeout`` bounds its whole connect: a first host that takes the
    connection and never answers (a hung primary) used all of it, every try,
    and the next host (the standby promoted meanwhile) was never tried. A host
    asyncpg itself would pass over (unreachable, starting up, not of the
    ``target_session_attrs`` asked for) passes on to the next; the last one's
    error is raised.
    """
    import asyncpg

    hosts, ports = kwargs.get("host"), kwargs.get("port")
    if not isinstance(hosts, list) or len(hosts) < 2:
        return await asyncpg.connect(*args, **kwargs)
    if not isinstance(ports, list):
        ports = [ports] * len(hosts)
    wanted = kwargs.get("target_session_attrs") or os.environ.get("PGTARGETSESSIONATTRS")
    # A standby preferred: one is looked for on every host first, then any server
    # (asyncpg, given the hosts one at a time, would take the first it reaches).
    kinds = ["standby", "any"] if str(wanted).replace("_", "-") == "prefer-standby" else [wanted]
    tries = [(host, port, kind) for kind in kinds for host, port in zip(hosts, ports, strict=True)]
    for host, port, kind in tries[:-1]:
        try:
            return await asyncpg.connect(
                *args, **{**kwargs, "host": host, "port": port, "target_session_attrs": kind}
            )
        except Exception as exc:
            if not _next_host(exc):
                raise
    host, port, kind = tries[-1]
    return await asyncpg.connect(
        *args, **{**kwargs, "host": host, "port": port, "target_session_attrs": kind}
    )


#: What asyncpg passes over to the next host (besides an OSError, a timeout included),
#: by class name: raised by the driver, or the cause of SQLAlchemy's adapter error.
_NEXT_HOST = frozenset(("CannotConnectNowError", "TargetServerAttributeNotMatched"))


def _next_host(exc: BaseException) -> bool:
    """Whether a connect's failure ``exc`` is one asyncpg tries the next host after."""
    return isinstance(exc, OSError) or any(
        type(error).__name__ in _NEXT_HOST for error in (exc, exc.__cause__) if error is not None
    )


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _url_options(url: URL, pgbouncer: bool, schema: str | None) -> tuple[URL, bool, str | None]:
    """Take ``?pgbouncer=true|false`` and ``?schema=NAME`` out of ``url`` (no driver's).

    Raises:
        InvalidURLError: A value that is not a boolean, or a schema name that is
            not a plain identifier, or either given for SQLite.
    """
    found = [name for name in ("pgbouncer", "schema") if name in url.query]
    if not found:
        return url, pgbouncer, schema
    if url.get_backend_name() != "postgresql":
        raise InvalidURLError(
            f"{' and '.join(found)} in {safe_url(url)}: only postgresql:// URLs take it"
        )
    if "pgbouncer" in url.query:
        value = url.query["pgbouncer"]
        word = value.lower() if isinstance(value, str) else ""
        if word not in _TRUE + _FALSE:
            raise InvalidURLError(
                f"pgbouncer={value!r} in {safe_url(url)}: expected pgbouncer=true or false"
            )
        pgbouncer = pgbouncer or word in _TRUE
    if "schema" in url.query:
        given = url.query["schema"]
        if not isinstance(given, str) or not _IDENTIFIER.fullmatch(given):
            raise InvalidURLError(
                f"schema={given!r} in {safe_url(url)}: expected one plain identifier "
                "(letters, digits, _ and $; not starting with a digit or pg_)"
            )
        if schema is not None and schema != given:
            raise InvalidURLError(f"schema={given!r} in the URL, but schema={schema!r} given")
        schema = given
    return url.difference_update_query(found), pgbouncer, schema


#: A schema name hermes_orm places its tables in: unquoted-identifier shape, so
#: it reads the same everywhere it is written (quoted, it keeps its case).
_IDENTIFIER = re.compile(r"(?!pg_)[A-Za-z_][A-Za-z0-9_$]{0,62}")  # pg_ is the server's


def store_schema(bind: Engine | Connection, schema: Any = None) -> str | None:
    """The PostgreSQL schema a store's tables live in, or None for the database's default.

    Named by ``schema``, or by ``bind``'s ``schema_translate_map`` (its entry for
    tables with no schema, as hermes_orm's are); both must agree.

    Raises:
        InvalidArgumentError: Not a plain identifier, the two disagree, or a
            schema for SQLite (which has none).
    """
    if schema is not None and (not isinstance(schema, str) or not _IDENTIFIER.fullmatch(schema)):
        raise InvalidArgumentError(
            f"schema must be one plain identifier (letters, digits, _ and $; not starting "
            f"with a digit or pg_), got {schema!r}"
        )
    translated = (bind.get_execution_options().get("schema_translate_map") or {}).get(None)
    if schema is not None and translated is not None and translated != schema:
        raise InvalidArgumentError(
            f"schema={schema!r}, but the engine's schema_translate_map puts hermes_orm's "
            f"tables in {translated!r}"
        )
    found = schema if schema is not None else translated
    if found is not None and bind.dialect.name != "postgresql":
        raise InvalidArgumentError(
            f"schema={found!r}: only PostgreSQL places tables in schemas ({bind.dialect.name})"
        )
    if found is not None and not _IDENTIFIER.fullmatch(found):
        raise InvalidArgumentError(f"schema_translate_map names {found!r}, not a plain identifier")
    return found


def _first_on_search_path(schema: str) -> str:
    """The ``set_config`` call that puts ``schema`` first on the transaction's ``search_path``.

    The names that follow it stay: the database's own path (where extensions
    such as pg_trgm usually are) and whatever the connection set.
    """
    path = f"'\"{schema}\", ' || current_setting('search_path')"
    return f"set_config('search_path', {path}, true)"


#: libpq's names of connection parameters a URL may carry, and asyncpg's for them
#: (asyncpg takes the URL's parameters as its own keyword arguments).
_ASYNCPG_NAMES = {"connect_timeout": "timeout", "sslmode": "ssl"}


def _asyncpg_names(url: URL) -> URL:
    """``url`` with libpq's parameter names asyncpg knows under another name renamed.

    ``?connect_timeout=3`` (libpq's) is asyncpg's ``timeout``, ``?sslmode=require``
    its ``ssl``: a URL written for psycopg works on asyncpg too. asyncpg's own
    name, where given as well, wins.
    """
    renamed = {
        ours: url.query[libpq]
        for libpq, ours in _ASYNCPG_NAMES.items()
        if libpq in url.query and ours not in url.query
    }
    if not renamed and not any(name in url.query for name in _ASYNCPG_NAMES):
        return url
    return url.difference_update_query(_ASYNCPG_NAMES).update_query_dict(renamed)


def _option_settings(options: str) -> dict[str, str] | None:
    """The server settings libpq's ``options`` give (``-c name=value``, ``--name=value``).

    A name's dashes are underscores, as the server reads it. None: ``options``
    holds something else (only libpq knows what to make of it).
    """
    settings: dict[str, str] = {}
    words = iter(re.findall(r"(?:\\.|\S)+", options))
    for word in words:
        setting = next(words, "") if word == "-c" else word.removeprefix("-c")
        if word.startswith("--"):
            setting = word[2:]
        elif not word.startswith("-c"):
            return None
        name, equals, value = setting.partition("=")
        if not name or not equals:
            return None
        settings[name.replace("-", "_")] = re.sub(r"\\(.)", r"\1", value)
    return settings


def _asyncpg_settings(url: URL, connect_args: dict[str, Any], options: str) -> URL:
    """``url`` without the libpq parameters asyncpg takes as server settings, set as such.

    libpq sends ``application_name`` and the ``-c name=value`` settings of
    ``options`` to the server at startup; asyncpg takes both as its
    ``server_settings`` (a setting given there already wins), and refuses the
    parameters themselves.

    Raises:
        InvalidURLError: ``options`` holds something other than ``-c`` settings.
    """
    settings = _option_settings(options)
    if settings is None:
        raise InvalidURLError(
            f"options={options!r} in {safe_url(url)}: asyncpg takes only settings "
            "there, as -c name=value"
        )
    application = url.query.get("application_name")
    if isinstance(application, str):
        settings.setdefault("application_name", application)
    if settings:
        given = connect_args.setdefault("server_settings", {})
        for name, value in settings.items():
            given.setdefault(name, value)
    return url.difference_update_query(["options", "application_name"])


def _own_connect_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs``' ``connect_args``, a copy of the caller's (its ``server_settings`` too).

    The store adds its settings to them: a dict the caller passes again, to
    another engine, must not carry this one's.
    """
    connect_args = dict(kwargs.get("connect_args") or {})
    if isinstance(connect_args.get("server_settings"), dict):
        connect_args["server_settings"] = dict(connect_args["server_settings"])
    kwargs["connect_args"] = connect_args
    return connect_args


def _pg_connect_args(
    url: URL, connect_args: dict[str, Any], lock_timeout: float, pgbouncer: bool
) -> URL:
    """Set PostgreSQL's connection arguments for a store; returns the URL left to parse.

    Directly on PostgreSQL, ``lock_timeout`` is a startup option, added to the
    URL's own ``options`` (an explicit ``-c lock_timeout`` there wins). PgBouncer
    in transaction pooling mode hands each transaction whichever server
    connection is free: it refuses startup options, and a statement prepared on
    one server connection is unknown, or taken, on the next. So behind it the
    lock wait is set in each transaction (:func:`transaction_settings`) and the
    drivers prepare nothing.
    """
    asyncpg = url.get_driver_name() == "asyncpg"
    if asyncpg:
        url = _asyncpg_names(url)
    _deadlines(url, connect_args)
    given = connect_args.pop("options", None) if asyncpg else connect_args.get("options")
    in_url = url.query.get("options")
    if isinstance(in_url, tuple):  # the same parameter twice in the URL
        in_url = " ".join(in_url)
    theirs = " ".join(part for part in (in_url, given) if part)
    if asyncpg:
        url = _asyncpg_settings(url, connect_args, theirs)
    if pgbouncer:
        if given or in_url:
            raise InvalidURLError(
                f"options={given or in_url!r} with pgbouncer=true ({safe_url(url)}): PgBouncer "
                "refuses startup options; set such settings on the server (ALTER ROLE ... SET)"
            )
        # (asyncpg's statement caches are turned off as each connection is made:
        # :func:`_connect_unprepared`, on every engine a store is told the flag of.)
        if url.get_driver_name() in ("psycopg", "psycopg_async"):
            connect_args.setdefault("prepare_threshold", None)
        return url
    ours = f"-c lock_timeout={_millis(lock_timeout)}"
    if asyncpg:
        settings = connect_args.setdefault("server_settings", {})
        settings.setdefault("lock_timeout", str(_millis(lock_timeout)))
        return url
    named = _option_settings(theirs)
    if "lock_timeout" in (named or ()) or (
        named is None and re.search("lock[-_]timeout", theirs)  # (what libpq alone reads)
    ):
        ours = ""
    connect_args["options"] = " ".join(part for part in (theirs, ours) if part)
    return url.difference_update_query(["options"])


#: Seconds a connection's login is given (and, behind a pooler, which answers
#: the login itself, its first statements: ``_retry.connecting``).
CONNECT_SECONDS = 10
#: libpq's connection deadlines for engines a store builds, unless the URL sets
#: them: a server that does not answer within ``connect_timeout`` seconds is
#: given up (the next host of a multi-host URL is tried); keepalives find a
#: dead peer of an idle connection within about a minute, and unacknowledged
#: data a lost one within ``tcp_user_timeout`` milliseconds.
LIBPQ_DEADLINES = {
    "connect_timeout": CONNECT_SECONDS,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
#: asyncpg's connection deadline (seconds), its ``timeout`` argument.
ASYNCPG_CONNECT_TIMEOUT = float(CONNECT_SECONDS)


def _deadlines(url: URL, connect_args: dict[str, Any]) -> None:
    """Add the connection deadlines the URL and ``connect_args`` leave unset.

    libpq's own sources of them win too: ``PGCONNECT_TIMEOUT``, and a service
    (``?service=`` or ``PGSERVICE``), whose file may set any of them.
    """
    if url.get_driver_name() == "asyncpg":
        given = url.query.get("timeout")  # a str in the URL; asyncpg wants seconds
        try:
            seconds = ASYNCPG_CONNECT_TIMEOUT if given is None else float(given)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InvalidURLError(
                f"timeout={given!r} in {safe_url(url)}: seconds to connect, a number"
            ) from None
        connect_args.setdefault("timeout", seconds)
        connect_args.setdefault(_sa.ASYNCPG_CONNECT, _host_by_host)
        return
    if "service" in url.query or os.environ.get("PGSERVICE"):
        return  # a pg_service.conf entry says what it wants; ours would override it
    for name, value in LIBPQ_DEADLINES.items():
        if name not in url.query and not (
            name == "connect_timeout" and "PGCONNECT_TIMEOUT" in os.environ
        ):
            connect_args.setdefault(name, value)


def _with_schema(url: URL, engine_kwargs: dict[str, Any], schema: str | None) -> dict[str, Any]:
    """``engine_kwargs`` with a ``schema_translate_map`` for hermes_orm's tables, if placed."""
    kwargs = dict(engine_kwargs)
    if schema is None:
        return kwargs
    if url.get_backend_name() != "postgresql":
        raise InvalidArgumentError(
            f"schema={schema!r}: only PostgreSQL places tables in schemas ({safe_url(url)})"
        )
    if not isinstance(schema, str) or not _IDENTIFIER.fullmatch(schema):
        raise InvalidArgumentError(f"schema must be one plain identifier, got {schema!r}")
    options = dict(kwargs.get("execution_options") or {})
    options["schema_translate_map"] = {**(options.get("schema_translate_map") or {}), None: schema}
    kwargs["execution_options"] = options
    return kwargs


def _unnamed_statement() -> str:
    # The unnamed statement of the protocol: it lives until the next one is
    # prepared, on whichever server connection PgBouncer gave the transaction.
    # A named one (even a unique name) is left behind there: asyncpg closes a
    # statement it no longer needs with its next query, which the pooler may
    # send to another server connection.
    return ""


def _millis(seconds: float) -> int:
    """``seconds`` as whole milliseconds, the nearest, and at least 1 when above 0.

    (0 would be no limit to PostgreSQL's ``lock_timeout``, and no wait at all
    to SQLite's ``busy_timeout``.)
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:
        raise ValueError(f"lock_timeout must be a number of seconds >= 0, got {seconds!r}")
    return max(1, round(seconds * 1000)) if seconds else 0


def insert_maker(dialect: str) -> Callable[..., Any]:
    """The backend's ``insert`` construct: PostgreSQL's or SQLite's, which has ``ON CONFLICT``."""
    return pg_insert if dialect == "postgresql" else sqlite_insert


def check_transactional(engine: Engine | Connection) -> None:
    """Refuse an engine (or connection) that autocommits: no flush could be atomic on it.

    On such an engine each statement would commit alone (rows stored, the
    cursor not moved, and every retry then failing on the positions taken).

    Raises:
        InvalidArgumentError: ``engine`` is set to ``isolation_level="AUTOCOMMIT"``.
    """
    if (_sa.isolation_level(engine) or "").upper() == "AUTOCOMMIT":
        raise InvalidArgumentError(
            "this engine autocommits every statement (isolation_level='AUTOCOMMIT'), so "
            "no flush could be all-or-nothing on it: give the store an engine without "
            "it (your code can still take engine.execution_options(isolation_level="
            "'AUTOCOMMIT') where it wants autocommit)"
        )


def check_driver_transactional(conn: Connection) -> None:
    """Refuse a connection whose driver commits each statement (``connect_args``' autocommit).

    :func:`check_transactional` sees the engine's setting; a driver connection
    made to autocommit (psycopg's ``autocommit=True`` given as a connect
    argument) is seen only once taken from the pool.

    Raises:
        InvalidArgumentError: It autocommits (nothing was run on it).
    """
    if driver_autocommits(conn):
        raise InvalidArgumentError(
            "this engine's connections autocommit every statement (autocommit=True among "
            "its connect_args), so no flush could be all-or-nothing on them: give the store "
            "an engine without it"
        )


def driver_autocommits(conn: Connection) -> bool:
    """Whether ``conn``'s driver connection commits each statement alone (its ``autocommit``)."""
    return getattr(conn.connection.dbapi_connection, "autocommit", False) is True


def check_sqlite_transaction_control(dbapi_connection: Any) -> None:
    """Refuse a sqlite3 connection that keeps a transaction open at all times.

    That is sqlite3's ``autocommit=False`` (Python 3.12+): it begins a deferred
    transaction as it connects and again after each commit and rollback. No
    write could then take SQLite's write lock before it reads (``BEGIN
    IMMEDIATE``, which keeps two writers of one session from reading the same
    cursor), and no PRAGMA the store sets could change. Called before anything
    runs on the connection (pysqlite's, or the one inside aiosqlite's).

    Raises:
        InvalidArgumentError: It keeps a transaction open; nothing was run on it.
    """
    if getattr(_sa.sqlite3_connection(dbapi_connection), "autocommit", None) is False:
        raise InvalidArgumentError(SQLITE_ALWAYS_IN_TRANSACTION)


#: Why a SQLite connection of sqlite3's ``autocommit=False`` is refused.
SQLITE_ALWAYS_IN_TRANSACTION = (
    "this engine's SQLite connections keep a transaction open at all times "
    "(autocommit=False among its connect_args, Python 3.12+), so no write could take "
    "the database's write lock before it reads (BEGIN IMMEDIATE), which keeps two "
    "writers of one session apart: give the store an engine without it (sqlite3's "
    "default, LEGACY_TRANSACTION_CONTROL)"
)


def check_sqlite_transactional(conn: Connection) -> None:
    """Refuse a SQLite connection on which each statement of a transaction commits alone.

    sqlite3 opens a transaction before a write unless its ``isolation_level``
    is None or its ``autocommit`` True (Python 3.12+); there, only a BEGIN of
    the application's own (SQLAlchemy's recipe for SAVEPOINT on pysqlite emits
    one as a transaction begins) holds the statements together. Called once
    SQLAlchemy's transaction began on ``conn``.

    Raises:
        InvalidArgumentError: Nothing holds the transaction's statements together.
    """
    driver = conn.connection.driver_connection
    autocommits = (
        getattr(driver, "autocommit", None) is True
        or getattr(driver, "isolation_level", "") is None
    )
    if autocommits and _sa.driver_in_transaction(conn.connection.dbapi_connection) is False:
        raise InvalidArgumentError(
            "this engine's SQLite connections commit each statement on its own "
            "(isolation_level=None, or autocommit=True, and no BEGIN as a transaction "
            "begins), so no flush could be all-or-nothing on them: emit BEGIN in a 'begin' "
            "listener (SQLAlchemy's recipe for SAVEPOINT on pysqlite), or leave sqlite3's "
            "isolation_level as it is"
        )


def check_configurable(
    engine: Engine, *, lock_timeout: float = LOCK_TIMEOUT, pgbouncer: bool = False, **_: Any
) -> None:
    """Raise as :func:`configure_engine` would, changing nothing.

    Raises:
        InvalidArgumentError: ``engine`` serves stores behind PgBouncer with
            another ``lock_timeout``.
    """
    if not pgbouncer or engine.dialect.name != "postgresql":
        return
    millis = _millis(lock_timeout)
    known = _per_transaction.get(engine, millis)
    if known != millis:
        raise InvalidArgumentError(
            f"this engine already serves a store behind PgBouncer with lock_timeout="
            f"{known / 1000:g} s, not {millis / 1000:g} s: give stores on one engine "
            "the same lock_timeout"
        )


def configure_engine(
    engine: Engine,
    *,
    sqlite_synchronous: str = "FULL",
    lock_timeout: float = LOCK_TIMEOUT,
    pgbouncer: bool = False,
    owned: bool = False,
) -> None:
    """Apply a store's settings to ``engine``.

    SQLite, an engine hermes_orm built (``owned``): connections opened from
    then on get WAL, ``busy_timeout`` (``lock_timeout`` seconds),
    ``foreign_keys=ON`` and the given ``synchronous`` level. An application's
    engine is left as it is: a store gives those settings to each connection it
    takes (:func:`take_sqlite`) and puts the connection's own back when it
    returns it (:func:`give_back_sqlite`). PostgreSQL behind PgBouncer: the
    stores' transactions on ``engine`` set ``lock_timeout`` themselves
    (:func:`transaction_settings`).

    Raises:
        InvalidArgumentError: ``engine`` serves stores behind PgBouncer with
            another ``lock_timeout``.
    """
    engine_settings(sqlite_synchronous, lock_timeout, pgbouncer)
    check_configurable(engine, lock_timeout=lock_timeout, pgbouncer=pgbouncer)
    watch_new_connections(engine)
    if engine.dialect.name == "postgresql":
        if pgbouncer:
            _per_transaction.setdefault(engine, _millis(lock_timeout))
            if engine.dialect.driver in ("psycopg", "psycopg_async") and not event.contains(
                engine, "checkout", _prepare_nothing
            ):
                event.listen(engine, "checkout", _prepare_nothing)
            if engine.dialect.driver == "asyncpg" and not event.contains(
                engine, "do_connect", _connect_unprepared
            ):
                # First: an application's own do_connect that connects ends the chain.
                event.listen(engine, "do_connect", _connect_unprepared, insert=True)
                event.listen(engine, "connect", _made_by_creator)
                event.listen(engine, "checkout", _made_unprepared)
        return
    if engine.dialect.name != "sqlite":
        return
    if engine.dialect.driver in ("pysqlite", "aiosqlite"):  # both bind through sqlite3
        register_sqlite_adapters()
        if not event.contains(engine, "invalidate", _sa.roll_back_invalidated):
            event.listen(engine, "invalidate", _sa.roll_back_invalidated)
    if not owned:
        return
    settings = sqlite_settings(sqlite_synchronous, lock_timeout)
    memory = sqlite_in_memory(engine.url)

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        check_sqlite_transaction_control(dbapi_connection)
        cursor = dbapi_connection.cursor()
        try:
            _set_pragmas(cursor, settings)
            if not memory:
                # The switch waits a moment only: a database in rollback-journal mode
                # that another connection reads (a long read transaction) keeps it
                # from switching for as long, and every new connection would wait
                # the whole busy_timeout before its operation (which may go on
                # beside that reader at once).
                cursor.execute(f"PRAGMA busy_timeout={min(settings[0], _WAL_SWITCH_WAIT_MS)}")
                try:
                    cursor.execute(_ANOTHER_APPLICATIONS)  # (aiosqlite's returns no cursor)
                    if cursor.fetchone() is not None:
                        # Tables, none of them hermes_orm's: another application's
                        # database (a mistyped URL: a store refuses it, and a command
                        # that reads it leaves it as it was), or one the application
                        # has yet to migrate. It keeps its mode; once migrated, the
                        # connection that replaces this one switches it.
                        record.info[_NOT_WAL] = True
                    else:
                        cursor.execute("PRAGMA journal_mode=WAL")
                except Exception as exc:
                    code = getattr(exc, "sqlite_errorcode", None)
                    if code in _SQLITE_TRANSIENT:
                        # Another connection holds a database in rollback-journal mode
                        # locked (a writer, a migration under way): this one works in that
                        # mode for the operation it serves (a read beside the writer, as
                        # it allows), then is replaced by one that switches it.
                        record.info[_NOT_WAL] = True
                    elif not sqlite_read_only(exc):
                        raise
                    # (Read-only: a file, or directory, not ours to write. It is read in
                    # the mode it is in; a write fails as it would in any mode.)
                finally:
                    cursor.execute(f"PRAGMA busy_timeout={int(settings[0])}")
        finally:
            cursor.close()
        record.info[_APPLIED] = settings

    def on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None and record.info.pop(_NOT_WAL, False):
            record.invalidate(soft=True)  # connected anew at its next checkout

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "checkin", on_checkin)


#: SQLite's primary result code for a write to a database opened read-only.
_SQLITE_READONLY = 8


def sqlite_read_only(exc: BaseException | None) -> bool:
    """Whether ``exc`` (a driver error) is SQLite refusing a write to a file it may only read."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == _SQLITE_READONLY


#: Milliseconds a new SQLite connection waits, at most, to switch its database to WAL.
_WAL_SWITCH_WAIT_MS = 100

#: On a pool record: its connection could not switch the database to WAL yet.
_NOT_WAL = "hermes_orm.not_wal"
#: A row where a SQLite database holds tables but not hermes_orm's (left in its mode).
_ANOTHER_APPLICATIONS = (
    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND NOT EXISTS "
    "(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'hermes_sessions') LIMIT 1"
)


def keeps_its_mode(conn: Connection) -> bool:
    """Whether ``conn`` may serve the next operation as it is (see :func:`configure_engine`).

    Not one that could not switch its SQLite database to WAL: back in the pool,
    it is replaced by one that does.
    """
    return not conn.connection.info.get(_NOT_WAL, False)


#: A store's SQLite settings: ``busy_timeout`` (ms), ``foreign_keys``, ``synchronous``.
SQLiteSettings = tuple[int, int, str]
#: The settings a pooled SQLite connection has now, on the pool's record of it.
_APPLIED = "hermes_orm.sqlite_settings"
#: A connection's own settings (and what ``_APPLIED`` said), while a store's replace them.
_SAVED = "hermes_orm.sqlite_saved"


def sqlite_settings(sqlite_synchronous: str, lock_timeout: float) -> SQLiteSettings:
    """The per-connection settings a store works with on SQLite."""
    return (_millis(lock_timeout), 1, sqlite_synchronous.upper())


def _set_pragmas(cursor: Any, settings: tuple[int, int, Any]) -> None:
    busy_ms, foreign_keys, synchronous = settings
    cursor.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
    cursor.execute(f"PRAGMA foreign_keys={int(foreign_keys)}")
    cursor.execute(f"PRAGMA synchronous={synchronous}")


def _on_sqlite(conn: Connection, work: Callable[[Any], None]) -> None:
    """``work(cursor)`` on ``conn``'s driver connection, outside any SQLAlchemy transaction."""
    aiosqlite = _sa.aiosqlite_connection(conn)

    def run(dbapi_connection: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            work(cursor)
        finally:
            cursor.close()

    try:
        if aiosqlite is not None:
            _sa.on_driver_thread(aiosqlite, run)
        else:
            run(conn.connection.dbapi_connection)
    except conn.dialect.loaded_dbapi.Error as exc:
        _sa.raise_driver_error(conn, exc)


def take_sqlite(conn: Connection, settings: SQLiteSettings) -> None:
    """Give a SQLite connection a store just took from the pool the store's settings.

    Nothing to do when it has them (an engine hermes_orm built, or the last
    store that used it wanted the same); otherwise its own are kept beside it
    for :func:`give_back_sqlite`.
    """
    check_sqlite_transaction_control(conn.connection.dbapi_connection)
    info = conn.connection.info
    if info.get(_APPLIED) == settings:
        return

    def apply(cursor: Any) -> None:
        if _SAVED not in info:
            own = []
            for pragma in ("busy_timeout", "foreign_keys", "synchronous"):
                cursor.execute(f"PRAGMA {pragma}")
                own.append(cursor.fetchone()[0])
            info[_SAVED] = (tuple(own), info.get(_APPLIED))
        _set_pragmas(cursor, settings)

    try:
        _on_sqlite(conn, apply)
    except BaseException:
        conn.invalidate()  # half set, or cancelled: the pool must not hand it out again
        raise
    info[_APPLIED] = settings


def give_back_sqlite(conn: Connection) -> None:
    """Put back a SQLite connection's own settings before it returns to the pool.

    The application's code on the engine finds its connections as it left them.
    A connection that cannot take them back is invalidated (the pool drops it).
    """
    if conn.closed or conn.invalidated:
        return
    info = conn.connection.info
    saved = info.get(_SAVED)
    if saved is None:
        return
    if conn.in_transaction():  # foreign_keys cannot change inside one
        conn.rollback()
    own, applied = saved
    try:
        _on_sqlite(conn, lambda cursor: _set_pragmas(cursor, own))
    except BaseException as exc:
        # Half put back, or cancelled (an asyncio task: the driver's thread may still
        # run them): what it holds is unknown, so the pool must not hand it out again.
        conn.invalidate()
        if not isinstance(exc, Exception):
            raise
        return
    del info[_SAVED]
    if applied is None:
        info.pop(_APPLIED, None)
    else:
        info[_APPLIED] = applied


#: What binds None: a C function of one argument that returns None (a Python
#: function would cost several times more a call).
_NULL = set[None]().discard


def register_sqlite_adapters() -> None:
    """Give the sqlite3 module adapters for None and bytes that return the value as is.

    The module binds an int, float, str or bytearray at once, but for any
    other value first searches for an adapter. On Python 3.11, when none is
    registered, that search formats an AttributeError message, then drops it,
    for every such value. A message row's values are mostly None (its NULL
    columns) and its digest is bytes, so writing messages into SQLite spent a
    large share of its CPU time there (see docs/benchmarks.md). With these
    adapters the search ends at its first lookup, and what is bound (NULL, the
    same bytes) is unchanged. They are the sqlite3 module's, so they serve the
    whole process; an adapter already registered for either type is kept.
    """
    for kind, adapter in ((type(None), _NULL), (bytes, bytes)):
        sqlite3.adapters.setdefault((kind, sqlite3.PrepareProtocol), adapter)


#: Message INSERTs of up to this many rows (a turn's flush) are rendered once.
_KEPT_INSERTS = 32


@dataclass(frozen=True, slots=True)
class FlushSQL:
    """The hot statements in one dialect's driver SQL, rendered once.

    The flush runs them with :func:`execute_driver_script`: no compiling or
    parameter processing on any call. Only schema identifiers go into the
    text; every value is a bound parameter. ``begin`` opens a write
    transaction holding the write lock (see :func:`write_begin`).

    Messages go in as multi-row ``INSERT ... VALUES (...), (...)``: one
    statement a batch of up to ``insert_rows_max`` rows. On SQLite this is what
    keeps the search index cheap: a statement that fires triggers writing into
    FTS5 opens a statement savepoint, and FTS5 writes its pending terms out as
    a new segment at every savepoint, so a row per statement costs a segment
    per message (about 3x the FTS5 work of a batch).
    """

    mark: str
    begin: tuple[tuple[str, tuple[()]], ...]
    insert_head: str
    insert_row: str
    insert_rows_max: int
    #: The cursor's compare-and-swap: at cursor 0, on the cursor alone; above it, on
    #: the digest below the cursor and the session's ``history_id`` too.
    advance: str
    advance_if_digest: str
    read_messages: str
    read_where: str
    read_from: str
    read_until: str
    #: Conditions a read of messages adds: their session's row is there (messages a
    #: delete left behind, with SQLite's foreign keys off, are no session's); it is
    #: the user's (given last).
    read_alive: str
    read_owned: str
    #: PostgreSQL: the head of the one statement that moves the cursor and writes
    #: the rows (see :meth:`write_once`), without and with the digest's check;
    #: one row's placeholders in it. None where a flush is several statements.
    once_heads: tuple[str, str] | None = None
    once_row: str = ""
    #: Sessions one :meth:`advance_many` UPDATE moves at most: SQLite parses its
    #: chain of ORs a level deeper a session (at most 1,000 levels), and each
    #: session takes up to 12 of the statement's parameters.
    advance_sessions_max: int = 256

    inserts: dict[int, str] = field(default_factory=dict, repr=False, compare=False)
    onces: dict[tuple[int, bool], str] = field(default_factory=dict, repr=False, compare=False)

    def insert_messages(self, rows: int) -> str:
        """``INSERT`` of ``rows`` messages (1 to ``insert_rows_max``) in one statement."""
        statement = self.inserts.get(rows)
        if statement is None:
            statement = self.insert_head + ", ".join([self.insert_row] * rows)
            if rows <= _KEPT_INSERTS:
                # The same object each time: the driver's statement cache finds it
                # by its hash, which a str computes once.
                self.inserts[rows] = statement
        return statement

    def write_once(self, rows: int, *, checks_digest: bool) -> str:
        """The cursor's compare-and-swap and the ``INSERT`` of ``rows`` messages, one statement.

        Its parameters: those of ``advance`` (or ``advance_if_digest``), then
        the rows'. The UPDATE moves the cursor in a data-modifying CTE, and the
        rows go in only if it did: the statement inserts ``rows`` rows, or none
        when the stored cursor is not the expected one. Run on its own (each
        statement its own transaction), a turn's flush is one round trip
        instead of four (BEGIN, INSERT, UPDATE, COMMIT) and just as atomic.
        """
        assert self.once_heads is not None
        key = (rows, checks_digest)
        statement = self.onces.get(key)
        if statement is None:
            rest = [self.insert_row] * (rows - 1)
            statement = self.once_heads[checks_digest] + ", ".join([self.once_row, *rest])
            statement += _ONCE_TAIL
            if rows <= _KEPT_INSERTS:
                self.onces[key] = statement
        return statement

    def advance_many(self, checks_digest: Sequence[bool]) -> str:
        """One UPDATE moving several sessions' cursors, each compared and swapped.

        Its parameters: (id, new cursor) per session, twice (cursor and message
        count); (id, digest at the new cursor) per session; (id, tool calls
        added) per session; then per session its id, its expected cursor and,
        where ``checks_digest`` says so, its expected digest and history_id (as
        in ``advance_if_digest``; a session at cursor 0 has none to check).
        """
        m = self.mark
        case = "CASE id " + f"WHEN {m} THEN {m} " * len(checks_digest) + "END"
        where = " OR ".join(
            f"(id = {m} AND flushed_idx = {m} AND flushed_digest = {m} AND history_id = {m})"
            if digest
            else f"(id = {m} AND flushed_idx = {m})"
            for digest in checks_digest
        )
        return (
            f"UPDATE hermes_sessions SET flushed_idx = {case}, message_count = {case}, "
            f"flushed_digest = {case}, tool_call_count = tool_call_count + {case} WHERE {where}"
        )


#: The end of :meth:`FlushSQL.write_once`: the rows only if the cursor moved.
_ONCE_TAIL = ") AS new WHERE EXISTS (SELECT FROM moved)"


def _max_parameters(dialect: str) -> int:
    """Bound parameters one statement may hold (SQLite: 999 before 3.32; psycopg: 65,535)."""
    if dialect == "sqlite":
        return 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999
    return 65535


def _marks(dialect: str) -> tuple[str, str]:
    """The driver's placeholder for a value, and for a JSON document."""
    return ("?", "?") if dialect == "sqlite" else ("%s", "%s::json")


_PLACEHOLDER = re.compile(r"%%|%s")


def _numbered(statement: str) -> str:
    """``statement`` with its ``%s`` placeholders as ``$1``, ``$2``, ... (and ``%%`` as ``%``).

    Kept for the statements of up to 16,384 characters (a turn's flush, every
    query): a bulk flush's statements of hundreds of rows are converted each time.
    """
    if len(statement) > _NUMBERED_KEPT:
        return _renumber(statement)
    return _kept_numbered(statement)


_NUMBERED_KEPT = 16_384


def _renumber(statement: str) -> str:
    count = itertools.count(1)
    return _PLACEHOLDER.sub(lambda m: "%" if m[0] == "%%" else f"${next(count)}", statement)


_kept_numbered = lru_cache(maxsize=1024)(_renumber)


def driver_sql(conn: Connection, statement: str) -> str:
    """``statement``, written with psycopg's ``%s`` on PostgreSQL, in ``conn``'s driver's style.

    asyncpg numbers its placeholders (``$1``); every other driver here takes
    the statement as written (SQLite's are ``?`` already).
    """
    return _numbered(statement) if conn.dialect.driver == "asyncpg" else statement


def rows_for_values(conn: Connection, query: str, values: Sequence[Any]) -> list[Any]:
    """Run driver SQL ``query`` for each few hundred of ``values``; all the rows.

    ``{values}`` in ``query`` stands for the placeholders of one part of
    ``values`` (as in ``WHERE id IN ({values})``). SQLAlchemy's expanding ``IN``
    renders and processes the parameter list anew at every execution, which
    cost several times the database work of counting a few hundred sessions.
    """
    rows: list[Any] = []  # rows, each unpacking like a tuple
    for statement, part in _for_values(conn, query, values):
        rows += conn.exec_driver_sql(statement, part).all()
    return rows


def stream_rows_for_values(conn: Connection, query: str, values: Sequence[Any]) -> Iterator[Any]:
    """:func:`rows_for_values`'s rows, fetched a few thousand at a time (a server-side cursor).

    For results too large to hold at once.
    """
    for statement, part in _for_values(conn, query, values):
        yield from conn.exec_driver_sql(statement, part, execution_options={"yield_per": 5_000})


#: Values one ``IN (...)`` list names at most: within every driver's parameter
#: limit (SQLite's 999 before 3.32 too), however many a caller passes.
IN_LIST_MAX = 500


def in_parts(values: Sequence[T], size: int = IN_LIST_MAX) -> Iterator[Sequence[T]]:
    """``values`` in consecutive parts of at most ``size``, each for one ``IN`` list."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def lock_order(column: Any, dialect: str) -> Any:
    """``column`` to ORDER BY rows locked a part at a time of ids Python ``sorted()``.

    PostgreSQL orders text by the database's collation (ICU, ``en_US``: ``a``
    before ``B``), which ``sorted()`` (code points: ``B`` first) may not agree
    with: two writers locking the same rows in parts could then take them in
    opposite orders, and deadlock. ``"C"`` orders by bytes, which in UTF-8 is
    the code points' order.
    """
    return column.collate("C") if dialect == "postgresql" else column


def _for_values(
    conn: Connection, query: str, values: Sequence[Any]
) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """Each statement of ``query`` for a part of ``values``, with that part."""
    mark = _marks(conn.dialect.name)[0]
    for part in in_parts(values):
        yield driver_sql(conn, query.format(values=", ".join([mark] * len(part)))), tuple(part)


def rows_insert(
    dialect: str, table: str, columns: Sequence[str], json_columns: frozenset[str] = frozenset()
) -> tuple[str, str, int]:
    """A multi-row ``INSERT`` into ``table``, in ``dialect``'s driver SQL.

    Returns its head (up to ``VALUES``), one row's placeholders, and how many
    rows one statement holds: a few hundred already amortise the statement,
    more only grow it, and the driver bounds the parameters.
    """
    mark, json_mark = _marks(dialect)
    values = ", ".join(json_mark if c in json_columns else mark for c in columns)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ",
        f"({values})",
        rows_per_statement(dialect, len(columns)),
    )


def rows_per_statement(dialect: str, columns: int) -> int:
    """Rows of ``columns`` values one multi-row statement holds (see :func:`rows_insert`)."""
    return max(1, min(500, _max_parameters(dialect) // columns))


def render_flush_sql(
    dialect: str,
    insert_columns: tuple[str, ...],
    column_types: tuple[str, ...],
    read_columns: tuple[str, ...],
    *,
    scoped: bool = False,
    schema: str | None = None,
) -> FlushSQL:
    """Render :class:`FlushSQL` for ``dialect`` (``sqlite`` or ``postgresql``).

    ``column_types``: the PostgreSQL type of each of ``insert_columns`` (``json``
    ones get their values as JSON documents). ``scoped``: the cursor's UPDATEs
    also compare the session's ``user_id`` with their last parameter.
    ``schema``: the PostgreSQL schema of the tables, named in the statements
    (which then need no ``search_path``).
    """
    kinds = zip(insert_columns, column_types, strict=True)
    json_columns = frozenset(column for column, kind in kinds if kind == "json")
    mark = _marks(dialect)[0]
    prefix = f'"{schema}".' if schema is not None else ""
    sessions, messages = f"{prefix}hermes_sessions", f"{prefix}hermes_messages"
    insert_head, insert_row, insert_rows_max = rows_insert(
        dialect, messages, insert_columns, json_columns
    )
    advance = (
        f"UPDATE {sessions} SET flushed_idx = {mark}, message_count = {mark}, "
        f"flushed_digest = {mark}, tool_call_count = tool_call_count + {mark} "
        f"WHERE id = {mark} AND flushed_idx = {mark}"
    )
    owner = f" AND user_id = {mark}" if scoped else ""
    # Above cursor 0, the digest below the cursor and the history it is part of.
    on_history = f" AND flushed_digest = {mark} AND history_id = {mark}"
    once_heads: tuple[str, str] | None = None
    once_row = ""
    if dialect == "postgresql":
        heads = [
            f"WITH moved AS ({advance}{digest}{owner} RETURNING id) INSERT INTO {messages} "
            f"({', '.join(insert_columns)}) SELECT * FROM (VALUES "
            for digest in ("", on_history)
        ]
        once_heads = (heads[0], heads[1])
        # The first row's values typed: a VALUES list's types are its own, not the
        # table's, and the others' follow the first. (Short, the statement stays
        # in the driver's cache of converted queries: psycopg keeps those under 4 kB.)
        once_row = "(" + ", ".join(f"{mark}::{kind}" for kind in column_types) + ")"
    return FlushSQL(
        mark=mark,
        begin=write_begin(dialect),
        insert_head=insert_head,
        insert_row=insert_row,
        insert_rows_max=insert_rows_max,
        advance=advance + owner,
        advance_if_digest=f"{advance}{on_history}{owner}",
        read_messages=f"SELECT {', '.join(read_columns)} FROM {messages}",
        read_where=f" WHERE session_id = {mark}",
        # 64-bit bounds: asyncpg types a parameter as its column (idx: 32 bits), and the
        # API takes offsets and limits up to 2**63 - 1 (an index range serves them).
        read_from=f" AND idx >= CAST({mark} AS BIGINT)",
        read_until=f" AND idx < CAST({mark} AS BIGINT)",
        read_alive=f" AND EXISTS (SELECT 1 FROM {sessions} WHERE id = {mark})",
        read_owned=f" AND session_id IN (SELECT id FROM {sessions} WHERE user_id = {mark})",
        once_heads=once_heads,
        once_row=once_row,
        advance_sessions_max=min(256, _max_parameters(dialect) // 12),
    )


def run_as_written(conn: Connection, statement: str) -> Any:
    """Run ``statement``, which takes no parameters, as it is written; its result.

    A statement made of the catalog's text (definitions, names) may hold
    ``%``, which a driver of the ``format`` paramstyles (psycopg, psycopg2,
    pg8000) reads as its placeholders even with no parameters: there it is
    doubled.
    """
    if conn.dialect.paramstyle in ("format", "pyformat"):
        statement = statement.replace("%", "%%")
    return conn.exec_driver_sql(statement)


def execute_driver_sql(conn: Connection, statement: str, params: Sequence[Any] = ()) -> int:
    """Run one hot statement in ``conn``'s transaction; returns its row count.

    See :func:`execute_driver_script`.
    """
    return execute_driver_script(conn, ((statement, params),))


def execute_driver_script(
    conn: Connection,
    statements: Iterable[tuple[str, Sequence[Any]]],
    *,
    commit_if: int | None = None,
    autocommit: bool = False,
) -> int:
    """Run hot statements in order in ``conn``'s transaction; returns the last one's row count.

    The same statements, parameters and transaction whichever way they go:

    - when no event listener and no SQL logging watch the connection, straight
      on one DBAPI cursor of ``conn``'s driver connection, in the driver's own
      transaction (opened by ``BEGIN IMMEDIATE`` on SQLite, by the first
      statement on psycopg) that :func:`end_transaction` ends. SQLAlchemy's
      execution context, result and transaction objects cost more than the
      database work of a small statement on SQLite, and nothing would see them.
      On aiosqlite, all of it is one call on the driver's thread;
    - otherwise each through ``exec_driver_sql``, so tracing, logging and
      recording tools see every statement, and the commit, of a flush.

    With ``commit_if``, the statements are a whole transaction: committed when
    the last one's row count is ``commit_if``, rolled back otherwise. With
    ``autocommit``, each statement is a transaction of its own, which the
    server commits as the statement ends (``conn`` must have none open).

    A driver error is raised as SQLAlchemy raises it (its ``DBAPIError``
    subclasses, the connection invalidated on a disconnect) either way; any
    other exception passes through as it is.
    """
    if autocommit:
        return _autocommitted(conn, statements)
    numbered = conn.dialect.driver == "asyncpg"
    rowcount = 0
    if _sa.observed(conn):
        statements = iter(statements)
        first = next(statements, None)
        if first is None:
            return 0
        if first[0] == "BEGIN IMMEDIATE" and conn.dialect.name == "sqlite":
            begin_immediate(conn)
        else:
            statements = itertools.chain((first,), statements)
        for statement, params in statements:
            text = _numbered(statement) if numbered else statement
            rowcount = conn.exec_driver_sql(text, tuple(params)).rowcount
        if commit_if is not None:
            end_transaction(conn, commit=rowcount == commit_if)
        return int(rowcount)
    ran: list[tuple[str, Sequence[Any]]] = []  # the statement a driver error comes from

    def script(dbapi_connection: Any) -> int:
        cursor, raw = _driver_cursor(conn, dbapi_connection)
        renumber = numbered or raw
        try:
            for statement, params in statements:
                ran[:] = [(statement, params)]
                cursor.execute(_numbered(statement) if renumber else statement, params)
            rowcount = int(cursor.rowcount)
        finally:
            cursor.close()
        if commit_if is not None:
            commit = rowcount == commit_if
            ran[:] = [("COMMIT" if commit else "ROLLBACK", ())]
            dialect = conn.dialect
            (dialect.do_commit if commit else dialect.do_rollback)(dbapi_connection)
        return rowcount

    return _on_driver(conn, script, ran)


def begin_immediate(conn: Connection) -> None:
    """``BEGIN IMMEDIATE`` on a SQLite ``conn``, through SQLAlchemy (its listeners see it).

    ``exec_driver_sql("BEGIN IMMEDIATE")`` would begin SQLAlchemy's transaction
    first, and its ``begin`` listeners run: on an engine set up with
    SQLAlchemy's pysqlite recipe for SAVEPOINT (``isolation_level = None`` at
    connect, a ``begin`` listener emitting ``BEGIN``) that opens a deferred
    transaction, and ``BEGIN IMMEDIATE`` inside it fails. So SQLAlchemy's
    transaction is begun here (every listener runs as it would), and a driver
    transaction open afterwards is rolled back at the driver level: nothing of
    the store's ran in it yet (what a ``begin`` listener itself wrote there is
    rolled back with it: README, SQLite engines). ``BEGIN IMMEDIATE`` then opens
    the driver's, inside SQLAlchemy's, whose commit or rollback ends it.
    """
    if not conn.in_transaction():  # else work is under way: BEGIN IMMEDIATE tells what it finds
        conn.begin()
        dbapi_connection: Any = conn.connection.dbapi_connection
        if _sa.driver_in_transaction(dbapi_connection):
            try:
                conn.dialect.do_rollback(dbapi_connection)
            except conn.dialect.loaded_dbapi.Error as exc:
                _sa.raise_driver_error(conn, exc, "ROLLBACK", ())
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def begin_snapshot(conn: Connection) -> None:
    """Begin ``conn``'s transaction as one whose statements see one moment, locking nothing.

    PostgreSQL gives each statement of a READ COMMITTED transaction its own
    snapshot: REPEATABLE READ gives the transaction one (set before any other
    statement: a store's settings come after). SQLite's driver begins no
    transaction before a read, each statement then its own moment: a deferred
    ``BEGIN`` is sent, which writers do not wait for in WAL mode (on an engine
    whose ``begin`` listener began one already, as SQLAlchemy's SAVEPOINT
    recipe does, that one serves).
    """
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        return
    if not conn.in_transaction():
        conn.begin()
    if _sa.driver_in_transaction(conn.connection.dbapi_connection) is False:
        conn.exec_driver_sql("BEGIN")


def _on_driver(
    conn: Connection, work: Callable[[Any], T], ran: list[tuple[str, Sequence[Any]]]
) -> T:
    """``work(driver_connection)``; a driver error raised as SQLAlchemy raises it.

    On aiosqlite, in one call on the driver's thread (not one trip per call).
    ``ran``: the statement the error comes from, as ``work`` last set it.
    """
    try:
        aiosqlite = _sa.aiosqlite_connection(conn)
        if aiosqlite is not None:
            return _sa.on_driver_thread(aiosqlite, work)
        return work(conn.connection.dbapi_connection)
    except conn.dialect.loaded_dbapi.Error as exc:
        _sa.raise_driver_error(conn, exc, *(ran[0] if ran else ("", ())))


@dataclass(frozen=True, slots=True)
class _PsycopgCursors:
    """psycopg's default cursor classes, and its ``RawCursor`` ones (``$1`` placeholders)."""

    default: type
    raw: type
    async_default: type
    async_raw: type


@cache
def _psycopg_cursors() -> _PsycopgCursors | None:
    """The cursor classes of psycopg; None before psycopg 3.2 (which has no raw cursors)."""
    import psycopg

    if not hasattr(psycopg, "RawCursor"):
        return None
    return _PsycopgCursors(
        psycopg.Cursor, psycopg.RawCursor, psycopg.AsyncCursor, psycopg.AsyncRawCursor
    )


class _AwaitedCursor:
    """A psycopg async cursor driven from SQLAlchemy's greenlet, as its adapter drives one."""

    __slots__ = ("_cursor",)

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, statement: str, params: Sequence[Any]) -> None:
        _sa.awaited(self._cursor.execute(statement, params))

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def close(self) -> None:
        _sa.awaited(self._cursor.close())


def _driver_cursor(conn: Connection, dbapi_connection: Any) -> tuple[Any, bool]:
    """A cursor of ``dbapi_connection`` for :func:`execute_driver_script`.

    On psycopg (blocking and async), with the connection's default cursor
    class, a ``RawCursor``: psycopg converts each ``%s`` statement of more than
    50 parameters anew at every execution (it caches only the smaller ones),
    which cost as much as a tenth of a turn's flush. A cursor class the
    application chose is used as it is.

    Returns:
        The cursor, and whether it takes numbered (``$1``) placeholders.
    """
    kinds = _psycopg_cursors() if conn.dialect.driver == "psycopg" else None
    if kinds is None:
        return dbapi_connection.cursor(), False
    if not conn.dialect.is_async:
        if dbapi_connection.cursor_factory is kinds.default:
            return kinds.raw(dbapi_connection), True
        return dbapi_connection.cursor(), False
    driver = conn.connection.driver_connection
    if getattr(driver, "cursor_factory", None) is kinds.async_default:
        return _AwaitedCursor(kinds.async_raw(driver)), True
    return dbapi_connection.cursor(), False


def fetch_driver_rows(conn: Connection, statement: str, params: Sequence[Any]) -> list[Any]:
    """All the rows of one hot query (driver SQL), in ``conn``'s transaction.

    As :func:`execute_driver_script` runs statements: on the driver's cursor
    when nothing watches ``conn`` (the driver's tuples; SQLAlchemy's rows cost
    as much as a tenth of the fetch of a long transcript), else through
    ``exec_driver_sql``. Either way each row is a sequence (a tuple, or a
    SQLAlchemy row): it unpacks, indexes and counts as a tuple (rows of
    another kind, which may not count, are made tuples: asyncpg's records,
    ``sqlite3.Row`` where an application set that row factory).
    """
    numbered = conn.dialect.driver == "asyncpg"
    text = _numbered(statement) if numbered else statement
    if _sa.observed(conn):
        return list(conn.exec_driver_sql(text, tuple(params)).all())

    def fetch(dbapi_connection: Any) -> list[Any]:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(text, params)
            rows = cursor.fetchall()
            return list(rows) if not rows or type(rows[0]) is tuple else list(map(tuple, rows))
        finally:
            cursor.close()

    return _on_driver(conn, fetch, [(text, params)])


@dataclass(frozen=True, slots=True)
class Backend:
    """The server process of a PostgreSQL connection on an asyncio driver, and that connection."""

    pid: int | None  # (None: the process is not known, behind PgBouncer)
    driver: Any

    def settled(self) -> bool:
        """Whether the driver knows the connection's last statement has ended on the server.

        psycopg's does when the connection is open and runs no command (a
        cancelled one, it waited for). asyncpg's tells no such thing (the next
        call on it waits for a cancelled statement's end): never.
        """
        info = getattr(self.driver, "info", None)  # psycopg's
        if info is None or getattr(self.driver, "closed", True):
            return False
        return getattr(info.transaction_status, "name", "") != "ACTIVE"


def backend(conn: Connection) -> Backend | None:
    """The server process behind ``conn`` (psycopg async, asyncpg); None elsewhere.

    Known to the driver since it connected: asking costs no round trip.
    """
    if conn.dialect.name != "postgresql" or not conn.dialect.is_async:
        return None
    driver = conn.connection.driver_connection
    if driver is None:
        return None
    try:
        if conn.dialect.driver == "asyncpg":
            pid = driver.get_server_pid()
        else:
            pid = driver.info.backend_pid
    except Exception:  # (a driver of another shape: nothing to wait for later)
        return None
    if not pid:
        return None
    # Behind PgBouncer (pgbouncer=True) the id the driver knows is the pooler's,
    # which no server process has.
    return Backend(None if conn.engine in _per_transaction else int(pid), driver)


#: Whether a server process is there still (its statement may still be running).
BACKEND_ALIVE_SQL = "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = :pid)"


def can_autocommit(conn: Connection) -> bool:
    """Whether ``conn``'s statements can run in autocommit now: no transaction is open on it.

    Neither SQLAlchemy's nor the driver's (a connection's ``connect`` or
    ``checkout`` listener may have run SQL on the driver connection). Where the
    driver does not tell, no.
    """
    if conn.in_transaction():
        return False
    return _sa.driver_in_transaction(conn.connection.dbapi_connection) is False


def _autocommitted(conn: Connection, statements: Iterable[tuple[str, Sequence[Any]]]) -> int:
    """:func:`execute_driver_script` with the driver connection in autocommit for the while.

    The server commits each statement as it ends, in the statement's own round
    trip: no BEGIN before it, no COMMIT after. (Where SQLAlchemy ran the
    statements, it considers a transaction begun; its commit is then a no-op.)
    A connection that cannot be put back out of autocommit is invalidated: it
    must never reach the pool's next user so.
    """
    dbapi_connection: Any = conn.connection.dbapi_connection
    try:
        dbapi_connection.autocommit = True
        rowcount = execute_driver_script(conn, statements)
        if conn.in_transaction():  # SQLAlchemy's own, around what it ran: nothing to send
            conn.commit()
        return rowcount
    finally:
        try:
            dbapi_connection.autocommit = False
        except Exception:  # a connection lost meanwhile: the error raised is its own
            conn.invalidate()
        except BaseException:
            conn.invalidate()
            raise


def end_transaction(conn: Connection, *, commit: bool) -> None:
    """Commit, or roll back, what ``conn`` ran since its last commit or rollback.

    Through SQLAlchemy when it began a transaction (its ``commit`` events
    fire); otherwise only :func:`execute_driver_script` ran statements, and the
    dialect's ``do_commit``/``do_rollback`` end the driver connection's own
    transaction (a no-op when it has none).
    """
    if conn.in_transaction():
        if commit:
            conn.commit()
        else:
            conn.rollback()
        return
    dialect = conn.dialect
    # The DBAPI connection itself: its pool proxy would find commit() and
    # rollback() only after a failed attribute lookup.
    dbapi_connection: Any = conn.connection.dbapi_connection
    try:
        if commit:
            dialect.do_commit(dbapi_connection)
        else:
            dialect.do_rollback(dbapi_connection)
    except dialect.loaded_dbapi.Error as exc:
        _sa.raise_driver_error(conn, exc)


def write_begin(dialect: str) -> tuple[tuple[str, tuple[()]], ...]:
    """The statements that open a write transaction holding the write lock from the start."""
    return (("BEGIN IMMEDIATE", ()),) if dialect == "sqlite" else ()


#: Engines whose stores set ``lock_timeout`` in each transaction (behind
#: PgBouncer), with its value in milliseconds.
_per_transaction: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()


def _prepare_nothing(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """``checkout`` listener of a psycopg engine behind PgBouncer: no prepared statements.

    psycopg prepares a statement its connection ran 5 times, under a name it
    numbers per client connection (``_pg3_0``, ...). Behind a pooler in
    transaction mode the server connection is another client's now and then:
    its statement of that name is run instead (another query, another
    session's row returned) or the prepare collides. An engine hermes_orm
    builds is made with ``prepare_threshold=None``; one passed in is given it
    at each checkout (psycopg's setting may change on an open connection).
    """
    driver = record.driver_connection
    if driver is not None and driver.prepare_threshold is not None:
        driver.prepare_threshold = None


#: ``info`` key of a pool entry whose asyncpg connection :func:`_connect_unprepared` made.
_UNPREPARED = "hermes_orm.unprepared"


def _connect_unprepared(_dialect: Any, record: Any, _args: Any, params: dict[str, Any]) -> None:
    """``do_connect`` listener of an asyncpg engine behind PgBouncer: it prepares nothing.

    asyncpg caches the statements it prepares (its own cache, and SQLAlchemy's
    adapter's), named from a counter each process starts at 1. Behind a pooler
    in transaction mode they stay on whichever server connection they were
    prepared on, where another process's statement of the same name is run in
    their place (another query's rows returned) or collides. Both are fixed
    when the connection is made: it gets no caches and the protocol's unnamed
    statement, whether hermes_orm built the engine or the application did (with
    whatever settings).
    """
    params["statement_cache_size"] = 0
    params["prepared_statement_cache_size"] = 0
    params["prepared_statement_name_func"] = _unnamed_statement
    record.info[_UNPREPARED] = True


def _made_by_creator(_dbapi_connection: Any, record: Any) -> None:
    """``connect`` listener beside :func:`_connect_unprepared`: marks a connection it did not make.

    An engine given a ``creator`` (``async_creator``) makes its connections
    without ``do_connect``, so with whatever caches its creator gave them.
    """
    record.info.setdefault(_UNPREPARED, False)


def _made_unprepared(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """``checkout`` listener beside :func:`_connect_unprepared`: older connections are replaced.

    A connection the pool made before a store was told of the pooler has its
    caches: the pool closes it and connects afresh (SQLAlchemy's disconnect
    handling on checkout), for the application's checkouts too. One a
    ``creator`` made cannot be given the settings: refused, saying so.

    Raises:
        InvalidArgumentError: The engine makes its connections with a creator.
    """
    made = record.info.get(_UNPREPARED)
    if made is None:
        raise DisconnectionError("made with prepared statements, which PgBouncer cannot keep")
    if not made:
        raise InvalidArgumentError(
            "this asyncpg engine makes its connections with a creator (async_creator), which "
            "a store behind PgBouncer cannot give its settings (no statement cache, unnamed "
            "statements; SQLAlchemy's adapter caches 100 by default): build the engine from "
            "a URL, or give the store the URL with ?pgbouncer=true"
        )


def transaction_settings(
    engine: Engine, schema: str | None = None
) -> tuple[tuple[str, tuple[()]], ...]:
    """What a store's transactions on ``engine`` run first (after :func:`write_begin`).

    One statement, or none: behind PgBouncer, ``lock_timeout`` for the
    transaction (never for the server connection the next client gets), reads
    included (their ACCESS SHARE locks wait behind a migration's or a ``VACUUM
    FULL``'s, as on a connection that has it as a startup option); for
    tables in a schema of their own, that schema first on ``search_path``, so
    the store's SQL finds them (and the database's extensions stay found).
    """
    settings = []
    millis = _per_transaction.get(engine)
    if millis is not None:
        settings.append(f"set_config('lock_timeout', '{millis}', true)")
    if schema is not None:
        settings.append(_first_on_search_path(schema))
    if not settings:
        return ()
    return ((f"SELECT {', '.join(settings)}", ()),)


#: How long a store waits for the outcome of a COMMIT whose answer was lost
#: (its server process may not have noticed the dropped connection yet).
_OUTCOME_POLLS, _OUTCOME_POLL = 100, 0.05


#: The server's run: its timeline (the first 8 hex digits of a WAL file's name), which
#: a promoted standby starts anew, and when it started. A primary restarted after a
#: crash keeps its timeline, but may give the ids of transactions whose commit never
#: reached its WAL to others: its start time tells the restart.
_TIMELINE = (
    "substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8) "
    "|| ' ' || pg_postmaster_start_time()::text"
)


def transaction_id(conn: Connection) -> tuple[int, str] | None:
    """The id of ``conn``'s transaction and the server's run (PostgreSQL; see ``_TIMELINE``).

    The transaction then has an id. None on SQLite.
    """
    if conn.dialect.name != "postgresql":
        return None
    xid, timeline = conn.exec_driver_sql(f"SELECT txid_current(), {_TIMELINE}").one()
    return int(xid), str(timeline)


#: A standby still in recovery cannot tell its run (WAL functions fail there): it
#: refuses, as a read-only server, with read_only_sql_transaction (25006), a
#: server to wait for until it is promoted, whatever the language of its messages.
_SAME_RUN = f"SELECT CASE WHEN pg_is_in_recovery() THEN txid_current()::text ELSE {_TIMELINE} END"


def same_timeline(conn: Connection, timeline: str) -> bool:
    """Whether the server ``conn`` reaches is still in that run (no failover, no restart since).

    Raises:
        DBAPIError: The server is a standby still in recovery (SQLSTATE 25006).
    """
    return bool(conn.exec_driver_sql(_SAME_RUN).scalar_one() == timeline)


def committed(conn: Connection, xid: int) -> bool:
    """Whether PostgreSQL transaction ``xid`` committed, waiting while it is in progress.

    Only on the server that gave the id, in the same run: a standby promoted
    since may never have received it, and a server restarted after a crash may
    have lost it; either may give it to another transaction.

    Raises:
        DatabaseUnavailableError: It was still in progress after a few seconds.
    """
    status_of = driver_sql(conn, "SELECT txid_status(%s)")
    for _ in range(_OUTCOME_POLLS):
        conn.exec_driver_sql("SAVEPOINT hermes_orm_outcome")
        try:
            status = conn.exec_driver_sql(status_of, (xid,)).scalar_one()
        except DBAPIError as exc:
            if sqlstate(exc.orig) != "22023":
                raise
            # "transaction ID ... is in the future": the server was promoted from a
            # standby that never received it (asynchronous replication): not here.
            conn.exec_driver_sql("ROLLBACK TO SAVEPOINT hermes_orm_outcome")
            conn.exec_driver_sql("RELEASE SAVEPOINT hermes_orm_outcome")
            return False
        conn.exec_driver_sql("RELEASE SAVEPOINT hermes_orm_outcome")
        if status != "in progress":
            return bool(status == "committed")
        conn.exec_driver_sql(driver_sql(conn, "SELECT pg_sleep(%s)"), (_OUTCOME_POLL,))
    raise DatabaseUnavailableError(
        f"the outcome of an earlier try is unknown: its transaction {xid} is still "
        "committing on the server",
        attempts=_OUTCOME_POLLS,
    )


def sqlstate(orig: BaseException | None) -> object:
    """The SQLSTATE of a PostgreSQL driver's error (None where the server sent none).

    psycopg and asyncpg name it ``sqlstate``, psycopg2 ``pgcode``.
    """
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


#: SQLSTATEs of a table or a column the database does not have.
_NOT_THERE = frozenset({"42P01", "42703"})


def names_what_is_not_there(exc: BaseException | None) -> bool:
    """Whether ``exc`` is the database refusing a table or a column it does not have."""
    if not isinstance(exc, DBAPIError):
        return False
    if sqlstate(exc.orig) in _NOT_THERE:
        return True
    message = str(exc.orig)
    missing = message.startswith(("no such table", "no such column"))
    return missing or " has no column named " in message


def is_transient(exc: DBAPIError) -> bool:
    """Whether running the whole transaction again may succeed."""
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        if code is not None:
            return (code & 0xFF) in _SQLITE_TRANSIENT
        message = str(orig).lower()
        return "database is locked" in message or "database is busy" in message
    code = sqlstate(orig)
    if isinstance(code, str):
        if code.startswith("08") and refused_for_good(orig):
            return False  # e.g. PgBouncer's refusals (08P01): it says the same again
        return code in _PG_TRANSIENT or code.startswith("08")
    return is_unreachable(exc)


def refused_for_good(orig: BaseException | None) -> bool:
    """Whether the server (or a pooler in front of it) refused the connection for good.

    Or libpq could not use a connection option it was given, or refused a statement
    before sending it (more parameters than its protocol carries): no try would.
    """
    message = str(orig).lower()
    return any(refusal in message for refusal in _REFUSALS)


def is_unreachable(exc: DBAPIError) -> bool:
    """Whether ``exc`` says the server could not be reached (not that it refused the work).

    psycopg raises OperationalError without a SQLSTATE when a connection
    cannot be made or is lost; a server that answered, but refused the
    credentials or knows no such database, is no reason to try again.
    """
    orig = exc.orig
    if isinstance(orig, sqlite3.Error):
        return False
    if exc.connection_invalidated:
        return True
    code = sqlstate(orig)
    if isinstance(code, str):
        return (code.startswith("08") and not refused_for_good(orig)) or code in _PG_UNREACHABLE
    kinds = {kind.__name__ for kind in type(orig).__mro__}  # psycopg's ConnectionTimeout too
    if orig is not None and orig.__cause__ is not None:  # asyncpg's, under SQLAlchemy's adapter
        kinds.update(kind.__name__ for kind in type(orig.__cause__).__mro__)
    return bool(kinds & _UNREACHABLE_KINDS) and not refused_for_good(orig)


#: Driver exceptions (by class name) that say no server could be reached: a lost
#: or failed connection, or asyncpg finding no host of the kind the URL's
#: ``target_session_attrs`` asks for (a failover under way: none promoted yet).
_UNREACHABLE_KINDS = frozenset(
    {"OperationalError", "ConnectionDoesNotExistError", "TargetServerAttributeNotMatched"}
)


def refuse_shared_transaction(pool: Pool) -> None:
    """Refuse a checkout that would hand the store a transaction open on a shared connection.

    A pool that gives every checkout one connection (``StaticPool``,
    ``SingletonThreadPool``) hands the store the connection the application
    holds: a store's transaction there would commit, or roll back, the
    application's, and a connection given back to such a pool is rolled back.
    Raised before the checkout: nothing is run, nothing of the transaction ends.

    Raises:
        InvalidArgumentError: A transaction is open on the pool's connection.
    """
    if _sa.shared_connection_in_transaction(pool):
        raise InvalidArgumentError(
            f"the engine's pool ({type(pool).__name__}) gives every checkout one connection, "
            "and a transaction is open on it (the application's, or another call's of a "
            "store): hermes_orm would end it; nothing was run. End it before calling "
            "hermes_orm, one call at a time, or give it an engine whose pool has connections "
            "of its own (a database file)"
        )


def pool_exhausted(exc: Exception) -> OperationalError:
    """A pool that gave no connection in time, as a try that found the database out of reach.

    Its connections are all taken, by work that a hung or failing-over server
    keeps waiting as often as not: trying again within the unavailable span
    is what a lost connection gets too.
    """
    return OperationalError(
        "connect",
        None,
        ConnectionError(f"no connection from the pool: {exc}"),
        connection_invalidated=True,
    )


def read_only_hint(exc: DBAPIError) -> str:
    """What to do when ``exc`` says the server is read-only (empty otherwise)."""
    message = str(exc.orig).lower()
    if sqlstate(exc.orig) != "25006" and "read-only" not in message and "standby" not in message:
        return ""
    return (
        " (the server is read-only: a standby, or a primary a failover demoted; list "
        "every host in the URL with ?target_session_attrs=read-write so each new "
        "connection finds the primary)"
    )


class NewConnectionWatch(Protocol):
    """What watches the connections the pool makes in a context (``_retry.connecting``)."""

    def arm(self, fd: int) -> None:
        """A new connection, whose socket's descriptor is ``fd``, begins its first statements."""

    def settled(self) -> None:
        """The checkout under way ended: its new connection's first statements are over."""


#: The watch of new connections in this context (None: none).
NEW_CONNECTION_WATCH: contextvars.ContextVar[NewConnectionWatch | None] = contextvars.ContextVar(
    "hermes_orm_new_connection_watch", default=None
)


def watch_new_connections(engine: Engine) -> None:
    """Have ``engine``'s pool watch what runs on a connection inside a store's checkout.

    (See ``_retry.connecting``.) A new connection's first statements: its
    listeners come first, before SQLAlchemy's and an application's own. And
    the ping of a pooled one, where the application's engine has
    ``pool_pre_ping``: behind PgBouncer with the server down, or on a server
    that stopped answering, it would wait as long. (PostgreSQL only: a SQLite
    connection waits on no server.)
    """
    if engine.dialect.name != "postgresql":
        return
    if not event.contains(engine, "connect", _watch_new_connection):
        event.listen(engine, "connect", _watch_new_connection, insert=True)
        event.listen(engine, "checkout", _new_connection_settled, insert=True)
    _sa.before_ping(engine.dialect, _watch_new_connection)


def _watch_new_connection(dbapi_connection: Any, _record: Any = None) -> None:
    """``connect`` listener, and the ping's hook: watched, where a checkout asks for it."""
    watch = NEW_CONNECTION_WATCH.get()
    if watch is not None:
        fd = _driver_socket(getattr(dbapi_connection, "driver_connection", dbapi_connection))
        if fd is not None:
            watch.arm(fd)


def _new_connection_settled(*_args: Any) -> None:
    """``checkout`` listener: the watch of a new connection's first statements ends."""
    watch = NEW_CONNECTION_WATCH.get()
    if watch is not None:
        watch.settled()


def socket_of(conn: Connection) -> int | None:
    """The file descriptor of ``conn``'s socket to the server (None where unknown)."""
    return _driver_socket(conn.connection.driver_connection)


def _driver_socket(driver: Any) -> int | None:
    """The file descriptor of a driver connection's socket (None where unknown).

    psycopg (sync and async) and psycopg2 give it; asyncpg's is its transport's.
    """
    fileno = getattr(driver, "fileno", None)
    if callable(fileno):
        try:
            return int(fileno())
        except Exception:  # a closed connection
            return None
    transport = getattr(driver, "_transport", None)
    sock = None if transport is None else transport.get_extra_info("socket")
    return None if sock is None else int(sock.fileno())


#: What a server says when it refuses a connection for good (psycopg gives no SQLSTATE).
_REFUSALS = (
    "authentication failed",
    "pg_hba.conf",
    "does not exist",
    "permission denied",
    "password",
    "unsupported startup parameter",  # PgBouncer, to a startup option
    "no such database",  # PgBouncer
    "no such user",  # PgBouncer
    "certificate verify failed",  # TLS
    "does not support ssl",  # libpq: server does not support SSL, but SSL was required
    "rejected ssl upgrade",  # asyncpg, the same
    # The server, to a startup option (``options=-c ...``) it cannot take, or a role
    # that may not log in. (A database closed to connections, ALLOW_CONNECTIONS false,
    # "is not currently accepting connections", is maintenance: waited out.)
    "invalid value for parameter",
    "unrecognized configuration parameter",
    "cannot be changed",  # parameter "shared_buffers" cannot be changed without restarting
    "is not permitted to log in",
    # libpq, to a connection option it cannot use (the URL's query, a service file):
    # the same on every try, before any server is reached.
    'value: "',  # invalid sslmode value: "bogus" (target_session_attrs, gssencmode, ...)
    "for connection option",  # invalid integer value "abc" for connection option "port"
    "definition of service",  # definition of service "x" not found
    "service file",  # service file "..." not found
    "invalid port number",  # invalid port number: "99999"
    # libpq, to a statement of more parameters than its protocol carries (nothing sent).
    "number of parameters must be between",
)

#: duplicate_prepared_statement, invalid_sql_statement_name ("prepared statement
#: ... does not exist"): a prepared statement met another client's server connection.
_PREPARED_ELSEWHERE = {"42P05", "26000"}


def pooler_hint(exc: DBAPIError) -> str:
    """What to do when ``exc`` is how PgBouncer in transaction mode meets session state."""
    message = str(exc.orig).lower()
    asyncpg = "asyncpg" in type(exc.orig).__module__
    if "unsupported startup parameter" in message:
        # libpq (psycopg's) also sends what PGOPTIONS gives, whatever the store was told.
        environment = (
            "; PGOPTIONS in the environment gives some too: unset it (set such settings "
            "on the server, ALTER ROLE ... SET)"
            if os.environ.get("PGOPTIONS") and not asyncpg
            else ""
        )
        return (
            " (the server is reached through PgBouncer, which takes no startup options: "
            f"add ?pgbouncer=true to the URL, or pass pgbouncer=True to the store{environment})"
        )
    if sqlstate(exc.orig) in _PREPARED_ELSEWHERE or "prepared statement" in message:
        if asyncpg:
            engine = (
                "asyncpg's connect_args={'statement_cache_size': 0, "
                "'prepared_statement_cache_size': 0, 'prepared_statement_name_func': lambda: ''}"
            )
        else:
            engine = "psycopg's connect_args={'prepare_threshold': None}"
        return (
            " (a prepared statement met a server connection PgBouncer shares between "
            f"clients: make the engine prepare nothing, e.g. {engine}, or let the store "
            "build it from a URL with ?pgbouncer=true)"
        )
    return ""


def busy_holders(conn: Connection, schema: str | None = None) -> list[Any]:
    """PostgreSQL: the sessions holding locks on ``hermes_sessions``, oldest transaction first.

    ``schema``: the one the table is in (None: the one ``search_path`` finds).
    """
    table = "hermes_sessions" if schema is None else f'"{schema}".hermes_sessions'
    return list(
        conn.execute(
            text(
                "SELECT a.pid, a.application_name, a.state, "
                "extract(epoch FROM now() - a.xact_start) AS age "
                "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.relation = to_regclass(:table) AND l.granted "
                "AND a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL "
                "ORDER BY a.xact_start LIMIT 3"
            ),
            {"table": table},
        ).all()
    )


def describe_busy(
    engine: Engine,
    exc: DBAPIError,
    holders: Sequence[Any] | None = None,
    schema: str | None = None,
) -> str:
    """Say what held the lock, as far as the backend can tell.

    On PostgreSQL the lock holders are looked up on a new connection of
    ``engine``, unless ``holders`` (:func:`busy_holders`) were read already,
    or the pool has none to give now: the error is not kept waiting for it.
    """
    if engine.dialect.name == "sqlite":
        where = _sqlite_file(engine.url) or "the in-memory database"
        return (
            f"another connection to {where} held the SQLite write lock past "
            f"busy_timeout ({exc.orig})"
        )
    if holders is None:
        holders = []
        if _sa.pool_has_room(engine.pool):
            try:
                with engine.connect() as conn:
                    holders = busy_holders(conn, schema)
            except (DBAPIError, PoolTimeoutError):  # (taken by another thread meanwhile)
                pass
    if not holders:
        return f"PostgreSQL reported {exc.orig}"
    who = "; ".join(
        f"pid {h.pid} ({h.application_name or 'no application_name'}, {h.state}, "
        f"transaction open {h.age:.1f}s)"
        for h in holders
    )
    return f"PostgreSQL reported {exc.orig}; holding locks on hermes_sessions: {who}"
