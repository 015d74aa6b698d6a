"""The orders app's tenant tasks, tested with tenant-celery's pytest plugin."""

import pytest
from celery import Celery
from tenant_celery import TenantContextMissing
from tenant_celery.testing import assert_tenant_isolation, run_in_tenant

from orders import count_orders, engine, order_status, place_order


def test_each_tenant_sees_only_its_own_orders(
    tenant_celery_tenant_ids: tuple[str, str], tenant_celery_eager: Celery
) -> None:
    a, b = tenant_celery_tenant_ids
    book = run_in_tenant(place_order, a, "book")
    run_in_tenant(place_order, a, "lamp")
    run_in_tenant(place_order, b, "pen")

    assert run_in_tenant(count_orders, a) == 2
    assert run_in_tenant(count_orders, b) == 1
    assert run_in_tenant(order_status, b, book) is None
    assert_tenant_isolation(engine, "orders", a, b)


def test_the_child_task_runs_in_its_parents_tenant(
    tenant_celery_tenant_id: str, tenant_celery_eager: Celery
) -> None:
    order = run_in_tenant(place_order, tenant_celery_tenant_id, "book")
    assert run_in_tenant(order_status, tenant_celery_tenant_id, order) == "confirmed"


def test_the_task_error_reaches_the_test(tenant_celery_tenant_id: str) -> None:
    with pytest.raises(ValueError, match="an order needs an item"):
        run_in_tenant(place_order, tenant_celery_tenant_id, "")


def test_an_order_without_a_tenant_is_not_sent() -> None:
    with pytest.raises(TenantContextMissing):
        place_order.delay("book")
