"""Safe expressions and ``{{ }}`` templates for workflows, compiled once at load time.

An expression is Python syntax over JSON data, evaluated by ``simpleeval`` (never ``eval``)::

    result.level > 0.5 and door.state == "closed"
    result["level"] * 2
    len(result.items) if result.items else 0

Contracts:

* :func:`compile_expression` parses and checks an expression once (syntax, constructs the
  evaluator supports, known functions, no ``_private`` attributes) and reports the free
  names it reads in :attr:`Expression.names`, so a loader can reject names that can never be
  defined. It raises :class:`ExpressionError`.
* :meth:`Expression.evaluate` never raises anything but :class:`ExpressionError`, whose
  message says what went wrong in plain words.
* Attribute access on a JSON object reads the key (``result.level`` is ``result["level"]``);
  keys win over methods. Only read-only methods are reachable (``dict.get``, ``str.lower``,
  ...): an expression can never change the data it reads.
* :func:`compile_template` turns a params value (object, array, string, scalar) into a
  :class:`Template`. A string that is exactly one ``{{ expr }}`` renders to the expression's
  value with its type; a string mixing text and ``{{ }}`` renders to a string (strings as
  they are, other values as JSON). A template without any ``{{ }}`` renders to the very same
  constant object every time: callers must not mutate it.

Evaluators are kept per thread, so compiled expressions can be shared by any number of runs.
"""

from __future__ import annotations

import ast
import json
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import simpleeval

from .source import describe_type

__all__ = [
    "FUNCTIONS",
    "Expression",
    "ExpressionError",
    "Template",
    "compile_expression",
    "compile_template",
    "has_template",
]


class ExpressionError(Exception):
    """A bad expression (at load time) or a failed evaluation (at run time)."""

    def __init__(self, expression: str, message: str) -> None:
        super().__init__(message)
        self.expression = expression
        self.message = message


#: The functions an expression may call.
FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    "abs": abs,
    "all": all,
    "any": any,
    "bool": bool,
    "dict": dict,
    "float": float,
    "int": int,
    "len": len,
    "list": list,
    "max": max,
    "min": min,
    "round": round,
    "set": set,
    "sorted": sorted,
    "str": str,
    "sum": sum,
    "tuple": tuple,
}

#: Methods reachable with ``value.method`` (read-only ones only), by the value's type.
_METHODS: dict[type, frozenset[str]] = {
    dict: frozenset({"get", "keys", "values", "items"}),
    list: frozenset({"count", "index"}),
    tuple: frozenset({"count", "index"}),
    str: frozenset(
        {
            "capitalize",
            "casefold",
            "count",
            "endswith",
            "find",
            "isalnum",
            "isalpha",
            "isdigit",
            "islower",
            "isnumeric",
            "isspace",
            "isupper",
            "join",
            "lower",
            "lstrip",
            "partition",
            "removeprefix",
            "removesuffix",
            "replace",
            "rfind",
            "rpartition",
            "rsplit",
            "rstrip",
            "split",
            "splitlines",
            "startswith",
            "strip",
            "title",
            "upper",
            "zfill",
        }
    ),
    int: frozenset({"bit_length", "real", "imag"}),
    float: frozenset({"is_integer", "real", "imag"}),
}

_CONSTANT_HINTS = {"true": "True", "false": "False", "null": "None", "none": "None"}


class _Evaluator(simpleeval.EvalWithCompoundTypes):
    """simpleeval with JSON-style attribute access and read-only methods."""

    def __init__(self) -> None:
        super().__init__(functions=dict(FUNCTIONS), names={})

    def _eval_attribute(self, node: ast.Attribute) -> Any:
        attr = node.attr
        value = self._eval(node.value)
        if isinstance(value, dict) and attr in value:
            return value[attr]
        if attr in _METHODS.get(type(value), ()):
            return getattr(value, attr)
        if isinstance(value, dict):
            keys = ", ".join(repr(k) for k in list(value)[:10]) or "none"
            raise _NoAttribute(f"no key {attr!r} (keys: {keys})")
        raise _NoAttribute(f"{describe_type(value)} has no attribute {attr!r}")


