"""Rebuilding the broker's view from Postgres, the source of truth.

Also where completion windows are enforced: queued requests of an overdue job become `expired`.
Two kinds of loss are repaired: requests held by a worker that died (lease expired: re-queued, or
dead-lettered after the last attempt) and messages the broker lost (a Redis restarted without
persistence, a purged queue): when the queue is empty but Postgres still holds queued requests that
nobody touched for a while, their messages are published again. Duplicates are harmless: the claim in
Postgres lets only one through.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from celery import Celery

from schema.settings import Settings
from worker.app import publish_dead_letters, publish_requests, queue_length
from worker.store import DeadRequest, RequestStore

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    requeued: list[int] = field(default_factory=list)
    dead: list[DeadRequest] = field(default_factory=list)
    republished: list[int] = field(default_factory=list)
    expired: int = 0


def reconcile(store: RequestStore, app: Celery, settings: Settings, quiet_for: timedelta = timedelta(0),
              force: bool = False) -> ReconcileReport:
    """Repair both kinds of loss once.

    Queued requests untouched for `quiet_for` are re-published when the queue is empty (or always, with
    `force`); the quiet period spares requests that are about to be published or retried anyway.
    """
    expired = store.expire_overdue()
    requeued, dead = store.reclaim_expired()
    publish_requests(app, requeued)
    publish_dead_letters(app, settings, [asdict(letter) for letter in dead])
    republished: list[int] = []
    if force or queue_length(app, settings.queue_name) == 0:
        republished = [rid for rid in store.queued_request_ids(quiet_for) if rid not in requeued]
        publish_requests(app, republished)
    return ReconcileReport(requeued, dead, republished, expired)


class Maintenance(threading.Thread):
    """A worker's background duty: renew its leases often (and call `on_tick`), reconcile now and then."""

    def __init__(self, store: RequestStore, app: Celery, settings: Settings,
                 in_flight: Callable[[], list[int]], on_tick: Callable[[], None] = lambda: None):
        super().__init__(name="deepbatch-maintenance", daemon=True)
        self.store, self.app, self.settings, self.in_flight = store, app, settings, in_flight
        self.on_tick = on_tick
        self.stopped = threading.Event()

    def run(self) -> None:
        renew_every = self.settings.lease_s / 3
        reconcile_every = self.settings.reconcile_interval_s
        since_reconcile = 0.0
        while not self.stopped.wait(min(renew_every, reconcile_every)):
            try:
                self.store.renew_leases(self.in_flight())
                self.on_tick()
                since_reconcile += min(renew_every, reconcile_every)
                if since_reconcile >= reconcile_every:
                    since_reconcile = 0.0
                    quiet_for = timedelta(seconds=self.settings.reconcile_interval_s)
                    report = reconcile(self.store, self.app, self.settings, quiet_for)
                    if report.requeued or report.dead or report.republished or report.expired:
                        log.warning("reconciled: %d requeued, %d dead-lettered, %d re-published, %d expired",
                                    len(report.requeued), len(report.dead), len(report.republished), report.expired)
            except Exception:  # noqa: BLE001 - a lost database or broker must not kill the thread
                log.exception("maintenance failed; trying again at the next tick")

    def stop(self) -> None:
        self.stopped.set()
