"""Device configs -> :class:`DeviceSpec`, and :class:`DeviceMachine`, a device's live state.

A device config (see ``docs/devices.md``) names the device, its states and its commands; each
command is an event of the device's state machine and runs a Python handler or a built-in
GPIO action. :func:`load_device` / :func:`parse_device` check everything at load time and
report *all* problems as :class:`~statemachines.source.ConfigErrors`, each pointing at the
line to fix. Pure: gpiozero is never imported here (``controller.gpio`` does the I/O).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from transitions import Machine

from .durations import parse_duration
from .params import ParamError, ParamSpec, check_value, parse_param_specs, schema_to_json
from .source import ConfigError, ConfigErrors, describe_type, load_yaml, parse_yaml
from .source import line_of as _line_of

#: Every device answers ``<device>.state`` itself; no config may declare it.
STATE_COMMAND = "state"

DEVICE_KEYS = ("device", "description", "states", "initial", "fault", "timeout", "gpio", "commands")
COMMAND_KEYS = ("from", "running", "to", "timeout", "params", "handler", "gpio", "description")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEVICE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_HANDLER = re.compile(
    r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):([A-Za-z_][A-Za-z0-9_]*)$"
)
_BOOL_HINT = " (YAML reads bare on/off/yes/no/true/false as booleans: quote it)"


# --- the built-in GPIO kinds ---------------------------------------------------------------


def _p(
    name: str,
    type: str,
    *,
    min: float | None = None,
    max: float | None = None,
    default: Any = None,
    required: bool | None = None,
    description: str = "",
) -> ParamSpec:
    return ParamSpec(
        name=name,
        type=type,
        min=min,
        max=max,
        required=(default is None) if required is None else required,
        default=default,
        description=description,
    )


def _specs(*specs: ParamSpec) -> dict[str, ParamSpec]:
    return {spec.name: spec for spec in specs}


@dataclass(frozen=True)
class GpioKind:
    """A built-in GPIO object kind: its pins, options (gpiozero keyword arguments), actions
    (name -> argument specs) and the keys of its ``simulate:`` block (None: no simulation)."""

    name: str
    pins: tuple[str, ...]
    options: dict[str, ParamSpec]
    actions: dict[str, dict[str, ParamSpec]]
    simulate: tuple[str, ...] | None = None
    output: bool = False


#: Option, argument and simulate keys given as durations ("200ms", "2s") or plain seconds.
DURATION_KEYS = frozenset(
    {
        "on_time", "off_time", "fade_in_time", "fade_out_time", "timeout", "bounce_time",
        "min_pulse_width", "max_pulse_width", "frame_width", "every", "hold", "after", "period",
    }
)  # fmt: skip

_TIMES = _p(
    "times",
    "integer",
    min=1,
    max=100000,
    required=False,
    description="how many times (absent: forever)",
)
_WAIT = _p("wait", "boolean", default=False, description="block until finished (needs times)")


def _blink(pwm: bool) -> dict[str, ParamSpec]:
    specs = [
        _p("on_time", "number", min=0.01, max=3600, default=0.5, description="seconds on"),
        _p("off_time", "number", min=0.01, max=3600, default=0.5, description="seconds off"),
    ]
    if pwm:
        specs += [
            _p("fade_in_time", "number", min=0, max=3600, default=0.0),
            _p("fade_out_time", "number", min=0, max=3600, default=0.0),
        ]
    return _specs(*specs, _TIMES, _WAIT)


_DIGITAL_OUT = GpioKind(
    name="digital_output",
    pins=("pin",),
    options=_specs(
        _p("active_high", "boolean", default=True),
        _p("initial_value", "boolean", default=False),
    ),
    actions={"on": {}, "off": {}, "toggle": {}, "blink": _blink(False), "read": {}},
    output=True,
)
_PWM_OUT = GpioKind(
    name="pwm_output",
    pins=("pin",),
    options=_specs(
        _p("active_high", "boolean", default=True),
        _p("initial_value", "number", min=0, max=1, default=0.0),
        _p("frequency", "integer", min=1, max=100000, default=100),
    ),
    actions={
        "on": {},
        "off": {},
        "toggle": {},
        "set": _specs(_p("value", "number", min=0, max=1, description="duty cycle 0..1")),
        "blink": _blink(True),
        "pulse": _specs(
            _p("fade_in_time", "number", min=0.01, max=3600, default=1.0),
            _p("fade_out_time", "number", min=0.01, max=3600, default=1.0),
            _TIMES,
            _WAIT,
        ),
        "read": {},
    },
    output=True,
)
_INPUT_OPTIONS = (
    _p("active_state", "boolean", required=False, description="only with pull_up: null"),
    _p("bounce_time", "number", min=0, max=10, required=False),
)
_INPUT_SIMULATE = ("every", "hold", "on_when", "after", "off_when")
_WAIT_TIMEOUT = _p("timeout", "number", min=0.001, max=3600, default=10.0)

GPIO_KINDS: dict[str, GpioKind] = {
    "digital_output": _DIGITAL_OUT,
    "led": GpioKind(
        "led", _DIGITAL_OUT.pins, _DIGITAL_OUT.options, _DIGITAL_OUT.actions, output=True
    ),
    "pwm_output": _PWM_OUT,
    "pwm_led": GpioKind("pwm_led", _PWM_OUT.pins, _PWM_OUT.options, _PWM_OUT.actions, output=True),
    "digital_input": GpioKind(
        name="digital_input",
        pins=("pin",),
        options=_specs(_p("pull_up", "boolean", default=False), *_INPUT_OPTIONS),
        actions={
            "read": {},
            "wait": _specs(_p("active", "boolean", default=True), _WAIT_TIMEOUT),
        },
        simulate=("active", *_INPUT_SIMULATE),
    ),
    "button": GpioKind(
        name="button",
        pins=("pin",),
        options=_specs(_p("pull_up", "boolean", default=True), *_INPUT_OPTIONS),
        actions={
            "read": {},
            "wait": _specs(_p("pressed", "boolean", default=True), _WAIT_TIMEOUT),
        },
        simulate=("pressed", *_INPUT_SIMULATE),
    ),
    "distance_sensor": GpioKind(
        name="distance_sensor",
        pins=("echo", "trigger"),
        options=_specs(
            _p("max_distance", "number", min=0.01, max=10, default=1.0, description="metres"),
            _p("queue_len", "integer", min=1, max=50, default=9),
        ),
        actions={"read": _specs(_p("timeout", "number", min=0.01, max=60, default=2.0))},
        simulate=("distance", "range", "period"),
    ),
    "servo": GpioKind(
        name="servo",
        pins=("pin",),
        options=_specs(
            _p("initial_value", "number", min=-1, max=1, default=0.0),
            _p("min_pulse_width", "number", min=0.0001, max=0.1, default=0.001),
            _p("max_pulse_width", "number", min=0.0001, max=0.1, default=0.002),
            _p("frame_width", "number", min=0.001, max=0.5, default=0.02),
        ),
        actions={
            "set": _specs(_p("value", "number", min=-1, max=1, description="position -1..1")),
            "min": {},
            "mid": {},
            "max": {},
            "detach": {},
            "read": {},
        },
        output=True,
    ),
}


# --- specs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpioObjectSpec:
    """A named GPIO object. ``pins`` maps pin roles (``pin``, or ``echo``/``trigger``) to pin
    numbers or names; ``options`` are gpiozero keyword arguments (defaults filled);
    ``simulate`` is the normalised ``simulate:`` block (durations in seconds) or None."""

    name: str
    kind: str
    pins: dict[str, int | str]
    options: dict[str, Any]
    simulate: dict[str, Any] | None
    line: int
    description: str = ""


@dataclass(frozen=True)
class GpioActionSpec:
    """A command's built-in GPIO action; ``options`` are the arguments fixed in the config."""

    object: str
    action: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommandSpec:
    """One command. ``allowed_from`` None means every state; ``timeout`` is the effective one
    (the command's, else the device's, else None); exactly one of ``handler``/``gpio`` is set."""

    name: str
    method: str
    allowed_from: tuple[str, ...] | None
    running: str | None
    to: str | None
    timeout: float | None
    params: dict[str, ParamSpec]
    handler: Callable[..., Any] | None
    handler_ref: str | None
    gpio: GpioActionSpec | None
    description: str = ""
    line: int = 0


