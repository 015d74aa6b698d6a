"""Run a documentation page's code blocks as a test: :class:`PageRun`.

A page test builds a :class:`PageRun` for its page, gives it a small visible
prelude and the substitutions that point the page's placeholders (``db/shop``,
role names) at the rig's scratch database, registers a handler for each block
that needs more than the default, and calls :meth:`PageRun.run`, which goes
through every block in page order:

* an annotated block (``<!-- docs-test: exercised by tests/x.py::test_y -->``)
  is left to the named test, which must exist;
* a handler registered with :meth:`PageRun.on` for the block runs;
* otherwise a ``python`` block is executed in the page's namespace (one per
  page, top to bottom, like a notebook), a ``pycon`` block runs as a doctest in
  the same namespace, a ``{literalinclude}`` of an example must be named by a
  test, a ``console`` block runs through :attr:`PageRun.shell`, and a ``sql``
  block through :attr:`PageRun.sql` when the page's test gives a connection;
* any other block fails the test: nothing is skipped by default.

A ``python`` block whose first line is ``# path/to/module.py`` is a file: it is
written into the page's project directory (on ``sys.path``) before the first
block runs, and needs a handler that uses it.

Every handler must match exactly one block, so a handler for a block that was
edited away fails the test as well.  Code never reaches a host other than this
machine: after substitution, a block naming any other host fails.
"""

from __future__ import annotations

import contextlib
import doctest
import logging
import os
import re
import shlex
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celery._state
import celery.signals
import pytest
import sqlalchemy as sa
from celery.utils.dispatch import Signal
from sqlalchemy.orm import close_all_sessions

import tenant_celery.context
import tenant_celery.signals
from tests.docs.blocks import ROOT, Block, page_blocks
from tests.docs.checks import annotation_problem, example_problem, pip_install_problems

Handler = Callable[[Block], None]

_URL = re.compile(
    r"\b(?P<scheme>[a-z][a-z0-9+.-]*)://(?:[^/\s\"'@]*@)?(?P<host>\[[^\]]*\]|[^/:\s\"'?;]*)"
)
_LOCAL_HOSTS = {"", "localhost", "::1", "[::1]"}


def assert_local(text: str, where: object) -> None:
    """Fail when ``text`` names a URL whose host is not this machine."""
    for match in _URL.finditer(text):
        host = match["host"]
        if host in _LOCAL_HOSTS or host.startswith("127.") or match["scheme"] == "memory":
            continue
        pytest.fail(
            f"{where}: would connect to {host!r} ({match[0]}...): "
            "add a substitution to the page's test",
            pytrace=False,
        )


def assert_output(expected: str, actual: str, where: object) -> None:
    """``actual`` matches ``expected``, where ``...`` stands for any text (doctest's ELLIPSIS)."""
    want = "\n".join(line.rstrip() for line in expected.strip("\n").split("\n")) + "\n"
    got = "\n".join(line.rstrip() for line in actual.strip("\n").split("\n")) + "\n"
    checker = doctest.OutputChecker()
    if not checker.check_output(want, got, doctest.ELLIPSIS):
        pytest.fail(f"{where}: output differs from the docs\n--- docs\n{want}--- real\n{got}")


@dataclass
class Substitutions:
    """Literal replacements: docs placeholder -> the rig's value, applied in order.

    :meth:`reverse` maps real output back to the docs' words, for comparison.
    """

    pairs: list[tuple[str, str]] = field(default_factory=list)
    #: Extra real -> docs replacements applied to output only (a URL rendered with
    #: its password hidden, say).
    output_pairs: list[tuple[str, str]] = field(default_factory=list)

    def add(self, docs: str, real: str) -> None:
        self.pairs.append((docs, real))

    def apply(self, text: str) -> str:
        for docs, real in self.pairs:
            text = text.replace(docs, real)
        return text

    def reverse(self, text: str) -> str:
        for real, docs in self.output_pairs:
            text = text.replace(real, docs)
        for docs, real in reversed(self.pairs):
            text = text.replace(real, docs)
        return text


# --------------------------------------------------------------------------- console


@dataclass
class Command:
    """One ``$ command`` of a console block and the output the docs show after it."""

    block: Block
    text: str
    expected: str

    def __str__(self) -> str:
        return f"{self.block.location}: $ {self.text}"


