"""Tables of the package's PostgreSQL transport (``tenant_celery.transport``).

``tenant_celery_message`` holds waiting and claimed messages; acknowledgement
deletes the row.  Its one index, ``(queue, tenant, priority, id)``, serves the
tenant round-robin claim; ``visible_at`` and ``lease`` are left out of every
index so that claiming and renewing a lease are HOT updates.  Autovacuum runs
early on it: a queue table turns over all its rows.

Revision ID: tc0002
Revises: tc0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

from tenant_celery._pg import qualified
from tenant_celery.migrations._objects import carry_grants_statement, configured_schema

revision = "tc0002"
down_revision: str | None = "tc0001"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None

# Room on each page for the claim's and the lease renewal's HOT updates, and an
# autovacuum that runs after 1% of the rows changed, not the default 20%.
_QUEUE_STORAGE = (
    "fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01,"
    " autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02"
)


def upgrade() -> None:
    schema = configured_schema(context.config)
    op.create_table(
        "tenant_celery_queue",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("message_ttl", sa.BigInteger(), nullable=True, comment="milliseconds"),
        sa.Column("auto_delete", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column(
            "declared_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("name", name="tenant_celery_queue_pkey"),
        schema=schema,
    )
    op.create_table(
        "tenant_celery_binding",
        sa.Column("exchange", sa.Text(), nullable=False),
        sa.Column("routing_key", sa.Text(), nullable=False),
        sa.Column("pattern", sa.Text(), nullable=False, server_default=""),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint(
            "exchange", "routing_key", "queue", name="tenant_celery_binding_pkey"
        ),
        schema=schema,
    )
    op.create_index(
        "ix_tenant_celery_binding_queue", "tenant_celery_binding", ["queue"], schema=schema
    )
    op.create_table(
        "tenant_celery_message",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("tenant", sa.Text(), nullable=False, server_default=""),
        sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column(
            "visible_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease", postgresql.UUID(), nullable=True),
        sa.Column("deliveries", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("id", name="tenant_celery_message_pkey"),
        schema=schema,
    )
    op.execute(f"ALTER TABLE {qualified('tenant_celery_message', schema)} SET ({_QUEUE_STORAGE})")
    op.create_index(
        "ix_tenant_celery_message_claim",
        "tenant_celery_message",
        ["queue", "tenant", "priority", "id"],
        schema=schema,
    )
    op.create_index(
        "ix_tenant_celery_message_expires_at",
        "tenant_celery_message",
        ["expires_at"],
        schema=schema,
        postgresql_where=sa.text("expires_at IS NOT NULL"),
    )
    _carry_grants(schema)


def _carry_grants(schema: str | None) -> None:
    # Roles that were granted the Celery tables (a host's grant revision that ran
    # before this one) get the transport's tables too, with the same privileges.
    tables = ("tenant_celery_queue", "tenant_celery_binding", "tenant_celery_message")
    op.execute(carry_grants_statement("kombu_message", tables, schema))


def downgrade() -> None:
    schema = configured_schema(context.config)
    for table in ("tenant_celery_message", "tenant_celery_binding", "tenant_celery_queue"):
        op.drop_table(table, schema=schema)
