"""The storefront's Alembic environment: run as the tables' owner, online only.

The URL is ``STOREFRONT_MIGRATION_URL``.  Celery's broker and result tables
belong to tenant-celery's bundled migration (``python -m storefront
migrate``), which records its revision in a version table of its own: they
are left out of autogenerate here.
"""

from __future__ import annotations

from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context
from storefront import settings
from storefront.models import Base

from tenant_celery.migrations import TABLES, VERSION_TABLE

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

_NOT_OURS = frozenset((*TABLES, VERSION_TABLE))


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    return not (type_ == "table" and name in _NOT_OURS)


def run_migrations_online() -> None:
    engine = sa.create_engine(settings.migration_url(), poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                include_name=include_name,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    # The revisions read the database (column types, the role to grant to).
    raise SystemExit("the storefront's migrations run online only: drop --sql")
run_migrations_online()
