"""The reliability suite's load plan and its analysis, fed fabricated records.

The load run's zeros are only worth something if a record that crosses
tenants, a missing row or a missing run is counted: these tests feed the
analysis such records and check the part, and then the runner, report the
violation and exit non-zero.
"""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from reliability import load, runner
from reliability._common import ReliabilityContext
from reliability.leaks import coverage
from sqlalchemy.engine import make_url

TENANTS = load.tenants_for(3)
A, B, C = TENANTS


def context(tmp_path: Path) -> ReliabilityContext:
    """A context whose URLs are never connected to: the analysis needs no service."""
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


def expected_for(jobs: list[load.Job]) -> dict[str, load.Expected]:
    expected: dict[str, load.Expected] = {}
    for job in jobs:
        expected.update(job.runs(load.WORKERS[job.worker].label))
    return expected


def faithful(expected: dict[str, load.Expected]) -> tuple[list[load.Run], list[tuple[str, str]]]:
    """The records a correct run leaves: every run in its tenant, every row written."""
    runs = [
        load.Run(
            token=token,
            tenant=want.tenant,
            ran_as=want.tenant,
            setting=want.tenant,
            seen=(want.tenant,),
            previous=want.previous,
            label=want.label,
            pid=100 + n % 3,
            backend_pid=200 + n % 2,
            recorded_at=1000.0 + n,
        )
        for n, (token, want) in enumerate(expected.items())
    ]
    items = [(token, want.tenant) for token, want in expected.items() if want.write]
    return runs, items


def rollback_warning(task_id: str, name: str = "rel.observe") -> str:
    """The line the package logs when it rolls back a transaction a task left open."""
    return (
        f"[2026-12-05 04:16:01,835: WARNING/ForkPoolWorker-1] task {name}[{task_id}] "
        "ended with a transaction still open on an engine bound by bind_tenant_guc; it was "
        "rolled back so that its tenant cannot reach other work: commit, roll back or close "
        "sessions and connections before a task returns"
    )


def faithful_logs(expected: dict[str, load.Expected]) -> dict[str, str]:
    """The workers' logs of a correct run: one rollback warning per careless read."""
    logs = {spec.label: "[...] ready.\n" for spec in load.WORKERS}
    for token, want in expected.items():
        if want.leaves_open:
            logs[want.label] += rollback_warning(load.LEAVE_OPEN_ID + token) + "\n"
    return logs


def accounted(
    expected: dict[str, load.Expected],
    runs: list[load.Run],
    items: list[tuple[str, str]],
    logs: dict[str, str] | None = None,
) -> load.Findings:
    """:func:`load.analyse` and :func:`load.account_rollbacks`, as :func:`load.run` calls them."""
    found = load.analyse(expected, runs, items)
    load.account_rollbacks(found, expected, runs, faithful_logs(expected) if logs is None else logs)
    return found


@pytest.fixture
def planned() -> dict[str, load.Expected]:
    return expected_for(load.plan(TENANTS, load.WORKERS, 200))


def test_the_plan_mixes_every_kind_tenant_and_worker() -> None:
    tenants = load.tenants_for(20)
    jobs = load.plan(tenants, load.WORKERS, 2000)
    expected = expected_for(jobs)

    assert len(expected) >= 2000
    assert {job.kind for job in jobs} == set(load.KINDS)
    assert {job.tenant for job in jobs} == set(tenants)
    assert {job.worker for job in jobs} == set(range(len(load.WORKERS)))
    kinds = Counter(e.kind for e in expected.values())
    assert {"read", "write", "spawn", "child", "link", "retry"} <= set(kinds)
    # interleaved: consecutive publishes are mostly for different tenants
    changes = sum(a.tenant != b.tenant for a, b in itertools.pairwise(jobs))
    assert changes > 0.8 * (len(jobs) - 1)
    # each worker gets about its share of the runs
    per_worker = Counter(e.label for e in expected.values())
    for spec in load.WORKERS:
        assert per_worker[spec.label] >= spec.share * 2000


