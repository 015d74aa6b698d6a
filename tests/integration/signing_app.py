"""Tenant tasks under signed tenant headers, for tests/integration/test_signing_worker.py.

The worker reads its keys from ``TENANT_CELERY_HEADER_SIGNING_KEYS``, which the
test sets per worker; the test process configures the same app through
``app.conf``.  Every task body leaves a side effect, a row of ``signed_marks``
written as ``app_user``, so a refused message is proven not to have run.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import sqlalchemy as sa
from celery import Celery, Task
from sqlalchemy.engine import Engine

from tenant_celery import current_tenant, tenant_task
from tests._rig.appconf import apply_test_config, database_url

app = apply_test_config(Celery("signing_app"))

MARKS_DDL = "CREATE TABLE signed_marks (key text PRIMARY KEY, tenant text NOT NULL)"


@cache
def _engine() -> Engine:
    return sa.create_engine(database_url(app_role=True), poolclass=sa.NullPool)


def _mark(key: str) -> str | None:
    tenant = current_tenant()
    with _engine().begin() as conn:
        conn.execute(
            sa.text("INSERT INTO signed_marks (key, tenant) VALUES (:key, :tenant)"),
            {"key": key, "tenant": tenant},
        )
    return tenant


@tenant_task(app=app)
def mark(key: str) -> str | None:
    return _mark(key)


@tenant_task(app=app)
def step(seen: list[Any], key: str) -> list[Any]:
    return [*seen, _mark(key)]


@tenant_task(app=app)
def collect(results: list[Any], key: str) -> list[Any]:
    return [*results, _mark(key)]


@tenant_task(app=app, bind=True, max_retries=2)
def retry_once(self: Task[Any, Any], key: str) -> list[Any]:
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return [self.request.retries, _mark(key)]


@tenant_task(app=app)
def spawn(key: str) -> str:
    return mark.delay(key).id


@app.task
def plain_spawn(key: str) -> str:
    return mark.delay(key).id
