"""Serve devices: each device is a state machine, each command one of its events.

:func:`add_device` joins a :class:`~statemachines.device.DeviceSpec` to a
:class:`~controller.server.CommandServer`, as a :class:`DeviceRuntime` plugged in through the
server's public interface (``register``, ``attach``, the call hooks); the server never imports
this module:

- commands of one device run one at a time, in arrival order (the device's *lane*); different
  devices run in parallel on the worker pool;
- when its turn comes, a command is checked against the device's current state (refused with
  the not-allowed error, state unchanged), moves the device to its ``running`` state, runs its
  handler or GPIO action, then moves to ``to`` (or back), or to ``fault`` if the handler raised
  or overran its timeout;
- every state change is published as the ``device.state`` notification, before the reply of
  the command that caused it.

All lane and machine work happens on the server's I/O thread; only handlers run on workers.
The handler functions come from :func:`controller.handlers.resolve_handlers`, once, when the
runtime is built.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Mapping
from typing import Any

from statemachines.device import (
    CommandNotAllowed,
    CommandSpec,
    DeviceMachine,
    DeviceSpec,
    not_allowed_message,
)
from statemachines.params import ParamError, schema_to_json, validate_params

from .errors import BusyError, CancelledError, InvalidParamsError, NotAllowedError, RpcError
from .handlers import resolve_handlers
from .server import Call, Core
from .workers import PoolFull


def add_device(server: Core, spec: DeviceSpec, *, simulate: bool = False) -> DeviceRuntime:
    """Serve ``spec`` on ``server``: its commands, ``<device>.state`` and ``device.state``
    notifications. Raises :class:`statemachines.source.ConfigErrors` for a handler that cannot
    be resolved."""
    return DeviceRuntime(server, spec, simulate=simulate)


class DeviceContext:
    """What a handler gets as ``ctx``: progress, cancellation, GPIO objects, a logger."""

    def __init__(self, device: str, command: str, call: Call, gpio: Mapping[str, Any]):
        self.device = device
        self.command = command
        self.gpio = gpio
        self.log = logging.getLogger(f"statelink.device.{device}")
        self._call = call
        self._cancel = call.cancel_signal()

    @property
    def cancelled(self) -> bool:
        """True once the client cancelled the command (or it overran its timeout)."""
        return self._cancel.is_set()

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress (0..1) to the client that sent the command."""
        fraction = min(1.0, max(0.0, float(fraction)))
        self._call.progress(fraction, message)

    def sleep(self, seconds: float) -> bool:
        """Wait up to ``seconds``; return False at once if the command is cancelled."""
        return not self._cancel.wait(seconds)

    async def asleep(self, seconds: float) -> bool:
        """``sleep`` for ``async def`` handlers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self._cancel.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return True
            await asyncio.sleep(min(remaining, 0.05))
        return False


class _Job:
    __slots__ = ("call", "command", "params", "settled")

    def __init__(self, call: Call, command: CommandSpec, params: dict[str, Any]):
        self.call = call
        self.command = command
        self.params = params
        self.settled = False


class DeviceRuntime:
    """One device served on one server (a :class:`~controller.server.Plugin`). Create it with
    :func:`add_device`."""

    def __init__(self, server: Core, spec: DeviceSpec, *, simulate: bool = False):
        self.server = server
        self.spec = spec
        self.handlers = resolve_handlers(spec)
        self.machine = DeviceMachine(spec, on_change=self._on_change)
        self.simulate = simulate
        self.board: Any = None
        self._lane: deque[_Job] = deque()
        self._running: _Job | None = None
        self.start()
        for command in spec.commands.values():
            server.register(command.method, _DeviceCommand(self, command))
        server.register(f"{spec.name}.state", _DeviceState(self))
        server.attach(spec.name, self)

    @property
    def state(self) -> str:
        return self.machine.state

    @property
    def busy(self) -> bool:
        """True while a command's handler runs (I/O thread)."""
        return self._running is not None

    def describe(self) -> dict[str, Any]:
        """This device's entry in ``rpc.discover``."""
        return self.spec.describe()

    # -- lifetime (with the server's; the I/O thread is not running) -------------------------
    def start(self) -> None:
        """The server starts: open the pins (once)."""
        if self.spec.gpio and self.board is None:
            from .gpio import GpioBoard

            self.board = GpioBoard(self.spec, simulate=self.simulate)

    def stop(self) -> None:
        """The server stopped: release the pins, forget the lane. A command still running
        (a handler that ignored the cancellation) has an unknown outcome: fault, as for a
        timeout, so that a restarted server does not carry on as if it had finished."""
        self._lane.clear()  # every queued call was answered by the server's stop
        job, self._running = self._running, None
        if job is not None and not job.settled:
            job.settled = True
            self.machine.fail(job.command.name)
        if self.board is not None:
            self.board.close()
            self.board = None

    def _on_change(self, state: str, previous: str, command: str) -> None:
        self.server.publish(
            "device.state",
            {"device": self.spec.name, "state": state, "previous": previous, "command": command},
        )

    # -- the lane ---------------------------------------------------------------------------
    def enqueue(self, job: _Job) -> None:
        limit = self.server.limits.max_queue
        if len(self._lane) >= limit:
            job.call.reject(
                BusyError(
                    f"device {self.spec.name} has {limit} commands waiting; try again later",
                    {"device": self.spec.name, "retry": True},
                )
            )
            return
        job.call.cancel_signal()  # before the handler runs: its ctx waits on it
        job.call.set_hooks(on_cancel=lambda: self._cancel(job))
        self._lane.append(job)
        self._pump()

    def _cancel(self, job: _Job) -> bool:
        if job in self._lane:
            self._lane.remove(job)
            return False  # not started: answered at once
        return True  # running: answered when the handler returns

    def _pump(self) -> None:
        while self._running is None and self._lane:
            job = self._lane.popleft()
            call = job.call
            if call.done:
                continue
            if call.disconnected:
                call.reject(CancelledError("the client disconnected", {"reason": "disconnect"}))
                continue
            self._begin(job)

    def _begin(self, job: _Job) -> None:
        call, command, spec = job.call, job.command, self.spec
        try:
            self.machine.begin(command.name)
        except CommandNotAllowed as exc:
            call.reject(
                NotAllowedError(
                    not_allowed_message(command.method, exc.state, exc.allowed),
                    {
                        "device": spec.name,
                        "state": exc.state,
                        "allowed": list(exc.allowed),
                        "command": command.name,
                    },
                )
            )
            return
        self._running = job
        if command.gpio is not None:
            fn: Any = self.board.run
            args: tuple[Any, ...] = (command.gpio, job.params)
            kwargs: dict[str, Any] = {}
        else:
            ctx = DeviceContext(spec.name, command.name, call, self.gpio_objects)
            fn, args, kwargs = self.handlers[command.name], (ctx,), job.params
        if inspect.iscoroutinefunction(fn):
            task = self.server.loop.create_task(fn(*args, **kwargs))
            task.add_done_callback(
                lambda t: self._finish(
                    job,
                    None if t.cancelled() or t.exception() else t.result(),
                    t.exception() if not t.cancelled() else RpcError("task cancelled"),
                )
            )

            def on_timeout() -> None:
                self._timed_out(job)
                task.cancel()

            call.set_hooks(on_timeout=on_timeout)
        else:
            try:
                self.server.pool.submit(fn, args, kwargs, lambda r, e: self._finish(job, r, e))
            except PoolFull as exc:
                self._running = None
                self.machine.cancel(command.name)
                call.reject(BusyError(f"server busy: {exc}", {"retry": True}))
                return
            call.set_hooks(on_timeout=lambda: self._timed_out(job))
        timeout = command.timeout or spec.timeout or self.server.default_timeout
        call.arm_timeout(timeout)

    @property
    def gpio_objects(self) -> Mapping[str, Any]:
        return self.board.objects if self.board is not None else {}

    def _finish(self, job: _Job, result: Any, exc: BaseException | None) -> None:
        """Handler outcome (I/O thread): settle the machine, then answer."""
        if job.settled:
            job.call.late()
            return
        job.settled = True
        self._running = None
        call, name = job.call, job.command.name
        if call.cancelled:
            self.machine.cancel(name)
            call.reject(CancelledError(f"{job.command.method} was cancelled", {"id": call.id}))
        elif exc is None:
            self.machine.succeed(name)
            call.resolve(result)
        else:
            self.machine.fail(name)
            call.settle(None, exc)
        self._pump()

    def _timed_out(self, job: _Job) -> None:
        """The handler overran its timeout: the hardware state is unknown, so fault.

        Also when the client had cancelled it: a handler that ignores the cancellation is as
        unknown as one that hangs, and the next command must not run as if nothing happened.
        """
        if job.settled:
            return
        job.settled = True
        self._running = None
        self.machine.fail(job.command.name)
        self.server.loop.call_soon(self._pump)


