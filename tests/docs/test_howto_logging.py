"""docs/howto/logging.md: each configuration on the page, then a line logged inside
a tenant task (run eagerly here; ``tests/integration/test_logging_worker.py`` does
the same in a real worker), compared with the page's JSON sample."""

from __future__ import annotations

import json
import logging
import logging.config
import re
import types
from pathlib import Path
from typing import Any

import pytest
from celery.app.log import Logging

from tenant_celery import CORRELATION_HEADER, JsonFormatter, tenant_context, tenant_task
from tenant_celery.correlation import correlation_context, current_correlation_id
from tests.docs.blocks import DOCS, Block
from tests.docs.harness import PageRun

PAGE = "howto/logging.md"
TENANT = "0b7e4c1a-5a43-4f5e-9d1c-2f6a1c9e7b10"


def shape(value: object) -> str:
    """A value with its digits and hex letters blanked: the format, not the content."""
    return re.sub(r"[0-9a-f]", "x", str(value))


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = PageRun(PAGE, tmp_path)
    ns = run.namespace
    logged: dict[str, Any] = {}

    @run.on("python", "configure_logging()")
    def configure(block: Block) -> None:
        run.exec(block)
        app = ns["app"]
        app.conf.update(broker_url="memory://", task_always_eager=True)

        @tenant_task(app=app, name="shop.tasks.build_invoice")
        def build_invoice(number: int) -> None:
            logging.getLogger("shop.billing").info("invoice %s built", number)

        capsys.readouterr()
        with tenant_context(TENANT), correlation_context():
            build_invoice.delay(42)
        lines = json_lines(capsys.readouterr().err)
        logged.update(next(line for line in lines if line["logger"] == "shop.billing"))

    @run.on("json", '"message": "invoice 42 built"')
    def sample_line(block: Block) -> None:
        sample = json.loads(block.source)
        assert list(sample) == list(logged), "the sample's keys are not what is logged"
        for key in ("level", "logger", "message", "task_name", "tenant_id"):
            assert sample[key] == logged[key], key
        for key in ("timestamp", "task_id", "correlation_id"):
            assert shape(sample[key]) == shape(logged[key]), key

    @run.on("python", "LOGGING = {")
    def dict_config(block: Block) -> None:
        run.exec(block)
        logging.config.dictConfig(ns["LOGGING"])
        capsys.readouterr()
        logging.getLogger("shop").warning("configured")
        (line,) = json_lines(capsys.readouterr().err)
        assert (line["logger"], line["message"]) == ("shop", "configured")

    @run.on("python", "@setup_logging.connect")
    def keep_own_logging(block: Block) -> None:
        run.exec(block)
        logging.getLogger().handlers.clear()
        done_before, Logging._setup = Logging._setup, False
        try:
            # What a worker does at start: with the receiver, Celery configures nothing.
            ns["app"].log.setup_logging_subsystem(loglevel="INFO")
        finally:
            Logging._setup = done_before
        formatters = [h.formatter for h in logging.getLogger().handlers]
        assert [type(f) for f in formatters] == [JsonFormatter]

    @run.on("python", "class ShopFormatter")
    def subclass(block: Block) -> None:
        run.exec(block)
        record = logging.LogRecord("shop", logging.INFO, __file__, 1, "hi", None, None)
        line = json.loads(ns["ShopFormatter"]().format(record))
        assert list(line) == [*logged, "process", "service"]
        assert line["service"] == "shop"

    @run.on("python", "class CorrelationIdMiddleware")
    def middleware(block: Block) -> None:
        run.exec(block)
        seen: list[str | None] = []

        def get_response(request: object) -> dict[str, str]:
            seen.append(current_correlation_id())
            return {}

        handle = ns["CorrelationIdMiddleware"](get_response)
        for incoming, kept in (("req-7f3a", True), ("two words", False), (None, False)):
            headers = {} if incoming is None else {"X-Correlation-ID": incoming}
            response = handle(types.SimpleNamespace(headers=headers))
            assert response["X-Correlation-ID"] == seen[-1]
            assert (seen[-1] == incoming) is kept
        assert current_correlation_id() is None

    run.run()


def test_header_name_is_the_one_carried() -> None:
    text = (DOCS / PAGE).read_text()
    assert re.search(rf"message\s+header\s+`{CORRELATION_HEADER}`", text)
