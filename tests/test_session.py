"""The session rules with no socket at all: a :class:`~controller.server.Session` on a
:class:`~controller.server.Core`, fed decoded messages, its replies collected from ``send``.

The core runs on a private event loop driven by this test (no I/O thread, no worker pool:
the commands here are registered :class:`Dispatch` objects answered on the loop).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from support import WAIT

from controller.protocol import Batch, Decoder, Invalid, Notification, Request, Response
from controller.server import Call, Core, Deadlines, Limits, Session
from controller.server.builtins import install_builtins
from statemachines import errorkinds as ek


class Echo:
    """Answers at once with its params."""

    def start(self, call: Call) -> None:
        call.resolve(call.params)

    def describe(self) -> dict[str, Any]:
        return {"description": "echo", "params": []}


class Held:
    """Holds every call until the test answers it; counts how often it was answered."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def start(self, call: Call) -> None:
        self.calls.append(call)

    def describe(self) -> dict[str, Any]:
        return {"description": "held", "params": []}


class Peer:
    """A session plus what it sent and whether it asked to hang up."""

    def __init__(self, core: Core) -> None:
        self.sent: list[bytes] = []
        self.hangups: list[str] = []
        self.session = Session(core, self.sent.append, "test:1", hangup=self.hangups.append)

    def feed_line(self, obj: Any) -> None:
        for event in Decoder().feed(json.dumps(obj).encode() + b"\n"):
            self.session.feed(event)

    def replies(self) -> list[Any]:
        out = [json.loads(data) for data in self.sent]
        self.sent.clear()
        return out


@pytest.fixture
def core() -> Iterator[Core]:
    loop = asyncio.new_event_loop()
    core = Core(limits=Limits(max_inflight=2, max_auth_failures=2))
    core.loop = loop
    core.deadlines = Deadlines(loop)
    install_builtins(core)
    core.register("echo", Echo())
    yield core
    loop.close()


