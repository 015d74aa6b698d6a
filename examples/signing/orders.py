"""The orders app: a tenant task whose tenant header is signed (docs/howto/signing.md)."""

from celery import Celery

from tenant_celery import current_tenant, tenant_task

app = Celery("orders")
app.config_from_object("celeryconfig")


@tenant_task(app=app)
def ship_order(order_id: int) -> str:
    return f"order {order_id} shipped for tenant {current_tenant()}"
