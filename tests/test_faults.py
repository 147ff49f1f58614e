"""Faults (docs/reliability.md): handlers that raise, hang or raise SystemExit/KeyboardInterrupt,
device handlers that fault their device, a server killed with SIGKILL and restarted on the same
port (requests, client and a workflow run), and clients that vanish with requests in flight.
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import Future

import pytest
from reliability_helpers import (
    HOST,
    ChildServer,
    serve,
    stats,
    write_device,
)
from support import WAIT, journal_entries, wait_until
from support import RawConnection as Raw

from controller import (
    Client,
    CommandTimeoutError,
    ConnectionLostError,
    DeviceFaultError,
    NotAllowedError,
)
from controller.devices import add_device
from statemachines import errorkinds as ek
from statemachines.device import load_device


def test_a_handler_that_raises_is_a_device_fault_and_the_server_goes_on():
    with serve() as server, Client(server.address, reconnect=False) as client:
        with pytest.raises(DeviceFaultError) as info:
            client.call("fail", ["the sensor is unplugged"])
        assert info.value.code == ek.DEVICE_FAULT
        assert info.value.message == "fail failed: RuntimeError: the sensor is unplugged"
        assert info.value.data == {
            "exception": "RuntimeError",
            "message": "the sensor is unplugged",
        }
        assert "Traceback" not in info.value.message
        assert client.call("echo", ["next"]) == "next"


def test_a_handler_that_hangs_past_its_timeout():
    with serve(timeout=0.3, workers=2) as server, Client(server.address, reconnect=False) as client:
        hung = client.send_command("hang", [30], timeout=WAIT)
        assert client.call("echo", ["served meanwhile"]) == "served meanwhile"
        with pytest.raises(CommandTimeoutError) as info:
            hung.result(timeout=WAIT)
        assert info.value.code == ek.TIMEOUT
        assert info.value.data == {"timeout": 0.3, "method": "hang"}
        server.test_release.set()  # the abandoned worker finishes; its outcome is dropped
        wait_until(lambda: client.call("rpc.stats")["late_outcomes"] == 1)
        assert client.call("echo", ["after"]) == "after"


@pytest.mark.parametrize(
    "method, exception",
    [
        ("raise_system_exit", "SystemExit"),
        ("raise_keyboard_interrupt", "KeyboardInterrupt"),
        ("araise_system_exit", "SystemExit"),  # async def: raised on the I/O thread itself
        ("araise_keyboard_interrupt", "KeyboardInterrupt"),
    ],
)
def test_system_exit_and_keyboard_interrupt_in_a_handler(method, exception):
    with serve(workers=1) as server, Client(server.address, reconnect=False) as client:
        for _ in range(2):
            with pytest.raises(DeviceFaultError) as info:
                client.call(method)
            assert info.value.data["exception"] == exception
            # the single worker thread and the I/O thread both survived
            assert [client.call("echo", [i]) for i in range(3)] == [0, 1, 2]
        assert server._thread is not None and server._thread.is_alive()
        assert all(thread.is_alive() for thread in server.pool._threads)


# -- devices ---------------------------------------------------------------------------------
@pytest.fixture
def device_server(tmp_path):
    # `slow` returns at once when cancelled (ctx.sleep), so a cancel leaves nothing half done
    spec = load_device(write_device(tmp_path, slow_cancelled="idle"))
    with serve(workers=2) as server:
        add_device(server, spec)
        yield server


def test_a_device_handler_that_raises_moves_the_device_to_fault(device_server):
    states: list[str] = []
    seen_fault = threading.Event()

    def on_state(params: dict) -> None:
        states.append(params["state"])
        if params["state"] == "fault":
            seen_fault.set()

    with Client(device_server.address, reconnect=False) as client:
        client.subscribe("device.state", on_state)
        with pytest.raises(DeviceFaultError, match="the motor stalled"):
            client.call("testdev.boom")
        assert seen_fault.wait(WAIT)
        assert states == ["busy", "fault"]
        assert client.call("testdev.state") == {"device": "testdev", "state": "fault"}
        with pytest.raises(NotAllowedError) as info:
            client.call("testdev.boom")
        assert info.value.data["state"] == "fault"
        assert client.call("testdev.ok") == {"ok": True}  # from "*": allowed in fault
        assert client.call("testdev.reset") == {"ok": True}
        assert client.call("testdev.state")["state"] == "idle"
        with pytest.raises(DeviceFaultError):  # and it faults again, every time
            client.call("testdev.boom")
        assert client.call("testdev.state")["state"] == "fault"


def test_a_device_handler_that_overruns_its_timeout_faults_the_device(device_server):
    with Client(device_server.address, reconnect=False) as client:
        with pytest.raises(CommandTimeoutError) as info:
            client.call("testdev.overrun")
        assert info.value.data["timeout"] == 0.3
        assert client.call("testdev.state")["state"] == "fault"
        client.call("testdev.reset")
        assert client.call("testdev.state")["state"] == "idle"


# -- clients that vanish ---------------------------------------------------------------------
@pytest.mark.parametrize("how", ["reset", "close"])
def test_a_client_that_disconnects_with_requests_in_flight_leaks_nothing(device_server, how):
    """``reset``: the server sees the connection lost at once and cancels what it can.
    ``close`` (FIN): indistinguishable from a half-close, so the server keeps the connection
    to answer; its first reply meets the peer's reset. Either way nothing is left behind."""
    server = device_server
    base = stats(server.address)
    seconds = 10 if how == "reset" else 0.3  # the device command: cancelled, or finishes
    for round_ in range(3):
        server.test_release.clear()
        raw = Raw(server.address)
        for i in range(2):
            raw.request("hang", [30], id=f"hang-{i}")  # both workers blocked
        for i in range(3):
            raw.request("echo", [i], id=f"queued-{i}")  # waiting for a worker
        raw.request("asleep", [0.2, "x"], id="async")  # a task on the loop
        raw.request("testdev.slow", {"seconds": seconds}, id="device-running")
        raw.request("testdev.ok", id="device-queued")  # behind it in the device lane
        wait_until(lambda: stats(server.address)["requests_in_flight"] == 8 + 1)
        raw.abort() if how == "reset" else raw.close()
        server.test_release.set()  # let the blocked handlers finish
        wait_until(
            lambda: (
                (s := stats(server.address))["requests_in_flight"] == 1 and s["connections"] == 1
            ),
            what=f"round {round_}: nothing left in flight",
        )
    assert sum(len(conn.session.calls) for conn in server.connections) == 0
    assert server.pool.pending == 0
    after = stats(server.address)
    assert after["connections"] == base["connections"] == 1
    with Client(server.address, reconnect=False) as client:
        assert client.call("testdev.state")["state"] == "idle"  # cancelled/finished, no fault
        assert client.call("echo", ["fine"]) == "fine"


