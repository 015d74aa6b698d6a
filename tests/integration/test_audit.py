"""The audit behind ``tenant-celery check``: how it reads policies, owners and roles.

Each way around the policies is first used as an attacker would: as the app
role, with no tenant set, reading rows of both tenants.  Only then is the
audit asked to report it.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tenant_celery.audit import (
    BYPASSING_DEFINER_FUNCTION,
    BYPASSING_MEMBERSHIP,
    BYPASSING_VIEW,
    EXPOSED_MATVIEW,
    NO_TENANT_POLICY,
    NO_TENANT_TABLES,
    RLS_NOT_FORCED,
    UNPROTECTED_CHILD_TABLE,
    audit_database,
)
from tenant_celery.migrations import upgrade
from tenant_celery.rls import create_app_role, enable_tenant_rls, grant_tenant_tables
from tests._rig.postgres import APP_ROLE, Database

TENANT_A = "6f1c9a52-0d4e-4f7e-9a43-1b2c3d4e5f60"
TENANT_B = "0a9b8c7d-6e5f-4a3b-8c1d-2e3f4a5b6c7d"


def codes(conn: Connection, role: str = APP_ROLE) -> set[tuple[str | None, str]]:
    report = audit_database(conn, role=role)
    return {(p.table, p.code) for p in report.problems}


@pytest.fixture
def invoices(admin_engine: Engine) -> Iterator[Connection]:
    """A superuser connection on a database with one clean tenant table holding two
    rows of tenant A and one of B, inside a transaction rolled back afterwards
    (roles and memberships created in it vanish with it)."""
    with admin_engine.connect() as conn:
        transaction = conn.begin()
        conn.exec_driver_sql(
            "CREATE TABLE invoices (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " tenant_id uuid NOT NULL, total int)"
        )
        conn.exec_driver_sql("CREATE INDEX ON invoices (tenant_id)")
        enable_tenant_rls(conn, "invoices")
        grant_tenant_tables(conn, APP_ROLE, ["invoices"])
        conn.execute(
            sa.text("INSERT INTO invoices (tenant_id, total) VALUES (:a, 10), (:a, 20), (:b, 300)"),
            {"a": TENANT_A, "b": TENANT_B},
        )
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


# ------------------------------------------------- ways around the policies


def problems(conn: Connection, role: str = APP_ROLE) -> dict[tuple[str | None, str], str]:
    """``(object, code)`` to message, for every problem the audit reports."""
    return {(p.table, p.code): p.message for p in audit_database(conn, role=role).problems}


@contextlib.contextmanager
def as_role(conn: Connection, role: str = APP_ROLE) -> Iterator[Connection]:
    """``conn`` as ``role`` would be after logging in, with no tenant set.

    Session and current user are both ``role`` (so ``SET ROLE`` is checked
    against its own memberships, not the superuser's).  Everything done inside,
    the attack included, is rolled back to a savepoint afterwards.
    """
    savepoint = conn.begin_nested()
    try:
        conn.exec_driver_sql(f'SET LOCAL SESSION AUTHORIZATION "{role}"')
        who = conn.execute(
            sa.text("SELECT session_user, current_user, current_setting(:guc, true)"),
            {"guc": "app.current_tenant_id"},
        ).one()
        assert (who[0], who[1], who[2] or None) == (role, role, None)
        # The policy holds on the table itself: no tenant, no row.
        assert conn.exec_driver_sql("SELECT count(*) FROM invoices").scalar_one() == 0
        yield conn
    finally:
        savepoint.rollback()


def totals(conn: Connection, query: str) -> list[int]:
    """The ``total`` column of ``query``'s rows, sorted."""
    return sorted(conn.exec_driver_sql(query).scalars())


EVERY_TENANT = [10, 20, 300]  # A's two invoices and B's one


def unique(prefix: str) -> str:
    return f"tc_{prefix}_{secrets.token_hex(4)}"


@pytest.mark.parametrize("attribute", ["BYPASSRLS", "SUPERUSER"])
@pytest.mark.parametrize("through", [False, True], ids=["direct", "through-noinherit-role"])
def test_member_of_a_bypassing_role_is_reported(
    invoices: Connection, attribute: str, through: bool
) -> None:
    admin, ops = unique("admin"), unique("ops")
    invoices.exec_driver_sql(f"CREATE ROLE {admin} {attribute}")
    invoices.exec_driver_sql(f"GRANT SELECT ON invoices TO {admin}")
    if through:
        invoices.exec_driver_sql(f"CREATE ROLE {ops} NOINHERIT")
        invoices.exec_driver_sql(f"GRANT {admin} TO {ops}")
        invoices.exec_driver_sql(f"GRANT {ops} TO {APP_ROLE}")
    else:
        invoices.exec_driver_sql(f"GRANT {admin} TO {APP_ROLE}")

    with as_role(invoices):
        invoices.exec_driver_sql(f"SET ROLE {admin}")
        assert totals(invoices, "SELECT total FROM invoices") == EVERY_TENANT

    found = problems(invoices)
    assert set(found) == {(None, BYPASSING_MEMBERSHIP)}
    message = found[None, BYPASSING_MEMBERSHIP]
    route = f"'{APP_ROLE}' -> '{ops}' -> '{admin}'" if through else f"'{APP_ROLE}' -> '{admin}'"
    assert f"can SET ROLE to '{admin}' ({attribute})" in message
    assert route in message
    assert message.endswith(f"REVOKE {ops if through else admin} FROM {APP_ROLE}")
    assert audit_database(invoices, role=APP_ROLE).role.bypassing_roles == (admin,)


def test_noinherit_member_of_the_owner_counts_as_owner(
    invoices: Connection, group_role: str
) -> None:
    ops = unique("ops")
    invoices.exec_driver_sql(f'ALTER TABLE invoices OWNER TO "{group_role}"')
    invoices.exec_driver_sql(f'CREATE ROLE {ops} NOINHERIT; GRANT "{group_role}" TO {ops}')
    invoices.exec_driver_sql(f"GRANT {ops} TO {APP_ROLE}")

    with as_role(invoices):
        invoices.exec_driver_sql(f'SET ROLE "{group_role}"')
        invoices.exec_driver_sql("ALTER TABLE invoices NO FORCE ROW LEVEL SECURITY")
        assert totals(invoices, "SELECT total FROM invoices") == EVERY_TENANT

    assert set(problems(invoices)) == {("public.invoices", "role_owns_table")}


def test_materialized_view_of_a_tenant_table_is_reported(invoices: Connection) -> None:
    invoices.exec_driver_sql(
        "CREATE MATERIALIZED VIEW invoice_totals AS SELECT tenant_id, total FROM invoices"
    )
    invoices.exec_driver_sql(f"GRANT SELECT ON invoice_totals TO {APP_ROLE}")

    with as_role(invoices):
        assert totals(invoices, "SELECT total FROM invoice_totals") == EVERY_TENANT

    found = problems(invoices)
    assert set(found) == {("public.invoice_totals", EXPOSED_MATVIEW)}
    assert (
        "holds rows of public.invoices for every tenant"
        in found["public.invoice_totals", EXPOSED_MATVIEW]
    )


def test_materialized_view_read_through_a_view_is_reported(invoices: Connection) -> None:
    # The role has no SELECT on the materialized view, only on a view over it
    # that reads it as its owner.
    invoices.exec_driver_sql(
        "CREATE MATERIALIZED VIEW invoice_totals AS SELECT tenant_id, total FROM invoices;"
        " CREATE VIEW big_totals AS SELECT * FROM invoice_totals WHERE total > 0"
    )
    invoices.exec_driver_sql(f"GRANT SELECT ON big_totals TO {APP_ROLE}")

    with as_role(invoices):
        assert totals(invoices, "SELECT total FROM big_totals") == EVERY_TENANT

    found = problems(invoices)
    assert set(found) == {("public.invoice_totals", EXPOSED_MATVIEW)}
    assert "through view public.big_totals" in found["public.invoice_totals", EXPOSED_MATVIEW]


@pytest.mark.parametrize("owner", ["superuser", "bypassrls", "table-owner-not-forced"])
def test_view_owned_by_a_role_that_skips_the_policy_is_reported(
    invoices: Connection, owner: str
) -> None:
    invoices.exec_driver_sql("CREATE VIEW all_invoices AS SELECT tenant_id, total FROM invoices")
    expected = {("public.all_invoices", BYPASSING_VIEW)}
    if owner == "bypassrls":
        role = unique("reporter")
        invoices.exec_driver_sql(f"CREATE ROLE {role} BYPASSRLS")
        invoices.exec_driver_sql(f"GRANT SELECT ON invoices TO {role}")
        invoices.exec_driver_sql(f"ALTER VIEW all_invoices OWNER TO {role}")
        why = "has BYPASSRLS"
    elif owner == "table-owner-not-forced":
        role = unique("owner")
        invoices.exec_driver_sql(f"CREATE ROLE {role}")
        invoices.exec_driver_sql(f"ALTER TABLE invoices OWNER TO {role}")
        invoices.exec_driver_sql("ALTER TABLE invoices NO FORCE ROW LEVEL SECURITY")
        invoices.exec_driver_sql(f"ALTER VIEW all_invoices OWNER TO {role}")
        expected.add(("public.invoices", "rls_not_forced"))
        why = "has the privileges of the owner of public.invoices, whose RLS is not forced"
    else:
        why = "is a superuser"
    invoices.exec_driver_sql(f"GRANT SELECT ON all_invoices TO {APP_ROLE}")

    with as_role(invoices):
        assert totals(invoices, "SELECT total FROM all_invoices") == EVERY_TENANT

    found = problems(invoices)
    assert set(found) == expected
    message = found["public.all_invoices", BYPASSING_VIEW]
    if owner != "superuser":
        assert f"reads public.invoices as its owner '{role}', who {why}," in message
    assert why in message
    assert message.endswith("ALTER VIEW public.all_invoices SET (security_invoker = true)")


def test_table_referencing_a_tenant_table_without_column_or_rls_is_reported(
    invoices: Connection,
) -> None:
    invoices.exec_driver_sql(
        "CREATE TABLE invoice_lines (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " invoice_id bigint NOT NULL REFERENCES invoices, total int);"
        " CREATE TABLE line_notes (line_id bigint NOT NULL REFERENCES invoice_lines, total int);"
        " INSERT INTO invoice_lines (invoice_id, total) SELECT id, total FROM invoices;"
        " INSERT INTO line_notes SELECT id, total FROM invoice_lines"
    )
    invoices.exec_driver_sql(f"GRANT SELECT ON invoice_lines, line_notes TO {APP_ROLE}")

    with as_role(invoices):
        assert totals(invoices, "SELECT total FROM invoice_lines") == EVERY_TENANT
        assert totals(invoices, "SELECT total FROM line_notes") == EVERY_TENANT

    found = problems(invoices)
    assert set(found) == {
        ("public.invoice_lines", UNPROTECTED_CHILD_TABLE),
        ("public.line_notes", UNPROTECTED_CHILD_TABLE),
    }
    assert (
        "references tenant table public.invoices by foreign key"
        in found["public.invoice_lines", UNPROTECTED_CHILD_TABLE]
    )
    assert (
        "references tenant table public.invoices through public.invoice_lines"
        in found["public.line_notes", UNPROTECTED_CHILD_TABLE]
    )


