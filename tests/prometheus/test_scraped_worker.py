"""The shipped dashboard and rules against a real Prometheus that scraped a real worker.

A prefork ``celery worker`` (``scraped_app.py`` beside this module, the
package's PostgreSQL transport, the tenant label on) runs a known mix twice:
successes in three tenants, failures, retries, tenant tasks refused for having
no tenant.  Then its pool processes are held busy and messages of two tenants
wait in its queue.  A private ``prometheus``
(:mod:`tests.prometheus.server`) scrapes its monitor every second under the job
name the rules expect, ``celery-workers``, beside a target where nothing listens,
and evaluates a copy of the shipped rules file whose ``for:`` durations are 0s.

Then every query of every dashboard panel, its variables substituted as Grafana
would, must return data, every variable must list values, and exactly the
alerts the mix calls for must fire.  A second Prometheus, started on empty
storage after the refusals (a restart that lost its data), must not report
them.

Without the ``prometheus`` binary these tests skip, and fail under ``CI=true``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tenant_celery import TenantContextMissing, metrics, tenant_context
from tests._rig.worker import WorkerFactory, WorkerHandle
from tests.integration.monitor_client import MONITOR_ENV, monitor_url

from . import dashboard
from . import scraped_app as tasks
from .server import (
    PrometheusServer,
    finite,
    free_port,
    prometheus_binary,
    prometheus_config,
    prometheus_server,
)

pytestmark = pytest.mark.worker

JOB = "celery-workers"  # CeleryWorkerDown names it
A, B, C = (str(uuid.uuid4()) for _ in range(3))
TIMEOUT = 60
MIX = {"ok": 6, "failing": 3, "retried": 2, "refused": 2}
#: Messages left waiting in the worker's queue while its pool processes are held.
WAITING = 3
CONCURRENCY = 2
#: What Grafana puts in place of each variable: every value of the task, tenant
#: and queue variables (their "All", a regex), the one job, and its own intervals,
#: here long enough to cover the whole test on a slow machine.
VALUES = {
    "datasource": "unused",
    "job": JOB,
    "task_name": ".*",
    "tenant": ".*",
    "queue": ".*",
    "__rate_interval": "5m",
    "__interval": "15s",
    "__range": "5m",
}


@dataclass
class Scraped:
    """The worker, the mix it ran, and a Prometheus that has scraped all of it."""

    worker: WorkerHandle
    worker_target: str
    dead_target: str
    prometheus: PrometheusServer
    config: dict[str, Any]


def rules_without_delays(directory: Path) -> Path:
    """A copy of the shipped rules file whose alerts fire at once (``for: 0s``)."""
    rules = yaml.safe_load(metrics.RULES_FILE.read_text())
    delayed = 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "0s"
                delayed += 1
    assert delayed, "the shipped alerts have no for: to shorten"
    path = directory / "rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def run_mix(worker: WorkerHandle) -> None:
    with worker.bind(tasks.app):
        assert tasks.ping.delay().get(timeout=TIMEOUT) == "pong"
        # A and B get tenant labels of their own (the app admits two), C is "other".
        results = []
        for index in range(MIX["ok"]):
            with tenant_context((A, B, C)[index % 3]):
                results.append(tasks.work.delay(index))
        with tenant_context(A):
            failures = [tasks.fail.delay(index) for index in range(MIX["failing"])]
        with tenant_context(C):
            retries = [tasks.retry_once.delay(index) for index in range(MIX["retried"])]
        # Tenant tasks without a tenant, as a careless producer sends them: refused.
        refused = [tasks.app.send_task(tasks.work.name, (i,)) for i in range(MIX["refused"])]
        for result in results:
            result.get(timeout=TIMEOUT)
        assert [r.get(timeout=TIMEOUT) for r in retries] == list(range(MIX["retried"]))
        for result in failures:
            with pytest.raises(ValueError, match="fails on purpose"):
                result.get(timeout=TIMEOUT)
        for result in refused:
            with pytest.raises(TenantContextMissing):
                result.get(timeout=TIMEOUT)


def expected_counts(rounds: int) -> dict[str, float]:
    """Totals Prometheus must have scraped once ``rounds`` mixes are counted (see the
    metrics tests: a retried task starts twice, a refused one starts and is not a
    failure)."""
    return {
        metrics.TASK_STARTED_TOTAL: rounds * (
            1 + MIX["ok"] + MIX["failing"] + 2 * MIX["retried"] + MIX["refused"]
        ),
        metrics.TASK_SUCCESS_TOTAL: rounds * (1 + MIX["ok"] + MIX["retried"]),
        metrics.TASK_FAILURE_TOTAL: rounds * MIX["failing"],
        metrics.TASK_RETRY_TOTAL: rounds * MIX["retried"],
        metrics.TASK_REJECTED_TOTAL: rounds * MIX["refused"],
    }  # fmt: skip


def scraped_up(prometheus: PrometheusServer, target: str, scrapes: int = 1) -> bool | None:
    """Whether Prometheus has scraped ``target`` successfully ``scrapes`` times."""
    found = prometheus.value(f'sum_over_time(up{{job="{JOB}", instance="{target}"}}[1m])')
    return True if found is not None and found >= scrapes else None


def hold_the_pool(worker: WorkerHandle, directory: Path) -> Path:
    """Occupy every pool process with ``hold``, then publish :data:`WAITING` messages
    of tenants A and B, which wait in the queue.  Returns the file whose creation
    lets the holds end."""
    release = directory / "release"
    started = [directory / f"started-{index}" for index in range(CONCURRENCY)]
    with worker.bind(tasks.app):
        for path in started:
            tasks.hold.delay(str(path), str(release))
        deadline = time.monotonic() + TIMEOUT
        while not all(path.exists() for path in started):
            assert time.monotonic() < deadline, "the holds did not start"
            time.sleep(0.05)
        for index in range(WAITING):
            with tenant_context((A, B)[index % 2]):
                tasks.work.delay(index)
    return release


@pytest.fixture(scope="module")
def scraped(
    module_start_worker: WorkerFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scraped]:
    """A worker that ran the mix and holds messages in its queue, scraped and
    evaluated by a Prometheus of the test's."""
    binary = prometheus_binary()
    worker = module_start_worker(
        tasks.__name__,
        broker="tcpg",
        pool="prefork",
        concurrency=CONCURRENCY,
        extra_env=MONITOR_ENV,
    )
    target = monitor_url(worker).removeprefix("http://")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: a worker that is down
    directory = tmp_path_factory.mktemp("prometheus")
    config = prometheus_config(JOB, [target, dead], [rules_without_delays(directory)])
    with prometheus_server(binary, config, directory / "first") as prometheus:
        # Scraped before the mix: every series starts at zero, as in production.
        prometheus.wait_for("a scrape of the worker", lambda: scraped_up(prometheus, target))

        def differences(rounds: int) -> dict[str, tuple[float | None, float]]:
            found = {}
            for name, wanted in expected_counts(rounds).items():
                seen = prometheus.value(f'sum({name}{{job="{JOB}"}})')
                if seen != wanted:
                    found[name] = (seen, wanted)
            return found

        # Twice: a tenant's series appear with its first message, already counting
        # it, which rate() cannot see; a worker that has run for a while has them.
        for rounds in (1, 2):
            run_mix(worker)
            prometheus.wait_for(
                f"the counts of mix {rounds}",
                lambda: None if differences(rounds) else True,  # noqa: B023
                explain=lambda: f"(seen, wanted): {differences(rounds)}",  # noqa: B023
            )
        release = hold_the_pool(worker, directory)
        try:
            waiting = f'{metrics.QUEUE_LENGTH}{{job="{JOB}", queue="{worker.queue}"}}'
            prometheus.wait_for(
                f"{WAITING} messages waiting",
                lambda: True if prometheus.value(waiting) == WAITING else None,
                explain=lambda: prometheus.query(waiting),
            )
            prometheus.wait_for_evaluation()
            yield Scraped(worker, target, dead, prometheus, config)
        finally:
            release.touch()


