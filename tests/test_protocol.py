"""The sans-IO codec (controller.protocol): framing, limits, validation, encoding. No sockets."""

from __future__ import annotations

import json
import math

import pytest

from controller.protocol import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_FRAME,
    DEFAULT_PORT,
    Batch,
    Decoder,
    ErrorResponse,
    Invalid,
    Notification,
    Request,
    Response,
    encode,
    encode_batch,
    parse_message,
)
from statemachines import errorkinds as ek

PING = b'{"jsonrpc":"2.0","id":1,"method":"rpc.ping"}'
PING_EVENT = Request("rpc.ping", None, 1)


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def req(method="m", params=None, id=1) -> dict:
    obj = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        obj["params"] = params
    return obj


def only(events):
    assert len(events) == 1, events
    return events[0]


def test_defaults():
    assert DEFAULT_PORT == 15769
    assert DEFAULT_MAX_FRAME == 1 << 20
    assert DEFAULT_MAX_DEPTH == 32
    assert DEFAULT_MAX_BATCH == 100


# -- framing ------------------------------------------------------------------------------


def test_one_message_per_line():
    assert Decoder().feed(PING + b"\n") == [PING_EVENT]


def test_crlf_accepted():
    assert Decoder().feed(PING + b"\r\n") == [PING_EVENT]


def test_nothing_until_the_newline():
    d = Decoder()
    assert d.feed(PING) == []
    assert d.buffered == len(PING)
    assert d.feed(b"\n") == [PING_EVENT]
    assert d.buffered == 0


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_split_at_every_byte_position(ending):
    data = PING + ending + b'{"jsonrpc":"2.0","method":"note","params":[1]}' + ending
    expected = [PING_EVENT, Notification("note", [1])]
    for cut in range(len(data) + 1):
        d = Decoder()
        assert d.feed(data[:cut]) + d.feed(data[cut:]) == expected, cut


def test_byte_by_byte():
    data = PING + b"\r\n" + PING + b"\n"
    d = Decoder()
    events = []
    for i in range(len(data)):
        events += d.feed(data[i : i + 1])
    assert events == [PING_EVENT, PING_EVENT]


def test_several_messages_in_one_chunk():
    data = b"".join(line(req(id=i)) for i in range(50))
    assert Decoder().feed(data) == [Request("m", None, i) for i in range(50)]


def test_blank_lines_are_ignored():
    data = b"\n\r\n   \n\t\r\n" + PING + b"\n\n"
    assert Decoder().feed(data) == [PING_EVENT]


def test_multibyte_utf8_split_inside_a_character():
    data = line(req(params=["h\u00e9llo \u20ac \U0001f600"]))
    expected = [Request("m", ["h\u00e9llo \u20ac \U0001f600"], 1)]
    for cut in range(len(data) + 1):
        d = Decoder()
        assert d.feed(data[:cut]) + d.feed(data[cut:]) == expected


# -- the frame limit ----------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid request line of exactly ``size`` bytes (newline excluded)."""
    base = b'{"jsonrpc":"2.0","id":1,"method":"m","params":[""]}'
    assert size >= len(base)
    return base[:-3] + b"x" * (size - len(base)) + base[-3:]


def test_frame_exactly_at_the_limit_is_accepted():
    d = Decoder(max_frame=200)
    assert len(padded(200)) == 200
    event = only(d.feed(padded(200) + b"\n"))
    assert isinstance(event, Request)
    assert set(event.params[0]) == {"x"}


def test_frame_at_the_limit_with_crlf_is_accepted():
    d = Decoder(max_frame=200)
    assert isinstance(only(d.feed(padded(200) + b"\r\n")), Request)
    # and split just before the \n
    d = Decoder(max_frame=200)
    assert d.feed(padded(200) + b"\r") == []
    assert isinstance(only(d.feed(b"\n")), Request)


