"""The tenant setting costs no round trip: counted on the wire, not by SQLAlchemy.

Every engine here connects through :class:`~tests._rig.pg_wire.PgWire`, a proxy
that parses the PostgreSQL protocol.  A round trip is a ``ReadyForQuery`` from
the server.  A transaction of an engine bound with
:func:`~tenant_celery.bind_tenant_guc` must make exactly as many as the same
transaction of an engine that is not bound, its ``set_config`` must reach the
server before the transaction's first statement, and the rows read must be the
tenant's, on psycopg 3 (sync and async) and psycopg2.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from tenant_celery import bind_tenant_guc, set_tenant_id_parser, tenant_context
from tenant_celery._setting import inline_sql
from tests._rig.pg_wire import Message, PgWire, first_statement
from tests._rig.pgbouncer import run_pgbouncer
from tests._rig.postgres import Database

from .notes import count_all, create_notes

A = str(uuid.uuid4())
B = str(uuid.uuid4())
GUC = "app.current_tenant_id"
COUNT = sa.text("SELECT count(*) FROM notes")
FIRST = sa.text("SELECT body FROM notes ORDER BY id LIMIT 1")
SETTING = sa.text("SELECT current_setting('app.current_tenant_id', true)")
DRIVERS = ("psycopg", "psycopg2")


@pytest.fixture
def wire(database: Database) -> Iterator[PgWire]:
    create_notes(database.admin_engine())
    with database.admin_engine().begin() as conn:
        conn.execute(
            sa.text("INSERT INTO notes (tenant_id, body) VALUES (:a,'a1'), (:a,'a2'), (:b,'b1')"),
            {"a": A, "b": B},
        )
    with PgWire.to(database.app_url) as proxy:
        yield proxy


def _engines(database: Database, wire: PgWire, driver: str, **kwargs: Any) -> tuple[Engine, Engine]:
    """(plain, bound): the app role through the wire, one not bound and one bound."""
    url = wire.url(database.app_url).set(drivername=f"postgresql+{driver}")
    plain = database.engine(url, pool_size=1, max_overflow=0, **kwargs)
    bound = database.engine(url, pool_size=1, max_overflow=0, **kwargs)
    bind_tenant_guc(bound)
    return plain, bound


def _per_transaction(wire: PgWire, body: Callable[[], Any], times: int = 3) -> list[list[Message]]:
    body()  # warm: connect, first use
    mark = wire.mark()
    for _ in range(times):
        body()
    return wire.transactions(mark)


def _round_trips(transactions: list[list[Message]]) -> list[int]:
    return [sum(1 for m in tx if m.kind == "Z") for tx in transactions]


def _setting_comes_first(transaction: list[Message], tenant: str) -> None:
    assert first_statement(transaction).startswith(inline_sql(((GUC, tenant),)))


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_tenant_transaction_makes_no_extra_round_trip(
    database: Database, wire: PgWire, driver: str
) -> None:
    plain, bound = _engines(database, wire, driver)
    seen: list[int] = []

    def body(engine: Engine) -> Callable[[], None]:
        def run() -> None:
            with tenant_context(A), Session(engine) as session, session.begin():
                seen.append(session.execute(COUNT).scalar_one())
                session.execute(FIRST).scalar_one_or_none()

        return run

    plain_txs = _per_transaction(wire, body(plain))
    tenant_txs = _per_transaction(wire, body(bound))
    assert _round_trips(plain_txs) == [4, 4, 4]  # BEGIN, two statements, COMMIT
    assert _round_trips(tenant_txs) == _round_trips(plain_txs)
    assert seen == [0] * 4 + [2] * 4  # no tenant, nothing; A's two rows
    for tx in tenant_txs:
        _setting_comes_first(tx, A)


@pytest.mark.parametrize("driver", DRIVERS)
def test_outside_any_tenant_the_setting_is_emptied_at_no_cost(
    database: Database, wire: PgWire, driver: str
) -> None:
    plain, bound = _engines(database, wire, driver)

    def body(engine: Engine) -> Callable[[], None]:
        def run() -> None:
            with engine.begin() as conn:
                assert conn.execute(SETTING).scalar_one() in ("", None)

        return run

    plain_txs = _per_transaction(wire, body(plain))
    tenant_txs = _per_transaction(wire, body(bound))
    assert _round_trips(tenant_txs) == _round_trips(plain_txs) == [3, 3, 3]
    for tx in tenant_txs:
        _setting_comes_first(tx, "")


@pytest.mark.parametrize("driver", DRIVERS)
def test_savepoint_first_isolation_level_and_orm(
    database: Database, wire: PgWire, driver: str
) -> None:
    plain, bound = _engines(database, wire, driver)

    def body(engine: Engine) -> Callable[[], None]:
        serializable = engine.execution_options(isolation_level="SERIALIZABLE")
        factory = sessionmaker(serializable)

        def run() -> None:
            with tenant_context(B), factory() as session, session.begin():
                with session.begin_nested():  # SAVEPOINT is the first statement
                    assert session.execute(COUNT).scalar_one() in (0, 1)
                assert session.execute(SETTING).scalar_one() in (B, "", None)

        return run

    plain_txs = _per_transaction(wire, body(plain))
    tenant_txs = _per_transaction(wire, body(bound))
    assert _round_trips(tenant_txs) == _round_trips(plain_txs)
    for tx in tenant_txs:
        _setting_comes_first(tx, B)
        begin = next(m.sql for m in tx if m.sql and m.sql.upper().startswith("BEGIN"))
        assert "ISOLATION LEVEL SERIALIZABLE" in begin
    with tenant_context(B), sessionmaker(bound)() as session:
        assert session.execute(COUNT).scalar_one() == 1


def test_async_psycopg_makes_no_extra_round_trip(database: Database, wire: PgWire) -> None:
    url = wire.url(database.async_app_url)

    async def main() -> tuple[list[list[Message]], list[list[Message]], list[int]]:
        plain = create_async_engine(url, pool_size=1, max_overflow=0)
        bound = create_async_engine(url, pool_size=1, max_overflow=0)
        bind_tenant_guc(bound)
        counts: list[int] = []
        found = []
        try:
            for engine in (plain, bound):
                for n in range(4):
                    if n == 1:
                        mark = wire.mark()
                    with tenant_context(A):
                        async with engine.begin() as conn:
                            counts.append((await conn.execute(COUNT)).scalar_one())
                            await conn.execute(FIRST)
                found.append(wire.transactions(mark))
        finally:
            await plain.dispose()
            await bound.dispose()
        return found[0], found[1], counts

    plain_txs, tenant_txs, counts = asyncio.run(main())
    assert counts == [0] * 4 + [2] * 4
    assert _round_trips(plain_txs) == [4, 4, 4]
    assert _round_trips(tenant_txs) == _round_trips(plain_txs)
    for tx in tenant_txs:
        _setting_comes_first(tx, A)


def test_psycopg2_statement_refused_by_the_driver_leaves_the_setting_pending(
    database: Database, wire: PgWire
) -> None:
    """psycopg2 formats parameters before it sends anything: when that fails, the
    setting that was to go with the statement did not go, and goes with the next."""
    _, bound = _engines(database, wire, "psycopg2")
    with tenant_context(A), bound.begin() as conn:
        with pytest.raises(StatementError):
            conn.execute(sa.text("SELECT :x"), {"x": object()})  # psycopg2 cannot adapt it
        assert conn.execute(COUNT).scalar_one() == 2
        assert conn.execute(SETTING).scalar_one() == A


def test_transaction_begun_behind_sqlalchemy_still_gets_its_setting(
    database: Database, wire: PgWire
) -> None:
    """A psycopg 3 transaction already open on the server (a raw cursor began it)
    gets the setting as a statement of its own: one round trip more, never none."""
    _, bound = _engines(database, wire, "psycopg")
    with tenant_context(A), bound.begin() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cursor = raw.cursor()
        cursor.execute("SELECT 1")  # psycopg sends BEGIN itself
        cursor.close()
        mark = wire.mark()
        assert conn.execute(COUNT).scalar_one() == 2
        assert wire.round_trips(mark) == 2  # the setting, then the statement


HOSTILE = [
    "x'); SELECT set_config('app.current_tenant_id', 'other', false); --",
    "'; DROP TABLE notes; --",
    "%s %(x)s %%",
    "back\\slash\\'",
    "$$ $tag$ E'\\x41'",
    "é 租户 💥",
    "line\nbreak\ttab",
    " ",
]


@pytest.fixture
def any_text_parser() -> Iterator[None]:
    """A host's parser that takes any non-empty text as it is: the setting's quoting
    must hold without the built-in parsers' narrow forms."""
    previous = set_tenant_id_parser(lambda value: value if isinstance(value, str) else "")
    yield
    set_tenant_id_parser(previous)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.usefixtures("any_text_parser")
