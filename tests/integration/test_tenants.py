"""Operating one tenant's work (:mod:`tenant_celery.tenants`) on the package's transport.

The kombu-level tests claim as a worker does, against a migrated database, as
``app_user``; the operator's calls connect as the same role.  The real-worker
tests run ``celery worker`` processes that consume while the operator pauses,
purges or rate-limits one tenant; what ran is read from ``fault_runs`` and the
message table as the superuser.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import psycopg
import pytest
import sqlalchemy as sa
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.message import Message
from reliability import faults

from tenant_celery import tenants
from tenant_celery.errors import ConfigurationError, InvalidTenantId
from tests._rig.postgres import Database, libpq_kwargs, render
from tests._rig.worker import TRANSPORT_SCHEMA, WorkerHandle, transport_url

from . import faults_app

pytestmark = pytest.mark.worker

MESSAGE = f"{TRANSPORT_SCHEMA}.tenant_celery_message"
TIMEOUT = 120.0


@pytest.fixture
def url(database: Database) -> str:
    return transport_url(database, "app")


@pytest.fixture
def admin(setup: faults.Setup) -> Iterator[sa.Engine]:
    engine = sa.create_engine(setup.admin_url, poolclass=sa.NullPool)
    yield engine
    engine.dispose()


def new_queue() -> Queue:
    name = f"tc.tenants.{uuid.uuid4().hex[:8]}"
    return Queue(name, Exchange(name, "direct"), name)


def publish(conn: Connection, queue: Queue, tenant: str, count: int, **headers: Any) -> None:
    producer = Producer(conn.default_channel)
    for index in range(count):
        producer.publish(
            {"tenant": tenant, "n": index},
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            headers={"tenant_id": tenant, "id": str(uuid.uuid4()), **headers},
        )


def claim(conn: Connection, queue: Queue, prefetch: int, rounds: int = 1) -> list[Message]:
    """What one consumer with ``prefetch`` takes in ``rounds`` claims, acknowledged."""
    got: list[Message] = []
    channel = conn.channel()
    channel.basic_qos(0, prefetch, False)
    consumer = Consumer(channel, [queue], callbacks=[lambda body, message: got.append(message)])
    consumer.consume()
    for _ in range(rounds):
        before = len(got)
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=1.0)
        for message in got[before:]:
            message.ack()
    consumer.cancel()
    channel.close()
    return got


def hold(conn: Connection, queue: Queue) -> list[Message]:
    """What one consumer (prefetch 10) claims and holds unacknowledged, as a worker
    holds messages for their ETA or while running them."""
    held: list[Message] = []
    channel = conn.channel()
    channel.basic_qos(0, 10, False)
    Consumer(channel, [queue], callbacks=[lambda body, message: held.append(message)]).consume()
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=1.0)
    return held


def rows_of(database: Database, tenant: str) -> int:
    with psycopg.connect(**libpq_kwargs(database.url)) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {MESSAGE} WHERE tenant = %s", (tenant,)
        ).fetchone()
    assert row is not None
    return int(row[0])


# ---------------------------------------------------------------- pause and resume


def test_a_paused_tenant_is_not_claimed_and_resume_gives_back_its_messages_in_order(
    url: str,
) -> None:
    queue = new_queue()
    paused, other = str(uuid.uuid4()), str(uuid.uuid4())
    with Connection(url) as conn:
        publish(conn, queue, paused, 5)
        publish(conn, queue, other, 5)
        tenants.pause(url, paused, queue=queue.name)
        got = claim(conn, queue, prefetch=20, rounds=3)
        assert [m.payload["tenant"] for m in got] == [other] * 5
        [entry] = tenants.inspect(url, tenant=paused)
        assert (entry.queue, entry.ready, entry.in_flight, entry.paused) == (
            queue.name,
            5,
            0,
            True,
        )
        assert tenants.resume(url, paused, queue=queue.name) == []
        got = claim(conn, queue, prefetch=20)
        assert [m.payload["n"] for m in got] == [0, 1, 2, 3, 4]
        assert tenants.inspect(url, tenant=paused) == []


def test_a_paused_tenant_at_the_cursor_holds_back_no_other_tenant(url: str) -> None:
    """Claims of one message each walk the tenants in turn: a paused tenant is passed
    over, not counted as the one tenant the claim looks for."""
    queue = new_queue()
    names = sorted(str(uuid.uuid4()) for _ in range(4))
    with Connection(url) as conn:
        for name in names:
            publish(conn, queue, name, 3)
        tenants.pause(url, names[1])  # every queue
        got = claim(conn, queue, prefetch=1, rounds=12)
    taken = [m.payload["tenant"] for m in got]
    assert len(taken) == 9
    assert names[1] not in taken
    assert sorted(set(taken)) == [names[0], names[2], names[3]]


def test_a_pause_everywhere_outlasts_the_resume_of_one_queue(url: str) -> None:
    queue = new_queue()
    tenant = str(uuid.uuid4())
    with Connection(url) as conn:
        publish(conn, queue, tenant, 2)
        tenants.pause(url, tenant)
        tenants.pause(url, tenant, queue=queue.name)
        assert tenants.resume(url, tenant, queue=queue.name) == ["*"]
        assert claim(conn, queue, prefetch=5) == []
        listed = tenants.inspect(url, tenant=tenant)
        assert [(e.queue, e.ready, e.paused) for e in listed] == [
            ("*", 0, True),
            (queue.name, 2, True),
        ]
        assert tenants.resume(url, tenant) == []
        assert len(claim(conn, queue, prefetch=5)) == 2


def test_a_tenant_paused_before_it_has_messages_is_listed(url: str) -> None:
    tenant = str(uuid.uuid4())
    tenants.pause(url, tenant)
    assert tenants.inspect(url, tenant=tenant) == [
        tenants.TenantQueue(queue="*", tenant=tenant, paused=True)
    ]


# -------------------------------------------------------------------- rate limit


def test_a_rate_limit_spends_one_token_per_claimed_message(url: str) -> None:
    """A bucket of 3 that refills at 0.5 a second: 3 at once, then about one every
    two seconds, however many the consumer has room for."""
    queue = new_queue()
    limited, free = str(uuid.uuid4()), str(uuid.uuid4())
    with Connection(url) as conn:
        publish(conn, queue, limited, 20)
        publish(conn, queue, free, 20)
        tenants.rate_limit(url, limited, queue=queue.name, rate=0.5, burst=3)
        [entry] = tenants.inspect(url, tenant=limited)
        assert (entry.rate, entry.burst) == (0.5, 3.0)
        first = claim(conn, queue, prefetch=50)
        by_tenant = [m.payload["tenant"] for m in first]
        assert by_tenant.count(limited) == 3
        assert by_tenant.count(free) == 20  # the other tenant is not held back
        started = time.monotonic()
        later = claim(conn, queue, prefetch=50, rounds=5)
        elapsed = time.monotonic() - started
    count = sum(1 for m in later if m.payload["tenant"] == limited)
    # 0.5 a second over the rounds (the bucket was empty after the first claim).
    assert abs(count - 0.5 * elapsed) <= 1.0, (count, elapsed)


def test_removing_a_rate_limit_lets_the_tenant_through(url: str) -> None:
    queue = new_queue()
    tenant = str(uuid.uuid4())
    with Connection(url) as conn:
        publish(conn, queue, tenant, 10)
        tenants.rate_limit(url, tenant, queue=queue.name, rate=0.01, burst=1)
        assert len(claim(conn, queue, prefetch=20)) == 1
        tenants.rate_limit(url, tenant, queue=queue.name, rate=None)
        assert len(claim(conn, queue, prefetch=20)) == 9
    assert tenants.inspect(url, tenant=tenant) == []


# -------------------------------------------------------------------------- purge


def test_purge_deletes_ready_and_delayed_messages_and_names_those_in_flight(
    url: str, database: Database
) -> None:
    queue = new_queue()
    tenant, other = str(uuid.uuid4()), str(uuid.uuid4())
    eta = "2099-01-01T00:00:00.000000+00:00"
    with Connection(url) as conn:
        publish(conn, queue, tenant, 2, eta=eta)  # held by the consumer below
        publish(conn, queue, tenant, 1)  # claimed: in flight
        publish(conn, queue, other, 3)
        held = hold(conn, queue)
        assert len(held) == 6
        for message in held:  # the other tenant's are acknowledged
            if message.payload["tenant"] == other:
                message.ack()
        publish(conn, queue, tenant, 4)  # ready
        publish(conn, queue, other, 2)
        [entry] = tenants.inspect(url, tenant=tenant)
        assert (entry.ready, entry.in_flight, entry.delayed) == (4, 1, 2)
        in_flight = next(
            m for m in held if m.payload["tenant"] == tenant and "eta" not in m.headers
        )
        delayed_ids = sorted(m.headers["id"] for m in held if "eta" in m.headers)
        purged = tenants.purge(url, tenant, revoke=False)
        assert (purged.ready, purged.delayed, purged.in_flight) == (4, 2, 0)
        assert purged.left_in_flight == (in_flight.headers["id"],)
        assert rows_of(database, tenant) == 1
        in_flight.ack()
    assert rows_of(database, other) == 2  # untouched (3 acknowledged, 2 queued)
    assert sorted(purged.as_dict()["left_in_flight"]) == [in_flight.headers["id"]]
    assert delayed_ids  # named among the held messages


def test_purge_of_one_queue_leaves_the_tenants_other_queues(url: str, database: Database) -> None:
    first, second = new_queue(), new_queue()
    tenant = str(uuid.uuid4())
    with Connection(url) as conn:
        publish(conn, first, tenant, 3)
        publish(conn, second, tenant, 2)
    purged = tenants.purge(url, tenant, queue=first.name)
    assert (purged.ready, purged.queue) == (3, first.name)
    assert rows_of(database, tenant) == 2


# ------------------------------------------------------------------ refusals


def test_operations_refuse_what_they_cannot_act_on(url: str, database: Database) -> None:
    with pytest.raises(InvalidTenantId):
        tenants.pause(url, "tenant'; DROP TABLE x; --")
    with pytest.raises(ConfigurationError, match="redis:// broker"):
        tenants.inspect("redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigurationError, match="amqp:// broker"):
        tenants.purge("amqp://guest:guest@127.0.0.1:5672//", str(uuid.uuid4()))
    with pytest.raises(ConfigurationError, match="rate must be a finite number greater than 0"):
        tenants.rate_limit(url, str(uuid.uuid4()), queue="q", rate=0)
    with pytest.raises(ConfigurationError, match="burst must be"):
        tenants.rate_limit(url, str(uuid.uuid4()), queue="q", rate=5, burst=0.5)
    with pytest.raises(ConfigurationError, match="queue must be"):
        tenants.pause(url, str(uuid.uuid4()), queue="")
    # A database without the transport's tables.
    bare = "postgresql://" + render(database.app_url).split("://", 1)[1].split("?")[0]
    with pytest.raises(ConfigurationError, match="tc0005"):
        tenants.pause(bare, str(uuid.uuid4()))


# -------------------------------------------------------------------- real workers


def _starts(runs: list[faults.Run]) -> dict[str, float]:
    return {run.task_id: run.recorded_at for run in runs if run.phase == "started"}


def test_pausing_a_tenant_with_10000_queued_tasks_while_another_flows(
    setup: faults.Setup, launch: faults.Launch, url: str, pg_backend: str, admin: sa.Engine
) -> None:
    queue = faults.new_queue("pause")
    spec = faults.WorkerSpec(url, pg_backend, queue, render(setup.app_url))
    heavy, light = faults.new_tenants(2)
    with faults.workers(launch) as start, faults.publisher(url, queue) as app:
        backlog = faults.publish(app, faults_app.RECORD, [heavy], 10_000)
        worker = cast(WorkerHandle, start(spec))
        faults.wait_progress(admin, backlog, 20, TIMEOUT)
        tenants.pause(app, heavy)
        paused_at = time.time()
        # The other tenant's tasks, one every 50 ms, while the backlog waits.
        sent: dict[str, float] = {}
        for _ in range(40):
            sent.update(
                {
                    task_id: time.time()
                    for task_id in faults.publish(app, faults_app.RECORD, [light], 1)
                }
            )
            time.sleep(0.05)
        light_runs = faults.wait_done(admin, dict.fromkeys(sent, light), TIMEOUT)
        assert faults.done_ids(light_runs) == set(sent)
        latencies = sorted(_starts(light_runs)[task_id] - sent[task_id] for task_id in sent)
        heavy_started = _starts(faults.read_runs(admin, list(backlog)))
        after_pause = [t for t in heavy_started.values() if t > paused_at + 0.5]
        # What the worker had claimed before the pause (its prefetch window) may run.
        assert len(after_pause) <= 4, len(after_pause)
        [entry] = [e for e in tenants.inspect(app, tenant=heavy) if e.queue == queue]
        assert entry.paused
        assert entry.ready == 10_000 - len(heavy_started)
        print(
            f"\nother tenant's latency while paused: median {statistics.median(latencies):.3f} s,"
            f" max {latencies[-1]:.3f} s; backlog held: {entry.ready}"
        )
        assert tenants.resume(app, heavy) == []
        # It flows again: 200 more of its tasks done.
        faults.wait_progress(admin, backlog, len(heavy_started) + 200, TIMEOUT)
        # Paused again, the worker finishes what it claimed and then holds nothing
        # of the tenant's: it stops with no task finishing meanwhile.  (A task that
        # finishes as a prefork pool stops can have its result go unread, and so
        # its late acknowledgement unsent: celery/celery#3802, the transport
        # explanation's "Claims and leases".)
        tenants.pause(app, heavy)
        deadline = time.monotonic() + TIMEOUT
        while _in_flight(app, heavy, queue):
            assert time.monotonic() < deadline, "the paused tenant's claimed tasks never finished"
            time.sleep(0.1)
        code = worker.stop()
    assert code == 0, f"the worker did not stop warm: exit code {code}"
    # Each task of the backlog either ran once or is still queued, never both.
    runs = faults.read_runs(admin, list(backlog))
    done = [run.task_id for run in runs if run.phase == "done"]
    assert len(done) == len(set(done)) > len(heavy_started) + 200 - 4
    queued = queued_tasks(admin, heavy)
    assert set(backlog) - set(done) - set(queued) == set()  # nothing lost
    both = {task_id: queued[task_id] for task_id in set(done) & set(queued)}
    assert not both, f"done and still queued: {both}"


def _in_flight(app: Any, tenant: str, queue: str) -> int:
    return sum(e.in_flight for e in tenants.inspect(app, tenant=tenant) if e.queue == queue)


def test_purging_a_tenant_while_workers_consume_counts_exactly(
    setup: faults.Setup, launch: faults.Launch, url: str, pg_backend: str, admin: sa.Engine
) -> None:
    queue = faults.new_queue("purge")
    spec = faults.WorkerSpec(url, pg_backend, queue, render(setup.app_url))
    gone, kept = faults.new_tenants(2)
    with faults.workers(launch) as start, faults.publisher(url, queue) as app:
        doomed = faults.publish(app, faults_app.RECORD, [gone, kept], 600, hold=0.01)
        ours = {task_id: t for task_id, t in doomed.items() if t == gone}
        theirs = {task_id: t for task_id, t in doomed.items() if t == kept}
        start(spec)
        start(spec)
        faults.wait_progress(admin, doomed, 40, TIMEOUT)
        purged = tenants.purge(app, gone)
        left = set(purged.left_in_flight)
        their_runs = faults.wait_done(admin, theirs, TIMEOUT)
        assert faults.done_ids(their_runs) == set(theirs)  # the other tenant untouched
        time.sleep(2.0)  # what was in flight finishes
        our_runs = faults.read_runs(admin, list(ours))
    done = faults.done_ids(our_runs)
    assert purged.ready > 0
    assert left <= done
    # Every task of the purged tenant either ran or was deleted, never both.
    assert len(done) + purged.ready == len(ours), (len(done), purged)
    assert max(Counter(r.task_id for r in our_runs if r.phase == "done").values()) == 1
    assert queued_tasks(admin, gone) == {}


def queued_tasks(admin: sa.Engine, tenant: str) -> dict[str, dict[str, Any]]:
    """The tenant's messages still in the table: ``{task id: the row's state}``."""
    with admin.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT payload::jsonb -> 'headers' ->> 'id' AS task_id, lease, deliveries,"
                f" visible_at > now() AS leased FROM {MESSAGE} WHERE tenant = :t"
            ),
            {"t": tenant},
        ).mappings()
        return {row["task_id"]: dict(row) for row in rows}


def test_a_rate_limit_holds_across_two_worker_processes(
    setup: faults.Setup, launch: faults.Launch, url: str, pg_backend: str, admin: sa.Engine
) -> None:
    queue = faults.new_queue("rate")
    spec = faults.WorkerSpec(url, pg_backend, queue, render(setup.app_url))
    limited, free = faults.new_tenants(2)
    rate, count = 10.0, 210
    with faults.workers(launch) as start, faults.publisher(url, queue) as app:
        tenants.rate_limit(app, limited, queue=queue, rate=rate)
        start(spec)
        start(spec)
        expected = faults.publish(app, faults_app.RECORD, [limited], count)
        others = faults.publish(app, faults_app.RECORD, [free], 100)
        other_runs = faults.wait_done(admin, others, TIMEOUT)
        runs = faults.wait_done(admin, expected, TIMEOUT)
    assert faults.done_ids(other_runs) == set(others)
    assert faults.done_ids(runs) == set(expected)
    starts = sorted(_starts(runs).values())
    burst = rate  # the default: one second's worth
    measured = (count - burst) / (starts[-1] - starts[0])
    print(f"\nrate limit {rate:g}/s across two workers: measured {measured:.2f}/s")
    assert abs(measured - rate) <= 0.1 * rate, measured
    # The unlimited tenant finished long before the limited one.
    assert max(_starts(other_runs).values()) < starts[len(starts) // 2]


def test_a_purge_whose_results_cannot_be_purged_deletes_no_message(
    url: str, database: Database
) -> None:
    queue = new_queue()
    tenant = str(uuid.uuid4())
    with Connection(url) as conn:
        publish(conn, queue, tenant, 3)
    with pytest.raises(ConfigurationError, match="no message was deleted either"):
        tenants.purge(url, tenant, results="postgresql://nobody@127.0.0.1:1/nothing")
    with pytest.raises(ConfigurationError):
        tenants.purge(url, tenant, results="redis://127.0.0.1:6379/0")
    assert rows_of(database, tenant) == 3


def test_a_forged_eta_header_fails_neither_inspect_nor_purge(url: str) -> None:
    """A header that looks like an ETA and is no valid time (month 13, February 31)
    counts the message as in flight, not delayed, and breaks nothing."""
    queue = new_queue()
    tenant = str(uuid.uuid4())
    with Connection(url) as conn:
        publish(conn, queue, tenant, 1, eta="2099-02-31T00:00:00+00:00")
        publish(conn, queue, tenant, 1, eta="2099-13-01T25:61:00+00:00")
        publish(conn, queue, tenant, 1, eta="2099-01-01T00:00:00+00:00")
        held = hold(conn, queue)
        assert len(held) == 3
        [entry] = tenants.inspect(url, tenant=tenant)
        assert (entry.in_flight, entry.delayed) == (2, 1)
        purged = tenants.purge(url, tenant, revoke=False)
        assert (purged.ready, purged.delayed, len(purged.left_in_flight)) == (0, 1, 2)
        for message in held:
            message.ack()


def test_a_pause_reaches_a_consumer_that_saw_no_controls_at_its_next_claim(url: str) -> None:
    """A consumer that read an empty control table runs the plain claim; the pause's
    notification makes its next claim read the table again (its polling interval,
    the other way it would learn of it, is 30 s here)."""
    queue = new_queue()
    paused, other = str(uuid.uuid4()), str(uuid.uuid4())
    with Connection(url, transport_options={"polling_interval": 30}) as conn:
        publish(conn, queue, paused, 3)
        publish(conn, queue, other, 3)
        got: list[Message] = []
        channel = conn.channel()
        channel.basic_qos(0, 1, False)
        Consumer(channel, [queue], callbacks=[lambda b, m: got.append(m)]).consume()
        conn.drain_events(timeout=5)
        assert len(got) == 1
        assert cast(Any, conn.transport).controlled() is False
        tenants.pause(url, paused)
        time.sleep(0.2)  # the notification arrives
        for _ in range(6):
            for message in got:
                if not message.acknowledged:
                    message.ack()
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1.0)
    after = [m.payload["tenant"] for m in got[1:]]
    assert paused not in after, after
    assert after.count(other) == 3 - (got[0].payload["tenant"] == other)
