"""The bundled migration on real PostgreSQL: the schema it builds is the one kombu and
Celery build themselves, and upgrade, downgrade, current, sql and grants behave as
documented (idempotent, atomic, safe to run concurrently)."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import celery
import kombu
import psycopg
import pytest
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.engine import URL, Engine

from tenant_celery import tenant_context
from tenant_celery.errors import MigrationError, TenantCeleryError
from tenant_celery.migrations import (
    LOCK_ID,
    SEQUENCES,
    TABLES,
    TENANT_COLUMN,
    VERSION_TABLE,
    current,
    downgrade,
    heads,
    sql,
    upgrade,
)
from tenant_celery.results import dispose_engines
from tenant_celery.rls import enable_tenant_rls
from tests._rig.env import celery_release
from tests._rig.postgres import APP_ROLE, Database, DatabaseFactory, libpq_kwargs, render

from .schema_catalog import create_with_libraries, differences, snapshot

VERSIONS = f"kombu-{kombu.__version__}-celery-{celery.__version__}"
HEAD = "tc0005"
#: The revision that builds exactly what kombu's SQLAlchemy transport and Celery build.
LIBRARY_TABLES = "tc0001"
TENANT = "6f1c1d52-1f0e-4c39-9a43-5b1f0c1e2a01"


@pytest.fixture
def other_database(pg_databases: DatabaseFactory) -> Iterator[Database]:
    """A second fresh database, for comparing two schemas."""
    with pg_databases.database() as db:
        yield db


def schema_of(engine: Engine, schema: str = "public", **kwargs: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        return snapshot(conn, schema, **kwargs)


def scalar(engine: Engine, query: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(query), params).scalar_one()


# ----------------------------------------------------------- the same schema as the libraries


@pytest.mark.parametrize(
    "schema",
    [pytest.param(None, id=f"{VERSIONS}-public"), pytest.param("celery", id=f"{VERSIONS}-schema")],
)
def test_upgrade_builds_what_kombu_and_celery_build(
    database: Database, other_database: Database, schema: str | None
) -> None:
    """Column by column, constraint, index and sequence: no difference (the test id
    names the kombu and Celery versions compared)."""
    upgrade(database.url, LIBRARY_TABLES, schema=schema)
    if schema is not None:  # kombu and Celery expect the schema to exist
        with other_database.admin_engine().begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    used = create_with_libraries(other_database.url, schema)
    assert used == f"kombu {kombu.__version__}, celery {celery.__version__}"

    name = schema or "public"
    columns, indexes = newer_than_installed_celery()
    if columns or indexes:
        # An older Celery's result tables are a subset of the newest layout the migration
        # builds: with the newer parts removed, what is left must be exactly Celery's.
        with database.admin_engine().begin() as conn:
            for table, column in columns:
                conn.execute(sa.text(f"ALTER TABLE {name}.{table} DROP COLUMN {column}"))
            for index in indexes:
                conn.execute(sa.text(f"DROP INDEX {name}.{index}"))
    migrated = schema_of(database.admin_engine(), name, exclude=(VERSION_TABLE,))
    reference = schema_of(other_database.admin_engine(), name)
    found = differences(reference, migrated)
    assert not found, f"migrated schema vs {used}:\n" + "\n".join(found)
    # Not an empty comparison: all four tables, their columns and sequences are there.
    assert sorted(row[0] for row in reference["relations"]) == sorted(TABLES[:4] + SEQUENCES)
    assert len(reference["columns"]) == 2 + 6 + 14 + 4 - len(columns)
    assert len(reference["indexes"]) == 2 + 4 + 3 + 3 - len(indexes)


#: What the bundled migration's result tables have beyond Celery 5.5's: the newest layout.
NEWER_COLUMNS = (("celery_taskmeta", "children"), ("celery_taskmeta", "stamps"))
NEWER_INDEXES = ("ix_celery_taskmeta_date_done", "ix_celery_tasksetmeta_date_done")


def newer_than_installed_celery() -> tuple[list[tuple[str, str]], list[str]]:
    """The ``(table, column)`` pairs and the indexes of the migration's result tables
    that the installed Celery's models lack (none on the newest Celery)."""
    from celery.backends.database.models import Task, TaskExtended, TaskSet  # noqa: PLC0415

    models = [TaskExtended.__table__, Task.__table__, TaskSet.__table__]
    have_columns = {(table.name, column.name) for table in models for column in table.c}
    have_indexes = {index.name for table in models for index in table.indexes}
    return (
        [pair for pair in NEWER_COLUMNS if pair not in have_columns],
        [index for index in NEWER_INDEXES if index not in have_indexes],
    )


