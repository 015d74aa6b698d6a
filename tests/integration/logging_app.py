"""Tasks for the JSON-log test of the lines a worker logs about each task.

JSON logs only, no metrics or monitor: what the worker's main process and its
pool processes log about a task (received, accepted, retried, succeeded,
failed, refused, lost) is checked line by line in
tests/integration/test_logging_worker.py.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery, Task

from tenant_celery import current_tenant, tenant_task
from tenant_celery.logging import configure_logging
from tests._rig.appconf import BROKER_URL_ENV, apply_test_config

if os.environ.get(BROKER_URL_ENV):
    # Only in the worker: the test process that imports this module keeps
    # pytest's own logging capture.
    configure_logging()
app = apply_test_config(Celery("logging_app"))
# A pool process killed mid-task: fail its task after 1 s instead of Celery's 10 s.
app.conf.worker_lost_wait = 1.0

log = logging.getLogger("logging_app")

#: What ``linger`` logs before it sleeps, with its pool process's pid.
LINGERING = "lingering in pool process"


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


@tenant_task(app=app)
def linger(seconds: float) -> None:
    """Sleep in the pool process, for the test to kill it mid-task."""
    log.warning("%s %d", LINGERING, os.getpid())
    time.sleep(seconds)
