"""Typical host code, type-checked by ``mypy --strict`` in CI.

It is never run: it tests the public types as a user sees them.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.result import AsyncResult
from celery.schedules import crontab

from tenant_celery import (
    TenantTask,
    current_tenant,
    every_tenant,
    fan_out,
    require_tenant,
    tenant_context,
    tenant_task,
)

app = Celery("host")


@tenant_task
def bare(order_id: int) -> str:
    return f"{order_id}@{require_tenant()}"


@tenant_task(app=app, autoretry_for=(IOError,), max_retries=5)
def with_options(order_id: int) -> int:
    return order_id


@tenant_task(app=app, bind=True)
def bound(self: Task[[int], int], order_id: int) -> int:
    return order_id + self.request.retries


@app.task(base=TenantTask)
def by_base() -> str | None:
    return current_tenant()


def publish() -> list[AsyncResult[Any]]:
    with tenant_context("0b7e4c1a-5a43-4f5e-9d1c-2f6a1c9e7b10") as tenant:
        result: AsyncResult[str] = bare.delay(1)
        with_options.apply_async((2,), countdown=5)
        bound.delay(3)
        assert tenant == current_tenant()
    return [result, *fan_out(with_options, ["a", "b"], 4, spread=60.0)]


schedule = {
    "nightly": every_tenant(
        with_options, tenants="host.tenancy:active", schedule=crontab(hour=2), args=(1,)
    ),
}
