"""The transport's claim counters (:func:`tenant_celery.transport.claim_stats`), for real.

Claims run against a migrated database through kombu; each test compares the
counters' growth with what the claims it made returned, counted by wrapping the
real claim (which still runs): a counter that misses a claim, counts a message
twice or files a claim's time in the wrong bucket fails.  The last test reads
them from a real worker's monitor.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tenant_celery import tenant_context, transport
from tenant_celery.metrics import (
    BROKER_CLAIM_DURATION_SECONDS,
    BROKER_CLAIMED_MESSAGES_TOTAL,
    BROKER_CLAIMS_TOTAL,
    BROKER_EMPTY_CLAIMS_TOTAL,
)
from tests._rig.postgres import Database
from tests._rig.worker import WorkerFactory, transport_url

from . import queue_gauges_app as tasks
from .monitor_client import MONITOR_ENV, monitor_url, scrape

pytestmark = pytest.mark.worker


@pytest.fixture
def app_broker(database: Database) -> str:
    return transport_url(database, "app")


def new_queue() -> Queue:
    name = f"tc.stats.{uuid.uuid4().hex[:8]}"
    return Queue(name, Exchange(name, "direct"), name)


def publish(conn: Connection, queue: Queue, tenants: list[str]) -> None:
    producer = Producer(conn.default_channel)
    for n, tenant in enumerate(tenants):
        producer.publish(
            {"n": n},
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            headers={"tenant_id": tenant},
        )


class Claims:
    """Every claim the transport runs from now on: how many messages each took and
    how long the whole call took (the counted time is inside it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.taken: list[int] = []
        self.seconds: list[float] = []
        real = transport.Channel._claim

        def claim(channel: transport.Channel, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            found = real(channel, *args, **kwargs)
            self.seconds.append(time.perf_counter() - started)
            self.taken.append(len(found))
            return found

        monkeypatch.setattr(transport.Channel, "_claim", claim)


def grown(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    found = {key: after[key] - before[key] for key in after if key != "claim_seconds_buckets"}
    found["buckets"] = {
        bound: after["claim_seconds_buckets"][bound] - before["claim_seconds_buckets"][bound]
        for bound in transport.CLAIM_SECONDS_BUCKETS
    }
    return found


def test_the_counters_count_every_claim_its_messages_and_its_time(
    app_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = new_queue()
    with Connection(app_broker) as publisher:
        publish(publisher, queue, ["a"] * 5 + ["b"] * 4)
    claims = Claims(monkeypatch)
    before = transport.claim_stats()
    got: list[Any] = []
    with Connection(app_broker, transport_options={"polling_interval": 0.1}) as conn:
        channel = conn.channel()
        channel.basic_qos(0, 4, False)
        consumer = Consumer(channel, [queue], callbacks=[lambda body, message: got.append(message)])
        consumer.consume()
        deadline = time.monotonic() + 30
        while len(got) < 9:
            assert time.monotonic() < deadline, f"{len(got)} of 9 delivered"
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1)
            for message in got:
                if not message.acknowledged:
                    message.ack()
        # The queue is empty now: the polls that follow find nothing.
        for _ in range(3):
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.15)
        after = transport.claim_stats()
    found = grown(before, after)

    assert sum(claims.taken) == 9
    assert found["claims"] == len(claims.taken)
    assert found["claimed_messages"] == 9
    assert found["empty_claims"] == claims.taken.count(0) >= 1
    assert sum(found["buckets"].values()) == found["claims"]
    # Each claim's time is inside the call that made it, and not nothing.
    assert 0 < found["claim_seconds"] <= sum(claims.seconds)

    # Bucketed where its time falls: no claim's bucket is below the fastest call's
    # time's bucket, none above the slowest call's.
    def bucket(seconds: float) -> int:
        return next(i for i, b in enumerate(transport.CLAIM_SECONDS_BUCKETS) if seconds <= b)

    used = [i for i, b in enumerate(transport.CLAIM_SECONDS_BUCKETS) if found["buckets"][b]]
    assert max(used) <= bucket(max(claims.seconds))
    assert found["claim_seconds"] / found["claims"] <= transport.CLAIM_SECONDS_BUCKETS[max(used)]


def test_a_claim_that_finds_the_others_locked_or_leased_counts_as_empty(
    app_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two consumers on one queue of two messages: the first takes both, the second's
    claim finds none ready and is counted empty, its message count unchanged."""
    queue = new_queue()
    with Connection(app_broker) as publisher:
        publish(publisher, queue, ["a", "b"])
    claims = Claims(monkeypatch)
    with (
        Connection(app_broker, transport_options={"visibility_timeout": 600}) as first,
        Connection(app_broker) as second,
    ):
        one: Any = first.default_channel
        assert len(one._claim(queue.name, 5, take=False)) == 2
        before = transport.claim_stats()
        two: Any = second.default_channel
        assert two._claim(queue.name, 5, take=False) == []
        after = transport.claim_stats()
    found = grown(before, after)
    assert claims.taken == [2, 0]
    assert (found["claims"], found["empty_claims"], found["claimed_messages"]) == (1, 1, 0)


def test_a_claim_that_fails_is_not_counted(
    database: Database, app_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = new_queue()
    with Connection(app_broker) as conn:
        channel: Any = conn.default_channel
        channel._claim(queue.name, 1, take=False)  # connected, statement prepared
        before = transport.claim_stats()
        # A statement the server refuses: the claim raises, nothing is counted.
        for controlled in (False, True):
            monkeypatch.setitem(channel._statements, (False, controlled), "SELECT * FROM nothing")
        with pytest.raises(Exception):  # noqa: B017, PT011 (ConfigurationError here)
            channel._claim(queue.name, 1, take=False)
        assert transport.claim_stats() == before


def test_the_worker_monitor_serves_the_claim_counters(start_worker: WorkerFactory) -> None:
    handle = start_worker(
        tasks.__name__, broker="tcpg", pool="threads", concurrency=1, extra_env=MONITOR_ENV
    )
    url = monitor_url(handle)
    with handle.bind(tasks.app):
        _, before = scrape(url)
        tenant = str(uuid.uuid4())
        with tenant_context(tenant):
            results = [tasks.work.delay() for _ in range(6)]
        assert [r.get(timeout=30) for r in results] == [tenant] * 6
        time.sleep(0.3)
        _, after = scrape(url)

    def grew(name: str) -> float:
        return after[(name, ())] - before.get((name, ()), 0.0)

    claimed = grew(BROKER_CLAIMED_MESSAGES_TOTAL)
    claims = grew(BROKER_CLAIMS_TOTAL)
    # Its own six, and at most the remote-control messages of its mailbox besides.
    assert claimed >= 6
    assert claims >= 6  # prefetch 1 (the app's setting): one message per claim
    assert 0 <= grew(BROKER_EMPTY_CLAIMS_TOTAL) <= claims
    count = after[(f"{BROKER_CLAIM_DURATION_SECONDS}_count", ())]
    assert count == after[(BROKER_CLAIMS_TOTAL, ())]
    assert after[(f"{BROKER_CLAIM_DURATION_SECONDS}_bucket", (("le", "+Inf"),))] == count
    assert after[(f"{BROKER_CLAIM_DURATION_SECONDS}_sum", ())] > 0
