"""Running suspects alone, so that a request that crashes its worker takes no innocent requests with it.

When a worker dies, every request it was running loses an attempt: the culprit cannot be told from its
batch-mates. Those requests come back marked `worker_lost`; each then runs alone — no other request of
this process is claimed or in the engine meanwhile — so the next crash is charged to the culprit only,
and the innocent ones succeed. A readers-writer lock: ordinary requests share it, a suspect takes it
whole. Waiting suspects go first, so a steady stream of ordinary requests cannot starve them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class IsolationLock:
    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting_alone = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._alone and self._waiting_alone == 0)
            self._sharing += 1
        try:
            yield
        finally:
            with self._condition:
                self._sharing -= 1
                self._condition.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._condition:
            self._waiting_alone += 1
            self._condition.wait_for(lambda: not self._alone and self._sharing == 0)
            self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._condition:
                self._alone = False
                self._condition.notify_all()
