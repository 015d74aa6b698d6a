"""Auto-delete queues on the package's transport: delivered by ``NOTIFY``, never stored.

Celery's events (``celery events``, Flower), remote control and its replies
use auto-delete queues.  These tests drive kombu directly against a migrated
database, as ``app_user``: what such a queue receives is delivered without a
row in the message table (read as the superuser), a message too large for a
notification is stored and delivered all the same, an event nobody listens
for writes nothing, and a queue whose connection is gone is deleted with its
bindings and messages while a live one is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.message import Message

from tenant_celery import transport
from tests._rig.postgres import Database, libpq_kwargs
from tests._rig.worker import TRANSPORT_SCHEMA, transport_url

pytestmark = pytest.mark.worker

MESSAGE = f"{TRANSPORT_SCHEMA}.tenant_celery_message"
QUEUES = f"{TRANSPORT_SCHEMA}.tenant_celery_queue"
BINDINGS = f"{TRANSPORT_SCHEMA}.tenant_celery_binding"


@pytest.fixture
def url(database: Database) -> str:
    return transport_url(database, "app")


@contextlib.contextmanager
def superuser(database: Database) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(**libpq_kwargs(database.url), autocommit=True) as conn:
        yield conn


def stored(database: Database, queue: str) -> int:
    with superuser(database) as conn:
        row = conn.execute(f"SELECT count(*) FROM {MESSAGE} WHERE queue = %s", (queue,)).fetchone()
    assert row is not None
    return int(row[0])


def auto_delete_flag(database: Database, queue: str) -> bool | None:
    with superuser(database) as conn:
        row = conn.execute(f"SELECT auto_delete FROM {QUEUES} WHERE name = %s", (queue,)).fetchone()
    return None if row is None else bool(row[0])


def notify_channel_of(database: Database, queue: str) -> str | None:
    with superuser(database) as conn:
        row = conn.execute(
            f"SELECT notify_channel FROM {QUEUES} WHERE name = %s", (queue,)
        ).fetchone()
    assert row is not None, queue
    return None if row[0] is None else str(row[0])


def listening(conn: Connection, queue: Queue, *, no_ack: bool = True) -> list[Message]:
    """Declare ``queue`` and consume it on ``conn``; the list deliveries are added to."""
    got: list[Message] = []
    consumer = Consumer(
        conn.channel(),
        [queue],
        callbacks=[lambda body, message: got.append(message)],
        no_ack=no_ack,
    )
    consumer.consume()
    return got


def drain(conn: Connection, got: list[Message], count: int, timeout: float = 10.0) -> None:
    deadline = timeout
    while len(got) < count and deadline > 0:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.5)
        deadline -= 0.5


def event_queue(exchange: Exchange) -> Queue:
    return Queue(
        f"ev.{uuid.uuid4().hex[:8]}",
        exchange,
        routing_key="#",
        auto_delete=True,
        durable=False,
        message_ttl=5.0,
        expires=60.0,
    )


def test_messages_to_an_auto_delete_queue_are_notified_not_stored(
    url: str, database: Database
) -> None:
    exchange = Exchange(f"events.{uuid.uuid4().hex[:6]}", "topic", durable=False)
    queue = event_queue(exchange)
    with Connection(url) as listener, Connection(url) as publisher:
        got = listening(listener, queue)
        assert auto_delete_flag(database, queue.name) is True
        producer = Producer(publisher.default_channel, exchange=exchange)
        for index in range(50):
            producer.publish({"n": index}, routing_key=f"task.{index}", declare=[exchange])
        # Sent and not yet consumed: kept by the listening connection, not stored.
        assert stored(database, queue.name) == 0
        drain(listener, got, 50)
        assert [message.payload["n"] for message in got] == list(range(50))
        assert stored(database, queue.name) == 0
    # The channel's close deleted the queue and its binding.
    assert auto_delete_flag(database, queue.name) is None


def test_a_message_too_large_for_a_notification_is_stored_and_delivered(
    url: str, database: Database
) -> None:
    exchange = Exchange(f"events.{uuid.uuid4().hex[:6]}", "topic", durable=False)
    queue = event_queue(exchange)
    large = "x" * (transport._NOTIFY_LIMIT + 100)
    with Connection(url) as listener, Connection(url) as publisher:
        got = listening(listener, queue)
        producer = Producer(publisher.default_channel, exchange=exchange)
        producer.publish({"n": 0}, routing_key="task.small", declare=[exchange])
        producer.publish({"n": 1, "traceback": large}, routing_key="task.large")
        assert stored(database, queue.name) == 1
        drain(listener, got, 2)
        assert sorted(message.payload["n"] for message in got) == [0, 1]
        assert stored(database, queue.name) == 0  # taken (no_ack): deleted


def test_a_fanout_reaches_stored_and_notified_queues_once_each(
    url: str, database: Database
) -> None:
    exchange = Exchange(f"fan.{uuid.uuid4().hex[:6]}", "fanout", durable=False)
    notified = Queue(f"nq.{uuid.uuid4().hex[:6]}", exchange, auto_delete=True, durable=False)
    durable = Queue(f"dq.{uuid.uuid4().hex[:6]}", exchange)
    with Connection(url) as listener, Connection(url) as publisher:
        got_notified = listening(listener, notified)
        got_durable = listening(listener, durable, no_ack=False)
        Producer(publisher.default_channel, exchange=exchange).publish(
            {"hello": 1}, declare=[exchange]
        )
        assert stored(database, durable.name) == 1
        assert stored(database, notified.name) == 0
        drain(listener, got_notified, 1)
        drain(listener, got_durable, 1)
        assert [m.payload for m in got_notified] == [{"hello": 1}]
        assert [m.payload for m in got_durable] == [{"hello": 1}]
        got_durable[0].ack()
        got_notified[0].ack()  # a notified message has no row: acknowledging is a no-op
        got_durable[0].channel.flush_acks()  # deleted now, not with the next claim
        assert stored(database, durable.name) == 0
        with contextlib.suppress(TimeoutError):
            listener.drain_events(timeout=0.5)
        assert len(got_notified) == 1


def test_an_event_nobody_listens_for_writes_nothing(url: str, database: Database) -> None:
    exchange = Exchange(f"events.{uuid.uuid4().hex[:6]}", "topic", durable=False)
    with superuser(database) as conn:
        before = conn.execute(f"SELECT count(*) FROM {QUEUES}").fetchone()
    with Connection(url) as publisher:
        producer = Producer(publisher.default_channel, exchange=exchange)
        for index in range(20):
            producer.publish({"n": index}, routing_key="worker.heartbeat", declare=[exchange])
    with superuser(database) as conn:
        # No dead-letter queue declared, and no message stored, for events dropped.
        assert conn.execute(f"SELECT count(*) FROM {QUEUES}").fetchone() == before
        assert conn.execute(f"SELECT count(*) FROM {MESSAGE}").fetchone() == (0,)


def test_with_listen_off_auto_delete_queues_are_stored(database: Database) -> None:
    url = transport_url(database, "app")
    exchange = Exchange(f"events.{uuid.uuid4().hex[:6]}", "topic", durable=False)
    queue = event_queue(exchange)
    options = {"listen": False, "polling_interval": 0.1}
    with (
        Connection(url, transport_options=options) as listener,
        Connection(url, transport_options=options) as publisher,
    ):
        got = listening(listener, queue)
        assert notify_channel_of(database, queue.name) is None  # stored
        Producer(publisher.default_channel, exchange=exchange).publish(
            {"n": 1}, routing_key="task.x", declare=[exchange]
        )
        assert stored(database, queue.name) == 1
        drain(listener, got, 1)
        assert [m.payload for m in got] == [{"n": 1}]
    assert auto_delete_flag(database, queue.name) is None


def test_an_abandoned_auto_delete_queue_is_deleted_and_a_live_one_kept(
    url: str, database: Database
) -> None:
    dead = f"ev.dead.{uuid.uuid4().hex[:6]}"
    older = f"ev.older.{uuid.uuid4().hex[:6]}"
    with superuser(database) as conn:
        # What a process killed with SIGKILL leaves: its queue, binding and a message.
        conn.execute(
            f"INSERT INTO {QUEUES} (name, auto_delete, declared_at, notify_channel)"
            " VALUES (%s, true, now() - interval '61 seconds', 'tenant_celery_message.0ff')",
            (dead,),
        )
        # A queue of a process of an earlier version (no channel, never marked): kept.
        conn.execute(
            f"INSERT INTO {QUEUES} (name, auto_delete, declared_at)"
            " VALUES (%s, true, now() - interval '1 hour')",
            (older,),
        )
        conn.execute(
            f"INSERT INTO {BINDINGS} (exchange, routing_key, pattern, queue)"
            " VALUES ('celeryev', '#', '.*', %s)",
            (dead,),
        )
        conn.execute(
            f"INSERT INTO {MESSAGE} (queue, tenant, priority, payload) VALUES (%s, '', 0, '{{}}')",
            (dead,),
        )
    exchange = Exchange(f"events.{uuid.uuid4().hex[:6]}", "topic", durable=False)
    live = event_queue(exchange)
    with Connection(url) as consumer:
        listening(consumer, live)
        with contextlib.suppress(TimeoutError):
            consumer.drain_events(timeout=0.2)  # maintains: deletes what is abandoned
        assert auto_delete_flag(database, dead) is None
        assert auto_delete_flag(database, live.name) is True
        assert auto_delete_flag(database, older) is True
        with superuser(database) as conn:
            assert conn.execute(
                f"SELECT count(*) FROM {BINDINGS} WHERE queue = %s", (dead,)
            ).fetchone() == (0,)
        assert stored(database, dead) == 0


def test_a_live_queue_deleted_as_abandoned_is_declared_again_with_its_bindings(
    url: str, database: Database
) -> None:
    exchange = Exchange(f"events.{uuid.uuid4().hex[:6]}", "topic", durable=False)
    queue = event_queue(exchange)
    with Connection(url) as listener, Connection(url) as publisher:
        got = listening(listener, queue)
        with superuser(database) as conn:  # as a sweep would, after a long pause
            conn.execute(f"DELETE FROM {QUEUES} WHERE name = %s", (queue.name,))
            conn.execute(f"DELETE FROM {BINDINGS} WHERE queue = %s", (queue.name,))
        channels: list[Any] = list(listener.transport.channels)  # type: ignore[attr-defined]
        for channel in channels:
            channel._touch_queues()  # what the lease thread does every 15 s
        assert auto_delete_flag(database, queue.name) is True
        Producer(publisher.default_channel, exchange=exchange).publish(
            {"n": 1}, routing_key="task.x", declare=[exchange]
        )
        drain(listener, got, 1)
        assert [m.payload for m in got] == [{"n": 1}]


def test_a_role_without_the_tables_can_neither_hear_nor_send_on_a_queue_s_channel(
    url: str, database: Database
) -> None:
    """Any role that can connect may LISTEN and NOTIFY on any channel: the channel of
    an auto-delete queue is random and kept in the queue table, which such a role
    cannot read, so it can neither guess it nor forge a message (a remote-control
    command, a reply) into the queue."""
    exchange = Exchange(f"ctl.{uuid.uuid4().hex[:6]}", "fanout", durable=False)
    queue = Queue(f"w1.celery.pidbox.{uuid.uuid4().hex[:6]}", exchange, auto_delete=True)
    intruder = f"intruder_{uuid.uuid4().hex[:6]}"
    with superuser(database) as conn:
        conn.execute(f"CREATE ROLE {intruder} LOGIN")
    try:
        intruder_url = database.url.set(username=intruder, password=None)
        with Connection(url) as listener:
            got = listening(listener, queue)
            with superuser(database) as conn:
                row = conn.execute(
                    f"SELECT notify_channel FROM {QUEUES} WHERE name = %s", (queue.name,)
                ).fetchone()
            assert row is not None
            channel = str(row[0])
            assert queue.name not in channel  # nothing of the queue's name in it
            with psycopg.connect(**libpq_kwargs(intruder_url), autocommit=True) as attacker:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    attacker.execute(f"SELECT notify_channel FROM {QUEUES}")
                forged = '{"body": "e30=", "properties": {}, "headers": {}}'
                # Names an attacker could derive from the queue's (predictable) name.
                derived = [
                    hashlib.md5(f"{schema}\0{queue.name}".encode()).hexdigest()
                    for schema in ("", TRANSPORT_SCHEMA)
                ]
                for guess in (
                    transport.NOTIFY_CHANNEL,
                    queue.name,
                    f"{transport.NOTIFY_CHANNEL}.{queue.name}",
                    *(f"{transport.NOTIFY_CHANNEL}.{digest}" for digest in derived),
                ):
                    attacker.execute("SELECT pg_notify(%s, %s)", (guess, forged))
            with contextlib.suppress(TimeoutError):
                listener.drain_events(timeout=1.0)
            assert got == []
            # What a role with the tables sends is delivered: the channel works.
            with Connection(url) as publisher:
                Producer(publisher.default_channel, exchange=exchange).publish(
                    {"method": "ping"}, declare=[exchange]
                )
            drain(listener, got, 1)
            assert [m.payload for m in got] == [{"method": "ping"}]
    finally:
        with superuser(database) as conn:
            conn.execute(f"DROP ROLE {intruder}")


def test_messages_waiting_for_a_queue_nobody_consumes_do_not_spin_the_consumer(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A declared auto-delete queue that is not (or no longer) consumed keeps what it
    receives; the connection's wait still waits instead of looping over it."""
    exchange = Exchange(f"events.{uuid.uuid4().hex[:6]}", "topic", durable=False)
    idle = event_queue(exchange)
    consumed = event_queue(Exchange(f"other.{uuid.uuid4().hex[:6]}", "topic", durable=False))
    with Connection(url) as listener, Connection(url) as publisher:
        idle(listener.default_channel).declare()  # declared, never consumed
        listening(listener, consumed)
        Producer(publisher.default_channel, exchange=exchange).publish(
            {"n": 1}, routing_key="task.x", declare=[exchange]
        )
        channel_class = type(listener.default_channel)
        calls: list[int] = []
        get_many = channel_class._get_many

        def counted(self: Any, queues: Any, timeout: float | None = None) -> None:
            calls.append(1)
            return get_many(self, queues, timeout)

        monkeypatch.setattr(channel_class, "_get_many", counted)
        with contextlib.suppress(TimeoutError):
            listener.drain_events(timeout=2.0)
        # A poll a second (polling_interval), not a loop: a spin makes thousands.
        assert len(calls) < 20, len(calls)
        # The message waits for its queue's consumer, which still gets it.
        got: list[Message] = []
        Consumer(
            listener.default_channel,
            [idle],
            callbacks=[lambda body, message: got.append(message)],
            no_ack=True,
        ).consume()
        drain(listener, got, 1)
        assert [m.payload for m in got] == [{"n": 1}]


