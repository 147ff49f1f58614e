"""Diagrams of state machines as Mermaid (``stateDiagram-v2``) or Graphviz DOT text.

No Graphviz is needed: the output is text to paste into Markdown (GitHub renders Mermaid) or
to feed to ``dot`` later. :func:`render_graph` is generic (devices and workflows);
:func:`device_graph` draws a :class:`~statemachines.device.DeviceSpec`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .device import DeviceSpec

FORMATS = ("mermaid", "dot")
ABORT_LABEL = "on abort (Ctrl-C, run timeout)"  #: the label of the edge into a workflow's on_abort

_MERMAID_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Words Mermaid's state diagram grammar treats specially; never used as bare ids.
_MERMAID_RESERVED = frozenset(
    {"state", "note", "direction", "class", "classDef", "style", "end", "as", "left", "right",
     "of", "over", "TB", "BT", "LR", "RL", "default", "click", "fork", "join", "choice"}
)  # fmt: skip


def render_graph(
    title: str,
    states: Sequence[str],
    initial: str | None,
    edges: Iterable[tuple[str, str, str]],
    finals: Iterable[str] = (),
    fmt: str = "mermaid",
    abort: str | None = None,
) -> str:
    """Render a state machine as text.

    ``edges`` are ``(source, dest, label)`` in drawing order (an empty label draws a bare
    arrow); states only named by edges are drawn too. ``initial`` gets an arrow from the start
    dot, each of ``finals`` an arrow to the end dot (Mermaid) or a double circle (DOT). ``abort``
    (a workflow's ``on_abort`` state, which any running state can enter) gets an edge labelled
    :data:`ABORT_LABEL`: from the start dot in Mermaid (its state diagrams have no dashed
    edges), a dashed one from its own point in DOT. Names that need it are quoted or aliased,
    so any string is a valid state name. ValueError for an unknown ``fmt``.
    """
    edge_list = [(str(s), str(d), str(label or "")) for s, d, label in edges]
    ordered: list[str] = []
    for name in [*states, *(n for s, d, _ in edge_list for n in (s, d))]:
        if name not in ordered:
            ordered.append(name)
    for marked in (initial, abort):
        if marked is not None and marked not in ordered:
            ordered.append(marked)
    final_list = [f for f in finals if f is not None]
    for name in final_list:
        if name not in ordered:
            ordered.append(name)
    if fmt == "mermaid":
        return _mermaid(title, ordered, initial, edge_list, final_list, abort)
    if fmt == "dot":
        return _dot(title, ordered, initial, edge_list, final_list, abort)
    raise ValueError(f"unknown graph format {fmt!r} (formats: {', '.join(FORMATS)})")


def _mermaid_label(text: str) -> str:
    # A transition label runs to the end of the line; keep it on one line and away from the
    # characters the grammar gives a meaning to (";" ends a statement, "%%" starts a comment).
    text = " ".join(text.split())
    for bad, good in (
        ("-->", "->"),
        (";", ","),
        ("%%", "%"),
        (":", " -"),
        ("#", "no."),
        ("{", "("),
        ("}", ")"),
    ):
        text = text.replace(bad, good)
    return text


def _mermaid(
    title: str,
    states: list[str],
    initial: str | None,
    edges: list[tuple[str, str, str]],
    finals: list[str],
    abort: str | None,
) -> str:
    ids: dict[str, str] = {}
    taken = {s for s in states if _MERMAID_ID.match(s) and s not in _MERMAID_RESERVED}
    lines = ["---", f"title: {json.dumps(title)}", "---", "stateDiagram-v2"]
    for index, name in enumerate(states):
        if name in taken:
            ids[name] = name
            continue
        alias = f"s{index}"
        while alias in taken:
            alias += "_"
        taken.add(alias)
        ids[name] = alias
        shown = _mermaid_label(name).replace('"', "'")
        lines.append(f'    state "{shown}" as {alias}')
    if initial is not None:
        lines.append(f"    [*] --> {ids[initial]}")
    if abort is not None:
        lines.append(f"    [*] --> {ids[abort]} : {_mermaid_label(ABORT_LABEL)}")
    for source, dest, label in edges:
        text = _mermaid_label(label)
        suffix = f" : {text}" if text else ""
        lines.append(f"    {ids[source]} --> {ids[dest]}{suffix}")
    for name in finals:
        lines.append(f"    {ids[name]} --> [*]")
    return "\n".join(lines) + "\n"


def _dot_quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _dot(
    title: str,
    states: list[str],
    initial: str | None,
    edges: list[tuple[str, str, str]],
    finals: list[str],
    abort: str | None,
) -> str:
    start, abort_point = "__start__", "__abort__"
    while start in states:
        start += "_"
    while abort_point in states:
        abort_point += "_"
    lines = [
        f"digraph {_dot_quote(title)} {{",
        "    rankdir=LR;",
        f"    label={_dot_quote(title)};",
        "    labelloc=t;",
        "    node [shape=box, style=rounded];",
    ]
    for name in states:
        shape = " [shape=doublecircle]" if name in finals else ""
        lines.append(f"    {_dot_quote(name)}{shape};")
    if initial is not None:
        lines.append(f'    {_dot_quote(start)} [shape=point, label=""];')
        lines.append(f"    {_dot_quote(start)} -> {_dot_quote(initial)};")
    if abort is not None:
        point, label = _dot_quote(abort_point), _dot_quote(ABORT_LABEL)
        lines.append(f'    {point} [shape=point, label=""];')
        lines.append(f"    {point} -> {_dot_quote(abort)} [label={label}, style=dashed];")
    for source, dest, label in edges:
        attrs = f" [label={_dot_quote(label)}]" if label else ""
        lines.append(f"    {_dot_quote(source)} -> {_dot_quote(dest)}{attrs};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def device_edges(spec: DeviceSpec) -> list[tuple[str, str, str]]:
    """The edges of a device's machine (:attr:`DeviceSpec.transitions`), labels merged per
    (source, dest).

    A command draws ``origin -> running`` (its name), ``running -> to`` (``<name> done``; back
    to each origin when there is no ``to``) and ``running -> origin`` (``<name> cancelled``);
    without a running state, ``origin -> to`` (or a loop on the origin). Failures draw
    ``state -> fault`` labelled ``error``. Running states are not origins of other commands.
    """
    merged: dict[tuple[str, str], list[str]] = {}
    fault = spec.fault_state
    # States a device is only in while a command runs: commands on one device run one at a
    # time, so no command begins there (no edges drawn from them but the running command's).
    busy = (
        {c.running for c in spec.commands.values() if c.running}
        - {c.to for c in spec.commands.values()}
        - {spec.initial, fault}
    )
    drawn = {n for n in spec.commands if any(s not in busy for s in spec.allowed_states(n))}
    for t in spec.transitions:
        if t.command not in drawn:
            continue
        running = spec.commands[t.command].running
        # the state the command began in, when this edge belongs to one origin
        began = t.source if t.event == "begin" or running is None else t.origin
        if began in busy:
            continue
        if t.event == "begin":
            label = t.command if running is not None else ""
        elif t.event == "succeed":
            label = t.command if running is None else f"{t.command} done"
        elif t.event == "cancel":
            label = f"{t.command} cancelled" if t.dest != t.source else ""
        else:  # fail: only a move to the fault state is drawn
            label = "error" if t.dest == fault and t.source != fault else ""
        if label:
            labels = merged.setdefault((t.source, t.dest), [])
            if label not in labels:
                labels.append(label)
    return [(s, d, ", ".join(labels)) for (s, d), labels in merged.items()]


def device_graph(spec: DeviceSpec, fmt: str = "mermaid") -> str:
    """Mermaid or DOT text of a device's machine (see :func:`device_edges`)."""
    return render_graph(spec.name, spec.states, spec.initial, device_edges(spec), fmt=fmt)


def workflow_graph(workflow: Any, fmt: str = "mermaid") -> str:
    """Mermaid or DOT text of a workflow: a ``CompiledWorkflow`` (anything with
    ``graph_args()``) or a ``WorkflowSpec`` (compiled here)."""
    if not hasattr(workflow, "graph_args"):
        from .workflow import CompiledWorkflow

        workflow = CompiledWorkflow(workflow)
    args = dict(workflow.graph_args())
    if "abort" not in args:  # the on_abort state, entered from any running state
        args["abort"] = getattr(getattr(workflow, "spec", None), "on_abort", None)
    return render_graph(**args, fmt=fmt)
