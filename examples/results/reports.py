"""A worker whose results go to PostgreSQL over a pooled engine (docs/howto/result-backend.md)."""

from celery import Celery

from tenant_celery import current_tenant, tenant_task

app = Celery("reports")
app.config_from_object("celeryconfig")


@tenant_task(app=app)
def monthly_report(month: str) -> str:
    return f"report {month} for tenant {current_tenant()}"
