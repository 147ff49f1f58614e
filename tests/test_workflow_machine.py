"""The workflow engine (statemachines.workflow: run, machine), driven by a recording Effects."""

from __future__ import annotations

import re
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from transitions import Machine

from statemachines.errorkinds import DEVICE_FAULT, NOT_ALLOWED, TIMEOUT
from statemachines.workflow import (
    NEW_STATE,
    CompiledWorkflow,
    JournalEntry,
    WorkflowRun,
    load_workflow,
)

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@dataclass
class Sent:
    run: WorkflowRun
    token: int
    server: str
    method: str
    params: Any
    timeout: float


@dataclass
class Timer:
    run: WorkflowRun
    token: int
    delay: float


class Recorder:
    """Effects that remember every call, in order."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.timers: list[Timer] = []
        self.entries: list[JournalEntry] = []
        self.done: list[WorkflowRun] = []
        self.abandoned: list[int] = []

    def send_command(
        self, run: WorkflowRun, token: int, server: str, method: str, params: Any, timeout: float
    ) -> None:
        self.sent.append(Sent(run, token, server, method, params, timeout))

    def start_timer(self, run: WorkflowRun, token: int, delay: float) -> None:
        self.timers.append(Timer(run, token, delay))

    def abandon(self, run: WorkflowRun, token: int) -> None:
        self.abandoned.append(token)

    def record(self, run: WorkflowRun, entry: JournalEntry) -> None:
        assert run not in self.done, "recorded after finished"
        self.entries.append(entry)

    def finished(self, run: WorkflowRun) -> None:
        assert run not in self.done, "finished twice"
        self.done.append(run)

    # conveniences for the tests

    def events(self) -> list[str]:
        return [e["event"] for e in self.entries]

    def methods(self) -> list[str]:
        return [s.method for s in self.sent]

    def reply(self, result: Any = None) -> None:
        last = self.sent[-1]
        last.run.on_reply(last.token, result)

    def fail(self, kind: str | None, code: int | None = None, message: str = "boom") -> None:
        last = self.sent[-1]
        last.run.on_error(last.token, kind, code, message, {"detail": 1})

    def fire(self) -> None:
        last = self.timers[-1]
        last.run.on_timer(last.token)


HEAD = """
name: t
servers: {device: "127.0.0.1:15769"}
command_timeout: 2s
"""


def compiled(tmp_path: Path, text: str) -> CompiledWorkflow:
    path = tmp_path / "wf.yaml"
    path.write_text(HEAD + textwrap.dedent(text), encoding="utf-8")
    return CompiledWorkflow(load_workflow(path))


def start(tmp_path: Path, text: str, **context: Any) -> tuple[WorkflowRun, Recorder]:
    effects = Recorder()
    run = compiled(tmp_path, text).new_run(effects, "r1", context or None)
    run.start()
    return run, effects


LINEAR = """
initial: a
states:
  a: {command: demo.led_on, next: b}
  b: {command: demo.calibrate, params: {steps: 3}, timeout: 9s, save: cal, next: c}
  c:
    command: demo.blink
    params: {times: "{{ cal.steps * 2 }}", note: "s={{ cal.steps }}"}
    next: ok
  ok: {final: success}
