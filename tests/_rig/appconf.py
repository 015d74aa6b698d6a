"""The configuration convention every test Celery app module follows.

A test app module (e.g. ``tests/integration/rig_app.py``) builds its app and calls
:func:`apply_test_config` at import time::

    from celery import Celery
    from tests._rig.appconf import apply_test_config

    app = apply_test_config(Celery("my_test_app"))

The worker fixture starts ``celery -A <module> worker`` with these environment
variables set, so the worker process is configured for its broker, backend and queue:

=========================== ==========================================================
``TC_TEST_BROKER_URL``      broker URL (Redis, RabbitMQ or ``sqla+postgresql+psycopg://``)
``TC_TEST_BACKEND_URL``     result backend URL (Redis or ``db+postgresql+psycopg://``)
``TC_TEST_QUEUE``           the worker's own queue; becomes ``task_default_queue``
``TC_TEST_DATABASE_URL``    the worker's test database, superuser (SQLAlchemy URL)
``TC_TEST_APP_DATABASE_URL`` the same database as the unprivileged ``app_user``
=========================== ==========================================================

In the test process the same module is imported without those variables: it then
points at ``memory://`` with no result backend, so forgetting to bind it fails fast.
The worker handle's ``configure(app)``/``bind(app)`` give it the worker's settings.

This module must stay importable without pytest: worker processes import it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from celery import Celery

BROKER_URL_ENV = "TC_TEST_BROKER_URL"
BACKEND_URL_ENV = "TC_TEST_BACKEND_URL"
QUEUE_ENV = "TC_TEST_QUEUE"
DATABASE_URL_ENV = "TC_TEST_DATABASE_URL"
APP_DATABASE_URL_ENV = "TC_TEST_APP_DATABASE_URL"

#: Settings every test app shares, in the worker and in the test process.
BASE_CONFIG: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "enable_utc": True,
    "timezone": "UTC",
    "broker_connection_retry_on_startup": True,
}


def config_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Broker, backend and queue settings from the ``TC_TEST_*`` variables."""
    environ = os.environ if environ is None else environ
    return {
        "broker_url": environ.get(BROKER_URL_ENV) or "memory://",
        "result_backend": environ.get(BACKEND_URL_ENV) or None,
        "task_default_queue": environ.get(QUEUE_ENV) or "celery",
    }


def apply_test_config(app: Celery, environ: Mapping[str, str] | None = None) -> Celery:
    """Configure *app* with :data:`BASE_CONFIG` and the ``TC_TEST_*`` variables; return it."""
    app.conf.update(BASE_CONFIG)
    app.conf.update(config_from_env(environ))
    return app


def database_url(*, app_role: bool = False, environ: Mapping[str, str] | None = None) -> str:
    """The worker's test database URL (as ``app_user`` when *app_role*).

    Raises :class:`RuntimeError` outside a worker started by the rig.
    """
    environ = os.environ if environ is None else environ
    name = APP_DATABASE_URL_ENV if app_role else DATABASE_URL_ENV
    value = environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: not running under the test rig's worker fixture")
    return value
