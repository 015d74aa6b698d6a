"""The tenant setting through PgBouncer in transaction pooling mode.

PgBouncer runs with one server connection per pool, so every client
transaction lands on the same PostgreSQL backend, one after another: if any
tenant state survived a transaction, the next client would see it. The
engines are the ones ``examples/pgbouncer/engine.py`` builds and PgBouncer's
configuration is ``examples/pgbouncer/pgbouncer.ini``: the files the
PgBouncer how-to shows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from examples.pgbouncer.engine import pgbouncer_engine
from sqlalchemy.engine import Engine

from tenant_celery import TenantContextMissing, bind_tenant_guc, tenant_context
from tests._rig.pgbouncer import PgBouncer, run_pgbouncer
from tests._rig.postgres import Database, render
from tests._rig.worker import WorkerFactory
from tests.integration import pgbouncer_app
from tests.integration.notes import create_notes

TENANT_A = str(uuid.uuid4())
TENANT_B = str(uuid.uuid4())
GUC = "app.current_tenant_id"

SEEN = sa.text("SELECT DISTINCT tenant_id::text FROM notes")
BACKEND = sa.text("SELECT pg_backend_pid()")
SETTING = sa.text(f"SELECT coalesce(current_setting('{GUC}', true), '')")


@pytest.fixture
def bouncer(database: Database) -> Iterator[PgBouncer]:
    create_notes(database.admin_engine())
    with database.admin_engine().begin() as conn:
        for tenant in (TENANT_A, TENANT_B):
            conn.execute(
                sa.text("INSERT INTO notes (tenant_id, body) VALUES (:t, 'seed')"), {"t": tenant}
            )
    with run_pgbouncer(database, pool_size=1) as running:
        yield running


@pytest.fixture
def engines(bouncer: PgBouncer) -> Iterator[list[Engine]]:
    """Two clients of PgBouncer built by the example's ``pgbouncer_engine``."""
    built = [pgbouncer_engine(render(bouncer.url()), pool_size=1) for _ in range(2)]
    yield built
    for engine in built:
        engine.dispose()


@pytest.fixture
def raw_engine(bouncer: PgBouncer, database: Database) -> Engine:
    """A client of PgBouncer with no tenant binding and psycopg's defaults."""
    return database.engine(bouncer.url(), pool_size=1, max_overflow=0)


def test_clients_sharing_one_server_connection_see_only_their_tenant(
    engines: list[Engine], raw_engine: Engine
) -> None:
    backends = set()
    for round_ in range(10):
        for engine, tenant in zip(engines, (TENANT_A, TENANT_B), strict=True):
            with tenant_context(tenant), engine.begin() as conn:
                assert list(conn.execute(SEEN).scalars()) == [tenant], round_
                backends.add(conn.execute(BACKEND).scalar_one())
        # between tenant transactions, a client with no tenant gets the same
        # server connection and finds nothing on it
        with raw_engine.begin() as conn:
            assert conn.execute(SETTING).scalar_one() == ""
            assert list(conn.execute(SEEN).scalars()) == []
            backends.add(conn.execute(BACKEND).scalar_one())
    assert len(backends) == 1, "the clients did not share one server connection"


def test_strict_engine_refuses_a_transaction_without_a_tenant(engines: list[Engine]) -> None:
    with pytest.raises(TenantContextMissing), engines[0].begin() as conn:
        conn.execute(SEEN)


def test_a_session_level_setting_would_leak_to_the_next_client(
    bouncer: PgBouncer, database: Database
) -> None:
    """The control: what transaction-local setting prevents. A plain ``SET``-style
    session setting made by one client is read by another client's transaction."""
    first = database.engine(bouncer.url(), pool_size=1, max_overflow=0)
    second = database.engine(bouncer.url(), pool_size=1, max_overflow=0)
    with first.begin() as conn:
        conn.execute(sa.text("SELECT set_config(:g, :t, false)"), {"g": GUC, "t": TENANT_A})
    try:
        with second.begin() as conn:
            assert conn.execute(SETTING).scalar_one() == TENANT_A
            assert list(conn.execute(SEEN).scalars()) == [TENANT_A]
    finally:
        with first.begin() as conn:
            conn.execute(sa.text(f"RESET {GUC}"))


