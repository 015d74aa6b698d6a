"""The worker monitor: ``GET /metrics`` and ``GET /health``, served once per worker.

Set ``tenant_celery_monitor_port`` (or ``TENANT_CELERY_MONITOR_PORT``) and
every ``celery worker`` of the app starts one small HTTP server in its main
process, never in a pool child, bound to ``tenant_celery_monitor_host``
(default ``127.0.0.1``).  Port ``0`` picks a free port; the worker logs the
address once it is ready.  A port already in use is logged as an error and
the worker runs on without its monitor.

``GET /metrics``
    Prometheus text exposition of the task metrics (see
    :func:`~tenant_celery.metrics.install_metrics`), added up over the prefork
    pool's children, and the queue gauges: messages waiting in each queue the
    worker consumes (:data:`~tenant_celery.metrics.QUEUE_LENGTH`), per tenant
    too on the package's transport (:data:`~tenant_celery.metrics.QUEUE_LENGTH_BY_TENANT`), and
    whether the broker could be read (:data:`~tenant_celery.metrics.QUEUE_LENGTH_UP`), all read from
    the broker at each scrape; on the package's transport, the consumer's claim counters
    (:data:`~tenant_celery.metrics.BROKER_CLAIMS_TOTAL` and its siblings).  Without the
    prefork pool, everything in the registry the metrics were installed in is
    served (prometheus-client's default registry unless another was given);
    under it, everything the worker's processes counted in its multiprocess
    directory.

``GET /health``
    ``{"status": "ok"|"degraded", "broker": "ok"|"<error>", "database":
    "ok"|"<error>"|"not configured"}``; HTTP 200 when nothing failed, 503
    otherwise.  Each check opens a new connection with a short timeout, so a
    dead server is seen even where a pooled connection would look fine, and
    the result is reused for a couple of seconds so that probes cannot flood
    the database.  The database is ``tenant_celery_database_url``, else the
    result backend's when that is a database.  In a worker, ``broker`` is
    also the worker's consumer's view: not ``"ok"`` until the consumer has
    connected and declared its queues, nor from a lost connection until it
    has reconnected (a bootstep of the consumer tells).

Any other path answers 404.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown
from sqlalchemy.engine import Engine

from . import (
    _queue_lengths,
    _readiness,
    _worker_fixes,  # noqa: F401 (connects its worker_init receiver)
    metrics,
)
from ._probes import (
    TimedOut,
    broker_url,
    describe,
    engine,
    owns_transport,
    password,
    run_with_deadline,
    sql_broker,
)
from .config import setting
from .errors import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

__all__ = ["DEFAULT_MONITOR_HOST", "WorkerMonitor"]

logger = logging.getLogger("tenant_celery.monitor")

DEFAULT_MONITOR_HOST = "127.0.0.1"
"""Address the worker monitor binds to unless ``tenant_celery_monitor_host`` says otherwise."""

#: Seconds a check may take: connect timeout, statement timeout, and the
#: deadline after which ``/health`` reports the check as timed out.
CHECK_TIMEOUT = 2.0
#: Seconds a ``/health`` result is reused.
HEALTH_CACHE_SECONDS = 2.0


_OK = "ok"
_NOT_CONFIGURED = "not configured"


def _monitor_port(app: Celery | None) -> int | None:
    """The configured monitor port of ``app``, or ``None`` when the monitor is off.

    Raises:
        ConfigurationError: the setting is not an integer from 0 to 65535.
    """
    raw: object = setting(app, "monitor_port")
    return None if raw is None else _valid_port(raw)


def _valid_port(raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ConfigurationError(
            f"tenant_celery_monitor_port must be an integer 0-65535, got {raw!r}"
        )
    try:
        port = int(raw)
    except ValueError:
        raise ConfigurationError(
            f"tenant_celery_monitor_port must be an integer 0-65535, got {raw!r}"
        ) from None
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"tenant_celery_monitor_port must be 0-65535, got {port}")
    return port


#: ``result_backend`` values that take their database from ``database_url``.
_DATABASE_URL_BACKENDS = frozenset(
    {
        "database",
        "tenant_celery.results:PooledDatabaseBackend",
        "tenant_celery.results.PooledDatabaseBackend",
    }
)


def _database_url(app: Celery | None) -> str | None:
    """The database ``/health`` checks: ``tenant_celery_database_url``, else the
    result backend's database (``db+...``, or ``database_url`` for Celery's
    ``database`` backend and the pooled one), else ``None``."""
    configured: object = setting(app, "database_url")
    if configured:
        return str(configured)
    if app is None:
        return None
    backend: object = app.conf.get("result_backend")
    if isinstance(backend, str) and backend.startswith("db+"):
        return backend[len("db+") :]
    if backend in _DATABASE_URL_BACKENDS:
        url: object = app.conf.get("database_url")
        return str(url) if url else None
    return None


# ----------------------------------------------------------------------------- checks


class _Checks:
    """The broker and database checks, run together, at most every few seconds."""

    def __init__(self, app: Celery, database: str | None, timeout: float, ttl: float) -> None:
        self.app = app
        self.timeout = timeout
        self.ttl = ttl
        self._lock = threading.Lock()
        self._result: tuple[float, dict[str, str]] | None = None
        self._broker_secret = password(broker_url(app))
        broker_database = sql_broker(app)
        self._broker_engine = (
            None if broker_database is None else engine("broker", broker_database, timeout)
        )
        self._database_secret = password(database)
        self._database_engine = None if database is None else engine("database", database, timeout)

    def report(self) -> dict[str, str]:
        # One check at a time; concurrent probes wait for it and share its result.
        with self._lock:
            now = time.monotonic()
            if self._result is not None and now - self._result[0] < self.ttl:
                return self._result[1]
            report = self._run()
            self._result = (time.monotonic(), report)
            return report

    def _run(self) -> dict[str, str]:
        checks: dict[str, Callable[[], None]] = {"broker": self._broker}
        if self._database_engine is not None:
            checks["database"] = self._database
        results = run_with_deadline(checks, self.timeout + 1.0)
        report = {
            "broker": _outcome(results["broker"], self._broker_secret),
            "database": (
                _outcome(results["database"], self._database_secret)
                if "database" in results
                else _NOT_CONFIGURED
            ),
        }
        healthy = all(value in (_OK, _NOT_CONFIGURED) for value in report.values())
        return {"status": "ok" if healthy else "degraded", **report}

    def _broker(self) -> None:
        if self._broker_engine is not None:
            _select_one(self._broker_engine)
            return
        # A new connection, not one from the app's pool: a pooled one can hold a
        # socket the server has long closed and still look connected.
        with self.app.connection_for_write(connect_timeout=self.timeout) as conn:
            conn.ensure_connection(max_retries=0, timeout=max(1, round(self.timeout)))

    def _database(self) -> None:
        assert self._database_engine is not None
        _select_one(self._database_engine)


def _select_one(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


def _outcome(result: BaseException | TimedOut | None, secret: str | None) -> str:
    if result is None:
        return _OK
    if isinstance(result, TimedOut):
        return "timed out"
    return describe(result, secret)


# ----------------------------------------------------------------------- queue gauges


class _QueueGauges:
    """The queue gauges of each scrape, read from the broker (see
    :mod:`tenant_celery._queue_lengths`) under a deadline.

    A read that fails or times out leaves the length gauges without samples
    and sets :data:`~tenant_celery.metrics.QUEUE_LENGTH_UP` to 0: a scrape without the lengths beats
    a failed scrape, and the outage is a series of its own.  The first failure
    after a success is logged as a warning, the next ones at debug level, and
    the recovery at info.
    """

    def __init__(self, app: Celery, reader: _queue_lengths.QueueReader, timeout: float) -> None:
        self.app = app
        self.reader = reader
        self.timeout = timeout
        self._secret = password(broker_url(app))
        self._lock = threading.Lock()
        self._up: bool | None = None

    def read(self) -> _queue_lengths.Reading | str:
        """The lengths, or why they could not be read."""
        readings: list[_queue_lengths.Reading] = []

        def read() -> None:
            readings.append(self.reader.read(_queue_lengths.worker_queues(self.app)))

        outcome = run_with_deadline({"queues": read}, self.timeout + 1.0)["queues"]
        if outcome is None:
            self._note(None)
            return readings[0]
        error = "timed out" if isinstance(outcome, TimedOut) else describe(outcome, self._secret)
        self._note(error)
        return error

    def _note(self, error: str | None) -> None:
        with self._lock:
            was_up, self._up = self._up, error is None
        if error is None:
            if was_up is False:
                logger.info("the queue lengths can be read again")
        elif was_up is False:
            logger.debug("could not read the queue lengths: %s", error)
        else:
            logger.warning(
                "could not read the queue lengths: %s; %s is 0 until a read works",
                error, metrics.QUEUE_LENGTH_UP,
            )  # fmt: skip

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415

        result = self.read()
        lengths = GaugeMetricFamily(
            metrics.QUEUE_LENGTH,
            "Messages waiting in each queue the worker consumes.",
            labels=[metrics.QUEUE_LABEL],
        )
        if isinstance(result, _queue_lengths.Reading):
            for name, count in sorted(result.totals.items()):
                lengths.add_metric([name], count)
        yield lengths
        if isinstance(result, _queue_lengths.Reading) and result.by_tenant is not None:
            by_tenant = GaugeMetricFamily(
                metrics.QUEUE_LENGTH_BY_TENANT,
                "Messages waiting in each queue the worker consumes, per tenant.",
                labels=[metrics.QUEUE_LABEL, metrics.TENANT_LABEL],
            )
            for (name, tenant), count in sorted(result.by_tenant.items()):
                by_tenant.add_metric([name, tenant], count)
            yield by_tenant
            for metric, text, values in (
                (
                    metrics.QUEUE_IN_FLIGHT_BY_TENANT,
                    "Messages claimed by workers from each queue the worker consumes, per "
                    "tenant (not those held for an ETA).",
                    result.in_flight_by_tenant,
                ),
                (
                    metrics.QUEUE_DELAYED_BY_TENANT,
                    "Messages held by workers until their ETA, per queue and tenant.",
                    result.delayed_by_tenant,
                ),
                (
                    metrics.TENANT_PAUSED,
                    "1 while the tenant is paused on the queue (tenant_celery.tenants.pause).",
                    result.paused_by_tenant,
                ),
            ):
                if values is None:
                    continue
                family = GaugeMetricFamily(
                    metric, text, labels=[metrics.QUEUE_LABEL, metrics.TENANT_LABEL]
                )
                for (name, tenant), count in sorted(values.items()):
                    family.add_metric([name, tenant], count)
                yield family
        yield GaugeMetricFamily(
            metrics.QUEUE_LENGTH_UP,
            "1 when this scrape read the queue lengths from the broker, 0 when it could not.",
            value=0 if isinstance(result, str) else 1,
        )


# A process creates its file empty, then sizes it: a file read in between has
# no header yet, and prometheus-client's collector fails on it.
_HEADER_BYTES = 8


def _multiprocess_metrics(directory: str) -> Iterable[Metric]:
    """The metrics counted in ``directory``, added up over the processes' files."""
    prometheus = metrics._prometheus()
    for attempt in range(3):
        files = []
        for entry in os.scandir(directory):
            if entry.name.endswith(".db"):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_size >= _HEADER_BYTES:
                        files.append(entry.path)
        try:
            merged: Iterable[Metric] = prometheus.multiprocess.MultiProcessCollector.merge(
                files, accumulate=True
            )
        except (FileNotFoundError, struct.error):
            if attempt == 2:
                raise
            continue
        return merged
    raise AssertionError("unreachable")