"""


# --- the happy path and the journal --------------------------------------------------------


def test_success_path_sends_commands_and_saves_results(tmp_path: Path) -> None:
    run, fx = start(tmp_path, LINEAR)
    assert run.state == "a" and run.outcome is None and not run.done
    assert (fx.sent[0].server, fx.sent[0].method, fx.sent[0].params, fx.sent[0].timeout) == (
        "device",
        "demo.led_on",
        None,
        2.0,
    )
    fx.reply(None)
    assert fx.sent[-1].params == {"steps": 3} and fx.sent[-1].timeout == 9.0
    fx.reply({"steps": 3, "offset": 0.1})
    assert fx.sent[-1].params == {"times": 6, "note": "s=3"}
    fx.reply("blinked")
    assert run.state == "ok" and run.done and run.outcome == "success" and run.reason is None
    assert run.context == {"result": "blinked", "cal": {"steps": 3, "offset": 0.1}}
    assert fx.done == [run]
    assert len({s.token for s in fx.sent}) == 3


def test_journal_entries(tmp_path: Path) -> None:
    run, fx = start(tmp_path, LINEAR)
    for result in (None, {"steps": 3}, "x"):
        fx.reply(result)
    assert fx.events() == ["start", "reply", "reply", "reply", "finished"]
    assert run.history == fx.entries
    for entry in fx.entries:
        assert TIME.match(entry["time"]) and entry["state"] and entry["event"]
    assert fx.entries[0] == {
        "time": fx.entries[0]["time"],
        "state": "a",
        "event": "start",
        "workflow": "t",
        "run": "r1",
        "next": "a",
    }
    reply = fx.entries[2]
    assert {k: v for k, v in reply.items() if k != "time"} == {
        "state": "b",
        "event": "reply",
        "server": "device",
        "command": "demo.calibrate",
        "params": {"steps": 3},
        "key": "r1:2",  # the run's second state visit
        "attempt": 1,
        "result": {"steps": 3},
        "next": "c",
    }
    assert {k: v for k, v in fx.entries[-1].items() if k != "time"} == {
        "state": "ok",
        "event": "finished",
        "final": "success",
        "reason": None,
    }


def test_the_run_is_a_model_only_while_it_runs(tmp_path: Path) -> None:
    wf = compiled(tmp_path, "inputs: {preset: 0, other: x}\n" + LINEAR)
    fx = Recorder()
    run = wf.new_run(fx, "r1", {"preset": 1})
    assert run in wf.machine.models and run.state == NEW_STATE
    assert run.context == {"result": None, "preset": 1, "other": "x"}
    with pytest.raises(ValueError, match="has no input 'nope' \\(inputs: preset, other\\)"):
        wf.new_run(fx, "r2", {"nope": 1})
    run.start()
    run.start()  # a second start does nothing
    assert len(fx.sent) == 1
    for _ in range(3):
        fx.reply()
    assert run not in wf.machine.models


# --- choices -------------------------------------------------------------------------------

CHOICES = """
initial: read
states:
  read:
    command: demo.read_sensor
    save: reading
    choices:
      - if: reading.distance < 10
        next: near
      - if: result["distance"] < 100
        next: mid
      - next: far
  near: {final: success}
  mid:
    choices:
      - if: reading.distance > 50
        next: far
      - if: reading.distance > 20
        next: near
  far: {final: failure}
"""


@pytest.mark.parametrize(
    ("distance", "state", "outcome"),
    [
        (5, "near", "success"),
        (60, "far", "failure"),
        (30, "near", "success"),
        (500, "far", "failure"),
    ],
)
def test_choices_first_match_wins(
    tmp_path: Path, distance: float, state: str, outcome: str
) -> None:
    run, fx = start(tmp_path, CHOICES)
    fx.reply({"distance": distance})
    assert (run.state, run.outcome) == (state, outcome)
    if outcome == "failure":
        assert run.reason == "reached the failure state 'far'"


def test_choice_entries_name_the_matching_branch(tmp_path: Path) -> None:
    _, fx = start(tmp_path, CHOICES)
    fx.reply({"distance": 30})
    assert fx.events() == ["start", "reply", "choice", "finished"]
    assert fx.entries[1]["choice"] == 'result["distance"] < 100' and fx.entries[1]["next"] == "mid"
    assert fx.entries[2]["choice"] == "reading.distance > 20" and fx.entries[2]["state"] == "mid"


def test_no_matching_choice_without_default_fails(tmp_path: Path) -> None:
    run, fx = start(tmp_path, CHOICES)
    fx.reply({"distance": 15})
    assert run.state == "mid" and run.outcome == "failure"
    assert run.reason == "no choice of state 'mid' matched and it has no default"
    assert fx.events() == ["start", "reply", "choice", "finished"]
    assert "next" not in fx.entries[2]


# --- retry and error routing ---------------------------------------------------------------

RETRY = """
initial: a
states:
  a:
    command: demo.read_sensor
    retry: {attempts: 3, interval: 100ms, backoff: 3, max_delay: 250ms, on: [busy, timeout]}
    on_error: {busy: gave_up, "*": other}
    next: ok
  ok: {final: success}
  gave_up: {final: failure}
  other: {final: failure}
