"""Command descriptions: the one shape of "what a server's command is" (:class:`CommandInfo`).

A device spec describes its commands with it; ``rpc.discover`` (an OpenRPC 1.3 document)
emits :meth:`CommandInfo.to_openrpc` for every device command and function command, with the
error kinds of :func:`openrpc_errors`; :func:`catalog_from_discover` rebuilds the infos from a
discover answer; the workflow check (:func:`statemachines.workflow.check_against`) reads a
:data:`Catalog` (wire method -> :class:`CommandInfo`) per server.

Params are kept as JSON rules, ``{name: {"type", "required", "minimum", "maximum", "enum",
"default", "description"}}`` (what :func:`statemachines.params.schema_to_json` gives), so that a
description read from a live server is exactly what that server said;
:func:`statemachines.params.specs_from_json` turns them into
:class:`~statemachines.params.ParamSpec` to validate values. On the wire each rule is an
OpenRPC content descriptor: ``required`` is the descriptor's boolean, the rest its JSON Schema.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errorkinds import CODE_BY_KIND

__all__ = [
    "ANY_STATE",
    "BUILTIN_ERRORS",
    "Catalog",
    "CommandInfo",
    "ParamRules",
    "catalog_from_discover",
    "error_refs",
    "openrpc_errors",
    "param_rules",
]

#: ``allowed_from`` of a method that is not a device command: it runs in any state.
ANY_STATE = "*"

#: Param name -> its JSON rule, in declared (positional) order.
ParamRules = Mapping[str, Mapping[str, Any]]

#: The command every device answers itself (``statemachines.device.spec.STATE_COMMAND``).
_STATE = "state"

#: The notifications a server sends (``rpc.subscribe`` them; over MQTT they are topics):
#: ``x-notifications`` of ``rpc.discover``, keyed by method, each an OpenRPC content
#: descriptor of its params.
NOTIFICATIONS: dict[str, dict[str, Any]] = {
    "device.state": {
        "name": "params",
        "description": "a device changed state (sent before the reply of the command that moved "
        "it)",
        "schema": {
            "type": "object",
            "required": ["device", "state", "previous", "command"],
            "properties": {
                "device": {"type": "string"},
                "state": {"type": "string"},
                "previous": {"type": "string"},
                "command": {"type": ["string", "null"]},
                "reason": {"type": "string"},
            },
        },
    },
    "rpc.progress": {
        "name": "params",
        "description": "the progress of a request of this connection (opt in with "
        'rpc.subscribe {"method": "rpc.progress"})',
        "schema": {
            "type": "object",
            "required": ["id", "progress", "message"],
            "properties": {
                "id": {"type": ["string", "number", "null"]},
                "progress": {"type": "number", "minimum": 0, "maximum": 1},
                "message": {"type": "string"},
            },
        },
    },
}

#: Every error kind a server answers with (not ``connection_lost`` or ``offline``: client side
#: only), and what it means: ``components.errors`` of ``rpc.discover``, keyed by kind.
_ERROR_MEANINGS: dict[str, str] = {
    "parse_error": "The line is not JSON, not UTF-8, or nests too deep.",
    "invalid_request": "Valid JSON but not a valid request (or a batch or line too big).",
    "unknown_command": "No such method.",
    "invalid_params": "The params do not fit the method.",
    "internal_error": "A bug: e.g. a handler returned a value that is not JSON.",
    "not_allowed": "The device's current state does not allow the command.",
    "timeout": "The command overran its timeout.",
    "busy": "A bound is reached or the server is stopping: retry later.",
    "unauthorized": "Authenticate with rpc.hello first.",
    "cancelled": "The command was cancelled (rpc.cancel, or the server stopped).",
    "device_fault": "The handler raised; a device moved to its fault state.",
    "key_conflict": "The idempotency key was used with another method or other params.",
    "interrupted": "The keyed command was running when its server stopped or crashed.",
}

#: The error kinds each sort of method may answer with (its ``errors`` in ``rpc.discover``).
BUILTIN_ERRORS = ("invalid_params", "busy", "unauthorized")
_PLAIN_ERRORS = (
    "invalid_params",
    "timeout",
    "busy",
    "unauthorized",
    "cancelled",
    "device_fault",
    "internal_error",
)
_DEVICE_ERRORS = (*_PLAIN_ERRORS, "not_allowed", "key_conflict", "interrupted")
_STATE_ERRORS = ("busy", "unauthorized")


def openrpc_errors() -> dict[str, dict[str, Any]]:
    """``components.errors`` of ``rpc.discover``: kind -> OpenRPC error object."""
    return {
        kind: {"code": CODE_BY_KIND[kind], "message": meaning}
        for kind, meaning in _ERROR_MEANINGS.items()
    }


def error_refs(kinds: Iterable[str]) -> list[dict[str, str]]:
    """A method's ``errors``: references into :func:`openrpc_errors`."""
    refs = []
    for kind in kinds:
        if kind not in _ERROR_MEANINGS:
            raise KeyError(f"no error kind {kind!r} on the wire")
        refs.append({"$ref": f"#/components/errors/{kind}"})
    return refs


