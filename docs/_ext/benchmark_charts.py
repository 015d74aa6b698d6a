"""Charts and tables of the benchmark results, drawn when the docs are built.

Two directives read ``benchmarks/results/latest.json`` (the file ``python -m
benchmarks`` writes) and put what it holds on the page::

    ```{benchmark-chart} throughput
    ```

    ```{benchmark-table} targets
    ```

``benchmark-chart`` draws an inline SVG figure (``throughput``, ``fairness``,
``overheads``, ``result-backend``, ``scale``, ``soak``); ``benchmark-table`` builds a
table narrow enough for the page's column (``targets``, ``machine``, ``p1``, ``p1-parts``,
``p2-times``, ``p2-ratios``, ``p2-plans``, ``p2-scan``, ``p3``, ``p3-events``, ``p4``,
``p5-latency``, ``p5-backlog``, ``result-backend``, ``scale``, ``scale-wakeups``, ``soak``,
``soak-series``).  Nothing is typed in by hand: every figure
comes from the JSON, and the build fails (``-W``) when the JSON lacks what a
directive needs.

The SVG is drawn with plain string formatting.  Text and axes use
``currentColor``, so they follow the theme's light or dark foreground; the
series colours are mid-tones that read on both backgrounds.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from benchmarks._common import format_cell
from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective

Json = dict[str, Any]
Cell = str | int | float | None

DEFAULT_RESULTS = "../benchmarks/results/latest.json"

#: Series colours: mid-tones with enough contrast on white and on furo's dark grey.
BLUE = "#4c78a8"
ORANGE = "#e8853a"
GREEN = "#3d9a50"
RED = "#d64545"
GREY = "#8c8c8c"

#: Long names in the benchmark's tables, and what the page calls them.
SHORT_NAMES = {
    "PostgreSQL (tenant_celery.transport)": "the package's transport",
    "PostgreSQL (kombu SQLAlchemy)": "kombu's SQLAlchemy transport",
    "NullPool (Celery's DatabaseBackend)": "Celery's DatabaseBackend (NullPool)",
    "pooled (tenant_celery.results)": "PooledDatabaseBackend",
}


def short(name: str) -> str:
    return SHORT_NAMES.get(name, name)


# ---------------------------------------------------------------------- numbers


def fmt(value: Cell) -> str:
    """A number as the benchmark's Markdown tables print it (the same function)."""
    return format_cell(value)


def fmt_ms(value: float) -> str:
    """Milliseconds, short: 5.9 ms, 20.9 ms, 17.9 s."""
    if value >= 1000:
        return f"{value / 1000:.1f} s"
    return f"{value:.1f} ms"


def pair_ratios(values: Sequence[float], baselines: Sequence[float]) -> list[float]:
    """Each back-to-back pair's ratio, as the benchmark computes its median."""
    return [v / b for v, b in zip(values, baselines, strict=True) if b]


# ------------------------------------------------------------------ the results


class Results:
    """``latest.json``, with errors that say which key is missing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.raw: Json = json.loads(path.read_text(encoding="utf-8"))

    def get(self, *keys: str | int) -> Any:
        node: Any = self.raw
        for depth, key in enumerate(keys):
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                where = ".".join(str(k) for k in keys[: depth + 1])
                raise ExtensionError(f"{self.path}: no {where}") from None
        return node

    def table(self, section: str, index: int = 0) -> Json:
        table: Json = self.get("sections", section, "tables", index)
        return table

    def section(self, section: str) -> Json:
        data: Json = self.get("sections", section, "data")
        return data


@dataclass
class Target:
    """One "against a target of" verdict the benchmark wrote under a table."""

    section: str
    label: str
    value: float
    op: str
    target: float
    met: bool


TARGET_NOTE = re.compile(
    r"^(?P<label>.*?)[: ]*(?:ratio|p95 busy/idle)?\s*(?P<value>[\d.]+)"
    r"(?: \(runs [^)]*\))? against a target of (?P<op>[≥≤]) (?P<target>[\d.]+): "
    r"(?P<verdict>met|NOT met)$"
)


def targets(results: Results) -> list[Target]:
    found: list[Target] = []
    for section, body in results.get("sections").items():
        for table in body.get("tables", []):
            for note in table.get("notes", []):
                match = TARGET_NOTE.match(note)
                if match is None:
                    continue
                value = float(match["value"])
                target = float(match["target"])
                met = value >= target if match["op"] == "≥" else value <= target
                if met != (match["verdict"] == "met"):
                    raise ExtensionError(f"{results.path}: {note!r} does not add up")
                found.append(
                    Target(section, match["label"].strip(" :"), value, match["op"], target, met)
                )
    if not found:
        raise ExtensionError(f"{results.path}: no target verdicts in the tables' notes")
    return found


def target_label(target: Target) -> str:
    """What the summary table calls a target's measurement."""
    if target.section == "p1":
        if target.label.startswith("apply()"):
            return "P1 tenant task / plain task, apply() in process"
        return "P1 tenant task / plain task, end to end"
    if target.section == "p2":
        return "P2 package policy / control, worst query and statement"
    if target.section == "p4":
        return "P4 metrics and JSON logs on / off"
    label = target.label
    for long, brief in SHORT_NAMES.items():
        label = label.replace(long, brief)
    label = label.replace("the package's transport", "transport")
    if target.section == "p3":
        label = label.replace(" + PostgreSQL, pooled", " + pooled results")
        label = label.replace("synchronous_commit off", "sync commit off")
        return f"P3 {label}: tasks/s against Redis + Redis"
    if target.section == "p5":
        return f"P5 {label}: B's p95 busy / idle"
    return f"{target.section.upper()} {label}"


# ------------------------------------------------------------------------ tables


@dataclass
class TableSpec:
    title: str
    header: list[str]
    rows: list[list[Cell | nodes.Node]]
    numeric: list[bool] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*(?:=\S*)?)")


def _prose(text: str) -> nodes.paragraph:
    """A paragraph of a note's text, its command-line flags set as code: literal
    text, which smart quotes never turn into dashes, and which reads as a flag."""
    paragraph = nodes.paragraph(text)
    for index, part in enumerate(_FLAG.split(text)):
        if index % 2:
            paragraph += nodes.literal(part, part)
        elif part:
            paragraph += nodes.Text(part)
    return paragraph


