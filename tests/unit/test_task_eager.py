"""Tenant tasks in eager mode (``task_always_eager`` and ``apply()``).

Eager mode runs everything in this process and sends no
``before_task_publish``, so it takes a path of its own through the tenant
task.  Real workers are covered by tests/integration.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, Task, chain, chord, group

from tenant_celery import (
    ConfigurationError,
    InvalidTenantId,
    TenantConflict,
    TenantContextMissing,
    TenantTask,
    current_tenant,
    every_tenant,
    fan_out,
    tenant_context,
    tenant_entered,
    tenant_rejected,
    tenant_task,
)
from tenant_celery.fanout import FOR_EACH_TENANT_TASK

A = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000a"
B = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000b"


class Tasks:
    """The tasks of one eager app, as attributes."""

    def __init__(self, app: Celery) -> None:
        self.app = app

        @tenant_task(app=app, shared=False)
        def observe(tag: object = None) -> dict[str, Any]:
            return {"tenant": current_tenant(), "tag": tag}

        @tenant_task(app=app, shared=False)
        def wants_tenant(x: int, tenant_id: str) -> list[Any]:
            return [x, tenant_id, current_tenant()]

        @tenant_task(app=app, shared=False)
        def collect(results: list[dict[str, Any]]) -> dict[str, Any]:
            return {"tenant": current_tenant(), "parts": [r["tenant"] for r in results]}

        @tenant_task(app=app, shared=False)
        def step(seen: list[Any] | None = None) -> list[Any]:
            return [*(seen or []), current_tenant()]

        @tenant_task(app=app, shared=False)
        def parent() -> dict[str, Any]:
            return {"tenant": current_tenant(), "child": observe.delay("child").result}

        @tenant_task(app=app, shared=False, bind=True, max_retries=3)
        def retrying(self: Task[Any, Any], seen: list[Any] | None = None) -> list[Any]:
            seen = [*(seen or []), current_tenant()]
            if self.request.retries < 2:
                raise self.retry(kwargs={"seen": seen}, countdown=0)
            return seen

        attempts: list[str | None] = []
        self.attempts = attempts

        @tenant_task(
            app=app, shared=False, autoretry_for=(ValueError,), max_retries=3, default_retry_delay=0
        )
        def autoretrying() -> str | None:
            attempts.append(current_tenant())
            if len(attempts) < 3:
                raise ValueError("try again")
            return current_tenant()

        @app.task(shared=False)
        def plain() -> dict[str, Any]:
            return {"tenant": current_tenant(), "child": observe.delay().result}

        for name, value in list(locals().items()):
            if isinstance(value, Task):
                setattr(self, name, value)


@pytest.fixture
def eager() -> Iterator[Tasks]:
    """An app in ``task_always_eager`` mode that propagates exceptions."""
    app = Celery("eager", set_as_current=False)
    app.conf.update(
        task_always_eager=True,
        task_eager_propagates=True,
        task_store_eager_result=False,
        broker_url="memory://",
        result_backend="cache+memory://",
    )
    yield Tasks(app)
    assert current_tenant() is None, "a task left its tenant behind"


def test_delay_runs_in_publishers_tenant(eager: Tasks) -> None:
    with tenant_context(A):
        assert eager.observe.delay(1).get() == {"tenant": A, "tag": 1}
    with tenant_context(B):
        assert eager.observe.apply_async((2,)).get() == {"tenant": B, "tag": 2}
        assert eager.observe.s(3).delay().get() == {"tenant": B, "tag": 3}
        assert eager.observe.apply((4,)).get() == {"tenant": B, "tag": 4}


def test_explicit_tenant_argument(eager: Tasks) -> None:
    assert eager.observe.delay(tenant_id=A).get()["tenant"] == A
    with tenant_context(B):  # explicit beats the ambient context
        assert eager.observe.apply_async(kwargs={"tenant_id": A}).get()["tenant"] == A


def test_function_receives_tenant_only_when_it_asks(eager: Tasks) -> None:
    with tenant_context(A):
        assert eager.wants_tenant.delay(1).get() == [1, A, A]
    assert eager.wants_tenant.delay(2, tenant_id=B).get() == [2, B, B]
    assert eager.wants_tenant.delay(3, B).get() == [3, B, B]


def test_header_option_names_the_tenant(eager: Tasks) -> None:
    assert eager.observe.apply_async(headers={"tenant_id": A}).get()["tenant"] == A


def test_no_tenant_fails_before_anything_runs(eager: Tasks) -> None:
    with pytest.raises(TenantContextMissing, match="observe"):
        eager.observe.delay()
    with pytest.raises(TenantContextMissing):
        eager.observe.apply()


def test_conflict_is_an_error(eager: Tasks) -> None:
    with pytest.raises(TenantConflict):
        eager.observe.apply_async(kwargs={"tenant_id": A}, headers={"tenant_id": B})
    with pytest.raises(TenantConflict):
        eager.wants_tenant.apply_async((1, A), headers={"tenant_id": B})


def test_invalid_tenant_is_refused(eager: Tasks) -> None:
    with pytest.raises(InvalidTenantId, match="type str"):
        eager.observe.delay(tenant_id="robert'); drop table students;--")
    with tenant_context(A), pytest.raises(InvalidTenantId, match="type NoneType"):
        eager.observe.delay(tenant_id=None)  # never falls back to the context


def test_callers_dicts_are_not_mutated(eager: Tasks) -> None:
    headers = {"x-request": "r1"}
    kwargs = {"tag": "t", "tenant_id": A}
    eager.observe.apply_async(kwargs=kwargs, headers=headers).get()
    assert headers == {"x-request": "r1"}
    assert kwargs == {"tag": "t", "tenant_id": A}


def test_child_task_inherits(eager: Tasks) -> None:
    with tenant_context(A):
        result = eager.parent.delay().get()
    assert result == {"tenant": A, "child": {"tenant": A, "tag": "child"}}


def test_chain(eager: Tasks) -> None:
    with tenant_context(A):
        result = chain(eager.step.s(), eager.step.s(), eager.step.s()).delay().get()
    assert result == [A, A, A]


def test_group_and_chord(eager: Tasks) -> None:
    with tenant_context(B):
        parts = group(eager.observe.s(i) for i in range(3)).delay().get()
        assert [p["tenant"] for p in parts] == [B, B, B]
        result = chord((eager.observe.s(i) for i in range(3)), eager.collect.s()).delay().get()
    assert result == {"tenant": B, "parts": [B, B, B]}


# Eager retries re-run in place only when exceptions are not propagated
# (with task_eager_propagates the retried call raises Retry to the caller).


def test_retry_keeps_tenant(eager: Tasks) -> None:
    eager.app.conf.task_eager_propagates = False
    with tenant_context(A):
        assert eager.retrying.apply(throw=False).get() == [A, A, A]


def test_autoretry_keeps_tenant(eager: Tasks) -> None:
    eager.app.conf.task_eager_propagates = False
    with tenant_context(B):
        assert eager.autoretrying.apply(throw=False).get() == B
    assert eager.attempts == [B, B, B]


def test_countdown_and_eta_options_are_accepted(eager: Tasks) -> None:
    with tenant_context(A):
        assert eager.observe.apply_async(countdown=1).get()["tenant"] == A


def test_plain_task_carries_callers_tenant(eager: Tasks) -> None:
    with tenant_context(A):
        assert eager.plain.delay().get() == {"tenant": A, "child": {"tenant": A, "tag": None}}


def test_direct_call(eager: Tasks) -> None:
    with tenant_context(A):
        assert eager.observe("direct") == {"tenant": A, "tag": "direct"}
    assert eager.wants_tenant(1, tenant_id=B) == [1, B, B]
    with pytest.raises(TenantContextMissing):
        eager.observe()


def test_message_without_tenant_is_refused_and_signalled(eager: Tasks) -> None:
    rejected: list[tuple[str, type[BaseException]]] = []

    def on_rejected(sender: Any, reason: str, exc: BaseException, **_: Any) -> None:
        rejected.append((reason, type(exc)))

    tenant_rejected.connect(on_rejected)
    try:
        # Task.apply is what a message without a tenant header amounts to.
        with pytest.raises(TenantContextMissing, match="without a tenant"):
            Task.apply(eager.observe)
        with pytest.raises(InvalidTenantId):
            Task.apply(eager.observe, headers={"tenant_id": "forged"})
        with pytest.raises(TenantConflict):
            Task.apply(eager.observe, kwargs={"tenant_id": A}, headers={"tenant_id": B})
    finally:
        tenant_rejected.disconnect(on_rejected)
    assert rejected == [
        ("missing", TenantContextMissing),
        ("invalid", InvalidTenantId),
        ("conflict", TenantConflict),
    ]


def test_refused_task_is_not_retried(eager: Tasks) -> None:
    with pytest.raises(TenantContextMissing):
        Task.apply(eager.autoretrying)
    assert eager.attempts == []


def test_entered_signal(eager: Tasks) -> None:
    entered: list[str] = []

    def on_entered(sender: Any, tenant_id: str, **_: Any) -> None:
        entered.append(tenant_id)

    tenant_entered.connect(on_entered)
    try:
        with tenant_context(A):
            eager.observe.delay()
    finally:
        tenant_entered.disconnect(on_entered)
    assert entered == [A]


def test_base_class_usage() -> None:
    app = Celery("base", set_as_current=False)
    app.conf.update(task_always_eager=True, task_eager_propagates=True)

    @app.task(base=TenantTask, shared=False)
    def observe() -> str | None:
        return current_tenant()

    with tenant_context(A):
        assert observe.delay().get() == A
    with pytest.raises(TenantContextMissing):
        observe.delay()


def test_task_cls_usage() -> None:
    app = Celery("task-cls", set_as_current=False, task_cls=TenantTask)
    app.conf.update(task_always_eager=True, task_eager_propagates=True)

    @app.task(shared=False)
    def observe() -> str | None:
        return current_tenant()

    assert isinstance(observe, TenantTask)
    with tenant_context(B):
        assert observe.delay().get() == B


def test_builtin_tasks_of_a_task_cls_app_need_no_tenant() -> None:
    app = Celery("task-cls-builtins", set_as_current=False, task_cls=TenantTask)
    app.conf.update(task_always_eager=True, task_eager_propagates=True)
    cleanup = app.tasks["celery.backend_cleanup"]
    assert isinstance(cleanup, TenantTask)
    assert not cleanup.tenant_required
    assert cleanup.apply().successful()  # beat runs it outside any tenant
    for_each = app.tasks[FOR_EACH_TENANT_TASK]
    assert not isinstance(for_each, TenantTask)


def active_tenants() -> list[str]:
    """The tenant lister used by test_every_tenant."""
    return [A, B]


def test_every_tenant(eager: Tasks) -> None:
    entry = every_tenant(
        eager.observe, tenants=f"{__name__}:active_tenants", schedule=60, args=("beat",)
    )
    assert entry["task"] == FOR_EACH_TENANT_TASK
    eager.app.conf.beat_schedule = {"observe-every-tenant": entry}
    entered: list[str] = []

    def on_entered(sender: Any, tenant_id: str, **_: Any) -> None:
        entered.append(tenant_id)

    tenant_entered.connect(on_entered)
    try:
        # what beat sends when the schedule fires
        sent = eager.app.tasks[entry["task"]].apply(entry["args"], entry["kwargs"]).get()
    finally:
        tenant_entered.disconnect(on_entered)
    assert sent == 2
    assert entered == [A, B]


def test_every_tenant_refuses_bad_input(eager: Tasks) -> None:
    with pytest.raises(ConfigurationError, match="import path"):
        every_tenant("x", tenants="no.such.module:fn", schedule=60)
    lister = f"{__name__}:active_tenants"
    with pytest.raises(TypeError, match="'tenant_id' keyword"):
        every_tenant("x", tenants=lister, schedule=60, kwargs={"tenant_id": A})
    with pytest.raises(TypeError, match="positional 'tenant_id' argument"):
        every_tenant(eager.wants_tenant, tenants=lister, schedule=60, args=(1, A))
    with pytest.raises(TypeError, match="'tenant_id' message header"):
        every_tenant("x", tenants=lister, schedule=60, options={"headers": {"tenant_id": A}})


imported: list[str] = []


def record_import() -> list[str]:
    """A tenant lister that records being called."""
    imported.append("called")
    return [A, B]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        # an import path no entry names: the worker must neither import nor call it
        (("observe", f"{__name__}:record_import", []), {"kwargs": {}, "spread": None}),
        (("observe", "os:abort", []), {"kwargs": {}, "spread": None}),
        # the configured task and lister, with arguments the entry does not give
        (("observe", f"{__name__}:active_tenants", ["forged"]), {"kwargs": {}, "spread": None}),
        # another task with the configured lister
        (("step", f"{__name__}:active_tenants", ["beat"]), {"kwargs": {}, "spread": None}),
    ],
    ids=["unknown-lister", "os-abort", "other-args", "other-task"],
)
def test_for_each_tenant_runs_only_configured_fan_outs(
    eager: Tasks, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    eager.app.conf.beat_schedule = {
        "nightly": every_tenant(
            eager.observe, tenants=f"{__name__}:active_tenants", schedule=60, args=("beat",)
        )
    }
    entered: list[str] = []

    def on_entered(sender: Any, tenant_id: str, **_: Any) -> None:
        entered.append(tenant_id)

    imported.clear()
    name = getattr(eager, args[0]).name
    tenant_entered.connect(on_entered)
    try:
        with pytest.raises(ConfigurationError, match="beat_schedule"):
            eager.app.tasks[FOR_EACH_TENANT_TASK].apply((name, *args[1:]), kwargs)
    finally:
        tenant_entered.disconnect(on_entered)
    assert entered == []
    assert imported == []


def test_fan_out_refuses_a_task_that_names_its_tenant(eager: Tasks) -> None:
    ran: list[str] = []

    def on_entered(sender: Any, tenant_id: str, **_: Any) -> None:
        ran.append(tenant_id)

    tenant_entered.connect(on_entered)
    try:
        with pytest.raises(TypeError, match="'tenant_id' keyword"):
            fan_out(eager.observe, [A, B], tenant_id=A)
        with pytest.raises(TypeError, match="'tenant_id' keyword"):
            fan_out(eager.wants_tenant.s(1, tenant_id=A), [A, B])
        with pytest.raises(TypeError, match="positional 'tenant_id' argument"):
            fan_out(eager.wants_tenant.s(1, A), [A, B])
        with pytest.raises(TypeError, match="positional 'tenant_id' argument"):
            fan_out(eager.wants_tenant, [A, B], 1, A)
        with pytest.raises(TypeError, match="'tenant_id' message header"):
            fan_out(eager.observe.s().set(headers={"tenant_id": A}), [A, B])
    finally:
        tenant_entered.disconnect(on_entered)
    assert ran == []


def test_fan_out(eager: Tasks) -> None:
    results = fan_out(eager.observe, [A, B], "fan")
    assert [r.get() for r in results] == [
        {"tenant": A, "tag": "fan"},
        {"tenant": B, "tag": "fan"},
    ]


def test_fan_out_validates_every_id_first(eager: Tasks) -> None:
    ran: list[str] = []

    def on_entered(sender: Any, tenant_id: str, **_: Any) -> None:
        ran.append(tenant_id)

    tenant_entered.connect(on_entered)
    try:
        with pytest.raises(InvalidTenantId):
            fan_out(eager.observe, [A, "bad"])
    finally:
        tenant_entered.disconnect(on_entered)
    assert ran == []


def test_async_functions_are_refused_at_decoration() -> None:
    app = Celery("async-refused", set_as_current=False)

    async def report() -> None: ...

    with pytest.raises(ConfigurationError, match="async def"):
        tenant_task(app=app, shared=False)(report)
    with pytest.raises(ConfigurationError, match=r"asyncio\.run"):
        tenant_task(report)
    with pytest.raises(ConfigurationError, match="async def"):
        app.task(base=TenantTask, shared=False, lazy=False)(report)
    assert not [name for name in app.tasks if name.endswith("report")]
