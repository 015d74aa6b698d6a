"""Prometheus metrics for Celery tasks, counted from Celery's signals.

:func:`install_metrics` is all a host calls; the worker monitor
(:mod:`tenant_celery.monitor`) serves the numbers.  The metric names are the
constants below, each documented in one table in the reference.

Under the prefork pool every child process counts its own tasks.  The library
then runs prometheus-client's multiprocess mode itself: when a worker whose app
has metrics installed starts, a fresh directory is made for it (in the system's
temporary directory), each child writes its counts there, and the monitor in
the worker's main process adds them up.  Counts of children that exited
(``--max-tasks-per-child``, a crash) stay in the totals.  The directory is
removed when the worker stops.  The threads, solo, gevent and eventlet pools
run every task in one process and count in memory.

Every series starts at zero, so that Prometheus's ``rate()`` and ``increase()``
see a task's first executions: when a worker starts, each task in the app's
registry (Celery's own ``celery.*`` tasks aside) gets its counters and its
histogram at zero, labelled ``tenant=""`` with the tenant label; a task
registered later, a Celery task, and each tenant label value get theirs with
their first message.  Under the prefork pool the worker's main process writes
those zeros in its own file, before the pool forks, and the children count in
theirs: the monitor's sum shows the zeros and counts nothing twice.

:data:`RULES_FILE` is a Prometheus rules file for these metrics: recording
rules and the alerts the monitoring how-to documents.

Needs the ``prometheus`` extra: ``pip install 'tenant-celery[prometheus]'``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.app.task import Context
from celery.signals import (
    task_failure,
    task_prerun,
    task_retry,
    task_success,
    worker_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from .context import current_tenant
from .errors import ConfigurationError, TenantCeleryError
from .propagation import message_tenant
from .signals import tenant_rejected

if TYPE_CHECKING:
    from types import ModuleType

    from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = [
    "BROKER_CLAIMED_MESSAGES_TOTAL",
    "BROKER_CLAIMS_TOTAL",
    "BROKER_CLAIM_DURATION_SECONDS",
    "BROKER_EMPTY_CLAIMS_TOTAL",
    "DASHBOARD_FILE",
    "DURATION_BUCKETS",
    "OTHER_TENANTS",
    "QUEUE_DELAYED_BY_TENANT",
    "QUEUE_IN_FLIGHT_BY_TENANT",
    "QUEUE_LABEL",
    "QUEUE_LENGTH",
    "QUEUE_LENGTH_BY_TENANT",
    "QUEUE_LENGTH_UP",
    "RULES_FILE",
    "TASK_DURATION_SECONDS",
    "TASK_FAILURE_TOTAL",
    "TASK_NAME_LABEL",
    "TASK_REJECTED_TOTAL",
    "TASK_RETRY_TOTAL",
    "TASK_STARTED_TOTAL",
    "TASK_SUCCESS_TOTAL",
    "TENANT_LABEL",
    "TENANT_PAUSED",
    "install_metrics",
    "multiprocess_directory",
]

logger = logging.getLogger("tenant_celery.metrics")

# Metric names: stable, listed in one table in docs/reference/metrics.md.
TASK_STARTED_TOTAL = "celery_task_started_total"
"""Counter: task executions begun, retried attempts and refused tenant tasks included."""
TASK_SUCCESS_TOTAL = "celery_task_success_total"
"""Counter: executions that returned (Celery's ``task_success``)."""
TASK_FAILURE_TOTAL = "celery_task_failure_total"
"""Counter: executions that failed (Celery's ``task_failure``), refused tenant tasks excluded."""
TASK_RETRY_TOTAL = "celery_task_retry_total"
"""Counter: executions that ended in a retry (Celery's ``task_retry``)."""
TASK_REJECTED_TOTAL = "celery_task_rejected_total"
"""Counter: tenant tasks refused for a missing, invalid, conflicting or unsigned tenant."""
TASK_DURATION_SECONDS = "celery_task_duration_seconds"
"""Histogram: seconds from the start of an execution to its success or failure."""
QUEUE_LENGTH = "celery_queue_length"
"""Gauge: messages waiting in each queue the worker consumes, read from the broker at
scrape time by the worker monitor."""
QUEUE_LENGTH_BY_TENANT = "celery_queue_length_by_tenant"
"""Gauge: messages waiting in each queue the worker consumes, per tenant (labels
``queue`` and ``tenant``); the package's transport only, with the task metrics'
tenant label and its bound."""
QUEUE_IN_FLIGHT_BY_TENANT = "celery_queue_in_flight_by_tenant"
"""Gauge: messages claimed by workers (prefetched or running, not held for an ETA)
from each queue the worker consumes, per tenant; the package's transport only, with
the tenant label."""
QUEUE_DELAYED_BY_TENANT = "celery_queue_delayed_by_tenant"
"""Gauge: messages workers hold until their ETA (or countdown), per queue and tenant;
the package's transport only, with the tenant label."""
TENANT_PAUSED = "celery_tenant_paused"
"""Gauge: 1 while a tenant is paused on a queue the worker consumes
(:func:`tenant_celery.tenants.pause`), 0 once resumed; the package's transport only,
with the tenant label."""
QUEUE_LENGTH_UP = "celery_queue_length_up"
"""Gauge: 1 when the scrape read the queue lengths from the broker, 0 when it could not."""
BROKER_CLAIMS_TOTAL = "celery_broker_claims_total"
"""Counter: claim statements the worker's consumer ran on the package's transport
(:func:`tenant_celery.transport.claim_stats`), served by the worker monitor."""
BROKER_EMPTY_CLAIMS_TOTAL = "celery_broker_empty_claims_total"
"""Counter: those claims that took no message."""
BROKER_CLAIMED_MESSAGES_TOTAL = "celery_broker_claimed_messages_total"
"""Counter: messages those claims took."""
BROKER_CLAIM_DURATION_SECONDS = "celery_broker_claim_duration_seconds"
"""Histogram: seconds each claim took, seen from the worker (its round trip)."""

TASK_NAME_LABEL = "task_name"
"""Label of every task metric: the task's registered name."""
TENANT_LABEL = "tenant"
"""Label added by ``install_metrics(..., tenant_label=True)``."""
QUEUE_LABEL = "queue"
"""Label of :data:`QUEUE_LENGTH`: the queue's name."""

OTHER_TENANTS = "other"
"""``tenant`` label value of every tenant past the first ``max_tenant_labels``.

Tasks run without a tenant are labelled with the empty string."""

DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    float("inf"),
)  # fmt: skip
"""Upper bounds (seconds) of the :data:`TASK_DURATION_SECONDS` buckets."""

