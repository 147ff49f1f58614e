"""Run every statelink benchmark and print one table: ``python -m bench.run``.

Each server (the three references of :mod:`bench.references` and statelink) runs as its own
process; load comes from separate processes (:mod:`bench.load`), over 127.0.0.1 only, bounded
in time. By default the server process is pinned to CPU 0 and the load processes to CPU 1
(``--no-pin`` to let the kernel place them). Every ratio in the table compares numbers measured
in the same run.

Scenarios:

* S1 request/reply, trivial command, 1/16/64 connections, one request in flight each;
  statelink twice: ``async def`` on the I/O loop and plain ``def`` through the worker pool;
* S2 one connection, 256 requests in flight (pipelined);
* S3 64 connections calling a command that blocks 10 ms (statelink with 8 and 64 workers);
* S4 the workflow engine (:mod:`bench.workflow_bench`): 1000 concurrent 10-step runs;
* S5 footprint: idle RSS, RSS with 1000 idle connections, start to listening, client import;
* S6 idempotency keys: a trivial device command (``from: "*"``) at 64 connections, with a fresh
  key on every request and without one, against the same server (its key store in a temporary
  ``--state-dir``), in interleaved rounds.
* S4 also runs with the default journals (a temporary state directory: fsynced, group commit)
  after the run without, on the same server: the ratio of the two;
* S7 the runner at scale: 10,000 concurrent runs of ten_steps.yaml, all journaled: time,
  transitions/s, the controller's peak RSS and open files;
* S8 await timeouts under notifications: 1,000 runs each in one await of ``device.state``
  (timeout 3 s, never satisfied) while the server publishes ``device.state`` 1,000 times a
  second: how late the timeouts fire (p50/p99/max).
* S9, S10 (issue 13, :mod:`bench.mqtt_bench`, its own Mosquitto): request/response over MQTT 5
  against bare paho-mqtt; 200 simulated nodes, one workflow each, on one broker.

``--quick`` runs everything at tiny sizes (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import load

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

#: display names of the servers, in table order
REF1, REF2, REF3 = "ref1 thread/cmd+callback", "ref2 ThreadingTCPServer", "ref3 asyncio streams"
SL_ASYNC, SL_SYNC = "statelink async def", "statelink def (pool)"
REFS = (REF1, REF2, REF3)
KIND = {REF1: "callback", REF2: "threading", REF3: "asyncio"}


# --- server processes ------------------------------------------------------------------------


class ServerProcess:
    """One server in its own process; READY line on stdout; ends when we close its stdin."""

    def __init__(
        self,
        kind: str,
        *,
        cpu: int | None = None,
        workers: int = 8,
        max_inflight: int | None = None,
        max_connections: int | None = None,
        extra: list[str] | None = None,
        timeout: float = 20.0,
    ) -> None:
        self.kind = kind
        self.workers = workers
        cmd = [
            PY,
            "-m",
            "bench.references",
            kind,
            "--port",
            "0",
            "--workers",
            str(workers),
            "--max-seconds",
            "900",
        ]
        if cpu is not None:
            cmd += ["--cpu", str(cpu)]
        if max_inflight is not None:
            cmd += ["--max-inflight", str(max_inflight)]
        if max_connections is not None:
            cmd += ["--max-connections", str(max_connections)]
        cmd += extra or []
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        line = _read_line(self.proc, timeout)
        #: seconds from process start (Popen) to listening (the READY line)
        self.start_seconds = time.perf_counter() - t0
        parts = line.split()
        if len(parts) < 2 or parts[0] != "READY":
            self.stop()
            raise RuntimeError(f"{kind} server did not start: {line!r}")
        self.port = int(parts[1])
        self.pid = self.proc.pid

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sel.select(remaining):
            proc.kill()
            raise RuntimeError(f"no READY line within {timeout} s")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise RuntimeError("the server exited before listening")
        data += chunk
    sel.close()
    return data.decode().strip()


# --- measurements ------------------------------------------------------------------------------

_CTX = mp.get_context("spawn")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def measure(spec: load.LoadSpec, procs: int = 1, timeout_extra: float = 30.0) -> dict[str, Any]:
    """Run ``procs`` load processes (connections split between them) and merge their results."""
    per = [spec.conns // procs + (1 if i < spec.conns % procs else 0) for i in range(procs)]
    children = []
    try:
        for conns in per:
            if conns == 0:
                continue
            parent_end, child_end = _CTX.Pipe()
            args = dict(load.spec_dict(spec), conns=conns)
            proc = _CTX.Process(target=load.load_process, args=(args, child_end), daemon=True)
            proc.start()
            child_end.close()
            children.append((proc, parent_end))
        for _, pipe in children:
            if not pipe.poll(30.0):
                raise RuntimeError("a load process did not get ready")
            kind, info = pipe.recv()
            if kind != "ready":
                raise RuntimeError(f"load process: {info}")
        t_go = time.perf_counter() + 0.1
        for _, pipe in children:
            pipe.send(("go", t_go))
        results = []
        budget = spec.warmup + spec.duration + spec.drain + timeout_extra
        for _, pipe in children:
            if not pipe.poll(max(1.0, t_go + budget - time.perf_counter())):
                raise RuntimeError("a load process did not report in time")
            kind, info = pipe.recv()
            if kind != "result":
                raise RuntimeError(f"load process: {info}")
            results.append(info)
    finally:
        for proc, pipe in children:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            pipe.close()
    lat = array("q")
    for r in results:
        lat.frombytes(r["latencies_ns"])
    values = sorted(lat)
    completed = sum(r["completed"] for r in results)
    server_cpu = [r["server_cpu"] for r in results if r["server_cpu"] is not None]
    load_cpu = sum(r["load_cpu"] for r in results)
    srv = statistics.mean(server_cpu) if server_cpu else None
    machine = statistics.mean(r["machine_cpu"] for r in results)
    return {
        "throughput": completed / spec.duration,
        "completed": completed,
        "sent": sum(r["sent"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "p50_ms": percentile(values, 0.50) / 1e6,
        "p99_ms": percentile(values, 0.99) / 1e6,
        "load_cpu": load_cpu,
        "server_cpu": srv,
        # CPU used by every other process of the machine during the window (noise)
        "other_cpu": max(0.0, machine - load_cpu - (srv or 0.0)),
    }


def failed(reason: str) -> dict[str, Any]:
    return {
        "throughput": 0.0,
        "completed": 0,
        "sent": 0,
        "errors": 0,
        "lost": 0,
        "p50_ms": float("nan"),
        "p99_ms": float("nan"),
        "load_cpu": 0.0,
        "server_cpu": None,
        "other_cpu": None,
        "failed": reason,
    }


@dataclass
class Row:
    scenario: str
    server: str
    conns: int
    depth: int
    result: dict[str, Any]
    note: str = ""
    ratios: dict[str, float] = field(default_factory=dict)


@dataclass
class Options:
    duration: float
    warmup: float
    pin: bool
    s1_conns: list[int]
    s2_depth: int
    s3_conns: int
    s3_workers: list[int]
    s4_runs: int
    s5_conns: int
    s6_conns: int
    s7_runs: int
    s8_runs: int
    s8_rate: float
    repeat: int
    procs: int
    scenarios: set[str]
    quick: bool


def cpus(opts: Options) -> tuple[int | None, int | None]:
    """(server CPU, load CPU) when pinning."""
    if not opts.pin or len(os.sched_getaffinity(0)) < 2:
        return None, None
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[0], allowed[1]


def run_s1_s2_s3(opts: Options, log: Any) -> list[Row]:
    """S1 and S2 in interleaved rounds (best of ``repeat`` per cell), then S3."""
    rows: list[Row] = []
    srv_cpu, load_cpu = cpus(opts)

    def one(
        server: ServerProcess,
        name: str,
        scenario: str,
        conns: int,
        depth: int,
        method: str,
        params: Any,
    ) -> dict[str, Any]:
        spec = load.LoadSpec(
            port=server.port,
            conns=conns,
            depth=depth,
            method=method,
            params=params,
            warmup=opts.warmup,
            duration=opts.duration,
            callback=server.kind == "callback",
            cpu=load_cpu,
            server_pid=server.pid,
        )
        try:
            result = measure(spec, procs=min(opts.procs, conns))
        except (RuntimeError, OSError, EOFError) as exc:
            result = failed(f"{type(exc).__name__}: {exc}")
        log(
            f"  {scenario:<7} {name:<26} {result['throughput']:>10,.0f} req/s  "
            f"p50 {result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms  errors "
            f"{result['errors']} lost {result['lost']}  other CPU "
            f"{_fmt(result['other_cpu'] and result['other_cpu'] * 100, '.0f')}%"
            + (f"  FAILED {result['failed']}" if "failed" in result else "")
        )
        return result

    cells: list[tuple[str, int, int]] = []
    if "S1" in opts.scenarios:
        cells += [(f"S1@{conns}", conns, 1) for conns in opts.s1_conns]
    if "S2" in opts.scenarios:
        cells.append(("S2", 1, opts.s2_depth))
    if cells:
        names = (*REFS, SL_ASYNC, SL_SYNC)
        servers: dict[str, ServerProcess] = {}
        samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
        try:
            for name in names:
                servers[name] = ServerProcess(KIND.get(name, "statelink"), cpu=srv_cpu)
            for round_no in range(opts.repeat):
                if opts.repeat > 1:
                    log(f" round {round_no + 1} of {opts.repeat}")
                for scenario, conns, depth in cells:
                    for name in names:
                        method = "bench.echo_sync" if name == SL_SYNC else "bench.echo"
                        samples.setdefault((scenario, name), []).append(
                            one(servers[name], name, scenario, conns, depth, method, ["x"])
                        )
        finally:
            for server in servers.values():
                server.stop()
        for scenario, conns, depth in cells:
            for name in names:
                runs = samples.get((scenario, name), [])
                if not runs:
                    continue
                best = dict(max(runs, key=lambda r: r["throughput"]))
                best["samples"] = [round(r["throughput"]) for r in runs]
                rows.append(Row(scenario, name, conns, depth, best))
    if "S3" in opts.scenarios:
        conns = opts.s3_conns
        for name in REFS:
            # the asyncio reference gets one executor thread per connection, like ref1/ref2
            with ServerProcess(KIND[name], cpu=srv_cpu, workers=conns) as server:
                result = one(server, name, "S3", conns, 1, "bench.sleep", [])
            rows.append(
                Row(
                    "S3",
                    name,
                    conns,
                    1,
                    result,
                    "thread per command" if name == REF1 else f"{conns} threads",
                )
            )
        for workers in opts.s3_workers:
            with ServerProcess("statelink", cpu=srv_cpu, workers=workers) as server:
                name = f"statelink {workers} workers"
                result = one(server, name, "S3", conns, 1, "bench.sleep", [])
            theoretical = min(workers, conns) / 0.010
            result.update(workers=workers, theoretical=theoretical)
            share = result["throughput"] / theoretical
            rows.append(
                Row("S3", name, conns, 1, result, f"{share:.0%} of max {theoretical:,.0f}/s")
            )
    return rows


def add_ratios(rows: list[Row]) -> None:
    by_scenario: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.server in REFS:
            by_scenario.setdefault(row.scenario, {})[row.server] = row.result["throughput"]
    for row in rows:
        refs = by_scenario.get(row.scenario, {})
        row.ratios = {ref: row.result["throughput"] / tp for ref, tp in refs.items() if tp > 0}


# --- S6: idempotency keys --------------------------------------------------------------------

SL_UNKEYED, SL_KEYED = "statelink device cmd", "statelink device cmd + key"

#: the S6 device: one trivial command allowed in every state (so commands never wait for a
#: state), its handler a plain ``def`` run by the worker pool like any device handler
KEYED_DEVICE = """\
device: keyed
description: the S6 device (bench/run.py)
states: [idle]
initial: idle
commands:
  echo:
    from: "*"
    handler: bench_device_hw:echo
    params:
      value: {type: string, default: ""}
