"""A device command runs once (issue 11, docs/reliability.md "At most once"): real
``statelink serve`` processes with a state directory, real ``statelink run`` processes or an
in-process :class:`~controller.runner.WorkflowRunner`, and a :class:`FaultProxy` between
them that partitions, delays and drops. The device's handlers log every invocation
(:func:`write_counting_device`), so each test counts what the device really did.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import (
    REPO,
    ChildServer,
    FaultProxy,
    executions,
    write_counting_device,
)
from support import WAIT, wait_until
from support import RawConnection as Raw

from controller import Client, CommandTimeoutError, RpcError
from controller.runner import RunHandle, WorkflowRunner
from statemachines import errorkinds as ek
from statemachines.workflow import parse_workflow

FRAME_LIMIT = 1048576  #: the server's default max_frame


# -- servers, runs and journals ----------------------------------------------------------------
class Servers:
    """Starts ``statelink serve`` children on one state directory; kills them at the end."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path
        self.state_dir = tmp_path / "state"
        self.children: list[ChildServer] = []

    def start(self, *args: str, devices: tuple[str, ...] = ("counter",)) -> ChildServer:
        argv = ["serve", "--port", "0", "--state-dir", str(self.state_dir), *args]
        for name in devices:
            argv += ["--device", str(write_counting_device(self.dir, name))]
        child = ChildServer("cli", argv, self.dir / "server.log").start()
        self.children.append(child)
        return child

    def kill_all(self) -> None:
        for child in self.children:
            child.kill()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    group = Servers(tmp_path)
    yield group
    group.kill_all()


@pytest.fixture
def runner() -> Iterator[WorkflowRunner]:
    with WorkflowRunner() as workflow_runner:
        yield workflow_runner


def address_of(proxy_or_server: FaultProxy | ChildServer) -> str:
    host, port = proxy_or_server.address
    return f"{host}:{port}"


def start_run(
    runner: WorkflowRunner, tmp_path: Path, name: str, text: str, address: str
) -> tuple[RunHandle, Path]:
    """Start the workflow ``text`` (``{address}`` filled in); its journal file."""
    spec = parse_workflow(text.format(address=address), str(tmp_path / f"{name}.yaml"))
    journal = tmp_path / f"{name}.jsonl"
    return runner.start(spec, journal=journal), journal


def entries(journal: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]


def of(journal: Path, event: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in entries(journal)
        if e["event"] == event and all(e.get(k) == v for k, v in match.items())
    ]


def assert_finished(journal: Path, final: str) -> dict[str, Any]:
    last = entries(journal)[-1]
    assert last["event"] == "finished", last
    assert last["final"] == final, last
    return last


# -- a partition or a slow reply during a command: it runs once --------------------------------
RETRY_WORKFLOW = """\
name: once
servers: {{dev: "{address}"}}
initial: work
states:
  work:
    command: counter.work
    params: {{seconds: 1.0, tag: once}}
    timeout: 400ms
    retry: {{attempts: 200, interval: 50ms, backoff: 1, on: [timeout, connection_lost]}}
    next: done
    on_error: failed
  done:
    final: success
  failed:
    final: failure
"""


