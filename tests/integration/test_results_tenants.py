"""Results that belong to a tenant: ``tenant_id`` on the result tables (revision
``tc0004``), :func:`~tenant_celery.results.purge_results`, and the opt-in tenant
policy on the result tables.

Real PostgreSQL throughout, results stored and read as ``app_user`` (neither
owner nor superuser, so a policy binds it); the policy is put on by the
tables' owner with :func:`~tenant_celery.rls.enable_tenant_rls`, as a host's
revision does.  The last tests run real ``celery worker`` processes: chords
(whose ``celery.chord_unlock`` reads the header's results in the worker) and
groups, for two tenants at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery, chord, group, states
from celery.exceptions import ChordError, TaskRevokedError, TimeLimitExceeded
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult, GroupResult

from tenant_celery import InvalidTenantId, TenantContextMissing, tenant_context
from tenant_celery.errors import ConfigurationError
from tenant_celery.migrations import RESULT_TABLES, TENANT_COLUMN, upgrade
from tenant_celery.results import (
    PooledDatabaseBackend,
    PurgedResults,
    dispose_engines,
    purge_results,
)
from tenant_celery.rls import enable_tenant_rls
from tests._rig.env import celery_release
from tests._rig.pages import DOCS, python_blocks
from tests._rig.postgres import APP_ROLE, Database, render
from tests._rig.worker import Pool, WorkerFactory, rebind_app

from . import tenant_results_app

POOLED = "tenant_celery.results:PooledDatabaseBackend"
TENANT_A = "6f1c1d52-1f0e-4c39-9a43-5b1f0c1e2a01"
TENANT_B = "0d5b7f7e-3c7a-4d0b-8c55-2a9e4b6f1c02"


@pytest.fixture
def migrated(database: Database) -> Iterator[Database]:
    """``database`` at the head revision, granted to ``app_user``; pooled engines
    released afterwards so the database can be dropped."""
    upgrade(database.url, grant_to=[APP_ROLE])
    yield database
    dispose_engines()


def put_results_under_policy(database: Database) -> None:
    """The host's opt-in: the tenant policy on both result tables, made by their owner."""
    with database.admin_engine().begin() as conn:
        for table in RESULT_TABLES:
            enable_tenant_rls(conn, table)


def results_app(database: Database, **conf: Any) -> Celery:
    """An app storing results in ``database`` as ``app_user`` with the pooled backend."""
    app = Celery("results_tenants_test", set_as_current=False)
    app.conf.update(
        result_backend=POOLED,
        database_url=render(database.app_url),
        result_serializer="json",
        accept_content=["json"],
        **conf,
    )
    return app


def tenants_of(database: Database, table: str, key: str) -> dict[str, str | None]:
    """``{task or group id: tenant}`` of every row, read by the superuser."""
    with database.admin_engine().connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {key}, {TENANT_COLUMN} FROM {table}"))
        return {row[0]: row[1] for row in rows}


def task_tenants(database: Database) -> dict[str, str | None]:
    return tenants_of(database, "celery_taskmeta", "task_id")


def group_tenants(database: Database) -> dict[str, str | None]:
    return tenants_of(database, "celery_tasksetmeta", "taskset_id")


def new_id() -> str:
    return str(uuid.uuid4())


# ----------------------------------------------------------------- in this process


def test_results_and_groups_carry_the_tenant_they_were_stored_in(migrated: Database) -> None:
    app = results_app(migrated)
    backend = app.backend
    ids = {name: new_id() for name in ("a", "b", "none", "group_a")}

    with tenant_context(TENANT_A):
        backend.store_result(ids["a"], 1, states.STARTED)
        group = GroupResult(ids["group_a"], [AsyncResult(ids["a"], app=app)], app=app)
        backend.save_group(ids["group_a"], group)
    with tenant_context(TENANT_B):
        backend.store_result(ids["b"], 2, states.SUCCESS)
    backend.store_result(ids["none"], 3, states.SUCCESS)
    # A later state written outside any tenant keeps the row's tenant.
    backend.store_result(ids["a"], 4, states.SUCCESS)

    assert task_tenants(migrated) == {ids["a"]: TENANT_A, ids["b"]: TENANT_B, ids["none"]: None}
    assert group_tenants(migrated) == {ids["group_a"]: TENANT_A}
    assert backend.get_task_meta(ids["a"])["result"] == 4
    restored = backend.restore_group(ids["group_a"])
    assert [r.id for r in restored.results] == [ids["a"]]


