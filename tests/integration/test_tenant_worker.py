"""Tenant tasks through real ``celery worker`` processes.

One worker per (broker, pool) combination serves every test of this module:
Redis broker with Redis results, RabbitMQ with PostgreSQL results, and
PostgreSQL (kombu's SQLAlchemy transport, and the package's own transport) with
PostgreSQL results; each under
the prefork and threads pools with concurrency 2.  The PostgreSQL result
backend has no native chord join, so its chords go through ``chord_unlock``.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import chain, chord, group
from celery.result import AsyncResult

from tenant_celery import (
    InvalidTenantId,
    TenantConflict,
    TenantContextMissing,
    current_tenant,
    fan_out,
    tenant_context,
)
from tests._rig.worker import TRANSPORT_MATRIX, WORKER_MATRIX, worker_fixture

from . import tenant_app as tasks

pytestmark = pytest.mark.worker

tenant_worker = worker_fixture(
    tasks.__name__, name="tenant_worker", matrix=[*WORKER_MATRIX, *TRANSPORT_MATRIX]
)

A = str(uuid.uuid4())
B = str(uuid.uuid4())
TIMEOUT = 60


def get(result: AsyncResult[Any]) -> Any:
    return result.get(timeout=TIMEOUT)


def child(result: AsyncResult[Any], key: str = "child_id") -> Any:
    return get(tasks.app.AsyncResult(get(result)[key]))


def test_nested_headers_naming_another_tenant_are_refused(tenant_worker: Any) -> None:
    # The pool and the worker's main process read one tenant: the message's own header.
    # A nested ``headers`` key naming another tenant makes one message name two.
    result = tasks.app.send_task(
        tasks.observe.name, ("nested",), headers={"tenant_id": A, "headers": {"tenant_id": B}}
    )
    with pytest.raises(TenantConflict):
        get(result)
    result = tasks.app.send_task(
        tasks.observe.name, ("same",), headers={"tenant_id": A, "headers": {"tenant_id": A}}
    )
    assert get(result)["tenant"] == A


def test_task_observes_publishers_tenant(tenant_worker: Any) -> None:
    with tenant_context(A):
        assert get(tasks.observe.delay("a"))["tenant"] == A
    with tenant_context(B):
        assert get(tasks.observe.apply_async(("b",)))["tenant"] == B
        assert get(tasks.observe.s("c").delay())["tenant"] == B
        # by name: no tenant task class on this side, the publish signal stamps it
        assert get(tasks.app.send_task(tasks.observe.name, ("d",)))["tenant"] == B


def test_explicit_tenant_and_function_parameter(tenant_worker: Any) -> None:
    assert get(tasks.observe.delay(tenant_id=A))["tenant"] == A
    assert get(tasks.wants_tenant.delay(tenant_id=B)) == [B, B]
    with tenant_context(A):
        assert get(tasks.wants_tenant.delay()) == [A, A]


def test_child_task(tenant_worker: Any) -> None:
    with tenant_context(A):
        result = tasks.spawn.delay()
    assert get(result)["tenant"] == A
    assert child(result)["tenant"] == A


def test_plain_task_passes_tenant_on(tenant_worker: Any) -> None:
    with tenant_context(B):
        result = tasks.plain_spawn.delay()
    assert get(result)["tenant"] == B
    assert child(result)["tenant"] == B


def test_chain(tenant_worker: Any) -> None:
    with tenant_context(A):
        result = chain(tasks.step.s(), tasks.step.s(), tasks.step.s()).delay()
    assert get(result) == [A, A, A]


def test_group(tenant_worker: Any) -> None:
    with tenant_context(B):
        result = group(tasks.observe.s(i) for i in range(4)).delay()
    assert [part["tenant"] for part in get(result)] == [B] * 4


def test_chord(tenant_worker: Any) -> None:
    with tenant_context(A):
        result = chord((tasks.observe.s(i) for i in range(3)), tasks.collect.s()).delay()
    assert get(result) == {"tenant": A, "parts": [A, A, A]}


def test_explicit_retry(tenant_worker: Any) -> None:
    with tenant_context(B):
        result = tasks.retrying.delay()
    assert get(result) == [B, B, B]


def test_autoretry(tenant_worker: Any) -> None:
    with tenant_context(A):
        result = tasks.autoretrying.delay()
    assert get(result) == {"tenant": A, "retries": 2}


def test_countdown_and_eta(tenant_worker: Any) -> None:
    with tenant_context(B):
        by_countdown = tasks.observe.apply_async(("countdown",), countdown=1)
        by_eta = tasks.observe.apply_async(
            ("eta",), eta=datetime.now(timezone.utc) + timedelta(seconds=1)
        )
    assert get(by_countdown)["tenant"] == B
    assert get(by_eta)["tenant"] == B


def test_interleaved_tenants_never_cross(tenant_worker: Any) -> None:
    results = []
    for index in range(16):
        tenant = (A, B)[index % 2]
        with tenant_context(tenant):
            results.append((tenant, tasks.slow_observe.delay(index, 0.05)))
    observed = [(tenant, get(result)) for tenant, result in results]
    for tenant, seen in observed:
        assert seen["tenant"] == tenant
        assert seen["before"] == tenant
    assert {seen["pid"] for _, seen in observed}, "no task ran"


def test_fan_out(tenant_worker: Any) -> None:
    results = fan_out(tasks.observe, [A, B], "fan", spread=1)
    assert [get(result)["tenant"] for result in results] == [A, B]


def test_plain_task_without_header_sees_no_tenant(tenant_worker: Any) -> None:
    # A worker thread or process that ran tenant A's tasks must not lend A to
    # a message that carries no tenant.
    with tenant_context(A):
        get(tasks.observe.delay())
    assert get(tasks.plain_observe.delay())["tenant"] is None


def _failure(result: AsyncResult[Any]) -> BaseException:
    with pytest.raises(Exception) as info:  # noqa: PT011 (the type is asserted by the caller)
        get(result)
    assert result.state == "FAILURE"
    return info.value


def test_missing_tenant_fails_closed(tenant_worker: Any) -> None:
    assert current_tenant() is None
    with pytest.raises(TenantContextMissing):
        tasks.observe.delay()  # refused before anything is sent
    # A message with no tenant (another producer, a hand-made message)
    exc = _failure(tasks.app.send_task(tasks.observe.name, ("no-tenant",)))
    assert isinstance(exc, TenantContextMissing)
    assert "refused" in tenant_worker.log_text()


def test_conflicting_tenants_fail(tenant_worker: Any) -> None:
    result = tasks.app.send_task(
        tasks.observe.name, kwargs={"tenant_id": A}, headers={"tenant_id": B}
    )
    assert isinstance(_failure(result), TenantConflict)


def test_forged_header_fails(tenant_worker: Any) -> None:
    result = tasks.app.send_task(tasks.observe.name, headers={"tenant_id": "1 OR 1=1"})
    assert isinstance(_failure(result), InvalidTenantId)


def test_publishers_dicts_unchanged(tenant_worker: Any) -> None:
    headers = {"x-request-id": "r-1"}
    kwargs = {"tag": "k"}
    with tenant_context(A):
        result = tasks.observe.apply_async(kwargs=kwargs, headers=headers)
    assert get(result)["tenant"] == A
    assert headers == {"x-request-id": "r-1"}
    assert kwargs == {"tag": "k"}
