"""docs/howto/postgres-broker.md: Celery on PostgreSQL alone, with the package's transport.

The page's migration runs on a scratch database; a real ``celery -A billing
worker`` runs ``examples/postgres_broker`` as written (only the database URL
points at the scratch database, as ``app_user``) and its tenant tasks, results
and remote control are checked; the ``broker_transport`` form makes a round
trip; the settings that keep a pool process free for other tenants are read by
the transport; the PgBouncer options run a real worker through a private PgBouncer in
transaction mode; the monitoring query runs as ``app_user`` on a backlog of two
tenants, before and after a fair claim.  The options table is compared with the
transport's own table and with the values the transport takes when no option is
given.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from celery import chain
from kombu import Connection, Consumer, Exchange, Queue
from kombu.utils.functional import fxrange

import tenant_celery.transport
from tenant_celery import DEFAULT_HEADER, tenant_context
from tenant_celery.results import dispose_engines
from tenant_celery.transport import BINDING_TABLE, MESSAGE_TABLE, QUEUE_TABLE, Transport
from tests._rig.pgbouncer import run_pgbouncer
from tests._rig.postgres import APP_ROLE, Database, render
from tests._rig.worker import ROOT, WorkerFactory, WorkerHandle, rebind_app
from tests.docs.blocks import DOCS, Block
from tests.docs.harness import PageRun, Substitutions, commands
from tests.docs.scratch import libpq
from tests.integration import brokers_app

pytestmark = pytest.mark.worker

PAGE = "howto/postgres-broker.md"
EXAMPLE = ROOT / "examples" / "postgres_broker"
EXAMPLE_MODULES = ("billing", "celeryconfig")
TENANT_A = "6f1c1d52-1f0e-4c39-9a43-5b1f0c1e2a01"
TENANT_B = "0d5b7f7e-3c7a-4d0b-8c55-2a9e4b6f1c02"
BACKLOG_QUEUE = "billing.backlog"
RIGHTS = "SELECT, INSERT, UPDATE, DELETE"

PRELUDE = """
from celery import Celery

app = Celery("shop", set_as_current=False)
"""


def example_config() -> dict[str, Any]:
    """The example's settings module, executed as a worker would import it."""
    config: dict[str, Any] = {}
    source = (EXAMPLE / "celeryconfig.py").read_text()
    exec(compile(source, "celeryconfig.py", "exec"), config)
    return config


def messages(database: Database, queue: str | None = None) -> int:
    """Rows in the transport's message table (of one queue, when given)."""
    where = "" if queue is None else " WHERE queue = :queue"
    with database.admin_engine().connect() as conn:
        statement = sa.text(f"SELECT count(*) FROM public.{MESSAGE_TABLE}{where}")
        return int(conn.execute(statement, {"queue": queue}).scalar_one())


