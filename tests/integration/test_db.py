"""The GUC session helpers on real PostgreSQL, as the unprivileged ``app_user``.

Every check reads rows through a Row-Level Security policy, so a helper that
failed to set the tenant (or set it for too long) shows up as rows seen or
not seen, never as a mocked call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

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
    tenant_task,
)
from tenant_celery import _transaction_guard as _guard
from tenant_celery._setting import inline_sql
from tests._rig.pg_wire import PgWire, first_statement
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


@pytest.fixture
def wire(database: Database) -> Iterator[PgWire]:
    """A proxy in front of the server that reads what clients send it."""
    with PgWire.to(database.app_url) as proxy:
        yield proxy


@pytest.fixture
def wire_engine(database: Database, wire: PgWire) -> Engine:
    """``app_user`` through :func:`wire`; psycopg never prepares statements (preparing
    one costs a round trip of its own, which would blur the counts)."""
    psycopg3 = database.app_url.get_driver_name() == "psycopg"
    return database.engine(
        wire.url(database.app_url),
        pool_size=1,
        max_overflow=0,
        connect_args={"prepare_threshold": None} if psycopg3 else {},
    )


def _settings_sent(wire: PgWire, since: int) -> list[str]:
    return [sql for sql in wire.sql(since) if f"SET LOCAL {GUC} = " in sql]


def test_bind_sets_the_tenant_once_per_transaction_before_its_statements(
    notes: Engine, wire: PgWire, wire_engine: Engine
) -> None:
    unbind = bind_tenant_guc(wire_engine)
    with wire_engine.connect():
        pass  # the dialect's first-connect queries
    mark = wire.mark()
    try:
        with tenant_context(A):
            for _ in range(3):
                with wire_engine.begin() as conn:
                    for _ in range(4):
                        assert conn.execute(COUNT).scalar_one() == 3
    finally:
        unbind()
    transactions = wire.transactions(mark)
    assert len(transactions) == 3
    assert len(_settings_sent(wire, mark)) == 3
    for messages in transactions:
        # BEGIN, the four queries and COMMIT: the setting travels with one of them
        assert sum(1 for m in messages if m.kind == "Z") == 6
        assert first_statement(messages).startswith(inline_sql(((GUC, A),)))


def test_bind_outside_tenant_sets_empty_or_refuses(
    notes: Engine, wire: PgWire, wire_engine: Engine
) -> None:
    unbind = bind_tenant_guc(wire_engine)
    mark = wire.mark()
    try:
        with wire_engine.begin() as conn:
            assert conn.execute(COUNT).scalar_one() == 0
            assert conn.execute(READ_GUC).scalar_one() == ""
    finally:
        unbind()
    assert len(_settings_sent(wire, mark)) == 1  # '' for this transaction
    unbind = bind_tenant_guc(wire_engine, strict=True)
    mark = wire.mark()
    try:
        with pytest.raises(TenantContextMissing), wire_engine.begin() as conn:
            conn.execute(text("INSERT INTO notes (tenant_id, body) VALUES (:a, 'x')"), {"a": A})
    finally:
        unbind()
    assert wire.sql(mark) == []  # refused before anything reached the server
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
    notes: Engine, wire: PgWire, wire_engine: Engine
) -> None:
    factory = sessionmaker(wire_engine)
    mark = wire.mark()
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
    assert len(_settings_sent(wire, mark)) == 2  # one per transaction


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


# --- a careless host: session-level settings, AUTOCOMMIT, tenant switches ------

BODIES = text("SELECT body FROM notes ORDER BY body")
INSERT_DEFAULTED = text("INSERT INTO notes (body) VALUES (:body)")


def plant_session_setting(engine: Engine, tenant: str) -> int:
    """Leave tenant ``tenant`` in a session-level setting on ``engine``'s pooled
    connection, the way code the package cannot see would (the driver's own
    cursor); return the connection's server pid."""
    with engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute("SELECT set_config('app.current_tenant_id', %s, false)", (tenant,))
        cursor.execute("SELECT pg_backend_pid()")
        pid = int(cursor.fetchone()[0])
        cursor.close()
        conn.connection.dbapi_connection.commit()  # type: ignore[union-attr]
    return pid