RULES_FILE = Path(__file__).parent / "prometheus" / "rules.yml"
"""Path of the Prometheus rules file shipped with the package: recording rules and
alerts for these metrics (``rule_files`` in Prometheus's configuration)."""

DASHBOARD_FILE = Path(__file__).parent / "prometheus" / "dashboard.json"
"""Path of the Grafana dashboard shipped with the package: panels for these metrics,
read from a Prometheus data source chosen when it is imported."""

_EXTRA = "prometheus"
_MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_DIR_PREFIX = "tenant-celery-metrics-"
_STALE_DIR = re.compile(re.escape(_DIR_PREFIX) + r"(\d+)-")
_TENANTS_FILE = "tenant-labels.jsonl"  # not *.db: the multiprocess collector skips it
_ATTEMPT_ATTR = "_tenant_celery_metrics"
# Celery's own tasks (celery.chord_unlock, ...): series from their first message.
_CELERY_TASKS = "celery."


def _prometheus() -> ModuleType:
    try:
        import prometheus_client  # noqa: PLC0415
        import prometheus_client.exposition  # noqa: PLC0415
        import prometheus_client.multiprocess  # noqa: PLC0415
        import prometheus_client.values  # noqa: PLC0415
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "tenant-celery metrics need prometheus-client: pip install 'tenant-celery[prometheus]'",
            name="prometheus_client",
        ) from exc
    return prometheus_client


# --------------------------------------------------------------------------- tenant label


