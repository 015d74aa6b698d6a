"""Check every internal link of the built HTML docs site.

Usage::

    python docs/check_links.py docs/_build/html

Reads every ``.html`` file under the build directory and checks each ``href``
and ``src`` that points inside the site: the file it names must exist and,
when the link has a ``#fragment``, that file must have an element with that
``id`` (or an ``<a name=...>``). Links with a scheme (``https:``,
``mailto:``...) are counted, not fetched. Exits 1 listing every broken link,
0 when there are none.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Sphinx writes these pages itself; their links are generated, not authored.
_SKIPPED_PAGES = frozenset({"genindex.html", "search.html", "py-modindex.html"})


@dataclass
class _Page:
    anchors: set[str] = field(default_factory=set)
    links: list[str] = field(default_factory=list)


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = _Page()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("id",) if tag != "a" else ("id", "name"):
            if values.get(name):
                self.page.anchors.add(str(values[name]))
        for name in ("href", "src"):
            target = values.get(name)
            if target and not (tag == "link" and values.get("rel") == "canonical"):
                self.page.links.append(target)


def _parse(path: Path) -> _Page:
    parser = _PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.page


@dataclass(frozen=True)
class BrokenLink:
    """One link that leads nowhere."""

    page: str
    target: str
    reason: str

    def __str__(self) -> str:
        return f"{self.page}: {self.target} ({self.reason})"


def broken_links(root: Path) -> tuple[list[BrokenLink], int, int]:
    """Return ``(broken, internal_checked, external_seen)`` for the site at *root*."""
    pages: dict[Path, _Page] = {}

    def page(path: Path) -> _Page:
        if path not in pages:
            pages[path] = _parse(path)
        return pages[path]

    broken: list[BrokenLink] = []
    internal = external = 0
    for html in sorted(root.rglob("*.html")):
        rel = html.relative_to(root).as_posix()
        if rel in _SKIPPED_PAGES or rel.startswith("_"):
            continue
        for target in page(html).links:
            parts = urlsplit(target)
            if parts.scheme or parts.netloc:
                external += 1
                continue
            internal += 1
            destination = html if not parts.path else (html.parent / unquote(parts.path))
            destination = destination.resolve()
            if destination.is_dir():
                destination = destination / "index.html"
            if root.resolve() not in (destination, *destination.parents):
                broken.append(BrokenLink(rel, target, "points outside the site"))
                continue
            if not destination.is_file():
                broken.append(BrokenLink(rel, target, "no such file"))
                continue
            fragment = unquote(parts.fragment)
            if (
                fragment
                and destination.suffix == ".html"
                and fragment not in page(destination).anchors
            ):
                broken.append(BrokenLink(rel, target, f"no anchor {fragment!r}"))
    return broken, internal, external


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_dir", type=Path, help="the HTML build directory")
    args = parser.parse_args(list(argv) if argv is not None else None)
    root: Path = args.build_dir
    if not (root / "index.html").is_file():
        print(f"{root} has no index.html: build the docs first", file=sys.stderr)
        return 2
    broken, internal, external = broken_links(root)
    for link in broken:
        print(f"broken: {link}", file=sys.stderr)
    print(
        f"{internal} internal links checked, {len(broken)} broken; "
        f"{external} external links not fetched"
    )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
