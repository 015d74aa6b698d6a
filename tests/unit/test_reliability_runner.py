"""The reliability runner's verdict: tallies summed, every violation found, the exit status.

No service is used: sections are built by hand, as a part would return them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from reliability import runner
from reliability._common import Section, Tally


def section(key: str, **tally: Any) -> dict[str, Any]:
    built = Section(key=key, title=key.title(), tally=Tally(**tally))
    return built.to_json()


def conclude(tmp_path: Path, sections: dict[str, dict[str, Any]]) -> tuple[int, str, str]:
    report = {"size": "smoke", "machine": {}, "sections": sections}
    out, err = io.StringIO(), io.StringIO()
    status = runner.conclude(report, tmp_path / "r.json", tmp_path / "r.md", out, err)
    return status, out.getvalue(), err.getvalue()


def test_tallies_are_summed_tenants_are_not() -> None:
    total = Tally.total(
        [
            Tally(tasks_run=10, tenants=20, pools=["solo"], brokers=["Redis"]),
            Tally(tasks_run=5, tenants=3, pools=["solo", "threads 4"], brokers=["redis"]),
            Tally(brokers=["rabbitmq", "sqla+postgresql+psycopg://u@h/d"], faults_injected=2),
            Tally(faults_injected=1, faults_survived=3, hostile_tried=7, hostile_refused=7),
        ]
    )
    assert total.tasks_run == 15
    assert total.tenants == 20
    assert total.pools == ["solo", "threads 4"]
    assert total.brokers == ["Redis", "RabbitMQ", "PostgreSQL (kombu SQLAlchemy)"]
    assert (total.faults_injected, total.faults_survived) == (3, 3)
    assert (total.hostile_tried, total.hostile_refused) == (7, 7)


@pytest.mark.parametrize(
    ("tally", "violation"),
    [
        ({"cross_tenant_observations": 1}, "1 cross-tenant observations"),
        ({"lost_writes": 2}, "2 lost writes"),
        ({"tasks_unaccounted": 3}, "3 tasks unaccounted for"),
        ({"faults_injected": 4, "faults_survived": 3}, "1 of 4 faults not survived"),
        ({"hostile_tried": 10, "hostile_refused": 9}, "1 of 10 hostile cases not refused"),
        ({"connections_checked": 5, "leaked_settings": 1}, "1 pooled connections kept"),
    ],
)
def test_each_invariant_violated_fails_the_run(
    tmp_path: Path, tally: dict[str, int], violation: str
) -> None:
    status, out, err = conclude(tmp_path, {"x": section("x", tasks_run=1, **tally)})

    assert status == runner.EXIT_VIOLATED
    assert f"violated: x: {violation}" in err
    assert "INVARIANTS VIOLATED" in out
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["summary"]["passed"] is False
    assert written["sections"]["x"]["passed"] is False


def test_a_section_that_hides_its_violation_still_fails(tmp_path: Path) -> None:
    """The verdict is recomputed from the tally, not taken from the section's word."""
    forged = section("load", tasks_run=100, cross_tenant_observations=1)
    forged["violations"], forged["passed"] = [], True

    status, _, err = conclude(tmp_path, {"load": forged})

    assert status == runner.EXIT_VIOLATED
    assert "load: 1 cross-tenant observations" in err


def test_a_part_s_own_violation_fails_the_run(tmp_path: Path) -> None:
    built = Section(key="leaks", title="Leaks", tally=Tally(connections_checked=0))
    built.require(False, "no pooled connection was read")
    assert not built.passed

    status, _, err = conclude(tmp_path, {"leaks": built.to_json()})

    assert status == runner.EXIT_VIOLATED
    assert "leaks: no pooled connection was read" in err


def test_clean_sections_pass_and_are_written(tmp_path: Path) -> None:
    status, out, err = conclude(
        tmp_path,
        {
            "load": section("load", tasks_run=300, tenants=20, pools=["solo"]),
            "faults": section("faults", faults_injected=4, faults_survived=4),
            "hostile": section("hostile", hostile_tried=50, hostile_refused=50),
        },
    )

    assert (status, err) == (runner.EXIT_OK, "")
    assert "every invariant held" in out
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["summary"]["passed"] is True
    assert written["summary"]["tally"]["faults_survived"] == 4
    markdown = (tmp_path / "r.md").read_text()
    assert "| tasks run | 300 |" in markdown
    assert "### hostile: Hostile" in markdown


def test_no_section_at_all_is_not_a_pass(tmp_path: Path) -> None:
    status, _, _ = conclude(tmp_path, {})
    assert status == runner.EXIT_VIOLATED


def test_a_missing_part_is_reported_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        runner.PARTS, "hostile", ("reliability.not_in_this_checkout", "Hostile input refused", ())
    )
    said: list[str] = []
    ctx: Any = SimpleNamespace(say=said.append)

    found = runner._run_one(ctx, "hostile")

    message = "reliability/not_in_this_checkout.py is not in this checkout"
    assert message in found["not_run"]
    assert any(message in line for line in said)
    status, out, err = conclude(tmp_path, {"hostile": found})
    assert status == runner.EXIT_VIOLATED
    assert message in err
    assert "not run" in out


def test_a_part_that_raises_is_reported_and_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(runner.PARTS, "faults", ("json", "Faults survived", ()))
    ctx: Any = SimpleNamespace(say=lambda line: None)

    found = runner._run_one(ctx, "faults")  # json has no run(): AttributeError

    assert found["passed"] is False
    assert "AttributeError" in found["not_run"]


def test_unknown_parts_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        runner.main(["--only", "load,nonsense"])
    assert exited.value.code == runner.EXIT_UNAVAILABLE
    assert "unknown part nonsense" in capsys.readouterr().err


def test_parts_run_in_their_order_whatever_the_order_asked() -> None:
    assert runner._selected("hostile, load") == ["load", "hostile"]
