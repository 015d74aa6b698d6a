"""The Celery app the benchmark workers run, and the tasks they time.

Workers start it as ``celery -A benchmarks.bench_app worker`` with the
``TC_BENCH_*`` variables below set; the runner builds its own client copy with
:func:`make_app`, which registers the same tasks under the same names.

The P1 body is one indexed ``SELECT`` and one ``INSERT`` on the RLS-protected
:data:`~benchmarks._common.ITEMS_TABLE`, in one transaction:

* :func:`plain_rw` is what a host writes without tenant-celery: a plain task
  given its tenant as an argument, filtering by it itself, connected as a role
  that row-level security does not apply to (``BYPASSRLS``);
* :func:`tenant_rw` is a tenant task on an engine bound with
  :func:`~tenant_celery.bind_tenant_guc`, connected as the app role (RLS
  applies): the tenant travels in the message header and the GUC is set by
  the hook, in a round trip the transaction makes anyway;
* :func:`tenant_rw_own_statement` is the same tenant task on an engine that
  is not bound, setting the GUC with :func:`~tenant_celery.set_tenant_guc`:
  a statement of its own, as the binding's fallback sends it;
* :func:`tenant_rw_task_only` and :func:`tenant_rw_no_policy` take the package
  apart in layers: the tenant task on an engine like the plain task's (the
  task's own work only: publishing, the header, the worker's checks), and on
  an engine bound with :func:`~tenant_celery.bind_tenant_guc` but connected as
  the ``BYPASSRLS`` role (the binding as well, the policy not).

Each returns the wall-clock time the body finished, how long the body took
(the transaction, ``set_config`` included) and the number of statements
their engine ran during the call, counted by a ``before_cursor_execute``
listener (a real count, not a constant) on engines built with
``count_statements=True``.  Timed runs use engines without it: any connection
event listener switches on SQLAlchemy's dispatch at every statement, begin
and commit, which a host's engine without instrumentation does not pay.

P3 and P4 time :func:`tenant_noop`, a tenant task with no body, so the
broker, the result backend and the per-task overhead are all there is.

P5 runs :func:`tenant_sleep`, a tenant task that sleeps a few milliseconds
and returns its tenant, the publish time it was given and the time its body
started: its latency from publish to start, measured by the task itself.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from celery import Celery
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from tenant_celery import bind_tenant_guc, current_tenant, set_tenant_guc, tenant_task

BROKER_URL_ENV = "TC_BENCH_BROKER_URL"
BACKEND_URL_ENV = "TC_BENCH_BACKEND_URL"
QUEUE_ENV = "TC_BENCH_QUEUE"
APP_DB_URL_ENV = "TC_BENCH_APP_DB_URL"
"""The scratch database as the app role (RLS applies): the tenant task's engine."""
PLAIN_DB_URL_ENV = "TC_BENCH_PLAIN_DB_URL"
"""The scratch database as the BYPASSRLS role: the plain task's engine."""
CONF_ENV = "TC_BENCH_CONF"
"""Settings to add to the worker's app, as a JSON object (e.g. ``task_acks_late``)."""
OBSERVABILITY_ENV = "TC_BENCH_OBSERVABILITY"
"""``1``: the worker logs JSON (:func:`~tenant_celery.logging.configure_logging`)
and counts tasks (:func:`~tenant_celery.metrics.install_metrics`)."""

PLAIN_RW = "bench.plain_rw"
TENANT_RW = "bench.tenant_rw"
TENANT_RW_OWN_STATEMENT = "bench.tenant_rw_own_statement"
TENANT_RW_TASK_ONLY = "bench.tenant_rw_task_only"
TENANT_RW_NO_POLICY = "bench.tenant_rw_no_policy"
TENANT_NOOP = "bench.tenant_noop"
TENANT_SLEEP = "bench.tenant_sleep"

