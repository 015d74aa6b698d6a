"""Objects other than the tenant tables that show a role every tenant's rows.

:mod:`tenant_celery.audit` judges each tenant table's own policies; this
module finds the ways around them, from the catalogs (it changes nothing):

- a **materialized view** that reads a tenant table, directly or through other
  views, and that the role can read: it has no row-level security, and holds
  what the role that refreshed it could see;
- a **view** that reads a tenant table as an owner who skips the table's
  policies (a superuser, ``BYPASSRLS``, or a role with the privileges of the
  table's owner while RLS is not forced), when the role can read the view;
- a **table that references a tenant table** by foreign key, directly or
  through other such tables, that has no tenant column and no row-level
  security, when the role holds any of ``SELECT``, ``INSERT``, ``UPDATE``,
  ``DELETE`` or ``TRUNCATE`` on it;
- a **SECURITY DEFINER routine** the role may execute, owned by a superuser,
  a ``BYPASSRLS`` role, or a role with the privileges of a tenant table's
  owner (which can switch that table's RLS off).

"Can read" follows PostgreSQL's own checks: ``USAGE`` on the schema and
``SELECT`` (on the relation or a column), through ``PUBLIC`` and role
membership too; a view reads what it names as its owner unless it is
``security_invoker``, and a view read through another view must be readable
by whoever reads it there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from . import _catalog


@dataclass(frozen=True)
class ExposedMatview:
    """A materialized view of tenant tables that the role can read."""

    name: str
    tables: tuple[str, ...]
    #: The view the role reads it through, or ``None`` when it reads it directly.
    via: str | None


@dataclass(frozen=True)
class BypassingView:
    """A view that reads a tenant table as an owner who skips its policies."""

    name: str
    owner: str
    #: ``"superuser"``, ``"bypassrls"`` or ``"owner"`` (of the table, RLS not forced).
    reason: str
    table: str
    #: The view the role reads it through, or ``None`` when it reads it directly.
    via: str | None


@dataclass(frozen=True)
class ChildTable:
    """A table that references a tenant table but has neither the column nor RLS."""

    name: str
    #: The tables its foreign keys lead through, ending with the tenant table.
    references: tuple[str, ...]
    privileges: tuple[str, ...]


@dataclass(frozen=True)
class DefinerRoutine:
    """A ``SECURITY DEFINER`` routine the role may execute, owned by a role that
    reads past the policies or can switch them off."""

    #: ``schema.name(argument types)``.
    signature: str
    procedure: bool
    owner: str
    #: ``"superuser"``, ``"bypassrls"`` or ``"owner"`` (of the tenant tables in ``tables``).
    reason: str
    tables: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.signature


Exposure = ExposedMatview | BypassingView | ChildTable | DefinerRoutine
_ViewExposure = ExposedMatview | BypassingView


def relation_exposures(
    conn: Connection,
    role_oid: int,
    tenant_tables: Mapping[int, str],
    column: str,
) -> list[Exposure]:
    """Views, materialized views and referencing tables that expose ``tenant_tables``
    (oid to name) to the role, in a stable order."""
    found: list[Exposure] = list(_Views(conn, role_oid, tenant_tables).exposures())
    found.extend(_child_tables(conn, role_oid, tenant_tables, column))
    return found


def routine_exposures(
    conn: Connection, role_oid: int, schema: str | None, tenant_tables: Mapping[int, str]
) -> list[DefinerRoutine]:
    """``SECURITY DEFINER`` routines (outside extensions, in ``schema`` when given)
    the role may execute, whose owner is a superuser, ``BYPASSRLS``, or has the
    privileges of a tenant table's owner.

    The audit does not read a routine's body: its owner decides what the body
    could do, whatever it does today.
    """
    found = []
    for routine in _catalog.definer_routines(conn, role_oid, schema, list(tenant_tables)):
        if routine.owner_superuser or routine.owner_bypassrls or routine.owner_tables:
            reason = (
                "superuser"
                if routine.owner_superuser
                else "bypassrls"
                if routine.owner_bypassrls
                else "owner"
            )
            found.append(
                DefinerRoutine(
                    routine.signature,
                    routine.procedure,
                    routine.owner,
                    reason,
                    routine.owner_tables,
                )
            )
    return found


class _Views:
    """Walks views as PostgreSQL runs them, from those the role may read."""

    def __init__(self, conn: Connection, role_oid: int, tenant_tables: Mapping[int, str]) -> None:
        self.role_oid = role_oid
        self.tenant_tables = tenant_tables
        self.relations = {r.oid: r for r in _catalog.derived_relations(conn, role_oid)}
        owners = sorted({r.owner_oid for r in self.relations.values()} - {role_oid})
        self.readable = _catalog.readable(conn, [role_oid, *owners], list(self.relations))
        self.bypasses = (
            _catalog.bypasses(conn, owners, list(tenant_tables)) if tenant_tables and owners else {}
        )
        self._sources: dict[int, tuple[str, ...]] = {}
        self._seen: set[tuple[int, int, int, int | None]] = set()

    def exposures(self) -> Iterator[_ViewExposure]:
        found: dict[tuple[type, str], _ViewExposure] = {}
        for relation in self.relations.values():
            if relation.schema_usable and (self.role_oid, relation.oid) in self.readable:
                for exposure in self._visit(relation, self.role_oid, None, relation):
                    key = (type(exposure), exposure.name)
                    if key not in found or exposure.via is None:  # reading it directly wins
                        found[key] = exposure
        return iter(sorted(found.values(), key=lambda e: (type(e).__name__, e.name)))

    def _visit(
        self,
        relation: _catalog.DerivedRelation,
        reader: int,
        definer: _catalog.DerivedRelation | None,
        entry: _catalog.DerivedRelation,
    ) -> Iterator[_ViewExposure]:
        """What ``reader`` sees through ``relation``; ``definer`` is the view whose
        owner ``reader`` is (``None`` while it is the role itself)."""
        key = (entry.oid, relation.oid, reader, definer.oid if definer else None)
        if key in self._seen:
            return
        self._seen.add(key)
        via = None if entry is relation else entry.qualified
        if relation.materialized:
            tables = self._tenant_sources(relation.oid, frozenset())
            if tables:
                yield ExposedMatview(relation.qualified, tables, via)
            return
        if not relation.security_invoker:
            reader, definer = relation.owner_oid, relation
        for oid in relation.references:
            if oid in self.tenant_tables:
                reason = self.bypasses.get((reader, oid))
                if definer is not None and reader != self.role_oid and reason is not None:
                    yield BypassingView(
                        definer.qualified,
                        definer.owner,
                        reason,
                        self.tenant_tables[oid],
                        None if entry is definer else entry.qualified,
                    )
            elif oid in self.relations and (reader, oid) in self.readable:
                yield from self._visit(self.relations[oid], reader, definer, entry)

    def _tenant_sources(self, oid: int, path: frozenset[int]) -> tuple[str, ...]:
        """Tenant tables a view or materialized view reads, through any depth of views."""
        if oid not in self._sources:
            names: set[str] = set()
            for ref in self.relations[oid].references:
                if ref in self.tenant_tables:
                    names.add(self.tenant_tables[ref])
                elif ref in self.relations and ref not in path:
                    names.update(self._tenant_sources(ref, path | {oid}))
            self._sources[oid] = tuple(sorted(names))
        return self._sources[oid]


def _child_tables(
    conn: Connection, role_oid: int, tenant_tables: Mapping[int, str], column: str
) -> list[ChildTable]:
    """Tables whose foreign keys lead, through any number of tables, to a tenant table.

    Their rows belong to a tenant through the key.  A table that tenant tables
    only reference (a list of countries) is shared data and is not one of them.
    """
    children: dict[int, list[int]] = {}
    for child, parent in _catalog.foreign_keys(conn):
        children.setdefault(parent, []).append(child)
    parent_of: dict[int, int] = {}
    queue = deque(sorted(tenant_tables))
    while queue:
        parent = queue.popleft()
        for child in children.get(parent, ()):
            if child not in tenant_tables and child not in parent_of:
                parent_of[child] = parent
                queue.append(child)
    if not parent_of:
        return []
    tables = {t.oid: t for t in _catalog.linked_tables(conn, list(parent_of), column, role_oid)}

    def chain(oid: int) -> Sequence[str]:
        parent = parent_of[oid]
        if parent in tenant_tables:
            return (tenant_tables[parent],)
        return (tables[parent].qualified, *chain(parent)) if parent in tables else ()

    return [
        ChildTable(table.qualified, tuple(chain(table.oid)), table.privileges)
        for table in tables.values()
        if not table.has_column and not table.rls_enabled and table.privileges
    ]