"""
KEYED_DEVICE_HW = "def echo(ctx, value=''):\n    return value\n"


def filesystem_of(path: Path) -> str:
    """The filesystem type ``path`` is on (from /proc/mounts), e.g. ext4 or tmpfs."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def run_s6(opts: Options, log: Any) -> list[Row]:
    """The same device command with and without an idempotency key, one server, interleaved
    rounds (best of ``repeat`` per variant); the server's key store in a temporary directory
    (group commit, fsync on)."""
    import tempfile

    srv_cpu, load_cpu = cpus(opts)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="statelink-bench-") as tmp:
        folder = Path(tmp)
        (folder / "bench_device_hw.py").write_text(KEYED_DEVICE_HW)
        device = folder / "keyed.yaml"
        device.write_text(KEYED_DEVICE)
        state_dir = folder / "state"
        note = f"keys in {filesystem_of(folder)} ({folder})"
        samples: dict[str, list[dict[str, Any]]] = {SL_UNKEYED: [], SL_KEYED: []}
        with ServerProcess(
            "statelink",
            cpu=srv_cpu,
            extra=["--device", str(device), "--state-dir", str(state_dir)],
        ) as server:
            for round_no in range(opts.repeat):
                if opts.repeat > 1:
                    log(f" S6 round {round_no + 1} of {opts.repeat}")
                for name in (SL_UNKEYED, SL_KEYED):
                    spec = load.LoadSpec(
                        port=server.port,
                        conns=opts.s6_conns,
                        method="keyed.echo",
                        params={"value": "x"},
                        warmup=opts.warmup,
                        duration=opts.duration,
                        cpu=load_cpu,
                        server_pid=server.pid,
                        keyed=name == SL_KEYED,
                    )
                    try:
                        result = measure(spec, procs=min(opts.procs, opts.s6_conns))
                    except (RuntimeError, OSError, EOFError) as exc:
                        result = failed(f"{type(exc).__name__}: {exc}")
                    log(
                        f"  S6      {name:<26} {result['throughput']:>10,.0f} req/s  "
                        f"p50 {result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms  errors "
                        f"{result['errors']} lost {result['lost']}"
                        + (f"  FAILED {result['failed']}" if "failed" in result else "")
                    )
                    samples[name].append(result)
        best = {}
        for name, runs in samples.items():
            best[name] = dict(max(runs, key=lambda r: r["throughput"]))
            best[name]["samples"] = [round(r["throughput"]) for r in runs]
        unkeyed = best[SL_UNKEYED]["throughput"]
        ratio = best[SL_KEYED]["throughput"] / unkeyed if unkeyed > 0 else 0.0
        best[SL_KEYED]["vs_unkeyed"] = ratio
        rows.append(Row("S6", SL_UNKEYED, opts.s6_conns, 1, best[SL_UNKEYED], "no key"))
        rows.append(
            Row(
                "S6",
                SL_KEYED,
                opts.s6_conns,
                1,
                best[SL_KEYED],
                f"a fresh key per request: {ratio:.2f}x of no key; {note}",
            )
        )
    return rows


