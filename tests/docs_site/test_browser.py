"""What a reader of the built docs sees, checked in headless Chromium.

Four pages (the landing page, the quickstart, the Performance page and the API
reference), each at a laptop width and at a narrow one:

- every chart on the Performance page is drawn: displayed, not zero-sized, an
  ``<img>`` loaded (``naturalWidth > 0``), an inline ``<svg>`` with something
  inside it; it fits the column, and no label of an inline chart runs past the
  chart's edge (where the SVG clips it);
- no table in the article is wider than the room it has: a table that needs its
  scroll container to scroll sideways counts as too wide;
- no en or em dash directly before a lowercase letter (an en dash and "loglevel"
  where ``--loglevel`` was written): a command-line flag whose two hyphens the
  typography turned into one dash;
- every link into the site leads to a page the server returns (200) and, with a
  ``#fragment``, to an element with that id there;
- the browser console reports no error.

The pages are served over HTTP from 127.0.0.1 (see ``conftest.py``); CI runs these
tests against the build its docs step made (``.ci/run``).
"""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import partial
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urldefrag

import pytest

from tests._rig.env import unavailable

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

pytestmark = pytest.mark.browser

PAGES = [
    "index.html",
    "tutorial/quickstart.html",
    "explanation/performance.html",
    "reference/api.html",
]
PERFORMANCE = "explanation/performance.html"


@dataclass(frozen=True)
class Viewport:
    name: str
    width: int
    height: int


LAPTOP = Viewport("laptop", 1280, 900)
#: Narrower than furo's breakpoints for the table of contents and the navigation,
#: which both move into drawers: the article gets (nearly) the whole width.
NARROW = Viewport("narrow", 800, 900)
VIEWPORTS = [LAPTOP, NARROW]

#: Slack for sub-pixel layout.
TOLERANCE_PX = 1

# --------------------------------------------------------------------- page access


def open_page(
    driver: WebDriver,
    base_url: str,
    page: str,
    viewport: Viewport,
    screenshot_dir: Path | None = None,
) -> None:
    """Load *page* at *viewport*, wait for it to finish loading, maybe screenshot it."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {
            "width": viewport.width,
            "height": viewport.height,
            "deviceScaleFactor": 1,
            "mobile": False,
        },
    )
    driver.get(base_url + page)
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )
    width = driver.execute_script("return window.innerWidth")
    assert width == viewport.width, f"viewport is {width}px wide, not {viewport.width}px"
    if screenshot_dir is not None:
        save_full_page(driver, screenshot_dir / f"{page.replace('/', '_')}-{viewport.name}.png")


def save_full_page(driver: WebDriver, path: Path) -> None:
    """Save a PNG of the whole page, not only the part in the viewport."""
    import base64  # noqa: PLC0415

    height = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"]
    # Captured beyond the viewport the page is laid out without a scrollbar, across
    # the viewport's whole width (the content size leaves the scrollbar's out).
    width = driver.execute_script("return window.innerWidth")
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def script(driver: WebDriver, source: str, *args: Any) -> Any:
    return driver.execute_script(source, *args)


# The article's content box: furo's <article role="main">.
_ARTICLE_JS = """
const article = document.querySelector('article[role="main"]');
if (!article) { return null; }
const style = getComputedStyle(article);
const box = article.getBoundingClientRect();
const left = box.left + parseFloat(style.paddingLeft) + parseFloat(style.borderLeftWidth);
const width = article.clientWidth - parseFloat(style.paddingLeft)
    - parseFloat(style.paddingRight);
