"""Surviving a broker restart with no supervisor: a Redis channel and a Celery consumer that tolerate
the connection Celery has already thrown away.

On a lost broker connection, Celery 5.7 (`on_connection_error_after_connected`) first `collect()`s the
connection, which drops the transport's reference to it (`client` becomes None), then closes it. With
kombu 5.7's Redis transport, anything that still uses a channel of that connection reads the dropped
reference in `_connparams` and raises `AttributeError: 'NoneType' object has no attribute 'hostname'`:
closing the channel, or acking a message delivered before the restart (seen in the chaos suite, restart 6
of 10). kombu guards those calls against connection errors only, so the AttributeError ended the consumer
and the worker exited.

- `ResilientRedisChannel` raises a Redis connection error there instead, which kombu already handles:
  the close is ignored, the ack logged (the message comes back after the visibility timeout, and a slice
  claims nothing twice).
- `ResilientConsumer` drops whatever else closing the lost connection raises, and reconnects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis
from celery.worker.consumer import Consumer
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class ResilientRedisChannel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict:
        if self.connection is None or self.connection.client is None:  # collected: its connection is gone
            raise redis.exceptions.ConnectionError("the broker connection of this channel was closed (a restart)")
        return super()._connparams(asynchronous=asynchronous)


class ResilientRedisTransport(kombu_redis.Transport):
    Channel = ResilientRedisChannel


def use_resilient_redis_transport() -> None:
    """Make `redis://` and `rediss://` broker URLs use the transport above, in this process."""
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:ResilientRedisTransport"


class ResilientConsumer(Consumer):
    def on_connection_error_after_connected(self, exc: Exception) -> None:
        if self.connection is not None:
            self.connection.close = forgiving_close(self.connection.close)
        super().on_connection_error_after_connected(exc)


def forgiving_close(close: Callable[[], object]) -> Callable[[], None]:
    """`close` of a connection already lost: an error in it is logged, never raised."""

    def close_lost_connection() -> None:
        try:
            close()
        except Exception as error:  # noqa: BLE001 - anything, see the module's docstring
            log.warning("closing the lost broker connection failed (%r); dropped, reconnecting", error)

    return close_lost_connection
