"""Every install line the README and the docs give, run in a bare virtualenv.

:func:`install_lines` finds each ``pip install`` line of ``README.md`` and
``docs/**/*.md`` (console blocks and inline code alike).  Each distinct line is
installed into its own fresh virtualenv holding nothing but what that line
brings: ``tenant-celery`` is the wheel built from this checkout, once per
session, and everything else comes from the package index, exactly as a user's
``pip`` resolves it.  Then the page's own commands run in that environment,
against the real services, through the checks in :data:`PAGE_CHECKS`:

* the README and the demo page: ``tenant-celery demo``;
* the quickstart: every console command and Python session of the page, in
  page order (:mod:`tests.acceptance.bare_page`), a real worker included;
* the PostgreSQL-broker how-to: the bundled migration, then the page's example
  app on the package's transport, a real worker, one task;
* the sessions how-to and the db reference (``asyncio``): an async engine bound
  with the package's helper, reading its tenant as the app role;
* the monitoring how-to and the metrics reference (``prometheus``): the metrics
  installed on an app and exposed in Prometheus' text format;
* the Flower how-to (``tenant-celery flower``): the broker how-to's steps, then
  the page's worker with events on, Flower, the event dump, a tenant task, and
  what the page shows Flower's API, the dump and ``celery inspect active`` print.

``pip install -e '.[dev]'`` (the README's test-suite line, and the pages that
run the benchmarks and the compatibility matrix) is the line ``.ci/run`` itself
runs, in a virtualenv it creates on a fresh clone: that is its bare run.

A page with an install line and no check here fails
:func:`test_every_install_line_has_a_check`.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
import venv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests._rig.postgres import Database, PgCluster
from tests._rig.redis_server import free_port
from tests._rig.services import Services, purge_redis_queue
from tests.acceptance.bare_page import BarePage, stop_process_group
from tests.docs.blocks import Block, page_blocks
from tests.docs.harness import Command, commands

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

#: ``pip install`` and its arguments, up to the end of the command (a backtick,
#: ``&&``, a comment or the end of the line).
_PIP_INSTALL = re.compile(r"pip install\s+(?P<args>[^`#\n&]+)")
#: The editable development install, which ``.ci/run`` performs (see the module doc).
DEV_LINE = ("-e", ".[dev]")


@dataclass(frozen=True)
class InstallLine:
    """One ``pip install`` of a page: where it is and what it installs."""

    page: str  # relative to the repository: README.md, docs/howto/rls.md
    line: int
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: pip install {shlex.join(self.args)}"


def install_lines() -> list[InstallLine]:
    """Every ``pip install`` in the README and the docs, in page order."""
    found: list[InstallLine] = []
    sources = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    for path in sources:
        if "_build" in path.parts:
            continue
        for number, text in enumerate(path.read_text().splitlines(), start=1):
            for match in _PIP_INSTALL.finditer(text):
                args = tuple(shlex.split(match["args"].strip()))
                found.append(InstallLine(str(path.relative_to(ROOT)), number, args))
    return found


# ------------------------------------------------------------- environments


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built from this checkout, as ``pip`` builds it for a user."""
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("tenant_celery-*.whl")
    return path