def commands(block: Block) -> list[Command]:
    """The commands of a console block (``$ `` lines, ``\\`` continuations, output)."""
    found: list[Command] = []
    lines = block.source.rstrip("\n").split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.startswith("$ "):
            raise ValueError(f"{block.location}: console output before any command: {line!r}")
        text = line[2:]
        while text.endswith("\\") and index + 1 < len(lines):
            index += 1
            text = text[:-1].rstrip() + " " + lines[index].strip()
        output: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].startswith("$ "):
            output.append(lines[index])
            index += 1
        found.append(Command(block, text.strip(), "\n".join(output)))
    return found


class Shell:
    """Runs console blocks for real: ``bash -c`` in ``cwd`` with the page's environment.

    ``export NAME=VALUE`` sets :attr:`env`; ``tenant-celery``, ``alembic`` and
    ``psql`` run and must exit 0, and when the docs show output after a command
    its standard output must match it; ``pip install 'tenant-celery[...]'`` is
    checked against the declared extras.  A page adds its own policies for other
    commands with :meth:`on` (by the command's leading words).
    """

    RUN = ("tenant-celery", "alembic", "psql")

    def __init__(self, cwd: Path, substitutions: Substitutions, timeout: float = 120) -> None:
        self.cwd = cwd
        self.substitutions = substitutions
        self.timeout = timeout
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("TENANT_CELERY_", "TC_TEST_", "PYTEST_"))
        }
        self.env["PATH"] = os.pathsep.join([bin_dir, self.env.get("PATH", "")])
        self.env["PYTHONPATH"] = os.pathsep.join([str(cwd), str(ROOT)])
        self.policies: dict[str, Callable[[Command], None]] = {}
        #: Every command run so far: (command, completed process).
        self.history: list[tuple[Command, subprocess.CompletedProcess[str]]] = []

    def on(self, prefix: str, policy: Callable[[Command], None]) -> None:
        """Handle commands starting with ``prefix`` (after substitution) with ``policy``."""
        self.policies[prefix] = policy

    def run_block(self, block: Block) -> None:
        for command in commands(block):
            self.run_command(command)

    def run_command(self, command: Command) -> None:
        text = self.substitutions.apply(command.text)
        assert_local(text, command)
        for prefix, policy in self.policies.items():
            if text.startswith(prefix):
                policy(Command(command.block, text, command.expected))
                return
        words = shlex.split(text)
        if words[0] == "export":
            for assignment in words[1:]:
                name, _, value = assignment.partition("=")
                self.env[name] = os.path.expandvars(value)
            return
        if words[:2] == ["pip", "install"]:
            problems = pip_install_problems(command.block)
            assert not problems, problems
            if not all(w.startswith("tenant-celery") or w.startswith("-") for w in words[2:]):
                pytest.fail(f"{command}: installs something other than tenant-celery")
            return
        if words[0] in self.RUN:
            done = self.execute(text)
            if done.returncode != 0:
                pytest.fail(
                    f"{command}: exit {done.returncode}\n{done.stdout}\n{done.stderr}",
                    pytrace=False,
                )
            if command.expected.strip():
                assert_output(command.expected, self.substitutions.reverse(done.stdout), command)
            return
        pytest.fail(f"{command}: no policy for this command in the page's test", pytrace=False)

    def execute(self, text: str) -> subprocess.CompletedProcess[str]:
        """Run ``text`` with bash; return the completed process (not checked)."""
        done = subprocess.run(
            ["bash", "-c", text],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            check=False,
        )
        self.history.append((Command(Block("", 0, "console", "", text), text, ""), done))
        return done


# ------------------------------------------------------------------------------- SQL


_EXPECTED = re.compile(r"^--\s?(?P<value>.*)$")


def sql_statements(source: str) -> list[tuple[str, str | None]]:
    """``(statement, expected)`` pairs: a ``-- value`` comment line right after a
    statement's ``;`` is the first column of its first row."""
    found: list[tuple[str, str | None]] = []
    current: list[str] = []
    after_statement = False
    for line in source.split("\n"):
        stripped = line.strip()
        comment = _EXPECTED.match(stripped)
        if comment and not current:
            if after_statement and found and found[-1][1] is None:
                found[-1] = (found[-1][0], comment["value"].strip())
            continue
        after_statement = False
        if not stripped:
            continue
        current.append(line)
        if stripped.endswith(";"):
            found.append(("\n".join(current).rstrip().rstrip(";"), None))
            current = []
            after_statement = True
    if current:
        raise ValueError(f"SQL without a closing ';': {' '.join(current)!r}")
    return found


