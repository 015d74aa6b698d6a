"""The storefront's web front: orders come in over HTTP, workers run them per tenant.

A WSGI application built on the standard library only.  Every request names
its tenant in the ``X-Tenant-ID`` header, and the task is published inside
that tenant, so the worker runs it there: nothing else carries the tenant.

``POST /orders``
    Body ``{"customer": "ada", "total_cents": 1250}``.  Enqueues
    ``storefront.place_order`` and answers ``202`` with the task's id and the
    URL to poll.
``GET /tasks/<task id>``
    The task's state, and its result once it succeeded for this tenant.

A missing or malformed tenant, or a bad body, gets ``400`` with a message
saying why, and nothing is enqueued.  Every answer carries the request's
``X-Correlation-ID``, which the tasks it caused log too.

Run it beside a storefront worker, with the same ``STOREFRONT_DATABASE_URL``::

    PYTHONPATH=../host_project python storefront_web.py --port 8000
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from kombu.exceptions import OperationalError
from storefront.tasks import place_order

from tenant_celery import InvalidTenantId, parse_tenant_id, tenant_context
from tenant_celery.correlation import correlation_context

log = logging.getLogger("storefront_web")

TENANT_HEADER = "X-Tenant-ID"
MAX_BODY = 10_000
_TASK_PATH = re.compile(r"^/tasks/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")

StartResponse = Callable[..., Any]


class HTTPError(Exception):
    """An answer other than success: a status line and a message for the client."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def tenant_of(environ: dict[str, Any]) -> str:
    """The request's tenant, validated.

    The header is trusted to keep the example short.  In production take the
    tenant from what authenticated the request (a session, a token), or from
    a gateway that authenticates the caller and sets this header itself.
    """
    raw = environ.get("HTTP_X_TENANT_ID")
    if raw is None or not raw.strip():
        raise HTTPError("400 Bad Request", f"missing {TENANT_HEADER} header: name the tenant")
    try:
        return parse_tenant_id(raw.strip())
    except InvalidTenantId:
        raise HTTPError(
            "400 Bad Request", f"malformed {TENANT_HEADER} header: expected a UUID"
        ) from None


def order_of(environ: dict[str, Any]) -> tuple[str, int]:
    """``(customer, total_cents)`` from the request's JSON body."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HTTPError("400 Bad Request", "malformed Content-Length header") from None
    if length > MAX_BODY:
        raise HTTPError("413 Content Too Large", f"the body may hold {MAX_BODY} bytes at most")
    try:
        body = json.loads(environ["wsgi.input"].read(length) or b"null")
    except ValueError:
        raise HTTPError("400 Bad Request", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPError("400 Bad Request", 'expected {"customer": ..., "total_cents": ...}')
    customer, cents = body.get("customer"), body.get("total_cents")
    if not isinstance(customer, str) or not 0 < len(customer.strip()) <= 200:
        raise HTTPError("400 Bad Request", "customer must be a name of 1 to 200 characters")
    if isinstance(cents, bool) or not isinstance(cents, int) or not 0 <= cents < 10**9:
        raise HTTPError("400 Bad Request", "total_cents must be a whole number of cents, >= 0")
    return customer.strip(), cents


def post_order(environ: dict[str, Any]) -> tuple[str, dict[str, Any], list[tuple[str, str]]]:
    tenant = tenant_of(environ)
    customer, cents = order_of(environ)
    try:
        with tenant_context(tenant):
            result = place_order.delay(customer, cents)
            log.info("order for %s enqueued as task %s", customer, result.id)
    except OperationalError:
        log.exception("could not enqueue an order")
        raise HTTPError("503 Service Unavailable", "the broker is unavailable; retry") from None
    status_url = f"/tasks/{result.id}"
    body = {"task_id": result.id, "tenant_id": tenant, "status_url": status_url}
    return "202 Accepted", body, [("Location", status_url)]


def get_task(environ: dict[str, Any], task_id: str) -> tuple[str, dict[str, Any]]:
    tenant = tenant_of(environ)
    result = place_order.AsyncResult(task_id)
    state = result.state
    if state != "SUCCESS":
        # Unknown ids read PENDING as well: this says nothing about other tenants.
        return "200 OK", {"task_id": task_id, "state": state}
    value = result.result
    if not isinstance(value, dict) or value.get("tenant_id") != tenant:
        raise HTTPError("404 Not Found", "no such task for this tenant")
    return "200 OK", {"task_id": task_id, "state": state, "result": value}


def route(environ: dict[str, Any]) -> tuple[str, dict[str, Any], list[tuple[str, str]]]:
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/"
    if path == "/orders":
        if method != "POST":
            raise HTTPError("405 Method Not Allowed", "use POST /orders")
        return post_order(environ)
    task = _TASK_PATH.match(path)
    if task is not None:
        if method != "GET":
            raise HTTPError("405 Method Not Allowed", "use GET /tasks/<task id>")
        status, body = get_task(environ, task[1])
        return status, body, []
    raise HTTPError("404 Not Found", f"no route for {method} {path}")


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point: one tenant, one correlation id per request."""
    with correlation_context(environ.get("HTTP_X_CORRELATION_ID")) as correlation_id:
        try:
            status, body, headers = route(environ)
        except HTTPError as error:
            status, body, headers = error.status, {"error": error.message}, []
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO")
            log.info("refused %s %s: %s", method, path, error.message)
    payload = (json.dumps(body) + "\n").encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("X-Correlation-ID", correlation_id),
            *headers,
        ],
    )
    return [payload]


class _LoggingHandler(WSGIRequestHandler):
    """Access lines through logging (JSON, like everything else), not raw standard error."""

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the storefront's web front.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    args = parser.parse_args()
    with make_server(args.host, args.port, application, handler_class=_LoggingHandler) as server:
        log.info("storefront web listening on http://%s:%d", args.host, server.server_port)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log.info("storefront web stopped")


if __name__ == "__main__":
    main()
