"""Scale: how the package's transport drains a backlog with 1, 2, 4 and 8 workers, against Redis.

Each worker is a ``celery worker`` of its own on the solo pool, one process and
one consumer, with Redis results for both brokers so that PostgreSQL does the
broker's work alone.  Eight workers per broker are started once, each on a
queue of its own (their warm-up goes there).  A measurement publishes a
backlog of no-op tenant tasks (:data:`~benchmarks.bench_app.TENANT_NOOP`, 50
tenants in turn) to a fresh queue nobody consumes, then tells the first *n*
workers of the broker to consume it (Celery's ``add_consumer``, one broadcast)
and times from that broadcast to the last task's completion: what *n*
consumers drain, with the publisher out of the window.  The two brokers take
turns at each *n*, the order flipped every round.

During the window it reads what each side spent: the CPU time of every
PostgreSQL process, of ``redis-server`` and of the *n* workers (``/proc``), the
machine's busy share, the WAL written and flushed (``pg_current_wal_lsn()``,
``pg_stat_wal``), ``pg_stat_activity`` sampled every 20 ms for the broker's
backends waiting on a lock, and, on the transport, the workers' own claim
counters (:func:`tenant_celery.transport.claim_stats`) from each worker
monitor's ``/metrics``: claims, empty claims, messages per claim and the claim
time's percentiles.

A second table measures an idle worker's wake-ups: ``LISTEN`` (the default),
and polling alone (``listen: False``, as behind PgBouncer in transaction mode)
every second and every 100 ms: claims per second, PostgreSQL CPU per second,
the latency of a single task, and the connections the worker holds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import kombu
import redis
from celery import Celery
from celery.result import AsyncResult

from tenant_celery import tenant_context
from tenant_celery.transport import APPLICATION_NAME, CLAIM_SECONDS_BUCKETS

from . import _machine, bench_app
from ._common import BenchContext, Section, Table, median, rate
from ._scratch import connect, seed_tenants
from ._workers import (
    TCPG_PREFIX,
    BenchError,
    Transport,
    Worker,
    collect,
    running,
    start_worker,
    warm_up,
)

WORKERS = {"smoke": (1, 2), "default": (1, 2, 4, 8)}
ROUNDS = {"smoke": 1, "default": 3}
BROKERS = ("transport", "redis")
LABELS = {"transport": "PostgreSQL (tenant_celery.transport)", "redis": "Redis"}
SAMPLE_EVERY = 0.02
"""Seconds between samples of ``pg_stat_activity``."""
_MONITOR = re.compile(r"worker monitor listening on (http://\S+) ")
_TICK = os.sysconf("SC_CLK_TCK")

WAKEUPS = (
    ("LISTEN, poll every 1 s (default)", {"listen": True, "polling_interval": 1.0}),
    ("no LISTEN, poll every 1 s", {"listen": False, "polling_interval": 1.0}),
    ("no LISTEN, poll every 100 ms", {"listen": False, "polling_interval": 0.1}),
)


# ------------------------------------------------------------------ what was spent


def process_ticks() -> dict[int, tuple[str, int]]:
    """``pid -> (command, utime + stime in clock ticks)`` of every process in ``/proc``."""
    found: dict[int, tuple[str, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as file:
                raw = file.read()
            command = raw[raw.index("(") + 1 : raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2 :].split()
            found[int(entry.name)] = (command, int(fields[11]) + int(fields[12]))
    return found


def machine_ticks() -> tuple[int, int]:
    """``(busy, total)`` clock ticks of every CPU since boot (``/proc/stat``)."""
    with open("/proc/stat", encoding="utf-8") as file:
        values = [int(v) for v in file.readline().split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


@dataclass
class Spent:
    """CPU seconds by kind of process over a window, and the machine's busy share."""

    postgres: float
    redis: float
    workers: float
    busy_share: float


def spent(
    before: dict[int, tuple[str, int]],
    after: dict[int, tuple[str, int]],
    machine: tuple[tuple[int, int], tuple[int, int]],
    workers: Sequence[int],
    postgres: set[int] | None = None,
) -> Spent:
    """What the processes spent between ``before`` and ``after``; PostgreSQL's are
    ``postgres`` when given (this run's backends and the server's own), else every
    process called ``postgres``."""

    def delta(pids: Sequence[int]) -> float:
        # A process that ended in the window loses its CPU; one that began counts it all.
        ticks = sum(after[p][1] - before.get(p, (None, 0))[1] for p in pids if p in after)
        return ticks / _TICK

    def named(command: str) -> list[int]:
        return [pid for pid, (name, _) in after.items() if name == command]

    (busy0, total0), (busy1, total1) = machine
    return Spent(
        postgres=delta(
            named("postgres")
            if postgres is None
            else [p for p in named("postgres") if p in postgres]
        ),
        redis=delta(named("redis-server")),
        workers=delta([p for p in workers if p in after]),
        busy_share=(busy1 - busy0) / (total1 - total0) if total1 > total0 else math.nan,
    )


