"""tenant_celery._compat on a real server: the differences that need PostgreSQL."""

from __future__ import annotations

import base64
import uuid

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from tenant_celery import _compat
from tests._rig.postgres import Database, libpq_kwargs


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_sqlstate_of_a_server_error_from_either_driver(database: Database, driver: str) -> None:
    engine = database.engine(
        database.url.set(drivername=f"postgresql+{driver}"), poolclass=sa.NullPool
    )
    assert engine.dialect.driver == driver
    with pytest.raises(DBAPIError) as caught, engine.connect() as conn:
        conn.execute(sa.text("SELECT 1 / 0"))
    assert _compat.sqlstate(caught.value.orig) == "22012"  # division_by_zero


@pytest.mark.parametrize(
    "password",
    ["pencil", "p\u00e4ss w\u00f6rd", "I\u00adX\u2168", "pass\u200eword"],
    ids=["ascii", "latin", "saslprep-mapped", "saslprep-refused"],
)
def test_python_scram_verifier_matches_libpq_s(database: Database, password: str) -> None:
    """psycopg2 gets its verifier from Python: given libpq's salt and iteration
    count, it must be exactly the verifier libpq made."""
    with psycopg.connect(**libpq_kwargs(database.url)) as conn:
        made_by_libpq = conn.pgconn.encrypt_password(
            password.encode(), b"app", b"scram-sha-256"
        ).decode()
    iterations, salt = made_by_libpq.split("$")[1].split(":")
    assert made_by_libpq == _compat.scram_sha256_verifier(
        password, salt=base64.b64decode(salt), iterations=int(iterations)
    )


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_a_role_password_set_through_either_driver_is_stored_as_its_verifier(
    database: Database, driver: str
) -> None:
    role = f"compat_{driver}_{uuid.uuid4().hex[:8]}"
    password = "p\u00e4ss-\u2168'"
    engine = database.engine(
        database.url.set(drivername=f"postgresql+{driver}"), poolclass=sa.NullPool
    )
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
    try:
        with engine.begin() as conn:
            _compat.set_role_password(conn.connection.driver_connection, role, password)
            stored = conn.execute(
                sa.text("SELECT rolpassword FROM pg_authid WHERE rolname = :r"), {"r": role}
            ).scalar_one()
        iterations, salt = stored.split("$")[1].split(":")
        assert stored == _compat.scram_sha256_verifier(
            password, salt=base64.b64decode(salt), iterations=int(iterations)
        )
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP ROLE {role}")
