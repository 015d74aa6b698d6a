"""P3 with events: tenant tasks per second with worker events (``-E``) on, against off.

For the package's transport (:mod:`tenant_celery.transport`, pooled PostgreSQL
results beside it) and for Redis (Redis results), two prefork workers
(concurrency 2) each, identical but for ``-E``, run P3's tenant task with no
body.  Three variants per broker:

* **off**: the worker without ``-E``;
* **on, no listener**: the worker with ``-E`` and nobody consuming its events
  (the transport sends nothing then; Redis finds no queue bound and drops them);
* **on, a listener**: the same worker while a monitor consumes its events, a
  process of its own running Celery's event receiver as ``celery events`` and
  Flower do (:mod:`benchmarks._event_listener`), started, and receiving the
  worker's heartbeats, before the timed run begins.

Each round runs every broker's three variants, the brokers and the variants in
turn, both orders reversed every other round, so a slow moment of the machine
falls on one run rather than on one variant.  A variant's ratio is the median
over the rounds of its run's tasks per second against the same broker's
events-off run of that round.  The listener counts the task events it received
(three per task: received, started, succeeded) and how many carried the
tenant; for the transport, the message table's id sequence counts the rows
each run stored (one per task: events are sent by ``NOTIFY``, never stored).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery.result import AsyncResult

from tenant_celery import tenant_context
from tenant_celery.transport import _TABLE_TTL, MESSAGE_TABLE

from . import bench_app
from ._common import (
    BenchContext,
    Section,
    alternate,
    median,
    pair_spread,
    paired_ratio,
    ratio,
)
from ._event_listener import READY
from ._scratch import seed_tenants
from ._workers import ROOT, BenchError, Worker, run_batch, start_worker, transports, warm_up

BROKERS = {
    # label in transports(): broker as the table shows it
    "tcpg+pooled": "PostgreSQL (tenant_celery.transport)",
    "redis+redis": "Redis",
}
OFF, ON, LISTENED = "off", "on", "on+listener"
VARIANTS = (OFF, ON, LISTENED)
SHOWN = {OFF: "off", ON: "on, no listener", LISTENED: "on, a listener"}
EVENTS_PER_TASK = 3
"""Task events a worker sends for a task that succeeds: received, started, succeeded."""
READY_TIMEOUT = 30.0
"""Seconds for a listener to start and receive the worker's first heartbeat."""
DRAIN_TIMEOUT = 30.0
"""Seconds a listener may take, after the run, to receive the last task's events."""
SETTLE = _TABLE_TTL + 0.5
"""Seconds after a listener stops before the next run: the transport caches an
exchange's bindings this long, so "no listener" means none the worker knows of."""


