"""Idempotency keys on the server: the core's key table (:class:`Keys`) and the one execution
of a keyed command (:class:`Execution`) that every request with its key gets the outcome of.

A device command whose request carries ``"key"`` is admitted here (:meth:`Keys.admit`), on the
loop thread, from the in-memory index of the :class:`~controller.keystore.KeyStore` (never
waiting on the disk):

- key seen with another method or other params: ``key_conflict``;
- key finished: its stored outcome, ``"replayed": true``, nothing runs; a key that was running
  when the last server stopped answers ``interrupted``;
- key running now: the request *joins* the execution, and is answered with its outcome;
- new key: ``begin`` is queued to the store and an :class:`Execution` is made. Its
  :attr:`~Execution.call` is what the device runs (a :class:`~.calls.Call` whose answer goes to
  every request that joined). The device starts the handler only once ``begin`` is durable.

The key is used up only if the handler started (:attr:`Call.started <.calls.Call.started>`): an
execution answered before that (not allowed, busy, cancelled or timed out while it waited, all
its requests gone) forgets its key, so a retry runs. Otherwise its outcome is recorded
(``finish``; the reply does not wait for that write).

An ``rpc.cancel`` of any request of an execution cancels the execution (all its requests get
the outcome). A request whose peer disconnects does not: a retry will join.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from statemachines import errorkinds as ek

from ..errors import (
    BusyError,
    CancelledError,
    CommandInterruptedError,
    InternalError,
    KeyConflictError,
    RpcError,
    error_for,
)
from ..keystore import (
    DONE,
    KEYS_FILE,
    RUNNING,
    KeyStore,
    KeyStoreClosed,
    KeyStoreFull,
    Outcome,
    Record,
    fingerprint,
)
from ..protocol import ErrorResponse, Message, Request, Response, encode
from .calls import Call, Deadlines, reply_too_large
from .stats import Stats

log = logging.getLogger("statelink.server")

#: seconds a key's write may wait for more writes to share its commit; a ``begin`` that a
#: device waits for is committed at once (:meth:`Keys.commit_soon`), so this bounds how long an
#: outcome (``finish``) is not yet on disk after its reply
COMMIT_DELAY = 0.01

#: ``on_ready(error)``: the execution's ``begin`` is durable (None), or why not (it was answered)
OnReady = Callable[[BaseException | None], None]


class Keys:
    """The idempotency keys of one server (loop thread only, but :meth:`open`/:meth:`close`).

    ``state_dir`` None: keys are kept in memory only (lost when the server stops); else in
    ``state_dir / KEYS_FILE``. ``retention``: seconds a finished key is kept; ``max_keys``: the
    bound (oldest finished dropped first).
    """

    def __init__(
        self,
        state_dir: str | Path | None = None,
        retention: float = 86400.0,
        max_keys: int = 100_000,
    ) -> None:
        if retention <= 0:
            raise ValueError("key retention must be positive")
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.retention = retention
        self.max_keys = max_keys
        self.store: KeyStore | None = None  #: open while the server runs
        self.live: dict[str, Execution] = {}  #: key -> its execution, while it runs
        #: devices whose command was running when the last server stopped (set by open)
        self.interrupted_devices: set[str] = set()
        self.stopping = False
        # begins made durable, from the store's writer thread to the loop: one wake-up per
        # batch, not one per key (each wake-up makes the writer wait for the loop's GIL)
        self._durable_queue: deque[tuple[Execution, BaseException | None, OnReady]] = deque()
        self._wake_pending = False

    @property
    def path(self) -> Path | None:
        """The store's file (None: in memory only)."""
        return None if self.state_dir is None else self.state_dir / KEYS_FILE

    def open(self) -> None:
        """Open the store (a :class:`~controller.keystore.KeyStoreError`, e.g.
        :class:`~controller.keystore.KeyStoreLocked`, when it cannot be)."""
        store = KeyStore(
            self.path, retention=self.retention, max_keys=self.max_keys, max_delay=COMMIT_DELAY
        )
        store.open()
        self.store = store
        self.stopping = False
        self.live = {}
        self._durable_queue.clear()
        self._wake_pending = False
        self.interrupted_devices = {item.device for item in store.interrupted_at_open}

    def close(self) -> None:
        """Write what is queued, close the store (after the workers drained). Idempotent."""
        store, self.store = self.store, None
        if store is not None:
            store.close()

    def commit_soon(self) -> None:
        """A device waits for a ``begin`` queued so far: have the store commit now."""
        if self.store is not None:
            self.store.commit_soon()

    # -- admission (loop thread) --------------------------------------------------------------
    def admit(self, call: Call, device: str, on_ready: OnReady) -> Call | None:
        """Admit ``call`` (a device command with ``call.key``): answer it (replay, conflict,
        busy), join it to the running execution (None for both), or return the call the
        device runs for a new execution; ``on_ready`` runs on the loop once its ``begin`` is
        durable (or with the error that answered it)."""
        store = self.store
        key = call.key
        assert store is not None and key is not None
        print_ = fingerprint(call.params)
        record = store.lookup(key)
        if record is not None:
            self._answer_known(call, record, print_)
            return None
        execution = Execution(self, call, key)
        try:
            store.begin(
                key,
                call.method,
                print_,
                device=device,
                on_durable=lambda error: self._hop(execution, error, on_ready),
            )
        except (KeyStoreFull, KeyStoreClosed) as exc:
            call.reject(BusyError(f"server busy: {exc}", {"retry": True}))
            return None
        self.live[key] = execution
        return execution.call

    def _answer_known(self, call: Call, record: Record, print_: str) -> None:
        key = record.key
        if KeyStore.conflicts(record, call.method, print_):
            call.reject(
                KeyConflictError(
                    f"key {key!r} was already used for "
                    + ("other params" if record.method == call.method else record.method),
                    {"key": key, "method": record.method},
                )
            )
        elif record.state == RUNNING:
            execution = self.live.get(key)
            if execution is None:  # cannot happen: a running key of this process is live
                call.reject(InternalError(f"key {key!r} is running but not here"))
            else:
                execution.join(call)
        elif record.state == DONE and record.outcome is not None:
            outcome = record.outcome
            if outcome.error is None:
                call.replay(outcome.result)
            else:
                error = outcome.error
                call.replay(None, error_for(error["code"], error["message"], error.get("data")))
        else:
            call.replay(
                None,
                CommandInterruptedError(
                    f"{record.method} (key {key!r}) was running when its server stopped; "
                    "it may have acted halfway",
                    {"key": key, "method": record.method, "device": record.device},
                ),
            )

    def _hop(self, execution: Execution, error: BaseException | None, on_ready: OnReady) -> None:
        """``on_durable`` of ``begin``: on the store's writer thread; go to the loop, once for
        all the begins of a batch (the writer calls the callbacks of a batch in a row)."""
        self._durable_queue.append((execution, error, on_ready))
        if not self._wake_pending:
            self._wake_pending = True
            try:
                execution.loop.call_soon_threadsafe(self._drain_durable)
            except RuntimeError:  # the loop is closed (the server stopped): nothing waits
                pass

    def _drain_durable(self) -> None:
        self._wake_pending = False  # first: a begin queued from now on wakes the loop again
        queue = self._durable_queue
        while queue:
            self._durable(*queue.popleft())

    def _durable(
        self, execution: Execution, error: BaseException | None, on_ready: OnReady
    ) -> None:
        if error is not None and not execution.call.done:
            execution.call.reject(
                InternalError(
                    f"the key store cannot record key {execution.key!r}: {error}",
                    {"key": execution.key, "retry": True},
                )
            )
        on_ready(error)

    # -- an execution's end (loop thread) -----------------------------------------------------
    def ended(self, execution: Execution, message: Message) -> Message:
        """``execution`` was answered with ``message``: record its outcome if its handler
        started, else forget its key (it never ran). Returns what its requests are answered
        with: ``message``, or for a result too large for a frame the error its reply would be,
        which is also what is recorded (a retry gets that error, at no cost, and the store
        never holds a result that cannot be sent)."""
        key = execution.key
        if self.live.get(key) is execution:
            del self.live[key]
        store = self.store
        if store is None:
            return message
        try:
            if not execution.call.started:
                store.forget(key)
                return message
            cancelled = isinstance(message, ErrorResponse) and message.code == ek.CANCELLED
            if self.stopping and cancelled:
                # cancelled halfway by the server's stop: the row stays `running`, so the next
                # start reads it as interrupted and starts the device in its fault state
                return message
            outcome = _outcome(message)
            try:
                text = outcome.to_json()
            except (TypeError, ValueError, RecursionError):  # not JSON: answered as such
                outcome, text = _NOT_JSON, _NOT_JSON.to_json()
            else:
                if isinstance(message, Response) and len(text) > execution.frame_room:
                    too_large = execution.too_large(message)
                    if too_large is not None:
                        message = too_large
                        outcome = _outcome(message)
                        text = outcome.to_json()
            store.finish(key, outcome, encoded=text)
        except KeyStoreClosed:
            log.warning("key %r: its outcome came after the key store closed", key)
        except (KeyError, ValueError):  # dropped meanwhile (it cannot be, running) or not running
            log.exception("key %r: cannot record its outcome", key)
        return message

    def shutdown(self) -> None:
        """The server stops (loop thread): every execution is told to stop; those that have not
        started never will (their keys are forgotten). A handler cancelled by the stop leaves its
        key ``running`` on disk: the next start reads it as interrupted (the device was stopped
        halfway) and starts that device in its fault state."""
        self.stopping = True
        for execution in list(self.live.values()):
            call = execution.call
            call.mark_cancelled()
            if call.withdraw() or not call.started:
                call.reject(
                    CancelledError(
                        "the server stopped before the command started",
                        {"reason": "shutdown", "started": False},
                    )
                )


