"""Task metrics in one process: eager tasks, private registries, the tenant label bound.

Real workers (prefork, threads, solo) are covered by
tests/integration/test_metrics_worker.py.
"""

from __future__ import annotations

import multiprocessing
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, Task
from prometheus_client import CollectorRegistry, Counter

from tenant_celery import ConfigurationError, current_tenant, tenant_context, tenant_task
from tenant_celery import metrics as metrics_module
from tenant_celery.metrics import (
    DURATION_BUCKETS,
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


# ------------------------------------------------------------- series at zero


def _series(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


def _worker(app: Celery, pool: str) -> Any:
    """What the metrics read of a worker at ``worker_init``."""
    return types.SimpleNamespace(app=app, pool_cls=pool)


def _task_series(labels: dict[str, str]) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """The names and labels of one task's series (one tenant's, with the tenant label)."""
    names = [TASK_STARTED_TOTAL, TASK_SUCCESS_TOTAL, TASK_FAILURE_TOTAL, TASK_RETRY_TOTAL]
    names += [TASK_REJECTED_TOTAL, TASK_DURATION_SECONDS + "_count"]
    names += [TASK_DURATION_SECONDS + "_sum"]
    found = {(name, tuple(sorted(labels.items()))) for name in names}
    for bound in DURATION_BUCKETS:
        le = "+Inf" if bound == float("inf") else str(bound)
        found.add((TASK_DURATION_SECONDS + "_bucket", tuple(sorted({**labels, "le": le}.items()))))
    return found


@pytest.mark.parametrize("tenant_label", [False, True])
def test_worker_start_creates_every_registered_task_series_at_zero(
    tasks: Tasks, tenant_label: bool
) -> None:
    install_metrics(tasks.app, registry=tasks.registry, tenant_label=tenant_label)
    assert _series(tasks.registry) == {}
    metrics_module._on_worker_init(sender=_worker(tasks.app, "threads"))
    tenant = {"tenant": ""} if tenant_label else {}
    mine = [tasks.ping, tasks.tenant_ping, tasks.fail, tasks.retry_once]
    series = _series(tasks.registry)
    for task in mine:
        expected = _task_series({"task_name": task.name, **tenant})
        assert expected <= series.keys(), task.name
        assert {series[key] for key in expected} == {0.0}
    # Every registered task but Celery's own, and nothing else.
    names = {dict(labels)["task_name"] for _, labels in series}
    registered = {name for name in tasks.app.tasks if not name.startswith("celery.")}
    assert names == registered
    assert len(series) == len(registered) * len(_task_series({}))
    # Counting adds to those series: no second series, no lost first count.
    assert tasks.ping.apply().get() == "pong"
    after = _series(tasks.registry)
    assert after.keys() == series.keys()
    assert (
        after[(TASK_SUCCESS_TOTAL, tuple(sorted({"task_name": tasks.ping.name, **tenant}.items())))]
        == 1.0
    )


def test_a_tenant_series_start_at_zero_with_its_first_message(tasks: Tasks) -> None:
    install_metrics(tasks.app, registry=tasks.registry, tenant_label=True, max_tenant_labels=1)
    for tenant in (A, B):  # B is past the limit: "other"
        with tenant_context(tenant):
            tasks.tenant_ping.apply().get()
    series = _series(tasks.registry)
    for tenant in (A, OTHER_TENANTS):
        labels = {"task_name": tasks.tenant_ping.name, "tenant": tenant}
        expected = _task_series(labels)
        assert expected <= series.keys(), tenant
        assert tasks.value(TASK_STARTED_TOTAL, tasks.tenant_ping, tenant=tenant) == 1.0
        for outcome in (TASK_FAILURE_TOTAL, TASK_RETRY_TOTAL, TASK_REJECTED_TOTAL):
            key = (outcome, tuple(sorted(labels.items())))
            assert series[key] == 0.0
    # Only the tenants that ran, only the task that ran: the label bound holds.
    assert {dict(labels)["tenant"] for _, labels in series} == {A, OTHER_TENANTS}
    assert {dict(labels)["task_name"] for _, labels in series} == {tasks.tenant_ping.name}


def _count_in_child(tasks: Tasks) -> None:
    assert tasks.ping.apply().get() == "pong"
    assert tasks.ping.apply().get() == "pong"
    assert tasks.fail.apply(throw=False).state == "FAILURE"


def test_prefork_zeros_are_in_the_sum_and_counted_once(
    tasks: Tasks, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tenant_celery.monitor import _multiprocess_metrics  # noqa: PLC0415

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    install_metrics(tasks.app, registry=tasks.registry)
    assert tasks.ping.apply().get() == "pong"  # before the worker: not in its totals
    metrics_module._on_worker_init(sender=_worker(tasks.app, "prefork"))
    try:
        directory = metrics_module.multiprocess_directory()
        assert directory is not None
        assert directory.startswith(str(tmp_path))
        context = multiprocessing.get_context("fork")
        for _ in range(2):  # two children, one after the other
            child = context.Process(target=_count_in_child, args=(tasks,))
            child.start()
            child.join(30)
            assert child.exitcode == 0
        merged = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for metric in _multiprocess_metrics(directory)
            for sample in metric.samples
        }
    finally:
        metrics_module._on_worker_shutdown()
    registered = {name for name in tasks.app.tasks if not name.startswith("celery.")}
    assert {dict(labels)["task_name"] for _, labels in merged} == registered
    assert len(merged) == len(registered) * len(_task_series({}))

    def value(name: str, task: Task[Any, Any]) -> float:
        return merged[(name, (("task_name", task.name),))]

    assert value(TASK_STARTED_TOTAL, tasks.ping) == 4.0
    assert value(TASK_SUCCESS_TOTAL, tasks.ping) == 4.0
    assert value(TASK_DURATION_SECONDS + "_count", tasks.ping) == 4.0
    assert value(TASK_FAILURE_TOTAL, tasks.fail) == 2.0
    assert value(TASK_SUCCESS_TOTAL, tasks.fail) == 0.0
    assert value(TASK_STARTED_TOTAL, tasks.retry_once) == 0.0
    assert metrics_module.multiprocess_directory() is None
