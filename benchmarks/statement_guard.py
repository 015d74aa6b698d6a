"""Guard, what :func:`~tenant_celery.bind_tenant_guc` costs per statement and per checkout.

A bound engine compares each statement's transaction tenant with the current
tenant before the statement is sent (and looks for statements that could leave
a session-level setting); a pooled connection is reset at check-in only when
it may hold one.  Both engines below connect as the app role to the RLS-protected
items table, with one pooled connection each, in the same process:

``unbound``
    the baseline: ``set_tenant_guc`` called by hand at the start of each
    transaction, no listener at all;
``bound``
    ``bind_tenant_guc(engine)``, queried inside ``tenant_context``.

``no-op listener``
    the baseline plus a ``before_cursor_execute`` listener that does nothing:
    SQLAlchemy's own price for any statement listener;

(a) Client CPU per statement (``time.process_time``), a transaction of
    :data:`STATEMENTS` indexed ``SELECT``\\ s, the variants alternating round by
    round; and the check alone, called directly.
(b) Round trips to the server per checkout, counted by the driver (psycopg 3:
    each query, the ``BEGIN`` it implies, each ``COMMIT``/``ROLLBACK`` of an open
    transaction): a transaction of one query on each engine, the same outside
    any tenant, and a raw DBAPI checkout (which is reset at check-in).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.pq import TransactionStatus
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tenant_celery import bind_tenant_guc, set_tenant_guc, tenant_context
from tenant_celery._transaction_guard import _guards

from ._common import ITEMS_TABLE, BenchContext, Section, alternate, median, ratio
from ._scratch import seed_tenants

STATEMENTS = 50
"""Statements per measured transaction."""
QUERY = sa.text(f"SELECT id, payload FROM {ITEMS_TABLE} WHERE id = :id")


class _CountingCursor(psycopg.Cursor[Any]):
    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        connection = self.connection
        assert isinstance(connection, _CountingConnection)
        idle = connection.info.transaction_status == TransactionStatus.IDLE
        connection.trips += 1 + (1 if idle and not connection.autocommit else 0)
        return super().execute(query, params, **kwargs)


class _CountingConnection(psycopg.Connection[Any]):
    """A psycopg connection that counts what it sends to the server."""

    trips = 0

    def _ends(self) -> None:
        if self.info.transaction_status != TransactionStatus.IDLE:
            self.trips += 1

    def commit(self) -> None:
        self._ends()
        super().commit()

    def rollback(self) -> None:
        self._ends()
        super().rollback()


def _engines(ctx: BenchContext) -> tuple[Engine, Engine, Engine]:
    conninfo = ctx.app_url.set(drivername="postgresql").render_as_string(hide_password=False)

    def connect() -> _CountingConnection:
        return _CountingConnection.connect(conninfo, cursor_factory=_CountingCursor)

    unbound = ctx.engine(ctx.app_url, pool_size=1, max_overflow=0, creator=connect)
    listened = ctx.engine(ctx.app_url, pool_size=1, max_overflow=0, creator=connect)
    event.listen(listened, "before_cursor_execute", _nothing_done)
    bound = ctx.engine(ctx.app_url, pool_size=1, max_overflow=0, creator=connect)
    bind_tenant_guc(bound)
    return unbound, listened, bound


def _nothing_done(*args: Any) -> None:
    """A listener that does nothing: what SQLAlchemy's event dispatch alone costs."""


def _transaction(engine: Engine, tenant: str, bound: bool, statements: int) -> None:
    with tenant_context(tenant), engine.begin() as conn:
        if not bound:
            set_tenant_guc(conn)
        for n in range(statements):
            conn.execute(QUERY, {"id": n + 1}).all()


def _cpu_per_statement(
    ctx: BenchContext, engines: dict[str, Engine], tenant: str
) -> dict[str, Any]:
    rounds = ctx.pick(smoke=6, default=60)
    per_round = ctx.pick(smoke=5, default=40)
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    wall: dict[str, list[float]] = {name: [] for name in engines}
    for name, engine in engines.items():
        for _ in range(5):
            _transaction(engine, tenant, name == "bound", STATEMENTS)
    for n in range(rounds):
        for name in alternate(list(engines), n):
            started, clock = time.process_time(), time.perf_counter()
            for _ in range(per_round):
                _transaction(engines[name], tenant, name == "bound", STATEMENTS)
            # per statement: the transaction's set_config and COMMIT are spread over its queries
            count = per_round * STATEMENTS
            cpu[name].append((time.process_time() - started) / count * 1e6)
            wall[name].append((time.perf_counter() - clock) / count * 1e6)
    return {"rounds": rounds, "per_round": per_round, "cpu_us": cpu, "wall_us": wall}


