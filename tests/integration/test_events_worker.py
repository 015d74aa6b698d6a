"""Celery's monitoring tools against a real worker with events on (``-E``): Flower,
``celery events --dump`` and ``celery inspect``, on the package's PostgreSQL
transport and on Redis.

Flower lists every task the test ran with its state and its tenant (and never
a forged tenant header's text); the dump prints their events with the tenant;
``inspect active`` and ``scheduled`` name each task's tenant.  On the
transport, events cost no stored message (a trigger records every row the
message table receives), and the auto-delete queue of a monitor killed with
SIGKILL is deleted while a live monitor's queue survives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tenant_celery import InvalidTenantId, TenantContextMissing, tenant_context
from tenant_celery.events import TENANT_FIELD
from tenant_celery.transport import _TABLE_TTL
from tests._rig.postgres import Database, libpq_kwargs
from tests._rig.redis_server import free_port
from tests._rig.worker import ROOT, TRANSPORT_SCHEMA, WorkerFactory, WorkerHandle

from . import events_app as tasks

pytestmark = pytest.mark.worker

A = str(uuid.uuid4())
B = str(uuid.uuid4())
#: A tenant header no tool may show: not a tenant id, and a forged field.
FORGED = "acme\r\ntenant_id=admin"


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}", pytrace=False)
        time.sleep(0.2)


@contextlib.contextmanager
def _celery(
    handle: WorkerHandle, log: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A <the worker's app> <args>`` with the worker's settings."""
    command = [sys.executable, "-m", "celery", "-A", handle.app_module, *args]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**handle.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _flower_tasks(base: str) -> dict[str, dict[str, Any]]:
    try:
        tasks_by_id: dict[str, dict[str, Any]] = _get_json(f"{base}/api/tasks")
    except OSError:
        return {}
    return tasks_by_id


@contextlib.contextmanager
def _inserts_recorded(database: Database) -> Iterator[Callable[[], list[str]]]:
    """Record the queue of every row inserted into the transport's message table."""
    with psycopg.connect(**libpq_kwargs(database.url), autocommit=True) as conn:
        conn.execute(
            f"""
            CREATE TABLE public.inserted (queue text NOT NULL);
            CREATE FUNCTION public.record_insert() RETURNS trigger
              LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
              BEGIN INSERT INTO public.inserted VALUES (NEW.queue); RETURN NEW; END $$;
            CREATE TRIGGER record_insert AFTER INSERT ON {TRANSPORT_SCHEMA}.tenant_celery_message
              FOR EACH ROW EXECUTE FUNCTION public.record_insert();
            """
        )

        def inserted() -> list[str]:
            return [str(row[0]) for row in conn.execute("SELECT queue FROM public.inserted")]

        try:
            yield inserted
        finally:
            conn.execute(
                f"DROP TRIGGER record_insert ON {TRANSPORT_SCHEMA}.tenant_celery_message;"
                " DROP FUNCTION public.record_insert(); DROP TABLE public.inserted"
            )


def _run_tasks(app: Any) -> dict[str, tuple[str, str | None]]:
    """Run one of each kind of task; each task id with its final state and tenant."""
    with tenant_context(A):
        ok = [tasks.work.delay(i) for i in range(3)]
        failed = tasks.fail.delay(9)
        retried = tasks.retry_once.delay(7)
    with tenant_context(B):
        ok_b = tasks.work.delay(10)
    plain = tasks.plain.delay(11)
    refused = app.send_task(tasks.work.name, args=(12,))
    forged = app.send_task(tasks.work.name, args=(13,), headers={"tenant_id": FORGED})

    for result in ok:
        assert result.get(timeout=30)["tenant"] == A
    assert ok_b.get(timeout=30)["tenant"] == B
    assert retried.get(timeout=30) == 7
    assert plain.get(timeout=30) == 11
    with pytest.raises(ValueError, match="fails on purpose"):
        failed.get(timeout=30)
    with pytest.raises(TenantContextMissing):
        refused.get(timeout=30)
    with pytest.raises(InvalidTenantId):
        forged.get(timeout=30)
    expected: dict[str, tuple[str, str | None]] = {r.id: ("SUCCESS", A) for r in ok}
    expected[ok_b.id] = ("SUCCESS", B)
    expected[failed.id] = ("FAILURE", A)
    expected[retried.id] = ("SUCCESS", A)
    expected[plain.id] = ("SUCCESS", None)
    expected[refused.id] = ("FAILURE", None)
    expected[forged.id] = ("FAILURE", None)
    return expected


