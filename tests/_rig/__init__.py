"""Private test rig: PostgreSQL, Redis, RabbitMQ and real Celery workers.

The fixtures live in ``tests/conftest.py``; the machinery they use lives in
the submodules here:

* :mod:`tests._rig.env` -- environment variable names and the skip-or-fail rule;
* :mod:`tests._rig.postgres` -- the PostgreSQL server, template and per-test databases;
* :mod:`tests._rig.services` -- Redis and RabbitMQ probes;
* :mod:`tests._rig.appconf` -- the configuration convention test Celery apps follow
  (imported by worker processes, so it stays free of pytest);
* :mod:`tests._rig.worker` -- starting, watching and stopping ``celery worker`` processes.

This package ``__init__`` imports nothing so that a worker process importing
:mod:`tests._rig.appconf` does not pull in pytest.
"""
