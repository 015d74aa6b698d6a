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
    # MEMBER, not USAGE: a NOINHERIT member still reaches the owner with SET ROLE.
    "      ELSE pg_catalog.pg_has_role(CAST(:role_oid AS oid), c.relowner, 'MEMBER') END,"
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


# ------------------------------------------------------------- role memberships


@dataclass(frozen=True)
class Membership:
    """A superuser or ``BYPASSRLS`` role another role can ``SET ROLE`` to."""

    name: str
    superuser: bool
    bypassrls: bool
    #: The granted roles from the member's direct grant to this one, in order.
    path: tuple[str, ...]
    #: The first role of ``path`` as SQL needs it: the grant to revoke.
    quoted_first: str

    @property
    def attribute(self) -> str:
        """``"SUPERUSER"`` or ``"BYPASSRLS"``: why the role bypasses row-level security."""
        return "SUPERUSER" if self.superuser else "BYPASSRLS"


# SET ROLE is allowed to any role reached through a chain of grants, whatever
# INHERIT says; from PostgreSQL 16 only through grants made WITH SET TRUE.  The
# set_option column does not exist before 16: reading it through to_jsonb keeps
# one query for every version.
_BYPASSING_MEMBERSHIPS = sa.text(
    "WITH RECURSIVE reach(roleid, path) AS ("
    "  SELECT m.roleid, ARRAY[m.roleid] FROM pg_catalog.pg_auth_members m"
    "  WHERE m.member = CAST(:role_oid AS oid)"
    "   AND COALESCE(CAST(to_jsonb(m) ->> 'set_option' AS boolean), true)"
    "  UNION ALL"
    "  SELECT m.roleid, r.path || m.roleid FROM reach r"
    "  JOIN pg_catalog.pg_auth_members m ON m.member = r.roleid"
    "  WHERE m.roleid <> ALL(r.path) AND m.roleid <> CAST(:role_oid AS oid)"
    "   AND COALESCE(CAST(to_jsonb(m) ->> 'set_option' AS boolean), true)"
    ")"
    " SELECT DISTINCT ON (a.rolname) a.rolname, a.rolsuper, a.rolbypassrls,"
    "  ARRAY(SELECT pg_catalog.pg_get_userbyid(p) FROM unnest(r.path) WITH ORDINALITY AS u(p, i)"
    "        ORDER BY i),"
    "  quote_ident(pg_catalog.pg_get_userbyid(r.path[1]))"
    " FROM reach r JOIN pg_catalog.pg_roles a ON a.oid = r.roleid"
    " WHERE a.rolsuper OR a.rolbypassrls"
    " ORDER BY a.rolname, array_length(r.path, 1)"
)


def bypassing_memberships(conn: Connection, role_oid: int) -> list[Membership]:
    """Superuser and ``BYPASSRLS`` roles the role can ``SET ROLE`` to, each with the
    shortest chain of grants that leads there; by name."""
    return [
        Membership(row[0], bool(row[1]), bool(row[2]), tuple(row[3]), row[4])
        for row in conn.execute(_BYPASSING_MEMBERSHIPS, {"role_oid": role_oid})
    ]


# -------------------------------------------- objects that read tenant tables


@dataclass(frozen=True)
class DerivedRelation:
    """A view or materialized view outside PostgreSQL's own schemas."""

    oid: int
    #: ``schema.name`` as SQL needs it (``quote_ident``).
    qualified: str
    materialized: bool
    owner_oid: int
    owner: str
    #: ``security_invoker`` is set: the view reads its tables as its caller, not its owner.
    security_invoker: bool
    #: The role asked about has ``USAGE`` on its schema, so can name it.
    schema_usable: bool
    #: Relations its query names (tables, views, materialized views).
    references: tuple[int, ...]