class _TenantLabels:
    """Admits the first ``limit`` distinct tenants as label values; the rest are "other".

    In one process the admitted set lives in memory.  Once the worker runs in
    multiprocess mode the set is a file in the metrics directory, shared by
    the main process and every child (and the children that replace them)
    under an exclusive lock, so the bound holds for the whole worker.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._admitted: set[str] = set()
        self._full = False
        self._path: str | None = None

    def label(self, tenant: str | None) -> str:
        if tenant is None:
            return ""
        with self._lock:
            directory = _multiprocess.directory
            path = None if directory is None else os.path.join(directory, _TENANTS_FILE)
            if path != self._path:
                self._path, self._admitted, self._full = path, set(), False
            if tenant in self._admitted:
                return tenant
            if self._full:
                return OTHER_TENANTS
            if path is None:
                if len(self._admitted) < self.limit:
                    self._admitted.add(tenant)
                    return tenant
                self._full = True
                return OTHER_TENANTS
            return self._admit_shared(tenant, path)

    def _admit_shared(self, tenant: str, path: str) -> str:
        with open(path, "a+", encoding="utf-8") as file:
            fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
            file.seek(0)
            self._admitted = {json.loads(line) for line in file if line.strip()}
            if tenant in self._admitted:
                return tenant
            if len(self._admitted) >= self.limit:
                self._full = True
                return OTHER_TENANTS
            file.write(json.dumps(tenant) + "\n")
            self._admitted.add(tenant)
            return tenant


# ----------------------------------------------------------------------- installation


@dataclass
class _Attempt:
    """What the metrics remember about one execution, on its request."""

    labels: tuple[str, ...]
    started: float
    rejected: bool = False


class _Installation:
    def __init__(
        self,
        app: Celery,
        registry: CollectorRegistry,
        tenant_label: bool,
        max_tenant_labels: int,
    ) -> None:
        prometheus = _prometheus()
        self.app = app
        self.registry = registry
        self.tenant_label = tenant_label
        self.max_tenant_labels = max_tenant_labels
        self.tenants = _TenantLabels(max_tenant_labels)
        #: Label sets whose series this process has created (at zero, then counted).
        self.initialised: set[tuple[str, ...]] = set()
        names = [TASK_NAME_LABEL, TENANT_LABEL] if tenant_label else [TASK_NAME_LABEL]
        created: list[Any] = []

        def counter(name: str, documentation: str) -> Counter:
            metric: Counter = prometheus.Counter(name, documentation, names, registry=registry)
            created.append(metric)
            return metric

        try:
            self.started = counter(TASK_STARTED_TOTAL, "Task executions begun.")
            self.success = counter(TASK_SUCCESS_TOTAL, "Task executions that succeeded.")
            self.failure = counter(TASK_FAILURE_TOTAL, "Task executions that failed.")
            self.retry = counter(TASK_RETRY_TOTAL, "Task executions that ended in a retry.")
            self.rejected = counter(
                TASK_REJECTED_TOTAL,
                "Tenant tasks refused for a missing, invalid, conflicting or unsigned tenant.",
            )
            self.duration: Histogram = prometheus.Histogram(
                TASK_DURATION_SECONDS,
                "Seconds from the start of a task execution to its success or failure.",
                names,
                registry=registry,
                buckets=DURATION_BUCKETS,
            )
        except ValueError:
            # Leave the registry as it was: no half-installed set of metrics.
            for metric in created:
                registry.unregister(metric)
            raise
        self.metrics: tuple[Counter | Histogram, ...] = (*created, self.duration)

    def initialise(self, labels: tuple[str, ...]) -> None:
        """Create every series of ``labels`` (at zero unless it already counted)."""
        if labels in self.initialised:
            return
        for metric in self.metrics:
            metric.labels(*labels)
        self.initialised.add(labels)

    def initialise_registered(self) -> None:
        """Create at zero the series of every task the app has registered, but Celery's own."""
        try:
            names = sorted(self.app.tasks)
        except RuntimeError:  # an app that must not be finalised yet
            return
        for name in names:
            if not name.startswith(_CELERY_TASKS):
                self.initialise((name, "") if self.tenant_label else (name,))

    def forget_series(self) -> None:
        """Drop every series this process created: they count elsewhere from now on."""
        with warnings.catch_warnings():
            # Only this process's objects go; the counts in files stay, as they must.
            warnings.filterwarnings("ignore", "Clearing labels", UserWarning)
            for metric in self.metrics:
                metric.clear()
        self.initialised.clear()

    def same_options(self, registry: CollectorRegistry, tenant_label: bool, limit: int) -> bool:
        return (self.registry, self.tenant_label, self.max_tenant_labels) == (
            registry,
            tenant_label,
            limit,
        )

    def labels(self, task: Task[Any, Any], request: Context) -> tuple[str, ...]:
        if not self.tenant_label:
            return (task.name,)
        return (task.name, self.tenants.label(_tenant_of(task, request)))


