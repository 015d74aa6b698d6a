"""docs/tutorial/quickstart.md, every block, both parts, against real workers.

Part 1: the worker command run (through the rig, which adds its queue and node
name), the sessions as doctests against it, and the log lines the page shows
found in the worker's real log.

Part 2 on the rig's scratch database, as a reader with a server of their own
runs it (``QUICKSTART_DATABASE_URL`` set, in the shell and in this process):
``python setup_db.py`` creates the table, its policy and the role
``billing_app``; ``tenant-celery check`` runs as the page gives it, with the
page's URL replaced by the scratch database's; the billing worker connects as
``billing_app`` (never the superuser: its connections are found by their
application name); the sessions run as doctests.  Before the page's
``--drop`` the table is read as the superuser: the rows belong to the tenant
that wrote them, the other tenant's read found none of them, and the message
without a tenant wrote nothing.

The page includes ``examples/quickstart/shop.py``, ``billing.py`` and
``setup_db.py``; they are copied into the project directory, as the reader
creates them, and run from there.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests._rig.postgres import Database
from tests._rig.services import Services
from tests._rig.worker import WorkerFactory, WorkerHandle
from tests.docs.blocks import ROOT, Block
from tests.docs.harness import Command, PageRun, Substitutions, assert_output
from tests.docs.scratch import libpq

PAGE = "tutorial/quickstart.md"
EXAMPLE = ROOT / "examples" / "quickstart"
#: The embedded server's superuser URL, as the page's ``tenant-celery check`` names it.
PAGE_URL = "postgresql://postgres@/postgres?host=/tmp/tenant-celery-quickstart"
#: The same URL as ``tenant-celery check`` prints it.
PAGE_URL_SHOWN = "postgresql+psycopg://postgres@/postgres?host=%2Ftmp%2Ftenant-celery-quickstart"
APP_ROLE = "billing_app"
#: libpq's application name for the billing worker's connections (``PGAPPNAME``).
WORKER_APP_NAME = "quickstart-billing-worker"


def log_shape(line: str) -> str:
    """A log line with what changes between runs (durations, pool process numbers) blanked."""
    line = re.sub(r"ForkPoolWorker-\d+", "ForkPoolWorker-N", line)
    return re.sub(r"succeeded in \d+(\.\d+)?s", "succeeded in Ts", line)


def drop_role(database: Database) -> None:
    """Remove ``billing_app`` from the cluster, whatever it still holds in ``database``."""
    cluster = database.cluster
    with cluster.connect() as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,)).fetchone():
            with contextlib.suppress(Exception), cluster.connect(database.name) as db:
                db.execute(f"DROP OWNED BY {APP_ROLE}")
            conn.execute(f"DROP ROLE IF EXISTS {APP_ROLE}")


@pytest.mark.worker
def test_page(
    tmp_path: Path,
    start_worker: WorkerFactory,
    services: Services,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = services.redis()
    admin_url = libpq(database.url)
    for name in ("shop.py", "billing.py", "setup_db.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    for module in ("shop", "billing"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    # A reader with a server of their own exports its URL in both terminals.
    monkeypatch.setenv("QUICKSTART_DATABASE_URL", admin_url)
    substitutions = Substitutions()
    substitutions.add(PAGE_URL, admin_url)
    substitutions.output_pairs.append(
        (str(sa.make_url(admin_url).set(drivername="postgresql+psycopg")), PAGE_URL_SHOWN)
    )
    run = PageRun(PAGE, tmp_path, substitutions=substitutions)
    run.shell.env["QUICKSTART_DATABASE_URL"] = admin_url
    admin = database.admin_engine()
    workers: dict[str, WorkerHandle] = {}

    def start(command: Command) -> None:
        words = shlex.split(command.text)
        assert words[:2] == ["celery", "-A"], command
        assert words[3] == "worker", command
        module = words[2]
        extra_env = {
            "PYTHONPATH": f"{tmp_path}:{ROOT}",
            # The page's apps name localhost:6379; Celery lets the environment override it.
            "CELERY_BROKER_URL": redis,
            "CELERY_RESULT_BACKEND": redis,
        }
        if module == "billing":
            workers["shop"].request_stop()  # the page: stop part 1's worker first
            extra_env["QUICKSTART_DATABASE_URL"] = admin_url
            extra_env["PGAPPNAME"] = WORKER_APP_NAME
        else:
            assert module == "shop", command
        worker = start_worker(
            module, broker="redis", backend="redis", extra_args=words[4:], extra_env=extra_env
        )
        # The page's module, as its shell imports it (from the project directory).
        worker.configure(importlib.import_module(module).app)
        workers[module] = worker

    run.shell.on("celery -A", start)

    def before_drop() -> None:
        """What part 2 did, seen by the superuser before the page removes it."""
        acme, globex = run.namespace["acme"], run.namespace["globex"]
        with admin.connect() as conn:
            used_by_worker = conn.execute(
                sa.text(
                    "SELECT DISTINCT usename FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = :name"
                ),
                {"name": WORKER_APP_NAME},
            ).scalars()
            assert set(used_by_worker) == {APP_ROLE}, "the worker must connect as the app role"
            role = conn.execute(
                sa.text("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = :r"),
                {"r": APP_ROLE},
            ).one()
            assert tuple(role) == (False, False)
            rows = conn.execute(
                sa.text("SELECT tenant_id::text, number FROM invoices ORDER BY id")
            ).all()
        # Written for the tenant that published them; nothing for the other, no X-1.
        assert [tuple(row) for row in rows] == [(acme, "A-1"), (acme, "A-2")]
        # The other tenant's read ran against these rows and got none of them.
        log = workers["billing"].log_text()
        listed = re.findall(r"Task billing\.list_invoices\[[^\]]+\] succeeded in \S+: (.*)", log)
        assert sorted(listed) == ["['A-1', 'A-2']", "[]"], log
        assert re.search(r"billing\.add_invoice.*without a tenant", log), log
        # The policy itself, as the worker's role, for each tenant and for none.
        app_engine = database.engine(sys.modules["billing"].APP_URL, poolclass=sa.NullPool)
        for tenant, expected in ((acme, 2), (globex, 0), ("", 0)):
            with app_engine.begin() as conn:
                conn.execute(
                    sa.text("SELECT set_config('app.current_tenant_id', :t, true)"), {"t": tenant}
                )
                seen = conn.execute(sa.text("SELECT count(*) FROM invoices")).scalar_one()
            assert seen == expected, (tenant, seen)
        workers["billing"].stop()  # the page: stop the worker, then drop

    def setup_db(command: Command) -> None:
        words = shlex.split(command.text)
        assert words[:2] == ["python", "setup_db.py"], command
        assert words[2:] in ([], ["--drop"]), command
        drop = words[2:] == ["--drop"]
        if drop:
            before_drop()
        done = run.shell.execute(command.text)
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stderr}"
        assert_output(command.expected, done.stdout, command)
        with admin.connect() as conn:
            table = conn.execute(sa.text("SELECT to_regclass('invoices')")).scalar()
            role = conn.execute(
                sa.text("SELECT count(*) FROM pg_roles WHERE rolname = :r"), {"r": APP_ROLE}
            ).scalar_one()
        assert (table is None, role) == ((True, 0) if drop else (False, 1))

    run.shell.on("python setup_db.py", setup_db)

    @run.on("text", "INFO/ForkPoolWorker")
    @run.on("text", "WARNING/ForkPoolWorker")
    def worker_log(block: Block) -> None:
        (expected,) = block.source.strip().split("\n")
        want = log_shape(expected) + "\n"
        checker = doctest.OutputChecker()

        def logged() -> bool:
            lines = workers["shop"].log_text().splitlines()
            return any(
                checker.check_output(want, log_shape(line) + "\n", doctest.ELLIPSIS)
                for line in lines
            )

        deadline = time.monotonic() + 5  # the worker writes its log a moment after the result
        while not logged():
            if time.monotonic() > deadline:
                pytest.fail(f"{block}: no line of the worker's log looks like\n{expected}")
            time.sleep(0.1)

    try:
        run.run()
        assert set(workers) == {"shop", "billing"}
    finally:
        for worker in workers.values():
            worker.stop()
        drop_role(database)
