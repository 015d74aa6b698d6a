"""Smoke-test Celery app for the test rig: plain tasks, no tenant machinery."""

from __future__ import annotations

import os
import threading
from typing import Any

from celery import Celery, Task

from tests._rig.appconf import apply_test_config

app = apply_test_config(Celery("rig_app"))


@app.task
def add(x: int, y: int) -> int:
    """Return ``x + y``."""
    return x + y


@app.task
def whoami() -> dict[str, int]:
    """Return the executing process and thread (tells pool children from threads)."""
    return {"pid": os.getpid(), "ppid": os.getppid(), "thread": threading.get_ident()}


@app.task(bind=True)
def request_info(self: Task[Any, Any], name: str) -> dict[str, Any]:
    """Report where a custom message header called *name* arrived."""
    headers = self.request.headers
    return {
        "attribute": getattr(self.request, name, None),
        "headers_type": type(headers).__name__,
        "in_headers": (headers or {}).get(name),
        "queue": (self.request.delivery_info or {}).get("routing_key"),
    }


@app.task
def database_user() -> str:
    """Connect as the worker's ``app_user`` URL and return ``current_user``."""
    import sqlalchemy as sa  # noqa: PLC0415

    from tests._rig.appconf import database_url  # noqa: PLC0415

    engine = sa.create_engine(database_url(app_role=True), poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return str(conn.execute(sa.text("SELECT current_user")).scalar_one())
    finally:
        engine.dispose()