def assert_frame_error(event, limit):
    assert isinstance(event, Invalid)
    assert event.fatal
    assert event.code == ek.INVALID_REQUEST
    assert event.id is None
    assert str(limit) in event.message
    assert event.data == {"max_frame": limit}


def test_frame_one_over_the_limit_is_fatal():
    d = Decoder(max_frame=200)
    assert_frame_error(only(d.feed(padded(201) + b"\n")), 200)
    assert d.closed
    assert d.feed(PING + b"\n") == []  # nothing more after a fatal error


def test_frame_over_the_limit_with_cr_in_the_last_byte_is_still_fatal():
    d = Decoder(max_frame=200)
    assert_frame_error(only(d.feed(padded(201) + b"\r\n")), 200)


def test_frame_over_the_limit_without_newline_is_fatal_at_once():
    d = Decoder(max_frame=200)
    assert d.feed(b"x" * 201) == []  # may still be 200 bytes + \r
    assert_frame_error(only(d.feed(b"x")), 200)
    assert d.buffered == 0


def test_frame_over_the_limit_in_one_chunk_without_newline():
    d = Decoder(max_frame=200)
    assert_frame_error(only(d.feed(b"x" * 10_000)), 200)


def test_frame_error_after_good_lines_in_the_same_chunk():
    d = Decoder(max_frame=200)
    events = d.feed(PING + b"\n" + b"y" * 300 + b"\n" + PING + b"\n")
    assert events[0] == PING_EVENT
    assert_frame_error(events[1], 200)
    assert len(events) == 2


def test_frame_error_for_an_overlong_tail():
    d = Decoder(max_frame=200)
    events = d.feed(PING + b"\n" + b"y" * 300)
    assert events[0] == PING_EVENT
    assert_frame_error(events[1], 200)


def test_frame_response_encodes():
    event = Decoder(max_frame=10).feed(b"x" * 100)[0]
    reply = json.loads(encode(event.response()))
    assert reply["error"]["code"] == ek.INVALID_REQUEST and "10" in reply["error"]["message"]
    assert reply["id"] is None


# -- parse errors -------------------------------------------------------------------------


def test_invalid_utf8_is_a_parse_error_and_the_decoder_continues():
    d = Decoder()
    events = d.feed(b'{"jsonrpc":"2.0","id":1,"method":"\xff\xfe"}\n' + PING + b"\n")
    assert isinstance(events[0], Invalid)
    assert events[0].code == ek.PARSE_ERROR
    assert events[0].id is None
    assert not events[0].fatal
    assert "UTF-8" in events[0].data["reason"]
    assert events[1] == PING_EVENT
    assert not d.closed


@pytest.mark.parametrize("text", [b"{", b"nope", b'{"a":1', b"[1,]", b"'single'", b"{}}"])
def test_invalid_json_is_a_parse_error(text):
    d = Decoder()
    event, after = d.feed(text + b"\n" + PING + b"\n")
    assert isinstance(event, Invalid) and event.code == ek.PARSE_ERROR and event.id is None
    assert after == PING_EVENT


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_rejected(constant):
    event = only(
        Decoder().feed(f'{{"jsonrpc":"2.0","id":1,"method":"m","params":[{constant}]}}\n'.encode())
    )
    assert isinstance(event, Invalid)
    assert event.code == ek.PARSE_ERROR


def test_huge_exponent_decodes_and_its_echo_cannot_be_encoded():
    # 1e999 is valid JSON syntax and decodes to inf; echoing it must raise, not write Infinity
    event = only(Decoder().feed(b'{"jsonrpc":"2.0","id":1,"method":"m","params":[1e999]}\n'))
    assert isinstance(event, Request) and event.params == [math.inf]
    with pytest.raises(ValueError):
        encode(Response(1, event.params[0]))


def test_huge_integer_is_a_parse_error_not_a_crash():
    events = Decoder().feed(
        b'{"jsonrpc":"2.0","id":1,"method":"m","params":[' + b"9" * 5000 + b"]}\n"
    )
    assert isinstance(only(events), Invalid) and events[0].code == ek.PARSE_ERROR


