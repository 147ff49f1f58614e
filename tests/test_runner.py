"""Workflows end to end: the shipped examples and small test workflows run against real servers
on loopback; journals are read back from real files."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, WAIT, ServeProcess, journal_entries, statelink, wait_until

from controller import BusyError, Client, CommandServer, Limits, add_device
from controller.runner import RunHandle, WorkflowRunner
from statemachines import errorkinds as ek
from statemachines.device import load_device
from statemachines.workflow import load_workflow, parse_workflow

WORKFLOWS = ROOT / "config" / "workflows"
DEMO_DEVICE = ROOT / "config" / "devices" / "demo.yaml"


def demo_server(**kwargs: Any) -> CommandServer:
    server = CommandServer(port=0, grace=0.5, **kwargs)
    add_device(server, load_device(DEMO_DEVICE), simulate=True)
    return server


@pytest.fixture
def demo() -> Iterator[CommandServer]:
    with demo_server() as server:
        yield server


@pytest.fixture
def runner() -> Iterator[WorkflowRunner]:
    with WorkflowRunner() as r:
        yield r


def assert_complete(entries: list[dict[str, Any]], final: str) -> None:
    assert entries[0]["event"] == "start"
    assert entries[-1]["event"] == "finished" and entries[-1]["final"] == final
    assert all({"time", "state", "event"} <= e.keys() for e in entries)
    for entry in entries:
        if entry["event"] in ("reply", "error"):
            assert "command" in entry and "params" in entry
            assert ("result" in entry) != ("error" in entry)


def run(
    runner: WorkflowRunner,
    spec: Any,
    servers: dict[str, Any],
    tmp_path: Path,
    observer: Callable[[RunHandle, dict[str, Any]], None] | None = None,
) -> tuple[RunHandle, list[dict[str, Any]]]:
    path = tmp_path / f"{spec.name}.jsonl"
    handle = runner.start(spec, servers=servers, journal=path, observer=observer)
    assert handle.wait(WAIT) is not None, f"run stuck in {handle.state}"
    return handle, journal_entries(path)


def test_demo_workflow_success(runner: WorkflowRunner, demo: CommandServer, tmp_path: Path) -> None:
    handle, entries = run(
        runner, load_workflow(WORKFLOWS / "demo.yaml"), {"device": demo.address}, tmp_path
    )
    assert handle.outcome == "success"
    assert_complete(entries, "success")
    commands = [e["command"] for e in entries if e["event"] == "reply"]
    assert "demo.calibrate" in commands and "demo.read_sensor" in commands
    assert handle.history[-1]["final"] == "success"


def test_retry_then_success(runner: WorkflowRunner, tmp_path: Path) -> None:
    attempts = []

    with CommandServer(port=0) as server:

        @server.command("flaky")
        def flaky() -> str:
            attempts.append(1)
            if len(attempts) < 3:
                raise BusyError("not yet")
            return "ok"

        spec = parse_workflow(
            textwrap.dedent("""
            name: flaky
            servers: {s: "127.0.0.1:1"}
            initial: call
            states:
              call:
                command: flaky
                timeout: 2s
                retry: {attempts: 5, interval: 10ms, on: [busy]}
                next: done
                on_error: failed
              done: {final: success}
              failed: {final: failure}
        """)
        )
        handle, entries = run(runner, spec, {"s": server.address}, tmp_path)
    assert handle.outcome == "success"
    tries = [e for e in entries if e.get("command") == "flaky"]
    assert [e["attempt"] for e in tries] == [1, 2, 3]
    assert [("error" in e) for e in tries] == [True, True, False]
    assert_complete(entries, "success")


def test_retry_exhausted_then_on_error(
    runner: WorkflowRunner, demo: CommandServer, tmp_path: Path
) -> None:
    handle, entries = run(
        runner, load_workflow(WORKFLOWS / "retry.yaml"), {"device": demo.address}, tmp_path
    )
    assert handle.outcome == "success"
    selftests = [e for e in entries if e.get("command") == "demo.selftest"]
    assert len(selftests) == 2 and all("error" in e for e in selftests)
    assert selftests[-1]["next"] == "reset"
    assert_complete(entries, "success")


def test_not_allowed_reply_routed_to_its_own_state(
    runner: WorkflowRunner, demo: CommandServer, tmp_path: Path
) -> None:
    handle, entries = run(
        runner, load_workflow(WORKFLOWS / "not_allowed.yaml"), {"device": demo.address}, tmp_path
    )
    assert handle.outcome == "success"
    reset = next(e for e in entries if e.get("command") == "demo.reset")
    assert reset["error"]["kind"] == "not_allowed" and reset["next"] == "blink_once"


def test_command_timeout_takes_the_timeout_route(
    runner: WorkflowRunner, demo: CommandServer, tmp_path: Path
) -> None:
    spec = parse_workflow(
        textwrap.dedent("""
        name: slow
        servers: {device: "127.0.0.1:1"}
        initial: calibrate
        states:
          calibrate:
            command: demo.calibrate
            params: {steps: 20, delay: 0.1}
            timeout: 200ms
            next: done
            on_error: {timeout: too_slow, "*": failed}
          too_slow: {final: failure}
          done: {final: success}
          failed: {final: failure}
    """)
    )
    handle, entries = run(runner, spec, {"device": demo.address}, tmp_path)
    assert handle.state == "too_slow" and handle.outcome == "failure"
    error = next(e for e in entries if e["event"] == "error")["error"]
    assert error["kind"] == "timeout" and error["code"] == ek.TIMEOUT


def test_branch_on_a_result(runner: WorkflowRunner, tmp_path: Path) -> None:
    spec = parse_workflow(
        textwrap.dedent("""
        name: branch
        servers: {s: "127.0.0.1:1"}
        command_timeout: 2s
        initial: level
        states:
          level:
            command: level
            save: tank
            choices:
              - {if: "result.level > 0.5 and tank.unit == 'l'", next: high}
              - {next: low}
          high:
            command: drain
            params: {amount: "{{ tank.level * 2 }}"}
            next: done
          low: {final: failure}
          done: {final: success}
    """)
    )
    drained = []
    with CommandServer(port=0) as server:
        server.add_command("level", lambda: {"level": 0.75, "unit": "l"})
        server.add_command("drain", lambda amount: drained.append(amount) or amount)
        handle, _ = run(runner, spec, {"s": server.address}, tmp_path)
    assert handle.outcome == "success" and drained == [1.5]  # a number stays a number


def test_await_a_notification(runner: WorkflowRunner, demo: CommandServer, tmp_path: Path) -> None:
    awaiting = threading.Event()

    def observer(_handle: RunHandle, entry: dict[str, Any]) -> None:
        if entry.get("next") == "wait_for_reset":
            awaiting.set()

    spec = load_workflow(WORKFLOWS / "await_state.yaml")
    path = tmp_path / "await.jsonl"
    handle = runner.start(spec, servers={"device": demo.address}, journal=path, observer=observer)
    assert awaiting.wait(WAIT)
    with Client(demo.address) as operator:  # someone else resets the device
        assert operator.call("demo.reset") == {"ok": True}
    assert handle.wait(WAIT) == "success"
    entries = journal_entries(path)
    note = next(e for e in entries if e["event"] == "notification")
    assert note["params"]["state"] == "idle" and note["next"] == "thank_you"
    assert_complete(entries, "success")


def test_abort_runs_on_abort(runner: WorkflowRunner, demo: CommandServer, tmp_path: Path) -> None:
    calibrating = threading.Event()

    def observer(_handle: RunHandle, entry: dict[str, Any]) -> None:
        if entry.get("next") == "calibrate":
            calibrating.set()

    led = demo.devices["demo"].board.objects["led"]
    path = tmp_path / "abort.jsonl"
    handle = runner.start(
        load_workflow(WORKFLOWS / "abort.yaml"),
        servers={"device": demo.address},
        journal=path,
        observer=observer,
    )
    assert calibrating.wait(WAIT)
    handle.abort()
    assert handle.wait(WAIT) == "aborted"
    entries = journal_entries(path)
    assert any(e.get("command") == "demo.led_off" and "result" in e for e in entries)
    assert not led.is_lit
    assert_complete(entries, "aborted")


def test_two_servers_in_one_workflow(runner: WorkflowRunner, tmp_path: Path) -> None:
    with demo_server() as left, demo_server() as right:
        handle, entries = run(
            runner,
            load_workflow(WORKFLOWS / "two_servers.yaml"),
            {"left": left.address, "right": right.address},
            tmp_path,
        )
    assert handle.outcome == "success"
    servers = {e["server"] for e in entries if e["event"] == "reply"}
    assert servers == {"left", "right"}


def test_server_killed_mid_run_gives_connection_lost(
    runner: WorkflowRunner, tmp_path: Path
) -> None:
    spec = parse_workflow(
        textwrap.dedent("""
        name: killed
        servers: {device: "127.0.0.1:1"}
        initial: calibrate
        states:
          calibrate:
            command: demo.calibrate
            params: {steps: 50, delay: 0.2}
            timeout: 20s
            next: done
            on_error: {connection_lost: lost, "*": failed}
          lost: {final: failure}
          done: {final: success}
          failed: {final: failure}
    """)
    )
    served = ServeProcess("--device", str(DEMO_DEVICE), "--simulate")
    started = threading.Event()
    try:
        path = tmp_path / "killed.jsonl"
        handle = runner.start(spec, servers={"device": served.address}, journal=path)
        client = runner.client(served.address)
        client.subscribe("rpc.progress", lambda _params: started.set())
        assert started.wait(WAIT)
        served.kill()
        assert handle.wait(WAIT) == "failure"
    finally:
        served.kill()
    assert handle.state == "lost"
    entries = journal_entries(path)
    assert next(e for e in entries if e["event"] == "error")["error"]["kind"] == "connection_lost"
    assert_complete(entries, "failure")


def test_many_concurrent_runs_every_journal_complete(
    runner: WorkflowRunner, tmp_path: Path
) -> None:
    runs = 300  # the full 1000-run figure is in bench/ (S4)
    spec = load_workflow(WORKFLOWS / "ten_steps.yaml")
    server_name = next(iter(spec.servers))
    # One runner multiplexes every run over one connection; with the server's default bound of
    # 256 in flight per connection, the runner's gate holds the rest back instead of losing them.
    with demo_server() as demo:
        handles = [
            runner.start(
                spec, servers={server_name: demo.address}, journal=tmp_path / f"run-{i}.jsonl"
            )
            for i in range(runs)
        ]
        outcomes = [h.wait(WAIT) for h in handles]
    assert outcomes == ["success"] * runs
    for i in range(runs):
        entries = journal_entries(tmp_path / f"run-{i}.jsonl")
        assert_complete(entries, "success")
        assert sum(1 for e in entries if e["event"] == "reply") == 10


# -- the command line ------------------------------------------------------------------------


def test_statelink_demo_exits_0() -> None:
    result = statelink("demo", "--plain")
    assert result.returncode == 0, result.stderr
    assert "success" in result.stdout


def test_run_exit_codes_success_failure_invalid(tmp_path: Path) -> None:
    served = ServeProcess("--device", str(DEMO_DEVICE), "--simulate")
    try:
        ok = statelink(
            "run",
            str(WORKFLOWS / "not_allowed.yaml"),
            "--server",
            f"device={served.server}",
            "--journal",
            str(tmp_path / "j.jsonl"),
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert journal_entries(tmp_path / "j.jsonl")[-1]["final"] == "success"
        failing = tmp_path / "fail.yaml"
        failing.write_text(
            "name: f\nservers: {device: '127.0.0.1:1'}\ninitial: go\n"
            "states:\n  go: {command: demo.reset, timeout: 2s, next: ok, "
            "on_error: bad}\n  ok: {final: success}\n  bad: {final: failure}\n"
        )
        assert statelink("run", str(failing), "--server", f"device={served.server}").returncode == 1
    finally:
        served.kill()
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("name: x\ninitial: nowhere\nstates: {}\n")
    bad = statelink("run", str(invalid))
    assert bad.returncode == 2 and f"{invalid}:" in bad.stderr


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_run_ctrl_c_runs_on_abort_and_exits_130(
    tmp_path: Path, signum: signal.Signals, code: int
) -> None:
    """Ctrl-C, and SIGTERM (systemd, `timeout`) and SIGHUP (a closed terminal) alike: the
    command in flight is cancelled, on_abort runs, the journal ends with finished."""
    served = ServeProcess("--device", str(DEMO_DEVICE), "--simulate")
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controller",
                "run",
                str(WORKFLOWS / "abort.yaml"),
                "--plain",
                "--server",
                f"device={served.server}",
                "--journal",
                str(tmp_path / "abort.jsonl"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until calibration reports progress
            if "progress" in line:
                break
        proc.send_signal(signum)
        rest = proc.communicate(timeout=WAIT)[0]
        assert proc.returncode == code, rest
        assert f"aborting ({signum.name})" in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        served.kill()
    entries = journal_entries(tmp_path / "abort.jsonl")
    assert entries[-1]["event"] == "finished" and entries[-1]["final"] == "aborted"
    assert any(e.get("command") == "demo.led_off" for e in entries)
    # the calibration was cancelled on the server: its outcome is on record as a late entry
    late = [e for e in entries if e["event"] == "late"]
    assert [e["command"] for e in late] == ["demo.calibrate"], entries
    assert late[0]["error"]["kind"] == "cancelled"


def test_demo_stops_on_sigterm_like_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller", "demo", "--plain",
         "--journal", str(tmp_path / "demo.jsonl")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the run has started
            if " start " in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=WAIT)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, rest
    entries = journal_entries(tmp_path / "demo.jsonl")
    assert entries[-1]["event"] == "finished" and entries[-1]["final"] == "aborted"
    assert any(e["state"] == "abort_led_off" for e in entries)


BROKEN = {
    "unknown target": ("states:\n  a: {wait: 1s, next: b}\n", "unknown state 'b'"),
    "unknown key": ("states:\n  a: {final: success, colour: red}\n", "colour"),
    "missing timeout": (
        "servers: {s: '127.0.0.1:1'}\nstates:\n"
        "  a: {command: x.y, next: z}\n  z: {final: success}\n",
        "timeout",
    ),
    "bad expression": (
        "states:\n  a:\n    choices:\n      - {if: 'result >', next: z}\n"
        "      - {next: z}\n  z: {final: success}\n",
        "expression",
    ),
    "unknown name": (
        "states:\n  a:\n    choices:\n      - {if: 'nothing > 1', next: z}\n"
        "      - {next: z}\n  z: {final: success}\n",
        "nothing",
    ),
    "bad duration": ("states:\n  a: {wait: soon, next: z}\n  z: {final: success}\n", "duration"),
    "unreachable": (
        "states:\n  a: {wait: 1s, next: z}\n  z: {final: success}\n  island: {final: failure}\n",
        "unreachable",
    ),
    "no way out": ("states:\n  a: {wait: 1s, next: b}\n  b: {wait: 1s, next: a}\n", "final"),
    "bad final": ("states:\n  a: {final: maybe}\n", "success"),
    "unknown error kind": (
        "servers: {s: '127.0.0.1:1'}\nstates:\n  a: {command: x.y, "
        "timeout: 1s, next: z, on_error: {oops: z}}\n  z: {final: success}\n",
        "oops",
    ),
    "unknown server": (
        "servers: {s: '127.0.0.1:1'}\nstates:\n  a: {command: x.y, server: t, "
        "timeout: 1s, next: z}\n  z: {final: success}\n",
        "'t'",
    ),
    "mixed kinds": ("states:\n  a: {wait: 1s, final: success, next: a}\n", "a"),
    "bad YAML": ("states: [\n", "YAML"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_check_rejects_broken_workflows(tmp_path: Path, name: str) -> None:
    body, expected = BROKEN[name]
    path = tmp_path / "broken.yaml"
    path.write_text(f"name: broken\ninitial: a\n{body}" if name != "bad YAML" else body)
    result = statelink("check", str(path))
    assert result.returncode == 2, (name, result.stdout)
    assert result.stderr.startswith(f"{path}:"), result.stderr
    assert expected in result.stderr, result.stderr


def test_check_accepts_every_shipped_config() -> None:
    files = sorted(str(p) for p in (ROOT / "config").rglob("*.yaml"))
    devices = sorted((ROOT / "config" / "devices").glob("*.yaml"))
    result = statelink("check", *files, *(f"--device={d}" for d in devices))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok") == len(files)


CHECKED = """\
name: against
servers: {device: "127.0.0.1:1"}
command_timeout: 2s
initial: a
states:
  a: {command: demo.calibrate, params: {steps: 500}, next: b}
  b: {command: demo.fly, next: c}
  c: {command: demo.blink, params: {colour: red}, next: done}
  done: {final: success}
