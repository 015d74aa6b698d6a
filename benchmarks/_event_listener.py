"""A monitor of a benchmark worker's events, run as a process of its own, as
``celery events`` and Flower run::

    python -m benchmarks._event_listener BROKER_URL HOSTNAME EXPECTED

It consumes Celery's events with :class:`celery.events.EventReceiver` (a queue
of its own, auto-delete, bound to the event exchange; its wake-up broadcast
asks the workers for a heartbeat, as ``celery events`` does) and counts those
of the worker named ``HOSTNAME``.  It prints ``ready`` once that worker's
first ``worker-heartbeat`` arrives (its events reach this queue from then on),
and stops when it has seen ``EXPECTED`` ``task-succeeded`` events, or at
``SIGTERM``.  Then it prints one line of JSON: the worker's events by type,
how many task events carried a ``tenant_id``, the delay from each task
event's sending to its receipt (milliseconds: median, 95th percentile, most),
how many events came from other workers, and the CPU time this process
used from ``ready`` to the end.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from types import FrameType
from typing import Any

from celery import Celery

import tenant_celery  # noqa: F401 (registers the tcpg+ scheme with kombu)

from ._common import median, percentile

READY = "ready"
SUCCEEDED = "task-succeeded"


def listen(broker_url: str, hostname: str, expected: int) -> dict[str, Any]:
    """Count ``hostname``'s events until ``expected`` tasks succeeded or SIGTERM."""
    app = Celery("bench-events", broker=broker_url)
    app.conf.broker_connection_retry_on_startup = True
    by_type: Counter[str] = Counter()
    foreign = 0
    with_tenant = 0
    delays_ms: list[float] = []
    ready = False
    cpu_at_ready = 0.0

    def on_event(event: dict[str, Any]) -> None:
        nonlocal foreign, with_tenant, ready, cpu_at_ready
        if event.get("hostname") != hostname:
            foreign += 1
            return
        kind = str(event.get("type"))
        if not ready:
            if kind != "worker-heartbeat":
                return  # not counted: sent before this queue was surely bound
            ready = True
            cpu_at_ready = time.process_time()
            print(READY, flush=True)
        by_type[kind] += 1
        if kind.startswith("task-"):
            with_tenant += "tenant_id" in event
            delays_ms.append((float(event["local_received"]) - float(event["timestamp"])) * 1000)
            if kind == SUCCEEDED and by_type[SUCCEEDED] >= expected:
                receiver.should_stop = True

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_event})

        def stop(signum: int, frame: FrameType | None) -> None:
            receiver.should_stop = True

        signal.signal(signal.SIGTERM, stop)
        started = time.monotonic()
        receiver.capture(limit=None, timeout=None, wakeup=True)
        cpu_s = time.process_time() - cpu_at_ready
    app.close()
    return {
        "events": dict(sorted(by_type.items())),
        "task_events": sum(n for kind, n in by_type.items() if kind.startswith("task-")),
        "task_events_with_tenant": with_tenant,
        "delay_ms": {
            "median": round(median(delays_ms), 2),
            "p95": round(percentile(delays_ms, 0.95), 2),
            "max": round(max(delays_ms, default=float("nan")), 2),
        },
        "other_workers_events": foreign,
        "cpu_s": round(cpu_s, 3),
        "listened_s": round(time.monotonic() - started, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    broker_url, hostname, expected = argv if argv is not None else sys.argv[1:]
    print(json.dumps(listen(broker_url, hostname, int(expected))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
