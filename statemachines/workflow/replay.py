"""Resume a run by deterministic replay of its journal (pure: no I/O, no clock but ``now``).

:func:`replay` builds a :class:`~.run.WorkflowRun` with the journal's run id and inputs on
:class:`ReplayEffects` (which perform nothing) and feeds it the recorded events in order
(``reply``, ``error``, ``late``, ``retry``, ``waited``, ``await_timeout``, ``notification``,
``abort``, ``workflow_timeout``), each with the token the replayed run issued for it. Every
entry the run records is checked against the journal's next one (``event``, ``state``,
``next``, and ``key``/``attempt`` where both have them): a difference is a
:class:`ReplayMismatch` (the workflow text changed, or an expression no longer gives what it
gave). Entries the run records past the journal's end (those the crash lost: a ``choice``, the
``finished`` entry) are returned as :attr:`ResumePlan.extra`, to be journaled now.

The :class:`ResumePlan` says what to do to go live: the command to send again (with the same
key: the device returns its stored outcome or joins the running execution), the timers to arm
at their original due times (entry ``at`` + delay; the workflow ``timeout`` from the start),
the notification an ``await`` waits for. The runner hands the run to its own effects
(``run.effects = ...``) and acts on the plan.
"""

from __future__ import annotations

import time
from calendar import timegm
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .events import ErrorInfo, JournalEntry, Json
from .machine import CompiledWorkflow
from .run import NEW_STATE, WorkflowRun

__all__ = [
    "MIN_SEND_TIMEOUT",
    "RUNNER_EVENTS",
    "PendingSend",
    "PendingTimer",
    "ReplayEffects",
    "ReplayMismatch",
    "ResumePlan",
    "entry_time",
    "replay",
]

#: Entries the runner writes (not the run): skipped when matching the run's entries.
RUNNER_EVENTS = frozenset({"send", "resumed"})
#: A command sent again gets what remains of its timeout, but at least this (seconds).
MIN_SEND_TIMEOUT = 1.0

_Entry = Mapping[str, Any]


class ReplayMismatch(ValueError):
    """The replayed run does not do what the journal recorded."""


def entry_time(entry: _Entry) -> float:
    """When an entry was written (epoch seconds): its ``at``, else its ISO ``time``."""
    at = entry.get("at")
    if isinstance(at, (int, float)):
        return float(at)
    text = str(entry.get("time", ""))
    try:
        head, _, frac = text.rstrip("Z").partition(".")
        seconds = timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S"))
        return seconds + (int(frac) / 10 ** len(frac) if frac.isdigit() else 0.0)
    except ValueError:
        raise ReplayMismatch(f"journal entry {entry.get('event')!r} has no valid time") from None


@dataclass(frozen=True, slots=True)
class PendingSend:
    """The command to send (again): ``sent`` when a ``send`` entry records that it went out
    (it may have reached the device: same key); ``timeout`` is what remains of it."""

    token: int
    server: str
    command: str
    params: Json
    key: str
    attempt: int
    timeout: float
    sent: bool


@dataclass(frozen=True, slots=True)
class PendingTimer:
    """A timer to arm: ``kind`` ``wait``, ``retry``, ``await`` or ``timeout`` (the workflow
    timeout); it fires at ``due`` (epoch seconds), at once if that has passed."""

    token: int
    kind: str
    delay: float
    due: float

    def remaining(self, now: float) -> float:
        return max(0.0, self.due - now)


@dataclass
class ResumePlan:
    """What :func:`replay` rebuilt and what remains to be done live."""

    run: WorkflowRun
    send: PendingSend | None = None
    timers: list[PendingTimer] = field(default_factory=list)
    awaiting: tuple[str, str] | None = None  #: (server, method) an await state waits for
    extra: list[JournalEntry] = field(default_factory=list)  #: to journal now, in order
    replayed: int = 0  #: journal entries replayed

    def pending(self, now: float) -> dict[str, Any]:
        """The ``pending`` field of the ``resumed`` entry: ``{"send": key}``,
        ``{"wait" | "retry" | "await" | "timeout": remaining seconds}``."""
        out: dict[str, Any] = {}
        if self.send is not None:
            out["send"] = self.send.key
        for timer in self.timers:
            out[timer.kind] = round(timer.remaining(now), 3)
        return out


@dataclass(frozen=True, slots=True)
class _Sent:
    """A command the replayed run sent (nothing went out)."""

    token: int
    server: str
    command: str
    params: Json
    key: str
    attempt: int
    timeout: float


