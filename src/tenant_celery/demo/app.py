"""The Celery app ``tenant-celery demo`` runs: ``celery -A tenant_celery.demo.app worker``.

Configured from environment variables that :func:`tenant_celery.demo.run_demo`
sets for the worker subprocess (:data:`BROKER_URL_ENV`, :data:`BACKEND_URL_ENV`,
:data:`DATABASE_URL_ENV`); the demo's own process calls :func:`configure`
instead.  The one task, :data:`record`, is a tenant task that inserts a row
into :data:`demo_rows` through an engine bound with
:func:`~tenant_celery.bind_tenant_guc`, so row-level security decides what it
may write.

The demo's worker has nothing worth finishing when the demo stops it: on
``SIGTERM`` (or ``Ctrl-C``) it kills its pool's processes, reaps them and
exits at once, instead of Celery's warm shutdown, which waits up to three
seconds for the PostgreSQL transport's next poll and then for the pool.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

import sqlalchemy as sa
from billiard.pool import CLOSE
from celery import Celery
from celery.signals import worker_init, worker_shutting_down
from sqlalchemy.engine import Engine

import tenant_celery.monitor  # noqa: F401 (connects the worker monitor)
from tenant_celery import bind_tenant_guc, require_tenant, tenant_task
from tenant_celery.metrics import install_metrics

__all__ = [
    "BACKEND_URL_ENV",
    "BROKER_URL_ENV",
    "DATABASE_URL_ENV",
    "DEMO_TABLE",
    "QUEUE",
    "app",
    "configure",
    "demo_rows",
    "metadata",
    "record",
]

BROKER_URL_ENV = "TENANT_CELERY_DEMO_BROKER_URL"
"""Broker URL of the worker (``sqla+postgresql+psycopg://...``, the app role)."""
BACKEND_URL_ENV = "TENANT_CELERY_DEMO_BACKEND_URL"
"""Result backend URL of the worker (``db+postgresql+psycopg://...``, the app role)."""
DATABASE_URL_ENV = "TENANT_CELERY_DEMO_DATABASE_URL"
"""SQLAlchemy URL the tasks write through (the app role)."""

DEMO_TABLE = "demo_rows"
"""The tenant table the tasks write to."""
QUEUE = "tenant-celery-demo"
"""The queue the demo publishes to and the worker consumes."""

metadata = sa.MetaData()

demo_rows = sa.Table(
    DEMO_TABLE,
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("tenant_id", sa.Uuid(as_uuid=False), nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Index("demo_rows_tenant_idx", "tenant_id", "id"),
)

app = Celery("tenant_celery_demo")


def configure(broker_url: str, backend_url: str | None, database_url: str | None) -> None:
    """Point :data:`app` at a broker, a result backend and the database tasks write to."""
    app.conf.update(
        broker_url=broker_url,
        result_backend=backend_url,
        task_default_queue=QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        enable_utc=True,
        timezone="UTC",
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
    )
    _database.url = database_url
    _database.engine = None


class _Database:
    """The engine tasks write through: one per process, made on first use after a fork."""

    def __init__(self) -> None:
        self.url: str | None = None
        self.engine: Engine | None = None
        self.pid = 0
        self.lock = threading.Lock()

    def get(self) -> Engine:
        with self.lock:
            if self.engine is None or self.pid != os.getpid():
                if self.url is None:
                    raise RuntimeError(f"the demo app has no database: set {DATABASE_URL_ENV}")
                self.engine = sa.create_engine(self.url, pool_size=1, max_overflow=1)
                self.pid = os.getpid()
                bind_tenant_guc(self.engine, strict=True)
            return self.engine


_database = _Database()

configure(
    os.environ.get(BROKER_URL_ENV) or "memory://",
    os.environ.get(BACKEND_URL_ENV) or None,
    os.environ.get(DATABASE_URL_ENV) or None,
)
install_metrics(app, tenant_label=True)


@tenant_task(app=app, name="tenant_celery.demo.record")
def record(label: str) -> int:
    """Insert one row for the current tenant; return its id.

    The engine sets the tenant at the start of the transaction, and the
    table's policy checks the row against it.
    """
    with _database.get().begin() as conn:
        new_id = conn.execute(
            demo_rows.insert()
            .values(tenant_id=str(require_tenant()), label=label, pid=os.getpid())
            .returning(demo_rows.c.id)
        ).scalar_one()
    return int(new_id)


class _Running:
    """The worker this process runs, once ``worker_init`` named it."""

    worker: Any = None


@worker_init.connect(weak=False, dispatch_uid="tenant_celery.demo.app.remember")
def _remember_worker(sender: Any = None, **_: Any) -> None:
    _Running.worker = sender


@worker_shutting_down.connect(weak=False, dispatch_uid="tenant_celery.demo.app.exit")
def _exit_at_once(**_: Any) -> None:
    """Sent in the worker's main process when it is asked to stop: end the pool's
    processes, reap them (no process is left to anyone else), and exit."""
    pool = getattr(getattr(_Running.worker, "pool", None), "_pool", None)
    if pool is not None:
        with contextlib.suppress(AttributeError):
            pool._state = CLOSE  # start no process in place of the killed ones
    reaped: set[int] = set()
    while True:
        pids = [p.pid for p in list(getattr(pool, "_pool", ())) if p.pid and p.pid not in reaped]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        reaped.update(pids)
    os._exit(0)
