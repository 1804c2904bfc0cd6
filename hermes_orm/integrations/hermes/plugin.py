"""The Hermes Agent plugin: every live Hermes session stored, exactly once, in a database.

Installed with hermes_orm (entry point ``hermes_orm`` in the group
``hermes_agent.plugins``) and switched on in ``$HERMES_HOME/config.yaml``::

    plugins:
      enabled: [hermes_orm]
    hermes_orm:                                  # optional
      url: postgresql://user@db.example/hermes   # $HERMES_ORM_URL wins; else the SQLite default
      mode: mirror                               # or store
      wait: 1.0                                  # seconds a turn waits (over 0, at most 60)

In ``mirror`` mode (the default) Hermes keeps its sessions in its own
``state.db`` and the plugin mirrors them. In ``store`` mode Hermes keeps them in
the configured database instead: :func:`install_store` makes
``hermes_state.SessionDB`` hermes_orm's adapter on that database
(:class:`StoreSessionDB`), and the end-of-turn flush
(:class:`~hermes_orm.integrations.hermes.mirror.StoreFlush`) stores what
Hermes' own writes missed.

In mirror mode, after every completed turn Hermes calls ``post_llm_call`` with
the whole conversation, which the :class:`~hermes_orm.integrations.hermes.mirror.Mirror`
flushes (``HERMES_ORM_URL`` wins over the config, as for ``hermes-orm``);
``on_session_finalize`` (CLI exit, ``/new``, gateway expiry) ends the session.
The turns of Hermes' background memory/skill review, which run in a forked
agent under the user's session id, are not the user's conversation and are
left out. ``hermes orm status|sessions|search|db|import`` works on the same
database.

Nothing here breaks or stalls the agent: a hook never raises, and waits for the
database at most ``wait`` seconds.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DBAPIError

from hermes_orm import _retry, cli, migrations
from hermes_orm._dialects import (
    CONNECT_SECONDS,
    check_store_url,
    create_store_engine,
    default_url,
    hermes_home,
    is_unreachable,
    missing_sqlite_file,
    normalize_url,
    redact,
    safe_url,
    sqlite_in_memory,
)
from hermes_orm.errors import (
    DatabaseError,
    DatabaseUnavailableError,
    InvalidArgumentError,
    SchemaOutOfDateError,
    SchemaTooNewError,
    UnsupportedBackendError,
)
from hermes_orm.integrations.hermes._upkeep import Repairs
from hermes_orm.integrations.hermes.mirror import (
    DEFAULT_WAIT,
    STORE_WAIT,
    HermesConversation,
    HermesSessions,
    Mirror,
    StatusFile,
    StoreFlush,
    conversation_rows,
)
from hermes_orm.integrations.hermes.sessiondb import SessionDB
from hermes_orm.models import Message, Session
from hermes_orm.store import SessionStore

logger = logging.getLogger(__name__)

#: The key of this plugin in Hermes' ``plugins.enabled`` and of its config section.
NAME = "hermes_orm"
_URL_FROM_ENV = "HERMES_ORM_URL"
_URL_FROM_CONFIG = "config.yaml hermes_orm.url"
_URL_DEFAULT = "the default, $HERMES_HOME/hermes_orm.db"


def status_file() -> StatusFile:
    """Where the mirror records its last error: ``$HERMES_HOME/hermes_orm_status.json``."""
    return StatusFile(hermes_home() / "hermes_orm_status.json")


def hermes_config() -> Mapping[str, Any]:
    """Hermes' config.yaml as Hermes reads it; empty when Hermes is not installed."""
    try:
        from hermes_cli.config import load_config

        config = load_config()
    except Exception as exc:  # no Hermes, or a config.yaml Hermes itself cannot read
        logger.debug("hermes_orm: cannot read Hermes' config: %s", exc)
        return {}
    return config if isinstance(config, Mapping) else {}


def _section(config: Mapping[str, Any]) -> Mapping[str, Any]:
    section = config.get(NAME)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise InvalidArgumentError(
            f"config.yaml: {NAME} must be a mapping, got {type(section).__name__}"
        )
    return section


def resolve_url(config: Mapping[str, Any]) -> tuple[str, str]:
    """The database URL and where it came from: the env, config.yaml, or the default."""
    if os.environ.get(_URL_FROM_ENV):
        return default_url(), _URL_FROM_ENV
    url = _section(config).get("url")
    if url is not None:
        if not isinstance(url, str) or not url:
            raise InvalidArgumentError(f"config.yaml: {NAME}.url must be a database URL string")
        return url, _URL_FROM_CONFIG
    return default_url(), _URL_DEFAULT


