"""The app the testing how-to tests (docs/howto/testing.md): orders, each in one tenant."""

import os

from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker
from tenant_celery import current_tenant, tenant_session, tenant_task

app = Celery("orders", broker="redis://localhost:6379/0")

# The application role: not the tables' owner, so row-level security applies to it.
engine = create_engine(os.environ["ORDERS_DATABASE_URL"])
Session = sessionmaker(engine)


@tenant_task(app=app)
def place_order(item: str) -> int:
    if not item:
        raise ValueError("an order needs an item")
    with tenant_session(Session) as session:
        order_id: int = session.execute(
            text("INSERT INTO orders (tenant_id, item) VALUES (:tenant, :item) RETURNING id"),
            {"tenant": current_tenant(), "item": item},
        ).scalar_one()
    confirm_order.delay(order_id)  # after the commit, so that the child sees the order
    return order_id


@tenant_task(app=app)
def confirm_order(order_id: int) -> None:
    with tenant_session(Session) as session:
        session.execute(text("UPDATE orders SET confirmed = true WHERE id = :id"), {"id": order_id})


@tenant_task(app=app)
def order_status(order_id: int) -> str | None:
    """``"placed"`` or ``"confirmed"``; ``None`` when the tenant has no such order."""
    with tenant_session(Session) as session:
        confirmed = session.execute(
            text("SELECT confirmed FROM orders WHERE id = :id"), {"id": order_id}
        ).scalar_one_or_none()
    if confirmed is None:
        return None
    return "confirmed" if confirmed else "placed"


@tenant_task(app=app)
def count_orders() -> int:
    with tenant_session(Session) as session:
        return int(session.execute(text("SELECT count(*) FROM orders")).scalar_one())
