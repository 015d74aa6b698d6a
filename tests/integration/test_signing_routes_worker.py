"""A publisher without a key, trying every route by which Celery replays part of a message.

With signing on, a worker runs a tenant task only in a tenant a key holder
named.  Celery itself publishes parts of the messages it handles: chain steps,
link callbacks, errbacks, the items of ``celery.map``/``celery.starmap``, and
``tenant_celery.for_each_tenant``'s fan-out.  Each test here is the attacker's:
it publishes one unsigned message (as a process holding no key), then reads,
as the superuser, the ``signed_marks`` rows the tenant tasks write, to show
what ran in which tenant.  The last tests show that the application's own
work (signed canvas, ``fan_out`` in a worker, the beat schedule's fan-out)
still runs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from celery import chord, current_app
from celery.result import AsyncResult
from sqlalchemy.engine import Engine

from tenant_celery import TenantConflict, tenant_context
from tenant_celery.fanout import FOR_EACH_TENANT_TASK
from tenant_celery.signing import TenantSignatureError
from tests._rig.postgres import APP_ROLE, Database
from tests._rig.worker import WorkerHandle, worker_fixture

from . import signing_app as tasks

pytestmark = pytest.mark.worker

KEYS_ENV = "TENANT_CELERY_HEADER_SIGNING_KEYS"
KEYS = ["routes-key-2026-new-5f0c8e7a9b1d4c3e", "routes-key-2025-old-0a9e8d7c6b5a4f3e"]
A, B = tasks.LISTED
TIMEOUT = 60
#: How long a message that would run if published is given to show up.
SETTLE = 3.0


@pytest.fixture(scope="module", autouse=True)
def marks(module_database: Database) -> Iterator[Engine]:
    """The ``signed_marks`` table (read as the superuser), and this process's app signing."""
    engine = module_database.admin_engine()
    with engine.begin() as conn:
        conn.exec_driver_sql(tasks.MARKS_DDL)
        conn.exec_driver_sql(f"GRANT SELECT, INSERT ON signed_marks TO {APP_ROLE}")
    tasks.app.conf.tenant_celery_header_signing_keys = KEYS
    previous = current_app._get_current_object()
    tasks.app.set_current()
    yield engine
    previous.set_current()
    tasks.app.conf.tenant_celery_header_signing_keys = None


signed_worker = worker_fixture(
    tasks.__name__,
    name="signed_worker",
    matrix=[
        pytest.param(("redis", "prefork"), id="redis-prefork", marks=pytest.mark.worker),
        pytest.param(("rabbitmq", "threads"), id="rabbitmq-threads", marks=pytest.mark.worker),
    ],
    extra_env={KEYS_ENV: ", ".join(KEYS)},
)


def key() -> str:
    return uuid.uuid4().hex


