"""Real ``celery worker`` processes, and timing a batch of tasks through one.

:func:`start_worker` runs ``python -m celery -A benchmarks.bench_app worker``
in its own process group, logging to a file, and returns once the worker says
``ready.``.  :func:`run_batch` publishes every task first, then waits: the
throughput is the number of tasks divided by the time from the first publish
to the last completion the tasks themselves recorded.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kombu
import redis
import sqlalchemy as sa
from celery import Celery
from celery.result import AsyncResult

from . import bench_app
from ._common import BenchContext, rate

ROOT = Path(__file__).resolve().parents[1]
TCPG_PREFIX = "tcpg+"
"""Broker URL prefix of the package's own PostgreSQL transport."""
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


class BenchError(RuntimeError):
    """A benchmark could not run: a worker did not start, tasks failed or timed out."""


@dataclass(frozen=True)
class Transport:
    """A broker and result backend pair, as URLs for Celery (client and worker)."""

    label: str
    broker_url: str
    backend_url: str


def transports(ctx: BenchContext) -> dict[str, Transport]:
    """The broker + backend pairs the benchmarks use, keyed ``redis+redis`` etc.

    The Redis broker uses database 12 and Redis results database 13 of the
    configured Redis; PostgreSQL ones connect as the app role.  ``tcpg+pooled``
    is the package's own transport (:mod:`tenant_celery.transport`, its tables
    from the bundled migration in the scratch database's ``public`` schema)
    with :class:`~tenant_celery.results.PooledDatabaseBackend`;
    ``tcpg+pooled-async`` the same with ``synchronous_commit`` off for the
    results' connections (Redis, as the benchmarks run it, keeps nothing on
    disk at all).
    """
    pg = ctx.app_url.render_as_string(hide_password=False)
    libpq = ctx.app_url.set(drivername="postgresql").render_as_string(hide_password=False)
    # Results committed without waiting for the WAL flush, set through libpq's
    # ``options`` in the URL (a server crash can lose the last moment's results).
    pg_async = ctx.app_url.update_query_dict(
        {"options": "-c synchronous_commit=off"}
    ).render_as_string(hide_password=False)
    return {
        t.label: t
        for t in (
            Transport("redis+redis", ctx.redis_db(12), ctx.redis_db(13)),
            Transport("redis+postgres", ctx.redis_db(12), f"db+{pg}"),
            Transport("redis+pooled", ctx.redis_db(12), f"pooled+{pg}"),
            Transport("postgres+postgres", f"sqla+{pg}", f"db+{pg}"),
            Transport("tcpg+pooled", f"{TCPG_PREFIX}{libpq}", f"pooled+{pg}"),
            Transport("tcpg+pooled-async", f"{TCPG_PREFIX}{libpq}", f"pooled+{pg_async}"),
            Transport("rabbitmq+postgres", ctx.amqp_url, f"db+{pg}"),
        )
    }


