"""What the tenant controls cost each claim: the transport's claim statement against
the one before them, ``python -m benchmarks.claim_controls``.

Revision ``tc0005`` made every claim of :mod:`tenant_celery.transport` pass over
paused tenants and tenants whose bucket holds less than one token, and spend the
buckets of what it takes.  This script times that claim against the claim of the
commit before the controls, whose text is built from that commit's
``transport.py`` (read with ``git show``, ``--before``) by that file's own
``_claim_statement``: nothing of the committed code is changed.

A scratch database ``tc_claimbench_<hex>`` is created on the server of
``--dsn`` (``$TENANT_CELERY_BENCH_DSN``, else the local ``postgres`` superuser)
and dropped at the end.  :func:`tenant_celery.migrations.upgrade` creates the
transport's tables in three schemas of it, which differ only in their control
table (the controls are read by every claim of the database, so a case with
controls needs tables of its own):

``empty``
    no control row (the common case); queue ``one``: one tenant with 2,000
    ready messages, queue ``hundred``: 100 tenants (``t000`` to ``t099``) with
    20 each;
``controls``
    the same ``hundred`` queue; ``t042`` paused on every queue and ``t057``
    rate-limited on ``hundred`` with a full bucket (1,000 per second, burst
    1,000), which the claims that reach it lock and spend;
``paused``
    queue ``front``: 1,000 paused tenants (``a0000`` to ``a0999``, 2 ready
    messages each) sorting before the 100 tenants of ``hundred`` (20 each),
    and the claims start from the cursor ``''``, so each passes over all
    1,000 paused tenants first: the worst case.

Every claim runs as the transport's ``_in_consumer_transaction`` runs it: one
round trip in pipeline mode, ``BEGIN``, the consumer's transaction-local
settings (``_CONSUMER_SETTINGS``), the claim, prepared by psycopg after its fifth run and
planned once (generic plan), on an autocommit connection; except that it ends
with ``ROLLBACK`` instead of ``COMMIT``, so the queues and buckets are the
same at every claim.  The claims of ``empty`` and ``controls`` move their
cursor as the transport does (after the last tenant served); those of
``paused`` keep ``''``.  A claim's time is the client's wall time of that
round trip and of fetching its rows: server and client together.

The variants of a case run on one connection, alternating in blocks of
``--block`` claims (A B, B A, ...) after a warm-up of their own; each pair of
blocks gives the ratio of their medians, and the case reports the median claim
time of each variant, the median of the pair ratios and their lowest and
highest.  ``controls/empty, old`` times the claim without controls on both
copies of the queue: what two copies of the same table differ by, the noise
floor of ``controls/empty, new``.  The headline case (no control row, 100
tenants, 10 messages a claim) runs ``--headline-repeats`` times.  Then
``EXPLAIN (ANALYZE, BUFFERS)`` runs each statement's prepared, generic plan in
cases 1, 2 and 3 (in a transaction rolled back) for the buffers it touches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tenant_celery import transport as current
from tenant_celery.migrations import upgrade

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
BEFORE = "716d78d^"
"""The commit whose claim statement is the baseline: the parent of the tenant controls."""
TRANSPORT_PATH = "src/tenant_celery/transport.py"
SCHEMAS = ("empty", "controls", "paused")
PAYLOAD_BYTES = 600
"""Size of each message's payload (a small kombu message)."""
HUNDRED = [f"t{i:03d}" for i in range(100)]
PAUSED_FRONT = [f"a{i:04d}" for i in range(1000)]
PAUSED = "t042"
LIMITED = "t057"


# ------------------------------------------------------------------- the statements