def build_table(spec: TableSpec) -> list[nodes.Node]:
    table = nodes.table(classes=["benchmark-table"])
    table += nodes.title(spec.title, spec.title)
    group = nodes.tgroup(cols=len(spec.header))
    table += group
    numeric = spec.numeric or [False] * len(spec.header)
    for _ in spec.header:
        group += nodes.colspec(colwidth=1)

    def row(cells: Iterable[Cell | nodes.Node], head: bool) -> nodes.row:
        out = nodes.row()
        for cell, right in zip(cells, numeric, strict=True):
            entry = nodes.entry(classes=["text-right"] if right and not head else [])
            if isinstance(cell, nodes.Node):
                entry += nodes.paragraph("", "", cell)
            else:
                text = fmt(cell)
                entry += nodes.paragraph(text, text)
            out += entry
        return out

    thead = nodes.thead()
    thead += row(spec.header, head=True)
    group += thead
    body = nodes.tbody()
    for cells in spec.rows:
        body += row(cells, head=False)
    group += body
    out: list[nodes.Node] = [table]
    if spec.notes:
        notes = nodes.bullet_list(classes=["benchmark-notes"])
        for note in spec.notes:
            item = nodes.list_item()
            item += _prose(note)
            notes += item
        out.append(notes)
    return out


def columns(table: Json, names: Sequence[str]) -> list[int]:
    header: list[str] = table["columns"]
    missing = [n for n in names if n not in header]
    if missing:
        raise ExtensionError(f"benchmark table {table['title']!r} has no column {missing}")
    return [header.index(n) for n in names]


def select(table: Json, names: Sequence[str]) -> list[list[Cell]]:
    picked = columns(table, names)
    return [[short(r[i]) if isinstance(r[i], str) else r[i] for i in picked] for r in table["rows"]]


def own_run_note(results: Results, section: str, *, required: bool = False) -> list[str]:
    """The note for a section measured in a run apart from the one the machine table
    describes (none when it was not; a ``required`` one always was, and the build fails
    without it)."""
    data = results.section(section)
    run = data["run"] if required else data.get("run")
    if run is None:
        return []
    cpu = f" ({run['cpu_count']} x {run['cpu_model']})" if "cpu_model" in run else ""
    return [
        f"measured in a run of its own on {run['date'][:10]}{cpu}, load average "
        f"{run['load_average_start'][0]} at its start and {run['load_average_end'][0]} at its "
        "end (1 minute)"
    ]


def strong(text: str) -> nodes.Node:
    return nodes.strong(text, text)


#: A space that never breaks: "not met", "≥ 0.97" and "exactly 1" stay on one line
#: in the targets table's narrow columns.
NBSP = "\N{NO-BREAK SPACE}"


def verdict(met: bool) -> Cell | nodes.Node:
    return "met" if met else strong(f"not{NBSP}met")


def table_targets(results: Results) -> TableSpec:
    rows: list[list[Cell | nodes.Node]] = []
    for target in targets(results):
        goal = f"{target.op}{NBSP}{target.target:g}"
        rows.append([target_label(target), target.value, goal, verdict(target.met)])
        if target.section == "p1" and not target.label.startswith("apply()"):
            trips = results.section("p1")["round_trips_per_task"]
            extra = {driver: d["tenant"] - d["plain"] for driver, d in trips.items()}
            rows.append(
                [
                    "P1 round trips a tenant task makes beyond the plain task",
                    ", ".join(f"{fmt(n)} ({driver})" for driver, n in extra.items()),
                    f"at{NBSP}most{NBSP}0",
                    verdict(all(n <= 0 for n in extra.values())),
                ]
            )
    machine = results.get("machine")
    return TableSpec(
        f"Every target of the run of {machine['date'][:10]}",
        ["measurement", "measured", "target", "result"],
        rows,
        [False, True, False, False],
        [
            "transport: the package's PostgreSQL transport (tcpg+); prefork 2: a prefork "
            "worker of concurrency 2; p95: the 95th percentile; every figure but the "
            "statement count is a ratio to a baseline measured in the same run"
        ],
    )


def table_machine(results: Results) -> TableSpec:
    machine = results.get("machine")
    rows: list[list[Cell | nodes.Node]] = [
        ["date (UTC)", machine["date"]],
        ["CPU", f"{machine['cpu_count']} x {machine['cpu_model']}"],
        ["memory", f"{machine['memory_gib']} GiB"],
        ["OS", machine["os"]],
        ["Python", machine["python"]],
        ["PostgreSQL", machine["postgresql"]],
        ["Redis", machine["redis"]],
        ["RabbitMQ", machine["rabbitmq"]],
    ]
    rows += [[name, version] for name, version in machine["packages"].items()]
    start, end = machine["load_average_start"], machine["load_average_end"]
    rows.append(["load average at start / end", f"{start[0]} / {end[0]} (1 minute)"])
    rows.append(["size, total time", f"{machine['size']}, {machine['duration_s']} s"])
    return TableSpec("The machine of the run", ["", "value"], rows)


def table_p1(results: Results) -> TableSpec:
    table = results.table("p1")
    names = [
        "path",
        "task",
        "per second",
        "statements",
        "round trips (psycopg 3)",
        "round trips (psycopg2)",
        "body µs",
        "ratio to plain",
    ]
    rows = select(table, names)
    for row in rows:
        row[0] = "apply()" if str(row[0]).startswith("apply()") else "worker"
        row[1] = "own statement" if str(row[1]).endswith("own statement") else row[1]
    runs = {str(r[0]).split()[0]: r[-2] for r in table["rows"]}
    return TableSpec(
        table["title"],
        [
            "path",
            "task",
            "per s",
            "statements",
            "trips, psycopg 3",
            "psycopg2",
            "body µs",
            "/ plain",
        ],
        list(rows),
        [False, False, True, True, True, True, True, True],
        [
            f"apply(): in the runner's process, no broker, {runs.get('apply()', '?')} "
            "(rounds x calls per variant); worker: a real worker, Redis broker and results, "
            f"prefork 2, {runs.get('real', '?')} (runs x tasks); own statement: the tenant "
            "task with the setting sent as a statement of its own; trips: round trips per task",
            *(n for n in table["notes"] if "target" not in n),
            *own_run_note(results, "p1"),
        ],
    )


def table_p1_parts(results: Results) -> TableSpec:
    table = results.table("p1", 1)
    return TableSpec(
        table["title"],
        ["part", "measured as", "µs", "rounds ranged"],
        select(table, ["part", "measured as", "µs", "rounds ranged"]),
        [False, False, True, False],
        list(table["notes"]),
    )


def table_p2_times(results: Results) -> TableSpec:
    table = results.table("p2")
    names = ["query", "statement", "explicit med", "control med", "package med", "naive med"]
    return TableSpec(
        "P2 query time, µs, median of the runs' medians",
        ["query", "statement", "explicit", "control", "package", "naive"],
        list(select(table, names)),
        [False, False, True, True, True, True],
        [*table["notes"][:4], *own_run_note(results, "p2")],
    )


def table_p2_ratios(results: Results) -> TableSpec:
    table = results.table("p2", 1)
    names = [
        "query",
        "statement",
        "control/explicit",
        "package/explicit",
        "package/control",
        "package/control runs",
        "txn package/explicit",
    ]
    return TableSpec(
        table["title"],
        [
            "query",
            "statement",
            "control / explicit",
            "package / explicit",
            "package / control",
            "package / control by run",
            "whole txn, package / explicit",
        ],
        list(select(table, names)),
        [False, False, True, True, True, False, True],
        [n for n in table["notes"] if "target" not in n],
    )


