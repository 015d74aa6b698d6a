"""What the bundled migration creates, and how its names are written in SQL.

Shared by the public API, the Alembic environment and the revision scripts
(which may run inside a host's own Alembic environment, so they read their
options from the Alembic configuration, never from this package's callers).
"""

from __future__ import annotations

from collections.abc import Iterable

from alembic.config import Config

from .. import _result_tables
from .._pg import identifier, qualified, quote
from ..errors import ConfigurationError

BRANCH = "tenant_celery"
"""Alembic branch label of the bundled revisions (``alembic upgrade tenant_celery@head``)."""

VERSION_TABLE = "tenant_celery_alembic_version"
"""Version table :func:`~tenant_celery.migrations.upgrade` records its revision in."""

TABLES = (
    "kombu_queue",
    "kombu_message",
    "celery_taskmeta",
    "celery_tasksetmeta",
    "tenant_celery_queue",
    "tenant_celery_binding",
    "tenant_celery_message",
    "tenant_celery_tenant_control",
)
"""The tables the migration creates: kombu's SQLAlchemy broker, Celery's result
backend, then the package's own transport (:mod:`tenant_celery.transport`) and
its tenant controls (:mod:`tenant_celery.tenants`)."""

RESULT_TABLES = _result_tables.RESULT_TABLES
"""Celery's result tables (tasks, then groups) among :data:`TABLES`: from revision
``tc0004`` each row names its tenant in :data:`TENANT_COLUMN`."""

TENANT_COLUMN = _result_tables.TENANT_COLUMN
"""Column of the :data:`RESULT_TABLES` holding the tenant a result was stored in
(``text``, ``NULL`` for a result stored outside any tenant)."""

SEQUENCES = ("queue_id_sequence", "message_id_sequence", "task_id_sequence", "taskset_id_sequence")
"""The sequences the migration creates for the first four :data:`TABLES`, in the same
order (the transport's message table numbers its rows with an identity column)."""

TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
"""Privileges ``grant_to`` roles get on each of :data:`TABLES`."""

LOCK_ID = 0x7463_6D69_6772_6174  # "tcmigrat"
"""Key of the transaction-level advisory lock every online run holds (one database)."""

SCHEMA_OPTION = "tenant_celery_schema"
"""Alembic main option (``[alembic]`` key of an ini file) naming the schema of the tables."""


def configured_schema(config: Config) -> str | None:
    """The schema the revisions put the tables in: the :data:`SCHEMA_OPTION` main option.

    ``None`` (the connection's default, normally ``public``) when the option is unset.
    """
    value = config.get_main_option(SCHEMA_OPTION)
    return identifier(value, SCHEMA_OPTION) if value else None


def grant_statements(
    roles: Iterable[str], *, schema: str | None = None, tables: Iterable[str] | None = None
) -> list[str]:
    """The ``GRANT`` statements that let each role in ``roles`` use the tables.

    Each role gets ``SELECT, INSERT, UPDATE, DELETE`` on the :data:`TABLES`, ``USAGE`` on
    the :data:`SEQUENCES` and, when ``schema`` is given, ``USAGE`` on the schema: what
    kombu's SQLAlchemy transport and Celery's database backend need, and no more (no
    ``CREATE``, ``TRUNCATE`` or ownership). Run them after the tables exist, for
    example from a host revision whose ``depends_on`` names the bundled revision::

        for statement in grant_statements(["app_user"]):
            op.execute(statement)

    ``GRANT`` is idempotent, so running them again changes nothing.

    ``tables`` limits the grants to those of :data:`TABLES` (for a database at an
    older revision, which lacks the newer tables); the sequences are granted with
    the first four tables, whose ids they number.

    Raises:
        ConfigurationError: a role or schema name PostgreSQL cannot use as written.
    """
    if isinstance(roles, str):
        raise ConfigurationError(
            f"roles must be a list of role names, not the string {roles!r}; "
            f"write [{roles!r}] for one role"
        )
    names = [identifier(role, "a role to grant to") for role in roles]
    if schema is not None:
        identifier(schema, "schema")
    chosen = TABLES if tables is None else tuple(name for name in TABLES if name in set(tables))
    table_list = ", ".join(qualified(table, schema) for table in chosen)
    sequences = ", ".join(qualified(sequence, schema) for sequence in SEQUENCES)
    statements = []
    for role in dict.fromkeys(names):
        grantee = quote(role)
        if schema is not None:
            statements.append(f"GRANT USAGE ON SCHEMA {quote(schema)} TO {grantee}")
        if chosen:
            privileges = ", ".join(TABLE_PRIVILEGES)
            statements.append(f"GRANT {privileges} ON TABLE {table_list} TO {grantee}")
        if TABLES[0] in chosen:
            statements.append(f"GRANT USAGE ON SEQUENCE {sequences} TO {grantee}")
    return statements


# Roles that were granted one of the tables (``granted_like``) get ``tables`` too,
# with the same privileges: a revision that adds tables runs after a host's grant
# revision that granted the earlier ones.
_CARRY_GRANTS = """
DO $carry$
DECLARE grantee_role text; privilege text;
BEGIN
  FOR grantee_role, privilege IN
    SELECT DISTINCT g.grantee, g.privilege_type FROM information_schema.role_table_grants AS g
    WHERE g.table_schema = {schema} AND g.table_name = {granted_like}
      AND g.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'DELETE')
      AND g.grantee <> current_user AND g.grantee <> 'PUBLIC'
  LOOP
    EXECUTE format('GRANT %s ON TABLE {tables} TO %I', privilege, grantee_role);
  END LOOP;
END
$carry$
"""


def carry_grants_statement(granted_like: str, tables: Iterable[str], schema: str | None) -> str:
    """The statement that grants ``tables`` (in ``schema``) to every role that holds
    privileges on ``granted_like``, the same privileges."""
    where = "current_schema()" if schema is None else "'" + schema.replace("'", "''") + "'"
    names = ", ".join(qualified(name, schema) for name in tables)
    like = "'" + granted_like.replace("'", "''") + "'"
    return _CARRY_GRANTS.format(schema=where, granted_like=like, tables=names.replace("%", "%%"))