"""


def test_retry_then_success(tmp_path: Path) -> None:
    run, fx = start(tmp_path, RETRY)
    fx.fail("busy", -32003)
    assert run.state == "a" and len(fx.sent) == 1 and fx.timers[-1].delay == pytest.approx(0.1)
    fx.fire()
    assert len(fx.sent) == 2 and fx.sent[1].params == fx.sent[0].params
    fx.fail("timeout", TIMEOUT)
    assert fx.timers[-1].delay == pytest.approx(0.25)  # min(0.1 * 3, 0.25)
    fx.fire()
    fx.reply({"distance": 1.0})
    assert run.outcome == "success"
    assert fx.events() == ["start", "error", "retry", "error", "retry", "reply", "finished"]
    commands = [e for e in fx.entries if "command" in e]
    assert [(e["attempt"], "result" in e, "error" in e) for e in commands] == [
        (1, False, True),
        (2, False, True),
        (3, True, False),
    ]
    assert commands[0]["error"] == {
        "kind": "busy",
        "code": -32003,
        "message": "boom",
        "data": {"detail": 1},
    }
    assert commands[0]["retry_in"] == pytest.approx(0.1) and "next" not in commands[0]
    assert [e["attempt"] for e in fx.entries if e["event"] == "retry"] == [2, 3]


def test_retry_exhausted_then_on_error(tmp_path: Path) -> None:
    run, fx = start(tmp_path, RETRY)
    for _ in range(2):
        fx.fail("busy", -32003)
        fx.fire()
    fx.fail("busy", -32003)
    assert (run.state, run.outcome) == ("gave_up", "failure")
    assert len(fx.sent) == 3 and len(fx.timers) == 2
    last_error = [e for e in fx.entries if e["event"] == "error"][-1]
    assert last_error["attempt"] == 3 and last_error["next"] == "gave_up"
    assert "retry_in" not in last_error


def test_errors_not_in_retry_on_go_straight_to_on_error(tmp_path: Path) -> None:
    run, fx = start(tmp_path, RETRY)
    fx.fail("device_fault", DEVICE_FAULT)
    assert run.state == "other" and fx.timers == []


ROUTES = """
initial: a
states:
  a:
    command: demo.reset
    next: ok
    on_error:
      not_allowed: by_kind
      -32001: by_code
      "-32050": by_quoted_code
      "*": anything
  ok: {final: success}
  by_kind: {final: success}
  by_code: {final: success}
  by_quoted_code: {final: success}
  anything: {final: failure}
