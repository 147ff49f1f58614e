"""The runner's side of "a device acts at most once per visit": run ids, idempotency keys per
state visit (reused by retries), no cancel on a client-side timeout that the state retries,
``late`` and ``replayed`` journal entries. Real servers on loopback; a device whose handler
appends every invocation to a file, so a test can count what the device did."""

from __future__ import annotations

import re
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import WAIT, journal_entries

from controller import CommandServer, add_device
from controller.runner import RunHandle, WorkflowRunner
from statemachines.device import load_device
from statemachines.workflow import parse_workflow

HANDLERS = '''
import threading
import time
from pathlib import Path

LOG = Path(__file__).with_name("invocations.log")
release = threading.Event()


def work(ctx, hold: bool = True):
    """Counts itself, then holds until released or cancelled."""
    with LOG.open("a") as log:
        log.write("work\\n")
    executions = len(LOG.read_text().splitlines())
    deadline = time.monotonic() + 20
    while hold and not release.is_set() and not ctx.cancelled and time.monotonic() < deadline:
        release.wait(0.02)
    return {"execution": executions, "cancelled": ctx.cancelled}


def quick(ctx):
    return "quick"
'''

DEVICE = """
device: counter
states: [idle, working, fault]
initial: idle
commands:
  work:
    from: "*"
    running: working
    to: idle
    handler: counter_hw:work
    timeout: 30s
    params: {hold: {type: boolean, default: true}}
  quick: {from: "*", handler: counter_hw:quick}
"""

RUN_ID = re.compile(r"^(?P<name>.+)-\d{8}T\d{6}Z-[0-9a-f]{8}$")


