"""The ``tenant-celery`` command line.

``tenant-celery check`` inspects a live database with
:func:`~tenant_celery.audit.audit_database` and prints the report;
``tenant-celery migrate`` applies the bundled migration
(:mod:`tenant_celery.migrations`); ``tenant-celery demo`` runs
:func:`tenant_celery.demo.run_demo`.  Each subcommand is one ``_add_<name>``
function that builds its parser and names the function that runs it;
:data:`_SUBCOMMANDS` lists them.

Every subcommand exits with the same codes: :data:`EXIT_CLEAN` (``0``),
:data:`EXIT_HOLES` (``1``, a problem found), :data:`EXIT_USAGE` (``2``, a
usage or connection error: one line on standard error, no traceback) and
:data:`EXIT_INTERRUPTED` (``130``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from . import __version__
from ._pg import database_url
from .audit import AuditReport, audit_database
from .config import DATABASE_URL_ENV, guc_name
from .errors import ConfigurationError

__all__ = [
    "DATABASE_URL_ENV",
    "EXIT_CLEAN",
    "EXIT_HOLES",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "main",
    "parse_arguments",
]

PROG = "tenant-celery"

EXIT_CLEAN = 0
"""Exit code of every subcommand: done, nothing wrong."""
EXIT_HOLES = 1
"""Exit code of every subcommand: a problem found (``check`` found a hole in the
isolation; ``demo`` saw a tenant read rows not its own, or a step of it failed;
``migrate`` was refused by the database, which changed nothing)."""
EXIT_USAGE = 2
"""Exit code of every subcommand: bad arguments, a database that could not be
reached or read, or a missing extra; one line on standard error, no traceback."""
EXIT_INTERRUPTED = 130
"""Exit code of every subcommand: interrupted (Ctrl-C, or SIGTERM for ``demo``)."""

_CONNECT_TIMEOUT = 10


class _UsageError(Exception):
    """A one-line message for standard error; the command exits with :data:`EXIT_USAGE`."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tenant-celery`` command with ``argv`` (default ``sys.argv[1:]``);
    return its exit code."""
    args = parse_arguments(_parser(), argv)
    if isinstance(args, int):
        return args
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except _UsageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def parse_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace | int:
    """Parse ``argv``; return the namespace, or the exit code when argparse printed
    ``--help``, ``--version`` or a usage error.

    Arguments nobody recognizes are reported by the (sub)command that was
    chosen, with its own usage line, not the top-level one.
    """
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            _chosen(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse has printed --help, --version or a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return args


def _chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subcommand's parser that ``args`` selected."""
    while True:
        subcommands = [
            action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
        ]
        name = getattr(args, subcommands[0].dest, None) if subcommands else None
        if not subcommands or name not in subcommands[0].choices:
            return parser
        parser = subcommands[0].choices[name]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Tenant isolation tools for Celery on PostgreSQL."
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {__version__}", help="print the version"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def _fail(message: str) -> NoReturn:
    raise _UsageError(message)


# ------------------------------------------------------------------------- check


