"""The built-in ``rpc.*`` methods: cheap, answered on the I/O thread."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from statemachines.catalog import BUILTIN_ERRORS, error_refs

from .. import auth
from ..errors import BusyError, InvalidParamsError, UnauthorizedError
from .calls import Call
from .core import PROTOCOL_VERSION, Core
from .session import Session

log = logging.getLogger("statelink.server")


def _param(
    name: str, schema: dict[str, Any], description: str, required: bool = False
) -> dict[str, Any]:
    return {"name": name, "required": required, "schema": schema, "description": description}


def _result(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "schema": schema}


_STRING = {"type": "string"}
_COUNT = {"type": "integer", "minimum": 0}
_NOTIFICATION = _param(
    "method",
    {"type": "string", "minLength": 1},
    "a notification method: device.state, or rpc.progress (the progress of this "
    "connection's own requests)",
    required=True,
)

#: The OpenRPC method object of each built-in, without ``name`` and ``errors``.
_DOCS: dict[str, dict[str, Any]] = {
    "rpc.ping": {
        "description": 'Answers "pong". Liveness check.',
        "params": [],
        "result": _result("pong", {"const": "pong"}),
    },
    "rpc.hello": {
        "description": "Handshake: names the client, authenticates it (shared secret, "
        "HMAC challenge) and asks for callback delivery.",
        "paramStructure": "by-name",
        "params": [
            _param("client", _STRING, "a name for logs"),
            _param("protocol", _STRING, 'the protocol version the client speaks, "1.0"'),
            _param(
                "nonce",
                {"type": "string", "maxLength": auth.MAX_NONCE},
                "the client's challenge to the server",
            ),
            _param("response", _STRING, "the client's answer to the server's challenge"),
            _param(
                "callback_port",
                {"type": "integer", "minimum": 1, "maximum": 65535},
                "a TCP port on the client's address to deliver replies to",
            ),
        ],
        "result": _result(
            "hello",
            {
                "type": "object",
                "properties": {
                    "server": _STRING,
                    "protocol": _STRING,
                    "auth": {"enum": [None, "hmac-sha256"]},
                    "max_inflight": _COUNT,
                    "max_frame": _COUNT,
                    "max_depth": _COUNT,
                    "challenge": _STRING,
                    "proof": _STRING,
                    "callback": {
                        "type": ["object", "null"],
                        "properties": {"host": _STRING, "port": {"type": "integer"}},
                    },
                    "callback_error": _STRING,
                    "authenticated": {"type": "boolean"},
                },
                "required": ["server", "protocol", "auth", "authenticated"],
            },
        ),
    },
    "rpc.discover": {
        "description": "This OpenRPC document: every method, device and error kind.",
        "params": [],
        "result": _result(
            "openrpc",
            {"type": "object", "required": ["openrpc", "info", "methods"]},
        ),
    },
    "rpc.stats": {
        "description": "Connections, requests in flight, totals and errors by code.",
        "params": [],
        "result": _result(
            "stats",
            {
                "type": "object",
                "properties": {
                    "connections": _COUNT,
                    "requests_in_flight": _COUNT,
                    "errors_by_code": {"type": "object", "additionalProperties": _COUNT},
                    "limits": {"type": "object"},
                },
                "required": ["connections", "requests_in_flight"],
            },
        ),
    },
    "rpc.subscribe": {
        "description": 'Receive a notification method, e.g. {"method": "device.state"}.',
        "params": [_NOTIFICATION],
        "result": _result(
            "subscribed",
            {"type": "object", "properties": {"subscribed": _STRING}, "required": ["subscribed"]},
        ),
    },
    "rpc.unsubscribe": {
        "description": "Stop receiving a notification method.",
        "params": [_NOTIFICATION],
        "result": _result(
            "unsubscribed",
            {
                "type": "object",
                "properties": {"unsubscribed": _STRING},
                "required": ["unsubscribed"],
            },
        ),
    },
    "rpc.cancel": {
        "description": 'Cancel a request in flight on this connection: {"id": ...}.',
        "paramStructure": "by-name",
        "params": [
            _param(
                "id",
                {"type": ["string", "number", "null"]},
                "the id of the request to cancel",
                required=True,
            )
        ],
        "result": _result(
            "cancelled",
            {
                "type": "object",
                "properties": {"cancelled": {"type": "boolean"}, "reason": _STRING},
                "required": ["cancelled"],
            },
        ),
    },
}


class Builtin:
    """A built-in method: ``func(call)`` is its result."""

    def __init__(self, name: str, func: Callable[[Call], Any]):
        self.name = name
        self.func = func

    def start(self, call: Call) -> None:
        call.resolve(self.func(call))

    def describe(self) -> dict[str, Any]:
        """Its OpenRPC method object (``rpc.discover``)."""
        out: dict[str, Any] = {"name": self.name, "description": "", "params": []}
        out.update(_DOCS.get(self.name, {"result": _result("result", {})}))
        out["errors"] = error_refs(BUILTIN_ERRORS)
        return out


class _AnswersLater(Builtin):
    """A built-in whose ``func(call)`` answers the call itself, maybe later (``rpc.hello``
    waits for its connect-back)."""

    def start(self, call: Call) -> None:
        self.func(call)


def install_builtins(core: Core) -> None:
    """Register every ``rpc.*`` method on ``core``."""
    builtins: dict[str, Callable[[Call], Any]] = {
        "rpc.ping": lambda call: "pong",
        "rpc.discover": lambda call: core.discover(),
        "rpc.stats": lambda call: core.stats_snapshot(),
        "rpc.subscribe": lambda call: _subscribe(core, call),
        "rpc.unsubscribe": _unsubscribe,
        "rpc.cancel": _cancel,
    }
    for name, func in builtins.items():
        core.methods[name] = Builtin(name, func)
    core.methods["rpc.hello"] = _AnswersLater("rpc.hello", lambda call: _hello(core, call))


def _session(call: Call) -> Session:
    return cast(Session, call.session)  # every call of a core arrives on a Session


def _hello(core: Core, call: Call) -> None:
    """Answer ``call``: at once, or, when it sets up a callback link, once the link connected
    or failed to (``callback`` then, or ``callback: null`` and ``callback_error``)."""
    params = call.params if isinstance(call.params, dict) else {}
    session = _session(call)
    if "client" in params:
        session.client_name = str(params["client"])[:200]
    reply: dict[str, Any] = {
        "server": core.name,
        "protocol": PROTOCOL_VERSION,
        "auth": "hmac-sha256" if core.secret else None,
        "max_inflight": core.limits.max_inflight,
        "max_frame": core.limits.max_frame,  # the client decodes replies by the same rules
        "max_depth": core.limits.max_depth,
    }
    port = params.get("callback_port")
    if port is not None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise InvalidParamsError("callback_port must be a TCP port number (1-65535)")
        session.callback_port = port
    if core.secret is not None and not session.authenticated:
        _login(core, session, params, reply)
    # The server connects back only for an authenticated peer, and only to its own address.
    if (
        session.authenticated
        and session.callback_port is not None
        and session.connect_back is not None
        and (
            session.callback is None
            or not session.callback.usable  # lost or never connected: try again
            or session.callback.port != session.callback_port
        )
    ):
        if session.callback is not None:
            session.callback.close()
        session.callback = session.connect_back(session.callback_port)
    link = session.callback
    reply["authenticated"] = session.authenticated
    if link is None:
        call.resolve(reply)
        return

    def answer(error: str | None) -> None:
        if error is None:
            reply["callback"] = {"host": link.host, "port": link.port}
        else:
            reply["callback"] = None
            reply["callback_error"] = error
        call.resolve(reply)

    link.when_ready(answer)


def _login(core: Core, session: Session, params: dict[str, Any], reply: dict[str, Any]) -> None:
    """The challenge/response of ``rpc.hello`` (docs/security.md)."""
    assert core.secret is not None
    response = params.get("response")
    if response is None:
        nonce = params.get("nonce", "")
        if not isinstance(nonce, str) or len(nonce) > auth.MAX_NONCE:
            raise InvalidParamsError(
                f"nonce must be a string of at most {auth.MAX_NONCE} characters"
            )
        session.challenge = auth.new_nonce()
        session.client_nonce = nonce
        reply["challenge"] = session.challenge
        reply["proof"] = auth.digest(core.secret, "server", session.challenge, nonce)
    elif session.challenge is not None and auth.verify(
        core.secret, "client", session.challenge, session.client_nonce, response
    ):
        session.authenticated = True
    else:
        session.challenge = None
        session.auth_failures += 1
        log.warning("authentication failed from %s (wrong secret or no challenge)", session.peer)
        if session.auth_failures >= core.limits.max_auth_failures:
            core.loop.call_soon(session.hangup, "auth_failures")
        raise UnauthorizedError(
            "authentication failed: wrong secret or no challenge; "
            "call rpc.hello with a nonce first",
            {"auth": "hmac-sha256"},
        )


def _subscribe(core: Core, call: Call) -> dict[str, Any]:
    method = _method_param(call.params)
    subs = _session(call).subscriptions
    limit = core.limits.max_subscriptions
    if method not in subs and len(subs) >= limit:
        raise BusyError(f"too many subscriptions (limit {limit})")
    subs.add(method)
    return {"subscribed": method}


def _unsubscribe(call: Call) -> dict[str, Any]:
    method = _method_param(call.params)
    _session(call).subscriptions.discard(method)
    return {"unsubscribed": method}


def _cancel(call: Call) -> dict[str, Any]:
    params = call.params
    if not isinstance(params, dict) or "id" not in params or isinstance(params["id"], (list, dict)):
        raise InvalidParamsError('rpc.cancel takes {"id": <id of the request to cancel>}')
    target = _session(call).calls.get(params["id"])
    if target is None or target is call:
        return {"cancelled": False, "reason": "no such request in flight on this connection"}
    target.cancel()
    return {"cancelled": True}


def _method_param(params: Any) -> str:
    method = (
        params.get("method")
        if isinstance(params, dict)
        else (params[0] if isinstance(params, list) and params else None)
    )
    if not isinstance(method, str) or not method:
        raise InvalidParamsError(
            'expected {"method": "<notification method>"}, e.g. {"method": "device.state"}'
        )
    return method
