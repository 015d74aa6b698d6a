"""Generated hostile tenant ids, headers and setting names, each tried against real
PostgreSQL as ``app_user`` (see :mod:`reliability.hostile` for what a case checks).

Every case must be refused with a clear error (a TenantCeleryError of the
expected kind, one printable line, the value not echoed), write nothing
(no row, no message, no task body) and see nothing (no row read after the
refusal, no SQL but the probe's own, the value in no statement's text).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from reliability.hostile import (
    HostileProbe,
    Outcome,
    hostile_header_names,
    hostile_header_values,
    hostile_setting_names,
    hostile_tenant_ids,
)

from tenant_celery import migrations
from tests._rig.postgres import APP_ROLE, Database


def assert_refused(outcome: Outcome) -> None:
    assert outcome.ok, f"{outcome.category} {outcome.shown(200)}: {'; '.join(outcome.problems)}"


@given(hostile_tenant_ids())
def test_tenant_context(probe: HostileProbe, value: Any) -> None:
    assert_refused(probe.check_tenant_context(value))


@pytest.mark.parametrize("parser", ["uuid", "integer", "slug"])
def test_each_builtin_parser(probe: HostileProbe, parser: str) -> None:
    @given(hostile_tenant_ids(parser))
    def check(value: Any) -> None:
        assert_refused(probe.check_parser(parser, value))

    check()


@given(hostile_tenant_ids())
def test_set_tenant_guc(probe: HostileProbe, value: Any) -> None:
    assert_refused(probe.check_set_tenant_guc(value))


@given(hostile_tenant_ids())
def test_tenant_session(probe: HostileProbe, value: Any) -> None:
    assert_refused(probe.check_tenant_session(value))


@given(hostile_tenant_ids())
def test_task_tenant_id_argument(probe: HostileProbe, value: Any) -> None:
    assert_refused(probe.check_task_argument(value))


@given(hostile_header_values())
def test_task_tenant_header(probe: HostileProbe, value: Any) -> None:
    assert_refused(probe.check_task_header(value))


@given(hostile_setting_names())
def test_setting_names(probe: HostileProbe, value: Any) -> None:
    assert_refused(probe.check_setting_name(value))


@given(hostile_header_names())
def test_header_names(probe: HostileProbe, value: Any) -> None:
    assert_refused(probe.check_header_name(value))


def test_the_probe_catches_an_accepted_value(probe: HostileProbe) -> None:
    # The checks can fail: a valid id is "accepted", and the probe says so.
    outcome = probe.check_tenant_context("1b6f3a52-7c0e-4e54-9d0f-5a1c2b3d4e01")
    assert not outcome.ok
    assert outcome.problems == ["accepted"]
    outcome = probe.check_setting_name("app.other_setting")
    assert not outcome.ok
    assert "accepted" in outcome.problems


@pytest.mark.worker
def test_the_reliability_part(
    database: Database, tmp_path: Path, redis_url: str, amqp_url: str
) -> None:
    # ``python -m reliability --only hostile`` at the smoke size, on a fresh database;
    # its replay routes run real workers on Redis and on the package's transport.
    from reliability._common import ReliabilityContext  # noqa: PLC0415
    from reliability.hostile import CATEGORIES, run  # noqa: PLC0415
    from reliability.runner import _redis_base  # noqa: PLC0415

    # The replay routes' workers on the package's transport find its tables where the
    # reliability suite's scratch database has them: in ``public``.
    migrations.upgrade(database.url, grant_to=[APP_ROLE])
    out = io.StringIO()
    ctx = ReliabilityContext(
        size="smoke",
        server_url=database.url,
        admin_url=database.url,
        app_url=database.app_url,
        app_role=APP_ROLE,
        plain_url=database.url,
        redis_url=_redis_base(redis_url),
        amqp_url=amqp_url,
        run_id="pytest",
        workdir=tmp_path,
        out=out,
    )
    try:
        section = run(ctx)
    finally:
        ctx.close()
    assert section.passed, section.all_violations()
    # 30 values per category, and the replay routes' attempts on top.
    assert section.tally.hostile_tried == section.tally.hostile_refused > 30 * len(CATEGORIES)
    assert [row[0] for row in section.tables[0].rows] == [*CATEGORIES, "total"]
    assert "Hostile input" in out.getvalue()
