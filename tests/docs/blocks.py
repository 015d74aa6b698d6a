"""Find every code block of a documentation page, the way MyST will render it.

The page is parsed with MyST's own Markdown parser (markdown-it-py with the
extensions ``docs/conf.py`` enables), so a block is found wherever Sphinx
would render one: ````` and ``~~~`` fences, fences nested in lists, block
quotes and admonitions (backtick or ``:::`` fences), the ``{code-block}``,
``{code}`` and ``{code-cell}`` directives, ``{literalinclude}``, indented code,
and reStructuredText code inside ``{eval-rst}``.

An annotation is an HTML comment on the last non-blank line before a block::

    <!-- docs-test: exercised by tests/acceptance/test_x.py::test_y -->

It says that the named test, not the page's harness test, exercises the block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from myst_parser.config.main import MdParserConfig
from myst_parser.parsers.mdit import create_md_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
#: The pages whose every code block must be exercised by a test.
PAGE_GLOBS = ("tutorial/*.md", "howto/*.md")

ANNOTATION = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<text>.*?)\s*-->\s*$")
EXERCISED_BY = re.compile(r"^exercised by (?P<file>tests/\S+\.py)::(?P<test>[A-Za-z_]\w*)$")
FILE_COMMENT = re.compile(r"^# (?P<path>[\w./-]+\.py)\s*$")

# Directives whose body is a code block, and those whose body is Markdown again.
_CODE_DIRECTIVES = {"code-block", "code", "code-cell", "sourcecode"}
_NESTED_DIRECTIVES = {
    "admonition", "attention", "caution", "danger", "dropdown", "error", "hint",
    "important", "note", "seealso", "tip", "todo", "topic", "versionadded",
    "versionchanged", "deprecated", "warning", "sidebar", "card", "tab-item", "tab-set",
}  # fmt: skip
_RST_CODE = re.compile(r"^\s*\.\. (code-block|code|sourcecode|literalinclude)::|::\s*$", re.M)
_DIRECTIVE = re.compile(r"^\{(?P<name>[\w-]+)\}\s*(?P<argument>.*)$")


@dataclass(frozen=True)
class Block:
    """One code block of a page."""

    #: The page, relative to ``docs/`` (``"howto/rls.md"``).
    page: str
    #: 1-based line of the opening fence in the page.
    line: int
    #: The language (``python``, ``console``, ...), ``literalinclude``, ``eval-rst``,
    #: or ``indented`` for indented code.
    kind: str
    #: The directive's argument (the included path), else ``""``.
    argument: str
    #: The code, dedented, without the directive's options.
    source: str
    #: The text of a ``docs-test`` annotation before the block, if any.
    annotation: str | None = None

    @property
    def location(self) -> str:
        """``docs/howto/rls.md:22``: where a reader finds the block."""
        return f"docs/{self.page}:{self.line}"

    @property
    def first_code_line(self) -> int:
        """1-based page line of the first line of :attr:`source` (for tracebacks)."""
        return self.line + 1

    @property
    def file_path(self) -> str | None:
        """``shop/tenancy.py`` when a python block starts with ``# shop/tenancy.py``."""
        if self.kind != "python":
            return None
        first = self.source.split("\n", 1)[0]
        match = FILE_COMMENT.match(first)
        return match["path"] if match else None

    @property
    def included(self) -> Path | None:
        """The file a ``{literalinclude}`` shows, resolved against the page."""
        if self.kind != "literalinclude":
            return None
        return ((DOCS / self.page).parent / self.argument).resolve()

    def __str__(self) -> str:
        return f"{self.location} ({self.kind})"


@cache
def _parser() -> MarkdownIt:
    config = MdParserConfig(enable_extensions={"colon_fence", "deflist"})
    return create_md_parser(config, RendererHTML)


def pages() -> list[str]:
    """Every page whose blocks must be exercised, relative to ``docs/``."""
    found = {path for pattern in PAGE_GLOBS for path in DOCS.glob(pattern)}
    return sorted(path.relative_to(DOCS).as_posix() for path in found)


def page_blocks(page: str) -> list[Block]:
    """The code blocks of ``docs/<page>``, in page order."""
    return parse(page, (DOCS / page).read_text())


def parse(page: str, text: str, first_line: int = 1) -> list[Block]:
    """The code blocks of Markdown ``text``, numbering lines from ``first_line``."""
    lines = text.split("\n")
    found: list[Block] = []
    for token in _parser().parse(text):
        if token.map is None:
            continue
        start = token.map[0]
        line = first_line + start
        annotation = _annotation(lines, start)
        if token.type == "code_block":
            found.append(Block(page, line, "indented", "", token.content, annotation))
        elif token.type in {"fence", "colon_fence"}:
            found.extend(_fence(page, line, token.info.strip(), token.content, annotation))
    return found


def _fence(page: str, line: int, info: str, content: str, annotation: str | None) -> list[Block]:
    directive = _DIRECTIVE.match(info)
    if directive is None:
        language = info.split(maxsplit=1)[0] if info else "text"
        return [Block(page, line, language, "", content, annotation)]
    name, argument = directive["name"], directive["argument"].strip()
    body_offset, body = _directive_body(content)
    if name in _CODE_DIRECTIVES:
        language = argument.split()[0] if argument else "text"
        return [Block(page, line, language, "", body, annotation)]
    if name == "literalinclude":
        return [Block(page, line, "literalinclude", argument, content, annotation)]
    if name == "eval-rst":
        if _RST_CODE.search(content):
            return [Block(page, line, "eval-rst", "", content, annotation)]
        return []
    if name in _NESTED_DIRECTIVES:
        return parse(page, body, line + 1 + body_offset)
    return []


def _directive_body(content: str) -> tuple[int, str]:
    """Skip a directive's ``:option:`` lines or ``---`` front matter: (line offset, body)."""
    lines = content.split("\n")
    index = 0
    if lines and lines[0].strip() == "---":
        index = 1
        while index < len(lines) and lines[index].strip() != "---":
            index += 1
        index += 1
    else:
        while index < len(lines) and re.match(r"^:[\w-]+:", lines[index]):
            index += 1
    while index < len(lines) and not lines[index].strip():
        index += 1
    return index, "\n".join(lines[index:])


def _annotation(lines: list[str], start: int) -> str | None:
    index = start - 1
    while index >= 0 and not lines[index].strip():
        index -= 1
    if index < 0:
        return None
    match = ANNOTATION.match(lines[index])
    return match["text"] if match else None


def exercised_by(annotation: str) -> tuple[str, str]:
    """``(test file, test name)`` of an ``exercised by tests/x.py::test_y`` annotation.

    Raises:
        ValueError: the annotation is not of that form.
    """
    match = EXERCISED_BY.match(annotation)
    if match is None:
        raise ValueError(
            f"docs-test annotation {annotation!r}: expected "
            "'exercised by tests/<path>.py::<test name>'"
        )
    return match["file"], match["test"]