@pytest.mark.parametrize("owner", ["superuser", "bypassrls", "table-owner"])
def test_definer_function_run_as_a_role_past_the_policy_is_reported(
    invoices: Connection, owner: str
) -> None:
    # No GRANT EXECUTE anywhere: PUBLIC may execute a new function by default.
    invoices.exec_driver_sql(
        "CREATE FUNCTION invoice_sum() RETURNS bigint LANGUAGE sql SECURITY DEFINER"
        " AS 'SELECT sum(total) FROM invoices';"
        " CREATE FUNCTION run_sql(q text) RETURNS void LANGUAGE plpgsql SECURITY DEFINER"
        " AS 'BEGIN EXECUTE q; END'"
    )
    expected = {
        ("public.invoice_sum()", BYPASSING_DEFINER_FUNCTION),
        ("public.run_sql(q text)", BYPASSING_DEFINER_FUNCTION),
    }
    if owner != "superuser":
        role = unique(owner.replace("-", "_"))
        invoices.exec_driver_sql(
            f"CREATE ROLE {role} {'BYPASSRLS' if owner == 'bypassrls' else ''};"
            f" GRANT SELECT ON invoices TO {role};"
            f" ALTER FUNCTION invoice_sum() OWNER TO {role};"
            f" ALTER FUNCTION run_sql(text) OWNER TO {role}"
        )
        if owner == "table-owner":  # RLS stays forced: the owner's own reads are filtered
            invoices.exec_driver_sql(f"ALTER TABLE invoices OWNER TO {role}")

    with as_role(invoices):
        if owner == "table-owner":
            assert invoices.exec_driver_sql("SELECT invoice_sum()").scalar_one() is None
            invoices.exec_driver_sql(
                "SELECT run_sql('ALTER TABLE invoices DISABLE ROW LEVEL SECURITY')"
            )
            assert totals(invoices, "SELECT total FROM invoices") == EVERY_TENANT
        else:
            assert invoices.exec_driver_sql("SELECT invoice_sum()").scalar_one() == 330

    found = problems(invoices)
    assert set(found) == expected
    message = found["public.invoice_sum()", BYPASSING_DEFINER_FUNCTION]
    assert message.endswith(
        f"REVOKE EXECUTE ON FUNCTION public.invoice_sum() FROM PUBLIC, {APP_ROLE}"
    )
    if owner == "table-owner":
        assert "privileges of the owner of public.invoices" in message


