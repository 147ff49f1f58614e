"""Error codes of the statelink protocol and the error *kinds* workflows route on.

One table, used by the server (codes on the wire), the client (typed exceptions) and the
workflow configs (``on_error`` keys). Codes -32700..-32600 are JSON-RPC 2.0's own; the
statelink range is -32000..-32099.
"""

from __future__ import annotations

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

NOT_ALLOWED = -32001  #: command not allowed in the device's current state
TIMEOUT = -32002  #: the command overran its timeout (server side, or client side)
BUSY = -32003  #: server at capacity (worker queue, in-flight limit, connection limit)
UNAUTHORIZED = -32004  #: authentication required or failed
CANCELLED = -32005  #: the client cancelled the command (rpc.cancel)
DEVICE_FAULT = -32006  #: the handler raised; the device moved to its fault state
KEY_CONFLICT = -32007  #: the idempotency key was used with another method or other params
INTERRUPTED = -32008  #: the keyed command was running when its server stopped or crashed
CONNECTION_LOST = -32010  #: client side only: the connection closed before the reply
OFFLINE = -32011  #: client side only: the fleet node is offline (its status, or its Last Will)

#: code -> kind name, as used in workflow ``on_error`` and ``retry.on``.
KIND_BY_CODE: dict[int, str] = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "unknown_command",
    INVALID_PARAMS: "invalid_params",
    INTERNAL_ERROR: "internal_error",
    NOT_ALLOWED: "not_allowed",
    TIMEOUT: "timeout",
    BUSY: "busy",
    UNAUTHORIZED: "unauthorized",
    CANCELLED: "cancelled",
    DEVICE_FAULT: "device_fault",
    KEY_CONFLICT: "key_conflict",
    INTERRUPTED: "interrupted",
    CONNECTION_LOST: "connection_lost",
    OFFLINE: "offline",
}

CODE_BY_KIND: dict[str, int] = {kind: code for code, kind in KIND_BY_CODE.items()}

#: Every kind name a workflow may route on (plus any integer code, and "*").
ERROR_KINDS: frozenset[str] = frozenset(CODE_BY_KIND)


def kind_of(code: int) -> str:
    """The kind name for an error code; unknown codes in the server range are "server_error"."""
    return KIND_BY_CODE.get(code, "server_error")
