"""What a run ran on: hardware, software versions and the services' versions."""

from __future__ import annotations

import contextlib
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import kombu
import psycopg
import redis

from ._common import BenchContext, Table
from ._scratch import connect

PACKAGES = (
    "tenant-celery",
    "celery",
    "kombu",
    "SQLAlchemy",
    "psycopg",
    "redis",
    "prometheus-client",
)


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):  # noqa: SIM115
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in open("/proc/meminfo", encoding="utf-8"):  # noqa: SIM115
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the system has them."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def describe(ctx: BenchContext) -> dict[str, Any]:
    """Machine, software and service versions, and the start time (UTC)."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {name: _version(name) for name in PACKAGES},
        "load_average_start": load_average(),
    }
    with contextlib.suppress(psycopg.Error), connect(ctx.server_url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        info["postgresql"] = str(row[0]) if row else None
    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(ctx.redis_url, socket_connect_timeout=3)
        try:
            info["redis"] = client.info("server").get("redis_version")
        finally:
            client.close()
    with contextlib.suppress(Exception), kombu.Connection(ctx.amqp_url, connect_timeout=3) as conn:
        conn.ensure_connection(max_retries=1)
        properties: Any = conn.connection.server_properties
        version = properties.get("version")
        info["rabbitmq"] = version.decode() if isinstance(version, bytes) else version
    return info


def machine_table(info: dict[str, Any]) -> Table:
    """The machine and versions as a two-column table."""
    packages = info.get("packages", {})
    rows: list[list[Any]] = [
        ["date (UTC)", info.get("date")],
        ["CPU", f"{info.get('cpu_count')} x {info.get('cpu_model')}"],
        ["memory", f"{info.get('memory_gib')} GiB"],
        ["OS", info.get("os")],
        ["Python", info.get("python")],
        ["PostgreSQL", info.get("postgresql")],
        ["Redis", info.get("redis")],
        ["RabbitMQ", info.get("rabbitmq")],
        *([name, version] for name, version in packages.items() if version),
        ["load average at start / end", f"{info.get('load_average_start')} / "
         f"{info.get('load_average_end')}"],
        ["size, total time", f"{info.get('size')}, {info.get('duration_s')} s"],
    ]  # fmt: skip
    return Table("", ["", "value"], rows)
