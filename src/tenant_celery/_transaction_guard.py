"""What keeps a bound engine's connections from carrying a tenant where it does not belong.

:func:`~tenant_celery.bind_tenant_guc` sets the tenant when a transaction
begins; this module holds the rest of the contract (DESIGN rule 7), for every
engine a binding reaches:

* each transaction of a bound engine or session gets a :class:`_Transaction`
  record on its :class:`~sqlalchemy.engine.Connection`: the tenant it serves
  (``None`` outside any tenant), made when the transaction's first statement
  runs (or when a Session begins it), by the binding's hooks;
* before each statement, the record is compared with the current tenant and
  the statement refused on a difference: no round trip, nothing reaches the
  server (:func:`_EngineGuard.check_statement`);
* a record names the transaction it serves, so a new transaction on the same
  connection gets a new record; a transaction still open when a Celery task
  ends is rolled back and logged (:func:`_end_task`);
* a pooled connection that may carry a session-level tenant setting (a raw
  DBAPI checkout, or a statement naming the setting or ``set_config``) has
  it cleared when it is returned to the pool, with one statement; the others
  cost nothing there (:func:`_EngineGuard.reset`).  A checkout is raw unless a
  transaction of a Connection began on it: the mark is made then, so the pool
  needs no ``checkout`` listener (whose dispatch every checkout would pay).

A guard, once installed on an engine, stays: without records it only watches
raw checkouts and statements that name the setting.

The guard listens at the dialect's ``do_execute`` points and on the pool, never
with SQLAlchemy's connection events: one connection event on an engine makes
SQLAlchemy dispatch at every statement, begin and commit of every connection,
tens of microseconds a transaction whatever the listeners do.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from celery.signals import task_postrun, task_prerun
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ._setting import Setting, send_before
from .context import _current, current_tenant
from .errors import ConfigurationError, TenantCeleryError, TransactionTenantMismatch

if TYPE_CHECKING:
    from sqlalchemy.engine import ExceptionContext
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState

logger = logging.getLogger("tenant_celery.db")

# Name of the record's attribute on a Connection: one attribute read per statement
# (Connection.info would be several property calls, and may reconnect).
_ATTR = "_tenant_celery_transaction"
# Flags in the pool record's info, cleared at each check-in: a Connection's transaction
# began on this checkout (else it was a raw one, which may leave a session-level
# setting), and a statement may have left a session-level setting.
_WORKED = "tenant_celery.connection_checkout"
_DIRTY = "tenant_celery.setting_touched"
# Statement texts whose scan is remembered per engine (then forgotten all at once).
_SCANNED_MAX = 2048
# A statement that ends the server's transaction and lets the next one begin another
# (not ROLLBACK TO a savepoint; not PREPARE TRANSACTION, after which only COMMIT or
# ROLLBACK PREPARED follow, which must run alone).
_ENDS_TRANSACTION = re.compile(
    r"\s*(?:commit|end|abort|rollback(?!\s+(?:work\s+|transaction\s+)?to\b))\b(?!\s+prepared)"
)


class _Transaction:
    """The tenant one transaction of a bound engine serves, and who may end it."""

    __slots__ = (
        "__weakref__",
        "checked",
        "connection",
        "frame",
        "pending",
        "refused",
        "sending",
        "session",
        "settings",
        "tenant",
        "transaction",
    )

    def __init__(self, connection: Connection, tenant: str | None, checked: bool = True) -> None:
        # Held weakly: a record lives as long as its connection, which holds it.
        self.connection = weakref.ref(connection)
        #: The transaction served; a statement in another one makes a new record.
        transaction = connection.get_transaction()
        self.transaction = _none if transaction is None else weakref.ref(transaction)
        self.tenant = tenant
        #: Whether statements are checked against ``tenant``: not for a transaction
        #: no binding has a hook for (a Session not bound, on a guarded engine).
        self.checked = checked
        #: Why the binding refused this transaction: every statement is refused too.
        self.refused: TenantCeleryError | None = None
        self.session: Session | None = None
        self.frame: _TaskFrame | None = None
        #: The settings to send with the transaction's first statement (see
        #: :mod:`tenant_celery._setting`); ``None`` once they were sent.
        self.pending: tuple[Setting, ...] | None = None
        #: The settings sent with the statement being executed: pending again if
        #: that statement fails (it may not have reached the server).
        self.sending: tuple[Setting, ...] | None = None
        #: All the transaction's settings: pending again after a statement that
        #: ends the server's transaction behind SQLAlchemy's back (``COMMIT`` as SQL).
        self.settings: tuple[Setting, ...] | None = None

    def serves(self, connection: Connection) -> bool:
        """Whether this record is of ``connection``'s current transaction."""
        return self.transaction() is connection.get_transaction()

    def refusal(self) -> TenantCeleryError:
        if self.refused is not None:
            return type(self.refused)(
                f"{self.refused}; statements here stay refused until the transaction is "
                "rolled back (session.rollback(), or leaving its with block) or a new one "
                "is begun explicitly with conn.begin()"
            )
        if self.tenant is None:
            where = "began outside any tenant and the statement runs inside one"
        elif current_tenant() is None:
            where = "began inside a tenant and the statement runs outside any"
        else:
            where = "began under one tenant and the statement runs under another"
        return TransactionTenantMismatch(
            f"this transaction {where}, so the statement was refused; commit or roll the "
            "transaction back, then begin a new one inside the tenant it is for"
        )


