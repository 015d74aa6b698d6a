"""Alembic environment of tenant-celery's bundled migration.

Run by :mod:`tenant_celery.migrations` (``upgrade()``, ``downgrade()``, ``sql()``
and the ``tenant-celery migrate`` command), which pass it their options.  A host
that wants these revisions in its own Alembic environment does not use this
file: it adds ``tenant_celery.migrations:versions`` to its ``version_locations``.
"""

from tenant_celery.migrations._env import run

run()
