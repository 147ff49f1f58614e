"""Workflow config loading and validation (statemachines.workflow: loader, check)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from statemachines.addresses import DEFAULT_PORT
from statemachines.catalog import CommandInfo, catalog_from_discover
from statemachines.params import parse_param_specs
from statemachines.source import ConfigError, ConfigErrors
from statemachines.workflow import (
    CompiledWorkflow,
    ErrorRoutes,
    RetrySpec,
    WorkflowSpec,
    check_against,
    format_duration,
    load_workflow,
    parse_address,
    parse_workflow,
)

CONFIG = Path(__file__).resolve().parent.parent / "config"
WORKFLOWS = CONFIG / "workflows"


def write(tmp_path: Path, text: str, name: str = "wf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def states(text: str) -> str:
    """State definitions, written flush left, indented under HEAD's ``states:``."""
    return textwrap.indent(textwrap.dedent(text), "  ")


def load(tmp_path: Path, text: str) -> WorkflowSpec:
    return load_workflow(write(tmp_path, text))


def problems(tmp_path: Path, text: str) -> list[ConfigError]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigErrors) as info:
        load_workflow(path)
    for error in info.value.errors:
        assert error.file == str(path)
    return info.value.errors


def only(tmp_path: Path, text: str, line: int, *fragments: str) -> ConfigError:
    """The file has exactly one problem, at ``line``, whose message has every fragment."""
    errors = problems(tmp_path, text)
    assert len(errors) == 1, [str(e) for e in errors]
    error = errors[0]
    assert error.line == line, str(error)
    for fragment in fragments:
        assert fragment in error.message, error.message
    return error


HEAD = """
# a test workflow (states start at line 7)
name: t
servers: {device: "127.0.0.1:15769"}
command_timeout: 2s
initial: a
states:
"""


# --- a good file ---------------------------------------------------------------------------


def test_a_complete_workflow_loads(tmp_path: Path) -> None:
    spec = load(
        tmp_path,
        """
        name: full
        description: everything at once
        servers:
          left: "127.0.0.1:1"
          right: "[::1]:2"
        default_server: left
        timeout: 1m
        command_timeout: 500ms
        on_abort: off_led
        initial: a
        states:
          a:
            command: demo.calibrate
            params: {steps: "{{ 2 + 3 }}", delay: 0.1}
            save: cal
            retry: {attempts: 3, on: [busy, -32002]}
            on_error: {not_allowed: f, -32006: f, "-32003": f, "*": f}
            choices:
              - if: cal.steps > 3
                next: w
              - next: f
          w: {wait: 2s, next: aw}
          aw:
            await: device.state
            server: right
            if: params.state == "idle" and cal.offset >= 0
            timeout: 3s
            save: change
            next: c
            on_error: {timeout: f}
          c:
            choices:
              - if: change.state == "idle"
                next: ok
              - next: f
          off_led: {command: demo.led_off, next: f}
          ok: {final: success}
          f: {final: failure, description: bad}
        """,
    )
    assert spec.name == "full" and spec.description == "everything at once"
    assert spec.timeout == 60.0 and spec.command_timeout == 0.5
    assert spec.default_server == "left" and spec.on_abort == "off_led"
    assert spec.saved_names == {"cal", "change"}
    assert spec.finals() == ("ok", "f")
    a = spec.states["a"]
    assert a.kind == "command" and a.server == "left" and a.timeout == 0.5
    assert a.retry == RetrySpec(attempts=3, on=frozenset({"busy", -32002}))
    assert a.on_error.by_code == {-32006: "f", -32003: "f"}
    assert a.on_error.by_kind == {"not_allowed": "f"} and a.on_error.default == "f"
    assert [c.label for c in a.choices] == ["cal.steps > 3", "else"]
    assert a.params is not None and a.params.render({}) == {"steps": 5, "delay": 0.1}
    aw = spec.states["aw"]
    assert aw.kind == "await" and aw.server == "right" and aw.awaits == "device.state"
    assert aw.timeout == 3.0 and aw.save == "change"
    assert spec.states["w"].wait == 2.0
    assert spec.states["c"].kind == "choice"


