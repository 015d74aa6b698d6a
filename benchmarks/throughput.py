"""P3, throughput: tenant tasks per second through each broker and result backend.

Seven broker + result backend pairs, each with a prefork worker (concurrency
2) and a solo one: Redis + Redis, Redis + PostgreSQL results (Celery's
backend, and :class:`~tenant_celery.results.PooledDatabaseBackend`), PostgreSQL
broker (kombu's SQLAlchemy transport) + PostgreSQL results, the package's own
PostgreSQL transport (:mod:`tenant_celery.transport`) + pooled PostgreSQL
results, durable and with ``synchronous_commit`` off for the results (Redis
here keeps nothing on disk), RabbitMQ + PostgreSQL results.  PostgreSQL
connections use the app role against the bundled migration's tables.  The
task is :func:`~benchmarks.bench_app`'s ``tenant_noop`` (a tenant task with no
body), so the numbers are the transport and per-task costs alone.  Every pair
runs once; Redis + Redis and the package's transport run twice more, in turn,
and their ratios are the median over those rounds of each run against Redis +
Redis's run of the same round, same pool.
"""

from __future__ import annotations

from typing import Any

from celery.result import AsyncResult

from tenant_celery import tenant_context

from . import bench_app
from ._common import BenchContext, Section, median, rate, ratio
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
ROUNDS = {"smoke": 1, "default": 3}
"""Runs of the pairs the target compares (the first round runs every pair)."""
COMPARED = (BASELINE, OWN, OWN_ASYNC)


def _measure(
    ctx: BenchContext, transport: Any, pool: str, concurrency: int, *, count: int, warm: int
) -> dict[str, Any]:
    tenants = seed_tenants()
    with running(ctx, transport, pool=pool, concurrency=concurrency) as worker:
        task = worker.app.tasks[bench_app.TENANT_NOOP]

        def publish(i: int, task: Any = task) -> AsyncResult[Any]:
            with tenant_context(tenants[i % len(tenants)]):
                result: AsyncResult[Any] = task.apply_async()
            return result

        warm_up(worker, publish, warm)
        batch = run_batch(worker, publish, count)
    ctx.say(f"p3 {transport.label} {pool}: {batch.per_second} tasks/s")
    return {
        "seconds": round(batch.seconds, 3),
        "tasks_per_second": batch.per_second,
        "publish_per_second": rate(count, batch.publish_seconds),
    }


def run(ctx: BenchContext) -> Section:
    """Measure P3 and return its section."""
    count = ctx.pick(smoke=50, default=2000)
    warm = ctx.pick(smoke=10, default=100)
    rounds = ROUNDS[ctx.size]
    pairs = transports(ctx)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    # Round one: every pair.  Then the compared pairs again, in turn reversed each
    # round, so a slow moment of the machine falls on one run of one pair.
    order: list[tuple[str, ...]] = [tuple(pairs)]
    order += [COMPARED if r % 2 else COMPARED[::-1] for r in range(1, rounds)]
    for labels in order:
        for label in labels:
            for pool, concurrency in POOLS:
                runs.setdefault(label, {}).setdefault(pool, []).append(
                    _measure(ctx, pairs[label], pool, concurrency, count=count, warm=warm)
                )
    measured: dict[str, dict[str, dict[str, Any]]] = {}
    for label, pools in runs.items():
        for pool, found in pools.items():
            base = runs[BASELINE][pool]
            measured.setdefault(label, {})[pool] = {
                "tasks": count,
                "runs": len(found),
                "tasks_per_second_runs": [r["tasks_per_second"] for r in found],
                "tasks_per_second": median([r["tasks_per_second"] for r in found]),
                "publish_per_second": median([r["publish_per_second"] for r in found]),
                # Each run against the baseline's run of the same round.
                "ratio_runs": [
                    ratio(r["tasks_per_second"], b["tasks_per_second"])
                    for r, b in zip(found, base, strict=False)
                ],
            }
            measured[label][pool]["ratio"] = median(measured[label][pool]["ratio_runs"])
    rows = []
    verdicts = []
    for label in (OWN, OWN_ASYNC):
        for pool, concurrency in POOLS:
            found = measured[label][pool]
            own = found["ratio"]
            shown = f"{pool} {concurrency}" if pool == "prefork" else pool
            verdicts.append(
                f"{LABELS[label][0]} + {LABELS[label][1]}, {shown}: ratio {own} "
                f"(runs {', '.join(str(r) for r in found['ratio_runs'])}) against a "
                f"target of ≥ {TARGET:g}: " + ("met" if own >= TARGET else "NOT met")
            )
    for label, pools in measured.items():
        broker, backend = LABELS[label]
        for pool, concurrency in POOLS:
            found = pools[pool]
            rows.append(
                [
                    broker,
                    backend,
                    f"{pool} {concurrency}" if pool == "prefork" else pool,
                    found["runs"],
                    found["tasks_per_second"],
                    found["publish_per_second"],
                    found["ratio"],
                ]
            )
    table = ctx.report(
        "P3 throughput: tenant tasks per second, end to end",
        ["broker", "results", "pool", "runs", "tasks/s", "published/s", "ratio vs Redis + Redis"],
        rows,
        [
            f"{count:,} tasks per run, all published first, timed from the first publish "
            "to the last completion; tasks/s and published/s: median of the runs",
            "every pair runs once"
            + (
                f", then Redis + Redis and the package's transport {rounds - 1} more times "
                "each, in turn, reversed every other round"
                if rounds > 1
                else ""
            ),
            "ratio: median over the rounds of the run's tasks/s against Redis + Redis's "
            "in the same round, same pool",
            *verdicts,
        ],
    )
    return Section(
        key="p3",
        title="Throughput by broker and result backend",
        tables=[table],
        data={"tasks_per_row": count, "baseline": BASELINE, "results": measured},
    )
