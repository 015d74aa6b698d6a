"""A tenant task reads the tenant header's name (and the signing keys) for every run,
whoever runs it: a changed setting holds from the next run on."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

from tenant_celery import TenantContextMissing, current_tenant, tenant_context, tenant_task

A = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000a"
B = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000b"


def test_a_run_not_made_by_the_tasks_own_apply_reads_the_settings(app: Celery) -> None:
    # The body renames the tenant header, then runs itself again through Celery's
    # own apply (as a worker would run a message), under another id: that run must
    # read the header name anew, not take the one the outer apply() read.
    @tenant_task(app=app, bind=True, shared=False)
    def rename_and_rerun(self: Any, again: bool = False) -> list[Any]:
        if not again:
            app.conf.tenant_celery_header = "org"
            inner = Task.apply(self, kwargs={"again": True}, headers={"org": B}, throw=True)
            return [current_tenant(), inner.get()]
        return [current_tenant()]

    with tenant_context(A):
        assert rename_and_rerun.apply(throw=True).get() == [A, [B]]


def test_a_run_by_apply_reads_the_header_apply_named(app: Celery) -> None:
    @tenant_task(app=app, shared=False)
    def observe() -> str | None:
        return current_tenant()

    with tenant_context(A):
        assert observe.apply(throw=True).get() == A
    app.conf.tenant_celery_header = "org"  # read again by the next apply()
    with tenant_context(B):
        assert observe.apply(throw=True).get() == B
    # Celery's own apply with the old header name: no tenant under the new one.
    result = Task.apply(observe, headers={"tenant_id": A})
    assert isinstance(result.result, TenantContextMissing)
