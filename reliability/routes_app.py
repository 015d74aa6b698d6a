"""The Celery app the replay-route workers run: tenant tasks that leave a row where they ran.

Workers start it as ``celery -A reliability.routes_app worker`` through
:func:`benchmarks._workers.start_worker` (the ``TC_BENCH_*`` variables of
:mod:`benchmarks.bench_app` give the broker, the result backend, the queue and
the app role's database URL); a signed worker also gets
``TENANT_CELERY_HEADER_SIGNING_KEYS``.  The runner builds its client copy with
:func:`make_app`, which registers the same tasks and the same beat schedule.

Every tenant task body writes through one engine per process, connected as the
app role (row-level security applies) and bound with
:func:`~tenant_celery.bind_tenant_guc`, into :data:`NOTES`, whose
``tenant_id`` defaults to the tenant setting: a row's tenant is the tenant the
body ran in, whatever the task was told.  The tasks:

* :data:`WRITE_NOTE` ``(key)``: one row;
* :data:`WRITE_FOR` ``(tenant_id, key)``: one row; its tenant is its first
  parameter, as ``celery.starmap`` items give it;
* :data:`PURGE` ``(tenant_id)``: deletes every row its tenant can see (the
  policy limits it to that tenant); ``celery.map`` calls it with one item;
* :data:`WRITE_EACH` ``(key)``: one row, the task the beat schedule's fan-outs
  (:data:`FAN_OUT_ENTRY`, :data:`CONTROL_ENTRY`) run for every
  :data:`LISTED` tenant;
* :data:`COLLECT` ``(results, key)``: a chord callback, one row;
* :data:`PLAIN_NOOP`: a plain task, to carry callbacks.

:func:`listed_tenants` is the app's tenant lister; :func:`noisy_lister` is a
lister no schedule names, which adds a row to :data:`CALLS` (no row-level
security) when it is called.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from benchmarks.bench_app import APP_DB_URL_ENV, BACKEND_URL_ENV, BROKER_URL_ENV, QUEUE_ENV
from celery import Celery
from sqlalchemy import NullPool, create_engine, text
from sqlalchemy.engine import Engine

from tenant_celery import bind_tenant_guc, current_tenant, every_tenant, tenant_task

NOTES = "rel_route_notes"
"""Rows the tenant tasks write (RLS, forced): ``id``, ``tenant_id`` (defaults to the
tenant setting), ``key``."""
CALLS = "rel_route_calls"
"""Calls of :func:`noisy_lister` (no RLS): ``key``, ``pid``."""

WRITE_NOTE = "rel.routes.write_note"
WRITE_FOR = "rel.routes.write_for"
PURGE = "rel.routes.purge"
WRITE_EACH = "rel.routes.write_each"
COLLECT = "rel.routes.collect"
PLAIN_NOOP = "rel.routes.plain_noop"

LISTED = ("5e1f0c3a-0000-4000-8000-0000000000a1", "5e1f0c3a-0000-4000-8000-0000000000b2")
"""The tenants the app's lister returns: where its fan-outs run."""
LISTER = f"{__name__}:listed_tenants"
NOISY_LISTER = f"{__name__}:noisy_lister"
FAN_OUT_ENTRY = "notes-every-tenant"
"""The schedule entry the hostile route replays unsigned: its rows have the key ``beat``."""
CONTROL_ENTRY = "control-every-tenant"
"""The schedule entry published as celery beat would (signed): its rows have the key ``control``."""

FAN_OUT_KEY, CONTROL_KEY = "beat", "control"
ENTRY_OF_KEY = {FAN_OUT_KEY: FAN_OUT_ENTRY, CONTROL_KEY: CONTROL_ENTRY}
"""The schedule entry whose fan-out writes rows with each key."""

_WRITE = text(f"INSERT INTO {NOTES} (key) VALUES (:key)")
_PURGE = text(f"DELETE FROM {NOTES}")
_CALLED = text(f"INSERT INTO {CALLS} (key, pid) VALUES (:key, :pid)")


class _ProcessEngine:
    """The app role's engine, made once per process (a prefork child never uses its
    parent's), bound with :func:`~tenant_celery.bind_tenant_guc`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._engine: Engine | None = None

    def get(self) -> Engine:
        with self._lock:
            if self._engine is None or self._pid != os.getpid():
                url = os.environ.get(APP_DB_URL_ENV)
                if not url:
                    raise RuntimeError(f"{APP_DB_URL_ENV} is not set: the runner starts workers")
                engine = create_engine(url, poolclass=NullPool)
                bind_tenant_guc(engine)
                self._pid, self._engine = os.getpid(), engine
            return self._engine


_engine = _ProcessEngine()


def write(key: str) -> str | None:
    """Add a row with ``key`` in the current tenant; return that tenant."""
    with _engine.get().begin() as conn:
        conn.execute(_WRITE, {"key": key})
    return current_tenant()


def listed_tenants() -> list[str]:
    """The app's tenant lister, named by its beat schedule."""
    return list(LISTED)


def noisy_lister() -> list[str]:
    """A lister no schedule names: a row of :data:`CALLS` shows it was called."""
    with _engine.get().begin() as conn:
        conn.execute(_CALLED, {"key": "noisy", "pid": os.getpid()})
    return list(LISTED)


def make_app(broker_url: str, backend_url: str | None, queue: str) -> Celery:
    """A Celery app with the route tasks and beat schedule, for a worker or a client."""
    app = Celery("reliability_routes", broker=broker_url, backend=backend_url)
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        result_expires=3600,
    )

    @tenant_task(app=app, name=WRITE_NOTE, shared=False)
    def write_note(key: str) -> str | None:
        return write(key)

    @tenant_task(app=app, name=WRITE_FOR, shared=False)
    def write_for(tenant_id: str, key: str) -> str | None:
        return write(key)

    @tenant_task(app=app, name=PURGE, shared=False)
    def purge(tenant_id: str) -> int:
        with _engine.get().begin() as conn:
            return int(conn.execute(_PURGE).rowcount)

    @tenant_task(app=app, name=WRITE_EACH, shared=False)
    def write_each(key: str) -> str | None:
        return write(key)

    @tenant_task(app=app, name=COLLECT, shared=False)
    def collect(results: list[Any], key: str) -> list[Any]:
        return [*results, write(key)]

    @app.task(name=PLAIN_NOOP, shared=False)
    def plain_noop() -> None:
        """A plain task, for messages that carry callbacks."""

    app.conf.beat_schedule = {
        FAN_OUT_ENTRY: every_tenant(write_each, tenants=LISTER, schedule=3600, args=(FAN_OUT_KEY,)),
        CONTROL_ENTRY: every_tenant(write_each, tenants=LISTER, schedule=3600, args=(CONTROL_KEY,)),
    }
    return app


def _worker_app() -> Celery:
    broker = os.environ.get(BROKER_URL_ENV)
    if not broker:
        raise RuntimeError(f"{BROKER_URL_ENV} is not set: the runner starts these workers")
    return make_app(
        broker, os.environ.get(BACKEND_URL_ENV) or None, os.environ.get(QUEUE_ENV) or "celery"
    )


def __getattr__(name: str) -> Any:
    # ``celery -A reliability.routes_app`` looks up ``app``; build it only then, so
    # the runner can import this module for make_app() without a broker set.
    if name in ("app", "celery"):
        built = _worker_app()
        globals()["app"] = globals()["celery"] = built
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
