"""``python -m benchmarks``: run the benchmarks, print their tables, write JSON and Markdown.

Environment (local defaults):

``TENANT_CELERY_BENCH_DSN``
    superuser DSN of the PostgreSQL server (``postgresql://postgres@127.0.0.1:5432/postgres``);
    the run creates a scratch database and roles there and drops them afterwards.
``TENANT_CELERY_BENCH_REDIS_URL``
    Redis (``redis://127.0.0.1:6379``); the run uses its databases 12 and 13.
``TENANT_CELERY_BENCH_AMQP_URL``
    RabbitMQ (``amqp://guest:guest@127.0.0.1:5672//``).
``TENANT_CELERY_BENCH_SOAK_TASKS``, ``TENANT_CELERY_BENCH_SOAK_SECONDS``
    the soak's task count, and a cap on its publishing time (:mod:`benchmarks.soak`).

Exit status: 0 when every selected benchmark ran, 1 when one failed or is
missing (the others still run and are written), 2 when a service is down or
the arguments are wrong (nothing runs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import kombu
import redis
from kombu.utils.url import maybe_sanitize_url

from . import _machine
from ._common import SIZES, BenchContext, Section, Table
from ._scratch import scratch

DSN_ENV = "TENANT_CELERY_BENCH_DSN"
REDIS_URL_ENV = "TENANT_CELERY_BENCH_REDIS_URL"
AMQP_URL_ENV = "TENANT_CELERY_BENCH_AMQP_URL"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"

RESULTS = Path(__file__).resolve().parent / "results"

BENCHMARKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # key: (module, title, services it needs besides PostgreSQL)
    "p1": ("benchmarks.tenancy_overhead", "Tenancy overhead", ("redis",)),
    "p2": ("benchmarks.rls_cost", "RLS cost", ()),
    "p3": ("benchmarks.throughput", "Throughput by broker and result backend", ("redis", "amqp")),
    "p3-events": (
        "benchmarks.events_overhead",
        "Throughput with worker events on and off",
        ("redis",),
    ),
    "p4": ("benchmarks.observability", "Observability overhead", ("redis",)),
    "p5": ("benchmarks.fairness", "Tenant fairness", ("redis",)),
    "results": (
        "benchmarks.results_backend",
        "Database result backend: NullPool against pooled",
        (),
    ),
    "guard": (
        "benchmarks.statement_guard",
        "bind_tenant_guc: per-statement check and check-in reset",
        (),
    ),
    "scale": (
        "benchmarks.scale",
        "Scale curve: workers against one PostgreSQL, and wake-ups",
        ("redis",),
    ),
    "soak": (
        "benchmarks.soak",
        "Soak: tasks through the transport at a sustained rate",
        (),
    ),
}

OPT_IN = ("soak",)
"""Benchmarks run at the default size only when ``--only`` names them: the soak runs
a million tasks. At the smoke size every benchmark runs, the soak for seconds."""

ROWS_PER_TENANT = {"smoke": 20, "default": 2000}
"""Rows per seeded tenant in the items table before timing (50 tenants)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark tenant-celery against baselines measured in the same run.",
    )
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="default",
        help="smoke: seconds, for CI; default: the published counts (default: %(default)s)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated benchmarks to run (default: all of {', '.join(BENCHMARKS)}, "
        f"except {', '.join(OPT_IN)} at the default size)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write the results as JSON "
        "(default: benchmarks/results/latest.json, or smoke.json for --size smoke)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        help="where to write the tables as Markdown, included by the docs "
        "(default: benchmarks/results/latest.md, or smoke.md for --size smoke)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the workers' logs (printed at the end)"
    )
    return parser


def select(value: str, registry: dict[str, Any], noun: str) -> list[str]:
    """The keys of ``registry`` that ``--only`` names, in the registry's order.

    Raises:
        ValueError: a name is not in ``registry``, or none is given.
    """
    keys = [key.strip().lower() for key in value.split(",") if key.strip()]
    unknown = [key for key in keys if key not in registry]
    if unknown or not keys:
        raise ValueError(
            f"--only: unknown {noun} {', '.join(unknown) or '(none given)'}; "
            f"choose among {', '.join(registry)}"
        )
    return [key for key in registry if key in keys]  # always in order


def _selected(value: str | None, size: str = "default") -> list[str]:
    """What ``--only`` selects; without it, every benchmark but :data:`OPT_IN` ones at
    the default size."""
    if value is None:
        return [key for key in BENCHMARKS if size == "smoke" or key not in OPT_IN]
    return select(value, BENCHMARKS, "benchmark")


