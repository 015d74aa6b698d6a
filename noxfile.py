"""The compatibility matrix: the unit and integration tests on the oldest and the
newest supported releases, with psycopg 3 and psycopg2, on PostgreSQL 15 and 16.

``nox`` runs every cell; ``nox -s "tests(oldest-psycopg-pg15)"`` runs one and
``nox -l`` lists them.  Each cell gets its own virtualenv under ``.nox/``, which
later runs reuse; the installed versions are printed before the tests run.

The services are the ones the test suite uses (``README.md``): Redis and
RabbitMQ on loopback, PostgreSQL 15 from ``TENANT_CELERY_TEST_DSN`` (default:
the local server) and PostgreSQL 16 from the ``pgserver`` wheel.  ``CI=true``
is set, so a missing service fails a cell instead of skipping its tests.
Arguments after ``--`` replace the default pytest arguments.

``nox -s canvas`` is not a cell and not run by a bare ``nox``: it runs Celery's
own canvas integration suite plain and with every task a tenant task, and
fails when a test's outcome differs (:mod:`compat.canvas`; about half an hour).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

#: The oldest release of each dependency the package supports (the lower bounds in
#: pyproject.toml), with the oldest Celery's and kombu's own dependencies.
OLDEST = {
    "celery": "5.3.0",
    "kombu": "5.3.0",
    "billiard": "4.1.0",
    "amqp": "5.1.1",
    "vine": "5.0.0",
    "sqlalchemy": "2.0.0",
    "alembic": "1.12.0",
    "psycopg": "3.1.19",
    "psycopg-binary": "3.1.19",
    "psycopg2-binary": "2.9.5",
    "redis": "4.5.2",
    "prometheus-client": "0.17.0",
    "pgserver": "0.1.4",
}

EXTRAS = "prometheus,embedded,redis,asyncio,psycopg2"
#: What the tests need besides the package (its ``dev`` extra without the linters
#: and the docs tools).
TEST_TOOLS = [
    "pytest>=8",
    "pytest-timeout>=2.2",
    "pytest-postgresql>=6",
    "hypothesis>=6.100",
    "flower>=2.0",
]

_SHOW_VERSIONS = (
    "import importlib.metadata as m, sys; "
    "print(f'Python {sys.version.split()[0]}', *(f'{n} {m.version(n)}' for n in sys.argv[1:]), "
    "sep=', ')"
)

DEFAULT_PYTEST_ARGS = ["tests/unit", "tests/integration", "-p", "no:cacheprovider"]
#: The oldest broker clients (kombu 5.3 with redis 4.5 and amqp 5.1) leave sockets for
#: the garbage collector to close, and ``filterwarnings = error`` would fail whichever
#: test is running when it collects one; the newest cells keep that check.
OLDEST_PYTEST_ARGS = ["-W", "ignore:unclosed <socket.socket:ResourceWarning"]
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

CELLS = [
    nox.param(stack, driver, postgres, id=f"{stack}-{driver}-{postgres}")
    for stack, driver, postgres in [
        ("oldest", "psycopg", "pg15"),
        ("oldest", "psycopg2", "pg15"),
        ("newest", "psycopg", "pg15"),
        ("newest", "psycopg2", "pg15"),
        ("oldest", "psycopg", "pg16"),
        ("newest", "psycopg", "pg16"),
    ]
]


@nox.session(python="3.11")
@nox.parametrize(("stack", "driver", "postgres"), CELLS)
def tests(session: nox.Session, stack: str, driver: str, postgres: str) -> None:
    """One cell: install the stack, show its versions, run the tests."""
    # Oldest: exact pins.  Newest: every name upgraded as far as pyproject.toml allows.
    # Both drivers are installed in every cell (the tests of the differences between
    # them need both); ``driver`` chooses the one behind the rig's URLs.
    wanted = [f"{name}=={pin}" if stack == "oldest" else name for name, pin in OLDEST.items()]
    session.install("--upgrade", "-e", f".[{EXTRAS}]", *wanted, *TEST_TOOLS)
    session.run("python", "-c", _SHOW_VERSIONS, *OLDEST, silent=False)

    environ = {"CI": "true", "TENANT_CELERY_TEST_DRIVER": driver}
    if postgres == "pg15":
        environ["TENANT_CELERY_TEST_DSN"] = os.environ.get("TENANT_CELERY_TEST_DSN") or LOCAL_DSN
        environ["TENANT_CELERY_TEST_PG_SOURCE"] = "dsn"
    else:
        environ["TENANT_CELERY_TEST_DSN"] = ""
        environ["TENANT_CELERY_TEST_PG_SOURCE"] = "pgserver"
    args = session.posargs or DEFAULT_PYTEST_ARGS
    if stack == "oldest":
        args = [*OLDEST_PYTEST_ARGS, *args]
    session.run("pytest", *args, env=environ)


#: Celery's canvas suite is taken from the sdist of the Celery it runs against, with
#: the versions that sdist pins (requirements/test.txt) of the tools the suite uses:
#: reruns of its flaky tests and their timeouts.  Its ``subtests`` fixture is pytest's
#: own since pytest 9 (the pinned pytest-subtests is not loaded beside it).
CANVAS_CELERY = "5.7.0"
CANVAS_TOOLS = ["pytest==9.1.1", "pytest-rerunfailures==16.7", "pytest-timeout==2.4.0"]


@nox.session(python="3.11", default=False)
def canvas(session: nox.Session) -> None:
    """Celery's t/integration/test_canvas.py, plain and with TenantTask on a signed worker."""
    session.install(".[redis]", f"celery[redis,pydantic]=={CANVAS_CELERY}", *CANVAS_TOOLS)
    downloads = Path(session.create_tmp())
    sdist = downloads / f"celery-{CANVAS_CELERY}.tar.gz"
    if not sdist.exists():
        session.run(
            "python", "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
            "--dest", str(downloads), f"celery=={CANVAS_CELERY}",
        )  # fmt: skip
    out = downloads / "canvas"
    session.run(
        "python", "-m", "compat.canvas", str(sdist), "--out", str(out), "--", *session.posargs
    )
