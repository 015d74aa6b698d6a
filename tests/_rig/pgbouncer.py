"""A private PgBouncer in front of a test database.

:func:`run_pgbouncer` starts ``pgbouncer`` on a free loopback port, configured
from ``examples/pgbouncer/pgbouncer.ini`` (the file the PgBouncer how-to shows)
with only what must differ in a test changed: the server it points at, the
port, trust authentication with a generated user list, no Unix socket, and the
pool size. A server on a Unix socket only is reached through a loopback
forwarder. As root it runs as ``nobody`` (PgBouncer refuses to run as root).
A missing ``pgbouncer`` binary skips the test on a laptop and fails it in CI
(``.ci/run`` installs Debian's package).
"""

from __future__ import annotations

import configparser
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from tests._rig.env import unavailable
from tests._rig.postgres import APP_PASSWORD, APP_ROLE, Database
from tests._rig.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_INI = ROOT / "examples" / "pgbouncer" / "pgbouncer.ini"
READY_TIMEOUT = 10.0


@dataclass(frozen=True)
class PgBouncer:
    """A running PgBouncer serving one database under the name ``shop``."""

    port: int
    log_path: Path
    database: Database

    def url(self, *, app_role: bool = True) -> URL:
        """URL of the database through PgBouncer (as ``app_user`` by default)."""
        url = self.database.url.set(host="127.0.0.1", port=self.port, database="shop", query={})
        if not app_role:
            return url
        return url.set(username=APP_ROLE, password=APP_PASSWORD)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def find_pgbouncer() -> str:
    """Path of the ``pgbouncer`` binary, or give up on the test (skip, or fail in CI)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if not found:
        unavailable("PgBouncer", "no pgbouncer binary (Debian: apt-get install pgbouncer)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_address(database: Database) -> tuple[str, int]:
    """Host (or Unix socket directory) and port of *database*'s server."""
    url = database.url
    host = url.query.get("host") or url.host or "127.0.0.1"
    host = host if isinstance(host, str) else host[-1]
    port = url.query.get("port") or url.port or 5432
    port = port if isinstance(port, (str, int)) else port[-1]
    return host, int(port)


@contextlib.contextmanager
def _reachable_server(database: Database) -> Iterator[tuple[str, int]]:
    """A TCP address PgBouncer can reach *database*'s server at.

    A server that listens on a Unix socket only (pgserver's PostgreSQL 16) keeps
    it in a directory that ``nobody`` cannot enter: a loopback forwarder in this
    process carries PgBouncer's server connections to the socket.
    """
    host, port = _server_address(database)
    if not host.startswith("/"):
        yield host, port
        return
    with TcpProxy(f"{host}/.s.PGSQL.{port}") as proxy:
        proxy.start()
        yield "127.0.0.1", proxy.port


def write_config(
    directory: Path,
    database: Database,
    *,
    port: int,
    pool_size: int,
    server: tuple[str, int] | None = None,
) -> Path:
    """Write the example's configuration, adapted to *database*, into *directory*.

    *server* is the ``(host, port)`` PgBouncer connects to (default: the database's own).
    """
    config = configparser.ConfigParser(inline_comment_prefixes=(";",), interpolation=None)
    config.read(EXAMPLE_INI)
    assert config.get("pgbouncer", "pool_mode") == "transaction", "the example changed"
    host, server_port = server or _server_address(database)
    config.set("databases", "shop", f"host={host} port={server_port} dbname={database.name}")
    users = directory / "userlist.txt"
    admin = database.url.username or "postgres"
    users.write_text(f'"{APP_ROLE}" "{APP_PASSWORD}"\n"{admin}" "{database.url.password or ""}"\n')
    settings = {
        "listen_port": str(port),
        "unix_socket_dir": "",
        "auth_type": "trust",
        "auth_file": str(users),
        "default_pool_size": str(pool_size),
        "logfile": "",
        "pidfile": "",
    }
    for key, value in settings.items():
        config.set("pgbouncer", key, value)
    path = directory / "pgbouncer.ini"
    with path.open("w") as handle:
        config.write(handle)
    return path


@contextlib.contextmanager
def run_pgbouncer(database: Database, *, pool_size: int = 1) -> Iterator[PgBouncer]:
    """Run PgBouncer for *database* until the block ends.

    With the default *pool_size* of 1 every client shares a single server
    connection, one transaction at a time: the harshest case for session state.
    """
    binary = find_pgbouncer()
    directory = Path(tempfile.mkdtemp(prefix="tc-pgbouncer-"))
    directory.chmod(0o755)  # readable by ``nobody``
    stack = contextlib.ExitStack()
    try:
        port = _free_port()
        server = stack.enter_context(_reachable_server(database))
        config = write_config(directory, database, port=port, pool_size=pool_size, server=server)
        for path in directory.iterdir():
            path.chmod(0o644)
        command = [binary, *(["-u", "nobody"] if os.geteuid() == 0 else []), str(config)]
        log_path = directory / "pgbouncer.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            _wait_listening(process, port, log_path)
            yield PgBouncer(port=port, log_path=log_path, database=database)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        stack.close()
        shutil.rmtree(directory, ignore_errors=True)


def _wait_listening(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"pgbouncer exited with {process.returncode}:\n{log_path.read_text()}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"pgbouncer not listening on {port} after {READY_TIMEOUT} s")
