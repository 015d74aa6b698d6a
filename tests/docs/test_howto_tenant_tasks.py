"""docs/howto/tenant-tasks.md, run eagerly in this process.

The page's tasks are declared on apps the page creates; the prelude's ``app``
and the ``task_cls`` app run eagerly here, so every call form on the page runs
its task body.  Worker-side behaviour (retries with countdowns, refusals of
real messages) is covered by ``tests/integration/test_tenant_worker.py``.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
from celery import Celery, Task

from tenant_celery import (
    InvalidTenantId,
    TenantContextMissing,
    TenantTask,
    current_tenant,
    parse_tenant_id,
    tenant_context,
)
from tests.docs.blocks import Block
from tests.docs.harness import PageRun

PAGE = "howto/tenant-tasks.md"
TENANT = "0b7e4c1a-5a43-4f5e-9d1c-2f6a1c9e7b10"
ACCOUNT = "acct_0123456789abcdef"

# Names the page's code uses without defining them: stand-ins that record calls.
PRELUDE = """
from celery import Celery

app = Celery("shop", broker="memory://")
app.conf.task_always_eager = True

fetched = []
def fetch(url):
    fetched.append((url, current_tenant()))
    raise TimeoutError(url)

class audit_log:
    failures = []
    @classmethod
    def record_failure(cls, name, task_id):
        cls.failures.append(name)

class mailer:
    sent = []
    @classmethod
    def send(cls, tenant_id, account_id):
        cls.sent.append((tenant_id, account_id))
"""


@pytest.fixture
def sentry_sdk(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """sentry-sdk is not a dependency: a module that records ``set_tag``."""
    tags: dict[str, str] = {}
    module = types.ModuleType("sentry_sdk")
    module.set_tag = tags.__setitem__  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sentry_sdk", module)
    return types.SimpleNamespace(tags=tags)


def test_page(
    tmp_path: Path, sentry_sdk: types.SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    run = PageRun(PAGE, tmp_path, prelude=PRELUDE)
    run.namespace["current_tenant"] = current_tenant
    ns = run.namespace

    @run.on("python", "def rebuild_search_index")
    def shared(block: Block) -> None:
        run.exec(block)
        other = Celery("other", set_as_current=False)
        task = other.tasks[ns["rebuild_search_index"].name]
        assert isinstance(task, TenantTask), "a bare @tenant_task is a shared tenant task"

    @run.on("python", "def sync_ledger")
    def with_options(block: Block) -> None:
        run.exec(block)
        task = ns["sync_ledger"]
        assert isinstance(task, TenantTask)
        assert task.app is ns["app"]
        assert (task.autoretry_for, task.max_retries, task.retry_backoff) == (
            (ns["OperationalError"],),
            5,
            True,
        )

    @run.on("python", "def import_feed")
    def bound_with_retries(block: Block) -> None:
        run.exec(block)
        with tenant_context(TENANT):
            result = ns["import_feed"].delay("https://feeds.example/a")
        assert isinstance(result.result, TimeoutError)
        # the first attempt and its three retries, all in the publisher's tenant
        assert [tenant for _, tenant in ns["fetched"]] == [TENANT] * 4

    @run.on("python", "class AuditedTask")
    def base_class(block: Block) -> None:
        run.exec(block)
        assert isinstance(ns["purge_expired_sessions"], TenantTask)
        export_orders = ns["export_orders"]
        assert isinstance(export_orders, ns["AuditedTask"])
        with tenant_context(TENANT):
            assert export_orders.delay("2025-01-01").successful()
        # A message without a tenant: refused, and the subclass's hook sees it.
        refused = Task.apply(export_orders, ("2025-01-01",))
        assert isinstance(refused.result, TenantContextMissing)
        assert ns["audit_log"].failures == [export_orders.name]

    @run.on("python", "task_cls=TenantTask")
    def every_task(block: Block) -> None:
        run.exec(block)
        app = ns["app"]
        app.conf.task_always_eager = True  # the rest of the page calls its tasks here

        @app.task
        def plain() -> None: ...

        assert isinstance(plain, TenantTask)
        assert app.tasks["celery.chord_unlock"].tenant_required is False
        assert not isinstance(app.tasks["tenant_celery.for_each_tenant"], TenantTask)

    @run.on("python", "tenant_id=tenant)  # keyword argument")
    def call_forms(block: Block) -> None:
        run.exec(block)
        assert ns["mailer"].sent == [(TENANT, 17)] * 4
        task = ns["send_statement"]
        with pytest.raises(TenantContextMissing):
            task.delay(17)
        with pytest.raises(InvalidTenantId):
            task.delay(17, tenant_id=None)

    @run.on("python", "set_tenant_id_parser(integer_tenant_id)")
    def integer_ids(block: Block) -> None:
        run.exec(block)
        for value in (42, "42"):
            with tenant_context(value):
                assert current_tenant() == "42"

    @run.on("python", "def account_tenant_id")
    def own_parser(block: Block) -> None:
        run.exec(block)
        assert parse_tenant_id(ACCOUNT) == ACCOUNT
        with pytest.raises(InvalidTenantId) as refused:
            parse_tenant_id("sk_live_secret")
        assert "sk_live_secret" not in str(refused.value)

    @run.on("python", "def tag_tenant")
    def entered(block: Block) -> None:
        run.exec(block)
        with tenant_context(ACCOUNT):
            ns["send_statement"].delay(18)
        assert sentry_sdk.tags == {"tenant": ACCOUNT}

    @run.on("python", "def report_refusal")
    def rejected(block: Block) -> None:
        run.exec(block)
        task = ns["send_statement"]
        with caplog.at_level(logging.WARNING, "shop.security"):
            refused = Task.apply(task, (19,), task_id="t-19")  # a message without a tenant
        assert isinstance(refused.result, TenantContextMissing)
        assert [r.getMessage() for r in caplog.records if r.name == "shop.security"] == [
            f"task {task.name}[t-19] refused (missing)"
        ]

    run.run()