def test_name_defaults_to_the_file_and_single_server_is_default(tmp_path: Path) -> None:
    spec = load_workflow(
        write(
            tmp_path,
            HEAD.replace("name: t\n", "") + "  a: {command: x.y, next: b}\n  b: {final: success}\n",
            name="my_flow.yaml",
        )
    )
    assert spec.name == "my_flow" and spec.default_server == "device"
    assert spec.states["a"].timeout == 2.0


def test_parse_workflow_from_text() -> None:
    spec = parse_workflow(
        "initial: a\nstates:\n  a: {wait: 1s, next: b}\n  b: {final: success}\n", file="x.yaml"
    )
    assert spec.path == "x.yaml" and spec.servers == {}
    with pytest.raises(ConfigErrors) as info:
        parse_workflow("initial: [", file="x.yaml")
    assert info.value.errors[0].file == "x.yaml"


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_workflows_load_and_compile(path: Path) -> None:
    spec = load_workflow(path)
    compiled = CompiledWorkflow(spec)
    assert compiled.graph_edges()
    assert spec.finals()


def test_the_shipped_examples_exist() -> None:
    names = {p.stem for p in WORKFLOWS.glob("*.yaml")}
    assert {"demo", "ten_steps", "retry", "not_allowed", "await_state", "abort", "two_servers"} <= (
        names
    )
    ten = load_workflow(WORKFLOWS / "ten_steps.yaml")
    assert sum(1 for s in ten.states.values() if s.kind == "command") == 10
    assert load_workflow(WORKFLOWS / "demo.yaml").servers == {"device": "127.0.0.1:15769"}


# --- every validation kind -----------------------------------------------------------------


def test_bad_yaml(tmp_path: Path) -> None:
    only(tmp_path, "name: t\nstates: {a: [\n", 3, "invalid YAML")


def test_not_a_mapping(tmp_path: Path) -> None:
    only(tmp_path, "- a\n- b\n", 1, "mapping with name, initial and states")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    only(
        tmp_path,
        HEAD + "  a: {final: success}\ntimout: 3s\n",
        8,
        "unknown top-level key 'timout'",
        "did you mean 'timeout'",
        "allowed keys: name, description, initial, states",
    )


def test_unknown_state_key(tmp_path: Path) -> None:
    only(
        tmp_path,
        HEAD + "  a:\n    command: x.y\n    nxt: b\n    next: b\n  b: {final: success}\n",
        9,
        "unknown key 'nxt' in command state 'a'",
        "did you mean 'next'",
        "allowed keys: command, params",
    )


def test_missing_and_unknown_initial(tmp_path: Path) -> None:
    only(tmp_path, "states:\n  a: {final: success}\n", 1, "missing initial", "one of a")
    only(
        tmp_path,
        "initial: A\nstates:\n  a: {final: success}\n",
        1,
        "initial: unknown state 'A'",
        "did you mean 'a'",
    )


def test_states_must_be_a_mapping(tmp_path: Path) -> None:
    only(tmp_path, "initial: a\nstates: [a]\n", 2, "states must be a mapping")


@pytest.mark.parametrize(
    ("body", "line", "fragment"),
    [
        ("  a: {command: x.y, next: nope}\n", 7, "next: unknown state 'nope'"),
        ("  a: {command: x.y, next: b, on_error: nope}\n", 7, "on_error: unknown state 'nope'"),
        (
            "  a:\n    command: x.y\n    next: b\n    on_error:\n      timeout: nope\n",
            11,
            "timeout: unknown state 'nope'",
        ),
        (
            "  a:\n    command: x.y\n    choices:\n      - if: result\n        next: nope\n",
            11,
            "next: unknown state 'nope'",
        ),
    ],
)
def test_unknown_targets(tmp_path: Path, body: str, line: int, fragment: str) -> None:
    only(tmp_path, HEAD + body + "  b: {final: success}\n", line, fragment, "states: a, b")


def test_unknown_on_abort(tmp_path: Path) -> None:
    only(
        tmp_path,
        HEAD + "  a: {final: success}\non_abort: cleanup\n",
        8,
        "on_abort: unknown state 'cleanup'",
    )


def test_unreachable_state(tmp_path: Path) -> None:
    only(
        tmp_path,
        HEAD + "  a: {command: x.y, next: b}\n  b: {final: success}\n  lost: {final: failure}\n",
        9,
        "state 'lost' is unreachable from initial 'a'",
        "remove it",
    )


