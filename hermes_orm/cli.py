"""The ``hermes-orm`` command line.

The database URL comes from ``--url``, else ``HERMES_ORM_URL``, else the
embedded SQLite file ``hermes_orm.db`` under ``$HERMES_HOME`` (default
``~/.hermes``), created readable by its owner only. Passwords are never printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import io
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from hermes_orm import _retry, migrations
from hermes_orm._dialects import (
    CONNECT_SECONDS,
    create_store_engine,
    default_url,
    hermes_home,
    missing_sqlite_file,
    normalize_url,
    pooler_hint,
    redact,
    safe_url,
    sqlite_in_memory,
)
from hermes_orm.errors import (
    HermesOrmError,
    InvalidArgumentError,
    InvalidURLError,
    SchemaOutOfDateError,
)
from hermes_orm.store import SessionStore

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

#: A command says at once that the database is out of reach (after 3 s), where a
#: long-running application waits out a failover (RetryPolicy's default).
_RETRY = _retry.RetryPolicy(unavailable_for=3.0)


def _db(args: argparse.Namespace) -> int:
    if args.db_command == "upgrade":  # refused before the database is made
        backend = normalize_url(args.url).get_backend_name()
        migrations.check_upgrade_arguments(
            args.revision, partitions=args.partitions, dialect=backend
        )
    engine = create_store_engine(args.url)
    try:
        with _retry.connecting(CONNECT_SECONDS):
            _db_command(engine, args)
    finally:
        engine.dispose()
    return 0


def _db_command(engine: Engine, args: argparse.Namespace) -> None:
    """Run ``hermes-orm db``'s subcommand on ``engine``."""
    if args.db_command == "upgrade":
        migrations.upgrade(engine, args.revision, partitions=args.partitions)
        split = "" if args.partitions is None else f", messages in {args.partitions} partitions"
        print(f"{safe_url(args.url)}: at {migrations.current(engine)}{split}")
    elif args.db_command == "downgrade":
        migrations.downgrade(engine, args.revision)
        print(f"{safe_url(args.url)}: at {migrations.current(engine) or 'base (no schema)'}")
    elif args.db_command == "current":
        revision = migrations.current(engine)
        head = migrations.head()
        state = "up to date" if revision == head else f"head is {head}"
        print(f"{safe_url(args.url)}: {revision or 'no hermes_orm schema'} ({state})")
    else:  # check
        migrations.check(engine)
        print(f"{safe_url(args.url)}: schema is at head ({migrations.head()})")


def _sessions(args: argparse.Namespace) -> int:
    store = SessionStore(args.url, retry=_RETRY)
    try:
        if args.sessions_command == "show":
            session = store.get_session(args.session_id)
            if session is None:
                print(redact(f"no session {args.session_id!r}"), file=sys.stderr)
                return 1
            messages = store.get_messages(args.session_id)
            if args.json:
                _print_json({"session": session, "messages": messages})
                return 0
            for key, value in session.items():
                if value is not None:
                    print(f"{key:>34}: {inert(str(value))}")
            print()
            for idx, message in enumerate(messages):
                print(f"[{idx}] {inert(_one_line(message))}")
            return 0
        page = store.list_sessions(
            source=args.source, user_id=args.user_id, limit=args.limit, cursor=args.cursor
        )
        if args.json:
            _print_json(page.sessions)  # (a list, as before: where more are, stderr says)
        else:
            print(f"{'id':<32} {'source':<10} {'messages':>8}  {'model':<24} title")
            for s in page.sessions:
                # (!s: a column your own SQL wrote may hold bytes, which take no width.)
                print(
                    inert(
                        f"{s['id']!s:<32} {s['source']!s:<10} {s['message_count']!s:>8}  "
                        f"{(s['model'] or '-')!s:<24} {s['title'] or ''}"
                    )
                )
        if page.next_cursor:
            more = _next_page(args, ("source", "user_id", "limit"), page.next_cursor)
            print(more, file=sys.stderr if args.json else None)
        return 0
    finally:
        store.close()


def _print_json(document: Any) -> None:
    """Print ``document`` as JSON, its text as it is where the output can hold it.

    A value with a lone surrogate (kept in a session's JSON fields as Hermes
    wrote it) cannot be written as UTF-8: then every character past ASCII is
    escaped, which reads back the same.
    """
    text = json.dumps(document, indent=2, ensure_ascii=False, default=_shown_bytes)
    try:
        text.encode(sys.stdout.encoding or "utf-8")
    except UnicodeEncodeError:
        text = json.dumps(document, indent=2, default=_shown_bytes)
    print(text)


