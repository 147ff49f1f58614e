"""Typed errors: one exception class per error kind, each carrying ``code``, ``message``, ``data``.

Handlers may raise these to answer with a specific error; the client raises them from
``call()`` and hands them to callbacks. ``error_for(code, message, data)`` builds the right
subclass from a reply.
"""

from __future__ import annotations

from typing import Any

from statemachines import errorkinds as ek


class RpcError(Exception):
    """An error outcome of a call. ``kind`` is the name workflows route on."""

    code: int = ek.INTERNAL_ERROR
    default_message = "Internal error"

    def __init__(self, message: str | None = None, data: Any = None, code: int | None = None):
        if code is not None:
            self.code = code
        self.message = message or self.default_message
        self.data = data
        super().__init__(self.message)

    @property
    def kind(self) -> str:
        return ek.kind_of(self.code)

    def __str__(self) -> str:
        return f"error {self.code}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """``{"kind", "code", "message", "data"}`` for journals and logs."""
        return {"kind": self.kind, "code": self.code, "message": self.message, "data": self.data}


class ParseError(RpcError):
    code = ek.PARSE_ERROR
    default_message = "Parse error"


class InvalidRequestError(RpcError):
    code = ek.INVALID_REQUEST
    default_message = "Invalid Request"


class MethodNotFoundError(RpcError):
    code = ek.METHOD_NOT_FOUND
    default_message = "Method not found"


class InvalidParamsError(RpcError):
    code = ek.INVALID_PARAMS
    default_message = "Invalid params"


class InternalError(RpcError):
    code = ek.INTERNAL_ERROR
    default_message = "Internal error"


class NotAllowedError(RpcError):
    code = ek.NOT_ALLOWED
    default_message = "Command not allowed in the current state"


class CommandTimeoutError(RpcError, TimeoutError):
    code = ek.TIMEOUT
    default_message = "Command timed out"


class ClientTimeoutError(CommandTimeoutError):
    """No reply within the client's own timeout (``data.source == "client"``): unlike the
    server's timeout, the command may still be running there."""


class BusyError(RpcError):
    code = ek.BUSY
    default_message = "Server busy, try again later"


class UnauthorizedError(RpcError):
    code = ek.UNAUTHORIZED
    default_message = "Unauthorized"


class CancelledError(RpcError):
    code = ek.CANCELLED
    default_message = "Command cancelled"


class DeviceFaultError(RpcError):
    code = ek.DEVICE_FAULT
    default_message = "Device fault"


class KeyConflictError(RpcError):
    code = ek.KEY_CONFLICT
    default_message = "Idempotency key already used with another method or other params"


class CommandInterruptedError(RpcError):
    """The keyed command was running when its server stopped or crashed: it may have acted
    halfway (named so as not to shadow the builtin ``InterruptedError``)."""

    code = ek.INTERRUPTED
    default_message = "Command interrupted: its server stopped while it ran"


class ConnectionLostError(RpcError, ConnectionError):
    code = ek.CONNECTION_LOST
    default_message = "Connection lost before the reply arrived"


class NodeOfflineError(RpcError, ConnectionError):
    """The fleet node is offline: its retained status says so (or it was never seen), or its
    Last Will arrived while the command was in flight. The command may have run there if the
    node went away mid-command: retry with the same key once the node is back."""

    code = ek.OFFLINE
    default_message = "The node is offline"


_BY_CODE: dict[int, type[RpcError]] = {
    cls.code: cls
    for cls in (
        ParseError,
        InvalidRequestError,
        MethodNotFoundError,
        InvalidParamsError,
        InternalError,
        NotAllowedError,
        CommandTimeoutError,
        BusyError,
        UnauthorizedError,
        CancelledError,
        DeviceFaultError,
        KeyConflictError,
        CommandInterruptedError,
        ConnectionLostError,
        NodeOfflineError,
    )
}


def error_for(code: int, message: str, data: Any = None) -> RpcError:
    """The typed exception for an error reply (unknown codes give a plain :class:`RpcError`)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RpcError(message, data, code=code)
    return cls(message, data)
