"""The RLS Alembic operations and SQL text, without a database."""

from __future__ import annotations

import pytest
from alembic.autogenerate import render_python_code, renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations import Operations, ops
from alembic.runtime.migration import MigrationContext

from tenant_celery import ConfigurationError
from tenant_celery.rls import (
    DisableTenantRLSOp,
    EnableTenantRLSOp,
    disable_tenant_rls_sql,
    enable_tenant_rls_sql,
)


def test_importing_registers_the_operations() -> None:
    assert Operations.enable_tenant_rls.__name__ == "enable_tenant_rls"  # type: ignore[attr-defined]
    assert Operations.disable_tenant_rls.__name__ == "disable_tenant_rls"  # type: ignore[attr-defined]


def test_enable_sql_is_the_documented_policy() -> None:
    assert enable_tenant_rls_sql(
        "Invoices", column_type="bigint", schema="billing", roles=["app", "Ops Team"]
    ) == [
        'ALTER TABLE billing."Invoices" ENABLE ROW LEVEL SECURITY',
        'ALTER TABLE billing."Invoices" FORCE ROW LEVEL SECURITY',
        'CREATE POLICY tenant_isolation_policy ON billing."Invoices" AS PERMISSIVE FOR ALL'
        ' TO app, "Ops Team"'
        " USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true),"
        " '')::bigint))"
        " WITH CHECK (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true),"
        " '')::bigint))",
    ]


def test_disable_sql_undoes_enable_in_reverse_order() -> None:
    assert disable_tenant_rls_sql('we"ird', policy_name="p") == [
        'DROP POLICY p ON "we""ird"',
        'ALTER TABLE "we""ird" NO FORCE ROW LEVEL SECURITY',
        'ALTER TABLE "we""ird" DISABLE ROW LEVEL SECURITY',
    ]


def test_sql_needs_a_known_column_type() -> None:
    with pytest.raises(ConfigurationError, match="column_type must be one of"):
        enable_tenant_rls_sql("invoices", column_type=None)  # type: ignore[arg-type]


def test_operations_validate_when_built() -> None:
    with pytest.raises(ConfigurationError, match=r"must look like 'prefix\.name'"):
        EnableTenantRLSOp("invoices", setting="app.x'; --")


def test_operations_reverse_each_other() -> None:
    enable = EnableTenantRLSOp(
        "invoices", schema="billing", column="org_id", roles=["app"], column_type="integer"
    )
    disable = enable.reverse()
    assert isinstance(disable, DisableTenantRLSOp)
    assert disable.target == enable.target
    again = disable.reverse()
    assert isinstance(again, EnableTenantRLSOp)
    assert again.target == enable.target


def test_autogenerate_renders_and_reverses_the_operations() -> None:
    upgrade = ops.UpgradeOps(
        ops=[EnableTenantRLSOp("invoices", column_type="uuid", setting="acme.tenant")]
    )
    code = render_python_code(upgrade)
    assert "op.enable_tenant_rls('invoices', setting='acme.tenant', column_type='uuid')" in code
    downgrade = render_python_code(upgrade.reverse())
    assert "op.disable_tenant_rls('invoices', setting='acme.tenant', column_type='uuid')" in (
        downgrade
    )


def test_rendering_adds_the_import_that_registers_the_operations() -> None:
    context = AutogenContext(MigrationContext.configure(dialect_name="postgresql"))
    operation = EnableTenantRLSOp("invoices")
    assert renderers.dispatch(operation)(context, operation) == "op.enable_tenant_rls('invoices')"
    assert context.imports == {
        "import tenant_celery.rls  # noqa: F401  (registers the tenant RLS operations)"
    }
