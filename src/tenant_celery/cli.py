"""The ``tenant-celery`` command line.

``tenant-celery check`` inspects a live database with
:func:`~tenant_celery.audit.audit_database` and prints the report;
``tenant-celery migrate`` applies the bundled migration
(:mod:`tenant_celery.migrations`); ``tenant-celery demo`` runs
:func:`tenant_celery.demo.run_demo`; ``tenant-celery tenants`` acts on one
tenant's queued work (:mod:`tenant_celery.tenants`).  Each subcommand is one ``_add_<name>``
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
from typing import Any, NoReturn

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


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """``rows`` (the header first) as lines of left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


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
        lines += [*_aligned([header, *rows]), ""]
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


# ----------------------------------------------------------------------- tenants

_BROKER_URL_ENV = "CELERY_BROKER_URL"
_TENANT_FORMATS = ("uuid", "integer", "slug")


def _add_tenants(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tenants = subparsers.add_parser(
        "tenants",
        help="inspect, pause, resume, purge or rate-limit one tenant's queued work",
        description=(
            "Act on one tenant's messages in the package's PostgreSQL transport while workers "
            "consume (tenant_celery.tenants). Name the broker with -A (the Celery app, whose "
            f"module also sets the tenant id format) or --broker (default: ${_BROKER_URL_ENV}). "
            "Exit 0 when done, 2 on a usage or connection error (a broker that is not the "
            "transport, a malformed tenant id), 130 when interrupted."
        ),
    )
    actions = tenants.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str, run: Callable[[argparse.Namespace], int]) -> Any:
        parser = actions.add_parser(name, help=help_text, description=help_text)
        where = parser.add_mutually_exclusive_group()
        where.add_argument("-A", "--app", help="the Celery app, as module or module:attribute")
        where.add_argument(
            "--broker", help=f"the broker URL, tcpg+postgresql://... (default: ${_BROKER_URL_ENV})"
        )
        parser.add_argument(
            "--tenant-format",
            choices=_TENANT_FORMATS,
            help="tenant id format without -A (default: uuid)",
        )
        parser.add_argument("--json", action="store_true", help="print a JSON document")
        parser.set_defaults(run=run)
        return parser

    inspect = action(
        "inspect", "list each tenant's ready, in-flight and delayed messages", _run_inspect
    )
    inspect.add_argument("--tenant", help="only this tenant")
    inspect.add_argument("--queue", help="only this queue")
    for name, help_text, run in (
        ("pause", "stop workers claiming a tenant's messages", _run_pause),
        ("resume", "let workers claim a tenant's messages again", _run_resume),
    ):
        parser = action(name, help_text, run)
        parser.add_argument("tenant", help="the tenant id")
        parser.add_argument("--queue", help="only this queue (default: every queue)")
    purge = action("purge", "delete a tenant's queued messages (and stored results)", _run_purge)
    purge.add_argument("tenant", help="the tenant id")
    purge.add_argument("--queue", help="only this queue (default: every queue)")
    purge.add_argument(
        "--in-flight", action="store_true", help="also delete (and revoke) claimed messages"
    )
    purge.add_argument("--no-revoke", action="store_true", help="do not revoke delayed messages")
    purge.add_argument("--results", help="also delete its stored results in this database (URL)")
    purge.add_argument(
        "--yes", action="store_true", help="required: purge refuses to run without it"
    )
    limit = action("rate-limit", "limit how fast workers claim a tenant's messages", _run_limit)
    limit.add_argument("tenant", help="the tenant id")
    limit.add_argument("--queue", required=True, help="the queue the limit applies to")
    amount = limit.add_mutually_exclusive_group(required=True)
    amount.add_argument("--rate", type=float, help="messages a second, all workers together")
    amount.add_argument("--off", action="store_true", help="remove the tenant's limit")
    limit.add_argument("--burst", type=float, help="most messages at once (default: one second's)")


def _broker(args: argparse.Namespace) -> Any:
    """The app (-A) or broker URL the tenants subcommand acts on; sets the tenant parser."""
    from . import context  # noqa: PLC0415

    if args.app:
        if args.tenant_format:
            _fail("--tenant-format is taken from the app's module with -A; pass one or the other")
        from celery.app.utils import find_app  # noqa: PLC0415

        sys.path.insert(0, os.getcwd())
        try:
            return find_app(args.app)
        except Exception as exc:  # any error importing the user's module
            _fail(f"cannot load the app {args.app!r}: {_one_line(exc)}")
    url = args.broker or os.environ.get(_BROKER_URL_ENV) or None
    if url is None:
        _fail(f"no broker: pass -A or --broker, or set {_BROKER_URL_ENV}")
    parsers = {
        "uuid": context.uuid_tenant_id,
        "integer": context.integer_tenant_id,
        "slug": context.slug_tenant_id,
    }
    context.set_tenant_id_parser(parsers[args.tenant_format or "uuid"])
    return url