def test_only_celery_before_5_6_lacks_the_newer_result_columns() -> None:
    columns, indexes = newer_than_installed_celery()
    older = celery_release() < (5, 6)
    assert (columns, indexes) == ((list(NEWER_COLUMNS), list(NEWER_INDEXES)) if older else ([], []))


@pytest.mark.parametrize("schema", [None, "celery"])
def test_libraries_create_nothing_on_migrated_tables(
    database: Database, schema: str | None
) -> None:
    """kombu's and Celery's create_all() as app_user (no CREATE right) only inspect."""
    upgrade(database.url, schema=schema, grant_to=[APP_ROLE])
    name = schema or "public"
    before = schema_of(database.admin_engine(), name)
    create_with_libraries(database.app_url, schema)
    assert differences(before, schema_of(database.admin_engine(), name)) == []


def test_without_the_migration_app_user_gets_no_tables(database: Database) -> None:
    """The other side of the coin: app_user cannot let the libraries create them."""
    with pytest.raises(AssertionError, match="permission denied for schema public"):
        create_with_libraries(database.app_url)


# --------------------------------------------------------------------------- lifecycle


def test_upgrade_downgrade_upgrade_leaves_the_same_schema(database: Database) -> None:
    engine = database.admin_engine()
    assert upgrade(database.url) == HEAD
    first = schema_of(engine)
    assert downgrade(database.url, "base") is None
    left = schema_of(engine)
    assert [row[0] for row in left["relations"]] == [VERSION_TABLE]
    assert left["sequences"] == []
    assert current(database.url) is None
    assert upgrade(database.url) == HEAD
    assert differences(first, schema_of(engine)) == []


def test_second_upgrade_changes_nothing(database: Database) -> None:
    engine = database.engine(poolclass=sa.NullPool)
    upgrade(engine)
    before = schema_of(database.admin_engine())
    statements: list[str] = []
    sa.event.listen(
        engine, "before_cursor_execute", lambda *args: statements.append(args[2]), named=False
    )
    assert upgrade(engine) == HEAD
    assert any("pg_advisory_xact_lock" in s for s in statements)
    # It took the lock and read the version: no DDL, no version row written.
    changes = re.compile(r"\s*(CREATE|ALTER|DROP|INSERT|UPDATE|DELETE|GRANT)\b", re.IGNORECASE)
    assert [s for s in statements if changes.match(s)] == []
    assert differences(before, schema_of(database.admin_engine())) == []
    assert scalar(database.admin_engine(), f"SELECT count(*) FROM {VERSION_TABLE}") == 1