def table_p2_plans(results: Results) -> TableSpec:
    table = results.table("p2", 2)
    names = ["query", "setup", "scan", "tenant in index cond", "InitPlan", "buffers", "exec ms"]
    rows = select(table, names)
    for row in rows:
        row[2] = str(row[2]).replace("Bitmap Heap Scan/Bitmap Index Scan", "Bitmap Heap + Index")
    return TableSpec(
        table["title"],
        ["query", "setup", "scan", "tenant in index cond", "InitPlan", "buffers", "exec ms"],
        list(rows),
        [False, False, False, False, False, True, True],
        table["notes"][:2],
    )


def table_p2_scan(results: Results) -> TableSpec:
    table = results.table("p2", 3)
    names = ["setup", "scan", "InitPlan", "ms med", "ms range", "vs explicit", "ns per row"]
    return TableSpec(
        table["title"],
        names,
        list(select(table, names)),
        [False, False, False, True, False, True, True],
        table["notes"],
    )


def table_p3(results: Results) -> TableSpec:
    table = results.table("p3")
    rows = select(
        table, ["broker", "results", "pool", "tasks/s", "published/s", "ratio vs Redis + Redis"]
    )
    for row in rows:
        row[2] = str(row[2]).replace("prefork 2", "prefork")
        row[1] = str(row[1]).replace("synchronous_commit off", "no sync commit")
    return TableSpec(
        table["title"],
        ["broker", "results", "pool", "tasks/s", "published/s", "vs Redis"],
        list(rows),
        [False, False, False, True, True, True],
        [
            *table["notes"][:3],
            "no sync commit: the results' connections set synchronous_commit off; "
            "prefork: concurrency 2",
        ],
    )


def table_p3_events(results: Results) -> TableSpec:
    table = results.table("p3-events")
    names = ["broker", "events", "tasks/s", "ratio to off", "events per task", "rows per task"]
    notes = [*table["notes"], *own_run_note(results, "p3-events")]
    return TableSpec(
        table["title"],
        ["broker", "events", "tasks/s", "on/off", "events per task", "rows per task"],
        list(select(table, names)),
        [False, False, True, True, True, True],
        notes,
    )


def table_p4(results: Results) -> TableSpec:
    table = results.table("p4")
    return TableSpec(
        table["title"],
        table["columns"],
        list(select(table, table["columns"])),
        [False, True, False, True],
        [n for n in table["notes"] if "target" not in n],
    )


def p5_case(row: Sequence[Cell]) -> str:
    broker, settings, prefetch = short(str(row[0])), str(row[2]), row[3]
    text = f"{broker}, prefetch {prefetch}"
    return text if settings == "Celery's defaults" else f"{text}, {settings}"


def table_p5_latency(results: Results) -> TableSpec:
    table = results.table("p5")
    idx = columns(table, ["idle p50", "idle p95", "busy p50", "busy p95", "p95 busy/idle"])
    rows: list[list[Cell | nodes.Node]] = [
        [p5_case(r), *(r[i] for i in idx)] for r in table["rows"]
    ]
    return TableSpec(
        "P5 tenant B's latency, ms, with tenant A idle and with A's backlog queued (busy)",
        ["worker", "idle p50", "idle p95", "busy p50", "busy p95", "busy/idle p95"],
        rows,
        [False, True, True, True, True, True],
        [*table["notes"][:3]],
    )


def table_p5_backlog(results: Results) -> TableSpec:
    table = results.table("p5")
    idx = columns(table, ["A waiting at B's first / last probe", "A tasks/s meanwhile"])
    rows: list[list[Cell | nodes.Node]] = [
        [p5_case(r), *(r[i] for i in idx)] for r in table["rows"]
    ]
    return TableSpec(
        "P5 tenant A's backlog while B's probes were sent",
        ["worker", "A waiting at B's first / last probe", "A tasks/s"],
        rows,
        [False, True, True],
        [table["notes"][3]],
    )


def table_result_backend(results: Results) -> TableSpec:
    table = results.table("results")
    return TableSpec(
        table["title"],
        ["backend", "operations/s", "connections per operation", "ratio"],
        list(select(table, table["columns"])),
        [False, True, True, True],
        table["notes"][:2],
    )


def table_scale(results: Results) -> TableSpec:
    table = results.table("scale")
    names = [
        "broker",
        "workers",
        "tasks/s",
        "PostgreSQL CPU µs/task",
        "workers CPU µs/task",
        "machine busy %",
        "claim p50 ms",
        "claim p95 ms",
        "messages/claim",
        "empty claims %",
        "lock waits %",
    ]
    rows = []
    busy = []
    for row in select(table, names):
        broker, workers, rate, pg, cpu, machine, p50, p95, per_claim, empty, locks = row
        busy.append(machine)
        claim = "—" if p50 is None else f"{p50:.2f} / {p95:.2f}"
        broker = "transport" if str(broker).startswith("PostgreSQL") else broker
        rows.append([broker, workers, rate, pg, cpu, claim, per_claim, empty, locks])
    numbers = [b for b in busy if isinstance(b, (int, float))]
    notes = [
        *table["notes"],
        "transport: the package's PostgreSQL transport; PG µs and workers µs: CPU time "
        "of PostgreSQL's processes and of the workers' per task; claim: p50 / p95 ms; "
        "per claim: "
        "messages per claim; the machine's two cores were "
        + (f"{min(numbers):.1f} to {max(numbers):.1f}% busy" if numbers else "busy")
        + " in every row; the WAL columns are in the results file",
        *own_run_note(results, "scale", required=True),
    ]
    return TableSpec(
        table["title"],
        [
            "broker",
            "workers",
            "tasks/s",
            "PG µs",
            "workers µs",
            "claim ms",
            "per claim",
            "empty %",
            "lock waits %",
        ],
        rows,
        [False, True, True, True, True, True, True, True, True],
        notes,
    )


def table_scale_wakeups(results: Results) -> TableSpec:
    table = results.table("scale", 1)
    return TableSpec(
        table["title"],
        ["wake-ups", "idle claims/s", "idle PostgreSQL ms/s", "one task median ms",
         "one task max ms", "connections, main", "connections, pool"],
        list(select(table, table["columns"])),
        [False, True, True, True, True, True, True],
        table["notes"],
    )  # fmt: skip