#: The values of ``hermes_orm.mode``: Hermes keeps its ``state.db`` and the plugin
#: mirrors it, or Hermes keeps its sessions in the configured database.
MODES = ("mirror", "store")


def resolve_mode(config: Mapping[str, Any]) -> str:
    """``hermes_orm.mode`` from config.yaml: ``mirror`` (the default) or ``store``."""
    mode = _section(config).get("mode", "mirror")
    if mode not in MODES:
        raise InvalidArgumentError(
            f"config.yaml: {NAME}.mode must be mirror or store, got {mode!r}"
        )
    return str(mode)


def _wait(config: Mapping[str, Any], default: float = DEFAULT_WAIT) -> float:
    wait = _section(config).get("wait", default)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 < wait <= 60:
        raise InvalidArgumentError(
            f"config.yaml: {NAME}.wait must be seconds, over 0 and up to 60, got {wait!r}"
        )
    return float(wait)


def _check_url(url: str) -> None:
    """Refuse, before any turn, a URL no store can be made from.

    Unparsable, of another backend or an asyncio driver, no driver installed,
    an option that cannot work (``?schema=``, ``options`` with
    ``pgbouncer=true``): as a store refuses it. Nothing is connected to or
    created.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise UnsupportedBackendError(parsed.get_backend_name())
    parsed.get_dialect().import_dbapi()
    check_store_url(parsed)


def hermes_state() -> tuple[HermesSessions, HermesConversation]:
    """Readers of Hermes' own session rows and of the conversations it stored.

    Its ``state.db``, opened read-only once it exists (by the first read that finds it).
    """
    opened: list[Any] = []
    lock = threading.Lock()

    def db() -> Any:
        if not opened:
            from hermes_state import DEFAULT_DB_PATH, SessionDB

            if not Path(DEFAULT_DB_PATH).exists():
                return None
            opened.append(SessionDB(read_only=True))
        return opened[0]

    def session(session_id: str) -> dict[str, Any] | None:
        with lock:
            found = db()
            row = found.get_session(session_id) if found is not None else None
        return dict(row) if row else None

    def conversation(session_id: str) -> list[dict[str, Any]] | None:
        with lock:
            found = db()
            if found is None:
                return None
            messages = found.get_messages_as_conversation(session_id)
        return conversation_rows(messages)  # (a gateway transcript's session_meta row left out)

    return session, conversation


# -- store mode ------------------------------------------------------------------------------

_shared: dict[str, SessionStore] = {}
_upgraded: set[str] = set()
_shared_lock = threading.Lock()
#: Seconds a migration that found the database out of reach is remembered: the
#: SessionDBs Hermes opens meanwhile (several at its start) are told at once,
#: not each after the store's whole wait.
UNREACHABLE_REMEMBERED = 60.0
#: By URL, until when and what the last migration found (see UNREACHABLE_REMEMBERED).
_unreachable: dict[str, tuple[float, DatabaseUnavailableError]] = {}


def shared_store(url: str, *, upgrade: bool = True) -> SessionStore:
    """The process's one store on ``url``, made on first use.

    Hermes opens a ``SessionDB`` in many places (per request, per command): in
    store mode they all share this store and its connection pool. The first
    opener with ``upgrade`` migrates the database to the newest schema (once per
    process); a read-only opener gives a database without hermes_orm's schema
    the schema, and leaves an older one to the next writer.
    """
    with _shared_lock:
        store = _shared.get(url)
        if store is None:
            store = _shared[url] = SessionStore(url)
            if len(_shared) == 1:
                atexit.register(_close_shared)
        if url not in _upgraded:
            until, found = _unreachable.get(url, (0.0, None))
            if found is not None and time.monotonic() < until:
                raise DatabaseUnavailableError(
                    f"as this process found less than {UNREACHABLE_REMEMBERED:.0f} s ago, "
                    f"tried again after that ({found})",
                    attempts=0,
                )
            try:
                if upgrade or _schema_missing(store):
                    store.upgrade()
                    _upgraded.add(url)
            except DatabaseUnavailableError as exc:
                _unreachable[url] = (time.monotonic() + UNREACHABLE_REMEMBERED, exc)
                raise
            _unreachable.pop(url, None)
    return store


def _schema_missing(store: SessionStore) -> bool:
    """Whether the store's database has no hermes_orm schema yet.

    Raises:
        DatabaseUnavailableError: The database is out of reach.
    """
    try:
        return migrations.current(store.engine, schema=store.schema) is None
    except DBAPIError as exc:  # (a refusal is typed by current(); what is left is reach)
        raise DatabaseUnavailableError(redact(str(exc.orig)), attempts=1) from exc


def _close_shared() -> None:
    with _shared_lock:
        stores = list(_shared.values())
        _shared.clear()
        _upgraded.clear()
        _unreachable.clear()
    for store in stores:
        store.close()


def _hermes_home_db() -> list[Path]:
    """Where Hermes' own ``SessionDB()`` keeps this profile's sessions (its ``state.db``)."""
    paths = [hermes_home() / "state.db"]
    try:
        from hermes_state import DEFAULT_DB_PATH

        paths.append(Path(DEFAULT_DB_PATH))
    except Exception as exc:  # no Hermes: the home directory decides
        logger.debug("hermes_orm: no hermes_state.DEFAULT_DB_PATH: %s", exc)
    return [path.expanduser().resolve() for path in paths]


def _names_another_file(db_path: Any) -> bool:
    """Whether Hermes' ``db_path`` is a file other than this profile's ``state.db``."""
    if db_path is None or isinstance(db_path, SessionStore):
        return False
    if isinstance(db_path, str) and "://" in db_path:
        return False  # a database URL, given on purpose
    if not isinstance(db_path, str | os.PathLike):
        return False
    return Path(db_path).expanduser().resolve() not in _hermes_home_db()


class StoreSessionDB(SessionDB):
    """Hermes' ``SessionDB`` in store mode: this profile's sessions in the configured database.

    :func:`install_store` makes it ``hermes_state.SessionDB``, so Hermes gets it
    wherever it opens its session database after the plugin loaded. Constructed
    as Hermes constructs its own class:

    - ``SessionDB()``, ``SessionDB(read_only=True)``, and a ``db_path`` naming this
      profile's ``state.db``: the configured database, through the process's one
      :func:`shared_store` (migrated to the newest schema once, by the first
      opener that is not read-only); ``close()`` leaves that store open;
    - a ``db_path`` naming another file (another profile's ``state.db``, an
      explicit copy): Hermes' own class on that file, which this configuration
      does not govern;
    - a :class:`SessionStore` or a database URL: hermes_orm's adapter on it.
    """

    #: The configured database; set by :func:`install_store`.
    url: ClassVar[str | None] = None
    #: Hermes' own ``SessionDB`` class, which other files keep; set by :func:`install_store`.
    hermes_class: ClassVar[type[Any] | None] = None
    #: Store mode's end-of-turn repairs, told of the configured database's rewrites
    #: (see :meth:`StoreFlush.before_rewrite`); set by :func:`register`.
    repairs: ClassVar[Repairs | None] = None

    def __new__(cls, db_path: Any = None, read_only: bool = False) -> Any:
        """Hermes' own class for a ``db_path`` naming another file; else this class."""
        if cls.hermes_class is not None and _names_another_file(db_path):
            return cls.hermes_class(db_path=db_path, read_only=read_only)
        return super().__new__(cls)

    def __init__(self, db_path: Any = None, read_only: bool = False) -> None:
        if isinstance(db_path, SessionStore) or (isinstance(db_path, str) and "://" in db_path):
            super().__init__(db_path, read_only=read_only)
            return
        url = self.url or default_url()
        super().__init__(shared_store(url, upgrade=not read_only), read_only=read_only)
        self._repairs = self.repairs


