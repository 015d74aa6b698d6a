"""The examples, run as their READMEs run them, against a fresh database of the rig.

``examples/host_project`` is migrated with its own ``alembic upgrade head`` and
``python -m storefront migrate`` as an owner role made for the test (``LOGIN``
and ``CREATE`` on the schema, nothing more); a real
``celery -A storefront worker`` then runs as the unprivileged ``app_user`` with
its JSON logs and its monitor on, and ``python -m storefront place`` publishes
orders for three tenants.  ``examples/web_producer`` serves HTTP in front of
the same worker.  Rows are counted as ``app_user`` with each tenant set.

The worker and the web server are started in sessions of their own, by the
command lines of the READMEs (not the rig's ``start_worker``, which pins a
worker to a queue of its own), and every one is stopped, or killed with its
process group, when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import URL, Engine

from tenant_celery import set_tenant_guc
from tests._rig.postgres import APP_ROLE, Database, DatabaseFactory, render

pytestmark = pytest.mark.worker

ROOT = Path(__file__).resolve().parents[2]
HOST = ROOT / "examples" / "host_project"
WEB = ROOT / "examples" / "web_producer"

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
RESULT_TIMEOUT = 30.0
LOG_TAIL_LINES = 40
#: Keys of every JSON log line (tenant_celery.logging).
LOG_KEYS = {
    "timestamp",
    "level",
    "logger",
    "message",
    "task_name",
    "task_id",
    "tenant_id",
    "correlation_id",
}

_MONITOR = re.compile(r"worker monitor listening on (http://127\.0\.0\.1:\d+)")
_WEB = re.compile(r"storefront web listening on (http://127\.0\.0\.1:\d+)")


# ------------------------------------------------------------------------ processes


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Process:
    """A long-running example process (a worker, a web server) in its own session."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return "\n".join(self.log_text().splitlines()[-LOG_TAIL_LINES:])

    def wait_for_log(
        self, pattern: re.Pattern[str], timeout: float = READY_TIMEOUT
    ) -> re.Match[str]:
        """Wait until the log matches ``pattern``; fail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.log_text())
            if match:
                return match
            if self.popen.poll() is not None:
                pytest.fail(
                    f"{self.name} exited with {self.popen.returncode} before logging "
                    f"{pattern.pattern!r}:\n{self.log_tail()}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.name}: {pattern.pattern!r} not logged after {timeout}s:\n"
                    f"{self.log_tail()}",
                    pytrace=False,
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM the main process (a worker's warm shutdown), then SIGKILL the group."""
        pgid = self.popen.pid
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self.popen.wait(5)
        # Pool children leave with the main process; never leave one behind.
        deadline = time.monotonic() + 3
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


