"""Tenant row-level security on real PostgreSQL, seen through the unprivileged ``app_user``.

Tables are created and seeded by the superuser; what the policy lets through
is always checked as ``app_user`` (not the owner, no BYPASSRLS), with the
tenant set by ``SELECT set_config(name, value, true)`` inside a transaction.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import logging
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine

from tenant_celery import DEFAULT_GUC, ConfigurationError, _compat
from tenant_celery.errors import RLSSetupError
from tenant_celery.rls import (
    create_app_role,
    disable_tenant_rls,
    enable_tenant_rls,
    grant_tenant_tables,
)
from tests._rig.postgres import APP_ROLE, Database, DatabaseFactory, libpq_kwargs, render

# Two tenants' ids and a table column type for each supported type.
TENANTS: dict[str, tuple[str, str]] = {
    "uuid": ("6f1c9a52-0d4e-4f7e-9a43-1b2c3d4e5f60", "0a9b8c7d-6e5f-4a3b-8c1d-2e3f4a5b6c7d"),
    "bigint": ("9000000000001", "9000000000002"),
    "integer": ("101", "202"),
    "text": ("acme", "globex"),
}


def seed(conn: Connection, table: str, column_type: str, *, column: str = "tenant_id") -> None:
    """Create ``table`` with tenant A's 3 rows and B's 2 rows, owned by the superuser."""
    a, b = TENANTS[column_type]
    conn.exec_driver_sql(
        f"CREATE TABLE {table} (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        f" {column} {column_type} NOT NULL, note text)"
    )
    conn.execute(
        sa.text(
            f"INSERT INTO {table} ({column}, note)"
            f" SELECT CAST(t AS {column_type}), 'row' FROM unnest(CAST(:ids AS text[])) AS t"
        ),
        {"ids": [a, a, a, b, b]},
    )


def rows_seen(
    engine: Engine, table: str, tenant: str | None, *, column: str = "tenant_id"
) -> list[str]:
    """The tenant ids of the rows ``engine`` sees in one transaction with ``tenant`` set."""
    with engine.begin() as conn:
        if tenant is not None:
            conn.execute(
                sa.text("SELECT set_config(:n, :v, true)"), {"n": DEFAULT_GUC, "v": tenant}
            )
        return [str(v) for v in conn.execute(sa.text(f"SELECT {column} FROM {table}")).scalars()]


def write_error(engine: Engine, tenant: str | None, statement: str, **params: Any) -> str | None:
    """Run ``statement`` inside ``tenant``; return the server's error as
    ``"<SQLSTATE>: <message>"`` (the same from either driver), or None."""
    try:
        with engine.begin() as conn:
            if tenant is not None:
                conn.execute(
                    sa.text("SELECT set_config(:n, :v, true)"), {"n": DEFAULT_GUC, "v": tenant}
                )
            conn.execute(sa.text(statement), params)
    except sa.exc.DBAPIError as exc:
        # The primary message alone: psycopg2's str() ends it with a newline.
        return f"{_compat.sqlstate(exc.orig)}: {exc.orig.diag.message_primary}"  # type: ignore[union-attr]
    return None


def rls_state(conn: Connection, table: str) -> tuple[Any, ...]:
    """What the catalogs say about ``table``'s row-level security."""
    flags = conn.execute(
        sa.text(
            "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = to_regclass(:t)"
        ),
        {"t": table},
    ).one()
    policies = conn.execute(
        sa.text(
            "SELECT polname, polcmd, polpermissive, polroles::regrole[]::text[],"
            " pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)"
            " FROM pg_policy WHERE polrelid = to_regclass(:t) ORDER BY polname"
        ),
        {"t": table},
    ).all()
    return (tuple(flags), tuple(tuple(p) for p in policies))


# ------------------------------------------------------------------- isolation


