"""The benchmark suite, run at its smoke size as a user runs it: ``python -m benchmarks``.

Nothing is asserted about time: only that every benchmark ran against the real
services, wrote numbers, and that what the numbers rest on holds (the tenant
task runs exactly one statement more than the plain one, the observability
worker really logged JSON, every broker and pool was measured, tenant B's
fairness probes were sent while tenant A's backlog was waiting).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests._rig.postgres import PgCluster, render

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {"p1", "p2", "p3", "p3-events", "p4", "p5", "results", "guard", "scale", "soak"}

pytestmark = pytest.mark.worker


def numbers(table: dict[str, Any]) -> list[float]:
    return [
        cell
        for row in table["rows"]
        for cell in row
        if isinstance(cell, int | float) and not isinstance(cell, bool)
    ]


@pytest.mark.timeout(900)
def test_benchmarks_run_at_smoke_size(
    pg_cluster: PgCluster, redis_url: str, amqp_url: str, tmp_path: Path
) -> None:
    json_path, markdown_path = tmp_path / "bench.json", tmp_path / "bench.md"
    environ = {
        **os.environ,
        "TENANT_CELERY_BENCH_DSN": render(pg_cluster.admin_url),
        "TENANT_CELERY_BENCH_REDIS_URL": redis_url,
        "TENANT_CELERY_BENCH_AMQP_URL": amqp_url,
    }
    command = [sys.executable, "-m", "benchmarks", "--size", "smoke"]
    command += ["--json", str(json_path), "--markdown", str(markdown_path)]
    done = subprocess.run(
        command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=840, check=False
    )
    output = f"stdout:\n{done.stdout[-6000:]}\nstderr:\n{done.stderr[-6000:]}"
    assert done.returncode == 0, output

    report = json.loads(json_path.read_text())
    sections = report["sections"]
    assert set(sections) == SECTIONS, output
    for key, section in sections.items():
        assert "tables" in section, f"{key}: {section}"
        assert section["tables"], key
        for table in section["tables"]:
            assert table["rows"], f"{key}: {table['title']} has no rows"
            assert any(n > 0 for n in numbers(table)), f"{key}: {table['title']} has no numbers"
            assert f"**{table['title']}**" in markdown_path.read_text(), table["title"]

    machine = report["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["postgresql"]
    assert machine["packages"]["celery"]

    p1 = sections["p1"]["data"]
    assert p1["extra_statements"] == {"psycopg": 0, "psycopg2": 0}
    counted = {"plain": 2, "tenant": 2, "own_statement": 3, "task_only": 2, "no_policy": 2}
    assert p1["statements_per_task"] == {"psycopg": counted, "psycopg2": counted}
    for driver in ("psycopg", "psycopg2"):  # counted on the wire
        trips = p1["round_trips_per_task"][driver]
        for variant in ("tenant", "task_only", "no_policy"):
            assert trips[variant] == trips["plain"], (driver, variant)
        assert trips["own_statement"] == trips["plain"] + 1, driver
    layers = {"worker": {"tenant", "task_only", "no_policy"}, "apply": {"tenant", "own_statement"}}
    for path, variants in layers.items():
        assert set(p1["ratios_to_plain"][path]) == variants, path
        assert all(ratio > 0 for ratio in p1["ratios_to_plain"][path].values()), path
        for variant in ("plain", *variants):
            assert all(r > 0 for r in p1[path]["per_second"][variant]), (path, variant)
            assert p1[path]["body_us_median"][variant] > 0, (path, variant)
    assert p1["ratio_end_to_end"] == p1["ratios_to_plain"]["worker"]["tenant"]
    note = next(n for n in sections["p1"]["tables"][0]["notes"] if n.startswith("layers"))
    assert note.split("takes off the ratio: ", 1)[1].startswith("worker: the task's own work ")

    p3 = sections["p3"]["data"]["results"]
    assert set(p3) == {
        "redis+redis",
        "redis+postgres",
        "redis+pooled",
        "postgres+postgres",
        "tcpg+pooled",
        "tcpg+pooled-async",
        "rabbitmq+postgres",
    }
    for transport, pools in p3.items():
        assert set(pools) == {"prefork", "solo"}, transport
        assert all(found["tasks_per_second"] > 0 for found in pools.values()), transport

    # Events on against off: the monitor hears 3 events per task, and on the
    # package's transport each task is the only row stored (events are not).
    events = sections["p3-events"]["data"]["results"]
    assert set(events) == {"tcpg+pooled", "redis+redis"}
    for broker, variants in events.items():
        assert set(variants) == {"off", "on", "on+listener"}, broker
        assert all(n == 3.0 for n in variants["on+listener"]["events_per_task_runs"]), broker
    assert all(r == 1.0 for v in events["tcpg+pooled"].values() for r in v["rows_per_task_runs"])

    p4 = sections["p4"]["data"]
    assert all(r > 0 for runs in p4["tasks_per_second"].values() for r in runs)
    assert p4["json_log_lines"] > 0, "the observability worker did not log JSON"

    p5 = sections["p5"]["data"]["results"]
    assert set(p5) == {
        "tcpg+pooled prefetch default",
        "tcpg+pooled prefetch default tenant_inflight_limit 2",
        "tcpg+pooled prefetch 1",
        "tcpg+pooled prefetch 1 acks_late, tenant_inflight_limit 1",
        "redis+redis prefetch default",
    }
    capped = p5["tcpg+pooled prefetch 1 acks_late, tenant_inflight_limit 1"]["settings"]
    assert capped == {
        "task_acks_late": True,
        "broker_transport_options": {"tenant_inflight_limit": 1},
    }
    waiting = p5["tcpg+pooled prefetch default tenant_inflight_limit 2"]["settings"]
    assert waiting == {"broker_transport_options": {"tenant_inflight_limit": 2}}
    for case, found in p5.items():
        assert len(found["busy_ms"]) == len(found["idle_ms"]) == found["probes"] > 0, case
        assert all(ms > 0 for ms in found["busy_ms"] + found["idle_ms"]), case
        # The probes met a backlog: A had tasks waiting when B's first one was sent.
        assert found["a_waiting_at_first_probe"] > 0, case

    guard = sections["guard"]["data"]
    for variant in ("unbound", "no-op listener", "bound"):
        assert all(us > 0 for us in guard["cpu"]["cpu_us"][variant]), variant
    assert guard["check_alone_ns"] > 0
    trips = guard["round_trips"]
    # Counted on the wire.  The bound engine's setting rides with BEGIN, in a tenant
    # or outside any ('' set): no round trip added to a transaction, one fewer than
    # set_tenant_guc by hand; a raw checkout costs one more (its reset at check-in).
    in_tenant = trips["transaction in a tenant, one query"]
    assert in_tenant["bound"] == in_tenant["plain"]
    assert in_tenant["by hand"] == in_tenant["plain"] + 1
    outside = trips["transaction outside any tenant, one query"]
    assert outside["bound"] == outside["plain"]
    raw = trips["raw DBAPI checkout, one query"]
    assert raw["bound"] == raw["plain"] + 1
    assert all(guard["round_trips_expected"].values()), guard["round_trips_expected"]

    scale = sections["scale"]["data"]
    assert set(scale["runs"]) == {"transport", "redis"}
    for broker, by_workers in scale["runs"].items():
        assert set(by_workers) == {str(n) for n in scale["workers"]}, broker
        for found in (run for runs in by_workers.values() for run in runs):
            assert found["tasks_per_second"] > 0, broker
            assert found["cpu_seconds"]["workers"] > 0, broker
    for found in (run for runs in scale["runs"]["transport"].values() for run in runs):
        # The workers' own counters, read from their monitors: every task was claimed
        # once, by claims the counters saw.
        claims = found["claims"]
        assert claims["messages"] >= found["tasks"], claims
        assert claims["claims"] > claims["empty"] >= 0, claims
    idle = {w["label"]: w for w in scale["wakeups"]}
    assert (
        idle["no LISTEN, poll every 100 ms"]["claims_per_second"]
        > (idle["no LISTEN, poll every 1 s"]["claims_per_second"])
    )
    assert all(w["connections"]["main"] > 0 for w in scale["wakeups"])

    # The soak, seconds long at this size: every task published was run and its row
    # deleted, and each sample read the table, the workers and their connections.
    soak = sections["soak"]["data"]
    samples = soak["samples"]
    assert len(samples) >= 2
    assert soak["verdict"]["tasks"] == soak["tasks_asked"] > 0
    assert samples[-1]["published"] == samples[-1]["done"] == soak["tasks_asked"]
    assert samples[-1]["queued"] == 0
    for found in samples:
        assert found["total_bytes"] >= found["heap_bytes"] > 0
        assert set(found["index_bytes"]) >= {"tenant_celery_message_pkey"}
        assert found["broker_connections"] > 0
        for worker in found["workers"]:
            assert min(worker["rss_kb"], worker["fds"]) > 0
