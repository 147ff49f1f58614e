"""Param schemas of device commands, and the validation of the params a call brings.

A command declares its params in YAML::

    params:
      speed: {type: number, min: 0, max: 1, default: 0.5, description: motor duty}
      mode:  {type: string, choices: [slow, fast], required: false}

:func:`parse_param_specs` turns that mapping into :class:`ParamSpec` objects (reporting every
mistake as a :class:`~statemachines.source.ConfigError` with its line), :func:`validate_params`
checks the params of one call against them, and :func:`schema_to_json` describes them for
``rpc.discover``.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .source import ConfigError, ConfigErrors, describe_type, line_of, yaml_bool_hint

#: The param types, as named in configs and in JSON Schema.
PARAM_TYPES: tuple[str, ...] = ("number", "integer", "string", "boolean")

#: The type of a param described without one (a plain method's, in ``rpc.discover``): any value.
ANY_TYPE = "any"

#: The keys a param schema may use.
PARAM_KEYS: tuple[str, ...] = (
    "type",
    "min",
    "max",
    "choices",
    "required",
    "default",
    "description",
)


class ParamError(ValueError):
    """The params of a call break their schema; the message names the param and the rule.

    ``param`` is the first offending param's name (None when the problem is the params' shape).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ParamSpec:
    """One declared param.

    ``default`` None means "no default". ``required`` is True when the caller must give the
    param (the config default: required unless it has a default). ``choices`` is None or a
    tuple of allowed values.
    """

    name: str
    type: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    required: bool = True
    default: Any = None
    description: str = ""

    @property
    def has_default(self) -> bool:
        return self.default is not None

    def summary(self) -> str:
        """A short human description of the rule, e.g. ``number between 0 and 1``."""
        if self.type == ANY_TYPE:
            text = "any value"
        else:
            text = f"an {self.type}" if self.type == "integer" else f"a {self.type}"
        if self.min is not None and self.max is not None:
            text += f" between {_fmt(self.min)} and {_fmt(self.max)}"
        elif self.min is not None:
            text += f" >= {_fmt(self.min)}"
        elif self.max is not None:
            text += f" <= {_fmt(self.max)}"
        if self.choices is not None:
            text += " (one of " + ", ".join(_fmt(c) for c in self.choices) + ")"
        return text


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # as the caller wrote it: numbers arrive as floats
    return str(value)


