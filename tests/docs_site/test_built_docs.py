"""The built docs site: text as written, and tables that fit the page.

Every HTML page of the session's build (``docs_html``, ``tests/docs_site/conftest.py``)
is read.

Sphinx's "smart quotes" turn ``--`` into an en dash in prose, so a flag such
as ``--loglevel`` written outside code would be copied from a page as
an en dash and "loglevel", and fail. Every flag the sources name must therefore be code
(``docs/_ext/benchmark_charts.py`` sets those of the benchmark notes as code),
and these tests fail on any flag that became a dash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
DASHES = "\N{EN DASH}\N{EM DASH}"
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")


@dataclass
class Page:
    """One built page: its text inside ``<code>``/``<pre>`` and outside, and the
    tables' cells (a list of rows, each a list of cells, each a list of words)."""

    code: list[str] = field(default_factory=list)
    prose: list[str] = field(default_factory=list)
    tables: list[list[list[list[tuple[str, bool]]]]] = field(default_factory=list)


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self.code_depth = 0
        self.skip_depth = 0  # <script>, <style>, <svg>: not text a reader copies
        self.cell: list[tuple[str, bool]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("code", "pre"):
            self.code_depth += 1
        elif tag in ("script", "style", "svg"):
            self.skip_depth += 1
        elif tag == "table":
            self.page.tables.append([])
        elif tag == "tr" and self.page.tables:
            self.page.tables[-1].append([])
        elif tag in ("td", "th") and self.page.tables and self.page.tables[-1]:
            self.cell = []
            self.page.tables[-1][-1].append(self.cell)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("code", "pre"):
            self.code_depth -= 1
        elif tag in ("script", "style", "svg"):
            self.skip_depth -= 1
        elif tag in ("td", "th"):
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        (self.page.code if self.code_depth else self.page.prose).append(data)
        if self.cell is not None:
            self.cell.extend((word, self.code_depth > 0) for word in data.split())


def read_page(path: Path) -> Page:
    reader = _Reader()
    reader.feed(path.read_text(encoding="utf-8"))
    reader.close()
    return reader.page


@pytest.fixture(scope="module")
def site(docs_html: Path) -> dict[str, Page]:
    """Every page of the build of ``docs/`` (``docs_html``), by path relative to the site."""
    html = docs_html
    pages = {
        str(path.relative_to(html)): read_page(path)
        for path in sorted(html.rglob("*.html"))
        if "_sources" not in path.parts
    }
    assert "explanation/performance.html" in pages
    return pages


def flags_in_sources() -> set[str]:
    """Every ``--flag`` written in the docs' sources (and the benchmark results the
    Performance page is built from)."""
    sources = [p for p in DOCS.rglob("*.md") if "_build" not in p.parts]
    sources.append(ROOT / "benchmarks" / "results" / "latest.md")
    found: set[str] = set()
    for path in sources:
        found.update(FLAG.findall(path.read_text(encoding="utf-8")))
    return found


def test_code_has_no_dash_where_a_double_hyphen_was(site: dict[str, Page]) -> None:
    dashed = re.compile(f"[{DASHES}][a-z]")
    problems = [
        f"{name}: {match.group()!r} in {text.strip()[:80]!r}"
        for name, page in site.items()
        for text in page.code
        for match in dashed.finditer(text)
    ]
    assert not problems, "\n".join(problems)


def test_no_flag_of_the_sources_became_a_dash(site: dict[str, Page]) -> None:
    flags = flags_in_sources()
    assert {"loglevel", "prefetch-multiplier"} <= flags
    pattern = re.compile(f"[{DASHES}]({'|'.join(map(re.escape, sorted(flags)))})\\b")
    problems = [
        f"{name}: {match.group()!r}"
        for name, page in site.items()
        for text in (*page.prose, *page.code)
        for match in pattern.finditer(text)
    ]
    assert not problems, "\n".join(problems)


def test_flags_of_generated_notes_are_code(site: dict[str, Page]) -> None:
    """The checks above must bite: smart quotes are on (typographic dashes and quotes
    in prose), and the flags the benchmark notes name in plain text are set as code
    by the docs' extension, where they keep both hyphens."""
    page = site["explanation/performance.html"]
    code = " ".join(page.code)
    assert "--prefetch-multiplier" in code
    assert "--loglevel=INFO" in code
    assert "\N{EN DASH}" in " ".join(site["reference/api.html"].prose)  # "Name <en dash> what"


# -------------------------------------------------------------------------- tables

#: furo's content column: ``.content`` is 46em wide with 3em of padding each side,
#: at the theme's root font size of 110% (17.6 px).
EM = 17.6
COLUMN = 40 * EM
#: The narrowest a column can be is its longest word, plus the cell's padding and
#: its paragraph's margins (0.25rem each, both sides). Glyph widths are estimates:
#: 0.56 em for the sans-serif text, 0.6 em for monospace at 81.25%.
CELL_PADDING = 1.0 * EM
TEXT_GLYPH = 0.56 * EM
CODE_GLYPH = 0.6 * 0.8125 * EM

PAGES_WITH_NARROW_TABLES = (
    "explanation/performance.html",
    "explanation/postgres-transport.html",
    "howto/postgres-broker.html",
)


def narrowest_width(table: list[list[list[tuple[str, bool]]]]) -> float:
    """The width below which ``table`` cannot wrap (its min-content width), in px."""
    widest: dict[int, float] = {}
    for row in table:
        for n, cell in enumerate(row):
            longest = max(
                (len(word) * (CODE_GLYPH if code else TEXT_GLYPH) for word, code in cell),
                default=0.0,
            )
            widest[n] = max(widest.get(n, 0.0), longest)
    return sum(widest.values()) + CELL_PADDING * len(widest)


@pytest.mark.parametrize("name", PAGES_WITH_NARROW_TABLES)
def test_tables_fit_the_content_column(site: dict[str, Page], name: str) -> None:
    page = site[name]
    too_wide = [
        f"table {n + 1} ({' | '.join(w for w, _ in table[0][0][:4])} ...): "
        f"{narrowest_width(table):.0f} px"
        for n, table in enumerate(page.tables)
        if table and narrowest_width(table) > COLUMN
    ]
    assert not too_wide, f"wider than furo's {COLUMN:.0f} px column:\n" + "\n".join(too_wide)
