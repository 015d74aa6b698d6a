"""Operate one tenant's work on the package's transport, while workers consume.

The transport (:mod:`tenant_celery.transport`) stores each message's tenant,
so one tenant's work can be acted on without touching the others':

- :func:`inspect`: per queue and tenant, the messages ready, in flight
  (claimed by a worker), delayed (an ETA or countdown a worker holds until
  it is due), and the oldest ready message's age; with each tenant's pause
  and rate limit;
- :func:`pause` and :func:`resume`: workers stop claiming a tenant's
  messages, on one queue or on every queue, from their next claim; nothing
  is deleted or reordered, and messages already claimed run;
- :func:`purge`: delete a tenant's queued messages in one transaction, and
  revoke the delayed ones the workers hold;
- :func:`rate_limit`: at most ``rate`` of a tenant's messages a second are
  claimed from a queue, across every worker, in bursts of at most
  ``burst``.

The pauses and rate limits are rows of the transport's control table
(revision ``tc0005`` of :func:`tenant_celery.migrations.upgrade`), read by
every claim: every worker obeys them, including workers started later.  Each
function takes the Celery app (its ``broker_url`` and the transport's
``schema`` option are used) or the broker URL, and refuses any broker but
the package's transport.  Tenant ids are checked with
:func:`~tenant_celery.context.parse_tenant_id`: the parser the app's module
set, or the default.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import psycopg
from psycopg import sql

from ._pg import identifier, qualified
from ._result_tables import PurgedResults, purge_results
from .context import parse_tenant_id
from .errors import ConfigurationError
from .transport import CONTROL_CHANNEL, CONTROL_TABLE, MESSAGE_TABLE, NOTIFY_CHANNEL, SCHEME

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.engine import URL, Engine

__all__ = [
    "APPLICATION_NAME",
    "Purged",
    "TenantQueue",
    "inspect",
    "pause",
    "purge",
    "rate_limit",
    "resume",
    "states_query",
]

APPLICATION_NAME = "tenant-celery tenants"
"""``application_name`` of the connections these functions open."""

Broker = Union["Celery", str]
"""A Celery app whose broker is the package's transport, or its broker URL."""

_MAX_QUEUE = 1000  # longest queue name taken (kombu sets none; PostgreSQL's text does)

# A task's ETA in its message's headers (Celery's protocol 2), read by the function
# revision tc0005 creates: NULL, not an error, for a header that is no valid time.
_ETA_FUNCTION = "tenant_celery_eta"
# The task id in the message's headers ("root_id" and "parent_id" do not match).
_TASK_ID = r'"id": "([^"\\]{1,200})"'

# A claim makes a message invisible until its lease runs out: ready is visible
# (as claims read it), in flight is claimed, delayed is claimed and held for an ETA.
_DELAYED = "(m.visible_at > now() AND coalesce({eta}(m.payload) > now(), false))"
_IN_FLIGHT = "(m.visible_at > now())"
_LIVE = "(m.expires_at IS NULL OR m.expires_at > now())"

