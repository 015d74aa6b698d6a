"""What the migration how-to says about kombu's SQLAlchemy transport, checked as
``app_user`` on migrated tables: the three ways to point it at a schema of its own,
and which ``broker_transport_options`` it accepts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import sqlalchemy as sa
from celery import Celery
from kombu.transport.sqlalchemy import Channel

from tenant_celery.migrations import upgrade
from tests._rig.postgres import APP_ROLE, Database, render


@pytest.fixture
def broker_engines(database: Database) -> Iterator[None]:
    """Dispose the engines kombu caches (per URL, process-wide) for this test's database."""
    yield
    for key in [key for key in Channel._engines if database.name in key]:
        engine, _session = Channel._engines.pop(key)
        engine.dispose()


def round_trip(database: Database, options: dict[str, Any]) -> Any:
    """Publish one message and read it back through Celery's broker connection."""
    app = Celery("broker_options", set_as_current=False)
    app.conf.update(broker_url="sqla+" + render(database.app_url), broker_transport_options=options)
    with app.connection_for_write() as connection:
        queue = connection.SimpleQueue("tc.options")
        try:
            queue.put({"ping": 1})
            message = queue.get(timeout=5)
            message.ack()
            return message.payload
        finally:
            queue.close()


def stored(database: Database, schema: str) -> int:
    with database.admin_engine().connect() as conn:
        return int(
            conn.execute(sa.text(f"SELECT count(*) FROM {schema}.kombu_message")).scalar_one()
        )


@pytest.mark.parametrize("way", ["schema_translate_map", "connect_args", "role_search_path"])
def test_kombu_reaches_tables_in_a_schema(
    database: Database, broker_engines: None, way: str
) -> None:
    upgrade(database.url, schema="celery", grant_to=[APP_ROLE])
    options: dict[str, Any] = {}
    if way == "schema_translate_map":
        options = {"execution_options": {"schema_translate_map": {None: "celery"}}}
    elif way == "connect_args":
        options = {"connect_args": {"options": "-c search_path=celery,public"}}
    else:
        with database.admin_engine().begin() as conn:
            conn.execute(
                sa.text(
                    f'ALTER ROLE {APP_ROLE} IN DATABASE "{database.name}"'
                    " SET search_path = celery, public"
                )
            )
    assert round_trip(database, options) == {"ping": 1}
    assert stored(database, "celery") == 1


def test_kombu_without_a_way_to_the_schema_fails(database: Database, broker_engines: None) -> None:
    """With the tables in ``celery`` and nothing pointing there, kombu tries to create
    them in ``public`` and app_user may not."""
    upgrade(database.url, schema="celery", grant_to=[APP_ROLE])
    with pytest.raises(sa.exc.ProgrammingError, match="permission denied for schema public"):
        # No pool: kombu drops the engine whose create_all() failed, connections and all.
        round_trip(database, {"poolclass": sa.NullPool})


def test_transport_options_kombu_accepts(database: Database, broker_engines: None) -> None:
    upgrade(database.url, grant_to=[APP_ROLE])
    options = {
        # create_engine() keywords
        "pool_pre_ping": True,
        "pool_recycle": 300,
        "pool_size": 2,
        "connect_args": {"connect_timeout": 5},
    }
    assert round_trip(database, options) == {"ping": 1}


#: kombu's own connection-retry keys, which kombu removes before create_engine() from 5.5.
RETRY_KEYS = {"max_retries": 3, "interval_start": 0, "interval_step": 1, "interval_max": 2}
KOMBU_REMOVES_RETRY_KEYS = tuple(map(int, kombu.__version__.split(".")[:2])) >= (5, 5)


@pytest.mark.parametrize("option", list(RETRY_KEYS))
def test_connection_retry_keys_are_kombu_s_from_5_5(
    database: Database, broker_engines: None, option: str
) -> None:
    """From kombu 5.5 the retry keys are kombu's own; before, they reach
    create_engine(), which refuses them (the compatibility page says so)."""
    upgrade(database.url, grant_to=[APP_ROLE])
    options = {"pool_pre_ping": True, option: RETRY_KEYS[option]}
    if KOMBU_REMOVES_RETRY_KEYS:
        assert round_trip(database, options) == {"ping": 1}
    else:
        with pytest.raises(TypeError, match=f"Invalid argument.*'{option}'"):
            round_trip(database, options)


@pytest.mark.parametrize("option", ["polling_interval", "visibility_timeout"])
def test_other_transport_options_reach_create_engine_and_fail(
    database: Database, broker_engines: None, option: str
) -> None:
    upgrade(database.url, grant_to=[APP_ROLE])
    with pytest.raises(TypeError, match=f"Invalid argument.*'{option}'"):
        round_trip(database, {option: 1})
