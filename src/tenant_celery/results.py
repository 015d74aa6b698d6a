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

It also stores a result in one statement.  Celery's backend reads the task's
row, locks it, inserts it if missing and then updates it through the ORM: four
round trips and an ORM flush for every state a task reports.
:class:`PooledDatabaseBackend` writes the same row with one ``INSERT ... ON
CONFLICT (task_id) DO UPDATE`` on an autocommit connection.  The database
serialises two writes of the same task, and a write that comes after the task's
``SUCCESS`` leaves that row as it is (Celery does the same from 5.5; before
5.5 a late ``RETRY`` or ``STARTED`` could replace a stored result).  The
statement is compiled once and run on the pooled connection's psycopg or
psycopg2 cursor, so a stored result costs no ORM object and no SQLAlchemy
execution context.  An engine set up to do more on execution runs it through
SQLAlchemy instead: event listeners on execution (tracing, say), statement
logging (``echo``) or a ``schema_translate_map``.

Everything else is Celery's backend unchanged: the same tables (those of
:func:`tenant_celery.migrations.upgrade`), the same columns and values in
them (and the tenant, below), reading results, groups and cleanup, the same settings
(``database_engine_options``, ``database_engine_callback``,
``database_short_lived_sessions``, ``database_table_names`` ...) and the
same retries.

Results belong to a tenant.  On tables at revision ``tc0004`` of the bundled
migration, each task result and group it stores names, in ``tenant_id``, the
tenant it was stored in: the task's, in a worker (``NULL`` outside any
tenant).  :func:`purge_results` deletes one tenant's rows.  A host that puts
the result tables under the tenant policy
(:func:`~tenant_celery.rls.enable_tenant_rls` on
:data:`~tenant_celery.migrations.RESULT_TABLES`) gets each tenant's results
visible to that tenant only: the backend sees the policy in the catalog, the
first time it uses an engine, and binds the engine with
:func:`~tenant_celery.bind_tenant_guc`, so every read and write is made in
the current tenant and none outside one.  The tenant setting is
transaction-local, so a pooled connection never carries one into the next
transaction.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import states
from celery.backends.database.session import SessionManager
from kombu.utils.encoding import ensure_bytes
from sqlalchemy import PickleType, Table, create_engine, func, insert
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import Insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement

from ._compat import DatabaseBackend, database_retry
from ._result_tables import (
    TENANT_COLUMN,
    PurgedResults,
    ResultTables,
    inspect_result_tables,
    purge_results,
    table_name,
    with_tenant,
)
from ._transaction_guard import is_guarded
from .config import guc_name
from .context import current_tenant
from .db import bind_tenant_guc
from .errors import TenantContextMissing

__all__ = [
    "PooledDatabaseBackend",
    "PooledSessionManager",
    "PurgedResults",
    "ResultTables",
    "dispose_engines",
    "purge_results",
]

EngineCallback = Callable[[Engine], object]

