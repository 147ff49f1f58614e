"""The workflow engine: one ``transitions`` machine per workflow (:class:`CompiledWorkflow`),
one model per run (:class:`~.run.WorkflowRun`).

Pure: no sockets, no threads, no clocks but the journal's timestamps. I/O is asked for
through :class:`~.run.Effects`, which the runner implements (see "The workflow run contract"
in ``docs/design.md``). A run is driven from one dispatcher thread.

How it maps onto ``transitions`` (built once per :class:`CompiledWorkflow`, shared by runs):

* every workflow state is a machine state whose ``on_enter`` issues the state's action
  (send a command, start a timer, decide a choice, finish);
* events are triggers (``ev_ok``, ``ev_fail``, ``ev_timer``, ``ev_notified``, ``ev_decide``,
  ``ev_abort``, ``ev_expire``, ``ev_begin``), each carrying one event object (``Reply``,
  ``Failure``, ``Tick``, ``Notified``); for each (trigger, state) the transitions are
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

The callbacks here only decide and delegate: they move a run through its public engine
methods (``prepare``, ``record_pending``, ``enter``, ...), never through its fields.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from transitions import Machine

from ..durations import format_duration
from ..expressions import Expression
from .model import RetrySpec, StateSpec, WorkflowSpec
from .prepare import (
    T_ABORT,
    T_BEGIN,
    T_DECIDE,
    T_EXPIRE,
    T_FAIL,
    T_NOTIFIED,
    T_OK,
    T_TIMER,
    TOKEN_TRIGGERS,
    preparers_for,
)
from .run import NEW_STATE, Effects, WorkflowRun

__all__ = ["CompiledWorkflow", "GraphEdge"]

#: A ``transitions.EventData`` whose ``.model`` is a :class:`WorkflowRun` (typed loosely: the
#: stubs say ``object``, and callbacks run on every event, so no cast per call).
_Ev = Any

#: ``(source, dest, label)`` of one drawn transition.
GraphEdge = tuple[str, str, str]


# --- conditions and callbacks (shared by all runs) ------------------------------------------


def _prepare_event(ev: _Ev) -> None:
    ev.model.prepare(ev.event.name, ev.args[0] if ev.args else None)


def _is_stale(ev: _Ev) -> bool:
    return not ev.model.fresh


class _Record:
    """``before`` callback: complete the pending journal entry and record it."""

    __slots__ = ("choice", "next")

    def __init__(self, next_state: str | None, choice: str | None = None) -> None:
        self.next = next_state
        self.choice = choice

    def __call__(self, ev: _Ev) -> None:
        ev.model.record_pending(self.next, choice=self.choice)


class _Condition:
    """A choice's ``if`` over the run's context."""

    __slots__ = ("expr",)

    def __init__(self, expr: Expression) -> None:
        self.expr = expr

    def __call__(self, ev: _Ev) -> bool:
        return bool(self.expr.evaluate(ev.model.context))


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


class _AwaitCondition(_Condition):
    """An await state's ``if`` over the context plus the notification's ``params``."""

    __slots__ = ()

    def __call__(self, ev: _Ev) -> bool:
        return bool(self.expr.evaluate(_WithParams(ev.model.context, ev.args[0].params)))


class _SaveParams:
    """``before`` of a matched await with ``save``: store the notification's params."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, ev: _Ev) -> None:
        ev.model.save(self.name, ev.args[0].params)


class _CodeIs:
    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code

    def __call__(self, ev: _Ev) -> bool:
        error = ev.model.error
        return error is not None and error.code == self.code


class _KindIs:
    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, ev: _Ev) -> bool:
        error = ev.model.error
        return error is not None and error.kind == self.kind


class _Retry:
    """A command state's retry: the condition, the journal fields and the delay timer."""

    __slots__ = ("spec",)

    def __init__(self, spec: RetrySpec) -> None:
        self.spec = spec

    def can_retry(self, ev: _Ev) -> bool:
        run: WorkflowRun = ev.model
        error = run.error
        return (
            error is not None
            and run.attempt < self.spec.attempts
            and self.spec.applies(error.kind, error.code)
        )

    def record(self, ev: _Ev) -> None:
        run: WorkflowRun = ev.model
        run.record_pending(retry_in=run.retry_delay())

    def schedule(self, ev: _Ev) -> None:
        run: WorkflowRun = ev.model
        run.schedule_retry(run.retry_delay())


def _start_deadline(ev: _Ev) -> None:
    """``before`` of the start: the workflow ``timeout`` runs from here."""
    ev.model.start_deadline()


