"""A kombu transport that keeps Celery's messages in PostgreSQL, built on psycopg 3.

Select it with ``broker_transport = "tenant_celery.transport:Transport"`` and a
libpq URL (``broker_url = "postgresql://user@host/db"``), or with the URL alone,
``broker_url = "tcpg+postgresql://user@host/db"`` (the ``tcpg`` scheme is
registered with kombu when :mod:`tenant_celery` is imported).  Its tables come
from the bundled migration (revisions ``tc0002`` and ``tc0003``; ``tc0005`` adds the
tenant controls every claim reads, :mod:`tenant_celery.tenants`).

How it works:

* **Claims.** A consumer claims up to its free prefetch in one statement, with
  ``FOR UPDATE SKIP LOCKED`` (consumers never wait on each other's locks),
  taking the ready messages round-robin over the tenants that have any (the
  tenant comes from the message's tenant header): one tenant with 10,000 queued
  tasks cannot hold back another tenant's single task.  ``tenant_inflight_limit``
  caps the messages one tenant may have claimed and not yet acknowledged.
* **Leases.**  A claim sets the message's ``visible_at`` to now plus
  ``visibility_timeout``; a thread of the consumer renews the leases of the
  messages it holds (running, prefetched and ETA tasks alike) every third of
  that.  A consumer that dies stops renewing, and its messages are claimed
  again when their leases run out.
* **Acknowledgement deletes the row,** in the consumer's next claim statement,
  so a busy consumer spends no statement of its own on acknowledgements.  An
  acknowledged row waits about 50 ms at most for a claim, then is deleted on
  its own (by the lease thread if the consuming thread is busy running a
  task, and at close).  A consumer claims again once half its prefetch window
  is free, several messages at a time.
  Rejection with requeue, and the restore at shutdown, end the lease at once.
  Nothing is kept after an ack, so the table holds only waiting and in-flight
  messages.
* **Wake-ups.**  Publishing, and giving a message back, send ``NOTIFY`` with
  the queue's name; a consumer waits on ``LISTEN`` and also polls every
  ``polling_interval`` seconds, so it keeps working where notifications do
  not arrive (``listen: False``, for example behind PgBouncer in transaction
  mode).  A queue a claim found empty is claimed from again only when a
  ``NOTIFY`` names it, the channel rejects a message (or acknowledges one,
  with ``tenant_inflight_limit``), or the next poll.  An
  acknowledgement, from whatever thread, wakes the consumer: room in the
  prefetch window is claimed at once.  A worker runs all this in its event
  loop (kombu's hub); other consumers in ``drain_events``.
* **Connections.**  Claims, acknowledgements and renewals run on one
  connection, each in a transaction of its own with transaction-local
  settings sent in the same round trip: ``synchronous_commit`` off (one lost
  in a server crash only delivers a message again), sequential and bitmap
  scans and JIT off, so a claim stays on its index whatever the table's
  statistics say, and the prepared claim's generic plan forced, so it is
  planned once.
  Publishing runs on another, with durable commits.
* **Counters.**  Every claim is counted in its process: claims, empty claims,
  messages taken and the claim's time (:func:`claim_stats`), served by the
  worker monitor as ``celery_broker_claims_total`` and its siblings.
* **Bindings** (exchange to queue) live in a table, so fanout exchanges reach
  every bound queue across processes: broadcast control commands such as
  ``revoke`` work.
* **Auto-delete queues are not stored.**  The queues Celery declares for
  events (``celery events``, Flower), remote control and its replies are
  auto-delete: once the connection that declared one consumes it, a message
  to it is sent with ``NOTIFY`` on a channel of its own, which only that
  connection listens on, and that connection keeps it in memory until it is
  consumed (up to 10,000 per queue, the oldest dropped first).  Messages sent
  before (the first replies to a remote-control command, say) are stored and
  claimed as usual.  The channel's name is random, kept in the queue's row
  (revision ``tc0003``): only a role that may read the queue table can learn
  it.  A publisher's own declaration of the queue leaves it in place.
  Events cost no row, and no write at all while nobody listens.  A message
  too large for a notification (over 7,900 bytes, such as a failure event
  with a long traceback) is stored as usual.
  The consuming connection marks its notified queues alive every 15
  seconds; one not marked for a minute (its process was killed) is deleted,
  with its bindings and messages, by any consumer of the database.  With
  ``listen: False`` auto-delete queues are stored like the others and
  deleted when their channel closes.

Transport options (``broker_transport_options``):

===========================  ===========  =========================================
option                       default      meaning
===========================  ===========  =========================================
``visibility_timeout``       ``60``       seconds a claim lasts unless renewed
``polling_interval``         ``1.0``      seconds between polls when idle
``listen``                   ``True``     wait on ``LISTEN``/``NOTIFY`` between polls
``prepare``                  ``True``     let psycopg prepare repeated statements
``tenant_inflight_limit``    ``None``     most claimed, unacknowledged messages per tenant
``tenant_header``            app setting  message header naming the tenant
``schema``                   ``None``     schema of the tables (the connection's default)
``connect_timeout``          ``10``       seconds to wait for a connection
===========================  ===========  =========================================
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import os
import secrets
import select
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from queue import Empty
from typing import Any, cast

import psycopg
from amqp.protocol import queue_declare_ok_t
from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.utils.json import dumps, loads
from psycopg import sql

from ._pg import identifier, qualified
from .config import DEFAULT_HEADER
from .errors import ConfigurationError

__all__ = [
    "APPLICATION_NAME",
    "BINDING_TABLE",
    "CLAIM_SECONDS_BUCKETS",
    "CONTROL_CHANNEL",
    "CONTROL_TABLE",
    "MESSAGE_TABLE",
    "NOTIFY_CHANNEL",
    "QUEUE_TABLE",
    "SCHEME",
    "Channel",
    "ClaimStats",
    "QoS",
    "Transport",
    "claim_stats",
    "queue_lengths",
    "queue_lengths_by_tenant_query",
    "queue_lengths_query",
]

SCHEME = "tcpg"
"""URL scheme prefix that selects this transport: ``tcpg+postgresql://...``."""

MESSAGE_TABLE = "tenant_celery_message"
"""Messages waiting or claimed; a row is deleted when its message is acknowledged."""
QUEUE_TABLE = "tenant_celery_queue"
"""Declared queues with their message time-to-live and auto-delete flag."""
BINDING_TABLE = "tenant_celery_binding"
"""Exchange-to-queue bindings, shared by every process on the database."""
CONTROL_TABLE = "tenant_celery_tenant_control"
"""Paused and rate-limited tenants (:mod:`tenant_celery.tenants`), read by every claim."""
NOTIFY_CHANNEL = "tenant_celery_message"
"""``NOTIFY`` channel a publish wakes idle consumers on (the payload is the queue name)."""
CONTROL_CHANNEL = "tenant_celery_control"
"""``NOTIFY`` channel on which :mod:`tenant_celery.tenants` announces a change of the
tenant controls: consumers read the control table again before their next claim."""

APPLICATION_NAME = "tenant-celery broker"
"""``application_name`` of the transport's connections (``pg_stat_activity``)."""

logger = logging.getLogger("tenant_celery.transport")

_DEFAULT_BATCH = 10  # claim size when the consumer sets no prefetch limit
_ACK_DELAY = 0.05  # longest an acknowledged row waits for a claim to delete it
_TABLE_TTL = 2.0  # seconds a direct or topic exchange's bindings are cached
_SWEEP_EVERY = 30.0  # seconds between deletions of expired messages
_MAX_TENANT = 200  # longest tenant value kept for fair claiming
_NOTIFY_LIMIT = 7900  # largest message sent as a notification (PostgreSQL: < 8000 bytes)
_INBOX_LIMIT = 10_000  # notified messages a queue keeps unconsumed; the oldest go first
_TOUCH_EVERY = 15.0  # seconds between marks that a connection's auto-delete queues live
# Longest a listening connection goes unread before the lease thread reads it: a
# backend whose client reads no notifications blocks once its socket is full, and
# holds a snapshot meanwhile (vacuum of every table in the database waits for it).
_UNREAD_AT_MOST = 1.0
_AUTO_DELETE_GRACE = 60.0  # an auto-delete queue not marked for this long is deleted
_NOTIFIED_TAG = "n."  # delivery tags of notified messages (no row behind them)