def _close_backend(app: Celery) -> None:
    """Close the connections of ``app``'s result backend, which ``app.close()`` leaves.

    Results still alive unsubscribe from a Redis backend when collected: collect
    them first, so none does it later on a connection it would open and leave.
    """
    internals: Any = app  # private attributes of Celery 5.x
    backend: Any = getattr(internals, "_backend_cache", None) or getattr(
        internals._local, "backend", None
    )
    if backend is None:
        return
    gc.collect()
    consumer = backend.__dict__.get("result_consumer")
    if consumer is not None:
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
class Worker:
    """A running benchmark worker and the client app that talks to it."""

    name: str
    transport: Transport
    pool: str
    concurrency: int
    queue: str
    log_path: Path
    process: subprocess.Popen[bytes]
    app: Celery = field(repr=False)
    admin_url: sa.URL = field(repr=False)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the worker (its tasks are done: a cold shutdown), reap its group, drop its queue."""
        pgid = self.process.pid
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self.process.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)  # pool children never outlive the run
        self._drop_queue()
        _close_backend(self.app)
        self.app.close()

    def _drop_queue(self) -> None:
        url = self.transport.broker_url
        with contextlib.suppress(Exception):
            if url.startswith("redis"):
                client = redis.Redis.from_url(url, socket_connect_timeout=3)
                try:
                    keys = [self.queue, f"_kombu.binding.{self.queue}"]
                    keys += [f"{self.queue}\x06\x16{p}" for p in range(10)]
                    client.delete(*keys)
                finally:
                    client.close()
            elif url.startswith(("amqp", TCPG_PREFIX)):
                with kombu.Connection(url, connect_timeout=3) as conn:
                    channel: Any = conn.default_channel
                    channel.queue_delete(self.queue)
                    channel.exchange_delete(self.queue)


def start_worker(
    ctx: BenchContext,
    transport: Transport,
    *,
    pool: str,
    concurrency: int = 2,
    observability: bool = False,
    tag: str = "",
    app_module: str = "benchmarks.bench_app",
    client: Callable[[str, str | None, str], Celery] | None = None,
    environ: Mapping[str, str] | None = None,
    options: Sequence[str] = (),
    before_start: Callable[[Celery], None] | None = None,
) -> Worker:
    """Start a worker on a queue of its own and wait until it is ready.

    The worker runs ``celery -A <app_module>`` (the benchmark app by default)
    with the ``TC_BENCH_*`` variables of :mod:`benchmarks.bench_app` set, plus
    ``environ``; ``options`` are added to its command line.  The returned
    worker's ``app`` is ``client(broker_url, backend_url or None, queue)``
    (:func:`benchmarks.bench_app.make_app` by default).  ``before_start`` is
    called with that app before the worker process starts: what it publishes
    is queued when the worker begins consuming.

    Raises:
        BenchError: it exited or was not ready within :data:`READY_TIMEOUT`
            seconds; the message holds the end of its log.
    """
    count = len(list(ctx.workdir.glob("*.log"))) + 1
    name = f"tcbench-{ctx.run_id}-{count}"
    queue = f"tcbench.{ctx.run_id}.{count}"
    log_path = ctx.workdir / f"{count:02d}-{transport.label}-{pool}{tag}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TC_BENCH_")}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
            ),
            "PYTHONUNBUFFERED": "1",
            bench_app.BROKER_URL_ENV: transport.broker_url,
            bench_app.BACKEND_URL_ENV: transport.backend_url,
            bench_app.QUEUE_ENV: queue,
            bench_app.APP_DB_URL_ENV: ctx.app_url.render_as_string(hide_password=False),
            bench_app.PLAIN_DB_URL_ENV: ctx.plain_url.render_as_string(hide_password=False),
            bench_app.OBSERVABILITY_ENV: "1" if observability else "0",
            **(environ or {}),
        }
    )
    command = [
        sys.executable, "-m", "celery", "-A", app_module, "worker",
        "-P", pool, "-c", str(concurrency), "-Q", queue, "-n", f"{name}@%h",
        "--loglevel=INFO", "--without-gossip", "--without-mingle", *options,
    ]  # fmt: skip
    app = (client or bench_app.make_app)(transport.broker_url, transport.backend_url or None, queue)
    if before_start is not None:
        try:
            before_start(app)
        except BaseException:
            app.close()
            raise
    with log_path.open("wb") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = Worker(
        name=name,
        transport=transport,
        pool=pool,
        concurrency=concurrency,
        queue=queue,
        log_path=log_path,
        process=process,
        app=app,
        admin_url=ctx.admin_url,
    )
    ready = re.compile(rf"{re.escape(name)}@\S+ ready\.")
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready.search(log_path.read_text(errors="replace")):
        if process.poll() is not None or time.monotonic() > deadline:
            worker.stop()
            why = "exited" if process.returncode is not None else f"not ready in {READY_TIMEOUT}s"
            raise BenchError(
                f"worker {transport.label} {pool} {why}; log {log_path}:\n{worker.log_tail()}"
            )
        time.sleep(0.05)
    return worker


@contextlib.contextmanager
def running(
    ctx: BenchContext, transport: Transport, *, pool: str, **kwargs: Any
) -> Iterator[Worker]:
    """:func:`start_worker` for the duration of a ``with`` block."""
    worker = start_worker(ctx, transport, pool=pool, **kwargs)
    try:
        yield worker
    finally:
        worker.stop()


# --------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Batch:
    """One timed batch: how many tasks, how long, and what they returned."""

    count: int
    seconds: float
    publish_seconds: float
    results: list[dict[str, Any]] = field(repr=False)

    @property
    def per_second(self) -> float:
        return rate(self.count, self.seconds)


def run_batch(
    worker: Worker,
    publish: Callable[[int], AsyncResult[Any]],
    count: int,
    *,
    timeout: float | None = None,
) -> Batch:
    """Publish ``count`` tasks with ``publish(i)``, then wait for all of them.

    Throughput is measured from just before the first publish to the latest
    ``done`` time the tasks returned (the wall clock of the same machine).

    Raises:
        BenchError: a task failed, or they did not all finish in ``timeout``
            seconds (default: 60 s plus 50 ms per task).
    """
    timeout = 60.0 + 0.05 * count if timeout is None else timeout
    start = time.time()
    ids = [publish(i).id for i in range(count)]
    published = time.time()
    results = collect(worker, ids, timeout=timeout)
    end = max(float(r["done"]) for r in results)
    return Batch(count, end - start, published - start, results)


def collect(worker: Worker, ids: Sequence[str], *, timeout: float) -> list[dict[str, Any]]:
    """Wait for the tasks ``ids`` and return what they returned, in no particular
    order (a Redis backend's results are deleted once read).

    Raises:
        BenchError: a task failed, or they did not all finish in ``timeout`` seconds.
    """
    metas = _collect(worker, ids, deadline=time.monotonic() + timeout)
    failed = [m for m in metas if m.get("status") != "SUCCESS"]
    if failed:
        raise BenchError(
            f"{len(failed)} of {len(ids)} tasks did not succeed on {worker.transport.label} "
            f"{worker.pool}; first: {failed[0].get('status')} {failed[0].get('result')!r}\n"
            f"{failed[0].get('traceback') or ''}worker log tail:\n{worker.log_tail()}"
        )
    return [m["result"] for m in metas]


def _collect(worker: Worker, ids: Sequence[str], *, deadline: float) -> list[dict[str, Any]]:
    backend = worker.transport.backend_url
    if backend.startswith("redis"):
        return _collect_redis(worker, backend, ids, deadline)
    return _collect_database(worker, ids, deadline)


def _timeout(worker: Worker, done: int, total: int) -> BenchError:
    return BenchError(
        f"only {done} of {total} tasks finished in time on {worker.transport.label} "
        f"{worker.pool}; worker log tail:\n{worker.log_tail()}"
    )


def _collect_redis(
    worker: Worker, url: str, ids: Sequence[str], deadline: float
) -> list[dict[str, Any]]:
    # One EXISTS per poll for the whole batch: waiting costs the machine nothing.
    keys = [f"celery-task-meta-{task_id}" for task_id in ids]
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        while True:
            done = sum(client.exists(*keys[i : i + 1000]) for i in range(0, len(keys), 1000))
            if done >= len(keys):
                break
            if time.monotonic() > deadline:
                raise _timeout(worker, done, len(keys))
            time.sleep(0.1)
        metas: list[dict[str, Any]] = []
        for i in range(0, len(keys), 1000):
            chunk = keys[i : i + 1000]
            metas.extend(
                json.loads(raw) if raw is not None else {"status": "MISSING", "result": None}
                for raw in client.mget(chunk)
            )
            client.delete(*chunk)
        return metas
    finally:
        client.close()


def _collect_database(worker: Worker, ids: Sequence[str], deadline: float) -> list[dict[str, Any]]:
    engine = sa.create_engine(worker.admin_url, poolclass=sa.NullPool)
    finished = sa.text(
        "SELECT count(*) FROM celery_taskmeta WHERE task_id = ANY(:ids) "
        "AND status IN ('SUCCESS', 'FAILURE')"
    )
    rows = sa.text(
        "SELECT status, result, traceback FROM celery_taskmeta WHERE task_id = ANY(:ids)"
    )
    try:
        with engine.connect() as conn:
            while True:
                done = conn.execute(finished, {"ids": list(ids)}).scalar_one()
                conn.rollback()
                if done >= len(ids):
                    break
                if time.monotonic() > deadline:
                    raise _timeout(worker, done, len(ids))
                time.sleep(0.1)
            return [
                {
                    "status": status,
                    "result": json.loads(bytes(result)) if result is not None else None,
                    "traceback": traceback,
                }
                for status, result, traceback in conn.execute(rows, {"ids": list(ids)})
            ]
    finally:
        engine.dispose()


def warm_up(worker: Worker, publish: Callable[[int], AsyncResult[Any]], count: int) -> None:
    """Run ``count`` tasks untimed: connections opened, code paths loaded, children forked."""
    run_batch(worker, publish, count, timeout=60.0 + 0.1 * count)
