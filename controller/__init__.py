"""statelink controller: the command server, the client and the workflow runner (the I/O side).

>>> from controller import CommandServer, Client
"""

from importlib import import_module
from typing import Any

# Lazy: ``from controller import Client`` does not load the server (asyncio) and vice versa.
_EXPORTS = {
    "CallbackListener": "client",
    "Client": "client",
    "parse_address": "client",
    "Scheduler": "scheduler",
    "CommandServer": "server",
    "Limits": "server",
    "add_device": "devices",
    **{
        name: "errors"
        for name in (
            "BusyError",
            "CancelledError",
            "CommandInterruptedError",
            "CommandTimeoutError",
            "ConnectionLostError",
            "DeviceFaultError",
            "InternalError",
            "InvalidParamsError",
            "InvalidRequestError",
            "KeyConflictError",
            "MethodNotFoundError",
            "NodeOfflineError",
            "NotAllowedError",
            "ParseError",
            "RpcError",
            "UnauthorizedError",
        )
    },
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'controller' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BusyError",
    "CallbackListener",
    "CancelledError",
    "Client",
    "CommandInterruptedError",
    "CommandServer",
    "CommandTimeoutError",
    "ConnectionLostError",
    "DeviceFaultError",
    "InternalError",
    "InvalidParamsError",
    "InvalidRequestError",
    "KeyConflictError",
    "Limits",
    "MethodNotFoundError",
    "NodeOfflineError",
    "NotAllowedError",
    "ParseError",
    "RpcError",
    "Scheduler",
    "UnauthorizedError",
    "add_device",
    "parse_address",
]