def bodies_of(admin_engine: Engine, tenant: str) -> list[str]:
    with admin_engine.connect() as conn:
        found = conn.execute(
            text("SELECT body FROM notes WHERE tenant_id = :t ORDER BY body"), {"t": tenant}
        )
        return list(found.scalars())


@pytest.fixture
def one_connection(notes: Engine, database: Database) -> Engine:
    """An ``app_user`` engine with a single pooled connection: every checkout is it."""
    return database.engine(database.app_url, pool_size=1, max_overflow=0)


def test_the_control_a_session_setting_leaks_to_an_unbound_engine(one_connection: Engine) -> None:
    """What the tests below guard against, shown on an engine nobody bound."""
    plant_session_setting(one_connection, A)
    with tenant_context(B), one_connection.begin() as conn:
        assert list(conn.execute(BODIES).scalars()) == ["1", "2", "3"]  # A's rows


@pytest.mark.parametrize("strict", [False, True])
def test_autocommit_is_refused_whatever_the_session_holds(
    notes: Engine, one_connection: Engine, strict: bool
) -> None:
    pid = plant_session_setting(one_connection, A)
    unbind = bind_tenant_guc(one_connection, strict=strict)
    read: list[str] = []
    try:
        for tenant in (B, None):
            with one_connection.connect() as conn:
                autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
                with tenant_context(tenant) if tenant else contextlib.nullcontext():
                    with pytest.raises(TransactionRequired, match="AUTOCOMMIT"):
                        read.extend(autocommit.execute(BODIES).scalars())
                    with pytest.raises(TransactionRequired, match="AUTOCOMMIT"):
                        autocommit.execute(INSERT_DEFAULTED, {"body": "autocommit"})
                    # the refused transaction stays refused until it is rolled back;
                    # one begun explicitly is refused at its first statement
                    autocommit.rollback()
                    with pytest.raises(TransactionRequired, match="AUTOCOMMIT"):
                        with autocommit.begin():
                            autocommit.execute(INSERT_DEFAULTED, {"body": "begun"})
        with tenant_context(B), one_connection.begin() as conn:  # without AUTOCOMMIT: B
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == pid
            read.extend(conn.execute(BODIES).scalars())
    finally:
        unbind()
    assert read == ["4", "5"]
    assert bodies_of(notes, A) == ["1", "2", "3"]
    assert count_all(notes) == 5


def test_driver_autocommit_is_refused_too(notes: Engine, one_connection: Engine) -> None:
    plant_session_setting(one_connection, A)
    unbind = bind_tenant_guc(one_connection)
    try:
        with one_connection.connect() as conn:
            conn.connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]
            with tenant_context(B), pytest.raises(TransactionRequired, match="AUTOCOMMIT"):
                conn.execute(BODIES)
            conn.connection.dbapi_connection.autocommit = False  # type: ignore[union-attr]
    finally:
        unbind()


def test_no_tenant_transaction_hides_a_session_setting(
    notes: Engine, one_connection: Engine
) -> None:
    plant_session_setting(one_connection, A)
    unbind = bind_tenant_guc(one_connection)
    try:
        with one_connection.begin() as conn:
            assert conn.execute(READ_GUC).scalar_one() == ""
            assert list(conn.execute(BODIES).scalars()) == []
        with Session(one_connection) as session:
            assert list(session.execute(BODIES).scalars()) == []
    finally:
        unbind()


