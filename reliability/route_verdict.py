"""What a replay route did, as the superuser reads it: each attempt's verdict, and the report.

The routes (:mod:`reliability.routes`) write into :data:`~reliability.routes_app.NOTES`
through real workers; this module creates that table and seeds it
(:func:`create_tables`, :func:`seed`), reads it back past row-level security
(:func:`read_rows`), decides for each attempt whether it was refused, wrote
nothing and deleted nothing (hostile) or did exactly what it should
(control) (:func:`judge`), and builds the tables and JSON the ``hostile``
section reports (:func:`report`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from tenant_celery import DEFAULT_GUC, TenantCeleryError
from tenant_celery.rls import enable_tenant_rls, grant_tenant_tables

from . import routes_app
from ._common import ReliabilityContext, Table

if TYPE_CHECKING:
    from .routes import Attempt

__all__ = [
    "CALLS",
    "LOST_PROCESSES",
    "SEED_ROWS",
    "RouteReport",
    "Rows",
    "create_tables",
    "judge",
    "lost_processes",
    "read_rows",
    "report",
    "seed",
]

SEED_ROWS = 2
"""Rows each attempt's tenants (and the listed tenants) hold before the routes run."""
LOST = re.compile(r"Process '[^']*' pid:(\d+) exited with")
"""What the worker logs when one of its pool processes died (``os:abort`` would do it)."""
CALLS, LOST_PROCESSES = "lister calls", "pool processes lost"
"""The evidence a fan-out route leaves besides rows (``Route.evidence``)."""


# ---------------------------------------------------------------------- the database


def create_tables(admin: sa.Engine, app_role: str) -> None:
    """Create :data:`~reliability.routes_app.NOTES` under the tenant policy and
    :data:`~reliability.routes_app.CALLS`, for ``app_role`` to write."""
    notes, calls = routes_app.NOTES, routes_app.CALLS
    with admin.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {notes} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "tenant_id uuid NOT NULL DEFAULT "
            f"NULLIF(current_setting('{DEFAULT_GUC}', true), '')::uuid, key text NOT NULL)"
        )
        enable_tenant_rls(conn, notes)
        grant_tenant_tables(conn, app_role, [notes])
        conn.exec_driver_sql(f"CREATE TABLE {calls} (key text NOT NULL, pid integer NOT NULL)")
        conn.exec_driver_sql(f'GRANT INSERT ON {calls} TO "{app_role}"')


def seed(admin: sa.Engine, tenants: Sequence[str]) -> None:
    """Give each of ``tenants`` :data:`SEED_ROWS` rows keyed ``seed``."""
    with admin.begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {routes_app.NOTES} (tenant_id, key) SELECT CAST(t AS uuid), 'seed' "
                "FROM unnest(CAST(:tenants AS text[])) AS t, generate_series(1, :rows)"
            ),
            {"tenants": list(tenants), "rows": SEED_ROWS},
        )


@dataclass
class Rows:
    """What the superuser reads after the routes ran."""

    by_key: dict[str, Counter[str]]
    """Rows per key, counted per tenant."""
    seeds: Counter[str]
    """Seeded rows left, per tenant."""
    calls: int
    """Calls of the noisy lister."""

    def of(self, at: Attempt) -> Counter[tuple[str, str]]:
        """The attempt's rows, by ``(tenant, key)``."""
        keys = [at.shared_key] if at.shared_key else [at.key]
        found: Counter[tuple[str, str]] = Counter()
        for key, tenants in self.by_key.items():
            if key in keys or any(key.startswith(f"{k}.") for k in keys):
                for tenant, count in tenants.items():
                    found[(tenant, key)] += count
        return found


def read_rows(admin: sa.Engine) -> Rows:
    """Every row of the routes' tables, as the superuser reads them (past row-level security)."""
    with admin.connect() as conn:
        rows = conn.execute(
            sa.text(f"SELECT key, tenant_id::text, count(*) FROM {routes_app.NOTES} GROUP BY 1, 2")
        ).all()
        calls = conn.execute(sa.text(f"SELECT count(*) FROM {routes_app.CALLS}")).scalar_one()
    by_key: dict[str, Counter[str]] = {}
    seeds: Counter[str] = Counter()
    for key, tenant, count in rows:
        if key == "seed":
            seeds[tenant] += int(count)
        else:
            by_key.setdefault(str(key), Counter())[tenant] += int(count)
    return Rows(by_key, seeds, int(calls))


