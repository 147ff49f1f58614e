"""The live view of one workflow run: current state, step, elapsed time, the last result and
the progress a running command reports; rich on a terminal, one plain line per event otherwise.

While the live view is up, log lines go through it (above the display), never straight to the
terminal: a line written past rich would shift the screen and leave old frames behind. The
runner's own "cannot connect" warning is dropped: the view says it, with a hint.
"""

from __future__ import annotations

import json
import logging
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

#: said when a server of the run cannot be reached (connection refused, no route, ...)
UNREACHABLE_HINT = "cannot reach {address} (is `statelink serve` running?)"
#: said instead for a fleet node (mqtt://BROKER/NODE): what is wrong with its broker, by a
#: word of the error's message (controller/mqtt/connection.py); the last one otherwise
BROKER_HINTS = (
    (
        "--mqtt-user",
        "the MQTT broker {broker} refused the login: check --mqtt-user and the password "
        "(--mqtt-password-file or $STATELINK_MQTT_PASSWORD)",
    ),
    ("--tls-ca", "the MQTT broker {broker} is not trusted: give its CA with --tls-ca FILE"),
    ("", "cannot reach the MQTT broker {broker} (is it running? is the address right?)"),
)


def unreachable_hint(handle: RunHandle, entry: JournalEntry) -> str | None:
    """The hint for an ``error`` entry that says a server could not be reached, else None."""
    from statemachines import errorkinds as ek
    from statemachines.addresses import NodeAddress, format_address

    error = entry.get("error")
    if not error or error.get("kind") != ek.kind_of(ek.CONNECTION_LOST):
        return None
    if not str(error.get("message", "")).startswith("cannot reach"):
        return None  # a connection that dropped mid-command: the error says so itself
    address = handle.servers.get(str(entry.get("server")))
    if isinstance(address, NodeAddress):  # the broker let us down, not the node
        message = str(error.get("message"))
        hint = next(text for word, text in BROKER_HINTS if word in message)
        return hint.format(broker=address.broker)
    return UNREACHABLE_HINT.format(address=format_address(address)) if address else None


class _DropRunnerConnectWarning(logging.Filter):
    """Drops the runner's "cannot connect to HOST:PORT yet" warning: the view reports it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ..runner import CONNECT_LATER  # the runner is loaded: it is what logs this

        return record.msg != CONNECT_LATER


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
        self.hint = ""
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._filter = _DropRunnerConnectWarning()
        self._log_streams: list[tuple[logging.StreamHandler[Any], Any]] = []

    def __enter__(self) -> ProgressView:
        logging.getLogger("statelink.runner").addFilter(self._filter)
        if not self.plain:
            from rich.live import Live

            terminal = sys.stderr
            self._live = Live(self._render(), refresh_per_second=8, transient=False)
            self._live.__enter__()
            self._log_through(sys.stderr, terminal)  # sys.stderr: now rich's proxy
        else:
            print(f"workflow {self.title}", flush=True)
        return self

    def _log_through(self, proxy: Any, terminal: Any) -> None:
        """Point the log handlers that write to ``terminal`` at ``proxy`` until exit."""
        if proxy is terminal:
            return
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is terminal:
                self._log_streams.append((handler, handler.setStream(proxy)))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self._live is not None:
                self._live.update(self._render())
                self._live.__exit__(exc_type, exc, traceback)
        finally:
            for handler, stream in self._log_streams:  # after the live view stopped
                handler.setStream(stream)
            self._log_streams.clear()
            logging.getLogger("statelink.runner").removeFilter(self._filter)

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
            hint = unreachable_hint(handle, entry) if event == "error" else None
            if hint:
                self.hint = hint
            if self.plain:
                self._print(entry)
                if hint:
                    print(f"  {hint}", flush=True)
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
        if self.hint:
            table.add_row("hint", self.hint)
        if self.progress is not None:
            fraction, message = self.progress
            bar = Table.grid(padding=(0, 1))
            bar.add_row(
                ProgressBar(total=1.0, completed=fraction, width=30), f"{fraction:.0%} {message}"
            )
            table.add_row("progress", bar)
        return table
