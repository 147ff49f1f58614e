"""Property tests of the codec: the decoder never raises, splitting never changes the result,
and its buffer stays bounded. Example counts are bounded so the module runs in seconds."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.protocol import (
    Batch,
    Decoder,
    ErrorResponse,
    Invalid,
    Notification,
    Request,
    Response,
    encode,
    encode_batch,
)

FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

EVENT_TYPES = (Request, Notification, Response, ErrorResponse, Invalid, Batch)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
ids = (
    st.none()
    | st.integers()
    | st.text(max_size=12)
    | st.floats(allow_nan=False, allow_infinity=False)
)
params = (
    st.none()
    | st.lists(json_values, max_size=4)
    | st.dictionaries(st.text(max_size=8), json_values, max_size=4)
)
methods = st.text(min_size=1, max_size=20)
messages = st.one_of(
    st.builds(Request, methods, params, ids),
    st.builds(Notification, methods, params),
    st.builds(Response, ids, json_values),
    st.builds(ErrorResponse, ids, st.integers(-33000, 33000), st.text(max_size=30), json_values),
)


def feed_all(decoder: Decoder, chunks: list[bytes]) -> list:
    events = []
    for chunk in chunks:
        out = decoder.feed(chunk)
        assert isinstance(out, list)
        assert all(isinstance(event, EVENT_TYPES) for event in out)
        events += out
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, start = [], 0
    for point in points:
        chunks.append(data[start:point])
        start = point
    chunks.append(data[start:])
    return chunks


@FAST
@given(st.lists(st.binary(max_size=300), max_size=10))
def test_random_bytes_never_raise(chunks):
    feed_all(Decoder(max_frame=256), chunks)


@FAST
@given(
    st.lists(
        st.sampled_from(
            [
                b"{",
                b"}",
                b"[",
                b"]",
                b'"',
                b"\\",
                b",",
                b":",
                b"\n",
                b"\r",
                b"1",
                b"null",
                b"\xff",
                b'"jsonrpc"',
                b'"2.0"',
                b'"id"',
                b'"method"',
                b"NaN",
                b" ",
            ]
        ),
        max_size=200,
    )
)
def test_json_ish_tokens_never_raise(tokens):
    feed_all(Decoder(max_frame=128, max_depth=8), [b"".join(tokens)])


@FAST
@given(json_values)
def test_random_json_values_decode_to_one_event(value):
    events = Decoder().feed(json.dumps(value).encode() + b"\n")
    assert len(events) == 1
    assert isinstance(events[0], EVENT_TYPES)


@FAST
@given(
    st.lists(messages, min_size=1, max_size=6),
    st.lists(st.integers(0, 10_000), max_size=8),
    st.booleans(),
)
def test_split_points_do_not_change_the_result(batch, cuts, crlf):
    data = b"".join(encode(m) for m in batch)
    if crlf:
        data = data.replace(b"\n", b"\r\n")  # encode escapes newlines inside strings
    whole = Decoder().feed(data)
    assert whole == batch  # round trip
    assert feed_all(Decoder(), split(data, cuts)) == whole


@FAST
@given(st.lists(messages, min_size=1, max_size=5))
def test_batches_round_trip(batch):
    events = Decoder().feed(encode_batch(batch))
    assert events == [Batch(batch)]


@FAST
@given(messages, st.data())
def test_mutated_lines_never_raise(message, data):
    line = bytearray(encode(message)[:-1])
    for _ in range(data.draw(st.integers(1, 5))):
        if not line:
            break
        i = data.draw(st.integers(0, len(line) - 1))
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if op == "flip":
            line[i] = data.draw(st.integers(0, 255))
        elif op == "delete":
            del line[i]
        else:
            line.insert(i, data.draw(st.integers(0, 255)))
    events = feed_all(Decoder(), [bytes(line) + b"\n", b'{"jsonrpc":"2.0","id":1,"method":"p"}\n'])
    # unless a mutation inserted a newline, the valid line after it decodes normally
    if b"\n" not in line:
        assert events[-1] == Request("p", None, 1)


@FAST
@given(messages, st.data())
def test_truncated_lines_never_raise(message, data):
    line = encode(message)
    cut = data.draw(st.integers(0, len(line) - 1))
    events = feed_all(Decoder(), [line[:cut] + b"\n"])
    assert len(events) <= 1
    if cut:
        assert len(events) == 1
        assert isinstance(events[0], Invalid) or cut == len(line) - 1


@FAST
@given(st.integers(8, 200), st.lists(st.binary(max_size=120), max_size=30))
def test_buffer_never_exceeds_the_frame_limit_plus_one(limit, chunks):
    decoder = Decoder(max_frame=limit)
    for chunk in chunks:
        events = decoder.feed(chunk)
        assert decoder.buffered <= limit + 1
        fatal = [e for e in events if isinstance(e, Invalid) and e.fatal]
        if fatal:
            assert decoder.closed and fatal[-1] is events[-1]
            assert decoder.buffered == 0
        if decoder.closed:
            assert decoder.feed(b"more\n") == []


@FAST
@given(st.integers(8, 200), st.lists(st.integers(0, 400), min_size=1, max_size=10))
def test_frame_limit_is_exact(limit, lengths):
    """Lines up to ``limit`` bytes decode; the first longer one is the fatal error."""
    data = b"".join(b" " * n + b"\n" for n in lengths)
    events = Decoder(max_frame=limit).feed(data)
    if all(n <= limit for n in lengths):
        assert events == []  # blank lines
    else:
        assert len(events) == 1 and events[0].fatal and str(limit) in events[0].message


@FAST
@given(json_values, ids)
def test_encode_result_round_trips(value, msg_id):
    assert Decoder().feed(encode(Response(msg_id, value))) == [Response(msg_id, value)]


@FAST
@given(
    st.text(
        alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(),
        max_size=10,
    )
)
def test_any_string_encodes_to_valid_utf8(text):
    data = encode(Response(text, text))
    data.decode("utf-8")
    assert Decoder().feed(data) == [Response(text, text)]
