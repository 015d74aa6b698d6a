"""The JSON formatter and ``configure_logging`` in one process (no worker).

A real prefork worker's log is checked line by line in
tests/integration/test_logging_worker.py.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.mocks import TaskMessage
from celery.signals import after_setup_logger, after_setup_task_logger, celeryd_after_setup

from tenant_celery import tenant_context, tenant_task
from tenant_celery.correlation import correlation_context
from tenant_celery.logging import JsonFormatter, _MainProcess, configure_logging
from tenant_celery.request import TenantRequest

A = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000a"
B = "6f1c1b2e-8c1e-4b8e-9a57-1d3b1a0c000b"
KEYS = ["timestamp", "level", "logger", "message", "task_name", "task_id", "tenant_id"]
KEYS += ["correlation_id"]


def _record(message: str = "hello %s", *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("app.module", logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def _format(record: logging.LogRecord) -> dict[str, Any]:
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_keys_outside_any_task_or_tenant() -> None:
    line = _format(_record("hello %s", "world"))
    assert list(line) == KEYS
    assert line["message"] == "hello world"
    assert line["level"] == "INFO"
    assert line["logger"] == "app.module"
    assert line["timestamp"].endswith("+00:00")
    assert [line[key] for key in KEYS[4:]] == [None, None, None, None]


def test_tenant_and_correlation_of_the_logging_code() -> None:
    with tenant_context(A), correlation_context("req-1"):
        line = _format(_record())
    assert (line["tenant_id"], line["correlation_id"]) == (A, "req-1")


def test_multi_line_message_stays_one_line() -> None:
    line = _format(_record("first\nsecond \u00e9"))
    assert line["message"] == "first\nsecond \u00e9"


def test_exception_is_formatted() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record()
        record.exc_info = sys.exc_info()
    line = _format(record)
    assert line["exception"].startswith("Traceback")
    assert "ValueError: boom" in line["exception"]


def test_unformattable_message_still_makes_a_line() -> None:
    line = _format(_record("%d items", "not a number"))
    assert "could not be formatted" in line["message"]


def test_values_json_cannot_encode_are_written_as_text() -> None:
    class Formatter(JsonFormatter):
        def fields(self, record: logging.LogRecord) -> dict[str, Any]:
            return {**super().fields(record), "when": object}

    line = json.loads(Formatter().format(_record()))
    assert line["when"] == "<class 'object'>"


def test_task_name_and_id_inside_an_eager_task() -> None:
    app = Celery("logging", set_as_current=False)
    lines: list[dict[str, Any]] = []

    @tenant_task(app=app, shared=False, bind=True)
    def logs(self: Any) -> str:
        lines.append(_format(_record("inside")))
        return str(self.request.id)

    with tenant_context(A):
        task_id = logs.apply().get()
    assert lines[0]["task_name"] == logs.name
    assert lines[0]["task_id"] == task_id
    assert lines[0]["tenant_id"] == A
    assert lines[0]["correlation_id"]  # an eager task gets an id too


def test_celery_worker_lines_about_other_tasks() -> None:
    # The worker's main process logs "received" with the task in ``data``.
    record = _record("received", data={"id": "abc", "name": "shop.invoice"})
    line = _format(record)
    assert (line["task_name"], line["task_id"]) == ("shop.invoice", "abc")


# --------------------------------------------- the worker's main process, per message

TASK_ID = "0b6b7c3e-1111-4a4a-8888-000000000001"
HOSTILE = "\x1b[2J\r\nlevel=CRITICAL forged\x00" + "A" * 20_000


@pytest.fixture
def worker_app() -> Celery:
    app = Celery("logging-main", set_as_current=False)

    @tenant_task(app=app, shared=False, name="shop.invoice")
    def invoice() -> None:
        pass

    return app


def _request(app: Celery, task_id: str = TASK_ID, **headers: Any) -> TenantRequest:
    """What Celery builds in the worker's main process for a message, as its strategy does."""
    message = TaskMessage("shop.invoice", id=task_id, **headers)
    return TenantRequest(message, app=app, task=app.tasks["shop.invoice"])