@pytest.mark.parametrize("fault", ["partition", "slow"])
def test_a_retried_command_runs_once_and_the_run_gets_the_first_result(
    servers, runner, tmp_path, fault
):
    """``partition``: the link is black-holed while the command runs (its reply is lost; the
    retries time out into the void), then heals (connection_lost, reconnect): the retry with
    the visit's key gets the stored outcome. ``slow``: no fault, the command outlasts the
    client timeout: each retry joins the running execution, and the replies of the timed-out
    attempts are journaled as ``late``."""
    child = servers.start()
    with FaultProxy(child.address) as proxy:
        handle, journal = start_run(runner, tmp_path, "once", RETRY_WORKFLOW, address_of(proxy))
        wait_until(lambda: executions(tmp_path), what="the handler to start")
        if fault == "partition":
            proxy.blackhole()
            wait_until(lambda: executions(tmp_path, "end"), what="the handler to return")
            wait_until(
                lambda: of(journal, "error", state="work"), what="a client timeout in the dark"
            )
            proxy.heal()
        assert handle.wait(WAIT) == "success", handle.history[-4:]
    ran = executions(tmp_path)
    assert len(ran) == 1, ran
    first = ran[0]["execution"]
    replies = of(journal, "reply", state="work")
    assert len(replies) == 1 and replies[0]["result"]["execution"] == first, replies
    assert replies[0]["result"]["finished"] is True
    errors = of(journal, "error", state="work")
    assert errors and {e["error"]["kind"] for e in errors} <= {"timeout", "connection_lost"}
    assert "timeout" in {e["error"]["kind"] for e in errors}
    if fault == "partition":
        assert replies[0].get("replayed") is True, replies  # the stored outcome, not a rerun
    late = of(journal, "late", state="work")
    if fault == "slow":
        assert late, "no late entry for the attempts that timed out"
    for entry in late:
        assert entry["command"] == "counter.work" and entry["attempt"] < replies[0]["attempt"]
        assert entry["result"]["execution"] == first, entry
    assert len({e["key"] for e in late}) <= 1  # the retries of one visit share its key
    assert_finished(journal, "success")


# -- many steps through a lossy, slow link ----------------------------------------------------
STEPS = 50


def lossy_workflow(steps: int) -> str:
    lines = [
        "name: lossy",
        'servers: {{dev: "{address}"}}',
        "initial: s1",
        "states:",
    ]
    for i in range(1, steps + 1):
        lines += [
            f"  s{i}:",
            "    command: counter.work",
            f"    params: {{{{seconds: 0.02, tag: s{i}}}}}",
            "    timeout: 150ms",
            "    retry: {{attempts: 100, interval: 20ms, backoff: 1, "
            "on: [timeout, connection_lost]}}",
            f"    next: {'s' + str(i + 1) if i < steps else 'done'}",
        ]
    lines += ["  done:", "    final: success", ""]
    return "\n".join(lines)


def test_fifty_steps_through_a_slow_lossy_link_run_each_command_once(servers, runner, tmp_path):
    child = servers.start()
    with FaultProxy(child.address, delay=(0.0, 0.06), drop_rate=0.05, seed=11) as proxy:
        handle, journal = start_run(
            runner, tmp_path, "lossy", lossy_workflow(STEPS), address_of(proxy)
        )
        assert handle.wait(60) == "success", handle.history[-4:]
        assert proxy.resets > 0, "the seeded drops never happened"
    ran = executions(tmp_path)
    assert sorted(r["tag"] for r in ran) == sorted(f"s{i}" for i in range(1, STEPS + 1)), [
        r["tag"] for r in ran
    ]
    assert len(ran) == STEPS
    for i in range(1, STEPS + 1):
        (reply,) = of(journal, "reply", state=f"s{i}")
        (execution,) = executions(tmp_path, tag=f"s{i}")
        assert reply["result"]["execution"] == execution["execution"], reply
    assert_finished(journal, "success")


# -- the server is killed during a command -----------------------------------------------------
CRASH_WORKFLOW = """\
name: crash
servers: {{dev: "{address}"}}
initial: work
states:
  work:
    command: counter.work
    params: {{seconds: 20, tag: crash}}
    timeout: 30s
    retry: {{attempts: 1000, interval: 20ms, backoff: 1, on: [connection_lost]}}
    next: done
    on_error: {{interrupted: recover, "*": failed}}
  recover:
    command: counter.reset
    timeout: 5s
    next: recovered
    on_error: failed
  done:
    final: success
  recovered:
    final: failure
  failed:
    final: failure
"""


