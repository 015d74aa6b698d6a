"""Static checks on blocks that the page's own test does not run.

* an annotated block names a test that must exist;
* a ``{literalinclude}`` of a file under ``examples/`` counts as exercised only
  when some test under ``tests/`` names that file (or its directory);
* every ``pip install 'tenant-celery[...]'`` names extras the package declares.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from importlib import metadata
from pathlib import Path

from tests.docs.blocks import ROOT, Block, exercised_by

TESTS = ROOT / "tests"
EXAMPLES = ROOT / "examples"
PIP_INSTALL = re.compile(r"pip install\s+['\"]?tenant-celery(?:\[(?P<extras>[^\]]*)\])?")


def defined_tests(path: Path) -> set[str]:
    """Names of the tests a test file defines at module level (functions and classes)."""
    tree = ast.parse(path.read_text(), str(path))
    return {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.name.lower().startswith("test")
    }


def annotation_problem(block: Block) -> str | None:
    """Why ``block``'s annotation does not hold, or ``None`` when it does."""
    assert block.annotation is not None
    try:
        file, test = exercised_by(block.annotation)
    except ValueError as exc:
        return f"{block}: {exc}"
    path = ROOT / file
    if not path.is_file():
        return f"{block}: annotation names {file}, which does not exist"
    if test not in defined_tests(path):
        return f"{block}: annotation names {file}::{test}, which that file does not define"
    return None


@cache
def _test_sources() -> tuple[str, ...]:
    return tuple(path.read_text() for path in sorted(TESTS.rglob("*.py")))


def _path_pattern(relative: Path) -> re.Pattern[str]:
    """``examples/quickstart/shop.py`` written with slashes or as ``"a" / "b"`` joins."""
    separator = r"""(?:/|["']\s*/\s*["'])"""
    return re.compile(separator.join(re.escape(part) for part in relative.parts))


def example_problem(block: Block) -> str | None:
    """Why a ``{literalinclude}`` block is not exercised, or ``None`` when it is.

    It is when a test file under ``tests/`` names the included file or one of its
    directories below ``examples/`` (``examples/shop/app.py``, ``examples/shop``).
    """
    included = block.included
    assert included is not None
    if not included.is_file():
        return f"{block}: includes {block.argument}, which does not exist"
    try:
        relative = included.relative_to(ROOT)
    except ValueError:
        return f"{block}: includes {included}, outside the repository"
    if not included.is_relative_to(EXAMPLES):
        return (
            f"{block}: includes {relative}, which is not under examples/: "
            "exercise it in the page's test or annotate the block"
        )
    # The file, or a directory of it below examples/ (a test running the whole example).
    candidates = [relative, *relative.parents[:-2]]
    patterns = [_path_pattern(path) for path in candidates]
    for source in _test_sources():
        if any(pattern.search(source) for pattern in patterns):
            return None
    return f"{block}: no test under tests/ names {relative} (or its directory)"


@cache
def declared_extras() -> frozenset[str]:
    """The optional-dependency groups ``pyproject.toml`` declares."""
    try:
        import tomllib  # noqa: PLC0415  (Python 3.11+)
    except ModuleNotFoundError:  # Python 3.10: the installed package's metadata
        return frozenset(metadata.metadata("tenant-celery").get_all("Provides-Extra") or ())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return frozenset(project.get("optional-dependencies", {}))


def pip_install_problems(block: Block) -> list[str]:
    """Extras named by ``pip install 'tenant-celery[...]'`` lines that do not exist."""
    problems = []
    for match in PIP_INSTALL.finditer(block.source):
        extras = {extra.strip() for extra in (match["extras"] or "").split(",") if extra.strip()}
        unknown = sorted(extras - declared_extras())
        if unknown:
            problems.append(f"{block}: pip install names unknown extras {unknown}")
    return problems
