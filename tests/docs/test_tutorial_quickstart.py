"""docs/tutorial/quickstart.md, every block: the worker command run (through the rig,
which adds its queue and node name), the sessions as doctests against it, and the
log lines the page shows found in the worker's real log.

The page includes ``examples/quickstart/shop.py``, which the worker runs.
"""

from __future__ import annotations

import doctest
import re
import shlex
import sys
import time
from pathlib import Path

import pytest

from tests._rig.services import Services
from tests._rig.worker import WorkerFactory, WorkerHandle
from tests.docs.blocks import ROOT, Block
from tests.docs.harness import Command, PageRun

PAGE = "tutorial/quickstart.md"
EXAMPLE = ROOT / "examples" / "quickstart"


def log_shape(line: str) -> str:
    """A log line with what changes between runs (durations, pool process numbers) blanked."""
    line = re.sub(r"ForkPoolWorker-\d+", "ForkPoolWorker-N", line)
    return re.sub(r"succeeded in \d+(\.\d+)?s", "succeeded in Ts", line)


@pytest.mark.worker
def test_page(
    tmp_path: Path,
    start_worker: WorkerFactory,
    services: Services,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = services.redis()
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delitem(sys.modules, "shop", raising=False)
    run = PageRun(PAGE, tmp_path)
    workers: list[WorkerHandle] = []

    def start(command: Command) -> None:
        words = shlex.split(command.text)
        assert words[:4] == ["celery", "-A", "shop", "worker"], command
        worker = start_worker(
            "shop",
            broker="redis",
            backend="redis",
            extra_args=words[4:],
            # shop.py names localhost:6379; Celery lets the environment override it
            extra_env={
                "PYTHONPATH": f"{EXAMPLE}:{ROOT}",
                "CELERY_BROKER_URL": redis,
                "CELERY_RESULT_BACKEND": redis,
            },
        )
        import shop  # noqa: PLC0415  (the tutorial's module, as its shell imports it)

        worker.configure(shop.app)
        workers.append(worker)

    run.shell.on("celery -A shop worker", start)

    @run.on("text", "INFO/ForkPoolWorker")
    @run.on("text", "WARNING/ForkPoolWorker")
    def worker_log(block: Block) -> None:
        (expected,) = block.source.strip().split("\n")
        want = log_shape(expected) + "\n"
        checker = doctest.OutputChecker()

        def logged() -> bool:
            lines = workers[0].log_text().splitlines()
            return any(
                checker.check_output(want, log_shape(line) + "\n", doctest.ELLIPSIS)
                for line in lines
            )

        deadline = time.monotonic() + 5  # the worker writes its log a moment after the result
        while not logged():
            if time.monotonic() > deadline:
                pytest.fail(f"{block}: no line of the worker's log looks like\n{expected}")
            time.sleep(0.1)

    try:
        run.run()
    finally:
        sys.modules.pop("shop", None)
