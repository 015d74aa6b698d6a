"""Tenant tasks that read and write an RLS-protected table through ``bind_tenant_guc``.

Run by real workers in test_db_worker.py.  Each worker process builds its own
engine, connected as the unprivileged ``app_user``, on first use (after any
fork), and binds the tenant setting to it; the task bodies never mention the
setting.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from celery import Celery
from sqlalchemy.engine import Engine

from tenant_celery import bind_tenant_guc, current_tenant, tenant_task
from tests._rig.appconf import apply_test_config, database_url

app = apply_test_config(Celery("guc_app"))

_engine: Engine | None = None


def engine() -> Engine:
    global _engine  # noqa: PLW0603 (one engine per worker process)
    if _engine is None:
        engine = sa.create_engine(database_url(app_role=True), pool_size=2, max_overflow=0)
        bind_tenant_guc(engine)  # before publishing it: a thread must never see it unbound
        _engine = engine
    return _engine


COUNT = sa.text("SELECT count(*) FROM notes")


@tenant_task(app=app)
def add_note(body: str) -> dict[str, Any]:
    with engine().begin() as conn:
        conn.execute(
            sa.text("INSERT INTO notes (tenant_id, body) VALUES (:t, :b)"),
            {"t": current_tenant(), "b": body},
        )
        return {"tenant": current_tenant(), "visible": conn.execute(COUNT).scalar_one()}


@tenant_task(app=app)
def visible_notes() -> list[str]:
    with engine().begin() as conn:
        return list(conn.execute(sa.text("SELECT body FROM notes ORDER BY id")).scalars())


@tenant_task(app=app)
def write_into(other_tenant: str) -> str:
    with engine().begin() as conn:
        conn.execute(
            sa.text("INSERT INTO notes (tenant_id, body) VALUES (:t, 'intruder')"),
            {"t": other_tenant},
        )
    return "written"


@app.task
def count_without_tenant() -> int:
    with engine().begin() as conn:
        return int(conn.execute(COUNT).scalar_one())
