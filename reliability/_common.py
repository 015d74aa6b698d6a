"""What every part of the reliability suite shares: the run's context, its sections and tallies.

A part is a module exposing one function::

    def run(ctx: ReliabilityContext) -> Section: ...

The parts and their modules:

======== ============================ ==============================================
key      module                       proves
======== ============================ ==============================================
load     :mod:`reliability.load`      no tenant sees another's rows under load; no
                                      write and no task is lost
leaks    :mod:`reliability.leaks`     after the load, every pooled connection of the
                                      workers reads the tenant setting as empty
faults   :mod:`reliability.faults`    killed connections, killed workers, a restarted
                                      Redis, an absent database: every task survives
hostile  :mod:`reliability.hostile`   hostile tenant ids and headers are refused;
                                      Celery's replay routes run nothing where
                                      they may not (:mod:`reliability.routes`)
======== ============================ ==============================================

The runner (``python -m reliability``, :mod:`reliability.runner`) builds one
:class:`ReliabilityContext` per run -- a scratch database with the bundled
migration's Celery tables, a non-superuser app role without ``CREATE`` that
row-level security applies to, a ``BYPASSRLS`` role -- calls each selected
part in the order above, and drops everything afterwards, also on failure or
Ctrl-C.  A part module that is not in the checkout is reported as not run,
and the run exits non-zero.

The context (a :class:`benchmarks._common.BenchContext`, so the benchmark
suite's helpers take it as it is) gives a part:

* :attr:`~ReliabilityContext.size` (``smoke``, ``default`` or ``full``) and
  :meth:`~ReliabilityContext.pick` to choose counts from it;
* :attr:`~ReliabilityContext.admin_dsn` (the superuser DSN the run was given,
  libpq form), :attr:`~benchmarks._common.BenchContext.server_url`,
  :attr:`~benchmarks._common.BenchContext.admin_url` (superuser, the scratch
  database: DDL, checks that must see every tenant),
  :attr:`~benchmarks._common.BenchContext.app_url` and ``app_role`` (the app
  role: RLS applies, no ``CREATE``), ``plain_url`` (``BYPASSRLS``), and
  :meth:`~benchmarks._common.BenchContext.admin_engine` /
  :meth:`~benchmarks._common.BenchContext.app_engine`, disposed by the runner;
* ``redis_url`` (no database number; :meth:`~benchmarks._common.BenchContext.redis_db`
  gives one; the load part uses 10, the replay routes 11, the faults 15, the
  benchmark suite 12 and 13) and ``amqp_url``;
* ``run_id`` (short, unique: use it in queue, key and file names) and
  ``workdir`` (scratch directory for logs, kept when a part fails);
* :meth:`~benchmarks._common.BenchContext.say` for a progress line and
  :meth:`~benchmarks._common.BenchContext.report` to build, print and return a
  :class:`~benchmarks._common.Table`;
* :attr:`~ReliabilityContext.parts`, the keys of the parts this run runs;
* :attr:`~ReliabilityContext.shared` and :meth:`~ReliabilityContext.on_close`:
  what one part leaves for a later one (the load part's running workers, for
  the leak proof) and how it is cleaned up at the end of the run.

Real ``celery worker`` processes are started with
:func:`benchmarks._workers.start_worker` (or ``running``), which takes the
context as it is; ``app_module=`` names the worker's Celery app module,
``client=`` builds the runner's copy of it, ``environ=`` adds environment variables and
``options=`` adds command-line options.

A part returns a :class:`Section`: its tables, a JSON-able ``data`` dict, a
:class:`Tally` of what it did and what it found, and ``violations``, one
sentence per broken promise.  Name pools with :func:`pool_name` and brokers
with :func:`broker_name`, so the summary counts each once.  The runner adds
the violations the tally itself shows (:meth:`Tally.violations`: a
cross-tenant observation, a lost write, a task unaccounted for, a fault not
survived, a hostile case not refused, a leaked setting), sums the tallies
into the summary table, and exits 1 when any section has a violation.  A part
must also flag a proof that proved nothing (no task ran, no connection was
checked) as a violation: a zero is only a result when something was counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from benchmarks._common import BenchContext, Cell, Table
from benchmarks._common import Section as BenchSection

__all__ = [
    "BROKERS",
    "SIZES",
    "Cell",
    "ReliabilityContext",
    "Section",
    "Table",
    "Tally",
    "broker_name",
    "pool_name",
]

SIZES = ("smoke", "default", "full")
"""``smoke``: seconds, to prove the suite works; ``default``: the published
minimum (>= 20 tenants, >= 20,000 tasks); ``full``: about 100,000 tasks."""


BROKERS = {
    "redis": "Redis",
    "rabbitmq": "RabbitMQ",
    "amqp": "RabbitMQ",
    "postgres": "PostgreSQL (kombu SQLAlchemy)",
    "postgresql": "PostgreSQL (kombu SQLAlchemy)",
    "sqla": "PostgreSQL (kombu SQLAlchemy)",
    "tcpg": "PostgreSQL (tenant-celery transport)",
}
"""How the summary names each broker, by short name or URL scheme."""


def broker_name(broker: str) -> str:
    """The summary's name of ``broker`` (a short name, a URL scheme or a URL).

    ``redis``, ``redis://...``, ``Redis`` all give ``Redis``; unknown names are kept.
    """
    key = broker.split(":", 1)[0].split("+", 1)[0].strip().lower()
    return BROKERS.get(key, broker)


def pool_name(pool: str, concurrency: int = 1) -> str:
    """The summary's name of a worker pool: ``prefork 2``, ``threads 4``, ``solo``."""
    return "solo" if pool == "solo" else f"{pool} {concurrency}"


