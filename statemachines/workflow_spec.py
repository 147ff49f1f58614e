"""Workflow configs: YAML -> validated :class:`WorkflowSpec`, and the check against devices.

:func:`load_workflow` / :func:`parse_workflow` collect *every* problem of a file as a
:class:`~statemachines.source.ConfigError` (file, line, what to do) and raise them together as
:class:`~statemachines.source.ConfigErrors`; a spec that loads is complete: every target
exists, every state is reachable, every command has a timeout and a server, every expression
is compiled and reads only names that some state defines.

:func:`check_against` checks a loaded spec against the command catalogs of the servers.
The config format is documented in ``docs/workflows.md``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import keyword
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .durations import parse_duration
from .errorkinds import ERROR_KINDS
from .expressions import (
    Expression,
    ExpressionError,
    Template,
    compile_expression,
    compile_template,
    constant_hint,
    has_template,
)
from .source import ConfigError, ConfigErrors, describe_type, load_yaml, parse_yaml

__all__ = [
    "FINAL_OUTCOMES",
    "ROUTABLE_KINDS",
    "STATE_KEYS",
    "TOP_KEYS",
    "Choice",
    "ErrorRoutes",
    "RetrySpec",
    "StateSpec",
    "WorkflowSpec",
    "check_against",
    "format_duration",
    "load_workflow",
    "parse_address",
    "parse_workflow",
]

TOP_KEYS: tuple[str, ...] = (
    "name",
    "description",
    "initial",
    "states",
    "servers",
    "default_server",
    "timeout",
    "command_timeout",
    "on_abort",
    "inputs",
)

#: The keys each kind of state may use.
STATE_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "command": (
            "command",
            "params",
            "server",
            "timeout",
            "save",
            "next",
            "choices",
            "on_error",
            "retry",
            "description",
        ),
        "choice": ("choices", "description"),
        "wait": ("wait", "next", "description"),
        "await": ("await", "server", "if", "timeout", "next", "on_error", "save", "description"),
        "final": ("final", "description"),
    }
)
_KIND_KEYS = ("command", "wait", "await", "final")
RETRY_KEYS: tuple[str, ...] = ("attempts", "interval", "backoff", "max_delay", "on")
CHOICE_KEYS: tuple[str, ...] = ("if", "next")
FINAL_OUTCOMES: tuple[str, ...] = ("success", "failure")
#: Error kinds ``on_error`` and ``retry.on`` accept (besides integer codes and ``"*"``).
ROUTABLE_KINDS: frozenset[str] = ERROR_KINDS | {"server_error"}
DEFAULT_RETRY_ON: frozenset[str | int] = frozenset({"timeout", "connection_lost", "busy"})
RESERVED_NAMES: frozenset[str] = frozenset({"result", "params"})

_STATE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


# --- the spec ------------------------------------------------------------------------------


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
class StateSpec:
    """One validated state. ``kind`` is command, choice, wait, await or final.

    ``server`` and ``timeout`` are resolved (the default server, ``command_timeout``).
    ``awaits`` is the notification method of an await state, ``condition`` its ``if``.
    """

    name: str
    kind: str
    line: int
    description: str = ""
    command: str | None = None
    params: Template | None = None
    raw_params: Any = None
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

    def line_of(self, key: str) -> int:
        """The line of one of the state's keys (the state's line if absent)."""
        return self.key_lines.get(key, self.line)

    def targets(self) -> list[tuple[str, str]]:
        """``(label, target)`` of every way out of the state, in the order they are tried."""
        out: list[tuple[str, str]] = []
        if self.kind == "wait" and self.next is not None:
            out.append((f"after {format_duration(self.wait or 0.0)}", self.next))
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
    """A validated workflow. ``servers`` maps a name to ``"host:port"``."""

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
            problem = _not_json(value)
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
        """A copy with some server addresses replaced (``--server NAME=HOST:PORT``).

        Raises ValueError for a name the workflow does not use or a bad address.
        """
        servers = dict(self.servers)
        for name, address in overrides.items():
            if name not in servers:
                known = ", ".join(servers) or "none"
                raise ValueError(f"unknown server {name!r} (this workflow's servers: {known})")
            parse_address(address)
            servers[name] = address
        return replace(self, servers=MappingProxyType(servers))


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[::1]:port"``) -> ``(host, port)``; ValueError otherwise."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"expected host:port, got {address!r}")
    host, _, port_text = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected host:port with a port 1..65535, got {address!r}")
    return host, int(port_text)


def format_duration(seconds: float) -> str:
    """``0.5 -> "500ms"``, ``2 -> "2s"``, ``90 -> "90s"``, ``120 -> "2m"``."""
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


# --- loading -------------------------------------------------------------------------------


def load_workflow(path: str | Path) -> WorkflowSpec:
    """Read, parse and validate a workflow file; raise ConfigErrors listing every problem."""
    return _Loader(str(path)).load(load_yaml(path))


def parse_workflow(text: str, file: str = "<string>") -> WorkflowSpec:
    """Parse and validate workflow YAML text; raise ConfigErrors listing every problem."""
    return _Loader(file).load(parse_yaml(text, file))


def _suggest(word: Any, choices: Iterable[str]) -> str:
    options = [str(c) for c in choices]
    same = [c for c in options if c.lower() == str(word).lower()]
    close = same or difflib.get_close_matches(str(word), options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _line(node: Any, key: Any = None) -> int:
    if key is not None and hasattr(node, "line_of"):
        return int(node.line_of(key)) or 1
    return int(getattr(node, "line", 0)) or 1


def _not_a_string(value: Any) -> str:
    if isinstance(value, bool):
        return " (YAML reads yes/no/on/off/true/false as booleans: quote it)"
    return ""


class _Loader:
    """Builds one WorkflowSpec, collecting every problem instead of stopping at the first."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[ConfigError] = []
        self.state_names: list[str] = []
        self.servers: dict[str, str] = {}
        self.default_server: str | None = None
        self.command_timeout: float | None = None
        self.saved: set[str] = set()
        self.inputs: dict[str, Any] = {}
        self.cur_line = 1  # line of the state being built

    def err(self, line: int, message: str) -> None:
        self.errors.append(ConfigError(self.file, line or 1, message))

    # top level

    def load(self, root: Any) -> WorkflowSpec:
        if not isinstance(root, dict):
            self.err(_line(root), "a workflow file is a mapping with name, initial and states")
            raise ConfigErrors(self.errors)
        for key in root:
            if key not in TOP_KEYS:
                self.err(
                    _line(root, key),
                    f"unknown top-level key {key!r}{_suggest(key, TOP_KEYS)}; "
                    f"allowed keys: {', '.join(TOP_KEYS)}",
                )
        name = self._text(root, "name", "the workflow's name") or Path(self.file).stem
        description = self._text(root, "description", "a description") or ""
        self._servers(root)
        timeout = self._duration(root, "timeout", "the whole run's timeout")
        self.command_timeout = self._duration(root, "command_timeout", "the command timeout")
        self._inputs(root)

        raw_states = root.get("states")
        if not isinstance(raw_states, dict) or not raw_states:
            self.err(
                _line(root, "states"),
                "states must be a mapping of state names to states, e.g. states: {start: ...}",
            )
            raise ConfigErrors(self.errors)
        kinds = self._first_pass(raw_states)
        states: dict[str, StateSpec] = {}
        for sname, kind in kinds.items():
            built = self._state(sname, raw_states[sname], kind, _line(raw_states, sname))
            if built is not None:
                states[sname] = built

        initial = self._target(root, "initial", "the initial state", required=True)
        on_abort = self._target(root, "on_abort", "the on_abort state")
        if initial is not None and len(states) == len(raw_states):
            self._reachability(states, raw_states, initial, on_abort)
        if self.errors:
            raise ConfigErrors(sorted(self.errors, key=lambda e: e.line))
        assert initial is not None
        return WorkflowSpec(
            name=name,
            path=self.file,
            initial=initial,
            states=MappingProxyType(states),
            servers=MappingProxyType(self.servers),
            default_server=self.default_server,
            timeout=timeout,
            command_timeout=self.command_timeout,
            on_abort=on_abort,
            description=description,
            saved_names=frozenset(self.saved),
            line=_line(root),
            inputs=MappingProxyType(dict(self.inputs)),
        )

    def _text(self, node: Any, key: str, what: str) -> str | None:
        value = node.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.err(_line(node, key), f"{key} must be a non-empty string: {what}")
            return None
        return value

    def _duration(self, node: Any, key: str, what: str, *, positive: bool = True) -> float | None:
        if key not in node:
            return None
        try:
            seconds = parse_duration(node[key])
        except ValueError as exc:
            self.err(_line(node, key), f"bad duration for {key} ({what}): {exc}")
            return None
        if positive and seconds <= 0:
            self.err(_line(node, key), f"{key} must be more than 0, like 500ms, 2s or 1m")
            return None
        return seconds

    def _servers(self, root: Any) -> None:
        raw = root.get("servers")
        if raw is None:
            servers: dict[Any, Any] = {}
        elif not isinstance(raw, dict):
            self.err(_line(root, "servers"), 'servers must map names to "host:port"')
            servers = {}
        else:
            servers = raw
        for name, address in servers.items():
            if not isinstance(name, str) or not _STATE_NAME.match(name):
                self.err(_line(raw, name), f"bad server name {name!r}: use letters, digits, _, -")
                continue
            try:
                parse_address(address)
            except ValueError as exc:
                self.err(_line(raw, name), f"server {name!r}: {exc}, e.g. 127.0.0.1:15769")
                continue
            self.servers[name] = address
        default = root.get("default_server")
        if default is not None:
            if default not in servers:
                known = ", ".join(map(str, servers)) or "none"
                self.err(
                    _line(root, "default_server"),
                    f"default_server {default!r} is not one of the servers ({known})"
                    f"{_suggest(default, map(str, servers))}",
                )
            else:
                self.default_server = default
        elif len(servers) == 1:
            self.default_server = next(iter(servers))

    def _target(self, node: Any, key: Any, what: str, *, required: bool = False) -> str | None:
        """A reference to a state; reports missing/unknown ones."""
        line = _line(node, key)
        if key not in node or node[key] is None:
            if required:
                self.err(line, f"missing {key}: name {what}, one of {', '.join(self.state_names)}")
            return None
        value = node[key]
        if not isinstance(value, str):
            self.err(line, f"{key} must name a state, got {value!r}{_not_a_string(value)}")
            return None
        if value not in self.state_names:
            self.err(
                line,
                f"{key}: unknown state {value!r}{_suggest(value, self.state_names)}; "
                f"states: {', '.join(self.state_names)}",
            )
            return None
        return value

    # states

    def _first_pass(self, raw_states: dict[Any, Any]) -> dict[str, str]:
        """Check names and kinds; collect saved names. Returns name -> kind of good states."""
        kinds: dict[str, str] = {}
        names = [n for n in raw_states if isinstance(n, str)]
        self.state_names = names
        for name, body in raw_states.items():
            line = _line(raw_states, name)
            if not isinstance(name, str) or not _STATE_NAME.match(name):
                self.err(
                    line,
                    f"bad state name {name!r}{_not_a_string(name)}: start with a letter, "
                    "then letters, digits, _ or -",
                )
                continue
            if not isinstance(body, dict) or not body:
                self.err(
                    line,
                    f"state {name!r} is empty: give it one of command, choices, wait, await "
                    "or final",
                )
                continue
            present = [k for k in _KIND_KEYS if k in body]
            if len(present) > 1 or (present and present[0] != "command" and "choices" in body):
                mixed = present + (["choices"] if "choices" in body else [])
                self.err(
                    line,
                    f"state {name!r} mixes kinds ({', '.join(mixed)}): a state does one thing; "
                    "split it into one state per kind",
                )
                continue
            kind = present[0] if present else ("choice" if "choices" in body else "")
            if not kind:
                self.err(
                    line,
                    f"state {name!r} has no kind: give it one of command, choices, wait, await "
                    "or final",
                )
                continue
            allowed = STATE_KEYS[kind]
            for key in body:
                if key not in allowed:
                    self.err(
                        _line(body, key),
                        f"unknown key {key!r} in {kind} state {name!r}{_suggest(key, allowed)}; "
                        f"allowed keys: {', '.join(allowed)}",
                    )
            save = body.get("save")
            if save is not None and kind in ("command", "await"):
                self._check_save(body, name, save)
            kinds[name] = kind
        return kinds

    def _inputs(self, root: Any) -> None:
        raw = root.get("inputs")
        if raw is None:
            return
        if not isinstance(raw, dict):
            self.err(
                _line(root, "inputs"),
                "inputs must map names to default values, e.g. inputs: {target: 25}",
            )
            return
        for name, default in raw.items():
            if not self._check_name(_line(raw, name), "input", "inputs", name):
                continue
            problem = _not_json(default)
            if problem:
                self.err(_line(raw, name), f"input {name!r}: the default {problem}")
            else:
                self.inputs[name] = default

    def _check_save(self, body: Any, state: str, save: Any) -> None:
        if self._check_name(_line(body, "save"), "save name", f"state {state!r}", save):
            self.saved.add(save)

    def _check_name(self, line: int, what: str, where: str, name: Any) -> bool:
        """A name expressions can read (saved or input): report what is wrong with it."""
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            self.err(line, f"{what} {name!r} in {where} must be a name like level or door_state")
        elif name in RESERVED_NAMES:
            self.err(
                line,
                f"{what} {name!r} in {where} would shadow the built-in name {name!r}: "
                "choose another name",
            )
        elif name.startswith("_"):
            self.err(line, f"{what} {name!r} in {where} must not start with _")
        else:
            return True
        return False

    def _state(self, name: str, body: Any, kind: str, line: int) -> StateSpec | None:
        before = len(self.errors)
        self.cur_line = line
        key_lines = {k: _line(body, k) for k in body if isinstance(k, str)}
        spec: dict[str, Any] = {"description": self._text(body, "description", "a note") or ""}
        if kind == "command":
            spec.update(self._command(name, body))
        elif kind == "choice":
            spec["choices"] = self._choices(name, body, required=True)
        elif kind == "wait":
            spec["wait"] = self._duration(body, "wait", "how long to wait", positive=False)
            spec["next"] = self._way_out(name, body, "wait")
        elif kind == "await":
            spec.update(self._await(name, body))
        else:
            final = body.get("final")
            if final not in FINAL_OUTCOMES:
                self.err(
                    _line(body, "final"),
                    f"final must be success or failure, got {final!r}{_not_a_string(final)}",
                )
            spec["final"] = final
        if len(self.errors) > before:
            return None
        return StateSpec(name=name, kind=kind, line=line, key_lines=key_lines, **spec)

    def _way_out(self, name: str, body: Any, kind: str) -> str | None:
        if "next" not in body:
            self.err(
                self.cur_line,
                f"{kind} state {name!r} has no way out: add next: STATE",
            )
            return None
        return self._target(body, "next", "the next state")

    def _server(self, name: str, body: Any) -> str | None:
        server = body.get("server")
        if server is None:
            if self.default_server is None:
                if not self.servers:
                    self.err(
                        self.cur_line,
                        f"state {name!r} talks to a server but the workflow has no servers: "
                        'add servers: {device: "127.0.0.1:15769"}',
                    )
                else:
                    self.err(
                        self.cur_line,
                        f"state {name!r} names no server and there is no default: add "
                        f"server: NAME or default_server: NAME ({', '.join(self.servers)})",
                    )
            return self.default_server
        if server not in self.servers:
            known = ", ".join(self.servers) or "none"
            self.err(
                _line(body, "server"),
                f"unknown server {server!r}{_suggest(server, self.servers)}; servers: {known}",
            )
            return None
        return str(server)

    def _timeout(self, name: str, body: Any, kind: str) -> float | None:
        own = self._duration(body, "timeout", f"how long the {kind} may take")
        if own is None and "timeout" not in body and self.command_timeout is None:
            self.err(
                self.cur_line,
                f"{kind} state {name!r} has no timeout: add timeout: 5s to the state, "
                "or command_timeout: 5s at the top",
            )
        return own if own is not None else self.command_timeout

    def _command(self, name: str, body: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        command = body.get("command")
        if not isinstance(command, str) or not command or any(c.isspace() for c in command):
            self.err(
                _line(body, "command"),
                f"command must be a method name like demo.calibrate, got {command!r}",
            )
        out["command"] = command
        out["server"] = self._server(name, body)
        out["timeout"] = self._timeout(name, body, "command")
        raw = body.get("params")
        if raw is not None:
            if not isinstance(raw, (dict, list)):
                self.err(_line(body, "params"), "params must be a mapping or a list")
            else:
                self._check_templates(raw, _line(body, "params"), allowed=set())
                with contextlib.suppress(ExpressionError):  # reported by _check_templates
                    out["params"] = compile_template(raw)
                out["raw_params"] = raw
        out["save"] = body.get("save")
        if "next" in body and "choices" in body:
            self.err(
                _line(body, "choices"),
                f"command state {name!r} has both next and choices: keep one of them",
            )
        elif "choices" in body:
            out["choices"] = self._choices(name, body, required=True)
        else:
            out["next"] = self._way_out(name, body, "command")
        out["on_error"] = self._on_error(name, body)
        if "retry" in body:
            out["retry"] = self._retry(name, body)
        return out

    def _await(self, name: str, body: Any) -> dict[str, Any]:
        method = body.get("await")
        if not isinstance(method, str) or not method or any(c.isspace() for c in method):
            self.err(
                _line(body, "await"),
                f"await must name a notification method like device.state, got {method!r}",
            )
        out: dict[str, Any] = {"awaits": method, "save": body.get("save")}
        out["server"] = self._server(name, body)
        out["timeout"] = self._timeout(name, body, "await")
        if "if" in body:
            out["condition"] = self._expression(body, "if", allowed={"params"})
        out["next"] = self._way_out(name, body, "await")
        out["on_error"] = self._on_error(name, body)
        return out

    # expressions

    def _expression(self, node: Any, key: Any, *, allowed: set[str]) -> Expression | None:
        line = _line(node, key)
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
                    f"{constant_hint(unknown)}{_suggest(unknown, known)}"
                )
            self.err(line, f"{unknown!r} is never defined in {text!r}: {hint}")

    def _check_templates(self, value: Any, line: int, *, allowed: set[str]) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                self._check_templates(v, _line(value, k), allowed=allowed)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self._check_templates(v, _line(value, i), allowed=allowed)
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
        line = _line(body, "choices")
        if not isinstance(raw, list) or not raw:
            self.err(line, f"choices of {name!r} must be a list of {{if: EXPRESSION, next: STATE}}")
            return ()
        out: list[Choice] = []
        for i, item in enumerate(raw):
            item_line = _line(raw, i)
            if not isinstance(item, dict):
                self.err(item_line, "each choice is a mapping {if: EXPRESSION, next: STATE}")
                continue
            for key in item:
                if key not in CHOICE_KEYS:
                    self.err(
                        _line(item, key),
                        f"unknown key {key!r} in a choice{_suggest(key, CHOICE_KEYS)}; "
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
            self.err(line, f"bad error kind {key!r}{_not_a_string(key)}")
            return None
        if isinstance(key, int):
            return key
        if isinstance(key, str) and re.fullmatch(r"-?\d+", key.strip()):
            return int(key)
        if key == "*" or key in ROUTABLE_KINDS:
            return str(key)
        self.err(
            line,
            f"unknown error kind {key!r}{_suggest(key, ROUTABLE_KINDS)}; use one of "
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
                _line(body, "on_error"),
                'on_error is a state name, or a mapping like {not_allowed: STATE, "*": STATE}',
            )
            return ErrorRoutes()
        by_code: dict[int, str] = {}
        by_kind: dict[str, str] = {}
        default = None
        for key in raw:
            parsed = self._error_key(key, _line(raw, key))
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
        line = _line(body, "retry")
        if not isinstance(raw, dict):
            self.err(line, "retry is a mapping like {attempts: 3, interval: 1s}")
            return None
        # YAML 1.1 reads a bare `on` key as the boolean True.
        raw_on = raw.get("on", raw.get(True))
        on_line = _line(raw, "on" if "on" in raw else True)
        for key in raw:
            if key is True or key in RETRY_KEYS:
                continue
            self.err(
                _line(raw, key),
                f"unknown key {key!r} in retry{_suggest(key, RETRY_KEYS)}; "
                f"allowed keys: {', '.join(RETRY_KEYS)}",
            )
        before = len(self.errors)
        attempts = raw.get("attempts")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            self.err(
                _line(raw, "attempts") if "attempts" in raw else line,
                f"retry.attempts must be a whole number >= 1 (every try, the first included), "
                f"got {attempts!r}",
            )
        interval = self._duration(raw, "interval", "the first retry delay", positive=False)
        backoff = raw.get("backoff", 2.0)
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or backoff < 1:
            self.err(_line(raw, "backoff"), f"retry.backoff must be a number >= 1, got {backoff!r}")
        max_delay = self._duration(raw, "max_delay", "the longest retry delay")
        on: set[str | int] = set(DEFAULT_RETRY_ON)
        if raw_on is not None or "on" in raw or True in raw:
            if not isinstance(raw_on, list) or not raw_on:
                self.err(on_line, "retry.on must be a list of error kinds, e.g. [timeout, busy]")
            else:
                on = set()
                for i, kind in enumerate(raw_on):
                    parsed = self._error_key(kind, _line(raw_on, i))
                    if parsed is not None:
                        on.add(parsed)
        if len(self.errors) > before:
            return None
        assert isinstance(attempts, int)
        return RetrySpec(
            attempts=attempts,
            interval=1.0 if interval is None else interval,
            backoff=float(backoff),
            max_delay=max_delay,
            on=frozenset(on),
        )

    # graph checks

    def _reachability(
        self,
        states: Mapping[str, StateSpec],
        raw_states: Any,
        initial: str,
        on_abort: str | None,
    ) -> None:
        seen: set[str] = set()
        todo = [initial] + ([on_abort] if on_abort else [])
        while todo:
            name = todo.pop()
            if name in seen or name not in states:
                continue
            seen.add(name)
            todo.extend(target for _, target in states[name].targets())
        for name in states:
            if name not in seen:
                roots = f"initial {initial!r}" + (f" or on_abort {on_abort!r}" if on_abort else "")
                self.err(
                    _line(raw_states, name),
                    f"state {name!r} is unreachable from {roots}: remove it, or point a next, "
                    "choice or on_error at it",
                )
        # Every reachable state must have a path to a final state; otherwise a run there
        # could only end by abort or timeout (e.g. two waits pointing at each other).
        can_finish = {name for name, state in states.items() if state.final is not None}
        grew = True
        while grew:
            grew = False
            for name, state in states.items():
                if name not in can_finish and any(t in can_finish for _, t in state.targets()):
                    can_finish.add(name)
                    grew = True
        for name in states:
            if name in seen and name not in can_finish:
                self.err(
                    _line(raw_states, name),
                    f"no final state can be reached from state {name!r}: a run there could "
                    "only end by abort or timeout; add a next, choice or on_error that leads "
                    "to a state with final: success or final: failure",
                )


# --- the check against device descriptions ------------------------------------------------

_TYPE_CHECKS: Mapping[str, Any] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "string": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, list),
    "array": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
    "object": lambda v: isinstance(v, dict),
}


