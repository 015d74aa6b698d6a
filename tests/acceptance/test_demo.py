"""``tenant-celery demo`` run as a user runs it: a subprocess, on the rig's server and embedded."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._rig.postgres import PgCluster, render

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.worker

#: Rows (and tasks) each tenant gets: plain calls, a 3-step chain and one fan-out message.
EXPECTED = {"alpha": 2 + 3 + 1, "bravo": 3 + 3 + 1, "charlie": 4 + 3 + 1}
TENANT_ROW = re.compile(
    r"^\s+(?P<name>alpha|bravo|charlie)\s+(?P<id>[0-9a-f-]{36})\s+(?P<written>\d+)"
    r"\s+(?P<visible>\d+)\s+(?P<tasks>\d+)\s*$",
    re.MULTILINE,
)


def demo(
    *args: str, tmp: Path | None = None, runtime: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``python -m tenant_celery.cli demo ARGS`` (with ``TMPDIR=tmp`` and
    ``XDG_RUNTIME_DIR=runtime``); return the process and its seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANT_CELERY_")}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    if runtime is not None:
        env["XDG_RUNTIME_DIR"] = str(runtime)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tenant_celery.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )
    return done, time.monotonic() - started


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment contains ``text`` (Linux)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if text.encode() in cmdline or text.encode() in environ:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command}")
    return found


def assert_nothing_left(done: subprocess.CompletedProcess[str], tmp: Path) -> None:
    """The demo's processes, temporary files and monitor port are gone."""
    assert list(tmp.iterdir()) == [], done.stdout
    if Path("/proc/self/environ").exists():
        assert processes_mentioning(str(tmp)) == [], done.stdout
    monitor = re.search(r"its monitor listens on http://127\.0\.0\.1:(\d+)", done.stdout)
    if monitor is not None:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", int(monitor[1]))) != 0, "the monitor answers"


def assert_isolated_report(done: subprocess.CompletedProcess[str], seconds: float) -> None:
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out}\n{done.stderr}"
    rows = {m["name"]: m for m in TENANT_ROW.finditer(out)}
    assert set(rows) == set(EXPECTED), out
    assert len({m["id"] for m in rows.values()}) == 3
    for name, expected in EXPECTED.items():
        row = rows[name]
        # Each tenant sees exactly the rows written for it, and ran as many tasks.
        assert int(row["written"]) == expected, out
        assert int(row["visible"]) == expected, out
        assert int(row["tasks"]) == expected, out
    assert "rows visible with no tenant set: 0" in out
    health = re.search(r"^GET /health -> (\d+) (\{.*\})$", out, re.MULTILINE)
    assert health is not None, out
    assert health[1] == "200"
    assert json.loads(health[2]) == {"status": "ok", "broker": "ok", "database": "ok"}
    totals = dict(re.findall(r"^\s+(celery_task_\w+_total)\s+(\d+)$", out, re.MULTILINE))
    total = sum(EXPECTED.values())
    assert totals == {
        "celery_task_started_total": str(total + 1),  # the refused task counts as started
        "celery_task_success_total": str(total),
        "celery_task_failure_total": "0",
        "celery_task_retry_total": "0",
        "celery_task_rejected_total": "1",
    }, out
    assert "refused (TenantContextMissing)" in out
    assert seconds < 60, f"the demo took {seconds:.1f}s"


def test_demo_on_an_existing_server(pg_cluster: PgCluster, tmp_path: Path) -> None:
    done, seconds = demo("--dsn", render(pg_cluster.admin_url), tmp=tmp_path)
    assert_isolated_report(done, seconds)
    assert "using the server at" in done.stdout
    assert "removing the worker, the database and the role\n" in done.stdout
    assert "removed the worker, the database and the role\n" in done.stdout
    assert "embedded" not in done.stdout
    assert_nothing_left(done, tmp_path)
    # Everything it made is gone: its database and its role.
    assert_database_and_role_dropped(done.stdout, pg_cluster)


def assert_database_and_role_dropped(stdout: str, pg_cluster: PgCluster) -> None:
    """The database and the role the demo says it created no longer exist."""
    made = re.search(r"created database (\S+) and role (\S+) ", stdout)
    assert made is not None, stdout
    with pg_cluster.connect() as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname = %s"
            " UNION ALL SELECT rolname FROM pg_roles WHERE rolname = %s",
            (made[1], made[2]),
        ).fetchall()
    assert left == []


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """An empty directory with a short path: the embedded server's Unix socket lives
    under it, and socket paths are limited to about 100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tcd-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_demo_with_no_arguments_starts_an_embedded_server(short_tmp: Path, tmp_path: Path) -> None:
    # pgserver keeps a lock file, shared by all its servers, in the user's runtime
    # directory (platformdirs falls back to $TMPDIR/runtime-<uid> without one): not
    # the demo's to remove, so it goes elsewhere here.
    done, seconds = demo(tmp=short_tmp, runtime=tmp_path)
    assert_isolated_report(done, seconds)
    assert "starting an embedded PostgreSQL" in done.stdout
    assert "removed the worker, the database, the role and the embedded server\n" in done.stdout
    assert_nothing_left(done, short_tmp)


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("postgresql://nobody:s3cret-pw@127.0.0.1:1/postgres", "cannot connect to "),
        ("mysql://nobody:s3cret-pw@localhost/x", "--dsn: expected a PostgreSQL URL"),
        ("not a url s3cret-pw", "--dsn: cannot parse the database URL"),
    ],
)
def test_a_dsn_that_cannot_be_used_exits_2(dsn: str, message: str, tmp_path: Path) -> None:
    done, _ = demo("--dsn", dsn, tmp=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"tenant-celery demo: error: {message}")
    assert "s3cret-pw" not in done.stdout + done.stderr
    # It started nothing, so it says it removed nothing.
    assert "remov" not in done.stdout
    assert_nothing_left(done, tmp_path)


def test_a_database_that_does_not_exist_exits_2(pg_cluster: PgCluster, tmp_path: Path) -> None:
    missing = f"tc_missing_{uuid.uuid4().hex[:8]}"
    done, _ = demo("--dsn", render(pg_cluster.admin_url.set(database=missing)), tmp=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("tenant-celery demo: error: cannot connect to ")
    assert f'database "{missing}" does not exist' in done.stderr
    assert done.stderr.count("\n") == 1
    assert "remov" not in done.stdout


def test_unknown_arguments_exit_2_with_the_demos_usage() -> None:
    done, _ = demo("--frobnicate")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("usage: tenant-celery demo ")
    assert done.stderr.splitlines()[-1] == (
        "tenant-celery demo: error: unrecognized arguments: --frobnicate"
    )


def test_interrupted_demo_exits_130_and_removes_what_it_started(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANT_CELERY_")}
    env["TMPDIR"] = str(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "tenant_celery.cli", "demo", "--dsn", render(pg_cluster.admin_url)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    lines = []
    for line in process.stdout:  # interrupt once the worker runs
        lines.append(line)
        if "worker ready" in line:
            process.send_signal(signal.SIGINT)
            break
    rest, err = process.communicate(timeout=60)
    out = "".join(lines) + rest
    assert process.returncode == 130, out + err
    assert err == "tenant-celery demo: interrupted\n"
    assert "removed the worker, the database and the role\n" in out
    assert_database_and_role_dropped(out, pg_cluster)
    assert_nothing_left(subprocess.CompletedProcess([], 130, out, err), tmp_path)