@pytest.mark.parametrize("depth", [DEFAULT_MAX_DEPTH + 1, 1000, 100_000])
def test_deep_nesting_is_an_error_not_a_crash(depth):
    text = b"[" * depth + b"]" * depth
    d = Decoder()
    event, after = d.feed(text + b"\n" + PING + b"\n")
    assert isinstance(event, Invalid) and event.code == ek.PARSE_ERROR
    assert after == PING_EVENT


def test_deep_nesting_inside_params():
    depth = DEFAULT_MAX_DEPTH
    params = "[" * depth + "]" * depth  # with the object around it: depth + 1
    event = only(
        Decoder().feed(f'{{"jsonrpc":"2.0","id":1,"method":"m","params":{params}}}\n'.encode())
    )
    assert isinstance(event, Invalid) and event.code == ek.PARSE_ERROR
    assert event.data == {"max_depth": DEFAULT_MAX_DEPTH}


def test_nesting_at_the_limit_is_accepted():
    params = "[" * (DEFAULT_MAX_DEPTH - 1) + "]" * (DEFAULT_MAX_DEPTH - 1)
    event = only(
        Decoder().feed(f'{{"jsonrpc":"2.0","id":1,"method":"m","params":{params}}}\n'.encode())
    )
    assert isinstance(event, Request)


def test_brackets_inside_strings_do_not_count_as_nesting():
    params = json.dumps(["[" * 500 + "{" * 500 + '\\"['])
    event = only(
        Decoder().feed(f'{{"jsonrpc":"2.0","id":1,"method":"m","params":{params}}}\n'.encode())
    )
    assert isinstance(event, Request)


# -- batches ------------------------------------------------------------------------------


def test_batch_of_calls():
    event = only(Decoder().feed(line([req(id=1), {"jsonrpc": "2.0", "method": "n"}, 5])))
    assert isinstance(event, Batch)
    assert event.items[0] == Request("m", None, 1)
    assert event.items[1] == Notification("n", None)
    assert isinstance(event.items[2], Invalid) and event.items[2].code == ek.INVALID_REQUEST


def test_empty_batch_is_invalid():
    event = only(Decoder().feed(b"[]\n"))
    assert isinstance(event, Invalid) and event.code == ek.INVALID_REQUEST and event.id is None


def test_batch_limit():
    d = Decoder(max_batch=3)
    assert isinstance(only(d.feed(line([req(id=i) for i in range(3)]))), Batch)
    event = only(d.feed(line([req(id=i) for i in range(4)])))
    assert isinstance(event, Invalid)
    assert event.code == ek.INVALID_REQUEST
    assert not event.fatal
    assert "3" in event.message and "4" in event.message
    assert event.data == {"max_batch": 3}
    assert d.feed(PING + b"\n") == [PING_EVENT]  # not fatal


def test_batch_of_responses():
    event = only(
        Decoder().feed(
            line(
                [
                    {"jsonrpc": "2.0", "id": 1, "result": 2},
                    {"jsonrpc": "2.0", "id": 2, "error": {"code": -1, "message": "x"}},
                ]
            )
        )
    )
    assert event.items == [Response(1, 2), ErrorResponse(2, -1, "x", None)]


# -- ids and message validation ----------------------------------------------------------


@pytest.mark.parametrize("msg_id", ["abc", "", 0, -5, 7, 2**63, 1.5, None])
def test_valid_ids_are_kept(msg_id):
    event = only(Decoder().feed(line(req(id=msg_id))))
    assert isinstance(event, Request)
    assert event.id == msg_id and type(event.id) is type(msg_id)
    reply = json.loads(encode(Response(event.id, "ok")))
    assert reply["id"] == msg_id and type(reply["id"]) is type(msg_id)


