"""Signals sent by tenant tasks, for host code to hook into.

Connect to them like any Celery signal::

    import sentry_sdk
    from tenant_celery.signals import tenant_entered

    @tenant_entered.connect
    def tag_errors(sender, tenant_id, **kwargs):
        sentry_sdk.set_tag("tenant", tenant_id)

Receivers run in the worker process (or the caller's, in eager mode), on the
thread that runs the task.  An exception in a receiver is logged by Celery and
does not stop the task.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["tenant_entered", "tenant_rejected"]

tenant_entered = Signal(
    name="tenant_entered",
    providing_args=["tenant_id", "request"],
)
"""Sent once the tenant context of a tenant task is set, just before its body
runs.  ``sender`` is the task; ``tenant_id`` the canonical tenant id;
``request`` the task's request."""

tenant_rejected = Signal(
    name="tenant_rejected",
    providing_args=["reason", "exc", "request"],
)
"""Sent when a tenant task is refused before its body runs.  ``sender`` is the
task; ``reason`` is ``"missing"``, ``"invalid"`` or ``"conflict"``, and with
signed tenant headers on, ``"unsigned"`` or ``"bad-signature"``; ``exc`` the
exception the task fails with; ``request`` the task's request."""
