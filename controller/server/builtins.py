"""The built-in ``rpc.*`` methods: cheap, answered on the I/O thread."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from .. import auth
from ..errors import BusyError, InvalidParamsError, UnauthorizedError
from .calls import Call
from .core import PROTOCOL_VERSION, Core
from .session import Session

log = logging.getLogger("statelink.server")

_DOCS = {
    "rpc.ping": 'Answers "pong". Liveness check.',
    "rpc.hello": "Handshake: {client, protocol, nonce, response, callback_port}.",
    "rpc.discover": "OpenRPC-style description of every method and device.",
    "rpc.stats": "Connections, requests in flight, totals and errors by code.",
    "rpc.subscribe": 'Receive a notification method, e.g. {"method": "device.state"}.',
    "rpc.unsubscribe": "Stop receiving a notification method.",
    "rpc.cancel": 'Cancel a request in flight on this connection: {"id": ...}.',
}


class Builtin:
    """A built-in method: ``func(call)`` is its result."""

    def __init__(self, name: str, func: Callable[[Call], Any]):
        self.name = name
        self.func = func

    def start(self, call: Call) -> None:
        call.resolve(self.func(call))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": _DOCS.get(self.name, ""), "params": []}


def install_builtins(core: Core) -> None:
    """Register every ``rpc.*`` method on ``core``."""
    builtins: dict[str, Callable[[Call], Any]] = {
        "rpc.ping": lambda call: "pong",
        "rpc.hello": lambda call: _hello(core, call),
        "rpc.discover": lambda call: core.discover(),
        "rpc.stats": lambda call: core.stats_snapshot(),
        "rpc.subscribe": lambda call: _subscribe(core, call),
        "rpc.unsubscribe": _unsubscribe,
        "rpc.cancel": _cancel,
    }
    for name, func in builtins.items():
        core.methods[name] = Builtin(name, func)


def _session(call: Call) -> Session:
    return cast(Session, call.session)  # every call of a core arrives on a Session


def _hello(core: Core, call: Call) -> dict[str, Any]:
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
    if session.callback is not None:
        reply["callback"] = {"host": session.callback.host, "port": session.callback.port}
    reply["authenticated"] = session.authenticated
    return reply


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
