"""The recorder: finished requests are written in batches, not one transaction each.

Whatever thread finishes a request (the engine's step loop, or a slice thread for a cache hit) only
appends it here; one recorder thread writes what has gathered every `flush_interval_ms`, or at once when
`flush_max_results` are waiting: one transaction with one statement for the successes (states, results,
audit events) and one for the failures. The engine's step loop never waits on the database.

A write that fails because of its rows (a value PostgreSQL refuses: `retries.is_row_fault`) is split in
halves, and each half written on its own, down to single rows: one bad row costs about 2·log2(batch)
statements, never the batch's leases, and every other row is written at once. A row refused even alone
fails by itself as `unstorable_output` through the retry policy. A database outage is waited out and
the whole batch written again (`with_database_retry`); any other error leaves the batch to its leases.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from schema.settings import Settings
from worker.retries import is_row_fault, unstorable_failure, with_database_retry
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
        written, recorded = self._write_splitting(batch)
        self.on_recorded(written, recorded)

    def _write_splitting(self, outcomes: list[Outcome]) -> tuple[list[Outcome], set[int]]:
        """Write `outcomes`, halving them while a row is at fault; returns the outcomes as written (an
        unstorable one replaced by its failure) and the ids recorded. What is not recorded is left to
        its leases."""
        try:
            return outcomes, self._write_together(outcomes)
        except Exception as error:  # noqa: BLE001 - the leases expire and the requests run again elsewhere
            if not is_row_fault(error):
                log.exception("could not record %d finished requests; their leases will expire", len(outcomes))
                return outcomes, set()
            if len(outcomes) == 1:
                return self._write_unstorable(outcomes[0], error)
        half = len(outcomes) // 2
        first_written, first_recorded = self._write_splitting(outcomes[:half])
        last_written, last_recorded = self._write_splitting(outcomes[half:])
        return first_written + last_written, first_recorded | last_recorded

    def _write_together(self, outcomes: Sequence[Outcome]) -> set[int]:
        successes = [outcome for outcome in outcomes if isinstance(outcome, Success)]
        failures = [outcome for outcome in outcomes if isinstance(outcome, Failure)]
        return with_database_retry(lambda: self.transitions.record(successes, failures, self.settings.model),
                                   self.settings)

    def _write_unstorable(self, outcome: Outcome, error: Exception) -> tuple[list[Outcome], set[int]]:
        """The one outcome PostgreSQL refuses: its attempt fails instead, as `unstorable_output`."""
        failure = unstorable_failure(outcome.claim, error, self.settings)
        log.warning("request %s attempt %s: %s", outcome.claim.id, outcome.claim.attempt, failure.error_message)
        try:
            return [failure], self._write_together([failure])
        except Exception:  # noqa: BLE001 - as above
            log.exception("could not record the failure of request %s; its lease will expire", outcome.claim.id)
            return [outcome], set()
