"""Device configs: loading, every validation error (file, line, message), handler references
(resolved by controller.handlers: more in tests/test_handlers.py), catalog."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from controller.handlers import resolve_handlers
from statemachines.device import (
    GPIO_KINDS,
    DeviceSpec,
    GpioActionSpec,
    catalog_from_discover,
    load_device,
    parse_device,
)
from statemachines.source import ConfigErrors

CONFIG = Path(__file__).resolve().parent.parent / "config" / "devices"

BASE = """\
device: door
states: [closed, opening, open, closing, fault]
initial: closed
commands:
  open:
    from: [closed]
    running: opening
    to: open
    timeout: 10s
    params:
      speed: {type: number, min: 0, max: 1, default: 0.5}
    handler: hw:open
  reset: {from: [fault], to: closed, handler: hw:reset}
"""

HW = """\
def open(ctx, speed=0.5):
    return {"speed": speed}


def reset(ctx):
    return {}


async def wait(ctx, seconds=1.0):
    return {}
"""

GPIO = """\
device: board
states: [idle, busy, fault]
gpio:
  led: {kind: led, pin: 17}
  fan: {kind: pwm_output, pin: 18}
  button: {kind: button, pin: 27}
commands:
  light: {from: "*", gpio: {object: led, action: "on"}}
  dim:
    gpio: {object: fan, action: set}
    params:
      value: {type: number, min: 0, max: 1}
