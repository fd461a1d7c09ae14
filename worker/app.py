"""The Celery app: broker, queues, acknowledgement, prefetch and dead-letter wiring, all from the settings.

A message carries a *slice* of request ids (DEEPBATCH_SLICE_SIZE), never one request: per-request
messages cost a worker more than the engine spends on a short request. Work is acknowledged late (after
the slice's results are in Postgres) and re-queued if the worker dies, so the broker never forgets a slice
a worker was holding. The pool is threads, one per slice in flight: CUDA does not survive Celery's
prefork, and one engine per process batches what all slices submit.

RabbitMQ: the work queue is a durable quorum queue with a delivery limit; messages over it go to the
dead-letter exchange, as do requests Postgres declares dead. Redis: the same exchange and queue names,
emulated by kombu; `visibility_timeout` must exceed the longest batch or messages are delivered twice
(harmless — the claim in Postgres skips them — but wasteful).

A deployment can serve several models: each model's workers consume a queue of their own (the default
model's is DEEPBATCH_QUEUE_NAME, another's `<queue_name>.<model>`: `model_queue_name`), announced in the
workers registry (worker/registry.py), and the producer publishes each slice to the queue its requests were
routed to. Every queue is declared alike, from its name alone (`named_work_queue`), so that whoever declares it
first — a worker, submit, the API — declares what the others expect.

Native delayed delivery is left out of the worker (`WorkConsumer`): Celery adds it whenever a quorum queue
is declared, to carry ETA and countdown tasks over RabbitMQ, and warns that it cannot over a direct
exchange. DeepBatch publishes no such task (a retry waits out its backoff in Postgres, `retry_after`), so it
would only declare 28 exchanges and queues on the broker for nothing; the work exchanges stay direct (an
existing exchange cannot change its type: every deployment's would have to be deleted first).

Nothing is built at import: an app comes from `make_celery_app` (what publishes: submit, the API, the CLI's
admin commands) or `worker_app` (the one app of a worker process), so a command that needs no broker
builds none.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from amqp.exceptions import ChannelError
from celery import Celery
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu import Exchange, Queue

from schema.settings import Settings, get_settings
from worker.broker_restarts import ResilientConsumer, use_resilient_redis_transport

PROCESS_SLICE_TASK = "deepbatch.process_slice"


def is_redis(broker_url: str) -> bool:
    return broker_url.startswith(("redis://", "rediss://", "redis+socket://"))


def broker_options(settings: Settings, broker_url: str) -> dict[str, Any]:
    if is_redis(broker_url):
        # A message unacknowledged for longer than this is delivered again: keep it above the longest batch.
        return {"visibility_timeout": settings.visibility_timeout_s}
    return {"confirm_publish": True}


def model_queue_name(queue_name: str, model: str, default_model_names: frozenset[str]) -> str:
    """The queue of a model's workers: `queue_name` for the deployment's default model (so that a deployment
    of one model keeps its queue), `<queue_name>.<model>` for another (a path's last part names it)."""
    if model in default_model_names:
        return queue_name
    name = model.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")
    return f"{queue_name}.{name}"


def dead_letter_exchange(settings: Settings, queue_name: str | None = None) -> Exchange:
    return Exchange(f"{queue_name or settings.queue_name}.dlx", type="direct", durable=True)


def dead_letter_queue(settings: Settings, queue_name: str | None = None) -> Queue:
    name = f"{queue_name or settings.queue_name}.dead"
    return Queue(name, dead_letter_exchange(settings, queue_name), routing_key=name, durable=True)


def work_queue(settings: Settings, broker_url: str, queue_name: str | None = None) -> Queue:
    """A work queue (this process's own, DEEPBATCH_QUEUE_NAME, unless named), with its dead-letter wiring."""
    name = queue_name or settings.queue_name
    exchange = Exchange(name, type="direct", durable=True)
    arguments: dict[str, Any] = {}
    if not is_redis(broker_url):
        arguments = {
            "x-queue-type": "quorum",
            "x-delivery-limit": settings.broker_delivery_limit,
            "x-dead-letter-exchange": dead_letter_exchange(settings, name).name,
            "x-dead-letter-routing-key": dead_letter_queue(settings, name).name,
            # RabbitMQ ≥ 3.12 honours this per queue; older servers need `consumer_timeout` in rabbitmq.conf.
            "x-consumer-timeout": settings.consumer_timeout_ms,
        }
    return Queue(name, exchange, routing_key=name, durable=True, queue_arguments=arguments)


class WorkConsumer(ResilientConsumer):
    """The worker's consumer without native delayed delivery (the module's docstring says why)."""

    class Blueprint(ResilientConsumer.Blueprint):
        default_steps = [step for step in ResilientConsumer.Blueprint.default_steps
                         if step != f"{DelayedDelivery.__module__}:{DelayedDelivery.__name__}"]


def make_celery_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    broker_url = settings.broker_url or "redis://127.0.0.1:6379/0"
    use_resilient_redis_transport()  # worker/broker_restarts.py
    app = Celery("deepbatch", broker=broker_url, include=["worker.tasks"])
    app.deepbatch_settings = settings  # what `named_work_queue` declares another queue with
    app.conf.update(
        task_queues=[work_queue(settings, broker_url)],
        task_default_queue=settings.queue_name,
        task_default_exchange=settings.queue_name,
        task_default_routing_key=settings.queue_name,
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_pool="threads",
        worker_concurrency=settings.worker_threads,
        # Each thread holds one slice; together they keep the engine's queue at its target depth.
        worker_prefetch_multiplier=1,
        worker_consumer="worker.app:WorkConsumer",  # survives a broker restart; no delayed delivery
        worker_send_task_events=True,
        # No 'task-sent' event per message: it doubles the cost of publishing (0.86 → 0.49 ms a message
        # on Redis) and Flower sees tasks from the workers' events anyway.
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker restart is waited out, not fatal
        broker_transport_options=broker_options(settings, broker_url),
        worker_hijack_root_logger=False,
    )
    return app


def slices(request_ids: Sequence[int], slice_size: int) -> list[list[int]]:
    return [list(request_ids[start:start + slice_size]) for start in range(0, len(request_ids), slice_size)]


def named_work_queue(app: Celery, queue_name: str | None) -> Queue | None:
    """The work queue `queue_name` (another model's) declared as its workers declare it; None: the app's own."""
    settings: Settings = app.deepbatch_settings
    if queue_name is None or queue_name == settings.queue_name:
        return None
    return work_queue(settings, app.conf.broker_url, queue_name)


def publish_slices(app: Celery, request_ids: Sequence[int], slice_size: int, queue_name: str | None = None) -> int:
    """Publish `request_ids` as messages of up to `slice_size` ids, on one connection; returns the count.
    `queue_name`: the queue of the model they were routed to (default: the app's own)."""
    return _publish(app, [(message, None) for message in slices(request_ids, slice_size)], queue_name)


def publish_groups(app: Celery, groups: dict[int, list[int]], queue_name: str | None = None) -> int:
    """Publish each isolation group as one message, to be run by one worker with nothing else in its
    engine (worker/isolation.py); returns the count."""
    return _publish(app, [(request_ids, group) for group, request_ids in groups.items()], queue_name)


def _publish(app: Celery, messages: list[tuple[list[int], int | None]], queue_name: str | None = None) -> int:
    if not messages:
        return 0
    queue = named_work_queue(app, queue_name)
    destination = {} if queue is None else {"queue": queue}
    with app.producer_or_acquire() as producer:
        for request_ids, group in messages:
            app.send_task(PROCESS_SLICE_TASK, args=[request_ids], kwargs={"isolation_group": group},
                          producer=producer, argsrepr=slice_repr(request_ids),
                          kwargsrepr=f"{{'isolation_group': {group}}}", **destination)
    return len(messages)


def slice_repr(request_ids: list[int]) -> str:
    """How Flower shows a slice's arguments. Given, so that Celery does not `saferepr` hundreds of ids per
    message: that was a third of submit's publishing time (profiled)."""
    if len(request_ids) <= 3:
        return repr([request_ids])
    return f"[[{request_ids[0]}, {request_ids[1]}, … {request_ids[-1]}] ({len(request_ids)} request ids)]"


def publish_dead_letters(app: Celery, settings: Settings, letters: list[dict[str, Any]]) -> None:
    """Copy dead requests to the broker's dead-letter queue, for tools that watch the broker."""
    if not letters:
        return
    queue = dead_letter_queue(settings)
    with app.producer_or_acquire() as producer:
        for letter in letters:
            producer.publish(letter, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                             serializer="json", delivery_mode=2)


def queue_length(app: Celery, queue_name: str) -> int:
    """Messages waiting in the queue (not those a worker holds unacknowledged)."""
    with app.connection_for_write() as connection:
        try:
            return connection.default_channel.queue_declare(queue_name, passive=True).message_count
        except ChannelError:
            if connection.transport_cls != "redis":
                raise
            return 0  # Redis drops the key of an empty list: an empty queue looks like no queue


@cache
def worker_app() -> Celery:
    """The app of this worker process, built on first use from the settings: the one `deepbatch worker`
    runs is the one its feeder and maintenance thread publish with (worker/runtime.py)."""
    return make_celery_app(get_settings())