@pytest.mark.parametrize("ending", ["COMMIT", "rollback", "END", "ABORT"])
def test_a_transaction_ended_with_sql_gives_the_next_statement_its_tenant_again(
    notes: Engine, one_connection: Engine, ending: str
) -> None:
    """Careless code ends the server's transaction with SQL while SQLAlchemy's goes
    on: the next statement runs in a new server transaction, which must not read
    the session-level value left on the connection."""
    plant_session_setting(one_connection, A)
    unbind = bind_tenant_guc(one_connection)
    try:
        with tenant_context(B), one_connection.connect() as conn:
            assert list(conn.execute(BODIES).scalars()) == ["4", "5"]
            conn.execute(text(ending))
            assert conn.execute(READ_GUC).scalar_one() == B
            assert list(conn.execute(BODIES).scalars()) == ["4", "5"]
            with conn.begin_nested():  # ROLLBACK TO SAVEPOINT ends nothing
                conn.execute(BODIES)
                conn.execute(text("SAVEPOINT own; ROLLBACK TO SAVEPOINT own"))
            assert list(conn.execute(BODIES).scalars()) == ["4", "5"]
            conn.rollback()
    finally:
        unbind()


def test_two_phase_transaction_gets_the_tenant(
    notes: Engine, one_connection: Engine, statements: list[str]
) -> None:
    plant_session_setting(one_connection, A)
    unbind = bind_tenant_guc(one_connection)
    try:
        with tenant_context(B), one_connection.connect() as conn:
            two_phase = conn.begin_twophase()
            assert conn.execute(READ_GUC).scalar_one() == B
            assert list(conn.execute(BODIES).scalars()) == ["4", "5"]
            with tenant_context(A), pytest.raises(TransactionTenantMismatch):
                conn.execute(BODIES)
            two_phase.rollback()
        with one_connection.connect() as conn:  # outside any tenant: nothing
            two_phase = conn.begin_twophase()
            assert list(conn.execute(BODIES).scalars()) == []
            two_phase.rollback()
            autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
            # psycopg 3 refuses to begin it; psycopg2 begins, and the binding refuses
            # its first statement
            refused = (TransactionRequired, sa.exc.ProgrammingError)
            with tenant_context(B), pytest.raises(refused, match=r"(?i)autocommit"):
                autocommit.begin_twophase()
                autocommit.execute(BODIES)
    finally:
        unbind()
    unbind = bind_tenant_guc(one_connection, strict=True)
    try:
        with one_connection.connect() as conn, pytest.raises(TenantContextMissing):
            conn.begin_twophase()
            conn.execute(BODIES)
    finally:
        unbind()


def test_two_phase_prepare_keeps_the_tenant(notes: Engine, one_connection: Engine) -> None:
    """Up to PREPARE TRANSACTION, and through it where the server allows it."""
    with notes.connect() as admin:
        prepared_allowed = int(admin.execute(text("SHOW max_prepared_transactions")).scalar_one())
    unbind = bind_tenant_guc(one_connection)
    try:
        with tenant_context(B), one_connection.connect() as conn:
            two_phase = conn.begin_twophase()
            conn.execute(
                text("INSERT INTO notes (tenant_id, body) VALUES (:t, 'two-phase')"), {"t": B}
            )
            if prepared_allowed:
                two_phase.prepare()
                two_phase.commit()
            else:
                with pytest.raises(DBAPIError, match="max_prepared_transactions"):
                    two_phase.prepare()
                conn.invalidate()  # the server refused PREPARE; SQLAlchemy cannot roll back
    finally:
        unbind()
    assert bodies_of(notes, B) == (["4", "5", "two-phase"] if prepared_allowed else ["4", "5"])