"""

# nearestHeading(el): the text of the last heading before *el* in the article.
_HEADING_JS = """
function nearestHeading(el) {
    let found = null;
    for (const h of document.querySelectorAll('article[role="main"] :is(h1, h2, h3, h4, h5, h6)')) {
        if (!(h.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_FOLLOWING)) { break; }
        found = h;
    }
    return found ? found.textContent.replace('\u00b6', '').replace(/\\s+/g, ' ').trim() : '';
}
"""


def describe(driver: WebDriver, element: WebElement) -> str:
    """A short description of *element* for a failure message."""
    return str(
        script(
            driver,
            _HEADING_JS
            + """
            const el = arguments[0];
            const tag = el.tagName.toLowerCase();
            const src = el.getAttribute('src') || el.getAttribute('data') || '';
            let label = el.getAttribute('aria-label') || el.getAttribute('alt') || '';
            const title = el.querySelector && el.querySelector('title');
            if (!label && title) { label = title.textContent; }
            const heading = nearestHeading(el);
            return `<${tag}${src ? ' src=' + src : ''}>` + (label ? ` "${label.trim()}"` : '')
                + (heading ? ` under "${heading}"` : '');
            """,
            element,
        )
    )


# --------------------------------------------------------------------------- charts

# Charts inside the article: inline <svg> (outermost only), every <img> (the build
# writes the charts as SVG files; any other image must render too) and SVG <object>s.
_CHARTS_JS = """
const article = document.querySelector('article[role="main"]');
if (!article) { return []; }
return Array.from(article.querySelectorAll('svg, img, object')).filter((el) => {
    const tag = el.tagName.toLowerCase();
    if (tag === 'svg') { return !el.parentElement.closest('svg'); }
    if (tag === 'object') {
        return el.type === 'image/svg+xml' || /\\.svg([?#]|$)/i.test(el.data || '');
    }
    return true;
});
"""

_CHART_STATE_JS = """
const el = arguments[0];
const tag = el.tagName.toLowerCase();
const box = el.getBoundingClientRect();
const style = getComputedStyle(el);
const state = {
    tag: tag,
    width: box.width,
    height: box.height,
    visible: style.visibility !== 'hidden' && style.display !== 'none'
        && parseFloat(style.opacity) > 0,
};
if (tag === 'img') {
    state.complete = el.complete;
    state.naturalWidth = el.naturalWidth;
    state.naturalHeight = el.naturalHeight;
}
if (tag === 'svg') {
    const drawn = el.getBBox();
    state.drawnWidth = drawn.width;
    state.drawnHeight = drawn.height;
}
return state;
"""


def _image_loaded(driver: WebDriver, image: WebElement) -> bool:
    return bool(
        driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", image
        )
    )


def charts(driver: WebDriver) -> list[WebElement]:
    return list(script(driver, _CHARTS_JS))


@pytest.mark.parametrize("viewport", VIEWPORTS, ids=lambda v: v.name)
def test_performance_charts_are_drawn(
    browser: WebDriver, docs_server: str, viewport: Viewport, screenshot_dir: Path | None
) -> None:
    open_page(browser, docs_server, PERFORMANCE, viewport, screenshot_dir)
    found = charts(browser)
    assert found, (
        f"{PERFORMANCE}: no chart in the article (looked for inline <svg>, <img> and "
        "SVG <object> elements)"
    )
    from selenium.common.exceptions import TimeoutException  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    problems = []
    for chart in found:
        # Scrolled to, as a reader would: a lazily loaded image loads only then.
        script(browser, "arguments[0].scrollIntoView({block: 'center'});", chart)
        if chart.tag_name.lower() == "img":
            # A timeout is reported below, with the image's state.
            with contextlib.suppress(TimeoutException):
                WebDriverWait(browser, 10).until(partial(_image_loaded, image=chart))
        state = script(browser, _CHART_STATE_JS, chart)
        what = describe(browser, chart)
        if not chart.is_displayed() or not state["visible"]:
            problems.append(f"{what}: not displayed")
        if state["width"] <= 0 or state["height"] <= 0:
            problems.append(f"{what}: drawn {state['width']}x{state['height']} px")
        if state["tag"] == "img" and not (state["complete"] and state["naturalWidth"] > 0):
            problems.append(
                f"{what}: image did not load (complete={state['complete']}, "
                f"naturalWidth={state['naturalWidth']})"
            )
        if state["tag"] == "svg" and (state["drawnWidth"] <= 0 or state["drawnHeight"] <= 0):
            problems.append(f"{what}: the <svg> draws nothing (its content's box is empty)")
    assert not problems, f"{PERFORMANCE} at {viewport.width}px:\n" + "\n".join(problems)


@pytest.mark.parametrize("viewport", VIEWPORTS, ids=lambda v: v.name)
def test_performance_charts_fit_the_column(
    browser: WebDriver, docs_server: str, viewport: Viewport
) -> None:
    open_page(browser, docs_server, PERFORMANCE, viewport)
    found = charts(browser)
    assert found, f"{PERFORMANCE}: no chart in the article"
    problems = []
    for chart in found:
        room, left, box_left, box_width = script(
            browser,
            _ARTICLE_JS
            + """
            const box2 = arguments[0].getBoundingClientRect();
            return [width, left, box2.left, box2.width];
            """,
            chart,
        )
        if box_width > room + TOLERANCE_PX or box_left < left - TOLERANCE_PX:
            problems.append(
                f"{describe(browser, chart)}: {box_width:.0f}px wide from x={box_left:.0f}, "
                f"the column {room:.0f}px from x={left:.0f}"
            )
        elif box_left + box_width > left + room + TOLERANCE_PX:
            problems.append(
                f"{describe(browser, chart)}: its right edge at x={box_left + box_width:.0f} "
                f"is past the column's at x={left + room:.0f}"
            )
    assert not problems, f"{PERFORMANCE} at {viewport.width}px:\n" + "\n".join(problems)


# Text of an inline SVG chart drawn (partly) outside the chart's box, which clips it.
_CLIPPED_LABELS_JS = """
const svg = arguments[0];
const box = svg.getBoundingClientRect();
const out = [];
for (const text of svg.querySelectorAll('text')) {
    const r = text.getBoundingClientRect();
    if (!text.textContent.trim() || (r.width === 0 && r.height === 0)) { continue; }
    const over = Math.max(box.left - r.left, r.right - box.right,
                          box.top - r.top, r.bottom - box.bottom);
    if (over > arguments[1]) {
        out.push({text: text.textContent.trim(), over: over});
    }
}
return out;
"""


@pytest.mark.parametrize("viewport", VIEWPORTS, ids=lambda v: v.name)
def test_performance_chart_labels_are_not_cut_off(
    browser: WebDriver, docs_server: str, viewport: Viewport
) -> None:
    open_page(browser, docs_server, PERFORMANCE, viewport)
    # Only inline charts: an <img>'s text is out of reach. No chart at all is
    # test_performance_charts_are_drawn's failure, not this one's.
    found = [c for c in charts(browser) if c.tag_name.lower() == "svg"]
    problems = [
        f"{describe(browser, chart)}: {label['text']!r} runs {label['over']:.0f}px "
        "past the chart's edge"
        for chart in found
        for label in script(browser, _CLIPPED_LABELS_JS, chart, TOLERANCE_PX)
    ]
    assert not problems, f"{PERFORMANCE} at {viewport.width}px, labels cut off:\n" + "\n".join(
        problems
    )


# --------------------------------------------------------------------------- tables

# For every table in the article: how wide it needs to be and how much room it has.
# Furo wraps tables in a scroll container (div.table-wrapper); a table that makes it
# scroll sideways is too wide, so the room is the narrower of the container's inner
# width and the article's content width.
_TABLES_JS = (
    _ARTICLE_JS
    + _HEADING_JS
    + """
return Array.from(article.querySelectorAll('table'), (table, index) => {
    const wrapper = table.closest('.table-wrapper');
    const container = wrapper && article.contains(wrapper) ? wrapper : table.parentElement;
    const style = getComputedStyle(container);
    const inner = container.clientWidth - parseFloat(style.paddingLeft)
        - parseFloat(style.paddingRight);
    const header = table.querySelector('thead tr, tr');
    // The table's caption, else the paragraph right before it (often its title).
    const caption = table.querySelector('caption');
    const before = (wrapper || table).previousElementSibling;
    const title = caption ? caption.innerText
        : before && before.tagName === 'P' ? before.innerText : '';
    return {
        index: index,
        heading: nearestHeading(table),
        title: title.replace(/\\s+/g, ' ').trim().slice(0, 80),
        header: header ? header.innerText.replace(/\\s+/g, ' ').trim().slice(0, 80) : '',
        need: Math.max(table.scrollWidth, table.getBoundingClientRect().width),
        room: Math.min(inner, width),
        scrolls: container.scrollWidth > container.clientWidth + 1,
    };
});
"""
)


@pytest.mark.parametrize("viewport", VIEWPORTS, ids=lambda v: v.name)
@pytest.mark.parametrize("page", PAGES)
def test_tables_fit_their_column(
    browser: WebDriver,
    docs_server: str,
    page: str,
    viewport: Viewport,
    screenshot_dir: Path | None,
) -> None:
    open_page(browser, docs_server, page, viewport, screenshot_dir)
    tables = script(browser, _TABLES_JS)
    assert tables is not None, f"{page}: no <article role=main>"
    too_wide = [
        f"table {t['index'] + 1} under {t['heading']!r}"
        + (f", after {t['title']!r}" if t["title"] else "")
        + f" (columns: {t['header']}): needs "
        f"{t['need']:.0f}px, has {t['room']:.0f}px" + (", scrolls sideways" if t["scrolls"] else "")
        for t in tables
        if t["need"] > t["room"] + TOLERANCE_PX or t["scrolls"]
    ]
    assert not too_wide, f"{page} at {viewport.width}px, tables too wide:\n" + "\n".join(too_wide)


# ---------------------------------------------------------------------------- text

# Every text node of the page with an en or em dash right before a lowercase letter.
_DASHED_FLAGS_JS = """
const found = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
const pattern = /[\\u2013\\u2014][a-z]/g;
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (parent && parent.closest('script, style, template')) { continue; }
    for (const match of node.data.matchAll(pattern)) {
        const start = Math.max(0, match.index - 30);
        found.push({
            parent: parent ? parent.tagName.toLowerCase() : '',
            text: node.data.slice(start, match.index + 30).replace(/\\s+/g, ' '),
        });
    }
}
return found;
"""


@pytest.mark.parametrize("page", PAGES)
def test_flags_keep_their_two_hyphens(browser: WebDriver, docs_server: str, page: str) -> None:
    open_page(browser, docs_server, page, LAPTOP)
    found = script(browser, _DASHED_FLAGS_JS)
    assert not found, f"{page}: a dash where a flag's two hyphens belong:\n" + "\n".join(
        f"  in <{f['parent']}>: ...{f['text']}..." for f in found
    )


# --------------------------------------------------------------------------- links


class _IdParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and (name == "id" or (tag == "a" and name == "name")):
                self.ids.add(value)


@dataclass(frozen=True)
class _Fetched:
    status: int
    ids: frozenset[str]
    error: str = ""


_FETCHED: dict[str, _Fetched] = {}


def fetch(url: str) -> _Fetched:
    """GET *url* from the local server (once per session) and the ids of its HTML."""
    if url not in _FETCHED:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read()
                status = response.status
                html = "html" in response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            exc.close()
            _FETCHED[url] = _Fetched(exc.code, frozenset(), str(exc.reason))
            return _FETCHED[url]
        except OSError as exc:
            _FETCHED[url] = _Fetched(0, frozenset(), str(exc))
            return _FETCHED[url]
        ids: frozenset[str] = frozenset()
        if html:
            parser = _IdParser()
            parser.feed(body.decode("utf-8", errors="replace"))
            parser.close()
            ids = frozenset(parser.ids)
        _FETCHED[url] = _Fetched(status, ids)
    return _FETCHED[url]


@pytest.mark.parametrize("page", PAGES)
def test_internal_links_resolve(browser: WebDriver, docs_server: str, page: str) -> None:
    open_page(browser, docs_server, page, LAPTOP)
    # a.href is the resolved, absolute URL; only those on the local server are the site's.
    hrefs = script(browser, "return Array.from(document.querySelectorAll('a[href]'), a => a.href)")
    internal = sorted({h for h in hrefs if h.startswith(docs_server)})
    assert internal, f"{page}: no internal link at all"
    broken = []
    for href in internal:
        url, fragment = urldefrag(href)
        target = fetch(url)
        shown = href.removeprefix(docs_server)
        if target.status != 200:
            broken.append(f"{shown}: HTTP {target.status} {target.error}".rstrip())
        elif fragment and unquote(fragment) not in target.ids:
            broken.append(f"{shown}: no element with id {unquote(fragment)!r}")
    assert not broken, (
        f"{page}: {len(broken)} of {len(internal)} internal links broken:\n" + "\n".join(broken)
    )


# ------------------------------------------------------------------------- console


def console_log(driver: WebDriver) -> list[dict[str, Any]]:
    """The browser console's entries since the last call (chromedriver's log API)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return entries


@pytest.mark.parametrize("viewport", VIEWPORTS, ids=lambda v: v.name)
@pytest.mark.parametrize("page", PAGES)
def test_no_console_errors(
    browser: WebDriver, docs_server: str, page: str, viewport: Viewport
) -> None:
    try:
        console_log(browser)  # drop what earlier pages logged
    except Exception as exc:  # a driver without the log API
        unavailable("chromium's console log", f"driver.get_log('browser') failed: {exc}")
    open_page(browser, docs_server, page, viewport)
    errors = [
        str(entry["message"])
        for entry in console_log(browser)
        if str(entry.get("level", "")).upper() == "SEVERE"
    ]
    assert not errors, f"{page} at {viewport.width}px, console errors:\n" + "\n".join(errors)
