"""Fixtures of the unit tests: an app on kombu's in-memory broker, and the
headers of what it publishes.  No worker runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, _state
from celery.signals import before_task_publish


@pytest.fixture
def app() -> Iterator[Celery]:
    """A current app on the in-memory broker; the app current before is current
    again afterwards, so that what a test set on this one (a header name) reaches
    no later test through Celery's current app."""
    previous = getattr(_state._tls, "current_app", None)
    app = Celery("unit", broker="memory://", set_as_current=True)
    try:
        yield app
    finally:
        app.close()
        _state._set_current_app(previous)


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """The headers of every message published during the test.

    The dicts are the messages' own, read after every receiver has stamped them.
    """
    seen: list[dict[str, Any]] = []

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append(headers if headers is not None else {})

    before_task_publish.connect(record)
    yield seen
    before_task_publish.disconnect(record)
