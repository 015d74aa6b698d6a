"""The worker monitor of real ``celery worker`` processes: one server, health, errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests._rig import env
from tests._rig.worker import WorkerFactory, WorkerHandle

from . import observability_app as tasks
from .monitor_client import MONITOR_ENV, get, listening_pids, monitor_url, scrape

pytestmark = pytest.mark.worker


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _children(pid: int) -> set[int]:
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    children.add(int(entry.name))
    return children


def _wait_health(url: str, status: int, timeout: float = 10.0) -> dict[str, Any]:
    """Poll ``/health`` (its result is cached for a moment) until it answers ``status``."""
    deadline = time.monotonic() + timeout
    while True:
        response = get(f"{url}/health")
        if response.status == status or time.monotonic() > deadline:
            assert response.status == status, response.body
            assert response.content_type == "application/json"
            body: dict[str, Any] = response.json()
            return body
        time.sleep(0.25)


def test_one_server_in_the_main_process_with_health_and_404(start_worker: WorkerFactory) -> None:
    handle = start_worker(
        tasks.__name__,
        broker="redis",
        backend="postgres",
        pool="prefork",
        concurrency=2,
        extra_env=MONITOR_ENV,
        extra_args=["--max-tasks-per-child=1"],
    )
    url = monitor_url(handle)
    with handle.bind(tasks.app):
        for _ in range(4):  # every child runs one task and is replaced
            assert tasks.ping.delay().get(timeout=30) == "pong"
    port = int(url.rsplit(":", 1)[1])
    # Only the main process holds the listening socket: children forked from it
    # (the first ones and their replacements) closed their inherited copy.  A
    # child that has just been forked holds it until its initialisation, and
    # the pool is briefly short of a child while one is replaced: poll.
    deadline = time.monotonic() + 10
    while True:
        children, holders = _children(handle.pid), listening_pids(port)
        settled = len(children) == 2 and holders == {handle.pid}
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(children) == 2, children
    assert holders == {handle.pid}, f"main {handle.pid}, children {children}"
    assert handle.log_text().count("worker monitor listening on") == 1

    response = get(f"{url}/health")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert response.json() == {"status": "ok", "broker": "ok", "database": "ok"}

    missing = get(f"{url}/no/such/path")
    assert missing.status == 404
    assert get(f"{url}/").status == 404

    text, _ = scrape(url)
    assert "celery_task_success_total" in text


def test_health_names_the_database_at_a_closed_port(start_worker: WorkerFactory) -> None:
    closed = _free_port()
    handle = start_worker(
        tasks.__name__,
        broker="redis",
        pool="threads",
        extra_env={
            **MONITOR_ENV,
            "TENANT_CELERY_DATABASE_URL": (
                f"postgresql+psycopg://monitor:s3cret-pw@127.0.0.1:{closed}/nothing"
            ),
        },
    )
    url = monitor_url(handle)
    started = time.monotonic()
    response = get(f"{url}/health")
    elapsed = time.monotonic() - started
    assert response.status == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["broker"] == "ok"
    assert body["database"] != "ok"
    assert "OperationalError" in body["database"]
    assert str(closed) in body["database"]
    assert "s3cret-pw" not in response.body.decode()
    assert elapsed < 4.0, f"/health took {elapsed:.1f}s"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A Redis server of the test's own, on a free port: (url, restart function)."""
    server = shutil.which("redis-server")
    if server is None:
        env.unavailable("redis-server", "not on PATH; the broker-down test starts its own")
    port = _free_port()
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(tmp_path)]
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        processes.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    def stop() -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(10)

    start()
    try:
        yield f"redis://127.0.0.1:{port}/0", (start, stop)
    finally:
        stop()


def test_health_names_the_stopped_broker(
    start_worker: WorkerFactory, private_redis: tuple[str, Any]
) -> None:
    broker_url, (start_redis, stop_redis) = private_redis
    handle: WorkerHandle = start_worker(
        tasks.__name__,
        broker="redis",
        backend="postgres",
        pool="threads",
        extra_env={**MONITOR_ENV, "TC_TEST_BROKER_URL": broker_url},
    )
    url = monitor_url(handle)
    assert _wait_health(url, 200) == {"status": "ok", "broker": "ok", "database": "ok"}

    stop_redis()
    # The worker's consumer notices at once; the broker check's cached success
    # lasts up to HEALTH_CACHE_SECONDS more.
    deadline = time.monotonic() + 10
    while "refused" not in (body := _wait_health(url, 503))["broker"].lower():
        assert time.monotonic() < deadline, body
        time.sleep(0.25)
    assert body["status"] == "degraded"
    assert body["database"] == "ok"
    assert body["broker"] != "ok"
    assert "refused" in body["broker"].lower()

    start_redis()  # the worker reconnects, and can stop quickly
    assert _wait_health(url, 200, timeout=15)["broker"] == "ok"


def test_port_in_use_is_logged_and_the_worker_runs_on(start_worker: WorkerFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        handle = start_worker(
            tasks.__name__,
            broker="redis",
            pool="threads",
            extra_env={"TENANT_CELERY_MONITOR_PORT": str(port)},
        )
        handle.wait_for_log(
            rf"worker monitor cannot listen on 127\.0\.0\.1:{port}: address already in use"
        )
        with handle.bind(tasks.app):
            assert tasks.ping.delay().get(timeout=30) == "pong"
        assert "worker monitor listening" not in handle.log_text()
        assert handle.alive
    assert os.getpid() not in listening_pids(port)