def test_a_publisher_declaring_the_queue_does_not_take_its_messages(
    url: str, database: Database
) -> None:
    """kombu declares an auto-delete queue at every publish: a publisher must leave
    the consumer's channel in place, or the messages would go to the publisher."""
    name = f"ad.{uuid.uuid4().hex[:6]}"
    queue = Queue(name, Exchange(name, "direct"), name, auto_delete=True)
    with Connection(url) as consumer, Connection(url) as publisher:
        got = listening(consumer, queue, no_ack=False)
        channel = notify_channel_of(database, name)
        assert channel is not None
        producer = Producer(publisher.default_channel)
        for index in range(20):
            producer.publish(
                {"n": index}, exchange=queue.exchange, routing_key=name, declare=[queue]
            )
        assert notify_channel_of(database, name) == channel
        drain(consumer, got, 20)
        assert sorted(m.payload["n"] for m in got) == list(range(20))
        for message in got:
            message.ack()


def test_basic_get_reads_what_was_notified(url: str) -> None:
    """A client that polls its queue (the rpc result backend's ``ready()``) without
    draining the connection gets what was sent to it by notification."""
    name = f"rpc.{uuid.uuid4().hex[:6]}"
    queue = Queue(name, Exchange("rpc-test", "direct"), name, auto_delete=True, durable=False)
    with Connection(url) as client, Connection(url) as worker:
        # Consumed: its messages now come by notification (as the rpc backend does,
        # on the connection's default channel, which its polling reads too).
        Consumer(client.default_channel, [queue], callbacks=[], no_ack=True).consume()
        Producer(worker.default_channel).publish(
            {"result": 42}, exchange=queue.exchange, routing_key=name, declare=[queue.exchange]
        )
        bound = queue(client.default_channel)
        message = None
        for _ in range(50):
            message = bound.get(no_ack=True)
            if message is not None:
                break
            time.sleep(0.05)
        assert message is not None
        assert message.payload == {"result": 42}


