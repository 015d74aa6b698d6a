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
    concurrency 2) serving every variant, their runs taking turns.

Two more tenant variants, timed alongside end to end, take the cost apart in
layers: the tenant task on an engine like the plain task's (**task only**:
publishing with the tenant, the header, the worker's checks), and on an
engine bound like the tenant task's but connected as the ``BYPASSRLS`` role
(**no policy**: the binding as well, without the policy's work on the
server).  Each ratio to the plain task is printed; the steps between them
are what each layer costs.  In process they are not timed: with calls taking
turns among five variants instead of three, the tenant task read 0.898 and
0.900 of the plain one on a 2-core machine where the three read 0.925 to
0.932, so the in-process ratio would no longer compare with its earlier runs.

A separate, untimed pass counts each task's statements (a
``before_cursor_execute`` listener on its engine) and the network round trips
of its transaction on the wire (a proxy that reads the PostgreSQL protocol and
counts ``ReadyForQuery`` messages, :mod:`tests._rig.pg_wire`), on psycopg 3
and psycopg2: the tenant task must make no more than the plain one, its
setting travelling with ``BEGIN`` (psycopg 3) or with the first statement
(psycopg2).  The timed engines have no listener of their own: any connection
event listener switches on SQLAlchemy's dispatch at every statement, begin and
commit, for both variants, which a host's engine without instrumentation does
not pay.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

from celery.result import AsyncResult

from tenant_celery import tenant_context

from . import bench_app, tenancy_parts
from ._common import (
    BenchContext,
    Cell,
    Section,
    alternate,
    median,
    pair_spread,
    paired_ratio,
    rate,
)
from ._scratch import seed_tenants
from ._workers import BenchError, run_batch, running, transports, warm_up
from .scale import group_pids, postgres_pids, process_ticks, spent

_REWARM = 10
"""Calls before each timed in-process run, on its new connections."""
_REWARM_WORKER = 40
"""Tasks before each timed end-to-end run, which open its new connections."""
_WIRE_CALLS = 20
"""Tasks per variant in the round-trip count (after as many to warm up)."""

TARGET = 0.97
"""Published target for the end-to-end ratio tenant/plain."""
TARGET_IN_PROCESS = 0.93
"""Published target for the ratio tenant/plain of ``apply()`` in process."""
OWN_STATEMENT = "own_statement"
"""The in-process variant that sets the tenant with a statement of its own."""
TASK_ONLY = "task_only"
"""The tenant task on an engine like the plain task's: no binding, no policy."""
NO_POLICY = "no_policy"
"""The tenant task on a bound engine as the BYPASSRLS role: the binding, no policy."""
_LAYERS = (TASK_ONLY, NO_POLICY, "tenant")
"""The tenant variants in the order they add the package's layers."""


class _Tally:
    """Per-variant rates, statements per task and body times over alternating runs."""

    def __init__(self, runs: int, per_run: int, variants: tuple[str, ...]) -> None:
        self.runs, self.per_run = runs, per_run
        self.per_second: dict[str, list[float]] = {name: [] for name in variants}
        self.body_s: dict[str, list[float]] = {name: [] for name in variants}

    def add(self, name: str, per_second: float, results: list[dict[str, Any]]) -> None:
        self.per_second[name].append(per_second)
        self.body_s[name].extend(float(r["body_s"]) for r in results)

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "per_run": self.per_run,
            "per_second": self.per_second,
            "body_us_median": {
                name: round(median(times) * 1e6, 1) for name, times in self.body_s.items()
            },
        }