_STATS = (
    "SELECT m.queue, m.tenant,"
    " count(*) FILTER (WHERE NOT " + _IN_FLIGHT + "),"
    " count(*) FILTER (WHERE " + _IN_FLIGHT + " AND NOT d.delayed),"
    " count(*) FILTER (WHERE d.delayed),"
    " extract(epoch FROM now() - min(m.created_at) FILTER (WHERE NOT " + _IN_FLIGHT + "))"
    " FROM {message} AS m CROSS JOIN LATERAL (SELECT " + _DELAYED + " AS delayed) AS d"
    " WHERE " + _LIVE + " AND ({tenant}::text IS NULL OR m.tenant = {tenant})"
    " AND ({queue}::text IS NULL OR m.queue = {queue})"
    " GROUP BY m.queue, m.tenant ORDER BY m.queue, m.tenant"
)
_CONTROLS = (
    "SELECT c.tenant, c.queue, c.paused, c.rate, c.burst FROM {control} AS c"
    " WHERE ({tenant}::text IS NULL OR c.tenant = {tenant})"
    " AND ({queue}::text IS NULL OR c.queue IN ({queue}, ''))"
    " ORDER BY c.tenant, c.queue"
)
# Per queue of `queues` and tenant: ready, in flight, delayed, and whether paused
# there (the worker monitor's gauges); paused tenants come as rows of zeros.
_STATES_BY_QUEUE = (
    "SELECT m.queue, m.tenant,"
    " count(*) FILTER (WHERE NOT " + _IN_FLIGHT + "),"
    " count(*) FILTER (WHERE " + _IN_FLIGHT + " AND NOT d.delayed),"
    " count(*) FILTER (WHERE d.delayed), false"
    " FROM {message} AS m CROSS JOIN LATERAL (SELECT " + _DELAYED + " AS delayed) AS d"
    " WHERE m.queue = ANY(%(queues)s::text[]) AND " + _LIVE + " GROUP BY m.queue, m.tenant"
    " UNION ALL SELECT q.name, c.tenant, 0, 0, 0, true FROM {control} AS c"
    " JOIN unnest(%(queues)s::text[]) AS q(name) ON c.queue IN (q.name, '') WHERE c.paused"
)
# Purge: in-flight messages (claimed, not delayed) are kept unless asked.
_PURGEABLE = (
    "m.tenant = {tenant} AND ({queue}::text IS NULL OR m.queue = {queue})"
    " AND ({in_flight} OR NOT " + _IN_FLIGHT + " OR " + _DELAYED + ")"
)
# Rows a claim holds locked are passed over, never waited for (a claim that waits
# for a row this purge deleted would deadlock with it): the purge goes round again
# until nothing it may delete is left.
_PURGE = (
    "WITH d AS (DELETE FROM {message} AS m WHERE m.id IN (SELECT m.id FROM {message} AS m"
    " WHERE " + _PURGEABLE + " FOR UPDATE SKIP LOCKED)"
    " RETURNING CASE WHEN NOT " + _IN_FLIGHT + " THEN 'ready' WHEN " + _DELAYED + " THEN"
    " 'delayed' ELSE 'in_flight' END AS kind, m.queue, substring(m.payload from {task_id}) AS id)"
    " SELECT kind, queue, id FROM d"
)
_PURGEABLE_LEFT = "SELECT EXISTS (SELECT 1 FROM {message} AS m WHERE " + _PURGEABLE + ")"
_PURGE_ROUNDS = 200  # of at most _PURGE_PAUSE seconds each: claims hold rows for less
_PURGE_PAUSE = 0.01
_LEFT = (
    "SELECT substring(m.payload from {task_id}) FROM {message} AS m WHERE m.tenant = {tenant}"
    " AND ({queue}::text IS NULL OR m.queue = {queue}) AND "
    + _IN_FLIGHT
    + " AND NOT "
    + _DELAYED
    + " ORDER BY m.id"
)
# The queues that hold the tenant's messages: told at once (NOTIFY at commit) that
# they may have messages to claim again, not at the workers' next poll.
_WAKE = (
    "SELECT pg_notify({channel}, q.queue) FROM (SELECT DISTINCT m.queue FROM {message} AS m"
    " WHERE m.tenant = {tenant} AND ({queue}::text IS NULL OR m.queue = {queue})) AS q"
)
_PAUSE = (
    "INSERT INTO {control} AS c (tenant, queue, paused) VALUES ({tenant}, {queue}, true)"
    " ON CONFLICT (tenant, queue) DO UPDATE SET paused = true, changed_at = now()"
)
_RESUME = (
    "UPDATE {control} AS c SET paused = false, changed_at = now()"
    " WHERE c.tenant = {tenant} AND ({queue}::text IS NULL OR c.queue = {queue}) AND c.paused"
)
_STILL_PAUSED = (
    "SELECT c.queue FROM {control} AS c WHERE c.tenant = {tenant} AND c.paused ORDER BY c.queue"
)
_LIMIT = (
    "INSERT INTO {control} AS c (tenant, queue, rate, burst, tokens)"
    " VALUES ({tenant}, {queue}, {rate}, {burst}, {burst})"
    " ON CONFLICT (tenant, queue) DO UPDATE SET rate = EXCLUDED.rate, burst = EXCLUDED.burst,"
    " tokens = EXCLUDED.burst, refilled_at = now(), changed_at = now()"
)
_UNLIMIT = (
    "UPDATE {control} AS c SET rate = NULL, burst = NULL, changed_at = now()"
    " WHERE c.tenant = {tenant} AND c.queue = {queue}"
)
# Consumers read the control table again before their next claim (at commit).
_ANNOUNCE = "SELECT pg_notify({control_channel}, '')"
# Rows that neither pause nor limit anything are removed: claims then skip the
# control table entirely once it is empty.
_TIDY = "DELETE FROM {control} AS c WHERE c.tenant = {tenant} AND NOT c.paused AND c.rate IS NULL"


