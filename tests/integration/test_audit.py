"""The audit behind ``tenant-celery check``: how it reads policies, owners and roles."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Connection, Engine

from tenant_celery.audit import audit_database
from tenant_celery.rls import enable_tenant_rls, grant_tenant_tables
from tests._rig.postgres import APP_ROLE


def codes(conn: Connection, role: str = APP_ROLE) -> set[tuple[str | None, str]]:
    report = audit_database(conn, role=role)
    return {(p.table, p.code) for p in report.problems}


@pytest.fixture
def invoices(admin_engine: Engine) -> Iterator[Connection]:
    """A superuser connection on a database with one clean tenant table, inside a
    transaction rolled back afterwards (roles created in it vanish with it)."""
    with admin_engine.connect() as conn:
        transaction = conn.begin()
        conn.exec_driver_sql("CREATE TABLE invoices (tenant_id uuid NOT NULL, total int)")
        conn.exec_driver_sql("CREATE INDEX ON invoices (tenant_id)")
        enable_tenant_rls(conn, "invoices")
        grant_tenant_tables(conn, APP_ROLE, ["invoices"])
        yield conn
        transaction.rollback()


@pytest.fixture
def group_role(invoices: Connection) -> str:
    """A NOLOGIN role created in ``invoices``' transaction, so it is rolled back with it."""
    name = f"tc_group_{secrets.token_hex(4)}"
    invoices.exec_driver_sql(f'CREATE ROLE "{name}"')
    return name


def test_clean_table_has_no_problem(invoices: Connection) -> None:
    report = audit_database(invoices, role=APP_ROLE)
    assert report.clean
    (table,) = report.tables
    assert (table.name, table.tenant_policy, table.tenant_policy_checks) == (
        "public.invoices",
        "tenant_isolation_policy",
        True,
    )


def test_restrictive_and_per_command_tenant_policies_do_not_widen(invoices: Connection) -> None:
    invoices.exec_driver_sql(
        "CREATE POLICY not_archived ON invoices AS RESTRICTIVE USING (total IS NOT NULL)"
    )
    invoices.exec_driver_sql(
        "CREATE POLICY read_own ON invoices FOR SELECT"
        " USING (tenant_id = current_setting('app.current_tenant_id')::uuid)"
    )
    assert codes(invoices) == set()


@pytest.mark.parametrize(
    "using",
    [
        "true",
        "tenant_id = current_setting('app.current_tenant_id')::uuid OR true",
        "tenant_id = COALESCE(NULLIF(current_setting('app.current_tenant_id', true), '')::uuid,"
        " tenant_id)",
        "tenant_id = current_setting('app.other_setting')::uuid",
        "total = current_setting('app.current_tenant_id')::int",
    ],
)
def test_permissive_policy_not_pinned_to_the_tenant_widens(
    invoices: Connection, using: str
) -> None:
    invoices.exec_driver_sql(f"CREATE POLICY extra ON invoices FOR SELECT USING ({using})")
    report = audit_database(invoices, role=APP_ROLE)
    assert {(p.table, p.code) for p in report.problems} == {("public.invoices", "widening_policy")}
    assert report.tables[0].widening_policies == ("extra",)


def test_insert_only_tenant_policy_does_not_widen(invoices: Connection) -> None:
    invoices.exec_driver_sql(
        "CREATE POLICY add_own ON invoices FOR INSERT"
        " WITH CHECK (tenant_id = current_setting('app.current_tenant_id')::uuid AND total > 0)"
    )
    assert codes(invoices) == set()


def test_policy_for_another_role_is_no_policy_for_this_one(
    invoices: Connection, group_role: str
) -> None:
    invoices.exec_driver_sql("DROP POLICY tenant_isolation_policy ON invoices")
    enable_tenant_rls(invoices, "invoices", roles=[group_role], policy_name="for_group")
    assert codes(invoices) == {("public.invoices", "no_tenant_policy")}
    # A member of the policy's role is covered by it.
    invoices.exec_driver_sql(f'GRANT "{group_role}" TO {APP_ROLE}')
    assert codes(invoices) == set()


def test_member_of_the_owner_counts_as_owner(invoices: Connection, group_role: str) -> None:
    invoices.exec_driver_sql(f'ALTER TABLE invoices OWNER TO "{group_role}"')
    invoices.exec_driver_sql(f'GRANT "{group_role}" TO {APP_ROLE}')
    report = audit_database(invoices, role=APP_ROLE)
    assert {(p.table, p.code) for p in report.problems} == {("public.invoices", "role_owns_table")}
    assert f"is a member of its owner '{group_role}'" in report.problems[0].message
    assert report.role.owned_tables == ("public.invoices",)


def test_with_check_reading_something_else_widens_writes(invoices: Connection) -> None:
    invoices.exec_driver_sql("DROP POLICY tenant_isolation_policy ON invoices")
    invoices.exec_driver_sql(
        "CREATE POLICY lax ON invoices"
        " USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true),"
        " '')::uuid)) WITH CHECK (true)"
    )
    assert codes(invoices) == {("public.invoices", "widening_policy")}


def test_superuser_is_one_problem_not_one_per_table(invoices: Connection) -> None:
    superuser = invoices.exec_driver_sql("SELECT current_user").scalar_one()
    found = codes(invoices, role=superuser)
    assert (None, "role_superuser") in found
    assert found <= {(None, "role_superuser"), (None, "role_bypassrls")}  # the bootstrap has both


def test_missing_role_is_a_problem(invoices: Connection) -> None:
    report = audit_database(invoices, role="no_such_role")
    assert {(p.table, p.code) for p in report.problems} == {(None, "role_missing")}
    assert report.tables[0].privileges == ()
