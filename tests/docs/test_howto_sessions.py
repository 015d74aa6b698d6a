"""docs/howto/sessions.md, as the unprivileged app role on a real database.

The prelude creates the page's tables as their owner, each under the tenant
policy of ``tenant_celery.rls``, and grants them to ``app_user``.  The worker
module of "In a Celery worker" (the page's two blocks, plus the rig's broker
settings) runs in a real ``celery worker``.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import types
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from tenant_celery import (
    ConfigurationError,
    TenantContextMissing,
    TransactionRequired,
    current_tenant,
    tenant_context,
    tenant_session,
)
from tenant_celery.rls import enable_tenant_rls, grant_tenant_tables
from tests._rig.postgres import APP_ROLE, Database, render
from tests._rig.worker import WorkerFactory
from tests.docs.blocks import Block
from tests.docs.harness import PageRun, Substitutions

PAGE = "howto/sessions.md"
TENANT = "0b7e4c1a-5a43-4f5e-9d1c-2f6a1c9e7b10"
OTHER = str(uuid.UUID(int=7))
WORKER_MODULE = "docs_sessions_worker"

# Appended to the page's worker module: the rig's broker, result backend and queue.
WORKER_SUFFIX = """

# -- added by the docs test: the test rig's broker, result backend and queue
from tests._rig.appconf import apply_test_config

apply_test_config(app)
"""


def create_tables(database: Database) -> None:
    """The page's tables, owned by the superuser, under the tenant policy."""
    from shop.models import Base  # noqa: PLC0415  (written by the page run)

    admin = database.admin_engine()
    Base.metadata.create_all(admin)
    with admin.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE notes (tenant_id uuid NOT NULL, body text)")
        for table in ("invoices", "notes"):
            enable_tenant_rls(conn, table)
        grant_tenant_tables(conn, APP_ROLE, ["invoices", "notes"])


def scalar(database: Database, query: str, **params: object) -> object:
    with database.admin_engine().connect() as conn:
        return conn.execute(sa.text(query), params).scalar_one()


