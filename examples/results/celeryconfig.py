"""Celery settings: results in PostgreSQL over a pooled engine (docs/howto/result-backend.md)."""

import os

broker_url = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")

# Celery's database backend, on one pooled engine per process.
result_backend = "tenant_celery.results:PooledDatabaseBackend"
database_url = os.environ.get(
    "REPORTS_DATABASE_URL", "postgresql+psycopg://app_user:secret@localhost:5432/app"
)
database_engine_options = {
    "pool_size": 4,  # per process: at least the worker's --concurrency under -P threads
    "max_overflow": 4,
    "pool_pre_ping": True,  # Celery's defaults, kept
    "pool_recycle": 3600,
    "connect_args": {"application_name": "reports-results"},
}
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
