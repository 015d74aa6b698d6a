"""Apply, undo, inspect and print the bundled migration."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, NamedTuple

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import SQLAlchemyError

from .._compat import sqlstate
from .._pg import database_url, identifier
from ..errors import ConfigurationError, MigrationError
from . import _env
from ._objects import SCHEMA_OPTION, VERSION_TABLE

_SCRIPT_LOCATION = Path(__file__).resolve().parent
_CONNECT_TIMEOUT = 10
_DUPLICATE_TABLE = "42P07"
# Alembic keeps the running environment in module globals (alembic.context, alembic.op):
# two commands running at once in one process would share them.
_ALEMBIC = threading.Lock()


# Prefixes Celery and kombu put before a SQLAlchemy URL (result backend, broker).
def upgrade(
    url_or_engine: str | URL | Engine,
    revision: str = "head",
    *,
    schema: str | None = None,
    grant_to: Sequence[str] = (),
) -> str | None:
    """Bring the Celery tables up to ``revision`` and return the revision now current.

    Creates ``kombu_queue``, ``kombu_message``, ``celery_taskmeta`` and
    ``celery_tasksetmeta`` with their sequences, exactly as kombu's SQLAlchemy
    transport and Celery's database result backend would (revision ``tc0001``), then
    the tables of the package's own transport, :mod:`tenant_celery.transport`
    (``tc0002`` and ``tc0003``), then the tenant column of the result tables
    (``tc0004``), then the tenant control table of the transport (``tc0005``), and
    records the revision
    in ``tenant_celery_alembic_version`` (beside, never inside, the host's own
    Alembic version table). Connect as a role that may create tables: the owner of
    the schema, not the role workers run as.

    ``schema`` puts the tables, their sequences and the version table in that schema,
    created if missing; ``None`` uses the connection's default (normally ``public``).
    Pass the same ``schema`` to :func:`downgrade` and :func:`current`. Each role in
    ``grant_to`` then gets ``SELECT, INSERT, UPDATE, DELETE`` on the tables and
    ``USAGE`` on the sequences (and the schema), on every call, even when no revision
    was applied.

    Transactions and concurrency: everything, grants included, runs on one
    connection in one transaction that commits on success and rolls back on any
    error. It first takes the transaction-level advisory lock :data:`LOCK_ID`, so
    processes upgrading one database at the same time run one after the other: the
    first applies the revisions, the others find them applied and change nothing.
    Running it again when the database is at ``revision`` is a no-op. Within one
    process, calls run one at a time (Alembic keeps its running state in module
    globals), so it is safe from any thread.

    Tables that kombu or Celery already created on first use make it fail with
    ``relation ... already exists``: it never takes over tables it did not create.

    Args:
        url_or_engine: a SQLAlchemy URL (``postgresql://`` means psycopg 3; Celery's
            ``db+`` and kombu's ``sqla+`` prefixes are accepted) or an
            :class:`~sqlalchemy.engine.Engine`, which is used and left open.
        revision: target revision, ``"head"`` by default.
        schema: schema of the tables, the sequences and the version table.
        grant_to: roles that use the tables (the role your workers connect as).

    Raises:
        MigrationError: the database refused, naming the revision that failed (or
            the lock, schema or grant step) and PostgreSQL's reason; nothing changed.
        ConfigurationError: a URL, schema or role name that cannot be used.
    """
    return run("upgrade", url_or_engine, revision, schema, _roles(grant_to)).now


def downgrade(
    url_or_engine: str | URL | Engine, revision: str, *, schema: str | None = None
) -> str | None:
    """Take the Celery tables down to ``revision`` and return the revision now current.

    ``"base"`` drops every table of :data:`TABLES` and their sequences, with every queued message
    and stored result in them; the version table, the schema and grants on the
    schema stay. Same transaction, lock and errors as :func:`upgrade`.
    """
    return run("downgrade", url_or_engine, revision, schema, ()).now


def current(url_or_engine: str | URL | Engine, *, schema: str | None = None) -> str | None:
    """Return the revision the database is at, or ``None`` when it was never migrated.

    Only reads (the version table may be missing; nothing is created), in a
    transaction of its own. Connect as a role that may read the version table (in
    ``schema`` when the tables live there): ``grant_to`` roles may not.

    Raises:
        MigrationError: the database could not be read.
        ConfigurationError: a URL or schema name that cannot be used.
    """
    if schema is not None:
        identifier(schema, "schema")
    with _engine(url_or_engine) as engine:
        try:
            with engine.connect() as connection:
                context = MigrationContext.configure(
                    connection,
                    opts={"version_table": VERSION_TABLE, "version_table_schema": schema},
                )
                heads = context.get_current_heads()
        except SQLAlchemyError as exc:
            raise MigrationError(
                f"cannot read the tenant-celery revision of {_shown(engine)}: {_reason(exc)}"
            ) from exc
    if len(heads) > 1:
        raise MigrationError(
            f"{VERSION_TABLE} of {_shown(engine)} holds {len(heads)} revisions "
            f"({', '.join(sorted(heads))}); the bundled history has one line: "
            f"delete the rows that are not the latest"
        )
    return heads[0] if heads else None


def heads() -> tuple[str, ...]:
    """The latest bundled revisions (one: the history is a straight line)."""
    return tuple(ScriptDirectory.from_config(_config(None)).get_heads())


def sql(
    revision: str = "head",
    *,
    from_revision: str | None = None,
    schema: str | None = None,
    grant_to: Sequence[str] = (),
) -> str:
    """Return the SQL script :func:`upgrade` would run, for a DBA to review or apply.

    No database is touched. The script is one transaction (``BEGIN`` ...
    ``COMMIT``) that takes the same advisory lock, creates the version table when
    starting from scratch, applies the revisions after ``from_revision`` (``None``:
    from nothing) up to ``revision``, records the new revision and runs the grants.
    Unlike :func:`upgrade` it cannot look at the database first, so apply it only
    to a database at ``from_revision``.

    Raises:
        MigrationError: a revision that does not exist.
        ConfigurationError: a schema or role name that cannot be used.
    """
    roles = _roles(grant_to)
    config = _config(schema)
    config.attributes[_env.GRANT_TO] = roles
    buffer = io.StringIO()
    config.output_buffer = buffer
    span = revision if from_revision is None else f"{from_revision}:{revision}"
    try:
        with _ALEMBIC:
            command.upgrade(config, span, sql=True)
    except (CommandError, RevisionError) as exc:
        raise MigrationError(f"cannot write the SQL for {span!r}: {exc}") from exc
    return buffer.getvalue()


# ---------------------------------------------------------------------- internals


class Outcome(NamedTuple):
    """What one :func:`run` did."""

    #: The database, password hidden.
    database: str
    #: Revision when the run took the lock (``None``: never migrated).
    before: str | None
    #: Revisions applied (upgrade) or undone (downgrade), in order.
    applied: tuple[str, ...]
    #: Revision when the run committed.
    now: str | None


def run(
    direction: Literal["upgrade", "downgrade"],
    url_or_engine: str | URL | Engine,
    revision: str,
    schema: str | None,
    roles: tuple[str, ...],
) -> Outcome:
    """Upgrade or downgrade, and report what was done (the public functions' body)."""
    config = _config(schema)
    config.attributes[_env.DIRECTION] = direction
    config.attributes[_env.GRANT_TO] = roles
    with _engine(url_or_engine) as engine:
        config.attributes[_env.ENGINE] = engine
        config.attributes[_env.STEP] = "connecting"
        try:
            with _ALEMBIC:
                if direction == "upgrade":
                    command.upgrade(config, revision)
                else:
                    command.downgrade(config, revision)
        except (CommandError, RevisionError) as exc:
            raise MigrationError(
                f"cannot {direction} {_shown(engine)} to {revision!r}: {exc}"
                f"{_unknown_revision_hint(config, engine, schema)}"
            ) from exc
        except SQLAlchemyError as exc:
            step = config.attributes[_env.STEP]
            raise MigrationError(
                f"tenant-celery {direction} of {_shown(engine)} failed while {step}: "
                f"{_reason(exc)}; nothing was changed{_hint(exc)}"
            ) from exc
        start: tuple[str, ...] = config.attributes.get(_env.START, ())
        return Outcome(
            database=_shown(engine),
            before=start[0] if start else None,
            applied=tuple(config.attributes.get(_env.APPLIED, ())),
            now=current(engine, schema=schema),
        )


def _config(schema: str | None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_SCRIPT_LOCATION))
    config.set_main_option("path_separator", "os")
    if schema is not None:
        # ConfigParser interpolates "%": a name holding one is written doubled.
        config.set_main_option(SCHEMA_OPTION, identifier(schema, "schema").replace("%", "%%"))
    return config


def _roles(grant_to: Sequence[str]) -> tuple[str, ...]:
    if isinstance(grant_to, str):
        raise ConfigurationError(
            f"grant_to must be a list of role names, not the string {grant_to!r}; "
            f"write grant_to=[{grant_to!r}] for one role"
        )
    return tuple(identifier(role, "a role in grant_to") for role in grant_to)


@contextmanager
def _engine(url_or_engine: str | URL | Engine) -> Iterator[Engine]:
    """The caller's engine, or a pool-less one for a URL, disposed on exit."""
    if isinstance(url_or_engine, Engine):
        yield url_or_engine
        return
    url = database_url(url_or_engine)
    connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": _CONNECT_TIMEOUT}
    engine = sa.create_engine(url, poolclass=sa.NullPool, connect_args=connect_args)
    try:
        yield engine
    finally:
        engine.dispose()


def _unknown_revision_hint(config: Config, engine: Engine, schema: str | None) -> str:
    try:
        at = current(engine, schema=schema)
    except MigrationError:
        return ""
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    if at is None or at in known:
        return ""
    return (
        f"; the database is at {at!r}, a revision this version of tenant-celery does not "
        f"ship (probably migrated by a newer version)"
    )


def _hint(exc: SQLAlchemyError) -> str:
    if sqlstate(getattr(exc, "orig", None)) == _DUPLICATE_TABLE:
        return (
            "; if kombu or Celery created these tables on first use, stop the workers, drain "
            "the queues, drop the tables and their sequences, then upgrade again"
        )
    return ""


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _reason(exc: BaseException) -> str:
    """PostgreSQL's own message on one line (SQLAlchemy's wrapper adds SQL and a link)."""
    cause = getattr(exc, "orig", None) or exc
    return " ".join(str(cause).split()) or type(cause).__name__