# One engine per (URL, engine options, callback) for the whole process, shared by
# every backend instance: Celery makes one backend per thread, and one pool per
# thread would hold connections no other thread can use.
# The callback is kept beside its engine so that its id is not reused while the key lives.
_engines: dict[tuple[str, str, int], tuple[Engine, EngineCallback | None]] = {}
_lock = threading.Lock()
# What the catalog says of the result tables, per engine and pair of table names;
# an engine a caller passed and dropped takes its entries with it.
_tables: weakref.WeakKeyDictionary[Engine, dict[tuple[str, str], ResultTables]] = (
    weakref.WeakKeyDictionary()
)


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
    every process, forked or not, a result is stored in one statement, and
    each result and group names the tenant it was stored in (see the module's
    documentation for the tenant policy).

    Unless ``database_engine_options`` is set (or passed as
    ``engine_options``), its pool does not ping a connection before each use:
    Celery from 5.5 sets ``pool_pre_ping`` by default, which costs a round
    trip per stored or read result.  A call that meets a connection the server
    has dropped fails on it instead, the pool drops its connections, and
    Celery's retry of result-backend calls runs the call again on a new one
    (storing is idempotent).  Set ``database_engine_options`` yourself,
    ``pool_pre_ping`` included if you want it, to keep full control.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_engine_options_given"] = bool(kwargs.get("engine_options"))
        super().__init__(*args, **kwargs)

    # Celery sets ``engine_options`` in __init__ and uses it there (the tables
    # are checked at setup): the setter leaves out its default pool_pre_ping as
    # it is assigned.
    @property
    def engine_options(self) -> dict[str, Any]:
        """The options of the pooled engine (``database_engine_options``)."""
        options: dict[str, Any] = self.__dict__["_engine_options"]
        return options

    @engine_options.setter
    def engine_options(self, options: dict[str, Any]) -> None:
        conf = self.app.conf  # type: ignore[attr-defined]  # not in the stubs
        if not self.__dict__.get("_engine_options_given") and not conf.value_set_for(
            "database_engine_options"
        ):
            options = {k: v for k, v in options.items() if k != "pool_pre_ping"}
        self.__dict__["_engine_options"] = options

    # Set by Celery's backend; not in its type stubs.
    url: str
    short_lived_sessions: bool
    if TYPE_CHECKING:

        def _update_result(
            self,
            task: Any,
            result: Any,
            state: str,
            traceback: str | None = ...,
            request: Any = ...,
        ) -> None: ...

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

    def ResultSession(self, session_manager: Any = None) -> Session:
        """A session on the result database, whose engine knows the result tables'
        tenancy (:meth:`result_tables`) before its first statement."""
        session: Session = super().ResultSession(session_manager)
        bind = session.get_bind()
        if isinstance(bind, Engine):
            self.result_tables(bind)
        return session

    def _engine(self) -> Engine:
        engine, _maker = self.session_manager.create_session(
            self.url, short_lived_sessions=self.short_lived_sessions, **self.engine_options
        )
        return engine

    def result_tables(self, engine: Engine | None = None) -> ResultTables:
        """What the catalog says of this backend's result tables (tenant column, policy).

        Read once per engine and process, the first time the engine is used
        (a database other than PostgreSQL has neither).
        When either table has row-level security on, the engine is bound with
        :func:`~tenant_celery.bind_tenant_guc` (the app's ``tenant_celery_guc``)
        before anything else runs on it, unless it is bound already.  A worker
        or client started before the host opted in must be restarted to see it.
        Thread-safe.
        """
        if engine is None:
            engine = self._engine()
        task: Table = self.task_cls.__table__
        group: Table = self.taskset_cls.__table__
        key = (table_name(task), table_name(group))
        found = _tables.get(engine, {}).get(key)
        if found is not None:
            return found
        with _lock:
            found = _tables.get(engine, {}).get(key)
            if found is not None:
                return found
            if engine.dialect.name != "postgresql":  # no tenant column, no policy
                found = ResultTables(
                    found=True, task_tenant=False, group_tenant=False, policy=False
                )
            else:
                with engine.connect() as connection:
                    found = inspect_result_tables(connection, task, group)
            if found.policy and not is_guarded(engine):
                app = self.app  # type: ignore[attr-defined]  # not in the stubs
                bind_tenant_guc(engine, setting=guc_name(app))
            if found.found:  # tables created later (at setup) are read again
                _tables.setdefault(engine, {})[key] = found
        return found

    @staticmethod
    def _tenant_to_store(tables: ResultTables) -> str | None:
        """The tenant a row is stored with: the current one; none is refused under the policy."""
        tenant = current_tenant()
        if tenant is None and tables.policy:
            raise TenantContextMissing(
                "the result tables are under the tenant policy, so a result stored outside "
                "any tenant would be refused by the database; store it inside "
                "tenant_context(...), or set ignore_result=True on tasks run without a tenant"
            )
        return tenant

    @database_retry
    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> None:
        """Write the task's row in one ``INSERT ... ON CONFLICT DO UPDATE``.

        The column values are Celery's own: its ``_update_result`` fills a
        plain row object, whose set attributes become the statement's
        parameters.  A row whose status is already ``SUCCESS`` is not
        updated.  The row's tenant is the current one; a later write made
        outside any tenant keeps it.

        Raises:
            TenantContextMissing: the result tables are under the tenant policy
                and no tenant is current; nothing was written.
        """
        row = _Row()
        row.task_id = task_id
        self._update_result(row, result, state, traceback=traceback, request=request)
        table: Table = self.task_cls.__table__
        values = {c.name: row.__dict__[c.name] for c in table.columns if c.name in row.__dict__}
        engine = self._engine()
        tables = self.result_tables(engine)
        if tables.task_tenant:
            values[TENANT_COLUMN] = self._tenant_to_store(tables)
            table = with_tenant(table)
        upsert = self._upsert(table, frozenset(values))
        if upsert.run_directly(engine, values):
            return
        if is_guarded(engine):
            # An engine bound with bind_tenant_guc refuses AUTOCOMMIT: one ordinary
            # transaction, which the binding gives the tenant setting ('' outside one).
            with engine.begin() as connection:
                connection.execute(upsert.statement, values)
            return
        with engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT").execute(
                upsert.statement, values
            )

    def _upsert(self, table: Table, columns: frozenset[str]) -> _Upsert:
        # Built once per table and set of columns; SQLAlchemy then reuses its compiled form.
        cache: dict[tuple[str, frozenset[str]], _Upsert] = self.__dict__.setdefault("_upserts", {})
        key = (table.fullname, columns)
        found = cache.get(key)
        if found is None:
            insert = pg_insert(table).inline()  # no RETURNING of the new id
            # Columns Celery set, and those with an update default (``date_done``),
            # which the ORM would have refreshed on update.
            updated: dict[str, ColumnElement[Any]] = {
                c.name: insert.excluded[c.name]
                for c in table.columns
                if c.name not in ("id", "task_id") and (c.name in columns or c.onupdate is not None)
            }
            if TENANT_COLUMN in updated:
                updated[TENANT_COLUMN] = func.coalesce(
                    insert.excluded[TENANT_COLUMN], table.c[TENANT_COLUMN]
                )
            statement = insert.on_conflict_do_update(
                index_elements=[table.c.task_id],
                set_=updated,
                where=table.c.status.is_distinct_from(states.SUCCESS),
            )
            found = cache[key] = _Upsert(statement, columns)
        return found

    @database_retry
    def _save_group(self, group_id: str, result: Any) -> Any:
        """Store a group's results in one ``INSERT``, with the tenant it is saved in
        (as :meth:`_store_result` does); Celery's values and defaults otherwise.

        Raises:
            TenantContextMissing: the result tables are under the tenant policy
                and no tenant is current; nothing was written.
        """
        table: Table = self.taskset_cls.__table__
        # Celery before 5.5 declares the column PickleType, which pickles the value itself.
        value = (
            result
            if isinstance(table.c.result.type, PickleType)
            else ensure_bytes(self.encode(self.prepare_value(result)))
        )
        values: dict[str, Any] = {"taskset_id": group_id, "result": value}
        engine = self._engine()
        tables = self.result_tables(engine)
        if tables.group_tenant:
            values[TENANT_COLUMN] = self._tenant_to_store(tables)
            table = with_tenant(table)
        with engine.begin() as connection:
            connection.execute(insert(table), values)
        return result


