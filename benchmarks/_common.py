"""What every benchmark module shares: the run's context, result tables and their rendering.

A benchmark module exposes one function::

    def run(ctx: BenchContext) -> Section: ...

The runner (``python -m benchmarks``) builds the :class:`BenchContext` once per
run -- a scratch database with an RLS-protected table, a non-superuser app
role, the bundled migration applied -- calls each selected benchmark, and
drops everything afterwards, also on failure or Ctrl-C.  A benchmark:

* reads :attr:`BenchContext.size` (``"smoke"`` or ``"default"``) and picks its
  counts with :meth:`BenchContext.pick`;
* may create its own tables in the scratch database through
  :meth:`BenchContext.admin_engine` (they are dropped with the database) and
  must grant the app role what it needs on them
  (:func:`tenant_celery.rls.grant_tenant_tables`);
* times against a baseline measured in the same run, and reports ratios;
* builds its tables with :meth:`BenchContext.report`, which prints each one as
  it is made, and returns a :class:`Section` holding them plus any raw numbers
  (``data``) worth keeping in the JSON.

Everything in a :class:`Section` must be JSON-serialisable (numbers, strings,
lists, dicts, ``None``).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

SIZES = ("smoke", "default")
"""Run sizes: ``smoke`` runs in seconds (CI), ``default`` meets the published minimum counts."""

ITEMS_TABLE = "bench_items"
"""The RLS-protected table the runner creates in the scratch database.

Columns: ``tenant_id uuid``, ``id bigint`` (identity), ``payload text``,
``created_at timestamptz``; primary key ``(tenant_id, id)``, its only index;
seeded with 50 tenants whose rows interleave;
policy written by :func:`tenant_celery.rls.enable_tenant_rls` (forced, so the
owner is filtered too); the app role has SELECT, INSERT, UPDATE, DELETE.
"""

Cell = float | int | str | None


@dataclass
class Table:
    """One printed table: a title, column names, rows of cells and notes under it."""

    title: str
    columns: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
        }

    def render_text(self) -> str:
        """The table as aligned plain text, for the terminal."""
        cells = [self.columns] + [[format_cell(c) for c in row] for row in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = [self.title, "-" * len(self.title)] if self.title else []
        for n, row in enumerate(cells):
            lines.append(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                ).rstrip()
            )
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)

    def render_markdown(self) -> str:
        """The table as a Markdown (GFM) table under a bold title, notes as a list.

        Columns whose cells are all numbers are right-aligned.
        """
        lines = [f"**{self.title}**", ""] if self.title else []
        numeric = [
            i > 0 and all(isinstance(row[i], int | float | None) for row in self.rows)
            for i in range(len(self.columns))
        ]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("| " + " | ".join("---:" if n else "---" for n in numeric) + " |")
        lines.extend(
            "| " + " | ".join(format_cell(c).replace("|", "\\|") for c in row) + " |"
            for row in self.rows
        )
        if self.notes:
            lines.append("")
            lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class Section:
    """What one benchmark returns: its tables and any raw numbers for the JSON."""

    key: str
    """Short name used by ``--only`` and as the JSON key: ``p1``, ``p2``, ..."""
    title: str
    tables: list[Table] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    """Raw measurements (every run, not only medians); JSON-serialisable."""
    duration_s: float | None = None
    """Set by the runner."""

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "tables": [t.to_json() for t in self.tables],
            "data": self.data,
            "duration_s": self.duration_s,
        }


@dataclass
class BenchContext:
    """Everything a benchmark may use, built once per run by the runner.

    The scratch database holds :data:`ITEMS_TABLE` (RLS on, forced) and the
    bundled migration's Celery tables; :attr:`app_role` may use both.  Engines
    returned by :meth:`admin_engine` and :meth:`app_engine` are disposed by the
    runner before the database is dropped.
    """

    size: str
    """``"smoke"`` or ``"default"``."""
    server_url: URL
    """Superuser URL of the server's maintenance database (``postgresql+psycopg``)."""
    admin_url: URL
    """Superuser URL of the scratch database: DDL and seeding (bypasses RLS)."""
    app_url: URL
    """URL of the scratch database as :attr:`app_role`: not a superuser, no BYPASSRLS,
    owns nothing, so row-level security applies to it."""
    app_role: str
    plain_url: URL
    """URL of the scratch database as a ``BYPASSRLS`` role (not a superuser, owns
    nothing): a host without tenancy, which row-level security does not filter."""
    redis_url: str
    """Redis base URL (no database number): use :meth:`redis_db` for an isolated one."""
    amqp_url: str
    run_id: str
    """Short unique id of this run: use it in queue names, keys, file names."""
    workdir: Path
    """A scratch directory for worker logs and files, deleted after the run unless kept."""
    out: TextIO = field(default=sys.stdout, repr=False)
    _engines: list[Engine] = field(default_factory=list, repr=False)

    # -- sizes

    def pick(self, *, smoke: int, default: int) -> int:
        """The count for this run's size."""
        return smoke if self.size == "smoke" else default

    # -- databases

    def engine(self, url: URL, **kwargs: Any) -> Engine:
        """A new engine on ``url``; disposed by the runner at the end of the run."""
        engine = sa.create_engine(url, **kwargs)
        self._engines.append(engine)
        return engine

    def admin_engine(self, **kwargs: Any) -> Engine:
        """A superuser engine on the scratch database."""
        return self.engine(self.admin_url, **kwargs)

    def app_engine(self, **kwargs: Any) -> Engine:
        """An engine on the scratch database as the app role (RLS applies)."""
        return self.engine(self.app_url, **kwargs)

    def dispose(self) -> None:
        for engine in self._engines:
            engine.dispose()
        self._engines.clear()

    def redis_db(self, number: int) -> str:
        """The Redis URL with database ``number`` (the runner uses 11 to 14)."""
        return f"{self.redis_url.rstrip('/')}/{number}"

    # -- output

    def say(self, message: str) -> None:
        """One progress line on the runner's output."""
        print(message, file=self.out, flush=True)

    def report(
        self,
        title: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Cell]],
        notes: Sequence[str] = (),
    ) -> Table:
        """Build a :class:`Table`, print it now, and return it for the :class:`Section`."""
        table = Table(title, list(columns), [list(r) for r in rows], list(notes))
        print("\n" + table.render_text() + "\n", file=self.out, flush=True)
        return table