_DERIVED_RELATIONS = sa.text(
    "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relkind = 'm',"
    " c.relowner, pg_catalog.pg_get_userbyid(c.relowner),"
    " COALESCE((SELECT CAST(o.option_value AS boolean)"
    "           FROM pg_catalog.pg_options_to_table(c.reloptions) o"
    "           WHERE o.option_name = 'security_invoker'), false),"
    " pg_catalog.has_schema_privilege(CAST(:role_oid AS oid), n.oid, 'USAGE'),"
    " ARRAY(SELECT DISTINCT d.refobjid FROM pg_catalog.pg_rewrite w"
    "       JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass"
    "        AND d.objid = w.oid AND d.refclassid = 'pg_catalog.pg_class'::regclass"
    "       WHERE w.ev_class = c.oid AND d.refobjid <> c.oid ORDER BY 1)"
    " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind IN ('v', 'm')"
    "  AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'"
    " ORDER BY 2"
)

# Pairs (role, relation) where the role may SELECT the relation, or some column of it.
_READABLE = sa.text(
    "SELECT r.oid, c.oid FROM unnest(CAST(:roles AS oid[])) AS r(oid),"
    " unnest(CAST(:relations AS oid[])) AS c(oid)"
    " WHERE pg_catalog.has_any_column_privilege(r.oid, c.oid, 'SELECT')"
)

# Pairs (role, tenant table) where the role's queries skip the table's policies:
# a superuser, BYPASSRLS, or a role with its owner's privileges while RLS is not forced.
_BYPASSES = sa.text(
    "SELECT a.oid, c.oid, a.rolsuper, a.rolbypassrls"
    " FROM pg_catalog.pg_roles a, pg_catalog.pg_class c"
    " WHERE a.oid = ANY(CAST(:roles AS oid[])) AND c.oid = ANY(CAST(:tables AS oid[]))"
    "  AND (a.rolsuper OR a.rolbypassrls"
    "       OR (NOT c.relforcerowsecurity AND pg_catalog.pg_has_role(a.oid, c.relowner, 'USAGE')))"
)


def derived_relations(conn: Connection, role_oid: int) -> list[DerivedRelation]:
    """Every view and materialized view outside system schemas, by name."""
    return [
        DerivedRelation(
            oid=int(row[0]),
            qualified=row[1],
            materialized=bool(row[2]),
            owner_oid=int(row[3]),
            owner=row[4],
            security_invoker=bool(row[5]),
            schema_usable=bool(row[6]),
            references=tuple(int(oid) for oid in row[7]),
        )
        for row in conn.execute(_DERIVED_RELATIONS, {"role_oid": role_oid})
    ]


def readable(
    conn: Connection, role_oids: Sequence[int], relation_oids: Sequence[int]
) -> set[tuple[int, int]]:
    """``(role, relation)`` pairs where the role may ``SELECT`` the relation (or a column)."""
    rows = conn.execute(_READABLE, {"roles": list(role_oids), "relations": list(relation_oids)})
    return {(int(role), int(relation)) for role, relation in rows}


def bypasses(
    conn: Connection, role_oids: Sequence[int], table_oids: Sequence[int]
) -> dict[tuple[int, int], str]:
    """``(role, table)`` pairs where the role skips the table's policies, with why:
    ``"superuser"``, ``"bypassrls"`` or ``"owner"`` (RLS not forced)."""
    rows = conn.execute(_BYPASSES, {"roles": list(role_oids), "tables": list(table_oids)})
    return {
        (int(role), int(table)): "superuser" if superuser else "bypassrls" if bypass else "owner"
        for role, table, superuser, bypass in rows
    }


# ------------------------------------------------ tables reached by foreign key

_FOREIGN_KEYS = sa.text(
    "SELECT DISTINCT conrelid, confrelid FROM pg_catalog.pg_constraint"
    " WHERE contype = 'f' AND conrelid <> confrelid ORDER BY 1, 2"
)


@dataclass(frozen=True)
class LinkedTable:
    """A table reached by foreign key, and one role's rights on it."""

    oid: int
    qualified: str
    has_column: bool
    rls_enabled: bool
    #: Of ``SELECT``, ``INSERT``, ``UPDATE``, ``DELETE``, ``TRUNCATE``: those the role
    #: holds on the table or on some column, empty when it cannot name the schema.
    privileges: tuple[str, ...]


