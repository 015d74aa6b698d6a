"""Tenant tasks the fault scenarios of :mod:`reliability.faults` run in real workers.

Every run of a task body leaves rows in ``fault_runs``, an RLS-protected
table written as the unprivileged ``app_user`` through ``bind_tenant_guc``:
``started`` when the body begins, ``done`` when it ends, each with the task
id, the retry number, the worker process and database backend that ran it,
and the tenant setting the transaction saw.  The row policy refuses a row
whose tenant is not the transaction's, so a ``done`` row under the tenant a
task was published for proves the body ran as that tenant.  The scenario
(superuser, past RLS) reads the table to count executions, redeliveries and
duplicates; nothing is read from the result backend.

Configuration, besides the rig's ``TC_TEST_*`` variables (:mod:`tests._rig.appconf`):

``TC_FAULTS_VISIBILITY_TIMEOUT``
    seconds after which a Redis broker hands an unacknowledged message to
    another consumer (kombu's ``visibility_timeout``; an hour unless set).
    When set, the worker also sweeps for such messages every second rather
    than every hundred: a killed worker's messages come back promptly.
"""

from __future__ import annotations

import os
import time
from typing import Any

import sqlalchemy as sa
from celery import Celery, Task
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from tenant_celery import bind_tenant_guc, current_tenant, tenant_task
from tenant_celery.config import DEFAULT_GUC
from tenant_celery.rls import enable_tenant_rls, grant_tenant_tables
from tests._rig.appconf import BASE_CONFIG, apply_test_config, database_url

VISIBILITY_TIMEOUT_ENV = "TC_FAULTS_VISIBILITY_TIMEOUT"
PUBLISH_RETRY_POLICY = {
    "max_retries": 30,
    "interval_start": 0.2,
    "interval_step": 0.2,
    "interval_max": 1.0,
}
RUNS_TABLE = "fault_runs"
#: Task names, for publishing by name (``send_task``) from a client app.
RECORD = "faults.record"
HOLD_CONNECTION = "faults.hold_connection"

RUNS_DDL = f"""
CREATE TABLE {RUNS_TABLE} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id uuid NOT NULL,
    task_id text NOT NULL,
    phase text NOT NULL CHECK (phase IN ('started', 'done')),
    attempt integer NOT NULL,
    worker_pid integer NOT NULL,
    backend_pid integer NOT NULL,
    guc_tenant text,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX {RUNS_TABLE}_tenant ON {RUNS_TABLE} (tenant_id, task_id);
"""


def create_runs_table(conn: Connection, app_role: str) -> None:
    """Create ``fault_runs`` under the package's tenant policy, granted to ``app_role``.

    Does nothing when the table exists.  Run it as the table's owner (a superuser).
    """
    exists = conn.execute(sa.text("SELECT to_regclass(:t)"), {"t": RUNS_TABLE}).scalar()
    if exists is not None:
        return
    conn.execute(sa.text(RUNS_DDL))
    enable_tenant_rls(conn, RUNS_TABLE)
    grant_tenant_tables(conn, app_role, [RUNS_TABLE])