@dataclass(frozen=True)
class DeviceSpec:
    """A loaded, valid device config."""

    name: str
    path: str
    states: tuple[str, ...]
    initial: str
    fault_state: str | None
    timeout: float | None
    commands: dict[str, CommandSpec]
    gpio: dict[str, GpioObjectSpec]
    description: str = ""

    def allowed_states(self, command: str) -> list[str]:
        """The states ``command`` may start in (``"*"`` expanded); KeyError if unknown."""
        if command == STATE_COMMAND:
            return list(self.states)
        allowed = self.commands[command].allowed_from
        return list(self.states) if allowed is None else list(allowed)

    def catalog(self) -> dict[str, dict[str, Any]]:
        """Wire method -> what the server needs to route and check it (``<device>.state`` too)."""
        out: dict[str, dict[str, Any]] = {}
        for name, cmd in self.commands.items():
            out[cmd.method] = {
                "device": self.name,
                "command": name,
                "from": self.allowed_states(name),
                "params": schema_to_json(cmd.params),
                "states": list(self.states),
                "timeout": cmd.timeout,
                "description": cmd.description,
            }
        out[f"{self.name}.{STATE_COMMAND}"] = {
            "device": self.name,
            "command": STATE_COMMAND,
            "from": list(self.states),
            "params": schema_to_json({}),
            "states": list(self.states),
            "timeout": None,
            "description": "the device's current state",
        }
        return out

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for ``rpc.discover``."""
        commands: list[dict[str, Any]] = []
        for name, cmd in self.commands.items():
            commands.append(
                {
                    "name": name,
                    "method": cmd.method,
                    "from": self.allowed_states(name),
                    "running": cmd.running,
                    "to": cmd.to,
                    "timeout": cmd.timeout,
                    "params": schema_to_json(cmd.params),
                    "description": cmd.description,
                }
            )
        commands.append(
            {
                "name": STATE_COMMAND,
                "method": f"{self.name}.{STATE_COMMAND}",
                "from": list(self.states),
                "running": None,
                "to": None,
                "timeout": None,
                "params": schema_to_json({}),
                "description": "the device's current state",
            }
        )
        return {
            "name": self.name,
            "description": self.description,
            "states": list(self.states),
            "initial": self.initial,
            "fault": self.fault_state,
            "timeout": self.timeout,
            "commands": commands,
            "gpio": {
                name: {"kind": obj.kind, **obj.pins, "description": obj.description}
                for name, obj in self.gpio.items()
            },
        }


def catalog_from_discover(described: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Rebuild a catalog (the shape of :meth:`DeviceSpec.catalog`) from an ``rpc.discover``
    answer, to check workflows against a live server.

    Device commands come from its ``devices`` list (each a :meth:`DeviceSpec.describe`); the
    server's other methods, except ``rpc.*``, from ``methods``, with ``"from": ["*"]`` and
    ``"device": None``. Malformed entries are skipped.
    """
    catalog: dict[str, dict[str, Any]] = {}
    for device in described.get("devices") or ():
        if not isinstance(device, Mapping):
            continue
        states = list(device.get("states") or ())
        for cmd in device.get("commands") or ():
            if not isinstance(cmd, Mapping) or not isinstance(cmd.get("method"), str):
                continue
            params = cmd.get("params")
            catalog[cmd["method"]] = {
                "device": device.get("name"),
                "command": cmd.get("name"),
                "from": list(cmd.get("from") or ()),
                "params": dict(params) if isinstance(params, Mapping) else {},
                "states": states,
                "timeout": cmd.get("timeout"),
                "description": cmd.get("description") or "",
            }
    for method in described.get("methods") or ():
        if not isinstance(method, Mapping):
            continue
        name = method.get("name")
        if not isinstance(name, str) or name.startswith("rpc.") or name in catalog:
            continue
        rules: dict[str, Any] = {}
        for param in method.get("params") or ():
            if isinstance(param, Mapping) and isinstance(param.get("name"), str):
                rule = dict(param.get("schema") or {})
                rule.setdefault("required", bool(param.get("required")))
                rules[param["name"]] = rule
        catalog[name] = {
            "device": None,
            "command": name,
            "from": ["*"],
            "params": rules,
            "states": [],
            "timeout": method.get("timeout"),
            "description": method.get("description") or "",
        }
    return catalog