def _resend(ev: _Ev) -> None:
    ev.model.resend()


def _record_unhandled(ev: _Ev) -> None:
    ev.model.record_pending(unhandled=True)


def _abandon(ev: _Ev) -> None:
    """``before`` of an error route out of a command state: the command may still run (a
    client-side timeout), so it is abandoned (cancelled) before the next state acts."""
    ev.model.abandon_open()


def _unhandled(ev: _Ev) -> None:
    run: WorkflowRun = ev.model
    error = run.error
    assert error is not None
    code = f" ({error.code})" if error.code is not None else ""
    run.fail(f"unhandled error in state {run.state!r}: {error.kind}{code}: {error.message}")


def _no_choice(ev: _Ev) -> None:
    run: WorkflowRun = ev.model
    run.fail(f"no choice of state {run.state!r} matched and it has no default")


class _BeginEnding:
    """``before`` of the move into ``on_abort``: remember how the run will end."""

    __slots__ = ("outcome", "reason")

    def __init__(self, outcome: str, reason: str | None) -> None:
        self.outcome = outcome
        self.reason = reason

    def __call__(self, ev: _Ev) -> None:
        ev.model.begin_ending(self.outcome, self.reason)


def _not_ending(ev: _Ev) -> bool:
    return ev.model.ending is None


def _abort_now(ev: _Ev) -> None:
    ev.model.abort_now()


def _expire_now(ev: _Ev) -> None:
    ev.model.expire_now()


def _on_exception(ev: _Ev) -> None:
    """Anything raised inside the machine fails that run only (and never the others)."""
    ev.model.crash(ev.error)


class _Enter:
    """``on_enter`` of one workflow state: the state's action."""

    __slots__ = ("preparers", "st")

    def __init__(self, st: StateSpec) -> None:
        self.st = st
        self.preparers = preparers_for(st)

    def __call__(self, ev: _Ev) -> None:
        ev.model.enter(self.st, self.preparers)


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
            states.append({"name": name, "on_enter": [_Enter(st)], "final": st.kind == "final"})
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
        #: trigger name -> its ``trigger(model, event)`` (what a run fires)
        self.triggers: dict[str, Callable[..., object]] = {
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

    def release(self, run: WorkflowRun) -> None:
        """Drop a finished run from the shared machine (called by the run)."""
        self.machine.remove_model(run)

    # introspection

    def graph_edges(self) -> list[GraphEdge]:
        """``(source, dest, label)`` of every transition, for ``statemachines.graph``."""
        edges: list[GraphEdge] = []
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
            "abort": self.spec.on_abort,
        }

    def awaited(self) -> set[tuple[str, str]]:
        """``(server, method)`` of every notification an await state waits for."""
        return {
            (st.server, st.awaits)
            for st in self.spec.states.values()
            if st.kind == "await" and st.server is not None and st.awaits is not None
        }

    # building

    def _transitions(self, st: StateSpec) -> list[dict[str, Any]]:
        name = st.name
        out: list[dict[str, Any]] = [
            {"trigger": t, "source": name, "dest": None, "conditions": [_is_stale]}
            for t in TOKEN_TRIGGERS
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
            self._routes(st, T_FAIL, add, leave=[_abandon])
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
            (T_EXPIRE, None, _expire_now),  # None: the run's timeout reason
        ):
            outcome = "aborted" if trigger == T_ABORT else "failure"
            if on_abort is not None:
                add(
                    trigger,
                    on_abort,
                    conditions=[_not_ending],
                    before=[_BeginEnding(outcome, reason), _Record(on_abort)],
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
                before=[_Record(choice.next, choice.label)],
            )
        if st.choices[-1].condition is not None:
            add(trigger, None, before=[_Record(None)], after=[_no_choice])

    @staticmethod
    def _routes(
        st: StateSpec, trigger: str, add: Callable[..., None], leave: list[Any] | None = None
    ) -> None:
        """The error routes of ``st``; ``leave``: ``before`` callbacks of every one of them
        (after the journal entry is recorded)."""
        routes = st.on_error
        extra = leave or []
        for code, target in routes.by_code.items():
            add(trigger, target, conditions=[_CodeIs(code)], before=[_Record(target), *extra])
        for kind, target in routes.by_kind.items():
            add(trigger, target, conditions=[_KindIs(kind)], before=[_Record(target), *extra])
        if routes.default is not None:
            add(trigger, routes.default, before=[_Record(routes.default), *extra])
        else:
            add(trigger, None, before=[_record_unhandled, *extra], after=[_unhandled])
