"""Fixtures of the tests of the built docs site: the build, a local HTTP server,
headless Chromium.

These tests live outside ``tests/unit`` so that the compatibility cells (nox),
which install no docs tools, do not collect them; wherever they run, a missing
tool skips them on a laptop and fails them under ``CI=true``.

``docs_html``
    The HTML build: ``TENANT_CELERY_DOCS_HTML`` when it names a directory holding an
    ``index.html`` (CI points it at the build its docs step made), else a fresh
    ``sphinx-build -b html`` of ``docs/`` into a temporary directory, once per session.
``docs_server``
    Base URL (ending in ``/``) of Python's ``http.server`` serving that build on
    127.0.0.1 at a free port.
``browser``
    Headless Chromium through the system chromedriver (``/usr/bin/chromedriver``,
    else the first ``chromedriver`` on ``PATH``), its console log kept. Without
    Chromium, chromedriver or Selenium the tests are skipped, and fail under
    ``CI=true`` (:func:`tests._rig.env.unavailable`).

``TENANT_CELERY_DOCS_SCREENSHOTS`` names a directory to save a full-page PNG of every
page at every width the tests open (for a person to look at; nothing checks them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests._rig.env import unavailable

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

#: An existing HTML build of the docs to test instead of building one.
DOCS_HTML_ENV = "TENANT_CELERY_DOCS_HTML"
#: A directory to save screenshots of the pages the tests open.
SCREENSHOTS_ENV = "TENANT_CELERY_DOCS_SCREENSHOTS"

REPO = Path(__file__).resolve().parents[2]
CHROMEDRIVER_PATHS = ("/usr/bin/chromedriver",)
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


@pytest.fixture(scope="session")
def docs_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of the built HTML docs (see the module docstring)."""
    given = os.environ.get(DOCS_HTML_ENV, "").strip()
    if given and (Path(given) / "index.html").is_file():
        return Path(given).resolve()
    try:
        import sphinx  # noqa: F401, PLC0415
    except ImportError as exc:
        unavailable("sphinx (to build the docs)", str(exc))
    out = tmp_path_factory.mktemp("docs_html")
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-q", "docs", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if build.returncode != 0 or not (out / "index.html").is_file():
        pytest.fail(
            f"sphinx-build exited {build.returncode}:\n{build.stdout[-4000:]}\n"
            f"{build.stderr[-4000:]}",
            pytrace=False,
        )
    return out


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def docs_server(docs_html: Path) -> Iterator[str]:
    """Base URL of an HTTP server on 127.0.0.1 serving the built docs."""
    handler = partial(_QuietHandler, directory=str(docs_html))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="docs-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _first_executable(paths: tuple[str, ...], name: str) -> str | None:
    for path in paths:
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


@pytest.fixture(scope="session")
def browser() -> Iterator[WebDriver]:
    """Headless Chromium (session-wide); each test sets its own viewport."""
    try:
        from selenium import webdriver  # noqa: PLC0415
        from selenium.common.exceptions import WebDriverException  # noqa: PLC0415
        from selenium.webdriver.chrome.service import Service  # noqa: PLC0415
    except ImportError as exc:
        unavailable("selenium", f"{exc} (it is in the dev extra)")
    driver_path = _first_executable(CHROMEDRIVER_PATHS, "chromedriver")
    if driver_path is None:
        unavailable("chromedriver", "not installed (Debian: apt-get install chromium-driver)")
    chromium_path = _first_executable(CHROMIUM_PATHS, "chromium")
    if chromium_path is None:
        unavailable("chromium", "not installed (Debian: apt-get install chromium)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium_path
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        # An explicit driver path: Selenium Manager never downloads a driver.
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    except WebDriverException as exc:
        unavailable("chromium", f"{chromium_path} with {driver_path} did not start: {exc.msg}")
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def screenshot_dir() -> Path | None:
    """Where to save screenshots (``TENANT_CELERY_DOCS_SCREENSHOTS``), or None."""
    given = os.environ.get(SCREENSHOTS_ENV, "").strip()
    if not given:
        return None
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    return path
