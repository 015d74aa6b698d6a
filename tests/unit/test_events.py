"""The tenant field in Celery's task state and in the worker's ``task-received`` event
(the whole path, Flower and ``celery events`` included, runs against real workers in
tests/integration/test_events_worker.py)."""

from __future__ import annotations

from typing import Any

from celery.events.state import State, Task

from tenant_celery import events
from tenant_celery.events import TENANT_FIELD


def test_task_state_keeps_the_tenant_for_flower_and_celery_events() -> None:
    state = State()
    state.event(
        {
            "type": "task-received",
            "uuid": "t-1",
            "name": "shop.invoice",
            "args": "(1,)",
            "kwargs": "{}",
            TENANT_FIELD: "acme",
            "hostname": "w@h",
            "timestamp": 1.0,
            "local_received": 1.0,
            "clock": 1,
        }
    )
    task = state.tasks["t-1"]
    assert task.as_dict()[TENANT_FIELD] == "acme"  # Flower's task API
    assert task.info()[TENANT_FIELD] == "acme"  # celery events' task details
    # A task without a tenant has none, not another task's.
    assert getattr(Task(uuid="t-2"), TENANT_FIELD) is None


class _Request:
    def __init__(self, task_id: str, tenant: str | None) -> None:
        self.id = task_id
        self._tenant = tenant

    def _log_context(self) -> tuple[str | None, str | None]:
        return self._tenant, None


def test_task_received_gets_the_tenant_of_its_own_request_only() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    def send(type: str, **fields: Any) -> None:
        sent.append((type, fields))

    wrapped = events._sending_tenant(send)
    events._remember_received(request=_Request("t-1", "acme"))
    wrapped("task-received", uuid="t-1", name="shop.invoice")
    # A received event whose request was not the last one seen gets no tenant.
    events._remember_received(request=_Request("t-2", "acme"))
    wrapped("task-received", uuid="t-3", name="shop.invoice")
    # Nor does an event of another type, nor one that names its own.
    events._remember_received(request=_Request("t-4", "acme"))
    wrapped("worker-heartbeat")
    wrapped("task-received", uuid="t-4", name="shop.invoice", tenant_id="given")
    assert sent == [
        ("task-received", {"uuid": "t-1", "name": "shop.invoice", TENANT_FIELD: "acme"}),
        ("task-received", {"uuid": "t-3", "name": "shop.invoice"}),
        ("worker-heartbeat", {}),
        ("task-received", {"uuid": "t-4", "name": "shop.invoice", "tenant_id": "given"}),
    ]
