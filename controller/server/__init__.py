"""The command server: JSON-RPC 2.0 over TCP lines, one asyncio I/O thread, a bounded worker pool.

>>> from controller import CommandServer, Client
>>> with CommandServer(port=0) as server:
...     @server.command("subtract")
...     def subtract(minuend, subtrahend):
...         return minuend - subtrahend
...     with Client(server.address) as client:
...         client.call("subtract", [42, 23])
19

Contracts:

- The I/O thread never runs a blocking handler: plain functions run on the worker pool, ``async
  def`` handlers run as tasks on the loop (they must not block).
- Every request gets exactly one reply: its result, its error, the timeout error, the cancelled
  error, or (on ``stop()`` after the grace period) the cancelled error. Later outcomes of the
  same request are dropped and counted in ``rpc.stats`` as ``late_outcomes``.
- Every queue and buffer is bounded (:class:`Limits`); beyond a bound the request gets the busy
  error at once, or the connection is closed with a reason.

Modules, one job each: :mod:`.calls` (a call's one outcome, deadlines), :mod:`.core` (what
every session shares; plugins), :mod:`.session` (the session rules, sans-IO), :mod:`.commands`
(function commands, param binding), :mod:`.keys` (idempotency keys: the key table and the
one execution per key), :mod:`.builtins` (``rpc.*``), :mod:`.stats`
(``rpc.stats``, :class:`Limits`), :mod:`.connection` (the TCP transport), :mod:`.callback`
(the callback link), :mod:`.lifecycle` (:class:`CommandServer`: start, stop, threads).
"""

from __future__ import annotations

from .callback import CallbackLink
from .calls import Call, CallSite, Deadlines, Dispatch, handler_fault
from .commands import Binder, FunctionCommand, bind_params
from .connection import Connection, Connections
from .core import PROTOCOL_VERSION, Core, Plugin
from .keys import Execution, Keys
from .lifecycle import SETTLE_AT_STOP, CommandServer
from .session import BatchReply, ReplyLink, Session
from .stats import Limits, Stats

__all__ = [
    "PROTOCOL_VERSION",
    "SETTLE_AT_STOP",
    "BatchReply",
    "Binder",
    "Call",
    "CallSite",
    "CallbackLink",
    "CommandServer",
    "Connection",
    "Connections",
    "Core",
    "Deadlines",
    "Dispatch",
    "Execution",
    "FunctionCommand",
    "Keys",
    "Limits",
    "Plugin",
    "ReplyLink",
    "Session",
    "Stats",
    "bind_params",
    "handler_fault",
]