def table_soak(results: Results) -> TableSpec:
    """The soak's verdict, one figure a row: narrow enough for any column."""
    table = results.table("soak")
    data = results.section("soak")
    found = data["verdict"]
    samples = data["samples"]
    first, last = samples[0], samples[-1]
    rss = ", ".join(f"{a:g} → {b:g}" for a, b in found["rss_first_to_last_mb"])
    fds = ", ".join(
        f"{w['fds']} → {v['fds']}" for w, v in zip(first["workers"], last["workers"], strict=True)
    )
    conns = ", ".join(
        f"{w['connections']} → {v['connections']}"
        for w, v in zip(first["workers"], last["workers"], strict=True)
    )
    rows: list[list[Cell | nodes.Node]] = [
        ["tasks run", found["tasks"]],
        ["minutes", round(found["seconds"] / 60, 1)],
        ["tasks per second", found["tasks_per_second"]],
        *(
            [["the same, by quarter", " / ".join(f"{r:,.0f}" for r in found["quarter_rates"])]]
            if found.get("quarter_rates")
            else []
        ),
        ["autovacuums of the message table", found["autovacuum_runs"]],
        ["table with indexes and TOAST, largest, MB", found["size_max_mb"]],
        ["the same, last sample, MB", found["size_last_mb"]],
        ["largest size, last quarter over first", found["size_growth"]],
        ["size bounded", "yes" if found["size_bounded"] else strong("no")],
        ["each worker's RSS, first → last sample, MB", rss],
        ["RSS growth after the first quarter, MB", found["rss_growth_mb"]],
        ["each worker's open fds, first → last", fds],
        ["each worker's connections, first → last", conns],
        [
            "the transport's connections (pg_stat_activity), first → last",
            " → ".join(str(n) for n in found["broker_connections"]),
        ],
    ]
    notes = [
        *table["notes"][:2],
        table["notes"][3],
        *own_run_note(results, "soak", required=True),
    ]
    if found.get("capped_at_seconds"):
        notes.append(
            f"publishing stopped at the run's cap of {found['capped_at_seconds']:g} s, "
            f"before the {data['tasks_asked']:,} tasks asked for: tasks run is what ran"
        )
    return TableSpec(table["title"], ["measure", "value"], rows, [False, True], notes)


#: The message table's indexes, as the soak's series table calls them.
SOAK_INDEXES = {
    "index ix_tenant_celery_message_claim, MB": "claim index, MB",
    "index tenant_celery_message_pkey, MB": "primary key, MB",
    "index ix_tenant_celery_message_expires_at, MB": "expiry index, MB",
    "table + indexes + TOAST, MB": "with indexes and TOAST, MB",
    "message table heap, MB": "table heap, MB",
    "transport connections (pg_stat_activity)": "transport connections",
}


def table_soak_series(results: Results) -> TableSpec:
    table = results.table("soak", 1)
    rows = select(table, ["measure", "first", "min", "max", "last", "last/first quarter"])
    for row in rows:
        name = str(row[0])
        row[0] = SOAK_INDEXES.get(name, name.replace(" connections to PostgreSQL", " connections"))
    return TableSpec(
        table["title"],
        ["measure", "first", "min", "max", "last", "last / first quarter"],
        list(rows),
        [False, True, True, True, True, True],
        [
            "last / first quarter: the largest sample in the last quarter of the samples "
            "over the largest in the first",
            "connections: TCP connections to PostgreSQL from /proc; transport connections: "
            "pg_stat_activity's rows with the transport's application_name, publishers "
            "included",
        ],
    )


TABLES: dict[str, Callable[[Results], TableSpec]] = {
    "targets": table_targets,
    "machine": table_machine,
    "p1": table_p1,
    "p1-parts": table_p1_parts,
    "p2-times": table_p2_times,
    "p2-ratios": table_p2_ratios,
    "p2-plans": table_p2_plans,
    "p2-scan": table_p2_scan,
    "p3": table_p3,
    "p3-events": table_p3_events,
    "p4": table_p4,
    "p5-latency": table_p5_latency,
    "p5-backlog": table_p5_backlog,
    "result-backend": table_result_backend,
    "scale": table_scale,
    "scale-wakeups": table_scale_wakeups,
    "soak": table_soak,
    "soak-series": table_soak_series,
}


# ------------------------------------------------------------------------ charts

WIDTH = 720
FONT = 14
SMALL = 12.5
CHAR = 0.55  # average glyph width, in ems, for laying out labels


def text_width(text: str, size: float = FONT) -> float:
    return len(text) * size * CHAR


class Svg:
    """An SVG document built up element by element."""

    def __init__(self, height: float, title: str, desc: str) -> None:
        self.height = height
        self.title = title
        self.desc = desc
        self.parts: list[str] = []

    def add(self, element: str, **attrs: Any) -> None:
        content = attrs.pop("content", None)
        rendered = " ".join(
            f'{name.rstrip("_").replace("_", "-")}="{escape(str(value))}"'
            for name, value in attrs.items()
            if value is not None
        )
        if content is None:
            self.parts.append(f"<{element} {rendered}/>")
        else:
            self.parts.append(f"<{element} {rendered}>{escape(str(content))}</{element}>")

    def line(self, x1: float, y1: float, x2: float, y2: float, **attrs: Any) -> None:
        self.add("line", x1=f"{x1:.1f}", y1=f"{y1:.1f}", x2=f"{x2:.1f}", y2=f"{y2:.1f}", **attrs)

    def rect(self, x: float, y: float, w: float, h: float, **attrs: Any) -> None:
        self.add(
            "rect", x=f"{x:.1f}", y=f"{y:.1f}", width=f"{max(w, 0):.1f}", height=f"{h:.1f}", **attrs
        )

    def text(self, x: float, y: float, content: str, **attrs: Any) -> None:
        attrs.setdefault("font_size", FONT)
        attrs.setdefault("fill", "currentColor")
        self.add("text", x=f"{x:.1f}", y=f"{y:.1f}", content=content, **attrs)

    def circle(self, x: float, y: float, r: float, **attrs: Any) -> None:
        self.add("circle", cx=f"{x:.1f}", cy=f"{y:.1f}", r=r, **attrs)

    def render(self, ident: str) -> str:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" class="benchmark-chart" role="img" '
            f'viewBox="0 0 {WIDTH} {self.height:.0f}" width="100%" '
            f'style="max-width:{WIDTH}px;height:auto;font-family:inherit" '
            f'aria-labelledby="{ident}-title {ident}-desc">'
            f'<title id="{ident}-title">{escape(self.title)}</title>'
            f'<desc id="{ident}-desc">{escape(self.desc)}</desc>' + "".join(self.parts) + "</svg>"
        )


@dataclass
class LinearAxis:
    low: float
    high: float
    left: float
    right: float

    def x(self, value: float) -> float:
        span = self.high - self.low
        return self.left + (value - self.low) / span * (self.right - self.left)


@dataclass
class LogAxis:
    low: float
    high: float
    left: float
    right: float

    def x(self, value: float) -> float:
        span = math.log10(self.high) - math.log10(self.low)
        position = (math.log10(max(value, self.low)) - math.log10(self.low)) / span
        return self.left + position * (self.right - self.left)