def request(method: str, params: Any = None, id: Any = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def test_a_request_gets_its_reply_through_send(core: Core) -> None:
    peer = Peer(core)
    peer.session.feed(Request("echo", [1, 2], "a"))
    assert peer.replies() == [{"jsonrpc": "2.0", "id": "a", "result": [1, 2]}]
    assert peer.session.calls == {} and core.inflight == 0


def test_a_notification_gets_no_reply(core: Core) -> None:
    peer = Peer(core)
    peer.session.feed(Notification("echo", [1]))
    assert peer.replies() == []
    assert core.inflight == 0


def test_a_duplicate_id_in_flight_is_refused_and_the_first_goes_on(core: Core) -> None:
    held = Held()
    core.register("held", held)
    peer = Peer(core)
    peer.feed_line(request("held", id=7))
    peer.feed_line(request("held", id=7))
    (refused,) = peer.replies()
    assert refused["id"] == 7 and refused["error"]["code"] == ek.INVALID_REQUEST
    assert "already in flight" in refused["error"]["message"]
    assert len(held.calls) == 1 and peer.session.calls == {7: held.calls[0]}
    held.calls[0].resolve("first")
    assert peer.replies() == [{"jsonrpc": "2.0", "id": 7, "result": "first"}]
    peer.feed_line(request("echo", ["again"], id=7))  # the id is free again
    assert peer.replies()[0]["result"] == ["again"]


def test_beyond_the_inflight_bound_a_request_is_busy(core: Core) -> None:
    held = Held()
    core.register("held", held)
    peer = Peer(core)
    for i in range(2):
        peer.feed_line(request("held", id=i))
    peer.feed_line(request("echo", id="over"))
    (busy,) = peer.replies()
    assert busy["id"] == "over" and busy["error"]["code"] == ek.BUSY
    assert busy["error"]["data"] == {"max_inflight": 2, "retry": True}
    held.calls[0].resolve(None)
    peer.replies()
    peer.feed_line(request("echo", ["fits"], id="now"))  # one slot free again
    assert peer.replies() == [{"jsonrpc": "2.0", "id": "now", "result": ["fits"]}]


def test_a_batch_is_answered_as_one_array_once_every_item_is_answered(core: Core) -> None:
    held = Held()
    core.register("held", held)
    peer = Peer(core)
    batch = [
        request("echo", ["a"], id=1),
        request("held", id=2),
        {"jsonrpc": "2.0", "method": "echo"},  # a notification: no reply in the array
        {"jsonrpc": "2.0", "id": 3},  # not a request
        request("nope", id=4),
    ]
    (event,) = Decoder().feed(json.dumps(batch).encode() + b"\n")
    assert isinstance(event, Batch)
    peer.session.feed(event)
    assert peer.sent == []  # "held" is not answered yet
    held.calls[0].resolve("b")
    (data,) = peer.sent
    replies = json.loads(data)
    assert [(r["id"], r.get("result"), r.get("error", {}).get("code")) for r in replies] == [
        (1, ["a"], None),
        (3, None, ek.INVALID_REQUEST),
        (4, None, ek.METHOD_NOT_FOUND),
        (2, "b", None),
    ]


def test_the_auth_gate_refuses_everything_but_rpc_hello_before_login(core: Core) -> None:
    core.secret = b"s3cret"
    peer = Peer(core)
    assert not peer.session.authenticated
    peer.feed_line(request("echo", ["x"], id=1))
    (refused,) = peer.replies()
    assert refused["error"]["code"] == ek.UNAUTHORIZED
    assert refused["error"]["data"] == {"auth": "hmac-sha256"}
    peer.feed_line(request("rpc.hello", {"nonce": "n"}, id=2))
    (hello,) = peer.replies()
    assert "challenge" in hello["result"] and hello["result"]["authenticated"] is False
    assert peer.hangups == []
    peer.feed_line(request("rpc.ping", id=3))  # the second failure: hang up
    assert peer.replies()[0]["error"]["code"] == ek.UNAUTHORIZED
    assert peer.hangups == ["auth_failures"]


def test_one_outcome_per_request_later_ones_are_dropped_and_counted(core: Core) -> None:
    held = Held()
    core.register("held", held)
    peer = Peer(core)
    peer.feed_line(request("held", id="x"))
    call = held.calls[0]
    call.resolve("first")
    call.resolve("second")
    call.settle(None, RuntimeError("third"))
    call.cancel()
    assert peer.replies() == [{"jsonrpc": "2.0", "id": "x", "result": "first"}]
    assert core.stats.late_outcomes == 2  # cancel() of an answered call is not an outcome
    assert core.stats.replies_total == 1


def test_a_timeout_answers_once_and_the_late_result_is_dropped(core: Core) -> None:
    held = Held()
    core.register("held", held)
    peer = Peer(core)
    peer.feed_line(request("held", id=1))
    call = held.calls[0]
    timed_out = core.loop.create_future()
    call.set_hooks(on_timeout=lambda: timed_out.set_result(True))
    call.arm_timeout(0.001)
    # the loop runs the deadline; the reply is sent right after the hook, in the same callback
    core.loop.run_until_complete(asyncio.wait_for(timed_out, WAIT))
    (reply,) = peer.replies()
    assert reply["error"]["code"] == ek.TIMEOUT
    call.resolve("too late")
    assert peer.replies() == [] and core.stats.late_outcomes == 1


def test_a_closed_session_cancels_its_calls_and_sends_nothing_more(core: Core) -> None:
    held = Held()
    core.register("held", held)
    peer = Peer(core)
    peer.feed_line(request("held", id=1))
    signal = held.calls[0].cancel_signal()
    peer.session.close()
    assert held.calls[0].cancelled and signal.is_set() and held.calls[0].disconnected
    assert peer.session not in core.sessions
    peer.session.notify("device.state", {})
    assert peer.sent == []


def test_invalid_and_fatal_events(core: Core) -> None:
    peer = Peer(core)
    peer.session.feed(Invalid(ek.PARSE_ERROR, "Parse error"))
    assert peer.replies()[0]["error"]["code"] == ek.PARSE_ERROR
    assert peer.hangups == []
    peer.session.feed(Invalid(ek.INVALID_REQUEST, "too long", fatal=True))
    assert peer.replies()[0]["error"]["code"] == ek.INVALID_REQUEST
    assert peer.hangups == ["frame_limit"]
    peer.session.feed(Response(5, 1))  # a response sent to the server
    assert peer.replies()[0]["error"]["data"] == {"reason": "the server does not take responses"}
