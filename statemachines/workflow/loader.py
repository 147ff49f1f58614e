"""Workflow configs: YAML -> a validated :class:`~.model.WorkflowSpec`.

:func:`load_workflow` / :func:`parse_workflow` collect *every* problem of a file as a
:class:`~statemachines.source.ConfigError` (file, line, what to do) and raise them together as
:class:`~statemachines.source.ConfigErrors`; a spec that loads is complete: every target
exists, every state is reachable, every command has a timeout and a server, every expression
is compiled and reads only names that some state defines. The format is documented in
``docs/workflows.md``.
"""

from __future__ import annotations

import contextlib
import keyword
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..expressions import ExpressionError, compile_template
from ..source import ConfigErrors, parse_yaml, read_source, suggest, yaml_bool_hint
from .model import (
    FINAL_OUTCOMES,
    DurationTemplate,
    StateSpec,
    WorkflowSpec,
    json_problem,
    normal_address,
)
from .reader import Reader, line_at

__all__ = ["STATE_KEYS", "TOP_KEYS", "load_workflow", "parse_workflow"]

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
RESERVED_NAMES: frozenset[str] = frozenset({"result", "params"})

_STATE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def load_workflow(path: str | Path) -> WorkflowSpec:
    """Read, parse and validate a workflow file; raise ConfigErrors listing every problem.
    The spec's ``source_text`` is the file's text."""
    return parse_workflow(read_source(path), str(path))


def parse_workflow(text: str, file: str = "<string>") -> WorkflowSpec:
    """Parse and validate workflow YAML text; raise ConfigErrors listing every problem.
    The spec's ``source_text`` is ``text``."""
    return _Loader(file, text).load(parse_yaml(text, file))


