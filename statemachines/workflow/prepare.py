"""How a run takes each event, one *preparer* per (state kind, trigger): fresh or stale,
the context update, and the journal entry that the machine's transition records
(:meth:`WorkflowRun.prepare <.run.WorkflowRun.prepare>`).

:class:`Preparing` is a base class of :class:`~.run.WorkflowRun` (its preparers work on the
run's fields, declared here); :func:`preparers_for` gives a state's table of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..durations import format_duration
from ..errorkinds import TIMEOUT
from .events import Ending, ErrorInfo, Failure, JournalEntry, Json, Notified, Reply, Tick, now
from .model import StateSpec, WorkflowSpec
from .sent import SentCommands

__all__ = [
    "NEW_PREPARERS",
    "TOKEN_TRIGGERS",
    "Preparer",
    "Preparing",
    "preparers_for",
]

T_BEGIN = "ev_begin"
T_OK = "ev_ok"
T_FAIL = "ev_fail"
T_TIMER = "ev_timer"
T_NOTIFIED = "ev_notified"
T_DECIDE = "ev_decide"
T_ABORT = "ev_abort"
T_EXPIRE = "ev_expire"
#: The triggers whose event carries an action token (and may be stale).
TOKEN_TRIGGERS = (T_OK, T_FAIL, T_TIMER, T_NOTIFIED, T_DECIDE)


class Preparing:
    """The preparers of :class:`~.run.WorkflowRun` (one per state kind and trigger)."""

    # the run's fields the preparers read or set (WorkflowRun.__init__ sets them)
    spec: WorkflowSpec
    run_id: str
    state: str
    context: dict[str, Any]
    ignored: int
    _token: int
    _attempt: int
    _params: Json
    _fresh: bool
    _entry: JournalEntry | None
    _error: ErrorInfo | None
    _st: StateSpec | None
    _sent: SentCommands
    _abort_reason: str | None
    _timeout: float | None
    _ending: Ending | None

    @property
    def command_key(self) -> str:
        raise NotImplementedError  # WorkflowRun's

    def abandon_open(self) -> None:
        raise NotImplementedError  # WorkflowRun's

    def _stale(self) -> None:
        self._fresh = False
        self.ignored += 1

    def _take(self, token: int) -> bool:
        """Is ``token`` the action the run waits for? Marks the event fresh or stale."""
        if token != self._token:
            self._stale()
            return False
        self._fresh = True
        return True

    def _command_entry(self, st: StateSpec, event: str, replayed: bool) -> JournalEntry:
        """The head of a ``reply`` or ``error`` entry of the current command."""
        entry: JournalEntry = {
            "time": now(),
            "state": st.name,
            "event": event,
            "server": st.server,
            "command": st.command,
            "params": self._params,
            "key": self.command_key,
            "attempt": self._attempt,
        }
        if replayed:
            entry["replayed"] = True
        return entry

    def _prep_begin(self, event: None) -> None:
        self._fresh = True
        spec = self.spec
        entry: JournalEntry = {
            "time": now(),
            "state": spec.initial,
            "event": "start",
            "workflow": spec.name,
            "run": self.run_id,
        }
        if spec.inputs:
            entry["inputs"] = {name: self.context[name] for name in spec.inputs}
        self._entry = entry

    def _prep_reply(self, event: Reply) -> None:
        if not self._take(event.token):
            return
        st = self._st
        assert st is not None
        self._sent.answered(event.token)
        result = event.result
        context = self.context
        context["result"] = result
        if st.save is not None:
            context[st.save] = result
        entry = self._entry = self._command_entry(st, "reply", event.replayed)
        entry["result"] = result

    def _prep_error(self, event: Failure) -> None:
        if not self._take(event.token):
            return
        st = self._st
        assert st is not None
        self._error = event.error
        entry = self._entry = self._command_entry(st, "error", event.replayed)
        entry["error"] = event.error.as_dict()

    def _prep_retry_timer(self, event: Tick) -> None:
        if not self._take(event.token):
            return
        self._entry = {
            "time": now(),
            "state": self.state,
            "event": "retry",
            "attempt": self._attempt + 1,
        }

    def _prep_wait_timer(self, event: Tick) -> None:
        if not self._take(event.token):
            return
        self._entry = {"time": now(), "state": self.state, "event": "waited"}

    def _prep_await_timer(self, event: Tick) -> None:
        if not self._take(event.token):
            return
        st = self._st
        assert st is not None and st.timeout is not None
        error = self._error = ErrorInfo(
            "timeout",
            TIMEOUT,
            f"no {st.awaits} notification within {format_duration(st.timeout)}",
        )
        self._entry = {
            "time": now(),
            "state": st.name,
            "event": "await_timeout",
            "server": st.server,
            "method": st.awaits,
            "error": error.as_dict(),
        }

    def _prep_notification(self, event: Notified) -> None:
        if not self._take(event.token):
            return
        self._entry = {
            "time": now(),
            "state": self.state,
            "event": "notification",
            "server": event.server,
            "method": event.method,
            "params": event.params,
        }

    def _prep_decide(self, event: Tick) -> None:
        if not self._take(event.token):
            return
        self._entry = {"time": now(), "state": self.state, "event": "choice"}

    def _prep_abort(self, event: None) -> None:
        self._fresh = True
        self.abandon_open()
        self._entry = {"time": now(), "state": self.state, "event": "abort"}
        if self._abort_reason is not None and self._ending is None:
            self._entry["reason"] = self._abort_reason

    def _prep_expire(self, event: None) -> None:
        self._fresh = True
        self.abandon_open()
        self._entry = {
            "time": now(),
            "state": self.state,
            "event": "workflow_timeout",
            "timeout": self._timeout,
        }


#: Classifies one event for a run in one state (see :meth:`WorkflowRun.prepare`).
Preparer = Callable[[Preparing, Any], None]

NEW_PREPARERS: Mapping[str, Preparer] = {
    T_BEGIN: Preparing._prep_begin,
    T_ABORT: Preparing._prep_abort,
    T_EXPIRE: Preparing._prep_expire,
}


def preparers_for(st: StateSpec) -> dict[str, Preparer]:
    """The events a run in state ``st`` reacts to, each with its preparer."""
    prep: dict[str, Preparer] = {
        T_ABORT: Preparing._prep_abort,
        T_EXPIRE: Preparing._prep_expire,
    }
    if st.kind == "command":
        prep.update({T_OK: Preparing._prep_reply, T_FAIL: Preparing._prep_error})
        if st.retry is not None:
            prep[T_TIMER] = Preparing._prep_retry_timer
    elif st.kind == "wait":
        prep[T_TIMER] = Preparing._prep_wait_timer
    elif st.kind == "await":
        prep.update(
            {T_TIMER: Preparing._prep_await_timer, T_NOTIFIED: Preparing._prep_notification}
        )
    elif st.kind == "choice":
        prep[T_DECIDE] = Preparing._prep_decide
    return prep
