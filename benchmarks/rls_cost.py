"""P2, RLS cost: the same queries under the package's policy, an explicit WHERE, a
control without row-level security and a naive policy.

Four setups, each on a connection of its own and each reading a table of its
own, ``p2_items_<setup>`` (``id``, ``tenant_id uuid``, ``created_at``,
``amount``, ``payload``), indexed on ``(tenant_id, created_at)``.  The first
is filled with ``INSERT ... SELECT`` from ``generate_series``: tenants take
turns row by row, so every tenant's rows are spread over the whole table, as
they are in a table that many tenants append to.  The others are copies of
it, the same rows in the same order, indexed and analysed the same way.

``explicit``
    the baseline: the run's ``BYPASSRLS`` role (no superuser, owns nothing) on
    a table without row-level security, with ``WHERE tenant_id = %s`` written
    into each query: what a host without tenancy runs;
``control``
    the app role (no superuser, no ``BYPASSRLS``, owns nothing) on a table
    without row-level security, with the same explicit ``WHERE``.  No policy
    is involved, so control/explicit is what another role, another connection
    and another copy of the table cost by themselves: the noise floor the
    policy's ratio is read against;
``package``
    the app role on a table under the policy
    :func:`tenant_celery.rls.enable_tenant_rls_sql` writes (forced), the
    tenant set with ``set_config(name, value, true)`` in each transaction, the
    queries without any tenant predicate;
``naive``
    a role of its own on a table under ``tenant_id =
    current_setting('app.current_tenant_id')::uuid`` (forced, no scalar
    subquery, no ``NULLIF``), set and queried the same way.

A table of its own per setup, rather than one table for all: a table read by
more setups than another was measured faster, even with every page in shared
buffers, so setups sharing a table would not compare with the control on its
copy.  Every query runs twice per round and setup: as a server-side prepared
statement (psycopg's ``prepare=True``) and unprepared, parsed and planned at
each execution (``prepare=False``).  Each round picks one random tenant and
position and runs the three queries in every setup both ways, the eight
(setup, statement) pairs in a new random order each round.  Just before each
timed query, a connection of its own runs the same query on the same table,
untimed, so every setup finds the pages it reads in shared buffers.  A
query's time is its ``execute`` plus ``fetchall`` on the client; the
transaction's time adds ``BEGIN``, the ``set_config`` and ``COMMIT``.

Apart from those runs, the aggregate is also timed as a sequential scan of
the whole table in every setup (index and bitmap scans and parallel workers
switched off with ``SET LOCAL``): what a table without an index leading with
``tenant_id`` costs, where a policy's expression is checked against every
row.  The package's sub-select is evaluated once per statement (an InitPlan);
the naive policy's ``current_setting()`` call once per row.  The setups take
turns in alternating order, each on a new connection of its own.

The rounds are split into several runs, each with new connections and a
warm-up of its own.  Every ratio is taken within a run, between the medians
of the same rounds, and reported as the median of the runs with the lowest and
highest run beside it.  The target compares the policy with the control:
(package/explicit) / (control/explicit), that is package/control, run by run.
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

from ._common import (
    BenchContext,
    Cell,
    Section,
    Table,
    alternate,
    median,
    percentile,
    ratio,
    stopwatch,
)
from ._scratch import connect

SETUPS = ("explicit", "control", "package", "naive")
TABLES = {setup: f"p2_items_{setup}" for setup in SETUPS}
"""Each setup's own copy of the table: the same rows in the same order, the same index."""
TARGET = 1.1
"""Published target: (package/explicit) / (control/explicit), query medians."""

MODES = ("prepared", "unprepared")
"""``prepared``: psycopg's ``prepare=True``; ``unprepared``: ``prepare=False``."""
START = datetime(2024, 1, 1, tzinfo=timezone.utc)
"""``created_at`` of every tenant's first row; each next row is one minute later."""
_SET_GUC = "SELECT set_config(%s, %s, true)"
SEQ_SCAN = (
    "SET LOCAL enable_indexscan = off",
    "SET LOCAL enable_indexonlyscan = off",
    "SET LOCAL enable_bitmapscan = off",
    "SET LOCAL max_parallel_workers_per_gather = 0",
)
"""Sent after ``BEGIN`` for the scan measurement: a sequential scan, in this process."""
RATIOS = (
    "control/explicit",
    "package/explicit",
    "package/control",
    "naive/explicit",
    "txn package/explicit",
)
"""The ratios each run gives, for every query and statement; ``txn``: whole transactions."""


