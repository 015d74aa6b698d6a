"""docs/howto/fan-out.md: fan_out and every_tenant, publishing to kombu's in-memory
broker and reading every message's headers; the tenant lister reads a real table
as the app role, and the beat entry's task runs as a worker would run it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery.schedules import crontab
from celery.signals import before_task_publish

from tenant_celery import DEFAULT_HEADER
from tests._rig.postgres import Database, render
from tests.docs.blocks import Block
from tests.docs.harness import PageRun

PAGE = "howto/fan-out.md"
TENANTS = [str(uuid.UUID(int=n)) for n in (1, 2, 3)]

# The page publishes `build_report` for a list of tenants in an app of its own.
PRELUDE = f"""
from celery import Celery
from tenant_celery import tenant_task

app = Celery("shop", broker="memory://")

@tenant_task(app=app, name="reports.build_report")
def build_report(period, include_drafts=True):
    return period

tenant_ids = {TENANTS!r}
"""

# The module `shop/tenancy.py` imports its engine from: the app role on the test database.
SHOP_DB = """
import sqlalchemy as sa

engine = sa.create_engine({url!r}, poolclass=sa.NullPool)
"""


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """Every message published during the test: headers, routing key, properties."""
    seen: list[dict[str, Any]] = []

    def record(**message: Any) -> None:
        seen.append(message)

    before_task_publish.connect(record)
    yield seen
    before_task_publish.disconnect(record)


def assert_spread(messages: list[dict[str, Any]], since: datetime, spread: float) -> None:
    """The n-th of N messages is due ``spread * n / N`` seconds after ``since`` (5 s slack)."""
    due = [
        0.0
        if m["headers"].get("eta") is None
        else (datetime.fromisoformat(m["headers"]["eta"]) - since).total_seconds()
        for m in messages
    ]
    wanted = [spread * n / len(messages) for n in range(len(messages))]
    assert all(abs(d - w) <= 5 for d, w in zip(due, wanted, strict=True)), (due, wanted)


def test_page(tmp_path: Path, database: Database, published: list[dict[str, Any]]) -> None:
    with database.admin_engine().begin() as conn:
        conn.exec_driver_sql("CREATE TABLE tenants (id uuid PRIMARY KEY, active boolean)")
        conn.execute(
            sa.text("INSERT INTO tenants VALUES (:id, :active)"),
            [{"id": t, "active": t != TENANTS[1]} for t in TENANTS],
        )
        conn.exec_driver_sql("GRANT SELECT ON tenants TO app_user")
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "db.py").write_text(SHOP_DB.format(url=render(database.app_url)))
    run = PageRun(PAGE, tmp_path, prelude=PRELUDE)
    ns = run.namespace

    @run.on("python", '"monthly", spread=timedelta(minutes=10)')
    def publish_once_per_tenant(block: Block) -> None:
        since = datetime.now(timezone.utc)
        run.exec(block)
        assert [r.id for r in ns["results"]] == [m["headers"]["id"] for m in published]
        assert [m["headers"][DEFAULT_HEADER] for m in published] == TENANTS
        assert [list(m["body"][0]) for m in published] == [["monthly"]] * 3
        assert_spread(published, since, 600)
        published.clear()

    @run.on("python", 'set(queue="reports", priority=3)')
    def publish_a_signature(block: Block) -> None:
        since = datetime.now(timezone.utc)
        run.exec(block)
        assert [m["headers"][DEFAULT_HEADER] for m in published] == TENANTS
        assert {m["routing_key"] for m in published} == {"reports"}
        assert [(list(m["body"][0]), m["body"][1]) for m in published] == [
            (["monthly"], {"include_drafts": False})
        ] * 3
        assert {m["properties"].get("priority") for m in published} == {3}
        assert_spread(published, since, 600)
        published.clear()

    @run.on("python", "every_tenant(")
    def beat_entry(block: Block) -> None:
        run.exec(block)
        entry = ns["app"].conf.beat_schedule["nightly-report"]
        assert entry["schedule"] == crontab(hour=2, minute=0)
        # When it fires, beat publishes the entry's task; a worker runs it like this.
        task = ns["app"].tasks[entry["task"]]
        since = datetime.now(timezone.utc)
        result = task.apply(entry["args"], entry["kwargs"])
        assert result.get() == 2
        assert [m["headers"]["task"] for m in published] == ["reports.build_report"] * 2
        assert [m["headers"][DEFAULT_HEADER] for m in published] == [TENANTS[0], TENANTS[2]]
        assert [list(m["body"][0]) for m in published] == [["daily"]] * 2
        assert_spread(published, since, 3600)

    @run.on("python", "# shop/tenancy.py")
    def tenant_lister(block: Block) -> None:
        from shop.tenancy import active_tenant_ids  # noqa: PLC0415  (written by the run)

        assert active_tenant_ids() == [TENANTS[0], TENANTS[2]]

    run.run()
