"""Where P1's in-process difference goes: each part of a tenant task's cost, measured apart.

P1 times a tenant task against a plain one whole.  This takes the difference
apart, each part as the difference between two variants that differ in that
part only, timed in alternating rounds in this process:

* **the task**: ``apply()`` of a tenant task with no body inside
  :func:`~tenant_celery.tenant_context`, against a plain task with no body
  (CPU time of this thread);
* **the guard's listeners**: the P1 body on an engine the binding's guard is
  installed on (bound, then unbound: the guard stays, no hook runs), against
  the same engine without any listener.  The guard listens at the dialect's
  execution points and on the pool (CPU time);
* **the binding's hook**: the body on an engine bound with
  :func:`~tenant_celery.bind_tenant_guc`, inside a tenant, against the guarded
  engine: reading the tenant, the transaction's record, and ``BEGIN`` sent with
  the setting (CPU time);
* for reference, not a part: **one SQLAlchemy connection event**, a listener
  that does nothing, against none.  Any connection event on an engine switches
  on every event point of every statement, begin and commit; that is why the
  binding uses none (CPU time);
* **``SET LOCAL`` on the server**: a raw psycopg transaction (``BEGIN``, the
  body's two statements, ``COMMIT``) with ``SET LOCAL`` in ``BEGIN``'s message,
  against the same without it (wall time, so the server's work is in it);
* **the policy**: that raw transaction as the app role on the items table,
  the tenant set for the session beforehand, against the same on a copy of
  the table without row-level security (wall time).  Both wall-time parts
  run on one connection, so on one server process.

CPU parts are in the thread's CPU time, which the machine's other work does
not inflate; wall parts take the median of many alternating rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import sessionmaker

from tenant_celery import bind_tenant_guc, tenant_context
from tenant_celery.config import DEFAULT_GUC

from . import bench_app
from ._common import ITEMS_TABLE, BenchContext, Cell, Table, median
from ._scratch import connect, seed_tenants

Clock = Callable[[], float]

# P1's two statements (bench_app.SELECT_LAST, INSERT_ITEM) in psycopg's own style.
_RAW_SELECT = "SELECT id, payload FROM {table} WHERE tenant_id = %s::uuid ORDER BY id DESC LIMIT 1"
_RAW_INSERT = "INSERT INTO {table} (tenant_id, payload) VALUES (%s::uuid, %s)"
_COPY = f"{ITEMS_TABLE}_no_policy"
"""A copy of the items table, rows, index and grants alike, without row-level security."""


_REWARM = 6
"""Untimed calls of each variant before each round, on its new connections."""


def _copy_without_policy(ctx: BenchContext) -> None:
    with ctx.admin_engine().begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {_COPY}"))
        conn.execute(text(f"CREATE TABLE {_COPY} (LIKE {ITEMS_TABLE} INCLUDING ALL)"))
        conn.execute(
            text(f"INSERT INTO {_COPY} OVERRIDING SYSTEM VALUE SELECT * FROM {ITEMS_TABLE}")
        )
        conn.execute(
            text(f"SELECT setval(pg_get_serial_sequence('{_COPY}', 'id'), max(id)) FROM {_COPY}")
        )
        conn.execute(text(f"ANALYZE {_COPY}"))
        conn.execute(text(f'GRANT SELECT, INSERT ON {_COPY} TO "{ctx.app_role}"'))


def _noop_statement(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    return statement, parameters


class _Part:
    """One part: two variants, called in turns, each call timed.

    The two variants take turns call by call (AB BA AB ...), so a slow spell of
    the machine falls on both; a part's cost is the median over every pair of
    adjacent calls of (with - without).
    """

    def __init__(
        self,
        name: str,
        measured_as: str,
        clock: Clock,
        with_part: Callable[[], object],
        without: Callable[[], object],
    ) -> None:
        self.name, self.measured_as, self.clock = name, measured_as, clock
        self.with_part, self.without = with_part, without
        self.differences: list[float] = []
        self.round_medians: list[float] = []

    def round(self, number: int, calls: int) -> None:
        clock, found = self.clock, []
        for i in range(calls):
            first, second = (
                (self.with_part, self.without)
                if (number + i) % 2 == 0
                else (self.without, self.with_part)
            )
            started = clock()
            first()
            middle = clock()
            second()
            ended = clock()
            a, b = middle - started, ended - middle
            found.append(a - b if first is self.with_part else b - a)
        self.differences.extend(found)
        self.round_medians.append(median(found))

    def warm(self, calls: int) -> None:
        """Call both variants ``calls`` times each, untimed."""
        for _ in range(calls):
            self.with_part()
            self.without()

    def cost_us(self) -> float:
        """Median over every pair of adjacent calls of (with - without), in microseconds."""
        return round(median(self.differences) * 1e6, 1)

    def spread_us(self) -> str:
        """The lowest and highest round's median difference."""
        return f"{min(self.round_medians) * 1e6:.1f} to {max(self.round_medians) * 1e6:.1f}"


@contextmanager
def _engines(ctx: BenchContext, tenant: str) -> Iterator[dict[str, Engine]]:
    def make(url: URL) -> Engine:
        return create_engine(url, pool_size=1, max_overflow=0)

    made = {
        "plain": make(ctx.plain_url),
        "listened": make(ctx.plain_url),
        "guarded": make(ctx.plain_url),
        "bound": make(ctx.plain_url),
    }
    event.listen(made["listened"], "before_cursor_execute", _noop_statement, retval=True)
    bind_tenant_guc(made["guarded"])()  # unbound at once: the guard stays
    bind_tenant_guc(made["bound"])
    try:
        yield made
    finally:
        for engine in made.values():
            engine.dispose()


