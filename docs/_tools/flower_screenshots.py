"""Make the screenshots of docs/howto/flower.md: ``docs/_static/flower-tasks.png``
(Flower's task list) and ``docs/_static/flower-task.png`` (one tenant task's page).

Run from a checkout with the ``dev`` extra installed, on a machine with
PostgreSQL, Chromium and chromedriver (Debian: ``apt-get install chromium
chromium-driver``)::

    python docs/_tools/flower_screenshots.py
    python docs/_tools/flower_screenshots.py --dsn postgresql://postgres@db:5432/postgres

``--dsn`` is a superuser's libpq URL (default: ``TENANT_CELERY_TEST_DSN``, else the
local server as ``postgres``).  The script creates a scratch database and a login
role there, applies the bundled migration granted to that role, then runs the
page's example app (``examples/postgres_broker``, with one task added that always
fails) as the page does: a worker on the package's transport with events on
(``-E``), and Flower.  It sends invoices for two tenants and one failing charge,
waits for Flower to show every task finished, and screenshots Flower in headless
Chromium.  Everything it started and created (processes, database, role) is
removed when it ends, whether it succeeded or not.

The tenants, task ids and worker name are fixed, so a run differs from the last
only in times and durations.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from tenant_celery.migrations import upgrade

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "postgres_broker"
DEFAULT_OUT = ROOT / "docs" / "_static"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

TENANT_A = "0b7e4c1a-5a43-4f5e-9d1c-2f6a1c9e7b10"
TENANT_B = "7d3f9e2b-8c41-4a6d-b5e0-3a1c2d4e5f60"
WORKER = "celery@billing-1"
#: Task ids derived from a fixed namespace: the same on every run.
_IDS = uuid.UUID("c5b1d0a4-3f1e-4d2a-9b7c-0e8f6a5d4c3b")

#: The example app, with one task that fails: the list shows a failure too.
FAILING_TASK = """

@tenant_task(app=app)
def charge_card(invoice_id: int) -> str:
    raise RuntimeError(f"card declined for invoice {invoice_id}")
"""

#: (task, tenant, invoice): what the producer sends, in order.
TASKS = [
    ("send_invoice", TENANT_A, 1001),
    ("send_invoice", TENANT_B, 2001),
    ("send_invoice", TENANT_A, 1002),
    ("send_invoice", TENANT_B, 2002),
    ("charge_card", TENANT_B, 2003),
    ("send_invoice", TENANT_A, 1003),
]
#: The task whose page is shot: tenant A's first invoice.
SHOWN = 0

PRODUCER = """
import json, sys
import billing
from tenant_celery import tenant_context

for name, tenant, invoice, task_id in json.loads(sys.argv[1]):
    with tenant_context(tenant):
        result = getattr(billing, name).apply_async((invoice,), task_id=task_id)
    result.get(timeout=60, propagate=False)
"""

WINDOW = (1280, 800)
#: Whether the task list's header cells sit exactly over its first row's cells.
ALIGNED = """
const head = [...document.querySelectorAll('.dataTables_scrollHead th')];
const row = document.querySelector('#tasks-table tbody tr[id]');
if (!row || !head.length || head.length !== row.children.length) return false;
return head.every((th, i) => {
  const h = th.getBoundingClientRect(), c = row.children[i].getBoundingClientRect();
  return Math.abs(h.left - c.left) < 1.5 && Math.abs(h.width - c.width) < 1.5;
});
"""
READY_TIMEOUT = 60.0


def task_id(index: int) -> str:
    return str(uuid.uuid5(_IDS, str(index)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float = READY_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


def get_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""


# ------------------------------------------------------------------ database


@contextlib.contextmanager
def scratch_database(dsn: str) -> Iterator[URL]:
    """A new database and login role on the server of ``dsn`` (a superuser's URL),
    migrated and granted to the role; yields the role's SQLAlchemy URL. Both are
    dropped at the end."""
    suffix = secrets.token_hex(4)
    name = f"tc_flower_shots_{suffix}"
    password = secrets.token_hex(16)
    admin = make_url(dsn).set(drivername="postgresql+psycopg")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            try:
                upgrade(admin.set(database=name), grant_to=[name])
                yield admin.set(database=name, username=name, password=password)
            finally:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        finally:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
    print(f"dropped database and role {name}")


# ----------------------------------------------------------------- processes


@contextlib.contextmanager
def background(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[Path]:
    """``command`` running in a process group of its own while the block runs;
    stopped (TERM, then KILL) when it ends."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log
    except BaseException:
        print(f"--- {' '.join(command[2:])}, last lines:\n{tail(log)}", file=sys.stderr)
        raise
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "billing", *args]


# ------------------------------------------------------------------- browser


