"""The Celery app the load and leak-proof workers run, and the tasks they record with.

Workers start it as ``celery -A reliability.load_app worker`` through
:func:`benchmarks._workers.start_worker`, which sets the broker, the queue
and the app role's database URL in the ``TC_BENCH_*`` variables of
:mod:`benchmarks.bench_app`; :data:`LABEL_ENV` names the worker in what its
tasks record.  The runner builds its own client copy with :func:`make_app`.

Every tenant task body runs :func:`record`, the way many Celery and Flask
applications reach their database: through a thread-local
:class:`~sqlalchemy.orm.scoped_session` (one ``Session`` per thread, kept
from task to task), over the process's engine, connected as the app role
(row-level security applies) and bound with
:func:`~tenant_celery.bind_tenant_guc`, so the hook sets the tenant as each
transaction begins.  In one transaction the task reads which tenants own the
newest rows it can see (:data:`ITEMS` and :data:`RUNS`), the tenant setting
and its connection's backend pid; a writing task adds an item; then it adds
its run to :data:`RUNS`, whose ``tenant_id`` defaults to the setting, and
commits.  A *careless* read-only task (``leave_open``) then reads once more
and returns without committing, closing or removing the session: its
transaction, begun under its tenant, is still open when the task ends.  Left
alone, the next task on that thread would run its statements in it, under
the careless task's tenant; the package rolls it back at the end of the task
and logs a warning naming the task (:data:`LEFT_OPEN_WARNING`).  The
engine's pool is small (:data:`POOL_SIZE`, no overflow) so connections pass
from tenant to tenant, and the threads pool's threads wait for each other's.

The tasks (all results ignored; the tables are the record):

* :data:`OBSERVE` ``(token, write, leave_open)``: read, maybe write; with
  ``leave_open``, read once more and leave that transaction open;
* :data:`SPAWN` ``(token, children)``: read, then publish one :data:`OBSERVE`
  per ``[child_token, write]`` from inside the task;
* :data:`STEP` ``(previous, token, write)``: a chain link; ``previous`` is the
  token the link before it returned;
* :data:`FLAKY` ``(token, write)``: records ``token#0`` and retries itself
  with a countdown of 1 s, then records ``token#1`` (writing, if asked);
* :data:`PROBE` ``(round)``: a plain task, no tenant, for the leak proof:
  checks out every connection of its process's pool at once, reads the
  tenant setting on each through the driver's connection (beneath the
  binding, which would show ``''``), and adds what it read to :data:`PROBES`.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from benchmarks.bench_app import APP_DB_URL_ENV, BACKEND_URL_ENV, BROKER_URL_ENV, QUEUE_ENV
from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import scoped_session, sessionmaker

from tenant_celery import DEFAULT_GUC, bind_tenant_guc, current_tenant, tenant_task

LABEL_ENV = "TC_REL_LABEL"
"""How the worker's runs are labelled, e.g. ``redis prefork 2``."""

ITEMS = "rel_items"
"""Tenant rows (RLS, forced): ``tenant_id uuid``, ``id`` identity, ``token text``
(``NULL`` for the seed rows); primary key ``(tenant_id, id)``."""
RUNS = "rel_runs"
"""One row per run of a task body (RLS, forced): ``tenant_id`` (defaults to the
tenant setting), ``id``, ``token``, ``ran_as`` (the tenant context),
``setting`` (the tenant setting as read), ``seen uuid[]``, ``previous``,
``label``, ``pid``, ``thread``, ``backend_pid``, ``recorded_at``."""
PROBES = "rel_probes"
"""The leak probes' readings (no RLS: they belong to no tenant): ``label``,
``pid``, ``round``, ``pool_size``, ``backend_pid``, ``setting``."""

POOL_SIZE = 2
"""Connections in each worker process's engine pool (and no overflow)."""

OBSERVE = "rel.observe"
SPAWN = "rel.spawn"
STEP = "rel.step"
FLAKY = "rel.flaky"
PROBE = "rel.probe"

LEFT_OPEN_WARNING = "ended with a transaction still open"
"""What the warning the package logs for each transaction it rolls back at the end of
a task says, after ``task <name>[<id>]``."""

SEEN_ROWS = 50
"""How many of the newest items (and runs, a tenth as many) a task looks at."""

_READ = text(
    f"SELECT ARRAY(SELECT tenant_id FROM (SELECT tenant_id FROM {ITEMS} ORDER BY id DESC "
    f"LIMIT {SEEN_ROWS}) AS items UNION SELECT tenant_id FROM (SELECT tenant_id FROM {RUNS} "
    f"ORDER BY id DESC LIMIT {SEEN_ROWS // 10}) AS runs), "
    "current_setting(:setting, true), pg_backend_pid()"
)
_WRITE = text(f"INSERT INTO {ITEMS} (tenant_id, token) VALUES (CAST(:tenant AS uuid), :token)")
_RECORD = text(
    f"INSERT INTO {RUNS} (token, ran_as, setting, seen, previous, label, pid, thread, "
    "backend_pid) VALUES (:token, :ran_as, :setting, CAST(:seen AS uuid[]), :previous, "
    ":label, :pid, :thread, :backend_pid)"
)
_STILL_READING = text(f"SELECT count(*) FROM {ITEMS}")
_RAW_SETTING = "SELECT current_setting(%s, true), pg_backend_pid()"
_PROBED = text(
    f"INSERT INTO {PROBES} (label, pid, round, pool_size, backend_pid, setting) "
    "VALUES (:label, :pid, :round, :pool_size, :backend_pid, :setting)"
)


