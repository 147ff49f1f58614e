"""Function commands: a plain function (run on the worker pool) or an ``async def`` (a task on
the loop) registered as a method, and the binding of JSON-RPC params to its signature."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from ..errors import BusyError, InvalidParamsError, RpcError
from ..workers import PoolFull
from .calls import Call
from .core import Core


def bind_params(signature: inspect.Signature, params: Any) -> inspect.BoundArguments:
    """Bind JSON-RPC params to a signature: arrays positionally, objects by name."""
    try:
        if params is None:
            return signature.bind()
        if isinstance(params, list):
            return signature.bind(*params)
        return signature.bind(**params)
    except TypeError as exc:
        raise InvalidParamsError(f"Invalid params: {exc}", {"reason": str(exc)})


_P = inspect.Parameter


class Binder:
    """:func:`bind_params` without ``inspect``'s general machinery for the usual handler
    signature (no ``*args``, ``**kwargs`` or positional-only parameters): the same checks and the
    same ``args``/``kwargs`` split as ``BoundArguments``. Anything else, and every params that
    would not bind, goes through :func:`bind_params` (so the errors are the same)."""

    __slots__ = (
        "kwonly_required",
        "min_args",
        "names",
        "order",
        "positional",
        "required",
        "signature",
        "simple",
    )

    def __init__(self, signature: inspect.Signature):
        self.signature = signature
        ps = list(signature.parameters.values())
        self.simple = all(p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY) for p in ps)
        self.order = tuple(p.name for p in ps)  # positional-or-keyword first, then keyword-only
        self.positional = tuple(p.name for p in ps if p.kind is _P.POSITIONAL_OR_KEYWORD)
        self.names = frozenset(self.order)
        self.required = frozenset(p.name for p in ps if p.default is _P.empty)
        self.min_args = sum(
            1 for p in ps if p.kind is _P.POSITIONAL_OR_KEYWORD and p.default is _P.empty
        )
        self.kwonly_required = any(p.kind is _P.KEYWORD_ONLY and p.default is _P.empty for p in ps)

    def bind(self, params: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` for the handler; raises :class:`InvalidParamsError`."""
        if self.simple:
            if params is None:
                if not self.required:
                    return (), {}
            elif type(params) is list:
                if (
                    self.min_args <= len(params) <= len(self.positional)
                    and not self.kwonly_required
                ):
                    return tuple(params), {}
            elif type(params) is dict:
                keys = params.keys()
                if keys <= self.names and self.required <= keys:
                    args = []
                    for name in self.positional:
                        if name not in params:
                            break
                        args.append(params[name])
                    if len(args) == len(params):
                        return tuple(args), {}
                    return tuple(args), {
                        n: params[n] for n in self.order[len(args) :] if n in params
                    }
        bound = bind_params(self.signature, params)
        return bound.args, bound.kwargs


class FunctionCommand:
    """A command backed by a plain function (worker pool) or an ``async def`` (loop task)."""

    def __init__(
        self,
        server: Core,
        name: str,
        func: Callable[..., Any],
        timeout: float | None,
        description: str | None,
    ):
        self.server = server
        self.name = name
        self.func = func
        self.timeout = timeout
        self.description = description or inspect.getdoc(func) or ""
        self.signature = inspect.signature(func)
        self.binder = Binder(self.signature)
        self.is_async = inspect.iscoroutinefunction(func)

    def start(self, call: Call) -> None:
        try:
            args, kwargs = self.binder.bind(call.params)
        except RpcError as exc:
            call.reject(exc)
            return
        server = self.server
        if self.is_async:
            loop = server.loop
            task = loop.create_task(_run_async(call, self.func(*args, **kwargs), loop))
            call.set_hooks(on_cancel=lambda: bool(task.cancel()) and False, on_timeout=task.cancel)
        else:
            try:
                server.pool.submit(self.func, args, kwargs, call.settle, call.hold())
            except PoolFull as exc:
                call.reject(BusyError(f"server busy: {exc}", {"retry": True}))
                return
        call.arm_timeout(self.timeout if self.timeout is not None else server.default_timeout)

    def describe(self) -> dict[str, Any]:
        """Its OpenRPC method object: a plain :class:`~statemachines.catalog.CommandInfo`
        whose params (any value) are the signature's, ``*args``/``**kwargs`` left out."""
        from statemachines.catalog import CommandInfo

        params = {
            p.name: {"required": p.default is inspect.Parameter.empty}
            for p in self.signature.parameters.values()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        }
        info = CommandInfo.plain(
            self.name, params, timeout=self.timeout, description=self.description
        )
        return info.to_openrpc(self.server.default_timeout)


async def _run_async(call: Call, coro: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Run an ``async def`` handler and answer from inside its task (no done-callback hop)."""
    try:
        result = await coro
    except asyncio.CancelledError:
        raise  # cancelled by the timeout or rpc.cancel, which answered already
    except BaseException as exc:
        call.settle(None, exc)
        if not isinstance(exc, Exception):
            # SystemExit/KeyboardInterrupt: out of the loop as before (start() serves on), but
            # raised by a plain callback, not by the task (which would log it as unretrieved)
            loop.call_soon(_reraise, exc)
    else:
        call.settle(result, None)


def _reraise(exc: BaseException) -> None:
    raise exc
