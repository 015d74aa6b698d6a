"""The worker monitor of real ``celery worker`` processes on real brokers: the queue
gauges' exact counts, per tenant on the package's transport, an outage reported by
``celery_queue_length_up``, and ``/health`` ready only once the worker consumes again."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from tenant_celery import tenant_context, tenants
from tenant_celery.metrics import (
    OTHER_TENANTS,
    QUEUE_DELAYED_BY_TENANT,
    QUEUE_IN_FLIGHT_BY_TENANT,
    QUEUE_LENGTH,
    QUEUE_LENGTH_BY_TENANT,
    QUEUE_LENGTH_UP,
    TASK_SUCCESS_TOTAL,
    TENANT_PAUSED,
)
from tenant_celery.monitor import CHECK_TIMEOUT, WorkerMonitor
from tests._rig.postgres import Database
from tests._rig.services import Services
from tests._rig.tcp_proxy import TcpProxy
from tests._rig.worker import WorkerFactory, WorkerHandle, transport_url

from . import queue_gauges_app as tasks
from .monitor_client import MONITOR_ENV, Samples, get, monitor_url, scrape

pytestmark = pytest.mark.worker

A, B, C = (str(uuid.uuid4()) for _ in range(3))
WAITING = 5


def _series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def _scrape_until(
    url: str, done: Callable[[Samples], bool], what: str, timeout: float = 20.0
) -> Samples:
    """Scrape until ``done(samples)``; fail with the last scrape after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        _, samples = scrape(url)
        if done(samples):
            return samples
        if time.monotonic() > deadline:
            shown = {
                k: v
                for k, v in samples.items()
                if k[0].startswith(("celery_queue", "celery_tenant"))
            }
            pytest.fail(f"{what} not seen in {timeout}s; last scrape's queue gauges: {shown}")
        time.sleep(0.2)


def _hold(handle: WorkerHandle, tmp_path: Path) -> Path:
    """Occupy the worker's one slot: every message published next waits in its queue.
    Returns the file whose creation lets the held task end."""
    started, release = tmp_path / "started", tmp_path / "release"
    tasks.hold.delay(str(started), str(release))
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline, f"hold never started:\n{handle.log_tail()}"
        time.sleep(0.05)
    return release


def _lengths(handle: WorkerHandle, samples: Samples) -> dict[str, float]:
    series = _series(samples, QUEUE_LENGTH)
    return {dict(labels)["queue"]: value for labels, value in series.items()}


@pytest.mark.parametrize("broker", ["redis", "rabbitmq", "postgres"])
def test_queue_length_counts_the_messages_waiting_in_the_worker_queue(
    start_worker: WorkerFactory, broker: Any, tmp_path: Path
) -> None:
    handle = start_worker(
        tasks.__name__, broker=broker, backend="postgres", pool="threads", concurrency=1,
        extra_env=MONITOR_ENV,
    )  # fmt: skip
    url = monitor_url(handle)
    nobody = f"tc.nobody.{uuid.uuid4().hex[:8]}"
    with handle.bind(tasks.app):
        _, samples = scrape(url)
        assert _lengths(handle, samples) == {handle.queue: 0.0}
        release = _hold(handle, tmp_path)
        results = [tasks.ping.delay() for _ in range(WAITING)]
        tasks.ping.apply_async(queue=nobody)  # a queue the worker does not consume
        tasks.app.control.ping(timeout=0.5)  # a reply queue, and the pidbox's traffic
        samples = _scrape_until(
            url, lambda s: _lengths(handle, s).get(handle.queue) == WAITING, f"{WAITING} waiting"
        )
        # Only the worker's own queue: no pidbox, reply, event or foreign queue.
        assert _lengths(handle, samples) == {handle.queue: WAITING}
        assert samples[(QUEUE_LENGTH_UP, ())] == 1.0
        assert not _series(samples, QUEUE_LENGTH_BY_TENANT)
        time.sleep(1.0)  # still exactly the waiting ones: the held one is not counted
        assert _lengths(handle, scrape(url)[1]) == {handle.queue: WAITING}

        release.touch()
        assert [result.get(timeout=30) for result in results] == ["pong"] * WAITING
        _scrape_until(url, lambda s: _lengths(handle, s) == {handle.queue: 0.0}, "an empty queue")
        _purge(tasks.app, nobody)


