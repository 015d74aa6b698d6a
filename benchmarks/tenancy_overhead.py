"""P1, tenancy overhead: the same body as a plain task and as a tenant task.

The body is one indexed ``SELECT`` and one ``INSERT`` on the RLS-protected
items table, in one transaction (:mod:`benchmarks.bench_app`).  The plain
task gets its tenant as an argument and connects as a ``BYPASSRLS`` role, as a
host without tenancy would; the tenant task gets it from the message header,
connects as the app role under row-level security, and has the GUC set by
:func:`~tenant_celery.bind_tenant_guc`.  The ratio tenant/plain is therefore
everything tenancy costs: stamping and validating the header, entering the
context, the ``set_config`` statement and the policy's predicate.

(a) ``apply()`` in this process, alternating rounds, no broker;
(b) end to end through one real worker (Redis broker and results, prefork
    concurrency 2) serving both tasks, alternating plain and tenant runs.

Each call also reports how many statements its engine ran: the tenant task
must run exactly one more (the ``set_config``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.result import AsyncResult

from tenant_celery import tenant_context

from . import bench_app
from ._common import (
    BenchContext,
    Cell,
    Section,
    alternate,
    median,
    pair_spread,
    paired_ratio,
    rate,
    stopwatch,
)
from ._scratch import seed_tenants
from ._workers import BenchError, run_batch, running, transports, warm_up

TARGET = 0.97
"""Published target for the end-to-end ratio tenant/plain."""


class _Tally:
    """Per-variant rates, statements per task and body times over alternating runs."""

    def __init__(self, runs: int, per_run: int) -> None:
        self.runs, self.per_run = runs, per_run
        self.per_second: dict[str, list[float]] = {"plain": [], "tenant": []}
        self.statements: dict[str, int] = {}
        self.body_s: dict[str, list[float]] = {"plain": [], "tenant": []}

    def add(self, name: str, per_second: float, results: list[dict[str, Any]]) -> None:
        counts = {int(r["statements"]) for r in results}
        if len(counts) != 1 or self.statements.setdefault(name, min(counts)) != min(counts):
            raise BenchError(f"{name}: statements per task varied: {sorted(counts)}")
        self.per_second[name].append(per_second)
        self.body_s[name].extend(float(r["body_s"]) for r in results)

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "per_run": self.per_run,
            "per_second": self.per_second,
            "statements_per_task": self.statements,
            "body_us_median": {
                name: round(median(times) * 1e6, 1) for name, times in self.body_s.items()
            },
        }


def _in_process(ctx: BenchContext) -> dict[str, Any]:
    tally = _Tally(ctx.pick(smoke=4, default=25), ctx.pick(smoke=25, default=200))
    warm = ctx.pick(smoke=20, default=200)
    tenants = seed_tenants()
    engines = bench_app.Engines(
        app_url=ctx.app_url.render_as_string(hide_password=False),
        plain_url=ctx.plain_url.render_as_string(hide_password=False),
    )
    app = bench_app.make_app("memory://", None, f"tcbench.{ctx.run_id}.apply", engines)
    plain = app.tasks[bench_app.PLAIN_RW]
    tenant = app.tasks[bench_app.TENANT_RW]

    def plain_call(i: int) -> dict[str, Any]:
        result: dict[str, Any] = plain.apply(args=(tenants[i % len(tenants)],), throw=True).get()
        return result

    def tenant_call(i: int) -> dict[str, Any]:
        with tenant_context(tenants[i % len(tenants)]):
            result: dict[str, Any] = tenant.apply(throw=True).get()
        return result

    variants: dict[str, Callable[[int], dict[str, Any]]] = {
        "plain": plain_call,
        "tenant": tenant_call,
    }
    try:
        for call in variants.values():
            for i in range(warm):
                call(i)
        for n in range(tally.runs):
            for name in alternate(list(variants), n):
                call = variants[name]
                with stopwatch() as elapsed:
                    results = [call(i) for i in range(tally.per_run)]
                tally.add(name, rate(tally.per_run, elapsed()), results)
        ctx.say(f"p1 apply(): {tally.runs} rounds of {tally.per_run} calls per variant done")
    finally:
        engines.dispose()
        app.close()
    return tally.to_json()


def _end_to_end(ctx: BenchContext) -> dict[str, Any]:
    tally = _Tally(ctx.pick(smoke=1, default=5), ctx.pick(smoke=100, default=2000))
    warm = ctx.pick(smoke=20, default=200)
    tenants = seed_tenants()
    with running(ctx, transports(ctx)["redis+redis"], pool="prefork") as worker:
        plain = worker.app.tasks[bench_app.PLAIN_RW]
        tenant = worker.app.tasks[bench_app.TENANT_RW]

        def publish_plain(i: int) -> AsyncResult[Any]:
            return plain.apply_async(args=(tenants[i % len(tenants)],))

        def publish_tenant(i: int) -> AsyncResult[Any]:
            with tenant_context(tenants[i % len(tenants)]):
                return tenant.apply_async()

        variants = {"plain": publish_plain, "tenant": publish_tenant}
        for publish in variants.values():
            warm_up(worker, publish, warm)
        for n in range(tally.runs):
            for name in alternate(list(variants), n):
                batch = run_batch(worker, variants[name], tally.per_run)
                tally.add(name, batch.per_second, batch.results)
                ctx.say(f"p1 worker run {n + 1}/{tally.runs} {name}: {batch.per_second} tasks/s")
    return tally.to_json()


def run(ctx: BenchContext) -> Section:
    """Measure P1 and return its section."""
    measured = {"apply": _in_process(ctx), "worker": _end_to_end(ctx)}
    paths = {"apply": "apply() in process", "worker": "real worker, Redis, prefork 2"}
    rows: list[list[Cell]] = []
    ratios: dict[str, float] = {}
    for key, data in measured.items():
        plain, tenant = (median(data["per_second"][v]) for v in ("plain", "tenant"))
        ratios[key] = paired_ratio(data["per_second"]["tenant"], data["per_second"]["plain"])
        runs = f"{data['runs']} x {data['per_run']:,}"
        for variant, per_second in (("plain", plain), ("tenant", tenant)):
            rows.append(
                [
                    paths[key],
                    variant,
                    per_second,
                    data["statements_per_task"][variant],
                    data["body_us_median"][variant],
                    runs,
                    ratios[key] if variant == "tenant" else None,
                ]
            )
    extra = {
        key: data["statements_per_task"]["tenant"] - data["statements_per_task"]["plain"]
        for key, data in measured.items()
    }
    e2e = ratios["worker"]
    notes = [
        "per second: median of the runs, plain and tenant alternating (AB BA AB …); "
        "ratio: median of tenant / plain over each back-to-back pair of runs",
        "pairs' ratios ranged "
        + ", ".join(
            f"{pair_spread(d['per_second']['tenant'], d['per_second']['plain'])} ({k})"
            for k, d in measured.items()
        ),
        "body µs: median time of the transaction inside the task (set_config included)",
        f"end-to-end ratio {e2e} against a target of ≥ {TARGET}: "
        + ("met" if e2e >= TARGET else "NOT met"),
        "statements per task counted by the engine (before_cursor_execute): tenant - plain = "
        + ", ".join(f"{n} ({k})" for k, n in extra.items())
        + (" as expected" if set(extra.values()) == {1} else " — expected exactly 1"),
    ]
    table = ctx.report(
        "P1 tenancy overhead: one indexed SELECT + one INSERT",
        ["path", "task", "per second", "statements", "body µs", "runs", "ratio tenant/plain"],
        rows,
        notes,
    )
    return Section(
        key="p1",
        title="Tenancy overhead",
        tables=[table],
        data={
            **measured,
            "ratio_apply": ratios["apply"],
            "ratio_end_to_end": e2e,
            "target": TARGET,
            "extra_statements": extra,
        },
    )
