"""The ``statelink`` command line, run as real processes against real servers on loopback."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from support import WAIT, ServeProcess, statelink, wait_until

from statemachines import errorkinds as ek

ROOT = Path(__file__).resolve().parent.parent
DEMO_DEVICE = ROOT / "config" / "devices" / "demo.yaml"


@pytest.fixture
def served() -> Iterator[ServeProcess]:
    proc = ServeProcess("--device", str(DEMO_DEVICE), "--simulate")
    yield proc
    proc.kill()


def test_raw_line_ping_like_nc(served: ServeProcess) -> None:
    with socket.create_connection(served.address, timeout=WAIT) as sock:
        sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"rpc.ping"}\n')
        reply = sock.makefile("rb").readline()
    assert json.loads(reply) == {"jsonrpc": "2.0", "id": 1, "result": "pong"}


def test_call_prints_result_and_exit_codes(served: ServeProcess) -> None:
    ok = statelink("call", "--server", served.server, "demo.calibrate", '{"steps": 1, "delay": 0}')
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["steps"] == 1
    refused = statelink("call", "--server", served.server, "demo.reset")
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"error {ek.NOT_ALLOWED}: ")
    unknown = statelink("call", "--server", served.server, "nope")
    assert unknown.returncode == 1 and unknown.stderr.startswith(f"error {ek.METHOD_NOT_FOUND}: ")
    bad_json = statelink("call", "--server", served.server, "demo.blink", "{nope")
    assert bad_json.returncode == 2


def test_sigterm_stops_cleanly(served: ServeProcess) -> None:
    assert served.stop() == 0


def test_call_unreachable_server_exits_3() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = statelink("call", "--server", f"127.0.0.1:{port}", "rpc.ping")
    assert result.returncode == 3 and "cannot reach" in result.stderr


def test_serve_port_in_use_exits_nonzero_with_one_line_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = statelink("serve", "--port", str(port), timeout=WAIT)
    assert result.returncode == 1
    assert "in use" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_serve_refuses_public_address_without_secret() -> None:
    env = {k: v for k, v in os.environ.items() if k != "STATELINK_SECRET"}
    result = statelink("serve", "--host", "0.0.0.0", timeout=WAIT, env=env)
    assert result.returncode == 2 and "secret" in result.stderr and "--insecure" in result.stderr


def test_python_m_controller_matches_console_script() -> None:
    result = statelink("--help")
    assert result.returncode == 0 and "serve" in result.stdout and "demo" in result.stdout


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_ctrl_c_on_call_cancels_the_command_and_exits_130(
    served: ServeProcess, signum: signal.Signals, code: int
) -> None:
    """Ctrl-C, SIGTERM and SIGHUP alike: the command is cancelled on the server."""
    from controller import Client

    with Client(served.address) as probe:
        calibrating = threading.Event()
        probe.subscribe(
            "device.state",
            lambda p: calibrating.set() if p["state"] == "calibrating" else None,
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller", "call", "--server", served.server,
             "--timeout", "120", "demo.calibrate", '{"steps": 50, "delay": 2}'],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )  # fmt: skip
        try:
            assert calibrating.wait(WAIT), "the call never started the command"
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == code, err
        assert "interrupted" in err and "Traceback" not in err
        # the server was asked to cancel: the device is free again
        wait_until(
            lambda: probe.call("demo.state")["state"] == "idle",
            what=f"demo to be idle (the call said {err.strip()!r})",
        )


def test_a_signal_right_after_the_call_is_sent_still_cancels_it(
    served: ServeProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """The window between sending the command and waiting for its reply (a process descheduled
    under load): the signal is held until the request is out, then cancels it."""
    from controller import Client
    from controller.cli import main
    from controller.client_base import BaseClient

    send_command = BaseClient.send_command

    def send_then_signal(self: BaseClient, *args: Any, **kwargs: Any) -> Any:
        future = send_command(self, *args, **kwargs)
        if args[0] == "demo.calibrate":  # not rpc.hello, not rpc.cancel
            signal.raise_signal(signal.SIGTERM)  # its handler runs before this returns
        return future

    with mock.patch.object(BaseClient, "send_command", send_then_signal):
        code = main(["call", "--server", served.server, "--timeout", "120",
                     "demo.calibrate", '{"steps": 50, "delay": 2}'])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 143 and "interrupted: cancelled demo.calibrate on the server" in err, err
    with Client(served.address) as probe:
        wait_until(lambda: probe.call("demo.state")["state"] == "idle", what="demo to be idle")


def test_version_and_invalid_timeouts() -> None:
    version = statelink("--version")
    assert version.returncode == 0 and version.stdout.startswith("statelink ")
    for bad in ("inf", "nan", "0", "-1", "soon"):
        result = statelink("call", "--timeout", bad, "rpc.ping")
        assert result.returncode == 2 and "--timeout" in result.stderr, (bad, result.stderr)


def test_serve_a_workflow_as_a_device_says_so() -> None:
    workflow = ROOT / "config" / "workflows" / "demo.yaml"
    result = statelink("serve", "--port", "0", "--device", str(workflow), timeout=WAIT)
    assert result.returncode == 2
    assert "is a workflow, not a device config" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_reports_handler_problems_as_config_errors(tmp_path: Path) -> None:
    """A handler that cannot be imported is a config error (exit 2, ``file:line: message``),
    reported before any port opens, even though it is found when the device is served."""
    device = tmp_path / "door.yaml"
    device.write_text(
        "device: door\nstates: [closed, open]\ninitial: closed\n"
        "commands:\n  open: {from: [closed], to: open, handler: no_such_module_here:open}\n"
    )
    result = statelink("serve", "--port", "0", "--device", str(device), timeout=WAIT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"{device}:5: "), result.stderr
    assert "no_such_module_here" in result.stderr and "Traceback" not in result.stderr


def test_run_and_check_take_the_same_server_forms(served: ServeProcess, tmp_path: Path) -> None:
    workflow = str(ROOT / "config" / "workflows" / "not_allowed.yaml")
    for form in (f"device={served.server}", served.server):  # a bare address: every server
        ran = statelink("run", workflow, "--plain", "--server", form)
        assert ran.returncode == 0, (form, ran.stdout + ran.stderr)
        checked = statelink("check", workflow, "--server", form)
        assert checked.returncode == 0, (form, checked.stderr)
    for bad in ("device=", "=127.0.0.1:1", "device=127.0.0.1:port", "127.0.0.1:99999"):
        for command in ("run", "check"):
            result = statelink(command, workflow, "--server", bad)
            assert result.returncode == 2, (command, bad, result.stderr)
            assert "--server" in result.stderr and "Traceback" not in result.stderr


WAIT_THEN_DONE = """\
name: {name}
servers:
  s: "{address}"