def _shown_bytes(value: Any) -> str:
    """A bytes value (a column your own SQL wrote) as the table shows it: ``b'...'``."""
    if isinstance(value, bytes):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


#: Each control character, as the symbol that pictures it (one for one: search's
#: highlight offsets stay right). Stored text is the agent's, its model's and its
#: users': printed raw, an escape sequence in it would drive the reader's terminal,
#: and a line break would print lines of its own (a forged row, a forged ``more:``).
_PICTURES = {
    **{code: 0x2400 + code for code in range(0x20)},
    0x7F: 0x2421,
    **dict.fromkeys(range(0x80, 0xA0), 0xFFFD),
}


def inert(text: str) -> str:
    """``text`` safe to print to a terminal (see :data:`_PICTURES`)."""
    return text.translate(_PICTURES)


def _one_line(message: dict[str, Any], width: int = 100) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(
            str(p.get("text", f"<{p.get('type')}>")) for p in content if isinstance(p, dict)
        )
    text = _text(content).replace("\n", " ")
    calls = message.get("tool_calls")
    if calls:
        names = [_call_name(call) for call in (calls if isinstance(calls, list) else [calls])]
        text = f"{text} -> calls {', '.join(names)}".strip()
    line = f"{message['role']!s:<9} {text}"
    return line if len(line) <= width else line[: width - 1] + "…"


def _call_name(call: Any) -> str:
    """The function a tool call names; whatever else the store accepted, as its JSON."""
    function = call.get("function") if isinstance(call, dict) else call
    name = function.get("name", "?") if isinstance(function, dict) else function
    return "?" if name is None else _text(name)