_installed: dict[int, _Installation] = {}
_install_lock = threading.Lock()


def install_metrics(
    app: Celery,
    *,
    registry: CollectorRegistry | None = None,
    tenant_label: bool = False,
    max_tenant_labels: int = 100,
) -> None:
    """Count the tasks of ``app`` that this process runs, in Prometheus metrics.

    Call it at import time, in the module that creates the app, so that every
    worker runs it before it starts: a prefork worker chooses how to count
    when it starts, and the worker monitor serves the result.  Calling it
    again for the same app with the same arguments does nothing, so no task
    is ever counted twice.

    The metrics (names in the module constants) are labelled ``task_name``.
    With ``tenant_label=True`` they are labelled ``tenant`` too: the first
    ``max_tenant_labels`` distinct tenants a worker sees get their own value,
    later ones share :data:`~tenant_celery.metrics.OTHER_TENANTS`, and tasks
    without a tenant get ``""``, so the number of series cannot grow with the
    number of tenants.

    Series start at zero: a worker creates those of every task it has
    registered when it starts, and those of a tenant with its first message
    (see the module docs), so that ``rate()`` and ``increase()`` miss no run.

    The metrics are created in ``registry`` (prometheus-client's default
    registry when ``None``).  Under the prefork pool the worker's totals are
    read from the multiprocess directory instead (see the module docs), so
    serve them with the worker monitor rather than from ``registry``.

    Counting happens in the signal receivers of the process and thread that
    run each task; it is thread-safe and process-safe.

    Raises:
        ConfigurationError: ``max_tenant_labels`` is not a positive integer,
            the app already has metrics installed with other arguments, or
            ``registry`` already holds a metric of the same name.
        ModuleNotFoundError: prometheus-client is not installed (the
            ``prometheus`` extra).
    """
    if isinstance(max_tenant_labels, bool) or not isinstance(max_tenant_labels, int):
        raise ConfigurationError(
            f"max_tenant_labels must be a positive integer, got {max_tenant_labels!r}"
        )
    if max_tenant_labels < 1:
        raise ConfigurationError(
            f"max_tenant_labels must be a positive integer, got {max_tenant_labels}"
        )
    prometheus = _prometheus()
    registry = prometheus.REGISTRY if registry is None else registry
    tenant_label = bool(tenant_label)
    with _install_lock:
        existing = _installed.get(id(app))
        if existing is not None and existing.app is app:
            if existing.same_options(registry, tenant_label, max_tenant_labels):
                return
            where = "the same" if existing.registry is registry else "another"
            raise ConfigurationError(
                f"metrics are already installed for app {app.main!r} (tenant_label="
                f"{existing.tenant_label}, max_tenant_labels={existing.max_tenant_labels}, "
                f"in {where} registry); call install_metrics once per app, or again "
                "with the same arguments"
            )
        try:
            installation = _Installation(app, registry, tenant_label, max_tenant_labels)
        except ValueError as exc:  # prometheus-client: duplicated timeseries
            raise ConfigurationError(
                f"cannot register the task metrics for app {app.main!r}: {exc}; pass "
                "install_metrics(..., registry=...) a registry without them"
            ) from exc
        _installed[id(app)] = installation
        _connect_receivers()


