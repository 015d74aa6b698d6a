"""The quickstart tutorial's part 1, run as written against a real worker.

``examples/quickstart/shop.py`` is the module part 1 shows (the page includes
the file), and every ``pycon`` block of part 1 is run as a doctest while a real
``celery -A shop worker`` serves it.  Part 2 (PostgreSQL, ``billing.py``) runs
in ``tests/docs/test_tutorial_quickstart.py``.
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
    """The ``pycon`` blocks of part 1 (everything before the heading of part 2)."""
    part_1 = text.split("\n## Part 2", 1)[0]
    return "\n".join(re.findall(r"```pycon\n(.*?)```", part_1, flags=re.DOTALL))


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
    # The worker's one warning line for it (its wording around the reason may change).
    assert re.search(
        r"refused\b.*: tenant task 'shop\.build_invoice' received a message without a tenant",
        handle.log_text(),
    )
