"""A private ``redis-server`` on a free loopback port, which a test may kill and restart.

The shared Redis the other tests use is never touched: a fault test that must
take Redis away starts its own with :func:`private_redis`, on a port and in a
data directory nobody else knows.  With ``appendonly=True`` (the default) the
server writes every command to its append-only file and fsyncs it before
answering (``appendfsync always``), so whatever Redis acknowledged survives a
kill and restart; without it a restart empties the server, by design.

This module imports neither pytest nor the rest of the rig: the reliability
suite uses it too.  A missing binary raises :class:`RedisServerUnavailable`;
the pytest fixtures turn that into a skip, or a failure in CI.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

READY_TIMEOUT = 15.0


class RedisServerUnavailable(RuntimeError):
    """No ``redis-server`` binary, or it would not start."""


def find_redis_server() -> str:
    """Path of the ``redis-server`` binary.

    Raises:
        RedisServerUnavailable: none on ``PATH`` (Debian: ``apt-get install redis-server``).
    """
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/bin")
    if not found:
        raise RedisServerUnavailable(
            "no redis-server binary on PATH (Debian: apt-get install redis-server)"
        )
    return found


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, below the kernel's
    ephemeral range.

    A server that a test stops and starts again on the same port (a restarted
    Redis, a proxy switched off and on) must find the port free: a port from
    the ephemeral range could meanwhile become the local end of some client's
    outgoing connection, and the restart would fail with "address in use".
    """
    high = _ephemeral_low()
    low = 20000 if high > 21000 else 10000
    for _ in range(500):
        port = random.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port on 127.0.0.1 between {low} and {high}")


@dataclass(eq=False)
class RedisServer:
    """One private Redis: its port, data directory and current process (if running)."""

    binary: str
    port: int
    directory: Path
    appendonly: bool = True
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        persistence = ["--appendonly", "no"]
        if self.appendonly:
            persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", *persistence, "--dir", str(self.directory),
            "--daemonize", "no", "--logfile", "",
        ]  # fmt: skip

    def start(self, timeout: float = READY_TIMEOUT) -> float:
        """Start the server (again, on the same port and data) and wait for PING.

        Returns the seconds it took to answer.

        Raises:
            RedisServerUnavailable: it exited, or did not answer within ``timeout``.
        """
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=2)
        try:
            while True:
                try:
                    if client.ping():
                        return time.monotonic() - began
                except redis.BusyLoadingError:
                    pass  # still reading its append-only file
                except redis.ConnectionError:
                    pass
                if self.process.poll() is not None or time.monotonic() - began > timeout:
                    self.kill()
                    raise RedisServerUnavailable(
                        f"redis-server on port {self.port} did not start; log tail:\n"
                        + self.log_tail()
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL: a crash; SIGTERM: a clean shutdown) and wait for the exit."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def private_redis(*, appendonly: bool = True) -> Iterator[RedisServer]:
    """Run a private ``redis-server`` until the block ends; kill it and delete its data then.

    Raises:
        RedisServerUnavailable: no binary, or it did not start.
    """
    binary = find_redis_server()
    directory = Path(tempfile.mkdtemp(prefix="tc-redis-"))
    server = RedisServer(binary, free_port(), directory, appendonly=appendonly)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(directory, ignore_errors=True)