class _NoAttribute(simpleeval.InvalidExpression):
    """``value.attr`` found neither a key nor an allowed method."""


_local = threading.local()


def _evaluator() -> _Evaluator:
    ev: _Evaluator | None = getattr(_local, "evaluator", None)
    if ev is None:
        ev = _local.evaluator = _Evaluator()
    return ev


# Node types the evaluator handles, plus the bits of syntax that are not evaluated on their own.
_PROBE = _Evaluator()
_ALLOWED_NODES: frozenset[type] = frozenset(
    set(_PROBE.nodes)
    | set(_PROBE.operators)
    | {ast.Expression, ast.Load, ast.Store, ast.comprehension, ast.And, ast.Or}
) - {ast.Assign, ast.AugAssign, ast.Import, ast.Expr}
del _PROBE


class Expression:
    """One compiled expression; :meth:`evaluate` is safe to call from any thread."""

    __slots__ = ("_node", "names", "text")

    def __init__(self, text: str, node: ast.expr, names: frozenset[str]) -> None:
        self.text = text
        self._node = node
        #: The free names the expression reads (functions excluded).
        self.names = names

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"

    def evaluate(self, names: Mapping[str, Any]) -> Any:
        """Evaluate over ``names``; raise :class:`ExpressionError` with a readable reason."""
        ev = _evaluator()
        ev.names = names
        try:
            return ev.eval(self.text, previously_parsed=self._node)
        except simpleeval.NameNotDefined as exc:
            raise ExpressionError(
                self.text, f"{exc.name!r} has no value yet in {self.text!r}"
            ) from None
        except _NoAttribute as exc:
            raise ExpressionError(self.text, f"{self.text!r}: {exc}") from None
        except KeyError as exc:
            raise ExpressionError(self.text, f"{self.text!r}: no key {exc.args[0]!r}") from None
        except IndexError:
            raise ExpressionError(self.text, f"{self.text!r}: index out of range") from None
        except Exception as exc:  # any failure of user code over device data ends here
            reason = str(exc) or type(exc).__name__
            raise ExpressionError(self.text, f"{self.text!r} failed: {reason}") from None
        finally:
            ev.names = _EMPTY


_EMPTY: Mapping[str, Any] = {}