def _received(task_id: str = TASK_ID) -> logging.LogRecord:
    """Celery's "received" record, as celery.worker.strategy makes it."""
    context = {"id": task_id, "name": "shop.invoice", "args": "()", "kwargs": "{}", "eta": None}
    record = _record("Task %(name)s[%(id)s] received", context, data=context)
    record.args = context  # a mapping, as Celery passes it
    return record


def test_received_line_names_the_message_tenant_and_correlation(worker_app: Celery) -> None:
    JsonFormatter()  # a JSON formatter exists: the main process tracks its messages
    _request(worker_app, tenant_id=A, x_correlation_id="web-request-7f3a")
    line = _format(_received())
    assert line["message"] == f"Task shop.invoice[{TASK_ID}] received"
    assert (line["task_name"], line["task_id"]) == ("shop.invoice", TASK_ID)
    assert (line["tenant_id"], line["correlation_id"]) == (A, "web-request-7f3a")


def test_received_line_of_another_message_names_no_tenant(worker_app: Celery) -> None:
    JsonFormatter()
    _request(worker_app, tenant_id=A, x_correlation_id="web-request-7f3a")
    other = "0b6b7c3e-1111-4a4a-8888-000000000002"
    line = _format(_received(other))
    assert (line["task_id"], line["tenant_id"], line["correlation_id"]) == (other, None, None)


@pytest.mark.parametrize(
    "headers",
    [
        {"tenant_id": HOSTILE, "x_correlation_id": HOSTILE},
        {"tenant_id": HOSTILE[:40], "x_correlation_id": HOSTILE[:40]},
        {"tenant_id": A + "\n", "x_correlation_id": "two words"},
        {"tenant_id": ["not", "text"], "x_correlation_id": {"nested": HOSTILE}},
        # one message, two values: its nested headers disagree with its own
        {"tenant_id": A, "x_correlation_id": "req-1", "headers": {"tenant_id": B}},
    ],
    ids=["long-control", "short-control", "trailing-newline", "not-text", "ambiguous"],
)
def test_hostile_headers_are_logged_as_absent(worker_app: Celery, headers: dict[str, Any]) -> None:
    formatter = JsonFormatter()
    request = _request(worker_app, **headers)
    received = formatter.format(_received())
    with request._message_tenant():
        lost = formatter.format(_record("Task handler raised error: %r", "WorkerLostError()"))
    for text in (received, lost):
        line = json.loads(text)
        assert line["task_id"] == TASK_ID
        assert line["tenant_id"] is None
        assert line["correlation_id"] in (None, "req-1")  # "req-1" only where it is usable
        for hostile_part in ("forged", "AAAA", "\\u001b", "\\u0000"):
            assert hostile_part not in text
        assert len(text) < 1000


def test_unverified_tenant_is_logged_as_absent(worker_app: Celery) -> None:
    worker_app.conf.tenant_celery_header_signing_keys = ["new-signing-key-0123456789abcdef-NEW"]
    JsonFormatter()
    _request(worker_app, tenant_id=A, x_correlation_id="req-1")  # not signed
    line = _format(_received())
    assert (line["task_id"], line["tenant_id"], line["correlation_id"]) == (TASK_ID, None, "req-1")


