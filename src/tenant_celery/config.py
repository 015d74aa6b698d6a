"""Settings: an explicit argument beats the Celery app's configuration, which
beats the environment.

Every setting ``name`` is read from ``app.conf["tenant_celery_<name>"]`` and
from the environment variable ``TENANT_CELERY_<NAME>``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from .errors import ConfigurationError

__all__ = ["DEFAULT_GUC", "DEFAULT_HEADER", "header_name", "setting"]

DEFAULT_HEADER = "tenant_id"
"""Message header that carries the tenant unless ``tenant_celery_header`` says otherwise."""

DEFAULT_GUC = "app.current_tenant_id"
"""Name of the PostgreSQL setting that RLS policies read by default."""

# Names Celery itself uses in protocol-2 headers or on ``task.request``: a tenant
# header with one of these names would be overwritten or shadowed.
_RESERVED_HEADERS = frozenset(
    {
        "args", "argsrepr", "callbacks", "called_directly", "chain", "chord",
        "correlation_id", "delivery_info", "errbacks", "eta", "expires", "group",
        "group_index", "headers", "hostname", "id", "ignore_result", "is_eager",
        "kwargs", "kwargsrepr", "lang", "origin", "parent_id", "properties",
        "reply_to", "replaced_task_nesting", "retries", "root_id", "shadow",
        "stamped_headers", "stamps", "task", "taskset", "timelimit", "utc",
    }
)  # fmt: skip


def setting(app: Celery | None, name: str, default: Any = None) -> Any:
    """Read setting ``name`` from ``app.conf``, then the environment, then ``default``."""
    key = f"tenant_celery_{name}"
    if app is not None:
        value = app.conf.get(key)
        if value is not None:
            return value
    env = os.environ.get(key.upper())
    if env not in (None, ""):
        return env
    return default


def header_name(app: Celery | None) -> str:
    """The message header that carries the tenant for ``app``.

    Raises:
        ConfigurationError: the configured name is empty or one Celery uses itself.
    """
    name: object = setting(app, "header", DEFAULT_HEADER)
    if name == DEFAULT_HEADER:
        return DEFAULT_HEADER
    if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED_HEADERS:
        raise ConfigurationError(
            f"tenant_celery_header must be an identifier that Celery does not use itself, "
            f"got {name!r}; the default is {DEFAULT_HEADER!r}"
        )
    return name
