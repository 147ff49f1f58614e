"""Idempotency keys on the server (issue 11): a keyed device command runs at most once per key.

Real sockets on 127.0.0.1, in-process servers where the server is not the thing being killed,
and a real ``statelink serve`` process killed with SIGKILL for the restart. The test device's
handler appends every invocation to ``runs.log``: that file is how a test proves what ran.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import WAIT, RawConnection, ServeProcess, statelink, wait_until

from controller import CommandServer, Limits
from controller.devices import DeviceRuntime, add_device
from controller.keystore import KEYS_FILE, KeyStoreLocked
from statemachines import errorkinds as ek
from statemachines.device import load_device

HW = """
import json
import os
import threading

gate = threading.Event()  # set by the tests that hold the handler
LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs.log")


def work(ctx, tag="", hold=False, seconds=0, report=False, pad=0, depth=0):
    with open(LOG, "a") as log:
        log.write(json.dumps({"tag": tag}) + "\\n")
    if hold:
        while not gate.is_set():
            if not ctx.sleep(0.01):
                return {"tag": tag, "cancelled": True}
    elif seconds:
        ctx.sleep(seconds)
    if report:
        ctx.progress(1.0, "done")
    if pad:
        return {"tag": tag, "pad": "x" * pad}
    if depth:
        nested = []
        for _ in range(depth):
            nested = [nested]
        return nested
    return {"tag": tag}


def boom(ctx, tag=""):
    with open(LOG, "a") as log:
        log.write(json.dumps({"tag": tag}) + "\\n")
    raise RuntimeError("the motor stalled")


def reset(ctx):
    return "reset"
"""

CONFIG = """
device: {name}
states: [idle, busy, fault]
initial: idle
fault: fault
timeout: 20s
commands:
  work:
    from: [idle]
    running: busy
    to: idle
    handler: {name}_hw:work
    params:
      tag: {{type: string, default: ""}}
      hold: {{type: boolean, default: false}}
      seconds: {{type: number, min: 0, max: 60, default: 0}}
      report: {{type: boolean, default: false}}
      pad: {{type: integer, min: 0, max: 100000000, default: 0}}
      depth: {{type: integer, min: 0, max: 100000, default: 0}}
  boom:
    from: [idle]
    handler: {name}_hw:boom
    params:
      tag: {{type: string, default: ""}}
  reset: {{from: [fault], to: idle, handler: {name}_hw:reset}}
"""


def write_device(directory: Path, name: str = "keyed") -> Path:
    """``<name>.yaml`` and its handler module in ``directory`` (invocations: ``runs.log``)."""
    (directory / f"{name}_hw.py").write_text(textwrap.dedent(HW))
    path = directory / f"{name}.yaml"
    path.write_text(textwrap.dedent(CONFIG.format(name=name)))
    return path


def runs(directory: Path) -> list[str]:
    """The tags of every handler invocation so far."""
    log = directory / "runs.log"
    if not log.exists():
        return []
    return [json.loads(line)["tag"] for line in log.read_text().splitlines()]


def send(raw: RawConnection, method: str, params: Any, key: str | None, id: Any) -> None:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        message["params"] = params
    if key is not None:
        message["key"] = key
    raw.send_json(message)


def keyed(raw: RawConnection, method: str, params: Any, key: str, id: Any = 1) -> dict[str, Any]:
    """Send a keyed request; the next line must be its reply."""
    send(raw, method, params, key, id)
    reply = raw.json()
    assert isinstance(reply, dict) and reply.get("id") == id, reply
    return reply


def on_disk(state_dir: Path) -> set[str]:
    """The keys committed to the store's file (read by a second SQLite connection)."""
    with contextlib.closing(sqlite3.connect(state_dir / KEYS_FILE, timeout=WAIT)) as db:
        return {row[0] for row in db.execute("SELECT key FROM keys")}


def kind(reply: dict[str, Any]) -> str:
    return ek.kind_of(reply["error"]["code"])


class Served:
    def __init__(self, server: CommandServer, runtime: DeviceRuntime, directory: Path):
        self.server = server
        self.runtime = runtime
        self.directory = directory
        self.gate: threading.Event = runtime.handlers["work"].__globals__["gate"]

    def raw(self) -> RawConnection:
        return RawConnection(self.server.address)

    def busy(self) -> bool:
        return self.runtime.state == "busy"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = CommandServer(port=0, workers=2, state_dir=tmp_path / "state")
    runtime = add_device(server, load_device(write_device(tmp_path)))
    with server:
        result = Served(server, runtime, tmp_path)
        try:
            yield result
        finally:
            result.gate.set()


