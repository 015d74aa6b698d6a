"""The ``notes`` table the database tests share: tenant rows under the package's RLS policy.

It is owned by the superuser and only granted to ``app_user``, so reads and
writes through ``app_user`` are filtered by the policy.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Engine

from tenant_celery.rls import enable_tenant_rls, grant_tenant_tables
from tests._rig.postgres import APP_ROLE

DDL = """
CREATE TABLE notes (
    id bigserial PRIMARY KEY,
    tenant_id uuid NOT NULL,
    body text NOT NULL
);
CREATE INDEX notes_tenant ON notes (tenant_id);
"""


def create_notes(admin_engine: Engine) -> None:
    """Create ``notes`` under the package's tenant policy and grant it (and its
    sequence) to ``app_user``."""
    with admin_engine.begin() as conn:
        conn.execute(text(DDL))
        enable_tenant_rls(conn, "notes")
        grant_tenant_tables(conn, APP_ROLE, ["notes"])
        conn.execute(text(f"GRANT USAGE ON SEQUENCE notes_id_seq TO {APP_ROLE}"))


def count_all(admin_engine: Engine) -> int:
    """Rows in ``notes`` across all tenants (the superuser bypasses RLS)."""
    with admin_engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM notes")).scalar_one())
