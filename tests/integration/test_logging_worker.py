"""JSON logs of a real prefork worker whose app calls ``configure_logging()``."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import chain

from tenant_celery import tenant_context
from tenant_celery.correlation import correlation_context
from tests._rig.worker import WorkerFactory

from . import observability_app as tasks
from .monitor_client import json_lines

pytestmark = pytest.mark.worker

A = str(uuid.uuid4())
B = str(uuid.uuid4())
KEYS = {"timestamp", "level", "logger", "message", "task_name", "task_id", "tenant_id"}
KEYS |= {"correlation_id"}


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
