"""Row-level security for tenant tables: Alembic operations and the application role.

Importing this module registers two Alembic operations, so a host migration
can write::

    import tenant_celery.rls  # noqa: F401  (registers op.enable_tenant_rls)

    def upgrade() -> None:
        op.enable_tenant_rls("invoices", column_type="uuid")

    def downgrade() -> None:
        op.disable_tenant_rls("invoices")

The same work is available as plain functions taking a SQLAlchemy
:class:`~sqlalchemy.engine.Connection` (:func:`enable_tenant_rls`,
:func:`disable_tenant_rls`) and as SQL text (:func:`enable_tenant_rls_sql`,
:func:`disable_tenant_rls_sql`).  The policy they write is the fail-closed,
index-friendly one::

    CREATE POLICY tenant_isolation_policy ON invoices AS PERMISSIVE FOR ALL
      USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid))
      WITH CHECK (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true),
                                             '')::uuid))

Every argument is checked before any SQL is sent; a refused one raises
:class:`~tenant_celery.ConfigurationError`.  Identifiers are quoted by
SQLAlchemy's PostgreSQL identifier preparer, so any name PostgreSQL accepts
(quotes, mixed case, spaces) works; names that are empty, contain a NUL
character or are longer than PostgreSQL's 63 bytes (which it would silently
truncate) are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations import MigrateOperation, Operations
from sqlalchemy.engine import Connection

from . import _catalog, _compat
from ._pg import identifier, qualified, quote
from .config import DEFAULT_GUC, validate_guc_name
from .errors import ConfigurationError, RLSSetupError

__all__ = [
    "DEFAULT_POLICY_NAME",
    "DEFAULT_TENANT_PRIVILEGES",
    "ColumnType",
    "DisableTenantRLSOp",
    "EnableTenantRLSOp",
    "create_app_role",
    "disable_tenant_rls",
    "disable_tenant_rls_sql",
    "enable_tenant_rls",
    "enable_tenant_rls_sql",
    "grant_tenant_tables",
]

_log = logging.getLogger(__name__)

ColumnType = Literal["uuid", "bigint", "integer", "text"]
"""Types a tenant column may have; the setting is cast to it in the policy."""

DEFAULT_POLICY_NAME = "tenant_isolation_policy"
"""Name of the policy :func:`enable_tenant_rls` creates unless told otherwise."""

DEFAULT_TENANT_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
"""Privileges :func:`grant_tenant_tables` grants by default, and the only ones it grants.

