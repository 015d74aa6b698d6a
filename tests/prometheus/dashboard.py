"""The shipped Grafana dashboard as the tests read it: panels, queries, variables.

:func:`substitute` does what Grafana does to a query before it sends it to
Prometheus: it replaces the dashboard's variables (``$name``, ``${name}``,
``${name:format}``, ``[[name]]``) and Grafana's own (``$__rate_interval``...).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tenant_celery import metrics

#: A variable reference in Grafana's three syntaxes.
VARIABLE = re.compile(r"\$\{(?P<braced>\w+)(?::\w+)?\}|\$(?P<plain>\w+)|\[\[(?P<old>\w+)\]\]")
#: ``label_values(<selector>, <label>)``: a Prometheus query variable.
LABEL_VALUES = re.compile(r"label_values\((?P<selector>.*),\s*(?P<label>\w+)\)", re.DOTALL)
#: The datasource every panel and query names: the dashboard's variable.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def load() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(metrics.DASHBOARD_FILE.read_text())
    return loaded


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


@dataclass(frozen=True)
class Target:
    panel: str
    ref_id: str
    expr: str
    legend: str

    def __str__(self) -> str:
        return f"panel {self.panel!r}, query {self.ref_id}"


def targets(dashboard: Mapping[str, Any]) -> list[Target]:
    return [
        Target(panel["title"], target["refId"], target["expr"], target.get("legendFormat", ""))
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def variable_query(variable: Mapping[str, Any]) -> tuple[str, str]:
    """``(selector, label)`` of a ``label_values`` query variable."""
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    match = LABEL_VALUES.fullmatch(text.strip())
    assert match is not None, f"variable {variable['name']}: {text!r} is not label_values(...)"
    return match["selector"].strip(), match["label"]


def referenced(text: str) -> set[str]:
    """Names of the variables ``text`` uses."""
    return {next(filter(None, m.groups())) for m in VARIABLE.finditer(text)}


def substitute(text: str, values: Mapping[str, str]) -> str:
    """``text`` with every variable replaced from ``values`` (a KeyError names a missing one)."""
    return VARIABLE.sub(lambda m: values[next(filter(None, m.groups()))], text)
