"""Rebuilding the broker's view from Postgres, the source of truth.

Also where completion windows are enforced: queued requests of an overdue job become `expired`.
Two kinds of loss are repaired: requests held by a worker that died (lease expired: re-queued in
isolation groups, each group in a message of its own, or dead-lettered — worker/transitions.py,
RECLAIM_EXPIRED, says which and what it costs them) and messages the broker lost (a Redis restarted
without persistence, a purged queue): when the queue is empty but Postgres still holds queued requests
that nobody touched for a while, they are published again as slices (suspects, as their groups). Duplicates are harmless: a slice is a right to claim, a group
message claims only while its group is unchanged, and the claim in Postgres lets each request through once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from celery import Celery

from schema.settings import Settings
from worker.app import publish_dead_letters, publish_groups, publish_slices, queue_length
from worker.transitions import DeadRequest, Transitions, expire_overdue, queued_request_ids

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    requeued: list[int] = field(default_factory=list)
    dead: list[DeadRequest] = field(default_factory=list)
    republished: list[int] = field(default_factory=list)
    expired: int = 0


def reconcile(transitions: Transitions, app: Celery, settings: Settings, quiet_for: timedelta = timedelta(0),
              force: bool = False) -> ReconcileReport:
    """Repair both kinds of loss once.

    Queued requests untouched for `quiet_for` are re-published when the queue is empty (or always, with
    `force`); the quiet period spares requests that are about to be published or retried anyway.
    """
    with transitions.sessions.begin() as session:
        expired = expire_overdue(session, transitions.worker)
    requeued_groups, dead = transitions.reclaim_expired()
    publish_groups(app, requeued_groups)
    publish_dead_letters(app, settings, [asdict(letter) for letter in dead])
    requeued = [request_id for group in requeued_groups.values() for request_id in group]
    republished: list[int] = []
    if force or queue_length(app, settings.queue_name) == 0:
        with transitions.sessions() as session:
            suspect_groups, others = queued_request_ids(session, settings.queue_name, quiet_for)
        for group in requeued_groups:  # published above already
            suspect_groups.pop(group, None)
        publish_groups(app, suspect_groups)
        publish_slices(app, others, settings.slice_size)
        republished = [request_id for group in suspect_groups.values() for request_id in group] + others
    return ReconcileReport(requeued, dead, republished, expired)


class Maintenance(threading.Thread):
    """A worker's background duty: renew its leases often (and call `on_tick`), reconcile now and then."""

    def __init__(self, transitions: Transitions, app: Celery, settings: Settings,
                 held: Callable[[], list[int]], on_tick: Callable[[], None] = lambda: None):
        super().__init__(name="deepbatch-maintenance", daemon=True)
        self.transitions, self.app, self.settings, self.held = transitions, app, settings, held
        self.on_tick = on_tick
        self.stopped = threading.Event()

    def run(self) -> None:
        tick = min(self.settings.lease_s / 3, self.settings.reconcile_interval_s)
        since_reconcile = 0.0
        while not self.stopped.wait(tick):
            try:
                self.transitions.renew_leases(self.held())
                self.on_tick()
                since_reconcile += tick
                if since_reconcile >= self.settings.reconcile_interval_s:
                    since_reconcile = 0.0
                    self._reconcile()
            except Exception:  # noqa: BLE001 - a lost database or broker must not kill the thread
                log.exception("maintenance failed; trying again at the next tick")

    def _reconcile(self) -> None:
        quiet_for = timedelta(seconds=self.settings.reconcile_interval_s)
        report = reconcile(self.transitions, self.app, self.settings, quiet_for)
        if report.requeued or report.dead or report.republished or report.expired:
            log.warning("reconciled: %d requeued, %d dead-lettered, %d re-published, %d expired",
                        len(report.requeued), len(report.dead), len(report.republished), report.expired)

    def stop(self) -> None:
        self.stopped.set()