def test_a_tenant_parser_that_breaks_breaks_no_line(
    worker_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(value: object) -> str:
        raise RuntimeError("host parser bug")

    monkeypatch.setattr("tenant_celery.request.parse_tenant_id", broken)
    JsonFormatter()
    _request(worker_app, tenant_id=A, x_correlation_id="req-1")
    line = _format(_received())
    assert (line["task_id"], line["tenant_id"], line["correlation_id"]) == (TASK_ID, None, "req-1")


def test_lines_while_the_main_process_handles_a_message(worker_app: Celery) -> None:
    # A lost pool process: Celery logs "Task handler raised error: WorkerLostError(...)"
    # with no task in the record, from the request's on_failure.
    JsonFormatter()
    request = _request(worker_app, tenant_id=A, x_correlation_id="req-1")
    with request._message_tenant():
        lost = _format(_record("Task handler raised error: %r", "WorkerLostError()"))
        other = "0b6b7c3e-1111-4a4a-8888-000000000002"
        about_other = _format(_record("x", data={"id": other, "name": "shop.other"}))
    assert (lost["task_name"], lost["task_id"]) == ("shop.invoice", TASK_ID)
    assert (lost["tenant_id"], lost["correlation_id"]) == (A, "req-1")
    # A line naming another message does not get this one's tenant.
    assert (about_other["task_id"], about_other["tenant_id"]) == (other, None)
    # Outside the handling, a line names no message.
    after = _format(_record("Process 'ForkPoolWorker-1' pid:1 exited with 'signal 9 (SIGKILL)'"))
    assert [after[key] for key in KEYS[4:]] == [None, None, None, None]


@pytest.fixture
def request_log() -> Iterator[io.StringIO]:
    """JSON lines of Celery's ``celery.worker.request`` logger."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("celery.worker.request")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_time_limit_line_names_the_message(worker_app: Celery, request_log: io.StringIO) -> None:
    request = _request(worker_app, tenant_id=A, x_correlation_id="req-1")
    request.on_timeout(True, 5.0)  # soft: only logged, by the main process
    (line,) = [json.loads(text) for text in request_log.getvalue().splitlines()]
    assert line["message"] == f"Soft time limit (5.0s) exceeded for shop.invoice[{TASK_ID}]"
    assert (line["task_name"], line["task_id"]) == ("shop.invoice", TASK_ID)
    assert (line["tenant_id"], line["correlation_id"]) == (A, "req-1")


def test_no_tracking_without_a_json_formatter(
    worker_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_MainProcess, "tracking", False)
    token = _MainProcess.received.set(None)
    try:
        request = _request(worker_app, tenant_id=A)
        assert _MainProcess.received.get() is None
        with request._message_tenant():
            assert _MainProcess.handling.get() is None
    finally:
        _MainProcess.received.reset(token)


@pytest.fixture
def clean_logging() -> Iterator[None]:
    """Restore the root logger (pytest's capture included) and warnings after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.mark.usefixtures("clean_logging")
def test_configure_logging_is_idempotent() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first)
    configure_logging("WARNING", stream=second)
    root = logging.getLogger()
    assert len(root.handlers) == 1
    assert root.level == logging.WARNING
    logging.getLogger("app").warning("once")
    assert first.getvalue() == ""
    assert [json.loads(line)["message"] for line in second.getvalue().splitlines()] == ["once"]


@pytest.mark.usefixtures("clean_logging")
def test_warnings_become_json_lines() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful", UserWarning, stacklevel=1)
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["logger"] == "py.warnings"
    assert "UserWarning: careful" in line["message"]


@pytest.mark.usefixtures("clean_logging")
def test_handlers_celery_sets_up_get_the_formatter() -> None:
    configure_logging(stream=io.StringIO())
    root_handler = logging.StreamHandler(io.StringIO())
    task_logger = logging.getLogger("tests.celery.task")
    task_handler = logging.StreamHandler(io.StringIO())
    task_logger.addHandler(task_handler)
    try:
        after_setup_logger.send(sender=None, logger=SimpleNamespace(handlers=[root_handler]))
        after_setup_task_logger.send(sender=None, logger=task_logger)
    finally:
        task_logger.removeHandler(task_handler)
    assert isinstance(root_handler.formatter, JsonFormatter)
    assert isinstance(task_handler.formatter, JsonFormatter)


@pytest.mark.usefixtures("clean_logging")
def test_worker_banner_becomes_one_record() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)

    class Worker:
        quiet = False

        def startup_info(self, artlines: bool = True) -> str:
            return "[config]\n.> app: shop\n"

        def extra_info(self) -> str:
            return "[tasks]\n  . shop.invoice\n"

    worker = Worker()
    celeryd_after_setup.send(sender="w1@host", instance=worker, conf=None)
    assert worker.quiet is True  # Celery prints no banner after this signal
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["message"].startswith("celery worker w1@host starting\n[config]")
    assert "shop.invoice" in line["message"]
