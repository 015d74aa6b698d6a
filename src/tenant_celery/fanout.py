"""Run one task for many tenants: one message per tenant, spread over time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from celery import Celery, Signature, Task, shared_task
from celery.result import AsyncResult
from celery.schedules import BaseSchedule
from celery.utils.imports import symbol_by_name

from . import propagation, signing
from .config import header_name
from .context import parse_tenant_id, tenant_context
from .errors import ConfigurationError, TenantSignatureError
from .task import TENANT_ARG, TenantTask

__all__ = ["FOR_EACH_TENANT_TASK", "every_tenant", "fan_out", "for_each_tenant"]

FOR_EACH_TENANT_TASK = "tenant_celery.for_each_tenant"
"""Name of the built-in task that :func:`every_tenant` schedules."""


def _carried_tenant(
    app: Celery | None,
    task: Task[Any, Any] | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    headers: object,
) -> str | None:
    """Where a task's arguments or headers already name a tenant, or ``None``."""
    if TENANT_ARG in kwargs:
        return f"a {TENANT_ARG!r} keyword argument"
    if isinstance(task, TenantTask):
        _, index = task._tenant_parameter
        if index is not None and len(args) > index:
            return f"a positional {TENANT_ARG!r} argument (position {index})"
    if isinstance(headers, Mapping) and header_name(app) in headers:
        return f"a {header_name(app)!r} message header"
    return None


def _refuse_carried(where: str, caller: str) -> TypeError:
    return TypeError(
        f"{caller} sets each message's tenant itself, and the task already names one "
        f"with {where}; leave the tenant out of the task's arguments and options"
    )


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

    This is the application's own choice of tenants: with signed tenant
    headers, a worker running ``fan_out`` signs each message for its tenant
    (elsewhere in a worker, only the tenant of the message being handled is
    signed; see :mod:`tenant_celery.signing`).

    Every tenant id is validated, and the task checked, before the first
    message is sent: one bad id raises :class:`~tenant_celery.InvalidTenantId`
    and nothing is published.

    Raises:
        TypeError: the task, signature or arguments already name a tenant (a
            ``tenant_id`` keyword or positional argument, or a tenant header),
            which would send every message to that one tenant.
        InvalidTenantId: a tenant id is malformed.

    Returns:
        One result per tenant, in the order given.
    """
    signature = (
        task_or_signature
        if isinstance(task_or_signature, Signature)
        else task_or_signature.signature()
    )
    try:
        task: Task[Any, Any] | None = signature.type
    except KeyError:  # a task this process does not know: its name is all there is
        task = None
    positional = tuple(signature.args) if signature.immutable else (*args, *signature.args)
    where = _carried_tenant(
        signature.app,
        task,
        positional,
        {**signature.kwargs, **kwargs},
        signature.options.get("headers"),
    )
    if where is not None:
        raise _refuse_carried(where, "fan_out")
    tenants = [parse_tenant_id(tenant) for tenant in tenant_ids]
    seconds = spread.total_seconds() if isinstance(spread, timedelta) else spread
    if seconds is not None and seconds < 0:
        raise ValueError(f"spread must be >= 0 seconds, got {seconds}")
    results: list[AsyncResult[Any]] = []
    for index, tenant in enumerate(tenants):
        options: dict[str, Any] = {}
        if seconds:
            options["countdown"] = seconds * index / len(tenants)
        with tenant_context(tenant), propagation.vouching(tenant):
            results.append(signature.clone().apply_async(args, kwargs, **options))
    return results


def _plain(value: Any) -> Any:
    """``value`` as it comes out of a JSON message: tuples are lists."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _configured(app: Celery, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Whether the app's ``beat_schedule`` has an entry that sends exactly this fan-out."""
    schedule = app.conf.beat_schedule or {}
    wanted = (_plain(args), _plain(kwargs))
    return any(
        isinstance(entry, Mapping)
        and entry.get("task") == FOR_EACH_TENANT_TASK
        and (_plain(entry.get("args", ())), _plain(entry.get("kwargs") or {})) == wanted
        for entry in schedule.values()
    )


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

    Runs only a fan-out that the app's ``beat_schedule`` holds (an entry made
    with :func:`every_tenant`, with these very arguments), never one a message
    made up: ``tenants`` is the import path (``"package.module:function"``)
    of a function of no arguments returning the ids of the tenants to run for,
    and the message cannot name another.  With signed tenant headers, the
    message must also be signed (celery beat signs it).  It runs in the
    worker, outside any tenant, when the schedule fires.  Returns the number
    of messages published.

    Raises:
        ConfigurationError: the fan-out is not in the app's ``beat_schedule``.
        TenantSignatureError: signing is on and the message is not signed.
    """
    request = self.request
    message_args = [task_name, tenants, _plain(args)]
    message_kwargs = {"kwargs": dict(kwargs or {}), "spread": spread}
    if not _configured(self.app, message_args, message_kwargs):
        raise ConfigurationError(
            f"{FOR_EACH_TENANT_TASK} runs only the fan-outs of this app's beat_schedule "
            f"(made with every_tenant(...)); the message names task {task_name!r} with a "
            "tenant lister and arguments that no entry has: refused, nothing was published"
        )
    keys = signing.signing_keys(self.app)
    if keys and not request.is_eager:
        signed = propagation.header_from_request(request, signing.SIGNATURE_HEADER)
        try:
            signing.verify_fan_out(keys, signed, request.id, self.name)
        except TenantSignatureError as exc:
            raise TenantSignatureError(
                f"{FOR_EACH_TENANT_TASK} refused: {exc}", reason=exc.reason
            ) from None
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
    The worker runs the entry only while the app's ``beat_schedule`` holds it:
    set ``beat_schedule`` where the worker's app reads it too (the module that
    creates the app, or its configuration module).
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
        TypeError: ``args``, ``kwargs`` or ``options`` already name a tenant
            (a ``tenant_id`` argument or a tenant header), which each message
            sets itself.
    """
    args = tuple(args)
    where = _carried_tenant(
        None if isinstance(task, str) else task.app,
        None if isinstance(task, str) else task,
        args,
        kwargs or {},
        (options or {}).get("headers"),
    )
    if where is not None:
        raise _refuse_carried(where, "every_tenant")
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