def _seconds(options: dict[str, Any], name: str, default: float, *, minimum: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigurationError(
            f"broker_transport_options[{name!r}] must be a number of seconds of at least "
            f"{minimum}, not {value!r}"
        )
    return float(value)


class _Settings:
    """The transport options, checked once per connection."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.visibility_timeout = _seconds(options, "visibility_timeout", 60.0, minimum=1.0)
        self.polling_interval = _seconds(options, "polling_interval", 1.0, minimum=0.01)
        self.connect_timeout = _seconds(options, "connect_timeout", 10.0, minimum=1.0)
        self.listen = bool(options.get("listen", True))
        self.prepare = bool(options.get("prepare", True))
        limit = options.get("tenant_inflight_limit")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ConfigurationError(
                "broker_transport_options['tenant_inflight_limit'] must be a positive "
                f"integer or None, not {limit!r}"
            )
        self.tenant_inflight_limit: int | None = limit
        schema = options.get("schema")
        self.schema = None if schema is None else identifier(schema, "schema")
        header = options.get("tenant_header")
        self.tenant_header = header if isinstance(header, str) and header else _app_header()

    def table(self, name: str) -> sql.Composable:
        if self.schema is None:
            return sql.Identifier(name)
        return sql.Identifier(self.schema, name)


def _app_header() -> str:
    """The tenant header of the current Celery app (the package default without one)."""
    try:
        from celery import current_app  # noqa: PLC0415

        from .config import header_name  # noqa: PLC0415

        return header_name(current_app._get_current_object())  # type: ignore[attr-defined]
    except Exception:
        return DEFAULT_HEADER


def _sql(template: str, settings: _Settings) -> sql.Composed:
    return sql.SQL(template).format(
        message=settings.table(MESSAGE_TABLE),
        queue_table=settings.table(QUEUE_TABLE),
        binding=settings.table(BINDING_TABLE),
        control=settings.table(CONTROL_TABLE),
    )


# --------------------------------------------------------------------------- statements

# Each expires_at: the earliest of the message's own expiration and its queue's TTL.
_EXPIRES = (
    "LEAST(now() + %(expiration)s::float8 * interval '1 millisecond',"
    " now() + (SELECT q.message_ttl FROM {queue_table} AS q WHERE q.name = %(queue)s)"
    " * interval '1 millisecond')"
)
_INSERT = (
    "INSERT INTO {message} (queue, tenant, priority, expires_at, payload)"
    " VALUES (%(queue)s, %(tenant)s, %(priority)s, " + _EXPIRES + ", %(payload)s)"
)
_INSERT_FANOUT = (
    "INSERT INTO {message} (queue, tenant, priority, expires_at, payload)"
    " SELECT DISTINCT b.queue, %(tenant)s, %(priority)s,"
    " LEAST(now() + %(expiration)s::float8 * interval '1 millisecond',"
    " now() + q.message_ttl * interval '1 millisecond'), %(payload)s"
    " FROM {binding} AS b LEFT JOIN {queue_table} AS q ON q.name = b.queue"
    " WHERE b.exchange = %(exchange)s AND q.notify_channel IS NULL"
)


def _notifying(write: str) -> str:
    """``write``, then one ``NOTIFY`` per queue it wrote to (sent at commit)."""
    return (
        f"WITH m AS ({write} RETURNING queue)"
        " SELECT pg_notify(%(channel)s, q) FROM (SELECT DISTINCT queue AS q FROM m) AS d"
    )


#: (without NOTIFY, with NOTIFY) for a message to one queue, and to a fanout exchange.
_PUT = (_INSERT, _notifying(_INSERT))
_PUT_FANOUT = (_INSERT_FANOUT, _notifying(_INSERT_FANOUT))

# Tenants with ready messages in `queue`, after the cursor then from the start
# (a loose index scan over (queue, tenant, ...): one probe per tenant).
_READY = (
    "m.queue = %(queue)s AND m.visible_at <= now()"
    " AND (m.expires_at IS NULL OR m.expires_at > now())"
)
# The first tenant in index order: a probe of the claim index, whatever the planner
# believes of the table (its statistics swing between empty, full and all-claimed).
_FIRST = " ORDER BY m.queue, m.tenant LIMIT 1"
# A tenant's bucket level now: its tokens refilled at its rate since, up to its burst.
_LEVEL = (
    "LEAST(c.burst, c.tokens + c.rate * GREATEST(0, extract(epoch FROM now() - c.refilled_at)))"
)
# Whether the claim may take tenant `y.t`'s messages: not paused on this queue or
# everywhere, and not rate-limited on this queue with less than one token.
_OK = (
    "CASE WHEN y.t IS NULL THEN true ELSE NOT EXISTS ("
    "SELECT 1 FROM {control} AS c WHERE c.tenant = y.t AND c.queue IN (%(queue)s, '')"
    " AND (c.paused OR (c.rate IS NOT NULL AND c.queue = %(queue)s AND " + _LEVEL + " < 1))) END"
)


def _step(probe: str, controlled: bool) -> str:
    """The next tenant after a probe of the claim index (``x.t``) and, ``controlled``,
    whether the claim may take it (``x.ok``): each computed once (``OFFSET 0`` keeps
    the planner from copying the probe into every place its result is used)."""
    ok = (" " + _OK + " AS ok") if controlled else " true AS ok"
    return (
        "(SELECT y.t," + ok + " FROM (SELECT (SELECT m.tenant FROM {message} AS m"
        " WHERE " + _READY + probe + _FIRST + ") AS t OFFSET 0) AS y OFFSET 0) AS x"
    )


def _tenant_scan(controlled: bool) -> str:
    """Acknowledgements made since the last claim ride along with it: their rows are
    deleted by the same statement (and kept out of its candidates).  Then the tenants
    with ready messages in the queue, after the cursor, then from the start: with
    ``controlled``, tenants the claim may not take are passed over without counting
    towards the ``n`` it looks for, so a paused tenant at the cursor holds back no
    other tenant; and the buckets of the rate-limited ones are locked (in tenant
    order: two claims never wait on each other's) until this claim has spent them."""
    scan = (
        "WITH RECURSIVE acked AS ("
        " DELETE FROM {message} WHERE id = ANY(%(acks)s::bigint[]) AND lease = %(lease)s"
        "), after_cursor(t, pos, ok) AS ("
        " SELECT x.t, x.ok::int, x.ok FROM "
        + _step(" AND m.tenant > %(cursor)s", controlled)
        + " UNION ALL"
        " SELECT x.t, a.pos + x.ok::int, x.ok FROM after_cursor AS a CROSS JOIN LATERAL "
        + _step(" AND m.tenant > a.t", controlled)
        + " WHERE a.t IS NOT NULL AND a.pos < %(n)s"
        "), from_start(t, pos, ok) AS ("
        " SELECT x.t, %(n)s + x.ok::int, x.ok FROM "
        + _step(" AND m.tenant <= %(cursor)s", controlled)
        + " UNION ALL"
        " SELECT x.t, s.pos + x.ok::int, x.ok FROM from_start AS s CROSS JOIN LATERAL "
        + _step(" AND m.tenant > s.t AND m.tenant <= %(cursor)s", controlled)
        + " WHERE s.t IS NOT NULL AND s.pos < 2 * %(n)s"
        "), tenants AS ("
        " SELECT t, pos FROM after_cursor WHERE t IS NOT NULL AND ok"
        " UNION ALL SELECT t, pos FROM from_start WHERE t IS NOT NULL AND ok"
        " ORDER BY pos LIMIT %(n)s)"
    )
    if controlled:
        scan += (
            ", buckets AS ("
            " SELECT c.tenant, " + _LEVEL + " AS level FROM {control} AS c"
            " WHERE c.queue = %(queue)s AND c.rate IS NOT NULL"
            " AND c.tenant IN (SELECT t FROM tenants) ORDER BY c.tenant FOR UPDATE OF c)"
        )
    return scan


def _candidates(per_tenant: str, controlled: bool) -> str:
    """Per tenant, its first `n` ready messages by priority then age (with
    ``controlled``, fewer for a rate-limited tenant: the whole tokens in its bucket),
    locked without waiting; then the first `n` of them taking each tenant's first
    message first; with ``controlled``, what they spend of their tenants' buckets."""
    if controlled:
        per_tenant = (
            "LEAST(" + per_tenant + ", coalesce((SELECT GREATEST(0, floor(b.level))::int"
            " FROM buckets AS b WHERE b.tenant = tenants.t), %(n)s))"
        )
    text = (
        ", candidates AS ("
        " SELECT c.id, c.tenant, c.priority, tenants.pos FROM tenants CROSS JOIN LATERAL ("
        "  SELECT m.id, m.tenant, m.priority FROM {message} AS m"
        "  WHERE " + _READY + " AND m.tenant = tenants.t AND m.id <> ALL(%(acks)s::bigint[])"
        "  ORDER BY m.priority, m.id LIMIT " + per_tenant + " FOR UPDATE SKIP LOCKED) AS c"
        "), ranked AS ("
        " SELECT id, tenant, pos,"
        " row_number() OVER (PARTITION BY tenant ORDER BY priority, id) AS turn FROM candidates"
        "), chosen AS (SELECT id, tenant, turn, pos FROM ranked ORDER BY turn, pos LIMIT %(n)s)"
    )
    if controlled:
        text += (
            ", spent AS ("
            " UPDATE {control} AS c SET tokens = b.level - (SELECT count(*) FROM chosen"
            " WHERE chosen.tenant = b.tenant), refilled_at = GREATEST(c.refilled_at, now())"
            " FROM buckets AS b WHERE c.queue = %(queue)s AND c.tenant = b.tenant)"
        )
    return text


# With tenant_inflight_limit: a tenant may take only what its claimed messages leave
# (the rows this statement deletes as acknowledged no longer count).
_PER_TENANT = "%(n)s"
_PER_TENANT_CAPPED = (
    "GREATEST(0, LEAST(%(n)s, %(cap)s - (SELECT count(*) FROM ("
    " SELECT 1 FROM {message} AS f WHERE f.queue = %(queue)s AND f.tenant = tenants.t"
    " AND f.lease IS NOT NULL AND f.visible_at > now() AND f.id <> ALL(%(acks)s::bigint[])"
    " LIMIT %(cap)s) AS busy)))"
)
_RETURNING = " RETURNING m.id, m.tenant, m.deliveries, m.payload, chosen.pos, chosen.turn"
_CLAIM = (
    " UPDATE {message} AS m"
    " SET visible_at = now() + %(lease_seconds)s::float8 * interval '1 second',"
    " lease = %(lease)s, deliveries = m.deliveries + 1"
    " FROM chosen WHERE m.id = chosen.id" + _RETURNING
)
# For consumers that do not acknowledge (no_ack): taking the message removes it.
_TAKE = " DELETE FROM {message} AS m USING chosen WHERE m.id = chosen.id" + _RETURNING

_ACK = "DELETE FROM {message} WHERE id = ANY(%(acks)s::bigint[]) AND lease = %(lease)s"
_RELEASE_ROWS = (
    "UPDATE {message} SET visible_at = now(), lease = NULL"
    " WHERE id = ANY(%(ids)s) AND lease = %(lease)s"
)
#: (without NOTIFY, with NOTIFY): released messages are ready again at once.
_RELEASE = (_RELEASE_ROWS, _notifying(_RELEASE_ROWS))
_RENEW = (
    "UPDATE {message} SET visible_at = now() + %(lease_seconds)s::float8 * interval '1 second'"
    " WHERE id = ANY(%(ids)s) AND lease = %(lease)s"
)
_SIZE = "SELECT count(*) FROM {message} AS m WHERE " + _READY
_PURGE = (
    "WITH d AS (DELETE FROM {message} AS m WHERE m.queue = %(queue)s"
    " AND (m.lease IS NULL OR m.visible_at <= now()) RETURNING 1) SELECT count(*) FROM d"
)
_SWEEP = (
    "DELETE FROM {message} WHERE id IN (SELECT id FROM {message}"
    " WHERE expires_at <= now() LIMIT 1000 FOR UPDATE SKIP LOCKED)"
)
_DECLARE = (
    "INSERT INTO {queue_table} AS q (name, message_ttl, auto_delete, notify_channel) VALUES"
    " (%(queue)s, %(ttl)s, %(auto_delete)s, %(notify_channel)s) ON CONFLICT (name) DO UPDATE"
    " SET message_ttl = EXCLUDED.message_ttl, auto_delete = EXCLUDED.auto_delete,"
    # A declaration by a publisher (kombu declares auto-delete queues at every
    # publish) keeps the channel of the consumer that registered one.
    " notify_channel = coalesce(EXCLUDED.notify_channel, q.notify_channel),"
    " declared_at = now()"
)
_HAS_QUEUE = "SELECT EXISTS (SELECT 1 FROM {queue_table} WHERE name = %(queue)s)"
_HAS_TTL = "SELECT message_ttl FROM {queue_table} WHERE name = %(queue)s"
_BIND = (
    "INSERT INTO {binding} (exchange, routing_key, pattern, queue)"
    " VALUES (%(exchange)s, %(routing_key)s, %(pattern)s, %(queue)s) ON CONFLICT DO NOTHING"
)
_UNBIND = (
    "DELETE FROM {binding} WHERE exchange = %(exchange)s AND routing_key = %(routing_key)s"
    " AND queue = %(queue)s"
)
# Each binding with its queue's NOTIFY channel (NULL: its messages are stored).
_TABLE = (
    "SELECT b.routing_key, b.pattern, b.queue, q.notify_channel"
    " FROM {binding} AS b LEFT JOIN {queue_table} AS q ON q.name = b.queue"
    " WHERE b.exchange = %(exchange)s"
)
_NOTIFY = "SELECT pg_notify(%(name)s, %(payload)s)"
_TOUCH = (
    "UPDATE {queue_table} SET declared_at = now()"
    " WHERE name = ANY(%(names)s::text[]) RETURNING name"
)
# Auto-delete queues whose connection stopped marking them: it is gone.
_SWEEP_QUEUES = (
    "WITH dead AS (DELETE FROM {queue_table} WHERE notify_channel IS NOT NULL"
    " AND declared_at < now() - %(grace)s::float8 * interval '1 second' RETURNING name),"
    " b AS (DELETE FROM {binding} WHERE queue IN (SELECT name FROM dead)),"
    " m AS (DELETE FROM {message} WHERE queue IN (SELECT name FROM dead))"
    " SELECT count(*) FROM dead"
)
_DELETE_QUEUE = (
    "WITH b AS (DELETE FROM {binding} WHERE queue = %(queue)s),"
    " m AS (DELETE FROM {message} WHERE queue = %(queue)s)"
    " DELETE FROM {queue_table} WHERE name = %(queue)s"
)
_LISTEN = "LISTEN {channel}"
_ANY_CONTROL = "SELECT EXISTS (SELECT 1 FROM {control})"
_QUEUE_LENGTHS = (
    "SELECT q.name, count(m.id) FROM {queue_table} AS q"
    " LEFT JOIN {message} AS m ON m.queue = q.name AND m.visible_at <= now()"
    " AND (m.expires_at IS NULL OR m.expires_at > now())"
    " GROUP BY q.name ORDER BY q.name"
)


#: Each statement of the consuming connection runs in a transaction of its own with
#: these settings, sent with it in one round trip (pipeline mode) as one statement.
#: ``set_config(..., true)`` is ``SET LOCAL``: it ends with the transaction, so
#: nothing stays on the session (PgBouncer's transaction pooling hands it to other
#: clients).
_CONSUMER_SETTINGS = (
    b"SELECT"
    # Claims, acks and leases need no durable commit: one lost in a server crash
    # only delivers a message again (at least once).  Publishes stay durable.
    b" pg_catalog.set_config('synchronous_commit', 'off', true),"
    # A queue table's statistics swing between empty, backlogged and all claimed,
    # and a plan made for the wrong one reads the whole table per claim.  Every
    # statement here has an index path; these keep the planner on it whatever it
    # estimates, and keep a plan that a disabled path makes look costly from
    # being compiled.
    b" pg_catalog.set_config('enable_seqscan', 'off', true),"
    b" pg_catalog.set_config('enable_bitmapscan', 'off', true),"
    b" pg_catalog.set_config('jit', 'off', true),"
    # A prepared claim is planned once, not at each execution: the server would
    # otherwise go on planning it afresh (it judges the one-off plans cheaper
    # while a few tenants hold many messages), and planning the claim costs
    # more than running it.  With the paths above off, the generic plan takes
    # the same index paths.
    b" pg_catalog.set_config('plan_cache_mode', 'force_generic_plan', true)"
)
_CONSUMER_TRANSACTION = (b"BEGIN", _CONSUMER_SETTINGS)


def _in_consumer_transaction(
    conn: psycopg.Connection[Any], statement: bytes, params: dict[str, Any], fetch: bool
) -> list[tuple[Any, ...]]:
    """Run ``statement`` in a transaction with :data:`_CONSUMER_TRANSACTION`'s settings."""
    try:
        if psycopg.Pipeline.is_supported():
            with conn.pipeline():
                for setting in _CONSUMER_TRANSACTION:
                    conn.execute(setting)
                cur = conn.execute(statement, params)
                conn.execute(b"COMMIT")
        else:  # a libpq older than 14: the same, one round trip each
            for setting in _CONSUMER_TRANSACTION:
                conn.execute(setting)
            cur = conn.execute(statement, params)
            conn.execute(b"COMMIT")
        return cur.fetchall() if fetch else []
    except BaseException:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                conn.execute(b"ROLLBACK")
        raise


def queue_lengths_query(schema: str | None = None) -> str:
    """The SQL of :func:`queue_lengths`, for a reader with its own connection (the
    worker monitor reads it through SQLAlchemy)."""
    if schema is not None:
        identifier(schema, "schema")
    return _QUEUE_LENGTHS.format(
        queue_table=qualified(QUEUE_TABLE, schema), message=qualified(MESSAGE_TABLE, schema)
    )


def queue_lengths(
    conn: psycopg.Connection[Any], schema: str | None = None
) -> list[tuple[str, int]]:
    """Ready messages per declared queue (claimed and expired ones not counted)."""
    rows = conn.execute(queue_lengths_query(schema).encode()).fetchall()
    return [(str(name), int(count)) for name, count in rows]


_QUEUE_LENGTHS_BY_TENANT = (
    "SELECT q.name, coalesce(m.tenant, ''), count(m.id) FROM {queue_table} AS q"
    " LEFT JOIN {message} AS m ON m.queue = q.name AND m.visible_at <= now()"
    " AND (m.expires_at IS NULL OR m.expires_at > now())"
    " WHERE q.name = ANY(%(queues)s::text[])"
    " GROUP BY q.name, m.tenant ORDER BY q.name, m.tenant"
)


def queue_lengths_by_tenant_query(schema: str | None = None) -> str:
    """SQL counting the ready messages of some queues per tenant, as :func:`queue_lengths`
    counts them per queue: rows ``(queue, tenant, count)``.

    Its one parameter, ``%(queues)s`` (psycopg's style; SQLAlchemy's
    ``exec_driver_sql`` passes it on), is the list of queue names.  A queue
    without ready messages gives ``(queue, "", 0)``; one that is not declared
    gives no row.  The tenant is the message's tenant header as its publisher
    wrote it, neither validated nor verified; ``""`` when it had none.
    """
    if schema is not None:
        identifier(schema, "schema")
    return _QUEUE_LENGTHS_BY_TENANT.format(
        queue_table=qualified(QUEUE_TABLE, schema), message=qualified(MESSAGE_TABLE, schema)
    )


def _claim_statement(settings: _Settings, *, take: bool, controlled: bool) -> str:
    """The claim: with ``controlled``, the one that obeys the tenant controls, run
    while the control table has a row (its extra plan nodes cost a claim a quarter
    to a half more, measured by ``python -m benchmarks.claim_controls``)."""
    per_tenant = _PER_TENANT if settings.tenant_inflight_limit is None else _PER_TENANT_CAPPED
    text = _tenant_scan(controlled) + _candidates(per_tenant, controlled)
    return text + (_TAKE if take else _CLAIM)


# ------------------------------------------------------------------------ claim stats

CLAIM_SECONDS_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, float("inf"),
)  # fmt: skip
"""Upper bounds (seconds) of the buckets :class:`ClaimStats` counts claim times in."""


class ClaimStats:
    """What the claims of one process have done so far: counters that only grow.

    Every claim statement a consumer runs in this process is counted once it
    returns (a claim that fails is not): the process totals are
    :func:`claim_stats`, and the worker monitor serves them as
    ``celery_broker_claims_total`` and its siblings.  A claim costs them three
    attribute increments, a bucket found by bisection and incremented, and one
    pair of :func:`time.perf_counter` calls.  Claims run on a connection's consuming
    thread; connections claiming on several threads of one process at the same
    moment may, rarely, lose an increment.
    """

    __slots__ = ("buckets", "claims", "empty", "messages", "seconds")

    def __init__(self) -> None:
        self.claims = 0
        """Claim statements run."""
        self.empty = 0
        """Claims that found no message: nothing ready, or every ready one locked
        by another consumer's claim (``SKIP LOCKED``), or held back by
        ``tenant_inflight_limit``."""
        self.messages = 0
        """Messages the claims took."""
        self.seconds = 0.0
        """Wall time of the claims, from the client: the round trip (a transaction
        with its settings, the statement and the commit, pipelined) and any wait
        for the connection's lock."""
        self.buckets = [0] * len(CLAIM_SECONDS_BUCKETS)
        """Claims per bucket of :data:`CLAIM_SECONDS_BUCKETS` (not cumulative)."""

    def record(self, seconds: float, messages: int) -> None:
        self.claims += 1
        self.seconds += seconds
        self.buckets[bisect.bisect_left(CLAIM_SECONDS_BUCKETS, seconds)] += 1
        if messages:
            self.messages += messages
        else:
            self.empty += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "claims": self.claims,
            "empty_claims": self.empty,
            "claimed_messages": self.messages,
            "claim_seconds": self.seconds,
            "claim_seconds_buckets": dict(
                zip(CLAIM_SECONDS_BUCKETS, list(self.buckets), strict=True)
            ),
        }


