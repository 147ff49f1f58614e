"""The timer scheduler (controller/scheduler.py): cancelled timers do not pile up in the heap
until their deadline; the heap is rebuilt without them once they are more than half of it.

Every wait is on an event, bounded.
"""

from __future__ import annotations

import threading

from support import WAIT

from controller.scheduler import COMPACT_MIN, Scheduler

HOUR = 3600.0


def count_is_exact(scheduler: Scheduler) -> bool:
    """The scheduler's count of cancelled timers matches its heap (read under its lock: the
    scheduler thread may be dropping cancelled timers from the top at the same moment)."""
    with scheduler._lock:
        return scheduler._cancelled == sum(1 for entry in scheduler._heap if entry[2].cancelled)


def test_ten_thousand_cancelled_long_timers_do_not_grow_the_heap():
    with Scheduler() as scheduler:
        peak = 0
        for _ in range(10_000):
            scheduler.call_later(HOUR, lambda: None).cancel()
            peak = max(peak, len(scheduler._heap))
        assert peak <= COMPACT_MIN
        assert len(scheduler._heap) < COMPACT_MIN
        assert count_is_exact(scheduler)


def test_cancelling_many_at_once_compacts_and_keeps_the_live_timers():
    with Scheduler() as scheduler:
        fired = threading.Event()
        live = [scheduler.call_later(HOUR + i, lambda: None) for i in range(100)]
        doomed = [scheduler.call_later(HOUR, lambda: None) for _ in range(10_000)]
        soon = scheduler.call_later(0.01, fired.set)
        for timer in doomed:
            timer.cancel()
        heap = scheduler._heap
        assert len(heap) <= 2 * (len(live) + 1) + 1  # live ones plus at most as many dead
        in_heap = {id(entry[2]) for entry in heap}
        assert all(id(timer) in in_heap for timer in live)
        assert count_is_exact(scheduler)
        assert fired.wait(WAIT)  # the heap order survived the rebuild
        assert soon.scheduler is None  # fired: it left the heap
        soon.cancel()  # cancelling a timer that already fired counts nothing
        assert count_is_exact(scheduler)


def test_concurrent_cancels_keep_the_count_exact_and_the_heap_bounded():
    with Scheduler() as scheduler:
        barrier = threading.Barrier(4)
        peaks: list[int] = []

        def churn() -> None:
            barrier.wait(WAIT)
            peak = 0
            for _ in range(2_500):
                scheduler.call_later(HOUR, lambda: None).cancel()
                peak = max(peak, len(scheduler._heap))
            peaks.append(peak)

        threads = [threading.Thread(target=churn) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
            assert not thread.is_alive()
        assert max(peaks) <= COMPACT_MIN + 4  # each thread adds at most one before cancelling
        assert count_is_exact(scheduler)