# -- one execution per key ---------------------------------------------------------------------
def test_same_key_after_the_end_replays_the_stored_outcome(served: Served) -> None:
    with served.raw() as raw:
        first = keyed(raw, "keyed.work", {"tag": "a"}, "k-1", id=1)
        assert first == {"jsonrpc": "2.0", "id": 1, "result": {"tag": "a"}}  # no "replayed"
        again = keyed(raw, "keyed.work", {"tag": "a"}, "k-1", id=2)
        assert again == {"jsonrpc": "2.0", "id": 2, "result": {"tag": "a"}, "replayed": True}
        other = keyed(raw, "keyed.work", {"tag": "a"}, "k-2", id=3)
        assert other["result"] == {"tag": "a"} and "replayed" not in other
    assert runs(served.directory) == ["a", "a"]  # once per key


def test_a_failed_execution_is_replayed_too(served: Served) -> None:
    with served.raw() as raw:
        first = keyed(raw, "keyed.boom", {"tag": "b"}, "k-boom", id=1)
        assert kind(first) == "device_fault" and "replayed" not in first
        again = keyed(raw, "keyed.boom", {"tag": "b"}, "k-boom", id=2)
        assert again["error"] == first["error"] and again["replayed"] is True
    assert runs(served.directory) == ["b"]


def test_same_key_while_running_joins_the_execution(served: Served) -> None:
    with served.raw() as first, served.raw() as second:
        send(first, "keyed.work", {"tag": "j", "hold": True}, "k-join", "first")
        wait_until(lambda: runs(served.directory) == ["j"], what="the handler to start")
        send(second, "keyed.work", {"tag": "j", "hold": True}, "k-join", "second")
        send(first, "keyed.work", {"tag": "j", "hold": True}, "k-join", "third")
        assert first.call("rpc.ping")["result"] == "pong"  # the joined ones wait, not this
        served.gate.set()
        replies = {reply["id"]: reply for reply in (first.json(), first.json(), second.json())}
    assert runs(served.directory) == ["j"]
    assert sorted(replies) == ["first", "second", "third"]
    for reply in replies.values():
        assert reply["result"] == {"tag": "j"} and "replayed" not in reply


def test_a_result_too_large_for_a_frame_is_kept_as_the_error_it_was_answered_with(
    tmp_path: Path,
) -> None:
    limits = Limits(max_frame=4096)
    state_dir = tmp_path / "state"
    server = CommandServer(port=0, workers=2, state_dir=state_dir, limits=limits)
    add_device(server, load_device(write_device(tmp_path)))
    with server, RawConnection(server.address) as raw:
        first = keyed(raw, "keyed.work", {"tag": "big", "pad": 10_000}, "k-big", id=1)
        assert kind(first) == ek.kind_of(ek.INTERNAL_ERROR) and "replayed" not in first
        data = first["error"]["data"]
        assert data["limit"] == 4096 and data["size"] > 10_000
        again = keyed(raw, "keyed.work", {"tag": "big", "pad": 10_000}, "k-big", id=2)
        assert again["error"] == first["error"] and again["replayed"] is True
        assert raw.call("rpc.ping")["result"] == "pong"  # the connection carries on
    assert runs(tmp_path) == ["big"]  # the retry did not run it again
    # the store holds the error that was answered, not the 10 kB result
    with contextlib.closing(sqlite3.connect(state_dir / KEYS_FILE, timeout=WAIT)) as db:
        (outcome,) = db.execute("SELECT outcome FROM keys WHERE key = 'k-big'").fetchone()
    assert json.loads(outcome) == {"error": first["error"]}


def test_a_joined_request_gets_the_progress_too(served: Served) -> None:
    with served.raw() as first, served.raw() as second:
        params = {"tag": "p", "hold": True, "report": True}
        send(first, "keyed.work", params, "k-progress", 1)
        wait_until(lambda: runs(served.directory) == ["p"], what="the handler to start")
        second.call("rpc.subscribe", {"method": "rpc.progress"}, id="sub")  # opt in
        send(second, "keyed.work", params, "k-progress", 2)
        assert second.call("rpc.ping", id="ping")["result"] == "pong"  # the join is in
        served.gate.set()
        lines = [second.json(), second.json()]
    assert lines[0]["method"] == "rpc.progress" and lines[0]["params"]["id"] == 2
    assert lines[1] == {"jsonrpc": "2.0", "id": 2, "result": {"tag": "p"}}


