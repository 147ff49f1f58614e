"""The check of a loaded workflow against what its servers offer (their catalogs).

Param values are validated by :mod:`statemachines.params`, the same validator the server
applies to a call, so a workflow that passes the check sends params the server accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..catalog import Catalog, CommandInfo
from ..expressions import has_template
from ..params import ParamError, ParamSpec, check_value, specs_from_json
from ..source import ConfigError, suggest
from .model import StateSpec, WorkflowSpec
from .reader import line_at

__all__ = ["check_against"]

_Report = Callable[[int, str], None]


def check_against(spec: WorkflowSpec, catalogs: Mapping[str, Catalog]) -> list[ConfigError]:
    """Check the commands of ``spec`` against what its servers offer; return the problems.

    ``catalogs`` maps a *server name* of the workflow to that server's catalog (wire method ->
    :class:`~statemachines.catalog.CommandInfo`). The key ``"*"`` gives the catalog of every
    server without its own; a server with neither is not checked. Methods under ``rpc.`` are
    always known and never checked.

    Reported: a command the server does not have, a command whose ``allowed_from`` is empty
    (it can never run), literal params that do not fit (unknown name, too many positional
    values, missing required param, a value the server's validator rejects), and param rules
    of the catalog that the validator cannot apply. Templated values (``{{ }}``) are not
    checked.
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

        info = catalog.get(method)
        if info is None:
            known = ", ".join(sorted(m for m in catalog if not m.startswith("rpc."))) or "none"
            err(
                state.line_of("command"),
                f"state {state.name!r}: server {state.server!r} has no command {method!r}"
                f"{suggest(method, catalog)}; its commands: {known}",
            )
            continue
        if not info.allowed_from:
            err(
                state.line_of("command"),
                f"state {state.name!r}: {method} can never run: its device "
                f"{info.device or '?'!r} allows it from no state (check the device config)",
            )
        _check_params(state, info, err)
    return errors


def _check_params(state: StateSpec, info: CommandInfo, err: _Report) -> None:
    method = info.method
    where = state.line_of("params")
    try:
        declared: dict[str, ParamSpec] = specs_from_json(info.params)
    except ParamError as exc:
        err(where, f"{method}: the server describes a param the check cannot apply: {exc}")
        return
    raw = state.raw_params
    given: dict[str, tuple[Any, int]]
    if raw is None:
        given = {}
    elif isinstance(raw, list):
        names = list(declared)
        if len(raw) > len(names):
            err(where, f"{method} takes at most {len(names)} params, got {len(raw)}")
        given = {n: (v, line_at(raw, i)) for i, (n, v) in enumerate(zip(names, raw, strict=False))}
    else:
        given = {str(k): (v, line_at(raw, k)) for k, v in raw.items()}
    for pname, (value, line) in given.items():
        param = declared.get(pname)
        if param is None:
            allowed = ", ".join(declared) or "none"
            hint = suggest(pname, declared)
            err(line, f"{method} has no param {pname!r}{hint}; params: {allowed}")
            continue
        if has_template(value):
            continue
        try:
            check_value(param, value)
        except ParamError as exc:
            err(line, f"{method} {exc}")
    for pname, param in declared.items():
        if param.required and not param.has_default and pname not in given:
            err(where, f"{method} needs param {pname!r}: add it under params")
