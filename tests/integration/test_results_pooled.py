"""``tenant_celery.results``: Celery's database result backend on one pooled engine per process.

Everything runs against real PostgreSQL as ``app_user`` (no superuser, no CREATE
right) on the bundled migration's tables. In this process: connections are
counted with a ``connect`` listener installed through Celery's own
``database_engine_callback``. In real ``celery worker`` processes (solo, threads,
prefork), the example of ``docs/howto/result-backend.md`` runs as written and the
server's own session counter (``pg_stat_database.sessions``) tells how many
connections the run opened.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.exceptions import ImproperlyConfigured
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tenant_celery import bind_tenant_guc, tenant_context
from tenant_celery.migrations import upgrade
from tenant_celery.results import PooledDatabaseBackend, PooledSessionManager, dispose_engines
from tests._rig.postgres import APP_ROLE, Database, render
from tests._rig.services import Services
from tests._rig.worker import Pool, WorkerFactory, rebind_app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "results"
PAGE = ROOT / "docs" / "howto" / "result-backend.md"
POOLED = "tenant_celery.results:PooledDatabaseBackend"
TENANT_A = "6f1c1d52-1f0e-4c39-9a43-5b1f0c1e2a01"
TENANT_B = "0d5b7f7e-3c7a-4d0b-8c55-2a9e4b6f1c02"


@pytest.fixture
def migrated(database: Database) -> Iterator[Database]:
    """``database`` with the Celery tables granted to ``app_user``; pooled engines
    released afterwards so the database can be dropped."""
    upgrade(database.url, grant_to=[APP_ROLE])
    yield database
    dispose_engines()


class Connects:
    """A ``database_engine_callback`` that counts the connections its engines open."""

    def __init__(self) -> None:
        self.count = 0
        self.engines: list[Engine] = []
        self._lock = threading.Lock()

    def __call__(self, engine: Engine) -> None:
        self.engines.append(engine)
        event.listen(engine, "connect", self._on_connect)

    def _on_connect(self, *_: Any) -> None:
        with self._lock:
            self.count += 1


def results_app(database: Database, backend: str = POOLED, **conf: Any) -> Celery:
    """An app storing results in ``database`` as ``app_user`` with ``backend``."""
    app = Celery("results_test", set_as_current=False)
    app.conf.update(
        result_backend=backend,
        database_url=render(database.app_url),
        result_serializer="json",
        accept_content=["json"],
        **conf,
    )
    return app


def store_and_read(app: Celery, count: int, tag: str = "") -> None:
    """``count`` times: store a result under a new id, read it back, check it."""
    backend = app.backend
    for n in range(count):
        task_id = str(uuid.uuid4())
        backend.store_result(task_id, {"n": n, "tag": tag}, "SUCCESS")
        meta = backend.get_task_meta(task_id)
        assert (meta["status"], meta["result"]) == ("SUCCESS", {"n": n, "tag": tag})


def stored_results(database: Database) -> int:
    with database.admin_engine().connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM celery_taskmeta")).scalar_one())


def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def result_engine(app: Celery) -> Engine:
    backend = app.backend
    assert isinstance(backend, PooledDatabaseBackend)
    return backend.session_manager.get_engine(backend.url, **backend.engine_options)


# ----------------------------------------------------------------- in this process


def test_one_connection_serves_every_call(migrated: Database) -> None:
    pooled = Connects()
    app = results_app(migrated, database_engine_callback=pooled)
    # Counted by the server: Celery's own backend reads database_engine_callback
    # only from 5.5.
    stock = results_app(migrated, "database")

    store_and_read(app, 30)
    before = sessions(migrated)
    store_and_read(stock, 10)

    assert isinstance(app.backend, PooledDatabaseBackend)
    assert isinstance(app.backend.session_manager, PooledSessionManager)
    assert pooled.count == 1, "the pooled backend must reuse its one connection"
    assert len(pooled.engines) == 1
    # The yardstick: Celery's backend connects again for every store and every read.
    assert sessions_since(migrated, before, at_least=20) >= 20
    assert stored_results(migrated) == 40


def test_engine_options_reach_the_pool(migrated: Database) -> None:
    app = results_app(
        migrated,
        database_engine_options={
            "pool_size": 3,
            "max_overflow": 1,
            "pool_pre_ping": True,
            "connect_args": {"application_name": "results-test"},
        },
    )
    store_and_read(app, 2)
    engine = result_engine(app)

    assert engine.pool.size() == 3  # type: ignore[attr-defined]
    with engine.connect() as conn:
        name = conn.execute(sa.text("SELECT current_setting('application_name')")).scalar_one()
    assert name == "results-test"


def test_threads_share_one_engine(migrated: Database) -> None:
    connects = Connects()
    app = results_app(migrated, database_engine_callback=connects)
    threads_count = 4
    start = threading.Barrier(threads_count)
    backends: list[Any] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            start.wait(timeout=10)
            backends.append(app.backend)
            store_and_read(app, 15, tag=f"thread-{n}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not errors, errors
    # Celery gives each thread its own backend instance; they share one engine.
    assert len({id(backend) for backend in backends}) == threads_count
    assert len(connects.engines) == 1
    assert 1 <= connects.count <= threads_count
    assert stored_results(migrated) == threads_count * 15


def test_forked_child_opens_its_own_connection(migrated: Database) -> None:
    app = results_app(migrated)
    store_and_read(app, 3)
    engine = result_engine(app)
    parent_pid = backend_pid(engine)

    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads; the child
        # below only touches the database and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, reports through the pipe
        report: dict[str, Any]
        try:
            store_and_read(app, 3, tag="child")
            report = {"pid": backend_pid(engine)}
        except BaseException as exc:
            report = {"error": repr(exc)}
        os.write(write_end, json.dumps(report).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    _, status = os.waitpid(child, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert "error" not in report, report["error"]
    assert report["pid"] != parent_pid, "the child must not use the parent's connection"
    # The child left the parent's connection alone: still open, still the same one.
    store_and_read(app, 3, tag="parent")
    assert backend_pid(engine) == parent_pid
    assert stored_results(migrated) == 9


def test_a_lost_connection_is_replaced(migrated: Database) -> None:
    connects = Connects()
    app = results_app(migrated, database_engine_callback=connects)
    store_and_read(app, 2)
    pid = backend_pid(result_engine(app))
    with migrated.admin_engine().connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    # No ping first (PooledDatabaseBackend drops Celery's pool_pre_ping): the store
    # fails on the dropped connection, which leaves the pool, and Celery's retry
    # stores on a new one.
    store_and_read(app, 2)

    assert backend_pid(result_engine(app)) != pid
    assert connects.count == 2
    app.backend.session_manager.invalidate(app.backend.url)
    store_and_read(app, 1)
    assert connects.count == 3


def test_a_bound_result_engine_keeps_no_tenant_between_transactions(migrated: Database) -> None:
    app = results_app(migrated, database_engine_callback=bind_tenant_guc)
    engine = result_engine(app)
    task_id = str(uuid.uuid4())

    with tenant_context(TENANT_A):
        app.backend.store_result(task_id, "done in A", "SUCCESS")

    with engine.connect() as conn:  # the same pooled connection, outside any tenant
        setting = conn.execute(
            sa.text("SELECT current_setting('app.current_tenant_id', true)")
        ).scalar_one()
    assert setting in ("", None), "a pooled connection must not keep the tenant"
    # No policy on the result tables (the opt-in, test_results_tenants.py): any
    # tenant, or none, reads the result.
    with tenant_context(TENANT_B):
        assert results_app(migrated).backend.get_task_meta(task_id)["result"] == "done in A"
    assert results_app(migrated).backend.get_task_meta(task_id)["result"] == "done in A"


def test_missing_database_url_is_refused() -> None:
    app = Celery("results_test", set_as_current=False)
    app.conf.update(result_backend=POOLED, database_url=None)
    with pytest.raises(ImproperlyConfigured, match="database_url"):
        _ = app.backend


# --------------------------------------------------------------- real workers


@pytest.fixture
def reports(monkeypatch: pytest.MonkeyPatch, migrated: Database) -> Iterator[ModuleType]:
    """The example app, imported as the how-to's worker imports it, on ``migrated``."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("REPORTS_DATABASE_URL", render(migrated.app_url))
    for name in ("reports", "celeryconfig"):
        sys.modules.pop(name, None)
    module = importlib.import_module("reports")
    yield module
    module.app.close()
    for name in ("reports", "celeryconfig"):
        sys.modules.pop(name, None)


