"""The verdicts of the reliability suite's faults, fed fabricated rows.

A fault's zeros (nothing lost, nothing run twice, nothing under another
tenant) are only worth something if a lost task, a stray run or a task run
twice is reported: these tests feed the verdicts of the publisher kill and of
the full server such rows and check each broken promise is named.  The faults
themselves run against real workers in ``python -m reliability --only faults``.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest
from reliability import fault_publisher, faults
from reliability.faults import FaultResult, PublisherKill, Run
from sqlalchemy.engine import make_url

from tests.integration import faults_app

A, B = str(uuid.uuid4()), str(uuid.uuid4())
KILLED = -signal.SIGKILL


def ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


def ran(task_id: str, tenant: str, at: float = 100.0, attempt: int = 0) -> list[Run]:
    """The two rows of one complete run of ``task_id`` in ``tenant``."""
    return [
        Run(task_id, tenant, "started", attempt, 1, 2, tenant, at),
        Run(task_id, tenant, "done", attempt, 1, 2, tenant, at + 0.1),
    ]


# ------------------------------------------------------------- the publisher kill


def test_read_lines_keeps_whole_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "confirmed"
    assert fault_publisher.read_lines(path) == []
    path.write_text("a b\nc\nd-cut-sho")
    assert fault_publisher.read_lines(path) == [["a", "b"], ["c"]]


def episode(confirmed: list[str], in_flight: list[str], tenant: str = A) -> PublisherKill:
    intended = dict.fromkeys([*confirmed, *in_flight], tenant)
    return PublisherKill(intended, confirmed, KILLED, 0.5)


def judge_kill(
    episodes: list[PublisherKill],
    runs: list[Run],
    after: dict[str, str] | None = None,
    **overrides: object,
) -> FaultResult:
    result = FaultResult("publisher SIGKILLed mid-batch", "tcpg", "prefork 2")
    result.injected = sum(1 for e in episodes if e.killed)
    checks: dict[str, object] = {"left": 0, "stray": [], "trouble": [], "alive": True}
    checks.update(overrides)
    faults.judge_publisher_killed(result, episodes, after or {}, runs, **checks)  # type: ignore[arg-type]
    return result


def test_every_confirmed_publish_ran_once_and_an_extra_is_counted() -> None:
    confirmed, (committed,), (uncommitted,), later = ids(5), ids(1), ids(1), ids(2)
    episodes = [episode(confirmed[:3], [committed]), episode(confirmed[3:], [uncommitted])]
    runs = [r for t in [*confirmed, committed, *later] for r in ran(t, A)]
    result = judge_kill(episodes, runs, after=dict.fromkeys(later, A))
    assert result.problems == []
    assert result.ok
    assert (result.survived, result.published, result.duplicates) == (2, 7, 0)
    assert result.executions == 8
    details = result.details
    assert (details["published_before_kill"], details["ran"], details["lost"]) == (5, 5, 0)
    assert (details["extra"], details["extra_ids"]) == (1, [committed])
    interrupted = [k["interrupted"] for k in details["publisher_kills"]]
    assert "committed: ran" in interrupted[0]
    assert "never ran" in interrupted[1]


def test_a_confirmed_publish_that_never_ran_is_lost() -> None:
    confirmed = ids(4)
    runs = [r for t in confirmed[1:] for r in ran(t, A)]
    result = judge_kill([episode(confirmed, [])], runs)
    assert not result.ok
    assert result.unaccounted == 1
    assert result.details["lost"] == 1
    assert any("never completed" in p for p in result.problems)


def test_a_task_run_twice_is_a_problem_here() -> None:
    confirmed = ids(2)
    runs = [*ran(confirmed[0], A), *ran(confirmed[0], A, at=200.0), *ran(confirmed[1], A)]
    result = judge_kill([episode(confirmed, [])], runs)
    assert result.duplicates == 1
    assert any("ran twice" in p for p in result.problems)


def test_an_unconfirmed_publish_run_under_another_tenant_is_counted() -> None:
    confirmed, in_flight = ids(2), ids(1)
    runs = [*[r for t in confirmed for r in ran(t, A)], *ran(in_flight[0], B)]
    result = judge_kill([episode(confirmed, in_flight)], runs)
    assert result.cross_tenant == 2
    assert any("another tenant" in p for p in result.problems)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"left": 1}, "stayed in the queue"),
        ({"stray": ["x"]}, "nobody published"),
        ({"trouble": ["[.. ERROR/MainProcess] Can't decode message body"]}, "logged 1 errors"),
        ({"alive": False}, "the worker died"),
    ],
)
def test_the_worker_side_checks_report(overrides: dict[str, object], problem: str) -> None:
    confirmed = ids(2)
    runs = [r for t in confirmed for r in ran(t, A)]
    result = judge_kill([episode(confirmed, [])], runs, **overrides)
    assert not result.ok
    assert any(problem in p for p in result.problems), result.problems


def test_a_kill_cannot_leave_two_publishes_unconfirmed() -> None:
    confirmed, in_flight = ids(2), ids(2)
    runs = [r for t in confirmed for r in ran(t, A)]
    result = judge_kill([episode(confirmed, in_flight)], runs)
    assert any("more than one publish" in p for p in result.problems)


def test_a_publisher_that_was_not_killed_is_no_injection() -> None:
    gone = PublisherKill({}, [], 0, 1.0)
    assert not gone.killed
    assert gone.in_flight == []


# ------------------------------------------------------------ the full server

FULL_AT, RELEASED_AT = 100.0, 104.0
REFUSAL = (
    'connection failed: connection to server on socket "/tmp/x/.s.PGSQL.5432" failed: '
    "FATAL:  remaining connection slots are reserved for roles with the SUPERUSER attribute"
)


def judge_full(
    expected: dict[str, str], runs: list[Run], log: str = REFUSAL, **overrides: object
) -> FaultResult:
    result = FaultResult("max_connections reached", "tcpg", "prefork 2", injected=1)
    checks: dict[str, object] = {
        "full_at": FULL_AT,
        "released_at": RELEASED_AT,
        "pending": 5,
        "probe": REFUSAL,
        "most_app_backends": 0,
        "failed": {},
        "left": 0,
    }
    checks.update(overrides)
    faults.judge_exhausted(result, expected, runs, log, **checks)  # type: ignore[arg-type]
    return result


def test_a_full_server_survived() -> None:
    before, after = ids(3), ids(2)
    runs = [
        *[r for t in before for r in ran(t, A, at=90.0)],
        *[r for t in after for r in ran(t, A, at=110.0)],
    ]
    result = judge_full(dict.fromkeys([*before, *after], A), runs, log=REFUSAL * 3)
    assert result.problems == []
    assert result.ok
    assert result.details["worker_refusals_logged"] == 3
    assert result.details["duplicate_causes"] == {}


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"pending": 0}, "nothing was pending"),
        ({"probe": None}, "not refused"),
        ({"probe": "FATAL: password authentication failed"}, "not refused"),
        ({"most_app_backends": 2}, "held 2 connections"),
        ({"log": "nothing to see"}, "no refusal"),
        ({"failed": {"t": "OperationalError: ..."}}, "1 publishes failed"),
        ({"left": 3}, "stayed in the queue"),
    ],
)
def test_each_check_of_the_full_server_can_fail(overrides: dict[str, object], problem: str) -> None:
    (task,) = ids(1)
    result = judge_full({task: A}, ran(task, A, at=110.0), **overrides)  # type: ignore[arg-type]
    assert not result.ok
    assert any(problem in p for p in result.problems), result.problems


def test_a_task_completed_while_the_server_was_full_means_it_held_nothing_back() -> None:
    (task,) = ids(1)
    result = judge_full({task: A}, ran(task, A, at=102.0))
    assert any("completed while the server was full" in p for p in result.problems)


def test_a_lost_task_is_reported_with_the_reason_the_worker_logged() -> None:
    kept, lost = ids(2)
    log = (
        f"{REFUSAL}\n[2026-12-06 09:33:52,786: WARNING/ForkPoolWorker-1] Task "
        f"faults.record[{lost}] reject requeue=False: {REFUSAL}\n"
    )
    result = judge_full({kept: A, lost: A}, ran(kept, A, at=110.0), log=log)
    assert result.unaccounted == 1
    assert any("never completed" in p for p in result.problems)
    assert result.details["lost_rejected"] == {lost: REFUSAL}


def test_duplicates_are_counted_by_cause() -> None:
    retried, lapsed, odd = ids(3)
    runs = [
        *ran(retried, A, at=99.0),
        *ran(retried, A, at=105.0, attempt=1),
        *ran(lapsed, A, at=99.0),
        *ran(lapsed, A, at=106.0),
        *ran(odd, A, at=107.0),
        *ran(odd, A, at=108.0),
    ]
    causes = faults.duplicate_causes(runs, RELEASED_AT)
    assert {cause: len(found) for cause, found in causes.items()} == {
        faults._RETRY_AND_ORIGINAL: 1,
        faults._LEASE_LAPSED: 1,
        faults._UNEXPLAINED: 1,
    }
    result = judge_full(dict.fromkeys([retried, lapsed, odd], A), runs)
    assert result.duplicates == 3
    assert any("no reason the outage explains" in p for p in result.problems)


# -------------------------------------------------------------------- the preamble


def test_scene_is_what_the_scenarios_used_to_build() -> None:
    url = make_url("postgresql+psycopg://app:pw@127.0.0.1:9/db")
    setup = faults.Setup(admin_url=url.set(username="admin"), app_url=url, app_role="app")
    result, queue, tenants, spec, admin = faults.scene(
        setup,
        "worker frozen past its leases",
        "sigstop",
        broker_url="tcpg+postgresql://app:pw@127.0.0.1:9/db",
        backend_url="redis://127.0.0.1:9/15",
        visibility_timeout=3.0,
        tenants=3,
    )
    try:
        assert (result.fault, result.broker, result.pool) == (
            "worker frozen past its leases",
            "tcpg",
            "prefork 2",
        )
        assert queue.startswith("tc.faults.sigstop.")
        assert len(set(tenants)) == 3
        assert spec.queue == queue
        assert spec.database_url == "postgresql+psycopg://app:pw@127.0.0.1:9/db"
        assert (spec.pool, spec.concurrency) == ("prefork", 2)
        assert spec.environ == {faults_app.VISIBILITY_TIMEOUT_ENV: "3.0"}
        assert admin.url.username == "admin"
    finally:
        admin.dispose()