@dataclass(frozen=True)
class TenantQueue:
    """One tenant's messages in one queue, and its controls there (:func:`inspect`)."""

    queue: str
    """The queue; ``"*"`` for a pause of every queue that holds no message."""
    tenant: str
    """The tenant as its messages name it (``""``: messages without a tenant)."""
    ready: int = 0
    """Messages a worker may claim now (a lapsed lease makes a message ready again)."""
    in_flight: int = 0
    """Messages claimed by a worker (prefetched or running), not delayed."""
    delayed: int = 0
    """Messages with an ETA or countdown still to come, held by a worker until then."""
    oldest_ready_seconds: float | None = None
    """Age of the oldest ready message, from when it was published; ``None`` without one."""
    paused: bool = False
    """Whether workers claim none of the tenant's messages here (paused on this queue
    or on every queue)."""
    rate: float | None = None
    """The tenant's rate limit on this queue (messages a second), if any."""
    burst: float | None = None
    """The most messages claimed at once under the rate limit."""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``tenant-celery tenants inspect --json``)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class Purged:
    """What :func:`purge` deleted, and what it left."""

    tenant: str
    queue: str | None
    """The queue purged; ``None`` for every queue."""
    ready: int = 0
    """Ready messages deleted."""
    delayed: int = 0
    """Delayed messages deleted; their task ids were revoked."""
    in_flight: int = 0
    """In-flight messages deleted (only with ``in_flight=True``); revoked too."""
    revoked: tuple[str, ...] = ()
    """Task ids revoked: the deleted messages a worker already held."""
    left_in_flight: tuple[str, ...] = field(default=())
    """Task ids of the tenant's in-flight messages left to finish."""
    results: PurgedResults | None = None
    """The stored results deleted, when :func:`purge` was given the result database."""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``tenant-celery tenants purge --json``)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["revoked"] = list(self.revoked)
        data["left_in_flight"] = list(self.left_in_flight)
        if self.results is not None:
            data["results"] = {"tasks": self.results.tasks, "groups": self.results.groups}
        return data


def inspect(
    broker: Broker, *, tenant: object = None, queue: str | None = None
) -> list[TenantQueue]:
    """Each tenant's messages per queue: ready, in flight, delayed, the oldest ready
    message's age, and its pause and rate limit.

    ``tenant`` and ``queue`` narrow it to one tenant or one queue.  Counted in one
    statement at one moment; expired messages are not counted.  A tenant paused
    on every queue, or controlled on a queue that holds none of its messages, is
    listed with zero counts (``queue="*"`` for every queue).
    """
    target = _Target.of(broker)
    tenant_id = None if tenant is None else parse_tenant_id(tenant)
    queue_name = None if queue is None else _queue(queue)
    params = {"tenant": tenant_id, "queue": queue_name}
    with target.transaction() as conn:
        stats = conn.execute(target.sql(_STATS), params).fetchall()
        controls = conn.execute(target.sql(_CONTROLS), params).fetchall()
    paused: dict[tuple[str, str], bool] = {}
    limits: dict[tuple[str, str], tuple[float, float]] = {}
    for row_tenant, row_queue, is_paused, rate, burst in controls:
        paused[(row_tenant, row_queue)] = bool(is_paused)
        if rate is not None:
            limits[(row_tenant, row_queue)] = (float(rate), float(burst))
    found: list[TenantQueue] = []
    seen: set[tuple[str, str]] = set()
    for row_queue, row_tenant, ready, in_flight, delayed, oldest in stats:
        seen.add((row_tenant, row_queue))
        found.append(
            _entry(row_queue, row_tenant, paused, limits, ready, in_flight, delayed, oldest)
        )
    for row_tenant, row_queue, *_ in controls:
        if (row_tenant, row_queue) in seen or (row_queue == "" and queue_name is not None):
            continue
        found.append(_entry(row_queue or "*", row_tenant, paused, limits, 0, 0, 0, None))
    found.sort(key=lambda entry: (entry.queue, entry.tenant))
    return found