def test_on_abort_makes_states_reachable(tmp_path: Path) -> None:
    spec = load(
        tmp_path,
        HEAD + "  a: {command: x.y, next: b}\n  b: {final: success}\n"
        "  clean: {command: x.off, next: stop}\n  stop: {final: failure}\non_abort: clean\n",
    )
    assert spec.on_abort == "clean"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("  a: {command: x.y}\n", "command state 'a' has no way out: add next"),
        ("  a: {wait: 1s}\n", "wait state 'a' has no way out"),
        ("  a: {await: d.s, timeout: 1s}\n", "await state 'a' has no way out"),
    ],
)
def test_no_way_out(tmp_path: Path, body: str, fragment: str) -> None:
    only(tmp_path, HEAD + body, 7, fragment)


def test_choices_must_not_be_empty(tmp_path: Path) -> None:
    only(tmp_path, HEAD + "  a: {choices: []}\n", 7, "choices of 'a' must be a list")


@pytest.mark.parametrize(
    ("body", "kinds"),
    [
        ("  a: {command: x.y, wait: 1s, next: b}\n", "command, wait"),
        ("  a: {final: success, await: d.s}\n", "await, final"),
        ("  a: {wait: 1s, choices: [{next: b}]}\n", "wait, choices"),
    ],
)
def test_mixed_kinds(tmp_path: Path, body: str, kinds: str) -> None:
    only(
        tmp_path,
        HEAD + body + "  b: {final: success}\n",
        7,
        f"state 'a' mixes kinds ({kinds})",
        "split it",
    )


def test_state_without_kind_and_empty_state(tmp_path: Path) -> None:
    only(tmp_path, HEAD + "  a: {next: a}\n", 7, "state 'a' has no kind")
    only(tmp_path, HEAD + "  a:\n", 7, "state 'a' is empty")


def test_both_next_and_choices(tmp_path: Path) -> None:
    only(
        tmp_path,
        HEAD + "  a:\n    command: x.y\n    next: b\n    choices: [{next: b}]\n"
        "  b: {final: success}\n",
        10,
        "both next and choices",
    )


def test_missing_timeout(tmp_path: Path) -> None:
    text = """
    servers: {device: "127.0.0.1:1"}
    initial: a
    states:
      a:
        command: x.y
        next: b
      b:
        await: device.state
        next: c
      c: {final: success}
    """
    errors = problems(tmp_path, text)
    assert [(e.line, e.message.split(":")[0]) for e in errors] == [
        (4, "command state 'a' has no timeout"),
        (7, "await state 'b' has no timeout"),
    ]
    assert "add timeout: 5s to the state, or command_timeout: 5s at the top" in errors[0].message


@pytest.mark.parametrize(
    ("line_text", "fragment"),
    [
        ("    timeout: 2 parsecs\n", "bad duration for timeout"),
        ("    timeout: 0s\n", "timeout must be more than 0"),
        ("    timeout: -1\n", "cannot be negative"),
    ],
)
def test_bad_durations(tmp_path: Path, line_text: str, fragment: str) -> None:
    only(
        tmp_path,
        HEAD + "  a:\n    command: x.y\n" + line_text + "    next: b\n  b: {final: success}\n",
        9,
        fragment,
    )


def test_bad_wait_and_top_level_durations(tmp_path: Path) -> None:
    errors = problems(
        tmp_path,
        HEAD.replace("2s", "soon") + "  a: {wait: forever, next: b}\n  b: {final: success}\n",
    )
    assert [(e.line, e.message[:25]) for e in errors] == [
        (4, "bad duration for command_"),
        (7, "bad duration for wait (ho"),
    ]


def test_bad_expression_syntax_everywhere(tmp_path: Path) -> None:
    text = HEAD + states(
        """\
          a:
            command: x.y
            params:
              n: "{{ result.level * }}"
              m: [1, "{{ result. }}"]
            choices:
              - if: result.level >
                next: b
          b:
            await: d.s
            timeout: 1s
            if: "params.state =="
            next: c
          c: {final: success}
        """
    )
    errors = problems(tmp_path, text)
    assert [e.line for e in errors] == [10, 11, 13, 18]
    assert all("bad expression" in e.message for e in errors)