_STATS = ClaimStats()


def claim_stats() -> dict[str, Any]:
    """The claims this process's consumers have run since it started, as numbers
    that only grow (read twice and subtract for a period)::

        {"claims": 1520, "empty_claims": 37, "claimed_messages": 6004,
         "claim_seconds": 0.871, "claim_seconds_buckets": {0.00025: 0, 0.0005: 1203, ...}}

    ``claim_seconds_buckets`` counts the claims by duration, each in the first
    bucket whose upper bound (:data:`CLAIM_SECONDS_BUCKETS`, seconds) is not
    below its time.  In a worker the consumer is in the main process: read it
    there, or from the worker monitor's ``/metrics``.
    """
    return _STATS.snapshot()


# ------------------------------------------------------------------------------- QoS


class QoS(virtual.QoS):
    """Acknowledgement deletes the message; a reject with requeue or a restore ends its lease."""

    channel: Channel
    _prefetch: int = 0
    least_window: int = 0
    """The smallest prefetch limit set on the channel (0: none yet).  A Celery worker
    raises its limit by one for each message it holds for an ETA, and lowers it
    again when it runs: those messages fill the window and its growth alike."""

    @property
    def prefetch_count(self) -> int:
        return self._prefetch

    @prefetch_count.setter
    def prefetch_count(self, value: int) -> None:
        self._prefetch = value
        if value and (not self.least_window or value < self.least_window):
            self.least_window = value

    def ack(self, delivery_tag: str) -> None:
        self.channel._ack(delivery_tag)
        super().ack(delivery_tag)
        # Room in the prefetch window: claim again, from the queues that may have
        # ready messages.  A queue found empty stays quiet (an acknowledgement
        # readies no message) unless a tenant at tenant_inflight_limit was what
        # held its messages back.
        if self.channel.settings.tenant_inflight_limit is not None:
            self.channel.quiet.clear()
        self.channel._transport.wake()

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel._release([delivery_tag])
        else:
            self.channel._ack(delivery_tag)
        super().ack(delivery_tag)
        self.channel.quiet.clear()
        self.channel._transport.wake()

    def restore_unacked(self) -> list[tuple[BaseException, str]]:  # type: ignore[override]
        """End the lease of every message this channel holds: they are ready again."""
        state: Any = self
        state._flush()
        tags = list(state._delivered)
        state._delivered.clear()
        try:
            self.channel.flush_acks()
        except Exception as exc:
            logger.warning("could not delete acknowledged messages: %s", exc)
        if not tags:
            return []
        try:
            self.channel._release(tags)
        except Exception as exc:
            # Their leases run out instead: nothing is lost, only delayed.
            return [(exc, tag) for tag in tags]
        return []

    def restore_unacked_once(self, stderr: Any = None) -> None:
        state: Any = self
        state._on_collect.cancel()
        state._flush()
        if not self.restore_at_shutdown or not self.channel.do_restore:
            return
        if getattr(state._delivered, "restored", None):
            return
        try:
            errors = self.restore_unacked()
            if errors:
                logger.warning(
                    "could not release %d claimed message(s) (%s); they are delivered "
                    "again when their leases run out",
                    len(errors),
                    errors[0][0],
                )
        finally:
            state._delivered.restored = True

    def held(self) -> list[str]:
        """Delivery tags claimed through this channel and not yet acknowledged."""
        state: Any = self
        for _ in range(5):
            try:  # the consuming thread may change them meanwhile: copy, retry
                dirty = set(state._dirty)
                return [tag for tag in list(state._delivered) if tag not in dirty]
            except RuntimeError:
                continue
        return []


