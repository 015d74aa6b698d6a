"""Tenant tasks for tests/integration/test_refusal_log_worker.py: how a refusal is logged.

Receivers of :data:`~tenant_celery.signals.tenant_rejected` and Celery's
``task_failure`` append ``<signal> <task id>`` to the file named by
``TC_TEST_SIGNAL_FILE``, so the test sees that both still fire for a refusal
without adding lines to the worker's log.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import task_failure

from tenant_celery import TenantContextMissing, tenant_task
from tenant_celery.signals import tenant_rejected
from tests._rig.appconf import apply_test_config

app = apply_test_config(Celery("refusal_app"))

SIGNAL_FILE_ENV = "TC_TEST_SIGNAL_FILE"


def _note(signal: str, task_id: object) -> None:
    path = os.environ.get(SIGNAL_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(f"{signal} {task_id}\n")


@tenant_rejected.connect(weak=False)
def _on_rejected(sender: Any, reason: str, exc: BaseException, request: Any, **_: Any) -> None:
    _note(f"tenant_rejected:{reason}", request.id)


@task_failure.connect(weak=False)
def _on_failure(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    _note("task_failure", task_id)


@tenant_task(app=app)
def noop() -> str:
    return "ran"


@tenant_task(app=app)
def body_raises_tenant_error() -> None:
    # Not a refusal: the body itself raises one of the package's errors.
    raise TenantContextMissing("raised by the task body on purpose")


@tenant_task(app=app)
def body_raises() -> None:
    raise ValueError("the task body fails on purpose")
