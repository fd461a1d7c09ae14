"""The worker's Celery consumer: it survives its broker's restart with no supervisor.

On a lost broker connection, Celery 5.7 (`on_connection_error_after_connected`) first `collect()`s the
connection, which drops the transport's reference to it, then closes it under kombu's `ignore_errors`.
With kombu 5.7's Redis transport the close can still reach code that reads the dropped reference
(`_connparams`: `'NoneType' object has no attribute 'hostname'`); `ignore_errors` catches only connection
and channel errors, so the AttributeError ends the consumer and the worker exits (about one Redis restart
in eleven). The connection being closed is the broken one, about to be replaced: whatever its close
raises is logged and dropped, and the reconnect goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery.worker.consumer import Consumer

log = logging.getLogger(__name__)


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
