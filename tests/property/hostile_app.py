"""A tenant task that would write a row, run by a real worker in test_hostile_worker.py.

``write_note`` adds a row of :data:`reliability.hostile.TABLE` in its tenant,
as ``app_user``: a hostile header that got through would leave one.
"""

from __future__ import annotations

from functools import cache

import sqlalchemy as sa
from celery import Celery
from reliability.hostile import TABLE
from sqlalchemy.engine import Engine

from tenant_celery import current_tenant, set_tenant_guc, tenant_task
from tests._rig.appconf import apply_test_config, database_url

app = apply_test_config(Celery("hostile_app"))


@cache
def _engine() -> Engine:
    return sa.create_engine(database_url(app_role=True), poolclass=sa.NullPool)


@tenant_task(app=app)
def write_note(note: str) -> int:
    with _engine().begin() as conn:
        set_tenant_guc(conn)
        conn.execute(
            sa.text(f"INSERT INTO {TABLE} (tenant_id, note) VALUES (:tenant, :note)"),
            {"tenant": current_tenant(), "note": note},
        )
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {TABLE}")).scalar_one())