def _in_process(ctx: BenchContext) -> dict[str, Any]:
    tally = _Tally(
        ctx.pick(smoke=4, default=25),
        ctx.pick(smoke=25, default=200),
        ("plain", "tenant", OWN_STATEMENT),
    )
    warm = ctx.pick(smoke=20, default=200)
    tenants = seed_tenants()
    engines = bench_app.Engines(
        app_url=ctx.app_url.render_as_string(hide_password=False),
        plain_url=ctx.plain_url.render_as_string(hide_password=False),
    )
    app = bench_app.make_app("memory://", None, f"tcbench.{ctx.run_id}.apply", engines)
    plain = app.tasks[bench_app.PLAIN_RW]

    def plain_call(i: int) -> dict[str, Any]:
        result: dict[str, Any] = plain.apply(args=(tenants[i % len(tenants)],), throw=True).get()
        return result

    def tenant_call(name: str) -> Callable[[int], dict[str, Any]]:
        task = app.tasks[name]

        def call(i: int) -> dict[str, Any]:
            result: dict[str, Any] = _apply_in_tenant(task, tenants, i).get()
            return result

        return call

    variants: dict[str, Callable[[int], dict[str, Any]]] = {
        "plain": plain_call,
        "tenant": tenant_call(bench_app.TENANT_RW),
        OWN_STATEMENT: tenant_call(bench_app.TENANT_RW_OWN_STATEMENT),
    }
    try:
        for call in variants.values():
            for i in range(warm):
                call(i)
        names = list(variants)
        for n in range(tally.runs):
            # New connections, so new server processes, for every run: a server
            # process keeps the CPU placement it started with, which makes one
            # connection's round trips faster or slower than another's for as
            # long as it lives.
            engines.dispose()
            for call in variants.values():
                for i in range(_REWARM):  # past psycopg's prepare threshold again
                    call(i)
            # The variants take turns call by call, the order reversed every other call, so a
            # slow spell of the machine falls on all of them alike.
            spent = dict.fromkeys(names, 0.0)
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for i in range(tally.per_run):
                for name in alternate(names, n + i):
                    started = time.perf_counter()
                    results[name].append(variants[name](i))
                    spent[name] += time.perf_counter() - started
            for name in names:
                tally.add(name, rate(tally.per_run, spent[name]), results[name])
        ctx.say(f"p1 apply(): {tally.runs} rounds of {tally.per_run} calls per variant done")
    finally:
        engines.dispose()
        app.close()
    return tally.to_json()


_TENANT_TASKS = {
    "tenant": bench_app.TENANT_RW,
    OWN_STATEMENT: bench_app.TENANT_RW_OWN_STATEMENT,
    TASK_ONLY: bench_app.TENANT_RW_TASK_ONLY,
    NO_POLICY: bench_app.TENANT_RW_NO_POLICY,
}
"""The tenant variants and their tasks."""
_LABELS = {
    "plain": "plain",
    "tenant": "tenant",
    OWN_STATEMENT: "tenant, own statement",
    TASK_ONLY: "tenant task only",
    NO_POLICY: "tenant, no policy",
}


def _counts(ctx: BenchContext) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """Round trips per task, counted on the wire, and statements per task, counted by
    the engines, per driver and variant, in an untimed pass."""
    trips: dict[str, dict[str, float]] = {}
    statements: dict[str, dict[str, int]] = {}
    for driver in ("psycopg", "psycopg2"):
        trips[driver], statements[driver] = _count_round_trips(ctx, driver)
    ctx.say(f"p1 round trips per task: {trips}; statements per task: {statements}")
    return trips, statements


def _count_round_trips(ctx: BenchContext, driver: str) -> tuple[dict[str, float], dict[str, int]]:
    from tests._rig.pg_wire import PgWire  # noqa: PLC0415 (the benchmarks run from a checkout)

    tenants = seed_tenants()
    with PgWire.to(ctx.app_url) as wire:

        def through(url: Any) -> str:
            routed = wire.url(url).set(drivername=f"postgresql+{driver}")
            return str(routed.render_as_string(hide_password=False))

        engines = bench_app.Engines(
            app_url=through(ctx.app_url), plain_url=through(ctx.plain_url), count_statements=True
        )
        app = bench_app.make_app("memory://", None, f"tcbench.{ctx.run_id}.wire", engines)
        calls: dict[str, Callable[[int], Any]] = {
            "plain": lambda i: app.tasks[bench_app.PLAIN_RW].apply(
                args=(tenants[i % len(tenants)],), throw=True
            ),
            **{
                variant: functools.partial(_apply_in_tenant, app.tasks[name], tenants)
                for variant, name in _TENANT_TASKS.items()
            },
        }
        counts: dict[str, float] = {}
        statements: dict[str, int] = {}
        try:
            for name, call in calls.items():
                for i in range(_WIRE_CALLS):
                    call(i)
                mark = wire.mark()
                found = {int(call(i).get()["statements"]) for i in range(_WIRE_CALLS)}
                per_task = wire.round_trips(mark) / _WIRE_CALLS
                counts[name] = int(per_task) if per_task.is_integer() else per_task
                if len(found) != 1:
                    raise BenchError(f"{name} on {driver}: statements per task varied: {found}")
                statements[name] = found.pop()
        finally:
            engines.dispose()
            app.close()
    return counts, statements


def _apply_in_tenant(task: Any, tenants: list[str], i: int) -> Any:
    """``apply()`` of the tenant task ``task`` inside the ``i``-th of ``tenants`` (cycling)."""
    with tenant_context(tenants[i % len(tenants)]):
        return task.apply(throw=True)


