"""The workflow engine: one ``transitions`` machine per workflow, one model per run.

Pure: no sockets, no threads, no clocks but the journal's timestamps. I/O is asked for
through :class:`Effects`, which the runner implements (see "The workflow run contract" in
``docs/design.md``). A run is driven from one dispatcher thread.

How it maps onto ``transitions`` (built once per :class:`CompiledWorkflow`, shared by runs):

* every workflow state is a machine state whose ``on_enter`` issues the state's action
  (send a command, start a timer, decide a choice, finish);
* events are triggers (``ev_ok``, ``ev_fail``, ``ev_timer``, ``ev_notified``, ``ev_decide``,
  ``ev_abort``, ``ev_expire``, ``ev_begin``); for each (trigger, state) the transitions are
  tried in order and the first whose conditions pass wins: a guard that swallows stale
  events, then the routes (choices, error kinds/codes, ``"*"``), then a fallback that fails
  the run (no choice matched, unhandled error);
* the machine is ``queued``: an event raised inside a callback (a choice state deciding at
  once, an Effects implementation that answers synchronously) runs after the current one;
* ``prepare_event`` classifies each event once (stale or fresh, context update, the journal
  entry), ``before`` callbacks record the entry with its ``next`` *before* the next state's
  action runs, and ``on_exception`` turns any failure inside the machine (an expression that
  cannot be evaluated, an Effects call that raised) into a failed run, so no exception
  escapes to other runs sharing the machine.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from transitions import Machine

from .errorkinds import TIMEOUT, kind_of
from .expressions import Expression, ExpressionError
from .workflow_spec import RetrySpec, StateSpec, WorkflowSpec, format_duration

__all__ = ["NEW_STATE", "CompiledWorkflow", "Effects", "ErrorInfo", "WorkflowRun"]

_LOG = logging.getLogger(__name__)

#: A ``transitions.EventData`` whose ``.model`` is a :class:`WorkflowRun` (typed loosely: the
#: stubs say ``object``, and callbacks run on every event, so no cast per call).
_Ev = Any

#: The state of a run before :meth:`WorkflowRun.start` (never a valid workflow state name).
NEW_STATE = "_new"
#: :attr:`WorkflowRun.history` keeps the newest entries: at most twice this, trimmed to this.
HISTORY_LIMIT = 1000

T_BEGIN = "ev_begin"
T_OK = "ev_ok"
T_FAIL = "ev_fail"
T_TIMER = "ev_timer"
T_NOTIFIED = "ev_notified"
T_DECIDE = "ev_decide"
T_ABORT = "ev_abort"
T_EXPIRE = "ev_expire"
_TOKEN_TRIGGERS = (T_OK, T_FAIL, T_TIMER, T_NOTIFIED, T_DECIDE)

#: Tokens are unique in the process, so a runner may key timers and calls by token alone.
_tokens = itertools.count(1)


class Effects(Protocol):
    """The I/O a run asks for; implemented by the runner.

    ``send_command`` and ``start_timer`` may call back into the run synchronously (the event
    is queued behind the current one). If one of them raises, that run fails with an
    ``internal_error`` journal entry. ``abandon(run, token)`` says that the run leaves its
    current action ``token`` without waiting for it (an abort, the workflow timeout): a command
    still in flight with that token is best cancelled, so that the device is free for the
    ``on_abort`` path; it is called before that path sends anything. ``abandon``, ``record``
    and ``finished`` must not raise: their exceptions propagate to the caller of the event
    method. ``finished`` is called once, after the last ``record``.
    """

    def send_command(
        self, run: WorkflowRun, token: int, server: str, method: str, params: Any, timeout: float
    ) -> None: ...

    def start_timer(self, run: WorkflowRun, token: int, delay: float) -> None: ...

    def abandon(self, run: WorkflowRun, token: int) -> None: ...

    def record(self, run: WorkflowRun, entry: dict[str, Any]) -> None: ...

    def finished(self, run: WorkflowRun) -> None: ...


class ErrorInfo:
    """One error outcome: ``kind`` (see ``errorkinds``), JSON-RPC ``code``, message, data."""

    __slots__ = ("code", "data", "kind", "message")

    def __init__(self, kind: str, code: int | None, message: str, data: Any = None) -> None:
        self.kind = kind
        self.code = code
        self.message = message
        self.data = data

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "code": self.code, "message": self.message, "data": self.data}


_clock: tuple[int, str] = (-1, "")


def _now() -> str:
    """ISO-8601 UTC with milliseconds, e.g. ``2025-01-31T12:00:00.123Z``."""
    global _clock
    t = time.time()
    sec = int(t)
    cached_sec, text = _clock
    if cached_sec != sec:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _clock = (sec, text)
    return f"{text}.{int((t - sec) * 1000):03d}Z"


class _WithParams(Mapping[str, Any]):
    """The names of an await state's ``if``: the run's context plus ``params``."""

    __slots__ = ("_context", "_params")

    def __init__(self, context: Mapping[str, Any], params: Any) -> None:
        self._context = context
        self._params = params

    def __getitem__(self, key: str) -> Any:
        return self._params if key == "params" else self._context[key]

    def __iter__(self) -> Any:
        return iter({**self._context, "params": None})

    def __len__(self) -> int:
        return len(self._context) + 1


class WorkflowRun:
    """One run of a workflow (the ``transitions`` model). Drive it from one thread only.

    Public state: ``run_id``, ``state`` (current state name), ``context`` (``result``, the
    inputs and the saved names), ``outcome`` (None until done, then "success", "failure" or
    "aborted"), ``done``, ``reason`` (why it failed or was aborted), ``history`` (the newest
    journal entries), ``ignored`` (how many stale events were dropped).
    """

    state: str

    def __init__(
        self,
        compiled: CompiledWorkflow,
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
        self.history: list[dict[str, Any]] = []
        self.ignored = 0
        self._started = False
        self._token = 0
        self._deadline = 0
        self._attempt = 0
        self._params: Any = None
        self._error: ErrorInfo | None = None
        self._entry: dict[str, Any] | None = None
        self._fresh = False
        self._ending: tuple[str, str] | None = None
        self._st: StateSpec | None = None
        self._prep: Mapping[str, _Prepare] = compiled._prepare[NEW_STATE]

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
        self.compiled._trigger[T_BEGIN](self)

    def on_reply(self, token: int, result: Any) -> None:
        """The command with ``token`` succeeded."""
        if not self.done:
            self.compiled._trigger[T_OK](self, token, result)

    def on_error(
        self, token: int, kind: str | None, code: int | None, message: str, data: Any = None
    ) -> None:
        """The command with ``token`` failed; ``kind`` None is derived from ``code``."""
        if not self.done:
            self.compiled._trigger[T_FAIL](self, token, kind, code, message, data)

    def on_timer(self, token: int) -> None:
        """The timer with ``token`` expired."""
        if self.done:
            return
        if token == self._deadline:
            self.compiled._trigger[T_EXPIRE](self)
        else:
            self.compiled._trigger[T_TIMER](self, token)

    def on_notification(self, server: str, method: str, params: Any) -> None:
        """A notification arrived; it matters only to an await state waiting for it."""
        st = self._st
        if self.done or st is None or st.kind != "await":
            return
        if st.awaits == method and st.server == server:
            self.compiled._trigger[T_NOTIFIED](self, self._token, server, method, params)

    def abort(self) -> None:
        """Go to ``on_abort`` (final outcome "aborted"); without it, or again, finish now."""
        if not self.done:
            self.compiled._trigger[T_ABORT](self)

    def expects(self, token: int) -> bool:
        """True while the event ``token`` (of a command sent or a timer started by this run)
        is still the one the run waits for; False once it moved on (abort, timeout, finish)."""
        return token == self._token

    # --- internals -----------------------------------------------------------------------

    def _record(self, entry: dict[str, Any]) -> None:
        history = self.history
        history.append(entry)
        if len(history) > 2 * HISTORY_LIMIT:
            del history[:-HISTORY_LIMIT]
        self.effects.record(self, entry)

    def _send(self, st: StateSpec) -> None:
        token = self._token = next(_tokens)
        assert st.server is not None and st.command is not None and st.timeout is not None
        self.effects.send_command(self, token, st.server, st.command, self._params, st.timeout)

    def _timer(self, delay: float) -> None:
        token = self._token = next(_tokens)
        self.effects.start_timer(self, token, delay)

    def _finish(self, outcome: str, reason: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.outcome = outcome
        self.reason = reason
        self._token = -1
        self._record(
            {
                "time": _now(),
                "state": self.state,
                "event": "finished",
                "final": outcome,
                "reason": reason,
            }
        )
        self.compiled.machine.remove_model(self)
        self.effects.finished(self)

    def _fail(self, reason: str) -> None:
        if self._ending is not None:
            outcome, why = self._ending
            self._finish(outcome, f"{why}; then {reason}")
        else:
            self._finish("failure", reason)


# --- prepare: classify each event once ------------------------------------------------------

_Prepare = Callable[[WorkflowRun, tuple[Any, ...]], None]


def _stale(run: WorkflowRun) -> None:
    run._fresh = False
    run.ignored += 1


def _prep_begin(run: WorkflowRun, args: tuple[Any, ...]) -> None:
    run._fresh = True
    run._entry = {
        "time": _now(),
        "state": run.spec.initial,
        "event": "start",
        "workflow": run.spec.name,
        "run": run.run_id,
    }
    if run.spec.inputs:
        run._entry["inputs"] = {name: run.context[name] for name in run.spec.inputs}


def _prep_reply(run: WorkflowRun, args: tuple[Any, ...]) -> None:
    token, result = args
    if token != run._token:
        return _stale(run)
    st = run._st
    assert st is not None
    run._fresh = True
    context = run.context
    context["result"] = result
    if st.save is not None:
        context[st.save] = result
    run._entry = {
        "time": _now(),
        "state": st.name,
        "event": "reply",
        "server": st.server,
        "command": st.command,
        "params": run._params,
        "attempt": run._attempt,
        "result": result,
    }


def _prep_error(run: WorkflowRun, args: tuple[Any, ...]) -> None:
    token, kind, code, message, data = args
    if token != run._token:
        return _stale(run)
    st = run._st
    assert st is not None
    run._fresh = True
    if not kind:
        kind = kind_of(code) if isinstance(code, int) else "server_error"
    error = run._error = ErrorInfo(kind, code, message, data)
    run._entry = {
        "time": _now(),
        "state": st.name,
        "event": "error",
        "server": st.server,
        "command": st.command,
        "params": run._params,
        "attempt": run._attempt,
        "error": error.as_dict(),
    }


def _prep_retry_timer(run: WorkflowRun, args: tuple[Any, ...]) -> None:
    if args[0] != run._token:
        return _stale(run)
    run._fresh = True
    run._entry = {"time": _now(), "state": run.state, "event": "retry", "attempt": run._attempt + 1}


def _prep_wait_timer(run: WorkflowRun, args: tuple[Any, ...]) -> None:
    if args[0] != run._token:
        return _stale(run)
    run._fresh = True
    run._entry = {"time": _now(), "state": run.state, "event": "waited"}


def _prep_await_timer(run: WorkflowRun, args: tuple[Any, ...]) -> None:
    if args[0] != run._token:
        return _stale(run)
    st = run._st
    assert st is not None and st.timeout is not None
    run._fresh = True
    error = run._error = ErrorInfo(
        "timeout",
        TIMEOUT,
        f"no {st.awaits} notification within {format_duration(st.timeout)}",
    )
    run._entry = {
        "time": _now(),
        "state": st.name,
        "event": "await_timeout",
        "server": st.server,
        "method": st.awaits,
        "error": error.as_dict(),
    }


def _prep_notification(run: WorkflowRun, args: tuple[Any, ...]) -> None:
    token, server, method, params = args
    if token != run._token:
        return _stale(run)
    run._fresh = True
    run._entry = {
        "time": _now(),
        "state": run.state,
        "event": "notification",
        "server": server,
        "method": method,
        "params": params,
    }


def _prep_decide(run: WorkflowRun, args: tuple[Any, ...]) -> None:
    if args[0] != run._token:
        return _stale(run)
    run._fresh = True
    run._entry = {"time": _now(), "state": run.state, "event": "choice"}


def _prep_abort(run: WorkflowRun, args: tuple[Any, ...]) -> None:
    run._fresh = True
    run.effects.abandon(run, run._token)
    run._entry = {"time": _now(), "state": run.state, "event": "abort"}


def _prep_expire(run: WorkflowRun, args: tuple[Any, ...]) -> None:
    run._fresh = True
    run.effects.abandon(run, run._token)
    run._entry = {
        "time": _now(),
        "state": run.state,
        "event": "workflow_timeout",
        "timeout": run.spec.timeout,
    }


def _prepare_event(ev: _Ev) -> None:
    run: WorkflowRun = ev.model
    run._entry = None
    handler = run._prep.get(ev.event.name)
    if handler is None or run.done:
        _stale(run)
    else:
        handler(run, ev.args)


# --- conditions and callbacks (shared by all runs) ------------------------------------------


def _is_stale(ev: _Ev) -> bool:
    return not ev.model._fresh


class _Record:
    """``before`` callback: complete the pending journal entry and record it."""

    __slots__ = ("extra", "next")

    def __init__(self, next_state: str | None, extra: Mapping[str, Any] | None = None) -> None:
        self.next = next_state
        self.extra = dict(extra or {})

    def __call__(self, ev: _Ev) -> None:
        run: WorkflowRun = ev.model
        entry = run._entry
        if entry is None:
            return
        run._entry = None
        if self.next is not None:
            entry["next"] = self.next
        if self.extra:
            entry.update(self.extra)
        run._record(entry)


class _Condition:
    """A choice's ``if`` over the run's context."""

    __slots__ = ("expr",)

    def __init__(self, expr: Expression) -> None:
        self.expr = expr

    def __call__(self, ev: _Ev) -> bool:
        return bool(self.expr.evaluate(ev.model.context))


class _AwaitCondition(_Condition):
    """An await state's ``if`` over the context plus the notification's ``params``."""

    __slots__ = ()

    def __call__(self, ev: _Ev) -> bool:
        return bool(self.expr.evaluate(_WithParams(ev.model.context, ev.args[3])))


class _SaveParams:
    """``before`` of a matched await with ``save``: store the notification's params."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, ev: _Ev) -> None:
        ev.model.context[self.name] = ev.args[3]


