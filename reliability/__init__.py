"""tenant-celery's reliability suite: ``python -m reliability [--size smoke|default|full]``.

It proves the package's promises with figures, against real services, and
exits non-zero when one is broken:

``load`` (:mod:`reliability.load`)
    isolation under load: at least 20 tenants and 20,000 tasks (reads,
    writes, child tasks, chains, retries) through real workers on the
    prefork, threads and solo pools, over Redis and the PostgreSQL broker;
    every task records the tenant it ran as and the tenants whose rows it
    could see, through a thread-local ``scoped_session`` that some read-only
    tasks leave in a transaction.  Cross-tenant observations, lost writes,
    tasks unaccounted for and open transactions not rolled back must all be 0;
``leaks`` (:mod:`reliability.leaks`)
    after the load, every pooled connection of every worker process reads
    the tenant setting as empty between transactions;
``faults`` (:mod:`reliability.faults`)
    a killed database connection, a killed worker, a restarted Redis and an
    unreachable database are survived, each task completing in its tenant;
``hostile`` (:mod:`reliability.hostile`, :mod:`reliability.routes`)
    generated hostile tenant ids and headers are refused: a clear error,
    nothing written, nothing seen; and through a signed and an unsigned real
    worker, no route by which Celery replays part of a message (chain steps,
    callbacks, errbacks, map/starmap items, ``for_each_tenant``, nested
    headers, chords) runs a tenant task body in a tenant it may not.

The runner (:mod:`reliability.runner`) creates a scratch database and roles
with the benchmark suite's helpers (:mod:`benchmarks._scratch`), starts real
``celery worker`` processes with :func:`benchmarks._workers.start_worker`,
prints a summary table and one table per part, and writes
``reliability/results/latest.json`` and ``latest.md`` (the Reliability page
of the docs includes the latter).  A part is written against
:mod:`reliability._common`, whose docstring is the parts' interface.  This
package is not part of the wheel.
"""
