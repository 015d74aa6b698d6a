"""PostgreSQL for the tests: one server per session, a template, a database per test.

Where the server comes from, in order (first that works wins):

1. ``TENANT_CELERY_TEST_DSN``, a superuser DSN of a running server (CI sets it);
2. a throwaway PostgreSQL 16 from the ``pgserver`` wheel (root or not; Unix socket only);
3. a throwaway server from the system ``pg_ctl`` through pytest-postgresql (not as root:
   ``pg_ctl`` refuses to run as root).

``TENANT_CELERY_TEST_PG_SOURCE`` (``dsn``, ``pgserver``, ``pg_ctl``) forces one of them.

On that server the session creates the application role (:data:`APP_ROLE`) and a
template database; every test database is ``CREATE DATABASE ... TEMPLATE`` of it and
is dropped ``WITH (FORCE)`` when its fixture ends.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from celery.backends.database import DatabaseBackend
from psycopg import sql
from sqlalchemy.engine import URL, Engine

from tests._rig import env

#: ``postgresql+psycopg``, or ``postgresql+psycopg2`` with ``TENANT_CELERY_TEST_DRIVER``.
DRIVER = env.pg_drivername()
MAINTENANCE_DB = "postgres"
#: The unprivileged role tasks connect as: LOGIN, no SUPERUSER/BYPASSRLS/CREATEDB/CREATEROLE.
APP_ROLE = "app_user"
APP_PASSWORD = "app_user"
#: Prefix of every database the rig creates: ``tc_<pid>_<hex>_<n>`` (template: ``..._tpl``).
DB_PREFIX = "tc_"
PGSERVER_DIR_PREFIX = "tc-pg-"
CONNECT_TIMEOUT = 5

_STALE_DB = re.compile(r"^tc_(\d+)_[0-9a-f]{4}_\w+$")
_LOOPBACK = {"127.0.0.1", "localhost", "::1", ""}  # "": libpq's default socket


# --------------------------------------------------------------------------- URLs


def to_sqlalchemy_url(dsn: str | URL) -> URL:
    """Turn a libpq-style URL (``postgresql://`` or ``postgres://``) into one for :data:`DRIVER`."""
    url = sa.make_url(dsn)
    return url.set(drivername=DRIVER)


def libpq_kwargs(url: URL) -> dict[str, Any]:
    """Keyword arguments for :func:`psycopg.connect` equivalent to a SQLAlchemy *url*."""
    kwargs: dict[str, Any] = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
        "connect_timeout": CONNECT_TIMEOUT,
    }
    for key, value in url.query.items():
        kwargs[key] = value if isinstance(value, str) else value[-1]
    return {key: value for key, value in kwargs.items() if value is not None}


def render(url: URL) -> str:
    """The URL as a string with its password, for Celery, kombu and subprocesses."""
    return url.render_as_string(hide_password=False)


