"""Test your own tenant tasks: a pytest plugin, task runners and an isolation check.

Installing tenant-celery registers this module as a pytest plugin (the
``pytest11`` entry point ``tenant_celery``), so every test session of a host
application gets its fixtures with nothing to configure.  Loading it connects
to nothing, creates no Celery app and changes no setting: it imports
:mod:`tenant_celery` (and so Celery and SQLAlchemy) and declares the fixtures.
``pytest -p no:tenant_celery`` turns it off.  It does not need, and does not
load, Celery's own plugin (``celery.contrib.pytest``); the two work together.

Fixtures, all named ``tenant_celery_*``:

* ``tenant_celery_tenant_id``: a fresh tenant id;
* ``tenant_celery_tenant_ids``: two distinct fresh tenant ids, ``(a, b)``;
* ``tenant_celery_make_tenant_id``: the factory behind both (override it when
  your tenant id parser wants ids of another shape);
* ``tenant_celery_app``: your Celery app, which you provide by overriding it
  in ``conftest.py``;
* ``tenant_celery_eager``: that app with every task it publishes run in the
  test's process, for one test.

Helpers, usable with or without the fixtures: :func:`run_in_tenant`,
:func:`eager_tasks`, :func:`new_tenant_id` and :func:`assert_tenant_isolation`.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

try:
    import pytest
except ModuleNotFoundError as exc:  # pragma: no cover (pytest loads this module)
    raise ModuleNotFoundError(
        "tenant_celery.testing is a pytest plugin and needs pytest: pip install pytest",
        name="pytest",
    ) from exc

import sqlalchemy as sa
from celery import Celery, Task
from sqlalchemy.engine import Connection, Engine, Transaction
from sqlalchemy.exc import DBAPIError

from . import _catalog, _compat
from ._pg import identifier, qualified
from .config import header_name
from .context import parse_tenant_id, tenant_context
from .db import _SET_CONFIG, _check_transaction, _setting, set_tenant_guc
from .errors import ConfigurationError, InvalidTenantId, TenantCeleryError

__all__ = [
    "IsolationNotProvable",
    "IsolationReport",
    "TenantIsolationError",
    "TenantLeak",
    "assert_tenant_isolation",
    "eager_tasks",
    "new_tenant_id",
    "run_in_tenant",
]
# The fixtures are not listed: pytest finds them by name, and tests request them
# as arguments rather than importing them.

_P = ParamSpec("_P")
_R = TypeVar("_R")


# --------------------------------------------------------------------- tenant ids

# Tried in order; the first value the configured parser accepts is used.  Integers
# stay below 2**31 so they also fit an ``integer`` tenant column.
_CANDIDATES: tuple[Callable[[], object], ...] = (
    uuid.uuid4,
    lambda: secrets.randbelow(2**31 - 1) + 1,
    lambda: f"t-{secrets.token_hex(8)}",
)
_issued: set[str] = set()
_issued_lock = threading.Lock()
_ATTEMPTS = 100


def new_tenant_id() -> str:
    """A tenant id not returned before in this process, in its canonical form.

    It is valid for the process's tenant id parser (see
    :func:`~tenant_celery.set_tenant_id_parser`): a random UUID for the default
    parser, a random positive integer below 2\\ :sup:`31` for
    :func:`~tenant_celery.integer_tenant_id`, a random slug for
    :func:`~tenant_celery.slug_tenant_id`.  A custom parser gets the first of
    those it accepts.  Fresh ids keep tests independent without cleaning
    tables: a test's tenant sees no other test's rows.  Thread-safe.

    Raises:
        ConfigurationError: the parser accepts none of those shapes, or keeps
            returning ids already given out; override the
            ``tenant_celery_make_tenant_id`` fixture (or write your own factory)
            to make ids it accepts.
    """
    for _ in range(_ATTEMPTS):
        tenant = _candidate()
        with _issued_lock:
            if tenant not in _issued:
                _issued.add(tenant)
                return tenant
    raise ConfigurationError(
        f"the tenant id parser returned only ids already given out in {_ATTEMPTS} "
        "attempts; override the tenant_celery_make_tenant_id fixture to make fresh ids"
    )


def _candidate() -> str:
    for make in _CANDIDATES:
        try:
            return parse_tenant_id(make())
        except InvalidTenantId:
            continue
    raise ConfigurationError(
        "the tenant id parser accepts none of a UUID, a positive integer or a slug; "
        "override the tenant_celery_make_tenant_id fixture to make ids it accepts"
    )


# ---------------------------------------------------------------- running tasks


def run_in_tenant(
    task: Task[_P, _R], tenant_id: object, /, *args: _P.args, **kwargs: _P.kwargs
) -> _R:
    """Run ``task`` in this process inside ``tenant_id``; return its result or raise its error.

    The task is applied eagerly (:meth:`celery.Task.apply`) inside
    :func:`~tenant_celery.tenant_context`, so it takes the package's real path:
    the tenant is written to the request's header, read back and validated by
    the tenant task, entered for the body, and carried by every task the body
    publishes; afterwards no tenant is left behind.  Retries run here too.

    Tasks the body publishes are *sent to the app's broker*, as in production,
    unless the app runs tasks eagerly: use the ``tenant_celery_eager`` fixture
    or :func:`eager_tasks` to run them in this process as well.

    Raises:
        InvalidTenantId: ``tenant_id`` is refused by the tenant id parser;
            nothing ran.
        TenantConflict: ``kwargs`` name a different tenant; nothing ran.
        Exception: whatever the task raised, unchanged.
    """
    with tenant_context(tenant_id) as tenant:
        # The header makes the tenant explicit, so a ``tenant_id`` argument naming
        # another one is a conflict rather than a silent choice.  ``throw=False``:
        # with it, a retry would escape as ``Retry`` instead of running.
        result = task.apply(
            tuple(args), dict(kwargs), headers={header_name(task.app): tenant}, throw=False
        )
    return result.get(disable_sync_subtasks=False)


_EAGER = {"task_always_eager": True, "task_eager_propagates": True}


@contextmanager
def eager_tasks(app: Celery) -> Iterator[Celery]:
    """Run every task ``app`` publishes in this process inside the block; yield ``app``.

    Sets ``task_always_eager`` and ``task_eager_propagates`` on ``app.conf``
    and restores their previous values on exit.  Publishing still goes through
    :class:`~tenant_celery.TenantTask`, so a task published without a tenant is
    refused, and children run in their parent's tenant.  Nothing reaches the
    broker.  The settings are the app's, shared by every thread.
    """
    saved = {key: app.conf.get(key) for key in _EAGER}
    app.conf.update(_EAGER)
    try:
        yield app
    finally:
        app.conf.update(saved)


# ----------------------------------------------------------------------- fixtures


@pytest.fixture
def tenant_celery_make_tenant_id() -> Callable[[], object]:
    """A factory of fresh tenant ids, :func:`new_tenant_id` by default.

    Override it in ``conftest.py`` when your tenant id parser accepts none of
    a UUID, a positive integer or a slug; each call must return a new id.
    """
    return new_tenant_id


@pytest.fixture
def tenant_celery_tenant_id(tenant_celery_make_tenant_id: Callable[[], object]) -> str:
    """A fresh tenant id, in its canonical form."""
    return parse_tenant_id(tenant_celery_make_tenant_id())


@pytest.fixture
def tenant_celery_tenant_ids(
    tenant_celery_make_tenant_id: Callable[[], object],
) -> tuple[str, str]:
    """Two distinct fresh tenant ids ``(a, b)``, in their canonical form."""
    a = parse_tenant_id(tenant_celery_make_tenant_id())
    b = parse_tenant_id(tenant_celery_make_tenant_id())
    if a == b:
        raise ConfigurationError(
            "tenant_celery_make_tenant_id returned the same tenant twice; "
            "each call must return a new id"
        )
    return a, b


@pytest.fixture
def tenant_celery_app() -> Celery:
    """Your Celery app: override this fixture in ``conftest.py`` to return it.

    There is no default: guessing (Celery's "current app") could silently
    configure an app your tasks do not use.
    """
    pytest.fail(
        "the tenant_celery_app fixture has no default: define a fixture named "
        "tenant_celery_app in your conftest.py that returns your Celery app",
        pytrace=False,
    )


@pytest.fixture
def tenant_celery_eager(tenant_celery_app: Celery) -> Iterator[Celery]:
    """``tenant_celery_app`` with every task it publishes run in the test's
    process (see :func:`eager_tasks`); its settings are restored afterwards."""
    with eager_tasks(tenant_celery_app) as app:
        yield app


# ------------------------------------------------------------- isolation check


class TenantIsolationError(TenantCeleryError, AssertionError):
    """tenant isolation was not proven"""


class TenantLeak(TenantIsolationError):
    """a tenant could read or write rows that are not its own"""


class IsolationNotProvable(TenantIsolationError):
    """the isolation check would prove nothing on this table through this connection"""


@dataclass(frozen=True)
class IsolationReport:
    """What :func:`assert_tenant_isolation` checked, once it passed."""

    #: The table as SQL names it.
    table: str
    #: The tenant column as SQL names it.
    column: str
    #: The PostgreSQL setting the tenants were set in.
    setting: str
    #: The role the checks ran as.
    role: str
    #: The two tenants, canonical.
    tenants: tuple[str, str]
    #: Rows each tenant saw: all its own, since nothing else was visible.
    rows: tuple[int, int]
    #: Write checks that ran and were refused: ``"insert"`` (a row naming the
    #: other tenant) and ``"update"`` (rows given to the other tenant).  A check
    #: is left out when the role lacks its privilege or neither tenant has rows,
    #: and all are with ``check_writes=False``.
    writes_checked: tuple[str, ...]


_RELATION = sa.text(
    "SELECT c.oid, n.nspname FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.oid = to_regclass(:qualified)"
)

# Columns a copied row takes from the original: not dropped, not generated, and
# with no default (the tenant column always), so keys take fresh default values.
_COPIED = sa.text(
    "SELECT quote_ident(a.attname) FROM pg_catalog.pg_attribute a"
    " WHERE a.attrelid = :oid AND a.attnum > 0 AND NOT a.attisdropped"
    " AND a.attgenerated = ''"
    " AND (a.attname = :column OR (NOT a.atthasdef AND a.attidentity = ''))"
    " ORDER BY a.attnum"
)

# Row-level BEFORE INSERT triggers, which may change or skip a new row.
_BEFORE_INSERT_TRIGGERS = sa.text(
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger"
    " WHERE tgrelid = :oid AND NOT tgisinternal AND tgenabled <> 'D'"
    " AND tgtype & 7 = 7)"  # ROW (1) | BEFORE (2) | INSERT (4)
)

_READ_SETTING = sa.text("SELECT current_setting(:name, true)")

# A write probe that waits longer than this for a row lock fails instead of hanging.
_LOCK_TIMEOUT = "10s"

_RLS_VIOLATION = "42501"


def assert_tenant_isolation(
    bind: Engine | Connection,
    table: str,
    tenant_a: object,
    tenant_b: object,
    *,
    tenant_column: str = "tenant_id",
    schema: str | None = None,
    setting: str | None = None,
    allow_empty: bool = False,
    check_writes: bool = True,
) -> IsolationReport:
    """Prove, through ``bind``, that ``tenant_a`` and ``tenant_b`` cannot see each other's rows.

    Pass the engine or connection your tasks use (the application role), with
    rows of both tenants already in ``table``.  Each check runs with the
    tenant setting made by :func:`~tenant_celery.set_tenant_guc`:

    * with ``tenant_a`` set, every visible row is ``tenant_a``'s; the same for
      ``tenant_b``;
    * with no tenant set (the setting never made in the session, and empty),
      no row is visible;
    * with ``check_writes``, for each tenant that has rows: with it set,
      inserting a copy of one of its rows that names the other tenant, and an
      ``UPDATE`` giving every row it may update to the other tenant, are both
      refused (each check needs the role's privilege for it).

    Nothing is written: everything runs in a transaction (a savepoint when
    ``bind`` is a connection already in one) that is rolled back, so a
    connection's own transaction and its settings are left as they were.  Only
    a sequence behind a column default of the copied row may advance, since
    PostgreSQL never rolls sequences back.  A write check waits at most 10 s
    for a row lock.  Pass an ORM session's connection as
    ``session.connection()``.

    ``setting`` defaults as in :func:`~tenant_celery.set_tenant_guc`;
    ``schema`` qualifies ``table`` (else the ``search_path`` resolves it).

    Returns:
        An :class:`IsolationReport` of what was checked.

    Raises:
        TenantLeak: a tenant saw or wrote rows not its own, or rows were
            visible with no tenant; the message names the table, the tenants,
            the rows and the policies that apply to the role.
        IsolationNotProvable: the check would prove nothing: the role is a
            superuser or has ``BYPASSRLS``, row-level security is not enabled
            on the table, the role owns it and RLS is not forced, the role may
            not ``SELECT`` from it, or (unless ``allow_empty``) a tenant has no
            visible rows.
        TenantIsolationError: the table or column does not exist, or a check
            failed with a database error (named in the message).
        ConfigurationError: a name is refused, or the two tenants are the same.
        InvalidTenantId: a tenant is refused by the tenant id parser.
        TransactionRequired: ``bind`` is in AUTOCOMMIT mode.
    """
    name = _setting(setting)
    table = identifier(table, "table")
    column = identifier(tenant_column, "tenant_column")
    if schema is not None:
        schema = identifier(schema, "schema")
    a, b = parse_tenant_id(tenant_a), parse_tenant_id(tenant_b)
    if a == b:
        raise ConfigurationError(
            f"tenant_a and tenant_b are the same tenant ({a}); pass two different tenants"
        )
    check = _Check(qualified(table, schema), column, name, (a, b), allow_empty, check_writes)
    if isinstance(bind, Engine):
        with bind.connect() as conn, _rolled_back(conn):
            return check.run(conn)
    with _rolled_back(bind):
        return check.run(bind)


@contextmanager
def _rolled_back(conn: Connection) -> Iterator[None]:
    """A transaction (or, inside one, a savepoint) that is always rolled back."""
    transaction: Transaction
    if conn.in_transaction():
        _check_transaction(conn)
        transaction = conn.begin_nested()
    else:
        transaction = conn.begin()
    try:
        _check_transaction(conn)
        conn.execute(_SET_CONFIG, {"name": "lock_timeout", "value": _LOCK_TIMEOUT})
        yield
    finally:
        transaction.rollback()


def _quoted_for_text(name: str) -> str:
    # ``text()`` reads ``:word`` as a parameter, even inside a quoted identifier.
    return name.replace(":", "\\:")


def _rows(count: int) -> str:
    return f"{count} row{'' if count == 1 else 's'}"


def _first_line(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)


def _rls_refused(exc: DBAPIError) -> bool:
    return _compat.sqlstate(exc.orig) == _RLS_VIOLATION and "row-level security" in str(exc.orig)


class _Check:
    """One run of :func:`assert_tenant_isolation`, arguments validated."""

    role: str
    table: _catalog.TenantTable
    policies: list[_catalog.Policy]

    def __init__(
        self,
        target: str,
        column: str,
        setting: str,
        tenants: tuple[str, str],
        allow_empty: bool,
        check_writes: bool,
    ) -> None:
        self.target = target
        self.column = column
        self.setting = setting
        self.tenants = tenants
        self.allow_empty = allow_empty
        self.check_writes = check_writes

    def run(self, conn: Connection) -> IsolationReport:
        role, self.table = self._inspect(conn)
        self.role = role.name
        self.policies = _catalog.policies(conn, [self.table.oid], role)
        a, b = self.tenants
        # First, since once any probe has made the setting it reads '', not NULL.
        unset = conn.execute(_READ_SETTING, {"name": self.setting}).scalar() is None
        seen_unset = self._read_without_tenant(conn, None) if unset else 0
        rows = (self._read_as(conn, a, b), self._read_as(conn, b, a))
        self._no_tenant_leak(seen_unset, None)
        self._no_tenant_leak(self._read_without_tenant(conn, ""), "")
        for tenant, count in zip(self.tenants, rows, strict=True):
            if count == 0 and not self.allow_empty:
                raise IsolationNotProvable(
                    f"tenant {tenant} has no rows in {self.table.qualified} that role "
                    f"{self.role!r} can see, so the check would prove nothing about it: add "
                    "rows for both tenants first, check that the policy reads the setting "
                    f"{self.setting!r}, or pass allow_empty=True"
                )

        checked: list[str] = []
        if self.check_writes:
            for kind, privilege in (("insert", "INSERT"), ("update", "UPDATE")):
                statement = self._write_statement(conn, kind)
                if statement is None or privilege not in self.table.privileges:
                    continue
                probed = [
                    self._write_as(conn, kind, statement, own, other)
                    for (own, other), count in zip(((a, b), (b, a)), rows, strict=True)
                    if count > 0
                ]
                if any(probed):
                    checked.append(kind)
        return IsolationReport(
            table=self.table.qualified,
            column=self.table.quoted_column,
            setting=self.setting,
            role=self.role,
            tenants=self.tenants,
            rows=rows,
            writes_checked=tuple(checked),
        )

    # --- catalog --------------------------------------------------------------

    def _inspect(self, conn: Connection) -> tuple[_catalog.Role, _catalog.TenantTable]:
        found, column_type = _catalog.column_type(conn, self.target, self.column)
        if not found:
            raise TenantIsolationError(
                f"table {self.target} does not exist (resolved through the connection's "
                "search_path unless schema= is given)"
            )
        if column_type is None:
            raise TenantIsolationError(
                f"table {self.target} has no column {self.column!r}; pass tenant_column=..."
            )
        role = _catalog.role(conn, _catalog.current_user(conn))
        assert role is not None  # the role the connection runs as exists
        oid, schema = conn.execute(_RELATION, {"qualified": self.target}).one()
        tables = [
            t for t in _catalog.tenant_tables(conn, self.column, schema, role) if t.oid == oid
        ]
        if not tables:
            raise TenantIsolationError(
                f"{self.target} is not a table or partitioned table outside PostgreSQL's "
                "own schemas; the check reads such tables only"
            )
        table = tables[0]
        if role.superuser or role.bypassrls:
            attribute = "is a superuser" if role.superuser else "has BYPASSRLS"
            raise IsolationNotProvable(
                f"role {role.name!r} {attribute}, which bypasses row-level security: a check "
                f"on {table.qualified} would prove nothing; connect as your application role"
            )
        if not table.rls_enabled:
            raise IsolationNotProvable(
                f"row-level security is not enabled on {table.qualified}: every role that may "
                "read it sees every tenant's rows; enable it (op.enable_tenant_rls)"
            )
        if table.role_owns and not table.rls_forced:
            raise IsolationNotProvable(
                f"role {role.name!r} owns {table.qualified} and row-level security is not "
                "forced on it, so its policies do not apply to the role; connect as a role "
                "that does not own the table, or FORCE ROW LEVEL SECURITY"
            )
        if "SELECT" not in table.privileges:
            raise IsolationNotProvable(
                f"role {role.name!r} may not SELECT from {table.qualified}, so the check "
                "cannot read it; grant SELECT or connect as the role your tasks use"
            )
        return role, table

    def _policies(self) -> str:
        applying = [p for p in self.policies if p.applies]
        if not applying:
            return f"no policy applies to role {self.role!r}"
        described = "; ".join(
            f"{p.name} ({'permissive' if p.permissive else 'restrictive'} {p.command}"
            + (f", USING {p.using}" if p.using else "")
            + (f", WITH CHECK {p.check}" if p.check else "")
            + ")"
            for p in applying
        )
        return f"policies applying to role {self.role!r}: {described}"

    # --- SQL ------------------------------------------------------------------

    def _cast(self, parameter: str) -> str:
        return f"CAST(:{parameter} AS {_quoted_for_text(self.table.column_type)})"

    def _relation(self) -> str:
        return _quoted_for_text(self.table.qualified)

    def _tenant_column(self) -> str:
        return _quoted_for_text(self.table.quoted_column)

    def _counts(self, conn: Connection) -> tuple[int, int, int]:
        """Visible rows of tenant a, of tenant b, and in all."""
        column = self._tenant_column()
        row = conn.execute(
            sa.text(
                f"SELECT count(*) FILTER (WHERE {column} = {self._cast('a')}),"
                f" count(*) FILTER (WHERE {column} = {self._cast('b')}), count(*)"
                f" FROM {self._relation()}"
            ),
            {"a": self.tenants[0], "b": self.tenants[1]},
        ).one()
        return int(row[0]), int(row[1]), int(row[2])

    def _own_rows(self, conn: Connection, own: str) -> int:
        statement = sa.text(
            f"SELECT count(*) FROM {self._relation()}"
            f" WHERE {self._tenant_column()} = {self._cast('own')}"
        )
        return int(conn.execute(statement, {"own": own}).scalar_one())

    def _write_statement(self, conn: Connection, kind: str) -> sa.TextClause | None:
        relation, column = self._relation(), self._tenant_column()
        if kind == "update":
            # No WHERE: a statement that reads the table's columns also applies its
            # SELECT policies to the new rows, which would hide a leaky UPDATE policy.
            return sa.text(f"UPDATE {relation} SET {column} = {self._cast('other')}")
        found = conn.execute(_COPIED, {"oid": self.table.oid, "column": self.column})
        copied = [str(c) for c in found.scalars()]
        if self.table.quoted_column not in copied:
            return None  # a generated tenant column: no INSERT names a tenant
        names = ", ".join(_quoted_for_text(c) for c in copied)
        values = ", ".join(
            self._cast("other") if c == self.table.quoted_column else _quoted_for_text(c)
            for c in copied
        )
        # A copy of one of the tenant's rows naming the other tenant.  Row-level
        # security checks a new row before its unique indexes do: a row the policy
        # accepts and a unique key then stops is skipped, not an error.
        return sa.text(
            f"INSERT INTO {relation} ({names}) SELECT {values} FROM {relation}"
            f" WHERE {column} = {self._cast('own')} LIMIT 1 ON CONFLICT DO NOTHING"
        )

    # --- reads ------------------------------------------------------------------

    def _read_as(self, conn: Connection, own: str, other: str) -> int:
        """Rows of ``own`` visible with ``own`` set; raise on any other row."""
        with self._probe(conn, f"with tenant {own} set"):
            set_tenant_guc(conn, own, setting=self.setting)
            seen_a, seen_b, total = self._counts(conn)
        seen_own, seen_other = (seen_a, seen_b) if own == self.tenants[0] else (seen_b, seen_a)
        strangers = total - seen_own - seen_other
        if seen_other or strangers:
            leaked = []
            if seen_other:
                leaked.append(f"{_rows(seen_other)} of tenant {other}")
            if strangers:
                leaked.append(f"{_rows(strangers)} of other tenants (or none)")
            raise TenantLeak(
                f"with tenant {own} set, role {self.role!r} saw {' and '.join(leaked)} in "
                f"{self.table.qualified}; {self._policies()}"
            )
        return seen_own

    def _without_tenant(self, value: str | None) -> str:
        how = "never made in this session" if value is None else "empty"
        return f"with no tenant set (the setting {self.setting!r} {how})"

    def _read_without_tenant(self, conn: Connection, value: str | None) -> int:
        """Rows visible with the setting never made (``None``) or set to ``value``."""
        hint = (
            f"; a policy should read NULLIF(current_setting({self.setting!r}, true), '') "
            "so that no tenant means no rows rather than an error"
        )
        with self._probe(conn, self._without_tenant(value), hint=hint):
            if value is not None:
                conn.execute(_SET_CONFIG, {"name": self.setting, "value": value})
            _, _, total = self._counts(conn)
        return total

    def _no_tenant_leak(self, total: int, value: str | None) -> None:
        if total:
            raise TenantLeak(
                f"{self._without_tenant(value)}, role {self.role!r} saw {_rows(total)} in "
                f"{self.table.qualified}; it must see none (fail closed); {self._policies()}"
            )

    # --- writes -----------------------------------------------------------------

    def _write_as(
        self, conn: Connection, kind: str, statement: sa.TextClause, own: str, other: str
    ) -> bool:
        """Try to write rows naming ``other`` with ``own`` set; raise unless refused.

        Returns whether the check ran (False: there was nothing to write).
        """
        what = (
            f"an INSERT of a row naming tenant {other}"
            if kind == "insert"
            else f"an UPDATE moving rows to tenant {other}"
        )
        refused: list[bool] = []
        with self._probe(conn, f"with tenant {own} set, {what}", refused=refused):
            set_tenant_guc(conn, own, setting=self.setting)
            before = self._own_rows(conn, own)
            written = conn.execute(statement, {"own": own, "other": other}).rowcount
            after = self._own_rows(conn, own)
        if refused:
            return True
        if kind == "insert" and written == 0:
            # The policy let the row through and a unique key skipped it, unless a
            # trigger changed or skipped it first: then the check cannot tell.
            if conn.execute(_BEFORE_INSERT_TRIGGERS, {"oid": self.table.oid}).scalar():
                raise TenantIsolationError(
                    f"checking {self.table.qualified} with tenant {own} set, {what} was "
                    "neither refused nor written (a BEFORE INSERT trigger or a unique key "
                    "skipped it), so the check cannot tell whether the policy accepts it; "
                    "pass check_writes=False to check reads only"
                )
            raise TenantLeak(
                f"with tenant {own} set, {what} was accepted by the policies of "
                f"{self.table.qualified} (a unique key then skipped it): they do not pin "
                f"writes to the tenant; {self._policies()}"
            )
        # Rows a BEFORE trigger gave back to the tenant that is set stay its own.
        stayed = after - before if kind == "insert" else written - (before - after)
        if stayed < written:
            raise TenantLeak(
                f"with tenant {own} set, {what} was accepted by {self.table.qualified} "
                f"({_rows(written - stayed)} written as another tenant's): its policies do "
                f"not pin writes to the tenant; {self._policies()}"
            )
        return bool(written)

    @contextmanager
    def _probe(
        self, conn: Connection, what: str, *, hint: str = "", refused: list[bool] | None = None
    ) -> Iterator[None]:
        """Run one probe in a savepoint that is rolled back; explain database errors.

        With ``refused``, a row-level security violation is the expected outcome:
        it is recorded there and not raised.
        """
        savepoint = conn.begin_nested()
        try:
            yield
        except DBAPIError as exc:
            if refused is not None and _rls_refused(exc):
                refused.append(True)
                return
            raise TenantIsolationError(
                f"checking {self.table.qualified} {what} failed: {_first_line(exc)}{hint}"
            ) from exc
        finally:
            savepoint.rollback()
