"""JSON logs: one object per line, naming the task, tenant and correlation id.

:func:`configure_logging` sets up a process (web, worker or beat) in one call;
:class:`JsonFormatter` is the formatter alone, for hosts that configure
logging themselves (``logging.config.dictConfig``, Django's ``LOGGING``).

Every line is an object with these keys, ``null`` when unknown:

``timestamp``
    ISO 8601 in UTC, with milliseconds.
``level``, ``logger``, ``message``
    The record's level name, logger name and formatted message.
``task_name``, ``task_id``
    The Celery task running on the thread that logged, if any.
``tenant_id``
    :func:`~tenant_celery.current_tenant` on that thread.
``correlation_id``
    :func:`~tenant_celery.correlation.current_correlation_id` on that thread.
``exception``
    The formatted traceback; present only when the record has one.

A worker's main process logs about tasks it does not run: a message received,
revoked, timed out, or failed because its pool process was lost.  For a
tenant task (its request is a :class:`~tenant_celery.request.TenantRequest`)
those lines name the message's task, tenant and correlation id, read from its
headers with the same reader as the pool's: a tenant header that is invalid,
or with signing on not verified, and a correlation id that is not usable, are
written as ``null``, never as the header's text.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Protocol, TextIO

from celery import signals
from celery._state import get_current_task
from celery.utils.log import LoggingProxy, get_multiprocessing_logger

from .context import current_tenant
from .correlation import current_correlation_id

__all__ = ["JsonFormatter", "configure_logging"]

_logger = logging.getLogger("tenant_celery")

# Marks the handler configure_logging installs, so a second call replaces it.
_OURS = "_tenant_celery_json_handler"


class JsonFormatter(logging.Formatter):
    """Format each record as one line of JSON (see the module's key list).

    Safe to share between handlers and threads: the task, tenant and
    correlation id are read from the thread that logs, at the time it logs.
    Subclass and extend :meth:`fields` to add keys.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # From now on a worker's main process keeps track of the message its lines
        # are about; without a JSON formatter it does no such work.
        _MainProcess.tracking = True

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The keys and values of one line, before JSON encoding.

        Values that JSON cannot encode are written with ``str()``.
        """
        task_name, task_id, tenant_id, correlation_id = _context_of(record)
        fields: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
            "task_name": task_name,
            "task_id": task_id,
            "tenant_id": tenant_id,
            "correlation_id": correlation_id,
        }
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exception"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return fields

    def format(self, record: logging.LogRecord) -> str:
        """One line of JSON: no raw newline, whatever the message holds."""
        return json.dumps(self.fields(record), ensure_ascii=False, default=str)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a bad format string must not break the line
        return f"{record.msg!r} (could not be formatted with its arguments)"


class _MessageRequest(Protocol):
    """What the formatter reads of a message the worker's main process handles
    (:class:`~tenant_celery.request.TenantRequest`)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...

    def _log_context(self) -> tuple[str | None, str | None]:
        """The message's verified tenant and usable correlation id, else ``None``."""
        ...


class _MainProcess:
    #: Whether a JSON formatter exists in this process (set by its ``__init__``).
    tracking = False
    #: The message the worker's main process received last: Celery logs "received"
    #: right after building its request, naming it in the record's ``data``.
    received: ContextVar[_MessageRequest | None] = ContextVar(
        "tenant_celery.log_received", default=None
    )
    #: The message whose handling (a lost pool process, a time limit, a revoke)
    #: is logging now.
    handling: ContextVar[_MessageRequest | None] = ContextVar(
        "tenant_celery.log_handling", default=None
    )


@contextmanager
def _handling(request: _MessageRequest) -> Iterator[None]:
    """Make the block's lines name ``request``'s task, tenant and correlation id."""
    if not _MainProcess.tracking:
        yield
        return
    token = _MainProcess.handling.set(request)
    try:
        yield
    finally:
        _MainProcess.handling.reset(token)


def _context_of(
    record: logging.LogRecord,
) -> tuple[str | None, str | None, str | None, str | None]:
    """Task name, task id, tenant and correlation id of the line ``record`` makes."""
    task = get_current_task()
    if task is not None:
        request_id: str | None = task.request.id
        if request_id is not None:
            return task.name, request_id, current_tenant(), current_correlation_id()
    # The worker's main process logs about tasks it is not running ("received", a
    # lost child); Celery names the task in ``extra={"data": ...}`` on some lines.
    data = record.__dict__.get("data")
    if not isinstance(data, dict):
        data = {}
    data_id = data.get("id")
    request = _MainProcess.handling.get()
    if request is None and isinstance(data_id, str):
        received = _MainProcess.received.get()
        if received is not None and received.id == data_id:
            request = received
    if request is not None and (data_id is None or data_id == request.id):
        tenant_id, correlation_id = request._log_context()
        return request.name, request.id, tenant_id, correlation_id
    if isinstance(data_id, str):
        name = data.get("name")
        task_name = name if isinstance(name, str) else None
        if request is not None:  # about another message than the one being handled
            return task_name, data_id, None, None
        return task_name, data_id, current_tenant(), current_correlation_id()
    return None, None, current_tenant(), current_correlation_id()


def configure_logging(level: int | str = logging.INFO, *, stream: TextIO | None = None) -> None:
    """Make this process log JSON lines, including a Celery worker and its children.

    Call it once at start-up, where every process runs it: in the module that
    creates the Celery app.  It

    * replaces the root logger's handlers by one writing :class:`JsonFormatter`
      lines to ``stream`` (standard error by default) and sets the root level
      to ``level``;
    * routes :mod:`warnings` into logging, so they become JSON lines too;
    * in a ``celery worker``, gives the handlers Celery sets up (root,
      ``celery.task``, multiprocessing; its ``--logfile`` included) the same
      formatter, keeping Celery's ``--loglevel`` and its capture of ``print``
      output, and logs the start-up banner as one record instead of
      printing it.  Prefork children inherit all of this.

    Calling it again replaces its own handler; nothing is installed twice.
    Changing logging configuration is not thread-safe: call it before
    starting threads.

    Two lines of a worker's output escape logging and stay plain text:
    Celery writes ``worker: Warm shutdown (MainProcess)`` (or ``Cold``)
    straight to standard output when it is asked to stop, and a Python
    process that crashes prints its traceback to standard error.
    """
    if stream is None:
        stream = sys.stderr
        if isinstance(stream, LoggingProxy):  # Celery redirected it into logging
            stream = sys.__stderr__ or sys.stdout
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if getattr(old, _OURS, False):
            old.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    _connect_worker_receivers()


def _use_json(logger: logging.Logger | None) -> None:
    if logger is None:
        return
    for handler in logger.handlers:
        if not isinstance(handler, logging.NullHandler):
            handler.setFormatter(JsonFormatter())


def _on_logger_setup(logger: logging.Logger | None = None, **_: Any) -> None:
    _use_json(logger)
    _use_json(get_multiprocessing_logger())


def _on_task_logger_setup(logger: logging.Logger | None = None, **_: Any) -> None:
    _use_json(logger)


def _on_worker_setup(sender: object = None, instance: Any = None, **_: Any) -> None:
    # ``celery worker`` prints its banner after this signal unless ``quiet``;
    # log it as one record so the output stays one JSON object per line.
    if instance is None or getattr(instance, "quiet", True):
        return
    instance.quiet = True
    try:
        banner = instance.startup_info(artlines=False) + (instance.extra_info() or "")
    except Exception:  # the banner is informative only
        _logger.debug("could not build the worker banner", exc_info=True)
        return
    _logger.info("celery worker %s starting\n%s", sender, banner.strip("\n"))


def _connect_worker_receivers() -> None:
    signals.after_setup_logger.connect(
        _on_logger_setup, weak=False, dispatch_uid="tenant_celery.json_logger"
    )
    signals.after_setup_task_logger.connect(
        _on_task_logger_setup, weak=False, dispatch_uid="tenant_celery.json_task_logger"
    )
    signals.celeryd_after_setup.connect(
        _on_worker_setup, weak=False, dispatch_uid="tenant_celery.json_banner"
    )
