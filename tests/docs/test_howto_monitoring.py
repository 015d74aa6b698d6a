"""docs/howto/monitoring.md: the page's app module in a real ``celery worker`` on the
PostgreSQL broker, its monitor scraped, and the Prometheus and Kubernetes samples
checked against what the worker serves.

The worker listens on 127.0.0.1 and on a free port instead of the page's
``0.0.0.0:9808``: tests bind nothing beyond this machine, and other test runs may
hold 9808.
"""

from __future__ import annotations

import logging
import re
import shlex
import socket
import sys
import types
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml
from celery import Celery

from tenant_celery import metrics, monitor, tenant_context
from tenant_celery.monitor import WorkerMonitor
from tests._rig.postgres import Database, render
from tests._rig.worker import WorkerFactory, WorkerHandle
from tests.docs.blocks import Block
from tests.docs.harness import Command, PageRun, Substitutions, assert_output, commands
from tests.docs.scratch import forget_kombu_engines
from tests.integration.monitor_client import get, scrape

PAGE = "howto/monitoring.md"
TENANT = "0b7e4c1a-5a43-4f5e-9d1c-2f6a1c9e7b10"

# Appended to the page's app module: tasks to count, and the rig's broker settings.
WORKER_SUFFIX = """

# -- added by the docs test: tasks to count, the rig's broker, backend and queue
from tenant_celery import tenant_task
from tests._rig.appconf import apply_test_config


@tenant_task(app=app)
def ping(fail: bool = False) -> str:
    if fail:
        raise ValueError("failed on purpose")
    return "pong"


apply_test_config(app)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sample_names(text: str) -> set[str]:
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1].isalpha()}


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> prometheus_client.CollectorRegistry:
    """A fresh default registry: the page installs metrics in prometheus-client's."""
    fresh = prometheus_client.CollectorRegistry()
    monkeypatch.setattr(prometheus_client, "REGISTRY", fresh)
    return fresh