def test_every_panel_query_returns_data(scraped: Scraped) -> None:
    board = dashboard.load()
    targets = dashboard.targets(board)
    assert len(targets) >= 20
    empty, not_finite = [], []
    for target in targets:
        result = scraped.prometheus.query(dashboard.substitute(target.expr, VALUES))
        if not result:
            empty.append(str(target))
        elif not finite(result):
            not_finite.append(f"{target}: {result}")
    assert not empty, "no data:\n" + "\n".join(empty)
    assert not not_finite, "only NaN:\n" + "\n".join(not_finite)


def test_every_panel_shows_the_mix(scraped: Scraped) -> None:
    """A few panels read back exactly what the worker did."""
    board = dashboard.load()
    by_panel: dict[str, list[dashboard.Target]] = {}
    for target in dashboard.targets(board):
        by_panel.setdefault(target.panel, []).append(target)

    def query(panel: str, index: int = 0) -> list[dict[str, Any]]:
        expr = dashboard.substitute(by_panel[panel][index].expr, VALUES)
        return scraped.prometheus.query(expr)

    def by_label(result: list[dict[str, Any]], label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in result}

    up, down = (
        scraped.prometheus.query(dashboard.substitute(t.expr, VALUES)) for t in by_panel["Workers"]
    )
    assert finite(up) == [1.0]
    assert finite(down) == [1.0]
    # increase() extrapolates past the first and last samples: never below the count.
    (refused,) = finite(query("Refused tasks"))
    assert refused >= 2 * MIX["refused"]
    ratios = by_label(query("Failure ratio by task"), "task_name")
    assert ratios[tasks.fail.name] == 1.0
    assert ratios[tasks.work.name] == 0.0
    tenants = set(by_label(query("Executions per tenant"), "tenant"))
    assert tenants == {A, B, metrics.OTHER_TENANTS, "(none)"}
    queues = by_label(query("Messages waiting per queue"), "queue")
    assert queues[scraped.worker.queue] == WAITING
    # A tenant whose messages a scrape saw waiting during the mix stays at 0.
    waiting = by_label(query("Messages waiting per tenant"), "tenant")
    assert {tenant: n for tenant, n in waiting.items() if n} == {
        A: (WAITING + 1) // 2,
        B: WAITING // 2,
    }
    instances = by_label(query("Workers up"), "instance")
    assert instances == {scraped.worker_target: 1.0, scraped.dead_target: 0.0}