def _claim_metrics() -> Iterator[Metric]:
    """The claims of the package's transport in this process (the worker's consumer)."""
    from prometheus_client.core import (  # noqa: PLC0415
        CounterMetricFamily,
        HistogramMetricFamily,
    )

    from .transport import claim_stats  # noqa: PLC0415 (psycopg, kombu)

    stats = claim_stats()
    yield CounterMetricFamily(
        metrics.BROKER_CLAIMS_TOTAL.removesuffix("_total"),
        "Claim statements the worker's consumer ran on the package's transport.",
        value=stats["claims"],
    )
    yield CounterMetricFamily(
        metrics.BROKER_EMPTY_CLAIMS_TOTAL.removesuffix("_total"),
        "Claims that took no message.",
        value=stats["empty_claims"],
    )
    yield CounterMetricFamily(
        metrics.BROKER_CLAIMED_MESSAGES_TOTAL.removesuffix("_total"),
        "Messages the claims took.",
        value=stats["claimed_messages"],
    )
    cumulative, buckets = 0, []
    for bound, count in stats["claim_seconds_buckets"].items():
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    yield HistogramMetricFamily(
        metrics.BROKER_CLAIM_DURATION_SECONDS,
        "Seconds each claim took, seen from the worker.",
        buckets=buckets,
        sum_value=stats["claim_seconds"],
    )


