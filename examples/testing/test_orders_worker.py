"""The orders app's tenant tasks on a worker, with Celery's own pytest plugin."""

import celery.contrib.testing.tasks  # noqa: F401  (the ping celery_worker waits for)
import pytest
from celery import Celery
from celery.contrib.testing import worker  # not the class: pytest would collect it
from tenant_celery import tenant_context

from orders import count_orders, order_status, place_order

pytest_plugins = ("celery.contrib.pytest",)


@pytest.fixture
def celery_app(orders_app: Celery) -> Celery:
    """The app ``celery_worker`` runs: ours, not a new test app."""
    return orders_app


def test_the_worker_runs_each_task_in_its_tenant(
    celery_worker: worker.TestWorkController, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    a, b = tenant_celery_tenant_ids
    with tenant_context(a):
        book = place_order.delay("book").get(timeout=10)
        assert count_orders.delay().get(timeout=10) == 1
    with tenant_context(b):
        assert order_status.delay(book).get(timeout=10) is None
        assert count_orders.delay().get(timeout=10) == 0
