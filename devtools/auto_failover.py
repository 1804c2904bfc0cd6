"""A throwaway pg_auto_failover formation on loopback: a monitor, a primary and a secondary.

Debian's ``pg-auto-failover-cli`` and ``postgresql-15-auto-failover``
packages provide ``pg_autoctl`` and the monitor's extension; where they are
missing, a run as root installs them with ``apt-get`` (as CI does). Each node
runs under its own ``pg_autoctl`` keeper, in its own process group, so a test
can crash a whole node (keeper and server) at once. Nodes replicate
synchronously (pg_auto_failover's default with one secondary) and trust
loopback connections.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from devtools.postgres import PostgresUnavailable, _bindir, _free_port, _runner

_PACKAGES = ("pg-auto-failover-cli", f"postgresql-{_bindir().parent.name}-auto-failover")


def _binary() -> str:
    """``pg_autoctl``; installed with apt-get, as root, where it is missing."""
    found = shutil.which("pg_autoctl")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        install = ["apt-get", "install", "-y", "-q", *_PACKAGES]
        done = subprocess.run(install, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # an old package list: refresh it once
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
            done = subprocess.run(install, capture_output=True, text=True, check=False)
        found = shutil.which("pg_autoctl")
        if done.returncode == 0 and found:
            return found
        raise PostgresUnavailable(f"apt-get install {' '.join(_PACKAGES)} failed:\n{done.stderr}")
    raise PostgresUnavailable(f"no pg_autoctl found: apt-get install {' '.join(_PACKAGES)}")


@dataclass
class Node:
    """One node of the formation: its data directory, port and keeper process."""

    name: str
    data: Path
    port: int
    keeper: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres?connect_timeout=5"

    def crash(self) -> None:
        """Kill the node's keeper and server at once, as a machine that died would leave them."""
        if self.keeper is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.keeper.pid, signal.SIGKILL)
            self.keeper.wait()
        # A server the group kill missed (the keeper had left its group): its pid file
        # is still there, as a killed server leaves it. Its children go too: a
        # background worker (the monitor's health checks) outlives a killed postmaster.
        pid_file = self.data / "postmaster.pid"
        with suppress(FileNotFoundError, ValueError):
            server = int(pid_file.read_text().split()[0])
            for pid in [server, *_children(server)]:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux's /proc; none where it cannot be read)."""
    try:
        listed = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in listed.split()]


class Formation:
    """A monitor and two Postgres nodes under pg_auto_failover, started by :func:`formation`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.monitor = Node("monitor", root / "monitor", _free_port())
        self.nodes = [Node(f"node{n}", root / f"node{n}", _free_port()) for n in (1, 2)]
        self._autoctl = _binary()
        self._prefix = _runner()
        self._env = {
            "PATH": f"{_bindir()}:{os.environ.get('PATH', '')}",
            "XDG_CONFIG_HOME": str(root / "config"),
            "XDG_DATA_HOME": str(root / "state"),
            "HOME": str(root),
        }

    @property
    def url(self) -> str:
        """The formation's multi-host URL, as ``pg_autoctl show uri`` prints it."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"postgresql+psycopg://postgres@{hosts}/postgres?target_session_attrs=read-write"

    def _command(self, *args: str) -> list[str]:
        env = [f"{name}={value}" for name, value in self._env.items()]
        return [*self._prefix, "env", *env, self._autoctl, *args]

    def _start(self, node: Node, *args: str) -> None:
        with (self.root / f"{node.name}.log").open("ab") as log:  # the keeper keeps its copy
            node.keeper = subprocess.Popen(
                self._command(*args), stdout=log, stderr=log, cwd=self.root, start_new_session=True
            )

    def start(self) -> None:
        """Create the monitor, then the primary, then the secondary; wait until they settle."""
        if self._prefix:
            shutil.chown(self.root, "postgres")
        common = ("--hostname", "127.0.0.1", "--auth", "trust", "--no-ssl")
        created = subprocess.run(
            self._command(
                "create", "monitor", "--pgdata", str(self.monitor.data),
                "--pgport", str(self.monitor.port), *common,
            ),
            capture_output=True, text=True, cwd=self.root, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            raise PostgresUnavailable(f"pg_autoctl create monitor failed:\n{created.stderr}")
        self._start(self.monitor, "run", "--pgdata", str(self.monitor.data))
        monitor = f"postgres://autoctl_node@127.0.0.1:{self.monitor.port}/pg_auto_failover"
        for node in self.nodes:
            self._start(
                node, "create", "postgres", "--pgdata", str(node.data),
                "--pgport", str(node.port), "--listen", "127.0.0.1",
                "--monitor", monitor, *common, "--run",
            )  # fmt: skip
            # Alone, the first node is "single"; with a secondary it becomes "primary".
            self.wait_for({"single"} if node is self.nodes[0] else {"primary", "secondary"})

    def states(self) -> list[tuple[str, str]]:
        """(reported, assigned) state of each Postgres node, as the monitor has them."""
        monitor = create_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:{self.monitor.port}/pg_auto_failover"
            "?connect_timeout=5",
            poolclass=NullPool,
        )
        try:
            with monitor.connect() as conn:
                rows = conn.execute(
                    text("SELECT reportedstate, goalstate FROM pgautofailover.node ORDER BY nodeid")
                ).all()
                return [(str(r[0]), str(r[1])) for r in rows]
        finally:
            monitor.dispose()

    def wait_for(self, settled: set[str], timeout: float = 120.0) -> None:
        """Wait until the nodes report exactly the states ``settled``, as assigned."""
        deadline = time.monotonic() + timeout
        while True:
            with suppress(Exception):  # the monitor may still be starting
                states = self.states()
                if {r for r, _ in states} == settled and all(r == g for r, g in states):
                    return
            if time.monotonic() > deadline:
                logs = "".join(path.read_text()[-2000:] for path in sorted(self.root.glob("*.log")))
                raise PostgresUnavailable(f"the formation did not reach {settled}:\n{logs}")
            time.sleep(0.5)

    def primary(self) -> Node:
        """The node that takes writes now."""
        for node in self.nodes:
            with suppress(Exception):
                engine = create_engine(node.url, poolclass=NullPool)
                try:
                    with engine.connect() as conn:
                        if not conn.execute(text("SELECT pg_is_in_recovery()")).scalar():
                            return node
                finally:
                    engine.dispose()
        raise PostgresUnavailable("no node of the formation takes writes")

    def stop(self) -> None:
        """Kill every keeper and server of the formation."""
        for node in [*self.nodes, self.monitor]:
            with suppress(Exception):  # one node's trouble leaves none of the others running
                node.crash()


@contextmanager
def formation() -> Iterator[Formation]:
    """Start a pg_auto_failover formation on loopback; kill and delete it afterwards."""
    root = Path(tempfile.mkdtemp(prefix="hermes-orm-autofailover-"))
    try:
        found = Formation(root)
        try:
            found.start()
            yield found
        finally:
            found.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
