"""Fixtures of the fault scenarios (:mod:`reliability.faults`) that several modules share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from reliability import faults

from tests._rig import env
from tests._rig.postgres import APP_ROLE, Database, render
from tests._rig.redis_server import RedisServer, RedisServerUnavailable, private_redis
from tests._rig.worker import Broker, Pool, WorkerFactory, WorkerHandle

from . import faults_app


@pytest.fixture
def setup(database: Database) -> faults.Setup:
    """The test's database, with ``fault_runs`` created and granted to ``app_user``."""
    prepared = faults.Setup(admin_url=database.url, app_url=database.app_url, app_role=APP_ROLE)
    faults.prepare(prepared)
    return prepared


@pytest.fixture
def pg_backend(database: Database) -> str:
    """Celery's database result backend on the test's database."""
    return "db+" + render(database.url)


def _broker_kind(url: str) -> Broker:
    if url.startswith("tcpg+"):
        return "tcpg"
    return "rabbitmq" if url.startswith("amqp") else "redis"


@pytest.fixture
def launch(start_worker: WorkerFactory) -> faults.Launch:
    """Start ``faults_app`` workers for a scenario through the rig (stopped after the
    test); the spec's broker URL names the broker, its variables override the rig's."""

    def start(spec: faults.WorkerSpec) -> WorkerHandle:
        return start_worker(
            faults_app.__name__,
            broker=_broker_kind(spec.broker_url),
            backend="redis" if spec.backend_url.startswith("redis") else "postgres",
            pool=cast(Pool, spec.pool),
            concurrency=spec.concurrency,
            extra_env=spec.environment(),
            extra_args=spec.arguments(),
        )

    return start


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private ``redis-server`` with an fsynced append-only file, killed afterwards."""
    try:
        with private_redis(appendonly=True) as server:
            yield server
    except RedisServerUnavailable as exc:
        env.unavailable("redis-server", str(exc))
