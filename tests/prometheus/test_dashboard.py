"""The shipped Grafana dashboard: in the package and the wheel, importable, reading
the package's metrics through its variables, and documented panel by panel.

Whether its queries return data is checked against a real Prometheus in
``test_scraped_worker.py``; Grafana itself is not available to the tests, so what
makes a file importable is checked here, field by field.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tenant_celery import metrics, monitor
from tests.docs.blocks import page_blocks

from . import dashboard

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "howto" / "monitoring.md"
#: Variables Grafana defines itself.
BUILTIN = {"__rate_interval", "__interval", "__range"}
#: The dashboard schema Grafana 11.6 and 12 write (36, of Grafana 9, made data sources
#: references; Grafana upgrades an older schema when it loads a dashboard).
SCHEMA_VERSION = 41
GRID_COLUMNS = 24
TASK_METRICS = [
    metrics.TASK_STARTED_TOTAL,
    metrics.TASK_SUCCESS_TOTAL,
    metrics.TASK_FAILURE_TOTAL,
    metrics.TASK_RETRY_TOTAL,
    metrics.TASK_REJECTED_TOTAL,
    metrics.TASK_DURATION_SECONDS + "_bucket",
]


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    """The shipped dashboard, parsed."""
    return dashboard.load()


def test_the_dashboard_is_in_the_package(board: dict[str, Any]) -> None:
    assert metrics.DASHBOARD_FILE.parent == metrics.RULES_FILE.parent
    assert metrics.DASHBOARD_FILE.parent.parent == Path(metrics.__file__).parent
    assert board["title"]


def test_the_wheel_ships_the_rules_and_the_dashboard(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), ROOT],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("tenant_celery-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for shipped in (metrics.RULES_FILE, metrics.DASHBOARD_FILE):
            name = f"tenant_celery/prometheus/{shipped.name}"
            assert archive.read(name) == shipped.read_bytes(), name


def test_the_dashboard_can_be_imported(board: dict[str, Any]) -> None:
    assert board["schemaVersion"] >= SCHEMA_VERSION
    assert board["id"] is None  # Grafana gives an imported dashboard its own
    assert re.fullmatch(r"[\w-]{1,40}", board["uid"])
    assert "__inputs" not in board  # the data source is a variable, chosen at will
    source = dashboard.variables(board)["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    ids = [panel["id"] for panel in dashboard.panels(board)]
    assert len(ids) == len(set(ids))
    for panel in dashboard.panels(board):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == dashboard.DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == dashboard.DATASOURCE, panel["title"]
    for variable in dashboard.variables(board).values():
        if variable["type"] == "query":
            assert variable["datasource"] == dashboard.DATASOURCE, variable["name"]


def test_no_two_panels_overlap(board: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, (panel["title"], cells[x, y])
                cells[x, y] = panel["title"]


def test_every_variable_is_defined_and_used(board: dict[str, Any]) -> None:
    defined = set(dashboard.variables(board))
    used: set[str] = set()
    for panel in dashboard.panels(board):
        used |= dashboard.referenced(panel["title"] + panel.get("description", ""))
        for target in panel.get("targets", []):
            used |= dashboard.referenced(target["expr"])
        used |= dashboard.referenced(panel.get("datasource", {}).get("uid", ""))
    for variable in dashboard.variables(board).values():
        if variable["type"] == "query":
            used |= dashboard.referenced(dashboard.variable_query(variable)[0])
    assert used - BUILTIN == defined


def test_every_query_is_filtered_by_the_variables(board: dict[str, Any]) -> None:
    """Each selector of a task series names the job, task and tenant variables, and
    each of a queue series the job and queue ones, so that picking a value narrows
    every panel.  A variable of several values is matched as a regex (``=~``)."""
    for target in dashboard.targets(board):
        for metric, matchers in re.findall(r"\b(celery_\w+|up)\{([^}]*)\}", target.expr):
            found = set(re.findall(r"\w+=~?\"[^\"]*\"", matchers))
            wanted = {'job="$job"'}
            if metric.startswith("celery_task_"):
                wanted |= {'task_name=~"$task_name"', 'tenant=~"$tenant"'}
            elif metric == metrics.QUEUE_LENGTH:
                wanted |= {'queue=~"$queue"'}
            elif metric == metrics.QUEUE_LENGTH_BY_TENANT:
                wanted |= {'queue=~"$queue"', 'tenant=~"$tenant"'}
            assert found == wanted, f"{target}: {metric}{{{matchers}}}"
        assert not re.search(r"\b(celery_\w+|up)\b(?!\{)", target.expr), target


def test_the_queries_read_the_package_metrics(board: dict[str, Any]) -> None:
    exprs = " ".join(target.expr for target in dashboard.targets(board))
    used = set(re.findall(r"\bcelery_\w+", exprs))
    constants = {
        getattr(module, name)
        for module in (metrics, monitor)
        for name in module.__all__
        if name.isupper()
    }
    assert {re.sub(r"_bucket$", "", name) for name in used} <= constants
    assert {*TASK_METRICS, metrics.QUEUE_LENGTH, metrics.QUEUE_LENGTH_BY_TENANT} <= used


def page_section(title: str) -> str:
    text = PAGE.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : len(text) if end < 0 else end]


def first_column(section: str, header: str) -> list[str]:
    """First cells of the rows of the table whose header row starts with ``header``."""
    lines = section.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"| {header} |")))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip())
    return rows


def test_the_page_lists_every_panel_and_variable(board: dict[str, Any]) -> None:
    section = page_section("Grafana dashboard")
    titles = [p["title"] for p in dashboard.panels(board) if p["type"] != "row"]
    assert first_column(section, "panel") == titles
    labels = [v["label"] for v in dashboard.variables(board).values()]
    assert first_column(section, "variable") == labels


def test_the_page_finds_the_dashboard() -> None:
    (block,) = [b for b in page_blocks("howto/monitoring.md") if "DASHBOARD_FILE" in b.source]
    command, printed = block.source.strip().splitlines()
    words = shlex.split(command.removeprefix("$ "))
    assert words[0] == "python"
    shown = subprocess.run(
        [sys.executable, *words[1:]], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert shown == str(metrics.DASHBOARD_FILE)
    assert printed.startswith("...")
    assert shown.endswith(printed.removeprefix("...").removeprefix("/site-packages"))
