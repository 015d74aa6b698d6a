"""``tenant-celery demo``: tenant isolation shown end to end, then removed again.

:func:`run_demo` starts (or uses) a PostgreSQL server, creates a throwaway
database and an unprivileged application role, applies the bundled migration,
creates a tenant table with :func:`~tenant_celery.rls.enable_tenant_rls`,
starts a real ``celery worker`` (prefork, two processes) on the PostgreSQL
broker and result backend connected as that role, with the worker monitor and
task metrics on, and publishes tenant tasks for three tenants: plain calls, a
chain and a :func:`~tenant_celery.fan_out`, plus one message with no tenant,
which the worker must refuse.  It then counts each tenant's rows twice, as
the administrator (past row-level security) and as the application role with
the tenant set, and prints them with the tasks each tenant ran, the worker's
``/health`` reply and the totals from ``/metrics``.

Everything it started (worker, database, role, embedded server) is removed
before it returns, also on failure, ``Ctrl-C`` or ``SIGTERM``, and it says
what it removed (nothing, when it failed before starting anything).  Any
failure raises :class:`DemoError` with a one-line message;
:class:`DemoUsageError` when the demo could not start for a reason the user
can fix (a bad ``--dsn``, a server that cannot be reached, a missing extra).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import SQLAlchemyError

from .._pg import database_url, quote
from ..config import guc_name
from ..errors import ConfigurationError, TenantCeleryError

__all__ = ["DemoError", "DemoResult", "DemoUsageError", "TenantReport", "run_demo"]

#: The demo's tenants: a name for people and how many plain tasks each gets
#: (besides a three-step chain and one fan-out message), so their counts differ.
TENANTS: tuple[tuple[str, int], ...] = (("alpha", 2), ("bravo", 3), ("charlie", 4))
CHAIN_LENGTH = 3
WORKER_CONCURRENCY = 2
DEFAULT_TIMEOUT = 50.0
"""Seconds the demo may take from start to its last report before it gives up."""

_EMBEDDED_EXTRA = "embedded"
_PROMETHEUS_EXTRA = "prometheus"
_CONNECT_TIMEOUT = 10
_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
_MAX_MESSAGE = 400
_METRICS = (
    ("started", "celery_task_started_total"),
    ("succeeded", "celery_task_success_total"),
    ("failed", "celery_task_failure_total"),
    ("retried", "celery_task_retry_total"),
    ("rejected", "celery_task_rejected_total"),
)


class DemoError(TenantCeleryError):
    """The demo could not run to the end, or showed something wrong; the message is one line."""


class DemoUsageError(DemoError):
    """The demo could not start: a bad ``--dsn``, a server that cannot be reached or is
    not usable, or a missing extra (``tenant-celery demo`` exits 2)."""


@dataclass(frozen=True)
class TenantReport:
    """One line of the per-tenant table."""

    name: str
    tenant_id: str
    expected: int
    written: int
    visible: int
    foreign_visible: int
    tasks_run: int

    @property
    def isolated(self) -> bool:
        """The tenant saw exactly the rows written for it, and they are all there."""
        return self.visible == self.written == self.expected and self.foreign_visible == 0


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` measured."""

    tenants: tuple[TenantReport, ...]
    visible_without_tenant: int
    refused: str
    health: dict[str, Any]
    metric_totals: dict[str, float]
    seconds: float


# ----------------------------------------------------------------------- output


