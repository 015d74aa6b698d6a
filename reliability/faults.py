"""Faults injected into real workers, and what survived them.

Ten faults, each one scenario function that starts real ``celery worker``
processes (the app is :mod:`tests.integration.faults_app`), injects the fault
while tasks are running, and reads back what every task did from the
``fault_runs`` table:

:func:`connection_killed`
    (a) the task's database connection is terminated (``pg_terminate_backend``)
    while it sleeps in a statement.  The task retries on ``OperationalError``
    (``autoretry_for``) and must complete on a new connection, reading its own
    tenant in the retried transaction; later tasks in the same worker process
    must succeed on the recovered pool.
:func:`worker_killed`
    (b) a prefork worker (main process and children) is SIGKILLed while its
    late-acknowledged tasks run.  A fresh worker on the same queue must run
    every task to completion in its tenant: RabbitMQ gives the unacknowledged
    messages back when the connection drops, Redis once their
    ``visibility_timeout`` has passed.
:func:`redis_restarted`
    (c) a private Redis (append-only file, ``appendfsync always``) is killed
    and restarted while a worker drains a batch, or while it waits for more
    with late-acknowledged tasks running.  The worker must reconnect by
    itself and every message published before the restart, and one batch
    after, must complete.  Without persistence a restarted Redis is empty, by
    design: the claim is about what Redis acknowledged.
:func:`database_unreachable`
    (d) the database sits behind a TCP proxy that is down when the worker
    starts.  The worker's ``/health`` must answer 503 naming the database
    while the worker stays up, then 200 once the proxy is back, and a task
    published meanwhile must complete.
:func:`worker_frozen`
    (e) on the package's transport, a prefork worker is frozen (``SIGSTOP``)
    past the leases of the tasks it runs, a second worker takes them, and the
    first is resumed while the second still runs them: its acknowledgements
    must delete nothing the second holds.
:func:`broker_partitioned`
    (f) the network between a worker and the transport's database stops
    forwarding, without a reset, past the leases of the tasks it runs; a
    second worker takes them; the healed worker's acknowledgements must delete
    nothing the second holds.
:func:`postgres_restarted`
    (g) a private PostgreSQL (``pgserver``) holding the transport's messages and
    the tasks' rows is restarted, fast then immediate, while a worker on the
    transport drains a backlog: nothing published may be lost.
:func:`transport_connections_killed`
    (h) every connection of the package's transport is terminated, several
    times, while a worker claims, runs and acknowledges: it must reconnect by
    itself and lose nothing.
:func:`publisher_killed`
    (i) a publisher process is SIGKILLed mid-batch on the package's transport:
    every publish that returned must run once, a publish the kill interrupted
    runs once or not at all, and the worker goes on, having met nothing it
    could not read.
:func:`connections_exhausted`
    (j) a private PostgreSQL's ``max_connections`` is filled, and the app role's
    connections terminated, while a worker on the transport drains a backlog
    and tasks are published: nothing may be lost once it has room again.

A scenario takes a :class:`Setup` (the database), brokers, and a ``launch``
callable that starts a worker for a :class:`WorkerSpec` and returns a handle
with ``pid`` (also its process group), ``alive``, ``log_text()`` and
``stop()``.  The pytest tests (``tests/integration/test_faults.py``) launch
through the test rig's worker factory, :func:`run` through
:func:`benchmarks._workers.start_worker`.  A scenario returns a
:class:`FaultResult` whose ``problems`` name every broken promise (empty: the
fault was survived) and raises only when it cannot run at all.  Tasks that
completed more than once (a redelivered message whose first run had already
finished) are reported as duplicates, not problems: late acknowledgement
promises at least once.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import kombu
import psycopg
import redis
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.engine import URL, Engine
from tests._rig import appconf
from tests._rig.postgres import libpq_kwargs
from tests._rig.redis_server import RedisServer, RedisServerUnavailable, private_redis
from tests._rig.tcp_proxy import TcpProxy
from tests.integration import faults_app

from tenant_celery import tenant_context

if TYPE_CHECKING:
    from tests._rig.postgres import PgCluster

    from reliability._common import ReliabilityContext, Section

__all__ = [
    "FaultResult",
    "Launch",
    "RunningWorker",
    "Setup",
    "WorkerSpec",
    "broker_partitioned",
    "connection_killed",
    "connections_exhausted",
    "database_unreachable",
    "postgres_restarted",
    "prepare",
    "publisher_killed",
    "redis_restarted",
    "run",
    "transport_connections_killed",
    "worker_frozen",
    "worker_killed",
]

APP_MODULE = faults_app.__name__
MONITOR_PORT_ENV = "TENANT_CELERY_MONITOR_PORT"
DATABASE_URL_ENV = "TENANT_CELERY_DATABASE_URL"
_LISTENING = re.compile(r"worker monitor listening on (http://[0-9.]+:\d+)")
_POLL = 0.2


class RunningWorker(Protocol):
    """What a scenario needs of a started worker."""

    @property
    def pid(self) -> int:
        """The main process, also the id of its process group."""
        ...

    @property
    def alive(self) -> bool: ...

    def log_text(self) -> str: ...

    def stop(self) -> object:
        """Stop it (if still running) and reap the whole process group."""
        ...


@dataclass(frozen=True)
class WorkerSpec:
    """A worker to start: broker, result backend, queue, database, pool and extras."""

    broker_url: str
    backend_url: str
    queue: str
    database_url: str
    """The tasks' database as the app role (SQLAlchemy URL)."""
    pool: str = "prefork"
    concurrency: int = 2
    environ: Mapping[str, str] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        """Variables the worker needs besides the inherited ones."""
        return {
            appconf.BROKER_URL_ENV: self.broker_url,
            appconf.BACKEND_URL_ENV: self.backend_url,
            appconf.QUEUE_ENV: self.queue,
            appconf.APP_DATABASE_URL_ENV: self.database_url,
            **self.environ,
        }

    def arguments(self) -> list[str]:
        """Command-line options, after any the launcher adds (``-Q``: the last one counts)."""
        return ["-Q", self.queue, "--prefetch-multiplier=1"]


Launch = Callable[[WorkerSpec], RunningWorker]
"""Start a worker for a :class:`WorkerSpec` and return once it is ready."""


@dataclass(frozen=True)
class Setup:
    """The database a scenario runs against."""

    admin_url: URL
    """Superuser: creates ``fault_runs``, reads it past RLS, terminates backends."""
    app_url: URL
    """The same database as the app role the tasks connect as."""
    app_role: str


@dataclass
class FaultResult:
    """What one injected fault did, and what survived it."""

    fault: str
    broker: str
    pool: str
    injected: int = 0
    survived: int = 0
    published: int = 0
    executions: int = 0
    """Runs of a task body: ``started`` rows, and each run of a held connection's task."""
    cross_tenant: int = 0
    """Rows recorded under a tenant other than the one the task was published for."""
    unaccounted: int = 0
    """Published tasks with no completed run."""
    duplicates: int = 0
    """Tasks that completed more than once."""
    tenants: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.injected > 0 and self.survived == self.injected

    def require(self, condition: bool, problem: str) -> bool:
        if not condition:
            self.problems.append(problem)
        return condition

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class FaultError(RuntimeError):
    """A fault scenario could not run (not: a fault was not survived)."""


# ------------------------------------------------------------------ the runs table