def rows(engine: Engine, pattern: str) -> list[tuple[str, str | None]]:
    """``(key, tenant)`` of every mark whose key is LIKE ``pattern``, as the superuser sees."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("SELECT key, tenant FROM signed_marks WHERE key LIKE :p ORDER BY key"),
            {"p": pattern},
        )
        return [(str(k), t) for k, t in found]


@contextmanager
def forger() -> Iterator[None]:
    """Publish as someone with broker access and no key."""
    tasks.app.conf.tenant_celery_header_signing_keys = None
    try:
        yield
    finally:
        tasks.app.conf.tenant_celery_header_signing_keys = KEYS


def finished(result: AsyncResult[Any]) -> str:
    """Wait for ``result`` to finish, whatever its outcome; return its state."""
    result.get(timeout=TIMEOUT, propagate=False)
    return str(result.state)


def never_ran(task_id: str) -> None:
    """The message ``task_id`` never ran: it was not published, or was refused."""
    result = tasks.app.AsyncResult(task_id)
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline and result.state == "PENDING":
        time.sleep(0.1)
    assert result.state in {"PENDING", "FAILURE"}, result.state


def frozen(signature: Any) -> Any:
    signature.freeze()
    return signature


# ------------------------------------------------ replayed parts of an unsigned message


@pytest.mark.parametrize("named_by", ["argument", "header"])
def test_chain_step_of_a_plain_builtin_does_not_run(
    signed_worker: WorkerHandle, marks: Engine, named_by: str
) -> None:
    name = key()
    step = (
        tasks.mark.si(name, tenant_id=B)
        if named_by == "argument"
        else tasks.mark.si(name).set(headers={"tenant_id": B})
    )
    step = frozen(step)
    with forger():
        carrier = tasks.app.send_task("celery.accumulate", (1,), chain=[step])
    finished(carrier)
    never_ran(step.id)
    assert rows(marks, name) == []


@pytest.mark.parametrize("builtin", ["celery.group", "celery.chord_unlock"])
def test_signature_a_plain_builtin_applies_does_not_run(
    signed_worker: WorkerHandle, marks: Engine, builtin: str
) -> None:
    name, group_id = key(), str(uuid.uuid4())
    step = frozen(tasks.mark.si(name, tenant_id=B))
    kwargs: dict[str, Any] = (
        {
            "tasks": [step],
            "result": tasks.app.GroupResult(group_id, []).as_tuple(),
            "group_id": group_id,
            "partial_args": [],
        }
        if builtin == "celery.group"
        else {"group_id": group_id, "callback": step, "result": []}
    )
    with forger():
        carrier = tasks.app.send_task(builtin, kwargs=kwargs)
    if builtin == "celery.group":
        finished(carrier)  # chord_unlock ignores its result
    never_ran(step.id)
    assert rows(marks, name) == []


def test_link_callback_of_a_plain_task_does_not_run(
    signed_worker: WorkerHandle, marks: Engine
) -> None:
    name = key()
    callback = frozen(tasks.mark.si(name, tenant_id=B))
    with forger():
        carrier = tasks.app.send_task(tasks.plain_noop.name, link=[callback])
    assert finished(carrier) in {"SUCCESS", "FAILURE"}
    never_ran(callback.id)
    assert rows(marks, name) == []


def test_errback_of_a_refused_tenant_task_does_not_run(
    signed_worker: WorkerHandle, marks: Engine
) -> None:
    refused, name = key(), key()
    errback = frozen(tasks.mark.si(name, tenant_id=B))
    with forger():
        carrier = tasks.app.send_task(
            tasks.mark.name, (refused,), headers={"tenant_id": A}, link_error=[errback]
        )
    assert finished(carrier) == "FAILURE"
    # Refused as unsigned; with results in PostgreSQL, Celery then stores the
    # errback's refusal at publish over it.
    assert isinstance(carrier.result, (TenantSignatureError, TenantConflict))
    never_ran(errback.id)
    assert rows(marks, refused) == []
    assert rows(marks, name) == []


def test_starmap_item_naming_a_tenant_does_not_run(
    signed_worker: WorkerHandle, marks: Engine
) -> None:
    name = key()
    with forger():
        carrier = tasks.app.send_task(
            "celery.starmap", kwargs={"task": tasks.mark_for.s(), "it": [[B, name]]}
        )
    assert finished(carrier) == "FAILURE"
    assert isinstance(carrier.result, TenantConflict)
    assert rows(marks, name) == []


def test_map_item_naming_a_tenant_does_not_run(signed_worker: WorkerHandle, marks: Engine) -> None:
    before = rows(marks, "map:%")
    with forger():
        carrier = tasks.app.send_task(
            "celery.map", kwargs={"task": tasks.mark_tenant.s(), "it": [B, A]}
        )
    assert finished(carrier) == "FAILURE"
    assert isinstance(carrier.result, TenantConflict)
    assert rows(marks, "map:%") == before


# -------------------------------------------------------------- for_each_tenant


def entry() -> dict[str, Any]:
    configured: dict[str, Any] = tasks.app.conf.beat_schedule["marks-every-tenant"]
    return configured


def beat_marks(engine: Engine) -> dict[str, int]:
    """How many ``beat`` fan-out marks each listed tenant has."""
    found = rows(engine, "beat:%")
    return {tenant: sum(1 for _, t in found if t == tenant) for tenant in tasks.LISTED}


def test_unsigned_fan_out_of_the_schedule_is_refused(
    signed_worker: WorkerHandle, marks: Engine
) -> None:
    before = beat_marks(marks)
    with forger():
        carrier = tasks.app.send_task(FOR_EACH_TENANT_TASK, entry()["args"], entry()["kwargs"])
    assert finished(carrier) == "FAILURE"
    assert isinstance(carrier.result, TenantSignatureError)
    time.sleep(SETTLE)
    assert beat_marks(marks) == before


@pytest.mark.parametrize("lister", [f"{tasks.__name__}:noisy_lister", "os:abort"])
def test_fan_out_naming_another_lister_imports_nothing(
    signed_worker: WorkerHandle, marks: Engine, lister: str
) -> None:
    noisy = rows(marks, "noisy:%")
    args = [tasks.mark_each.name, lister, ["beat"]]
    # Signed as beat signs it: a key holder cannot make the worker import a path either.
    carrier = tasks.app.send_task(FOR_EACH_TENANT_TASK, args, entry()["kwargs"])
    assert finished(carrier) == "FAILURE"
    assert "beat_schedule" in str(carrier.result)
    assert rows(marks, "noisy:%") == noisy
    # The pool process that handled it is alive and well.
    with tenant_context(A):
        assert tasks.mark.delay(key()).get(timeout=TIMEOUT) == A
    assert "WorkerLostError" not in signed_worker.log_text()


# --------------------------------------------------- the application's own work runs


def test_signed_fan_out_of_the_schedule_runs_in_every_listed_tenant(
    signed_worker: WorkerHandle, marks: Engine
) -> None:
    before = beat_marks(marks)
    # What celery beat sends: this process holds the keys and signs it.
    carrier = tasks.app.send_task(FOR_EACH_TENANT_TASK, entry()["args"], entry()["kwargs"])
    assert carrier.get(timeout=TIMEOUT) == 2
    deadline = time.monotonic() + TIMEOUT
    while beat_marks(marks) != {t: n + 1 for t, n in before.items()}:
        assert time.monotonic() < deadline, beat_marks(marks)
        time.sleep(0.2)


def test_fan_out_from_a_task_in_the_worker_runs_in_each_tenant(
    signed_worker: WorkerHandle, marks: Engine
) -> None:
    name = key()
    with tenant_context(A):
        assert tasks.fan_out_marks.delay(name, [A, B]).get(timeout=TIMEOUT) == 2
    deadline = time.monotonic() + TIMEOUT
    while len(rows(marks, f"{name}:%")) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert sorted(t for _, t in rows(marks, f"{name}:%")) == sorted([A, B])


def test_task_publishing_for_another_tenant_is_refused_at_publish(
    signed_worker: WorkerHandle, marks: Engine
) -> None:
    own, other = key(), key()
    with tenant_context(A):
        child = tasks.publish_for.delay(own, A).get(timeout=TIMEOUT)
        refused = tasks.publish_for.delay(other, B)
    assert tasks.app.AsyncResult(child).get(timeout=TIMEOUT) == A
    assert finished(refused) == "FAILURE"
    assert isinstance(refused.result, TenantConflict)
    assert "fan_out" in str(refused.result)
    assert rows(marks, own) == [(own, A)]
    assert rows(marks, other) == []


def test_chord_header_in_another_tenant_is_refused_at_publish(
    signed_worker: WorkerHandle, marks: Engine
) -> None:
    first, other, callback = key(), key(), key()
    part = frozen(tasks.mark.s(first))
    body = frozen(tasks.collect.s(callback))
    with tenant_context(A), pytest.raises(TenantConflict, match="chord"):
        chord([part, tasks.mark.s(other, tenant_id=B)], body).delay()
    # The parts before the refused one were sent, and ran in the chord's tenant; the
    # chord never completes, so its callback never runs with anything of B's.
    assert tasks.app.AsyncResult(part.id).get(timeout=TIMEOUT) == A
    never_ran(body.id)
    assert rows(marks, first) == [(first, A)]
    assert rows(marks, other) == []
    assert rows(marks, callback) == []


@pytest.mark.parametrize("named_by", ["positional", "bound keyword", "header"])
def test_fan_out_of_a_task_naming_its_tenant_sends_nothing(
    signed_worker: WorkerHandle, marks: Engine, named_by: str
) -> None:
    name = key()
    signature = {
        "positional": tasks.mark_for.s(B, name),
        "bound keyword": tasks.mark.s(name, tenant_id=B),
        "header": tasks.mark.s(name).set(headers={"tenant_id": B}),
    }[named_by]
    with pytest.raises(TypeError, match="already names one"):
        tasks.fan_out(signature, [A, B])
    time.sleep(SETTLE)
    assert rows(marks, name) == []
