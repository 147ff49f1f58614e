"""Command descriptions: the one shape of "what a server's command is" (:class:`CommandInfo`).

A device spec describes its commands with it, ``rpc.discover`` emits :meth:`CommandInfo.to_json`
per device command, :func:`catalog_from_discover` rebuilds the infos from a discover answer, and
the workflow check (:func:`statemachines.workflow.check_against`) reads a :data:`Catalog` (wire
method -> :class:`CommandInfo`) per server.

Params are kept as JSON rules, ``{name: {"type", "required", "minimum", "maximum", "enum",
"default", "description"}}`` (what :func:`statemachines.params.schema_to_json` gives), so that a
description read from a live server is exactly what that server said;
:func:`statemachines.params.specs_from_json` turns them into
:class:`~statemachines.params.ParamSpec` to validate values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "ANY_STATE",
    "Catalog",
    "CommandInfo",
    "ParamRules",
    "catalog_from_discover",
    "param_rules",
]

#: ``allowed_from`` of a method that is not a device command: it runs in any state.
ANY_STATE = "*"

#: Param name -> its JSON rule, in declared (positional) order.
ParamRules = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class CommandInfo:
    """One command a server offers.

    ``method`` is the wire method (``door.open``), ``command`` the command's name in its device
    (``open``; for a plain method, its name), ``device`` None for a plain method.
    ``allowed_from`` lists the device states the command may start in (``("*",)`` for a plain
    method; empty: it can never run), ``states`` every state of the device. ``running`` and
    ``to`` are the device's states during and after the command (None: unchanged).
    ``timeout`` is the command's own (None: the server's default).
    """

    method: str
    device: str | None
    command: str
    allowed_from: tuple[str, ...]
    states: tuple[str, ...] = ()
    running: str | None = None
    to: str | None = None
    timeout: float | None = None
    params: ParamRules = field(default_factory=lambda: MappingProxyType({}))
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        """The command's entry in the ``commands`` list of a device in ``rpc.discover``."""
        return {
            "name": self.command,
            "method": self.method,
            "from": list(self.allowed_from),
            "running": self.running,
            "to": self.to,
            "timeout": self.timeout,
            "params": {name: dict(rule) for name, rule in self.params.items()},
            "description": self.description,
        }

    @classmethod
    def from_json(
        cls, entry: Mapping[str, Any], *, device: str | None, states: Iterable[str] = ()
    ) -> CommandInfo:
        """Rebuild an info from :meth:`to_json` output (``device``/``states`` come from the
        device around it). ``params`` may also be a JSON Schema object (``type: object``,
        ``properties``, ``required``). Raises ValueError for an entry without a method."""
        method = entry.get("method")
        if not isinstance(method, str) or not method:
            raise ValueError(f"a command description needs a method, got {entry!r}")
        name = entry.get("name")
        return cls(
            method=method,
            device=device,
            command=name if isinstance(name, str) else method,
            allowed_from=tuple(str(s) for s in entry.get("from") or ()),
            states=tuple(str(s) for s in states),
            running=_text_or_none(entry.get("running")),
            to=_text_or_none(entry.get("to")),
            timeout=_number_or_none(entry.get("timeout")),
            params=param_rules(entry.get("params")),
            description=str(entry.get("description") or ""),
        )


#: Wire method -> its :class:`CommandInfo`: what one server offers.
Catalog = Mapping[str, CommandInfo]


def param_rules(params: Any) -> ParamRules:
    """Flat ``{name: rule}`` from flat rules or a JSON Schema object (its ``required`` list
    folded into each rule's ``"required"``); anything else gives no params."""
    if not isinstance(params, Mapping):
        return MappingProxyType({})
    props = params.get("properties")
    if params.get("type") == "object" and isinstance(props, Mapping):
        required = {str(n) for n in params.get("required") or ()}
        rules = {
            str(k): {**(v if isinstance(v, Mapping) else {}), "required": str(k) in required}
            for k, v in props.items()
        }
    else:
        rules = {str(k): dict(v) if isinstance(v, Mapping) else {} for k, v in params.items()}
    return MappingProxyType(rules)


def catalog_from_discover(described: Mapping[str, Any]) -> dict[str, CommandInfo]:
    """The catalog of a live server, from its ``rpc.discover`` answer.

    Device commands come from its ``devices`` list (each command a :meth:`CommandInfo.to_json`);
    the server's other methods, except ``rpc.*``, from ``methods``, as plain methods
    (``device`` None, ``allowed_from`` ``("*",)``, their params typeless rules with
    ``required``). Malformed entries are skipped.
    """
    catalog: dict[str, CommandInfo] = {}
    for device in described.get("devices") or ():
        if not isinstance(device, Mapping):
            continue
        name = device.get("name")
        states = tuple(str(s) for s in device.get("states") or ())
        for entry in device.get("commands") or ():
            if not isinstance(entry, Mapping):
                continue
            try:
                info = CommandInfo.from_json(entry, device=_text_or_none(name), states=states)
            except ValueError:
                continue
            catalog[info.method] = info
    for method in described.get("methods") or ():
        if not isinstance(method, Mapping):
            continue
        name = method.get("name")
        if not isinstance(name, str) or name.startswith("rpc.") or name in catalog:
            continue
        rules: dict[str, Mapping[str, Any]] = {}
        for param in method.get("params") or ():
            if isinstance(param, Mapping) and isinstance(param.get("name"), str):
                rule = dict(param.get("schema") or {})
                rule.setdefault("required", bool(param.get("required")))
                rules[param["name"]] = rule
        catalog[name] = CommandInfo(
            method=name,
            device=None,
            command=name,
            allowed_from=(ANY_STATE,),
            timeout=_number_or_none(method.get("timeout")),
            params=MappingProxyType(rules),
            description=str(method.get("description") or ""),
        )
    return catalog


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value
