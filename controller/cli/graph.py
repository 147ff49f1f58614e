"""``statelink graph``: a workflow's or a device's machine as Mermaid or DOT text."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import EXIT_OK, examples

if TYPE_CHECKING:
    from .common import Subparsers


def register(sub: Subparsers) -> None:
    graph = sub.add_parser(
        "graph",
        help="draw a workflow or device machine",
        **examples(
            "statelink graph config/workflows/demo.yaml",
            "statelink graph config/devices/demo.yaml --format dot | dot -Tsvg -o demo.svg",
        ),
    )
    graph.set_defaults(handler=cmd_graph)
    graph.add_argument("file", metavar="FILE", help="a workflow or device config")
    graph.add_argument(
        "--format",
        choices=["mermaid", "dot"],
        default="mermaid",
        help="mermaid (default; renders on GitHub) or Graphviz dot",
    )


def cmd_graph(args: argparse.Namespace) -> int:
    from statemachines import config_kind
    from statemachines.graph import device_graph, workflow_graph

    if config_kind(args.file) == "device":
        from statemachines.device import load_device

        print(device_graph(load_device(args.file), args.format))
    else:
        from statemachines.workflow import load_workflow

        print(workflow_graph(load_workflow(args.file), args.format))
    return EXIT_OK
