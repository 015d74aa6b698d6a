"""``tenant-celery tenants`` run as an operator runs it: a subprocess against a
database migrated for the package's transport, connecting as ``app_user``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from kombu import Connection, Exchange, Producer, Queue

from tests._rig.postgres import Database
from tests._rig.worker import transport_url

ROOT = Path(__file__).resolve().parents[2]


def tenants(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
    return subprocess.run(
        [sys.executable, "-m", "tenant_celery.cli", "tenants", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**base, **(env or {})},
        check=False,
    )


def publish(url: str, queue: str, tenant: str, count: int) -> None:
    with Connection(url) as conn:
        producer = Producer(conn.default_channel)
        target = Queue(queue, Exchange(queue, "direct"), queue)
        for _ in range(count):
            producer.publish(
                {}, exchange=target.exchange, routing_key=queue, declare=[target],
                headers={"tenant_id": tenant},
            )  # fmt: skip


def test_inspect_pause_resume_limit_and_purge(database: Database) -> None:
    url = transport_url(database, "app")
    queue, tenant, other = "tc.cli.work", str(uuid.uuid4()), str(uuid.uuid4())
    publish(url, queue, tenant, 3)
    publish(url, queue, other, 1)

    done = tenants("inspect", "--broker", url, "--json")
    assert done.returncode == 0, done.stderr
    listed = {(e["queue"], e["tenant"]): e for e in json.loads(done.stdout)}
    assert listed[(queue, tenant)]["ready"] == 3
    assert listed[(queue, other)]["ready"] == 1

    done = tenants("pause", tenant, "--broker", url)
    assert (done.returncode, done.stdout) == (0, f"paused {tenant} on every queue\n")
    done = tenants("resume", tenant, "--queue", queue, "--broker", url)
    assert done.stdout == (f"resumed {tenant} on queue {queue}; still paused on every queue\n"), (
        done.stderr
    )
    done = tenants("rate-limit", tenant, "--queue", queue, "--rate", "2.5", "--broker", url)
    assert done.stdout == f"limited {tenant} on queue {queue} to 2.5/s (burst 2.5)\n"

    done = tenants("inspect", "--tenant", tenant, "--broker", url)
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "queue", "tenant", "ready", "in", "flight", "delayed", "oldest", "paused", "rate",
    ]  # fmt: skip
    assert lines[1].split()[:7] == ["*", tenant, "0", "0", "0", "-", "yes"]
    assert lines[2].split()[:4] == [queue, tenant, "3", "0"]
    assert lines[2].endswith("2.5/s (burst 2.5)")

    refused = tenants("purge", tenant, "--broker", url)
    assert refused.returncode == 2
    assert "pass --yes" in refused.stderr
    done = tenants("purge", tenant, "--broker", url, "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ready"] == 3

    done = tenants("inspect", "--queue", queue, "--broker", url, "--json")
    found = sorted((e["tenant"], e["ready"], e["rate"]) for e in json.loads(done.stdout))
    assert found == sorted([(tenant, 0, 2.5), (other, 1, None)])  # its limit is still listed


def test_the_app_module_names_the_broker_and_the_tenant_format(
    database: Database, tmp_path: Path
) -> None:
    url = transport_url(database, "app")
    (tmp_path / "ops_app.py").write_text(
        "from celery import Celery\n"
        "from tenant_celery import set_tenant_id_parser, slug_tenant_id\n"
        "set_tenant_id_parser(slug_tenant_id)\n"
        f"app = Celery('ops', broker={url!r})\n"
    )
    done = tenants("pause", "acme-corp", "-A", "ops_app:app", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "paused acme-corp on every queue\n"), done.stderr
    # Without the app, the default format (uuid) refuses the slug.
    refused = tenants("pause", "acme-corp", "--broker", url)
    assert refused.returncode == 2
    assert "tenant" in refused.stderr


def test_refusals_are_one_line_with_exit_code_2(database: Database) -> None:
    for args in (
        ("inspect", "--broker", "redis://127.0.0.1:6379/0"),
        ("inspect",),  # no broker at all
        ("pause", "not a tenant", "--broker", transport_url(database, "app")),
        ("rate-limit", str(uuid.uuid4()), "--queue", "q", "--rate", "-1", "--broker", "tcpg+postgresql://x@127.0.0.1/x"),
    ):  # fmt: skip
        done = tenants(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.startswith("tenant-celery tenants: error: "), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