class _Scrape:
    """Every collector ``/metrics`` serves, gathered anew at each scrape."""

    def __init__(self, app: Celery, queues: _QueueGauges | None) -> None:
        self.app = app
        self.queues = queues
        self.claims = owns_transport(app)

    def collect(self) -> Iterable[Metric]:
        directory = metrics.multiprocess_directory()
        if directory is not None:
            yield from _multiprocess_metrics(directory)
        else:
            registry: Collector = metrics._registry(self.app) or metrics._prometheus().REGISTRY
            yield from registry.collect()
        if self.queues is not None:
            yield from self.queues.collect()
        if self.claims:
            yield from _claim_metrics()


# ------------------------------------------------------------------------------ server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    monitor: WorkerMonitor


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "tenant-celery-monitor"
    timeout = 10.0  # seconds a client may take to send its request

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        monitor = self.server.monitor
        try:
            if path == "/metrics":
                status, content_type, body = monitor.metrics(self.headers.get("Accept", ""))
            elif path == "/health":
                code, report = monitor.health()
                status, content_type, body = code, "application/json", _json(report)
            else:
                status, content_type = 404, "application/json"
                body = _json({"error": f"no such path: {path[:100]}; try /metrics or /health"})
        except Exception:
            logger.exception("worker monitor failed to answer GET %s", path[:100])
            status, content_type, body = 500, "application/json", _json({"error": "internal"})
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # http.server writes every request to stderr; keep it in logging instead.
        logger.debug("%s %s", self.address_string(), format % args)