def nice_step(high: float, ticks: int = 6) -> float:
    raw = high / ticks
    power = float(10.0 ** math.floor(math.log10(raw)))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def legend(svg: Svg, x: float, y: float, entries: Sequence[tuple[str, str, str]]) -> None:
    """A row of keys, each ``(kind, colour, label)``: kind ``box``, ``dot``, ``ring``
    (a hollow dot) or ``tick`` (a short vertical bar)."""
    for kind, colour, label in entries:
        if kind == "box":
            svg.rect(x, y - 11, 14, 14, fill=colour, rx=2)
        elif kind == "dot":
            svg.circle(x + 7, y - 4, 6, fill=colour)
        elif kind == "ring":
            svg.circle(x + 7, y - 4, 6, fill="none", stroke=colour, stroke_width=1.5)
        else:
            svg.line(x + 7, y - 12, x + 7, y + 4, stroke=colour, stroke_width=2)
        svg.text(x + 20, y, label, font_size=SMALL)
        x += 20 + text_width(label, SMALL) + 22


def wrap(text: str, width: float, size: float = SMALL) -> list[str]:
    """``text`` in lines of at most ``width`` units, broken after commas."""
    lines: list[str] = []
    for part in text.split(", "):
        if lines and text_width(f"{lines[-1]}, {part}", size) <= width:
            lines[-1] = f"{lines[-1]}, {part}"
        else:
            if lines:
                lines[-1] += ","
            lines.append(part)
    return lines


def vertical_grid(
    svg: Svg,
    axis: LinearAxis | LogAxis,
    ticks: Sequence[tuple[float, str]],
    top: float,
    bottom: float,
) -> None:
    for value, label in ticks:
        x = axis.x(value)
        svg.line(x, top, x, bottom, stroke="currentColor", stroke_opacity=0.15)
        svg.text(x, bottom + 18, label, font_size=SMALL, text_anchor="middle")
    svg.line(axis.left, bottom, axis.right, bottom, stroke="currentColor", stroke_opacity=0.6)


#: Result backends of P3's table, short enough for a chart's label column.
RESULT_LABELS = {"PostgreSQL, pooled, synchronous_commit off": "pooled, sync commit off"}


def chart_throughput(results: Results) -> tuple[str, str]:
    """P3: tasks per second of each broker and result backend, prefork and solo."""
    data = results.section("p3")
    table = results.table("p3")
    pairs = list(data["results"])
    label_cols = columns(table, ["broker", "results", "tasks/s"])
    labels: list[tuple[str, str]] = []
    for n, pair in enumerate(pairs):
        row = table["rows"][2 * n]
        if row[label_cols[2]] != data["results"][pair]["prefork"]["tasks_per_second"]:
            raise ExtensionError(f"P3: the table's rows are not in the order of {pairs}")
        backend = str(row[label_cols[1]])
        backend = RESULT_LABELS.get(backend, backend)
        labels.append((short(str(row[label_cols[0]])), f"results: {backend}"))
    pools = [("prefork", "prefork, concurrency 2", BLUE), ("solo", "solo", ORANGE)]
    values = [
        [
            v
            for pool, _, _ in pools
            for v in (
                data["results"][p][pool]["tasks_per_second"],
                *data["results"][p][pool].get("tasks_per_second_runs", []),
            )
        ]
        for p in pairs
    ]
    high = max(max(v) for v in values)  # a run may be faster than its pair's median
    step = nice_step(high)
    top_value = math.ceil(high / step) * step
    bar, gap = 15.0, 18.0
    top = 58.0
    group = len(pools) * bar + gap
    bottom = top + len(pairs) * group
    svg = Svg(
        bottom + 62,
        "P3: tenant tasks per second by broker and result backend",
        "Horizontal bars, two per broker and result backend pair (prefork and solo worker), "
        "tasks per second end to end.",
    )
    axis = LinearAxis(0, top_value, 250, WIDTH - 100)
    svg.text(2, 20, "Tasks per second, end to end (more is better)", font_weight="bold")
    keys = [("box", colour, label) for _, label, colour in pools]
    legend(svg, 2, 44, [*keys, ("tick", "currentColor", "one run, where there were several")])
    ticks = [(v * step, f"{v * step:,.0f}") for v in range(int(top_value / step) + 1)]
    vertical_grid(svg, axis, ticks, top - 6, bottom)
    for n, (pair, (broker, backend)) in enumerate(zip(pairs, labels, strict=True)):
        y = top + n * group
        svg.text(axis.left - 10, y + bar - 2, broker, text_anchor="end")
        svg.text(
            axis.left - 10,
            y + 2 * bar + 1,
            backend,
            text_anchor="end",
            font_size=SMALL,
            fill_opacity=0.75,
        )
        for k, (pool, _, colour) in enumerate(pools):
            entry = data["results"][pair][pool]
            value = entry["tasks_per_second"]
            by = y + k * bar
            svg.rect(axis.left, by + 1, axis.x(value) - axis.left, bar - 2, fill=colour)
            runs = entry.get("tasks_per_second_runs", [])
            for run in runs if len(runs) > 1 else []:
                svg.line(
                    axis.x(run),
                    by + 1,
                    axis.x(run),
                    by + bar - 1,
                    stroke="currentColor",
                    stroke_width=1.5,
                )
            end = max([value, *runs])
            svg.text(
                axis.x(end) + 5,
                by + bar - 3.5,
                f"{fmt(value)} (\N{MULTIPLICATION SIGN}{fmt(float(entry['ratio']))})",
                font_size=SMALL,
            )
    svg.text(
        (axis.left + axis.right) / 2,
        bottom + 40,
        "tasks per second",
        text_anchor="middle",
        font_size=SMALL,
    )
    caption = (
        "Tasks per second through each broker and result backend, with a prefork worker "
        "and with a solo one: a longer bar is faster. In brackets, the rate as a multiple "
        "of Redis + Redis with the same pool; a thin mark is one run, where a pair ran "
        "several times."
    )
    return svg.render("chart-throughput"), caption


