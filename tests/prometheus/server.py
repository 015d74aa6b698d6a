"""A private Prometheus server for the tests: its own port, data directory and config.

:func:`prometheus_server` writes ``prometheus.yml`` into a directory of the test's,
starts Debian's ``prometheus`` binary on a free loopback port with its storage in
that directory, waits until it is ready, and stops it (SIGTERM, then SIGKILL of its
process group) when the block ends: no server outlives the test.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests._rig.env import unavailable

T = TypeVar("T")

#: Seconds between scrapes and between rule evaluations of the test's server.
INTERVAL_SECONDS = 1
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def prometheus_binary() -> str:
    """The ``prometheus`` server binary; skips without it, fails under ``CI=true``."""
    found = shutil.which("prometheus")
    if found is None:
        unavailable("prometheus", "not on PATH (Debian: apt-get install prometheus)")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PrometheusServer:
    """A running server and its HTTP API."""

    url: str
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def log_path(self) -> Path:
        return self.directory / "prometheus.log"

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def api(self, path: str, params: Mapping[str, str] | list[tuple[str, str]] = ()) -> Any:
        """``data`` of a successful API answer; fails the test with Prometheus's error."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as error:
            with error:
                body = json.load(error)
        if body.get("status") != "success":
            pytest.fail(f"{path} {dict(params)}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (fails on a scalar or a string)."""
        data = self.api("query", {"query": expr})
        assert data["resultType"] == "vector", (expr, data["resultType"])
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The one sample of ``expr`` now, ``None`` when it has none."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def rule_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self.api("rules")["groups"]
        return groups

    def wait_for(
        self,
        what: str,
        probe: Callable[[], T | None],
        timeout: float = 30.0,
        explain: Callable[[], object] = lambda: "",
    ) -> T:
        """Poll ``probe`` until it returns something other than ``None``; fail on
        timeout, with what ``explain()`` says then."""
        deadline = time.monotonic() + timeout
        while True:
            found = probe()
            if found is not None:
                return found
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited while waiting for {what}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"prometheus: no {what} after {timeout}s: {explain()}\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def wait_for_evaluation(self) -> None:
        """Return once every rule group has been evaluated after this call began."""
        started = time.time()

        def evaluated() -> bool | None:
            stamps = [_timestamp(group["lastEvaluation"]) for group in self.rule_groups()]
            return True if stamps and min(stamps) > started else None

        self.wait_for("rule evaluation", evaluated, timeout=10)


def _timestamp(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 time with nanoseconds, as the API writes
    it (``2024-05-01T10:00:00.123456789Z``, or with the server's offset)."""
    match = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    assert match is not None, text
    whole, fraction, offset = match.groups()
    moment = datetime.fromisoformat(whole + ("+00:00" if offset == "Z" else offset))
    return moment.timestamp() + float(fraction or 0)


def prometheus_config(
    job: str, targets: list[str], rule_files: list[Path], interval: int = INTERVAL_SECONDS
) -> dict[str, Any]:
    """A ``prometheus.yml``: one job scraping ``targets``, the rules files loaded."""
    return {
        "global": {"scrape_interval": f"{interval}s", "evaluation_interval": f"{interval}s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": f"{interval}s",
                "scrape_timeout": f"{interval}s",
                "static_configs": [{"targets": targets}],
            }
        ],
    }


@contextlib.contextmanager
def prometheus_server(
    binary: str, config: Mapping[str, Any], directory: Path
) -> Iterator[PrometheusServer]:
    """Run ``prometheus`` with ``config`` and its storage in ``directory`` (made fresh)."""
    directory.mkdir(parents=True, exist_ok=False)
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    for _attempt in range(3):  # another process may take the free port first
        server = _start(binary, config_path, directory)
        try:
            if _ready(server):
                yield server
                return
        finally:
            _stop(server.process)
        if "address already in use" not in server.log_tail():
            break
    pytest.fail(f"prometheus did not start:\n{server.log_tail()}")


def _start(binary: str, config_path: Path, directory: Path) -> PrometheusServer:
    port = free_port()
    storage = directory / f"data-{port}"
    command = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={storage}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=info",
    ]
    with (directory / "prometheus.log").open("ab") as log:
        process = subprocess.Popen(
            command,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return PrometheusServer(f"http://127.0.0.1:{port}", directory, process)


def _ready(server: PrometheusServer) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as reply:
                if reply.status == 200:
                    return True
        time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def finite(result: list[dict[str, Any]]) -> list[float]:
    """The finite values of an instant vector (0/0 ratios and quantiles read NaN)."""
    values = [float(sample["value"][1]) for sample in result]
    return [value for value in values if math.isfinite(value)]