def chromium() -> Any:
    """Headless Chromium through the system chromedriver, at :data:`WINDOW`."""
    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(argument)
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    # The viewport, not the window, is WINDOW (the headless window has no frame).
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
    )
    return driver


def shoot(driver: Any, path: Path, bottom: float) -> None:
    """The page from its top down to ``bottom`` (CSS pixels), at full width, as a
    PNG at ``path``."""
    clip = {"x": 0, "y": 0, "width": WINDOW[0], "height": round(bottom), "scale": 1}
    # Capturing beyond the window lays the page out again at the clip's size, which
    # can leave the task list's header out of step with its rows: only when needed.
    beyond = bottom > WINDOW[1]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": beyond}
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def bottom_of(driver: Any, element: Any, margin: int = 24) -> float:
    """Where ``element`` ends on the page, plus ``margin`` pixels."""
    bottom: float = driver.execute_script(
        "return arguments[0].getBoundingClientRect().bottom + window.scrollY;", element
    )
    return bottom + margin


def shoot_flower(base: str, out: Path) -> None:
    """Flower's task list, and the page of task :data:`SHOWN` down to its tenant."""
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    driver = chromium()
    try:
        driver.get(f"{base}/tasks")
        wait_for(
            "Flower's task list to show every task",
            lambda: (
                len(driver.find_elements(By.CSS_SELECTOR, "#tasks-table tbody tr[id]"))
                >= len(TASKS)
            ),
            timeout=30,
        )
        driver.execute_script("return document.fonts.ready.then(() => true);")
        # The table's header is a table of its own (DataTables' scrollX): its columns
        # are sized to the rows' after a draw, which may come before the fonts.
        try:
            wait_for("the list's header to fit its rows", lambda: driver.execute_script(ALIGNED), 3)
        except TimeoutError:
            driver.execute_script("$('#tasks-table').DataTable().columns.adjust();")
            wait_for("the list's header to fit its rows", lambda: driver.execute_script(ALIGNED), 5)
        card = driver.find_element(By.CSS_SELECTOR, ".tasks-table-card")
        shoot(driver, out / "flower-tasks.png", bottom_of(driver, card))

        driver.get(f"{base}/task/{task_id(SHOWN)}")
        (row,) = wait_for(
            "the task page's tenant row",
            lambda: [
                dt.find_element(By.XPATH, "..")
                for dt in driver.find_elements(By.CSS_SELECTOR, "dt")
                if dt.text == "Tenant id"
            ],
            timeout=30,
        )
        shoot(driver, out / "flower-task.png", bottom_of(driver, row))
    finally:
        driver.quit()


# ---------------------------------------------------------------------- main


def run(dsn: str, out: Path) -> None:
    with (
        scratch_database(dsn) as app_url,
        tempfile.TemporaryDirectory(prefix="flower-shots-") as scratch,
    ):
        workdir = Path(scratch)
        shutil.copy(EXAMPLE / "celeryconfig.py", workdir)
        (workdir / "billing.py").write_text((EXAMPLE / "billing.py").read_text() + FAILING_TASK)
        env = {
            **os.environ,
            "BILLING_DATABASE_URL": app_url.render_as_string(hide_password=False),
            "FLOWER_UNAUTHENTICATED_API": "true",  # the script reads Flower's API
        }
        env.pop("PYTHONPATH", None)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        worker_command = celery("worker", "-E", "--loglevel=INFO", f"--hostname={WORKER}")
        flower_command = celery("flower", f"--port={port}", "--address=127.0.0.1")
        with (
            background(worker_command, workdir, env, workdir / "worker.log") as worker_log,
            background(flower_command, workdir, env, workdir / "flower.log"),
        ):
            wait_for("the worker", lambda: "ready." in worker_log.read_text(errors="replace"))
            wait_for(
                "Flower to hear the worker",
                lambda: (
                    f'flower_worker_online{{worker="{WORKER}"}} 1' in get_text(f"{base}/metrics")
                ),
            )
            sent = [
                [name, tenant, invoice, task_id(i)]
                for i, (name, tenant, invoice) in enumerate(TASKS)
            ]
            producer = subprocess.run(
                [sys.executable, "-c", PRODUCER, json.dumps(sent)],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if producer.returncode != 0:
                raise RuntimeError(f"the producer failed:\n{producer.stderr[-3000:]}")

            def all_finished() -> bool:
                listed = get_json(f"{base}/api/tasks") or {}
                return all(
                    listed.get(task_id(i), {}).get("state") in {"SUCCESS", "FAILURE"}
                    for i in range(len(TASKS))
                )

            wait_for("Flower to show every task finished", all_finished)
            shoot_flower(base, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("TENANT_CELERY_TEST_DSN", DEFAULT_DSN),
        help="a superuser's libpq URL of the server to use (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="directory of the PNGs (default: docs/_static)",
    )
    args = parser.parse_args(argv)
    run(args.dsn, args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
