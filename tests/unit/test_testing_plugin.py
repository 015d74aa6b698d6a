"""The pytest plugin without a database: loading it, tenant ids, eager settings, fixtures.

The isolation check and the plugin in host sessions against PostgreSQL are in
tests/integration/test_testing_plugin.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from importlib import metadata

import pytest
from celery import Celery

import tenant_celery.testing
from tenant_celery import (
    ConfigurationError,
    TenantCeleryError,
    integer_tenant_id,
    parse_tenant_id,
    set_tenant_id_parser,
    slug_tenant_id,
    uuid_tenant_id,
)
from tenant_celery.testing import (
    IsolationNotProvable,
    TenantIsolationError,
    TenantLeak,
    eager_tasks,
    new_tenant_id,
)

pytest_plugins = ["pytester"]

# Run in a new interpreter: connecting a socket, or any Celery app or SQLAlchemy
# engine existing after the import, is a side effect of loading the plugin.
IMPORT_CHECK = """
    import gc
    import socket
    import sys

    def refuse(*args, **kwargs):
        raise AssertionError("importing the plugin opened a connection")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse

    import tenant_celery.testing

    import celery._state
    from sqlalchemy.engine import Engine

    assert celery._state.default_app is None, "a default Celery app was created"
    assert celery._state._tls.current_app is None, "a Celery app was set as current"
    assert not list(celery._state._get_active_apps()), "a Celery app was created"
    assert not [o for o in gc.get_objects() if isinstance(o, Engine)], "an engine was created"
    for module in ("celery.contrib.pytest", "tenant_celery.rls", "alembic", "psycopg"):
        assert module not in sys.modules, f"{module} was imported"
    print("clean")
"""


def test_importing_the_plugin_has_no_side_effects() -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(IMPORT_CHECK)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"


def test_the_plugin_is_registered_under_pytest11() -> None:
    (entry,) = metadata.entry_points(group="pytest11", name="tenant_celery")
    assert entry.value == "tenant_celery.testing"
    assert entry.dist is not None
    assert entry.dist.name == "tenant-celery"


def test_this_session_loaded_it(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.get_plugin("tenant_celery") is tenant_celery.testing


def test_public_names() -> None:
    assert tenant_celery.testing.__all__ == sorted(tenant_celery.testing.__all__)
    for name in tenant_celery.testing.__all__:
        assert getattr(tenant_celery.testing, name).__doc__, name


def test_failures_are_assertion_errors_of_the_package() -> None:
    for error in (TenantIsolationError, TenantLeak, IsolationNotProvable):
        assert issubclass(error, AssertionError)
        assert issubclass(error, TenantCeleryError)
        assert issubclass(error, TenantIsolationError)
    assert str(TenantLeak()) == "a tenant could read or write rows that are not its own"


# --- tenant ids ----------------------------------------------------------------


@pytest.fixture
def restore_parser() -> Iterator[None]:
    """Start with the default tenant id parser; put the previous one back afterwards."""
    previous = set_tenant_id_parser(uuid_tenant_id)
    yield
    set_tenant_id_parser(previous)


def test_new_ids_are_distinct_uuids_by_default() -> None:
    ids = [new_tenant_id() for _ in range(500)]
    assert len(set(ids)) == 500
    assert all(str(uuid.UUID(tenant)) == tenant for tenant in ids)


@pytest.mark.usefixtures("restore_parser")
def test_new_ids_follow_the_parser() -> None:
    set_tenant_id_parser(integer_tenant_id)
    number = new_tenant_id()
    assert 0 < int(number) < 2**31
    set_tenant_id_parser(slug_tenant_id)
    assert slug_tenant_id(new_tenant_id()) != new_tenant_id()


@pytest.mark.usefixtures("restore_parser")
def test_a_parser_accepting_nothing_generated_is_a_configuration_error() -> None:
    def acme_only(value: object) -> str:
        if value == "acme":
            return "acme"
        raise ValueError(value)

    set_tenant_id_parser(acme_only)
    with pytest.raises(ConfigurationError, match="override the tenant_celery_make_tenant_id"):
        new_tenant_id()


@pytest.mark.usefixtures("restore_parser")
def test_a_parser_that_keeps_returning_one_id_is_a_configuration_error() -> None:
    set_tenant_id_parser(lambda value: "same")
    new_tenant_id()  # the first "same" is fresh
    with pytest.raises(ConfigurationError, match="returned only ids already given out"):
        new_tenant_id()


def test_the_fixtures_give_fresh_ids(
    tenant_celery_tenant_id: str, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    assert len({tenant_celery_tenant_id, *tenant_celery_tenant_ids}) == 3
    assert parse_tenant_id(tenant_celery_tenant_id) == tenant_celery_tenant_id


@pytest.mark.usefixtures("restore_parser")
def test_an_overridden_factory_is_used_and_checked(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import itertools

        import pytest

        from tenant_celery import slug_tenant_id, set_tenant_id_parser

        set_tenant_id_parser(slug_tenant_id)
        numbers = itertools.count(1)


        @pytest.fixture
        def tenant_celery_make_tenant_id():
            return lambda: f"acme-{next(numbers)}"
        """
    )
    pytester.makepyfile(
        test_ids="""
        def test_ids(tenant_celery_tenant_ids):
            assert tenant_celery_tenant_ids == ("acme-1", "acme-2")
        """,
        test_same="""
        import pytest


        @pytest.fixture
        def tenant_celery_make_tenant_id():
            return lambda: "acme"


        def test_same_twice(tenant_celery_tenant_ids):
            pass
        """,
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*tenant_celery_make_tenant_id returned the same tenant twice*"])


# --- eager settings --------------------------------------------------------------


def test_eager_tasks_restores_the_settings_it_changed() -> None:
    app = Celery("eager_unit", broker="memory://", set_as_current=False)
    app.conf.task_eager_propagates = True
    with pytest.raises(RuntimeError), eager_tasks(app) as inside:
        assert inside is app
        assert app.conf.task_always_eager is True
        assert app.conf.task_eager_propagates is True
        raise RuntimeError("the block failed")
    assert app.conf.task_always_eager is False
    assert app.conf.task_eager_propagates is True