def _text(value: Any) -> str:
    """``value`` if it is text, else its JSON ('' for None)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):  # (a column your own SQL wrote)
        return _shown_bytes(value)
    return json.dumps(value, ensure_ascii=False, default=_shown_bytes)


def _next_page(args: argparse.Namespace, options: Sequence[str], cursor: str) -> str:
    """``more:`` and the arguments that list the next page: the query, ``options`` and ``cursor``.

    (A cursor is a place in one listing: with other filters it would list another.)
    A query beginning with "-" (``-word`` excludes it) comes last, after ``--``:
    before it would be read as an option.
    """
    query = " ".join(args.query) if hasattr(args, "query") else None
    words = [_word(query)] if query is not None and not query.startswith("-") else []
    for option in options:
        value = getattr(args, option)
        if value is not None:
            # As one word: a value beginning with "-" would be read as an option.
            words.append(_word(f"--{option.replace('_', '-')}={value}"))
    words += ["--cursor", cursor]
    if query is not None and query.startswith("-"):
        words += ["--", _word(query)]
    return " ".join(["more:", *words])


#: A lone surrogate: a byte of an argument that was not UTF-8, as Python holds it.
_SURROGATE = re.compile("[\\ud800-\\udfff]")


def _word(text: str) -> str:
    """``text`` as one shell word that pastes back as it is.

    A control character in it (an escape sequence, a line break) is written as
    bash's ``$'...'`` escapes, never sent to the terminal raw.
    """
    if text == inert(text) and not _SURROGATE.search(text):
        return shlex.quote(text)
    # Each such character as its bytes (a lone surrogate: the byte it stands for, as
    # the argument held it): what bash's $'\\xHH' gives back in any locale.
    escaped = "".join(
        c
        if c == inert(c) and not _SURROGATE.match(c)
        else "".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogateescape"))
        for c in text.replace("\\", "\\\\").replace("'", "\\'")
    )
    return f"$'{escaped}'"


def _search(args: argparse.Namespace) -> int:
    store = SessionStore(args.url, retry=_RETRY)
    try:
        if args.query == ["rebuild"]:
            given = [f"--{o}" for o in ("session", "source", "role", "limit", "cursor")]
            given = [o for o in given if getattr(args, o[2:]) is not None]
            if given:  # (the whole index is rebuilt: they would be passed over)
                raise InvalidArgumentError(
                    f"search rebuild rebuilds the whole index: {', '.join(given)} "
                    "belong to a search (to look for the word, quote it: search '\"rebuild\"')"
                )
            count = store.rebuild_search_index()
            if args.json:
                _print_json({"rebuilt": True, "messages": count})
            else:
                print(f"{safe_url(args.url)}: search index rebuilt over {count} messages")
            return 0
        page = store.search(
            " ".join(args.query),
            session_id=args.session,
            source=args.source,
            role=args.role,
            limit=20 if args.limit is None else args.limit,
            cursor=args.cursor,
        )
        if args.json:
            document = {
                "hits": [hit.to_dict() for hit in page.hits],
                "next_cursor": page.next_cursor,
            }
            _print_json(document)
        else:
            # Matches in bold on a terminal, in [brackets] otherwise.
            before, after = ("\x1b[1m", "\x1b[0m") if sys.stdout.isatty() else ("[", "]")
            for hit in page.hits:
                shown = dataclasses.replace(hit, snippet=inert(hit.snippet))  # (same offsets)
                where = inert(f"{hit.session_id}[{hit.idx}] {hit.role!s:<9}")
                print(f"{where} {shown.marked(before, after)}")
            if not page.hits:
                print("no hits", file=sys.stderr)
        if page.next_cursor:
            more = _next_page(args, ("session", "source", "role", "limit"), page.next_cursor)
            print(more, file=sys.stderr if args.json else None)
        return 0
    finally:
        store.close()


def _import(args: argparse.Namespace) -> int:
    from hermes_orm.integrations.hermes.importer import main_import

    path = args.path if args.path is not None else str(hermes_home() / "state.db")
    return main_import(path, args.url, restore_deleted=args.restore_deleted)


def _demo(args: argparse.Namespace) -> int:
    from hermes_orm._demo import run_demo

    return run_demo(args.url)


def _verify(args: argparse.Namespace) -> int:
    from hermes_orm.verify import verify_database

    with SessionStore(args.url, retry=_RETRY) as store:
        report = verify_database(store, repair=args.repair)
    if args.json:
        _print_json(report.as_dict())
    else:
        for problem in report.problems:
            where = f"session {problem.session_id!r}" if problem.session_id else "database"
            fixed = " (repaired)" if problem.repaired else ""
            print(inert(f"{where}: {problem.check}: {problem.detail}{fixed}"))
        for what in report.unchecked:
            print(f"not checked: {what}")
        repaired = sum(problem.repaired for problem in report.problems)
        left = len(report.problems) - repaired
        verdict = "ok" if report.ok else f"{left} problem(s)"
        if repaired:
            verdict += f", {repaired} repaired"
        print(
            f"{safe_url(args.url)}: {report.sessions} sessions, "
            f"{report.messages} messages: {verdict}"
        )
    return 0 if report.ok else 1


def _status(args: argparse.Namespace) -> int:
    from hermes_orm.integrations.hermes.plugin import clear_status, print_status, status_file

    shown = status_file().read()
    code = print_status(
        args.url,
        getattr(args, "url_origin", None),
        getattr(args, "upgrade_command", None),
        recorded=shown,
    )
    if args.clear:
        clear_status(args.url, shown)
        print("cleared: the error and given-up writes shown above")
    return code


def _in_memory(url: str) -> bool:
    """Whether ``url`` is a SQLite database in memory (not if it is no URL: its command says)."""
    try:
        return sqlite_in_memory(url)
    except InvalidURLError:
        return False


def _refuse(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """What ``parser.error`` does, but for a URL's password, which it never shows."""
    parser.print_usage(sys.stderr)
    parser.exit(2, f"{parser.prog}: error: {redact(message)}\n")


class RedactingParser(argparse.ArgumentParser):
    """An argument parser whose error messages never show a URL's password."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and ``message`` (redacted), and exit with status 2."""
        _refuse(self, message)

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        """Print the help; a write that fails raises (argparse's own would pass it over)."""
        (sys.stdout if file is None else file).write(self.format_help())


