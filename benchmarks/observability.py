"""P4, observability overhead: metrics and JSON logs on, versus off.

Two real workers (Redis broker and results, prefork concurrency 2, log level
INFO) run the same tenant task with no body: one plain, one whose app calls
:func:`~tenant_celery.metrics.install_metrics` and
:func:`~tenant_celery.logging.configure_logging` at import, as a host does.
The runs alternate (off, on, off, on, ...).  With no body, the per-task cost
of counting and logging is as large a share of each task as it can be: this
is the worst case.
"""

from __future__ import annotations

from typing import Any

from celery.result import AsyncResult

from tenant_celery import tenant_context

from . import bench_app
from ._common import BenchContext, Section, alternate, median, pair_spread, paired_ratio
from ._scratch import seed_tenants
from ._workers import run_batch, start_worker, transports, warm_up

TARGET = 0.97
"""Published target for the ratio on/off."""


def run(ctx: BenchContext) -> Section:
    """Measure P4 and return its section."""
    count = ctx.pick(smoke=50, default=2000)
    rounds = ctx.pick(smoke=1, default=5)
    warm = ctx.pick(smoke=10, default=100)
    tenants = seed_tenants()
    transport = transports(ctx)["redis+redis"]
    rates: dict[str, list[float]] = {"off": [], "on": []}
    workers = {}
    try:
        for variant in rates:
            workers[variant] = start_worker(
                ctx, transport, pool="prefork", observability=variant == "on", tag=f"-obs-{variant}"
            )
        publishers = {}
        for variant, worker in workers.items():
            task = worker.app.tasks[bench_app.TENANT_NOOP]

            def publish(i: int, task: Any = task) -> AsyncResult[Any]:
                with tenant_context(tenants[i % len(tenants)]):
                    result: AsyncResult[Any] = task.apply_async()
                return result

            publishers[variant] = publish
            warm_up(worker, publish, warm)
        for n in range(rounds):
            for variant in alternate(list(workers), n):
                batch = run_batch(workers[variant], publishers[variant], count)
                rates[variant].append(batch.per_second)
                ctx.say(f"p4 run {n + 1}/{rounds} {variant}: {batch.per_second} tasks/s")
        json_lines = _json_lines(workers["on"].log_path.read_text(errors="replace"))
    finally:
        for worker in workers.values():
            worker.stop()
    off, on = median(rates["off"]), median(rates["on"])
    found = paired_ratio(rates["on"], rates["off"])
    table = ctx.report(
        "P4 observability overhead: install_metrics + JSON logs",
        ["worker", "tasks/s", "runs", "ratio on/off"],
        [
            ["metrics and JSON logs off", off, f"{rounds} x {count:,}", None],
            ["metrics and JSON logs on", on, f"{rounds} x {count:,}", found],
        ],
        [
            "Redis broker and results, prefork 2, --loglevel=INFO, a tenant task with no body; "
            "tasks/s: median of alternating runs (AB BA AB …); ratio: median of the ratios of each "
            "back-to-back pair of runs",
            f"pairs' ratios ranged {pair_spread(rates['on'], rates['off'])}",
            f"ratio {found} against a target of ≥ {TARGET}: "
            + ("met" if found >= TARGET else "NOT met"),
        ],
    )
    return Section(
        key="p4",
        title="Observability overhead",
        tables=[table],
        data={
            "tasks_per_run": count,
            "runs": rounds,
            "tasks_per_second": rates,
            "ratio": found,
            "target": TARGET,
            "json_log_lines": json_lines,
        },
    )


def _json_lines(text: str) -> int:
    """How many lines of the 'on' worker's log are JSON objects: proof it logged JSON."""
    return sum(1 for line in text.splitlines() if line.startswith("{") and line.endswith("}"))