class Processes:
    """Starts example processes and stops every one of them on :meth:`close`."""

    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        self.log_dir = log_dir
        self.env = dict(env)
        self._started: list[Process] = []

    def run(
        self, command: Sequence[str], cwd: Path, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to its end (a migration, a CLI call)."""
        return subprocess.run(
            command,
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def run_together(
        self, commands: Mapping[str, Sequence[str]], cwd: Path, timeout: float = 60
    ) -> dict[str, subprocess.CompletedProcess[str]]:
        """Run commands side by side, each to its end; none outlives the call."""
        running = {
            name: subprocess.Popen(
                command,
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, command in commands.items()
        }
        done: dict[str, subprocess.CompletedProcess[str]] = {}
        deadline = time.monotonic() + timeout
        try:
            for name, process in running.items():
                try:
                    out, err = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{name}: still running after {timeout}s", pytrace=False)
                done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        finally:
            for name, process in running.items():
                if name not in done:
                    process.kill()
                    process.communicate()
        return done

    def start(self, name: str, command: Sequence[str], cwd: Path, **env: str) -> Process:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                command,
                cwd=cwd,
                env={**self.env, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = Process(name, popen, log_path)
        self._started.append(process)
        return process

    def close(self) -> None:
        while self._started:
            process = self._started.pop()
            process.stop()
            # Shown by pytest only when the test failed.
            print(f"--- {process.name} log (tail) ---\n{process.log_tail()}")


def example_env(database: Database, owner: URL) -> dict[str, str]:
    """The environment a user sets for the examples, on the rig's database."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TENANT_CELERY_", "STOREFRONT_", "TC_TEST_"))
        and key not in {"PROMETHEUS_MULTIPROC_DIR", "PYTEST_CURRENT_TEST", "PYTHONPATH"}
    }
    environ.update(
        {
            "STOREFRONT_MIGRATION_URL": render(owner),
            "STOREFRONT_DATABASE_URL": render(database.app_url),
            "TENANT_CELERY_MONITOR_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return environ


@pytest.fixture
def owner_url(database: Database, pg_databases: DatabaseFactory) -> Iterator[URL]:
    """A role to own the example's tables: it logs in and may create in ``public``."""
    name = f"tc_owner_{secrets.token_hex(4)}"
    password = secrets.token_hex(12)
    role = sql.Identifier(name)
    with pg_databases.cluster.connect() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(password))
        )
    try:
        with pg_databases.cluster.connect(database.name) as conn:
            conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(role))
        yield database.url.set(username=name, password=password)
    finally:
        with pg_databases.cluster.connect(database.name) as conn:
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(role))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(role))
        with pg_databases.cluster.connect() as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(role))


@pytest.fixture
def processes(tmp_path: Path, database: Database, owner_url: URL) -> Iterator[Processes]:
    """Example processes on ``database``; all stopped before the owner and the database go."""
    started = Processes(tmp_path, example_env(database, owner_url))
    try:
        yield started
    finally:
        started.close()


# ------------------------------------------------------------------------ the storefront


@dataclass
class Storefront:
    """The host project migrated and its worker running."""

    processes: Processes
    worker: Process
    monitor: str