def _end_to_end(ctx: BenchContext) -> dict[str, Any]:
    # Plain and tenant first: reversed every other run, they stay back to back.
    names = ("plain", "tenant", TASK_ONLY, NO_POLICY)
    tally = _Tally(ctx.pick(smoke=1, default=8), ctx.pick(smoke=100, default=1500), names)
    warm = ctx.pick(smoke=20, default=200)
    tenants = seed_tenants()
    with running(ctx, transports(ctx)["redis+redis"], pool="prefork") as worker:
        plain = worker.app.tasks[bench_app.PLAIN_RW]
        run = [0]  # a new number makes each worker process open new connections

        def publish_plain(i: int) -> AsyncResult[Any]:
            return plain.apply_async(args=(tenants[i % len(tenants)],), kwargs={"run": run[0]})

        def publisher(name: str) -> Callable[[int], AsyncResult[Any]]:
            task = worker.app.tasks[name]

            def publish(i: int) -> AsyncResult[Any]:
                with tenant_context(tenants[i % len(tenants)]):
                    return task.apply_async(kwargs={"run": run[0]})

            return publish

        variants = {
            "plain": publish_plain,
            **{name: publisher(_TENANT_TASKS[name]) for name in names[1:]},
        }
        for publish in variants.values():
            warm_up(worker, publish, warm)
        cpu: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
        for n in range(tally.runs):
            for name in alternate(list(variants), n):
                run[0] += 1
                warm_up(worker, variants[name], _REWARM_WORKER)
                ours, ticks, client = postgres_pids(ctx), process_ticks(), time.process_time()
                batch = run_batch(worker, variants[name], tally.per_run)
                client = time.process_time() - client
                spent_cpu = _cpu_per_task(ctx, worker, ours, ticks, client, batch.count)
                for where, us in spent_cpu.items():
                    cpu[name].setdefault(where, []).append(us)
                tally.add(name, batch.per_second, batch.results)
                ctx.say(f"p1 worker run {n + 1}/{tally.runs} {name}: {batch.per_second} tasks/s")
    return {**tally.to_json(), "cpu_us_per_task": cpu}


def _cpu_per_task(
    ctx: BenchContext,
    worker: Any,
    ours: set[int],
    before: dict[int, tuple[str, int]],
    client: float,
    count: int,
) -> dict[str, float]:
    """CPU µs per task over one batch: this process (publishing and collecting), the
    worker's processes (its process group), the run's PostgreSQL processes, redis-server."""
    after = process_ticks()
    group = group_pids(worker.process.pid, after)
    found = spent(before, after, ((0, 1), (0, 1)), group, ours | postgres_pids(ctx))
    per_task = 1e6 / count
    return {
        "client": round(client * per_task, 1),
        "worker": round(found.workers * per_task, 1),
        "postgres": round(found.postgres * per_task, 1),
        "redis": round(found.redis * per_task, 1),
    }


def _cpu_note(cpu: dict[str, dict[str, list[float]]]) -> str:
    """Where the worker runs' CPU went per task, plain and tenant, medians of the runs."""
    labels = {
        "client": "this process (publish, collect)",
        "worker": "worker (main and pool processes)",
        "postgres": "PostgreSQL",
        "redis": "redis-server",
    }
    parts = []
    for where, label in labels.items():
        plain, tenant = median(cpu["plain"][where]), median(cpu["tenant"][where])
        parts.append(f"{label} {plain:,.0f} / {tenant:,.0f} ({tenant - plain:+,.0f})")
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    return (
        "CPU µs per task over the worker runs, plain / tenant (difference), medians of "
        f"the runs, from /proc, which counts each process's CPU in ticks of {tick_ms:g} ms "
        "(a difference of a few ticks per run is noise); redis-server: every one on the "
        "machine: " + "; ".join(parts)
    )


_ROW_ORDER = ("plain", TASK_ONLY, NO_POLICY, "tenant", OWN_STATEMENT)
"""The table's rows per path: the layers in the order they add up, then the fallback."""


def _layers_note(to_plain: dict[str, dict[str, float]]) -> str:
    """What each layer of the package costs, as the steps between the layered ratios."""
    steps = []
    for key, label in (("apply", "apply()"), ("worker", "worker")):
        found = to_plain[key]
        if not all(layer in found for layer in _LAYERS):
            continue
        task, binding, policy = (found[layer] for layer in _LAYERS)
        steps.append(
            f"{label}: the task's own work {1 - task:+.3f}, the binding {task - binding:+.3f}, "
            f"the policy {binding - policy:+.3f}"
        )
    return (
        "layers (worker runs), each a tenant variant against the plain task: tenant task "
        "only (the plain task's engine: publishing with the tenant, the header, the "
        "worker's checks), then no policy (an engine bound with bind_tenant_guc, as the "
        "BYPASSRLS role), then tenant (the app role, under the policy); what each layer "
        "takes off the ratio: " + "; ".join(steps)
    )


