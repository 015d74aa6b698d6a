"""Short, bounded calls the worker monitor makes to the broker and the database.

Which broker an app uses, engines that open a new connection with a connect
timeout, a deadline for calls that might still hang, and errors described
in one line without the URL's password.  ``/health``'s checks and the queue
gauges of ``/metrics`` share them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from celery import Celery
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from ._pg import database_url
from .errors import ConfigurationError

_MAX_ERROR = 300
#: ``broker_transport`` values that name the package's transport.
_OWN_TRANSPORT = frozenset(
    {"tcpg", "tenant_celery.transport:Transport", "tenant_celery.transport.Transport"}
)


def broker_url(app: Celery) -> str:
    """The first URL of the app's write broker (a failover list's first)."""
    url: object = app.conf.get("broker_write_url") or app.conf.get("broker_url") or ""
    if isinstance(url, (list, tuple)):
        url = url[0] if url else ""
    return str(url).split(";")[0].strip()


def owns_transport(app: Celery) -> bool:
    """Whether the app's broker is the package's transport: a ``tcpg+`` URL, or
    ``broker_transport`` naming it."""
    if broker_url(app).startswith("tcpg+"):
        return True
    transport: object = app.conf.get("broker_transport")
    if isinstance(transport, str):
        return transport in _OWN_TRANSPORT
    return getattr(transport, "__module__", None) == "tenant_celery.transport"


def sql_broker(app: Celery) -> str | None:
    """The SQLAlchemy URL of the app's broker when its messages are in a database
    (the package's transport, or kombu's SQLAlchemy transport), else ``None``."""
    url = broker_url(app)
    for prefix in ("sqla+", "sqlalchemy+"):
        if url.startswith(prefix):
            return url[len(prefix) :]
    if owns_transport(app):
        libpq = url[len("tcpg+") :] if url.startswith("tcpg+") else url
        return database_url(libpq).render_as_string(hide_password=False)
    return None


def engine(what: str, url: str, timeout: float) -> Engine:
    """An engine that opens a new connection for every use, with a connect timeout.

    Raises:
        ConfigurationError: SQLAlchemy cannot use ``url``; the message names
            ``what`` and never shows the URL, which may hold a password.
    """
    try:
        parsed = make_url(url)
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql":
            connect_args["connect_timeout"] = max(1, round(timeout))
        return sa.create_engine(parsed, poolclass=sa.NullPool, connect_args=connect_args)
    except Exception as exc:  # ArgumentError, NoSuchModuleError, a missing driver
        detail = "it does not parse" if isinstance(exc, ArgumentError) else str(exc)
        raise ConfigurationError(
            f"the {what} URL cannot be used by SQLAlchemy ({type(exc).__name__}: {detail}); "
            "it must look like dialect+driver://user:password@host/database"
        ) from None


def password(url: str | None) -> str | None:
    """The password in ``url``, to be kept out of error descriptions."""
    if not url:
        return None
    with contextlib.suppress(Exception):
        return urlsplit(url).password
    return None


def describe(exc: BaseException, secret: str | None) -> str:
    """A one-line description of a failed call, without the URL's password."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = " ".join(f"{type(cause).__name__}: {cause}".split())
    if secret:
        text = text.replace(secret, "***")
    return text[:_MAX_ERROR]


class TimedOut:
    """A call still running at its deadline."""


def run_with_deadline(
    calls: dict[str, Callable[[], None]], deadline: float
) -> dict[str, BaseException | TimedOut | None]:
    """Run each call on its own thread: ``None`` for success, else the exception,
    or :class:`TimedOut` when it was still running at the deadline (its thread is
    left to finish on its own; a daemon thread cannot be killed)."""
    results: dict[str, BaseException | None] = {}

    def run(name: str, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as exc:
            results[name] = exc
        else:
            results[name] = None

    threads = [
        threading.Thread(target=run, args=item, name=f"tenant-celery-check-{item[0]}", daemon=True)
        for item in calls.items()
    ]
    end = time.monotonic() + deadline
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    return {name: results[name] if name in results else TimedOut() for name in calls}
