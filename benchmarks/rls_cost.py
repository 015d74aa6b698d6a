"""P2, RLS cost: the same queries under the package's policy, an explicit WHERE and a naive policy.

One table, ``p2_items`` (``id``, ``tenant_id uuid``, ``created_at``, ``amount``,
``payload``), indexed on ``(tenant_id, created_at)`` and filled with
``INSERT ... SELECT`` from ``generate_series``: tenants take turns row by row,
so every tenant's rows are spread over the whole table, as they are in a
table that many tenants append to.  Three setups read the very same table and
index, in the same run, interleaved:

``explicit``
    the baseline: a role that row-level security does not filter (the run's
    ``BYPASSRLS`` role, because the package's policy is ``FORCE``\\ d and so
    filters the table's owner too), with ``WHERE tenant_id = %s`` written into
    each query;
``package``
    the app role (no superuser, no ``BYPASSRLS``, owns nothing) under the
    policy :func:`tenant_celery.rls.enable_tenant_rls_sql` writes, the tenant
    set with ``set_config(name, value, true)`` in each transaction, the
    queries without any tenant predicate;
``naive``
    a role of its own under ``tenant_id =
    current_setting('app.current_tenant_id')::uuid`` (no scalar subquery,
    no ``NULLIF``), set and queried the same way.

Both policies live on the table at once, each limited to its role
(``CREATE POLICY ... TO role``), so the setups can take turns query by query
on the same pages.  Each round picks one random tenant and position and runs
the three queries in every setup, the setups in a new random order each
round.  A query's time is its ``execute`` plus ``fetchall`` on the client
(psycopg, prepared after five runs as psycopg does by default); the
transaction's time adds ``BEGIN``, the ``set_config`` and ``COMMIT``.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg import sql

from tenant_celery.config import DEFAULT_GUC
from tenant_celery.rls import enable_tenant_rls_sql

from ._common import BenchContext, Section, median, percentile, ratio, stopwatch
from ._scratch import connect

TABLE = "p2_items"
INDEX = "p2_items_tenant_created"
TARGET = 1.1
"""Published target: package policy / explicit WHERE, query medians."""

SETUPS = ("explicit", "package", "naive")
START = datetime(2024, 1, 1, tzinfo=timezone.utc)
"""``created_at`` of every tenant's first row; each next row is one minute later."""
_SET_GUC = "SELECT set_config(%s, %s, true)"


@dataclass(frozen=True)
class Query:
    """One measured query: its text under RLS, and with the explicit tenant predicate."""

    name: str
    label: str
    rls: str
    explicit: str


QUERIES = (
    Query(
        "point",
        "point lookup (tenant, created_at)",
        f"SELECT id, tenant_id, created_at, amount, payload FROM {TABLE} WHERE created_at = %s",
        f"SELECT id, tenant_id, created_at, amount, payload FROM {TABLE} "
        "WHERE tenant_id = %s AND created_at = %s",
    ),
    Query(
        "range",
        "100-row range by created_at",
        f"SELECT id, created_at, amount FROM {TABLE} WHERE created_at >= %s "
        "ORDER BY created_at LIMIT 100",
        f"SELECT id, created_at, amount FROM {TABLE} WHERE tenant_id = %s AND created_at >= %s "
        "ORDER BY created_at LIMIT 100",
    ),
    Query(
        "aggregate",
        "count + sum over the tenant",
        f"SELECT count(*), sum(amount) FROM {TABLE} WHERE %s::timestamptz IS NOT NULL",
        f"SELECT count(*), sum(amount) FROM {TABLE} WHERE tenant_id = %s "
        "AND %s::timestamptz IS NOT NULL",
    ),
)
"""The aggregate takes the round's timestamp too, in a predicate that is always true,
so every query has the same parameters."""


def tenant_ids(count: int) -> list[str]:
    """The tenants of the table, in the order the build assigns them (fixed across runs)."""
    return [str(uuid.uuid5(uuid.NAMESPACE_URL, f"tenant-celery-p2-{n}")) for n in range(count)]