def wait_for_no_messages(database: Database, queue: str, timeout: float = 15.0) -> int:
    """Wait until ``queue`` has no rows left (acknowledged messages are deleted)."""
    deadline = time.monotonic() + timeout
    while (left := messages(database, queue)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def billing(monkeypatch: pytest.MonkeyPatch, database: Database) -> Iterator[ModuleType]:
    """The example's app module, imported in this process as its producers import it."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("BILLING_DATABASE_URL", render(database.app_url))
    for name in EXAMPLE_MODULES:
        sys.modules.pop(name, None)
    module = importlib.import_module("billing")
    yield module
    module.app.close()
    dispose_engines()
    for name in EXAMPLE_MODULES:
        sys.modules.pop(name, None)


def test_page(
    tmp_path: Path, database: Database, start_worker: WorkerFactory, billing: ModuleType
) -> None:
    subs = Substitutions()
    subs.add("postgresql://migrator:secret@db/shop", libpq(database.url))
    subs.add("postgresql+psycopg://app_user:secret@db/shop", render(database.app_url))
    subs.add("postgresql://app_user:secret@db/shop", libpq(database.app_url))
    run = PageRun(PAGE, tmp_path, prelude=PRELUDE, substitutions=subs)

    @run.on("python", "upgrade(")
    def migrate(block: Block) -> None:
        run.exec(block)
        with database.admin_engine().connect() as conn:
            for table in (QUEUE_TABLE, BINDING_TABLE, MESSAGE_TABLE, "celery_taskmeta"):
                granted = conn.execute(
                    sa.text("SELECT has_table_privilege(:role, :table, :rights)"),
                    {"role": APP_ROLE, "table": f"public.{table}", "rights": RIGHTS},
                ).scalar_one()
                assert granted, f"{APP_ROLE} cannot use {table}"

    @run.on("console", "celery -A billing worker")
    def worker(block: Block) -> None:
        handle: WorkerHandle | None = None
        for command in commands(block):
            if command.text.startswith("export "):
                run.shell.run_command(command)
                continue
            words = shlex.split(subs.apply(command.text))
            assert words[:4] == ["celery", "-A", "billing", "worker"], command
            handle = start_worker(
                "billing",
                broker="tcpg",  # the example names its own broker: the rig's URL is unused
                extra_env={
                    "PYTHONPATH": f"{EXAMPLE}{os.pathsep}{ROOT}",
                    "BILLING_DATABASE_URL": run.shell.env["BILLING_DATABASE_URL"],
                },
                extra_args=words[4:],
            )
        assert handle is not None, f"{block}: no worker command"
        assert run.shell.env["BILLING_DATABASE_URL"] == render(database.app_url)
        run_billing(billing, handle, database)

    @run.on("python", "broker_transport=")
    def transport_by_class(block: Block) -> None:
        run.exec(block)
        app = run.namespace["app"]
        with app.connection_for_write() as connection:
            assert isinstance(connection.transport, Transport)
            queue = connection.SimpleQueue("docs.broker_transport")
            try:
                queue.put({"ping": 1})
                message = queue.get(timeout=5)
                assert message.payload == {"ping": 1}
                message.ack()
            finally:
                queue.close()
        assert messages(database, "docs.broker_transport") == 0

    @run.on("python", "worker_prefetch_multiplier = 1")
    def keep_room_for_other_tenants(block: Block) -> None:
        namespace: dict[str, Any] = {"__name__": "fair_settings"}
        run.exec(block, namespace)
        assert namespace["task_acks_late"] is True
        assert namespace["worker_prefetch_multiplier"] == 1
        settings = tenant_celery.transport._Settings(namespace["broker_transport_options"])
        assert settings.tenant_inflight_limit == 1

    @run.on("python", '"listen": False')
    def behind_pgbouncer(block: Block) -> None:
        namespace: dict[str, Any] = {"__name__": "pgbouncer_settings"}
        run.exec(block, namespace)
        options = namespace["broker_transport_options"]
        assert options["listen"] is False
        assert options["prepare"] is False
        (tmp_path / "pgbouncer_settings.py").write_text(run.source(block))
        run_through_pgbouncer(tmp_path, database, start_worker, options)

    @run.on("python", "task_publish_retry_policy")
    def publish_retries_outlast_a_restart(block: Block) -> None:
        run.exec(block)
        policy = run.namespace["app"].conf.task_publish_retry_policy
        # What kombu sleeps between attempts (kombu.utils.functional.retry_over_time).
        waits = itertools.islice(
            (
                min(value, float(policy["interval_max"]))
                for value in fxrange(
                    policy["interval_start"],
                    policy["interval_max"] + policy["interval_start"],
                    policy["interval_step"],
                    repeatlast=True,
                )
            ),
            policy["max_retries"],
        )
        assert sum(waits) >= 20  # Celery's default gives up after about a second
        # opening the connection a retry publishes on: kombu's own limit, 4 s by default
        assert run.namespace["app"].conf.broker_connection_timeout >= 20

    @run.on("sql", "FROM tenant_celery_message")
    def backlog(block: Block) -> None:
        check_backlog(run.source(block), database)

    run.run()


# ------------------------------------------------------------------ the example's worker


def run_billing(billing: ModuleType, handle: WorkerHandle, database: Database) -> None:
    """Tenant tasks of two tenants through the example's worker: each runs in its
    tenant, results come back, acknowledged messages are gone, and the worker answers
    remote control with the example's own settings."""
    app = billing.app
    rebind_app(app, {"task_default_queue": handle.queue})
    assert app.conf.broker_url == "tcpg+" + render(database.app_url)
    results = []
    for tenant in (TENANT_A, TENANT_B):
        with tenant_context(tenant):
            results += [(tenant, n, billing.send_invoice.delay(n)) for n in range(5)]
    for tenant, n, result in results:
        assert result.get(timeout=30) == f"invoice {n} sent for tenant {tenant}"
    with tenant_context(TENANT_B):
        # The worker sends the chain's second task: to its queue, not the app's default.
        second = billing.send_invoice.si(8).set(queue=handle.queue)
        both = chain(billing.send_invoice.si(7), second).delay()
        assert both.get(timeout=30) == f"invoice 8 sent for tenant {TENANT_B}"
    assert wait_for_no_messages(database, handle.queue) == 0, "acknowledged rows were kept"

    replies = app.control.inspect(timeout=5).conf(with_defaults=False) or {}
    mine = [conf for node, conf in replies.items() if node.startswith(f"{handle.name}@")]
    assert mine, f"no reply to remote control over the transport: {replies}"
    (conf,) = mine
    config = example_config()
    assert conf["broker_transport_options"] == config["broker_transport_options"]
    assert conf["task_acks_late"] is True
    assert conf["result_backend"] == config["result_backend"]


# ------------------------------------------------------------------------- PgBouncer


def run_through_pgbouncer(
    project: Path, database: Database, start_worker: WorkerFactory, options: dict[str, Any]
) -> None:
    """A real worker whose broker is reached only through PgBouncer in transaction mode
    (one server connection for every client), with the page's options."""
    with run_pgbouncer(database, pool_size=1) as bouncer:
        broker_url = "tcpg+" + render(bouncer.url())
        handle = start_worker(
            "tests.integration.brokers_app",
            broker="tcpg",
            database_role="app",
            extra_env={
                "PYTHONPATH": f"{project}{os.pathsep}{ROOT}",
                brokers_app.SETTINGS_ENV: "pgbouncer_settings",
                "TC_TEST_BROKER_URL": broker_url,
            },
        )
        changes = {**handle.client_conf(), "broker_url": broker_url}
        changes["broker_transport_options"] = options
        app = brokers_app.app
        previous = {key: app.conf.get(key) for key in changes}
        rebind_app(app, changes)
        try:
            with tenant_context(TENANT_A):
                seen = [brokers_app.where_am_i.delay() for _ in range(10)]
                last = chain(brokers_app.where_am_i.si(), brokers_app.where_am_i.si()).delay()
                answers = [result.get(timeout=30) for result in seen] + [last.get(timeout=30)]
        finally:
            rebind_app(app, previous)
        handle.stop()
    for answer in answers:
        assert answer["tenant"] == TENANT_A
        assert answer["transport"] == "tcpg"
        assert answer["broker_transport_options"] == options
    assert "ERROR" not in handle.log_text(), handle.log_tail()


# ------------------------------------------------------------------------ monitoring


def publish_backlog(url: str, tenants: dict[str, int]) -> None:
    """Queue messages of each tenant on :data:`BACKLOG_QUEUE`, which no worker consumes."""
    queue = Queue(BACKLOG_QUEUE, Exchange(BACKLOG_QUEUE, "direct"), BACKLOG_QUEUE)
    with Connection(url) as connection:
        producer = connection.Producer()
        for tenant, count in tenants.items():
            for n in range(count):
                producer.publish(
                    {"n": n},
                    exchange=queue.exchange,
                    routing_key=BACKLOG_QUEUE,
                    declare=[queue],
                    headers={DEFAULT_HEADER: tenant},
                )


def backlog_rows(query: str, database: Database) -> list[tuple[Any, ...]]:
    with psycopg.connect(libpq(database.app_url)) as conn:
        rows = conn.execute(query.encode()).fetchall()
    return [tuple(row) for row in rows if row[0] == BACKLOG_QUEUE]


def check_backlog(query: str, database: Database) -> None:
    """The page's query, as ``app_user``, on a backlog of ten messages of one tenant
    and one of another; then after one claim of two messages, which takes one of each."""
    url = "tcpg+" + libpq(database.app_url)
    publish_backlog(url, {TENANT_A: 10, TENANT_B: 1})
    assert backlog_rows(query, database) == [
        (BACKLOG_QUEUE, TENANT_A, 10, 0),
        (BACKLOG_QUEUE, TENANT_B, 1, 0),
    ]

    claimed: list[str] = []
    with Connection(url) as connection:
        channel: Any = connection.channel()
        channel.basic_qos(prefetch_count=2)

        def claim(body: Any, message: Any) -> None:
            claimed.append(message.headers[DEFAULT_HEADER])

        with Consumer(channel, [Queue(BACKLOG_QUEUE)], callbacks=[claim]):
            connection.drain_events(timeout=5)
        assert sorted(claimed) == sorted([TENANT_A, TENANT_B]), claimed
        assert backlog_rows(query, database) == [
            (BACKLOG_QUEUE, TENANT_A, 9, 1),
            (BACKLOG_QUEUE, TENANT_B, 0, 1),
        ]
    # Closing the connection released the two claims: both are ready again.
    assert backlog_rows(query, database) == [
        (BACKLOG_QUEUE, TENANT_A, 10, 0),
        (BACKLOG_QUEUE, TENANT_B, 1, 0),
    ]


# --------------------------------------------------------------------- options table


def page_options() -> dict[str, tuple[str, str]]:
    """Option -> (default, meaning) from the page's transport options table."""
    text = (DOCS / PAGE).read_text()
    section = text.split("### Transport options", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| (.+?) \|$", section, re.M)
    return {name: (default, meaning) for name, default, meaning in rows}


def code_options() -> dict[str, str]:
    """Option -> default from the table in ``tenant_celery.transport``'s docstring."""
    doc = tenant_celery.transport.__doc__ or ""
    return dict(re.findall(r"^``(\w+)``\s+(``[^`]+``|app setting)\s", doc, re.M))


def test_options_table_lists_every_option_with_its_default() -> None:
    documented = page_options()
    in_code = code_options()
    assert set(documented) == set(in_code), set(documented) ^ set(in_code)
    defaults = tenant_celery.transport._Settings({})
    for name, (default, _meaning) in documented.items():
        if in_code[name] == "app setting":
            assert default == "the app's `tenant_celery_header`"
            assert defaults.tenant_header == DEFAULT_HEADER
            continue
        assert default == in_code[name].replace("``", "`"), name
        value = ast.literal_eval(default.strip("`"))
        assert getattr(defaults, name) == value, name


def test_example_settings_are_the_ones_the_page_describes() -> None:
    config = example_config()
    assert config["broker_url"].startswith("tcpg+postgresql+psycopg://")
    assert config["database_url"] == config["broker_url"].removeprefix("tcpg+")
    assert config["result_backend"] == "tenant_celery.results:PooledDatabaseBackend"
    assert set(config["broker_transport_options"]) <= set(code_options())
    options = config["broker_transport_options"]
    settings = tenant_celery.transport._Settings(options)
    assert settings.tenant_inflight_limit == options["tenant_inflight_limit"]
    assert config["task_acks_late"] is True
