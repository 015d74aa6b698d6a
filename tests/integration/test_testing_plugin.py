"""The pytest plugin for host applications, on real PostgreSQL as the unprivileged ``app_user``.

:func:`~tenant_celery.testing.assert_tenant_isolation` is run against tables
that are protected and tables that leak in each way it must catch; the run
helpers against real tenant tasks that write through RLS; and the plugin
itself in fresh pytest processes, which find it through its entry point
only, including the documented example host test, run as written.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, Task
from celery.exceptions import MaxRetriesExceededError
from celery.signals import before_task_publish
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from tenant_celery import (
    ConfigurationError,
    InvalidTenantId,
    TenantConflict,
    TransactionRequired,
    current_tenant,
    integer_tenant_id,
    set_tenant_id_parser,
    tenant_context,
    tenant_session,
    tenant_task,
)
from tenant_celery.rls import enable_tenant_rls, grant_tenant_tables
from tenant_celery.testing import (
    IsolationNotProvable,
    IsolationReport,
    TenantIsolationError,
    TenantLeak,
    assert_tenant_isolation,
    eager_tasks,
    new_tenant_id,
    run_in_tenant,
)
from tests._rig.postgres import APP_ROLE, Database, render

from .notes import count_all, create_notes

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "testing"
GUC = "app.current_tenant_id"
POLICY_VALUE = f"(SELECT NULLIF(current_setting('{GUC}', true), '')::uuid)"


@pytest.fixture
def notes(admin_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]) -> Engine:
    """Table ``notes`` under the package's policy: tenant a has 3 rows, tenant b 2."""
    a, b = tenant_celery_tenant_ids
    create_notes(admin_engine)
    with admin_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO notes (tenant_id, body)"
                " VALUES (:a,'1'), (:a,'2'), (:a,'3'), (:b,'4'), (:b,'5')"
            ),
            {"a": a, "b": b},
        )
    return admin_engine


def admin_sql(admin_engine: Engine, *statements: str) -> None:
    with admin_engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


# --- a protected table passes ------------------------------------------------


