"""Run one task for many tenants: one message per tenant, spread over time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

from celery import Signature, Task, shared_task
from celery.result import AsyncResult
from celery.schedules import BaseSchedule
from celery.utils.imports import symbol_by_name

from .context import parse_tenant_id, tenant_context
from .errors import ConfigurationError
from .task import TENANT_ARG

__all__ = ["FOR_EACH_TENANT_TASK", "every_tenant", "fan_out", "for_each_tenant"]

FOR_EACH_TENANT_TASK = "tenant_celery.for_each_tenant"
"""Name of the built-in task that :func:`every_tenant` schedules."""


def fan_out(
    task_or_signature: Task[Any, Any] | Signature[Any],
    tenant_ids: Iterable[object],
    *args: Any,
    spread: float | timedelta | None = None,
    **kwargs: Any,
) -> list[AsyncResult[Any]]:
    """Publish ``task_or_signature`` once per tenant in ``tenant_ids``.

    Each message is published inside its own :func:`~tenant_celery.tenant_context`,
    so it carries its tenant like any other.  ``args`` and ``kwargs`` are
    added to the signature's own, as ``Signature.apply_async`` does.  With
    ``spread`` (seconds or a timedelta), the n-th of N messages gets a
    countdown of ``spread * n / N``, so a job over thousands of tenants does
    not land on the workers at once.

    Every tenant id is validated before the first message is sent: one bad id
    raises :class:`~tenant_celery.InvalidTenantId` and nothing is published.

    Returns:
        One result per tenant, in the order given.
    """
    if TENANT_ARG in kwargs:
        raise TypeError(f"fan_out sets {TENANT_ARG!r} itself; do not pass it")
    tenants = [parse_tenant_id(tenant) for tenant in tenant_ids]
    seconds = spread.total_seconds() if isinstance(spread, timedelta) else spread
    if seconds is not None and seconds < 0:
        raise ValueError(f"spread must be >= 0 seconds, got {seconds}")
    signature = (
        task_or_signature
        if isinstance(task_or_signature, Signature)
        else task_or_signature.signature()
    )
    results: list[AsyncResult[Any]] = []
    for index, tenant in enumerate(tenants):
        options: dict[str, Any] = {}
        if seconds:
            options["countdown"] = seconds * index / len(tenants)
        with tenant_context(tenant):
            results.append(signature.clone().apply_async(args, kwargs, **options))
    return results


# A plain task even on an app whose task_cls is TenantTask: it runs outside any tenant.
@shared_task(name=FOR_EACH_TENANT_TASK, bind=True, ignore_result=False, base=Task)
def for_each_tenant(
    self: Task[Any, int],
    task_name: str,
    tenants: str,
    args: list[Any] | tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    spread: float | None = None,
) -> int:
    """Publish task ``task_name`` once for every tenant listed by ``tenants``.

    ``tenants`` is the import path (``"package.module:function"``) of a
    function of no arguments returning the ids of the tenants to run for.  It
    runs in the worker, outside any tenant, when the schedule fires.  Returns
    the number of messages published.
    """
    lister: Callable[[], Iterable[object]] = symbol_by_name(tenants)
    signature = self.app.signature(task_name)
    return len(fan_out(signature, lister(), *args, spread=spread, **dict(kwargs or {})))


def every_tenant(
    task: str | Task[Any, Any],
    *,
    tenants: str,
    schedule: float | timedelta | BaseSchedule,
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    spread: float | timedelta | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``beat_schedule`` entry that runs ``task`` for every active tenant.

    ``tenants`` is the import path of a function of no arguments listing the
    active tenants (``"myapp.tenancy:active_tenant_ids"``); it is called by
    the worker each time the schedule fires, so new tenants are picked up.
    ``args``, ``kwargs`` and ``spread`` are passed to :func:`fan_out`.
    ``options`` are the beat entry's options: they apply to the
    ``tenant_celery.for_each_tenant`` message, not to the per-tenant ones.
    Example::

        app.conf.beat_schedule = {
            "nightly-report": every_tenant(
                "reports.build", tenants="myapp.tenancy:active_tenant_ids",
                schedule=crontab(hour=2), spread=600,
            ),
        }

    Raises:
        ConfigurationError: ``tenants`` does not name an importable callable.
        TypeError: ``kwargs`` names ``tenant_id``, which each message sets itself.
    """
    if TENANT_ARG in (kwargs or {}):
        raise TypeError(f"every_tenant sets {TENANT_ARG!r} itself; do not pass it in kwargs")
    try:
        lister = symbol_by_name(tenants)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(
            f"every_tenant(tenants=...) must be the import path of a function, "
            f"like 'myapp.tenancy:active_tenant_ids'; {tenants!r} could not be imported"
        ) from exc
    if not callable(lister):
        raise ConfigurationError(f"every_tenant(tenants={tenants!r}) is not callable")
    seconds = spread.total_seconds() if isinstance(spread, timedelta) else spread
    entry: dict[str, Any] = {
        "task": FOR_EACH_TENANT_TASK,
        "schedule": schedule,
        "args": (task if isinstance(task, str) else task.name, tenants, list(args)),
        "kwargs": {"kwargs": dict(kwargs or {}), "spread": seconds},
    }
    if options:
        entry["options"] = dict(options)
    return entry
