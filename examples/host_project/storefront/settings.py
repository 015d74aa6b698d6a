"""Settings read from environment variables, so the project runs against any server.

``STOREFRONT_DATABASE_URL``
    The application role's URL: workers and web processes connect with it, for
    the broker, the results and the tenant tables.  That role must not be a
    superuser, have ``BYPASSRLS`` or own the tables.
``STOREFRONT_MIGRATION_URL``
    The owner's URL: Alembic and ``python -m storefront migrate`` connect with
    it to create the tables and grant them to the application role.
``TENANT_CELERY_MONITOR_PORT``
    Port of the worker monitor (``/metrics``, ``/health``); default 9808, ``0``
    for any free port.

A ``postgresql://`` URL is used with psycopg 3.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

DATABASE_URL_ENV = "STOREFRONT_DATABASE_URL"
MIGRATION_URL_ENV = "STOREFRONT_MIGRATION_URL"
MONITOR_PORT_ENV = "TENANT_CELERY_MONITOR_PORT"
DEFAULT_MONITOR_PORT = 9808

_EXAMPLE = "postgresql://{role}:secret@127.0.0.1:5432/storefront"


class SettingsError(RuntimeError):
    """A required environment variable is missing or unusable."""


def _url(name: str, role: str) -> URL:
    raw = os.environ.get(name, "").strip()
    if not raw:
        raise SettingsError(f"{name} is not set: give a URL such as {_EXAMPLE.format(role=role)}")
    try:
        url = sa.make_url(raw)
    except ArgumentError:
        # The value may hold a password: name the variable, not the value.
        raise SettingsError(f"{name} is not a database URL") from None
    backend, _, driver = url.drivername.partition("+")
    if backend not in {"postgresql", "postgres"}:
        raise SettingsError(f"{name} must be a PostgreSQL URL, got a {backend!r} one")
    return url.set(drivername=f"postgresql+{driver or 'psycopg'}")


def database_url() -> str:
    """The application role's SQLAlchemy URL, password included."""
    return _url(DATABASE_URL_ENV, "storefront_app").render_as_string(hide_password=False)


def migration_url() -> str:
    """The table owner's SQLAlchemy URL, password included."""
    return _url(MIGRATION_URL_ENV, "storefront_owner").render_as_string(hide_password=False)


def app_role() -> str:
    """The application role: the user of ``STOREFRONT_DATABASE_URL``."""
    role = _url(DATABASE_URL_ENV, "storefront_app").username
    if not role:
        raise SettingsError(f"{DATABASE_URL_ENV} names no user: the tables are granted to it")
    return role


def monitor_port() -> int | str:
    """The worker monitor's port: ``TENANT_CELERY_MONITOR_PORT``, else 9808."""
    return os.environ.get(MONITOR_PORT_ENV) or DEFAULT_MONITOR_PORT
