"""How :class:`~tenant_celery.results.PooledDatabaseBackend` stores a result:
one ``INSERT ... ON CONFLICT DO UPDATE`` writing the row Celery's own backend
would write, and never over a ``SUCCESS``.

Against real PostgreSQL as ``app_user`` on the bundled migration's tables, with
Celery's stock ``database`` backend, in the same process, as the yardstick.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from celery import states
from celery.app.task import Context
from celery.exceptions import BackendStoreError
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool.base import _ConnectionFairy

from tenant_celery.results import PooledDatabaseBackend, _runs_directly
from tests._rig.postgres import Database

from . import test_results_pooled
from .test_results_pooled import backend_pid, result_engine, results_app

#: The test database with the bundled migration's tables, as test_results_pooled makes it.
migrated = test_results_pooled.migrated


def row(database: Database, task_id: str) -> dict[str, Any]:
    with database.admin_engine().connect() as conn:
        found = conn.execute(
            sa.text("SELECT * FROM celery_taskmeta WHERE task_id = :id"), {"id": task_id}
        ).mappings()
        rows = [dict(r) for r in found]
    assert len(rows) == 1, rows
    return rows[0]


def request(task_id: str) -> Context:
    """What a worker passes for a task it ran (the extended result's fields)."""
    return Context(
        id=task_id,
        task="orders.sync",
        args=[1, "two"],
        kwargs={"three": 3},
        hostname="worker@host",
        retries=2,
        delivery_info={"routing_key": "orders"},
    )


def test_the_stored_row_is_the_one_celerys_backend_writes(migrated: Database) -> None:
    pooled_app = results_app(migrated, result_extended=True)
    pooled = pooled_app.backend
    stock = results_app(migrated, "database", result_extended=True).backend
    assert isinstance(pooled, PooledDatabaseBackend)
    assert _runs_directly(result_engine(pooled_app))  # on the driver's cursor
    written = {}
    for name, backend in (("pooled", pooled), ("stock", stock)):
        task_id = str(uuid.uuid4())
        backend.store_result(task_id, None, states.STARTED, request=request(task_id))
        backend.store_result(
            task_id, {"total": 12}, states.SUCCESS, traceback=None, request=request(task_id)
        )
        written[name] = (row(migrated, task_id), backend.get_task_meta(task_id))

    (pooled_row, pooled_meta), (stock_row, stock_meta) = written["pooled"], written["stock"]
    unlike = {"id", "task_id", "date_done"}
    assert {k: v for k, v in pooled_row.items() if k not in unlike} == {
        k: v for k, v in stock_row.items() if k not in unlike
    }
    assert pooled_row["status"] == states.SUCCESS
    assert pooled_row["name"] == "orders.sync"
    assert pooled_row["date_done"] is not None
    unlike_meta = {"task_id", "date_done"}
    assert {k: v for k, v in pooled_meta.items() if k not in unlike_meta} == {
        k: v for k, v in stock_meta.items() if k not in unlike_meta
    }
    assert pooled_meta["result"] == {"total": 12}


def test_a_result_is_stored_in_one_statement(migrated: Database) -> None:
    statements: list[str] = []

    def count(engine: Engine) -> None:
        event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    backend = results_app(migrated, database_engine_callback=count).backend
    backend.store_result(str(uuid.uuid4()), 0, states.SUCCESS)  # Celery checks its tables once
    statements.clear()
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, 1, states.STARTED)
    backend.store_result(task_id, 2, states.SUCCESS)

    # A listener on execution sees every write: the backend runs it through SQLAlchemy.
    assert len(statements) == 2, statements
    assert all(s.lstrip().upper().startswith("INSERT INTO CELERY_TASKMETA") for s in statements)
    assert all("ON CONFLICT (task_id) DO UPDATE" in s for s in statements)
    assert backend.get_task_meta(task_id)["result"] == 2


def test_nothing_is_written_over_a_success(migrated: Database) -> None:
    backend = results_app(migrated).backend
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, None, states.STARTED)
    backend.store_result(task_id, "first", states.SUCCESS)
    before = row(migrated, task_id)

    backend.store_result(task_id, "late retry", states.RETRY)
    backend.store_result(task_id, "second run", states.SUCCESS)
    backend.store_result(task_id, None, states.STARTED)

    assert row(migrated, task_id) == before
    meta = backend.get_task_meta(task_id)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, "first")


def test_states_before_success_are_replaced(migrated: Database) -> None:
    backend = results_app(migrated).backend
    task_id = str(uuid.uuid4())
    for state, value in ((states.STARTED, None), (states.RETRY, "once"), (states.FAILURE, None)):
        result: Any = value if state != states.FAILURE else ValueError("bad input")
        backend.store_result(task_id, result, state, traceback="Traceback: ...")
        assert row(migrated, task_id)["status"] == state
    backend.store_result(task_id, "done", states.SUCCESS)
    stored = row(migrated, task_id)
    assert (stored["status"], stored["traceback"]) == (states.SUCCESS, None)