def postgres_pids(ctx: BenchContext) -> set[int]:
    """The server processes that work for this run: the scratch database's backends and
    the server's own (WAL writer, checkpointer, ...), not other databases' backends."""
    with connect(ctx.admin_url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s OR datname IS NULL",
            (ctx.admin_url.database,),
        ).fetchall()
    return {int(pid) for (pid,) in rows}


def group_pids(pgid: int, pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` in process group ``pgid``: a worker and its pool children."""
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):  # ended meanwhile
            if os.getpgid(pid) == pgid:
                found.append(pid)
    return found


def postgres_sockets(pgid: int, port: int = 5432) -> dict[str, int]:
    """TCP connections to ``port`` held by the processes of group ``pgid`` (a worker
    and its pool children): ``{"main": n, "children": m}``, read from ``/proc``."""
    remote = f":{port:04X}"
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="utf-8") as file:
            for line in list(file)[1:]:
                fields = line.split()
                if fields[2].endswith(remote) and fields[3] == "01":  # ESTABLISHED
                    inodes.add(fields[9])
    found = {"main": 0, "children": 0}
    for pid in group_pids(pgid, process_ticks()):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        found["main" if pid == pgid else "children"] += 1
    return found


class ActivitySampler:
    """Samples ``pg_stat_activity`` for the broker's active backends in a thread."""

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self.samples = 0
        self.active = 0
        self.waits: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ActivitySampler:
        conn = connect(self.ctx.admin_url)
        database = self.ctx.admin_url.database

        def sample() -> None:
            try:
                while not self._stop.wait(SAMPLE_EVERY):
                    rows = conn.execute(
                        "SELECT wait_event_type, wait_event FROM pg_stat_activity"
                        " WHERE datname = %s AND application_name = %s AND state = 'active'"
                        " AND pid <> pg_backend_pid()",
                        (database, APPLICATION_NAME),
                    ).fetchall()
                    self.samples += 1
                    self.active += len(rows)
                    for kind, event in rows:
                        if kind is not None:
                            self.waits[f"{kind}:{event}"] += 1
            finally:
                conn.close()

        self._thread = threading.Thread(target=sample, name="scale-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def share(self, kind: str) -> float:
        """Of the active broker backends sampled, the share waiting on ``kind``."""
        if not self.active:
            return math.nan
        waiting = sum(n for key, n in self.waits.items() if key.startswith(f"{kind}:"))
        return round(waiting / self.active, 3)


def wal(ctx: BenchContext) -> dict[str, float]:
    with connect(ctx.admin_url) as conn:
        row = conn.execute(
            "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, wal_records, wal_write, wal_sync"
            " FROM pg_stat_wal"
        ).fetchone()
    assert row is not None
    return {
        "bytes": float(row[0]),
        "records": float(row[1]),
        "writes": float(row[2]),
        "syncs": float(row[3]),
    }


# ------------------------------------------------------------------- claim counters


def monitor_url(worker: Worker) -> str:
    found = _MONITOR.search(worker.log_path.read_text(errors="replace"))
    if found is None:
        raise BenchError(f"no worker monitor address in {worker.log_path}")
    return found.group(1)


_SAMPLE = re.compile(r'^(celery_broker_[a-z_]+?)(?:\{le="([^"]+)"\})? ([0-9.e+-]+)$', re.M)


def scrape_claims(url: str) -> dict[str, Any]:
    """The claim counters a worker monitor serves: ``claims``, ``empty``, ``messages``,
    ``seconds`` and ``buckets`` (cumulative counts by upper bound)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, Any] = {"buckets": {}}
    names = {
        "celery_broker_claims_total": "claims",
        "celery_broker_empty_claims_total": "empty",
        "celery_broker_claimed_messages_total": "messages",
        "celery_broker_claim_duration_seconds_sum": "seconds",
    }
    for name, bound, value in _SAMPLE.findall(text):
        if name == "celery_broker_claim_duration_seconds_bucket":
            found["buckets"][float(bound)] = float(value)
        elif name in names:
            found[names[name]] = float(value)
    if "claims" not in found:
        raise BenchError(f"{url}/metrics serves no claim counters")
    return found


def claims_delta(
    before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The counters' growth, added up over the workers."""
    total: dict[str, Any] = {"claims": 0.0, "empty": 0.0, "messages": 0.0, "seconds": 0.0}
    buckets = dict.fromkeys(CLAIM_SECONDS_BUCKETS, 0.0)
    for b, a in zip(before, after, strict=True):
        for key in total:
            total[key] += a[key] - b[key]
        for bound in buckets:
            buckets[bound] += a["buckets"].get(bound, 0.0) - b["buckets"].get(bound, 0.0)
    total["buckets"] = buckets
    return total


def bucket_quantile(cumulative: dict[float, float], q: float) -> float:
    """The ``q`` quantile of a cumulative histogram, interpolated within its bucket
    (as Prometheus's ``histogram_quantile`` does); ``nan`` when it is empty."""
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]] if bounds else 0.0
    if not total:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, count
    return lower


# ------------------------------------------------------------------------ the runs


@dataclass
class Fleet:
    """One broker's workers, started once, and the client app that publishes."""

    broker: str
    transport: Transport
    workers: list[Worker]
    monitors: list[str] = field(default_factory=list)


def fleet_transports(ctx: BenchContext) -> dict[str, Transport]:
    """Both brokers with Redis results, so PostgreSQL does the broker's work alone."""
    libpq = ctx.app_url.set(drivername="postgresql").render_as_string(hide_password=False)
    return {
        "transport": Transport("tcpg+redis", f"{TCPG_PREFIX}{libpq}", ctx.redis_db(13)),
        "redis": Transport("redis+redis", ctx.redis_db(12), ctx.redis_db(13)),
    }


def node_name(worker: Worker) -> str:
    return f"{worker.name}@{socket.gethostname()}"


def publish_backlog(app: Celery, count: int) -> list[str]:
    task = app.tasks[bench_app.TENANT_NOOP]
    tenants = seed_tenants()
    ids = []
    for i in range(count):
        with tenant_context(tenants[i % len(tenants)]):
            result: AsyncResult[Any] = task.apply_async()
        ids.append(result.id)
    return ids


def drop_queue(transport: Transport, queue: str) -> None:
    url = transport.broker_url
    with contextlib.suppress(Exception):
        if url.startswith("redis"):
            client = redis.Redis.from_url(url, socket_connect_timeout=3)
            try:
                client.delete(queue, f"_kombu.binding.{queue}")
            finally:
                client.close()
        else:
            with kombu.Connection(url, connect_timeout=3) as conn:
                channel: Any = conn.default_channel
                channel.queue_delete(queue)
                channel.exchange_delete(queue)


def _control(
    app: Celery, command: str, queue: str, nodes: list[str], *, reply: bool = True
) -> None:
    method = getattr(app.control, command)
    if not reply:  # sent, not waited for: a busy worker may answer late
        method(queue, destination=nodes)
        return
    replies = method(queue, destination=nodes, reply=True, timeout=10)
    answered = {name for reply in replies or [] for name in reply}
    if answered != set(nodes):
        raise BenchError(f"{command} {queue}: replies from {sorted(answered)}, not {nodes}")


def measure(ctx: BenchContext, fleet: Fleet, n: int, count: int, run: int) -> dict[str, Any]:
    """Drain a backlog of ``count`` tasks with the first ``n`` workers of ``fleet``."""
    queue = f"tcbench.{ctx.run_id}.scale.{fleet.broker}.{n}.{run}"
    workers = fleet.workers[:n]
    nodes = [node_name(w) for w in workers]
    client = bench_app.make_app(fleet.transport.broker_url, fleet.transport.backend_url, queue)
    try:
        ids = publish_backlog(client, count)
        own = fleet.broker == "transport"
        claims_before = [scrape_claims(u) for u in fleet.monitors[:n]] if own else []
        wal_before = wal(ctx)
        ours = postgres_pids(ctx)
        ticks_before, machine_before = process_ticks(), machine_ticks()
        with ActivitySampler(ctx) as sampler:
            start = time.time()
            # Not waiting for the replies: the window ends with the last task.
            _control(client, "add_consumer", queue, nodes, reply=False)
            results = collect(workers[0], ids, timeout=60.0 + 0.05 * count)
            end = max(float(r["done"]) for r in results)
        ticks_after, machine_after = process_ticks(), machine_ticks()
        claims_after = [scrape_claims(u) for u in fleet.monitors[:n]] if own else []
        time.sleep(0.6)  # pg_stat_wal is flushed by the server's processes now and then
        wal_after = wal(ctx)
        _control(client, "cancel_consumer", queue, nodes)
    finally:
        drop_queue(fleet.transport, queue)
        client.close()
    seconds = end - start
    cpu = spent(
        ticks_before,
        ticks_after,
        (machine_before, machine_after),
        [w.process.pid for w in workers],
        ours | postgres_pids(ctx),
    )
    found: dict[str, Any] = {
        "tasks": count,
        "seconds": round(seconds, 3),
        "tasks_per_second": rate(count, seconds),
        "cpu_seconds": {
            "postgres": round(cpu.postgres, 3),
            "redis": round(cpu.redis, 3),
            "workers": round(cpu.workers, 3),
        },
        "machine_busy": round(cpu.busy_share, 3),
        "wal": {key: wal_after[key] - wal_before[key] for key in wal_after},
        "samples": sampler.samples,
        "active_broker_backends": sampler.active,
        "waits": dict(sampler.waits.most_common(8)),
        "lock_wait_share": sampler.share("Lock"),
        "lwlock_wait_share": sampler.share("LWLock"),
        "io_wait_share": sampler.share("IO"),
    }
    if own:
        delta = claims_delta(claims_before, claims_after)
        cumulative = delta["buckets"]  # as /metrics serves them: cumulative
        found["claims"] = {
            "claims": int(delta["claims"]),
            "empty": int(delta["empty"]),
            "messages": int(delta["messages"]),
            "seconds": round(delta["seconds"], 4),
            "p50_ms": round(1000 * bucket_quantile(cumulative, 0.5), 3),
            "p95_ms": round(1000 * bucket_quantile(cumulative, 0.95), 3),
            "buckets": {str(b): v for b, v in delta["buckets"].items()},
        }
    ctx.say(
        f"scale {fleet.broker} x{n}: {found['tasks_per_second']} tasks/s, machine "
        f"{found['machine_busy']:.0%} busy"
        + (
            f", {found['claims']['claims']} claims ({found['claims']['empty']} empty), "
            f"p95 {found['claims']['p95_ms']} ms"
            if own
            else ""
        )
    )
    return found


@contextlib.contextmanager
def fleet(
    ctx: BenchContext, broker: str, transport: Transport, size: int, warm: int
) -> Iterator[Fleet]:
    started: list[Worker] = []
    # kombu's Redis transport takes up a queue added to a worker when its BRPOP in
    # progress times out (polling_interval, 1 s by default): 100 ms, so a worker
    # joins the drain as promptly on both brokers.
    options = {"polling_interval": 0.1} if broker == "redis" else {}
    conf = json.dumps({"broker_transport_options": options})
    try:
        for _ in range(size):
            worker = start_worker(
                ctx,
                transport,
                pool="solo",
                concurrency=1,
                tag=f"-scale-{broker}",
                environ={"TENANT_CELERY_MONITOR_PORT": "0", bench_app.CONF_ENV: conf},
                options=["--prefetch-multiplier", "4"],
            )
            started.append(worker)
        found = Fleet(broker, transport, started)
        for worker in started:
            task = worker.app.tasks[bench_app.TENANT_NOOP]
            tenants = seed_tenants()

            def publish(i: int, task: Any = task, tenants: list[str] = tenants) -> AsyncResult[Any]:
                with tenant_context(tenants[i % len(tenants)]):
                    result: AsyncResult[Any] = task.apply_async()
                return result

            warm_up(worker, publish, warm)
            if broker == "transport":
                found.monitors.append(monitor_url(worker))
        yield found
    finally:
        for worker in started:  # all told at once, then reaped
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(3)  # SIGQUIT: a cold shutdown, nothing is running
        for worker in started:
            worker.stop()


# ------------------------------------------------------------------ idle wake-ups


def measure_wakeup(
    ctx: BenchContext, options: dict[str, Any], *, idle_seconds: float, singles: int
) -> dict[str, Any]:
    """One prefork worker (concurrency 2) with ``options``: idle claims and PostgreSQL
    CPU per second, a single task's latency from publish to completion, connections."""
    libpq = ctx.app_url.set(drivername="postgresql").render_as_string(hide_password=False)
    transport = Transport("tcpg+redis", f"{TCPG_PREFIX}{libpq}", ctx.redis_db(13))
    conf = json.dumps({"broker_transport_options": options})
    with running(
        ctx,
        transport,
        pool="prefork",
        concurrency=2,
        tag="-wakeup",
        environ={"TENANT_CELERY_MONITOR_PORT": "0", bench_app.CONF_ENV: conf},
    ) as worker:
        task = worker.app.tasks[bench_app.TENANT_NOOP]
        tenant = seed_tenants()[0]

        def publish(i: int) -> AsyncResult[Any]:
            with tenant_context(tenant):
                result: AsyncResult[Any] = task.apply_async()
            return result

        warm_up(worker, publish, 10)
        url = monitor_url(worker)
        time.sleep(min(2.0, idle_seconds))  # the warm-up's wake-ups have passed
        ours = postgres_pids(ctx)
        before, ticks0 = scrape_claims(url), process_ticks()
        time.sleep(idle_seconds)
        after, ticks1 = scrape_claims(url), process_ticks()
        postgres = spent(ticks0, ticks1, ((0, 1), (0, 1)), [], ours | postgres_pids(ctx)).postgres
        latencies = []
        for i in range(singles):
            time.sleep(0.137)  # never in step with the polls
            sent = time.time()
            done = collect(worker, [publish(i).id], timeout=30)[0]["done"]
            latencies.append(1000 * (float(done) - sent))
        connections = postgres_sockets(worker.process.pid)
    return {
        "options": options,
        "idle_seconds": idle_seconds,
        "claims_per_second": round((after["claims"] - before["claims"]) / idle_seconds, 2),
        "postgres_cpu_ms_per_second": round(1000 * postgres / idle_seconds, 2),
        "latency_ms": [round(x, 2) for x in latencies],
        "latency_median_ms": round(median(latencies), 2),
        "latency_max_ms": round(max(latencies), 2),
        "connections": connections,
    }


# ------------------------------------------------------------------------ tables


def curve_rows(runs: dict[str, dict[int, list[dict[str, Any]]]]) -> list[list[Any]]:
    """One row per broker and worker count: the medians of its rounds."""
    rows: list[list[Any]] = []
    for n in sorted({n for by_n in runs.values() for n in by_n}):
        for broker in BROKERS:
            found = runs.get(broker, {}).get(n)
            if not found:
                continue

            def med(get: Any, found: list[dict[str, Any]] = found) -> float:
                values = [v for r in found if (v := get(r)) is not None]
                return median([v for v in values if not math.isnan(v)])

            per_task = 1e6 / max(1, found[0]["tasks"])
            own = broker == "transport"
            rows.append(
                [
                    LABELS[broker],
                    n,
                    med(lambda r: r["tasks_per_second"]),
                    round(med(lambda r: r["cpu_seconds"]["postgres"]) * per_task, 1),
                    round(med(lambda r: r["cpu_seconds"]["redis"]) * per_task, 1),
                    round(med(lambda r: r["cpu_seconds"]["workers"]) * per_task, 1),
                    round(med(lambda r: r["machine_busy"]) * 100, 1),
                    med(lambda r: r["claims"]["p50_ms"]) if own else None,
                    med(lambda r: r["claims"]["p95_ms"]) if own else None,
                    round(med(lambda r: r["claims"]["messages"] / max(1, r["claims"]["claims"])), 2)
                    if own
                    else None,
                    round(
                        med(lambda r: 100 * r["claims"]["empty"] / max(1, r["claims"]["claims"])), 1
                    )
                    if own
                    else None,
                    round(med(lambda r: 100 * r["lock_wait_share"]), 1) if own else None,
                    round(med(lambda r: r["wal"]["bytes"] / r["tasks"] / 1024), 2),
                    round(med(lambda r: r["wal"]["syncs"] / r["seconds"]), 1),
                ]
            )
    return rows


CURVE_COLUMNS = [
    "broker",
    "workers",
    "tasks/s",
    "PostgreSQL CPU µs/task",
    "redis-server CPU µs/task",
    "workers CPU µs/task",
    "machine busy %",
    "claim p50 ms",
    "claim p95 ms",
    "messages/claim",
    "empty claims %",
    "lock waits %",
    "WAL kB/task",
    "WAL flushes/s",
]


def wakeup_rows(found: Sequence[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
    return [
        [
            label,
            r["claims_per_second"],
            r["postgres_cpu_ms_per_second"],
            r["latency_median_ms"],
            r["latency_max_ms"],
            r["connections"]["main"],
            r["connections"]["children"],
        ]
        for label, r in found
    ]


WAKEUP_COLUMNS = [
    "wake-ups",
    "idle claims/s",
    "idle PostgreSQL CPU ms/s",
    "one task, median ms",
    "one task, max ms",
    "connections, main process",
    "connections, pool processes",
]


def curve_table(
    ctx: BenchContext, runs: dict[str, dict[int, list[dict[str, Any]]]], count: int, rounds: int
) -> Table:
    return ctx.report(
        "Scale: a backlog of no-op tenant tasks drained by 1 to 8 solo workers",
        CURVE_COLUMNS,
        curve_rows(runs),
        [
            f"{count:,} tasks per run, published before the window; timed from the "
            "add_consumer broadcast to the last completion; each worker one process (solo "
            "pool, prefetch 4); Redis results for both brokers",
            f"{rounds} round(s), the brokers in turn at each worker count, the order flipped "
            "every round; every figure the median of the rounds",
            "CPU µs/task: CPU time over the window, per task, of the run's PostgreSQL "
            "backends and the server's own processes, of redis-server (results, and the "
            "Redis broker) and of the draining workers; machine busy: share of both cores "
            "busy over the window, everything on the machine included",
            "claim p50/p95: the claim's round trip as the workers count it "
            "(celery_broker_claim_duration_seconds, interpolated in its buckets); empty "
            "claims: claims that took nothing, of all the workers' claims",
            "lock waits: of the broker's active backends sampled in pg_stat_activity every "
            "20 ms, the share waiting on a heavyweight lock; WAL: bytes written and "
            "pg_stat_wal's wal_sync over the window, server-wide (the Redis rows show what "
            "the rest of the server wrote meanwhile)",
        ],
    )


def run(ctx: BenchContext) -> Section:
    """Measure the scale curve and the wake-up costs; return the section."""
    sizes = WORKERS[ctx.size]
    rounds = ROUNDS[ctx.size]
    count = ctx.pick(smoke=60, default=3000)
    warm = ctx.pick(smoke=4, default=20)
    load_start = _machine.load_average()
    ctx.say(f"scale: load average at start {load_start}")
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {b: {} for b in BROKERS}
    pairs = fleet_transports(ctx)
    with (
        fleet(ctx, "transport", pairs["transport"], max(sizes), warm) as own,
        fleet(ctx, "redis", pairs["redis"], max(sizes), warm) as other,
    ):
        fleets = {"transport": own, "redis": other}
        for r in range(rounds):
            for n in sizes:
                order = BROKERS if (r + sizes.index(n)) % 2 == 0 else BROKERS[::-1]
                for broker in order:
                    runs[broker].setdefault(n, []).append(measure(ctx, fleets[broker], n, count, r))
    curve = curve_table(ctx, runs, count, rounds)
    idle = ctx.pick(smoke=2, default=10)
    singles = ctx.pick(smoke=3, default=20)
    wakeups = [
        (label, measure_wakeup(ctx, options, idle_seconds=idle, singles=singles))
        for label, options in WAKEUPS
    ]
    wakeup_table = ctx.report(
        "Wake-ups: what an idle transport worker costs, with and without LISTEN",
        WAKEUP_COLUMNS,
        wakeup_rows(wakeups),
        [
            f"one prefork worker of concurrency 2 consuming one queue (and its remote-control "
            f"queue), idle for {idle} s, then {singles} single tasks published one at a time",
            "idle claims/s: from the worker's claim counters; idle PostgreSQL CPU: the run's "
            "backends and the server's own processes, per second of the idle window",
            "one task: from publish to the task's completion, results in Redis; connections: "
            "the worker's TCP connections to PostgreSQL after its tasks ran, from /proc (with "
            "Redis results, all of them the broker's)",
        ],
    )
    load_end = _machine.load_average()
    ctx.say(f"scale: load average at end {load_end}")
    return Section(
        key="scale",
        title="Scale curve: workers against one PostgreSQL, and wake-ups",
        tables=[curve, wakeup_table],
        data={
            "workers": list(sizes),
            "rounds": rounds,
            "tasks_per_run": count,
            "cpu_count": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": load_end,
            "runs": {b: {str(n): found for n, found in by_n.items()} for b, by_n in runs.items()},
            "wakeups": [{"label": label, **found} for label, found in wakeups],
        },
    )