def is_local(url: URL) -> bool:
    """Whether ``url`` names a server on this machine (loopback, a Unix socket, no host)."""
    host = url.query.get("host") or url.host or ""
    host = host if isinstance(host, str) else host[-1]
    return host in _LOOPBACK or host.startswith("/")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (perhaps another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------ cluster


@dataclass(frozen=True)
class PgCluster:
    """A running PostgreSQL server the session may create databases and roles on."""

    #: Where it came from: ``"dsn"``, ``"pgserver"`` or ``"pg_ctl"``.
    source: str
    #: Superuser URL of the maintenance database (driver :data:`DRIVER`).
    admin_url: URL
    #: Restarts the server with ``pg_ctl restart -m <mode>``: a throwaway pgserver
    #: cluster only; ``None`` for the others.
    restarter: Callable[[str], None] | None = None

    def restart(self, mode: str = "fast") -> None:
        """Restart the server (``fast``, ``immediate`` or ``smart`` shutdown) and wait
        until it accepts connections again.

        Raises:
            RuntimeError: this cluster was not started here.
        """
        if self.restarter is None:
            raise RuntimeError(f"a {self.source} server cannot be restarted from here")
        self.restarter(mode)

    @property
    def local(self) -> bool:
        """Whether the server runs on this machine (loopback or Unix socket)."""
        return is_local(self.admin_url)

    def url(self, database: str, *, app_role: bool = False) -> URL:
        """URL of *database* as the superuser, or as :data:`APP_ROLE` when *app_role*."""
        url = self.admin_url.set(database=database)
        if app_role:
            url = url.set(username=APP_ROLE, password=APP_PASSWORD)
        return url

    def connect(self, database: str = MAINTENANCE_DB) -> psycopg.Connection[Any]:
        """An autocommit superuser psycopg connection (for DDL that cannot run in a transaction)."""
        return psycopg.connect(**libpq_kwargs(self.url(database)), autocommit=True)

    def describe(self) -> str:
        """One line for humans: source, server version, URL (no password) and the
        driver SQLAlchemy loads for it, with its version."""
        try:
            with self.connect() as conn:
                version = conn.execute("SHOW server_version").fetchone()
        except psycopg.Error:
            version = None
        shown = version[0] if version else "?"
        dialect = sa.create_engine(self.admin_url).dialect
        version_text = str(getattr(dialect.loaded_dbapi, "__version__", "?"))
        driver = f"{dialect.driver} {version_text.split(maxsplit=1)[0]}"
        return f"{self.source}, PostgreSQL {shown}, {self.admin_url.render_as_string()}, {driver}"

    def check(self) -> str | None:
        """Return ``None`` when the server answers as a superuser, else the reason it does not."""
        try:
            with self.connect() as conn:
                row = conn.execute(
                    "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
                ).fetchone()
        except psycopg.Error as exc:
            return f"{self.source} server: {type(exc).__name__}: {exc}".strip()
        if not row or not row[0]:
            return f"{self.source} server: {self.admin_url.username!r} is not a superuser"
        return None


def _import_pgserver() -> Any:
    # platformdirs warns (RuntimeDirWarning) when XDG_RUNTIME_DIR is unset, which
    # pytest's filterwarnings=error would turn into an import failure.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*XDG_RUNTIME_DIR")
        import pgserver  # noqa: PLC0415  (optional, heavy)
    return pgserver


def _reap_stale_pgserver_dirs() -> None:
    """Stop and delete throwaway pgserver clusters whose pytest process died."""
    for path in Path(tempfile.gettempdir()).glob(f"{PGSERVER_DIR_PREFIX}*"):
        match = re.match(rf"{PGSERVER_DIR_PREFIX}(\d+)-", path.name)
        if not match or pid_alive(int(match.group(1))):
            continue
        pid_file = path / "data" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            postmaster = int(pid_file.read_text().splitlines()[0])
            os.kill(postmaster, signal.SIGINT)  # fast shutdown
            for _ in range(50):
                if not pid_alive(postmaster):
                    break
                time.sleep(0.1)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def pgserver_cluster() -> Iterator[PgCluster]:
    """Start a throwaway pgserver cluster in a temporary directory; delete it afterwards."""
    _reap_stale_pgserver_dirs()
    pgserver = _import_pgserver()
    base = Path(tempfile.mkdtemp(prefix=f"{PGSERVER_DIR_PREFIX}{os.getpid()}-"))
    server = None
    restarted = [False]
    try:
        server = pgserver.get_server(base / "data", cleanup_mode="delete")
        info = server.get_postmaster_info()
        url = URL.create(
            DRIVER,
            username="postgres",
            database=MAINTENANCE_DB,
            query={"host": str(info.socket_dir), "port": str(info.port or 5432)},
        )
        found = server

        def restart(mode: str) -> None:
            restarted[0] = True
            _pgserver_ctl(found, ["-w", "-m", mode, "-l", str(found.log), "restart"])

        yield PgCluster("pgserver", url, restart)
    finally:
        if server is not None:
            if restarted[0]:
                # pgserver stops only the postmaster it started, gone since the restart.
                with contextlib.suppress(Exception):
                    _pgserver_ctl(server, ["-w", "-m", "fast", "stop"])
            server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def _pgserver_ctl(server: Any, arguments: list[str]) -> None:
    """Run pgserver's ``pg_ctl`` on ``server``'s cluster, as the OS user it runs as."""
    from pgserver._commands import pg_ctl  # noqa: PLC0415 (optional, heavy)

    pg_ctl(arguments, pgdata=server.pgdata, user=server.system_user, timeout=60)


def find_pg_ctl() -> str | None:
    """The system ``pg_ctl``: on PATH, else the newest ``/usr/lib/postgresql/*/bin/pg_ctl``."""
    found = shutil.which("pg_ctl")
    if found:
        return found

    def version(path: Path) -> int:
        name = path.parent.parent.name
        return int(name) if name.isdigit() else 0

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=version)
    return str(candidates[-1]) if candidates else None


