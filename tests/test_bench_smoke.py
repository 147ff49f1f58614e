"""The benchmark harness runs end to end at tiny sizes (``python -m bench.run --quick``).

It asserts that the harness works - rows present, numbers positive, JSON written - and never how
fast anything is: speed is for ``docs/performance.md``, not for CI on a shared machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(tmp_path: Path, *args: str, timeout: float = 50.0) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--json", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists(), "no JSON written"
    return proc.stdout, json.loads(out.read_text())


def test_request_reply_scenarios_against_every_reference(tmp_path: Path) -> None:
    stdout, data = run_bench(
        tmp_path,
        "--scenarios",
        "S1,S2,S3",
        "--s1-conns",
        "2",
        "--duration",
        "0.2",
        "--warmup",
        "0.05",
        "--s2-depth",
        "8",
        "--s3-conns",
        "2",
        "--s3-workers",
        "1",
    )
    rows = {(r["scenario"], r["server"]) for r in data["rows"]}
    servers = {
        "ref1 thread/cmd+callback",
        "ref2 ThreadingTCPServer",
        "ref3 asyncio streams",
        "statelink async def",
        "statelink def (pool)",
    }
    for scenario in ("S1@2", "S2"):
        assert {(scenario, s) for s in servers} <= rows
    assert ("S3", "statelink 1 workers") in rows
    for r in data["rows"]:
        assert "failed" not in r, r
        assert r["throughput"] > 0 and r["completed"] > 0, r
        assert r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"], r
        assert r["errors"] == 0 and r["lost"] == 0, r  # exactly one good reply per request
        if r["server"] != "ref1 thread/cmd+callback" and r["scenario"] != "S3":
            assert set(r["ratios"]) == {"ref1", "ref2", "ref3"}, r
    s3 = next(r for r in data["rows"] if r["server"] == "statelink 1 workers")
    assert s3["workers"] == 1 and s3["theoretical"] == pytest.approx(100.0)
    # the table on stdout has a row per measurement
    table = [line for line in stdout.splitlines() if line.startswith("| S")]
    assert len(table) == len(data["rows"])
    assert "statelink async def" in stdout and "vs ref3" in stdout


def test_workflow_and_footprint_scenarios(tmp_path: Path) -> None:
    stdout, data = run_bench(tmp_path, "--scenarios", "S4,S5", "--s4-runs", "5", "--s5-conns", "5")
    assert data["s4"], "no S4 result"
    for res in data["s4"]:
        # the harness reports what is missing instead of failing when the engine is not ready
        assert res.get("bare_us", 0) > 0, res
        if res.get("ok"):
            assert res["transitions"] >= 5 * res["steps"], res
            assert res["transitions_per_s"] > 0 and res["engine_us"] > 0, res
        else:
            assert res.get("missing"), res
    s5 = data["s5"]
    assert s5["conns"] == 5
    sl = s5["servers"]["statelink async def"]
    assert sl["idle_rss_mb"] > 0 and sl["rss_conns_mb"] > 0 and sl["start_s"] > 0
    assert s5["client_import"]["seconds"] > 0
    assert "S5 footprint" in stdout


def test_keyed_device_command_scenario(tmp_path: Path) -> None:
    """S6: the same device command with a fresh idempotency key per request and without one,
    on one server with a state directory; both answered without an error."""
    stdout, data = run_bench(
        tmp_path, "--scenarios", "S6", "--s6-conns", "2", "--duration", "0.2", "--warmup", "0.05"
    )
    rows = {r["server"]: r for r in data["rows"] if r["scenario"] == "S6"}
    assert set(rows) == {"statelink device cmd", "statelink device cmd + key"}, data["rows"]
    for r in rows.values():
        assert "failed" not in r, r
        assert r["conns"] == 2 and r["throughput"] > 0 and r["completed"] > 0, r
        assert r["errors"] == 0 and r["lost"] == 0, r  # keyed replies are results, not errors
    keyed = rows["statelink device cmd + key"]
    assert keyed["vs_unkeyed"] == pytest.approx(
        keyed["throughput"] / rows["statelink device cmd"]["throughput"]
    )
    assert "statelink device cmd + key" in stdout


def test_the_load_generator_sends_a_fresh_key_with_every_request() -> None:
    import json

    from bench.load import LoadSpec, _Driver

    plain = _Driver(LoadSpec(port=1, method="keyed.echo", params={"value": "x"}))
    keyed = _Driver(LoadSpec(port=1, method="keyed.echo", params={"value": "x"}, keyed=True))
    assert plain.key_head == b""
    lines = keyed.requests(range(7, 9)).splitlines()
    assert json.loads(plain.requests(range(7, 8))) == {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "keyed.echo",
        "params": {"value": "x"},
    }
    requests = [json.loads(line) for line in lines]
    assert [r["id"] for r in requests] == [7, 8]
    assert requests[0]["method"] == "keyed.echo" and requests[0]["params"] == {"value": "x"}
    assert requests[0]["key"] != requests[1]["key"] and requests[0]["key"].endswith("-7")
    other = _Driver(LoadSpec(port=1, keyed=True))  # another load process: another key tag
    assert other.key_head != keyed.key_head


def test_the_load_generator_refuses_other_hosts() -> None:
    from bench.load import LoadSpec

    with pytest.raises(ValueError, match="loopback"):
        LoadSpec(port=1, host="192.0.2.1")


# -- guards for the fast paths the benchmark work added to the controller ----------------------
# (each must give exactly what the general code gives; see docs/performance.md)


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # comparing the failures too
        return (type(exc).__name__, str(exc))


def test_fast_param_binding_matches_inspect_bind() -> None:
    import inspect
    import itertools

    from controller.errors import InvalidParamsError
    from controller.server import Binder, bind_params

    def f0():
        pass

    def f1(a):
        pass

    def f2(a, b=2):
        pass

    def f3(a, b=2, *, c, d=4):
        pass

    def f4(*, k=1):
        pass

    def f5(a, *rest):
        pass

    def f6(a, /, b):
        pass

    def f7(a, **kw):
        pass

    def f8(x=None, y=None, z=None):
        pass

    names = ["a", "b", "c", "d", "k", "x", "z", "rest", "q"]
    cases: list = [None, [], [1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]
    for n in range(4):
        for keys in itertools.permutations(names, n):
            cases.append({k: i for i, k in enumerate(keys)})
    for func in (f0, f1, f2, f3, f4, f5, f6, f7, f8):
        signature = inspect.signature(func)
        binder = Binder(signature)
        for params in cases:
            want: tuple[Any, ...]
            got: tuple[Any, ...]
            try:
                bound = bind_params(signature, params)
                want = (tuple(bound.args), bound.kwargs, list(bound.kwargs))
            except InvalidParamsError as exc:
                want = ("error", exc.message, exc.data)
            try:
                args, kwargs = binder.bind(params)
                got = (tuple(args), kwargs, list(kwargs))
            except InvalidParamsError as exc:
                got = ("error", exc.message, exc.data)
            assert got == want, (func.__name__, params)


def test_fast_json_codec_matches_the_json_module() -> None:
    import json
    import random

    from controller import protocol

    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
    decode = json.JSONDecoder(parse_constant=protocol._reject_constant).decode
    rng = random.Random(7)
    leaves = [
        None,
        True,
        False,
        0,
        -1,
        2**70,
        1.5,
        -0.0,
        1e300,
        "x",
        'é\u2028"\\\n',
        "\ud800",
        float("nan"),
        float("inf"),
    ]

    def value(depth: int = 0):
        r = rng.random()
        if depth > 3 or r < 0.3:
            return rng.choice(leaves)
        if r < 0.65:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        keys = ["a", "b", "é", "1"]
        return {rng.choice(keys): value(depth + 1) for _ in range(rng.randint(0, 3))}

    class Odd:
        pass

    circular: list = []
    circular.append(circular)
    objects: list[Any] = [{"jsonrpc": "2.0", "id": 1, "result": value()} for _ in range(2000)]
    objects += [[value(), value()] for _ in range(500)]
    objects += [
        {"a": Odd()},
        [Odd()],
        {1: 2, None: 3, 1.5: 4, False: 5},
        {(1, 2): 3},
        circular,
        "s",
        7,
    ]
    for obj in objects:
        assert _outcome(protocol._dumps, obj) == _outcome(encode, obj), obj
    texts = [
        '{"a":1}',
        ' {"a":1}',
        '{"a":1} ',
        '{"a":1}x',
        "[1,2]",
        "[",
        "",
        " ",
        "NaN",
        "[NaN]",
        '{"a":Infinity}',
        '"s"',
        "1",
        "1 2",
        '{"a":1}\t',
        "\t[1]",
        "[1,]",
        '{"a" 1}',
        "tru",
        "{}",
        "[]",
        "[" * 3000 + "]" * 3000,
    ]
    texts += [json.dumps(o, allow_nan=True) for o in objects[:500] if o is not circular]
    texts += [
        "".join(rng.choice('{}[]",:1a \t') for _ in range(rng.randint(0, 12))) for _ in range(3000)
    ]
    for text in texts:
        got, want = _outcome(protocol._loads, text), _outcome(decode, text)
        if got[0] == want[0] == "ok":
            assert json.dumps(got[1]) == json.dumps(want[1]), text
        else:
            assert got == want, text


def test_runner_scale_scenarios(tmp_path: Path) -> None:
    """S7 (journaled runs at scale: RSS, open files) and S8 (await timeouts under a stream of
    notifications), tiny; S4's journaled variant runs in the same S4 measurement."""
    stdout, data = run_bench(
        tmp_path, "--scenarios", "S4,S7,S8", "--s4-runs", "5", "--s7-runs", "20", "--s8-runs", "10"
    )
    for res in data["s4"]:
        if res.get("ok"):
            assert res["journaled"]["journals"] is True and res["journals"] is False, res
            assert res["journaled_vs_plain"] > 0, res
    s7 = data["s7"]
    assert s7.get("ok"), s7
    assert s7["runs"] == 20 and s7["journals"] is True and s7["outcomes"] == {"success": 20}
    assert s7["transitions"] >= 20 * 10 and s7["transitions_per_s"] > 0
    assert s7["peak_rss_mb"] > 0 and s7["peak_open_files"] > 0
    s8 = data["s8"]
    assert s8.get("ok"), s8
    assert s8["runs"] == 10 and s8["timeouts"] == 10
    assert 0 <= s8["late_p50_ms"] <= s8["late_p99_ms"] <= s8["late_max_ms"]
    assert s8["notifications_dropped"] >= 0
    assert "S7 20 concurrent journaled runs" in stdout and "S8 10 runs awaiting" in stdout