@pytest.mark.parametrize("column_type", list(TENANTS))
def test_each_tenant_sees_only_its_rows(
    admin_engine: Engine, app_engine: Engine, column_type: str
) -> None:
    a, b = TENANTS[column_type]
    with admin_engine.begin() as conn:
        seed(conn, "invoices", column_type)
        enable_tenant_rls(conn, "invoices")
        grant_tenant_tables(conn, APP_ROLE, ["invoices"])

    assert rows_seen(app_engine, "invoices", a) == [a, a, a]
    assert rows_seen(app_engine, "invoices", b) == [b, b]
    assert rows_seen(app_engine, "invoices", None) == []
    # Once a session has set the setting it reads '' outside the transaction; NULLIF
    # turns that into "no tenant" instead of a cast error.
    assert rows_seen(app_engine, "invoices", "") == []
    with admin_engine.connect() as conn:  # the superuser still sees everything
        assert conn.execute(sa.text("SELECT count(*) FROM invoices")).scalar_one() == 5


@pytest.mark.parametrize("column_type", list(TENANTS))
def test_with_check_refuses_writes_for_another_tenant(
    admin_engine: Engine, app_engine: Engine, column_type: str
) -> None:
    a, b = TENANTS[column_type]
    with admin_engine.begin() as conn:
        seed(conn, "invoices", column_type)
        enable_tenant_rls(conn, "invoices")
        grant_tenant_tables(conn, APP_ROLE, ["invoices"])
    insert = f"INSERT INTO invoices (tenant_id) VALUES (CAST(:t AS {column_type}))"
    violation = '42501: new row violates row-level security policy for table "invoices"'

    assert write_error(app_engine, a, insert, t=b) == violation
    assert write_error(app_engine, None, insert, t=a) == violation
    move = f"UPDATE invoices SET tenant_id = CAST(:t AS {column_type})"
    assert write_error(app_engine, a, move, t=b) == violation
    assert write_error(app_engine, a, insert, t=a) is None  # its own rows it may write

    with app_engine.begin() as conn:  # another tenant's rows are not even found
        conn.execute(sa.text("SELECT set_config(:n, :v, true)"), {"n": DEFAULT_GUC, "v": a})
        assert conn.execute(sa.text("DELETE FROM invoices WHERE note = 'row'")).rowcount == 3
    assert rows_seen(app_engine, "invoices", b) == [b, b]


def test_disable_reverses_enable_exactly(admin_engine: Engine, app_engine: Engine) -> None:
    a, _ = TENANTS["uuid"]
    with admin_engine.begin() as conn:
        seed(conn, "invoices", "uuid")
        grant_tenant_tables(conn, APP_ROLE, ["invoices"])
        before = rls_state(conn, "invoices")
        enable_tenant_rls(conn, "invoices", roles=[APP_ROLE])
        enabled = rls_state(conn, "invoices")
    assert enabled != before
    assert enabled[0] == (True, True)
    ((name, command_, permissive, roles, using, check),) = enabled[1]
    assert (name, command_, permissive, roles) == ("tenant_isolation_policy", "*", True, [APP_ROLE])
    assert using == check
    assert "current_setting('app.current_tenant_id'::text, true)" in using
    assert len(rows_seen(app_engine, "invoices", None)) == 0

    with admin_engine.begin() as conn:
        disable_tenant_rls(conn, "invoices")
        assert rls_state(conn, "invoices") == before
    assert len(rows_seen(app_engine, "invoices", a)) == 5


def test_odd_identifiers_are_quoted(admin_engine: Engine, app_engine: Engine) -> None:
    schema, table, column = 'Billing "Dept"', 'weird "name"', "Tenant Id"
    policy = 'tenant "policy"'
    qualified = '"Billing ""Dept"""."weird ""name"""'
    a, b = TENANTS["text"]
    with admin_engine.begin() as conn:
        conn.exec_driver_sql('CREATE SCHEMA "Billing ""Dept"""')
        seed(conn, qualified, "text", column='"Tenant Id"')
        enable_tenant_rls(conn, table, schema=schema, column=column, policy_name=policy)
        grant_tenant_tables(conn, APP_ROLE, [table], schema=schema)
        assert rls_state(conn, qualified)[1][0][0] == policy

    assert rows_seen(app_engine, qualified, a, column='"Tenant Id"') == [a, a, a]
    assert rows_seen(app_engine, qualified, b, column='"Tenant Id"') == [b, b]
    assert rows_seen(app_engine, qualified, None, column='"Tenant Id"') == []

    with admin_engine.begin() as conn:
        disable_tenant_rls(conn, table, schema=schema, policy_name=policy)
        assert rls_state(conn, qualified) == ((False, False), ())