def _entry(
    queue: str,
    tenant: str,
    paused: dict[tuple[str, str], bool],
    limits: dict[tuple[str, str], tuple[float, float]],
    ready: int,
    in_flight: int,
    delayed: int,
    oldest: Any,
) -> TenantQueue:
    key = (tenant, "" if queue == "*" else queue)
    rate, burst = limits.get(key, (None, None))
    return TenantQueue(
        queue=queue,
        tenant=tenant,
        ready=int(ready),
        in_flight=int(in_flight),
        delayed=int(delayed),
        oldest_ready_seconds=None if oldest is None else round(float(oldest), 3),
        paused=paused.get(key, False) or paused.get((tenant, ""), False),
        rate=rate,
        burst=burst,
    )


def pause(broker: Broker, tenant: object, *, queue: str | None = None) -> None:
    """Stop workers claiming ``tenant``'s messages from ``queue`` (every queue by
    default), from the claim after this commits, until :func:`resume`.

    Its messages stay where they are, in order; messages a worker already claimed
    run; a task published meanwhile is queued.  Pausing twice changes nothing.
    """
    target = _Target.of(broker)
    params = {"tenant": parse_tenant_id(tenant), "queue": "" if queue is None else _queue(queue)}
    with target.transaction() as conn:
        conn.execute(target.sql(_PAUSE), params)
        conn.execute(target.sql(_ANNOUNCE))


def resume(broker: Broker, tenant: object, *, queue: str | None = None) -> list[str]:
    """Lift ``tenant``'s pause on ``queue``, or every pause it has (``queue=None``);
    workers are woken to claim its messages at once.

    Returns the queues it is still paused on (``"*"``: every queue), so a resume
    of one queue while the tenant is paused everywhere says so.
    """
    target = _Target.of(broker)
    tenant_id = parse_tenant_id(tenant)
    params = {"tenant": tenant_id, "queue": None if queue is None else _queue(queue)}
    with target.transaction() as conn:
        conn.execute(target.sql(_RESUME), params)
        conn.execute(target.sql(_TIDY), params)
        conn.execute(target.sql(_ANNOUNCE))
        conn.execute(target.sql(_WAKE), {**params, "channel": NOTIFY_CHANNEL})
        rows = conn.execute(target.sql(_STILL_PAUSED), params).fetchall()
    return [str(row[0]) or "*" for row in rows]


def rate_limit(
    broker: Broker,
    tenant: object,
    *,
    queue: str,
    rate: float | None,
    burst: float | None = None,
) -> None:
    """Let workers claim at most ``rate`` of ``tenant``'s messages a second from
    ``queue``, all workers together; ``rate=None`` removes the limit.

    The limit is a token bucket that holds at most ``burst`` tokens (default: one
    second's worth, and at least 1) and starts full: after a quiet spell up to
    ``burst`` messages are claimed at once, then ``rate`` a second.  Each claimed
    message spends a token, whether its task then succeeds, fails or is
    retried; a message given back (a worker's warm shutdown) does not refund
    it.  Messages a worker holds for their ETA spent theirs when claimed.
    """
    target = _Target.of(broker)
    tenant_id = parse_tenant_id(tenant)
    queue_name = _queue(queue)
    params: dict[str, Any] = {"tenant": tenant_id, "queue": queue_name}
    if rate is None:
        if burst is not None:
            raise ConfigurationError("burst needs a rate; pass rate=None alone to remove the limit")
        statements = [_UNLIMIT, _TIDY, _WAKE, _ANNOUNCE]
    else:
        params["rate"] = _positive(rate, "rate", minimum=0.0)
        params["burst"] = _positive(
            max(1.0, params["rate"]) if burst is None else burst, "burst", minimum=1.0
        )
        statements = [_LIMIT, _WAKE, _ANNOUNCE]
    params["channel"] = NOTIFY_CHANNEL
    with target.transaction() as conn:
        for statement in statements:
            conn.execute(target.sql(statement), params)