class ReplayEffects:
    """Effects that perform nothing: they remember the run's newest action and check every
    entry the run records against the journal (see the module docstring)."""

    def __init__(self, entries: Sequence[_Entry], started: float) -> None:
        #: (line number, entry) of the run's own entries, in order
        self.expected = [
            (line, entry)
            for line, entry in enumerate(entries, 1)
            if entry.get("event") not in RUNNER_EVENTS
        ]
        self.cursor = 0  #: entries of ``expected`` matched so far
        self.extra: list[JournalEntry] = []
        self.last_at = started  #: ``at`` of the newest matched entry: timers start then
        self.action: _Sent | PendingTimer | None = None  #: the run's newest send or timer
        self.deadline: PendingTimer | None = None  #: the workflow timeout's timer
        self.commands: dict[tuple[str, int], int] = {}  #: (key, attempt) -> token
        self.finished_run = False
        self.mismatch: ReplayMismatch | None = None  #: the first entry that did not match

    # Effects

    def send_command(
        self, run: WorkflowRun, token: int, server: str, method: str, params: Json, timeout: float
    ) -> None:
        key, attempt = run.command_key, run.attempt
        self.commands[key, attempt] = token
        self.action = _Sent(token, server, method, params, key, attempt, timeout)

    def start_timer(self, run: WorkflowRun, token: int, delay: float) -> None:
        due = self.last_at + delay
        if not run.expects(token):  # not the current action: the workflow timeout
            self.deadline = PendingTimer(token, "timeout", delay, due)
            return
        kind = run.spec.states[run.state].kind
        self.action = PendingTimer(token, "retry" if kind == "command" else kind, delay, due)

    def abandon(self, run: WorkflowRun, token: int) -> None:
        """Nothing to cancel: a replayed command is not in flight."""

    def record(self, run: WorkflowRun, entry: JournalEntry) -> None:
        """Check ``entry`` against the journal's next one (never raises, as ``record`` must
        not: the first difference is kept in :attr:`mismatch`)."""
        if self.mismatch is not None:
            return
        if self.cursor >= len(self.expected):
            self.extra.append(entry)
            return
        line, recorded = self.expected[self.cursor]
        problem = _difference(recorded, entry)
        if problem:
            self.mismatch = ReplayMismatch(
                f"journal line {line}: the journal has {_describe(recorded)}, the workflow "
                f"replays {_describe(entry)} ({problem}); was the workflow's text changed?"
            )
            return
        self.cursor += 1
        try:
            self.last_at = entry_time(recorded)
        except ReplayMismatch as exc:
            self.mismatch = ReplayMismatch(f"journal line {line}: {exc}")

    def finished(self, run: WorkflowRun) -> None:
        self.finished_run = True

    # replay helpers

    def current(self, run: WorkflowRun, what: str) -> int:
        """The token of the run's current action, which must be a ``what`` (send/timer)."""
        action = self.action
        wanted = _Sent if what == "send" else PendingTimer
        if not isinstance(action, wanted) or not run.expects(action.token):
            raise ReplayMismatch(f"the run waits for no {what} in state {run.state!r}")
        return action.token


_COMPARED = ("event", "state", "next", "key", "attempt")


def _difference(recorded: _Entry, replayed: _Entry) -> str:
    for name in _COMPARED:
        if name in ("key", "attempt") and (name not in recorded or name not in replayed):
            continue
        if recorded.get(name) != replayed.get(name):
            return f"{name} {recorded.get(name)!r} != {replayed.get(name)!r}"
    return ""


def _describe(entry: _Entry) -> str:
    text = f"{entry.get('event')!r} in state {entry.get('state')!r}"
    if entry.get("next") is not None:
        text += f" -> {entry.get('next')!r}"
    return text


def _error(entry: _Entry) -> ErrorInfo:
    error = entry.get("error")
    if not isinstance(error, Mapping):
        raise ReplayMismatch(f"journal entry {entry.get('event')!r} has no error object")
    return ErrorInfo.of(
        error.get("kind"), error.get("code"), str(error.get("message", "")), error.get("data")
    )


def _feed(run: WorkflowRun, fx: ReplayEffects, entry: _Entry) -> None:
    """Give the run the event ``entry`` records."""
    event = entry.get("event")
    replayed = bool(entry.get("replayed"))
    if event == "reply":
        run.on_reply(fx.current(run, "send"), entry.get("result"), replayed)
    elif event == "error":
        e = _error(entry)
        run.on_error(fx.current(run, "send"), e.kind, e.code, e.message, e.data, replayed)
    elif event in ("retry", "waited", "await_timeout"):
        run.on_timer(fx.current(run, "timer"))
    elif event == "notification":
        run.on_notification(str(entry.get("server")), str(entry.get("method")), entry.get("params"))
    elif event == "abort":
        reason = entry.get("reason")
        run.abort(reason if isinstance(reason, str) else None)
    elif event == "workflow_timeout":
        if fx.deadline is None:
            raise ReplayMismatch("the workflow has no timeout")
        run.on_timer(fx.deadline.token)
    elif event == "late":
        token = fx.commands.get((str(entry.get("key")), int(entry.get("attempt") or 0)))
        if token is None:
            raise ReplayMismatch(
                f"a late outcome of a command the run never sent ({entry.get('key')})"
            )
        has_error = "error" in entry
        run.on_late(token, entry.get("result"), _error(entry) if has_error else None, replayed)
    # anything else (start, choice, finished, expression_error, ...) the run records by
    # itself: if it did not, the check below reports it


