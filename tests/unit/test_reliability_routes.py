"""The reliability suite's replay routes: their plan, and the verdict fed fabricated outcomes.

A hostile route's zero is only worth something if a route that ran is
counted: these tests give the verdict (:mod:`reliability.route_verdict`)
attempts whose messages succeeded, rows found in the attacked tenant, seeded
rows gone, and check each is reported as a failure, and a control that did
nothing as a violation.  No service is used: the workers and the database
are stood in for.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from reliability import route_verdict, routes, routes_app
from reliability._common import ReliabilityContext
from reliability.route_verdict import SEED_ROWS, Rows
from sqlalchemy.engine import make_url

from tenant_celery import ConfigurationError, TenantConflict


@dataclass
class Result:
    """A stand-in for an ``AsyncResult`` whose outcome is known."""

    id: str
    state: str = "PENDING"
    result: Any = None


@dataclass
class App:
    """A stand-in client app: what the verdict asks of it is a result by id."""

    results: dict[str, Result] = field(default_factory=dict)

    def AsyncResult(self, task_id: str) -> Result:
        return self.results.get(task_id, Result(task_id))


@dataclass
class Target:
    kind: str
    app: App = field(default_factory=App)
    broker: str = "redis"

    @property
    def ident(self) -> str:
        return f"{self.kind}-{self.broker}"

    @property
    def label(self) -> str:
        return f"{self.kind}, {self.broker}"


def context(tmp_path: Path) -> ReliabilityContext:
    url = make_url("postgresql+psycopg://nobody@127.0.0.1:9/none")
    return ReliabilityContext(
        size="smoke",
        server_url=url,
        admin_url=url,
        app_url=url,
        app_role="nobody",
        plain_url=url,
        redis_url="redis://127.0.0.1:9",
        amqp_url="amqp://127.0.0.1:9//",
        run_id="test",
        workdir=tmp_path,
        out=io.StringIO(),
    )


def route(name: str) -> routes.Route:
    return next(r for r in routes.ROUTES if r.name == name)


def planned(tmp_path: Path) -> list[routes.Attempt]:
    targets: Any = [Target(routes.SIGNED), Target(routes.UNSIGNED)]
    return routes.plan(context(tmp_path), targets, 2)


def attempt(
    tmp_path: Path, name: str, kind: str = routes.SIGNED, *, hostile: bool = True
) -> routes.Attempt:
    return next(
        at
        for at in planned(tmp_path)
        if at.route.name == name and at.target.kind == kind and at.hostile is hostile
    )


def refused(at: routes.Attempt, exc: BaseException | None = None) -> routes.Attempt:
    """The attempt's message failed in the worker with ``exc``."""
    at.results = [Result(f"{at.key}-carrier", "FAILURE", exc or TenantConflict("refused"))]
    return at


def succeeded(at: routes.Attempt) -> routes.Attempt:
    at.results = [Result(f"{at.key}-carrier", "SUCCESS", None)]
    return at


def rows(
    *attempts: routes.Attempt, written: dict[tuple[str, str], int] | None = None, calls: int = 0
) -> Rows:
    """Every attempt's tenants seeded and intact, plus ``written`` rows ``(key, tenant)``."""
    seeds: Counter[str] = Counter(dict.fromkeys(routes_app.LISTED, SEED_ROWS))
    for at in attempts:
        seeds.update({at.a: SEED_ROWS, at.b: SEED_ROWS})
    by_key: dict[str, Counter[str]] = {}
    for (key, tenant), count in (written or {}).items():
        by_key.setdefault(key, Counter())[tenant] += count
    return Rows(by_key, seeds, calls)


NO_LOSS = {f"{routes.SIGNED}-redis": 0, f"{routes.UNSIGNED}-redis": 0}


def judged(
    at: routes.Attempt, found: Rows, lost: dict[str, int] = NO_LOSS, shares: int = 1
) -> routes.Attempt:
    route_verdict.judge(at, found, lost, Counter({at.shared_key: shares}))
    return at


# ----------------------------------------------------------------------------- plan


def test_every_route_is_tried_where_it_is_hostile_or_a_control(tmp_path: Path) -> None:
    attempts = planned(tmp_path)
    for r in routes.ROUTES:
        for kind in routes.WORKER_KINDS:
            mine = [at for at in attempts if at.route is r and at.target.kind == kind]
            hostile = [at.hostile for at in mine]
            if kind in r.hostile_on:
                assert hostile == [True, True], (r.name, kind)
            elif kind in r.control_on:
                assert hostile == [False, False], (r.name, kind)
            else:
                assert hostile == [], (r.name, kind)
    # each attempt attacks tenants of its own, and writes under keys of its own
    tenants = [t for at in attempts for t in (at.a, at.b)]
    assert len(set(tenants)) == len(tenants)
    assert len({at.key for at in attempts}) == len(attempts)