def test_concurrent_writes_of_one_task_end_with_its_success(migrated: Database) -> None:
    """A retry's state and the next run's result written at the same moment, from
    threads of one process (as under the threads pool): no duplicate-key error, and
    the result stays."""
    backend_app = results_app(migrated)
    errors: list[BaseException] = []

    def store(task_id: str, state: str, start: threading.Barrier) -> None:
        try:
            start.wait()
            backend_app.backend.store_result(task_id, state.lower(), state)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    ids = [str(uuid.uuid4()) for _ in range(40)]
    for task_id in ids:
        start = threading.Barrier(4)
        threads = [
            threading.Thread(target=store, args=(task_id, state, start))
            for state in (states.RETRY, states.SUCCESS, states.RETRY, states.STARTED)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert errors == []
    with migrated.admin_engine().connect() as conn:
        found = dict(
            conn.execute(
                sa.text(
                    "SELECT status, count(*) FROM celery_taskmeta"
                    " WHERE task_id = ANY(:ids) GROUP BY status"
                ),
                {"ids": ids},
            ).all()
        )
    # Whichever order the writes landed in, SUCCESS is never written over.
    assert found == {states.SUCCESS: len(ids)}


def test_a_failed_store_is_tried_again(migrated: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database error while storing is retried, as Celery's own backend retries
    it (its module's ``retry`` decorator, or ``always_retry`` from Celery 5.7)."""
    backend = results_app(migrated).backend
    assert isinstance(backend, PooledDatabaseBackend)
    real = backend._upsert
    failures = [sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection"))]

    def flaky(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(*args)

    monkeypatch.setattr(backend, "_upsert", flaky)
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, "kept", states.SUCCESS)

    assert failures == []
    assert row(migrated, task_id)["status"] == states.SUCCESS


def test_no_ping_before_each_call_unless_engine_options_are_set(migrated: Database) -> None:
    default = results_app(migrated).backend
    assert "pool_pre_ping" not in default.engine_options
    assert default.engine_options.get("pool_recycle") == results_app(
        migrated, "database"
    ).backend.engine_options.get("pool_recycle")
    chosen = results_app(migrated, database_engine_options={"pool_pre_ping": True}).backend
    assert chosen.engine_options == {"pool_pre_ping": True}
    passed = PooledDatabaseBackend(
        app=results_app(migrated), engine_options={"pool_pre_ping": True, "pool_size": 2}
    )
    assert passed.engine_options["pool_pre_ping"] is True


def test_a_connection_the_server_dropped_is_replaced_by_the_retry(migrated: Database) -> None:
    """Without a ping, the first store on a dropped connection fails on it, and
    the retry stores on a new connection: nothing is lost, nothing is doubled."""
    errors: list[BaseException] = []
    connects: list[int] = []

    def watch(engine: Engine) -> None:
        event.listen(engine, "connect", lambda *_: connects.append(1))
        event.listen(engine, "handle_error", lambda ctx: errors.append(ctx.original_exception))

    backend = results_app(migrated, database_engine_callback=watch).backend
    backend.store_result(str(uuid.uuid4()), "before", states.SUCCESS)
    engine = backend.session_manager.get_engine(backend.url, **backend.engine_options)
    with engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    with migrated.admin_engine().connect() as admin:
        admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    task_id = str(uuid.uuid4())
    backend.store_result(task_id, "after", states.SUCCESS)

    assert len(errors) == 1, errors  # the dropped connection, once
    assert len(connects) == 2
    assert row(migrated, task_id)["status"] == states.SUCCESS
    meta = backend.get_task_meta(task_id)
    assert meta["result"] == "after"


def test_a_failed_store_leaves_its_pooled_connection_as_it_was(migrated: Database) -> None:
    """A statement the server refuses comes out as SQLAlchemy's error, as from
    SQLAlchemy's own execution (Celery retries on those), and the connection
    goes back to the pool whole: not dropped, back out of autocommit."""
    app = results_app(migrated, result_extended=True, result_backend_always_retry=False)
    engine = result_engine(app)
    assert _runs_directly(engine)
    app.backend.store_result(str(uuid.uuid4()), "first", states.SUCCESS)
    pid = backend_pid(engine)
    task_id = str(uuid.uuid4())
    # ``retries`` is an integer column: the server refuses the value.
    refused = Context(id=task_id, task="orders.sync", args=[], kwargs={}, retries=2**31)

    with pytest.raises(sa.exc.DataError, match="out of range"):
        app.backend.store_result(task_id, "never stored", states.SUCCESS, request=refused)

    assert backend_pid(engine) == pid
    with engine.connect() as conn:
        assert conn.connection.driver_connection.autocommit is False  # type: ignore[union-attr]
    app.backend.store_result(task_id, "stored", states.SUCCESS)
    assert row(migrated, task_id)["result"] is not None
    assert app.backend.get_task_meta(task_id)["result"] == "stored"


def test_dropped_connections_are_all_replaced_on_the_direct_path(migrated: Database) -> None:
    """The server drops every pooled connection (a restart, a failover): the first
    store to meet one fails on it, and the pool drops the others with it, so the
    next store runs on a new connection, not on the next dead one.  Celery's
    retries are off here (where they can be: ``always_retry``), so a store that
    met a dead connection fails instead of trying again."""
    app = results_app(
        migrated, database_engine_options={"pool_size": 4}, result_backend_always_retry=False
    )
    engine = result_engine(app)
    assert _runs_directly(engine)
    app.backend.store_result(str(uuid.uuid4()), "before", states.SUCCESS)
    held = [engine.connect() for _ in range(4)]  # four connections in the pool
    pids = [int(c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()) for c in held]
    for conn in held:
        conn.close()
    with migrated.admin_engine().connect() as admin:
        admin.execute(
            sa.text("SELECT pg_terminate_backend(pid) FROM unnest(:p) AS pid"), {"p": pids}
        )

    with contextlib.suppress(sa.exc.OperationalError):  # Celery < 5.7 retries it anyway
        app.backend.store_result(str(uuid.uuid4()), "met a dead connection", states.SUCCESS)
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, "after", states.SUCCESS)

    assert row(migrated, task_id)["status"] == states.SUCCESS
    assert backend_pid(engine) not in pids


def test_a_store_that_cannot_connect_is_retried(migrated: Database) -> None:
    """A connection refused by the server comes out as SQLAlchemy's error, which
    Celery retries, not as the driver's, which it would not."""
    attempts: list[int] = []

    def count(engine: Engine) -> None:
        event.listen(engine, "do_connect", lambda *_: attempts.append(1))

    app = results_app(migrated, database_engine_callback=count)
    engine = result_engine(app)
    assert _runs_directly(engine)
    app.backend.store_result(str(uuid.uuid4()), "first", states.SUCCESS)
    engine.dispose()
    attempts.clear()
    role, database = migrated.app_url.username, migrated.name
    with migrated.admin_engine().begin() as admin:
        admin.execute(sa.text(f'REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC'))
        admin.execute(sa.text(f'REVOKE CONNECT ON DATABASE "{database}" FROM "{role}"'))
    try:
        with pytest.raises((sa.exc.OperationalError, BackendStoreError)):
            app.backend.store_result(str(uuid.uuid4()), "refused", states.SUCCESS)
    finally:
        with migrated.admin_engine().begin() as admin:
            admin.execute(sa.text(f'GRANT CONNECT ON DATABASE "{database}" TO PUBLIC'))
            admin.execute(sa.text(f'GRANT CONNECT ON DATABASE "{database}" TO "{role}"'))
    assert len(attempts) >= 3, attempts  # tried again, not given up at the first
    app.backend.store_result(str(uuid.uuid4()), "again", states.SUCCESS)


def test_an_interrupted_store_takes_its_connection_out_of_the_pool(
    migrated: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception that is not the driver's (a time limit, a shutdown) stops a
    store mid-statement: that connection's state is unknown, and it is not
    given back to the pool, where it would stay in autocommit."""
    app = results_app(migrated)
    engine = result_engine(app)
    assert _runs_directly(engine)
    app.backend.store_result(str(uuid.uuid4()), "first", states.SUCCESS)
    pid = backend_pid(engine)

    class Interrupted(BaseException):
        pass

    class Interrupting:
        """A driver cursor whose statement is interrupted (C cursors cannot be patched)."""

        def __init__(self, cursor: Any) -> None:
            self.cursor = cursor

        def execute(self, *args: Any) -> None:
            raise Interrupted

        def close(self) -> None:
            self.cursor.close()

    real = _ConnectionFairy.cursor
    monkeypatch.setattr(
        _ConnectionFairy, "cursor", lambda fairy, *a, **k: Interrupting(real(fairy, *a, **k))
    )
    with pytest.raises(Interrupted):
        app.backend.store_result(str(uuid.uuid4()), "interrupted", states.SUCCESS)
    monkeypatch.undo()

    assert backend_pid(engine) != pid
    with engine.connect() as conn:
        assert conn.connection.driver_connection.autocommit is False  # type: ignore[union-attr]


def test_a_store_leaves_an_autocommit_engines_connection_in_autocommit(
    migrated: Database,
) -> None:
    """The store turns autocommit on for its statement and then back to what the
    connection had: an engine made with ``isolation_level="AUTOCOMMIT"`` keeps it."""
    app = results_app(migrated, database_engine_options={"isolation_level": "AUTOCOMMIT"})
    engine = result_engine(app)
    assert _runs_directly(engine)
    app.backend.store_result(str(uuid.uuid4()), "stored", states.SUCCESS)
    with engine.connect() as conn:
        assert conn.connection.driver_connection.autocommit is True  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "options",
    [
        {"echo": True},
        {"execution_options": {"schema_translate_map": {None: "results"}}},
    ],
    ids=["echo", "schema_translate_map"],
)
def test_an_engine_set_up_for_more_keeps_the_sqlalchemy_path(options: dict[str, Any]) -> None:
    """Statement logging and a schema translation map happen in SQLAlchemy's
    execution: an engine with either runs every store through it."""
    url = "postgresql+psycopg://app_user@127.0.0.1/none"
    assert _runs_directly(sa.create_engine(url))
    assert not _runs_directly(sa.create_engine(url, **options))