class Counter:
    """A server with the counting device; ``executions`` reads the handler's own log."""

    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "counter_hw.py").write_text(HANDLERS)
        (tmp_path / "counter.yaml").write_text(DEVICE)
        self.log = tmp_path / "invocations.log"
        self.server = CommandServer(port=0, grace=0.5)
        runtime = add_device(self.server, load_device(tmp_path / "counter.yaml"))
        self.release: threading.Event = runtime.handlers["work"].__globals__["release"]

    @property
    def executions(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0


@pytest.fixture
def counter(tmp_path: Path) -> Iterator[Counter]:
    device = Counter(tmp_path)
    with device.server:
        yield device
        device.release.set()


@pytest.fixture
def runner() -> Iterator[WorkflowRunner]:
    with WorkflowRunner() as r:
        yield r


class Watch:
    """A run observer: every entry, and an event per (event name, count) reached."""

    def __init__(self, on_entry: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.entries: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.on_entry = on_entry

    def __call__(self, handle: RunHandle, entry: Any) -> None:
        with self.changed:
            self.entries.append(dict(entry))
            self.changed.notify_all()
        if self.on_entry is not None:
            self.on_entry(entry)

    def wait_for(self, event: str, count: int = 1) -> None:
        with self.changed:
            ok = self.changed.wait_for(
                lambda: sum(e["event"] == event for e in self.entries) >= count, timeout=WAIT
            )
        assert ok, f"no {count} {event!r} entries: {self.entries}"

    def of(self, event: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.entries if e["event"] == event]


def workflow(text: str) -> Any:
    return parse_workflow(textwrap.dedent(text))


def start(
    runner: WorkflowRunner, spec: Any, counter: Counter, watch: Watch, tmp_path: Path
) -> RunHandle:
    return runner.start(
        spec,
        servers={"dev": counter.server.address},
        journal=tmp_path / "journal.jsonl",
        observer=watch,
    )


def journal(tmp_path: Path) -> list[dict[str, Any]]:
    """The run's journal without its ``send`` entries (what the run recorded)."""
    return journal_entries(tmp_path / "journal.jsonl")


def test_a_retry_on_timeout_joins_the_running_execution(
    runner: WorkflowRunner, counter: Counter, tmp_path: Path
) -> None:
    """The client gives up after 300 ms, but the retries send the same key: the device acts
    once, nobody cancels it, and the run ends with that one execution's result."""
    spec = workflow("""
        name: joined
        servers: {dev: "127.0.0.1:1"}
        initial: work
        states:
          work:
            command: counter.work
            timeout: 300ms
            retry: {attempts: 50, interval: 50ms, backoff: 1, on: [timeout]}
            next: done
          done: {final: success}
    """)
    watch = Watch()
    handle = start(runner, spec, counter, watch, tmp_path)
    watch.wait_for("error", 3)  # three client-side timeouts, each retried with the same key
    counter.release.set()
    assert handle.wait(WAIT) == "success", watch.entries
    assert counter.executions == 1
    assert handle.context["result"] == {"execution": 1, "cancelled": False}
    entries = journal(tmp_path)
    assert entries[-1]["event"] == "finished"
    key = f"{handle.run_id}:1"
    commands = [e for e in entries if e["event"] in ("reply", "error", "late")]
    assert commands and {e["key"] for e in commands} == {key}
    errors = [e for e in entries if e["event"] == "error"]
    assert len(errors) >= 3 and {e["error"]["kind"] for e in errors} == {"timeout"}
    assert [e["attempt"] for e in errors] == list(range(1, len(errors) + 1))
    for late in (e for e in entries if e["event"] == "late"):  # those before the end, if any
        assert late["result"] == {"execution": 1, "cancelled": False}


def test_a_retry_after_the_execution_ended_gets_its_stored_outcome_replayed(
    runner: WorkflowRunner, counter: Counter, tmp_path: Path
) -> None:
    spec = workflow("""
        name: replayed
        servers: {dev: "127.0.0.1:1"}
        initial: work
        states:
          work:
            command: counter.work
            timeout: 300ms
            retry: {attempts: 2, interval: 2s, on: [timeout]}
            next: done
          done: {final: success}
    """)
    # the first client-side timeout releases the handler: the execution ends during the
    # retry's 2 s delay, so the retry finds its stored outcome
    watch = Watch(lambda entry: counter.release.set() if entry["event"] == "error" else None)
    handle = start(runner, spec, counter, watch, tmp_path)
    assert handle.wait(WAIT) == "success", watch.entries
    assert counter.executions == 1
    entries = journal(tmp_path)
    assert [e["event"] for e in entries] == ["start", "error", "late", "retry", "reply", "finished"]
    error, late, _, reply = entries[1:5]
    key = f"{handle.run_id}:1"
    assert error["error"]["kind"] == "timeout" and error["key"] == key and error["attempt"] == 1
    assert late == {
        "time": late["time"],
        "at": late["at"],
        "state": "work",
        "event": "late",
        "server": "dev",
        "command": "counter.work",
        "key": key,
        "attempt": 1,
        "result": {"execution": 1, "cancelled": False},
    }
    assert reply["replayed"] is True and reply["attempt"] == 2 and reply["key"] == key
    assert reply["result"] == {"execution": 1, "cancelled": False}


def test_leaving_the_state_after_a_client_timeout_cancels_and_journals_the_late_outcome(
    runner: WorkflowRunner, counter: Counter, tmp_path: Path
) -> None:
    """No retry covers the timeout: the run leaves the state, so the command is cancelled on
    the server; its outcome (cancelled) comes later and is journaled as ``late``."""
    spec = workflow("""
        name: left
        servers: {dev: "127.0.0.1:1"}
        initial: work
        states:
          work:
            command: counter.work
            timeout: 300ms
            next: done
            on_error: {timeout: pause}
          pause: {wait: 60s, next: done}
          done: {final: success}
    """)
    watch = Watch()
    handle = start(runner, spec, counter, watch, tmp_path)
    watch.wait_for("late")
    handle.abort()
    assert handle.wait(WAIT) == "aborted"
    late = watch.of("late")[0]
    assert late["state"] == "work" and late["key"] == f"{handle.run_id}:1"
    assert late["attempt"] == 1 and late["error"]["kind"] == "cancelled", late
    assert counter.executions == 1
    events = [e["event"] for e in journal(tmp_path)]
    assert events == ["start", "error", "late", "abort", "finished"]


def test_abort_in_a_retry_delay_cancels_the_command_that_may_still_run(
    runner: WorkflowRunner, counter: Counter, tmp_path: Path
) -> None:
    spec = workflow("""
        name: abort-in-delay
        servers: {dev: "127.0.0.1:1"}
        on_abort: tidy
        initial: work
        states:
          work:
            command: counter.work
            timeout: 300ms
            retry: {attempts: 3, interval: 30s, on: [timeout]}
            next: done
          done: {final: success}
          tidy: {command: counter.quick, timeout: 10s, next: stopped}
          stopped: {final: failure}
    """)
    watch = Watch()
    handle = start(runner, spec, counter, watch, tmp_path)
    watch.wait_for("error")  # attempt 1 timed out on the client; the retry waits 30 s
    handle.abort()
    assert handle.wait(WAIT) == "aborted", watch.entries
    entries = journal(tmp_path)
    late = [e for e in entries if e["event"] == "late"]
    assert len(late) == 1 and late[0]["error"]["kind"] == "cancelled", entries
    assert late[0]["key"] == f"{handle.run_id}:1"
    tidy = [e for e in entries if e["event"] == "reply"]
    assert tidy[0]["command"] == "counter.quick" and tidy[0]["key"] == f"{handle.run_id}:2"
    assert entries[-1]["event"] == "finished" and counter.executions == 1


def test_run_ids_are_unique_and_every_visit_has_its_own_key(
    runner: WorkflowRunner, counter: Counter, tmp_path: Path
) -> None:
    spec = workflow("""
        name: visits
        servers: {dev: "127.0.0.1:1"}
        initial: first
        states:
          first: {command: counter.work, params: {hold: false}, timeout: 10s, next: pause}
          pause: {wait: 10ms, next: second}
          second: {command: counter.work, params: {hold: false}, timeout: 10s, next: done}
          done: {final: success}
    """)
    handles = [runner.start(spec, servers={"dev": counter.server.address}) for _ in range(20)]
    assert all(h.wait(WAIT) == "success" for h in handles)
    ids = [h.run_id for h in handles]
    assert len(set(ids)) == len(ids)
    assert all((m := RUN_ID.match(i)) and m["name"] == "visits" for i in ids), ids
    replies = [e for e in handles[0].history if e["event"] == "reply"]
    assert [e["key"] for e in replies] == [f"{ids[0]}:1", f"{ids[0]}:3"]  # visits 1 and 3
    assert counter.executions == 2 * len(handles)  # every visit acted once
    running = runner.start(spec, servers={"dev": counter.server.address}, run_id="mine")
    with pytest.raises(ValueError, match="'mine' is running already"):
        runner.start(spec, servers={"dev": counter.server.address}, run_id="mine")
    assert running.wait(WAIT) == "success"
