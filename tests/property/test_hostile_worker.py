"""Generated hostile tenant headers delivered to a real ``celery worker``.

A smaller sample than test_hostile.py, of the values a JSON message can
carry, published by name with the header written by hand (as any producer
with broker access can): the worker refuses each one before the body runs,
with an error that does not echo it, and nothing is written.  The same task
with a valid tenant writes its row, so the check can fail.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from reliability.hostile import SEEDED, TABLE, json_hostile_header_values, prepare_table
from sqlalchemy.engine import Engine

from tenant_celery import InvalidTenantId, TenantContextMissing, tenant_context
from tests._rig.postgres import APP_ROLE, Database
from tests._rig.worker import worker_fixture

from . import hostile_app

pytestmark = pytest.mark.worker

hostile_worker = worker_fixture(
    hostile_app.__name__,
    name="hostile_worker",
    matrix=[pytest.param(("redis", "prefork"), id="redis-prefork", marks=pytest.mark.worker)],
)
TIMEOUT = 30


@pytest.fixture(scope="module")
def table(module_database: Database) -> Engine:
    """The seeded hostile-items table; the superuser engine that counts its rows."""
    engine = module_database.admin_engine()
    prepare_table(engine, APP_ROLE)
    return engine


def rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {TABLE}")).scalar_one())


def test_a_valid_tenant_writes(table: Engine, hostile_worker: Any) -> None:
    before = rows(table)
    with tenant_context(SEEDED[0]):
        # The app role sees its tenant's 3 seeded rows and the one it added.
        assert hostile_app.write_note.delay("valid").get(timeout=TIMEOUT) == 4
    assert rows(table) == before + 1


@settings(max_examples=25)
@given(value=json_hostile_header_values())
def test_hostile_header_is_refused_by_the_worker(
    table: Engine, hostile_worker: Any, value: Any
) -> None:
    before = rows(table)
    note = f"hostile-{uuid.uuid4().hex}"
    result = hostile_app.app.send_task(
        hostile_app.write_note.name, (note,), headers={"tenant_id": value}
    )
    with pytest.raises((InvalidTenantId, TenantContextMissing)) as info:
        result.get(timeout=TIMEOUT)
    message = str(info.value)
    assert message.isprintable()
    if isinstance(value, str) and len(value) >= 4:
        assert value not in message
    assert rows(table) == before