class _Row:
    """The columns Celery's ``_update_result`` sets, on a plain object.

    Celery fills an ORM instance of its task model; this takes the same
    attribute assignments without the ORM's instrumentation.  Celery 5.7 looks
    ``children`` and ``stamps`` up on the object before it sets them.
    """

    task_id: str
    children: Any = None
    stamps: Any = None


# Events SQLAlchemy would fire running a statement, on the engine and on its
# dialect; an engine with listeners on any of them has every write run through
# SQLAlchemy.
_ENGINE_EVENTS = (
    "before_execute",
    "after_execute",
    "before_cursor_execute",
    "after_cursor_execute",
)
_DIALECT_EVENTS = ("do_execute", "do_execute_no_params", "do_setinputsizes", "handle_error")
_ENGINE_LOG = logging.getLogger("sqlalchemy.engine.Engine")


def _runs_directly(engine: Engine) -> bool:
    """Whether a store may skip SQLAlchemy's execution: nothing the engine is set
    up to do on execution would be missed (listeners, statement logging, a
    schema translation map), and the driver is psycopg or psycopg2."""
    dialect = engine.dialect
    if any(getattr(engine.dispatch, name) for name in _ENGINE_EVENTS) or any(
        getattr(dialect.dispatch, name) for name in _DIALECT_EVENTS
    ):
        return False
    if engine.echo or _ENGINE_LOG.isEnabledFor(logging.INFO):
        return False
    if engine.get_execution_options().get("schema_translate_map"):
        return False
    return not dialect.positional and dialect.driver in ("psycopg", "psycopg2")


