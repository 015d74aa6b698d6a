"""Client side of the worker monitor for the integration tests: find, scrape, parse, poll."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests._rig.worker import WorkerHandle

#: The worker sets ``TENANT_CELERY_MONITOR_PORT=0`` and logs the port it got.
MONITOR_ENV = {"TENANT_CELERY_MONITOR_PORT": "0"}
_LISTENING = re.compile(r"worker monitor listening on (http://[0-9.]+:\d+)")


def monitor_url(worker: WorkerHandle, timeout: float = 15.0) -> str:
    """The monitor's base URL, from the line the worker logs when it is ready."""
    return worker.wait_for_log(_LISTENING.pattern, timeout=timeout).group(1)


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def get(url: str, timeout: float = 10.0) -> Response:
    """GET ``url``; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return Response(reply.status, reply.headers["Content-Type"], reply.read())
    except urllib.error.HTTPError as error:
        with error:
            return Response(error.code, error.headers["Content-Type"], error.read())


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base_url: str) -> tuple[str, Samples]:
    """One scrape of ``/metrics``: its text and every sample, parsed by prometheus-client."""
    response = get(f"{base_url}/metrics")
    assert response.status == 200, response.body
    text = response.body.decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


def settled_scrape(
    base_url: str, expected: Callable[[Samples], Mapping[str, float]], timeout: float = 20.0
) -> tuple[str, Samples, dict[str, float]]:
    """Scrape until one scrape shows every expected count, or until ``timeout``.

    Celery sends ``task_success``/``task_failure`` after it stores the result,
    so a client holding every result can scrape a moment before the last
    count.  ``expected(samples)`` maps a description to ``(seen - wanted)``;
    the scrape is settled when every difference is zero.  Returns the last
    scrape and its differences (all zero unless the timeout passed).
    """
    deadline = time.monotonic() + timeout
    while True:
        text, samples = scrape(base_url)
        differences = {key: value for key, value in expected(samples).items() if value != 0}
        if not differences or time.monotonic() > deadline:
            return text, samples, differences
        time.sleep(0.2)


def listening_pids(port: int) -> set[int]:
    """PIDs of the processes holding a listening TCP socket on ``port`` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (entry / "fd").iterdir()}
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if links & inodes:
            pids.add(int(entry.name))
    return pids


def json_lines(log: str) -> list[dict[str, Any]]:
    """Every line of a worker log after the rig's command line, parsed; fails on the first
    line that is not a JSON object."""
    lines = log.splitlines()
    assert lines, "empty log"
    assert lines[0].startswith("$ "), "the rig writes the command line first"
    parsed = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            value = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line {number} is not JSON: {line!r}") from None
        assert isinstance(value, dict), f"log line {number} is not an object: {line!r}"
        parsed.append(value)
    return parsed
