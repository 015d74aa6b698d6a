"""Celery's PostgreSQL broker and result tables.

Exactly what kombu 5.x's SQLAlchemy transport and Celery 5.x's database result
backend create on first use (with the extended result columns), so workers
never need to create anything.  No server-side defaults: both libraries fill
every column from Python, and ids come from the sequences named here.

Revision ID: tc0001
Revises:
Create Date: 2025-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.schema import CreateSequence, DropSequence

from tenant_celery.migrations._objects import configured_schema

revision = "tc0001"
down_revision: str | None = None
branch_labels = ("tenant_celery",)
depends_on: str | None = None

_SEQUENCES = ("queue_id_sequence", "message_id_sequence", "task_id_sequence", "taskset_id_sequence")


def upgrade() -> None:
    schema = configured_schema(context.config)
    # The id columns take their values from these sequences (kombu and Celery call
    # nextval() themselves): no SERIAL, no column default.
    for name in _SEQUENCES:
        op.execute(CreateSequence(sa.Sequence(name, schema=schema)))

    # kombu.transport.sqlalchemy.models.Queue
    op.create_table(
        "kombu_queue",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.PrimaryKeyConstraint("id", name="kombu_queue_pkey"),
        sa.UniqueConstraint("name", name="kombu_queue_name_key"),
        schema=schema,
    )
    # kombu.transport.sqlalchemy.models.Message
    queue_id = "kombu_queue.id" if schema is None else f"{schema}.kombu_queue.id"
    op.create_table(
        "kombu_message",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("visible", sa.Boolean(), nullable=True),
        sa.Column("timestamp", sa.DateTime(), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("version", sa.SmallInteger(), nullable=False),
        sa.Column("queue_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="kombu_message_pkey"),
        sa.ForeignKeyConstraint(["queue_id"], [queue_id], name="FK_kombu_message_queue"),
        schema=schema,
    )
    op.create_index("ix_kombu_message_visible", "kombu_message", ["visible"], schema=schema)
    op.create_index("ix_kombu_message_timestamp", "kombu_message", ["timestamp"], schema=schema)
    op.create_index(
        "ix_kombu_message_timestamp_id", "kombu_message", ["timestamp", "id"], schema=schema
    )

    # celery.backends.database.models.TaskExtended (Task plus the extended columns)
    op.create_table(
        "celery_taskmeta",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("task_id", sa.String(155), nullable=True),
        sa.Column("status", sa.String(50), nullable=True),
        sa.Column("result", sa.LargeBinary(), nullable=True),
        sa.Column("date_done", sa.DateTime(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("children", sa.LargeBinary(), nullable=True),
        sa.Column("name", sa.String(155), nullable=True),
        sa.Column("args", sa.LargeBinary(), nullable=True),
        sa.Column("kwargs", sa.LargeBinary(), nullable=True),
        sa.Column("worker", sa.String(155), nullable=True),
        sa.Column("retries", sa.Integer(), nullable=True),
        sa.Column("queue", sa.String(155), nullable=True),
        sa.Column("stamps", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="celery_taskmeta_pkey"),
        sa.UniqueConstraint("task_id", name="celery_taskmeta_task_id_key"),
        schema=schema,
    )
    op.create_index("ix_celery_taskmeta_date_done", "celery_taskmeta", ["date_done"], schema=schema)

    # celery.backends.database.models.TaskSet
    op.create_table(
        "celery_tasksetmeta",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("taskset_id", sa.String(155), nullable=True),
        sa.Column("result", sa.LargeBinary(), nullable=True),
        sa.Column("date_done", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="celery_tasksetmeta_pkey"),
        sa.UniqueConstraint("taskset_id", name="celery_tasksetmeta_taskset_id_key"),
        schema=schema,
    )
    op.create_index(
        "ix_celery_tasksetmeta_date_done", "celery_tasksetmeta", ["date_done"], schema=schema
    )


def downgrade() -> None:
    schema = configured_schema(context.config)
    for table in ("kombu_message", "kombu_queue", "celery_tasksetmeta", "celery_taskmeta"):
        op.drop_table(table, schema=schema)
    for name in reversed(_SEQUENCES):
        op.execute(DropSequence(sa.Sequence(name, schema=schema)))
