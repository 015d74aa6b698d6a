"""The shipped Prometheus rules file, checked and unit-tested with ``promtool``.

``promtool check rules`` parses every rule; ``promtool test rules`` runs
``rules_test.yml`` beside this module, whose input series reproduce what made
earlier alerts miss (a task with failures and no success series, refused tasks
in a series that is born above zero) or fire falsely (old refusals after a gap
in Prometheus's data) and which states, for every alert, when it fires and
when it must not.  Debian's ``prometheus`` package provides
``promtool`` (``.ci/run`` installs it); without it these tests skip, and fail
under ``CI=true``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tenant_celery import metrics
from tests._rig.env import unavailable

HERE = Path(__file__).parent
UNIT_TESTS = HERE / "rules_test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        unavailable("promtool", "not on PATH (Debian: apt-get install prometheus)")
    return found


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_rules_file_is_in_the_package() -> None:
    assert metrics.RULES_FILE.is_file()
    assert metrics.RULES_FILE.parent.parent == Path(metrics.__file__).parent
    # The unit tests load the same file the package ships.
    (loaded,) = yaml.safe_load(UNIT_TESTS.read_text())["rule_files"]
    assert (HERE / loaded).resolve() == metrics.RULES_FILE.resolve()


def test_promtool_check_rules(promtool: str) -> None:
    checked = run(promtool, "check", "rules", metrics.RULES_FILE)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_promtool_test_rules(promtool: str) -> None:
    tested = run(promtool, "test", "rules", UNIT_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def rules() -> list[dict[str, str]]:
    groups = yaml.safe_load(metrics.RULES_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_is_shown_firing_and_silent() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    outcomes: dict[str, set[bool]] = {}
    for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            outcomes.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    assert outcomes == {alert: {True, False} for alert in alerts}


def test_the_rules_read_the_package_metrics() -> None:
    used = {name for rule in rules() for name in re.findall(r"(?<![\w:])celery_\w+", rule["expr"])}
    constants = {getattr(metrics, name) for name in metrics.__all__ if name.isupper()}
    assert used
    assert {re.sub(r"_bucket$", "", name) for name in used} <= constants
