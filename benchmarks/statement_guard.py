"""Guard, what :func:`~tenant_celery.bind_tenant_guc` costs per statement and per checkout.

A bound engine compares each statement's transaction tenant with the current
tenant before the statement is sent (and looks for statements that could leave
a session-level setting), and sends the transaction's ``set_config`` in a round
trip the transaction makes anyway (on psycopg 3, in one message with its
``BEGIN``); a pooled connection is reset at check-in only when it may hold a
session-level setting.  The engines below connect with psycopg 3 as the app
role to the RLS-protected items table, with one pooled connection each, in the
same process:

``unbound``
    the baseline: ``set_tenant_guc`` called by hand at the start of each
    transaction, no listener at all;
``no-op listener``
    for reference, the baseline plus a ``before_cursor_execute`` listener that
    does nothing: SQLAlchemy's own price for any connection event, which the
    binding does not pay (it listens at the dialect's execution points);
``bound``
    ``bind_tenant_guc(engine)``, queried inside ``tenant_context``.

(a) Client CPU per statement (``time.process_time``), a transaction of
    :data:`STATEMENTS` indexed ``SELECT``\\ s, the variants alternating round by
    round; and the check alone, called directly.  These engines connect to the
    server directly.
(b) Round trips to the server per checkout, check-in included, counted on the
    wire: a second pair of engines (unbound and bound) connects through
    :class:`~tests._rig.pg_wire.PgWire`, a proxy that parses the PostgreSQL
    protocol, and a round trip is a ``ReadyForQuery`` the server sends (one per
    simple query, one per extended-protocol ``Sync``), whatever the driver sends
    it through (the bound engine's ``BEGIN; SELECT set_config(...)`` goes through
    psycopg's ``pgconn``, unseen by its cursors).  The cases: a transaction of
    one query in a tenant (on the unbound engine both without a setting and with
    ``set_tenant_guc`` by hand), the same outside any tenant, and a raw DBAPI
    checkout (which the bound engine resets at check-in).  The proxy is kept out
    of (a): it adds latency to every round trip.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine

from tenant_celery import bind_tenant_guc, set_tenant_guc, tenant_context
from tenant_celery._transaction_guard import _guards

from ._common import ITEMS_TABLE, BenchContext, Section, alternate, median, ratio
from ._scratch import seed_tenants

if TYPE_CHECKING:
    from tests._rig.pg_wire import PgWire

STATEMENTS = 50
"""Statements per measured transaction."""
QUERY = sa.text(f"SELECT id, payload FROM {ITEMS_TABLE} WHERE id = :id")
TRIP_REPEATS = 3
"""Checkouts counted per case and engine; the count is per checkout."""
TRIP_WARM = 8
"""Checkouts run before counting: psycopg 3 prepares a statement on the server at its
sixth execution (``prepare_threshold``, 5 by default), which costs one round trip
once; counted before it, that one-off shows up as a fraction."""

IN_TENANT = "transaction in a tenant, one query"
OUTSIDE = "transaction outside any tenant, one query"
RAW = "raw DBAPI checkout, one query"
PLAIN, BY_HAND, BOUND = "plain", "by hand", "bound"
"""Round-trip variants: the unbound engine without any setting, the unbound engine with
``set_tenant_guc`` by hand (in a tenant only), the bound engine."""


def _url(ctx: BenchContext) -> URL:
    """The app role's URL with psycopg 3, whatever the rig's driver."""
    return ctx.app_url.set(drivername="postgresql+psycopg")


def _engines(ctx: BenchContext, url: URL) -> tuple[Engine, Engine, Engine]:
    """(unbound, no-op listener, bound) on ``url``, one pooled connection each."""
    unbound = ctx.engine(url, pool_size=1, max_overflow=0)
    listened = ctx.engine(url, pool_size=1, max_overflow=0)
    event.listen(listened, "before_cursor_execute", _nothing_done)
    bound = ctx.engine(url, pool_size=1, max_overflow=0)
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
        check: Callable[..., object] = guard.check_statement
        started = time.perf_counter()
        for _ in range(calls):
            check(conn, None, statement, None, False)
        return (time.perf_counter() - started) / calls * 1e9


@contextmanager
def _wire(ctx: BenchContext) -> Iterator[tuple[PgWire, Engine, Engine]]:
    """A PgWire proxy to the server, and (unbound, bound) engines connecting through it."""
    from tests._rig.pg_wire import PgWire  # noqa: PLC0415 (the benchmarks run from a checkout)

    with PgWire.to(ctx.app_url) as wire:
        url = wire.url(_url(ctx))
        unbound = ctx.engine(url, pool_size=1, max_overflow=0)
        bound = ctx.engine(url, pool_size=1, max_overflow=0)
        bind_tenant_guc(bound)
        try:
            yield wire, unbound, bound
        finally:  # close their connections while the proxy still runs
            unbound.dispose()
            bound.dispose()


def _trips(wire: PgWire, action: Callable[[], None]) -> float | int:
    """``ReadyForQuery`` messages per ``action`` (one checkout, check-in included)."""
    for _ in range(TRIP_WARM):  # connect, the dialect's first queries, psycopg's prepare
        action()
    mark = wire.mark()
    for _ in range(TRIP_REPEATS):
        action()
    per_checkout = wire.round_trips(mark) / TRIP_REPEATS
    return int(per_checkout) if per_checkout.is_integer() else per_checkout


def _round_trips(ctx: BenchContext, tenant: str) -> dict[str, dict[str, float | int]]:
    def one_query(engine: Engine, in_tenant: bool, by_hand: bool) -> Callable[[], None]:
        def run() -> None:
            with tenant_context(tenant) if in_tenant else nullcontext(), engine.begin() as conn:
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

    with _wire(ctx) as (wire, unbound, bound):
        cases: dict[str, dict[str, Callable[[], None]]] = {
            IN_TENANT: {
                PLAIN: one_query(unbound, True, False),
                BY_HAND: one_query(unbound, True, True),
                BOUND: one_query(bound, True, False),
            },
            OUTSIDE: {
                PLAIN: one_query(unbound, False, False),
                BOUND: one_query(bound, False, False),
            },
            RAW: {PLAIN: raw(unbound), BOUND: raw(bound)},
        }
        return {
            label: {variant: _trips(wire, action) for variant, action in actions.items()}
            for label, actions in cases.items()
        }


def _expectations(trips: dict[str, dict[str, float | int]]) -> dict[str, bool]:
    """What the counts must show now that the setting rides with ``BEGIN``, and whether they do."""
    tenant, outside, raw = trips[IN_TENANT], trips[OUTSIDE], trips[RAW]
    return {
        "in a tenant the bound engine's setting rides with BEGIN: bound = plain": (
            tenant[BOUND] == tenant[PLAIN]
        ),
        "set_tenant_guc by hand costs a round trip of its own: by hand = plain + 1": (
            tenant[BY_HAND] == tenant[PLAIN] + 1
        ),
        "outside any tenant the bound engine's '' rides with BEGIN too: bound = plain": (
            outside[BOUND] == outside[PLAIN]
        ),
        "a raw DBAPI checkout is reset when it returns to the pool: bound = plain + 1": (
            raw[BOUND] == raw[PLAIN] + 1
        ),
    }


def run(ctx: BenchContext) -> Section:
    """Measure the engines and return the section (key ``guard``)."""
    unbound, listened, bound = _engines(ctx, _url(ctx))
    engines = {"unbound": unbound, "no-op listener": listened, "bound": bound}
    tenant = seed_tenants()[0]
    cpu = _cpu_per_statement(ctx, engines, tenant)
    alone_ns = _check_alone(bound, tenant)
    trips = _round_trips(ctx, tenant)
    expected = _expectations(trips)
    for claim, holds in expected.items():
        if not holds:
            ctx.say(f"guard round trips: expected {claim}, found {trips}")
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
                "unbound: set_tenant_guc by hand in each transaction; no-op listener, for "
                "reference: the same with a before_cursor_execute listener that does nothing "
                "(any connection event costs this; the binding uses none); bound: "
                "bind_tenant_guc",
                f"the check alone, called directly: {alone_ns:.0f} ns per statement",
                "psycopg 3, straight to the server (no proxy in the timed path)",
            ],
        )
    )
    section.tables.append(
        ctx.report(
            "Round trips to the server per checkout, check-in included (psycopg 3, on the wire)",
            [
                "case",
                "unbound, plain",
                "unbound, set_tenant_guc by hand",
                "bound",
                "extra (bound - plain)",
            ],
            [
                [label, c[PLAIN], c.get(BY_HAND), c[BOUND], c[BOUND] - c[PLAIN]]
                for label, c in trips.items()
            ],
            [
                "counted on the wire: ReadyForQuery messages the server sent (one per simple "
                "query or Sync, each a round trip) through a PgWire proxy, per checkout, "
                f"the mean of {TRIP_REPEATS} after {TRIP_WARM} to warm up (psycopg's one-off "
                "prepare of a repeated statement is then behind)",
                "plain: the unbound engine with no tenant setting at all; on psycopg 3 a "
                "transaction is BEGIN, the query, COMMIT; the bound engine sends BEGIN and its "
                "set_config in one message",
                *(
                    f"{claim}: {'holds' if holds else 'DOES NOT HOLD'}"
                    for claim, holds in expected.items()
                ),
            ],
        )
    )
    section.data = {
        "cpu": cpu,
        "check_alone_ns": round(alone_ns, 1),
        "round_trips": trips,
        "round_trips_expected": expected,
    }
    return section
