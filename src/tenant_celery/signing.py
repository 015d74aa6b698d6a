"""Signed tenant headers: a worker runs a task only in a tenant that a key holder named.

Without signing, the tenant header is validated but not authenticated: anyone
who can publish to the broker can name any tenant.  With the
``tenant_celery_header_signing_keys`` setting, every process that publishes
tenant tasks adds a second header, :data:`SIGNATURE_HEADER`, an HMAC-SHA256
over the tenant id, the task id and the task name made with the newest key,
and every worker refuses a tenant task whose signature is missing, malformed,
made with a key it does not accept, or made for another task id or name.

The keys are secrets shared by producers and workers, newest first.  A key is
at least :data:`MIN_KEY_BYTES` bytes; a text key is used as its UTF-8 bytes.
In ``app.conf`` the setting is a list or tuple of ``str`` or ``bytes`` keys, a
single ``bytes`` key, or a ``str`` of comma-separated keys; in the
environment (``TENANT_CELERY_HEADER_SIGNING_KEYS``) it is comma-separated,
spaces around each key ignored.  Signing uses the first key; verification
accepts any key of the list, which is how keys are rotated.

The signature has the form ``v1:<key id>:<64 hex digits>``.  The key id is a
short digest of the key, which names the key in log lines without revealing
it.  The signed text is length-prefixed, so no choice of tenant, task id and
task name can be read as another.

What a signature does not cover: the task's arguments, and a message replayed
whole (same task id, same name).  It binds a tenant to one task id and task
name; see the security model in the documentation.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from celery import Celery

from .config import setting
from .errors import ConfigurationError, TenantSignatureError

__all__ = [
    "MIN_KEY_BYTES",
    "SIGNATURE_HEADER",
    "SIGNING_KEYS_ENV",
    "TenantSignatureError",
    "check_signature",
    "key_id",
    "parse_signing_keys",
    "sign_fan_out",
    "sign_tenant",
    "signing_keys",
    "verify_fan_out",
    "verify_signature",
]

SIGNATURE_HEADER = "tenant_signature"
"""Message header that carries the tenant header's signature."""

SIGNING_KEYS_ENV = "TENANT_CELERY_HEADER_SIGNING_KEYS"
"""Environment variable of the ``header_signing_keys`` setting (comma-separated keys)."""

MIN_KEY_BYTES = 32
"""Shortest key accepted, in bytes: the size of the HMAC-SHA256 output."""

_SETTING = "tenant_celery_header_signing_keys"
_VERSION = "v1"
_DOMAIN = b"tenant-celery tenant header v1\x00"
# A fan-out over every tenant is signed in its own domain: no tenant's signature
# can be read as one, whatever the tenant id parser accepts.
_FAN_OUT_DOMAIN = b"tenant-celery fan-out v1\x00"
_KEY_ID_DOMAIN = b"tenant-celery key id"
_SIGNATURE = re.compile(r"v1:([0-9a-f]{8}):[0-9a-f]{64}\Z")

UNSIGNED = "unsigned"
"""``tenant_rejected`` reason: the message names a tenant but carries no signature."""

BAD_SIGNATURE = "bad-signature"
"""``tenant_rejected`` reason: the signature is malformed, made with a key the worker
does not accept, or made for another tenant, task id or task name."""


# ------------------------------------------------------------------------------ keys


def _refuse_keys(problem: str) -> ConfigurationError:
    # Describe the value, never show it: it is a secret.
    return ConfigurationError(
        f"{_SETTING} {problem}; give a list of keys of at least {MIN_KEY_BYTES} bytes, "
        f"newest first (in the environment, {SIGNING_KEYS_ENV} separates them with commas), "
        "or leave it unset to turn signing off"
    )


def _key_bytes(key: object, position: int) -> bytes:
    if isinstance(key, str):
        key = key.encode("utf-8", "surrogatepass")
    elif not isinstance(key, bytes):
        raise _refuse_keys(f"key {position} is of type {type(key).__name__}, not str or bytes")
    if not key:
        raise _refuse_keys(f"key {position} is empty")
    if len(key) < MIN_KEY_BYTES:
        raise _refuse_keys(f"key {position} is shorter than {MIN_KEY_BYTES} bytes")
    return key


def parse_signing_keys(value: object) -> tuple[bytes, ...]:
    """The keys a setting value names, newest first; ``()`` for ``None`` or ``""``.

    Accepts a ``str`` of comma-separated keys (spaces around each ignored), a
    single ``bytes`` key, or a list or tuple of ``str`` or ``bytes`` keys (a
    ``str`` item is one key, commas included).

    Raises:
        ConfigurationError: an empty list or key, a key shorter than
            :data:`MIN_KEY_BYTES`, or a value of another type.  The message
            names the key's position, never its value.
    """
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        items: Sequence[object] = [part.strip() for part in value.split(",")]
    elif isinstance(value, bytes):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = value
        if not items:
            raise _refuse_keys("is an empty list (use None to turn signing off)")
    else:
        raise _refuse_keys(f"is of type {type(value).__name__}")
    return tuple(_key_bytes(key, position) for position, key in enumerate(items, start=1))


