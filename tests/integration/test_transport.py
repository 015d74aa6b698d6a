"""The package's PostgreSQL transport (:mod:`tenant_celery.transport`), for real.

Workers are real ``celery worker`` processes over the transport; the claims,
leases and fairness tests drive kombu directly against a migrated database.
Everything connects as ``app_user`` (no superuser, no table owner) unless a
test says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import psycopg
import pytest
import sqlalchemy as sa
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import ChannelError
from kombu.message import Message
from reliability import faults

from tenant_celery import tenant_context, transport
from tenant_celery.errors import ConfigurationError
from tenant_celery.transport import Transport
from tests._rig.postgres import Database, libpq_kwargs, render
from tests._rig.worker import TRANSPORT_SCHEMA, WorkerHandle, transport_url

from . import faults_app

pytestmark = pytest.mark.worker

TIMEOUT = 120.0


@pytest.fixture
def broker(database: Database) -> str:
    """The transport's URL on the test's database (tables in ``tcpg``), as ``app_user``
    (no superuser, not the tables' owner), for the worker tests."""
    return transport_url(database, "app")


@pytest.fixture
def app_broker(database: Database) -> str:
    """The transport's URL as ``app_user``, for kombu-level tests."""
    return transport_url(database, "app")


@pytest.fixture
def admin(setup: faults.Setup) -> Iterator[sa.Engine]:
    """A superuser engine on the workers' database, to read what the tasks recorded."""
    engine = sa.create_engine(setup.admin_url, poolclass=sa.NullPool)
    yield engine
    engine.dispose()


def started_counts(runs: list[faults.Run]) -> Counter[str]:
    return Counter(run.task_id for run in runs if run.phase == "started")


# ------------------------------------------------------------------ real workers


def test_sigkilled_worker_messages_come_back_when_their_leases_run_out(
    setup: faults.Setup, launch: faults.Launch, broker: str, pg_backend: str
) -> None:
    result = faults.worker_killed(
        setup, launch, broker_url=broker, backend_url=pg_backend, visibility_timeout=4.0
    )
    assert result.ok, f"{result.problems}; details: {result.details}"
    details = result.details
    assert len(details["in_flight_at_kill"]) == 2
    assert set(details["redelivered"]) >= set(details["in_flight_at_kill"])
    assert result.executions > result.published  # the in-flight tasks ran twice
    assert result.cross_tenant == result.unaccounted == 0


def test_two_workers_on_one_queue_run_every_message_once(
    setup: faults.Setup, launch: faults.Launch, broker: str, pg_backend: str, admin: sa.Engine
) -> None:
    queue = faults.new_queue("pair")
    spec = faults.WorkerSpec(broker, pg_backend, queue, render(setup.app_url))
    tenants = faults.new_tenants(4)
    with faults.workers(launch) as start, faults.publisher(broker, queue) as app:
        first, second = start(spec), start(spec)
        expected = faults.publish(app, faults_app.RECORD, tenants, 300)
        runs = faults.wait_done(admin, expected, TIMEOUT)
        assert first.alive
        assert second.alive
    assert faults.done_ids(runs) == set(expected)
    counts = started_counts(runs)
    assert max(counts.values()) == 1, [t for t, n in counts.items() if n > 1]
    # Two prefork workers of two children each: more than two processes ran tasks.
    processes = {run.worker_pid for run in runs if run.phase == "started"}
    assert len(processes) > 2, "one worker took everything: nothing shared the queue"
    assert all(expected[run.task_id] == run.tenant_id for run in runs)


def test_warm_shutdown_releases_prefetched_messages_and_loses_nothing(
    setup: faults.Setup, launch: faults.Launch, broker: str, pg_backend: str, admin: sa.Engine
) -> None:
    queue = faults.new_queue("warm")
    # A long lease: a message that were merely left to expire would not come back in time.
    spec = faults.WorkerSpec(
        broker,
        pg_backend,
        queue,
        render(setup.app_url),
        environ={faults_app.VISIBILITY_TIMEOUT_ENV: "600"},
    )
    tenants = faults.new_tenants(2)
    with faults.workers(launch) as start, faults.publisher(broker, queue) as app:
        worker = start(spec)
        expected = faults.publish(app, faults_app.RECORD, tenants, 12, hold=0.5)
        deadline = time.monotonic() + TIMEOUT
        while not faults.done_ids(faults.read_runs(admin, list(expected))):
            assert time.monotonic() < deadline, "no task completed"
            time.sleep(0.05)
        cast(WorkerHandle, worker).stop()  # SIGTERM: warm shutdown
        before = faults.read_runs(admin, list(expected))
        assert faults.done_ids(before) != set(expected), "all done before the shutdown"
        start(spec)
        runs = faults.wait_done(admin, expected, TIMEOUT)
    assert faults.done_ids(runs) == set(expected)
    # Warm shutdown finished what was running and released the rest: nothing ran twice.
    assert max(started_counts(runs).values()) == 1


def test_a_worker_whose_broker_connections_are_terminated_reconnects_and_runs_on(
    setup: faults.Setup, launch: faults.Launch, broker: str, pg_backend: str, admin: sa.Engine
) -> None:
    queue = faults.new_queue("cut")
    spec = faults.WorkerSpec(broker, pg_backend, queue, render(setup.app_url))
    tenants = faults.new_tenants(2)
    with faults.workers(launch) as start, faults.publisher(broker, queue) as app:
        worker = start(spec)
        before = faults.publish(app, faults_app.RECORD, tenants, 10)
        faults.wait_done(admin, before, TIMEOUT)
        with admin.begin() as conn:
            cut = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = :name"
                    " AND datname = current_database() AND pid <> pg_backend_pid()"
                ),
                {"name": transport.APPLICATION_NAME},
            ).scalar_one()
        assert cut >= 2  # at least the claims' and the LISTEN connection
        after = faults.publish(app, faults_app.RECORD, tenants, 10)
        runs = faults.wait_done(admin, {**before, **after}, TIMEOUT)
        assert worker.alive
    assert faults.done_ids(runs) == set(before) | set(after)
    assert max(started_counts(runs).values()) == 1