def test_unclosed_placeholder(tmp_path: Path) -> None:
    only(
        tmp_path,
        HEAD + "  a:\n    command: x.y\n    params: {n: 'x {{ result'}\n    next: b\n"
        "  b: {final: success}\n",
        9,
        "unclosed {{",
    )


def test_names_that_are_never_defined(tmp_path: Path) -> None:
    text = HEAD + states(
        """\
          a:
            command: x.y
            save: level
            params: {n: "{{ levle * 2 }}", p: "{{ params }}"}
            choices:
              - if: result.ok == true
                next: b
              - next: b
          b: {final: success}
        """
    )
    errors = problems(tmp_path, text)
    assert [e.line for e in errors] == [10, 10, 12]
    messages = " | ".join(e.message for e in errors)
    assert "'levle' is never defined" in messages and "did you mean 'level'" in messages
    assert "params is only defined in the if of an await state" in messages
    assert "'true' is never defined" in messages and "did you mean True?" in messages
    assert "(names: level)" in messages


def test_save_names(tmp_path: Path) -> None:
    only(
        tmp_path,
        HEAD + "  a: {command: x.y, save: result, next: b}\n  b: {final: success}\n",
        7,
        "save name 'result'",
        "would shadow",
    )
    only(
        tmp_path,
        HEAD + "  a: {await: x.y, timeout: 1s, save: params, next: b}\n  b: {final: success}\n",
        7,
        "save name 'params'",
    )
    only(
        tmp_path,
        HEAD + "  a: {command: x.y, save: 2fast, next: b}\n  b: {final: success}\n",
        7,
        "must be a name",
    )


def test_unknown_error_kinds(tmp_path: Path) -> None:
    text = HEAD + states(
        """\
          a:
            command: x.y
            next: b
            retry: {attempts: 2, on: [timeout, tiemout]}
            on_error:
              not_alowed: b
              -32001: b
          b: {final: success}
        """
    )
    errors = problems(tmp_path, text)
    assert [e.line for e in errors] == [10, 12]
    assert "unknown error kind 'tiemout'" in errors[0].message
    assert "did you mean 'timeout'" in errors[0].message
    assert "did you mean 'not_allowed'" in errors[1].message
    assert 'an integer code or "*"' in errors[1].message


@pytest.mark.parametrize(
    ("retry", "fragment"),
    [
        ("{attempts: 0}", "retry.attempts must be a whole number >= 1"),
        ("{attempts: 2.5}", "retry.attempts must be a whole number >= 1"),
        ("{attempts: 2, backoff: 0.5}", "retry.backoff must be a number >= 1"),
        ("{attempts: 2, interval: later}", "bad duration for interval"),
        ("{attempts: 2, max_delay: 0}", "max_delay must be more than 0"),
        ("{attempts: 2, on: timeout}", "retry.on must be a list"),
        ("{attempts: 2, tries: 3}", "unknown key 'tries' in retry"),
        ("[3]", "retry is a mapping"),
    ],
)
def test_bad_retry_values(tmp_path: Path, retry: str, fragment: str) -> None:
    only(
        tmp_path,
        HEAD + f"  a:\n    command: x.y\n    next: b\n    retry: {retry}\n"
        "  b: {final: success}\n",
        10,
        fragment,
    )


def test_retry_defaults_and_quoted_on(tmp_path: Path) -> None:
    spec = load(
        tmp_path,
        HEAD + "  a:\n    command: x.y\n    next: b\n    retry: {attempts: 5, max_delay: 3s}\n"
        "  b:\n    command: x.y\n    next: c\n    retry: {attempts: 2, 'on': ['*']}\n"
        "  c: {final: success}\n",
    )
    retry = spec.states["a"].retry
    assert retry == RetrySpec(attempts=5, interval=1.0, backoff=2.0, max_delay=3.0)
    assert retry.on == {"timeout", "connection_lost", "busy"}
    assert [retry.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]
    assert spec.states["b"].retry is not None and spec.states["b"].retry.applies("x", 1)


def test_choices_default_not_last(tmp_path: Path) -> None:
    text = HEAD + states(
        """\
          a:
            choices:
              - next: b
              - if: result
                next: b
              - {iff: x, next: b}
          b: {final: success}
        """
    )
    errors = problems(tmp_path, text)
    assert [(e.line, e.message[:30]) for e in errors] == [
        (9, "the default choice (no if) of "),
        (12, "unknown key 'iff' in a choice "),
    ]
    assert "must be the last one" in errors[0].message