def check_against(
    spec: WorkflowSpec, catalogs: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> list[ConfigError]:
    """Check the commands of ``spec`` against what its servers offer; return the problems.

    ``catalogs`` maps a *server name* of the workflow to that server's catalog, which maps a
    wire method to ``{"device", "command", "from": [...], "states": [...], "params": {name:
    {"type", "minimum", "maximum", "enum", "default", "required"}}}`` (``min``/``max``/
    ``choices`` are accepted too, and ``params`` may be a JSON Schema object with
    ``properties`` and ``required``). The key ``"*"`` gives the catalog of every server without
    its own; a server with neither is not checked. Methods under ``rpc.`` are always known
    and never checked.

    Reported: a command the server does not have, a command whose ``from`` states are empty
    (it can never run), literal params that do not fit (unknown name, missing required param,
    wrong type, out of range, not in enum). Templated values (``{{ }}``) are not type-checked.
    """
    errors: list[ConfigError] = []
    for state in spec.states.values():
        if state.kind != "command" or state.command is None or state.server is None:
            continue
        catalog = catalogs.get(state.server, catalogs.get("*"))
        method = state.command
        if catalog is None or method.startswith("rpc."):
            continue

        def err(line: int, message: str, at: int = state.line) -> None:
            errors.append(ConfigError(spec.path, line or at, message))

        entry = catalog.get(method)
        if entry is None:
            known = ", ".join(sorted(m for m in catalog if not m.startswith("rpc."))) or "none"
            err(
                state.line_of("command"),
                f"state {state.name!r}: server {state.server!r} has no command {method!r}"
                f"{_suggest(method, catalog)}; its commands: {known}",
            )
            continue
        if not entry.get("from"):
            err(
                state.line_of("command"),
                f"state {state.name!r}: {method} can never run: its device "
                f"{entry.get('device', '?')!r} allows it from no state (check the device config)",
            )
        _check_params(state, method, entry.get("params"), err)
    return errors


def _declared(params: Any) -> tuple[dict[str, Mapping[str, Any]], set[str]]:
    """``(name -> rule, required names)`` from ``{name: rule}`` or a JSON Schema object."""
    if not isinstance(params, Mapping):
        return {}, set()
    props = params.get("properties")
    if params.get("type") == "object" and isinstance(props, Mapping):
        rules = {str(k): v if isinstance(v, Mapping) else {} for k, v in props.items()}
        return rules, {str(n) for n in params.get("required") or ()}
    rules = {str(k): v if isinstance(v, Mapping) else {} for k, v in params.items()}
    return rules, {n for n, r in rules.items() if r.get("required") and "default" not in r}


def _check_params(state: StateSpec, method: str, params: Any, err: Any) -> None:
    declared, required = _declared(params)
    raw = state.raw_params
    where = state.line_of("params")
    if raw is None:
        given: dict[str, tuple[Any, int]] = {}
    elif isinstance(raw, list):
        names = list(declared)
        if len(raw) > len(names):
            err(where, f"{method} takes at most {len(names)} params, got {len(raw)}")
        given = {n: (v, _line(raw, i)) for i, (n, v) in enumerate(zip(names, raw, strict=False))}
    else:
        given = {k: (v, _line(raw, k)) for k, v in raw.items()}
    for pname, (value, line) in given.items():
        if pname not in declared:
            allowed = ", ".join(map(str, declared)) or "none"
            err(
                line,
                f"{method} has no param {pname!r}{_suggest(pname, map(str, declared))}; "
                f"params: {allowed}",
            )
            continue
        if has_template(value):
            continue
        problem = _param_problem(declared[pname], value)
        if problem:
            err(line, f"{method} param {pname!r}: {problem}")
    for pname in declared:
        if pname in required and pname not in given:
            err(where, f"{method} needs param {pname!r}: add it under params")


def _param_problem(rule: Mapping[str, Any], value: Any) -> str | None:
    kind = rule.get("type")
    check = _TYPE_CHECKS.get(kind) if isinstance(kind, str) else None
    if check is not None and not check(value):
        return f"must be of type {kind}, got {value!r}"
    enum = rule.get("enum", rule.get("choices"))
    if enum is not None and value not in enum:
        return f"must be one of {', '.join(map(repr, enum))}, got {value!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low = rule.get("minimum", rule.get("min"))
        high = rule.get("maximum", rule.get("max"))
        if low is not None and value < low:
            return f"must be >= {low}, got {value!r}"
        if high is not None and value > high:
            return f"must be <= {high}, got {value!r}"
    return None


def _kind_of(value: Any) -> str:
    """An input's kind, for checking a value against its default (an integer is a number)."""
    kind = describe_type(value)
    return "a number" if kind == "an integer" else kind


def _not_json(value: Any) -> str | None:
    """Why ``value`` cannot be sent as JSON (None if it can): inputs go into params."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return (
            f"{value!r} is not a JSON value (text, number, true/false, null, list or mapping): "
            "quote dates and times, e.g. '2024-05-01'"
        )
    return None
