"""The feeder's flow control, with a fake store and engine (pure logic; the real pipeline is tested in
tests/integration and tests/chaos): concurrent slices never overfill the engine, and a slice returns
only once everything it claimed is recorded."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future

from schema.settings import FeederSettings, Settings
from worker.engine.types import Completion
from worker.feeder import Feeder
from worker.transitions import ClaimedRequest


class FakeTransitions:
    """Hands out `total` queued requests, slowly, as Postgres would under load."""

    def __init__(self, total: int):
        self.ids = itertools.count(1)
        self.left = total
        self.lock = threading.Lock()
        self.recorded: list[int] = []

    def claim_next(self, limit: int) -> list[ClaimedRequest]:
        time.sleep(0.01)  # a round trip, during which other slices may claim too
        with self.lock:
            count, self.left = min(limit, self.left), self.left - min(limit, self.left)
            ids = [next(self.ids) for _ in range(count)]
        return [ClaimedRequest(i, "job", i, str(i), "/v1/completions", {"prompt": "x", "max_tokens": 1}, 1, 3,
                               None, 0.0) for i in ids]

    def cached_successes(self, claims):
        return []

    def record(self, successes, failures, model) -> set[int]:
        ids = {outcome.claim.id for outcome in [*successes, *failures]}
        self.recorded.extend(ids)
        return ids


class HeldEngine:
    """Finishes requests only when the test says so; remembers the most it ever held."""

    def __init__(self):
        self.pending: list[Future] = []
        self.most_held = 0
        self.lock = threading.Lock()

    def submit(self, prompt_token_ids, sampling) -> Future:
        future: Future = Future()
        with self.lock:
            self.pending.append(future)
            self.most_held = max(self.most_held, sum(not f.done() for f in self.pending))
        return future

    def finish_all(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for future in pending:
            future.set_result(Completion([1], "y", "length", 1))

    def shutdown(self) -> None:
        pass


class Encoder:
    def encode_many(self, prompts):
        return [[1, 2] for _ in prompts]


def test_slices_claiming_together_stay_within_the_target_depth() -> None:
    settings = FeederSettings.of(Settings(target_queue_depth=64, flush_interval_ms=1, metrics_port=0))
    transitions, engine = FakeTransitions(total=1000), HeldEngine()
    feeder = Feeder(settings, engine, Encoder(), transitions)
    slices = [threading.Thread(target=feeder.run_slice, args=(list(range(250)),)) for _ in range(4)]
    for thread in slices:
        thread.start()
    deadline = time.monotonic() + 30
    while any(thread.is_alive() for thread in slices) and time.monotonic() < deadline:
        time.sleep(0.02)
        engine.finish_all()
    for thread in slices:
        thread.join(1)
    feeder.shutdown()
    assert not any(thread.is_alive() for thread in slices), "a slice never returned"
    assert engine.most_held <= 64, f"the engine held {engine.most_held} requests; the target depth is 64"
    assert sorted(transitions.recorded) == list(range(1, 1001))  # every claimed request recorded, once


class FailableTransitions(FakeTransitions):
    """Also gives back, and remembers what it was given back and which failures were recorded."""

    def __init__(self, total: int):
        super().__init__(total)
        self.failures: list[int] = []
        self.given_back: dict[int, str] = {}

    def record(self, successes, failures, model) -> set[int]:
        self.failures.extend(failure.claim.id for failure in failures)
        return super().record(successes, failures, model)

    def give_back(self, held, failed_here):
        self.given_back.update({claim.id: failed_here.get(claim.id, "circuit open") for claim in held})
        return [claim.id for claim in held], {}

    def failed_elsewhere(self, request_ids):
        return set()

    def claim_ids(self, request_ids):  # the retries of the failures recorded: the test has seen enough
        return []


def start_feeder(total: int, engine, circuit_failures: int = 5):
    settings = FeederSettings.of(Settings(target_queue_depth=8, flush_interval_ms=1, metrics_port=0,
                                          circuit_failures=circuit_failures))
    transitions, opened = FailableTransitions(total), threading.Event()
    feeder = Feeder(settings, engine, Encoder(), transitions, on_circuit_open=opened.set)
    threading.Thread(target=feeder.run_slice, args=(list(range(total)),), daemon=True).start()
    return feeder, transitions, opened


def wait_for(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_device_error_opens_the_circuit_and_everything_held_is_given_back_uncounted() -> None:
    engine = HeldEngine()
    feeder, transitions, opened = start_feeder(6, engine)
    wait_for(lambda: len(engine.pending) == 6)
    engine.pending[0].set_exception(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert opened.wait(10), "the circuit never opened"
    assert sorted(transitions.given_back) == list(range(1, 7)) and transitions.failures == []
    assert transitions.given_back[1].startswith("RuntimeError: CUDA error")
    assert transitions.given_back[2] == "circuit open"
    assert feeder.circuit.is_open


def test_failures_wait_for_a_verdict_and_count_once_another_request_succeeds() -> None:
    engine = HeldEngine()
    feeder, transitions, opened = start_feeder(6, engine)
    wait_for(lambda: len(engine.pending) == 6)
    for future in engine.pending[:4]:  # four in a row: one short of the circuit
        future.set_exception(RuntimeError("boom"))
    time.sleep(0.1)
    assert transitions.failures == [] and not opened.is_set()  # held: the worker or the requests?
    engine.pending[4].set_result(Completion([1], "y", "length", 1))  # the engine works: theirs
    wait_for(lambda: sorted(transitions.failures) == [1, 2, 3, 4])
    # A new run of one that leaves the engine empty: nothing else can judge it, so it counts at once rather
    # than at the next maintenance tick (a small job's failing request would wait a tick per attempt).
    engine.pending[5].set_exception(RuntimeError("boom"))
    wait_for(lambda: 6 in transitions.failures)
    assert not opened.is_set() and transitions.given_back == {}
    feeder.shutdown()


def test_consecutive_failures_across_distinct_requests_open_the_circuit() -> None:
    engine = HeldEngine()
    feeder, transitions, opened = start_feeder(6, engine, circuit_failures=3)
    wait_for(lambda: len(engine.pending) == 6)
    for future in engine.pending[:3]:
        future.set_exception(RuntimeError("boom"))
    assert opened.wait(10), "the circuit never opened"
    assert transitions.failures == [] and sorted(transitions.given_back) == list(range(1, 7))
    assert "3 requests failed in a row" in feeder.circuit.open_reason


def test_only_device_errors_poison_the_device() -> None:
    from worker.circuit import poisons_device
    from worker.engine.types import TransientEngineError

    assert poisons_device(RuntimeError("CUDA error: device-side assert triggered"))
    assert not poisons_device(TransientEngineError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not poisons_device(RuntimeError("CUDA error: out of memory"))
    assert not poisons_device(ValueError("boom"))


def test_a_stopping_worker_claims_nothing_more_and_sends_its_unclaimed_budget_back() -> None:
    settings = FeederSettings.of(Settings(target_queue_depth=8, flush_interval_ms=1, metrics_port=0))
    transitions, engine, republished = FakeTransitions(total=1000), HeldEngine(), []
    feeder = Feeder(settings, engine, Encoder(), transitions,
                    republish=lambda ordinary, groups: republished.extend(ordinary))
    slice_ = threading.Thread(target=feeder.run_slice, args=(list(range(100)),))
    slice_.start()
    wait_for(lambda: engine.most_held == 8)  # the engine full, the slice waiting for room
    feeder.stop_claiming()
    engine.finish_all()  # what it held finishes; nothing more is claimed
    slice_.join(10)
    feeder.shutdown()
    assert not slice_.is_alive(), "the slice kept claiming"
    assert sorted(transitions.recorded) == list(range(1, 9))
    assert len(republished) == 92  # the budget left for another worker