def test_unknown_server_and_no_default(tmp_path: Path) -> None:
    text = """
    servers: {left: "h:1", right: "h:2"}
    command_timeout: 1s
    initial: a
    states:
      a: {command: x.y, next: b}
      b: {command: x.y, server: rihgt, next: c}
      c: {final: success}
    """
    errors = problems(tmp_path, text)
    assert [e.line for e in errors] == [5, 6]
    assert "names no server and there is no default" in errors[0].message
    assert "default_server: NAME (left, right)" in errors[0].message
    assert "unknown server 'rihgt'" in errors[1].message
    assert "did you mean 'right'" in errors[1].message


def test_no_servers_and_bad_servers(tmp_path: Path) -> None:
    only(
        tmp_path,
        "command_timeout: 1s\ninitial: a\nstates:\n  a: {command: x.y, next: b}\n"
        "  b: {final: success}\n",
        4,
        "the workflow has no servers",
    )
    errors = problems(
        tmp_path,
        'servers: {a: "no:host", b: "h:99999"}\ndefault_server: c\ninitial: x\n'
        "states:\n  x: {final: success}\n",
    )
    assert [e.line for e in errors] == [1, 1, 2]
    assert "expected HOST:PORT" in errors[0].message
    assert "default_server 'c' is not one of the servers (a, b)" in errors[2].message


def test_final_values(tmp_path: Path) -> None:
    only(tmp_path, HEAD + "  a: {final: done}\n", 7, "final must be success or failure")
    only(
        tmp_path,
        HEAD + "  a: {final: success, next: a}\n",
        7,
        "unknown key 'next' in final state 'a'",
        "allowed keys: final, description",
    )


def test_yaml_booleans_as_names(tmp_path: Path) -> None:
    errors = problems(
        tmp_path,
        HEAD + "  a: {command: x.y, next: off}\n  off: {final: success}\n",
    )
    assert [e.line for e in errors] == [7, 8]
    assert all("quote it" in e.message for e in errors)


def test_every_problem_is_reported_at_once_sorted_by_line(tmp_path: Path) -> None:
    text = """
    initial: nowhere
    bogus: 1
    states:
      a: {command: x.y}
      b: {wait: soon, next: zz}
      c: {final: maybe}
    """
    errors = problems(tmp_path, text)
    assert [e.line for e in errors] == [1, 2, 4, 4, 4, 5, 5, 6]
    assert len({e.message for e in errors}) == len(errors)
    assert str(errors[0]).startswith(f"{tmp_path / 'wf.yaml'}:1: ")


# --- helpers of the spec -------------------------------------------------------------------


def test_error_routes_precedence() -> None:
    routes = ErrorRoutes({-32001: "by_code"}, {"not_allowed": "by_kind", "busy": "b"}, "any")
    assert routes.route("not_allowed", -32001) == "by_code"
    assert routes.route("not_allowed", None) == "by_kind"
    assert routes.route("timeout", -32002) == "any"
    assert ErrorRoutes().route("timeout", -32002) is None
    assert not ErrorRoutes() and routes


def test_with_servers_and_addresses(tmp_path: Path) -> None:
    spec = load(tmp_path, HEAD + "  a: {command: x.y, next: b}\n  b: {final: success}\n")
    moved = spec.with_servers({"device": "10.0.0.2:9"})
    assert moved.servers == {"device": "10.0.0.2:9"} and spec.servers["device"].endswith("15769")
    with pytest.raises(ValueError, match="unknown server 'other'"):
        spec.with_servers({"other": "h:1"})
    with pytest.raises(ValueError, match="HOST:PORT"):
        spec.with_servers({"device": "h:port"})
    assert spec.with_servers({"device": "h"}).servers == {"device": f"h:{DEFAULT_PORT}"}
    assert parse_address("[::1]:80") == ("::1", 80)
    assert parse_address("pi.local:15769") == ("pi.local", 15769)


def test_format_duration() -> None:
    durations = [format_duration(s) for s in (0.5, 2, 1.5, 120, 90)]
    assert durations == ["500ms", "2s", "1.5s", "2m", "90s"]


# --- check against device descriptions ------------------------------------------------------

