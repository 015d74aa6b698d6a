"""docs/howto/configuration.md: the settings table, the header rename, its reserved names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from celery import Celery

from tenant_celery import config
from tests.docs.blocks import DOCS, ROOT, Block
from tests.docs.harness import PageRun

PAGE = "howto/configuration.md"


def test_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = PageRun(PAGE, tmp_path)

    @run.on("python", 'tenant_celery_header = "acme_tenant"')
    def rename_on_the_app(block: Block) -> None:
        run.exec(block)
        assert config.header_name(run.namespace["app"]) == "acme_tenant"

    @run.on("console", "TENANT_CELERY_HEADER")
    def rename_in_the_environment(block: Block) -> None:
        run.shell.run_block(block)
        assert "TENANT_CELERY_HEADER" in run.shell.env, "the block exports another name"
        monkeypatch.setenv("TENANT_CELERY_HEADER", run.shell.env["TENANT_CELERY_HEADER"])
        assert config.header_name(Celery("other", set_as_current=False)) == "acme_tenant"

    run.run()


def test_settings_table_names_settings_the_package_reads() -> None:
    text = (DOCS / PAGE).read_text()
    rows = re.findall(r"^\| `tenant_celery_(\w+)` \| `TENANT_CELERY_(\w+)` \|", text, re.M)
    assert len(rows) >= 5, "the settings table lost its rows"
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "tenant_celery").rglob("*.py"))
    for name, env_name in rows:
        assert env_name == name.upper()
        assert re.search(rf"setting\(\s*\w+,\s*\"{name}\"", source), f"nothing reads {name}"


def test_reserved_header_names_are_the_ones_refused() -> None:
    text = (DOCS / PAGE).read_text()
    quoted = "\n".join(line for line in text.split("\n") if line.startswith(">"))
    listed = set(re.findall(r"`(\w+)`", quoted))
    assert listed == set(config._RESERVED_HEADERS)
