"""Failover under a writer: a primary with a synchronous standby, crashed or hung, promoted.

Real servers on loopback: a primary, and a hot standby cloned from it with
pg_basebackup that the primary waits for on every commit
(``synchronous_standby_names``). Writers flush 20 sessions, three messages a
turn, through libpq's comma multi-host URL with
``target_session_attrs=read-write``; mid-run the primary is killed (SIGKILL,
every process: a crash) or stopped (SIGSTOP: hung, its connections open), and
the standby is promoted a moment later. Afterwards every session must hold
exactly the messages its writer's list holds, and no error may have reached
a writer whose failover fit in its budget.

Marked ``heavy`` (CI runs them in its heavy step); each takes a few seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from devtools.auto_failover import formation
from devtools.postgres import PostgresServer, local_postgres, local_standby
from hermes_orm import DatabaseUnavailableError, RetryPolicy, SessionStore

pytestmark = [
    pytest.mark.postgresql,
    pytest.mark.heavy,
    pytest.mark.direct("starts, kills and promotes servers of its own"),
]

SESSIONS = 20

#: The primary's commits wait for the standby (and the throwaway servers still
#: skip fsync: a crash here is of the processes, not of the machine).
SYNCHRONOUS = {"synchronous_commit": "on"}


@dataclass
class Pair:
    primary: PostgresServer
    standby: PostgresServer

    def url(self, *hosts: PostgresServer, **query: str) -> str:
        where = ",".join(f"127.0.0.1:{server.port}" for server in hosts)
        params = "&".join(
            f"{k}={v}" for k, v in {"target_session_attrs": "read-write", **query}.items()
        )
        return f"postgresql+psycopg://postgres@{where}/postgres?{params}"


@contextlib.contextmanager
def _pair(synchronous: bool) -> Iterator[Pair]:
    with local_postgres(SYNCHRONOUS) as primary:
        SessionStore(primary.url).upgrade()
        with local_standby(primary, "standby1", SYNCHRONOUS) as standby:
            admin = create_engine(primary.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                if synchronous:
                    conn.exec_driver_sql("ALTER SYSTEM SET synchronous_standby_names = 'standby1'")
                    conn.exec_driver_sql("SELECT pg_reload_conf()")
                wanted = "sync" if synchronous else "async"
                deadline = time.monotonic() + 30
                while (
                    conn.execute(text("SELECT sync_state FROM pg_stat_replication")).scalar()
                    != wanted
                ):
                    assert time.monotonic() < deadline, f"the standby never streamed {wanted}"
                    time.sleep(0.05)
            admin.dispose()
            try:
                yield Pair(primary, standby)
            finally:
                for pid in _processes(primary):  # a stopped server cannot stop
                    _signal(pid, signal.SIGCONT)


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A primary whose every commit waits for its standby ``standby1``."""
    with _pair(synchronous=True) as found:
        yield found


@pytest.fixture
def async_pair() -> Iterator[Pair]:
    """A primary streaming to its standby without waiting for it."""
    with _pair(synchronous=False) as found:
        yield found


def _processes(server: PostgresServer) -> list[int]:
    try:
        return server.processes()
    except (FileNotFoundError, ValueError):  # it is gone
        return []


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@dataclass
class Writers:
    """Threads that flush their sessions turn after turn until told to stop."""

    store: SessionStore
    lists: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    acknowledged: dict[str, int] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    longest: float = 0.0  # the longest flush, in seconds
    turns: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, threads: int = 4) -> list[threading.Thread]:
        for n in range(SESSIONS):
            self.store.create_session(f"s{n}", source="cli")
            self.lists[f"s{n}"] = []
        workers = [
            threading.Thread(target=self._write, args=(list(self.lists)[t::threads],))
            for t in range(threads)
        ]
        for worker in workers:
            worker.start()
        return workers

    def _write(self, sessions: list[str]) -> None:
        turn = 0
        while not self.stop.is_set():
            for sid in sessions:
                messages = self.lists[sid]
                messages += [
                    {"role": "user", "content": f"{sid} turn {turn}: where is the lighthouse"},
                    {"role": "assistant", "content": f"past the harbour ({turn})"},
                    {"role": "tool", "content": "ok", "tool_call_id": f"call_{turn}"},
                ]
                started = time.monotonic()
                try:
                    self.acknowledged[sid] = self.store.flush(sid, messages).cursor
                except Exception as exc:  # counted: none may reach a writer
                    self.errors.append(exc)
                    return
                self.longest = max(self.longest, time.monotonic() - started)
                self.turns += 1
            turn += 1

    def wait_turns(self, more: int, timeout: float = 60.0) -> None:
        target, deadline = self.turns + more, time.monotonic() + timeout
        while self.turns < target:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"only {self.turns} of {target} turns"
            time.sleep(0.01)

    def finish(self, workers: list[threading.Thread]) -> None:
        self.stop.set()
        for worker in workers:
            worker.join(120)

    def assert_exact(self, url: str) -> None:
        """Every session holds its writer's list: acknowledged or not, none lost, none twice."""
        store = SessionStore(url)
        try:
            for sid, messages in self.lists.items():
                stored = store.get_messages(sid)
                assert len(stored) >= self.acknowledged.get(sid, 0), (
                    sid
                )  # nothing acknowledged lost
                assert stored == messages[: len(stored)], sid  # in order, none twice
                # The last turn may have been cut short by the stop: flushing it settles it.
                assert store.flush(sid, messages).cursor == len(messages)
                assert store.get_messages(sid) == messages
        finally:
            store.close()


