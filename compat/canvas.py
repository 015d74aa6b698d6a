"""Celery's canvas suite, plain and as tenant tasks: ``python -m compat.canvas SDIST``.

``SDIST`` is Celery's source distribution (the ``.tar.gz`` or the unpacked
directory); ``nox -s canvas`` downloads it and runs this.  Its
``t/integration/test_canvas.py`` is run twice, one run after the other, each
with a private ``redis-server`` of its own as broker and result backend
(:func:`tests._rig.redis_server.private_redis`), so neither run sees the
other's keys nor the machine's Redis:

``plain``
    the suite as Celery's CI runs it: its conftest's session app and the
    prefork worker ``celery.contrib.testing`` starts inside the test process,
    with ``celery.contrib.pytest``'s fixtures; tenant-celery is installed but
    never imported (its pytest plugin is disabled);
``tenant``
    the same, plus :mod:`compat.canvas_tenant`: ``TenantTask`` as the apps'
    ``task_cls``, each test inside a tenant of its own, and fresh signing keys
    in ``TENANT_CELERY_HEADER_SIGNING_KEYS`` for the test process and its
    in-process worker alike.

Each run's JUnit XML, output and (tenant run) worker events are kept in
``--out``; the outcome counts, the tests whose outcome differs and the tenant
events are printed and written to ``summary.json`` there.  The exit status
is 0 when every test has the same outcome in both runs, 1 when one differs,
2 when a run recorded no test.  Arguments after ``--`` go to both pytest runs
(``-- -k chord``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import secrets
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from tests._rig.redis_server import find_redis_server, private_redis

from .canvas_tenant import EVENTS_ENV
from .junit import OUTCOMES, Difference, Results, differences, read_results

SUITE = "t/integration/test_canvas.py"
PROJECT = Path(__file__).resolve().parents[1]
#: Distributions whose versions a summary records.
VERSIONS = (
    "celery", "kombu", "redis", "pytest", "pytest-rerunfailures", "pytest-timeout",
    "tenant-celery",
)  # fmt: skip
_RERUNS = re.compile(r"(\d+) rerun")


@dataclass(frozen=True)
class Run:
    """What one run of the suite gave."""

    name: str
    results: Results
    wall_seconds: float
    summary: str  # pytest's last line: "2 passed, 1 xpassed, 3 rerun in 81.65s"
    exit_status: int

    @property
    def reruns(self) -> int:
        """Test runs pytest-rerunfailures repeated (the XML records only the last)."""
        match = _RERUNS.search(self.summary)
        return int(match.group(1)) if match else 0


def unpack(sdist: Path, into: Path) -> Path:
    """The directory of the unpacked sdist (``sdist`` itself when it is a directory)."""
    if sdist.is_dir():
        return sdist
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        archive.extractall(into, filter="data")
    return into / top


def suite_environment(redis_port: int, *, tenant: bool, events: Path) -> dict[str, str]:
    """The environment of one run: the private Redis for everything, keys for the tenant run.

    The suite's ``get_redis_connection()`` reads ``REDIS_HOST``/``REDIS_PORT``
    (db 0) whatever ``TEST_BROKER``/``TEST_BACKEND`` say, so all point at the
    same server, results in db 0.  No ``TENANT_CELERY_*`` setting of the
    caller's environment reaches either run.
    """
    url = f"redis://127.0.0.1:{redis_port}/0"
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TENANT_CELERY_") and key != EVENTS_ENV
    }
    environ.update(
        TEST_BROKER=url,
        TEST_BACKEND=url,
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=str(redis_port),
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT), environ.get("PYTHONPATH")])),
    )
    if tenant:
        environ["TENANT_CELERY_HEADER_SIGNING_KEYS"] = secrets.token_urlsafe(48)
        environ[EVENTS_ENV] = str(events)
    return environ


def pytest_command(junit: Path, *, tenant: bool, extra: Sequence[str]) -> list[str]:
    """The pytest command line of one run, to be run in the sdist's directory."""
    # The venv's script, not ``python -m pytest``: that would put the sdist's
    # directory, and its copy of the ``celery`` package, first on sys.path.
    command = [str(Path(sys.executable).with_name("pytest")), SUITE]
    command += ["-p", "celery.contrib.pytest", "-p", "no:tenant_celery", "-p", "no:cacheprovider"]
    if tenant:
        command += ["-p", "compat.canvas_tenant"]
    return [*command, f"--junitxml={junit}", "-rfE", *extra]


