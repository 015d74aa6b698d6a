"""docs/howto/rls.md on a real database: the page's migration applied and reverted in
a host Alembic project, its offline SQL (``alembic ... --sql``, run for real) compared
with the page, the functions, the app role provisioned and checked for isolation, and
``tenant-celery check`` run as the page's console and CI job run it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from alembic import command
from alembic.config import Config

from tenant_celery.rls import (
    disable_tenant_rls,
    enable_tenant_rls,
    enable_tenant_rls_sql,
    grant_tenant_tables,
)
from tests._rig.postgres import APP_ROLE, Database, DatabaseFactory
from tests.docs.blocks import Block
from tests.docs.harness import PageRun, Substitutions, sql_statements
from tests.docs.scratch import alembic_project, libpq, scratch_roles

PAGE = "howto/rls.md"
A, B = str(uuid.UUID(int=1)), str(uuid.UUID(int=2))

# The page's functions take engines it does not create: the rig's, as the owner.
PRELUDE = """
owner_engine = admin_engine = database.admin_engine()
"""

# The second tenant table the page grants: as the page says a tenant table should be.
ORDERS = """
CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tenant_id uuid NOT NULL);
CREATE INDEX orders_tenant ON orders (tenant_id);
"""
SET_TENANT = sa.text("SELECT set_config('app.current_tenant_id', :t, true)")
INSERT = sa.text("INSERT INTO invoices (tenant_id, created_at) VALUES (:t, now())")


def normalized(sql: str) -> list[str]:
    return [" ".join(s.split()) for s, _ in sql_statements(sql)]


def policy(conn: sa.Connection, table: str) -> tuple[object, ...]:
    return tuple(
        conn.execute(
            sa.text(
                "SELECT c.relrowsecurity, c.relforcerowsecurity, p.polname, p.polpermissive,"
                " p.polcmd, pg_get_expr(p.polqual, p.polrelid),"
                " pg_get_expr(p.polwithcheck, p.polrelid)"
                " FROM pg_class c JOIN pg_policy p ON p.polrelid = c.oid"
                " WHERE c.oid = to_regclass(:t)"
            ),
            {"t": table},
        ).one()
    )


def tenants_seen(engine: sa.Engine, tenant: str) -> list[str]:
    with engine.begin() as conn:
        conn.execute(SET_TENANT, {"t": tenant})
        return [str(t) for t in conn.execute(sa.text("SELECT tenant_id FROM invoices")).scalars()]


def test_page(
    tmp_path: Path,
    database: Database,
    pg_databases: DatabaseFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    admin = database.admin_engine()
    alembic_project(tmp_path, database.url, base="0006")
    with scratch_roles(pg_databases.cluster, [database], "app") as roles:
        role = roles["app"]
        substitutions = Substitutions()
        substitutions.add('"app"', f'"{role}"')
        substitutions.add("--role app", f"--role {role}")
        substitutions.add("postgresql://owner:secret@localhost/app_ci", libpq(database.url))
        run = PageRun(PAGE, tmp_path, prelude=PRELUDE, substitutions=substitutions)
        run.namespace["database"] = database
        run.shell.env["DATABASE_URL"] = libpq(database.url)
        monkeypatch.setenv("APP_DB_PASSWORD", "a-password")

        @run.on("python", "# migrations/versions/0007_invoices_rls.py")
        def migration(block: Block) -> None:
            config = Config(str(tmp_path / "alembic.ini"))
            command.upgrade(config, "head")
            with admin.begin() as conn:
                assert policy(conn, "invoices")[:2] == (True, True)
                conn.execute(INSERT, [{"t": A}, {"t": A}, {"t": B}])
                grant_tenant_tables(conn, APP_ROLE, ["invoices"])
            assert tenants_seen(database.app_engine(), A) == [A, A]
            assert tenants_seen(database.app_engine(), "") == []
            command.downgrade(config, "0006")
            with admin.connect() as conn:
                assert conn.execute(sa.text("SELECT to_regclass('invoices')")).scalar() is None
            command.upgrade(config, "head")

        @run.on("sql", "ALTER TABLE invoices ENABLE ROW LEVEL SECURITY;")
        def the_statements(block: Block) -> None:
            assert normalized(block.source) == normalized(
                ";\n".join(enable_tenant_rls_sql("invoices", column_type="uuid")) + ";"
            )
            # Run as written on a copy of the table: the same policy as the operation's.
            with admin.begin() as conn:
                conn.exec_driver_sql("CREATE SCHEMA copy")
                conn.exec_driver_sql("CREATE TABLE copy.invoices (LIKE public.invoices)")
                conn.exec_driver_sql("SET LOCAL search_path = copy")
                for statement, _ in sql_statements(run.source(block)):
                    conn.exec_driver_sql(statement)
                assert policy(conn, "copy.invoices") == policy(conn, "public.invoices")
                conn.exec_driver_sql("DROP SCHEMA copy CASCADE")

        @run.on("console", "alembic upgrade 0006:0007 --sql")
        def offline(block: Block) -> None:
            run.shell.run_block(block)

        @run.on("python", 'enable_tenant_rls(conn, "invoices")')
        def without_alembic(block: Block) -> None:
            with admin.begin() as conn:  # the page's migration enabled it: start over
                disable_tenant_rls(conn, "invoices")
            run.exec(block)
            with admin.connect() as conn:
                assert policy(conn, "invoices")[:3] == (True, True, "tenant_isolation_policy")

        @run.on("python", "enable_tenant_rls_sql(")
        def as_text(block: Block) -> None:
            capsys.readouterr()
            run.exec(block)
            printed = capsys.readouterr().out
            assert normalized(printed) == normalized(run.block("sql", "ENABLE ROW").source)

        @run.on("python", "create_app_role(conn")
        def provision(block: Block) -> None:
            with admin.begin() as conn:
                conn.exec_driver_sql(ORDERS)
                enable_tenant_rls(conn, "orders")
            run.exec(block)
            url = database.url.set(username=role, password="a-password")
            engine = database.engine(url, poolclass=sa.NullPool)
            with engine.begin() as conn:
                conn.execute(SET_TENANT, {"t": B})
                conn.execute(INSERT, {"t": B})
            assert tenants_seen(engine, B) == [B]
            assert tenants_seen(engine, A) == []
            with engine.begin() as conn, pytest.raises(sa.exc.ProgrammingError):
                conn.exec_driver_sql("TRUNCATE invoices")

        @run.on("yaml", "tenant-celery check --role app --json")
        def ci_job(block: Block) -> None:
            steps = yaml.safe_load(run.source(block))
            for step in steps:
                env = {**run.shell.env, **step.get("env", {})}
                saved, run.shell.env = run.shell.env, env
                try:
                    done = run.shell.execute(step["run"])
                finally:
                    run.shell.env = saved
                assert done.returncode == 0, f"{step['run']}: {done.stdout}{done.stderr}"
            report = json.loads((tmp_path / "rls-report.json").read_text())
            assert report["problems"] == [], report

        run.run()
