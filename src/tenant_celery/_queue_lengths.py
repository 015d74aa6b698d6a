"""Messages waiting in the queues a worker consumes, read for the worker monitor.

Which queues: the worker's task queues (its ``-Q`` selection and the ones
remote control added, else every queue the app defines); never an event
(``celeryev.*``), remote-control or reply (``*.pidbox``) queue, whose names
are made per process and would each become a series.

How, by broker:

* the package's transport: one statement on its tables, ready messages per
  queue and per tenant
  (:func:`~tenant_celery.transport.queue_lengths_by_tenant_query`);
* kombu's SQLAlchemy transport on PostgreSQL: visible messages per queue;
* any other broker (Redis, RabbitMQ, ...): a passive ``queue_declare`` per
  queue on a connection of the reader's own, opened for the read with short
  timeouts.  Redis answers with the length of the queue's lists (one per
  priority), RabbitMQ with its ready messages; a queue the broker does not
  know (Redis drops an empty list) has 0.

Each read raises whatever the broker or database raised; the monitor turns
that into its ``celery_queue_length_up`` gauge.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from celery import Celery
from kombu.exceptions import ChannelError
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine

from . import _readiness, metrics, signing
from ._probes import engine, owns_transport, sql_broker
from .context import parse_tenant_id
from .errors import TenantCeleryError

_STATEMENT_TIMEOUT = sa.text("SELECT set_config('statement_timeout', :ms, true)")
_VISIBLE_MESSAGES = (
    "SELECT q.name, count(m.id) FROM {queue} AS q"
    " LEFT JOIN {message} AS m ON m.queue_id = q.id AND m.visible"
    " WHERE q.name = ANY(:queues) GROUP BY q.name"
)


def worker_queues(app: Celery) -> list[str]:
    """The names of the task queues ``app``'s worker consumes, sorted (see the module docs)."""
    # The worker's task consumer knows (remote control's add_consumer and
    # cancel_consumer change it); before it starts, and outside a worker, the
    # -Q selection or else every queue the app defines.  Not the app's queues
    # once the worker runs: Celery 5.3 adds there every queue a task is sent to.
    names = _readiness.consumed_queues(app)
    if names is None:
        names = list(app.amqp.queues.consume_from)
    return sorted(name for name in names if not _transient(name))


def _transient(name: str) -> bool:
    return name.startswith("celeryev.") or name.endswith(".pidbox")


@dataclass
class Reading:
    """One read: ready messages per queue, and per queue and tenant label when the
    broker knows tenants and the app's metrics carry a tenant label."""

    totals: dict[str, int]
    by_tenant: dict[tuple[str, str], int] | None = None
    #: The package's transport: claimed messages per queue and tenant label, those
    #: held for an ETA apart, and 1 per (queue, label) whose tenant is paused there.
    in_flight_by_tenant: dict[tuple[str, str], int] | None = None
    delayed_by_tenant: dict[tuple[str, str], int] | None = None
    paused_by_tenant: dict[tuple[str, str], int] | None = None


class QueueReader(Protocol):
    #: Whether readings carry :attr:`Reading.by_tenant`.
    per_tenant: bool

    def read(self, queues: Sequence[str]) -> Reading: ...


def reader(app: Celery, timeout: float) -> QueueReader | None:
    """The reader for ``app``'s broker, or ``None`` when it has none (kombu's
    SQLAlchemy transport on a database other than PostgreSQL).

    Raises:
        ConfigurationError: SQLAlchemy cannot use the broker's database URL.
    """
    url = sql_broker(app)
    if url is None:
        return _BrokerQueues(app, timeout)
    if not url.startswith("postgresql"):
        return None
    broker_engine = engine("broker", url, timeout)
    options = app.conf.get("broker_transport_options") or {}
    if owns_transport(app):
        schema = options.get("schema")
        return _TransportQueues(
            app, broker_engine, None if schema is None else str(schema), timeout
        )
    return _KombuSqlQueues(broker_engine, options, timeout)