def _none() -> None:
    return None


class _TaskFrame:
    """The transactions begun by bound engines while one task runs."""

    __slots__ = ("compact_at", "name", "refs", "task_id")

    def __init__(self, task_id: str | None, name: str) -> None:
        self.task_id = task_id
        self.name = name
        # Weak references without callbacks (cheaper than a WeakSet's, at every
        # transaction): a record goes with its connection, and a task may open
        # thousands, so the dead references are dropped now and then (add).
        self.refs: list[weakref.ref[_Transaction]] = []
        self.compact_at = _COMPACT_AT

    def add(self, tx: _Transaction) -> None:
        refs = self.refs
        refs.append(weakref.ref(tx))
        if len(refs) >= self.compact_at:
            refs[:] = [weakref.ref(held) for held in self.open()]
            self.compact_at = max(_COMPACT_AT, 2 * len(refs))

    def open(self) -> list[_Transaction]:
        """The records this task's transactions still have (an open one has its record)."""
        return [tx for ref in self.refs if (tx := ref()) is not None and tx.frame is self]


# A task's list of references to records is compacted when it reaches this length,
# then when it reaches twice what was left.
_COMPACT_AT = 64


# Tasks running in this context, innermost last (eager tasks nest).
_frames: ContextVar[tuple[_TaskFrame, ...]] = ContextVar("tenant_celery.task_frames", default=())


def transaction_of(connection: Connection) -> _Transaction | None:
    """The record of ``connection``'s current transaction, if a binding began it."""
    found: _Transaction | None = connection.__dict__.get(_ATTR)
    if found is None or not found.checked or not found.serves(connection):
        return None
    return found


def record(
    connection: Connection,
    tenant: str | None,
    session: Session | None = None,
    *,
    checked: bool = True,
) -> _Transaction:
    """Record that ``connection``'s transaction serves ``tenant``; track it in the task."""
    tx = _Transaction(connection, tenant, checked)
    tx.session = session
    if checked:
        frames = _frames.get()
        if frames:
            tx.frame = frame = frames[-1]
            frame.add(tx)
    previous = connection.__dict__.get(_ATTR)
    if previous is not None:
        _forget(previous)
    connection.__dict__[_ATTR] = tx
    return tx


