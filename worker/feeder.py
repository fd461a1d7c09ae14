"""The feeder: keeps one engine's queue at its target depth with requests claimed from Postgres in batches.

A broker message is a slice: the right to claim up to N requests. The slice's thread claims them a batch
at a time — the most urgent queued requests of the queue, as many as the engine has room for below
`target_queue_depth` — so a high-priority job overtakes a backlog, a cancel stops what is still queued,
and other workers share the rest. Claimed prompts are encoded together and submitted; each finished
request goes to the recorder. The thread returns (and the message is acknowledged) once every request it
claimed is recorded, retries included: a transient failure waits out its backoff queued, then this thread
claims it again by id.

A message marked `isolate` holds one suspect (its last worker died while running it): it runs alone,
with nothing else in the engine (worker/isolation.py), so a request that kills its worker takes no
innocent requests with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from typing import Any, Protocol

from schema.lines import CHAT_URL
from schema.settings import Settings
from worker import metrics
from worker.engine.types import Completion, PermanentEngineError, SamplingParams
from worker.isolation import IsolationLock
from worker.recorder import Outcome, Recorder
from worker.retries import failure_for, with_database_retry
from worker.transitions import ClaimedRequest, DeadRequest, Failure, Success, Transitions

log = logging.getLogger(__name__)


class Engine(Protocol):
    max_batch_size: int  # most sequences one step decodes, as the engine chose it

    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Any: ...
    def shutdown(self) -> None: ...


def sampling_from_body(body: dict[str, Any], default_max_tokens: int) -> SamplingParams:
    """OpenAI defaults: temperature 1 and top_p 1 unless the request says otherwise."""
    stop = body.get("stop") or []
    return SamplingParams(
        max_tokens=body.get("max_tokens") or body.get("max_completion_tokens") or default_max_tokens,
        temperature=body.get("temperature", 1.0),
        top_p=body.get("top_p", 1.0),
        top_k=body.get("top_k", 0),
        seed=body.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
    )


class SliceTracker:
    """One slice's requests in this worker: how many are unrecorded, which retries are due when."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.outstanding = 0
        self.retries: list[tuple[float, int]] = []  # (monotonic time due, request id)
        self.counts: Counter[str] = Counter()

    def add(self, count: int) -> None:
        with self.condition:
            self.outstanding += count

    def count(self, outcome: str, requests: int) -> None:
        """Requests that ended without being claimed here (dead-lettered at the claim)."""
        with self.condition:
            self.counts[outcome] += requests

    def settle(self, outcome: str, request_id: int, retry_after_s: float = 0.0) -> None:
        with self.condition:
            self.outstanding -= 1
            self.counts[outcome] += 1
            if outcome == "retried":
                self.retries.append((time.monotonic() + retry_after_s, request_id))
            self.condition.notify_all()

    def wait(self) -> list[int] | None:
        """Blocks until retries are due (returns their ids) or nothing is left (returns None)."""
        with self.condition:
            while True:
                now = time.monotonic()
                due = [request_id for when, request_id in self.retries if when <= now]
                if due:
                    self.retries = [(when, request_id) for when, request_id in self.retries if when > now]
                    return due
                if self.outstanding == 0 and not self.retries:
                    return None
                next_due = min((when for when, _ in self.retries), default=None)
                self.condition.wait(None if next_due is None else next_due - now)


