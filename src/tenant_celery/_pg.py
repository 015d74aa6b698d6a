"""PostgreSQL names and URLs, shared by the RLS helpers, the audit, the bundled
migration and the command line."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

from .errors import ConfigurationError

MAX_IDENTIFIER_BYTES = 63
"""PostgreSQL's NAMEDATALEN - 1: longer names would be cut silently."""

# paramstyle "named": a pyformat dialect's preparer doubles '%' in names, which is
# right only for text sent with parameters; our DDL is sent as written.
_PREPARER = PGDialect(paramstyle="named").identifier_preparer  # type: ignore[no-untyped-call]

# Celery's database backend and kombu's transport prefix SQLAlchemy URLs.
_CELERY_PREFIXES = ("db+", "sqla+", "sqlalchemy+")


def identifier(value: object, what: str) -> str:
    """Return ``value`` if PostgreSQL can use it as a name without cutting it.

    Raises:
        ConfigurationError: ``value`` is not a non-empty string of at most 63
            bytes without NUL characters (``what`` names the argument).
    """
    if (
        isinstance(value, str)
        and value
        and "\x00" not in value
        and len(value.encode()) <= MAX_IDENTIFIER_BYTES
    ):
        return value
    shown = repr(value) if isinstance(value, str) and len(value) <= 100 else type(value).__name__
    raise ConfigurationError(
        f"{what} must be a non-empty name of at most {MAX_IDENTIFIER_BYTES} bytes without NUL "
        f"characters, got {shown}"
    )


def quote(name: str) -> str:
    """``name`` as SQLAlchemy writes it in DDL: bare when it can be, else double-quoted."""
    return _PREPARER.quote(name)


def qualified(name: str, schema: str | None) -> str:
    """``schema.name`` (each quoted as needed), or ``name`` alone without a schema."""
    return quote(name) if schema is None else f"{quote(schema)}.{quote(name)}"


def database_url(value: str | URL) -> URL:
    """``value`` as a SQLAlchemy URL for psycopg 3.

    Accepts libpq-style ``postgresql://`` and ``postgres://`` URLs (psycopg 3 is
    chosen) and the ``db+`` / ``sqla+`` prefixes of Celery and kombu URLs.

    Raises:
        ConfigurationError: the text is not a URL, or not a PostgreSQL one; the
            message never repeats the text, which may hold a password.
    """
    if isinstance(value, str):
        for prefix in _CELERY_PREFIXES:
            if value.startswith(prefix):
                value = value[len(prefix) :]
                break
        try:
            url = sa.make_url(value)
        except (ArgumentError, ValueError) as exc:
            raise ConfigurationError(
                "cannot parse the database URL; expected "
                "postgresql://user:password@host:port/database"
            ) from exc
    else:
        url = value
    if url.drivername in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() != "postgresql":
        raise ConfigurationError(
            f"expected a PostgreSQL URL, got a {url.get_backend_name()!r} one: "
            f"{url.render_as_string(hide_password=True)}"
        )
    return url
