"""Reading the values of a workflow file, collecting every problem: durations, state
references, expressions and templates, and the ways out of a state (choices, ``on_error``,
``retry``). :mod:`.loader` builds on it for the file's structure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from ..durations import parse_duration
from ..expressions import (
    Expression,
    ExpressionError,
    compile_expression,
    compile_template,
    constant_hint,
    has_template,
)
from ..source import ConfigError, line_of, suggest, yaml_bool_hint
from .model import (
    DEFAULT_RETRY_ON,
    ROUTABLE_KINDS,
    Choice,
    DurationTemplate,
    ErrorRoutes,
    RetrySpec,
)

__all__ = ["CHOICE_KEYS", "RETRY_KEYS", "Reader", "line_at"]

RETRY_KEYS: tuple[str, ...] = ("attempts", "interval", "backoff", "max_delay", "on")
CHOICE_KEYS: tuple[str, ...] = ("if", "next")


def line_at(node: Any, key: Any = None) -> int:
    """The line of ``node`` (or of its ``key``); 1 when it did not come from YAML."""
    return line_of(node, key) or 1


class Reader:
    """The problems found so far and the names a workflow defines; reads one value at a time."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[ConfigError] = []
        self.state_names: list[str] = []
        self.saved: set[str] = set()
        self.inputs: dict[str, Any] = {}
        self.cur_line = 1  # line of the state being built
        self.templated: list[DurationTemplate] = []  # of the state being built

    def err(self, line: int, message: str) -> None:
        self.errors.append(ConfigError(self.file, line or 1, message))

    def _text(self, node: Any, key: str, what: str) -> str | None:
        value = node.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.err(line_at(node, key), f"{key} must be a non-empty string: {what}")
            return None
        return value

    def _duration(self, node: Any, key: str, what: str, *, positive: bool = True) -> float | None:
        """A duration that must be written as one (no ``{{ }}``)."""
        if key not in node:
            return None
        value = node[key]
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            hint = " (this key takes no {{ }} template)" if has_template(value) else ""
            self.err(line_at(node, key), f"bad duration for {key} ({what}){hint}: {exc}")
            return None
        if positive and seconds <= 0:
            self.err(line_at(node, key), f"{key} must be more than 0, like 500ms, 2s or 1m")
            return None
        return seconds

    def _timed(
        self,
        node: Any,
        key: str,
        what: str,
        *,
        field: str,
        positive: bool = True,
        names: set[str] | None = None,
    ) -> float | DurationTemplate | None:
        """A duration, or a ``{{ }}`` template of one (rendered when ``field`` is used).
        ``names``: the only names the template may read (default: every name)."""
        value = node.get(key)
        if not isinstance(value, str) or not has_template(value):
            return self._duration(node, key, what, positive=positive)
        line = line_at(node, key)
        try:
            template = compile_template(value)
        except ExpressionError as exc:
            self.err(line, exc.message)
            return None
        if names is None:
            self._check_names(template.names, line, value, set())
        else:
            for unknown in sorted(template.names - names):
                self.err(
                    line,
                    f"{unknown!r} has no value when {key} {value!r} is read ({what}): "
                    f"use an input (inputs: {', '.join(sorted(names)) or 'none'})",
                )
        return DurationTemplate(field, key, template, value.strip(), positive)

    def _static(self, value: float | DurationTemplate | None) -> float | None:
        """A static duration as is; a template is kept for the state being built (None)."""
        if isinstance(value, DurationTemplate):
            self.templated.append(value)
            return None
        return value

    def _target(self, node: Any, key: Any, what: str, *, required: bool = False) -> str | None:
        """A reference to a state; reports missing/unknown ones."""
        line = line_at(node, key)
        if key not in node or node[key] is None:
            if required:
                self.err(line, f"missing {key}: name {what}, one of {', '.join(self.state_names)}")
            return None
        value = node[key]
        if not isinstance(value, str):
            self.err(line, f"{key} must name a state, got {value!r}{yaml_bool_hint(value)}")
            return None
        if value not in self.state_names:
            self.err(
                line,
                f"{key}: unknown state {value!r}{suggest(value, self.state_names)}; "
                f"states: {', '.join(self.state_names)}",
            )
            return None
        return value

    # expressions

    def _expression(self, node: Any, key: Any, *, allowed: set[str]) -> Expression | None:
        line = line_at(node, key)
        text = node[key]
        if not isinstance(text, str):
            shown = (
                json.dumps(text)
                if isinstance(text, (bool, int, float)) or text is None
                else repr(text)
            )
            self.err(line, f"{key} must be an expression string, got {shown}: quote it")
            return None
        try:
            expr = compile_expression(text)
        except ExpressionError as exc:
            self.err(line, exc.message)
            return None
        self._check_names(expr.names, line, text, allowed)
        return expr

    def _check_names(self, names: Iterable[str], line: int, text: str, allowed: set[str]) -> None:
        known = {"result"} | self.saved | set(self.inputs) | allowed
        for unknown in sorted(set(names) - known):
            if unknown == "params":
                hint = "params is only defined in the if of an await state"
            else:
                saved = ", ".join(sorted(self.saved | set(self.inputs))) or "none"
                hint = (
                    f"use result, an input, or a name saved with save: (names: {saved})"
                    f"{constant_hint(unknown)}{suggest(unknown, known)}"
                )
            self.err(line, f"{unknown!r} is never defined in {text!r}: {hint}")

    def _check_templates(self, value: Any, line: int, *, allowed: set[str]) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                self._check_templates(v, line_at(value, k), allowed=allowed)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self._check_templates(v, line_at(value, i), allowed=allowed)
        elif isinstance(value, str) and has_template(value):
            try:
                template = compile_template(value)
            except ExpressionError as exc:
                self.err(line, exc.message)
                return
            self._check_names(template.names, line, value, allowed)

    # routes

    def _choices(self, name: str, body: Any, *, required: bool) -> tuple[Choice, ...]:
        raw = body.get("choices")
        line = line_at(body, "choices")
        if not isinstance(raw, list) or not raw:
            self.err(line, f"choices of {name!r} must be a list of {{if: EXPRESSION, next: STATE}}")
            return ()
        out: list[Choice] = []
        for i, item in enumerate(raw):
            item_line = line_at(raw, i)
            if not isinstance(item, dict):
                self.err(item_line, "each choice is a mapping {if: EXPRESSION, next: STATE}")
                continue
            for key in item:
                if key not in CHOICE_KEYS:
                    self.err(
                        line_at(item, key),
                        f"unknown key {key!r} in a choice{suggest(key, CHOICE_KEYS)}; "
                        "allowed keys: if, next",
                    )
            if "if" not in item and i != len(raw) - 1:
                self.err(
                    item_line,
                    f"the default choice (no if) of {name!r} must be the last one: move it down",
                )
            condition = self._expression(item, "if", allowed=set()) if "if" in item else None
            target = self._target(item, "next", "the state to go to", required=True)
            if target is not None:
                out.append(Choice(condition, target, item_line))
        return tuple(out)

    def _error_key(self, key: Any, line: int) -> str | int | None:
        if isinstance(key, bool):
            self.err(line, f"bad error kind {key!r}{yaml_bool_hint(key)}")
            return None
        if isinstance(key, int):
            return key
        if isinstance(key, str) and re.fullmatch(r"-?\d+", key.strip()):
            return int(key)
        if key == "*" or key in ROUTABLE_KINDS:
            return str(key)
        self.err(
            line,
            f"unknown error kind {key!r}{suggest(key, ROUTABLE_KINDS)}; use one of "
            f'{", ".join(sorted(ROUTABLE_KINDS))}, an integer code or "*"',
        )
        return None

    def _on_error(self, name: str, body: Any) -> ErrorRoutes:
        if "on_error" not in body:
            return ErrorRoutes()
        raw = body["on_error"]
        if isinstance(raw, str) or raw is None or isinstance(raw, bool):
            target = self._target(body, "on_error", "the state to go to on any error")
            return ErrorRoutes(default=target)
        if not isinstance(raw, dict) or not raw:
            self.err(
                line_at(body, "on_error"),
                'on_error is a state name, or a mapping like {not_allowed: STATE, "*": STATE}',
            )
            return ErrorRoutes()
        by_code: dict[int, str] = {}
        by_kind: dict[str, str] = {}
        default = None
        for key in raw:
            parsed = self._error_key(key, line_at(raw, key))
            target = self._target(raw, key, "the state to go to")
            if parsed is None or target is None:
                continue
            if isinstance(parsed, int):
                by_code[parsed] = target
            elif parsed == "*":
                default = target
            else:
                by_kind[parsed] = target
        return ErrorRoutes(by_code, by_kind, default)

    def _retry(self, name: str, body: Any) -> RetrySpec | None:
        raw = body["retry"]
        line = line_at(body, "retry")
        if not isinstance(raw, dict):
            self.err(line, "retry is a mapping like {attempts: 3, interval: 1s}")
            return None
        # YAML 1.1 reads a bare `on` key as the boolean True.
        raw_on = raw.get("on", raw.get(True))
        on_line = line_at(raw, "on" if "on" in raw else True)
        for key in raw:
            if key is True or key in RETRY_KEYS:
                continue
            self.err(
                line_at(raw, key),
                f"unknown key {key!r} in retry{suggest(key, RETRY_KEYS)}; "
                f"allowed keys: {', '.join(RETRY_KEYS)}",
            )
        before = len(self.errors)
        attempts = raw.get("attempts")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            self.err(
                line_at(raw, "attempts") if "attempts" in raw else line,
                f"retry.attempts must be a whole number >= 1 (every try, the first included), "
                f"got {attempts!r}",
            )
        interval = self._timed(
            raw, "interval", "the first retry delay", field="retry.interval", positive=False
        )
        backoff = raw.get("backoff", 2.0)
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or backoff < 1:
            self.err(
                line_at(raw, "backoff"), f"retry.backoff must be a number >= 1, got {backoff!r}"
            )
        max_delay = self._duration(raw, "max_delay", "the longest retry delay")
        on: set[str | int] = set(DEFAULT_RETRY_ON)
        if raw_on is not None or "on" in raw or True in raw:
            if not isinstance(raw_on, list) or not raw_on:
                self.err(on_line, "retry.on must be a list of error kinds, e.g. [timeout, busy]")
            else:
                on = set()
                for i, kind in enumerate(raw_on):
                    parsed = self._error_key(kind, line_at(raw_on, i))
                    if parsed is not None:
                        on.add(parsed)
        if len(self.errors) > before:
            return None
        assert isinstance(attempts, int)
        first = self._static(interval)
        return RetrySpec(
            attempts=attempts,
            interval=1.0 if first is None else first,
            backoff=float(backoff),
            max_delay=max_delay,
            on=frozenset(on),
        )
