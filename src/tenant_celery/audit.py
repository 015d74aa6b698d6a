"""Inspect a live database for holes in its tenant isolation.

:func:`audit_database` reads the catalogs (nothing is changed) and returns an
:class:`AuditReport`: one :class:`TableReport` per table that has the tenant
column, one :class:`RoleReport` for the role the workers connect as, and the
:class:`Problem` list found.  ``tenant-celery check`` prints it.

A table is clean when row-level security is enabled and forced, one permissive
policy ``FOR ALL`` that applies to the role reads the tenant setting in both
``USING`` and ``WITH CHECK``, no other permissive policy that applies to the
role leaves the setting out (permissive policies are OR-ed, so such a policy
widens access), an index leads with the tenant column, the role does not own
it and cannot ``TRUNCATE`` it.  The role is clean when it exists, is
neither a superuser nor ``BYPASSRLS``, and cannot ``SET ROLE`` to a role that
is (through any chain of memberships).

Around the tables, nothing may show the role rows the policies would hide: a
materialized view of a tenant table it can read, a view that reads a tenant
table as an owner who skips its policies, a table that references a tenant
table by foreign key with neither the tenant column nor row-level security,
or a ``SECURITY DEFINER`` routine it may execute that runs as a role able to
read past the policies.

Policies are judged by their text as PostgreSQL prints it.  An expression
pins rows to the tenant when it is ``<column> = <value>``, alone or AND-ed
with other terms but never OR-ed, where ``<value>`` calls
``current_setting('<setting>'...)`` and does not name the column.  That
recognises the policy :func:`~tenant_celery.rls.enable_tenant_rls` writes and
hand-written equivalents, and flags any other permissive policy, including
``USING (true)``, ``... OR <anything>`` and ``COALESCE(<setting>, <column>)``.
It reads text; it does not prove an arbitrary expression safe.

Celery's result tables (``celery_taskmeta``, ``celery_tasksetmeta``) have the
tenant column from revision ``tc0004`` of the bundled migration, and the
tenant policy on them is the host's choice: with row-level security off and
no policy they are listed apart (:attr:`AuditReport.results_outside_policy`),
not as problems; with it on they are checked like every tenant table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.engine import Connection

from . import _catalog, _exposure
from ._policy_text import pins_tenant
from ._result_tables import RESULT_TABLES, TENANT_COLUMN
from .config import DEFAULT_GUC, validate_guc_name

__all__ = [
    "BYPASSING_DEFINER_FUNCTION",
    "BYPASSING_MEMBERSHIP",
    "BYPASSING_VIEW",
    "EXPOSED_MATVIEW",
    "NO_TENANT_INDEX",
    "NO_TENANT_POLICY",
    "NO_TENANT_TABLES",
    "POLICY_WITHOUT_CHECK",
    "RLS_DISABLED",
    "RLS_NOT_FORCED",
    "ROLE_BYPASSRLS",
    "ROLE_MISSING",
    "ROLE_OWNS_TABLE",
    "ROLE_SUPERUSER",
    "TRUNCATE_GRANTED",
    "UNPROTECTED_CHILD_TABLE",
    "WIDENING_POLICY",
    "AuditReport",
    "Problem",
    "RoleReport",
    "TableReport",
    "audit_database",
]

# Problem codes: stable strings, listed in one table in docs/reference/cli.md.
RLS_DISABLED = "rls_disabled"
"""Row-level security is not enabled on the table: every row is visible."""
RLS_NOT_FORCED = "rls_not_forced"
"""Row-level security is not forced: the table's owner bypasses it."""
NO_TENANT_POLICY = "no_tenant_policy"
"""No permissive ``FOR ALL`` policy applying to the role reads the tenant setting."""
POLICY_WITHOUT_CHECK = "policy_without_check"
"""The tenant policy has no ``WITH CHECK`` expression of its own."""
WIDENING_POLICY = "widening_policy"
"""Another permissive policy applies to the role without reading the setting."""
NO_TENANT_INDEX = "no_tenant_index"
"""No valid index has the tenant column as its leading key."""
ROLE_OWNS_TABLE = "role_owns_table"
"""The role owns the table (or is a member of its owner) and can turn RLS off."""
TRUNCATE_GRANTED = "truncate_granted"
"""The role may ``TRUNCATE`` the table, which ignores row-level security."""
ROLE_MISSING = "role_missing"
"""The role does not exist."""
ROLE_SUPERUSER = "role_superuser"
"""The role is a superuser: it bypasses row-level security."""
ROLE_BYPASSRLS = "role_bypassrls"
"""The role has ``BYPASSRLS``: it bypasses row-level security."""
BYPASSING_MEMBERSHIP = "bypassing_membership"
"""The role can ``SET ROLE`` to a superuser or ``BYPASSRLS`` role it is a member of."""
NO_TENANT_TABLES = "no_tenant_tables"
"""No table has the tenant column: wrong ``column`` or ``schema``, or nothing migrated."""
EXPOSED_MATVIEW = "exposed_matview"
"""The role can read a materialized view of a tenant table; it has no row-level security."""
BYPASSING_VIEW = "bypassing_view"
"""The role can read a view that reads a tenant table as an owner who skips its policies."""
UNPROTECTED_CHILD_TABLE = "unprotected_child_table"
"""A table referencing a tenant table has no tenant column, no RLS, and the role's grants."""
BYPASSING_DEFINER_FUNCTION = "bypassing_definer_function"
"""The role may execute a ``SECURITY DEFINER`` routine whose owner reads past the policies."""


