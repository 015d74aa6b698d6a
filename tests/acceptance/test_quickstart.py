"""The quickstart tutorial, run as written against a real worker.

``examples/quickstart/shop.py`` is the module the tutorial shows (the page
includes the file), and every ``pycon`` block of the page is run as a doctest
while a real ``celery -A shop worker`` serves it.
"""

from __future__ import annotations

import doctest
import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests._rig.services import Services
from tests._rig.worker import WorkerFactory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "quickstart"
PAGE = ROOT / "docs" / "tutorial" / "quickstart.md"

pytestmark = pytest.mark.worker


@pytest.fixture
def shop(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The example module, imported the way the tutorial's shell imports it."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    sys.modules.pop("shop", None)
    module = importlib.import_module("shop")
    yield module
    sys.modules.pop("shop", None)


def pycon_blocks(text: str) -> str:
    return "\n".join(re.findall(r"```pycon\n(.*?)```", text, flags=re.DOTALL))


def test_quickstart_page_runs(
    shop: ModuleType, start_worker: WorkerFactory, services: Services
) -> None:
    redis = services.redis()
    handle = start_worker(
        "shop",
        broker="redis",
        backend="redis",
        # shop.py names localhost:6379; Celery lets the environment override it
        extra_env={
            "PYTHONPATH": f"{EXAMPLE}:{ROOT}",
            "CELERY_BROKER_URL": redis,
            "CELERY_RESULT_BACKEND": redis,
        },
    )
    source = pycon_blocks(PAGE.read_text())
    assert source.count(">>>") >= 8, "the tutorial lost its examples"
    test = doctest.DocTestParser().get_doctest(source, {}, "quickstart", str(PAGE), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    with handle.bind(shop.app):
        runner.run(test, out=lambda report: pytest.fail(report, pytrace=False))
    assert runner.summarize(verbose=False).attempted == source.count(">>>")
    assert "refused: tenant task 'shop.build_invoice' received a message without a tenant" in (
        handle.log_text()
    )
