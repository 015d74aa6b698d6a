"""Celery's result tables as the catalog has them (the tenant column, the tenant
policy), and purging one tenant's rows from them.

From revision ``tc0004`` of the bundled migration, ``celery_taskmeta`` and
``celery_tasksetmeta`` have a ``tenant_id`` column that Celery's own models do
not declare.  :class:`ResultTables` says what a database has;
:func:`with_tenant` gives a copy of one of Celery's tables with the column, for
the statements that write it; :func:`purge_results` deletes one tenant's rows.
Used, and re-exported, by :mod:`tenant_celery.results`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from celery import current_app
from sqlalchemy import Column, MetaData, Table, Text, create_engine, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool

from . import _catalog
from ._pg import database_url, identifier, qualified
from .config import guc_name
from .context import parse_tenant_id, tenant_context
from .db import set_tenant_guc
from .errors import ConfigurationError

__all__ = [
    "RESULT_TABLES",
    "TENANT_COLUMN",
    "PurgedResults",
    "ResultTables",
    "inspect_result_tables",
    "purge_results",
    "table_name",
    "with_tenant",
]

# Re-exported by tenant_celery.migrations, documented there; kept here so that the
# result backend does not import Alembic.
RESULT_TABLES = ("celery_taskmeta", "celery_tasksetmeta")
TENANT_COLUMN = "tenant_id"


@dataclass(frozen=True)
class ResultTables:
    """What the catalog says of a backend's task table and group table."""

    #: Both tables exist (a result backend may create them later, at setup).
    found: bool
    #: The task table has the tenant column.
    task_tenant: bool
    #: The group table has the tenant column.
    group_tenant: bool
    #: Row-level security is enabled on either table: the host opted in to the policy.
    policy: bool


# The name is resolved as the backend's own statements resolve it (search_path
# when unqualified); a table that does not exist gives no row.
_TABLE = text(
    "SELECT c.relrowsecurity, EXISTS ("
    " SELECT FROM pg_attribute AS a WHERE a.attrelid = c.oid AND a.attname = :column"
    " AND a.attnum > 0 AND NOT a.attisdropped)"
    " FROM pg_class AS c WHERE c.oid = to_regclass(:name)"
)


def table_name(table: Table) -> str:
    """``table``'s name as SQL writes it (quoted where needed, with its schema if any)."""
    return qualified(table.name, table.schema)


def inspect_result_tables(conn: Connection, task: Table, group: Table) -> ResultTables:
    """Read the tenant column and the row-level security state of both tables."""
    rows = [
        conn.execute(_TABLE, {"name": table_name(table), "column": TENANT_COLUMN}).one_or_none()
        for table in (task, group)
    ]
    if rows[0] is None or rows[1] is None:
        return ResultTables(found=False, task_tenant=False, group_tenant=False, policy=False)
    return ResultTables(
        found=True,
        task_tenant=bool(rows[0][1]),
        group_tenant=bool(rows[1][1]),
        policy=bool(rows[0][0]) or bool(rows[1][0]),
    )


_copies: dict[tuple[int, str, str | None], Table] = {}
_copies_lock = threading.Lock()


def with_tenant(table: Table) -> Table:
    """A copy of one of Celery's result tables with the tenant column (``text``).

    The copy keeps the columns' defaults (the id sequence, ``date_done``), so an
    insert through it fills what Celery's models would.  One copy per table and
    name: Celery renames its tables in place (``database_table_names``).
    """
    # Not ``fullname``: Celery sets ``schema`` after the table is built, which leaves
    # ``fullname`` as it was.
    key = (id(table), table.name, table.schema)
    with _copies_lock:
        found = _copies.get(key)
        if found is None:
            found = table.to_metadata(MetaData())
            found.append_column(Column(TENANT_COLUMN, Text(), nullable=True))
            _copies[key] = found
        return found


# ------------------------------------------------------------------ purging


@dataclass(frozen=True)
class PurgedResults:
    """What :func:`purge_results` deleted for one tenant."""

    #: The tenant, in the validator's canonical form.
    tenant_id: str
    #: Task results deleted (rows of the task table).
    tasks: int
    #: Group results deleted (rows of the group table).
    groups: int


def purge_results(
    database: str | URL | Engine,
    tenant_id: object,
    *,
    schema: str | None = None,
    task_table: str = RESULT_TABLES[0],
    group_table: str = RESULT_TABLES[1],
    setting: str | None = None,
) -> PurgedResults:
    """Delete every stored task result and group result of one tenant, in one transaction.

    ``database`` is a SQLAlchemy :class:`~sqlalchemy.engine.Engine` or a URL
    (``postgresql://...``; Celery's ``db+`` prefix is accepted, and an engine
    is made for the call and disposed of).  ``tenant_id`` is validated first,
    with the package's validator, before anything is sent.  Rows whose
    ``tenant_id`` names the tenant are deleted from ``task_table`` and
    ``group_table`` (in ``schema``, else through the ``search_path``), with the
    tenant setting (``setting``, chosen as in
    :func:`~tenant_celery.set_tenant_guc`) made in the transaction: it works
    as the application role when the result tables are under the tenant
    policy, and as any role allowed to ``DELETE`` when they are not.  Other
    tenants' rows and rows of no tenant stay.

    Results stored before revision ``tc0004``, or by Celery's own backend,
    name no tenant and are not deleted.  A task of the tenant still running
    stores its result after the purge: stop the tenant's queued work and let
    running tasks end first.

    Raises:
        InvalidTenantId: the tenant id was refused; nothing was sent.
        ConfigurationError: a name or the URL is refused, or a table does not
            exist or lacks the tenant column (the database is not at
            ``tc0004``); nothing was deleted.
        sqlalchemy.exc.DBAPIError: the server refused, e.g. the role may not delete.
    """
    tenant = parse_tenant_id(tenant_id)
    name = guc_name(current_app, setting)
    if schema is not None:
        identifier(schema, "schema")
    tables = [
        qualified(identifier(table, what), schema)
        for table, what in ((task_table, "task_table"), (group_table, "group_table"))
    ]
    if isinstance(database, Engine):
        engine = database
    else:
        engine = create_engine(database_url(database), poolclass=NullPool)
    try:
        with tenant_context(tenant), engine.begin() as conn:
            set_tenant_guc(conn, tenant, setting=name)
            for table in tables:
                _require_tenant_column(conn, table)
            counts = [
                conn.execute(
                    text(f"DELETE FROM {table} WHERE {TENANT_COLUMN} = :tenant"),
                    {"tenant": tenant},
                ).rowcount
                for table in tables
            ]
    finally:
        if engine is not database:
            engine.dispose()
    return PurgedResults(tenant_id=tenant, tasks=counts[0], groups=counts[1])


def _require_tenant_column(conn: Connection, table: str) -> None:
    found, column_type = _catalog.column_type(conn, table, TENANT_COLUMN)
    if not found:
        raise ConfigurationError(
            f"result table {table} does not exist; check schema= and the table names"
        )
    if column_type is None:
        raise ConfigurationError(
            f"result table {table} has no {TENANT_COLUMN} column: upgrade the bundled "
            "migration to tc0004 (tenant_celery.migrations.upgrade) first"
        )
