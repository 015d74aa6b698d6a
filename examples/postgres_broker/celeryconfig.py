"""Celery settings for PostgreSQL alone: tenant-celery's transport as the broker and
the pooled database backend for results (docs/howto/postgres-broker.md)."""

import os

# The workers' role, with psycopg 3. The broker and the results share the database.
DATABASE_URL = os.environ.get(
    "BILLING_DATABASE_URL", "postgresql+psycopg://app_user:secret@localhost:5432/shop"
)

broker_url = "tcpg+" + DATABASE_URL
broker_transport_options = {
    "visibility_timeout": 300,  # a claim lasts 5 minutes; the worker renews it meanwhile
    "polling_interval": 2.0,  # NOTIFY wakes an idle worker; a poll is the fallback
    "tenant_inflight_limit": 8,  # no tenant holds more than 8 claimed messages at once
}
# Acknowledge, and so delete, a message once its task has run, not before: a worker
# that dies mid-task leaves it to be delivered again when its lease runs out.
task_acks_late = True

result_backend = "tenant_celery.results:PooledDatabaseBackend"
database_url = DATABASE_URL
database_engine_options = {"pool_size": 2, "pool_pre_ping": True, "pool_recycle": 3600}

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
