"""The correlation id: context, message header, eager tasks.

Published messages go to kombu's in-memory transport; real workers carrying the
id to child tasks are covered by tests/integration/test_logging_worker.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from tenant_celery.config import _RESERVED_HEADERS
from tenant_celery.correlation import (
    CORRELATION_HEADER,
    correlation_context,
    current_correlation_id,
    message_correlation,
    new_correlation_id,
)


def test_header_is_one_celery_leaves_alone() -> None:
    assert CORRELATION_HEADER.isidentifier()
    assert CORRELATION_HEADER not in _RESERVED_HEADERS  # "correlation_id" is


def test_context_nests_and_restores() -> None:
    assert current_correlation_id() is None
    with correlation_context("outer") as outer:
        assert outer == current_correlation_id() == "outer"
        with correlation_context() as inner:
            assert current_correlation_id() == inner != "outer"
        assert current_correlation_id() == "outer"
    assert current_correlation_id() is None


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "new\nline", 42, b"bytes"])
def test_unusable_incoming_id_is_replaced(bad: object) -> None:
    with correlation_context(bad) as used:
        assert used != bad
        assert len(used) == 32


def test_new_ids_differ() -> None:
    assert new_correlation_id() != new_correlation_id()


def test_publish_carries_the_context_id(app: Celery, published: list[dict[str, Any]]) -> None:
    with correlation_context("req-42"):
        app.send_task("shop.invoice")
        app.send_task("shop.invoice", headers={CORRELATION_HEADER: "explicit"})
    assert [h[CORRELATION_HEADER] for h in published] == ["req-42", "explicit"]


def test_first_publish_without_context_starts_an_id(
    app: Celery, published: list[dict[str, Any]]
) -> None:
    app.send_task("shop.invoice")
    app.send_task("shop.invoice", headers={CORRELATION_HEADER: "bad id"})
    first, second = (h[CORRELATION_HEADER] for h in published)
    assert first != second
    assert len(first) == len(second) == 32
    assert current_correlation_id() is None  # the publisher's context is unchanged


def test_caller_dict_is_not_changed(app: Celery, published: list[dict[str, Any]]) -> None:
    headers = {"x-request": "r"}
    with correlation_context("req-1"):
        app.send_task("shop.invoice", headers=headers)
    assert headers == {"x-request": "r"}


def test_eager_tasks_run_under_the_callers_id_or_a_new_one() -> None:
    app = Celery("correlation_eager", set_as_current=False)

    @app.task(shared=False)
    def seen() -> str | None:
        return current_correlation_id()

    with correlation_context("req-7"):
        assert seen.apply().get() == "req-7"
        assert seen.apply(headers={CORRELATION_HEADER: "given"}).get() == "given"
        assert current_correlation_id() == "req-7"
    fresh = seen.apply().get()
    assert fresh is not None
    assert len(fresh) == 32
    assert current_correlation_id() is None  # nothing left behind
    app.close()


def test_message_correlation_enters_the_messages_id_or_none() -> None:
    with correlation_context("thread-had-this"):
        with message_correlation("from-message") as entered:
            assert entered == current_correlation_id() == "from-message"
        with message_correlation(None) as entered:
            assert entered is current_correlation_id() is None
        with message_correlation("bad id") as entered:
            assert entered is None
        assert current_correlation_id() == "thread-had-this"
