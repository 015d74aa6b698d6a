"""Every block of every tutorial and how-to page is exercised (see ``tests/docs``)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from tests.docs.blocks import page_blocks, pages
from tests.docs.checks import annotation_problem, example_problem, pip_install_problems

HERE = Path(__file__).resolve().parent


@cache
def page_tests() -> dict[str, Path]:
    """Page -> the test module here that runs it (``PAGE = ...`` and a ``PageRun``)."""
    found: dict[str, Path] = {}
    for path in sorted(HERE.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["PAGE"]
                and isinstance(node.value, ast.Constant)
            ):
                calls = {
                    getattr(n.func, "id", getattr(n.func, "attr", None))
                    for n in ast.walk(tree)
                    if isinstance(n, ast.Call)
                }
                if {"PageRun", "run"} <= calls:
                    found[str(node.value.value)] = path
    return found


@pytest.mark.parametrize("page", pages())
def test_every_block_is_exercised(page: str) -> None:
    blocks = page_blocks(page)
    tested_by = page_tests().get(page)
    problems: list[str] = []
    for block in blocks:
        problems.extend(pip_install_problems(block))
        if block.annotation is not None:
            problem = annotation_problem(block)
        elif block.kind == "literalinclude":
            problem = example_problem(block)
        elif tested_by is None:
            problem = (
                f"{block}: nothing exercises this block: no test in tests/docs runs {page}"
                " (see tests/docs/__init__.py)"
            )
        else:
            problem = None
        if problem is not None:
            problems.append(problem)
    assert not problems, "\n".join(problems)


def test_pages_are_found() -> None:
    found = pages()
    assert {"tutorial/quickstart.md", "howto/rls.md"} <= set(found)
    assert all(page_blocks(page) for page in page_tests())


def test_every_page_test_names_a_page() -> None:
    assert set(page_tests()) <= set(pages())
    modules = set(HERE.glob("test_*.py")) - {Path(__file__)}
    helpers = {HERE / "test_blocks.py"}
    assert modules - helpers == set(page_tests().values()), "a page test without PAGE/PageRun"
