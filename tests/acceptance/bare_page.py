"""Run a documentation page in a bare virtualenv, as a reader runs it: :class:`BarePage`.

The page's blocks are found as the docs tests find them
(:func:`tests.docs.blocks.page_blocks`) and run in page order, each in the
reader's environment: the bare virtualenv's ``bin`` first on ``PATH``, a
scratch directory as the working directory, nothing of the test run's own
environment.

* ``{literalinclude}`` of a file under ``examples/``: the reader creates that
  file, so it is copied into the directory;
* a ``python`` block whose first line is ``# path.py``: written there too;
  any other ``python`` block runs in the reader's interpreter session;
* ``pycon``: a doctest in that session, one interpreter (the virtualenv's
  ``python``, :mod:`tests.acceptance._session`) kept for the whole page, so a
  name defined in one session block is there in the next, as in a terminal;
* ``console``: each ``$`` command runs in a shell (after the caller's
  substitutions, e.g. a server URL the page shows as a placeholder); output shown after it must
  match (``...`` stands for any text); a command that does not end by itself
  (``celery ... worker``) runs in the background until the page is done, and
  the next block waits for it to be ready.  Creating and activating the
  virtualenv is done already (by the caller); ``pip install`` goes to the
  caller's ``install``, which installs what the line names into that virtualenv;
* anything else (text, ini, yaml): what the page *shows*, which its page test
  in ``tests/docs`` checks against the code; not run here.
"""

from __future__ import annotations

import contextlib
import doctest
import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.docs.blocks import ROOT, Block, page_blocks