_NOT_JSON = Outcome.failure(ek.INTERNAL_ERROR, "Internal error: the result is not JSON")


def _outcome(message: Message) -> Outcome:
    """The stored form of an execution's reply."""
    if isinstance(message, Response):
        return Outcome.success(message.result)
    assert isinstance(message, ErrorResponse)
    return Outcome.failure(message.code, message.message, message.data)


class _ExecutionStats:
    """The stats an execution's own call reports to: errors are counted once per request (by
    the requests), late outcomes on the server's counter."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def count_error(self, code: int) -> None:
        pass

    @property
    def late_outcomes(self) -> int:
        return self._stats.late_outcomes

    @late_outcomes.setter
    def late_outcomes(self, value: int) -> None:
        self._stats.late_outcomes = value


class Execution:
    """One run of a keyed command, and the requests waiting for it (the first one and those
    that joined). It is the :class:`~.calls.CallSite` of :attr:`call`, the call the device
    runs: that call's one answer goes to every request still waiting."""

    def __init__(self, keys: Keys, first: Call, key: str) -> None:
        self.keys = keys
        self.key = key
        self.members: list[Call] = []
        self.stats: Any = _ExecutionStats(first.session.stats)
        self.deadlines: Deadlines = first.session.deadlines
        self.loop = self.deadlines.loop
        self.limits = first.session.limits
        self.max_frame = self.limits.max_frame
        #: an outcome's JSON up to this long surely fits a frame in every member's reply (its
        #: UTF-8 is no longer than its ASCII JSON; the rest of a reply is < 64 bytes + the id)
        self.frame_room = self.max_frame - 64 - 6 * len(str(first.id))
        self.call = Call(self, Request(first.method, first.params, first.id, key), None)
        self.join(first)

    def join(self, call: Call) -> None:
        """``call`` gets this execution's outcome; its ``rpc.cancel`` cancels the execution."""
        self.members.append(call)
        call.set_hooks(on_cancel=self._member_cancelled)

    def _member_cancelled(self) -> bool:
        self.call.cancel()
        return True  # the execution's answer reaches every member

    # -- CallSite -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True when no request waits any more (each was answered or lost its peer)."""
        return all(m.done or m.disconnected for m in self.members)

    def forget(self, call: Call) -> None:
        pass

    def too_large(self, response: Response) -> ErrorResponse | None:
        """The error that answers ``response`` if its reply to the first request does not
        fit a frame (None: it fits). Encodes the result: only for results near the limit."""
        first = self.members[0]
        try:
            size = len(encode(Response(first.id, response.result))) - 1
        except (TypeError, ValueError, RecursionError):
            return None  # not JSON: each reply says so
        if size <= self.max_frame:
            return None
        return reply_too_large(response.id, size, self.max_frame)

    def reply(self, call: Call, message: Message) -> None:
        try:
            message = self.keys.ended(self, message)
        except Exception:  # recording failed: every request is answered all the same
            log.exception("key %r: recording its outcome failed", self.key)
        error: RpcError | None = None
        if isinstance(message, ErrorResponse):
            error = error_for(message.code, message.message, message.data)
        for member in self.members:
            if member.done:
                continue
            if error is None:
                member.resolve(message.result)  # type: ignore[union-attr]
            else:
                member.reject(error)

    def notify(self, method: str, params: Any) -> None:
        """A notification about the execution (loop thread), e.g. its ``rpc.progress``: to
        every waiting request, with that request's id."""
        for member in self.members:
            if not member.done and not member.is_notification:
                member.session.notify(method, {**params, "id": member.id})

    def notify_soon(self, method: str, params: Any) -> None:
        """:meth:`notify` from any thread (a handler's progress)."""
        try:
            self.loop.call_soon_threadsafe(self.notify, method, params)
        except RuntimeError:  # the loop is closed: nobody waits
            pass
