"""Isolation under load: many tenants' tasks through real workers, every run checked.

Nine workers run at once, each on a queue of its own: Redis, the package's
own PostgreSQL transport (:mod:`tenant_celery.transport`) and kombu's
SQLAlchemy transport, both PostgreSQL ones on the bundled migration's tables,
connected as the app role, which has no ``CREATE``; each broker with the
prefork pool (concurrency 2), the threads pool (4) and the solo pool.  The runner
publishes a shuffled mix of jobs for :data:`TENANTS` tenants, interleaved in
publish order and spread over the workers:

========  =============================================================  =====
job       what runs                                                      runs
========  =============================================================  =====
read      one task reads what its tenant can see                         1
write     one task reads, then adds a row                                1
spawn     a task publishes two child tasks (one writes) from its body    3
chain     a chain of three links, the middle one writes                  3
retry     a task calls ``self.retry(countdown=1)``, then writes          2
========  =============================================================  =====

Each run records, in a row-level-security table written as the app role
through a thread-local ``scoped_session`` over an engine bound with
:func:`~tenant_celery.bind_tenant_guc` (see :mod:`reliability.load_app`), the
tenant it ran as, the tenant setting its transaction had, and which tenants
own the newest rows it could see.  One read job in :data:`LEAVE_OPEN_EVERY`
of each worker (its first included, chosen from the plan) is *careless*: it
leaves its session's transaction open when it returns, as a read-only task
that never commits, closes or removes its session does.  The runner then
reads everything as the superuser and counts:

* **cross-tenant observations**: runs whose tenant context, setting, row or
  any row seen belongs to a tenant other than the one the job was published
  for, and written rows found under another tenant;
* **lost writes**: rows a writing run committed that are not there under
  its tenant;
* **tasks unaccounted for**: runs expected (published by the runner, or by
  tasks: children, chain links, retries) that never recorded.

All three must be 0, and the proof must not be vacuous: every tenant owns
rows the others could have seen, and every run must have seen rows of its
own tenant.  Every transaction a careless task left open must have been
rolled back at the end of that task, and none other: the workers' logs must
hold the package's warning (:data:`~reliability.load_app.LEFT_OPEN_WARNING`)
once for each careless task, naming it, and for no other task.  The workers
are left running for :mod:`reliability.leaks`.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from benchmarks._workers import Transport, Worker, start_worker
from celery import chain

from tenant_celery import DEFAULT_GUC, tenant_context
from tenant_celery.rls import enable_tenant_rls, grant_tenant_tables
from tenant_celery.transport import SCHEME as TCPG_SCHEME

from . import load_app
from ._common import ReliabilityContext, Section, Tally, broker_name, pool_name

TENANTS = {"smoke": 20, "default": 24, "full": 40}
SEED_ROWS = 10
"""Rows each tenant owns in :data:`~reliability.load_app.ITEMS` before the load."""

REDIS_DB = 10
STALL_S = 90.0
"""Give up waiting when no run has been recorded for this long."""


@dataclass(frozen=True)
class WorkerSpec:
    broker: str
    """``redis`` or ``postgres``."""
    pool: str
    concurrency: int
    share: float
    """Fraction of the runs this worker is given."""

    @property
    def label(self) -> str:
        return f"{self.broker} {self.pool_label}"

    @property
    def pool_label(self) -> str:
        return pool_name(self.pool, self.concurrency)


WORKERS = (
    WorkerSpec("redis", "prefork", 2, 0.16),
    WorkerSpec("redis", "threads", 4, 0.15),
    WorkerSpec("redis", "solo", 1, 0.12),
    WorkerSpec("tcpg", "prefork", 2, 0.12),
    WorkerSpec("tcpg", "threads", 4, 0.11),
    WorkerSpec("tcpg", "solo", 1, 0.10),
    WorkerSpec("postgres", "prefork", 2, 0.08),
    WorkerSpec("postgres", "threads", 4, 0.08),
    WorkerSpec("postgres", "solo", 1, 0.08),
)
BROKER_NAMES = {key: broker_name(key) for key in ("redis", "tcpg", "postgres")}

LEAVE_OPEN_EVERY = 10
"""One read job in this many (each worker's first included) leaves its transaction open."""
LEAVE_OPEN_ID = "leave-open-"
"""Task id prefix of the careless read jobs (then the job's token): the warnings name them."""
ROLLBACK_WAIT_S = 15.0
"""Longest wait, after the last run was recorded, for the last rollback's warning."""

KINDS = {"read": 30, "write": 30, "spawn": 12, "chain": 12, "retry": 16}
"""Job kinds and their weights in the mix."""
RUNS_PER_JOB = {"read": 1, "write": 1, "spawn": 3, "chain": 3, "retry": 2}


# ---------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Expected:
    """One run of a task body the load expects to be recorded."""

    tenant: str
    label: str
    kind: str
    """``read``, ``write``, ``spawn``, ``child``, ``link`` or ``retry``."""
    write: bool = False
    previous: str | None = None
    """For a chain link: the token the link before it returned."""
    leaves_open: bool = False
    """A careless read: its session's transaction is still open when it returns."""


@dataclass(frozen=True)
class Job:
    """One publish by the runner, and the runs it leads to."""

    token: str
    worker: int
    tenant: str
    kind: str
    leave_open: bool = False
    """A careless read (kind ``read`` only): see :data:`LEAVE_OPEN_EVERY`."""

    def runs(self, label: str) -> dict[str, Expected]:
        t, tenant = self.token, self.tenant
        if self.kind in ("read", "write"):
            return {
                t: Expected(
                    tenant,
                    label,
                    self.kind,
                    write=self.kind == "write",
                    leaves_open=self.leave_open,
                )
            }
        if self.kind == "spawn":
            return {
                t: Expected(tenant, label, "spawn"),
                f"{t}.c0": Expected(tenant, label, "child"),
                f"{t}.c1": Expected(tenant, label, "child", write=True),
            }
        if self.kind == "chain":
            links = [f"{t}.s{n}" for n in range(3)]
            return {
                token: Expected(
                    tenant, label, "link", write=n == 1, previous=links[n - 1] if n else None
                )
                for n, token in enumerate(links)
            }
        return {
            f"{t}#0": Expected(tenant, label, "retry"),
            f"{t}#1": Expected(tenant, label, "retry", write=True),
        }


def tenants_for(count: int) -> list[str]:
    """The tenants of a load run (fixed, so runs are comparable)."""
    return [
        str(uuid.uuid5(uuid.NAMESPACE_URL, f"tenant-celery-reliability-{n}")) for n in range(count)
    ]


def plan(
    tenants: Sequence[str], workers: Sequence[WorkerSpec], runs: int, *, seed: int = 8
) -> list[Job]:
    """Jobs adding up to at least ``runs`` runs, shared out by ``share``, in a shuffled order.

    Every worker gets at least one job of each kind, then kinds drawn by their
    weights.  Tenants are drawn at random for each job, so consecutive
    publishes (and each worker's queue) interleave them.  Each worker's first
    read job, and every :data:`LEAVE_OPEN_EVERY`-th after it, leaves its
    transaction open.
    """
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    jobs: list[Job] = []
    for index, spec in enumerate(workers):
        target, planned, first, reads = max(1, round(runs * spec.share)), 0, list(kinds), 0
        while planned < target:
            kind = first.pop(0) if first else rng.choices(kinds, weights)[0]
            careless = kind == "read" and reads % LEAVE_OPEN_EVERY == 0
            reads += kind == "read"
            jobs.append(Job(f"j{len(jobs)}", index, rng.choice(tenants), kind, careless))
            planned += RUNS_PER_JOB[kind]
    rng.shuffle(jobs)
    return jobs


# ------------------------------------------------------------------- the analysis


@dataclass(frozen=True)
class Run:
    """One row of :data:`~reliability.load_app.RUNS`, as the superuser reads it."""

    token: str
    tenant: str | None
    """The row's ``tenant_id``: the tenant setting when it was written."""
    ran_as: str | None
    setting: str | None
    seen: tuple[str, ...]
    previous: str | None
    label: str
    pid: int
    backend_pid: int
    recorded_at: float
    thread: int = 0
    """The thread it ran on (its ident modulo 2**31): its session is that thread's."""


@dataclass
class Findings:
    """What the records show, overall and per worker label."""

    runs: int = 0
    cross_tenant: int = 0
    """Runs that observed another tenant, plus written rows found under another tenant."""
    foreign_ids_seen: int = 0
    """Tenant ids other than its own seen by runs, counted once per run and id."""
    lost_writes: int = 0
    unaccounted: int = 0
    blind: int = 0
    """Runs that saw none of their own tenant's rows: their check proved nothing."""
    unexpected: int = 0
    """Runs, or written rows, whose token was never planned."""
    duplicates: int = 0
    """Runs recorded more than once (a redelivered message)."""
    broken_links: int = 0
    """Chain links whose previous link's result was not the one expected."""
    left_open: int = 0
    """Careless runs recorded: each left a transaction open when it returned."""
    rolled_back: int = 0
    """Of those, the ones the package's warning says it rolled back at the end of the task."""
    not_rolled_back: int = 0
    """Careless runs no warning names: a transaction left open that nothing rolled back."""
    unexpected_rollbacks: int = 0
    """Warnings naming a task that was not careless (or naming one twice)."""
    reused_after_left_open: int = 0
    """Careless runs after which another run was recorded on the same thread of the same
    process: a task that got the session a transaction was left open in."""
    examples: list[str] = field(default_factory=list)
    """The first few problems, described."""
    per_label: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def note(self, problem: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(problem)


def analyse(
    expected: dict[str, Expected],
    runs: Iterable[Run],
    items: Iterable[tuple[str, str]],
) -> Findings:
    """Check every recorded run and written row against what was published.

    ``items`` are ``(token, tenant_id)`` of the rows the tasks wrote.
    """
    found = Findings()
    recorded: Counter[str] = Counter()
    for run in runs:
        found.runs += 1
        recorded[run.token] += 1
        want = expected.get(run.token)
        if want is None:
            found.unexpected += 1
            found.note(f"run {run.token!r} was never published")
            continue
        counts = found.per_label[want.label]
        counts["runs"] += 1
        counts[want.kind] += 1
        if want.write:
            counts["writes"] += 1
        if recorded[run.token] > 1:
            found.duplicates += 1
        foreign = {s for s in run.seen if s != want.tenant}
        wrong = [
            name
            for name, value in (
                ("row", run.tenant),
                ("tenant context", run.ran_as),
                ("setting", run.setting),
            )
            if value != want.tenant
        ]
        if foreign or wrong:
            found.cross_tenant += 1
            found.foreign_ids_seen += len(foreign)
            counts["cross_tenant"] += 1
            found.note(
                f"run {run.token} for tenant {want.tenant} on {run.label} (pid {run.pid}): "
                + "; ".join(
                    [
                        f"{name} was {getattr(run, attr)!r}"
                        for name, attr in _FIELDS
                        if name in wrong
                    ]
                    + ([f"saw rows of {sorted(foreign)}"] if foreign else [])
                )
            )
        if want.tenant not in run.seen:
            found.blind += 1
            found.note(f"run {run.token} saw none of its tenant's rows")
        if run.previous != want.previous:
            found.broken_links += 1
            found.note(f"link {run.token} followed {run.previous!r}, not {want.previous!r}")
    for token, want in expected.items():
        if not recorded[token]:
            found.unaccounted += 1
            found.per_label[want.label]["unaccounted"] += 1
            found.note(f"{want.kind} run {token} for tenant {want.tenant} never recorded")
    written: dict[str, set[str]] = defaultdict(set)
    for token, tenant in items:
        want = expected.get(token)
        if want is None or not want.write:
            found.unexpected += 1
            found.note(f"a row was written for {token!r}, which writes nothing")
            continue
        written[token].add(tenant)
        if tenant != want.tenant:
            found.cross_tenant += 1
            found.per_label[want.label]["cross_tenant"] += 1
            found.note(f"the row of {token} is under tenant {tenant}, not {want.tenant}")
    for token, want in expected.items():
        if want.write and want.tenant not in written[token]:
            found.lost_writes += 1
            found.per_label[want.label]["lost_writes"] += 1
            found.note(f"the row {token} wrote for tenant {want.tenant} is not there")
    return found


_FIELDS = (("row", "tenant"), ("tenant context", "ran_as"), ("setting", "setting"))

_ROLLED_BACK = re.compile(rf"task (\S+)\[([^\]\s]+)\] {re.escape(load_app.LEFT_OPEN_WARNING)}")


def rolled_back_tasks(log: str) -> list[str]:
    """Ids of the tasks a worker's log says the package rolled back a transaction of."""
    return [task_id for _, task_id in _ROLLED_BACK.findall(log)]


def careless_tokens(log: str) -> list[str]:
    """The tokens of the careless reads among :func:`rolled_back_tasks` (other ids as they are)."""
    return [
        task_id.removeprefix(LEAVE_OPEN_ID) if task_id.startswith(LEAVE_OPEN_ID) else task_id
        for task_id in rolled_back_tasks(log)
    ]


def account_rollbacks(
    found: Findings, expected: dict[str, Expected], runs: Iterable[Run], logs: dict[str, str]
) -> None:
    """Match the rollback warnings of each worker's log (``logs``, by label) to its careless runs.

    Every careless run recorded must be named once, in its own worker's log,
    and no other task.  (A careless run never recorded is counted as
    unaccounted for by :func:`analyse`.)
    """
    by_token = {run.token: run for run in runs}
    last_on_thread: dict[tuple[str, int, int], float] = {}
    for run in by_token.values():
        thread = (run.label, run.pid, run.thread)
        last_on_thread[thread] = max(last_on_thread.get(thread, run.recorded_at), run.recorded_at)
    recorded = set(by_token)
    for token, want in expected.items():
        if want.leaves_open and token in recorded:
            found.left_open += 1
            found.per_label[want.label]["left_open"] += 1
            run = by_token[token]
            if last_on_thread[(run.label, run.pid, run.thread)] > run.recorded_at:
                found.reused_after_left_open += 1
    named: Counter[str] = Counter()
    for label, log in logs.items():
        for token in careless_tokens(log):
            want = expected.get(token)
            mine = want is not None and want.leaves_open and want.label == label
            named[token] += mine
            if not mine or named[token] > 1:
                found.unexpected_rollbacks += 1
                found.note(f"{label}: a transaction of task {token!r} was rolled back at its end")
                continue
            found.rolled_back += 1
            found.per_label[label]["rolled_back"] += 1
    for token, want in expected.items():
        if want.leaves_open and token in recorded and not named[token]:
            found.not_rolled_back += 1
            found.per_label[want.label]["not_rolled_back"] += 1
            found.note(f"the transaction careless run {token} left open was not rolled back")


def read_logs(fleet: Fleet) -> dict[str, str]:
    """Each worker's log so far, by label."""
    return {
        spec.label: worker.log_path.read_text(errors="replace")
        for spec, worker in zip(fleet.specs, fleet.workers, strict=True)
    }


def wait_for_rollbacks(fleet: Fleet, expected: dict[str, Expected]) -> dict[str, str]:
    """The workers' logs, once each careless run's warning is in them (or after
    :data:`ROLLBACK_WAIT_S`): it is logged just after the run is recorded."""
    careless = {token for token, want in expected.items() if want.leaves_open}
    deadline = time.monotonic() + ROLLBACK_WAIT_S
    while True:
        logs = read_logs(fleet)
        if careless <= {t for log in logs.values() for t in careless_tokens(log)}:
            return logs
        if time.monotonic() > deadline:
            return logs
        time.sleep(0.5)


# ------------------------------------------------------------------ the database


def _create_tables(ctx: ReliabilityContext, tenants: Sequence[str]) -> None:
    items, runs, probes = load_app.ITEMS, load_app.RUNS, load_app.PROBES
    engine = ctx.admin_engine(poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {items} (tenant_id uuid NOT NULL, "
            "id bigint GENERATED ALWAYS AS IDENTITY, token text, PRIMARY KEY (tenant_id, id))"
        )
        conn.exec_driver_sql(
            f"CREATE TABLE {runs} ("
            "tenant_id uuid NOT NULL DEFAULT "
            f"NULLIF(current_setting('{DEFAULT_GUC}', true), '')::uuid, "
            "id bigint GENERATED ALWAYS AS IDENTITY, token text NOT NULL, ran_as text, "
            "setting text, seen uuid[] NOT NULL, previous text, label text NOT NULL, "
            "pid integer NOT NULL, thread bigint NOT NULL, backend_pid integer NOT NULL, "
            "recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
            "PRIMARY KEY (tenant_id, id))"
        )
        conn.exec_driver_sql(
            f"CREATE TABLE {probes} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "label text NOT NULL, pid integer NOT NULL, round integer NOT NULL, "
            "pool_size integer NOT NULL, backend_pid integer NOT NULL, setting text, "
            "probed_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        for table in (items, runs):
            enable_tenant_rls(conn, table)
        grant_tenant_tables(conn, ctx.app_role, [items, runs])
        conn.exec_driver_sql(f'GRANT SELECT, INSERT ON {probes} TO "{ctx.app_role}"')
        # Interleaved, as many tenants appending to one table leave their rows:
        # without the policy, the newest rows a task reads belong to many tenants.
        conn.execute(
            sa.text(
                f"INSERT INTO {items} (tenant_id) SELECT CAST(t AS uuid) "
                "FROM generate_series(1, :rows) AS n, unnest(CAST(:tenants AS text[])) AS t "
                "ORDER BY n, t"
            ),
            {"tenants": list(tenants), "rows": SEED_ROWS},
        )
        conn.exec_driver_sql(f"ANALYZE {items}")


def _count_runs(conn: sa.Connection) -> int:
    count = conn.execute(sa.text(f"SELECT count(*) FROM {load_app.RUNS}")).scalar_one()
    conn.rollback()
    return int(count)


def read_runs(conn: sa.Connection) -> list[Run]:
    """Every recorded run (the superuser bypasses row-level security)."""
    rows = conn.execute(
        sa.text(
            "SELECT token, tenant_id::text, ran_as, setting, seen::text[], previous, label, "
            f"pid, backend_pid, extract(epoch FROM recorded_at), thread FROM {load_app.RUNS}"
        )
    )
    return [
        Run(t, tenant, ran_as, setting, tuple(seen), previous, label, pid, b, float(at), thread)
        for t, tenant, ran_as, setting, seen, previous, label, pid, b, at, thread in rows
    ]


# -------------------------------------------------------------------- the fleet


@dataclass
class Fleet:
    """The load's running workers, left for the leak proof."""

    specs: list[WorkerSpec]
    workers: list[Worker]
    stopped: bool = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.stop()


def broker_url(ctx: ReliabilityContext, broker: str) -> str:
    """The URL of ``broker`` (a :class:`WorkerSpec`'s) for this run; PostgreSQL as the app role."""
    if broker == "redis":
        return ctx.redis_db(REDIS_DB)
    if broker == "tcpg":  # the package's transport, on the bundled migration's tables
        libpq = ctx.app_url.set(drivername="postgresql")
        return f"{TCPG_SCHEME}+{libpq.render_as_string(hide_password=False)}"
    return f"sqla+{ctx.app_url.render_as_string(hide_password=False)}"


def start_fleet(ctx: ReliabilityContext, specs: Sequence[WorkerSpec] = WORKERS) -> Fleet:
    """Start one worker per spec (stopped at the end of the run at the latest)."""
    fleet = Fleet(list(specs), [])
    ctx.on_close(fleet.stop)
    for spec in specs:
        broker = broker_url(ctx, spec.broker)
        fleet.workers.append(
            start_worker(
                ctx,
                Transport(spec.broker, broker, ""),
                pool=spec.pool,
                concurrency=spec.concurrency,
                tag="-load",
                app_module="reliability.load_app",
                client=load_app.make_app,
                environ={load_app.LABEL_ENV: spec.label},
            )
        )
        ctx.say(f"load: worker {spec.label} ready")
    return fleet


def publish(worker: Worker, job: Job) -> None:
    """Publish ``job`` to ``worker``'s queue inside its tenant."""
    tasks, t = worker.app.tasks, job.token
    with tenant_context(job.tenant):
        if job.leave_open:
            tasks[load_app.OBSERVE].apply_async((t, False, True), task_id=LEAVE_OPEN_ID + t)
        elif job.kind in ("read", "write"):
            tasks[load_app.OBSERVE].apply_async((t, job.kind == "write"))
        elif job.kind == "spawn":
            tasks[load_app.SPAWN].apply_async((t, [[f"{t}.c0", False], [f"{t}.c1", True]]))
        elif job.kind == "chain":
            step = tasks[load_app.STEP]
            chain(step.s(None, f"{t}.s0"), step.s(f"{t}.s1", True), step.s(f"{t}.s2")).apply_async()
        else:
            tasks[load_app.FLAKY].apply_async((t, True))


def wait_for(
    ctx: ReliabilityContext,
    conn: sa.Connection,
    table_count: Callable[[sa.Connection], int],
    total: int,
) -> int:
    """Poll ``table_count(conn)`` until it reaches ``total``, or stops growing for
    :data:`STALL_S` seconds; return the last count."""
    last, last_change, last_said = -1, time.monotonic(), 0.0
    while True:
        count = table_count(conn)
        now = time.monotonic()
        if count != last:
            last, last_change = count, now
        if count >= total:
            return count
        if now - last_change > STALL_S:
            ctx.say(f"no progress for {STALL_S:.0f} s at {count:,} of {total:,}: giving up")
            return count
        if now - last_said >= 10:
            ctx.say(f"  {count:,} of {total:,} recorded")
            last_said = now
        time.sleep(0.5)


# ------------------------------------------------------------------------- run


def run(ctx: ReliabilityContext, runs_wanted: int | None = None) -> Section:
    """Run the load, check every record, and leave the workers for the leak proof.

    ``runs_wanted`` overrides the size's count of task runs.
    """
    tenants = tenants_for(TENANTS[ctx.size])
    if runs_wanted is None:
        runs_wanted = ctx.pick(smoke=300, default=20_000, full=100_000)
    jobs = plan(tenants, WORKERS, runs_wanted)
    expected: dict[str, Expected] = {}
    for job in jobs:
        expected.update(job.runs(WORKERS[job.worker].label))

    _create_tables(ctx, tenants)
    fleet = start_fleet(ctx)
    ctx.shared["load.fleet"] = fleet
    admin = ctx.admin_engine(pool_size=1)
    ctx.say(
        f"load: publishing {len(jobs):,} jobs for {len(expected):,} runs, {len(tenants)} tenants"
    )
    started = time.monotonic()
    for n, job in enumerate(jobs, 1):
        publish(fleet.workers[job.worker], job)
        if n % 5000 == 0:
            ctx.say(f"  {n:,} of {len(jobs):,} jobs published")
    published_s = time.monotonic() - started
    ctx.say(f"load: published in {published_s:.1f} s; waiting")
    with admin.connect() as conn:
        wait_for(ctx, conn, _count_runs, len(expected))
        time.sleep(1.0)  # a redelivered duplicate would land now
        runs = read_runs(conn)
        items = [
            (str(t), str(tenant))
            for t, tenant in conn.execute(
                sa.text(
                    f"SELECT token, tenant_id::text FROM {load_app.ITEMS} WHERE token IS NOT NULL"
                )
            )
        ]
        owners = conn.execute(
            sa.text(
                f"SELECT (SELECT count(DISTINCT tenant_id) FROM {load_app.ITEMS}), "
                f"(SELECT count(DISTINCT tenant_id) FROM {load_app.RUNS})"
            )
        ).one()
        conn.rollback()
    elapsed = time.monotonic() - started
    logs = wait_for_rollbacks(fleet, expected)
    if "leaks" not in ctx.parts:
        fleet.stop()
    found = analyse(expected, runs, items)
    account_rollbacks(found, expected, runs, logs)
    ctx.shared["load.runs"] = runs
    return _section(ctx, tenants, jobs, expected, runs, found, owners, elapsed, published_s)


def _section(
    ctx: ReliabilityContext,
    tenants: Sequence[str],
    jobs: Sequence[Job],
    expected: dict[str, Expected],
    runs: Sequence[Run],
    found: Findings,
    owners: Sequence[int],
    elapsed: float,
    published_s: float,
) -> Section:
    by_label: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_label[r.label].append(r)
    expected_by_label = Counter(e.label for e in expected.values())
    rows = []
    for spec in WORKERS:
        counts, mine = found.per_label[spec.label], by_label[spec.label]
        span = max(r.recorded_at for r in mine) - min(r.recorded_at for r in mine) if mine else 0
        rows.append(
            [
                BROKER_NAMES[spec.broker],
                spec.pool_label,
                expected_by_label[spec.label],
                counts["runs"],
                counts["read"] + counts["write"],
                counts["child"],
                counts["link"],
                counts["retry"],
                counts["writes"],
                len({r.pid for r in mine}),
                len({(r.pid, r.backend_pid) for r in mine}),
                counts["left_open"],
                counts["rolled_back"],
                counts["cross_tenant"],
                counts["lost_writes"],
                counts["unaccounted"],
                round(len(mine) / span, 1) if span > 0 else None,
            ]
        )
    kinds = Counter(job.kind for job in jobs)
    table = ctx.report(
        "Isolation under load, per worker",
        [
            "broker", "pool", "runs expected", "recorded", "reads/writes", "child tasks",
            "chain links", "retry runs", "rows written", "processes", "connections",
            "left open", "rolled back", "cross-tenant", "lost writes", "unaccounted", "runs/s",
        ],
        rows,
        [
            f"{len(tenants)} tenants; {len(jobs):,} jobs published by the runner "
            f"({', '.join(f'{kinds[k]:,} {k}' for k in KINDS)}), "
            f"{len(expected) - len(jobs):,} more runs published by the tasks themselves "
            "(child tasks, chain links, retries)",
            f"all {len(WORKERS)} workers ran at once, each on its own queue; each process's engine "
            f"pool holds {load_app.POOL_SIZE} connections (no overflow), shared across tenants; "
            "every task reaches it through its thread's scoped_session, kept from task to task",
            f"left open: careless reads (one read job in {LEAVE_OPEN_EVERY} of each worker) "
            "that returned with their session's transaction open; rolled back: the ones the "
            "package rolled back at the end of the task, as the workers' logs say",
            f"published in {published_s:.1f} s; everything recorded {elapsed:.1f} s after "
            "the first publish",
            "runs/s: runs recorded over the time from a worker's first to its last; the "
            "workers kept pace with one publishing process, so this is not their capacity",
        ],
    )  # fmt: skip
    checks = ctx.report(
        "Isolation under load, checks",
        ["check", "found", "must be"],
        [
            ["runs recorded", found.runs, f"{len(expected):,}"],
            ["cross-tenant observations", found.cross_tenant, "0"],
            ["foreign tenant ids seen", found.foreign_ids_seen, "0"],
            ["lost writes", found.lost_writes, "0"],
            ["tasks unaccounted for", found.unaccounted, "0"],
            ["runs that saw none of their own rows", found.blind, "0"],
            ["runs or rows never published", found.unexpected, "0"],
            ["chain links out of order", found.broken_links, "0"],
            ["runs recorded twice", found.duplicates, "0"],
            ["transactions left open by careless reads", found.left_open, ""],
            [
                "of those, rolled back at the end of their task",
                found.rolled_back,
                f"{found.left_open:,}",
            ],
            [
                "of those, followed by another task on the same thread",
                found.reused_after_left_open,
                "",
            ],
            ["rollbacks of other tasks' transactions", found.unexpected_rollbacks, "0"],
            ["tenants owning rows (items / runs)", f"{owners[0]} / {owners[1]}", f"{len(tenants)}"],
        ],
        found.examples,
    )
    section = Section(
        key="load",
        title="Isolation under load",
        tables=[table, checks],
        data={
            "tenants": len(tenants),
            "jobs": len(jobs),
            "jobs_by_kind": {k: kinds[k] for k in KINDS},
            "runs_expected": len(expected),
            "runs_recorded": found.runs,
            "cross_tenant_observations": found.cross_tenant,
            "foreign_ids_seen": found.foreign_ids_seen,
            "lost_writes": found.lost_writes,
            "tasks_unaccounted": found.unaccounted,
            "blind_runs": found.blind,
            "unexpected": found.unexpected,
            "broken_links": found.broken_links,
            "duplicates": found.duplicates,
            "transactions_left_open": found.left_open,
            "rolled_back_at_task_end": found.rolled_back,
            "not_rolled_back": found.not_rolled_back,
            "unexpected_rollbacks": found.unexpected_rollbacks,
            "reused_after_left_open": found.reused_after_left_open,
            "publish_s": round(published_s, 1),
            "elapsed_s": round(elapsed, 1),
            "per_worker": {label: dict(c) for label, c in found.per_label.items()},
            "examples": found.examples,
        },
        tally=Tally(
            tasks_run=found.runs,
            tenants=len(tenants),
            pools=list(dict.fromkeys(s.pool_label for s in WORKERS)),
            brokers=list(dict.fromkeys(BROKER_NAMES[s.broker] for s in WORKERS)),
            cross_tenant_observations=found.cross_tenant,
            lost_writes=found.lost_writes,
            tasks_unaccounted=found.unaccounted,
        ),
    )
    section.require(found.runs > 0, "no run was recorded: the load proved nothing")
    section.require(found.blind == 0, f"{found.blind:,} runs saw none of their own tenant's rows")
    section.require(
        owners[0] >= len(tenants),
        f"only {owners[0]} tenants own rows: the others had nothing to leak",
    )
    section.require(found.unexpected == 0, f"{found.unexpected:,} runs or rows never published")
    section.require(found.broken_links == 0, f"{found.broken_links:,} chain links out of order")
    section.require(found.duplicates == 0, f"{found.duplicates:,} runs recorded twice")
    section.require(found.left_open > 0, "no careless read left a transaction open")
    section.require(
        found.not_rolled_back == 0,
        f"{found.not_rolled_back:,} transactions left open at the end of a task were not "
        "rolled back",
    )
    section.require(
        found.unexpected_rollbacks == 0,
        f"{found.unexpected_rollbacks:,} rollbacks at the end of a task that left none open",
    )
    return section