def chart_fairness(results: Results) -> tuple[str, str]:
    """P5: tenant B's latency, every probe, idle and busy, on a log scale."""
    data = results.section("p5")
    table = results.table("p5")
    cases = list(data["results"])
    if len(cases) != len(table["rows"]):
        raise ExtensionError("P5: the table's rows do not match sections.p5.data.results")
    row_h, lane = 62.0, 22.0
    top = 62.0
    bottom = top + len(cases) * row_h
    svg = Svg(
        bottom + 62,
        "P5: tenant B's task latency with tenant A idle and with A's 10,000 tasks queued",
        "For each worker setup, two lanes of dots, one per probe task, with the 95th percentile "
        "marked, on a logarithmic axis of milliseconds from 1 ms to 100 s.",
    )
    axis = LogAxis(1, 100_000, 270, WIDTH - 80)
    svg.text(2, 20, "Tenant B's latency, ms, log scale (less is better)", font_weight="bold")
    legend(
        svg,
        2,
        46,
        [
            ("dot", GREEN, "a probe, A idle"),
            ("dot", RED, "a probe, A's backlog queued (busy)"),
            ("tick", "currentColor", "95th percentile"),
        ],
    )
    ticks = [
        (10.0**p, label) for p, label in enumerate(["1 ms", "10", "100", "1 s", "10 s", "100 s"])
    ]
    vertical_grid(svg, axis, ticks, top - 8, bottom)
    target = float(data["target"])
    probes = ", ".join(sorted({str(data["results"][c]["probes"]) for c in cases}))
    for n, case in enumerate(cases):
        entry = data["results"][case]
        y = top + n * row_h
        label = p5_case(table["rows"][n])
        first, _, rest = label.partition(", ")
        svg.text(axis.left - 10, y + 13, first, text_anchor="end")
        for k, line in enumerate(wrap(rest, axis.left - 20)):
            svg.text(
                axis.left - 10,
                y + 29 + 15 * k,
                line,
                text_anchor="end",
                font_size=SMALL,
                fill_opacity=0.75,
            )
        for k, (kind, colour) in enumerate((("idle", GREEN), ("busy", RED))):
            cy = y + 10 + k * lane
            for value in entry[f"{kind}_ms"]:
                svg.circle(axis.x(value), cy, 3.2, fill=colour, fill_opacity=0.45)
            p95 = entry[f"{kind}_p95_ms"]
            svg.line(
                axis.x(p95), cy - 8, axis.x(p95), cy + 8, stroke="currentColor", stroke_width=2
            )
        ratio = entry["p95_ratio"]
        verdict = "" if case.startswith("redis") else (" ✓" if ratio <= target else " ✗")
        svg.text(
            axis.right + 8,
            y + 26,
            f"\N{MULTIPLICATION SIGN}{fmt(ratio) if ratio < 100 else f'{ratio:,.0f}'}{verdict}",
            font_size=SMALL,
        )
        if n:
            svg.line(0, y - 6, WIDTH, y - 6, stroke="currentColor", stroke_opacity=0.08)
    svg.text(axis.right + 8, top - 14, "busy/idle", font_size=SMALL)
    svg.text(
        (axis.left + axis.right) / 2,
        bottom + 40,
        "latency from publish to the start of the task (ms)",
        text_anchor="middle",
        font_size=SMALL,
    )
    caption = (
        f"Each dot is how long one of tenant B's {probes} single tasks waited from publish "
        "to start: further left is better. On the right, B's 95th percentile with A's "
        "backlog queued over the same with A idle; the target is at most "
        f"{target:g} (✓ met, ✗ not met)."
    )
    return svg.render("chart-fairness"), caption


@dataclass
class RatioRow:
    label: str
    detail: str
    median: float
    pairs: list[float]
    target: tuple[str, float] | None


def chart_overheads(results: Results) -> tuple[str, str]:
    """P1, P2 and P4: each variant against its baseline, with the target marked."""
    p1 = results.section("p1")
    p2 = results.section("p2")
    p4 = results.section("p4")
    apply_, worker = p1["apply"]["per_second"], p1["worker"]["per_second"]
    rows = [
        RatioRow(
            "P1 tenant/plain",
            "apply() in process",
            p1["ratio_apply"],
            pair_ratios(apply_["tenant"], apply_["plain"]),
            ("≥", p1["target_apply"]),
        ),
        RatioRow(
            "P1 tenant/plain",
            "real worker, end to end",
            p1["ratio_end_to_end"],
            pair_ratios(worker["tenant"], worker["plain"]),
            ("≥", p1["target"]),
        ),
    ]
    for mode in p2["modes"]:
        for query, ratio in p2["ratios"]["package/control"][mode].items():
            rows.append(
                RatioRow(
                    "P2 policy/control",
                    f"{query} query, {mode}",
                    ratio["median"],
                    ratio["runs"],
                    ("≤", p2["target"]),
                )
            )
    tasks = p4["tasks_per_second"]
    rows.append(
        RatioRow(
            "P4 observability on/off",
            "real worker",
            p4["ratio"],
            pair_ratios(tasks["on"], tasks["off"]),
            ("≥", p4["target"]),
        )
    )
    everything = [v for r in rows for v in (r.median, *r.pairs)] + [
        r.target[1] for r in rows if r.target
    ]
    low = math.floor(min(everything) * 20) / 20
    high = math.ceil((max(everything) + 0.02) * 20) / 20
    row_h = 42.0
    top = 62.0
    bottom = top + len(rows) * row_h
    svg = Svg(
        bottom + 62,
        "P1, P2, P4: what tenancy, the policy and observability cost, as ratios",
        "One row per measurement: small dots are back-to-back pairs of runs (for P2, runs), "
        "the large dot their median, the dashed mark the target.",
    )
    axis = LinearAxis(low, high, 250, WIDTH - 90)
    svg.text(2, 20, "Ratio to the baseline measured beside it (1.0 = no cost)", font_weight="bold")
    legend(
        svg,
        2,
        46,
        [
            ("dot", BLUE, "median, target met"),
            ("dot", RED, "median, not met"),
            ("ring", "currentColor", "median, no target"),
            ("dot", GREY, "a pair of runs (P2: a run)"),
        ],
    )
    steps = round((high - low) / 0.05)
    ticks = [(low + i * 0.05, f"{low + i * 0.05:.2f}") for i in range(steps + 1)]
    vertical_grid(svg, axis, ticks, top - 8, bottom)
    svg.line(axis.x(1.0), top - 8, axis.x(1.0), bottom, stroke="currentColor", stroke_opacity=0.5)
    for n, row in enumerate(rows):
        y = top + n * row_h + row_h / 2
        svg.text(axis.left - 10, y - 3, row.label, text_anchor="end")
        svg.text(
            axis.left - 10,
            y + 13,
            row.detail,
            text_anchor="end",
            font_size=SMALL,
            fill_opacity=0.75,
        )
        met: bool | None = None
        if row.target is not None:
            op, value = row.target
            met = row.median >= value if op == "≥" else row.median <= value
            x = axis.x(value)
            svg.line(
                x, y - 14, x, y + 14, stroke="currentColor", stroke_width=2, stroke_dasharray="3 2"
            )
            svg.text(x, y - 17, f"{op} {value:g}", font_size=11, text_anchor="middle")
        for value in row.pairs:
            svg.circle(axis.x(value), y, 3.5, fill=GREY, fill_opacity=0.7)
        if met is None:
            svg.circle(axis.x(row.median), y, 6, fill="none", stroke="currentColor", stroke_width=2)
        else:
            colour = BLUE if met else RED
            svg.circle(
                axis.x(row.median), y, 7, fill=colour, stroke="currentColor", stroke_width=0.8
            )
        svg.text(axis.right + 10, y + 5, fmt(row.median), font_size=SMALL, font_weight="bold")
    svg.text(
        (axis.left + axis.right) / 2,
        bottom + 40,
        "ratio (variant / baseline)",
        text_anchor="middle",
        font_size=SMALL,
    )
    caption = (
        "A ratio of 1.0 means the variant costs nothing against its baseline; a dashed mark "
        "is the target. P1 and P4 compare tasks per second, so left of 1.0 is slower; P2 "
        "compares the policy's query time with the control's, a copy of the table without "
        "row-level security read with an explicit WHERE, run by run, so right of 1.0 is "
        "slower."
    )
    return svg.render("chart-overheads"), caption


