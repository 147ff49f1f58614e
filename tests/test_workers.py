"""The worker pool (controller/workers.py): shutdown takes the jobs that have not started off
the queue, so they never run, and gives each of them exactly one outcome; on a real
CommandServer, stop() answers such requests with the cancelled error and never runs them.

Every wait is on an event, a future or a thread join, bounded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from reliability_helpers import serve, write_device
from support import WAIT, wait_until
from support import RawConnection as Raw

from controller import Client
from controller.devices import add_device
from controller.errors import CancelledError
from controller.workers import NotStarted, PoolClosed, PoolFull, WorkerPool
from statemachines.device import load_device
from statemachines.errorkinds import CANCELLED


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in its own thread (the pool's outcomes run there)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)
    loop.close()


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` on the loop thread (where the pool is used) and return its result."""
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return future.result(WAIT)


def test_shutdown_takes_queued_jobs_off_they_never_run_and_each_gets_one_outcome(loop):
    pool = on_loop(loop, lambda: WorkerPool(loop, size=1, max_queue=10))
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []
    outcomes: dict[Any, list[tuple[Any, BaseException | None]]] = {}
    blocker_done = threading.Event()

    def record(key: Any) -> Callable[[Any, BaseException | None], None]:
        def done(result: Any, exc: BaseException | None) -> None:
            outcomes.setdefault(key, []).append((result, exc))
            if key == "blocker":
                blocker_done.set()

        return done

    def blocker() -> str:
        started.set()
        release.wait(WAIT)
        return "finished"

    on_loop(loop, lambda: pool.submit(blocker, (), {}, record("blocker")))
    assert started.wait(WAIT)  # the only thread is busy: what follows waits in the queue
    for i in range(5):
        on_loop(loop, lambda i=i: pool.submit(ran.append, (i,), {}, record(i)))

    error = RuntimeError("stopped before it started")
    assert on_loop(loop, lambda: pool.shutdown(error=error)) == 5
    # on the loop thread, the outcomes of the jobs taken off are delivered before it returns
    assert outcomes == {i: [(None, error)] for i in range(5)}
    with pytest.raises(PoolClosed) as info:
        on_loop(loop, lambda: pool.submit(ran.append, (99,), {}, record(99)))
    assert isinstance(info.value, PoolFull)  # callers answer it as busy

    release.set()  # the running job finishes and is delivered as usual
    assert blocker_done.wait(WAIT)
    for thread in pool._threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    assert ran == []  # nothing that was queued ran, before or after the threads stopped
    assert outcomes["blocker"] == [("finished", None)]
    assert set(outcomes) == {"blocker", 0, 1, 2, 3, 4}  # exactly one outcome each
    assert on_loop(loop, lambda: pool.pending) == 0
    assert on_loop(loop, lambda: pool.shutdown()) == 0  # idempotent


def test_shutdown_from_another_thread_delivers_through_the_loop(loop):
    pool = on_loop(loop, lambda: WorkerPool(loop, size=1, max_queue=10))
    started, release = threading.Event(), threading.Event()
    delivered: Future[tuple[Any, BaseException | None, bool]] = Future()

    def blocker() -> None:
        started.set()
        release.wait(WAIT)

    def done(result: Any, exc: BaseException | None) -> None:
        loop_thread = asyncio.get_running_loop() is loop
        delivered.set_result((result, exc, loop_thread))

    on_loop(loop, lambda: pool.submit(blocker, (), {}, lambda r, e: None))
    assert started.wait(WAIT)
    on_loop(loop, lambda: pool.submit(lambda: "ran", (), {}, done))
    assert pool.shutdown() == 1  # from this (the test's) thread
    result, exc, loop_thread = delivered.result(WAIT)
    assert result is None and isinstance(exc, PoolClosed) and loop_thread
    release.set()
    for thread in pool._threads:
        thread.join(WAIT)
        assert not thread.is_alive()


def test_stop_answers_requests_still_queued_for_a_worker_and_never_runs_them():
    """Two workers: once the loop is gone, the first to finish its job exits on the closed
    loop, and the second (its wake-up already counted as pending) would go on to the queue."""
    ran: list[int] = []
    with serve(workers=2) as server:
        server.add_command("record", ran.append)
        with Raw(server.address) as raw:
            for i in range(2):
                raw.request("hang", [30], id=f"hang-{i}")  # both worker threads are blocked
            for i in range(5):
                raw.request("record", [i], id=f"queued-{i}")
            assert raw.call("rpc.ping")["result"] == "pong"  # all of them are dispatched
            assert server.pool.pending == 7
            server.stop(grace=0.1)
            replies = {}
            for _ in range(7):
                reply = raw.json()
                replies[reply["id"]] = reply
            assert raw.closed(WAIT)
        assert set(replies) == {"hang-0", "hang-1", *(f"queued-{i}" for i in range(5))}
        for reply in replies.values():  # one reply each, the documented shutdown error
            assert reply["error"]["code"] == CANCELLED, reply
            assert reply["error"]["data"] == {"reason": "shutdown"}
        server.test_release.set()  # the workers finish "hang"; nothing queued is left to run
        for thread in server.pool._threads:
            thread.join(WAIT)
            assert not thread.is_alive()
        assert ran == []


def test_a_device_command_queued_for_a_worker_at_stop_is_cancelled_not_faulted(tmp_path):
    """The device command never ran: its device goes back to where it was, not to fault."""
    spec = load_device(write_device(tmp_path))
    with serve(workers=1) as server:
        device = add_device(server, spec)
        with Client(server.address, reconnect=False) as client:
            hung = client.send_command("hang", [30], timeout=WAIT)
            wait_until(lambda: server.pool.pending == 1, what="hang to be dispatched")
            queued = client.send_command("testdev.slow", {"seconds": 5}, timeout=WAIT)
            wait_until(lambda: device.state == "busy", what="the device command to begin")
            assert server.pool.pending == 2  # it waits for the only worker thread
            server.stop(grace=0.1)
            for future in (hung, queued):
                with pytest.raises(CancelledError) as info:
                    future.result(WAIT)
                assert info.value.code == CANCELLED
                assert info.value.data == {"reason": "shutdown"}
        assert device.state == "idle"


def test_a_gate_that_says_no_skips_the_job_with_not_started(loop):
    pool = on_loop(loop, lambda: WorkerPool(loop, size=1, max_queue=10))
    outcomes: Future[tuple[Any, BaseException | None]] = Future()
    passed: Future[tuple[Any, BaseException | None]] = Future()
    ran: list[str] = []
    on_loop(
        loop,
        lambda: pool.submit(
            ran.append, ("no",), {}, lambda r, e: outcomes.set_result((r, e)), lambda: False
        ),
    )
    on_loop(
        loop,
        lambda: pool.submit(
            ran.append, ("yes",), {}, lambda r, e: passed.set_result((r, e)), lambda: True
        ),
    )
    result, exc = outcomes.result(WAIT)
    assert result is None and isinstance(exc, NotStarted)
    assert passed.result(WAIT) == (None, None)
    assert ran == ["yes"]
    assert on_loop(loop, lambda: pool.pending) == 0  # a skipped job is delivered like any
    pool.shutdown(wait=WAIT)