def _module_before(revision: str) -> types.ModuleType:
    """``transport.py`` as it was at ``revision``, loaded as a module of the package
    (its relative imports resolve against the current package)."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{revision}:{TRANSPORT_PATH}"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("tenant_celery._transport_before_controls")
    module.__package__ = "tenant_celery"
    exec(compile(source, f"{revision}:{TRANSPORT_PATH}", "exec"), module.__dict__)
    return module


def claim_text(
    module: types.ModuleType, schema: str, conn: psycopg.Connection[Any], controlled: bool
) -> str:
    """The claim (``take=False``) of ``module``, its tables in ``schema``, as the
    transport renders it; of the current module, the claim that obeys the controls
    (``controlled``), which the transport runs while the control table has a row,
    or the one it runs while the table is empty."""
    settings = module._Settings({"schema": schema})
    if module is current:
        template = module._claim_statement(settings, take=False, controlled=controlled)
    else:
        template = module._claim_statement(settings, take=False)
    return str(module._sql(template, settings).as_string(conn))


# ------------------------------------------------------------------------ the data


def _payload() -> str:
    body = {"body": "x" * (PAYLOAD_BYTES - 200), "properties": {"delivery_info": {}}}
    return json.dumps(body)


def _fill(conn: psycopg.Connection[Any], schema: str, queue: str, counts: dict[str, int]) -> None:
    """``counts[tenant]`` ready messages per tenant, published turn by turn."""
    rows = []
    left = dict(counts)
    while left:
        for tenant in list(left):
            rows.append((queue, tenant))
            left[tenant] -= 1
            if not left[tenant]:
                del left[tenant]
    table = sql.Identifier(schema, current.MESSAGE_TABLE)
    payload = _payload()
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} (queue, tenant, payload, visible_at)"
                " VALUES (%s, %s, %s, now() - interval '1 minute')"
            ).format(table),
            [(q, t, payload) for q, t in rows],
        )


def build(url: str, conn: psycopg.Connection[Any]) -> None:
    for schema in SCHEMAS:
        upgrade(url, schema=schema)
    _fill(conn, "empty", "one", {"t000": 2000})
    _fill(conn, "empty", "hundred", dict.fromkeys(HUNDRED, 20))
    _fill(conn, "controls", "hundred", dict.fromkeys(HUNDRED, 20))
    front = dict.fromkeys(PAUSED_FRONT, 2)
    front.update(dict.fromkeys(HUNDRED, 20))
    _fill(conn, "paused", "front", front)
    control = sql.Identifier("controls", current.CONTROL_TABLE)
    conn.execute(
        sql.SQL("INSERT INTO {} (tenant, queue, paused) VALUES (%s, '', true)").format(control),
        (PAUSED,),
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (tenant, queue, rate, burst, tokens, refilled_at)"
            " VALUES (%s, 'hundred', 1000, 1000, 1000, now())"
        ).format(control),
        (LIMITED,),
    )
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL("INSERT INTO {} (tenant, queue, paused) VALUES (%s, '', true)").format(
                sql.Identifier("paused", current.CONTROL_TABLE)
            ),
            [(t,) for t in PAUSED_FRONT],
        )
    for schema in SCHEMAS:
        for table in (current.MESSAGE_TABLE, current.CONTROL_TABLE):
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(schema, table)))


# ---------------------------------------------------------------------- the claims


@dataclass
class Variant:
    """One statement on one queue, with its own cursor."""

    label: str
    text: str
    queue: str
    moving_cursor: bool
    cursor: str = ""
    times: list[float] = field(default_factory=list)
    blocks: list[float] = field(default_factory=list)
    tenants: set[str] = field(default_factory=set)

    @property
    def statement(self) -> bytes:
        return self.text.encode()


def claim(conn: psycopg.Connection[Any], variant: Variant, n: int, lease: str) -> float:
    """One claim as the transport's consumer runs it, rolled back; its seconds."""
    params = {
        "queue": variant.queue,
        "n": n,
        "cursor": variant.cursor,
        "lease": lease,
        "lease_seconds": 60.0,
        "acks": [],
    }
    started = time.perf_counter()
    with conn.pipeline():
        for setting in current._CONSUMER_TRANSACTION:
            conn.execute(setting)
        cur = conn.execute(variant.statement, params)
        conn.execute(b"ROLLBACK")
    rows = cur.fetchall()
    elapsed = time.perf_counter() - started
    if rows:
        variant.tenants.update(str(row[1]) for row in rows)
        if variant.moving_cursor:
            variant.cursor = str(max(rows, key=lambda row: row[4])[1])
    return elapsed


@dataclass
class Result:
    case: str
    variants: list[Variant]
    claims: int

    def median_us(self, index: int) -> float:
        return statistics.median(self.variants[index].times) * 1e6

    def pairs(self, index: int, baseline: int) -> list[float]:
        mine, base = self.variants[index].blocks, self.variants[baseline].blocks
        return [m / b for m, b in zip(mine, base, strict=True)]


