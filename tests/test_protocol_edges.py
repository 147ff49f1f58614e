"""Edges of the wire protocol that other people's clients hit (issue 14), over real sockets."""

from __future__ import annotations

import json
import socket
import threading

from support import WAIT

from controller.protocol import Decoder, Invalid, Request
from statemachines import errorkinds as ek


def test_an_id_no_double_can_hold_is_refused_before_anything_runs(server, raw):
    ran = threading.Event()

    @server.command("touch")
    def touch():
        ran.set()
        return "ran"

    conn = raw()
    conn.send_line('{"jsonrpc":"2.0","id":1e400,"method":"touch"}')
    reply = conn.json()
    assert reply["error"]["code"] == ek.INVALID_REQUEST
    assert "finite" in reply["error"]["data"]["reason"]
    assert reply["id"] is None  # the id cannot be echoed: that is why it is refused
    conn.send_line('{"jsonrpc":"2.0","id":' + str(2**1024) + ',"method":"touch"}')
    assert conn.json()["error"]["code"] == ek.INVALID_REQUEST
    assert conn.call("rpc.ping")["result"] == "pong", "the connection serves on"
    assert not ran.is_set(), "the command never ran"


def test_a_huge_integer_for_a_number_param_is_invalid_params(make_server, raw, tmp_path):
    from controller.devices import add_device
    from statemachines.device import load_device

    (tmp_path / "dev.yaml").write_text(
        "device: arm\nstates: [idle, fault]\ninitial: idle\nfault: fault\n"
        "commands:\n  move:\n    from: [idle]\n    handler: arm_hw:move\n"
        "    params:\n      x: {type: number}\n"
    )
    (tmp_path / "arm_hw.py").write_text("def move(ctx, x):\n    return x\n")
    server = make_server()
    add_device(server, load_device(tmp_path / "dev.yaml"))
    conn = raw(server.address)
    conn.send_line('{"jsonrpc":"2.0","id":1,"method":"arm.move","params":{"x":' + "9" * 400 + "}}")
    reply = conn.json()
    assert reply["error"]["code"] == ek.INVALID_PARAMS, reply
    assert "double" in reply["error"]["message"]
    assert conn.call("arm.move", {"x": 2})["result"] == 2.0


def test_a_last_line_without_newline_before_eof_is_answered(server):
    with socket.create_connection(server.address, timeout=WAIT) as sock:
        sock.sendall(b'{"jsonrpc":"2.0","id":7,"method":"rpc.ping"}')  # no "\n"
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert json.loads(data) == {"jsonrpc": "2.0", "id": 7, "result": "pong"}


def test_a_last_line_without_newline_runs_a_slow_command_to_its_reply(server, release):
    @server.command("slow")
    def slow():
        release.wait(WAIT)
        return "done"

    with socket.create_connection(server.address, timeout=WAIT) as sock:
        sock.sendall(b'{"jsonrpc":"2.0","id":8,"method":"slow"}')
        sock.shutdown(socket.SHUT_WR)
        release.set()
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert json.loads(data)["result"] == "done"


def test_duplicate_members_are_ambiguous_and_refused(server, raw):
    ran = threading.Event()

    @server.command("dangerous")
    def dangerous():
        ran.set()

    conn = raw()
    conn.send_line('{"jsonrpc":"2.0","id":1,"method":"dangerous","method":"rpc.ping"}')
    reply = conn.json()
    assert reply["error"]["code"] == ek.INVALID_REQUEST
    assert "'method' appears twice" in reply["error"]["data"]["reason"]
    conn.send_line('{"jsonrpc":"2.0","id":2,"method":"echo","params":{"value":1,"value":2}}')
    assert "'value' appears twice" in conn.json()["error"]["data"]["reason"]
    assert conn.call("echo", {"value": 3})["result"] == 3
    assert not ran.is_set()


def test_the_decoder_finishes_a_last_line_and_refuses_duplicates() -> None:
    decoder = Decoder()
    assert decoder.feed(b'{"jsonrpc":"2.0","id":1,"method":"a"}') == []
    [event] = decoder.finish()
    assert isinstance(event, Request) and event.method == "a"
    assert decoder.finish() == []
    [dup] = Decoder().feed(b'{"a":{"b":1,"b":2}}\n')
    assert isinstance(dup, Invalid) and dup.code == ek.INVALID_REQUEST


def test_progress_is_opt_in_one_line_per_request_gets_the_reply(make_server, raw):
    from controller.devices import add_device
    from statemachines.device import load_device

    server = make_server()
    add_device(server, load_device("config/devices/demo.yaml"), simulate=True)
    params = {"steps": 3, "delay": 0.01}
    plain = raw(server.address)  # a generic client: send one line, read one line
    reply = plain.call("demo.calibrate", params)
    assert reply["result"]["steps"] == 3, reply
    opted = raw(server.address)
    assert opted.call("rpc.subscribe", {"method": "rpc.progress"})["result"] == {
        "subscribed": "rpc.progress"
    }
    request_id = opted.request("demo.calibrate", params)
    lines = [opted.json() for _ in range(4)]
    assert [m.get("method") for m in lines[:3]] == ["rpc.progress"] * 3
    assert lines[3]["id"] == request_id and lines[3]["result"]["steps"] == 3
    assert opted.call("rpc.unsubscribe", {"method": "rpc.progress"})["result"]
    assert opted.call("demo.calibrate", params)["result"]["steps"] == 3  # no progress first