@dataclass(frozen=True)
class CommandInfo:
    """One command a server offers.

    ``method`` is the wire method (``door.open``), ``command`` the command's name in its device
    (``open``; for a plain method, its name), ``device`` None for a plain method.
    ``allowed_from`` lists the device states the command may start in (``("*",)`` for a plain
    method; empty: it can never run), ``states`` every state of the device. ``running``, ``to``
    and ``cancelled`` are the device's states during the command, after it, and after it was
    cancelled halfway (None: unchanged; for ``cancelled``: the fault state, else back).
    ``timeout`` is the command's own (None: the server's default; read from a live server: the
    one the server applies).
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
    cancelled: str | None = None

    @classmethod
    def plain(
        cls,
        method: str,
        params: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        timeout: float | None = None,
        description: str = "",
    ) -> CommandInfo:
        """A method that is not a device command: no device, runs in any state."""
        return cls(
            method=method,
            device=None,
            command=method,
            allowed_from=(ANY_STATE,),
            timeout=timeout,
            params=param_rules(params),
            description=description,
        )

    def to_openrpc(self, default_timeout: float | None = None) -> dict[str, Any]:
        """The command's OpenRPC method object in ``rpc.discover``.

        ``x-timeout`` is the seconds the server gives it (its own, else ``default_timeout``);
        a device method also has ``x-device`` and ``x-allowed-states``, and a device command
        (not ``<device>.state``) ``x-running``, ``x-to``, ``x-cancelled`` and
        ``x-idempotency-key`` (it honours a request's top-level ``key``)."""
        is_state = self.device is not None and self.command == _STATE
        out: dict[str, Any] = {
            "name": self.method,
            "description": self.description,
            "params": [_descriptor(name, rule) for name, rule in self.params.items()],
            "result": {"name": "result", "schema": self._result_schema() if is_state else {}},
        }
        if self.device is None:
            out["errors"] = error_refs(_PLAIN_ERRORS)
        else:
            out["errors"] = error_refs(_STATE_ERRORS if is_state else _DEVICE_ERRORS)
            out["x-device"] = self.device
            out["x-allowed-states"] = list(self.allowed_from)
            if is_state:
                return out
            out.update(
                {
                    "x-running": self.running,
                    "x-to": self.to,
                    "x-cancelled": self.cancelled,
                    "x-idempotency-key": True,
                }
            )
        timeout = self.timeout if self.timeout is not None else default_timeout
        if timeout is not None:
            out["x-timeout"] = timeout
        return out

    def _result_schema(self) -> dict[str, Any]:
        """What ``<device>.state`` answers."""
        state: dict[str, Any] = {"type": "string"}
        if self.states:
            state["enum"] = list(self.states)
        return {
            "type": "object",
            "properties": {
                "device": {"const": self.device},
                "state": state,
                "reason": {
                    "type": "string",
                    "description": "why the device is in this state, when it is not a "
                    "command's plain outcome: timeout, cancelled, interrupted",
                },
            },
            "required": ["device", "state"],
        }

    def to_json(self) -> dict[str, Any]:
        """The command's entry in the ``commands`` list of a device (``x-devices`` of
        ``rpc.discover``, :meth:`DeviceSpec.describe
        <statemachines.device.DeviceSpec.describe>`)."""
        return {
            "name": self.command,
            "method": self.method,
            "from": list(self.allowed_from),
            "running": self.running,
            "to": self.to,
            "cancelled": self.cancelled,
            "timeout": self.timeout,
            "params": {name: dict(rule) for name, rule in self.params.items()},
            "description": self.description,
        }

    @classmethod
    def from_json(
        cls,
        entry: Mapping[str, Any],
        *,
        device: str | None = None,
        states: Iterable[str] = (),
    ) -> CommandInfo:
        """Rebuild an info from :meth:`to_openrpc` output (``x-device`` names its device) or
        from :meth:`to_json` output (``device`` given: the device around it); ``states`` come
        from the device. A :meth:`to_json` ``params`` may also be a JSON Schema object
        (``type: object``, ``properties``, ``required``). Raises ValueError for an entry
        without a method."""
        if "method" not in entry:
            return cls._from_openrpc(entry, states)
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
            cancelled=_text_or_none(entry.get("cancelled")),
            timeout=_number_or_none(entry.get("timeout")),
            params=param_rules(entry.get("params")),
            description=str(entry.get("description") or ""),
        )

    @classmethod
    def _from_openrpc(cls, entry: Mapping[str, Any], states: Iterable[str]) -> CommandInfo:
        method = entry.get("name")
        if not isinstance(method, str) or not method:
            raise ValueError(f"a method object needs a name, got {entry!r}")
        # an old (statelink 1.0) discover said "timeout"
        timeout = _number_or_none(entry.get("x-timeout", entry.get("timeout")))
        params = _rules_of(entry.get("params"))
        description = str(entry.get("description") or "")
        device = _text_or_none(entry.get("x-device"))
        if device is None:
            return cls.plain(method, params, timeout=timeout, description=description)
        prefix = f"{device}."
        return cls(
            method=method,
            device=device,
            command=method[len(prefix) :] if method.startswith(prefix) else method,
            allowed_from=tuple(str(s) for s in entry.get("x-allowed-states") or ()),
            states=tuple(str(s) for s in states),
            running=_text_or_none(entry.get("x-running")),
            to=_text_or_none(entry.get("x-to")),
            cancelled=_text_or_none(entry.get("x-cancelled")),
            timeout=timeout,
            params=params,
            description=description,
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


def _descriptor(name: str, rule: Mapping[str, Any]) -> dict[str, Any]:
    """A rule as an OpenRPC content descriptor: ``required`` out of the schema."""
    out: dict[str, Any] = {
        "name": name,
        "required": rule.get("required") is True,
        "schema": {k: v for k, v in rule.items() if k != "required"},
    }
    if isinstance(rule.get("description"), str):
        out["description"] = rule["description"]
    return out


def _rules_of(descriptors: Any) -> dict[str, dict[str, Any]]:
    """Rules from content descriptors (the inverse of :func:`_descriptor`); entries without a
    name are skipped."""
    rules: dict[str, dict[str, Any]] = {}
    for param in descriptors if isinstance(descriptors, list) else ():
        if isinstance(param, Mapping) and isinstance(param.get("name"), str):
            schema = param.get("schema")
            rule = dict(schema) if isinstance(schema, Mapping) else {}
            rule["required"] = param.get("required", rule.get("required")) is True
            rules[param["name"]] = rule
    return rules


def catalog_from_discover(described: Mapping[str, Any]) -> dict[str, CommandInfo]:
    """The catalog of a live server, from its ``rpc.discover`` answer.

    Every method except ``rpc.*`` is read with :meth:`CommandInfo.from_json`: device methods
    (``x-device``) with the states of their device in ``x-devices``, the others as plain
    methods (``device`` None, ``allowed_from`` ``("*",)``). The devices' ``commands`` lists
    (:meth:`CommandInfo.to_json`; what a statelink 1.0 server's ``devices`` held) fill in
    commands no method object describes. Malformed entries are skipped.
    """
    devices = [
        d for d in described.get("x-devices") or described.get("devices") or () if _is_map(d)
    ]
    states_of = {
        d["name"]: tuple(str(s) for s in d.get("states") or ())
        for d in devices
        if isinstance(d.get("name"), str)
    }
    catalog: dict[str, CommandInfo] = {}
    for method in described.get("methods") or ():
        if not _is_map(method):
            continue
        name = method.get("name")
        if not isinstance(name, str) or name.startswith("rpc."):
            continue
        device = _text_or_none(method.get("x-device"))
        try:
            info = CommandInfo.from_json(method, states=states_of.get(device or "", ()))
        except ValueError:
            continue
        catalog.setdefault(info.method, info)
    for device in devices:
        name = _text_or_none(device.get("name"))
        for entry in device.get("commands") or ():
            if not _is_map(entry) or "method" not in entry or entry["method"] in catalog:
                continue
            try:
                states = states_of.get(name or "", ())
                info = CommandInfo.from_json(entry, device=name, states=states)
            except ValueError:
                continue
            catalog[info.method] = info
    return catalog


def _is_map(value: Any) -> bool:
    return isinstance(value, Mapping)


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value