DEMO_STATES = ["idle", "calibrating", "fault"]


def _demo(command: str, allowed: list[str], params: dict[str, Any] | None = None) -> CommandInfo:
    entry = {"method": f"demo.{command}", "name": command, "from": allowed, "params": params}
    return CommandInfo.from_json(entry, device="demo", states=DEMO_STATES)


DEMO: dict[str, CommandInfo] = {
    info.method: info
    for info in (
        _demo("led_on", ["idle"], {}),
        _demo("led_off", ["idle"], {}),
        _demo(
            "blink",
            ["idle"],
            {"times": {"type": "integer", "minimum": 1, "maximum": 20, "required": True}},
        ),
        _demo("read_button", ["idle"]),
        _demo("read_sensor", ["idle"]),
        _demo(
            "calibrate",
            ["idle"],
            {
                "steps": {"type": "integer", "minimum": 1, "maximum": 50, "default": 5},
                "delay": {"type": "number", "minimum": 0, "maximum": 2, "default": 0.2},
            },
        ),
        _demo("selftest", ["idle"], {"fail": {"type": "boolean", "default": False}}),
        _demo("reset", ["fault"]),
        _demo("state", DEMO_STATES),
        _demo("never", []),
        _demo("mode", ["idle"], {"mode": {"type": "string", "enum": ["slow", "fast"]}}),
    )
}


#: the shipped workflows that drive the demo device (door.yaml drives the door device)
DEMO_WORKFLOWS = sorted(p for p in WORKFLOWS.glob("*.yaml") if p.name != "door.yaml")


@pytest.mark.parametrize("path", DEMO_WORKFLOWS, ids=lambda p: p.name)
def test_shipped_workflows_fit_the_demo_device(path: Path) -> None:
    spec = load_workflow(path)
    assert check_against(spec, {"*": DEMO}) == []


def test_shipped_workflows_fit_the_shipped_demo_device() -> None:
    device = pytest.importorskip("statemachines.device")
    described = [
        device.load_device(path).describe()
        for path in sorted((CONFIG / "devices").glob("*.yaml"))  # demo, door
    ]
    catalog = catalog_from_discover({"devices": described})  # as from a live server
    for path in sorted(WORKFLOWS.glob("*.yaml")):
        assert check_against(load_workflow(path), {"*": catalog}) == [], path.name


def test_check_against_reads_json_schema_params(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"times": {"type": "integer", "minimum": 1, "maximum": 20}},
        "required": ["times"],
        "additionalProperties": False,
    }
    entry = {"method": "demo.blink", "from": ["idle"], "params": schema}
    catalog = {"demo.blink": CommandInfo.from_json(entry, device="demo")}
    spec = load(
        tmp_path,
        HEAD + "  a: {command: demo.blink, params: {times: 0}, next: b}\n"
        "  b: {command: demo.blink, next: c}\n  c: {final: success}\n",
    )
    found = [(e.line, e.message) for e in check_against(spec, {"device": catalog})]
    assert found == [
        (7, "demo.blink param 'times': must be >= 1, got 0"),
        (8, "demo.blink needs param 'times': add it under params"),
    ]


def test_check_against_reports_commands_and_literal_params(tmp_path: Path) -> None:
    text = HEAD + states(
        """\
          a:
            command: demo.calibrat
            next: b
          b:
            command: demo.calibrate
            params:
              steps: 100
              delay: "0.5"
              speed: 1
            next: c
          c:
            command: demo.blink
            next: d
          d:
            command: demo.never
            next: e
          e:
            command: demo.mode
            params: {mode: medium}
            next: f
          f:
            command: demo.blink
            params: {times: "{{ result.steps * 100 }}"}
            next: g
          g:
            command: rpc.ping
            next: h
          h:
            command: demo.blink
            params: [3, 4]
            next: z
          z: {final: success}
        """
    )
    spec = load(tmp_path, text)
    errors = check_against(spec, {"device": DEMO})
    found = [(e.line, e.message) for e in errors]
    assert all(e.file == spec.path for e in errors)
    assert [line for line, _ in found] == [8, 13, 14, 15, 17, 21, 25, 36]
    text_of = dict(found)
    assert "server 'device' has no command 'demo.calibrat'" in text_of[8]
    assert "did you mean 'demo.calibrate'" in text_of[8]
    assert "param 'steps': must be <= 50, got 100" in text_of[13]
    assert "param 'delay': must be a number, got a string" in text_of[14]
    assert "has no param 'speed'" in text_of[15]
    assert "demo.blink needs param 'times'" in text_of[17]
    assert "demo.never can never run" in text_of[21]
    assert "must be one of 'slow', 'fast'" in text_of[25]
    assert "takes at most 1 params, got 2" in text_of[36]