@dataclass
class Listener:
    """A running :mod:`benchmarks._event_listener`; ``result`` is set when it has exited."""

    process: subprocess.Popen[str]
    log_path: Path
    result: dict[str, Any] = field(default_factory=dict)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def listening(ctx: BenchContext, worker: Worker, expected: int) -> Iterator[Listener]:
    """Run a listener of ``worker``'s events for the ``with`` block; then wait until it
    has received ``expected`` tasks' success (or :data:`DRAIN_TIMEOUT`) and read its counts.

    Raises:
        BenchError: it exited, or did not receive the worker's heartbeat in
            :data:`READY_TIMEOUT` seconds; or it printed no counts.
    """
    count = len(list(ctx.workdir.glob("*.log"))) + 1
    log_path = ctx.workdir / f"{count:02d}-{worker.transport.label}-listener.log"
    hostname = _hostname(worker)
    # ``-m`` run from the checkout's root finds the benchmarks package there.
    command = [sys.executable, "-m", "benchmarks._event_listener"]
    command += [worker.transport.broker_url, hostname, str(expected)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
    listener = Listener(process, log_path)
    try:
        _wait_ready(listener, hostname)
        yield listener
        try:
            out, _ = process.communicate(timeout=DRAIN_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)  # it prints what it received so far
            out, _ = process.communicate(timeout=10)
        lines = out.strip().splitlines()
        if not lines:
            raise BenchError(
                f"the listener printed no counts; log {log_path}:\n{listener.log_tail()}"
            )
        listener.result = json.loads(lines[-1])
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def _hostname(worker: Worker) -> str:
    """The worker's node name as its events give it (``-n name@%h``)."""
    return f"{worker.name}@{socket.gethostname()}"


def _wait_ready(listener: Listener, hostname: str) -> None:
    stdout = listener.process.stdout
    assert stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        readable = select.select([stdout], [], [], remaining)[0] if remaining > 0 else []
        line = stdout.readline() if readable else ""
        if line.strip() == READY:
            return
        if not readable or not line:
            raise BenchError(
                f"the listener of {hostname} was not ready in {READY_TIMEOUT:g} s "
                f"(exit status {listener.process.poll()}); log {listener.log_path}:\n"
                f"{listener.log_tail()}"
            )


def _stored_rows(ctx: BenchContext) -> Callable[[], int]:
    """A function giving how many rows the transport's message table has ever
    received: its id sequence's last value (a sequence never goes back)."""
    engine = ctx.admin_engine(poolclass=sa.NullPool)
    query = sa.text(
        "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence(:table, 'id')::regclass), 0)"
    )

    def stored() -> int:
        with engine.connect() as conn:
            return int(conn.execute(query, {"table": MESSAGE_TABLE}).scalar_one())

    return stored


def _publisher(worker: Worker, tenants: list[str]) -> Callable[[int], AsyncResult[Any]]:
    task = worker.app.tasks[bench_app.TENANT_NOOP]

    def publish(i: int) -> AsyncResult[Any]:
        with tenant_context(tenants[i % len(tenants)]):
            result: AsyncResult[Any] = task.apply_async()
        return result

    return publish


def _timed(
    ctx: BenchContext,
    worker: Worker,
    publish: Callable[[int], AsyncResult[Any]],
    count: int,
    *,
    listener: bool,
    stored: Callable[[], int] | None,
) -> dict[str, Any]:
    """One timed run of ``count`` tasks; with ``listener``, while one listens."""
    before = stored() if stored else None
    heard: dict[str, Any] = {}
    if listener:
        with listening(ctx, worker, count) as running:
            # Counted from here: events the worker sent while the listener was
            # starting (its queue declared, not yet consumed) are stored as rows,
            # as they should be, but they belong to no task of the run.
            before = stored() if stored else None
            batch = run_batch(worker, publish, count)
        heard = running.result
        time.sleep(SETTLE)
    else:
        batch = run_batch(worker, publish, count)
    found: dict[str, Any] = {"tasks_per_second": batch.per_second}
    if stored is not None and before is not None:
        found["rows_per_task"] = round((stored() - before) / count, 3)
    if heard:
        found["listener"] = heard
        found["events_per_task"] = round(heard["task_events"] / count, 3)
    return found


def run(ctx: BenchContext) -> Section:
    """Measure P3 with events on and off, and return its section."""
    count = ctx.pick(smoke=50, default=2000)
    rounds = ctx.pick(smoke=1, default=5)
    warm = ctx.pick(smoke=10, default=100)
    tenants = seed_tenants()
    pairs = transports(ctx)
    stored = _stored_rows(ctx)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        label: {variant: [] for variant in VARIANTS} for label in BROKERS
    }
    workers: dict[str, dict[str, Worker]] = {}
    publishers: dict[str, dict[str, Callable[[int], AsyncResult[Any]]]] = {}
    try:
        for label in BROKERS:
            for variant, options in ((OFF, ()), (ON, ("-E",))):
                worker = start_worker(
                    ctx, pairs[label], pool="prefork", options=options, tag=f"-events-{variant}"
                )
                workers.setdefault(label, {})[variant] = worker
                publishers.setdefault(label, {})[variant] = _publisher(worker, tenants)
                warm_up(worker, publishers[label][variant], warm)
        for n in range(rounds):
            for label in alternate(list(BROKERS), n):
                for variant in alternate(VARIANTS, n):
                    kind = OFF if variant == OFF else ON
                    found = _timed(
                        ctx,
                        workers[label][kind],
                        publishers[label][kind],
                        count,
                        listener=variant == LISTENED,
                        stored=stored if label.startswith("tcpg") else None,
                    )
                    runs[label][variant].append(found)
                    extra = (
                        f", {found['events_per_task']} events per task"
                        if "events_per_task" in found
                        else ""
                    )
                    ctx.say(
                        f"p3-events run {n + 1}/{rounds} {label} {SHOWN[variant]}: "
                        f"{found['tasks_per_second']} tasks/s{extra}"
                    )
    finally:
        for by_variant in workers.values():
            for worker in by_variant.values():
                worker.stop()
    return _section(ctx, runs, count=count, rounds=rounds)