"""


@pytest.mark.parametrize(
    ("kind", "code", "state"),
    [
        ("not_allowed", NOT_ALLOWED, "by_code"),  # an integer code beats a kind
        ("not_allowed", None, "by_kind"),
        (None, NOT_ALLOWED, "by_code"),
        ("server_error", -32050, "by_quoted_code"),
        ("timeout", TIMEOUT, "anything"),
        ("connection_lost", None, "anything"),
    ],
)
def test_error_routing(tmp_path: Path, kind: str | None, code: int | None, state: str) -> None:
    run, fx = start(tmp_path, ROUTES)
    fx.fail(kind, code)
    assert run.state == state and run.done


def test_kind_is_derived_from_the_code_when_missing(tmp_path: Path) -> None:
    _, fx = start(tmp_path, ROUTES)
    fx.fail(None, NOT_ALLOWED)
    assert fx.entries[1]["error"]["kind"] == "not_allowed"


def test_unhandled_error_fails_the_run(tmp_path: Path) -> None:
    text = RETRY.replace('{busy: gave_up, "*": other}', "{busy: gave_up}")
    run, fx = start(tmp_path, text.replace("  other: {final: failure}\n", ""))
    fx.fail("device_fault", DEVICE_FAULT, "motor stalled")
    assert run.state == "a" and run.outcome == "failure"
    assert run.reason == "unhandled error in state 'a': device_fault (-32006): motor stalled"
    assert fx.entries[-2]["event"] == "error" and fx.entries[-2]["unhandled"] is True
    assert fx.entries[-1]["reason"] == run.reason


# --- stale tokens ----------------------------------------------------------------------------


def test_stale_tokens_are_ignored_and_not_journaled(tmp_path: Path) -> None:
    run, fx = start(tmp_path, LINEAR)
    first = fx.sent[0].token
    fx.reply(None)
    before = list(fx.entries)
    run.on_reply(first, "late")
    run.on_error(first, "timeout", TIMEOUT, "late")
    run.on_timer(first)
    run.on_reply(123456789, "unknown")
    assert run.state == "b" and fx.entries == before and run.ignored == 4
    assert run.context["result"] is None


def test_a_late_reply_after_a_timeout_retry_is_stale(tmp_path: Path) -> None:
    run, fx = start(tmp_path, RETRY)
    stale = fx.sent[-1].token
    fx.fail("timeout", TIMEOUT)
    run.on_reply(stale, {"distance": 1})  # the reply raced the client-side timeout
    assert run.state == "a" and not run.done
    fx.fire()
    fx.reply({"distance": 2})
    assert run.outcome == "success" and run.context["result"] == {"distance": 2}


def test_events_after_the_end_are_ignored(tmp_path: Path) -> None:
    run, fx = start(tmp_path, CHOICES)
    fx.reply({"distance": 1})
    n = len(fx.entries)
    run.on_reply(fx.sent[-1].token, {})
    run.abort()
    run.on_timer(1)
    run.on_notification("device", "device.state", {})
    assert len(fx.entries) == n and run.outcome == "success"


# --- wait and await ------------------------------------------------------------------------

AWAIT = """
initial: pause
states:
  pause: {wait: 1.5s, next: look}
  look:
    await: device.state
    if: params.state == "idle" and params.previous == "calibrating"
    timeout: 4s
    save: change
    next: ok
    on_error: {timeout: late}
  ok: {final: success}
  late: {final: failure}
"""


def test_wait_then_await_with_a_condition(tmp_path: Path) -> None:
    run, fx = start(tmp_path, AWAIT)
    assert fx.sent == [] and fx.timers[-1].delay == 1.5 and run.state == "pause"
    fx.fire()
    assert run.state == "look" and fx.timers[-1].delay == 4.0
    run.on_notification("device", "device.state", {"state": "fault", "previous": "idle"})
    run.on_notification("device", "demo.progress", {"state": "idle"})
    run.on_notification("other", "device.state", {"state": "idle", "previous": "calibrating"})
    assert run.state == "look"
    change = {"device": "demo", "state": "idle", "previous": "calibrating", "command": "x"}
    run.on_notification("device", "device.state", change)
    assert run.outcome == "success" and run.context["change"] == change
    assert fx.events() == ["start", "waited", "notification", "finished"]
    note = fx.entries[2]
    assert (note["state"], note["server"], note["method"], note["params"], note["next"]) == (
        "look",
        "device",
        "device.state",
        change,
        "ok",
    )


def test_await_timeout_is_routed_as_a_timeout_error(tmp_path: Path) -> None:
    run, fx = start(tmp_path, AWAIT)
    fx.fire()
    fx.fire()
    assert (run.state, run.outcome) == ("late", "failure")
    entry = fx.entries[2]
    assert entry["event"] == "await_timeout" and entry["next"] == "late"
    assert entry["error"]["kind"] == "timeout" and entry["error"]["code"] == TIMEOUT
    assert "no device.state notification within 4s" in entry["error"]["message"]


def test_await_timeout_without_route_fails(tmp_path: Path) -> None:
    run, fx = start(tmp_path, AWAIT.replace("on_error: {timeout: late}", "on_error: {busy: late}"))
    fx.fire()
    fx.fire()
    assert run.outcome == "failure" and "unhandled error in state 'look': timeout" in str(
        run.reason
    )


def test_a_stale_wait_timer_is_ignored(tmp_path: Path) -> None:
    run, fx = start(tmp_path, AWAIT)
    wait_token = fx.timers[-1].token
    fx.fire()
    run.on_timer(wait_token)
    assert run.state == "look" and run.ignored == 1


def test_awaited_and_graph_edges(tmp_path: Path) -> None:
    wf = compiled(tmp_path, AWAIT)
    assert wf.awaited() == {("device", "device.state")}
    assert wf.graph_edges() == [
        ("pause", "look", "after 1.5s"),
        (
            "look",
            "ok",
            'device.state if params.state == "idle" and params.previous == "calibrating"',
        ),
        ("look", "late", "error: timeout"),
    ]
    assert wf.graph_finals() == ("ok", "late")
    args = wf.graph_args()
    assert args["initial"] == "pause" and args["states"] == ["pause", "look", "ok", "late"]


# --- abort and the workflow timeout ----------------------------------------------------------

ABORT = """
timeout: 30s
on_abort: led_off
initial: work
states:
  work: {command: demo.calibrate, timeout: 20s, next: done}
  done: {final: success}
  led_off: {command: demo.led_off, next: stopped, on_error: stopped}
  stopped: {final: failure}
