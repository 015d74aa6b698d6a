"""How the tenant travels: producer context → message header → worker context.

Three signal receivers, connected when this module is imported (importing
:mod:`tenant_celery` does it):

* ``before_task_publish`` stamps the current tenant on every outgoing message
  that does not name one already, whatever sent it (``send_task``, a plain
  task, chord unlock, a retry), and signs the tenant header when signing is on
  (:mod:`tenant_celery.signing`) and this process may vouch for it;
* ``task_prerun`` enters the tenant named by an incoming message for tasks that
  are *not* tenant tasks, so that whatever they publish carries it on; tenant
  tasks enter their tenant themselves, with validation.  With signing on, a
  header whose signature does not verify is not entered;
* ``task_postrun`` restores the context a task started with.  It runs after
  chain and link callbacks have been published, which is why a task's tenant
  is not reset when its body returns.

Eager mode sends no ``before_task_publish``; tenant tasks stamp their headers
in ``apply_async``/``apply`` for that reason.

Authority: what a process may sign
----------------------------------

The tenant context says which tenant code runs in; the *authority* says which
tenant this process may vouch for with its signing key.  Outside a worker,
code is the application's own and may sign any tenant it names.  While a
worker handles a message, most of what it publishes is Celery replaying parts
of that message (chain steps, link callbacks, errbacks, the items of
``celery.map``/``starmap``/``chunks``, a chord's callback), which nobody
signed: so the authority is the message's *verified* tenant, or none, and a
tenant header naming another tenant is not signed.  :func:`~tenant_celery.fan_out`
is the one way for application code running in a worker to vouch for other
tenants.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

from celery import Celery, Task, current_app
from celery.app.task import Context
from celery.signals import (
    beat_embedded_init,
    before_task_publish,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
)

from . import signing
from .config import header_name
from .context import _current, _enter, current_tenant, parse_tenant_id
from .errors import ConfigurationError, InvalidTenantId, TenantCeleryError, TenantConflict

__all__ = [
    "header_from_request",
    "may_vouch_for",
    "message_header",
    "message_tenant",
    "restore_after_task",
    "tenant_from_request",
]

logger = logging.getLogger("tenant_celery")

_TOKEN_ATTR = "_tenant_celery_token"
_AUTHORITY_ATTR = "_tenant_celery_authority"

# The app whose task is being published, set by TenantTask.apply_async: the publish
# hook is told the task's name only, and the current app may be another one.
_publishing_app: ContextVar[Celery | None] = ContextVar(
    "tenant_celery.publishing_app", default=None
)


def _app() -> Celery:
    """The app a message is being published for: the tenant task's, else the current one."""
    return _publishing_app.get() or current_app


# ------------------------------------------------------------------ authority

_UNSET: Any = object()
#: Authority of application code outside any message: it may sign any tenant.
_TRUSTED: Any = object()
_authority: ContextVar[object] = ContextVar("tenant_celery.authority", default=_UNSET)


class _Process:
    #: True in a ``celery worker`` process (and its pool processes): there, code
    #: outside any message's handling has no authority unless it was given some.
    in_worker = False


def may_vouch_for(tenant: str) -> bool:
    """Whether this process may sign ``tenant``: it is the verified tenant of the
    message being handled, or the code runs outside any message's handling and
    outside a worker (the application's own choice), or inside :func:`vouching`."""
    authority = _authority.get()
    if authority is _UNSET:
        return not _Process.in_worker
    return authority is _TRUSTED or authority == tenant


def _set_authority(tenant: object) -> Token[object]:
    return _authority.set(tenant)


@contextmanager
def vouching(tenant: str | None) -> Iterator[None]:
    """Give the block the authority of ``tenant`` (``None``: no tenant at all)."""
    token = _authority.set(tenant)
    try:
        yield
    finally:
        _authority.reset(token)


@worker_init.connect(weak=False, dispatch_uid="tenant_celery.in_worker")
def _worker_started(sender: object = None, **_: Any) -> None:
    # Only a ``celery worker`` process: an in-process test worker (celery.contrib.testing)
    # shares its process with the test's own, trusted, code.
    from celery.apps.worker import Worker  # noqa: PLC0415 (worker only)

    if isinstance(sender, Worker):
        _Process.in_worker = True


@worker_process_init.connect(weak=False, dispatch_uid="tenant_celery.in_pool")
def _pool_process_started(**_: Any) -> None:
    _Process.in_worker = True