def test_a_bound_engine_hides_another_clients_session_setting(
    bouncer: PgBouncer, database: Database
) -> None:
    """The same careless client as above; a transaction of a bound engine begun outside
    any tenant lands on its server connection and sees nothing of tenant A."""
    careless = database.engine(bouncer.url(), pool_size=1, max_overflow=0)
    bound = database.engine(bouncer.url(), pool_size=1, max_overflow=0)
    unbind = bind_tenant_guc(bound)
    with careless.begin() as conn:
        conn.execute(sa.text("SELECT set_config(:g, :t, false)"), {"g": GUC, "t": TENANT_A})
    try:
        with bound.begin() as conn:
            assert conn.execute(SETTING).scalar_one() == ""
            assert list(conn.execute(SEEN).scalars()) == []
        with tenant_context(TENANT_B), bound.begin() as conn:
            assert list(conn.execute(SEEN).scalars()) == [TENANT_B]
        with careless.begin() as conn:  # the setting was still there, for the unbound client
            assert list(conn.execute(SEEN).scalars()) == [TENANT_A]
    finally:
        unbind()
        with careless.begin() as conn:
            conn.execute(sa.text(f"RESET {GUC}"))


def test_prepared_statements_need_prepare_threshold_none(
    bouncer: PgBouncer, database: Database, engines: list[Engine]
) -> None:
    """psycopg 3's defaults break under transaction pooling; the example's engine does not.

    The control uses psycopg 3 whatever the rig's driver: psycopg2 never prepares
    statements on the server, so it has nothing to break.
    """
    url = bouncer.url().set(drivername="postgresql+psycopg")
    defaults = [database.engine(url, pool_size=1, max_overflow=0) for _ in range(2)]
    query = sa.text("SELECT count(*) FROM notes WHERE body = :b")
    with pytest.raises(sa.exc.DBAPIError) as caught:
        for _ in range(10):
            for engine in defaults:
                with engine.begin() as conn:
                    conn.execute(query, {"b": "seed"})
    assert type(caught.value.orig) is psycopg.errors.DuplicatePreparedStatement, caught.value
    for _ in range(10):
        for engine, tenant in zip(engines, (TENANT_A, TENANT_B), strict=True):
            with tenant_context(tenant), engine.begin() as conn:
                assert conn.execute(query, {"b": "seed"}).scalar_one() == 1


@pytest.mark.worker
def test_worker_tasks_through_pgbouncer_stay_in_their_tenant(
    bouncer: PgBouncer, database: Database, start_worker: WorkerFactory
) -> None:
    handle = start_worker(
        "tests.integration.pgbouncer_app",
        broker="redis",
        pool="prefork",
        concurrency=2,
        extra_env={pgbouncer_app.URL_ENV: render(bouncer.url())},
    )
    with handle.bind(pgbouncer_app.app):
        pending = []
        for number in range(20):
            tenant = (TENANT_A, TENANT_B)[number % 2]
            with tenant_context(tenant):
                pending.append((tenant, pgbouncer_app.write_and_look.delay(f"n{number}")))
        results = [(tenant, result.get(timeout=30)) for tenant, result in pending]
    for tenant, result in results:
        assert result["tenant"] == tenant
        assert result["seen"] == [tenant]
    assert len({result["backend"] for _, result in results}) == 1
    with database.admin_engine().connect() as conn:
        counts = dict(
            conn.execute(sa.text("SELECT tenant_id::text, count(*) FROM notes GROUP BY 1")).all()
        )
    assert counts == {TENANT_A: 11, TENANT_B: 11}