def _purge(app: Celery, queue: str) -> None:
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        channel.queue_delete(queue)


def test_queue_length_by_tenant_on_the_transport(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """The package's transport: per tenant, labelled as the task metrics label tenants
    (two admitted, the biggest backlogs first; the third is "other")."""
    handle = start_worker(
        tasks.__name__, broker="tcpg", pool="threads", concurrency=1, extra_env=MONITOR_ENV
    )
    url = monitor_url(handle)
    queue = handle.queue
    with handle.bind(tasks.app):
        release = _hold(handle, tmp_path)
        results = []
        for tenant, count in ((C, 1), (B, 2), (A, 3)):
            with tenant_context(tenant):
                results += [tasks.work.delay() for _ in range(count)]
        results.append(tasks.ping.delay())  # no tenant
        expected = {
            (("queue", queue), ("tenant", A)): 3.0,
            (("queue", queue), ("tenant", B)): 2.0,
            (("queue", queue), ("tenant", OTHER_TENANTS)): 1.0,
            (("queue", queue), ("tenant", "")): 1.0,
        }
        samples = _scrape_until(
            url, lambda s: _series(s, QUEUE_LENGTH_BY_TENANT) == expected, "the tenants' backlog"
        )
        assert _lengths(handle, samples) == {queue: 7.0}
        assert samples[(QUEUE_LENGTH_UP, ())] == 1.0

        release.touch()
        assert sorted(str(r.get(timeout=30)) for r in results) == sorted(
            [A] * 3 + [B] * 2 + [C] + ["pong"]
        )
        # Every series stays, at 0; the task metrics used the same two labels.
        drained = dict.fromkeys(expected, 0.0)
        samples = _scrape_until(
            url,
            lambda s: (
                _series(s, QUEUE_LENGTH_BY_TENANT) == drained
                and s.get(
                    (TASK_SUCCESS_TOTAL, (("task_name", tasks.work.name), ("tenant", "other")))
                )
                == 1.0
            ),
            "the drained queue and C's task counted as other",
        )
        assert _lengths(handle, samples) == {queue: 0.0}
        success = {
            dict(labels)["tenant"]: value
            for labels, value in _series(samples, TASK_SUCCESS_TOTAL).items()
            if dict(labels)["task_name"] == tasks.work.name
        }
        assert success == {"": 0.0, A: 3.0, B: 2.0, OTHER_TENANTS: 1.0}


def test_in_flight_delayed_and_paused_tenants_on_the_transport(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """Claimed messages, those held for their ETA, and paused tenants, per tenant
    label: what ``tenant-celery tenants inspect`` shows, as gauges."""
    handle = start_worker(
        tasks.__name__, broker="tcpg", pool="threads", concurrency=1, extra_env=MONITOR_ENV
    )
    url = monitor_url(handle)
    queue = handle.queue
    with handle.bind(tasks.app):
        with tenant_context(A):  # claimed, and held for their ETA by the worker
            delayed = [tasks.work.apply_async(countdown=600) for _ in range(2)]
        _scrape_until(
            url,
            lambda s: (
                _series(s, QUEUE_DELAYED_BY_TENANT) == {(("queue", queue), ("tenant", A)): 2.0}
            ),
            "two messages held for their ETA",
        )
        release = _hold(handle, tmp_path)  # in flight, no tenant
        with tenant_context(A):
            tasks.work.delay()  # waits behind the held task
        tenants.pause(tasks.app, B)
        with tenant_context(B):
            [tasks.work.delay() for _ in range(2)]

        def seen(samples: Samples) -> dict[str, dict[str, float]]:
            return {
                name: {dict(labels)["tenant"]: v for labels, v in _series(samples, name).items()}
                for name in (
                    QUEUE_IN_FLIGHT_BY_TENANT, QUEUE_DELAYED_BY_TENANT, TENANT_PAUSED,
                    QUEUE_LENGTH_BY_TENANT,
                )
            }  # fmt: skip

        expected = {
            QUEUE_IN_FLIGHT_BY_TENANT: {"": 1.0},
            QUEUE_DELAYED_BY_TENANT: {A: 2.0},
            TENANT_PAUSED: {B: 1.0},
            QUEUE_LENGTH_BY_TENANT: {A: 1.0, B: 2.0},
        }
        samples = _scrape_until(url, lambda s: seen(s) == expected, "in flight, delayed, paused")
        assert {dict(labels)["queue"] for labels in _series(samples, TENANT_PAUSED)} == {queue}
        assert tenants.resume(tasks.app, B) == []
        release.touch()
        tasks.app.control.revoke([result.id for result in delayed])
        _scrape_until(
            url,
            lambda s: (
                seen(s)[TENANT_PAUSED] == {B: 0.0} and seen(s)[QUEUE_LENGTH_BY_TENANT].get(B) == 0.0
            ),
            "B resumed and drained",
        )


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_proxy(request: pytest.FixtureRequest, services: Services) -> Iterator[tuple[str, Any]]:
    """(broker kind, TcpProxy in front of that shared broker), listening."""
    kind: str = request.param
    target = ("127.0.0.1", 6379) if kind == "redis" else ("127.0.0.1", 5672)
    services.redis() if kind == "redis" else services.amqp()
    with TcpProxy(target) as proxy:
        proxy.start()
        yield kind, proxy


def _start_behind(start_worker: WorkerFactory, kind: Any, proxy: TcpProxy) -> WorkerHandle:
    """A worker whose broker connections all go through ``proxy``; the test process
    publishes to the broker directly."""
    through = (
        f"redis://127.0.0.1:{proxy.port}/0"
        if kind == "redis"
        else f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
    )
    return start_worker(
        tasks.__name__, broker=kind, backend="postgres", pool="threads", concurrency=1,
        extra_env={**MONITOR_ENV, "TC_TEST_BROKER_URL": through},
    )  # fmt: skip


def test_queue_length_up_is_0_while_the_broker_is_away(
    start_worker: WorkerFactory, broker_proxy: tuple[Any, TcpProxy]
) -> None:
    kind, proxy = broker_proxy
    handle = _start_behind(start_worker, kind, proxy)
    url = monitor_url(handle)
    _, samples = scrape(url)
    assert samples[(QUEUE_LENGTH_UP, ())] == 1.0
    assert _lengths(handle, samples) == {handle.queue: 0.0}

    proxy.stop()
    for _ in range(2):  # the gauge says 0 at every scrape of the outage
        started = time.monotonic()
        text, samples = scrape(url)
        elapsed = time.monotonic() - started
        assert samples[(QUEUE_LENGTH_UP, ())] == 0.0
        assert not _series(samples, QUEUE_LENGTH)
        assert f"# TYPE {QUEUE_LENGTH} gauge" in text
        assert elapsed < CHECK_TIMEOUT + 1.5, f"a scrape took {elapsed:.1f}s"
    log = handle.log_text()
    assert log.count("could not read the queue lengths") == 1, log  # once, not per scrape

    proxy.start()
    samples = _scrape_until(url, lambda s: s[(QUEUE_LENGTH_UP, ())] == 1.0, "up again")
    assert _lengths(handle, samples) == {handle.queue: 0.0}
    handle.wait_for_log("the queue lengths can be read again")


#: Seconds the broker stays away.  Celery retries a lost connection after 2, 4,
#: 6... seconds: the attempt after 2 + 4 fails too, and the next is about 5
#: seconds after the broker is back.
OUTAGE = 7.0
#: A task sent when ``/health`` turns 200 must have run within this many seconds
#: (measured about 0.6 s, most of it the result backend's polling).
PROMPT = 2.0


def test_health_is_ready_only_once_the_worker_consumes_again(
    start_worker: WorkerFactory, broker_proxy: tuple[Any, TcpProxy]
) -> None:
    kind, proxy = broker_proxy
    handle = _start_behind(start_worker, kind, proxy)
    url = monitor_url(handle)
    assert get(f"{url}/health").status == 200

    proxy.stop()
    cut = time.monotonic()
    # The consumer sees its connection close at once; from then on, 503 throughout.
    while get(f"{url}/health").status != 503:
        assert time.monotonic() - cut < 2, "still 200 two seconds after the broker went away"
        time.sleep(0.05)
    while time.monotonic() - cut < OUTAGE:
        response = get(f"{url}/health")
        assert response.status == 503, (time.monotonic() - cut, response.json())
        time.sleep(0.25)

    proxy.start()
    back = time.monotonic()
    consumer_only = []  # answers where a new connection works and the consumer does not
    while True:
        response = get(f"{url}/health")
        if response.status == 200:
            break
        body = response.json()
        assert response.status == 503, body
        assert body["status"] == "degraded", body
        if body["broker"].startswith("the worker's consumer is reconnecting"):
            consumer_only.append(body["broker"])
        assert time.monotonic() - back < 30, f"still 503 after 30s: {body}"
        time.sleep(0.1)
    ready = time.monotonic() - back
    assert response.json() == {"status": "ok", "broker": "ok", "database": "ok"}
    with handle.bind(tasks.app):
        sent = time.monotonic()
        assert tasks.ping.delay().get(timeout=30) == "pong"
        latency = time.monotonic() - sent
    assert latency < PROMPT, (
        f"ready {ready:.1f}s after the broker came back, task took {latency:.1f}s"
    )
    assert consumer_only, "the broker answered; the consumer was never seen reconnecting"


# ------------------------------------------------------------------ without a worker


def test_transport_reading_counts_ready_messages_and_keeps_drained_series(
    database: Database,
) -> None:
    """Claimed, expired and foreign-queue messages are not counted; a tenant header
    that is not a valid id reads ""; a tenant's series stays at 0 once drained."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from tenant_celery.metrics import install_metrics  # noqa: PLC0415

    url = transport_url(database, "superuser")
    app = Celery("queue_gauges_unit", broker=url, set_as_current=False)
    app.conf.update(task_default_queue="work", broker_transport_options={"schema": "tcpg"})
    install_metrics(app, registry=CollectorRegistry(), tenant_label=True, max_tenant_labels=5)
    admin = database.admin_engine()
    insert = sa.text(
        "INSERT INTO tcpg.tenant_celery_message (queue, tenant, visible_at, expires_at, payload)"
        " VALUES (:queue, :tenant, now() + :later * interval '1 second',"
        " now() + :expires * interval '1 second', '{}')"
    )
    with admin.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO tcpg.tenant_celery_queue (name) VALUES ('work'), ('other-queue')"
                " ON CONFLICT DO NOTHING"
            )
        )
        rows = [
            {"queue": "work", "tenant": A, "later": 0, "expires": 60},
            {"queue": "work", "tenant": A, "later": 0, "expires": 60},
            {"queue": "work", "tenant": A, "later": 30, "expires": 60},  # claimed
            {"queue": "work", "tenant": A, "later": 0, "expires": -1},  # expired
            {"queue": "work", "tenant": "not-a-uuid", "later": 0, "expires": 60},
            {"queue": "other-queue", "tenant": B, "later": 0, "expires": 60},
        ]
        conn.execute(insert, rows)
    monitor = WorkerMonitor(app, port=0)
    monitor.start()
    try:
        _, samples = scrape(monitor.url)
        assert _series(samples, QUEUE_LENGTH) == {(("queue", "work"),): 3.0}
        assert _series(samples, QUEUE_LENGTH_BY_TENANT) == {
            (("queue", "work"), ("tenant", A)): 2.0,
            (("queue", "work"), ("tenant", "")): 1.0,
        }
        with admin.begin() as conn:
            conn.execute(sa.text("DELETE FROM tcpg.tenant_celery_message WHERE queue = 'work'"))
        _, samples = scrape(monitor.url)
        assert _series(samples, QUEUE_LENGTH_BY_TENANT) == {
            (("queue", "work"), ("tenant", A)): 0.0,
            (("queue", "work"), ("tenant", "")): 0.0,
        }
    finally:
        monitor.stop()
