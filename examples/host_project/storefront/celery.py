"""The storefront's Celery app: PostgreSQL broker and results, JSON logs, metrics, monitor.

Start a worker in this directory with ``celery -A storefront worker
--loglevel=INFO``.  Every process that imports the app (workers, web
processes, ``python -m storefront``) logs JSON lines naming the task, the
tenant and the correlation id.  Workers count their tasks in Prometheus
metrics, serve ``/metrics`` and ``/health`` on ``TENANT_CELERY_MONITOR_PORT``
and send task events, so ``celery -A storefront events`` and Flower
(``celery -A storefront flower``) show every task with its tenant.
"""

from __future__ import annotations

from celery import Celery

from storefront import settings
from tenant_celery import configure_logging, install_metrics

configure_logging()

app = Celery("storefront", include=["storefront.tasks"])

_database = settings.database_url()
app.conf.update(
    # The broker (tenant-celery's transport) and result tables come from the
    # bundled migration (python -m storefront migrate): this role may use them
    # but not create them.
    broker_url=f"tcpg+{_database}",
    result_backend=f"db+{_database}",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    enable_utc=True,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    tenant_celery_monitor_port=settings.monitor_port(),
    # Task events for `celery events` and Flower: on this transport they are
    # sent by NOTIFY to whoever listens, never stored.
    worker_send_task_events=True,
)

install_metrics(app, tenant_label=True)
