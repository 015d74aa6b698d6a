"""The bundled migration beside a host's own Alembic project in one database: each
history moves on its own, and the documented recipe that runs our revisions from the
host's environment (``alembic upgrade tenant_celery@head``) works, and so does the
result backend how-to's host revision that puts the result tables under the policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import alembic
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError

from tenant_celery.migrations import (
    RESULT_TABLES,
    TABLES,
    VERSION_TABLE,
    current,
    downgrade,
    upgrade,
)
from tests._rig.pages import python_blocks
from tests._rig.postgres import APP_ROLE, Database, render

#: ``path_separator`` (and ``newline``) arrived in Alembic 1.16; before, the
#: separator of ``version_locations`` is ``version_path_separator``.
ALEMBIC_HAS_PATH_SEPARATOR = tuple(map(int, alembic.__version__.split(".")[:2])) >= (1, 16)

HOST_ENV = """\
import sqlalchemy as sa
from alembic import context

config = context.config
if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url"), poolclass=sa.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
"""

HOST_WIDGETS = '''\
"""widgets"""
import sqlalchemy as sa
from alembic import op

revision = "h001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("widgets", sa.Column("id", sa.Integer, primary_key=True))


def downgrade():
    op.drop_table("widgets")
'''

# The recipe's grant revision: the host's role may use the Celery tables.
HOST_GRANTS = '''\
"""let app_user use the Celery tables"""
from alembic import op

from tenant_celery.migrations import grant_statements

revision = "h002"
down_revision = "h001"
branch_labels = None
depends_on = "tc0001"


def upgrade():
    for statement in grant_statements(["app_user"]):
        op.execute(statement)


def downgrade():
    pass
'''


def host_project(root: Path, database: Database, *, include_ours: bool, **options: str) -> Config:
    """Write a host Alembic project under ``root`` and return its configuration."""
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    (root / "migrations" / "env.py").write_text(HOST_ENV)
    (versions / "h001_widgets.py").write_text(HOST_WIDGETS)
    locations = ["%(here)s/migrations/versions"]
    if include_ours:
        (versions / "h002_grants.py").write_text(HOST_GRANTS)
        # One location a line: the ":" of the package resource would split under
        # path_separator = os.
        locations.append("tenant_celery.migrations:versions")
    if ALEMBIC_HAS_PATH_SEPARATOR:
        listed = ["path_separator = newline", "version_locations ="]
        listed += [f"    {location}" for location in locations]
    else:  # the compatibility page's recipe for Alembic before 1.16
        listed = ["version_path_separator = ;", f"version_locations = {';'.join(locations)}"]
    lines = [
        "[alembic]",
        "script_location = %(here)s/migrations",
        *listed,
        *(f"{key} = {value}" for key, value in options.items()),
    ]
    ini = root / "alembic.ini"
    ini.write_text("\n".join(lines) + "\n")
    config = Config(str(ini))
    config.set_main_option("sqlalchemy.url", render(database.url).replace("%", "%%"))
    return config


def host_heads(database: Database) -> set[str]:
    with database.admin_engine().connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def tables(database: Database, schema: str = "public") -> set[str]:
    with database.admin_engine().connect() as conn:
        return set(sa.inspect(conn).get_table_names(schema=schema))


def test_host_history_and_ours_move_independently(tmp_path: Path, database: Database) -> None:
    host = host_project(tmp_path, database, include_ours=False)
    upgrade(database.url)
    command.upgrade(host, "head")
    assert host_heads(database) == {"h001"}
    assert current(database.url) == "tc0005"
    assert tables(database) == {*TABLES, "widgets", "alembic_version", VERSION_TABLE}

    command.downgrade(host, "base")
    assert host_heads(database) == set()
    assert current(database.url) == "tc0005"
    assert set(TABLES) <= tables(database)

    command.upgrade(host, "head")
    downgrade(database.url, "base")
    assert current(database.url) is None
    assert host_heads(database) == {"h001"}
    assert tables(database) == {"widgets", "alembic_version", VERSION_TABLE}


def test_recipe_runs_our_revisions_in_the_host_environment(
    tmp_path: Path, database: Database
) -> None:
    host = host_project(tmp_path, database, include_ours=True)
    with pytest.raises(CommandError, match="Multiple head revisions"):
        command.upgrade(host, "head")  # two heads now: "heads" or a branch
    command.upgrade(host, "tenant_celery@head")
    assert host_heads(database) == {"tc0005"}
    assert tables(database) == {*TABLES, "alembic_version"}  # no second version table

    command.upgrade(host, "heads")
    assert "h002" in host_heads(database)
    assert tables(database) == {*TABLES, "widgets", "alembic_version"}
    with database.admin_engine().connect() as conn:
        grants = conn.execute(
            sa.text(
                "SELECT count(*) FROM information_schema.role_table_grants"
                " WHERE grantee = :role AND table_name = ANY(:tables)"
            ),
            {"role": APP_ROLE, "tables": list(TABLES)},
        ).scalar_one()
    assert grants == len(TABLES) * 4

    # Our base takes the host revision that depends on it along, and nothing else.
    command.downgrade(host, "tenant_celery@base")
    assert host_heads(database) == {"h001"}
    assert tables(database) == {"widgets", "alembic_version"}


def test_recipe_with_a_schema(tmp_path: Path, database: Database) -> None:
    host = host_project(tmp_path, database, include_ours=True, tenant_celery_schema="celery")
    with database.admin_engine().begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA celery"))  # the revision does not create it
    command.upgrade(host, "tenant_celery@head")
    assert tables(database, "celery") == set(TABLES)
    assert tables(database) == {"alembic_version"}
    command.downgrade(host, "tenant_celery@base")
    assert tables(database, "celery") == set()


def result_tables_rls(database: Database) -> dict[str, tuple[Any, ...]]:
    """``{result table: (rls on, forced, policies)}`` as the superuser sees the catalogs."""
    with database.admin_engine().connect() as conn:
        return {
            table: (
                *conn.execute(
                    sa.text(
                        "SELECT relrowsecurity, relforcerowsecurity FROM pg_class"
                        " WHERE oid = to_regclass(:t)"
                    ),
                    {"t": table},
                ).one(),
                conn.execute(
                    sa.text(
                        "SELECT policyname, permissive, cmd, qual, with_check FROM pg_policies"
                        " WHERE schemaname = 'public' AND tablename = :t"
                    ),
                    {"t": table},
                ).all(),
            )
            for table in RESULT_TABLES
        }


def test_how_to_revision_puts_the_result_tables_under_the_policy(
    tmp_path: Path, database: Database
) -> None:
    """The result backend how-to's host revision, taken from the page, after the host's
    head (``h002``) and our ``tc0004``: ``upgrade heads`` as the tables' owner turns
    row-level security on and forces it with the tenant policy; ``downgrade`` undoes it."""
    (block,) = [
        b for b in python_blocks("howto/result-backend.md") if "op.enable_tenant_rls" in b.source
    ]
    previous_head = 'down_revision = "7d1e0c2a9b41"'
    assert previous_head in block.source
    assert block.file_path is not None
    host = host_project(tmp_path, database, include_ours=True)
    revision = tmp_path / block.file_path
    assert revision.parent == tmp_path / "migrations" / "versions"
    revision.write_text(block.source.replace(previous_head, 'down_revision = "h002"'))

    command.upgrade(host, "heads")  # the superuser: the owner of the tables it creates
    assert host_heads(database) == {"tc0005", "0c4f2b7e9a13"}
    for table, (enabled, forced, policies) in result_tables_rls(database).items():
        assert (enabled, forced) == (True, True), table
        ((name, permissive, cmd, using, check),) = policies
        assert (name, permissive, cmd) == ("tenant_isolation_policy", "PERMISSIVE", "ALL")
        # The server's deparse of the expression varies a little between versions.
        assert using == check
        assert using.startswith("(tenant_id = ")
        assert "current_setting('app.current_tenant_id'" in using

    command.downgrade(host, "h002")
    assert host_heads(database) == {"tc0005", "h002"}
    assert result_tables_rls(database) == {table: (False, False, []) for table in RESULT_TABLES}


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """The filter the how-to gives hosts for autogenerate (``context.configure``)."""
    if type_ == "table":
        return name not in (*TABLES, VERSION_TABLE)
    return True


@pytest.mark.parametrize("filtered", [False, True])
def test_autogenerate_filter_hides_our_tables(database: Database, filtered: bool) -> None:
    upgrade(database.url)
    host_metadata = sa.MetaData()
    sa.Table("widgets", host_metadata, sa.Column("id", sa.Integer, primary_key=True))
    with database.admin_engine().begin() as conn:
        host_metadata.create_all(conn)
        opts = {"include_name": include_name} if filtered else {}
        ops = compare_metadata(MigrationContext.configure(conn, opts=opts), host_metadata)
    dropped = {op[1].name for op in ops if op[0] == "remove_table"}
    assert dropped == (set() if filtered else {*TABLES, VERSION_TABLE})
