"""Tenant-isolated Celery tasks on a shared PostgreSQL database.

The task, context and session API is importable from here; :data:`__all__`
lists it.  Two public submodules import Alembic and are imported on demand:
:mod:`tenant_celery.rls` (RLS policy operations, app-role provisioning) and
:mod:`tenant_celery.audit` (the inspection behind ``tenant-celery check``).
"""

from __future__ import annotations

from kombu import transport as _kombu_transport

from . import events as _events  # noqa: F401 (the tenant in events, Flower and inspect)
from . import propagation as _propagation  # noqa: F401 (connects the signal receivers)
from .config import DEFAULT_GUC, DEFAULT_HEADER
from .context import (
    TenantIdParser,
    current_tenant,
    integer_tenant_id,
    parse_tenant_id,
    require_tenant,
    set_tenant_id_parser,
    slug_tenant_id,
    tenant_context,
    uuid_tenant_id,
)
from .correlation import CORRELATION_HEADER, correlation_context, current_correlation_id
from .db import (
    async_set_tenant_guc,
    async_tenant_session,
    bind_tenant_guc,
    set_tenant_guc,
    tenant_session,
)
from .errors import (
    ConfigurationError,
    InvalidTenantId,
    MigrationError,
    RLSSetupError,
    TenantCeleryError,
    TenantConflict,
    TenantContextMissing,
    TenantSignatureError,
    TransactionRequired,
    TransactionTenantMismatch,
)
from .fanout import every_tenant, fan_out
from .logging import JsonFormatter, configure_logging
from .metrics import install_metrics
from .monitor import WorkerMonitor
from .signals import tenant_entered, tenant_rejected
from .task import TENANT_ARG, TenantTask, tenant_task

__version__ = "0.1.0.dev0"

# ``tcpg+postgresql://...`` broker URLs select the package's transport (imported
# by kombu when a connection first needs it).
_kombu_transport.TRANSPORT_ALIASES.setdefault("tcpg", "tenant_celery.transport:Transport")

__all__ = [
    "CORRELATION_HEADER",
    "DEFAULT_GUC",
    "DEFAULT_HEADER",
    "TENANT_ARG",
    "ConfigurationError",
    "InvalidTenantId",
    "JsonFormatter",
    "MigrationError",
    "RLSSetupError",
    "TenantCeleryError",
    "TenantConflict",
    "TenantContextMissing",
    "TenantIdParser",
    "TenantSignatureError",
    "TenantTask",
    "TransactionRequired",
    "TransactionTenantMismatch",
    "WorkerMonitor",
    "__version__",
    "async_set_tenant_guc",
    "async_tenant_session",
    "bind_tenant_guc",
    "configure_logging",
    "correlation_context",
    "current_correlation_id",
    "current_tenant",
    "every_tenant",
    "fan_out",
    "install_metrics",
    "integer_tenant_id",
    "parse_tenant_id",
    "require_tenant",
    "set_tenant_guc",
    "set_tenant_id_parser",
    "slug_tenant_id",
    "tenant_context",
    "tenant_entered",
    "tenant_rejected",
    "tenant_session",
    "tenant_task",
    "uuid_tenant_id",
]