# -- the server is killed --------------------------------------------------------------------
def test_server_killed_and_restarted_pending_requests_resolve_and_client_reconnects(tmp_path):
    log = tmp_path / "server.log"
    child = ChildServer("test-server", ["--port", "0", "--workers", "2"], log).start()
    try:
        up, down = threading.Event(), threading.Event()
        with Client(child.address, max_backoff=0.2) as client:
            client.on_connection(lambda ok: (up if ok else down).set())
            assert client.call("echo", ["before"]) == "before"
            pending: list[Future[object]] = [
                client.send_command("hang", [30], timeout=30) for _ in range(2)
            ]
            pending += [client.send_command("asleep", [30], timeout=30) for _ in range(3)]
            wait_until(lambda: stats(child.address)["requests_in_flight"] == 5 + 1)
            child.kill()
            for future in pending:
                with pytest.raises(ConnectionLostError, match="lost before the reply"):
                    future.result(timeout=WAIT)
            assert down.wait(WAIT)
            with pytest.raises(ConnectionLostError):  # no server: fails fast, never hangs
                client.call("echo", ["while down"], timeout=WAIT)
            port = child.address[1]
            child = ChildServer("test-server", ["--port", str(port)], log).start()
            assert child.address == (HOST, port)
            assert up.wait(WAIT)
            assert client.call("echo", ["after"]) == "after"
            assert client.reconnects == 1
            assert client.pending == 0
    finally:
        child.kill()


WORKFLOW = """\
name: survive-a-restart
servers: {{dev: "{host}:{port}"}}
initial: work
states:
  work:
    command: testdev.slow
    params: {{seconds: 20}}
    timeout: 30s
    next: done
    on_error: {{connection_lost: recover}}
  recover:
    command: testdev.state
    timeout: 5s
    retry: {{attempts: 400, interval: 50ms, backoff: 1, on: [connection_lost]}}
    next: reset
  reset:
    command: testdev.reset
    timeout: 5s
    next: again
  again:
    command: testdev.slow
    params: {{seconds: 0}}
    timeout: 5s
    next: done
  done:
    final: success
"""


def test_a_workflow_follows_its_error_route_when_the_server_is_killed_and_restarted(tmp_path):
    from controller.runner import WorkflowRunner
    from statemachines.workflow import parse_workflow

    device = write_device(tmp_path)
    log = tmp_path / "server.log"
    serve_args = ["--device", str(device), "--state-dir", str(tmp_path / "state")]
    child = ChildServer("cli", ["serve", "--port", "0", *serve_args], log).start()
    host, port = child.address
    journal = tmp_path / "run.jsonl"
    try:
        spec = parse_workflow(WORKFLOW.format(host=host, port=port), str(tmp_path / "wf.yaml"))
        with WorkflowRunner() as runner, Client(child.address, reconnect=False) as probe:
            handle = runner.start(spec, journal=journal)
            wait_until(
                lambda: probe.call("testdev.state")["state"] == "busy",
                what="the run's command to be running on the device",
            )
            child.kill()
            child = ChildServer("cli", ["serve", "--port", str(port), *serve_args], log).start()
            assert handle.wait(30) == "success", handle.history[-3:]
        entries = journal_entries(journal)  # what the run recorded, without its sends
        errors = [e for e in entries if e["event"] == "error"]
        assert errors[0]["state"] == "work" and errors[0]["error"]["kind"] == "connection_lost"
        assert all(e["error"]["kind"] == "connection_lost" for e in errors)
        visited = [e["state"] for e in entries]
        assert visited.index("work") < visited.index("recover") < visited.index("again")
        # the restarted server put the device in fault (its command was interrupted), which
        # only the reset leaves
        (state,) = [e for e in entries if e["event"] == "reply" and e["state"] == "recover"]
        assert state["result"]["state"] == "fault", state
        assert [e["event"] for e in entries if e["state"] == "reset"] == ["reply"]
        assert entries[-1]["event"] == "finished" and entries[-1]["final"] == "success"
        assert entries[-1]["state"] == "done"
        assert re.search(r"serving on", child.output())
    finally:
        child.kill()
