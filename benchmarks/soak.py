"""Soak: many tasks through the package's transport at a sustained rate, sampled over time.

Two ``celery worker`` processes on the solo pool (one process and one consumer
each, prefetch 4) consume one queue on the transport, with results disabled
(``task_ignore_result``), so PostgreSQL carries the broker alone.
:data:`PUBLISHERS` processes of their own send no-op tenant tasks
(:data:`~benchmarks.bench_app.TENANT_NOOP`, :data:`TENANTS` tenants in turn)
through Celery's ``apply_async``, keeping the queue's backlog in a band: whenever
fewer than ``low`` messages are queued each publishes up to ``high``.  The
backlog never grows, and the rate is what the machine sustains with the
publishers and the workers on it; the message table's size is what its
turnover and autovacuum make of it.

Every :data:`SAMPLE_SECONDS` (default size) it samples:

* the message table: ``pg_relation_size`` of its heap and of each of its
  indexes, ``pg_total_relation_size``, ``n_live_tup`` and ``n_dead_tup``,
  ``autovacuum_count``, ``autoanalyze_count`` and ``last_autovacuum`` from
  ``pg_stat_user_tables``;
* the queue: messages queued (rows of the queue) and claimed (rows with a
  lease), tasks published and done (published and no longer in the table:
  a row is deleted when its task is acknowledged);
* each worker (and its children, if any) and the publishers: resident memory
  (``VmRSS`` of ``/proc/<pid>/status``), open file descriptors
  (``/proc/<pid>/fd``) and TCP connections to PostgreSQL (``/proc``);
* the transport's connections to the database in ``pg_stat_activity``
  (``application_name`` :data:`~tenant_celery.transport.APPLICATION_NAME`), and
  the age of the oldest snapshot any session of the database holds
  (``age(backend_xmin)``): vacuum cannot remove rows deleted after it.

The count is :data:`TASKS` at each size, or ``TENANT_CELERY_BENCH_SOAK_TASKS``;
``TENANT_CELERY_BENCH_SOAK_SECONDS`` caps the publishing time (the tasks
published by then are drained and reported, with the cap noted).  Autovacuum
is the server's: the section records its settings, and says so when it is off.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from typing import Any

import psycopg

from tenant_celery import tenant_context
from tenant_celery.transport import APPLICATION_NAME

from . import _machine, bench_app
from ._common import BenchContext, Section, rate
from ._scratch import connect, seed_tenants
from ._workers import TCPG_PREFIX, BenchError, Transport, Worker, start_worker
from .scale import postgres_sockets

TASKS = {"smoke": 1500, "default": 1_000_000}
TASKS_ENV = "TENANT_CELERY_BENCH_SOAK_TASKS"
SECONDS_ENV = "TENANT_CELERY_BENCH_SOAK_SECONDS"
"""Publish for at most this many seconds, then drain what was published and report."""
SAMPLE_SECONDS = {"smoke": 1.0, "default": 15.0}
BACKLOG = {"smoke": (100, 300), "default": (1000, 3000)}
"""The band the publishers keep the queue's backlog in: ``(low, high)``: without a
rate, they top it up to ``high`` when it falls under ``low``; with one, ``high``
is the most they let wait."""
RATE = {"smoke": 300.0, "default": 400.0}
"""Tasks a second the publishers send together, at a constant pace, so that the
quarters compared for the size verdict carry the same load."""
RATE_ENV = "TENANT_CELERY_BENCH_SOAK_RATE"
"""Overrides :data:`RATE`; ``0`` publishes as fast as the workers drain (the band)."""
_RECOUNT_SECONDS = 0.5
"""A paced publisher reads the backlog this often."""
WORKERS = 2
PUBLISHERS = int(os.environ.get("TENANT_CELERY_BENCH_SOAK_PUBLISHERS") or 2)
"""Publishing processes: a publish waits for its commit's flush, and two share flushes."""
TENANTS = 20
TABLE = "tenant_celery_message"
GROWTH_LIMIT = 1.25
"""Bounded: the last quarter's largest sample at most this times the first quarter's."""


# --------------------------------------------------------------------- the publishers


