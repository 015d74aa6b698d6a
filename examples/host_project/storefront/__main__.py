"""``python -m storefront``: deploy-time and hand-run commands.

``python -m storefront migrate``
    Create Celery's broker and result tables with tenant-celery's bundled
    migration, as the owner (``STOREFRONT_MIGRATION_URL``), and grant them to
    the application role (the user of ``STOREFRONT_DATABASE_URL``).
``python -m storefront place TENANT CUSTOMER:CENTS [CUSTOMER:CENTS ...]``
    Enqueue one ``place_order`` task per order inside the tenant, wait for a
    worker to run them, and print one JSON line per order.

Errors are one line on standard error, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from storefront import settings
from tenant_celery import TenantCeleryError, correlation_context, tenant_context
from tenant_celery.migrations import upgrade


def migrate() -> None:
    role = settings.app_role()
    revision = upgrade(settings.migration_url(), grant_to=[role])
    print(f"Celery broker and result tables at revision {revision}, granted to {role}")


def place(tenant: str, orders: Sequence[tuple[str, int]], timeout: float) -> None:
    # Imported here: the app reads STOREFRONT_DATABASE_URL when it is created.
    from storefront.tasks import place_order  # noqa: PLC0415

    # One correlation id for the whole command: its tasks' log lines share it.
    with correlation_context(), tenant_context(tenant):
        results = [place_order.delay(customer, cents) for customer, cents in orders]
    for result in results:
        placed = result.get(timeout=timeout)
        print(json.dumps({"task_id": result.id, **placed}), flush=True)


def _order(text: str) -> tuple[str, int]:
    customer, _, cents = text.rpartition(":")
    if not customer or not cents.isdigit():
        raise argparse.ArgumentTypeError(f"expected CUSTOMER:CENTS, got {text!r}")
    return customer, int(cents)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m storefront", description="Storefront commands."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="create and grant Celery's broker and result tables")
    placing = commands.add_parser("place", help="place orders for a tenant and wait for them")
    placing.add_argument("tenant", help="the tenant's id (a UUID)")
    placing.add_argument("orders", nargs="+", type=_order, metavar="CUSTOMER:CENTS")
    placing.add_argument("--timeout", type=float, default=30.0, help="seconds to wait per order")
    args = parser.parse_args(argv)
    try:
        if args.command == "migrate":
            migrate()
        else:
            place(args.tenant, args.orders, args.timeout)
    except (settings.SettingsError, TenantCeleryError) as exc:
        print(f"storefront {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