def test_tenant_switch_inside_a_transaction_is_refused(
    notes: Engine, one_connection: Engine
) -> None:
    unbind = bind_tenant_guc(one_connection)
    read: list[str] = []
    try:
        with one_connection.connect() as conn:
            with tenant_context(A):
                read.extend(conn.execute(BODIES).scalars())  # commit as you go: begins in A
            for tenant in (B, None):
                with tenant_context(tenant) if tenant else contextlib.nullcontext():
                    with pytest.raises(TransactionTenantMismatch):
                        read.extend(conn.execute(BODIES).scalars())
                    with pytest.raises(TransactionTenantMismatch):
                        conn.execute(
                            text("INSERT INTO notes (tenant_id, body) VALUES (:t, 'x')"),
                            {"t": A},
                        )
            conn.commit()
            with tenant_context(B):  # a new transaction, in B
                read.extend(conn.execute(BODIES).scalars())
            conn.rollback()
            # began outside any tenant: refused inside one
            conn.execute(text("SELECT 1"))
            with tenant_context(A), pytest.raises(TransactionTenantMismatch, match="outside"):
                conn.execute(BODIES)
            # an explicit set_tenant_guc makes the transaction serve that tenant
            set_tenant_guc(conn, A)
            with pytest.raises(TransactionTenantMismatch, match="inside a tenant"):
                conn.execute(BODIES)
            with tenant_context(A):
                read.extend(conn.execute(BODIES).scalars())
            conn.rollback()
    finally:
        unbind()
    assert read == ["1", "2", "3", "4", "5", "1", "2", "3"]
    assert count_all(notes) == 5


def test_refused_session_stays_refused(notes: Engine, one_connection: Engine) -> None:
    plant_session_setting(one_connection, A)
    factory = sessionmaker(one_connection)
    unbind = bind_tenant_guc(factory, strict=True)
    try:
        with factory() as session:
            with pytest.raises(TenantContextMissing):
                session.execute(BODIES)
            with pytest.raises(TenantContextMissing, match="stay refused"):
                session.execute(BODIES)
            session.rollback()
            with tenant_context(B):
                assert list(session.execute(BODIES).scalars()) == ["4", "5"]
    finally:
        unbind()


def test_session_setting_is_cleared_at_check_in(notes: Engine, one_connection: Engine) -> None:
    """Left by a statement on the bound engine, or on a raw DBAPI checkout: gone when
    the connection is back in the pool, for raw checkouts and bound ones alike."""
    unbind = bind_tenant_guc(one_connection)
    read: list[str] = []

    def raw_read() -> None:
        raw = one_connection.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("SELECT body FROM notes ORDER BY body")
            read.extend(row[0] for row in cursor.fetchall())
            cursor.execute("SELECT current_setting('app.current_tenant_id', true)")
            assert cursor.fetchone()[0] in (None, "")
            cursor.close()
            raw.rollback()
        finally:
            raw.close()

    try:
        with one_connection.connect() as conn:  # careless code, through the bound engine
            conn.execute(text(f"SET app.current_tenant_id = '{A}'"))
            conn.commit()
        with tenant_context(B):
            raw_read()
        raw = one_connection.raw_connection()  # careless code, on a raw checkout
        cursor = raw.cursor()
        cursor.execute("SELECT set_config('app.current_tenant_id', %s, false)", (A,))
        cursor.close()
        raw.commit()
        raw.close()
        with tenant_context(B):
            raw_read()
        with one_connection.begin() as conn:  # a bound transaction with no tenant
            read.extend(conn.execute(BODIES).scalars())
    finally:
        unbind()
    assert read == []


# --- the end of a task ----------------------------------------------------------