"""


def _assert_device_problems(stderr: str, path: Path) -> None:
    lines = stderr.strip().splitlines()
    assert all(line.startswith(f"{path}:") for line in lines), stderr
    assert any("demo.fly" in line for line in lines)
    assert any("steps" in line for line in lines)
    assert any("colour" in line for line in lines)


def test_check_against_a_device_config(tmp_path: Path) -> None:
    path = tmp_path / "against.yaml"
    path.write_text(CHECKED)
    result = statelink("check", str(path), "--device", str(DEMO_DEVICE))
    assert result.returncode == 2
    _assert_device_problems(result.stderr, path)


def test_check_against_a_live_server(tmp_path: Path, demo: CommandServer) -> None:
    path = tmp_path / "against.yaml"
    path.write_text(CHECKED)
    host, port = demo.address
    result = statelink("check", str(path), "--server", f"device={host}:{port}")
    assert result.returncode == 2
    _assert_device_problems(result.stderr, path)
    fine = statelink("check", str(WORKFLOWS / "demo.yaml"), "--server", f"{host}:{port}")
    assert fine.returncode == 0, fine.stderr


def test_runner_keeps_under_the_servers_inflight_bound(runner: WorkflowRunner) -> None:
    spec = load_workflow(WORKFLOWS / "ten_steps.yaml")
    server_name = next(iter(spec.servers))
    with demo_server(limits=Limits(max_inflight=20)) as demo:
        handles = [runner.start(spec, servers={server_name: demo.address}) for _ in range(100)]
        assert [h.wait(WAIT) for h in handles] == ["success"] * 100
        stats = demo.stats_snapshot()
    assert str(ek.BUSY) not in stats["errors_by_code"]  # never busy: the gate held them back


def test_a_command_timeout_cancels_the_command_on_the_server(
    runner: WorkflowRunner, demo: CommandServer, tmp_path: Path
) -> None:
    """The workflow's timeout is the client's: the runner sends rpc.cancel, so the device is
    free again and the next command does not queue behind the abandoned one."""
    spec = parse_workflow(
        textwrap.dedent("""
        name: cancel-on-timeout
        servers: {device: "127.0.0.1:1"}
        initial: long
        states:
          long:
            command: demo.calibrate
            params: {steps: 50, delay: 1}
            timeout: 200ms
            next: done
            on_error: {timeout: short}
          short:
            command: demo.calibrate
            params: {steps: 1, delay: 0}
            timeout: 5s
            next: done
          done: {final: success}
    """)
    )
    handle, entries = run(runner, spec, {"device": demo.address}, tmp_path)
    assert handle.outcome == "success", entries
    errors = [e for e in entries if e["event"] == "error"]
    assert [e["error"]["kind"] for e in errors] == ["timeout"]
    assert entries[-2]["command"] == "demo.calibrate" and entries[-2]["result"]["steps"] == 1


def test_commands_waiting_for_a_slot_are_dropped_when_their_run_is_aborted(
    runner: WorkflowRunner, tmp_path: Path
) -> None:
    release = threading.Event()
    calls: list[str] = []
    server = CommandServer(port=0, grace=0.5, limits=Limits(max_inflight=1))

    @server.command("work")
    def work() -> str:
        calls.append("work")
        release.wait(WAIT)
        return "done"

    spec = parse_workflow(
        textwrap.dedent("""
        name: gated
        servers: {device: "127.0.0.1:1"}
        initial: work
        states:
          work:
            command: work
            timeout: 20s
            next: done
          done: {final: success}
    """)
    )
    with server:
        servers = {"device": server.address}
        first = runner.start(spec, servers=servers)
        waiting = runner.start(spec, servers=servers)  # behind first: the bound is 1
        waiting.abort()
        assert waiting.wait(WAIT) == "aborted"
        release.set()
        last = runner.start(spec, servers=servers)
        assert first.wait(WAIT) == "success" and last.wait(WAIT) == "success"
    assert len(calls) == 2  # first and last: the aborted run's command was never sent


def test_a_server_that_hangs_the_connect_does_not_stall_other_runs(
    runner: WorkflowRunner, demo: CommandServer, tmp_path: Path
) -> None:
    """Connecting to a server that accepts but never answers rpc.hello (a stuck device)
    happens off the dispatcher: runs against other servers go on meanwhile."""
    import socket

    release, holding = threading.Event(), threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def stuck_server() -> None:
        first, _ = listener.accept()
        first.close()  # runner.start()'s connect: refused at once, the run goes on
        second, _ = listener.accept()  # the connect made when the run sends: held
        holding.set()
        release.wait(WAIT)
        second.close()

    thread = threading.Thread(target=stuck_server, daemon=True)
    thread.start()
    stuck = parse_workflow(
        textwrap.dedent("""
        name: stuck
        servers: {device: "127.0.0.1:1"}
        initial: ping
        states:
          ping: {command: rpc.ping, timeout: 5s, next: done, on_error: lost}
          done: {final: success}
          lost: {final: failure}
    """)
    )
    try:
        blocked = runner.start(stuck, servers={"device": listener.getsockname()})
        ok = runner.start(stuck, servers={"device": demo.address})
        assert ok.wait(WAIT) == "success"
        assert holding.wait(WAIT)
        assert not blocked.done  # still connecting while the other run finished
    finally:
        release.set()
        thread.join(WAIT)
        listener.close()
    assert blocked.wait(WAIT) == "failure"
    assert blocked.history[-2]["error"]["kind"] == "connection_lost"


def test_run_sets_inputs_from_the_command_line(tmp_path: Path) -> None:
    workflow = tmp_path / "inputs.yaml"
    workflow.write_text(
        textwrap.dedent("""
        name: inputs
        inputs: {steps: 1, note: none}
        servers: {device: "127.0.0.1:1"}
        command_timeout: 5s
        initial: calibrate
        states:
          calibrate:
            command: demo.calibrate
            params: {steps: "{{ steps }}", delay: 0}
            choices:
              - {if: result.steps == 2 and note == "two steps", next: done}
              - {next: wrong}
          done: {final: success}
          wrong: {final: failure}
    """)
    )
    served = ServeProcess("--device", str(DEMO_DEVICE), "--simulate")
    try:
        args = ["run", str(workflow), "--plain", "--server", f"device={served.server}"]
        ok = statelink(*args, "--set", "steps=2", "--set", "note=two steps", "--journal",
                       str(tmp_path / "j.jsonl"))  # fmt: skip
        assert ok.returncode == 0, ok.stdout + ok.stderr
        entries = journal_entries(tmp_path / "j.jsonl")
        assert entries[0]["inputs"] == {"steps": 2, "note": "two steps"}
        assert entries[1]["params"] == {"steps": 2, "delay": 0}
        assert statelink(*args).returncode == 1  # the defaults: one step
        unknown = statelink(*args, "--set", "step=2")
        assert unknown.returncode == 2 and "has no input 'step'" in unknown.stderr
    finally:
        served.kill()


def test_the_workflow_timeout_cancels_the_command_in_flight(
    runner: WorkflowRunner, demo: CommandServer, tmp_path: Path
) -> None:
    spec = parse_workflow(
        textwrap.dedent("""
        name: run-timeout
        servers: {device: "127.0.0.1:1"}
        timeout: 500ms
        on_abort: safe
        initial: long
        states:
          long:
            command: demo.calibrate
            params: {steps: 50, delay: 1}
            timeout: 60s
            next: done
          safe:
            command: demo.led_off
            timeout: 3s
            next: done
          done: {final: success}
    """)
    )
    handle, entries = run(runner, spec, {"device": demo.address}, tmp_path)
    assert handle.outcome == "failure" and handle.state == "done", entries
    events = [(e["event"], e.get("command")) for e in entries]
    assert ("workflow_timeout", None) in events
    assert ("reply", "demo.led_off") in events  # not stuck behind the calibration


def test_run_with_the_wrong_secret_fails_cleanly_with_a_complete_journal(tmp_path: Path) -> None:
    (tmp_path / "server.secret").write_text("the right secret\n")
    (tmp_path / "client.secret").write_text("a wrong secret, long enough\n")
    served = ServeProcess(
        "--device", str(DEMO_DEVICE), "--simulate", "--secret-file", str(tmp_path / "server.secret")
    )
    try:
        result = statelink(
            "run", str(WORKFLOWS / "demo.yaml"), "--plain",
            "--server", f"device={served.server}",
            "--secret-file", str(tmp_path / "client.secret"),
            "--journal", str(tmp_path / "j.jsonl"),
        )  # fmt: skip
    finally:
        served.kill()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    entries = journal_entries(tmp_path / "j.jsonl")
    assert any(e.get("error", {}).get("kind") == "unauthorized" for e in entries), entries
    assert entries[-1]["event"] == "finished" and entries[-1]["final"] == "failure"


def test_abort_cancels_fit_under_a_small_inflight_bound(runner: WorkflowRunner) -> None:
    """The runner keeps a slot free for its own rpc.cancel, whatever the server's bound."""
    spec = parse_workflow(
        textwrap.dedent("""
        name: long
        servers: {device: "127.0.0.1:1"}
        initial: calibrate
        states:
          calibrate:
            command: demo.calibrate
            params: {steps: 50, delay: 1}
            timeout: 120s
            next: done
          done: {final: success}
    """)
    )
    with demo_server(limits=Limits(max_inflight=8)) as demo, Client(demo.address) as probe:
        handles = [runner.start(spec, servers={"device": demo.address}) for _ in range(8)]
        wait_until(lambda: probe.call("demo.state")["state"] == "calibrating", what="running")
        for handle in handles:
            handle.abort()
        assert [h.wait(WAIT) for h in handles] == ["aborted"] * 8
        wait_until(
            lambda: demo.stats_snapshot()["requests_in_flight"] == 0,
            what="every command to be cancelled",
        )
        assert probe.call("demo.state")["state"] == "idle"
        assert str(ek.BUSY) not in demo.stats_snapshot()["errors_by_code"]
