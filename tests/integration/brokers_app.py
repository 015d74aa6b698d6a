"""A tenant task on an app configured from one of ``examples/brokers/*_settings.py``.

The worker is told which settings module to load by ``TC_TEST_BROKER_SETTINGS``;
the rig's ``TC_TEST_*`` variables then replace only the URLs and the queue, so
the worker talks to the test's broker and database with every other setting as
the example wrote it.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from tenant_celery import current_tenant, tenant_task
from tests._rig.appconf import apply_test_config

SETTINGS_ENV = "TC_TEST_BROKER_SETTINGS"

app = Celery("brokers_app")
if os.environ.get(SETTINGS_ENV):
    app.config_from_object(os.environ[SETTINGS_ENV])
apply_test_config(app)


@tenant_task(app=app)
def where_am_i() -> dict[str, Any]:
    """The tenant this task runs in, and the settings its worker runs with."""
    conf = app.conf
    return {
        "tenant": current_tenant(),
        "transport": app.connection_for_read().transport_cls,
        "broker_transport_options": conf.broker_transport_options,
        "worker_prefetch_multiplier": conf.worker_prefetch_multiplier,
    }
