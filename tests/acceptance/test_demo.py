"""``tenant-celery demo`` run as a user runs it: a subprocess, on the rig's server and embedded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._rig.postgres import PgCluster, render

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.worker

#: Rows (and tasks) each tenant gets: plain calls, a 3-step chain and one fan-out message.
EXPECTED = {"alpha": 2 + 3 + 1, "bravo": 3 + 3 + 1, "charlie": 4 + 3 + 1}
TENANT_ROW = re.compile(
    r"^\s+(?P<name>alpha|bravo|charlie)\s+(?P<id>[0-9a-f-]{36})\s+(?P<written>\d+)"
    r"\s+(?P<visible>\d+)\s+(?P<tasks>\d+)\s*$",
    re.MULTILINE,
)


def demo(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``python -m tenant_celery.cli demo ARGS``; return the process and its seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANT_CELERY_")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tenant_celery.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )
    return done, time.monotonic() - started


def assert_isolated_report(done: subprocess.CompletedProcess[str], seconds: float) -> None:
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out}\n{done.stderr}"
    rows = {m["name"]: m for m in TENANT_ROW.finditer(out)}
    assert set(rows) == set(EXPECTED), out
    assert len({m["id"] for m in rows.values()}) == 3
    for name, expected in EXPECTED.items():
        row = rows[name]
        # Each tenant sees exactly the rows written for it, and ran as many tasks.
        assert int(row["written"]) == expected, out
        assert int(row["visible"]) == expected, out
        assert int(row["tasks"]) == expected, out
    assert "rows visible with no tenant set: 0" in out
    health = re.search(r"^GET /health -> (\d+) (\{.*\})$", out, re.MULTILINE)
    assert health is not None, out
    assert health[1] == "200"
    assert json.loads(health[2]) == {"status": "ok", "broker": "ok", "database": "ok"}
    totals = dict(re.findall(r"^\s+(celery_task_\w+_total)\s+(\d+)$", out, re.MULTILINE))
    total = sum(EXPECTED.values())
    assert totals == {
        "celery_task_started_total": str(total + 1),  # the refused task counts as started
        "celery_task_success_total": str(total),
        "celery_task_failure_total": "0",
        "celery_task_retry_total": "0",
        "celery_task_rejected_total": "1",
    }, out
    assert "refused (TenantContextMissing)" in out
    assert seconds < 60, f"the demo took {seconds:.1f}s"


def test_demo_on_an_existing_server(pg_cluster: PgCluster) -> None:
    done, seconds = demo("--dsn", render(pg_cluster.admin_url))
    assert_isolated_report(done, seconds)
    assert "using the server at" in done.stdout
    # Everything it made is gone: its database and its role.
    made = re.search(r"created database (\S+) and role (\S+) ", done.stdout)
    assert made is not None, done.stdout
    with pg_cluster.connect() as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname = %s"
            " UNION ALL SELECT rolname FROM pg_roles WHERE rolname = %s",
            (made[1], made[2]),
        ).fetchall()
    assert left == []


def test_demo_with_no_arguments_starts_an_embedded_server() -> None:
    done, seconds = demo()
    assert_isolated_report(done, seconds)
    assert "starting an embedded PostgreSQL" in done.stdout
    assert "and the embedded server" in done.stdout


def test_demo_refuses_a_dsn_that_does_not_connect() -> None:
    done, _ = demo("--dsn", "postgresql://nobody@127.0.0.1:1/postgres")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("tenant-celery demo: error: ")
