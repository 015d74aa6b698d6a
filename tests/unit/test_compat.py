"""tenant_celery._compat: each difference between supported releases, tested on
whichever releases are installed (the compatibility matrix installs the oldest
and the newest)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pytest
import sqlalchemy as sa
from celery import Celery, Task, states

from tenant_celery import TenantTask, _compat, results
from tenant_celery.results import PooledDatabaseBackend
from tests._rig.env import celery_release

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
    assert subscriptable is (celery_release() >= (5, 7))


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


@pytest.mark.parametrize("backend_class", BACKENDS)
def test_each_backend_creates_its_tables_at_setup(
    result_app: Celery, backend_class: Any, tmp_path: Path
) -> None:
    # As from Celery 5.5 (database_create_tables_at_setup); before, only the first
    # session did, and the pooled backend stores without opening one.
    import sqlalchemy as sa  # noqa: PLC0415

    url = f"sqlite:///{tmp_path / 'setup.db'}"
    backend_class(app=result_app, url=url)
    engine = sa.create_engine(url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"celery_taskmeta", "celery_tasksetmeta"} <= tables


def test_the_own_sessions_backend_is_used_only_where_celery_shares_one_manager() -> None:
    from celery.backends.database import DatabaseBackend  # noqa: PLC0415

    shared = _compat._backends_share_one_session_manager()
    assert (_compat.DatabaseBackend is not DatabaseBackend) is shared
    assert shared is (celery_release() < (5, 5))


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


# ------------------------------------------------- role passwords per driver


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        pytest.param("plain ascii", "plain ascii", id="ascii"),
        pytest.param("I\u00adX", "IX", id="mapped-to-nothing"),
        pytest.param("\u00aa", "a", id="nfkc"),
        pytest.param("\u2168", "IX", id="nfkc-roman-numeral"),
        pytest.param("a\u2003b", "a b", id="non-ascii-space"),
        pytest.param("\u00e9t\u00e9", "\u00e9t\u00e9", id="already-prepared"),
    ],
)
def test_saslprep_prepares_a_password_as_postgresql_does(password: str, prepared: str) -> None:
    assert _compat.saslprep(password) == prepared.encode()


@pytest.mark.parametrize(
    "password",
    [
        pytest.param("\u0007bell", id="ascii-control-kept"),
        pytest.param("pass\u200eword", id="prohibited"),
        pytest.param("\u0627\u0031", id="bidi-ends-left-to-right"),
        pytest.param("\u0627a\u0628", id="bidi-mixed"),
        pytest.param("\U000e0001x", id="prohibited-tag"),
    ],
)
def test_a_password_saslprep_refuses_is_used_as_it_is(password: str) -> None:
    # The server does the same with the password a client logs in with.
    assert _compat.saslprep(password) == password.encode()


def test_scram_verifier_has_postgresql_s_format_and_keys() -> None:
    import base64  # noqa: PLC0415
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    salt = bytes(range(16))
    verifier = _compat.scram_sha256_verifier("pencil", salt=salt, iterations=4096)
    method, counts, keys = verifier.split("$")
    iterations, encoded_salt = counts.split(":")
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    assert (method, iterations, base64.b64decode(encoded_salt)) == ("SCRAM-SHA-256", "4096", salt)
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    assert stored_key == hashlib.sha256(client_key).digest()
    assert server_key == hmac.digest(salted, b"Server Key", "sha256")


def test_scram_verifier_salts_each_call() -> None:
    first, second = (_compat.scram_sha256_verifier("pencil") for _ in range(2))
    assert first != second
    assert len(first.split("$")[1].split(":")[1]) == 24  # 16 bytes of salt, in base64


def test_passwords_are_set_through_psycopg_and_psycopg2_only() -> None:
    class OtherDriverConnection:
        pass

    assert not _compat.can_set_role_password(OtherDriverConnection())
    with pytest.raises(TypeError, match="OtherDriverConnection"):
        _compat.set_role_password(OtherDriverConnection(), "app", "secret")


def test_what_the_backend_read_of_an_engine_goes_with_the_engine(result_app: Celery) -> None:
    backend = PooledDatabaseBackend(app=result_app, url="sqlite://")
    engine = sa.create_engine("sqlite://")
    found = backend.result_tables(engine)
    assert found.found
    assert not found.policy  # not PostgreSQL: no tenant column, no policy
    assert backend.result_tables(engine) is found  # read once per engine
    assert engine in results._tables
    entries = len(results._tables)
    del engine
    gc.collect()
    # An engine dropped by its caller takes its entry along: a new engine that
    # happens to get the same id() is read afresh.
    assert len(results._tables) == entries - 1