def test_a_stored_row_that_is_not_a_message_is_deleted_and_the_worker_runs_on(
    setup: faults.Setup,
    launch: faults.Launch,
    broker: str,
    pg_backend: str,
    admin: sa.Engine,
    database: Database,
) -> None:
    """Someone with write access to the message table plants rows kombu cannot deliver.

    Delivered, such a row stopped the worker (an unrecoverable error) and, claimed
    again after each restart, kept stopping it.
    """
    queue = faults.new_queue("garbage")
    spec = faults.WorkerSpec(broker, pg_backend, queue, render(setup.app_url))
    tenants = faults.new_tenants(2)
    planted = [
        "not json at all",
        '["a", "list"]',
        '{"properties": {}}',
        '{"body": "", "properties": 7}',
    ]
    with faults.publisher(broker, queue) as app:
        before = faults.publish(app, faults_app.RECORD, tenants, 8)
    table = f"{TRANSPORT_SCHEMA}.tenant_celery_message"
    with psycopg.connect(**libpq_kwargs(database.url), autocommit=True) as owner:
        rows = owner.execute(
            f"SELECT id, payload FROM {table} WHERE queue = %s ORDER BY id", (queue,)
        ).fetchall()
        assert len(rows) == 8
        spoiled = {row_id: json.loads(payload)["headers"]["id"] for row_id, payload in rows[::2]}
        for row_id, payload in zip(spoiled, planted, strict=True):
            owner.execute(f"UPDATE {table} SET payload = %s WHERE id = %s", (payload, row_id))
    expected = {
        task_id: tenant for task_id, tenant in before.items() if task_id not in spoiled.values()
    }
    with faults.workers(launch) as start, faults.publisher(broker, queue) as app:
        worker = start(spec)
        runs = faults.wait_done(admin, expected, TIMEOUT)
        after = faults.publish(app, faults_app.RECORD, tenants, 6)
        runs = faults.wait_done(admin, {**expected, **after}, TIMEOUT)
        assert worker.alive, worker.log_tail()
        deadline = time.monotonic() + TIMEOUT
        while _rows(database, Queue(queue)):  # deleted with the next claim
            assert time.monotonic() < deadline, "the planted rows were not deleted"
            time.sleep(0.1)
        log = worker.log_text()
    assert faults.done_ids(runs) == set(expected) | set(after)
    assert not set(spoiled.values()) & {run.task_id for run in runs}
    assert log.count("is not a kombu message") == len(planted), log
    for text in planted:
        assert text not in log  # the contents are not logged
    assert "Unrecoverable error" not in log


def test_revoke_reaches_the_worker_through_the_fanout_exchange(
    setup: faults.Setup, launch: faults.Launch, broker: str, pg_backend: str, admin: sa.Engine
) -> None:
    queue = faults.new_queue("revoke")
    spec = faults.WorkerSpec(broker, pg_backend, queue, render(setup.app_url))
    tenant = faults.new_tenants(1)[0]
    with faults.workers(launch) as start, faults.publisher(broker, queue) as app:
        worker = cast(WorkerHandle, start(spec))
        with tenant_context(tenant):
            doomed = app.send_task(faults_app.RECORD, countdown=4)
            kept = app.send_task(faults_app.RECORD, countdown=4)
        worker.wait_for_log(rf"Task {faults_app.RECORD}\[{doomed.id}\] received", timeout=TIMEOUT)
        app.control.revoke(doomed.id)
        worker.wait_for_log(rf"Tasks flagged as revoked: .*{doomed.id}", timeout=TIMEOUT)
        expected = {kept.id: tenant}
        runs = faults.wait_done(admin, expected, TIMEOUT)
        time.sleep(1.0)  # the revoked task's countdown has passed by now
        revoked_runs = faults.read_runs(admin, [doomed.id])
    assert faults.done_ids(runs) == {kept.id}
    assert revoked_runs == []


