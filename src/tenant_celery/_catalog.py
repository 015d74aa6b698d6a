"""Read-only queries of PostgreSQL's system catalogs.

The one place that knows the catalogs' shape: :mod:`tenant_celery.rls` asks it
about a table's column or a role before changing anything, and
:mod:`tenant_celery.audit` builds its report from it.  Every function runs
plain ``SELECT`` statements on the caller's connection, in the caller's
transaction, and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

#: Table privileges reported per table, in PostgreSQL's order.
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


@dataclass(frozen=True)
class Role:
    """A row of ``pg_roles``."""

    oid: int
    name: str
    #: The name as SQL needs it (``quote_ident``).
    quoted: str
    superuser: bool
    bypassrls: bool
    replication: bool


@dataclass(frozen=True)
class TenantTable:
    """A table or partitioned table with the tenant column, and one role's rights on it."""

    oid: int
    schema: str
    name: str
    #: ``schema.table`` as SQL needs it (``quote_ident``).
    qualified: str
    column_type: str
    quoted_column: str
    rls_enabled: bool
    rls_forced: bool
    owner: str
    #: The role owns the table, directly or through membership of the owning role.
    role_owns: bool
    #: Privileges the role holds on the table (directly, through PUBLIC or membership).
    privileges: tuple[str, ...]


@dataclass(frozen=True)
class Policy:
    """A row-level security policy (``pg_policy``), expressions as PostgreSQL prints them."""

    table_oid: int
    name: str
    permissive: bool
    #: ``ALL``, ``SELECT``, ``INSERT``, ``UPDATE`` or ``DELETE``.
    command: str
    roles: tuple[str, ...]
    #: The policy applies to the role asked about (or to everyone when none was).
    applies: bool
    using: str | None
    check: str | None


_COMMANDS = {"*": "ALL", "r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE"}

_ROLE = sa.text(
    "SELECT oid, rolname, quote_ident(rolname), rolsuper, rolbypassrls, rolreplication"
    " FROM pg_catalog.pg_roles WHERE rolname = :name"
)

_CURRENT_USER = sa.text("SELECT current_user")

_COLUMN_TYPE = sa.text(
    "SELECT to_regclass(:qualified) IS NOT NULL AS found,"
    " (SELECT pg_catalog.format_type(a.atttypid, NULL) FROM pg_catalog.pg_attribute a"
    "   WHERE a.attrelid = to_regclass(:qualified) AND a.attname = :column"
    "   AND a.attnum > 0 AND NOT a.attisdropped) AS column_type"
)

_OWNED_TABLES = sa.text(
    "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)"
    " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relowner = :role_oid AND c.relkind IN ('r', 'p')"
    " ORDER BY 1"
)

# System schemas (pg_catalog, pg_toast, pg_temp_N, ...) all start with "pg_".
_TENANT_TABLES = sa.text(
    "SELECT c.oid, n.nspname, c.relname, quote_ident(n.nspname) || '.' || quote_ident(c.relname),"
    " pg_catalog.format_type(a.atttypid, NULL),"
    " quote_ident(a.attname), c.relrowsecurity, c.relforcerowsecurity,"
    " pg_catalog.pg_get_userbyid(c.relowner),"
    " CASE WHEN CAST(:role_oid AS oid) IS NULL THEN false"
    "      WHEN c.relowner = CAST(:role_oid AS oid) THEN true"
    "      WHEN :role_super THEN false"  # a superuser "is a member" of every role
    "      ELSE pg_catalog.pg_has_role(CAST(:role_oid AS oid), c.relowner, 'USAGE') END,"
    " CASE WHEN CAST(:role_oid AS oid) IS NULL THEN CAST(ARRAY[] AS text[])"
    "      ELSE ARRAY(SELECT p FROM unnest(CAST(:privileges AS text[])) WITH ORDINALITY AS u(p, i)"
    "                 WHERE pg_catalog.has_table_privilege(CAST(:role_oid AS oid), c.oid, p)"
    "                 ORDER BY i) END"
    " FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = :column"
    "  AND a.attnum > 0 AND NOT a.attisdropped"
    " WHERE c.relkind IN ('r', 'p')"
    "  AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'"
    "  AND (CAST(:schema AS text) IS NULL OR n.nspname = CAST(:schema AS text))"
    " ORDER BY n.nspname, c.relname"
)