def _registry(app: Celery) -> CollectorRegistry | None:
    """The registry ``app``'s metrics were installed in, if they were."""
    installation = _installed.get(id(app))
    return installation.registry if installation and installation.app is app else None


def _installation(task: object) -> _Installation | None:
    app = getattr(task, "app", None)
    installation = _installed.get(id(app))
    if installation is None or installation.app is not app:
        return None
    return installation


def _tenant_of(task: Task[Any, Any], request: Context) -> str | None:
    """The tenant an execution runs in: its header's (validated, and verified when
    signing is on), else the context's.

    Tenant tasks enter their tenant after ``task_prerun``, so the header is
    read rather than the context.  An unverified header gets no label of its
    own: forged messages must not use up the tenant label budget."""
    try:
        tenant = message_tenant(task, request)
    except TenantCeleryError:
        return None
    return current_tenant() if tenant is None else tenant


def _execution_of(request: object) -> _Attempt | None:
    attempt = getattr(request, _ATTEMPT_ATTR, None)
    return attempt if isinstance(attempt, _Attempt) else None


def _on_prerun(task: Task[Any, Any] | None = None, **_: Any) -> None:
    installation = _installation(task)
    if installation is None or task is None:
        return
    request = task.request
    labels = installation.labels(task, request)
    installation.initialise(labels)
    installation.started.labels(*labels).inc()
    setattr(request, _ATTEMPT_ATTR, _Attempt(labels, time.perf_counter()))


def _ended(
    task: Task[Any, Any] | None,
) -> tuple[_Installation, _Attempt | None, tuple[str, ...]] | None:
    """The installation counting ``task``, its current execution and its labels;
    ``None`` when the task's app has no metrics installed."""
    installation = _installation(task)
    if installation is None or task is None:
        return None
    request = task.request
    attempt = _execution_of(request)
    # The main process reports some failures itself (a lost child, a hard time
    # limit): no execution of its own, so labels come from the request.
    if attempt is not None:
        return installation, attempt, attempt.labels
    labels = installation.labels(task, request)
    installation.initialise(labels)
    return installation, attempt, labels


def _on_success(sender: Task[Any, Any] | None = None, **_: Any) -> None:
    ended = _ended(sender)
    if ended is None:
        return
    installation, attempt, labels = ended
    installation.success.labels(*labels).inc()
    if attempt is not None:
        installation.duration.labels(*labels).observe(time.perf_counter() - attempt.started)


def _on_failure(sender: Task[Any, Any] | None = None, **_: Any) -> None:
    ended = _ended(sender)
    if ended is None:
        return
    installation, attempt, labels = ended
    if attempt is not None and attempt.rejected:
        return  # counted as rejected: its body never ran
    installation.failure.labels(*labels).inc()
    if attempt is not None:
        installation.duration.labels(*labels).observe(time.perf_counter() - attempt.started)


def _on_retry(sender: Task[Any, Any] | None = None, **_: Any) -> None:
    ended = _ended(sender)
    if ended is not None:
        installation, _execution, labels = ended
        installation.retry.labels(*labels).inc()


def _on_rejected(sender: Task[Any, Any] | None = None, **_: Any) -> None:
    ended = _ended(sender)
    if ended is None:
        return
    installation, attempt, labels = ended
    if attempt is not None:
        attempt.rejected = True
    installation.rejected.labels(*labels).inc()


def _connect_receivers() -> None:
    # One receiver per signal for every installation: connecting is idempotent.
    for signal, receiver, uid in (
        (task_prerun, _on_prerun, "prerun"),
        (task_success, _on_success, "success"),
        (task_failure, _on_failure, "failure"),
        (task_retry, _on_retry, "retry"),
        (tenant_rejected, _on_rejected, "rejected"),
        (worker_init, _on_worker_init, "worker_init"),
        (worker_ready, _on_worker_ready, "worker_ready"),
        (worker_process_shutdown, _on_child_exit, "child_exit"),
        (worker_shutdown, _on_worker_shutdown, "worker_shutdown"),
    ):
        signal.connect(receiver, weak=False, dispatch_uid=f"tenant_celery.metrics.{uid}")


# ------------------------------------------------------------------- multiprocess mode