``TRUNCATE`` is not among them: it empties a table without consulting its
row-level security policies.
"""

_COLUMN_TYPES: tuple[str, ...] = get_args(ColumnType)


def _column_type(value: object) -> ColumnType:
    if value in _COLUMN_TYPES:
        return value  # type: ignore[return-value]  # narrowed by the membership test
    raise ConfigurationError(
        f"column_type must be one of {', '.join(_COLUMN_TYPES)}, got {value!r}"
    )


def _names(kind: str, values: object) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ConfigurationError(
            f"{kind} must be a list of names, got {values!r}; write {kind}=[{values!r}]"
            if isinstance(values, str)
            else f"{kind} must be a list of names, got {type(values).__name__}"
        )
    names = tuple(identifier(value, f"each of {kind}") for value in values)
    if not names:
        raise ConfigurationError(f"{kind} must name at least one, got an empty list")
    return names


@dataclass(frozen=True)
class _Target:
    """Validated arguments of one enable/disable call."""

    table: str
    column: str
    setting: str
    policy_name: str
    roles: tuple[str, ...] | None
    schema: str | None
    column_type: ColumnType | None

    @classmethod
    def of(
        cls,
        table: object,
        column: object,
        setting: object,
        policy_name: object,
        roles: object,
        schema: object,
        column_type: object,
    ) -> _Target:
        return cls(
            table=identifier(table, "table"),
            column=identifier(column, "column"),
            setting=validate_guc_name(setting),
            policy_name=identifier(policy_name, "policy_name"),
            roles=None if roles is None else _names("roles", roles),
            schema=None if schema is None else identifier(schema, "schema"),
            column_type=None if column_type is None else _column_type(column_type),
        )

    @property
    def qualified(self) -> str:
        return qualified(self.table, self.schema)

    def enable_sql(self, column_type: ColumnType) -> list[str]:
        table = self.qualified
        # The setting was validated as word.word: it cannot contain a quote.
        value = f"(SELECT NULLIF(current_setting('{self.setting}', true), '')::{column_type})"
        predicate = f"{quote(self.column)} = {value}"
        to = f" TO {', '.join(quote(r) for r in self.roles)}" if self.roles else ""
        return [
            f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
            f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY",
            f"CREATE POLICY {quote(self.policy_name)} ON {table} AS PERMISSIVE FOR ALL"
            f"{to} USING ({predicate}) WITH CHECK ({predicate})",
        ]

    def disable_sql(self) -> list[str]:
        table = self.qualified
        return [
            f"DROP POLICY {quote(self.policy_name)} ON {table}",
            f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY",
            f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY",
        ]

    def detect_column_type(self, conn: Connection) -> ColumnType:
        found, type_name = _catalog.column_type(conn, self.qualified, self.column)
        if not found:
            hint = (
                f"; pass schema={self.table.split('.')[0]!r} rather than a dotted name"
                if "." in self.table and self.schema is None
                else ""
            )
            raise RLSSetupError(f"table {self.qualified} does not exist{hint}")
        if type_name is None:
            raise RLSSetupError(f"table {self.qualified} has no column {self.column!r}")
        if type_name not in _COLUMN_TYPES:
            raise RLSSetupError(
                f"column {self.column!r} of {self.qualified} has type {type_name}; "
                f"tenant columns must be one of {', '.join(_COLUMN_TYPES)}"
            )
        if self.column_type is not None and self.column_type != type_name:
            raise RLSSetupError(
                f"column {self.column!r} of {self.qualified} has type {type_name}, "
                f"but column_type={self.column_type!r} was passed"
            )
        return type_name  # type: ignore[return-value]  # one of _COLUMN_TYPES


def _execute(conn: Connection, statements: Iterable[str]) -> None:
    # no_parameters: the driver gets the text as is, so '%' or ':' in a quoted
    # name is not mistaken for a placeholder.
    for statement in statements:
        conn.exec_driver_sql(statement, execution_options={"no_parameters": True})


# ---------------------------------------------------------------- SQL and functions


def enable_tenant_rls_sql(
    table: str,
    *,
    column_type: ColumnType,
    column: str = "tenant_id",
    setting: str = DEFAULT_GUC,
    policy_name: str = DEFAULT_POLICY_NAME,
    roles: Sequence[str] | None = None,
    schema: str | None = None,
) -> list[str]:
    """The statements :func:`enable_tenant_rls` runs, without a database.

    Each string is one statement with no terminator.  Use it where there is no
    connection to read the column's type from, so ``column_type`` is required.

    Raises:
        ConfigurationError: an argument is refused.
    """
    target = _Target.of(table, column, setting, policy_name, roles, schema, column_type)
    return target.enable_sql(_column_type(column_type))


def disable_tenant_rls_sql(
    table: str, *, policy_name: str = DEFAULT_POLICY_NAME, schema: str | None = None
) -> list[str]:
    """The statements :func:`disable_tenant_rls` runs, without a database.

    Raises:
        ConfigurationError: an argument is refused.
    """
    return _Target.of(
        table, "tenant_id", DEFAULT_GUC, policy_name, None, schema, None
    ).disable_sql()


def enable_tenant_rls(
    conn: Connection,
    table: str,
    *,
    column: str = "tenant_id",
    setting: str = DEFAULT_GUC,
    policy_name: str = DEFAULT_POLICY_NAME,
    roles: Sequence[str] | None = None,
    schema: str | None = None,
    column_type: ColumnType | None = None,
) -> None:
    """Enable and force row-level security on ``table`` and create its tenant policy.

    Runs ``ALTER TABLE ... ENABLE ROW LEVEL SECURITY``, ``... FORCE ROW LEVEL
    SECURITY`` and ``CREATE POLICY policy_name ... AS PERMISSIVE FOR ALL [TO
    roles] USING (...) WITH CHECK (...)``, where both expressions compare
    ``column`` to ``setting`` read once per statement.  With no setting in the
    transaction no row is visible and none can be written.

    The column's type is read from the catalog; ``column_type``, when given,
    must agree with it.  ``setting`` is fixed in the policy when it is created:
    pass the name your workers set if it is not :data:`~tenant_celery.DEFAULT_GUC`.
    ``roles`` limits the policy to those roles (default: everyone, ``PUBLIC``).

    The statements run in the caller's transaction; nothing is committed.  The
    connection must be allowed to alter the table (its owner or a superuser).

    Raises:
        ConfigurationError: an argument is refused; no SQL was sent.
        RLSSetupError: the table or column does not exist, or the column's type
            is not one of :data:`ColumnType` or disagrees with ``column_type``;
            nothing was changed.
        sqlalchemy.exc.DBAPIError: the server refused a statement, e.g. a
            policy of that name exists already.
    """
    target = _Target.of(table, column, setting, policy_name, roles, schema, column_type)
    _execute(conn, target.enable_sql(target.detect_column_type(conn)))
    _log.info("row-level security enabled on %s (policy %s)", target.qualified, policy_name)


def disable_tenant_rls(
    conn: Connection,
    table: str,
    *,
    policy_name: str = DEFAULT_POLICY_NAME,
    schema: str | None = None,
) -> None:
    """Undo :func:`enable_tenant_rls`: drop the policy, then ``NO FORCE`` and ``DISABLE``
    row-level security on ``table``.

    This opens the table to every role with privileges on it, whatever other
    policies it has: only use it to reverse :func:`enable_tenant_rls`.  The
    statements run in the caller's transaction.

    Raises:
        ConfigurationError: an argument is refused; no SQL was sent.
        sqlalchemy.exc.DBAPIError: the server refused a statement, e.g. there
            is no policy of that name.
    """
    target = _Target.of(table, "tenant_id", DEFAULT_GUC, policy_name, None, schema, None)
    _execute(conn, target.disable_sql())
    _log.info("row-level security disabled on %s, policy %s dropped", target.qualified, policy_name)


# ------------------------------------------------------------------- Alembic


# Added to a generated migration script that uses the operations.
_IMPORT = "import tenant_celery.rls  # noqa: F401  (registers the tenant RLS operations)"


class _TenantRLSOp(MigrateOperation):
    def __init__(
        self,
        table_name: str,
        *,
        column: str = "tenant_id",
        setting: str = DEFAULT_GUC,
        policy_name: str = DEFAULT_POLICY_NAME,
        roles: Sequence[str] | None = None,
        schema: str | None = None,
        column_type: ColumnType | None = None,
    ) -> None:
        # Validated now, so a bad argument fails when the migration calls op.*,
        # before anything is sent or written to the --sql script.
        self.target = _Target.of(
            table_name, column, setting, policy_name, roles, schema, column_type
        )

    @property
    def table_name(self) -> str:
        return self.target.table

    def _kwargs(self) -> dict[str, Any]:
        t = self.target
        return {
            "column": t.column,
            "setting": t.setting,
            "policy_name": t.policy_name,
            "roles": list(t.roles) if t.roles is not None else None,
            "schema": t.schema,
            "column_type": t.column_type,
        }

    def _render(self, context: AutogenContext, name: str) -> str:
        context.imports.add(_IMPORT)
        prefix = context.opts.get("alembic_module_prefix", "op.")
        defaults = {
            "column": "tenant_id",
            "setting": DEFAULT_GUC,
            "policy_name": DEFAULT_POLICY_NAME,
            "roles": None,
            "schema": None,
            "column_type": None,
        }
        args = [repr(self.table_name)] + [
            f"{key}={value!r}" for key, value in self._kwargs().items() if value != defaults[key]
        ]
        return f"{prefix}{name}({', '.join(args)})"


@Operations.register_operation("enable_tenant_rls")
class EnableTenantRLSOp(_TenantRLSOp):
    """Alembic operation ``op.enable_tenant_rls(table_name, ...)``; reversed by
    :class:`DisableTenantRLSOp`.

    Online it does what :func:`enable_tenant_rls` does.  In offline (``--sql``)
    mode there is no database to read the column's type from: ``column_type``
    is then required, and :class:`~tenant_celery.ConfigurationError` is
    raised without it.  Passing it always keeps one migration valid in both
    modes (online, it is checked against the catalog).
    """

    @classmethod
    def enable_tenant_rls(
        cls,
        operations: Operations,
        table_name: str,
        *,
        column: str = "tenant_id",
        setting: str = DEFAULT_GUC,
        policy_name: str = DEFAULT_POLICY_NAME,
        roles: Sequence[str] | None = None,
        schema: str | None = None,
        column_type: ColumnType | None = None,
    ) -> None:
        """Enable and force row-level security on a table and create its tenant policy."""
        operations.invoke(
            cls(
                table_name,
                column=column,
                setting=setting,
                policy_name=policy_name,
                roles=roles,
                schema=schema,
                column_type=column_type,
            )
        )

    def reverse(self) -> DisableTenantRLSOp:
        return DisableTenantRLSOp(self.table_name, **self._kwargs())


@Operations.register_operation("disable_tenant_rls")
class DisableTenantRLSOp(_TenantRLSOp):
    """Alembic operation ``op.disable_tenant_rls(table_name, ...)``; reverses
    :class:`EnableTenantRLSOp`.

    Only ``table_name``, ``policy_name`` and ``schema`` affect what it does; the
    other arguments are kept so that :meth:`reverse` can rebuild the policy.
    """

    @classmethod
    def disable_tenant_rls(
        cls,
        operations: Operations,
        table_name: str,
        *,
        column: str = "tenant_id",
        setting: str = DEFAULT_GUC,
        policy_name: str = DEFAULT_POLICY_NAME,
        roles: Sequence[str] | None = None,
        schema: str | None = None,
        column_type: ColumnType | None = None,
    ) -> None:
        """Drop the tenant policy of a table and turn its row-level security off."""
        operations.invoke(
            cls(
                table_name,
                column=column,
                setting=setting,
                policy_name=policy_name,
                roles=roles,
                schema=schema,
                column_type=column_type,
            )
        )

    def reverse(self) -> EnableTenantRLSOp:
        return EnableTenantRLSOp(self.table_name, **self._kwargs())


def _emit(operations: Operations, statements: list[str]) -> None:
    impl = operations.migration_context.impl
    for statement in statements:
        impl.static_output(statement + impl.command_terminator)


@Operations.implementation_for(EnableTenantRLSOp)
def _enable(operations: Operations, operation: EnableTenantRLSOp) -> None:
    target = operation.target
    if operations.migration_context.as_sql:
        if target.column_type is None:
            raise ConfigurationError(
                f"op.enable_tenant_rls({target.table!r}) in offline (--sql) mode cannot read "
                f"the column's type: pass column_type= (one of {', '.join(_COLUMN_TYPES)})"
            )
        _emit(operations, target.enable_sql(target.column_type))
    else:
        conn = operations.get_bind()
        _execute(conn, target.enable_sql(target.detect_column_type(conn)))


@Operations.implementation_for(DisableTenantRLSOp)
def _disable(operations: Operations, operation: DisableTenantRLSOp) -> None:
    if operations.migration_context.as_sql:
        _emit(operations, operation.target.disable_sql())
    else:
        _execute(operations.get_bind(), operation.target.disable_sql())


@renderers.dispatch_for(EnableTenantRLSOp)
def _render_enable(context: AutogenContext, operation: EnableTenantRLSOp) -> str:
    return operation._render(context, "enable_tenant_rls")


@renderers.dispatch_for(DisableTenantRLSOp)
def _render_disable(context: AutogenContext, operation: DisableTenantRLSOp) -> str:
    return operation._render(context, "disable_tenant_rls")


# ------------------------------------------------------------------ the app role

_ROLE_ATTRIBUTES = "NOSUPERUSER NOBYPASSRLS NOREPLICATION NOCREATEDB NOCREATEROLE"
_RESERVED_ROLES = frozenset({"public", "none", "current_user", "current_role", "session_user"})


def create_app_role(
    conn: Connection, name: str, *, login: bool = False, password: str | None = None
) -> None:
    """Create the role tasks connect as, or bring an existing one to the same attributes.

    The role ends ``NOSUPERUSER NOBYPASSRLS NOREPLICATION NOCREATEDB
    NOCREATEROLE`` and ``LOGIN`` or ``NOLOGIN`` as ``login`` says; calling it
    again changes nothing.  A ``password`` (which needs ``login=True``) is
    hashed on the client (SCRAM-SHA-256, as ``psql``'s ``\\password`` does)
    and sent over the driver connection underneath ``conn`` (psycopg 3 or
    psycopg2), bypassing SQLAlchemy: neither ``echo=True``, SQLAlchemy's
    loggers nor the server's statement log ever see the plain text.  With
    ``password=None`` an existing password is left as it is.

    An existing role that is a superuser, has ``BYPASSRLS`` or ``REPLICATION``,
    can ``SET ROLE`` to a superuser or ``BYPASSRLS`` role (a member of one,
    directly or through other roles), or owns a table in the current database
    is refused, not altered: it bypasses row-level security, and demoting it,
    revoking its memberships or moving its tables is a decision for a human.
    Grant table privileges with :func:`grant_tenant_tables`.

    The statements run in the caller's transaction.  The connection needs
    ``CREATEROLE`` (or superuser).

    Raises:
        ConfigurationError: the name or password is refused, or a password was
            given on a connection whose driver is neither psycopg nor psycopg2;
            no SQL was sent.
        RLSSetupError: the role exists and is privileged, can become a privileged
            role, or owns tables; nothing was changed.
    """
    identifier(name, "role name")
    if name.lower() in _RESERVED_ROLES or name.startswith("pg_"):
        raise ConfigurationError(
            f"role name {name!r} is reserved by PostgreSQL; choose another name"
        )
    if password is not None:
        if not isinstance(password, str) or not password or "\x00" in password:
            # Never echo the value: it is a password.
            raise ConfigurationError(
                "password must be a non-empty str without NUL characters, "
                f"got a value of type {type(password).__name__}"
            )
        if not login:
            raise ConfigurationError(f"a password for role {name!r} is useless without login=True")
        if not _compat.can_set_role_password(conn.connection.driver_connection):
            raise ConfigurationError(
                f"create_app_role(password=...) needs a psycopg or psycopg2 connection "
                f"(postgresql+psycopg:// or postgresql+psycopg2://), "
                f"got driver {conn.dialect.driver!r}"
            )

    quoted = quote(name)
    existing = _catalog.role(conn, name)
    login_attribute = "LOGIN" if login else "NOLOGIN"
    if existing is None:
        _execute(conn, [f"CREATE ROLE {quoted} WITH {_ROLE_ATTRIBUTES} {login_attribute}"])
        _log.info("created role %s", quoted)
    else:
        privileged = [
            attribute
            for attribute, held in (
                ("SUPERUSER", existing.superuser),
                ("BYPASSRLS", existing.bypassrls),
                ("REPLICATION", existing.replication),
            )
            if held
        ]
        if privileged:
            raise RLSSetupError(
                f"role {name!r} exists with {', '.join(privileged)}, which bypasses "
                f"row-level security; remove it (ALTER ROLE {quoted} "
                f"{' '.join('NO' + p for p in privileged)}) or choose another role name"
            )
        reachable = _catalog.bypassing_memberships(conn, existing.oid)
        if reachable:
            reached = reachable[0]
            route = " -> ".join(repr(r) for r in (name, *reached.path))
            raise RLSSetupError(
                f"role {name!r} can SET ROLE to {reached.name!r}, which has {reached.attribute} "
                f"and bypasses row-level security ({route}); revoke the membership "
                f"(REVOKE {reached.quoted_first} FROM {quoted}) or choose another role name"
            )
        owned = _catalog.owned_tables(conn, existing.oid)
        if owned:
            shown = ", ".join(owned[:5]) + (f" and {len(owned) - 5} more" if len(owned) > 5 else "")
            raise RLSSetupError(
                f"role {name!r} owns {shown}; an owner can turn row-level security off, "
                f"so give the tables another owner (ALTER TABLE ... OWNER TO ...)"
            )
        # SUPERUSER/BYPASSRLS/REPLICATION are already off, and naming them in ALTER
        # ROLE needs privileges a CREATEROLE user may lack: leave them out.
        _execute(conn, [f"ALTER ROLE {quoted} WITH NOCREATEDB NOCREATEROLE {login_attribute}"])
        _log.info("updated role %s", quoted)

    if password is not None:
        _set_password(conn, name, password)
        _log.info("password set for role %s", quoted)


def _set_password(conn: Connection, name: str, password: str) -> None:
    # Straight to the driver, in the same transaction: SQLAlchemy's echo and
    # loggers never see this statement.
    _compat.set_role_password(conn.connection.driver_connection, name, password)


def grant_tenant_tables(
    conn: Connection,
    role: str,
    tables: Iterable[str],
    privileges: Iterable[str] = DEFAULT_TENANT_PRIVILEGES,
    schema: str | None = None,
) -> None:
    """Grant ``privileges`` on ``tables`` to ``role`` (and ``USAGE`` on ``schema`` if given).

    Only ``SELECT``, ``INSERT``, ``UPDATE`` and ``DELETE`` may be granted:
    row-level security filters exactly those, while ``TRUNCATE`` ignores it.
    Granting is idempotent.  Without ``schema`` the table names resolve through
    the connection's ``search_path`` and no schema privilege is granted.  Tables
    whose key comes from a ``serial`` column also need ``USAGE`` on its sequence
    (identity columns do not).  The statements run in the caller's transaction.

    Raises:
        ConfigurationError: a name or privilege is refused; no SQL was sent.
        sqlalchemy.exc.DBAPIError: the server refused, e.g. a table or the role
            does not exist.
    """
    identifier(role, "role")
    names = _names("tables", tables)
    if schema is not None:
        identifier(schema, "schema")
    if isinstance(privileges, str) or not isinstance(privileges, Iterable):
        raise ConfigurationError(f"privileges must be a list, got {privileges!r}")
    wanted = tuple(dict.fromkeys(str(p).upper() for p in privileges))
    refused = [p for p in wanted if p not in DEFAULT_TENANT_PRIVILEGES]
    if refused or not wanted:
        raise ConfigurationError(
            f"privileges must be among {', '.join(DEFAULT_TENANT_PRIVILEGES)}, got "
            f"{', '.join(refused) or 'none'}"
            + ("; TRUNCATE bypasses row-level security" if "TRUNCATE" in refused else "")
        )
    grantee = quote(role)
    statements = [
        f"GRANT {', '.join(wanted)} ON TABLE "
        f"{', '.join(qualified(t, schema) for t in names)} TO {grantee}"
    ]
    if schema is not None:
        statements.insert(0, f"GRANT USAGE ON SCHEMA {quote(schema)} TO {grantee}")
    _execute(conn, statements)
    _log.info("granted %s on %d table(s) to %s", ", ".join(wanted), len(names), grantee)
