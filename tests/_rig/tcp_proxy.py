"""A TCP forwarder on 127.0.0.1 that a test switches off and on: a server that goes away.

``TcpProxy(target)`` takes a free loopback port at once but listens only after
:meth:`~TcpProxy.start`.  While it is stopped, a connection to the port is
refused, exactly as if the server behind it were down; :meth:`~TcpProxy.stop`
also cuts every connection that was open, so pooled clients lose theirs.
Starting it again listens on the same port, so clients configured with it
find the server back.  The target is ``(host, port)`` or a Unix socket path
(a PostgreSQL that listens on a socket only).

:meth:`~TcpProxy.freeze` is a network partition instead: connections stay open
but nothing is forwarded either way (what was read is held), no reset is sent,
and new connections hang; :meth:`~TcpProxy.thaw` delivers what was held and
forwards again, and :meth:`~TcpProxy.stop` drops it.  The proxy's own sockets
still acknowledge what they receive, so TCP keepalives and ``tcp_user_timeout``
on the client cannot see this partition; only timeouts above TCP can.

``tap``, if given, is called with every chunk forwarded, before it is sent on:
``tap(connection_number, from_client, data)`` (see :mod:`tests._rig.pg_wire`).

Threads and blocking sockets only, no pytest: the reliability suite uses it too.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections.abc import Callable
from types import TracebackType

from tests._rig.redis_server import free_port

_CHUNK = 65536
_ACCEPT_POLL = 0.2


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target`` while started (see the module docs)."""

    def __init__(
        self,
        target: tuple[str, int] | str,
        *,
        port: int | None = None,
        tap: Callable[[int, bool, bytes], None] | None = None,
    ) -> None:
        self.target = target
        self.tap = tap
        self._numbers = itertools.count(1)
        self.port = free_port() if port is None else port
        self.accepted = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._open: set[socket.socket] = set()

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        """Listen on :attr:`port` and forward every connection; a no-op when listening."""
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        listener.settimeout(_ACCEPT_POLL)
        self._stopping.clear()
        self._listener = listener
        self._thread = threading.Thread(
            target=self._accept, args=(listener,), name=f"tcp-proxy-{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and cut every open connection; a no-op when stopped."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping.set()
        self._flowing.set()  # a frozen pump must see the cut
        if self._thread is not None:
            self._thread.join(5)
        listener.close()
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            _close(sock)

    def freeze(self) -> None:
        """Forward nothing, either way, until :meth:`thaw`: a partition, not a reset."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward again, what was held first."""
        self._flowing.set()

    @property
    def frozen(self) -> bool:
        return not self._flowing.is_set()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- forwarding

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            self._flowing.wait()  # partitioned: the client's connection hangs
            if self._stopping.is_set():
                _close(client)
                return
            self.accepted += 1
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            if isinstance(self.target, str):
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self.target)
            else:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
        except OSError:
            _close(client)
            return
        with self._lock:
            if self._stopping.is_set():
                _close(client)
                _close(upstream)
                return
            self._open.update((client, upstream))
        number = next(self._numbers)
        for source, sink, from_client in ((client, upstream, True), (upstream, client, False)):
            threading.Thread(
                target=self._pump, args=(source, sink, number, from_client), daemon=True
            ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, number: int, from_client: bool
    ) -> None:
        tap = self.tap
        try:
            while data := source.recv(_CHUNK):
                self._flowing.wait()  # partitioned: hold it, send nothing, reset nothing
                if self._stopping.is_set():
                    break  # stopped while frozen: what was held is dropped, as in a cut
                if tap is not None:
                    tap(number, from_client, data)
                sink.sendall(data)
        except OSError:
            pass
        # One side is done: end both, as a server going away would.
        with self._lock:
            self._open.discard(source)
            self._open.discard(sink)
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