# --- S4 and S5 ---------------------------------------------------------------------------------


DEMO_DEVICE = ROOT / "config" / "devices" / "demo.yaml"


def run_s4(opts: Options, log: Any) -> list[dict[str, Any]]:
    """The repository's ten_steps.yaml (demo device, simulated) and the built-in ten bench.step
    workflow, each against a fresh statelink server."""
    from .workflow_bench import REPO_WORKFLOW

    srv_cpu, load_cpu = cpus(opts)
    # The runner shares one client (one connection) per server among all its runs, so
    # 1000 concurrent runs put up to 1000 requests in flight on one connection: above the
    # server's default Limits.max_inflight (256). The S4 server allows more.
    max_inflight = max(2048, 2 * opts.s4_runs)
    variants: list[tuple[str, list[str]]] = [("builtin", [])]
    if REPO_WORKFLOW.exists() and DEMO_DEVICE.exists():
        variants.insert(0, (str(REPO_WORKFLOW), ["--device", str(DEMO_DEVICE)]))
    results = []
    for workflow, extra in variants:
        with ServerProcess(
            "statelink", cpu=srv_cpu, max_inflight=max_inflight, extra=extra
        ) as server:
            cmd = [
                PY,
                "-m",
                "bench.workflow_bench",
                "--port",
                str(server.port),
                "--runs",
                str(opts.s4_runs),
                "--server-pid",
                str(server.pid),
                "--workflow",
                workflow,
                "--journals",
                "both",
            ]
            if load_cpu is not None:
                cmd += ["--cpu", str(load_cpu)]
            try:
                out = subprocess.run(
                    cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
                )
                result = json.loads(out.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                result = {"ok": False, "missing": "the workflow benchmark did not finish in 240 s"}
            except (ValueError, IndexError):
                result = {
                    "ok": False,
                    "missing": f"no result (exit {out.returncode}): {out.stderr.strip()[-800:]}",
                }
        result["server_max_inflight"] = max_inflight
        result.setdefault("workflow", workflow)
        results.append(result)
        if "transitions_per_s" in result:
            log(
                f"  S4      {result['workflow']:<34} {result['transitions_per_s']:>8,.0f} "
                f"transitions/s, engine {result['engine_us']:.1f} us vs bare "
                f"{result['bare_us']:.1f} us per transition ({result['engine_vs_bare']:.2f}x)"
                + ("" if result.get("ok") else f"  PROBLEM: {result.get('missing')}")
            )
        else:
            log(f"  S4      {result['workflow']}: not measured: {result.get('missing')}")
        if "journaled_vs_plain" in result:
            log(
                f"  S4      {result['workflow']:<34} with journals "
                f"{result['journaled']['transitions_per_s']:>8,.0f} transitions/s "
                f"({result['journaled_vs_plain']:.2f}x without)"
            )
    return results


def _bench_json(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run a bench.workflow_bench command; its last stdout line as JSON (or what is missing)."""
    try:
        out = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "missing": f"did not finish in {timeout:.0f} s"}
    try:
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {
            "ok": False,
            "missing": f"no result (exit {out.returncode}): {out.stderr.strip()[-800:]}",
        }


def run_s7(opts: Options, log: Any) -> dict[str, Any]:
    """10,000 concurrent journaled runs of ten_steps.yaml (demo device, simulated)."""
    from .workflow_bench import REPO_WORKFLOW

    srv_cpu, load_cpu = cpus(opts)
    # The runner keeps to the server's in-flight bound; at 1024 the demo device's lane (1024
    # commands waiting at most: Limits.max_queue) never refuses one as busy.
    max_inflight = 1024
    with ServerProcess(
        "statelink", cpu=srv_cpu, max_inflight=max_inflight, extra=["--device", str(DEMO_DEVICE)]
    ) as server:
        cmd = [PY, "-m", "bench.workflow_bench", "--port", str(server.port)]
        cmd += ["--runs", str(opts.s7_runs), "--server-pid", str(server.pid)]
        cmd += ["--workflow", str(REPO_WORKFLOW), "--journals", "on", "--no-engine"]
        cmd += ["--timeout", "500"]
        if load_cpu is not None:
            cmd += ["--cpu", str(load_cpu)]
        result = _bench_json(cmd, 600)
    if "transitions_per_s" in result:
        log(
            f"  S7      {opts.s7_runs} journaled runs: {result['elapsed_s']:.1f} s, "
            f"{result['transitions_per_s']:,.0f} transitions/s, peak RSS "
            f"{result['peak_rss_mb']:.0f} MB, peak open files {result['peak_open_files']}"
            + ("" if result.get("ok") else f"  PROBLEM: {result.get('missing')}")
        )
    else:
        log(f"  S7      not measured: {result.get('missing')}")
    return result


def run_mqtt(opts: Options, log: Any) -> dict[str, Any]:
    """S9/S10: ``python -m bench.mqtt_bench`` in a subprocess; its report (JSON)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="statelink-bench-mqtt-") as directory:
        out = Path(directory) / "mqtt.json"
        cmd = [PY, "-m", "bench.mqtt_bench", "--json", str(out), "--scenarios"]
        cmd += [",".join(sorted(opts.scenarios & {"S9", "S10"}))] + ["--quick"] * opts.quick
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=3600,
        )
        if not out.exists():
            return {"missing": f"no result (exit {proc.returncode}): {proc.stderr[-800:]}"}
        report: dict[str, Any] = json.loads(out.read_text())
    for line in proc.stderr.splitlines():
        if line.startswith("S"):
            log(f"  {line}")
    return report