def _section(
    ctx: BenchContext,
    runs: dict[str, dict[str, list[dict[str, Any]]]],
    *,
    count: int,
    rounds: int,
) -> Section:
    results: dict[str, dict[str, dict[str, Any]]] = {}
    rows = []
    spreads = []
    delays = []
    for label, by_variant in runs.items():
        off = [r["tasks_per_second"] for r in by_variant[OFF]]
        for variant, found in by_variant.items():
            rates = [r["tasks_per_second"] for r in found]
            entry: dict[str, Any] = {
                "tasks_per_second_runs": rates,
                "tasks_per_second": median(rates),
            }
            if variant != OFF:
                entry["ratio_runs"] = [ratio(r, b) for r, b in zip(rates, off, strict=True)]
                entry["ratio"] = paired_ratio(rates, off)
                spreads.append(f"{_short(label)} {SHOWN[variant]} {pair_spread(rates, off)}")
            if found and "rows_per_task" in found[0]:
                entry["rows_per_task_runs"] = [r["rows_per_task"] for r in found]
                entry["rows_per_task"] = median(entry["rows_per_task_runs"])
            if variant == LISTENED:
                entry["events_per_task_runs"] = [r["events_per_task"] for r in found]
                entry["events_per_task"] = median(entry["events_per_task_runs"])
                entry["listener_runs"] = [r["listener"] for r in found]
                with_tenant = sum(r["listener"]["task_events_with_tenant"] for r in found)
                task_events = sum(r["listener"]["task_events"] for r in found)
                entry["task_events_with_tenant_share"] = (
                    round(with_tenant / task_events, 3) if task_events else None
                )
                delay = median([r["listener"]["delay_ms"]["median"] for r in found])
                p95 = median([r["listener"]["delay_ms"]["p95"] for r in found])
                entry["delay_ms_median"], entry["delay_ms_p95"] = delay, p95
                cpu = median([r["listener"]["cpu_s"] * 1e6 / count for r in found])
                entry["listener_cpu_us_per_task"] = round(cpu, 1)
                delays.append(
                    f"{_short(label)} {delay:.1f} ms median, {p95:.1f} ms p95, "
                    f"{cpu:.0f} µs of the listener's CPU per task"
                )
            results.setdefault(label, {})[variant] = entry
            rows.append(
                [
                    BROKERS[label],
                    SHOWN[variant],
                    entry["tasks_per_second"],
                    entry.get("ratio"),
                    entry.get("events_per_task"),
                    entry.get("rows_per_task"),
                ]
            )
    table = ctx.report(
        "P3 with worker events: tenant tasks per second, -E on against off",
        ["broker", "events", "tasks/s", "ratio to off", "events per task", "rows per task"],
        rows,
        [
            f"prefork 2, a tenant task with no body; the package's transport with pooled "
            f"PostgreSQL results, Redis with Redis results; {rounds} round"
            f"{'s' if rounds > 1 else ''} of {count:,} tasks per variant, the brokers and "
            "the variants in turn, reversed every other round; tasks/s: median of the rounds",
            "ratio to off: median over the rounds of the run's tasks/s against the same "
            "broker's events-off run of that round",
            "a listener: a process of its own consuming the worker's events with Celery's "
            "event receiver, as celery events and Flower do, receiving the worker's heartbeats "
            f"before the run starts; events per task: task events it received ({EVENTS_PER_TASK}"
            " per task: received, started, succeeded)",
            "rows per task: rows the transport's message table received during the run, per "
            "task (its id sequence): events are sent by NOTIFY, not stored",
            f"pairs' ratios ranged: {'; '.join(spreads)}",
            "task events from sending to receipt by the listener, and the listener's CPU "
            f"time (median of the rounds): {'; '.join(delays)}",
        ],
    )
    return Section(
        key="p3-events",
        title="Throughput with worker events on and off",
        tables=[table],
        data={
            "tasks_per_run": count,
            "runs": rounds,
            "pool": "prefork",
            "concurrency": 2,
            "events_per_task_expected": EVENTS_PER_TASK,
            "results": results,
        },
    )


def _short(label: str) -> str:
    return "transport" if label.startswith("tcpg") else "Redis"
