"""Running suspects apart, so that a request that crashes its worker takes no other requests with it.

When a worker is lost, the culprit (if a request was one) cannot be told from its batch-mates: they come
back together as an isolation group (worker/transitions.py), which runs with no other request of this
process claimed or in the engine meanwhile, so that a second loss falls on the group alone, which is then
split. A readers-writer lock: ordinary slices share it, a group takes it whole. Waiting groups go first,
so a steady stream of ordinary requests cannot starve them.
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