def test_an_eta_longer_than_the_lease_runs_once(
    setup: faults.Setup, launch: faults.Launch, broker: str, pg_backend: str, admin: sa.Engine
) -> None:
    """The worker renews the leases of the ETA messages it holds."""
    queue = faults.new_queue("eta")
    environ = {faults_app.VISIBILITY_TIMEOUT_ENV: "1.5"}
    spec = faults.WorkerSpec(broker, pg_backend, queue, render(setup.app_url), environ=environ)
    tenants = faults.new_tenants(2)
    with faults.workers(launch) as start, faults.publisher(broker, queue) as app:
        start(spec)
        start(spec)  # a second consumer that would take any message whose lease lapsed
        expected = {}
        for tenant in tenants:
            with tenant_context(tenant):
                expected[app.send_task(faults_app.RECORD, countdown=6).id] = tenant
        runs = faults.wait_done(admin, expected, TIMEOUT)
        time.sleep(2.0)
        runs = faults.read_runs(admin, list(expected))
    assert faults.done_ids(runs) == set(expected)
    assert max(started_counts(runs).values()) == 1


# ------------------------------------------------------------- kombu, directly


def _publish(conn: Connection, queue: Queue, tenant: str, count: int = 1) -> None:
    producer = Producer(conn.default_channel)
    for index in range(count):
        producer.publish(
            {"tenant": tenant, "n": index},
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            headers={"tenant_id": tenant},
        )


def _consume(conn: Connection, queue: Queue, prefetch: int) -> list[Message]:
    """Start one consumer with ``prefetch``; the list its deliveries are added to."""
    got: list[Message] = []
    channel = conn.channel()
    channel.basic_qos(0, prefetch, False)
    consumer = Consumer(channel, [queue], callbacks=[lambda body, message: got.append(message)])
    consumer.consume()
    return got


def _rows(database: Database, queue: Queue) -> list[int]:
    """Ids of the queue's rows in the message table, oldest first."""
    with psycopg.connect(**libpq_kwargs(database.url)) as admin:
        found = admin.execute(
            f"SELECT id FROM {TRANSPORT_SCHEMA}.tenant_celery_message WHERE queue = %s ORDER BY id",
            (queue.name,),
        ).fetchall()
    return [row_id for (row_id,) in found]


def _claimed(conn: Connection, queue: Queue, prefetch: int, *, ack: bool) -> list[Message]:
    """Let one consumer with ``prefetch`` take one batch; the messages it got."""
    got: list[Message] = []
    channel = conn.channel()
    channel.basic_qos(0, prefetch, False)
    consumer = Consumer(channel, [queue], callbacks=[lambda body, message: got.append(message)])
    consumer.consume()
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=2)
    if ack:
        for message in got:
            message.ack()
    return got


def new_queue() -> Queue:
    name = f"tc.kombu.{uuid.uuid4().hex[:8]}"
    return Queue(name, Exchange(name, "direct"), name)


def _transport_connections(database: Database) -> int:
    with psycopg.connect(**libpq_kwargs(database.url)) as admin:
        found = admin.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (transport.APPLICATION_NAME,),
        ).fetchone()
    return int(found[0]) if found else 0


def test_a_process_that_only_publishes_holds_one_connection(
    database: Database, app_broker: str
) -> None:
    """The claims connection opens at the first claim, not when kombu connects:
    web processes that only send tasks each hold one server connection."""
    queue = new_queue()
    before = _transport_connections(database)
    with Connection(app_broker) as publisher:
        publisher.connect()
        _publish(publisher, queue, "tenant-a", 3)
        assert _transport_connections(database) - before == 1
        got = _claimed(publisher, queue, prefetch=3, ack=True)  # now it consumes too
        assert len(got) == 3
        # Publishing, claims, and the listening connection a consumer opens before
        # it first reads the tenant controls (a change is then announced to it).
        assert _transport_connections(database) - before == 3


def test_one_tenants_backlog_does_not_hold_back_anothers_message(app_broker: str) -> None:
    queue = new_queue()
    with Connection(app_broker) as publisher:
        _publish(publisher, queue, "tenant-a", 500)
        _publish(publisher, queue, "tenant-b")
    with Connection(app_broker) as conn:
        first = _claimed(conn, queue, prefetch=4, ack=True)
    tenants = [message.payload["tenant"] for message in first]
    assert len(tenants) == 4
    assert "tenant-b" in tenants[:2], tenants  # its one message, in the first claim


