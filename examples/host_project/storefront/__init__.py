"""The storefront: a small host project of tenant-celery.

``storefront.celery`` is the Celery app, ``storefront.tasks`` its tenant
tasks, ``storefront.models`` the tenant tables and ``storefront.db`` the
sessions the tasks use.  ``python -m storefront`` migrates the Celery tables
and places orders from the command line.
"""
