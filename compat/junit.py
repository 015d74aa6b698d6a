"""Per-test outcomes read from pytest's JUnit XML, and the tests two runs disagree on.

A test is named ``<classname>::<name>`` as the XML gives them
(``t.integration.test_canvas.test_chain::test_simple_chain``).  Its outcome is
the worst of what the XML records for it, in the order of :data:`OUTCOMES`:
a test that passed but failed in teardown is an ``error``, as pytest's summary
counts it; an expected failure (``xfail``) is ``xfailed``, while an unexpected
pass (``XPASS``, not strict) is written, and so read, as ``passed``; a test
pytest-rerunfailures ran again is judged by its last run.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

OUTCOMES = ("failed", "error", "passed", "xfailed", "skipped")
"""Every outcome, the worst first."""


@dataclass(frozen=True)
class Results:
    """One run's outcomes and the time pytest reported for it."""

    outcomes: dict[str, str]
    seconds: float

    def counts(self) -> dict[str, int]:
        """How many tests had each outcome (every outcome listed, zeros included)."""
        counted = Counter(self.outcomes.values())
        return {outcome: counted[outcome] for outcome in OUTCOMES}


@dataclass(frozen=True)
class Difference:
    """A test whose outcome differs between two runs (``None``: not in that run)."""

    test: str
    first: str | None
    second: str | None


def _outcome(case: ET.Element) -> str:
    tags = {child.tag for child in case}
    if "failure" in tags:
        return "failed"
    if "error" in tags:
        return "error"
    skipped = case.find("skipped")
    if skipped is not None:
        return "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
    return "passed"


def read_results(path: Path) -> Results:
    """The outcome of every test in the JUnit XML file at ``path``.

    Raises:
        ValueError: there is no such file, it is not XML, or it holds no test
            case (the run did not get as far).
    """
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise ValueError(f"{path}: no JUnit XML ({exc})") from exc
    outcomes: dict[str, str] = {}
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = _outcome(case)
        if test in outcomes:  # the same test recorded twice: keep the worse outcome
            outcome = min(outcome, outcomes[test], key=OUTCOMES.index)
        outcomes[test] = outcome
    if not outcomes:
        raise ValueError(f"{path} records no test")
    seconds = sum(float(suite.get("time", 0)) for suite in root.iter("testsuite"))
    return Results(outcomes, seconds)


def differences(first: Results, second: Results) -> list[Difference]:
    """The tests whose outcome differs between two runs, or that only one of them ran."""
    tests = sorted(first.outcomes.keys() | second.outcomes.keys())
    return [
        Difference(test, first.outcomes.get(test), second.outcomes.get(test))
        for test in tests
        if first.outcomes.get(test) != second.outcomes.get(test)
    ]