def test_a_lost_connection_does_not_cancel_a_keyed_execution(served: Served) -> None:
    first = served.raw()
    send(first, "keyed.work", {"tag": "x", "hold": True}, "k-lost", 1)
    wait_until(lambda: runs(served.directory) == ["x"], what="the handler to start")
    first.abort()  # the peer is gone: a retry will come
    with served.raw() as retry:
        send(retry, "keyed.work", {"tag": "x", "hold": True}, "k-lost", 2)
        assert retry.call("rpc.ping", id="ping")["result"] == "pong"
        served.gate.set()
        assert retry.json() == {"jsonrpc": "2.0", "id": 2, "result": {"tag": "x"}}
    assert runs(served.directory) == ["x"]
    assert served.runtime.state == "idle"


def test_cancel_of_any_request_cancels_the_execution(served: Served) -> None:
    with served.raw() as first, served.raw() as second:
        send(first, "keyed.work", {"tag": "c", "hold": True}, "k-cancel", 1)
        wait_until(lambda: runs(served.directory) == ["c"], what="the handler to start")
        send(second, "keyed.work", {"tag": "c", "hold": True}, "k-cancel", 2)
        assert second.call("rpc.cancel", {"id": 2}, id="cancel")["result"] == {"cancelled": True}
        assert kind(second.json()) == "cancelled"
        assert kind(first.json()) == "cancelled"
        # cancelled halfway: no `cancelled:` state, so the device is in fault
        assert first.call("keyed.state")["result"]["state"] == "fault"
        replay = keyed(first, "keyed.work", {"tag": "c", "hold": True}, "k-cancel", id=3)
        assert kind(replay) == "cancelled" and replay["replayed"] is True
    assert runs(served.directory) == ["c"]


# -- conflicts and what does not use a key up ----------------------------------------------
def test_same_key_with_other_params_or_method_is_a_conflict(served: Served) -> None:
    with served.raw() as raw:
        assert keyed(raw, "keyed.work", {"tag": "a"}, "k-c", id=1)["result"] == {"tag": "a"}
        other_params = keyed(raw, "keyed.work", {"tag": "b"}, "k-c", id=2)
        assert kind(other_params) == "key_conflict"
        assert other_params["error"]["data"] == {"key": "k-c", "method": "keyed.work"}
        other_method = keyed(raw, "keyed.boom", {"tag": "a"}, "k-c", id=3)
        assert kind(other_method) == "key_conflict"
        assert "keyed.work" in other_method["error"]["message"]
    assert runs(served.directory) == ["a"]


def test_refusals_do_not_use_the_key_up(served: Served) -> None:
    with served.raw() as raw:
        bad = keyed(raw, "keyed.work", {"tag": 5}, "k-r", id=1)
        assert kind(bad) == "invalid_params"
        assert kind(keyed(raw, "keyed.reset", None, "k-reset", id=2)) == "not_allowed"
        assert kind(keyed(raw, "keyed.nope", None, "k-r", id=3)) == "unknown_command"
        assert keyed(raw, "keyed.work", {"tag": "r"}, "k-r", id=4)["result"] == {"tag": "r"}
        # fault the device, then the refused reset's key runs for real
        assert kind(keyed(raw, "keyed.boom", None, "k-boom", id=5)) == "device_fault"
        assert keyed(raw, "keyed.reset", None, "k-reset", id=6)["result"] == "reset"
    assert runs(served.directory) == ["r", ""]


def test_a_command_cancelled_in_the_lane_does_not_use_the_key_up(served: Served) -> None:
    with served.raw() as raw:
        send(raw, "keyed.work", {"tag": "first", "hold": True}, "k-first", 1)
        wait_until(lambda: runs(served.directory) == ["first"], what="the handler to start")
        send(raw, "keyed.work", {"tag": "queued"}, "k-queued", 2)
        raw.request("rpc.cancel", {"id": 2}, id="cancel")
        cancelled = raw.json()  # answered at once, inside the rpc.cancel
        assert cancelled["id"] == 2 and kind(cancelled) == "cancelled"
        assert raw.json() == {"jsonrpc": "2.0", "id": "cancel", "result": {"cancelled": True}}
        assert cancelled["error"]["data"]["started"] is False
        served.gate.set()
        assert raw.json()["result"] == {"tag": "first"}
        assert keyed(raw, "keyed.work", {"tag": "queued"}, "k-queued", id=3)["result"] == {
            "tag": "queued"
        }
    assert runs(served.directory) == ["first", "queued"]


