"""Checks of a device config's GPIO parts: the ``gpio:`` objects (kind, pins, options,
``simulate:``) and the commands' ``gpio:`` actions, against :data:`.kinds.GPIO_KINDS`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..durations import parse_duration
from ..params import ParamError, ParamSpec, check_value
from ..source import describe_type
from ..source import line_of as _line_of
from .checker import NAME as _NAME
from .checker import Checker
from .checker import listing as _listing
from .kinds import DURATION_KEYS, GPIO_KINDS, GpioKind
from .spec import GpioActionSpec, GpioObjectSpec


class GpioChecks(Checker):
    """The GPIO part of the device loader (a base of its parser)."""

    def __init__(self, file: str) -> None:
        super().__init__(file)
        #: gpio objects declared with errors (already reported): commands using them are not
        #: reported again as "not declared"
        self.broken_objects: set[str] = set()

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
        if kind.family == "servo" and ok and result["min_pulse_width"] >= result["max_pulse_width"]:
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
        if kind.family == "distance":
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
