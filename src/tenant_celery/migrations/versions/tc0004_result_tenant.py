"""The tenant of each stored result: ``tenant_id`` on Celery's result tables.

:class:`~tenant_celery.results.PooledDatabaseBackend` writes the tenant a
result or group was stored in (``NULL`` outside any tenant), so that one
tenant's results can be found, purged
(:func:`~tenant_celery.results.purge_results`) and, where the host opts in,
put under the tenant policy (:func:`~tenant_celery.rls.enable_tenant_rls` on
:data:`~tenant_celery.migrations.RESULT_TABLES`).  The column is ``text``: it
holds the tenant as the validator returns it, whatever the tenant type.  Rows
stored before this revision keep ``NULL``.  Adding a nullable column without
a default rewrites nothing; building each index reads the table once, with
writes to it waiting meanwhile.

Revision ID: tc0004
Revises: tc0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from tenant_celery.migrations._objects import RESULT_TABLES, TENANT_COLUMN, configured_schema

revision = "tc0004"
down_revision: str | None = "tc0003"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None


def upgrade() -> None:
    schema = configured_schema(context.config)
    for table in RESULT_TABLES:
        op.add_column(table, sa.Column(TENANT_COLUMN, sa.Text(), nullable=True), schema=schema)
        # Purging a tenant's results, and the tenant policy's filter, read by this index.
        op.create_index(f"ix_{table}_{TENANT_COLUMN}", table, [TENANT_COLUMN], schema=schema)


def downgrade() -> None:
    schema = configured_schema(context.config)
    # A tenant policy on the column (the host's opt-in) must be dropped first: the
    # server refuses to drop a column a policy reads.
    for table in reversed(RESULT_TABLES):
        op.drop_index(f"ix_{table}_{TENANT_COLUMN}", table_name=table, schema=schema)
        op.drop_column(table, TENANT_COLUMN, schema=schema)
