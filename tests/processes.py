"""Real ``statelink serve`` processes for tests: started on a free loopback port, address read
from the server's own log line, stopped (or killed) by the test."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WAIT = 20.0


class ServeProcess:
    """``statelink serve --port PORT ...`` in the background (PORT 0: a free one)."""

    def __init__(self, *args: str, port: int = 0):
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller", "serve", "--port", str(port), *args],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.address = self._wait_for_address()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put("")

    def _wait_for_address(self) -> tuple[str, int]:
        while True:
            line = self.lines.get(timeout=WAIT)
            if not line:
                raise AssertionError(f"statelink serve exited with {self.proc.wait(5)}")
            match = re.search(r"serving on ([\d.]+):(\d+)", line)
            if match:
                return match.group(1), int(match.group(2))

    @property
    def server(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def stop(self) -> int:
        """SIGTERM, then wait: the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT)

    def kill(self) -> None:
        """SIGKILL: no graceful anything."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)


def statelink(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python -m controller ARGS...`` to completion (text output captured)."""
    return subprocess.run([sys.executable, "-m", "controller", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, **kwargs)