def chart_result_backend(results: Results) -> tuple[str, str]:
    """Result backend: results stored and read back per second, NullPool against pooled."""
    data = results.section("results")
    backends = list(data["operations_per_second"])
    rates = [statistics.median(data["operations_per_second"][b]) for b in backends]
    connections = [
        statistics.median(data["connections_per_run"][b]) / data["operations_per_run"]
        for b in backends
    ]
    bar, top = 30.0, 50.0
    bottom = top + len(backends) * (bar + 14)
    svg = Svg(
        bottom + 56,
        "Result backend: results stored and read back per second",
        "Two horizontal bars: Celery's database backend and the pooled backend, operations per "
        "second in a process that has not forked.",
    )
    high = max(rates)
    step = nice_step(high, 5)
    axis = LinearAxis(0, math.ceil(high / step) * step, 280, WIDTH - 200)
    svg.text(2, 20, "Store + read one result, per second (more is better)", font_weight="bold")
    ticks = [(v * step, f"{v * step:,.0f}") for v in range(int(axis.high / step) + 1)]
    vertical_grid(svg, axis, ticks, top - 8, bottom)
    for n, (backend, rate, conns) in enumerate(zip(backends, rates, connections, strict=True)):
        y = top + n * (bar + 14)
        svg.text(axis.left - 10, y + bar / 2 + 5, short(backend), text_anchor="end")
        svg.rect(axis.left, y, axis.x(rate) - axis.left, bar, fill=(GREY, BLUE)[n % 2])
        svg.text(
            axis.x(rate) + 6,
            y + bar / 2 + 5,
            f"{fmt(rate)}/s, {conns:g} connections each"
            if conns
            else f"{fmt(rate)}/s, no new connection",
            font_size=SMALL,
        )
    svg.text(
        (axis.left + axis.right) / 2,
        bottom + 36,
        "operations per second",
        text_anchor="middle",
        font_size=SMALL,
    )
    caption = (
        "One result stored and read back, per second, in a process that has not forked: a "
        "longer bar is faster. Beside each bar, how many new connections each operation "
        f"opened (the median of {data['runs']} runs of {data['operations_per_run']})."
    )
    return svg.render("chart-result-backend"), caption


def chart_scale(results: Results) -> tuple[str, str]:
    """Scale: tasks per second draining a backlog against the number of workers, both
    brokers, with the machine's busy share and the transport's claim p95 under each point."""
    data = results.section("scale")
    table = results.table("scale")
    col = dict(zip(table["columns"], range(len(table["columns"])), strict=True))
    workers: list[int] = list(data["workers"])
    series = [
        ("PostgreSQL (tenant_celery.transport)", "the package's transport", BLUE),
        ("Redis", "Redis", ORANGE),
    ]
    points: dict[str, dict[int, list[Cell]]] = {name: {} for name, _, _ in series}
    for row in table["rows"]:
        points.setdefault(str(row[col["broker"]]), {})[int(row[col["workers"]])] = row
    rates = [float(r[col["tasks/s"]]) for p in points.values() for r in p.values()]
    if not rates:
        raise ExtensionError("scale: the table has no rows")
    top, bottom, left, right = 60.0, 330.0, 90.0, WIDTH - 40.0
    svg = Svg(
        bottom + 120,
        "Scale: tasks per second against the number of workers",
        "Two lines, the package's transport and Redis: tasks per second draining a backlog "
        f"with {', '.join(str(n) for n in workers)} solo workers on a "
        f"{data['cpu_count']}-core machine.",
    )
    svg.text(2, 20, "Tasks drained per second (more is better)", font_weight="bold")
    high = max(rates) * 1.1
    step = nice_step(high, 5)
    ceiling = math.ceil(high / step) * step

    def y(value: float) -> float:
        return bottom - value / ceiling * (bottom - top)

    def x(n: int) -> float:
        index = workers.index(n)
        return left + (index + 0.5) * (right - left) / len(workers)

    for k in range(int(ceiling / step) + 1):
        value = k * step
        svg.line(left, y(value), right, y(value), stroke="currentColor", stroke_opacity=0.15)
        svg.text(left - 8, y(value) + 4, f"{value:,.0f}", font_size=SMALL, text_anchor="end")
    svg.line(left, bottom, right, bottom, stroke="currentColor", stroke_opacity=0.6)
    for n in workers:
        svg.text(x(n), bottom + 20, f"{n}", font_size=SMALL, text_anchor="middle")
    svg.text(
        (left + right) / 2, bottom + 40, "worker processes (solo pool)", font_size=SMALL,
        text_anchor="middle",
    )  # fmt: skip
    for name, _, colour in series:
        found = points.get(name, {})
        line = [(x(n), y(float(found[n][col["tasks/s"]]))) for n in workers if n in found]
        for (x1, y1), (x2, y2) in itertools.pairwise(line):
            svg.line(x1, y1, x2, y2, stroke=colour, stroke_width=2.5)
        for n in workers:
            if n not in found:
                continue
            row = found[n]
            px, py = x(n), y(float(row[col["tasks/s"]]))
            svg.circle(px, py, 5, fill=colour)
            above = colour == BLUE
            svg.text(
                px, py - 10 if above else py + 20, fmt(row[col["tasks/s"]]),
                font_size=SMALL, text_anchor="middle", fill=colour,
            )  # fmt: skip
    # Under the axis, per worker count: how busy the machine was on each broker.
    for n in workers:
        busy = [
            f"{fmt(points[name][n][col['machine busy %']])}%"
            for name, _, _ in series
            if n in points.get(name, {})
        ]
        svg.text(x(n), bottom + 62, " / ".join(busy), font_size=SMALL, text_anchor="middle")
    svg.text(left - 8, bottom + 62, "busy:", font_size=SMALL, text_anchor="end")
    legend(svg, left, bottom + 100, [("dot", c, label) for _, label, c in series])
    caption = (
        f"A backlog of {data['tasks_per_run']:,} no-op tenant tasks drained by 1 to "
        f"{max(workers)} workers, one process each, on a {data['cpu_count']}-core machine "
        "that also runs PostgreSQL and Redis; results in Redis for both brokers. Under each "
        "worker count, the share of both cores busy during the drain (transport / Redis). "
        f"The median of {data['rounds']} rounds."
    )
    return svg.render("chart-scale"), caption


