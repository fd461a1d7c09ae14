"""The feeder's flow control, with a fake store and engine (pure logic; the real pipeline is tested in
tests/integration and tests/chaos): concurrent slices never overfill the engine, and a slice returns
only once everything it claimed is recorded."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future

from schema.settings import Settings
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
    settings = Settings(target_queue_depth=64, flush_interval_ms=1, metrics_port=0)
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
