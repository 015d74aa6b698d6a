"""``bind_tenant_guc`` inside real workers: task bodies that never mention the
tenant read and write only their tenant's rows, as ``app_user``."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery.result import AsyncResult

from tenant_celery import tenant_context
from tests._rig.postgres import Database
from tests._rig.worker import WorkerHandle, worker_fixture

from . import guc_app
from .notes import count_all, create_notes

pytestmark = pytest.mark.worker

MATRIX = [
    pytest.param(("redis", "prefork"), id="redis-prefork", marks=pytest.mark.worker),
    pytest.param(("postgres", "threads"), id="postgres-threads", marks=pytest.mark.worker),
]


@pytest.fixture(scope="module")
def notes_table(module_database: Database) -> Database:
    """``notes`` in the database the module's workers use."""
    create_notes(module_database.admin_engine())
    return module_database


guc_worker = worker_fixture(guc_app.__name__, name="guc_worker", matrix=MATRIX)


def get(result: AsyncResult[Any]) -> Any:
    return result.get(timeout=60)


def test_tasks_see_only_their_tenants_rows(notes_table: Database, guc_worker: WorkerHandle) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    before = count_all(notes_table.admin_engine())
    results = []
    for index in range(6):
        tenant = (a, a, a, b, b, a)[index]
        with tenant_context(tenant):
            results.append(guc_app.add_note.delay(f"{tenant[:4]}-{index}"))
    written = [get(result) for result in results]
    assert [w["tenant"] for w in written] == [a, a, a, b, b, a]
    with tenant_context(a):
        seen_by_a = get(guc_app.visible_notes.delay())
    with tenant_context(b):
        seen_by_b = get(guc_app.visible_notes.delay())
    assert sorted(seen_by_a) == sorted(f"{a[:4]}-{i}" for i in (0, 1, 2, 5))
    assert sorted(seen_by_b) == sorted(f"{b[:4]}-{i}" for i in (3, 4))
    assert count_all(notes_table.admin_engine()) == before + 6
    # Outside any tenant the hook sets nothing: RLS shows no rows at all.
    assert get(guc_app.count_without_tenant.delay()) == 0


def test_writing_into_another_tenant_is_refused(
    notes_table: Database, guc_worker: WorkerHandle
) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    before = count_all(notes_table.admin_engine())
    with tenant_context(a):
        result = guc_app.write_into.delay(b)
    with pytest.raises(Exception, match="row-level security"):
        get(result)
    assert count_all(notes_table.admin_engine()) == before
