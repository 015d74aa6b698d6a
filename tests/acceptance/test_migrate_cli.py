"""``tenant-celery migrate`` run as a user runs it: subprocesses against a live database."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from tenant_celery.migrations import TABLES, VERSION_TABLE
from tests._rig.postgres import APP_ROLE, Database, render

ROOT = Path(__file__).resolve().parents[2]
#: The ``migrate`` command; ``python -m tenant_celery.migrations`` runs the same parser
#: the ``tenant-celery`` console script mounts.
MIGRATE = [sys.executable, "-m", "tenant_celery.cli", "migrate"]


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TENANT_CELERY_")}
    return {**base, **(extra or {})}


def migrate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MIGRATE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=environment(env),
        check=False,
    )


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*MIGRATE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=environment(),
    )


def psql() -> str:
    """The system psql, else the one bundled with pgserver (a dev dependency)."""
    found = shutil.which("psql")
    if found:
        return found
    import pgserver  # noqa: PLC0415

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql")


def libpq_url(database: Database) -> str:
    return render(database.url.set(drivername="postgresql"))


def privilege_rows(database: Database, schema: str = "public") -> int:
    with database.admin_engine().connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM information_schema.role_table_grants"
                    " WHERE grantee = :role AND table_schema = :schema"
                    " AND table_name = ANY(:tables)"
                ),
                {"role": APP_ROLE, "schema": schema, "tables": list(TABLES)},
            ).scalar_one()
        )


def test_upgrade_current_downgrade(database: Database) -> None:
    url = render(database.url)
    done = migrate("current", "--url", url)
    assert (done.returncode, done.stdout) == (0, "none\n"), done.stderr

    done = migrate("upgrade", "--url", url, "--grant-to", APP_ROLE)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("upgraded postgresql+psycopg://postgres@")
    assert lines[0].endswith(": none -> tc0005 (head)")
    assert lines[1] == (
        "granted SELECT, INSERT, UPDATE, DELETE on 8 tables and USAGE on 4 sequences to app_user"
    )
    assert privilege_rows(database) == 4 * len(TABLES)

    done = migrate("upgrade", "--url", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(" is at tc0005 (head); nothing to upgrade\n")

    done = migrate("current", "--url", url)
    assert (done.returncode, done.stdout) == (0, "tc0005 (head)\n")

    done = migrate("downgrade", "base", "--url", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(": tc0005 (head) -> none\n")
    with database.admin_engine().connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) == {VERSION_TABLE}


def test_url_from_the_environment_and_a_schema(database: Database) -> None:
    env = {"TENANT_CELERY_DATABASE_URL": render(database.url)}
    done = migrate("upgrade", "--schema", "celery", "--grant-to", APP_ROLE, env=env)
    assert done.returncode == 0, done.stderr
    assert privilege_rows(database, "celery") == 4 * len(TABLES)
    done = migrate("current", "--schema", "celery", env=env)
    assert done.stdout == "tc0005 (head)\n"
    done = migrate("current", env=env)  # the public schema was never migrated
    assert done.stdout == "none\n"


def test_sql_prints_a_script_psql_can_run(database: Database) -> None:
    done = migrate("sql", "--grant-to", APP_ROLE)
    assert done.returncode == 0, done.stderr
    script = done.stdout
    assert script.startswith("BEGIN;")
    assert script.rstrip().endswith("COMMIT;")
    assert "CREATE TABLE kombu_queue" in script
    applied = subprocess.run(
        [psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", libpq_url(database), "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert applied.returncode == 0, applied.stderr
    assert privilege_rows(database) == 4 * len(TABLES)
    done = migrate("current", "--url", render(database.url))
    assert done.stdout == "tc0005 (head)\n"


def test_two_upgrades_at_once_both_succeed(database: Database) -> None:
    url = render(database.url)
    processes = [start("upgrade", "--url", url) for _ in range(2)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    # Whichever took the lock first applied the revision; the other waited its turn
    # and found it applied.
    said = sorted(out.startswith("upgraded") for out, _ in outputs)
    assert said == [False, True], outputs
    assert any(out.endswith("nothing to upgrade\n") for out, _ in outputs), outputs
    with database.admin_engine().connect() as conn:
        versions = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
    assert [tuple(row) for row in versions] == [("tc0005",)]


def test_errors_exit_non_zero_with_one_line(database: Database) -> None:
    done = migrate("upgrade")
    assert done.returncode == 2
    assert done.stderr == (
        "tenant-celery migrate upgrade: error: no database URL: "
        "pass --url or set TENANT_CELERY_DATABASE_URL\n"
    )

    # The database refused the migration (nothing was changed): a problem, exit 1.
    done = migrate("upgrade", "--url", render(database.url), "--grant-to", "no_such_role")
    assert done.returncode == 1
    assert done.stderr.startswith("tenant-celery migrate upgrade: error: tenant-celery upgrade of")
    assert "granting privileges to role 'no_such_role'" in done.stderr
    assert done.stderr.count("\n") == 1  # no traceback

    done = migrate("upgrade", "--url", "mysql://u:secret@h/db")
    assert done.returncode == 2
    assert "secret" not in done.stderr

    done = migrate("downgrade", "--url", render(database.url))  # no revision
    assert done.returncode == 2
    assert "the following arguments are required: REVISION" in done.stderr

    done = migrate("frobnicate")
    assert done.returncode == 2


def test_unreachable_or_missing_database_exits_2(database: Database) -> None:
    missing = render(database.url.set(database=f"tc_missing_{secrets.token_hex(4)}"))
    for args, where in [
        (["upgrade", "--url", "postgresql://u:s3cret-pw@127.0.0.1:1/x"], "127.0.0.1:1/x"),
        (["current", "--url", "postgresql://u:s3cret-pw@127.0.0.1:1/x"], "127.0.0.1:1/x"),
        (["upgrade", "--url", missing], "does not exist"),
        (["downgrade", "base", "--url", missing], "does not exist"),
        (["current", "--url", missing], "does not exist"),
    ]:
        done = migrate(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stdout == ""
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr  # no traceback
        assert lines[0].startswith(f"tenant-celery migrate {args[0]}: error: cannot connect to ")
        assert where in lines[0]
        assert "s3cret-pw" not in done.stderr


def test_usage_errors_exit_2_with_the_subcommands_usage(database: Database) -> None:
    done = migrate("upgrade", "--url", render(database.url), "--frobnicate")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: tenant-celery migrate upgrade ")
    assert done.stderr.splitlines()[-1] == (
        "tenant-celery migrate upgrade: error: unrecognized arguments: --frobnicate"
    )
    # An unknown revision is a usage error too, and nothing is changed.
    done = migrate("upgrade", "no_such_revision", "--url", render(database.url))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "Can't locate revision identified by 'no_such_revision'" in done.stderr
    assert migrate("current", "--url", render(database.url)).stdout == "none\n"
    done = migrate("sql", "no_such_revision")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1


def test_interrupted_exits_130() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(60)
        port = server.getsockname()[1]
        process = subprocess.Popen(
            [*MIGRATE, "upgrade", "--url", f"postgresql://u@127.0.0.1:{port}/x?connect_timeout=60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env=environment(),
        )  # fmt: skip
        connection, _ = server.accept()  # the command is connecting, and waits for an answer
        with connection:
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=30)
    assert process.returncode == 130, out + err
    assert err == "tenant-celery migrate: interrupted\n"