def _json(value: object) -> bytes:
    return (json.dumps(value) + "\n").encode()


class WorkerMonitor:
    """An HTTP server answering ``GET /metrics`` and ``GET /health`` for ``app``.

    Workers start one themselves when ``tenant_celery_monitor_port`` is set;
    create one directly only to serve a worker you run in your own process.
    Each argument left ``None`` comes from the app's configuration, then the
    environment (see the module docs).

    :meth:`start` serves on daemon threads; every request runs on its own
    thread, and checks and scrapes are thread-safe.  Start it in the process
    that should answer, after any ``fork``: a forked child does not inherit
    the server thread.

    Args:
        check_timeout: seconds each check (and the queue-length query) may take.
        cache_seconds: seconds a ``/health`` result is reused.

    Raises:
        ConfigurationError: no port is given or configured, or it is not an
            integer from 0 to 65535; or SQLAlchemy cannot use the database (or
            PostgreSQL broker) URL.
    """

    def __init__(
        self,
        app: Celery,
        *,
        host: str | None = None,
        port: int | None = None,
        database_url: str | None = None,
        check_timeout: float = CHECK_TIMEOUT,
        cache_seconds: float = HEALTH_CACHE_SECONDS,
    ) -> None:
        self.app = app
        self.host = host or str(setting(app, "monitor_host", DEFAULT_MONITOR_HOST))
        resolved = _monitor_port(app) if port is None else _valid_port(port)
        if resolved is None:
            raise ConfigurationError(
                "the worker monitor needs a port: pass port=... or set "
                "tenant_celery_monitor_port (TENANT_CELERY_MONITOR_PORT)"
            )
        self.port = resolved
        database = database_url if database_url is not None else _database_url(app)
        self._checks = _Checks(app, database, check_timeout, cache_seconds)
        reader = _queue_lengths.reader(app, check_timeout)
        self._scrape = _Scrape(
            app, None if reader is None else _QueueGauges(app, reader, check_timeout)
        )
        #: What the worker's consumer last said, when the monitor serves a worker.
        self._consumer: _readiness.ConsumerState | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``; the real port when ``0`` was asked for."""
        if self._server is None:
            return self.host, self.port
        bound = self._server.server_address
        return str(bound[0]), int(bound[1])

    @property
    def url(self) -> str:
        """``http://host:port`` of the server."""
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        """Bind and serve on a daemon thread.

        Raises:
            OSError: the address cannot be bound (``errno.EADDRINUSE`` when the
                port is taken); nothing is left running.
        """
        if self._server is not None:
            return
        server_class = _Server6 if ":" in self.host else _Server
        server = server_class((self.host, self.port), _Handler)
        server.monitor = self
        self._server = server
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="tenant-celery-monitor",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket; waits for the serving loop to end."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def _forget_after_fork(self) -> None:
        # A forked child has the listening socket but not the thread serving it.
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.socket.close()

    def health(self) -> tuple[int, dict[str, str]]:
        """``(HTTP status, report)`` of the broker and database checks.

        Runs the checks, which take ``check_timeout`` plus one second at
        most, unless a result younger than ``cache_seconds`` exists; callers
        arriving meanwhile wait for that run and share its result.  In a
        worker, a consumer that is not consuming fails ``broker`` too; that
        state is read afresh at every call.
        """
        report = self._checks.report()
        consumer = None if self._consumer is None else self._consumer.problem()
        if consumer is not None:
            broker = consumer if report["broker"] == _OK else f"{report['broker']}; {consumer}"
            report = {**report, "status": "degraded", "broker": broker}
        return (200 if report["status"] == "ok" else 503), report

    def metrics(self, accept: str = "") -> tuple[int, str, bytes]:
        """``(HTTP status, content type, body)`` of a scrape, in the format ``accept`` asks."""
        try:
            prometheus = metrics._prometheus()
        except ModuleNotFoundError as exc:
            return 501, "text/plain; charset=utf-8", f"{exc}\n".encode()
        encoder, content_type = prometheus.exposition.choose_encoder(accept)
        return 200, content_type, encoder(self._scrape)


