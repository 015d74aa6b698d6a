"""Worker-side guards for faults of the libraries a worker runs on.

Installed in a worker's main process at ``worker_init`` (the package connects
:func:`install_worker_fixes` to it), never in a client process.  Each guard
names the versions it is for, does nothing where they are not installed, and
changes nothing but the one failure it is for.

Closing a Redis channel whose pending ``BRPOP`` cannot be read
---------------------------------------------------------------

With Celery 5.7 and kombu's Redis transport (kombu 5.3 to 5.7 alike), a
worker can exit with ``Unrecoverable error: AttributeError("'NoneType' object
has no attribute 'hostname'")`` instead of reconnecting after Redis goes
away.  It takes three things at once: the task channel has a ``BRPOP`` in
flight (the worker had room for another message and the queue was empty),
that channel holds delivered, unacknowledged messages (``acks_late`` tasks
running), and the lost connection is noticed on another socket first (the
remote-control channel's).  Then, in the consumer's
``on_connection_error_after_connected``:

1. ``Connection.collect()`` closes the task channel.  ``Channel.close``
   first reads the pending ``BRPOP`` reply; on a dead connection that raises
   a connection error before the channel is marked closed, and ``collect``
   ignores the error: the channel stays open.
2. ``collect`` closes the transport's other channels, newest first; the
   remote-control channel fails on its way out (it deletes its auto-delete
   queue on the dead server), so the task channel is not reached again.
3. ``collect`` releases the transport: ``transport.client = None``.
4. Celery 5.7 then calls ``connection.close()`` as well.  The task channel
   is closed at last and gives its unacknowledged messages back to Redis
   through a client it builds from the released transport's settings:
   ``None.hostname``.  ``kombu.common.ignore_errors`` passes connection and
   channel errors only, and the worker exits.  Were the close not to fail,
   the ack of every task still running would: it too needs a client.

Celery 5.3 to 5.6 call ``collect()`` only and never close that connection,
so they do not get there.

The guard completes step 1: when ``Channel.close`` fails with a connection
error while reading a pending ``BRPOP`` (the only broker call before the
channel is marked closed, for a task channel), it closes the channel again.
The failed read has cleared the pending ``BRPOP``, so the second call goes
straight to closing, while the transport still has its settings: exactly
what kombu does when the lost connection is noticed on the ``BRPOP`` socket
itself.  Its unacknowledged messages are given back to Redis if Redis
answers, or else stay in Redis's ``unacked`` hash until the transport's
``visibility_timeout`` brings them back; tasks that finish once the worker
has reconnected are acknowledged as usual.  Every other failure of a close
propagates as before.

A message taken by ``BRPOP`` whose unacked record cannot be written
---------------------------------------------------------------------

kombu's Redis transport takes a message off its list with ``BRPOP``, then
records it in the ``unacked`` hash (``QoS.append``) before the worker sees
it.  When Redis goes away between the two, the record fails with a
connection error and the message, already off the list and in no hash, is
dropped without a word (every kombu 5.x).  The second guard keeps it: when
``QoS.append`` fails with a connection error, a thread puts the message back
at the head of its queue (as the transport's own restore does, marked
``redelivered``) once Redis answers again, retrying for
:data:`GIVE_BACK_FOR` seconds.  No worker has received it, so it cannot run
twice.

Acknowledgements that wait for the worker's loop to come round
----------------------------------------------------------------

Before Celery 5.7 a task's acknowledgement is deferred through the
consumer's ``call_soon`` until the worker's loop comes round, and two cases
leave it waiting:

* A worker without an event loop (gevent, eventlet) runs the blocking loop:
  ``drain_events(timeout=2.0)``, then the pending operations, again and
  again.  With the prefetch window full the transport can claim nothing, so
  ``drain_events`` returns only at its timeout: the worker runs a window of
  tasks, then stands still for up to two seconds.  Acknowledgements still
  pending when a warm shutdown stops the loop are never run: closing the
  connection releases those messages and another worker runs them again.
* A worker with an event loop and the threads pool acknowledges from a pool
  thread into the loop's ready list, and kombu before 5.7 does not wake the
  loop for it: the acknowledgement waits for the loop's next event or timer.

Celery 5.7 runs acknowledgements at once without an event loop
(``Consumer.call_soon_ack``), and kombu 5.7 wakes the loop.  The third guard
does the same on earlier releases, for this package's transport only: when
``call_soon`` is given a message's ``ack_log_error`` or ``reject_log_error``
outside the event loop's thread (or with no event loop), the call runs at
once; everything else is deferred as before.  The transport's
acknowledgement only records the row for deletion and wakes the consuming
loop, so it is safe from any thread.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.signals import worker_init

from . import _compat

__all__ = [
    "GIVE_BACK_FOR",
    "install_prompt_acks",
    "install_redis_append_guard",
    "install_redis_close_guard",
    "install_worker_fixes",
]

logger = logging.getLogger("tenant_celery.worker_fixes")

#: Seconds a dropped message is offered back to Redis before it is logged as lost.
GIVE_BACK_FOR = 600.0

#: Set on every function a guard put in place, so that no guard is installed twice.
_GUARD_MARK = "_tenant_celery_guard"


def _guarded(close: Callable[[Any], Any]) -> Callable[[Any], Any]:
    @functools.wraps(close)
    def close_channel(self: Any) -> Any:
        draining = bool(self._in_poll)
        try:
            return close(self)
        except self.connection_errors:
            # Retry only when the pending BRPOP was the one thing read and it
            # failed: ``_brpop_read`` has cleared ``_in_poll``, and the
            # channel is not marked closed yet.
            if not draining or self._in_poll or self.closed:
                raise
            return close(self)

    setattr(close_channel, _GUARD_MARK, True)
    return close_channel


def install_redis_close_guard() -> bool:
    """Guard kombu's Redis ``Channel.close`` (see the module docstring).

    Idempotent.  Returns whether the guard is in place: ``False`` on Celery
    before 5.7, or without redis-py (no Redis transport to guard).
    """
    if not _compat.CELERY_CLOSES_COLLECTED_CONNECTION:
        return False
    from kombu.transport import redis as kombu_redis  # noqa: PLC0415 (worker only)

    if getattr(kombu_redis, "redis", None) is None:
        return False
    channel: Any = kombu_redis.Channel
    if not getattr(channel.close, _GUARD_MARK, False):
        channel.close = _guarded(channel.close)
    return True


def _give_back(url: str, options: dict[str, Any], payload: dict[str, Any]) -> None:
    """Put ``payload`` back at the head of its queue once Redis answers."""
    from kombu import Connection  # noqa: PLC0415

    info = payload["properties"]["delivery_info"]
    deadline = time.monotonic() + GIVE_BACK_FOR
    delay = 0.5
    while True:
        try:
            with Connection(url, transport_options=options) as conn:
                channel: Any = conn.default_channel
                with channel.conn_or_acquire() as client, client.pipeline() as pipe:
                    channel._do_restore_message(
                        payload, info["exchange"], info["routing_key"], pipe, leftmost=True
                    )
                    pipe.execute()
        except Exception as exc:
            if time.monotonic() > deadline:
                logger.error(
                    "could not give back a message Redis lost the record of (%s); "
                    "task id %s is lost",
                    exc,
                    payload.get("headers", {}).get("id"),
                )
                return
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        else:
            logger.warning(
                "gave back a message whose unacked record Redis lost (task id %s)",
                payload.get("headers", {}).get("id"),
            )
            return


def _guarded_append(append: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(append)
    def append_message(self: Any, message: Any, delivery_tag: str) -> Any:
        try:
            return append(self, message, delivery_tag)
        except self.channel.connection_errors:
            client = self.channel.connection.client
            thread = threading.Thread(
                target=_give_back,
                args=(
                    client.as_uri(include_password=True),
                    dict(client.transport_options or {}),
                    message.serializable(),
                ),
                name="tenant-celery-give-back",
                daemon=True,
            )
            thread.start()
            raise

    setattr(append_message, _GUARD_MARK, True)
    return append_message


def install_redis_append_guard() -> bool:
    """Guard kombu's Redis ``QoS.append`` (see the module docstring).

    Idempotent.  Returns whether the guard is in place: ``False`` without
    redis-py (no Redis transport to guard).
    """
    from kombu.transport import redis as kombu_redis  # noqa: PLC0415 (worker only)

    if getattr(kombu_redis, "redis", None) is None:
        return False
    qos: Any = kombu_redis.QoS
    if not getattr(qos.append, _GUARD_MARK, False):
        qos.append = _guarded_append(qos.append)
    return True


def _is_transport_ack(callback: Any) -> bool:
    """Whether ``callback`` acknowledges or rejects a message of this package's
    transport (``Message.ack_log_error`` or ``reject_log_error``, bound)."""
    from kombu.message import Message  # noqa: PLC0415 (worker only)

    if getattr(callback, "__func__", None) not in (
        Message.ack_log_error,
        Message.reject_log_error,
    ):
        return False
    transport = sys.modules.get("tenant_celery.transport")
    channel = getattr(callback.__self__, "channel", None)
    return transport is not None and isinstance(channel, transport.Channel)


def _acking_at_once(call_soon: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call_soon)
    def call_soon_or_now(self: Any, callback: Any, *args: Any, **kwargs: Any) -> Any:
        in_loop = self.hub is not None and threading.current_thread() is threading.main_thread()
        if in_loop or not _is_transport_ack(callback):
            return call_soon(self, callback, *args, **kwargs)
        try:
            callback(*args, **kwargs)
        except Exception as exc:  # as the pending operations would have logged it
            logger.exception("acknowledging a message failed: %r", exc)
        return callback

    setattr(call_soon_or_now, _GUARD_MARK, True)
    return call_soon_or_now


def install_prompt_acks() -> bool:
    """Run this package's transport's acknowledgements at once on Celery before
    5.7 (see the module docstring).

    Idempotent.  Returns whether the guard is in place: ``False`` where the
    consumer already does (Celery 5.7 and later).
    """
    if _compat.consumer_acks_at_once():
        return False
    from celery.worker.consumer.consumer import Consumer  # noqa: PLC0415 (worker only)

    consumer: Any = Consumer
    if not getattr(consumer.call_soon, _GUARD_MARK, False):
        consumer.call_soon = _acking_at_once(consumer.call_soon)
    return True


@worker_init.connect(weak=False, dispatch_uid="tenant_celery.worker_fixes")
def install_worker_fixes(**_: Any) -> None:
    """Install every guard this module has (sent once, in a worker's main process)."""
    install_redis_close_guard()
    install_redis_append_guard()
    install_prompt_acks()