def test_workers_of_each_broker_get_tenants_and_keys_of_their_own(tmp_path: Path) -> None:
    targets: Any = [Target(k, broker=b) for b in routes.BROKERS for k in routes.WORKER_KINDS]
    attempts = routes.plan(context(tmp_path), targets, 2)
    by_broker = {b: [at for at in attempts if at.target.broker == b] for b in routes.BROKERS}
    assert len(by_broker["redis"]) == len(by_broker["tcpg"]) == len(planned(tmp_path))
    tenants = [t for at in attempts for t in (at.a, at.b)]
    assert len(set(tenants)) == len(tenants)
    assert len({at.key for at in attempts}) == len(attempts)


def test_what_applies_to_the_unsigned_worker() -> None:
    hostile = {r.name for r in routes.ROUTES if routes.UNSIGNED in r.hostile_on}
    assert hostile == {
        "for_each_tenant lister",
        "for_each_tenant os:abort",
        "nested headers",
        "mixed-tenant chord",
        "forged chord part",
    }
    # every route hostile on the signed worker only is a control on the unsigned one,
    # except the errback: nothing refuses its carrier there
    signed_only = {
        r.name for r in routes.ROUTES if r.hostile_on == (routes.SIGNED,) and not r.control_on
    }
    assert signed_only == {"errback of a refused task"}


def test_a_fan_out_of_the_schedule_writes_under_the_schedule_key(tmp_path: Path) -> None:
    hostile = attempt(tmp_path, "for_each_tenant unsigned")
    control = attempt(tmp_path, "for_each_tenant unsigned", routes.UNSIGNED, hostile=False)
    assert (hostile.shared_key, control.shared_key) == (
        routes_app.FAN_OUT_KEY,
        routes_app.CONTROL_KEY,
    )
    assert attempt(tmp_path, "nested headers").shared_key is None


# -------------------------------------------------------------------------- verdict


def test_a_refused_route_that_wrote_nothing_passes(tmp_path: Path) -> None:
    at = refused(attempt(tmp_path, "chain step (argument)"))
    judged(at, rows(at))
    assert at.ok
    assert (at.refused, at.wrote_nothing, at.deleted_nothing) == (True, True, True)
    assert at.outcome == "worker: TenantConflict"


def test_a_row_in_the_attacked_tenant_fails_the_route_however_it_was_refused(
    tmp_path: Path,
) -> None:
    at = refused(attempt(tmp_path, "errback of a refused task"))
    judged(at, rows(at, written={(f"{at.key}.errback", at.b): 1}))
    assert at.refused
    assert not at.wrote_nothing
    assert not at.ok
    assert any("1 in tenant B" in p for p in at.problems)


def test_a_row_in_any_other_tenant_fails_the_route(tmp_path: Path) -> None:
    at = refused(attempt(tmp_path, "nested headers", routes.UNSIGNED))
    judged(at, rows(at, written={(at.key, routes_app.LISTED[0]): 1}))
    assert not at.ok


def test_deleted_seed_rows_fail_the_route(tmp_path: Path) -> None:
    at = refused(attempt(tmp_path, "celery.map item (purge)"))
    found = rows(at)
    found.seeds[at.b] = 0
    judged(at, found)
    assert not at.deleted_nothing
    assert not at.ok


def test_a_route_that_ran_is_not_refused(tmp_path: Path) -> None:
    at = succeeded(attempt(tmp_path, "link callback"))
    at.replays = ["callback-id"]  # the frozen callback's id, set when it is published
    at.target.app.results["callback-id"] = Result("callback-id", "SUCCESS")  # type: ignore[attr-defined]
    judged(at, rows(at))
    assert not at.refused
    assert at.outcome == "SUCCESS"
    assert any("replayed part" in p for p in at.problems)
    assert not at.ok


def test_a_chord_may_write_its_own_part_only(tmp_path: Path) -> None:
    at = attempt(tmp_path, "mixed-tenant chord")
    at.refused_at_publish = TenantConflict("a chord runs in one tenant")
    judged(at, rows(at, written={(f"{at.key}.own", at.a): 1}))
    assert at.ok, at.problems
    assert at.outcome == "publish: TenantConflict"

    again = attempt(tmp_path, "mixed-tenant chord")
    again.refused_at_publish = TenantConflict("a chord runs in one tenant")
    judged(again, rows(again, written={(f"{again.key}.callback", again.a): 1}))
    assert not again.ok