class _CodeIs:
    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code

    def __call__(self, ev: _Ev) -> bool:
        error = ev.model._error
        return error is not None and error.code == self.code


class _KindIs:
    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, ev: _Ev) -> bool:
        error = ev.model._error
        return error is not None and error.kind == self.kind


class _Retry:
    """A command state's retry: the condition, the journal fields and the delay timer."""

    __slots__ = ("spec",)

    def __init__(self, spec: RetrySpec) -> None:
        self.spec = spec

    def can_retry(self, ev: _Ev) -> bool:
        run: WorkflowRun = ev.model
        error = run._error
        return (
            error is not None
            and run._attempt < self.spec.attempts
            and self.spec.applies(error.kind, error.code)
        )

    def record(self, ev: _Ev) -> None:
        run: WorkflowRun = ev.model
        entry = run._entry
        if entry is not None:
            run._entry = None
            entry["retry_in"] = self.spec.delay(run._attempt)
            run._record(entry)

    def schedule(self, ev: _Ev) -> None:
        run: WorkflowRun = ev.model
        run._timer(self.spec.delay(run._attempt))


def _start_deadline(ev: _Ev) -> None:
    """``before`` of the start: the workflow ``timeout`` runs from here."""
    run: WorkflowRun = ev.model
    timeout = run.spec.timeout
    if timeout is not None:
        run._deadline = next(_tokens)
        run.effects.start_timer(run, run._deadline, timeout)