# --------------------------------------------------------------------------- channel


def _tag(row_id: int, deliveries: int) -> str:
    return f"{row_id}.{deliveries}"


def _row_id(delivery_tag: str) -> int:
    return int(str(delivery_tag).split(".", 1)[0])


def _row_ids(delivery_tags: Iterable[str]) -> list[int]:
    """The rows behind ``delivery_tags`` (notified messages have none)."""
    return [_row_id(tag) for tag in delivery_tags if not str(tag).startswith(_NOTIFIED_TAG)]


def _message(payload: str | bytes) -> dict[str, Any] | None:
    """A stored payload as the message dict kombu delivers, or ``None`` when it is not one."""
    try:
        message = loads(payload)
    except Exception:  # any payload that does not decode is not a message
        # Not only ValueError: kombu's type markers raise others ({"__type__": "decimal"}
        # InvalidOperation, "bytes" AttributeError), deep nesting RecursionError.
        return None
    if not isinstance(message, dict) or "body" not in message:
        return None
    properties = message.setdefault("properties", {})
    if not isinstance(properties, dict):
        return None
    if not isinstance(properties.setdefault("delivery_info", {}), dict):
        return None
    return message


def _new_notify_channel() -> str:
    """A ``NOTIFY`` channel for one declaration of an auto-delete queue: random, so
    that only a role that may read the queue table (where it is kept) learns it."""
    return f"{NOTIFY_CHANNEL}.{secrets.token_hex(16)}"


def _expiration(message: dict[str, Any]) -> float | None:
    value = message.get("properties", {}).get("expiration")
    try:
        return None if value is None else max(0.0, float(value))
    except (TypeError, ValueError):
        return None