def test_concurrent_upgrades_take_turns(database: Database, other_database: Database) -> None:
    """Two processes upgrade at once: both wait on the advisory lock, both return, and
    the database holds what one upgrade alone builds."""
    upgrade(other_database.url)
    admin = database.admin_engine()
    code = "import sys; from tenant_celery.migrations import upgrade; print(upgrade(sys.argv[1]))"
    command = [sys.executable, "-c", code, render(database.url)]
    with psycopg.connect(**libpq_kwargs(database.url), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
        processes = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        try:
            deadline = time.monotonic() + 30
            while _lock_waiters(admin) < 2:
                assert time.monotonic() < deadline, "the upgrades never queued on the lock"
                time.sleep(0.05)
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
        outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [HEAD, HEAD]
    assert scalar(admin, f"SELECT count(*) FROM {VERSION_TABLE}") == 1
    assert differences(schema_of(other_database.admin_engine()), schema_of(admin)) == []


def test_upgrades_in_one_process_take_turns(database: Database) -> None:
    """Alembic's running state is process-wide: threads upgrading at once are serialized."""
    results: list[object] = []

    def run() -> None:
        try:
            results.append(upgrade(database.url))
        except Exception as exc:  # reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [HEAD] * 4
    assert scalar(database.admin_engine(), f"SELECT count(*) FROM {VERSION_TABLE}") == 1


def _lock_waiters(admin: Engine) -> int:
    return int(
        scalar(
            admin,
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()",
        )
    )


def test_current_and_heads(database: Database) -> None:
    assert heads() == (HEAD,)
    assert current(database.url) is None
    # Reading created nothing, not even the version table.
    assert scalar(database.admin_engine(), "SELECT to_regclass(:t) IS NULL", t=VERSION_TABLE)
    upgrade(database.url, schema="celery")
    assert current(database.url) is None  # the version table lives in the schema too
    assert current(database.url, schema="celery") == HEAD


def test_current_needs_a_role_that_may_read_the_version_table(database: Database) -> None:
    upgrade(database.url, grant_to=[APP_ROLE])  # grants cover the tables, not the version
    with pytest.raises(MigrationError, match=f"cannot read .*permission denied .*{VERSION_TABLE}"):
        current(database.app_url)


@pytest.fixture
def schema_owner(database: Database, pg_databases: DatabaseFactory) -> Iterator[URL]:
    """A role without CREATEDB owning a ready-made schema ``celery``; its URL."""
    name = f"tc_mig_{secrets.token_hex(4)}"
    with pg_databases.cluster.connect() as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'pw' NOCREATEDB")
    with pg_databases.cluster.connect(database.name) as conn:
        conn.execute(f"CREATE SCHEMA celery AUTHORIZATION {name}")
    yield database.url.set(username=name, password="pw")
    with pg_databases.cluster.connect(database.name) as conn:
        conn.execute(f"DROP OWNED BY {name}")
    with pg_databases.cluster.connect() as conn:
        conn.execute(f"DROP ROLE {name}")


def test_a_ready_made_schema_needs_no_create_on_the_database(schema_owner: URL) -> None:
    assert upgrade(schema_owner, schema="celery", grant_to=[APP_ROLE]) == HEAD
    assert current(schema_owner, schema="celery") == HEAD


# ------------------------------------------------------------------------------ errors


def test_failing_revision_is_named_and_nothing_changes(database: Database) -> None:
    with database.admin_engine().begin() as conn:
        conn.execute(sa.text("CREATE TABLE kombu_queue (id integer)"))
    with pytest.raises(MigrationError) as caught:
        upgrade(database.url)
    message = str(caught.value)
    assert "running revision tc0001 (Celery's PostgreSQL broker and result tables)" in message
    assert 'relation "kombu_queue" already exists' in message
    assert "nothing was changed" in message
    assert "drop the tables" in message
    assert isinstance(caught.value, TenantCeleryError)
    assert isinstance(caught.value.__cause__, sa.exc.SQLAlchemyError)
    left = schema_of(database.admin_engine())
    assert [row[0] for row in left["relations"]] == ["kombu_queue"]  # no version table either


def test_failing_grant_rolls_the_whole_upgrade_back(database: Database) -> None:
    with pytest.raises(MigrationError, match="granting privileges to role 'no_such_role'"):
        upgrade(database.url, grant_to=[APP_ROLE, "no_such_role"])
    assert schema_of(database.admin_engine())["relations"] == []


def test_failing_downgrade_is_named(database: Database) -> None:
    upgrade(database.url)
    with database.admin_engine().begin() as conn:
        conn.execute(sa.text("DROP SEQUENCE task_id_sequence"))
    with pytest.raises(MigrationError, match=r"downgrade .* running revision tc0001 .*"):
        downgrade(database.url, "base")
    assert current(database.url) == HEAD


def test_unknown_revision(database: Database) -> None:
    with pytest.raises(MigrationError, match=r"cannot upgrade .* to 'nope': Can't locate"):
        upgrade(database.url, "nope")


def test_a_revision_this_version_does_not_ship(database: Database) -> None:
    upgrade(database.url)
    with database.admin_engine().begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = 'tc9999'"))
    with pytest.raises(MigrationError, match=r"the database is at 'tc9999', a revision this"):
        upgrade(database.url)
    assert current(database.url) == "tc9999"


def test_connection_failure_names_the_database_not_the_password(database: Database) -> None:
    url = database.url.set(database="tc_no_such_database", password="s3cret-pw")
    with pytest.raises(MigrationError) as caught:
        upgrade(url)
    message = str(caught.value)
    assert "tc_no_such_database" in message
    assert "while connecting" in message
    assert "s3cret-pw" not in message


def test_app_role_cannot_migrate(database: Database) -> None:
    with pytest.raises(MigrationError, match="permission denied"):
        upgrade(database.app_url)


# -------------------------------------------------------------------------- grants (Gate 3)

GATE3_VERSION = f"SELECT version_num FROM {{schema}}.{VERSION_TABLE}"
GATE3_TABLES = (
    "SELECT count(*) FROM information_schema.tables"
    " WHERE table_schema = :schema AND table_name = ANY(:tables)"
)
#: Rows of ``role_table_grants`` a grantee has: SELECT, INSERT, UPDATE, DELETE on each table.
GRANTS = len(TABLES) * 4
GATE3_PRIVILEGES = (
    "SELECT count(*) FROM information_schema.role_table_grants"
    " WHERE grantee = :role AND table_schema = :schema AND table_name = ANY(:tables)"
)


@pytest.mark.parametrize("schema", [None, "celery"])
def test_gate3_queries_pass(database: Database, schema: str | None) -> None:
    upgrade(database.url, schema=schema, grant_to=[APP_ROLE])
    name = schema or "public"
    params = {"schema": name, "tables": list(TABLES), "role": APP_ROLE}
    with database.admin_engine().connect() as conn:
        versions = conn.execute(sa.text(GATE3_VERSION.format(schema=name))).scalars().all()
        assert versions == [HEAD]
        assert conn.execute(sa.text(GATE3_TABLES), params).scalar_one() == len(TABLES)
        assert conn.execute(sa.text(GATE3_PRIVILEGES), params).scalar_one() == GRANTS
        privileges = conn.execute(
            sa.text(
                "SELECT table_name, privilege_type FROM information_schema.role_table_grants"
                " WHERE grantee = :role AND table_schema = :schema"
            ),
            params,
        ).all()
        assert {p for _, p in privileges} == {"SELECT", "INSERT", "UPDATE", "DELETE"}
        usable = conn.execute(
            sa.text(
                "SELECT count(*) FROM unnest(CAST(:sequences AS text[])) AS s"
                " WHERE has_sequence_privilege(:role, :schema || '.' || s, 'USAGE')"
            ),
            {**params, "sequences": list(SEQUENCES)},
        ).scalar_one()
        assert usable == len(SEQUENCES)
        assert conn.execute(
            sa.text(
                "SELECT has_schema_privilege(:role, :schema, 'USAGE'),"
                " has_schema_privilege(:role, :schema, 'CREATE'),"
                " has_database_privilege(:role, current_database(), 'CREATE')"
            ),
            params,
        ).one() == (True, False, False)


def test_grants_are_reapplied_by_a_no_op_upgrade(database: Database) -> None:
    upgrade(database.url)
    params = {"schema": "public", "tables": list(TABLES), "role": APP_ROLE}
    assert scalar(database.admin_engine(), GATE3_PRIVILEGES, **params) == 0
    upgrade(database.url, grant_to=[APP_ROLE])
    assert scalar(database.admin_engine(), GATE3_PRIVILEGES, **params) == GRANTS
    upgrade(database.url, grant_to=[APP_ROLE])
    assert scalar(database.admin_engine(), GATE3_PRIVILEGES, **params) == GRANTS


# -------------------------------------------------------------------------- offline SQL


@pytest.mark.parametrize("schema", [None, "celery"])
def test_sql_script_builds_what_upgrade_builds(
    database: Database, other_database: Database, schema: str | None
) -> None:
    upgrade(database.url, schema=schema, grant_to=[APP_ROLE])
    script = sql(schema=schema, grant_to=[APP_ROLE])
    with psycopg.connect(**libpq_kwargs(other_database.url), autocommit=True) as conn:
        conn.execute(script)  # BEGIN ... COMMIT, as psql would run it
    name = schema or "public"
    assert (
        differences(
            schema_of(database.admin_engine(), name), schema_of(other_database.admin_engine(), name)
        )
        == []
    )
    assert current(other_database.url, schema=schema) == HEAD
    params = {"schema": name, "tables": list(TABLES), "role": APP_ROLE}
    assert scalar(other_database.admin_engine(), GATE3_PRIVILEGES, **params) == GRANTS


def test_sql_from_head_to_head_is_empty_of_ddl() -> None:
    script = sql(from_revision=HEAD)
    assert "CREATE TABLE" not in script
    assert "pg_advisory_xact_lock" in script


@pytest.mark.parametrize("schema", [None, "celery"])
def test_a_database_at_tc0001_upgrades_and_its_grantees_get_the_transport_tables(
    database: Database, schema: str | None
) -> None:
    """A grant made at tc0001 (``grant_to``, or a host's revision that ran before
    tc0002) carries over to the transport's tables when tc0002 runs."""
    assert upgrade(database.url, LIBRARY_TABLES, schema=schema, grant_to=[APP_ROLE]) == "tc0001"
    params = {"schema": schema or "public", "tables": list(TABLES), "role": APP_ROLE}
    assert scalar(database.admin_engine(), GATE3_PRIVILEGES, **params) == 4 * 4
    assert upgrade(database.url, schema=schema) == HEAD  # no grant_to this time
    assert scalar(database.admin_engine(), GATE3_PRIVILEGES, **params) == GRANTS
    with database.app_engine().begin() as conn:
        table = f"{schema}.tenant_celery_message" if schema else "tenant_celery_message"
        conn.execute(sa.text(f"INSERT INTO {table} (queue, payload) VALUES ('q', '{{}}')"))
        assert conn.execute(sa.text(f"DELETE FROM {table} WHERE queue = 'q'")).rowcount == 1


# ------------------------------------------------------- tc0004: the tenant of each result

RESULT_ROWS = 2000
POPULATE = f"""
INSERT INTO {{schema}}.celery_taskmeta (id, task_id, status, result, date_done, name)
  SELECT nextval('{{schema}}.task_id_sequence'), 'task-' || n, 'SUCCESS',
         convert_to('{{{{"n": ' || n || '}}}}', 'UTF8'), now(), 'tests.add'
  FROM generate_series(1, {RESULT_ROWS}) AS n;
INSERT INTO {{schema}}.celery_tasksetmeta (id, taskset_id, result, date_done)
  SELECT nextval('{{schema}}.taskset_id_sequence'), 'group-' || n, '\\x00', now()
  FROM generate_series(1, {RESULT_ROWS // 10}) AS n;
INSERT INTO {{schema}}.tenant_celery_message (queue, tenant, payload)
  SELECT 'q', 't' || n, '{{{{}}}}' FROM generate_series(1, 100) AS n
"""


def result_rows(engine: Engine, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the result tables and the message table, in a stable order."""
    with engine.connect() as conn:
        return {
            table: [
                tuple(row)
                for row in conn.execute(sa.text(f"SELECT * FROM {schema}.{table} ORDER BY id"))
            ]
            for table in ("celery_taskmeta", "celery_tasksetmeta", "tenant_celery_message")
        }


def tenant_columns(engine: Engine, schema: str) -> set[tuple[str, str, str]]:
    """``(table, type, nullable)`` of each result table's tenant column."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT table_name, data_type, is_nullable FROM information_schema.columns"
                " WHERE table_schema = :schema AND column_name = :column"
            ),
            {"schema": schema, "column": TENANT_COLUMN},
        )
        return {tuple(row) for row in rows}  # type: ignore[misc]


