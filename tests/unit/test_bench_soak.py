"""The soak benchmark's arithmetic and tables (``benchmarks/soak.py``), without running it."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from benchmarks import runner, soak

MB = 1024 * 1024


def sample(
    t: float,
    total_mb: float,
    *,
    rss_mb: tuple[float, float] = (90.0, 91.0),
    fds: tuple[int, int] = (15, 15),
    connections: tuple[int, int] = (7, 7),
    autovacuums: int = 0,
    publishing: bool = True,
    done: int | None = None,
) -> dict[str, Any]:
    return {
        "t": t,
        "done": int(500 * t) if done is None else done,
        "heap_bytes": int(0.9 * total_mb * MB),
        "total_bytes": int(total_mb * MB),
        "indexes_bytes": int(0.1 * total_mb * MB),
        "index_bytes": {"pkey": int(0.06 * total_mb * MB), "claim": int(0.04 * total_mb * MB)},
        "live_tuples": 100,
        "dead_tuples": 1000,
        "autovacuum_count": autovacuums,
        "queued": 2000,
        "broker_connections": sum(connections) + 4,
        "workers": [
            {"processes": 1, "rss_kb": int(rss * 1024), "fds": fd, "connections": c}
            for rss, fd, c in zip(rss_mb, fds, connections, strict=True)
        ],
        "publishers": {"processes": 2 if publishing else 0, "rss_kb": 200 * 1024},
    }


def test_series_takes_quarters_of_the_samples() -> None:
    found = soak.series([1, 5, 2, 3, 4, 6, 2, 3])  # quarters of two samples
    assert (found.first, found.low, found.high, found.last) == (1, 1, 6, 3)
    assert found.first_quarter_max == 5
    assert found.last_quarter_max == 3
    assert found.growth == 0.6
    # Fewer than four samples: a quarter is one sample.
    short = soak.series([2, 9])
    assert (short.first_quarter_max, short.last_quarter_max, short.growth) == (2, 9, 4.5)
    assert math.isnan(soak.series([0, 0]).growth)
    with pytest.raises(ValueError, match="no samples"):
        soak.series([])


def test_a_size_that_levels_off_is_bounded() -> None:
    # Grows to 38 MB in the first quarter (3 samples of 12), then swings between vacuums.
    sizes = [0, 20, 38, 40, 30, 39, 31, 38, 32, 39, 30, 41]
    samples = [sample(15 * n, mb, autovacuums=n // 4) for n, mb in enumerate(sizes)]
    found = soak.verdict(samples, tasks=100_000, seconds=200.0)
    assert found["tasks_per_second"] == 500.0
    assert found["autovacuum_runs"] == 2
    assert found["size_growth"] == pytest.approx(41 / 38, abs=0.001)
    assert found["size_bounded"] is True
    assert found["size_max_mb"] == 41.0
    assert found["size_last_mb"] == 41.0


def test_a_size_that_keeps_growing_is_not_bounded() -> None:
    samples = [sample(15 * n, 10.0 * (n + 1)) for n in range(8)]  # no vacuum: 10 MB a sample
    found = soak.verdict(samples, tasks=1000, seconds=120.0)
    assert found["size_growth"] == 4.0  # 80 MB against 20 MB
    assert found["size_bounded"] is False
    assert found["autovacuum_runs"] == 0
    row = dict(zip(soak.VERDICT_COLUMNS, soak.verdict_row(found), strict=True))
    assert row["size bounded"] == "NO"
    assert row["tasks/s by quarter"] == "500 / 500 / 500 / 500"


def test_quarter_rates_are_the_tasks_done_a_second_in_each_quarter() -> None:
    # 12 samples 10 s apart: quarters of three; 100/s, then 200/s from t = 60 s.
    done = [100 * 10 * n if n <= 6 else 6000 + 200 * 10 * (n - 6) for n in range(12)]
    samples = [sample(10.0 * n, 40.0, done=d) for n, d in enumerate(done)]
    # Bounds: samples 0, 3, 6, 9, 11.
    assert soak.quarter_rates(samples) == [100.0, 100.0, 200.0, 200.0]


class _Clock:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_paced_publisher_sends_at_its_rate_and_holds_off_at_the_ceiling() -> None:
    clock = _Clock()
    sent: list[float] = []
    backlog = {"queued": 0}

    def send() -> None:
        sent.append(clock.now)
        clock.now += 0.001  # a publish takes a millisecond
        if len(sent) == 200:
            backlog["queued"] = 10  # the workers fall behind: the ceiling is reached

    def more() -> bool:
        if clock.now >= 4.0:
            backlog["queued"] = 0  # they caught up
        return clock.now < 6.0

    soak._paced(send, lambda: backlog["queued"], more, 100.0, 10, clock, clock.sleep)
    # 100 a second: 200 in the first two seconds, evenly.
    assert sent[199] == pytest.approx(1.99, abs=0.02)
    gaps = [b - a for a, b in itertools.pairwise(sent[:200])]
    assert min(gaps) == pytest.approx(0.01, abs=0.002)
    # The ceiling is seen at the next count of the backlog (every half second), and
    # nothing is sent from then until 4 s; then on at the same pace, with no burst
    # to make up for the pause.
    held = [t for t in sent[200:] if t < 4.0]
    assert len(held) <= 50
    assert all(t < 2.0 + soak._RECOUNT_SECONDS for t in held)
    after = [t for t in sent if t >= 4.0]
    assert after[0] < 4.1
    assert 190 <= len(after) <= 201
    assert min(b - a for a, b in itertools.pairwise(after)) == pytest.approx(0.01, abs=0.002)


def test_worker_growth_is_measured_after_the_first_quarter() -> None:
    rss = [(60.0, 61.0), (90.0, 90.0), (91.0, 90.5), (91.0, 92.5)]
    samples = [
        sample(n, 40.0, rss_mb=r, fds=(15, 15 + n), connections=(7, 7 + (n == 3)))
        for n, r in enumerate(rss)
    ]
    found = soak.verdict(samples, tasks=10, seconds=1.0)
    # The first quarter (the first sample) is the warm-up's 60 MB: growth is against it,
    # the larger of the two workers' (92.5 - 61).
    assert found["rss_growth_mb"] == 31.5
    assert found["rss_first_to_last_mb"] == [[60.0, 91.0], [61.0, 92.5]]
    assert found["fd_growth"] == 3
    assert found["connection_growth"] == 1
    assert found["broker_connections"] == [18, 19]


def test_summary_rows_name_every_series() -> None:
    samples = [sample(15 * n, 40.0, publishing=n < 2) for n in range(4)]
    rows = soak.summary_rows(samples)
    names = [r[0] for r in rows]
    assert names[:3] == ["message table heap, MB", "index pkey, MB", "index claim, MB"]
    assert "worker 2 open fds" in names
    assert names[-1] == "transport connections (pg_stat_activity)"
    assert all(len(r) == len(soak.SUMMARY_COLUMNS) for r in rows)
    total = dict(
        zip(soak.SUMMARY_COLUMNS, rows[names.index("table + indexes + TOAST, MB")], strict=True)
    )
    assert total["max"] == 40.0
    assert total["last/first quarter"] == 1.0
    # The publishers' memory over the samples they were alive in only.
    publishers = rows[names.index("publishers' RSS, MB")]
    assert publishers[1:5] == [200.0, 200.0, 200.0, 200.0]


def test_the_soak_runs_only_when_named_at_the_default_size() -> None:
    assert "soak" in runner.BENCHMARKS
    assert "soak" not in runner._selected(None, "default")
    assert "scale" in runner._selected(None, "default")
    assert runner._selected(None, "smoke") == list(runner.BENCHMARKS)
    assert runner._selected("soak", "default") == ["soak"]


def test_a_run_without_the_soak_keeps_the_last_one() -> None:
    soak_section = {"title": "Soak", "tables": [{"rows": []}], "data": {}}
    previous = {"size": "default", "sections": {"p1": {"tables": []}, "soak": soak_section}}
    report: dict[str, Any] = {"size": "default", "sections": {"p1": {"tables": [1]}}}
    assert runner.carry_over(previous, report) == ["soak"]
    assert report["sections"]["soak"] is soak_section
    assert report["sections"]["p1"] == {"tables": [1]}  # measured now: not replaced
    # Measured in this run, of another size, or failed last time: nothing carried.
    assert runner.carry_over(previous, {"size": "default", "sections": {"soak": {}}}) == []
    assert runner.carry_over(previous, {"size": "smoke", "sections": {}}) == []
    failed = {"size": "default", "sections": {"soak": {"error": "x"}}}
    assert runner.carry_over(failed, {"size": "default", "sections": {}}) == []
