"""``statelink run`` and ``statelink demo``: one workflow run with live progress in the terminal.

The live view (rich) shows the current state, step, elapsed time, the last result and the
progress a running command reports; when output is not a terminal, one plain line per event.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .cli import EXIT_ABORTED, EXIT_FAILED, EXIT_OK, UsageError, client_ssl, read_secret
from .errors import RpcError
from .runner import RunHandle, WorkflowRunner, resolve_servers

EXIT_BY_OUTCOME = {"success": EXIT_OK, "failure": EXIT_FAILED, "aborted": EXIT_ABORTED}


def shipped_config_dir() -> Path:
    """The ``config/`` folder that ships with statelink: the checkout's, else the installed copy."""
    candidates = [Path(__file__).resolve().parent.parent / "config"]
    spec = importlib.util.find_spec("statelink_config")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    for candidate in candidates:
        if (candidate / "workflows" / "demo.yaml").is_file():
            return candidate
    raise UsageError("cannot find the shipped config/ folder; reinstall statelink (pip install .)")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ProgressView:
    """Shows one run: live (rich) on a terminal, plain lines otherwise."""

    def __init__(self, title: str, plain: bool) -> None:
        self.title = title
        self.plain = plain or not sys.stdout.isatty()
        self.started = time.monotonic()
        self.state = "-"
        self.step = 0
        self.last = ""
        self.progress: tuple[float, str] | None = None
        self._lock = threading.Lock()
        self._live: Any = None

    def __enter__(self) -> ProgressView:
        if not self.plain:
            from rich.live import Live

            self._live = Live(self._render(), refresh_per_second=8, transient=False)
            self._live.__enter__()
        else:
            print(f"workflow {self.title}", flush=True)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc_info)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def on_entry(self, handle: RunHandle, entry: dict[str, Any]) -> None:
        with self._lock:
            event = entry.get("event", "")
            if "result" in entry:
                self.last = f"{entry.get('command', event)} -> {_short(entry['result'])}"
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

    def on_progress(self, params: Any) -> None:
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

    def _print(self, entry: dict[str, Any]) -> None:
        parts = [f"[{self.elapsed():6.2f}s]", f"{entry.get('state', '-')}:", entry.get("event", "")]
        if entry.get("command"):
            parts.append(entry["command"])
        if entry.get("attempt", 1) and entry.get("attempt", 1) > 1:
            parts.append(f"(attempt {entry['attempt']})")
        if "result" in entry:
            parts.append(f"= {_short(entry['result'])}")
        if entry.get("error"):
            err = entry["error"]
            parts.append(f"! {err.get('kind')} ({err.get('code')}): {err.get('message')}")
        if entry.get("next"):
            parts.append(f"-> {entry['next']}")
        if entry.get("final"):
            parts.append(f"=> {entry['final']}")
        print(" ".join(str(p) for p in parts), flush=True)

    def _render(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", justify="right")
        table.add_column()
        table.add_row("workflow", self.title)
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


def _server_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        name, sep, address = item.partition("=")
        if not sep or not name or not address:
            raise UsageError(f"--server takes NAME=HOST:PORT, got {item!r}")
        overrides[name] = address
    return overrides


def _input_values(items: list[str]) -> dict[str, Any]:
    import yaml

    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--set takes NAME=VALUE, got {item!r}")
        try:
            values[name] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise UsageError(f"--set {name}: {text!r} is not a value: {exc}")
    return values


def execute(
    spec: Any,
    servers: dict[str, Any],
    *,
    journal: str | None,
    plain: bool,
    secret: bytes | None = None,
    ssl: Any = None,
    inputs: dict[str, Any] | None = None,
) -> int:
    """Run one workflow to its end with a progress view; the exit code of its outcome."""
    try:  # usage errors before the progress view starts
        resolve_servers(spec, servers)
        spec.run_context(inputs)
    except ValueError as exc:
        raise UsageError(str(exc))
    with (
        WorkflowRunner(secret=secret, ssl=ssl, client_name="statelink-run") as runner,
        ProgressView(spec.name, plain) as view,
    ):
        try:
            handle = runner.start(
                spec, servers=servers, journal=journal, observer=view.on_entry, context=inputs
            )
        except ValueError as exc:
            raise UsageError(str(exc))
        for address in set(handle.servers.values()):
            try:
                runner.client(address).subscribe("rpc.progress", view.on_progress)
            except (OSError, RpcError):
                pass  # the run itself meets the error (connection_lost, unauthorized) and routes it
        aborts = 0

        def on_sigint(_signum: int, _frame: Any) -> None:
            nonlocal aborts
            aborts += 1
            if aborts == 1:
                print(
                    "\naborting: running the workflow's on_abort state "
                    f"{spec.on_abort!r} (Ctrl-C again to stop at once)"
                    if spec.on_abort
                    else "\naborting (the workflow has no on_abort state)",
                    file=sys.stderr,
                    flush=True,
                )
            handle.abort()

        previous = (
            signal.signal(signal.SIGINT, on_sigint)
            if threading.current_thread() is threading.main_thread()
            else None
        )
        try:
            while handle.wait(0.2) is None:
                pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    outcome = handle.outcome or "failure"
    reason = getattr(handle.run, "reason", None)
    print(
        f"workflow {spec.name}: {outcome}"
        + (f" ({reason})" if reason and reason != outcome else "")
        + f" in {view.elapsed():.1f} s, final state {handle.state}",
        flush=True,
    )
    return EXIT_BY_OUTCOME.get(outcome, EXIT_FAILED)


def run_workflow_command(args: argparse.Namespace) -> int:
    from statemachines.workflow import load_workflow

    spec = load_workflow(args.workflow)
    return execute(
        spec,
        _server_overrides(args.server),
        journal=args.journal,
        plain=args.plain,
        secret=read_secret(args),
        ssl=client_ssl(args),
        inputs=_input_values(args.set),
    )


def run_demo_command(args: argparse.Namespace) -> int:
    """Start the simulated demo device in-process on a free port and run the demo workflow."""
    from statemachines.device import load_device
    from statemachines.workflow import load_workflow

    from .server import CommandServer

    config = shipped_config_dir()
    device = load_device(config / "devices" / "demo.yaml")
    spec = load_workflow(config / "workflows" / "demo.yaml")
    logging.getLogger("statelink.server").setLevel(logging.WARNING)  # the view tells the story
    server = CommandServer("127.0.0.1", 0, name="statelink-demo")
    server.add_device(device, simulate=True)
    with server:
        host, port = server.address
        print(
            f"demo device '{device.name}' (simulated GPIO) listening on {host}:{port}", flush=True
        )
        servers = {name: (host, port) for name in spec.servers}
        return execute(spec, servers, journal=args.journal, plain=args.plain)


__all__ = ["execute", "run_demo_command", "run_workflow_command", "shipped_config_dir"]