def test_in_the_event_loop_a_lost_listen_connection_is_replaced(url: str) -> None:
    """A worker's remote control hears only notifications: when its LISTEN connection
    is closed (a failed statement discards it, or the server ends it), the next poll
    listens again on every channel, and what is sent afterwards is delivered."""
    from kombu.asynchronous import Hub  # noqa: PLC0415

    exchange = Exchange(f"ctl.{uuid.uuid4().hex[:6]}", "fanout", durable=False)
    queue = Queue(f"w.celery.pidbox.{uuid.uuid4().hex[:6]}", exchange, auto_delete=True)
    hub = Hub()
    try:
        with Connection(url, transport_options={"polling_interval": 0.2}) as conn:
            got = listening(conn, queue)
            transport: Any = conn.transport
            transport.register_with_event_loop(conn.connection, hub)
            loop = hub.create_loop()

            def spin(until: Any, seconds: float = 10.0) -> None:
                deadline = time.monotonic() + seconds
                while not until():
                    assert time.monotonic() < deadline, "the hub did not get there"
                    next(loop)

            old = transport._listener
            old.close()  # as _discard() does after a failed statement
            spin(lambda: transport._watched_listener not in (None, old))
            with Connection(url) as publisher:
                Producer(publisher.default_channel, exchange=exchange).publish(
                    {"method": "ping"}, declare=[exchange]
                )
            spin(lambda: len(got) == 1)
            assert got[0].payload == {"method": "ping"}
    finally:
        hub.close()