"""


def write(tmp_path: Path, text: str, hw: str | None = HW, name: str = "dev.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    if hw is not None:
        (tmp_path / "hw.py").write_text(hw, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, hw: str | None = HW) -> DeviceSpec:
    return load_device(write(tmp_path, text, hw))


def errors(tmp_path: Path, text: str, hw: str | None = HW) -> list[tuple[int, str]]:
    path = write(tmp_path, text, hw)
    with pytest.raises(ConfigErrors) as info:
        load_device(path)
    found = info.value.errors
    assert found
    for error in found:
        assert error.file == str(path)
        assert str(error) == f"{path}:{error.line}: {error.message}"
    return [(e.line, e.message) for e in found]


def handler_errors(tmp_path: Path, text: str, hw: str | None = HW) -> list[tuple[int, str]]:
    """The problems of a config that loads but whose handlers do not resolve."""
    path = write(tmp_path, text, hw)
    spec = load_device(path)
    with pytest.raises(ConfigErrors) as info:
        resolve_handlers(spec)
    found = info.value.errors
    assert found
    for error in found:
        assert error.file == str(path)
        assert str(error) == f"{path}:{error.line}: {error.message}"
    return [(e.line, e.message) for e in found]


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def one_error(tmp_path: Path, text: str, hw: str | None = HW) -> tuple[int, str]:
    found = errors(tmp_path, text, hw)
    assert len(found) == 1, found
    return found[0]


# --- the shipped configs -------------------------------------------------------------------


def test_demo_config_loads_with_the_agreed_commands() -> None:
    spec = load_device(CONFIG / "demo.yaml")
    assert spec.name == "demo"
    assert spec.states == ("idle", "calibrating", "fault")
    assert spec.initial == "idle" and spec.fault_state == "fault"
    assert list(spec.commands) == [
        "led_on",
        "led_off",
        "blink",
        "read_button",
        "read_sensor",
        "calibrate",
        "selftest",
        "reset",
    ]
    cmds = spec.commands
    assert cmds["led_on"].gpio == GpioActionSpec("led", "on", {})
    assert cmds["led_off"].gpio == GpioActionSpec("led", "off", {})
    assert cmds["led_on"].allowed_from is None and cmds["led_off"].allowed_from is None
    assert cmds["read_button"].allowed_from is None and cmds["read_sensor"].allowed_from is None
    assert cmds["read_button"].gpio == GpioActionSpec("button", "read", {})
    assert cmds["read_sensor"].gpio == GpioActionSpec("range", "read", {})
    blink = cmds["blink"]
    assert blink.gpio is not None and blink.gpio.action == "blink"
    times = blink.params["times"]
    assert (times.type, times.min, times.max, times.default) == ("integer", 1, 20, 3)
    calibrate = cmds["calibrate"]
    assert calibrate.allowed_from == ("idle",)
    assert (calibrate.running, calibrate.to, calibrate.timeout) == ("calibrating", "idle", 10.0)
    assert str(calibrate.handler_ref) == "demo_hw:calibrate"
    assert callable(resolve_handlers(spec)["calibrate"])
    steps, delay = calibrate.params["steps"], calibrate.params["delay"]
    assert (steps.type, steps.min, steps.max, steps.default) == ("integer", 1, 50, 5)
    assert (delay.type, delay.min, delay.max, delay.default) == ("number", 0, 2, 0.2)
    selftest = cmds["selftest"]
    assert selftest.allowed_from == ("idle",) and selftest.to is None
    assert selftest.params["fail"].type == "boolean" and selftest.params["fail"].default is False
    assert (cmds["reset"].allowed_from, cmds["reset"].to) == (("fault",), "idle")
    assert {o.kind for o in spec.gpio.values()} == {"led", "button", "distance_sensor"}


def test_door_config_loads() -> None:
    spec = load_device(CONFIG / "door.yaml")
    assert spec.states == ("closed", "opening", "open", "ajar", "closing", "fault")
    assert spec.commands["open"].running == "opening" and spec.commands["open"].to == "open"
    # Ctrl-C during open leaves it ajar, from where close brings it down (issue 11)
    assert spec.commands["open"].cancelled == "ajar"
    assert "ajar" in spec.allowed_states("close")
    assert spec.commands["reset"].allowed_from == ("fault",)
    assert spec.gpio["limit_open"].options["bounce_time"] == pytest.approx(0.02)
    assert spec.gpio["limit_open"].simulate == {
        "active": False,
        "on_when": "motor_up",
        "after": 3.0,
        "off_when": "motor_down",
    }


def test_handler_modules_load_without_touching_sys_path() -> None:
    before = list(sys.path)
    resolve_handlers(load_device(CONFIG / "demo.yaml"))
    resolve_handlers(load_device(CONFIG / "door.yaml"))
    assert sys.path == before


# --- structure and defaults ----------------------------------------------------------------


def test_base_config(tmp_path: Path) -> None:
    spec = load(tmp_path, BASE)
    assert spec.path == str(tmp_path / "dev.yaml")
    opening = spec.commands["open"]
    assert opening.method == "door.open"
    assert opening.timeout == 10.0
    assert resolve_handlers(spec)["open"](None, speed=1) == {"speed": 1}
    assert opening.handler_ref is not None and opening.gpio is None
    assert str(opening.handler_ref) == "hw:open" and opening.handler_ref.line == 12
    assert spec.commands["reset"].timeout is None


def test_cancelled_names_the_state_a_command_cancelled_halfway_ends_in(tmp_path: Path) -> None:
    spec = load(tmp_path, edit(BASE, "    to: open\n", "    to: open\n    cancelled: closed\n"))
    assert spec.commands["open"].cancelled == "closed"
    assert spec.commands["reset"].cancelled is None  # default: fault (when declared)


def test_from_absent_means_every_state_but_fault(tmp_path: Path) -> None:
    text = BASE + "  ping: {handler: hw:reset}\n  any: {from: '*', handler: hw:reset}\n"
    text += "  one: {from: open, handler: hw:reset}\n"
    spec = load(tmp_path, text)
    assert spec.commands["ping"].allowed_from == ("closed", "opening", "open", "closing")
    assert spec.commands["any"].allowed_from is None
    assert spec.allowed_states("any") == list(spec.states)
    assert spec.commands["one"].allowed_from == ("open",)


def test_defaults_initial_fault_and_timeout(tmp_path: Path) -> None:
    text = "device: d\nstates: [a, b]\ntimeout: 1m\ncommands:\n  go: {to: b, handler: hw:reset}\n"
    spec = load(tmp_path, text)
    assert spec.initial == "a"  # the first state
    assert spec.fault_state is None  # no state named fault
    assert spec.commands["go"].timeout == 60.0  # the device's default
    assert spec.commands["go"].allowed_from == ("a", "b")

    text = BASE.replace("initial: closed\n", "initial: closed\nfault: null\n")
    assert load(tmp_path, text).fault_state is None
    text = BASE.replace("initial: closed\n", "initial: closed\nfault: closing\n")
    assert load(tmp_path, text).fault_state == "closing"


def test_gpio_objects_and_actions(tmp_path: Path) -> None:
    spec = load(tmp_path, GPIO, hw=None)
    led = spec.gpio["led"]
    assert (led.kind, led.pins, led.line) == ("led", {"pin": 17}, 4)
    assert led.options == {"active_high": True, "initial_value": False}
    assert spec.gpio["button"].options == {"pull_up": True}
    assert spec.gpio["fan"].options == {"active_high": True, "initial_value": 0.0, "frequency": 100}
    assert spec.commands["light"].gpio == GpioActionSpec("led", "on", {})
    dim = spec.commands["dim"]
    assert dim.gpio == GpioActionSpec("fan", "set", {}) and dim.handler_ref is None
    assert resolve_handlers(spec) == {}
    assert dim.allowed_from == ("idle", "busy")


def test_bare_on_and_off_are_accepted(tmp_path: Path) -> None:
    text = GPIO.replace('action: "on"', "action: on")
    text += "  dark: {gpio: {object: led, action: off}}\n"
    spec = load(tmp_path, text, hw=None)
    assert spec.commands["light"].gpio == GpioActionSpec("led", "on", {})
    assert spec.commands["dark"].gpio == GpioActionSpec("led", "off", {})


def test_action_arguments_take_durations(tmp_path: Path) -> None:
    text = (
        GPIO
        + "  blink: {gpio: {object: led, action: blink, on_time: 150ms, off_time: 1, times: 2}}\n"
    )
    spec = load(tmp_path, text, hw=None)
    action = spec.commands["blink"].gpio
    assert action is not None
    assert action.options == {"on_time": 0.15, "off_time": 1.0, "times": 2}


def test_every_kind_has_documented_actions() -> None:
    assert set(GPIO_KINDS) == {
        "digital_output",
        "led",
        "pwm_output",
        "pwm_led",
        "digital_input",
        "button",
        "distance_sensor",
        "servo",
    }
    assert set(GPIO_KINDS["led"].actions) == {"on", "off", "toggle", "blink", "read"}
    assert set(GPIO_KINDS["pwm_output"].actions) >= {"on", "off", "toggle", "set", "blink", "pulse"}
    assert set(GPIO_KINDS["servo"].actions) == {"set", "min", "mid", "max", "detach", "read"}
    assert set(GPIO_KINDS["button"].actions) == {"read", "wait"}
    assert set(GPIO_KINDS["distance_sensor"].actions) == {"read"}
    docs = (Path(__file__).resolve().parent.parent / "docs" / "devices.md").read_text()
    for kind in GPIO_KINDS.values():
        assert f"`{kind.name}`" in docs
        for action in kind.actions:
            assert f"`{action}`" in docs


# --- handlers ------------------------------------------------------------------------------


def test_handler_in_a_subdirectory_and_async(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(HW)
    text = BASE + "  wait: {handler: pkg.mod:wait, params: {seconds: {type: number, default: 1}}}\n"
    handlers = resolve_handlers(load(tmp_path, text))
    assert handlers["wait"] is not None
    assert handlers["wait"].__name__ == "wait"


def test_handler_falls_back_to_an_importable_module(tmp_path: Path) -> None:
    spec = load(tmp_path, BASE.replace("handler: hw:reset", "handler: json:dumps"))
    assert resolve_handlers(spec)["reset"] is json.dumps


def test_parse_device_resolves_handlers_in_base_dir(tmp_path: Path) -> None:
    (tmp_path / "hw.py").write_text(HW)
    spec = parse_device(BASE, base_dir=tmp_path)
    assert spec.path == "<string>" and resolve_handlers(spec)["open"] is not None
    spec = parse_device(BASE)  # loads: the handler module is only named
    with pytest.raises(ConfigErrors) as info:
        resolve_handlers(spec)  # no directory to look in, and no module `hw` to import
    assert [e.file for e in info.value.errors] == ["<string>", "<string>"]
    assert "no module 'hw'" in info.value.errors[0].message


def test_handler_module_missing(tmp_path: Path) -> None:
    [(line, message)] = handler_errors(tmp_path, BASE.replace("hw:open", "nowhere_xyz:open"))
    assert line == 12
    assert message.startswith("command 'open': handler 'nowhere_xyz:open': no module 'nowhere_xyz'")
    assert str(tmp_path / "nowhere_xyz.py") in message


def test_handler_function_missing(tmp_path: Path) -> None:
    assert handler_errors(tmp_path, BASE.replace("hw:open", "hw:opn")) == [
        (
            12,
            "command 'open': handler 'hw:opn': module 'hw' has no function 'opn' "
            "(functions: open, reset, wait)",
        )
    ]


def test_handler_module_that_fails_to_import(tmp_path: Path) -> None:
    found = handler_errors(tmp_path, BASE, hw="1 / 0\n")
    assert [line for line, _ in found] == [12, 13]  # each command using the module
    for _, message in found:
        assert f"importing {tmp_path / 'hw.py'} failed: ZeroDivisionError" in message


def test_handler_signature_must_take_the_params(tmp_path: Path) -> None:
    [(line, message)] = handler_errors(
        tmp_path, BASE, hw=HW.replace("def open(ctx, speed=0.5)", "def open(ctx)")
    )
    assert line == 12
    assert "handler 'hw:open' cannot be called as open(ctx, speed)" in message


@pytest.mark.parametrize("ref", ["hw", "hw:", ":open", "hw:open:x", "my-hw:open", "42"])
def test_handler_reference_syntax(tmp_path: Path, ref: str) -> None:
    line, message = one_error(tmp_path, BASE.replace("handler: hw:open", f"handler: '{ref}'"))
    assert line == 12 and "'handler' must look like module:function" in message


# --- every validation error kind -----------------------------------------------------------

CASES = [
    # (old, new, line, message)
    (
        "from: [closed]",
        "from: [clsed]",
        6,
        "command 'open': 'from' names unknown state 'clsed' "
        "(states: closed, opening, open, closing, fault)",
    ),
    (
        "running: opening",
        "running: opning",
        7,
        "command 'open': 'running' names unknown state 'opning'",
    ),
    ("to: open", "to: opn", 8, "command 'open': 'to' names unknown state 'opn'"),
    ("initial: closed", "initial: shut", 3, "'initial' names unknown state 'shut'"),
    (
        "initial: closed",
        "initial: closed\nfault: broken",
        4,
        "'fault' names unknown state 'broken'",
    ),
    (
        "timeout: 10s",
        "timeout: 10 seconds",
        9,
        "command 'open': 'timeout': expected a duration like 500ms",
    ),
    (
        "initial: closed",
        "initial: closed\ntimeout: -1",
        4,
        "'timeout': a duration cannot be negative",
    ),
    (
        "states: [closed,",
        "states: [closed, open,",
        2,
        "duplicate state 'open' (first listed on line 2)",
    ),
    (
        "states: [closed,",
        "states: [yes, closed,",
        2,
        "state True must be a non-empty string (YAML reads",
    ),
    (
        "initial: closed",
        "initial: closed\ncolour: red",
        4,
        "unknown key 'colour' (allowed: device, description,",
    ),
    (
        "    to: open",
        "    too: open",
        8,
        "command 'open': unknown key 'too' (allowed: from, running, to,",
    ),
    (
        "    to: open\n",
        "    to: open\n    cancelled: ajar\n",
        9,
        "command 'open': 'cancelled' names unknown state 'ajar' (states: closed,",
    ),
    (
        "    to: open\n",
        "    to: open\n    cancelled: [closed]\n",
        9,
        "command 'open': 'cancelled' must be a state name, got a list",
    ),
    (
        "min: 0, max: 1",
        "min: 0, max: 1, step: 0.1",
        11,
        "command 'open': param 'speed': unknown key 'step' (allowed: type, min, max, choices,",
    ),
    (
        "min: 0, max: 1",
        "min: 2, max: 1",
        11,
        "command 'open': param 'speed': 'min' (2) is greater than",
    ),
    ("type: number", "type: float", 11, "command 'open': param 'speed': unknown type 'float'"),
    (
        "  open:\n",
        "  door.open:\n",
        5,
        "command name 'door.open' must be an identifier (letters, digits, _; no dots)",
    ),
    (
        "  reset:",
        "  state:",
        13,
        "command name 'state' is reserved: every device answers 'door.state' itself",
    ),
    (
        "    handler: hw:open\n",
        "",
        5,
        "command 'open': needs a 'handler' or a 'gpio' action: give exactly one",
    ),
    (
        "    handler: hw:open\n",
        "    handler: hw:open\n    gpio: {object: led, action: 'on'}\n",
        5,
        "command 'open': has both 'handler' and 'gpio'",
    ),
    (
        "running: opening",
        "running: fault",
        7,
        "command 'open': 'running' cannot be the fault state 'fault'",
    ),
    (
        "from: [closed]",
        "from: []",
        6,
        "command 'open': 'from' must be a state, a list of states or \"*\"",
    ),
    ("from: [closed]", "from: [closed, '*']", 6, "command 'open': write from: \"*\" on its own"),
    (
        "from: [closed]",
        "from: [true]",
        6,
        "command 'open': 'from' entry True must be a state name (YAML reads bare on/off",
    ),
    (
        "speed: {",
        "ctx: {",
        11,
        "command 'open': param name 'ctx' is reserved for the handler's context",
    ),
    (
        "device: door",
        "device: my.door",
        1,
        "'device' must be a name of letters, digits, _ and - (no dots)",
    ),
    ("device: door", "device: rpc", 1, "'rpc' is reserved"),
    ("device: door\n", "", 1, "missing 'device'"),
    (
        "states: [closed, opening, open, closing, fault]\n",
        "states: []\n",
        2,
        "'states' must be a non-empty list",
    ),
    ("commands:", "commands: 3\nx:", 4, "'commands' must be a mapping"),
]


@pytest.mark.parametrize(("old", "new", "line", "message"), CASES)
def test_validation_errors(tmp_path: Path, old: str, new: str, line: int, message: str) -> None:
    found = errors(tmp_path, edit(BASE, old, new))
    assert (line, message) in [(ln, m[: len(message)]) for ln, m in found], found


def test_bad_yaml_is_reported_with_its_line(tmp_path: Path) -> None:
    line, message = one_error(tmp_path, BASE.replace("from: [closed]", "from: *"))
    assert line == 6 and message.startswith("invalid YAML")


def test_all_problems_are_collected_in_line_order(tmp_path: Path) -> None:
    text = edit(
        edit(edit(BASE, "to: open", "to: opn"), "from: [closed]", "from: [x]"),
        "hw:reset",
        "hw.reset",
    )
    found = errors(tmp_path, text)
    assert [line for line, _ in found] == [6, 8, 13]


GPIO_CASES = [
    (
        "kind: led, pin: 17",
        "kind: lamp, pin: 17",
        4,
        "gpio 'led': unknown kind 'lamp' (kinds: digital_output, led,",
    ),
    ("kind: led, pin: 17", "pin: 17", 4, "gpio 'led': missing 'kind'"),
    (
        "kind: led, pin: 17",
        "kind: led",
        4,
        "gpio 'led': missing 'pin' (a BCM GPIO number such as 17",
    ),
    (
        "kind: led, pin: 17",
        "kind: led, pin: 40",
        4,
        "gpio 'led': 'pin': 40 is not a GPIO number (0-27, BCM numbering)",
    ),
    (
        "kind: led, pin: 17",
        "kind: led, pin: 18",
        5,
        "gpio 'fan': pin 18 is already used by 'led' (line 4)",
    ),
    (
        "kind: led, pin: 17",
        "kind: led, pin: GPIO18",
        5,
        "gpio 'fan': pin 18 is already used by 'led'",
    ),
    (
        "kind: led, pin: 17",
        "kind: led, pin: 17, colour: red",
        4,
        "gpio 'led': unknown key 'colour' (allowed: kind, pin,",
    ),
    (
        "kind: led, pin: 17",
        "kind: led, pin: 17, simulate: {}",
        4,
        "gpio 'led': unknown key 'simulate' "
        "(allowed: kind, pin, active_high, initial_value, description); "
        "only input objects",
    ),
    (
        "kind: led, pin: 17",
        "kind: led, pin: 17, active_high: 1",
        4,
        "gpio 'led': option 'active_high': must be true or false",
    ),
    (
        "kind: button, pin: 27",
        "kind: button, pin: 27, bounce_time: soon",
        6,
        "gpio 'button': 'bounce_time': expected",
    ),
    (
        "kind: button, pin: 27",
        "kind: button, pin: 27, pull_up: null",
        6,
        "gpio 'button': 'pull_up: null' (floating input)",
    ),
    (
        "kind: button, pin: 27",
        "kind: button, pin: 27, active_state: true",
        6,
        "gpio 'button': 'active_state' only applies",
    ),
    (
        "kind: button, pin: 27",
        "kind: button, pin: 27, simulate: {pressed: true, every: 1s, hold: 2s}",
        6,
        "gpio 'button': simulate: 'hold' must be shorter than 'every'",
    ),
    (
        "kind: button, pin: 27",
        "kind: button, pin: 27, simulate: {presed: true}",
        6,
        "gpio 'button': simulate: unknown key 'presed' "
        "(allowed: pressed, every, hold, on_when, after, off_when)",
    ),
    (
        "kind: button, pin: 27",
        "kind: button, pin: 27, simulate: {on_when: button}",
        6,
        "gpio 'button': simulate 'on_when' must name an output object "
        "(outputs: led, fan), got 'button'",
    ),
    (
        'action: "on"',
        'action: "shine"',
        8,
        "command 'light': unknown action 'shine' for led 'led' "
        "(actions: on, off, toggle, blink, read)",
    ),
    (
        "object: led",
        "object: lde",
        8,
        "command 'light': gpio object 'lde' is not declared (objects: led, fan, button)",
    ),
    (
        'action: "on"}',
        'action: "on", times: 3}',
        8,
        "command 'light': gpio action 'on' of 'led' has no argument 'times' (arguments: none)",
    ),
    (
        "value: {type: number",
        "level: {type: number",
        11,
        "command 'dim': param 'level' is not an argument of gpio action 'set' of 'fan'",
    ),
    (
        "value: {type: number, min: 0, max: 1}",
        "value: {type: string}",
        11,
        "command 'dim': param 'value' must be of type number",
    ),
    (
        "{type: number, min: 0, max: 1}",
        "{type: number, required: false}",
        11,
        "command 'dim': param 'value' must be required or have a default",
    ),
    (
        "    params:\n      value: {type: number, min: 0, max: 1}\n",
        "",
        10,
        "command 'dim': gpio action 'set' of 'fan' needs 'value'",
    ),
    (
        "action: set}",
        "action: set, value: 2}",
        10,
        "command 'dim': gpio action 'set' of 'fan': argument 'value': must be <= 1, got 2",
    ),
    (
        "action: set}",
        "action: set, value: 1}",
        11,
        "command 'dim': 'value' is both fixed in the gpio action and a param",
    ),
]


@pytest.mark.parametrize(("old", "new", "line", "message"), GPIO_CASES)
def test_gpio_validation_errors(
    tmp_path: Path, old: str, new: str, line: int, message: str
) -> None:
    found = errors(tmp_path, edit(GPIO, old, new), hw=None)
    assert (line, message) in [(ln, m[: len(message)]) for ln, m in found], found


def test_distance_sensor_simulation_rules(tmp_path: Path) -> None:
    base = GPIO.replace(
        "  button: {kind: button, pin: 27}\n",
        "  button: {kind: button, pin: 27}\n"
        "  range: {kind: distance_sensor, echo: 24, trigger: 23, SIM}\n",
    )
    ok = load(tmp_path, base.replace("SIM", "simulate: {range: [0.2, 1.5]}"), hw=None)
    assert ok.gpio["range"].simulate == {"range": (0.2, 1.5), "period": 10.0}
    assert ok.gpio["range"].pins == {"echo": 24, "trigger": 23}
    ok = load(tmp_path, base.replace("SIM", "simulate: {distance: 0.4}"), hw=None)
    assert ok.gpio["range"].simulate == {"distance": 0.4}
    for sim, message in [
        ("simulate: {}", "give either 'distance' (metres) or 'range: [min, max]'"),
        ("simulate: {range: [2, 1]}", "'range' must be [min, max] in metres (0-10, min <= max)"),
        ("simulate: {distance: 0.4, period: 1s}", "'period' only applies with 'range'"),
        ("simulate: {distance: far}", "'distance' must be metres between 0 and 10"),
    ]:
        [(line, text)] = errors(tmp_path, base.replace("SIM", sim), hw=None)
        assert line == 7 and text == f"gpio 'range': simulate: {message}"
    [(line, text)] = errors(tmp_path, base.replace("echo: 24, ", "").replace(", SIM", ""), hw=None)
    assert line == 7 and "missing 'echo'" in text


# --- catalog and describe ------------------------------------------------------------------


def test_catalog(tmp_path: Path) -> None:
    spec = load(tmp_path, BASE)
    catalog = spec.catalog()
    assert set(catalog) == {"door.open", "door.reset", "door.state"}
    entry = catalog["door.open"]
    assert entry.device == "door" and entry.command == "open"
    assert list(entry.allowed_from) == ["closed"]
    assert list(entry.states) == list(spec.states)
    assert entry.params["speed"] == {
        "type": "number",
        "required": False,
        "minimum": 0,
        "maximum": 1,
        "default": 0.5,
    }
    state = catalog["door.state"]
    assert list(state.allowed_from) == list(spec.states) and state.params == {}
    json.dumps({method: info.to_json() for method, info in catalog.items()})


def test_describe_is_json() -> None:
    spec = load_device(CONFIG / "door.yaml")
    described = json.loads(json.dumps(spec.describe()))
    assert described["name"] == "door" and described["fault"] == "fault"
    assert described["initial"] == "closed" and described["states"] == list(spec.states)
    names = [c["name"] for c in described["commands"]]
    assert names[-1] == "state" and "open" in names
    opening = described["commands"][names.index("open")]
    assert opening == {
        "name": "open",
        "method": "door.open",
        "from": ["closed"],
        "running": "opening",
        "to": "open",
        # "ajar" once DeviceSpec.command_infos passes CommandSpec.cancelled on
        "cancelled": spec.catalog()["door.open"].cancelled,
        "timeout": 30.0,
        "params": opening["params"],
        "description": "Run the door up until the open limit switch closes.",
    }
    assert opening["params"]["max_travel"]["default"] == 15


def test_catalog_from_discover_round_trips() -> None:
    # a statelink 1.0 answer (top-level "devices"); tests/test_openrpc.py reads today's
    spec = load_device(CONFIG / "door.yaml")
    described = {
        "methods": [
            {"name": "rpc.stats", "params": []},
            {"name": "add", "params": [{"name": "a", "required": True}, {"name": "b"}]},
            "junk",
        ],
        "devices": [json.loads(json.dumps(spec.describe()))],
    }
    catalog = catalog_from_discover(described)
    expected = spec.catalog()
    assert {m: catalog[m] for m in expected} == expected
    assert catalog["add"].allowed_from == ("*",) and catalog["add"].device is None
    assert catalog["add"].params == {"a": {"required": True}, "b": {"required": False}}
    assert "rpc.stats" not in catalog
    assert catalog_from_discover({}) == {}


def test_a_broken_gpio_object_is_reported_once_not_at_every_command(tmp_path: Path) -> None:
    found = errors(tmp_path, edit(GPIO, "kind: led, pin: 17", "kind: lamp, pin: 17"), hw=None)
    [(_, message)] = found  # not also "command 'light': gpio object 'led' is not declared"
    assert message.startswith("gpio 'led': unknown kind 'lamp'")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("initial: closed", "initail: closed", "unknown key 'initail' (allowed: "),
        ("    timeout: 10s", "    timout: 10s", "command 'open': unknown key 'timout' (allowed: "),
    ],
)
def test_unknown_device_keys_say_did_you_mean(old: str, new: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_device(BASE.replace(old, new, 1), "door.yaml")
    text = str(info.value)
    assert message in text
    right = old.strip().split(":")[0]
    assert f"(did you mean {right!r}?)" in text