# ---------------------------------------------------------------- the worker's monitor


class _WorkerSlot:
    """The monitor this worker process started, if any."""

    monitor: WorkerMonitor | None = None


_worker = _WorkerSlot()


@worker_init.connect(weak=False, dispatch_uid="tenant_celery.monitor.start")
def _start_for_worker(sender: Any = None, **_: Any) -> None:
    """Start the monitor in the worker's main process, before the pool forks.

    ``worker_init`` comes before the broker connection, so ``/health`` answers
    (with the broker's error) while a worker waits for its broker; and before
    the consumer is made, so its readiness step can still be added."""
    app: Celery | None = getattr(sender, "app", None)
    if app is None or _worker.monitor is not None:
        return
    try:
        port = _monitor_port(app)
        if port is None:
            return
        monitor = WorkerMonitor(app, port=port)
    except ConfigurationError as exc:
        logger.error("worker monitor not started: %s", exc)
        return
    consumer = monitor._consumer = _readiness.ConsumerState()
    try:
        monitor.start()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        logger.error(
            "worker monitor cannot listen on %s:%d: %s (errno %s); the worker runs on "
            "without /metrics and /health: free the port or set tenant_celery_monitor_port "
            "to another one",
            monitor.host, port, reason.lower(), exc.errno,
        )  # fmt: skip
        return
    _worker.monitor = monitor
    _readiness.watch(app, consumer)


@worker_ready.connect(weak=False, dispatch_uid="tenant_celery.monitor.ready")
def _announce(**_: Any) -> None:
    # Logged here rather than at start: Celery sets up its logging in between.
    if _worker.monitor is not None:
        logger.info(
            "worker monitor listening on %s (GET /metrics, GET /health)", _worker.monitor.url
        )


@worker_process_init.connect(weak=False, dispatch_uid="tenant_celery.monitor.child")
def _forget_in_child(**_: Any) -> None:
    # Sent in each prefork child, and by the solo pool in the main process itself.
    monitor = _worker.monitor
    if monitor is not None and monitor._pid != os.getpid():
        monitor._forget_after_fork()
        _worker.monitor = None


@worker_shutdown.connect(weak=False, dispatch_uid="tenant_celery.monitor.stop")
def _stop_for_worker(**_: Any) -> None:
    monitor, _worker.monitor = _worker.monitor, None
    if monitor is not None:
        monitor.stop()