def test_the_packages_own_setup_and_harmless_neighbours_report_nothing(
    invoices: Connection,
) -> None:
    """create_app_role + enable_tenant_rls + grant_tenant_tables, and objects that
    look like the holes above but show the role nothing of another tenant."""
    app = unique("app")
    helper = unique("helper")
    create_app_role(invoices, app)
    invoices.exec_driver_sql(f"CREATE ROLE {helper}; GRANT SELECT ON invoices TO {helper}")
    invoices.exec_driver_sql(
        # A lookup table tenant tables reference: shared data, not a tenant's.
        "CREATE TABLE countries (code text PRIMARY KEY);"
        " INSERT INTO countries VALUES ('FR'), ('DE');"
        " ALTER TABLE invoices ADD COLUMN country text REFERENCES countries;"
        # A child table with its own tenant column, under the package's policy.
        " CREATE TABLE invoice_lines (invoice_id bigint NOT NULL REFERENCES invoices,"
        "  tenant_id uuid NOT NULL, total int);"
        " CREATE INDEX ON invoice_lines (tenant_id);"
        # A child table without the column, under a policy joining to its parent.
        " CREATE TABLE line_notes (invoice_id bigint NOT NULL REFERENCES invoices, total int);"
        " ALTER TABLE line_notes ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;"
        " CREATE POLICY via_invoice ON line_notes"
        "  USING (EXISTS (SELECT FROM invoices i WHERE i.id = invoice_id));"
        " INSERT INTO line_notes SELECT id, total FROM invoices;"
        # A child table the role has no right on.
        " CREATE TABLE invoice_audit (invoice_id bigint REFERENCES invoices, total int);"
        # Views that read the table as the caller, or as a role bound by the policy.
        " CREATE VIEW invoker_view WITH (security_invoker = true) AS SELECT * FROM invoices;"
        " CREATE VIEW helper_view AS SELECT * FROM invoices;"
        " CREATE VIEW over_helper_view AS SELECT * FROM helper_view;"  # the superuser's
        " CREATE MATERIALIZED VIEW private_totals AS SELECT total FROM invoices;"
        # Definer functions nobody may call, or run as a role bound by the policy.
        " CREATE FUNCTION locked_sum() RETURNS bigint LANGUAGE sql SECURITY DEFINER"
        "  AS 'SELECT sum(total) FROM invoices';"
        " REVOKE EXECUTE ON FUNCTION locked_sum() FROM PUBLIC;"
        " CREATE FUNCTION helper_sum() RETURNS bigint LANGUAGE sql SECURITY DEFINER"
        "  AS 'SELECT sum(total) FROM invoices';"
        " CREATE FUNCTION invoker_sum() RETURNS bigint LANGUAGE sql"
        "  AS 'SELECT sum(total) FROM invoices'"
    )
    invoices.exec_driver_sql(
        f"ALTER VIEW helper_view OWNER TO {helper}; GRANT SELECT ON helper_view TO {helper};"
        f" ALTER FUNCTION helper_sum() OWNER TO {helper}"
    )
    enable_tenant_rls(invoices, "invoice_lines")
    for role in (APP_ROLE, app):
        grant_tenant_tables(invoices, role, ["invoices", "invoice_lines", "line_notes"])
        invoices.exec_driver_sql(
            f"GRANT SELECT ON countries, invoker_view, helper_view, over_helper_view TO {role}"
        )

    with as_role(invoices, app):
        assert invoices.exec_driver_sql("SELECT count(*) FROM countries").scalar_one() == 2
        for relation in ("line_notes", "invoker_view", "helper_view", "over_helper_view"):
            assert totals(invoices, f"SELECT total FROM {relation}") == [], relation
        for function in ("helper_sum", "invoker_sum"):
            assert invoices.exec_driver_sql(f"SELECT {function}()").scalar_one() is None

    assert problems(invoices, app) == {}
    assert problems(invoices, APP_ROLE) == {}


