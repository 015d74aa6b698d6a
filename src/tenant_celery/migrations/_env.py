"""The body of the bundled Alembic environment (``env.py`` calls :func:`run`).

Every run, online or offline, is one transaction that first takes the advisory
lock :data:`~._objects.LOCK_ID`, so concurrent runs on one database queue up
behind each other and each sees the version the previous one committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import context
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from .._pg import quote
from ..errors import MigrationError
from ._objects import (
    LOCK_ID,
    TABLES,
    VERSION_TABLE,
    configured_schema,
    grant_statements,
)

# Keys of ``Config.attributes`` the public API and this module share.
ENGINE = "tenant_celery.engine"
"""The :class:`~sqlalchemy.engine.Engine` an online run connects with."""
DIRECTION = "tenant_celery.direction"
"""``"upgrade"`` or ``"downgrade"``: what the caller asked for."""
GRANT_TO = "tenant_celery.grant_to"
"""Roles to grant the tables to once the migrations have run (upgrades only)."""
START = "tenant_celery.start"
"""The revisions the database was at when the run took the lock (online runs)."""
APPLIED = "tenant_celery.applied"
"""The revisions applied (upgrade) or removed (downgrade) by the run, in order."""
STEP = "tenant_celery.step"
"""What the run was doing last: read after a failure to say what failed."""


def run() -> None:
    """Configure Alembic for tenant-celery's version table and run the migrations."""
    config = context.config
    schema = configured_schema(config)
    grant_to: Sequence[str] = config.attributes.get(GRANT_TO, ())
    applied: list[MigrationInfo] = []

    def record(*, ctx: MigrationContext, step: MigrationInfo, heads: Any, run_args: Any) -> None:
        applied.append(step)
        config.attributes.setdefault(APPLIED, []).append(step.up_revision_id)

    options: dict[str, Any] = {
        "version_table": VERSION_TABLE,
        "version_table_schema": schema,
        "transaction_per_migration": False,
        "on_version_apply": record,
    }
    if context.is_offline_mode():
        context.configure(dialect_name="postgresql", literal_binds=True, **options)
        with context.begin_transaction():
            context.execute(f"SELECT pg_advisory_xact_lock({LOCK_ID})")
            if schema is not None:
                context.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(schema)}")
            context.run_migrations()
            for statement in grant_statements(grant_to, schema=schema):
                context.execute(statement)
        return

    engine = config.attributes.get(ENGINE)
    if not isinstance(engine, Engine):
        raise MigrationError(
            "this Alembic environment runs only through tenant_celery.migrations; to run the "
            "revisions from your own environment add tenant_celery.migrations:versions to "
            "its version_locations"
        )
    with engine.connect() as connection:
        context.configure(connection=connection, **options)
        with context.begin_transaction():
            config.attributes[STEP] = "taking the migration lock"
            context.execute(f"SELECT pg_advisory_xact_lock({LOCK_ID})")
            if schema is not None and not _schema_exists(connection, schema):
                config.attributes[STEP] = f"creating schema {schema!r}"
                context.execute(f"CREATE SCHEMA {quote(schema)}")
            config.attributes[STEP] = "reading the current revision"
            start = context.get_context().get_current_heads()
            config.attributes[START] = start
            try:
                context.run_migrations()
            except SQLAlchemyError:
                config.attributes[STEP] = _failed_revision(
                    context.script, config.attributes.get(DIRECTION, "upgrade"), start, applied
                )
                raise
            for role, statement in _per_role(grant_to, schema, _existing(connection, schema)):
                config.attributes[STEP] = f"granting privileges to role {role!r}"
                context.execute(statement)
            config.attributes[STEP] = "committing"


def _schema_exists(connection: Connection, schema: str) -> bool:
    row = connection.execute(
        sa.text("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = :name"), {"name": schema}
    ).first()
    return row is not None


def _existing(connection: Connection, schema: str | None) -> list[str]:
    """The tables of :data:`TABLES` the revision now current has created."""
    rows = connection.execute(
        sa.text(
            "SELECT c.relname FROM pg_catalog.pg_class AS c"
            " JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace"
            " WHERE c.relkind = 'r' AND c.relname = ANY(:names)"
            " AND n.nspname = coalesce(:schema, current_schema())"
        ),
        {"names": list(TABLES), "schema": schema},
    )
    return [str(name) for (name,) in rows]


def _per_role(
    roles: Sequence[str], schema: str | None, tables: Sequence[str]
) -> list[tuple[str, str]]:
    return [
        (role, statement)
        for role in dict.fromkeys(roles)
        for statement in grant_statements([role], schema=schema, tables=tables)
    ]


def _failed_revision(
    script: ScriptDirectory,
    direction: str,
    start: tuple[str, ...],
    applied: list[MigrationInfo],
) -> str:
    """Name the revision that was running when the migrations raised.

    The bundled history is one straight line, so the failing revision is the one
    after the last head reached (upgrade), or that head itself (downgrade).
    """
    try:
        return _name_failed_revision(script, direction, start, applied)
    except Exception:  # never hide the database's error behind one of ours
        return "running the migrations"


def _name_failed_revision(
    script: ScriptDirectory,
    direction: str,
    start: tuple[str, ...],
    applied: list[MigrationInfo],
) -> str:
    head: str | None
    if not applied:
        head = start[0] if start else None
    elif direction == "upgrade":
        head = applied[-1].up_revision_id
    else:
        head = next(iter(applied[-1].down_revision_ids), None)
    if direction == "upgrade":
        following = script.get_revision(head).nextrev if head else script.get_bases()
        failed = min(following, default=None)
    else:
        failed = head
    if failed is None:
        return "running the migrations"
    lines = (script.get_revision(failed).doc or "").strip().splitlines()
    title = f" ({lines[0].rstrip('.')})" if lines else ""
    return f"running revision {failed}{title}"