@dataclass
class BareEnv:
    """A virtualenv holding only what one install line brought."""

    root: Path
    line: tuple[str, ...]

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def environ(self, **extra: str) -> dict[str, str]:
        """The environment of a shell with this virtualenv activated, and nothing of
        the test run's own (no ``PYTHONPATH``, no ``VIRTUAL_ENV`` of the dev venv)."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PYTHON", "VIRTUAL_ENV", "PYTEST", "COV_"))
        }
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.root)
        env.update(extra)
        return env

    def run(
        self, command: list[str], *, cwd: Path, timeout: float = 120, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=cwd, env=self.environ(**extra), capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    def install(self, args: list[str], wheel: Path) -> None:
        """``pip install`` what an install line names, as :func:`_requirement` maps it."""
        requirements = [_requirement(arg, wheel) for arg in args]
        done = self.run(
            [str(self.python), "-m", "pip", "install", "--quiet", *requirements],
            cwd=self.root, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, f"pip install {shlex.join(args)}\n{done.stderr[-3000:]}"

    def installed(self) -> set[str]:
        """Normalised names of the distributions installed here."""
        listed = self.run([str(self.python), "-m", "pip", "list", "--format=freeze"], cwd=self.root)
        assert listed.returncode == 0, listed.stderr
        return {
            re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
            for line in listed.stdout.splitlines()
        }


def _requirement(arg: str, wheel: Path) -> str:
    """``tenant-celery[x]`` as the wheel from this checkout, ``.[x]`` (a checkout's
    line) as this checkout; anything else unchanged."""
    if arg == "." or arg.startswith(".["):
        return f"{ROOT}{arg[1:]}"
    match = re.fullmatch(r"tenant-celery(?P<extras>\[[^\]]*\])?", arg)
    if match is None:
        return arg
    return f"tenant-celery{match['extras'] or ''} @ {wheel.as_uri()}"


class BareEnvs:
    """Bare virtualenvs: one per distinct install line, made on first use and shared
    by the pages giving that line, or a fresh one that a page installs more into."""

    def __init__(self, base: Path, wheel: Path) -> None:
        self._base = base
        self.wheel = wheel
        self._envs: dict[tuple[str, ...], BareEnv] = {}
        self._made = 0

    def __call__(self, line: InstallLine, *, fresh: bool = False) -> BareEnv:
        if fresh or line.args not in self._envs:
            root = self._base / f"env{self._made}"
            self._made += 1
            venv.create(root, with_pip=True)
            env = BareEnv(root, line.args)
            env.install(list(line.args), self.wheel)
            if fresh:
                return env
            self._envs[line.args] = env
        return self._envs[line.args]


@pytest.fixture(scope="session")
def bare_envs(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> BareEnvs:
    return BareEnvs(tmp_path_factory.mktemp("bare"), wheel)


# ------------------------------------------------------------------- checks


@dataclass
class Context:
    """What a page's check gets: its bare environment, a scratch directory and the
    services (a scratch database is made only for the checks that ask for it)."""

    env: BareEnv
    line: InstallLine
    wheel: Path
    workdir: Path
    services: Services
    database: Callable[[], Database]
    cluster: Callable[[], PgCluster]

    def superuser_dsn(self) -> str:
        """A libpq URL of the test server, as its superuser."""
        url = self.cluster().admin_url.set(drivername="postgresql")
        return url.render_as_string(hide_password=False)


Check = Callable[[Context], None]
#: Checks that run the page's own install lines, in page order, in a fresh
#: virtualenv made from its first one (the page installs more as it goes).
RUN_WHOLE_PAGE: set[str] = set()


def check_demo(ctx: Context) -> None:
    """``tenant-celery demo``, on the embedded PostgreSQL the ``embedded`` extra brings."""
    demo = ctx.env.run(["tenant-celery", "demo"], cwd=ctx.workdir, timeout=180)
    assert demo.returncode == 0, demo.stderr[-3000:] + demo.stdout[-3000:]
    assert "every tenant saw exactly its own rows" in demo.stdout
    assert "rows visible with no tenant set: 0" in demo.stdout


def check_demo_page(ctx: Context) -> None:
    """The demo page's commands: the demo on the embedded PostgreSQL, then with
    ``--dsn`` on the test server (the URL the page shows is a placeholder for it)."""
    page = BarePage(
        "tutorial/demo.md",
        ctx.env.bin,
        ctx.workdir,
        environ=ctx.env.environ(),
        install=lambda args: ctx.env.install(args, ctx.wheel),
        substitutions={"postgresql://postgres:secret@localhost:5432/postgres": ctx.superuser_dsn()},
    )
    page.run()


def check_quickstart(ctx: Context) -> None:
    """Every command and Python session of the quickstart, in page order."""
    redis = ctx.services.redis()
    page = BarePage(
        "tutorial/quickstart.md",
        ctx.env.bin,
        ctx.workdir,
        # The page's worker and shell name Redis on localhost:6379; Celery lets the
        # environment point both at the test run's own Redis database instead.
        environ=ctx.env.environ(CELERY_BROKER_URL=redis, CELERY_RESULT_BACKEND=redis),
        install=lambda args: ctx.env.install(args, ctx.wheel),
    )
    queues = ("celery", "billing")  # part 1's worker reads Celery's default queue
    for queue in queues:
        purge_redis_queue(redis, queue)
    try:
        page.run()
    finally:
        for queue in queues:
            purge_redis_queue(redis, queue)
        # The page ends with `python setup_db.py --drop`; when it failed before
        # that, remove what part 2 made all the same (the embedded server too).
        if (ctx.workdir / "setup_db.py").exists():
            ctx.env.run(["python", "setup_db.py", "--drop"], cwd=ctx.workdir)


def check_postgres_broker(ctx: Context) -> None:
    """The how-to's steps: the bundled migration granted to the app role, then its
    example app on the package's transport, a real worker, one tenant task."""
    database = ctx.database()
    for name in ("billing.py", "celeryconfig.py"):
        (ctx.workdir / name).write_text((ROOT / "examples" / "postgres_broker" / name).read_text())
    admin_url = database.url.set(drivername="postgresql+psycopg")
    app_url = database.app_url.set(drivername="postgresql+psycopg")
    migrate = ctx.env.run(
        [
            "python", "-c",
            "import sys; from tenant_celery.migrations import upgrade;"
            " upgrade(sys.argv[1], grant_to=[sys.argv[2]])",
            admin_url.render_as_string(hide_password=False), str(app_url.username),
        ],
        cwd=ctx.workdir,
    )  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    environ = {"BILLING_DATABASE_URL": app_url.render_as_string(hide_password=False)}
    log = ctx.workdir / "worker.log"
    with _background(
        ctx.env,
        ["celery", "-A", "billing", "worker", "--pool=solo", "--loglevel=INFO"],
        ctx.workdir,
        log,
        environ,
    ):
        publish = ctx.env.run(
            [
                "python", "-c",
                "from billing import send_invoice\n"
                "from tenant_celery import tenant_context\n"
                "with tenant_context('0b7e4c1a-5a43-4f5e-9d1c-2f6a1c9e7b10'):\n"
                "    result = send_invoice.delay(7)\n"
                "print(result.get(timeout=60))\n",
            ],
            cwd=ctx.workdir, timeout=120, **environ,
        )  # fmt: skip
        assert publish.returncode == 0, publish.stderr[-3000:] + "\n" + log.read_text()[-3000:]
    assert publish.stdout.strip() == (
        "invoice 7 sent for tenant 0b7e4c1a-5a43-4f5e-9d1c-2f6a1c9e7b10"
    )


