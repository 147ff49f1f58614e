"""The workflow spec: the validated, immutable description of a workflow (no loading here).

:mod:`.loader` builds these from YAML; a spec that exists is complete (see there).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ..addresses import format_address, parse_server
from ..durations import format_duration, parse_duration
from ..errorkinds import ERROR_KINDS
from ..expressions import Expression, ExpressionError, Template
from ..source import describe_type

__all__ = [
    "DEFAULT_RETRY_ON",
    "FINAL_OUTCOMES",
    "ROUTABLE_KINDS",
    "Choice",
    "DurationTemplate",
    "ErrorRoutes",
    "RawParams",
    "RetrySpec",
    "StateSpec",
    "WorkflowSpec",
    "json_problem",
    "normal_address",
]

FINAL_OUTCOMES: tuple[str, ...] = ("success", "failure")
#: Error kinds ``on_error`` and ``retry.on`` accept (besides integer codes and ``"*"``).
ROUTABLE_KINDS: frozenset[str] = ERROR_KINDS | {"server_error"}
DEFAULT_RETRY_ON: frozenset[str | int] = frozenset({"timeout", "connection_lost", "busy"})

#: A command state's ``params`` as written (YAML values, with their lines): a mapping or a list.
RawParams = Mapping[str, Any] | list[Any]


@dataclass(frozen=True)
class RetrySpec:
    """``retry:`` of a command state. ``attempts`` counts every try, the first included."""

    attempts: int
    interval: float = 1.0
    backoff: float = 2.0
    max_delay: float | None = None
    on: frozenset[str | int] = DEFAULT_RETRY_ON

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after try number ``failed_attempt`` (1-based) failed."""
        delay = self.interval * self.backoff ** (failed_attempt - 1)
        return delay if self.max_delay is None else min(delay, self.max_delay)

    def applies(self, kind: str, code: int | None) -> bool:
        """True when an error of this kind/code is retried."""
        on = self.on
        return kind in on or (code is not None and code in on) or "*" in on


@dataclass(frozen=True)
class ErrorRoutes:
    """``on_error``: an integer code route wins over a kind route, which wins over ``"*"``."""

    by_code: Mapping[int, str] = field(default_factory=dict)
    by_kind: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None

    def route(self, kind: str, code: int | None) -> str | None:
        """The target state for an error, or None when nothing routes it."""
        if code is not None and code in self.by_code:
            return self.by_code[code]
        return self.by_kind.get(kind, self.default)

    def targets(self) -> list[tuple[str, str]]:
        """``(label, target)`` for every route, in precedence order."""
        out = [(f"error {code}", t) for code, t in self.by_code.items()]
        out += [(f"error: {kind}", t) for kind, t in self.by_kind.items()]
        if self.default is not None:
            out.append(("error", self.default))
        return out

    def __bool__(self) -> bool:
        return bool(self.by_code or self.by_kind or self.default is not None)


@dataclass(frozen=True)
class Choice:
    """One entry of ``choices``; ``condition`` None is the default (always last)."""

    condition: Expression | None
    next: str
    line: int

    @property
    def label(self) -> str:
        return "else" if self.condition is None else self.condition.text


@dataclass(frozen=True)
class DurationTemplate:
    """A duration written with ``{{ }}``: rendered over a run's context, then read as a
    duration (a number of seconds or ``"500ms"``, ``"2s"``...). ``field`` is what it sets
    (``wait``, ``timeout``, ``retry.interval``), ``key`` the key it was written under."""

    field: str
    key: str
    template: Template
    text: str
    positive: bool = True

    def render(self, names: Mapping[str, Any]) -> float:
        """Seconds; raises :class:`ExpressionError` when the value is not a duration."""
        value = self.template.render(names)
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise ExpressionError(
                self.text, f"{self.key} {self.text!r} is not a duration: {exc}"
            ) from None
        if self.positive and seconds <= 0:
            raise ExpressionError(
                self.text, f"{self.key} {self.text!r} must be more than 0, got {value!r}"
            )
        return seconds