@pytest.fixture
def statements(admin_engine: Engine) -> Iterator[list[str]]:
    """Every statement ``admin_engine`` sends while the test runs."""
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    sa.event.listen(admin_engine, "before_cursor_execute", record)
    yield sent
    sa.event.remove(admin_engine, "before_cursor_execute", record)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"table": ""}, "table must be a non-empty name"),
        ({"table": "a\x00b"}, "table must be a non-empty name"),
        ({"table": "x" * 64}, "at most 63 bytes"),
        ({"column": "é" * 32}, "column must be a non-empty name of at most 63 bytes"),
        ({"setting": "app.tenant'; DROP TABLE invoices; --"}, "must look like 'prefix.name'"),
        ({"setting": "tenant"}, "must look like 'prefix.name'"),
        ({"policy_name": None}, "policy_name must be"),
        ({"schema": ""}, "schema must be"),
        ({"roles": APP_ROLE}, "roles must be a list of names, got 'app_user'"),
        ({"roles": []}, "roles must name at least one"),
        ({"column_type": "varchar"}, "column_type must be one of uuid, bigint, integer, text"),
    ],
)
def test_refused_arguments_send_no_sql(
    admin_engine: Engine, statements: list[str], kwargs: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"table": "invoices", **kwargs}
    table = arguments.pop("table")
    with admin_engine.connect() as conn, pytest.raises(ConfigurationError, match=message):
        enable_tenant_rls(conn, table, **arguments)
    assert statements == []


@pytest.mark.parametrize(
    ("ddl", "kwargs", "message"),
    [
        ("", {}, "table invoices does not exist"),
        ("", {"table": "public.invoices"}, "pass schema='public' rather than a dotted name"),
        ("CREATE TABLE invoices (id int)", {}, "has no column 'tenant_id'"),
        ("CREATE TABLE invoices (tenant_id varchar(40))", {}, "has type character varying;"),
        (
            "CREATE TABLE invoices (tenant_id bigint)",
            {"column_type": "uuid"},
            "has type bigint, but column_type='uuid' was passed",
        ),
    ],
)
def test_tables_unfit_for_the_policy_are_refused(
    admin_engine: Engine, ddl: str, kwargs: dict[str, Any], message: str
) -> None:
    with admin_engine.begin() as conn:
        if ddl:
            conn.exec_driver_sql(ddl)
        table = kwargs.pop("table", "invoices")
        with pytest.raises(RLSSetupError, match=message):
            enable_tenant_rls(conn, table, **kwargs)
        if ddl:
            assert rls_state(conn, "invoices") == ((False, False), ())


# -------------------------------------------------------------------- Alembic

ENV_PY = """\
import sqlalchemy as sa
from alembic import context

import tenant_celery.rls  # noqa: F401

url = context.config.attributes["url"]
if context.is_offline_mode():
    context.configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
"""

REVISION_PY = """\
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.execute('CREATE SCHEMA "Billing"')
    op.create_table(
        "invoices",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("tenant_id", UUID, nullable=False),
        sa.Column("amount", sa.Integer),
        schema="Billing",
    )
    op.create_index("invoices_tenant", "invoices", ["tenant_id"], schema="Billing")
    op.enable_tenant_rls("invoices", schema="Billing", roles=["app_user"]{column_type})
    op.execute('GRANT USAGE ON SCHEMA "Billing" TO app_user')
    op.execute('GRANT SELECT, INSERT, UPDATE, DELETE ON "Billing".invoices TO app_user')


def downgrade():
    op.disable_tenant_rls("invoices", schema="Billing")
    op.drop_table("invoices", schema="Billing")
    op.execute('DROP SCHEMA "Billing"')
"""


