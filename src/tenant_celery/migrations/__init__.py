"""The bundled migration: Celery's PostgreSQL broker and result tables.

kombu's SQLAlchemy transport and Celery's database result backend create their
tables on first use, which needs a role allowed to create tables.  This
package creates them ahead of time, exactly as those libraries would, under
Alembic revisions of its own: the branch :data:`BRANCH` with the version table
:data:`VERSION_TABLE`, so it lives beside a host's own Alembic history in the
same database.  Workers can then connect as a role with no ``CREATE`` right.

Apply it in one call (:func:`upgrade`), from the ``tenant-celery migrate``
command, as offline SQL (:func:`sql`), or from the host's own Alembic
environment by adding ``tenant_celery.migrations:versions`` to its
``version_locations``.
"""

from __future__ import annotations

from ._api import current, downgrade, heads, sql, upgrade
from ._cli import add_migrate_parser
from ._objects import (
    BRANCH,
    LOCK_ID,
    RESULT_TABLES,
    SCHEMA_OPTION,
    SEQUENCES,
    TABLES,
    TENANT_COLUMN,
    VERSION_TABLE,
    grant_statements,
)

__all__ = [
    "BRANCH",
    "LOCK_ID",
    "RESULT_TABLES",
    "SCHEMA_OPTION",
    "SEQUENCES",
    "TABLES",
    "TENANT_COLUMN",
    "VERSION_TABLE",
    "add_migrate_parser",
    "current",
    "downgrade",
    "grant_statements",
    "heads",
    "sql",
    "upgrade",
]
