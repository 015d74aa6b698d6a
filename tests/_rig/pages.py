"""Python blocks of a docs page, for integration tests that run a page's code.

A few lines of plain parsing instead of :mod:`tests.docs.blocks` (markdown-it),
so that these tests also run in the compatibility cells, which install the
package's oldest releases and not the docs toolchain.  Only top-level fenced
blocks of three backticks whose info string is ``python`` are read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
_OPEN = re.compile(r"^```python\s*$")
_FILE_COMMENT = re.compile(r"^#\s*(?P<path>[\w./-]+\.py)\s*$")


@dataclass(frozen=True)
class PythonBlock:
    source: str
    first_code_line: int
    """1-based page line of the block's first line of code (for tracebacks)."""

    @property
    def file_path(self) -> str | None:
        """``migrations/versions/x.py`` when the block starts with ``# migrations/...``."""
        match = _FILE_COMMENT.match(self.source.split("\n", 1)[0])
        return match["path"] if match else None


def python_blocks(page: str) -> list[PythonBlock]:
    """The python blocks of ``docs/<page>``, in page order."""
    lines = (DOCS / page).read_text().splitlines()
    blocks: list[PythonBlock] = []
    index = 0
    while index < len(lines):
        if _OPEN.match(lines[index]):
            start = index + 1
            end = start
            while end < len(lines) and lines[end].rstrip() != "```":
                end += 1
            blocks.append(PythonBlock("\n".join(lines[start:end]) + "\n", start + 1))
            index = end
        index += 1
    return blocks