@pytest.fixture
def alembic_config(tmp_path: Path) -> Callable[..., Config]:
    """An Alembic project in a temporary directory with one revision using the RLS ops."""

    def make(url: sa.URL, *, column_type: str | None = "uuid") -> Config:
        (tmp_path / "versions").mkdir(exist_ok=True)
        (tmp_path / "env.py").write_text(ENV_PY)
        argument = f", column_type={column_type!r}" if column_type else ""
        (tmp_path / "versions" / "0001_invoices.py").write_text(
            REVISION_PY.replace("{column_type}", argument)
        )
        config = Config(output_buffer=io.StringIO())
        config.set_main_option("script_location", str(tmp_path))
        config.attributes["url"] = render(url)
        return config

    return make


def test_alembic_migration_upgrades_and_downgrades(
    database: Database,
    admin_engine: Engine,
    app_engine: Engine,
    alembic_config: Callable[..., Config],
) -> None:
    a, b = TENANTS["uuid"]
    config = alembic_config(database.url, column_type=None)  # online: read from the catalog
    command.upgrade(config, "head")

    with admin_engine.begin() as conn:
        assert rls_state(conn, '"Billing".invoices')[0] == (True, True)
        conn.execute(
            sa.text('INSERT INTO "Billing".invoices (tenant_id) VALUES (:a), (:a), (:b)'),
            {"a": a, "b": b},
        )
    assert rows_seen(app_engine, '"Billing".invoices', a) == [a, a]
    assert rows_seen(app_engine, '"Billing".invoices', None) == []

    command.downgrade(config, "base")
    with admin_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regnamespace('\"Billing\"')")).scalar() is None


def test_alembic_offline_sql_matches_online(
    database: Database,
    pg_databases: DatabaseFactory,
    admin_engine: Engine,
    alembic_config: Callable[..., Config],
) -> None:
    config = alembic_config(database.url)
    command.upgrade(config, "head", sql=True)
    script = config.output_buffer.getvalue()  # type: ignore[union-attr]
    expression = (
        "tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid)"
    )
    assert 'ALTER TABLE "Billing".invoices ENABLE ROW LEVEL SECURITY;' in script
    assert 'ALTER TABLE "Billing".invoices FORCE ROW LEVEL SECURITY;' in script
    assert (
        'CREATE POLICY tenant_isolation_policy ON "Billing".invoices AS PERMISSIVE FOR ALL'
        f" TO app_user USING ({expression}) WITH CHECK ({expression});"
    ) in script
    with admin_engine.connect() as conn:  # --sql touched nothing
        assert conn.execute(sa.text("SELECT to_regnamespace('\"Billing\"')")).scalar() is None

    # The script, applied as written, builds what the online migration builds.
    with psycopg.connect(**libpq_kwargs(database.url), autocommit=True) as conn:
        conn.execute(script)
    with pg_databases.database() as online:
        command.upgrade(alembic_config(online.url), "head")
        with online.admin_engine().connect() as conn:
            expected = rls_state(conn, '"Billing".invoices')
    with admin_engine.connect() as conn:
        assert rls_state(conn, '"Billing".invoices') == expected

    config = alembic_config(database.url)
    command.downgrade(config, "0001:base", sql=True)
    down = config.output_buffer.getvalue()  # type: ignore[union-attr]
    assert (
        down.index('DROP POLICY tenant_isolation_policy ON "Billing".invoices;')
        < down.index('ALTER TABLE "Billing".invoices NO FORCE ROW LEVEL SECURITY;')
        < down.index('ALTER TABLE "Billing".invoices DISABLE ROW LEVEL SECURITY;')
    )


def test_alembic_offline_needs_the_column_type(
    database: Database, alembic_config: Callable[..., Config]
) -> None:
    config = alembic_config(database.url, column_type=None)
    with pytest.raises(ConfigurationError, match=r"offline \(--sql\) mode .* pass column_type="):
        command.upgrade(config, "head", sql=True)


# ------------------------------------------------------------------- planning