def install_store(url: str) -> type[StoreSessionDB]:
    """Make :class:`StoreSessionDB` on ``url`` Hermes' ``SessionDB``, from now on.

    Replaces ``hermes_state.SessionDB``, and the name ``SessionDB`` in any module
    that took Hermes' class from it already. What Hermes opened before (an
    instance of its own class) stays on ``state.db``. Installing again (Hermes
    loads its plugins again) only changes the URL.
    """
    import hermes_state

    current = hermes_state.SessionDB
    if not (isinstance(current, type) and issubclass(current, StoreSessionDB)):
        StoreSessionDB.hermes_class = current
    StoreSessionDB.url = url
    hermes_class = StoreSessionDB.hermes_class
    for module in list(sys.modules.values()):
        names = getattr(module, "__dict__", None)
        if isinstance(names, dict) and names.get("SessionDB") is hermes_class:
            names["SessionDB"] = StoreSessionDB
    return StoreSessionDB


def _hermes_state_db_placed() -> None:
    """Hermes' own ``state.db`` of this profile, made empty where there is none.

    Parts of Hermes look for the file before they open a ``SessionDB`` on it
    (the dashboard's session lists and its count of active sessions skip a
    profile without one); opened, it is the store (:class:`StoreSessionDB`). It
    is made by Hermes' own class, so it is a state.db as Hermes makes them, and
    stays empty.
    """
    path = hermes_home() / "state.db"
    hermes_class = StoreSessionDB.hermes_class
    if hermes_class is None or path.exists():
        return
    try:
        hermes_class(db_path=path).close()
    except Exception as exc:  # only the dashboard's lists need it: store mode goes on
        logger.warning("hermes_orm store: cannot make an empty %s: %s", path, exc)


