"""Faults injected into real workers, and survived: the scenarios of :mod:`reliability.faults`.

Each test runs one scenario -- the same code the reliability suite runs --
through the rig's worker factory, then checks its verdict and the evidence
behind it.  Tasks record every run in an RLS-protected table as ``app_user``
(:mod:`tests.integration.faults_app`); the scenarios read it back as the
superuser.  Redis is killed and restarted only as a private ``redis-server``
of the test's own, never the shared one; the database "goes away" behind a
TCP proxy the test owns.
"""

from __future__ import annotations

import inspect

import pytest
from kombu.transport import redis as redis_transport
from reliability import faults

from tenant_celery import _compat
from tests._rig.redis_server import RedisServer

pytestmark = pytest.mark.worker


def explain(result: faults.FaultResult) -> str:
    return f"{result.problems}; details: {result.details}"


def redis_sweep_seconds() -> float:
    """Longest wait between two sweeps of a worker's Redis transport for messages
    whose visibility timeout has passed.

    Where kombu has ``unacked_restore_interval`` the fault app's options make it
    one second.  Before (kombu 5.3), the worker tries every 10 s, a fixed period,
    and :meth:`QoS.restore_visible` scans only on every ``interval``-th try.
    """
    if hasattr(redis_transport.Channel, "unacked_restore_interval"):
        return 1.0
    tries = inspect.signature(redis_transport.QoS.restore_visible).parameters["interval"]
    return 10.0 * float(tries.default)


def test_a_killed_connection_is_retried_in_its_tenant_and_the_pool_recovers(
    setup: faults.Setup, launch: faults.Launch, redis_url: str
) -> None:
    result = faults.connection_killed(
        setup, launch, broker_url=redis_url, backend_url=redis_url, kills=2, later=4
    )
    assert result.ok, explain(result)
    assert result.injected == result.survived == 2
    details = result.details
    assert len(details["killed"]) == 2
    for killed in details["killed"]:
        assert killed["attempt"] == 1, killed
        assert killed["retried_on_backend"] not in (None, killed["killed_backend"]), killed
        assert killed["tenant_read_in_retry"] is True, killed
    assert details["later_completed"] == details["later_tasks"] == 4
    assert len(details["worker_processes"]) == 1
    assert result.cross_tenant == result.unaccounted == 0


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_b_a_sigkilled_worker_s_tasks_are_redelivered_and_complete_in_their_tenant(
    broker: str,
    setup: faults.Setup,
    launch: faults.Launch,
    pg_backend: str,
    request: pytest.FixtureRequest,
) -> None:
    timeout = 90.0
    if broker == "redis":
        # A private Redis: the short visibility timeout sweeps a whole Redis
        # database's unacknowledged messages, so never the shared one's.
        broker_url = request.getfixturevalue("own_redis").url
        timeout += redis_sweep_seconds()
    else:
        broker_url = request.getfixturevalue("amqp_url")
    result = faults.worker_killed(
        setup, launch, broker_url=broker_url, backend_url=pg_backend, timeout=timeout
    )
    assert result.ok, explain(result)
    details = result.details
    assert len(details["in_flight_at_kill"]) == 2, details
    assert set(details["redelivered"]) >= set(details["in_flight_at_kill"])
    assert result.executions > result.published  # the in-flight tasks ran twice
    assert result.cross_tenant == result.unaccounted == 0


def test_c_a_restarted_redis_loses_no_late_acknowledged_message(
    setup: faults.Setup, launch: faults.Launch, pg_backend: str, own_redis: RedisServer
) -> None:
    result = faults.redis_restarted(setup, launch, own_redis, backend_url=pg_backend)
    assert result.ok, explain(result)
    details = result.details
    assert details["reconnected_by_itself"] is True, details["worker_exited"]
    assert own_redis.starts == 2
    assert details["pending_at_kill"] > 0
    stored = details["in_redis_after_restart"]
    assert stored["queued"] + stored["unacked"] > 0, "nothing survived in Redis to prove"
    assert details["reconnect_seconds"] is not None
    assert result.published == 40
    assert result.cross_tenant == result.unaccounted == 0


def test_c_a_worker_waiting_with_late_acknowledged_tasks_reconnects_by_itself(
    setup: faults.Setup, launch: faults.Launch, pg_backend: str, own_redis: RedisServer
) -> None:
    # Redis dies while the worker runs a late-acknowledged task and waits on an
    # empty queue for more (a BRPOP in flight): Celery 5.7 workers used to exit
    # here every time (tenant_celery._worker_fixes).  The task, still running
    # across the outage, must then be acknowledged on the old connection once
    # Redis is back: it runs once, and from Celery 5.7 nothing stays
    # unacknowledged in Redis.
    result = faults.redis_restarted(
        setup, launch, own_redis, backend_url=pg_backend, moment="waiting", tasks=1, hold=4.0,
        after=4, visibility_timeout=30.0,
    )  # fmt: skip
    assert result.ok, explain(result)
    details = result.details
    assert details["reconnected_by_itself"] is True, details["worker_exited"]
    assert details["pending_at_kill"] == 1
    assert details["in_redis_after_restart"] == {"queued": 0, "unacked": 1}
    assert result.published == 5
    assert result.executions == 5, details
    # Before Celery 5.7 the worker only collects the lost connection (no close guard
    # is needed, or installed): the task running across the outage cannot be
    # acknowledged, as Celery's own warning at the loss says, and its message stays
    # in Redis's unacked hash until the visibility timeout brings it back.
    lost_ack = not _compat.CELERY_CLOSES_COLLECTED_CONNECTION
    assert details["in_redis_at_end"] == {"queued": 0, "unacked": 1 if lost_ack else 0}
    assert result.cross_tenant == result.unaccounted == result.duplicates == 0


def test_d_unreachable_database_at_start_is_503_then_200_and_the_worker_stays_up(
    setup: faults.Setup, launch: faults.Launch, redis_url: str
) -> None:
    result = faults.database_unreachable(setup, launch, broker_url=redis_url, backend_url=redis_url)
    assert result.ok, explain(result)
    away = result.details["health_while_away"]
    assert away["status"] == 503
    assert away["body"]["status"] == "degraded"
    assert away["body"]["broker"] == "ok"
    assert "refused" in away["body"]["database"].lower()
    assert result.details["health_after"] == {
        "status": 200,
        "body": {"status": "ok", "broker": "ok", "database": "ok"},
    }
    assert result.details["task_retries_while_away"] >= 1
    assert result.cross_tenant == result.unaccounted == 0
