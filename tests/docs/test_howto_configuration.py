"""docs/howto/configuration.md: the header rename and its reserved names.

The settings table is the reference page's, checked by tests/unit/test_reference_docs.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from celery import Celery

from tenant_celery import config
from tests.docs.blocks import DOCS, Block
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


def test_reserved_header_names_are_the_ones_refused() -> None:
    text = (DOCS / PAGE).read_text()
    quoted = "\n".join(line for line in text.split("\n") if line.startswith(">"))
    listed = set(re.findall(r"`(\w+)`", quoted))
    assert listed == set(config._RESERVED_HEADERS)