def test_even_a_small_plan_gives_every_worker_every_kind() -> None:
    jobs = load.plan(TENANTS, load.WORKERS, 300)
    for index in range(len(load.WORKERS)):
        assert {job.kind for job in jobs if job.worker == index} == set(load.KINDS), index


def test_one_read_in_ten_of_each_worker_leaves_its_transaction_open() -> None:
    jobs = load.plan(load.tenants_for(20), load.WORKERS, 20_000)
    for index in range(len(load.WORKERS)):
        reads = [job for job in jobs if job.worker == index and job.kind == "read"]
        careless = [job for job in reads if job.leave_open]
        assert careless, index
        assert len(careless) == -(-len(reads) // load.LEAVE_OPEN_EVERY)
    assert all(job.kind == "read" for job in jobs if job.leave_open)
    expected = expected_for(jobs)
    assert {t for t, e in expected.items() if e.leaves_open} == {
        job.token for job in jobs if job.leave_open
    }
    # the same plan every time: the careless reads are chosen from it, not at random
    assert [j.token for j in jobs if j.leave_open] == [
        j.token for j in load.plan(load.tenants_for(20), load.WORKERS, 20_000) if j.leave_open
    ]


def test_even_a_small_plan_has_a_careless_read_on_every_worker() -> None:
    jobs = load.plan(TENANTS, load.WORKERS, 300)
    assert {job.worker for job in jobs if job.leave_open} == set(range(len(load.WORKERS)))


def test_a_chain_expects_each_link_after_the_one_before() -> None:
    runs = load.Job("j7", 0, A, "chain").runs("x")
    assert [(t, e.previous, e.write) for t, e in runs.items()] == [
        ("j7.s0", None, False),
        ("j7.s1", "j7.s0", True),
        ("j7.s2", "j7.s1", False),
    ]
    assert set(load.Job("j8", 0, A, "retry").runs("x")) == {"j8#0", "j8#1"}


def test_faithful_records_show_nothing(planned: dict[str, load.Expected]) -> None:
    runs, items = faithful(planned)
    found = accounted(planned, runs, items)
    assert found.runs == len(planned)
    careless = sum(e.leaves_open for e in planned.values())
    assert found.left_open == found.rolled_back == careless > 0
    assert (found.not_rolled_back, found.unexpected_rollbacks) == (0, 0)
    assert 0 < found.reused_after_left_open <= careless
    assert (found.cross_tenant, found.lost_writes, found.unaccounted) == (0, 0, 0)
    assert (found.blind, found.unexpected, found.duplicates, found.broken_links) == (0, 0, 0, 0)
    assert found.examples == []


def test_a_careless_run_is_reused_only_if_its_thread_ran_a_task_after_it(
    planned: dict[str, load.Expected],
) -> None:
    runs, items = faithful(planned)
    careless = next(i for i, r in enumerate(runs) if planned[r.token].leaves_open)
    # every run on a thread of its own: no task got a session another one left open
    alone = [replace(r, thread=n) for n, r in enumerate(runs)]
    assert accounted(planned, alone, items).reused_after_left_open == 0
    # one run after the careless one, on its thread
    first = alone[careless]
    alone[careless + 1] = replace(
        alone[careless + 1], label=first.label, pid=first.pid, thread=first.thread
    )
    assert accounted(planned, alone, items).reused_after_left_open == 1


def stranger(tenant: str) -> str:
    """A tenant other than ``tenant``."""
    return B if tenant != B else C


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("seen", "saw rows of"),
        ("setting", "setting was"),
        ("ran_as", "tenant context was"),
        ("tenant", "row was"),
    ],
)
def test_a_run_that_crosses_tenants_is_counted(
    planned: dict[str, load.Expected], name: str, what: str
) -> None:
    runs, items = faithful(planned)
    first = runs[0]
    other = stranger(first.tenant or "")
    runs[0] = replace(first, **{name: (first.tenant, other) if name == "seen" else other})

    found = load.analyse(planned, runs, items)

    assert found.cross_tenant == 1
    assert what in found.examples[0]
    assert (found.lost_writes, found.unaccounted) == (0, 0)


