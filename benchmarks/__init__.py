"""tenant-celery's benchmark suite: ``python -m benchmarks [--size smoke|default]``.

Each benchmark measures against a baseline taken in the same run and reports
ratios, which hold across machines where absolute figures do not:

``p1`` (:mod:`benchmarks.tenancy_overhead`)
    a plain task against a tenant task with the same database body;
``p2`` (:mod:`benchmarks.rls_cost`)
    what row-level security costs the database;
``p3`` (:mod:`benchmarks.throughput`)
    tenant tasks per second through each broker and result backend;
``p3-events`` (:mod:`benchmarks.events_overhead`)
    the same with worker events (``-E``) on, with and without a listener,
    against off, on the package's transport and on Redis;
``p4`` (:mod:`benchmarks.observability`)
    metrics and JSON logs on, against off.

The runner (:mod:`benchmarks.runner`) creates a scratch database and roles,
starts and stops real ``celery worker`` processes, prints a table per
benchmark and writes ``benchmarks/results/latest.json`` and ``latest.md``
(the Performance page of the docs includes the latter).  A benchmark module
is written against :mod:`benchmarks._common`.  This package is not part of
the wheel.
"""
