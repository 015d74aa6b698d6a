"""The correlation id: one id shared by a web request and every task it causes.

The id lives in a :mod:`contextvars` variable and travels exactly like the
tenant: publishing a task writes it to the message header
:data:`CORRELATION_HEADER`, the worker enters it before the task runs, and
whatever that task publishes carries it on.  A publish made outside any
correlation context starts a new id, so every chain of work has one.

A web application enters the id of each request, taken from an incoming
header or made new, with :func:`correlation_context`::

    with correlation_context(request.headers.get("X-Correlation-ID")) as correlation_id:
        response = handle(request)
        response.headers["X-Correlation-ID"] = correlation_id

The JSON log formatter (:mod:`tenant_celery.logging`) writes the current id on
every line.  Correlation ids are for tracing, not for security: any producer
can send any id.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from celery import Task
from celery.signals import before_task_publish, task_postrun, task_prerun

from .propagation import header_from_request, restore_after_task

__all__ = [
    "CORRELATION_HEADER",
    "correlation_context",
    "current_correlation_id",
    "message_correlation",
    "new_correlation_id",
]

CORRELATION_HEADER = "x_correlation_id"
"""Message header that carries the correlation id.

Not ``correlation_id``: Celery uses that name for the task id and drops a
custom header called so."""

_current: ContextVar[str | None] = ContextVar("tenant_celery.correlation_id", default=None)

# Printable ASCII without spaces, as HTTP request-id headers carry; bounded so a
# hostile producer cannot bloat every log line of the tasks it causes.
_USABLE = re.compile(r"[\x21-\x7e]{1,128}\Z")

_TOKEN_ATTR = "_tenant_celery_correlation_token"


def new_correlation_id() -> str:
    """A new random correlation id (32 hexadecimal digits)."""
    return uuid.uuid4().hex


def current_correlation_id() -> str | None:
    """The correlation id of the running code, or ``None`` outside any."""
    return _current.get()


def _usable(value: object) -> str | None:
    if isinstance(value, str) and _USABLE.match(value):
        return value
    return None


@contextmanager
def correlation_context(correlation_id: object = None) -> Iterator[str]:
    """Run the ``with`` block under ``correlation_id``; yield the id in use.

    ``None``, or a value that is not 1 to 128 printable ASCII characters
    without spaces, is replaced by a new id rather than refused: the value
    usually comes from a client's request header, and a bad one must not fail
    the request.  The previous id (or none) is restored on exit.  Tasks
    published inside the block carry the id to the worker.
    """
    usable = _usable(correlation_id) or new_correlation_id()
    token = _current.set(usable)
    try:
        yield usable
    finally:
        _current.reset(token)


@contextmanager
def message_correlation(raw: object) -> Iterator[str | None]:
    """Run the block under the correlation id a message carries; yield it.

    For code that handles a message outside the task's own execution, such as
    the worker's main process failing a message whose pool process was lost:
    what it publishes then carries the message's id.  A message without a
    usable id enters none (never whatever the thread had), so a publish inside
    starts a new id.
    """
    usable = _usable(raw)
    token = _current.set(usable)
    try:
        yield usable
    finally:
        _current.reset(token)


@before_task_publish.connect(weak=False, dispatch_uid="tenant_celery.stamp_correlation")
def _stamp_correlation(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is None:
        return
    # ``headers`` is the message's own dict, built by Celery for this publish;
    # an id given explicitly, or carried over by a retry, is kept.
    if _usable(headers.get(CORRELATION_HEADER)) is None:
        headers[CORRELATION_HEADER] = current_correlation_id() or new_correlation_id()


@task_prerun.connect(weak=False, dispatch_uid="tenant_celery.enter_correlation")
def _enter_correlation(task: Task[Any, Any] | None = None, **_: Any) -> None:
    if task is None:
        return
    request = task.request
    correlation_id = _usable(header_from_request(request, CORRELATION_HEADER))
    if correlation_id is None and request.is_eager:
        # An eager task runs inside its caller, which may be under an id already.
        correlation_id = current_correlation_id()
    # Never inherit what a previous task on this thread or process left behind.
    token = _current.set(correlation_id or new_correlation_id())
    setattr(request, _TOKEN_ATTR, token)


@task_postrun.connect(weak=False, dispatch_uid="tenant_celery.leave_correlation")
def _leave_correlation(task: Task[Any, Any] | None = None, **_: Any) -> None:
    if task is None:
        return
    restore_after_task(task.request, _TOKEN_ATTR, _current)