@pytest.mark.worker
def test_page(tmp_path: Path, database: Database, start_worker: WorkerFactory) -> None:
    substitutions = Substitutions()
    substitutions.add("postgresql+psycopg://app_user@db/shop", render(database.app_url))
    run = PageRun(PAGE, tmp_path, substitutions=substitutions)
    ns = run.namespace

    @run.on("python", "# shop/models.py")
    def model(block: Block) -> None:
        create_tables(database)

    @run.on("python", 'engine = create_engine("postgresql+psycopg://app_user@db/shop")\ntenant_id')
    def own_transaction(block: Block) -> None:
        with database.admin_engine().begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO invoices (tenant_id, number, total, paid, closed)"
                    " VALUES (:t, 'B-1', 5, false, false)"
                ),
                {"t": OTHER},
            )
        run.exec(block)
        assert ns["invoices"] == [], "another tenant's row is visible"
        with ns["engine"].connect() as conn, pytest.raises(TransactionRequired):
            ns["set_tenant_guc"](conn, TENANT)

    @run.on("python", "    set_tenant_guc(conn)\n")
    def from_the_context(block: Block) -> None:
        run.exec(block)

    @run.on("python", 'Invoice(number="A-17", total=120)')
    def with_a_session(block: Block) -> None:
        run.exec(block)
        owner = scalar(database, "SELECT tenant_id::text FROM invoices WHERE number = 'A-17'")
        assert owner == TENANT

    @run.on("python", "with tenant_session(session_factory, tenant_id) as session:")
    def one_unit_of_work(block: Block) -> None:
        run.exec(block)
        assert scalar(database, "SELECT paid FROM invoices WHERE number = 'A-17'") is True
        with pytest.raises(TenantContextMissing), tenant_session(ns["session_factory"]):
            pass

    @run.on("python", "bind_tenant_guc(engine, strict=True)\n\nwith tenant_context")
    def every_transaction(block: Block) -> None:
        run.exec(block)
        assert [row.total for row in ns["invoices"]] == [120]
        with pytest.raises(TenantContextMissing), ns["engine"].begin() as conn:
            conn.execute(sa.text("SELECT 1"))

    @run.on("python", "unbind = bind_tenant_guc(reporting)")
    def unbinding(block: Block) -> None:
        run.exec(block)
        query = sa.text("SELECT current_setting('app.current_tenant_id', true)")
        reporting = ns["reporting"]
        with tenant_context(TENANT), reporting.begin() as conn:
            assert conn.execute(query).scalar_one() in (None, ""), "still bound"
        unbind = ns["bind_tenant_guc"](reporting)  # not a no-op: the first hook is gone
        with tenant_context(TENANT), reporting.begin() as conn:
            assert conn.execute(query).scalar_one() == TENANT
        unbind()
        with pytest.raises(ConfigurationError):  # bound with other options: unbind first
            ns["bind_tenant_guc"](ns["engine"])

    @run.on("python", "def add_note(body: str) -> int:")
    def worker_engine(block: Block) -> None:
        run.exec(block)

    @run.on("python", "def close_invoice(number: str) -> None:")
    def worker_sessions(block: Block) -> None:
        run.exec(block)
        module = run.source(run.block("python", "def add_note")) + "\n" + run.source(block)
        (tmp_path / f"{WORKER_MODULE}.py").write_text(module + WORKER_SUFFIX)
        worker = start_worker(
            WORKER_MODULE,
            broker="redis",
            backend="redis",
            pool="prefork",
            extra_env={"PYTHONPATH": f"{tmp_path}:{Path.cwd()}"},
        )
        shop = importlib.import_module(WORKER_MODULE)
        with worker.bind(shop.app):
            with tenant_context(TENANT):
                assert shop.add_note.delay("first").get(timeout=20) == 1
                assert shop.add_note.delay("second").get(timeout=20) == 2
                shop.close_invoice.delay("A-17").get(timeout=20)
            assert shop.add_note.delay("other's", tenant_id=OTHER).get(timeout=20) == 1
        assert scalar(database, "SELECT closed FROM invoices WHERE number = 'A-17'") is True
        assert scalar(database, "SELECT count(*) FROM notes WHERE tenant_id = :t", t=TENANT) == 2

    @run.on("python", "def list_invoices(request):")
    def web_request(block: Block) -> None:
        run.exec(block)
        request = types.SimpleNamespace(user=types.SimpleNamespace(tenant_id=TENANT))
        assert [invoice.number for invoice in ns["list_invoices"](request)] == ["A-17"]

    @run.on("python", "def tenant_middleware(get_response):")
    def middleware(block: Block) -> None:
        run.exec(block)
        query = sa.text("SELECT count(*) FROM invoices")

        def view(request: object) -> tuple[str | None, int]:
            with ns["engine"]().begin() as conn:  # the worker section's bound engine
                return current_tenant(), conn.execute(query).scalar_one()

        handle = ns["tenant_middleware"](view)
        user = types.SimpleNamespace(is_authenticated=True, tenant_id=TENANT)
        assert handle(types.SimpleNamespace(user=user)) == (TENANT, 1)
        anonymous = types.SimpleNamespace(is_authenticated=False)
        with pytest.raises(TenantContextMissing):  # the engine is bound with strict=True
            handle(types.SimpleNamespace(user=anonymous))

    @run.on("python", "async def invoice_totals")
    def asyncio_helpers(block: Block) -> None:
        run.exec(block)

        async def main() -> list[int]:
            await ns["add_invoice"](TENANT, 30)
            totals = await ns["invoice_totals"](TENANT)
            return sorted(totals)

        assert asyncio.run(main()) == [30, 120]

    @run.on("python", "async def count_invoices")
    def asyncio_bound(block: Block) -> None:
        run.exec(block)

        async def main() -> int:
            try:
                with pytest.raises(TenantContextMissing):
                    await ns["count_invoices"]()
                with tenant_context(TENANT):
                    return int(await ns["count_invoices"]())
            finally:
                await ns["engine"].dispose()

        assert asyncio.run(main()) == 2

    @run.on("python", 'app.conf.tenant_celery_guc = "acme.tenant_id"')
    def another_setting(block: Block) -> None:
        run.exec(block)
        query = sa.text("SELECT current_setting('acme.tenant_id', true)")
        with tenant_session(sessionmaker(database.app_engine()), TENANT) as session:
            assert session.execute(query).scalar_one() == TENANT

    @run.on("sql", "CREATE POLICY tenant_isolation ON invoices")
    def policy_reading_it(block: Block) -> None:
        with database.admin_engine().begin() as conn:
            conn.exec_driver_sql(
                "CREATE SCHEMA acme;"
                " CREATE TABLE acme.invoices (tenant_id uuid NOT NULL, total int);"
                " ALTER TABLE acme.invoices ENABLE ROW LEVEL SECURITY;"
                " ALTER TABLE acme.invoices FORCE ROW LEVEL SECURITY;"
                f" GRANT USAGE ON SCHEMA acme TO {APP_ROLE};"
                f" GRANT SELECT, INSERT ON acme.invoices TO {APP_ROLE}"
            )
            conn.exec_driver_sql("SET LOCAL search_path = acme")
            for statement in run.source(block).split(";"):
                if statement.strip():
                    conn.exec_driver_sql(statement)
        insert = sa.text("INSERT INTO acme.invoices VALUES (:t, 1)")
        factory = sessionmaker(database.app_engine())
        with tenant_session(factory, TENANT) as session:
            session.execute(insert, {"t": TENANT})
        with pytest.raises(sa.exc.ProgrammingError), tenant_session(factory, TENANT) as session:
            session.execute(insert, {"t": OTHER})  # WITH CHECK
        with tenant_session(factory, OTHER) as session:
            assert session.execute(sa.text("SELECT count(*) FROM acme.invoices")).scalar() == 0

    try:
        run.run()
    finally:
        sys.modules.pop(WORKER_MODULE, None)
