"""The key store's group commit under concurrency (not run by the tests, not part of ``bench.run``).

``python -m bench.keystore_bench [--cycles 20000] [--callers 64] [--dir DIR]`` runs ``--cycles``
keyed begin+finish cycles from ``--callers`` concurrent callers on one asyncio loop, as the
server uses the store: ``begin``, wait for its ``on_durable`` (hopped to the loop with
``call_soon_threadsafe``), ``finish``, wait for its ``on_durable``. Then, for comparison, the
same with one caller (``--baseline-cycles``, 0 to skip): each write is then its own commit.

Prints one JSON line per run: ``records_per_s`` (cycles per second, each one a key begun and
finished durably), ``commits`` and ``writes_per_commit`` (two writes per cycle). The files live in
a temporary directory, made inside ``--dir`` when given (use it to measure a real disk: the store
commits with ``synchronous=FULL``, one fsync per commit) and removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from controller.keystore import KEYS_FILE, KeyStore, Outcome, fingerprint


async def _caller(store: KeyStore, name: str, cycles: int) -> None:
    loop = asyncio.get_running_loop()
    params = fingerprint({"caller": name})

    def durable(future: asyncio.Future[None]) -> Any:
        def on_durable(error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, future, error)

        return on_durable

    for i in range(cycles):
        key = f"{name}-{i}"
        began: asyncio.Future[None] = loop.create_future()
        store.begin(key, "bench.step", params, on_durable=durable(began))
        await began
        finished: asyncio.Future[None] = loop.create_future()
        store.finish(key, Outcome.success({"n": i}), on_durable=durable(finished))
        await finished


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def run(directory: Path, cycles: int, callers: int, fsync: bool = True) -> dict[str, Any]:
    """``cycles`` begin+finish cycles from ``callers`` concurrent callers; the numbers."""
    path = directory / f"{callers}-{KEYS_FILE}"
    per_caller = max(1, cycles // callers)
    with KeyStore(path, max_keys=max(100_000, per_caller * callers), fsync=fsync) as store:

        async def main() -> None:
            await asyncio.gather(*(_caller(store, f"c{c}", per_caller) for c in range(callers)))

        start = time.perf_counter()
        asyncio.run(main())
        elapsed = time.perf_counter() - start
        commits = store.commits
    done = per_caller * callers
    return {
        "bench": "keystore",
        "callers": callers,
        "fsync": fsync,
        "cycles": done,
        "seconds": round(elapsed, 3),
        "records_per_s": round(done / elapsed),
        "commits": commits,
        "writes_per_commit": round(2 * done / max(commits, 1), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.keystore_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--cycles", type=int, default=20_000, help="begin+finish cycles")
    parser.add_argument("--callers", type=int, default=64, help="concurrent callers")
    parser.add_argument(
        "--baseline-cycles", type=int, default=1000, help="cycles of the one-caller run"
    )
    parser.add_argument("--dir", type=Path, help="where to make the temporary directory")
    parser.add_argument(
        "--no-fsync", action="store_true", help="commit without fsync (KeyStore(fsync=False))"
    )
    args = parser.parse_args(argv)
    fsync = not args.no_fsync
    with tempfile.TemporaryDirectory(prefix="keystore-bench-", dir=args.dir) as temp:
        directory = Path(temp)
        print(json.dumps(run(directory, args.cycles, args.callers, fsync)), flush=True)
        if args.baseline_cycles > 0:
            print(json.dumps(run(directory, args.baseline_cycles, 1, fsync)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