def publish_loop(
    broker_url: str,
    admin_dsn: str,
    queue: str,
    total: int,
    band: tuple[int, int],
    pace: float,
    published: Synchronized[int],
    ready: Event,
    go: Event,
    stop: Event,
) -> None:
    """Publish ``total`` no-op tenant tasks to ``queue``; ``published`` counts them.

    With ``pace`` (tasks a second, 0 for none), at that constant rate, waiting
    while ``band[1]`` messages are queued; without, keeping the queue's backlog
    between ``band[0]`` and ``band[1]``.  Sets ``ready`` once connected, and
    starts when ``go`` is set."""
    app = bench_app.make_app(broker_url, None, queue)
    app.conf.task_ignore_result = True
    task = app.tasks[bench_app.TENANT_NOOP]
    tenants = seed_tenants()[:TENANTS]
    low, high = band
    sent = 0

    def send() -> None:
        nonlocal sent
        with tenant_context(tenants[sent % len(tenants)]):
            task.apply_async()
        sent += 1
        published.value = sent

    try:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:

            def queued() -> int:
                row = conn.execute(
                    f"SELECT count(*) FROM {TABLE} WHERE queue = %s", (queue,)
                ).fetchone()
                return int(row[0]) if row else 0

            with app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=3)
            ready.set()
            go.wait()
            if pace > 0:
                _paced(send, queued, lambda: sent < total and not stop.is_set(), pace, high)
                return
            while sent < total and not stop.is_set():
                waiting = queued()
                if waiting >= low:
                    time.sleep(0.05)
                    continue
                for _ in range(min(high - waiting, total - sent)):
                    send()
                    if stop.is_set():
                        break
    finally:
        app.close()