def test_mqtt_fleet_scenarios(tmp_path: Path) -> None:
    """S9 (request/response over MQTT: bare paho, statelink async def and plain def) and S10
    (a fleet on one broker, one workflow per node), tiny, on a real Mosquitto (skipped loudly
    without one, failed under CI=true)."""
    from mosquitto import require_mosquitto

    require_mosquitto()
    stdout, data = run_bench(tmp_path, "--scenarios", "S9,S10", timeout=240)
    mqtt = data["mqtt"]
    assert not mqtt.get("missing"), mqtt
    cells = {(row["nodes"], row["depth"]): row for row in mqtt["s9"]}
    assert set(cells) == {(1, 1), (4, 2)}
    for row in cells.values():
        assert set(row["results"]) == {"paho", "statelink", "statelink-def"}, row
        for result in row["results"].values():
            assert result["replies_per_s"] > 0 and result["p99_ms"] >= result["p50_ms"] > 0
            assert result["errors"] == 0 and result["lost"] == 0, result
        assert set(row["ratios"]) == {"statelink", "statelink-def"}
    s10 = mqtt["s10"]
    assert s10["ok"], s10
    assert s10["nodes"] == 5 and s10["ok_runs"] == 5 and s10["failed_runs"] == 0
    assert s10["executions"] == 15 and s10["missing_executions"] == 0
    assert s10["duplicate_executions"] == 0
    assert s10["controller_peak_rss_mb"] > 0 and s10["broker_rss_mb"] > 0
    assert "S9 MQTT req/resp" in stdout and "S10 5 nodes on one broker" in stdout