def run_sql(source: str, conn: sa.Connection, where: object) -> None:
    """Execute each statement of ``source``; compare results the docs state."""
    for statement, expected in sql_statements(source):
        result = conn.exec_driver_sql(statement)
        if expected is None:
            continue
        row = result.first()
        got = None if row is None else str(row[0])
        assert got == expected, f"{where}: {statement!r} gave {got!r}, the docs say {expected!r}"


# ----------------------------------------------------------------------- global state


def _signals() -> list[Signal]:
    modules = (celery.signals, tenant_celery.signals)
    return [v for m in modules for v in vars(m).values() if isinstance(v, Signal)]


@contextlib.contextmanager
def restored_globals(project: Path) -> Iterator[None]:
    """Undo what a page's code does to the process: the current Celery app and
    shared tasks, signal receivers, the tenant id parser, logging, modules
    imported from ``project`` and the environment."""
    state = celery._state
    current, default = state.get_current_app(), state.default_app
    finalizers = set(state._on_app_finalizers)
    receivers = {id(s): (s, list(s.receivers)) for s in _signals()}
    parser = tenant_celery.context._parser
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    environ = dict(os.environ)
    modules = set(sys.modules)
    path = list(sys.path)
    try:
        yield
    finally:
        state._set_current_app(current)
        state.default_app = default
        state._on_app_finalizers.clear()
        state._on_app_finalizers.update(finalizers)
        for signal, saved in receivers.values():
            signal.receivers[:] = saved
            signal.sender_receivers_cache.clear()
        tenant_celery.context.set_tenant_id_parser(parser)
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
        os.environ.clear()
        os.environ.update(environ)
        for name in set(sys.modules) - modules:
            module_file = getattr(sys.modules[name], "__file__", None) or ""
            if module_file.startswith(str(project)):
                del sys.modules[name]
        sys.path[:] = path


# ---------------------------------------------------------------------------- pages


@dataclass
class _Registered:
    kind: str
    contains: str
    handler: Handler
    matched: list[Block] = field(default_factory=list)


