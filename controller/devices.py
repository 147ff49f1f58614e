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
- a command cancelled or timed out before its handler started (it waited for a worker) never
  starts: the device goes back where it was; cancelled while its handler runs, it ends in its
  ``cancelled:`` state, else ``fault`` (when declared: it acted halfway), else back;
- a command with an idempotency key runs at most once per key (:mod:`.server.keys`): it
  starts only once its key is durable, and every request with that key gets its outcome;
- a device whose keyed command was running when the last server stopped starts in ``fault``
  (reason ``"interrupted"``);
- every state change is published as the ``device.state`` notification, before the reply of
  the command that caused it (with a ``reason`` when it was not the command's plain outcome:
  ``"timeout"``, ``"cancelled"``, ``"interrupted"``).

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
from statemachines.params import ParamError, validate_params

from .errors import BusyError, CancelledError, InvalidParamsError, NotAllowedError, RpcError
from .handlers import resolve_handlers
from .server import Call, Core
from .workers import NotStarted, PoolFull


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


#: a keyed command's begin is committed once it is this close to the lane's head (see
#: DeviceRuntime._pump): about a commit's time under load, in commands of a trivial handler
PREFETCH = 32


class _Job:
    __slots__ = ("call", "command", "params", "ready", "seq", "settled")

    def __init__(self, call: Call, command: CommandSpec, params: dict[str, Any]):
        self.call = call
        self.command = command
        self.params = params
        self.ready = True  #: False while its key's begin is not durable (it must not start)
        self.seq = 0  #: its place in the order of the lane's arrivals (set by enqueue)
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
        self._unready = 0  #: keyed jobs whose begin is not durable yet (a hint, see _pump)
        self._seq = 0  #: jobs ever queued in the lane
        self._kicked = 0  #: the key store was last asked to commit when this many were queued
        self._running: _Job | None = None
        self.reason: str | None = None  #: why the device is in its state, when not a plain outcome
        self._cause: str | None = None  #: the reason of the change being made
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
        """The server starts: open the pins (once). A device whose keyed command was running
        when the last server stopped starts in its fault state (reason "interrupted")."""
        if self.spec.gpio and self.board is None:
            from .gpio import GpioBoard

            self.board = GpioBoard(self.spec, simulate=self.simulate)
        if self.spec.name in self.server.keys.interrupted_devices:
            previous = self.machine.enter_fault()
            if previous is not None:
                self.reason = "interrupted"
                self._publish(self.machine.state, previous, None)

    def stop(self) -> None:
        """The server stopped: release the pins, forget the lane. A command still running
        (a handler that ignored the cancellation) has an unknown outcome: fault, as for a
        timeout, so that a restarted server does not carry on as if it had finished."""
        self._lane.clear()  # every queued call was answered by the server's stop
        self._unready = 0
        job, self._running = self._running, None
        if job is not None and not job.settled:
            job.settled = True
            self._move("fail", job.command.name, "interrupted")
        if self.board is not None:
            self.board.close()
            self.board = None

    def _on_change(self, state: str, previous: str, command: str) -> None:
        self.reason = self._cause
        self._publish(state, previous, command)

    def _publish(self, state: str, previous: str, command: str | None) -> None:
        params = {
            "device": self.spec.name,
            "state": state,
            "previous": previous,
            "command": command,
        }
        if self.reason is not None:
            params["reason"] = self.reason
        self.server.publish("device.state", params)

    def _move(self, verb: str, command: str, reason: str | None = None) -> None:
        """Settle ``command`` with the machine's ``verb`` (succeed, fail, cancel, interrupt);
        ``reason`` is published with the change it makes, if any, and kept until the next."""
        self._cause = reason
        try:
            getattr(self.machine, verb)(command)
        finally:
            self._cause = None

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
        self._seq = job.seq = self._seq + 1
        self._lane.append(job)
        self._pump()

    def enqueue_keyed(self, call: Call, command: CommandSpec, params: dict[str, Any]) -> None:
        """A command with an idempotency key: admitted by the server's key table (replayed,
        joined, refused) or queued as a new execution that starts once its key is durable."""
        job = _Job(call, command, params)
        job.ready = False
        execution = self.server.keys.admit(call, self.spec.name, lambda _error: self._ready(job))
        if execution is not None:
            job.call = execution
            self._unready += 1  # until _ready, which every admitted execution gets once
            self.enqueue(job)

    def _ready(self, job: _Job) -> None:
        job.ready = True
        if self._unready > 0:
            self._unready -= 1
        self._pump()

    def _kick(self) -> None:
        """Ask the key store to commit every begin queued so far (the lane waits, or soon will,
        for one of them)."""
        self._kicked = self._seq
        self.server.keys.commit_soon()

    def _cancel(self, job: _Job) -> bool:
        """``rpc.cancel`` (a hook of the call): True if the call will be answered later."""
        if job in self._lane:
            self._lane.remove(job)
            job.call.withdraw()
            return False  # not started: answered at once
        if job is self._running and not job.settled and job.call.withdraw():
            # it waits for a worker, which will not start it now: the device never acted
            job.settled = True
            self._running = None
            self._move("cancel", job.command.name, "cancelled")
            self.server.loop.call_soon(self._pump)
            return False
        return True  # running: answered when the handler returns

    def _pump(self) -> None:
        lane = self._lane
        while self._running is None and lane:
            job = lane[0]
            call = job.call
            if not job.ready and not call.done:
                if job.seq > self._kicked:
                    self._kick()
                return  # its key is not durable yet: the lane waits for it
            lane.popleft()
            if call.done:
                continue
            if call.disconnected:
                call.reject(CancelledError("the client disconnected", {"reason": "disconnect"}))
                continue
            self._begin(job)
        # Prefetch: the begins of the commands queued since the last commit are committed
        # once the first of them is PREFETCH places from the head, so that the commit overlaps
        # the commands ahead of them and the lane does not stall for it; and the begins queued
        # meanwhile wait to share the next commit.
        if self._unready and lane and self._kicked < min(self._seq, lane[0].seq + PREFETCH):
            self._kick()

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
            call.claim()  # it starts now, on the loop
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
                self.server.pool.submit(
                    fn, args, kwargs, lambda r, e: self._finish(job, r, e), call.hold()
                )
            except PoolFull as exc:
                self._running = None
                call.withdraw()
                self._move("cancel", command.name)
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
            if not isinstance(exc, NotStarted):  # (a withdrawn job that never ran: no outcome)
                job.call.late()
            return
        job.settled = True
        self._running = None
        call, name = job.call, job.command.name
        if not call.started:  # it never ran (withdrawn, or taken off the pool at stop)
            self._move("cancel", name, "cancelled")
            if not call.done:
                call.reject(
                    exc
                    if isinstance(exc, RpcError)
                    else CancelledError(
                        f"{job.command.method} was cancelled before it started; it never ran",
                        {"id": call.id, "started": False},
                    )
                )
        elif call.cancelled:
            self._move("interrupt", name, "cancelled")
            call.reject(CancelledError(f"{job.command.method} was cancelled", {"id": call.id}))
        elif exc is None:
            self._move("succeed", name)
            call.resolve(result)
        else:
            self._move("fail", name)
            call.settle(None, exc)
        self._pump()

    def _timed_out(self, job: _Job) -> None:
        """The timeout expired (the call withdrew first, so ``started`` is final). Before the
        handler started: back where it was, the device never acted. After: the hardware state
        is unknown, so fault, also when the client had cancelled it (a handler that ignores
        the cancellation is as unknown as one that hangs)."""
        if job.settled:
            return
        job.settled = True
        self._running = None
        if job.call.started:
            self._move("fail", job.command.name, "timeout")
        else:
            self._move("cancel", job.command.name, "timeout")
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
        if call.key is None:
            self.runtime.enqueue(_Job(call, self.command, params))
        else:
            self.runtime.enqueue_keyed(call, self.command, params)

    def describe(self) -> dict[str, Any]:
        runtime = self.runtime
        return method_description(runtime.spec, self.command, runtime.server.default_timeout)


class _DeviceState:
    def __init__(self, runtime: DeviceRuntime):
        self.runtime = runtime

    def start(self, call: Call) -> None:
        runtime = self.runtime
        reply = {"device": runtime.spec.name, "state": runtime.machine.state}
        if runtime.reason is not None:
            reply["reason"] = runtime.reason
        call.resolve(reply)

    def describe(self) -> dict[str, Any]:
        return method_description(self.runtime.spec, None, self.runtime.server.default_timeout)


def method_description(
    spec: DeviceSpec, command: CommandSpec | None, default_timeout: float
) -> dict[str, Any]:
    """The ``rpc.discover`` method object of ``command`` (None: ``<device>.state``): its
    :meth:`CommandInfo.to_openrpc <statemachines.catalog.CommandInfo.to_openrpc>`."""
    info = spec.catalog()[command.method if command is not None else f"{spec.name}.state"]
    return info.to_openrpc(default_timeout)