def _add_check(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = subparsers.add_parser(
        "check",
        help="report holes in a database's tenant isolation",
        description=(
            "Inspect every table that has the tenant column: row-level security enabled "
            "and forced, a tenant policy with USING and WITH CHECK and no permissive policy "
            "widening it, an index leading with the column, and the role's rights; the role "
            "and the roles it can become; and the views, materialized views, referencing "
            "tables and SECURITY DEFINER routines that could show it other tenants' rows. "
            "Exit 0 when clean, 1 when a hole is found, 2 on a usage or connection error, "
            "130 when interrupted."
        ),
    )
    check.add_argument(
        "--url",
        help=f"SQLAlchemy or libpq URL of the database (default: ${DATABASE_URL_ENV})",
    )
    check.add_argument(
        "--role", help="role the workers connect as (default: the role the URL connects as)"
    )
    check.add_argument(
        "--column", default="tenant_id", help="tenant column name (default: tenant_id)"
    )
    check.add_argument(
        "--setting",
        help="setting the policies read (default: $TENANT_CELERY_GUC, else app.current_tenant_id)",
    )
    check.add_argument("--schema", help="only check this schema (default: all but system schemas)")
    check.add_argument("--json", action="store_true", help="print a JSON document")
    check.set_defaults(run=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    raw_url: str | None = args.url or os.environ.get(DATABASE_URL_ENV) or None
    if raw_url is None:
        _fail(f"no database URL: pass --url or set {DATABASE_URL_ENV}")
    try:
        setting = guc_name(None, args.setting)
        url = database_url(raw_url)
    except ConfigurationError as exc:
        _fail(str(exc))
    shown = url.render_as_string(hide_password=True)
    connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": _CONNECT_TIMEOUT}
    try:
        engine = sa.create_engine(url, poolclass=sa.NullPool, connect_args=connect_args)
    except (ArgumentError, ImportError) as exc:  # unknown dialect, driver not installed
        _fail(f"cannot use database URL {shown}: {_one_line(exc)}")
    try:
        with engine.connect() as conn:
            report = audit_database(
                conn, role=args.role, column=args.column, setting=setting, schema=args.schema
            )
    except SQLAlchemyError as exc:
        _fail(f"cannot inspect {shown}: {_one_line(exc)}")
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(_format_report(report, shown))
    return EXIT_CLEAN if report.clean else EXIT_HOLES


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc
    return " ".join(str(cause).split()) or type(cause).__name__


def _yes(value: bool) -> str:
    return "yes" if value else "NO"


def _format_report(report: AuditReport, url: str) -> str:
    lines = [
        f"database {url}",
        f"role {report.role.name}, setting {report.setting}, column {report.column}"
        + (f", schema {report.schema}" if report.schema is not None else ""),
        "",
    ]
    header = ("table", "type", "rls", "forced", "policy", "check", "index", "owner", "privileges")
    rows = [
        (
            t.name,
            t.column_type,
            _yes(t.rls_enabled),
            _yes(t.rls_forced),
            t.tenant_policy or "NONE",
            _yes(t.tenant_policy_checks),
            _yes(bool(t.tenant_indexes)),
            t.owner + (" (the role)" if t.role_owns else ""),
            ",".join(t.privileges) or "-",
        )
        for t in report.tables
    ]
    if rows:
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )
        lines.append("")
    if report.results_outside_policy:
        lines += [
            "results outside the tenant policy (an opt-in): "
            + ", ".join(report.results_outside_policy),
            "",
        ]
    role = report.role
    if role.exists:
        lines.append(
            f"role {role.name}: superuser {'YES' if role.superuser else 'no'}, "
            f"bypassrls {'YES' if role.bypassrls else 'no'}, "
            f"owns {', '.join(role.owned_tables) or 'no tenant table'}"
            + (f", can become {', '.join(role.bypassing_roles)}" if role.bypassing_roles else "")
        )
    else:
        lines.append(f"role {role.name}: does not exist")
    located = [("database", p) for p in report.database_problems]
    located += [(f"role {role.name}", p) for p in role.problems]
    located += [(t.name, p) for t in report.tables for p in t.problems]
    located += [(p.table or "database", p) for p in report.object_problems]
    lines.append("")
    if not located:
        lines.append("no problems found")
    else:
        lines.append(f"{len(located)} problem{'s' if len(located) > 1 else ''}:")
        width = max(len(where) for where, _ in located)
        lines.extend(f"  {where.ljust(width)}  {p.code}: {p.message}" for where, p in located)
    return "\n".join(lines)


# -------------------------------------------------------------------------- demo


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="show tenant isolation end to end on a throwaway database",
        description=(
            "Start an embedded PostgreSQL (the 'embedded' extra) or use --dsn, apply the "
            "bundled migration, create a table with row-level security, run a real celery "
            "worker as an unprivileged role, run tasks for three tenants and print what each "
            "tenant sees, the worker's /health and its metric totals. Everything it starts is "
            "removed at the end. Exit 0 when every tenant saw only its own rows, 1 when one "
            "did not or a step failed, 2 on a usage or connection error (bad --dsn, a server "
            "that cannot be reached, a missing extra), 130 when interrupted."
        ),
    )
    demo.add_argument(
        "--dsn",
        help="superuser URL of an existing PostgreSQL server to use instead of an embedded one",
    )
    demo.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoError, DemoUsageError, run_demo  # noqa: PLC0415 (imported on use)

    try:
        run_demo(args.dsn)
    except DemoUsageError as exc:
        _fail(str(exc))
    except DemoError as exc:
        print(f"{PROG} demo: error: {exc}", file=sys.stderr)
        return EXIT_HOLES
    return EXIT_CLEAN


# ----------------------------------------------------------------------- migrate


def _add_migrate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Imported here: tenant_celery.migrations uses this module's exit codes.
    from .migrations import add_migrate_parser  # noqa: PLC0415

    add_migrate_parser(subparsers)


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_check,
    _add_migrate,
    _add_demo,
)

if __name__ == "__main__":
    sys.exit(main())