class _Interrupt:
    """``Ctrl-C`` and ``SIGTERM`` while the demo runs, acted on at its next step or poll.

    The handler only takes note; :meth:`check`, called by every progress step and
    between polls, raises KeyboardInterrupt.  An exception raised by the handler
    itself would surface wherever the main thread happened to be: in a weak
    reference callback or a finalizer, Python prints it and drops it (the demo
    would run to the end), and in code run by ``exec()`` (Celery builds a task's
    signature check that way) CPython 3.11 notes it as unhandled and ends the
    process with SIGINT after the clean-up, whatever exit code the command chose.
    A second signal raises at once, for a step that does not return, except
    during the clean-up (:attr:`closing`), which always runs to its end.
    """

    def __init__(self) -> None:
        self.requested = False
        self.closing = False

    def note(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and not self.closing:
            self.raised()
        self.requested = True

    def check(self) -> None:
        if self.requested:
            self.raised()

    def raised(self, cause: BaseException | None = None) -> NoReturn:
        """Raise KeyboardInterrupt (from ``cause``); any later signal is only noted, so
        that none can cut short the clean-up the exception is on its way to."""
        self.closing = True
        if cause is None:
            raise KeyboardInterrupt
        raise KeyboardInterrupt from cause

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """Take ``SIGINT`` and ``SIGTERM`` (where the main thread runs the demo, and
        ``SIGINT`` unless it is ignored, as in a background job) until the block ends."""
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    previous[signum] = signal.signal(signum, self.note)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@dataclass
class _Progress:
    out: TextIO
    started: float = field(default_factory=time.monotonic)
    interrupt: _Interrupt = field(default_factory=_Interrupt)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, message: str) -> None:
        """Say what the demo does next (unless it was interrupted: then raise
        KeyboardInterrupt)."""
        self.interrupt.check()
        self.said(message)

    def said(self, message: str) -> None:
        """Say what was done, interrupted or not (the clean-up's lines)."""
        self.line(f"[{self.elapsed():5.1f}s] {message}")

    def pause(self, seconds: float) -> None:
        """Sleep between two polls; raise KeyboardInterrupt if the demo was interrupted."""
        self.interrupt.check()
        time.sleep(seconds)
        self.interrupt.check()

    def line(self, message: str = "") -> None:
        print(message, file=self.out, flush=True)


