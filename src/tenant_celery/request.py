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

With JSON logs (:mod:`tenant_celery.logging`), the main process's lines about
the message (received, lost, timed out, revoked) name its task,
tenant and correlation id.  The task events it sends, and what ``celery
inspect`` lists of it, carry the tenant as ``tenant_id``
(:mod:`tenant_celery.events`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.concurrency.base import BasePool
from celery.worker import request as celery_request
from celery.worker.request import Request

from . import signing
from .config import header_name
from .context import _enter, _exit, parse_tenant_id
from .correlation import CORRELATION_HEADER, _usable, message_correlation
from .errors import TenantCeleryError
from .events import TENANT_FIELD
from .logging import _handling, _MainProcess
from .propagation import message_header, vouching

__all__ = ["TenantRequest"]

_LOG_CONTEXT_ATTR = "_tenant_celery_log_context"
# Celery's request module, whose ``revoked_tasks`` its revoked check reads (read at
# each check, as Celery reads it: a test or a host that swaps the set is followed).
_celery_request: Any = celery_request


class TenantRequest(Request):
    """Run the main process's handling of a message inside the message's tenant.

    The tenant is read from the message header, as the pool reads it; a
    missing, invalid or ambiguous one, or with signing on one whose signature
    does not verify, enters no tenant (never whatever the thread had), and
    only that tenant is signed for what is published meanwhile.  A task class that sets its own
    ``Request`` must derive it from this class.

    The tenant is read and verified once per message, when it is first needed
    (its log lines, its events, or its handling), and that answer serves the
    message's whole stay in the main process: a host's tenant parser that
    raises reads as no tenant, and a signing key removed while an ETA message
    waits still covers the revocation or failure stored for it here (the pool
    verifies the message again, against the keys of that moment, before it runs).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if _MainProcess.tracking:  # Celery logs "received" right after building it
            _MainProcess.received.set(self)

    def _verified_tenant(self) -> str | None:
        """The message's tenant as the pool enters it: read, validated and, with
        signing on, verified; ``None`` when it names none or one of those fails."""
        message = self.request_dict
        try:
            # The same reader as the pool's: one message, one tenant.
            raw = message_header(message, header_name(self.app))
            if raw is None:
                return None
            tenant = parse_tenant_id(raw)
            signature = message.get(signing.SIGNATURE_HEADER)
            signing.check_signature(
                self.app, tenant, signature, message.get("id"), message.get("task")
            )
        except TenantCeleryError:
            return None
        return tenant

    def _log_context(self) -> tuple[str | None, str | None]:
        """Tenant and correlation id for log lines about this message, read once.

        Only a verified tenant and a usable correlation id: a header that is
        neither is logged as ``None``, never as its text.
        """
        cached: tuple[str | None, str | None] | None = getattr(self, _LOG_CONTEXT_ATTR, None)
        if cached is not None:
            return cached
        try:
            tenant = self._verified_tenant()
        except Exception:  # a host's tenant parser must not break a log line
            tenant = None
        try:
            correlation_id = _usable(message_header(self.request_dict, CORRELATION_HEADER))
        except TenantCeleryError:
            correlation_id = None
        context = (tenant, correlation_id)
        setattr(self, _LOG_CONTEXT_ATTR, context)
        return context

    def send_event(self, type: str, **fields: Any) -> None:
        """Send a task event; a tenant task's carries its verified tenant."""
        eventer: Any = getattr(self, "_eventer", None)
        if eventer is None or not eventer.enabled or not self.task.send_events:
            return  # events off: nothing is sent, and the tenant is not read
        if TENANT_FIELD not in fields:
            tenant = self._log_context()[0]
            if tenant is not None:
                fields[TENANT_FIELD] = tenant
        eventer.send(type, uuid=self.id, **fields)

    def info(self, safe: bool = False) -> Any:
        """What ``celery inspect active/reserved/scheduled`` lists, with the tenant."""
        info: dict[str, Any] = dict(super().info(safe))
        info[TENANT_FIELD] = self._log_context()[0]
        return info

    @contextmanager
    def _message_tenant(self) -> Iterator[None]:
        message = self.request_dict
        tenant = self._log_context()[0]  # verified once per message
        token = _enter(tenant)
        try:
            # What Celery publishes here (errbacks, a chord's failure) is replayed from
            # this message: it vouches for the message's verified tenant only.
            with (
                vouching(tenant),
                message_correlation(message.get(CORRELATION_HEADER)),
                _handling(self),
            ):
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
        # Celery asks this of every message before it runs.  Its check (5.3 to 5.x)
        # reads these marks only: with none set, the message is not revoked, and no
        # tenant is read.  Otherwise the check runs in the message's tenant, since it
        # stores the revocation and may fail a chord.  Answering here, not by calling
        # the check, means a revocation that lands in between is never stored outside
        # the tenant: the task runs, as it would had the revocation come a moment later.
        if not (
            getattr(self, "_already_revoked", True)
            or self.expires
            or self.id in _celery_request.revoked_tasks  # the set Celery's check reads
            or self.stamped_headers
        ):
            return False
        with self._message_tenant():
            return bool(super().revoked())

    def terminate(self, pool: BasePool, signal: int | None = None) -> None:
        with self._message_tenant():
            super().terminate(pool, signal)