def _in_background_review() -> bool:
    """Whether this hook runs in Hermes' background review fork, not the user's turn."""
    if threading.current_thread().name == "bg-review":
        return True
    try:
        from tools.skill_provenance import is_background_review

        return bool(is_background_review())
    except Exception:  # an older or newer Hermes without it: the thread name decides
        return False


def make_hooks(mirror: Mirror) -> dict[str, Callable[..., None]]:
    """The Hermes hook callbacks over ``mirror``; none of them ever raises."""

    def post_llm_call(
        session_id: Any = None,
        conversation_history: Any = None,
        model: Any = None,
        platform: Any = None,
        **_: Any,
    ) -> None:
        try:
            if _in_background_review():
                return
            if not isinstance(session_id, str) or not isinstance(conversation_history, list):
                return
            if not mirror.turn(
                session_id,
                conversation_history,
                model if isinstance(model, str) else None,
                platform if isinstance(platform, str) and platform else None,
            ):
                logger.info(
                    "hermes_orm mirror: session %r is still being written; the agent goes on",
                    session_id,
                )
        except Exception:
            logger.exception("hermes_orm mirror: post_llm_call failed")

    def on_session_finalize(
        session_id: Any = None, platform: Any = None, reason: Any = None, **_: Any
    ) -> None:
        try:
            if isinstance(session_id, str) and not _in_background_review():
                mirror.finalize(session_id, reason if isinstance(reason, str) else "finalized")
        except Exception:
            logger.exception("hermes_orm mirror: on_session_finalize failed")

    hooks: dict[str, Callable[..., None]] = {
        "post_llm_call": post_llm_call,
        "on_session_finalize": on_session_finalize,
    }
    if isinstance(mirror, StoreFlush):
        store_flush = mirror

        def pre_llm_call(session_id: Any = None, **_: Any) -> None:
            # (What it returns would be context for the model: None.)
            try:
                if isinstance(session_id, str) and not _in_background_review():
                    store_flush.before_turn(session_id)
            except Exception:
                logger.exception("hermes_orm store: pre_llm_call failed")

        hooks["pre_llm_call"] = pre_llm_call
    return hooks


class _CloseAtExit:
    """``close`` run at exit, late and, once the agent has run, early too.

    Exit handlers run the last registered first. Registered as the plugin
    loads, close runs after those registered later: Hermes' CLI cleanup, which
    ends the session through the hooks (its end is then written). But an agent
    made after the plugin loaded (an application's own ``AIAgent``; Hermes' CLI
    sets up logging first) sets up Hermes' logging then, with an exit handler
    that stops the thread writing its log files: a warning close gives after it
    (writes still queued at exit) would never reach ``agent.log``. So the first
    hook call registers close once more, to run before those (``final=False``:
    it tells of what is not written yet; the late run, which writes what came
    since, such as the CLI's session end, gives up what is still not). A first
    hook call from an exit handler changes nothing: the late one is still to
    come.
    """

    def __init__(self, close: Callable[..., object]) -> None:
        self._close = close
        self._lock = threading.Lock()
        self._early = False
        atexit.register(close)

    def hook(self, callback: Callable[..., Any]) -> Callable[..., Any]:
        """``callback``, registering the early close the first time one of them is called."""

        @functools.wraps(callback)
        def called(*args: Any, **kwargs: Any) -> Any:
            if not self._early:
                with self._lock:
                    if not self._early:
                        atexit.register(self._close, final=False)
                    self._early = True
            return callback(*args, **kwargs)

        return called


