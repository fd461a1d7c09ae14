"""The isolation lock: suspects run alone, ordinary requests together, waiting suspects go first."""

from __future__ import annotations

import threading
import time

from worker.isolation import IsolationLock


def test_ordinary_holders_share_and_a_suspect_waits_for_them_all() -> None:
    lock, events = IsolationLock(), []
    release = threading.Event()

    def ordinary(name: str) -> None:
        with lock.shared():
            events.append(f"{name} in")
            release.wait()
            events.append(f"{name} out")

    def suspect() -> None:
        with lock.alone():
            events.append("suspect in")
            events.append("suspect out")

    threads = [threading.Thread(target=ordinary, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    assert sorted(events) == ["a in", "b in"]  # shared
    waiting_suspect = threading.Thread(target=suspect)
    waiting_suspect.start()
    time.sleep(0.05)
    late = threading.Thread(target=ordinary, args=("late",))
    late.start()
    time.sleep(0.05)
    assert "suspect in" not in events and "late in" not in events  # the suspect waits; so does a newcomer
    release.set()
    for thread in [*threads, waiting_suspect, late]:
        thread.join(2)
    assert events.index("suspect in") > max(events.index("a out"), events.index("b out"))
    assert events.index("late in") > events.index("suspect out")  # the waiting suspect went first
