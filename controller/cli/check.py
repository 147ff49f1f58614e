"""``statelink check``: validate workflow and device configs, workflows also against device
configs (``--device``) or live servers (``--server``, by ``rpc.discover``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from statemachines.addresses import NodeAddress, ServerAddress, format_address
from statemachines.source import ConfigError, ConfigErrors

from .common import (
    EXIT_OK,
    UsageError,
    add_client_tls_args,
    add_mqtt_args,
    add_secret_args,
    client_ssl,
    examples,
    load_devices,
    mqtt_options,
    plural,
    read_secret,
    server_options,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from statemachines.catalog import Catalog, CommandInfo
    from statemachines.workflow import WorkflowSpec

    from .common import Subparsers


def register(sub: Subparsers) -> None:
    check = sub.add_parser(
        "check",
        help="validate workflow and device configs",
        **examples(
            "statelink check config/devices/demo.yaml config/workflows/demo.yaml",
            "statelink check config/workflows/demo.yaml --device config/devices/demo.yaml",
            "statelink check config/workflows/demo.yaml --server 127.0.0.1:15769",
            "statelink check config/workflows/demo.yaml --server device=mqtt://broker.lan/pi-1",
        ),
    )
    check.set_defaults(handler=cmd_check)
    check.add_argument(
        "files", nargs="+", metavar="FILE", help="workflow and device configs to validate"
    )
    check.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="FILE",
        help="check workflows against this device config",
    )
    check.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="[NAME=]ADDRESS",
        help="check workflows against a live server (rpc.discover) or a fleet node "
        "(mqtt://BROKER/NODE: its retained discover document); without NAME= it stands "
        "for every server of the workflow",
    )
    add_secret_args(check)
    add_client_tls_args(check)
    add_mqtt_args(check)


def cmd_check(args: argparse.Namespace) -> int:
    from statemachines import config_kind
    from statemachines.device import load_device
    from statemachines.workflow import check_against, load_workflow

    catalogs = catalogs_of(args)
    errors: list[ConfigError] = []
    for file in args.files:
        try:
            if config_kind(file) == "device":
                device = load_device(file)
                commands = plural(len(device.commands), "command")
                print(f"{file}: ok (device {device.name}, {commands})")
            else:
                workflow = load_workflow(file)
                found = check_against(workflow, catalogs) if catalogs else []
                if found:
                    raise ConfigErrors(found)
                states = plural(len(workflow.states), "state")
                ok = f"{file}: ok (workflow {workflow.name}, {states})"
                print(ok + skipped_note(workflow, catalogs))
        except ConfigErrors as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigErrors(errors)
    return EXIT_OK


def skipped_note(workflow: WorkflowSpec, catalogs: Mapping[str, Catalog]) -> str:
    """``""``, or what was not checked because no device config or server describes it, and how
    to check it: an ``ok`` must not read as "the commands and params are right"."""
    if "*" in catalogs:
        return ""
    unchecked = sorted(
        {
            state.server
            for state in workflow.states.values()
            if state.kind == "command"
            and state.server is not None
            and state.command is not None
            and not state.command.startswith("rpc.")
            and state.server not in catalogs
        }
    )
    if not unchecked:
        return ""
    names = ", ".join(repr(name) for name in unchecked)
    return (
        f"; device checks skipped (commands and params of server {names} not checked): "
        "add --device DEVICE.yaml or --server [NAME=]HOST:PORT|mqtt://BROKER/NODE to run them"
    )


def catalogs_of(args: argparse.Namespace) -> dict[str, Catalog]:
    """Device catalogs to check workflows against, keyed by workflow server name ("*": every
    server)."""
    from statemachines.device import catalog_from_discover

    catalogs: dict[str, Catalog] = {}
    if args.device:
        merged: dict[str, CommandInfo] = {}
        for spec in load_devices(args.device):
            merged.update(spec.catalog())
        catalogs["*"] = merged
    for name, address in server_options(args.server):
        catalogs[name or "*"] = catalog_from_discover(discover(address, args))
    return catalogs


def discover(address: ServerAddress, args: argparse.Namespace) -> Any:
    """The ``rpc.discover`` document of a server, or of a fleet node (its retained
    ``P/NODE/discover``: works while the node is offline). UsageError when there is none."""
    from ..client import Client
    from ..errors import RpcError

    try:
        if isinstance(address, NodeAddress):
            from ..mqtt.broker_link import read_discover

            described = read_discover(address, mqtt_options(args))
            if described is None:
                raise UsageError(
                    f"no discover document for node {address.node} on {address.broker} "
                    "(a node publishes it when it connects: has "
                    f"`statelink serve --broker ... --node {address.node}` ever run?)"
                )
            return described
        with Client(
            address,
            name="statelink-check",
            reconnect=False,
            secret=read_secret(args),
            ssl=client_ssl(args),
        ) as client:
            return client.call("rpc.discover", timeout=10.0)
    except (OSError, ValueError, RpcError) as exc:
        raise UsageError(f"cannot discover {format_address(address)}: {exc}")
