"""docs/howto/operate-tenants.md: one tenant's work operated while a consumer holds some.

The page's migration runs on a scratch database, granting ``app_user``, whose
broker URL every command and example then uses.  Before the first ``inspect``,
a kombu consumer (as a worker claims) takes four of the flooding tenant's
messages and a delayed one of each tenant, and holds them to the end; then the
backlog is published and three results of the flooding tenant and one of the
other are stored.  Every ``tenant-celery tenants`` command runs as written and
its output is compared with the page's; the refusal's exit code and standard
error too.  The Python examples run in the page's namespace, and what each
command and example did is read back from the tables.
"""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.message import Message

from tenant_celery import tenants
from tenant_celery.transport import CONTROL_TABLE, MESSAGE_TABLE
from tests._rig.postgres import APP_ROLE, Database
from tests.docs.blocks import Block
from tests.docs.harness import PageRun, Substitutions, assert_output, commands
from tests.docs.scratch import libpq

PAGE = "howto/operate-tenants.md"
FLOODING = "6f1c1d52-1f0e-4c39-9a43-5b1f0c1e2a01"
OTHER = "0d5b7f7e-3c7a-4d0b-8c55-2a9e4b6f1c02"
QUEUE = "celery"  # Celery's default queue, exchange and routing key
BACKLOG = 1200
ETA = "2099-01-01T00:00:00.000000+00:00"


def publish(conn: Connection, tenant: str, count: int, **headers: str) -> list[str]:
    """Publish ``count`` messages of ``tenant`` to :data:`QUEUE`; return their task ids."""
    queue = Queue(QUEUE, Exchange(QUEUE, "direct"), QUEUE)
    producer = Producer(conn.default_channel)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    for task_id in ids:
        producer.publish(
            {}, exchange=queue.exchange, routing_key=QUEUE, declare=[queue],
            headers={"tenant_id": tenant, "id": task_id, **headers},
        )  # fmt: skip
    return ids


@contextlib.contextmanager
def holding_consumer(broker: str) -> Iterator[list[Message]]:
    """A consumer that claims four of the flooding tenant's messages and a delayed one
    of each tenant, and holds them (unacknowledged, leases renewed) until the end."""
    with Connection(broker) as conn:
        publish(conn, FLOODING, 4)
        publish(conn, FLOODING, 1, eta=ETA)
        publish(conn, OTHER, 1, eta=ETA)
        held: list[Message] = []
        channel = conn.channel()
        channel.basic_qos(0, 10, False)
        queue = Queue(QUEUE, Exchange(QUEUE, "direct"), QUEUE)
        Consumer(channel, [queue], callbacks=[lambda body, message: held.append(message)]).consume()
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=1.0)
        assert len(held) == 6, held
        yield held


def store_results(database: Database) -> None:
    """Three stored results of the flooding tenant and one of the other."""
    with database.admin_engine().begin() as conn:
        for tenant in (FLOODING, FLOODING, FLOODING, OTHER):
            conn.execute(
                sa.text(
                    "INSERT INTO public.celery_taskmeta (id, task_id, status, tenant_id)"
                    " VALUES (nextval('public.task_id_sequence'), :task_id, 'SUCCESS', :tenant)"
                ),
                {"task_id": str(uuid.uuid4()), "tenant": tenant},
            )


def count(database: Database, query: str, **params: str) -> int:
    with database.admin_engine().connect() as conn:
        return int(conn.execute(sa.text(query), params).scalar_one())


def messages_of(database: Database, tenant: str) -> int:
    return count(
        database, f"SELECT count(*) FROM public.{MESSAGE_TABLE} WHERE tenant = :t", t=tenant
    )


def controls(database: Database) -> int:
    return count(database, f"SELECT count(*) FROM public.{CONTROL_TABLE}")


