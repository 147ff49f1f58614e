"""S9 and S10: statelink over MQTT against bare paho-mqtt request/response, same broker, same run.

``python -m bench.mqtt_bench [--quick] [--json FILE]`` starts its own Mosquitto (loopback, a
free port, ``set_tcp_nodelay true``), then measures:

* **S9** request/response at ``NODES x DEPTH`` (nodes x requests in flight per node; the issue's
  cells are 1x1 and 50x4): the reference is bare paho-mqtt 2.x MQTT 5 on both sides (the
  responder echoes Correlation Data and answers a JSON-RPC reply; the requester keeps DEPTH
  requests in flight per node, QoS 1, Response Topic + Correlation Data, TCP_NODELAY).
  statelink (:func:`statelink_nodes`, :func:`statelink_requester`): one ``CommandServer``
  without a TCP socket serving NODES ``MqttNode`` s on its one I/O loop, and one ``BrokerLink``
  with one ``MqttClient`` per node, each reply's callback sending the next request; the command
  is ``bench.echo`` as an ``async def`` (``statelink``) and as a plain ``def`` through the
  worker pool (``statelink-def``). Throughput and latency percentiles over the same window;
  every implementation in processes of its own (the responders in one, the requester in
  another), a fresh responder process and topic prefix per round (:func:`round_prefix`),
  rounds alternated; per implementation the best round is shown.
* **S10** (:mod:`bench.fleet_bench`) 200 simulated nodes (one process) on one broker, one
  controller process running one workflow per node concurrently: time, runs ok / failed,
  executions missing or duplicated, controller peak RSS, broker RSS, node process RSS.

``--scenarios S9`` / ``S10``, ``--cells 1x1,50x4``, ``--rounds 3``, ``--seconds 5``,
``--impls paho,statelink,statelink-def``, ``--s10-nodes 200``. bench/run.py runs this module
as its scenarios S9 and S10 and shows :func:`render` and :func:`targets`.

Every process stops by itself (stdin closed, or ``--max-seconds``); traffic is loopback only.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from controller.mqtt.connection import new_client, publish_properties, start
from controller.mqtt.options import MqttOptions
from controller.mqtt.topics import Topics
from statemachines.addresses import parse_broker

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DRAIN = 5.0  #: seconds after the window to collect the replies still due


def node_name(index: int) -> str:
    return f"node-{index}"


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def rss_kb(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def bench_options(prefix: str) -> MqttOptions:
    """The MQTT options of every benchmark client (topic ``prefix``: one per implementation
    and round, see :func:`round_prefix`)."""
    return MqttOptions(topic_prefix=prefix, keepalive=30)


def round_prefix(cell: tuple[int, int], round_: int, impl: str) -> str:
    """A topic prefix of its own per cell, round and implementation: node sessions persist
    (an hour), so requests still queued for the nodes of one round can never reach the next."""
    return f"bench{cell[0]}x{cell[1]}r{round_}{impl.replace('-', '')}"


def _connected_client(broker: str, client_id: str, prefix: str) -> mqtt.Client:
    client = new_client(client_id, parse_broker(broker), bench_options(prefix))
    start(
        client,
        parse_broker(broker),
        bench_options(prefix),
        lambda _present: None,
        clean_start=True,
        session_expiry=0,
    )
    return client


def _subscribe(client: mqtt.Client, topic: str, timeout: float = 10.0) -> None:
    done = threading.Event()
    client.on_subscribe = lambda *_args: done.set()
    client.subscribe(topic, qos=1)
    if not done.wait(timeout):
        raise RuntimeError(f"no SUBACK for {topic}")


# -- the reference: bare paho on both sides ----------------------------------------------------
def paho_responders(broker: str, nodes: int, prefix: str) -> list[mqtt.Client]:
    """One bare paho client per node: each request's reply goes to its Response Topic with its
    Correlation Data echoed (the same JSON-RPC work as a server: parse, dispatch, encode)."""
    topics = Topics(prefix)
    clients = []
    for index in range(nodes):
        client = _connected_client(broker, f"bench-ref-{prefix}-{node_name(index)}", prefix)

        def on_message(c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            request = json.loads(msg.payload)
            reply = json.dumps(
                {"jsonrpc": "2.0", "id": request["id"], "result": request["params"]["value"]},
                separators=(",", ":"),
            )
            props: Any = msg.properties
            c.publish(
                props.ResponseTopic,
                reply,
                qos=1,
                properties=publish_properties(correlation=props.CorrelationData),
            )

        client.on_message = on_message
        _subscribe(client, topics.rpc(node_name(index)))
        clients.append(client)
    return clients


class Window:
    """Counts replies and latencies inside the measured window (``warmup`` s after
    :meth:`open`, for ``seconds``); requests go out until the window ends."""

    def __init__(self, warmup: float, seconds: float) -> None:
        self.warmup, self.seconds = warmup, seconds
        self.begin = self.end = 0.0
        self.latencies: list[float] = []
        self.sent = self.replied = self.errors = self.outstanding = 0
        self.lock = threading.Lock()
        self.idle = threading.Event()

    def open(self) -> None:
        self.begin = time.perf_counter() + self.warmup
        self.end = self.begin + self.seconds

    def sending(self) -> bool:
        return time.perf_counter() < self.end

    def began(self) -> None:
        with self.lock:
            self.sent += 1
            self.outstanding += 1

    def done(self, started: float, ok: bool) -> None:
        now = time.perf_counter()
        with self.lock:
            self.replied += 1
            self.outstanding -= 1
            self.errors += 0 if ok else 1
            if self.begin <= now <= self.end:
                self.latencies.append(now - started)
            if self.outstanding == 0 and now >= self.end:
                self.idle.set()

    def result(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "replies_per_s": len(lat) / self.seconds,
            "p50_ms": percentile(lat, 0.50) * 1000,
            "p99_ms": percentile(lat, 0.99) * 1000,
            "sent": self.sent,
            "replied": self.replied,
            "errors": self.errors,
            "lost": self.outstanding,
        }


#: a requester: ``(send_first(window), close)``; ``send_first`` puts DEPTH requests in flight
#: per node, each reply sends the next while the window is open
Requester = tuple[Callable[[Window], None], Callable[[], None]]


def paho_requester(broker: str, nodes: int, depth: int, prefix: str) -> Requester:
    """Bare paho requester: one connection, one reply topic, binary Correlation Data."""
    topics = Topics(prefix)
    client = _connected_client(broker, f"bench-ref-req-{os.getpid()}", prefix)
    reply_topic = topics.reply(f"ref{os.getpid()}")
    slots: dict[bytes, tuple[int, float]] = {}
    counter = iter(range(1, 1 << 62))
    lock = threading.Lock()
    windows: list[Window] = []

    def send(node: int) -> None:
        number = next(counter)
        correlation = number.to_bytes(8, "big")
        payload = json.dumps(
            {"jsonrpc": "2.0", "method": "bench.echo", "params": {"value": number}, "id": number},
            separators=(",", ":"),
        )
        with lock:
            slots[correlation] = (node, time.perf_counter())
        windows[0].began()
        client.publish(
            topics.rpc(node_name(node)),
            payload,
            qos=1,
            properties=publish_properties(
                response_topic=reply_topic, correlation=correlation, expiry=10
            ),
        )

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with lock:
            slot = slots.pop(msg.properties.CorrelationData, None)  # type: ignore[union-attr]
        if slot is None:
            return
        node, started = slot
        window = windows[0]
        window.done(started, b'"result"' in msg.payload)
        if window.sending():
            send(node)

    client.on_message = on_message
    _subscribe(client, reply_topic)

    def send_first(window: Window) -> None:
        windows.append(window)
        window.open()
        for node in range(nodes):
            for _ in range(depth):
                send(node)

    def close() -> None:
        client.loop_stop()
        client.disconnect()

    return send_first, close


# -- statelink: MqttNode on the node side, MqttClient over one BrokerLink on the other -----------
#: implementation -> the command its requester calls (both served by :func:`statelink_nodes`)
METHOD = {"paho": "bench.echo", "statelink": "bench.echo", "statelink-def": "bench.echo_sync"}


#: implementation -> its name in the tables
SHOWN = {
    "paho": "bare paho-mqtt",
    "statelink": "statelink async def",
    "statelink-def": "statelink def (pool)",
}


def statelink_nodes(broker: str, nodes: int, prefix: str) -> Any:
    """One :class:`~controller.server.CommandServer` without a TCP socket serving ``nodes``
    fleet nodes (one :class:`~controller.mqtt.node.MqttNode` each: its own broker connection,
    all on the server's one I/O loop, no thread per node). ``bench.echo`` is an ``async def``
    (runs on the loop), ``bench.echo_sync`` a plain ``def`` (the worker pool), as in
    :mod:`bench.references`. Returns the started server (``stop()`` it)."""
    from bench.references import echo
    from controller import CommandServer
    from controller.mqtt.node import MqttNode

    server = CommandServer(port=None, name="statelink-bench")

    @server.command("bench.echo")
    async def echo_async(value: Any = None) -> Any:
        """Trivial command on the I/O loop (async def)."""
        return value

    server.add_command("bench.echo_sync", echo, description="Trivial command (plain def).")
    for index in range(nodes):
        MqttNode(server, broker, node_name(index), bench_options(prefix))
    return server.start()


def statelink_requester(
    broker: str, nodes: int, depth: int, prefix: str, method: str = "bench.echo"
) -> Requester:
    """One :class:`~controller.mqtt.broker_link.BrokerLink`, one
    :class:`~controller.mqtt.client.MqttClient` per node (sharing one timer thread, as the
    runner's clients do); each reply's callback sends the next request to its node."""
    from controller.mqtt.broker_link import BrokerLink
    from controller.mqtt.client import MqttClient
    from controller.scheduler import Scheduler

    scheduler = Scheduler("bench-timers")
    link = BrokerLink(broker, bench_options(prefix)).start()
    clients = [
        MqttClient(f"{broker}/{node_name(i)}", link=link, scheduler=scheduler) for i in range(nodes)
    ]
    counter = itertools.count(1)
    windows: list[Window] = []

    def send(client: MqttClient) -> None:
        started = time.perf_counter()
        windows[0].began()
        client.send_command(
            method,
            {"value": next(counter)},
            functools.partial(replied, client, started),
            timeout=10.0,
        )

    def replied(client: MqttClient, started: float, future: Future[Any]) -> None:
        window = windows[0]
        ok = future.exception() is None
        window.done(started, ok)
        if ok and window.sending():  # an error (offline ...) ends that chain: no busy loop
            send(client)

    def send_first(window: Window) -> None:
        windows.append(window)
        window.open()
        for client in clients:
            for _ in range(depth):
                send(client)

    def close() -> None:
        for client in clients:
            client.close()
        link.close()
        scheduler.close()

    return send_first, close


# -- processes ---------------------------------------------------------------------------------
RESPONDERS: dict[str, Callable[[str, int, str], Any]] = {
    "paho": paho_responders,
    "statelink": statelink_nodes,
    "statelink-def": statelink_nodes,
}
REQUESTERS: dict[str, Callable[..., Requester]] = {
    "paho": paho_requester,
    "statelink": statelink_requester,
    "statelink-def": functools.partial(statelink_requester, method=METHOD["statelink-def"]),
}


def _serve_until_stdin_closes(max_seconds: float) -> None:
    done = threading.Event()

    def watch() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    done.wait(max_seconds)


def cmd_respond(args: argparse.Namespace) -> int:
    keep = RESPONDERS[args.impl](args.broker, args.nodes, args.prefix)
    print("READY", os.getpid(), flush=True)
    _serve_until_stdin_closes(args.max_seconds)
    if hasattr(keep, "stop"):
        keep.stop()  # statelink: a clean stop (status "stopped")
    return 0


def cmd_request(args: argparse.Namespace) -> int:
    send_first, close = REQUESTERS[args.impl](args.broker, args.nodes, args.depth, args.prefix)
    window = Window(args.warmup, args.seconds)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    send_first(window)
    window.idle.wait(args.warmup + args.seconds + DRAIN)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    close()
    result = window.result()
    result["requester_cpu_s"] = round(
        (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), 3
    )
    result["requester_rss_kb"] = rss_kb()
    print(json.dumps(result), flush=True)
    return 0


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Responder:
    """A responder process (``respond``); READY line on stdout; ends when its stdin closes."""

    def __init__(
        self, impl: str, broker: str, nodes: int, prefix: str, timeout: float = 120.0
    ) -> None:
        cmd = [PY, "-m", "bench.mqtt_bench", "respond", "--impl", impl, "--broker", broker]
        cmd += ["--nodes", str(nodes), "--prefix", prefix]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = _read_line(self.proc, timeout)
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"{impl} responder did not start: {line!r}")
        self.pid = int(line.split()[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    box: list[bytes] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    return box[0].decode().strip() if box else ""


def request(
    impl: str, broker: str, nodes: int, depth: int, prefix: str, warmup: float, seconds: float
) -> dict[str, Any]:
    cmd = [PY, "-m", "bench.mqtt_bench", "request", "--impl", impl, "--broker", broker]
    cmd += ["--nodes", str(nodes), "--depth", str(depth), "--prefix", prefix]
    cmd += ["--warmup", str(warmup), "--seconds", str(seconds)]
    out = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=warmup + seconds + DRAIN + 120
    )
    if out.returncode != 0:
        raise RuntimeError(f"{impl} requester failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# -- the run -----------------------------------------------------------------------------------
def run_s9(
    broker: Any,
    cells: list[tuple[int, int]],
    impls: list[str],
    rounds: int,
    warmup: float,
    seconds: float,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Each cell: ``rounds`` rounds, implementations alternated (a fresh responder process and
    topic prefix each); per implementation the best round (highest throughput) is kept, with
    its own p99; the median round's ratios are kept too."""
    rows = []
    for cell in cells:
        nodes, depth = cell
        runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
        for round_ in range(rounds):
            order = impls if round_ % 2 == 0 else impls[::-1]
            for impl in order:
                prefix = round_prefix(cell, round_, impl)
                responder = Responder(impl, broker.url, nodes, prefix)
                try:
                    cpu0 = proc_cpu(responder.pid)
                    result = request(impl, broker.url, nodes, depth, prefix, warmup, seconds)
                    result["responder_cpu_s"] = round(proc_cpu(responder.pid) - cpu0, 3)
                    result["responder_rss_kb"] = rss_kb(responder.pid)
                    for side in ("requester", "responder"):  # CPU per request, both sides
                        result[f"{side}_us"] = result[f"{side}_cpu_s"] / result["sent"] * 1e6
                finally:
                    responder.stop()
                runs[impl].append(result)
                log(
                    f"S9 {nodes}x{depth} {impl:<13} round {round_ + 1}: "
                    f"{result['replies_per_s']:7,.0f}/s p50 {result['p50_ms']:.2f} ms "
                    f"p99 {result['p99_ms']:.2f} ms; CPU per request: requester "
                    f"{result['requester_us']:.0f} us, responder {result['responder_us']:.0f} us; "
                    f"errors {result['errors']} "
                    f"lost {result['lost']}"
                )
        best = {impl: max(rs, key=lambda r: r["replies_per_s"]) for impl, rs in runs.items() if rs}
        median = {impl: _median_round(rs) for impl, rs in runs.items() if rs}
        row: dict[str, Any] = {"nodes": nodes, "depth": depth, "results": best, "rounds": runs}
        if "paho" in best:
            row["ratios"] = {
                impl: _ratios(best[impl], best["paho"]) for impl in best if impl != "paho"
            }
            row["median_ratios"] = {
                impl: _ratios(median[impl], median["paho"]) for impl in median if impl != "paho"
            }
        rows.append(row)
    return rows


def _median_round(results: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(results, key=lambda r: r["replies_per_s"])[(len(results) - 1) // 2]


def _ratios(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    return {
        "throughput": ours["replies_per_s"] / max(ref["replies_per_s"], 1e-9),
        "p99": ours["p99_ms"] / max(ref["p99_ms"], 1e-9),
    }


# -- rendering and targets (bench/run.py shows these too) ---------------------------------------
def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each ``{"target", "met", "detail"}`` (as bench/run.py lists them)."""
    out: list[dict[str, Any]] = []
    for row in report.get("s9") or []:
        ratio = row.get("ratios", {}).get("statelink")
        if ratio is None:
            continue
        ref, ours = row["results"]["paho"], row["results"]["statelink"]
        clean = not (ours["errors"] or ours["lost"])
        out.append(
            {
                "target": f"S9 {row['nodes']}x{row['depth']} statelink >= 0.8x bare paho "
                "throughput, p99 <= 1.5x",
                "met": ratio["throughput"] >= 0.8 and ratio["p99"] <= 1.5 and clean,
                "detail": f"{ours['replies_per_s']:,.0f} vs {ref['replies_per_s']:,.0f} req/s = "
                f"{ratio['throughput']:.2f}x; p99 {ours['p99_ms']:.2f} vs {ref['p99_ms']:.2f} ms "
                f"= {ratio['p99']:.2f}x" + ("" if clean else " (errors or lost replies)"),
            }
        )
    s10 = report.get("s10")
    if s10 and "runs" in s10:
        out.append(
            {
                "target": f"S10 {s10['nodes']} nodes, one workflow each: all succeed, none lost",
                "met": bool(s10.get("ok")),
                "detail": f"{s10.get('ok_runs', 0)} ok, {s10.get('failed_runs', '?')} failed, "
                f"{s10.get('missing_executions', '?')} executions missing, "
                f"{s10.get('duplicate_executions', '?')} duplicated, "
                f"{s10.get('elapsed_s', 0):.1f} s"
                + ("" if s10.get("ok") else f" (PROBLEM: {s10.get('problem')})"),
            }
        )
    return out


def render(report: dict[str, Any]) -> list[str]:
    """S9's table and S10's line, markdown."""
    from bench.run import markdown_table  # the one table renderer of the benchmarks

    out: list[str] = []
    if report.get("missing"):
        return [f"S9/S10 not measured: {report['missing']}"]
    rows = report.get("s9") or []
    if rows:
        head = ["S9 MQTT req/resp", "nodes x depth", "req/s", "p50 ms", "p99 ms"]
        head += ["requester CPU", "responder CPU", "vs paho req/s", "vs paho p99", "note"]
        body = []
        for row in rows:
            for impl, res in row["results"].items():
                ratio = row.get("ratios", {}).get(impl)
                median = row.get("median_ratios", {}).get(impl)
                note = (
                    f"errors {res['errors']} lost {res['lost']}"
                    if res["errors"] or res["lost"]
                    else ""
                )
                if median:
                    note += f" median round {median['throughput']:.2f}x / {median['p99']:.2f}x"
                body.append(
                    [
                        SHOWN.get(impl, impl),
                        f"{row['nodes']} x {row['depth']}",
                        f"{res['replies_per_s']:,.0f}",
                        f"{res['p50_ms']:.2f}",
                        f"{res['p99_ms']:.2f}",
                        f"{res['requester_us']:.0f} us",
                        f"{res['responder_us']:.0f} us",
                        f"{ratio['throughput']:.2f}x" if ratio else "-",
                        f"{ratio['p99']:.2f}x" if ratio else "-",
                        note.strip(),
                    ]
                )
        out += markdown_table(head, body, right={1, 2, 3, 4, 5, 6, 7, 8})
        meta = report.get("s9_meta", {})
        out.append(
            f"(best of {meta.get('rounds')} alternated rounds of {meta.get('seconds')} s each "
            f"after {meta.get('warmup')} s warm-up; CPU: per request, each side's process)"
        )
    s10 = report.get("s10")
    if s10:
        if "runs" in s10:
            out.append(
                f"S10 {s10['nodes']} nodes on one broker, one workflow each "
                f"({s10['steps']} steps): {s10['elapsed_s']:.2f} s (runs started within "
                f"{s10['started_s']:.2f} s; the nodes came up in {s10['nodes_start_s']:.1f} s), "
                f"{s10['ok_runs']} ok / "
                f"{s10['failed_runs']} failed, executions {s10['executions']} "
                f"(missing {s10['missing_executions']}, duplicated "
                f"{s10['duplicate_executions']}); controller peak RSS "
                f"{s10['controller_peak_rss_mb']:.0f} MB, broker RSS {s10['broker_rss_mb']:.1f} "
                f"MB, node process RSS {s10['nodes_rss_mb']:.0f} MB"
                + ("" if s10.get("ok") else f"  PROBLEM: {s10.get('problem')}")
            )
        else:
            out.append(f"S10 not measured: {s10.get('problem')}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mqtt_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="role")
    respond = sub.add_parser("respond")
    request_ = sub.add_parser("request")
    for p in (respond, request_):
        p.add_argument("--impl", choices=sorted(RESPONDERS), required=True)
        p.add_argument("--broker", required=True)
        p.add_argument("--nodes", type=int, default=1)
        p.add_argument("--prefix", required=True, help="the topic prefix of this round")
    respond.add_argument("--max-seconds", type=float, default=900)
    request_.add_argument("--depth", type=int, default=1)
    request_.add_argument("--warmup", type=float, default=1.0)
    request_.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", metavar="FILE", help="write every number here")
    parser.add_argument("--cells", default="1x1,50x4", help="NODESxDEPTH,... (default 1x1,50x4)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="S9 measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="S9 warm-up seconds")
    parser.add_argument("--impls", default="paho,statelink,statelink-def")
    parser.add_argument("--scenarios", default="S9,S10")
    parser.add_argument("--s10-nodes", type=int, default=200)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """S9 and S10 on one Mosquitto of their own; the report (``missing`` without a broker)."""
    from bench.broker import Mosquitto, mosquitto_binary

    scenarios = {s.strip().upper() for s in args.scenarios.split(",")}
    cells = [(int(a), int(b)) for a, b in (c.split("x") for c in args.cells.split(","))]
    impls = [impl for impl in args.impls.split(",") if impl in RESPONDERS]
    rounds, seconds, warmup, fleet = args.rounds, args.seconds, args.warmup, args.s10_nodes
    if args.quick:
        cells, rounds, seconds, warmup, fleet = [(1, 1), (4, 2)], 1, 0.5, 0.2, 5
    report: dict[str, Any] = {"cpus": os.cpu_count(), "load_before": os.getloadavg()}
    if mosquitto_binary() is None:
        report["missing"] = "mosquitto is not installed (apt-get install -y mosquitto)"
        return report
    with Mosquitto() as broker:
        if "S9" in scenarios:
            report["s9_meta"] = {"rounds": rounds, "seconds": seconds, "warmup": warmup}
            report["s9"] = run_s9(broker, cells, impls, rounds, warmup, seconds, log)
        if "S10" in scenarios:
            from bench.fleet_bench import run_s10

            report["s10"] = run_s10(broker, fleet, log)
        report["broker_rss_kb"] = broker.rss_kb()
    report["load_after"] = os.getloadavg()
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "respond":
        return cmd_respond(args)
    if args.role == "request":
        return cmd_request(args)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    report = measure(args, log)
    report["targets"] = targets(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(render(report)))
    for t in report["targets"]:
        mark = {True: "MET   ", False: "MISSED", None: "N/A   "}[t["met"]]
        print(f"  {mark} {t['target']}: {t['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
