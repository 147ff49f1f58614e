"""S10: a fleet on one broker (run by :mod:`bench.mqtt_bench`, which starts the Mosquitto).

* ``python -m bench.fleet_bench nodes --broker URL --prefix P --nodes N --dir D``: one process
  serving N simulated nodes: N :class:`~controller.server.CommandServer` without a TCP socket
  (one per node, as each Pi has its own; one worker thread each), each with the tiny device
  :data:`DEVICE` (no GPIO; ``async def`` handlers that count their executions) and one
  :class:`~controller.mqtt.node.MqttNode` ``node-I``. Prints ``READY PID START_SECONDS``; once
  its stdin closes, one JSON line: every handler execution checked against what N runs must
  have done (missing, duplicated), then it stops its servers.
* ``python -m bench.fleet_bench control --broker URL --prefix P --nodes N``: one controller
  process, one :class:`~controller.runner.WorkflowRunner` (journals on, in a temporary state
  directory; one broker connection for every node), one run of :data:`WORKFLOW` per node, all
  concurrent; prints one JSON line (time, outcomes, peak RSS).

:func:`run_s10` runs both and samples the broker's and the node process's RSS meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.mqtt_bench import (
    PY,
    ROOT,
    _read_line,
    _serve_until_stdin_closes,
    bench_options,
    node_name,
    rss_kb,
)

#: the simulated device of every node: three handler commands (counted), and ``unit.state``
DEVICE = """\
device: unit
description: A tiny simulated unit for the fleet benchmark (no GPIO).
states: [idle, busy]
initial: idle
timeout: 30s
commands:
  start:
    from: [idle]
    to: busy
    handler: bench.fleet_bench:work
    params: {run: {type: string}}
  measure:
    from: [busy]
    handler: bench.fleet_bench:work
    params: {run: {type: string}}
  stop:
    from: [busy]
    to: idle
    handler: bench.fleet_bench:work
    params: {run: {type: string}}
"""
#: the handler commands each run calls once
COUNTED = ("start", "measure", "stop")

#: one run per node (its ``device`` server is set per run): five commands, three of them
#: counted by the node, each run's own ``run`` input in their params
WORKFLOW = """\
name: fleet_bench
servers: {device: "mqtt://127.0.0.1:1883/node-0"}
inputs: {run: ""}
command_timeout: 30s
initial: ping
states:
  ping: {command: rpc.ping, next: begin}
  begin: {command: unit.start, params: {run: "{{ run }}"}, next: measure}
  measure: {command: unit.measure, params: {run: "{{ run }}"}, save: m, next: check}
  check: {command: unit.state, next: end}
  end: {command: unit.stop, params: {run: "{{ run }}"}, next: done}
  done: {final: success}