def test_page(tmp_path: Path, database: Database) -> None:
    subs = Substitutions()
    subs.add("postgresql://migrator:secret@db/shop", libpq(database.url))
    # Also the broker URL: tcpg+postgresql://app_user:secret@db/shop.
    subs.add("postgresql://app_user:secret@db/shop", libpq(database.app_url))
    run = PageRun(PAGE, tmp_path, substitutions=subs)
    broker = "tcpg+" + libpq(database.app_url)
    held: list[Message] = []

    def in_flight() -> set[str]:
        """Task ids of the flooding tenant's messages the consumer holds, not delayed."""
        return {
            m.headers["id"]
            for m in held
            if m.headers.get("tenant_id") == FLOODING and "eta" not in m.headers
        }

    def python(block: Block) -> str:
        """Run a python block in the page's namespace; return what it printed."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run.exec(block)
        return out.getvalue()

    @run.on("python", "upgrade(")
    def migrate(block: Block) -> None:
        run.exec(block)
        granted = count(
            database,
            "SELECT has_table_privilege(:role, :table, 'SELECT, INSERT, UPDATE, DELETE')::int",
            role=APP_ROLE,
            table=f"public.{CONTROL_TABLE}",
        )
        assert granted, f"{APP_ROLE} may not use {CONTROL_TABLE}"

    @run.on("console", "--broker redis://")
    def refused(block: Block) -> None:
        [command] = commands(block)
        done = run.shell.execute(subs.apply(command.text))
        assert (done.returncode, done.stdout) == (2, ""), done
        assert_output(command.expected, done.stderr, command)

    with contextlib.ExitStack() as stack:

        @run.on("console", "export CELERY_BROKER_URL=")
        def inspect(block: Block) -> None:
            held.extend(stack.enter_context(holding_consumer(broker)))
            with Connection(broker) as conn:
                publish(conn, FLOODING, BACKLOG)
                publish(conn, OTHER, 3)
            store_results(database)
            run.shell.run_block(block)

        @run.on("python", "tenants.inspect(app")
        def inspect_in_python(block: Block) -> None:
            assert python(block) == f"{QUEUE} {BACKLOG} 4 1 False\n"

        @run.on("console", "tenants resume")
        def resume(block: Block) -> None:
            listed = {(e.queue, e.paused) for e in tenants.inspect(broker, tenant=FLOODING)}
            assert listed == {("*", True), (QUEUE, True)}, listed  # the page's pause
            run.shell.run_block(block)
            assert controls(database) == 0

        @run.on("python", "migrate the tenant's data")
        def pause_in_python(block: Block) -> None:
            assert python(block) == "[]\n"
            assert controls(database) == 0

        @run.on("console", "--rate 20")
        def rate_limit(block: Block) -> None:
            run.shell.run_block(block)
            assert controls(database) == 0  # --off removed the row

        @run.on("python", "rate=20, burst=60")
        def rate_limit_in_python(block: Block) -> None:
            run.exec(block)
            assert controls(database) == 0

        @run.on("console", "tenants purge")
        def purge(block: Block) -> None:
            run.shell.run_block(block)
            _, done = run.shell.history[-1]
            listed = done.stdout.split("left to finish (4): ", 1)[1].strip().split(", ")
            assert set(listed) == in_flight()
            assert messages_of(database, FLOODING) == 4  # in flight, left to finish
            assert messages_of(database, OTHER) == 4  # 3 ready and 1 delayed, untouched
            results = "SELECT count(*) FROM public.celery_taskmeta WHERE tenant_id = :t"
            assert count(database, results, t=FLOODING) == 0
            assert count(database, results, t=OTHER) == 1

        @run.on("python", "tenants.purge(app")
        def purge_in_python(block: Block) -> None:
            assert python(block) == "0 0 4 0\n"  # purged already; 4 still in flight
            assert set(run.namespace["purged"].left_in_flight) == in_flight()
            assert controls(database) == 0  # the resume removed the pause

        run.run()