def _build(ctx: BenchContext, rows: int, tenants: int, naive_role: str) -> dict[str, Any]:
    """Create and fill the table, its index and both policies; return what was built."""
    plain_role = ctx.plain_url.username
    with connect(ctx.admin_url, autocommit=True) as conn, stopwatch() as elapsed:
        conn.execute(
            sql.SQL("CREATE ROLE {} NOLOGIN NOSUPERUSER NOBYPASSRLS").format(
                sql.Identifier(naive_role)
            )
        )
        conn.execute(
            f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, tenant_id uuid NOT NULL, "
            "created_at timestamptz NOT NULL, amount integer NOT NULL, payload text NOT NULL)"
        )
        conn.execute("CREATE TEMPORARY TABLE p2_tenants (n integer PRIMARY KEY, id uuid NOT NULL)")
        with conn.cursor().copy("COPY p2_tenants (n, id) FROM STDIN") as copy:
            for n, tenant in enumerate(tenant_ids(tenants)):
                copy.write_row((n, tenant))
        # Row g belongs to tenant g % tenants and is that tenant's (g / tenants)-th row,
        # one minute after its previous one: every tenant has the same timeline.
        conn.execute(
            f"INSERT INTO {TABLE} (id, tenant_id, created_at, amount, payload) "
            "SELECT g + 1, t.id, %s::timestamptz + (g / %s) * interval '1 minute', "
            "((g::bigint * 7919) %% 1000)::integer, md5(g::text) "
            "FROM generate_series(0, %s - 1) AS g JOIN p2_tenants AS t ON t.n = g %% %s",
            (START, tenants, rows, tenants),
        )
        filled = elapsed()
        conn.execute(f"CREATE INDEX {INDEX} ON {TABLE} (tenant_id, created_at)")
        conn.execute(f"VACUUM ANALYZE {TABLE}")
        indexed = elapsed() - filled
        for statement in enable_tenant_rls_sql(TABLE, column_type="uuid", roles=[ctx.app_role]):
            conn.execute(statement)
        conn.execute(
            sql.SQL(
                "CREATE POLICY p2_naive_policy ON {} AS PERMISSIVE FOR ALL TO {} "
                "USING (tenant_id = current_setting({})::uuid)"
            ).format(sql.Identifier(TABLE), sql.Identifier(naive_role), sql.Literal(DEFAULT_GUC))
        )
        for role in (ctx.app_role, naive_role, plain_role):
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(role)))
            conn.execute(
                sql.SQL("GRANT SELECT ON {} TO {}").format(
                    sql.Identifier(TABLE), sql.Identifier(role)
                )
            )
        policies = conn.execute(
            "SELECT policyname, roles::text[], qual FROM pg_policies WHERE tablename = %s "
            "ORDER BY policyname",
            (TABLE,),
        ).fetchall()
        size = conn.execute(
            "SELECT pg_size_pretty(pg_table_size(%s)), pg_size_pretty(pg_relation_size(%s))",
            (TABLE, INDEX),
        ).fetchone()
    assert size is not None
    return {
        "rows": rows,
        "tenants": tenants,
        "fill_s": round(filled, 2),
        "index_and_analyze_s": round(indexed, 2),
        "table_size": size[0],
        "index_size": size[1],
        "policies": [{"name": p[0], "roles": p[1], "qual": p[2]} for p in policies],
    }


def _drop(ctx: BenchContext, naive_role: str) -> None:
    with connect(ctx.admin_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (naive_role,))
        if exists.fetchone():
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(naive_role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(naive_role)))