class _ProcessEngine:
    """The app role's engine, made once per process (a prefork child never uses its
    parent's connections), bound with :func:`~tenant_celery.bind_tenant_guc`, and the
    thread-local sessions over it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._engine: Engine | None = None
        self._sessions: scoped_session[Any] | None = None
        self.probing = threading.Lock()
        """Held by a probe while it holds the whole pool: two probes each holding
        half of it would wait for each other."""

    def get(self) -> Engine:
        with self._lock:
            if self._engine is None or self._pid != os.getpid():
                url = os.environ.get(APP_DB_URL_ENV)
                if not url:
                    raise RuntimeError(f"{APP_DB_URL_ENV} is not set: the runner starts workers")
                engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=0)
                bind_tenant_guc(engine)
                self._pid, self._engine = os.getpid(), engine
                self._sessions = scoped_session(sessionmaker(bind=engine))
                self.probing = threading.Lock()
            return self._engine

    def sessions(self) -> scoped_session[Any]:
        """The process's thread-local sessions (``sessions()`` is this thread's)."""
        self.get()
        with self._lock:
            if self._sessions is None:
                raise RuntimeError("no sessions: the engine was not made")
            return self._sessions


_engine = _ProcessEngine()


def record(
    token: str, *, write: bool = False, previous: str | None = None, leave_open: bool = False
) -> None:
    """Read what the tenant can see, maybe write an item, and add this run to :data:`RUNS`.

    One transaction of this thread's session, begun inside the task's tenant
    (the bound hook sets the tenant setting first), committed.  With
    ``leave_open``, the session then reads again and is left as it is: a
    transaction open when the task returns.  Raises whatever the database
    raises (a write outside the tenant is refused by the policy).
    """
    tenant = current_tenant()
    session = _engine.sessions()()
    try:
        seen, setting, backend_pid = session.execute(_READ, {"setting": DEFAULT_GUC}).one()
        if write:
            session.execute(_WRITE, {"tenant": tenant, "token": token})
        session.execute(
            _RECORD,
            {
                "token": token,
                "ran_as": tenant,
                "setting": setting,
                "seen": [str(s) for s in seen],
                "previous": previous,
                "label": os.environ.get(LABEL_ENV, ""),
                "pid": os.getpid(),
                "thread": threading.get_ident() % 2**31,
                "backend_pid": backend_pid,
            },
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    if leave_open:
        # A read-only task that never commits, closes or removes its session.
        session.execute(_STILL_READING).scalar_one()


def probe_pool(round_number: int) -> int:
    """Read the tenant setting on every connection of this process's pool; return how many.

    Every connection is checked out at once (so none is skipped) and read
    through its driver connection, beneath the engine: a transaction the
    engine begins outside any tenant has the setting ``''`` (the binding sets
    it, so that a session-level value cannot show), which would hide the very
    value the probe looks for.  The readings are added to :data:`PROBES`.
    """
    engine = _engine.get()
    readings: list[dict[str, Any]] = []
    with _engine.probing:
        size = engine.pool.size()  # type: ignore[attr-defined]
        connections = [engine.raw_connection() for _ in range(size)]
        try:
            for dbapi in connections:
                cursor = dbapi.cursor()
                try:
                    cursor.execute(_RAW_SETTING, (DEFAULT_GUC,))
                    setting, backend_pid = cursor.fetchone()
                finally:
                    cursor.close()
                dbapi.rollback()
                readings.append({"backend_pid": backend_pid, "setting": setting})
        finally:
            for dbapi in connections:
                dbapi.close()
    label, pid = os.environ.get(LABEL_ENV, ""), os.getpid()
    with engine.begin() as conn:
        conn.execute(
            _PROBED,
            [
                {**r, "label": label, "pid": pid, "round": round_number, "pool_size": size}
                for r in readings
            ],
        )
    return len(readings)


def make_app(broker_url: str, backend_url: str | None, queue: str) -> Celery:
    """A Celery app with the load tasks, for a worker or a client (results ignored)."""
    app = Celery("reliability", broker=broker_url, backend=backend_url)
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
    )

    @tenant_task(app=app, name=OBSERVE, shared=False)
    def observe(token: str, write: bool = False, leave_open: bool = False) -> str:
        record(token, write=write, leave_open=leave_open)
        return token

    @tenant_task(app=app, name=SPAWN, shared=False)
    def spawn(token: str, children: list[list[Any]]) -> str:
        record(token)
        for child, write in children:
            observe.delay(child, write)  # stamped with this task's tenant
        return token

    @tenant_task(app=app, name=STEP, shared=False)
    def step(previous: str | None, token: str, write: bool = False) -> str:
        record(token, write=write, previous=previous)
        return token

    @tenant_task(app=app, name=FLAKY, shared=False, bind=True, max_retries=3)
    def flaky(self: Any, token: str, write: bool = False) -> str:
        attempt = self.request.retries
        record(f"{token}#{attempt}", write=write and attempt > 0)
        if attempt == 0:
            raise self.retry(countdown=1)
        return token

    @app.task(name=PROBE, shared=False)
    def probe(round_number: int) -> int:
        return probe_pool(round_number)

    return app


def _worker_app() -> Celery:
    broker = os.environ.get(BROKER_URL_ENV)
    if not broker:
        raise RuntimeError(f"{BROKER_URL_ENV} is not set: the runner starts these workers")
    return make_app(
        broker, os.environ.get(BACKEND_URL_ENV) or None, os.environ.get(QUEUE_ENV) or "celery"
    )


def __getattr__(name: str) -> Any:
    # ``celery -A reliability.load_app`` looks up ``app``; build it only then, so
    # the runner can import this module for make_app() without a broker set.
    if name in ("app", "celery"):
        built = _worker_app()
        globals()["app"] = globals()["celery"] = built
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