def checked(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def storefront(processes: Processes, admin_engine: Engine) -> Storefront:
    """The README's steps: both migrations as the owner, then a worker as the app role."""
    alembic = [sys.executable, "-m", "alembic", "-c", str(HOST / "alembic.ini")]
    upgraded = processes.run([*alembic, "upgrade", "head"], cwd=ROOT)
    checked(upgraded)
    assert "Running upgrade  -> 0001, orders and invoices" in upgraded.stderr
    # The models and the revision agree, and the Celery tables are left to their migration.
    checked(processes.run([*alembic, "check"], cwd=ROOT))
    migrated = checked(processes.run([sys.executable, "-m", "storefront", "migrate"], cwd=HOST))
    assert migrated.strip() == (
        f"Celery broker and result tables at revision tc0005, granted to {APP_ROLE}"
    )
    record_published_messages(admin_engine)
    celery = [sys.executable, "-m", "celery", "-A", "storefront"]
    worker = processes.start(
        "worker", [*celery, "worker", "--loglevel=INFO", "--concurrency=2"], cwd=HOST
    )
    monitor = worker.wait_for_log(_MONITOR)[1]
    worker.wait_for_log(re.compile(r"@\S+ ready\."))
    return Storefront(processes, worker, monitor)


# ------------------------------------------------------------------------ checks


def get(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    return request("GET", url, headers)


def request(
    method: str, url: str, headers: Mapping[str, str] | None = None, body: object = None
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request; returns the status, the headers and the body (JSON when it is)."""
    data = None if body is None else json.dumps(body).encode()
    sent = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(sent, timeout=10) as reply:
            status, answer, raw = reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        with error:
            status, answer, raw = error.code, dict(error.headers), error.read()
    is_json = answer.get("Content-Type", "").startswith("application/json")
    return status, answer, json.loads(raw) if is_json else raw.decode()


def visible_rows(app_engine: Engine, tenant: str | None) -> dict[str, list[tuple[Any, ...]]]:
    """Every order and invoice ``app_user`` sees with ``tenant`` set (or none), no WHERE."""
    with app_engine.begin() as conn:
        if tenant is not None:
            set_tenant_guc(conn, tenant)
        return {
            table: [tuple(row) for row in conn.execute(sa.text(query))]
            for table, query in {
                "orders": "SELECT tenant_id::text, id, customer, total_cents FROM orders",
                "invoices": "SELECT tenant_id::text, order_id, number FROM invoices",
            }.items()
        }


def wait_for_invoices(admin_engine: Engine, expected: int) -> None:
    """Invoices are issued by child tasks, after the orders' results are stored."""
    deadline = time.monotonic() + RESULT_TIMEOUT
    count = -1
    while time.monotonic() < deadline:
        with admin_engine.connect() as conn:
            count = conn.execute(sa.text("SELECT count(*) FROM invoices")).scalar_one()
        if count == expected:
            return
        time.sleep(0.2)
    pytest.fail(f"{count} invoices after {RESULT_TIMEOUT}s, expected {expected}")


def record_published_messages(admin_engine: Engine) -> None:
    """Record every message stored in the transport's table (which deletes a message
    once it is acknowledged): a trigger of the superuser's, in a schema of its own."""
    with admin_engine.begin() as conn:
        conn.execute(
            sa.text(
                """
                CREATE SCHEMA test_record;
                CREATE TABLE test_record.published (queue text NOT NULL);
                CREATE FUNCTION test_record.record() RETURNS trigger
                  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
                  BEGIN INSERT INTO test_record.published VALUES (NEW.queue); RETURN NEW; END $$;
                CREATE TRIGGER test_record AFTER INSERT ON public.tenant_celery_message
                  FOR EACH ROW EXECUTE FUNCTION test_record.record();
                """
            )
        )


def published_messages(admin_engine: Engine) -> int:
    """Messages ever published (see :func:`record_published_messages`)."""
    with admin_engine.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM test_record.published"))
        return int(count.scalar_one())


def json_lines(log: str) -> list[dict[str, Any]]:
    """Every complete line of a log, parsed; fails on the first that is not a JSON object."""
    lines = log.splitlines()
    if not log.endswith("\n"):
        lines = lines[:-1]  # the process may be writing it right now
    parsed = []
    for number, line in enumerate(lines, start=1):
        try:
            value = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line {number} is not JSON: {line!r}") from None
        assert isinstance(value, dict), f"log line {number} is not an object: {line!r}"
        assert value.keys() >= LOG_KEYS, f"log line {number} lacks keys: {line!r}"
        parsed.append(value)
    return parsed


def metric_samples(monitor: str) -> dict[tuple[str, str, str], float]:
    """``(metric, task_name, tenant) -> value`` from one scrape of ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    status, _, text = get(f"{monitor}/metrics")
    assert status == 200, text
    samples: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            key = (sample.name, labels.get("task_name", ""), labels.get("tenant", ""))
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def settled_successes(
    monitor: str, expected: dict[tuple[str, str], int]
) -> dict[tuple[str, str], float]:
    """``(task_name, tenant) -> succeeded`` once it equals ``expected`` (or after a while).

    Celery counts a success just after storing its result, so a client holding
    every result may scrape a moment too early.
    """
    deadline = time.monotonic() + 10
    while True:
        samples = metric_samples(monitor)
        seen = {
            (task, tenant): value
            for (name, task, tenant), value in samples.items()
            if name == "celery_task_success_total" and value
        }
        if seen == expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


# ------------------------------------------------------------------------ host project


def test_host_project_isolates_tenants_end_to_end(
    storefront: Storefront, app_engine: Engine, admin_engine: Engine, owner_url: URL
) -> None:
    tenants = {name: str(uuid.uuid4()) for name in ("alpha", "bravo", "charlie")}
    orders = {
        "alpha": ["ada:1250"],
        "bravo": ["grace:990", "linus:4200"],
        "charlie": ["edsger:100", "barbara:200", "donald:300"],
    }
    place = [sys.executable, "-m", "storefront", "place"]
    done = storefront.processes.run_together(
        {name: [*place, tenants[name], *orders[name]] for name in tenants}, cwd=HOST
    )
    placed: dict[str, list[dict[str, Any]]] = {}
    for name, finished in done.items():
        out = checked(finished)
        placed[name] = [json.loads(line) for line in out.splitlines()]
        assert [p["tenant_id"] for p in placed[name]] == [tenants[name]] * len(orders[name])

    total = sum(len(o) for o in orders.values())
    wait_for_invoices(admin_engine, total)
    # One message per order and one per invoice, nothing else.
    assert published_messages(admin_engine) == 2 * total

    # A tenant id that is not a UUID is refused before anything is published.
    refused = storefront.processes.run([*place, "tenant-42", "mallory:1"], cwd=HOST)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "storefront place: error: tenant id must be a UUID (got a value of type str); "
        "check where the tenant id is read from"
    )
    assert published_messages(admin_engine) == 2 * total

    # Row-level security alone narrows what app_user sees to the tenant it set.
    for name, tenant in tenants.items():
        rows = visible_rows(app_engine, tenant)
        customers = sorted(order.split(":")[0] for order in orders[name])
        assert sorted(row[2] for row in rows["orders"]) == customers
        assert {row[0] for row in rows["orders"] + rows["invoices"]} == {tenant}
        order_ids = sorted(p["order_id"] for p in placed[name])
        assert sorted(row[1] for row in rows["orders"]) == order_ids
        assert sorted(row[1] for row in rows["invoices"]) == order_ids
    assert visible_rows(app_engine, None) == {"orders": [], "invoices": []}

    status, headers, health = get(f"{storefront.monitor}/health")
    assert (status, headers["Content-Type"]) == (200, "application/json")
    assert health == {"status": "ok", "broker": "ok", "database": "ok"}

    expected = {
        (task, tenants[name]): len(orders[name])
        for name in tenants
        for task in ("storefront.place_order", "storefront.issue_invoice")
    }
    assert settled_successes(storefront.monitor, expected) == expected

    # One JSON object a line, and the tasks' own lines name their task and tenant.
    lines = json_lines(storefront.worker.log_text())
    correlations: dict[str, set[str]] = {}
    for name, tenant in tenants.items():
        for order in placed[name]:
            (line,) = [
                line for line in lines if line["message"].startswith(f"order {order['order_id']} ")
            ]
            assert line["task_id"] == order["task_id"]
            assert (line["tenant_id"], line["task_name"]) == (tenant, "storefront.place_order")
            (invoice_line,) = [
                line
                for line in lines
                if line["message"].endswith(f" issued for order {order['order_id']}")
            ]
            assert (invoice_line["tenant_id"], invoice_line["task_name"]) == (
                tenant,
                "storefront.issue_invoice",
            )
            # The child task carries the parent's correlation id, one for the command.
            assert invoice_line["correlation_id"] == line["correlation_id"] is not None
            correlations.setdefault(name, set()).add(line["correlation_id"])
    assert all(len(ids) == 1 for ids in correlations.values()), correlations
    assert len(set.union(*correlations.values())) == len(tenants)

    check = [sys.executable, "-m", "tenant_celery.cli", "check"]
    audit = storefront.processes.run(
        [*check, "--url", render(owner_url), "--role", APP_ROLE], cwd=ROOT
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    # Both tables are there, owned by the owner role, not by the role tasks use.
    for table in ("orders", "invoices"):
        assert re.search(rf"^public\.{table} .* {owner_url.username} ", audit.stdout, re.M)
    assert audit.stdout.rstrip().endswith("no problems found")


# ------------------------------------------------------------------------ web producer


def test_web_producer_enqueues_inside_the_request_tenant(
    storefront: Storefront, app_engine: Engine, admin_engine: Engine
) -> None:
    web = storefront.processes.start(
        "web",
        [sys.executable, "storefront_web.py", "--host", "127.0.0.1", "--port", "0"],
        cwd=WEB,
        PYTHONPATH=str(HOST),
    )
    base = web.wait_for_log(_WEB)[1]
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    order = {"customer": "ada", "total_cents": 1250}

    # Refused requests answer 400 and publish nothing.
    refused = [
        ({}, order, "missing X-Tenant-ID header: name the tenant"),
        ({"X-Tenant-ID": ""}, order, "missing X-Tenant-ID header: name the tenant"),
        ({"X-Tenant-ID": "42"}, order, "malformed X-Tenant-ID header: expected a UUID"),
        ({"X-Tenant-ID": "' OR 1=1 --"}, order, "malformed X-Tenant-ID header: expected a UUID"),
        ({"X-Tenant-ID": a}, {"customer": ""}, "customer must be a name of 1 to 200 characters"),
    ]
    for headers, body, message in refused:
        status, _, answer = request("POST", f"{base}/orders", headers, body)
        assert (status, answer) == (400, {"error": message}), headers
    assert published_messages(admin_engine) == 0

    requests = [(a, "ada", 1250, "web-a-1"), (a, "grace", 990, "web-a-2"), (b, "linus", 4200, None)]
    accepted = []
    for tenant, customer, cents, correlation in requests:
        headers = {"X-Tenant-ID": tenant}
        if correlation is not None:
            headers["X-Correlation-ID"] = correlation
        body = {"customer": customer, "total_cents": cents}
        status, answer_headers, answer = request("POST", f"{base}/orders", headers, body)
        assert status == 202, answer
        assert answer["tenant_id"] == tenant
        assert answer_headers["Location"] == answer["status_url"] == f"/tasks/{answer['task_id']}"
        if correlation is not None:
            assert answer_headers["X-Correlation-ID"] == correlation
        accepted.append((tenant, customer, answer["task_id"], answer_headers["X-Correlation-ID"]))

    results = {}
    for tenant, _, task_id, _ in accepted:
        deadline = time.monotonic() + RESULT_TIMEOUT
        while True:
            status, _, answer = get(f"{base}/tasks/{task_id}", {"X-Tenant-ID": tenant})
            assert status == 200, answer
            if answer["state"] == "SUCCESS" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert answer["state"] == "SUCCESS", answer
        assert answer["result"]["tenant_id"] == tenant
        results[task_id] = answer["result"]["order_id"]
        # Another tenant cannot read the result.
        other = b if tenant == a else a
        status, _, answer = get(f"{base}/tasks/{task_id}", {"X-Tenant-ID": other})
        assert (status, answer) == (404, {"error": "no such task for this tenant"})
    wait_for_invoices(admin_engine, len(requests))
    # One message per accepted order and one per invoice: the refused ones sent none.
    assert published_messages(admin_engine) == 2 * len(requests)

    for tenant in (a, b):
        rows = visible_rows(app_engine, tenant)
        mine = [(c, results[t]) for owner, c, t, _ in accepted if owner == tenant]
        assert sorted((row[2], row[1]) for row in rows["orders"]) == sorted(mine)
        assert {row[0] for row in rows["orders"] + rows["invoices"]} == {tenant}
        assert sorted(row[1] for row in rows["invoices"]) == sorted(i for _, i in mine)
    assert visible_rows(app_engine, None) == {"orders": [], "invoices": []}

    # The request's correlation id and tenant reach the task and its child.
    lines = json_lines(storefront.worker.log_text())
    for tenant, customer, task_id, correlation in accepted:
        traced = [line for line in lines if line["correlation_id"] == correlation]
        messages = {line["message"] for line in traced if line["logger"] == "storefront.tasks"}
        order_id = results[task_id]
        assert f"order {order_id} placed for {customer}" in messages
        assert any(m.endswith(f" issued for order {order_id}") for m in messages)
        assert {line["tenant_id"] for line in traced if line["task_name"]} == {tenant}