def _resend(ev: _Ev) -> None:
    run: WorkflowRun = ev.model
    assert run._st is not None
    run._attempt += 1
    run._send(run._st)


def _record_unhandled(ev: _Ev) -> None:
    run: WorkflowRun = ev.model
    if run._entry is not None:
        run._entry["unhandled"] = True
    _Record(None)(ev)


def _unhandled(ev: _Ev) -> None:
    run: WorkflowRun = ev.model
    error = run._error
    assert error is not None
    code = f" ({error.code})" if error.code is not None else ""
    run._fail(f"unhandled error in state {run.state!r}: {error.kind}{code}: {error.message}")


def _no_choice(ev: _Ev) -> None:
    run: WorkflowRun = ev.model
    run._fail(f"no choice of state {run.state!r} matched and it has no default")


class _StartEnding:
    """``before`` of the move into ``on_abort``: remember how the run will end."""

    __slots__ = ("outcome", "reason")

    def __init__(self, outcome: str, reason: str) -> None:
        self.outcome = outcome
        self.reason = reason

    def __call__(self, ev: _Ev) -> None:
        ev.model._ending = (self.outcome, self.reason)


def _not_ending(ev: _Ev) -> bool:
    return ev.model._ending is None


def _abort_now(ev: _Ev) -> None:
    run: WorkflowRun = ev.model
    if run._ending is None:
        run._finish("aborted", "aborted")
    else:
        outcome, why = run._ending
        run._finish(outcome, f"{why}; aborted again in the on_abort path")


