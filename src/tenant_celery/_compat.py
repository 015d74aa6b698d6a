"""Where the supported releases of Celery, kombu, SQLAlchemy and the drivers differ.

Every place where the package must behave differently on an older release of
a dependency, or on the other PostgreSQL driver, goes through this module, so
the supported range can be read in one file and each difference has a test of
its own (``test_compat.py`` in ``tests/unit``, and in ``tests/integration``
for what needs a server).  The range, and the differences the package cannot
smooth over, are listed on the compatibility page of the docs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import inspect
import secrets
import stringprep
import sys
import types
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import celery
import celery.backends.database as _celery_database
from celery import Task
from celery.backends.database import DatabaseBackend as _CeleryDatabaseBackend
from celery.backends.database.session import SessionManager
from celery.exceptions import ImproperlyConfigured
from kombu.utils.imports import symbol_by_name

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = [
    "CELERY_CLOSES_COLLECTED_CONNECTION",
    "DatabaseBackend",
    "GenericTask",
    "can_set_role_password",
    "consumer_acks_at_once",
    "database_retry",
    "scram_sha256_verifier",
    "set_role_password",
    "sqlstate",
]

_Method = TypeVar("_Method", bound=Callable[..., Any])


# --------------------------------------------------------------- Celery's Task


class _SubscriptableTask:
    """Stands for Celery's ``Task`` where ``Task[P, R]`` raises ``TypeError``.

    Celery's ``Task`` is subscriptable at run time only from 5.7 (the type
    stubs always were): ``class T(GenericTask[P, R])`` then makes ``Task``
    itself the base of ``T``, exactly as newer Celery does.
    """

    def __getitem__(self, params: Any) -> types.GenericAlias:
        return types.GenericAlias(Task, params)


if TYPE_CHECKING:
    from celery import Task as GenericTask
elif hasattr(Task, "__class_getitem__"):
    GenericTask = Task
else:
    GenericTask = _SubscriptableTask()


# ---------------------------------------------------------- Celery's worker

#: Whether Celery's worker closes the broker connection it has just collected
#: after a connection error (from 5.7; before, it only collects it).  The Redis
#: close guard of ``_worker_fixes`` is for the releases that do.
CELERY_CLOSES_COLLECTED_CONNECTION: bool = tuple(celery.VERSION[:2]) >= (5, 7)


def consumer_acks_at_once() -> bool:
    """Whether the worker's consumer runs an acknowledgement as soon as the task
    ends, on a transport without an event loop too (``Consumer.call_soon_ack``,
    from Celery 5.7).  Before, such a worker keeps it in the consumer's pending
    operations until ``drain_events`` returns, and one made on a pool thread
    waits for the hub's next wake-up; ``_worker_fixes`` runs the
    acknowledgements of this package's transport at once in both cases."""
    from celery.worker.consumer.consumer import Consumer  # noqa: PLC0415 (worker only)

    return hasattr(Consumer, "call_soon_ack")


# -------------------------------------------------- Celery's database backend


def _backends_share_one_session_manager() -> bool:
    """Whether every database result backend of the process shares one
    ``SessionManager``, the default value of ``ResultSession``'s argument, as
    before Celery 5.5."""
    parameter = inspect.signature(_CeleryDatabaseBackend.ResultSession).parameters.get(
        "session_manager"
    )
    return parameter is not None and isinstance(parameter.default, SessionManager)


