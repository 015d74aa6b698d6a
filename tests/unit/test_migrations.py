"""The bundled migration without a database: names, grants, URLs, offline SQL and the
command's parser."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.config import Config

from tenant_celery._pg import database_url
from tenant_celery.errors import ConfigurationError, MigrationError
from tenant_celery.migrations import (
    BRANCH,
    SEQUENCES,
    TABLES,
    grant_statements,
    heads,
    sql,
    upgrade,
)
from tenant_celery.migrations._cli import main

UNREACHABLE = "postgresql://nobody:pw@127.0.0.1:1/nothing"


def test_heads_and_branch() -> None:
    assert heads() == ("tc0005",)
    assert BRANCH == "tenant_celery"
    assert len(TABLES) == 8
    assert len(SEQUENCES) == 4  # the transport's message table numbers rows by identity


def test_grant_statements() -> None:
    assert grant_statements(["app_user", "app_user"]) == [
        "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE kombu_queue, kombu_message,"
        " celery_taskmeta, celery_tasksetmeta, tenant_celery_queue, tenant_celery_binding,"
        " tenant_celery_message, tenant_celery_tenant_control TO app_user",
        "GRANT USAGE ON SEQUENCE queue_id_sequence, message_id_sequence, task_id_sequence,"
        " taskset_id_sequence TO app_user",
    ]


def test_grant_statements_quote_names_and_qualify_with_the_schema() -> None:
    first, tables, sequences = grant_statements(["Worker Role"], schema="Celery")
    assert first == 'GRANT USAGE ON SCHEMA "Celery" TO "Worker Role"'
    assert 'ON TABLE "Celery".kombu_queue, "Celery".kombu_message,' in tables
    assert sequences.endswith('"Celery".taskset_id_sequence TO "Worker Role"')


@pytest.mark.parametrize("roles", ["app_user", [""], ["x" * 64], ["a\x00b"], [None]])
def test_bad_role_names_are_refused(roles: object) -> None:
    with pytest.raises(ConfigurationError):
        grant_statements(roles)  # type: ignore[arg-type]


def test_upgrade_refuses_a_string_for_grant_to_before_connecting() -> None:
    with pytest.raises(ConfigurationError, match=r"grant_to=\['app_user'\]"):
        upgrade(UNREACHABLE, grant_to="app_user")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("postgres://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("db+postgresql://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("sqla+postgresql+psycopg://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
    ],
)
def test_database_urls(given: str, expected: str) -> None:
    assert database_url(given).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize("given", ["mysql://u:secret@h/db", "sqlite:///x.db"])
def test_other_databases_are_refused(given: str) -> None:
    with pytest.raises(ConfigurationError, match="expected a PostgreSQL URL") as caught:
        database_url(given)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("given", [":::secret", "postgresql://u:secret@h:port/db"])
def test_unparsable_urls_are_not_echoed(given: str) -> None:
    with pytest.raises(ConfigurationError, match="cannot parse") as caught:
        database_url(given)
    assert "secret" not in str(caught.value)
    assert caught.value.__cause__ is not None


def test_sql_is_one_locked_transaction() -> None:
    script = sql(grant_to=["app_user"])
    statements = [s.strip() for s in script.split(";") if s.strip()]
    assert statements[0] == "BEGIN"
    assert statements[1].startswith("SELECT pg_advisory_xact_lock(")
    assert statements[2].startswith("CREATE TABLE tenant_celery_alembic_version")
    assert statements[-1] == "COMMIT"
    assert statements[-3].startswith("GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE")
    assert "SERIAL" not in script  # ids come from the named sequences, never a default
    library_tables = script.split("tc0002")[0]  # tc0001: what kombu and Celery create
    assert "DEFAULT" not in library_tables
    assert "GENERATED ALWAYS AS IDENTITY" in script  # the transport's own message ids


def test_sql_with_a_schema_creates_it() -> None:
    script = sql(schema="celery")
    assert "CREATE SCHEMA IF NOT EXISTS celery;" in script
    assert "CREATE TABLE celery.tenant_celery_alembic_version" in script
    assert "CREATE SEQUENCE celery.queue_id_sequence;" in script


def test_sql_for_an_unknown_revision() -> None:
    with pytest.raises(MigrationError, match="cannot write the SQL for 'nope'"):
        sql("nope")


def test_the_environment_refuses_to_run_online_outside_the_api() -> None:
    from tenant_celery.migrations import _api  # noqa: PLC0415

    config = Config()
    config.set_main_option("script_location", str(_api._SCRIPT_LOCATION))
    config.set_main_option("path_separator", "os")
    with pytest.raises(MigrationError, match="version_locations"):
        command.upgrade(config, "head")


def test_command_prints_sql(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "sql", "--schema", "celery"]) == 0
    assert "CREATE TABLE celery.kombu_queue" in capsys.readouterr().out


def test_command_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate"]) == 2
    assert main(["migrate", "upgrade", "--grant-to"]) == 2
    assert main(["migrate", "current", "--schema", "x" * 64, "--url", UNREACHABLE]) == 2
    assert "schema must be a non-empty name" in capsys.readouterr().err


def test_grant_statements_for_a_database_at_an_older_revision() -> None:
    older = grant_statements(["app_user"], tables=TABLES[:4])
    assert older == [
        "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE kombu_queue, kombu_message,"
        " celery_taskmeta, celery_tasksetmeta TO app_user",
        "GRANT USAGE ON SEQUENCE queue_id_sequence, message_id_sequence, task_id_sequence,"
        " taskset_id_sequence TO app_user",
    ]
    transport_only = grant_statements(["app_user"], tables=["tenant_celery_message", "other"])
    assert transport_only == [
        "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE tenant_celery_message TO app_user"
    ]
    assert grant_statements(["app_user"], tables=[]) == []
