"""The live view of one workflow run: current state, step, elapsed time, the last result and
the progress a running command reports; rich on a terminal, one plain line per event otherwise.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.live import Live
    from rich.table import Table

    from statemachines.workflow import JournalEntry

    from ..runner import RunHandle


def short(value: object, limit: int = 60) -> str:
    """``value`` as JSON, cut to ``limit`` characters."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ProgressView:
    """Shows one run: live (rich) on a terminal, plain lines otherwise. ``on_entry`` is a
    run observer (dispatcher thread), ``on_progress`` an ``rpc.progress`` handler (a client
    reader thread)."""

    def __init__(self, title: str, plain: bool) -> None:
        self.title = title
        self.plain = plain or not sys.stdout.isatty()
        self.started = time.monotonic()
        self.state = "-"
        self.run_id = "-"
        self.step = 0
        self.last = ""
        self.progress: tuple[float, str] | None = None
        self._lock = threading.Lock()
        self._live: Live | None = None

    def __enter__(self) -> ProgressView:
        if not self.plain:
            from rich.live import Live

            self._live = Live(self._render(), refresh_per_second=8, transient=False)
            self._live.__enter__()
        else:
            print(f"workflow {self.title}", flush=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(exc_type, exc, traceback)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def on_entry(self, handle: RunHandle, entry: JournalEntry) -> None:
        with self._lock:
            event = entry.get("event", "")
            if event == "start":
                self.run_id = entry.get("run", self.run_id)
            if "result" in entry:
                self.last = f"{entry.get('command', event)} -> {short(entry['result'])}"
            elif "error" in entry:
                error = entry["error"] or {}
                self.last = (
                    f"{entry.get('command', event)} -> {error.get('kind')}: {error.get('message')}"
                )
            nxt = entry.get("next")
            if nxt:
                self.state = nxt
                self.step += 1
                self.progress = None
            elif event == "finished":
                self.state = f"{entry.get('state', self.state)} ({entry.get('final')})"
            if self.plain:
                self._print(entry)
        if self._live is not None:
            self._live.update(self._render())

    def on_progress(self, params: object) -> None:
        if not isinstance(params, dict):
            return
        with self._lock:
            self.progress = (float(params.get("progress") or 0.0), str(params.get("message", "")))
            if self.plain:
                print(
                    f"[{self.elapsed():6.2f}s]   progress {self.progress[0]:4.0%} "
                    f"{self.progress[1]}",
                    flush=True,
                )
        if self._live is not None:
            self._live.update(self._render())

    def _print(self, entry: JournalEntry) -> None:
        parts: list[Any] = [
            f"[{self.elapsed():6.2f}s]",
            f"{entry.get('state', '-')}:",
            entry.get("event", ""),
        ]
        if entry.get("run"):
            parts.append(f"run {entry['run']}")
        if entry.get("command"):
            parts.append(entry["command"])
        if entry.get("attempt", 1) and entry.get("attempt", 1) > 1:
            parts.append(f"(attempt {entry['attempt']})")
        if "result" in entry:
            parts.append(f"= {short(entry['result'])}")
        if entry.get("error"):
            err = entry["error"]
            parts.append(f"! {err.get('kind')} ({err.get('code')}): {err.get('message')}")
        if entry.get("next"):
            parts.append(f"-> {entry['next']}")
        if entry.get("final"):
            parts.append(f"=> {entry['final']}")
        print(" ".join(str(p) for p in parts), flush=True)

    def _render(self) -> Table:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", justify="right")
        table.add_column()
        table.add_row("workflow", self.title)
        table.add_row("run", self.run_id)
        table.add_row("state", self.state)
        table.add_row("step", str(self.step))
        table.add_row("elapsed", f"{self.elapsed():.1f} s")
        table.add_row("last", self.last or "-")
        if self.progress is not None:
            fraction, message = self.progress
            bar = Table.grid(padding=(0, 1))
            bar.add_row(
                ProgressBar(total=1.0, completed=fraction, width=30), f"{fraction:.0%} {message}"
            )
            table.add_row("progress", bar)
        return table
