"""The canvas comparison's verdict (``nox -s canvas``): outcomes read from JUnit XML as
pytest writes it, every differing test found, and the two runs' environments.

No service is used: the XML is written by hand, in pytest's form.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from compat import canvas, junit
from compat.canvas_tenant import EVENTS_ENV, tenant_of

CLASS = "t.integration.test_canvas.test_chain"


def junit_xml(tmp_path: Path, name: str, *cases: str, seconds: float = 12.5) -> Path:
    path = tmp_path / f"{name}.xml"
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
        f'<testsuite name="pytest" errors="0" failures="0" skipped="0" tests="{len(cases)}" '
        f'time="{seconds}">{"".join(cases)}</testsuite></testsuites>'
    )
    return path


def case(name: str, body: str = "") -> str:
    return f'<testcase classname="{CLASS}" name="{name}" time="0.1">{body}</testcase>'


def test_each_outcome_pytest_writes_is_read(tmp_path: Path) -> None:
    path = junit_xml(
        tmp_path,
        "run",
        case("test_passes"),
        case("test_fails", '<failure message="assert 1 == 2">trace</failure>'),
        case("test_breaks_in_teardown", '<error message="failed on teardown">trace</error>'),
        case("test_skips", '<skipped type="pytest.skip" message="needs mongo" />'),
        case("test_xfails", '<skipped type="pytest.xfail" message="Issue #6437" />'),
        case("test_params[1-2]"),
    )
    results = junit.read_results(path)
    assert results.outcomes == {
        f"{CLASS}::test_passes": "passed",
        f"{CLASS}::test_fails": "failed",
        f"{CLASS}::test_breaks_in_teardown": "error",
        f"{CLASS}::test_skips": "skipped",
        f"{CLASS}::test_xfails": "xfailed",
        f"{CLASS}::test_params[1-2]": "passed",
    }
    assert results.counts() == {"failed": 1, "error": 1, "passed": 2, "xfailed": 1, "skipped": 1}
    assert results.seconds == 12.5


def test_a_test_recorded_twice_keeps_its_worse_outcome(tmp_path: Path) -> None:
    path = junit_xml(
        tmp_path,
        "run",
        case("test_twice"),
        case("test_twice", '<failure message="subtest failed" />'),
        case("test_twice"),
    )
    assert junit.read_results(path).outcomes == {f"{CLASS}::test_twice": "failed"}


def test_a_failure_with_a_teardown_error_is_a_failure(tmp_path: Path) -> None:
    body = '<failure message="boom" /><error message="failed on teardown" />'
    path = junit_xml(tmp_path, "run", case("test_both", body))
    assert junit.read_results(path).outcomes == {f"{CLASS}::test_both": "failed"}


@pytest.mark.parametrize("content", [None, "", "<testsuites></testsuites>"])
def test_a_run_that_recorded_no_test_is_refused(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "run.xml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=r"run\.xml"):
        junit.read_results(path)


def test_every_differing_test_is_found_and_only_those() -> None:
    plain = junit.Results(
        {"a": "passed", "b": "xfailed", "c": "skipped", "d": "passed", "e": "failed"}, 1.0
    )
    tenant = junit.Results(
        {"a": "passed", "b": "passed", "c": "skipped", "e": "failed", "f": "passed"}, 2.0
    )
    assert junit.differences(plain, tenant) == [
        junit.Difference("b", "xfailed", "passed"),
        junit.Difference("d", "passed", None),
        junit.Difference("f", None, "passed"),
    ]
    assert junit.differences(plain, plain) == []


def test_only_the_tenant_run_gets_keys_and_neither_the_callers_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TENANT_CELERY_HEADER_SIGNING_KEYS", "k" * 40)
    monkeypatch.setenv("TENANT_CELERY_HEADER", "org")
    events = tmp_path / "events.tsv"
    plain = canvas.suite_environment(24000, tenant=False, events=events)
    tenant = canvas.suite_environment(24000, tenant=True, events=events)
    for environ in (plain, tenant):
        assert environ["TEST_BROKER"] == environ["TEST_BACKEND"] == "redis://127.0.0.1:24000/0"
        assert (environ["REDIS_HOST"], environ["REDIS_PORT"]) == ("127.0.0.1", "24000")
        assert "TENANT_CELERY_HEADER" not in environ
    assert "TENANT_CELERY_HEADER_SIGNING_KEYS" not in plain
    assert EVENTS_ENV not in plain
    key = tenant["TENANT_CELERY_HEADER_SIGNING_KEYS"]
    assert len(key.encode()) >= 32
    assert "," not in key
    again = canvas.suite_environment(24000, tenant=True, events=events)
    assert again["TENANT_CELERY_HEADER_SIGNING_KEYS"] != key  # fresh keys every run
    assert tenant[EVENTS_ENV] == str(events)


def test_the_tenant_plugin_loads_after_celerys_fixtures(tmp_path: Path) -> None:
    plain = canvas.pytest_command(tmp_path / "p.xml", tenant=False, extra=["-k", "chord"])
    tenant = canvas.pytest_command(tmp_path / "t.xml", tenant=True, extra=[])
    assert "compat.canvas_tenant" not in plain
    assert plain[-2:] == ["-k", "chord"]
    assert tenant.index("compat.canvas_tenant") > tenant.index("celery.contrib.pytest")
    assert "no:tenant_celery" in plain
    assert "no:tenant_celery" in tenant


def test_each_test_has_a_tenant_of_its_own_on_every_run() -> None:
    first = tenant_of("t/integration/test_canvas.py::test_chain::test_simple_chain")
    assert first == tenant_of("t/integration/test_canvas.py::test_chain::test_simple_chain")
    assert first != tenant_of("t/integration/test_canvas.py::test_chord::test_simple_chord")


def test_the_worker_events_are_counted(tmp_path: Path) -> None:
    events = tmp_path / "events.tsv"
    events.write_text(
        "entered\tt1\tt.integration.tasks.add\n"
        "entered\tt1\tt.integration.tasks.add\n"
        "entered\tt2\tt.integration.tasks.identity\n"
        "rejected\tunsigned\tt.integration.tasks.add\n"
    )
    assert canvas.tenant_events(events) == {
        "entered": 3,
        "tenants": 2,
        "refused": {"unsigned": 1},
    }
    assert canvas.tenant_events(tmp_path / "none.tsv") == {
        "entered": 0,
        "tenants": 0,
        "refused": {},
    }
