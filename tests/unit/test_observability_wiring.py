"""``import tenant_celery`` alone connects the correlation id and the worker monitor.

A host that only sets ``tenant_celery_monitor_port`` must get a monitor, and
every publish must carry a correlation id, without importing the submodules.
Checked in a fresh interpreter: this one has imported them already.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
from celery.signals import before_task_publish, task_prerun, worker_init
import tenant_celery

def uids(signal):
    return {receiver[0][0] for receiver in signal.receivers if isinstance(receiver[0][0], str)}

print(sorted(uids(worker_init) | uids(before_task_publish) | uids(task_prerun)))
"""


def test_package_import_connects_monitor_and_correlation() -> None:
    run = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    connected = run.stdout
    assert "tenant_celery.monitor.start" in connected
    assert "tenant_celery.stamp_correlation" in connected
    assert "tenant_celery.enter_correlation" in connected
