"""Signed tenant headers through real ``celery worker`` processes.

The workers get their keys from ``TENANT_CELERY_HEADER_SIGNING_KEYS``; the test
process's copy of the app gets the same ones in ``app.conf``.  A forger is
played by this process with its keys unset: it can publish to the broker,
with any headers, and cannot sign.  Every task writes a row of
``signed_marks`` (see :mod:`tests.integration.signing_app`), so a refused
message is shown not to have run.

Redis with Redis results (chords joined by Redis) and RabbitMQ with
PostgreSQL results (chords through ``celery.chord_unlock``).
"""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from celery import chain, chord, current_app
from celery.result import AsyncResult
from celery.signals import before_task_publish
from sqlalchemy.engine import Engine

from tenant_celery import TenantContextMissing, current_tenant, tenant_context
from tenant_celery.signing import SIGNATURE_HEADER, TenantSignatureError, sign_tenant
from tests._rig.postgres import APP_ROLE, Database
from tests._rig.services import Services
from tests._rig.worker import WorkerFactory, worker_fixture

from . import signing_app as tasks

pytestmark = pytest.mark.worker

KEYS_ENV = "TENANT_CELERY_HEADER_SIGNING_KEYS"
NEW = "signing-key-2025-new-5f0c8e7a9b1d4c3e"
OLD = "signing-key-2024-old-0a9e8d7c6b5a4f3e"
A = str(uuid.uuid4())
B = str(uuid.uuid4())
TIMEOUT = 60
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "signing"


@pytest.fixture(scope="module", autouse=True)
def marks(module_database: Database) -> Iterator[Engine]:
    """The ``signed_marks`` table, and the test process's app signing with [NEW, OLD]."""
    engine = module_database.admin_engine()
    with engine.begin() as conn:
        conn.exec_driver_sql(tasks.MARKS_DDL)
        conn.exec_driver_sql(f"GRANT SELECT, INSERT ON signed_marks TO {APP_ROLE}")
    tasks.app.conf.tenant_celery_header_signing_keys = [NEW, OLD]
    # What a plain task, send_task or chord_unlock publishes is signed with the
    # current app's keys (the publish hook is not told the app), as in a producer
    # whose app is its only one; other test modules may have made theirs current.
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
    extra_env={KEYS_ENV: f"{NEW}, {OLD}"},
)


def key() -> str:
    return uuid.uuid4().hex