def test_a_higher_priority_message_is_claimed_first(app_broker: str) -> None:
    queue = new_queue()
    with Connection(app_broker) as publisher:
        producer = Producer(publisher.default_channel)
        for priority in (0, 3, 9, 3):
            producer.publish(
                {"priority": priority},
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                priority=priority,
            )
    with Connection(app_broker) as conn:
        order = [m.payload["priority"] for m in _claimed(conn, queue, prefetch=4, ack=True)]
    assert order == [9, 3, 3, 0]


def test_tenant_inflight_limit_caps_one_tenants_claimed_messages(database: Database) -> None:
    queue = new_queue()
    url = transport_url(database, "app")
    with Connection(url) as publisher:
        _publish(publisher, queue, "tenant-a", 10)
        _publish(publisher, queue, "tenant-b", 10)
    options = {"tenant_inflight_limit": 2}
    with Connection(url, transport_options=options) as conn:
        first = _claimed(conn, queue, prefetch=10, ack=False)
        assert Counter(m.payload["tenant"] for m in first) == {"tenant-a": 2, "tenant-b": 2}
        with Connection(url, transport_options=options) as other:
            # A second consumer: the cap is per tenant across consumers.
            assert _claimed(other, queue, prefetch=10, ack=False) == []


def test_an_acknowledged_message_is_deleted_and_a_released_one_is_ready_again(
    database: Database, app_broker: str
) -> None:
    queue = new_queue()
    with Connection(app_broker) as publisher:
        _publish(publisher, queue, "t", 3)
    # A long lease: only an explicit release makes the unacknowledged ones ready.
    with Connection(app_broker, transport_options={"visibility_timeout": 600}) as conn:
        got = _claimed(conn, queue, prefetch=3, ack=False)
        assert len(got) == 3
        got[0].ack()
        got[1].reject(requeue=True)
    # Closing the connection released the third one (the restore at shutdown).
    with psycopg.connect(**libpq_kwargs(database.url)) as admin:
        rows = admin.execute(
            f"SELECT deliveries, lease IS NULL FROM {TRANSPORT_SCHEMA}.tenant_celery_message"
            " WHERE queue = %s AND visible_at <= now()",
            (queue.name,),
        ).fetchall()
    assert sorted(rows) == [(1, True), (1, True)]
    with Connection(app_broker) as conn:
        again = _claimed(conn, queue, prefetch=5, ack=True)
    assert sorted(m.payload["n"] for m in again) == [1, 2]
    assert all(m.delivery_info["redelivered"] for m in again)


def test_a_late_acknowledgement_after_the_connection_was_lost_deletes_its_message(
    database: Database, app_broker: str
) -> None:
    """A worker whose broker connections are terminated while tasks acknowledged late
    run: kombu closes the connection (dropping the transport's client) and the tasks,
    finishing after that, acknowledge on their old channel."""
    queue = new_queue()
    with Connection(app_broker) as publisher:
        _publish(publisher, queue, "t", 2)
    conn = Connection(app_broker, transport_options={"visibility_timeout": 600})
    got = _claimed(conn, queue, prefetch=2, ack=False)
    assert len(got) == 2
    with psycopg.connect(**libpq_kwargs(database.url), autocommit=True) as admin:
        cut = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()"
            " AND pid <> pg_backend_pid()",
            (transport.APPLICATION_NAME,),
        ).fetchone()
    assert cut is not None
    assert cut[0] >= 1
    conn.close()  # its release of the two claimed messages fails: their leases stand
    assert len(_rows(database, queue)) == 2
    got[0].ack()
    assert len(_rows(database, queue)) == 1
    got[1].ack()
    assert _rows(database, queue) == []


#: A consumer in a process of its own: claims one message of the queue named by
#: argv[2] on the broker argv[1] with a 1 s lease, says so, then keeps it (its lease
#: thread renewing) until it is killed.
_HOLDER = """
import sys, time
from kombu import Connection, Consumer, Exchange, Queue
import tenant_celery  # registers the tcpg+ URL scheme with kombu
url, name = sys.argv[1], sys.argv[2]
queue = Queue(name, Exchange(name, "direct"), name)
got = []
with Connection(url, transport_options={"visibility_timeout": 1}) as conn:
    channel = conn.channel()
    channel.basic_qos(0, 1, False)
    Consumer(channel, [queue], callbacks=[lambda body, message: got.append(message)]).consume()
    while not got:
        try:
            conn.drain_events(timeout=1)
        except TimeoutError:
            pass
    print("claimed", flush=True)
    while True:
        time.sleep(60)
"""