@pytest.mark.parametrize("msg_id", [True, False, {"a": 1}, [1]])
def test_bool_object_and_array_ids_are_invalid(msg_id):
    event = only(Decoder().feed(line(req(id=msg_id))))
    assert isinstance(event, Invalid)
    assert event.code == ek.INVALID_REQUEST
    assert event.id is None  # an invalid id cannot be echoed
    assert "id" in event.data["reason"]


def test_missing_id_is_a_notification():
    assert only(
        Decoder().feed(b'{"jsonrpc":"2.0","method":"n","params":{"a":1}}\n')
    ) == Notification("n", {"a": 1})


@pytest.mark.parametrize("params", ["bar", 1, True, None])
def test_params_must_be_array_or_object(params):
    obj = {"jsonrpc": "2.0", "id": 4, "method": "m", "params": params}
    event = only(Decoder().feed(line(obj)))
    assert isinstance(event, Invalid)
    assert event.code == ek.INVALID_REQUEST
    assert event.id == 4  # the id is echoed when it is valid
    assert "params" in event.data["reason"]


@pytest.mark.parametrize("params", [[], {}, [1, "a"], {"x": [1]}])
def test_array_and_object_params(params):
    assert only(Decoder().feed(line(req(params=params)))) == Request("m", params, 1)


@pytest.mark.parametrize(
    "obj, reason",
    [
        ({"id": 1, "method": "m"}, "jsonrpc"),
        ({"jsonrpc": "1.0", "id": 1, "method": "m"}, "jsonrpc"),
        ({"jsonrpc": 2.0, "id": 1, "method": "m"}, "jsonrpc"),
        ({"jsonrpc": "2.0", "id": 1, "method": 5}, "method"),
        ({"jsonrpc": "2.0", "id": 1, "method": None}, "method"),
        ({"jsonrpc": "2.0"}, "neither"),
        ({"jsonrpc": "2.0", "id": 1}, "not a request"),
        (
            {"jsonrpc": "2.0", "id": 1, "result": 1, "error": {"code": 1, "message": "m"}},
            "not a request",
        ),
        ({"jsonrpc": "2.0", "id": 1, "error": {"code": "x", "message": "m"}}, "not a request"),
        ({"jsonrpc": "2.0", "id": 1, "error": {"code": True, "message": "m"}}, "not a request"),
    ],
)
def test_invalid_messages(obj, reason):
    event = parse_message(obj)
    assert isinstance(event, Invalid) and event.code == ek.INVALID_REQUEST
    assert reason in event.data["reason"]


@pytest.mark.parametrize("value", [1, "s", None, True, 1.5])
def test_non_object_top_level_is_invalid_request(value):
    event = only(Decoder().feed(line(value)))
    assert isinstance(event, Invalid) and event.code == ek.INVALID_REQUEST and event.id is None


def test_responses_decode():
    d = Decoder()
    assert d.feed(b'{"jsonrpc":"2.0","id":1,"result":null}\n') == [Response(1, None)]
    assert d.feed(b'{"jsonrpc":"2.0","id":"a","error":{"code":-32601,"message":"M"}}\n') == [
        ErrorResponse("a", ek.METHOD_NOT_FOUND, "M", None)
    ]
    assert d.feed(
        b'{"jsonrpc":"2.0","id":null,"error":{"code":-1,"message":"M","data":[1]}}\n'
    ) == [ErrorResponse(None, -1, "M", [1])]


# -- encoding -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Request("m", None, 1),
        Request("m", [1, 2.5, "x", None, True], "id"),
        Request("m", {"a": {"b": [None]}}, None),
        Notification("n"),
        Notification("n", {"k": "\u00e9\u20ac\U0001f600"}),
        Response(1, None),
        Response("x", {"nested": [1, {"a": False}]}),
        ErrorResponse(None, ek.PARSE_ERROR, "Parse error"),
        ErrorResponse(3, ek.DEVICE_FAULT, "boom", {"exception": "ValueError"}),
    ],
)
def test_encode_round_trips(message):
    data = encode(message)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert Decoder().feed(data) == [message]


