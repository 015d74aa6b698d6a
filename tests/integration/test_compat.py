"""tenant_celery._compat on a real server: the differences that need PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from tenant_celery import _compat
from tests._rig.postgres import Database


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_sqlstate_of_a_server_error_from_either_driver(database: Database, driver: str) -> None:
    engine = database.engine(
        database.url.set(drivername=f"postgresql+{driver}"), poolclass=sa.NullPool
    )
    assert engine.dialect.driver == driver
    with pytest.raises(DBAPIError) as caught, engine.connect() as conn:
        conn.execute(sa.text("SELECT 1 / 0"))
    assert _compat.sqlstate(caught.value.orig) == "22012"  # division_by_zero