@dataclass(frozen=True)
class Query:
    """One measured query: its text under RLS, and with the explicit tenant predicate.

    ``{table}`` stands for the table the setup reads.
    """

    name: str
    label: str
    rls: str
    explicit: str


QUERIES = (
    Query(
        "point",
        "one row by (tenant, created_at)",
        "SELECT id, tenant_id, created_at, amount, payload FROM {table} WHERE created_at = %s",
        "SELECT id, tenant_id, created_at, amount, payload FROM {table} "
        "WHERE tenant_id = %s AND created_at = %s",
    ),
    Query(
        "range",
        "the tenant's 100 rows from a created_at on",
        "SELECT id, created_at, amount FROM {table} WHERE created_at >= %s "
        "ORDER BY created_at LIMIT 100",
        "SELECT id, created_at, amount FROM {table} WHERE tenant_id = %s AND created_at >= %s "
        "ORDER BY created_at LIMIT 100",
    ),
    Query(
        "aggregate",
        "count and sum over the tenant's rows",
        "SELECT count(*), sum(amount) FROM {table} WHERE %s::timestamptz IS NOT NULL",
        "SELECT count(*), sum(amount) FROM {table} WHERE tenant_id = %s "
        "AND %s::timestamptz IS NOT NULL",
    ),
)
"""The aggregate takes the round's timestamp too, in a predicate that is always true,
so every query has the same parameters."""


def index_name(table: str) -> str:
    """The ``(tenant_id, created_at)`` index of ``table``."""
    return f"{table}_tenant_created"


def tenant_ids(count: int) -> list[str]:
    """The tenants of the table, in the order the build assigns them (fixed across runs)."""
    return [str(uuid.uuid5(uuid.NAMESPACE_URL, f"tenant-celery-p2-{n}")) for n in range(count)]


_COLUMNS = (
    "(id bigint PRIMARY KEY, tenant_id uuid NOT NULL, "
    "created_at timestamptz NOT NULL, amount integer NOT NULL, payload text NOT NULL)"
)


def _build(ctx: BenchContext, rows: int, tenants: int, naive_role: str) -> dict[str, Any]:
    """Create and fill every setup's table, their indexes and both policies."""
    plain_role = ctx.plain_url.username
    assert plain_role is not None
    source = TABLES["package"]
    with connect(ctx.admin_url, autocommit=True) as conn, stopwatch() as elapsed:
        conn.execute(
            sql.SQL("CREATE ROLE {} NOLOGIN NOSUPERUSER NOBYPASSRLS").format(
                sql.Identifier(naive_role)
            )
        )
        for table in TABLES.values():
            conn.execute(f"CREATE TABLE {table} {_COLUMNS}")
        conn.execute("CREATE TEMPORARY TABLE p2_tenants (n integer PRIMARY KEY, id uuid NOT NULL)")
        with conn.cursor().copy("COPY p2_tenants (n, id) FROM STDIN") as copy:
            for n, tenant in enumerate(tenant_ids(tenants)):
                copy.write_row((n, tenant))
        # Row g belongs to tenant g % tenants and is that tenant's (g / tenants)-th row,
        # one minute after its previous one: every tenant has the same timeline.
        conn.execute(
            f"INSERT INTO {source} (id, tenant_id, created_at, amount, payload) "
            "SELECT g + 1, t.id, %s::timestamptz + (g / %s) * interval '1 minute', "
            "((g::bigint * 7919) %% 1000)::integer, md5(g::text) "
            "FROM generate_series(0, %s - 1) AS g JOIN p2_tenants AS t ON t.n = g %% %s",
            (START, tenants, rows, tenants),
        )
        # The copies: the same rows in the same physical order.
        for table in TABLES.values():
            if table != source:
                conn.execute(f"INSERT INTO {table} SELECT * FROM {source} ORDER BY id")
        filled = elapsed()
        for table in TABLES.values():
            conn.execute(f"CREATE INDEX {index_name(table)} ON {table} (tenant_id, created_at)")
            conn.execute(f"VACUUM ANALYZE {table}")
        indexed = elapsed() - filled
        for statement in enable_tenant_rls_sql(source, column_type="uuid", roles=[ctx.app_role]):
            conn.execute(statement)
        naive = sql.Identifier(TABLES["naive"])
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(naive))
        conn.execute(sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(naive))
        conn.execute(
            sql.SQL(
                "CREATE POLICY p2_naive_policy ON {} AS PERMISSIVE FOR ALL TO {} "
                "USING (tenant_id = current_setting({})::uuid)"
            ).format(naive, sql.Identifier(naive_role), sql.Literal(DEFAULT_GUC))
        )
        readers = {
            "explicit": plain_role,
            "control": ctx.app_role,
            "package": ctx.app_role,
            "naive": naive_role,
        }
        for setup, role in readers.items():
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(role)))
            conn.execute(
                sql.SQL("GRANT SELECT ON {} TO {}").format(
                    sql.Identifier(TABLES[setup]), sql.Identifier(role)
                )
            )
        policies = conn.execute(
            "SELECT tablename, policyname, roles::text[], qual FROM pg_policies "
            "WHERE tablename = ANY(%s) ORDER BY tablename, policyname",
            (list(TABLES.values()),),
        ).fetchall()
        security = {
            str(name): bool(enabled)
            for name, enabled in conn.execute(
                "SELECT relname, relrowsecurity AND relforcerowsecurity FROM pg_class "
                "WHERE relname = ANY(%s)",
                (list(TABLES.values()),),
            ).fetchall()
        }
        expected = {TABLES[s]: s in ("package", "naive") for s in SETUPS}
        if security != expected:
            raise RuntimeError(f"p2: row-level security is not as intended: {security}")
        sizes = {
            table: conn.execute(
                "SELECT pg_table_size(%s), pg_relation_size(%s)", (table, index_name(table))
            ).fetchone()
            for table in TABLES.values()
        }
        size = conn.execute(
            "SELECT pg_size_pretty(pg_table_size(%s)), pg_size_pretty(pg_relation_size(%s))",
            (source, index_name(source)),
        ).fetchone()
    assert size is not None
    if len(set(sizes.values())) != 1:
        raise RuntimeError(f"p2: the copies differ in size: {sizes}")
    return {
        "rows": rows,
        "tenants": tenants,
        "tables": TABLES,
        "fill_s": round(filled, 2),
        "index_and_analyze_s": round(indexed, 2),
        "table_size": size[0],
        "index_size": size[1],
        "policies": [{"table": p[0], "name": p[1], "roles": p[2], "qual": p[3]} for p in policies],
    }