def register(ctx: Any) -> None:
    """Hermes' plugin entry: the ``hermes orm`` command, the mirror's hooks, store mode.

    In store mode (``hermes_orm.mode: store``) Hermes' ``SessionDB`` becomes
    :class:`StoreSessionDB` (:func:`install_store`) and the hooks run
    :class:`~hermes_orm.integrations.hermes.mirror.StoreFlush`, which waits for
    its flush (``wait``, 10 s by default). A configuration that cannot work (a
    bad URL or mode, a missing driver) leaves the hooks out, and Hermes on its
    own ``state.db``, and says why in ``hermes orm status`` and Hermes' log.
    """
    ctx.register_cli_command(
        name="orm",
        help="hermes_orm: the mirror's status, its sessions, search, migrations",
        setup_fn=setup_cli,
        handler_fn=run_cli,
        description="The hermes_orm database this Hermes mirrors its sessions into.",
    )
    status = status_file()
    try:
        config = hermes_config()
        url, _ = resolve_url(config)
        mode = resolve_mode(config)
        wait = _wait(config, STORE_WAIT if mode == "store" else DEFAULT_WAIT)
        _check_url(url)
        if mode == "store":
            install_store(url)
    except Exception as exc:
        message = redact(f"{type(exc).__name__}: {exc}")
        logger.warning("hermes_orm: the mirror is off: %s", message)
        status.write(register_error={"at": time.time(), "message": message})
        return
    if status.read().get("register_error"):
        status.write(register_error=None)
    mirror: Mirror
    if mode == "store":
        _hermes_state_db_placed()
        mirror = StoreFlush(url, status=status, wait=wait)
        StoreSessionDB.repairs = mirror
    else:
        sessions, conversations = hermes_state()
        mirror = Mirror(
            url,
            status=status,
            hermes_sessions=sessions,
            wait=wait,
            hermes_conversation=conversations,
        )
    at_exit = _CloseAtExit(mirror.close)
    for name, callback in make_hooks(mirror).items():
        ctx.register_hook(name, at_exit.hook(callback))


# -- hermes orm ...  ------------------------------------------------------------------------


def setup_cli(parser: argparse.ArgumentParser) -> None:
    """Hermes' ``hermes orm`` sub-parser: the commands of ``hermes-orm``."""
    cli.redact_errors(parser)  # (Hermes' own class: it would show a password as given)
    parser.add_argument("--url", default=None, help="database URL (default: the mirror's)")
    commands = parser.add_subparsers(
        dest="orm_command", required=True, parser_class=cli.RedactingParser
    )
    cli.add_commands(commands, demo=False)


def run_cli(args: argparse.Namespace) -> None:
    """Run ``hermes orm ...`` and exit with its status (Hermes ignores a return value)."""
    if args.url is None:
        try:
            args.url, args.url_origin = resolve_url(hermes_config())
        except ValueError as exc:
            print(f"hermes orm: {exc}", file=sys.stderr)
            sys.exit(2)
    args.upgrade_command = "`hermes orm db upgrade`"  # the plugin's database, found as above
    args.program = "hermes orm"
    cli.writable_streams()
    sys.exit(cli.run_to_the_end(args))


def _when(at: Any) -> str:
    if isinstance(at, int | float):
        return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")
    return "?"


def print_status(
    url: str,
    origin: str | None = None,
    upgrade: str | None = None,
    recorded: Mapping[str, Any] | None = None,
) -> int:
    """Print the database, its schema and the mirror's recorded errors; 0 when all is well.

    ``upgrade``: the command a schema behind the head is upgraded with (None:
    the one :class:`SchemaOutOfDateError` names). ``recorded``: the status
    file's record as read (by default, read here).
    """
    problems = 0
    print(f"database:  {safe_url(url)}" + (f"  (from {origin})" if origin else ""))
    try:
        _check_url(url)
        missing = missing_sqlite_file(url)
        memory = sqlite_in_memory(url)
        engine = None if missing is not None or memory else create_store_engine(url)
    except Exception as exc:
        print(redact(f"database:  cannot be used: {type(exc).__name__}: {exc}"))
        problems += 1
    else:
        if memory:  # each process has its own, gone when it ends
            print("schema:    not seen: a SQLite database in memory is the process's own")
        elif missing is not None and (why := _uncreatable(missing)) is not None:
            print(f"schema:    none, and no file can be made there: {why}")
            problems += 1
        elif engine is None:  # looked at, not created: the mirror makes it on the first turn
            print("schema:    none yet (no file yet; the mirror creates it on the first turn)")
        else:
            problems += _print_schema(engine, upgrade)
    if recorded is None:
        recorded = status_file().read()
    register_error = recorded.get("register_error")
    if isinstance(register_error, dict):
        since = _when(register_error.get("at"))
        print(f"plugin:    off since {since}: {cli.inert(str(register_error.get('message')))}")
        problems += 1
    error = recorded.get("error")
    if isinstance(error, dict) and _of(error, url):
        # (The session id and the error are stored text: shown inert, escapes pictured.)
        print(
            cli.inert(
                f"last error: {_when(error.get('at'))}, session {error.get('session_id')}: "
                f"{error.get('message')}; {error.get('todo')}"
            )
        )
        problems += 1
    else:
        print("last error: none")
    given_up = _given_up_of(recorded, url)
    for entry in given_up:
        after = f" (after {entry['message']})" if entry.get("message") else ""
        print(
            cli.inert(
                f"given up:  {_when(entry.get('at'))}, session {entry.get('session_id')}: "
                f"{entry.get('what')}{after}"
            )
        )
    if given_up:
        print(f"{len(given_up)} write(s) given up: `status --clear` forgets them once read")
        problems += 1
    return 1 if problems else 0