"""


def test_abort_goes_through_on_abort_then_ends_aborted(tmp_path: Path) -> None:
    run, fx = start(tmp_path, ABORT)
    deadline, in_flight = fx.timers[0], fx.sent[-1].token
    assert deadline.delay == 30.0
    run.abort()
    assert run.state == "led_off" and fx.methods() == ["demo.calibrate", "demo.led_off"]
    assert fx.abandoned == [in_flight]  # the calibration, not the on_abort command
    run.on_reply(in_flight, "calibrated too late")  # the state was left: a late entry
    assert run.state == "led_off" and run.ignored == 1
    late = fx.entries[-1]
    assert {k: v for k, v in late.items() if k != "time"} == {
        "state": "work",
        "event": "late",
        "server": "device",
        "command": "demo.calibrate",
        "key": "r1:1",
        "attempt": 1,
        "result": "calibrated too late",
    }
    run.on_reply(in_flight, "twice")  # at most one late entry per command
    assert run.ignored == 2
    fx.reply(None)
    assert (run.state, run.outcome, run.reason) == ("stopped", "aborted", "aborted")
    assert fx.events() == ["start", "abort", "late", "reply", "finished"]
    assert fx.entries[1]["next"] == "led_off" and fx.entries[1]["state"] == "work"
    assert fx.entries[-2]["key"] == "r1:2"  # on_abort's state is the run's second visit
    assert fx.entries[-1]["final"] == "aborted"
    run.on_timer(deadline.token)  # the deadline fires after the end: ignored
    assert len(fx.entries) == 5


def test_a_second_abort_in_the_on_abort_path_finishes_at_once(tmp_path: Path) -> None:
    run, fx = start(tmp_path, ABORT)
    run.abort()
    run.abort()
    assert run.state == "led_off" and run.outcome == "aborted" and run.done
    assert run.reason == "aborted; aborted again in the on_abort path"
    assert fx.events() == ["start", "abort", "abort", "finished"]


def test_abort_without_on_abort_finishes_at_once(tmp_path: Path) -> None:
    run, fx = start(tmp_path, LINEAR)
    run.abort()
    assert (run.state, run.outcome, run.reason) == ("a", "aborted", "aborted")
    assert fx.events() == ["start", "abort", "finished"] and len(fx.sent) == 1


def test_abort_before_start(tmp_path: Path) -> None:
    fx = Recorder()
    run = compiled(tmp_path, ABORT).new_run(fx, "r1")
    run.abort()
    assert run.outcome == "aborted" and fx.sent == [] and fx.events() == ["abort", "finished"]
    run.start()
    assert fx.sent == []


def test_workflow_timeout_goes_to_on_abort_and_fails(tmp_path: Path) -> None:
    run, fx = start(tmp_path, ABORT)
    in_flight = fx.sent[-1].token
    run.on_timer(fx.timers[0].token)
    assert run.state == "led_off"
    assert fx.abandoned == [in_flight]
    fx.reply(None)
    assert run.outcome == "failure" and run.reason == "workflow timeout (30s) expired"
    assert fx.events() == ["start", "workflow_timeout", "reply", "finished"]
    assert fx.entries[1]["timeout"] == 30.0


def test_workflow_timeout_without_on_abort_fails_at_once(tmp_path: Path) -> None:
    run, fx = start(tmp_path, "timeout: 500ms\n" + LINEAR)
    run.on_timer(fx.timers[0].token)
    assert run.state == "a" and run.outcome == "failure"
    assert run.reason == "workflow timeout (500ms) expired"


def test_timeout_during_the_abort_path_keeps_the_first_outcome(tmp_path: Path) -> None:
    run, fx = start(tmp_path, ABORT)
    run.abort()
    run.on_timer(fx.timers[0].token)
    assert run.outcome == "aborted"
    assert run.reason == "aborted; workflow timeout (30s) expired in the on_abort path"


def test_an_unhandled_error_in_the_abort_path_keeps_the_outcome(tmp_path: Path) -> None:
    run, fx = start(tmp_path, ABORT.replace(", on_error: stopped", ""))
    run.abort()
    fx.fail("timeout", TIMEOUT)
    assert run.outcome == "aborted"
    assert str(run.reason).startswith("aborted; then unhandled error in state 'led_off'")


# --- failures inside the machine ----------------------------------------------------------------


def test_an_expression_error_in_a_choice_fails_the_run(tmp_path: Path) -> None:
    run, fx = start(tmp_path, CHOICES)
    fx.reply({"no_distance": 1})
    assert run.outcome == "failure" and run.state == "read"
    assert fx.events() == ["start", "reply", "expression_error", "finished"]
    assert fx.entries[1]["result"] == {"no_distance": 1} and "next" not in fx.entries[1]
    err = fx.entries[2]
    assert err["expression"] == "reading.distance < 10" and "no key 'distance'" in err["message"]
    assert run.reason is not None and "expression failed in state 'read'" in run.reason


def test_an_expression_error_in_params_fails_the_run(tmp_path: Path) -> None:
    run, fx = start(tmp_path, LINEAR)
    fx.reply(None)
    fx.reply("not a mapping")  # saved as cal; cal.steps cannot be read
    assert run.outcome == "failure" and run.state == "c" and len(fx.sent) == 2
    assert fx.events() == ["start", "reply", "reply", "expression_error", "finished"]


def test_an_expression_error_in_an_await_condition_fails_the_run(tmp_path: Path) -> None:
    run, fx = start(tmp_path, AWAIT)
    fx.fire()
    run.on_notification("device", "device.state", None)
    assert run.outcome == "failure"
    assert fx.events() == ["start", "waited", "notification", "expression_error", "finished"]


class Exploding(Recorder):
    def send_command(self, run: WorkflowRun, *args: Any) -> None:
        if run.run_id == "bad":
            raise RuntimeError("socket gone")
        super().send_command(run, *args)


def test_an_effects_error_fails_only_that_run(tmp_path: Path) -> None:
    wf = compiled(tmp_path, LINEAR)
    fx = Exploding()
    good, bad = wf.new_run(fx, "good"), wf.new_run(fx, "bad")
    good.start()
    bad.start()
    assert bad.outcome == "failure" and bad.reason is not None
    assert "internal error in state 'a': RuntimeError: socket gone" in bad.reason
    assert [e["event"] for e in bad.history] == ["start", "internal_error", "finished"]
    for _ in range(3):
        fx.reply({"steps": 1})
    assert good.outcome == "success"


# --- re-entrancy and many runs ---------------------------------------------------------------


class Immediate(Recorder):
    """Answers every command and fires every timer synchronously, from inside the call."""

    def send_command(
        self, run: WorkflowRun, token: int, server: str, method: str, params: Any, timeout: float
    ) -> None:
        super().send_command(run, token, server, method, params, timeout)
        run.on_reply(token, {"steps": 2, "distance": 5})

    def start_timer(self, run: WorkflowRun, token: int, delay: float) -> None:
        super().start_timer(run, token, delay)
        if delay < 10:
            run.on_timer(token)


def test_synchronous_effects_are_queued_in_order(tmp_path: Path) -> None:
    fx = Immediate()
    run = compiled(tmp_path, LINEAR).new_run(fx, "r1")
    run.start()
    assert run.outcome == "success"
    assert fx.methods() == ["demo.led_on", "demo.calibrate", "demo.blink"]
    assert fx.events() == ["start", "reply", "reply", "reply", "finished"]
    assert fx.sent[-1].params == {"times": 4, "note": "s=2"}


def test_many_concurrent_runs_share_one_machine(tmp_path: Path) -> None:
    steps = "".join(
        f"  s{i}: {{command: demo.step, params: {{n: {i}, prev: '{{{{ result }}}}'}}, "
        f"next: s{i + 1}}}\n"
        for i in range(10)
    )
    wf = compiled(tmp_path, "initial: s0\nstates:\n" + steps + "  s10: {final: success}\n")
    fx = Recorder()
    runs = [wf.new_run(fx, f"r{i}") for i in range(1000)]
    assert len(wf.machine.models) == 1000
    pending: dict[WorkflowRun, Sent] = {}
    for run in runs:
        run.start()
        pending[run] = fx.sent[-1]
    for _ in range(10):
        for run in runs:  # interleave: every run moves one step per round
            sent = pending[run]
            run.on_reply(sent.token, f"{run.run_id}:{sent.params['n']}")
            if not run.done:
                pending[run] = fx.sent[-1]
    assert all(r.outcome == "success" for r in runs)
    assert wf.machine.models == []
    assert len(fx.done) == 1000 and len(fx.entries) == 1000 * 12
    assert len({s.token for s in fx.sent}) == len(fx.sent) == 10_000
    last = [s for s in fx.sent if s.run.run_id == "r7"][-1]
    assert last.params == {"n": 9, "prev": "r7:8"}  # each run reads only its own context


class Quiet:
    """No-op Effects that keep the last token, for timing the engine alone."""

    def send_command(
        self, run: WorkflowRun, token: int, server: str, method: str, params: Any, timeout: float
    ) -> None:
        run.context["_token"] = token

    def start_timer(self, run: WorkflowRun, token: int, delay: float) -> None:
        pass

    def abandon(self, run: WorkflowRun, token: int) -> None:
        pass

    def record(self, run: WorkflowRun, entry: JournalEntry) -> None:
        pass

    def finished(self, run: WorkflowRun) -> None:
        pass


def test_engine_cost_stays_close_to_a_bare_transitions_machine(tmp_path: Path) -> None:
    class Model:
        pass

    def noop(ev: Any) -> None:
        pass

    bare = Machine(
        model=None,
        states=[{"name": "A", "on_enter": [noop]}, {"name": "B", "on_enter": [noop]}],
        transitions=[
            {"trigger": "go", "source": "A", "dest": "B"},
            {"trigger": "go", "source": "B", "dest": "A"},
        ],
        initial="A",
        queued=True,
        auto_transitions=False,
        send_event=True,
    )
    models = [Model() for _ in range(200)]
    bare.add_model(models)
    steps = "".join(
        f"  s{i}: {{command: demo.x, params: {{n: {i}}}, next: s{i + 1}}}\n" for i in range(10)
    )
    wf = compiled(tmp_path, "initial: s0\nstates:\n" + steps + "  s10: {final: success}\n")
    fx = Quiet()

    def time_bare() -> float:
        t0 = time.perf_counter()
        for _ in range(11):
            for m in models:
                m.go()  # type: ignore[attr-defined]
        return time.perf_counter() - t0

    def time_engine() -> float:
        runs = [wf.new_run(fx, str(i)) for i in range(200)]  # not timed: once per run
        t0 = time.perf_counter()
        for run in runs:
            run.start()
        for _ in range(10):
            for run in runs:
                run.on_reply(run.context["_token"], None)
        elapsed = time.perf_counter() - t0
        assert all(run.outcome == "success" for run in runs)
        return elapsed

    ratio = min(time_engine() for _ in range(3)) / min(time_bare() for _ in range(3))
    assert ratio < 5, f"engine costs {ratio:.1f}x a bare transition (target: about 3x)"


# --- templated durations ----------------------------------------------------------------------

TEMPLATED = """
inputs: {pause: 1.5, limit: 40s}
timeout: "{{ limit }}"
initial: read
states:
  read:
    command: demo.read_sensor
    timeout: "{{ pause * 2 }}"
    save: reading
    retry: {attempts: 2, interval: "{{ int(pause * 1000) }}ms", on: [busy]}
    next: pause
  pause: {wait: "{{ pause }}", next: done}
  done: {final: success}
