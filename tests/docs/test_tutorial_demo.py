"""docs/tutorial/demo.md: ``tenant-celery demo --dsn`` run as the page shows, on the
rig's server, and its report compared line by line with the page's (ids, which
are new on every run, aside)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests._rig.postgres import PgCluster
from tests.docs.blocks import Block
from tests.docs.harness import PageRun, Substitutions
from tests.docs.scratch import libpq

PAGE = "tutorial/demo.md"


def normalized(report: str) -> list[str]:
    """The report's lines with the run's tenant ids and role token blanked."""
    report = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", report)
    report = re.sub(r"tenant_celery_demo_app_[0-9a-f]+", "<role>", report)
    return [line.rstrip() for line in report.strip("\n").split("\n")]


@pytest.mark.worker
def test_page(tmp_path: Path, pg_cluster: PgCluster) -> None:
    subs = Substitutions()
    subs.add("postgresql://postgres:secret@localhost:5432/postgres", libpq(pg_cluster.admin_url))
    run = PageRun(PAGE, tmp_path, substitutions=subs)
    reports: list[str] = []

    @run.on("console", "tenant-celery demo --dsn")
    def on_an_existing_server(block: Block) -> None:
        run.shell.run_block(block)
        (_, done) = run.shell.history[-1]
        reports.append(done.stdout)

    @run.on("text", "rows visible to tenant")
    def the_report(block: Block) -> None:
        expected = normalized(block.source)
        lines = normalized(reports[0])
        start = next(i for i, line in enumerate(lines) if line == expected[0])
        assert lines[start : start + len(expected)] == expected

    run.run()
