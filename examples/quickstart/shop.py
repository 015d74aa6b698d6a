"""The quickstart's app: two tenant tasks (docs/tutorial/quickstart.md)."""

from celery import Celery

from tenant_celery import current_tenant, tenant_task

app = Celery(
    "shop",
    broker="redis://localhost:6379/0",
    backend="redis://localhost:6379/1",
)


@tenant_task(app=app)
def build_invoice(order_id: int) -> str:
    return f"invoice {order_id} built for tenant {current_tenant()}"


@tenant_task(app=app)
def close_order(order_id: int) -> str:
    build_invoice.delay(order_id)
    return f"order {order_id} closed for tenant {current_tenant()}"