@beat_embedded_init.connect(weak=False, dispatch_uid="tenant_celery.embedded_beat")
def _embedded_beat_started(**_: Any) -> None:
    # ``celery worker -B``: beat publishes the application's own schedule.
    _authority.set(_TRUSTED)


# ------------------------------------------------------------- reading headers


def _request_fields(request: Context) -> Mapping[str, Any]:
    """The message headers a task request was made from.

    In a worker the request's attributes are the message's own headers, the
    ones the worker's main process reads and a signature covers.  Eager
    ``apply()`` keeps its custom headers in ``request.headers`` only.
    """
    if request.is_eager:
        headers = request.headers
        return headers if isinstance(headers, Mapping) else {}
    return vars(request)


def message_header(fields: Mapping[str, Any], header: str) -> object | None:
    """The raw value of ``header`` among a message's headers ``fields``, or ``None``.

    Raises:
        TenantConflict: a nested ``headers`` mapping in the message (as some
            integrations add) names another value: one message, two values.
    """
    value = fields.get(header)
    nested = fields.get("headers")
    if isinstance(nested, Mapping):
        inner = nested.get(header)
        if inner is not None and inner != value:
            raise TenantConflict(
                f"the message's {header!r} header and the {header!r} key of its nested "
                "'headers' disagree; a message names one value"
            )
    return value


def header_from_request(request: Context, header: str) -> object | None:
    """The raw value of the custom message header ``header`` on a task request, or ``None``.

    The same value the worker's main process reads from the message (see
    :func:`message_header`); for an eager call, the ``headers`` it was given.
    Not validated.

    Raises:
        TenantConflict: the message's nested ``headers`` name another value.
    """
    return message_header(_request_fields(request), header)


def tenant_from_request(request: Context, header: str) -> object | None:
    """The raw tenant named by a task request's tenant ``header``, or ``None``.

    The value is not validated; see :func:`header_from_request`.
    """
    return header_from_request(request, header)


def message_tenant(task: Task[Any, Any], request: Context) -> str | None:
    """The tenant ``task``'s message names: its tenant header, validated and, with
    signing on, verified; ``None`` when the message names none.

    An eager call was published by this process, so its header is not verified.

    Raises:
        TenantCeleryError: the header is invalid
            (:class:`~tenant_celery.InvalidTenantId`), its signature does not
            verify (:class:`~tenant_celery.TenantSignatureError`), the message
            names two tenants (:class:`~tenant_celery.TenantConflict`), or a
            setting is unusable (:class:`~tenant_celery.ConfigurationError`).
    """
    raw = tenant_from_request(request, header_name(task.app))
    if raw is None:
        return None
    tenant = parse_tenant_id(raw)
    if not request.is_eager:
        signature = header_from_request(request, signing.SIGNATURE_HEADER)
        signing.check_signature(task.app, tenant, signature, request.id, task.name)
    return tenant


def _remember(request: Context, token: Token[str | None]) -> None:
    setattr(request, _TOKEN_ATTR, token)


def _remember_authority(request: Context, tenant: str | None) -> None:
    """Give the handling of ``request`` the authority of ``tenant``, until ``task_postrun``."""
    previous: Token[object] | None = getattr(request, _AUTHORITY_ATTR, None)
    token = _authority.set(tenant)
    if previous is None:  # keep the first token: resetting it restores what was before
        setattr(request, _AUTHORITY_ATTR, token)


def restore_after_task(request: Context, attr: str, var: ContextVar[Any]) -> bool:
    """Reset ``var`` with the token a task kept on its ``request`` under ``attr``.

    Returns False when the token belongs to another context (a pool that
    switched contexts under the task): ``var`` is then cleared rather than
    left holding the task's value.  A request without a token is left alone.
    """
    token: Token[Any] | None = getattr(request, attr, None)
    if token is None:
        return True
    setattr(request, attr, None)
    try:
        var.reset(token)
    except ValueError:
        var.set(None)
        return False
    return True


@before_task_publish.connect(weak=False, dispatch_uid="tenant_celery.stamp_header")
def _stamp_header(headers: dict[str, Any] | None = None, body: object = None, **_: Any) -> None:
    if headers is None:
        return
    app = _app()
    tenant = current_tenant()
    if tenant is not None:
        # ``headers`` is the message's own dict, built by Celery for this publish;
        # an explicit tenant header (or one a retry carries over) is kept.
        headers.setdefault(header_name(app), tenant)
    _sign_header(app, headers, tenant, body)