def replay(
    compiled: CompiledWorkflow,
    entries: Sequence[_Entry],
    *,
    run: WorkflowRun | None = None,
    now: float | None = None,
) -> ResumePlan:
    """Rebuild the run of a journal (``entries``, as read) on ``compiled`` (a
    :class:`~.machine.CompiledWorkflow` of the journal's workflow) and say what remains.

    ``run``: a new run of ``compiled`` (not started; the journal's run id and inputs) to
    replay into, e.g. one a runner made with its own effects; it gets them (and its
    ``on_await_change``) back afterwards, with nothing sent or armed: act on the plan. Without
    it, a new run is made on :class:`ReplayEffects`. ``now``: the time the remaining command
    timeout counts from (default: the clock).

    Raises :class:`ReplayMismatch` (a ValueError) when the journal does not replay: no
    ``start`` entry first, or the run does something else than what was recorded.
    """
    now = time.time() if now is None else now
    if not entries or entries[0].get("event") != "start":
        raise ReplayMismatch("the journal does not begin with a start entry")
    start = entries[0]
    started = start.get("started")
    if not isinstance(started, (int, float)):
        started = entry_time(start)
    fx = ReplayEffects(entries, float(started))
    run_id = str(start.get("run"))
    if run is None:
        run = compiled.new_run(fx, run_id, start.get("inputs") or None)
        _replay_into(run, fx)
    else:
        if run.run_id != run_id or run.state != NEW_STATE:
            raise ValueError(f"replay into a new run {run_id!r}, not {run!r}")
        effects, on_await_change = run.effects, run.on_await_change
        run.effects, run.on_await_change = fx, None
        try:
            _replay_into(run, fx)
        finally:
            run.effects, run.on_await_change = effects, on_await_change
    return _plan(run, fx, entries, now)


def _replay_into(run: WorkflowRun, fx: ReplayEffects) -> None:
    run.start()
    expected = fx.expected
    while fx.cursor < len(expected) and not run.done and fx.mismatch is None:
        before = fx.cursor
        line, entry = expected[before]
        try:
            _feed(run, fx, entry)
        except ReplayMismatch as exc:
            raise ReplayMismatch(
                f"journal line {line}: the journal has {_describe(entry)}, but {exc}; "
                "was the workflow's text changed?"
            ) from None
        if fx.cursor == before and fx.mismatch is None:
            raise ReplayMismatch(
                f"journal line {line}: the journal has {_describe(entry)}, which the workflow "
                f"does not replay in state {run.state!r}; was the workflow's text changed?"
            )
    if fx.mismatch is not None:
        raise fx.mismatch
    if fx.cursor < len(expected):
        line, entry = expected[fx.cursor]
        raise ReplayMismatch(f"journal line {line}: {_describe(entry)} after the run finished")


def _plan(run: WorkflowRun, fx: ReplayEffects, entries: Sequence[_Entry], now: float) -> ResumePlan:
    plan = ResumePlan(run, extra=fx.extra, replayed=len(entries))
    if run.done:
        return plan
    action = fx.action
    if isinstance(action, _Sent) and run.expects(action.token):
        plan.send = _pending_send(action, entries, now)
    elif isinstance(action, PendingTimer) and run.expects(action.token):
        plan.timers.append(action)
    if fx.deadline is not None:
        plan.timers.append(fx.deadline)
    st = run.spec.states.get(run.state)
    if st is not None and st.kind == "await" and st.server and st.awaits:
        plan.awaiting = (st.server, st.awaits)
    return plan


def _pending_send(sent: _Sent, entries: Sequence[_Entry], now: float) -> PendingSend:
    """The command to send: again with what remains of its timeout if a ``send`` entry
    says it went out, else for the first time."""
    recorded = next(
        (
            e
            for e in reversed(entries)
            if e.get("event") == "send"
            and e.get("key") == sent.key
            and e.get("attempt") == sent.attempt
        ),
        None,
    )
    head = (sent.token, sent.server, sent.command, sent.params, sent.key, sent.attempt)
    if recorded is None:  # the crash came before it went out
        return PendingSend(*head, sent.timeout, False)
    deadline = recorded.get("deadline")
    if not isinstance(deadline, (int, float)):
        deadline = entry_time(recorded) + sent.timeout
    remaining = round(max(MIN_SEND_TIMEOUT, min(sent.timeout, deadline - now)), 3)
    return PendingSend(*head, remaining, True)