SEED_EVENTS = """
CREATE TABLE events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id uuid NOT NULL,
    created_at timestamptz NOT NULL,
    payload text NOT NULL
);
INSERT INTO events (tenant_id, created_at, payload)
SELECT ('00000000-0000-4000-8000-' || lpad((g % 100)::text, 12, '0'))::uuid,
       timestamptz '2024-01-01' + g * interval '1 minute',
       md5(g::text)
FROM generate_series(1, 120000) AS g;
CREATE INDEX events_tenant_created ON events (tenant_id, created_at);
ANALYZE events;
"""


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def test_policy_lets_the_planner_use_the_tenant_index(
    database: Database, admin_engine: Engine, app_engine: Engine
) -> None:
    with psycopg.connect(**libpq_kwargs(database.url), autocommit=True) as conn:
        conn.execute(SEED_EVENTS)
    with admin_engine.begin() as conn:
        enable_tenant_rls(conn, "events")
        grant_tenant_tables(conn, APP_ROLE, ["events"], privileges=["SELECT"])

    tenant = "00000000-0000-4000-8000-000000000007"
    for query in (
        "SELECT id, created_at FROM events ORDER BY created_at DESC LIMIT 20",
        "SELECT count(*) FROM events WHERE created_at >= timestamptz '2024-01-15'",
    ):
        with app_engine.begin() as conn:
            conn.execute(
                sa.text("SELECT set_config(:n, :v, true)"), {"n": DEFAULT_GUC, "v": tenant}
            )
            (document,) = conn.execute(sa.text(f"EXPLAIN (FORMAT JSON) {query}")).scalar_one()
        nodes = list(plan_nodes(document["Plan"]))
        types = [node["Node Type"] for node in nodes]
        assert "Seq Scan" not in types, types
        (scan,) = [node for node in nodes if node.get("Index Name") == "events_tenant_created"]
        assert scan["Node Type"] in {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}
        assert (
            "tenant_id = (InitPlan 1).col1" in scan["Index Cond"]
            or "tenant_id = $0" in (scan["Index Cond"])
        ), scan["Index Cond"]


# ------------------------------------------------------------------ app role


@pytest.fixture
def role_name(database: Database, pg_databases: DatabaseFactory) -> Iterator[str]:
    """A role name unique to this test; the role is dropped (with what it owns) afterwards."""
    name = f"tc_role_{secrets.token_hex(4)}"
    yield name
    with pg_databases.cluster.connect(database.name) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
            conn.execute(f'REASSIGN OWNED BY "{name}" TO CURRENT_USER')
            conn.execute(f'DROP OWNED BY "{name}"')
    with pg_databases.cluster.connect() as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{name}"')


def role_attributes(conn: Connection, name: str) -> tuple[bool, ...]:
    return tuple(
        conn.execute(
            sa.text(
                "SELECT rolsuper, rolbypassrls, rolreplication, rolcreatedb, rolcreaterole,"
                " rolcanlogin FROM pg_roles WHERE rolname = :n"
            ),
            {"n": name},
        ).one()
    )


def scram_matches(verifier: str, password: str) -> bool:
    """Whether a stored SCRAM-SHA-256 verifier was made from ``password``."""
    method, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored_key = base64.b64decode(keys.split(":")[0])
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return (
        method == "SCRAM-SHA-256"
        and hashlib.sha256(client_key).digest() == stored_key
        and base64.b64encode(server_key).decode() == keys.split(":")[1]
    )