def _sign_header(app: Celery, headers: dict[str, Any], tenant: str | None, body: object) -> None:
    """Sign the message's tenant header when signing is on and this process named it.

    The header is signed only when it names the tenant context the message is
    published in, and this process may vouch for that tenant
    (:func:`may_vouch_for`): a header carried over from another message (a
    plain task's retry copies its request's headers), written by hand for
    another tenant, or replayed by Celery from an unsigned message is never
    vouched for with this process's key.
    """
    try:
        keys = signing.signing_keys(app)
    except ConfigurationError:
        headers.pop(signing.SIGNATURE_HEADER, None)  # never forward a stale one
        raise
    if not keys:
        return
    # A signature is only ever made here, for this message: drop a carried-over one.
    headers.pop(signing.SIGNATURE_HEADER, None)
    task_id, task_name = headers.get("id"), headers.get("task")
    if isinstance(body, dict):  # task message protocol 1
        task_id, task_name = body.get("id", task_id), body.get("task", task_name)
    if _sign_fan_out(keys, headers, task_id, task_name):
        return
    raw = headers.get(header_name(app))
    if raw is None:
        return
    try:
        named = parse_tenant_id(raw)
    except InvalidTenantId:
        return  # refused by the worker as invalid
    if named != tenant or not isinstance(task_id, str) or not isinstance(task_name, str):
        logger.warning(
            "task %s[%s]: tenant header left unsigned, since it does not name the tenant "
            "context it is published in; the worker will refuse it (publish it inside "
            "tenant_context(...) of its tenant)",
            task_name, task_id,
        )  # fmt: skip
        return
    if not may_vouch_for(named):
        logger.warning(
            "task %s[%s]: tenant header left unsigned, since this worker handles a message "
            "of another tenant (or of none) and signs only that message's tenant; the "
            "worker will refuse it (publish work for other tenants with fan_out(...))",
            task_name, task_id,
        )  # fmt: skip
        return
    headers[signing.SIGNATURE_HEADER] = signing.sign_tenant(keys[0], named, task_id, task_name)


def _sign_fan_out(
    keys: tuple[bytes, ...], headers: dict[str, Any], task_id: object, task_name: object
) -> bool:
    """Sign a ``tenant_celery.for_each_tenant`` message that trusted code publishes
    (celery beat running the application's schedule); whether the message is one."""
    from .fanout import FOR_EACH_TENANT_TASK  # noqa: PLC0415 (fanout imports this module)

    if task_name != FOR_EACH_TENANT_TASK or not isinstance(task_id, str):
        return False
    authority = _authority.get()
    if authority is _TRUSTED or (authority is _UNSET and not _Process.in_worker):
        headers[signing.SIGNATURE_HEADER] = signing.sign_fan_out(keys[0], task_id, task_name)
    else:
        logger.warning(
            "task %s[%s] left unsigned: inside a worker only celery beat's schedule "
            "vouches for a fan-out over every tenant; the worker will refuse it",
            task_name, task_id,
        )  # fmt: skip
    return True


@task_prerun.connect(weak=False, dispatch_uid="tenant_celery.carry_tenant")
def _carry_tenant(task: Task[Any, Any] | None = None, **_: Any) -> None:
    if task is None:
        return
    request = task.request
    if getattr(task, "tenant_required", False):
        if not request.is_eager:
            # Until the task has verified its tenant, its message vouches for none.
            _remember_authority(request, None)
        return
    try:
        tenant = message_tenant(task, request)
        if tenant is None and request.is_eager:
            return  # an eager task runs inside its caller's context already
    except TenantCeleryError as exc:
        logger.warning(
            "task %s[%s] carries a tenant header that is invalid or not signed, not "
            "propagating it: %s",
            task.name, request.id, exc,
        )  # fmt: skip
        tenant = None
    _remember(request, _enter(tenant))
    if not request.is_eager:
        _remember_authority(request, tenant)


@task_postrun.connect(weak=False, dispatch_uid="tenant_celery.leave_tenant")
def _leave_tenant(task: Task[Any, Any] | None = None, **_: Any) -> None:
    if task is None:
        return
    request = task.request
    restore_after_task(request, _AUTHORITY_ATTR, _authority)
    if not restore_after_task(request, _TOKEN_ATTR, _current):
        logger.error("task %s[%s]: tenant context reset out of order", task.name, request.id)