@dataclass(frozen=True)
class Problem:
    """One hole: a stable ``code``, the object it concerns and a message saying
    what to do.

    ``table`` is the tenant table, or the view, materialized view, table or
    routine (``schema.name(argument types)``) that exposes tenant rows; ``None``
    for the role or the database.
    """

    code: str
    table: str | None
    message: str


@dataclass(frozen=True)
class TableReport:
    """What the audit found on one table with the tenant column."""

    #: ``schema.table``, each part quoted where SQL needs it.
    name: str
    schema: str
    table: str
    column_type: str
    owner: str
    rls_enabled: bool
    rls_forced: bool
    #: The permissive ``FOR ALL`` policy reading the setting in ``USING``, if any.
    tenant_policy: str | None
    #: Whether that policy has its own ``WITH CHECK`` reading the setting.
    tenant_policy_checks: bool
    #: Other permissive policies applying to the role that do not read the setting.
    widening_policies: tuple[str, ...]
    #: Valid indexes whose leading key is the tenant column.
    tenant_indexes: tuple[str, ...]
    role_owns: bool
    #: The role's privileges on the table (``SELECT``, ``INSERT``, ...).
    privileges: tuple[str, ...]
    problems: tuple[Problem, ...] = field(default=())


@dataclass(frozen=True)
class RoleReport:
    """The role whose view of the tables the audit checked."""

    name: str
    exists: bool
    superuser: bool
    bypassrls: bool
    #: Tenant tables it owns (or whose owner it is a member of).
    owned_tables: tuple[str, ...]
    #: Superuser or ``BYPASSRLS`` roles it can ``SET ROLE`` to through its memberships.
    bypassing_roles: tuple[str, ...] = field(default=())
    problems: tuple[Problem, ...] = field(default=())


@dataclass(frozen=True)
class AuditReport:
    """The result of :func:`audit_database`; ``clean`` when it found no problem."""

    setting: str
    column: str
    schema: str | None
    role: RoleReport
    tables: tuple[TableReport, ...]
    #: Problems not tied to a table or the role (e.g. no tenant table at all).
    database_problems: tuple[Problem, ...] = field(default=())
    #: Views, materialized views, tables and routines that expose tenant rows.
    object_problems: tuple[Problem, ...] = field(default=())
    #: Celery's result tables whose rows name their tenant (revision ``tc0004``) but
    #: that are not under the tenant policy, which is the host's opt-in: not a
    #: problem, and not in :attr:`tables`; any role with ``SELECT`` reads every
    #: tenant's results in them.
    results_outside_policy: tuple[str, ...] = field(default=())

    @property
    def problems(self) -> tuple[Problem, ...]:
        """Every problem: the database's, the role's, each table's in order, then
        the other objects'."""
        found = list(self.database_problems) + list(self.role.problems)
        for table in self.tables:
            found.extend(table.problems)
        return (*found, *self.object_problems)

    @property
    def clean(self) -> bool:
        """Whether no problem was found."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (the ``tenant-celery check --json`` document).

        Keys: ``clean``, ``setting``, ``column``, ``schema``, ``role`` (``name``,
        ``exists``, ``superuser``, ``bypassrls``, ``owned_tables``,
        ``bypassing_roles``), ``tables`` (one object per :class:`TableReport`
        field except ``problems``), ``problems`` (``code``, ``table``,
        ``message``; ``table`` is ``null`` for the role's and the database's)
        and ``results_outside_policy`` (names of tables).
        """
        role = asdict(self.role)
        del role["problems"]
        tables = []
        for table in self.tables:
            data = asdict(table)
            del data["problems"]
            tables.append(data)
        return {
            "clean": self.clean,
            "setting": self.setting,
            "column": self.column,
            "schema": self.schema,
            "role": role,
            "tables": tables,
            "problems": [asdict(p) for p in self.problems],
            "results_outside_policy": list(self.results_outside_policy),
        }