_LINKED_TABLES = sa.text(
    "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname),"
    " EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid"
    "         AND a.attname = :column AND a.attnum > 0 AND NOT a.attisdropped),"
    " c.relrowsecurity,"
    " CASE WHEN pg_catalog.has_schema_privilege(CAST(:role_oid AS oid), n.oid, 'USAGE') THEN"
    "  ARRAY(SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE'])"
    "        WITH ORDINALITY AS u(p, i)"
    "        WHERE CASE WHEN p IN ('SELECT', 'INSERT', 'UPDATE')"
    "              THEN pg_catalog.has_any_column_privilege(CAST(:role_oid AS oid), c.oid, p)"
    "              ELSE pg_catalog.has_table_privilege(CAST(:role_oid AS oid), c.oid, p) END"
    "        ORDER BY i)"
    "  ELSE CAST(ARRAY[] AS text[]) END"
    " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.oid = ANY(CAST(:oids AS oid[])) AND c.relkind IN ('r', 'p')"
    " ORDER BY 2"
)


def foreign_keys(conn: Connection) -> list[tuple[int, int]]:
    """Every ``(referencing table, referenced table)`` pair of a foreign key."""
    return [(int(child), int(parent)) for child, parent in conn.execute(_FOREIGN_KEYS)]


def linked_tables(
    conn: Connection, table_oids: Sequence[int], column: str, role_oid: int
) -> list[LinkedTable]:
    """The given tables (not views), with whether they have ``column`` and ``role``'s rights."""
    rows = conn.execute(
        _LINKED_TABLES, {"oids": list(table_oids), "column": column, "role_oid": role_oid}
    )
    return [
        LinkedTable(int(row[0]), row[1], bool(row[2]), bool(row[3]), tuple(row[4])) for row in rows
    ]


# --------------------------------------------------------- SECURITY DEFINER code


@dataclass(frozen=True)
class DefinerRoutine:
    """A ``SECURITY DEFINER`` function or procedure a role may execute."""

    #: ``schema.name(argument types)``, as ``ALTER FUNCTION`` takes it.
    signature: str
    procedure: bool
    owner: str
    owner_superuser: bool
    owner_bypassrls: bool
    #: Tenant tables (of those asked about) whose owner's privileges its owner has.
    owner_tables: tuple[str, ...]


# Routines of extensions are left out: their code is the extension's.
_DEFINER_ROUTINES = sa.text(
    "SELECT quote_ident(n.nspname) || '.' || quote_ident(p.proname)"
    "  || '(' || pg_catalog.pg_get_function_identity_arguments(p.oid) || ')',"
    " p.prokind = 'p', o.rolname, o.rolsuper, o.rolbypassrls,"
    " ARRAY(SELECT quote_ident(tn.nspname) || '.' || quote_ident(t.relname)"
    "       FROM pg_catalog.pg_class t JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace"
    "       WHERE t.oid = ANY(CAST(:tables AS oid[]))"
    "        AND pg_catalog.pg_has_role(p.proowner, t.relowner, 'USAGE') ORDER BY 1)"
    " FROM pg_catalog.pg_proc p"
    " JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
    " JOIN pg_catalog.pg_roles o ON o.oid = p.proowner"
    " WHERE p.prosecdef AND p.proowner <> CAST(:role_oid AS oid)"
    "  AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'"
    "  AND (CAST(:schema AS text) IS NULL OR n.nspname = CAST(:schema AS text))"
    "  AND pg_catalog.has_schema_privilege(CAST(:role_oid AS oid), n.oid, 'USAGE')"
    "  AND pg_catalog.has_function_privilege(CAST(:role_oid AS oid), p.oid, 'EXECUTE')"
    "  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d"
    "   WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')"
    " ORDER BY 1"
)


def definer_routines(
    conn: Connection, role_oid: int, schema: str | None, tenant_oids: Sequence[int]
) -> list[DefinerRoutine]:
    """``SECURITY DEFINER`` routines outside system schemas (or in ``schema``), not
    owned by the role, that the role may execute (``EXECUTE`` granted to it, to a
    role it belongs to or to ``PUBLIC``, and ``USAGE`` on the schema)."""
    rows = conn.execute(
        _DEFINER_ROUTINES,
        {"role_oid": role_oid, "schema": schema, "tables": list(tenant_oids)},
    )
    return [
        DefinerRoutine(row[0], bool(row[1]), row[2], bool(row[3]), bool(row[4]), tuple(row[5]))
        for row in rows
    ]