class _Sql:
    """Reads through an engine, each read under a statement timeout."""

    def __init__(self, engine: Engine, timeout: float) -> None:
        self.engine = engine
        self.timeout = timeout

    def rows(self, query: Callable[[sa.Connection], Any]) -> list[Any]:
        """Raises the database's error, or its statement timeout's after
        :attr:`timeout` seconds."""
        with self.engine.begin() as conn:
            conn.execute(_STATEMENT_TIMEOUT, {"ms": str(max(1, int(self.timeout * 1000)))})
            return list(query(conn))


class _KombuSqlQueues(_Sql):
    """kombu's SQLAlchemy transport: visible messages per queue."""

    per_tenant = False

    def __init__(self, engine: Engine, options: dict[str, Any], timeout: float) -> None:
        super().__init__(engine, timeout)
        quote = engine.dialect.identifier_preparer.quote
        self.query = sa.text(
            _VISIBLE_MESSAGES.format(
                queue=quote(str(options.get("queue_tablename", "kombu_queue"))),
                message=quote(str(options.get("message_tablename", "kombu_message"))),
            )
        ).bindparams(sa.bindparam("queues", type_=postgresql.ARRAY(sa.Text)))

    def read(self, queues: Sequence[str]) -> Reading:
        rows = self.rows(lambda conn: conn.execute(self.query, {"queues": list(queues)}))
        totals = dict.fromkeys(queues, 0)
        totals.update((str(name), int(count)) for name, count in rows)
        return Reading(totals)


class _TransportQueues(_Sql):
    """The package's transport: ready messages per queue, and per tenant.

    Tenants are labelled as the task metrics label them, with the same bound:
    the app's :func:`~tenant_celery.install_metrics` tenant label admits the
    first ``max_tenant_labels`` tenants of the whole worker, the biggest
    backlogs first here, and the rest read ``other``.  A header that is not a
    valid tenant id reads ``""``, as an untenanted message does.  Without a
    tenant label, or with header signing on (a queued message's tenant is not
    verified, and must not use up the label budget), there is no per-tenant
    reading.  A label once seen for a queue is reported, at 0 when its
    messages are gone, so its series ends at 0 rather than vanishing.
    """

    per_tenant = True

    def __init__(self, app: Celery, engine: Engine, schema: str | None, timeout: float) -> None:
        from .tenants import states_query  # noqa: PLC0415 (psycopg, kombu)

        super().__init__(engine, timeout)
        self.app = app
        self.query = states_query(schema)
        self._seen: dict[str, set[tuple[str, str]]] = {}
        self._lock = threading.Lock()  # concurrent scrapes read at once

    def read(self, queues: Sequence[str]) -> Reading:
        # The query binds psycopg's way: the driver gets it as written.
        rows = self.rows(
            lambda conn: conn.exec_driver_sql(self.query, {"queues": list(queues)}).all()
        )
        totals = dict.fromkeys(queues, 0)
        kinds: dict[str, Counter[tuple[str, str | None]]] = {
            kind: Counter() for kind in ("ready", "in_flight", "delayed", "paused")
        }
        for name, raw, ready, in_flight, delayed, paused in rows:
            totals[str(name)] += int(ready)
            key = (str(name), _valid_tenant(str(raw)))
            for kind, count in (
                ("ready", ready), ("in_flight", in_flight), ("delayed", delayed),
            ):  # fmt: skip
                if count:
                    kinds[kind][key] += int(count)
            if paused:
                kinds["paused"][key] = 1
        label = _tenant_label(self.app)
        if label is None:
            return Reading(totals)
        with self._lock:
            labels = _labels(kinds["ready"], kinds["paused"], label)
            ready, in_flight, delayed, paused = (
                self._labelled(kind, kinds[kind], labels, set(queues))
                for kind in ("ready", "in_flight", "delayed", "paused")
            )
        paused = {key: min(1, count) for key, count in paused.items()}
        return Reading(totals, ready, in_flight, delayed, paused)

    def _labelled(
        self,
        kind: str,
        counts: Counter[tuple[str, str | None]],
        labels: dict[str | None, str],
        queues: set[str],
    ) -> dict[tuple[str, str], int]:
        labelled: dict[tuple[str, str], int] = {}
        for (queue, tenant), count in counts.items():
            key = (queue, labels[tenant])
            labelled[key] = labelled.get(key, 0) + count
        seen = {key for key in self._seen.get(kind, ()) if key[0] in queues} | labelled.keys()
        self._seen[kind] = seen
        for key in seen:
            labelled.setdefault(key, 0)
        return labelled