def audit_database(
    conn: Connection,
    *,
    role: str | None = None,
    column: str = "tenant_id",
    setting: str = DEFAULT_GUC,
    schema: str | None = None,
) -> AuditReport:
    """Inspect the database ``conn`` is connected to; change nothing.

    Every table (or partitioned table) outside PostgreSQL's own schemas, or in
    ``schema`` only, that has a column named ``column`` is checked for the
    policy on ``setting`` and for ``role``'s rights (default: the role ``conn``
    is connected as).  Views, materialized views and tables reading or
    referencing those tables are looked for in every schema but PostgreSQL's
    own; ``SECURITY DEFINER`` routines in ``schema`` when given.  Any role may
    run it: the catalogs it reads are readable by every role.  It runs plain
    ``SELECT`` statements in the caller's transaction.

    Raises:
        ConfigurationError: ``setting`` is not a valid setting name.
        sqlalchemy.exc.DBAPIError: a catalog query failed.
    """
    setting = validate_guc_name(setting)
    role_name = role if role is not None else _catalog.current_user(conn)
    found_role = _catalog.role(conn, role_name)
    tables = _catalog.tenant_tables(conn, column, schema, found_role)
    oids = [t.oid for t in tables]
    policies = _catalog.policies(conn, oids, found_role) if oids else []
    outside = [t for t in tables if _results_outside_policy(t, policies, column)]
    tables = [t for t in tables if t not in outside]
    oids = [t.oid for t in tables]
    indexes = _catalog.leading_indexes(conn, oids, column) if oids else {}

    reports = tuple(
        _table_report(
            t,
            [p for p in policies if p.table_oid == t.oid],
            indexes.get(t.oid, []),
            setting,
            role_name,
            found_role,
        )
        for t in tables
    )
    memberships = _catalog.bypassing_memberships(conn, found_role.oid) if found_role else []
    object_problems: tuple[Problem, ...] = ()
    if found_role is not None and not found_role.superuser:  # a superuser reads it all anyway
        object_problems = _object_problems(conn, found_role, tables, column, schema)
    database_problems: tuple[Problem, ...] = ()
    if not reports:
        where = f"in schema {schema!r}" if schema is not None else "outside system schemas"
        database_problems = (
            Problem(
                NO_TENANT_TABLES,
                None,
                f"no table {where}"
                + (" but Celery's result tables" if outside else "")
                + f" has a column {column!r}; check --column and --schema",
            ),
        )
    return AuditReport(
        setting=setting,
        column=column,
        schema=schema,
        role=_role_report(role_name, found_role, memberships, reports),
        tables=reports,
        database_problems=database_problems,
        object_problems=object_problems,
        results_outside_policy=tuple(t.qualified for t in outside),
    )


def _results_outside_policy(
    table: _catalog.TenantTable, policies: list[_catalog.Policy], column: str
) -> bool:
    """Whether ``table`` is one of Celery's result tables the host left out of the
    tenant policy: row-level security neither enabled nor forced, and no policy."""
    return (
        table.name in RESULT_TABLES
        and column == TENANT_COLUMN
        and not table.rls_enabled
        and not table.rls_forced
        and not any(p.table_oid == table.oid for p in policies)
    )