class _DeviceCommand:
    def __init__(self, runtime: DeviceRuntime, command: CommandSpec):
        self.runtime = runtime
        self.command = command

    def start(self, call: Call) -> None:
        try:
            params = validate_params(self.command.params, call.params)
        except ParamError as exc:
            raise InvalidParamsError(
                f"Invalid params: {exc}", {"command": self.command.method, "reason": str(exc)}
            )
        self.runtime.enqueue(_Job(call, self.command, params))

    def describe(self) -> dict[str, Any]:
        runtime = self.runtime
        return method_description(runtime.spec, self.command, runtime.server.default_timeout)


class _DeviceState:
    def __init__(self, runtime: DeviceRuntime):
        self.runtime = runtime

    def start(self, call: Call) -> None:
        call.resolve({"device": self.runtime.spec.name, "state": self.runtime.machine.state})

    def describe(self) -> dict[str, Any]:
        return method_description(self.runtime.spec, None, self.runtime.server.default_timeout)


def method_description(
    spec: DeviceSpec, command: CommandSpec | None, default_timeout: float
) -> dict[str, Any]:
    """The ``rpc.discover`` entry of a device method: ``command``, or ``<device>.state`` for
    None. (The one place that shapes it; to become ``statemachines.catalog.CommandInfo``.)"""
    if command is None:
        return {
            "description": f"The current state of {spec.name}.",
            "params": [],
            "x-device": spec.name,
            "x-allowed-states": list(spec.states),
        }
    schema = schema_to_json(command.params)
    props = schema.get("properties", schema) if isinstance(schema, dict) else {}
    required = set(schema.get("required", [])) if isinstance(schema, dict) else set()
    return {
        "description": command.description or "",
        "params": [
            {
                "name": name,
                "required": name in required or bool(isinstance(s, dict) and s.get("required")),
                "schema": s,
            }
            for name, s in props.items()
        ],
        "x-device": spec.name,
        "x-allowed-states": spec.allowed_states(command.name),
        "x-running": command.running,
        "x-to": command.to,
        "timeout": command.timeout or spec.timeout or default_timeout,
    }
