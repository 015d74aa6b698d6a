"""The tenant setting, sent in a round trip the transaction makes anyway.

:func:`~tenant_celery.bind_tenant_guc` does not set the tenant with a
statement of its own when the transaction begins: that would cost a network
round trip per transaction, about as much as a short query.  It keeps the
settings to make on the transaction's record; the guard hands them to
:func:`send_before`, just before the transaction's first statement goes to the
driver, which sends them by the cheapest means the driver offers:

psycopg 3 (sync and async)
    The driver would send ``BEGIN`` alone before the first statement.  Instead
    ``BEGIN`` (with the connection's isolation level, read-only and deferrable
    options) and the settings go in one simple-protocol message through the
    connection's :attr:`~psycopg.Connection.pgconn`; the driver then finds the
    transaction open and sends the statement as usual.
psycopg2
    The driver always sends ``BEGIN`` alone, so the settings go in the same
    message as the first statement, ahead of it: psycopg2 sends a statement
    as a simple query and reports the last result.
Anything else
    (another driver; on psycopg2 an ``executemany`` or a server-side cursor as
    the first statement; a psycopg 3 connection whose transaction was begun
    on the DBAPI connection, in pipeline mode, or two-phase): one
    ``SELECT set_config(...)`` runs as a statement of its own
    (:func:`settings_sql`).

In the message of another statement a setting is ``SET LOCAL name = 'value'``
(:func:`inline_sql`), which PostgreSQL runs without planning anything, where
``SELECT set_config(...)`` costs the server tens of microseconds of planning.
Either way the settings reach the server before the first statement, in the
same transaction, or the statement is not sent.  A value is a SQL literal,
never text pasted into a query unchecked: a setting name is validated as
``word.word``; a value made only of letters, digits and ``_ . : @ + -`` (UUIDs,
integers, slugs: what the built-in parsers return) is quoted as it is, and any
other value is sent hex-encoded in a ``set_config`` and decoded by the server,
so that no character of it can end the literal or reach psycopg2's parameter
formatting.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from sqlalchemy.engine import Connection

from .config import validate_guc_name

_PLAIN = re.compile(r"[A-Za-z0-9_.:@+-]*\Z")


Setting = tuple[str, str]
"""A setting name and the value to give it for the transaction."""


@lru_cache(maxsize=4096)
def settings_sql(settings: tuple[Setting, ...]) -> str:
    """One ``SELECT`` statement that makes each setting, in order."""
    return "SELECT " + ", ".join(_set_config(name, value) for name, value in settings)


@lru_cache(maxsize=4096)
def inline_sql(settings: tuple[Setting, ...]) -> str:
    """The settings as statements to send in one message with another: ``SET LOCAL``
    for a plain value, ``SELECT set_config`` with a hex-encoded one otherwise."""
    statements = []
    for name, value in settings:
        if _PLAIN.match(value):
            statements.append(f"SET LOCAL {validate_guc_name(name)} = '{value}'")
        else:
            statements.append(f"SELECT {_set_config(name, value)}")
    return "; ".join(statements)


def _set_config(name: str, value: str) -> str:
    validate_guc_name(name)
    if _PLAIN.match(value):
        return f"pg_catalog.set_config('{name}', '{value}', true)"
    # Hex digits only: safe whatever standard_conforming_strings says, and no
    # '%' for psycopg2's parameter formatting to read.
    hexed = value.encode("utf-8").hex()
    return (
        f"pg_catalog.set_config('{name}', "
        f"pg_catalog.convert_from(pg_catalog.decode('{hexed}', 'hex'), 'UTF8'), true)"
    )


def send_before(
    conn: Connection,
    cursor: Any,
    statement: str,
    executemany: bool,
    settings: tuple[Setting, ...],
) -> str:
    """Make ``settings`` reach the server before ``statement``; return the statement to send."""
    pooled = conn.connection
    dbapi: Any = pooled.dbapi_connection
    found = _senders.get(type(dbapi))
    if found is None:
        driver = pooled.driver_connection
        found = _senders[type(dbapi)] = (_sender_for(type(driver)), driver is dbapi)
    sender, direct = found
    # The DBAPI connection is the driver's own except under an async adapter.
    driver = dbapi if direct else pooled.driver_connection
    sent = sender(driver, cursor, statement, executemany, inline_sql(settings))
    if sent is not None:
        return sent
    own = dbapi.cursor()
    try:
        own.execute(settings_sql(settings))
    finally:
        own.close()
    return statement


# How each driver sends the settings; None: as a statement of their own.
_Sender = Callable[[Any, Any, str, bool, str], "str | None"]
# DBAPI connection type -> its driver's sender, and whether it is the driver's own
_senders: dict[type, tuple[_Sender, bool]] = {}


def _sender_for(kind: type) -> _Sender:
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None:
        if issubclass(kind, psycopg.Connection):
            return _Psycopg().send
        if issubclass(kind, psycopg.AsyncConnection):
            return _Psycopg().send_async
    psycopg2 = sys.modules.get("psycopg2.extensions")
    if psycopg2 is not None and issubclass(kind, psycopg2.connection):
        return _psycopg2
    return _own_statement


def _own_statement(driver: Any, cursor: Any, statement: str, executemany: bool, sql: str) -> None:
    return None


def _psycopg2(driver: Any, cursor: Any, statement: str, executemany: bool, sql: str) -> str | None:
    extensions = sys.modules["psycopg2.extensions"]
    if (
        driver.status == extensions.STATUS_BEGIN
        and driver.info.transaction_status == extensions.TRANSACTION_STATUS_IDLE
    ):
        # psycopg2 believes its transaction open, but SQL (a COMMIT sent as a
        # statement) ended it on the server: it would send no BEGIN, and each
        # statement would be a transaction of its own.  Begin the server's again.
        own = driver.cursor()
        try:
            own.execute("BEGIN")
        finally:
            own.close()
    if executemany or cursor.name is not None:  # a named cursor would DECLARE it all
        return None
    return f"{sql}; {statement}"


class _Psycopg:
    """psycopg 3: ``BEGIN`` and the settings in one message, when psycopg would
    send ``BEGIN`` before the statement."""

    def __init__(self) -> None:
        from psycopg import IsolationLevel, errors, generators, pq  # noqa: PLC0415

        self.idle = pq.TransactionStatus.IDLE
        self.sqlstate = pq.DiagnosticField.SQLSTATE
        self.succeeded = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)
        self.fatal = pq.ExecStatus.FATAL_ERROR
        self.levels = IsolationLevel
        self.errors = errors
        self.execute = generators.execute
        self.begins: dict[tuple[object, object, object], str] = {}

    def startable(self, driver: Any) -> bool:
        return (
            not driver.autocommit
            and driver.pgconn.transaction_status == self.idle
            and getattr(driver, "_pipeline", None) is None
        )

    def begin(self, driver: Any, sql: str) -> bytes:
        """``BEGIN`` as psycopg would send it, then ``sql``, in one message."""
        key = (driver.isolation_level, driver.read_only, driver.deferrable)
        begin = self.begins.get(key)
        if begin is None:
            level, read_only, deferrable = key
            parts = ["BEGIN"]
            if level is not None:
                parts.append(f"ISOLATION LEVEL {self.levels(level).name.replace('_', ' ')}")
            if read_only is not None:
                parts.append("READ ONLY" if read_only else "READ WRITE")
            if deferrable is not None:
                parts.append("DEFERRABLE" if deferrable else "NOT DEFERRABLE")
            begin = self.begins[key] = " ".join(parts)
        return f"{begin}; {sql}".encode("ascii")

    def check(self, driver: Any, result: Any) -> None:
        """Raise the server's error unless ``BEGIN`` and the settings both succeeded.

        A server error keeps its class (``AdminShutdown`` for a terminated
        backend, say).  A connection lost on the way, which libpq reports as an
        error result without an SQLSTATE, is an ``OperationalError`` as psycopg
        raises it for its own statements, where ``error_from_result`` would make
        it a ``DatabaseError``: code that retries on ``OperationalError`` (a
        task's ``autoretry_for``) retries it.
        """
        if result is not None and result.status in self.succeeded:
            return
        lost = result is None or result.error_field(self.sqlstate) is None
        if result is not None and result.status == self.fatal and not lost:
            raise self.errors.error_from_result(result, encoding=driver.info.encoding)
        raise self.errors.OperationalError(
            "starting the transaction with its tenant setting failed: "
            + (driver.pgconn.error_message or b"no result").decode("utf-8", "replace").strip()
        )

    def send(
        self, driver: Any, cursor: Any, statement: str, executemany: bool, sql: str
    ) -> str | None:
        if not self.startable(driver):
            return None
        self.check(driver, driver.pgconn.exec_(self.begin(driver, sql)))
        return statement

    def send_async(
        self, driver: Any, cursor: Any, statement: str, executemany: bool, sql: str
    ) -> str | None:
        """:meth:`send` on an async connection, from SQLAlchemy's greenlet."""
        if not self.startable(driver):
            return None
        from sqlalchemy.util import await_only  # noqa: PLC0415

        driver.pgconn.send_query(self.begin(driver, sql))
        results = await_only(driver.wait(self.execute(driver.pgconn)))
        self.check(driver, results[-1] if results else None)
        return statement
