"""Tenant tasks that read and write an RLS-protected table through ``bind_tenant_guc``.

Run by real workers in test_db_worker.py.  Each worker process builds its own
engine, connected as the unprivileged ``app_user``, on first use (after any
fork), and binds the tenant setting to it; the task bodies never mention the
setting.
"""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa
from celery import Celery
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from tenant_celery import bind_tenant_guc, current_tenant, tenant_task
from tests._rig.appconf import apply_test_config, database_url

app = apply_test_config(Celery("guc_app"))

_engine: Engine | None = None


def engine() -> Engine:
    global _engine  # noqa: PLW0603 (one engine per worker process)
    if _engine is None:
        engine = sa.create_engine(database_url(app_role=True), pool_size=2, max_overflow=0)
        bind_tenant_guc(engine)  # before publishing it: a thread must never see it unbound
        _engine = engine
    return _engine


COUNT = sa.text("SELECT count(*) FROM notes")


@tenant_task(app=app)
def add_note(body: str) -> dict[str, Any]:
    with engine().begin() as conn:
        conn.execute(
            sa.text("INSERT INTO notes (tenant_id, body) VALUES (:t, :b)"),
            {"t": current_tenant(), "b": body},
        )
        return {"tenant": current_tenant(), "visible": conn.execute(COUNT).scalar_one()}


@tenant_task(app=app)
def visible_notes() -> list[str]:
    with engine().begin() as conn:
        return list(conn.execute(sa.text("SELECT body FROM notes ORDER BY id")).scalars())


@tenant_task(app=app)
def write_into(other_tenant: str) -> str:
    with engine().begin() as conn:
        conn.execute(
            sa.text("INSERT INTO notes (tenant_id, body) VALUES (:t, 'intruder')"),
            {"t": other_tenant},
        )
    return "written"


@app.task
def count_without_tenant() -> int:
    with engine().begin() as conn:
        return int(conn.execute(COUNT).scalar_one())


# --- a careless host: one pooled connection, a thread-local session left open -------

_single: Engine | None = None
_lock = threading.Lock()


def single_engine() -> Engine:
    """An engine with one pooled connection, so that every task meets the previous one's."""
    global _single  # noqa: PLW0603 (one engine per worker process)
    with _lock:
        if _single is None:
            engine = sa.create_engine(database_url(app_role=True), pool_size=1, max_overflow=0)
            bind_tenant_guc(engine)
            _single = engine
    return _single


# Thread-local sessions, as many Flask and Celery hosts keep them.
sessions: scoped_session[Session] = scoped_session(sessionmaker())
BODIES = sa.text("SELECT body FROM notes ORDER BY body")


def session() -> Session:
    if sessions.session_factory.kw.get("bind") is None:
        sessions.session_factory.configure(bind=single_engine())
    return sessions()


@tenant_task(app=app)
def read_and_leave_open() -> list[str]:
    """Read-only: never commits, never removes its session."""
    return list(session().execute(BODIES).scalars())


@tenant_task(app=app)
def read_then_insert(body: str) -> list[str]:
    """Read, then insert a row whose tenant comes from the column's server default."""
    current = session()
    seen = list(current.execute(BODIES).scalars())
    current.execute(sa.text("INSERT INTO notes (body) VALUES (:b)"), {"b": body})
    current.commit()
    return seen


@app.task
def leave_session_setting(tenant: str, raw: bool) -> str:
    """Careless code leaving a session-level tenant setting on the pooled connection."""
    if raw:
        connection = single_engine().raw_connection()
        cursor = connection.cursor()
        cursor.execute("SELECT set_config('app.current_tenant_id', %s, false)", (tenant,))
        cursor.close()
        connection.commit()
        connection.close()
    else:
        with single_engine().connect() as conn:
            conn.execute(sa.text(f"SET app.current_tenant_id = '{tenant}'"))
            conn.commit()
    return "left"


@app.task
def bodies_without_tenant() -> list[str]:
    with single_engine().begin() as conn:
        return list(conn.execute(BODIES).scalars())


@tenant_task(app=app)
def raw_bodies() -> list[str]:
    """Read through a raw DBAPI connection, which no hook sets."""
    connection = single_engine().raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT body FROM notes ORDER BY body")
        return [row[0] for row in cursor.fetchall()]
    finally:
        connection.rollback()
        connection.close()


@tenant_task(app=app)
def autocommit_bodies() -> list[str]:
    """Read on the bound engine in AUTOCOMMIT mode, where a transaction-local setting
    would last one statement and the next would see the server session's value."""
    with single_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("SELECT 1"))
        return list(conn.execute(BODIES).scalars())


@tenant_task(app=app)
def twophase_bodies() -> list[str]:
    """Read inside a two-phase transaction on the bound engine, then roll it back."""
    with single_engine().connect() as conn:
        transaction = conn.begin_twophase()
        try:
            return list(conn.execute(BODIES).scalars())
        finally:
            transaction.rollback()
