"""The app of the worker that ``test_scraped_worker.py`` lets Prometheus scrape.

It does what a host does at import time: task metrics with a tenant label (two
tenants, then "other") and the worker monitor, which the test turns on with
``TENANT_CELERY_MONITOR_PORT``.  Its tasks succeed, fail, retry once, or hold a
pool process until the test lets them go.  A pool process reserves no message
beyond the one it runs (late acknowledgement, a prefetch multiplier of 1), so
while every process holds, the messages published next wait in the queue,
where the queue-length gauges count them.  Its metrics are in a registry of
the app's own: other test apps of the session use the default one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from celery import Celery, Task
from prometheus_client import CollectorRegistry

import tenant_celery.monitor  # noqa: F401 (connects the worker monitor)
from tenant_celery import current_tenant, tenant_task
from tenant_celery.metrics import install_metrics
from tests._rig.appconf import apply_test_config

app = apply_test_config(Celery("scraped_app"))
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1)
install_metrics(app, registry=CollectorRegistry(), tenant_label=True, max_tenant_labels=2)

#: Longest a ``hold`` waits for its release, so that a failed test leaves no busy worker.
HOLD_TIMEOUT = 120.0


@app.task
def ping() -> str:
    return "pong"


@tenant_task(app=app)
def work(index: int) -> dict[str, Any]:
    return {"index": index, "tenant": current_tenant()}


@tenant_task(app=app)
def fail(index: int) -> None:
    raise ValueError(f"task {index} fails on purpose")


@tenant_task(app=app, bind=True, max_retries=2)
def retry_once(self: Task[Any, Any], index: int) -> int:
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return index


@app.task
def hold(started: str, release: str) -> bool:
    """Create the file ``started``, then wait until the file ``release`` exists."""
    Path(started).touch()
    deadline = time.monotonic() + HOLD_TIMEOUT
    while not Path(release).exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
