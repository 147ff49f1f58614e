"""statelink controller: the command server, the client and the workflow runner (the I/O side).

>>> from controller import CommandServer, Client
"""

from .client import CallbackListener, Client, parse_address
from .errors import (
    BusyError,
    CancelledError,
    CommandTimeoutError,
    ConnectionLostError,
    DeviceFaultError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    MethodNotFoundError,
    NotAllowedError,
    ParseError,
    RpcError,
    UnauthorizedError,
)
from .scheduler import Scheduler
from .server import CommandServer, Limits

__all__ = [
    "BusyError",
    "CallbackListener",
    "CancelledError",
    "Client",
    "CommandServer",
    "CommandTimeoutError",
    "ConnectionLostError",
    "DeviceFaultError",
    "InternalError",
    "InvalidParamsError",
    "InvalidRequestError",
    "Limits",
    "MethodNotFoundError",
    "NotAllowedError",
    "ParseError",
    "RpcError",
    "Scheduler",
    "UnauthorizedError",
    "parse_address",
]