def redact_errors(parser: argparse.ArgumentParser) -> None:
    """Make ``parser``, a sub-parser another program built (Hermes' ``orm``), redact as ours do.

    Its own errors, and the arguments it does not know: those it would hand
    back to the program's parser, which names them as they were given.
    """
    parse_known_args = parser.parse_known_args

    def known_only(*args: Any, **kwargs: Any) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = parse_known_args(*args, **kwargs)
        if extras:
            _refuse(parser, f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    parser.error = functools.partial(_refuse, parser)  # type: ignore[method-assign]
    parser.parse_known_args = known_only  # type: ignore[method-assign,assignment]


def url_option() -> argparse.ArgumentParser:
    """A parent parser that accepts ``--url`` after a command too."""
    option = RedactingParser(add_help=False)
    option.add_argument(
        "--url", default=argparse.SUPPRESS, help="database URL (here or before the command)"
    )
    return option


def add_commands(commands: Any, *, demo: bool = True) -> None:
    """Add the commands to ``commands`` (an ``add_subparsers`` action).

    ``hermes-orm`` and Hermes Agent's ``hermes orm`` share them; each sub-parser
    sets ``handler``, which :func:`run` calls.
    """
    url = url_option()
    db = commands.add_parser("db", help="schema migrations", parents=[url])
    db_commands = db.add_subparsers(dest="db_command", required=True)
    up = db_commands.add_parser("upgrade", help="migrate to the newest schema", parents=[url])
    up.add_argument("revision", nargs="?", default="head", help="where to stop (default: head)")
    up.set_defaults(creates=True)
    up.add_argument(
        "--partitions",
        type=int,
        metavar="N",
        help="PostgreSQL: then hash-partition hermes_messages by session_id into N partitions "
        "(see docs/scale-out.md; the table is locked while it is rebuilt)",
    )
    down = db_commands.add_parser(
        "downgrade",
        help="migrate down (base drops hermes_orm's tables; its version table stays, empty)",
        parents=[url],
    )
    down.add_argument("revision", help="where to stop: a revision, -N, or base")
    db_commands.add_parser("current", help="show the schema revision", parents=[url])
    db_commands.add_parser(
        "check", help="exit non-zero unless the schema is at head", parents=[url]
    )
    db.set_defaults(handler=_db)

    sessions = commands.add_parser("sessions", help="inspect stored sessions", parents=[url])
    s_commands = sessions.add_subparsers(dest="sessions_command", required=True)
    listing = s_commands.add_parser("list", help="newest sessions first", parents=[url])
    listing.add_argument("--source")
    listing.add_argument("--user-id")
    listing.add_argument("--limit", type=int, default=50, help="page size, 1 to 1000")
    listing.add_argument("--cursor", help="next page: the cursor the previous page printed")
    listing.add_argument("--json", action="store_true")
    show = s_commands.add_parser("show", help="one session and its messages", parents=[url])
    show.add_argument("session_id")
    show.add_argument("--json", action="store_true")
    sessions.set_defaults(handler=_sessions)

    finder = commands.add_parser(
        "search",
        help="find messages ('search rebuild' rebuilds the index)",
        description='Search stored messages: words, "phrases", OR, -excluded, prefix*. '
        "'search rebuild' rebuilds the search index; to look for the "
        "word itself, quote it: search '\"rebuild\"'.",
        parents=[url],
    )
    finder.add_argument("query", nargs="+", help="the query (several arguments are joined)")
    finder.add_argument("--session", help="only this session")
    finder.add_argument("--source", help="only sessions of this source")
    finder.add_argument("--role", help="only messages of this role")
    finder.add_argument("--limit", type=int, help="most hits on a page (default 20)")
    finder.add_argument("--cursor", help="next page: the cursor the previous page printed")
    finder.add_argument("--json", action="store_true")
    finder.set_defaults(handler=_search)

    importer = commands.add_parser(
        "import",
        help="copy a Hermes Agent state.db (read-only) into the database",
        parents=[url],
    )
    importer.add_argument(
        "path",
        nargs="?",
        default=None,
        help="the Hermes state.db (default: $HERMES_HOME/state.db, ~/.hermes/state.db)",
    )
    importer.add_argument(
        "--restore-deleted",
        action="store_true",
        help="copy again the sessions deleted in the database since an earlier import",
    )
    importer.set_defaults(handler=_import, creates=True)

    checker = commands.add_parser(
        "verify",
        help="check every invariant over the database (exit 1 on a violation)",
        description="Check positions, cursors, counts, digests, lineage and the search "
        "index of every session. --repair fixes derived data (never deletes a message).",
        parents=[url],
    )
    checker.add_argument("--repair", action="store_true", help="fix what is derived")
    checker.add_argument("--json", action="store_true")
    checker.set_defaults(handler=_verify)

    status = commands.add_parser(
        "status",
        help="the database, its schema, and the Hermes mirror's last error",
        parents=[url],
    )
    status.add_argument(
        "--clear",
        action="store_true",
        help="once shown, forget the recorded error and given-up writes of the database",
    )
    status.set_defaults(handler=_status)

    if demo:
        runner = commands.add_parser(
            "demo",
            help="run a simulated agent conversation with failures and a second writer",
            parents=[url],
        )
        runner.set_defaults(handler=_demo, creates=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hermes-orm``."""
    parser = RedactingParser(
        prog="hermes-orm", description="Exactly-once storage of LLM-agent sessions."
    )
    parser.add_argument(
        "--url",
        default=None,
        help="database URL (default: $HERMES_ORM_URL, else $HERMES_HOME/hermes_orm.db)",
    )
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the command ``args`` holds (``args.url`` set); returns the exit status.

    Only the commands that write (``db upgrade``, ``import``, ``demo``) create a
    SQLite file that is not there: one that reads says so instead (a mistyped
    path leaves nothing behind); ``status`` tells it as a database the mirror
    has not made yet. A SQLite database in memory is refused, but by ``demo``,
    which runs whole in its one process, and ``status``.
    """
    name = _program(args)
    command = getattr(args, "upgrade_command", None)
    upgrade = command or "`hermes-orm db upgrade`"
    try:
        if args.handler not in (_demo, _status) and _in_memory(args.url):
            # Each command is a process of its own: what it wrote would be gone
            # when it ends, and there is nothing for it to read. (status reports
            # the Hermes mirror's own record too: why it is off, say.)
            print(
                f"{name}: {redact(str(args.url))} is a SQLite database in memory, gone when "
                "this command ends: give a file (sqlite:///path/to/hermes_orm.db)",
                file=sys.stderr,
            )
            return 2
        if not getattr(args, "creates", False) and args.handler is not _status:
            missing = missing_sqlite_file(args.url)
            if missing is not None:
                print(
                    f"{name}: no database at {str(missing)!r}: nothing is stored there "
                    f"(check the URL; {upgrade} creates it)",
                    file=sys.stderr,
                )
                return 2
        return int(args.handler(args))
    except HermesOrmError as exc:
        if isinstance(exc, SchemaOutOfDateError) and not exc.branch and command:
            exc = SchemaOutOfDateError(exc.current, exc.expected, fix=command)
        print(f"{name}: {redact(str(exc))}", file=sys.stderr)  # (a URL typed as an argument)
        return 2
    except SQLAlchemyError as exc:
        detail = redact(str(getattr(exc, "orig", None) or exc)).strip()
        if isinstance(exc, DBAPIError):
            detail += pooler_hint(exc)
        print(f"{name}: database {safe_url(args.url)}: {detail}", file=sys.stderr)
        return 2


def _program(args: argparse.Namespace) -> str:
    """The command its errors name: ``hermes orm`` under the Hermes plugin, which says so."""
    return getattr(args, "program", None) or "hermes-orm"


def writable_streams() -> None:
    """Standard streams any text can be written to.

    A stream closed by the caller (``>&-``: None here) writes nowhere; one whose
    encoding cannot write a character (an ASCII locale) writes it escaped,
    where printing it would end the command in a traceback.
    """
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
        elif isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hermes-orm``; returns the exit status."""
    writable_streams()
    return _to_the_end("hermes-orm", lambda: _parsed_and_run(argv))


def _parsed_and_run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:
        # --help, or a usage error: printed, and written out as any output is (where
        # a full disk is told, not at exit). argparse exits with an int status.
        return done.code if isinstance(done.code, int) else 2
    if args.url is None:  # (an empty --url is a URL given: refused as no URL, not replaced)
        args.url = default_url()
    return run(args)


def run_to_the_end(args: argparse.Namespace) -> int:
    """:func:`run`, its output written to the end: a reader gone away ends it quietly.

    What both ``hermes-orm`` and ``hermes orm`` (the Hermes plugin) run.
    """
    return _to_the_end(_program(args), lambda: run(args))


def _to_the_end(program: str, command: Callable[[], int]) -> int:
    """``command``'s status, once its output is written (see :func:`run_to_the_end`)."""
    try:
        status = command()
        sys.stdout.flush()  # here, where a reader gone away is told apart (not at exit)
        return status
    except BrokenPipeError:
        # The reader of an output went away (`| head`): nothing left to say to it, and
        # what the other still holds goes to its reader. (The interpreter's flush at
        # exit would fail again on the closed pipe: it gets /dev/null instead.)
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:  # (None: the process was given no such stream)
                    stream.flush()
            except BrokenPipeError:
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        return 1
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRORS or exc.filename is not None:
            raise
        # The output cannot be written (a full disk, a device's error): said on stderr,
        # and what is left of it dropped (the flush at exit would fail again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"{program}: cannot write the output: {exc.strerror}", file=sys.stderr)
        return 1


#: Errors of a write to an output (no file named: a file opened by name says which).
_OUTPUT_ERRORS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