def chart_soak(results: Results) -> tuple[str, str]:
    """Soak: the message table's size and the workers' memory over the run, with the
    autovacuum runs marked."""
    data = results.section("soak")
    samples: list[Json] = data["samples"]
    if len(samples) < 2:
        raise ExtensionError("soak: fewer than two samples")
    minutes = [float(s["t"]) / 60 for s in samples]
    mb = 1024 * 1024
    sizes = [
        ("table + indexes + TOAST", BLUE, [s["total_bytes"] / mb for s in samples]),
        ("heap", GREEN, [s["heap_bytes"] / mb for s in samples]),
        ("indexes", ORANGE, [s["indexes_bytes"] / mb for s in samples]),
    ]
    colours = [BLUE, ORANGE, GREEN, RED]
    memory = [
        (f"worker {n + 1}", colours[n % len(colours)],
         [s["workers"][n]["rss_kb"] / 1024 for s in samples])
        for n in range(len(samples[0]["workers"]))
    ]  # fmt: skip
    vacuums = [
        minutes[i]
        for i in range(1, len(samples))
        if samples[i]["autovacuum_count"] > samples[i - 1]["autovacuum_count"]
    ]
    left, right = 70.0, WIDTH - 30.0
    panels = [(60.0, 250.0), (340.0, 500.0)]
    svg = Svg(
        panels[1][1] + 100,
        "Soak: the message table's size and the workers' memory over time",
        f"Over {minutes[-1]:.0f} minutes and {data['verdict']['tasks']:,} tasks: the message "
        "table's size in MB (table with indexes and TOAST, heap, indexes), with each "
        "autovacuum of the table marked, and each worker's resident memory in MB.",
    )
    span = max(minutes[-1], 1e-9)
    step_x = nice_step(span, 8)
    axis = LinearAxis(0.0, math.ceil(span / step_x) * step_x, left, right)
    ticks = [(k * step_x, f"{k * step_x:g}") for k in range(int(axis.high / step_x) + 1)]

    def panel(
        top: float, bottom: float, title: str, lines: Sequence[tuple[str, str, list[float]]]
    ) -> None:
        svg.text(2, top - 22, title, font_weight="bold")
        high = max(max(values) for _, _, values in lines) * 1.1 or 1.0
        step = nice_step(high, 4)
        ceiling = math.ceil(high / step) * step

        def y(value: float) -> float:
            return bottom - value / ceiling * (bottom - top)

        for k in range(int(ceiling / step) + 1):
            value = k * step
            svg.line(left, y(value), right, y(value), stroke="currentColor", stroke_opacity=0.15)
            svg.text(left - 8, y(value) + 4, f"{value:,.0f}", font_size=SMALL, text_anchor="end")
        vertical_grid(svg, axis, ticks, top, bottom)
        for _, colour, values in lines:
            points = " ".join(
                f"{axis.x(t):.1f},{y(v):.1f}" for t, v in zip(minutes, values, strict=True)
            )
            svg.add("polyline", points=points, fill="none", stroke=colour, stroke_width=2)

    panel(*panels[0], "Message table size, MB", sizes)
    for at in vacuums:
        x = axis.x(at)
        svg.line(x, panels[0][0] - 8, x, panels[0][0] + 4, stroke=RED, stroke_width=2)
    legend(
        svg, left, panels[0][1] + 44,
        [("box", c, label) for label, c, _ in sizes] + [("tick", RED, "autovacuum")],
    )  # fmt: skip
    panel(*panels[1], "Workers' resident memory, MB", memory)
    svg.text(
        (left + right) / 2, panels[1][1] + 40, "minutes into the soak", font_size=SMALL,
        text_anchor="middle",
    )  # fmt: skip
    legend(svg, left, panels[1][1] + 74, [("box", c, label) for label, c, _ in memory])
    verdict = data["verdict"]
    caption = (
        f"{verdict['tasks']:,} no-op tenant tasks through the package's transport in "
        f"{verdict['seconds'] / 60:.0f} minutes ({fmt(verdict['tasks_per_second'])} a second), "
        f"{data['workers']} solo workers on a {data['cpu_count']}-core machine that also ran "
        f"PostgreSQL and the publishers; sampled every {data['sample_seconds']:g} s. "
        f"Autovacuum cleaned the table {verdict['autovacuum_runs']} times (the red ticks)."
    )
    return svg.render("chart-soak"), caption


CHARTS: dict[str, Callable[[Results], tuple[str, str]]] = {
    "throughput": chart_throughput,
    "fairness": chart_fairness,
    "overheads": chart_overheads,
    "result-backend": chart_result_backend,
    "scale": chart_scale,
    "soak": chart_soak,
}

#: The sections of the results file each chart draws, named under its caption.
CHART_SECTIONS = {
    "throughput": "section p3",
    "fairness": "section p5",
    "overheads": "sections p1, p2 and p4",
    "result-backend": "section results",
    "scale": "section scale",
    "soak": "section soak",
}


# ---------------------------------------------------------------------- directives


class _BenchmarkDirective(SphinxDirective):
    required_arguments = 1
    has_content = False
    option_spec = {"results": directives.unchanged}  # noqa: RUF012

    def results_name(self) -> str:
        name: str = self.options.get("results") or self.config.benchmark_results
        return name

    def results(self) -> Results:
        path = (Path(self.env.srcdir) / self.results_name()).resolve()
        self.env.note_dependency(str(path))
        self.env.note_dependency(__file__)  # a page is drawn again when this code changes
        if not path.is_file():
            raise self.error(f"no benchmark results at {path}")
        return Results(path)


class BenchmarkChart(_BenchmarkDirective):
    """``{benchmark-chart} NAME``: one of :data:`CHARTS`, as an inline SVG figure."""

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        if name not in CHARTS:
            raise self.error(f"unknown chart {name!r}; one of {sorted(CHARTS)}")
        try:
            svg, caption = CHARTS[name](self.results())
        except ExtensionError as error:
            raise self.error(str(error)) from None
        figure = nodes.figure(classes=["benchmark-figure"])
        figure += nodes.raw("", svg, format="html")
        figure += nodes.caption(caption, caption)
        # Where the figures come from, on a line of its own under the caption.
        source = self.results_name().removeprefix("../")
        data = nodes.paragraph(classes=["benchmark-source"])
        data += nodes.Text("Data: ")
        data += nodes.literal(source, source)
        data += nodes.Text(f", {CHART_SECTIONS[name]}.")
        figure += nodes.legend("", data)
        self.add_name(figure)
        return [figure]


class BenchmarkTable(_BenchmarkDirective):
    """``{benchmark-table} NAME``: one of :data:`TABLES`."""

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        if name not in TABLES:
            raise self.error(f"unknown table {name!r}; one of {sorted(TABLES)}")
        try:
            spec = TABLES[name](self.results())
        except ExtensionError as error:
            raise self.error(str(error)) from None
        return build_table(spec)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("benchmark_results", DEFAULT_RESULTS, "env", [str])
    app.add_directive("benchmark-chart", BenchmarkChart)
    app.add_directive("benchmark-table", BenchmarkTable)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