def test_hostile_tenant_values_arrive_intact_and_run_nothing(
    database: Database, wire: PgWire, driver: str
) -> None:
    _, bound = _engines(database, wire, driver)
    echo = sa.text("SELECT current_setting('app.current_tenant_id', true), :p")
    for value in HOSTILE:
        with tenant_context(value), bound.begin() as conn:
            assert tuple(conn.execute(echo, {"p": "%s"}).one()) == (value, "%s")
            assert conn.execute(SETTING).scalar_one() == value
    with bound.begin() as conn:  # nothing outlived its transaction
        assert conn.execute(SETTING).scalar_one() == ""
    assert count_all(database.admin_engine()) == 3  # the table is there, untouched


@pytest.mark.usefixtures("any_text_parser")
def test_any_text_is_set_exactly(database: Database, wire: PgWire) -> None:
    engines = [_engines(database, wire, driver)[1] for driver in DRIVERS]
    characters = st.characters(blacklist_categories=["Cs"], blacklist_characters="\0")

    @settings(max_examples=150, deadline=None)
    @given(value=st.text(characters, min_size=1, max_size=80))
    def check(value: str) -> None:
        for engine in engines:
            with tenant_context(value), engine.begin() as conn:
                assert conn.execute(SETTING).scalar_one() == value

    check()


