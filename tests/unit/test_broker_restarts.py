"""A worker survives what Celery 5.7 and kombu 5.7 do to a lost Redis connection (worker/broker_restarts.py)."""

from __future__ import annotations

import pytest
from celery.utils.imports import symbol_by_name
from celery.worker.consumer import Consumer

from schema.settings import Settings
from worker.app import make_celery_app
from worker.broker_restarts import ResilientConsumer, ResilientRedisTransport, use_resilient_redis_transport


class LostRedisConnection:
    """What kombu 5.7's Redis connection does after `collect()`: closing it reads the dropped client, an
    AttributeError that kombu's `ignore_errors` (connection and channel errors only) lets through."""

    connection_errors = (ConnectionError,)
    channel_errors = ()

    def collect(self, socket_timeout=None) -> None:
        pass

    def close(self) -> None:
        raise AttributeError("'NoneType' object has no attribute 'hostname'")


def consumer_of(kind: type[Consumer]) -> Consumer:
    consumer = kind.__new__(kind)  # only the reconnect path is exercised: no worker around it
    consumer.app = make_celery_app(Settings(broker_url="memory://", database_url="postgresql://x/y"))
    consumer.app.conf.worker_cancel_long_running_tasks_on_connection_loss = True
    consumer.app.conf.worker_enable_prefetch_count_reduction = False
    consumer.connection = LostRedisConnection()
    return consumer


def test_celerys_own_consumer_dies_on_it() -> None:
    """The failure the subclass exists for (if Celery fixes it, this test says so)."""
    with pytest.raises(AttributeError, match="hostname"):
        consumer_of(Consumer).on_connection_error_after_connected(ConnectionError("broker restarted"))


def test_the_workers_consumer_drops_the_broken_connection_and_goes_on() -> None:
    consumer = consumer_of(ResilientConsumer)
    consumer.on_connection_error_after_connected(ConnectionError("broker restarted"))
    assert consumer.connection is None


def test_the_worker_uses_it() -> None:
    app = make_celery_app(Settings(broker_url="memory://", database_url="postgresql://x/y"))
    assert issubclass(symbol_by_name(app.conf.worker_consumer), ResilientConsumer)
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, ResilientRedisTransport) or connection.transport_cls == "memory"


def test_a_channel_of_a_collected_redis_connection_raises_a_connection_error() -> None:
    """What acking a message delivered before a restart does: kombu logs a connection error; the
    AttributeError it got before ended the worker."""
    import redis
    from kombu import Connection

    use_resilient_redis_transport()
    connection = Connection("redis://127.0.0.1:6379/13")
    channel = connection.default_channel
    assert isinstance(channel.connection, ResilientRedisTransport)
    connection.collect()
    with pytest.raises(redis.exceptions.ConnectionError, match="was closed"):
        channel._connparams()
