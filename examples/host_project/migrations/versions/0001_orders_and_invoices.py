"""orders and invoices, isolated by tenant

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from storefront import settings

import tenant_celery.rls  # noqa: F401  (registers op.enable_tenant_rls)
from tenant_celery.rls import grant_tenant_tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLES = ["orders", "invoices"]


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("tenant_id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("customer", sa.Text, nullable=False),
        sa.Column("total_cents", sa.Integer, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.UniqueConstraint("tenant_id", "id", name="orders_tenant_id_id_key"),
    )
    op.create_table(
        "invoices",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("tenant_id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("order_id", sa.BigInteger, nullable=False),
        sa.Column("number", sa.Text, nullable=False),
        sa.Column("total_cents", sa.Integer, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.UniqueConstraint("tenant_id", "order_id", name="invoices_tenant_id_order_id_key"),
        sa.ForeignKeyConstraint(
            ["tenant_id", "order_id"],
            ["orders.tenant_id", "orders.id"],
            name="invoices_order_fkey",
        ),
    )
    for table in TABLES:
        op.enable_tenant_rls(table, column_type="uuid")
    grant_tenant_tables(op.get_bind(), settings.app_role(), TABLES)


def downgrade() -> None:
    for table in reversed(TABLES):
        op.disable_tenant_rls(table)
    op.drop_table("invoices")
    op.drop_table("orders")
