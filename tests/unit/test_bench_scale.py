"""The scale benchmark's arithmetic and table (``benchmarks/scale.py``), without running it."""

from __future__ import annotations

import math
from typing import Any

import pytest
from benchmarks import scale

from tenant_celery.transport import CLAIM_SECONDS_BUCKETS


def test_bucket_quantile_interpolates_within_the_bucket() -> None:
    # 10 claims up to 1 ms, 10 more up to 2 ms: the median is the 1 ms bound, the
    # 75th percentile halfway into the second bucket.
    cumulative = {0.001: 10.0, 0.002: 20.0, math.inf: 20.0}
    assert scale.bucket_quantile(cumulative, 0.5) == pytest.approx(0.001)
    assert scale.bucket_quantile(cumulative, 0.75) == pytest.approx(0.0015)
    assert scale.bucket_quantile(cumulative, 0.25) == pytest.approx(0.0005)
    assert math.isnan(scale.bucket_quantile({0.001: 0.0, math.inf: 0.0}, 0.5))
    # Past the last finite bound: the bound, not infinity.
    assert scale.bucket_quantile({0.001: 1.0, math.inf: 3.0}, 0.95) == 0.001


def test_claims_delta_adds_up_the_workers_growth() -> None:
    def counters(claims: float, le_1ms: float) -> dict[str, Any]:
        buckets = dict.fromkeys(CLAIM_SECONDS_BUCKETS, claims)
        buckets[0.001] = le_1ms
        return {"claims": claims, "empty": 1.0, "messages": 2 * claims, "seconds": claims / 1000,
                "buckets": buckets}  # fmt: skip

    delta = scale.claims_delta(
        [counters(10, 4), counters(0, 0)], [counters(30, 14), counters(5, 5)]
    )
    assert delta["claims"] == 25
    assert delta["messages"] == 50
    assert delta["empty"] == 0
    assert delta["buckets"][0.001] == 15
    assert delta["buckets"][math.inf] == 25


def run(tasks_per_second: float, own: bool) -> dict[str, Any]:
    found: dict[str, Any] = {
        "tasks": 1000,
        "seconds": 1000 / tasks_per_second,
        "tasks_per_second": tasks_per_second,
        "cpu_seconds": {"postgres": 0.3, "redis": 0.1, "workers": 1.2},
        "machine_busy": 0.9,
        "wal": {"bytes": 1024 * 1000, "records": 0, "writes": 0, "syncs": 10},
        "lock_wait_share": 0.02 if own else math.nan,
    }
    if own:
        found["claims"] = {"claims": 500, "empty": 100, "messages": 1000, "p50_ms": 1.0,
                           "p95_ms": 3.0}  # fmt: skip
    return found


def test_curve_rows_are_the_medians_per_broker_and_worker_count() -> None:
    runs = {
        "transport": {1: [run(500, True), run(700, True), run(600, True)], 2: [run(900, True)]},
        "redis": {1: [run(400, False)], 2: [run(800, False)]},
    }
    rows = scale.curve_rows(runs)
    assert [(r[0], r[1]) for r in rows] == [
        (scale.LABELS["transport"], 1),
        (scale.LABELS["redis"], 1),
        (scale.LABELS["transport"], 2),
        (scale.LABELS["redis"], 2),
    ]
    columns = scale.CURVE_COLUMNS
    first = dict(zip(columns, rows[0], strict=True))
    assert first["tasks/s"] == 600
    assert first["PostgreSQL CPU µs/task"] == 300.0  # 0.3 s over 1,000 tasks
    assert first["workers CPU µs/task"] == 1200.0
    assert first["machine busy %"] == 90.0
    assert first["messages/claim"] == 2.0
    assert first["empty claims %"] == 20.0
    assert first["lock waits %"] == 2.0
    assert first["WAL kB/task"] == 1.0
    redis = dict(zip(columns, rows[1], strict=True))
    # The transport's own counters have no meaning on Redis: left empty.
    assert redis["claim p95 ms"] is None
    assert redis["lock waits %"] is None
    assert redis["WAL kB/task"] == 1.0