def test_a_lapsed_lease_lets_another_consumer_take_the_message(app_broker: str) -> None:
    queue = new_queue()
    with Connection(app_broker) as publisher:
        _publish(publisher, queue, "t")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, app_broker, queue.name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "claimed"
        options = {"visibility_timeout": 1}
        with Connection(app_broker, transport_options=options) as other:
            assert _claimed(other, queue, prefetch=1, ack=False) == []  # leased
            time.sleep(1.5)  # past the first lease: the holder renews it meanwhile
            assert _claimed(other, queue, prefetch=1, ack=False) == []
            holder.send_signal(signal.SIGKILL)  # no more renewals, no release
            holder.wait(timeout=10)
            time.sleep(1.5)
            taken = _claimed(other, queue, prefetch=1, ack=True)
        assert len(taken) == 1
        assert taken[0].delivery_info["redelivered"]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()


def test_missing_tables_are_a_clear_error(database: Database) -> None:
    url = "tcpg+" + render(database.app_url)
    with Connection(url) as conn, pytest.raises(ConfigurationError) as caught:
        _publish(conn, new_queue(), "t")
    assert "tenant_celery.migrations.upgrade" in str(caught.value)


def test_a_non_postgresql_url_is_refused() -> None:
    with Connection("tcpg+mysql://u@h/db") as conn, pytest.raises(ConfigurationError) as caught:
        conn.connect()
    assert "postgresql://" in str(caught.value)


def test_transport_options_are_checked() -> None:
    for options in ({"visibility_timeout": 0}, {"tenant_inflight_limit": "2"}):
        with pytest.raises(ConfigurationError, match=next(iter(options))):
            Connection("tcpg+postgresql://u@h/db", transport_options=options).transport  # noqa: B018


def test_a_passive_declare_keeps_the_queues_settings(database: Database, app_broker: str) -> None:
    with Connection(app_broker) as conn:
        channel = conn.channel()
        channel.queue_declare(queue="tc.ttl", arguments={"x-message-ttl": 60000})
        channel.queue_declare(queue="tc.ttl", passive=True)
        with pytest.raises(ChannelError, match="NOT_FOUND"):
            channel.queue_declare(queue="tc.nothing", passive=True)
    with psycopg.connect(**libpq_kwargs(database.url)) as admin:
        ttl = admin.execute(
            f"SELECT message_ttl FROM {TRANSPORT_SCHEMA}.tenant_celery_queue WHERE name = 'tc.ttl'"
        ).fetchone()
    assert ttl == (60000,)


def test_an_acknowledgement_from_another_thread_ends_the_wait_for_room(app_broker: str) -> None:
    """With the prefetch window full and no NOTIFY (``listen`` off), the consuming
    thread waits; a pool thread's ack must wake it to claim the next message, not
    leave it asleep for the whole poll interval."""
    queue = new_queue()
    with Connection(app_broker) as publisher:
        _publish(publisher, queue, "t", 2)
    options = {"listen": False, "polling_interval": 60}
    with Connection(app_broker, transport_options=options) as conn:
        got = _consume(conn, queue, prefetch=1)
        conn.drain_events(timeout=5)
        assert len(got) == 1  # the window is full now
        drainer = threading.Thread(target=conn.drain_events, daemon=True)  # no timeout
        drainer.start()
        got[0].ack()  # from this thread, as a pool thread would
        # Asleep until the next poll, it would still be waiting well past this.
        drainer.join(timeout=options["polling_interval"] / 4)
        assert not drainer.is_alive(), "the ack did not wake the consuming thread"
        assert [m.payload["n"] for m in got] == [0, 1]
        got[1].ack()


