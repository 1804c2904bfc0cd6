"""A throwaway PgBouncer in transaction pooling mode, in front of a PostgreSQL server.

Debian's ``pgbouncer`` package provides the binary; where it is missing, a run
as root installs it with ``apt-get`` (as CI does), and otherwise says so. The
pooler listens on loopback, lets any user of the server in without a password
(``auth_type = trust``, as the test server does), forwards every database name
to the server, and keeps few server connections per database so that clients
really share them, transaction by transaction.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url

from devtools.postgres import PostgresUnavailable, _free_port, _runner

#: Server connections per database and user: fewer than the tests' clients.
POOL_SIZE = 3


def _binary() -> str:
    """Debian's pgbouncer; installed with apt-get, as root, where it is missing."""
    found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if Path(found).is_file():
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        install = ["apt-get", "install", "-y", "-q", "pgbouncer"]
        done = subprocess.run(install, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # an old package list: refresh it once
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
            done = subprocess.run(install, capture_output=True, text=True, check=False)
        if done.returncode == 0 and Path("/usr/sbin/pgbouncer").is_file():
            return "/usr/sbin/pgbouncer"
        raise PostgresUnavailable(f"apt-get install pgbouncer failed:\n{done.stderr}")
    raise PostgresUnavailable("no pgbouncer binary found: apt-get install pgbouncer")


@contextmanager
def pgbouncer(server_url: str, *, pool_size: int = POOL_SIZE) -> Iterator[str]:
    """Run PgBouncer in front of ``server_url``; yields the pooler's URL (same database).

    Raises:
        PostgresUnavailable: No ``pgbouncer`` binary, or it did not start.
    """
    binary = _binary()
    server = make_url(server_url)
    root = Path(tempfile.mkdtemp(prefix="hermes-orm-pgbouncer-"))
    port = _free_port()
    user = server.username or "postgres"
    (root / "users.txt").write_text(f'"{user}" ""\n')
    (root / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.host or '127.0.0.1'} port={server.port or 5432}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {root / 'users.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        "max_client_conn = 500\n"
        f"logfile = {root / 'pgbouncer.log'}\n"
        f"pidfile = {root / 'pgbouncer.pid'}\n"
    )
    runner = _runner()
    if runner:
        shutil.chown(root, "postgres")
        for path in root.iterdir():
            shutil.chown(path, "postgres")
    process = subprocess.Popen(
        [*runner, binary, str(root / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = root / "pgbouncer.log"
                    text = log.read_text() if log.exists() else ""
                    raise PostgresUnavailable(f"pgbouncer did not start:\n{text}") from None
                time.sleep(0.05)
        yield server.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(root, ignore_errors=True)


__all__ = ["POOL_SIZE", "pgbouncer"]