def tenant_indexes(engine: Engine, schema: str) -> set[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT indexname FROM pg_indexes WHERE schemaname = :schema"
                " AND indexdef LIKE '%(' || :column || ')'"
            ),
            {"schema": schema, "column": TENANT_COLUMN},
        )
        return set(rows.scalars())


@pytest.mark.parametrize("schema", [None, "celery"])
def test_tc0004_on_populated_tables_adds_the_result_tenant_and_downgrade_removes_it(
    database: Database, schema: str | None
) -> None:
    """Upgrade and downgrade keep every row; in between, results stored in a tenant
    name it, and the rows that were there name none."""
    name = schema or "public"
    admin = database.admin_engine()
    assert upgrade(database.url, "tc0003", schema=schema, grant_to=[APP_ROLE]) == "tc0003"
    with admin.begin() as conn:
        conn.exec_driver_sql(POPULATE.format(schema=name))
    before = result_rows(admin, name)
    assert tenant_columns(admin, name) == set()

    assert upgrade(database.url, "tc0004", schema=schema) == "tc0004"
    assert tenant_columns(admin, name) == {
        ("celery_taskmeta", "text", "YES"),
        ("celery_tasksetmeta", "text", "YES"),
    }
    assert tenant_indexes(admin, name) == {
        "ix_celery_taskmeta_tenant_id",
        "ix_celery_tasksetmeta_tenant_id",
    }
    after = result_rows(admin, name)
    # The rows that were there, each with a NULL tenant at the end; the messages unchanged.
    assert after["celery_taskmeta"] == [(*row, None) for row in before["celery_taskmeta"]]
    assert after["celery_tasksetmeta"] == [(*row, None) for row in before["celery_tasksetmeta"]]
    assert after["tenant_celery_message"] == before["tenant_celery_message"]

    # The application role stores a tenant's result in the new column.
    app = Celery("tc0004", set_as_current=False)
    app.conf.update(
        result_backend="tenant_celery.results:PooledDatabaseBackend",
        database_url=render(database.app_url),
        database_table_schemas={"task": schema, "group": schema},
    )
    with tenant_context(TENANT):
        app.backend.store_result("task-new", 1, "SUCCESS")
        app.backend.store_result("task-1", 2, "SUCCESS")  # SUCCESS already: unchanged
    with admin.connect() as conn:
        stored = conn.execute(
            sa.text(
                f"SELECT task_id, tenant_id FROM {name}.celery_taskmeta WHERE tenant_id IS NOT NULL"
            )
        ).all()
    assert [tuple(row) for row in stored] == [("task-new", TENANT)]
    dispose_engines()
    with_new = result_rows(admin, name)

    assert downgrade(database.url, "tc0003", schema=schema) == "tc0003"
    assert tenant_columns(admin, name) == set()
    assert tenant_indexes(admin, name) == set()
    down = result_rows(admin, name)
    assert down["celery_taskmeta"] == [row[:-1] for row in with_new["celery_taskmeta"]]
    assert down["celery_tasksetmeta"] == before["celery_tasksetmeta"]
    assert down["tenant_celery_message"] == before["tenant_celery_message"]
    assert len(down["celery_taskmeta"]) == RESULT_ROWS + 1

    assert upgrade(database.url, "tc0004", schema=schema) == "tc0004"


def test_tc0004_downgrade_is_refused_while_the_results_are_under_the_policy(
    database: Database,
) -> None:
    """The host's opt-in reads the column: its revision must be undone first."""
    upgrade(database.url, "tc0004")
    with database.admin_engine().begin() as conn:
        enable_tenant_rls(conn, "celery_taskmeta")
    with pytest.raises(MigrationError, match="tc0004"):
        downgrade(database.url, "tc0003")
    assert current(database.url) == "tc0004"
