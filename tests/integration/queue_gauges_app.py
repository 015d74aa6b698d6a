"""Tasks for the worker monitor's queue-gauge and readiness tests, run by real workers.

The worker takes one message at a time and acknowledges it when the task
ends (prefetch 1, late acknowledgement): while :func:`hold` runs, every other
message of the queue waits in the broker, so the queue gauges have an exact
count to read.  Task metrics carry a tenant label bounded at two tenants, in
a registry of the app's own (another test app of the session uses the
default one).
"""

from __future__ import annotations

import time
from pathlib import Path

from celery import Celery
from prometheus_client import CollectorRegistry

import tenant_celery.monitor  # noqa: F401 (connects the worker monitor)
from tenant_celery import current_tenant, tenant_task
from tenant_celery.metrics import install_metrics
from tests._rig.appconf import apply_test_config

app = apply_test_config(Celery("queue_gauges_app"))
app.conf.update(worker_prefetch_multiplier=1, task_acks_late=True)
install_metrics(app, registry=CollectorRegistry(), tenant_label=True, max_tenant_labels=2)

#: Tenant labels the worker admits; the next tenant is counted as "other".
MAX_TENANT_LABELS = 2


@app.task
def ping() -> str:
    return "pong"


@app.task
def hold(started: str, release: str, timeout: float = 60.0) -> bool:
    """Touch ``started``, then wait until ``release`` exists (False after ``timeout``)."""
    Path(started).touch()
    deadline = time.monotonic() + timeout
    while not Path(release).exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@tenant_task(app=app)
def work() -> str | None:
    return current_tenant()