def cluster_sources(
    start_pg_ctl: Callable[[], PgCluster],
) -> Iterator[tuple[str, Callable[[], contextlib.AbstractContextManager[PgCluster]]]]:
    """Yield ``(name, opener)`` for each PostgreSQL source worth trying, in order.

    *start_pg_ctl* starts a pytest-postgresql server (it needs the pytest request,
    so the conftest provides it).
    """
    forced = os.environ.get(env.PG_SOURCE_ENV, "").strip().lower()
    dsn = os.environ.get(env.PG_DSN_ENV, "").strip()

    @contextlib.contextmanager
    def from_dsn() -> Iterator[PgCluster]:
        yield PgCluster("dsn", to_sqlalchemy_url(dsn))

    @contextlib.contextmanager
    def from_pg_ctl() -> Iterator[PgCluster]:
        yield start_pg_ctl()

    if forced not in {"", "auto", "dsn", "pgserver", "pg_ctl"}:
        raise ValueError(f"{env.PG_SOURCE_ENV}={forced!r}: expected dsn, pgserver or pg_ctl")
    if dsn and forced in {"", "auto", "dsn"}:
        yield "dsn", from_dsn
        return  # an explicit DSN that does not work is a configuration error: no fallback
    if forced in {"", "auto", "pgserver"}:
        yield "pgserver", pgserver_cluster
    if forced in {"", "auto", "pg_ctl"}:
        if os.geteuid() == 0 and forced != "pg_ctl":
            return  # pg_ctl refuses to run as root
        yield "pg_ctl", from_pg_ctl


@contextlib.contextmanager
def open_cluster(start_pg_ctl: Callable[[], PgCluster]) -> Iterator[PgCluster]:
    """Open the first working PostgreSQL source; skip (fail in CI) when none works."""
    problems: list[str] = []
    for name, opener in cluster_sources(start_pg_ctl):
        with contextlib.ExitStack() as stack:
            try:
                cluster = stack.enter_context(opener())
            except Exception as exc:  # a source that cannot start is just unavailable
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            problem = cluster.check()
            if problem is not None:
                problems.append(problem)
                continue
            yield cluster
            return
    env.unavailable(
        "PostgreSQL",
        "; ".join(problems)
        or f"nothing to try ({env.PG_SOURCE_ENV}=dsn without {env.PG_DSN_ENV}?)",
    )


# ---------------------------------------------------------------------- databases


@dataclass
class Database:
    """One scratch database, cloned from the session template.

    ``url`` connects as the superuser (DDL, seeding); ``app_url`` as :data:`APP_ROLE`.
    Engines made through :meth:`admin_engine`, :meth:`app_engine` and :meth:`engine`
    are disposed when the database is dropped.
    """

    name: str
    cluster: PgCluster = field(repr=False)
    _engines: list[Engine] = field(default_factory=list, repr=False)
    _cache: dict[str, Engine] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> URL:
        """Superuser SQLAlchemy URL (driver :data:`DRIVER`)."""
        return self.cluster.url(self.name)

    @property
    def app_url(self) -> URL:
        """SQLAlchemy URL connecting as :data:`APP_ROLE`."""
        return self.cluster.url(self.name, app_role=True)

    @property
    def async_app_url(self) -> URL:
        """:attr:`app_url` for an asyncio engine: psycopg 3 whatever the rig's driver,
        as psycopg2 has no asyncio mode."""
        return self.app_url.set(drivername="postgresql+psycopg")

    def engine(self, url: URL | None = None, **kwargs: Any) -> Engine:
        """A new engine (superuser URL by default), disposed with the database."""
        engine = sa.create_engine(url if url is not None else self.url, **kwargs)
        self._engines.append(engine)
        return engine

    def admin_engine(self) -> Engine:
        """The database's shared superuser engine (small pool)."""
        if "admin" not in self._cache:
            self._cache["admin"] = self.engine(self.url, pool_size=2, max_overflow=3)
        return self._cache["admin"]

    def app_engine(self) -> Engine:
        """The database's shared :data:`APP_ROLE` engine (QueuePool, 2 + 3 overflow)."""
        if "app" not in self._cache:
            self._cache["app"] = self.engine(
                self.app_url, pool_size=2, max_overflow=3, pool_timeout=10
            )
        return self._cache["app"]

    def dispose_engines(self) -> None:
        """Close every connection the rig's engines hold on this database."""
        for engine in self._engines:
            engine.dispose()
        self._engines.clear()
        self._cache.clear()