def _labels(
    backlog: Counter[tuple[str, str | None]],
    paused: Counter[tuple[str, str | None]],
    label: Callable[[str | None], str],
) -> dict[str | None, str]:
    """Each tenant's label: the biggest backlogs are admitted first, then paused
    tenants without one; a tenant met only in flight gets the label it already had
    (or ``other`` once the budget is spent)."""
    per_tenant: Counter[str] = Counter()
    for (_, tenant), count in backlog.items():
        if tenant is not None:
            per_tenant[tenant] += count
    labels: dict[str | None, str] = {None: ""}
    for tenant in sorted(per_tenant, key=lambda t: (-per_tenant[t], t)):
        labels[tenant] = label(tenant)
    for _, tenant in sorted(paused, key=lambda key: str(key[1])):
        if tenant not in labels:
            labels[tenant] = label(tenant)
    return _Labels(labels, label)


class _Labels(dict[str | None, str]):
    """Labels assigned for one read; a tenant not yet labelled is labelled on use."""

    def __init__(self, labels: dict[str | None, str], label: Callable[[str | None], str]) -> None:
        super().__init__(labels)
        self._label = label

    def __missing__(self, tenant: str | None) -> str:
        value = self[tenant] = self._label(tenant)
        return value


def _valid_tenant(raw: str) -> str | None:
    if not raw:
        return None
    try:
        return parse_tenant_id(raw)
    except TenantCeleryError:
        return None


def _tenant_label(app: Celery) -> Callable[[str | None], str] | None:
    """The tenant label function of ``app``'s task metrics, when they have one and
    tenant headers are not signed."""
    installation = metrics._installed.get(id(app))
    if installation is None or installation.app is not app or not installation.tenant_label:
        return None
    try:
        if signing.signing_keys(app):
            return None
    except TenantCeleryError:  # an unusable keys setting: the worker refuses tenant tasks
        return None
    return installation.tenants.label


class _BrokerQueues:
    """Any other broker: a passive ``queue_declare`` per queue."""

    per_tenant = False

    def __init__(self, app: Celery, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    def read(self, queues: Sequence[str]) -> Reading:
        totals: dict[str, int] = {}
        # A new connection for each read, never one from the app's pool: an idle
        # one may have been closed by the server (RabbitMQ's missed heartbeats).
        with self.app.connection_for_read(
            connect_timeout=self.timeout, transport_options=self._socket_timeouts()
        ) as conn:
            conn.ensure_connection(max_retries=0, timeout=max(1, round(self.timeout)))
            channel: Any = conn.channel()
            try:
                for name in queues:
                    try:
                        declared = channel.queue_declare(queue=name, passive=True)
                    except ChannelError as exc:
                        if not _not_found(exc):
                            raise
                        totals[name] = 0
                        # RabbitMQ closes a channel on NOT_FOUND.
                        with contextlib.suppress(Exception):
                            channel.close()
                        channel = conn.channel()
                    else:
                        totals[name] = int(declared.message_count)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        return Reading(totals)

    def _socket_timeouts(self) -> dict[str, float]:
        # Each transport takes the options it knows: Redis's socket timeouts,
        # py-amqp's read and write timeouts.
        return {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "read_timeout": self.timeout,
            "write_timeout": self.timeout,
        }


def _not_found(exc: ChannelError) -> bool:
    code = getattr(exc, "reply_code", None) or getattr(exc, "code", None)
    return str(code) == "404" or str(exc).startswith("NOT_FOUND")
