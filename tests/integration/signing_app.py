"""Tenant tasks under signed tenant headers, for tests/integration/test_signing_worker.py.

The worker reads its keys from ``TENANT_CELERY_HEADER_SIGNING_KEYS``, which the
test sets per worker; the test process configures the same app through
``app.conf``.  Every task body leaves a side effect, a row of ``signed_marks``
written as ``app_user``, so a refused message is proven not to have run.
"""

from __future__ import annotations

import uuid
from functools import cache
from typing import Any

import sqlalchemy as sa
from celery import Celery, Task
from sqlalchemy.engine import Engine

from tenant_celery import current_tenant, every_tenant, fan_out, tenant_task
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


# ------------------------------------------------ routes a publisher without a key tries

#: The tenants the app's own fan-out runs for (its tenant lister returns them).
LISTED = ("7a5c1d0e-0000-4000-8000-00000000000a", "7a5c1d0e-0000-4000-8000-00000000000b")


def listed_tenants() -> list[str]:
    """The app's tenant lister, named by its beat schedule."""
    return list(LISTED)


def noisy_lister() -> list[str]:
    """A lister no schedule names: a row shows it was called."""
    _mark(f"noisy:{uuid.uuid4()}")
    return list(LISTED)


@tenant_task(app=app)
def mark_each(key: str) -> str | None:
    """Write a mark whose key is unique per run: ``<key>:<tenant>:<random>``."""
    return _mark(f"{key}:{current_tenant()}:{uuid.uuid4()}")


@tenant_task(app=app)
def mark_for(tenant_id: str, key: str) -> str | None:
    """A tenant task whose first parameter is its tenant."""
    return _mark(key)


@tenant_task(app=app)
def mark_tenant(tenant_id: str) -> str | None:
    """A tenant task that takes its tenant only: ``celery.map`` calls it with one item."""
    return _mark(f"map:{uuid.uuid4()}")


@tenant_task(app=app)
def publish_for(key: str, tenant: str) -> str:
    """Application code in a worker that publishes for a tenant it names."""
    return mark.apply_async((key,), kwargs={"tenant_id": tenant}).id


@tenant_task(app=app)
def fan_out_marks(key: str, tenants: list[str]) -> int:
    """Application code in a worker that fans out over tenants it chose."""
    return len(fan_out(mark_each, tenants, key))


@app.task
def plain_noop() -> None:
    """A plain task, for messages that carry callbacks."""


app.conf.beat_schedule = {
    "marks-every-tenant": every_tenant(
        mark_each, tenants=f"{__name__}:listed_tenants", schedule=3600, args=("beat",)
    ),
}