def _tenants_call(args: argparse.Namespace, call: Callable[[Any], Any]) -> Any:
    from .errors import InvalidTenantId  # noqa: PLC0415

    broker = _broker(args)
    try:
        return call(broker)
    except (ConfigurationError, InvalidTenantId) as exc:
        _fail(str(exc))


def _run_inspect(args: argparse.Namespace) -> int:
    from .tenants import inspect  # noqa: PLC0415

    found = _tenants_call(args, lambda b: inspect(b, tenant=args.tenant, queue=args.queue))
    if args.json:
        print(json.dumps([entry.as_dict() for entry in found], indent=2))
        return EXIT_CLEAN
    header = ("queue", "tenant", "ready", "in flight", "delayed", "oldest", "paused", "rate")
    rows = [
        (
            e.queue,
            e.tenant or "(none)",
            str(e.ready),
            str(e.in_flight),
            str(e.delayed),
            "-" if e.oldest_ready_seconds is None else f"{e.oldest_ready_seconds:.1f}s",
            "yes" if e.paused else "no",
            "-" if e.rate is None else f"{e.rate:g}/s (burst {e.burst:g})",
        )
        for e in found
    ]
    if not rows:
        print("no queued messages and no paused or rate-limited tenant")
        return EXIT_CLEAN
    print("\n".join(_aligned([header, *rows])))
    return EXIT_CLEAN


def _where(queue: str | None) -> str:
    return "every queue" if queue is None else f"queue {queue}"


def _run_pause(args: argparse.Namespace) -> int:
    from .tenants import pause  # noqa: PLC0415

    _tenants_call(args, lambda b: pause(b, args.tenant, queue=args.queue))
    _say(
        args,
        {"paused": args.tenant, "queue": args.queue},
        f"paused {args.tenant} on {_where(args.queue)}",
    )
    return EXIT_CLEAN


def _run_resume(args: argparse.Namespace) -> int:
    from .tenants import resume  # noqa: PLC0415

    still = _tenants_call(args, lambda b: resume(b, args.tenant, queue=args.queue))
    text = f"resumed {args.tenant} on {_where(args.queue)}"
    if still:
        shown = ", ".join("every queue" if q == "*" else q for q in still)
        text += f"; still paused on {shown}"
    _say(args, {"resumed": args.tenant, "queue": args.queue, "still_paused": still}, text)
    return EXIT_CLEAN


def _run_purge(args: argparse.Namespace) -> int:
    from .tenants import purge  # noqa: PLC0415

    if not args.yes:
        _fail(
            f"purge deletes {args.tenant}'s queued messages on {_where(args.queue)}"
            + (" and its stored results" if args.results else "")
            + "; pass --yes to do it"
        )
    done = _tenants_call(
        args,
        lambda b: purge(
            b,
            args.tenant,
            queue=args.queue,
            in_flight=args.in_flight,
            revoke=not args.no_revoke,
            results=args.results,
        ),
    )
    text = (
        f"purged {done.tenant} on {_where(done.queue)}: {done.ready} ready, {done.delayed} "
        f"delayed, {done.in_flight} in flight deleted; {len(done.revoked)} revoked"
    )
    if done.results is not None:
        text += f"; {done.results.tasks} task results and {done.results.groups} group results"
    if done.left_in_flight:
        text += f"\nleft to finish ({len(done.left_in_flight)}): " + ", ".join(done.left_in_flight)
    _say(args, done.as_dict(), text)
    return EXIT_CLEAN


def _run_limit(args: argparse.Namespace) -> int:
    from .tenants import rate_limit  # noqa: PLC0415

    if args.off and args.burst is not None:
        _fail("--burst goes with --rate, not --off")
    rate = None if args.off else args.rate
    _tenants_call(
        args, lambda b: rate_limit(b, args.tenant, queue=args.queue, rate=rate, burst=args.burst)
    )
    burst = None if rate is None else (args.burst if args.burst is not None else max(1.0, rate))
    if rate is None or burst is None:
        text = f"removed the rate limit of {args.tenant} on queue {args.queue}"
    else:
        text = f"limited {args.tenant} on queue {args.queue} to {rate:g}/s (burst {burst:g})"
    _say(args, {"tenant": args.tenant, "queue": args.queue, "rate": rate, "burst": burst}, text)
    return EXIT_CLEAN


def _say(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_check,
    _add_migrate,
    _add_demo,
    _add_tenants,
)

if __name__ == "__main__":
    sys.exit(main())
