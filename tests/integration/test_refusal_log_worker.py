"""How a real worker logs a refused tenant task: one warning line, no traceback.

A refusal (no tenant, a malformed one) is expected behaviour: the worker logs
one ``WARNING`` line naming the task, its id, the reason and what to do, the
first one in a process with a link to the documentation, and Celery adds no
error line of its own.  The task still fails with the exception, and the
signals still fire.  An exception raised by a task's body is still an error
with a traceback, whatever its type.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from tenant_celery import InvalidTenantId, TenantContextMissing, tenant_context
from tenant_celery.task import REFUSAL_DOCS
from tests._rig.worker import WorkerFactory, WorkerHandle

from . import refusal_app as tasks

pytestmark = pytest.mark.worker

TIMEOUT = 30


def failure(result: AsyncResult[Any]) -> BaseException:
    with pytest.raises(Exception) as info:  # noqa: PT011 (the caller asserts the type)
        result.get(timeout=TIMEOUT)
    assert result.state == "FAILURE"
    return info.value


def lines_naming(handle: WorkerHandle, task_id: str) -> list[str]:
    """The worker's lines naming ``task_id``, but for Celery's "Task ...[id] received"."""
    return [
        line
        for line in handle.log_text().splitlines()
        if task_id in line and not line.endswith(f"[{task_id}] received")
    ]


def test_refusals_are_one_warning_line_each(start_worker: WorkerFactory, tmp_path: Path) -> None:
    signals = tmp_path / "signals.txt"
    # One pool process: its first refusal points to the docs, the second does not.
    handle = start_worker(
        tasks.__name__,
        broker="redis",
        pool="prefork",
        concurrency=1,
        extra_env={tasks.SIGNAL_FILE_ENV: str(signals)},
    )
    with handle.bind(tasks.app):
        missing = tasks.app.send_task(tasks.noop.name)
        assert isinstance(failure(missing), TenantContextMissing)
        malformed = tasks.app.send_task(tasks.noop.name, headers={"tenant_id": "1 OR 1=1"})
        assert isinstance(failure(malformed), InvalidTenantId)
        with tenant_context(str(uuid.uuid4())):
            inside = tasks.body_raises_tenant_error.delay()
            assert isinstance(failure(inside), TenantContextMissing)
            crashed = tasks.body_raises.delay()
            assert isinstance(failure(crashed), ValueError)
            assert tasks.noop.delay().get(timeout=TIMEOUT) == "ran"

    # Celery logs a body's failure after storing its result: wait for the last one.
    handle.wait_for_log(r"raised unexpected: ValueError")
    log = handle.log_text()

    first = lines_naming(handle, missing.id)
    assert len(first) == 1, log
    assert re.search(
        rf"WARNING/ForkPoolWorker-\d+\] tenant task {re.escape(tasks.noop.name)}"
        rf"\[{missing.id}\] refused \(missing\): tenant task '{re.escape(tasks.noop.name)}' "
        r"received a message without a tenant; publish it inside tenant_context\(\.\.\.\) or "
        r"pass tenant_id=\.\.\.; the task fails without running and is not retried\. "
        rf"About refused tasks: {re.escape(REFUSAL_DOCS)}$",
        first[0],
    ), first[0]

    second = lines_naming(handle, malformed.id)
    assert len(second) == 1, log
    assert re.search(
        rf"WARNING/ForkPoolWorker-\d+\] tenant task {re.escape(tasks.noop.name)}"
        rf"\[{malformed.id}\] refused \(invalid\): tenant id must be a UUID \(got a value of "
        r"type str\); check where the tenant id is read from; the task fails without running "
        r"and is not retried$",
        second[0],
    ), second[0]
    assert "1 OR 1=1" not in log  # the refused value is never echoed
    assert log.count(REFUSAL_DOCS) == 1

    # No error and no traceback for the refusals; the body's exceptions keep both.
    for refused in (missing, malformed):
        assert not [line for line in lines_naming(handle, refused.id) if "ERROR" in line], log
    assert log.count("Traceback (most recent call last)") == 2, log
    assert re.search(
        rf"ERROR/ForkPoolWorker-\d+\] Task {re.escape(tasks.body_raises_tenant_error.name)}"
        rf"\[{inside.id}\] raised unexpected: TenantContextMissing",
        log,
    ), log
    assert "tenant_celery.errors.TenantContextMissing: raised by the task body on purpose" in log
    assert "ValueError: the task body fails on purpose" in log

    # The signals fire as before: tenant_rejected for the refusals, task_failure for all.
    noted = signals.read_text().splitlines()
    assert sorted(noted) == sorted(
        [
            f"tenant_rejected:missing {missing.id}",
            f"tenant_rejected:invalid {malformed.id}",
            f"task_failure {missing.id}",
            f"task_failure {malformed.id}",
            f"task_failure {inside.id}",
            f"task_failure {crashed.id}",
        ]
    )
