"""The GUC session helpers on real PostgreSQL, as the unprivileged ``app_user``.

Every check reads rows through a Row-Level Security policy, so a helper that
failed to set the tenant (or set it for too long) shows up as rows seen or
not seen, never as a mocked call.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from tenant_celery import (
    ConfigurationError,
    InvalidTenantId,
    TenantContextMissing,
    TransactionRequired,
    TransactionTenantMismatch,
    async_set_tenant_guc,
    async_tenant_session,
    bind_tenant_guc,
    current_tenant,
    set_tenant_guc,
    tenant_context,
    tenant_session,
)
from tests._rig.postgres import Database

from .notes import count_all, create_notes

A = str(uuid.uuid4())
B = str(uuid.uuid4())
GUC = "app.current_tenant_id"
COUNT = text("SELECT count(*) FROM notes")
READ_GUC = text("SELECT current_setting('app.current_tenant_id', true)")


@pytest.fixture
def notes(admin_engine: Engine) -> Engine:
    """Table ``notes`` under a tenant policy, owned by the superuser: A has 3 rows, B 2."""
    create_notes(admin_engine)
    with admin_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO notes (tenant_id, body)"
                " VALUES (:a,'1'), (:a,'2'), (:a,'3'), (:b,'4'), (:b,'5')"
            ),
            {"a": A, "b": B},
        )
    return admin_engine


@pytest.fixture
def statements(app_engine: Engine) -> Iterator[list[str]]:
    """Every statement ``app_engine`` sends, in order."""
    sent: list[str] = []

    def record(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    event.listen(app_engine, "before_cursor_execute", record)
    yield sent
    event.remove(app_engine, "before_cursor_execute", record)


# --- set_tenant_guc ----------------------------------------------------------


def test_each_tenant_sees_only_its_rows(notes: Engine, app_engine: Engine) -> None:
    for tenant, expected in ((A, 3), (B, 2)):
        with app_engine.begin() as conn:
            assert set_tenant_guc(conn, tenant) == tenant
            assert conn.execute(COUNT).scalar_one() == expected
    with app_engine.begin() as conn:  # no tenant: nothing, never everything
        assert conn.execute(COUNT).scalar_one() == 0


def test_default_tenant_is_the_context(notes: Engine, app_engine: Engine) -> None:
    with tenant_context(B), app_engine.begin() as conn:
        set_tenant_guc(conn)
        assert conn.execute(COUNT).scalar_one() == 2
    with app_engine.begin() as conn, pytest.raises(TenantContextMissing):
        set_tenant_guc(conn)


def test_session_autobegin_counts(notes: Engine, app_engine: Engine) -> None:
    with Session(app_engine) as session:
        set_tenant_guc(session, A)
        assert session.execute(COUNT).scalar_one() == 3


def test_connection_without_transaction_is_an_error(
    notes: Engine, app_engine: Engine, statements: list[str]
) -> None:
    with app_engine.connect() as conn:
        with pytest.raises(TransactionRequired, match="begin"):
            set_tenant_guc(conn, A)
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        with autocommit.begin(), pytest.raises(TransactionRequired, match="AUTOCOMMIT"):
            set_tenant_guc(autocommit, A)
    assert not [s for s in statements if "set_config" in s]


@pytest.mark.parametrize("setting", ["current_tenant", "app.x'; DROP TABLE notes; --", "a.b.c", ""])
def test_bad_setting_name_raises_before_sql(
    notes: Engine, app_engine: Engine, statements: list[str], setting: str
) -> None:
    with app_engine.begin() as conn, pytest.raises(ConfigurationError, match=r"prefix\.name"):
        set_tenant_guc(conn, A, setting=setting)
    assert statements == []  # not even BEGIN reached the server: nothing ran
    assert count_all(notes) == 5


def test_setting_name_from_the_environment(
    app_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANT_CELERY_GUC", "custom.tenant")
    with app_engine.begin() as conn:
        set_tenant_guc(conn, A)
        assert conn.execute(text("SELECT current_setting('custom.tenant')")).scalar_one() == A
        assert conn.execute(READ_GUC).scalar_one() is None
        set_tenant_guc(conn, B, setting="other.tenant")  # an argument beats the environment
        assert conn.execute(text("SELECT current_setting('other.tenant')")).scalar_one() == B


def test_bad_tenant_raises_before_sql(
    notes: Engine, app_engine: Engine, statements: list[str]
) -> None:
    with app_engine.begin() as conn, pytest.raises(InvalidTenantId):
        set_tenant_guc(conn, "' OR 1=1 --")
    assert statements == []


def test_with_check_refuses_other_tenants_rows(notes: Engine, app_engine: Engine) -> None:
    with pytest.raises(ProgrammingError, match="row-level security"):
        with app_engine.begin() as conn:
            set_tenant_guc(conn, A)
            conn.execute(text("INSERT INTO notes (tenant_id, body) VALUES (:b, 'x')"), {"b": B})
    with pytest.raises(ProgrammingError, match="row-level security"):
        with app_engine.begin() as conn:
            set_tenant_guc(conn, A)
            conn.execute(text("UPDATE notes SET tenant_id = :b"), {"b": B})
    with pytest.raises(ProgrammingError, match="row-level security"):
        with app_engine.begin() as conn:  # no tenant: no writes at all
            conn.execute(text("INSERT INTO notes (tenant_id, body) VALUES (:a, 'x')"), {"a": A})
    with app_engine.begin() as conn:  # and B's rows cannot be reached from A
        set_tenant_guc(conn, A)
        assert conn.execute(text("DELETE FROM notes WHERE tenant_id = :b"), {"b": B}).rowcount == 0
    assert count_all(notes) == 5


# --- tenant_session ----------------------------------------------------------


def test_tenant_session_commits(notes: Engine, app_engine: Engine) -> None:
    factory = sessionmaker(app_engine)
    with tenant_session(factory, A) as session:
        session.execute(text("INSERT INTO notes (tenant_id, body) VALUES (:a, 'new')"), {"a": A})
        assert current_tenant() == A
    assert count_all(notes) == 6
    assert not session.in_transaction()


def test_tenant_session_rolls_back_on_error(notes: Engine, app_engine: Engine) -> None:
    factory = sessionmaker(app_engine)
    with pytest.raises(RuntimeError), tenant_session(factory, B) as session:
        session.execute(text("INSERT INTO notes (tenant_id, body) VALUES (:b, 'gone')"), {"b": B})
        raise RuntimeError("boom")
    assert count_all(notes) == 5


def test_tenant_session_refuses_missing_tenant_before_opening(app_engine: Engine) -> None:
    opened: list[Session] = []

    def factory() -> Session:
        opened.append(Session(app_engine))
        return opened[-1]

    with pytest.raises(TenantContextMissing), tenant_session(factory):
        pass
    assert opened == []


# --- bind_tenant_guc ----------------------------------------------------------


def test_bind_adds_exactly_one_statement_per_transaction(
    notes: Engine, app_engine: Engine, statements: list[str]
) -> None:
    unbind = bind_tenant_guc(app_engine)
    try:
        with tenant_context(A):
            for _ in range(3):
                with app_engine.begin() as conn:
                    for _ in range(4):
                        assert conn.execute(COUNT).scalar_one() == 3
    finally:
        unbind()
    guc = [s for s in statements if "set_config" in s]
    queries = [s for s in statements if "count(*)" in s]
    assert len(guc) == 3
    assert len(queries) == 12
    assert len(statements) == 15


def test_bind_outside_tenant_sets_empty_or_refuses(
    notes: Engine, app_engine: Engine, statements: list[str]
) -> None:
    unbind = bind_tenant_guc(app_engine)
    try:
        with app_engine.begin() as conn:
            assert conn.execute(COUNT).scalar_one() == 0
            assert conn.execute(READ_GUC).scalar_one() == ""
    finally:
        unbind()
    assert len([s for s in statements if "set_config" in s]) == 1  # '' for this transaction
    unbind = bind_tenant_guc(app_engine, strict=True)
    try:
        with pytest.raises(TenantContextMissing), app_engine.begin() as conn:
            conn.execute(text("INSERT INTO notes (tenant_id, body) VALUES (:a, 'x')"), {"a": A})
    finally:
        unbind()
    assert count_all(notes) == 5


def test_bind_sessionmaker(notes: Engine, app_engine: Engine) -> None:
    factory = sessionmaker(app_engine)
    unbind = bind_tenant_guc(factory)
    try:
        with tenant_context(B), factory() as session:
            assert session.execute(COUNT).scalar_one() == 2
        with Session(app_engine) as other, tenant_context(B):  # not from the factory
            assert other.execute(COUNT).scalar_one() == 0
    finally:
        unbind()


def test_savepoint_in_another_tenant_is_refused(
    notes: Engine, app_engine: Engine, statements: list[str]
) -> None:
    factory = sessionmaker(app_engine)
    unbind = bind_tenant_guc(factory)
    try:
        with tenant_context(A), factory() as session:
            assert session.execute(COUNT).scalar_one() == 3
            with session.begin_nested():  # in its own tenant a SAVEPOINT is fine
                assert session.execute(COUNT).scalar_one() == 3
            with tenant_context(B):
                session.begin_nested()  # SQLAlchemy sends the SAVEPOINT with the next query
                with pytest.raises(TransactionTenantMismatch, match="under another"):
                    session.execute(COUNT)
            session.rollback()
            assert session.execute(COUNT).scalar_one() == 3  # a new transaction, in A
    finally:
        unbind()
    assert len([s for s in statements if "set_config" in s]) == 2  # one per transaction


def test_bind_twice(app_engine: Engine) -> None:
    unbind = bind_tenant_guc(app_engine)
    try:
        bind_tenant_guc(app_engine)()  # same options: nothing new, nothing removed
        with pytest.raises(ConfigurationError, match="already bound"):
            bind_tenant_guc(app_engine, strict=True)
    finally:
        unbind()
    with pytest.raises(TypeError, match="Engine"):
        bind_tenant_guc("postgresql://")  # type: ignore[arg-type]


# --- no leak ------------------------------------------------------------------


def test_pooled_connections_never_carry_a_tenant(notes: Engine, database: Database) -> None:
    engine = database.engine(database.app_url, pool_size=2, max_overflow=0)
    unbind = bind_tenant_guc(engine)
    pids: set[int] = set()
    try:
        for index in range(60):
            tenant, expected = ((A, 3), (B, 2))[index % 2]
            fails = index % 3 == 0
            try:
                with tenant_context(tenant), engine.begin() as conn:
                    assert conn.execute(COUNT).scalar_one() == expected
                    if fails:
                        raise RuntimeError("mid-transaction failure")
                    if index % 5 == 0:
                        conn.execute(text("SELECT 1/0"))
            except (RuntimeError, DBAPIError):
                pass
            with engine.connect() as fresh:  # outside any tenant: a clean slate
                pids.add(fresh.execute(text("SELECT pg_backend_pid()")).scalar_one())
                assert fresh.execute(READ_GUC).scalar_one() in (None, "")
                assert fresh.execute(COUNT).scalar_one() == 0
                fresh.rollback()
    finally:
        unbind()
    assert len(pids) <= 2, "the pool should have reused its two connections"


def test_killed_connection_does_not_leak(notes: Engine, database: Database) -> None:
    engine = database.engine(database.app_url, pool_size=1, max_overflow=0, pool_pre_ping=True)
    with pytest.raises(DBAPIError), engine.begin() as conn:
        set_tenant_guc(conn, A)
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with notes.connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.execute(COUNT)
    with engine.connect() as fresh:
        assert fresh.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
        assert fresh.execute(READ_GUC).scalar_one() in (None, "")
        assert fresh.execute(COUNT).scalar_one() == 0


# --- async twins --------------------------------------------------------------


def async_engine(database: Database) -> AsyncEngine:
    return create_async_engine(database.async_app_url, pool_size=2, max_overflow=0)


def test_async_helpers(notes: Engine, database: Database) -> None:
    async def main() -> None:
        engine = async_engine(database)
        try:
            async with engine.begin() as conn:
                assert await async_set_tenant_guc(conn, A) == A
                assert (await conn.execute(COUNT)).scalar_one() == 3
            async with engine.connect() as conn:
                with pytest.raises(TransactionRequired):
                    await async_set_tenant_guc(conn, A)
            factory = async_sessionmaker(engine)
            async with async_tenant_session(factory, B) as session:
                assert (await session.execute(COUNT)).scalar_one() == 2
                await session.execute(
                    text("INSERT INTO notes (tenant_id, body) VALUES (:b, 'async')"), {"b": B}
                )
            with pytest.raises(ProgrammingError, match="row-level security"):
                async with async_tenant_session(factory, B) as session:
                    await session.execute(
                        text("INSERT INTO notes (tenant_id, body) VALUES (:a, 'x')"), {"a": A}
                    )
            async with engine.connect() as conn:
                assert (await conn.execute(READ_GUC)).scalar_one() in (None, "")
                assert (await conn.execute(COUNT)).scalar_one() == 0
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert count_all(notes) == 6


def test_async_bind(notes: Engine, database: Database) -> None:
    async def main() -> None:
        engine = async_engine(database)
        unbind = bind_tenant_guc(engine)
        factory = async_sessionmaker(async_engine(database))
        unbind_factory = bind_tenant_guc(factory)
        try:
            with tenant_context(A):
                async with engine.begin() as conn:
                    assert (await conn.execute(COUNT)).scalar_one() == 3
                async with factory() as session:
                    assert (await session.execute(COUNT)).scalar_one() == 3
            async with engine.begin() as conn:
                assert (await conn.execute(COUNT)).scalar_one() == 0
        finally:
            unbind()
            unbind_factory()
            await engine.dispose()
            await factory.kw["bind"].dispose()

    asyncio.run(main())


def test_sqlalchemy_is_real(app_engine: Engine) -> None:
    """The helpers above really ran as the unprivileged role."""
    with app_engine.connect() as conn:
        row = conn.execute(
            text("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
        ).one()
    assert tuple(row) == (False, False)
    assert sa.__version__.startswith("2.")
