"""Celery settings for PostgreSQL alone: kombu's SQLAlchemy transport as broker
and Celery's database result backend, on the tables the bundled migration
creates (``tenant_celery.migrations.upgrade(url, grant_to=["app_user"])``)."""

broker_url = "sqla+postgresql+psycopg://app_user:secret@localhost/shop"
result_backend = "db+postgresql+psycopg://app_user:secret@localhost/shop"

# This transport passes its options to SQLAlchemy's create_engine(): only
# engine arguments belong here (no polling_interval, no visibility_timeout).
broker_transport_options = {"pool_pre_ping": True, "pool_recycle": 1800}
