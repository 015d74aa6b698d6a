"""Real ``celery worker`` processes for integration tests.

A :class:`WorkerFactory` starts ``python -m celery -A <module> worker`` in its own
process group, with the ``TC_TEST_*`` variables of :mod:`tests._rig.appconf` set, waits
for its ``ready.`` line and returns a :class:`WorkerHandle`. Every worker gets a unique
queue and node name, logs to a file, and is stopped (SIGTERM, then SIGKILL of its
process group) by its factory, by the session finalizer, or at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import kombu.pools
import pytest
from celery import Celery
from sqlalchemy.engine import URL

from tests._rig import appconf
from tests._rig.postgres import APP_ROLE, Database, render
from tests._rig.services import Services, delete_amqp_queue, purge_redis_queue

Broker = Literal["redis", "rabbitmq", "postgres", "tcpg"]
Backend = Literal["redis", "postgres"]
Pool = Literal["prefork", "threads", "solo"]
#: Who the PostgreSQL broker and result backend connect as: the superuser, or ``app_user``.
DatabaseRole = Literal["superuser", "app"]

ROOT = Path(__file__).resolve().parents[2]
#: Backend used when ``start_worker`` gets none.
DEFAULT_BACKEND: dict[Broker, Backend] = {
    "redis": "redis",
    "rabbitmq": "postgres",
    "postgres": "postgres",
    "tcpg": "postgres",
}
#: Schema of the tables a ``tcpg`` broker (the package's own transport) uses: the
#: bundled migration puts them there, away from the kombu tables that the
#: ``postgres`` broker's workers create in ``public`` on first use.
TRANSPORT_SCHEMA = "tcpg"
_MIGRATED: set[str] = set()
#: (broker, pool) pairs the worker tests cover; each param carries the ``worker`` mark.
WORKER_MATRIX = [
    pytest.param((broker, pool), id=f"{broker}-{pool}", marks=pytest.mark.worker)
    for broker in ("redis", "rabbitmq", "postgres")
    for pool in ("prefork", "threads")
]
#: The package's own PostgreSQL transport under the same pools.
TRANSPORT_MATRIX = [
    pytest.param(("tcpg", pool), id=f"tcpg-{pool}", marks=pytest.mark.worker)
    for pool in ("prefork", "threads")
]
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
LOG_TAIL_LINES = 80

_LIVE: dict[int, WorkerHandle] = {}
_LIVE_LOCK = threading.Lock()


def live_workers() -> list[WorkerHandle]:
    """Workers started by the rig and not stopped yet."""
    with _LIVE_LOCK:
        return list(_LIVE.values())


def kill_all_workers() -> list[str]:
    """Stop every worker still running; return the names of those that were."""
    names = []
    for handle in live_workers():
        names.append(handle.name)
        handle.stop(timeout=5.0)
    return names


atexit.register(kill_all_workers)


def release_client_connections() -> None:
    """Close the broker connections the test process pooled (call at session end).

    Apps detached by :func:`rebind_app` leave their pools in kombu's registry; closing
    them here keeps garbage collection at exit from reporting unclosed sockets.
    """
    kombu.pools.reset()
    try:
        from kombu.transport.sqlalchemy import Channel  # noqa: PLC0415
    except ImportError:  # SQLAlchemy transport never loaded
        return
    for engine, _session in list(Channel._engines.values()):
        engine.dispose()
    Channel._engines.clear()


def _process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rebind_app(app: Celery, changes: Mapping[str, Any]) -> None:
    """Apply *changes* to an app that may already have published or read results.

    Celery caches, per app, the broker connection pool (``app._pool``), routing and
    queue tables plus the producer pool (``app.amqp``) and the result backend
    (``app._backend_cache`` / ``app._local``). Those caches are dropped (the backend's
    own connections closed) so the next publish and the next ``AsyncResult.get`` use
    the new settings. This uses private attributes of Celery 5.x;
    ``tests/integration/test_rig.py`` checks it by moving one app across brokers.
    """
    _close_backend(app)
    internals: Any = app  # private attributes, not in celery-types' stubs
    # The connection and producer pools live in kombu's process-wide registry, keyed by
    # broker URL and shared by every app on that URL: detach them, never close them.
    internals.__dict__.pop("amqp", None)
    internals._pool = None
    internals._backend_cache = None
    internals._local = threading.local()
    app.conf.update(changes)


def _close_backend(app: Celery) -> None:
    internals: Any = app
    backend = internals._backend_cache or getattr(internals._local, "backend", None)
    if backend is None:
        return
    consumer = backend.__dict__.get("result_consumer")
    if consumer is not None:
        # Results still alive unsubscribe when collected; a result kept by a reference
        # cycle (a failure's traceback) would do it after the close, on a connection
        # it opens and nobody closes: collect them now, and forget the rest.
        gc.collect()
        with contextlib.suppress(Exception):
            consumer.stop()
        subscribed = getattr(consumer, "subscribed_to", None)
        if isinstance(subscribed, set):
            subscribed.clear()
    client = backend.__dict__.get("client")
    if client is not None:
        with contextlib.suppress(Exception):
            client.connection_pool.disconnect()


@dataclass(eq=False)
class WorkerHandle:
    """A running ``celery worker`` process.

    ``configure(app)`` / ``bind(app)`` point an in-process app (the same module the
    worker runs) at this worker's broker, backend and queue, for publishing from the test.
    """

    name: str
    app_module: str
    broker: Broker
    backend: Backend
    pool: Pool
    concurrency: int
    queue: str
    broker_url: str
    backend_url: str
    log_path: Path
    database: Database | None
    env: dict[str, str] = field(repr=False)
    process: subprocess.Popen[bytes] = field(repr=False)
    _stop_requested: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        """PID of the worker's main process (also its process group id)."""
        return self.process.pid

    @property
    def alive(self) -> bool:
        """Whether the main process is still running."""
        return self.process.poll() is None

    # -- log

    def log_text(self) -> str:
        """The worker's whole log so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last *lines* lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the log matches the regular expression *pattern*; fail on timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if time.monotonic() > deadline:
                pytest.fail(
                    f"worker {self.name}: {pattern!r} not in log after {timeout}s;"
                    f" log tail:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    # -- client side

    def client_conf(self) -> dict[str, Any]:
        """Settings that make an app publish to this worker and read its results."""
        return {
            "broker_url": self.broker_url,
            "result_backend": self.backend_url,
            "task_default_queue": self.queue,
        }

    def configure(self, app: Celery) -> Celery:
        """Point *app* at this worker for good (see :func:`rebind_app`); return it."""
        rebind_app(app, self.client_conf())
        return app

    @contextlib.contextmanager
    def bind(self, app: Celery) -> Iterator[Celery]:
        """Point *app* at this worker inside the block, then restore its settings."""
        previous = {key: app.conf.get(key) for key in self.client_conf()}
        rebind_app(app, self.client_conf())
        try:
            yield app
        finally:
            rebind_app(app, previous)

    # -- lifecycle

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the worker logs ``<node> ready.``; stop it and fail otherwise."""
        ready = re.compile(rf"{re.escape(self.name)}@\S+ ready\.")
        deadline = time.monotonic() + timeout
        while not ready.search(self.log_text()):
            if self.process.poll() is not None:
                self.stop()
                pytest.fail(
                    f"worker {self.name} exited with {self.process.returncode} before"
                    f" ready; log tail:\n{self.log_tail()}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"worker {self.name} not ready after {timeout}s; log tail:\n{self.log_tail()}",
                    pytrace=False,
                )
            time.sleep(0.05)

    def request_stop(self) -> None:
        """Start a warm shutdown (SIGTERM) without waiting; :meth:`stop` later reaps it.

        Lets the next worker start while this one shuts down (a warm shutdown takes
        1-6 s: the worker only notices the signal when its event loop next wakes).
        """
        if self.process.poll() is None and not self._stop_requested:
            self._stop_requested = True
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Warm-shutdown the worker (SIGTERM), SIGKILL its group if needed; return the code.

        Idempotent. Also removes the worker's queue from Redis/RabbitMQ.
        """
        pgid = self.process.pid
        self.request_stop()
        if self.process.poll() is None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self.process.wait(5)
        # Pool children normally exit with the main process; never leave one behind.
        deadline = time.monotonic() + 3
        while _process_group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _process_group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        with _LIVE_LOCK:
            was_live = _LIVE.pop(id(self), None) is not None
        if was_live:
            self._cleanup_queue()
        return self.process.returncode

    def _cleanup_queue(self) -> None:
        if self.broker == "redis":
            purge_redis_queue(self.broker_url, self.queue)
        elif self.broker == "rabbitmq":
            delete_amqp_queue(self.broker_url, self.queue)
        # postgres: the kombu tables go with the database


class WorkerFactory:
    """Starts workers and stops all of them on :meth:`close`.

    *database* is the database workers use for the PostgreSQL broker/backend and expose
    as ``TC_TEST_DATABASE_URL``/``TC_TEST_APP_DATABASE_URL`` unless ``start`` gets another.
    """

    def __init__(
        self,
        *,
        log_dir: Path,
        services: Services,
        database: Database | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.services = services
        self.database = database
        self._started: list[WorkerHandle] = []

    def __call__(
        self,
        app_module: str,
        *,
        broker: Broker,
        backend: Backend | None = None,
        pool: Pool = "prefork",
        concurrency: int = 2,
        extra_env: Mapping[str, str | None] | None = None,
        extra_args: Sequence[str] = (),
        database: Database | None = None,
        database_role: DatabaseRole = "superuser",
        loglevel: str = "INFO",
        ready_timeout: float = READY_TIMEOUT,
    ) -> WorkerHandle:
        """Start a worker for *app_module* and wait until it is ready.

        *extra_env* entries override the worker's environment (``None`` removes a variable).
        *extra_args* are appended to the ``celery worker`` command line.
        *database_role* ``"app"`` connects a PostgreSQL broker and result backend as
        ``app_user`` (no CREATE right: their tables must exist) instead of the superuser.
        """
        if broker not in get_args(Broker):
            raise ValueError(f"unknown broker {broker!r}")
        backend = backend or DEFAULT_BACKEND[broker]
        if backend not in get_args(Backend):
            raise ValueError(f"unknown backend {backend!r}")
        if pool not in get_args(Pool):
            raise ValueError(f"unknown pool {pool!r}")
        if database_role not in get_args(DatabaseRole):
            raise ValueError(f"unknown database role {database_role!r}")
        database = database or self.database
        token = uuid.uuid4().hex[:10]
        name = f"tc-{broker}-{pool}-{token}"
        queue = f"tc.{token}"

        broker_url = self._broker_url(broker, database, database_role)
        backend_url = self._backend_url(backend, database, database_role)
        worker_env = self._environment(broker_url, backend_url, queue, database, extra_env)
        log_path = self.log_dir / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app_module,
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-Q",
            queue,
            "-n",
            f"{name}@%h",
            f"--loglevel={loglevel}",
            # No gossip/mingle: kombu's SQLAlchemy transport has no fanout. Heartbeat
            # stays on: with --without-heartbeat a RabbitMQ worker's event loop sleeps
            # up to 10 s before it notices SIGTERM (measured), with it about 1-2 s.
            "--without-gossip",
            "--without-mingle",
            *extra_args,
        ]
        with log_path.open("wb") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=worker_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        handle = WorkerHandle(
            name=name,
            app_module=app_module,
            broker=broker,
            backend=backend,
            pool=pool,
            concurrency=concurrency,
            queue=queue,
            broker_url=broker_url,
            backend_url=backend_url,
            log_path=log_path,
            database=database,
            env=worker_env,
            process=process,
        )
        with _LIVE_LOCK:
            _LIVE[id(handle)] = handle
        self._started.append(handle)
        handle.wait_ready(ready_timeout)
        return handle

    def close(self) -> None:
        """Stop every worker this factory started."""
        while self._started:
            self._started.pop().stop()

    def _require_database(self, what: str, database: Database | None) -> Database:
        if database is None:
            raise ValueError(f"a PostgreSQL {what} needs a database (none given to the factory)")
        return database

    def _broker_url(self, broker: Broker, database: Database | None, role: DatabaseRole) -> str:
        if broker == "redis":
            return self.services.redis()
        if broker == "rabbitmq":
            return self.services.amqp()
        database = self._require_database("broker", database)
        if broker == "tcpg":
            # Its tables are migrated and granted: the broker never needs more than
            # app_user, whatever the result backend connects as.
            return transport_url(database, "app")
        return "sqla+" + render(_role_url(database, role))

    def _backend_url(self, backend: Backend, database: Database | None, role: DatabaseRole) -> str:
        if backend == "redis":
            return self.services.redis()
        database = self._require_database("result backend", database)
        return "db+" + render(_role_url(database, role))

    def _environment(
        self,
        broker_url: str,
        backend_url: str,
        queue: str,
        database: Database | None,
        extra_env: Mapping[str, str | None] | None,
    ) -> dict[str, str]:
        environ = {
            key: value for key, value in os.environ.items() if not key.startswith("TC_TEST_")
        }
        environ.pop("PYTEST_CURRENT_TEST", None)
        pythonpath = [str(ROOT), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
        environ.update(
            {
                "PYTHONPATH": os.pathsep.join(pythonpath),
                "PYTHONUNBUFFERED": "1",
                appconf.BROKER_URL_ENV: broker_url,
                appconf.BACKEND_URL_ENV: backend_url,
                appconf.QUEUE_ENV: queue,
            }
        )
        if database is not None:
            environ[appconf.DATABASE_URL_ENV] = render(database.url)
            environ[appconf.APP_DATABASE_URL_ENV] = render(database.app_url)
        for key, value in (extra_env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        return environ


def transport_url(database: Database, role: DatabaseRole = "app") -> str:
    """A ``tcpg+`` broker URL of *database* for the package's transport, its tables
    created (once per database) in :data:`TRANSPORT_SCHEMA` by the bundled migration."""
    if database.name not in _MIGRATED:
        from tenant_celery import migrations  # noqa: PLC0415

        migrations.upgrade(database.url, schema=TRANSPORT_SCHEMA, grant_to=[APP_ROLE])
        _MIGRATED.add(database.name)
    url = _role_url(database, role).update_query_dict(
        {"options": f"-csearch_path={TRANSPORT_SCHEMA}"}
    )
    return "tcpg+" + render(url)


def _role_url(database: Database, role: DatabaseRole) -> URL:
    return database.app_url if role == "app" else database.url


def worker_fixture(
    app_module: str,
    *,
    name: str,
    matrix: Sequence[Any] = tuple(WORKER_MATRIX),
    app_attr: str = "app",
    **start_kwargs: Any,
) -> Any:
    """Build a module-scoped fixture: one worker per ``(broker, pool)`` of *matrix*.

    Each worker runs *app_module* (``backend`` defaults per broker, see
    :data:`DEFAULT_BACKEND`; other keyword arguments go to ``start_worker``) and the
    module's app (attribute *app_attr*) is bound to it while its tests run. Use it in a
    test module as ``my_worker = worker_fixture("tests.integration.my_app", name="my_worker")``.
    """

    @pytest.fixture(scope="module", params=list(matrix), name=name)
    def _worker(
        request: pytest.FixtureRequest, module_start_worker: WorkerFactory
    ) -> Iterator[WorkerHandle]:
        broker, pool = request.param
        app = getattr(importlib.import_module(app_module), app_attr)
        handle = module_start_worker(app_module, broker=broker, pool=pool, **start_kwargs)
        with handle.bind(app):
            yield handle
        handle.request_stop()  # the factory reaps it; the next worker starts meanwhile

    return _worker