class _Multiprocess:
    """This process's multiprocess state: set in a prefork worker's main process
    before the pool forks, inherited by every child."""

    def __init__(self) -> None:
        self.directory: str | None = None
        self.previous_env: str | None = None
        self.previous_class: Any = None
        self.value_class: Any = None  # the multiprocess value class this module made


_multiprocess = _Multiprocess()


def multiprocess_directory() -> str | None:
    """The directory this worker's processes count in, or ``None`` when they do not.

    Set in a prefork worker with metrics installed, from its start until it
    stops, in the main process and inherited by every child.
    """
    return _multiprocess.directory


def _forks_children(worker: Any) -> bool:
    from celery.concurrency import get_implementation  # noqa: PLC0415

    try:
        pool = get_implementation(worker.pool_cls)
        from celery.concurrency.prefork import TaskPool  # noqa: PLC0415
    except Exception:  # an unknown pool fails the worker itself, not here
        return False
    return isinstance(pool, type) and issubclass(pool, TaskPool)


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    installation = _installation(sender)
    if installation is None:
        return
    if _forks_children(sender):
        _enable_multiprocess()
    # Before the pool forks: under prefork, in the main process's own file.
    installation.initialise_registered()


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    # Tasks registered after worker_init (another receiver's imports).
    installation = _installation(sender)
    if installation is not None:
        installation.initialise_registered()


def _enable_multiprocess() -> None:
    """Count in files from now on, in a new directory; call before the pool forks."""
    if _multiprocess.directory is not None:
        return
    values = _prometheus().values
    _reap_stale_directories()
    path = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
    _multiprocess.previous_env = os.environ.get(_MULTIPROCESS_ENV)
    _multiprocess.previous_class = values.ValueClass
    # Children inherit the variable; each value object reads it when it opens
    # its process's file, which happens on first use after a fork.
    os.environ[_MULTIPROCESS_ENV] = path
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
        _multiprocess.value_class = values.ValueClass
    _multiprocess.directory = path
    # Series created so far (an eager task at import) count in memory, which the
    # monitor does not read: create them anew, in files.
    _forget_series()
    logger.debug("task metrics of this worker's processes are counted in %s", path)


def _on_child_exit(**_: Any) -> None:
    # Live-gauge files of a dead process must go; counters and histograms stay.
    directory = _multiprocess.directory
    if directory is not None:
        with contextlib.suppress(Exception):
            _prometheus().multiprocess.mark_process_dead(os.getpid(), directory)


def _on_worker_shutdown(**_: Any) -> None:
    path = _multiprocess.directory
    if path is None:
        return
    _multiprocess.directory = None
    if _multiprocess.previous_env is None:
        os.environ.pop(_MULTIPROCESS_ENV, None)
    else:
        os.environ[_MULTIPROCESS_ENV] = _multiprocess.previous_env
    _prometheus().values.ValueClass = _multiprocess.previous_class
    _forget_series()
    made, _multiprocess.value_class = _multiprocess.value_class, None
    if made is not None:
        _close_value_files(made)
    shutil.rmtree(path, ignore_errors=True)


def _close_value_files(value_class: Any) -> None:
    """Close the files a multiprocess value class of ours opened in this process.

    prometheus-client keeps them in a dict its value class's methods close over, and
    closes them only when the process id changes; left to the garbage collector they
    would each raise a ResourceWarning.
    """
    for function in vars(value_class).values():
        for cell in getattr(function, "__closure__", None) or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if (
                isinstance(contents, dict)
                and contents
                and all(callable(getattr(f, "close", None)) for f in contents.values())
            ):
                for file in contents.values():
                    with contextlib.suppress(Exception):
                        file.close()
                contents.clear()


def _forget_series() -> None:
    with _install_lock:
        installations = list(_installed.values())
    for installation in installations:
        installation.forget_series()


def _reap_stale_directories() -> None:
    """Remove the directories of workers that died without cleaning up."""
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            match = _STALE_DIR.match(entry.name)
            if match is None or not entry.is_dir(follow_symlinks=False):
                continue
            if not _alive(int(match.group(1))):
                shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