class _DatabaseBackendWithItsOwnSessions(_CeleryDatabaseBackend):
    """Celery's database result backend with a ``session_manager`` of its own
    that carries ``database_engine_callback``, as from Celery 5.5.

    Before 5.5 one ``SessionManager`` serves every backend in the process and
    creates the result tables only in the first database it meets, a subclass
    cannot put its own manager in, and the ``database_engine_callback``
    setting does not exist.  The callback is kept on the manager, as Celery 5.5
    does; :class:`~tenant_celery.results.PooledSessionManager` calls it.  The
    tables are created at setup, as from Celery 5.5, not on the first session.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conf = self.app.conf  # type: ignore[attr-defined]  # not in the stubs
        callback = kwargs.get("engine_callback", conf.get("database_engine_callback"))
        if isinstance(callback, str):
            callback = symbol_by_name(callback)
        if callback is not None and not callable(callback):
            raise ImproperlyConfigured(
                f"database_engine_callback must be callable, got {callback!r}"
            )
        manager = SessionManager()
        manager.engine_callback = callback  # type: ignore[attr-defined]  # as in Celery 5.5
        self.session_manager = manager
        # Celery 5.5 creates the result tables as the backend is set up
        # (``database_create_tables_at_setup``, on by default); before, only the
        # first session did, which a backend storing without one never opens.
        if conf.get("database_create_tables_at_setup", True) is True:
            self.ResultSession().close()

    def ResultSession(self, session_manager: SessionManager | None = None) -> Session:
        manager = self.session_manager if session_manager is None else session_manager
        session: Session = super().ResultSession(manager)
        return session


if TYPE_CHECKING:
    from celery.backends.database import DatabaseBackend
elif _backends_share_one_session_manager():
    DatabaseBackend = _DatabaseBackendWithItsOwnSessions
else:
    DatabaseBackend = _CeleryDatabaseBackend


def _as_is(method: _Method) -> _Method:
    return method


#: Wraps a database result backend's ``_store_result`` the way Celery wraps its
#: own: with the module's ``retry`` decorator (three tries on a database error)
#: where Celery has one; where it has none (Celery 5.7), the backend's
#: ``always_retry`` retries every call, and this leaves the method as it is.
database_retry: Callable[[_Method], _Method] = getattr(_celery_database, "retry", _as_is)


# ------------------------------------------------------------------- drivers


def sqlstate(error: object) -> str | None:
    """The SQLSTATE code of a driver's database error, else ``None``.

    psycopg 3 names it ``sqlstate``, psycopg2 ``pgcode``; pass the driver's
    exception (a SQLAlchemy ``DBAPIError``'s ``orig``), not SQLAlchemy's.
    """
    for attribute in ("sqlstate", "pgcode"):
        code = getattr(error, attribute, None)
        if isinstance(code, str):
            return code
    return None


# ------------------------------------------------- role passwords per driver

#: PostgreSQL's default ``scram_iterations``.
SCRAM_ITERATIONS = 4096
_SCRAM_SALT_BYTES = 16


# A driver's connection exists only once the driver is imported: never import one
# to recognise its connections (tenant_celery.testing must not load psycopg).


def _is_psycopg_connection(driver_connection: object) -> bool:
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(driver_connection, psycopg.Connection)


def _is_psycopg2_connection(driver_connection: object) -> bool:
    extensions = sys.modules.get("psycopg2.extensions")
    return extensions is not None and isinstance(driver_connection, extensions.connection)


def can_set_role_password(driver_connection: object) -> bool:
    """Whether :func:`set_role_password` knows the driver of ``driver_connection``
    (psycopg 3 or psycopg2)."""
    return _is_psycopg_connection(driver_connection) or _is_psycopg2_connection(driver_connection)


def set_role_password(driver_connection: object, role: str, password: str) -> None:
    """Run ``ALTER ROLE role PASSWORD '<SCRAM-SHA-256 verifier>'`` on the DB-API
    connection, in its current transaction.

    The password is hashed on the client, so the plain text never reaches the
    server.  psycopg 3 hashes with libpq (``PQencryptPasswordConn``, as
    ``psql``'s ``\\password``); psycopg2 has no binding for it, so the verifier
    is computed by :func:`scram_sha256_verifier`, which builds the same format.
    Check :func:`can_set_role_password` first: another driver raises
    ``TypeError``.
    """
    if _is_psycopg_connection(driver_connection):
        import psycopg  # noqa: PLC0415  (loaded already: see above)
        from psycopg import sql  # noqa: PLC0415

        assert isinstance(driver_connection, psycopg.Connection)
        verifier = driver_connection.pgconn.encrypt_password(
            password.encode(), role.encode(), b"scram-sha-256"
        ).decode("ascii")
        driver_connection.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier))
        )
        return
    if not _is_psycopg2_connection(driver_connection):
        raise TypeError(f"no password hashing for a {type(driver_connection).__name__} connection")
    # psycopg2 is an optional extra: reach it through the module that made the connection.
    quote_ident = sys.modules["psycopg2.extensions"].quote_ident
    statement = f"ALTER ROLE {quote_ident(role, driver_connection)} PASSWORD %s"
    with driver_connection.cursor() as cursor:  # type: ignore[attr-defined]
        cursor.execute(statement, (scram_sha256_verifier(password),))


def scram_sha256_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, 7677).

    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``, base64 parts,
    the password prepared by :func:`saslprep` as the server prepares the one a
    client logs in with.  A random 16-byte salt unless ``salt`` is given.
    """
    salt = secrets.token_bytes(_SCRAM_SALT_BYTES) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
    stringprep.in_table_a1,
)


def saslprep(password: str) -> bytes:
    """``password`` as PostgreSQL feeds it to SCRAM: SASLprep (RFC 4013) in UTF-8.

    An ASCII password is used as it is.  Otherwise non-ASCII spaces become
    spaces, characters mapped to nothing are dropped and the text is NFKC
    normalised; a password that SASLprep refuses (prohibited, unassigned or
    badly mixed bidirectional characters) is used as it is, as the server
    does, rather than refused.
    """
    raw = password.encode("utf-8", "surrogatepass")
    if password.isascii():
        return raw
    mapped = "".join(
        " " if stringprep.in_table_c12(char) else char
        for char in password
        if not stringprep.in_table_b1(char)
    )
    prepared = unicodedata.normalize("NFKC", mapped)
    if not prepared or any(test(char) for char in prepared for test in _PROHIBITED):
        return raw
    right_to_left = [stringprep.in_table_d1(char) for char in prepared]
    if any(right_to_left) and (
        any(stringprep.in_table_d2(char) for char in prepared)
        or not (right_to_left[0] and right_to_left[-1])
    ):
        return raw
    return prepared.encode("utf-8")
