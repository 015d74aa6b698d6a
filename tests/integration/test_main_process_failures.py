"""Failures the worker's main process handles, not the pool child.

A hard time limit kills the child that entered the tenant; the main process
then stores the failure and publishes the task's errbacks.  Those messages
must carry the tenant too, or a tenant errback is refused and lost.
"""

from __future__ import annotations

import uuid

import pytest

from tenant_celery import tenant_context
from tests._rig.worker import worker_fixture

from . import tenant_app as tasks

MATRIX = [pytest.param(("redis", "prefork"), id="redis-prefork", marks=pytest.mark.worker)]

prefork_worker = worker_fixture(tasks.__name__, name="prefork_worker", matrix=MATRIX)


def test_errback_of_a_killed_task_runs_in_its_tenant(prefork_worker: object) -> None:
    tenant = str(uuid.uuid4())
    errback = tasks.errback.s()
    errback.freeze()
    with tenant_context(tenant):
        result = tasks.overrun.apply_async((30,), link_error=errback)
    with pytest.raises(Exception, match=r"TimeLimitExceeded|Time limit"):
        result.get(timeout=30)
    assert tasks.app.AsyncResult(errback.id).get(timeout=30) == {
        "tenant": tenant,
        "failed": result.id,
    }
