"""The tenant run of Celery's canvas suite: a pytest plugin, ``-p compat.canvas_tenant``.

Loaded after ``celery.contrib.pytest`` (whose ``celery_parameters`` fixture
this one replaces), it changes the suite in two ways and nothing else:

* every app the suite makes gets ``task_cls = "tenant_celery:TenantTask"``:
  the session app, whose in-process worker runs the tasks, and the per-test
  ``app`` the tests publish with.  Every task of ``t.integration.tasks`` is
  then a tenant task; Celery's ``celery.*`` built-ins are exempt
  (:attr:`tenant_celery.TenantTask.tenant_required`);
* every test runs inside :func:`tenant_celery.tenant_context` of its own
  tenant, a UUID derived from the test's node id, so whatever it publishes
  carries that tenant.

Signing is not configured here: the runner (:mod:`compat.canvas`) puts the
keys in ``TENANT_CELERY_HEADER_SIGNING_KEYS``, which the test process reads
and so does the worker, which runs in that process (``celery.contrib.testing``
starts it in a thread; its prefork children are forks of it).  The plugin
stops the run when signing is off or an app's task class is not a
``TenantTask``, so a misconfigured run cannot pass for a tenant run.

When ``CANVAS_TENANT_EVENTS`` names a file, every tenant task the worker
enters or refuses appends a tab-separated line to it (``entered``, tenant,
task name; or ``rejected``, reason, task name), for the runner to count.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from tenant_celery import TenantTask, tenant_context
from tenant_celery.signals import tenant_entered, tenant_rejected
from tenant_celery.signing import SIGNING_KEYS_ENV, signing_keys

EVENTS_ENV = "CANVAS_TENANT_EVENTS"
"""Environment variable naming the file the worker's tenant events are appended to."""

TASK_CLS = "tenant_celery:TenantTask"


def tenant_of(nodeid: str) -> str:
    """The tenant a test runs in: the same on every run and rerun of that test."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"celery-canvas:{nodeid}"))


def _record(*fields: str) -> None:
    path = os.environ.get(EVENTS_ENV)
    if path:
        # One short line per write, appended: the pool's children share the file.
        with open(path, "a", encoding="utf-8") as events:
            events.write("\t".join(fields) + "\n")


def _entered(sender: Any, tenant_id: str, **_: Any) -> None:
    _record("entered", tenant_id, sender.name)


def _rejected(sender: Any, reason: str, **_: Any) -> None:
    _record("rejected", reason, sender.name)


def pytest_configure(config: pytest.Config) -> None:
    if not signing_keys(None):
        raise pytest.UsageError(
            f"compat.canvas_tenant runs the suite on a signed worker: set {SIGNING_KEYS_ENV} "
            "(keys of at least 32 bytes, comma-separated)"
        )
    # Connected here, not on import: the worker's pool forks after this, and a
    # process that only imports the module (its tests) gets no receivers.
    tenant_entered.connect(_entered)
    tenant_rejected.connect(_rejected)


def pytest_unconfigure(config: pytest.Config) -> None:
    tenant_entered.disconnect(_entered)
    tenant_rejected.disconnect(_rejected)


def _require_tenant_tasks(app: Celery, which: str) -> None:
    task_class: object = app.Task
    if not (isinstance(task_class, type) and issubclass(task_class, TenantTask)):
        pytest.exit(
            f"the {which} has the task class {task_class!r}, not a TenantTask: the "
            "celery_parameters fixture of compat.canvas_tenant was not used (load the "
            "plugin after celery.contrib.pytest)",
            returncode=3,
        )


@pytest.fixture(scope="session")
def celery_parameters() -> dict[str, Any]:
    """Arguments of every ``Celery(...)`` the suite makes: TenantTask as the task class."""
    return {"task_cls": TASK_CLS}


@pytest.fixture(autouse=True)
def canvas_tenant(
    request: pytest.FixtureRequest, app: Celery, celery_session_app: Celery
) -> Iterator[str]:
    """Run the test inside its own tenant, on apps whose tasks are tenant tasks."""
    _require_tenant_tasks(celery_session_app, "worker's session app")
    _require_tenant_tasks(app, "test's own app")
    with tenant_context(tenant_of(request.node.nodeid)) as tenant:
        yield tenant
