"""Fixtures shared by every test: PostgreSQL databases, brokers and real Celery workers.

Services are found once per session and skipped when missing -- except when
``CI=true``, where a missing service fails the run (see :mod:`tests._rig.env`).

Databases
    ``database`` (function) / ``module_database`` (module): a fresh database cloned from
    the session template, dropped ``WITH (FORCE)`` afterwards. ``admin_engine``,
    ``app_engine`` and ``app_url`` belong to ``database``; for ``module_database`` call
    its ``admin_engine()`` / ``app_engine()`` methods.

Workers
    ``start_worker`` (function, uses ``database``) / ``module_start_worker`` (module,
    uses ``module_database``): a :class:`~tests._rig.worker.WorkerFactory`; every worker
    it started is stopped when the fixture ends. App modules follow
    :mod:`tests._rig.appconf`. One worker per (broker, pool) for a whole module::

        from tests._rig.worker import worker_fixture
        from tests.integration import my_app

        my_worker = worker_fixture("tests.integration.my_app", name="my_worker")

        def test_something(my_worker):  # runs 6 times: 3 brokers x prefork/threads
            assert my_app.add.delay(1, 2).get(timeout=20) == 3
"""

from __future__ import annotations

import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from celery import _state as celery_state
from pytest_postgresql import factories
from sqlalchemy.engine import URL, Engine

from tests._rig.postgres import (
    DRIVER,
    MAINTENANCE_DB,
    Database,
    DatabaseFactory,
    PgCluster,
    find_pg_ctl,
    open_cluster,
)
from tests._rig.services import Services
from tests._rig.worker import (
    WorkerFactory,
    kill_all_workers,
    live_workers,
    release_client_connections,
)

_USED_CLUSTER: list[str] = []

# pytest-postgresql server from the system pg_ctl: only requested when neither a DSN
# nor pgserver works (and never as root, where pg_ctl refuses to start).
_tc_postgresql_proc = factories.postgresql_proc(
    executable=find_pg_ctl(), port=None, unixsocketdir=tempfile.gettempdir()
)


# ----------------------------------------------------------------------- reporting


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the log tail of every running worker to a failed test's report."""
    report = yield
    if report.failed:
        for handle in live_workers():
            report.sections.append((f"celery worker {handle.name} log (tail)", handle.log_tail()))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which PostgreSQL the session used (if any)."""
    if _USED_CLUSTER:
        terminalreporter.write_line(f"PostgreSQL for tests: {_USED_CLUSTER[0]}")


# ------------------------------------------------------------------------ services


@pytest.fixture(scope="session", autouse=True)
def _tc_reap_workers() -> Iterator[None]:
    """Session finalizer: kill any worker a fixture failed to stop, close client pools."""
    yield
    kill_all_workers()
    release_client_connections()


@pytest.fixture(autouse=True)
def _tc_forget_shared_tasks() -> Iterator[None]:
    """Forget the shared tasks a test registered by importing an app module.

    ``@app.task`` (and so ``@tenant_task``) also registers the task with every
    app finalized later in the process.  A test that imports an example's app
    module afresh would otherwise leave its tasks behind for every later app,
    and a second import of the same module, a second callable under the same
    name, which Celery refuses when that app finalizes.
    """
    before = set(celery_state._on_app_finalizers)
    yield
    celery_state._on_app_finalizers.intersection_update(before)


@pytest.fixture(scope="session")
def services() -> Services:
    """Lazily probed broker URLs (``services.redis()``, ``services.amqp()``)."""
    return Services()


@pytest.fixture(scope="session")
def redis_url(services: Services) -> str:
    """URL of the test Redis (``TENANT_CELERY_TEST_REDIS_URL``); skip/fail when down."""
    return services.redis()


@pytest.fixture(scope="session")
def amqp_url(services: Services) -> str:
    """URL of the test RabbitMQ (``TENANT_CELERY_TEST_AMQP_URL``); skip/fail when down."""
    return services.amqp()


# ---------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_cluster(request: pytest.FixtureRequest) -> Iterator[PgCluster]:
    """The session's PostgreSQL server: DSN, else pgserver, else pg_ctl (non-root)."""

    def start_pg_ctl() -> PgCluster:
        executor = request.getfixturevalue("_tc_postgresql_proc")
        url = URL.create(
            DRIVER,
            username=executor.user,
            password=executor.password or None,
            host=executor.host,
            port=executor.port,
            database=MAINTENANCE_DB,
        )
        return PgCluster("pg_ctl", url)

    with open_cluster(start_pg_ctl) as cluster:
        _USED_CLUSTER.append(cluster.describe())
        yield cluster


@pytest.fixture(scope="session")
def pg_databases(pg_cluster: PgCluster) -> Iterator[DatabaseFactory]:
    """Session template (with ``app_user`` set up) and the factory cloning it."""
    factory = DatabaseFactory(pg_cluster)
    factory.setup()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def database(pg_databases: DatabaseFactory) -> Iterator[Database]:
    """A fresh database for one test (``.url`` superuser, ``.app_url`` as ``app_user``)."""
    with pg_databases.database() as db:
        yield db


@pytest.fixture(scope="module")
def module_database(pg_databases: DatabaseFactory) -> Iterator[Database]:
    """A fresh database shared by one test module (e.g. with its long-lived workers)."""
    with pg_databases.database() as db:
        yield db


@pytest.fixture
def admin_engine(database: Database) -> Engine:
    """Superuser engine on ``database``, for DDL and seeding."""
    return database.admin_engine()


@pytest.fixture
def app_engine(database: Database) -> Engine:
    """``app_user`` engine on ``database`` (no superuser, no BYPASSRLS, small QueuePool)."""
    return database.app_engine()


@pytest.fixture
def app_url(database: Database) -> URL:
    """SQLAlchemy URL of ``database`` as ``app_user``."""
    return database.app_url


# ------------------------------------------------------------------------- workers


@pytest.fixture
def start_worker(tmp_path: Path, services: Services, database: Database) -> Iterator[WorkerFactory]:
    """Start real workers for one test: ``start_worker("tests.x_app", broker=..., ...)``."""
    factory = WorkerFactory(log_dir=tmp_path, services=services, database=database)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_start_worker(
    tmp_path_factory: pytest.TempPathFactory, services: Services, module_database: Database
) -> Iterator[WorkerFactory]:
    """Start real workers that live for the module (uses ``module_database``)."""
    factory = WorkerFactory(
        log_dir=tmp_path_factory.mktemp("workers"), services=services, database=module_database
    )
    try:
        yield factory
    finally:
        factory.close()
