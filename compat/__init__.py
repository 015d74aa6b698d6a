"""Other projects' test suites, run against tenant-celery.

``nox -s canvas`` (:mod:`compat.canvas`) runs Celery's own canvas integration
suite twice on one machine, plain and with every task a tenant task on a
worker with signed tenant headers, and fails when any test's outcome differs
between the two.  :mod:`compat.canvas_tenant` is the pytest plugin that makes
the second run; :mod:`compat.junit` reads and compares the outcomes.  This
package is not part of the wheel.
"""
