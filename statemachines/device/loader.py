"""Device configs -> :class:`~.spec.DeviceSpec`: :func:`load_device` / :func:`parse_device`.

Everything is checked at load time and *all* problems are reported as
:class:`~statemachines.source.ConfigErrors`, each pointing at the line to fix. Pure: handler
modules are only named (:class:`~.spec.HandlerRef`), never imported (``controller.handlers``
does that when a device is served), and gpiozero is never imported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..params import parse_param_specs
from ..source import ConfigErrors, describe_type, load_yaml, parse_yaml, yaml_bool_hint
from ..source import line_of as _line_of
from .checker import NAME as _NAME
from .checker import listing as _listing
from .gpio_checks import GpioChecks
from .spec import STATE_COMMAND, CommandSpec, DeviceSpec, GpioObjectSpec, HandlerRef

DEVICE_KEYS = ("device", "description", "states", "initial", "fault", "timeout", "gpio", "commands")
COMMAND_KEYS = (
    "from",
    "running",
    "to",
    "cancelled",
    "timeout",
    "params",
    "handler",
    "gpio",
    "description",
)

_DEVICE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_HANDLER = re.compile(
    r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):([A-Za-z_][A-Za-z0-9_]*)$"
)


def load_device(path: str | Path) -> DeviceSpec:
    """Load a device config file; its handler modules are to be looked for next to it first.

    Raises :class:`ConfigErrors` with every problem found. Runs no handler code.
    """
    data = load_yaml(path)
    return _Parser(str(path), Path(path).resolve().parent).build(data)


def parse_device(
    text: str, file: str = "<string>", *, base_dir: str | Path | None = None
) -> DeviceSpec:
    """Parse a device config from text. Handler files are to be looked for in ``base_dir``
    (default: the directory of ``file`` unless it is a ``<name>`` placeholder), then among
    importable modules."""
    if base_dir is None and not file.startswith("<"):
        base_dir = Path(file).resolve().parent
    data = parse_yaml(text, file)
    return _Parser(file, Path(base_dir) if base_dir is not None else None).build(data)


class _Parser(GpioChecks):
    """Builds a DeviceSpec from YAML data, collecting every problem."""

    def __init__(self, file: str, base_dir: Path | None) -> None:
        super().__init__(file)
        self.base_dir = base_dir
        self.states: tuple[str, ...] = ()
        self.fault: str | None = None
        self.device = "?"

    def state_ref(
        self, node: Mapping[Any, Any], key: str, where: str, line: int | None = None
    ) -> str | None:
        value = node.get(key)
        at = line if line is not None else _line_of(node, key)
        if value is None:
            return None
        if not isinstance(value, str):
            hint = yaml_bool_hint(value)
            self.err(at, f"{where}'{key}' must be a state name, got {describe_type(value)}{hint}")
            return None
        if value not in self.states:
            self.err(
                at,
                f"{where}'{key}' names unknown state {value!r} (states: {_listing(self.states)})",
            )
            return None
        return value

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
                hint = yaml_bool_hint(state)
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
                hint = yaml_bool_hint(name)
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
        cancelled = self.state_ref(body, "cancelled", where)
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
            if "ctx" in params:
                self.err(
                    _line_of(body.get("params"), "ctx"),
                    f"{where}param name 'ctx' is reserved for the handler's context",
                )
            else:
                handler_ref = self.handler(body["handler"], _line_of(body, "handler"), where)
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
            cancelled=cancelled,
            timeout=timeout if timeout is not None else device_timeout,
            params=params,
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
                hint = yaml_bool_hint(state)
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

    def handler(self, ref: Any, at: int, where: str) -> HandlerRef | None:
        """Check the ``module:function`` syntax only: the module is not imported here."""
        if not isinstance(ref, str) or not _HANDLER.match(ref.strip()):
            self.err(
                at,
                f"{where}'handler' must look like module:function (e.g. door_hw:open), got {ref!r}",
            )
            return None
        module, _, function = ref.strip().partition(":")
        return HandlerRef(module, function, self.base_dir, at)