def test_encode_is_compact_and_utf8():
    assert encode(Response(1, "pong")) == b'{"jsonrpc":"2.0","id":1,"result":"pong"}\n'
    assert encode(Response(1, "\u00e9")) == '{"jsonrpc":"2.0","id":1,"result":"\u00e9"}\n'.encode()


def test_error_without_data_omits_it():
    assert json.loads(encode(ErrorResponse(1, -1, "x")))["error"] == {"code": -1, "message": "x"}


def test_newlines_inside_strings_are_escaped():
    data = encode(Response(1, "a\nb\r\nc"))
    assert data.count(b"\n") == 1
    assert Decoder().feed(data) == [Response(1, "a\nb\r\nc")]


def test_lone_surrogate_round_trips():
    # JSON allows "\ud800"; the decoder returns it as is; encode must not fail on it.
    event = only(Decoder().feed(b'{"jsonrpc":"2.0","id":"\\ud800","method":"m"}\n'))
    assert event == Request("m", None, "\ud800")
    data = encode(Response(event.id, "\udfff"))
    data.decode("utf-8")  # valid UTF-8 on the wire
    assert Decoder().feed(data) == [Response("\ud800", "\udfff")]


def test_encode_batch():
    messages = [Response(1, 2), ErrorResponse(None, ek.INVALID_REQUEST, "Invalid Request")]
    event = only(Decoder().feed(encode_batch(messages)))
    assert isinstance(event, Batch) and event.items == messages


@pytest.mark.parametrize("result", [object(), {1, 2}, b"bytes", math.nan, math.inf, -math.inf])
def test_non_json_result_raises(result):
    with pytest.raises((TypeError, ValueError)):
        encode(Response(1, result))


def test_non_json_nested_result_raises():
    with pytest.raises((TypeError, ValueError)):
        encode(Response(1, {"ok": [1, {"bad": object()}]}))


# -- idempotency keys and replayed replies (issue 11) ---------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Request("door.open", {"speed": 2}, 7, key="run-1:3"),
        Response(7, {"ok": True}, replayed=True),
        ErrorResponse(7, ek.INTERRUPTED, "interrupted", None, replayed=True),
        ErrorResponse(7, ek.KEY_CONFLICT, "conflict", {"key": "k"}),
    ],
)
def test_key_and_replayed_round_trip(message):
    assert Decoder().feed(encode(message)) == [message]


def test_key_and_replayed_are_top_level_members_only_when_set():
    assert json.loads(encode(Request("m", None, 1, key="k")))["key"] == "k"
    assert "key" not in json.loads(encode(Request("m", None, 1)))
    assert json.loads(encode(Response(1, None, replayed=True)))["replayed"] is True
    assert "replayed" not in json.loads(encode(Response(1, None)))
    assert "replayed" not in json.loads(encode(ErrorResponse(1, -1, "x")))


def test_replayed_other_than_true_reads_as_false():
    event = only(Decoder().feed(line({"jsonrpc": "2.0", "id": 1, "result": 1, "replayed": 1})))
    assert event == Response(1, 1, replayed=False)


@pytest.mark.parametrize("key", ["a", "x" * 128, "run-20250101T000000Z-ab12:7", "é ü"])
def test_valid_keys_are_kept(key):
    assert parse_message({**req(), "key": key}) == Request("m", None, 1, key)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (None, "string"),
        (5, "string"),
        (["k"], "string"),
        ("", "1-128"),
        ("x" * 129, "1-128"),
        ("a\nb", "printable"),
        ("a\x00", "printable"),
    ],
)
def test_invalid_keys_are_invalid_requests_with_a_reason(key, reason):
    event = only(Decoder().feed(line({**req(id=9), "key": key})))
    assert isinstance(event, Invalid) and event.code == ek.INVALID_REQUEST and event.id == 9
    assert reason in event.data["reason"]
