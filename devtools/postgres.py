"""A throwaway PostgreSQL server for the test session (and the benchmarks).

``HERMES_ORM_TEST_PG_URL`` points at an existing server instead. Otherwise the
system's ``initdb``/``pg_ctl`` start one in a temporary directory, listening on
loopback only, with fsync off (the data is thrown away). As root, PostgreSQL
refuses to run, so the commands run as the ``postgres`` user.

:func:`postgres_server` yields a URL (the external server's, if one is named);
:func:`local_postgres` always starts a server of its own and yields a
:class:`PostgresServer`, which can also be restarted (the reliability suite
restarts it under its writers).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL could be started; the message says what to install or set."""


#: Settings of a throwaway server: nothing it holds outlives it, so nothing is synced.
#: ``synchronous_commit=off`` lets a crash of the server (not of a client) lose
#: commits it acknowledged: pass ``{"synchronous_commit": "on"}`` where that matters.
DEFAULT_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


def _bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent  # the other programs sit beside the real one
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (pg_ctl) found: install them "
        "(apt-get install postgresql) or set HERMES_ORM_TEST_PG_URL"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _runner() -> list[str]:
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root and runuser is missing")
    return [runuser, "-u", "postgres", "--"]


class PostgresServer:
    """A server of our own in a temporary directory, started by :func:`local_postgres`.

    Attributes:
        url: ``postgresql+psycopg://`` URL of its ``postgres`` database.
        port: The loopback port it listens on.
    """

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = port
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        self._bindir = _bindir()
        self._prefix = _runner()

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self._prefix, *args], capture_output=True, text=True, cwd=self.root, check=False
        )
        if result.returncode != 0:
            server_log = self.log.read_text() if self.log.exists() else ""
            raise PostgresUnavailable(
                f"{args[0]} failed ({result.returncode}): {result.stderr}{server_log}"
            )

    def _pg_ctl(self, *args: str) -> None:
        # -l: the server's output goes to the log, never to a pipe pg_ctl's caller reads.
        self._run(str(self._bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args)

    def start(self, settings: Mapping[str, str]) -> None:
        """Create the cluster and start the server with ``settings`` (``-c name=value``)."""
        sockets = self._sockets()
        self._run(
            str(self._bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        self._start(sockets, settings)

    def restart(self, mode: str = "fast") -> float:
        """Stop the server (``smart``, ``fast`` or ``immediate``) and start it again.

        ``immediate`` stops it as a crash would: the next start recovers from
        the WAL. The server keeps its port and settings.

        Returns:
            Seconds until it accepted connections again.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"mode must be smart, fast or immediate, got {mode!r}")
        start = time.perf_counter()
        self._pg_ctl("-m", mode, "-w", "-t", "60", "restart")
        return time.perf_counter() - start

    def start_standby(
        self, primary: PostgresServer, settings: Mapping[str, str], name: str
    ) -> None:
        """Clone ``primary`` (pg_basebackup) and start as its hot standby, streaming as ``name``.

        The primary's default ``pg_hba.conf`` (initdb's) lets loopback replicate.
        """
        sockets = self._sockets()
        self._run(
            str(self._bindir / "pg_basebackup"),
            "-D",
            str(self.data),
            "-d",
            f"host=127.0.0.1 port={primary.port} user=postgres application_name={name}",
            "-R",
            "-X",
            "stream",
            "--checkpoint=fast",  # not wait for the next scheduled checkpoint
            "--no-sync",
        )
        self._start(sockets, settings)

    def _sockets(self) -> Path:
        sockets = self.root / "sock"
        sockets.mkdir()
        if self._prefix:
            shutil.chown(self.root, "postgres")
            shutil.chown(sockets, "postgres")
        return sockets

    def _start(self, sockets: Path, settings: Mapping[str, str]) -> None:
        options = " ".join(
            [
                f"-p {self.port} -k {sockets} -c listen_addresses=127.0.0.1",
                *(f"-c {name}={value}" for name, value in settings.items()),
            ]
        )
        self._pg_ctl("-o", options, "-w", "-t", "60", "start")

    def promote(self) -> None:
        """Promote this standby to a primary (waits until it takes writes)."""
        self._pg_ctl("-w", "-t", "60", "promote")

    def postmaster_pid(self) -> int:
        """The server's main process id."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def processes(self) -> list[int]:
        """The server's main process and all its children."""
        main = self.postmaster_pid()
        children = subprocess.run(
            ["pgrep", "-P", str(main)], capture_output=True, text=True, check=False
        ).stdout.split()
        return [main, *map(int, children)]

    def stop(self) -> None:
        """Stop the server at once (its data is thrown away)."""
        pg_ctl = str(self._bindir / "pg_ctl")
        subprocess.run(
            [*self._prefix, pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            cwd=self.root,
            check=False,
        )


@contextmanager
def local_postgres(settings: Mapping[str, str] | None = None) -> Iterator[PostgresServer]:
    """Start a server of our own (whatever ``HERMES_ORM_TEST_PG_URL`` says); delete it afterwards.

    Args:
        settings: Server settings over :data:`DEFAULT_SETTINGS`.
    """
    root = Path(tempfile.mkdtemp(prefix="hermes-orm-pg-"))
    try:
        server = PostgresServer(root, _free_port())
        try:
            server.start({**DEFAULT_SETTINGS, **(settings or {})})
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def local_standby(
    primary: PostgresServer, name: str = "standby1", settings: Mapping[str, str] | None = None
) -> Iterator[PostgresServer]:
    """Start a hot standby of ``primary``, streaming as ``name``; delete it afterwards."""
    root = Path(tempfile.mkdtemp(prefix="hermes-orm-pg-"))
    try:
        server = PostgresServer(root, _free_port())
        try:
            server.start_standby(primary, {**DEFAULT_SETTINGS, **(settings or {})}, name)
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_server(settings: Mapping[str, str] | None = None) -> Iterator[str]:
    """Yield the URL of a running PostgreSQL server; stop and delete it afterwards.

    Args:
        settings: Server settings over :data:`DEFAULT_SETTINGS`, for a server
            started here; the server ``HERMES_ORM_TEST_PG_URL`` names keeps its own.
    """
    external = os.environ.get("HERMES_ORM_TEST_PG_URL")
    if external:
        yield external
        return
    with local_postgres(settings) as server:
        yield server.url