# --- loading -------------------------------------------------------------------------------


def load_device(path: str | Path) -> DeviceSpec:
    """Load a device config file; handler modules are looked up next to it first.

    Raises :class:`ConfigErrors` with every problem found.
    """
    data = load_yaml(path)
    return _Parser(str(path), Path(path).resolve().parent).build(data)


def parse_device(
    text: str, file: str = "<string>", *, base_dir: str | Path | None = None
) -> DeviceSpec:
    """Parse a device config from text. Handler files are looked up in ``base_dir`` (default:
    the directory of ``file`` unless it is a ``<name>`` placeholder), then imported normally."""
    if base_dir is None and not file.startswith("<"):
        base_dir = Path(file).resolve().parent
    data = parse_yaml(text, file)
    return _Parser(file, Path(base_dir) if base_dir is not None else None).build(data)


def _listing(names: Any) -> str:
    return ", ".join(str(n) for n in names) or "none"


class _Parser:
    """Builds a DeviceSpec from YAML data, collecting every problem."""

    def __init__(self, file: str, base_dir: Path | None) -> None:
        self.file = file
        self.base_dir = base_dir
        self.errors: list[ConfigError] = []
        self.states: tuple[str, ...] = ()
        self.fault: str | None = None
        self.device = "?"
        #: gpio objects declared with errors (already reported): commands using them are not
        #: reported again as "not declared"
        self.broken_objects: set[str] = set()

    def err(self, line: int, message: str) -> None:
        self.errors.append(ConfigError(self.file, line or 1, message))

    def unknown_keys(self, node: Mapping[Any, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in node:
            if key not in allowed:
                self.err(
                    _line_of(node, key),
                    f"{where}unknown key {key!r} (allowed: {', '.join(allowed)})",
                )

    def duration(self, node: Mapping[Any, Any], key: str, where: str) -> float | None:
        value = node.get(key)
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.err(_line_of(node, key), f"{where}'{key}': {exc}")
            return None

    def state_ref(
        self, node: Mapping[Any, Any], key: str, where: str, line: int | None = None
    ) -> str | None:
        value = node.get(key)
        at = line if line is not None else _line_of(node, key)
        if value is None:
            return None
        if not isinstance(value, str):
            hint = _BOOL_HINT if isinstance(value, bool) else ""
            self.err(at, f"{where}'{key}' must be a state name, got {describe_type(value)}{hint}")
            return None
        if value not in self.states:
            self.err(
                at,
                f"{where}'{key}' names unknown state {value!r} (states: {_listing(self.states)})",
            )
            return None
        return value

    # -- device ---------------------------------------------------------------------------

    def build(self, data: Any) -> DeviceSpec:
        if not isinstance(data, Mapping):
            self.err(
                _line_of(data) or 1,
                f"a device config must be a mapping with keys {', '.join(DEVICE_KEYS)}, "
                f"got {describe_type(data)}",
            )
            raise ConfigErrors(self.errors)
        self.unknown_keys(data, DEVICE_KEYS, "")
        name = self.device_name(data)
        description = self.text(data, "description", "")
        self.states = self.parse_states(data)
        initial = self.parse_initial(data)
        self.fault = self.parse_fault(data)
        timeout = self.duration(data, "timeout", "")
        gpio = self.parse_gpio(data)
        commands = self.parse_commands(data, name, timeout, gpio)
        if self.errors:
            self.errors.sort(key=lambda e: e.line)
            raise ConfigErrors(self.errors)
        assert initial is not None
        return DeviceSpec(
            name=name,
            path=self.file,
            states=self.states,
            initial=initial,
            fault_state=self.fault,
            timeout=timeout,
            commands=commands,
            gpio=gpio,
            description=description,
        )

    def text(self, node: Mapping[Any, Any], key: str, where: str) -> str:
        value = node.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            self.err(
                _line_of(node, key), f"{where}'{key}' must be a string, got {describe_type(value)}"
            )
            return ""
        return value.strip()

    def device_name(self, data: Mapping[Any, Any]) -> str:
        name = data.get("device")
        if name is None:
            self.err(_line_of(data), "missing 'device': the device's name, e.g. device: door")
            return self.device
        if not isinstance(name, str) or not _DEVICE_NAME.match(name):
            self.err(
                _line_of(data, "device"),
                f"'device' must be a name of letters, digits, _ and - (no dots), got {name!r}",
            )
            return self.device
        if name == "rpc":
            self.err(
                _line_of(data, "device"),
                "'rpc' is reserved for the server's own methods: rename the device",
            )
        self.device = name
        return name

    def parse_states(self, data: Mapping[Any, Any]) -> tuple[str, ...]:
        raw = data.get("states")
        if raw is None:
            self.err(
                _line_of(data),
                "missing 'states': a list of state names, e.g. states: [idle, busy, fault]",
            )
            return ()
        if not isinstance(raw, list) or not raw:
            self.err(
                _line_of(data, "states"),
                f"'states' must be a non-empty list of names, got {describe_type(raw)}",
            )
            return ()
        seen: dict[str, int] = {}
        for index, state in enumerate(raw):
            at = _line_of(raw, index)
            if not isinstance(state, str) or not state.strip():
                hint = _BOOL_HINT if isinstance(state, bool) else ""
                self.err(at, f"state {state!r} must be a non-empty string{hint}")
            elif state == "*" or state.strip() != state:
                self.err(
                    at,
                    f"state {state!r}: '*' and surrounding spaces are not allowed in state names",
                )
            elif state in seen:
                self.err(at, f"duplicate state {state!r} (first listed on line {seen[state]})")
            else:
                seen[state] = at
        return tuple(seen)

    def parse_initial(self, data: Mapping[Any, Any]) -> str | None:
        if "initial" not in data:
            return self.states[0] if self.states else None
        return self.state_ref(data, "initial", "")

    def parse_fault(self, data: Mapping[Any, Any]) -> str | None:
        if "fault" not in data:
            return "fault" if "fault" in self.states else None
        return self.state_ref(data, "fault", "")

    # -- gpio objects ---------------------------------------------------------------------

    def parse_gpio(self, data: Mapping[Any, Any]) -> dict[str, GpioObjectSpec]:
        raw = data.get("gpio")
        objects: dict[str, GpioObjectSpec] = {}
        if raw is None:
            return objects
        if not isinstance(raw, Mapping):
            self.err(
                _line_of(data, "gpio"),
                f"'gpio' must be a mapping of name -> object, got {describe_type(raw)}",
            )
            return objects
        used_pins: dict[Any, tuple[str, int]] = {}
        for name, body in raw.items():
            at = _line_of(raw, name)
            if not isinstance(name, str) or not _NAME.match(name):
                self.err(
                    at, f"gpio object name {name!r} must be an identifier (letters, digits, _)"
                )
                continue
            obj = self.gpio_object(name, body, at, used_pins)
            if obj is not None:
                objects[name] = obj
            else:
                self.broken_objects.add(name)
        # simulate links (on_when/off_when) need every object parsed first
        for obj in objects.values():
            sim = obj.simulate or {}
            for key in ("on_when", "off_when"):
                target = sim.get(key)
                if target is None:
                    continue
                other = objects.get(target)
                if other is None or not GPIO_KINDS[other.kind].output:
                    outputs = [n for n, o in objects.items() if GPIO_KINDS[o.kind].output]
                    self.err(
                        obj.line,
                        f"gpio '{obj.name}': simulate '{key}' must name an output object "
                        f"(outputs: {_listing(outputs)}), got {target!r}",
                    )
        return objects

    def gpio_object(
        self, name: str, body: Any, at: int, used_pins: dict[Any, tuple[str, int]]
    ) -> GpioObjectSpec | None:
        where = f"gpio '{name}': "
        if not isinstance(body, Mapping):
            self.err(
                at,
                f"{where}expected a mapping like {{kind: led, pin: 17}}, got {describe_type(body)}",
            )
            return None
        kind_name = body.get("kind")
        if kind_name not in GPIO_KINDS:
            what = "missing 'kind'" if kind_name is None else f"unknown kind {kind_name!r}"
            self.err(_line_of(body, "kind") or at, f"{where}{what} (kinds: {_listing(GPIO_KINDS)})")
            return None
        kind = GPIO_KINDS[kind_name]
        allowed = ("kind", *kind.pins, *kind.options, "description", "simulate")
        if kind.simulate is None:
            allowed = allowed[:-1]
        ok = True
        for key in body:
            if key not in allowed:
                hint = ""
                if key == "simulate":
                    hint = "; only input objects (button, digital_input, distance_sensor) simulate"
                self.err(
                    _line_of(body, key),
                    f"{where}unknown key {key!r} (allowed: {', '.join(allowed)}){hint}",
                )
                ok = False
        pins: dict[str, int | str] = {}
        for role in kind.pins:
            pin = self.pin(body, role, where, at, name, used_pins)
            if pin is None:
                ok = False
            else:
                pins[role] = pin
        options = self.options(body, kind, where)
        if options is None:
            ok = False
        simulate = None
        if kind.simulate is not None and body.get("simulate") is not None:
            simulate = self.simulate(body, kind, where)
        description = self.text(body, "description", where)
        if not ok or options is None:
            return None
        return GpioObjectSpec(name, kind.name, pins, options, simulate, at, description)

    def pin(
        self,
        body: Mapping[Any, Any],
        role: str,
        where: str,
        at: int,
        owner: str,
        used_pins: dict[Any, tuple[str, int]],
    ) -> int | str | None:
        if role not in body:
            self.err(
                at,
                f"{where}missing '{role}' (a BCM GPIO number such as 17, or a name like 'GPIO17')",
            )
            return None
        value = body[role]
        pat = _line_of(body, role)
        if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
            self.err(pat, f"{where}'{role}' must be a GPIO number or pin name, got {value!r}")
            return None
        if isinstance(value, int) and not 0 <= value <= 27:
            self.err(pat, f"{where}'{role}': {value} is not a GPIO number (0-27, BCM numbering)")
            return None
        key: Any = value
        if isinstance(value, str):
            match = re.match(r"^(?:GPIO|BCM)(\d+)$", value.strip().upper())
            key = int(match.group(1)) if match else value.strip().upper()
        if key in used_pins:
            other, line = used_pins[key]
            self.err(pat, f"{where}pin {value!r} is already used by '{other}' (line {line})")
            return None
        used_pins[key] = (owner, pat)
        return value

    def options(self, body: Mapping[Any, Any], kind: GpioKind, where: str) -> dict[str, Any] | None:
        given = {k: v for k, v in body.items() if k in kind.options}
        floating = "pull_up" in given and given["pull_up"] is None
        if floating:
            del given["pull_up"]
        ok = True
        for key, value in list(given.items()):
            if key in DURATION_KEYS and isinstance(value, str):
                try:
                    given[key] = parse_duration(value)
                except ValueError as exc:
                    self.err(_line_of(body, key), f"{where}'{key}': {exc}")
                    ok = False
        result: dict[str, Any] = {}
        for key, spec in kind.options.items():
            if key not in given:
                if spec.has_default:
                    result[key] = spec.default
                continue
            try:
                result[key] = check_value(spec, given[key])
            except ParamError as exc:
                self.err(_line_of(body, key), f"{where}{str(exc).replace('param ', 'option ', 1)}")
                ok = False
        if "pull_up" in kind.options:
            if floating:
                result["pull_up"] = None
                if "active_state" not in result:
                    self.err(
                        _line_of(body, "pull_up"),
                        f"{where}'pull_up: null' (floating input) needs 'active_state: true|false'",
                    )
                    ok = False
            elif "active_state" in given:
                self.err(
                    _line_of(body, "active_state"),
                    f"{where}'active_state' only applies to a floating input: set 'pull_up: null'",
                )
                ok = False
        if kind.name == "servo" and ok and result["min_pulse_width"] >= result["max_pulse_width"]:
            self.err(
                _line_of(body, "max_pulse_width"),
                f"{where}'max_pulse_width' must exceed 'min_pulse_width'",
            )
            ok = False
        return result if ok else None

    def simulate(
        self, body: Mapping[Any, Any], kind: GpioKind, where: str
    ) -> dict[str, Any] | None:
        raw = body["simulate"]
        at = _line_of(body, "simulate")
        where = f"{where}simulate: "
        if not isinstance(raw, Mapping):
            self.err(
                at,
                f"{where}expected a mapping (keys: {', '.join(kind.simulate or ())}), "
                f"got {describe_type(raw)}",
            )
            return None
        assert kind.simulate is not None
        ok = True
        for key in raw:
            if key not in kind.simulate:
                self.err(
                    _line_of(raw, key) or at,
                    f"{where}unknown key {key!r} (allowed: {', '.join(kind.simulate)})",
                )
                ok = False
        sim: dict[str, Any] = {}
        for key in ("every", "hold", "after", "period"):
            if key in raw and key in kind.simulate:
                value = self.duration(raw, key, where)
                if value is None:
                    ok = False
                elif value <= 0:
                    self.err(_line_of(raw, key), f"{where}'{key}' must be longer than 0")
                    ok = False
                else:
                    sim[key] = value
        if kind.name == "distance_sensor":
            ok = self.simulate_distance(raw, where, sim) and ok
        else:
            state_key = kind.simulate[0]  # "pressed" or "active"
            value = raw.get(state_key, False)
            if not isinstance(value, bool):
                self.err(_line_of(raw, state_key), f"{where}'{state_key}' must be true or false")
                ok = False
            sim["active"] = bool(value)
            if "hold" in sim and "every" not in sim:
                self.err(
                    _line_of(raw, "hold"), f"{where}'hold' needs 'every' (how often to activate)"
                )
                ok = False
            if "every" in sim:
                sim.setdefault("hold", 0.2)
                if sim["hold"] >= sim["every"]:
                    self.err(_line_of(raw, "hold"), f"{where}'hold' must be shorter than 'every'")
                    ok = False
            for key in ("on_when", "off_when"):
                if key in raw:
                    if not isinstance(raw[key], str):
                        self.err(_line_of(raw, key), f"{where}'{key}' must name an output object")
                        ok = False
                    else:
                        sim[key] = raw[key]
            if "after" in sim and "on_when" not in sim:
                self.err(_line_of(raw, "after"), f"{where}'after' needs 'on_when'")
                ok = False
            if "on_when" in sim:
                sim.setdefault("after", 1.0)
        return sim if ok else None

    def simulate_distance(self, raw: Mapping[Any, Any], where: str, sim: dict[str, Any]) -> bool:
        def number(value: Any) -> bool:
            return (
                not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value <= 10
            )

        if ("distance" in raw) == ("range" in raw):
            self.err(
                _line_of(raw), f"{where}give either 'distance' (metres) or 'range: [min, max]'"
            )
            return False
        if "distance" in raw:
            if not number(raw["distance"]):
                self.err(
                    _line_of(raw, "distance"), f"{where}'distance' must be metres between 0 and 10"
                )
                return False
            if "period" in sim:
                self.err(_line_of(raw, "period"), f"{where}'period' only applies with 'range'")
                return False
            sim["distance"] = float(raw["distance"])
            return True
        value = raw["range"]
        if (
            not (isinstance(value, list) and len(value) == 2 and all(number(v) for v in value))
            or value[0] > value[1]
        ):
            self.err(
                _line_of(raw, "range"),
                f"{where}'range' must be [min, max] in metres (0-10, min <= max)",
            )
            return False
        sim["range"] = (float(value[0]), float(value[1]))
        sim.setdefault("period", 10.0)
        return True

    # -- commands -------------------------------------------------------------------------

    def parse_commands(
        self,
        data: Mapping[Any, Any],
        device: str,
        timeout: float | None,
        gpio: dict[str, GpioObjectSpec],
    ) -> dict[str, CommandSpec]:
        raw = data.get("commands")
        commands: dict[str, CommandSpec] = {}
        if raw is None:
            self.err(_line_of(data), "missing 'commands': a mapping of command name -> definition")
            return commands
        if not isinstance(raw, Mapping):
            self.err(
                _line_of(data, "commands"),
                f"'commands' must be a mapping, got {describe_type(raw)}",
            )
            return commands
        for name, body in raw.items():
            at = _line_of(raw, name)
            if not isinstance(name, str) or not _NAME.match(name):
                hint = _BOOL_HINT if isinstance(name, bool) else ""
                self.err(
                    at,
                    f"command name {name!r} must be an identifier "
                    f"(letters, digits, _; no dots){hint}",
                )
                continue
            if name == STATE_COMMAND:
                self.err(
                    at,
                    "command name 'state' is reserved: "
                    f"every device answers '{device}.state' itself",
                )
                continue
            cmd = self.command(name, body, at, device, timeout, gpio)
            if cmd is not None:
                commands[name] = cmd
        return commands

    def command(
        self,
        name: str,
        body: Any,
        at: int,
        device: str,
        device_timeout: float | None,
        gpio: dict[str, GpioObjectSpec],
    ) -> CommandSpec | None:
        where = f"command '{name}': "
        if body is None:
            body = {}
        if not isinstance(body, Mapping):
            self.err(
                at, f"{where}expected a mapping like {{from: [idle], handler: module:function}}"
            )
            return None
        start = len(self.errors)
        self.unknown_keys(body, COMMAND_KEYS, where)
        allowed = self.allowed_from(body, where, at)
        running = self.state_ref(body, "running", where)
        if running is not None and running == self.fault:
            self.err(
                _line_of(body, "running"), f"{where}'running' cannot be the fault state {running!r}"
            )
        to = self.state_ref(body, "to", where)
        timeout = self.duration(body, "timeout", where)
        params = parse_param_specs(
            body.get("params"),
            self.file,
            context=where,
            line=_line_of(body, "params") or at,
            errors=self.errors,
        )
        description = self.text(body, "description", where)
        has_handler, has_gpio = body.get("handler") is not None, body.get("gpio") is not None
        handler = None
        handler_ref = None
        action = None
        if has_handler == has_gpio:
            what = (
                "has both 'handler' and 'gpio'"
                if has_handler
                else "needs a 'handler' or a 'gpio' action"
            )
            self.err(
                at,
                f"{where}{what}: give exactly one "
                "(handler: module:function, or gpio: {object, action})",
            )
        elif has_handler:
            handler_ref = body["handler"]
            if "ctx" in params:
                self.err(
                    _line_of(body.get("params"), "ctx"),
                    f"{where}param name 'ctx' is reserved for the handler's context",
                )
            else:
                handler = self.handler(handler_ref, _line_of(body, "handler"), where, params)
            handler_ref = handler_ref.strip() if isinstance(handler_ref, str) else None
        else:
            action = self.gpio_action(body, where, gpio, params)
        if len(self.errors) > start:
            return None
        return CommandSpec(
            name=name,
            method=f"{device}.{name}",
            allowed_from=allowed,
            running=running,
            to=to,
            timeout=timeout if timeout is not None else device_timeout,
            params=params,
            handler=handler,
            handler_ref=handler_ref,
            gpio=action,
            description=description,
            line=at,
        )

    def allowed_from(self, body: Mapping[Any, Any], where: str, at: int) -> tuple[str, ...] | None:
        if "from" not in body:
            # Absent: every state but the fault state (a faulted device waits for its reset).
            return tuple(s for s in self.states if s != self.fault)
        raw = body["from"]
        fat = _line_of(body, "from")
        if raw == "*":
            return None
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items:
            self.err(
                fat,
                f"{where}'from' must be a state, a list of states or \"*\" (quoted), "
                f"got {describe_type(raw)}",
            )
            return ()
        result: list[str] = []
        for index, state in enumerate(items):
            iat = _line_of(items, index) if isinstance(items, list) and items is raw else fat
            if state == "*":
                self.err(iat, f'{where}write from: "*" on its own, not inside a list')
            elif not isinstance(state, str):
                hint = _BOOL_HINT if isinstance(state, bool) else ""
                self.err(iat, f"{where}'from' entry {state!r} must be a state name{hint}")
            elif state not in self.states:
                self.err(
                    iat,
                    f"{where}'from' names unknown state {state!r} "
                    f"(states: {_listing(self.states)})",
                )
            elif state not in result:
                result.append(state)
        return tuple(result)

    def handler(
        self, ref: Any, at: int, where: str, params: dict[str, ParamSpec]
    ) -> Callable[..., Any] | None:
        if not isinstance(ref, str) or not _HANDLER.match(ref.strip()):
            self.err(
                at,
                f"{where}'handler' must look like module:function (e.g. door_hw:open), got {ref!r}",
            )
            return None
        try:
            func = resolve_handler(ref.strip(), self.base_dir)
        except LookupError as exc:
            self.err(at, f"{where}handler {ref!r}: {exc}")
            return None
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError):
            return func
        always = [n for n, p in params.items() if p.required or p.has_default]
        for names in (list(params), always):
            try:
                signature.bind(None, **dict.fromkeys(names))
            except TypeError as exc:
                shown = ", ".join(["ctx", *names])
                self.err(
                    at,
                    f"{where}handler {ref!r} cannot be called as {func.__name__}({shown}): {exc}",
                )
                return None
        return func

    def gpio_action(
        self,
        body: Mapping[Any, Any],
        where: str,
        objects: dict[str, GpioObjectSpec],
        params: dict[str, ParamSpec],
    ) -> GpioActionSpec | None:
        raw = body["gpio"]
        at = _line_of(body, "gpio")
        if not isinstance(raw, Mapping):
            self.err(at, f"{where}'gpio' must be a mapping like {{object: led, action: \"on\"}}")
            return None
        obj_name = raw.get("object")
        if isinstance(obj_name, str) and obj_name in self.broken_objects:
            return None  # its declaration's error is reported
        if not isinstance(obj_name, str) or obj_name not in objects:
            what = (
                "missing 'object'"
                if obj_name is None
                else f"gpio object {obj_name!r} is not declared"
            )
            self.err(_line_of(raw, "object") or at, f"{where}{what} (objects: {_listing(objects)})")
            return None
        kind = GPIO_KINDS[objects[obj_name].kind]
        action = raw.get("action")
        if isinstance(action, bool):  # YAML 1.1 reads a bare on/off as true/false
            action = "on" if action else "off"
        if action not in kind.actions:
            what = "missing 'action'" if action is None else f"unknown action {action!r}"
            self.err(
                _line_of(raw, "action") or at,
                f"{where}{what} for {kind.name} '{obj_name}' (actions: {_listing(kind.actions)})",
            )
            return None
        args = kind.actions[action]
        described = f"gpio action '{action}' of '{obj_name}'"
        arg_list = _listing(args)
        options: dict[str, Any] = {}
        ok = True
        for key, value in raw.items():
            if key in ("object", "action"):
                continue
            kat = _line_of(raw, key)
            if key not in args:
                self.err(kat, f"{where}{described} has no argument {key!r} (arguments: {arg_list})")
                ok = False
                continue
            if key in DURATION_KEYS and isinstance(value, str):
                try:
                    value = parse_duration(value)
                except ValueError as exc:
                    self.err(kat, f"{where}{described}: '{key}': {exc}")
                    ok = False
                    continue
            try:
                options[key] = check_value(args[key], value)
            except ParamError as exc:
                self.err(kat, f"{where}{described}: {str(exc).replace('param ', 'argument ', 1)}")
                ok = False
        pat = _line_of(body, "params") or at
        for pname, pspec in params.items():
            if pname not in args:
                self.err(
                    pat,
                    f"{where}param '{pname}' is not an argument of {described} "
                    f"(arguments: {arg_list})",
                )
                ok = False
            elif pname in options:
                self.err(
                    pat, f"{where}'{pname}' is both fixed in the gpio action and a param: keep one"
                )
                ok = False
            elif not (
                pspec.type == args[pname].type
                or (pspec.type, args[pname].type) == ("integer", "number")
            ):
                self.err(
                    pat,
                    f"{where}param '{pname}' must be of type {args[pname].type} for {described}",
                )
                ok = False
        for aname, aspec in args.items():
            if not aspec.required or aspec.has_default or aname in options:
                continue
            wanted = params.get(aname)
            if wanted is None:
                self.err(
                    at,
                    f"{where}{described} needs '{aname}': "
                    f"declare a param '{aname}' or fix it in the action",
                )
                ok = False
            elif not (wanted.required or wanted.has_default):
                self.err(
                    pat,
                    f"{where}param '{aname}' must be required or have a default: "
                    f"{described} needs it",
                )
                ok = False
        return GpioActionSpec(obj_name, action, options) if ok else None


# --- handler modules -----------------------------------------------------------------------

_file_modules: dict[Path, tuple[int, ModuleType]] = {}


def resolve_handler(ref: str, base_dir: Path | None = None) -> Callable[..., Any]:
    """Return the function named by ``module:function``.

    The module is ``<base_dir>/<module path>.py`` if that file exists (loaded under a unique
    name; ``sys.path`` is not touched), else ``importlib.import_module(module)``. Raises
    LookupError with a readable reason.
    """
    module_name, _, func_name = ref.partition(":")
    module: ModuleType | None = None
    candidate = None
    if base_dir is not None:
        candidate = (base_dir / (module_name.replace(".", "/") + ".py")).resolve()
        if candidate.is_file():
            module = _load_file_module(candidate)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or module_name
            if module_name == missing or module_name.startswith(missing + "."):
                looked = f"{candidate} and " if candidate is not None else ""
                raise LookupError(
                    f"no module {module_name!r} (looked for {looked}an importable module)"
                )
            raise LookupError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}")
        except Exception as exc:
            raise LookupError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}")
    func = getattr(module, func_name, None)
    if func is None:
        functions = sorted(
            n for n, v in vars(module).items()
            if inspect.isfunction(v) and not n.startswith("_") and v.__module__ == module.__name__
        )  # fmt: skip
        raise LookupError(
            f"module {module_name!r} has no function {func_name!r} "
            f"(functions: {_listing(functions)})"
        )
    if not callable(func):
        raise LookupError(f"{module_name}.{func_name} is not a function")
    return func