"""
STEPS = 5

_executions: Counter[tuple[str, str]] = Counter()
_lock = threading.Lock()


async def work(ctx: Any, run: str) -> dict[str, Any]:
    """Count one execution of ``ctx.command`` for ``run`` (each node's loop thread)."""
    with _lock:
        _executions[(run, ctx.command)] += 1
    return {"run": run, "command": ctx.command}


def _run_input(index: int) -> str:
    return f"r{index}"


# -- the node process --------------------------------------------------------------------------
def cmd_nodes(args: argparse.Namespace) -> int:
    from controller import CommandServer
    from controller.devices import add_device
    from controller.mqtt.node import MqttNode
    from statemachines.device import load_device

    path = Path(args.dir) / "unit.yaml"
    path.write_text(DEVICE)
    spec = load_device(path)
    options = bench_options(args.prefix)
    t0 = time.perf_counter()
    servers = []
    for index in range(args.nodes):
        server = CommandServer(port=None, workers=1, name=f"fleet-{index}")
        add_device(server, spec, simulate=True)
        MqttNode(server, args.broker, node_name(index), options)
        servers.append(server.start())
    print("READY", os.getpid(), round(time.perf_counter() - t0, 3), flush=True)
    _serve_until_stdin_closes(args.max_seconds)
    with _lock:
        seen = dict(_executions)
    expected = {(_run_input(i), c) for i in range(args.nodes) for c in COUNTED}
    report = {
        "executions": sum(seen.values()),
        "missing_executions": len(expected - seen.keys()),
        "duplicate_executions": sum(n - 1 for n in seen.values() if n > 1),
        "unexpected_executions": len(seen.keys() - expected),
    }
    print(json.dumps(report), flush=True)
    stoppers = [threading.Thread(target=server.stop) for server in servers]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join(30)
    return 0


# -- the controller process --------------------------------------------------------------------
def cmd_control(args: argparse.Namespace) -> int:
    from bench.workflow_bench import PeakSampler
    from controller.runner import WorkflowRunner
    from statemachines.workflow import parse_workflow

    spec = parse_workflow(WORKFLOW, "bench/fleet_bench.py:WORKFLOW")
    with (
        tempfile.TemporaryDirectory(prefix="statelink-fleet-") as state_dir,
        WorkflowRunner(
            client_name="statelink-fleet-bench",
            state_dir=state_dir,
            mqtt=bench_options(args.prefix),
        ) as runner,
    ):
        compiled = runner.compile(spec)
        peaks = PeakSampler()
        t0 = time.perf_counter()
        handles = [
            runner.start(
                compiled,
                servers={"device": f"{args.broker}/{node_name(i)}"},
                run_id=f"fleet-{i}",
                context={"run": _run_input(i)},
            )
            for i in range(args.nodes)
        ]
        started = time.perf_counter() - t0
        deadline = t0 + args.timeout
        for handle in handles:
            handle.wait(max(0.0, deadline - time.perf_counter()))
        elapsed = time.perf_counter() - t0
        footprint = peaks.stop()
        outcomes = Counter(str(h.outcome) if h.done else "unfinished" for h in handles)
        reasons = Counter(
            str(h.run.reason)[:160] for h in handles if h.done and h.outcome != "success"
        )
    print(
        json.dumps(
            {
                "runs": args.nodes,
                "steps": STEPS,
                "started_s": round(started, 3),
                "elapsed_s": round(elapsed, 3),
                "outcomes": dict(outcomes),
                "failure_reasons": dict(reasons.most_common(3)),
                "controller_peak_rss_mb": round(footprint["peak_rss_mb"], 1),
                "controller_peak_open_files": footprint["peak_open_files"],
            }
        ),
        flush=True,
    )
    return 0


# -- the scenario ------------------------------------------------------------------------------
def run_s10(broker: Any, nodes: int, log: Any, timeout: float = 300.0) -> dict[str, Any]:
    """S10 on ``broker`` (a running :class:`bench.broker.Mosquitto`): ``nodes`` nodes in one
    process, one controller process running one workflow per node; the result (``ok``: every
    run succeeded, every counted execution happened once)."""
    prefix = f"benchfleet{os.getpid()}"
    common = ["--broker", broker.url, "--prefix", prefix, "--nodes", str(nodes)]
    with tempfile.TemporaryDirectory(prefix="statelink-fleet-nodes-") as directory:
        node_proc = subprocess.Popen(
            [PY, "-m", "bench.fleet_bench", "nodes", *common, "--dir", directory],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            line = _read_line(node_proc, timeout)
            if not line.startswith("READY"):
                return {"ok": False, "problem": f"the node process did not start: {line!r}"}
            _, pid, start_s = line.split()
            peaks = {"broker": broker.rss_kb(), "nodes": rss_kb(int(pid))}
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.1):
                    peaks["broker"] = max(peaks["broker"], broker.rss_kb())
                    peaks["nodes"] = max(peaks["nodes"], rss_kb(int(pid)))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            control = subprocess.run(
                [PY, "-m", "bench.fleet_bench", "control", *common, "--timeout", str(timeout)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout + 60,
            )
            stop.set()
            sampler.join()
            node_proc.stdin.close()  # type: ignore[union-attr]
            node_line = _read_line(node_proc, 60)
        finally:
            if node_proc.stdin and not node_proc.stdin.closed:
                node_proc.stdin.close()
            try:
                node_proc.wait(60)
            except subprocess.TimeoutExpired:
                node_proc.kill()
                node_proc.wait(5)
    try:
        result = dict(json.loads(control.stdout.strip().splitlines()[-1]))
        result.update(json.loads(node_line))
    except (ValueError, IndexError):
        return {
            "ok": False,
            "problem": f"no result (controller exit {control.returncode}): "
            f"{control.stderr.strip()[-800:]}",
        }
    ok_runs = result["outcomes"].get("success", 0)
    result.update(
        nodes=nodes,
        nodes_start_s=float(start_s),
        ok_runs=ok_runs,
        failed_runs=nodes - ok_runs,
        broker_rss_mb=peaks["broker"] / 1024,
        nodes_rss_mb=peaks["nodes"] / 1024,
    )
    problems = []
    if ok_runs != nodes:
        problems.append(f"outcomes {result['outcomes']} {result['failure_reasons']}")
    for key in ("missing_executions", "duplicate_executions", "unexpected_executions"):
        if result[key]:
            problems.append(f"{result[key]} {key.replace('_', ' ')}")
    result["ok"] = not problems
    if problems:
        result["problem"] = "; ".join(problems)
    log(
        f"S10 {nodes} nodes: {result['elapsed_s']:.1f} s ({result['started_s']:.1f} s to start "
        f"the runs), {ok_runs} ok / {nodes - ok_runs} failed, executions "
        f"{result['executions']}; controller peak RSS {result['controller_peak_rss_mb']:.0f} "
        f"MB, broker {result['broker_rss_mb']:.1f} MB, nodes {result['nodes_rss_mb']:.0f} MB"
        + ("" if result["ok"] else f"; PROBLEM: {result['problem']}")
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_bench", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    for name in ("nodes", "control"):
        p = sub.add_parser(name)
        p.add_argument("--broker", required=True)
        p.add_argument("--prefix", required=True)
        p.add_argument("--nodes", type=int, default=200)
    sub.choices["nodes"].add_argument("--dir", required=True, help="where the device YAML goes")
    sub.choices["nodes"].add_argument("--max-seconds", type=float, default=900)
    sub.choices["control"].add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    return cmd_nodes(args) if args.role == "nodes" else cmd_control(args)


if __name__ == "__main__":
    # the handlers are imported by name (bench.fleet_bench:work): count in that module
    from bench.fleet_bench import main as _main

    sys.exit(_main())
