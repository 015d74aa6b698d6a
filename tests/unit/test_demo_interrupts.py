"""Ctrl-C and SIGTERM during ``tenant-celery demo``: never dropped, always exit 130.

Each case runs a small module with ``python -m`` (as ``python -m
tenant_celery.cli demo`` runs), arms the demo's interrupt handling and sends
the process a signal at a point where a KeyboardInterrupt raised by the
handler would go wrong: inside code run by ``exec()`` (CPython 3.11 then ends
the process with SIGINT, -2, after it chose exit code 130) and inside a weak
reference callback (where Python prints the exception and drops it, and the
demo ran to the end).  The module exits 130 on KeyboardInterrupt, like the CLI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

SCRIPT = """
import os, signal, sys, time, weakref

from tenant_celery.demo import _Interrupt


def interrupt_me(signum=signal.SIGINT):
    os.kill(os.getpid(), signum)


def failed_after_the_interrupt():
    # run_demo whose work fails after a Ctrl-C was noted, as a subprocess killed by
    # the terminal's Ctrl-C fails.
    import tenant_celery.demo as demo

    def work(dsn, progress, deadline, cleanup):
        interrupt_me()
        raise demo.DemoError("initdb exited with -2")

    demo._run = work
    demo.run_demo("postgresql://nobody@127.0.0.1/nothing", out=sys.stdout)


def run(case):
    if case == "failed after the interrupt":
        return failed_after_the_interrupt()
    interrupt = _Interrupt()
    with interrupt.handling():
        if case == "again while unwinding":
            interrupt_me()
            try:
                interrupt.check()
            except KeyboardInterrupt:
                interrupt_me()  # on the way to the clean-up
                print("cleaned up", flush=True)
                raise
        if case == "exec":
            exec("import os, signal; os.kill(os.getpid(), signal.SIGINT); x = 1")
        elif case == "weakref":
            class Thing:
                pass
            thing = Thing()
            ref = weakref.ref(thing, lambda _: interrupt_me())
            del thing
        elif case == "sigterm":
            interrupt_me(signal.SIGTERM)
        elif case == "twice":
            interrupt_me()
            interrupt_me()
            time.sleep(30)
        elif case == "twice while closing":
            interrupt_me()
            interrupt.closing = True
            interrupt_me()
        print("went on to the next check", flush=True)
        interrupt.check()
        print("not interrupted", flush=True)
    print("restored", signal.getsignal(signal.SIGINT) is signal.default_int_handler,
          signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)


if __name__ == "__main__":
    try:
        run(sys.argv[1])
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
"""


def ctrl_c_as_at_a_terminal() -> None:
    """Where the tests run as a background job (CI runs one cell beside another),
    SIGINT is ignored and a child would inherit that; a terminal's command has it at
    its default, and Python then installs its own handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_case(
    case: str, tmp_path: Path, at_start: Callable[[], object] = ctrl_c_as_at_a_terminal
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "interrupt_case.py").write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, "-m", "interrupt_case", case],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, preexec_fn=at_start,
    )  # fmt: skip


@pytest.mark.parametrize("case", ["exec", "weakref", "sigterm", "twice while closing"])
def test_an_interrupt_is_acted_on_at_the_next_check_and_exits_130(
    case: str, tmp_path: Path
) -> None:
    done = run_case(case, tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (
        130, "went on to the next check\n", "interrupted\n"
    )  # fmt: skip


def test_an_interrupt_on_the_way_to_the_clean_up_does_not_cut_it_short(tmp_path: Path) -> None:
    done = run_case("again while unwinding", tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (130, "cleaned up\n", "interrupted\n")


def test_a_failure_after_an_interrupt_is_reported_as_the_interrupt(tmp_path: Path) -> None:
    """A step that fails because of the Ctrl-C (pgserver's initdb, killed by the
    terminal with the demo) exits 130 like any interrupt, not 1 or 2."""
    done = run_case("failed after the interrupt", tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted\n")


def test_a_second_interrupt_does_not_wait_for_the_check(tmp_path: Path) -> None:
    done = run_case("twice", tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted\n")


def test_the_previous_handlers_come_back(tmp_path: Path) -> None:
    done = run_case("none", tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [
        "went on to the next check", "not interrupted", "restored True True"
    ]  # fmt: skip


def test_an_ignored_ctrl_c_stays_ignored(tmp_path: Path) -> None:
    """A background job's SIGINT is ignored; the demo does not start taking it."""
    done = run_case("exec", tmp_path, lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [
        "went on to the next check", "not interrupted", "restored False True"
    ]  # fmt: skip