def lost_processes(log: str) -> int:
    """How many pool processes a worker's log says died."""
    return len(set(LOST.findall(log)))


# ---------------------------------------------------------------------- the verdict


def _describe(exc: object) -> str:
    return type(exc).__name__ if isinstance(exc, BaseException) else repr(exc)[:40]


def judge(at: Attempt, rows: Rows, lost: dict[str, int], shares: Counter[str]) -> None:
    """Fill in the attempt's outcome from what the superuser read."""
    states = [(r.state, r.result) for r in at.results]
    replay_states = [at.target.app.AsyncResult(i) for i in at.replays]
    mine = rows.of(at)
    if at.hostile:
        refusals = []
        if at.refused_at_publish is not None:
            refusals.append(f"publish: {_describe(at.refused_at_publish)}")
        refusals += [
            f"worker: {_describe(result)}"
            for state, result in states
            if state == "FAILURE" and isinstance(result, TenantCeleryError)
        ]
        at.refused = bool(refusals)
        at.outcome = refusals[0] if refusals else ", ".join(s for s, _ in states) or "published"
        if not at.refused:
            at.problem(f"not refused with a TenantCeleryError ({at.outcome})")
        own = {f"{at.key}.{part}" for part in at.route.own}
        written = {
            (tenant, key): count
            for (tenant, key), count in mine.items()
            if not (tenant == at.a and key in own)
        }
        if written:
            at.wrote_nothing = False
            where = ", ".join(
                f"{count} in {_name(at, tenant)} ({key})"
                for (tenant, key), count in written.items()
            )
            at.problem(f"rows written: {where}")
        for tenant in at.tenants():
            if rows.seeds[tenant] < SEED_ROWS:
                at.deleted_nothing = False
                at.problem(f"{SEED_ROWS - rows.seeds[tenant]} rows of {_name(at, tenant)} deleted")
        for replay in replay_states:
            if replay.state == "SUCCESS":
                at.problem(f"the replayed part {replay.id} ran")
        if at.route.evidence == CALLS and rows.calls:
            at.problem(f"the unconfigured lister was called {rows.calls} times")
        if at.route.evidence == LOST_PROCESSES and lost[at.target.ident]:
            at.problem(f"{lost[at.target.ident]} pool processes of the worker died")
        return
    expected: Counter[tuple[str, str]] = Counter()
    share = shares[at.shared_key] if at.shared_key else 1
    for who, part in at.route.control_rows:
        key = at.shared_key or (f"{at.key}.{part}" if part else at.key)
        tenants = routes_app.LISTED if who == "listed" else (at.a if who == "A" else at.b,)
        for tenant in tenants:
            expected[(tenant, key)] += share
    deleted = {t: SEED_ROWS - rows.seeds[t] for t in at.tenants()}
    wanted = {t: SEED_ROWS if _role(at, t) in at.route.control_deletes else 0 for t in deleted}
    failed = [f"{state}: {_describe(result)}" for state, result in states if state != "SUCCESS"]
    at.ran_as_designed = mine == expected and deleted == wanted and not failed
    at.outcome = "ran" if at.ran_as_designed else "did not run as designed"
    if not at.ran_as_designed:
        at.problem(
            f"control: rows {dict(mine)} (expected {dict(expected)}), deleted {deleted} "
            f"(expected {wanted}), {', '.join(failed) or 'every message succeeded'}"
        )


def _role(at: Attempt, tenant: str) -> str:
    return "A" if tenant == at.a else "B" if tenant == at.b else "listed"


def _name(at: Attempt, tenant: str) -> str:
    role = _role(at, tenant)
    return f"listed tenant {tenant}" if role == "listed" else f"tenant {role} ({tenant})"


# ----------------------------------------------------------------------- the report


