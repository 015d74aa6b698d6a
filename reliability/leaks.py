"""Leak proof at scale: after the load, no pooled connection of any worker keeps a tenant.

The tenant setting is transaction-local, so between transactions every
connection must read it as empty.  :data:`pg_stat_activity` does not show
custom settings, so each connection is asked itself: the load's workers, still
running, are sent plain (no tenant) probe tasks
(:func:`reliability.load_app.probe_pool`).  A probe checks out every
connection of its process's engine pool at once, reads
``current_setting('app.current_tenant_id', true)`` on each through the
driver's connection beneath the engine, and records the readings with the
backend pid.  Not through the engine itself: bound with
:func:`~tenant_celery.bind_tenant_guc`, it begins every transaction outside a
tenant with the setting ``''``, which hides a session-level value.

The proof is complete when every connection a tenant task used during the
load (the load recorded each run's process and backend pid) has been read
since, or has been closed since (it is gone from ``pg_stat_activity``).
Probes are sent in rounds, several per worker process and thread, until
that holds.  Found: connections checked, and how many read anything but
empty (must be 0).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from . import load, load_app
from ._common import ReliabilityContext, Section, Tally

ROUNDS = 5
"""Rounds of probes sent at most, until every connection is covered."""
PROBES_PER_SLOT = 4
"""Probes per round for each pool process (prefork child) or thread."""

Process = tuple[str, int]
"""A worker process: its label and pid."""


def _count_probes(conn: sa.Connection) -> int:
    count = conn.execute(sa.text(f"SELECT count(*) FROM {load_app.PROBES}")).scalar_one()
    conn.rollback()
    return int(count)


def _readings(conn: sa.Connection) -> list[tuple[str, int, int, str | None]]:
    rows = conn.execute(
        sa.text(f"SELECT label, pid, backend_pid, setting FROM {load_app.PROBES}")
    ).all()
    conn.rollback()
    return [(str(label), int(pid), int(b), setting) for label, pid, b, setting in rows]


def _alive(conn: sa.Connection, role: str) -> set[int]:
    pids = conn.execute(
        sa.text("SELECT pid FROM pg_stat_activity WHERE usename = :role"), {"role": role}
    ).scalars()
    found = {int(p) for p in pids}
    conn.rollback()
    return found


def coverage(
    used: dict[Process, set[int]],
    probed: dict[Process, set[int]],
    alive: set[int],
) -> tuple[dict[Process, set[int]], dict[Process, set[int]]]:
    """The connections tenant tasks used that were not probed since: (still open, closed)."""
    unprobed: dict[Process, set[int]] = {}
    closed: dict[Process, set[int]] = {}
    for process, backends in used.items():
        missing = backends - probed.get(process, set())
        if missing & alive:
            unprobed[process] = missing & alive
        if missing - alive:
            closed[process] = missing - alive
    return unprobed, closed


def run(ctx: ReliabilityContext) -> Section:
    """Probe every worker's pool after the load; return the leak proof's section."""
    fleet: load.Fleet | None = ctx.shared.get("load.fleet")
    runs: Sequence[load.Run] | None = ctx.shared.get("load.runs")
    own_load: Section | None = None
    if fleet is None or fleet.stopped or runs is None:
        ctx.say("leaks: the load part did not run first; running a small load to probe after")
        own_load = load.run(ctx, runs_wanted=300)
        fleet, runs = ctx.shared["load.fleet"], ctx.shared["load.runs"]
    try:
        section = _probe(ctx, fleet, runs)
    finally:
        fleet.stop()
    if own_load is not None:  # its findings are not reported elsewhere in this run
        section.violations += [f"the load first: {v}" for v in own_load.all_violations()]
    return section


def _probe(ctx: ReliabilityContext, fleet: load.Fleet, runs: Sequence[load.Run]) -> Section:
    used: dict[Process, set[int]] = defaultdict(set)
    for r in runs:
        used[(r.label, r.pid)].add(r.backend_pid)
    admin = ctx.admin_engine(pool_size=1)
    sent, rounds = 0, 0
    with admin.connect() as conn:
        for rounds in range(1, ROUNDS + 1):
            for spec, worker in zip(fleet.specs, fleet.workers, strict=True):
                for _ in range(PROBES_PER_SLOT * spec.concurrency):
                    worker.app.tasks[load_app.PROBE].apply_async((rounds,))
                    sent += 1
            # A probe records one reading per connection of its pool.
            load.wait_for(ctx, conn, _count_probes, sent * load_app.POOL_SIZE)
            readings = _readings(conn)
            probed: dict[Process, set[int]] = defaultdict(set)
            for label, pid, backend, _setting in readings:
                probed[(label, pid)].add(backend)
            unprobed, closed = coverage(used, probed, _alive(conn, ctx.app_role))
            ctx.say(
                f"leaks: round {rounds}: {len(readings):,} readings of "
                f"{sum(len(b) for b in probed.values())} connections; "
                f"{sum(len(b) for b in unprobed.values())} used ones not read yet"
            )
            if not unprobed:
                break
    return _section(ctx, fleet, used, probed, readings, unprobed, closed, sent, rounds)


def _section(
    ctx: ReliabilityContext,
    fleet: load.Fleet,
    used: dict[Process, set[int]],
    probed: dict[Process, set[int]],
    readings: Sequence[tuple[str, int, int, str | None]],
    unprobed: dict[Process, set[int]],
    closed: dict[Process, set[int]],
    sent: int,
    rounds: int,
) -> Section:
    leaked: dict[tuple[str, int, int], set[str]] = defaultdict(set)
    for label, pid, backend, setting in readings:
        if setting not in (None, ""):
            leaked[(label, pid, backend)].add(setting)
    rows: list[list[Any]] = []
    for spec in fleet.specs:
        mine_used = {p: b for p, b in used.items() if p[0] == spec.label}
        mine_probed = {p: b for p, b in probed.items() if p[0] == spec.label}
        rows.append(
            [
                load.BROKER_NAMES[spec.broker],
                spec.pool_label,
                len(mine_used),
                sum(len(b) for b in mine_used.values()),
                sum(len(b) for b in mine_probed.values()),
                sum(1 for r in readings if r[0] == spec.label),
                sum(len(b) for p, b in closed.items() if p[0] == spec.label),
                sum(len(b) for p, b in unprobed.items() if p[0] == spec.label),
                sum(1 for k in leaked if k[0] == spec.label),
            ]
        )
    checked = sum(len(b) for b in probed.values())
    table = ctx.report(
        "Tenant setting on the workers' pooled connections after the load",
        [
            "broker", "pool", "processes", "connections used by tenant tasks",
            "connections read", "readings", "closed since", "not read", "not empty",
        ],
        rows,
        [
            f"{sent:,} probe tasks in {rounds} round(s), each holding its process's whole "
            f"pool ({load_app.POOL_SIZE} connections) and reading the setting on each, "
            "outside any tenant",
            "a connection is counted once however often it was read",
            *[f"{label} pid {pid} backend {b}: {sorted(v)}" for (label, pid, b), v in
              list(leaked.items())[:10]],
        ],
    )  # fmt: skip
    unread = sum(len(b) for b in unprobed.values())
    section = Section(
        key="leaks",
        title="No tenant setting left on pooled connections",
        tables=[table],
        data={
            "probes_sent": sent,
            "rounds": rounds,
            "readings": len(readings),
            "connections_checked": checked,
            "connections_used_by_tenant_tasks": sum(len(b) for b in used.values()),
            "closed_since": sum(len(b) for b in closed.values()),
            "not_read": unread,
            "not_empty": len(leaked),
            "settings_found": sorted({s for v in leaked.values() for s in v})[:10],
        },
        tally=Tally(connections_checked=checked, leaked_settings=len(leaked)),
    )
    section.require(checked > 0, "no pooled connection was read: the proof proved nothing")
    section.require(bool(used), "no tenant task recorded its connection: nothing to prove")
    section.require(
        unread == 0,
        f"{unread} connections tenant tasks used were still open and never read "
        f"after {rounds} rounds of probes",
    )
    return section
