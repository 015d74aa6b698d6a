"""Exceptions raised by tenant-celery.

Every exception the package raises on purpose derives from one root, so a host
can catch them all with a single ``except``::

    TenantCeleryError
    ├── TenantContextMissing     no tenant where one is required
    │   └── TenantSignatureError a tenant header without a valid signature
    ├── TenantConflict           two sources name different tenants
    │   └── TransactionTenantMismatch  a statement outside its transaction's tenant
    ├── InvalidTenantId          a tenant id failed validation (also a ValueError)
    ├── ConfigurationError       a setting has an unusable value (also a ValueError)
    ├── TransactionRequired      a transaction-local setting outside a transaction
    ├── MigrationError           the bundled migration could not be applied or read
    └── RLSSetupError            the database is not fit for tenant RLS as asked

The pytest plugin's assertion errors (``tenant_celery.testing.TenantLeak`` and
``IsolationNotProvable``) derive from the same root.

Each class's docstring is its default message.  Messages say what was wrong
and what to do next; they never echo a tenant id that failed validation, since
a malformed id may be a secret pasted into the wrong field.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "InvalidTenantId",
    "MigrationError",
    "RLSSetupError",
    "TenantCeleryError",
    "TenantConflict",
    "TenantContextMissing",
    "TenantSignatureError",
    "TransactionRequired",
    "TransactionTenantMismatch",
]


class TenantCeleryError(Exception):
    """tenant-celery error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class TenantContextMissing(TenantCeleryError):
    """no tenant is set: run the code inside tenant_context(...) or pass tenant_id=..."""


class TenantConflict(TenantCeleryError):
    """two sources name different tenants for one task; a task runs in exactly one tenant"""


class TransactionTenantMismatch(TenantConflict):
    """the transaction began under another tenant (or none), so the statement was
    refused before it reached the server; commit or roll the transaction back, then
    begin a new one inside the tenant it is for"""


class InvalidTenantId(TenantCeleryError, ValueError):
    """the tenant id is not valid for the configured tenant id parser"""


class ConfigurationError(TenantCeleryError, ValueError):
    """a tenant-celery setting has an unusable value"""


class TransactionRequired(TenantCeleryError):
    """the tenant setting is transaction-local and no transaction is open: begin one
    first (``with conn.begin(): ...``) or use tenant_session()"""


class TenantSignatureError(TenantContextMissing):
    """the message's tenant header is not signed with an accepted key, so the message
    counts as naming no tenant; publish it from a process configured with the same
    tenant_celery_header_signing_keys"""

    #: ``"unsigned"`` or ``"bad-signature"``: the ``reason`` of ``tenant_rejected``.
    reason: str = "bad-signature"

    def __init__(self, message: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class RLSSetupError(TenantCeleryError):
    """the database is not in a state where tenant row-level security can be set up
    safely; nothing was changed"""


class MigrationError(TenantCeleryError):
    """the bundled migration failed; nothing was changed, since each call runs in one
    transaction: fix the cause named here and run it again"""
