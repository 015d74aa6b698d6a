"""The current tenant, carried in a :mod:`contextvars` variable.

A tenant id is always held in its canonical text form (the form a message
header and a PostgreSQL setting carry), produced by the process's tenant id
parser.  Because the value lives in a :class:`contextvars.ContextVar`, each
thread, asyncio task and greenlet sees its own tenant.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, ContextDecorator
from contextvars import ContextVar, Token

from .errors import InvalidTenantId, TenantContextMissing

__all__ = [
    "TenantIdParser",
    "current_tenant",
    "integer_tenant_id",
    "parse_tenant_id",
    "require_tenant",
    "set_tenant_id_parser",
    "slug_tenant_id",
    "tenant_context",
    "uuid_tenant_id",
]

TenantIdParser = Callable[[object], str]
"""Validates a raw tenant id and returns its canonical text form.

It raises :class:`~tenant_celery.InvalidTenantId` (or :class:`ValueError`,
:class:`TypeError`, which are turned into it) for a value it refuses.
"""

_current: ContextVar[str | None] = ContextVar("tenant_celery.current_tenant", default=None)

# The text forms of a UUID, in ASCII only: hyphenated or 32 hex digits, bare, in
# braces or as a URN.  ``uuid.UUID`` alone also takes other scripts' digits,
# surrounding spaces, a sign, a "0x" prefix and one unbalanced brace.
_UUID_TEXT = re.compile(
    r"(?:urn:uuid:)?(\{)?[0-9A-Fa-f]{8}(-?)(?:[0-9A-Fa-f]{4}\2){3}[0-9A-Fa-f]{12}(?(1)\})\Z"
)
# The canonical form itself: returned as it is, without building a UUID.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_SLUG = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,62})\Z")
_DIGITS = re.compile(r"[0-9]{1,19}\Z")
_MAX_BIGINT = 2**63 - 1


def _refuse(kind: str, value: object) -> InvalidTenantId:
    # Name the type, never the value: a malformed id may be a pasted secret.
    return InvalidTenantId(
        f"tenant id must be {kind} (got a value of type {type(value).__name__}); "
        "check where the tenant id is read from"
    )


def uuid_tenant_id(value: object) -> str:
    """Parse a UUID (or its text: hyphenated or 32 hex digits, optionally in braces or
    as a ``urn:uuid:``) to its canonical lowercase hyphenated text.

    This is the default parser."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if type(value) is str and len(value) == 36 and _CANONICAL_UUID.match(value):
        return value
    if isinstance(value, str) and len(value) <= 45 and _UUID_TEXT.match(value):
        return str(uuid.UUID(value))
    raise _refuse("a UUID", value)


def integer_tenant_id(value: object) -> str:
    """Parse a positive integer that fits PostgreSQL's ``bigint`` (or its decimal
    string) to its decimal text."""
    if isinstance(value, bool):
        raise _refuse("a positive integer", value)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _DIGITS.match(value):
        number = int(value)
    else:
        raise _refuse("a positive integer", value)
    if not 0 < number <= _MAX_BIGINT:
        raise _refuse("a positive integer that fits in a bigint", value)
    return str(number)


def slug_tenant_id(value: object) -> str:
    """Accept a slug unchanged: 1 to 63 of ``a-z``, ``0-9``, ``_``, ``-``, not starting
    with ``_`` or ``-``."""
    if isinstance(value, str) and _SLUG.match(value):
        return value
    raise _refuse("a slug of 1-63 lowercase letters, digits, '_' or '-'", value)


_parser_lock = threading.Lock()
_parser: TenantIdParser = uuid_tenant_id


def set_tenant_id_parser(parser: TenantIdParser) -> TenantIdParser:
    """Make ``parser`` validate every tenant id in this process; return the previous one.

    Call it once at import time, in the module that creates the Celery app, so
    that producers and workers (which import that module) agree.  The built-in
    parsers are :func:`uuid_tenant_id` (the default), :func:`integer_tenant_id`
    and :func:`slug_tenant_id`.
    """
    global _parser
    if not callable(parser):
        raise TypeError(f"parser must be callable, got {type(parser).__name__}")
    with _parser_lock:
        previous, _parser = _parser, parser
    return previous


def parse_tenant_id(value: object) -> str:
    """Validate ``value`` with the configured parser and return its canonical form.

    Raises:
        InvalidTenantId: the value was refused; the message names its type only.
    """
    parser = _parser
    try:
        canonical = parser(value)
    except InvalidTenantId:
        raise
    except (ValueError, TypeError) as exc:
        raise _refuse("valid for the configured parser", value) from exc
    if not isinstance(canonical, str) or not canonical:
        raise InvalidTenantId(
            f"tenant id parser {getattr(parser, '__name__', parser)!r} returned "
            f"{type(canonical).__name__}, expected a non-empty str"
        )
    return canonical


def current_tenant() -> str | None:
    """The tenant of the running code, or ``None`` outside any tenant."""
    return _current.get()


def require_tenant() -> str:
    """The tenant of the running code.

    Raises:
        TenantContextMissing: no tenant is set.
    """
    tenant = _current.get()
    if tenant is None:
        raise TenantContextMissing
    return tenant


def tenant_context(tenant_id: object) -> AbstractContextManager[str]:
    """Run the ``with`` block inside ``tenant_id``; yield its canonical form.

    The previous tenant (or none) is restored on exit, whatever happened in
    the block.  Contexts nest.  Tasks published inside the block carry the
    tenant to the worker.

    Raises:
        InvalidTenantId: ``tenant_id`` is refused by the tenant id parser when
            the block is entered; nothing has been entered.
    """
    return _TenantContext(tenant_id)


class _TenantContext(AbstractContextManager[str], ContextDecorator):
    """:func:`tenant_context`'s manager: a class, not a generator, as it is entered
    for every task published or run.  Usable as a decorator, as a generator's was."""

    __slots__ = ("_raw", "_token")

    def __init__(self, raw: object) -> None:
        self._raw = raw
        self._token: Token[str | None] | None = None

    def _recreate_cm(self) -> _TenantContext:
        return _TenantContext(self._raw)  # a decorated function may run in many threads

    def __enter__(self) -> str:
        if self._token is not None:
            raise RuntimeError("a tenant_context(...) is entered once at a time; call it again")
        canonical = parse_tenant_id(self._raw)
        self._token = _current.set(canonical)
        return canonical

    def __exit__(self, *exc_info: object) -> None:
        token, self._token = self._token, None
        if token is not None:
            _current.reset(token)


def _enter(tenant: str | None) -> Token[str | None]:
    """Set an already validated tenant (or none); the caller must reset the token."""
    return _current.set(tenant)


def _exit(token: Token[str | None]) -> None:
    _current.reset(token)
