"""Safe expressions and {{ }} templates (statemachines.expressions)."""

from __future__ import annotations

import contextlib
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statemachines.expressions import (
    ExpressionError,
    compile_expression,
    compile_template,
    constant_hint,
    has_template,
)


def ev(text: str, **names: Any) -> Any:
    return compile_expression(text).evaluate(names)


# --- evaluation ------------------------------------------------------------------------------


def test_attribute_and_item_access_read_json() -> None:
    names = {"result": {"level": 0.7, "items": [1, 2]}, "door": {"state": "closed"}}
    assert ev('result.level > 0.5 and door.state == "closed"', **names) is True
    assert ev('result["level"] * 2', **names) == 1.4
    assert ev("result.items[1]", **names) == 2  # a key wins over the dict method
    assert ev("len(result.items)", **names) == 2


def test_functions_literals_and_comprehensions() -> None:
    assert ev("max(1, min(20, int(d // 10)))", d=57.0) == 5
    assert ev("[x * 2 for x in xs if x > 1]", xs=[1, 2, 3]) == [4, 6]
    assert ev("{k: v for k, v in pairs}", pairs=[("a", 1)]) == {"a": 1}
    assert ev("round(sum(xs) / len(xs), 1)", xs=[1, 2, 2]) == 1.7
    assert ev("'on' if flag else 'off'", flag=False) == "off"
    assert ev("None is x", x=None) is True
    assert ev("s.lower().startswith('ab')", s="ABc") is True


def test_read_only_methods_only() -> None:
    data = {"a": 1}
    assert ev("result.get('b', 5)", result=data) == 5
    assert ev("sorted(result.keys())", result=data) == ["a"]
    with pytest.raises(ExpressionError, match="no key 'clear'"):
        ev("result.clear()", result=data)
    with pytest.raises(ExpressionError):
        ev("xs.append(1)", xs=[1])
    assert data == {"a": 1}


@pytest.mark.parametrize(
    ("text", "names", "message"),
    [
        ("result.nope", {"result": {"a": 1}}, "no key 'nope' (keys: 'a')"),
        ("result['nope']", {"result": {"a": 1}}, "no key 'nope'"),
        ("result[3]", {"result": [1]}, "index out of range"),
        ("door.state", {}, "'door' has no value yet"),
        ("result > 1", {"result": None}, "not supported"),
        ("1 / x", {"x": 0}, "division by zero"),
        ("result.level", {"result": None}, "null has no attribute 'level'"),
        ("'x' * n", {"n": 10**9}, "failed"),
    ],
)
def test_runtime_errors_are_expression_errors_with_a_reason(
    text: str, names: dict[str, Any], message: str
) -> None:
    with pytest.raises(ExpressionError) as info:
        ev(text, **names)
    assert message in info.value.message
    assert info.value.expression == text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_only_expression_errors_escape_whatever_the_data(value: Any) -> None:
    for text in ("result.level > 0.5", "result[0] + 1", "len(result) * result.x", "-result"):
        with contextlib.suppress(ExpressionError):
            compile_expression(text).evaluate({"result": value})


def test_expressions_are_shared_across_threads() -> None:
    expr = compile_expression("result.n * 2")
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda n: expr.evaluate({"result": {"n": n}}), range(200)))
    assert out == [n * 2 for n in range(200)]


# --- compile-time checks ------------------------------------------------------------------


def test_free_names_exclude_functions_and_comprehension_variables() -> None:
    expr = compile_expression("len([x for x in result.xs if x > limit]) > 0")
    assert expr.names == {"result", "limit"}
    assert compile_expression("params.state == 'idle'").names == {"params"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("result.level >", "bad expression"),
        ("", "non-empty"),
        ("result.__class__", "'__class__' is not allowed"),
        ("open('/etc/passwd')", "unknown function 'open'"),
        ("[lambda: 1]", "Lambda is not allowed"),
        ("(lambda: 1)()", "only functions and methods can be called"),
        ("(y := 1)", "NamedExpr is not allowed"),
        ("f(**x)", "unknown function 'f'"),
        ("len(**x)", "** arguments are not allowed"),
        ("{{ result.level }}", "without {{ }}"),
        ("a; b", "bad expression"),
    ],
)
def test_compile_errors(text: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=re.escape(message)):
        compile_expression(text)


def test_constant_hint() -> None:
    assert constant_hint("true") == " (did you mean True?)"
    assert constant_hint("null") == " (did you mean None?)"
    assert constant_hint("level") == ""


# --- templates -----------------------------------------------------------------------------


def test_a_single_placeholder_keeps_the_type() -> None:
    names = {"result": {"level": 1.5, "on": True, "xs": [1]}}
    assert compile_template("{{ result.level * 2 }}").render(names) == 3.0
    assert compile_template(" {{ result.on }} ").render(names) is True
    assert compile_template("{{ result.xs }}").render(names) == [1]
    assert compile_template("{{ result }}").render(names) == names["result"]


def test_mixed_text_renders_a_string() -> None:
    names = {"result": {"level": 1.5, "on": True, "none": None, "name": "x"}}
    tpl = compile_template(
        "lvl {{ result.level }} on={{ result.on }} {{ result.none }} {{ result.name }}"
    )
    assert tpl.render(names) == "lvl 1.5 on=true null x"


def test_nested_params_and_names() -> None:
    tpl = compile_template({"a": "{{ a }}", "b": ["x", "{{ b.c + 1 }}"], "c": {"d": 1}})
    assert tpl.names == {"a", "b"}
    assert not tpl.constant
    assert tpl.render({"a": 1, "b": {"c": 2}}) == {"a": 1, "b": ["x", 3], "c": {"d": 1}}


def test_constant_templates_return_one_plain_object() -> None:
    tpl = compile_template({"steps": 10, "list": [1, 2]})
    assert tpl.constant and tpl.names == frozenset()
    first = tpl.render({})
    assert first == {"steps": 10, "list": [1, 2]}
    assert first is tpl.render({})
    assert type(first) is dict


def test_template_errors() -> None:
    with pytest.raises(ExpressionError, match="unclosed"):
        compile_template("a {{ b }} {{ c")
    with pytest.raises(ExpressionError, match="bad expression"):
        compile_template({"x": "{{ 1 + }}"})
    with pytest.raises(ExpressionError, match="'missing' has no value yet"):
        compile_template("{{ missing }}").render({})


def test_has_template() -> None:
    assert has_template({"a": ["{{ x }}"]})
    assert not has_template({"a": ["x", 1, None]})