def _check_alone(bound: Engine, tenant: str) -> float:
    """Nanoseconds per call of the bound engine's statement check, called directly."""
    guard = _guards[bound]
    calls = 200_000
    with tenant_context(tenant), bound.begin() as conn:
        statement = str(QUERY.compile(dialect=bound.dialect))
        check: Callable[..., None] = guard.check_statement
        started = time.perf_counter()
        for _ in range(calls):
            check(conn, None, statement, {}, None, False)
        return (time.perf_counter() - started) / calls * 1e9


def _trips(engine: Engine, action: Callable[[], None]) -> int:
    """Round trips ``action`` costs on ``engine``'s one pooled connection, check-in included."""
    with engine.connect() as conn:  # the same DBAPI connection serves the action
        dbapi = conn.connection.dbapi_connection
    assert isinstance(dbapi, _CountingConnection)
    before = dbapi.trips
    action()
    return dbapi.trips - before


def _round_trips(engines: dict[str, Engine], tenant: str) -> dict[str, dict[str, int]]:
    unbound, bound = engines["unbound"], engines["bound"]

    def one_query(engine: Engine, in_tenant: bool, by_hand: bool) -> Callable[[], None]:
        def run() -> None:
            with tenant_context(tenant) if in_tenant else _nothing(), engine.begin() as conn:
                if by_hand:
                    set_tenant_guc(conn, tenant)
                conn.execute(QUERY, {"id": 1}).all()

        return run

    def raw(engine: Engine) -> Callable[[], None]:
        def run() -> None:
            connection = engine.raw_connection()
            cursor = connection.cursor()
            cursor.execute(f"SELECT count(*) FROM {ITEMS_TABLE}")
            cursor.fetchall()
            cursor.close()
            connection.rollback()
            connection.close()

        return run

    cases = {
        "transaction in a tenant, one query": (
            one_query(unbound, True, True),
            one_query(bound, True, False),
        ),
        "transaction outside any tenant, one query": (
            one_query(unbound, False, False),
            one_query(bound, False, False),
        ),
        "raw DBAPI checkout, one query": (raw(unbound), raw(bound)),
    }
    found: dict[str, dict[str, int]] = {}
    for label, (baseline, guarded) in cases.items():
        _trips(unbound, baseline)  # warm
        _trips(bound, guarded)
        found[label] = {"unbound": _trips(unbound, baseline), "bound": _trips(bound, guarded)}
    return found


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def run(ctx: BenchContext) -> Section:
    """Measure both engines and return the section (key ``guard``)."""
    unbound, listened, bound = _engines(ctx)
    engines = {"unbound": unbound, "no-op listener": listened, "bound": bound}
    tenant = seed_tenants()[0]
    cpu = _cpu_per_statement(ctx, engines, tenant)
    alone_ns = _check_alone(bound, tenant)
    trips = _round_trips(engines, tenant)
    section = Section("guard", "bind_tenant_guc: per-statement check and check-in reset")
    cpu_median = {name: median(values) for name, values in cpu["cpu_us"].items()}
    wall_median = {name: median(values) for name, values in cpu["wall_us"].items()}
    section.tables.append(
        ctx.report(
            f"Per statement, {STATEMENTS} indexed SELECTs per transaction (medians of "
            f"{cpu['rounds']} rounds)",
            ["engine", "client CPU µs", "wall µs", "CPU ratio", "wall ratio"],
            [
                [
                    name,
                    round(cpu_median[name], 2),
                    round(wall_median[name], 2),
                    ratio(cpu_median[name], cpu_median["unbound"]),
                    ratio(wall_median[name], wall_median["unbound"]),
                ]
                for name in engines
            ],
            [
                "unbound: set_tenant_guc by hand in each transaction; no-op listener: the same "
                "with a before_cursor_execute listener that does nothing; bound: bind_tenant_guc",
                f"the check alone, called directly: {alone_ns:.0f} ns per statement",
            ],
        )
    )
    section.tables.append(
        ctx.report(
            "Round trips to the server per checkout, check-in included",
            ["case", "unbound", "bound", "extra"],
            [
                [label, c["unbound"], c["bound"], c["bound"] - c["unbound"]]
                for label, c in trips.items()
            ],
            [
                "counted by the driver: queries, the BEGIN each transaction implies, "
                "COMMIT/ROLLBACK of an open transaction",
                "outside a tenant the bound engine sets '' for the transaction; "
                "a raw checkout is reset when it returns to the pool",
            ],
        )
    )
    section.data = {"cpu": cpu, "check_alone_ns": round(alone_ns, 1), "round_trips": trips}
    return section