class _Upsert:
    """One result upsert: the statement, and its SQL compiled for a dialect."""

    def __init__(self, statement: Insert, columns: frozenset[str]) -> None:
        self.statement = statement
        self._columns = sorted(columns)
        self._dialect: Dialect | None = None
        # (compiled form, bind processors), or None where the compiled form needs
        # more of SQLAlchemy's execution than run_directly does.
        self._direct: tuple[SQLCompiler, dict[str, Callable[[Any], Any]]] | None = None

    def _compiled(
        self, dialect: Dialect
    ) -> tuple[SQLCompiler, dict[str, Callable[[Any], Any]]] | None:
        if self._dialect is not dialect:
            compiled = self.statement.compile(dialect=dialect, column_keys=self._columns)
            assert isinstance(compiled, SQLCompiler)
            plain = not (
                compiled.escaped_bind_names
                or compiled.insert_prefetch
                or compiled.post_compile_params
                or compiled.literal_execute_params
            )
            processors: dict[str, Callable[[Any], Any]] = {
                name: processor
                for name, bind in compiled.binds.items()
                if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect))
                is not None
            }
            self._direct = (compiled, processors) if plain else None
            self._dialect = dialect
        return self._direct

    def run_directly(self, engine: Engine, values: dict[str, Any]) -> bool:
        """Run it on a pooled connection's driver cursor, autocommit; ``False``
        (nothing done) where it must go through SQLAlchemy (:func:`_runs_directly`).

        A driver error comes out as SQLAlchemy's (``OperationalError`` ...), so
        Celery retries what it would retry.  A connection the error shows
        broken leaves the pool, and the rest of the pool is dropped with it:
        the server went away for them too.  A statement interrupted by any
        other exception (a time limit, say) takes its connection out of the
        pool, its state unknown.
        """
        if not _runs_directly(engine):
            return False
        dialect = engine.dialect
        compiled = self._compiled(dialect)
        if compiled is None:
            return False
        form, processors = compiled
        sql = form.string
        params = dict(form.construct_params(values) or {})
        for name, processor in processors.items():
            params[name] = processor(params[name])
        error_class = dialect.loaded_dbapi.Error
        hide = bool(getattr(engine, "hide_parameters", False))
        try:
            fairy = engine.raw_connection()
        except error_class as error:
            raise sa_exc.DBAPIError.instance(
                None,
                None,
                error,
                error_class,
                hide_parameters=hide,
                connection_invalidated=dialect.is_disconnect(error, None, None),
                dialect=dialect,
            ) from error
        try:
            driver: Any = fairy.driver_connection
            before = bool(driver.autocommit)
            try:
                driver.autocommit = True
                cursor = fairy.cursor()
                try:
                    cursor.execute(sql, params)
                finally:
                    cursor.close()
                driver.autocommit = before
            except error_class as error:
                broken = dialect.is_disconnect(error, fairy.dbapi_connection, None)
                if broken or not _set_autocommit(driver, before):
                    fairy.invalidate(error)
                if broken:
                    engine.dispose()
                raise sa_exc.DBAPIError.instance(
                    sql,
                    params,
                    error,
                    error_class,
                    hide_parameters=hide,
                    connection_invalidated=broken,
                    dialect=dialect,
                ) from error
            except BaseException:
                fairy.invalidate()
                raise
        finally:
            fairy.close()
        return True


def _set_autocommit(driver: Any, value: bool) -> bool:
    """Give a pooled connection back its autocommit setting; ``False`` where it cannot."""
    try:
        driver.autocommit = value
    except Exception:  # a closed or broken connection
        return False
    return True