class DatabaseFactory:
    """Creates the application role and the session template, and clones databases from it."""

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster
        self.tag = f"{os.getpid()}_{secrets.token_hex(2)}"
        self.template = f"{DB_PREFIX}{self.tag}_tpl"
        self._counter = itertools.count(1)
        self._live: dict[str, Database] = {}

    # -- session lifecycle

    def setup(self) -> None:
        """Drop stale databases of dead sessions, ensure the role, build the template."""
        with self.cluster.connect() as conn:
            if self.cluster.local:
                self._drop_stale(conn)
            ensure_app_role(conn)
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
                    sql.Identifier(self.template)
                )
            )
        with self.cluster.connect(self.template) as conn:
            conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            conn.execute(
                sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(APP_ROLE))
            )
        with self.cluster.connect() as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
                    sql.Identifier(self.template)
                )
            )

    def close(self) -> None:
        """Drop every database still alive and the template."""
        for database in list(self._live.values()):
            self.drop(database)
        with self.cluster.connect() as conn:
            _drop_database(conn, self.template, template=True)

    # -- per-test databases

    def create(self) -> Database:
        """Clone the template into a fresh database the app role may connect to."""
        name = f"{DB_PREFIX}{self.tag}_{next(self._counter)}"
        with self.cluster.connect() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(self.template)
                )
            )
            conn.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                    sql.Identifier(name), sql.Identifier(APP_ROLE)
                )
            )
        database = Database(name, self.cluster)
        self._live[name] = database
        _forget_created_result_tables()
        return database

    def drop(self, database: Database) -> None:
        """Dispose the database's engines and drop it, terminating other sessions."""
        database.dispose_engines()
        self._live.pop(database.name, None)
        with self.cluster.connect() as conn:
            _drop_database(conn, database.name)

    @contextlib.contextmanager
    def database(self) -> Iterator[Database]:
        """A fresh database for the duration of the ``with`` block."""
        database = self.create()
        try:
            yield database
        finally:
            self.drop(database)

    def _drop_stale(self, conn: psycopg.Connection[Any]) -> None:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{DB_PREFIX}%",)
        ).fetchall()
        for (name,) in rows:
            match = _STALE_DB.match(name)
            if match and not pid_alive(int(match.group(1))):
                with contextlib.suppress(psycopg.Error):
                    _drop_database(conn, name, template=name.endswith("_tpl"))


def _forget_created_result_tables() -> None:
    """Let the next result read or write in this process create Celery's result tables.

    Before Celery 5.5 every ``db+`` result backend of a process shares one session
    manager (the default value of ``ResultSession``'s argument) that creates the
    tables once per process, in the first database it meets; the tests use a new
    database each.
    """
    shared = (DatabaseBackend.ResultSession.__defaults__ or (None,))[0]
    if shared is not None:
        shared.prepared = False


def _drop_database(conn: psycopg.Connection[Any], name: str, *, template: bool = False) -> None:
    ident = sql.Identifier(name)
    if template:
        with contextlib.suppress(psycopg.errors.InvalidCatalogName):
            conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(ident))
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def ensure_app_role(conn: psycopg.Connection[Any]) -> None:
    """Create :data:`APP_ROLE` if missing and force its attributes and password.

    The role is cluster-wide and may be shared with concurrent test sessions, so
    creation tolerates a concurrent creator and the ``ALTER`` is retried.
    """
    role = sql.Identifier(APP_ROLE)
    for attempt in range(5):
        try:
            exists = conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE ROLE {}").format(role))
            conn.execute(
                sql.SQL(
                    "ALTER ROLE {} WITH LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
                    " NOREPLICATION PASSWORD {}"
                ).format(role, sql.Literal(APP_PASSWORD))
            )
            return
        except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            continue  # created concurrently: loop and ALTER it
        except psycopg.errors.InternalError:  # "tuple concurrently updated"
            if attempt == 4:
                raise
            time.sleep(0.1)
