"""Fixtures of the orders app's tests: its table, and its Celery app for the plugin."""

import os
from collections.abc import Iterator

import pytest
from celery import Celery
from sqlalchemy import create_engine, text
from tenant_celery.rls import enable_tenant_rls, grant_tenant_tables

import orders


@pytest.fixture(scope="session", autouse=True)
def orders_table() -> Iterator[None]:
    """The ``orders`` table for the session, made as your migrations make it.

    Its owner (``ORDERS_OWNER_DATABASE_URL``) creates it; the app connects as
    another role, which row-level security applies to.
    """
    owner = create_engine(os.environ["ORDERS_OWNER_DATABASE_URL"])
    with owner.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE orders ("
                " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " tenant_id uuid NOT NULL,"
                " item text NOT NULL,"
                " confirmed boolean NOT NULL DEFAULT false)"
            )
        )
        conn.execute(text("CREATE INDEX orders_tenant ON orders (tenant_id)"))
        enable_tenant_rls(conn, "orders")
        grant_tenant_tables(conn, str(orders.engine.url.username), ["orders"])
    yield
    with owner.begin() as conn:
        conn.execute(text("DROP TABLE orders"))
    owner.dispose()


@pytest.fixture(scope="session")
def orders_app() -> Celery:
    """The orders app on Celery's in-memory broker: no test reaches a real one."""
    orders.app.conf.update(broker_url="memory://", result_backend="cache+memory://")
    return orders.app


@pytest.fixture
def tenant_celery_app(orders_app: Celery) -> Celery:
    """The app the plugin's ``tenant_celery_eager`` fixture makes eager."""
    return orders_app
