"""P1's variants (``benchmarks/tenancy_overhead.py``): which engine each one's task runs
on, and how the layers are read off their ratios, without a database."""

from __future__ import annotations

from typing import Any

import pytest
from benchmarks import bench_app
from benchmarks import tenancy_overhead as p1

from tenant_celery import tenant_context

APP_URL = "postgresql+psycopg://app:secret@db.invalid/bench"
PLAIN_URL = "postgresql+psycopg://plain:secret@db.invalid/bench"
TENANT = "5f0c7c8e-2a8b-4f55-8f6e-0d6d1b3b9a10"


def test_each_variant_has_an_engine_of_its_own_for_its_layer() -> None:
    engines = bench_app.Engines(app_url=APP_URL, plain_url=PLAIN_URL)
    found = {name: (engine.url, engine.tenant_guc) for name, engine in engines.by_name.items()}
    assert found == {
        "plain": (PLAIN_URL, False),
        # the plain task's kind of engine: what is left is the task's own work
        "task_only": (PLAIN_URL, False),
        # bound, as a role the policy does not filter: the binding, not the policy
        "no_policy": (PLAIN_URL, True),
        "tenant": (APP_URL, True),
        "own_statement": (APP_URL, False),
    }
    assert len({id(engine) for engine in engines.by_name.values()}) == len(found)


def test_each_tenant_variant_runs_its_body_on_its_own_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engines = bench_app.Engines(app_url=APP_URL, plain_url=PLAIN_URL)
    ran: list[tuple[Any, str, bool]] = []

    def body(sessions: Any, tenant: str, own_statement: bool = False) -> None:
        ran.append((sessions, tenant, own_statement))

    monkeypatch.setattr(bench_app, "p1_body", body)
    app = bench_app.make_app("memory://", None, "tcbench.unit", engines)
    try:
        assert set(p1._TENANT_TASKS) == {"tenant", p1.OWN_STATEMENT, p1.TASK_ONLY, p1.NO_POLICY}
        for variant, name in p1._TENANT_TASKS.items():
            with tenant_context(TENANT):
                app.tasks[name].apply(throw=True).get()
            sessions, tenant, own_statement = ran.pop()
            assert sessions is engines.by_name[variant].sessions(), variant
            assert tenant == TENANT, variant
            assert own_statement is (variant == p1.OWN_STATEMENT), variant
        app.tasks[bench_app.PLAIN_RW].apply(args=(TENANT,), throw=True).get()
        assert ran.pop()[0] is engines.by_name["plain"].sessions()
    finally:
        engines.dispose()
        app.close()


def test_the_layers_are_the_steps_between_the_ratios() -> None:
    note = p1._layers_note(
        {
            "apply": {"tenant": 0.927, p1.OWN_STATEMENT: 0.845},
            "worker": {p1.TASK_ONLY: 0.976, p1.NO_POLICY: 0.955, "tenant": 0.961},
        }
    )
    steps = note.split("takes off the ratio: ", 1)[1]
    # apply() times no layer variant, so it has no steps
    assert steps == "worker: the task's own work +0.024, the binding +0.021, the policy -0.006"


def test_the_table_lists_the_layers_in_the_order_they_add_up() -> None:
    assert p1._ROW_ORDER[:4] == ("plain", *p1._LAYERS)
    labels = [p1._LABELS[variant] for variant in p1._ROW_ORDER]
    assert labels == [
        "plain",
        "tenant task only",
        "tenant, no policy",
        "tenant",
        "tenant, own statement",
    ]
