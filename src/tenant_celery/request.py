"""The worker-side request of tenant tasks: the main process's own work runs in the tenant.

Most of a task's life is in the pool process (or thread) that runs it, where
:class:`~tenant_celery.TenantTask` enters the message's tenant.  Some outcomes
are handled in the worker's main process instead, by the message's
:class:`celery.worker.request.Request`: a hard time limit, a pool process that
was lost or terminated, a revoked or expired message, a ``Reject``.  There
Celery stores the result and, through the result backend, calls the task's
errbacks, completes or fails its chord and fails the chord's body, publishing
tasks as it goes.  No tenant had been entered in that thread, so a tenant task
published there raised :class:`~tenant_celery.TenantContextMissing` and was
lost (Celery only logs "Pool callback raised exception").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.concurrency.base import BasePool
from celery.worker.request import Request

from . import signing
from .config import header_name
from .context import _enter, _exit, parse_tenant_id
from .correlation import CORRELATION_HEADER, message_correlation
from .errors import TenantCeleryError
from .propagation import message_header, vouching

__all__ = ["TenantRequest"]


class TenantRequest(Request):
    """Run the main process's handling of a message inside the message's tenant.

    The tenant is read from the message header, as the pool reads it; a
    missing, invalid or ambiguous one, or with signing on one whose signature
    does not verify, enters no tenant (never whatever the thread had), and
    only that tenant is signed for what is published meanwhile.  A task class that sets its own
    ``Request`` must derive it from this class.
    """

    @contextmanager
    def _message_tenant(self) -> Iterator[None]:
        message = self.request_dict
        tenant: str | None = None
        try:
            # The same reader as the pool's: one message, one tenant.
            raw = message_header(message, header_name(self.app))
            if raw is not None:
                tenant = parse_tenant_id(raw)
                signature = message.get(signing.SIGNATURE_HEADER)
                signing.check_signature(
                    self.app, tenant, signature, message.get("id"), message.get("task")
                )
        except TenantCeleryError:
            tenant = None
        token = _enter(tenant)
        try:
            # What Celery publishes here (errbacks, a chord's failure) is replayed from
            # this message: it vouches for the message's verified tenant only.
            with vouching(tenant), message_correlation(message.get(CORRELATION_HEADER)):
                yield
        finally:
            _exit(token)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        with self._message_tenant():
            super().on_timeout(soft, timeout)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        with self._message_tenant():
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def revoked(self) -> bool:
        with self._message_tenant():
            return super().revoked()

    def terminate(self, pool: BasePool, signal: int | None = None) -> None:
        with self._message_tenant():
            super().terminate(pool, signal)
