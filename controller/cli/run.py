"""``statelink run`` and ``statelink demo``: one workflow run to its end, with live progress;
the exit code says its outcome. Every run is journaled (``STATE_DIR/runs/RUN_ID.jsonl``, or
``--journal FILE``), so ``statelink resume`` can continue it after a crash."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import ssl as ssl_module
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statemachines.addresses import ServerAddress

from .common import (
    EXIT_ABORTED,
    EXIT_FAILED,
    EXIT_OK,
    Interrupted,
    UsageError,
    abort_signals,
    add_client_tls_args,
    add_mqtt_args,
    add_plain_arg,
    add_secret_args,
    add_state_dir_arg,
    client_ssl,
    examples,
    mqtt_options,
    read_secret,
    say,
    server_options,
    signal_exit_code,
    signal_name,
    state_dir_option,
)
from .progress import ProgressView

if TYPE_CHECKING:
    from statemachines.workflow import WorkflowSpec

    from ..mqtt.options import MqttOptions
    from ..runner import RunHandle, WorkflowRunner
    from .common import Subparsers

EXIT_BY_OUTCOME = {"success": EXIT_OK, "failure": EXIT_FAILED, "aborted": EXIT_ABORTED}


def register(sub: Subparsers) -> None:
    run = sub.add_parser(
        "run",
        help="run a workflow with live progress",
        **examples(
            "statelink run config/workflows/demo.yaml",
            "statelink run config/workflows/demo.yaml --server device=192.168.1.20:15769 --plain",
            "statelink run config/workflows/demo.yaml --server device=mqtt://broker.lan/pi-1",
        ),
    )
    run.set_defaults(handler=cmd_run)
    run.add_argument("workflow", metavar="WORKFLOW.yaml", help="the workflow config to run")
    run.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="[NAME=]ADDRESS",
        help="override a server address of the workflow (repeatable): HOST:PORT, or a fleet "
        "node mqtt://BROKER[:PORT]/NODE; without NAME= it stands for every server of the "
        "workflow",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set one of the workflow's inputs (VALUE is read as YAML: 25, 0.5, fast, [1, 2])",
    )
    add_journal_args(run)
    add_plain_arg(run)
    add_secret_args(run)
    add_client_tls_args(run)
    add_mqtt_args(run)


def register_demo(sub: Subparsers) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the demo workflow on a simulated device, in-process",
        **examples("statelink demo", "statelink demo --plain"),
    )
    demo.set_defaults(handler=cmd_demo)
    add_journal_args(demo)
    add_plain_arg(demo)


def add_journal_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--journal",
        metavar="FILE",
        help="write the run's journal (JSON lines) to FILE, a new file (default: "
        "STATE_DIR/runs/RUN_ID.jsonl)",
    )
    add_state_dir_arg(parser, "where run journals are kept, in runs/")


def shipped_config_dir() -> Path:
    """The ``config/`` folder that ships with statelink: the checkout's, else the installed copy."""
    candidates = [Path(__file__).resolve().parents[2] / "config"]
    spec = importlib.util.find_spec("statelink_config")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    for candidate in candidates:
        if (candidate / "workflows" / "demo.yaml").is_file():
            return candidate
    raise UsageError("cannot find the shipped config/ folder; reinstall statelink (pip install .)")


def server_overrides(spec: WorkflowSpec, items: Sequence[str]) -> dict[str, ServerAddress]:
    """``--server`` values: ``NAME=ADDRESS`` for one server, a bare address for all."""
    overrides: dict[str, ServerAddress] = {}
    for name, address in server_options(items):
        for server in [name] if name is not None else list(spec.servers):
            overrides[server] = address
    return overrides


def input_values(items: Sequence[str]) -> dict[str, Any]:
    """``--set NAME=VALUE`` values, each VALUE read as YAML."""
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
    spec: WorkflowSpec,
    servers: Mapping[str, str | ServerAddress],
    *,
    journal: str | None,
    plain: bool,
    secret: bytes | None = None,
    ssl: ssl_module.SSLContext | None = None,
    inputs: Mapping[str, Any] | None = None,
    state_dir: str | None = None,
    options: Mapping[str, Any] | None = None,
    mqtt: MqttOptions | None = None,
) -> int:
    """Run one workflow to its end with a progress view (:func:`drive`); the exit code of its
    outcome.

    The run is journaled to ``journal`` (a new file) or ``STATE_DIR/runs/RUN_ID.jsonl``;
    "run RUN_ID, journal PATH" goes to stderr when it starts. A journal that cannot be
    written fails the run (through its ``on_abort`` path): exit 1."""
    from ..journal import check_new_journal_path
    from ..runner import WorkflowRunner, describe_os_error, resolve_servers

    try:  # usage errors before the progress view starts
        resolve_servers(spec, servers)
        spec.run_context(inputs)
        if journal is not None:
            check_new_journal_path(journal)
    except ValueError as exc:
        raise UsageError(str(exc))
    directory = state_dir_option(state_dir)
    try:
        runner = WorkflowRunner(
            secret=secret, ssl=ssl, client_name="statelink-run", state_dir=directory, mqtt=mqtt
        )
    except OSError as exc:
        raise UsageError(f"cannot use the state directory {directory}: {describe_os_error(exc)}")

    def begin(view: ProgressView) -> RunHandle:
        try:
            handle = runner.start(
                spec,
                servers=servers,
                journal=journal,
                observer=view.on_entry,
                context=inputs,
                options=options,
            )
        except ValueError as exc:
            raise UsageError(str(exc))
        say(f"run {handle.run_id}, journal {handle.journal_path}")
        return handle

    return drive(runner, spec, plain, begin)


