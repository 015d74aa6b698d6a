"""Environment variables the rig reads and the skip-or-fail rule for missing services."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

#: Superuser DSN of an existing PostgreSQL server (``postgresql://...``). When set it
#: is used and nothing is started; CI sets it.
PG_DSN_ENV = "TENANT_CELERY_TEST_DSN"
#: Force one PostgreSQL source: ``dsn``, ``pgserver`` or ``pg_ctl`` (default: try in order).
PG_SOURCE_ENV = "TENANT_CELERY_TEST_PG_SOURCE"
#: Driver behind every SQLAlchemy URL the rig hands out: ``psycopg`` (default,
#: ``postgresql+psycopg://``) or ``psycopg2`` (``postgresql+psycopg2://``).
PG_DRIVER_ENV = "TENANT_CELERY_TEST_DRIVER"
REDIS_URL_ENV = "TENANT_CELERY_TEST_REDIS_URL"
AMQP_URL_ENV = "TENANT_CELERY_TEST_AMQP_URL"

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def celery_release() -> tuple[int, int]:
    """The installed Celery's major and minor version, for tests of what a release changed."""
    import celery  # noqa: PLC0415

    major, minor = celery.__version__.split(".")[:2]
    return int(major), int(minor)


def in_ci() -> bool:
    """Return whether the run is a CI run (``CI`` set to a true value)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def unavailable(what: str, reason: str) -> NoReturn:
    """Give up on a test because a service is missing.

    Outside CI the test is skipped; in CI (``CI=true``) it fails, so a broken
    service can never turn a CI run green by skipping everything.
    """
    message = f"{what} unavailable: {reason}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: services must be available)", pytrace=False)
    pytest.skip(message)


def pg_drivername() -> str:
    """SQLAlchemy drivername of the rig's URLs, from ``TENANT_CELERY_TEST_DRIVER``."""
    driver = os.environ.get(PG_DRIVER_ENV, "").strip().lower() or "psycopg"
    if driver == "psycopg":
        return "postgresql+psycopg"
    if driver == "psycopg2":
        # Named: a plain postgresql:// means psycopg2 on SQLAlchemy 2.0, psycopg on 2.1.
        return "postgresql+psycopg2"
    raise ValueError(f"{PG_DRIVER_ENV}={driver!r}: expected psycopg or psycopg2")


def redis_url() -> str:
    """Redis URL the tests use."""
    return os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def amqp_url() -> str:
    """RabbitMQ URL the tests use."""
    return os.environ.get(AMQP_URL_ENV) or DEFAULT_AMQP_URL
