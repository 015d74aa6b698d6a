"""The settings ``docs/howto/brokers.md`` shows, run by real workers.

Each of ``examples/brokers/redis_settings.py``, ``rabbitmq_settings.py`` and
``postgresql_settings.py`` configures a real worker (only the URLs and queue
are replaced, to reach the test's services); a tenant task published from a
tenant, with a child chain, runs in that tenant, and the worker reports the
example's own settings.
"""

from __future__ import annotations

import importlib
import uuid
from typing import Any

import pytest
from celery import chain

from tenant_celery import tenant_context
from tenant_celery.migrations import upgrade
from tests._rig.postgres import APP_ROLE, Database
from tests._rig.worker import Broker, WorkerFactory
from tests.integration import brokers_app

pytestmark = pytest.mark.worker

CASES: list[tuple[Broker, str]] = [
    ("redis", "redis_settings"),
    ("rabbitmq", "rabbitmq_settings"),
    ("postgres", "postgresql_settings"),
]


@pytest.mark.parametrize(("broker", "settings"), CASES, ids=[c[0] for c in CASES])
def test_example_settings_carry_the_tenant(
    broker: Broker, settings: str, database: Database, start_worker: WorkerFactory
) -> None:
    module = f"examples.brokers.{settings}"
    example = importlib.import_module(module)
    upgrade(database.url, grant_to=[APP_ROLE])  # the PostgreSQL tables, for every case
    handle = start_worker(
        "tests.integration.brokers_app",
        broker=broker,
        database_role="app",
        extra_env={brokers_app.SETTINGS_ENV: module},
    )
    tenant = str(uuid.uuid4())
    with handle.bind(brokers_app.app), tenant_context(tenant):
        seen: dict[str, Any] = brokers_app.where_am_i.delay().get(timeout=30)
        twice = chain(brokers_app.where_am_i.si(), brokers_app.where_am_i.si()).delay()
        last: dict[str, Any] = twice.get(timeout=30)
    assert seen["tenant"] == last["tenant"] == tenant
    assert seen["transport"] == {"redis": "redis", "rabbitmq": "amqp", "postgres": "sqla"}[broker]
    assert seen["broker_transport_options"] == getattr(example, "broker_transport_options", {})
    expected_prefetch = getattr(example, "worker_prefetch_multiplier", 4)
    assert seen["worker_prefetch_multiplier"] == expected_prefetch