def test_check_against_rejects_the_aliases_the_server_rejects(tmp_path: Path) -> None:
    # One validator (statemachines.params): a rule the server could not have been configured
    # with (type int, min instead of minimum) is reported, as the device config reports it.
    spec = load(
        tmp_path, HEAD + "  a: {command: demo.n, params: {n: 3}, next: b}\n  b: {final: success}\n"
    )
    for rule, fragment in (
        (
            {"type": "int"},
            "param 'n': unknown type 'int' (types: number, integer, string, boolean)",
        ),
        ({"type": "integer", "min": 1}, "param 'n': unknown key 'min' in a JSON rule"),
    ):
        entry = {"method": "demo.n", "from": ["idle"], "params": {"n": rule}}
        catalog = {"demo.n": CommandInfo.from_json(entry, device="demo")}
        [error] = check_against(spec, {"device": catalog})
        assert error.line == 7 and fragment in error.message, error.message
    device_errors: list[ConfigError] = []
    parse_param_specs({"n": {"type": "int"}}, "dev.yaml", errors=device_errors)
    [device_error] = device_errors
    assert "param 'n': unknown type 'int' (types: number, integer, string, boolean)" in str(
        device_error
    )


def test_check_against_accepts_what_the_server_accepts(tmp_path: Path) -> None:
    # an integer param takes 3.0 (JSON numbers), a plain method's typeless params take anything
    spec = load(
        tmp_path,
        HEAD + "  a: {command: demo.blink, params: {times: 3.0}, next: b}\n"
        "  b: {command: add, params: [1, [2]], next: c}\n  c: {final: success}\n",
    )
    described = {
        "methods": [{"name": "add", "params": [{"name": "a", "required": True}, {"name": "b"}]}]
    }
    catalog = {**DEMO, **catalog_from_discover(described)}
    assert check_against(spec, {"device": catalog}) == []


def test_a_server_without_port_gets_the_default_port(tmp_path: Path) -> None:
    text = HEAD.replace('"127.0.0.1:15769"', "pi") + "  a: {final: success}\n"
    assert load(tmp_path, text).servers == {"device": f"pi:{DEFAULT_PORT}"}


def test_check_against_skips_servers_without_a_catalog(tmp_path: Path) -> None:
    spec = load(tmp_path, HEAD + "  a: {command: nothing.here, next: b}\n  b: {final: success}\n")
    assert check_against(spec, {}) == []
    assert check_against(spec, {"other": DEMO}) == []
    assert len(check_against(spec, {"device": DEMO})) == 1
    assert len(check_against(spec, {"*": DEMO})) == 1  # "*": every server without its own
    assert check_against(spec, {"*": DEMO, "device": {"nothing.here": DEMO["demo.state"]}}) == []


# --- inputs ----------------------------------------------------------------------------------

INPUTS = """
name: t
inputs:
  steps: 3
  label: first
servers: {device: "127.0.0.1:15769"}
command_timeout: 2s
initial: go
states:
  go:
    command: demo.calibrate
    params: {steps: "{{ steps }}"}
    choices:
      - {if: 'result.steps == steps and label != ""', next: done}
      - {next: done}
  done: {final: success}
"""


