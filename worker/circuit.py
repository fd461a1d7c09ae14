"""The circuit breaker: a worker whose engine keeps failing stops taking work instead of burning it.

A broken GPU fails every request, and fails it fast, so without a breaker it claims faster than the
healthy workers beside it and dead-letters whole jobs, three attempts each. The breaker opens on an error
that poisons the device (a CUDA illegal memory access or device-side assert leaves the process's CUDA
context unusable: every later call fails) or on `DEEPBATCH_CIRCUIT_FAILURES` consecutive failures across
distinct requests, a success between them resetting the count.

Whose fault is a failure? An attempt counts against a request only when the failure is plausibly its
own. So a failure (other than a permanent one, which is always the request's) is held here, the request
still running, until the engine gives a verdict: a success of another request means the engine works,
and the held failures are recorded as the requests' own; the circuit opening means the worker is at
fault, and they are given back uncounted (worker/transitions.py, GIVE_BACK), as is everything else the
worker holds. With nothing else in the engine to judge by, they are recorded as their own. A request
that fails on a second worker whose circuit opens too is charged (`Transitions.failed_elsewhere`): a
request that breaks every device it touches cannot loop for ever.

Once open, the worker exits with EXIT_CIRCUIT_OPEN, for its supervisor to restart, rather than probing
the device again after a cool-down: a poisoned CUDA context cannot recover within its process, so only a
new process can probe the device — the supervisor's restart is that probe and its backoff the cool-down —
and an exit is what every supervisor, orchestrator and alert already watches for.
"""

from __future__ import annotations

import re
import threading

from worker.transitions import ClaimedRequest

EXIT_CIRCUIT_OPEN = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; the supervisor should restart it

# Errors after which the device is unusable in this process. An out-of-memory error is not one of them.
POISONED_DEVICE = re.compile(r"CUDA error|illegal memory access|device-side assert|CUBLAS_STATUS_|CUDNN_STATUS_|"
                             r"NCCL error|unspecified launch failure", re.IGNORECASE)


def poisons_device(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return bool(POISONED_DEVICE.search(text)) and "out of memory" not in text.lower()


class CircuitBreaker:
    def __init__(self, consecutive_failures: int):
        self.consecutive_failures = consecutive_failures
        self._lock = threading.Lock()
        self._held: dict[int, tuple[ClaimedRequest, BaseException]] = {}  # failures awaiting a verdict
        self.open_reason: str | None = None

    @property
    def is_open(self) -> bool:
        return self.open_reason is not None

    def failed(self, claim: ClaimedRequest, error: BaseException) -> bool:
        """Hold this failure for a verdict; True if it opens the circuit (once: later calls say False)."""
        with self._lock:
            self._held[claim.id] = (claim, error)
            if self.open_reason is not None:
                return False
            if poisons_device(error):
                self.open_reason = f"the engine's device failed: {type(error).__name__}: {error}"
            elif len(self._held) >= self.consecutive_failures:
                self.open_reason = (f"{len(self._held)} requests failed in a row (DEEPBATCH_CIRCUIT_FAILURES="
                                    f"{self.consecutive_failures}), the last with {type(error).__name__}: {error}")
            return self.open_reason is not None

    def succeeded(self) -> list[tuple[ClaimedRequest, BaseException]]:
        """The engine works: the failures held were the requests' own. Returns them, to be recorded."""
        return self._release()

    def judge_alone(self) -> list[tuple[ClaimedRequest, BaseException]]:
        """Nothing else in the engine can give a verdict: the failures held are taken as the requests' own."""
        return self._release()

    def _release(self) -> list[tuple[ClaimedRequest, BaseException]]:
        with self._lock:
            if self.open_reason is not None or not self._held:
                return []
            held, self._held = list(self._held.values()), {}
            return held

    def failures_held(self) -> dict[int, tuple[ClaimedRequest, BaseException]]:
        """Once open: the failures held, by request id."""
        with self._lock:
            return dict(self._held)
