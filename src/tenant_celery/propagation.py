"""How the tenant travels: producer context → message header → worker context.

Three signal receivers, connected when this module is imported (importing
:mod:`tenant_celery` does it):

* ``before_task_publish`` stamps the current tenant on every outgoing message
  that does not name one already, whatever sent it (``send_task``, a plain
  task, chord unlock, a retry), and signs the tenant header when signing is on
  (:mod:`tenant_celery.signing`);
* ``task_prerun`` enters the tenant named by an incoming message for tasks that
  are *not* tenant tasks, so that whatever they publish carries it on; tenant
  tasks enter their tenant themselves, with validation.  With signing on, a
  header whose signature does not verify is not entered;
* ``task_postrun`` restores the context a task started with.  It runs after
  chain and link callbacks have been published, which is why a task's tenant
  is not reset when its body returns.

Eager mode sends no ``before_task_publish``; tenant tasks stamp their headers
in ``apply_async``/``apply`` for that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import Any

from celery import Celery, Task, current_app
from celery.app.task import Context
from celery.signals import before_task_publish, task_postrun, task_prerun

from . import signing
from .config import header_name
from .context import _current, _enter, current_tenant, parse_tenant_id
from .errors import ConfigurationError, InvalidTenantId, TenantCeleryError

__all__ = ["header_from_request", "message_tenant", "restore_after_task", "tenant_from_request"]

logger = logging.getLogger("tenant_celery")

_TOKEN_ATTR = "_tenant_celery_token"

# The app whose task is being published, set by TenantTask.apply_async: the publish
# hook is told the task's name only, and the current app may be another one.
_publishing_app: ContextVar[Celery | None] = ContextVar(
    "tenant_celery.publishing_app", default=None
)


def _app() -> Celery:
    """The app a message is being published for: the tenant task's, else the current one."""
    return _publishing_app.get() or current_app


def header_from_request(request: Context, header: str) -> object | None:
    """The raw value of the custom message header ``header`` on a task request, or ``None``.

    Where a custom header lands depends on the path: eager ``apply()`` puts it
    in ``request.headers`` only; a worker makes it a request attribute, and
    sometimes also a key of ``request.headers``.  The value is not validated.
    """
    headers = request.headers
    if isinstance(headers, Mapping):
        value: object = headers.get(header)
        if value is not None:
            return value
    attribute: object = getattr(request, header, None)
    return attribute


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
        TenantCeleryError: the header is invalid (:class:`InvalidTenantId`), its
            signature does not verify (``TenantSignatureError``), or a setting
            is unusable (:class:`ConfigurationError`).
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


def restore_after_task(request: Context, attr: str, var: ContextVar[str | None]) -> bool:
    """Reset ``var`` with the token a task kept on its ``request`` under ``attr``.

    Returns False when the token belongs to another context (a pool that
    switched contexts under the task): ``var`` is then cleared rather than
    left holding the task's value.  A request without a token is left alone.
    """
    token: Token[str | None] | None = getattr(request, attr, None)
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
    published in: a header carried over from another message (a plain task's
    retry copies its request's headers) or written by hand for another tenant
    is never vouched for with this process's key.
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
    raw = headers.get(header_name(app))
    if raw is None:
        return
    task_id, task_name = headers.get("id"), headers.get("task")
    if isinstance(body, dict):  # task message protocol 1
        task_id, task_name = body.get("id", task_id), body.get("task", task_name)
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
    headers[signing.SIGNATURE_HEADER] = signing.sign_tenant(keys[0], named, task_id, task_name)


@task_prerun.connect(weak=False, dispatch_uid="tenant_celery.carry_tenant")
def _carry_tenant(task: Task[Any, Any] | None = None, **_: Any) -> None:
    if task is None or getattr(task, "tenant_required", False):
        return
    request = task.request
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


@task_postrun.connect(weak=False, dispatch_uid="tenant_celery.leave_tenant")
def _leave_tenant(task: Task[Any, Any] | None = None, **_: Any) -> None:
    if task is None:
        return
    request = task.request
    if not restore_after_task(request, _TOKEN_ATTR, _current):
        logger.error("task %s[%s]: tenant context reset out of order", task.name, request.id)
