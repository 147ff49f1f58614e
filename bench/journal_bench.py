"""How to make 1,000 run journals durable per step (not run by the tests, nor by ``bench.run``).

``python -m bench.journal_bench [--runs 1000] [--steps 10] [--dir DIR]``

1. ``raw``: the fsync options on their own, one batch = one line appended to each of ``--runs``
   journals (open ``O_APPEND``, write, close), then: ``none`` (no fsync), ``wal`` (the batch's
   lines also appended to one shared file, fdatasynced once), ``syncfs`` (one ``syncfs(2)`` of
   the whole filesystem: includes every other process's dirty data), ``parallel-K`` (each
   journal fdatasynced, from K threads at once: the filesystem merges them into few journal
   commits), ``serial`` (each journal fdatasynced in turn).
2. ``writer``: :class:`controller.journal.JournalWriter` end to end for each ``sync`` mode:
   ``--runs`` runs at once, each ``--steps`` times appending a durable ``send`` entry and, once
   it is on disk (its ``on_durable``), a ``reply`` entry and the next ``send``.

Prints one JSON line per measurement: ms per batch, entries/s, CPU us per entry (user+sys of
this process: fsync's kernel time counts), and for the writer its counters. The files live in a
temporary directory inside ``--dir`` (default: the system's temp dir; give a real disk).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from controller.journal import JournalFile, JournalWriter

_ENTRY = {
    "time": "2026-01-01T00:00:00.000Z",
    "state": "step3",
    "event": "send",
    "key": "ten_steps-20260101T000000Z-3f9a:step3:1",
    "server": "device",
    "command": "bench.step",
    "params": {"n": 3},
    "attempt": 1,
}
_LINE = (json.dumps(_ENTRY) + "\n").encode()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _append(path: Path, sync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, _LINE)
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def raw(directory: Path, runs: int, steps: int) -> list[dict[str, Any]]:
    """Each option, ``steps`` batches of one line to each of ``runs`` journals."""
    paths = [directory / f"raw-{i}.jsonl" for i in range(runs)]
    for path in paths:
        path.touch()
    wal = os.open(directory / "raw.wal", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    dir_fd = os.open(directory, os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    pools: dict[int, ThreadPoolExecutor] = {}

    def plain() -> None:
        for path in paths:
            _append(path)

    def with_wal() -> None:
        plain()
        os.write(wal, _LINE * runs)
        os.fdatasync(wal)

    def with_syncfs() -> None:
        plain()
        libc.syncfs(dir_fd)

    def parallel(threads: int) -> Callable[[], None]:
        pool = pools.setdefault(threads, ThreadPoolExecutor(threads))

        def batch() -> None:
            plain()
            list(pool.map(lambda path: _append(path, sync=True), paths))

        return batch

    def serial() -> None:
        for path in paths:
            _append(path, sync=True)

    options: list[tuple[str, Callable[[], None]]] = [
        ("none", plain),
        ("wal", with_wal),
        ("syncfs", with_syncfs),
        ("parallel-4", parallel(4)),
        ("parallel-16", parallel(16)),
        ("parallel-64", parallel(64)),
        ("serial", serial),
    ]
    results = []
    try:
        for name, batch in options:
            began, cpu = time.perf_counter(), _cpu()
            for _ in range(steps):
                batch()
            elapsed, cpu = time.perf_counter() - began, _cpu() - cpu
            results.append(
                {
                    "bench": "raw",
                    "option": name,
                    "journals": runs,
                    "batches": steps,
                    "ms_per_batch": round(elapsed / steps * 1000, 2),
                    "entries_per_s": round(runs * steps / elapsed),
                    "cpu_us_per_entry": round(cpu / (runs * steps) * 1e6, 1),
                }
            )
    finally:
        os.close(wal)
        os.close(dir_fd)
        for pool in pools.values():
            pool.shutdown()
    return results


def writer(directory: Path, runs: int, steps: int, sync: str) -> dict[str, Any]:
    """``runs`` simulated runs of ``steps`` steps each through one JournalWriter."""
    done = threading.Event()
    remaining = [runs]
    lock = threading.Lock()
    reply = {**_ENTRY, "event": "reply", "result": {"n": 3}, "next": "step4"}
    runs_dir = directory / f"writer-{sync}"
    with JournalWriter(runs_dir, sync=sync) as journals:

        def step(journal: JournalFile, left: int) -> None:
            def durable(error: OSError | None) -> None:
                assert error is None, error
                journals.append(journal, reply)  # on the writer thread: never blocks
                if left > 1:
                    step(journal, left - 1)
                else:
                    with lock:
                        remaining[0] -= 1
                        if not remaining[0]:
                            done.set()

            journals.append(journal, _ENTRY, durable=True, on_durable=durable)

        files = [journals.create(runs_dir / f"run-{i}.jsonl") for i in range(runs)]
        began, cpu = time.perf_counter(), _cpu()
        for journal in files:
            step(journal, steps)
        if not done.wait(600):
            raise RuntimeError("the runs did not finish within 600 s")
        journals.flush()
        elapsed, cpu = time.perf_counter() - began, _cpu() - cpu
        entries = runs * steps * 2
        return {
            "bench": "writer",
            "sync": sync,
            "runs": runs,
            "steps": steps,
            "seconds": round(elapsed, 3),
            "entries_per_s": round(entries / elapsed),
            "durable_per_s": round(runs * steps / elapsed),
            "cpu_us_per_entry": round(cpu / entries * 1e6, 1),
            "batches": journals.batches,
            "entries_per_batch": round(journals.entries / max(1, journals.batches), 1),
            "fsyncs": journals.fsyncs,
            "checkpoints": journals.checkpoints,
            "open_fds": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--skip-raw", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="journal-bench-", dir=args.dir) as tmp:
        directory = Path(tmp)
        results = [] if args.skip_raw else raw(directory, args.runs, args.steps)
        for result in results:
            print(json.dumps(result), flush=True)
        for sync in ("none", "wal", "files"):
            print(json.dumps(writer(directory, args.runs, args.steps, sync)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
