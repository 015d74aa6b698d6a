"""Tenant tasks whose results go to PostgreSQL through ``PooledDatabaseBackend``.

Run by real workers in test_results_tenants.py.  Started with the rig's
``postgres`` result backend (``db+postgresql+psycopg://app_user...``), the
worker stores results with the pooled backend on that database instead, as
``app_user``: the role the result tables' tenant policy applies to.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from tenant_celery import current_tenant, tenant_task
from tests._rig.appconf import BACKEND_URL_ENV, apply_test_config

POOLED = "tenant_celery.results:PooledDatabaseBackend"

app = apply_test_config(Celery("tenant_results_app"))
_backend = os.environ.get(BACKEND_URL_ENV) or ""
if _backend.startswith("db+"):
    app.conf.update(result_backend=POOLED, database_url=_backend.removeprefix("db+"))


@tenant_task(app=app)
def add(x: int, y: int) -> int:
    return x + y


@tenant_task(app=app)
def total(values: list[int]) -> int:
    return sum(values)


@tenant_task(app=app)
def whoami() -> str | None:
    return current_tenant()


@tenant_task(app=app)
def fail(message: str) -> None:
    raise ValueError(message)


@tenant_task(app=app, time_limit=1)
def overrun(seconds: float) -> None:
    time.sleep(seconds)