def run_s8(opts: Options, log: Any) -> dict[str, Any]:
    """Await timeouts while the server publishes device.state at a fixed rate."""
    srv_cpu, load_cpu = cpus(opts)
    pin = [] if srv_cpu is None else ["--cpu", str(srv_cpu)]
    server = subprocess.Popen(
        [PY, "-m", "bench.workflow_bench", "--serve-notifications", str(opts.s8_rate), *pin],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        line = _read_line(server, 20.0)
        if not line.startswith("READY "):
            raise RuntimeError(f"the S8 server did not start: {line!r}")
        cmd = [PY, "-m", "bench.workflow_bench", "--port", line.split()[1]]
        cmd += ["--await-runs", str(opts.s8_runs), "--journals", "on"]
        cmd += ["--await-timeout", "1" if opts.quick else "3"]
        cmd += ["--spread", "0.2" if opts.quick else "1"]
        if load_cpu is not None:
            cmd += ["--cpu", str(load_cpu)]
        result = _bench_json(cmd, 120)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    result["rate"] = opts.s8_rate
    if "late_p99_ms" in result:
        log(
            f"  S8      {result['runs']} runs awaiting, {opts.s8_rate:,.0f} notifications/s: "
            f"timeouts late p50 {result['late_p50_ms']:.1f} ms, p99 {result['late_p99_ms']:.1f} "
            f"ms, max {result['late_max_ms']:.1f} ms; {result['notifications_dropped']} "
            "notifications dropped"
        )
    else:
        log(f"  S8      not measured: {result.get('missing')}")
    return result


def import_time(module: str, repeat: int) -> dict[str, Any]:
    """Seconds to import ``module`` in a fresh interpreter (median), and the top imports."""
    code = (
        "import time; t = time.perf_counter(); import "
        + module
        + "; print(time.perf_counter() - t)"
    )
    samples = []
    for _ in range(repeat):
        out = subprocess.run(
            [PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
        )
        samples.append(float(out.stdout.strip()))
    bare = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", "pass"], cwd=ROOT, check=True, timeout=60)
        bare.append(time.perf_counter() - t0)
    out = subprocess.run(
        [PY, "-X", "importtime", "-c", "import " + module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # the largest imports below the module itself (cumulative us; each name once)
    best: dict[str, int] = {}
    skip = {module, module.split(".")[0], "site", "encodings"}
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        parts = line.partition(":")[2].split("|")
        name = parts[2].strip()
        if name in skip or name.startswith("__editable__"):
            continue
        best[name] = max(best.get(name, 0), int(parts[1]))
    top = sorted(((us, name) for name, us in best.items()), reverse=True)
    return {
        "seconds": statistics.median(samples),
        "interpreter_seconds": statistics.median(bare),
        "top_us": top[:8],
    }


def run_s5(opts: Options, log: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"servers": {}, "conns": opts.s5_conns}
    for name, kind in (
        (SL_ASYNC, "statelink"),
        (REF2, "threading"),
        (REF3, "asyncio"),
        (REF1, "callback"),
    ):
        starts = []
        # start to listening: several fresh starts, median (the first one warms the disk cache)
        for _ in range(1 if opts.quick else 3):
            with ServerProcess(kind) as probe:
                starts.append(probe.start_seconds)
        with ServerProcess(kind, max_connections=max(1024, opts.s5_conns + 16)) as server:
            time.sleep(0.3)
            idle = server.rss_kb()
            parent_end, child_end = _CTX.Pipe()
            spec = load.LoadSpec(port=server.port, conns=opts.s5_conns)
            proc = _CTX.Process(
                target=load.hold_process, args=(load.spec_dict(spec), child_end), daemon=True
            )
            proc.start()
            child_end.close()
            try:
                if not parent_end.poll(60.0):
                    raise RuntimeError("the connection holder did not report")
                kind_msg, info = parent_end.recv()
                if kind_msg != "held":
                    raise RuntimeError(f"connection holder: {info}")
                time.sleep(0.3)
                loaded = server.rss_kb()
                parent_end.send("release")
            finally:
                proc.join(10)
                if proc.is_alive():
                    proc.terminate()
                parent_end.close()
        per_conn = (loaded - idle) / opts.s5_conns
        out["servers"][name] = {
            "start_s": statistics.median(starts),
            "idle_rss_mb": idle / 1024,
            "rss_conns_mb": loaded / 1024,
            "kb_per_conn": per_conn,
        }
        log(
            f"  S5      {name:<26} start {statistics.median(starts) * 1000:.0f} ms, idle "
            f"{idle / 1024:.1f} MB, {opts.s5_conns} conns {loaded / 1024:.1f} MB "
            f"({per_conn:.1f} KB/conn)"
        )
    out["client_import"] = import_time("controller.client", 1 if opts.quick else 5)
    log(
        f"  S5      import controller.client {out['client_import']['seconds'] * 1000:.0f} ms "
        f"(interpreter start {out['client_import']['interpreter_seconds'] * 1000:.0f} ms)"
    )
    return out


# --- targets and the table -----------------------------------------------------------------------


def _find(rows: list[Row], scenario: str, server: str) -> Row | None:
    return next((r for r in rows if r.scenario == scenario and r.server == server), None)


def evaluate(
    rows: list[Row],
    s4: list[dict[str, Any]] | None,
    s5: dict[str, Any] | None,
    opts: Options,
    s7: dict[str, Any] | None = None,
    s8: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []

    def add(name: str, met: bool | None, detail: str) -> None:
        targets.append({"target": name, "met": met, "detail": detail})

    top = f"S1@{max(opts.s1_conns)}" if opts.s1_conns else None
    refs = {ref: _find(rows, top, ref) for ref in REFS} if top else {}
    for variant in (SL_ASYNC, SL_SYNC):
        row = _find(rows, top, variant) if top else None
        if row is None or not all(refs.values()):
            continue
        r1, r2, r3 = (refs[REF1], refs[REF2], refs[REF3])
        assert r1 and r2 and r3
        best = max(r2, r3, key=lambda r: r.result["throughput"])
        tp = row.result["throughput"]
        add(
            f"{top} {variant} >= 1.0x best of ref2/ref3",
            tp >= best.result["throughput"],
            f"{tp:,.0f} vs {best.result['throughput']:,.0f} ({best.server}) = "
            f"{tp / best.result['throughput']:.2f}x",
        )
        ratio1 = tp / r1.result["throughput"]
        add(
            f"{top} {variant} >= 20x ref1",
            ratio1 >= 20,
            f"{tp:,.0f} vs {r1.result['throughput']:,.0f} = {ratio1:.1f}x",
        )
        best_p99 = min(r.result["p99_ms"] for r in (r1, r2, r3))
        add(
            f"{top} {variant} p99 <= best reference p99",
            row.result["p99_ms"] <= best_p99,
            f"{row.result['p99_ms']:.3f} ms vs {best_p99:.3f} ms",
        )
    for variant in (SL_ASYNC, SL_SYNC):
        s2 = _find(rows, "S2", variant)
        s1 = _find(rows, top, variant) if top else None
        if s2 and s1:
            ratio = s2.result["throughput"] / s1.result["throughput"]
            add(
                f"S2 {variant} >= 1.5x {top}",
                ratio >= 1.5,
                f"{s2.result['throughput']:,.0f} vs {s1.result['throughput']:,.0f} = {ratio:.2f}x",
            )
    for row in rows:
        if row.scenario == "S3" and "theoretical" in row.result:
            share = row.result["throughput"] / row.result["theoretical"]
            add(
                f"S3 {row.server} within 10% of workers/10ms",
                share >= 0.9,
                f"{row.result['throughput']:,.0f} of {row.result['theoretical']:,.0f}/s = "
                f"{share:.1%}",
            )
    for res in s4 or []:
        name = Path(str(res.get("workflow"))).name
        if "transitions_per_s" in res:
            add(
                f"S4 {name} >= 5,000 transitions/s",
                res["transitions_per_s"] >= 5000,
                f"{res['transitions_per_s']:,.0f} transitions/s"
                + ("" if res.get("ok") else f" (PROBLEM: {res.get('missing')})"),
            )
        else:
            add(f"S4 {name} transitions/s", None, f"not measured: {res.get('missing')}")
        if "engine_vs_bare" in res:
            add(
                f"S4 {name} engine cost <= 3x bare Machine(queued=True)",
                res["engine_vs_bare"] <= 3,
                f"{res['engine_us']:.1f} us vs {res['bare_us']:.1f} us = "
                f"{res['engine_vs_bare']:.2f}x",
            )
        if "journaled_vs_plain" in res:
            add(
                f"S4 {name} with default journals >= 0.7x without",
                res["journaled_vs_plain"] >= 0.7,
                f"{res['journaled']['transitions_per_s']:,.0f} vs "
                f"{res['transitions_per_s']:,.0f} transitions/s = {res['journaled_vs_plain']:.2f}x",
            )
    if s7 is not None and "peak_rss_mb" in s7:
        add(
            f"S7 {s7['runs']} journaled runs: controller RSS <= 300 MB",
            s7["peak_rss_mb"] <= 300 and bool(s7.get("ok")),
            f"peak {s7['peak_rss_mb']:.0f} MB, {s7['peak_open_files']} open files, "
            f"{s7['transitions_per_s']:,.0f} transitions/s, {s7['elapsed_s']:.1f} s"
            + ("" if s7.get("ok") else f" (PROBLEM: {s7.get('missing')})"),
        )
    if s8 is not None and "late_max_ms" in s8:
        add(
            "S8 await timeouts within 100 ms of due",
            s8["late_max_ms"] <= 100 and bool(s8.get("ok")),
            f"late p50 {s8['late_p50_ms']:.1f}, p99 {s8['late_p99_ms']:.1f}, max "
            f"{s8['late_max_ms']:.1f} ms ({s8['runs']} runs, {s8['rate']:,.0f} notifications/s)",
        )
    keyed, unkeyed = _find(rows, "S6", SL_KEYED), _find(rows, "S6", SL_UNKEYED)
    if keyed and unkeyed:
        ratio = keyed.result.get("vs_unkeyed", 0.0)
        add(
            "S6 keyed device command >= 0.5x unkeyed",
            ratio >= 0.5,
            f"{keyed.result['throughput']:,.0f} vs {unkeyed.result['throughput']:,.0f} req/s = "
            f"{ratio:.2f}x; p99 {keyed.result['p99_ms']:.3f} vs {unkeyed.result['p99_ms']:.3f} ms",
        )
    if s5 is not None:
        sl = s5["servers"].get(SL_ASYNC)
        if sl:
            add("S5 idle RSS <= 40 MB", sl["idle_rss_mb"] <= 40, f"{sl['idle_rss_mb']:.1f} MB")
            add(
                "S5 <= 60 KB per idle connection",
                sl["kb_per_conn"] <= 60,
                f"{sl['kb_per_conn']:.1f} KB ({s5['conns']} connections)",
            )
            add(
                "S5 start to listening <= 0.5 s",
                sl["start_s"] <= 0.5,
                f"{sl['start_s'] * 1000:.0f} ms",
            )
    return targets


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def markdown_table(head: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """A markdown table padded for reading as plain text too."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        padded = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return [line(head), sep, *(line(r) for r in rows)]


def render(
    rows: list[Row],
    s4: list[dict[str, Any]] | None,
    s5: dict[str, Any] | None,
    targets: list[dict[str, Any]],
    meta: dict[str, Any],
) -> str:
    out = [
        f"statelink benchmark - {meta['machine']}; {meta['pinning']}; "
        f"{meta['duration']} s per measurement after {meta['warmup']} s warm-up"
        + (f"; S1/S2 best of {meta['repeat']} interleaved rounds" if meta["repeat"] > 1 else ""),
        "",
    ]
    if rows:
        head = [
            "scenario",
            "server",
            "conns x depth",
            "req/s",
            "p50 ms",
            "p99 ms",
            "srv CPU",
            "other CPU",
            "vs ref1",
            "vs ref2",
            "vs ref3",
            "note",
        ]
        body = []
        for r in rows:
            res = r.result
            note = r.note
            if res["errors"] or res["lost"]:
                note += f" errors={res['errors']} lost={res['lost']}"
            if "failed" in res:
                note += f" FAILED: {res['failed']}"
            body.append(
                [
                    r.scenario,
                    r.server,
                    f"{r.conns} x {r.depth}",
                    f"{res['throughput']:,.0f}",
                    f"{res['p50_ms']:.3f}",
                    f"{res['p99_ms']:.3f}",
                    _pct(res["server_cpu"]),
                    _pct(res["other_cpu"]),
                    *(
                        _fmt(r.ratios.get(ref), ".2f") + ("x" if ref in r.ratios else "")
                        for ref in REFS
                    ),
                    note.strip(),
                ]
            )
        out += markdown_table(head, body, right={2, 3, 4, 5, 6, 7, 8, 9, 10})
        out.append("")
    if s4:
        head = [
            "S4 workflow",
            "runs x steps",
            "transitions/s",
            "run p50 ms",
            "run p99 ms",
            "engine us/tr",
            "bare us/tr",
            "engine/bare",
            "runner CPU us/tr",
            "server CPU us/tr",
            "outcomes",
        ]
        body = []
        for res in s4:
            if "transitions_per_s" not in res:
                body.append(
                    [
                        Path(str(res.get("workflow"))).name,
                        "-",
                        "-",
                        "-",
                        "-",
                        _fmt(res.get("engine_us"), ".1f"),
                        _fmt(res.get("bare_us"), ".1f"),
                        _fmt(res.get("engine_vs_bare"), ".2f"),
                        "-",
                        "-",
                        f"not measured: {res.get('missing')}",
                    ]
                )
                continue
            body.append(
                [
                    Path(str(res["workflow"])).name,
                    f"{res['runs']} x {res['steps']}",
                    f"{res['transitions_per_s']:,.0f}",
                    f"{res['run_p50_ms']:.0f}",
                    f"{res['run_p99_ms']:.0f}",
                    f"{res['engine_us']:.1f}",
                    f"{res['bare_us']:.1f}",
                    f"{res['engine_vs_bare']:.2f}x",
                    f"{res['runner_cpu_us']:.0f}",
                    _fmt(res.get("server_cpu_us"), ".0f"),
                    ", ".join(f"{k} {v}" for k, v in res["outcomes"].items())
                    + ("" if res.get("ok") else f" PROBLEM: {res.get('missing')}"),
                ]
            )
        out += markdown_table(head, body, right={1, 2, 3, 4, 5, 6, 7, 8, 9})
        out.append(
            f"(transitions: journal entries that move a run; "
            f"{s4[0].get('server_max_inflight')} requests in flight allowed per connection "
            f"on the S4 server)"
        )
        for res in s4:
            if "journaled_vs_plain" in res:
                out.append(
                    f"S4 {Path(str(res['workflow'])).name} with default journals: "
                    f"{res['journaled']['transitions_per_s']:,.0f} transitions/s, "
                    f"{res['journaled_vs_plain']:.2f}x without journals (same run)"
                )
        out.append("")
    s7, s8 = meta.get("s7"), meta.get("s8")
    if s7 and "transitions_per_s" in s7:
        out.append(
            f"S7 {s7['runs']} concurrent journaled runs of ten_steps.yaml: "
            f"{s7['elapsed_s']:.1f} s, {s7['transitions_per_s']:,.0f} transitions/s, controller "
            f"peak RSS {s7['peak_rss_mb']:.0f} MB, peak open files {s7['peak_open_files']}, "
            + ", ".join(f"{k} {v}" for k, v in s7["outcomes"].items())
        )
    if s8 and "late_p50_ms" in s8:
        out.append(
            f"S8 {s8['runs']} runs awaiting device.state, {s8['rate']:,.0f} notifications/s: "
            f"await timeouts late p50 {s8['late_p50_ms']:.1f} ms, p99 {s8['late_p99_ms']:.1f} ms, "
            f"max {s8['late_max_ms']:.1f} ms; {s8['notifications_dropped']} notifications dropped"
        )
    if (s7 and "transitions_per_s" in s7) or (s8 and "late_p50_ms" in s8):
        out.append("")
    if meta.get("mqtt"):
        from .mqtt_bench import render as render_mqtt

        out += [*render_mqtt(meta["mqtt"]), ""]
    if s5 is not None:
        head = [
            "S5 footprint",
            "start to listening",
            "idle RSS",
            f"RSS with {s5['conns']} idle conns",
            "per idle conn",
        ]
        body = [
            [
                name,
                f"{v['start_s'] * 1000:.0f} ms",
                f"{v['idle_rss_mb']:.1f} MB",
                f"{v['rss_conns_mb']:.1f} MB",
                f"{v['kb_per_conn']:.1f} KB",
            ]
            for name, v in s5["servers"].items()
        ]
        out += markdown_table(head, body, right={1, 2, 3, 4})
        ci = s5["client_import"]
        out.append(
            f"client: `import controller.client` {ci['seconds'] * 1000:.0f} ms in a fresh "
            f"interpreter (interpreter start alone {ci['interpreter_seconds'] * 1000:.0f} "
            f"ms); largest: " + ", ".join(f"{n} {us / 1000:.0f} ms" for us, n in ci["top_us"][:5])
        )
        out.append("")
    if targets:
        out.append("Targets:")
        for t in targets:
            mark = {True: "MET   ", False: "MISSED", None: "N/A   "}[t["met"]]
            out.append(f"  {mark} {t['target']}: {t['detail']}")
    return "\n".join(out)


# --- main ----------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes and 0.3 s per measurement (a smoke run)"
    )
    p.add_argument("--duration", type=float, help="measured seconds per measurement (3)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each (0.5)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--scenarios", default="S1,S2,S3,S4,S5,S6,S7,S8,S9,S10", help="comma-separated subset"
    )
    p.add_argument(
        "--no-pin", action="store_true", help="do not pin the server to CPU 0 and the load to CPU 1"
    )
    p.add_argument("--s1-conns", help="S1 connection counts (1,16,64)")
    p.add_argument("--s2-depth", type=int, help="S2 requests in flight (256)")
    p.add_argument("--s3-conns", type=int, help="S3 connections (64)")
    p.add_argument("--s3-workers", help="S3 statelink worker counts (8,64)")
    p.add_argument("--s4-runs", type=int, help="S4 concurrent workflow runs (1000)")
    p.add_argument("--s5-conns", type=int, help="S5 idle connections (1000)")
    p.add_argument("--s6-conns", type=int, help="S6 connections (64)")
    p.add_argument("--s7-runs", type=int, help="S7 concurrent journaled runs (10000)")
    p.add_argument("--s8-runs", type=int, help="S8 runs in an await (1000)")
    p.add_argument("--s8-rate", type=float, help="S8 notifications per second (1000)")
    p.add_argument(
        "--repeat",
        type=int,
        help="S1/S2 rounds, interleaved; the best round of each cell is shown (2)",
    )
    p.add_argument("--procs", type=int, default=1, help="load processes per measurement (1)")
    a = p.parse_args(argv)
    q = a.quick
    opts = Options(
        duration=a.duration if a.duration is not None else (0.3 if q else 2.5),
        warmup=a.warmup if a.warmup is not None else (0.1 if q else 0.5),
        pin=not a.no_pin,
        s1_conns=_ints(a.s1_conns) if a.s1_conns else ([1, 4] if q else [1, 16, 64]),
        s2_depth=a.s2_depth or (16 if q else 256),
        s3_conns=a.s3_conns or (4 if q else 64),
        s3_workers=_ints(a.s3_workers) if a.s3_workers else ([2] if q else [8, 64]),
        s4_runs=a.s4_runs or (20 if q else 1000),
        s5_conns=a.s5_conns or (20 if q else 1000),
        s6_conns=a.s6_conns or (4 if q else 64),
        s7_runs=a.s7_runs or (50 if q else 10000),
        s8_runs=a.s8_runs or (20 if q else 1000),
        s8_rate=a.s8_rate or (100.0 if q else 1000.0),
        repeat=max(1, a.repeat or (1 if q else 2)),
        procs=max(1, a.procs),
        scenarios={s.strip().upper() for s in a.scenarios.split(",") if s.strip()},
        quick=q,
    )
    return opts, a


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    srv_cpu, load_cpu = cpus(opts)
    meta = {
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, Linux {platform.release()}",
        "pinning": (
            f"server pinned to CPU {srv_cpu}, load to CPU {load_cpu}"
            if srv_cpu is not None
            else "not pinned"
        ),
        "duration": opts.duration,
        "warmup": opts.warmup,
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "scenarios": sorted(opts.scenarios),
        "repeat": opts.repeat,
    }
    log(f"statelink benchmark ({meta['pinning']})")
    rows = run_s1_s2_s3(opts, log) if opts.scenarios & {"S1", "S2", "S3"} else []
    if "S6" in opts.scenarios:
        rows += run_s6(opts, log)
    add_ratios(rows)
    s4 = run_s4(opts, log) if "S4" in opts.scenarios else None
    s5 = run_s5(opts, log) if "S5" in opts.scenarios else None
    s7 = meta["s7"] = run_s7(opts, log) if "S7" in opts.scenarios else None
    s8 = meta["s8"] = run_s8(opts, log) if "S8" in opts.scenarios else None
    mqtt = meta["mqtt"] = run_mqtt(opts, log) if opts.scenarios & {"S9", "S10"} else None
    targets = evaluate(rows, s4, s5, opts, s7, s8) if not opts.quick else []
    if mqtt and not opts.quick:
        from .mqtt_bench import targets as mqtt_targets

        targets += mqtt_targets(mqtt)
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(render(rows, s4, s5, targets, meta))
    print(f"\n(total {meta['elapsed_s']} s)")
    if args.json:
        data = {
            "meta": meta,
            "rows": [
                {
                    "scenario": r.scenario,
                    "server": r.server,
                    "conns": r.conns,
                    "depth": r.depth,
                    "note": r.note,
                    "ratios": {ref.split()[0]: v for ref, v in r.ratios.items()},
                    **r.result,
                }
                for r in rows
            ],
            "s4": s4,
            "s5": s5,
            "s7": s7,
            "s8": s8,
            "mqtt": mqtt,
            "targets": targets,
        }
        Path(args.json).write_text(json.dumps(data, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