def begin(
    connection: Connection, tenant: str | None, setting: Setting, session: Session | None = None
) -> None:
    """Record that ``connection``'s transaction serves ``tenant``, with ``setting`` to make first.

    An engine and a session factory on it may both be bound: the second hook
    of one transaction adds its setting to the first's, unsent yet.  A Session
    beginning a transaction on a bound engine has the engine's hooks run first.
    """
    previous = connection.__dict__.get(_ATTR)
    if previous is not None and not previous.serves(connection):
        previous = None
    if previous is None and session is not None:
        found = _guard_of(connection.dialect)
        if found is not None and found.hooks:
            previous = found.start(connection)
    tx = record(connection, tenant, session)
    settings: tuple[Setting, ...] = (setting,)
    if previous is not None and previous.pending is not None and previous.tenant == tenant:
        settings = (*(s for s in previous.pending if s[0] != setting[0]), setting)
    tx.pending = tx.settings = settings


def refuse(
    connection: Connection, reason: TenantCeleryError, session: Session | None = None
) -> None:
    """Refuse every statement of ``connection``'s transaction until it ends."""
    record(connection, None, session).refused = reason


def _forget(tx: _Transaction) -> None:
    tx.frame = None  # its task no longer counts it (see _TaskFrame.open)


def clear(connection: Connection) -> None:
    """Stop checking the statements of ``connection``'s current transaction."""
    record(connection, None, checked=False)


# --- engines -----------------------------------------------------------------

_guards: weakref.WeakKeyDictionary[Engine, _EngineGuard] = weakref.WeakKeyDictionary()
# The guard is also an attribute of its dialect, which an engine's execution_options()
# copies share: read where a Session begins a transaction, on every engine.
_GUARD_ATTR = "_tenant_celery_guard"


def _guard_of(dialect: Any) -> _EngineGuard | None:
    """The guard of ``dialect``'s engines, if one was installed."""
    found: _EngineGuard | None = dialect.__dict__.get(_GUARD_ATTR)
    return found


Hook = Callable[[Connection], None]
"""An engine binding's hook: records (or refuses) a new transaction on the connection."""


