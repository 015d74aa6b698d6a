"""``tenant-celery migrate``: the bundled migration from the command line.

:func:`add_migrate_parser` adds the ``migrate`` subcommand to an
:mod:`argparse` parser and names :func:`run_migrate` as the function that runs
it (``args.run``).  ``python -m tenant_celery.migrations migrate ...`` runs
the same parser on its own.

Exit codes are the command line's (:mod:`tenant_celery.cli`): ``0`` done,
``1`` the database refused the upgrade or downgrade (a revision, the lock,
the schema or a grant failed; nothing was changed), ``2`` bad arguments, an
unknown revision, or a database that could not be reached or read, ``130``
interrupted.  Errors are one line on standard error, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, Literal

from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from .._pg import identifier
from ..cli import EXIT_CLEAN, EXIT_HOLES, EXIT_INTERRUPTED, EXIT_USAGE, PROG, parse_arguments
from ..config import DATABASE_URL_ENV, setting
from ..errors import ConfigurationError, MigrationError
from . import _api
from ._objects import SEQUENCES, TABLE_PRIVILEGES, TABLES

__all__ = ["add_migrate_parser", "main", "run_migrate"]


def add_migrate_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``migrate upgrade|downgrade|current|sql`` to ``subparsers``.

    The parser sets ``run`` to :func:`run_migrate`: a ``main`` that parsed the
    arguments calls ``args.run(args)`` and exits with the code it returns.
    """
    migrate = subparsers.add_parser(
        "migrate",
        help="create or inspect Celery's broker and result tables",
        description=(
            "Apply tenant-celery's bundled migration: kombu's SQLAlchemy broker tables and "
            "Celery's database result tables, under the version table "
            "tenant_celery_alembic_version. Exit 0 when done, 1 when the database refused "
            "(nothing is changed), 2 on bad arguments or a database that cannot be reached "
            "or read, 130 when interrupted."
        ),
    )
    migrate.set_defaults(run=run_migrate)
    actions = migrate.add_subparsers(dest="migrate_action", required=True, metavar="ACTION")

    upgrade = actions.add_parser(
        "upgrade",
        help="create the tables, or bring them up to a revision",
        description="Upgrade to REVISION (default: head). Running it again changes nothing.",
    )
    upgrade.add_argument(
        "revision", nargs="?", default="head", metavar="REVISION", help="target (default: head)"
    )
    _add_url(upgrade)
    _add_schema(upgrade)
    _add_grant_to(upgrade)

    downgrade = actions.add_parser(
        "downgrade",
        help="undo revisions; 'base' drops the tables and their contents",
        description=(
            "Downgrade to REVISION; 'base' drops the Celery and transport tables and their "
            "sequences."
        ),
    )
    downgrade.add_argument("revision", metavar="REVISION", help="target, for example base")
    _add_url(downgrade)
    _add_schema(downgrade)

    current = actions.add_parser(
        "current",
        help="print the revision the database is at",
        description="Print the database's revision ('(head)' when it is the latest), or 'none'.",
    )
    _add_url(current)
    _add_schema(current)

    sql = actions.add_parser(
        "sql",
        help="print the SQL of an upgrade without connecting",
        description=(
            "Print the upgrade as one SQL transaction, for a DBA to review or apply with psql. "
            "No database is needed."
        ),
    )
    sql.add_argument(
        "revision", nargs="?", default="head", metavar="REVISION", help="target (default: head)"
    )
    sql.add_argument(
        "--from",
        dest="from_revision",
        metavar="REVISION",
        help="revision the database is at (default: none, a database never migrated)",
    )
    _add_schema(sql)
    _add_grant_to(sql)


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help=(
            f"SQLAlchemy or libpq URL of the database, as a role that may create tables "
            f"(default: ${DATABASE_URL_ENV})"
        ),
    )


def _add_schema(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--schema",
        help="schema of the tables and the version table (default: the connection's, public)",
    )


def _add_grant_to(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grant-to",
        action="append",
        default=[],
        metavar="ROLE",
        help="role to grant the tables to (the workers' role); repeat for more roles",
    )


def run_migrate(args: argparse.Namespace) -> int:
    """Run the ``migrate`` action ``args`` describes; return the exit code."""
    action: str = args.migrate_action
    try:
        if action == "sql":
            print(
                _api.sql(
                    args.revision,
                    from_revision=args.from_revision,
                    schema=args.schema,
                    grant_to=args.grant_to,
                ),
                end="",
            )
            return EXIT_CLEAN
        url = args.url or setting(None, "database_url")
        if not url:
            raise ConfigurationError(f"no database URL: pass --url or set {DATABASE_URL_ENV}")
        # Names first: a bad argument is reported before anything connects.
        if args.schema is not None:
            identifier(args.schema, "schema")
        for role in getattr(args, "grant_to", ()):
            identifier(role, "a role in grant_to")
        with _api._engine(url) as engine:
            _connect(engine)
            if action == "current":
                print(_describe(_api.current(engine, schema=args.schema)))
                return EXIT_CLEAN
            direction: Literal["upgrade", "downgrade"] = (
                "upgrade" if action == "upgrade" else "downgrade"
            )
            roles = tuple(args.grant_to) if direction == "upgrade" else ()
            try:
                outcome = _api.run(direction, engine, args.revision, args.schema, roles)
            except MigrationError as exc:
                if isinstance(exc.__cause__, (CommandError, RevisionError)):
                    raise  # an unknown revision: a usage error
                _error(action, exc)
                return EXIT_HOLES
    except (ConfigurationError, MigrationError, _Unreachable) as exc:
        # Bad arguments, or a database that could not be reached or read.
        _error(action, exc)
        return EXIT_USAGE
    except (ArgumentError, ImportError) as exc:  # an unknown dialect, a driver not installed
        _error(action, f"cannot use the database URL: {_reason(exc)}")
        return EXIT_USAGE
    before, now = _describe(outcome.before), _describe(outcome.now)
    if outcome.applied:
        verb = "upgraded" if action == "upgrade" else "downgraded"
        print(f"{verb} {outcome.database}: {before} -> {now}")
    else:
        print(f"{outcome.database} is at {now}; nothing to {action}")
    if roles:
        print(
            f"granted {', '.join(TABLE_PRIVILEGES)} on {len(TABLES)} tables and USAGE on "
            f"{len(SEQUENCES)} sequences to {', '.join(dict.fromkeys(roles))}"
        )
    return EXIT_CLEAN


class _Unreachable(Exception):
    """The database could not be connected to; the message is one line."""


def _connect(engine: Engine) -> None:
    """Connect once, so that a database that cannot be reached is a usage error (exit 2)
    and not a refused migration (exit 1)."""
    shown = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect():
            pass
    except (SQLAlchemyError, ImportError) as exc:
        raise _Unreachable(f"cannot connect to {shown}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc
    return " ".join(str(cause).split()) or type(cause).__name__


def _describe(revision: str | None) -> str:
    if revision is None:
        return "none"
    return f"{revision} (head)" if revision in _api.heads() else revision


def _error(action: str, exc: BaseException | str) -> None:
    print(f"{PROG} migrate {action}: error: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tenant_celery.migrations``: a ``tenant-celery`` parser with ``migrate`` only."""
    parser = argparse.ArgumentParser(prog=PROG, description="tenant-celery's bundled migration.")
    add_migrate_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parse_arguments(parser, argv)
    if isinstance(args, int):
        return args
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print(f"{PROG} migrate: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
