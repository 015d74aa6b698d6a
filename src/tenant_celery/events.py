"""The tenant where operators look: Celery's events, Flower and ``celery inspect``.

A tenant task's tenant travels in a message header, which Celery's monitoring
tools never show.  The package adds it, as ``tenant_id``, to what they read:

* **Events.**  Every task event a worker sends (``task-received``,
  ``task-started``, ``task-succeeded``, ``task-failed``, ``task-retried``,
  ``task-rejected``, ``task-revoked``) carries a ``tenant_id`` field for a
  tenant task: ``celery events --dump`` prints it, and every event consumer
  can read it.  A worker adds it in its main process from the message, read
  and checked as the pool reads it (with signing on, only a tenant whose
  signature verifies), never the header's text as such.
* **Flower, ``celery events``, and any** :class:`celery.events.state.State`:
  importing the package adds ``tenant_id`` to the fields of Celery's task
  state, so Flower's task page shows it and its task API returns it, and
  ``celery events``' task details list it.  Flower and ``celery events``
  import the package when they load the app (``celery -A proj flower``).
  Flower's task list shows only columns Flower knows (``--tasks_columns``).
* **Remote control.**  ``celery inspect active``, ``reserved`` and
  ``scheduled`` list each tenant task's ``tenant_id``.

Nothing is added to a task's arguments.  Tasks without a tenant, and tasks
whose message names a tenant that fails validation, have none.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.events import state as _state
from celery.signals import task_received, worker_init

__all__ = ["TENANT_FIELD"]

TENANT_FIELD = "tenant_id"
"""Name of the field that carries a task's tenant in events, Flower and ``inspect``."""

_STEP_MARK = "_tenant_celery_events"
_received = threading.local()


def tenant_of(request: Any) -> str | None:
    """The verified tenant of a worker's request (``None`` without one)."""
    log_context = getattr(request, "_log_context", None)
    if log_context is None:  # a task class with a Request of its own
        return None
    tenant: str | None = log_context()[0]
    return tenant


def _show_tenant_in_task_state() -> None:
    """Make ``tenant_id`` a field of Celery's task state (Flower reads those)."""
    task_class: Any = _state.Task
    if TENANT_FIELD not in task_class._fields:
        task_class._fields = (*task_class._fields, TENANT_FIELD)
    if TENANT_FIELD not in task_class._info_fields:  # `celery events`' task details
        task_class._info_fields = (*task_class._info_fields, TENANT_FIELD)
    if not hasattr(task_class, TENANT_FIELD):
        setattr(task_class, TENANT_FIELD, None)


def _sending_tenant(send: Callable[..., Any]) -> Callable[..., Any]:
    """``send`` of a worker's event dispatcher, adding the tenant to ``task-received``
    (the other task events get it from :meth:`TenantRequest.send_event`)."""

    def send_with_tenant(type: str, *args: Any, **fields: Any) -> Any:
        if type == "task-received" and TENANT_FIELD not in fields:
            request = getattr(_received, "request", None)
            _received.request = None
            if request is not None and request.id == fields.get("uuid"):
                tenant = tenant_of(request)
                if tenant is not None:
                    fields[TENANT_FIELD] = tenant
        return send(type, *args, **fields)

    send_with_tenant.__wrapped__ = send  # type: ignore[attr-defined]
    return send_with_tenant


class _TenantEvents(bootsteps.StartStopStep):
    """Consumer step: the worker's ``task-received`` events name the tenant.

    Celery builds each task's strategy with the dispatcher's ``send`` at hand,
    so the step wraps it, then has the strategies built again.
    """

    requires = ("celery.worker.consumer.events:Events",)

    def start(self, c: Any) -> None:
        dispatcher = getattr(c, "event_dispatcher", None)
        if dispatcher is None or not dispatcher.enabled:
            return
        if not hasattr(dispatcher.send, "__wrapped__"):
            dispatcher.send = _sending_tenant(dispatcher.send)
        if getattr(c, "strategies", None):
            c.update_strategies()


@task_received.connect(weak=False, dispatch_uid="tenant_celery.events.received")
def _remember_received(request: Any = None, **_: Any) -> None:
    # Sent right before the worker's task-received event, in the same thread.
    _received.request = request


@worker_init.connect(weak=False, dispatch_uid="tenant_celery.events.worker_init")
def _add_step(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None or getattr(app, _STEP_MARK, False):
        return
    app.steps["consumer"].add(_TenantEvents)
    setattr(app, _STEP_MARK, True)


_show_tenant_in_task_state()
