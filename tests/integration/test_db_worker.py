"""``bind_tenant_guc`` inside real workers: task bodies that never mention the
tenant read and write only their tenant's rows, as ``app_user``."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa
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


# --- a careless host, one worker process or thread at a time ------------------------

CARELESS_MATRIX = [
    pytest.param(("redis", pool), id=f"redis-{pool}", marks=pytest.mark.worker)
    for pool in ("prefork", "solo", "threads")
]
# Concurrency 1: every task meets the session and the pooled connection the previous
# task left, as it does on a busy worker.
careless_worker = worker_fixture(
    guc_app.__name__, name="careless_worker", matrix=CARELESS_MATRIX, concurrency=1
)


@pytest.fixture
def seeded(notes_table: Database) -> tuple[str, str]:
    """Two new tenants with two rows each; ``notes.tenant_id`` defaults to the setting,
    as the sessions how-to shows."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    with notes_table.admin_engine().begin() as conn:
        conn.execute(
            sa.text(
                "ALTER TABLE notes ALTER COLUMN tenant_id"
                " SET DEFAULT current_setting('app.current_tenant_id')::uuid"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO notes (tenant_id, body) VALUES"
                " (:a, :a1), (:a, :a2), (:b, :b1), (:b, :b2)"
            ),
            {"a": a, "b": b, "a1": f"{a}-1", "a2": f"{a}-2", "b1": f"{b}-1", "b2": f"{b}-2"},
        )
    return a, b


def owners(database: Database, *bodies: str) -> dict[str, str]:
    """Tenant of each row with one of ``bodies``, as the superuser sees it."""
    with database.admin_engine().connect() as conn:
        rows = conn.execute(
            sa.text("SELECT body, tenant_id::text FROM notes WHERE body = ANY(:b)"),
            {"b": list(bodies)},
        )
        return dict(rows.all())


def test_session_left_open_does_not_carry_its_tenant(
    notes_table: Database, careless_worker: WorkerHandle, seeded: tuple[str, str]
) -> None:
    a, b = seeded
    with tenant_context(a):
        assert get(guc_app.read_and_leave_open.delay()) == [f"{a}-1", f"{a}-2"]
    new_body = f"{b}-new"
    with tenant_context(b):
        assert get(guc_app.read_then_insert.delay(new_body)) == [f"{b}-1", f"{b}-2"]
        assert get(guc_app.read_and_leave_open.delay()) == [f"{b}-1", f"{b}-2", new_body]
    assert get(guc_app.bodies_without_tenant.delay()) == []
    assert owners(notes_table, new_body) == {new_body: b}
    careless_worker.wait_for_log(
        r"task [\w.]+read_and_leave_open\[[-\w]+\] ended with a transaction"
    )


@pytest.mark.parametrize("raw", [False, True], ids=["statement", "raw-connection"])
def test_session_level_setting_does_not_reach_the_next_checkout(
    notes_table: Database, careless_worker: WorkerHandle, seeded: tuple[str, str], raw: bool
) -> None:
    a, b = seeded
    assert get(guc_app.leave_session_setting.delay(a, raw)) == "left"
    assert get(guc_app.bodies_without_tenant.delay()) == []
    get(guc_app.leave_session_setting.delay(a, raw))
    with tenant_context(b):
        seen = get(guc_app.raw_bodies.delay())
    assert not [body for body in seen if body.startswith(a)]
    assert seen == []


def test_autocommit_is_refused_whatever_the_session_holds(
    notes_table: Database, careless_worker: WorkerHandle, seeded: tuple[str, str]
) -> None:
    a, b = seeded
    get(guc_app.leave_session_setting.delay(a, False))  # tenant A at session level
    with tenant_context(b):
        result = guc_app.autocommit_bodies.delay()
        with pytest.raises(Exception, match="AUTOCOMMIT") as info:
            get(result)
    assert type(info.value).__name__ == "TransactionRequired"
    # Nothing of A's was read: the task's only result is the refusal.
    assert result.state == "FAILURE"
    assert f"{a}-1" not in str(result.result)


def test_twophase_transaction_sees_its_tenant_not_the_session(
    notes_table: Database, careless_worker: WorkerHandle, seeded: tuple[str, str]
) -> None:
    a, b = seeded
    get(guc_app.leave_session_setting.delay(a, False))  # tenant A at session level
    with tenant_context(b):
        seen = get(guc_app.twophase_bodies.delay())
    assert seen == [f"{b}-1", f"{b}-2"]