@dataclass
class ReliabilityContext(BenchContext):
    """Everything a part may use, built once per run by the runner (see the module docstring)."""

    admin_dsn: str = ""
    """The superuser DSN the run was given (``postgresql://...``, libpq form)."""
    parts: tuple[str, ...] = ()
    """The keys of the parts this run runs, in order."""
    shared: dict[str, Any] = field(default_factory=dict, repr=False)
    """What a part leaves for later parts, keyed ``"<part>.<name>"``."""
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def pick(self, *, smoke: int, default: int, full: int | None = None) -> int:  # type: ignore[override]
        """The count for this run's size (``full`` defaults to ``default``)."""
        if self.size == "smoke":
            return smoke
        if self.size == "full":
            return default if full is None else full
        return default

    def on_close(self, close: Callable[[], None]) -> None:
        """Call ``close`` when the run ends (last registered, first called), before the drop."""
        self._closers.append(close)

    def close(self) -> None:
        """Run the registered closers, then dispose of the engines (the runner calls this)."""
        try:
            while self._closers:
                closer = self._closers.pop()
                try:
                    closer()
                except Exception as exc:  # one failed cleanup must not skip the others
                    self.say(f"cleanup failed: {type(exc).__name__}: {exc}")
        finally:
            self.dispose()


@dataclass
class Tally:
    """What a part did and what it found, summed across parts into the summary table.

    Every field defaults to zero (or empty): a part fills in the ones it has.
    ``tenants`` is the largest count any part used (they are not added up);
    ``pools`` and ``brokers`` are joined; everything else is added up.
    """

    tasks_run: int = 0
    """Task executions recorded (a retried task counts once per run of its body)."""
    tenants: int = 0
    pools: list[str] = field(default_factory=list)
    """Worker pools exercised, named by :func:`pool_name`: ``["prefork 2", "solo"]``."""
    brokers: list[str] = field(default_factory=list)
    """Brokers exercised, named by :func:`broker_name` (the summary applies it too)."""
    cross_tenant_observations: int = 0
    """Observations of any tenant other than the one a task was published for. Must be 0."""
    lost_writes: int = 0
    """Rows a task committed that are not there (or not under its tenant). Must be 0."""
    tasks_unaccounted: int = 0
    """Task runs expected (published, or published by tasks) and never recorded. Must be 0."""
    faults_injected: int = 0
    faults_survived: int = 0
    """Must equal ``faults_injected``."""
    hostile_tried: int = 0
    hostile_refused: int = 0
    """Must equal ``hostile_tried``: refused with a clear error, nothing written, nothing seen."""
    connections_checked: int = 0
    """Pooled connections whose tenant setting was read between transactions."""
    leaked_settings: int = 0
    """Of those, connections whose setting was not empty. Must be 0."""

    def violations(self) -> list[str]:
        """The broken promises these figures show, one sentence each (empty: none)."""
        found = []
        if self.cross_tenant_observations:
            found.append(f"{self.cross_tenant_observations:,} cross-tenant observations")
        if self.lost_writes:
            found.append(f"{self.lost_writes:,} lost writes")
        if self.tasks_unaccounted:
            found.append(f"{self.tasks_unaccounted:,} tasks unaccounted for")
        if self.faults_survived < self.faults_injected:
            found.append(
                f"{self.faults_injected - self.faults_survived:,} of "
                f"{self.faults_injected:,} faults not survived"
            )
        if self.hostile_refused < self.hostile_tried:
            found.append(
                f"{self.hostile_tried - self.hostile_refused:,} of "
                f"{self.hostile_tried:,} hostile cases not refused"
            )
        if self.leaked_settings:
            found.append(f"{self.leaked_settings:,} pooled connections kept a tenant setting")
        return found

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    @classmethod
    def total(cls, tallies: Iterable[Tally]) -> Tally:
        """The tallies of several parts as one (see the class docstring for how)."""
        result = cls()
        for tally in tallies:
            for f in fields(cls):
                mine, theirs = getattr(result, f.name), getattr(tally, f.name)
                if f.name == "tenants":
                    setattr(result, f.name, max(mine, theirs))
                elif f.name == "brokers":
                    names = [broker_name(x) for x in theirs]
                    setattr(result, f.name, mine + [x for x in names if x not in mine])
                elif isinstance(mine, list):
                    setattr(result, f.name, mine + [x for x in theirs if x not in mine])
                else:
                    setattr(result, f.name, mine + theirs)
        return result


@dataclass
class Section(BenchSection):
    """What one part returns: the benchmark suite's section, plus a tally and violations.

    ``key`` is the part's key (``load``, ``leaks``, ``faults``, ``hostile``);
    ``tables`` are printed and written to the Markdown; ``data`` is written to
    the JSON as it is (JSON-serialisable values only).
    """

    tally: Tally = field(default_factory=Tally)
    violations: list[str] = field(default_factory=list)
    """What this part found broken beyond what its tally shows, one sentence each."""

    def require(self, condition: bool, violation: str) -> bool:
        """Record ``violation`` unless ``condition`` holds; return ``condition``."""
        if not condition:
            self.violations.append(violation)
        return condition

    def all_violations(self) -> list[str]:
        """The part's own violations, then those its tally shows."""
        return [*self.violations, *(v for v in self.tally.violations() if v not in self.violations)]

    @property
    def passed(self) -> bool:
        return not self.all_violations()

    def to_json(self) -> dict[str, Any]:
        return {
            **super().to_json(),
            "tally": self.tally.to_json(),
            "violations": self.all_violations(),
            "passed": self.passed,
        }
