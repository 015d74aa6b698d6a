"""Celery's database result backend on a pooled SQLAlchemy engine.

Celery's :class:`~celery.backends.database.DatabaseBackend` builds a new
engine with ``NullPool`` for every result it stores or reads in a process that
has not forked: the solo and threads pools, the main process of a prefork
worker, and every client calling ``AsyncResult.get()``.  Each call then pays
for a new engine and a new database connection.  :class:`PooledDatabaseBackend`
keeps one pooled engine per database URL (and engine options) per process
instead, and starts afresh in a forked child.  Select it by its class path::

    result_backend = "tenant_celery.results:PooledDatabaseBackend"
    database_url = "postgresql+psycopg://app_user:secret@db.internal/app"
    database_engine_options = {"pool_size": 5, "max_overflow": 5}

Everything else is Celery's backend unchanged: the same tables (those of
:func:`tenant_celery.migrations.upgrade`), the same settings
(``database_engine_options``, ``database_engine_callback``,
``database_short_lived_sessions``, ``database_table_names`` ...) and the
same retries.  Result rows belong to no tenant and the result tables carry
no row-level security policy; the tenant setting is transaction-local, so a
pooled connection never carries one into the next transaction.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable
from typing import Any

from celery.backends.database.session import SessionManager
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from ._compat import DatabaseBackend

__all__ = [
    "PooledDatabaseBackend",
    "PooledSessionManager",
    "dispose_engines",
]

EngineCallback = Callable[[Engine], object]

# One engine per (URL, engine options, callback) for the whole process, shared by
# every backend instance: Celery makes one backend per thread, and one pool per
# thread would hold connections no other thread can use.
# The callback is kept beside its engine so that its id is not reused while the key lives.
_engines: dict[tuple[str, str, int], tuple[Engine, EngineCallback | None]] = {}
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A lock another thread held at fork time would stay held in the child forever.
    global _lock  # noqa: PLW0603
    _lock = threading.Lock()
    # The parent's connections are the parent's: forget them without closing
    # their sockets, so the parent's sessions are not cut off under it.
    for engine, _callback in _engines.values():
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):  # POSIX; there is no fork elsewhere
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _engine_for(dburi: str, options: dict[str, Any], callback: EngineCallback | None) -> Engine:
    key = (dburi, repr(sorted(options.items())), id(callback))
    with _lock:
        found = _engines.get(key)
        if found is not None:
            return found[0]
        engine = create_engine(dburi, **options)
        if callback is not None:
            callback(engine)
        _engines[key] = (engine, callback)
        return engine


def dispose_engines() -> None:
    """Close every pooled connection the result backends of this process hold.

    The engines stay usable and connect again when next needed.  It runs at
    interpreter exit by itself; call it where connections must be given back
    earlier, e.g. before a database is dropped.  Thread-safe.
    """
    with _lock:
        engines = [engine for engine, _callback in _engines.values()]
    for engine in engines:
        engine.dispose()


atexit.register(dispose_engines)


class PooledSessionManager(SessionManager):
    """Celery's session manager with one pooled engine per URL and options, per process.

    Engines are shared by every manager in the process, built with the
    backend's engine options as given (Celery's own manager drops the
    ``pool_*`` options outside a forked child) and passed to
    ``engine_callback`` once, when created.  In a forked child the parent's
    pools are dropped without closing the parent's connections, and new ones
    open on first use.  Thread-safe.
    """

    def __init__(self, engine_callback: EngineCallback | None = None) -> None:
        super().__init__()
        self.engine_callback: EngineCallback | None = engine_callback
        self._makers: dict[str, sessionmaker[Session]] = {}
        self._options: dict[str, dict[str, Any]] = {}

    def get_engine(self, dburi: str, **kwargs: Any) -> Engine:
        """The process's engine for ``dburi`` with these options, created on first use."""
        self._options[dburi] = kwargs
        return _engine_for(dburi, kwargs, self.engine_callback)

    def create_session(
        self, dburi: str, short_lived_sessions: bool = False, **kwargs: Any
    ) -> tuple[Engine, sessionmaker[Session]]:
        """The engine and a session factory bound to it (a new factory each call
        with ``short_lived_sessions``, as in Celery)."""
        engine = self.get_engine(dburi, **kwargs)
        maker = self._makers.get(dburi)
        if short_lived_sessions or maker is None or maker.kw.get("bind") is not engine:
            maker = sessionmaker(bind=engine)
            self._makers[dburi] = maker
        return engine, maker

    def invalidate(self, dburi: str) -> None:
        """Close the pooled connections to ``dburi``; Celery calls this after a
        database error it will retry, so the retry starts on fresh connections."""
        self._makers.pop(dburi, None)
        options = self._options.get(dburi)
        if options is not None:
            _engine_for(dburi, options, self.engine_callback).dispose()


class PooledDatabaseBackend(DatabaseBackend):
    """Celery's database result backend, on :class:`PooledSessionManager`.

    Configure it with ``result_backend =
    "tenant_celery.results:PooledDatabaseBackend"`` and the database in
    ``database_url``.  It takes every setting and argument
    :class:`~celery.backends.database.DatabaseBackend` takes and behaves the
    same, except that results are stored and read over a connection pool in
    every process, forked or not.
    """

    # Celery assigns ``self.session_manager = SessionManager(...)`` in __init__ and
    # uses it there (to check the tables): the setter swaps in the pooled manager
    # as it is assigned, so no call ever goes through a NullPool engine.
    @property
    def session_manager(self) -> PooledSessionManager:
        """The pooled session manager every result session comes from."""
        manager: PooledSessionManager = self.__dict__["_pooled_session_manager"]
        return manager

    @session_manager.setter
    def session_manager(self, manager: SessionManager) -> None:
        if not isinstance(manager, PooledSessionManager):
            manager = PooledSessionManager(getattr(manager, "engine_callback", None))
        self.__dict__["_pooled_session_manager"] = manager
