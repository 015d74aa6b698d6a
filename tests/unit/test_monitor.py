"""The worker monitor in this process: routes, health checks, configuration.

No database and no broker service: the app uses kombu's in-memory transport,
and a database "down" is a closed local port.  Real workers are covered by
tests/integration/test_monitor_worker.py.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from kombu import Queue
from prometheus_client.parser import text_string_to_metric_families

from tenant_celery import ConfigurationError, _queue_lengths
from tenant_celery import metrics as metrics_module
from tenant_celery import monitor as monitor_module
from tenant_celery._readiness import ConsumerState
from tenant_celery.metrics import QUEUE_LENGTH, QUEUE_LENGTH_UP
from tenant_celery.monitor import DEFAULT_MONITOR_HOST, WorkerMonitor


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


@pytest.fixture
def app() -> Iterator[Celery]:
    """An app on the in-memory broker, without a result backend."""
    app = Celery("monitor", broker="memory://", set_as_current=False)
    yield app
    app.close()


@pytest.fixture
def serve(app: Celery) -> Iterator[Any]:
    """Start monitors for the test (``serve(**kwargs)``); stopped afterwards."""
    started: list[WorkerMonitor] = []

    def start(**kwargs: Any) -> WorkerMonitor:
        monitor = WorkerMonitor(app, port=0, **kwargs)
        monitor.start()
        started.append(monitor)
        return monitor

    yield start
    for monitor in started:
        monitor.stop()


def test_health_ok_without_a_database(serve: Any) -> None:
    monitor = serve()
    status, content_type, body = _get(f"{monitor.url}/health")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"status": "ok", "broker": "ok", "database": "not configured"}


def test_database_at_a_closed_port_degrades_health(serve: Any) -> None:
    port = _closed_port()
    monitor = serve(database_url=f"postgresql+psycopg://u:hunter22@127.0.0.1:{port}/db")
    status, _, body = _get(f"{monitor.url}/health")
    report = json.loads(body)
    assert status == 503
    assert report["status"] == "degraded"
    assert report["broker"] == "ok"
    assert report["database"].startswith("OperationalError: ")
    assert str(port) in report["database"]
    assert "hunter22" not in body.decode()


def test_unknown_paths_are_404(serve: Any) -> None:
    monitor = serve()
    for path in ("/", "/metrics/extra", "/healthz"):
        status, content_type, body = _get(f"{monitor.url}{path}")
        assert (status, content_type) == (404, "application/json")
        assert "try /metrics or /health" in json.loads(body)["error"]


def test_metrics_parse(app: Celery, serve: Any) -> None:
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from tenant_celery.metrics import TASK_STARTED_TOTAL, install_metrics  # noqa: PLC0415

    install_metrics(app, registry=CollectorRegistry())
    app.conf.task_always_eager = True

    @app.task(shared=False)
    def ping() -> str:
        return "pong"

    ping.apply()
    status, content_type, body = _get(f"{serve().url}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    (sample,) = families[TASK_STARTED_TOTAL.removesuffix("_total")].samples
    assert (sample.labels, sample.value) == ({"task_name": ping.name}, 1.0)


def test_scrape_skips_a_file_a_process_has_only_just_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    # A new process creates its file empty before sizing it; a scrape in
    # between must not fail (prometheus-client's own collector does).
    (tmp_path / "counter_4242.db").touch()
    monkeypatch.setattr(metrics_module._multiprocess, "directory", str(tmp_path))
    status, _, body = _get(f"{serve().url}/metrics")
    assert status == 200
    # Nothing counted: only the queue gauges, read from the in-memory broker.
    families = {family.name for family in text_string_to_metric_families(body.decode())}
    assert families == {QUEUE_LENGTH, QUEUE_LENGTH_UP}


def test_health_is_cached_and_probes_share_one_check(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = serve(cache_seconds=60)
    calls = []
    original = monitor_module._Checks._run

    def counting(self: Any) -> dict[str, str]:
        calls.append(threading.get_ident())
        time.sleep(0.2)
        return original(self)

    monkeypatch.setattr(monitor_module._Checks, "_run", counting)
    probes = [threading.Thread(target=monitor.health) for _ in range(5)]
    for probe in probes:
        probe.start()
    for probe in probes:
        probe.join()
    monitor.health()
    assert len(calls) == 1


def test_a_hanging_check_times_out(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(monitor_module._Checks, "_broker", lambda self: release.wait(10))
    monitor = serve(check_timeout=0.2)
    started = time.monotonic()
    status, report = monitor.health()
    release.set()
    assert time.monotonic() - started < 2.0
    assert (status, report["broker"]) == (503, "timed out")


def test_port_in_use_raises_address_in_use(serve: Any, app: Celery) -> None:
    taken = serve()
    second = WorkerMonitor(app, port=taken.address[1])
    with pytest.raises(OSError, match="in use") as info:
        second.start()
    assert info.value.errno == errno.EADDRINUSE


def test_worker_logs_a_port_in_use_and_carries_on(
    app: Celery, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    port = serve().address[1]
    app.conf.tenant_celery_monitor_port = port
    monitor_module._start_for_worker(sender=SimpleNamespace(app=app))
    assert monitor_module._worker.monitor is None
    assert f"worker monitor cannot listen on 127.0.0.1:{port}: address already in use" in (
        caplog.text
    )


# ------------------------------------------------------------------- configuration


def test_port_and_host_from_configuration(app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    assert monitor_module._monitor_port(app) is None
    monkeypatch.setenv("TENANT_CELERY_MONITOR_PORT", "9100")
    assert monitor_module._monitor_port(app) == 9100
    app.conf.tenant_celery_monitor_port = 9200  # the app's configuration beats the environment
    monitor = WorkerMonitor(app)
    assert (monitor.host, monitor.port) == (DEFAULT_MONITOR_HOST, 9200)
    app.conf.tenant_celery_monitor_host = "0.0.0.0"
    assert WorkerMonitor(app, port=1).host == "0.0.0.0"


@pytest.mark.parametrize("bad", ["http", "-1", "65536", True])
def test_bad_port_is_a_configuration_error(app: Celery, bad: object) -> None:
    app.conf.tenant_celery_monitor_port = bad
    with pytest.raises(ConfigurationError, match="tenant_celery_monitor_port must be"):
        monitor_module._monitor_port(app)


def test_no_port_no_monitor(app: Celery) -> None:
    with pytest.raises(ConfigurationError, match="needs a port"):
        WorkerMonitor(app)


def test_database_defaults_to_a_database_result_backend(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert monitor_module._database_url(app) is None
    app.conf.result_backend = "redis://localhost/1"
    assert monitor_module._database_url(app) is None
    app.conf.result_backend = "db+postgresql+psycopg://u@db/results"
    assert monitor_module._database_url(app) == "postgresql+psycopg://u@db/results"
    app.conf.database_url = "postgresql+psycopg://u@db/pooled"
    for pooled in ("database", "tenant_celery.results:PooledDatabaseBackend"):
        app.conf.result_backend = pooled
        assert monitor_module._database_url(app) == "postgresql+psycopg://u@db/pooled"
    monkeypatch.setenv("TENANT_CELERY_DATABASE_URL", "postgresql+psycopg://u@db/app")
    assert monitor_module._database_url(app) == "postgresql+psycopg://u@db/app"


@pytest.mark.parametrize("url", ["not a url with hunter22", "nosuchdialect://u:hunter22@h/db"])
def test_unusable_database_url_is_a_configuration_error(app: Celery, url: str) -> None:
    with pytest.raises(ConfigurationError, match="the database URL cannot be used") as info:
        WorkerMonitor(app, port=0, database_url=url)
    assert "hunter22" not in str(info.value)


# ------------------------------------------------------------------- queue gauges


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_queue_gauges_read_the_queues_the_worker_consumes(app: Celery, serve: Any) -> None:
    queue = f"work-{uuid.uuid4().hex[:8]}"
    app.conf.task_default_queue = queue
    app.amqp.queues.select([queue])  # the worker's -Q (Celery 5.3 counts every queue sent to)
    for _ in range(3):
        app.send_task("some.task")
    app.send_task("some.task", queue=f"elsewhere-{uuid.uuid4().hex[:8]}")
    status, _, body = _get(f"{serve().url}/metrics")
    assert status == 200
    samples = _samples(body)
    assert {key: value for key, value in samples.items() if key[0] == QUEUE_LENGTH} == {
        (QUEUE_LENGTH, (("queue", queue),)): 3.0
    }
    assert samples[(QUEUE_LENGTH_UP, ())] == 1.0


def test_worker_queues_leave_out_event_and_remote_control_queues(app: Celery) -> None:
    app.conf.task_queues = [
        Queue(name)
        for name in ("a", "b", "celeryev.1f2e", "w1@host.celery.pidbox", "1f2e.reply.celery.pidbox")
    ]
    assert _queue_lengths.worker_queues(app) == ["a", "b"]
    app.amqp.queues.select(["b", "celeryev.1f2e"])  # the worker's -Q b,celeryev.1f2e
    assert _queue_lengths.worker_queues(app) == ["b"]


def test_an_unreachable_broker_sets_up_to_0_and_is_logged_once(
    app: Celery, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app.conf.update(broker_url=f"redis://:hunter22@127.0.0.1:{_closed_port()}/0")
    monitor = serve(check_timeout=0.5)
    for _ in range(3):
        started = time.monotonic()
        status, _, body = _get(f"{monitor.url}/metrics")
        assert time.monotonic() - started < 2.0
        samples = _samples(body)
        assert status == 200
        assert samples[(QUEUE_LENGTH_UP, ())] == 0.0
        assert not [key for key in samples if key[0] == QUEUE_LENGTH]
    warnings = [r for r in caplog.records if r.getMessage().startswith("could not read the queue")]
    assert len(warnings) == 1
    assert warnings[0].levelname == "WARNING"
    assert "refused" in warnings[0].getMessage().lower()
    assert "hunter22" not in caplog.text


def _per_tenant(app: Celery) -> bool | None:
    """Whether the queue reader of ``app``'s broker reads per tenant; None: no reader."""
    reader = _queue_lengths.reader(app, 1.0)
    return None if reader is None else reader.per_tenant