def _expire_now(ev: _Ev) -> None:
    run: WorkflowRun = ev.model
    if run._ending is None:
        run._finish("failure", run.compiled.timeout_reason)
    else:
        outcome, why = run._ending
        run._finish(outcome, f"{why}; {run.compiled.timeout_reason} in the on_abort path")


def _on_exception(ev: _Ev) -> None:
    """Anything raised inside the machine fails that run only (and never the others)."""
    run: WorkflowRun = ev.model
    error = ev.error
    if run.done:
        _LOG.error("workflow run %s: error after it finished", run.run_id, exc_info=error)
        return
    if run._entry is not None:
        _Record(None)(ev)
    if isinstance(error, ExpressionError):
        run._record(
            {
                "time": _now(),
                "state": run.state,
                "event": "expression_error",
                "expression": error.expression,
                "message": error.message,
            }
        )
        run._fail(f"expression failed in state {run.state!r}: {error.message}")
    else:
        _LOG.error("workflow run %s: internal error", run.run_id, exc_info=error)
        message = f"{type(error).__name__}: {error}"
        run._record(
            {"time": _now(), "state": run.state, "event": "internal_error", "message": message}
        )
        run._fail(f"internal error in state {run.state!r}: {message}")


# --- state actions (on_enter) ------------------------------------------------------------------