def sessions(database: Database) -> int:
    """Connections ever opened to ``database``, as the server counts them."""
    with database.admin_engine().connect() as conn:
        conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
        return int(
            conn.execute(
                sa.text("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
            ).scalar_one()
        )


def sessions_since(database: Database, before: int, at_least: int = 0) -> int:
    """New sessions since ``before``; waits up to 5 s for ``at_least`` of them, since a
    closed session may reach the server's counters a moment after it ended."""
    deadline = time.monotonic() + 5
    while True:
        opened = sessions(database) - before
        if opened >= at_least or time.monotonic() > deadline:
            return opened
        time.sleep(0.1)


def run_reports(reports: ModuleType, count: int) -> list[str]:
    """Publish ``count`` tenant reports, then read every result outside any tenant."""
    with tenant_context(TENANT_A):
        results = [reports.monthly_report.delay(f"2024-{n:02d}") for n in range(count)]
    return [result.get(timeout=60) for result in results]


TASKS = 24

STOCK_BACKEND_CONFIG = f"""\
import runpy

globals().update(
    (name, value)
    for name, value in runpy.run_path({str(EXAMPLE / "celeryconfig.py")!r}).items()
    if not name.startswith("__")
)
# Celery's own backend in a process that has not forked builds an engine without
# a pool, which Celery before 5.5 hands the pool's options to, and SQLAlchemy
# refuses them (the compatibility page): the yardstick goes without them.
database_engine_options = {{
    name: value
    for name, value in database_engine_options.items()
    if name not in ("pool_size", "max_overflow")
}}
"""


def stock_backend_config(directory: Path) -> Path:
    """A directory whose ``celeryconfig`` is the example's, fit for Celery's own
    backend on every supported release; first on the worker's path, it hides the
    example's."""
    (directory / "celeryconfig.py").write_text(STOCK_BACKEND_CONFIG)
    return directory


@pytest.mark.worker
@pytest.mark.parametrize(
    ("pool", "backend"),
    [
        pytest.param("solo", POOLED, id="solo"),
        pytest.param("threads", POOLED, id="threads"),
        pytest.param("prefork", POOLED, id="prefork"),
        pytest.param("solo", "database", id="solo-celery-backend"),
    ],
)
def test_worker_stores_results_over_a_pool(
    reports: ModuleType,
    migrated: Database,
    start_worker: WorkerFactory,
    services: Services,
    pool: Pool,
    backend: str,
    tmp_path: Path,
) -> None:
    path = [EXAMPLE, ROOT]
    if backend != POOLED:
        path.insert(0, stock_backend_config(tmp_path))
    handle = start_worker(
        "reports",
        broker="redis",
        backend="redis",  # the rig's choice is unused: the example names its own backend
        pool=pool,
        concurrency=3 if pool == "threads" else 2,
        extra_env={
            "PYTHONPATH": os.pathsep.join(map(str, path)),
            "CELERY_BROKER_URL": services.redis(),
            "CELERY_RESULT_BACKEND": None if backend == POOLED else backend,
            "REPORTS_DATABASE_URL": render(migrated.app_url),
        },
    )
    rebind_app(reports.app, {"broker_url": handle.broker_url, "task_default_queue": handle.queue})
    run_reports(reports, 4)  # every pool process and thread has connected
    before = sessions(migrated)

    answers = run_reports(reports, TASKS)

    assert answers == [f"report 2024-{n:02d} for tenant {TENANT_A}" for n in range(TASKS)]
    assert handle.alive
    if backend == POOLED:
        opened = sessions_since(migrated, before)
        assert opened <= 4, f"{opened} new connections for {TASKS} results"
    else:
        # The yardstick: Celery's own backend connects for every result it stores.
        opened = sessions_since(migrated, before, at_least=TASKS)
        assert opened >= TASKS
    assert stored_results(migrated) == TASKS + 4


def test_howto_page_shows_the_tested_files() -> None:
    page = PAGE.read_text()
    for name in ("celeryconfig.py", "reports.py"):
        assert f"{{literalinclude}} ../../examples/results/{name}" in page
    config: dict[str, Any] = {}
    exec(compile((EXAMPLE / "celeryconfig.py").read_text(), "celeryconfig.py", "exec"), config)
    assert config["result_backend"] == POOLED