def measure(ctx: BenchContext) -> Table:
    """Measure each part; the table the P1 section adds."""
    rounds, calls = ctx.pick(smoke=2, default=20), ctx.pick(smoke=10, default=150)
    tenant = seed_tenants()[0]
    app = bench_app.make_app("memory://", None, f"tcbench.{ctx.run_id}.parts")

    @app.task(name="bench.plain_noop", shared=False)
    def plain_noop() -> dict[str, Any]:
        return {"done": time.time()}

    tenant_noop = app.tasks[bench_app.TENANT_NOOP]

    def tenant_apply() -> None:
        with tenant_context(tenant):
            tenant_noop.apply(throw=True)

    _copy_without_policy(ctx)
    # One connection for both wall-time parts, so both variants of each run on the
    # same server process (a process keeps its CPU placement for life).
    raw = connect(ctx.app_url, autocommit=False)
    raw.execute("SELECT set_config(%s, %s, false)", (DEFAULT_GUC, tenant))
    raw.commit()

    def raw_body(table: str, set_local: bool) -> Callable[[], None]:
        begin = f"BEGIN; SET LOCAL {DEFAULT_GUC} = '{tenant}'" if set_local else "BEGIN"
        select, insert = (q.format(table=table) for q in (_RAW_SELECT, _RAW_INSERT))

        def body() -> None:
            raw.pgconn.exec_(begin.encode())  # the tenant: a canonical UUID
            raw.execute(select, (tenant,)).fetchone()
            raw.execute(insert, (tenant, "benchmark"))
            raw.commit()

        return body

    try:
        with _engines(ctx, tenant) as engines:
            sessions = {name: sessionmaker(engine) for name, engine in engines.items()}

            def body(name: str) -> Callable[[], None]:
                return lambda: bench_app.p1_body(sessions[name], tenant)

            def in_tenant(call: Callable[[], None]) -> Callable[[], None]:
                def inside() -> None:
                    with tenant_context(tenant):
                        call()

                return inside

            parts = [
                _Part(
                    "the task (tenant context, header, checks)",
                    "CPU µs per apply()",
                    time.thread_time,
                    tenant_apply,
                    lambda: plain_noop.apply(throw=True),
                ),
                _Part(
                    "the guard's listeners (dialect execution points, pool)",
                    "CPU µs per transaction",
                    time.thread_time,
                    in_tenant(body("guarded")),
                    in_tenant(body("plain")),
                ),
                _Part(
                    "the binding's hook (tenant, record, BEGIN with the setting)",
                    "CPU µs per transaction",
                    time.thread_time,
                    in_tenant(body("bound")),
                    in_tenant(body("guarded")),
                ),
                _Part(
                    "SET LOCAL in BEGIN's message, on the server",
                    "wall µs per transaction",
                    time.perf_counter,
                    raw_body(_COPY, set_local=True),
                    raw_body(_COPY, set_local=False),
                ),
                _Part(
                    "the policy (row-level security on both statements)",
                    "wall µs per transaction",
                    time.perf_counter,
                    raw_body(ITEMS_TABLE, set_local=False),
                    raw_body(_COPY, set_local=False),
                ),
            ]
            reference = _Part(
                "for reference: one SQLAlchemy connection event (the binding uses none)",
                "CPU µs per transaction",
                time.thread_time,
                body("listened"),
                body("plain"),
            )
            for number in range(rounds):
                # New connections, so new server processes, every round: a server
                # process keeps the CPU placement it started with, which makes one
                # engine's round trips cheaper or dearer than another's for as long as
                # it lives; the engine parts compare engines, each on its own connection.
                for engine in engines.values():
                    engine.dispose()
                for part in (*parts, reference):
                    part.warm(_REWARM)  # past psycopg's prepare threshold, caches warm
                    part.round(number, calls)
    finally:
        raw.close()
        app.close()
    ctx.say(f"p1 parts: {rounds} rounds of {calls} calls per variant done")
    rows: list[list[Cell]] = [[p.name, p.measured_as, p.cost_us(), p.spread_us()] for p in parts]
    total = round(sum(p.cost_us() for p in parts), 1)
    rows.append(["sum of the parts", "µs per task", total, None])
    rows.append([reference.name, reference.measured_as, reference.cost_us(), reference.spread_us()])
    return ctx.report(
        "P1 parts: where a tenant task's extra time goes, in process",
        ["part", "measured as", "µs", "rounds ranged"],
        rows,
        [
            "each part is the median, over every pair of adjacent calls, of (the call with the "
            "part minus the call without it), the two taking turns call by call; "
            f"{rounds} rounds of {calls} pairs, each engine on a new connection every round "
            f"(after {_REWARM} untimed calls per variant); rounds ranged: the lowest and "
            "highest round's median; the body is P1's (one indexed "
            "SELECT, one INSERT, in one transaction through a Session)",
            "CPU µs: this thread's CPU time (time.thread_time), which waiting on the network "
            "and the machine's other work do not count; wall µs: time.perf_counter",
            "the guard's listeners: an engine bound and unbound again, so that the guard "
            "(dialect do_execute points, pool checkout and reset) stays without a hook; "
            "the binding's hook: the bound engine against that one",
            "for reference: one connection event listener that does nothing, on the plain "
            "engine, not counted in the sum; once an engine has any connection event, "
            "SQLAlchemy dispatches at every statement, begin and commit, whatever the "
            "listener does, which is why the binding listens elsewhere",
            "SET LOCAL and the policy: raw psycopg transactions on one connection as the app "
            "role, the tenant set for the session beforehand; the policy: the items table "
            "against a copy of it without row-level security",
        ],
    )