@dataclass(frozen=True)
class StateSpec:
    """One validated state. ``kind`` is command, choice, wait, await or final.

    ``server`` and ``timeout`` are resolved (the default server, ``command_timeout``).
    ``awaits`` is the notification method of an await state, ``condition`` its ``if``.
    ``params`` is the compiled template, ``raw_params`` the params as written (for the check).
    ``durations`` are the templated ones (``wait``, ``timeout``, ``retry.interval``): their
    fields hold nothing usable until :meth:`resolved` renders them as the state is entered.
    """

    name: str
    kind: str
    line: int
    description: str = ""
    command: str | None = None
    params: Template | None = None
    raw_params: RawParams | None = None
    server: str | None = None
    timeout: float | None = None
    save: str | None = None
    next: str | None = None
    choices: tuple[Choice, ...] = ()
    on_error: ErrorRoutes = field(default_factory=ErrorRoutes)
    retry: RetrySpec | None = None
    wait: float | None = None
    awaits: str | None = None
    condition: Expression | None = None
    final: str | None = None
    key_lines: Mapping[str, int] = field(default_factory=dict)
    durations: tuple[DurationTemplate, ...] = ()

    def resolved(self, names: Mapping[str, Any]) -> StateSpec:
        """This state with its templated durations rendered over ``names`` (raises
        :class:`ExpressionError`); itself when none is templated."""
        if not self.durations:
            return self
        values = {d.field: d.render(names) for d in self.durations}
        retry = self.retry
        if retry is not None and "retry.interval" in values:
            retry = replace(retry, interval=values["retry.interval"])
        return replace(
            self,
            wait=values.get("wait", self.wait),
            timeout=values.get("timeout", self.timeout),
            retry=retry,
        )

    def templated(self, field_name: str) -> DurationTemplate | None:
        """The template of a duration field, or None when it is static."""
        return next((d for d in self.durations if d.field == field_name), None)

    def line_of(self, key: str) -> int:
        """The line of one of the state's keys (the state's line if absent)."""
        return self.key_lines.get(key, self.line)

    def targets(self) -> list[tuple[str, str]]:
        """``(label, target)`` of every way out of the state, in the order they are tried."""
        out: list[tuple[str, str]] = []
        if self.kind == "wait" and self.next is not None:
            template = self.templated("wait")
            after = template.text if template is not None else format_duration(self.wait or 0.0)
            out.append((f"after {after}", self.next))
        elif self.kind == "await" and self.next is not None:
            cond = f" if {self.condition.text}" if self.condition is not None else ""
            out.append((f"{self.awaits}{cond}", self.next))
        elif self.next is not None:
            out.append(("ok", self.next))
        out += [(c.label, c.next) for c in self.choices]
        out += self.on_error.targets()
        return out


@dataclass(frozen=True)
class WorkflowSpec:
    """A validated workflow. ``servers`` maps a name to ``"host:port"`` or
    ``"mqtt://broker:port/node"`` (port filled in)."""

    name: str
    path: str
    initial: str
    states: Mapping[str, StateSpec]
    servers: Mapping[str, str]
    default_server: str | None
    timeout: float | None
    command_timeout: float | None
    on_abort: str | None
    description: str = ""
    saved_names: frozenset[str] = frozenset()
    line: int = 1
    #: name -> default value; set per run with ``--set NAME=VALUE`` or ``start(context=...)``
    inputs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: the YAML text the spec was loaded from (a run's journal keeps it: a resume rebuilds
    #: the workflow from it); None for a spec built otherwise
    source_text: str | None = field(default=None, repr=False)
    #: a ``timeout`` written with ``{{ }}`` (of inputs), rendered as a run starts; then
    #: ``timeout`` is None
    timeout_template: DurationTemplate | None = None

    def run_context(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The context a run starts with: ``result`` (None) and every input, its default
        replaced by ``values``. Raises ValueError for a name that is not an input."""
        context: dict[str, Any] = {"result": None, **self.inputs}
        for key, value in (values or {}).items():
            if key not in self.inputs:
                known = ", ".join(self.inputs) or "none"
                raise ValueError(
                    f"workflow {self.name} has no input {key!r} (inputs: {known}); "
                    "declare it under inputs: in the workflow"
                )
            problem = json_problem(value)
            if problem:
                raise ValueError(f"input {key!r} of workflow {self.name}: the value {problem}")
            default = self.inputs[key]
            if default is not None and _kind_of(value) != _kind_of(default):
                raise ValueError(
                    f"input {key!r} of workflow {self.name} takes {_kind_of(default)} like its "
                    f"default {json.dumps(default, default=str)}, got {describe_type(value)} "
                    f"{json.dumps(value, default=str)}"
                )
            context[key] = value
        return context

    def finals(self) -> tuple[str, ...]:
        """The names of the final states."""
        return tuple(n for n, s in self.states.items() if s.kind == "final")

    def with_servers(self, overrides: Mapping[str, str]) -> WorkflowSpec:
        """A copy with some server addresses replaced (``--server NAME=ADDRESS``).

        Raises ValueError for a name the workflow does not use or a bad address.
        """
        servers = dict(self.servers)
        for name, address in overrides.items():
            if name not in servers:
                known = ", ".join(servers) or "none"
                raise ValueError(f"unknown server {name!r} (this workflow's servers: {known})")
            servers[name] = normal_address(address)
        return replace(self, servers=MappingProxyType(servers))


def normal_address(address: str) -> str:
    """``"pi"`` -> ``"pi:15769"``, ``"mqtt://broker/pi-1"`` -> ``"mqtt://broker:1883/pi-1"``: a
    server address in the one parser's form (ValueError if bad)."""
    return format_address(parse_server(address))


def _kind_of(value: Any) -> str:
    """An input's kind, for checking a value against its default (an integer is a number)."""
    kind = describe_type(value)
    return "a number" if kind == "an integer" else kind


def json_problem(value: Any) -> str | None:
    """Why ``value`` cannot be sent as JSON (None if it can): inputs go into params."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return (
            f"{value!r} is not a JSON value (text, number, true/false, null, list or mapping): "
            "quote dates and times, e.g. '2024-05-01'"
        )
    return None