def test_a_protected_table_passes_and_nothing_is_written(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    a, b = tenant_celery_tenant_ids
    report = assert_tenant_isolation(app_engine, "notes", a, b)
    assert report == IsolationReport(
        table="public.notes",
        column="tenant_id",
        setting=GUC,
        role=APP_ROLE,
        tenants=(a, b),
        rows=(3, 2),
        writes_checked=("insert", "update"),
    )
    assert count_all(notes) == 5
    with notes.connect() as conn:
        tenants = conn.execute(text("SELECT tenant_id::text, count(*) FROM notes GROUP BY 1"))
        assert dict(tenants.all()) == {a: 3, b: 2}


def test_a_connection_keeps_its_transaction_and_its_tenant(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    a, b = tenant_celery_tenant_ids
    with app_engine.connect() as conn:
        with conn.begin():
            conn.execute(text("SELECT set_config(:n, :v, true)"), {"n": GUC, "v": a})
            conn.execute(text("INSERT INTO notes (tenant_id, body) VALUES (:a, 'mine')"), {"a": a})
            report = assert_tenant_isolation(conn, "notes", a, b)
            assert report.rows == (4, 2)  # the caller's uncommitted row counts
            assert conn.execute(text("SELECT current_setting(:n)"), {"n": GUC}).scalar() == a
            assert conn.execute(text("SELECT count(*) FROM notes")).scalar() == 4
        assert not conn.in_transaction()
        assert_tenant_isolation(conn, "notes", a, b)
        assert not conn.in_transaction()
    assert count_all(notes) == 6


def test_the_role_may_own_the_table_when_rls_is_forced(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    admin_sql(notes, f"ALTER TABLE notes OWNER TO {APP_ROLE}")
    assert assert_tenant_isolation(app_engine, "notes", *tenant_celery_tenant_ids).rows == (3, 2)


def test_write_checks_need_the_privilege(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    admin_sql(notes, f"REVOKE INSERT, UPDATE ON notes FROM {APP_ROLE}")
    report = assert_tenant_isolation(app_engine, "notes", *tenant_celery_tenant_ids)
    assert report.writes_checked == ()
    admin_sql(notes, f"GRANT UPDATE ON notes TO {APP_ROLE}")
    report = assert_tenant_isolation(app_engine, "notes", *tenant_celery_tenant_ids)
    assert report.writes_checked == ("update",)
    report = assert_tenant_isolation(
        app_engine, "notes", *tenant_celery_tenant_ids, check_writes=False
    )
    assert report.writes_checked == ()


def test_a_trigger_that_rewrites_the_tenant_is_not_a_leak(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    admin_sql(
        notes,
        "CREATE FUNCTION notes_own_tenant() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN NEW.tenant_id := current_setting('{GUC}')::uuid; RETURN NEW; END $$",
        "CREATE TRIGGER notes_own_tenant BEFORE INSERT OR UPDATE ON notes"
        " FOR EACH ROW EXECUTE FUNCTION notes_own_tenant()",
    )
    report = assert_tenant_isolation(app_engine, "notes", *tenant_celery_tenant_ids)
    assert report.writes_checked == ("insert", "update")
    assert count_all(notes) == 5


def test_integer_tenants(
    admin_engine: Engine, app_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = set_tenant_id_parser(integer_tenant_id)
    try:
        a, b = new_tenant_id(), new_tenant_id()
        assert a.isdigit()
        assert b.isdigit()
        assert a != b
        admin_sql(
            admin_engine,
            "CREATE TABLE accounts (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " tenant_id integer NOT NULL, name text NOT NULL,"
            " label text GENERATED ALWAYS AS (upper(name)) STORED)",
            f"INSERT INTO accounts (tenant_id, name) VALUES ({a}, 'x'), ({b}, 'y'), ({b}, 'z')",
        )
        with admin_engine.begin() as conn:
            enable_tenant_rls(conn, "accounts")
            grant_tenant_tables(conn, APP_ROLE, ["accounts"])
        report = assert_tenant_isolation(app_engine, "accounts", int(a), int(b))
        assert report.rows == (1, 2)
        assert report.writes_checked == ("insert", "update")
    finally:
        set_tenant_id_parser(previous)


# --- leaks are caught --------------------------------------------------------


def test_a_policy_that_lets_every_row_be_read_leaks(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    a, b = tenant_celery_tenant_ids
    admin_sql(notes, "CREATE POLICY open_read ON notes FOR SELECT USING (true)")
    with pytest.raises(TenantLeak) as caught:
        assert_tenant_isolation(app_engine, "notes", a, b)
    message = str(caught.value)
    assert message.startswith(f"with tenant {a} set, role 'app_user' saw 2 rows of tenant {b}")
    assert "in public.notes;" in message
    assert "open_read (permissive SELECT, USING true)" in message
    assert "tenant_isolation_policy (permissive ALL" in message
    assert isinstance(caught.value, AssertionError)
    assert count_all(notes) == 5


def test_rows_of_third_tenants_are_a_leak(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    a, b = tenant_celery_tenant_ids
    admin_sql(
        notes,
        "INSERT INTO notes (tenant_id, body) VALUES (gen_random_uuid(), 'c')",
        "CREATE POLICY see_c ON notes FOR SELECT USING (body = 'c')",
    )
    with pytest.raises(
        TenantLeak,
        match=f"with tenant {a} set, role 'app_user' saw 1 row of "
        "other tenants \\(or none\\) in public.notes",
    ):
        assert_tenant_isolation(app_engine, "notes", a, b)


@pytest.mark.parametrize("used", [False, True], ids=["new-session", "used-session"])
def test_rows_visible_with_no_tenant_leak(
    notes: Engine, database: Database, tenant_celery_tenant_ids: tuple[str, str], used: bool
) -> None:
    admin_sql(
        notes,
        "DROP POLICY tenant_isolation_policy ON notes",
        # the tenant's rows with a tenant; everything without one
        "CREATE POLICY lenient ON notes USING (tenant_id = COALESCE("
        f"NULLIF(current_setting('{GUC}', true), '')::uuid, tenant_id))",
    )
    with database.engine(database.app_url).connect() as conn:
        if used:  # an earlier transaction made the setting: it now reads ''
            with conn.begin():
                conn.execute(
                    text("SELECT set_config(:n, :v, true)"), {"n": GUC, "v": new_tenant_id()}
                )
        with pytest.raises(TenantLeak) as caught:
            assert_tenant_isolation(conn, "notes", *tenant_celery_tenant_ids)
    how = "empty" if used else "never made in this session"
    assert str(caught.value).startswith(
        f"with no tenant set (the setting '{GUC}' {how}), role 'app_user' saw 5 rows in"
        " public.notes; it must see none (fail closed); policies applying to role 'app_user':"
        " lenient (permissive ALL, USING (tenant_id = COALESCE("
    )


def test_rows_visible_before_the_setting_was_ever_made_leak(
    notes: Engine, database: Database, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    admin_sql(
        notes,
        f"CREATE POLICY unset ON notes FOR SELECT USING (current_setting('{GUC}', true) IS NULL)",
    )
    with database.engine(database.app_url).connect() as conn:  # the setting never made in it
        with pytest.raises(
            TenantLeak, match=r"the setting 'app\.current_tenant_id' never made in this session"
        ):
            assert_tenant_isolation(conn, "notes", *tenant_celery_tenant_ids)


def test_a_policy_that_fails_without_a_tenant_is_reported(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    admin_sql(
        notes,
        "DROP POLICY tenant_isolation_policy ON notes",
        "CREATE POLICY no_nullif ON notes"
        f" USING (tenant_id = current_setting('{GUC}', true)::uuid)",
    )
    with pytest.raises(TenantIsolationError) as caught:
        assert_tenant_isolation(app_engine, "notes", *tenant_celery_tenant_ids)
    assert type(caught.value) is TenantIsolationError
    message = str(caught.value)
    assert message.startswith(
        f"checking public.notes with no tenant set (the setting '{GUC}' empty) failed: "
        'invalid input syntax for type uuid: ""'
    )
    assert "NULLIF(current_setting('app.current_tenant_id', true), '')" in message


def test_a_policy_that_accepts_inserts_for_other_tenants_leaks(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    a, b = tenant_celery_tenant_ids
    admin_sql(notes, "CREATE POLICY open_insert ON notes FOR INSERT WITH CHECK (true)")
    with pytest.raises(TenantLeak) as caught:
        assert_tenant_isolation(app_engine, "notes", a, b)
    assert str(caught.value).startswith(
        f"with tenant {a} set, an INSERT of a row naming tenant {b} was accepted by public.notes "
        "(1 row written as another tenant's)"
    )
    assert "open_insert (permissive INSERT, WITH CHECK true)" in str(caught.value)
    assert count_all(notes) == 5


def test_a_policy_that_lets_rows_move_to_other_tenants_leaks(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    a, b = tenant_celery_tenant_ids
    admin_sql(
        notes,
        f"CREATE POLICY open_update ON notes FOR UPDATE USING (tenant_id = {POLICY_VALUE})"
        " WITH CHECK (true)",
    )
    with pytest.raises(TenantLeak) as caught:
        assert_tenant_isolation(app_engine, "notes", a, b)
    assert str(caught.value).startswith(
        f"with tenant {a} set, an UPDATE moving rows to tenant {b} was accepted by public.notes "
        "(3 rows written as another tenant's)"
    )
    with notes.connect() as conn:
        tenants = conn.execute(text("SELECT tenant_id::text, count(*) FROM notes GROUP BY 1"))
        assert dict(tenants.all()) == {a: 3, b: 2}


# --- checks that would prove nothing are refused --------------------------------


def test_rls_disabled_is_refused(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    admin_sql(notes, "ALTER TABLE notes DISABLE ROW LEVEL SECURITY")
    with pytest.raises(
        IsolationNotProvable, match=r"^row-level security is not enabled on public\.notes"
    ):
        assert_tenant_isolation(app_engine, "notes", *tenant_celery_tenant_ids)


def test_a_superuser_connection_is_refused(
    notes: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    with pytest.raises(IsolationNotProvable) as caught:
        assert_tenant_isolation(notes, "notes", *tenant_celery_tenant_ids)
    assert re.match(
        r"role '\w+' is a superuser, which bypasses row-level security: a check on public.notes "
        r"would prove nothing; connect as your application role",
        str(caught.value),
    )


@pytest.fixture
def bypass_role(admin_engine: Engine) -> Iterator[str]:
    """A NOLOGIN role with BYPASSRLS (cluster-wide, so uniquely named and dropped)."""
    name = f"tc_bypass_{os.getpid()}_{secrets.token_hex(3)}"
    admin_sql(admin_engine, f"CREATE ROLE {name} NOLOGIN BYPASSRLS")
    yield name
    admin_sql(admin_engine, f"DROP ROLE {name}")


def test_a_bypassrls_role_is_refused(
    notes: Engine, bypass_role: str, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    with notes.connect() as conn, conn.begin():
        conn.execute(text(f"SET LOCAL ROLE {bypass_role}"))
        with pytest.raises(IsolationNotProvable, match=f"^role '{bypass_role}' has BYPASSRLS"):
            assert_tenant_isolation(conn, "notes", *tenant_celery_tenant_ids)


def test_an_owner_without_forced_rls_is_refused(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    admin_sql(
        notes,
        f"ALTER TABLE notes OWNER TO {APP_ROLE}",
        "ALTER TABLE notes NO FORCE ROW LEVEL SECURITY",
    )
    with pytest.raises(
        IsolationNotProvable,
        match=r"^role 'app_user' owns public\.notes and row-level security is not forced on it",
    ):
        assert_tenant_isolation(app_engine, "notes", *tenant_celery_tenant_ids)


def test_a_tenant_without_rows_is_refused_unless_allowed(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    a, _ = tenant_celery_tenant_ids
    empty = new_tenant_id()
    with pytest.raises(IsolationNotProvable) as caught:
        assert_tenant_isolation(app_engine, "notes", a, empty)
    assert str(caught.value).startswith(
        f"tenant {empty} has no rows in public.notes that role 'app_user' can see, so the check "
        "would prove nothing about it"
    )
    report = assert_tenant_isolation(app_engine, "notes", a, empty, allow_empty=True)
    assert report.rows == (3, 0)
    assert report.writes_checked == ("insert", "update")


def test_a_policy_on_another_setting_sees_nothing_and_is_refused(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    with pytest.raises(IsolationNotProvable, match=r"the policy reads the setting 'app\.tenant'"):
        assert_tenant_isolation(
            app_engine, "notes", *tenant_celery_tenant_ids, setting="app.tenant"
        )


def test_no_select_privilege_is_refused(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    admin_sql(notes, f"REVOKE SELECT ON notes FROM {APP_ROLE}")
    with pytest.raises(
        IsolationNotProvable, match=r"^role 'app_user' may not SELECT from public\.notes"
    ):
        assert_tenant_isolation(app_engine, "notes", *tenant_celery_tenant_ids)


def test_bad_arguments(
    notes: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    a, b = tenant_celery_tenant_ids
    with pytest.raises(ConfigurationError, match="the same tenant"):
        assert_tenant_isolation(app_engine, "notes", a, a.upper())
    with pytest.raises(InvalidTenantId):
        assert_tenant_isolation(app_engine, "notes", a, "not-a-uuid")
    with pytest.raises(TenantIsolationError, match=r"^table nothing does not exist"):
        assert_tenant_isolation(app_engine, "nothing", a, b)
    with pytest.raises(TenantIsolationError, match=r"^table notes has no column 'owner_id'"):
        assert_tenant_isolation(app_engine, "notes", a, b, tenant_column="owner_id")
    autocommit = app_engine.execution_options(isolation_level="AUTOCOMMIT")
    with pytest.raises(TransactionRequired, match="AUTOCOMMIT"):
        assert_tenant_isolation(autocommit, "notes", a, b)


# --- running tenant tasks ----------------------------------------------------

tasks_app = Celery("testing_plugin_tasks", broker="memory://", set_as_current=False)
_engine: list[Engine] = []


def write_session() -> Any:
    return sessionmaker(_engine[0])()


@tenant_task(app=tasks_app)
def write_note(body: str) -> int:
    with tenant_session(write_session) as session:
        return int(
            session.execute(
                text("INSERT INTO notes (tenant_id, body) VALUES (:t, :b) RETURNING id"),
                {"t": current_tenant(), "b": body},
            ).scalar_one()
        )


@tenant_task(app=tasks_app)
def count_notes() -> int:
    with tenant_session(write_session) as session:
        return int(session.execute(text("SELECT count(*) FROM notes")).scalar_one())


@tenant_task(app=tasks_app)
def write_then_child(body: str) -> int:
    note = write_note(body)  # called directly, inside this task's tenant
    write_note.delay(f"{body} (child)")
    return note


@tenant_task(app=tasks_app)
def fail(message: str) -> None:
    raise LookupError(message)


@tenant_task(app=tasks_app)
def seen(tenant_id: str) -> list[str | None]:
    return [tenant_id, current_tenant()]


@tenant_task(app=tasks_app, bind=True, max_retries=2, default_retry_delay=0)
def flaky(self: Task[Any, Any], fail_times: int) -> list[Any]:
    if self.request.retries < fail_times:
        raise self.retry()
    return [self.request.retries, current_tenant()]


@pytest.fixture
def task_db(notes: Engine, app_engine: Engine) -> Iterator[Engine]:
    """The tasks above write through ``app_engine`` (``app_user``, under RLS)."""
    _engine.append(app_engine)
    yield notes
    _engine.clear()


def test_run_in_tenant_writes_through_rls(
    task_db: Engine, app_engine: Engine, tenant_celery_tenant_ids: tuple[str, str]
) -> None:
    a, b = tenant_celery_tenant_ids
    assert isinstance(run_in_tenant(write_note, a, "new"), int)
    assert current_tenant() is None
    assert run_in_tenant(count_notes, a) == 4
    assert run_in_tenant(count_notes, b) == 2
    assert assert_tenant_isolation(app_engine, "notes", a, b).rows == (4, 2)


def test_run_in_tenant_publishes_children_unless_eager(
    task_db: Engine, tenant_celery_tenant_id: str
) -> None:
    published: list[dict[str, Any]] = []

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        published.append(dict(headers or {}))

    before_task_publish.connect(record)
    try:
        run_in_tenant(write_then_child, tenant_celery_tenant_id, "parent")
    finally:
        before_task_publish.disconnect(record)
    assert [(h["task"], h["tenant_id"]) for h in published] == [
        (write_note.name, tenant_celery_tenant_id)
    ]
    assert run_in_tenant(count_notes, tenant_celery_tenant_id) == 1  # the child did not run

    with eager_tasks(tasks_app) as app:
        assert app is tasks_app
        run_in_tenant(write_then_child, tenant_celery_tenant_id, "again")
    assert run_in_tenant(count_notes, tenant_celery_tenant_id) == 3
    assert tasks_app.conf.task_always_eager is False
    assert tasks_app.conf.task_eager_propagates is False


def test_run_in_tenant_raises_the_tasks_error(tenant_celery_tenant_id: str) -> None:
    with pytest.raises(LookupError, match=r"^nothing here$"):
        run_in_tenant(fail, tenant_celery_tenant_id, "nothing here")
    assert current_tenant() is None


def test_run_in_tenant_refuses_before_running(tenant_celery_tenant_ids: tuple[str, str]) -> None:
    a, b = tenant_celery_tenant_ids
    assert run_in_tenant(seen, a) == [a, a]
    with pytest.raises(TenantConflict):
        run_in_tenant(seen, a, tenant_id=b)
    with pytest.raises(InvalidTenantId):
        run_in_tenant(seen, "not a tenant")
    with tenant_context(b):
        assert run_in_tenant(seen, a) == [a, a]
        assert current_tenant() == b


def test_run_in_tenant_retries(tenant_celery_tenant_id: str) -> None:
    assert run_in_tenant(flaky, tenant_celery_tenant_id, 2) == [2, tenant_celery_tenant_id]
    with pytest.raises(MaxRetriesExceededError, match=r"^Can't retry .*flaky"):
        run_in_tenant(flaky, tenant_celery_tenant_id, 5)


# --- the plugin in a host's own pytest session ---------------------------------

HOST_TASKS = """
    from celery import Celery

    from tenant_celery import current_tenant, tenant_task

    app = Celery("host", broker="memory://")


    @tenant_task(app=app)
    def whoami():
        return current_tenant()


    @tenant_task(app=app)
    def parent():
        return whoami.delay().get()
"""

HOST_TESTS = """
    import sys

    import pytest

    from host_tasks import app, parent, whoami
    from tenant_celery import current_tenant
    from tenant_celery.testing import run_in_tenant


    @pytest.fixture
    def tenant_celery_app():
        return app


    def test_fresh_ids(tenant_celery_tenant_id, tenant_celery_tenant_ids):
        a, b = tenant_celery_tenant_ids
        assert len({tenant_celery_tenant_id, a, b}) == 3


    def test_a_factory_to_override(tenant_celery_make_tenant_id):
        assert tenant_celery_make_tenant_id() != tenant_celery_make_tenant_id()


    def test_run_in_tenant(tenant_celery_tenant_id):
        assert run_in_tenant(whoami, tenant_celery_tenant_id) == tenant_celery_tenant_id
        assert current_tenant() is None


    def test_eager_children(tenant_celery_eager, tenant_celery_tenant_id):
        assert tenant_celery_eager is app
        assert run_in_tenant(parent, tenant_celery_tenant_id) == tenant_celery_tenant_id


    def test_eager_is_restored():
        assert app.conf.task_always_eager is False


    def test_celery_plugin_not_needed():
        assert "celery.contrib.pytest" not in sys.modules
"""

NO_APP_TEST = """
    def test_needs_the_app(tenant_celery_eager):
        pass
"""


@pytest.fixture
def host(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A fresh host project: nothing but the installed package's entry point loads the plugin."""
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PYTEST_PLUGINS", raising=False)
    return pytester


def test_the_plugin_loads_from_its_entry_point(host: pytest.Pytester) -> None:
    host.makepyfile(
        host_tasks=textwrap.dedent(HOST_TASKS),
        test_host=textwrap.dedent(HOST_TESTS),
        test_no_app=textwrap.dedent(NO_APP_TEST),
    )
    result = host.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=6, errors=1)
    result.stdout.re_match_lines([r"plugins:.*\btenant-celery-"])
    result.stdout.fnmatch_lines(
        [
            "*the tenant_celery_app fixture has no default: define a fixture named "
            "tenant_celery_app in your conftest.py that returns your Celery app*"
        ]
    )


def test_the_plugin_can_be_turned_off(host: pytest.Pytester) -> None:
    host.makepyfile(test_ids="def test_id(tenant_celery_tenant_id):\n    pass\n")
    result = host.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:tenant_celery")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'tenant_celery_tenant_id' not found*"])


def test_the_howto_example_passes_as_written(
    host: pytest.Pytester, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/testing, the host project docs/howto/testing.md shows, run as a host runs it."""
    for source in sorted(EXAMPLE.glob("*.py")):
        shutil.copy(source, host.path / source.name)
    monkeypatch.setenv("ORDERS_DATABASE_URL", render(database.app_url))
    monkeypatch.setenv("ORDERS_OWNER_DATABASE_URL", render(database.url))
    result = host.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", "-v")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(
        [
            "*test_orders_isolation.py::test_each_tenant_sees_only_its_own_orders PASSED*",
            "*test_orders_worker.py::test_the_worker_runs_each_task_in_its_tenant PASSED*",
        ],
        consecutive=False,
    )
    with database.admin_engine().connect() as conn:  # the session dropped its table
        assert conn.execute(text("SELECT to_regclass('orders')")).scalar() is None