def _check_inspect(app: Any) -> tuple[str, str]:
    """``inspect active`` and ``scheduled`` name each tenant task's tenant."""
    with tenant_context(A):
        running = tasks.linger.delay(3)
    with tenant_context(B):
        later = tasks.work.apply_async((99,), countdown=120)
    inspect = app.control.inspect(timeout=2)

    def active_entry() -> dict[str, Any] | None:
        for entries in (inspect.active() or {}).values():
            for entry in entries:
                if entry["id"] == running.id:
                    return dict(entry)
        return None

    def scheduled_entry() -> dict[str, Any] | None:
        for entries in (inspect.scheduled() or {}).values():
            for entry in entries:
                if entry["request"]["id"] == later.id:
                    return dict(entry["request"])
        return None

    assert _wait_for("the running task in inspect active", active_entry)[TENANT_FIELD] == A
    assert _wait_for("the ETA task in inspect scheduled", scheduled_entry)[TENANT_FIELD] == B
    assert running.get(timeout=30) == A
    app.control.revoke(later.id)
    return running.id, later.id


@pytest.mark.parametrize("broker", ["tcpg", "redis"])
def test_flower_events_dump_and_inspect_show_tasks_with_their_tenants(
    start_worker: WorkerFactory, database: Database, tmp_path: Path, broker: str
) -> None:
    handle = start_worker(
        tasks.__name__,
        broker=broker,  # type: ignore[arg-type]
        pool="prefork",
        concurrency=2,
        backend="redis",
        database_role="app",  # the transport as the unprivileged role
        extra_args=["-E"],
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    flower_env = {"FLOWER_UNAUTHENTICATED_API": "true"}
    records = contextlib.ExitStack()
    with records:
        inserted = records.enter_context(_inserts_recorded(database)) if broker == "tcpg" else None
        flower = records.enter_context(
            _celery(
                handle,
                tmp_path / "flower.log",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
                env=flower_env,
            )
        )
        dump_log = tmp_path / "events.log"
        dump = records.enter_context(_celery(handle, dump_log, "events", "--dump"))
        # Both monitors hear the worker (its heartbeats) before any task runs.
        _wait_for(
            "Flower to hear the worker",
            lambda: (
                f'flower_worker_online{{worker="{handle.name}@' in _text_or_empty(f"{base}/metrics")
            ),
        )
        _wait_for("celery events to dump a heartbeat", lambda: "heartbeat" in dump_log.read_text())

        with handle.bind(tasks.app) as app:
            expected = _run_tasks(app)
            running_id, later_id = _check_inspect(app)

            def flower_has_all() -> dict[str, dict[str, Any]] | None:
                listed = _flower_tasks(base)
                done = all(
                    listed.get(task_id, {}).get("state") == state
                    for task_id, (state, _) in expected.items()
                )
                return listed if done else None

            listed = _wait_for(
                "Flower to list every task in its final state", flower_has_all, timeout=60
            )
            for task_id, (state, tenant) in expected.items():
                assert listed[task_id]["state"] == state, task_id
                assert listed[task_id][TENANT_FIELD] == tenant, task_id
            assert listed[running_id][TENANT_FIELD] == A
            assert FORGED not in json.dumps(listed)

            # The task page shows the tenant; Flower's own metrics count the events.
            page = _get_text(f"{base}/task/{running_id}")
            assert re.search(r"<dt>Tenant id</dt>\s*<dd>\s*" + re.escape(A), page)
            metrics = _get_text(f"{base}/metrics")
            assert re.search(r'flower_events_total\{[^}]*type="task-succeeded"', metrics)

            # celery events --dump printed each task's events, with the tenant.
            dumped = _wait_for(
                "the dump to print the last task's success",
                lambda: (text := dump_log.read_text()) and running_id in text and text,
            )
            for task_id, (_, tenant) in expected.items():
                lines = [line for line in dumped.splitlines() if f"({task_id})" in line]
                assert any("task received" in line for line in lines), task_id
                for line in lines:
                    # The dump prints an event's fields sorted, as ", key=value".
                    field = re.search(rf"(?:, |kwargs=\S* ){TENANT_FIELD}=([^,]*)", line)
                    if tenant is None:
                        assert field is None, line
                    elif "task received" in line or "task started" in line:
                        assert field is not None, line
                        assert field.group(1) == tenant, line
            assert "admin" not in dumped

            if inserted is not None:
                # Events cost no stored message: rows went to the worker's task queue,
                # one per message published (the retry, linger and ETA included), and
                # to `inspect`'s reply queues (replies sent before it consumes them).
                rows = inserted()
                assert rows.count(handle.queue) == len(expected) + 3
                others = {queue for queue in rows if queue != handle.queue}
                assert all(queue.endswith(".reply.celery.pidbox") for queue in others), others
                _abandoned_queue_is_deleted(database, handle, dump, flower, base)
            del later_id


def _text_or_empty(url: str) -> str:
    try:
        return _get_text(url)
    except OSError:
        return ""


def _event_bindings(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        f"SELECT count(*) FROM {TRANSPORT_SCHEMA}.tenant_celery_binding"
        " WHERE queue LIKE 'celeryev.%'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def _auto_delete_queues(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        f"SELECT name FROM {TRANSPORT_SCHEMA}.tenant_celery_queue WHERE auto_delete"
    ).fetchall()
    return {str(row[0]) for row in rows}


def _abandoned_queue_is_deleted(
    database: Database,
    handle: WorkerHandle,
    dump: subprocess.Popen[bytes],
    flower: subprocess.Popen[bytes],
    base: str,
) -> None:
    """A monitor killed with SIGKILL leaves its auto-delete queue for at most a
    minute and a half; live monitors and the worker keep theirs."""
    from kombu import Connection  # noqa: PLC0415

    pidbox = f"{handle.name}@"
    with psycopg.connect(**libpq_kwargs(database.url), autocommit=True) as conn:
        before = _auto_delete_queues(conn)
        event_queues = {name for name in before if name.startswith("celeryev.")}
        assert len(event_queues) == 2, before  # Flower's and the dump's
        assert any(name.startswith(pidbox) for name in before), before
        os.killpg(dump.pid, signal.SIGKILL)
        dump.wait(10)
        # A minute later (moved back in time here), no connection has marked any.
        conn.execute(
            f"UPDATE {TRANSPORT_SCHEMA}.tenant_celery_queue"
            " SET declared_at = now() - interval '2 minutes' WHERE auto_delete"
        )
        # Any consumer of the database deletes abandoned queues as it maintains.
        with Connection(handle.broker_url) as consumer:
            consumer.default_channel  # noqa: B018 (a channel to maintain for)
            with contextlib.suppress(TimeoutError):
                consumer.drain_events(timeout=0.2)
        assert _auto_delete_queues(conn) == set()
        assert _event_bindings(conn) == 0

        # The live connections declare theirs again within 15 s; the dead one's is gone.
        def declared_again() -> set[str] | None:
            found = _auto_delete_queues(conn)
            events = {name for name in found if name.startswith("celeryev.")}
            if len(events) == 1 and any(name.startswith(pidbox) for name in found):
                return events if _event_bindings(conn) == 1 else None
            return None

        (flowers,) = _wait_for("the live queues to be declared again", declared_again)
        assert flowers in event_queues
        # A publisher reads an exchange's bindings again at most this long after.
        time.sleep(_TABLE_TTL + 0.5)
        assert {n for n in _auto_delete_queues(conn) if n.startswith("celeryev.")} == {flowers}
    # Flower goes on hearing the worker.
    with tenant_context(A):
        again = tasks.work.delay(100)
    assert again.get(timeout=30)["tenant"] == A
    _wait_for(
        "Flower to list a task run after the sweep",
        lambda: _flower_tasks(base).get(again.id, {}).get(TENANT_FIELD) == A,
    )
    assert flower.poll() is None
