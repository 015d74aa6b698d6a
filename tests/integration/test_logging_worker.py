"""JSON logs of a real prefork worker whose app calls ``configure_logging()``.

Every line is JSON; lines logged inside a task name its task, tenant and
correlation id; so do the lines the worker logs about a task from its main
process (received, accepted, its pool process lost), with a hostile tenant
header never echoed.
"""

from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import chain

from tenant_celery import InvalidTenantId, TenantContextMissing, tenant_context
from tenant_celery.correlation import correlation_context
from tests._rig.worker import WorkerFactory

from . import logging_app as logging_tasks
from . import observability_app as tasks
from .monitor_client import json_lines

pytestmark = pytest.mark.worker

A = str(uuid.uuid4())
B = str(uuid.uuid4())
KEYS = {"timestamp", "level", "logger", "message", "task_name", "task_id", "tenant_id"}
KEYS |= {"correlation_id"}
REQUEST_ID = "web-request-logs-5c1d"
#: A tenant header no worker may echo: control characters, a forged log field, 10 kB.
HOSTILE = "\x1b[2J\r\nlevel=CRITICAL forged\x00" + "Z" * 10_000


def _lines_of(lines: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["task_id"] == task_id]


def test_every_line_is_json_with_task_tenant_and_correlation(start_worker: WorkerFactory) -> None:
    handle = start_worker(
        tasks.__name__,
        broker="redis",
        pool="prefork",
        concurrency=2,
        extra_args=["--max-tasks-per-child=2"],
    )
    with handle.bind(tasks.app):
        # A web request with its own id: every task it causes shares it.
        with correlation_context("web-request-7f3a") as request_id, tenant_context(A):
            from_request = tasks.log_and_spawn.delay().get(timeout=30)
            in_chain = chain(tasks.log_child.si(), tasks.log_child.si()).delay()
            retried = tasks.retry_once.delay(5)
        assert in_chain.get(timeout=30)["correlation_id"] == request_id
        assert in_chain.parent is not None
        assert in_chain.parent.get(timeout=30)["correlation_id"] == request_id
        assert retried.get(timeout=30) == 5
        # A publish outside any correlation context starts an id of its own.
        with tenant_context(B):
            fresh = tasks.log_and_spawn.delay().get(timeout=30)
        children = [
            tasks.app.AsyncResult(result["child_id"]).get(timeout=30)
            for result in (from_request, fresh)
        ]
        with tenant_context(A):
            with pytest.raises(ValueError, match="fails on purpose"):
                tasks.fail.delay(0).get(timeout=30)

    assert from_request["correlation_id"] == request_id == "web-request-7f3a"
    assert children[0]["correlation_id"] == request_id
    assert fresh["correlation_id"] not in (None, request_id)
    assert children[1]["correlation_id"] == fresh["correlation_id"]

    # A result is stored before the worker logs the task's outcome.
    handle.wait_for_log("(?s)child task logs inside its tenant.*child task logs inside its tenant")
    handle.wait_for_log(r"raised unexpected: ValueError\('task 0 fails on purpose'\)")
    for task_id in (from_request["task_id"], fresh["task_id"], retried.id):
        handle.wait_for_log(rf"\[{task_id}\] succeeded in")
    lines = json_lines(handle.log_text())  # fails on the first line that is not JSON
    for line in lines:
        assert line.keys() >= KEYS, line

    for result, child, tenant in zip((from_request, fresh), children, (A, B), strict=True):
        correlation = result["correlation_id"]
        parent_lines = _lines_of(lines, result["task_id"])
        by_message = {line["message"]: line for line in parent_lines}
        logged = by_message["parent task logs inside its tenant"]
        printed = by_message["parent task prints a line"]
        assert logged["logger"] == "observability_app"
        assert printed["logger"] == "celery.redirected"
        for line in (logged, printed):
            assert line["task_name"] == tasks.log_and_spawn.name
            assert line["tenant_id"] == tenant
            assert line["correlation_id"] == correlation
        child_line = next(
            line
            for line in _lines_of(lines, child["task_id"])
            if line["message"] == "child task logs inside its tenant"
        )
        assert child_line["level"] == "WARNING"
        assert child_line["task_name"] == tasks.log_child.name
        assert child_line["tenant_id"] == tenant
        assert child_line["correlation_id"] == correlation
        # Celery's own line for the task, logged in the child that ran it.
        succeeded = [line for line in parent_lines if "succeeded in" in line["message"]]
        assert [line["tenant_id"] for line in succeeded] == [tenant]

    # Both runs of the retried task (the retry is a new message) keep the request's id.
    retried_lines = [line for line in _lines_of(lines, retried.id) if line["correlation_id"]]
    assert {line["correlation_id"] for line in retried_lines} == {request_id}
    assert any("retry: Retry in" in line["message"] for line in retried_lines)

    failure = next(line for line in lines if "fails on purpose" in line["message"])
    assert failure["level"] == "ERROR"
    assert failure["tenant_id"] == A
    assert "ValueError: task 0 fails on purpose" in failure["exception"]

    # The banner is one record; the worker's own start-up lines are JSON too.
    assert any(line["message"].startswith("celery worker ") for line in lines)
    assert any(line["message"].endswith(" ready.") for line in lines)

    handle.stop()
    # Celery writes its shutdown notice straight to the standard output's file
    # descriptor, around logging; that is the only plain-text line.
    after = handle.log_text().splitlines()[len(lines) + 1 :]
    plain = [line for line in after if line.strip() and not line.startswith("{")]
    assert plain == ["worker: Warm shutdown (MainProcess)"]


