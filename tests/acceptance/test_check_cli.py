"""``tenant-celery check`` run as a user runs it: a subprocess against a live database."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Connection, Engine

from tenant_celery.migrations import upgrade
from tenant_celery.rls import enable_tenant_rls, grant_tenant_tables
from tests._rig.postgres import APP_ROLE, Database, DatabaseFactory, render

ROOT = Path(__file__).resolve().parents[2]


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tenant_celery.cli check ARGS`` with a clean tenant-celery environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TENANT_CELERY_")}
    return subprocess.run(
        [sys.executable, "-m", "tenant_celery.cli", "check", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**base, **(env or {})},
        check=False,
    )


def tenant_table(conn: Connection, name: str, role: str, *, index: bool = True) -> None:
    """A table set up the way the how-to says: RLS on and forced, tenant index, grants."""
    conn.exec_driver_sql(
        f"CREATE TABLE {name} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " tenant_id uuid NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
    )
    if index:
        conn.exec_driver_sql(f"CREATE INDEX ON {name} (tenant_id, created_at)")
    enable_tenant_rls(conn, name)
    grant_tenant_tables(conn, role, [name])


@pytest.fixture
def bypass_role(database: Database, pg_databases: DatabaseFactory) -> Iterator[str]:
    """A BYPASSRLS role unique to this test, dropped (with what it owns) afterwards."""
    name = f"tc_check_{secrets.token_hex(4)}"
    with pg_databases.cluster.connect() as conn:
        conn.execute(f'CREATE ROLE "{name}" BYPASSRLS')
    yield name
    with pg_databases.cluster.connect(database.name) as conn:
        conn.execute(f'REASSIGN OWNED BY "{name}" TO CURRENT_USER')
        conn.execute(f'DROP OWNED BY "{name}"')
    with pg_databases.cluster.connect() as conn:
        conn.execute(f'DROP ROLE "{name}"')


EXPECTED_HOLES = {
    ("public.rls_off", "rls_disabled"),
    ("public.not_forced", "rls_not_forced"),
    ("public.no_policy", "no_tenant_policy"),
    ("public.no_check", "policy_without_check"),
    ("public.widened", "widening_policy"),
    ("public.owned", "role_owns_table"),
    ("public.no_index", "no_tenant_index"),
    ("public.truncatable", "truncate_granted"),
    (None, "role_bypassrls"),
}


def seed_holes(conn: Connection, role: str) -> None:
    for name in (
        "clean",
        "rls_off",
        "not_forced",
        "no_policy",
        "no_check",
        "widened",
        "owned",
        "truncatable",
    ):
        tenant_table(conn, name, role)
    tenant_table(conn, "no_index", role, index=False)
    conn.exec_driver_sql("CREATE TABLE not_a_tenant_table (id int)")  # ignored
    conn.exec_driver_sql("ALTER TABLE rls_off DISABLE ROW LEVEL SECURITY")
    conn.exec_driver_sql("ALTER TABLE not_forced NO FORCE ROW LEVEL SECURITY")
    conn.exec_driver_sql("DROP POLICY tenant_isolation_policy ON no_policy")
    conn.exec_driver_sql(
        "DROP POLICY tenant_isolation_policy ON no_check;"
        " CREATE POLICY using_only ON no_check FOR ALL"
        " USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true),"
        " '')::uuid))"
    )
    conn.exec_driver_sql("CREATE POLICY everyone_reads ON widened FOR SELECT USING (true)")
    conn.exec_driver_sql(f'ALTER TABLE owned OWNER TO "{role}"')
    conn.exec_driver_sql(f'GRANT TRUNCATE ON truncatable TO "{role}"')


def test_every_kind_of_hole_is_reported(
    database: Database, admin_engine: Engine, bypass_role: str
) -> None:
    with admin_engine.begin() as conn:
        seed_holes(conn, bypass_role)
    url = render(database.url)

    result = check("--url", url, "--role", bypass_role, "--json")
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    found = {(p["table"], p["code"]) for p in document["problems"]}
    assert found == EXPECTED_HOLES
    tables = {t["name"]: t for t in document["tables"]}
    assert set(tables) == {
        "public.clean",
        "public.rls_off",
        "public.not_forced",
        "public.no_policy",
        "public.no_check",
        "public.widened",
        "public.owned",
        "public.no_index",
        "public.truncatable",
    }
    assert tables["public.widened"]["widening_policies"] == ["everyone_reads"]
    assert tables["public.owned"]["role_owns"] is True
    assert document["role"]["owned_tables"] == ["public.owned"]
    assert tables["public.truncatable"]["privileges"] == [
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "TRUNCATE",
    ]

    text = check("--url", url, "--role", bypass_role)
    assert text.returncode == 1, text.stderr
    assert "9 problems:" in text.stdout
    for table, code in EXPECTED_HOLES:
        where = table or f"role {bypass_role}"
        assert any(where in line and f"{code}:" in line for line in text.stdout.splitlines()), (
            table,
            code,
            text.stdout,
        )


def test_clean_database_passes(database: Database, admin_engine: Engine) -> None:
    with admin_engine.begin() as conn:
        tenant_table(conn, "invoices", APP_ROLE)
        tenant_table(conn, "orders", APP_ROLE)
        # Neighbours that show the role nothing of another tenant.
        conn.exec_driver_sql(
            "CREATE TABLE countries (code text PRIMARY KEY);"
            " ALTER TABLE invoices ADD COLUMN country text REFERENCES countries;"
            " CREATE VIEW recent_invoices WITH (security_invoker = true)"
            "  AS SELECT * FROM invoices WHERE created_at > now() - interval '1 day';"
            " CREATE MATERIALIZED VIEW invoice_counts AS SELECT count(*) FROM invoices;"
            " CREATE FUNCTION purge_all() RETURNS void LANGUAGE sql SECURITY DEFINER"
            "  AS 'DELETE FROM invoices';"
            " REVOKE EXECUTE ON FUNCTION purge_all() FROM PUBLIC"
        )
        conn.exec_driver_sql(f"GRANT SELECT ON countries, recent_invoices TO {APP_ROLE}")

    result = check("--url", render(database.url), "--role", APP_ROLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no problems found" in result.stdout
    assert "public.invoices" in result.stdout
    assert "countries" not in result.stdout

    # The role defaults to the one the URL connects as; the URL may come from the environment.
    from_env = check(env={"TENANT_CELERY_DATABASE_URL": render(database.app_url)})
    assert from_env.returncode == 0, from_env.stdout + from_env.stderr
    assert f"role {APP_ROLE}," in from_env.stdout


@pytest.fixture
def checked_role(database: Database, pg_databases: DatabaseFactory) -> Iterator[str]:
    """A plain role unique to this test, whose view the check takes; dropped (with its
    grants and memberships) afterwards."""
    name = f"tc_checked_{secrets.token_hex(4)}"
    with pg_databases.cluster.connect() as conn:
        conn.execute(f'CREATE ROLE "{name}"')
    yield name
    with pg_databases.cluster.connect(database.name) as conn:
        conn.execute(f'DROP OWNED BY "{name}"')
    with pg_databases.cluster.connect() as conn:
        conn.execute(f'DROP ROLE "{name}"')


# Each way around the policies, as SQL run by the superuser after an invoices table
# set up as the how-to says; {role} is the checked role, {bypass} a BYPASSRLS role.
AROUND_THE_TABLES = {
    (None, "bypassing_membership"): 'GRANT "{bypass}" TO "{role}"',
    ("public.invoice_totals", "exposed_matview"): (
        "CREATE MATERIALIZED VIEW invoice_totals AS SELECT tenant_id, id FROM invoices;"
        ' GRANT SELECT ON invoice_totals TO "{role}"'
    ),
    ("public.all_invoices", "bypassing_view"): (
        "CREATE VIEW all_invoices AS SELECT * FROM invoices;"
        ' GRANT SELECT ON all_invoices TO "{role}"'
    ),
    ("public.invoice_lines", "unprotected_child_table"): (
        "CREATE TABLE invoice_lines (invoice_id bigint REFERENCES invoices, amount int);"
        ' GRANT SELECT ON invoice_lines TO "{role}"'
    ),
    ("public.invoice_sum()", "bypassing_definer_function"): (
        "CREATE FUNCTION invoice_sum() RETURNS bigint LANGUAGE sql SECURITY DEFINER"
        " AS 'SELECT count(*) FROM invoices'"
    ),
}


@pytest.mark.parametrize("hole", sorted(AROUND_THE_TABLES, key=lambda h: h[1]), ids=lambda h: h[1])
def test_each_hole_around_the_tables_fails_the_check(
    database: Database,
    admin_engine: Engine,
    checked_role: str,
    bypass_role: str,
    hole: tuple[str | None, str],
) -> None:
    with admin_engine.begin() as conn:
        tenant_table(conn, "invoices", checked_role)
    url = render(database.url)
    assert check("--url", url, "--role", checked_role).returncode == 0
    with admin_engine.begin() as conn:
        conn.exec_driver_sql(AROUND_THE_TABLES[hole].format(role=checked_role, bypass=bypass_role))

    result = check("--url", url, "--role", checked_role, "--json")
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert [(p["table"], p["code"]) for p in document["problems"]] == [hole]


def test_holes_around_the_tables_are_reported_together(
    database: Database, admin_engine: Engine, checked_role: str, bypass_role: str
) -> None:
    with admin_engine.begin() as conn:
        tenant_table(conn, "invoices", checked_role)
        for statement in AROUND_THE_TABLES.values():
            conn.exec_driver_sql(statement.format(role=checked_role, bypass=bypass_role))
    url = render(database.url)

    result = check("--url", url, "--role", checked_role, "--json")
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert {(p["table"], p["code"]) for p in document["problems"]} == set(AROUND_THE_TABLES)
    assert document["role"]["bypassing_roles"] == [bypass_role]

    text = check("--url", url, "--role", checked_role)
    assert text.returncode == 1, text.stderr
    assert f"can become {bypass_role}" in text.stdout
    assert "5 problems:" in text.stdout
    for table, code in AROUND_THE_TABLES:
        where = table or f"role {checked_role}"
        assert any(where in line and f"{code}:" in line for line in text.stdout.splitlines()), (
            table,
            code,
            text.stdout,
        )


def test_json_document_shape(database: Database, admin_engine: Engine) -> None:
    with admin_engine.begin() as conn:
        tenant_table(conn, "invoices", APP_ROLE)

    result = check("--url", render(database.url), "--role", APP_ROLE, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document == {
        "clean": True,
        "setting": "app.current_tenant_id",
        "column": "tenant_id",
        "schema": None,
        "role": {
            "name": APP_ROLE,
            "exists": True,
            "superuser": False,
            "bypassrls": False,
            "owned_tables": [],
            "bypassing_roles": [],
        },
        "tables": [
            {
                "name": "public.invoices",
                "schema": "public",
                "table": "invoices",
                "column_type": "uuid",
                "owner": document["tables"][0]["owner"],
                "rls_enabled": True,
                "rls_forced": True,
                "tenant_policy": "tenant_isolation_policy",
                "tenant_policy_checks": True,
                "widening_policies": [],
                "tenant_indexes": ["invoices_tenant_id_created_at_idx"],
                "role_owns": False,
                "privileges": ["SELECT", "INSERT", "UPDATE", "DELETE"],
            }
        ],
        "problems": [],
        "results_outside_policy": [],
    }


def test_result_tables_outside_the_policy_are_named_not_failed(
    database: Database, admin_engine: Engine
) -> None:
    upgrade(database.url, grant_to=[APP_ROLE])
    with admin_engine.begin() as conn:
        tenant_table(conn, "invoices", APP_ROLE)

    text = check("--url", render(database.url), "--role", APP_ROLE)
    assert text.returncode == 0, text.stdout + text.stderr
    assert (
        "results outside the tenant policy (an opt-in): "
        "public.celery_taskmeta, public.celery_tasksetmeta\n"
    ) in text.stdout
    assert text.stdout.endswith("no problems found\n")

    with admin_engine.begin() as conn:
        for table in ("celery_taskmeta", "celery_tasksetmeta"):
            enable_tenant_rls(conn, table)
    text = check("--url", render(database.url), "--role", APP_ROLE)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "results outside" not in text.stdout
    assert "public.celery_taskmeta" in text.stdout


def test_other_setting_column_and_schema(database: Database, admin_engine: Engine) -> None:
    with admin_engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA crm")
        conn.exec_driver_sql("CREATE TABLE crm.leads (org_id bigint NOT NULL)")
        conn.exec_driver_sql("CREATE INDEX ON crm.leads (org_id)")
        enable_tenant_rls(conn, "leads", schema="crm", column="org_id", setting="crm.org")
        tenant_table(conn, "invoices", APP_ROLE)  # other schema, other column: not looked at

    url = render(database.url)
    args = ["--url", url, "--role", APP_ROLE, "--schema", "crm", "--column", "org_id"]
    assert check(*args, "--setting", "crm.org").returncode == 0
    # Policies on another setting are no tenant policy for this one; the env names the default.
    wrong = check(*args, env={"TENANT_CELERY_GUC": "crm.other"})
    assert wrong.returncode == 1
    assert "no_tenant_policy" in wrong.stdout
    # A column no table has is a failure too: a typo must not pass.
    typo = check("--url", url, "--column", "tenant")
    assert typo.returncode == 1
    assert "no_tenant_tables" in typo.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--url", "postgresql://someone:s3cret-pw@127.0.0.1:1/nowhere"],
            "cannot inspect postgresql+psycopg://someone:***@127.0.0.1:1/nowhere: ",
        ),
        (["--url", "not a url s3cret-pw"], "cannot parse the database URL"),
        (["--url", "mysql://u:s3cret-pw@localhost/x"], "expected a PostgreSQL URL"),
        (["--url", "postgresql+nosuch://u:s3cret-pw@localhost/x"], "cannot use database URL"),
        ([], "no database URL: pass --url or set TENANT_CELERY_DATABASE_URL"),
        (["--url", "postgresql:///x", "--setting", "bad-name"], "must look like 'prefix.name'"),
    ],
)
def test_usage_and_connection_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = check(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tenant-celery check: error: ")
    assert message in lines[0]
    assert "s3cret-pw" not in result.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "tenant-celery"
    if not script.exists():
        pytest.fail(f"{script} missing: reinstall the package (pip install -e .)")
    result = subprocess.run(
        [str(script), "check", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    for option in ("--url", "--role", "--column", "--setting", "--schema", "--json"):
        assert option in result.stdout


def test_a_database_that_does_not_exist_exits_2(database: Database) -> None:
    missing = f"tc_missing_{secrets.token_hex(4)}"
    result = check("--url", render(database.url.set(database=missing)))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tenant-celery check: error: cannot inspect ")
    assert f'database "{missing}" does not exist' in lines[0]


def test_unknown_arguments_are_reported_with_the_subcommands_usage() -> None:
    result = check("--url", "postgresql:///x", "--frobnicate")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: tenant-celery check ")
    assert result.stderr.splitlines()[-1] == (
        "tenant-celery check: error: unrecognized arguments: --frobnicate"
    )
    assert "Traceback" not in result.stderr


def test_version() -> None:
    from tenant_celery import __version__  # noqa: PLC0415

    result = subprocess.run(
        [sys.executable, "-m", "tenant_celery.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"tenant-celery {__version__}\n",
        "",
    )


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A listening TCP socket that never answers: a client connecting to it waits."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(60)
        yield sock


def test_interrupted_exits_130(silent_server: socket.socket) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TENANT_CELERY_")}
    port = silent_server.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "tenant_celery.cli", "check", "--url",
         f"postgresql://u@127.0.0.1:{port}/x?connect_timeout=60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=base,
    )  # fmt: skip
    connection, _ = silent_server.accept()  # the command is connecting, and waits
    with connection:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130, out + err
    assert err == "tenant-celery check: interrupted\n"