@pytest.mark.worker
def test_page(
    tmp_path: Path,
    database: Database,
    start_worker: WorkerFactory,
    registry: prometheus_client.CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    subs = Substitutions()
    subs.add("9808", str(port))
    subs.add("0.0.0.0", "127.0.0.1")
    subs.add("postgresql+psycopg://app_user@db/shop", render(database.app_url))
    run = PageRun(PAGE, tmp_path, substitutions=subs)
    ns = run.namespace
    served: dict[str, Any] = {}

    @run.on("python", "install_metrics(app)\n")
    def count_tasks(block: Block) -> None:
        run.exec(block)
        ns["install_metrics"](ns["app"])  # again: nothing changes
        (tmp_path / "shop.py").write_text(run.source(block) + WORKER_SUFFIX)

    @run.on("python", "tenant_label=True, max_tenant_labels=50")
    def tenant_label(block: Block) -> None:
        monkeypatch.setattr(prometheus_client, "REGISTRY", prometheus_client.CollectorRegistry())
        app = Celery("shop", broker="memory://", task_always_eager=True, set_as_current=False)
        run.exec(block, {**ns, "app": app})

        @app.task(name="shop.labelled")
        def labelled() -> None: ...

        with tenant_context(TENANT):
            labelled.delay()
        value = prometheus_client.REGISTRY.get_sample_value(
            metrics.TASK_SUCCESS_TOTAL, {"task_name": "shop.labelled", "tenant": TENANT}
        )
        assert value == 1

    def start(command: Command) -> None:
        words = shlex.split(command.text)
        assert words[:4] == ["celery", "-A", "shop", "worker"], command
        env = {k: v for k, v in run.shell.env.items() if k.startswith("TENANT_CELERY_")}
        worker = start_worker(
            "shop",
            broker="postgres",
            extra_env={**env, "PYTHONPATH": f"{tmp_path}:{Path.cwd()}"},
            extra_args=words[4:],
        )
        served["worker"] = worker
        served["url"] = f"http://127.0.0.1:{port}"
        worker.wait_for_log(re.escape(f"worker monitor listening on {served['url']}"))

    run.shell.on("celery -A", start)

    @run.on("console", "celery -A shop worker --loglevel=INFO")
    def run_the_worker(block: Block) -> None:
        run.shell.run_block(block)
        worker: WorkerHandle = served["worker"]
        sys.modules.pop("shop", None)
        monkeypatch.setattr(prometheus_client, "REGISTRY", prometheus_client.CollectorRegistry())
        import shop  # noqa: PLC0415  (the module the worker runs)

        with worker.bind(shop.app):
            with tenant_context(TENANT):
                assert shop.ping.delay().get(timeout=20) == "pong"
                with pytest.raises(ValueError, match="on purpose"):
                    shop.ping.delay(fail=True).get(timeout=20)
            with pytest.raises(Exception, match="without a tenant"):
                shop.app.send_task("shop.ping").get(timeout=20)
        health = get(f"{served['url']}/health")
        assert (health.status, health.json()) == (
            200,
            {"status": "ok", "broker": "ok", "database": "ok"},
        )
        served["text"], served["samples"] = scrape(served["url"])
        forget_kombu_engines(database)

    @run.on("python", "app.conf.tenant_celery_monitor_port = 9808")
    def in_the_app_configuration(block: Block) -> None:
        app = Celery("shop", set_as_current=False)
        run.exec(block, {"app": app})
        assert WorkerMonitor(app).address == ("127.0.0.1", port)

    @run.on("text", "worker monitor cannot listen on")
    def port_in_use(block: Block) -> None:
        app = Celery("shop", broker="memory://", set_as_current=False)
        app.conf.update(tenant_celery_monitor_port=port, tenant_celery_monitor_host="127.0.0.1")
        # The page's worker holds the port: a second worker's monitor starts here.
        with caplog.at_level(logging.ERROR, "tenant_celery.monitor"):
            monitor._start_for_worker(sender=types.SimpleNamespace(app=app))
        assert monitor._worker.monitor is None
        (logged,) = [r.getMessage() for r in caplog.records if r.name == "tenant_celery.monitor"]
        assert_output(block.source, subs.reverse(logged), block)

    @run.on("console", "TENANT_CELERY_DATABASE_URL=postgresql+psycopg://app_user@db/shop")
    def health_database(block: Block) -> None:
        run.shell.run_block(block)
        monkeypatch.setenv(
            "TENANT_CELERY_DATABASE_URL", run.shell.env["TENANT_CELERY_DATABASE_URL"]
        )
        assert monitor._database_url(Celery("shop", set_as_current=False)) == render(
            database.app_url
        )

    @run.on("yaml", "scrape_configs:")
    def scrape_config(block: Block) -> None:
        (job,) = yaml.safe_load(block.source)["scrape_configs"]
        assert job["job_name"] == "celery-workers"
        targets = job["static_configs"][0]["targets"]
        assert {target.rsplit(":", 1)[1] for target in targets} == {"9808"}

    @run.on("yaml", "kind: PodMonitor")
    def pod_monitor(block: Block) -> None:
        document = yaml.safe_load(block.source)
        (endpoint,) = document["spec"]["podMetricsEndpoints"]
        assert endpoint == {"port": "monitor", "path": "/metrics"}
        assert get(served["url"] + endpoint["path"]).status == 200

    @run.on("yaml", "readinessProbe:")
    def probes(block: Block) -> None:
        (container,) = yaml.safe_load(block.source)["containers"]
        worker_command = run.block("console", "celery -A shop worker")
        assert container["command"] == shlex.split(commands(worker_command)[-1].text)
        exports = dict(
            c.text.removeprefix("export ").split("=", 1)
            for c in commands(worker_command)
            if c.text.startswith("export ")
        )
        assert {e["name"]: e["value"] for e in container["env"]} == exports
        (named,) = container["ports"]
        assert (named["name"], str(named["containerPort"])) == (
            "monitor",
            exports["TENANT_CELERY_MONITOR_PORT"],
        )
        for probe in ("readinessProbe", "livenessProbe"):
            path = container[probe]["httpGet"]["path"]
            assert get(served["url"] + path).status == 200
            # a probe must wait longer than the slowest /health answer
            assert container[probe]["timeoutSeconds"] > monitor.CHECK_TIMEOUT + 1
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"

    @run.on("yaml", "rule_files:")
    def rule_files(block: Block) -> None:
        (name,) = yaml.safe_load(block.source)["rule_files"]
        assert name.endswith(metrics.RULES_FILE.suffix)
        printed = run.block("python", "print(RULES_FILE)")
        assert metrics.RULES_FILE.name in printed.source  # the comment shows the file

    run.run()
    # The shipped rules file (shown with a literalinclude, proven by
    # tests/prometheus) reads what the page's worker serves: every metric it
    # names, and every label it groups by, is in the worker's scrape, counted
    # or at zero.
    exprs = [rule["expr"] for group in rules_file()["groups"] for rule in group["rules"]]
    expressions = " ".join(exprs)
    used = set(re.findall(r"(?<![\w:])celery_\w+", expressions))
    assert used <= sample_names(served["text"]), used - sample_names(served["text"])
    constants = {getattr(metrics, n) for n in metrics.__all__ if n.isupper()}
    assert {re.sub(r"_bucket$", "", name) for name in used} <= constants
    labels = set(re.findall(r"by \(([\w, ]+)\)", expressions))
    for label in {part.strip() for group_by in labels for part in group_by.split(",")}:
        if label == metrics.TENANT_LABEL:  # the page's worker counts without it
            continue
        assert re.search(rf"[{{,]{label}=", served["text"]), label
    assert 'job="celery-workers"' in expressions
    included = [b for b in run.blocks if b.kind == "literalinclude"]
    assert [b.included for b in included] == [metrics.RULES_FILE.resolve()]


def rules_file() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(metrics.RULES_FILE.read_text())
    return loaded
