"""What a client says to PostgreSQL, read off the wire: statements and round trips.

:class:`PgWire` is a :class:`~tests._rig.tcp_proxy.TcpProxy` to a PostgreSQL
server that parses the frontend/backend protocol (version 3) flowing through
it.  It records, in order, every SQL text a client sends (a simple ``Query``
or an extended-protocol ``Parse``) and every ``ReadyForQuery`` the server
answers with.  The server sends exactly one ``ReadyForQuery`` per simple
query and per ``Sync``, and the client waits for it before its next
statement (outside pipeline mode), so the number of them is the number of
network round trips, counted by the protocol and not by any library's idea of
a statement.

Connect through :meth:`PgWire.url`: it turns TLS and GSS encryption off, so
the messages are readable.  No pytest here: benchmarks use it too.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType

from sqlalchemy.engine import URL

from .tcp_proxy import TcpProxy

_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104


@dataclass(frozen=True)
class Message:
    """One message: ``kind`` is its type byte (``"Q"``, ``"P"``, ``"Z"``, ...)."""

    connection: int
    from_client: bool
    kind: str
    sql: str | None = None
    """The SQL text of a ``Query`` or ``Parse``."""
    status: str | None = None
    """A ``ReadyForQuery``'s transaction status: ``I`` idle, ``T`` in a transaction,
    ``E`` in a failed one."""


@dataclass
class _Stream:
    from_client: bool
    buffer: bytearray = field(default_factory=bytearray)
    started: bool = False
    """Past the untyped startup messages (client) / the one-byte answers (server)."""
    raw_answers: int = 0
    """One-byte answers the server owes to encryption requests."""


class PgWire:
    """A PostgreSQL proxy that records messages (see the module docs)."""

    def __init__(self, target: tuple[str, int] | str) -> None:
        self._lock = threading.Lock()
        self._messages: list[Message] = []
        self._streams: dict[tuple[int, bool], _Stream] = {}
        self.proxy = TcpProxy(target, tap=self._feed)

    @classmethod
    def to(cls, url: URL) -> PgWire:
        """A proxy (not started) to the server ``url`` names, over TCP or its Unix socket."""
        socket_dir = url.query.get("host")
        if isinstance(socket_dir, str) and socket_dir.startswith("/"):
            return cls(f"{socket_dir}/.s.PGSQL.{url.port or 5432}")
        return cls((url.host or "127.0.0.1", url.port or 5432))

    def url(self, url: URL) -> URL:
        """``url`` through this proxy, unencrypted so that it can be read."""
        query = {k: v for k, v in url.query.items() if k not in ("host", "port")}
        query.update(sslmode="disable", gssencmode="disable")
        return url.set(host="127.0.0.1", port=self.proxy.port, query=query)

    def __enter__(self) -> PgWire:
        self.proxy.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.proxy.stop()

    # -- reading

    def mark(self) -> int:
        """A position in the record: pass it to the readers below."""
        with self._lock:
            return len(self._messages)

    def messages(self, since: int = 0) -> list[Message]:
        with self._lock:
            return self._messages[since:]

    def sql(self, since: int = 0) -> list[str]:
        """Every SQL text clients sent since ``since``, in order."""
        return [m.sql for m in self.messages(since) if m.sql is not None]

    def round_trips(self, since: int = 0) -> int:
        """``ReadyForQuery`` messages the server sent since ``since``."""
        return sum(1 for m in self.messages(since) if m.kind == "Z")

    def transactions(self, since: int = 0) -> list[list[Message]]:
        """The messages since ``since`` cut into exchanges that end idle.

        Each list runs up to and including a ``ReadyForQuery`` with status
        ``I``: one transaction, or one statement outside any.
        """
        found: list[list[Message]] = []
        current: list[Message] = []
        for message in self.messages(since):
            current.append(message)
            if message.kind == "Z" and message.status == "I":
                found.append(current)
                current = []
        if current:
            found.append(current)
        return found

    # -- parsing

    def _feed(self, connection: int, from_client: bool, data: bytes) -> None:
        with self._lock:
            stream = self._streams.setdefault(
                (connection, from_client), _Stream(from_client=from_client)
            )
            stream.buffer += data
            self._parse(connection, stream)

    def _parse(self, connection: int, stream: _Stream) -> None:
        buffer = stream.buffer
        while True:
            if not stream.from_client and stream.raw_answers:
                if not buffer:
                    return
                del buffer[:1]  # 'N': no encryption
                stream.raw_answers -= 1
                continue
            if stream.from_client and not stream.started:
                if len(buffer) < 8:
                    return
                (length, code) = struct.unpack("!ii", buffer[:8])
                if len(buffer) < length:
                    return
                del buffer[:length]
                if code in (_SSL_REQUEST, _GSS_REQUEST):
                    server = self._streams.setdefault((connection, False), _Stream(False))
                    server.raw_answers += 1
                else:
                    stream.started = True  # the StartupMessage
                continue
            if len(buffer) < 5:
                return
            kind = chr(buffer[0])
            (length,) = struct.unpack("!i", buffer[1:5])
            if len(buffer) < 1 + length:
                return
            body = bytes(buffer[5 : 1 + length])
            del buffer[: 1 + length]
            self._messages.append(_message(connection, stream.from_client, kind, body))


def first_statement(transaction: list[Message]) -> str:
    """The first SQL a transaction ran, its ``BEGIN`` left out.

    ``BEGIN`` sent alone (psycopg2) is skipped; sent with more statements in one
    message (``BEGIN; ...``) it is cut off.  A statement that was prepared
    earlier (a ``Bind`` with no ``Parse`` before it) counts, as ``"<prepared>"``.
    """
    for message in transaction:
        if not message.from_client:
            continue
        if message.kind == "B":
            return "<prepared>"
        if message.sql is None:
            continue
        sql = message.sql.strip()
        head, _, rest = sql.partition(";")
        if head.strip().upper().startswith("BEGIN"):
            if not rest.strip():
                continue
            sql = rest.strip()
        return sql
    raise AssertionError(f"no statement in {transaction}")


def _message(connection: int, from_client: bool, kind: str, body: bytes) -> Message:
    if from_client and kind == "Q":
        return Message(connection, True, kind, sql=body.rstrip(b"\0").decode())
    if from_client and kind == "P":
        name_end = body.index(b"\0")
        text_end = body.index(b"\0", name_end + 1)
        return Message(connection, True, kind, sql=body[name_end + 1 : text_end].decode())
    if not from_client and kind == "Z":
        return Message(connection, False, kind, status=chr(body[0]))
    return Message(connection, from_client, kind)
