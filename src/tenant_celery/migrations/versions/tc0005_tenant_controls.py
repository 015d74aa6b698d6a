"""Per-tenant controls of the package's transport: pause and rate limit.

One row per tenant and queue (``queue = ''``: every queue) that an operator
paused or rate-limited with :mod:`tenant_celery.tenants`.  Every claim reads
it, so every worker obeys it, including workers started later; a tenant
without a row is claimed as before.  A rate-limited row is also a token
bucket: ``tokens`` as of ``refilled_at``, refilled at ``rate`` per second up
to ``burst``, spent by the claims that take the tenant's messages (they lock
the row while they claim, so workers on several hosts share one bucket).

The function ``tenant_celery_eta(payload)`` reads a message's ETA header (Celery's
protocol 2) for the per-tenant counts of delayed messages; ``NULL`` when there is
none or it is not a valid time, so that no message, whatever its headers, makes
those counts fail.

Revision ID: tc0005
Revises: tc0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from tenant_celery._pg import qualified
from tenant_celery.migrations._objects import carry_grants_statement, configured_schema

revision = "tc0005"
down_revision: str | None = "tc0004"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None

TABLE = "tenant_celery_tenant_control"
FUNCTION = "tenant_celery_eta"

# kombu's JSON writes ", " and ": " between items; the body is base64-encoded, so
# only the headers can match.  A string that matches but is no valid time (a forged
# header: month 13, February 31) reads NULL instead of failing the statement.
_ETA_FUNCTION = r"""
CREATE FUNCTION {name}(payload text) RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE SET search_path = pg_catalog AS $eta$
BEGIN
  RETURN substring(payload FROM
    '"eta": "(\d{{4}}-\d\d-\d\d[T ][0-9:.]+(?:[+-]\d\d:?\d\d|Z)?)"')::timestamptz;
EXCEPTION WHEN others THEN
  RETURN NULL;
END
$eta$
"""

# Room on each page for the token updates to be HOT; the table holds a few rows
# per controlled tenant, rewritten by every claim that spends a bucket.
_STORAGE = (
    "fillfactor = 50, autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 200"
)


def upgrade() -> None:
    schema = configured_schema(context.config)
    op.create_table(
        TABLE,
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False, comment="'' for every queue"),
        sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("rate", sa.Float(), nullable=True, comment="messages per second"),
        sa.Column("burst", sa.Float(), nullable=True, comment="most messages at once"),
        sa.Column("tokens", sa.Float(), nullable=False, server_default="0"),
        sa.Column(
            "refilled_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "changed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("tenant", "queue", name=f"{TABLE}_pkey"),
        sa.CheckConstraint(
            "rate IS NULL OR (rate > 0 AND burst >= 1 AND queue <> '')",
            name=f"{TABLE}_rate_check",
        ),
        schema=schema,
    )
    op.execute(f"ALTER TABLE {qualified(TABLE, schema)} SET ({_STORAGE})")
    op.execute(_ETA_FUNCTION.format(name=qualified(FUNCTION, schema)))
    _carry_grants(schema)


def _carry_grants(schema: str | None) -> None:
    # The roles that may use the transport's message table may read and spend the
    # controls (every claim does): the same privileges.
    op.execute(carry_grants_statement("tenant_celery_message", [TABLE], schema))


def downgrade() -> None:
    schema = configured_schema(context.config)
    op.execute(f"DROP FUNCTION {qualified(FUNCTION, schema)}(text)")
    op.drop_table(TABLE, schema=schema)
