"""One run of a workflow (:class:`WorkflowRun`, the ``transitions`` model), and the
:class:`Effects` it asks for its I/O.

Runners drive a run through its event methods (``start``, ``on_reply``, ``on_error``,
``on_timer``, ``on_notification``, ``abort``) from one thread. The compiled machine
(:mod:`.machine`) moves it through the engine methods below them (``prepare``,
``record_pending``, ``enter``, ...); nothing outside the run writes its private fields.
How each event is taken (its preparers) is :mod:`.prepare`'s; the bounded history is
:mod:`.history`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..durations import format_duration
from ..expressions import ExpressionError
from .events import (
    Ending,
    ErrorInfo,
    Failure,
    JournalEntry,
    Json,
    Notified,
    Reply,
    Tick,
    next_token,
    now,
)
from .history import HISTORY_BYTES, HISTORY_ENTRY_BYTES, HISTORY_LIMIT, History
from .model import StateSpec, WorkflowSpec
from .prepare import (
    NEW_PREPARERS,
    T_ABORT,
    T_BEGIN,
    T_DECIDE,
    T_EXPIRE,
    T_FAIL,
    T_NOTIFIED,
    T_OK,
    T_TIMER,
    Preparer,
    Preparing,
    preparers_for,
)
from .sent import SentCommands

__all__ = [
    "HISTORY_BYTES",
    "HISTORY_ENTRY_BYTES",
    "HISTORY_LIMIT",
    "NEW_STATE",
    "Effects",
    "Ending",
    "Preparer",
    "RunHost",
    "WorkflowRun",
    "preparers_for",
]

_LOG = logging.getLogger("statemachines.workflow")

#: The state of a run before :meth:`WorkflowRun.start` (never a valid workflow state name).
NEW_STATE = "_new"


class Effects(Protocol):
    """The I/O a run asks for; implemented by the runner.

    ``send_command`` and ``start_timer`` may call back into the run synchronously (the event
    is queued behind the current one). If one of them raises, that run fails with an
    ``internal_error`` journal entry. A command's idempotency key is ``run.command_key`` when
    ``send_command`` is called: one per state visit, the same for every retry of the visit.
    ``abandon(run, token)`` says that the run leaves command (or timer) ``token`` without
    its outcome: an abort or the workflow timeout, or the state is left after an error (after
    a client-side timeout the command may still run); a command that may still run with that
    token is best cancelled, so that the device is free for what comes next; it is called
    before the next state sends anything. A client-side timeout that the state retries is
    *not* abandoned: the retry sends the same key, which joins the running execution.
    ``abandon``, ``record`` and ``finished`` must not raise: their exceptions propagate to the
    caller of the event method. ``finished`` is called once, after the last ``record``.
    """

    def send_command(
        self, run: WorkflowRun, token: int, server: str, method: str, params: Json, timeout: float
    ) -> None: ...

    def start_timer(self, run: WorkflowRun, token: int, delay: float) -> None: ...

    def abandon(self, run: WorkflowRun, token: int) -> None: ...

    def record(self, run: WorkflowRun, entry: JournalEntry) -> None: ...

    def finished(self, run: WorkflowRun) -> None: ...


class RunHost(Protocol):
    """What a run needs of its compiled workflow (:class:`~.machine.CompiledWorkflow`)."""

    @property
    def spec(self) -> WorkflowSpec: ...

    @property
    def timeout_reason(self) -> str: ...

    @property
    def triggers(self) -> Mapping[str, Callable[..., object]]: ...

    def release(self, run: WorkflowRun) -> None:
        """The run finished: drop it from the shared machine."""


class WorkflowRun(Preparing):
    """One run of a workflow (the ``transitions`` model). Drive it from one thread only.

    Public state: ``run_id``, ``state`` (current state name), ``context`` (``result``, the
    inputs and the saved names), ``outcome`` (None until done, then "success", "failure" or
    "aborted"), ``done``, ``reason`` (why it failed or was aborted), ``history`` (the newest
    journal entries), ``ignored`` (how many stale events did not move the run; an outcome
    of a command the run left is journaled as ``late`` too).
    """

    state: str

    def __init__(
        self,
        compiled: RunHost,
        effects: Effects,
        run_id: str,
        context: Mapping[str, Any] | None,
    ) -> None:
        self.compiled = compiled
        self.spec = compiled.spec
        self.effects = effects
        self.run_id = run_id
        self.context: dict[str, Any] = self.spec.run_context(context)  # ValueError: no input
        self.outcome: str | None = None
        self.done = False
        self.reason: str | None = None
        self._history = History()  #: bounded (see HISTORY_BYTES)
        self.history: list[JournalEntry] = self._history.entries
        self.ignored = 0
        self._abort_reason: str | None = None  #: abort(reason): the run fails with it
        self._timeout = self.spec.timeout  #: the workflow timeout (rendered at the start)
        self._timeout_reason = compiled.timeout_reason
        self._trigger = compiled.triggers
        self._started = False
        self._token = 0
        self._deadline = 0
        self._attempt = 0
        self._visit = 0
        self._command = 0  #: token of the newest command of this visit (0: none)
        self._sent = SentCommands()  #: the newest commands, for their late outcomes
        self._params: Json = None
        self._error: ErrorInfo | None = None
        self._entry: JournalEntry | None = None
        self._fresh = False
        self._ending: Ending | None = None
        self._st: StateSpec | None = None
        self._prep: Mapping[str, Preparer] = NEW_PREPARERS
        self._awaiting: tuple[str, str] | None = None
        self.on_await_change: Callable[[WorkflowRun], None] | None = None  #: see awaiting

    def __repr__(self) -> str:
        return (
            f"<WorkflowRun {self.run_id} {self.spec.name} state={self.state} "
            f"outcome={self.outcome}>"
        )

    # --- events (from the dispatcher thread) ---------------------------------------------

    def start(self) -> None:
        """Enter the initial state (and start the workflow ``timeout``, if any)."""
        if self._started or self.done:
            return
        self._started = True
        self._trigger[T_BEGIN](self)

    def on_reply(self, token: int, result: Json, replayed: bool = False) -> None:
        """The command with ``token`` succeeded (``replayed``: the server's stored outcome)."""
        if self.done:
            return
        if token != self._token and token in self._sent:
            self.ignored += 1
            self._late(self._sent.late(token, result=result, replayed=replayed))
        else:
            self._trigger[T_OK](self, Reply(token, result, replayed))

    def on_error(
        self,
        token: int,
        kind: str | None,
        code: int | None,
        message: str,
        data: Json = None,
        replayed: bool = False,
    ) -> None:
        """The command with ``token`` failed; ``kind`` None is derived from ``code``."""
        if self.done:
            return
        error = ErrorInfo.of(kind, code, message, data)
        if token != self._token and token in self._sent:
            self.ignored += 1
            self._late(self._sent.late(token, error=error.as_dict(), replayed=replayed))
        else:
            self._trigger[T_FAIL](self, Failure(token, error, replayed))

    def on_late(
        self,
        token: int,
        result: Json = None,
        error: ErrorInfo | None = None,
        replayed: bool = False,
    ) -> None:
        """The real outcome of command ``token`` came after its client-side timeout (which
        the run already took as the outcome): journal it as a ``late`` entry, nothing else.
        Ignored once the run is done, or for a token it does not remember (see SENT_LIMIT)."""
        if not self.done:
            error_json = error.as_dict() if error is not None else None
            self._late(self._sent.late(token, result=result, error=error_json, replayed=replayed))

    def on_timer(self, token: int) -> None:
        """The timer with ``token`` expired."""
        if self.done:
            return
        if token == self._deadline:
            self._trigger[T_EXPIRE](self)
        else:
            self._trigger[T_TIMER](self, Tick(token))

    def on_notification(self, server: str, method: str, params: Json) -> None:
        """A notification arrived; it matters only to an await state waiting for it."""
        st = self._st
        if self.done or st is None or st.kind != "await":
            return
        if st.awaits == method and st.server == server:
            self._trigger[T_NOTIFIED](self, Notified(self._token, server, method, params))

    def abort(self, reason: str | None = None) -> None:
        """Go to ``on_abort`` (final outcome "aborted"); without it, or again, finish now.
        With ``reason`` (e.g. "journal write failed: ..."), the same path but the outcome is
        "failure" with that reason, and the ``abort`` entry says it."""
        if not self.done:
            if reason is not None and self._abort_reason is None:
                self._abort_reason = reason
            self._trigger[T_ABORT](self)

    @property
    def visit(self) -> int:
        """How many states the run has entered (1 for the initial state)."""
        return self._visit

    @property
    def command_key(self) -> str:
        """The idempotency key of the current state visit: ``f"{run_id}:{visit}"``. Every
        try of one visit's command sends it, so the device acts at most once per visit."""
        return f"{self.run_id}:{self._visit}"

    @property
    def awaiting(self) -> tuple[str, str] | None:
        """``(server, method)`` of the notification the run awaits now, else None; each change
        calls ``on_await_change(run)`` (if set; on the thread driving the run; must not raise)."""
        return self._awaiting

    def expects(self, token: int) -> bool:
        """True while the event ``token`` (of a command sent or a timer started by this run)
        is still the one the run waits for; False once it moved on (abort, timeout, finish)."""
        return token == self._token

    # --- engine: called by the compiled machine's callbacks ------------------------------

    @property
    def fresh(self) -> bool:
        """False when the event being handled is stale (an old token, or after the end)."""
        return self._fresh

    @property
    def error(self) -> ErrorInfo | None:
        """The error of the event being handled (a failed command, an await timeout)."""
        return self._error

    @property
    def attempt(self) -> int:
        """The try number of the current command state (1 for the first try)."""
        return self._attempt

    @property
    def ending(self) -> Ending | None:
        """Set once the run entered ``on_abort``: how it will end."""
        return self._ending

    def prepare(self, trigger: str, event: object) -> None:
        """Classify an event once, before any transition: stale or fresh, the context update,
        the pending journal entry (recorded by :meth:`record_pending`)."""
        self._entry = None
        handler = self._prep.get(trigger)
        if handler is None or self.done:
            self._stale()
        else:
            handler(self, event)

    def record_pending(
        self,
        next_state: str | None = None,
        *,
        choice: str | None = None,
        retry_in: float | None = None,
        unhandled: bool = False,
    ) -> None:
        """Complete the pending journal entry (if any) and record it."""
        entry = self._entry
        if entry is None:
            return
        self._entry = None
        if next_state is not None:
            entry["next"] = next_state
        if choice is not None:
            entry["choice"] = choice
        if retry_in is not None:
            entry["retry_in"] = retry_in
        if unhandled:
            entry["unhandled"] = True
        self._record(entry)

    def start_deadline(self) -> None:
        """Start the workflow ``timeout`` (if any): from the start on."""
        template = self.spec.timeout_template
        if template is not None:  # raises ExpressionError: the run fails (crash)
            self._timeout = template.render(self.context)
            self._timeout_reason = f"workflow timeout ({format_duration(self._timeout)}) expired"
        timeout = self._timeout
        if timeout is not None:
            self._deadline = next_token()
            self.effects.start_timer(self, self._deadline, timeout)

    def enter(self, st: StateSpec, preparers: Mapping[str, Preparer]) -> None:
        """The state's action (``on_enter``): send, start a timer, decide or finish.
        Templated durations are rendered first (an ExpressionError fails the run)."""
        if st.durations:
            st = st.resolved(self.context)
        self._st = st
        self._prep = preparers
        self._visit += 1
        self._command = 0
        kind = st.kind
        self._set_awaiting((st.server, st.awaits) if st.server and st.awaits else None)
        if kind == "command":
            self._attempt = 1
            self._params = None if st.params is None else st.params.render(self.context)
            self._send(st)
        elif kind == "wait":
            assert st.wait is not None
            self._timer(st.wait)
        elif kind == "await":
            assert st.timeout is not None
            self._timer(st.timeout)
        elif kind == "choice":
            self._token = token = next_token()
            self._trigger[T_DECIDE](self, Tick(token))
        elif self._ending is not None:
            self._finish(self._ending.outcome, self._ending.reason)
        elif st.final == "success":
            self._finish("success", None)
        else:
            self._finish("failure", f"reached the failure state {st.name!r}")

    def resend(self) -> None:
        """Try the current command again (a retry's timer expired)."""
        assert self._st is not None
        self._attempt += 1
        self._send(self._st)

    def retry_delay(self) -> float:
        """Seconds to wait before the next try of the current command (its ``retry``)."""
        st = self._st
        assert st is not None and st.retry is not None
        return st.retry.delay(self._attempt)

    def schedule_retry(self, delay: float) -> None:
        """Start the timer after which the current command is tried again."""
        self._timer(delay)

    def abandon_open(self) -> None:
        """The run leaves its current action without its outcome (abort, workflow timeout,
        an error route out of a command state): :meth:`Effects.abandon` the current token,
        and the visit's newest command if that is another one (a retry delay after a
        client-side timeout: the command may still run)."""
        self.effects.abandon(self, self._token)
        if self._command and self._command != self._token:
            self.effects.abandon(self, self._command)

    def save(self, name: str, value: Json) -> None:
        """Store ``value`` under ``name`` in the context (``save:`` of an await state)."""
        self.context[name] = value

    def begin_ending(self, outcome: str, reason: str | None) -> None:
        """The run moves into ``on_abort``: it ends with ``outcome`` whatever happens there
        (``reason`` None: the workflow timeout expired)."""
        if reason is None:
            reason = self._timeout_reason
        if outcome == "aborted" and self._abort_reason is not None:
            outcome, reason = "failure", self._abort_reason
        self._ending = Ending(outcome, reason)

    def abort_now(self) -> None:
        """Finish as aborted (no ``on_abort``, or aborted again inside it)."""
        if self._ending is None:
            if self._abort_reason is not None:
                self._finish("failure", self._abort_reason)
            else:
                self._finish("aborted", "aborted")
        else:
            ending = self._ending
            self._finish(ending.outcome, f"{ending.reason}; aborted again in the on_abort path")

    def expire_now(self) -> None:
        """Finish because the workflow ``timeout`` expired."""
        reason = self._timeout_reason
        if self._ending is None:
            self._finish("failure", reason)
        else:
            ending = self._ending
            self._finish(ending.outcome, f"{ending.reason}; {reason} in the on_abort path")

    def fail(self, reason: str) -> None:
        """Finish as failed (or as the ``on_abort`` path decided, with ``reason`` added)."""
        if self._ending is not None:
            self._finish(self._ending.outcome, f"{self._ending.reason}; then {reason}")
        else:
            self._finish("failure", reason)

    def crash(self, error: BaseException) -> None:
        """Something raised inside the machine: fail this run only (never the others)."""
        if self.done:
            _LOG.error("workflow run %s: error after it finished", self.run_id, exc_info=error)
            return
        self.record_pending()
        if isinstance(error, ExpressionError):
            self._record(
                {
                    "time": now(),
                    "state": self.state,
                    "event": "expression_error",
                    "expression": error.expression,
                    "message": error.message,
                }
            )
            self.fail(f"expression failed in state {self.state!r}: {error.message}")
        else:
            _LOG.error("workflow run %s: internal error", self.run_id, exc_info=error)
            message = f"{type(error).__name__}: {error}"
            self._record(
                {"time": now(), "state": self.state, "event": "internal_error", "message": message}
            )
            self.fail(f"internal error in state {self.state!r}: {message}")

    # --- internals -----------------------------------------------------------------------

    def _record(self, entry: JournalEntry) -> None:
        self._history.add(entry)
        self.effects.record(self, entry)

    def _send(self, st: StateSpec) -> None:
        token = self._token = self._command = next_token()
        assert st.server is not None and st.command is not None and st.timeout is not None
        self._sent.add(token, st.name, st.server, st.command, self.command_key, self._attempt)
        self.effects.send_command(self, token, st.server, st.command, self._params, st.timeout)

    def _set_awaiting(self, awaiting: tuple[str, str] | None) -> None:
        if awaiting != self._awaiting:
            self._awaiting = awaiting
            if self.on_await_change is not None:
                self.on_await_change(self)

    def _late(self, entry: JournalEntry | None) -> None:
        """Journal a command's outcome that came after the run stopped waiting for it."""
        if entry is not None:
            self._record(entry)

    def _timer(self, delay: float) -> None:
        token = self._token = next_token()
        self.effects.start_timer(self, token, delay)

    def _finish(self, outcome: str, reason: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.outcome = outcome
        self.reason = reason
        self._token = -1
        self._set_awaiting(None)
        self._record(
            {
                "time": now(),
                "state": self.state,
                "event": "finished",
                "final": outcome,
                "reason": reason,
            }
        )
        self.compiled.release(self)
        self.effects.finished(self)
