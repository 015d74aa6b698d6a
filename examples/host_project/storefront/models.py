"""The tenant tables: every row carries ``tenant_id``, and row-level security filters on it.

The migration in ``migrations/versions`` creates the same tables and turns
row-level security on for both.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    # Leads with tenant_id, so every tenant's queries can use it; the invoices
    # reference it, so an invoice can only belong to its order's tenant.
    __table_args__ = (sa.UniqueConstraint("tenant_id", "id", name="orders_tenant_id_id_key"),)

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(always=True), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.Uuid(as_uuid=False))
    customer: Mapped[str] = mapped_column(sa.Text)
    total_cents: Mapped[int] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now()
    )


class Invoice(Base):
    __tablename__ = "invoices"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "order_id", name="invoices_tenant_id_order_id_key"),
        sa.ForeignKeyConstraint(
            ["tenant_id", "order_id"],
            ["orders.tenant_id", "orders.id"],
            name="invoices_order_fkey",
        ),
    )

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(always=True), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.Uuid(as_uuid=False))
    order_id: Mapped[int] = mapped_column(sa.BigInteger)
    number: Mapped[str] = mapped_column(sa.Text)
    total_cents: Mapped[int] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now()
    )
