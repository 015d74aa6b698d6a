"""Task metrics counted by real ``celery worker`` processes and served by their monitor.

Each test starts its own worker (a fresh multiprocess directory, fresh
counters), runs a known mix of tasks and asserts that one scrape of
``/metrics`` shows exactly that mix.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.result import AsyncResult

from tenant_celery import TenantContextMissing, tenant_context
from tenant_celery.metrics import (
    DURATION_BUCKETS,
    OTHER_TENANTS,
    QUEUE_LENGTH,
    QUEUE_LENGTH_UP,
    TASK_DURATION_SECONDS,
    TASK_FAILURE_TOTAL,
    TASK_REJECTED_TOTAL,
    TASK_RETRY_TOTAL,
    TASK_STARTED_TOTAL,
    TASK_SUCCESS_TOTAL,
)
from tenant_celery.monitor import WorkerMonitor
from tests._rig.postgres import Database, render
from tests._rig.worker import Pool, WorkerFactory, WorkerHandle

from . import observability_app as tasks
from .monitor_client import MONITOR_ENV, Samples, monitor_url, scrape, settled_scrape, total

pytestmark = pytest.mark.worker

A, B, C = (str(uuid.uuid4()) for _ in range(3))
TIMEOUT = 60
DURATION_COUNT = TASK_DURATION_SECONDS + "_count"


def _get(result: AsyncResult[Any]) -> Any:
    return result.get(timeout=TIMEOUT)


def _differences(expected: Mapping[tuple[str, str | None], float]) -> Any:
    """``expected`` maps (metric, task name or None for all) to a count."""

    def compare(samples: Samples) -> dict[str, float]:
        found = {}
        for (metric, task), wanted in expected.items():
            labels = {} if task is None else {"task_name": task}
            found[f"{metric}{labels or ''}"] = total(samples, metric, **labels) - wanted
        return found

    return compare


def _run_mix(
    handle: WorkerHandle, *, ok: int, failing: int, retried: int, tenantless: int
) -> set[int]:
    """Run the mix and wait for every result; the first two tenants are A and B.

    Returns the PIDs that ran the ``work`` tasks."""
    with handle.bind(tasks.app):
        # A and B are the first tenants the worker sees: they get their own label.
        with tenant_context(A):
            _get(tasks.work.delay(-1))
        with tenant_context(B):
            _get(tasks.work.delay(-2))
        results = []
        for index in range(ok - 2):
            with tenant_context((A, B, C)[index % 3]):
                results.append(tasks.work.delay(index))
        with tenant_context(A):
            failures = [tasks.fail.delay(index) for index in range(failing)]
        with tenant_context(C):
            retries = [tasks.retry_once.delay(index) for index in range(retried)]
        # Messages without a tenant, as another producer could send them.
        refused = [tasks.app.send_task(tasks.work.name, (index,)) for index in range(tenantless)]
        pids = {_get(result)["pid"] for result in results}
        assert [_get(result) for result in retries] == list(range(retried))
        for result in failures:
            with pytest.raises(ValueError, match="fails on purpose"):
                _get(result)
        for result in refused:
            with pytest.raises(TenantContextMissing):
                _get(result)
    return pids


def _expected_mix(ok: int, failing: int, retried: int, tenantless: int, pings: int) -> Any:
    # A retried task runs twice: the first run ends in a retry (started, no
    # duration), the second in success.  A refused task starts and is counted
    # as rejected, not as a failure, and has no duration: its body never ran.
    return _differences(
        {
            (TASK_STARTED_TOTAL, None): pings + ok + failing + 2 * retried + tenantless,
            (TASK_SUCCESS_TOTAL, None): pings + ok + retried,
            (TASK_FAILURE_TOTAL, None): failing,
            (TASK_RETRY_TOTAL, None): retried,
            (TASK_REJECTED_TOTAL, None): tenantless,
            (DURATION_COUNT, None): pings + ok + failing + retried,
            (TASK_STARTED_TOTAL, tasks.work.name): ok + tenantless,
            (TASK_SUCCESS_TOTAL, tasks.work.name): ok,
            (TASK_REJECTED_TOTAL, tasks.work.name): tenantless,
            (TASK_FAILURE_TOTAL, tasks.fail.name): failing,
            (DURATION_COUNT, tasks.fail.name): failing,
            (TASK_RETRY_TOTAL, tasks.retry_once.name): retried,
            (TASK_SUCCESS_TOTAL, tasks.retry_once.name): retried,
        }
    )


def _start(
    start_worker: WorkerFactory, pool: Pool, broker: Any = "redis", **kwargs: Any
) -> tuple[WorkerHandle, str]:
    handle = start_worker(tasks.__name__, broker=broker, pool=pool, extra_env=MONITOR_ENV, **kwargs)
    return handle, monitor_url(handle)


def _ping_gate(handle: WorkerHandle, url: str) -> None:
    """After one ``ping``: started, success and duration count are each 1.0 for it."""
    with handle.bind(tasks.app):
        assert _get(tasks.ping.delay()) == "pong"
    ping = tasks.ping.name
    _, samples, differences = settled_scrape(
        url,
        _differences(
            {
                (TASK_STARTED_TOTAL, ping): 1,
                (TASK_SUCCESS_TOTAL, ping): 1,
                (DURATION_COUNT, ping): 1,
            }
        ),
    )
    assert differences == {}
    labels = (("task_name", ping), ("tenant", ""))
    assert samples[(TASK_STARTED_TOTAL, labels)] == 1.0
    assert samples[(TASK_SUCCESS_TOTAL, labels)] == 1.0
    assert samples[(DURATION_COUNT, labels)] == 1.0


def _assert_tenant_labels(samples: Samples) -> None:
    """Two tenants admitted (A, B), C counted under "other", refused tasks under ""."""
    tenants = {
        dict(labels).get("tenant")
        for (name, labels), _ in samples.items()
        if name == TASK_STARTED_TOTAL
    }
    assert tenants == {"", A, B, OTHER_TENANTS}
    assert total(samples, TASK_REJECTED_TOTAL, tenant="") == total(samples, TASK_REJECTED_TOTAL)
    assert total(samples, TASK_RETRY_TOTAL, tenant=OTHER_TENANTS) == total(
        samples, TASK_RETRY_TOTAL
    )


def _promtool_accepts(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        return  # the parser check above is the one that always runs
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


MIX = {"ok": 8, "failing": 3, "retried": 2, "tenantless": 2}


def test_prefork_with_recycled_children_counts_exactly(start_worker: WorkerFactory) -> None:
    handle, url = _start(
        start_worker, "prefork", concurrency=2, extra_args=["--max-tasks-per-child=2"]
    )
    _ping_gate(handle, url)
    pids = _run_mix(handle, **MIX)
    text, samples, differences = settled_scrape(url, _expected_mix(**MIX, pings=1))
    assert differences == {}
    _assert_tenant_labels(samples)
    _promtool_accepts(text)
    # More processes ran tasks than the pool holds at once: the totals include
    # the counts of children that had already exited.
    assert len(pids) > 2


def test_threads_pool_counts_exactly(start_worker: WorkerFactory) -> None:
    handle, url = _start(start_worker, "threads", concurrency=2)
    _ping_gate(handle, url)
    _run_mix(handle, **MIX)
    _, samples, differences = settled_scrape(url, _expected_mix(**MIX, pings=1))
    assert differences == {}
    _assert_tenant_labels(samples)


def test_solo_pool_counts_exactly(start_worker: WorkerFactory) -> None:
    handle, url = _start(start_worker, "solo", concurrency=1)
    _ping_gate(handle, url)
    _run_mix(handle, **MIX)
    _, samples, differences = settled_scrape(url, _expected_mix(**MIX, pings=1))
    assert differences == {}
    _assert_tenant_labels(samples)


@pytest.mark.parametrize("broker", ["postgres", "tcpg"])
def test_queue_length_of_the_postgresql_broker(start_worker: WorkerFactory, broker: str) -> None:
    """kombu's SQLAlchemy transport, and the package's own (``tcpg``): the queues the
    worker consumes, not every queue in the tables."""
    handle, url = _start(start_worker, "threads", broker=broker, concurrency=2)
    backlog = f"tc.backlog.{uuid.uuid4().hex[:8]}"
    with handle.bind(tasks.app):
        assert _get(tasks.ping.delay()) == "pong"  # the worker's own queue, drained
        for _ in range(3):
            tasks.ping.apply_async(queue=backlog)  # a queue nobody consumes
    _, samples = scrape(url)
    assert {key: value for key, value in samples.items() if key[0] == QUEUE_LENGTH} == {
        (QUEUE_LENGTH, (("queue", handle.queue),)): 0.0
    }


def test_queue_length_query_gives_up_at_its_statement_timeout(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    admin = database.admin_engine()
    with admin.begin() as conn:  # the two tables kombu's transport reads, minimal
        conn.execute(sa.text("CREATE TABLE kombu_queue (id serial PRIMARY KEY, name text)"))
        conn.execute(
            sa.text(
                "CREATE TABLE kombu_message (id serial PRIMARY KEY, visible boolean,"
                " queue_id integer REFERENCES kombu_queue (id))"
            )
        )
        conn.execute(sa.text("INSERT INTO kombu_queue (name) VALUES ('celery')"))
    app = Celery("queue_length_timeout", broker="sqla+" + render(database.url))
    monitor = WorkerMonitor(app, port=0, check_timeout=0.5)
    monitor.start()
    try:
        _, samples = scrape(monitor.url)
        assert samples[(QUEUE_LENGTH, (("queue", "celery"),))] == 0.0
        with admin.connect() as locker, locker.begin():
            locker.execute(sa.text("LOCK TABLE kombu_message IN ACCESS EXCLUSIVE MODE"))
            started = time.monotonic()
            text, samples = scrape(monitor.url)
            elapsed = time.monotonic() - started
    finally:
        monitor.stop()
    assert elapsed < 2.0, f"the scrape waited {elapsed:.1f}s on a locked table"
    assert f"# TYPE {QUEUE_LENGTH} gauge" in text  # the family, without samples
    assert not [key for key in samples if key[0] == QUEUE_LENGTH]
    assert samples[(QUEUE_LENGTH_UP, ())] == 0.0
    assert "could not read the queue lengths" in caplog.text
    assert "statement timeout" in caplog.text


#: One task's series for one label set: five counters, and the histogram's
#: buckets (``DURATION_BUCKETS``), ``_sum`` and ``_count``.
SERIES_PER_TASK = 5 + len(DURATION_BUCKETS) + 2
OWN_TASKS = [tasks.ping, tasks.work, tasks.fail, tasks.retry_once]
OWN_TASKS += [tasks.log_and_spawn, tasks.log_child]


def _task_samples(samples: Samples) -> Samples:
    return {key: value for key, value in samples.items() if key[0].startswith("celery_task_")}


def _labels_of(samples: Samples) -> dict[tuple[str, str], int]:
    """(task name, tenant) -> how many series it has."""
    found: dict[tuple[str, str], int] = {}
    for _, labels in samples:
        named = dict(labels)
        key = (named["task_name"], named["tenant"])
        found[key] = found.get(key, 0) + 1
    return found


def test_prefork_series_are_at_zero_from_worker_start(start_worker: WorkerFactory) -> None:
    """Scraped as soon as the worker is ready, before any task: every registered task
    has every series, at 0 (``tenant=""``); Celery's own tasks have none.  Then the
    counts of a known mix are exact, and a tenant's series appear with its first
    message, at 0 for what did not happen."""
    handle, url = _start(
        start_worker, "prefork", concurrency=2, extra_args=["--max-tasks-per-child=3"]
    )
    _, samples = scrape(url)
    before = _task_samples(samples)
    assert set(before.values()) == {0.0}
    series = _labels_of(before)
    for task in OWN_TASKS:
        assert series.pop((task.name, "")) == SERIES_PER_TASK, task.name
    # Whatever else the worker registered: at zero too, and never Celery's own tasks.
    assert all(count == SERIES_PER_TASK and tenant == "" for (_, tenant), count in series.items())
    assert not [name for name, _ in series if name.startswith("celery.")]

    _run_mix(handle, **MIX)
    _, after, differences = settled_scrape(url, _expected_mix(**MIX, pings=0))
    assert differences == {}
    _assert_tenant_labels(after)
    counted = _task_samples(after)
    # Every series of the start is still there; the mix added only tenants' series.
    assert before.keys() <= counted.keys()
    work = tasks.work.name
    for tenant in (A, B, OTHER_TENANTS):
        assert _labels_of(counted)[(work, tenant)] == SERIES_PER_TASK, tenant
        labels = (("task_name", work), ("tenant", tenant))
        assert counted[(TASK_FAILURE_TOTAL, labels)] == 0.0
        assert counted[(TASK_REJECTED_TOTAL, labels)] == 0.0
    assert counted[(TASK_SUCCESS_TOTAL, (("task_name", tasks.ping.name), ("tenant", "")))] == 0.0
    untouched = {tasks.log_and_spawn.name, tasks.log_child.name, tasks.ping.name}
    assert {
        value for (_, labels), value in counted.items() if dict(labels)["task_name"] in untouched
    } == {0.0}
