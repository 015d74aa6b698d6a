"""Celery settings of every process of the orders app, producers and workers alike:
tenant headers signed and verified (docs/howto/signing.md)."""

import os

broker_url = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
result_backend = os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/1")
task_serializer = "json"
accept_content = ["json"]

# Keys for signed tenant headers, newest first: the first signs, every one verifies.
# Read them from wherever your secrets live; here, a comma-separated variable.
tenant_celery_header_signing_keys = [
    key.strip() for key in os.environ["ORDERS_TENANT_HEADER_KEYS"].split(",")
]
