"""Self-tests of the test rig: databases, the app role, RLS, and real workers."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa
from celery import Celery
from celery.signals import before_task_publish
from sqlalchemy.engine import Engine

from tenant_celery.correlation import _stamp_correlation
from tests._rig.appconf import apply_test_config
from tests._rig.postgres import APP_ROLE, Database, DatabaseFactory, libpq_kwargs
from tests._rig.worker import WorkerFactory, WorkerHandle, worker_fixture
from tests.integration import rig_app

# --------------------------------------------------------------------- databases


def test_databases_are_fresh_and_distinct(
    database: Database, module_database: Database, pg_databases: DatabaseFactory
) -> None:
    assert database.name != module_database.name
    assert database.name.startswith(pg_databases.tag, 3)
    with database.admin_engine().connect() as conn:
        assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == database.name
        tables = conn.execute(
            sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        ).scalar_one()
    assert tables == 0


def test_database_is_dropped_after_its_block(pg_databases: DatabaseFactory) -> None:
    with pg_databases.database() as db, db.app_engine().connect() as conn:
        conn.execute(sa.text("SELECT 1"))  # an open pooled connection must not block DROP
        name = db.name
    with pg_databases.cluster.connect() as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert row is None


def test_app_engine_is_an_unprivileged_role(app_engine: Engine) -> None:
    with app_engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT current_user, rolsuper, rolbypassrls, rolcreatedb, rolcreaterole,"
                " rolcanlogin FROM pg_roles WHERE rolname = current_user"
            )
        ).one()
        can_create = conn.execute(
            sa.text("SELECT has_schema_privilege('public', 'CREATE')")
        ).scalar_one()
    assert tuple(row) == (APP_ROLE, False, False, False, False, True)
    assert can_create is False


def test_app_url_connects_as_app_user(database: Database) -> None:
    # Both servers the rig uses trust local connections: the password is sent, not checked.
    with psycopg.connect(**libpq_kwargs(database.app_url)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_ROLE,)


def test_rls_filters_app_user_but_not_the_superuser(
    admin_engine: Engine, app_engine: Engine
) -> None:
    with admin_engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE notes (tenant_id int NOT NULL, body text)"))
        conn.execute(sa.text("INSERT INTO notes VALUES (1, 'one'), (2, 'two')"))
        conn.execute(sa.text("ALTER TABLE notes ENABLE ROW LEVEL SECURITY"))
        conn.execute(
            sa.text(
                "CREATE POLICY tenant_isolation ON notes USING (tenant_id = "
                "(SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::int))"
            )
        )
        conn.execute(sa.text(f"GRANT SELECT, INSERT ON notes TO {APP_ROLE}"))
        owner = conn.execute(
            sa.text("SELECT tableowner FROM pg_tables WHERE tablename = 'notes'")
        ).scalar_one()
    assert owner != APP_ROLE

    count = sa.text("SELECT count(*) FROM notes")
    with app_engine.begin() as conn:
        assert conn.execute(count).scalar_one() == 0  # no tenant: nothing visible
        conn.execute(sa.text("SELECT set_config('app.current_tenant_id', '1', true)"))
        assert conn.execute(sa.text("SELECT body FROM notes")).scalars().all() == ["one"]
    with app_engine.begin() as conn:  # transaction-local setting is gone
        assert conn.execute(count).scalar_one() == 0
    with app_engine.begin() as conn, pytest.raises(sa.exc.ProgrammingError):
        conn.execute(sa.text("INSERT INTO notes VALUES (3, 'three')"))  # policy WITH CHECK
    with admin_engine.connect() as conn:
        assert conn.execute(count).scalar_one() == 2  # the superuser bypasses RLS


# ----------------------------------------------------------------------- workers

worker = worker_fixture("tests.integration.rig_app", name="worker")


def test_worker_runs_tasks(worker: WorkerHandle) -> None:
    assert rig_app.add.delay(2, 3).get(timeout=20) == 5
    info = rig_app.whoami.delay().get(timeout=20)
    if worker.pool == "prefork":
        assert info["ppid"] == worker.pid
    else:
        assert info["pid"] == worker.pid
    assert worker.alive
    assert "Task tests.integration.rig_app.add[" in worker.log_text()


def test_custom_header_reaches_the_worker(worker: WorkerHandle) -> None:
    result = rig_app.request_info.apply_async(("x_probe",), headers={"x_probe": "abc"})
    info = result.get(timeout=20)
    assert info["queue"] == worker.queue
    assert info["attribute"] == "abc"
    assert info["in_headers"] == "abc"
    # Without custom headers, request.headers is None (not {}) on every broker.
    # tenant_celery stamps a correlation id on every publish: switch that off here.
    uid = "tenant_celery.stamp_correlation"
    assert before_task_publish.disconnect(dispatch_uid=uid)
    try:
        bare = rig_app.request_info.delay("x_probe").get(timeout=20)
    finally:
        before_task_publish.connect(_stamp_correlation, weak=False, dispatch_uid=uid)
    assert (bare["attribute"], bare["headers_type"]) == (None, "NoneType")


def test_worker_env_points_at_its_database(worker: WorkerHandle) -> None:
    assert rig_app.database_user.delay().get(timeout=20) == APP_ROLE


@pytest.mark.worker
def test_function_scoped_worker_solo(start_worker: WorkerFactory) -> None:
    handle = start_worker("tests.integration.rig_app", broker="redis", pool="solo")
    client = apply_test_config(Celery("client", set_as_current=False))
    with handle.bind(client):
        info = client.send_task("tests.integration.rig_app.whoami").get(timeout=20)
    assert info["pid"] == handle.pid
    assert client.conf.broker_url == "memory://"
    assert client.conf.result_backend is None
    assert handle.stop() == 0
    assert not handle.alive
