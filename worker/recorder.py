"""The recorder: finished requests are written in batches, not one transaction each.

Whatever thread finishes a request (the engine's step loop, or a slice thread for a cache hit) only
appends it here; one recorder thread writes what has gathered every `flush_interval_ms`, or at once when
`flush_max_results` are waiting: one transaction with one statement for the successes (states, results,
audit events) and one for the failures. The engine's step loop never waits on the database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from schema.settings import Settings
from worker.retries import with_database_retry
from worker.transitions import Failure, Success, Transitions

log = logging.getLogger(__name__)

Outcome = Success | Failure
OnRecorded = Callable[[Sequence[Outcome], set[int]], None]


class Recorder(threading.Thread):
    def __init__(self, transitions: Transitions, settings: Settings, on_recorded: OnRecorded):
        super().__init__(name="deepbatch-recorder", daemon=True)
        self.transitions, self.settings, self.on_recorded = transitions, settings, on_recorded
        self._pending: list[Outcome] = []
        self._condition = threading.Condition()
        self._stopping = False

    def put(self, outcome: Outcome) -> None:
        with self._condition:
            self._pending.append(outcome)
            if len(self._pending) == 1 or len(self._pending) >= self.settings.flush_max_results:
                self._condition.notify()

    def run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._write(batch)

    def stop(self) -> None:
        """Write what is pending, then end the thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self.join(timeout=60)

    def _next_batch(self) -> list[Outcome] | None:
        """Waits for a first outcome, then up to the flush interval for company; None once stopped and empty."""
        most = self.settings.flush_max_results
        with self._condition:
            self._condition.wait_for(lambda: self._pending or self._stopping)
            if not self._stopping:
                self._condition.wait_for(lambda: len(self._pending) >= most or self._stopping,
                                         timeout=self.settings.flush_interval_ms / 1000)
            if not self._pending:
                return None
            batch, self._pending = self._pending[:most], self._pending[most:]
            return batch

    def _write(self, batch: list[Outcome]) -> None:
        successes = [outcome for outcome in batch if isinstance(outcome, Success)]
        failures = [outcome for outcome in batch if isinstance(outcome, Failure)]
        model = self.settings.model
        try:
            recorded = with_database_retry(lambda: self.transitions.record(successes, failures, model), self.settings)
        except Exception:  # noqa: BLE001 - the leases expire and the requests run again elsewhere
            log.exception("could not record %d finished requests; their leases will expire", len(batch))
            recorded = set()
        self.on_recorded(batch, recorded)
