"""A tenant task on PostgreSQL alone (docs/howto/postgres-broker.md)."""

from celery import Celery

from tenant_celery import current_tenant, tenant_task

app = Celery("billing")
app.config_from_object("celeryconfig")


@tenant_task(app=app)
def send_invoice(invoice_id: int) -> str:
    return f"invoice {invoice_id} sent for tenant {current_tenant()}"
