"""One thread for many timers: client timeouts, workflow waits, retries and await timeouts.

Callbacks run on the scheduler thread and must be quick (post an event, resolve a future).

>>> import threading
>>> fired = threading.Event()
>>> with Scheduler() as scheduler:
...     _ = scheduler.call_later(0.01, fired.set)
...     fired.wait(2)
True
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("statelink.scheduler")


class Timer:
    """A scheduled call; :meth:`cancel` is cheap (lazy removal) and thread-safe."""

    __slots__ = ("args", "callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[..., Any], args: tuple[Any, ...]):
        self.deadline = deadline
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """A heap of timers served by one daemon thread, started on first use."""

    def __init__(self, name: str = "statelink-timers") -> None:
        self.name = name
        self._heap: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` on the scheduler thread after ``delay`` seconds."""
        timer = Timer(time.monotonic() + max(0.0, delay), callback, args)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (timer.deadline, next(self._counter), timer))
            if self._heap[0][2] is timer:
                self._cond.notify()
        return timer

    def _run(self) -> None:
        heap = self._heap
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    while heap and heap[0][2].cancelled:
                        heapq.heappop(heap)
                    now = time.monotonic()
                    if heap and heap[0][0] <= now:
                        timer = heapq.heappop(heap)[2]
                        break
                    self._cond.wait(heap[0][0] - now if heap else None)
            try:
                timer.callback(*timer.args)
            except Exception:
                log.exception("timer callback failed")

    def close(self) -> None:
        """Stop the thread; pending timers never fire."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