def test_the_package_transport_is_read_per_tenant_whichever_way_it_is_named(app: Celery) -> None:
    app.conf.update(broker_url="tcpg+postgresql://u@db/shop")
    assert _per_tenant(app) is True
    app.conf.update(
        broker_url="postgresql://u@db/shop", broker_transport="tenant_celery.transport:Transport"
    )
    assert _per_tenant(app) is True
    app.conf.update(broker_url="sqla+postgresql+psycopg://u@db/shop", broker_transport=None)
    assert _per_tenant(app) is False
    app.conf.update(broker_url="redis://127.0.0.1:6379/0")
    assert _per_tenant(app) is False
    app.conf.update(broker_url="sqla+sqlite:///kombu.db")  # kombu's tables, not PostgreSQL
    assert _per_tenant(app) is None


def test_health_is_503_until_the_worker_consumer_consumes(serve: Any) -> None:
    monitor = serve()
    monitor._consumer = consumer = ConsumerState()
    status, report = monitor.health()
    assert status == 503
    assert report["status"] == "degraded"
    assert report["broker"].startswith("the worker's consumer has not connected to the broker yet")
    consumer.mark(True)
    assert monitor.health() == (200, {"status": "ok", "broker": "ok", "database": "not configured"})
    consumer.mark(False, "is reconnecting to the broker")
    status, report = monitor.health()
    assert status == 503
    assert report["broker"].startswith("the worker's consumer is reconnecting to the broker (")
