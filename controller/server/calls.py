"""Calls and deadlines: one request in flight, its one outcome, and its timeout.

A :class:`Call` is answered exactly once: the first of :meth:`Call.resolve` /
:meth:`Call.reject` (or the timeout, or the cancellation) wins; every later outcome is dropped
and counted in ``rpc.stats`` as ``late_outcomes``. Everything here runs on the loop thread,
except :meth:`Call.progress`, which is thread-safe.

What a command implementation may use of a call: ``method``, ``params``, ``id``, ``key``,
``done``, ``cancelled``, ``disconnected``, :meth:`~Call.resolve` / :meth:`~Call.reject` /
:meth:`~Call.settle`, :meth:`~Call.arm_timeout`, :meth:`~Call.progress`, the hooks
:meth:`~Call.cancel_signal`, :meth:`~Call.set_hooks` and :meth:`~Call.late`, and the start
gate :meth:`~Call.hold` / :meth:`~Call.claim` / :meth:`~Call.withdraw` / :attr:`~Call.started`.

The start gate: work that waits (for a worker thread) before its handler runs starts only if
its call is still wanted. The implementation calls :meth:`~Call.hold` when it queues the work
and hands the claim it returns to the worker pool (``gate=``), which calls it just before the
handler; the timeout and :meth:`~Call.cancel` withdraw the call (:meth:`~Call.withdraw`). One
lock orders the two, so exactly one wins: either the handler started (the device acted, or may
have), or it never starts (the device never acted, and the reply says so: ``data.started`` is
false). An implementation that starts its handler itself (an ``async def`` on the loop) calls
:meth:`~Call.claim` when it does. A call never held is never withdrawn (its handler is taken
to have started: nothing is known to the contrary).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from statemachines import errorkinds as ek

from ..errors import CancelledError, CommandTimeoutError, DeviceFaultError, RpcError
from ..protocol import ErrorResponse, Message, Notification, Request, Response
from ..workers import NotStarted
from .stats import Limits, Stats

log = logging.getLogger("statelink.server")

_IDLE, _HELD, _STARTED, _WITHDRAWN = 0, 1, 2, 3  #: the start gate of a call
_START_LOCK = threading.Lock()  #: orders claim (worker) and withdraw (loop); held for a moment


class Dispatch(Protocol):
    """What the server calls for one registered method (on the loop thread)."""

    def start(self, call: Call) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class ReplyCollector(Protocol):
    """Where the replies of one batch gather (see :class:`~.session.BatchReply`)."""

    def add(self, reply: Message | None) -> None: ...


class CallSite(Protocol):
    """What a call needs from the session it arrived on (:class:`~.session.Session`)."""

    stats: Stats
    deadlines: Deadlines
    limits: Limits

    @property
    def closed(self) -> bool: ...

    def forget(self, call: Call) -> None: ...

    def reply(self, call: Call, message: Message) -> None: ...

    def notify(self, method: str, params: Any) -> None: ...

    def notify_soon(self, method: str, params: Any) -> None: ...


class Call:
    """One request in flight on the server. All methods run on the loop thread (but
    :meth:`progress`). The first of :meth:`resolve` / :meth:`reject` answers; every later one
    is dropped."""

    __slots__ = (
        "_cancel_event",
        "_on_cancel",
        "_on_timeout",
        "_start",
        "_timer",
        "batch",
        "cancelled",
        "done",
        "id",
        "is_notification",
        "key",
        "method",
        "params",
        "session",
    )

    def __init__(
        self, session: CallSite, msg: Request | Notification, batch: ReplyCollector | None
    ):
        self.session = session
        self.method = msg.method
        self.params = msg.params
        self.is_notification = isinstance(msg, Notification)
        if self.is_notification:
            self.id = self.key = None
        else:
            self.id = msg.id  # type: ignore[union-attr]
            self.key = msg.key  # type: ignore[union-attr]  #: idempotency key (or None)
        self.batch = batch
        self._start = _IDLE
        self.done = False
        self.cancelled = False
        self._timer: dict[Call, float] | None = None  #: its group in the session's deadlines
        self._cancel_event: threading.Event | None = None
        self._on_cancel: Callable[[], bool] | None = None
        self._on_timeout: Callable[[], object] | None = None

    # -- the one outcome ----------------------------------------------------------------------
    def resolve(self, result: Any) -> None:
        if self._finish():
            self.session.reply(self, Response(self.id, result))

    def reject(self, error: RpcError) -> None:
        if self._finish():
            self.session.stats.count_error(error.code)
            self.session.reply(self, ErrorResponse(self.id, error.code, error.message, error.data))

    def replay(self, result: Any, error: RpcError | None = None) -> None:
        """Answer with a stored outcome of an earlier execution (``"replayed": true``)."""
        if self._finish():
            if error is None:
                self.session.reply(self, Response(self.id, result, True))
            else:
                self.session.stats.count_error(error.code)
                self.session.reply(
                    self, ErrorResponse(self.id, error.code, error.message, error.data, True)
                )

    def settle(self, result: Any, exc: BaseException | None) -> None:
        """Answer from a handler outcome: a result, an :class:`RpcError`, or any exception."""
        if exc is None:
            self.resolve(result)
        elif isinstance(exc, NotStarted):
            return  # the gate kept a withdrawn call's handler from starting; it was answered
        elif isinstance(exc, RpcError):
            self.reject(exc)
        else:
            self.reject(handler_fault(self.method, exc))

    def late(self) -> None:
        """An outcome came after this call's one outcome: drop it (``rpc.stats``
        ``late_outcomes``). For implementations that know the call was answered already."""
        self.session.stats.late_outcomes += 1

    def _finish(self) -> bool:
        if self.done:
            self.session.stats.late_outcomes += 1
            return False
        self.done = True
        if self._timer is not None:
            self._timer.pop(self, None)
        self.session.forget(self)
        return True

    # -- the start gate -----------------------------------------------------------------------
    def hold(self) -> Callable[[], bool]:
        """The handler waits to start (loop thread): returns :meth:`claim`, for the worker."""
        self._start = _HELD
        return self.claim

    def claim(self) -> bool:
        """The handler is about to start (any thread): True if the call is still wanted (not
        answered, not withdrawn); it has then started. False: it must never start."""
        with _START_LOCK:
            if self._start <= _HELD and not self.done:
                self._start = _STARTED
                return True
            self._start = _WITHDRAWN
            return False

    def withdraw(self) -> bool:
        """Make sure the handler never starts, if it has not yet (loop thread): True if it
        never started (now or earlier), False if it has."""
        with _START_LOCK:
            if self._start <= _HELD:
                self._start = _WITHDRAWN
            return self._start == _WITHDRAWN

    @property
    def started(self) -> bool:
        """True once :meth:`claim` let the handler start."""
        return self._start == _STARTED

    # -- hooks for the implementation ---------------------------------------------------------
    @property
    def disconnected(self) -> bool:
        """True once nobody can receive this call's reply (the peer's session closed)."""
        return self.session.closed

    def cancel_signal(self) -> threading.Event:
        """An event set when the call is cancelled, times out, loses its peer or the server
        stops: a blocking handler can wait on it. Created on first use (loop thread)."""
        if self._cancel_event is None:
            self._cancel_event = threading.Event()
        return self._cancel_event

    def set_hooks(
        self,
        *,
        on_cancel: Callable[[], bool] | None = None,
        on_timeout: Callable[[], object] | None = None,
    ) -> None:
        """``on_cancel()`` runs on ``rpc.cancel``: return True to answer later yourself
        (without it, or on False, the cancelled error answers at once). ``on_timeout()`` runs
        once when the timeout expires, just before the timeout (or cancelled) error answers.
        A hook given as None is left as it was."""
        if on_cancel is not None:
            self._on_cancel = on_cancel
        if on_timeout is not None:
            self._on_timeout = on_timeout

    def arm_timeout(self, seconds: float) -> None:
        """Answer with the timeout error if still pending after ``seconds`` (never earlier;
        at most 1 ms, or 0.1 % of a timeout over 1 s, later: see :class:`Deadlines`)."""
        if seconds and seconds > 0 and not self.done:
            self._timer = self.session.deadlines.add(self, seconds)

    def mark_cancelled(self) -> None:
        """Tell the handler to stop (``cancelled``, and the cancel signal); no answer yet."""
        self.cancelled = True
        if self._cancel_event is not None:
            self._cancel_event.set()

    def _expire(self, seconds: float) -> None:
        if self.done:
            return
        never = self._start != _IDLE and self.withdraw()  # only a held call is known unstarted
        if self._cancel_event is not None:
            self._cancel_event.set()
        hook, self._on_timeout = self._on_timeout, None
        if hook is not None:
            hook()
            if self.done:  # the hook answered itself
                return
        if self.cancelled:
            self.reject(self._cancelled_error(never))
        elif never:
            self.reject(
                CommandTimeoutError(
                    f"{self.method} timed out after {seconds:g} s before it started (it waited "
                    "for a worker); it never ran",
                    {"timeout": seconds, "method": self.method, "started": False},
                )
            )
        else:
            self.reject(
                CommandTimeoutError(
                    f"{self.method} did not finish within its timeout of {seconds:g} s",
                    {"timeout": seconds, "method": self.method},
                )
            )

    def _cancelled_error(self, never: bool) -> CancelledError:
        if never:
            return CancelledError(
                f"{self.method} was cancelled before it started; it never ran",
                {"id": self.id, "started": False},
            )
        return CancelledError(f"{self.method} was cancelled", {"id": self.id})

    def cancel(self) -> None:
        """Ask the running command to stop (``rpc.cancel``).

        Without an ``on_cancel`` hook the call is answered with the cancelled error at once;
        a hook that returns True answers later itself (a device command answers once its
        handler has returned and the device state is settled).
        """
        if self.done:
            return
        self.mark_cancelled()
        if self._on_cancel is None or not self._on_cancel():
            self.reject(self._cancelled_error(self._start == _WITHDRAWN))

    def progress(self, fraction: float, message: str = "") -> None:
        """Send ``rpc.progress`` to the requesting client. Thread-safe."""
        if self.is_notification:
            return
        params = {"id": self.id, "progress": fraction, "message": message}
        self.session.notify_soon("rpc.progress", params)


class Deadlines:
    """Request timeouts grouped by deadline: one loop timer per group, not one per request.

    A deadline is rounded *up* to a step of 1 ms per whole second of timeout (at least 1 ms), so
    a request times out at most 1 ms (or 0.1 % of a timeout over 1 s) after its exact deadline,
    never before, and one timeout value has at most ~1000 groups at a time. An answered call
    leaves its group at once (no reference to it is kept). Loop thread only.
    """

    __slots__ = ("groups", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.groups: dict[int, dict[Call, float]] = {}  #: deadline in ms -> {call: timeout}

    def add(self, call: Call, seconds: float) -> dict[Call, float]:
        loop = self.loop
        step = int(seconds) or 1
        key = (int((loop.time() + seconds) * 1000) // step + 1) * step
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = {}
            loop.call_at(key / 1000, self._expire, key)
        group[call] = seconds
        return group

    def _expire(self, key: int) -> None:
        for call, seconds in list(self.groups.pop(key, {}).items()):
            call._expire(seconds)


def reply_too_large(msg_id: Any, size: int, limit: int, replayed: bool = False) -> ErrorResponse:
    """The internal error that answers ``msg_id`` instead of a reply of ``size`` bytes, over
    the frame limit of ``limit`` bytes."""
    return ErrorResponse(
        msg_id,
        ek.INTERNAL_ERROR,
        f"Internal error: the reply is {size} bytes, over the frame limit of {limit} bytes",
        {"size": size, "limit": limit},
        replayed,
    )


def handler_fault(method: str, exc: BaseException) -> DeviceFaultError:
    """The client-facing error for a handler that raised: type and message, no traceback."""
    log.error("handler of %s raised", method, exc_info=exc)
    return DeviceFaultError(
        f"{method} failed: {type(exc).__name__}: {exc}",
        {"exception": type(exc).__name__, "message": str(exc)},
    )