class _EngineGuard:
    """The listeners one engine gets, once, whatever binds it."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.own: tuple[object, ...] = ()
        #: The engine bindings' hooks, run at each transaction's first statement.
        self.hooks: list[Hook] = []
        #: The dialect's class-level listeners of the execution points (live deques):
        #: SQLAlchemy runs them before the guard's, so one may send a statement unchecked.
        self.ahead: tuple[Any, ...] = ()
        self._needles: tuple[str, ...] = ("set_config",)
        self._set_statement: re.Pattern[str] | None = None
        # statement text -> its lowercase form when it names a needle, else None:
        # SQLAlchemy sends the same few texts again and again
        self._scanned: dict[str, tuple[str | None, bool]] = {}

    def add_name(self, name: str) -> None:
        self.names.add(name)
        self._needles = ("set_config", *sorted(self.names))
        self._scanned = {}
        names = "|".join(re.escape(n) for n in sorted(self.names))
        # SET [SESSION] name: what leaves a session-level value (SET LOCAL does not).
        self._set_statement = re.compile(rf'\bset\s+(?:session\s+)?"?(?:{names})\b')

    def start(self, conn: Connection) -> _Transaction:
        """The record of ``conn``'s new transaction, made by the engine bindings' hooks.

        A hook refusing the transaction records the refusal and raises.
        """
        # A Connection works on this checkout: it is not a raw one (see reset).
        conn.connection.info[_WORKED] = True
        if any(self.ahead):  # added after the binding: refuse rather than be skipped
            raise _ahead_error("an execution point")
        if not self.hooks:
            return record(conn, None, checked=False)
        for hook in self.hooks:
            hook(conn)
        found: _Transaction = conn.__dict__[_ATTR]
        return found

    def check_statement(
        self, conn: Connection, cursor: Any, statement: str, context: Any, executemany: bool
    ) -> str:
        """Refuse ``statement`` or return it as it must be sent (settings ahead of it)."""
        tx = conn.__dict__.get(_ATTR)
        transaction = conn.get_transaction()
        if transaction is None:
            if not conn._allow_autobegin:
                return statement  # SQLAlchemy's own first-connect queries (server version)
            # A statement run while a transaction begins (a host's "begin" listener):
            # it is in the transaction to come, and gets its tenant and setting too,
            # with a record of its own (the transaction has no object to name yet).
            tx = self.start(conn)
        elif tx is None or tx.transaction() is not transaction:
            tx = self.start(conn)
        if tx.checked:
            tx.sending = None
            if tx.refused is not None or tx.tenant != _current.get():
                raise tx.refusal()
            if tx.pending is not None:  # the transaction's first statement
                settings, tx.pending, tx.sending = tx.pending, None, tx.pending
                try:
                    sent = send_before(conn, cursor, statement, executemany, settings)
                except BaseException:
                    _unsent(tx)
                    raise
                self._note(conn, statement, context, tx)
                return sent
        self._note(conn, statement, context, tx)
        return statement

    # The dialect's execution points: a statement rewritten with its settings
    # ahead is executed here, as the dialect would execute it.

    def do_execute(self, cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        if context is None:
            raise _no_context()
        conn: Connection = context.root_connection
        sent = self.check_statement(conn, cursor, statement, context, False)
        if sent is statement:
            return False
        try:
            context.dialect.do_execute(cursor, sent, parameters, context)
        except BaseException:
            _unsent(conn.__dict__.get(_ATTR))
            raise
        return True

    def do_execute_no_params(self, cursor: Any, statement: str, context: Any) -> bool:
        conn = _connection_of(context)
        sent = self.check_statement(conn, cursor, statement, context, False)
        if sent is statement:
            return False
        try:
            context.dialect.do_execute_no_params(cursor, sent, context)
        except BaseException:
            _unsent(conn.__dict__.get(_ATTR))
            raise
        return True

    def do_executemany(self, cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        # An executemany is never rewritten: its settings go as a statement of their own.
        self.check_statement(_connection_of(context), cursor, statement, context, True)
        return False

    @staticmethod
    def failed(context: ExceptionContext) -> None:
        """A statement failed: a setting sent with it is pending again (``handle_error``).

        Sending it twice is harmless; a statement after one that failed before
        anything reached the server must not run without it.  The guard's own
        execution points do this too (:func:`_unsent`): a host's ``handle_error``
        listener that raises stops the ones after it, and the
        ``skip_user_error_events`` option skips them all.
        """
        conn = context.connection
        _unsent(conn.__dict__.get(_ATTR) if conn is not None else None)

    def _note(self, conn: Connection, statement: str, context: Any, tx: _Transaction) -> None:
        scanned = self._scanned
        try:
            lowered, ends = scanned[statement]
        except KeyError:
            lowered = statement.lower()
            ends = _ENDS_TRANSACTION.match(lowered) is not None
            if not any(needle in lowered for needle in self._needles):
                lowered = None
            if len(scanned) >= _SCANNED_MAX:
                scanned.clear()
            scanned[statement] = lowered, ends
        if lowered is not None:
            self._note_setting(conn, lowered, context)
        if ends and tx.checked and tx.settings is not None:
            # COMMIT (or ROLLBACK, END, ABORT) sent as SQL ends
            # the server's transaction while SQLAlchemy's goes on: the next statement
            # runs in a new one, which must get the settings again.
            tx.pending = tx.settings

    def _note_setting(self, conn: Connection, lowered: str, context: Any) -> None:
        """A statement that may leave a session-level setting: reset it at check-in."""
        compiled = getattr(context, "compiled", None)
        if compiled is not None and getattr(compiled, "statement", None) in self.own:
            return  # the package's own set_config(..., true)
        pattern = self._set_statement
        if "set_config" in lowered or (pattern is not None and pattern.search(lowered)):
            conn.info[_DIRTY] = True

    def reset(
        self,
        dbapi_connection: DBAPIConnection,
        entry: ConnectionPoolEntry | None,
        state: PoolResetState,
    ) -> None:
        """Clear the setting of a connection that may hold one, on its way back."""
        if entry is None:
            return
        info = entry.info
        raw = not info.pop(_WORKED, False)  # no Connection's transaction began on it
        dirty = info.pop(_DIRTY, False)
        if not (raw or dirty) or state.terminate_only or not state.asyncio_safe:
            return
        # End whatever transaction is open, so the reset is not rolled back with it;
        # a failure here makes the pool discard the connection instead of keeping it.
        dbapi_connection.rollback()
        # In the driver's autocommit mode (psycopg 2 and 3) the reset is one round
        # trip instead of three (BEGIN, the statement, COMMIT).
        switch = getattr(dbapi_connection, "autocommit", None) is False
        if switch:
            dbapi_connection.autocommit = True
        try:
            cursor = dbapi_connection.cursor()
            try:
                names = ", ".join(f"pg_catalog.set_config('{n}', '', false)" for n in self.names)
                cursor.execute(f"SELECT {names}")  # validated prefix.name: safe as literals
            finally:
                cursor.close()
        finally:
            if switch:
                dbapi_connection.autocommit = False
        if not switch:
            dbapi_connection.commit()


def _unsent(tx: _Transaction | None) -> None:
    """The settings sent with a statement that failed are pending again."""
    if tx is not None and tx.sending is not None:
        tx.pending, tx.sending = tx.sending, None


_EXECUTION_POINTS = ("do_execute", "do_execute_no_params", "do_executemany")


def _ahead_error(identifier: str) -> ConfigurationError:
    return ConfigurationError(
        f"a class-level listener (on Engine, Dialect or a dialect class) listens for "
        f"{identifier} of a bind_tenant_guc engine's dialect: SQLAlchemy runs it before the "
        "binding's check, so it could send statements unchecked; listen on the engine "
        "itself (event.listen(engine, ...)) instead"
    )


def is_guarded(engine: Engine) -> bool:
    """Whether a binding reached ``engine`` (it then refuses AUTOCOMMIT)."""
    return engine in _guards


def guard(engine: Engine, name: str, own: tuple[object, ...]) -> _EngineGuard:
    """Install the guard on ``engine`` (once) and have it watch setting ``name``."""
    found = _guards.get(engine) or _guard_of(engine.dialect)
    if found is None:
        found = _EngineGuard()
        found.own = own
        dialect = engine.dialect
        for identifier in _EXECUTION_POINTS:
            if getattr(getattr(dialect.dispatch, identifier), "parent_listeners", None):
                raise _ahead_error(identifier)
        _listen_first(dialect, "do_execute", found.do_execute)
        _listen_first(dialect, "do_execute_no_params", found.do_execute_no_params)
        _listen_first(dialect, "do_executemany", found.do_executemany)
        found.ahead = tuple(
            getattr(dialect.dispatch, identifier).parent_listeners
            for identifier in _EXECUTION_POINTS
        )
        event.listen(dialect, "handle_error", found.failed)
        event.listen(engine.pool, "reset", found.reset)
        setattr(dialect, _GUARD_ATTR, found)
    _guards[engine] = found
    if name not in found.names:
        found.add_name(name)
    return found


def _listen_first(dialect: Any, identifier: str, listener: Callable[..., bool]) -> None:
    """Listen for ``identifier`` ahead of the dialect's other listeners.

    A listener that executes the statement itself returns True, and the ones
    after it do not run: the check must come first.  (``event.listen``'s
    ``insert=True`` is not applied to dialect events.)
    """
    event.listen(dialect, identifier, listener)
    listeners = getattr(getattr(dialect.dispatch, identifier), "listeners", None)
    if listeners is not None and listeners and listeners[0] == listener:
        return
    try:
        listeners.remove(listener)  # type: ignore[union-attr]
        listeners.appendleft(listener)  # type: ignore[union-attr]
    except (AttributeError, ValueError) as exc:
        event.remove(dialect, identifier, listener)
        raise ConfigurationError(
            f"bind_tenant_guc could not place its {identifier} listener ahead of the "
            "dialect's others, so one of them could send statements unchecked; bind "
            "the engine before adding your own dialect listeners"
        ) from exc


def add_hook(engine: Engine, hook: Hook) -> Callable[[], None]:
    """Run ``hook`` at each new transaction of ``engine``; return what removes it."""
    found = _guards[engine]
    found.hooks.append(hook)

    def remove() -> None:
        if hook in found.hooks:
            found.hooks.remove(hook)

    return remove


def _connection_of(context: Any) -> Connection:
    if context is None:
        raise _no_context()
    conn: Connection = context.root_connection
    return conn


def _no_context() -> TenantCeleryError:
    # No SQLAlchemy dialect for PostgreSQL executes without one.
    return TenantCeleryError(
        "a statement reached a bind_tenant_guc engine's driver without an execution "
        "context, so its tenant could not be checked; it was not sent"
    )


# A Session on a bound engine: remember it, so that the end of a task rolls back
# the Session, not the connection under it.  Listened for once, at import: adding
# it while a Session event is being dispatched would break that dispatch.
@event.listens_for(Session, "after_begin")
def _link_session(session: Session, transaction: Any, connection: Connection) -> None:
    tx = connection.__dict__.get(_ATTR)
    if tx is None or not tx.serves(connection):
        found = _guard_of(connection.dialect)
        if found is None or not found.hooks:
            return
        tx = found.start(connection)
    if tx.checked and tx.session is None:
        tx.session = session


# --- the end of a task -----------------------------------------------------------


@task_prerun.connect(weak=False, dispatch_uid="tenant_celery.db.enter_task")
def _begin_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    name = getattr(task, "name", None) or "?"
    _frames.set((*_frames.get(), _TaskFrame(task_id, name)))


@task_postrun.connect(weak=False, dispatch_uid="tenant_celery.db.leave_task")
def _end_task(task_id: str | None = None, **_: Any) -> None:
    frames = _frames.get()
    for index in range(len(frames) - 1, -1, -1):
        if frames[index].task_id == task_id:
            break
    else:
        return
    frame = frames[index]
    _frames.set(frames[:index])
    for tx in frame.open():
        _roll_back(frame, tx)


def _still_open(tx: _Transaction, conn: Connection) -> bool:
    """Whether ``tx`` is the record of ``conn``'s open transaction.

    A record made while the transaction began (a statement of a "begin" listener)
    names no transaction object; it is the open transaction's when no statement
    came after it (one would have made a record of its own).
    """
    if conn.__dict__.get(_ATTR) is not tx or not conn.in_transaction():
        return False
    return tx.transaction is _none or tx.serves(conn)


def _roll_back(frame: _TaskFrame, tx: _Transaction) -> None:
    """Roll back a transaction a task left open, so its tenant stays with the task."""
    conn = tx.connection()
    _forget(tx)
    if conn is None or not _still_open(tx, conn):
        return
    logger.warning(
        "task %s[%s] ended with a transaction still open on an engine bound by "
        "bind_tenant_guc; it was rolled back so that its tenant cannot reach other "
        "work: commit, roll back or close sessions and connections before a task returns",
        frame.name,
        frame.task_id,
    )
    session = tx.session
    try:
        if session is not None:
            session.rollback()  # keeps the Session consistent for its next user
        if _still_open(tx, conn):
            clear(conn)  # so that a two-phase ROLLBACK PREPARED is not refused
            conn.rollback()
    except Exception:  # a broken connection: nothing it holds can be used any more
        logger.exception("rolling back the transaction task %s left open failed", frame.name)
        clear(conn)
        try:
            conn.invalidate()
        except Exception:
            logger.debug("invalidating the connection failed too", exc_info=True)