def purge(
    broker: Broker,
    tenant: object,
    *,
    queue: str | None = None,
    in_flight: bool = False,
    revoke: bool = True,
    results: str | URL | Engine | None = None,
) -> Purged:
    """Delete ``tenant``'s queued messages from ``queue`` (every queue by default)
    in one transaction: ready ones and delayed ones (ETA or countdown).

    A delayed message is held by a worker until it is due; deleting its row does
    not take it back, so its task id is revoked (``revoke=False`` does not) and
    the worker discards it when it comes due.  In-flight messages (claimed,
    prefetched or running) are left to finish and named in the result;
    ``in_flight=True`` deletes their rows too (a worker that dies then does not
    get them back) and revokes them: a prefetched one is discarded, a running
    one finishes.  Other tenants' messages are untouched.

    ``results``, the result backend's database (a URL or an engine), has the
    tenant's stored results deleted too, in a transaction of its own
    (:func:`tenant_celery.results.purge_results`, which takes more options) that
    commits just before the messages' one: when the results cannot be purged,
    no message is deleted either.  A task of the tenant still running stores
    its result after that, and so does a revoked one when it comes due (its
    ``REVOKED`` state): purge the results again once those are past.

    Raises:
        InvalidTenantId: the tenant id was refused; nothing was sent.
        ConfigurationError: the broker is not the package's transport, its
            database cannot be reached or lacks the control table, or the
            results could not be purged; nothing was deleted.
    """
    target = _Target.of(broker)
    tenant_id = parse_tenant_id(tenant)
    queue_name = None if queue is None else _queue(queue)
    params = {
        "tenant": tenant_id,
        "queue": queue_name,
        "in_flight": bool(in_flight),
        "task_id": _TASK_ID,
    }
    with target.transaction() as conn:
        deleted: list[Any] = []
        for _ in range(_PURGE_ROUNDS):
            rows = conn.execute(target.sql(_PURGE), params).fetchall()
            deleted += rows
            if rows:
                continue
            found = conn.execute(target.sql(_PURGEABLE_LEFT), params).fetchone()
            if not found or not found[0]:
                break
            time.sleep(_PURGE_PAUSE)  # a claim holds some: it commits within moments
        else:
            raise ConfigurationError(
                f"could not purge {tenant_id}: its messages stayed locked for "
                f"{_PURGE_ROUNDS * _PURGE_PAUSE:g} s (a claim that does not end?); "
                "nothing was deleted"
            )
        left = conn.execute(target.sql(_LEFT), params).fetchall()
        # Before the messages' deletion commits: results that cannot be purged
        # (a wrong URL, a database away) leave the messages as they were.
        purged_results = None if results is None else _purge_results(results, tenant_id)
    counts = {"ready": 0, "delayed": 0, "in_flight": 0}
    held: list[str] = []
    for kind, _queue_name, task_id in deleted:
        counts[kind] += 1
        if kind != "ready" and task_id:
            held.append(str(task_id))
    if held and revoke:
        target.revoke(held)
    return Purged(
        tenant=tenant_id,
        queue=queue_name,
        revoked=tuple(held) if revoke else (),
        left_in_flight=tuple(str(row[0]) for row in left if row[0]),
        results=purged_results,
        **counts,
    )


def states_query(schema: str | None = None) -> str:
    """SQL of what :func:`inspect` counts, for a reader with its own connection (the
    worker monitor's per-tenant gauges): rows ``(queue, tenant, ready, in_flight,
    delayed, paused)`` for the queues named by its one parameter, ``%(queues)s``
    (psycopg's style).  A paused tenant comes as an extra row of zeros with
    ``paused`` true; the tenant is the message's header as written, not validated.
    """
    if schema is not None:
        identifier(schema, "schema")
    return _STATES_BY_QUEUE.format(
        message=qualified(MESSAGE_TABLE, schema),
        control=qualified(CONTROL_TABLE, schema),
        eta=qualified(_ETA_FUNCTION, schema),
    )


# --------------------------------------------------------------------------- helpers


def _purge_results(results: str | URL | Engine, tenant_id: str) -> PurgedResults:
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    try:
        return purge_results(results, tenant_id)
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        shown = " ".join(str(cause).split()) or type(cause).__name__
        raise ConfigurationError(
            f"could not purge the stored results ({shown}); no message was deleted either"
        ) from None


