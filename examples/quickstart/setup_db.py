"""The quickstart's part 2: the invoices table under row-level security, and the app role.

``python setup_db.py`` creates them (on the embedded PostgreSQL, started first,
unless QUICKSTART_DATABASE_URL names a server); ``python setup_db.py --drop``
removes them, and stops and deletes the embedded server.
"""

import os
import sys

import sqlalchemy as sa
from billing import ADMIN_URL, APP_PASSWORD, APP_ROLE, EMBEDDED_DIR, metadata

from tenant_celery.rls import create_app_role, enable_tenant_rls, grant_tenant_tables

drop = "--drop" in sys.argv
if not os.environ.get("QUICKSTART_DATABASE_URL"):
    import pgserver  # the `embedded` extra: PostgreSQL in a wheel

    # It keeps running after this script ends; with --drop it stops, and its data goes.
    pgserver.get_server(EMBEDDED_DIR, cleanup_mode="delete" if drop else None)

admin = sa.create_engine(ADMIN_URL)  # a superuser: it owns the table
with admin.begin() as conn:
    if drop:
        conn.execute(sa.text("DROP TABLE IF EXISTS invoices"))
        conn.execute(sa.text(f"DROP ROLE IF EXISTS {APP_ROLE}"))
    else:
        if not sa.inspect(conn).has_table("invoices"):
            metadata.create_all(conn)
            enable_tenant_rls(conn, "invoices")
        create_app_role(conn, APP_ROLE, login=True, password=APP_PASSWORD)
        grant_tenant_tables(conn, APP_ROLE, ["invoices"])
admin.dispose()

if drop:
    print(f"removed the invoices table and the role {APP_ROLE}")
else:
    print("invoices: row-level security on and forced, policy tenant_isolation_policy")
    print(f"role {APP_ROLE}: logs in, uses invoices; no superuser, no BYPASSRLS, owns nothing")
