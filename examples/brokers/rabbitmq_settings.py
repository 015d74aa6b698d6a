"""Celery settings for RabbitMQ as broker, with results in PostgreSQL."""

broker_url = "amqp://guest:guest@localhost:5672//"
result_backend = "db+postgresql+psycopg://app_user:secret@localhost/shop"

# A worker reserves this many messages per process (Celery's default is 4). One
# suits long tasks: no message waits behind a busy process while another is
# idle. Tasks with a countdown or ETA wait inside the worker, unacknowledged,
# and do not count against it.
worker_prefetch_multiplier = 1
