"""Tenant tasks run by real worker processes in tests/integration.

The rig's worker fixture configures this app through ``TC_TEST_*`` environment
variables (see :mod:`tests._rig.appconf`); the test process binds the same app
to the worker's settings.  Every task
reports the tenant it observed, so tests compare what the worker saw with what
the publisher meant.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, Task

from tenant_celery import current_tenant, tenant_task
from tests._rig.appconf import apply_test_config
from tests._rig.env import celery_release

app = apply_test_config(Celery("tenant_app"))


@tenant_task(app=app)
def observe(tag: Any = None) -> dict[str, Any]:
    return {"tenant": current_tenant(), "tag": tag, "pid": os.getpid()}


@tenant_task(app=app)
def slow_observe(tag: Any, seconds: float) -> dict[str, Any]:
    before = current_tenant()
    time.sleep(seconds)
    return {"tenant": current_tenant(), "before": before, "tag": tag, "pid": os.getpid()}


@tenant_task(app=app)
def wants_tenant(tenant_id: str) -> list[str | None]:
    return [tenant_id, current_tenant()]


@tenant_task(app=app)
def spawn() -> dict[str, Any]:
    child = observe.delay("child")
    return {"tenant": current_tenant(), "child_id": child.id}


@app.task
def plain_spawn() -> dict[str, Any]:
    child = observe.delay("from-plain")
    return {"tenant": current_tenant(), "child_id": child.id}


@tenant_task(app=app)
def step(seen: list[Any] | None = None) -> list[Any]:
    return [*(seen or []), current_tenant()]


@tenant_task(app=app)
def collect(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"tenant": current_tenant(), "parts": [r["tenant"] for r in results]}


#: Seconds between retries.  Celery before 5.5's database result backend can lose
#: the result of a retry with no delay (the compatibility page), and the page's
#: advice for those releases is a delay; later releases retry at once.
RETRY_DELAY = 0 if celery_release() >= (5, 5) else 1


@tenant_task(app=app, bind=True, max_retries=3)
def retrying(self: Task[Any, Any], seen: list[Any] | None = None) -> list[Any]:
    seen = [*(seen or []), current_tenant()]
    if self.request.retries < 2:
        raise self.retry(kwargs={"seen": seen}, countdown=RETRY_DELAY)
    return seen


@tenant_task(
    app=app,
    bind=True,
    autoretry_for=(ValueError,),
    max_retries=3,
    default_retry_delay=RETRY_DELAY,
)
def autoretrying(self: Task[Any, Any]) -> dict[str, Any]:
    if self.request.retries < 2:
        raise ValueError(f"attempt {self.request.retries} fails on purpose")
    return {"tenant": current_tenant(), "retries": self.request.retries}


@app.task
def plain_observe() -> dict[str, Any]:
    return {"tenant": current_tenant(), "pid": os.getpid()}


@tenant_task(app=app, time_limit=1)
def overrun(seconds: float) -> None:
    time.sleep(seconds)  # killed by the hard time limit


@tenant_task(app=app)
def errback(failed_task_id: str) -> dict[str, Any]:
    return {"tenant": current_tenant(), "failed": failed_task_id}