def test_inputs_are_names_expressions_can_read(tmp_path: Path) -> None:
    spec = load(tmp_path, INPUTS)
    assert dict(spec.inputs) == {"steps": 3, "label": "first"}
    assert spec.run_context({"steps": 5}) == {"result": None, "steps": 5, "label": "first"}
    with pytest.raises(ValueError, match="has no input 'step' \\(inputs: steps, label\\)"):
        spec.run_context({"step": 5})
    with pytest.raises(
        ValueError,
        match="input 'steps' of workflow t takes a number like its default 3, got a string \"abc\"",
    ):
        spec.run_context({"steps": "abc"})
    assert spec.run_context({"steps": 2.5})["steps"] == 2.5  # an integer default takes numbers
    with pytest.raises(ValueError, match="the value nan is not a JSON value"):
        spec.run_context({"steps": float("nan")})


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ("inputs: [steps]", "inputs must map names to default values"),
        ("inputs: {result: 1}", "input 'result' in inputs would shadow the built-in name"),
        ("inputs: {2x: 1}", "input '2x' in inputs must be a name like level"),
        ("inputs: {_x: 1}", "input '_x' in inputs must not start with _"),
        ("inputs: {day: 2024-05-01}", "input 'day': the default datetime.date(2024, 5, 1) is not"),
    ],
)
def test_bad_inputs(tmp_path: Path, inputs: str, fragment: str) -> None:
    text = INPUTS.replace("inputs:\n  steps: 3\n  label: first\n", inputs + "\n")
    text = text.replace('"{{ steps }}"', "3").replace(
        'result.steps == steps and label != ""', "result.steps == 3"
    )
    found = problems(tmp_path, text)
    assert [e.line for e in found] == [2], [str(e) for e in found]
    assert fragment in found[0].message, found[0].message


# --- templated durations --------------------------------------------------------------------

DURATIONS = """
name: t
servers: {device: "127.0.0.1:15769"}
inputs: {pause: 2, limit: 1m, unit: ms}
timeout: "{{ limit }}"
command_timeout: "{{ pause * 3 }}"
initial: a
states:
  a:
    command: demo.read_sensor
    save: reading
    retry: {attempts: 2, interval: "{{ 100 if result is None else result.delay }}{{ unit }}"}
    next: b
  b: {wait: "{{ pause }}", next: c}
  c: {command: demo.led_on, timeout: 5s, next: done}
  done: {final: success}
"""


def test_durations_take_templates_of_inputs_and_context(tmp_path: Path) -> None:
    spec = load(tmp_path, DURATIONS)
    a, b, c = spec.states["a"], spec.states["b"], spec.states["c"]
    assert spec.timeout is None and spec.timeout_template is not None
    assert spec.timeout_template.render({"limit": "1m"}) == 60.0
    assert spec.command_timeout is None  # templated: every state without a timeout has it
    assert a.timeout is None and [(d.field, d.key) for d in a.durations] == [
        ("timeout", "command_timeout"),
        ("retry.interval", "interval"),
    ]
    names = {"pause": 2, "unit": "ms", "result": None}
    live = a.resolved(names)
    assert live.timeout == 6.0 and live.retry is not None and live.retry.interval == 0.1
    assert b.wait is None and b.resolved({"pause": "500ms"}).wait == 0.5
    assert b.targets() == [("after {{ pause }}", "c")]
    # static durations stay plain values, and nothing is rendered for them
    assert c.timeout == 5.0 and c.durations == () and c.resolved({}) is c
    assert CompiledWorkflow(spec).graph_edges()[2] == ("b", "c", "after {{ pause }}")


def test_templated_durations_are_checked_at_load(tmp_path: Path) -> None:
    text = (
        DURATIONS.replace('"{{ limit }}"', '"{{ reading }}"')
        .replace("{{ pause }}", "{{ pasue }}")
        .replace("{{ pause * 3 }}", "{{ pause * }}")
    )
    errors = problems(tmp_path, text)
    assert [e.line for e in errors] == [4, 5, 13], [str(e) for e in errors]
    assert "'reading' has no value when timeout '{{ reading }}' is read" in errors[0].message
    assert "use an input (inputs: limit, pause, unit)" in errors[0].message
    assert "bad expression" in errors[1].message
    assert "'pasue' is never defined" in errors[2].message
    assert "did you mean 'pause'" in errors[2].message


def test_max_delay_takes_no_template(tmp_path: Path) -> None:
    only(
        tmp_path,
        HEAD + "  a:\n    command: x.y\n    next: b\n"
        '    retry: {attempts: 2, max_delay: "{{ result }}"}\n'
        "  b: {final: success}\n",
        10,
        "bad duration for max_delay",
        "takes no {{ }} template",
    )


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_a_duration_is_finite(tmp_path: Path, value: str) -> None:
    only(
        tmp_path, HEAD + f"  a: {{wait: {value}, next: b}}\n  b: {{final: success}}\n", 7, "finite"
    )