def test_a_command_running_when_its_server_is_killed_answers_interrupted_after_restart(
    servers, runner, tmp_path
):
    child = servers.start()
    with FaultProxy(child.address) as proxy:
        handle, journal = start_run(runner, tmp_path, "crash", CRASH_WORKFLOW, address_of(proxy))
        wait_until(lambda: executions(tmp_path), what="the handler to start")
        child.kill()  # SIGKILL mid-command
        restarted = servers.start()  # same state dir; the proxy still points at the dead one
        with Client(restarted.address, reconnect=False) as probe:
            state = probe.call("counter.state", timeout=WAIT)
        assert state["state"] == "fault", state
        assert "interrupted" in json.dumps(state), state
        proxy.target = restarted.address  # the run's retry reaches the new server
        assert handle.wait(WAIT) == "failure", handle.history[-4:]
    assert len(executions(tmp_path, tag="crash")) == 1  # the retried key ran nothing
    errors = of(journal, "error", state="work")
    assert errors[-1]["error"]["kind"] == "interrupted", errors[-1]
    assert errors[-1]["error"]["code"] == ek.INTERRUPTED
    assert {e["error"]["kind"] for e in errors[:-1]} <= {"connection_lost"}
    assert errors[-1]["next"] == "recover"
    (reset,) = of(journal, "reply", state="recover")  # reset is allowed from fault only
    assert reset["command"] == "counter.reset"
    assert assert_finished(journal, "failure")["state"] == "recovered"


# -- a command queued for a worker past its timeout -------------------------------------------
def test_a_command_that_waited_for_a_worker_past_its_timeout_never_runs(servers, tmp_path):
    child = servers.start("--workers", "1", devices=("first", "second"))
    with Client(child.address, reconnect=False) as client:
        long = client.send_command("first.work", {"seconds": 1.5, "tag": "long"}, timeout=WAIT)
        wait_until(lambda: executions(tmp_path, tag="long"), what="the long command to start")
        started = time.monotonic()
        with pytest.raises(CommandTimeoutError) as info:  # 300 ms, waiting for the one worker
            client.call("second.quick", {"tag": "queued"}, timeout=WAIT)
        assert info.value.code == ek.TIMEOUT
        assert time.monotonic() - started < 1.4  # the server's timeout, not the long command's
        assert long.result(timeout=WAIT)["finished"] is True
        # the worker is free now: a later command on the same device runs (so it is not
        # faulted), and the timed-out one never did
        assert client.call("second.work", {"tag": "after"}, timeout=WAIT)["tag"] == "after"
        assert client.call("second.state", timeout=WAIT)["state"] == "idle"
    assert executions(tmp_path, tag="queued") == []
    assert [r["tag"] for r in executions(tmp_path)] == ["long", "after"]


# -- statelink run stopped by a signal ---------------------------------------------------------
SIGNAL_WORKFLOW = """\
name: signalled
servers:
  dev: "{address}"
on_abort: safe
initial: work
states:
  work:
    command: counter.work
    params: {{seconds: 15, tag: work}}
    timeout: 20s
    next: done
  safe:
    command: counter.mark
    params: {{tag: on_abort}}
    timeout: 10s
    retry: {{attempts: 5, interval: 100ms, on: [busy, connection_lost]}}
    next: stopped
    on_error: stopped
  done:
    final: success
  stopped:
    final: failure
"""


def statelink_run(workflow: Path, journal: Path, *args: str) -> subprocess.Popen[bytes]:
    """``statelink run WORKFLOW --plain --journal JOURNAL ARGS`` in the background; its output
    goes to WORKFLOW.log (see :func:`wait_exit`)."""
    with open(workflow.with_suffix(".log"), "wb") as out:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "controller", "run", str(workflow), "--plain"),
                *("--journal", str(journal), *args),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


