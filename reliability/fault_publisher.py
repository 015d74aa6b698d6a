"""A publisher process for :func:`reliability.faults.publisher_killed`, which SIGKILLs it.

``python -m reliability.fault_publisher QUEUE INTENT CONFIRMED COUNT TENANT...``
publishes ``COUNT`` tenant tasks (:data:`tests.integration.faults_app.RECORD`)
to ``QUEUE`` on the broker named by :data:`BROKER_ENV`, round-robin over the
tenants, each with a task id chosen here.  Before each publish it appends
``<task id> <tenant>`` to the file ``INTENT``; once ``send_task`` has returned,
``<task id>`` to the file ``CONFIRMED``.  Each line is one ``write(2)`` on a
file opened for appending, so a process killed at any moment leaves whole
lines (a line cut short is ignored by :func:`read_lines`).

So, after a kill: every id in ``CONFIRMED`` was published (its ``send_task``
returned), and at most one id of ``INTENT`` is not in ``CONFIRMED``, the
publish the kill interrupted, whose message may or may not have been
committed.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from tests.integration import faults_app

from tenant_celery import tenant_context

BROKER_ENV = "TC_FAULTS_PUBLISH_BROKER_URL"
"""The broker URL (kept out of the command line, which ``ps`` shows)."""


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


def main(argv: Sequence[str]) -> int:
    queue, intent_path, confirmed_path, count, *tenants = argv
    if not tenants:
        print("usage: QUEUE INTENT CONFIRMED COUNT TENANT...", file=sys.stderr)
        return 2
    app = faults_app.client(os.environ[BROKER_ENV], queue)
    intent, confirmed = _open(intent_path), _open(confirmed_path)
    for index in range(int(count)):
        tenant = tenants[index % len(tenants)]
        task_id = str(uuid.uuid4())
        os.write(intent, f"{task_id} {tenant}\n".encode())
        with tenant_context(tenant):
            app.send_task(faults_app.RECORD, task_id=task_id)
        os.write(confirmed, f"{task_id}\n".encode())
    app.close()
    return 0


def read_lines(path: Path) -> list[list[str]]:
    """The whole lines of ``path`` (split on blanks); none when it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    complete = text if text.endswith("\n") else text.rpartition("\n")[0]
    return [line.split() for line in complete.splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
