"""The feeder: keeps one engine's queue at its target depth with requests claimed from Postgres in batches.

A broker message is a slice: the right to claim up to N requests. The slice's thread claims them a batch
at a time — the most urgent queued requests of the queue, as many as the engine has room for below
`target_queue_depth` — so a high-priority job overtakes a backlog, a cancel stops what is still queued,
and other workers share the rest. Claimed prompts are encoded together and submitted; each finished
request goes to the recorder. The thread returns (and the message is acknowledged) once every request it
claimed is recorded, retries included: a transient failure waits out its backoff queued, then this thread
claims it again by id.

A message naming an `isolation_group` holds suspects: requests lost together with a worker. The group runs
with nothing else in the engine (worker/isolation.py), all of it at once — a hung worker's requests are
finished at full depth, not one by one — so that, should it kill this worker too, only the group is
lost, and it is split (worker/transitions.py, RECLAIM_EXPIRED).

Failures pass through a circuit breaker (worker/circuit.py): a worker whose engine keeps failing stops
claiming, gives back what it holds without counting those attempts, and hands over to `on_circuit_open`.
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

from schema.lines import BodyError, ChatBody, CompletionBody, parse_body
from schema.settings import FeederSettings
from worker import metrics
from worker.choices import gather_choices, submit_choices
from worker.circuit import CircuitBreaker
from worker.engine.types import Completion, PermanentEngineError, SamplingParams
from worker.isolation import IsolationLock
from worker.recorder import Outcome, Recorder
from worker.retries import failure_for, with_database_retry
from worker.sampling import choice_sampling_params
from worker.token_texts import TokenTexts
from worker.transitions import Choice, ClaimedRequest, DeadRequest, Failure, Success, Transitions

log = logging.getLogger(__name__)


class Engine(Protocol):
    max_batch_size: int  # most sequences one step decodes, as the engine chose it

    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Any: ...
    def shutdown(self) -> None: ...


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
    def __init__(self, settings: FeederSettings, engine: Engine, encoder: Any, transitions: Transitions,
                 announce_dead: Any = lambda letters: None, republish: Any = lambda ordinary, groups: None,
                 on_circuit_open: Any = lambda: None):
        self.settings, self.engine, self.encoder, self.transitions = settings, engine, encoder, transitions
        self.token_texts = TokenTexts(encoder)  # log-probabilities' token ids as text, for the results
        self.announce_dead = announce_dead  # copies dead-lettered requests to the broker's dead-letter queue
        self.republish = republish  # publishes given-back requests again: (ordinary ids, isolation groups)
        self.on_circuit_open = on_circuit_open  # called once what this worker held is given back: it exits
        self.circuit = CircuitBreaker(settings.circuit_failures)
        self.isolation = IsolationLock()
        # Claimed, not yet recorded: the claim, its slice, the claim time.
        self.held: dict[int, tuple[ClaimedRequest, SliceTracker, float]] = {}
        self.held_lock = threading.Lock()
        self.room = threading.Condition()
        self.in_engine = 0  # submitted to the engine and not yet finished, or reserved for a claim under way
        self.stopping = False  # the worker is stopping: slices claim nothing more (stop_claiming)
        # Unset: twice the batch the engine chose, so a full batch decodes while the next requests wait. An
        # engine plugged in by DEEPBATCH_ENGINE=module:factory that does not say its batch counts as 32.
        self.target_depth = settings.target_queue_depth or 2 * getattr(engine, "max_batch_size", 32)
        self.recorder = Recorder(transitions, settings, self._on_recorded)
        self.recorder.start()

    # ---- a slice's life (a Celery thread) ----

    def run_slice(self, request_ids: Sequence[int], isolation_group: int | None = None) -> dict[str, int]:
        tracker = SliceTracker()
        with self.isolation.shared() if isolation_group is None else self.isolation.alone():
            if isolation_group is None:
                if unclaimed := self._claim_budget(len(request_ids), tracker):
                    self.republish(list(request_ids[:unclaimed]), {})  # for another worker, now
            else:
                self._start(self._db(lambda: self.transitions.claim_group(request_ids, isolation_group)), tracker)
            while (due := tracker.wait()) is not None:
                self._claim_ids(due, tracker)
        return dict(tracker.counts)

    def _claim_budget(self, budget: int, tracker: SliceTracker) -> int:
        """Claim up to `budget` requests, a batch whenever the engine has room, until none are queued.
        Returns the budget left unclaimed because the worker began to stop (0 otherwise)."""
        while budget > 0 and not self.circuit.is_open:
            reserved = self._reserve_room(budget)
            if not reserved:
                return budget
            claims = []
            try:
                claims = self._db(lambda: self.transitions.claim_next(reserved))
            finally:
                self._release_room(reserved - len(claims))  # the claimed keep their place
            if not claims:
                return 0
            budget -= len(claims)
            self._start(claims, tracker, room_reserved=True)
        return 0

    def _claim_ids(self, request_ids: Sequence[int], tracker: SliceTracker) -> None:
        self._start(self._db(lambda: self.transitions.claim_ids(request_ids)), tracker)

    def _reserve_room(self, wanted: int) -> int:
        """Waits until the engine can take a worthwhile batch — all of `wanted`, or a quarter of the target
        depth, not one request at a time as each finishes — and reserves it, so that slices claiming at the
        same moment do not overfill the engine together. Reserves nothing (0) once the worker is stopping."""
        target = self.target_depth
        worthwhile = min(wanted, max(1, target // 4))
        with self.room:
            self.room.wait_for(lambda: self.stopping or target - self.in_engine >= worthwhile)
            if self.stopping:
                return 0
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
        now = time.monotonic()
        with self.held_lock:  # the circuit opens before what is held is given back, under this lock
            refused = self.circuit.is_open
            if not refused:
                tracker.add(len(claims))
                self.held.update((claim.id, (claim, tracker, now)) for claim in claims)
        if refused:  # claimed as the circuit opened
            self._release_room(len(claims))
            self._give_back(claims, {})
            return
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
        claims, bodies = self._read_bodies(claims)
        prompts = [body.prompt_input() for body in bodies]
        try:
            encoded = self.encoder.encode_many(prompts)
        except Exception:  # noqa: BLE001 - find the culprits one by one; the rest go on
            encoded = [self._encode_one(prompt) for prompt in prompts]
        for claim, body, prompt_token_ids in zip(claims, bodies, encoded):
            try:
                if isinstance(prompt_token_ids, Exception):
                    raise prompt_token_ids
                samplings = choice_sampling_params(body, self.settings.default_max_tokens)
                if len(samplings) == 1:
                    future = self.engine.submit(prompt_token_ids, samplings[0])
                else:
                    futures = submit_choices(self.engine, prompt_token_ids, samplings)
            except Exception as error:  # noqa: BLE001 - judged by the retry policy like any engine error
                self._finished(claim, error=error)
                continue
            if len(samplings) == 1:
                future.add_done_callback(partial(self._on_engine_done, claim))
            else:
                gather_choices(futures, partial(self._on_choices_done, claim))

    def _read_bodies(self, claims: list[ClaimedRequest]) -> tuple[list[ClaimedRequest], list[ChatBody | CompletionBody]]:
        """Each claim's stored body as schema/lines.py reads a request; one that no longer reads (stored by an
        older version) fails as the request's own fault."""
        readable: list[ClaimedRequest] = []
        bodies: list[ChatBody | CompletionBody] = []
        for claim in claims:
            try:
                bodies.append(parse_body(claim.url, claim.body))
            except BodyError as error:
                self._finished(claim, error=PermanentEngineError(f"the stored request is invalid: {error}"))
                continue
            readable.append(claim)
        return readable, bodies

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

    def _on_choices_done(self, claim: ClaimedRequest, completions: list[Completion] | None,
                         error: BaseException | None) -> None:
        """A request of several choices (n > 1): all of them, or the first error (worker/choices.py)."""
        if completions is None:
            self._finished(claim, error=error)
        else:
            self._finished(claim, completion=completions[0], more_choices=completions[1:])

    def _finished(self, claim: ClaimedRequest, completion: Completion | None = None,
                  error: BaseException | None = None, more_choices: Sequence[Completion] = ()) -> None:
        with self.room:
            self.in_engine -= 1
            self.room.notify_all()
        if completion is not None:
            # The request's first choice in the result's own columns, any further one in `choices`; its usage
            # counts the tokens of every choice.
            choices = [Choice(more.text, more.finish_reason, more.completion_tokens,
                              self.token_texts.entries(more.logprobs)) for more in more_choices]
            completion_tokens = completion.completion_tokens + sum(choice.completion_tokens for choice in choices)
            self.recorder.put(Success(claim, completion.text, completion.finish_reason, completion.prompt_tokens,
                                      completion_tokens, logprobs=self.token_texts.entries(completion.logprobs),
                                      choices=choices or None))
            self._record_failures(self.circuit.succeeded())
        elif isinstance(error, PermanentEngineError):  # the request's own fault, whatever the engine's state
            self.recorder.put(failure_for(claim, error, self.settings))
        else:
            assert error is not None
            if not self.circuit.is_open:
                log.warning("request %s attempt %s failed: %r", claim.id, claim.attempt, error)
            if self.circuit.failed(claim, error):  # held for a verdict (worker/circuit.py)
                threading.Thread(target=self._open_circuit, name="deepbatch-circuit").start()
            else:  # nothing left in the engine to give one: judged now, not at the next maintenance tick
                self.judge_failures_alone()

    def _record_failures(self, failures: list[tuple[ClaimedRequest, BaseException]]) -> None:
        for claim, error in failures:
            self.recorder.put(failure_for(claim, error, self.settings))

    def judge_failures_alone(self) -> None:
        """With nothing in the engine to judge them by, the failures held are taken as the requests' own (at
        once when a failure leaves the engine empty, and at each maintenance tick)."""
        with self.room:
            idle = self.in_engine == 0
        if idle:
            self._record_failures(self.circuit.judge_alone())

    # ---- the circuit opened (a thread of its own) ----

    def _open_circuit(self) -> None:
        """Record as their own the failures of requests that already failed on another worker whose circuit
        opened, give back the rest of what this worker holds, uncounted, publish it again for the other
        workers, and hand over to `on_circuit_open`, whatever fails on the way (the leases then expire)."""
        log.error("circuit open: %s; this worker claims no more requests, gives back the ones it holds and "
                  "exits", self.circuit.open_reason)
        metrics.circuit_open.set(1)
        try:
            failures = self.circuit.failures_held()
            own_fault = self._db(lambda: self.transitions.failed_elsewhere(list(failures)))
            self._record_failures([failures[request_id] for request_id in own_fault])
            failed_here = {request_id: f"{type(error).__name__}: {error}"
                           for request_id, (_, error) in failures.items() if request_id not in own_fault}
            self.recorder.stop()  # what finished is written; what is still held is given back below
            with self.held_lock:
                held = [claim for claim, _, _ in self.held.values()]
            self._give_back(held, failed_here)
        except Exception:  # noqa: BLE001 - the worker stops all the same; its leases will expire
            log.exception("could not give back the requests this worker holds; their leases will expire")
        finally:
            self.on_circuit_open()

    def _give_back(self, claims: list[ClaimedRequest], failed_here: dict[int, str]) -> None:
        ordinary, groups = self._db(lambda: self.transitions.give_back(claims, failed_here))
        given = len(ordinary) + sum(len(group) for group in groups.values())
        metrics.given_back.inc(given)
        log.error("circuit open: gave back %d requests, their attempts not counted", given)
        self.republish(ordinary, groups)

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
                _, tracker, claimed_at = holder
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

    def stop_claiming(self) -> None:
        """The worker begins to stop: its slices claim nothing more and send their unclaimed budget back to the
        broker, so that a warm shutdown waits only for what the engine already holds (before, a stopping
        worker claimed and ran every slice it had taken: hundreds of requests, up to half a minute)."""
        with self.room:
            self.stopping = True
            self.room.notify_all()

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
