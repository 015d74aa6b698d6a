"""The tenant setting, sent in a round trip the transaction makes anyway.

:func:`~tenant_celery.bind_tenant_guc` does not run its ``set_config`` as a
statement of its own when the transaction begins: that would cost a network
round trip per transaction, about as much as a short query.  It builds the
statement (:func:`setting_sql`) and keeps it on the transaction's record; the
guard hands it to :func:`send_before`, just before the transaction's first
statement goes to the driver, which sends it by the cheapest means the driver
offers:

psycopg 3 (sync and async)
    The driver would send ``BEGIN`` alone before the first statement.  Instead
    ``BEGIN`` (with the connection's isolation level, read-only and deferrable
    options) and the ``set_config`` go in one simple-protocol message through
    the connection's :attr:`~psycopg.Connection.pgconn`; the driver then finds
    the transaction open and sends the statement as usual.
psycopg2
    The driver always sends ``BEGIN`` alone, so the ``set_config`` goes in the
    same message as the first statement, ahead of it
    (``SELECT set_config(...); <statement>``): psycopg2 sends a statement as a
    simple query and reports the last result.
Anything else
    (another driver; on psycopg2 an ``executemany`` or a server-side cursor as
    the first statement; a psycopg 3 connection whose transaction was begun
    on the DBAPI connection, in pipeline mode, or two-phase): the
    ``set_config`` runs as a statement of its own.

Either way it reaches the server before the first statement, in the same
transaction, or the statement is not sent.  The value is a SQL literal, never
text pasted into a query unchecked: a setting name is validated as
``word.word``; a value made only of letters, digits and ``_ . : @ + -`` (UUIDs,
integers, slugs) is quoted as it is, and any other value is sent hex-encoded
and decoded by the server, so no character of it can end the literal.
"""

from __future__ import annotations

import re
import sys
from functools import lru_cache
from typing import Any

from sqlalchemy.engine import Connection

from .config import validate_guc_name

_PLAIN = re.compile(r"[A-Za-z0-9_.:@+-]*\Z")


Setting = tuple[str, str]
"""A setting name and the value to give it for the transaction."""


def setting_sql(name: str, value: str) -> str:
    """``SELECT pg_catalog.set_config('<name>', <value literal>, true)``: no parameters.

    ``name`` must be a ``word.word`` setting name
    (:func:`~tenant_celery.config.validate_guc_name` raises otherwise).
    """
    return settings_sql(((name, value),))


@lru_cache(maxsize=4096)
def settings_sql(settings: tuple[Setting, ...]) -> str:
    """One ``SELECT`` that makes each setting, in order."""
    calls = []
    for name, value in settings:
        validate_guc_name(name)
        calls.append(f"pg_catalog.set_config('{name}', {_literal(value)}, true)")
    return "SELECT " + ", ".join(calls)


def _literal(value: str) -> str:
    if _PLAIN.match(value):
        return f"'{value}'"
    # Hex digits only: safe whatever standard_conforming_strings says, and no
    # '%' for psycopg2's parameter formatting to read.
    hexed = value.encode("utf-8").hex()
    return f"pg_catalog.convert_from(pg_catalog.decode('{hexed}', 'hex'), 'UTF8')"


def send_before(conn: Connection, cursor: Any, statement: str, executemany: bool, sql: str) -> str:
    """Make ``sql`` reach the server before ``statement``; return the statement to send."""
    driver = conn.connection.driver_connection
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None:
        if isinstance(driver, psycopg.Connection):
            if _startable(driver):
                _check(driver, driver.pgconn.exec_(_begin(driver, sql)))
                return statement
        elif isinstance(driver, psycopg.AsyncConnection) and _startable(driver):
            _begin_async(driver, sql)
            return statement
    psycopg2 = sys.modules.get("psycopg2.extensions")
    if (
        psycopg2 is not None
        and isinstance(driver, psycopg2.connection)
        and not executemany
        and getattr(cursor, "name", None) is None  # a named cursor would DECLARE it
    ):
        return f"{sql}; {statement}"
    own = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        own.execute(sql)
    finally:
        own.close()
    return statement


def _startable(driver: Any) -> bool:
    """Whether psycopg 3 would send ``BEGIN`` before its next statement."""
    from psycopg import pq  # noqa: PLC0415 (the driver is loaded: driver is one of its)

    return (
        not driver.autocommit
        and driver.pgconn.transaction_status == pq.TransactionStatus.IDLE
        and getattr(driver, "_pipeline", None) is None
    )


def _begin(driver: Any, sql: str) -> bytes:
    """``BEGIN`` as psycopg 3 would send it, then ``sql``, in one message."""
    from psycopg import IsolationLevel  # noqa: PLC0415

    parts = ["BEGIN"]
    if driver.isolation_level is not None:
        level = IsolationLevel(driver.isolation_level).name.replace("_", " ")
        parts.append(f"ISOLATION LEVEL {level}")
    if driver.read_only is not None:
        parts.append("READ ONLY" if driver.read_only else "READ WRITE")
    if driver.deferrable is not None:
        parts.append("DEFERRABLE" if driver.deferrable else "NOT DEFERRABLE")
    return f"{' '.join(parts)}; {sql}".encode("ascii")


def _check(driver: Any, result: Any) -> None:
    """Raise the server's error if ``BEGIN; set_config`` did not both succeed."""
    from psycopg import errors, pq  # noqa: PLC0415

    if result is None or result.status != pq.ExecStatus.TUPLES_OK:
        if result is not None and result.status == pq.ExecStatus.FATAL_ERROR:
            raise errors.error_from_result(result, encoding=driver.info.encoding)
        raise errors.OperationalError(
            "starting the transaction with its tenant setting failed: "
            + (driver.pgconn.error_message or b"no result").decode("utf-8", "replace")
        )


def _begin_async(driver: Any, sql: str) -> None:
    """:func:`_begin` on an async psycopg 3 connection, from SQLAlchemy's greenlet."""
    from psycopg import generators  # noqa: PLC0415
    from sqlalchemy.util import await_only  # noqa: PLC0415

    driver.pgconn.send_query(_begin(driver, sql))
    results = await_only(driver.wait(generators.execute(driver.pgconn)))
    _check(driver, results[-1] if results else None)