def test_lost_writes_and_unaccounted_runs_are_counted(planned: dict[str, load.Expected]) -> None:
    runs, items = faithful(planned)
    write = next(t for t, e in planned.items() if e.write)
    missing = next(t for t, e in planned.items() if not e.write)
    runs = [r for r in runs if r.token != missing]
    items = [(t, stranger(tenant) if t == write else tenant) for t, tenant in items]

    found = load.analyse(planned, runs, items)

    assert found.unaccounted == 1
    assert found.lost_writes == 1  # not under its own tenant ...
    assert found.cross_tenant == 1  # ... but under another one
    assert any(missing in e for e in found.examples)


def test_blind_duplicate_unexpected_and_misordered_runs_are_counted(
    planned: dict[str, load.Expected],
) -> None:
    runs, items = faithful(planned)
    link = next(r for r in runs if planned[r.token].previous is not None)
    runs[0] = replace(runs[0], seen=())
    runs.append(runs[1])
    runs.append(replace(runs[2], token="j-never"))
    runs.append(replace(link, previous="j-other.s0"))

    found = load.analyse(planned, runs, items)

    assert found.blind == 1
    assert found.duplicates == 2
    assert found.unexpected == 1
    assert found.broken_links == 1


def test_a_cross_tenant_observation_makes_the_run_fail(
    tmp_path: Path, planned: dict[str, load.Expected], capsys: pytest.CaptureFixture[str]
) -> None:
    """From a fabricated record to the exit status, through the real section and runner."""
    ctx = context(tmp_path)
    runs, items = faithful(planned)
    runs[5] = replace(runs[5], seen=(runs[5].tenant, stranger(runs[5].tenant or "")))
    found = load.analyse(planned, runs, items)
    jobs = load.plan(TENANTS, load.WORKERS, 200)
    section = load._section(ctx, TENANTS, jobs, planned, runs, found, (3, 3), 10.0, 1.0)

    assert section.tally.cross_tenant_observations == 1
    assert not section.passed
    report = {"size": "smoke", "machine": {}, "sections": {"load": section.to_json()}}
    json_path, markdown_path = tmp_path / "r.json", tmp_path / "r.md"
    out, err = io.StringIO(), io.StringIO()

    status = runner.conclude(report, json_path, markdown_path, out, err)

    assert status == runner.EXIT_VIOLATED != 0
    assert "load: 1 cross-tenant observations" in err.getvalue()
    assert "INVARIANTS VIOLATED" in out.getvalue()
    written = json.loads(json_path.read_text())
    assert written["summary"]["passed"] is False
    assert written["summary"]["tally"]["cross_tenant_observations"] == 1
    assert written["sections"]["load"]["passed"] is False
    assert "INVARIANTS VIOLATED" in markdown_path.read_text()


def test_the_same_records_without_the_crossing_pass(
    tmp_path: Path, planned: dict[str, load.Expected]
) -> None:
    ctx = context(tmp_path)
    runs, items = faithful(planned)
    found = accounted(planned, runs, items)
    jobs = load.plan(TENANTS, load.WORKERS, 200)
    section = load._section(ctx, TENANTS, jobs, planned, runs, found, (3, 3), 10.0, 1.0)
    report = {"size": "smoke", "machine": {}, "sections": {"load": section.to_json()}}

    status = runner.conclude(
        report, tmp_path / "r.json", tmp_path / "r.md", io.StringIO(), io.StringIO()
    )

    assert status == runner.EXIT_OK
    assert report["summary"]["tally"]["tasks_run"] == len(planned)
    data = report["sections"]["load"]["data"]
    careless = sum(e.leaves_open for e in planned.values())
    assert data["transactions_left_open"] == data["rolled_back_at_task_end"] == careless
    assert (data["not_rolled_back"], data["unexpected_rollbacks"]) == (0, 0)


