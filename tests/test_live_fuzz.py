"""A live-socket fuzzer and hostile clients against a server in a child process.

Each fuzz round opens a connection, sends seeded garbage (random bytes, truncated and mutated
JSON-RPC, deep nesting, huge numbers, invalid UTF-8, oversized lines and batches), then a
barrier ``rpc.ping``. Every line the server sends back must be a well-formed JSON-RPC reply; the
connection may only be closed after a frame-limit error. After each round a normal client's
``rpc.ping`` is answered, and the server's RSS (from /proc/PID/status) stays under a bound.

Reproduce a failure with ``STATELINK_FUZZ_SEED=<seed printed in the failure>``.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from reliability_helpers import (
    ChildServer,
)
from support import WAIT
from support import RawConnection as Raw

from controller import Client
from statemachines import errorkinds as ek

SEED = int(os.environ.get("STATELINK_FUZZ_SEED", "20261126"))
ROUNDS = 2000
DEADLINE = 20.0  #: seconds: the fuzz loop stops early rather than run longer
MAX_FRAME, MAX_BATCH, MAX_DEPTH = 65536, 20, 16
RSS_BOUND_KIB = 128 * 1024  #: absolute bound for the child server's resident memory

SEEDS = [
    {"jsonrpc": "2.0", "id": 1, "method": "echo", "params": [{"a": [1, 2.5, {"b": "c"}]}]},
    {"jsonrpc": "2.0", "id": "s", "method": "add", "params": {"a": 1, "b": 2}},
    {"jsonrpc": "2.0", "method": "echo", "params": [1]},
    {"jsonrpc": "2.0", "id": 2, "method": "rpc.ping"},
    {"jsonrpc": "2.0", "id": 3, "method": "rpc.stats"},
    {"jsonrpc": "2.0", "id": 4, "method": "rpc.cancel", "params": {"id": 1}},
    {"jsonrpc": "2.0", "id": 5, "method": "rpc.subscribe", "params": {"method": "device.state"}},
    {"jsonrpc": "2.0", "id": 6, "method": "fail", "params": ["x"]},
    {"jsonrpc": "2.0", "id": 7, "method": "big", "params": [1000]},
    {"jsonrpc": "2.0", "id": 8, "method": "rpc.hello", "params": {"client": "fuzz", "nonce": "n"}},
    {"jsonrpc": "2.0", "id": None, "method": "asleep", "params": [0.01, "z"]},
]


def seed_line(rng: random.Random) -> bytes:
    return json.dumps(rng.choice(SEEDS)).encode()


def random_bytes(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2048)))


def truncated(rng: random.Random) -> bytes:
    line = seed_line(rng)
    return line[: rng.randint(0, len(line) - 1)] + b"\n"


def mutated(rng: random.Random) -> bytes:
    line = bytearray(seed_line(rng))
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(len(line))
        op = rng.randrange(4)
        if op == 0:
            line[pos] = rng.getrandbits(8)
        elif op == 1:
            line.insert(pos, rng.choice(b'{}[]",:\\0123456789eE-+.tfn \x00\xff'))
        elif op == 2 and len(line) > 1:
            del line[pos]
        else:
            line[pos:pos] = line[pos : pos + rng.randint(1, 16)]
    return bytes(line) + b"\n"


def deep(rng: random.Random) -> bytes:
    depth = rng.choice([MAX_DEPTH, MAX_DEPTH + 1, 100, 5000, 30000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    inner = opener * depth + b"1" + closer * depth
    if rng.random() < 0.5:
        return b'{"jsonrpc":"2.0","id":1,"method":"echo","params":[' + inner + b"]}\n"
    return inner + b"\n"


HUGE = [
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"1" * 5000,
    b"9" * 4000,
    b"-0",
    b"1.7976931348623157e309",
    b"123456789012345678901234567890",
    b"0.0000000000000000000001",
    b"NaN",
    b"Infinity",
]


def huge_numbers(rng: random.Random) -> bytes:
    number = rng.choice(HUGE)
    where = rng.randrange(5)
    if where == 0:
        return b'{"jsonrpc":"2.0","id":' + number + b',"method":"echo","params":[1]}\n'
    if where == 3:  # an invalid message whose id has no JSON form
        return b'{"jsonrpc":"1.0","id":' + number + b',"method":"echo"}\n'
    if where == 4:
        return (
            b'[{"jsonrpc":"2.0","id":1,"method":"rpc.ping"},{"jsonrpc":"2.0","id":'
            + number
            + b',"method":"rpc.ping"}]\n'
        )
    if where == 1:
        return b'{"jsonrpc":"2.0","id":9,"method":"echo","params":[' + number + b"]}\n"
    return b'{"jsonrpc":"2.0","id":9,"method":"add","params":[' + number + b"," + number + b"]}\n"


BAD_UTF8 = [b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"]


def invalid_utf8(rng: random.Random) -> bytes:
    bad = rng.choice(BAD_UTF8)
    if rng.random() < 0.3:  # valid JSON escapes of lone surrogates, echoed back
        return b'{"jsonrpc":"2.0","id":"u","method":"echo","params":["\\ud800x\\udfff"]}\n'
    return b'{"jsonrpc":"2.0","id":"u","method":"echo","params":["' + bad + b'"]}\n'


def oversized_line(rng: random.Random) -> bytes:
    size = MAX_FRAME + rng.choice([1, 2, 100, 200_000])
    body = b'{"jsonrpc":"2.0","id":1,"method":"echo","params":["'
    return body + b"x" * size + (b'"]}\n' if rng.random() < 0.5 else b"")


def batches(rng: random.Random) -> bytes:
    size = rng.choice([0, 1, MAX_BATCH, MAX_BATCH + 1, 500])
    items = []
    for _ in range(size):
        roll = rng.random()
        items.append(
            seed_line(rng)
            if roll < 0.6
            else b"1"
            if roll < 0.7
            else b"[]"
            if roll < 0.8
            else json.dumps({"jsonrpc": "2.0", "id": rng.random(), "result": 1}).encode()
        )
    return b"[" + b",".join(items) + b"]\n"


def odd_ids(rng: random.Random) -> bytes:
    value = rng.choice([b"true", b"{}", b"[]", b"null", b'"' + b"i" * 10000 + b'"', b"1.5"])
    return b'{"jsonrpc":"2.0","id":' + value + b',"method":"rpc.ping"}\n'


def framing(rng: random.Random) -> bytes:
    return rng.choice(
        [
            b"\n" * 50,
            b"\r\n",
            b"\x00\n",
            b" \t \n",
            seed_line(rng) + b"\r\n",
            b"\n".join(seed_line(rng) for _ in range(30)) + b"\n",
        ]
    )


GENERATORS: list[Callable[[random.Random], bytes]] = [
    random_bytes,
    truncated,
    mutated,
    deep,
    huge_numbers,
    invalid_utf8,
    oversized_line,
    batches,
    odd_ids,
    framing,
]


def send_in_pieces(sock: socket.socket, data: bytes, rng: random.Random) -> bool:
    """Send ``data`` in random pieces; False when the server closed the connection."""
    try:
        while data:
            cut = rng.choice([1, 7, 512, 65536, len(data)])
            sock.sendall(data[:cut])
            data = data[cut:]
    except OSError:
        return False
    return True


def check_reply(line: bytes, where: str) -> dict:
    """A line from the server is one JSON-RPC reply or a batch of them; returns the last."""
    value = json.loads(line.decode("utf-8"))
    items = value if isinstance(value, list) else [value]
    assert items, where
    for item in items:
        assert isinstance(item, dict) and item.get("jsonrpc") == "2.0", (where, line[:300])
        if "error" in item:
            assert "result" not in item and isinstance(item["error"]["code"], int), where
            assert isinstance(item["error"]["message"], str), where
        else:
            assert "result" in item or "method" in item, (where, line[:300])
    return items[-1]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory) -> Iterator[ChildServer]:
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    args = [
        "--max-frame",
        str(MAX_FRAME),
        "--max-batch",
        str(MAX_BATCH),
        "--max-depth",
        str(MAX_DEPTH),
        "--timeout",
        "2",
        "--workers",
        "4",
    ]
    with ChildServer("test-server", args, log, lifetime=120) as child:
        yield child


def test_live_fuzz(fuzz_server):
    child = fuzz_server
    rng = random.Random(SEED)
    started = time.monotonic()
    peak = 0
    with Client(child.address, reconnect=False) as normal:
        rounds = 0
        for rounds in range(1, ROUNDS + 1):
            generator = rng.choice(GENERATORS)
            payload = b"".join(generator(rng) for _ in range(rng.randint(1, 3)))
            where = f"seed {SEED} round {rounds} ({generator.__name__})"
            barrier = f"barrier-{rounds}"
            with Raw(child.address, timeout=WAIT) as raw:
                sent = send_in_pieces(raw.sock, payload, rng)
                if sent:
                    sent = send_in_pieces(
                        raw.sock,
                        b"\n"
                        + json.dumps(
                            {"jsonrpc": "2.0", "id": barrier, "method": "rpc.ping"}
                        ).encode()
                        + b"\n",
                        rng,
                    )
                frame_error = False
                while True:
                    line = raw.try_line(WAIT)
                    if line is None:
                        assert frame_error or not sent, f"{where}: closed without a frame error"
                        break
                    last = check_reply(line, where)
                    error = last.get("error") or {}
                    if isinstance(error.get("data"), dict) and "max_frame" in error["data"]:
                        frame_error = True
                    if last.get("id") == barrier:
                        assert last["result"] == "pong", where
                        break
            assert normal.call("rpc.ping", timeout=2.0) == "pong", where
            if rounds % 10 == 0:
                peak = max(peak, child.rss_kib())
                assert peak < RSS_BOUND_KIB, f"{where}: server RSS {peak} KiB"
            if time.monotonic() - started > DEADLINE:
                break
        snapshot = normal.call("rpc.stats")
    assert child.alive()
    assert rounds >= 200, f"only {rounds} rounds in {DEADLINE} s"
    assert child.rss_kib() < RSS_BOUND_KIB
    # the garbage was seen as garbage
    assert snapshot["errors_by_code"].get(str(ek.PARSE_ERROR), 0) > 0
    print(
        f"fuzz: seed {SEED}, {rounds} rounds, peak RSS {peak} KiB, "
        f"errors {snapshot['errors_by_code']}, closed {snapshot['closed_by_reason']}"
    )


def test_hundreds_of_slow_and_silent_clients_do_not_stop_normal_clients(fuzz_server):
    """300 connections: half send nothing, half trickle a request one byte per pass over all
    of them. Meanwhile normal clients are served promptly; the tricklers are answered too."""
    child = fuzz_server
    hostile, silent = 300, 150
    line = b'{"jsonrpc":"2.0","id":"slow","method":"echo","params":["one byte at a time"]}\n'
    socks = [socket.create_connection(child.address, timeout=WAIT) for _ in range(hostile)]
    tricklers = socks[silent:]
    worst = 0.0
    try:
        with Client(child.address, reconnect=False) as normal:
            assert normal.call("rpc.stats")["connections"] >= hostile + 1
            for pos in range(len(line)):
                for sock in tricklers:
                    sock.sendall(line[pos : pos + 1])
                if pos % 8 == 0:
                    begin = time.monotonic()
                    assert normal.call("echo", [pos], timeout=2.0) == pos
                    with Client(child.address, reconnect=False) as fresh:  # new ones too
                        assert fresh.call("rpc.ping", timeout=2.0) == "pong"
                    worst = max(worst, time.monotonic() - begin)
            answered = read_one_line_each(tricklers)
            assert answered == len(tricklers)
            assert normal.call("rpc.stats")["connections"] >= hostile + 1
        assert worst < 2.0, f"a normal call took {worst:.2f} s"
    finally:
        for sock in socks:
            sock.close()
    assert child.rss_kib() < RSS_BOUND_KIB


def read_one_line_each(socks: list[socket.socket]) -> int:
    """How many of ``socks`` deliver one complete, correct reply line within WAIT."""
    selector = selectors.DefaultSelector()
    buffers = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = b""
    done = 0
    deadline = time.monotonic() + WAIT
    while done < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            buffers[sock] += sock.recv(65536)
            if b"\n" in buffers[sock]:
                reply = json.loads(buffers[sock].split(b"\n")[0])
                assert reply == {"jsonrpc": "2.0", "id": "slow", "result": "one byte at a time"}
                selector.unregister(sock)
                done += 1
    selector.close()
    return done


def test_ids_without_a_json_form_are_answered_with_a_null_id(fuzz_server):
    """``"id": 1e400`` decodes to infinity, which JSON cannot carry back: the reply has id null,
    the other calls of a batch are still answered, and the connection goes on."""
    with Raw(fuzz_server.address) as raw:
        raw.send_line(b'{"jsonrpc":"2.0","id":1e400,"method":"rpc.ping"}')
        assert raw.json()["id"] is None
        raw.send_line(b'{"jsonrpc":"1.0","id":-1e400,"method":"rpc.ping"}')
        reply = raw.json()
        assert reply["id"] is None and "error" in reply
        raw.send_line(
            b'[{"jsonrpc":"2.0","id":1,"method":"echo","params":[1]},'
            b'{"jsonrpc":"2.0","id":1e999,"method":"rpc.ping"}]'
        )
        replies = raw.json()
        assert {"jsonrpc": "2.0", "id": 1, "result": 1} in replies and len(replies) == 2
        assert raw.call("rpc.ping")["result"] == "pong"