def test_the_schedule_fan_out_replayed_unsigned_fails_on_any_listed_row(tmp_path: Path) -> None:
    at = refused(attempt(tmp_path, "for_each_tenant unsigned"), ConfigurationError("no"))
    judged(at, rows(at, written={(routes_app.FAN_OUT_KEY, routes_app.LISTED[1]): 1}))
    assert not at.ok
    clean = refused(attempt(tmp_path, "for_each_tenant unsigned"), ConfigurationError("no"))
    # the controls' fan-outs write under their own key
    judged(clean, rows(clean, written={(routes_app.CONTROL_KEY, routes_app.LISTED[1]): 4}))
    assert clean.ok


def test_a_called_lister_or_a_dead_pool_process_fails_its_route(tmp_path: Path) -> None:
    lister = refused(attempt(tmp_path, "for_each_tenant lister"), ConfigurationError("no"))
    judged(lister, rows(lister, calls=1))
    assert not lister.ok
    abort = refused(attempt(tmp_path, "for_each_tenant os:abort"), ConfigurationError("no"))
    judged(abort, rows(abort), lost={f"{routes.SIGNED}-redis": 1, f"{routes.UNSIGNED}-redis": 0})
    assert not abort.ok
    other = refused(attempt(tmp_path, "for_each_tenant os:abort", routes.UNSIGNED))
    judged(other, rows(other), lost={f"{routes.SIGNED}-redis": 1, f"{routes.UNSIGNED}-redis": 0})
    assert other.ok


def test_the_pool_process_lines_of_a_worker_log_are_counted_once_each() -> None:
    log = "\n".join(
        [
            "[...: ERROR/MainProcess] Process 'ForkPoolWorker-2' pid:4242 exited with "
            "'signal 6 (SIGABRT)'",
            "[...: ERROR/MainProcess] Process 'ForkPoolWorker-2' pid:4242 exited with "
            "'signal 6 (SIGABRT)'",
            "[...: ERROR/MainProcess] Process 'ForkPoolWorker-3' pid:4250 exited with 'exitcode 1'",
            "billiard.exceptions.WorkerLostError: Worker exited prematurely",
        ]
    )
    assert route_verdict.lost_processes(log) == 2
    assert route_verdict.lost_processes("[...] ready.") == 0


@pytest.mark.parametrize(
    ("name", "written", "deleted"),
    [
        ("chain step (header)", {("", "B"): 1}, set()),
        ("celery.map item (purge)", {}, {"B"}),
        ("signed chain", {(".1", "B"): 1, (".2", "B"): 1}, set()),
    ],
)
def test_a_control_passes_only_when_it_did_what_it_does(
    tmp_path: Path, name: str, written: dict[tuple[str, str], int], deleted: set[str]
) -> None:
    kind = routes.SIGNED if name == "signed chain" else routes.UNSIGNED
    at = succeeded(attempt(tmp_path, name, kind, hostile=False))
    tenant = {"A": at.a, "B": at.b}
    found = rows(at, written={(at.key + part, tenant[t]): n for (part, t), n in written.items()})
    for who in deleted:
        found.seeds[tenant[who]] = 0
    assert judged(at, found).ok, at.problems

    idle = succeeded(attempt(tmp_path, name, kind, hostile=False))
    assert not judged(idle, rows(idle)).ok


def test_the_report_counts_each_route_and_flags_a_control_that_did_not_run(
    tmp_path: Path,
) -> None:
    ctx = context(tmp_path)
    good = refused(attempt(tmp_path, "nested headers"))
    judged(good, rows(good))
    bad = succeeded(attempt(tmp_path, "celery.starmap item"))
    judged(bad, rows(bad, written={(bad.key, bad.b): 1}))
    control = succeeded(attempt(tmp_path, "link callback", routes.UNSIGNED, hostile=False))
    judged(control, rows(control))

    found = route_verdict.report(ctx, [good, bad, control], 2, 4.2)

    assert (found.tried, found.passed) == (2, 1)
    signed = found.data["routes"]["signed, redis worker"]
    assert signed["celery.starmap item"]["wrote_nothing"] == 0
    assert signed["celery.starmap item"]["failed"] == 1
    assert found.data["controls"]["unsigned, redis worker"]["link callback"]["ran_as_designed"] == 0
    assert found.violations == [
        "the control link callback did not run as designed on the unsigned, redis worker"
    ]
    assert [t.title for t in found.tables] == [
        "Replay routes, real workers",
        "Replay routes, controls",
    ]