# ------------------------------------------------------------------------ numbers


def format_cell(value: Cell) -> str:
    """Numbers with sensible precision; ``None`` as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    return value


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (``nan`` when empty)."""
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (0.95: the 95th percentile), the nearest
    rank on the sorted values (``nan`` when empty)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ratio(value: float, baseline: float) -> float:
    """``value / baseline``, rounded to 3 places (``nan`` when the baseline is 0)."""
    if not baseline or math.isnan(baseline) or math.isnan(value):
        return math.nan
    return round(value / baseline, 3)


def alternate(names: Sequence[str], round_number: int) -> list[str]:
    """The order to run ``names`` in, in round ``round_number``: reversed every other
    round (A B, B A, A B, ...), so neither variant always follows the other."""
    return list(names) if round_number % 2 == 0 else list(reversed(names))


def paired_ratio(values: Sequence[float], baselines: Sequence[float]) -> float:
    """The median of ``values[i] / baselines[i]``: runs taken back to back share the
    machine's state, so their ratios are steadier than a ratio of medians."""
    return ratio(median([v / b for v, b in zip(values, baselines, strict=True) if b]), 1.0)


def pair_spread(values: Sequence[float], baselines: Sequence[float]) -> str:
    """The lowest and highest ratio of the back-to-back pairs, as ``"a to b"``."""
    pairs = [v / b for v, b in zip(values, baselines, strict=True) if b]
    return f"{min(pairs):.3f} to {max(pairs):.3f}" if pairs else "—"


def rate(count: int, seconds: float) -> float:
    """Operations per second, rounded to 1 place."""
    return round(count / seconds, 1) if seconds > 0 else math.nan


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """``with stopwatch() as elapsed:`` ... ``elapsed()`` gives seconds so far (monotonic)."""
    start = time.perf_counter()
    end: list[float] = []
    try:
        yield lambda: (end[0] if end else time.perf_counter()) - start
    finally:
        end.append(time.perf_counter())
