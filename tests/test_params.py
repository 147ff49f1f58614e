"""Param schemas: parsing from YAML (errors with file:line) and validation of call params."""

from __future__ import annotations

import math

import pytest

from statemachines.params import (
    ParamError,
    ParamSpec,
    parse_param_specs,
    schema_to_json,
    specs_from_json,
    validate_params,
)
from statemachines.source import ConfigError, ConfigErrors, parse_yaml

FILE = "dev.yaml"


def specs_of(text: str) -> dict[str, ParamSpec]:
    return parse_param_specs(parse_yaml(text, FILE)["params"], FILE)


def errors_of(text: str) -> list[tuple[int, str]]:
    errors: list[ConfigError] = []
    parse_param_specs(
        parse_yaml(text, FILE)["params"], FILE, context="command 'x': ", errors=errors
    )
    assert all(e.file == FILE for e in errors)
    return [(e.line, e.message) for e in errors]


SPEED = """\
params:
  speed: {type: number, min: 0, max: 1, default: 0.5, description: motor duty}
  mode: {type: string, choices: [slow, fast], required: false}
  count: {type: integer, min: 1}
  dry: {type: boolean, default: false}
"""


def test_parse_builds_specs_in_declared_order() -> None:
    specs = specs_of(SPEED)
    assert list(specs) == ["speed", "mode", "count", "dry"]
    speed = specs["speed"]
    assert speed == ParamSpec("speed", "number", 0, 1, None, False, 0.5, "motor duty")
    assert specs["mode"].choices == ("slow", "fast")
    assert specs["mode"].required is False and specs["mode"].has_default is False
    assert specs["count"].required is True  # no default: required unless told otherwise
    assert specs["dry"].default is False and specs["dry"].has_default


def test_parse_none_is_no_params() -> None:
    assert parse_param_specs(None, FILE) == {}


def test_parse_raises_all_errors_without_an_errors_list() -> None:
    with pytest.raises(ConfigErrors) as info:
        specs_of("params:\n  a: {type: nope}\n  b: {type: number, min: x}\n")
    assert [(e.line, e.file) for e in info.value.errors] == [(2, FILE), (3, FILE)]


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        (
            "  speed: {type: number, maxx: 1}\n",
            2,
            "command 'x': param 'speed': unknown key 'maxx' "
            "(allowed: type, min, max, choices, required, default, description)",
        ),
        ("  speed: {min: 1}\n", 2, "missing 'type' (one of number, integer, string, boolean)"),
        ("  speed: {type: float}\n", 2, "unknown type 'float' (types: number, integer, string,"),
        ("  name: {type: string, min: 1}\n", 2, "'min' only applies to number and integer params"),
        ("  speed:\n    type: number\n    max: high\n", 4, "'max' must be a number, got a string"),
        (
            "  speed:\n    type: number\n    min: 2\n    max: 1\n",
            5,
            "'min' (2) is greater than 'max' (1)",
        ),
        ("  speed: {type: number, max: 1, default: 2}\n", 2, "'default' must be <= 1, got 2"),
        ("  speed: {type: number, default: fast}\n", 2, "'default' must be a number, got a string"),
        ("  fast: {type: number, default: true}\n", 2, "'default' must be a number, got a boolean"),
        ("  mode: {type: string, choices: []}\n", 2, "'choices' must be a non-empty list"),
        (
            "  mode:\n    type: integer\n    choices:\n      - 1\n      - a\n",
            6,
            "choice 'a' must be an integer",
        ),
        ("  mode: {type: string, choices: [a, a]}\n", 2, "choice 'a' is listed twice"),
        ("  mode: {type: string, required: true, default: a}\n", 2, "contradict"),
        ("  mode: {type: string, required: maybe}\n", 2, "'required' must be true or false"),
        ("  2x: {type: string}\n", 2, "param name '2x' must be a Python identifier"),
        ("  class: {type: string}\n", 2, "param name 'class' must be a Python identifier"),
        ("  mode: number\n", 2, "expected a mapping like {type: number, min: 0}, got a string"),
    ],
)
def test_parse_errors_point_at_the_line(body: str, line: int, message: str) -> None:
    errors = errors_of("params:\n" + body)
    assert errors, "expected a config error"
    assert errors[0][0] == line
    assert message in errors[0][1]
    assert errors[0][1].startswith("command 'x': ")


def test_parse_boolean_param_name_hints_at_yaml_quoting() -> None:
    # YAML 1.1 reads a bare `on` key as True
    [(line, message)] = errors_of("params:\n  on: {type: boolean}\n")
    assert line == 2 and "quote the name" in message


def test_parse_params_must_be_a_mapping() -> None:
    [(line, message)] = errors_of("params:\n  - speed\n")
    assert line == 2 and "'params' must be a mapping" in message


# --- validation ----------------------------------------------------------------------------


@pytest.fixture
def specs() -> dict[str, ParamSpec]:
    return specs_of(SPEED)


def test_array_binds_positionally_in_declared_order(specs: dict[str, ParamSpec]) -> None:
    assert validate_params(specs, [0.25, "fast", 3]) == {
        "speed": 0.25,
        "mode": "fast",
        "count": 3,
        "dry": False,
    }


