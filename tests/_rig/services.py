"""Probes for the message brokers (Redis, RabbitMQ) and cheap per-queue cleanup."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kombu
import redis

from tests._rig import env

PROBE_TIMEOUT = 3.0


def probe_redis(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Return ``None`` when Redis at *url* answers PING, else the reason it does not."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure means "unavailable"
        return f"{url}: {type(exc).__name__}: {exc}"
    return None


def probe_amqp(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Return ``None`` when an AMQP broker at *url* accepts a connection, else why not."""
    try:
        with kombu.Connection(url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # any failure means "unavailable"
        return f"{url}: {type(exc).__name__}: {exc}"
    return None


@dataclass
class Services:
    """Lazily probed broker URLs, shared by the whole session.

    Each service is probed at most once; :meth:`redis` and :meth:`amqp` return
    its URL or skip (fail in CI) the calling test.
    """

    redis_url: str = field(default_factory=env.redis_url)
    amqp_url: str = field(default_factory=env.amqp_url)
    _problems: dict[str, str | None] = field(default_factory=dict)

    def _check(self, name: str, url: str, probe: Callable[[str], str | None]) -> str:
        if name not in self._problems:
            self._problems[name] = probe(url)
        problem = self._problems[name]
        if problem is not None:
            env.unavailable(name, problem)
        return url

    def redis(self) -> str:
        """URL of a reachable Redis, or skip/fail."""
        return self._check("Redis", self.redis_url, probe_redis)

    def amqp(self) -> str:
        """URL of a reachable RabbitMQ, or skip/fail."""
        return self._check("RabbitMQ", self.amqp_url, probe_amqp)


def purge_redis_queue(url: str, queue: str) -> None:
    """Delete a kombu queue's keys (including priority sub-queues) from Redis."""
    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT)
        try:
            # Celery declares a direct exchange named like the queue.
            keys = [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
            keys += [f"{queue}\x06\x16{priority}" for priority in range(10)]
            client.delete(*keys)
        finally:
            client.close()


def delete_amqp_queue(url: str, queue: str) -> None:
    """Delete a queue (and the direct exchange Celery declared for it) from RabbitMQ."""
    with (
        contextlib.suppress(Exception),
        kombu.Connection(url, connect_timeout=PROBE_TIMEOUT) as conn,
    ):
        channel: Any = conn.default_channel
        channel.queue_delete(queue)
        channel.exchange_delete(queue)