class PageRun:
    """Every block of one page, exercised in page order (see the module docs)."""

    def __init__(
        self,
        page: str,
        project: Path,
        *,
        prelude: str = "",
        substitutions: Substitutions | None = None,
        sql: Callable[[], contextlib.AbstractContextManager[sa.Connection]] | None = None,
    ) -> None:
        self.page = page
        self.blocks = page_blocks(page)
        self.project = project
        self.substitutions = substitutions or Substitutions()
        self.shell = Shell(project, self.substitutions)
        #: Opens the connection ``sql`` blocks run on (committed at the end of a block).
        self.sql = sql
        self.namespace: dict[str, Any] = {"__name__": "__docs__"}
        self.prelude = textwrap.dedent(prelude)
        self._registered: list[_Registered] = []
        #: ``(block, how)`` for each block, in the order they ran.
        self.log: list[tuple[Block, str]] = []

    # -- registering

    def on(self, kind: str, contains: str) -> Callable[[Handler], Handler]:
        """Register a handler for the one ``kind`` block whose source contains ``contains``."""

        def register(handler: Handler) -> Handler:
            self._registered.append(_Registered(kind, contains, handler))
            return handler

        return register

    def block(self, kind: str, contains: str) -> Block:
        """The one ``kind`` block of the page whose source contains ``contains``."""
        found = [b for b in self.blocks if b.kind == kind and contains in b.source]
        assert len(found) == 1, f"{self.page}: {len(found)} {kind} blocks contain {contains!r}"
        return found[0]

    # -- default runners

    def source(self, block: Block) -> str:
        """The block's code with the page's substitutions, checked to stay local."""
        code = self.substitutions.apply(block.source)
        assert_local(code, block)
        return code

    def exec(self, block: Block, namespace: dict[str, Any] | None = None) -> None:
        """Execute a python block in the page's namespace (tracebacks name page lines)."""
        code = "\n" * (block.first_code_line - 1) + self.source(block)
        exec(compile(code, str(ROOT / "docs" / block.page), "exec"), namespace or self.namespace)

    def doctest(self, block: Block) -> None:
        """Run a pycon block as a doctest in the page's namespace (ELLIPSIS on)."""
        test = doctest.DocTestParser().get_doctest(
            self.source(block),
            self.namespace,
            block.location,
            str(ROOT / "docs" / block.page),
            block.first_code_line - 1,
        )
        assert test.examples, f"{block}: a pycon block without examples"
        test.globs = self.namespace  # DocTest copies its globals: share the page's instead
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test, out=lambda report: pytest.fail(report, pytrace=False), clear_globs=False)

    def run_sql(self, block: Block) -> None:
        """Run a sql block on the page's connection; compare ``-- value`` results."""
        assert self.sql is not None, f"{block}: the page's test gives no SQL connection"
        with self.sql() as conn:
            run_sql(self.source(block), conn, block)

    def write_file(self, block: Block) -> Path:
        """Write a ``# path.py`` block into the project; return its path."""
        assert block.file_path is not None
        target = self.project / block.file_path
        target.parent.mkdir(parents=True, exist_ok=True)
        for parent in target.relative_to(self.project).parents:
            package = self.project / parent
            if package != self.project and not (package / "__init__.py").exists():
                (package / "__init__.py").write_text("")
        target.write_text(self.source(block))
        return target

    # -- running

    def _handler(self, block: Block) -> tuple[Handler | None, str]:
        mine = [r for r in self._registered if r.kind == block.kind and r.contains in block.source]
        if len(mine) > 1:
            names = ", ".join(r.handler.__name__ for r in mine)
            pytest.fail(f"{block}: {len(mine)} handlers match it: {names}", pytrace=False)
        if mine:
            mine[0].matched.append(block)
            return mine[0].handler, f"handler {mine[0].handler.__name__}"
        if block.kind == "python" and block.file_path is None:
            return self.exec, "executed in the page namespace"
        if block.kind == "pycon":
            return self.doctest, "doctest"
        if block.kind == "console":
            return self.shell.run_block, "console commands"
        if block.kind == "sql" and self.sql is not None:
            return self.run_sql, "SQL on the scratch database"
        return None, ""

    def run(self) -> None:
        """Exercise every block of the page in order; fail on the first that fails."""
        assert self.blocks, f"{self.page} has no code blocks"
        with restored_globals(self.project):
            sys.path.insert(0, str(self.project))
            for block in self.blocks:
                if block.file_path is not None:
                    self.write_file(block)
            if self.prelude:
                exec(compile(self.prelude, f"<prelude of {self.page}>", "exec"), self.namespace)
            engines: weakref.WeakSet[sa.Engine] = weakref.WeakSet()

            def remember(connection: sa.Connection) -> None:
                engines.add(connection.engine)

            sa.event.listen(sa.Engine, "engine_connect", remember)
            try:
                for block in self.blocks:
                    self._run_block(block)
            finally:
                sa.event.remove(sa.Engine, "engine_connect", remember)
                # Whatever the page's code connected with, even engines it let go of.
                close_all_sessions()
                for engine in list(engines):
                    engine.dispose()
        for registered in self._registered:
            assert len(registered.matched) == 1, (
                f"{self.page}: the handler {registered.handler.__name__} for the"
                f" {registered.kind} block containing {registered.contains!r} matched"
                f" {len(registered.matched)} blocks"
            )

    def _run_block(self, block: Block) -> None:
        if block.annotation is not None:
            problem = annotation_problem(block)
            assert problem is None, problem
            self.log.append((block, block.annotation))
            return
        if block.kind == "literalinclude":
            problem = example_problem(block)
            assert problem is None, problem
            self.log.append((block, "included example, tested elsewhere"))
            return
        handler, how = self._handler(block)
        if handler is None:
            pytest.fail(
                f"{block}: nothing exercises this block: register a handler in the page's"
                " test, or annotate it (see tests/docs/__init__.py)",
                pytrace=False,
            )
        handler(block)
        self.log.append((block, how))

    def summary(self) -> str:
        """One line per block: where it is and how it was exercised."""
        return "\n".join(f"{block}: {how}" for block, how in self.log)