def test_acknowledgements_are_deleted_by_the_next_claim(
    database: Database, app_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An acknowledgement costs no statement of its own while the consumer keeps
    claiming: the next claim deletes the acknowledged rows, and a consumer about
    to wait, or closing, deletes them first."""
    queue = new_queue()
    with Connection(app_broker) as publisher:
        _publish(publisher, queue, "t", 4)
    executed: list[str] = []
    real_execute = Transport.execute

    def counting(self: Transport, template: str, *args: Any, **kwargs: Any) -> Any:
        executed.append(template)
        return real_execute(self, template, *args, **kwargs)

    monkeypatch.setattr(Transport, "execute", counting)

    published = _rows(database, queue)  # message n has the n-th id

    def remaining() -> list[int]:
        return [published.index(row_id) for row_id in _rows(database, queue)]

    options = {"listen": False, "polling_interval": 60}
    with Connection(app_broker, transport_options=options) as conn:
        got = _consume(conn, queue, prefetch=2)
        conn.drain_events(timeout=5)
        assert [m.payload["n"] for m in got] == [0, 1]
        executed.clear()
        got[0].ack()
        got[1].ack()
        assert executed == []  # nothing sent yet
        assert remaining() == [0, 1, 2, 3]

        conn.drain_events(timeout=5)  # one claim: takes 2 and 3, deletes 0 and 1
        assert [m.payload["n"] for m in got] == [0, 1, 2, 3]
        assert len(executed) == 1, executed
        assert remaining() == [2, 3]

        got[2].ack()
        # The window has room but the queue is empty: the claim that finds nothing
        # still deletes, before the consumer waits.
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.5)
        assert remaining() == [3]
        got[3].ack()
    # Closing the connection deletes what is left.
    assert remaining() == []


def test_an_acknowledgement_frees_its_tenants_place_in_the_claim_that_carries_it(
    app_broker: str,
) -> None:
    """With ``tenant_inflight_limit`` 1 the consumer waits while the tenant's one
    message runs; the acknowledgement (from a pool thread) wakes it, and the claim
    that deletes the acknowledged message takes the tenant's next one, rather
    than finding the tenant still at its cap and sleeping until the next poll."""
    queue = new_queue()
    with Connection(app_broker) as publisher:
        _publish(publisher, queue, "tenant-a", 3)
    options = {"tenant_inflight_limit": 1, "listen": False, "polling_interval": 60}
    with Connection(app_broker, transport_options=options) as conn:
        got = _consume(conn, queue, prefetch=5)
        conn.drain_events(timeout=5)
        assert [m.payload["n"] for m in got] == [0]  # capped at one
        for expected in ([0, 1], [0, 1, 2]):
            drainer = threading.Thread(target=conn.drain_events, kwargs={"timeout": 20})
            drainer.start()
            time.sleep(0.5)  # the consumer has found the tenant at its cap and waits
            got[-1].ack()  # from this thread, as a pool thread would
            drainer.join(timeout=options["polling_interval"] / 4)
            assert not drainer.is_alive(), "still waiting after the acknowledgement"
            assert [m.payload["n"] for m in got] == expected
        got[-1].ack()


def _plan_nodes(plan: dict[str, Any]) -> list[str]:
    nodes = [str(plan["Node Type"])]
    for child in plan.get("Plans", []):
        nodes.extend(_plan_nodes(child))
    return nodes


@pytest.mark.parametrize("controlled", [False, True], ids=["plain", "obeying-controls"])
def test_a_claim_stays_on_the_index_whatever_the_statistics_say(
    database: Database, controlled: bool
) -> None:
    """Both claims (the one obeying tenant controls, too).  The table is analyzed
    while every message is claimed (as under a busy worker); then a backlog
    arrives.  The statistics now say almost nothing is ready, and the plain plan
    scans the whole table per claim; the transport's claim, with its transaction
    settings, reads a few pages of the index."""
    transport_url(database, "app")  # migrates the transport's schema
    settings = transport._Settings({"schema": TRANSPORT_SCHEMA})
    table = f"{TRANSPORT_SCHEMA}.tenant_celery_message"
    tenants = [f"tenant-{i}" for i in range(4)]
    with psycopg.connect(**libpq_kwargs(database.url), autocommit=True) as admin:
        with admin.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} (queue, tenant, payload, visible_at, lease)"
                " VALUES ('busy', %s, '{}', now() + interval '1 minute', gen_random_uuid())",
                [(tenants[i % 4],) for i in range(40)],
            )
        admin.execute(f"ANALYZE {table}")
        admin.execute(f"DELETE FROM {table}")
        with admin.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} (queue, tenant, payload) VALUES ('busy', %s, '{{}}')",
                [(tenants[i % 4],) for i in range(8000)],
            )
        statement = transport._claim_statement(settings, take=False, controlled=controlled)
        claim = transport._sql(statement, settings)
        params = {
            "queue": "busy", "n": 2, "cursor": "", "lease": uuid.uuid4(),
            "lease_seconds": 60.0, "acks": [],
        }  # fmt: skip

        def explain(*local: bytes) -> dict[str, Any]:
            with admin.transaction(force_rollback=True):
                for setting in local:
                    admin.execute(setting)
                row = admin.execute(
                    b"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + claim.as_bytes(admin), params
                ).fetchone()
            assert row is not None
            plan: dict[str, Any] = row[0][0]["Plan"]
            return plan

        plain, ours = explain(), explain(transport._CONSUMER_SETTINGS)

    # The trap is real: left to its estimates the planner reads the whole table.
    assert "Seq Scan" in _plan_nodes(plain) or "Bitmap Heap Scan" in _plan_nodes(plain)
    assert plain["Shared Hit Blocks"] > 300
    # The transport's claim: index scans only, a few dozen pages.
    assert not {"Seq Scan", "Bitmap Heap Scan"} & set(_plan_nodes(ours)), _plan_nodes(ours)
    assert ours["Shared Hit Blocks"] < 100, ours["Shared Hit Blocks"]


def test_a_claim_is_planned_once_not_at_every_claim(app_broker: str) -> None:
    """The prepared claim runs on its generic plan from the start.  Left to
    choose, the server plans its first five runs afresh, and goes on doing so
    while a few tenants hold many messages; planning the claim costs more than
    running it."""
    queue = new_queue()
    with Connection(app_broker) as publisher:
        for tenant in ("a", "b", "c", "d"):
            _publish(publisher, queue, f"tenant-{tenant}", 25)
    options = {"listen": False, "polling_interval": 60}
    with Connection(app_broker, transport_options=options) as conn:
        got = _consume(conn, queue, prefetch=2)
        while len(got) < 100:
            seen = len(got)
            conn.drain_events(timeout=5)
            for message in got[seen:]:
                message.ack()
        transport: Any = conn.transport
        with transport._lock:
            plans = (
                transport._connection(False)
                .execute(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                    " WHERE statement LIKE '%%WITH RECURSIVE acked%%'"
                )
                .fetchall()
            )
    assert len(plans) == 1, plans
    generic, custom = plans[0]
    assert custom == 0, plans
    assert generic >= 40, plans  # about one claim per acknowledged message


def test_an_acknowledgement_is_deleted_while_the_consuming_thread_is_busy(
    database: Database, app_broker: str
) -> None:
    """A long task on the consuming thread (the solo pool) claims nothing for a
    while: the lease thread deletes the acknowledged row before its lease, no
    longer renewed, would run out and deliver it again."""
    queue = new_queue()
    with Connection(app_broker) as publisher:
        _publish(publisher, queue, "t", 2)
    options = {"visibility_timeout": 1.5, "listen": False, "polling_interval": 60}
    with Connection(app_broker, transport_options=options) as conn:
        got = _consume(conn, queue, prefetch=2)
        conn.drain_events(timeout=5)
        assert len(got) == 2
        got[0].ack()
        time.sleep(3 * options["visibility_timeout"])  # busy: no claim, no wait
        with Connection(app_broker) as other:
            # Neither comes back: the first is deleted, the second's lease renewed.
            assert _claimed(other, queue, prefetch=5, ack=False) == []
        assert len(_rows(database, queue)) == 1
        got[1].ack()


def test_a_busy_consumer_claims_again_once_half_its_window_is_free(
    database: Database, app_broker: str
) -> None:
    """It does not claim for each acknowledgement, yet deletes the acknowledged row
    within moments, claim or not: a worker killed later does not run it again."""
    queue = new_queue()

    with Connection(app_broker) as publisher:
        _publish(publisher, queue, "t", 8)
    with Connection(app_broker, transport_options={"polling_interval": 0.1}) as conn:
        got = _consume(conn, queue, prefetch=4)
        conn.drain_events(timeout=5)
        assert [m.payload["n"] for m in got] == [0, 1, 2, 3]
        got[0].ack()  # one free of four: it still holds three, and waits
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.5)
        assert (
            len(_rows(database, queue)) == 7
        )  # no claim came, and the acknowledged row is gone anyway
        got[1].ack()  # two free: one claim takes two
        conn.drain_events(timeout=5)
        assert [m.payload["n"] for m in got] == [0, 1, 2, 3, 4, 5]
        for message in got[2:]:
            message.ack()


def test_messages_held_for_an_eta_do_not_stop_the_consumer_claiming(app_broker: str) -> None:
    """A Celery worker raises its prefetch limit by one for each message it holds for
    an ETA.  Those messages fill the window as fast as it grows: the half-window
    rule counts the window the consumer set, or a worker holding more ETA messages
    than half its window would claim nothing until they come due."""
    queue = new_queue()
    with Connection(app_broker) as publisher:
        _publish(publisher, queue, "t", 6)
    with Connection(app_broker, transport_options={"polling_interval": 0.1}) as conn:
        channel = conn.channel()
        channel.basic_qos(0, 1, False)
        held: list[Message] = []

        def hold_for_eta(body: Any, message: Message) -> None:
            held.append(message)  # not acknowledged: due in the future
            channel.basic_qos(0, 1 + len(held), False)  # as Celery's increment_eventually

        Consumer(channel, [queue], callbacks=[hold_for_eta]).consume()
        deadline = time.monotonic() + 10
        while len(held) < 6 and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.5)
        assert [m.payload["n"] for m in held] == [0, 1, 2, 3, 4, 5]
        for message in held:
            message.ack()


def _counting_claims(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The queues of every claim the transport runs from now on."""
    claims: list[str] = []
    real_claim = transport.Channel._claim

    def counting(self: transport.Channel, queue: str, *args: Any, **kwargs: Any) -> Any:
        claims.append(queue)
        return real_claim(self, queue, *args, **kwargs)

    monkeypatch.setattr(transport.Channel, "_claim", counting)
    return claims


def test_a_queue_found_empty_is_claimed_from_again_only_when_a_notify_names_it(
    app_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wakes that bring nothing for a queue (acknowledgements on other channels, a
    NOTIFY for another queue) cost no claim on it; a NOTIFY naming it does, long
    before the next poll."""
    queue, other = new_queue(), new_queue()
    claims = _counting_claims(monkeypatch)
    options = {"polling_interval": 60}
    with Connection(app_broker, transport_options=options) as conn:
        got = _consume(conn, queue, prefetch=4)
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.5)
        assert claims == [queue.name]  # found empty once, then left alone
        with Connection(app_broker) as publisher:
            _publish(publisher, other, "t")  # a NOTIFY for another queue
            conn.transport.wake()  # as another channel's acknowledgement would
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0.5)
            assert claims == [queue.name]
            _publish(publisher, queue, "t")
            conn.drain_events(timeout=5)  # well before the 60 s poll
        assert [m.payload["n"] for m in got] == [0]
        assert claims == [queue.name, queue.name]
        got[0].ack()


def test_a_notify_read_before_the_wait_still_names_its_queue(app_broker: str) -> None:
    """A NOTIFY the listening connection has already read off its socket (libpq
    reads whatever arrived with any reply) is taken before the next wait, and
    still makes its queue claimable, long before the next poll."""
    queue = new_queue()
    with Connection(app_broker, transport_options={"polling_interval": 60}) as conn:
        got = _consume(conn, queue, prefetch=1)
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.5)  # empty: the queue is quiet now
        with Connection(app_broker) as publisher:
            _publish(publisher, queue, "t")
        pgconn = conn.transport._listener.pgconn
        readable, _, _ = select.select([pgconn.socket], [], [], 5)
        assert readable, "the NOTIFY never arrived"
        pgconn.consume_input()  # read off the socket, left in libpq's queue
        conn.drain_events(timeout=5)
        assert [m.payload["n"] for m in got] == [0]
        got[0].ack()


def test_a_released_message_wakes_a_consumer_that_found_its_queue_empty(
    app_broker: str,
) -> None:
    """A message given back (a reject with requeue, a warm shutdown's restore)
    sends a NOTIFY, so another worker takes it at once, not at its next poll."""
    queue = new_queue()
    options = {"polling_interval": 60, "visibility_timeout": 600}
    with Connection(app_broker, transport_options=options) as waiting:
        got = _consume(waiting, queue, prefetch=1)
        with pytest.raises(TimeoutError):
            waiting.drain_events(timeout=0.5)  # empty: the queue is quiet now
        with Connection(app_broker) as publisher:
            _publish(publisher, queue, "t")
        # The NOTIFY of the publish reached `waiting` too; take it out of play.
        with Connection(app_broker, transport_options=options) as holder:
            held = _claimed(holder, queue, prefetch=1, ack=False)
            assert len(held) == 1
            with pytest.raises(TimeoutError):
                waiting.drain_events(timeout=0.5)  # it was heard, and found leased
            assert got == []
            held[0].reject(requeue=True)
            waiting.drain_events(timeout=5)
        assert [m.payload["n"] for m in got] == [0]
        assert got[0].delivery_info["redelivered"]
        got[0].ack()


def test_in_a_worker_s_event_loop_it_claims_on_notify_and_deletes_acknowledged_rows(
    database: Database, app_broker: str
) -> None:
    """A worker runs the transport in kombu's hub (as it runs Redis's): a publish
    is delivered on its NOTIFY, an acknowledgement is deleted within moments by
    the hub's timer, and closing the connection leaves nothing in the hub."""
    from kombu.asynchronous import Hub  # noqa: PLC0415

    queue = new_queue()
    hub = Hub()
    options = {"polling_interval": 60}
    try:
        with Connection(app_broker, transport_options=options) as conn:
            assert conn.transport.implements.asynchronous
            got = _consume(conn, queue, prefetch=2)
            conn.transport.register_with_event_loop(conn.connection, hub)
            loop = hub.create_loop()

            def spin(until: Any, seconds: float = 5.0) -> None:
                deadline = time.monotonic() + seconds
                while not until():
                    assert time.monotonic() < deadline, "the hub did not get there"
                    next(loop)

            registered = set(hub.readers)
            assert registered  # the wake pipe and the LISTEN socket
            with Connection(app_broker) as publisher:
                _publish(publisher, queue, "t", 2)
            spin(lambda: len(got) == 2)  # on the NOTIFY, long before the 60 s poll
            assert [m.payload["n"] for m in got] == [0, 1]
            got[0].ack()
            got[1].ack()
            spin(lambda: _rows(database, queue) == [])
        assert not registered & set(hub.readers)  # unregistered at close
    finally:
        hub.close()
