"""The worker-side guards of :mod:`tenant_celery._worker_fixes`, against a real Redis.

A private ``redis-server`` (append-only, fsync always) is killed at the one
moment each guard is for, and a real worker over it must lose nothing.
"""

from __future__ import annotations

import os
import signal
import time
from typing import cast

import pytest
import redis
import sqlalchemy as sa
from reliability import faults

from tenant_celery import tenant_context
from tests._rig.postgres import render
from tests._rig.redis_server import RedisServer
from tests._rig.worker import WorkerHandle

from . import faults_app

pytestmark = pytest.mark.worker


def test_a_message_redis_dropped_between_brpop_and_its_unacked_record_is_given_back(
    setup: faults.Setup, launch: faults.Launch, pg_backend: str, own_redis: RedisServer
) -> None:
    """Redis serves the worker's ``BRPOP`` and dies before the worker records the
    message as unacknowledged: kombu alone loses it; the guard puts it back."""
    queue = faults.new_queue("brpop")
    spec = faults.WorkerSpec(
        own_redis.url,
        pg_backend,
        queue,
        render(setup.app_url),
        environ={faults_app.VISIBILITY_TIMEOUT_ENV: "6"},
    )
    worker = cast(WorkerHandle, launch(spec))
    time.sleep(0.5)  # the consumer's BRPOP is pending
    tenant = faults.new_tenants(1)[0]
    with faults.publisher(own_redis.url, queue) as app:
        os.kill(worker.pid, signal.SIGSTOP)  # it cannot read the reply Redis sends
        try:
            with tenant_context(tenant):
                task_id = app.send_task(faults_app.RECORD).id
            client = redis.Redis.from_url(own_redis.url)
            deadline = time.monotonic() + 10
            while client.llen(queue) and time.monotonic() < deadline:
                time.sleep(0.05)  # BRPOP served: the message is in the worker's socket
            served = client.llen(queue) == 0 and client.hlen("unacked") == 0
            client.close()
            own_redis.kill(signal.SIGKILL)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        assert served, "Redis did not hand the message to the stopped worker"
        time.sleep(1.0)
        own_redis.start()
        admin = sa.create_engine(setup.admin_url, poolclass=sa.NullPool)
        try:
            runs = faults.wait_done(admin, {task_id: tenant}, 60.0)
        finally:
            admin.dispose()
    assert faults.done_ids(runs) == {task_id}, worker.log_tail()
    assert worker.alive
    assert "gave back a message whose unacked record Redis lost" in worker.log_text()
