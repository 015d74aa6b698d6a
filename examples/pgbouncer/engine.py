"""An engine for the application role, through PgBouncer in transaction mode."""

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from tenant_celery import bind_tenant_guc


def pgbouncer_engine(url: str, *, pool_size: int = 5) -> Engine:
    """Connect to PgBouncer (``postgresql+psycopg://app@pgbouncer:6432/shop``)
    and set the tenant at the start of every transaction."""
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=True,
        # PgBouncer before 1.21 cannot follow a server-side prepared statement
        # from one transaction to the next; psycopg 3 prepares a query after
        # five runs unless told not to.
        connect_args={"prepare_threshold": None},
    )
    bind_tenant_guc(engine, strict=True)
    return engine