def test_rpc_methods_and_function_commands_ignore_the_key(tmp_path: Path) -> None:
    calls: list[int] = []
    server = CommandServer(port=0, state_dir=tmp_path / "state")
    server.add_command("count", lambda: calls.append(1) or len(calls))
    with server, RawConnection(server.address) as raw:
        for request_id in (1, 2):
            assert keyed(raw, "rpc.ping", None, "k", id=request_id)["result"] == "pong"
            reply = keyed(raw, "count", None, "k", id=f"c{request_id}")
            assert reply["result"] == request_id and "replayed" not in reply
    assert len(calls) == 2


def test_an_invalid_key_is_an_invalid_request_before_anything_runs(served: Served) -> None:
    with served.raw() as raw:
        for bad in ("", "x" * 129, 7, None, "line\nbreak"):
            raw.send_json(
                {"jsonrpc": "2.0", "id": "bad", "method": "keyed.work", "key": bad, "params": {}}
            )
            reply = raw.json()
            assert reply["id"] == "bad" and reply["error"]["code"] == ek.INVALID_REQUEST, reply
            assert "key" in reply["error"]["data"]["reason"]
    assert runs(served.directory) == []


def test_without_a_state_dir_keys_are_kept_in_memory(tmp_path: Path) -> None:
    server = CommandServer(port=0)
    add_device(server, load_device(write_device(tmp_path)))
    with server, RawConnection(server.address) as raw:
        assert keyed(raw, "keyed.work", {"tag": "m"}, "k-m", id=1)["result"] == {"tag": "m"}
        assert keyed(raw, "keyed.work", {"tag": "m"}, "k-m", id=2)["replayed"] is True
    assert runs(tmp_path) == ["m"]
    assert not (tmp_path / "state").exists()


# -- persistence ------------------------------------------------------------------------------
def test_keys_survive_a_restart_on_the_same_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    spec = load_device(write_device(tmp_path))
    for attempt in (1, 2):
        server = CommandServer(port=0, state_dir=state)
        add_device(server, spec)
        with server, RawConnection(server.address) as raw:
            reply = keyed(raw, "keyed.work", {"tag": "p"}, "k-persist", id=attempt)
            assert reply["result"] == {"tag": "p"}
            assert reply.get("replayed", False) is (attempt == 2)
    assert runs(tmp_path) == ["p"]
    assert (state / KEYS_FILE).is_file()


def test_two_servers_cannot_share_a_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with CommandServer(port=0, state_dir=state):
        second = CommandServer(port=0, state_dir=state)
        with pytest.raises(KeyStoreLocked, match="in use"):
            second.start()
        assert not second.running


def test_serve_on_a_state_dir_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = ServeProcess("--state-dir", str(state))
    try:
        result = statelink("serve", "--port", "0", "--state-dir", str(state), timeout=WAIT)
    finally:
        assert first.stop() == 0
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert str(state) in message and "in use" in message
    assert f"process {first.proc.pid}" in message


def test_serve_refuses_a_state_dir_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = statelink("serve", "--port", "0", "--state-dir", str(blocker / "state"), timeout=WAIT)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "state directory" in result.stderr


@pytest.mark.parametrize("value", ["soon", "0", "-5s"])
def test_serve_checks_the_key_retention(value: str) -> None:
    result = statelink("serve", "--port", "0", "--key-retention", value, timeout=WAIT)
    assert result.returncode == 2 and "--key-retention" in result.stderr


def test_a_command_running_at_kill_9_answers_interrupted_and_faults_its_device(
    tmp_path: Path,
) -> None:
    """A real ``statelink serve`` killed with SIGKILL mid-command, restarted on its state dir:
    the retried key answers ``interrupted`` (nothing runs again) and the device starts in
    fault, reason "interrupted"."""
    device = write_device(tmp_path)
    state = tmp_path / "state"
    args = ("--device", str(device), "--state-dir", str(state), "--key-retention", "1h")
    first = ServeProcess(*args)
    try:
        with RawConnection(first.address) as raw:
            send(raw, "keyed.work", {"tag": "killed", "seconds": 60}, "k-kill", 1)
            wait_until(lambda: runs(tmp_path) == ["killed"], what="the handler to start")
            send(raw, "keyed.work", {"tag": "done"}, "k-done", 2)  # queued behind it
            wait_until(lambda: on_disk(state) >= {"k-kill", "k-done"}, what="durable begins")
            first.proc.send_signal(signal.SIGKILL)
            assert raw.closed(WAIT)
    finally:
        first.kill()
    second = ServeProcess(*args)
    try:
        with RawConnection(second.address) as raw:
            state_reply = raw.call("keyed.state")["result"]
            assert state_reply == {"device": "keyed", "state": "fault", "reason": "interrupted"}
            again = keyed(raw, "keyed.work", {"tag": "killed", "seconds": 60}, "k-kill", id=3)
            assert kind(again) == "interrupted" and again["replayed"] is True
            assert again["error"]["data"]["device"] == "keyed"
            assert kind(keyed(raw, "keyed.work", {"tag": "other"}, "k-other", id=4)) == (
                "not_allowed"
            )
            assert keyed(raw, "keyed.reset", None, "k-reset", id=5)["result"] == "reset"
            # accepted but still queued at the crash: the server cannot tell it from a started
            # one (its begin was durable), so it is interrupted too, and never runs
            queued = keyed(raw, "keyed.work", {"tag": "done"}, "k-done", id=6)
            assert kind(queued) == "interrupted"
            assert keyed(raw, "keyed.work", {"tag": "new"}, "k-new", id=7)["result"] == {
                "tag": "new"
            }
    finally:
        assert second.stop() == 0
    assert runs(tmp_path) == ["killed", "new"]