class _Loader(Reader):
    """Builds one WorkflowSpec, collecting every problem instead of stopping at the first."""

    def __init__(self, file: str, text: str) -> None:
        super().__init__(file)
        self.text = text
        self.servers: dict[str, str] = {}
        self.default_server: str | None = None
        self.command_timeout: float | DurationTemplate | None = None
        self.has_command_timeout = False  # written, even if wrong (reported once, there)

    # top level

    def load(self, root: Any) -> WorkflowSpec:
        if not isinstance(root, dict):
            self.err(line_at(root), "a workflow file is a mapping with name, initial and states")
            raise ConfigErrors(self.errors)
        for key in root:
            if key not in TOP_KEYS:
                self.err(
                    line_at(root, key),
                    f"unknown top-level key {key!r}{suggest(key, TOP_KEYS)}; "
                    f"allowed keys: {', '.join(TOP_KEYS)}",
                )
        name = self._text(root, "name", "the workflow's name") or Path(self.file).stem
        description = self._text(root, "description", "a description") or ""
        self._servers(root)
        self._inputs(root)

        raw_states = root.get("states")
        kinds: dict[str, str] = {}
        if not isinstance(raw_states, dict) or not raw_states:
            self.err(
                line_at(root, "states"),
                "states must be a mapping of state names to states, e.g. states: {start: ...}",
            )
        else:
            kinds = self._first_pass(raw_states)  # the saved names, for duration templates
        timeout = self._timed(
            root,
            "timeout",
            "the whole run's timeout, set at the start",
            field="timeout",
            names=set(self.inputs),
        )
        self.has_command_timeout = "command_timeout" in root
        self.command_timeout = self._timed(
            root, "command_timeout", "the command timeout", field="timeout"
        )
        if not isinstance(raw_states, dict) or not raw_states:
            raise ConfigErrors(self.errors)
        states: dict[str, StateSpec] = {}
        for sname, kind in kinds.items():
            built = self._state(sname, raw_states[sname], kind, line_at(raw_states, sname))
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
            timeout=timeout if not isinstance(timeout, DurationTemplate) else None,
            timeout_template=timeout if isinstance(timeout, DurationTemplate) else None,
            command_timeout=(
                self.command_timeout
                if not isinstance(self.command_timeout, DurationTemplate)
                else None
            ),
            on_abort=on_abort,
            description=description,
            saved_names=frozenset(self.saved),
            line=line_at(root),
            inputs=MappingProxyType(dict(self.inputs)),
            source_text=self.text,
        )

    def _servers(self, root: Any) -> None:
        raw = root.get("servers")
        if raw is None:
            servers: dict[Any, Any] = {}
        elif not isinstance(raw, dict):
            self.err(
                line_at(root, "servers"),
                'servers must map names to "host:port" or "mqtt://broker/node"',
            )
            servers = {}
        else:
            servers = raw
        for name, address in servers.items():
            if not isinstance(name, str) or not _STATE_NAME.match(name):
                self.err(line_at(raw, name), f"bad server name {name!r}: use letters, digits, _, -")
                continue
            try:
                address = normal_address(address)
            except ValueError as exc:
                self.err(
                    line_at(raw, name),
                    f"server {name!r}: {exc}, e.g. 127.0.0.1:15769 or mqtt://broker/pi-1",
                )
                continue
            self.servers[name] = address
        default = root.get("default_server")
        if default is not None:
            if default not in servers:
                known = ", ".join(map(str, servers)) or "none"
                self.err(
                    line_at(root, "default_server"),
                    f"default_server {default!r} is not one of the servers ({known})"
                    f"{suggest(default, map(str, servers))}",
                )
            else:
                self.default_server = default
        elif len(servers) == 1:
            self.default_server = next(iter(servers))

    # states

    def _first_pass(self, raw_states: dict[Any, Any]) -> dict[str, str]:
        """Check names and kinds; collect saved names. Returns name -> kind of good states."""
        kinds: dict[str, str] = {}
        names = [n for n in raw_states if isinstance(n, str)]
        self.state_names = names
        for name, body in raw_states.items():
            line = line_at(raw_states, name)
            if not isinstance(name, str) or not _STATE_NAME.match(name):
                self.err(
                    line,
                    f"bad state name {name!r}{yaml_bool_hint(name)}: start with a letter, "
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
                        line_at(body, key),
                        f"unknown key {key!r} in {kind} state {name!r}{suggest(key, allowed)}; "
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
                line_at(root, "inputs"),
                "inputs must map names to default values, e.g. inputs: {target: 25}",
            )
            return
        for name, default in raw.items():
            if not self._check_name(line_at(raw, name), "input", "inputs", name):
                continue
            problem = json_problem(default)
            if problem:
                self.err(line_at(raw, name), f"input {name!r}: the default {problem}")
            else:
                self.inputs[name] = default

    def _check_save(self, body: Any, state: str, save: Any) -> None:
        if self._check_name(line_at(body, "save"), "save name", f"state {state!r}", save):
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
        self.templated = []
        key_lines = {k: line_at(body, k) for k in body if isinstance(k, str)}
        spec: dict[str, Any] = {"description": self._text(body, "description", "a note") or ""}
        if kind == "command":
            spec.update(self._command(name, body))
        elif kind == "choice":
            spec["choices"] = self._choices(name, body, required=True)
        elif kind == "wait":
            wait = self._timed(body, "wait", "how long to wait", field="wait", positive=False)
            spec["wait"] = self._static(wait)
            spec["next"] = self._way_out(name, body, "wait")
        elif kind == "await":
            spec.update(self._await(name, body))
        else:
            final = body.get("final")
            if final not in FINAL_OUTCOMES:
                self.err(
                    line_at(body, "final"),
                    f"final must be success or failure, got {final!r}{yaml_bool_hint(final)}",
                )
            spec["final"] = final
        if len(self.errors) > before:
            return None
        spec["durations"] = tuple(self.templated)
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
                line_at(body, "server"),
                f"unknown server {server!r}{suggest(server, self.servers)}; servers: {known}",
            )
            return None
        return str(server)

    def _timeout(self, name: str, body: Any, kind: str) -> float | None:
        own = self._timed(body, "timeout", f"how long the {kind} may take", field="timeout")
        if own is None and "timeout" not in body and not self.has_command_timeout:
            self.err(
                self.cur_line,
                f"{kind} state {name!r} has no timeout: add timeout: 5s to the state, "
                "or command_timeout: 5s at the top",
            )
        return self._static(own if own is not None else self.command_timeout)

    def _command(self, name: str, body: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        command = body.get("command")
        if not isinstance(command, str) or not command or any(c.isspace() for c in command):
            self.err(
                line_at(body, "command"),
                f"command must be a method name like demo.calibrate, got {command!r}",
            )
        out["command"] = command
        out["server"] = self._server(name, body)
        out["timeout"] = self._timeout(name, body, "command")
        raw = body.get("params")
        if raw is not None:
            if not isinstance(raw, (dict, list)):
                self.err(line_at(body, "params"), "params must be a mapping or a list")
            else:
                self._check_templates(raw, line_at(body, "params"), allowed=set())
                with contextlib.suppress(ExpressionError):  # reported by _check_templates
                    out["params"] = compile_template(raw)
                out["raw_params"] = raw
        out["save"] = body.get("save")
        if "next" in body and "choices" in body:
            self.err(
                line_at(body, "choices"),
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
                line_at(body, "await"),
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
                    line_at(raw_states, name),
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
                    line_at(raw_states, name),
                    f"no final state can be reached from state {name!r}: a run there could "
                    "only end by abort or timeout; add a next, choice or on_error that leads "
                    "to a state with final: success or final: failure",
                )