def test_result_tables_are_listed_apart_until_the_host_puts_them_under_the_policy(
    database: Database,
) -> None:
    """From tc0004 Celery's result tables have the tenant column; the policy on them
    is an opt-in, so without it they are no problem (and readable across tenants)."""
    upgrade(database.url, grant_to=[APP_ROLE])
    admin = database.admin_engine()
    with admin.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO celery_taskmeta (id, task_id, status, tenant_id)"
            f" VALUES (nextval('task_id_sequence'), 'a-task', 'SUCCESS', '{TENANT_A}')"
        )
    readable = "SELECT count(*) FROM celery_taskmeta"
    with database.app_engine().connect() as conn:
        assert conn.exec_driver_sql(readable).scalar_one() == 1  # no tenant set
    with admin.connect() as conn:
        report = audit_database(conn, role=APP_ROLE)
    assert report.results_outside_policy == ("public.celery_taskmeta", "public.celery_tasksetmeta")
    assert report.tables == ()
    assert [p.code for p in report.problems] == [NO_TENANT_TABLES]
    assert "but Celery's result tables" in report.problems[0].message
    assert report.as_dict()["results_outside_policy"] == list(report.results_outside_policy)

    with admin.begin() as conn:
        enable_tenant_rls(conn, "celery_taskmeta")
    with database.app_engine().connect() as conn:
        assert conn.exec_driver_sql(readable).scalar_one() == 0
    with admin.connect() as conn:
        report = audit_database(conn, role=APP_ROLE)
    assert report.results_outside_policy == ("public.celery_tasksetmeta",)
    assert [t.name for t in report.tables] == ["public.celery_taskmeta"]
    assert report.clean, report.problems

    with admin.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE celery_tasksetmeta ENABLE ROW LEVEL SECURITY")
    with admin.connect() as conn:
        report = audit_database(conn, role=APP_ROLE)
    assert report.results_outside_policy == ()
    assert {(p.table, p.code) for p in report.problems} == {
        ("public.celery_tasksetmeta", RLS_NOT_FORCED),
        ("public.celery_tasksetmeta", NO_TENANT_POLICY),
    }
