"""Whether a worker's consumer consumes: what the worker monitor's ``/health`` reports.

A new connection to the broker tells only that the broker answers.  The
worker itself may still be reconnecting: after a lost connection Celery
retries with growing pauses, so a broker that is back can wait seconds for
the worker.  :func:`watch` adds a step to the app's consumer blueprint that
records when the consumer really consumes.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery, bootsteps

_STOPPING = ("closing", "terminating")  # the blueprint's human_state() while it stops


class ConsumerState:
    """Whether the worker's consumer consumes, as its :class:`ConsumerReadiness` step
    last said.  Thread-safe: the consumer's thread writes it, ``/health`` reads it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._consuming = False
        self._why = "has not connected to the broker yet"
        self._since = time.monotonic()
        self._task_consumer: Any = None

    def mark(self, consuming: bool, why: str = "", task_consumer: Any = None) -> None:
        with self._lock:
            self._consuming, self._why, self._since = consuming, why, time.monotonic()
            if task_consumer is not None:
                self._task_consumer = task_consumer

    def queues(self) -> list[str] | None:
        """The queues the worker's task consumer consumes now (remote control's
        ``add_consumer`` and ``cancel_consumer`` included); ``None`` before it started."""
        with self._lock:
            task_consumer = self._task_consumer
        if task_consumer is None:
            return None
        return [str(queue.name) for queue in list(task_consumer.queues)]

    def problem(self) -> str | None:
        """``None`` while the consumer consumes, else what it does instead and since when."""
        with self._lock:
            if self._consuming:
                return None
            return f"the worker's consumer {self._why} ({time.monotonic() - self._since:.1f}s)"


_watched: dict[int, tuple[Celery, ConsumerState]] = {}


def watch(app: Celery, state: ConsumerState) -> None:
    """Keep ``state`` up to date with the consumer of ``app``'s worker.

    Call it before the worker makes its consumer (``worker_init`` is in time).
    """
    _watched[id(app)] = (app, state)
    app.steps["consumer"].add(ConsumerReadiness)


def _mark(app: Any, consuming: bool, why: str = "", task_consumer: Any = None) -> None:
    app_and_state = _watched.get(id(app))
    if app_and_state is not None and app_and_state[0] is app:
        app_and_state[1].mark(consuming, why, task_consumer)


def consumed_queues(app: Celery) -> list[str] | None:
    """The queues ``app``'s worker consumes, as its task consumer says; ``None``
    outside a watched worker or before its consumer started."""
    app_and_state = _watched.get(id(app))
    if app_and_state is None or app_and_state[0] is not app:
        return None
    return app_and_state[1].queues()


class ConsumerReadiness(bootsteps.StartStopStep):
    """A step of the worker's consumer that records whether it consumes.

    The consumer starts its steps in order once connected, this one after the
    step that consumes the task queues.  On a lost connection Celery stops
    every step, reconnects, and starts them all again; between that stop and
    the next start the consumer is not consuming, whatever a new connection
    to the broker would show.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        _mark(parent.app, True, task_consumer=getattr(parent, "task_consumer", None))

    def stop(self, parent: Any) -> None:
        stopping = parent.blueprint.human_state() in _STOPPING
        why = "is stopping" if stopping else "is reconnecting to the broker"
        _mark(parent.app, False, why)

    def shutdown(self, parent: Any) -> None:
        _mark(parent.app, False, "is stopping")