_ASYNC_SCRIPT = """
import asyncio, sys
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from tenant_celery import bind_tenant_guc, tenant_context

async def main() -> None:
    engine = create_async_engine(sys.argv[1])
    bind_tenant_guc(engine)
    with tenant_context("0b7e4c1a-5a43-4f5e-9d1c-2f6a1c9e7b10"):
        async with engine.begin() as conn:
            who = await conn.scalar(text("SELECT current_user"))
            tenant = await conn.scalar(text("SELECT current_setting('app.current_tenant_id')"))
    await engine.dispose()
    print(who, tenant)

asyncio.run(main())
"""


def check_asyncio(ctx: Context) -> None:
    """An async engine bound with the package's helper reads its tenant, as the app role."""
    database = ctx.database()
    url = database.async_app_url
    done = ctx.env.run(
        ["python", "-c", _ASYNC_SCRIPT, url.render_as_string(hide_password=False)],
        cwd=ctx.workdir,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(url.username), "0b7e4c1a-5a43-4f5e-9d1c-2f6a1c9e7b10"]


_METRICS_SCRIPT = """
from celery import Celery
from prometheus_client import generate_latest
from tenant_celery import tenant_context, tenant_task
from tenant_celery.metrics import install_metrics

app = Celery("shop", broker="memory://", set_as_current=False)
app.conf.task_always_eager = True
install_metrics(app)

@tenant_task(app=app)
def ping() -> str:
    return "pong"

with tenant_context("0b7e4c1a-5a43-4f5e-9d1c-2f6a1c9e7b10"):
    ping.delay().get()
print(generate_latest().decode())
"""


