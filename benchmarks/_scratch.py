"""The run's scratch database and roles: created at the start, dropped at the end.

On the server named by ``TENANT_CELERY_BENCH_DSN`` (a superuser DSN) a run
creates, all named ``tcbench_<pid>_<hex>...``:

* a database, with :data:`~benchmarks._common.ITEMS_TABLE` under the
  package's own tenant policy (:func:`tenant_celery.rls.enable_tenant_rls`,
  forced) and the bundled migration's Celery tables
  (:func:`tenant_celery.migrations.upgrade`);
* the app role (:func:`tenant_celery.rls.create_app_role`: no superuser, no
  BYPASSRLS, owns nothing), granted the items table and the Celery tables;
* a ``BYPASSRLS`` role for the plain baseline task of P1, which row-level
  security does not filter (a host without tenancy).

:func:`scratch` drops all of it on the way out, whatever happened; a run that
was killed outright leaves its objects behind, and the next run on the same
machine drops those whose process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import URL
from tests._rig.postgres import is_local, libpq_kwargs, pid_alive

from tenant_celery._pg import database_url
from tenant_celery.migrations import upgrade
from tenant_celery.rls import create_app_role, enable_tenant_rls, grant_tenant_tables

from ._common import ITEMS_TABLE

PREFIX = "tcbench_"
_STALE = re.compile(rf"^{PREFIX}(\d+)_[0-9a-f]{{6}}(_app|_plain)?$")
ROLE_PASSWORD = "tcbench"  # local scratch roles, dropped after the run

SEED_TENANTS = 50
"""Tenants whose rows are in the items table before any timing."""


@dataclass(frozen=True)
class Scratch:
    """Names and URLs of one run's scratch objects."""

    server_url: URL
    database: str
    app_role: str
    plain_role: str

    @property
    def admin_url(self) -> URL:
        return self.server_url.set(database=self.database)

    @property
    def app_url(self) -> URL:
        return self.admin_url.set(username=self.app_role, password=ROLE_PASSWORD)

    @property
    def plain_url(self) -> URL:
        return self.admin_url.set(username=self.plain_role, password=ROLE_PASSWORD)


def seed_tenants() -> list[str]:
    """The tenants the items table is seeded with (fixed, so runs are comparable)."""
    return [
        str(uuid.uuid5(uuid.NAMESPACE_URL, f"tenant-celery-bench-{n}")) for n in range(SEED_TENANTS)
    ]


def connect(url: URL, *, autocommit: bool = True) -> psycopg.Connection[tuple[object, ...]]:
    """A psycopg connection to ``url`` (a SQLAlchemy URL), autocommit by default."""
    return psycopg.connect(**libpq_kwargs(url), autocommit=autocommit)


def _drop(conn: psycopg.Connection[tuple[object, ...]], database: str, roles: list[str]) -> None:
    conn.execute(
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
    )
    for role in roles:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _drop_stale(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Drop what runs killed outright left on this machine's server."""
    databases = [r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()]
    roles = [r[0] for r in conn.execute("SELECT rolname FROM pg_roles").fetchall()]
    for name in databases:
        match = _STALE.match(str(name))
        if match and not pid_alive(int(match.group(1))):
            _drop(conn, str(name), [str(r) for r in roles if str(r).startswith(f"{name}_")])
    for role in roles:
        match = _STALE.match(str(role))
        if match and match.group(2) and not pid_alive(int(match.group(1))):
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(str(role))))


def _create(scratch: Scratch, rows_per_tenant: int) -> None:
    with connect(scratch.server_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(scratch.database)))
    engine = sa.create_engine(scratch.admin_url, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            create_app_role(conn, scratch.app_role, login=True, password=ROLE_PASSWORD)
            # The plain baseline: a role row-level security does not filter.
            conn.exec_driver_sql(
                f'CREATE ROLE "{scratch.plain_role}" WITH LOGIN NOSUPERUSER BYPASSRLS '
                f"PASSWORD '{ROLE_PASSWORD}'"
            )
            for role in (scratch.app_role, scratch.plain_role):
                conn.exec_driver_sql(f'GRANT CONNECT ON DATABASE "{scratch.database}" TO "{role}"')
                conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA public TO "{role}"')
            conn.exec_driver_sql("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            # The key leads with the tenant, as multi-tenant keys should: the only
            # index, so "the tenant's newest row" is one short backward index scan
            # whatever plan the statement cache settles on.
            conn.exec_driver_sql(
                f"CREATE TABLE {ITEMS_TABLE} ("
                "tenant_id uuid NOT NULL, "
                "id bigint GENERATED ALWAYS AS IDENTITY, "
                "payload text NOT NULL, "
                "created_at timestamptz NOT NULL DEFAULT now(), "
                "PRIMARY KEY (tenant_id, id))"
            )
            enable_tenant_rls(conn, ITEMS_TABLE)
            grant_tenant_tables(conn, scratch.app_role, [ITEMS_TABLE])
            grant_tenant_tables(conn, scratch.plain_role, [ITEMS_TABLE])
            conn.execute(
                sa.text(
                    f"INSERT INTO {ITEMS_TABLE} (tenant_id, payload) "
                    "SELECT CAST(t AS uuid), 'seed ' || n "
                    "FROM generate_series(1, :rows) AS n, unnest(CAST(:tenants AS text[])) AS t "
                    "ORDER BY n, t"
                ),
                {"tenants": seed_tenants(), "rows": rows_per_tenant},
            )
            conn.exec_driver_sql(f"ANALYZE {ITEMS_TABLE}")
        upgrade(engine, grant_to=[scratch.app_role])
    finally:
        engine.dispose()


@contextlib.contextmanager
def scratch(server_dsn: str, *, rows_per_tenant: int) -> Iterator[Scratch]:
    """Create the run's database and roles; drop them when the block ends, however it ends.

    Raises:
        RuntimeError: the server cannot be reached or the DSN's user is not a
            superuser (nothing was created).
    """
    server_url = database_url(server_dsn)
    try:
        with connect(server_url) as conn:
            row = conn.execute(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
            if not row or not row[0]:
                raise RuntimeError(
                    f"{server_url.render_as_string(hide_password=True)}: the benchmark needs a "
                    "superuser DSN (it creates a database and roles, one with BYPASSRLS)"
                )
            if is_local(server_url):
                _drop_stale(conn)
    except psycopg.Error as exc:
        raise RuntimeError(
            f"cannot connect to PostgreSQL at {server_url.render_as_string(hide_password=True)}: "
            f"{exc}".strip()
        ) from exc
    name = f"{PREFIX}{os.getpid()}_{secrets.token_hex(3)}"
    found = Scratch(server_url, name, f"{name}_app", f"{name}_plain")
    try:
        _create(found, rows_per_tenant)
        yield found
    finally:
        with connect(server_url) as conn:
            _drop(conn, found.database, [found.app_role, found.plain_role])