class Feeder:
    def __init__(self, settings: Settings, engine: Engine, encoder: Any, transitions: Transitions,
                 announce_dead: Any = lambda letters: None):
        self.settings, self.engine, self.encoder, self.transitions = settings, engine, encoder, transitions
        self.announce_dead = announce_dead  # copies dead-lettered requests to the broker's dead-letter queue
        self.isolation = IsolationLock()
        self.held: dict[int, tuple[SliceTracker, float]] = {}  # claimed, not yet recorded: slice, claim time
        self.held_lock = threading.Lock()
        self.room = threading.Condition()
        self.in_engine = 0  # submitted to the engine and not yet finished, or reserved for a claim under way
        # Unset: twice the batch the engine chose, so a full batch decodes while the next requests wait. An
        # engine plugged in by DEEPBATCH_ENGINE=module:factory that does not say its batch counts as 32.
        self.target_depth = settings.target_queue_depth or 2 * getattr(engine, "max_batch_size", 32)
        self.recorder = Recorder(transitions, settings, self._on_recorded)
        self.recorder.start()

    # ---- a slice's life (a Celery thread) ----

    def run_slice(self, request_ids: Sequence[int], isolate: bool = False) -> dict[str, int]:
        tracker = SliceTracker()
        with self.isolation.alone() if isolate else self.isolation.shared():
            if isolate:
                self._claim_ids(request_ids, tracker)
            else:
                self._claim_budget(len(request_ids), tracker)
            while (due := tracker.wait()) is not None:
                self._claim_ids(due, tracker)
        return dict(tracker.counts)

    def _claim_budget(self, budget: int, tracker: SliceTracker) -> None:
        """Claim up to `budget` requests, a batch whenever the engine has room, until none are queued."""
        while budget > 0:
            reserved = self._reserve_room(budget)
            claims = []
            try:
                claims = self._db(lambda: self.transitions.claim_next(reserved))
            finally:
                self._release_room(reserved - len(claims))  # the claimed keep their place
            if not claims:
                return
            budget -= len(claims)
            self._start(claims, tracker, room_reserved=True)

    def _claim_ids(self, request_ids: Sequence[int], tracker: SliceTracker) -> None:
        claims, dead = self._db(lambda: self.transitions.claim_ids(request_ids))
        if dead:
            self._announce(dead)
            tracker.count("dead", len(dead))
        self._start(claims, tracker)

    def _reserve_room(self, wanted: int) -> int:
        """Waits until the engine can take a worthwhile batch — all of `wanted`, or a quarter of the target
        depth, not one request at a time as each finishes — and reserves it, so that slices claiming at the
        same moment do not overfill the engine together."""
        target = self.target_depth
        worthwhile = min(wanted, max(1, target // 4))
        with self.room:
            self.room.wait_for(lambda: target - self.in_engine >= worthwhile)
            reserved = min(wanted, target - self.in_engine)
            self.in_engine += reserved
            return reserved

    def _release_room(self, reserved: int) -> None:
        """Gives back room (a negative count takes it: requests claimed by id, outside any reservation)."""
        if not reserved:
            return
        with self.room:
            self.in_engine -= reserved
            self.room.notify_all()

    def _db(self, operation: Any) -> Any:
        return with_database_retry(operation, self.settings)

    # ---- into the engine ----

    def _start(self, claims: list[ClaimedRequest], tracker: SliceTracker, room_reserved: bool = False) -> None:
        if not claims:
            return
        if not room_reserved:
            self._release_room(-len(claims))
        tracker.add(len(claims))
        now = time.monotonic()
        with self.held_lock:
            self.held.update((claim.id, (tracker, now)) for claim in claims)
        metrics.in_flight.inc(len(claims))
        for claim in claims:
            if claim.attempt == 1:
                metrics.queue_wait.observe(claim.queued_seconds)
        hits = self._db(lambda: self.transitions.cached_successes(claims))
        self._release_room(len(hits))  # answered without the engine
        for hit in hits:
            self.recorder.put(hit)
        hit_ids = {hit.claim.id for hit in hits}
        self._submit([claim for claim in claims if claim.id not in hit_ids])

    def _submit(self, claims: list[ClaimedRequest]) -> None:
        prompts = [claim.body["messages"] if claim.url == CHAT_URL else claim.body["prompt"] for claim in claims]
        try:
            encoded = self.encoder.encode_many(prompts)
        except Exception:  # noqa: BLE001 - find the culprits one by one; the rest go on
            encoded = [self._encode_one(prompt) for prompt in prompts]
        for claim, prompt_token_ids in zip(claims, encoded):
            try:
                if isinstance(prompt_token_ids, Exception):
                    raise prompt_token_ids
                sampling = sampling_from_body(claim.body, self.settings.default_max_tokens)
                future = self.engine.submit(prompt_token_ids, sampling)
            except Exception as error:  # noqa: BLE001 - judged by the retry policy like any engine error
                self._finished(claim, error=error)
                continue
            future.add_done_callback(partial(self._on_engine_done, claim))

    def _encode_one(self, prompt: Any) -> list[int] | Exception:
        try:
            return self.encoder.encode_many([prompt])[0]
        except Exception as error:  # noqa: BLE001
            return PermanentEngineError(f"the prompt cannot be encoded: {error}")

    def _on_engine_done(self, claim: ClaimedRequest, future: Any) -> None:
        """Runs on the engine's step loop: hand over and return."""
        try:
            completion = future.result()
        except BaseException as error:  # noqa: BLE001
            self._finished(claim, error=error)
        else:
            self._finished(claim, completion=completion)

    def _finished(self, claim: ClaimedRequest, completion: Completion | None = None,
                  error: BaseException | None = None) -> None:
        with self.room:
            self.in_engine -= 1
            self.room.notify_all()
        if completion is not None:
            self.recorder.put(Success(claim, completion.text, completion.finish_reason, completion.prompt_tokens,
                                      completion.completion_tokens))
        else:
            assert error is not None
            if not isinstance(error, PermanentEngineError):
                log.warning("request %s attempt %s failed: %r", claim.id, claim.attempt, error)
            self.recorder.put(failure_for(claim, error, self.settings))

    # ---- out of the recorder (the recorder's thread) ----

    def _on_recorded(self, batch: Sequence[Outcome], recorded: set[int]) -> None:
        now = time.monotonic()
        with self.held_lock:
            held = [self.held.pop(outcome.claim.id, None) for outcome in batch]
        metrics.in_flight.dec(sum(holder is not None for holder in held))
        dead = []
        for outcome, holder in zip(batch, held):
            name = outcome_name(outcome) if outcome.claim.id in recorded else "lost"
            count_outcome(outcome, name)
            if name == "dead":
                dead.append(DeadRequest(outcome.claim.id, outcome.claim.job_id, outcome.claim.attempt,
                                        f"{outcome.error_code}: {outcome.error_message}"))
            if holder is not None:
                tracker, claimed_at = holder
                metrics.request_latency.observe(now - claimed_at)
                retry_after = outcome.retry_after_s if isinstance(outcome, Failure) else 0.0
                tracker.settle(name, outcome.claim.id, retry_after)
        if dead:
            self._announce(dead)

    def _announce(self, letters: list[DeadRequest]) -> None:
        metrics.dead_letters.inc(len(letters))
        try:
            self.announce_dead([asdict(letter) for letter in letters])
        except Exception:  # noqa: BLE001 - Postgres holds the dead letters; the broker copy is a convenience
            log.exception("could not copy %d dead letters to the broker", len(letters))

    def held_request_ids(self) -> list[int]:
        with self.held_lock:
            return list(self.held)

    def shutdown(self) -> None:
        self.recorder.stop()
        self.engine.shutdown()


def outcome_name(outcome: Outcome) -> str:
    if isinstance(outcome, Success):
        return "succeeded"
    return {"queued": "retried", "dead": "dead", "failed": "failed"}[outcome.to_state.value]


def count_outcome(outcome: Outcome, name: str) -> None:
    if name == "retried":
        metrics.retries.inc()
        return
    metrics.requests_finished.labels(name).inc()
    if isinstance(outcome, Success) and name == "succeeded":
        if outcome.cached_from is not None:
            metrics.cache_hits.inc()
        else:
            metrics.generated_tokens.inc(outcome.completion_tokens)
            metrics.prompt_tokens.inc(outcome.prompt_tokens)
