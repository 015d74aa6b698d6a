"""Where the supported releases of Celery, kombu, SQLAlchemy and the drivers differ.

Every place where the package must behave differently on an older release of
a dependency, or on the other PostgreSQL driver, goes through this module, so
the supported range can be read in one file and each difference has a test of
its own (``test_compat.py`` in ``tests/unit``, and in ``tests/integration``
for what needs a server).  The range, and the differences the package cannot
smooth over, are listed on the compatibility page of the docs.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import celery.backends.database as _celery_database
from celery import Task
from celery.backends.database import DatabaseBackend as _CeleryDatabaseBackend
from celery.backends.database.session import SessionManager
from celery.exceptions import ImproperlyConfigured
from kombu.utils.imports import symbol_by_name

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["DatabaseBackend", "GenericTask", "database_retry", "sqlstate"]

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
    does; :class:`~tenant_celery.results.PooledSessionManager` calls it.
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
#: own.  Before Celery 5.5 that is the module's ``retry`` decorator (three tries
#: on a database error); from 5.5 the backend's ``always_retry`` retries every
#: call, and this leaves the method as it is.
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
