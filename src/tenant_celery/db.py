"""Set the tenant for PostgreSQL: one transaction-local setting per transaction.

RLS policies read the tenant from a custom setting (``app.current_tenant_id``
by default).  Everything here sets it with ``SELECT set_config(name, value,
true)``: bound parameters, and ``true`` makes it local to the current
transaction, so it is gone at commit or rollback and a pooled connection never
carries one tenant's setting into another's transaction.  That is also why
transaction-mode poolers such as PgBouncer are safe: the setting lives exactly
as long as the transaction that the pooler pins to one server connection.

Three ways in, from explicit to automatic:

* :func:`set_tenant_guc` (and :func:`async_set_tenant_guc`) inside a
  transaction you manage;
* :func:`tenant_session` (and :func:`async_tenant_session`): one transaction
  with the setting made, committed or rolled back for you;
* :func:`bind_tenant_guc`: a hook that makes the setting at the start of every
  transaction, and (with :mod:`tenant_celery._transaction_guard`) refuses any
  statement that would not see the current tenant.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, cast

from celery import current_app
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from . import _transaction_guard as _guard
from .config import guc_name
from .context import _current, parse_tenant_id, require_tenant, tenant_context
from .errors import (
    ConfigurationError,
    TenantCeleryError,
    TenantContextMissing,
    TransactionRequired,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        async_sessionmaker,
    )

__all__ = [
    "async_set_tenant_guc",
    "async_tenant_session",
    "bind_tenant_guc",
    "set_tenant_guc",
    "tenant_session",
]

_SET_CONFIG = text("SELECT set_config(:name, :value, true)")
_OWN_STATEMENTS: tuple[object, ...] = (_SET_CONFIG,)


def _resolve(tenant_id: object | None, setting: str | None) -> tuple[str, str]:
    """Validate the setting name, then the tenant (the context's when None)."""
    name = _setting(setting)
    tenant = require_tenant() if tenant_id is None else parse_tenant_id(tenant_id)
    return name, tenant


def _setting(explicit: str | None) -> str:
    """``explicit``, else the current app's ``tenant_celery_guc``, else the
    environment's ``TENANT_CELERY_GUC``, else :data:`~tenant_celery.DEFAULT_GUC`."""
    return guc_name(current_app, explicit)


def _check_transaction(conn: Connection) -> None:
    if not conn.in_transaction():
        raise TransactionRequired
    # SQLAlchemy reports a transaction on an AUTOCOMMIT connection, but the
    # server ends it after every statement: the setting would vanish at once.
    if conn._is_autocommit_isolation():
        raise TransactionRequired(
            "the connection is in AUTOCOMMIT mode, so a transaction-local setting would "
            "end with its own statement; use a connection without AUTOCOMMIT"
        )


def set_tenant_guc(
    target: Connection | Session, tenant_id: object | None = None, *, setting: str | None = None
) -> str:
    """Set the tenant setting for the rest of the current transaction; return the tenant.

    ``target`` is a :class:`~sqlalchemy.engine.Connection` inside a
    transaction, or a :class:`~sqlalchemy.orm.Session` (its autobegin counts;
    one created with ``autobegin=False`` must have begun).
    ``tenant_id`` defaults to the current tenant context.  ``setting`` defaults
    to the ``tenant_celery_guc`` setting of the current Celery app, then the
    ``TENANT_CELERY_GUC`` environment variable, then ``app.current_tenant_id``.

    Raises:
        ConfigurationError: ``setting`` is not a ``prefix.name`` setting name
            (raised before any SQL).
        TenantContextMissing: no ``tenant_id`` and no tenant context.
        InvalidTenantId: ``tenant_id`` is malformed.
        TransactionRequired: ``target`` has no transaction open, or its
            connection is in AUTOCOMMIT mode (a Session's included).
    """
    name, tenant = _resolve(tenant_id, setting)
    conn = target.connection() if isinstance(target, Session) else target
    _check_transaction(conn)
    conn.execute(_SET_CONFIG, {"name": name, "value": tenant})
    found = _guard.transaction_of(conn)
    if found is not None:  # a bound target's transaction now serves this tenant
        found.tenant = tenant
    return tenant


async def async_set_tenant_guc(
    target: AsyncConnection | AsyncSession,
    tenant_id: object | None = None,
    *,
    setting: str | None = None,
) -> str:
    """Async :func:`set_tenant_guc`: same rules, same errors.

    ``target`` is an :class:`~sqlalchemy.ext.asyncio.AsyncConnection` inside a
    transaction or an :class:`~sqlalchemy.ext.asyncio.AsyncSession`.  Needs the
    ``asyncio`` extra.
    """
    from sqlalchemy.ext.asyncio import AsyncSession  # noqa: PLC0415 (needs greenlet)

    name, tenant = _resolve(tenant_id, setting)
    conn = await target.connection() if isinstance(target, AsyncSession) else target
    if conn.sync_connection is None:  # not even connected yet
        raise TransactionRequired
    _check_transaction(conn.sync_connection)
    await conn.execute(_SET_CONFIG, {"name": name, "value": tenant})
    return tenant


@contextmanager
def tenant_session(
    session_factory: Callable[[], Session],
    tenant_id: object | None = None,
    *,
    setting: str | None = None,
) -> Iterator[Session]:
    """One transaction for one tenant: a session with the tenant setting made.

    The tenant (``tenant_id``, else the current context) is checked before a
    session is opened, and is the current tenant inside the block.  On a clean
    exit the transaction commits; on an exception it rolls back and the
    exception propagates.  The session is closed either way.

    Raises:
        ConfigurationError: the setting name is not ``prefix.name``; before any
            session is opened.
        TenantContextMissing: no ``tenant_id`` and no tenant context; before
            any session is opened.
        InvalidTenantId: ``tenant_id`` is malformed; before any session is opened.
        TransactionRequired: the factory's sessions use an AUTOCOMMIT
            connection; nothing is committed.
    """
    name, tenant = _resolve(tenant_id, setting)
    with tenant_context(tenant), session_factory() as session, session.begin():
        set_tenant_guc(session, tenant, setting=name)
        yield session


@asynccontextmanager
async def async_tenant_session(
    session_factory: Callable[[], AsyncSession],
    tenant_id: object | None = None,
    *,
    setting: str | None = None,
) -> AsyncIterator[AsyncSession]:
    """:func:`tenant_session` for :class:`~sqlalchemy.ext.asyncio.AsyncSession`."""
    name, tenant = _resolve(tenant_id, setting)
    with tenant_context(tenant):
        async with session_factory() as session, session.begin():
            await async_set_tenant_guc(session, tenant, setting=name)
            yield session


# --- the automatic hook ------------------------------------------------------

# target -> (setting, strict) it is bound with; weak so engines can be collected
_bound: weakref.WeakKeyDictionary[Any, tuple[str, bool]] = weakref.WeakKeyDictionary()


def _is_autocommit(conn: Connection) -> bool:
    """Whether every statement on ``conn`` is its own transaction (SQLAlchemy's
    isolation level, or the driver's own switch turned on behind its back)."""
    if conn._is_autocommit_isolation():
        return True
    return getattr(conn.connection.dbapi_connection, "autocommit", False) is True


class _Begin:
    """What a binding does when a transaction begins: refuse it, or set its tenant."""

    def __init__(self, name: str, strict: bool) -> None:
        self.name = name
        self.strict = strict

    def tenant_for(self, conn: Connection) -> str | None:
        """The tenant the new transaction serves; raise if it must not begin."""
        if _is_autocommit(conn):
            raise TransactionRequired(
                "a transaction began in AUTOCOMMIT mode on a bind_tenant_guc target: "
                "the tenant setting would end with its own statement and the next ones "
                "would run with whatever the server session holds; use a connection "
                "without AUTOCOMMIT, or an engine that is not bound"
            )
        tenant = _current.get()
        if tenant is None and self.strict:
            raise TenantContextMissing(
                "a transaction began outside any tenant on a strict bind_tenant_guc "
                "target; begin it inside tenant_context(...)"
            )
        return tenant

    def begin(self, conn: Connection, session: Session | None = None) -> None:
        """Record the tenant (or '' outside one: a session-level value must not show);
        its setting goes with the transaction's first statement (:mod:`._setting`).

        Runs when the transaction's first statement does (two-phase ones
        included), or when a Session begins it.
        """
        try:
            tenant = self.tenant_for(conn)
        except TenantCeleryError as exc:
            # Every statement of the transaction is refused until it ends.
            _guard.refuse(conn, exc, session)
            raise
        _guard.begin(conn, tenant, (self.name, tenant or ""), session)

    def after_begin(
        self, session: Session, transaction: SessionTransaction, conn: Connection
    ) -> None:
        if transaction.nested:
            return  # a SAVEPOINT belongs to its transaction, checked statement by statement
        _guard.guard(conn.engine, self.name, _OWN_STATEMENTS)
        self.begin(conn, session)  # a refusal leaves the Session's transaction open, fenced


def bind_tenant_guc(
    target: Engine | AsyncEngine | sessionmaker[Any] | async_sessionmaker[Any],
    *,
    setting: str | None = None,
    strict: bool = False,
) -> Callable[[], None]:
    """Give every transaction of ``target`` the current tenant, and refuse what would not see it.

    ``target`` is an :class:`~sqlalchemy.engine.Engine`,
    :class:`~sqlalchemy.ext.asyncio.AsyncEngine`,
    :class:`~sqlalchemy.orm.sessionmaker` or
    :class:`~sqlalchemy.ext.asyncio.async_sessionmaker`.  What holds from then on:

    * Each transaction (two-phase ones included) makes the setting
      transaction-local before its first statement, with the current tenant,
      or with ``''`` outside any tenant, so that a session-level value left on
      the server connection (by other code, or by another client through a
      transaction-mode pooler) is never seen.  It costs no round trip of its
      own on psycopg 3 (``SET LOCAL setting = 'tenant'`` in one message with
      ``BEGIN``) and psycopg2 (in one message with the first statement).
      Other drivers, on psycopg2 an ``executemany`` or a server-side cursor
      as the first statement, and on psycopg 3 a transaction begun on the
      DBAPI connection behind SQLAlchemy's back, a pipeline or a two-phase
      transaction, get ``SELECT set_config(setting, tenant, true)`` as a
      statement of its own.  A statement sent on the DBAPI connection
      directly, before the first one SQLAlchemy runs, runs without it.  With
      ``strict=True`` a transaction begun outside any tenant raises
      :class:`~tenant_celery.TenantContextMissing` instead, at its first
      statement.  An engine's binding reads the tenant at each transaction's
      first statement, a session factory's when a session begins one; it
      listens at the dialect's execution points, never with connection
      events, which would cost every connection of the engine tens of
      microseconds a transaction.
    * A transaction in ``AUTOCOMMIT`` mode raises
      :class:`~tenant_celery.TransactionRequired` at its first statement,
      whatever ``strict`` says: the setting would last one statement.  A
      refused transaction refuses every statement until it is rolled back.
    * The transaction records the tenant it began under.  A statement run
      while the current tenant is another one (or none), a SAVEPOINT
      included, raises :class:`~tenant_celery.TransactionTenantMismatch`
      before it reaches the server; the transaction stays open.
      :func:`set_tenant_guc` on such a transaction records its tenant
      instead.  The check costs no round trip.
    * A transaction still open when a Celery task ends (any pool, eager
      mode, a plain task too) is rolled back, through its Session when it has
      one, and a warning names the task.  Async connections are refused
      statement by statement but not rolled back there.
    * A pooled connection that may hold a session-level value of the setting
      (after ``engine.raw_connection()``, or a statement that calls
      ``set_config`` or runs ``SET setting``) has it cleared when it goes back
      to the pool; the others cost no statement there.

    On a session factory these hold for its sessions only.  A session whose
    transaction was refused stays refused, every statement included, until it
    is rolled back or closed.

    ``setting`` is chosen as in :func:`set_tenant_guc`, once, when this is
    called: create and configure the Celery app first.

    Binding the same target again with the same options does nothing; with
    other options it raises :class:`~tenant_celery.ConfigurationError`.

    Returns:
        A function that removes the hook.  Transactions begun before it was
        called are still checked and rolled back as above.
    """
    name = _setting(setting)
    is_engine = isinstance(target, Engine) or _is_async(target, "AsyncEngine")
    if not (
        is_engine or isinstance(target, sessionmaker) or _is_async(target, "async_sessionmaker")
    ):
        raise TypeError(
            "bind_tenant_guc() takes an Engine, AsyncEngine, sessionmaker or "
            f"async_sessionmaker, got {type(target).__name__}"
        )
    previous = _bound.get(target)
    if previous is not None:
        if previous != (name, strict):
            raise ConfigurationError(
                f"this target is already bound with setting={previous[0]!r}, "
                f"strict={previous[1]}; unbind it before binding it differently"
            )
        return lambda: None
    hook = _Begin(name, strict)
    if is_engine:
        engine = target if isinstance(target, Engine) else cast("AsyncEngine", target).sync_engine
        _guard.guard(engine, name, _OWN_STATEMENTS)
        remove = _guard.add_hook(engine, hook.begin)
    else:
        listened = _session_class(cast("sessionmaker[Any] | async_sessionmaker[Any]", target))
        event.listen(listened, "after_begin", hook.after_begin)

        def remove() -> None:
            if event.contains(listened, "after_begin", hook.after_begin):
                event.remove(listened, "after_begin", hook.after_begin)

    def unbind() -> None:
        remove()
        _bound.pop(target, None)

    _bound[target] = (name, strict)
    return unbind


def _is_async(target: object, name: str) -> bool:
    """Whether ``target`` is an instance of ``sqlalchemy.ext.asyncio.<name>``,
    without importing that module (it needs greenlet) unless it is in use."""
    module = sys.modules.get("sqlalchemy.ext.asyncio")
    return module is not None and isinstance(target, getattr(module, name))


def _session_class(maker: sessionmaker[Any] | async_sessionmaker[Any]) -> Any:
    """What to listen on for ``maker``'s sessions only.

    A sessionmaker is an event target itself.  An async_sessionmaker is not: its
    sessions wrap a sync Session class, so give it a subclass of its own.
    """
    if isinstance(maker, sessionmaker):
        return maker
    base: type[Session] = maker.kw.get("sync_session_class") or Session
    own = type(f"TenantGUC{base.__name__}", (base,), {})
    maker.configure(sync_session_class=own)
    return own