def run(ctx: BenchContext) -> Section:
    """Measure P1 and return its section."""
    trips, statements = _counts(ctx)
    measured = {"apply": _in_process(ctx), "worker": _end_to_end(ctx)}
    parts = tenancy_parts.measure(ctx)
    paths = {"apply": "apply() in process", "worker": "real worker, Redis, prefork 2"}
    rows: list[list[Cell]] = []
    # Each variant against the plain task, per path: "tenant" is P1's ratio.
    to_plain = {
        key: {
            variant: paired_ratio(rates, data["per_second"]["plain"])
            for variant, rates in data["per_second"].items()
            if variant != "plain"
        }
        for key, data in measured.items()
    }
    ratios = {key: found["tenant"] for key, found in to_plain.items()}
    own_ratio = to_plain["apply"][OWN_STATEMENT]
    for key, data in measured.items():
        runs = f"{data['runs']} x {data['per_run']:,}"
        for variant in _ROW_ORDER:
            if variant not in data["per_second"]:
                continue
            ratio_cell = to_plain[key].get(variant)
            rows.append(
                [
                    paths[key],
                    _LABELS[variant],
                    median(data["per_second"][variant]),
                    statements["psycopg"][variant],
                    trips["psycopg"].get(variant),
                    trips["psycopg2"].get(variant),
                    data["body_us_median"][variant],
                    runs,
                    ratio_cell,
                ]
            )
    extra = {driver: counted["tenant"] - counted["plain"] for driver, counted in statements.items()}
    e2e = ratios["worker"]
    notes = [
        "tenant: bind_tenant_guc sends the setting with a round trip the transaction makes "
        "anyway; tenant, own statement: set_tenant_guc() sends it as a statement of its own, "
        "as the binding does where it cannot (another driver, an executemany first)",
        _layers_note(to_plain),
        "per second: median of the runs; apply(): the variants take turns call by call "
        "within each run, the order reversed every other call; worker: the variants' runs "
        "take turns, the order reversed every other round (plain and tenant back to back "
        "either way); ratio: median of variant / plain over the runs (apply()) or over "
        "each round's runs (worker)",
        "pairs' ratios ranged "
        + ", ".join(
            f"{pair_spread(d['per_second']['tenant'], d['per_second']['plain'])} ({k})"
            for k, d in measured.items()
        ),
        "body µs: median time of the transaction inside the task (set_config included)",
        _cpu_note(measured["worker"]["cpu_us_per_task"]),
        f"end-to-end ratio {e2e} against a target of ≥ {TARGET}: "
        + ("met" if e2e >= TARGET else "NOT met"),
        f"apply() ratio {ratios['apply']} against a target of ≥ {TARGET_IN_PROCESS}: "
        + ("met" if ratios["apply"] >= TARGET_IN_PROCESS else "NOT met"),
        "statements and round trips per task counted in an untimed pass, "
        f"{_WIRE_CALLS} apply() calls per variant and driver; the timed engines have no "
        "listener of their own (any connection event listener switches on SQLAlchemy's "
        "dispatch for both variants: the parts table's reference row)",
        "statements counted by the engine (before_cursor_execute): tenant - plain = "
        + ", ".join(f"{n} ({k})" for k, n in extra.items())
        + (" as expected" if set(extra.values()) == {0} else " — expected 0"),
        "round trips: ReadyForQuery messages counted on the wire by a proxy that "
        "reads the protocol; tenant - plain = "
        + ", ".join(f"{d['tenant'] - d['plain']:g} ({driver})" for driver, d in trips.items())
        + (
            " as required"
            if all(d["tenant"] <= d["plain"] for d in trips.values())
            else " — a tenant task must make no more"
        ),
        "the timed runs use psycopg 3; the setting goes with BEGIN there, and ahead of the "
        "first statement on psycopg2",
    ]
    table = ctx.report(
        "P1 tenancy overhead: one indexed SELECT + one INSERT",
        [
            "path",
            "task",
            "per second",
            "statements",
            "round trips (psycopg 3)",
            "round trips (psycopg2)",
            "body µs",
            "runs",
            "ratio to plain",
        ],
        rows,
        notes,
    )
    return Section(
        key="p1",
        title="Tenancy overhead",
        tables=[table, parts],
        data={
            **measured,
            "ratio_apply": ratios["apply"],
            "ratio_end_to_end": e2e,
            "ratio_apply_own_statement": own_ratio,
            "ratios_to_plain": to_plain,
            "target_apply": TARGET_IN_PROCESS,
            "target": TARGET,
            "extra_statements": extra,
            "statements_per_task": statements,
            "round_trips_per_task": trips,
        },
    )