def drive(
    runner: WorkflowRunner,
    spec: WorkflowSpec,
    plain: bool,
    begin: Callable[[ProgressView], RunHandle],
) -> int:
    """Drive one run of ``runner`` to its end with a progress view, then close the runner;
    the exit code of its outcome. ``begin(view)`` starts (or resumes) the run with
    ``view.on_entry`` as its observer, says so, and returns its handle (UsageError for what
    it refuses).

    SIGINT (Ctrl-C), SIGTERM and SIGHUP abort the run alike: the command in flight is
    cancelled, the workflow's ``on_abort`` state runs, the journal ends with ``finished``;
    the exit code is then 130, 143 or 129. The same signal again stops at once. A signal
    before the run started stops at once (:class:`Interrupted`)."""
    from ..errors import RpcError
    from ..runner import describe_os_error

    handle: RunHandle | None = None
    signals: list[int] = []  #: the abort signals received, in order
    deferred: list[int] | None = None  #: signals that came while begin() started the run

    def on_signal(signum: int) -> None:
        if handle is None:
            if deferred is None:  # nothing started yet: stop here
                raise Interrupted(signum)
            deferred.append(signum)  # the run may have started: abort it once we hold it
            return
        abort(signum)

    def abort(signum: int) -> None:
        assert handle is not None
        signals.append(signum)
        if len(signals) == 1:
            say(
                f"\naborting ({signal_name(signum)}): running the workflow's on_abort state "
                f"{spec.on_abort!r} (signal again to stop at once)"
                if spec.on_abort
                else f"\naborting ({signal_name(signum)}; the workflow has no on_abort state)"
            )
        handle.abort()

    with abort_signals(on_signal), runner, ProgressView(spec.name, plain) as view:
        deferred = []
        handle = begin(view)
        for signum in deferred:
            abort(signum)
        for address in set(handle.servers.values()):
            try:
                runner.sender(address).subscribe("rpc.progress", view.on_progress)
            except (OSError, RpcError):
                pass  # the run itself meets the error (connection_lost, unauthorized) and routes it
        while handle.wait(0.2) is None:
            pass
    outcome = handle.outcome or "failure"
    reason = handle.run.reason
    say(
        f"workflow {spec.name} (run {handle.run_id}): {outcome}"
        + (f" ({reason})" if reason and reason != outcome else "")
        + f" in {view.elapsed():.1f} s, final state {handle.state}",
        sys.stdout,
    )
    if handle.journal_error is not None:
        say(f"journal write failed: {describe_os_error(handle.journal_error)}")
        return EXIT_FAILED
    if outcome == "aborted" and signals:
        return signal_exit_code(signals[0])
    return EXIT_BY_OUTCOME.get(outcome, EXIT_FAILED)


def cmd_run(args: argparse.Namespace) -> int:
    from statemachines.workflow import load_workflow

    spec = load_workflow(args.workflow)  # its source_text goes into the journal: for resume
    return execute(
        spec,
        server_overrides(spec, args.server),
        journal=args.journal,
        plain=args.plain,
        secret=read_secret(args),
        ssl=client_ssl(args),
        inputs=input_values(args.set),
        state_dir=args.state_dir,
        options=behaviour_options(args),
        mqtt=mqtt_options(args),
    )


def behaviour_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of a run that change its behaviour, for its ``start`` entry (a resume
    uses them): paths made absolute; never a secret or a password itself."""

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path else None

    return {
        "secret_file": absolute(getattr(args, "secret_file", None)),
        "tls": bool(getattr(args, "tls", False) or getattr(args, "tls_ca", None)),
        "tls_ca": absolute(getattr(args, "tls_ca", None)),
        "mqtt_user": getattr(args, "mqtt_user", None),
        "mqtt_password_file": absolute(getattr(args, "mqtt_password_file", None)),
        "topic_prefix": getattr(args, "topic_prefix", None),
    }


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the simulated demo device in-process on a free port and run the demo workflow."""
    from statemachines.device import load_device
    from statemachines.workflow import load_workflow

    from ..devices import add_device
    from ..server import CommandServer

    config = shipped_config_dir()
    device = load_device(config / "devices" / "demo.yaml")
    spec = load_workflow(config / "workflows" / "demo.yaml")
    logging.getLogger("statelink.server").setLevel(logging.WARNING)  # the view tells the story
    server = CommandServer("127.0.0.1", 0, name="statelink-demo")
    add_device(server, device, simulate=True)
    with server:
        host, port = server.address
        print(
            f"demo device '{device.name}' (simulated GPIO) listening on {host}:{port}", flush=True
        )
        servers = {name: (host, port) for name in spec.servers}
        return execute(
            spec, servers, journal=args.journal, plain=args.plain, state_dir=args.state_dir
        )
