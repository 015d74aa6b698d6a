"""Tasks for the metrics, monitor and JSON-log tests, run by real worker processes.

The module does what a host does at import time: JSON logs, task metrics with
a bounded tenant label (two tenants, then "other").  The worker fixture turns
the monitor on with ``TENANT_CELERY_MONITOR_PORT``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, Task

import tenant_celery.monitor  # noqa: F401 (connects the worker monitor)
from tenant_celery import current_tenant, tenant_task
from tenant_celery.correlation import current_correlation_id
from tenant_celery.logging import configure_logging
from tenant_celery.metrics import install_metrics
from tests._rig.appconf import BROKER_URL_ENV, apply_test_config

if os.environ.get(BROKER_URL_ENV):
    # Only in the worker: the test process that imports this module keeps
    # pytest's own logging and warning capture.
    configure_logging()
app = apply_test_config(Celery("observability_app"))
install_metrics(app, tenant_label=True, max_tenant_labels=2)

log = logging.getLogger("observability_app")

#: Tenant labels are admitted per worker; the tests use these two first.
MAX_TENANT_LABELS = 2


@app.task
def ping() -> str:
    return "pong"


@tenant_task(app=app)
def work(index: int) -> dict[str, Any]:
    return {"index": index, "tenant": current_tenant(), "pid": os.getpid()}


@tenant_task(app=app)
def fail(index: int) -> None:
    raise ValueError(f"task {index} fails on purpose")


@tenant_task(app=app, bind=True, max_retries=2)
def retry_once(self: Task[Any, Any], index: int) -> int:
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return index


@tenant_task(app=app, bind=True)
def log_and_spawn(self: Task[Any, Any]) -> dict[str, Any]:
    log.info("parent task logs inside its tenant")
    print("parent task prints a line")  # Celery redirects it into logging
    child = log_child.delay()
    return {
        "task_id": self.request.id,
        "child_id": child.id,
        "tenant": current_tenant(),
        "correlation_id": current_correlation_id(),
    }


@tenant_task(app=app, bind=True)
def log_child(self: Task[Any, Any]) -> dict[str, Any]:
    log.warning("child task logs inside its tenant")
    return {
        "task_id": self.request.id,
        "tenant": current_tenant(),
        "correlation_id": current_correlation_id(),
    }