def test_create_app_role_is_idempotent_and_unprivileged(
    admin_engine: Engine, role_name: str
) -> None:
    with admin_engine.begin() as conn:
        create_app_role(conn, role_name)
        assert role_attributes(conn, role_name) == (False,) * 6
        create_app_role(conn, role_name)  # again: no error, same role
        assert role_attributes(conn, role_name) == (False,) * 6
        conn.exec_driver_sql(f"ALTER ROLE {role_name} CREATEDB CREATEROLE")
        create_app_role(conn, role_name, login=True)
        assert role_attributes(conn, role_name) == (False,) * 5 + (True,)


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_password_is_set_and_never_logged(
    database: Database,
    role_name: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    driver: str,
) -> None:
    password = f"pw-{secrets.token_hex(8)}-'quote\"-\\back"
    # SQLAlchemy logs every statement it sends
    echoing = database.engine(database.url.set(drivername=f"postgresql+{driver}"), echo=True)
    assert echoing.dialect.driver == driver
    caplog.set_level(logging.DEBUG)
    with echoing.begin() as conn:
        create_app_role(conn, role_name, login=True, password=password)
        create_app_role(conn, role_name, login=True, password=password)
        verifier = conn.execute(
            sa.text("SELECT rolpassword FROM pg_authid WHERE rolname = :n"), {"n": role_name}
        ).scalar_one()
    assert scram_matches(verifier, password)
    logged = "\n".join(r.getMessage() for r in caplog.records) + capsys.readouterr().out
    assert f"CREATE ROLE {role_name}" in logged  # the capture does see the statements
    assert password not in logged
    assert verifier not in logged


def test_password_needs_login_and_a_safe_value(admin_engine: Engine, role_name: str) -> None:
    with admin_engine.connect() as conn:
        with pytest.raises(ConfigurationError, match="useless without login=True"):
            create_app_role(conn, role_name, password="secret")
        with pytest.raises(ConfigurationError, match="got a value of type bytes") as info:
            create_app_role(conn, role_name, login=True, password=b"secret")  # type: ignore[arg-type]
        assert "secret" not in str(info.value)
        with pytest.raises(ConfigurationError, match="reserved by PostgreSQL"):
            create_app_role(conn, "pg_monitor")
        assert role_exists(conn, role_name) is None


def role_exists(conn: Connection, name: str) -> Any:
    return conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :n"), {"n": name}).scalar()


@pytest.mark.parametrize(
    ("attribute", "column"),
    [("SUPERUSER", "rolsuper"), ("BYPASSRLS", "rolbypassrls"), ("REPLICATION", "rolreplication")],
)
def test_existing_privileged_role_is_refused(
    admin_engine: Engine, role_name: str, attribute: str, column: str
) -> None:
    with admin_engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role_name} {attribute}")
    with (
        admin_engine.begin() as conn,
        pytest.raises(RLSSetupError, match=f"exists with {attribute}"),
    ):
        create_app_role(conn, role_name)
    with admin_engine.connect() as conn:
        assert conn.execute(
            sa.text(f"SELECT {column} FROM pg_roles WHERE rolname = :n"),
            {"n": role_name},
        ).scalar_one()


@pytest.mark.parametrize("attribute", ["BYPASSRLS", "SUPERUSER"])
@pytest.mark.parametrize("through", [False, True], ids=["direct", "through-noinherit-role"])
def test_existing_role_that_can_become_a_privileged_one_is_refused(
    admin_engine: Engine, statements: list[str], attribute: str, through: bool
) -> None:
    suffix = secrets.token_hex(4)
    app, ops, admin = f"tc_app_{suffix}", f"tc_ops_{suffix}", f"tc_admin_{suffix}"
    with admin_engine.connect() as conn:  # never committed: the roles vanish on close
        conn.exec_driver_sql(
            f"CREATE ROLE {admin} {attribute}; CREATE ROLE {ops} NOINHERIT;"
            f" CREATE ROLE {app} CREATEDB; GRANT {admin} TO {ops}"
        )
        conn.exec_driver_sql(f"GRANT {ops if through else admin} TO {app}")
        before = role_attributes(conn, app)
        statements.clear()
        route = f"'{app}' -> '{ops}' -> '{admin}'" if through else f"'{app}' -> '{admin}'"
        with pytest.raises(RLSSetupError) as info:
            create_app_role(conn, app, login=True)
        assert str(info.value) == (
            f"role '{app}' can SET ROLE to '{admin}', which has {attribute} and bypasses "
            f"row-level security ({route}); revoke the membership "
            f"(REVOKE {ops if through else admin} FROM {app}) or choose another role name"
        )
        # Nothing was changed: only catalog reads were sent, CREATEDB and NOLOGIN stay.
        assert all(s.lstrip().upper().startswith(("SELECT", "WITH")) for s in statements)
        assert role_attributes(conn, app) == before == (False, False, False, True, False, False)