class _Enter:
    """``on_enter`` of one workflow state: point the run at the state, then act."""

    __slots__ = ("compiled", "prep", "st")

    def __init__(self, compiled: CompiledWorkflow, st: StateSpec) -> None:
        self.compiled = compiled
        self.st = st
        self.prep = compiled._prepare[st.name]

    def __call__(self, ev: _Ev) -> None:
        run: WorkflowRun = ev.model
        st = run._st = self.st
        run._prep = self.prep
        kind = st.kind
        if kind == "command":
            run._attempt = 1
            run._params = None if st.params is None else st.params.render(run.context)
            run._send(st)
        elif kind == "wait":
            assert st.wait is not None
            run._timer(st.wait)
        elif kind == "await":
            assert st.timeout is not None
            run._timer(st.timeout)
        elif kind == "choice":
            run._token = token = next(_tokens)
            self.compiled._trigger[T_DECIDE](run, token)
        elif run._ending is not None:
            run._finish(*run._ending)
        elif st.final == "success":
            run._finish("success", None)
        else:
            run._finish("failure", f"reached the failure state {st.name!r}")


# --- the compiled workflow -------------------------------------------------------------------


class CompiledWorkflow:
    """A workflow ready to run: one ``transitions.Machine`` shared by all its runs."""

    def __init__(self, spec: WorkflowSpec) -> None:
        self.spec = spec
        self.timeout_reason = (
            f"workflow timeout ({format_duration(spec.timeout)}) expired"
            if spec.timeout is not None
            else "workflow timeout expired"
        )
        self._prepare: dict[str, dict[str, _Prepare]] = {
            NEW_STATE: {T_BEGIN: _prep_begin, T_ABORT: _prep_abort, T_EXPIRE: _prep_expire}
        }
        for name, st in spec.states.items():
            self._prepare[name] = self._prepares(st)
        states: list[dict[str, Any]] = [{"name": NEW_STATE}]
        transitions: list[dict[str, Any]] = [
            {
                "trigger": T_BEGIN,
                "source": NEW_STATE,
                "dest": spec.initial,
                "before": [_Record(spec.initial), _start_deadline],
            },
            {
                "trigger": T_ABORT,
                "source": NEW_STATE,
                "dest": None,
                "before": [_Record(None)],
                "after": [_abort_now],
            },
            {
                "trigger": T_EXPIRE,
                "source": NEW_STATE,
                "dest": None,
                "before": [_Record(None)],
                "after": [_expire_now],
            },
        ]
        for name, st in spec.states.items():
            states.append(
                {"name": name, "on_enter": [_Enter(self, st)], "final": st.kind == "final"}
            )
            if st.kind != "final":
                transitions += self._transitions(st)
        self.machine = Machine(
            model=None,
            states=states,
            transitions=transitions,
            initial=NEW_STATE,
            send_event=True,
            queued=True,
            auto_transitions=False,
            ignore_invalid_triggers=True,
            prepare_event=[_prepare_event],
            on_exception=[_on_exception],
            name=f"workflow {spec.name}",
        )
        self._trigger: dict[str, Callable[..., Any]] = {
            name: event.trigger for name, event in self.machine.events.items()
        }

    # runs

    def new_run(
        self, effects: Effects, run_id: str, context: Mapping[str, Any] | None = None
    ) -> WorkflowRun:
        """A new run (a model of the shared machine, removed again when it finishes)."""
        run = WorkflowRun(self, effects, run_id, context)
        self.machine.add_model(run, initial=NEW_STATE)
        return run

    # introspection

    def graph_edges(self) -> list[tuple[str, str, str]]:
        """``(source, dest, label)`` of every transition, for ``statemachines.graph``."""
        edges: list[tuple[str, str, str]] = []
        for name, st in self.spec.states.items():
            if st.retry is not None:
                edges.append((name, name, f"retry x{st.retry.attempts}"))
            edges += [(name, dest, label) for label, dest in st.targets()]
        return edges

    def graph_finals(self) -> tuple[str, ...]:
        """The final states, for ``statemachines.graph``."""
        return self.spec.finals()

    def graph_args(self) -> dict[str, Any]:
        """Keyword arguments for ``render_graph(**compiled.graph_args(), fmt=...)``."""
        return {
            "title": self.spec.name,
            "states": list(self.spec.states),
            "initial": self.spec.initial,
            "edges": self.graph_edges(),
            "finals": self.graph_finals(),
        }

    def awaited(self) -> set[tuple[str, str]]:
        """``(server, method)`` of every notification an await state waits for."""
        return {
            (st.server, st.awaits)
            for st in self.spec.states.values()
            if st.kind == "await" and st.server is not None and st.awaits is not None
        }

    # building

    def _prepares(self, st: StateSpec) -> dict[str, _Prepare]:
        prep: dict[str, _Prepare] = {T_ABORT: _prep_abort, T_EXPIRE: _prep_expire}
        if st.kind == "command":
            prep.update({T_OK: _prep_reply, T_FAIL: _prep_error})
            if st.retry is not None:
                prep[T_TIMER] = _prep_retry_timer
        elif st.kind == "wait":
            prep[T_TIMER] = _prep_wait_timer
        elif st.kind == "await":
            prep.update({T_TIMER: _prep_await_timer, T_NOTIFIED: _prep_notification})
        elif st.kind == "choice":
            prep[T_DECIDE] = _prep_decide
        return prep

    def _transitions(self, st: StateSpec) -> list[dict[str, Any]]:
        name = st.name
        out: list[dict[str, Any]] = [
            {"trigger": t, "source": name, "dest": None, "conditions": [_is_stale]}
            for t in _TOKEN_TRIGGERS
        ]

        def add(trigger: str, dest: str | None, **kw: Any) -> None:
            out.append({"trigger": trigger, "source": name, "dest": dest, **kw})

        if st.kind == "command":
            if st.choices:
                self._choices(st, T_OK, add)
            else:
                add(T_OK, st.next, before=[_Record(st.next)])
            if st.retry is not None:
                retry = _Retry(st.retry)
                add(
                    T_FAIL,
                    None,
                    conditions=[retry.can_retry],
                    before=[retry.record],
                    after=[retry.schedule],
                )
                add(T_TIMER, None, before=[_Record(None)], after=[_resend])
            self._routes(st, T_FAIL, add)
        elif st.kind == "choice":
            self._choices(st, T_DECIDE, add)
        elif st.kind == "wait":
            add(T_TIMER, st.next, before=[_Record(st.next)])
        elif st.kind == "await":
            before: list[Any] = [_SaveParams(st.save)] if st.save else []
            conditions = [_AwaitCondition(st.condition)] if st.condition is not None else []
            add(T_NOTIFIED, st.next, conditions=conditions, before=[*before, _Record(st.next)])
            add(T_NOTIFIED, None)  # the condition did not hold: keep waiting, quietly
            self._routes(st, T_TIMER, add)
        on_abort = self.spec.on_abort
        for trigger, reason, now in (
            (T_ABORT, "aborted", _abort_now),
            (T_EXPIRE, self.timeout_reason, _expire_now),
        ):
            outcome = "aborted" if trigger == T_ABORT else "failure"
            if on_abort is not None:
                add(
                    trigger,
                    on_abort,
                    conditions=[_not_ending],
                    before=[_StartEnding(outcome, reason), _Record(on_abort)],
                )
            add(trigger, None, before=[_Record(None)], after=[now])
        return out

    @staticmethod
    def _choices(st: StateSpec, trigger: str, add: Callable[..., None]) -> None:
        for choice in st.choices:
            conditions = [] if choice.condition is None else [_Condition(choice.condition)]
            add(
                trigger,
                choice.next,
                conditions=conditions,
                before=[_Record(choice.next, {"choice": choice.label})],
            )
        if st.choices[-1].condition is not None:
            add(trigger, None, before=[_Record(None)], after=[_no_choice])

    @staticmethod
    def _routes(st: StateSpec, trigger: str, add: Callable[..., None]) -> None:
        routes = st.on_error
        for code, target in routes.by_code.items():
            add(trigger, target, conditions=[_CodeIs(code)], before=[_Record(target)])
        for kind, target in routes.by_kind.items():
            add(trigger, target, conditions=[_KindIs(kind)], before=[_Record(target)])
        if routes.default is not None:
            add(trigger, routes.default, before=[_Record(routes.default)])
        else:
            add(trigger, None, before=[_record_unhandled], after=[_unhandled])