def run_suite(name: str, suite: Path, out: Path, extra: Sequence[str], *, tenant: bool) -> Run:
    """Run the suite once on a fresh private Redis, its output shown and kept in ``out``."""
    junit, log, events = out / f"{name}.xml", out / f"{name}.log", out / f"{name}-events.tsv"
    for stale in (junit, events):
        stale.unlink(missing_ok=True)
    print(f"\n==== {name} run ====", flush=True)
    with private_redis(appendonly=False) as redis, log.open("w") as kept:
        command = pytest_command(junit, tenant=tenant, extra=extra)
        environ = suite_environment(redis.port, tenant=tenant, events=events)
        began = time.monotonic()
        with subprocess.Popen(
            command, cwd=suite, env=environ, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace",
        ) as pytest:  # fmt: skip
            assert pytest.stdout is not None
            tail = ""
            for line in pytest.stdout:
                sys.stdout.write(line)
                kept.write(line)
                tail = line if line.startswith("=") else tail
        wall = time.monotonic() - began
    return Run(name, read_results(junit), wall, tail.strip("= \n"), pytest.returncode)


def tenant_events(path: Path) -> dict[str, Any]:
    """What the tenant run's worker recorded: tasks entered, tenants, refusals by reason."""
    entered, tenants, refused = 0, set(), Counter[str]()
    if path.exists():
        for line in path.read_text().splitlines():
            kind, detail, _task = line.split("\t")
            if kind == "entered":
                entered += 1
                tenants.add(detail)
            else:
                refused[detail] += 1
    return {"entered": entered, "tenants": len(tenants), "refused": dict(refused)}


def versions() -> dict[str, str]:
    """Installed versions of :data:`VERSIONS`, the Python and the redis-server used."""
    found = {"python": sys.version.split()[0]}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    server = subprocess.run(
        [find_redis_server(), "--version"], capture_output=True, text=True, check=False
    )
    found["redis-server"] = (re.findall(r"v=(\S+)", server.stdout) or ["?"])[0]
    return found


def commit() -> str:
    """The project's commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty=+dirty", "--abbrev=7"],
        cwd=PROJECT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    return described.stdout.strip() or "unknown"


def report(
    runs: Sequence[Run], found: list[Difference], events: dict[str, Any], out: TextIO
) -> None:
    """Print the outcome counts, the differing tests and the tenant run's events."""
    print("\n==== Celery canvas suite: plain and tenant runs ====", file=out)
    print(f"{'run':8}" + "".join(f"{o:>9}" for o in (*OUTCOMES, "total", "reruns")), file=out)
    for run in runs:
        counts = run.results.counts()
        cells = [*counts.values(), sum(counts.values()), run.reruns]
        print(
            f"{run.name:8}" + "".join(f"{c:>9}" for c in cells)
            + f"   wall {run.wall_seconds:.0f} s, pytest {run.results.seconds:.0f} s,"
            f" exit {run.exit_status}",
            file=out,
        )  # fmt: skip
    # JUnit XML records an unexpected pass (XPASS) as a pass: pytest's own counts tell them apart.
    for run in runs:
        print(f"{run.name} run, pytest's summary: {run.summary}", file=out)
    print(
        f"tenant run's worker: {events['entered']} tenant task runs in {events['tenants']} "
        f"tenants; refused: {events['refused'] or 'none'}",
        file=out,
    )
    if not found:
        print("every test has the same outcome in both runs", file=out)
        return
    print(f"{len(found)} tests differ (plain -> tenant):", file=out)
    for difference in found:
        print(f"  {difference.test}: {difference.first} -> {difference.second}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compat.canvas", usage="%(prog)s SDIST --out DIR [-- PYTEST_ARGS...]"
    )
    parser.add_argument("sdist", type=Path, help="Celery's sdist: the .tar.gz or its directory")
    parser.add_argument("--out", type=Path, required=True, help="directory for results")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    pytest_args = argv[split + 1 :]
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    suite = unpack(args.sdist.resolve(), out)
    began = time.strftime("%Y-%m-%d %H:%M:%S %z")
    try:
        runs = [
            run_suite("plain", suite, out, pytest_args, tenant=False),
            run_suite("tenant", suite, out, pytest_args, tenant=True),
        ]
    except ValueError as exc:  # a run recorded no test
        print(f"compat.canvas: {exc}", file=sys.stderr)
        return 2
    found = differences(runs[0].results, runs[1].results)
    events = tenant_events(out / "tenant-events.tsv")
    report(runs, found, events, sys.stdout)
    summary = {
        "began": began,
        "commit": commit(),
        "suite": str(suite / SUITE),
        "versions": versions(),
        "runs": {
            run.name: {
                "counts": run.results.counts(),
                "reruns": run.reruns,
                "pytest_summary": run.summary,
                "wall_seconds": round(run.wall_seconds, 1),
                "pytest_seconds": round(run.results.seconds, 1),
                "exit_status": run.exit_status,
            }
            for run in runs
        },
        "tenant_events": events,
        "differences": [asdict(difference) for difference in found],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results in {out}", flush=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
