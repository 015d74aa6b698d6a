"""Settings: an explicit argument beats the Celery app's configuration, which
beats the environment.

Every setting ``name`` is read from ``app.conf["tenant_celery_<name>"]`` and
from the environment variable ``TENANT_CELERY_<NAME>``.
"""

from __future__ import annotations

import os
import re
from typing import Any

from celery import Celery
from celery.app.utils import Settings

from .errors import ConfigurationError

__all__ = [
    "DATABASE_URL_ENV",
    "DEFAULT_GUC",
    "DEFAULT_HEADER",
    "guc_name",
    "header_name",
    "setting",
    "validate_guc_name",
]

DEFAULT_HEADER = "tenant_id"
"""Message header that carries the tenant unless ``tenant_celery_header`` says otherwise."""

DATABASE_URL_ENV = "TENANT_CELERY_DATABASE_URL"
"""Environment variable of the ``database_url`` setting; the command line's
``--url`` falls back to it."""

DEFAULT_GUC = "app.current_tenant_id"
"""PostgreSQL setting that RLS policies read unless ``tenant_celery_guc`` says otherwise."""

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
# Headers the package writes itself: the correlation id and the tenant header's signature.
_PACKAGE_HEADERS = frozenset({"tenant_signature", "x_correlation_id"})


def setting(app: Celery | None, name: str, default: Any = None) -> Any:
    """Read setting ``name`` from ``app.conf``, then the environment, then ``default``."""
    keys = _KEYS.get(name)
    if keys is None:
        keys = _KEYS[name] = (f"tenant_celery_{name}", f"TENANT_CELERY_{name.upper()}")
    if app is not None:
        value = _conf_value(app, keys[0])
        if value is not None:
            return value
    env = _environ(keys[1])
    if env not in (None, ""):
        return env
    return default


def _environ(name: str) -> str | None:
    """``os.environ.get(name)``, without the two exceptions it raises and catches for
    a variable that is not set, the usual case (tasks read settings for every message)."""
    environ: Any = os.environ
    data = getattr(environ, "_data", None)  # CPython's os._Environ: its encoded map
    if data is None:
        found: str | None = os.environ.get(name)
        return found
    raw = data.get(environ.encodekey(name))
    return None if raw is None else str(environ.decodevalue(raw))


# setting name -> its app.conf key and its environment variable
_KEYS: dict[str, tuple[str, str]] = {}
# Where a configuration keeps what was read from its maps after the first: the
# count of its maps then, and the values found (add_defaults() adds a map).
_READ = "_tenant_celery_read"


def _conf_value(app: Celery, key: str) -> Any:
    """``app.conf.get(key)``, read once per configuration from the maps that do not change.

    Tasks read settings for every message, and a miss in Celery's configuration
    costs an exception per map.  A value set on ``app.conf`` (the changes map)
    is read every time; the other maps are read again when one is added.
    """
    conf: Any = app.conf  # current_app's too: the proxy hands over the real one
    if type(conf) is not Settings or conf.prefix or conf.key_t is not None:
        return conf.get(key)  # not loaded yet, or keys Celery rewrites
    own = conf.__dict__  # not conf.<name>: a Settings reads attributes as settings
    changed = own["changes"].get(key)
    if changed is not None:
        return changed
    maps: list[Any] = own["maps"]
    read = own.get(_READ)
    if read is None or read[0] != len(maps):
        read = own[_READ] = (len(maps), {})
    values: dict[str, Any] = read[1]
    try:
        return values[key]
    except KeyError:
        pass
    if any(rename(key) != key for rename in own.get("_keys") or ()):
        return conf.get(key)  # an old-style name: Celery reads both
    found = values[key] = next((m[key] for m in maps[1:] if key in m), None)
    return found


def header_name(app: Celery | None) -> str:
    """The message header that carries the tenant for ``app``.

    Raises:
        ConfigurationError: the configured name is not an ASCII identifier, or is
            one Celery or this package uses itself.
    """
    name: object = setting(app, "header", DEFAULT_HEADER)
    if name == DEFAULT_HEADER:
        return DEFAULT_HEADER
    if (
        not isinstance(name, str)
        or not (name.isascii() and name.isidentifier())
        or name in _RESERVED_HEADERS
        or name in _PACKAGE_HEADERS
    ):
        raise ConfigurationError(
            f"tenant_celery_header must be an ASCII identifier that neither Celery nor "
            f"tenant-celery uses itself, got {_shown(name)}; the default is {DEFAULT_HEADER!r}"
        )
    return name


# A custom PostgreSQL setting is "prefix.name"; both parts plain identifiers, so
# the name can also appear as a string literal in a policy without escaping.
_GUC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*\Z")
_MAX_GUC_LENGTH = 63


def validate_guc_name(name: object) -> str:
    """Return ``name`` if it is a custom PostgreSQL setting name (``word.word``).

    Raises:
        ConfigurationError: anything else, before any SQL is sent.
    """
    if isinstance(name, str) and len(name) <= _MAX_GUC_LENGTH and _GUC.match(name):
        return name
    raise ConfigurationError(
        f"the tenant setting must look like 'prefix.name' (letters, digits, '_'; "
        f"at most {_MAX_GUC_LENGTH} characters), got {_shown(name)}; the default is {DEFAULT_GUC!r}"
    )


def _shown(name: object) -> str:
    """A refused name as an error message shows it: its repr when short, else its type."""
    if not isinstance(name, str):
        return f"a value of type {type(name).__name__}"
    shown = repr(name)  # escapes control characters: one printable line
    return shown if len(shown) <= 100 else f"a str of {len(name):,} characters"


def guc_name(app: Celery | None = None, explicit: str | None = None) -> str:
    """The PostgreSQL setting RLS policies read: ``explicit``, else the
    ``tenant_celery_guc`` setting, else :data:`DEFAULT_GUC`; validated."""
    name = explicit if explicit is not None else setting(app, "guc", DEFAULT_GUC)
    return validate_guc_name(name)