def test_the_rollback_warning_is_read_from_a_worker_log() -> None:
    log = "\n".join(
        [
            "[2026-12-05 04:16:01,000: INFO/MainProcess] Task rel.observe[leave-open-j3] received",
            rollback_warning("leave-open-j3"),
            rollback_warning("0b9c5e1e-8a3f-4f55-9a47-1b8f5d3a2c10", name="rel.step"),
        ]
    )
    assert load.rolled_back_tasks(log) == ["leave-open-j3", "0b9c5e1e-8a3f-4f55-9a47-1b8f5d3a2c10"]
    assert load.careless_tokens(log) == ["j3", "0b9c5e1e-8a3f-4f55-9a47-1b8f5d3a2c10"]


def test_a_transaction_left_open_and_not_rolled_back_fails_the_load(
    tmp_path: Path, planned: dict[str, load.Expected]
) -> None:
    runs, items = faithful(planned)
    logs = faithful_logs(planned)
    careless = next(t for t, e in planned.items() if e.leaves_open)
    label = planned[careless].label
    logs[label] = logs[label].replace(rollback_warning(load.LEAVE_OPEN_ID + careless), "")

    found = accounted(planned, runs, items, logs)

    assert found.not_rolled_back == 1
    assert found.rolled_back == found.left_open - 1
    assert any(careless in e for e in found.examples)
    jobs = load.plan(TENANTS, load.WORKERS, 200)
    section = load._section(context(tmp_path), TENANTS, jobs, planned, runs, found, (3, 3), 1, 1)
    assert not section.passed
    assert any("were not rolled back" in v for v in section.all_violations())


def test_a_rollback_of_another_task_or_on_another_worker_is_unexpected(
    planned: dict[str, load.Expected],
) -> None:
    runs, items = faithful(planned)
    logs = faithful_logs(planned)
    careful = next(t for t, e in planned.items() if not e.leaves_open and e.kind == "read")
    careless = next(t for t, e in planned.items() if e.leaves_open)
    elsewhere = next(s.label for s in load.WORKERS if s.label != planned[careless].label)
    logs[planned[careful].label] += rollback_warning(load.LEAVE_OPEN_ID + careful) + "\n"
    logs[elsewhere] += rollback_warning(load.LEAVE_OPEN_ID + careless) + "\n"

    found = accounted(planned, runs, items, logs)

    assert found.unexpected_rollbacks == 2
    assert found.not_rolled_back == 0


def test_a_load_without_careless_reads_proved_nothing_about_them(
    tmp_path: Path, planned: dict[str, load.Expected]
) -> None:
    careful = {t: replace(e, leaves_open=False) for t, e in planned.items()}
    runs, items = faithful(careful)
    found = accounted(careful, runs, items)
    jobs = load.plan(TENANTS, load.WORKERS, 200)
    section = load._section(context(tmp_path), TENANTS, jobs, careful, runs, found, (3, 3), 1, 1)
    assert found.left_open == 0
    assert any("no careless read" in v for v in section.all_violations())


def test_a_load_that_proved_nothing_fails(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    found = load.analyse({}, [], [])
    section = load._section(ctx, TENANTS, [], {}, [], found, (0, 0), 0.0, 0.0)
    assert not section.passed
    assert any("proved nothing" in v for v in section.all_violations())


def test_leak_coverage_tells_unread_connections_from_closed_ones() -> None:
    used = {("w", 1): {10, 11}, ("w", 2): {12}}
    probed = {("w", 1): {10}}
    unprobed, closed = coverage(used, probed, alive={11})
    assert unprobed == {("w", 1): {11}}
    assert closed == {("w", 2): {12}}
    assert coverage(used, {("w", 1): {10, 11}, ("w", 2): {12}}, alive={10, 11, 12}) == ({}, {})
