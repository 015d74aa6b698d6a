"""The internal link check run on the built docs site in CI (``docs/check_links.py``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "check_links.py"


@pytest.fixture(scope="module")
def check_links() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_links", _SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _site(root: Path, pages: dict[str, str]) -> Path:
    for name, body in pages.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<html><body>{body}</body></html>", encoding="utf-8")
    return root


def test_a_sound_site_passes(tmp_path: Path, check_links: ModuleType) -> None:
    site = _site(
        tmp_path,
        {
            "index.html": '<a href="howto/rls.html#policy">p</a> <a href="#top">t</a>'
            '<span id="top"></span><a href="https://example.org/x">e</a>'
            '<img src="_static/logo.png">',
            "howto/rls.html": '<h2 id="policy">Policy</h2><a href="../index.html">up</a>',
            "_static/logo.png": "",
        },
    )
    broken, internal, external = check_links.broken_links(site)
    assert broken == []
    assert (internal, external) == (4, 1)
    assert check_links.main([str(site)]) == 0


def test_missing_pages_anchors_and_escapes_are_reported(
    tmp_path: Path, check_links: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site(
        tmp_path / "html",
        {
            "index.html": '<a href="gone.html">a</a> <a href="howto/rls.html#nope">b</a>'
            '<a href="../../etc/passwd">c</a>',
            "howto/rls.html": '<h2 id="policy">Policy</h2>',
        },
    )
    broken, _, _ = check_links.broken_links(site)
    assert [(b.target, b.reason) for b in broken] == [
        ("gone.html", "no such file"),
        ("howto/rls.html#nope", "no anchor 'nope'"),
        ("../../etc/passwd", "points outside the site"),
    ]
    assert check_links.main([str(site)]) == 1
    assert "index.html: gone.html (no such file)" in capsys.readouterr().err


def test_an_unbuilt_site_is_an_error(tmp_path: Path, check_links: ModuleType) -> None:
    assert check_links.main([str(tmp_path)]) == 2