def clear_status(url: str, shown: Mapping[str, Any]) -> None:
    """Forget the error and the given-up writes of the database at ``url`` that were shown.

    ``shown``: the record :func:`print_status` showed. What a running Hermes
    recorded since stays, to be shown next time.
    """
    seen = _given_up_of(shown, url)

    def change(recorded: dict[str, Any]) -> None:
        error = recorded.get("error")
        if isinstance(error, dict) and error == shown.get("error") and _of(error, url):
            del recorded["error"]
        entries = recorded.pop("given_up", None)
        kept = [e for e in entries or [] if e not in seen]
        if kept:
            recorded["given_up"] = kept

    status_file().update(change)


def _given_up_of(recorded: Mapping[str, Any], url: str) -> list[dict[str, Any]]:
    """The given-up writes ``recorded`` holds of the database at ``url``."""
    entries = recorded.get("given_up") or []
    return [entry for entry in entries if isinstance(entry, dict) and _of(entry, url)]


def _of(record: Mapping[str, Any], url: str) -> bool:
    """Whether the status ``record`` is of the database at ``url`` (None: an older one's, any)."""
    return record.get("url") in (None, safe_url(url))


def _uncreatable(path: Path) -> str | None:
    """Why the mirror could not create the SQLite file ``path``, or None when it may.

    Its nearest existing directory is where the mirror makes the rest (the
    directories it lacks, then the file): one that is a file, or not writable
    by this user, ends every turn's write in an error.
    """
    found = path.parent
    while not found.exists() and found != found.parent:
        found = found.parent
    if not found.is_dir():
        return f"{str(found)!r} is not a directory"
    if not os.access(found, os.W_OK | os.X_OK):
        return f"{str(found)!r} is not writable by this user"
    return None


def _print_schema(engine: Engine, upgrade: str | None) -> int:
    """Print the schema state and what is stored; 1 when something is wrong."""
    try:
        with _retry.connecting(CONNECT_SECONDS):
            revision = migrations.current(engine)
            try:
                migrations.check(engine)  # (with no revision: refuses tables named as ours)
            except SchemaOutOfDateError:
                if revision is not None:
                    raise
                print("schema:    none yet (the mirror creates it on the first turn)")
                return 0
            with engine.connect() as conn:
                sessions = conn.execute(select(func.count()).select_from(Session)).scalar_one()
                messages = conn.execute(select(func.count()).select_from(Message)).scalar_one()
    except (SchemaOutOfDateError, SchemaTooNewError, DatabaseError) as exc:
        if isinstance(exc, SchemaOutOfDateError) and not exc.branch and upgrade is not None:
            exc = SchemaOutOfDateError(exc.current, exc.expected, fix=upgrade)
        print(f"schema:    {exc}")
        return 1
    except Exception as exc:
        detail = getattr(exc, "orig", None) or exc
        # A server that answered (a lock it waited on too long, a permission)
        # is reachable: its refusal is shown as what it is.
        said = "unreachable" if isinstance(exc, DBAPIError) and is_unreachable(exc) else "error"
        print(redact(f"database:  {said}: {str(detail).strip()}"))
        return 1
    finally:
        engine.dispose()
    print(f"schema:    at head ({revision})")
    print(f"stored:    {sessions} sessions, {messages} messages")
    return 0
