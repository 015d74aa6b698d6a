"""The reliability suite, run at its smoke size as a user runs it: ``python -m reliability``.

Every part must have run against the real services, counted something, and
found no violation: no cross-tenant observation, no lost write, no task
unaccounted for, every transaction a task left open rolled back, every fault
survived, every hostile case (replay routes through real workers included)
refused, no tenant setting left on a pooled connection.

The suite's zeros must be able to be otherwise.  The unit tests
(``tests/unit/test_reliability_*.py``) feed its analysis fabricated records;
the last two tests here break the setup for real and check the load and the
leak probe report it: workers connected as a ``BYPASSRLS`` role, and a tenant
left on every connection as the app role's session default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from benchmarks._scratch import Scratch, connect, scratch
from reliability import leaks, load
from reliability._common import ReliabilityContext
from reliability.runner import _redis_base

from tests._rig.postgres import PgCluster, render

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["load", "leaks", "faults", "hostile"]

pytestmark = pytest.mark.worker


@pytest.mark.timeout(1500)
def test_reliability_suite_passes_at_smoke_size(
    pg_cluster: PgCluster, redis_url: str, amqp_url: str, tmp_path: Path
) -> None:
    json_path, markdown_path = tmp_path / "reliability.json", tmp_path / "reliability.md"
    environ = {
        **os.environ,
        "TENANT_CELERY_RELIABILITY_DSN": render(pg_cluster.admin_url),
        "TENANT_CELERY_RELIABILITY_REDIS_URL": redis_url,
        "TENANT_CELERY_RELIABILITY_AMQP_URL": amqp_url,
    }
    command = [sys.executable, "-m", "reliability", "--size", "smoke"]
    command += ["--json", str(json_path), "--markdown", str(markdown_path)]
    done = subprocess.run(
        command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=1440, check=False
    )
    output = f"stdout:\n{done.stdout[-8000:]}\nstderr:\n{done.stderr[-8000:]}"
    assert done.returncode == 0, output

    report = json.loads(json_path.read_text())
    sections = report["sections"]
    assert list(sections) == PARTS, output
    for key, section in sections.items():
        assert "not_run" not in section, f"{key}: {section.get('not_run')}"
        assert section["violations"] == [], f"{key}: {section['violations']}"
        assert section["passed"] is True, key
        assert section["tables"], key
        for table in section["tables"]:
            assert table["rows"], f"{key}: {table['title']} has no rows"

    summary = report["summary"]
    assert summary["passed"] is True
    assert summary["violations"] == []
    tally = summary["tally"]
    assert tally["cross_tenant_observations"] == 0
    assert tally["lost_writes"] == 0
    assert tally["tasks_unaccounted"] == 0
    assert tally["leaked_settings"] == 0
    # ... and each zero was earned: something was counted
    assert tally["tasks_run"] >= 300
    assert tally["tenants"] >= 20
    assert {"prefork 2", "threads 4", "solo"} <= set(tally["pools"])
    assert {
        "Redis",
        "PostgreSQL (tenant-celery transport)",
        "PostgreSQL (kombu SQLAlchemy)",
    } <= set(tally["brokers"])
    assert tally["connections_checked"] > 0
    assert tally["faults_injected"] > 0
    assert tally["faults_survived"] == tally["faults_injected"]
    assert tally["hostile_tried"] > 0
    assert tally["hostile_refused"] == tally["hostile_tried"]

    load = sections["load"]["data"]
    assert load["runs_recorded"] == load["runs_expected"] >= 300
    assert len(load["per_worker"]) == 9  # three brokers by three pools
    for label, counts in load["per_worker"].items():
        for kind in ("read", "write", "child", "link", "retry"):
            assert counts.get(kind, 0) > 0, f"{label} ran no {kind}"
    # the host app's scoped_session was left in a transaction, and each was rolled back
    assert load["transactions_left_open"] == load["rolled_back_at_task_end"] > 0
    assert (load["not_rolled_back"], load["unexpected_rollbacks"]) == (0, 0)
    leaks = sections["leaks"]["data"]
    assert leaks["connections_used_by_tenant_tasks"] > 0
    assert leaks["not_read"] == 0
    replayed = sections["hostile"]["data"]["replay_routes"]
    workers = [
        f"{kind}, PostgreSQL (tenant-celery transport) worker" if tcpg else f"{kind}, Redis worker"
        for kind in ("signed", "unsigned")
        for tcpg in (False, True)
    ]
    assert set(replayed["routes"]) == set(workers)
    for worker in workers:
        assert replayed["routes"][worker], worker
        for name, counts in replayed["routes"][worker].items():
            assert counts["tried"] > 0, (worker, name)
            assert counts["failed"] == 0, (worker, name, replayed["failures"])
            assert counts["refused"] == counts["wrote_nothing"] == counts["tried"], (worker, name)
    # ... and where nothing refuses a route, the rig saw it run
    for worker, controls in replayed["controls"].items():
        for name, counts in controls.items():
            assert counts["ran_as_designed"] == counts["tried"] > 0, (worker, name)
    assert replayed["lister_calls"] == 0
    faults = sections["faults"]["data"]["faults"]
    on_transport = {f["fault"] for f in faults if f["broker"] == "tcpg" and f["ok"]}
    assert on_transport == {
        "connection killed mid-task",
        "worker SIGKILLed mid-task",
        "worker frozen past its leases",
        "broker partitioned from a worker",
        "PostgreSQL restarted under load",
        "transport connections terminated",
        "publisher SIGKILLed mid-batch",
        "max_connections reached",
    }
    assert set(replayed["pool_processes_lost"].values()) == {0}

    markdown = markdown_path.read_text()
    assert "| cross-tenant observations | 0 | 0 |" in markdown
    for key in PARTS:
        assert f"### {key}: " in markdown, key
    assert report["machine"]["postgresql"]


@contextmanager
def suite_context(
    pg_cluster: PgCluster, redis_url: str, amqp_url: str, tmp_path: Path, *, bypass_rls: bool
) -> Iterator[tuple[ReliabilityContext, Scratch]]:
    """A scratch database and a context as the runner builds them; the workers connect
    as the ``BYPASSRLS`` role instead of the app role when ``bypass_rls``."""
    with scratch(render(pg_cluster.admin_url), rows_per_tenant=0) as db:
        if bypass_rls:  # everything the app role may use, this role may use too
            with connect(db.admin_url) as conn:
                conn.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{db.plain_role}"')
                conn.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{db.plain_role}"')
        ctx = ReliabilityContext(
            size="smoke",
            server_url=db.server_url,
            admin_url=db.admin_url,
            app_url=db.plain_url if bypass_rls else db.app_url,
            app_role=db.plain_role if bypass_rls else db.app_role,
            plain_url=db.plain_url,
            redis_url=_redis_base(redis_url),
            amqp_url=amqp_url,
            run_id=os.urandom(3).hex(),
            workdir=tmp_path,
            parts=("load", "leaks"),
        )
        try:
            yield ctx, db
        finally:
            ctx.close()


@pytest.mark.timeout(600)
def test_the_load_reports_workers_that_bypass_row_level_security(
    pg_cluster: PgCluster, redis_url: str, amqp_url: str, tmp_path: Path
) -> None:
    with suite_context(pg_cluster, redis_url, amqp_url, tmp_path, bypass_rls=True) as (ctx, _):
        section = load.run(ctx, runs_wanted=60)

    assert section.tally.tasks_run >= 60
    # every run saw the other tenants' rows, and says so
    assert section.tally.cross_tenant_observations == section.tally.tasks_run
    assert section.data["foreign_ids_seen"] > section.tally.tasks_run
    assert not section.passed
    assert any("cross-tenant" in v for v in section.all_violations())


@pytest.mark.timeout(600)
def test_the_leak_probe_finds_a_tenant_left_on_the_connections(
    pg_cluster: PgCluster, redis_url: str, amqp_url: str, tmp_path: Path
) -> None:
    with suite_context(pg_cluster, redis_url, amqp_url, tmp_path, bypass_rls=False) as (ctx, db):
        # A session default is what a session-level SET would leave behind: the
        # setting every transaction begins with before the hook sets its own.
        tenant = load.tenants_for(1)[0]
        with connect(db.admin_url) as conn:
            conn.execute(f"ALTER ROLE \"{db.app_role}\" SET app.current_tenant_id = '{tenant}'")
        loaded = load.run(ctx, runs_wanted=60)
        section = leaks.run(ctx)

    assert loaded.passed, loaded.all_violations()  # each transaction still sets its own
    assert section.tally.connections_checked > 0
    assert section.tally.leaked_settings == section.tally.connections_checked
    assert section.data["settings_found"] == [tenant]
    assert not section.passed
