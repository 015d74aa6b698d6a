"""What goes into a published message, read at ``before_task_publish``.

The app publishes to kombu's in-memory transport; no worker runs.  These
tests look at the headers a message leaves with.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from celery import Celery

from tenant_celery import (
    ConfigurationError,
    current_tenant,
    fan_out,
    tenant_context,
    tenant_task,
)
from tenant_celery.config import header_name

A = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000a"
B = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000b"
C = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000c"


def test_send_task_by_name_is_stamped(app: Celery, published: list[dict[str, Any]]) -> None:
    with tenant_context(A):
        app.send_task("anything.by_name")
    app.send_task("anything.by_name")  # outside a tenant: no header
    assert [h.get("tenant_id") for h in published] == [A, None]


def test_explicit_header_is_kept(app: Celery, published: list[dict[str, Any]]) -> None:
    with tenant_context(A):
        app.send_task("anything.by_name", headers={"tenant_id": B})
    assert published[0]["tenant_id"] == B


def test_configured_header_name(
    app: Celery, published: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANT_CELERY_HEADER", "from_env")
    assert header_name(app) == "from_env"
    app.conf.tenant_celery_header = "x_tenant"  # app configuration beats the environment

    @tenant_task(app=app, shared=False)
    def observe() -> str | None:
        return current_tenant()

    with tenant_context(A):
        observe.delay()
        app.send_task("anything.by_name")
    assert [h.get("x_tenant") for h in published] == [A, A]
    assert all("tenant_id" not in h for h in published)


@pytest.mark.parametrize("name", ["", "id", "correlation_id", "headers", "not an identifier"])
def test_reserved_or_malformed_header_name_is_refused(app: Celery, name: str) -> None:
    app.conf.tenant_celery_header = name or None
    if not name:
        assert header_name(app) == "tenant_id"  # unset falls back to the default
        return
    with pytest.raises(ConfigurationError, match="tenant_celery_header"):
        header_name(app)


def test_fan_out_spreads_countdowns(app: Celery, published: list[dict[str, Any]]) -> None:
    @tenant_task(app=app, shared=False)
    def nightly(kind: str) -> str:
        return kind

    fan_out(nightly, [A, B, C], "report", spread=30)
    assert [h["tenant_id"] for h in published] == [A, B, C]
    etas = [h["eta"] for h in published]
    assert etas[0] is None
    first, second = (datetime.fromisoformat(eta) for eta in etas[1:])
    assert 9 < (second - first).total_seconds() < 11
    assert current_tenant() is None
