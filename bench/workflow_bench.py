"""S4: the workflow engine under load, and its cost per transition against bare ``transitions``.

``python -m bench.workflow_bench --port P [--runs 1000] [--workflow FILE]`` (run by
``bench.run``, which starts the statelink server with the demo device, simulated) prints one
JSON line:

* **end to end**: ``--runs`` concurrent runs of a 10-step workflow through one
  :class:`controller.runner.WorkflowRunner` against one statelink server; *transitions* are the
  journal entries that move a run (``next`` set: the start and each step), per second from the
  first ``start()`` to the last run finished;
* **engine cost**: the same runs driven in-process with effects that answer at once (no I/O, no
  threads), time per transition, against a bare ``transitions.Machine(queued=True)`` with the
  same number of models and transitions, measured in the same process.

The workflow is ``config/workflows/ten_steps.yaml`` when present (it calls the demo device),
else :data:`TEN_STEPS` below (ten ``bench.step`` calls, which every benchmark server has).
``--workflow builtin`` picks :data:`TEN_STEPS` explicitly.

``--journals off|on|both``: the end-to-end runs without journals (``journal=False``), with the
default journals (``WorkflowRunner(state_dir=<temp dir>)``: fsynced, group commit), or both in
the same process against the same server (S4: the ratio). ``both`` measures ``--rounds``
rounds of each, interleaved and in alternating order (off, on, on, off, off, on, ...), each
with a new runner and its own warm-up run, and reports the best round of each (as S1/S2 do:
other load on the machine only ever slows a round down) and their ratio; every round is in
``rounds``. ``--no-engine`` skips the in-process measurement (S7: 10,000 journaled runs;
also the controller's peak RSS and open files).

The temporary state directories: one per runner, inside one directory per process that is
removed when the process ends (:func:`state_root`), not after each measurement, and spread
over the filesystem (ext4's "top directory" flag, where it can be set). Why: on ext4 without a
journal (this benchmark machine's root filesystem), creating a file skips, one by one, the
inodes of its block group freed in the last minute (six, if not written back yet): after a
measurement removed 1,000 journals, each of the next 1,000 creates cost 0.3-0.6 ms of kernel
CPU instead of ~15 us, 0.3-0.6 s on the runner's core, so the journaled measurement that came
next (the other workflow's, or the next round) paid for the cleanup of the one before.
``start_cpu_s``, the CPU time of the ``start()`` loop (it creates the journals), shows what
creating cost.

S8 (:func:`await_timeouts`): ``--await-runs N`` runs, started over ``--spread`` seconds, each in
one await of ``device.state`` whose ``if`` never holds, while the server (``serve_notifications``:
``--serve-notifications RATE``) publishes ``device.state`` at RATE per second: how late the
await timeouts fire (each against its due time: the await entered + its timeout).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import fcntl
import functools
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPO_WORKFLOW = ROOT / "config" / "workflows" / "ten_steps.yaml"

#: ten quick commands in a row (only ``bench.step``, registered on the benchmark server)
TEN_STEPS = (
    'name: bench_ten_steps\nservers:\n  device: "127.0.0.1:15769"\n'
    "command_timeout: 5s\ninitial: step1\nstates:\n"
    + "".join(
        f"  step{i}: {{command: bench.step, params: {{n: {i}}}, "
        f"next: {f'step{i + 1}' if i < 10 else 'done'}}}\n"
        for i in range(1, 11)
    )
    + "  done: {final: success}\n"
)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _proc_cpu(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _moves(history: Any) -> int:
    """Journal entries that moved the run to another state."""
    return sum(1 for entry in history if entry.get("next"))


def load_spec(workflow: str | None) -> tuple[Any, str]:
    from statemachines.workflow import load_workflow, parse_workflow

    if workflow == "builtin" or (workflow is None and not REPO_WORKFLOW.exists()):
        return parse_workflow(TEN_STEPS, "bench/workflow_bench.py:TEN_STEPS"), "builtin TEN_STEPS"
    path = Path(workflow) if workflow else REPO_WORKFLOW
    return load_workflow(path), str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


# --- engine cost, in-process ---------------------------------------------------------------------


class InlineEffects:
    """Effects that answer every command at once (queued, answered in FIFO order like the
    runner's dispatcher does), start no timers and record nothing."""

    def __init__(self) -> None:
        self.queue: deque[tuple[Any, int]] = deque()
        self.done_runs = 0

    def send_command(
        self, run: Any, token: int, server: str, method: str, params: Any, timeout: float
    ) -> None:
        self.queue.append((run, token))

    def start_timer(self, run: Any, token: int, delay: float) -> None:
        raise RuntimeError("the benchmark workflow starts no timers")

    def abandon(self, run: Any, token: int) -> None:
        pass

    def record(self, run: Any, entry: Any) -> None:
        pass

    def finished(self, run: Any) -> None:
        self.done_runs += 1


def engine_cost(spec: Any, runs: int) -> dict[str, Any]:
    """Microseconds per transition of the engine with instant replies (best of 3)."""
    from statemachines.workflow import CompiledWorkflow

    compiled = CompiledWorkflow(spec)
    reply = {"ok": True}
    best: dict[str, Any] | None = None
    for _ in range(3):
        effects = InlineEffects()
        gc.collect()
        t0 = time.perf_counter()
        all_runs = [compiled.new_run(effects, f"r{i}") for i in range(runs)]
        t1 = time.perf_counter()
        for run in all_runs:
            run.start()
        queue = effects.queue
        while queue:
            run, token = queue.popleft()
            run.on_reply(token, reply)
        t2 = time.perf_counter()
        moves = sum(_moves(run.history) for run in all_runs)
        outcomes = {
            o: sum(1 for r in all_runs if r.outcome == o) for o in {r.outcome for r in all_runs}
        }
        sample: dict[str, Any] = {
            "engine_us": (t2 - t1) / moves * 1e6,
            "new_run_us": (t1 - t0) / runs * 1e6,
            "engine_transitions": moves,
            "engine_outcomes": outcomes,
        }
        if best is None or sample["engine_us"] < best["engine_us"]:
            best = sample
    assert best is not None
    return best


def bare_cost(models: int, steps: int) -> dict[str, Any]:
    """Microseconds per transition of a bare ``transitions.Machine(queued=True)``: ``models``
    models on one machine, each moved through ``steps`` states in turn (best of 3)."""
    from transitions import Machine

    states = [f"s{i}" for i in range(steps + 1)]
    edges = [{"trigger": "next", "source": states[i], "dest": states[i + 1]} for i in range(steps)]
    best = None
    for _ in range(3):
        machine = Machine(
            model=None,
            states=states,
            transitions=edges,
            initial="s0",
            queued=True,
            auto_transitions=False,
        )
        objs: list[Any] = [type("Model", (), {})() for _ in range(models)]
        for obj in objs:
            machine.add_model(obj)
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(steps):
            for obj in objs:
                obj.next()
        t1 = time.perf_counter()
        assert all(obj.state == states[-1] for obj in objs)
        us = (t1 - t0) / (models * steps) * 1e6
        best = us if best is None else min(best, us)
    return {"bare_us": best}


# --- end to end ----------------------------------------------------------------------------------


def _rss_mb() -> tuple[float, float]:
    """This process's resident memory now and its peak (VmRSS, VmHWM), in MB."""
    values = {"VmRSS:": 0.0, "VmHWM:": 0.0}
    with open("/proc/self/status") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] in values:
                values[fields[0]] = int(fields[1]) / 1024
    return values["VmRSS:"], values["VmHWM:"]


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