# --- a listening connection nobody reads ------------------------------------------
#
# Every publish notifies each connection that listens.  A backend whose client does
# not read blocks once the socket is full, and keeps its snapshot while it waits:
# vacuum of every table in the database then removes nothing (the message table
# grows by its dead rows).  The flood below fills any loopback socket's buffers.


def _flood(database: Database, count: int = 3_000) -> None:
    """``count`` notifications of ~8 kB each on the transport's channel (~24 MB),
    sent by the superuser in one transaction."""
    with superuser(database) as conn:
        conn.execute(
            "SELECT pg_notify(%s, repeat('x', 7900) || i) FROM generate_series(1, %s) AS i",
            (transport.NOTIFY_CHANNEL, count),
        )


def _stalled(database: Database) -> list[tuple[int, str | None, str | None]]:
    """The transport's backends in this database that wait to write to their
    client, or hold a snapshot while idle (pid, wait event, backend_xmin)."""
    with superuser(database) as conn:
        rows = conn.execute(
            "SELECT pid, wait_event, backend_xmin::text FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()"
            " AND (wait_event = 'ClientWrite' OR (state = 'idle' AND backend_xmin IS NOT NULL))",
            (transport.APPLICATION_NAME,),
        ).fetchall()
    return [(int(row[0]), row[1], row[2]) for row in rows]


