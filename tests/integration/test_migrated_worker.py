"""Real workers on the migrated tables, connected as the granted ``app_user`` (no
CREATE right): kombu's SQLAlchemy broker carries the tasks, Celery's database
backend stores the results, and neither library creates or alters anything."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery.result import AsyncResult

from tenant_celery.migrations import upgrade
from tests._rig.postgres import APP_ROLE, Database
from tests._rig.worker import Pool, WorkerFactory, rebind_app

from . import migrated_app
from .schema_catalog import differences, snapshot

pytestmark = pytest.mark.worker


@pytest.fixture
def client_settings(request: pytest.FixtureRequest) -> Iterator[None]:
    """Restore the settings a test changes on the in-process app."""
    app = migrated_app.app
    keys = ("result_extended", "broker_transport_options", "database_table_schemas")
    saved = {key: app.conf.get(key) for key in keys}
    yield
    rebind_app(app, saved)


def get(result: AsyncResult[Any]) -> Any:
    return result.get(timeout=60)


@pytest.mark.parametrize(
    ("schema", "extended", "pool"),
    [
        pytest.param(None, True, "prefork", id="public-extended-prefork"),
        pytest.param(None, False, "threads", id="public-plain-threads"),
        pytest.param("celery", True, "prefork", id="schema-extended-prefork"),
    ],
)
def test_worker_as_app_user_runs_on_migrated_tables(
    database: Database,
    start_worker: WorkerFactory,
    client_settings: None,
    schema: str | None,
    extended: bool,
    pool: Pool,
) -> None:
    upgrade(database.url, schema=schema, grant_to=[APP_ROLE])
    admin = database.admin_engine()
    name = schema or "public"
    where = f"{schema}." if schema else ""
    with admin.connect() as conn:
        before = snapshot(conn, name)
        rights = conn.execute(
            sa.text(
                "SELECT has_schema_privilege(:role, :schema, 'CREATE'),"
                " has_database_privilege(:role, current_database(), 'CREATE')"
            ),
            {"role": APP_ROLE, "schema": name},
        ).one()
    assert tuple(rights) == (False, False), "app_user must not be able to create tables"

    handle = start_worker(
        migrated_app.__name__,
        broker="postgres",
        backend="postgres",
        pool=pool,
        database_role="app",
        extra_env={
            migrated_app.SCHEMA_ENV: schema or None,
            migrated_app.EXTENDED_ENV: "1" if extended else "0",
        },
    )
    assert f"{APP_ROLE}:" in handle.broker_url
    assert f"{APP_ROLE}:" in handle.backend_url
    migrated_app.point_at(schema, extended=extended)
    with handle.bind(migrated_app.app):
        sums = [migrated_app.add.delay(n, n) for n in range(5)]
        assert [get(r) for r in sums] == [0, 2, 4, 6, 8]
        failed = migrated_app.fail.delay("no luck")
        with pytest.raises(ValueError, match="no luck"):
            get(failed)
        assert failed.state == "FAILURE"

    with admin.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT task_id, status, name, queue, worker, traceback IS NOT NULL"
                f" FROM {where}celery_taskmeta"
            )
        ).all()
        by_id = {row.task_id: row for row in rows}
        queues = conn.execute(sa.text(f"SELECT name FROM {where}kombu_queue")).scalars().all()
        delivered = conn.execute(
            sa.text(f"SELECT count(*) FROM {where}kombu_message WHERE NOT visible")
        ).scalar_one()
        sessions = conn.execute(
            sa.text(
                "SELECT DISTINCT usename FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalars()
        assert APP_ROLE in set(sessions)
        after = snapshot(conn, name)

    assert {by_id[r.id].status for r in sums} == {"SUCCESS"}
    assert by_id[failed.id].status == "FAILURE"
    assert by_id[failed.id][-1] is True  # the traceback was stored
    task_row = by_id[sums[0].id]
    if extended:
        assert task_row.name == migrated_app.add.name
        assert task_row.queue == handle.queue
        assert task_row.worker.startswith(handle.name)
    else:
        assert (task_row.name, task_row.queue, task_row.worker) == (None, None, None)
    assert handle.queue in queues
    assert delivered >= 6
    # Neither library created or altered anything, and none of them tried to.
    assert differences(before, after) == []
    log = handle.log_text()
    for complaint in ("permission denied", "Failed to add missing column", "Failed to inspect"):
        assert complaint not in log, handle.log_tail()