class _Cleanup:
    """What the demo started, removed in reverse order, and named in its progress lines.

    ``callback`` registers a removal (temporary directories, engines: not named);
    ``started`` names a thing the user should hear was removed, once it exists.
    """

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.things: list[str] = []
        self.failed: list[str] = []

    def callback(self, function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        self.stack.callback(function, *args, **kwargs)

    def started(self, thing: str) -> None:
        self.things.append(thing)

    def warn(self, thing: str, what: str, exc: BaseException) -> None:
        """A removal failed: say so on standard error, and leave ``thing`` out of "removed"."""
        self.failed.append(thing)
        message = f"tenant-celery demo: warning: could not remove {what}: {_one_line(exc)}"
        print(message, file=sys.stderr)

    def close(self, progress: _Progress) -> None:
        things = list(reversed(self.things))
        if things:
            progress.said(f"removing {_listing(things)}")
        self.stack.close()
        removed = [thing for thing in things if thing not in self.failed]
        if removed:
            progress.said(f"removed {_listing(removed)}")


def _listing(things: list[str]) -> str:
    return things[0] if len(things) == 1 else f"{', '.join(things[:-1])} and {things[-1]}"


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


# ----------------------------------------------------------------------- server


def _import_pgserver() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; it is harmless here.
            warnings.simplefilter("ignore")
            return importlib.import_module("pgserver")
    except ImportError as exc:
        raise DemoUsageError(
            f"the embedded PostgreSQL server needs the {_EMBEDDED_EXTRA!r} extra "
            f"(pip install 'tenant-celery[{_EMBEDDED_EXTRA}]'), or pass --dsn to use "
            f"an existing server ({type(exc).__name__}: {_one_line(exc)})"
        ) from exc


def _embedded_server(progress: _Progress, cleanup: _Cleanup) -> URL:
    pgserver = _import_pgserver()
    base = Path(tempfile.mkdtemp(prefix="tenant-celery-demo-pg-"))
    cleanup.callback(shutil.rmtree, base, ignore_errors=True)
    progress.step(f"starting an embedded PostgreSQL (pgserver) in {base}")
    try:
        with _held_logs("pgserver", progress.interrupt):
            server = pgserver.get_server(base / "data", cleanup_mode="delete")
    except Exception as exc:
        raise DemoUsageError(f"the embedded PostgreSQL did not start: {_one_line(exc)}") from exc
    cleanup.callback(_stop_embedded, server, cleanup)
    cleanup.started("the embedded server")
    try:
        info = server.get_postmaster_info()
    except Exception as exc:
        raise DemoUsageError(f"the embedded PostgreSQL did not start: {_one_line(exc)}") from exc
    return URL.create(
        "postgresql+psycopg",
        username="postgres",
        database="postgres",
        query={"host": str(info.socket_dir), "port": str(info.port or 5432)},
    )


class _Holder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _held_logs(name: str, interrupt: _Interrupt) -> Iterator[None]:
    """Hold what logger ``name`` logs in the block, and pass it on after it unless the
    demo was interrupted meanwhile: pgserver logs every failed command at length, and
    the ``Ctrl-C`` that interrupts the demo also kills the ``initdb`` it runs."""
    logger = logging.getLogger(name)
    holder, propagate = _Holder(), logger.propagate
    logger.addHandler(holder)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(holder)
        logger.propagate = propagate
        if not interrupt.requested:
            for record in holder.records:
                logger.handle(record)


def _stop_embedded(server: Any, cleanup: _Cleanup) -> None:
    """Stop the embedded server and delete its data; a failure is reported, not raised."""
    try:
        server.cleanup()
    except Exception as exc:  # reported; the rest of the clean-up goes on
        cleanup.warn("the embedded server", "the embedded PostgreSQL server", exc)


def _existing_server(dsn: str) -> URL:
    try:
        return database_url(dsn)
    except ConfigurationError as exc:
        raise DemoUsageError(f"--dsn: {exc}") from exc


def _engine(url: URL, **kwargs: Any) -> Engine:
    connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": _CONNECT_TIMEOUT}
    return sa.create_engine(url, poolclass=sa.NullPool, connect_args=connect_args, **kwargs)


# --------------------------------------------------------------------- database


@dataclass
class _Names:
    database: str
    role: str
    password: str

    @classmethod
    def fresh(cls) -> _Names:
        token = secrets.token_hex(4)
        return cls(
            database=f"tenant_celery_demo_{token}",
            role=f"tenant_celery_demo_app_{token}",
            password=secrets.token_urlsafe(24),
        )


def _check_superuser(server: Engine) -> None:
    shown = server.url.render_as_string(hide_password=True)
    try:
        with server.connect() as conn:
            superuser = conn.execute(
                sa.text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            ).scalar()
    except (SQLAlchemyError, ImportError) as exc:
        raise DemoUsageError(f"cannot connect to {shown}: {_one_line(exc)}") from exc
    if not superuser:
        raise DemoUsageError(
            "--dsn must connect as a superuser: the demo creates a database and a role, "
            "and counts rows past row-level security"
        )


def _create_role(server: Engine, names: _Names, cleanup: _Cleanup) -> None:
    from ..rls import create_app_role  # noqa: PLC0415 (imports Alembic)

    with server.connect() as conn:
        exists = conn.execute(
            sa.text("SELECT 1 FROM pg_roles WHERE rolname = :name"), {"name": names.role}
        ).scalar()
    if exists:
        raise DemoError(f"role {names.role} exists already; run the demo again")

    role = f"role {names.role}"
    cleanup.callback(
        _drop, server, f"DROP ROLE IF EXISTS {quote(names.role)}", "the role", role, cleanup
    )
    with server.begin() as conn:
        create_app_role(conn, names.role, login=True, password=names.password)
    cleanup.started("the role")


def _drop(server: Engine, statement: str, thing: str, what: str, cleanup: _Cleanup) -> None:
    """Run a DROP outside any transaction; a failure is reported, not raised."""
    try:
        with server.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(statement)
    except SQLAlchemyError as exc:
        cleanup.warn(thing, what, exc)


def _create_database(server: Engine, names: _Names, cleanup: _Cleanup) -> None:
    with server.connect() as conn:
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        autocommit.exec_driver_sql(f"CREATE DATABASE {quote(names.database)}")
        cleanup.callback(
            _drop,
            server,
            f"DROP DATABASE IF EXISTS {quote(names.database)} WITH (FORCE)",
            "the database",
            f"database {names.database}",
            cleanup,
        )
        cleanup.started("the database")
        autocommit.exec_driver_sql(
            f"GRANT CONNECT ON DATABASE {quote(names.database)} TO {quote(names.role)}"
        )


def _prepare_schema(admin: Engine, names: _Names, setting: str) -> str | None:
    from ..migrations import upgrade  # noqa: PLC0415 (imports Alembic)
    from ..rls import enable_tenant_rls, grant_tenant_tables  # noqa: PLC0415
    from .app import DEMO_TABLE, metadata  # noqa: PLC0415

    revision = upgrade(admin, grant_to=[names.role])
    with admin.begin() as conn:
        metadata.create_all(conn)
        enable_tenant_rls(conn, DEMO_TABLE, setting=setting)
        grant_tenant_tables(conn, names.role, [DEMO_TABLE], schema="public")
    return revision


# ----------------------------------------------------------------------- worker


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    node: str
    log_path: Path
    port: int

    @property
    def monitor(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def last_error(self) -> str:
        lines = [line.strip() for line in self.log_text().splitlines() if line.strip()]
        errors = [line for line in lines if re.search(r"error|exception|refused", line, re.I)]
        return (errors or lines or ["no output"])[-1][:_MAX_MESSAGE]

    def wait_ready(self, deadline: float, progress: _Progress) -> None:
        ready = re.compile(rf"{re.escape(self.node)}@\S+ ready\.")
        while not ready.search(self.log_text()):
            code = self.process.poll()
            if code is not None:
                raise DemoError(
                    f"the celery worker exited with code {code} before it was ready: "
                    f"{self.last_error()}"
                )
            if time.monotonic() > deadline:
                raise DemoError(f"the celery worker was not ready in time: {self.last_error()}")
            progress.pause(0.1)

    def stop(self) -> None:
        group = self.process.pid
        if self.process.poll() is None:
            # The demo app answers SIGTERM by stopping its pool's processes and exiting
            # at once (see tenant_celery.demo.app): its work is done or abandoned.
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(_STOP_TIMEOUT)
        # The pool's children too: the worker runs in a session (group) of its own.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


def _start_worker(
    app_url: URL, workdir: Path, cleanup: _Cleanup, progress: _Progress, deadline: float
) -> _Worker:
    from .app import BACKEND_URL_ENV, BROKER_URL_ENV, DATABASE_URL_ENV, QUEUE  # noqa: PLC0415

    rendered = app_url.render_as_string(hide_password=False)
    port = _free_port()
    node = f"tenant-celery-demo-{secrets.token_hex(3)}"
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in {"TENANT_CELERY_DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR"}
    }
    environ.update(
        {
            BROKER_URL_ENV: "sqla+" + rendered,
            BACKEND_URL_ENV: "db+" + rendered,
            DATABASE_URL_ENV: rendered,
            "TENANT_CELERY_MONITOR_PORT": str(port),
            "TENANT_CELERY_MONITOR_HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
            # Its temporary files (the metrics' multiprocess directory) go where the
            # demo removes them, however the worker ends.
            "TMPDIR": str(workdir),
            # kombu's SQLAlchemy models use a loader option SQLAlchemy 2.1 deprecates.
            "PYTHONWARNINGS": "ignore::DeprecationWarning",
        }
    )
    command = [
        sys.executable, "-m", "celery", "-A", "tenant_celery.demo.app", "worker",
        "-P", "prefork", "-c", str(WORKER_CONCURRENCY), "-Q", QUEUE, "-n", f"{node}@%h",
        "--loglevel=INFO", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    log_path = workdir / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops the worker
        )
    worker = _Worker(process, node, log_path, port)
    cleanup.callback(worker.stop)
    cleanup.started("the worker")
    worker.wait_ready(min(deadline, time.monotonic() + _READY_TIMEOUT), progress)
    return worker


# ------------------------------------------------------------------------ work


@dataclass
class _Tenant:
    name: str
    tenant_id: str
    plain: int
    results: list[Any] = field(default_factory=list)

    @property
    def expected(self) -> int:
        return self.plain + CHAIN_LENGTH + 1


def _publish(tenants: list[_Tenant]) -> Any:
    from celery import chain  # noqa: PLC0415

    from ..context import tenant_context  # noqa: PLC0415
    from ..fanout import fan_out  # noqa: PLC0415
    from .app import app, record  # noqa: PLC0415

    for tenant in tenants:
        with tenant_context(tenant.tenant_id):
            for number in range(1, tenant.plain + 1):
                tenant.results.append(record.delay(f"plain {number}"))
            steps = [record.si(f"chain step {n}") for n in range(1, CHAIN_LENGTH + 1)]
            last = chain(*steps).apply_async()
            node: Any = last
            while node is not None:
                tenant.results.append(node)
                node = node.parent
    for tenant, result in zip(
        tenants, fan_out(record.s("fan-out"), [t.tenant_id for t in tenants]), strict=True
    ):
        tenant.results.append(result)
    # Sent by name, around the tenant task's own checks: a message with no tenant.
    return app.send_task(record.name, args=["no tenant"])


def _wait(
    tenants: list[_Tenant], refused: Any, count_rows: Callable[[], int], progress: _Progress,
    deadline: float,
) -> str:  # fmt: skip
    pending = [result for tenant in tenants for result in tenant.results] + [refused]
    total = len(pending)
    shown = -1
    while pending:
        pending = [result for result in pending if not result.ready()]
        done = total - len(pending)
        if done != shown:
            shown = done
            progress.step(f"{done}/{total} tasks finished, {count_rows()} rows in the table")
        if not pending:
            break
        if time.monotonic() > deadline:
            raise DemoError(
                f"only {done} of {total} tasks finished in time; is the worker running?"
            )
        progress.pause(0.3)
    for tenant in tenants:
        for result in tenant.results:
            if not result.successful():
                raise DemoError(
                    f"a task of tenant {tenant.name} failed: {result.state} "
                    f"{type(result.result).__name__}: {_one_line(result.result)}"
                )
    if refused.successful():
        raise DemoError("the task sent with no tenant ran; it must have been refused")
    return type(refused.result).__name__


def _count(
    admin: Engine, app_engine: Engine, tenants: list[_Tenant], setting: str
) -> tuple[dict[str, int], dict[str, tuple[int, int]], int]:
    from ..db import set_tenant_guc  # noqa: PLC0415
    from .app import demo_rows  # noqa: PLC0415

    with admin.connect() as conn:
        written = {
            str(tenant_id): int(count)
            for tenant_id, count in conn.execute(
                sa.select(demo_rows.c.tenant_id, sa.func.count()).group_by(demo_rows.c.tenant_id)
            )
        }
    visible: dict[str, tuple[int, int]] = {}
    for tenant in tenants:
        with app_engine.begin() as conn:
            set_tenant_guc(conn, tenant.tenant_id, setting=setting)
            own, foreign = conn.execute(
                sa.select(
                    sa.func.count().filter(demo_rows.c.tenant_id == tenant.tenant_id),
                    sa.func.count().filter(demo_rows.c.tenant_id != tenant.tenant_id),
                )
            ).one()
            visible[tenant.tenant_id] = (int(own), int(foreign))
    with app_engine.begin() as conn:
        nobody = int(conn.execute(sa.select(sa.func.count()).select_from(demo_rows)).scalar_one())
    return written, visible, nobody


# ---------------------------------------------------------------------- monitor


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:  # /health answers 503 with a JSON body
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        raise DemoError(f"the worker monitor did not answer {url}: {_one_line(exc)}") from exc


def _read_metrics(monitor: str) -> tuple[dict[str, float], dict[str, float]]:
    """Totals of the task metrics, and the succeeded tasks per tenant label."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    status, body = _get(f"{monitor}/metrics")
    if status != 200:
        raise DemoError(f"GET {monitor}/metrics answered HTTP {status}")
    totals = {name: 0.0 for _, name in _METRICS}
    per_tenant: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
            if sample.name == "celery_task_success_total":
                tenant = sample.labels.get("tenant", "")
                per_tenant[tenant] = per_tenant.get(tenant, 0.0) + sample.value
    return totals, per_tenant


def _settled_metrics(
    monitor: str, expected_success: int, progress: _Progress, deadline: float
) -> tuple[dict[str, float], dict[str, float]]:
    # Celery counts a task after storing its result: give the last counts a moment.
    while True:
        totals, per_tenant = _read_metrics(monitor)
        settled = (
            totals["celery_task_success_total"] >= expected_success
            and totals["celery_task_rejected_total"] >= 1
        )
        if settled or time.monotonic() > deadline:
            return totals, per_tenant
        progress.pause(0.2)


# ------------------------------------------------------------------------ report


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


# -------------------------------------------------------------------------- run


def run_demo(
    dsn: str | None = None, *, out: TextIO | None = None, timeout: float = DEFAULT_TIMEOUT
) -> DemoResult:
    """Run the demo, print its progress and report to ``out`` (standard output), and
    return what it measured.

    Without ``dsn`` an embedded PostgreSQL server is started (the ``embedded``
    extra); with it, ``dsn`` must be a superuser URL of an existing server, on
    which the demo creates (and then drops) one database and one role.

    Raises:
        DemoError: something failed, or a tenant saw a row that is not its own;
            everything started was removed.
        KeyboardInterrupt: interrupted (``Ctrl-C`` or ``SIGTERM``); everything
            started was removed.
    """
    progress = _Progress(out if out is not None else sys.stdout)
    deadline = progress.started + timeout
    with progress.interrupt.handling():
        cleanup = _Cleanup()
        try:
            result = _run(dsn, progress, deadline, cleanup)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            if progress.interrupt.requested:
                # What failed was cut short by the interrupt (a subprocess killed by the
                # terminal's Ctrl-C, a report made of half-read counts): report that.
                progress.interrupt.raised(exc)
            if isinstance(exc, DemoError):
                raise
            if isinstance(exc, TenantCeleryError | SQLAlchemyError | OSError):
                raise DemoError(_one_line(exc)) from exc
            raise DemoError(f"{type(exc).__name__}: {_one_line(exc)}") from exc
        finally:
            progress.interrupt.closing = True  # the clean-up always runs to its end
            cleanup.close(progress)
        progress.interrupt.check()  # one that came after the last step
    progress.line(f"done in {progress.elapsed():.1f}s")
    return result


@dataclass
class _Setup:
    names: _Names
    setting: str
    admin: Engine
    app_engine: Engine
    app_url: URL
    worker: _Worker


def _run(dsn: str | None, progress: _Progress, deadline: float, cleanup: _Cleanup) -> DemoResult:
    setup = _set_up(dsn, progress, deadline, cleanup)
    tenants, refused, total = _exercise(setup, progress, deadline)
    written, visible, nobody = _count(setup.admin, setup.app_engine, tenants, setup.setting)
    monitor = setup.worker.monitor
    totals, per_tenant = _settled_metrics(
        monitor, total, progress, min(deadline, time.monotonic() + 5)
    )
    status, body = _get(f"{monitor}/health")
    try:
        health: dict[str, Any] = json.loads(body)
    except ValueError as exc:
        raise DemoError(f"/health answered HTTP {status} with no JSON: {body[:200]!r}") from exc
    reports = tuple(
        TenantReport(
            name=t.name,
            tenant_id=t.tenant_id,
            expected=t.expected,
            written=written.get(t.tenant_id, 0),
            visible=visible[t.tenant_id][0],
            foreign_visible=visible[t.tenant_id][1],
            tasks_run=int(per_tenant.get(t.tenant_id, 0)),
        )
        for t in tenants
    )
    _print_report(progress, setup.names.role, reports, nobody, status, health, totals)
    problems = [
        f"tenant {r.name} wrote {r.written} rows and sees {r.visible} of them and "
        f"{r.foreign_visible} of other tenants (expected {r.expected})"
        for r in reports
        if not r.isolated
    ]
    if nobody:
        problems.append(f"{nobody} rows are visible with no tenant set")
    if sum(written.values()) != total:
        problems.append(f"{sum(written.values())} rows in the table, expected {total}")
    if health.get("status") != "ok" or status != 200:
        problems.append(f"/health answered {status} {json.dumps(health)}")
    if totals["celery_task_success_total"] != total:
        problems.append(
            f"/metrics counts {_number(totals['celery_task_success_total'])} succeeded "
            f"tasks, expected {total}"
        )
    if problems:
        raise DemoError("; ".join(problems))
    progress.step("every tenant saw exactly its own rows; the worker is healthy")
    return DemoResult(
        tenants=reports,
        visible_without_tenant=nobody,
        refused=refused,
        health=health,
        metric_totals=totals,
        seconds=progress.elapsed(),
    )


def _set_up(dsn: str | None, progress: _Progress, deadline: float, cleanup: _Cleanup) -> _Setup:
    try:
        importlib.import_module("prometheus_client")
    except ImportError as exc:
        raise DemoUsageError(
            f"the demo's metrics need the {_PROMETHEUS_EXTRA!r} extra "
            f"(pip install 'tenant-celery[{_PROMETHEUS_EXTRA}]')"
        ) from exc
    setting = guc_name(None)
    if dsn is None:
        server_url = _embedded_server(progress, cleanup)
    else:
        server_url = _existing_server(dsn)
        progress.step(f"using the server at {server_url.render_as_string(hide_password=True)}")
    server = _engine(server_url)
    cleanup.callback(server.dispose)
    _check_superuser(server)

    names = _Names.fresh()
    _create_role(server, names, cleanup)
    _create_database(server, names, cleanup)
    admin = _engine(server_url.set(database=names.database))
    cleanup.callback(admin.dispose)
    app_url = server_url.set(database=names.database, username=names.role, password=names.password)
    app_engine = _engine(app_url)
    cleanup.callback(app_engine.dispose)
    progress.step(
        f"created database {names.database} and role {names.role} "
        "(login; not superuser, no BYPASSRLS, owns nothing)"
    )

    revision = _prepare_schema(admin, names, setting)
    progress.step(
        f"applied the bundled migration ({revision}): broker and result tables, "
        f"granted to {names.role}"
    )
    progress.step(
        f"created table demo_rows with row-level security enabled and forced (setting {setting})"
    )

    workdir = Path(tempfile.mkdtemp(prefix="tenant-celery-demo-"))
    cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
    progress.step(
        f"starting a celery worker (prefork, concurrency {WORKER_CONCURRENCY}, PostgreSQL "
        f"broker and result backend) connected as {names.role}"
    )
    worker = _start_worker(app_url, workdir, cleanup, progress, deadline)
    progress.step(f"worker ready; its monitor listens on {worker.monitor}")
    return _Setup(names, setting, admin, app_engine, app_url, worker)


def _exercise(
    setup: _Setup, progress: _Progress, deadline: float
) -> tuple[list[_Tenant], str, int]:
    from .app import configure  # noqa: PLC0415

    rendered = setup.app_url.render_as_string(hide_password=False)
    configure("sqla+" + rendered, "db+" + rendered, rendered)
    tenants = [_Tenant(name, str(uuid.uuid4()), plain) for name, plain in TENANTS]
    refused_result = _publish(tenants)
    total = sum(t.expected for t in tenants)
    progress.step(
        f"published {total} tasks for {len(tenants)} tenants (plain calls, a "
        f"{CHAIN_LENGTH}-step chain each, one fan-out) and 1 task with no tenant"
    )

    def count_rows() -> int:
        with setup.admin.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM demo_rows")).scalar_one())

    refused = _wait(tenants, refused_result, count_rows, progress, deadline)
    progress.step(f"all tasks finished; the task with no tenant was refused ({refused})")
    return tenants, refused, total


def _print_report(
    progress: _Progress,
    role: str,
    reports: tuple[TenantReport, ...],
    nobody: int,
    status: int,
    health: dict[str, Any],
    totals: dict[str, float],
) -> None:
    header = ("tenant", "tenant id", "rows written", "rows visible to tenant", "tasks run")
    rows: list[tuple[str, ...]] = [header]
    rows += [
        (r.name, r.tenant_id, str(r.written), str(r.visible), str(r.tasks_run)) for r in reports
    ]
    progress.line()
    for line in _table(rows):
        progress.line(f"  {line}")
    progress.line(
        "  rows written: counted as the superuser, which row-level security does not filter"
    )
    progress.line(f"  rows visible: counted as {role} with the tenant set, no WHERE clause")
    progress.line("  tasks run: celery_task_success_total of the tenant in /metrics")
    progress.line(f"  rows visible with no tenant set: {nobody}")
    progress.line()
    progress.line(f"GET /health -> {status} {json.dumps(health)}")
    progress.line()
    progress.line("GET /metrics, totals over the worker's processes:")
    for line in _table([(f"  {name}", _number(totals[name])) for _, name in _METRICS]):
        progress.line(line)
    progress.line()
