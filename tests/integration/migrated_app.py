"""A plain Celery app on the migrated tables: kombu's SQLAlchemy broker and Celery's
database result backend, connected as ``app_user`` (no CREATE right).

Run by real workers in test_migrated_worker.py.  ``TC_MIGRATED_SCHEMA`` names the
schema the migration put the tables in (unset: ``public``) and
``TC_MIGRATED_EXTENDED`` (``1``/``0``) turns Celery's extended results on or off;
:func:`point_at` applies both, in the worker at import and in the test process.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from tests._rig.appconf import apply_test_config

SCHEMA_ENV = "TC_MIGRATED_SCHEMA"
EXTENDED_ENV = "TC_MIGRATED_EXTENDED"

app = apply_test_config(Celery("migrated_app"))


def schema_settings(schema: str | None, *, extended: bool) -> dict[str, Any]:
    """Celery settings that point the broker and the result backend at ``schema``."""
    if schema is None:
        return {"result_extended": extended}
    return {
        "result_extended": extended,
        # kombu's SQLAlchemy transport has no schema setting; these options go to its
        # create_engine(), and the translation map qualifies every table and sequence.
        "broker_transport_options": {"execution_options": {"schema_translate_map": {None: schema}}},
        "database_table_schemas": {"task": schema, "group": schema},
    }


def point_at(schema: str | None, *, extended: bool) -> None:
    """Configure :data:`app` for the migrated tables in ``schema``."""
    app.conf.update(schema_settings(schema, extended=extended))


point_at(os.environ.get(SCHEMA_ENV) or None, extended=os.environ.get(EXTENDED_ENV, "1") == "1")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def fail(message: str) -> None:
    raise ValueError(message)
