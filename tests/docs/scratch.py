"""Scratch things the page tests share: Alembic projects, roles, libpq URLs."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

from kombu.transport.sqlalchemy import Channel
from sqlalchemy.engine import URL
from sqlalchemy.orm import close_all_sessions

from tests._rig.postgres import Database, PgCluster, render

#: A host application's ``env.py``, online and offline (``--sql``), with no logging set up.
HOST_ENV = """\
import sqlalchemy as sa
from alembic import context

config = context.config
url = config.get_main_option("sqlalchemy.url")
if context.is_offline_mode():
    context.configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
"""

#: The revision a page's revision follows: creates nothing.
BASE_REVISION = '''\
"""the host's earlier history"""

revision = {revision!r}
down_revision = None


def upgrade():
    pass


def downgrade():
    pass
'''


def alembic_project(
    root: Path, url: URL, *, ini: str | None = None, env: str = HOST_ENV, base: str | None = None
) -> Path:
    """Write a host Alembic project in ``root``: ``alembic.ini`` (``ini``, or one whose
    versions are ``migrations/versions``), ``migrations/env.py`` and, when ``base`` is
    given, a first revision of that id.  ``sqlalchemy.url`` is added to the ini."""
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (root / "migrations" / "env.py").write_text(env)
    if base is not None:
        (versions / f"{base}_base.py").write_text(BASE_REVISION.format(revision=base))
    if ini is None:
        ini = "[alembic]\nscript_location = %(here)s/migrations\n"
    url_line = "sqlalchemy.url = " + render(url).replace("%", "%%")
    (root / "alembic.ini").write_text(ini.rstrip("\n") + "\n" + url_line + "\n")
    return root / "alembic.ini"


def libpq(url: URL) -> str:
    """``url`` as a libpq URI (``postgresql://``), for psql and the docs' plain URLs."""
    return render(url.set(drivername="postgresql"))


def server_part(url: URL) -> str:
    """What follows the user info in ``url``'s string form, ``@`` included: the
    replacement for a docs URL's ``@db/shop`` that keeps the page's user and password.

    ``@127.0.0.1:5432/tc_1`` for a TCP server; for a Unix socket (pgserver) the
    URL has no host and the socket directory is in its query, which is kept:
    ``@/tc_1?host=%2Ftmp%2F...&port=5432``.  SQLAlchemy and libpq (``psql``) both
    read either form, and any user info put in front of it parses back to ``url``
    with that user.
    """
    anonymous = render(  # not url.set(username=None): set() ignores None
        URL.create(
            "postgresql", host=url.host, port=url.port, database=url.database, query=url.query
        )
    )
    scheme = "postgresql://"
    assert anonymous.startswith(scheme), anonymous
    return "@" + anonymous[len(scheme) :]


@contextlib.contextmanager
def scratch_roles(
    cluster: PgCluster, databases: list[Database], *names: str
) -> Iterator[dict[str, str]]:
    """Unique cluster-wide role names for ``names`` (``{"app": "tc_docs_app_1a2b"}``);
    whatever exists of them at the end is dropped, with what they own in ``databases``."""
    tag = secrets.token_hex(3)
    roles = {name: f"tc_docs_{name}_{tag}" for name in names}
    try:
        yield roles
    finally:
        for role in roles.values():
            for database in databases:
                with contextlib.suppress(Exception), cluster.connect(database.name) as conn:
                    conn.execute(f'REASSIGN OWNED BY "{role}" TO CURRENT_USER')
                    conn.execute(f'DROP OWNED BY "{role}"')
            with cluster.connect() as conn:
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def forget_kombu_engines(*databases: Database) -> None:
    """Close what kombu's SQLAlchemy transport holds on ``databases`` in this process.

    It caches one engine per URL, process-wide, and its channels keep sessions
    that may hold a connection: close the sessions, then dispose the engines.
    """
    close_all_sessions()
    for key in [key for key in Channel._engines if any(d.name in key for d in databases)]:
        engine, _session = Channel._engines.pop(key)
        engine.dispose()