def marked(engine: Engine, name: str) -> str | None:
    """The tenant the task that wrote mark ``name`` ran in; ``None`` if none was written."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT tenant FROM signed_marks WHERE key = :key"), {"key": name}
        ).first()
    return None if row is None else str(row[0])


def get(result: AsyncResult[Any]) -> Any:
    return result.get(timeout=TIMEOUT)


def refusal(result: AsyncResult[Any]) -> BaseException:
    with pytest.raises(Exception) as info:  # noqa: PT011 (the type is asserted by the caller)
        get(result)
    assert result.state == "FAILURE"
    return info.value


@contextmanager
def forger() -> Iterator[None]:
    """Publish as someone with broker access and no key."""
    keys = tasks.app.conf.tenant_celery_header_signing_keys
    tasks.app.conf.tenant_celery_header_signing_keys = None
    try:
        yield
    finally:
        tasks.app.conf.tenant_celery_header_signing_keys = keys


@contextmanager
def recorded() -> Iterator[list[dict[str, Any]]]:
    """The headers of every message this process publishes in the block."""
    seen: list[dict[str, Any]] = []

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append(dict(headers or {}))

    before_task_publish.connect(record, weak=False)
    try:
        yield seen
    finally:
        before_task_publish.disconnect(record)


# ---------------------------------------------------------------- signed work runs


def test_signed_task_runs(signed_worker: Any, marks: Engine) -> None:
    name = key()
    with recorded() as messages, tenant_context(A):
        assert get(tasks.mark.delay(name)) == A
    assert marked(marks, name) == A
    assert messages[0][SIGNATURE_HEADER].startswith("v1:")


def test_explicit_tenant_and_countdown(signed_worker: Any, marks: Engine) -> None:
    first, second = key(), key()
    assert get(tasks.mark.apply_async((first,), kwargs={"tenant_id": B})) == B
    with tenant_context(A):
        assert get(tasks.mark.apply_async((second,), countdown=1)) == A
    assert (marked(marks, first), marked(marks, second)) == (B, A)


def test_chain_chord_retry_and_children(signed_worker: Any, marks: Engine) -> None:
    names = [key() for _ in range(8)]
    with tenant_context(B):
        chained = chain(
            tasks.step.s([], names[0]), tasks.step.s(names[1]), tasks.step.s(names[2])
        ).delay()
        chorded = chord([tasks.mark.s(names[3]), tasks.mark.s(names[4])], tasks.collect.s(names[5]))
        joined = chorded.delay()
        retried = tasks.retry_once.delay(names[6])
        spawned = tasks.spawn.delay(names[7])
    assert get(chained) == [B, B, B]
    assert get(joined) == [B, B, B]
    assert get(retried) == [1, B]
    get(tasks.app.AsyncResult(get(spawned)))
    assert [marked(marks, name) for name in names] == [B] * 8


def test_plain_task_passes_a_verified_tenant_on(signed_worker: Any, marks: Engine) -> None:
    name = key()
    with tenant_context(A):
        child = get(tasks.plain_spawn.delay(name))
    assert get(tasks.app.AsyncResult(child)) == A
    assert marked(marks, name) == A


def test_message_signed_with_the_old_key_runs(signed_worker: Any, marks: Engine) -> None:
    # A producer not yet moved to the new key, during a rotation.
    name = key()
    tasks.app.conf.tenant_celery_header_signing_keys = [OLD]
    try:
        with tenant_context(A):
            assert get(tasks.mark.delay(name)) == A
    finally:
        tasks.app.conf.tenant_celery_header_signing_keys = [NEW, OLD]
    assert marked(marks, name) == A


# -------------------------------------------------------------- forgeries refused


def test_unsigned_header_is_refused(signed_worker: Any, marks: Engine) -> None:
    name = key()
    with forger():
        result = tasks.app.send_task(tasks.mark.name, (name,), headers={"tenant_id": A})
    exc = refusal(result)
    assert isinstance(exc, TenantSignatureError)
    assert isinstance(exc, TenantContextMissing)
    assert "not signed" in str(exc)
    assert marked(marks, name) is None
    signed_worker.wait_for_log(
        rf"{result.id}\] refused \(unsigned\): the tenant header is not signed.*"
        r"give that producer the signing keys"
    )


def test_tenant_named_only_by_an_argument_is_refused(signed_worker: Any, marks: Engine) -> None:
    name = key()
    with forger():
        result = tasks.app.send_task(tasks.mark.name, (name,), kwargs={"tenant_id": A})
    assert isinstance(refusal(result), TenantSignatureError)
    assert marked(marks, name) is None


@pytest.mark.parametrize("forged", ["other key", "garbage"])
def test_badly_signed_header_is_refused(signed_worker: Any, marks: Engine, forged: str) -> None:
    name, task_id = key(), str(uuid.uuid4())
    signature = (
        sign_tenant(b"an-attacker-guessing-at-the-key-000", A, task_id, tasks.mark.name)
        if forged == "other key"
        else "v1:00000000:" + "0" * 64
    )
    with forger():
        result = tasks.app.send_task(
            tasks.mark.name,
            (name,),
            task_id=task_id,
            headers={"tenant_id": A, SIGNATURE_HEADER: signature},
        )
    exc = refusal(result)
    assert isinstance(exc, TenantSignatureError)
    assert marked(marks, name) is None


def test_header_copied_from_another_message_is_refused(signed_worker: Any, marks: Engine) -> None:
    original, copy = key(), key()
    with recorded() as messages, tenant_context(A):
        get(tasks.mark.delay(original))
    stolen = {h: messages[0][h] for h in ("tenant_id", SIGNATURE_HEADER)}
    with forger():
        # the same tenant and signature on a new message of the same task ...
        another_id = tasks.app.send_task(tasks.mark.name, (copy,), headers=stolen)
        # ... and on a message of another task that borrows the original's id
        another_task = tasks.app.send_task(
            tasks.spawn.name, (copy,), task_id=messages[0]["id"] + "-x", headers=stolen
        )
        # ... and a signed header whose tenant was changed
        altered = tasks.app.send_task(
            tasks.mark.name,
            (copy,),
            task_id=messages[0]["id"] + "-y",
            headers={**stolen, "tenant_id": B},
        )
    for result in (another_id, another_task, altered):
        exc = refusal(result)
        assert isinstance(exc, TenantSignatureError)
        assert "copied from another message" in str(exc)
    assert marked(marks, original) == A
    assert marked(marks, copy) is None


def test_forged_task_id_reuse_for_another_task_is_refused(
    signed_worker: Any, marks: Engine
) -> None:
    # A signature made for task `mark` and this id, put on a message of `spawn`.
    name, task_id = key(), str(uuid.uuid4())
    signature = sign_tenant(NEW.encode(), A, task_id, tasks.mark.name)
    with forger():
        result = tasks.app.send_task(
            tasks.spawn.name,
            (name,),
            task_id=task_id,
            headers={"tenant_id": A, SIGNATURE_HEADER: signature},
        )
    assert isinstance(refusal(result), TenantSignatureError)
    assert marked(marks, name) is None


def test_plain_task_does_not_pass_a_forged_tenant_on(signed_worker: Any, marks: Engine) -> None:
    # Plain tasks are never refused, but an unverified tenant is not entered:
    # the child it publishes has no tenant, and is refused before it is sent.
    name = key()
    with forger():
        result = tasks.app.send_task(tasks.plain_spawn.name, (name,), headers={"tenant_id": A})
    exc = refusal(result)
    assert isinstance(exc, TenantContextMissing)
    assert not isinstance(exc, TenantSignatureError)
    assert marked(marks, name) is None
    signed_worker.wait_for_log(rf"{result.id}\] carries a tenant header that is invalid or not")
    assert current_tenant() is None


# ------------------------------------------------------------------- key rotation


def test_worker_without_the_new_key_refuses_it(
    module_start_worker: WorkerFactory, marks: Engine
) -> None:
    worker = module_start_worker(
        tasks.__name__, broker="redis", pool="solo", extra_env={KEYS_ENV: OLD}
    )
    signed_new, signed_old = key(), key()
    with worker.bind(tasks.app):
        with tenant_context(A):
            refused = tasks.mark.delay(signed_new)  # signed with NEW, the first key
        exc = refusal(refused)
        assert isinstance(exc, TenantSignatureError)
        assert "does not accept" in str(exc)
        tasks.app.conf.tenant_celery_header_signing_keys = [OLD]
        try:
            with tenant_context(A):
                assert get(tasks.mark.delay(signed_old)) == A
        finally:
            tasks.app.conf.tenant_celery_header_signing_keys = [NEW, OLD]
    worker.request_stop()
    assert marked(marks, signed_new) is None
    assert marked(marks, signed_old) == A


# ------------------------------------------------------------------- the example


@pytest.fixture
def orders(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """``examples/signing/orders.py`` imported as a producer imports it, with its keys."""
    monkeypatch.setenv("ORDERS_TENANT_HEADER_KEYS", f"{NEW},{OLD}")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for name in ("orders", "celeryconfig"):
        sys.modules.pop(name, None)
    previous = current_app._get_current_object()
    module = importlib.import_module("orders")  # its app becomes the current one
    yield module
    module.app.close()
    previous.set_current()
    for name in ("orders", "celeryconfig"):
        sys.modules.pop(name, None)


def test_example_app_signs_and_refuses_forgeries(
    orders: ModuleType, module_start_worker: WorkerFactory, services: Services
) -> None:
    redis = services.redis()
    worker = module_start_worker(
        "orders",
        broker="redis",
        pool="threads",
        extra_env={
            "PYTHONPATH": f"{EXAMPLE}:{Path(__file__).resolve().parents[2]}",
            "CELERY_BROKER_URL": redis,
            "CELERY_RESULT_BACKEND": redis,
            "ORDERS_TENANT_HEADER_KEYS": f"{NEW},{OLD}",
        },
    )
    app = orders.app
    assert app.conf.tenant_celery_header_signing_keys == [NEW, OLD]
    with worker.bind(app):
        with tenant_context(A):
            shipped = orders.ship_order.delay(7)
        assert get(shipped) == f"order 7 shipped for tenant {A}"
        app.conf.tenant_celery_header_signing_keys = None  # a publisher without the keys
        forged = app.send_task(orders.ship_order.name, (8,), headers={"tenant_id": A})
        assert isinstance(refusal(forged), TenantSignatureError)
    worker.request_stop()