def test_every_variable_lists_values(scraped: Scraped) -> None:
    board = dashboard.load()
    listed = {}
    for name, variable in dashboard.variables(board).items():
        if variable["type"] != "query":
            continue
        selector, label = dashboard.variable_query(variable)
        values = scraped.prometheus.api(
            f"label/{label}/values", [("match[]", dashboard.substitute(selector, VALUES))]
        )
        listed[name] = set(values)
    assert listed["job"] == {JOB}
    assert {tasks.ping.name, tasks.work.name, tasks.fail.name} <= listed["task_name"]
    # Tasks without a tenant have no tenant label in Prometheus: "All" covers them.
    assert listed["tenant"] == {A, B, metrics.OTHER_TENANTS}
    assert scraped.worker.queue in listed["queue"]


def firing(prometheus: PrometheusServer) -> set[tuple[str, str]]:
    """(alert, the label it is about) of every alert, which must all be firing."""
    found = set()
    for alert in prometheus.alerts():
        assert alert["state"] == "firing", alert  # for: 0s, nothing is pending
        labels = alert["labels"]
        subject = labels.get("task_name") or labels.get("queue") or labels.get("instance")
        found.add((labels["alertname"], subject))
    return found


def test_the_alerts_fire_for_what_went_wrong_and_only_that(scraped: Scraped) -> None:
    prometheus = scraped.prometheus
    for group in prometheus.rule_groups():
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule
    assert firing(prometheus) == {
        # Every run of `fail` failed; `work` succeeded, `retry_once` retried then
        # succeeded: no failure ratio above 5% for them.
        ("CeleryTaskFailures", tasks.fail.name),
        # Only `work` was sent without a tenant.
        ("TenantTasksRefused", tasks.work.name),
        ("CeleryWorkerDown", scraped.dead_target),
        # Not CeleryTasksSlow (milliseconds) nor CeleryQueueBacklog (3 waiting).
    }


def test_a_prometheus_restarted_on_empty_storage_reports_no_old_refusal(
    scraped: Scraped, tmp_path: Path
) -> None:
    """Every series is new to it: refusals counted before must not raise the alert."""
    with prometheus_server(prometheus_binary(), scraped.config, tmp_path / "fresh") as fresh:
        fresh.wait_for(
            "three scrapes of the worker", lambda: scraped_up(fresh, scraped.worker_target, 3)
        )
        fresh.wait_for_evaluation()
        # The expression this replaced reads the old refusals as new ones here.
        old = fresh.query(
            "sum by (task_name) (celery_task_rejected_total"
            " unless celery_task_rejected_total offset 15m) > 0"
        )
        assert {sample["metric"]["task_name"] for sample in old} == {tasks.work.name}
        assert firing(fresh) == {("CeleryWorkerDown", scraped.dead_target)}