def test_a_state_notification_carries_the_interrupted_reason(tmp_path: Path) -> None:
    state = tmp_path / "state"
    spec = load_device(write_device(tmp_path))
    server = CommandServer(port=0, state_dir=state)
    runtime = add_device(server, spec)
    gate = runtime.handlers["work"].__globals__["gate"]
    server.start()
    try:
        with RawConnection(server.address) as raw:
            send(raw, "keyed.work", {"tag": "h", "hold": True}, "k-hold", 1)
            wait_until(lambda: runs(tmp_path) == ["h"], what="the handler to start")
            # the handler ignores nothing, but the key store is closed before it can finish:
            # as after a crash, the key is left running on disk
            server.keys.close()
    finally:
        gate.set()
        server.stop(grace=0)
    # a new server on the same state dir: the device starts in fault, reason interrupted
    server = CommandServer(port=0, state_dir=state)
    add_device(server, spec)
    with server, RawConnection(server.address) as raw:
        assert raw.call("keyed.state")["result"]["reason"] == "interrupted"
        assert raw.call("rpc.subscribe", {"method": "device.state"})["result"]
        raw.request("keyed.reset", id="reset")
        change, reply = raw.json(), raw.json()  # the notification comes before the reply
        assert change["method"] == "device.state"
        assert change["params"]["state"] == "idle" and "reason" not in change["params"]
        assert reply["id"] == "reset" and reply["result"] == "reset"


def test_a_result_nested_too_deep_to_encode_is_answered_and_replayed(served: Served) -> None:
    with served.raw() as raw:
        first = keyed(raw, "keyed.work", {"tag": "d", "depth": 5000}, "k-deep", id=1)
        assert kind(first) == "internal_error", first
        again = keyed(raw, "keyed.work", {"tag": "d", "depth": 5000}, "k-deep", id=2)
        assert kind(again) == "internal_error" and again["replayed"] is True
        assert "not JSON" in first["error"]["message"] and "not JSON" in again["error"]["message"]
        send(raw, "keyed.work", {"tag": "plain", "depth": 5000}, None, 3)  # no key: answered too
        assert kind(raw.json()) == "internal_error"
        assert keyed(raw, "keyed.work", {"tag": "next"}, "k-next", id=4)["result"] == {
            "tag": "next"
        }, "the device's lane goes on"
    assert runs(served.directory) == ["d", "plain", "next"]


def test_a_command_cancelled_by_a_graceful_stop_faults_its_device_at_restart(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    spec = load_device(write_device(tmp_path))
    server = CommandServer(port=0, state_dir=state, grace=0.2)
    runtime = add_device(server, spec)
    server.start()
    try:
        raw = RawConnection(server.address)
        send(raw, "keyed.work", {"tag": "s", "hold": True}, "k-stop", 1)
        wait_until(lambda: runs(tmp_path) == ["s"], what="the handler to start")
    finally:
        server.stop()  # the handler sees ctx.cancelled and returns halfway
    raw.close()
    assert runtime.state != "busy"
    server = CommandServer(port=0, state_dir=state)
    runtime = add_device(server, spec)
    with server, RawConnection(server.address) as raw:
        assert runtime.state == "fault"
        state_reply = raw.call("keyed.state")["result"]
        assert state_reply["state"] == "fault" and state_reply["reason"] == "interrupted"
        assert kind(keyed(raw, "keyed.work", {"tag": "s", "hold": True}, "k-stop", id=2)) == (
            "interrupted"
        )
    assert runs(tmp_path) == ["s"]