def _redis_base(url: str) -> str:
    """``url`` without a database number: the benchmarks choose their own."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))


def probe_services(
    needed: set[str], redis_url: str, amqp_url: str, *, redis_env: str, amqp_env: str
) -> list[str]:
    """What is wrong with the ``needed`` services (``"redis"``, ``"amqp"``); empty: nothing.

    ``redis_env`` and ``amqp_env`` name the variables that set the URLs, for the messages.
    """
    problems = []
    if "redis" in needed:
        try:
            client = redis.Redis.from_url(redis_url, socket_connect_timeout=3, socket_timeout=3)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:  # any failure means it cannot be used
            problems.append(f"Redis at {redis_url} ({redis_env}): {type(exc).__name__}: {exc}")
    if "amqp" in needed:
        try:
            with kombu.Connection(amqp_url, connect_timeout=3) as conn:
                conn.ensure_connection(max_retries=1)
        except Exception as exc:  # any failure means it cannot be used
            shown = maybe_sanitize_url(amqp_url)
            problems.append(f"RabbitMQ at {shown} ({amqp_env}): {type(exc).__name__}: {exc}")
    return problems


def _probe(keys: Sequence[str], redis_url: str, amqp_url: str) -> list[str]:
    needed = {service for key in keys for service in BENCHMARKS[key][2]}
    return probe_services(
        needed, redis_url, amqp_url, redis_env=REDIS_URL_ENV, amqp_env=AMQP_URL_ENV
    )


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so workers are stopped and the database dropped."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_one(ctx: BenchContext, key: str) -> dict[str, Any]:
    module_name, title, _ = BENCHMARKS[key]
    ctx.say(f"\n=== {key}: {title} ===")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        path = module_name.replace(".", "/") + ".py"
        message = f"{key} ({title}) was not run: {path} is not in this checkout"
        ctx.say(message)
        return {"title": title, "missing": message}
    started = time.monotonic()
    try:
        section: Section = module.run(ctx)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        ctx.say(f"{key} ({title}) failed:\n{traceback.format_exc()}")
        return {"title": title, "error": f"{type(exc).__name__}: {exc}"}
    section.duration_s = round(time.monotonic() - started, 1)
    ctx.say(f"{key} done in {section.duration_s} s")
    return section.to_json()


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report as Markdown: the machine, then each benchmark's tables."""

    def table(data: dict[str, Any]) -> str:
        return Table(data["title"], data["columns"], data["rows"], data["notes"]).render_markdown()

    parts = [
        "<!-- written by `python -m benchmarks`; regenerate it rather than edit it -->",
        "",
        "### Machine",
        "",
        _machine.machine_table(report["machine"]).render_markdown(),
        "",
        "### Results",
    ]
    for key, section in report["sections"].items():
        parts.append("")
        if "tables" in section:
            parts.append("\n\n".join(table(t) for t in section["tables"]))
        else:
            reason = section.get("missing") or section.get("error")
            parts.append(f"**{key.upper()} {section['title']}** was not run: {reason}")
    return "\n".join(parts) + "\n"


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by ``None``: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _run(
    args: argparse.Namespace, keys: list[str], dsn: str, redis_url: str, amqp_url: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Create the scratch database, run ``keys`` in order, drop it; return machine and sections."""
    run_id = secrets.token_hex(3)
    workdir = Path(tempfile.mkdtemp(prefix=f"tcbench-{run_id}-"))
    sections: dict[str, dict[str, Any]] = {}
    try:
        with (
            _terminate_as_interrupt(),
            scratch(dsn, rows_per_tenant=ROWS_PER_TENANT[args.size]) as db,
        ):
            ctx = BenchContext(
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
            )
            machine = _machine.describe(ctx)
            ctx.say(
                f"benchmarks {', '.join(keys)} at size {args.size} on {machine['cpu_count']} x "
                f"{machine['cpu_model']}; scratch database {db.database}"
            )
            try:
                for key in keys:
                    sections[key] = _run_one(ctx, key)
            finally:
                ctx.dispose()
                _release_transport_engines()
    finally:
        failed = any("tables" not in s for s in sections.values())
        if (args.keep_logs or failed) and any(workdir.iterdir()):
            print(f"worker logs: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return machine, sections


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        keys = _selected(args.only, args.size)
    except ValueError as exc:
        parser.error(str(exc))
    stem = "latest" if args.size == "default" else args.size
    json_path: Path = args.json or RESULTS / f"{stem}.json"
    markdown_path: Path = args.markdown or RESULTS / f"{stem}.md"
    dsn = os.environ.get(DSN_ENV) or DEFAULT_DSN
    redis_url = _redis_base(os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL)
    amqp_url = os.environ.get(AMQP_URL_ENV) or DEFAULT_AMQP_URL

    problems = _probe(keys, redis_url, amqp_url)
    if problems:
        print("cannot run the benchmarks, a service is unavailable:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2

    started = time.monotonic()
    try:
        machine, sections = _run(args, keys, dsn, redis_url, amqp_url)
    except KeyboardInterrupt:
        print("\ninterrupted: workers stopped, scratch database dropped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"cannot run the benchmarks: {exc}", file=sys.stderr)
        return 2

    machine.update(
        size=args.size,
        duration_s=round(time.monotonic() - started, 1),
        load_average_end=_machine.load_average(),
    )
    report = {"size": args.size, "machine": machine, "sections": sections}
    if json_path.is_file():
        with contextlib.suppress(ValueError, OSError):
            carry_over(json.loads(json_path.read_text(encoding="utf-8")), report)
    for path, text in (
        (json_path, json.dumps(_finite(report), indent=2, allow_nan=False) + "\n"),
        (markdown_path, render_markdown(report)),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(f"\nwrote {json_path} and {markdown_path} in {machine['duration_s']} s")
    failed = [key for key, section in sections.items() if "tables" not in section]
    for key in failed:
        print(
            f"{key}: {sections[key].get('missing') or sections[key].get('error')}", file=sys.stderr
        )
    return 1 if failed else 0


def carry_over(previous: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """Keep in ``report`` the :data:`OPT_IN` sections of ``previous`` (the file it
    replaces) that this run did not measure, if both are of one size: a run without
    the soak leaves the last soak in place.  Returns the keys carried over."""
    if previous.get("size") != report["size"]:
        return []
    kept = [
        key
        for key in OPT_IN
        if key not in report["sections"] and "tables" in previous.get("sections", {}).get(key, {})
    ]
    for key in kept:
        report["sections"][key] = previous["sections"][key]
    return kept


def _release_transport_engines() -> None:
    """Close the engines kombu's SQLAlchemy transport keeps per URL, before the drop."""
    with contextlib.suppress(ImportError):
        from kombu.transport.sqlalchemy import Channel  # noqa: PLC0415

        for engine, _session in list(Channel._engines.values()):
            engine.dispose()
        Channel._engines.clear()
