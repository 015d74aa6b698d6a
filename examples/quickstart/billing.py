"""The quickstart's part 2: tenant tasks on a table under row-level security."""

import functools
import os

import sqlalchemy as sa
from celery import Celery

from tenant_celery import bind_tenant_guc, current_tenant, tenant_task

#: Where setup_db.py starts the embedded PostgreSQL (data and socket).
EMBEDDED_DIR = "/tmp/tenant-celery-quickstart"
#: A superuser: yours if you set QUICKSTART_DATABASE_URL, else the embedded one's.
ADMIN_URL = sa.make_url(
    os.environ.get("QUICKSTART_DATABASE_URL")
    or f"postgresql://postgres@/postgres?host={EMBEDDED_DIR}"
).set(drivername="postgresql+psycopg")
#: The role the worker connects as: it can log in, and nothing more.
APP_ROLE = "billing_app"
APP_PASSWORD = "quickstart-only"  # a tutorial's password: never reuse it
APP_URL = ADMIN_URL.set(username=APP_ROLE, password=APP_PASSWORD)

app = Celery(
    "billing",
    broker="redis://localhost:6379/0",
    backend="redis://localhost:6379/1",
)
app.conf.task_default_queue = "billing"  # a queue of its own, away from part 1's tasks

metadata = sa.MetaData()
invoices = sa.Table(
    "invoices",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("tenant_id", sa.Uuid(as_uuid=False), nullable=False),
    sa.Column("number", sa.Text, nullable=False),
    sa.Index("invoices_tenant", "tenant_id", "id"),
)


@functools.cache
def engine() -> sa.Engine:
    """This process's engine as the app role, made on first use (after the fork)."""
    new = sa.create_engine(APP_URL)
    bind_tenant_guc(new, strict=True)  # each transaction is set to the current tenant
    return new


@tenant_task(app=app)
def add_invoice(number: str) -> str:
    with engine().begin() as conn:
        conn.execute(invoices.insert().values(tenant_id=current_tenant(), number=number))
    return number


@tenant_task(app=app)
def list_invoices() -> list[str]:
    with engine().begin() as conn:  # no WHERE: the table's policy picks the rows
        return list(conn.scalars(sa.select(invoices.c.number).order_by(invoices.c.id)))
