"""Notifications and awaits at scale: the runner hands a notification only to the runs awaiting
it now (an index by server address and method), keeps a bounded queue of them (timers and
replies are never dropped, timers go first), and unsubscribes when no run awaits a method."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import WAIT, wait_until

from controller import CommandServer
from controller.runner import RunHandle, WorkflowRunner
from statemachines.workflow import parse_workflow

METHOD = "x.ready"


def workflow(name: str, first: str, states: str) -> Any:
    text = f'name: {name}\nservers:\n  s: "127.0.0.1:1"\ninitial: {first}\nstates:\n{states}'
    return parse_workflow(text, f"{name}.yaml")


#: awaits x.ready with n == 2 (long timeout), then succeeds
AWAIT_TWO = workflow(
    "await_two",
    "listen",
    f"  listen: {{await: {METHOD}, if: 'params.n == 2', timeout: 60s, next: done}}\n"
    "  done: {final: success}\n",
)
#: waits first (awaiting nothing), then awaits x.ready
WAIT_FIRST = workflow(
    "wait_first",
    "pause",
    "  pause: {wait: 60s, next: listen}\n"
    f"  listen: {{await: {METHOD}, timeout: 60s, next: done}}\n"
    "  done: {final: success}\n",
)
#: awaits x.ready with a condition that never holds (short timeout), then waits
LEAVES = workflow(
    "leaves",
    "listen",
    f"  listen: {{await: {METHOD}, if: 'params.n == -1', timeout: 300ms, next: done, "
    "on_error: {timeout: idle}}\n"
    "  idle: {wait: 60s, next: done}\n"
    "  done: {final: success}\n",
)


@pytest.fixture
def server() -> Iterator[CommandServer]:
    with CommandServer(port=0, grace=0.5) as srv:
        srv.add_command("noop", lambda: True)
        yield srv


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[WorkflowRunner]:
    with WorkflowRunner(state_dir=tmp_path / "state") as r:
        yield r


def publish(server: CommandServer, *params: dict[str, Any]) -> None:
    def send() -> None:
        for p in params:
            server.publish(METHOD, p)

    server.call_soon(send)


def subscribers(server: CommandServer) -> int:
    return sum(METHOD in session.subscriptions for session in list(server.sessions))


def start(runner: WorkflowRunner, spec: Any, server: CommandServer) -> RunHandle:
    return runner.start(spec, servers={"s": server.address}, journal=False)


class Spy:
    """Counts the notifications the runner hands to one run (then passes them on)."""

    def __init__(self, handle: RunHandle) -> None:
        self.seen: list[Any] = []
        run = handle.run
        original = run.on_notification

        def spy(server: str, method: str, params: Any) -> None:
            self.seen.append(params)
            original(server, method, params)

        run.on_notification = spy  # type: ignore[method-assign]


def test_only_runs_awaiting_now_get_a_notification(
    runner: WorkflowRunner, server: CommandServer
) -> None:
    awaiting, pausing, leaving = (
        start(runner, AWAIT_TWO, server),
        start(runner, WAIT_FIRST, server),
        start(runner, LEAVES, server),
    )
    spies = {h.run_id: Spy(h) for h in (awaiting, pausing, leaving)}
    wait_until(lambda: awaiting.run.awaiting == ("s", METHOD), what="the first run awaits")
    wait_until(lambda: leaving.state == "idle", what="the third run left its await")
    assert leaving.run.awaiting is None and pausing.run.awaiting is None
    assert pausing.state == "pause"

    publish(server, {"n": 1})
    wait_until(lambda: spies[awaiting.run_id].seen == [{"n": 1}], what="delivery")
    publish(server, {"n": 2})  # the awaiting run takes it and finishes
    assert awaiting.wait(WAIT) == "success"

    # a sync point: a fresh awaiting run gets n=3; nobody else did
    witness = start(runner, AWAIT_TWO, server)
    witness_spy = Spy(witness)
    wait_until(lambda: witness.run.awaiting == ("s", METHOD), what="the witness awaits")
    publish(server, {"n": 3})
    wait_until(lambda: witness_spy.seen == [{"n": 3}], what="delivery to the witness")
    assert spies[awaiting.run_id].seen == [{"n": 1}, {"n": 2}]  # nothing after it finished
    assert spies[pausing.run_id].seen == []  # never awaited
    assert spies[leaving.run_id].seen == []  # left its await before the first one
    assert [e["event"] for e in leaving.history].count("notification") == 0
    for handle in (pausing, leaving, witness):
        handle.abort()
        assert handle.wait(WAIT) == "aborted"


def test_unsubscribes_when_nothing_awaits_and_subscribes_again(
    runner: WorkflowRunner, server: CommandServer
) -> None:
    runner.unsubscribe_after = 0.0
    first = start(runner, AWAIT_TWO, server)
    wait_until(lambda: first.run.awaiting is not None, what="the run awaits")
    wait_until(lambda: subscribers(server) == 1, what="subscribed")
    publish(server, {"n": 2})
    assert first.wait(WAIT) == "success"
    wait_until(lambda: subscribers(server) == 0, what="unsubscribed once nothing awaits")

    # a run that awaits later (after a wait): subscribed again when it enters its await
    later = start(runner, LEAVES, server)  # leaves its await after 300 ms
    wait_until(lambda: later.state == "idle", what="the run left its await")
    wait_until(lambda: subscribers(server) == 0, what="unsubscribed again")
    again = start(runner, AWAIT_TWO, server)
    wait_until(lambda: again.run.awaiting is not None, what="the run awaits")
    wait_until(lambda: subscribers(server) == 1, what="subscribed again")
    publish(server, {"n": 2})
    assert again.wait(WAIT) == "success"
    later.abort()
    assert later.wait(WAIT) == "aborted"


def test_the_notification_queue_is_bounded_and_timers_go_first(
    runner: WorkflowRunner, server: CommandServer
) -> None:
    runner.max_queued_notifications = 5
    handle = start(runner, AWAIT_TWO, server)
    spy = Spy(handle)
    wait_until(lambda: handle.run.awaiting is not None, what="the run awaits")
    wait_until(lambda: subscribers(server) == 1, what="subscribed")

    release, blocked = threading.Event(), threading.Event()
    order: list[str] = []

    def block() -> None:
        blocked.set()
        release.wait(WAIT)

    runner.post(block)
    assert blocked.wait(WAIT)
    publish(server, *({"n": 100 + i} for i in range(20)))
    wait_until(lambda: runner.notifications_dropped == 15, what="15 dropped")
    assert runner.notifications_waiting == 5
    runner.post(order.append, "event")  # queued after the 5 notifications: never dropped
    runner.post_timer(order.append, "timer")  # ahead of everything queued
    release.set()
    wait_until(lambda: order == ["timer", "event"], what="the timer first, then the event")
    assert [p["n"] for p in spy.seen] == [100, 101, 102, 103, 104]  # the oldest, in order
    assert runner.notifications_waiting == 0
    publish(server, {"n": 2})  # the queue works again: the run takes it
    assert handle.wait(WAIT) == "success"
    assert runner.notifications_dropped == 15