def check_prometheus(ctx: Context) -> None:
    """The task metrics installed on an app count a task, in Prometheus' text format."""
    done = ctx.env.run(["python", "-c", _METRICS_SCRIPT], cwd=ctx.workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '\ncelery_task_success_total{task_name="shop.ping"} 1.0\n' in done.stdout, done.stdout


FLOWER_PAGE = "howto/flower.md"
#: A task event line of ``celery events --dump``: the event and what follows the task.
_DUMP_EVENT = re.compile(
    r"\] (?P<event>task \w+): (?P<name>[\w.]+)\((?P<id>[0-9a-f-]{36})\) (?P<rest>.*)$"
)
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _page_commands(page: str) -> tuple[list[Command], list[Block]]:
    """The ``$`` commands of a page's console blocks, and its other blocks, in order."""
    found: list[Command] = []
    others: list[Block] = []
    for block in page_blocks(page):
        if block.kind == "console":
            found.extend(commands(block))
        else:
            others.append(block)
    return found, others


def _one(found: list[Command], pattern: str) -> Command:
    """The one command of ``found`` that ``pattern`` matches from its start."""
    matching = [command for command in found if re.match(pattern, command.text)]
    assert len(matching) == 1, f"{FLOWER_PAGE}: commands matching {pattern!r}: {matching}"
    return matching[0]


def _dump_fields(line: str) -> tuple[str, set[str], str | None]:
    """A dump line's event (``task received``), its field names and its ``tenant_id``."""
    match = _DUMP_EVENT.search(line)
    assert match is not None, line
    rest = match["rest"]
    tenant = re.search(r"(?:^|, )tenant_id=([^,]*)", rest)
    names = set(re.findall(r"(?:^|[ ,])([a-z_]+)=", rest))
    return match["event"], names, tenant.group(1) if tenant else None


def _inspect_entry(output: str) -> dict[str, object]:
    """The one task ``celery inspect active`` printed (a ``* {...}`` line)."""
    assert re.search(r"^->\s+celery@\S+: OK$", output, re.M), output
    assert re.search(r"^1 node online\.$", output, re.M), output
    (entry,) = [line.strip()[2:] for line in output.splitlines() if line.strip().startswith("* {")]
    parsed = ast.literal_eval(entry)
    assert isinstance(parsed, dict), entry
    return parsed


def check_flower(ctx: Context) -> None:
    """The Flower how-to, as a reader runs it after the broker how-to: the page's
    worker with events on, its Flower and event dump, its tenant task; then the page's
    API query, dump excerpt and ``inspect active`` output are what the tools print
    (field names, the tenant; not times and ids)."""
    check_postgres_broker(ctx)  # the page starts from the broker how-to's database
    database = ctx.database()
    found, others = _page_commands(FLOWER_PAGE)
    export = re.fullmatch(r"export (\w+)=postgresql\+psycopg://\S+", _one(found, "export ").text)
    assert export is not None, found
    worker = _one(found, r"celery -A billing worker ")
    flower = _one(found, r"celery -A billing flower\b")
    dump = _one(found, r"celery -A billing events --dump$")
    query = _one(found, r"curl ")
    inspect = _one(found, r"celery -A billing inspect active$")
    (send,) = [block for block in others if block.kind == "python"]
    (dumped_excerpt,) = [block for block in others if block.kind == "text"]
    assert "-E" in shlex.split(worker.text), worker
    credentials = re.search(r"--basic-auth=(\S+)", flower.text)
    assert credentials is not None, flower
    tenant = re.search(r'tenant_context\("([^"]+)"\)', send.source)
    assert tenant is not None, send
    tenant_id = tenant.group(1)

    app_url = database.app_url.set(drivername="postgresql+psycopg")
    environ = {export.group(1): app_url.render_as_string(hide_password=False)}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    auth = "Basic " + base64.b64encode(credentials.group(1).encode()).decode()

    def flower_get(path: str) -> str:
        request = urllib.request.Request(base + path, headers={"Authorization": auth})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return ""

    def run(command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = command.replace("http://localhost:5555", base)
        return ctx.env.run(["bash", "-c", command], cwd=ctx.workdir, timeout=timeout, **environ)

    dump_log = ctx.workdir / "events.log"
    flower_env = {**environ, "FLOWER_PORT": str(port), "FLOWER_ADDRESS": "127.0.0.1"}
    with contextlib.ExitStack() as running:
        worker_log = ctx.workdir / "worker-events.log"
        running.enter_context(
            _background(ctx.env, shlex.split(worker.text), ctx.workdir, worker_log, environ)
        )
        _wait_for("the worker", lambda: "ready." in worker_log.read_text(), worker_log)
        flower_log = ctx.workdir / "flower.log"
        running.enter_context(
            _background(ctx.env, shlex.split(flower.text), ctx.workdir, flower_log, flower_env)
        )
        running.enter_context(
            _background(ctx.env, shlex.split(dump.text), ctx.workdir, dump_log, environ)
        )
        # Both monitors hear the worker before the task is sent.
        _wait_for(
            "Flower to hear the worker",
            lambda: "flower_worker_online{" in flower_get("/metrics"),
            flower_log,
        )
        _wait_for(
            "the dump to print a heartbeat", lambda: "heartbeat" in dump_log.read_text(), dump_log
        )

        sent = ctx.env.run(["python", "-c", send.source], cwd=ctx.workdir, **environ)
        assert sent.returncode == 0, sent.stderr[-3000:] + "\n" + worker_log.read_text()[-3000:]
        assert sent.stdout.strip() == f"invoice 1001 sent for tenant {tenant_id}", sent.stdout

        # The page's API query lists the task, as the page shows it.
        def listed() -> str:
            done = run(query.text)
            return done.stdout if done.returncode == 0 and "SUCCESS" in done.stdout else ""

        output = _wait_for("Flower's API to list the task", listed, flower_log)
        line = rf"{_UUID} billing\.send_invoice SUCCESS"
        assert re.fullmatch(line, query.expected.strip()), query.expected
        assert re.fullmatch(line, output.strip()), output
        task_id = output.split()[0]
        info = json.loads(flower_get(f"/api/task/info/{task_id}"))
        assert info["tenant_id"] == tenant_id, info
        assert json.loads(flower_get("/api/tasks"))[task_id]["tenant_id"] == tenant_id

        # The dump printed the task's events with the fields the page's excerpt shows.
        def dumped() -> str:
            text = dump_log.read_text()
            return text if f"task succeeded: billing.send_invoice({task_id})" in text else ""

        text = _wait_for("the dump to print the task's success", dumped, dump_log)
        printed = {
            event: (names, tenant)
            for event, names, tenant in map(
                _dump_fields, [ln for ln in text.splitlines() if f"({task_id})" in ln]
            )
        }
        shown = [_dump_fields(ln) for ln in dumped_excerpt.source.splitlines() if ln.strip()]
        assert [event for event, _, _ in shown] == [
            "task received",
            "task started",
            "task succeeded",
        ]
        for event, names, shown_tenant in shown:
            assert shown_tenant == tenant_id, event
            assert printed[event] == (names, tenant_id), (event, printed[event], names)

        # inspect active, while a task runs: results held back with a lock, so the
        # task waits to store its result, still active, until the lock goes.
        with database.admin_engine().begin() as conn:
            conn.execute(sa.text("LOCK TABLE celery_taskmeta IN SHARE MODE"))
            held = ctx.env.run(
                ["python", "-c",
                 "from billing import send_invoice\n"
                 "from tenant_celery import tenant_context\n"
                 f"with tenant_context({tenant_id!r}):\n"
                 "    print(send_invoice.delay(1002).id)\n"],
                cwd=ctx.workdir, **environ,
            )  # fmt: skip
            assert held.returncode == 0, held.stderr[-3000:]
            held_id = held.stdout.strip()

            def active() -> str:
                done = run(inspect.text)
                return done.stdout if held_id in done.stdout else ""

            entry = _inspect_entry(_wait_for("inspect active to list the task", active, worker_log))
        page_entry = _inspect_entry(inspect.expected)
        assert entry["id"] == held_id
        assert entry["tenant_id"] == page_entry["tenant_id"] == tenant_id, entry
        assert entry.keys() == page_entry.keys(), (sorted(entry), sorted(page_entry))
        _wait_for(
            "the held task to finish",
            lambda: (
                json.loads(flower_get(f"/api/task/info/{held_id}") or "{}").get("state")
                == "SUCCESS"
            ),
            worker_log,
        )


RUN_WHOLE_PAGE.update({"docs/tutorial/quickstart.md", "docs/tutorial/demo.md"})

#: The page -> what its install line must make work.  Keyed by page, so a new
#: page with an install line fails until it says what to run.
PAGE_CHECKS: dict[str, Check] = {
    "README.md": check_demo,
    "docs/tutorial/demo.md": check_demo_page,
    "docs/tutorial/quickstart.md": check_quickstart,
    "docs/howto/postgres-broker.md": check_postgres_broker,
    "docs/howto/sessions.md": check_asyncio,
    "docs/reference/db.md": check_asyncio,
    "docs/howto/monitoring.md": check_prometheus,
    "docs/reference/metrics.md": check_prometheus,
    "docs/howto/flower.md": check_flower,
}


def _user_lines() -> list[InstallLine]:
    """The install lines a user runs, from PyPI or a checkout (the development line
    is CI's own)."""
    return [
        line
        for line in install_lines()
        if line.args != DEV_LINE
        and any(arg.startswith(("tenant-celery", ".[")) or arg == "." for arg in line.args)
    ]


def _pages() -> dict[str, list[InstallLine]]:
    """Each page with user install lines -> those lines, in page order."""
    found: dict[str, list[InstallLine]] = {}
    for line in _user_lines():
        found.setdefault(line.page, []).append(line)
    return found


def test_every_install_line_has_a_check() -> None:
    lines = install_lines()
    assert any(line.page == "README.md" for line in lines)
    pages = _pages()
    unchecked = [
        str(line) for page, found in pages.items() if page not in PAGE_CHECKS for line in found
    ]
    assert not unchecked, "install lines with no check in PAGE_CHECKS:\n" + "\n".join(unchecked)
    # A page whose check does not run the page itself gets one environment: it
    # may give one install line (from PyPI, and the same from a checkout).
    several = {
        page: sorted({line.args for line in found if not any(a.startswith(".") for a in line.args)})
        for page, found in pages.items()
        if page not in RUN_WHOLE_PAGE
    }
    assert all(len(lines) == 1 for lines in several.values()), several
    others = [
        str(line)
        for line in lines
        if line.args != DEV_LINE
        and line not in _user_lines()
        # a package a page suggests beside the install line (psycopg's binary build)
        and line.args != ("psycopg[binary]",)
    ]
    assert not others, "install lines this test does not know:\n" + "\n".join(others)


def _cases() -> list[InstallLine]:
    """One case per line, except a page that is run whole: one case, its first line.
    A line whose check another page's identical line runs already is not run twice
    (the README's and the demo page's)."""
    cases: list[InstallLine] = []
    seen: set[tuple[Check | None, tuple[str, ...]]] = set()
    for page, found in _pages().items():
        for line in found[:1] if page in RUN_WHOLE_PAGE else found:
            key = (PAGE_CHECKS.get(page), line.args)
            if key[0] is not None and key in seen:
                continue
            seen.add(key)
            cases.append(line)
    return cases


@pytest.mark.worker
@pytest.mark.timeout(900)
@pytest.mark.parametrize("line", _cases(), ids=str)
def test_install_line_in_a_bare_env(
    line: InstallLine,
    bare_envs: BareEnvs,
    tmp_path: Path,
    services: Services,
    request: pytest.FixtureRequest,
) -> None:
    env = bare_envs(line, fresh=line.page in RUN_WHOLE_PAGE)
    # nothing of the development environment: the test tools are not there
    assert "pytest" not in env.installed()
    ctx = Context(
        env=env,
        line=line,
        wheel=bare_envs.wheel,
        workdir=tmp_path,
        services=services,
        database=lambda: request.getfixturevalue("database"),
        cluster=lambda: request.getfixturevalue("pg_cluster"),
    )
    PAGE_CHECKS[line.page](ctx)


# ------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _background(
    env: BareEnv, command: list[str], cwd: Path, log: Path, extra: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` running in the background (its output in ``log``) while the block
    runs; stopped when it ends."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=env.environ(**extra), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield process
    finally:
        stop_process_group(process)


def _wait_for(what: str, check: Callable[[], object], log: Path, timeout: float = 60) -> Any:
    """``check()``'s first true value, polled until ``timeout``; on a timeout, fail
    with the last lines of ``log``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            pytest.fail(f"timed out waiting for {what}; {log.name}:\n{tail}", pytrace=False)
        time.sleep(0.3)