def _table_report(
    table: _catalog.TenantTable,
    policies: list[_catalog.Policy],
    indexes: list[str],
    setting: str,
    role_name: str,
    role: _catalog.Role | None,
) -> TableReport:
    name = table.qualified
    problems: list[Problem] = []

    def hole(code: str, message: str) -> None:
        problems.append(Problem(code, name, message))

    if not table.rls_enabled:
        hole(
            RLS_DISABLED,
            f"row-level security is off: ALTER TABLE {name} ENABLE ROW LEVEL SECURITY",
        )
    if not table.rls_forced:
        hole(
            RLS_NOT_FORCED,
            f"row-level security is not forced, so the owner {table.owner!r} bypasses it: "
            f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY",
        )

    column = table.quoted_column
    applying = [p for p in policies if p.permissive and p.applies]
    tenant = next(
        (p for p in applying if p.command == "ALL" and pins_tenant(p.using, setting, column)),
        None,
    )
    checks = tenant is not None and pins_tenant(tenant.check, setting, column)
    # Every expression a policy has must be bound (INSERT has only WITH CHECK,
    # SELECT and DELETE only USING; ALL and UPDATE reuse USING when WITH CHECK is absent).
    widening = tuple(
        p.name
        for p in applying
        if p is not tenant
        and not all(pins_tenant(e, setting, column) for e in (p.using, p.check) if e is not None)
    )
    if tenant is None:
        hole(
            NO_TENANT_POLICY,
            f"no permissive FOR ALL policy applying to {role_name!r} compares {column} "
            f"with current_setting('{setting}'): add one with enable_tenant_rls()",
        )
    elif tenant.check is None:
        hole(
            POLICY_WITHOUT_CHECK,
            f"policy {tenant.name!r} has no WITH CHECK of its own: recreate it with "
            f"WITH CHECK on the same expression",
        )
    elif not checks:
        widening = (*widening, tenant.name)
    for policy in widening:
        hole(
            WIDENING_POLICY,
            f"permissive policy {policy!r} applies to {role_name!r} without reading "
            f"'{setting}' and is OR-ed with the tenant policy: drop it or make it RESTRICTIVE",
        )
    if not indexes:
        hole(
            NO_TENANT_INDEX,
            f"no index leads with {column}: every tenant query scans the whole table; "
            f"CREATE INDEX ON {name} ({column}, ...)",
        )
    if role is None or role.superuser:
        pass  # reported once for the role; its rights on each table add nothing
    elif table.role_owns:
        how = (
            "owns the table"
            if table.owner == role.name
            else f"is a member of its owner {table.owner!r}"
        )
        hole(
            ROLE_OWNS_TABLE,
            f"{role_name!r} {how} and can turn row-level security off: "
            f"ALTER TABLE {name} OWNER TO <another role>",
        )
    elif "TRUNCATE" in table.privileges:  # an owner's TRUNCATE goes without saying
        hole(
            TRUNCATE_GRANTED,
            f"{role_name!r} may TRUNCATE, which ignores row-level security: "
            f"REVOKE TRUNCATE ON {name} FROM {role.quoted}",
        )
    return TableReport(
        name=name,
        schema=table.schema,
        table=table.name,
        column_type=table.column_type,
        owner=table.owner,
        rls_enabled=table.rls_enabled,
        rls_forced=table.rls_forced,
        tenant_policy=tenant.name if tenant else None,
        tenant_policy_checks=checks,
        widening_policies=widening,
        tenant_indexes=tuple(indexes),
        role_owns=table.role_owns,
        privileges=table.privileges,
        problems=tuple(problems),
    )