def test_without_the_policy_any_tenant_reads_a_result(migrated: Database) -> None:
    """The opt-in is off: the rows name their tenant, but reading is not filtered."""
    app = results_app(migrated)
    task_id = new_id()
    with tenant_context(TENANT_A):
        app.backend.store_result(task_id, "done in A", states.SUCCESS)
    assert not app.backend.result_tables().policy
    with tenant_context(TENANT_B):
        assert results_app(migrated).backend.get_task_meta(task_id)["result"] == "done in A"
    assert results_app(migrated).backend.get_task_meta(task_id)["result"] == "done in A"


def store_for_purge(database: Database) -> dict[str, list[str]]:
    """Results of A (5 tasks, 2 groups), B (3 tasks, 1 group) and no tenant (2 tasks)."""
    backend = results_app(database).backend
    made: dict[str, list[str]] = {"a": [], "b": [], "none": []}
    for key, tenant, tasks, groups in (("a", TENANT_A, 5, 2), ("b", TENANT_B, 3, 1)):
        with tenant_context(tenant):
            for n in range(tasks):
                made[key].append(new_id())
                backend.store_result(made[key][-1], n, states.SUCCESS)
            for _ in range(groups):
                group_id = new_id()
                backend.save_group(group_id, GroupResult(group_id, [AsyncResult(made[key][0])]))
    for n in range(2):
        made["none"].append(new_id())
        backend.store_result(made["none"][-1], n, states.SUCCESS)
    return made


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_purge_deletes_one_tenants_results_and_groups(migrated: Database, policy: bool) -> None:
    made = store_for_purge(migrated)
    if policy:
        put_results_under_policy(migrated)

    # As the application role; under the policy it sees only the tenant it purges.
    purged = purge_results(render(migrated.app_url), TENANT_A.upper())

    assert purged == PurgedResults(tenant_id=TENANT_A, tasks=5, groups=2)
    left = task_tenants(migrated)
    assert sorted(left) == sorted(made["b"] + made["none"])
    assert sorted(group_tenants(migrated).values()) == [TENANT_B]
    # Again: nothing left of A.
    assert purge_results(migrated.app_engine(), TENANT_A) == PurgedResults(TENANT_A, 0, 0)


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_purge_as_the_how_to_shows(
    migrated: Database, policy: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """The how-to's ``purge_results`` block, taken from the page, run as ``app_user``
    with the rig's URL for its placeholder."""
    page = "howto/result-backend.md"
    (block,) = [b for b in python_blocks(page) if "purge_results(" in b.source]
    placeholder = "postgresql://app_user:secret@db/app"
    assert placeholder in block.source
    code = block.source.replace(placeholder, render(migrated.app_url))
    made = store_for_purge(migrated)
    if policy:
        put_results_under_policy(migrated)

    # Blank lines first, so a traceback names the page's lines.
    code = "\n" * (block.first_code_line - 1) + code
    exec(compile(code, str(DOCS / page), "exec"), {"tenant_id": TENANT_A})

    assert capsys.readouterr().out == "5 2\n"
    assert sorted(task_tenants(migrated)) == sorted(made["b"] + made["none"])
    assert sorted(group_tenants(migrated).values()) == [TENANT_B]


def test_purge_refuses_a_bad_tenant_id_before_sending_anything(migrated: Database) -> None:
    made = store_for_purge(migrated)
    engine = migrated.app_engine()
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with pytest.raises(InvalidTenantId):
        purge_results(engine, "not-a-uuid; DELETE FROM celery_taskmeta")
    assert statements == []
    assert len(task_tenants(migrated)) == sum(map(len, made.values()))


def test_purge_needs_the_tenant_column(database: Database) -> None:
    upgrade(database.url, "tc0003", grant_to=[APP_ROLE])
    with pytest.raises(ConfigurationError, match="no tenant_id column: upgrade"):
        purge_results(render(database.app_url), TENANT_A)


def test_under_the_policy_a_tenant_reads_only_its_own_results(migrated: Database) -> None:
    put_results_under_policy(migrated)
    app = results_app(migrated)
    backend = app.backend
    a_task, b_task, a_group = new_id(), new_id(), new_id()
    with tenant_context(TENANT_A):
        backend.store_result(a_task, "secret of A", states.SUCCESS)
        group = GroupResult(a_group, [AsyncResult(a_task, app=app)], app=app)
        backend.save_group(a_group, group)
    with tenant_context(TENANT_B):
        backend.store_result(b_task, "secret of B", states.SUCCESS)

    reader = results_app(migrated).backend  # another app: nothing cached
    assert reader.result_tables().policy
    with tenant_context(TENANT_A):
        assert reader.get_task_meta(a_task)["result"] == "secret of A"
        assert reader.get_task_meta(b_task)["status"] == states.PENDING
        assert reader.restore_group(a_group) is not None
    with tenant_context(TENANT_B):
        assert reader.get_task_meta(a_task, cache=False)["status"] == states.PENDING
        assert reader.restore_group(a_group) is None
        reader.forget(a_task)  # deletes nothing of A's
        reader.delete_group(a_group)
    # Outside any tenant, nothing at all.
    assert reader.get_task_meta(b_task, cache=False)["status"] == states.PENDING
    assert reader.get_task_meta(a_task, cache=False)["status"] == states.PENDING
    assert task_tenants(migrated) == {a_task: TENANT_A, b_task: TENANT_B}
    assert group_tenants(migrated) == {a_group: TENANT_A}


def test_under_the_policy_a_result_of_no_tenant_is_refused(migrated: Database) -> None:
    put_results_under_policy(migrated)
    backend = results_app(migrated).backend
    with pytest.raises(TenantContextMissing, match="under the tenant policy"):
        backend.store_result(new_id(), 1, states.SUCCESS)
    with pytest.raises(TenantContextMissing, match="under the tenant policy"):
        backend.save_group(new_id(), GroupResult(new_id(), []))
    assert task_tenants(migrated) == {}
    assert group_tenants(migrated) == {}


def test_the_policy_binds_the_engine_with_the_apps_setting(migrated: Database) -> None:
    """A host whose policy reads another setting names it in ``tenant_celery_guc``."""
    with migrated.admin_engine().begin() as conn:
        for table in RESULT_TABLES:
            enable_tenant_rls(conn, table, setting="billing.tenant")
    backend = results_app(migrated, tenant_celery_guc="billing.tenant").backend
    task_id = new_id()
    with tenant_context(TENANT_A):
        backend.store_result(task_id, "kept", states.SUCCESS)
        assert backend.get_task_meta(task_id)["result"] == "kept"
    assert task_tenants(migrated) == {task_id: TENANT_A}


# --------------------------------------------------------------- real workers


def worker_conf(database: Database, broker_url: str, queue: str) -> dict[str, Any]:
    return {
        "broker_url": broker_url,
        "task_default_queue": queue,
        "result_backend": POOLED,
        "database_url": render(database.app_url),
    }


def run_tenant_work(tenant: str, size: int) -> dict[str, Any]:
    """Publish, in ``tenant``: one task, a group and a chord; wait for all of them."""
    app = tenant_results_app
    with tenant_context(tenant):
        single = app.whoami.delay()
        grouped = group(app.add.s(n, n) for n in range(size)).apply_async()
        chorded = chord(app.add.s(n, 1) for n in range(size))(app.total.s())
        return {
            "single": single,
            "group": grouped,
            "chord": chorded,
            "values": (
                single.get(timeout=60),
                grouped.get(timeout=60),
                chorded.get(timeout=60),
            ),
        }


@pytest.mark.worker
@pytest.mark.parametrize("pool", ["prefork", "threads"])
@pytest.mark.parametrize("policy", [True, False], ids=["policy", "no-policy"])
def test_worker_results_of_two_tenants_with_groups_and_chords(
    migrated: Database, start_worker: WorkerFactory, pool: Pool, policy: bool
) -> None:
    if policy:
        put_results_under_policy(migrated)
    handle = start_worker(
        "tests.integration.tenant_results_app",
        broker="redis",
        backend="postgres",
        database_role="app",
        pool=pool,
        concurrency=2,
    )
    app = tenant_results_app.app
    rebind_app(app, worker_conf(migrated, handle.broker_url, handle.queue))
    assert isinstance(app.backend, PooledDatabaseBackend)
    try:
        size = 6
        a = run_tenant_work(TENANT_A, size)
        b = run_tenant_work(TENANT_B, size)

        assert a["values"] == (TENANT_A, [2 * n for n in range(size)], sum(range(1, size + 1)))
        assert b["values"] == (TENANT_B, [2 * n for n in range(size)], sum(range(1, size + 1)))
        stored = task_tenants(migrated)
        for work, tenant in ((a, TENANT_A), (b, TENANT_B)):
            ids = [work["single"].id, work["chord"].id]
            ids += [r.id for r in work["group"].results] + [r.id for r in work["chord"].parent]
            assert {stored[i] for i in ids} == {tenant}
        assert set(stored.values()) == {TENANT_A, TENANT_B}, "every result names its tenant"

        # B looks up A's results by id, with a client of its own (no cached meta).
        reader = Celery("reader", set_as_current=False)
        reader.conf.update(worker_conf(migrated, handle.broker_url, handle.queue))
        with tenant_context(TENANT_B):
            seen = AsyncResult(a["chord"].id, app=reader)
            if policy:
                assert seen.state == states.PENDING
                with pytest.raises(CeleryTimeout):
                    seen.get(timeout=1.5)
            else:
                assert seen.get(timeout=5) == sum(range(1, size + 1))

        counted = purge_results(render(migrated.app_url), TENANT_A)
        assert counted.tasks == 1 + size + size + 1
        assert set(task_tenants(migrated).values()) == {TENANT_B}
        assert handle.alive
    finally:
        rebind_app(app, {"result_backend": None, "broker_url": "memory://"})


@pytest.mark.worker
def test_worker_failures_under_the_policy_are_stored_in_the_tenant(
    migrated: Database, start_worker: WorkerFactory
) -> None:
    """A chord whose header fails (``celery.chord_unlock`` stores the body's failure),
    a task killed by its hard time limit, and tasks expired or revoked before they
    ran (the worker's main process stores those)."""
    put_results_under_policy(migrated)
    handle = start_worker(
        "tests.integration.tenant_results_app",
        broker="redis",
        backend="postgres",
        database_role="app",
        pool="prefork",
        concurrency=2,
    )
    app = tenant_results_app.app
    rebind_app(app, worker_conf(migrated, handle.broker_url, handle.queue))
    try:
        with tenant_context(TENANT_A):
            tasks = tenant_results_app
            failed = chord([tasks.add.s(1, 1), tasks.fail.s("header")])(tasks.total.s())
            killed = tasks.overrun.delay(30)
            expired = tasks.add.apply_async((1, 2), expires=datetime.now(UTC) - timedelta(1))
            revoked = tasks.add.signature((2, 3)).freeze()
            # The worker has the id in its revoked set before the task is published.
            assert app.control.revoke(revoked.id, reply=True, timeout=10, limit=1)
            revoked = tasks.add.apply_async((2, 3), task_id=revoked.id)
            for result in (expired, revoked):
                with pytest.raises(TaskRevokedError):
                    result.get(timeout=60)
            with pytest.raises(ValueError, match="header"):
                failed.get(timeout=60)  # the header's error, read first
            # The body's failure, stored by celery.chord_unlock in the chord's tenant.
            body = AsyncResult(failed.id, app=app).get(timeout=60, propagate=False)
            assert isinstance(body, ChordError)
            assert "ValueError('header')" in str(body)
            with pytest.raises(TimeLimitExceeded):
                killed.get(timeout=60)
        stored = task_tenants(migrated)
        assert {stored[r.id] for r in (failed, killed, expired, revoked)} == {TENANT_A}
        if celery_release() >= (5, 7):
            # Celery 5.7 stores a revoke at once, in no tenant: refused, nothing written.
            assert f"Failed to mark task {revoked.id} as revoked" in handle.log_text()
        with tenant_context(TENANT_B):
            assert AsyncResult(killed.id, app=app).state == states.PENDING
        assert handle.alive
    finally:
        rebind_app(app, {"result_backend": None, "broker_url": "memory://"})
