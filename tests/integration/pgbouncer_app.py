"""Tenant tasks whose database connections go through PgBouncer in transaction mode.

The engine is the one ``examples/pgbouncer/engine.py`` builds (the PgBouncer
how-to shows that file); the worker gets PgBouncer's URL from
``TC_TEST_PGBOUNCER_URL``.
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from celery import Celery
from examples.pgbouncer.engine import pgbouncer_engine
from sqlalchemy.engine import Engine

from tenant_celery import current_tenant, tenant_task
from tests._rig.appconf import apply_test_config

app = apply_test_config(Celery("pgbouncer_app"))

URL_ENV = "TC_TEST_PGBOUNCER_URL"

_engine: Engine | None = None


def engine() -> Engine:
    global _engine  # noqa: PLW0603 (one engine per worker process)
    if _engine is None:
        _engine = pgbouncer_engine(os.environ[URL_ENV], pool_size=1)
    return _engine


@tenant_task(app=app)
def write_and_look(body: str) -> dict[str, Any]:
    """Add a note, then report what this transaction sees."""
    with engine().begin() as conn:
        conn.execute(
            sa.text("INSERT INTO notes (tenant_id, body) VALUES (:t, :b)"),
            {"t": current_tenant(), "b": body},
        )
        seen = conn.execute(sa.text("SELECT DISTINCT tenant_id::text FROM notes")).scalars()
        backend = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        return {"tenant": current_tenant(), "seen": sorted(seen), "backend": backend}
