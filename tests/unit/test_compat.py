"""tenant_celery._compat: each difference between supported releases, tested on
whichever releases are installed (the compatibility matrix installs the oldest
and the newest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import celery
import pytest
from celery import Celery, Task, states

from tenant_celery import TenantTask, _compat
from tenant_celery.results import PooledDatabaseBackend

_P = ParamSpec("_P")
_R = TypeVar("_R")


# --------------------------------------------------------------- Celery's Task


@pytest.mark.parametrize(
    "generic", [_compat.GenericTask, _compat._SubscriptableTask()], ids=["installed", "stand-in"]
)
def test_a_class_based_on_a_subscripted_task_is_a_plain_task_subclass(generic: Any) -> None:
    class Subscripted(generic[_P, _R]):  # type: ignore[misc]
        pass

    assert Subscripted.__bases__ == (Task,)
    assert Subscripted.__mro__[1:] == Task.__mro__


def test_tenant_task_derives_from_celery_task_directly() -> None:
    assert TenantTask.__bases__ == (Task,)


def test_the_stand_in_is_used_only_where_celery_task_is_not_subscriptable() -> None:
    subscriptable = hasattr(Task, "__class_getitem__")
    assert (_compat.GenericTask is Task) is subscriptable
    assert subscriptable is (tuple(map(int, celery.__version__.split(".")[:2])) >= (5, 7))


# -------------------------------------------------- Celery's database backend

BACKENDS = [
    pytest.param(_compat.DatabaseBackend, id="installed"),
    pytest.param(_compat._DatabaseBackendWithItsOwnSessions, id="own-sessions"),
    pytest.param(PooledDatabaseBackend, id="pooled"),
]


@pytest.fixture
def result_app() -> Celery:
    """An app whose database backends keep results; no broker is used."""
    return Celery("compat", broker="memory://", set_as_current=False)


@pytest.mark.parametrize("backend_class", BACKENDS)
def test_each_backend_has_its_own_session_manager(result_app: Celery, backend_class: Any) -> None:
    first = backend_class(app=result_app, url="sqlite://")
    second = backend_class(app=result_app, url="sqlite://")
    assert first.session_manager is not second.session_manager


@pytest.mark.parametrize("backend_class", BACKENDS)
def test_backends_of_one_process_each_create_their_database_s_tables(
    result_app: Celery, backend_class: Any, tmp_path: Path
) -> None:
    # Before Celery 5.5 one session manager served every backend and created the
    # tables in the first database only: the second backend's store failed.
    for name in ("first", "second"):
        backend = backend_class(app=result_app, url=f"sqlite:///{tmp_path / name}.db")
        backend.store_result(f"task-{name}", {"stored": name}, states.SUCCESS)
        assert backend.get_task_meta(f"task-{name}")["result"] == {"stored": name}


def test_the_own_sessions_backend_is_used_only_where_celery_shares_one_manager() -> None:
    from celery.backends.database import DatabaseBackend  # noqa: PLC0415

    shared = _compat._backends_share_one_session_manager()
    assert (_compat.DatabaseBackend is not DatabaseBackend) is shared
    assert shared is (tuple(map(int, celery.__version__.split(".")[:2])) < (5, 5))


@pytest.mark.parametrize(
    "backend_class",
    BACKENDS,
)
def test_the_engine_callback_setting_reaches_the_session_manager(
    result_app: Celery, backend_class: Any
) -> None:
    def callback(engine: Any) -> None:
        pass

    result_app.conf.database_engine_callback = callback
    backend = backend_class(app=result_app, url="sqlite://")
    assert backend.session_manager.engine_callback is callback


def test_the_pooled_backend_calls_the_engine_callback_once_per_engine(
    result_app: Celery, tmp_path: Path
) -> None:
    engines: list[Any] = []
    result_app.conf.database_engine_callback = engines.append
    for n in range(3):
        backend = PooledDatabaseBackend(app=result_app, url=f"sqlite:///{tmp_path / 'r.db'}")
        backend.store_result(f"task-{n}", n, states.SUCCESS)
        assert backend.get_task_meta(f"task-{n}")["result"] == n
    assert len(engines) == 1
    assert engines[0].url.database == str(tmp_path / "r.db")


# ------------------------------------------------------------------- drivers


def test_sqlstate_of_a_psycopg_error() -> None:
    import psycopg  # noqa: PLC0415

    assert _compat.sqlstate(psycopg.errors.InsufficientPrivilege()) == "42501"


@pytest.mark.parametrize("error", [ValueError("42501"), None, object()])
def test_no_sqlstate_outside_database_errors(error: object) -> None:
    assert _compat.sqlstate(error) is None
