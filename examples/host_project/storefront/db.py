"""The sessions tasks use: one engine per process, bound to the current tenant.

:func:`sessions` creates the engine on first use, after the prefork pool has
forked, and binds it with :func:`~tenant_celery.bind_tenant_guc`: every
transaction begun inside a tenant sets that tenant first, and one begun
outside any tenant raises :class:`~tenant_celery.TenantContextMissing`.
"""

from __future__ import annotations

import os
import threading

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from storefront import settings
from tenant_celery import bind_tenant_guc

_lock = threading.Lock()
_factory: sessionmaker[Session] | None = None
_pid = 0


def sessions() -> sessionmaker[Session]:
    """This process's session factory, made and bound on first use."""
    global _factory, _pid
    with _lock:
        if _factory is None or _pid != os.getpid():
            engine = sa.create_engine(settings.database_url(), pool_size=2, max_overflow=2)
            factory = sessionmaker(engine, expire_on_commit=False)
            bind_tenant_guc(factory, strict=True)
            _factory, _pid = factory, os.getpid()
        return _factory