@lru_cache(maxsize=16)
def _parse_cached(value: str | bytes | tuple[Any, ...]) -> tuple[bytes, ...]:
    return parse_signing_keys(value)


def signing_keys(app: Celery | None) -> tuple[bytes, ...]:
    """The signing keys configured for ``app``, newest first; ``()`` when signing is off.

    Read from ``app.conf.tenant_celery_header_signing_keys``, else the
    environment variable :data:`SIGNING_KEYS_ENV`.

    Raises:
        ConfigurationError: the setting has an unusable value (see
            :func:`parse_signing_keys`).
    """
    value: object = setting(app, "header_signing_keys")
    if value is None:
        return ()
    if isinstance(value, list):
        value = tuple(value)
    try:
        return _parse_cached(value)
    except TypeError:  # unhashable: not a usable value, say why
        return parse_signing_keys(value)


def key_id(key: bytes) -> str:
    """A short public name of ``key`` (8 hex digits), for signatures and log lines."""
    return hmac.new(key, _KEY_ID_DOMAIN, hashlib.sha256).hexdigest()[:8]


# ------------------------------------------------------------------ sign and verify


def _signed_text(tenant: str, task_id: str, task_name: str, domain: bytes = _DOMAIN) -> bytes:
    parts = [domain]
    for field in (tenant, task_id, task_name):
        encoded = field.encode("utf-8", "surrogatepass")
        parts.append(struct.pack(">I", len(encoded)))
        parts.append(encoded)
    return b"".join(parts)


def _signature(key: bytes, text: bytes) -> str:
    mac = hmac.new(key, text, hashlib.sha256).hexdigest()
    return f"{_VERSION}:{key_id(key)}:{mac}"


def sign_tenant(key: bytes, tenant: str, task_id: str, task_name: str) -> str:
    """The signature of ``tenant`` (canonical form) for one task id and task name."""
    return _signature(key, _signed_text(tenant, task_id, task_name))


def sign_fan_out(key: bytes, task_id: str, task_name: str) -> str:
    """The signature of a message that fans out over every tenant
    (``tenant_celery.for_each_tenant``), for one task id and task name."""
    return _signature(key, _signed_text("", task_id, task_name, _FAN_OUT_DOMAIN))


def verify_fan_out(
    keys: Sequence[bytes], signature: object, task_id: object, task_name: object
) -> None:
    """Check that ``signature`` was made by one of ``keys`` with :func:`sign_fan_out`
    for exactly this task id and task name.

    Raises:
        TenantSignatureError: as :func:`verify_signature`.
    """
    _verify(keys, signature, "", task_id, task_name, _FAN_OUT_DOMAIN)


def verify_signature(
    keys: Sequence[bytes], signature: object, tenant: str, task_id: object, task_name: object
) -> None:
    """Check that ``signature`` was made by one of ``keys`` for exactly this tenant,
    task id and task name.

    Every key is tried, each with :func:`hmac.compare_digest`.

    Raises:
        TenantSignatureError: no signature (reason ``"unsigned"``), or one that
            is malformed, made with another key, or made for another tenant,
            task id or task name (reason ``"bad-signature"``).
    """
    _verify(keys, signature, tenant, task_id, task_name, _DOMAIN)


def _verify(
    keys: Sequence[bytes],
    signature: object,
    tenant: str,
    task_id: object,
    task_name: object,
    domain: bytes,
) -> None:
    if signature is None:
        raise TenantSignatureError(
            f"the tenant header is not signed, and signing is on ({_SETTING}); the message "
            "was not published by a process holding the keys",
            reason=UNSIGNED,
        )
    if (
        not isinstance(signature, str)
        or (match := _SIGNATURE.match(signature)) is None
        or not isinstance(task_id, str)
        or not isinstance(task_name, str)
    ):
        raise TenantSignatureError(
            f"the tenant header's signature is malformed (expected {_VERSION}:<key id>:<hmac>)",
            reason=BAD_SIGNATURE,
        )
    text = _signed_text(tenant, task_id, task_name, domain)
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(_signature(key, text), signature)
    if matched:
        return
    if match.group(1) not in {key_id(key) for key in keys}:
        raise TenantSignatureError(
            f"the tenant header is signed with a key this process does not accept (key id "
            f"{match.group(1)}); when rotating keys, keep the old key in {_SETTING} until "
            "every producer signs with the new one",
            reason=BAD_SIGNATURE,
        )
    raise TenantSignatureError(
        "the tenant header's signature does not match this message's tenant, task id and "
        "task name: the header was altered or copied from another message",
        reason=BAD_SIGNATURE,
    )


def check_signature(
    app: Celery | None, tenant: str, signature: object, task_id: object, task_name: object
) -> None:
    """:func:`verify_signature` with ``app``'s keys; nothing to check when signing is off.

    Raises:
        TenantSignatureError: see :func:`verify_signature`.
        ConfigurationError: the keys setting has an unusable value.
    """
    keys = signing_keys(app)
    if keys:
        verify_signature(keys, signature, tenant, task_id, task_name)
