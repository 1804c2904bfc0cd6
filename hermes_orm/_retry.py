"""Retrying a store's transactions: a busy database by count, an unreachable one by time.

A write is one atomic transaction and the cursor makes it idempotent, so it
may run again after any transient error. Two kinds differ in how long trying
again is worth it:

- **busy**: a lock held by another writer (SQLite's busy database, PostgreSQL's
  lock timeout, a serialization failure or deadlock). It clears as soon as the
  other writer commits, or it points at a stuck transaction; a few tries tell.
- **unavailable**: the server cannot be reached, dropped the connection, is
  starting up, or turned read-only (a primary demoted, a standby not yet
  promoted). An automated failover takes seconds to tens of seconds, so these
  are retried for a span of time of their own.

Each try also has a deadline. A server that stops answering without closing
its connections (its processes hung, or a network path that drops everything)
leaves the driver waiting on its socket for ever: the server's kernel still
acknowledges TCP keepalives and data. Past the deadline a watcher thread
shuts the connection's socket down: the driver's wait ends as a lost
connection, and the next try connects afresh (to the next host of a
multi-host URL).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import random
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from hermes_orm import _dialects
from hermes_orm.errors import (
    DatabaseBusyError,
    DatabaseError,
    DatabaseUnavailableError,
    InvalidArgumentError,
)

T = TypeVar("T")

#: Where hermes_orm says what it retries (INFO): lost connections, busy databases.
logger = logging.getLogger("hermes_orm")

#: Default seconds an unreachable database is retried: an automated failover
#: (a standby promoted by pg_auto_failover or Patroni) usually completes within it.
UNAVAILABLE_FOR = 90.0
#: The least wait, in seconds, before reconnecting to an unreachable database.
_UNREACHABLE_FLOOR = 0.05
#: Default seconds one try may take before its connection is abandoned.
ATTEMPT_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded, jittered retry of transient database errors.

    Attributes:
        attempts: Tries in all, the first included, while the database is
            busy (a lock held by another writer).
        base_delay: Seconds before the second try; doubles each time.
        max_delay: Ceiling of one wait, in seconds.
        unavailable_for: Seconds the store keeps trying while the database is
            unreachable (connections refused or lost, a server starting up or
            read-only during a failover), counted from the start of the first
            try that found it so. Then :class:`~hermes_orm.DatabaseUnavailableError`.
        attempt_timeout: Seconds one try may take on PostgreSQL before the
            store abandons its connection as hung and tries again (None: no
            deadline). It bounds a try's lock wait and work together, so keep
            it above ``lock_timeout``. A bulk flush's deadline starts again
            after each batch of messages it wrote; rebuilding the search
            index has none. A new connection's first statements, which
            SQLAlchemy runs in the checkout, are given as long again before
            the try begins (behind PgBouncer, which answers a login itself,
            they are what waits for a server down, or for a pooler full).
    """

    attempts: int = 8
    base_delay: float = 0.02
    max_delay: float = 1.0
    unavailable_for: float = UNAVAILABLE_FOR
    attempt_timeout: float | None = ATTEMPT_TIMEOUT

    def __post_init__(self) -> None:
        def number(name: str, value: Any, kind: type | tuple[type, ...] = (int, float)) -> None:
            if isinstance(value, bool) or not isinstance(value, kind):
                raise InvalidArgumentError(
                    f"RetryPolicy.{name} must be a number, got {type(value).__name__}"
                )

        number("attempts", self.attempts, int)
        for name in ("base_delay", "max_delay", "unavailable_for"):
            number(name, getattr(self, name))
        if self.attempt_timeout is not None:
            number("attempt_timeout", self.attempt_timeout)
        if self.attempts < 1:
            raise InvalidArgumentError("RetryPolicy.attempts must be at least 1")
        if not self.base_delay >= 0 or not self.max_delay >= 0 or not self.unavailable_for >= 0:
            raise InvalidArgumentError("RetryPolicy delays must not be negative")
        if self.attempt_timeout is not None and not self.attempt_timeout > 0:
            raise InvalidArgumentError(
                "RetryPolicy.attempt_timeout must be above 0 seconds, or None"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (0-based): full jitter."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** min(attempt, 32)))


class Retries:
    """The tries of one operation: busy ones counted, unreachable ones timed."""

    __slots__ = ("busy", "down_since", "policy", "started", "tries")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.tries = 0  # failed so far
        self.busy = 0
        self.started = 0.0  # when the try under way began
        self.down_since: float | None = None  # when the first unreachable try began

    def begin(self) -> None:
        """A try begins."""
        self.started = time.monotonic()

    def after(self, exc: DBAPIError) -> float | None:
        """Seconds to wait before trying again after ``exc``; None when the policy is spent.

        Raises:
            DatabaseError: ``exc`` is not transient: trying again cannot help.
        """
        if not _dialects.is_transient(exc):
            raise DatabaseError(
                f"database error: {_dialects.said(exc)}{_dialects.pooler_hint(exc)}"
            ) from exc
        self.tries += 1
        policy = self.policy
        if _dialects.is_unreachable(exc):
            if self.down_since is None:
                self.down_since = self.started
            left = self.down_since + policy.unavailable_for - time.monotonic()
            if left <= 0:
                return None
            # Never at once: a zero delay would flood a recovering server with connections.
            return min(max(policy.delay(self.tries - 1 - self.busy), _UNREACHABLE_FLOOR), left)
        self.busy += 1
        if self.busy >= policy.attempts:
            return None
        return policy.delay(self.busy - 1)

    def _unreachable_for(self) -> float:
        """Seconds since the first try that found the database out of reach began."""
        since = self.down_since if self.down_since is not None else self.started
        return time.monotonic() - since

    def log(self, exc: DBAPIError, delay: float) -> None:
        """Say (at INFO, on the ``hermes_orm`` logger) that a try failed, why, and what next."""
        if not logger.isEnabledFor(logging.INFO):
            return
        text = _dialects.said(exc)
        why = f"{type(exc.orig).__name__}: {text.splitlines()[0] if text else ''}"
        if _dialects.is_unreachable(exc):
            logger.info(
                "transient database error, unreachable (%s)%s; try %d in %.3f s "
                "(unreachable for %.1f s of at most %g s)",
                why,
                abandoned_note(exc),
                self.tries + 1,
                delay,
                self._unreachable_for(),
                self.policy.unavailable_for,
            )
        else:
            logger.info(
                "transient database error (%s); try %d of %d in %.3f s",
                why,
                self.busy + 1,
                self.policy.attempts,
                delay,
            )

    def give_up(
        self,
        engine: Engine,
        exc: DBAPIError,
        holders: Sequence[Any] | None = None,
        schema: str | None = None,
    ) -> DatabaseUnavailableError | DatabaseBusyError:
        """What to raise when ``exc`` outlasted the policy: unreachable, or busy.

        ``holders`` as for :func:`hermes_orm._dialects.describe_busy`.
        """
        if _dialects.is_unreachable(exc):
            detail = _dialects.said(exc) + abandoned_note(exc)
            return DatabaseUnavailableError(
                detail + _dialects.read_only_hint(exc),
                attempts=self.tries,
                seconds=self._unreachable_for(),
            )
        return DatabaseBusyError(
            _dialects.describe_busy(engine, exc, holders, schema), attempts=self.tries
        )


def run_with_retry(
    engine: Engine,
    policy: RetryPolicy,
    work: Callable[[], T],
    schema: str | None = None,
    *,
    name_holders: bool = True,
) -> T:
    """Run ``work`` (one whole transaction) again on transient errors, within ``policy``.

    ``schema``: where the store's tables are, to name who held a lock; with
    ``name_holders`` False nobody is asked who did (a replica's busy read goes
    to the primary: its error is not raised).
    """
    retries = Retries(policy)
    while True:
        retries.begin()
        try:
            return work()
        except DBAPIError as exc:
            delay = retries.after(exc)
            if delay is None:
                holders = None if name_holders else ()
                raise retries.give_up(engine, exc, holders, schema) from exc
            retries.log(exc, delay)
            time.sleep(delay)


# -- deadlines of tries ----------------------------------------------------------------

#: What a DBAPIError carries when its try outlived its deadline (its seconds).
_ABANDONED = "hermes_orm_abandoned_after"


def abandoned_note(exc: DBAPIError) -> str:
    """What to add to the error of a try abandoned at its deadline ("" for another)."""
    seconds = getattr(exc, _ABANDONED, None)
    if seconds is None:
        return ""
    return f" (no answer within attempt_timeout, {seconds:g} s: the connection was abandoned)"


class Watch:
    """One try's deadline, and its connection's socket to shut down if the try outlives it.

    The watch keeps a duplicate of the socket's descriptor: whatever the driver
    does with its own (a driver closes it when it sees the connection lost),
    the duplicate names the same socket until the try ends, never a socket
    that reused the number.
    """

    __slots__ = ("deadline", "fd", "fired", "seconds")

    def __init__(self, seconds: float) -> None:
        #: The duplicate descriptor (a socket object is made of it only to shut it down;
        #: -1 while there is none: not yet, or closed).
        self.fd = -1
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.fired = False

    @classmethod
    def of(cls, fd: int, seconds: float) -> Watch | None:
        """A watch, not armed yet, of the socket ``fd`` (None: ``fd`` is no socket).

        The descriptor is duplicated last: a Ctrl-C as that call returns is the one
        point where it can leak (no finalizer closes it: a ``__del__`` run as a
        watch is freed, after every try, could swallow a Ctrl-C itself).
        """
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                return None
            watch = cls(seconds)
            watch.fd = os.dup(fd)
        except OSError:
            return None
        return watch

    def blame(self, exc: BaseException) -> None:
        """Mark ``exc`` as the end of a try abandoned at its deadline, if it was."""
        if self.fired and isinstance(exc, DBAPIError):
            setattr(exc, _ABANDONED, self.seconds)


class Watchdog:
    """One thread that shuts down the sockets of tries past their deadlines.

    Arming and disarming a watch costs a lock, a set operation and a duplicated
    descriptor (two system calls, in :meth:`Watch.of` and :meth:`disarm`). The thread
    sleeps until the earliest deadline (a new watch with an earlier one wakes it), so
    it does not run at all while tries end in time; it fires under the lock, so a
    socket is never shut after its try disarmed it (the connection may then serve
    someone else). A forked child starts afresh: the parent's watches are not its own.
    """

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        """In a forked child: the parent's watches are not its own (their duplicates closed)."""
        for watch in self._watches:
            with contextlib.suppress(OSError):
                os.close(watch.fd)
            watch.fd = -1
        self._reset()

    def _reset(self) -> None:
        # Arming and disarming take the plain lock, whose ``with`` a Ctrl-C cannot
        # cut in two: a Condition's ``__enter__`` is Python code, and a Ctrl-C
        # landing in it once the lock is taken would leave the lock held, and
        # every later try of the process waiting for it.
        self._mutex = threading.Lock()
        #: Wakes the thread (for a new earliest deadline); its lock is ``_mutex``.
        self._wake = threading.Condition(self._mutex)
        #: The armed watches (a set: arming and disarming are one C call each, which a
        #: Ctrl-C cannot cut in two).
        self._watches: set[Watch] = set()
        #: When the thread wakes next (inf: no watch, until one is armed).
        self._wakes_at = math.inf
        self._pid = 0  # the process whose thread runs

    def arm(self, watch: Watch) -> None:
        """Start watching ``watch`` (a try on its connection), until :meth:`disarm`.

        Its caller disarms it whatever happens from here on: a Ctrl-C may come
        inside this call once the watch is registered.
        """
        with self._mutex:
            self._watches.add(watch)
            if self._pid != os.getpid():
                threading.Thread(target=self._run, name="hermes_orm-deadlines", daemon=True).start()
                self._pid = os.getpid()
            if watch.deadline < self._wakes_at:
                self._wake.notify()

    def disarm(self, watch: Watch) -> None:
        """The try ended (either way): its socket is no longer watched.

        Once only: a second disarm (its caller's cleanup, after a Ctrl-C that
        came as the first closed the duplicate) closes nothing, where it would
        close whatever file or socket took the number since.
        """
        fd = -1
        try:
            with self._mutex:  # (the watcher fires under it: it sees the watch whole, or not)
                fd, watch.fd = watch.fd, -1
                self._watches.discard(watch)
        finally:  # (a Ctrl-C as the watch is let go still closes the descriptor)
            if fd >= 0:
                os.close(fd)  # the duplicate only

    def _run(self) -> None:
        while True:  # the thread must outlive anything unforeseen: every store relies on it
            try:
                self._watch()
            except Exception:
                logger.exception("the deadline watcher failed; it starts again")
                time.sleep(0.2)

    def _watch(self) -> None:
        with self._mutex:
            while True:
                now = time.monotonic()
                for watch in list(self._watches):
                    if watch.deadline <= now:
                        self._watches.remove(watch)
                        watch.fired = True
                        with contextlib.suppress(OSError):  # its peer closed it already
                            sock = socket.socket(fileno=watch.fd)
                            try:
                                sock.shutdown(socket.SHUT_RDWR)
                            finally:
                                sock.detach()  # the try's disarm closes the descriptor
                watches = self._watches
                self._wakes_at = min((w.deadline for w in watches), default=math.inf)
                wait = self._wakes_at - now
                # (a deadline past what a wait can take is woken for early, and looked at again)
                self._wake.wait(None if wait == math.inf else min(wait, threading.TIMEOUT_MAX))


watchdog = Watchdog()


@contextmanager
def watched(conn: Connection, seconds: float | None) -> Iterator[Watch | None]:
    """Run the block on ``conn`` within a deadline of ``seconds`` (PostgreSQL; None: none)."""
    fd = None if seconds is None or conn.dialect.name != "postgresql" else _dialects.socket_of(conn)
    if fd is None or seconds is None:
        yield None
        return
    watch = token = None
    # Made and armed inside the try: a Ctrl-C as the watch is registered still
    # disarms it (left armed, it would shut the kept connection's socket at its
    # deadline, under another call) and closes its duplicate descriptor.
    try:
        watch = Watch.of(fd, seconds)
        if watch is not None:
            watchdog.arm(watch)
            token = _watching.set(watch)
        yield watch
    except BaseException as exc:
        if watch is not None:
            watch.blame(exc)
        raise
    finally:
        # Disarmed first: a Ctrl-C between the two leaves no watch armed but a context
        # variable. One inside the disarm still resets the variable.
        try:
            if watch is not None:
                watchdog.disarm(watch)
        finally:
            if token is not None:
                _watching.reset(token)


class _Connecting:
    """The watches of the connections a context's checkouts make (see :func:`connecting`)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed: list[Watch] = []
        self.fired = False

    def arm(self, fd: int) -> None:
        # An earlier connection of the checkout (a pooled one whose ping was cut
        # off) is done with: its watch ends, and its firing was its own.
        self.settled()
        self.fired = False
        watch = Watch.of(fd, self.seconds)
        if watch is not None:
            self.armed.append(watch)  # (first: what settles the checkout disarms it)
            watchdog.arm(watch)

    def settled(self) -> None:
        for watch in self.armed:  # (a disarm done twice closes nothing twice)
            watchdog.disarm(watch)
            self.fired = self.fired or watch.fired
        self.armed = []


@contextmanager
def connecting(seconds: float | None) -> Iterator[None]:
    """Run the block's checkouts with their new connections' first statements bounded.

    (PostgreSQL; ``seconds`` each, None: no bound.) SQLAlchemy runs statements
    on an engine's first connection inside the checkout (the dialect asks the
    server its version and settings). Behind PgBouncer a login is answered at
    once (once it has met the server) whatever the server's state, so those
    wait in PgBouncer's queue,
    which no ``connect_timeout`` bounds, for as long as PgBouncer lets them
    (``query_wait_timeout``: 120 s, or no end). The pool's ``connect``
    listener (:func:`_dialects.configure_engine`) arms a watch on the new
    socket, as a try's statements are watched, and its ``checkout`` listener
    disarms it: what the block runs on the connection afterwards is not
    bounded by it.
    """
    if seconds is None:
        yield
        return
    watch = _Connecting(seconds)
    token = _dialects.NEW_CONNECTION_WATCH.set(watch)
    try:
        yield
    except BaseException as exc:
        watch.settled()
        if watch.fired and isinstance(exc, DBAPIError):
            setattr(exc, _ABANDONED, seconds)
        raise
    finally:
        try:
            watch.settled()  # (first: no watch outlives the block, whatever follows)
        finally:
            _dialects.NEW_CONNECTION_WATCH.reset(token)


#: The watch of the try running in this context (None: none).
_watching: contextvars.ContextVar[Watch | None] = contextvars.ContextVar(
    "hermes_orm_watch", default=None
)


def progress() -> None:
    """The running try made progress: its deadline starts again from now.

    A bulk flush calls it after each batch it wrote, so a long write that keeps
    moving (a million messages take minutes on PostgreSQL) is never abandoned,
    while one whose server stops answering is, ``attempt_timeout`` after its
    last batch.
    """
    watch = _watching.get()
    if watch is not None:
        watch.deadline = time.monotonic() + watch.seconds