@dataclass
class RouteReport:
    """What :func:`reliability.routes.run` gives the ``hostile`` section."""

    tables: list[Table]
    data: dict[str, Any]
    tried: int
    """Hostile attempts."""
    passed: int
    violations: list[str]


def _counts(attempts: Sequence[Attempt]) -> dict[str, Any]:
    if attempts[0].hostile:
        return {
            "tried": len(attempts),
            "refused": sum(at.refused for at in attempts),
            "wrote_nothing": sum(at.wrote_nothing for at in attempts),
            "deleted_nothing": sum(at.deleted_nothing for at in attempts),
            "failed": sum(not at.ok for at in attempts),
            "outcomes": dict(Counter(at.outcome for at in attempts)),
        }
    return {
        "tried": len(attempts),
        "ran_as_designed": sum(at.ran_as_designed for at in attempts),
        "failed": sum(not at.ok for at in attempts),
    }


def report(
    ctx: ReliabilityContext, attempts: Sequence[Attempt], per_route: int, elapsed: float
) -> RouteReport:
    """The routes' tables (printed now), JSON data, counts and violations."""
    groups: dict[tuple[str, str, bool], list[Attempt]] = {}
    for at in attempts:
        groups.setdefault((at.target.label, at.route.name, at.hostile), []).append(at)
    hostile_rows, control_rows = [], []
    data: dict[str, Any] = {"per_route": per_route, "routes": {}, "controls": {}}
    for (worker, name, hostile), group in groups.items():
        counts = _counts(group)
        data["routes" if hostile else "controls"].setdefault(f"{worker} worker", {})[name] = counts
        if hostile:
            hostile_rows.append(
                [
                    worker, name, counts["tried"], counts["refused"], counts["wrote_nothing"],
                    counts["deleted_nothing"], counts["failed"],
                    "; ".join(f"{k} ({v})" for k, v in counts["outcomes"].items()),
                ]
            )  # fmt: skip
        else:
            control_rows.append([worker, name, counts["tried"], counts["ran_as_designed"]])
    hostile = [at for at in attempts if at.hostile]
    controls = [at for at in attempts if not at.hostile]
    problems = [p for at in attempts for p in at.problems]
    hostile_rows.append(
        [
            "all", "total", len(hostile), sum(at.refused for at in hostile),
            sum(at.wrote_nothing for at in hostile), sum(at.deleted_nothing for at in hostile),
            sum(not at.ok for at in hostile), "",
        ]
    )  # fmt: skip
    tables = [
        ctx.report(
            "Replay routes, real workers",
            [
                "worker",
                "route",
                "tried",
                "refused",
                "wrote nothing",
                "deleted nothing",
                "failed",
                "how it was refused",
            ],
            hostile_rows,
            [
                "four real prefork workers (concurrency 2, Redis results): on each broker, "
                "Redis and the package's PostgreSQL transport, one with "
                "tenant_celery_header_signing_keys set and one without; published by a process "
                "holding no key, except where the reliability page says a key holder signed",
                "wrote nothing / deleted nothing: as the superuser reads it, no row of the "
                "attempt in its tenants A and B (nor in the listed tenants, for a fan-out), "
                "and every seeded row still there; the fan-outs also called no lister and "
                "lost no pool process",
                f"each attempt has tenants of its own; everything was published at once, "
                f"and read {elapsed:.1f} s after the first publish",
                *(f"FAILED {p}" for p in problems[:10]),
            ],
        ),
        ctx.report(
            "Replay routes, controls",
            ["worker", "route", "tried", "ran as designed"],
            control_rows,
            [
                "without signing the broker is trusted: a part naming a tenant runs there; "
                "these show the rig sees a route that is not refused (rows written in B, or "
                "B's rows deleted), and that a key holder's chain and beat's fan-out still "
                "run on the signed workers"
            ],
        ),
    ]
    data["failures"] = problems[:50]
    data["elapsed_s"] = round(elapsed, 1)
    violations = [
        f"the control {at.route.name} did not run as designed on the {at.target.label} worker"
        for at in controls
        if not at.ok
    ]
    return RouteReport(
        tables=tables,
        data=data,
        tried=len(hostile),
        passed=sum(at.ok for at in hostile),
        violations=list(dict.fromkeys(violations)),
    )