"""


def test_templated_durations_render_when_the_state_is_entered(tmp_path: Path) -> None:
    run, fx = start(tmp_path, TEMPLATED, pause=0.25, limit="9s")
    assert fx.timers[0].delay == 9.0  # the workflow timeout, from an input
    assert fx.sent[-1].timeout == 0.5  # the command's, from an input
    fx.fail("busy", -32003)
    assert fx.timers[-1].delay == 0.25 and fx.entries[-1]["retry_in"] == 0.25
    fx.fire()
    fx.reply({"level": 80})
    assert run.state == "pause" and fx.timers[-1].delay == 0.25  # waits `pause` seconds
    fx.fire()
    assert run.outcome == "success"
    assert fx.events() == ["start", "error", "retry", "reply", "waited", "finished"]


def test_a_wait_from_an_input_waits_that_long(tmp_path: Path) -> None:
    text = "inputs: {pause: null}\ninitial: w\nstates:\n"
    text += '  w: {wait: "{{ pause }}", next: ok}\n  ok: {final: success}\n'
    for value, seconds in ((2, 2.0), ("750ms", 0.75), (0, 0.0), ("1m", 60.0)):
        run, fx = start(tmp_path, text, pause=value)
        assert run.state == "w" and [t.delay for t in fx.timers] == [seconds]
        fx.fire()
        assert run.outcome == "success"


@pytest.mark.parametrize(
    ("pause", "message"),
    [
        ("soon", "wait '{{ pause }}' is not a duration: expected a duration like 500ms"),
        (-1, "a duration cannot be negative, got -1"),
        ([1], "expected a duration like 500ms, 2s or 1m, got [1]"),
    ],
)
def test_a_bad_rendered_duration_is_an_expression_error(
    tmp_path: Path, pause: Any, message: str
) -> None:
    text = "inputs: {pause: null}\ninitial: w\nstates:\n"
    text += '  w: {wait: "{{ pause }}", next: ok}\n  ok: {final: success}\n'
    run, fx = start(tmp_path, text, pause=pause)
    assert run.outcome == "failure" and fx.timers == [] and fx.done == [run]
    assert fx.events() == ["start", "expression_error", "finished"]
    err = fx.entries[1]
    assert err["state"] == "w" and err["expression"] == "{{ pause }}"
    assert message in err["message"], err["message"]
    assert run.reason is not None and run.reason.startswith("expression failed in state 'w'")


def test_a_templated_timeout_must_be_more_than_zero(tmp_path: Path) -> None:
    run, fx = start(tmp_path, TEMPLATED, pause=0)
    assert run.outcome == "failure" and fx.sent == []
    assert fx.events() == ["start", "expression_error", "finished"]
    assert "timeout '{{ pause * 2 }}' must be more than 0, got 0" in fx.entries[1]["message"]


def test_a_templated_workflow_timeout_expires_with_its_value(tmp_path: Path) -> None:
    run, fx = start(tmp_path, TEMPLATED, limit="2m")
    assert fx.timers[0].delay == 120.0
    run.on_timer(fx.timers[0].token)
    assert run.outcome == "failure" and run.reason == "workflow timeout (2m) expired"
    assert fx.entries[1]["event"] == "workflow_timeout" and fx.entries[1]["timeout"] == 120.0
    run, fx = start(tmp_path, TEMPLATED, limit="later")
    assert run.outcome == "failure" and fx.sent == [] and fx.timers == []
    assert fx.events() == ["start", "expression_error", "finished"]


def test_a_templated_wait_replays_to_the_same_timer(tmp_path: Path) -> None:
    from statemachines.workflow.replay import replay

    wf = compiled(tmp_path, TEMPLATED)
    fx = Recorder()
    run = wf.new_run(fx, "r1", {"pause": 3})
    run.start()
    fx.reply({"delay": 1})
    assert run.state == "pause" and fx.timers[-1].delay == 3.0
    plan = replay(compiled(tmp_path, TEMPLATED), fx.entries)
    assert plan.run.state == "pause" and plan.run.context["pause"] == 3
    assert [(t.kind, t.delay) for t in plan.timers] == [("wait", 3.0), ("timeout", 40.0)]