SELECT_LAST = text(
    "SELECT id, payload FROM bench_items WHERE tenant_id = CAST(:tenant AS uuid) "
    "ORDER BY id DESC LIMIT 1"
)
INSERT_ITEM = text(
    "INSERT INTO bench_items (tenant_id, payload) VALUES (CAST(:tenant AS uuid), :payload)"
)


class _Counted:
    """An engine per process, and the statements it has run (``before_cursor_execute``,
    when ``count``)."""

    def __init__(self, url: str, *, tenant_guc: bool, count: bool = False) -> None:
        self.url = url
        self.tenant_guc = tenant_guc
        self.count = count
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self.statements = 0
        #: The measured run the engine's connections were opened for (see ``counted``).
        self.run = 0

    def sessions(self) -> sessionmaker[Session]:
        # Built lazily in the process that runs tasks: a prefork child must not
        # reuse connections its parent opened before the fork.
        with self._lock:
            if self._sessions is None or self._pid != os.getpid():
                engine = create_engine(self.url, pool_size=2, max_overflow=0)
                if self.count:
                    event.listen(engine, "before_cursor_execute", self._count)
                if self.tenant_guc:
                    bind_tenant_guc(engine)
                self._pid, self._engine = os.getpid(), engine
                self._sessions = sessionmaker(engine)
            return self._sessions

    def _count(self, *_: Any) -> None:
        self.statements += 1

    def dispose(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
            self._engine = self._sessions = None


class Engines:
    """The P1 tasks' engines: ``plain`` as the BYPASSRLS role, ``tenant`` as the app
    role, bound with :func:`~tenant_celery.bind_tenant_guc`; ``own_statement`` as the
    app role, not bound; ``task_only`` as ``plain`` and ``no_policy`` bound, both as
    the BYPASSRLS role.  Each is created lazily, once per process;
    ``count_statements`` counts what each runs."""

    def __init__(self, *, app_url: str, plain_url: str, count_statements: bool = False) -> None:
        count = count_statements
        self.by_name = {
            "plain": _Counted(plain_url, tenant_guc=False, count=count),
            "tenant": _Counted(app_url, tenant_guc=True, count=count),
            "own_statement": _Counted(app_url, tenant_guc=False, count=count),
            "task_only": _Counted(plain_url, tenant_guc=False, count=count),
            "no_policy": _Counted(plain_url, tenant_guc=True, count=count),
        }

    def dispose(self) -> None:
        for engine in self.by_name.values():
            engine.dispose()


def p1_body(sessions: sessionmaker[Session], tenant: str, own_statement: bool = False) -> None:
    """The P1 body: read the tenant's newest item, then add one."""
    with sessions() as session, session.begin():
        if own_statement:
            set_tenant_guc(session, tenant)
        session.execute(SELECT_LAST, {"tenant": tenant}).first()
        session.execute(INSERT_ITEM, {"tenant": tenant, "payload": "benchmark"})


POOLED_PREFIX = "pooled+"
"""A backend URL ``pooled+<SQLAlchemy URL>`` selects
:class:`tenant_celery.results.PooledDatabaseBackend` on that database."""


def _backend(url: str | None) -> str | None:
    if url and url.startswith(POOLED_PREFIX):
        return "tenant_celery.results:PooledDatabaseBackend"
    return url


def make_app(
    broker_url: str,
    backend_url: str | None,
    queue: str,
    engines: Engines | None = None,
) -> Celery:
    """A Celery app with the benchmark tasks, for a worker or a client.

    ``engines`` is needed only where the P1 tasks run: a worker, or the runner
    for ``apply()``; the caller disposes of them.
    """
    app = Celery("bench", broker=broker_url, backend=_backend(backend_url))
    if backend_url and backend_url.startswith(POOLED_PREFIX):
        app.conf.database_url = backend_url[len(POOLED_PREFIX) :]
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
    )

    def counted(which: str, tenant_id: str, run: int) -> dict[str, Any]:
        if engines is None:
            raise RuntimeError(
                f"the P1 tasks need databases: set {APP_DB_URL_ENV} and {PLAIN_DB_URL_ENV}"
            )
        engine = engines.by_name[which]
        if run != engine.run:
            # A new run, new connections: a server process keeps the CPU placement it
            # started with for life, which can make one engine's round trips faster
            # or slower than another's for a whole measurement.
            engine.dispose()
            engine.run = run
        sessions = engine.sessions()
        before, started = engine.statements, time.perf_counter()
        p1_body(sessions, tenant_id, own_statement=which == "own_statement")
        return {
            "done": time.time(),
            "body_s": time.perf_counter() - started,
            "statements": engine.statements - before,
        }

    def in_tenant(which: str, run: int) -> dict[str, Any]:
        found = current_tenant()
        if found is None:  # cannot happen: a tenant task's body runs inside its tenant
            raise RuntimeError(f"the {which} tenant task ran without a tenant")
        return counted(which, found, run)

    @app.task(name=PLAIN_RW, shared=False)
    def plain_rw(tenant: str, run: int = 0) -> dict[str, Any]:
        return counted("plain", tenant, run)

    @tenant_task(app=app, name=TENANT_RW, shared=False)
    def tenant_rw(run: int = 0) -> dict[str, Any]:
        return in_tenant("tenant", run)

    @tenant_task(app=app, name=TENANT_RW_OWN_STATEMENT, shared=False)
    def tenant_rw_own_statement() -> dict[str, Any]:
        return in_tenant("own_statement", 0)

    @tenant_task(app=app, name=TENANT_RW_TASK_ONLY, shared=False)
    def tenant_rw_task_only(run: int = 0) -> dict[str, Any]:
        return in_tenant("task_only", run)

    @tenant_task(app=app, name=TENANT_RW_NO_POLICY, shared=False)
    def tenant_rw_no_policy(run: int = 0) -> dict[str, Any]:
        return in_tenant("no_policy", run)

    @tenant_task(app=app, name=TENANT_NOOP, shared=False)
    def tenant_noop() -> dict[str, Any]:
        return {"done": time.time()}

    @tenant_task(app=app, name=TENANT_SLEEP, shared=False)
    def tenant_sleep(sent: float, ms: float) -> dict[str, Any]:
        started = time.time()
        time.sleep(ms / 1000)
        return {"tenant": current_tenant(), "sent": sent, "started": started, "done": time.time()}

    return app