def test_object_binds_by_name_and_fills_defaults(specs: dict[str, ParamSpec]) -> None:
    result = validate_params(specs, {"count": 2})
    assert result == {"speed": 0.5, "count": 2, "dry": False}  # optional `mode` left out
    assert list(result) == ["speed", "count", "dry"]


def test_none_means_no_params() -> None:
    assert validate_params({}, None) == {}
    assert validate_params({}, []) == {}
    assert validate_params({}, {}) == {}


def test_numbers_arrive_as_float_and_integral_floats_as_int(specs: dict[str, ParamSpec]) -> None:
    result = validate_params(specs, {"speed": 1, "count": 3.0})
    assert result["speed"] == 1.0 and isinstance(result["speed"], float)
    assert result["count"] == 3 and isinstance(result["count"], int)


@pytest.mark.parametrize(
    ("params", "message", "param"),
    [
        ({"speed": 2, "count": 1}, "param 'speed': must be <= 1, got 2", "speed"),
        ({"speed": -1, "count": 1}, "param 'speed': must be >= 0, got -1", "speed"),
        ({"speed": True, "count": 1}, "param 'speed': must be a number, got a boolean", "speed"),
        ({"speed": "0.5", "count": 1}, "param 'speed': must be a number, got a string", "speed"),
        ({"speed": math.nan, "count": 1}, "param 'speed': must be a finite number", "speed"),
        ({"count": 1.5}, "param 'count': must be an integer, got a number 1.5", "count"),
        ({"count": 0}, "param 'count': must be >= 1, got 0", "count"),
        (
            {"count": 1, "mode": "turbo"},
            "param 'mode': must be one of 'slow', 'fast', got 'turbo'",
            "mode",
        ),
        ({"count": 1, "mode": 3}, "param 'mode': must be a string", "mode"),
        ({"count": 1, "dry": 1}, "param 'dry': must be true or false, got an integer 1", "dry"),
        ({"count": 1, "dry": "true"}, "param 'dry': must be true or false", "dry"),
        ({}, "param 'count': is required (an integer >= 1)", "count"),
        (
            {"count": 1, "sped": 1},
            "unknown param 'sped' (params: speed, mode, count, dry)",
            "sped",
        ),
        (
            [0.5, "slow", 1, False, "extra"],
            "too many positional params: expected at most 4 (speed, mode, count, dry), got 5",
            None,
        ),
        ("fast", "params must be an array or an object, got a string", None),
        (7, "params must be an array or an object, got an integer", None),
    ],
)
def test_rules(
    specs: dict[str, ParamSpec], params: object, message: str, param: str | None
) -> None:
    with pytest.raises(ParamError) as info:
        validate_params(specs, params)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert info.value.param == param
    assert isinstance(info.value, ValueError)


def test_every_problem_is_reported(specs: dict[str, ParamSpec]) -> None:
    with pytest.raises(ParamError) as info:
        validate_params(specs, {"speed": 3, "bogus": 1})
    text = str(info.value)
    assert "unknown param 'bogus'" in text
    assert "param 'speed': must be <= 1, got 3" in text
    assert "param 'count': is required" in text


def test_schema_to_json(specs: dict[str, ParamSpec]) -> None:
    schema = schema_to_json(specs)
    assert schema == {
        "speed": {
            "type": "number",
            "required": False,
            "minimum": 0,
            "maximum": 1,
            "default": 0.5,
            "description": "motor duty",
        },
        "mode": {"type": "string", "required": False, "enum": ["slow", "fast"]},
        "count": {"type": "integer", "required": True, "minimum": 1},
        "dry": {"type": "boolean", "required": False, "default": False},
    }
    assert list(schema) == list(specs)  # positional order
    assert schema_to_json({}) == {}


def test_specs_from_json_inverts_schema_to_json() -> None:
    specs = specs_of(
        """
params:
  speed: {type: number, min: 0, max: 1, default: 0.5, description: duty}
  mode: {type: string, choices: [slow, fast]}
  count: {type: integer, required: false}
"""
    )
    assert specs_from_json(schema_to_json(specs)) == specs
    typeless = specs_from_json({"a": {"required": True}})["a"]  # a plain method's param
    assert typeless.type == "any" and validate_params({"a": typeless}, [[1, 2]]) == {"a": [1, 2]}
    assert schema_to_json({"a": typeless}) == {"a": {"required": True}}


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ({"type": "int"}, "unknown type 'int' (types: number, integer, string, boolean)"),
        ({"type": "str"}, "unknown type 'str'"),
        ({"type": "number", "max": 1}, "unknown key 'max' in a JSON rule: it is written 'maximum'"),
        ({"type": "string", "choices": ["a"]}, "it is written 'enum'"),
        ({"type": "number", "minimum": "0"}, "'minimum' must be a number"),
        ({"type": "string", "enum": []}, "'enum' must be a non-empty list"),
    ],
)
def test_specs_from_json_rejects_aliases_and_bad_rules(
    rule: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ParamError, match="param 'x': ") as info:
        specs_from_json({"x": rule})
    assert fragment in str(info.value) and info.value.param == "x"