class PeakSampler:
    """Samples open files and RSS every ``every`` seconds on a thread; keeps the peaks."""

    def __init__(self, every: float = 0.05) -> None:
        self.fds = _open_files()
        self.rss = _rss_mb()[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every,), daemon=True)
        self._thread.start()

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            self.sample()

    def sample(self) -> None:
        self.fds = max(self.fds, _open_files())
        self.rss = max(self.rss, _rss_mb()[0])

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self.sample()
        return {"peak_open_files": self.fds, "peak_rss_mb": self.rss, "hwm_rss_mb": _rss_mb()[1]}


_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def _spread_subdirs(path: str) -> None:
    """Best effort: set ext4's "top directory" flag on ``path`` (``chattr +T``), so that the
    filesystem spreads its subdirectories (and their files) over its block groups, as it does
    for home directories, instead of packing them next to ``path``."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            flags = array.array("i", [0])
            fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
            flags[0] |= _FS_TOPDIR_FL
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
        finally:
            os.close(fd)


@contextmanager
def state_root() -> Iterator[str]:
    """A temporary directory for the state directories of this process's runners (see the
    module docstring), removed at the end."""
    root = tempfile.mkdtemp(prefix="statelink-bench-")
    try:
        _spread_subdirs(root)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def make_runner(journals: bool, root: str | None = None) -> Iterator[Any]:
    """A runner with the default journals in a new temporary state directory inside ``root``
    (kept until ``root`` goes), or without journals."""
    from controller.runner import WorkflowRunner

    with contextlib.ExitStack() as stack:
        if root is None:
            root = stack.enter_context(state_root())
        state_dir = tempfile.mkdtemp(prefix="state-", dir=root)
        runner = stack.enter_context(
            WorkflowRunner(client_name="statelink-bench", state_dir=state_dir)
        )
        yield runner, (None if journals else False)


def end_to_end(
    spec: Any,
    port: int,
    runs: int,
    server_pid: int | None,
    timeout: float,
    journals: bool = False,
    root: str | None = None,
) -> dict[str, Any]:
    servers = {name: f"127.0.0.1:{port}" for name in spec.servers}
    finished_at: dict[str, float] = {}
    lock = threading.Lock()

    def observer(handle: Any, entry: dict[str, Any]) -> None:
        if entry.get("event") == "finished":
            with lock:
                finished_at[handle.run_id] = time.perf_counter()

    with make_runner(journals, root) as (runner, journal):
        compiled = runner.compile(spec)
        # connect (and subscribe) before the clock starts
        warm = runner.start(
            compiled, servers=servers, run_id="warm-up", observer=observer, journal=journal
        )
        warm.wait(timeout)
        gc.collect()
        started_at: dict[str, float] = {}
        peaks = PeakSampler()
        cpu0, srv0 = _cpu(), _proc_cpu(server_pid)
        batches0, fsyncs0 = runner.journals.batches, runner.journals.fsyncs
        start_cpu = time.thread_time()
        t0 = time.perf_counter()
        handles = []
        for i in range(runs):
            run_id = f"run-{i}"
            started_at[run_id] = time.perf_counter()
            handles.append(
                runner.start(
                    compiled, servers=servers, run_id=run_id, observer=observer, journal=journal
                )
            )
        start_s, start_cpu = time.perf_counter() - t0, time.thread_time() - start_cpu
        deadline = t0 + timeout
        for handle in handles:
            handle.wait(max(0.0, deadline - time.perf_counter()))
        t1 = max(finished_at.values(), default=time.perf_counter())
        cpu1, srv1 = _cpu(), _proc_cpu(server_pid)
        batches, fsyncs = runner.journals.batches - batches0, runner.journals.fsyncs - fsyncs0
        footprint = peaks.stop()
        done = [h for h in handles if h.done]
        outcomes: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for h in handles:
            key = str(h.outcome) if h.done else "unfinished"
            outcomes[key] = outcomes.get(key, 0) + 1
            if h.done and h.outcome != "success" and h.run.reason:
                reasons[h.run.reason[:160]] = reasons.get(h.run.reason[:160], 0) + 1
        moves = sum(_moves(h.history) for h in done)
        lat = sorted(
            finished_at[h.run_id] - started_at[h.run_id] for h in done if h.run_id in finished_at
        )
        elapsed = max(1e-9, t1 - t0)

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, round(q * (len(lat) - 1)))] * 1000 if lat else float("nan")

        return {
            "runs": runs,
            "journals": journals,
            **footprint,
            "transitions": moves,
            "elapsed_s": elapsed,
            "start_s": start_s,
            "start_cpu_s": start_cpu,
            "journal_batches": batches,
            "journal_fsyncs": fsyncs,
            "transitions_per_s": moves / elapsed,
            "run_p50_ms": pct(0.5),
            "run_p99_ms": pct(0.99),
            "outcomes": outcomes,
            "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:3]),
            "runner_cpu_us": (cpu1 - cpu0) / max(1, moves) * 1e6,
            "server_cpu_us": None
            if srv0 is None or srv1 is None
            else (srv1 - srv0) / max(1, moves) * 1e6,
        }


# --- S8: await timeouts under a stream of notifications -------------------------------------------

#: one await of device.state whose condition never holds: every run ends by its timeout
AWAIT_NEVER = (
    'name: bench_await\nservers:\n  device: "127.0.0.1:15769"\ninitial: listen\nstates:\n'
    "  listen: {await: device.state, if: 'params.state == \"never\"', timeout: %s, "
    "next: done, on_error: {timeout: done}}\n"
    "  done: {final: success}\n"
)


def serve_notifications(rate: float) -> int:
    """A statelink server publishing ``device.state`` ``rate`` times per second (in 10 ms
    ticks, catching up on drift); prints ``READY port`` and serves until stdin closes."""
    from controller import CommandServer

    with CommandServer(port=0, grace=0.2, name="bench-notify") as server:
        sent = 0
        t0 = time.monotonic()

        def tick() -> None:
            nonlocal sent
            due = int((time.monotonic() - t0) * rate)
            for n in range(sent, due):
                server.publish("device.state", {"device": "bench", "state": "busy", "n": n})
            sent = max(sent, due)
            loop.call_later(0.01, tick)

        loop: asyncio.AbstractEventLoop = server.loop
        server.call_soon(tick)
        print(f"READY {server.address[1]}", flush=True)
        sys.stdin.read()
    return 0


def await_timeouts(
    port: int, runs: int, await_timeout: float, spread: float, journals: bool
) -> dict[str, Any]:
    """``runs`` runs each in one await (timeout ``await_timeout``), started evenly over
    ``spread`` seconds: lateness of their await timeouts against the due times."""
    from statemachines.workflow import parse_workflow

    spec = parse_workflow(AWAIT_NEVER % f"{await_timeout}s", "bench/workflow_bench.py:AWAIT")
    entered: dict[str, float] = {}
    late: list[float] = []
    lock = threading.Lock()

    def observer(handle: Any, entry: dict[str, Any]) -> None:
        now_ = time.perf_counter()
        event = entry.get("event")
        if event == "start":
            entered[handle.run_id] = now_  # the await's timer starts right after this entry
        elif event == "await_timeout":
            with lock:
                late.append(now_ - entered[handle.run_id] - await_timeout)

    servers = {"device": f"127.0.0.1:{port}"}
    with make_runner(journals) as (runner, journal):
        compiled = runner.compile(spec)
        t0 = time.perf_counter()
        handles = []
        for i in range(runs):
            pause = t0 + spread * i / max(1, runs) - time.perf_counter()
            if pause > 0:
                time.sleep(pause)  # pacing the starts, not synchronising
            handles.append(
                runner.start(
                    compiled,
                    servers=servers,
                    run_id=f"await-{i}",
                    observer=observer,
                    journal=journal,
                )
            )
        deadline = time.perf_counter() + await_timeout + 60
        for handle in handles:
            handle.wait(max(0.0, deadline - time.perf_counter()))
        elapsed = time.perf_counter() - t0
        dropped = runner.notifications_dropped
    lat = sorted(late)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, round(q * (len(lat) - 1)))] * 1000 if lat else float("nan")

    return {
        "runs": runs,
        "await_timeout_s": await_timeout,
        "spread_s": spread,
        "journals": journals,
        "timeouts": len(lat),
        "late_p50_ms": pct(0.5),
        "late_p99_ms": pct(0.99),
        "late_max_ms": lat[-1] * 1000 if lat else float("nan"),
        "notifications_dropped": dropped,
        "elapsed_s": elapsed,
        "ok": len(lat) == runs and all(h.outcome == "success" for h in handles),
    }


def both_ways(e2e: Any, rounds: int) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """``rounds`` rounds without and with journals, interleaved in alternating order (off on,
    on off, off on, ...): the best round of each (by transitions/s), and every round."""
    done: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    summary = []
    for i in range(rounds):
        for journals in (False, True) if i % 2 == 0 else (True, False):
            one = e2e(journals=journals)
            done[journals].append(one)
            summary.append(
                {
                    k: one[k]
                    for k in (
                        "journals",
                        "transitions_per_s",
                        "elapsed_s",
                        "start_s",
                        "start_cpu_s",
                        "runner_cpu_us",
                        "journal_batches",
                        "outcomes",
                        "failure_reasons",
                    )
                }
            )

    def best(results: list[dict[str, Any]]) -> dict[str, Any]:
        return max(results, key=lambda r: float(r["transitions_per_s"]))

    return best(done[False]), best(done[True]), summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.workflow_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, help="the statelink server on 127.0.0.1")
    p.add_argument(
        "--serve-notifications",
        type=float,
        metavar="RATE",
        help="be the S8 server: publish device.state RATE times per second (no --port)",
    )
    p.add_argument("--journals", choices=("off", "on", "both"), default="off")
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="--journals both: interleaved rounds of each (the best is reported; default 5)",
    )
    p.add_argument("--no-engine", action="store_true", help="skip the in-process measurement")
    p.add_argument("--await-runs", type=int, help="S8: runs in one await each (no engine part)")
    p.add_argument("--await-timeout", type=float, default=3.0, help="S8: the await's timeout")
    p.add_argument("--spread", type=float, default=1.0, help="S8: seconds over which runs start")
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument(
        "--bare-runs",
        type=int,
        default=None,
        help="runs of the in-process engine/bare measurement (default --runs)",
    )
    p.add_argument(
        "--workflow",
        default=None,
        help="a workflow file, or 'builtin' (default: config/workflows/ten_steps.yaml)",
    )
    p.add_argument("--server-pid", type=int, default=None)
    p.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    p.add_argument("--timeout", type=float, default=120.0, help="bound on the end-to-end part")
    args = p.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.serve_notifications is not None:
        return serve_notifications(args.serve_notifications)
    if args.port is None:
        p.error("--port is required")
    if args.await_runs is not None:
        out = await_timeouts(
            args.port, args.await_runs, args.await_timeout, args.spread, args.journals != "off"
        )
        print(json.dumps(out, default=str))
        return 0
    result: dict[str, Any] = {"ok": False}
    try:
        spec, source = load_spec(args.workflow)
        steps = sum(1 for st in spec.states.values() if st.kind != "final")
        result.update(workflow=source, steps=steps)
        # the bare reference works without the workflow engine: measure it first
        bare_runs = args.bare_runs or args.runs
        if not args.no_engine:
            result.update(bare_cost(bare_runs, steps + 1))
            result.update(engine_cost(spec, bare_runs))
            result["engine_vs_bare"] = result["engine_us"] / result["bare_us"]
        with state_root() as root:
            e2e = functools.partial(
                end_to_end, spec, args.port, args.runs, args.server_pid, args.timeout, root=root
            )
            if args.journals == "both":  # the same server, the same process, interleaved
                plain, journaled, rounds = both_ways(e2e, max(1, args.rounds))
                result.update(plain)
                result["journaled"] = journaled
                result["journaled_vs_plain"] = (
                    journaled["transitions_per_s"] / plain["transitions_per_s"]
                )
                result["rounds"] = rounds
                for one in rounds:
                    if one["outcomes"].get("success", 0) != args.runs:
                        tag = "journaled: " if one["journals"] else ""
                        result["outcomes"] = {tag + k: v for k, v in one["outcomes"].items()}
                        result["failure_reasons"] = one["failure_reasons"]
                        break
            else:
                result.update(e2e(journals=args.journals == "on"))
        result["ok"] = result["outcomes"].get("success", 0) == args.runs
        if not result["ok"]:
            result["missing"] = (
                f"not every run succeeded: {result['outcomes']} {result['failure_reasons']}"
            )
    except ImportError as exc:
        result["missing"] = f"the workflow engine is not importable: {exc}"
    except Exception as exc:  # report, do not hide: the harness prints what is missing
        result["missing"] = f"{type(exc).__name__}: {exc}"
    if "bare_us" not in result and not args.no_engine:
        try:
            result.update(bare_cost(args.bare_runs or args.runs, 11))
        except Exception as exc:
            result["bare_error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