def _worker_app() -> Celery:
    engines = None
    if os.environ.get(APP_DB_URL_ENV) and os.environ.get(PLAIN_DB_URL_ENV):
        engines = Engines(
            app_url=os.environ[APP_DB_URL_ENV], plain_url=os.environ[PLAIN_DB_URL_ENV]
        )
    broker = os.environ.get(BROKER_URL_ENV)
    if not broker:
        raise RuntimeError(f"{BROKER_URL_ENV} is not set: the runner starts these workers")
    built = make_app(
        broker, os.environ.get(BACKEND_URL_ENV) or None, os.environ.get(QUEUE_ENV) or "celery",
        engines,
    )  # fmt: skip
    if os.environ.get(CONF_ENV):
        built.conf.update(json.loads(os.environ[CONF_ENV]))
    if os.environ.get(OBSERVABILITY_ENV) == "1":
        from tenant_celery.logging import configure_logging  # noqa: PLC0415
        from tenant_celery.metrics import install_metrics  # noqa: PLC0415

        configure_logging()
        install_metrics(built)
    return built


def __getattr__(name: str) -> Any:
    # ``celery -A benchmarks.bench_app`` looks up ``app``; build it only then, so
    # the runner can import this module for make_app() without a broker set.
    if name in ("app", "celery"):
        built = _worker_app()
        globals()["app"] = globals()["celery"] = built
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
