"""The ``notes`` table the database tests share: tenant rows under an RLS policy.

It is owned by the superuser and only granted to ``app_user``, so reads and
writes through ``app_user`` are filtered by the policy.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests._rig.postgres import APP_ROLE

TENANT = "(SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid)"

DDL = f"""
CREATE TABLE notes (
    id bigserial PRIMARY KEY,
    tenant_id uuid NOT NULL,
    body text NOT NULL
);
CREATE INDEX notes_tenant ON notes (tenant_id);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
ALTER TABLE notes FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON notes
    USING (tenant_id = {TENANT})
    WITH CHECK (tenant_id = {TENANT});
"""


def create_notes(admin_engine: Engine) -> None:
    """Create ``notes`` with its policy and grant it (and its sequence) to ``app_user``."""
    with admin_engine.begin() as conn:
        conn.execute(text(DDL))
        conn.execute(text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO {APP_ROLE}"))
        conn.execute(text(f"GRANT USAGE ON SEQUENCE notes_id_seq TO {APP_ROLE}"))


def count_all(admin_engine: Engine) -> int:
    """Rows in ``notes`` across all tenants (the superuser bypasses RLS)."""
    with admin_engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM notes")).scalar_one())