def broker_options(broker_url: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``broker_transport_options`` for ``broker_url``: Redis and the package's
    transport only (the kombu SQLAlchemy transport would pass them to ``create_engine``)."""
    environ = dict(os.environ) if environ is None else environ
    visibility = environ.get(VISIBILITY_TIMEOUT_ENV)
    if not visibility:
        return {}
    if broker_url.startswith("tcpg+"):
        return {"visibility_timeout": float(visibility)}
    if not broker_url.startswith("redis"):
        return {}
    return {
        "visibility_timeout": float(visibility),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }


def client(broker_url: str, queue: str) -> Celery:
    """An app that publishes to ``queue`` on ``broker_url`` (tasks sent by name)."""
    publisher = Celery("faults_client", set_as_current=False)
    publisher.conf.update(BASE_CONFIG)
    publisher.conf.update(broker_url=broker_url, task_default_queue=queue, result_backend=None)
    return publisher


app = apply_test_config(Celery("faults_app"))
app.conf.worker_prefetch_multiplier = 1
app.conf.broker_transport_options = broker_options(str(app.conf.broker_url))
# A retry is a new message: when the broker is down (on the package's transport, the
# database itself) Celery rejects the task without requeue once publishing it has
# failed, so its publishing must outlast a restart (about 28 s here, not Celery's 1 s).
app.conf.task_publish_retry_policy = PUBLISH_RETRY_POLICY
# Publishing a retry from a pool process may first open a broker connection, which
# kombu gives up on after broker_connection_timeout (4 s by default) whatever the
# policy says: with the database out of connections that lost tasks.
app.conf.broker_connection_timeout = 30

_engine: Engine | None = None


def engine() -> Engine:
    """This process's engine, as ``app_user``, with the tenant setting bound."""
    global _engine  # noqa: PLW0603 (one engine per worker process, made after the fork)
    if _engine is None:
        made = sa.create_engine(
            database_url(app_role=True),
            pool_size=2,
            max_overflow=0,
            pool_timeout=10,
            connect_args={"connect_timeout": 3},
        )
        bind_tenant_guc(made)
        _engine = made
    return _engine


_INSERT_RUN = sa.text(
    f"INSERT INTO {RUNS_TABLE}"
    " (tenant_id, task_id, phase, attempt, worker_pid, backend_pid, guc_tenant)"
    " VALUES (:tenant, :task_id, :phase, :attempt, :pid, pg_backend_pid(),"
    "  current_setting(:guc, true))"
    " RETURNING backend_pid, guc_tenant"
)


def _record_run(conn: Connection, task: Task[Any, Any], phase: str) -> dict[str, Any]:
    backend, guc = conn.execute(
        _INSERT_RUN,
        {
            "tenant": current_tenant(),
            "task_id": task.request.id,
            "phase": phase,
            "attempt": task.request.retries,
            "pid": os.getpid(),
            "guc": DEFAULT_GUC,
        },
    ).one()
    return {
        "task_id": task.request.id,
        "tenant": current_tenant(),
        "guc_tenant": guc,
        "attempt": task.request.retries,
        "worker_pid": os.getpid(),
        "backend_pid": backend,
    }


@tenant_task(app=app, name=RECORD, bind=True, acks_late=True)
def record(self: Task[Any, Any], hold: float = 0.0) -> dict[str, Any]:
    """Record ``started`` (committed), wait ``hold`` seconds, record ``done``.

    Acknowledged late: a worker killed during the wait leaves the message to
    be delivered again.  A database that cannot be reached, or a connection
    lost under a statement (a server restart reports it as a
    ``DatabaseError`` SQLAlchemy marks ``connection_invalidated``), is
    retried every second for a minute.
    """
    try:
        with engine().begin() as conn:
            _record_run(conn, self, "started")
        time.sleep(hold)
        with engine().begin() as conn:
            return _record_run(conn, self, "done")
    except DBAPIError as exc:
        if isinstance(exc, OperationalError) or exc.connection_invalidated:
            raise self.retry(exc=exc, countdown=1, max_retries=60) from exc
        raise


@tenant_task(
    app=app,
    name=HOLD_CONNECTION,
    bind=True,
    autoretry_for=(OperationalError,),
    retry_backoff=False,
    retry_kwargs={"countdown": 0.5, "max_retries": 3},
)
def hold_connection(self: Task[Any, Any], marker: str, hold: float) -> dict[str, Any]:
    """Open a transaction named ``marker`` (its ``application_name``) and, on the
    first attempt only, sleep ``hold`` seconds in it, then record ``done`` in it.

    A scenario finds the backend by that name and terminates it during the
    sleep: the statement fails with ``OperationalError`` and the task is
    retried, on a fresh connection, in a transaction that records the tenant
    setting it sees.
    """
    with engine().begin() as conn:
        conn.execute(
            sa.text("SELECT set_config('application_name', :name, true)"), {"name": marker}
        )
        if self.request.retries == 0:
            conn.execute(sa.text("SELECT pg_sleep(:seconds)"), {"seconds": hold})
        return _record_run(conn, self, "done")
