"""Tasks for the test of Celery's events, Flower and ``celery inspect`` against a
real worker (tests/integration/test_events_worker.py)."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery, Task

from tenant_celery import current_tenant, tenant_task
from tests._rig.appconf import apply_test_config

app = apply_test_config(Celery("events_app"))
app.conf.worker_send_task_events = True


@tenant_task(app=app)
def work(index: int) -> dict[str, Any]:
    return {"index": index, "tenant": current_tenant()}


@tenant_task(app=app)
def fail(index: int) -> None:
    raise ValueError(f"task {index} fails on purpose")


@tenant_task(app=app, bind=True, max_retries=2)
def retry_once(self: Task[Any, Any], index: int) -> int:
    if self.request.retries == 0:
        # A second apart: the retried and succeeded events come from different
        # pool processes, and Celery's event state lets a late task-retried
        # event overwrite SUCCESS, so a monitor could keep showing RETRY.
        raise self.retry(countdown=1)
    return index


@tenant_task(app=app)
def linger(seconds: float) -> str | None:
    time.sleep(seconds)
    return current_tenant()


@app.task
def plain(index: int) -> int:
    return index