@pytest.mark.parametrize("driver", DRIVERS)
def test_pgbouncer_transaction_pooling_no_extra_round_trip(
    database: Database, wire: PgWire, driver: str
) -> None:
    with run_pgbouncer(database, pool_size=1) as bouncer, PgWire.to(bouncer.url()) as front:
        url = front.url(bouncer.url()).set(drivername=f"postgresql+{driver}")
        plain = database.engine(url, pool_size=1, max_overflow=0)
        bound = database.engine(url, pool_size=1, max_overflow=0)
        bind_tenant_guc(bound)
        counts: list[int] = []

        def body(engine: Engine) -> Callable[[], None]:
            def run() -> None:
                with tenant_context(A), engine.begin() as conn:
                    counts.append(conn.execute(COUNT).scalar_one())
                    conn.execute(FIRST)

            return run

        plain_txs = _per_transaction(front, body(plain))
        tenant_txs = _per_transaction(front, body(bound))
        plain.dispose()
        bound.dispose()
    assert counts == [0] * 4 + [2] * 4
    assert _round_trips(tenant_txs) == _round_trips(plain_txs) == [4, 4, 4]


@pytest.mark.parametrize("driver", DRIVERS)
def test_engine_and_session_factory_both_bound_send_both_settings(
    database: Database, wire: PgWire, driver: str
) -> None:
    """A session factory bound with another setting name than its engine: the
    transaction makes both settings, in the one message that carries the first."""
    plain, bound = _engines(database, wire, driver)
    factory = sessionmaker(bound)
    unbind = bind_tenant_guc(factory, setting="app.other_tenant")
    other = sa.text("SELECT current_setting('app.other_tenant', true)")
    try:

        def body(maker: Callable[[], Session]) -> Callable[[], None]:
            def run() -> None:
                with tenant_context(A), maker() as session, session.begin():
                    session.execute(COUNT)

            return run

        plain_txs = _per_transaction(wire, body(sessionmaker(plain)))
        tenant_txs = _per_transaction(wire, body(factory))
        assert _round_trips(tenant_txs) == _round_trips(plain_txs)
        for tx in tenant_txs:
            first = first_statement(tx)
            assert first.startswith(inline_sql(((GUC, A), ("app.other_tenant", A)))), first
        with tenant_context(A), factory() as session:
            assert session.execute(SETTING).scalar_one() == A
            assert session.execute(other).scalar_one() == A
    finally:
        unbind()


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_connection_lost_before_the_first_statement_is_an_operational_error(
    database: Database, wire: PgWire, driver: str
) -> None:
    """A pooled connection the server went away from (a restart, a failover) fails
    its next transaction as psycopg fails any statement on it: ``OperationalError``,
    the connection invalidated, the next transaction on a new one."""
    _, bound = _engines(database, wire, driver)
    with tenant_context(A), bound.begin() as conn:
        assert conn.execute(COUNT).scalar_one() == 2
    wire.proxy.stop()  # the pooled connection is cut, the server says nothing
    wire.proxy.start()
    with tenant_context(A), pytest.raises(sa.exc.OperationalError) as caught:
        with bound.begin() as conn:
            conn.execute(COUNT)
    assert caught.value.connection_invalidated
    with tenant_context(A), bound.begin() as conn:
        assert conn.execute(COUNT).scalar_one() == 2
        assert conn.execute(SETTING).scalar_one() == A


def test_a_backend_terminated_before_the_first_statement_is_an_operational_error(
    database: Database, wire: PgWire
) -> None:
    """A backend terminated while its connection sat in the pool: depending on when
    the client notices, libpq answers the ``BEGIN`` the binding sends with an error
    result that has no SQLSTATE, or psycopg finds the connection lost first; either
    way an ``OperationalError``, and the next transaction gets a new connection."""
    import psycopg  # noqa: PLC0415

    _, bound = _engines(database, wire, "psycopg")
    with tenant_context(A), bound.begin() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    with database.admin_engine().begin() as admin:
        assert admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
    with tenant_context(A), pytest.raises(sa.exc.OperationalError) as caught:
        with bound.begin() as conn:
            conn.execute(COUNT)
    assert isinstance(caught.value.orig, psycopg.OperationalError)
    assert caught.value.connection_invalidated
    with tenant_context(A), bound.begin() as conn:
        assert conn.execute(COUNT).scalar_one() == 2