def test_eager_task_leaves_no_open_transaction(
    notes: Engine, one_connection: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A thread-local scoped_session that a read-only task never closes."""
    with notes.begin() as conn:
        conn.execute(
            text(
                "ALTER TABLE notes ALTER COLUMN tenant_id"
                " SET DEFAULT current_setting('app.current_tenant_id')::uuid"
            )
        )
    app = Celery("careless", set_as_current=False)
    app.conf.update(task_always_eager=True, task_eager_propagates=True, broker_url="memory://")
    sessions = scoped_session(sessionmaker(one_connection))
    unbind = bind_tenant_guc(one_connection)

    @tenant_task(app=app, shared=False)
    def read_notes() -> list[str]:
        return list(sessions().execute(BODIES).scalars())  # never committed, never removed

    @tenant_task(app=app, shared=False)
    def read_and_write(body: str) -> list[str]:
        session = sessions()
        seen = list(session.execute(BODIES).scalars())
        session.execute(INSERT_DEFAULTED, {"body": body})
        session.commit()
        return seen

    @app.task(shared=False)
    def count_plain() -> int:
        return int(sessions().execute(COUNT).scalar_one())

    try:
        with caplog.at_level(logging.WARNING, logger="tenant_celery.db"):
            with tenant_context(A):
                assert read_notes.delay().get() == ["1", "2", "3"]
            assert not sessions().in_transaction()
            with tenant_context(B):
                assert read_and_write.delay("b-new").get() == ["4", "5"]
                read_notes.delay().get()
            assert count_plain.delay().get() == 0
    finally:
        unbind()
        sessions.remove()
    warnings = [r.getMessage() for r in caplog.records if "still open" in r.getMessage()]
    assert len(warnings) == 3
    assert "read_notes" in warnings[0]
    assert bodies_of(notes, B) == ["4", "5", "b-new"]
    assert bodies_of(notes, A) == ["1", "2", "3"]


def test_tasks_in_threads_roll_back_their_own_transactions(
    notes: Engine, database: Database
) -> None:
    engine = database.engine(database.app_url, pool_size=4, max_overflow=0)
    app = Celery("threads", set_as_current=False)
    app.conf.update(task_always_eager=True, task_eager_propagates=True, broker_url="memory://")
    local = threading.local()
    unbind = bind_tenant_guc(engine)

    @tenant_task(app=app, shared=False)
    def leave_open() -> int:
        local.conn = engine.connect()
        return int(local.conn.execute(COUNT).scalar_one())

    def worker(tenant: str, out: list[tuple[int, bool]]) -> None:
        for _ in range(20):
            with tenant_context(tenant):
                seen = leave_open.apply().result
            out.append((seen, local.conn.in_transaction()))
            local.conn.close()

    results: dict[str, list[tuple[int, bool]]] = {A: [], B: []}
    try:
        threads = [threading.Thread(target=worker, args=(t, results[t])) for t in (A, B)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        unbind()
    assert results == {A: [(3, False)] * 20, B: [(2, False)] * 20}


def test_a_long_task_holds_no_record_of_its_finished_transactions(
    notes: Engine, database: Database
) -> None:
    """Records go with their connections: a task of many transactions keeps none."""
    engine = database.engine(database.app_url, pool_size=1, max_overflow=0)
    app = Celery("long", set_as_current=False)
    app.conf.update(task_always_eager=True, task_eager_propagates=True, broker_url="memory://")
    unbind = bind_tenant_guc(engine)

    @tenant_task(app=app, shared=False)
    def many() -> tuple[int, int]:
        for _ in range(300):
            with engine.begin() as conn:
                conn.execute(COUNT).scalar_one()
        with engine.connect() as conn:  # one connection, many transactions
            for _ in range(300):
                conn.execute(COUNT).scalar_one()
                conn.commit()
        frame = _guard._frames.get()[-1]
        assert len(frame.refs) < _guard._COMPACT_AT  # dead references are dropped
        with engine.begin() as conn:
            conn.execute(COUNT).scalar_one()
            return len(frame.open()), int(conn.execute(COUNT).scalar_one())

    try:
        with tenant_context(A):
            held, seen = many.delay().get()
    finally:
        unbind()
        engine.dispose()
    assert seen == 3
    assert held == 1  # the open transaction's only


def test_the_binding_switches_on_no_connection_event(notes: Engine, one_connection: Engine) -> None:
    """Any connection event makes SQLAlchemy dispatch at every statement, begin and
    commit of the engine (tens of microseconds a transaction): the binding uses none."""
    unbind = bind_tenant_guc(one_connection)
    try:
        with tenant_context(A), one_connection.begin() as conn:
            assert conn.execute(COUNT).scalar_one() == 3
        # Listening on one engine sets the flag on that engine (another test's
        # listener on the Engine class sets it on the class)
        assert "_has_events" not in vars(one_connection)
        assert vars(one_connection.dialect)["_has_events"] is True
    finally:
        unbind()


def test_a_dialect_listener_that_executes_itself_does_not_skip_the_check(
    notes: Engine, one_connection: Engine
) -> None:
    """A host's own do_execute listener, added first, runs after the binding's check."""
    ran: list[str] = []

    def execute_myself(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        ran.append(statement)
        cursor.execute(statement, parameters)
        return True

    event.listen(one_connection.dialect, "do_execute", execute_myself)
    unbind = bind_tenant_guc(one_connection)
    try:
        with tenant_context(B), one_connection.connect() as conn:
            for _ in range(2):  # psycopg2's first statement goes with the setting, by the binding
                assert list(conn.execute(BODIES).scalars()) == ["4", "5"]
            before = len(ran)
            with tenant_context(A), pytest.raises(TransactionTenantMismatch):
                conn.execute(BODIES)
            conn.rollback()
    finally:
        unbind()
        event.remove(one_connection.dialect, "do_execute", execute_myself)
    assert before >= 1
    assert len(ran) == before


def test_a_class_level_dialect_listener_that_executes_itself_does_not_skip_the_check(
    notes: Engine, one_connection: Engine
) -> None:
    """A host's do_execute listener on the Engine class (every dialect) runs before any
    listener on the dialect: one that executes the statement itself would send it
    unchecked, without the setting (B saw A's rows through a session-level value).
    Binding refuses such an engine; one added later refuses the next transaction."""
    ran: list[str] = []

    def execute_myself(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        ran.append(statement)
        cursor.execute(statement, parameters)
        return True

    def watch(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
        pass  # runs first, returns None: the binding's check comes next and refuses

    plant_session_setting(one_connection, A)
    event.listen(Engine, "do_execute", execute_myself)
    try:
        with pytest.raises(ConfigurationError, match="class-level"):
            bind_tenant_guc(one_connection)
        assert not _guard.is_guarded(one_connection)
    finally:
        event.remove(Engine, "do_execute", execute_myself)
    unbind = bind_tenant_guc(one_connection)
    try:
        event.listen(Engine, "do_execute", watch)  # added after binding
        try:
            with tenant_context(B), one_connection.connect() as conn:
                with pytest.raises(ConfigurationError, match="class-level"):
                    conn.execute(BODIES)
                conn.rollback()
        finally:
            event.remove(Engine, "do_execute", watch)
        with tenant_context(B), one_connection.begin() as conn:
            assert list(conn.execute(BODIES).scalars()) == ["4", "5"]
    finally:
        unbind()
    assert ran == []


def test_a_first_statement_failing_before_the_server_keeps_the_setting_pending(
    notes: Engine, one_connection: Engine
) -> None:
    """Whatever the host's handle_error listeners do (or skip_user_error_events), the
    setting of a first statement that never reached the server goes with the next."""

    class Translated(Exception):
        pass

    def translate(context: Any) -> None:
        raise Translated("the host's own error") from context.original_exception

    plant_session_setting(one_connection, A)
    event.listen(one_connection, "handle_error", translate)  # listened before the binding's
    unbind = bind_tenant_guc(one_connection)
    read: list[str] = []
    try:
        for options in ({}, {"skip_user_error_events": True}):
            with tenant_context(B), one_connection.connect() as conn:
                # a parameter missing: the driver raises before sending anything
                with pytest.raises((Translated, DBAPIError, KeyError, TypeError)):
                    conn.execution_options(**options).exec_driver_sql(
                        "SELECT %(missing)s", {"other": 1}
                    )
                read.extend(conn.execute(BODIES).scalars())
                conn.rollback()
    finally:
        unbind()
        event.remove(one_connection, "handle_error", translate)
    assert read == ["4", "5", "4", "5"]


def test_a_statement_run_by_a_begin_listener_gets_the_tenant(
    notes: Engine, one_connection: Engine
) -> None:
    """A host's own "begin" connection listener runs statements before the transaction
    exists for SQLAlchemy: they got neither the check nor the setting (B read A's rows
    through a session-level value)."""
    seen: list[str] = []

    def on_begin(conn: Connection) -> None:
        seen.extend(conn.execute(BODIES).scalars())

    plant_session_setting(one_connection, A)
    unbind = bind_tenant_guc(one_connection)
    event.listen(one_connection, "begin", on_begin)
    try:
        with tenant_context(B), one_connection.begin() as conn:
            after = list(conn.execute(BODIES).scalars())
        with one_connection.begin() as conn:  # outside any tenant: nothing
            after.extend(conn.execute(BODIES).scalars())
    finally:
        event.remove(one_connection, "begin", on_begin)
        unbind()
    assert (seen, after) == (["4", "5"], ["4", "5"])
    # a task that leaves such a transaction open has it rolled back at its end
    app = Celery("begin_listener", set_as_current=False)
    app.conf.update(task_always_eager=True, task_eager_propagates=True, broker_url="memory://")
    held: list[Connection] = []

    @tenant_task(app=app, shared=False)
    def leave_begun() -> None:
        held.append(one_connection.connect())
        held[0].begin()  # only the listener's statement runs

    unbind = bind_tenant_guc(one_connection)
    event.listen(one_connection, "begin", on_begin)
    try:
        with tenant_context(A):
            leave_begun.delay().get()
        assert not held[0].in_transaction()
        held[0].close()
    finally:
        event.remove(one_connection, "begin", on_begin)
        unbind()
    assert seen == ["4", "5", "1", "2", "3"]
    unbind = bind_tenant_guc(one_connection, strict=True)
    event.listen(one_connection, "begin", on_begin)
    try:
        with pytest.raises(TenantContextMissing), one_connection.begin():
            pass
    finally:
        event.remove(one_connection, "begin", on_begin)
        unbind()
    assert seen == ["4", "5", "1", "2", "3"]


NOTES = sa.table(
    "notes", sa.column("id"), sa.column("tenant_id", sa.Uuid(as_uuid=False)), sa.column("body")
)


def test_every_first_statement_shape_gets_the_tenant(notes: Engine, one_connection: Engine) -> None:
    """As a transaction's first statement, under a session-level value of another
    tenant: insertmanyvalues batches with RETURNING, a plain executemany, a
    server-side cursor, exec_driver_sql without parameters, an OptionEngine."""
    plant_session_setting(one_connection, A)
    unbind = bind_tenant_guc(one_connection)
    got: list[object] = []
    try:
        with tenant_context(B):
            with one_connection.begin() as conn:
                inserted = conn.execute(
                    sa.insert(NOTES).returning(NOTES.c.id),
                    [{"tenant_id": B, "body": f"m{i}"} for i in range(5)],
                    execution_options={"insertmanyvalues_page_size": 2},
                ).all()
                got.append(len(inserted))
            with one_connection.begin() as conn:
                conn.execute(
                    sa.insert(NOTES),
                    [{"tenant_id": B, "body": "e1"}, {"tenant_id": B, "body": "e2"}],
                )
            with one_connection.connect() as conn:
                streamed = conn.execution_options(stream_results=True, max_row_buffer=1)
                got.append(list(streamed.execute(BODIES).scalars()))
                conn.rollback()
            with one_connection.connect() as conn:
                driver_sql = conn.exec_driver_sql("SELECT body FROM notes ORDER BY body")
                got.append([row[0] for row in driver_sql])
                conn.rollback()
            with one_connection.execution_options(logging_token="x").begin() as conn:
                got.append(list(conn.execute(BODIES).scalars()))
    finally:
        unbind()
    b_rows = ["4", "5", "e1", "e2", "m0", "m1", "m2", "m3", "m4"]
    assert got == [5, b_rows, b_rows, b_rows]
    assert bodies_of(notes, A) == ["1", "2", "3"]


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