def _stalled_after_flood(database: Database, seconds: float = 15.0) -> list[Any]:
    """Flood, then what is still stalled after ``seconds`` (an empty list as soon as
    nothing is)."""
    _flood(database)
    deadline = time.monotonic() + seconds
    while (stalled := _stalled(database)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return stalled


def test_a_client_that_used_remote_control_does_not_stall_the_server(
    url: str, database: Database
) -> None:
    """``app.control.ping()`` consumes a reply queue; ``app.close()`` (Celery 5.5+)
    drops the connection pool without closing its connections.  The process must
    not be left listening with nobody reading."""
    from celery import Celery  # noqa: PLC0415

    app = Celery("stall", broker=url, set_as_current=False)
    assert app.control.ping(timeout=0.5) == []  # no worker: the replies wait in vain
    app.close()
    assert _stalled_after_flood(database) == []


def test_a_consumer_that_stops_draining_does_not_stall_the_server(
    url: str, database: Database
) -> None:
    """A consumer between two waits (an ``rpc://`` result consumer between two
    ``get()`` calls, a solo worker running a long task) is read by the lease
    thread; and it is still told of new messages afterwards."""
    name = f"q.{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, "direct"), name)
    with Connection(url, transport_options={"polling_interval": 30}) as conn:
        got = listening(conn, queue, no_ack=False)
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=1.0)  # waits on LISTEN once, then not again
        assert cast(Any, conn.transport)._listener is not None
        assert _stalled_after_flood(database) == []
        with Connection(url) as publisher:
            Producer(publisher.default_channel).publish(
                {"after": True}, exchange=queue.exchange, routing_key=queue.routing_key
            )
        # Delivered on its notification, well inside the 30 s polling interval.
        started = time.monotonic()
        drain(conn, got, 1, timeout=5.0)
        assert [message.payload for message in got] == [{"after": True}]
        assert time.monotonic() - started < 5.0
        got[0].ack()


def test_a_cancelled_consumer_stops_listening_and_a_new_one_listens_again(url: str) -> None:
    """The listening connection lives while something consumes: closed when the
    last consumer is cancelled, opened again by the next."""
    name = f"q.{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, "direct"), name)
    with Connection(url, transport_options={"polling_interval": 30}) as conn:
        got: list[Message] = []
        consumer = Consumer(conn.channel(), [queue], callbacks=[lambda _b, m: got.append(m)])
        consumer.consume()
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=1.0)
        transport_: Any = conn.transport
        assert transport_._listener is not None
        consumer.cancel()
        assert transport_._listener is None
        consumer.consume()
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=1.0)
        assert transport_._listener is not None
        with Connection(url) as publisher:
            Producer(publisher.default_channel).publish(
                {"again": True}, exchange=queue.exchange, routing_key=queue.routing_key
            )
        drain(conn, got, 1, timeout=5.0)
        assert [message.payload for message in got] == [{"again": True}]
        got[0].ack()