def _role_report(
    name: str,
    role: _catalog.Role | None,
    memberships: list[_catalog.Membership],
    tables: tuple[TableReport, ...],
) -> RoleReport:
    if role is None:
        return RoleReport(
            name,
            exists=False,
            superuser=False,
            bypassrls=False,
            owned_tables=(),
            problems=(Problem(ROLE_MISSING, None, f"role {name!r} does not exist; check --role"),),
        )
    problems = []
    if role.superuser:
        problems.append(
            Problem(ROLE_SUPERUSER, None, f"role {name!r} is a superuser and bypasses every policy")
        )
    if role.bypassrls:
        problems.append(
            Problem(
                ROLE_BYPASSRLS,
                None,
                f"role {name!r} has BYPASSRLS and ignores every policy: "
                f"ALTER ROLE {role.quoted} NOBYPASSRLS",
            )
        )
    problems.extend(
        Problem(
            BYPASSING_MEMBERSHIP,
            None,
            f"role {name!r} can SET ROLE to {m.name!r} ({m.attribute}) through "
            f"{' -> '.join(repr(r) for r in (name, *m.path))} and then reads every tenant's "
            f"rows: REVOKE {m.quoted_first} FROM {role.quoted}",
        )
        for m in memberships
    )
    return RoleReport(
        name,
        exists=True,
        superuser=role.superuser,
        bypassrls=role.bypassrls,
        owned_tables=tuple(t.name for t in tables if t.role_owns),
        bypassing_roles=tuple(m.name for m in memberships),
        problems=tuple(problems),
    )


_WHO = {
    "superuser": "is a superuser",
    "bypassrls": "has BYPASSRLS",
}


def _object_problems(
    conn: Connection,
    role: _catalog.Role,
    tables: list[_catalog.TenantTable],
    column: str,
    schema: str | None,
) -> tuple[Problem, ...]:
    names = {t.oid: t.qualified for t in tables}
    exposures = [
        *_exposure.relation_exposures(conn, role.oid, names, column),
        *_exposure.routine_exposures(conn, role.oid, schema, names),
    ]
    return tuple(Problem(*_describe(e, role, column)) for e in exposures)


def _describe(
    exposure: _exposure.Exposure, role: _catalog.Role, column: str
) -> tuple[str, str, str]:
    """``(code, object, message)`` for one exposure."""
    who = repr(role.name)
    match exposure:
        case _exposure.ExposedMatview(name, tables, via):
            fix = (
                f"through view {via}: REVOKE SELECT ON {via} FROM {role.quoted}, PUBLIC"
                if via
                else f": REVOKE SELECT ON {name} FROM {role.quoted}, PUBLIC"
            )
            return (
                EXPOSED_MATVIEW,
                name,
                f"materialized view {name} holds rows of {', '.join(tables)} for every tenant "
                f"(materialized views have no row-level security) and {who} may read it"
                f"{' ' if via else ''}{fix}, or replace it with a view "
                f"WITH (security_invoker = true)",
            )
        case _exposure.BypassingView(name, owner, reason, table, via):
            why = _WHO.get(
                reason, f"has the privileges of the owner of {table}, whose RLS is not forced"
            )
            through = f" through view {via}" if via else ""
            return (
                BYPASSING_VIEW,
                name,
                f"view {name} reads {table} as its owner {owner!r}, who {why}, so {who} sees "
                f"every tenant's rows through it{through}: "
                f"ALTER VIEW {name} SET (security_invoker = true)",
            )
        case _exposure.ChildTable(name, references, privileges):
            *between, root = references
            through = f" through {', '.join(between)}" if between else ""
            return (
                UNPROTECTED_CHILD_TABLE,
                name,
                f"table {name} references tenant table {root}{through} by foreign key but has no "
                f"{column} column and no row-level security, so {who} may "
                f"{', '.join(privileges)} every tenant's rows: add the tenant column and "
                f"enable_tenant_rls(), or enable row-level security with a policy of its own",
            )
        case _exposure.DefinerRoutine(signature, procedure, owner, reason, tables):
            kind = "PROCEDURE" if procedure else "FUNCTION"
            why = _WHO.get(
                reason,
                f"has the privileges of the owner of {', '.join(tables)} and can turn "
                "row-level security off",
            )
            return (
                BYPASSING_DEFINER_FUNCTION,
                signature,
                f"SECURITY DEFINER {kind.lower()} {signature} runs as {owner!r}, who {why}, and "
                f"{who} may execute it: ALTER {kind} {signature} SECURITY INVOKER, give it an "
                f"owner bound by the policies, or REVOKE EXECUTE ON {kind} {signature} "
                f"FROM PUBLIC, {role.quoted}",
            )
    raise AssertionError(exposure)