def render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def prepare(setup: Setup) -> None:
    """Create ``fault_runs`` (RLS on, granted to the app role) if it is missing."""
    engine = sa.create_engine(setup.admin_url, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            faults_app.create_runs_table(conn, setup.app_role)
    finally:
        engine.dispose()


@dataclass(frozen=True)
class Run:
    """One row of ``fault_runs``."""

    task_id: str
    tenant_id: str
    phase: str
    attempt: int
    worker_pid: int
    backend_pid: int
    guc_tenant: str | None
    recorded_at: float
    """Seconds since the epoch (the database's clock: the same machine's)."""


_SELECT_RUNS = sa.text(
    "SELECT task_id, tenant_id::text, phase, attempt, worker_pid, backend_pid, guc_tenant,"
    f" extract(epoch FROM recorded_at)::float8 FROM {faults_app.RUNS_TABLE}"
    " WHERE task_id = ANY(:ids) ORDER BY id"
)


def read_runs(engine: Engine, task_ids: Sequence[str]) -> list[Run]:
    with engine.connect() as conn:
        return [Run(*row) for row in conn.execute(_SELECT_RUNS, {"ids": list(task_ids)})]


def done_ids(runs: Sequence[Run]) -> set[str]:
    return {run.task_id for run in runs if run.phase == "done"}


def wait_done(
    engine: Engine, expected: Mapping[str, str], timeout: float, worker: RunningWorker | None = None
) -> list[Run]:
    """Poll until every task of ``expected`` has a ``done`` row, or ``timeout`` passes
    (or ``worker`` dies); return the rows read last."""
    deadline = time.monotonic() + timeout
    while True:
        runs = read_runs(engine, list(expected))
        if done_ids(runs) >= set(expected) or time.monotonic() > deadline:
            return runs
        if worker is not None and not worker.alive:
            return runs
        time.sleep(_POLL)


def account(result: FaultResult, expected: Mapping[str, str], runs: Sequence[Run]) -> None:
    """Count executions, completions, wrong tenants and duplicates into ``result``."""
    result.published += len(expected)
    result.tenants = max(result.tenants, len(set(expected.values())))
    result.executions += sum(1 for run in runs if run.phase == "started")
    done = Counter(run.task_id for run in runs if run.phase == "done")
    wrong = [
        run
        for run in runs
        if run.tenant_id != expected[run.task_id] or run.guc_tenant != expected[run.task_id]
    ]
    result.cross_tenant += len(wrong)
    missing = [task_id for task_id in expected if not done[task_id]]
    result.unaccounted += len(missing)
    duplicates = {task_id: count for task_id, count in done.items() if count > 1}
    result.duplicates += len(duplicates)
    result.require(not wrong, f"{len(wrong)} rows recorded under another tenant")
    result.require(
        not missing, f"{len(missing)} of {len(expected)} tasks never completed: {missing[:3]}"
    )
    if duplicates:
        result.details.setdefault("completed_twice", []).extend(sorted(duplicates))


# ---------------------------------------------------------------------- publishing


def new_tenants(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


def publish(
    app: Celery, name: str, tenants: Sequence[str], count: int, **kwargs: Any
) -> dict[str, str]:
    """Send ``count`` tasks ``name`` round-robin over ``tenants``; ``{task id: tenant}``."""
    sent = {}
    for index in range(count):
        tenant = tenants[index % len(tenants)]
        with tenant_context(tenant):
            sent[app.send_task(name, kwargs=kwargs).id] = tenant
    return sent


@contextlib.contextmanager
def publisher(broker_url: str, queue: str) -> Iterator[Celery]:
    app = faults_app.client(broker_url, queue)
    try:
        yield app
    finally:
        app.close()


def drop_queue(broker_url: str, queue: str) -> None:
    """Delete ``queue`` (and what a worker declared for it) from Redis or RabbitMQ."""
    with contextlib.suppress(Exception):
        if broker_url.startswith("redis"):
            client = redis.Redis.from_url(broker_url, socket_connect_timeout=3)
            try:
                client.delete(queue, f"_kombu.binding.{queue}")
            finally:
                client.close()
        elif broker_url.startswith("amqp"):
            with kombu.Connection(broker_url, connect_timeout=3) as conn:
                channel: Any = conn.default_channel
                channel.queue_delete(queue)
                channel.exchange_delete(queue)


def new_queue(kind: str) -> str:
    return f"tc.faults.{kind}.{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def workers(launch: Launch) -> Iterator[Callable[[WorkerSpec], RunningWorker]]:
    """A ``launch`` whose workers are all stopped when the block ends."""
    started: list[RunningWorker] = []

    def start(spec: WorkerSpec) -> RunningWorker:
        worker = launch(spec)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in reversed(started):
            worker.stop()


def kill_worker(worker: RunningWorker) -> None:
    """SIGKILL the worker's whole process group (main process and pool children) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.stop()


class Scene(NamedTuple):
    """What a late-acknowledged fault scenario starts from (:func:`scene`)."""

    result: FaultResult
    queue: str
    """A queue of the scenario's own."""
    tenants: list[str]
    spec: WorkerSpec
    """The worker: ``broker_url``, prefork 2, messages' leases of ``visibility_timeout``."""
    admin: Engine
    """Superuser, no pool: dispose of it when the scenario ends."""


def scene(
    setup: Setup,
    fault: str,
    kind: str,
    *,
    broker_url: str,
    backend_url: str,
    visibility_timeout: float,
    tenants: int = 2,
) -> Scene:
    """The preamble of the scenarios whose workers run late-acknowledged tasks:
    their result, a new queue (``kind`` in its name), new tenants, a prefork
    worker whose messages' leases (Redis: its ``visibility_timeout``) last
    ``visibility_timeout`` seconds, and a superuser engine on ``setup``."""
    queue = new_queue(kind)
    spec = WorkerSpec(
        broker_url,
        backend_url,
        queue,
        render(setup.app_url),
        environ={faults_app.VISIBILITY_TIMEOUT_ENV: str(visibility_timeout)},
    )
    return Scene(
        FaultResult(fault, _label(broker_url), "prefork 2"),
        queue,
        new_tenants(tenants),
        spec,
        sa.create_engine(setup.admin_url, poolclass=sa.NullPool),
    )


# ------------------------------------------------------- (a) connection killed mid-task

_SLEEPING_BACKEND = sa.text(
    "SELECT pid FROM pg_stat_activity"
    " WHERE application_name = :name AND datname = current_database()"
    " AND wait_event = 'PgSleep'"
)
_TERMINATE = sa.text("SELECT pg_terminate_backend(:pid)")
_ALIVE_BACKENDS = sa.text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(:pids)")


def _sleeping_backend(engine: Engine, marker: str, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            pid = conn.execute(_SLEEPING_BACKEND, {"name": marker}).scalar()
        if pid is not None:
            return int(pid)
        time.sleep(0.05)
    return None


def connection_killed(
    setup: Setup,
    launch: Launch,
    *,
    broker_url: str,
    backend_url: str,
    kills: int = 1,
    later: int = 4,
    timeout: float = 60.0,
) -> FaultResult:
    """(a) Terminate the database connection of ``kills`` tasks mid-statement, one after
    another, in one prefork worker process; then run ``later`` tasks in it.

    Survived when each killed task completed once, retried, on another backend,
    with the tenant setting it was published for read in the retried
    transaction; and when every later task completed, in its tenant, on a
    live backend of the same process.
    """
    result = FaultResult("connection killed mid-task", _label(broker_url), "prefork 1")
    queue = new_queue("connection")
    tenants = new_tenants(2)
    spec = WorkerSpec(broker_url, backend_url, queue, render(setup.app_url), concurrency=1)
    admin = sa.create_engine(setup.admin_url, poolclass=sa.NullPool)
    killed: dict[str, int] = {}
    expected: dict[str, str] = {}
    after: dict[str, str] = {}
    try:
        with workers(launch) as start, publisher(broker_url, queue) as app:
            worker = start(spec)
            for index in range(kills):
                marker = f"tcfault-{uuid.uuid4().hex[:12]}"
                sent = publish(
                    app, faults_app.HOLD_CONNECTION, [tenants[index % 2]], 1,
                    marker=marker, hold=timeout,
                )  # fmt: skip
                expected.update(sent)
                backend = _sleeping_backend(admin, marker, timeout)
                if backend is None:
                    result.problems.append(f"a task never held its connection within {timeout}s")
                    break
                with admin.connect() as conn:
                    terminated = conn.execute(_TERMINATE, {"pid": backend}).scalar()
                    conn.commit()
                if result.require(bool(terminated), f"backend {backend} was not terminated"):
                    killed.update(dict.fromkeys(sent, backend))
                    result.injected += 1
                wait_done(admin, sent, timeout, worker)
            after = publish(app, faults_app.RECORD, tenants, later)
            expected.update(after)
            runs = wait_done(admin, expected, timeout, worker)
            result.require(worker.alive, "the worker died")
        with admin.connect() as conn:
            still = list(conn.execute(_ALIVE_BACKENDS, {"pids": list(killed.values())}).scalars())
    finally:
        admin.dispose()
        drop_queue(broker_url, queue)
    _judge_connection_killed(result, expected, runs, killed, set(after), still)
    return result


def _judge_connection_killed(
    result: FaultResult,
    expected: Mapping[str, str],
    runs: Sequence[Run],
    killed: Mapping[str, int],
    after: set[str],
    still: Sequence[int],
) -> None:
    account(result, expected, runs)
    done = [run for run in runs if run.phase == "done"]
    retried = {run.task_id: run for run in done if run.task_id in killed}
    # The held task records only its last run: the killed attempt rolled back.
    result.executions += len(killed) + len(retried)
    for task_id, backend in killed.items():
        run = retried.get(task_id)
        if run is None:
            continue  # counted by account()
        fine = result.require(run.attempt >= 1, f"task {task_id} completed without a retry")
        fine &= result.require(
            run.backend_pid != backend, f"task {task_id} completed on the killed backend {backend}"
        )
        if fine and run.guc_tenant == expected[task_id]:
            result.survived += 1
    later_runs = [run for run in done if run.task_id in after]
    pids = {run.worker_pid for run in done}
    result.require(
        not set(killed.values()) & {run.backend_pid for run in later_runs},
        "a later task ran on a killed backend",
    )
    result.require(len(pids) == 1, f"tasks ran in {len(pids)} processes, expected one: {pids}")
    result.require(not still, f"killed backends still connected: {still}")
    result.details.update(
        killed=[
            {
                "task_id": task_id,
                "killed_backend": backend,
                "retried_on_backend": retried[task_id].backend_pid if task_id in retried else None,
                "attempt": retried[task_id].attempt if task_id in retried else None,
                "tenant_read_in_retry": (
                    task_id in retried and retried[task_id].guc_tenant == expected[task_id]
                ),
            }
            for task_id, backend in killed.items()
        ],
        later_tasks=len(after),
        later_completed=len({run.task_id for run in later_runs}),
        later_backends=sorted({run.backend_pid for run in later_runs}),
        worker_processes=sorted(pids),
    )


# ------------------------------------------------------------ (b) worker SIGKILLed


def worker_killed(
    setup: Setup,
    launch: Launch,
    *,
    broker_url: str,
    backend_url: str,
    tasks: int = 4,
    hold: float = 2.0,
    visibility_timeout: float = 8.0,
    timeout: float = 90.0,
) -> FaultResult:
    """(b) SIGKILL a prefork worker (concurrency 2, late acks, prefetch 1) while two
    tasks run, start a fresh worker on the same queue, and wait for every task.

    On Redis the fresh worker restores the unacknowledged messages once
    ``visibility_timeout`` seconds have passed since their delivery; keep
    ``hold`` well under it, or a task still running is handed out twice.

    Survived when the tasks that were running when the worker died ran again
    and completed, and every task completed in its tenant.
    """
    result, queue, tenants, spec, admin = scene(
        setup,
        "worker SIGKILLed mid-task",
        "sigkill",
        broker_url=broker_url,
        backend_url=backend_url,
        visibility_timeout=visibility_timeout,
    )
    try:
        with workers(launch) as start, publisher(broker_url, queue) as app:
            first = start(spec)
            expected = publish(app, faults_app.RECORD, tenants, tasks, hold=hold)
            deadline = time.monotonic() + timeout
            while True:
                runs = read_runs(admin, list(expected))
                running = {r.task_id for r in runs if r.phase == "started"} - done_ids(runs)
                if len(running) >= spec.concurrency or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            killed_at = time.time()
            kill_worker(first)
            result.injected = 1
            before = read_runs(admin, list(expected))
            in_flight = {r.task_id for r in before if r.phase == "started"} - done_ids(before)
            result.require(bool(in_flight), "no task was running when the worker was killed")
            second = start(spec)
            second_ready = time.time() - killed_at
            runs = wait_done(admin, expected, timeout, second)
            result.require(second.alive, "the second worker died")
    finally:
        admin.dispose()
        drop_queue(broker_url, queue)
    account(result, expected, runs)
    again = [r for r in runs if r.task_id in in_flight and r.phase == "started"]
    redelivered = {r.task_id for r in again if r.recorded_at > killed_at}
    first_rerun = min((r.recorded_at for r in again if r.recorded_at > killed_at), default=None)
    result.require(
        redelivered >= in_flight,
        f"tasks running at the kill never ran again: {sorted(in_flight - redelivered)}",
    )
    if not result.problems:
        result.survived = 1
    result.details.update(
        published=len(expected),
        in_flight_at_kill=sorted(in_flight),
        redelivered=sorted(redelivered),
        seconds_to_new_worker=round(second_ready, 2),
        seconds_to_redelivery=None if first_rerun is None else round(first_rerun - killed_at, 2),
        visibility_timeout=visibility_timeout if broker_url.startswith("redis") else None,
    )
    return result


# ------------------------------------- (h) the transport's own connections terminated

_BROKER_LOST = "Connection to broker lost"
"""What a Celery worker logs when its consumer's broker connection fails."""
_TERMINATE_TRANSPORT = sa.text(
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE application_name = :name AND usename = :role AND datname = current_database()"
)


def transport_connections_killed(
    setup: Setup,
    launch: Launch,
    *,
    broker_url: str,
    backend_url: str,
    tasks: int = 60,
    kills: int = 3,
    hold: float = 0.3,
    visibility_timeout: float = 6.0,
    timeout: float = 120.0,
) -> FaultResult:
    """(h) Terminate every connection of the package's transport, ``kills`` times, while a
    prefork worker (concurrency 2, late acks, prefetch 1) claims, runs and acknowledges.

    Each kill lands wherever the worker is: claiming, renewing leases,
    acknowledging, or waiting on ``LISTEN``.  The worker must reconnect by
    itself and every task must complete in its tenant.  An acknowledgement
    lost with its connection leaves the message to be claimed again when its
    lease runs out: a duplicate, which late acknowledgement allows.
    """
    from tenant_celery.transport import APPLICATION_NAME  # noqa: PLC0415

    result, queue, tenants, spec, admin = scene(
        setup,
        "transport connections terminated",
        "tcpg-kill",
        broker_url=broker_url,
        backend_url=backend_url,
        visibility_timeout=visibility_timeout,
    )
    terminated: list[int] = []
    runs: list[Run] = []
    try:
        with workers(launch) as start, publisher(broker_url, queue) as app:
            worker = start(spec)
            expected = publish(app, faults_app.RECORD, tenants, tasks, hold=hold)
            deadline = time.monotonic() + timeout
            for _ in range(kills):
                # Wait for progress between kills, so each lands on a working consumer.
                before = len(done_ids(read_runs(admin, list(expected))))
                while time.monotonic() < deadline:
                    if len(done_ids(read_runs(admin, list(expected)))) >= before + 4:
                        break
                    time.sleep(_POLL)
                with admin.connect() as conn:
                    count = conn.execute(
                        _TERMINATE_TRANSPORT, {"name": APPLICATION_NAME, "role": setup.app_role}
                    ).scalar_one()
                    conn.commit()
                terminated.append(int(count))
                # This process's publishing connection is among them; the worker's log
                # says below whether each kill reached the worker's own.
                if result.require(count > 0, "no transport connection to terminate"):
                    result.injected += 1
            runs = wait_done(admin, expected, timeout, worker)
            result.require(worker.alive, "the worker died")
            if not worker.alive:
                result.details["log_tail"] = _tail(worker)
            lost = worker.log_text().count(_BROKER_LOST)
            result.require(
                lost >= result.injected,
                f"the worker lost its broker connection {lost} times for {result.injected} kills",
            )
            result.details["worker_reconnections"] = lost
    finally:
        admin.dispose()
        drop_queue(broker_url, queue)
    account(result, expected, runs)
    if not result.problems:
        result.survived = result.injected
    result.details.update(
        published=len(expected),
        connections_terminated=terminated,
        visibility_timeout=visibility_timeout,
    )
    return result


# ------------------------------------------------ (e) a worker frozen past its leases


def worker_frozen(
    setup: Setup,
    launch: Launch,
    *,
    broker_url: str,
    backend_url: str,
    tasks: int = 6,
    hold: float = 5.0,
    visibility_timeout: float = 3.0,
    timeout: float = 120.0,
) -> FaultResult:
    """(e) Freeze a prefork worker (``SIGSTOP``, main process and children) while its
    late-acknowledged tasks run, long enough for their leases to run out; let a
    second worker on the same queue take and finish them; then resume the first.

    The first worker is resumed as soon as the second has started those tasks:
    it finishes its own runs at once and acknowledges them while the second
    still runs them.  Survived when those acknowledgements deleted nothing the
    second worker held (they name a lease that is no longer the first
    worker's), every task completed in its tenant, both workers ran the frozen
    tasks to the end, and both went on taking work.  The frozen worker's tasks
    completing twice is the price of the lease, and is counted as duplicates.
    """
    result, queue, tenants, spec, admin = scene(
        setup,
        "worker frozen past its leases",
        "sigstop",
        broker_url=broker_url,
        backend_url=backend_url,
        visibility_timeout=visibility_timeout,
    )
    runs: list[Run] = []
    frozen_ids: set[str] = set()
    frozen_at = resumed = 0.0
    try:
        with workers(launch) as start, publisher(broker_url, queue) as app:
            first = start(spec)
            expected = publish(app, faults_app.RECORD, tenants, tasks, hold=hold)
            running = _running(admin, expected, spec.concurrency, timeout)
            os.killpg(first.pid, signal.SIGSTOP)
            frozen_at = time.time()
            result.injected = 1
            frozen_ids = running
            try:
                second = start(spec)
                # The second worker starts the frozen one's tasks once their leases lapse.
                _wait_runs(admin, frozen_ids, "started", 2, timeout)
            finally:
                os.killpg(first.pid, signal.SIGCONT)
                resumed = time.time()
            # Resumed, the first worker finishes its runs at once and acknowledges them,
            # while the second still runs them: their messages must still be there.
            _check_acks_deleted_nothing(result, admin, queue, frozen_ids, hold + 10)
            runs = wait_done(admin, expected, timeout, second)
            _wait_runs(admin, frozen_ids, "done", 2, hold + 10)
            result.require(first.alive, "the frozen worker died after it was resumed")
            result.require(second.alive, "the second worker died")
            runs = _both_go_on(result, admin, app, tenants, expected, frozen_ids, timeout)
    finally:
        admin.dispose()
        drop_queue(broker_url, queue)
    _judge_frozen(result, expected, runs, frozen_ids)
    result.details.update(
        published=len(expected),
        frozen_running=sorted(frozen_ids),
        frozen_seconds=round(resumed - frozen_at, 1) if resumed else None,
        visibility_timeout=visibility_timeout,
    )
    return result


def _running(admin: Engine, expected: Mapping[str, str], count: int, timeout: float) -> set[str]:
    """The tasks of ``expected`` running (started, not done) once ``count`` are, or at
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        now = read_runs(admin, list(expected))
        running = {r.task_id for r in now if r.phase == "started"} - done_ids(now)
        if len(running) >= count or time.monotonic() > deadline:
            return running
        time.sleep(0.05)


def _judge_frozen(
    result: FaultResult, expected: Mapping[str, str], runs: Sequence[Run], frozen: set[str]
) -> None:
    account(result, expected, runs)
    by_task: dict[str, set[int]] = {}
    for run in runs:
        if run.phase == "done":
            by_task.setdefault(run.task_id, set()).add(run.worker_pid)
    rerun = {t for t in frozen if len(by_task.get(t, set())) >= 2}
    result.require(bool(frozen), "no task was running when the worker was frozen")
    result.require(
        rerun == frozen,
        f"frozen tasks not run to the end by both workers: {sorted(frozen - rerun)}",
    )
    if not result.problems:
        result.survived = 1


_HELD_ROWS = sa.text(
    "SELECT count(*) FROM tenant_celery_message WHERE queue = :queue"
    " AND EXISTS (SELECT 1 FROM unnest(CAST(:ids AS text[])) AS t(id)"
    " WHERE strpos(payload, t.id) > 0)"
)
"""Messages of ``ids`` (task ids, found in the message) still in the transport's table
(the scratch database's ``public`` schema)."""


def _wait_runs(
    admin: Engine, task_ids: set[str], phase: str, count: int, timeout: float
) -> list[Run]:
    """Wait until each of ``task_ids`` has ``count`` rows of ``phase``, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        runs = read_runs(admin, list(task_ids))
        found = Counter(r.task_id for r in runs if r.phase == phase)
        if all(found[t] >= count for t in task_ids) or time.monotonic() > deadline:
            return runs
        time.sleep(0.05)


def _done_count(runs: Sequence[Run], task_id: str) -> int:
    return sum(1 for run in runs if run.task_id == task_id and run.phase == "done")


# ------------------------------------------- (f) the broker partitioned off a worker


def broker_partitioned(
    setup: Setup,
    launch: Launch,
    *,
    backend_url: str,
    tasks: int = 6,
    hold: float = 5.0,
    visibility_timeout: float = 3.0,
    timeout: float = 120.0,
) -> FaultResult:
    """(f) Cut the network between a worker and the transport's PostgreSQL without a
    reset (a TCP proxy that stops forwarding) while the worker runs late-acknowledged
    tasks, for longer than their leases; a second worker, connected directly, takes
    and starts them; then heal it.

    The tasks' own database connections do not go through the proxy: the first
    worker's tasks finish during the partition, and their acknowledgements reach
    the server when it heals, while the second worker still runs the same tasks.
    Survived when those acknowledgements deleted nothing the second worker held,
    every task completed in its tenant, and both workers went on taking work.
    """
    direct = broker_url_of(setup)
    proxy = TcpProxy(database_target(setup.app_url))
    cut_off = f"tcpg+{render(through(setup.app_url.set(drivername='postgresql'), proxy))}"
    result, queue, tenants, first_spec, admin = scene(
        setup,
        "broker partitioned from a worker",
        "partition",
        broker_url=cut_off,
        backend_url=backend_url,
        visibility_timeout=visibility_timeout,
    )
    second_spec = replace(first_spec, broker_url=direct)
    runs: list[Run] = []
    partitioned: set[str] = set()
    try:
        proxy.start()
        with workers(launch) as start, publisher(direct, queue) as app:
            first = start(first_spec)
            expected = publish(app, faults_app.RECORD, tenants, tasks, hold=hold)
            partitioned = _running(admin, expected, first_spec.concurrency, timeout)
            proxy.freeze()
            result.injected = 1
            try:
                second = start(second_spec)
                _wait_runs(admin, partitioned, "started", 2, timeout)
                # The first worker's own runs end during the partition.
                _wait_runs(admin, partitioned, "done", 1, timeout)
            finally:
                proxy.thaw()
            _check_acks_deleted_nothing(result, admin, queue, partitioned, hold + 10)
            runs = wait_done(admin, expected, timeout, second)
            _wait_runs(admin, partitioned, "done", 2, hold + 10)
            result.require(first.alive, "the partitioned worker died after it healed")
            result.require(second.alive, "the second worker died")
            runs = _both_go_on(result, admin, app, tenants, expected, partitioned, timeout)
    finally:
        proxy.stop()
        admin.dispose()
    _judge_frozen(result, expected, runs, partitioned)
    result.details.update(
        published=len(expected),
        partitioned_running=sorted(partitioned),
        visibility_timeout=visibility_timeout,
    )
    return result


def _both_go_on(
    result: FaultResult,
    admin: Engine,
    app: Celery,
    tenants: Sequence[str],
    expected: dict[str, str],
    episode: set[str],
    timeout: float,
) -> list[Run]:
    """Publish more tasks and require both workers to run some: the first worker's
    processes ran the episode's tasks first, the second's ran them again."""
    before = read_runs(admin, list(episode))
    first_started: dict[str, int] = {}
    for run in before:  # rows in id order: each task's first start is the first worker's
        if run.phase == "started":
            first_started.setdefault(run.task_id, run.worker_pid)
    first_pids = set(first_started.values())
    second_pids = {r.worker_pid for r in before if r.phase == "started"} - first_pids
    after = publish(app, faults_app.RECORD, tenants, 8, hold=1.0)
    expected.update(after)
    runs = wait_done(admin, expected, timeout)
    ran = {r.worker_pid for r in runs if r.task_id in after and r.phase == "done"}
    result.require(bool(ran & first_pids), "the first worker took no work after the episode")
    result.require(bool(ran & second_pids), "the second worker took no work after the episode")
    return runs


def broker_url_of(setup: Setup) -> str:
    """The package's transport on the setup's database, as the app role."""
    return f"tcpg+{render(setup.app_url.set(drivername='postgresql'))}"


def _check_acks_deleted_nothing(
    result: FaultResult, admin: Engine, queue: str, tasks: set[str], timeout: float
) -> None:
    """From now until the second worker has finished ``tasks`` (the first worker has,
    and is acknowledging them), every one it is still running must keep its message."""
    deadline = time.monotonic() + timeout
    polls = 0
    at_start: int | None = None
    while time.monotonic() < deadline:
        now = read_runs(admin, list(tasks))
        still_running = {t for t in tasks if _done_count(now, t) < 2}
        if at_start is None:
            at_start = len(still_running)
        if not still_running:
            break
        with admin.connect() as conn:
            held = conn.execute(
                _HELD_ROWS, {"queue": queue, "ids": sorted(still_running)}
            ).scalar_one()
        # Read after the rows: a task the second worker finished meanwhile is gone
        # legitimately, its own acknowledgement deleted it.
        finished = {t for t in still_running if _done_count(read_runs(admin, [t]), t) >= 2}
        if held < len(still_running - finished):
            result.problems.append(
                "the first worker's acknowledgements deleted messages the second worker "
                f"held: {held} left of the {len(still_running - finished)} it was running"
            )
            break
        polls += 1
        time.sleep(0.1)
    result.require(
        bool(at_start), "the second worker finished the tasks before the first one's acks"
    )
    result.require(polls > 0, "the messages the second worker held were never read")
    result.details.update(held_by_second=at_start or 0, held_checks=polls)


# ---------------------------------------------- (g) PostgreSQL restarted under load


@contextlib.contextmanager
def private_database(purpose: str) -> Iterator[tuple[PgCluster, Setup]]:
    """A private PostgreSQL (``pgserver``) with a scratch database (the bundled
    migration's tables, an app role, ``fault_runs``), removed when the block ends.

    Raises:
        FaultError: no private server can be started here (``purpose`` says what
            it was for).
    """
    from benchmarks._scratch import scratch  # noqa: PLC0415
    from tests._rig.postgres import pgserver_cluster  # noqa: PLC0415

    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(pgserver_cluster())
            db = stack.enter_context(scratch(render(cluster.admin_url), rows_per_tenant=0))
        except Exception as exc:  # no private server here: the fault cannot run
            raise FaultError(f"no private PostgreSQL {purpose}: {exc}") from exc
        setup = Setup(admin_url=db.admin_url, app_url=db.app_url, app_role=db.app_role)
        prepare(setup)
        yield cluster, setup


def postgres_restarted(
    launch: Launch,
    *,
    backend_url: str,
    tasks: int = 40,
    modes: Sequence[str] = ("fast", "immediate"),
    hold: float = 0.2,
    visibility_timeout: float = 6.0,
    timeout: float = 180.0,
) -> FaultResult:
    """(g) Restart a private PostgreSQL (the transport's messages and the tasks' rows
    in one database) with ``pg_ctl restart -m <mode>`` for each of ``modes``, while a
    prefork worker on the package's transport drains a backlog of late-acknowledged
    tasks.

    Survived when the worker reconnected by itself and every task published
    before each restart completed in its tenant.  A publish returns once its
    message is committed; an immediate shutdown can lose the claims and
    acknowledgements of the last moment, which are not flushed to disk, so
    their tasks may run again: duplicates.
    """
    restarts: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        cluster, setup = stack.enter_context(private_database("to restart"))
        broker = broker_url_of(setup)
        result, queue, tenants, spec, admin = scene(
            setup,
            "PostgreSQL restarted under load",
            "pg-restart",
            broker_url=broker,
            backend_url=backend_url,
            visibility_timeout=visibility_timeout,
        )
        stack.callback(admin.dispose)
        expected: dict[str, str] = {}
        runs: list[Run] = []
        with workers(launch) as start, publisher(broker, queue) as app:
            worker = start(spec)
            for mode in modes:
                sent = publish(app, faults_app.RECORD, tenants, tasks, hold=hold)
                expected.update(sent)
                progress = time.monotonic() + timeout
                while time.monotonic() < progress:
                    if len(done_ids(read_runs(admin, list(sent)))) >= tasks // 4:
                        break
                    time.sleep(_POLL)
                pending = len(set(sent) - done_ids(read_runs(admin, list(sent))))
                result.require(pending > 0, f"nothing was pending at the {mode} restart")
                admin.dispose()
                started = time.monotonic()
                cluster.restart(mode)
                restarts.append(
                    {
                        "mode": mode,
                        "pending": pending,
                        "seconds": round(time.monotonic() - started, 2),
                    }
                )
                result.injected += 1
                runs = wait_done(admin, expected, timeout, worker)
                result.require(worker.alive, f"the worker died after the {mode} restart")
                if not worker.alive:
                    result.details["log_tail"] = _tail(worker)
                    break
        account(result, expected, runs)
    if not result.problems:
        result.survived = result.injected
    result.details.update(restarts=restarts, visibility_timeout=visibility_timeout)
    return result


# ------------------------------------------------- (i) a publisher SIGKILLed mid-batch

_QUEUE_ROWS = sa.text("SELECT count(*) FROM tenant_celery_message WHERE queue = :queue")
"""Messages of ``queue`` still in the transport's table (the scratch database's ``public``)."""
_STRAY_RUNS = sa.text(
    f"SELECT DISTINCT task_id FROM {faults_app.RUNS_TABLE}"
    " WHERE tenant_id = ANY(CAST(:tenants AS uuid[])) AND NOT task_id = ANY(:known)"
)
_WORKER_TROUBLE = re.compile(
    r"Traceback|ERROR/|CRITICAL/|Unrecoverable error|decode message|unknown message"
)
"""Log lines of a worker that met a message it could not take: none may appear."""
_ROOT = Path(__file__).resolve().parents[1]


def queue_rows(admin: Engine, queue: str) -> int:
    with admin.connect() as conn:
        return int(conn.execute(_QUEUE_ROWS, {"queue": queue}).scalar_one())


def wait_queue_empty(admin: Engine, queue: str, timeout: float) -> int:
    """Poll until the transport holds no message of ``queue`` (acknowledgements delete
    them), or ``timeout`` passes; return how many are left."""
    deadline = time.monotonic() + timeout
    while True:
        left = queue_rows(admin, queue)
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(_POLL)


def stray_runs(admin: Engine, tenants: Sequence[str], known: Iterable[str]) -> list[str]:
    """Task ids recorded under ``tenants`` that are not ``known``."""
    with admin.connect() as conn:
        found = conn.execute(_STRAY_RUNS, {"tenants": list(tenants), "known": list(known)})
        return sorted(found.scalars())


@dataclass(frozen=True)
class PublisherKill:
    """One publisher process SIGKILLed mid-batch: what it recorded."""

    intended: dict[str, str]
    """``{task id: tenant}`` of every publish it began."""
    confirmed: list[str]
    """Task ids whose ``send_task`` returned, in order."""
    returncode: int | None
    seconds: float
    """From the start of the process to its kill."""

    @property
    def in_flight(self) -> list[str]:
        """The publishes the kill interrupted (at most one)."""
        done = set(self.confirmed)
        return [task_id for task_id in self.intended if task_id not in done]

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def kill_publisher(
    broker_url: str,
    queue: str,
    tenants: Sequence[str],
    directory: Path,
    *,
    kill_after: int,
    timeout: float,
) -> PublisherKill:
    """Start :mod:`reliability.fault_publisher` and SIGKILL it once ``kill_after`` of
    its publishes have returned (it publishes without pause: the kill lands in a
    publish or between two)."""
    from reliability import fault_publisher  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    intent, confirmed = directory / "intent", directory / "confirmed"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        ),
        fault_publisher.BROKER_ENV: broker_url,
    }
    command = [
        sys.executable, "-m", "reliability.fault_publisher",
        queue, str(intent), str(confirmed), str(kill_after * 20 + 1000), *tenants,
    ]  # fmt: skip
    started = time.monotonic()
    with (directory / "publisher.log").open("wb") as log:
        process = subprocess.Popen(
            command, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = started + timeout
        while len(fault_publisher.read_lines(confirmed)) < kill_after:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (directory / "publisher.log").read_text(errors="replace")[-2000:]
                raise FaultError(
                    f"the publisher exited ({process.returncode}) or stalled before "
                    f"{kill_after} publishes:\n{tail}"
                )
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
        returncode = process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return PublisherKill(
        intended={
            line[0]: line[1] for line in fault_publisher.read_lines(intent) if len(line) == 2
        },
        confirmed=[line[0] for line in fault_publisher.read_lines(confirmed) if len(line) == 1],
        returncode=returncode,
        seconds=round(time.monotonic() - started, 2),
    )


def publisher_killed(
    setup: Setup,
    launch: Launch,
    *,
    broker_url: str,
    backend_url: str,
    kills: int = 3,
    kill_after: tuple[int, int] = (20, 80),
    later: int = 4,
    visibility_timeout: float = 6.0,
    timeout: float = 120.0,
) -> FaultResult:
    """(i) Start a publisher process that sends tenant tasks to a prefork worker's queue
    as fast as it can, recording each task id before its publish and once it has
    returned, and SIGKILL it after a random number (``kill_after``) of publishes;
    ``kills`` times.  Then publish ``later`` tasks from here.

    Survived when every task whose publish returned completed, exactly once,
    in its tenant; the publish a kill interrupted either ran once (its
    message had been committed: counted as ``extra``) or left no trace; nothing
    else ran under the scenario's tenants; the worker stayed up, logged no
    error (no broken or unparseable message), ran the later tasks and left
    the queue empty.
    """
    result, queue, tenants, spec, admin = scene(
        setup,
        "publisher SIGKILLed mid-batch",
        "pub-kill",
        broker_url=broker_url,
        backend_url=backend_url,
        visibility_timeout=visibility_timeout,
    )
    directory = Path(tempfile.mkdtemp(prefix="tc-publisher-"))
    picker = random.Random()
    episodes: list[PublisherKill] = []
    after: dict[str, str] = {}
    runs: list[Run] = []
    try:
        with workers(launch) as start, publisher(broker_url, queue) as app:
            worker = start(spec)
            for index in range(kills):
                episode = kill_publisher(
                    broker_url,
                    queue,
                    tenants,
                    directory / str(index),
                    kill_after=picker.randint(*kill_after),
                    timeout=timeout,
                )
                episodes.append(episode)
                if result.require(episode.killed, f"publisher {index} ended {episode.returncode}"):
                    result.injected += 1
            after = publish(app, faults_app.RECORD, tenants, later)
            confirmed = {t: e.intended[t] for e in episodes for t in e.confirmed}
            wait_done(admin, {**confirmed, **after}, timeout, worker)
            # Whatever a kill committed unconfirmed is in the queue: wait until it ran too.
            left = wait_queue_empty(admin, queue, visibility_timeout + 10)
            intended = {t: tenant for e in episodes for t, tenant in e.intended.items()}
            runs = read_runs(admin, [*intended, *after])
            stray = stray_runs(admin, tenants, [*intended, *after])
            trouble = [
                line for line in worker.log_text().splitlines() if _WORKER_TROUBLE.search(line)
            ]
            alive = worker.alive
    finally:
        admin.dispose()
        drop_queue(broker_url, queue)
        shutil.rmtree(directory, ignore_errors=True)
    judge_publisher_killed(
        result, episodes, after, runs, left=left, stray=stray, trouble=trouble, alive=alive
    )
    result.details["visibility_timeout"] = visibility_timeout
    return result


def judge_publisher_killed(
    result: FaultResult,
    episodes: Sequence[PublisherKill],
    after: Mapping[str, str],
    runs: Sequence[Run],
    *,
    left: int,
    stray: Sequence[str],
    trouble: Sequence[str],
    alive: bool,
) -> None:
    """Judge :func:`publisher_killed` from what the publishers recorded and the rows read."""
    intended = {t: tenant for e in episodes for t, tenant in e.intended.items()}
    confirmed = {t: intended[t] for e in episodes for t in e.confirmed}
    expected = {**confirmed, **after}
    account(result, expected, [run for run in runs if run.task_id in expected])
    done = Counter(run.task_id for run in runs if run.phase == "done")
    unconfirmed = {t: tenant for t, tenant in intended.items() if t not in confirmed}
    extra = sorted(t for t in unconfirmed if done[t])
    wrong = [
        run
        for run in runs
        if run.task_id in unconfirmed
        and (
            run.tenant_id != unconfirmed[run.task_id] or run.guc_tenant != unconfirmed[run.task_id]
        )
    ]
    result.cross_tenant += len(wrong)
    result.executions += sum(
        1 for run in runs if run.task_id in unconfirmed and run.phase == "started"
    )
    twice = sorted(t for t in intended.keys() | after.keys() if done[t] > 1)
    lost = sorted(t for t in confirmed if not done[t])
    result.require(not wrong, f"{len(wrong)} unconfirmed publishes ran under another tenant")
    result.require(
        all(len(e.in_flight) <= 1 for e in episodes),
        f"a kill left more than one publish unconfirmed: {[len(e.in_flight) for e in episodes]}",
    )
    result.require(
        not twice,
        f"{len(twice)} tasks ran twice, with no fault on the worker's side to explain it: "
        f"{twice[:3]}",
    )
    result.require(
        not stray, f"tasks nobody published ran under the scenario's tenants: {stray[:3]}"
    )
    result.require(left == 0, f"{left} messages stayed in the queue after the worker drained it")
    result.require(alive, "the worker died")
    result.require(
        not trouble, f"the worker logged {len(trouble)} errors: {[t[-200:] for t in trouble[:3]]}"
    )
    if not result.problems:
        result.survived = result.injected
    result.details.update(
        publisher_kills=[
            {
                "published_before_kill": len(e.confirmed),
                "in_flight": e.in_flight[0] if e.in_flight else None,
                "interrupted": (
                    "between two publishes"
                    if not e.in_flight
                    else "a publish, whose message was committed: ran"
                    if done[e.in_flight[0]]
                    else "a publish, before its message was committed: never ran"
                ),
                "seconds": e.seconds,
            }
            for e in episodes
        ],
        published_before_kill=len(confirmed),
        ran=sum(1 for t in confirmed if done[t]),
        lost=len(lost),
        extra=len(extra),
        extra_ids=extra,
        later_tasks=len(after),
        later_completed=sum(1 for t in after if done[t]),
        left_in_queue=left,
        worker_errors=len(trouble),
    )


# ------------------------------------------------- (j) max_connections reached

_SERVER_FULL = re.compile(r"too many clients|remaining connection slots are reserved")
"""What PostgreSQL answers a connection past ``max_connections`` (SQLSTATE 53300): to a
role that is not a superuser once only the superusers' reserved slots are left."""
_FILLER_ROLE = "tc_faults_filler"
_BACKENDS_OF = sa.text("SELECT pid FROM pg_stat_activity WHERE usename = :role")
_TERMINATE_PIDS = sa.text(
    "SELECT count(pg_terminate_backend(pid)) FROM unnest(CAST(:pids AS int[])) AS t(pid)"
)


class Fillers:
    """Connections as a role of their own (not a superuser), opened until the server
    refuses one: it is then full for every role but the superusers."""

    def __init__(self, url: URL) -> None:
        self.kwargs = libpq_kwargs(url)
        self.conns: list[psycopg.Connection[Any]] = []

    def fill(self, most: int = 2000) -> str:
        """Open connections until one is refused for ``max_connections``; its message."""
        while len(self.conns) < most:
            try:
                self.conns.append(psycopg.connect(**self.kwargs, autocommit=True))
            except psycopg.OperationalError as exc:
                if _SERVER_FULL.search(str(exc)):
                    return str(exc).strip().splitlines()[-1]
                raise
        raise FaultError(f"{most} connections and the server still takes more")

    def release(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()
        self.conns.clear()

    @classmethod
    @contextlib.contextmanager
    def on(cls, cluster: PgCluster) -> Iterator[Fillers]:
        """Fillers of ``cluster`` as a new role of theirs, released when the block ends."""
        with cluster.connect() as conn:
            conn.execute(f'CREATE ROLE "{_FILLER_ROLE}" LOGIN')
        fillers = cls(cluster.admin_url.set(username=_FILLER_ROLE))
        try:
            yield fillers
        finally:
            fillers.release()


def most_backends(admin: Engine, role: str, *, until: float) -> int:
    """The most connections ``role`` had, read every quarter second until ``until``
    (``time.time()``)."""
    most = 0
    while time.time() < until:
        with admin.connect() as conn:
            most = max(most, len(list(conn.execute(_BACKENDS_OF, {"role": role}))))
        time.sleep(0.25)
    return most


def wait_progress(admin: Engine, expected: Mapping[str, str], count: int, timeout: float) -> None:
    """Return once ``count`` tasks of ``expected`` have completed, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(done_ids(read_runs(admin, list(expected)))) >= count:
            return
        time.sleep(_POLL)


def exhaust(admin: Engine, fillers: Fillers, role: str, timeout: float) -> dict[str, Any]:
    """Fill the server with ``fillers``, then terminate every connection of ``role`` and
    take the slots they free: the server is full and ``role`` holds no connection.

    While the slots change hands (a few milliseconds) ``role`` has a ``CONNECTION
    LIMIT`` of 0, so its reconnections cannot win them; then it has none again
    and only ``max_connections`` refuses it.  Use a server of the scenario's own.
    """
    with admin.connect() as conn:
        name = conn.dialect.identifier_preparer.quote(role)
    fillers.fill()
    with admin.connect() as conn:
        conn.execute(sa.text(f"ALTER ROLE {name} CONNECTION LIMIT 0"))
        conn.commit()
    try:
        with admin.connect() as conn:
            pids = list(conn.execute(_BACKENDS_OF, {"role": role}).scalars())
            terminated = int(conn.execute(_TERMINATE_PIDS, {"pids": pids}).scalar_one())
            conn.commit()
        deadline = time.monotonic() + timeout
        while True:  # a terminated backend frees its slot when it has exited
            with admin.connect() as conn:
                if not list(conn.execute(_ALIVE_BACKENDS, {"pids": pids}).scalars()):
                    break
            if time.monotonic() > deadline:
                raise FaultError(f"terminated backends still there: {pids}")
            time.sleep(0.01)
        refusal = fillers.fill()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"ALTER ROLE {name} CONNECTION LIMIT -1"))
            conn.commit()
    return {"fillers": len(fillers.conns), "terminated": terminated, "refusal": refusal}


def refusal_for(url: URL) -> str | None:
    """The server's refusal of a connection to ``url``, or ``None`` if it connected."""
    try:
        with psycopg.connect(**libpq_kwargs(url)):
            return None
    except psycopg.OperationalError as exc:
        return str(exc).strip().splitlines()[-1]


class Publishing(threading.Thread):
    """Publish ``count`` tasks in a thread, with ``retry_policy``, waiting up to
    ``connect_timeout`` seconds for a broker connection; record each outcome.

    Celery's publish retry policy does not cover opening a connection: kombu
    gives up on that after ``broker_connection_timeout`` seconds.
    """

    def __init__(
        self,
        broker_url: str,
        queue: str,
        tenants: Sequence[str],
        count: int,
        retry_policy: Mapping[str, Any],
        connect_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(daemon=True)
        self.broker_url, self.queue, self.tenants = broker_url, queue, list(tenants)
        self.count, self.retry_policy, self.kwargs = count, dict(retry_policy), kwargs
        self.connect_timeout = connect_timeout
        self.attempted: dict[str, str] = {}
        self.sent: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.seconds: list[float] = []

    def run(self) -> None:
        with publisher(self.broker_url, self.queue) as app:
            app.conf.broker_connection_timeout = self.connect_timeout
            for index in range(self.count):
                tenant = self.tenants[index % len(self.tenants)]
                task_id = str(uuid.uuid4())
                self.attempted[task_id] = tenant
                started = time.monotonic()
                try:
                    with tenant_context(tenant):
                        app.send_task(
                            faults_app.RECORD,
                            task_id=task_id,
                            kwargs=self.kwargs,
                            retry_policy=self.retry_policy,
                        )
                except Exception as exc:  # recorded: the verdict names it
                    self.failed[task_id] = f"{type(exc).__name__}: {exc}"[:300]
                else:
                    self.sent[task_id] = tenant
                self.seconds.append(round(time.monotonic() - started, 2))


def connections_exhausted(
    launch: Launch,
    *,
    backend_url: str,
    tasks: int = 40,
    during: int = 8,
    full_for: float = 6.0,
    hold: float = 0.3,
    visibility_timeout: float = 6.0,
    retry_policy: Mapping[str, Any] = faults_app.PUBLISH_RETRY_POLICY,
    connect_timeout: float = 30.0,
    timeout: float = 180.0,
) -> FaultResult:
    """(j) Fill a private PostgreSQL's ``max_connections`` (the transport's messages and
    the tasks' rows in one database) while a prefork worker on the transport drains a
    backlog of late-acknowledged tasks, for ``full_for`` seconds.

    A full server leaves alone whoever already holds a connection, so the
    app role's connections (the worker's transport, its tasks' pools, this
    process's publisher) are terminated once it is full, and their slots
    taken: every one of them has to connect again into the full server.
    Meanwhile ``during`` tasks are published from a thread with ``retry_policy``
    and ``connect_timeout`` (Celery's ``broker_connection_timeout``), both longer
    than ``full_for``.  Then the fillers are closed.  The worker's tasks retry
    with the test app's settings: a retry whose publish must open a connection
    gives up after the worker's ``broker_connection_timeout``, and Celery then
    rejects the task without requeue (lost; ``lost_rejected`` says why).

    Survived when the worker was refused and reconnected by itself, nothing
    completed while the server was full, no publish failed, and every task
    (the backlog and those published while full) completed in its tenant.
    Tasks that completed twice are counted, each with its cause.
    """
    with contextlib.ExitStack() as stack:
        cluster, setup = stack.enter_context(private_database("to fill"))
        broker = broker_url_of(setup)
        result, queue, tenants, spec, admin = scene(
            setup,
            "max_connections reached",
            "pg-full",
            broker_url=broker,
            backend_url=backend_url,
            visibility_timeout=visibility_timeout,
        )
        stack.callback(admin.dispose)
        fillers = stack.enter_context(Fillers.on(cluster))
        runs: list[Run] = []
        with workers(launch) as start, publisher(broker, queue) as app:
            worker = start(spec)
            expected = publish(app, faults_app.RECORD, tenants, tasks, hold=hold)
            wait_progress(admin, expected, tasks // 4, timeout)
            started = time.monotonic()
            filled = exhaust(admin, fillers, setup.app_role, timeout)
            filled["seconds"] = round(time.monotonic() - started, 2)
            full_at = time.time()
            result.injected = 1
            pending = len(set(expected) - done_ids(read_runs(admin, list(expected))))
            probe = refusal_for(setup.app_url)
            late = Publishing(
                broker, queue, tenants, during, retry_policy, connect_timeout, hold=hold
            )
            late.start()
            most_app_backends = most_backends(admin, setup.app_role, until=full_at + full_for)
            released_at = time.time()
            fillers.release()
            late.join(timeout)
            result.require(not late.is_alive(), "publishing never ended after the server had room")
            expected.update(late.sent)
            runs = wait_done(admin, expected, timeout, worker)
            left = wait_queue_empty(admin, queue, visibility_timeout + 10)
            runs = read_runs(admin, [*expected, *late.attempted])
            log = worker.log_text()
            result.require(worker.alive, "the worker died")
            if not worker.alive:
                result.details["log_tail"] = _tail(worker)
    judge_exhausted(
        result,
        expected,
        runs,
        log,
        full_at=full_at,
        released_at=released_at,
        pending=pending,
        probe=probe,
        most_app_backends=most_app_backends,
        failed=late.failed,
        left=left,
    )
    result.details.update(
        filling=filled,
        full_seconds=round(released_at - full_at, 2),
        published_while_full=len(late.attempted),
        publish_seconds=late.seconds,
        visibility_timeout=visibility_timeout,
    )
    return result


_REJECTED = re.compile(r"Task [\w.]+\[([0-9a-f-]{36})\] reject requeue=False: (.*)")


def rejections(log: str) -> dict[str, str]:
    """``{task id: reason}`` of the tasks a worker's log says it rejected without requeue
    (Celery does so with a task whose retry it could not publish: the task is gone)."""
    return {match[1]: match[2][:300] for match in _REJECTED.finditer(log)}


def judge_exhausted(
    result: FaultResult,
    expected: Mapping[str, str],
    runs: Sequence[Run],
    log: str,
    *,
    full_at: float,
    released_at: float,
    pending: int,
    probe: str | None,
    most_app_backends: int,
    failed: Mapping[str, str],
    left: int,
) -> None:
    """Judge :func:`connections_exhausted` from the rows read (of ``expected``, the tasks
    whose publish returned, and of the publishes that failed) and the worker's ``log``."""
    account(result, expected, [run for run in runs if run.task_id in expected])
    missing = set(expected) - done_ids(runs)
    refused = len(_SERVER_FULL.findall(log))
    done_while_full = sorted(
        {r.task_id for r in runs if r.phase == "done" and full_at < r.recorded_at < released_at}
    )
    causes = duplicate_causes(runs, released_at)
    result.require(pending > 0, "nothing was pending when the server was full")
    result.require(
        probe is not None and _SERVER_FULL.search(probe) is not None,
        f"the app role was not refused by the full server: {probe}",
    )
    result.require(
        most_app_backends == 0,
        f"the app role held {most_app_backends} connections while the server was full",
    )
    result.require(
        not done_while_full,
        f"{len(done_while_full)} tasks completed while the server was full: it held nothing back",
    )
    result.require(refused > 0, "the worker's log shows no refusal by the full server")
    result.require(
        not failed,
        f"{len(failed)} publishes failed, their retry policy outlasting the outage: "
        f"{sorted(failed.values())[:2]}",
    )
    result.require(left == 0, f"{left} messages stayed in the queue after the worker drained it")
    result.require(
        _UNEXPLAINED not in causes,
        f"tasks completed twice for no reason the outage explains: {causes.get(_UNEXPLAINED)}",
    )
    if not result.problems:
        result.survived = result.injected
    result.details.update(
        pending_when_full=pending,
        app_role_refused_with=probe,
        worker_refusals_logged=refused,
        done_while_full=len(done_while_full),
        failed_publishes=dict(failed),
        lost_rejected={t: why for t, why in rejections(log).items() if t in missing},
        left_in_queue=left,
        duplicate_causes={cause: len(ids) for cause, ids in causes.items()},
        completed_twice_by_cause=causes,
    )


_RETRY_AND_ORIGINAL = (
    "a retry and the message it replaced both ran (the replaced message's "
    "acknowledgement was lost with its terminated connection)"
)
_LEASE_LAPSED = (
    "claimed before the server was full and claimed again once the worker reconnected "
    "(its lease lapsed, or its acknowledgement was lost with its terminated connection)"
)
_UNEXPLAINED = "none the outage explains"


def duplicate_causes(runs: Sequence[Run], outage_end: float) -> dict[str, list[str]]:
    """Tasks that completed more than once, by cause (see :func:`connections_exhausted`)."""
    by_task: dict[str, list[Run]] = {}
    for run in runs:
        by_task.setdefault(run.task_id, []).append(run)
    causes: dict[str, list[str]] = {}
    for task_id, task_runs in sorted(by_task.items()):
        done = [run for run in task_runs if run.phase == "done"]
        if len(done) < 2:
            continue
        first = min(run.recorded_at for run in task_runs)
        if len({run.attempt for run in done}) > 1:
            cause = _RETRY_AND_ORIGINAL
        elif first < outage_end:
            cause = _LEASE_LAPSED
        else:
            cause = _UNEXPLAINED
        causes.setdefault(cause, []).append(task_id)
    return causes


# ------------------------------------------------------------ (c) Redis restarted

KillMoment = Literal["draining", "waiting"]
"""When :func:`redis_restarted` kills Redis: see there."""


def _redis_counts(url: str, queue: str) -> dict[str, int]:
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        return {"queued": int(client.llen(queue)), "unacked": int(client.hlen("unacked"))}
    finally:
        client.close()


def _settled_counts(url: str, queue: str, timeout: float = 5.0) -> dict[str, int]:
    """:func:`_redis_counts` once nothing is unacknowledged, or after ``timeout`` s.

    A task's ``done`` row is written before its message is acknowledged.
    """
    deadline = time.monotonic() + timeout
    while True:
        counts = _redis_counts(url, queue)
        if counts["unacked"] == 0 or time.monotonic() > deadline:
            return counts
        time.sleep(_POLL)


def _wait_for_moment(
    moment: KillMoment,
    admin: Engine,
    worker: RunningWorker,
    server: RedisServer,
    queue: str,
    expected: Mapping[str, str],
    concurrency: int,
    timeout: float,
) -> None:
    """Return once it is ``moment`` to kill Redis (see :func:`redis_restarted`)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = read_runs(admin, list(expected))
        done = done_ids(runs)
        if moment == "draining":
            ready = len(done) >= max(1, len(expected) // 5)
        else:
            running = {r.task_id for r in runs if r.phase == "started"} - done
            stored = _redis_counts(server.url, queue)
            ready = bool(running) and stored["queued"] == 0 and 0 < stored["unacked"] < concurrency
        if ready:
            return
        if time.monotonic() > deadline or not worker.alive:
            raise FaultError(f"the worker never got to the {moment} moment:\n{_tail(worker)}")
        time.sleep(0.05)


def redis_restarted(
    setup: Setup,
    launch: Launch,
    server: RedisServer,
    *,
    backend_url: str,
    moment: KillMoment = "draining",
    tasks: int = 30,
    after: int = 10,
    hold: float = 0.2,
    down: float = 1.0,
    visibility_timeout: float = 6.0,
    timeout: float = 120.0,
) -> FaultResult:
    """(c) Kill ``server`` (SIGKILL) while a worker runs ``tasks`` late-acknowledged
    tasks, start it again ``down`` seconds later on the same port and data, publish
    ``after`` more (of 0.2 s each), and wait for all of them.

    ``moment`` is when Redis dies:

    ``"draining"``
        once a fifth of the tasks have completed: the worker is working through
        a backlog, so messages are both queued and unacknowledged in Redis.
    ``"waiting"``
        once the queue is empty and the worker holds fewer unacknowledged
        messages than it may prefetch, with one still running: it runs
        late-acknowledged tasks and waits for more (a ``BRPOP`` in flight).
        Use few tasks and a long ``hold`` (e.g. 1 and 4.0).  This is the state in
        which Celery 5.7 workers used to exit instead of reconnecting
        (:mod:`tenant_celery._worker_fixes`).

    ``server`` must persist every write (append-only file, ``appendfsync
    always``): what Redis acknowledged before the kill is what must survive.

    Survived when the worker reconnected by itself and every task published
    before and after the restart completed in its tenant.  A worker that exits
    instead is a failure; it is then restarted as a supervisor would, so the
    result still tells whether anything was lost (``worker_exited``).
    """
    if not server.appendonly:
        raise FaultError("the Redis restart needs a server with appendonly=True")
    result, queue, tenants, spec, admin = scene(
        setup,
        "Redis restarted under load",
        "restart",
        broker_url=server.url,
        backend_url=backend_url,
        visibility_timeout=visibility_timeout,
        tenants=3,
    )
    try:
        with workers(launch) as start, publisher(server.url, queue) as app:
            worker = start(spec)
            expected = publish(app, faults_app.RECORD, tenants, tasks, hold=hold)
            _wait_for_moment(
                moment, admin, worker, server, queue, expected, spec.concurrency, timeout
            )
            killed_at = time.time()
            server.kill(signal.SIGKILL)
            result.injected = 1
            before = read_runs(admin, list(expected))
            started_before = {r.task_id for r in before if r.phase == "started"}
            pending = set(expected) - done_ids(before)
            time.sleep(down)
            server.start()
            up_at = time.time()
            stored = _redis_counts(server.url, queue)
            later = publish(app, faults_app.RECORD, tenants, after, hold=0.2)
            expected.update(later)
            runs = wait_done(admin, expected, timeout, worker)
            exited = None
            if not worker.alive:
                exited = _exit_reason(worker)
                worker = start(spec)
                runs = wait_done(admin, expected, timeout, worker)
                result.require(worker.alive, "the restarted worker died")
            at_end = _settled_counts(server.url, queue)
    finally:
        admin.dispose()
    account(result, expected, runs)
    fresh = [
        r.recorded_at
        for r in runs
        if r.phase == "started" and r.task_id not in started_before and r.recorded_at > up_at
    ]
    result.require(exited is None, f"the worker exited instead of reconnecting: {exited}")
    result.require(bool(pending), "every task had completed before Redis was killed")
    result.require(bool(fresh), "the worker took no message from the restarted Redis")
    if not result.problems:
        result.survived = 1
    result.details.update(
        moment=moment,
        worker_exited=exited,
        reconnected_by_itself=exited is None,
        published_before=tasks,
        published_after=after,
        pending_at_kill=len(pending),
        in_redis_after_restart=stored,
        in_redis_at_end=at_end,
        redis_down_seconds=round(up_at - killed_at, 2),
        reconnect_seconds=round(min(fresh) - up_at, 2) if fresh else None,
    )
    return result


def _exit_reason(worker: RunningWorker) -> str:
    """The worker's last ``Unrecoverable error`` line, or a note that it exited."""
    lines = [line for line in worker.log_text().splitlines() if "Unrecoverable error" in line]
    return lines[-1].split("] ", 1)[-1][:200] if lines else "exited without a logged error"


# ------------------------------------------------------- (d) database unreachable


@dataclass(frozen=True)
class Health:
    status: int
    body: dict[str, Any]


def get_health(base_url: str, timeout: float = 10.0) -> Health:
    """``GET <base_url>/health``; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout) as reply:
            return Health(reply.status, json.loads(reply.read()))
    except urllib.error.HTTPError as error:
        with error:
            return Health(error.code, json.loads(error.read()))


def wait_health(base_url: str, status: int, timeout: float) -> Health:
    """Poll ``/health`` (its answer is cached for a moment) until it answers ``status``."""
    deadline = time.monotonic() + timeout
    while True:
        health = get_health(base_url)
        if health.status == status or time.monotonic() > deadline:
            return health
        time.sleep(0.25)


def monitor_url(worker: RunningWorker, timeout: float = 20.0) -> str:
    """The monitor's base URL, from the line the worker logs when it is ready."""
    deadline = time.monotonic() + timeout
    while True:
        match = _LISTENING.search(worker.log_text())
        if match:
            return match.group(1)
        if time.monotonic() > deadline:
            raise FaultError(f"the worker monitor never said where it listens:\n{_tail(worker)}")
        time.sleep(0.1)


def database_target(url: URL) -> tuple[str, int] | str:
    """Where ``url``'s server listens: ``(host, port)``, or a Unix socket path."""
    host = url.query.get("host") or url.host or "127.0.0.1"
    host = host if isinstance(host, str) else host[-1]
    port = url.port or int(str(url.query.get("port") or 5432))
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return host, port


def through(url: URL, proxy: TcpProxy) -> URL:
    """``url`` with its server replaced by ``proxy``."""
    query = {key: value for key, value in url.query.items() if key not in {"host", "port"}}
    return url.set(host="127.0.0.1", port=proxy.port, query=query)


def database_unreachable(
    setup: Setup,
    launch: Launch,
    *,
    broker_url: str,
    backend_url: str,
    down: float = 3.0,
    timeout: float = 60.0,
) -> FaultResult:
    """(d) Start a worker whose database (its tasks' and ``/health``'s) is behind a
    stopped proxy; publish a task; bring the proxy up after ``down`` seconds.

    ``backend_url`` must not be the database (use the broker's Redis).

    Survived when ``/health`` answered 503 naming the database while it was
    away, the worker stayed up, ``/health`` answered 200 once it was back, and
    the task published meanwhile completed in its tenant.
    """
    result = FaultResult("database unreachable at start", _label(broker_url), "prefork 2")
    queue = new_queue("nodb")
    tenants = new_tenants(1)
    admin = sa.create_engine(setup.admin_url, poolclass=sa.NullPool)
    try:
        with (
            TcpProxy(database_target(setup.admin_url)) as proxy,
            workers(launch) as start,
            publisher(broker_url, queue) as app,
        ):
            proxied = render(through(setup.app_url, proxy))
            spec = WorkerSpec(
                broker_url,
                backend_url,
                queue,
                proxied,
                environ={MONITOR_PORT_ENV: "0", DATABASE_URL_ENV: proxied},
            )
            worker = start(spec)
            result.injected = 1
            base = monitor_url(worker)
            away = get_health(base)
            expected = publish(app, faults_app.RECORD, tenants, 1)
            time.sleep(down)
            still = get_health(base)
            alive_while_away = worker.alive
            proxy.start()
            back_at = time.monotonic()
            back = wait_health(base, 200, timeout)
            recovered = round(time.monotonic() - back_at, 2)
            runs = wait_done(admin, expected, timeout, worker)
            result.require(worker.alive, "the worker died after the database came back")
    finally:
        admin.dispose()
        drop_queue(broker_url, queue)
    account(result, expected, runs)
    database = str(away.body.get("database", ""))
    result.require(away.status == 503, f"/health answered {away.status} with the database away")
    result.require(
        database not in {"", "ok", "not configured"} and str(proxy.port) in database,
        f"/health does not name the unreachable database: {away.body}",
    )
    result.require(away.body.get("broker") == "ok", f"/health blames the broker: {away.body}")
    result.require(still.status == 503, f"/health answered {still.status} {down}s later")
    result.require(alive_while_away, "the worker exited while the database was away")
    result.require(back.status == 200, f"/health still {back.status} after the database came back")
    attempts = [r.attempt for r in runs if r.phase == "done"]
    if not result.problems:
        result.survived = 1
    result.details.update(
        health_while_away={"status": away.status, "body": away.body},
        health_after={"status": back.status, "body": back.body},
        seconds_to_healthy=recovered,
        task_retries_while_away=attempts[0] if attempts else None,
    )
    return result


# ---------------------------------------------------------------------- the suite


def _label(broker_url: str) -> str:
    return broker_url.split(":", 1)[0].split("+", 1)[0].replace("amqp", "rabbitmq")


def _tail(worker: RunningWorker, lines: int = 30) -> str:
    return "\n".join(worker.log_text().splitlines()[-lines:])


def _failed(fault: str, broker: str, pool: str, exc: BaseException) -> FaultResult:
    result = FaultResult(fault, broker, pool, injected=1)
    result.problems.append(f"could not run: {type(exc).__name__}: {exc}"[:2000])
    return result


def _summary(result: FaultResult) -> str:
    details = result.details
    if result.problems:
        return "; ".join(result.problems)[:300]
    if "publisher_kills" in details:
        return (
            f"publisher killed {len(details['publisher_kills'])} times "
            f"({details['published_before_kill']} publishes returned first): all ran once, "
            f"{details['lost']} lost; {details['extra']} unconfirmed but committed ran "
            f"(the kill fell after the commit); the worker took "
            f"{details['later_completed']}/{details['later_tasks']} later tasks"
        )
    if "filling" in details:
        return (
            f"server full ({details['filling']['fillers']} connections of another role) for "
            f"{details['full_seconds']:g} s, the app role's connections terminated, "
            f"{details['pending_when_full']} tasks pending: the worker was refused, "
            f"reconnected by itself; {details['published_while_full']} published meanwhile, "
            f"none lost, {result.duplicates} run twice"
        )
    if "killed" in details:
        return (
            f"connections killed: {len(details['killed'])}; each task retried on a new one "
            f"in its tenant; later tasks on the recovered pool: "
            f"{details['later_completed']}/{details['later_tasks']}"
        )
    if "in_flight_at_kill" in details:
        return (
            f"running at the kill: {len(details['in_flight_at_kill'])}, all run again "
            f"{details['seconds_to_redelivery']} s later"
        )
    if "connections_terminated" in details:
        return (
            f"all the transport's connections terminated {len(details['connections_terminated'])}"
            f" times ({', '.join(map(str, details['connections_terminated']))} connections); "
            f"the worker reconnected by itself, every task completed in its tenant, "
            f"{result.duplicates} twice"
        )
    if "restarts" in details:
        return (
            "restarted "
            + ", ".join(
                f"{r['mode']} with {r['pending']} tasks pending ({r['seconds']:g} s)"
                for r in details["restarts"]
            )
            + f"; the worker reconnected by itself, none lost, {result.duplicates} run twice"
        )
    if "partitioned_running" in details:
        return (
            f"running when cut off: {len(details['partitioned_running'])}; run again by a "
            f"second worker once their {details['visibility_timeout']:g} s leases lapsed; the "
            "healed worker's acknowledgements deleted nothing the second held; both workers "
            "took work after"
        )
    if "frozen_running" in details:
        return (
            f"running when frozen: {len(details['frozen_running'])}, for "
            f"{details['frozen_seconds']} s; run again by a second worker once their "
            f"{details['visibility_timeout']:g} s leases lapsed, and finished by the resumed "
            "worker too (counted twice), whose acknowledgements deleted nothing the second "
            "held; both workers took work after"
        )
    if "reconnect_seconds" in details:
        return (
            f"pending at the kill: {details['pending_at_kill']}, none lost; the worker "
            f"reconnected by itself, taking messages {details['reconnect_seconds']} s "
            "after Redis was back"
        )
    return (
        f"503 naming the database while away, worker up; 200 "
        f"{details['seconds_to_healthy']} s after it came back; its task retried "
        f"{details['task_retries_while_away']} times, then completed"
    )


@dataclass
class _SuiteWorker:
    """A :class:`benchmarks._workers.Worker` seen as a :class:`RunningWorker`."""

    worker: Any

    @property
    def pid(self) -> int:
        return int(self.worker.process.pid)

    @property
    def alive(self) -> bool:
        return bool(self.worker.process.poll() is None)

    def log_text(self) -> str:
        try:
            return str(self.worker.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        self.worker.stop()


def _suite_launcher(ctx: ReliabilityContext) -> Launch:
    from benchmarks._workers import Transport, start_worker  # noqa: PLC0415

    def launch(spec: WorkerSpec) -> RunningWorker:
        transport = Transport(
            f"faults-{_label(spec.broker_url)}", spec.broker_url, spec.backend_url
        )
        worker = start_worker(
            ctx,
            transport,
            pool=spec.pool,
            concurrency=spec.concurrency,
            app_module=APP_MODULE,
            client=lambda broker, _backend, queue: faults_app.client(broker, queue),
            environ=spec.environment(),
            options=spec.arguments(),
        )
        return _SuiteWorker(worker)

    return launch


def run(ctx: ReliabilityContext) -> Section:
    """Inject every fault (connection kills: 1, 2 or 3 by size) and report what survived."""
    from reliability._common import Section, Tally  # noqa: PLC0415
    from reliability.load import broker_url  # noqa: PLC0415

    setup = Setup(admin_url=ctx.admin_url, app_url=ctx.app_url, app_role=ctx.app_role)
    prepare(setup)
    launch = _suite_launcher(ctx)
    pg_backend = "db+" + render(ctx.app_url)
    redis_url = ctx.redis_db(15)
    results: list[FaultResult] = []

    def attempt(fault: str, broker: str, scenario: Callable[[], FaultResult]) -> None:
        ctx.say(f"faults: {fault} ({broker})")
        try:
            outcome = scenario()
        except Exception as exc:  # a scenario that cannot run is a fault not survived
            outcome = _failed(fault, broker, "prefork 2", exc)
        results.append(outcome)

    attempt(
        "connection killed mid-task",
        "redis",
        lambda: connection_killed(
            setup,
            launch,
            broker_url=redis_url,
            backend_url=redis_url,
            kills=ctx.pick(smoke=1, default=2, full=3),
        ),
    )
    with contextlib.ExitStack() as stack:
        server: RedisServer | None = None
        unavailable: Exception | None = None
        try:
            server = stack.enter_context(private_redis())
        except RedisServerUnavailable as exc:
            unavailable = exc

        def own_redis() -> RedisServer:
            if server is None:
                raise unavailable or FaultError("no private redis-server")
            return server

        attempt(
            "worker SIGKILLed mid-task",
            "redis",
            lambda: worker_killed(
                setup, launch, broker_url=own_redis().url, backend_url=pg_backend
            ),
        )
        attempt(
            "worker SIGKILLed mid-task",
            "rabbitmq",
            lambda: worker_killed(setup, launch, broker_url=ctx.amqp_url, backend_url=pg_backend),
        )
        attempt(
            "Redis restarted under load",
            "redis",
            lambda: redis_restarted(
                setup,
                launch,
                own_redis(),
                backend_url=pg_backend,
                tasks=ctx.pick(smoke=20, default=40, full=100),
            ),
        )
    attempt(
        "database unreachable at start",
        "redis",
        lambda: database_unreachable(setup, launch, broker_url=redis_url, backend_url=redis_url),
    )
    # The package's transport, its messages in the same database as the tasks' rows.
    tcpg_url = broker_url(ctx, "tcpg")
    attempt(
        "connection killed mid-task",
        "tcpg",
        lambda: connection_killed(
            setup,
            launch,
            broker_url=tcpg_url,
            backend_url=redis_url,
            kills=ctx.pick(smoke=1, default=2, full=3),
        ),
    )
    attempt(
        "worker SIGKILLed mid-task",
        "tcpg",
        lambda: worker_killed(setup, launch, broker_url=tcpg_url, backend_url=pg_backend),
    )
    attempt(
        "PostgreSQL restarted under load",
        "tcpg",
        lambda: postgres_restarted(
            launch,
            backend_url=redis_url,
            tasks=ctx.pick(smoke=20, default=40, full=100),
        ),
    )
    attempt(
        "worker frozen past its leases",
        "tcpg",
        lambda: worker_frozen(setup, launch, broker_url=tcpg_url, backend_url=redis_url),
    )
    attempt(
        "broker partitioned from a worker",
        "tcpg",
        lambda: broker_partitioned(setup, launch, backend_url=redis_url),
    )
    attempt(
        "transport connections terminated",
        "tcpg",
        lambda: transport_connections_killed(
            setup,
            launch,
            broker_url=tcpg_url,
            backend_url=redis_url,
            tasks=ctx.pick(smoke=30, default=60, full=150),
            kills=ctx.pick(smoke=2, default=3, full=6),
        ),
    )
    attempt(
        "publisher SIGKILLed mid-batch",
        "tcpg",
        lambda: publisher_killed(
            setup,
            launch,
            broker_url=tcpg_url,
            backend_url=redis_url,
            kills=ctx.pick(smoke=1, default=3, full=6),
        ),
    )
    attempt(
        "max_connections reached",
        "tcpg",
        lambda: connections_exhausted(
            launch,
            backend_url=redis_url,
            tasks=ctx.pick(smoke=20, default=40, full=100),
        ),
    )

    table = ctx.report(
        "Faults injected and survived",
        ["fault", "broker", "pool", "injected", "survived", "tasks", "duplicates", "evidence"],
        [
            [
                r.fault,
                r.broker,
                r.pool,
                r.injected,
                r.survived,
                r.published,
                r.duplicates,
                _summary(r),
            ]
            for r in results
        ],
        notes=[
            "tasks: published in the scenario; every one must complete in its tenant, "
            "read back from an RLS table past RLS.",
            "duplicates: tasks that completed twice (late acknowledgement is at least once).",
        ],
    )
    section = Section(key="faults", title="Faults injected and survived")
    section.tables.append(table)
    section.data = {"faults": [r.to_json() for r in results]}
    section.tally = Tally(
        tasks_run=sum(r.executions for r in results),
        tenants=max((r.tenants for r in results), default=0),
        pools=sorted({r.pool for r in results}),
        brokers=sorted({r.broker for r in results}),
        cross_tenant_observations=sum(r.cross_tenant for r in results),
        tasks_unaccounted=sum(r.unaccounted for r in results),
        faults_injected=sum(r.injected for r in results),
        faults_survived=sum(r.survived for r in results),
    )
    for r in results:
        section.violations.extend(f"{r.fault} ({r.broker}): {problem}" for problem in r.problems)
    return section
