"""Celery settings for Redis as broker and result backend."""

broker_url = "redis://localhost:6379/0"
result_backend = "redis://localhost:6379/1"

# Redis hands a message that is not acknowledged within this many seconds to
# another worker. Keep it longer than your longest countdown or ETA and your
# longest task with acks_late, or those run twice.
broker_transport_options = {"visibility_timeout": 6 * 3600}
result_backend_transport_options = {"visibility_timeout": 6 * 3600}