def wait_exit(proc: subprocess.Popen[bytes], workflow: Path) -> int:
    """The exit code of a :func:`statelink_run` process (killed if it does not end)."""
    try:
        return proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(WAIT)
        log = workflow.with_suffix(".log").read_text()
        raise AssertionError("statelink run did not end:\n" + log[-3000:])


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_abort_a_run_through_on_abort(servers, tmp_path, signum, code):
    child = servers.start()
    with FaultProxy(child.address) as proxy:
        workflow = tmp_path / "signalled.yaml"
        workflow.write_text(SIGNAL_WORKFLOW.format(address=address_of(proxy)))
        journal = tmp_path / "signalled.jsonl"
        proc = statelink_run(workflow, journal)
        try:
            wait_until(lambda: executions(tmp_path, tag="work"), what="the command to start")
            proc.send_signal(signum)
            code_seen = wait_exit(proc, workflow)
            assert code_seen == code, workflow.with_suffix(".log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(WAIT)
    # the command in flight was cancelled on the server (its handler returned early) ...
    (ended,) = wait_until(lambda: executions(tmp_path, "end", tag="work"))
    assert ended["finished"] is False, ended
    # ... and the on_abort path ran, once
    assert len(executions(tmp_path, tag="on_abort")) == 1
    assert of(journal, "abort")
    (safe,) = of(journal, "reply", state="safe")
    assert safe["result"]["tag"] == "on_abort"
    assert assert_finished(journal, "aborted")["state"] == "stopped"


# -- results too large or too deep -------------------------------------------------------------
BIG_WORKFLOW = """\
name: big
servers: {{dev: "{address}"}}
initial: big
states:
  big:
    command: counter.work
    params: {{size: 10000000, tag: big}}
    timeout: 10s
    retry:
      {{attempts: 3, interval: 50ms, backoff: 1, on: [internal_error, timeout, connection_lost]}}
    next: done
    on_error: failed
  done:
    final: success
  failed:
    final: failure
"""

NEIGHBOUR_WORKFLOW = """\
name: neighbour
servers: {{dev: "{address}"}}
initial: first
states:
  first:
    command: other.work
    params: {{seconds: 0.5, tag: n1}}
    timeout: 10s
    next: second
  second:
    command: other.work
    params: {{tag: n2}}
    timeout: 10s
    next: done
  done:
    final: success
"""


def test_a_10_mb_result_is_a_clear_error_and_the_connection_goes_on(servers, runner, tmp_path):
    child = servers.start(devices=("counter", "other"))
    with FaultProxy(child.address) as proxy:
        address = address_of(proxy)
        neighbour, neighbour_journal = start_run(
            runner, tmp_path, "neighbour", NEIGHBOUR_WORKFLOW, address
        )
        wait_until(lambda: executions(tmp_path, tag="n1"), what="the neighbour's command")
        big, big_journal = start_run(runner, tmp_path, "big", BIG_WORKFLOW, address)
        assert big.wait(WAIT) == "failure", big.history[-4:]
        assert neighbour.wait(WAIT) == "success", neighbour.history[-4:]
        assert proxy.accepted == 1 and proxy.resets == 0  # one connection, never closed
    errors = of(big_journal, "error", state="big")
    assert len(errors) == 3, entries(big_journal)  # every attempt of the visit ...
    assert all(e.get("replayed") is True for e in errors[1:]), errors  # ... after the first: stored
    for error in errors:  # the first, then the stored outcome for each retry
        assert error["error"]["kind"] != "connection_lost", error
        data = error["error"]["data"]
        assert data["size"] > 10_000_000 and data["limit"] == FRAME_LIMIT, error
        message = error["error"]["message"]
        assert "limit" in message or "frame" in message, message
    assert len(executions(tmp_path, tag="big")) == 1  # no retry storm
    assert [e["result"]["tag"] for e in of(neighbour_journal, "reply")] == ["n1", "n2"]
    assert not of(neighbour_journal, "error")


def test_a_result_nested_too_deep_fails_its_request_at_once(servers, tmp_path):
    child = servers.start()
    with FaultProxy(child.address) as proxy, Client(proxy.address, reconnect=False) as client:
        started = time.monotonic()
        with pytest.raises(RpcError) as info:
            client.call("counter.work", {"depth": 40}, timeout=15)
        elapsed = time.monotonic() - started
        assert not isinstance(info.value, CommandTimeoutError), info.value
        assert elapsed < 5, f"failed after {elapsed:.1f} s: a timeout, not at once"
        text = f"{info.value.message} {info.value.data}".lower()
        assert "deep" in text or "depth" in text or "nest" in text, text
        assert client.call("counter.work", {"tag": "next"}, timeout=WAIT)["tag"] == "next"
        assert proxy.accepted == 1
    assert len(executions(tmp_path)) == 2


# -- the door: Ctrl-C during door.open, then on_abort closes it --------------------------------
DOOR = REPO / "config" / "devices" / "door.yaml"


def door_workflow() -> Path:
    found = [
        path
        for path in sorted((REPO / "config" / "workflows").glob("*.yaml"))
        if "door.open" in path.read_text()
    ]
    assert found, "no workflow in config/workflows drives door.open"
    return found[0]


def test_ctrl_c_during_door_open_then_on_abort_closes_the_door(servers, tmp_path):
    door = ChildServer(
        "cli",
        [
            *("serve", "--port", "0", "--simulate", "--device", str(DOOR)),
            *("--state-dir", str(servers.state_dir)),
        ],
        tmp_path / "door.log",
    ).start()
    servers.children.append(door)
    journal = tmp_path / "door.jsonl"
    workflow = tmp_path / "door-workflow.yaml"
    workflow.write_text(door_workflow().read_text())
    with Client(door.address, reconnect=False) as probe:
        proc = statelink_run(workflow, journal, "--server", address_of(door))
        try:
            wait_until(
                lambda: (
                    probe.call("door.state", timeout=WAIT)["state"] == "opening"
                    and not probe.call("door.position", timeout=WAIT)["closed"]
                ),
                what="the door to be half open",
            )
            proc.send_signal(signal.SIGINT)
            code = wait_exit(proc, workflow)
            assert code == 130, workflow.with_suffix(".log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(WAIT)
        assert probe.call("door.state", timeout=WAIT)["state"] == "closed"
        assert probe.call("door.position", timeout=WAIT) == {"open": False, "closed": True}
    assert of(journal, "abort")
    closes = [e for e in of(journal, "reply") if e.get("command") == "door.close"]
    assert closes, entries(journal)
    assert entries(journal)[-1]["event"] == "finished"


# -- a listen-only subscriber is not idle ------------------------------------------------------
TRAFFIC_SECONDS = 10.0


def test_a_listen_only_subscriber_loses_no_notification_to_the_idle_timeout(servers, tmp_path):
    child = servers.start("--idle-timeout", "2")
    listener = Raw(child.address)
    assert listener.call("rpc.subscribe", {"method": "device.state"})["result"]
    received: list[dict[str, Any]] = []
    closed = threading.Event()

    def listen() -> None:  # reads only; never sends again
        while True:
            try:
                line = listener.try_line(timeout=TRAFFIC_SECONDS + WAIT)
            except (AssertionError, OSError, ValueError):  # no line in time, or closed by us
                return
            if line is None:
                closed.set()
                return
            message = json.loads(line)
            if message.get("method") == "device.state":
                received.append(message["params"])

    reader = threading.Thread(target=listen, daemon=True)
    reader.start()
    sent: list[dict[str, Any]] = []
    try:
        with Client(child.address, reconnect=False) as client:
            client.subscribe("device.state", sent.append)
            deadline = time.monotonic() + TRAFFIC_SECONDS
            calls = 0
            while time.monotonic() < deadline and not closed.is_set():
                client.call("counter.work", {"tag": f"t{calls}"}, timeout=WAIT)
                calls += 1
            wait_until(lambda: len(sent) >= 2 * calls, what="the active client's notifications")
            wait_until(
                lambda: len(received) >= len(sent) or closed.is_set(),
                what="the listener's notifications",
            )
            assert not closed.is_set(), (
                f"the listen-only subscriber was dropped after {len(received)} notifications"
            )
            assert len(received) == len(sent) == 2 * calls, (len(received), len(sent), calls)
            assert received == sent
            closed_by = client.call("rpc.stats", timeout=WAIT)["closed_by_reason"]
            assert "idle_timeout" not in closed_by, closed_by
    finally:
        listener.close()
        reader.join(WAIT)