class _Setup:
    """One connection, the role it queries as, and how it names the tenant."""

    def __init__(self, name: str, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        self.name = name
        self.conn = conn
        self.uses_guc = name != "explicit"

    def sql_and_params(
        self, query: Query, tenant: str, at: datetime
    ) -> tuple[str, tuple[object, ...]]:
        if self.uses_guc:
            return query.rls, (at,)
        return query.explicit, (tenant, at)

    def run(self, query: Query, tenant: str, at: datetime) -> tuple[float, float, list[Any]]:
        """Run ``query`` in its own transaction: (query seconds, transaction seconds, rows)."""
        text, params = self.sql_and_params(query, tenant, at)
        cur = self.conn.cursor()
        # BEGIN and COMMIT are sent as statements of their own (the connection is in
        # autocommit mode), so the query's time never includes a BEGIN round trip.
        start = time.perf_counter()
        cur.execute("BEGIN")
        if self.uses_guc:
            cur.execute(_SET_GUC, (DEFAULT_GUC, tenant))
        begin = time.perf_counter()
        cur.execute(text, params)
        rows = cur.fetchall()
        end = time.perf_counter()
        cur.execute("COMMIT")
        done = time.perf_counter()
        return end - begin, done - start, rows

    def explain(self, query: Query, tenant: str, at: datetime) -> dict[str, Any]:
        """``EXPLAIN (ANALYZE, BUFFERS)`` of ``query``, as JSON and as text."""
        text, params = self.sql_and_params(query, tenant, at)
        cur = self.conn.cursor()
        cur.execute("BEGIN")
        if self.uses_guc:
            cur.execute(_SET_GUC, (DEFAULT_GUC, tenant))
        cur.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {text}", params)
        row = cur.fetchone()
        assert row is not None
        plan = row[0][0]
        cur.execute(f"EXPLAIN (ANALYZE, BUFFERS) {text}", params)
        lines = [str(r[0]) for r in cur.fetchall()]
        cur.execute("COMMIT")
        return {"json": plan, "text": "\n".join(lines)}


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", []):
        found.extend(_nodes(child))
    return found


def plan_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """The facts worth a column: top node, the index used and how, buffers, time."""
    top = plan["Plan"]
    nodes = _nodes(top)
    scans = [n for n in nodes if "Scan" in n["Node Type"] and n.get("Relation Name") == TABLE]
    scans += [n for n in nodes if n["Node Type"] == "Bitmap Index Scan"]
    index_nodes = [n for n in scans if n.get("Index Name")]
    index_cond = next((n.get("Index Cond") for n in index_nodes if n.get("Index Cond")), None)
    filters = [n["Filter"] for n in scans if n.get("Filter")]
    return {
        "top": top["Node Type"],
        "scans": sorted({n["Node Type"] for n in scans}),
        "index": index_nodes[0]["Index Name"] if index_nodes else None,
        "index_cond": index_cond,
        "filter": filters[0] if filters else None,
        "tenant_in_index_cond": bool(index_cond and "tenant_id" in index_cond),
        "initplan": any(n.get("Parent Relationship") == "InitPlan" for n in nodes),
        "shared_hit": top.get("Shared Hit Blocks", 0),
        "shared_read": top.get("Shared Read Blocks", 0),
        "execution_ms": plan.get("Execution Time"),
        "planning_ms": plan.get("Planning Time"),
    }


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


def run(ctx: BenchContext) -> Section:
    """Measure P2 and return its section."""
    rows = ctx.pick(smoke=10_000, default=1_000_000)
    tenants = ctx.pick(smoke=10, default=1_000)
    rounds = ctx.pick(smoke=60, default=1_500)
    warm = ctx.pick(smoke=10, default=150)
    per_tenant = rows // tenants
    naive_role = f"{ctx.admin_url.database}_naive"
    rng = random.Random(20_240_101)
    ids = tenant_ids(tenants)

    _drop(ctx, naive_role)
    try:
        build = _build(ctx, rows, tenants, naive_role)
        ctx.say(
            f"p2: {rows:,} rows over {tenants:,} tenants built in "
            f"{build['fill_s'] + build['index_and_analyze_s']:.1f} s "
            f"(table {build['table_size']}, index {build['index_size']})"
        )
        result = _measure(ctx, rounds, warm, rng, ids, per_tenant, naive_role)
    finally:
        _drop(ctx, naive_role)
    return _section(ctx, build, rounds, result)


def _measure(
    ctx: BenchContext,
    rounds: int,
    warm: int,
    rng: random.Random,
    ids: list[str],
    per_tenant: int,
    naive_role: str,
) -> dict[str, Any]:
    conns = {
        "explicit": connect(ctx.plain_url, autocommit=True),
        "package": connect(ctx.app_url, autocommit=True),
        "naive": connect(ctx.admin_url, autocommit=True),
    }
    try:
        # The naive policy's role cannot log in: the superuser session becomes it, and
        # row-level security then filters it like any other role (current_user).
        conns["naive"].execute(sql.SQL("SET ROLE {}").format(sql.Identifier(naive_role)))
        setups = {name: _Setup(name, conn) for name, conn in conns.items()}
        query_s: dict[str, dict[str, list[float]]] = {
            s: {q.name: [] for q in QUERIES} for s in SETUPS
        }
        txn_s: dict[str, dict[str, list[float]]] = {
            s: {q.name: [] for q in QUERIES} for s in SETUPS
        }
        row_counts: dict[str, set[int]] = {q.name: set() for q in QUERIES}
        order = list(SETUPS)
        for n in range(warm + rounds):
            tenant = rng.choice(ids)
            minute = rng.randrange(0, max(1, per_tenant - 100))
            at = START + timedelta(minutes=minute)
            rng.shuffle(order)
            answers: dict[str, dict[str, list[Any]]] = {q.name: {} for q in QUERIES}
            for name in order:
                for query in QUERIES:
                    q, t, found = setups[name].run(query, tenant, at)
                    answers[query.name][name] = found
                    if n >= warm:
                        query_s[name][query.name].append(q)
                        txn_s[name][query.name].append(t)
            # The three setups must read exactly the same rows, or the timings
            # compare different work.
            for query in QUERIES:
                first = answers[query.name][SETUPS[0]]
                if any(answers[query.name][s] != first for s in SETUPS[1:]):
                    raise RuntimeError(
                        f"p2: {query.name} for tenant {tenant} returned different rows per "
                        "setup: "
                        + ", ".join(f"{s} {len(answers[query.name][s])} rows" for s in SETUPS)
                    )
                row_counts[query.name].add(len(first))
        ctx.say(f"p2: {rounds:,} rounds x {len(SETUPS)} setups x {len(QUERIES)} queries timed")
        tenant = ids[len(ids) // 2]
        at = START + timedelta(minutes=max(0, per_tenant // 2 - 50))
        plans = {s: {q.name: setups[s].explain(q, tenant, at) for q in QUERIES} for s in SETUPS}
    finally:
        for conn in conns.values():
            conn.close()
    return {
        "query_s": query_s,
        "transaction_s": txn_s,
        "rows_returned": {q: sorted(v) for q, v in row_counts.items()},
        "plans": plans,
    }


def _index_note(summaries: dict[str, dict[str, Any]]) -> str:
    """One line: did every plan find the tenant's rows through the index?"""
    missed = [
        f"{setup}/{query}"
        for setup, by_query in summaries.items()
        for query, summary in by_query.items()
        if summary["index"] != INDEX or not summary["tenant_in_index_cond"]
    ]
    if not missed:
        return f"every plan reads {INDEX} with tenant_id in its Index Cond"
    return f"NOT through {INDEX} with tenant_id in the Index Cond: {', '.join(missed)}"


def _section(
    ctx: BenchContext, build: dict[str, Any], rounds: int, result: dict[str, Any]
) -> Section:
    query_s = result["query_s"]
    txn_s = result["transaction_s"]
    rows_out = []
    ratios: dict[str, dict[str, float]] = {"package": {}, "naive": {}}
    for query in QUERIES:
        med = {s: median(query_s[s][query.name]) for s in SETUPS}
        p95 = {s: percentile(query_s[s][query.name], 0.95) for s in SETUPS}
        txn = {s: median(txn_s[s][query.name]) for s in SETUPS}
        for s in ("package", "naive"):
            ratios[s][query.name] = ratio(med[s], med["explicit"])
        rows_out.append(
            [
                query.label,
                _us(med["explicit"]),
                _us(p95["explicit"]),
                _us(med["package"]),
                _us(p95["package"]),
                ratios["package"][query.name],
                _us(med["naive"]),
                ratios["naive"][query.name],
                ratio(txn["package"], txn["explicit"]),
            ]
        )
    worst = max(ratios["package"].values())
    timing = ctx.report(
        f"P2 RLS cost: {build['rows']:,} rows, {build['tenants']:,} tenants, "
        f"{rounds:,} rounds (µs)",
        [
            "query",
            "explicit med",
            "explicit p95",
            "package med",
            "package p95",
            "package/explicit",
            "naive med",
            "naive/explicit",
            "txn package/explicit",
        ],
        rows_out,
        [
            "µs per query on the client (execute + fetch), median and 95th percentile; "
            "setups interleaved in random order every round, same random tenant and position",
            "explicit: BYPASSRLS role with WHERE tenant_id = …; package: the app role under "
            "enable_tenant_rls's policy; naive: tenant_id = current_setting(…)::uuid",
            "txn: whole transaction (BEGIN, set_config for the RLS setups, query, COMMIT)",
            f"worst package/explicit ratio {worst} against a target of ≤ {TARGET}: "
            + ("met" if worst <= TARGET else "NOT met"),
        ],
    )
    plan_rows = []
    summaries: dict[str, dict[str, Any]] = {}
    for s in SETUPS:
        summaries[s] = {}
        for query in QUERIES:
            summary = plan_summary(result["plans"][s][query.name]["json"])
            summaries[s][query.name] = summary
            plan_rows.append(
                [
                    query.name,
                    s,
                    summary["top"],
                    "/".join(summary["scans"]),
                    summary["index"] or "none",
                    "yes" if summary["tenant_in_index_cond"] else "no",
                    "yes" if summary["initplan"] else "no",
                    summary["shared_hit"] + summary["shared_read"],
                    summary["execution_ms"],
                ]
            )
    plans = ctx.report(
        "P2 plans: EXPLAIN (ANALYZE, BUFFERS), one tenant",
        [
            "query",
            "setup",
            "top node",
            "scan",
            "index",
            "tenant in index cond",
            "InitPlan",
            "buffers",
            "exec ms",
        ],
        plan_rows,
        [_index_note(summaries), "full plans (JSON and text): p2.data.plans in the JSON output"],
    )
    return Section(
        key="p2",
        title="RLS cost",
        tables=[timing, plans],
        data={
            "build": build,
            "rounds": rounds,
            "target": TARGET,
            "ratios_query_median": ratios,
            "worst_package_ratio": worst,
            "query_us": {
                s: {q: [_us(v) for v in vals] for q, vals in query_s[s].items()} for s in SETUPS
            },
            "transaction_us": {
                s: {q: [_us(v) for v in vals] for q, vals in txn_s[s].items()} for s in SETUPS
            },
            "rows_returned": result["rows_returned"],
            "plan_summaries": summaries,
            "plans": result["plans"],
        },
    )