def _paced(
    send: Callable[[], None],
    queued: Callable[[], int],
    more: Callable[[], bool],
    pace: float,
    high: int,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Call ``send`` ``pace`` times a second while ``more()``; hold off while ``high``
    messages wait (read every :data:`_RECOUNT_SECONDS`).  A publisher that falls
    behind (held off, or slowed by the machine) catches up at most one second's
    worth: it never bursts further."""
    interval = 1.0 / pace
    due = clock()
    counted_at = -math.inf
    while more():
        now = clock()
        if now - counted_at >= _RECOUNT_SECONDS:
            counted_at = now
            if queued() >= high:
                sleep(0.05)
                due = clock()
                counted_at = -math.inf
                continue
        if now < due:
            sleep(min(due - now, 0.05))
            continue
        send()
        due = max(due + interval, now - 1.0)


# ------------------------------------------------------------------------ sampling


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="utf-8") as file:
        for line in file:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def group_pids(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (a worker and its pool children)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as file:
                raw = file.read()
            if int(raw[raw.rindex(")") + 2 :].split()[2]) == pgid:
                found.append(int(entry.name))
    return sorted(found)


def process_usage(pids: Sequence[int], port: int, pgid: int | None = None) -> dict[str, int]:
    """Resident memory (kB), open file descriptors and PostgreSQL connections of
    ``pids`` added up; connections counted for process group ``pgid`` when given."""
    rss = fds = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            rss += _status_kb(pid, "VmRSS")
            fds += len(os.listdir(f"/proc/{pid}/fd"))
    connections = sum(postgres_sockets(pgid, port).values()) if pgid is not None else 0
    return {"processes": len(pids), "rss_kb": rss, "fds": fds, "connections": connections}


TABLE_SQL = f"""
SELECT pg_relation_size(c.oid), pg_total_relation_size(c.oid), pg_indexes_size(c.oid),
       s.n_live_tup, s.n_dead_tup, s.autovacuum_count, s.autoanalyze_count,
       s.vacuum_count, s.last_autovacuum
  FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid
 WHERE c.oid = '{TABLE}'::regclass
"""
INDEX_SQL = f"""
SELECT i.indexrelid::regclass::text, pg_relation_size(i.indexrelid)
  FROM pg_index i WHERE i.indrelid = '{TABLE}'::regclass ORDER BY 1
"""


def table_sample(conn: psycopg.Connection[Any], queue: str, database: str) -> dict[str, Any]:
    """What PostgreSQL says of the message table, the queue and the broker's connections."""
    row = conn.execute(TABLE_SQL).fetchone()
    assert row is not None
    heap, total, indexes, live, dead, autovacuums, autoanalyzes, vacuums, last = row
    queued, claimed = conn.execute(
        f"SELECT count(*), count(lease) FROM {TABLE} WHERE queue = %s", (queue,)
    ).fetchone() or (0, 0)
    broker = conn.execute(
        "SELECT count(*) FILTER (WHERE application_name = %s),"
        " coalesce(max(age(backend_xmin)) FILTER (WHERE pid <> pg_backend_pid()), 0)"
        " FROM pg_stat_activity WHERE datname = %s",
        (APPLICATION_NAME, database),
    ).fetchone()
    return {
        "heap_bytes": int(heap),
        "total_bytes": int(total),
        "indexes_bytes": int(indexes),
        "index_bytes": {str(name): int(size) for name, size in conn.execute(INDEX_SQL)},
        "live_tuples": int(live),
        "dead_tuples": int(dead),
        "autovacuum_count": int(autovacuums),
        "autoanalyze_count": int(autoanalyzes),
        "vacuum_count": int(vacuums),
        "last_autovacuum": last.isoformat() if last is not None else None,
        "queued": int(queued),
        "claimed": int(claimed),
        "broker_connections": int(broker[0]) if broker else 0,
        # How far back the oldest snapshot of the database's sessions reaches, in
        # transactions: vacuum cannot remove rows deleted since.
        "oldest_xmin_age": int(broker[1]) if broker else 0,
    }


def autovacuum_settings(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """The server's autovacuum settings, and the message table's own."""
    found = {
        str(name): str(setting)
        for name, setting in conn.execute(
            "SELECT name, setting || coalesce(unit, '') FROM pg_settings"
            " WHERE name LIKE 'autovacuum%%' ORDER BY name"
        )
    }
    options = conn.execute(
        "SELECT reloptions FROM pg_class WHERE oid = %s::regclass", (TABLE,)
    ).fetchone()
    found["table"] = ", ".join(options[0] or []) if options else ""
    return found


# ------------------------------------------------------------------------ arithmetic


@dataclass(frozen=True)
class Series:
    """A sampled series: first, smallest, largest and last value, and the largest in
    the first and in the last quarter of the samples."""

    first: float
    low: float
    high: float
    last: float
    first_quarter_max: float
    last_quarter_max: float

    @property
    def growth(self) -> float:
        """The last quarter's largest sample over the first quarter's (``nan`` when 0)."""
        if not self.first_quarter_max:
            return math.nan
        return round(self.last_quarter_max / self.first_quarter_max, 3)


def series(values: Sequence[float]) -> Series:
    """:class:`Series` of ``values`` (at least one); a quarter is at least one sample."""
    if not values:
        raise ValueError("no samples")
    quarter = max(1, len(values) // 4)
    return Series(
        first=values[0],
        low=min(values),
        high=max(values),
        last=values[-1],
        first_quarter_max=max(values[:quarter]),
        last_quarter_max=max(values[-quarter:]),
    )


MB = 1024 * 1024


def measures(samples: Sequence[dict[str, Any]]) -> list[tuple[str, list[float]]]:
    """The series the summary reports, named, from the samples (sizes in MB)."""
    found: list[tuple[str, list[float]]] = [
        ("message table heap, MB", [s["heap_bytes"] / MB for s in samples]),
    ]
    for name in samples[0]["index_bytes"]:
        found.append((f"index {name}, MB", [s["index_bytes"].get(name, 0) / MB for s in samples]))
    found += [
        ("table + indexes + TOAST, MB", [s["total_bytes"] / MB for s in samples]),
        ("live rows", [s["live_tuples"] for s in samples]),
        ("dead rows", [s["dead_tuples"] for s in samples]),
        ("messages queued", [s["queued"] for s in samples]),
        ("oldest snapshot's age, transactions", [s.get("oldest_xmin_age", 0) for s in samples]),
    ]
    for n in range(len(samples[0]["workers"])):
        found += [
            (f"worker {n + 1} RSS, MB", [s["workers"][n]["rss_kb"] / 1024 for s in samples]),
            (f"worker {n + 1} open fds", [s["workers"][n]["fds"] for s in samples]),
            (
                f"worker {n + 1} connections to PostgreSQL",
                [s["workers"][n]["connections"] for s in samples],
            ),
        ]
    # The publishers' while they ran (they exit once they have sent their share).
    publishing = [s for s in samples if s["publishers"]["processes"]] or samples[:1]
    found += [
        ("publishers' RSS, MB", [s["publishers"]["rss_kb"] / 1024 for s in publishing]),
        ("transport connections (pg_stat_activity)", [s["broker_connections"] for s in samples]),
    ]
    return found


def summary_rows(samples: Sequence[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, values in measures(samples):
        found = series(values)
        rows.append(
            [
                name,
                round(found.first, 2),
                round(found.low, 2),
                round(found.high, 2),
                round(found.last, 2),
                round(found.first_quarter_max, 2),
                round(found.last_quarter_max, 2),
                found.growth,
            ]
        )
    return rows


SUMMARY_COLUMNS = [
    "measure",
    "first",
    "min",
    "max",
    "last",
    "max, first quarter",
    "max, last quarter",
    "last/first quarter",
]


def quarter_rates(samples: Sequence[dict[str, Any]]) -> list[float]:
    """Tasks done a second in each quarter of the samples (as :func:`series` cuts them:
    the first and last quarter are the ones the size verdict compares)."""
    quarter = max(1, len(samples) // 4)
    bounds = [0, quarter, len(samples) // 2, len(samples) - quarter, len(samples) - 1]
    found = []
    for start, end in itertools.pairwise(bounds):
        seconds = samples[end]["t"] - samples[start]["t"]
        done = samples[end]["done"] - samples[start]["done"]
        found.append(round(done / seconds, 1) if seconds > 0 else math.nan)
    return found


def verdict(samples: Sequence[dict[str, Any]], tasks: int, seconds: float) -> dict[str, Any]:
    """The soak's figures in one place: rate, autovacuum runs, whether the table's size
    stayed bounded, and how the workers' memory, fds and connections moved."""
    size = series([s["total_bytes"] for s in samples])
    workers = range(len(samples[0]["workers"]))
    rss = [series([s["workers"][n]["rss_kb"] / 1024 for s in samples]) for n in workers]
    fds = [series([s["workers"][n]["fds"] for s in samples]) for n in workers]
    conns = [series([s["workers"][n]["connections"] for s in samples]) for n in workers]
    broker = series([s["broker_connections"] for s in samples])
    return {
        "tasks": tasks,
        "seconds": round(seconds, 1),
        "tasks_per_second": rate(tasks, seconds),
        "quarter_rates": quarter_rates(samples),
        "autovacuum_runs": samples[-1]["autovacuum_count"] - samples[0]["autovacuum_count"],
        "size_growth": size.growth,
        "size_bounded": not math.isnan(size.growth) and size.growth <= GROWTH_LIMIT,
        "size_max_mb": round(size.high / MB, 2),
        "size_last_mb": round(size.last / MB, 2),
        # Memory after the first quarter's warm-up: the last quarter's peak over the first's.
        "rss_growth_mb": round(max(r.last_quarter_max - r.first_quarter_max for r in rss), 2),
        "rss_first_to_last_mb": [[round(r.first, 1), round(r.last, 1)] for r in rss],
        "fd_growth": max(f.last - f.first for f in fds),
        "connection_growth": max(c.last - c.first for c in conns),
        "broker_connections": [broker.first, broker.last],
    }


def verdict_row(found: dict[str, Any]) -> list[Any]:
    return [
        found["tasks"],
        found["seconds"],
        found["tasks_per_second"],
        " / ".join(f"{r:,.0f}" for r in found.get("quarter_rates") or []) or "—",
        found["autovacuum_runs"],
        found["size_max_mb"],
        found["size_growth"],
        "yes" if found["size_bounded"] else "NO",
        found["rss_growth_mb"],
        found["fd_growth"],
        found["connection_growth"],
    ]


VERDICT_COLUMNS = [
    "tasks",
    "seconds",
    "tasks/s",
    "tasks/s by quarter",
    "autovacuum runs",
    "table size max, MB",
    "size, last/first quarter",
    "size bounded",
    "worker RSS growth, MB",
    "worker fd growth",
    "worker connection growth",
]


# ------------------------------------------------------------------------ the run


def _count(size: str) -> int:
    value = os.environ.get(TASKS_ENV)
    return int(value) if value else TASKS[size]


def _pace(size: str) -> float:
    value = os.environ.get(RATE_ENV)
    return float(value) if value else RATE[size]


def _cap() -> float | None:
    value = os.environ.get(SECONDS_ENV)
    return float(value) if value else None


@contextlib.contextmanager
def _workers(ctx: BenchContext, transport: Transport, queue: str) -> Iterator[list[Worker]]:
    """:data:`WORKERS` solo workers consuming ``queue`` (the last ``-Q`` given wins).

    Not Celery's ``add_consumer``: the runner's client would keep its transport
    connection, which listens on the message channel, open and unread for the whole
    soak, and a backend that cannot deliver its notifications holds back vacuum.
    """
    started: list[Worker] = []
    conf = json.dumps({"task_ignore_result": True})
    try:
        for _ in range(WORKERS):
            started.append(
                start_worker(
                    ctx,
                    transport,
                    pool="solo",
                    concurrency=1,
                    tag="-soak",
                    environ={bench_app.CONF_ENV: conf},
                    options=["--prefetch-multiplier", "4", "-Q", queue],
                )
            )
        yield started
    finally:
        for worker in started:
            worker.stop()


@dataclass
class Publishers:
    """The publishing processes, their counters and the events that start and stop them."""

    processes: Sequence[multiprocessing.process.BaseProcess]
    counters: list[Synchronized[int]]
    ready: list[Event]
    go: Event
    stop: Event

    def published(self) -> int:
        return sum(int(c.value) for c in self.counters)

    def alive(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid and p.is_alive()]


@contextlib.contextmanager
def _publishers(
    broker_url: str, admin_dsn: str, queue: str, total: int, band: tuple[int, int], pace: float
) -> Iterator[Publishers]:
    """:data:`PUBLISHERS` processes, started and ready, sharing ``total`` between them;
    stopped and reaped when the block ends."""
    spawn = multiprocessing.get_context("spawn")
    counters: list[Synchronized[int]] = [spawn.Value("q", 0) for _ in range(PUBLISHERS)]
    ready = [spawn.Event() for _ in range(PUBLISHERS)]
    go, stop = spawn.Event(), spawn.Event()
    shares = [total // PUBLISHERS + (n < total % PUBLISHERS) for n in range(PUBLISHERS)]
    processes = [
        spawn.Process(
            target=publish_loop,
            args=(
                broker_url,
                admin_dsn,
                queue,
                share,
                band,
                pace / PUBLISHERS,
                counter,
                up,
                go,
                stop,
            ),
            name=f"soak-publisher-{n}",
            daemon=True,
        )
        for n, (share, counter, up) in enumerate(zip(shares, counters, ready, strict=True))
    ]
    found = Publishers(processes, counters, ready, go, stop)
    try:
        for process in processes:
            process.start()
        for up in ready:  # imported and connected: the clock starts with publishing
            if not up.wait(60):
                raise BenchError("soak: a publisher was not ready in 60 s")
        yield found
    finally:
        stop.set()
        go.set()
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join(5)


@dataclass
class Drained:
    samples: list[dict[str, Any]]
    tasks: int
    seconds: float
    capped: bool


def _drive(
    ctx: BenchContext,
    conn: psycopg.Connection[Any],
    workers: Sequence[Worker],
    publishers: Publishers,
    queue: str,
    every: float,
    cap: float | None,
) -> Drained:
    """Start the publishers, sample every ``every`` seconds until every published task
    is done (publishing stops after ``cap`` seconds)."""
    port = ctx.admin_url.port or 5432
    database = str(ctx.admin_url.database)
    samples: list[dict[str, Any]] = []
    start = time.time()

    def sample() -> dict[str, Any]:
        sent = publishers.published()  # before the count: done is not overstated
        found = table_sample(conn, queue, database)
        found.update(
            t=round(time.time() - start, 2),
            published=sent,
            done=sent - found["queued"],
            workers=[
                process_usage(group_pids(w.process.pid), port, w.process.pid) for w in workers
            ],
            publishers=process_usage(publishers.alive(), port),
            load_average=(_machine.load_average() or [math.nan])[0],
        )
        return found

    publishers.go.set()
    capped = False
    next_sample = last_say = start
    while True:
        now = time.time()
        if now >= next_sample:
            samples.append(sample())
            next_sample += every
            if now - last_say >= 60 or ctx.size == "smoke":
                last_say = now
                last = samples[-1]
                ctx.say(
                    f"soak {last['t']:.0f} s: {last['done']:,} done, {last['queued']} queued, "
                    f"table {last['total_bytes'] / MB:.1f} MB, dead {last['dead_tuples']:,}, "
                    f"autovacuums {last['autovacuum_count']}"
                )
        for worker in workers:
            if worker.process.poll() is not None:
                raise BenchError(f"soak: worker exited\n{worker.log_tail()}")
        if cap is not None and not capped and now - start > cap:
            capped = True
            publishers.stop.set()
            ctx.say(f"soak: {cap:g} s of publishing reached; draining what was sent")
        if not publishers.alive():
            codes = [p.exitcode for p in publishers.processes]
            if any(code != 0 for code in codes):
                raise BenchError(f"soak: a publisher failed, exit codes {codes}")
            row = conn.execute(
                f"SELECT count(*) FROM {TABLE} WHERE queue = %s", (queue,)
            ).fetchone()
            if row is not None and int(row[0]) == 0:
                break
        time.sleep(0.2)
    seconds = time.time() - start
    samples.append(sample())
    return Drained(samples, publishers.published(), seconds, capped)


def run(ctx: BenchContext) -> Section:
    """Run the soak; return the section."""
    total = _count(ctx.size)
    cap = _cap()
    every = SAMPLE_SECONDS[ctx.size]
    band = BACKLOG[ctx.size]
    pace = _pace(ctx.size)
    libpq = ctx.app_url.set(drivername="postgresql").render_as_string(hide_password=False)
    admin_dsn = ctx.admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    transport = Transport("tcpg", f"{TCPG_PREFIX}{libpq}", "")
    queue = f"tcbench.{ctx.run_id}.soak"
    load_start = _machine.load_average()
    with connect(ctx.admin_url) as conn:
        settings = autovacuum_settings(conn)
    ctx.say(
        f"soak: {total:,} tasks, load average at start {load_start}; autovacuum "
        f"{settings.get('autovacuum')}, naptime {settings.get('autovacuum_naptime')}"
    )
    if settings.get("autovacuum") != "on":
        ctx.say("soak: autovacuum is off on this server: the message table will only grow")
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with (
        _workers(ctx, transport, queue) as workers,
        connect(ctx.admin_url) as conn,
        _publishers(transport.broker_url, admin_dsn, queue, total, band, pace) as publishers,
    ):
        drained = _drive(ctx, conn, workers, publishers, queue, every, cap)
    samples, tasks, seconds = drained.samples, drained.tasks, drained.seconds
    found = verdict(samples, tasks, seconds)
    found["capped_at_seconds"] = cap if drained.capped else None
    load_end = _machine.load_average()
    ctx.say(f"soak: load average at end {load_end}")
    av = "on" if settings.get("autovacuum") == "on" else "OFF"
    notes = [
        f"{tasks:,} no-op tenant tasks ({TENANTS} tenants in turn) in {seconds:,.0f} s, "
        f"published by {PUBLISHERS} processes through apply_async while {WORKERS} solo "
        "workers (prefetch 4) drained them; results disabled, so PostgreSQL carried the "
        "broker alone",
        (
            f"published at a constant {pace:g} tasks a second, {pace / PUBLISHERS:g} per "
            f"publisher, each holding off while {band[1]:,} messages wait; the tasks done "
            "a second in each quarter show whether the workers kept up"
            if pace > 0
            else f"each publisher tops the queue's backlog up to {band[1]:,} messages when "
            f"it falls under {band[0]:,}: the workers never wait for work unless the "
            "publishers fall behind, and the backlog never grows"
        ),
        f"sampled every {every:g} s ({len(samples)} samples); quarters of the samples; "
        f"size bounded: the last quarter's largest total size at most {GROWTH_LIMIT} times "
        "the first quarter's",
        f"the server's autovacuum: {av} (naptime {settings.get('autovacuum_naptime')}); "
        f"the message table's own settings: {settings.get('table') or 'none'}",
        "worker RSS growth: the last quarter's largest RSS less the first quarter's (the "
        "larger of the workers); fd and connection growth: last sample less first",
    ]
    if drained.capped:
        notes.append(f"publishing stopped at the {cap:g} s cap, before the {total:,} asked for")
    verdict_table = ctx.report("Soak: the verdict", VERDICT_COLUMNS, [verdict_row(found)], notes)
    summary = ctx.report(
        "Soak: the message table, the workers and their connections over time",
        SUMMARY_COLUMNS,
        summary_rows(samples),
        notes,
    )
    return Section(
        key="soak",
        title="Soak: tasks through the transport at a sustained rate",
        tables=[verdict_table, summary],
        data={
            "tasks_asked": total,
            "workers": WORKERS,
            "publishers": PUBLISHERS,
            "tenants": TENANTS,
            "band": list(band),
            "rate": pace,
            "sample_seconds": every,
            "cpu_count": os.cpu_count(),
            "autovacuum": settings,
            "load_average_start": load_start,
            "load_average_end": load_end,
            "started": started,
            "verdict": found,
            "samples": samples,
        },
    )