def _parent_of(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, not ")".
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_every_line_about_a_task_names_it(start_worker: WorkerFactory) -> None:
    """Received, retried, succeeded, failed, refused and lost: each line about a task
    names its id, name, tenant and correlation id, whichever process logs it.  (Celery
    logs no line when a pool process starts a task.)"""
    handle = start_worker(logging_tasks.__name__, broker="redis", pool="prefork", concurrency=2)
    app = logging_tasks.app
    with handle.bind(app):
        with correlation_context(REQUEST_ID):
            with tenant_context(A):
                succeeded = logging_tasks.work.delay(1)
                failed = logging_tasks.fail.delay(2)
                retried = logging_tasks.retry_once.delay(3)
            refused = app.send_task(logging_tasks.work.name, args=(4,))
            hostile = app.send_task(
                logging_tasks.work.name, args=(5,), headers={"tenant_id": HOSTILE}
            )
        assert succeeded.get(timeout=30) == {"index": 1, "tenant": A}
        with pytest.raises(ValueError, match="fails on purpose"):
            failed.get(timeout=30)
        assert retried.get(timeout=30) == 3
        with pytest.raises(TenantContextMissing):
            refused.get(timeout=30)
        with pytest.raises(InvalidTenantId):
            hostile.get(timeout=30)

        # A pool process killed mid-task: the main process fails the task.
        with correlation_context(REQUEST_ID), tenant_context(A):
            lost = logging_tasks.linger.delay(60)
        pid = int(handle.wait_for_log(rf"{logging_tasks.LINGERING} (\d+)", timeout=30).group(1))
        assert _parent_of(pid) == handle.pid, "not a pool process of this worker"
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(Exception, match="exited prematurely"):
            lost.get(timeout=30)

    waits = [
        rf"\[{succeeded.id}\] succeeded in",
        rf"\[{failed.id}\] raised unexpected",
        rf"\[{retried.id}\] succeeded in",
        rf"\[{refused.id}\] refused \(missing\)",
        rf"\[{hostile.id}\] refused \(invalid\)",
        r"Task handler raised error: WorkerLostError",
    ]
    for pattern in waits:
        handle.wait_for_log(pattern, timeout=15)
    text = handle.log_text()
    lines = json_lines(text)  # fails on the first line that is not JSON

    def line_about(task_id: str, pattern: str, count: int = 1) -> list[dict[str, Any]]:
        found = [line for line in _lines_of(lines, task_id) if re.search(pattern, line["message"])]
        assert len(found) == count, (pattern, task_id, found)
        return found

    def names(line: dict[str, Any], task_name: str, tenant: str | None) -> None:
        assert line["task_name"] == task_name, line
        assert line["tenant_id"] == tenant, line
        assert line["correlation_id"] == REQUEST_ID, line

    tenant_tasks = [
        (succeeded, logging_tasks.work.name, 1),
        (failed, logging_tasks.fail.name, 1),
        (retried, logging_tasks.retry_once.name, 2),  # the retry is a message of its own
        (lost, logging_tasks.linger.name, 1),
        (refused, logging_tasks.work.name, 1),
        (hostile, logging_tasks.work.name, 1),
    ]
    for result, task_name, runs in tenant_tasks:
        tenant = None if result in (refused, hostile) else A  # refused: it has none
        # The main process, when the message arrives.
        for line in line_about(result.id, r"\] received$", runs):
            names(line, task_name, tenant)
    # The pool process that ran it.
    for result, pattern, task_name in (
        (succeeded, r"\] succeeded in ", logging_tasks.work.name),
        (failed, r"\] raised unexpected: ValueError", logging_tasks.fail.name),
        (retried, r"\] retry: Retry in ", logging_tasks.retry_once.name),
        (retried, r"\] succeeded in ", logging_tasks.retry_once.name),
    ):
        (line,) = line_about(result.id, pattern)
        names(line, task_name, A)
    (failure,) = line_about(failed.id, r"raised unexpected")
    assert failure["level"] == "ERROR"
    for result, reason in ((refused, "missing"), (hostile, "invalid")):
        (refusal,) = line_about(result.id, rf"refused \({reason}\)")
        assert refusal["level"] == "WARNING"
        names(refusal, logging_tasks.work.name, None)
    # The main process, for the task its pool process was running when killed.
    (lost_line,) = line_about(lost.id, r"^Task handler raised error: WorkerLostError")
    assert lost_line["level"] == "ERROR"
    names(lost_line, logging_tasks.linger.name, A)
    # Billiard's line about the process itself names no task.
    assert any(re.search(rf"pid:{pid} exited with .*SIGKILL", line["message"]) for line in lines)

    # A hostile tenant header is never written, in any form.  (At DEBUG, Celery's own
    # "TaskPool: Apply ..." line shows a message's headers, escaped and cut short.)
    assert {line["tenant_id"] for line in lines} <= {None, A}
    assert "forged" not in text
    assert "Z" * 64 not in text
