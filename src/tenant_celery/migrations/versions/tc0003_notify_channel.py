"""The ``NOTIFY`` channel of each auto-delete queue of the package's transport.

Messages to an auto-delete queue (Celery's events, remote control and its
replies) are sent with ``pg_notify`` on a channel that only the connection
that consumes the queue listens on.  Any role that can connect to the
database may ``LISTEN`` and ``NOTIFY`` on any channel, so the channel's name
is random, chosen when a connection starts to consume the queue and kept in
this column: only a role that may read the queue table can learn it, as only
such a role can read the messages the table holds.  ``NULL`` for a queue
whose messages are stored.

Revision ID: tc0003
Revises: tc0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from tenant_celery.migrations._objects import configured_schema

revision = "tc0003"
down_revision: str | None = "tc0002"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column(
        "tenant_celery_queue",
        sa.Column("notify_channel", sa.Text(), nullable=True),
        schema=configured_schema(context.config),
    )


def downgrade() -> None:
    op.drop_column(
        "tenant_celery_queue", "notify_channel", schema=configured_schema(context.config)
    )