def _load_file_module(path: Path) -> ModuleType:
    """Load (once per file version) a handler file under a unique module name."""
    mtime = path.stat().st_mtime_ns
    cached = _file_modules.get(path)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    digest = hashlib.sha1(str(path).encode(), usedforsecurity=False).hexdigest()[:12]
    name = f"_statelink_handlers_{path.stem}_{digest}_{mtime}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LookupError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise LookupError(f"importing {path} failed: {type(exc).__name__}: {exc}")
    if cached is not None:
        sys.modules.pop(cached[1].__name__, None)
    _file_modules[path] = (mtime, module)
    return module


# --- the live machine ----------------------------------------------------------------------


class CommandNotAllowed(Exception):
    """``command`` is not allowed in ``state``; ``allowed`` lists the states where it is."""

    def __init__(self, device: str, state: str, allowed: list[str], command: str) -> None:
        super().__init__(
            f"{device}.{command} is not allowed in state {state!r} "
            f"(allowed in: {', '.join(allowed)})"
        )
        self.device = device
        self.state = state
        self.allowed = allowed
        self.command = command


class _Model:
    """The transitions model: ``state`` and each running command's origin state."""

    state: str

    def __init__(self) -> None:
        self.origins: dict[str, str] = {}


def _origin_is(command: str, origin: str) -> Callable[[Any], bool]:
    return lambda event: bool(event.model.origins.get(command) == origin)