def compare(
    conn: psycopg.Connection[Any],
    case: str,
    variants: Sequence[Variant],
    n: int,
    claims: int,
    block: int,
    warmup: int = 50,
) -> Result:
    lease = str(uuid.uuid4())
    for variant in variants:
        for _ in range(warmup):
            claim(conn, variant, n, lease)
        variant.tenants.clear()
    for round_number in range(max(1, claims // block)):
        order = list(variants) if round_number % 2 == 0 else list(reversed(variants))
        for variant in order:
            times = [claim(conn, variant, n, lease) for _ in range(block)]
            variant.times.extend(times)
            variant.blocks.append(statistics.median(times))
    return Result(case, list(variants), claims)


# ----------------------------------------------------------------------- EXPLAIN


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def _execute_prepared(
    conn: psycopg.Connection[Any], text: str, params: dict[str, Any], options: str
) -> list[tuple[Any, ...]]:
    """``EXPLAIN (options) EXECUTE`` of the statement psycopg prepared for ``text`` on
    ``conn`` (its generic plan), under the consumer's settings, rolled back."""
    names = list(dict.fromkeys(_PLACEHOLDER.findall(text)))
    converted = _PLACEHOLDER.sub(lambda m: f"${names.index(m.group(1)) + 1}", text)
    row = conn.execute(
        "SELECT name, parameter_types::text[] FROM pg_prepared_statements WHERE statement = %s",
        (converted,),
    ).fetchone()
    if row is None:
        raise RuntimeError("the claim is not prepared on this connection")
    name, types_ = row
    args = sql.SQL(", ").join(
        sql.SQL("{}::{}").format(sql.Literal(params[p]), sql.SQL(t))
        for p, t in zip(names, types_, strict=True)
    )
    query = sql.SQL("EXPLAIN ({}) EXECUTE {}({})").format(
        sql.SQL(options), sql.Identifier(name), args
    )
    conn.execute(b"BEGIN")
    try:
        conn.execute(current._CONSUMER_SETTINGS)
        return conn.execute(query).fetchall()
    finally:
        conn.execute(b"ROLLBACK")


def explain(conn: psycopg.Connection[Any], text: str, params: dict[str, Any]) -> dict[str, Any]:
    """The buffers and execution time of one claim, from ``EXPLAIN (ANALYZE, BUFFERS)``."""
    plan = _execute_prepared(conn, text, params, "ANALYZE, BUFFERS, FORMAT JSON")[0][0][0]
    top = plan["Plan"]
    return {
        "hit": top.get("Shared Hit Blocks", 0),
        "read": top.get("Shared Read Blocks", 0),
        "dirtied": top.get("Shared Dirtied Blocks", 0),
        "ms": plan.get("Execution Time"),
        "planning_hit": plan.get("Planning", {}).get("Shared Hit Blocks", 0),
    }


def explain_text(conn: psycopg.Connection[Any], text: str, params: dict[str, Any]) -> str:
    """The same plan as text (for ``--plans``)."""
    rows = _execute_prepared(conn, text, params, "ANALYZE, BUFFERS")
    return "\n".join(str(r[0]) for r in rows)


# --------------------------------------------------------------------------- run


@contextlib.contextmanager
def scratch_database(dsn: str) -> Iterator[str]:
    name = f"tc_claimbench_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(dsn, dbname=name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _url(conninfo: str) -> str:
    """A ``postgresql://`` URL for the migrations from libpq keywords."""
    parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    auth = str(parts.get("user", "postgres"))
    if parts.get("password"):
        auth += f":{parts['password']}"
    host = parts.get("host", "127.0.0.1")
    port = parts.get("port", 5432)
    return f"postgresql://{auth}@{host}:{port}/{parts['dbname']}"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _fmt_ratio(values: Sequence[float]) -> tuple[str, str]:
    return f"{statistics.median(values):.3f}", f"{min(values):.3f} to {max(values):.3f}"


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0915 (one run, in order)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.claim_controls")
    parser.add_argument(
        "--dsn", default=os.environ.get("TENANT_CELERY_BENCH_DSN", DEFAULT_DSN),
        help="superuser DSN of the server (the scratch database is created there)",
    )  # fmt: skip
    parser.add_argument("--before", default=BEFORE, help="commit of the baseline claim")
    parser.add_argument("--claims", type=int, default=2000, help="timed claims per variant")
    parser.add_argument("--block", type=int, default=50, help="claims per alternating block")
    parser.add_argument("--headline-repeats", type=int, default=3)
    parser.add_argument("--plans", type=Path, help="write the EXPLAIN texts to this file")
    args = parser.parse_args(argv)

    before = _module_before(args.before)
    print(f"load before: {_load()}", flush=True)
    results: list[tuple[Result, list[tuple[str, int, int]]]] = []
    buffers: list[tuple[str, str, dict[str, Any]]] = []
    plans: list[str] = []
    with scratch_database(args.dsn) as conninfo:
        with psycopg.connect(conninfo, autocommit=True) as setup:
            build(_url(conninfo), setup)
        with psycopg.connect(
            conninfo, autocommit=True, application_name="tenant-celery-claimbench"
        ) as conn:
            # "new": what the transport runs on that schema (the plain claim while the
            # control table is empty); "obeying": the claim that obeys the controls.
            texts = {
                (which, schema): claim_text(module, schema, conn, schema != "empty")
                for which, module in (("old", before), ("new", current))
                for schema in SCHEMAS
            }
            texts["obeying", "empty"] = claim_text(current, "empty", conn, True)

            def variant(which: str, schema: str, queue: str, moving: bool = True) -> Variant:
                return Variant(f"{which}@{schema}", texts[which, schema], queue, moving)

            def run(case: str, n: int, variants: list[Variant], pairs: list[tuple[str, int, int]]):
                print(f"{case}, n={n} ...", flush=True)
                result = compare(conn, f"{case}, n={n}", variants, n, args.claims, args.block)
                results.append((result, pairs))
                return result

            for n in (1, 10):
                for queue, label in (("one", "1 tenant"), ("hundred", "100 tenants")):
                    repeats = args.headline_repeats if (queue, n) == ("hundred", 10) else 1
                    for r in range(repeats):
                        tag = f" (run {r + 1})" if repeats > 1 else ""
                        run(
                            f"1: no control row, {label}{tag}",
                            n,
                            [
                                variant("old", "empty", queue),
                                variant("new", "empty", queue),
                                variant("obeying", "empty", queue),
                            ],
                            [("new/old", 1, 0), ("obeying/old", 2, 0)],
                        )
            for n in (1, 10):
                result = run(
                    "2: 1 paused + 1 rate-limited of 100 tenants",
                    n,
                    [
                        variant("new", "empty", "hundred"),
                        variant("new", "controls", "hundred"),
                        variant("old", "empty", "hundred"),
                        variant("old", "controls", "hundred"),
                    ],
                    [("controls/empty, new", 1, 0), ("controls/empty, old", 3, 2)],
                )
                taken = result.variants[1].tenants
                assert PAUSED not in taken, "a paused tenant was claimed"
                assert LIMITED in taken, "the rate-limited tenant was never reached"
            for n in (1, 10):
                result = run(
                    "3: 1,000 paused tenants before the cursor",
                    n,
                    [
                        variant("old", "paused", "front", moving=False),
                        variant("new", "paused", "front", moving=False),
                    ],
                    [("new/old", 1, 0)],
                )
                assert all(t.startswith("a") for t in result.variants[0].tenants)
                assert result.variants[1].tenants <= set(HUNDRED), "a paused tenant was claimed"

            lease = str(uuid.uuid4())
            for case, schema, queue, n in (
                ("1: no control row, 1 tenant", "empty", "one", 10),
                ("1: no control row, 100 tenants", "empty", "hundred", 1),
                ("1: no control row, 100 tenants", "empty", "hundred", 10),
                ("2: 1 paused + 1 rate-limited", "controls", "hundred", 10),
                ("3: 1,000 paused before the cursor", "paused", "front", 1),
                ("3: 1,000 paused before the cursor", "paused", "front", 10),
            ):
                params = {
                    "queue": queue, "n": n, "cursor": "", "lease": lease,
                    "lease_seconds": 60.0, "acks": [],
                }  # fmt: skip
                for which in ("old", "new"):
                    text = texts[which, schema]
                    buffers.append((f"{case}, n={n}", which, explain(conn, text, params)))
                    if args.plans:
                        plans.append(
                            f"-- {which}: {case}, n={n}\n" + explain_text(conn, text, params)
                        )
    print(f"load after: {_load()}", flush=True)

    print("\n| case | ratio of | baseline µs | measured µs | ratio (median of pairs) | spread |")
    print("|---|---|---:|---:|---:|---|")
    for result, pairs in results:
        for label, index, baseline in pairs:
            median_ratio, spread = _fmt_ratio(result.pairs(index, baseline))
            print(
                f"| {result.case} | {label} | {result.median_us(baseline):.0f} |"
                f" {result.median_us(index):.0f} | {median_ratio} | {spread} |"
            )
    print(
        f"\n{args.claims} claims per variant and case, blocks of {args.block};"
        " median claim times (server and client); each ratio the measured variant's"
        " block median over the baseline's, block pair by block pair."
    )
    print("\n| EXPLAIN (ANALYZE, BUFFERS), cursor '' | stmt | shared hit | read | dirtied |"
          " planning hit | execution ms |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for case, which, b in buffers:
        print(
            f"| {case} | {which} | {b['hit']} | {b['read']} | {b['dirtied']} |"
            f" {b['planning_hit']} | {b['ms']:.3f} |"
        )
    if args.plans:
        args.plans.write_text("\n\n".join(plans) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
