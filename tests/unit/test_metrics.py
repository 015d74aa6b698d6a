"""Task metrics in one process: eager tasks, private registries, the tenant label bound.

Real workers (prefork, threads, solo) are covered by
tests/integration/test_metrics_worker.py.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, Task
from prometheus_client import CollectorRegistry, Counter

from tenant_celery import ConfigurationError, current_tenant, tenant_context, tenant_task
from tenant_celery import metrics as metrics_module
from tenant_celery.metrics import (
    OTHER_TENANTS,
    TASK_DURATION_SECONDS,
    TASK_FAILURE_TOTAL,
    TASK_REJECTED_TOTAL,
    TASK_RETRY_TOTAL,
    TASK_STARTED_TOTAL,
    TASK_SUCCESS_TOTAL,
    _TenantLabels,
    install_metrics,
)

A = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000a"
B = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000b"
C = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000c"


class Tasks:
    """An app of its own (metrics are installed per app) and its tasks."""

    def __init__(self) -> None:
        app = Celery("metrics", set_as_current=False)
        app.conf.update(task_always_eager=True, broker_url="memory://")
        self.app = app
        self.registry = CollectorRegistry()

        @app.task(shared=False)
        def ping() -> str:
            return "pong"

        @tenant_task(app=app, shared=False)
        def tenant_ping() -> str | None:
            return current_tenant()

        @app.task(shared=False)
        def fail() -> None:
            raise ValueError("fails on purpose")

        @app.task(shared=False, bind=True, max_retries=1)
        def retry_once(self: Task[Any, Any]) -> int:
            if self.request.retries == 0:
                raise self.retry(countdown=0)
            return self.request.retries

        self.ping, self.tenant_ping = ping, tenant_ping
        self.fail, self.retry_once = fail, retry_once

    def value(self, name: str, task: Task[Any, Any], **labels: str) -> float:
        found = self.registry.get_sample_value(name, {"task_name": task.name, **labels})
        return 0.0 if found is None else found


@pytest.fixture
def tasks() -> Iterator[Tasks]:
    """A fresh app with its own registry; metrics not installed yet."""
    tasks = Tasks()
    yield tasks
    tasks.app.close()


def test_one_task_counts_once_even_when_installed_twice(tasks: Tasks) -> None:
    install_metrics(tasks.app, registry=tasks.registry)
    install_metrics(tasks.app, registry=tasks.registry)  # nothing more is connected
    assert tasks.ping.apply().get() == "pong"
    assert tasks.value(TASK_STARTED_TOTAL, tasks.ping) == 1.0
    assert tasks.value(TASK_SUCCESS_TOTAL, tasks.ping) == 1.0
    assert tasks.value(TASK_DURATION_SECONDS + "_count", tasks.ping) == 1.0
    assert tasks.value(TASK_FAILURE_TOTAL, tasks.ping) == 0.0


def test_installing_again_with_other_arguments_is_refused(tasks: Tasks) -> None:
    install_metrics(tasks.app, registry=tasks.registry)
    with pytest.raises(ConfigurationError, match="already installed for app 'metrics'"):
        install_metrics(tasks.app, registry=tasks.registry, tenant_label=True)


def test_failure_retry_and_duration(tasks: Tasks) -> None:
    install_metrics(tasks.app, registry=tasks.registry)
    # With throw=True Celery re-raises before it handles the failure (no signal).
    assert tasks.fail.apply(throw=False).state == "FAILURE"
    assert tasks.retry_once.apply().get() == 1
    assert tasks.value(TASK_FAILURE_TOTAL, tasks.fail) == 1.0
    assert tasks.value(TASK_DURATION_SECONDS + "_count", tasks.fail) == 1.0
    # The first run ends in a retry (no duration), the second succeeds.
    assert tasks.value(TASK_STARTED_TOTAL, tasks.retry_once) == 2.0
    assert tasks.value(TASK_RETRY_TOTAL, tasks.retry_once) == 1.0
    assert tasks.value(TASK_SUCCESS_TOTAL, tasks.retry_once) == 1.0
    assert tasks.value(TASK_DURATION_SECONDS + "_count", tasks.retry_once) == 1.0


def test_tasks_of_other_apps_are_not_counted(tasks: Tasks) -> None:
    install_metrics(tasks.app, registry=tasks.registry)
    other = Tasks()
    try:
        other.ping.apply()
    finally:
        other.app.close()
    assert tasks.value(TASK_STARTED_TOTAL, tasks.ping) == 0.0


def test_tenant_label_is_bounded(tasks: Tasks) -> None:
    install_metrics(tasks.app, registry=tasks.registry, tenant_label=True, max_tenant_labels=2)
    for tenant in (A, B, C, A, C):
        with tenant_context(tenant):
            assert tasks.tenant_ping.apply().get() == tenant
    tasks.ping.apply()

    def started(tenant: str) -> float:
        return tasks.value(TASK_STARTED_TOTAL, tasks.tenant_ping, tenant=tenant)

    assert (started(A), started(B), started(OTHER_TENANTS), started(C)) == (2.0, 1.0, 2.0, 0.0)
    assert tasks.value(TASK_SUCCESS_TOTAL, tasks.ping, tenant="") == 1.0


def test_refused_tenant_task_counts_as_rejected_not_failed(tasks: Tasks) -> None:
    install_metrics(tasks.app, registry=tasks.registry)
    # TenantTask.apply() refuses to run without a tenant before anything runs;
    # Celery's own apply() runs it as a worker would run a message without one.
    result = Task.apply(tasks.tenant_ping, throw=False)
    assert result.state == "FAILURE"
    assert tasks.value(TASK_STARTED_TOTAL, tasks.tenant_ping) == 1.0
    assert tasks.value(TASK_REJECTED_TOTAL, tasks.tenant_ping) == 1.0
    assert tasks.value(TASK_FAILURE_TOTAL, tasks.tenant_ping) == 0.0
    assert tasks.value(TASK_DURATION_SECONDS + "_count", tasks.tenant_ping) == 0.0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "100"])
def test_max_tenant_labels_must_be_a_positive_integer(tasks: Tasks, bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_tenant_labels must be a positive integer"):
        install_metrics(tasks.app, registry=tasks.registry, max_tenant_labels=bad)


def test_a_registry_with_the_same_names_is_refused_and_left_as_it_was(tasks: Tasks) -> None:
    Counter(TASK_RETRY_TOTAL, "taken", registry=tasks.registry)
    with pytest.raises(ConfigurationError, match="cannot register the task metrics"):
        install_metrics(tasks.app, registry=tasks.registry)
    names = {metric.name for metric in tasks.registry.collect()}
    assert names == {TASK_RETRY_TOTAL.removesuffix("_total")}


def test_missing_prometheus_client_names_the_extra(
    tasks: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ModuleNotFoundError, match=r"tenant-celery\[prometheus\]") as info:
        install_metrics(tasks.app, registry=tasks.registry)
    assert info.value.name == "prometheus_client"


# ------------------------------------------------------------------ the label bound


def test_in_memory_bound() -> None:
    labels = _TenantLabels(2)
    assert [labels.label(t) for t in (A, B, C, A, None, C)] == [A, B, OTHER_TENANTS, A, "", "other"]


def _label_in_child(directory: str, limit: int, tenants: list[str], out: Any) -> None:
    metrics_module._multiprocess.directory = directory
    labels = _TenantLabels(limit)
    out.put([labels.label(tenant) for tenant in tenants])


def test_bound_is_shared_by_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Like prefork children (and their replacements), each process has its own
    # label object; the file in the worker's directory is what they share.
    monkeypatch.setattr(metrics_module._multiprocess, "directory", str(tmp_path))
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    tenants = [f"t{index}" for index in range(6)]
    processes = [
        context.Process(target=_label_in_child, args=(str(tmp_path), 3, tenants[i::2], out))
        for i in range(2)
    ]
    for process in processes:
        process.start()
    seen = [out.get(timeout=10) for _ in processes]
    for process in processes:
        process.join(10)
    admitted = {label for labels in seen for label in labels} - {OTHER_TENANTS}
    assert len(admitted) == 3
    # A process started later (a recycled child) keeps the same admitted set.
    later = _TenantLabels(3)
    assert {later.label(tenant) for tenant in tenants} == admitted | {OTHER_TENANTS}
