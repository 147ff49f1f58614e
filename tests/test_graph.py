"""Mermaid and DOT text of state machines: structure, quoting, device diagrams."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from statemachines.device import load_device
from statemachines.graph import (
    ABORT_LABEL,
    device_edges,
    device_graph,
    render_graph,
    workflow_graph,
)
from statemachines.workflow import load_workflow

CONFIG = Path(__file__).resolve().parent.parent / "config" / "devices"
WORKFLOWS = CONFIG.parent / "workflows"

MERMAID_LINE = re.compile(
    r"^    (?:"
    r'state "(?P<label>[^"]*)" as (?P<alias>\w+)'
    r"|(?P<src>\[\*\]|\w+) --> (?P<dst>\[\*\]|\w+)(?: : (?P<text>[^;:\n]+))?"
    r")$"
)
DOT_ID = r'"(?:[^"\\]|\\.)*"'
DOT_LINE = re.compile(
    rf"^    (?:(?P<node>{DOT_ID})(?: \[[^\]]*\])?"
    rf"|(?P<src>{DOT_ID}) -> (?P<dst>{DOT_ID})"
    rf"(?: \[label=(?P<label>{DOT_ID})(?P<dashed>, style=dashed)?\])?"
    r"|rankdir=LR|label=.*|labelloc=t|node \[.*\]);$"
)


def parse_mermaid(text: str) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """A strict reading of the subset we emit: (alias -> name, [(src, dst, label)])."""
    lines = text.splitlines()
    assert lines[:4] == ["---", lines[1], "---", "stateDiagram-v2"]
    assert lines[1].startswith("title: ")
    names: dict[str, str] = {}
    edges: list[tuple[str, str, str]] = []
    for line in lines[4:]:
        match = MERMAID_LINE.match(line)
        assert match, f"not valid Mermaid state-diagram syntax: {line!r}"
        if match["alias"]:
            names[match["alias"]] = match["label"]
        else:
            edges.append((match["src"], match["dst"], match["text"] or ""))
    return names, [(names.get(s, s), names.get(d, d), t) for s, d, t in edges]


def unquote(dot_id: str) -> str:
    return re.sub(r"\\(.)", r"\1", dot_id[1:-1])


def parse_dot(text: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    lines = text.splitlines()
    assert re.match(rf"^digraph {DOT_ID} \{{$", lines[0]) and lines[-1] == "}"
    nodes: list[str] = []
    edges: list[tuple[str, str, str]] = []
    for line in lines[1:-1]:
        match = DOT_LINE.match(line)
        assert match, f"not valid DOT: {line!r}"
        if match["node"]:
            nodes.append(unquote(match["node"]))
        elif match["src"]:
            label = unquote(match["label"]) if match["label"] else ""
            edges.append((unquote(match["src"]), unquote(match["dst"]), label))
    return nodes, edges


STATES = ["idle", "running", "done", "failed"]
EDGES = [("idle", "running", "start"), ("running", "done", "ok"), ("running", "failed", "")]


def test_mermaid_basic() -> None:
    text = render_graph("job", STATES, "idle", EDGES, finals=["done", "failed"])
    assert text.endswith("\n")
    names, edges = parse_mermaid(text)
    assert names == {}  # all plain identifiers: no aliases needed
    assert edges == [
        ("[*]", "idle", ""),
        ("idle", "running", "start"),
        ("running", "done", "ok"),
        ("running", "failed", ""),
        ("done", "[*]", ""),
        ("failed", "[*]", ""),
    ]
    assert render_graph("job", STATES, "idle", EDGES) == render_graph(
        "job", STATES, "idle", EDGES, fmt="mermaid"
    )


def test_mermaid_quotes_names_that_need_it() -> None:
    states = ["half open", "state", "end", "9lives", "ok"]
    edges = [
        ("half open", "state", "go: now; fast"),
        ("end", "9lives", "a%%b #1"),
        ("ok", "new one", "x"),
    ]
    names, parsed = parse_mermaid(render_graph('my "door"', states, "half open", edges))
    assert set(names.values()) == {"half open", "state", "end", "9lives", "new one"}
    assert parsed[0] == ("[*]", "half open", "")
    sources = [(s, d) for s, d, _ in parsed[1:]]
    assert sources == [("half open", "state"), ("end", "9lives"), ("ok", "new one")]
    for _, _, label in parsed:
        assert ";" not in label and "%%" not in label and ":" not in label


def test_dot_basic() -> None:
    text = render_graph("job", STATES, "idle", EDGES, finals=["done"], fmt="dot")
    nodes, edges = parse_dot(text)
    assert nodes[:4] == STATES and nodes[4] == "__start__"
    assert '"done" [shape=doublecircle];' in text
    assert edges == [
        ("__start__", "idle", ""),
        ("idle", "running", "start"),
        ("running", "done", "ok"),
        ("running", "failed", ""),
    ]


def test_dot_escapes_quotes_and_backslashes() -> None:
    states = ['say "hi"', "back\\slash", "__start__"]
    text = render_graph('t"x', states, states[0], [(states[0], states[1], 'l"b')], fmt="dot")
    nodes, edges = parse_dot(text)
    assert nodes[:3] == states and nodes[3] == "__start___"  # the start dot avoids a clash
    assert (states[0], states[1], 'l"b') in edges


def test_states_only_named_by_edges_are_drawn() -> None:
    nodes, _ = parse_dot(render_graph("t", [], "a", [("a", "b", "")], fmt="dot"))
    assert nodes[:2] == ["a", "b"]


def test_no_initial() -> None:
    _, edges = parse_mermaid(render_graph("t", ["a"], None, []))
    assert edges == []


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown graph format 'svg'"):
        render_graph("t", ["a"], "a", [], fmt="svg")


@pytest.mark.parametrize("fmt", ["mermaid", "dot"])
def test_door_graph_has_every_state_and_edge(fmt: str) -> None:
    spec = load_device(CONFIG / "door.yaml")
    text = device_graph(spec, fmt)
    if fmt == "mermaid":
        _, edges = parse_mermaid(text)
        drawn = {n for s, d, _ in edges for n in (s, d)} - {"[*]"}
    else:
        nodes, edges = parse_dot(text)
        drawn = set(nodes) - {"__start__"}
    assert drawn == set(spec.states)
    expected = device_edges(spec)
    for edge in expected:
        assert edge in edges
    labels = {(s, d): label for s, d, label in expected}
    assert labels[("closed", "opening")] == "open"
    assert labels[("opening", "open")] == "open done"
    assert labels[("opening", "closed")] == "open cancelled"
    assert labels[("opening", "fault")] == "error"
    assert labels[("fault", "closing")] == "reset"
    assert labels[("closing", "closed")] == "close done, reset done"


def test_demo_graph_merges_self_loops() -> None:
    spec = load_device(CONFIG / "demo.yaml")
    labels = {(s, d): label for s, d, label in device_edges(spec)}
    assert labels[("idle", "calibrating")] == "calibrate"
    assert labels[("calibrating", "idle")] == "calibrate done, calibrate cancelled"
    assert labels[("fault", "idle")] == "reset"
    assert "selftest" in labels[("idle", "idle")].split(", ")
    assert "blink" not in labels[("fault", "fault")]  # blink has no `from`: not in fault
    names, _ = parse_mermaid(device_graph(spec))
    assert names == {}


def test_workflow_graph_uses_graph_args() -> None:
    class Compiled:
        def graph_args(self) -> dict[str, object]:
            return {
                "title": "wf",
                "states": ["a", "b"],
                "initial": "a",
                "edges": [("a", "b", "ok")],
                "finals": ["b"],
            }

    assert workflow_graph(Compiled()) == render_graph(
        "wf", ["a", "b"], "a", [("a", "b", "ok")], ["b"]
    )
    assert workflow_graph(Compiled(), "dot").startswith('digraph "wf" {')


def test_no_command_begins_in_a_running_state() -> None:
    """Commands on one device run one at a time: `from: "*"` does not draw edges out of a
    state the device is only in while another command runs."""
    spec = load_device(Path(__file__).resolve().parent.parent / "config/devices/demo.yaml")
    sources = {(s, d) for s, d, _ in device_edges(spec)}
    assert ("calibrating", "calibrating") not in sources
    assert {d for s, d in sources if s == "calibrating"} == {"idle", "fault"}


@pytest.mark.parametrize("name", ["demo", "door"])
def test_device_edges_draw_the_specs_transition_list(name: str) -> None:
    """The diagram is drawn from the one transition list the machine runs, not rebuilt."""
    spec = load_device(CONFIG / f"{name}.yaml")
    moves = {(t.source, t.dest) for t in spec.transitions}
    assert {(s, d) for s, d, _ in device_edges(spec)} <= moves


def test_the_on_abort_state_gets_an_edge_in_mermaid() -> None:
    """A workflow's on_abort state is entered from any running state: it must not look
    unreachable (issue 14, first hour 9)."""
    spec = load_workflow(WORKFLOWS / "demo.yaml")
    assert spec.on_abort == "abort_led_off"
    _, edges = parse_mermaid(workflow_graph(spec))
    assert ("[*]", "abort_led_off", ABORT_LABEL) in edges
    assert ("[*]", spec.initial, "") in edges
    assert [d for s, d, _ in edges if s == "[*]"] == [spec.initial, "abort_led_off"]


def test_the_on_abort_state_gets_a_dashed_edge_in_dot() -> None:
    spec = load_workflow(WORKFLOWS / "abort.yaml")
    text = workflow_graph(spec, "dot")
    nodes, edges = parse_dot(text)
    assert ("__abort__", "led_off_on_abort", ABORT_LABEL) in edges
    assert '"__abort__" -> "led_off_on_abort" [label="on abort' in text
    assert text.count("style=dashed") == 1
    assert "__abort__" in nodes and "__start__" in nodes


def test_every_state_of_a_workflow_with_on_abort_has_an_edge_in() -> None:
    for path in sorted(WORKFLOWS.glob("*.yaml")):
        spec = load_workflow(path)
        _, edges = parse_mermaid(workflow_graph(spec))
        reached = {d for _, d, _ in edges}
        assert set(spec.states) <= reached, (path.name, set(spec.states) - reached)


def test_abort_marker_names_do_not_collide() -> None:
    text = render_graph(
        "t", ["__abort__", "a"], "a", [("a", "__abort__", "")], abort="a", fmt="dot"
    )
    nodes, edges = parse_dot(text)
    assert ("__abort___", "a", ABORT_LABEL) in edges and "__abort__" in nodes
    no_abort = render_graph("t", ["a"], "a", [], fmt="dot")
    assert "__abort__" not in no_abort and "dashed" not in no_abort
    assert "[*] --> a :" not in render_graph("t", ["a"], "a", [])
