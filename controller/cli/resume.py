"""``statelink resume RUN_ID|FILE``: continue an interrupted run where it stopped (its journal
holds everything it needs), with live progress. Exit codes as ``run``; 2 (one line saying
why) when the run finished already, a live process drives it, or there is no such run."""

from __future__ import annotations

import argparse
import contextlib
import json
import ssl as ssl_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statemachines.addresses import DEFAULT_TOPIC_PREFIX

from .common import (
    UsageError,
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
    state_dir_option,
)
from .run import drive, server_overrides

if TYPE_CHECKING:
    from ..mqtt.options import MqttOptions
    from ..runner import RunHandle
    from .common import Subparsers
    from .progress import ProgressView


def register(sub: Subparsers) -> None:
    resume = sub.add_parser(
        "resume",
        help="continue an interrupted run (its process died) where it stopped",
        **examples(
            "statelink runs --unfinished",
            "statelink resume demo-20250101T120000Z-1a2b3c4d",
        ),
    )
    resume.set_defaults(handler=cmd_resume)
    resume.add_argument(
        "run", metavar="RUN_ID|FILE", help="a run id of STATE_DIR/runs/, or a journal file"
    )
    add_state_dir_arg(resume, "where run journals are kept, in runs/")
    resume.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="[NAME=]ADDRESS",
        help="a server's new address, HOST:PORT or mqtt://BROKER[:PORT]/NODE (repeatable; "
        "default: the addresses the run used); without NAME= it stands for every server of "
        "the workflow",
    )
    add_plain_arg(resume)
    add_secret_args(resume)
    add_client_tls_args(resume)
    add_mqtt_args(resume)


def _recorded_options(path: Path) -> dict[str, Any]:
    """The ``options`` of the journal's ``start`` entry ({} if it cannot be read)."""
    with contextlib.suppress(OSError, ValueError), open(path, "rb") as f:
        options = json.loads(f.readline()).get("options")
        if isinstance(options, dict):
            return options
    return {}


def _secret(args: argparse.Namespace, options: dict[str, Any]) -> bytes | None:
    """``--secret-file`` / ``$STATELINK_SECRET``, else the secret file the run used."""
    from .. import auth

    secret = read_secret(args)
    recorded = options.get("secret_file")
    if secret is None and isinstance(recorded, str):
        try:
            return auth.load_secret(recorded)
        except ValueError as exc:
            raise UsageError(f"the run used the secret file {recorded}: {exc}")
    return secret


def _ssl(args: argparse.Namespace, options: dict[str, Any]) -> ssl_module.SSLContext | None:
    """``--tls`` / ``--tls-ca``, else the TLS the run used."""
    if args.tls or args.tls_ca or not options.get("tls"):
        return client_ssl(args)
    ca = options.get("tls_ca")
    try:
        return ssl_module.create_default_context(cafile=ca if isinstance(ca, str) else None)
    except (OSError, ssl_module.SSLError) as exc:
        raise UsageError(f"the run used the CA bundle {ca}: {exc}")


def _mqtt(args: argparse.Namespace, options: dict[str, Any]) -> MqttOptions:
    """The broker options: the command line's, else what the run used (user, password file,
    topic prefix, CA bundle; the password itself is never recorded)."""
    recorded = argparse.Namespace(**vars(args))
    if not args.mqtt_user and isinstance(options.get("mqtt_user"), str):
        recorded.mqtt_user = options["mqtt_user"]
        if not args.mqtt_password_file and isinstance(options.get("mqtt_password_file"), str):
            recorded.mqtt_password_file = options["mqtt_password_file"]
    prefix = options.get("topic_prefix")
    if args.topic_prefix == DEFAULT_TOPIC_PREFIX and isinstance(prefix, str):
        recorded.topic_prefix = prefix
    if not args.tls_ca and isinstance(options.get("tls_ca"), str):
        recorded.tls_ca = options["tls_ca"]
    return mqtt_options(recorded)


def cmd_resume(args: argparse.Namespace) -> int:
    from ..journal import JournalBusy
    from ..resume import find_journal, load_interrupted
    from ..runner import WorkflowRunner, describe_os_error

    directory = state_dir_option(args.state_dir)
    try:
        path = find_journal(args.run, directory)
    except ValueError as exc:
        raise UsageError(str(exc))
    options = _recorded_options(path)
    try:
        runner = WorkflowRunner(
            secret=_secret(args, options),
            ssl=_ssl(args, options),
            client_name="statelink-resume",
            state_dir=directory,
            mqtt=_mqtt(args, options),
        )
    except OSError as exc:
        raise UsageError(f"cannot use the state directory {directory}: {describe_os_error(exc)}")

    def begin(view: ProgressView) -> RunHandle:
        try:
            handle = runner.resume(path, servers=servers, observer=view.on_entry)
        except JournalBusy as exc:
            raise UsageError(f"{exc}; not resumed")
        except (ValueError, OSError) as exc:
            raise UsageError(str(exc))
        view.run_id, view.state = handle.run_id, handle.state
        view.step = sum(1 for entry in handle.history if entry.get("next"))
        say(f"run {handle.run_id} resumed in state {handle.state}, journal {path}")
        return handle

    with runner:  # closed on a usage error here; drive closes it too
        try:  # usage errors before the progress view starts
            job = load_interrupted(path)
            servers = server_overrides(job.spec, args.server)
        except JournalBusy as exc:
            raise UsageError(f"{exc}; not resumed")
        except (ValueError, OSError) as exc:
            raise UsageError(str(exc))
        return drive(runner, job.spec, args.plain, begin)
