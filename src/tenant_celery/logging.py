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
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

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

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The keys and values of one line, before JSON encoding.

        Values that JSON cannot encode are written with ``str()``.
        """
        task_name, task_id = _task_of(record)
        fields: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
            "task_name": task_name,
            "task_id": task_id,
            "tenant_id": current_tenant(),
            "correlation_id": current_correlation_id(),
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


def _task_of(record: logging.LogRecord) -> tuple[str | None, str | None]:
    task = get_current_task()
    if task is not None:
        request_id: str | None = task.request.id
        if request_id is not None:
            return task.name, request_id
    # The worker's main process logs about tasks it is not running ("received",
    # a lost child); Celery passes their name and id as ``extra={"data": ...}``.
    data = record.__dict__.get("data")
    if isinstance(data, dict) and isinstance(data.get("id"), str):
        name = data.get("name")
        return (name if isinstance(name, str) else None), data["id"]
    return None, None


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