def _coerce(spec: ParamSpec, value: Any) -> Any:
    """Return ``value`` converted to the spec's type, or raise ValueError with the rule broken."""
    kind = spec.type
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {describe_type(value)} {_fmt(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond a double's range, e.g. 10**400
            bits = int(value).bit_length()
            raise ValueError(f"must be a number a double can hold, got an integer of {bits} bits")
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number, got {_fmt(value)}")
        value = number
    elif kind == "integer":
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {describe_type(value)} {_fmt(value)}")
    elif kind == "string":
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {describe_type(value)} {_fmt(value)}")
    elif kind == "boolean" and not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {describe_type(value)} {_fmt(value)}")
    if spec.min is not None and value < spec.min:
        raise ValueError(f"must be >= {_fmt(spec.min)}, got {_fmt(value)}")
    if spec.max is not None and value > spec.max:
        raise ValueError(f"must be <= {_fmt(spec.max)}, got {_fmt(value)}")
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(_fmt(c) for c in spec.choices)
        raise ValueError(f"must be one of {allowed}, got {_fmt(value)}")
    return value


def check_value(spec: ParamSpec, value: Any) -> Any:
    """Validate one value against ``spec``; return it converted (numbers as float).

    Raises :class:`ParamError` naming the param and the rule.
    """
    try:
        return _coerce(spec, value)
    except ValueError as exc:
        raise ParamError(f"param '{spec.name}': {exc}", spec.name)


def validate_params(
    specs: Mapping[str, ParamSpec], params: list[Any] | dict[str, Any] | None
) -> dict[str, Any]:
    """Bind and check the params of one call; return ``{name: value}`` in declared order.

    An array binds positionally in declared order, an object by name, None means no params.
    Defaults fill missing params; an optional param without default is left out. Unknown
    names, too many positional values, missing required params, wrong types (a boolean is not
    a number), values out of range or not among the choices raise :class:`ParamError` (all
    problems, joined with "; ").
    """
    names = list(specs)
    given: dict[str, Any]
    if params is None:
        given = {}
    elif isinstance(params, (list, tuple)):
        if len(params) > len(names):
            expected = ", ".join(names) if names else "none"
            raise ParamError(
                f"too many positional params: expected at most {len(names)} ({expected}), "
                f"got {len(params)}"
            )
        given = dict(zip(names, params, strict=False))
    elif isinstance(params, Mapping):
        given = dict(params)
    else:
        raise ParamError(f"params must be an array or an object, got {describe_type(params)}")

    problems: list[tuple[str | None, str]] = []
    for key in given:
        if key not in specs:
            allowed = ", ".join(names) if names else "none"
            problems.append((str(key), f"unknown param {str(key)!r} (params: {allowed})"))

    result: dict[str, Any] = {}
    for name, spec in specs.items():
        if name in given:
            try:
                result[name] = _coerce(spec, given[name])
            except ValueError as exc:
                problems.append((name, f"param '{name}': {exc}"))
        elif spec.has_default:
            result[name] = spec.default
        elif spec.required:
            problems.append((name, f"param '{name}': is required ({spec.summary()})"))
    if problems:
        raise ParamError("; ".join(message for _, message in problems), problems[0][0])
    return result


def schema_to_json(specs: Mapping[str, ParamSpec]) -> dict[str, dict[str, Any]]:
    """JSON-able rules per param, in declared (positional) order, for ``rpc.discover`` and the
    catalog: ``{name: {"type", "required", and when set "minimum", "maximum", "enum",
    "default", "description"}}`` (JSON Schema words for the rules)."""
    out: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        rule: dict[str, Any] = {"type": spec.type, "required": spec.required}
        if spec.type == ANY_TYPE:
            del rule["type"]
        if spec.min is not None:
            rule["minimum"] = spec.min
        if spec.max is not None:
            rule["maximum"] = spec.max
        if spec.choices is not None:
            rule["enum"] = list(spec.choices)
        if spec.has_default:
            rule["default"] = spec.default
        if spec.description:
            rule["description"] = spec.description
        out[name] = rule
    return out


def specs_from_json(rules: Mapping[str, Any]) -> dict[str, ParamSpec]:
    """The inverse of :func:`schema_to_json`: ``{name: JSON rule}`` -> specs, in order.

    A rule without ``type`` takes any value (:data:`ANY_TYPE`), one without ``required: true``
    is optional (as in JSON Schema). Raises :class:`ParamError`
    naming the param for a rule the validator cannot apply: a type other than
    :data:`PARAM_TYPES` (no aliases such as ``int`` or ``str``), the config words ``min``,
    ``max`` or ``choices`` instead of ``minimum``, ``maximum`` or ``enum``, a bound that is not
    a number, an ``enum`` that is not a non-empty list. Other JSON Schema keys are ignored.
    """
    specs: dict[str, ParamSpec] = {}
    for name, rule in rules.items():
        specs[str(name)] = _spec_from_json(str(name), rule)
    return specs


def _spec_from_json(name: str, rule: Any) -> ParamSpec:
    def bad(message: str) -> ParamError:
        return ParamError(f"param '{name}': {message}", name)

    if not isinstance(rule, Mapping):
        raise bad(f"the rule must be a mapping, got {describe_type(rule)}")
    kind = rule.get("type", ANY_TYPE)
    if kind != ANY_TYPE and kind not in PARAM_TYPES:
        raise bad(f"unknown type {kind!r} (types: {', '.join(PARAM_TYPES)})")
    for word, json_word in (("min", "minimum"), ("max", "maximum"), ("choices", "enum")):
        if word in rule:
            raise bad(f"unknown key {word!r} in a JSON rule: it is written {json_word!r}")
    bounds: list[float | None] = []
    for key in ("minimum", "maximum"):
        value = rule.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad(f"{key!r} must be a number, got {describe_type(value)}")
        bounds.append(value)
    enum = rule.get("enum")
    if enum is not None and (not isinstance(enum, list) or not enum):
        raise bad("'enum' must be a non-empty list of allowed values")
    default = rule.get("default")
    return ParamSpec(
        name=name,
        type=kind,
        min=bounds[0],
        max=bounds[1],
        choices=None if enum is None else tuple(enum),
        required=rule.get("required") is True,
        default=default,
        description=str(rule.get("description") or ""),
    )


# --- config side ---------------------------------------------------------------------------


def parse_param_specs(
    raw: Any,
    file: str,
    *,
    context: str = "",
    line: int = 0,
    errors: list[ConfigError] | None = None,
) -> dict[str, ParamSpec]:
    """Parse a ``params:`` mapping from YAML into specs, in declared order.

    ``context`` prefixes messages (e.g. ``"command 'open': "``); ``line`` is the fallback line
    when ``raw`` carries none. Problems are appended to ``errors`` when given, else raised
    together as :class:`ConfigErrors`. A param with a problem is left out of the result.
    """
    own: list[ConfigError] = [] if errors is None else errors
    start = len(own)
    specs: dict[str, ParamSpec] = {}

    def err(at: int, message: str) -> None:
        own.append(ConfigError(file, at or line or 1, f"{context}{message}"))

    if raw is None:
        return specs
    if not isinstance(raw, Mapping):
        err(
            line_of(raw) or line,
            f"'params' must be a mapping of name -> schema, got {describe_type(raw)}",
        )
    else:
        for name, body in raw.items():
            at = line_of(raw, name) or line
            spec = _parse_one(name, body, at, err)
            if spec is not None:
                specs[spec.name] = spec
    if errors is None and len(own) > start:
        raise ConfigErrors(own)
    return specs


def _parse_one(name: Any, body: Any, at: int, err: Any) -> ParamSpec | None:
    if not isinstance(name, str):
        err(at, f"param name {name!r} must be a string{yaml_bool_hint(name, 'the name')}")
        return None
    if not name.isidentifier() or keyword.iskeyword(name):
        err(at, f"param name {name!r} must be a Python identifier (letters, digits, _)")
        return None
    where = f"param '{name}': "
    if not isinstance(body, Mapping):
        err(
            at,
            f"{where}expected a mapping like {{type: number, min: 0}}, got {describe_type(body)}",
        )
        return None
    ok = True
    for key in body:
        if key not in PARAM_KEYS:
            err(
                line_of(body, key) or at,
                f"{where}unknown key {key!r} (allowed: {', '.join(PARAM_KEYS)})",
            )
            ok = False

    def kat(key: str) -> int:
        return line_of(body, key) or at

    kind = body.get("type")
    if kind is None:
        err(at, f"{where}missing 'type' (one of {', '.join(PARAM_TYPES)})")
        return None
    if kind not in PARAM_TYPES:
        err(kat("type"), f"{where}unknown type {kind!r} (types: {', '.join(PARAM_TYPES)})")
        return None

    bounds: dict[str, float | None] = {"min": None, "max": None}
    for key in ("min", "max"):
        if key not in body:
            continue
        value = body[key]
        if kind not in ("number", "integer"):
            err(kat(key), f"{where}'{key}' only applies to number and integer params")
            ok = False
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            err(kat(key), f"{where}'{key}' must be a number, got {describe_type(value)}")
            ok = False
        else:
            bounds[key] = value
    low, high = bounds["min"], bounds["max"]
    if low is not None and high is not None and low > high:
        err(kat("max"), f"{where}'min' ({_fmt(low)}) is greater than 'max' ({_fmt(high)})")
        ok = False

    required_raw = body.get("required")
    if "required" in body and not isinstance(required_raw, bool):
        err(kat("required"), f"{where}'required' must be true or false, got {required_raw!r}")
        ok = False
    description = body.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        err(kat("description"), f"{where}'description' must be a string")
        ok = False
    if not ok:
        return None

    probe = ParamSpec(name=name, type=kind, min=low, max=high)
    choices: tuple[Any, ...] | None = None
    if "choices" in body:
        raw_choices = body["choices"]
        if not isinstance(raw_choices, list) or not raw_choices:
            err(kat("choices"), f"{where}'choices' must be a non-empty list of allowed values")
            return None
        converted: list[Any] = []
        for index, choice in enumerate(raw_choices):
            try:
                value = _coerce(probe, choice)
            except ValueError as exc:
                err(
                    line_of(raw_choices, index) or kat("choices"), f"{where}choice {choice!r} {exc}"
                )
                return None
            if value in converted:
                err(
                    line_of(raw_choices, index) or kat("choices"),
                    f"{where}choice {choice!r} is listed twice",
                )
                return None
            converted.append(value)
        choices = tuple(converted)
        probe = ParamSpec(name=name, type=kind, min=low, max=high, choices=choices)

    default = body.get("default")
    if default is not None:
        try:
            default = _coerce(probe, default)
        except ValueError as exc:
            err(kat("default"), f"{where}'default' {exc}")
            return None
    if required_raw is True and default is not None:
        err(kat("required"), f"{where}'required: true' and a 'default' contradict: drop one")
        return None
    required = default is None if required_raw is None else bool(required_raw)
    return ParamSpec(
        name=name,
        type=kind,
        min=low,
        max=high,
        choices=choices,
        required=required,
        default=default,
        description=description,
    )