def _queue(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_QUEUE or "\x00" in value:
        shown = repr(value) if isinstance(value, str) and len(value) <= 100 else type(value)
        raise ConfigurationError(
            f"queue must be a queue's name (a non-empty string without NUL characters, "
            f"at most {_MAX_QUEUE} characters), got {shown}; pass queue=None for every queue"
        )
    return value


def _positive(value: object, name: str, *, minimum: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < minimum
        or (minimum == 0.0 and value == 0)
    ):
        bound = "greater than 0" if minimum == 0.0 else f"at least {minimum:g}"
        raise ConfigurationError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class _Target:
    """Where the transport's tables are: libpq URL and schema; the app to revoke with."""

    dsn: str
    schema: str | None
    app: Celery | None

    @classmethod
    def of(cls, broker: Broker) -> _Target:
        app: Celery | None = None
        schema: str | None = None
        if isinstance(broker, str):
            url = broker
        elif hasattr(broker, "conf"):
            app = broker
            urls = broker.conf.broker_url or ""
            url = (urls[0] if isinstance(urls, (list, tuple)) else str(urls)).split(";")[0]
            options = broker.conf.broker_transport_options or {}
            if options.get("schema") is not None:
                schema = identifier(options["schema"], "broker_transport_options['schema']")
        else:
            raise ConfigurationError(
                "broker must be a Celery app or its broker URL "
                f"(tcpg+postgresql://...), got {type(broker).__name__}"
            )
        return cls(dsn=_libpq_url(url), schema=schema, app=app)

    def sql(self, template: str) -> sql.Composed:
        def table(name: str) -> sql.Identifier:
            return (
                sql.Identifier(name) if self.schema is None else sql.Identifier(self.schema, name)
            )

        return sql.SQL(template).format(
            message=table(MESSAGE_TABLE),
            control=table(CONTROL_TABLE),
            tenant=sql.Placeholder("tenant"),
            queue=sql.Placeholder("queue"),
            in_flight=sql.Placeholder("in_flight"),
            rate=sql.Placeholder("rate"),
            burst=sql.Placeholder("burst"),
            channel=sql.Placeholder("channel"),
            control_channel=sql.Literal(CONTROL_CHANNEL),
            task_id=sql.Placeholder("task_id"),
            eta=table(_ETA_FUNCTION),
        )

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            conn = psycopg.connect(self.dsn, application_name=APPLICATION_NAME, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise ConfigurationError(
                f"could not connect to the transport's database: {_first_line(exc)}"
            ) from None
        try:
            with conn, conn.transaction():
                yield conn
        except psycopg.errors.UndefinedTable:
            raise ConfigurationError(
                "the transport's tenant control table does not exist in this database; "
                "upgrade it with tenant_celery.migrations.upgrade(url) or `tenant-celery "
                "migrate` as the tables' owner (revision tc0005)"
            ) from None

    def revoke(self, task_ids: Sequence[str]) -> None:
        from celery import Celery  # noqa: PLC0415

        if self.app is not None:
            self.app.control.revoke(list(task_ids))
            return
        with Celery(
            "tenant-celery-tenants", broker=f"{SCHEME}+{self.dsn}", set_as_current=False
        ) as app:
            if self.schema is not None:
                app.conf.broker_transport_options = {"schema": self.schema}
            app.control.revoke(list(task_ids))


def _libpq_url(url: str) -> str:
    """The libpq URL of a ``tcpg+postgresql[+driver]://`` broker URL (or of the
    database's own ``postgresql://`` URL)."""
    scheme, found, rest = url.partition("://")
    parts = scheme.lower().split("+") if found else []
    if parts and parts[0] == SCHEME:
        parts = parts[1:]
    if not parts or parts[0] not in {"postgresql", "postgres"}:
        shown = scheme if found else url[:20]
        raise ConfigurationError(
            f"tenant controls need the package's PostgreSQL transport (broker_url "
            f"tcpg+postgresql://...), not a {shown}:// broker: Redis and RabbitMQ do not "
            "record each message's tenant; see the how-to 'Run Celery on PostgreSQL alone'"
        )
    return "postgresql://" + rest


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