def _drop(ctx: BenchContext, naive_role: str) -> None:
    with connect(ctx.admin_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {', '.join(TABLES.values())}")
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (naive_role,))
        if exists.fetchone():
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(naive_role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(naive_role)))


class _Setup:
    """One connection, the role it queries as, the table it reads, how it names the tenant."""

    def __init__(self, name: str, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        self.name = name
        self.conn = conn
        self.uses_guc = name in ("package", "naive")
        self.table = TABLES[name]

    def sql_and_params(
        self, query: Query, tenant: str, at: datetime
    ) -> tuple[str, tuple[object, ...]]:
        if self.uses_guc:
            return query.rls.format(table=self.table), (at,)
        return query.explicit.format(table=self.table), (tenant, at)

    def run(
        self,
        query: Query,
        tenant: str,
        at: datetime,
        *,
        prepare: bool,
        settings: tuple[str, ...] = (),
    ) -> tuple[float, float, list[Any]]:
        """Run ``query`` in its own transaction: (query seconds, transaction seconds, rows).

        ``prepare`` applies to the query and to the ``set_config`` before it;
        ``settings`` are statements sent after ``BEGIN`` (``SET LOCAL``).
        """
        text, params = self.sql_and_params(query, tenant, at)
        cur = self.conn.cursor()
        # BEGIN and COMMIT are sent as statements of their own (the connection is in
        # autocommit mode), so the query's time never includes a BEGIN round trip.
        start = time.perf_counter()
        cur.execute("BEGIN")
        for setting in settings:
            cur.execute(setting)
        if self.uses_guc:
            cur.execute(_SET_GUC, (DEFAULT_GUC, tenant), prepare=prepare)
        begin = time.perf_counter()
        cur.execute(text, params, prepare=prepare)
        rows = cur.fetchall()
        end = time.perf_counter()
        cur.execute("COMMIT")
        done = time.perf_counter()
        return end - begin, done - start, rows

    def explain(
        self, query: Query, tenant: str, at: datetime, settings: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """``EXPLAIN (ANALYZE, BUFFERS)`` of ``query``, as JSON and as text."""
        text, params = self.sql_and_params(query, tenant, at)
        cur = self.conn.cursor()
        cur.execute("BEGIN")
        for setting in settings:
            cur.execute(setting)
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
    scans = [
        n for n in nodes if "Scan" in n["Node Type"] and n.get("Relation Name") in TABLES.values()
    ]
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
    runs = ctx.pick(smoke=2, default=5)
    rounds = ctx.pick(smoke=30, default=300)
    warm = ctx.pick(smoke=10, default=30)
    scan_rounds = ctx.pick(smoke=3, default=15)
    per_tenant = rows // tenants
    naive_role = f"{ctx.admin_url.database}_naive"
    rng = random.Random(20_240_101)
    ids = tenant_ids(tenants)

    _drop(ctx, naive_role)
    try:
        build = _build(ctx, rows, tenants, naive_role)
        ctx.say(
            f"p2: {len(TABLES)} tables of {rows:,} rows over {tenants:,} tenants built in "
            f"{build['fill_s'] + build['index_and_analyze_s']:.1f} s "
            f"(table {build['table_size']}, index {build['index_size']})"
        )
        samples = _Samples()
        plans: dict[str, dict[str, Any]] = {}
        for number in range(runs):
            plans = _measure(ctx, samples, rounds, warm, rng, ids, per_tenant, naive_role)
            ctx.say(
                f"p2: run {number + 1} of {runs}: {rounds:,} rounds x {len(SETUPS)} setups x "
                f"{len(MODES)} statements x {len(QUERIES)} queries timed"
            )
        scans = _scans(ctx, scan_rounds, rng, ids, naive_role)
        ctx.say(f"p2: {scan_rounds} rounds of sequential scans x {len(SETUPS)} setups timed")
    finally:
        _drop(ctx, naive_role)
    return _section(ctx, build, runs, rounds, warm, samples, plans, scans)


class _Samples:
    """Every timing, by setup, statement and query, one list per run."""

    def __init__(self) -> None:
        def empty() -> dict[str, dict[str, dict[str, list[list[float]]]]]:
            return {s: {m: {q.name: [] for q in QUERIES} for m in MODES} for s in SETUPS}

        self.query_s = empty()
        self.transaction_s = empty()
        self.rows_returned: dict[str, set[int]] = {q.name: set() for q in QUERIES}

    def new_run(self) -> None:
        for by_setup in (self.query_s, self.transaction_s):
            for by_mode in by_setup.values():
                for by_query in by_mode.values():
                    for runs in by_query.values():
                        runs.append([])

    def add(self, setup: str, mode: str, query: str, query_s: float, txn_s: float) -> None:
        self.query_s[setup][mode][query][-1].append(query_s)
        self.transaction_s[setup][mode][query][-1].append(txn_s)


def _open(ctx: BenchContext, naive_role: str) -> dict[str, psycopg.Connection[tuple[Any, ...]]]:
    """A new connection for every setup, and one that reads the pages before each query."""
    urls = {
        "explicit": ctx.plain_url,
        "control": ctx.app_url,
        "package": ctx.app_url,
        "naive": ctx.admin_url,
        "prime": ctx.admin_url,
    }
    conns: dict[str, psycopg.Connection[tuple[Any, ...]]] = {}
    try:
        for name, url in urls.items():
            conns[name] = connect(url, autocommit=True)
        # The naive policy's role cannot log in: the superuser session becomes it, and
        # row-level security then filters it like any other role (current_user).
        conns["naive"].execute(sql.SQL("SET ROLE {}").format(sql.Identifier(naive_role)))
    except BaseException:
        for conn in conns.values():
            conn.close()
        raise
    pids = {conn.info.backend_pid for conn in conns.values()}
    if len(pids) != len(conns):
        raise RuntimeError("p2: two setups share a server connection")
    return conns


def _prime(
    conn: psycopg.Connection[tuple[Any, ...]], table: str, query: Query, tenant: str, at: datetime
) -> None:
    """Read what ``query`` reads in ``table``, untimed, just before a setup times it."""
    conn.execute(query.explicit.format(table=table), (tenant, at), prepare=False).fetchall()


def _measure(
    ctx: BenchContext,
    samples: _Samples,
    rounds: int,
    warm: int,
    rng: random.Random,
    ids: list[str],
    per_tenant: int,
    naive_role: str,
) -> dict[str, Any]:
    """One run: new connections, ``warm`` rounds untimed, ``rounds`` timed; its plans."""
    conns = _open(ctx, naive_role)
    samples.new_run()
    try:
        setups = {name: _Setup(name, conns[name]) for name in SETUPS}
        order = [(setup, mode) for setup in SETUPS for mode in MODES]
        for n in range(warm + rounds):
            tenant = rng.choice(ids)
            minute = rng.randrange(0, max(1, per_tenant - 100))
            at = START + timedelta(minutes=minute)
            rng.shuffle(order)
            answers: dict[str, dict[tuple[str, str], list[Any]]] = {q.name: {} for q in QUERIES}
            for setup, mode in order:
                for query in QUERIES:
                    _prime(conns["prime"], setups[setup].table, query, tenant, at)
                    q, t, found = setups[setup].run(query, tenant, at, prepare=mode == "prepared")
                    answers[query.name][setup, mode] = found
                    if n >= warm:
                        samples.add(setup, mode, query.name, q, t)
            # Every setup must read exactly the same rows both ways, or the timings
            # compare different work.
            for query in QUERIES:
                returned = answers[query.name]
                first = returned[order[0]]
                if any(rows != first for rows in returned.values()):
                    raise RuntimeError(
                        f"p2: {query.name} for tenant {tenant} returned different rows per "
                        "setup: "
                        + ", ".join(
                            f"{s} {m} {len(rows)} rows" for (s, m), rows in returned.items()
                        )
                    )
                samples.rows_returned[query.name].add(len(first))
        tenant = ids[len(ids) // 2]
        at = START + timedelta(minutes=max(0, per_tenant // 2 - 50))
        plans: dict[str, dict[str, Any]] = {}
        for s in SETUPS:
            plans[s] = {}
            for query in QUERIES:
                _prime(conns["prime"], setups[s].table, query, tenant, at)
                plans[s][query.name] = setups[s].explain(query, tenant, at)
        return plans
    finally:
        for conn in conns.values():
            conn.close()


_SCAN_QUERY = next(q for q in QUERIES if q.name == "aggregate")


def _scans(
    ctx: BenchContext, rounds: int, rng: random.Random, ids: list[str], naive_role: str
) -> dict[str, Any]:
    """The aggregate as a sequential scan of the whole table, every setup in turn:
    unprepared, on new connections, one untimed round first; each setup's times
    and plan."""
    conns = _open(ctx, naive_role)
    try:
        setups = {name: _Setup(name, conns[name]) for name in SETUPS}
        seconds: dict[str, list[float]] = {name: [] for name in SETUPS}
        for n in range(rounds + 1):
            tenant = rng.choice(ids)
            found: dict[str, list[Any]] = {}
            for name in alternate(SETUPS, n):
                q, _, found[name] = setups[name].run(
                    _SCAN_QUERY, tenant, START, prepare=False, settings=SEQ_SCAN
                )
                if n:
                    seconds[name].append(q)
            if len({repr(rows) for rows in found.values()}) != 1:
                raise RuntimeError(
                    f"p2: the scan for tenant {tenant} returned different rows per setup: {found}"
                )
        tenant = ids[len(ids) // 2]
        plans = {
            name: plan_summary(setup.explain(_SCAN_QUERY, tenant, START, SEQ_SCAN)["json"])
            for name, setup in setups.items()
        }
        return {"rounds": rounds, "seconds": seconds, "plans": plans}
    finally:
        for conn in conns.values():
            conn.close()


def _scan_table(ctx: BenchContext, rows: int, scans: dict[str, Any]) -> Table:
    med = {name: median(values) for name, values in scans["seconds"].items()}
    table_rows: list[list[Cell]] = []
    for name in SETUPS:
        plan = scans["plans"][name]
        table_rows.append(
            [
                name,
                "/".join(plan["scans"]),
                "yes" if plan["initplan"] else "no",
                round(med[name] * 1e3, 2),
                f"{min(scans['seconds'][name]) * 1e3:.2f} to "
                f"{max(scans['seconds'][name]) * 1e3:.2f}",
                ratio(med[name], med["explicit"]),
                round((med[name] - med["explicit"]) / rows * 1e9, 1),
            ]
        )
    return ctx.report(
        f"P2 without an index: the aggregate as a sequential scan of all {rows:,} rows, "
        f"{scans['rounds']} rounds",
        ["setup", "scan", "InitPlan", "ms med", "ms range", "vs explicit", "ns per row"],
        table_rows,
        [
            "index scans, bitmap scans and parallel workers off (SET LOCAL) in each "
            "transaction; unprepared; the setups in alternating order on connections of "
            "their own; every setup counted the same rows",
            "ns per row: (setup - explicit) / rows scanned, what each row's check costs "
            "beyond comparing tenant_id with a constant",
        ],
    )


def _index_note(summaries: dict[str, dict[str, Any]]) -> str:
    """One line: did every plan find the tenant's rows through its table's index?"""
    missed = [
        f"{setup}/{query}"
        for setup, by_query in summaries.items()
        for query, summary in by_query.items()
        if summary["index"] != index_name(TABLES[setup]) or not summary["tenant_in_index_cond"]
    ]
    if not missed:
        return (
            "every plan reads its own table's (tenant_id, created_at) index, "
            "with tenant_id in its Index Cond"
        )
    return f"NOT through the table's index with tenant_id in the Index Cond: {', '.join(missed)}"


@dataclass(frozen=True)
class _RunRatio:
    """One ratio taken run by run: the median of the runs, and each run's."""

    median: float
    runs: list[float]

    @classmethod
    def of(cls, values: dict[str, list[float]], setup: str, baseline: str) -> _RunRatio:
        """``setup``'s run medians over ``baseline``'s, run by run."""
        runs = [ratio(v, b) for v, b in zip(values[setup], values[baseline], strict=True)]
        return cls(ratio(median(runs), 1.0), runs)

    @property
    def spread(self) -> str:
        """The lowest and the highest run, as ``"a to b"``."""
        return f"{min(self.runs):.3f} to {max(self.runs):.3f}" if self.runs else "—"

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "runs": self.runs}


def _section(
    ctx: BenchContext,
    build: dict[str, Any],
    runs: int,
    rounds: int,
    warm: int,
    samples: _Samples,
    plans: dict[str, dict[str, Any]],
    scans: dict[str, Any],
) -> Section:
    def run_medians(
        found: dict[str, dict[str, dict[str, list[list[float]]]]], mode: str, query: str
    ) -> dict[str, list[float]]:
        return {s: [median(r) for r in found[s][mode][query]] for s in SETUPS}

    ratios: dict[str, dict[str, dict[str, _RunRatio]]] = {
        name: {m: {} for m in MODES} for name in RATIOS
    }
    medians_us: dict[str, dict[str, dict[str, list[float]]]] = {
        s: {m: {} for m in MODES} for s in SETUPS
    }
    txn_medians_us: dict[str, dict[str, dict[str, list[float]]]] = {
        s: {m: {} for m in MODES} for s in SETUPS
    }
    time_rows: list[list[Cell]] = []
    ratio_rows: list[list[Cell]] = []
    for query in QUERIES:
        for mode in MODES:
            per_run = run_medians(samples.query_s, mode, query.name)
            txn_per_run = run_medians(samples.transaction_s, mode, query.name)
            for s in SETUPS:
                medians_us[s][mode][query.name] = [_us(v) for v in per_run[s]]
                txn_medians_us[s][mode][query.name] = [_us(v) for v in txn_per_run[s]]
            found = {
                "control/explicit": _RunRatio.of(per_run, "control", "explicit"),
                "package/explicit": _RunRatio.of(per_run, "package", "explicit"),
                "package/control": _RunRatio.of(per_run, "package", "control"),
                "naive/explicit": _RunRatio.of(per_run, "naive", "explicit"),
                "txn package/explicit": _RunRatio.of(txn_per_run, "package", "explicit"),
            }
            for name, value in found.items():
                ratios[name][mode][query.name] = value
            med = {s: median(per_run[s]) for s in SETUPS}
            every = {
                s: [v for r in samples.query_s[s][mode][query.name] for v in r] for s in SETUPS
            }
            time_rows.append(
                [
                    query.name,
                    mode,
                    _us(med["explicit"]),
                    _us(percentile(every["explicit"], 0.95)),
                    _us(med["control"]),
                    _us(med["package"]),
                    _us(percentile(every["package"], 0.95)),
                    _us(med["naive"]),
                ]
            )
            ratio_rows.append(
                [
                    query.name,
                    mode,
                    found["control/explicit"].median,
                    found["control/explicit"].spread,
                    found["package/explicit"].median,
                    found["package/explicit"].spread,
                    found["package/control"].median,
                    found["package/control"].spread,
                    found["naive/explicit"].median,
                    found["txn package/explicit"].median,
                ]
            )
    worst_query, worst_mode = max(
        ((q.name, m) for q in QUERIES for m in MODES),
        key=lambda case: ratios["package/control"][case[1]][case[0]].median,
    )
    worst = ratios["package/control"][worst_mode][worst_query]
    worst_package = max(r.median for by in ratios["package/explicit"].values() for r in by.values())
    times = ctx.report(
        f"P2 query time: {build['rows']:,} rows, {build['tenants']:,} tenants, "
        f"{runs} runs of {rounds:,} rounds (µs)",
        [
            "query",
            "statement",
            "explicit med",
            "explicit p95",
            "control med",
            "package med",
            "package p95",
            "naive med",
        ],
        time_rows,
        [
            "µs per query on the client (execute + fetch): the median of the runs' medians, "
            "and the 95th percentile of every round; each setup on its own connection (new "
            "in each run) and its own copy of the table; the setups and both statements in "
            "random order every round, same random tenant and position; each query's pages "
            "read just before it on another connection, untimed",
            "explicit: BYPASSRLS role, WHERE tenant_id = …, no row-level security; control: "
            "the app role, WHERE tenant_id = …, no row-level security; package: the app role "
            "under enable_tenant_rls's policy; naive: tenant_id = current_setting(…)::uuid",
            "prepared: a server-side prepared statement (psycopg prepare=True); unprepared: "
            "parsed and planned at every execution (prepare=False)",
            "; ".join(f"{q.name}: {q.label}" for q in QUERIES),
        ],
    )
    ratio_table = ctx.report(
        f"P2 ratios, median of {runs} runs, lowest to highest run beside",
        [
            "query",
            "statement",
            "control/explicit",
            "control/explicit runs",
            "package/explicit",
            "package/explicit runs",
            "package/control",
            "package/control runs",
            "naive/explicit",
            "txn package/explicit",
        ],
        ratio_rows,
        [
            "each ratio is taken within a run, between the medians of the same rounds; "
            "the table gives the median of the runs, and the lowest and highest run",
            "control/explicit: what another role, connection and copy of the table cost "
            "with no policy at all, the noise floor; package/control, that is "
            "(package/explicit) / (control/explicit): what the policy itself costs",
            "txn: whole transaction (BEGIN, set_config for the RLS setups, query, COMMIT)",
            f"worst package/explicit ratio {worst_package}, not the target: it holds the "
            "noise floor too",
            f"worst package/control ratio {worst.median} (runs {worst.spread}) against a "
            f"target of ≤ {TARGET}: " + ("met" if worst.median <= TARGET else "NOT met"),
        ],
    )
    plan_rows = []
    summaries: dict[str, dict[str, Any]] = {}
    for s in SETUPS:
        summaries[s] = {}
        for query in QUERIES:
            summary = plan_summary(plans[s][query.name]["json"])
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
    plan_table = ctx.report(
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
        tables=[times, ratio_table, plan_table, _scan_table(ctx, build["rows"], scans)],
        data={
            "build": build,
            "runs": runs,
            "rounds_per_run": rounds,
            "warm_rounds_per_run": warm,
            "rounds": runs * rounds,
            "setups": list(SETUPS),
            "modes": list(MODES),
            "queries": {q.name: q.label for q in QUERIES},
            "target": TARGET,
            "ratios": {
                name: {m: {q: r.to_json() for q, r in by.items()} for m, by in by_mode.items()}
                for name, by_mode in ratios.items()
            },
            "worst_policy_ratio": worst.median,
            "worst_policy_case": {"query": worst_query, "mode": worst_mode},
            "worst_package_ratio": worst_package,
            "run_medians_us": medians_us,
            "run_transaction_medians_us": txn_medians_us,
            "query_us": {
                s: {
                    m: {
                        q: [[_us(v) for v in r] for r in per_run] for q, per_run in by_query.items()
                    }
                    for m, by_query in by_mode.items()
                }
                for s, by_mode in samples.query_s.items()
            },
            "rows_returned": {q: sorted(v) for q, v in samples.rows_returned.items()},
            "plan_summaries": summaries,
            "plans": plans,
            "scan": {
                "rounds": scans["rounds"],
                "ms": {
                    name: [round(v * 1e3, 3) for v in values]
                    for name, values in scans["seconds"].items()
                },
                "plan_summaries": scans["plans"],
            },
        },
    )