@pytest.mark.parametrize("promote_after", [0.5, 3.0])
def test_a_crashed_primary_promoted_within_the_budget_drops_no_turn(
    pair: Pair, promote_after: float
) -> None:
    url = pair.url(pair.primary, pair.standby)
    writers = Writers(SessionStore(url))
    workers = writers.run()
    try:
        writers.wait_turns(200)
        for pid in pair.primary.processes():  # a crash: no process left to shut down cleanly
            _signal(pid, signal.SIGKILL)
        time.sleep(promote_after)
        pair.standby.promote()
        writers.wait_turns(200)
    finally:
        writers.finish(workers)
    assert writers.errors == []
    assert writers.longest >= promote_after  # the writers did wait for the promotion
    writers.assert_exact(url)
    writers.store.close()


def test_a_hung_primary_is_left_for_the_promoted_standby(pair: Pair) -> None:
    """Its connections stay open and silent: each try's deadline moves the writers on."""
    url = pair.url(pair.primary, pair.standby, connect_timeout="2")
    policy = RetryPolicy(attempt_timeout=3.0)
    writers = Writers(SessionStore(url, retry=policy))
    workers = writers.run()
    try:
        writers.wait_turns(200)
        for pid in pair.primary.processes():
            _signal(pid, signal.SIGSTOP)
        pair.standby.promote()
        writers.wait_turns(200)
    finally:
        writers.finish(workers)
    assert writers.errors == []
    # A stalled flush: its try's deadline, then a connection past the hung host.
    assert 3.0 <= writers.longest < 3.0 + 2 * 2 + 5
    writers.assert_exact(pair.url(pair.standby))
    writers.store.close()


def test_a_hung_primary_alone_raises_a_typed_error_within_the_deadline(pair: Pair) -> None:
    url = pair.url(pair.primary, connect_timeout="2")
    store = SessionStore(url, retry=RetryPolicy(attempt_timeout=2.0, unavailable_for=3.0))
    store.create_session("s", source="cli")
    store.flush("s", [{"role": "user", "content": "one"}])
    for pid in pair.primary.processes():
        _signal(pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError) as err:
        store.flush("s", [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}])
    took = time.monotonic() - started
    # unavailable_for, plus the try under way then (a connection's 2 s, or a try's 2 s).
    assert 3.0 <= took < 3.0 + 2.0 + 2.0
    assert "unreachable" in str(err.value)


def test_pg_auto_failover_crash_failover_drops_no_turn() -> None:
    """A whole node (keeper and server) dies; the monitor promotes the secondary."""
    with formation() as nodes:
        SessionStore(nodes.url).upgrade()
        writers = Writers(SessionStore(nodes.url))  # the default policy: 90 s unreachable
        workers = writers.run()
        try:
            writers.wait_turns(200)
            crashed = nodes.primary()
            crashed.crash()
            started = time.monotonic()
            writers.wait_turns(200, timeout=RetryPolicy().unavailable_for)
            promoted_in = time.monotonic() - started
        finally:
            writers.finish(workers)
        assert writers.errors == []
        assert nodes.primary() is not crashed
        print(f"pg_auto_failover: writes went on {promoted_in:.1f} s after the crash")
        writers.assert_exact(nodes.url)
        writers.store.close()


def test_an_append_whose_answer_was_lost_in_a_failover_is_judged_by_what_it_wrote(
    async_pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The append commits on the primary, which dies before its answer and its WAL leave.

    The promoted standby never saw that transaction's id and gives it to others:
    asked about the id, it would say "committed" of someone else's transaction.
    The store sees the new timeline and looks for the message itself instead.
    """
    primary, standby = async_pair.primary, async_pair.standby
    store = SessionStore(async_pair.url(primary, standby))
    store.create_session("s", source="cli")
    store.flush("s", [{"role": "user", "content": "before"}])
    admin = create_engine(primary.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # the standby has all of it, then hears no more
        lsn = conn.execute(text("SELECT pg_current_wal_insert_lsn()")).scalar_one()
        while (
            conn.execute(
                text("SELECT replay_lsn >= CAST(:lsn AS pg_lsn) FROM pg_stat_replication"),
                {"lsn": lsn},
            ).scalar()
            is not True
        ):
            time.sleep(0.02)
        (sender,) = conn.execute(text("SELECT pid FROM pg_stat_replication")).scalars()
    admin.dispose()
    _signal(sender, signal.SIGSTOP)
    dialect = store.engine.dialect
    real_commit = dialect.do_commit
    crashed: list[int] = []

    def commit_then_fail_over(dbapi_connection: Any) -> None:
        real_commit(dbapi_connection)
        if crashed:
            return
        crashed.append(1)
        for pid in primary.processes():
            _signal(pid, signal.SIGKILL)
        standby.promote()
        burner = create_engine(standby.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with burner.connect() as conn:  # the ids the lost transactions had, given again
            for _ in range(20):
                conn.execute(text("SELECT txid_current()"))
        burner.dispose()
        raise dialect.loaded_dbapi.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(dialect, "do_commit", commit_then_fail_over)
    assert store.append("s", {"role": "user", "content": "after"}) == 1
    monkeypatch.undo()
    assert crashed == [1]
    assert [m["content"] for m in store.get_messages("s")] == ["before", "after"]
    store.close()
