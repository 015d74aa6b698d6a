"""P3, throughput: tenant tasks per second through each broker and result backend.

Seven broker + result backend pairs, each with a prefork worker (concurrency
2) and a solo one: Redis + Redis, Redis + PostgreSQL results (Celery's
backend, and :class:`~tenant_celery.results.PooledDatabaseBackend`), PostgreSQL
broker (kombu's SQLAlchemy transport) + PostgreSQL results, the package's own
PostgreSQL transport (:mod:`tenant_celery.transport`) + pooled PostgreSQL
results, durable and with ``synchronous_commit`` off for the results (Redis
here keeps nothing on disk), RabbitMQ + PostgreSQL results.  PostgreSQL
connections use the app role against the bundled migration's tables.  The task is :func:`~benchmarks.bench_app`'s
``tenant_noop`` (a tenant task with no body), so the numbers are the transport
and per-task costs alone.  Ratios are against Redis + Redis with the same pool
in the same run.
"""

from __future__ import annotations

from typing import Any

from celery.result import AsyncResult

from tenant_celery import tenant_context

from . import bench_app
from ._common import BenchContext, Section, rate, ratio
from ._scratch import seed_tenants
from ._workers import run_batch, running, transports, warm_up

BASELINE = "redis+redis"
OWN = "tcpg+pooled"
"""The package's transport, with the result backend used beside it."""
OWN_ASYNC = "tcpg+pooled-async"
"""The same, results committed without waiting for the WAL flush."""
TARGET = 1.0
"""Least ratio of :data:`OWN` to :data:`BASELINE` the transport aims for."""
LABELS = {
    "redis+redis": ("Redis", "Redis"),
    "redis+postgres": ("Redis", "PostgreSQL"),
    "redis+pooled": ("Redis", "PostgreSQL, pooled"),
    "postgres+postgres": ("PostgreSQL (kombu SQLAlchemy)", "PostgreSQL"),
    "tcpg+pooled": ("PostgreSQL (tenant_celery.transport)", "PostgreSQL, pooled"),
    "tcpg+pooled-async": (
        "PostgreSQL (tenant_celery.transport)",
        "PostgreSQL, pooled, synchronous_commit off",
    ),
    "rabbitmq+postgres": ("RabbitMQ", "PostgreSQL"),
}
POOLS = (("prefork", 2), ("solo", 1))


def run(ctx: BenchContext) -> Section:
    """Measure P3 and return its section."""
    count = ctx.pick(smoke=50, default=2000)
    warm = ctx.pick(smoke=10, default=100)
    tenants = seed_tenants()
    measured: dict[str, dict[str, dict[str, Any]]] = {}
    for label, transport in transports(ctx).items():
        for pool, concurrency in POOLS:
            with running(ctx, transport, pool=pool, concurrency=concurrency) as worker:
                task = worker.app.tasks[bench_app.TENANT_NOOP]

                def publish(i: int, task: Any = task) -> AsyncResult[Any]:
                    with tenant_context(tenants[i % len(tenants)]):
                        result: AsyncResult[Any] = task.apply_async()
                    return result

                warm_up(worker, publish, warm)
                batch = run_batch(worker, publish, count)
            measured.setdefault(label, {})[pool] = {
                "tasks": count,
                "seconds": round(batch.seconds, 3),
                "tasks_per_second": batch.per_second,
                "publish_per_second": rate(count, batch.publish_seconds),
            }
            ctx.say(f"p3 {label} {pool}: {batch.per_second} tasks/s")
    rows = []
    verdicts = []
    for label in (OWN, OWN_ASYNC):
        for pool, concurrency in POOLS:
            own = ratio(
                measured[label][pool]["tasks_per_second"],
                measured[BASELINE][pool]["tasks_per_second"],
            )
            shown = f"{pool} {concurrency}" if pool == "prefork" else pool
            verdicts.append(
                f"{LABELS[label][0]} + {LABELS[label][1]}, {shown}: ratio {own} against a "
                f"target of ≥ {TARGET:g}: " + ("met" if own >= TARGET else "NOT met")
            )
    for label, pools in measured.items():
        broker, backend = LABELS[label]
        for pool, concurrency in POOLS:
            found = pools[pool]
            baseline = measured[BASELINE][pool]["tasks_per_second"]
            rows.append(
                [
                    broker,
                    backend,
                    f"{pool} {concurrency}" if pool == "prefork" else pool,
                    found["tasks_per_second"],
                    found["publish_per_second"],
                    ratio(found["tasks_per_second"], baseline),
                ]
            )
    table = ctx.report(
        "P3 throughput: tenant tasks per second, end to end",
        ["broker", "results", "pool", "tasks/s", "published/s", "ratio vs Redis + Redis"],
        rows,
        [
            f"{count:,} tasks per row, all published first, timed from the first publish "
            "to the last completion",
            "ratio against Redis + Redis with the same pool, same run",
            *verdicts,
        ],
    )
    return Section(
        key="p3",
        title="Throughput by broker and result backend",
        tables=[table],
        data={"tasks_per_row": count, "baseline": BASELINE, "results": measured},
    )