class Channel(virtual.Channel):
    """A channel over the transport's PostgreSQL connection."""

    QoS = QoS
    supports_fanout = True
    do_restore = True
    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        # kombu sets ``connection`` to None when the channel closes; a task that
        # finishes later must still be able to acknowledge its message.
        self._transport = connection
        self.settings = connection.settings
        self.lease = uuid.uuid4()
        self._no_ack_queues: set[str] = set()
        self._auto_delete_queues: set[str] = set()
        # Auto-delete queues delivered by NOTIFY: their messages, received by the
        # transport's listening connection and kept here until consumed; and what
        # declared and bound them, to declare them again if they were swept.
        self._inbox: dict[str, deque[bytes]] = {}
        self._inbox_dropped: dict[str, int] = {}
        self._declared: dict[str, dict[str, Any]] = {}
        self._bound: dict[str, set[tuple[str, str, str]]] = {}
        self._notified_tags = itertools.count(1)
        # Per queue, its NOTIFY channel as the last bindings read say (None: stored).
        self._notified_targets: dict[str, str | None] = {}
        self._cursors: dict[str, str] = {}
        self._tables: dict[str, tuple[float, list[tuple[str, str, str]]]] = {}
        self._queue_turn = 0
        # Queues a claim found nothing ready in: not claimed from again until a
        # NOTIFY names them, this channel rejects a message (or acknowledges one, with
        # tenant_inflight_limit), or the next poll (every polling_interval).  Without
        # LISTEN every wait is a poll.
        self.quiet: set[str] = set()
        # Acknowledged rows not yet deleted: the next claim deletes them, or the
        # consuming thread once the oldest has waited _ACK_DELAY (the lease thread
        # if that thread is busy); at once after the channel closes.
        self._acks: list[int] = []
        self._acked_at = 0.0
        self._acks_lock = threading.Lock()
        self._defer_acks = True
        # (take, controlled) -> the claim statement.
        self._statements = {
            (take, controlled): _claim_statement(self.settings, take=take, controlled=controlled)
            for take in (False, True)
            for controlled in (False, True)
        }

    # --- publishing ---------------------------------------------------------------

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        if self._notify(queue, message):
            return
        self._store(queue, message)

    def _put_fanout(
        self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any
    ) -> None:
        # The auto-delete queues bound (remote control's) are sent a notification
        # each; one write stores the message for every other bound queue.
        table = self.get_table(exchange)
        stored = False
        for queue in dict.fromkeys(queue for _, _, queue in table):
            if self._notified_targets.get(queue) is None:
                stored = True
            elif not self._notify(queue, message):
                self._store(queue, message)  # too large for a notification
        if stored:
            params = self._message_params(message)
            params["exchange"] = exchange
            self._transport.execute(_PUT_FANOUT[self.settings.listen], params, publish=True)

    def _notify(self, queue: str, message: dict[str, Any]) -> bool:
        """Send ``message`` as a notification if ``queue`` is delivered by them (an
        auto-delete queue) and it fits in one; whether it was."""
        name = self._notified_targets.get(queue)
        if name is None:
            return False
        payload = dumps(message)
        if len(payload.encode()) > _NOTIFY_LIMIT:
            return False
        self._transport.execute(_NOTIFY, {"name": name, "payload": payload}, publish=True)
        return True

    def _store(self, queue: str, message: dict[str, Any]) -> None:
        params = self._message_params(message)
        params["queue"] = queue
        self._transport.execute(_PUT[self.settings.listen], params, publish=True)

    def _message_params(self, message: dict[str, Any]) -> dict[str, Any]:
        tenant = (message.get("headers") or {}).get(self.settings.tenant_header)
        if not isinstance(tenant, str) or len(tenant) > _MAX_TENANT:
            tenant = ""
        return {
            "tenant": tenant,
            "priority": self._get_message_priority(message, reverse=True),
            "expiration": _expiration(message),
            "payload": dumps(message),
            "channel": NOTIFY_CHANNEL,
        }

    # --- queues and bindings -------------------------------------------------------

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        if passive and queue:
            # Only look: a passive declare must not reset the queue's settings.
            if not self._has_queue(queue):
                raise ChannelError(
                    f"NOT_FOUND - no queue {queue!r}", (50, 10), "Channel.queue_declare", 404
                )
            return queue_declare_ok_t(queue, self._size(queue), 0)
        return super().queue_declare(queue, passive, **kwargs)

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        arguments = kwargs.get("arguments") or {}
        ttl = arguments.get("x-message-ttl")
        auto_delete = bool(kwargs.get("auto_delete"))
        if auto_delete:
            self._auto_delete_queues.add(queue)
        registered = self._declared.get(queue)
        params = {
            "queue": queue,
            "ttl": int(ttl) if isinstance(ttl, (int, float)) else None,
            "auto_delete": auto_delete,
            # Declaring registers no channel (a publisher declares too): consuming does.
            "notify_channel": None if registered is None else registered["notify_channel"],
        }
        self._transport.execute(_DECLARE, params, publish=True)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        row = self._transport.execute(_HAS_QUEUE, {"queue": queue}, fetch=True, publish=True)
        return bool(row and row[0][0])

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        self._transport.execute(
            _BIND,
            {
                "exchange": exchange,
                "routing_key": routing_key or "",
                "pattern": pattern or "",
                "queue": queue,
            },
            publish=True,
        )
        self._tables.pop(exchange, None)
        if queue in self._auto_delete_queues:
            self._bound.setdefault(queue, set()).add((exchange, routing_key or "", pattern or ""))

    def queue_unbind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        self.state.binding_delete(queue, exchange or "", routing_key)
        self._transport.execute(
            _UNBIND,
            {"exchange": exchange or "", "routing_key": routing_key or "", "queue": queue},
            publish=True,
        )
        self._tables.pop(exchange or "", None)

    def get_table(self, exchange: str) -> list[tuple[str, str, str]]:
        """The bindings of ``exchange``, read from the database (briefly cached,
        except for fanout exchanges, which must reach queues bound a moment ago)."""
        fanout = self.typeof(exchange).type == "fanout"
        cached = self._tables.get(exchange)
        now = time.monotonic()
        if cached is not None and not fanout and now - cached[0] < _TABLE_TTL:
            return cached[1]
        rows = self._transport.execute(_TABLE, {"exchange": exchange}, fetch=True, publish=True)
        table = [(str(rk), str(pattern), str(queue)) for rk, pattern, queue, _ in rows]
        for _, _, queue, channel in rows:
            self._notified_targets[str(queue)] = None if channel is None else str(channel)
        self._tables[exchange] = (now, table)
        return table

    def _lookup(self, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        if exchange and self.typeof(exchange).type == "topic":
            # Events: one that matches no binding is dropped, as AMQP drops it,
            # with no dead-letter queue written (and no warning) per event.
            table = self.get_table(exchange)
            return list(self.typeof(exchange).lookup(table, exchange, routing_key, None))
        queues = super()._lookup(exchange, routing_key, default)
        if not queues and exchange:
            # Bound a moment ago by another process: look again, uncached.
            self._tables.pop(exchange, None)
            queues = super()._lookup(exchange, routing_key, default)
        return list(queues)

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        if if_empty and self._size(queue):
            return
        self._transport.execute(_DELETE_QUEUE, {"queue": queue}, publish=True)
        self.state.queue_bindings_delete(queue)
        self._auto_delete_queues.discard(queue)
        self._forget_notified(queue)
        self._tables.clear()

    def _forget_notified(self, queue: str) -> None:
        self._inbox.pop(queue, None)
        params = self._declared.pop(queue, None)
        if params is not None:
            self._transport.unlisten(params["notify_channel"])
        self._bound.pop(queue, None)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._transport.execute(_DELETE_QUEUE, {"queue": queue}, publish=True)

    def _size(self, queue: str) -> int:
        # On the publishing connection: declaring a queue reads its size, and a
        # process that only publishes should not open the claims connection for it.
        rows = self._transport.execute(_SIZE, {"queue": queue}, fetch=True, publish=True)
        return int(rows[0][0])

    def _purge(self, queue: str) -> int:
        rows = self._transport.execute(_PURGE, {"queue": queue}, fetch=True, publish=True)
        return int(rows[0][0])

    # --- consuming -----------------------------------------------------------------

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str | None, **kwargs: Any
    ) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        if queue in self._auto_delete_queues and self.settings.listen:
            self._deliver_by_notify(queue)
        consumed = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        # A queue consumed from now on (a worker's add_consumer) is claimed from at
        # once, not at the next poll.
        self.quiet.discard(queue)
        self._transport.consuming()
        self._transport.wake()
        return consumed

    def basic_cancel(self, consumer_tag: str) -> None:
        super().basic_cancel(consumer_tag)
        self._transport.release_listener()

    def _deliver_by_notify(self, queue: str) -> None:
        """From now on, have messages to auto-delete ``queue`` (declared by this
        channel, consumed by it) sent to this connection by notification: listen
        on a new random channel, then name it in the queue's row.  What was stored
        before, or by a publisher that read the row earlier, is claimed as usual."""
        if queue in self._declared:
            return
        name = _new_notify_channel()
        rows = self._transport.execute(_HAS_TTL, {"queue": queue}, fetch=True, publish=True)
        params: dict[str, Any] = {
            "queue": queue,
            "ttl": rows[0][0] if rows else None,
            "auto_delete": True,
            "notify_channel": name,
        }
        self._inbox.setdefault(queue, deque(maxlen=_INBOX_LIMIT))
        self._declared[queue] = params
        self._transport.listen_for(self, queue, name)
        self._transport.execute(_DECLARE, params, publish=True)
        self._transport._start_renewing()  # marks it alive, whoever drains or not

    def _claim(self, queue: str, n: int, *, take: bool) -> list[dict[str, Any]]:
        cursor = self._cursors.get(queue, "")
        acks = self._take_acks()
        params: dict[str, Any] = {
            "queue": queue,
            "n": n,
            "cursor": cursor,
            "lease": self.lease,
            "lease_seconds": self.settings.visibility_timeout,
            "acks": acks,
        }
        if self.settings.tenant_inflight_limit is not None:
            params["cap"] = self.settings.tenant_inflight_limit
        started = time.perf_counter()
        try:
            statement = self._statements[take, self._transport.controlled()]
            rows = self._transport.execute(statement, params, fetch=True)
        except BaseException:
            self._return_acks(acks)
            raise
        _STATS.record(time.perf_counter() - started, len(rows))
        if not rows:
            return []
        rows.sort(key=lambda row: (row[5], row[4]))  # each tenant's first, in turn
        messages = []
        for row_id, tenant, deliveries, payload, _pos, _turn in rows:
            message = _message(payload)
            if message is None:
                self._drop_unreadable(queue, row_id, tenant, payload)
                continue
            properties = message["properties"]
            properties["delivery_tag"] = _tag(row_id, deliveries)
            properties["delivery_info"]["redelivered"] = deliveries > 1
            messages.append(message)
        # The next claim starts after the last tenant served in this one.
        self._cursors[queue] = str(max(rows, key=lambda row: row[4])[1])
        return messages

    def _drop_unreadable(self, queue: str, row_id: int, tenant: object, payload: object) -> None:
        """Delete a claimed row that is not a message kombu can deliver.

        Delivered, it would stop the worker (an unrecoverable error), and it
        would be claimed again after every restart.  It is deleted with the
        next claim, as an acknowledgement is; its contents are not logged.
        """
        logger.error(
            "deleted message %d of queue %r (tenant %r): its %d-character payload is not a "
            "kombu message (JSON with a body and properties); it was written to the message "
            "table by something other than a kombu publisher, or altered there",
            row_id,
            queue,
            tenant,
            len(payload) if isinstance(payload, (str, bytes)) else -1,
        )
        with self._acks_lock:
            if not self._acks:
                self._acked_at = time.monotonic()
            self._acks.append(row_id)

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        # basic_get: a queue need not be consumed to be read.
        if queue in self._inbox:
            self._transport.poll_notifies()
        messages = self._take_notified(queue, 1) or self._claim(
            queue, 1, take=queue in self._no_ack_queues
        )
        if not messages:
            raise Empty()
        return messages[0]

    # --- messages delivered by NOTIFY ----------------------------------------------

    def _notified(self, queue: str, payload: bytes) -> None:
        """Keep a message the listening connection received for ``queue``."""
        inbox = self._inbox.get(queue)
        if inbox is None:
            return
        if len(inbox) == inbox.maxlen:
            dropped = self._inbox_dropped[queue] = self._inbox_dropped.get(queue, 0) + 1
            if dropped == 1 or dropped % _INBOX_LIMIT == 0:
                logger.warning(
                    "queue %r holds %d messages nobody consumed; dropped the oldest (%d so far)",
                    queue,
                    len(inbox),
                    dropped,
                )
        inbox.append(payload)

    def has_notified(self) -> bool:
        """Whether messages received by notification wait, ready to be delivered
        (to a consumer of their queue, with room for them)."""
        return any(self._deliverable(queue) for queue in list(self._inbox))

    def _deliverable(self, queue: str) -> bool:
        if not self._inbox.get(queue) or queue not in self._active_queues:
            return False
        return queue in self._no_ack_queues or bool(self.qos.can_consume())

    def _take_notified(self, queue: str, n: int) -> list[dict[str, Any]]:
        inbox = self._inbox.get(queue)
        messages: list[dict[str, Any]] = []
        while inbox and len(messages) < n:
            try:
                payload = inbox.popleft()
            except IndexError:  # taken meanwhile
                break
            message = _message(payload)
            if message is None:
                logger.warning("dropped a notification for queue %r that is not a message", queue)
                continue
            properties = message["properties"]
            properties["delivery_tag"] = f"{_NOTIFIED_TAG}{next(self._notified_tags)}"
            properties["delivery_info"]["redelivered"] = False
            messages.append(message)
        return messages

    def _touch_queues(self) -> None:
        """Mark this channel's notified queues alive; declare again (with their
        bindings) any that were deleted as dead meanwhile."""
        names = list(self._declared)
        if not names:
            return
        rows = self._transport.execute(_TOUCH, {"names": names}, fetch=True, publish=True)
        for queue in set(names) - {str(row[0]) for row in rows}:
            params = self._declared.get(queue)
            if params is None:  # deleted meanwhile
                continue
            logger.warning("queue %r had been deleted as abandoned; declaring it again", queue)
            self._transport.execute(_DECLARE, params, publish=True)
            for exchange, routing_key, pattern in list(self._bound.get(queue, ())):
                self._transport.execute(
                    _BIND,
                    {
                        "exchange": exchange,
                        "routing_key": routing_key,
                        "pattern": pattern,
                        "queue": queue,
                    },
                    publish=True,
                )

    def _get_many(self, queues: Sequence[str], timeout: float | None = None) -> None:
        """Claim up to the free prefetch from the first of ``queues`` (taken in turn)
        that has ready messages, and deliver them.

        A consumer that still holds at least half its prefetch window waits for
        more room before it claims: a busy worker claims several messages per
        statement instead of one per acknowledgement, and the half it holds
        keeps its pool busy meanwhile.
        """
        free = self.qos.can_consume_max_estimate()
        n = _DEFAULT_BATCH if free is None else free
        deliver = self.connection._deliver
        # Messages received by notification first, as far as the window allows.
        for queue in queues:
            if self._deliverable(queue):
                for message in self._take_notified(queue, _DEFAULT_BATCH if n <= 0 else n):
                    deliver(message, queue)
                return
        # Half the window the consumer set, not of what messages held for an ETA
        # added to it: a worker holding more of those than half its window would
        # otherwise claim nothing until they come due.
        window = cast(QoS, self.qos).least_window
        if n <= 0 or not queues or (free is not None and window and free < (window + 1) // 2):
            self.flush_due_acks()  # no claim has come to carry them in time
            raise Empty()
        count = len(queues)
        start = self._queue_turn % count
        self._queue_turn += 1
        quiet = self.quiet
        for offset in range(count):
            queue = queues[(start + offset) % count]
            if queue in quiet:
                continue
            messages = self._claim(queue, n, take=queue in self._no_ack_queues)
            if not messages:
                if self.settings.listen:
                    quiet.add(queue)
                continue
            for message in messages:
                deliver(message, queue)
            return
        raise Empty()

    def _ack(self, delivery_tag: str) -> None:
        """Delete an acknowledged message: with the next claim, or now if closed."""
        if str(delivery_tag).startswith(_NOTIFIED_TAG):
            return  # delivered by notification: nothing stored
        row_id = _row_id(delivery_tag)
        with self._acks_lock:
            if self._defer_acks:
                if not self._acks:
                    self._acked_at = time.monotonic()
                self._acks.append(row_id)
                return
        self._transport.execute(_ACK, {"acks": [row_id], "lease": self.lease})

    def _take_acks(self) -> list[int]:
        with self._acks_lock:
            acks, self._acks = self._acks, []
        return acks

    def _return_acks(self, acks: list[int]) -> None:
        if acks:
            with self._acks_lock:
                if not self._acks:
                    self._acked_at = time.monotonic()
                self._acks[:0] = acks

    def acks_due(self) -> float | None:
        """Seconds until the pending acknowledgements must be deleted (0: now);
        ``None`` when there are none."""
        with self._acks_lock:
            if not self._acks:
                return None
            return max(0.0, self._acked_at + _ACK_DELAY - time.monotonic())

    def flush_due_acks(self) -> None:
        """Delete the acknowledged messages once the oldest has waited ``_ACK_DELAY``."""
        if self.acks_due() == 0.0:
            self.flush_acks()

    def flush_acks(self) -> None:
        """Delete the acknowledged messages no claim has carried yet."""
        acks = self._take_acks()
        if acks:
            try:
                self._transport.execute(_ACK, {"acks": acks, "lease": self.lease})
            except BaseException:
                self._return_acks(acks)
                raise

    def _release(self, delivery_tags: Iterable[str]) -> None:
        ids = _row_ids(delivery_tags)
        if ids:
            self._transport.execute(
                _RELEASE[self.settings.listen],
                {"ids": ids, "lease": self.lease, "channel": NOTIFY_CHANNEL},
            )

    def _renew(self) -> None:
        # Acknowledged rows are no longer renewed: delete them before their leases
        # lapse, in case no claim has carried them (a long task on the solo pool).
        self.flush_acks()
        qos: Any = self._qos
        ids = _row_ids(qos.held()) if qos is not None else []
        if ids:
            self._transport.execute(
                _RENEW,
                {
                    "ids": ids,
                    "lease": self.lease,
                    "lease_seconds": self.settings.visibility_timeout,
                },
            )

    def close(self) -> None:
        with self._acks_lock:
            self._defer_acks = False  # from now on each acknowledgement deletes at once
        if not self.closed and self.connection is not None:
            transport = self.connection
            try:
                self.flush_acks()
                for queue in list(self._auto_delete_queues):
                    self.queue_delete(queue)
            except transport.connection_errors:
                pass  # unflushed acknowledgements: their leases run out, delivered again
        for queue in list(self._inbox):
            self._forget_notified(queue)
        super().close()


_PgChannel = Channel  # the name Channel is the transport's attribute inside its class

# ------------------------------------------------------------------------- transport


class Transport(virtual.Transport):
    """The kombu transport: one psycopg connection for claims and acknowledgements,
    another, when ``listen`` is on, that waits for ``NOTIFY``."""

    Channel = Channel
    can_parse_url = True
    default_port = 5432
    # Not "sql": Celery turns events off for that value (kombu's SQLAlchemy transport).
    driver_type = "postgresql"
    driver_name = "psycopg"
    connection_errors = (
        *virtual.Transport.connection_errors,
        psycopg.OperationalError,
        psycopg.InterfaceError,
    )
    # asynchronous: a worker runs the transport in its event loop (kombu's hub), as
    # it runs Redis's, instead of blocking in drain_events between its other work.
    implements = virtual.Transport.implements.extend(
        asynchronous=True, exchange_type=frozenset(["direct", "topic", "fanout"])
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        self.settings = _Settings(dict(client.transport_options or {}))
        super().__init__(client, **kwargs)
        self.polling_interval = self.settings.polling_interval
        self._lock = threading.RLock()
        self._conns: dict[bool, psycopg.Connection[Any]] = {}
        self._listener: psycopg.Connection[Any] | None = None
        self._watched_listener: psycopg.Connection[Any] | None = None  # in the loop
        # NOTIFY channel -> (channel, auto-delete queue) the listener receives for.
        self._listens: dict[str, tuple[_PgChannel, str]] = {}
        self._read_at = 0.0  # when the listening connection was last read
        # Whether the control table has a row (None: to be read), and when it was read.
        self._controlled: bool | None = None
        self._controlled_at = 0.0
        self._pid = os.getpid()
        self._rendered: dict[str, str] = {}
        self._swept_at = 0.0
        self._closed = False
        self._dsn: str | None = None
        self._wakeup: tuple[int, int] | None = None
        self._wakeup_lock = threading.Lock()
        self._wakeup_pid = 0
        self._stopping = threading.Event()
        self._renewer: threading.Thread | None = None
        self._renewer_pid = 0
        # In a worker's event loop: the loop, the descriptors and timers registered.
        self._polled_at = 0.0
        self._loop: Any = None
        self._readers: list[int] = []
        self._timers: list[Any] = []
        self._ack_timer: Any = None

    # --- connections ---------------------------------------------------------------

    def _conninfo(self) -> str:
        # Kept once read: kombu drops the transport's client when it closes the
        # connection, and a late acknowledgement still needs to connect then.
        if self._dsn is not None:
            return self._dsn
        client: Any = self.client
        if client is None:
            raise psycopg.OperationalError(
                "the PostgreSQL transport's kombu connection was closed before it ever "
                "connected; open a new one"
            )
        url = str(client.hostname or "")
        if "://" not in url:
            raise ConfigurationError(
                "the PostgreSQL transport needs a libpq URL as broker_url, such as "
                "postgresql://user@host:5432/dbname (or tcpg+postgresql://...)"
            )
        scheme, rest = url.split("://", 1)
        base = scheme.rsplit("+", 1)[0] if "+" in scheme else scheme
        if base not in {"postgresql", "postgres"}:
            raise ConfigurationError(
                f"the PostgreSQL transport needs a postgresql:// broker URL, not {base}://"
            )
        self._dsn = f"postgresql://{rest}"
        return self._dsn

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self._conninfo(),
            autocommit=True,
            connect_timeout=round(self.settings.connect_timeout),
            application_name=APPLICATION_NAME,
        )
        if not self.settings.prepare:
            conn.prepare_threshold = None
        return conn

    def _connection(self, publish: bool) -> psycopg.Connection[Any]:
        if self._pid != os.getpid():
            # Inherited across fork: never use the parent's sockets.
            self._conns = {}
            self._listener = None
            self._listens = {}
            self._pid = os.getpid()
        conn = self._conns.get(publish)
        if conn is None or conn.closed:
            conn = self._connect()
            self._conns[publish] = conn
        return conn

    def execute(
        self, template: str, params: dict[str, Any], *, fetch: bool = False, publish: bool = False
    ) -> list[tuple[Any, ...]]:
        """Run one of this module's statements (autocommit); its rows when ``fetch``.

        ``publish`` statements (messages, queues, bindings) run on a connection
        with durable commits; the consumer's on one without.
        """
        if self._closed:
            # A late acknowledgement after the connection closed (a task that
            # finished during a reconnection): one connection, closed at once.
            with self._connect() as once:
                text = _sql(template, self.settings).as_string(once)
                cur = once.execute(text.encode(), params)
                return cur.fetchall() if fetch else []
        with self._lock:
            conn = self._connection(publish)
            statement = self._rendered.get(template)
            if statement is None:
                # Table names quoted once per connection settings, not per call.
                statement = _sql(template, self.settings).as_string(conn)
                self._rendered[template] = statement
            try:
                if publish:
                    cur = conn.execute(statement.encode(), params)
                    return cur.fetchall() if fetch else []
                return _in_consumer_transaction(conn, statement.encode(), params, fetch)
            except psycopg.errors.UndefinedTable:
                raise ConfigurationError(
                    "the PostgreSQL transport's tables do not exist in this database"
                    + ("" if self.settings.schema is None else f" (schema {self.settings.schema})")
                    + "; create them with tenant_celery.migrations.upgrade(url) or "
                    "`tenant-celery migrate` as the tables' owner"
                ) from None
            except psycopg.errors.UndefinedColumn as exc:
                raise ConfigurationError(
                    "the PostgreSQL transport's tables are older than this version of "
                    f"tenant-celery ({exc.diag.message_primary}); upgrade them with "
                    "tenant_celery.migrations.upgrade(url) or `tenant-celery migrate` as "
                    "the tables' owner"
                ) from None
            except psycopg.OperationalError:
                self._discard()
                raise

    def _discard(self) -> None:
        for conn in (*self._conns.values(), self._listener):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._conns = {}
        self._listener = None

    def establish_connection(self) -> Transport:
        self._closed = False
        with self._lock:
            # The connection every user of the transport needs (publishing and
            # declaring); the claims connection opens at the first claim, so a
            # process that only sends tasks holds one connection, not two.
            self._connection(publish=True)
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        self._stopping.set()
        self._unregister()
        try:
            super().close_connection(connection)
        finally:
            self._closed = True
            with self._lock:
                self._discard()
            self._close_wakeup()

    # --- in a worker's event loop ---------------------------------------------------

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Run in ``loop``, a worker's kombu hub: claim when a ``NOTIFY`` arrives, when
        an acknowledgement frees room (the wake pipe), and every ``polling_interval``;
        delete acknowledged rows no claim has carried once they are due."""
        self._unregister()
        self._loop = loop
        wakeup = self._wakeup_pipe()[0]
        loop.add_reader(wakeup, self._on_readable, wakeup)
        self._readers = [wakeup]
        self._watched_listener = None
        self._watch_listener()
        self._timers = [loop.call_repeatedly(self.settings.polling_interval, self._on_poll)]
        loop.call_soon(self._on_poll)

    def _unregister(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        for fd in self._readers:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
        self._readers = []
        for timer in (*self._timers, self._ack_timer):
            if timer is not None:
                timer.cancel()
        self._timers = []
        self._ack_timer = None

    def _on_readable(self, fd: int) -> None:
        wakeup = self._wakeup
        if wakeup is not None and fd == wakeup[0]:
            with contextlib.suppress(OSError):
                while os.read(fd, 512):
                    pass
        else:
            listener = self._listener
            if listener is not None:
                with self._lock:
                    self._consume_notifies(listener)
        self._drain_ready()

    def _on_poll(self) -> None:
        self._polled_at = 0.0  # the timer is the poll, even if it fires a moment early
        try:
            self._watch_listener()
        except psycopg.Error as exc:  # the server is away: the claims will say so
            logger.warning("could not listen for the broker's notifications: %s", exc)
        self._drain_ready()

    def _watch_listener(self) -> None:
        """Have the loop read the ``LISTEN`` connection; a new one if it was lost
        (closed after a failed statement, or by the server), listening again on
        every channel: the auto-delete queues (remote control's) hear nothing but
        notifications."""
        loop = self._loop
        if loop is None or not self.settings.listen:
            return
        listener = self._listener
        if listener is not None and not listener.closed and listener is self._watched_listener:
            return
        for fd in self._readers[1:]:  # the first is the wake pipe
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
        self._readers = self._readers[:1]
        self._watched_listener = None
        listener = self._listening()
        if listener is not None:
            fd = listener.fileno()
            loop.add_reader(fd, self._on_readable, fd)
            self._readers.append(fd)
            self._watched_listener = listener

    def poll_notifies(self) -> None:
        """Take the notifications already received, without waiting (for basic_get)."""
        listener = self._listener
        if listener is not None and not listener.closed:
            with self._lock:
                self._consume_notifies(listener)

    def _drain_ready(self) -> None:
        """Claim and deliver what the channels have room for, without waiting."""
        if self._loop is None:
            return
        self._maintain()
        self._poll_due()
        cycle: Any = self.cycle
        for _ in range(max(1, len(self.channels or ()))):
            try:
                cycle.get(self._deliver, timeout=0)
            except Empty:
                break
        if self._has_notified():  # more notified messages than one round delivers
            self._loop.call_soon(self._drain_ready)
        self._schedule_ack_flush()

    def _has_notified(self) -> bool:
        channels: list[Any] = list(self.channels or ())
        return any(channel.has_notified() for channel in channels)

    def _schedule_ack_flush(self) -> None:
        if self._loop is None or self._ack_timer is not None:
            return
        due = self._acks_due()
        if due is not None:
            self._ack_timer = self._loop.call_later(due, self._flush_due_acks)

    def _flush_due_acks(self) -> None:
        self._ack_timer = None
        channels: list[Any] = list(self.channels or ())
        for channel in channels:
            channel.flush_due_acks()
        self._schedule_ack_flush()

    def _acks_due(self) -> float | None:
        """Seconds until some channel's acknowledged rows must be deleted; ``None``
        when no channel holds any."""
        channels: list[Any] = list(self.channels or ())
        dues = [due for channel in channels if (due := channel.acks_due()) is not None]
        return min(dues) if dues else None

    # --- waiting -------------------------------------------------------------------

    def _wants_notifications(self) -> bool:
        """Whether this connection consumes, or receives an auto-delete queue's
        messages by notification: otherwise it does not listen at all."""
        channels: list[Any] = list(self.channels or ())
        return bool(self._listens) or any(channel._active_queues for channel in channels)

    def consuming(self) -> None:
        """A consumer started: in a worker's loop, listen (and read) from now on,
        not only from the next poll."""
        if self._loop is not None:
            self._watch_listener()

    def release_listener(self) -> None:
        """Close the listening connection once nothing here consumes.

        A connection that listens but is not read is harmful beyond this
        process: every publish sends it a notification, its backend blocks once
        the socket is full and keeps its snapshot, and vacuum of the whole
        database waits.  A client that used remote control (``ping``) and a
        consumer that was cancelled no longer listen.
        """
        with self._lock:
            listener = self._listener
            if listener is None or self._wants_notifications():
                return
            self._listener = None
            if self._loop is not None and listener is self._watched_listener:
                for fd in self._readers[1:]:  # the first is the wake pipe
                    with contextlib.suppress(Exception):
                        self._loop.remove_reader(fd)
                self._readers = self._readers[:1]
                self._watched_listener = None
            with contextlib.suppress(Exception):
                listener.close()

    def _read_unread(self) -> None:
        """From the lease thread: read the listening connection if nobody has for
        :data:`_UNREAD_AT_MOST` seconds (a client between two waits, a solo worker
        running a task), so its backend never blocks on a full socket."""
        listener = self._listener
        if listener is None or time.monotonic() - self._read_at < _UNREAD_AT_MOST:
            return
        with self._lock:
            if listener is not self._listener or listener.closed:
                return
            try:
                heard = self._consume_notifies(listener)
            except psycopg.Error:
                return  # lost: the consuming thread reconnects at its next wait
        if heard:
            self.wake()  # the consuming thread claims what was announced

    def _listening(self) -> psycopg.Connection[Any] | None:
        if not self.settings.listen or not self._wants_notifications():
            return None
        listener = self._listener
        if listener is None or listener.closed:
            with self._lock:
                listener = self._listener
                if listener is None or listener.closed:
                    listener = self._connect()
                    for name in (NOTIFY_CHANNEL, CONTROL_CHANNEL, *self._listens):
                        listener.execute(sql.SQL(_LISTEN).format(channel=sql.Identifier(name)))
                    self._listener = listener
        return listener

    def listen_for(self, channel: _PgChannel, queue: str, name: str) -> None:
        """Receive the messages sent to auto-delete ``queue`` (for ``channel``) as
        notifications on ``name``, from now on."""
        with self._lock:
            fresh = name not in self._listens
            self._listens[name] = (channel, queue)
            listener = self._listening()
            if fresh and listener is not None and listener is self._listener:
                with contextlib.suppress(psycopg.errors.DuplicateObject):
                    listener.execute(sql.SQL(_LISTEN).format(channel=sql.Identifier(name)))

    def unlisten(self, name: str) -> None:
        with self._lock:
            if self._listens.pop(name, None) is None:
                return
            listener = self._listener
            if listener is not None and not listener.closed:
                with contextlib.suppress(psycopg.Error):
                    listener.execute(
                        sql.SQL("UNLISTEN {channel}").format(channel=sql.Identifier(name))
                    )
            self.release_listener()

    def wake(self) -> None:
        """End a wait of the consuming thread early (called after an acknowledgement,
        which may come from a pool thread, frees room in the prefetch window)."""
        if self._closed:
            return
        # The pipe is made here if the consuming thread has not waited yet: a wake
        # that came before its first wait must still end that wait.
        pipe = self._wakeup_pipe()
        with contextlib.suppress(OSError):  # full (a wake is pending) or closed
            os.write(pipe[1], b"\0")

    def _wakeup_pipe(self) -> tuple[int, int]:
        with self._wakeup_lock:
            pipe = self._wakeup
            if pipe is None or self._wakeup_pid != os.getpid():
                read, write = os.pipe()
                os.set_blocking(read, False)
                os.set_blocking(write, False)
                pipe = self._wakeup = (read, write)
                self._wakeup_pid = os.getpid()
            return pipe

    def _close_wakeup(self) -> None:
        with self._wakeup_lock:
            pipe, self._wakeup = self._wakeup, None
        if pipe is not None and self._wakeup_pid == os.getpid():
            for fd in pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _wait(self, seconds: float) -> None:
        """Wait up to ``seconds``; return early when a message is published
        (``NOTIFY``) or an acknowledgement frees room in the prefetch window."""
        wakeup = self._wakeup_pipe()[0]
        listener = self._listening()
        if listener is not None:
            with self._lock:
                heard = self._heard(listener.pgconn)
            if heard:
                return  # read with an earlier reply on the connection: no wait
        if self._has_notified():
            return
        sockets = [wakeup] if listener is None else [wakeup, listener.fileno()]
        ready, _, _ = select.select(sockets, [], [], seconds)
        if wakeup in ready:
            with contextlib.suppress(OSError):
                while os.read(wakeup, 512):
                    pass
        if listener is not None and listener.fileno() in ready:
            with self._lock:
                self._consume_notifies(listener)

    def _consume_notifies(self, listener: psycopg.Connection[Any]) -> bool:
        """Read what arrived on the listening connection (the caller holds the
        lock); whether it held notifications."""
        pgconn = listener.pgconn
        heard = False
        while True:  # all the socket holds: one read takes at most libpq's buffer
            pgconn.consume_input()
            if pgconn.status != psycopg.pq.ConnStatus.OK:
                self._listener = None
                raise psycopg.OperationalError("the broker's LISTEN connection was lost")
            if not self._heard(pgconn):
                return heard
            heard = True
            if not select.select([pgconn.socket], [], [], 0)[0]:
                return heard

    def _heard(self, pgconn: Any) -> bool:
        """Take the ``NOTIFY`` messages received: their queues are no longer quiet.
        Whether there were any."""
        channels: list[Any] = list(self.channels or ())
        heard = False
        self._read_at = time.monotonic()
        while (notify := pgconn.notifies()) is not None:
            heard = True
            name = bytes(notify.relname).decode("utf-8", "replace")
            if name == CONTROL_CHANNEL:
                self._controlled = None  # read again before the next claim
                for channel in channels:
                    channel.quiet.clear()  # a resumed tenant's messages wait
                continue
            if name != NOTIFY_CHANNEL:
                target = self._listens.get(name)
                if target is not None:
                    target[0]._notified(target[1], bytes(notify.extra))
                continue
            queue = bytes(notify.extra).decode("utf-8", "replace")
            for channel in channels:
                channel.quiet.discard(queue)
        return heard

    def controlled(self) -> bool:
        """Whether any tenant is paused or rate-limited (the control table has a row),
        so that claims must obey the controls.  Read again after a notification on
        :data:`CONTROL_CHANNEL`, and at least every ``polling_interval`` (a change
        made while this connection did not listen, or with ``listen`` off)."""
        if self._listener is not None:
            self.poll_notifies()  # a change announced since the last read counts now
        known = self._controlled
        now = time.monotonic()
        if known is None or now - self._controlled_at >= self.settings.polling_interval:
            # Listening first: a change committed after the read below is heard.
            self._listening()
            rows = self.execute(_ANY_CONTROL, {}, fetch=True)
            known = self._controlled = bool(rows[0][0])
            self._controlled_at = now
        return known

    def _poll_due(self) -> None:
        """Every ``polling_interval``, every queue is claimed from again (messages
        whose lease lapsed, or a NOTIFY missed while reconnecting)."""
        now = time.monotonic()
        if now - self._polled_at >= self.settings.polling_interval:
            self._polled_at = now
            channels: list[Any] = list(self.channels or ())
            for channel in channels:
                channel.quiet.clear()

    def _renew_leases(self) -> None:
        """Renew the leases of every message the channels hold, every third of the
        visibility timeout, in a thread of its own: a task that runs in the
        consuming thread (the solo pool) or for long keeps its message.  Every
        15 seconds, mark the channels' auto-delete queues alive.  Every second,
        read the listening connection if nobody else did."""
        renew_every = self.settings.visibility_timeout / 3
        period = min(renew_every, _TOUCH_EVERY)
        renewed_at = touched_at = time.monotonic()
        while not self._stopping.wait(min(period, _UNREAD_AT_MOST)):
            if self._pid != os.getpid():
                return
            self._read_unread()
            now = time.monotonic()
            if now - touched_at < period - 0.05:
                continue
            touched_at = now
            renew = now - renewed_at >= renew_every - 0.5
            if renew:
                renewed_at = now
            channels: list[Any] = list(self.channels or ())
            for channel in channels:
                try:
                    channel._touch_queues()
                    if renew:
                        channel._renew()
                except Exception as exc:  # the consuming thread reconnects; try again later
                    logger.warning("could not renew the broker leases: %s", exc)

    def _start_renewing(self) -> None:
        thread = self._renewer
        if thread is None or not thread.is_alive() or self._renewer_pid != os.getpid():
            self._stopping = threading.Event()
            self._renewer_pid = os.getpid()
            self._renewer = threading.Thread(
                target=self._renew_leases, name="tenant-celery-leases", daemon=True
            )
            self._renewer.start()

    def _maintain(self) -> None:
        """Keep the lease renewer running; now and then delete expired messages and
        abandoned auto-delete queues."""
        self._start_renewing()
        now = time.monotonic()
        if now - self._swept_at >= _SWEEP_EVERY and self.channels:
            self._swept_at = now
            self.execute(_SWEEP, {})
            self.execute(_SWEEP_QUEUES, {"grace": _AUTO_DELETE_GRACE}, publish=True)

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Deliver ready messages; between empty polls wait for ``NOTIFY`` (or sleep)
        up to ``polling_interval``; raise :class:`TimeoutError` after ``timeout``."""
        cycle: Any = self.cycle
        start = time.monotonic()
        while True:
            self._maintain()
            self._poll_due()
            try:
                cycle.get(self._deliver, timeout=timeout)
            except Empty:
                pass
            else:
                return
            remaining = None if timeout is None else timeout - (time.monotonic() - start)
            if remaining is not None and remaining <= 0:
                raise TimeoutError()
            wait = self.settings.polling_interval
            if remaining is not None:
                wait = min(wait, remaining)
            due = self._acks_due()
            if due is not None:  # come back to delete them, claim or not
                wait = min(wait, due)
            self._wait(wait)

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"port": self.default_port, "hostname": "localhost"}