command_timeout: 5s
initial: probe
states:
  probe:
    command: probe
    next: pause
  pause:
    wait: {wait}
    next: done
  done:
    final: success
"""


def test_run_journals_by_default_and_runs_lists_them(
    make_server: Any, tmp_path: Path, private_state_dir: Path
) -> None:
    """`statelink run` journals to STATE_DIR/runs/RUN_ID.jsonl and says so; `statelink runs`
    lists finished, interrupted (no live process) and running runs, newest first."""
    from controller.runner import WorkflowRunner
    from statemachines.workflow import load_workflow

    server = make_server()
    server.command("probe")(lambda: 1)
    host, port = server.address
    quick, slow = tmp_path / "quick.yaml", tmp_path / "slow.yaml"
    quick.write_text(WAIT_THEN_DONE.format(name="quick", address=f"{host}:{port}", wait="10ms"))
    slow.write_text(WAIT_THEN_DONE.format(name="slow", address=f"{host}:{port}", wait="60s"))

    ran = statelink("run", str(quick), "--plain")  # the default state dir ($STATE_DIRECTORY)
    assert ran.returncode == 0, ran.stderr
    said = [line for line in ran.stderr.splitlines() if line.startswith("run quick-")]
    assert len(said) == 1, ran.stderr
    run_id, journal = said[0].removeprefix("run ").split(", journal ")
    assert Path(journal) == private_state_dir / "runs" / f"{run_id}.jsonl"
    assert json.loads(Path(journal).read_text().splitlines()[-1])["final"] == "success"

    state = tmp_path / "state"
    ran = statelink("run", str(quick), "--plain", "--state-dir", str(state))
    assert ran.returncode == 0, ran.stderr
    finished_id = json.loads(next((state / "runs").glob("*.jsonl")).read_text().split("\n")[0])
    with WorkflowRunner(state_dir=state) as runner:  # closed mid-run: as if its process died
        interrupted = runner.start(load_workflow(slow))
        wait_until(lambda: interrupted.state == "pause", what="the run to wait")
    with WorkflowRunner(state_dir=state) as runner:
        running = runner.start(load_workflow(slow))
        wait_until(lambda: running.state == "pause", what="the run to wait")
        assert runner.journals.flush(WAIT)
        listed = json.loads(statelink("runs", "--state-dir", str(state), "--json").stdout)
        table = statelink("runs", "--state-dir", str(state))
        unfinished = statelink("runs", "--state-dir", str(state), "--unfinished", "--json")
        running.abort()
        assert running.wait(WAIT) == "aborted"
    expected = [
        (running.run_id, "slow", "pause", "running", os.getpid()),
        (interrupted.run_id, "slow", "pause", "interrupted", None),
        (finished_id["run"], "quick", "done", "success", None),
    ]
    assert [(r["run"], r["workflow"], r["state"], r["outcome"], r["pid"]) for r in listed] == (
        expected
    )
    assert listed[2]["last_event"] == "finished" and listed[1]["last_event"] == "reply"
    assert all(Path(r["journal"]).parent == state / "runs" for r in listed)
    assert [r["run"] for r in json.loads(unfinished.stdout)] == [running.run_id, interrupted.run_id]
    lines = table.stdout.splitlines()
    assert table.returncode == 0 and lines[0].split()[:4] == ["RUN", "WORKFLOW", "STATE", "OUTCOME"]
    assert len(lines) == 4 and f"running (pid {os.getpid()})" in lines[1]
    assert "interrupted" in lines[2] and "success" in lines[3]
    empty = statelink("runs", "--state-dir", str(tmp_path / "none"))
    assert empty.returncode == 0 and empty.stdout.startswith("no runs in ")


def test_run_against_a_stopped_server_says_so_and_exits_1(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = statelink(
        "run",
        "config/workflows/demo.yaml",
        "--server",
        f"127.0.0.1:{port}",
        "--plain",
        "--state-dir",
        str(tmp_path),
        timeout=WAIT,
    )
    assert result.returncode == 1, result.stderr
    hint = f"cannot reach 127.0.0.1:{port} (is `statelink serve` running?)"
    assert hint in result.stdout
    assert "failure" in result.stdout
    # the view says it: no log line of the runner mixed into the output
    assert "WARNING" not in result.stderr and "statelink.runner" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("run ")
    ]


def test_check_counts_in_good_english(tmp_path: Path) -> None:
    device = tmp_path / "lamp.yaml"
    device.write_text(
        "device: lamp\nstates: [dark, lit]\ninitial: dark\n"
        "commands:\n  light: {from: [dark], to: lit, handler: hw:light}\n"
    )
    result = statelink("check", str(device), timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{device}: ok (device lamp, 1 command)\n"


def test_a_result_that_is_not_json_names_method_and_type_and_is_logged(
    server: Any, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    @server.command("tags")
    def tags() -> object:
        return {"tags": {"a", "b"}}

    conn = raw()
    with caplog.at_level(logging.ERROR, logger="statelink.server"):
        reply = conn.call("tags")
    error = reply["error"]
    assert ek.kind_of(error["code"]) == "internal_error"
    assert error["message"] == "Internal error: the result of tags is not JSON (set)"
    assert error["data"]["method"] == "tags" and error["data"]["type"] == "set"
    logged = [r.getMessage() for r in caplog.records if r.name == "statelink.server"]
    assert any("the result of tags is not JSON (set)" in line for line in logged), logged
    assert conn.call("rpc.ping")["result"] == "pong"  # the connection carries on


def test_serve_insecure_logs_a_warning() -> None:
    env = {k: v for k, v in os.environ.items() if k != "STATELINK_SECRET"}
    with mock.patch.dict(os.environ, env, clear=True):
        served = ServeProcess("--host", "0.0.0.0", "--insecure")
    try:
        line = served.lines.get(timeout=WAIT)
        assert "WARNING" in line and "--insecure" in line and "without a secret" in line, line
    finally:
        assert served.stop() == 0