_POLICIES = sa.text(
    "SELECT p.polrelid, p.polname, p.polpermissive, p.polcmd,"
    " ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE pg_catalog.pg_get_userbyid(r) END"
    "       FROM unnest(p.polroles) AS r ORDER BY 1),"
    " CAST(:role_oid AS oid) IS NULL OR 0 = ANY(p.polroles) OR EXISTS ("
    "   SELECT 1 FROM unnest(p.polroles) AS r"
    "   WHERE r <> 0 AND pg_catalog.pg_has_role(CAST(:role_oid AS oid), r, 'USAGE')),"
    " pg_catalog.pg_get_expr(p.polqual, p.polrelid),"
    " pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid)"
    " FROM pg_catalog.pg_policy p WHERE p.polrelid = ANY(CAST(:oids AS oid[]))"
    " ORDER BY p.polrelid, p.polname"
)

# Valid indexes whose first key is the column itself (not an expression).
_LEADING_INDEXES = sa.text(
    "SELECT i.indrelid, ic.relname"
    " FROM pg_catalog.pg_index i"
    " JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid"
    " JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attname = :column"
    " WHERE i.indrelid = ANY(CAST(:oids AS oid[])) AND i.indisvalid AND i.indkey[0] = a.attnum"
    " ORDER BY i.indrelid, ic.relname"
)


def current_user(conn: Connection) -> str:
    """The role the connection's statements run as."""
    return str(conn.execute(_CURRENT_USER).scalar_one())


def role(conn: Connection, name: str) -> Role | None:
    """The role called ``name``, or ``None`` when there is none."""
    row = conn.execute(_ROLE, {"name": name}).one_or_none()
    if row is None:
        return None
    return Role(int(row[0]), row[1], row[2], bool(row[3]), bool(row[4]), bool(row[5]))


def column_type(conn: Connection, qualified_table: str, column: str) -> tuple[bool, str | None]:
    """``(table found, type of column)`` for a table named as SQL (quoted, maybe qualified).

    The name is resolved like the statement that will use it, through the
    connection's ``search_path`` when unqualified.  The type is ``None`` when
    the table has no such column.
    """
    row = conn.execute(_COLUMN_TYPE, {"qualified": qualified_table, "column": column}).one()
    return bool(row[0]), row[1]


def owned_tables(conn: Connection, role_oid: int) -> list[str]:
    """Tables and partitioned tables of the current database the role owns directly."""
    return [str(name) for (name,) in conn.execute(_OWNED_TABLES, {"role_oid": role_oid})]


def tenant_tables(
    conn: Connection, column: str, schema: str | None, role: Role | None
) -> list[TenantTable]:
    """Every table (outside system schemas, or in ``schema``) that has ``column``.

    Ownership and privileges are those of ``role``; without one they are empty.
    """
    rows = conn.execute(
        _TENANT_TABLES,
        {
            "column": column,
            "schema": schema,
            "role_oid": role.oid if role else None,
            "role_super": role.superuser if role else False,
            "privileges": list(TABLE_PRIVILEGES),
        },
    )
    return [
        TenantTable(
            oid=int(row[0]),
            schema=row[1],
            name=row[2],
            qualified=row[3],
            column_type=row[4],
            quoted_column=row[5],
            rls_enabled=bool(row[6]),
            rls_forced=bool(row[7]),
            owner=row[8],
            role_owns=bool(row[9]),
            privileges=tuple(row[10]),
        )
        for row in rows
    ]


def policies(conn: Connection, table_oids: Sequence[int], role: Role | None) -> list[Policy]:
    """The policies on the given tables, with whether each applies to ``role``."""
    rows = conn.execute(
        _POLICIES, {"oids": list(table_oids), "role_oid": role.oid if role else None}
    )
    return [
        Policy(
            table_oid=int(row[0]),
            name=row[1],
            permissive=bool(row[2]),
            command=_COMMANDS[row[3]],
            roles=tuple(row[4]),
            applies=bool(row[5]),
            using=row[6],
            check=row[7],
        )
        for row in rows
    ]


def leading_indexes(
    conn: Connection, table_oids: Sequence[int], column: str
) -> dict[int, list[str]]:
    """For each table, the valid indexes whose leading key is ``column``."""
    found: dict[int, list[str]] = {}
    for oid, name in conn.execute(_LEADING_INDEXES, {"oids": list(table_oids), "column": column}):
        found.setdefault(int(oid), []).append(name)
    return found