SESSION = Path(__file__).with_name("_session.py")
#: Commands a reader starts and leaves running, and the log line that says they are ready.
BACKGROUND = {
    re.compile(r"^celery .*\bworker\b"): re.compile(r"\bready\.$", re.M),
}
#: Console commands the caller has done already: creating and activating the virtualenv.
SETUP = re.compile(r"^(python3? -m venv|\. \S+/activate|source \S+/activate)\b")
PIP_INSTALL = re.compile(r"^pip install\s+(?P<args>.*)$")
READY_TIMEOUT = 60.0
COMMAND_TIMEOUT = 180.0


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """TERM the process's group, then KILL it if it has not ended in 20 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class BarePage:
    """One page, run block by block in a bare virtualenv (see the module doc)."""

    def __init__(
        self,
        page: str,
        bin_dir: Path,
        workdir: Path,
        environ: dict[str, str],
        install: Callable[[list[str]], None],
        substitutions: dict[str, str] | None = None,
    ) -> None:
        self.page = page
        self.install = install
        self.substitutions = substitutions or {}
        self.bin = bin_dir
        self.workdir = workdir
        self.environ = environ
        self._background: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self._session: subprocess.Popen[str] | None = None

    # ---------------------------------------------------------------- running

    def run(self) -> None:
        """Every block of the page, in order; stops everything started at the end."""
        blocks = page_blocks(self.page)
        assert blocks, f"{self.page} has no blocks"
        try:
            for block in blocks:
                self._block(block)
        except BaseException:
            for command, _, log in self._background:
                print(f"--- {command} (last lines of its output)\n{_tail(log)}")
            raise
        finally:
            self.close()

    def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                session.communicate(timeout=20)  # closes its input: the session ends
            if session.poll() is None:
                session.kill()
                session.communicate(timeout=10)
        while self._background:
            _, process, _ = self._background.pop()
            stop_process_group(process)

    def _block(self, block: Block) -> None:
        if block.kind == "literalinclude":
            included = block.included
            assert included is not None, block
            assert included.is_file(), block
            assert included.is_relative_to(ROOT / "examples"), (
                f"{block}: a reader cannot create {block.argument}"
            )
            (self.workdir / included.name).write_text(included.read_text())
        elif block.kind == "python" and block.file_path is not None:
            target = self.workdir / block.file_path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.source)
        elif block.kind == "python":
            self._in_session(block, exec_source=block.source)
        elif block.kind == "pycon":
            self._in_session(block, doctest_source=block.source)
        elif block.kind in {"console", "shell", "bash"}:
            for command, expected in _commands(block.source):
                self._command(block, command, expected)

    # ------------------------------------------------------------- commands

    def _command(self, block: Block, command: str, expected: str) -> None:
        for placeholder, value in self.substitutions.items():
            command = command.replace(placeholder, value)
        if SETUP.match(command):
            return
        pip = PIP_INSTALL.match(command)
        if pip is not None:
            self.install(shlex.split(pip["args"]))
            return
        for pattern, ready in BACKGROUND.items():
            if pattern.search(command):
                self._start(block, command, ready)
                return
        done = subprocess.run(
            command, shell=True, cwd=self.workdir, env=self.environ, capture_output=True,
            text=True, timeout=COMMAND_TIMEOUT, check=False,
        )  # fmt: skip
        output = done.stdout + done.stderr
        if expected.strip():
            # What the page shows is what the command prints, on standard output or
            # both streams (standard error may also carry a library's warning).
            assert _shows(expected, done.stdout) or _shows(expected, output), (
                f"{block}: `{command}` printed\n{output}\nwhere the page shows\n{expected}"
            )
        else:
            assert done.returncode == 0, (
                f"{block}: `{command}` exited {done.returncode}\n{output[-3000:]}"
            )

    def _start(self, block: Block, command: str, ready: re.Pattern[str]) -> None:
        log = self.workdir / f"background-{len(self._background)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, shell=True, cwd=self.workdir, env=self.environ, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._background.append((command, process, log))
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.search(log.read_text(errors="replace")):
            if process.poll() is not None:
                pytest.fail(f"{block}: `{command}` exited {process.returncode}\n{_tail(log)}")
            if time.monotonic() > deadline:
                waited = f"not ready after {READY_TIMEOUT:.0f} s"
                pytest.fail(f"{block}: `{command}` {waited}\n{_tail(log)}")
            time.sleep(0.2)

    # -------------------------------------------------------------- session

    def _in_session(
        self, block: Block, *, exec_source: str | None = None, doctest_source: str | None = None
    ) -> None:
        if self._session is None:
            self._session = subprocess.Popen(
                [str(self.bin / "python"), str(SESSION)], cwd=self.workdir, env=self.environ,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
        session = self._session
        assert session.stdin is not None
        assert session.stdout is not None
        request = {"name": str(block), "exec": exec_source, "doctest": doctest_source}
        session.stdin.write(json.dumps(request) + "\n")
        session.stdin.flush()
        reply = session.stdout.readline()
        assert reply, f"{block}: the Python session ended (exit {session.poll()})"
        result = json.loads(reply)
        assert result["failed"] == 0, f"{block}:\n{result['report']}"


def _commands(source: str) -> list[tuple[str, str]]:
    """``$ command`` lines (``\\`` continuations joined) and the output shown after each."""
    commands: list[tuple[str, str]] = []
    lines = source.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line.startswith("$ "):
            if commands:
                command, output = commands[-1]
                commands[-1] = (command, output + line + "\n")
            continue
        command = line[2:]
        while command.endswith("\\") and index < len(lines):
            command = command[:-1] + " " + lines[index].strip()
            index += 1
        commands.append((_without_comment(command), ""))
    return commands


def _without_comment(command: str) -> str:
    """The command without a trailing ``  # comment``."""
    return re.split(r"\s+#\s", command, maxsplit=1)[0].rstrip()


def _shows(expected: str, output: str) -> bool:
    """``output`` is what ``expected`` shows, ``...`` standing for any text."""
    want = expected.strip("\n") + "\n"
    got = "\n".join(line.rstrip() for line in output.strip("\n").split("\n")) + "\n"
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    return doctest.OutputChecker().check_output(want, got, flags)


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
