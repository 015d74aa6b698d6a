"""``python -m reliability``: run the reliability suite, print its tables, write JSON and Markdown.

Environment (local defaults):

``TENANT_CELERY_RELIABILITY_DSN``
    superuser DSN of the PostgreSQL server (``postgresql://postgres@127.0.0.1:5432/postgres``);
    the run creates a scratch database and roles there and drops them afterwards.
``TENANT_CELERY_RELIABILITY_REDIS_URL``
    Redis (``redis://127.0.0.1:6379``); the load part uses its database 10, the
    replay routes 11, the faults 15.
``TENANT_CELERY_RELIABILITY_AMQP_URL``
    RabbitMQ (``amqp://guest:guest@127.0.0.1:5672//``).

Exit status: 0 when every selected part ran and no invariant was violated;
1 when one was violated, or a part failed or is missing (the others still
run and everything is written); 2 when a service is down or the arguments are
wrong (nothing runs); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from benchmarks import _machine
from benchmarks._scratch import scratch
from benchmarks.runner import (
    DEFAULT_AMQP_URL,
    DEFAULT_DSN,
    DEFAULT_REDIS_URL,
    _finite,
    _redis_base,
    _release_transport_engines,
    _terminate_as_interrupt,
    probe_services,
    select,
)

from ._common import SIZES, ReliabilityContext, Section, Table, Tally

DSN_ENV = "TENANT_CELERY_RELIABILITY_DSN"
REDIS_URL_ENV = "TENANT_CELERY_RELIABILITY_REDIS_URL"
AMQP_URL_ENV = "TENANT_CELERY_RELIABILITY_AMQP_URL"

RESULTS = Path(__file__).resolve().parent / "results"

PARTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # key: (module, title, services it needs besides PostgreSQL)
    "load": ("reliability.load", "Isolation under load", ("redis",)),
    "leaks": ("reliability.leaks", "No tenant setting left on pooled connections", ("redis",)),
    "faults": ("reliability.faults", "Faults survived", ("redis", "amqp")),
    "hostile": ("reliability.hostile", "Hostile input refused", ("redis",)),
}

EXIT_OK, EXIT_VIOLATED, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reliability",
        description="Prove tenant isolation under load, faults survived and hostile input "
        "refused; exit non-zero when any invariant is violated.",
    )
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="default",
        help="smoke: seconds, to prove the suite works; default: >= 20 tenants and "
        ">= 20,000 tasks; full: about 100,000 tasks (default: %(default)s)",
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help="comma-separated parts to run (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write the results as JSON "
        "(default: reliability/results/latest.json, or smoke.json for --size smoke)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        help="where to write the tables as Markdown, included by the docs "
        "(default: reliability/results/latest.md, or smoke.md for --size smoke)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the workers' logs (printed at the end)"
    )
    return parser


def _selected(value: str) -> list[str]:
    return select(value, PARTS, "part")


def _probe(keys: Sequence[str], redis_url: str, amqp_url: str) -> list[str]:
    """What is wrong with the services the selected parts need (empty: nothing)."""
    needed = {service for key in keys for service in PARTS[key][2]}
    return probe_services(
        needed, redis_url, amqp_url, redis_env=REDIS_URL_ENV, amqp_env=AMQP_URL_ENV
    )


def _not_run(title: str, reason: str) -> dict[str, Any]:
    return {"title": title, "not_run": reason, "passed": False, "violations": [reason]}


def _run_one(ctx: ReliabilityContext, key: str) -> dict[str, Any]:
    module_name, title, _ = PARTS[key]
    ctx.say(f"\n=== {key}: {title} ===")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        path = module_name.replace(".", "/") + ".py"
        message = f"{key} ({title}) was not run: {path} is not in this checkout"
        ctx.say(message)
        return _not_run(title, message)
    started = time.monotonic()
    try:
        section: Section = module.run(ctx)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        ctx.say(f"{key} ({title}) failed:\n{traceback.format_exc()}")
        return _not_run(title, f"{key} ({title}) failed: {type(exc).__name__}: {exc}")
    section.duration_s = round(time.monotonic() - started, 1)
    verdict = "passed" if section.passed else "VIOLATED: " + "; ".join(section.all_violations())
    ctx.say(f"{key} done in {section.duration_s} s: {verdict}")
    return section.to_json()


# ------------------------------------------------------------------ the verdict


def summarise(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's totals and verdict from its sections' JSON.

    Every violation is recomputed from each section's tally as well as taken
    from its list, so a part that forgot to flag one cannot pass.
    """
    tallies = [Tally.from_json(s["tally"]) for s in sections.values() if "tally" in s]
    violations = []
    for key, section in sections.items():
        own = list(section.get("violations", []))
        if "tally" in section:
            own += [v for v in Tally.from_json(section["tally"]).violations() if v not in own]
        violations += [f"{key}: {v}" for v in own]
    return {
        "tally": Tally.total(tallies).to_json(),
        "violations": violations,
        "passed": not violations and bool(sections),
    }


