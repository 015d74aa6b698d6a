"""The prompt-acknowledgement guard of :mod:`tenant_celery._worker_fixes`.

Its effect on real workers (a window of tasks every two seconds, and tasks run
twice after a warm shutdown, on Celery before 5.7) is tested by
``tests/integration/test_transport.py`` in the oldest cell of the
compatibility matrix; these tests pin which calls it runs at once.
"""

from __future__ import annotations

import logging
import threading
import types
from typing import Any

import pytest
from celery.worker.consumer.consumer import Consumer
from kombu.message import Message

from tenant_celery import _compat, _worker_fixes, transport

LOG = logging.getLogger("test")


class _Recorded(Message):
    """A message whose acknowledgement and rejection are only recorded."""

    def __init__(self, channel: Any) -> None:
        super().__init__(body=b"{}", channel=channel, delivery_tag="1.1")
        self.calls: list[str] = []

    def ack(self, multiple: bool = False) -> None:
        self.calls.append("ack")

    def reject(self, requeue: bool = False) -> None:
        self.calls.append("reject")


class _Failing(_Recorded):
    def ack(self, multiple: bool = False) -> None:
        raise RuntimeError("the broker went away")


def _transport_channel() -> Any:
    # Only its type matters to the guard: no connection is made.
    return transport.Channel.__new__(transport.Channel)


@pytest.fixture
def deferred() -> list[Any]:
    return []


@pytest.fixture
def call_soon(deferred: list[Any]) -> Any:
    def original(consumer: Any, callback: Any, *args: Any, **kwargs: Any) -> Any:
        deferred.append(callback)
        return callback

    return _worker_fixes._acking_at_once(original)


NO_LOOP = types.SimpleNamespace(hub=None)
EVENT_LOOP = types.SimpleNamespace(hub=object())


@pytest.mark.parametrize(
    ("method", "expected"), [("ack_log_error", "ack"), ("reject_log_error", "reject")]
)
def test_a_transport_message_is_acknowledged_at_once_without_an_event_loop(
    call_soon: Any, deferred: list[Any], method: str, expected: str
) -> None:
    message = _Recorded(_transport_channel())
    call_soon(NO_LOOP, getattr(message, method), LOG, (OSError,))
    assert message.calls == [expected]
    assert deferred == []


def test_with_an_event_loop_the_acknowledgement_is_left_to_it(
    call_soon: Any, deferred: list[Any]
) -> None:
    message = _Recorded(_transport_channel())
    call_soon(EVENT_LOOP, message.ack_log_error, LOG, (OSError,))
    assert message.calls == []
    assert deferred == [message.ack_log_error]


def test_from_a_pool_thread_the_acknowledgement_runs_at_once_with_an_event_loop(
    call_soon: Any, deferred: list[Any]
) -> None:
    # The threads pool acknowledges from its own threads; kombu before 5.7 would not
    # wake the loop for an acknowledgement put on its ready list.
    message = _Recorded(_transport_channel())
    thread = threading.Thread(
        target=call_soon, args=(EVENT_LOOP, message.ack_log_error, LOG, (OSError,))
    )
    thread.start()
    thread.join()
    assert message.calls == ["ack"]
    assert deferred == []


def test_another_transport_s_acknowledgement_is_deferred_as_before(
    call_soon: Any, deferred: list[Any]
) -> None:
    message = _Recorded(types.SimpleNamespace())
    call_soon(NO_LOOP, message.ack_log_error, LOG, (OSError,))
    assert message.calls == []
    assert len(deferred) == 1


def test_other_pending_operations_are_deferred_as_before(
    call_soon: Any, deferred: list[Any]
) -> None:
    calls: list[str] = []

    def grow_pool() -> None:
        calls.append("grow")

    call_soon(NO_LOOP, grow_pool)
    assert calls == []
    assert deferred == [grow_pool]


def test_a_failing_acknowledgement_is_logged_not_raised(
    call_soon: Any, deferred: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    message = _Failing(_transport_channel())
    with caplog.at_level(logging.ERROR, logger="tenant_celery.worker_fixes"):
        call_soon(NO_LOOP, message.ack_log_error, LOG, ())
    assert "the broker went away" in caplog.text
    assert deferred == []


def test_the_guard_is_installed_only_where_the_consumer_defers_acknowledgements() -> None:
    before = Consumer.call_soon
    installed = _worker_fixes.install_prompt_acks()
    assert installed is not _compat.consumer_acks_at_once()
    assert installed is not hasattr(Consumer, "call_soon_ack")
    marked = getattr(Consumer.call_soon, _worker_fixes._GUARD_MARK, False)
    assert marked is installed
    if not installed:
        assert Consumer.call_soon is before
    # Idempotent: a second call does not wrap the guard again.
    guarded = Consumer.call_soon
    assert _worker_fixes.install_prompt_acks() is installed
    assert Consumer.call_soon is guarded
