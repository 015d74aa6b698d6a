"""The storefront's tenant tasks.

Each runs inside the tenant its message names, and reads and writes through
the bound sessions of :mod:`storefront.db`: row-level security shows it that
tenant's rows only and refuses rows of any other.
"""

from __future__ import annotations

import logging
from typing import Any

from storefront.celery import app
from storefront.db import sessions
from storefront.models import Invoice, Order
from tenant_celery import require_tenant, tenant_task

log = logging.getLogger(__name__)


@tenant_task(app=app, name="storefront.place_order")
def place_order(customer: str, total_cents: int) -> dict[str, Any]:
    """Store an order for the current tenant, then have its invoice issued."""
    tenant = require_tenant()
    with sessions().begin() as session:
        order = Order(tenant_id=tenant, customer=customer, total_cents=total_cents)
        session.add(order)
        session.flush()
        order_id = order.id
    log.info("order %d placed for %s", order_id, customer)
    # Published from inside the task: the message carries the same tenant.
    issue_invoice.delay(order_id)
    return {"order_id": order_id, "tenant_id": tenant}


@tenant_task(app=app, name="storefront.issue_invoice")
def issue_invoice(order_id: int) -> dict[str, Any]:
    """Invoice one of the current tenant's orders.

    Raises:
        LookupError: the order is not the current tenant's (or does not exist).
    """
    tenant = require_tenant()
    with sessions().begin() as session:
        # Row-level security hides other tenants' orders: no tenant filter here.
        order = session.get(Order, order_id)
        if order is None:
            raise LookupError(f"order {order_id} is not an order of this tenant")
        invoice = Invoice(
            tenant_id=tenant,
            order_id=order.id,
            number=f"INV-{order.id:06d}",
            total_cents=order.total_cents,
        )
        session.add(invoice)
        session.flush()
        invoice_id = invoice.id
    log.info("invoice %d issued for order %d", invoice_id, order_id)
    return {"invoice_id": invoice_id, "order_id": order_id, "tenant_id": tenant}