def _remember_origin(command: str) -> Callable[[Any], None]:
    def remember(event: Any) -> None:
        event.model.origins[command] = event.transition.source

    return remember


class DeviceMachine:
    """One device's live state, a transitions.Machine built from the spec. Not thread-safe
    (the server drives it from one thread).

    Each command has four triggers: ``begin_<cmd>`` (from its allowed states to ``running``),
    ``succeed_<cmd>`` (to ``to``, or back to the origin), ``fail_<cmd>`` (to the fault state,
    or back to the origin) and ``cancel_<cmd>`` (back to the origin). ``on_change(state,
    previous, command)`` is called after every actual state change, in order.
    """

    def __init__(
        self, spec: DeviceSpec, on_change: Callable[[str, str, str], None] | None = None
    ) -> None:
        self.spec = spec
        self._on_change = on_change
        self._model = _Model()
        self._command_of: dict[str, str] = {}
        transitions: list[dict[str, Any]] = []
        for name, cmd in spec.commands.items():
            transitions += self._transitions(name, cmd)
        self._machine = Machine(
            model=self._model,
            states=list(spec.states),
            transitions=transitions,
            initial=spec.initial,
            auto_transitions=False,
            send_event=True,
            after_state_change=self._changed,
            name=f"device {spec.name}",
        )

    def _transitions(self, name: str, cmd: CommandSpec) -> list[dict[str, Any]]:
        origins = self.spec.allowed_states(name)
        begin, succeed, fail, cancel = (
            f"{verb}_{name}" for verb in ("begin", "succeed", "fail", "cancel")
        )
        for trigger in (begin, succeed, fail, cancel):
            self._command_of[trigger] = name
        out: list[dict[str, Any]] = [
            {
                "trigger": begin,
                "source": origins,
                "dest": cmd.running,
                "before": _remember_origin(name),
            }
        ]

        def back_to_origin(trigger: str) -> list[dict[str, Any]]:
            if cmd.running is None:  # the state never left the origin
                return [{"trigger": trigger, "source": origins, "dest": None}]
            return [
                {
                    "trigger": trigger,
                    "source": cmd.running,
                    "dest": o,
                    "conditions": [_origin_is(name, o)],
                }
                for o in origins
            ]

        during = [cmd.running] if cmd.running is not None else origins
        if cmd.to is not None:
            out += [
                {"trigger": succeed, "source": s, "dest": cmd.to if s != cmd.to else None}
                for s in during
            ]
        else:
            out += back_to_origin(succeed)
        fault = self.spec.fault_state
        if fault is not None:
            out += [
                {"trigger": fail, "source": s, "dest": fault if s != fault else None}
                for s in during
            ]
        else:
            out += back_to_origin(fail)
        out += back_to_origin(cancel)
        return out

    def _changed(self, event: Any) -> None:
        source, dest = event.transition.source, event.transition.dest
        if dest is None or dest == source:
            return
        if self._on_change is not None:
            self._on_change(dest, source, self._command_of.get(event.event.name, event.event.name))

    @property
    def state(self) -> str:
        """The current state."""
        return self._model.state

    def allowed(self, command: str) -> bool:
        """Whether ``command`` may begin now (``state`` is always allowed)."""
        if command == STATE_COMMAND:
            return True
        if command not in self.spec.commands:
            return False
        return bool(self._model.may_trigger(f"begin_{command}"))  # type: ignore[attr-defined]

    def begin(self, command: str) -> None:
        """Start ``command``: raise :class:`CommandNotAllowed` (state unchanged) or move to
        its ``running`` state if it declares one. KeyError for an unknown command."""
        if command not in self.spec.commands:
            raise KeyError(command)
        if not self.allowed(command):
            raise CommandNotAllowed(
                self.spec.name, self.state, self.spec.allowed_states(command), command
            )
        self._model.trigger(f"begin_{command}")  # type: ignore[attr-defined]

    def succeed(self, command: str) -> None:
        """The handler succeeded: move to ``to``, or back to the state ``begin`` started from."""
        self._finish("succeed", command)

    def fail(self, command: str) -> None:
        """The handler failed: move to the fault state if declared, else back to the origin."""
        self._finish("fail", command)

    def cancel(self, command: str) -> None:
        """The command was cancelled: back to the origin state (not a fault)."""
        self._finish("cancel", command)

    def _finish(self, verb: str, command: str) -> None:
        if command not in self._model.origins:
            raise RuntimeError(f"{self.spec.name}.{command} was not begun")
        trigger = f"{verb}_{command}"
        # Only another command moving the state meanwhile makes this False; the state is then
        # left as that command set it.
        if self._model.may_trigger(trigger):  # type: ignore[attr-defined]
            self._model.trigger(trigger)  # type: ignore[attr-defined]
        del self._model.origins[command]