def test_forced_policy_binds_the_table_owner_too(admin_engine: Engine, role_name: str) -> None:
    a, _ = TENANTS["uuid"]
    with admin_engine.begin() as conn:
        create_app_role(conn, role_name)
        seed(conn, "invoices", "uuid")
        conn.exec_driver_sql(f"ALTER TABLE invoices OWNER TO {role_name}")
        enable_tenant_rls(conn, "invoices")
    with admin_engine.begin() as conn:
        conn.exec_driver_sql(f"SET LOCAL ROLE {role_name}")
        assert conn.execute(sa.text("SELECT count(*) FROM invoices")).scalar_one() == 0
        conn.execute(sa.text("SELECT set_config(:n, :v, true)"), {"n": DEFAULT_GUC, "v": a})
        assert conn.execute(sa.text("SELECT count(*) FROM invoices")).scalar_one() == 3


def test_role_owning_a_table_is_refused(admin_engine: Engine, role_name: str) -> None:
    with admin_engine.begin() as conn:
        create_app_role(conn, role_name)
        seed(conn, "invoices", "uuid")
        conn.exec_driver_sql(f"ALTER TABLE invoices OWNER TO {role_name}")
        with pytest.raises(RLSSetupError, match=r"owns public\.invoices; an owner can turn"):
            create_app_role(conn, role_name)


def test_grant_tenant_tables(admin_engine: Engine, role_name: str, statements: list[str]) -> None:
    with admin_engine.begin() as conn:
        create_app_role(conn, role_name)
        conn.exec_driver_sql('CREATE SCHEMA "Sales"')
        seed(conn, '"Sales".orders', "uuid")
        seed(conn, '"Sales"."Order Lines"', "uuid")
        statements.clear()
        with pytest.raises(ConfigurationError, match="TRUNCATE bypasses row-level security"):
            grant_tenant_tables(conn, role_name, ["orders"], ["select", "truncate"], schema="Sales")
        with pytest.raises(ConfigurationError, match="tables must be a list of names"):
            grant_tenant_tables(conn, role_name, "orders", schema="Sales")
        assert statements == []
        grant_tenant_tables(
            conn, role_name, ["orders", "Order Lines"], ["select", "INSERT"], "Sales"
        )
        grant_tenant_tables(conn, role_name, ["orders"], schema="Sales")  # idempotent, widens

        def granted(table: str) -> list[str]:
            return [
                privilege
                for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE")
                if conn.execute(
                    sa.text("SELECT has_table_privilege(:r, :t, :p)"),
                    {"r": role_name, "t": table, "p": privilege},
                ).scalar_one()
            ]

        assert granted('"Sales".orders') == ["SELECT", "INSERT", "UPDATE", "DELETE"]
        assert granted('"Sales"."Order Lines"') == ["SELECT", "INSERT"]
        assert conn.execute(
            sa.text("SELECT has_schema_privilege(:r, 'Sales', 'USAGE')"), {"r": role_name}
        ).scalar_one()


def test_percent_and_colon_in_names_reach_the_server_verbatim(
    admin_engine: Engine, statements: list[str]
) -> None:
    # '%' and ':' mean placeholders to the driver and to sa.text(); in a quoted name
    # they must be sent as they are.
    with admin_engine.begin() as conn:
        conn.exec_driver_sql(
            'CREATE TABLE "50%:off" (tenant_id text)', execution_options={"no_parameters": True}
        )
        enable_tenant_rls(conn, "50%:off", policy_name="p:%s")
        assert rls_state(conn, '"50%:off"')[0] == (True, True)
        disable_tenant_rls(conn, "50%:off", policy_name="p:%s")
    assert any(
        s.startswith('CREATE POLICY "p:%s" ON "50%:off" AS PERMISSIVE FOR ALL') for s in statements
    )