def summary_table(summary: dict[str, Any], sections: dict[str, dict[str, Any]]) -> Table:
    """The figures the issue asks for, one line each, with what they must be."""
    t = Tally.from_json(summary["tally"])
    rows: list[list[Any]] = [
        ["tasks run", t.tasks_run, ""],
        ["tenants", t.tenants, ""],
        ["pools", ", ".join(t.pools) or None, ""],
        ["brokers", ", ".join(t.brokers) or None, ""],
        ["cross-tenant observations", t.cross_tenant_observations, "0"],
        ["lost writes", t.lost_writes, "0"],
        ["tasks unaccounted for", t.tasks_unaccounted, "0"],
        ["faults injected", t.faults_injected, ""],
        ["faults survived", t.faults_survived, "all"],
        ["hostile cases tried", t.hostile_tried, ""],
        ["hostile cases refused", t.hostile_refused, "all"],
        ["pooled connections checked", t.connections_checked, ""],
        ["tenant settings left on them", t.leaked_settings, "0"],
    ]
    for key, section in sections.items():
        if section.get("passed"):
            status = "passed"
        else:
            status = "not run" if "not_run" in section else "VIOLATED"
        rows.append([f"part {key}", status, "passed"])
    verdict = "every invariant held" if summary["passed"] else "INVARIANTS VIOLATED"
    notes = [verdict] + [f"violation: {v}" for v in summary["violations"]]
    return Table("Summary", ["", "found", "must be"], rows, notes)


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report as Markdown: the summary, each part's tables, then the machine."""

    def table(data: dict[str, Any]) -> str:
        return Table(data["title"], data["columns"], data["rows"], data["notes"]).render_markdown()

    summary = summary_table(report["summary"], report["sections"])
    summary.title = ""  # the heading says it
    parts = [
        "<!-- written by `python -m reliability`; regenerate it rather than edit it -->",
        "",
        "### Summary",
        "",
        summary.render_markdown(),
    ]
    for key, section in report["sections"].items():
        parts += ["", f"### {key}: {section['title']}", ""]
        if "tables" in section:
            parts.append("\n\n".join(table(t) for t in section["tables"]))
            if section.get("duration_s") is not None:
                parts += ["", f"Ran in {section['duration_s']} s."]
        else:
            parts.append(f"**Not run.** {section['not_run']}")
    parts += ["", "### Machine", "", _machine.machine_table(report["machine"]).render_markdown()]
    return "\n".join(parts) + "\n"


def conclude(
    report: dict[str, Any],
    json_path: Path,
    markdown_path: Path,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Summarise ``report``'s sections, print the summary, write both files; return the status."""
    out, err = out or sys.stdout, err or sys.stderr
    report["summary"] = summarise(report["sections"])
    print("\n" + summary_table(report["summary"], report["sections"]).render_text(), file=out)
    for path, text in (
        (json_path, json.dumps(_finite(report), indent=2, allow_nan=False) + "\n"),
        (markdown_path, render_markdown(report)),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(f"\nwrote {json_path} and {markdown_path}", file=out)
    if report["summary"]["passed"]:
        return EXIT_OK
    for violation in report["summary"]["violations"]:
        print(f"violated: {violation}", file=err)
    return EXIT_VIOLATED


# ------------------------------------------------------------------------- run


def _run(
    args: argparse.Namespace, keys: list[str], dsn: str, redis_url: str, amqp_url: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Create the scratch database, run ``keys`` in order, drop it; return machine and sections."""
    run_id = secrets.token_hex(3)
    workdir = Path(tempfile.mkdtemp(prefix=f"tcrel-{run_id}-"))
    sections: dict[str, dict[str, Any]] = {}
    try:
        with _terminate_as_interrupt(), scratch(dsn, rows_per_tenant=0) as db:
            ctx = ReliabilityContext(
                size=args.size,
                server_url=db.server_url,
                admin_url=db.admin_url,
                app_url=db.app_url,
                app_role=db.app_role,
                plain_url=db.plain_url,
                redis_url=redis_url,
                amqp_url=amqp_url,
                run_id=run_id,
                workdir=workdir,
                admin_dsn=dsn,
                parts=tuple(keys),
            )
            machine = _machine.describe(ctx)
            ctx.say(
                f"reliability {', '.join(keys)} at size {args.size} on {machine['cpu_count']} x "
                f"{machine['cpu_model']}; scratch database {db.database}"
            )
            try:
                for key in keys:
                    sections[key] = _run_one(ctx, key)
            finally:
                ctx.close()
                _release_transport_engines()
    finally:
        if args.keep_logs or not all(s.get("passed") for s in sections.values()):
            print(f"worker logs: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return machine, sections


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        keys = _selected(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    stem = "smoke" if args.size == "smoke" else "latest"
    json_path: Path = args.json or RESULTS / f"{stem}.json"
    markdown_path: Path = args.markdown or RESULTS / f"{stem}.md"
    dsn = os.environ.get(DSN_ENV) or DEFAULT_DSN
    redis_url = _redis_base(os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL)
    amqp_url = os.environ.get(AMQP_URL_ENV) or DEFAULT_AMQP_URL

    problems = _probe(keys, redis_url, amqp_url)
    if problems:
        print("cannot run the reliability suite, a service is unavailable:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_UNAVAILABLE

    started = time.monotonic()
    try:
        machine, sections = _run(args, keys, dsn, redis_url, amqp_url)
    except KeyboardInterrupt:
        print("\ninterrupted: workers stopped, scratch database dropped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as exc:
        print(f"cannot run the reliability suite: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE

    machine.update(
        size=args.size,
        duration_s=round(time.monotonic() - started, 1),
        load_average_end=_machine.load_average(),
    )
    report = {"size": args.size, "machine": machine, "sections": sections}
    status = conclude(report, json_path, markdown_path)
    print(f"total time {machine['duration_s']} s")
    return status
