"""Celery's database result backend: its own engine per call against one pooled engine.

In a process that has not forked -- a solo or threads worker, the main process
of a prefork worker, every client calling ``AsyncResult.get()`` -- Celery's
:class:`~celery.backends.database.DatabaseBackend` creates an engine with
``NullPool`` for each call, so each stored or read result opens a database
connection of its own.  :class:`tenant_celery.results.PooledDatabaseBackend`
keeps one pooled engine per process.

Both backends run in this process, against the scratch database as the app
role (the bundled migration's tables), with Celery's default engine options.
One operation is ``store_result`` of a new task id followed by
``get_task_meta`` of it, as a worker and then a client do.  Runs alternate
between the two backends; each run counts the connections its engine opened
(a ``connect`` listener installed through ``database_engine_callback``).
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tenant_celery.results import dispose_engines

from ._common import BenchContext, Section, median, rate, ratio, stopwatch

VARIANTS = {
    "NullPool (Celery's DatabaseBackend)": "database",
    "pooled (tenant_celery.results)": "tenant_celery.results:PooledDatabaseBackend",
}


def _app(ctx: BenchContext, backend: str, connects: list[int]) -> Celery:
    def count_connects(engine: Engine) -> None:
        event.listen(engine, "connect", lambda *_: connects.append(1))

    app = Celery(f"tcbench-results-{ctx.run_id}", set_as_current=False)
    app.conf.update(
        result_backend=backend,
        database_url=ctx.app_url.render_as_string(hide_password=False),
        database_engine_callback=count_connects,
        result_serializer="json",
        accept_content=["json"],
    )
    return app


def _operations(app: Celery, count: int) -> None:
    backend = app.backend
    for n in range(count):
        task_id = str(uuid.uuid4())
        backend.store_result(task_id, {"n": n}, "SUCCESS")
        meta = backend.get_task_meta(task_id)
        if meta["status"] != "SUCCESS" or meta["result"] != {"n": n}:
            raise RuntimeError(f"result backend returned {meta!r} for a stored result")


def run(ctx: BenchContext) -> Section:
    """Measure both backends and return the section (key ``results``)."""
    count = ctx.pick(smoke=40, default=300)
    runs = ctx.pick(smoke=2, default=3)
    warm = ctx.pick(smoke=5, default=20)
    connects: dict[str, list[int]] = {label: [] for label in VARIANTS}
    apps = {label: _app(ctx, backend, connects[label]) for label, backend in VARIANTS.items()}
    per_second: dict[str, list[float]] = {label: [] for label in VARIANTS}
    connects_per_run: dict[str, list[int]] = {label: [] for label in VARIANTS}
    try:
        for app in apps.values():
            _operations(app, warm)
        for n in range(runs):
            for label, app in apps.items():
                before = len(connects[label])
                with stopwatch() as elapsed:
                    _operations(app, count)
                per_second[label].append(rate(count, elapsed()))
                connects_per_run[label].append(len(connects[label]) - before)
            ctx.say(
                f"results run {n + 1}/{runs}: "
                + ", ".join(f"{label} {per_second[label][-1]}/s" for label in VARIANTS)
            )
    finally:
        for app in apps.values():
            app.close()
        dispose_engines()
    null, pooled = VARIANTS
    rows: list[list[Any]] = []
    for label in VARIANTS:
        rows.append(
            [
                label,
                median(per_second[label]),
                round(median([float(c) for c in connects_per_run[label]]) / count, 3),
                ratio(median(per_second[label]), median(per_second[null])),
            ]
        )
    speedup = ratio(median(per_second[pooled]), median(per_second[null]))
    table = ctx.report(
        "Database result backend: store + read one result, in a process that has not forked",
        ["backend", "operations/s", "connections/operation", "ratio to NullPool"],
        rows,
        [
            f"{runs} runs of {count:,} operations per backend, alternating; median per second",
            "one operation = store_result of a new task id, then get_task_meta of it, "
            "as the app role, Celery's default database_engine_options",
            f"pooled is {speedup}x NullPool",
        ],
    )
    return Section(
        key="results",
        title="Database result backend: NullPool against pooled",
        tables=[table],
        data={
            "operations_per_run": count,
            "runs": runs,
            "operations_per_second": per_second,
            "connections_per_run": connects_per_run,
            "ratio_pooled_to_nullpool": speedup,
        },
    )