def compile_expression(text: str) -> Expression:
    """Parse and check ``text`` once; raise :class:`ExpressionError` if it cannot work."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError(str(text), "an expression must be a non-empty string")
    source = text.strip()
    if source.startswith("{{") and source.endswith("}}"):
        inner = source[2:-2].strip()
        raise ExpressionError(text, f"write the expression without {{{{ }}}}: {inner}")
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        raise ExpressionError(text, f"bad expression {source!r}: {exc.msg}{where}") from None
    names: set[str] = set()
    _check(tree.body, source, frozenset(), names)
    return Expression(source, tree.body, frozenset(names))


def _check(node: ast.AST, text: str, bound: frozenset[str], names: set[str]) -> None:
    """Reject unsupported syntax; collect free names into ``names``."""
    kind = type(node)
    if kind not in _ALLOWED_NODES:
        raise ExpressionError(text, f"{kind.__name__} is not allowed in expressions ({text!r})")
    if isinstance(node, ast.Name):
        if isinstance(node.ctx, ast.Load) and node.id not in bound and node.id not in FUNCTIONS:
            names.add(node.id)
        return
    if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
        raise ExpressionError(text, f"attribute {node.attr!r} is not allowed (leading _)")
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name):
            if node.func.id not in FUNCTIONS:
                known = ", ".join(sorted(FUNCTIONS))
                raise ExpressionError(
                    text, f"unknown function {node.func.id!r} in {text!r}; functions: {known}"
                )
        elif not isinstance(node.func, ast.Attribute):
            raise ExpressionError(text, f"only functions and methods can be called ({text!r})")
        if any(k.arg is None for k in node.keywords):
            raise ExpressionError(text, f"** arguments are not allowed ({text!r})")
    if isinstance(node, (ast.ListComp, ast.GeneratorExp, ast.DictComp)):
        inner = bound
        for gen in node.generators:
            _check(gen.iter, text, inner, names)
            inner = inner | _targets(gen.target, text)
            for cond in gen.ifs:
                _check(cond, text, inner, names)
        elts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        for elt in elts:
            _check(elt, text, inner, names)
        return
    for child in ast.iter_child_nodes(node):
        _check(child, text, bound, names)


def _targets(target: ast.AST, text: str) -> frozenset[str]:
    if isinstance(target, ast.Name):
        return frozenset({target.id})
    if isinstance(target, (ast.Tuple, ast.List)):
        out: frozenset[str] = frozenset()
        for elt in target.elts:
            out |= _targets(elt, text)
        return out
    raise ExpressionError(text, f"unsupported comprehension target in {text!r}")


def constant_hint(name: str) -> str:
    """`` (did you mean True?)`` for JSON/YAML spellings of Python constants, else ``""``."""
    fix = _CONSTANT_HINTS.get(name.lower())
    return f" (did you mean {fix}?)" if fix else ""


# --- templates -----------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)

_Render = Callable[[Mapping[str, Any]], Any]


def has_template(value: Any) -> bool:
    """True when ``value`` (or anything inside it) contains a ``{{ }}`` placeholder."""
    if isinstance(value, str):
        return "{{" in value
    if isinstance(value, dict):
        return any(has_template(v) for v in value.values())
    if isinstance(value, list):
        return any(has_template(v) for v in value)
    return False


class Template:
    """A compiled params value; :meth:`render` returns the value with placeholders filled."""

    __slots__ = ("_render", "_value", "constant", "expressions", "names")

    def __init__(self, value: Any) -> None:
        exprs: list[Expression] = []
        render = _compile_value(value, exprs)
        self.expressions: tuple[Expression, ...] = tuple(exprs)
        self.names: frozenset[str] = frozenset().union(*(e.names for e in exprs))
        #: True when nothing is templated: :meth:`render` then returns one shared object.
        self.constant = not exprs
        self._render: _Render | None = None if self.constant else render
        self._value: Any = _plain(value) if self.constant else None

    def render(self, names: Mapping[str, Any]) -> Any:
        """The value with every placeholder evaluated; raises :class:`ExpressionError`."""
        if self._render is None:
            return self._value
        return self._render(names)


def compile_template(value: Any) -> Template:
    """Compile a params value (object, array, string or scalar); raise :class:`ExpressionError`."""
    return Template(value)


def _plain(value: Any) -> Any:
    """Copy YAML containers (with line info) into plain dicts and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _compile_value(value: Any, exprs: list[Expression]) -> _Render:
    if isinstance(value, str) and "{{" in value:
        return _compile_string(value, exprs)
    if isinstance(value, dict):
        items = [(k, _compile_value(v, exprs)) for k, v in value.items()]
        return lambda names: {k: render(names) for k, render in items}
    if isinstance(value, list):
        parts = [_compile_value(v, exprs) for v in value]
        return lambda names: [render(names) for render in parts]
    const = _plain(value)
    return lambda names: const


def _compile_string(text: str, exprs: list[Expression]) -> _Render:
    whole = _PLACEHOLDER.fullmatch(text.strip())
    if whole is not None and "}}" not in whole.group(1):
        expr = compile_expression(whole.group(1))
        exprs.append(expr)
        return expr.evaluate  # exactly one placeholder: keep the value's type
    pieces: list[str | Expression] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(text):
        if match.start() > pos:
            pieces.append(text[pos : match.start()])
        expr = compile_expression(match.group(1))
        exprs.append(expr)
        pieces.append(expr)
        pos = match.end()
    rest = text[pos:]
    if "{{" in rest:
        raise ExpressionError(text, f"unclosed {{{{ in {text!r}: close it with }}}}")
    if rest:
        pieces.append(rest)
    frozen = tuple(pieces)

    def render(names: Mapping[str, Any]) -> str:
        return "".join(
            piece if isinstance(piece, str) else _to_text(piece.evaluate(names)) for piece in frozen
        )

    return render


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
