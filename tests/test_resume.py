"""Resume by deterministic replay (issue 12).

Pure part: ``statemachines.workflow.replay`` against journals written by a simulated runner,
device and clock (:class:`Driver`): a journal cut after any of its entries resumes to the end
the uncut run reached, every device key executed once; a workflow that does not replay its
journal is a clear error.

End-to-end part: ``statelink run`` killed with SIGKILL at chosen points of real runs against
a counting device in a child process, then ``statelink resume``.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import REPO, ChildServer, executions, write_counting_device
from support import WAIT, wait_until

from controller import Client
from statemachines import errorkinds as ek
from statemachines.workflow import CompiledWorkflow, JournalEntry, WorkflowRun, parse_workflow
from statemachines.workflow.replay import ReplayMismatch, ResumePlan, replay

# --- the pure part ------------------------------------------------------------------------

WORKFLOW = """\
name: replayme
servers: {dev: "127.0.0.1:1"}
inputs: {n: 2}
command_timeout: 5s
timeout: 10m
on_abort: cleanup
initial: first
states:
  first:
    command: counter.work
    params: {tag: "first-{{ n }}"}
    retry: {attempts: 3, interval: 1s, on: [timeout]}
    next: pick
  pick:
    choices:
      - if: result.tag == "first-2"
        next: pause
      - next: failed
  pause:
    wait: 2s
    next: listen
  listen:
    await: device.state
    if: params.state == "idle"
    timeout: 5s
    save: change
    next: second
    on_error: {timeout: second}
  second:
    command: counter.work
    params: {tag: second}
    next: done
    on_error: {device_fault: cleanup}
  done:
    final: success
  cleanup:
    command: counter.reset
    next: failed
    on_error: failed
  failed:
    final: failure
"""


@dataclass(frozen=True)
class Scenario:
    name: str
    #: (state, attempt) -> "client_timeout": the transport times out (the device still acts)
    transport: dict[tuple[str, int], str] = field(default_factory=dict)
    #: state -> the device's error kind for that state's command (else it succeeds)
    device_errors: dict[str, str] = field(default_factory=dict)
    #: the notifications delivered in the await state, in order
    notifications: tuple[dict[str, Any], ...] = ()
    abort_in: str | None = None  #: abort when the run is in this state
    abort_reason: str | None = None  #: ... with this reason (a journal that cannot be written)
    workflow_timeout: str = "10m"
    outcome: str = "success"


SCENARIOS = [
    Scenario(
        "retry_wait_await",
        transport={("first", 1): "client_timeout"},
        notifications=({"state": "busy"}, {"state": "idle"}),
    ),
    Scenario("await_timeout"),
    Scenario(
        "error_route",
        notifications=({"state": "idle"},),
        device_errors={"second": "device_fault"},
        outcome="failure",
    ),
    Scenario("unhandled", device_errors={"first": "not_allowed"}, outcome="failure"),
    Scenario("abort_in_wait", abort_in="pause", outcome="aborted"),
    Scenario(
        "abort_in_on_abort", abort_in="pause", device_errors={"cleanup": "busy"}, outcome="aborted"
    ),
    Scenario("workflow_timeout", workflow_timeout="2500ms", outcome="failure"),
    Scenario(
        "abort_with_reason",
        abort_in="listen",
        abort_reason="journal write failed: No space left on device: j.jsonl",
        outcome="failure",
    ),
]


class Device:
    """A device with idempotency keys: the first request of a key executes, later ones get
    its stored outcome (``replayed``)."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.outcomes: dict[str, tuple[str, Any]] = {}
        self.executions: collections.Counter[str] = collections.Counter()

    def request(self, state: str, key: str, params: Any) -> tuple[tuple[str, Any], bool]:
        if key in self.outcomes:
            return self.outcomes[key], True
        self.executions[key] += 1
        kind = self.scenario.device_errors.get(state)
        outcome = (
            ("error", kind) if kind else ("reply", {"tag": (params or {}).get("tag"), "key": key})
        )
        self.outcomes[key] = outcome
        return outcome, False

    def seeded(self, journal: list[dict[str, Any]]) -> Device:
        """The device as it was when the journal ended: it executed every key whose ``send``
        entry is on record (the request may have reached it)."""
        device = Device(self.scenario)
        for entry in journal:
            if entry["event"] == "send" and entry["key"] not in device.outcomes:
                device.outcomes[entry["key"]] = self.outcomes[entry["key"]]
                device.executions[entry["key"]] += 1
        return device


class Driver:
    """Plays the runner, the device's server and the clock for one run, deterministically:
    journals what the run records (with ``at``) and a ``send`` entry before each command."""

    def __init__(
        self,
        scenario: Scenario,
        device: Device,
        clock: float = 1000.0,
        journal: list[dict[str, Any]] | None = None,
    ) -> None:
        self.scenario = scenario
        self.device = device
        self.clock = clock
        self.journal: list[dict[str, Any]] = [] if journal is None else journal
        self.pending: tuple[int, str, int, str, Any] | None = (
            None  # token, state, attempt, key, params
        )
        self.timers: dict[int, float] = {}
        self.lates: list[tuple[int, Any]] = []
        self.notified: dict[int, int] = {}  # visit -> notifications delivered
        self.aborted = False

    # Effects
    def send_command(
        self, run: WorkflowRun, token: int, server: str, method: str, params: Any, timeout: float
    ) -> None:
        self.journal.append(
            {
                "event": "send",
                "time": "",
                "at": self.clock,
                "state": run.state,
                "server": server,
                "command": method,
                "params": params,
                "key": run.command_key,
                "attempt": run.attempt,
                "visit": run.visit,
                "timeout": timeout,
                "deadline": self.clock + timeout,
            }
        )
        self.pending = (token, run.state, run.attempt, run.command_key, params)

    def start_timer(self, run: WorkflowRun, token: int, delay: float) -> None:
        self.timers[token] = self.clock + delay

    def abandon(self, run: WorkflowRun, token: int) -> None:
        pass

    def record(self, run: WorkflowRun, entry: JournalEntry) -> None:
        self.journal.append({**entry, "at": self.clock})

    def finished(self, run: WorkflowRun) -> None:
        pass

    # driving
    def resume(self, plan: ResumePlan) -> None:
        """Go live as the runner does: the run's effects become ours, timers armed at their
        due times, the pending command sent again with its key."""
        run = plan.run
        run.effects = self
        self.journal.append(
            {
                "event": "resumed",
                "time": "",
                "at": self.clock,
                "state": run.state,
                "pending": plan.pending(self.clock),
            }
        )
        self.journal += [dict(e) for e in plan.extra]
        for timer in plan.timers:
            self.timers[timer.token] = timer.due
        if plan.send is not None:
            s = plan.send
            self.send_command(run, s.token, s.server, s.command, s.params, s.timeout)

    def go(self, run: WorkflowRun, stop_after: int | None = None) -> None:
        """Drive the run to its end (or until the journal holds ``stop_after`` entries)."""
        for _ in range(1000):
            if run.done or (stop_after is not None and len(self.journal) >= stop_after):
                return
            self.step(run)
        raise AssertionError("the run did not end")

    def step(self, run: WorkflowRun) -> None:
        sc = self.scenario
        if sc.abort_in == run.state and not self.aborted:
            self.aborted = True
            run.abort(sc.abort_reason)
            return
        pending = self.pending
        if pending is not None and run.expects(pending[0]):
            self.pending = None
            self.clock += 0.25
            self.answer(run, *pending)
            return
        st = run.spec.states[run.state]
        delivered = self.notified.get(run.visit, 0)
        if st.kind == "await" and delivered < len(sc.notifications):
            self.notified[run.visit] = delivered + 1
            self.clock += 0.5
            run.on_notification("dev", "device.state", sc.notifications[delivered])
            return
        token = min(self.timers, key=lambda t: self.timers[t])
        self.clock = max(self.clock, self.timers.pop(token))
        run.on_timer(token)

    def answer(
        self, run: WorkflowRun, token: int, state: str, attempt: int, key: str, params: Any
    ) -> None:
        (kind, value), replayed = self.device.request(state, key, params)
        if self.scenario.transport.get((state, attempt)) == "client_timeout":
            self.lates.append((token, value))
            run.on_error(token, "timeout", ek.TIMEOUT, "no reply in time", {"source": "client"})
            return
        if kind == "reply":
            run.on_reply(token, value, replayed)
        else:
            run.on_error(token, value, ek.CODE_BY_KIND[value], f"{value}!", None, replayed)
        for late_token, result in self.lates:
            run.on_late(late_token, result)
        self.lates = []


def _compiled(scenario: Scenario, text: str = WORKFLOW) -> CompiledWorkflow:
    text = text.replace("timeout: 10m", f"timeout: {scenario.workflow_timeout}")
    return CompiledWorkflow(parse_workflow(text, "replayme.yaml"))


def _full_run(scenario: Scenario) -> tuple[CompiledWorkflow, Driver, WorkflowRun]:
    compiled = _compiled(scenario)
    driver = Driver(scenario, Device(scenario))
    run = compiled.new_run(driver, "replayme-1", {"n": 2})
    run.start()
    driver.go(run)
    assert run.outcome == scenario.outcome, (run.reason, driver.journal)
    return compiled, driver, run


def _end(run: WorkflowRun) -> tuple[Any, ...]:
    return run.outcome, run.state, run.reason, run.context


def _resume(
    compiled: CompiledWorkflow, scenario: Scenario, device: Device, journal: list[dict[str, Any]]
) -> tuple[Driver, ResumePlan]:
    now = journal[-1]["at"]
    plan = replay(compiled, journal, now=now)
    driver = Driver(scenario, device.seeded(journal), clock=now, journal=list(journal))
    driver.resume(plan)
    return driver, plan


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_a_journal_cut_after_any_entry_resumes_to_the_same_end(scenario: Scenario) -> None:
    compiled, full, run = _full_run(scenario)
    journal = full.journal
    assert journal[-1]["event"] == "finished"
    for cut in range(1, len(journal)):
        driver, plan = _resume(compiled, scenario, full.device, journal[:cut])
        driver.go(plan.run)
        where = f"cut after entry {cut} ({journal[cut - 1]['event']})"
        assert _end(plan.run) == _end(run), where
        # every key the uncut run executed, executed once; nothing else
        assert driver.device.executions == full.device.executions, where
        # cut the resumed run's journal again, half way to its end: it resumes as well
        again = driver.journal[: (cut + len(driver.journal)) // 2 + 1]
        if again[-1]["event"] != "finished":
            driver2, plan2 = _resume(compiled, scenario, full.device, again)
            driver2.go(plan2.run)
            assert _end(plan2.run) == _end(run), f"{where}, then again"


def test_the_plan_says_what_remains() -> None:
    scenario = SCENARIOS[0]
    compiled, full, _run = _full_run(scenario)
    journal = full.journal
    events = [e["event"] for e in journal]

    # after the first try's send: send again with the same key, what remains of its timeout
    first_send = events.index("send")
    cut = journal[: first_send + 1]
    plan = replay(compiled, cut, now=cut[-1]["at"] + 2)
    assert plan.send is not None and plan.send.sent
    assert plan.send.key == "replayme-1:1" and plan.send.attempt == 1
    assert plan.send.timeout == pytest.approx(3.0)
    assert plan.run.state == "first" and plan.awaiting is None
    assert [t.kind for t in plan.timers] == ["timeout"]
    assert plan.pending(cut[-1]["at"] + 2) == {
        "send": "replayme-1:1",
        "timeout": pytest.approx(598),
    }
    # long past its deadline: at least MIN_SEND_TIMEOUT
    assert replay(compiled, cut, now=cut[-1]["at"] + 60).send.timeout == 1.0  # type: ignore[union-attr]

    # during the retry delay: the retry timer at its original due time
    error_at = next(i for i, e in enumerate(journal) if e["event"] == "error")
    plan = replay(compiled, journal[: error_at + 1], now=journal[error_at]["at"] + 0.4)
    retry = next(t for t in plan.timers if t.kind == "retry")
    assert retry.due == pytest.approx(journal[error_at]["at"] + 1.0)
    assert retry.remaining(journal[error_at]["at"] + 0.4) == pytest.approx(0.6)
    assert plan.send is None

    # during the wait: only what remains of it
    choice_at = events.index("choice")
    plan = replay(compiled, journal[: choice_at + 1], now=journal[choice_at]["at"] + 1.5)
    assert plan.run.state == "pause"
    assert plan.pending(journal[choice_at]["at"] + 1.5)["wait"] == pytest.approx(0.5)

    # during the await: subscribe again, the await's timer with what remains
    waited_at = events.index("waited")
    plan = replay(compiled, journal[: waited_at + 1], now=journal[waited_at]["at"] + 1)
    assert plan.awaiting == ("dev", "device.state")
    assert plan.pending(journal[waited_at]["at"] + 1)["await"] == pytest.approx(4.0)

    # a send entry lost with the crash: it never went out (sent False, its whole timeout)
    reply_at = events.index("reply")
    plan = replay(compiled, journal[:first_send], now=journal[0]["at"])
    assert plan.send is not None and not plan.send.sent and plan.send.timeout == 5.0
    assert reply_at > first_send


def test_entries_lost_with_the_crash_are_replayed_as_extra() -> None:
    scenario = Scenario("await_timeout")
    compiled, full, _run = _full_run(scenario)
    journal = full.journal
    plan = replay(compiled, journal[:-1], now=journal[-1]["at"])  # without "finished"
    assert plan.run.done and plan.run.outcome == "success"
    assert [e["event"] for e in plan.extra] == ["finished"]
    assert plan.send is None and plan.timers == [] and plan.awaiting is None
    # the choice entry lost too
    choice_at = [e["event"] for e in journal].index("choice")
    plan = replay(compiled, journal[:choice_at], now=journal[choice_at]["at"])
    assert [e["event"] for e in plan.extra] == ["choice"]
    assert plan.run.state == "pause" and [t.kind for t in plan.timers] == ["wait", "timeout"]


def test_a_workflow_that_does_not_replay_its_journal_is_a_clear_error() -> None:
    scenario = SCENARIOS[0]
    _compiled_ok, full, _run = _full_run(scenario)
    changed = _compiled(scenario, WORKFLOW.replace('result.tag == "first-2"', 'result.tag == "x"'))
    with pytest.raises(
        ReplayMismatch,
        match=r"journal line \d+: the journal has 'choice' in "
        r"state 'pick' -> 'pause', the workflow replays 'choice' in state "
        r"'pick' -> 'failed'.*workflow's text changed",
    ):
        replay(changed, full.journal[:-1])
    # a state that waited now sends a command: the recorded "waited" does not replay
    no_wait = _compiled(scenario, WORKFLOW.replace("wait: 2s", "command: counter.mark"))
    with pytest.raises(ReplayMismatch, match=r"journal line \d+: the journal has 'waited'"):
        replay(no_wait, full.journal[:-1])
    with pytest.raises(ReplayMismatch, match="does not begin with a start entry"):
        replay(_compiled_ok, full.journal[1:])
    with pytest.raises(ReplayMismatch, match="does not begin with a start entry"):
        replay(_compiled_ok, [])


# --- end to end: statelink run killed with SIGKILL, then statelink resume -------------------

MAIN_WORKFLOW = """\
name: durable
servers: {{dev: "{address}"}}
timeout: 2m
on_abort: safe
initial: first
states:
  first:
    command: counter.work
    params: {{seconds: 2, tag: first}}
    timeout: 20s
    next: second
  second:
    command: counter.work
    params: {{tag: second}}
    timeout: 10s
    next: pause
  pause:
    wait: 3s
    next: third
  third:
    command: counter.work
    params: {{tag: third}}
    timeout: 10s
    next: done
  done:
    final: success
  safe:
    command: other.work
    params: {{seconds: 2, tag: safe}}
    timeout: 20s
    next: stopped
    on_error: stopped
  stopped:
    final: failure
"""

AWAIT_WORKFLOW = """\
name: awaiting
servers: {{dev: "{address}"}}
initial: listen
states:
  listen:
    await: device.state
    if: params.state == "busy"
    timeout: 60s
    save: change
    next: second
  second:
    command: counter.work
    params: {{tag: second}}
    timeout: 10s
    next: done
  done:
    final: success
"""


CLI = (sys.executable, "-m", "controller")


class Controller:
    """``statelink run`` / ``statelink resume`` processes on one state directory, against one
    counting device served by a child process."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.state_dir = tmp_path / "controller"
        argv = ["serve", "--port", "0", "--state-dir", str(tmp_path / "server")]
        for device in ("counter", "other"):  # other: for on_abort (counter faults on a cancel)
            argv += ["--device", str(write_counting_device(tmp_path, device))]
        self.server = ChildServer("cli", argv, tmp_path / "server.log").start()
        host, port = self.server.address
        self.address = f"{host}:{port}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def workflow(self, text: str, name: str) -> Path:
        path = self.dir / f"{name}.yaml"
        path.write_text(text.format(address=self.address))
        return path

    def statelink(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        """``statelink ARGS --plain --state-dir STATE`` in the background, output to LOG."""
        with open(self.dir / log, "ab") as out:
            proc = subprocess.Popen(
                [*CLI, *args, "--plain", "--state-dir", str(self.state_dir)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        self.procs.append(proc)
        return proc

    def output(self, log: str) -> str:
        return (self.dir / log).read_text(errors="replace")

    def exit_code(self, proc: subprocess.Popen[bytes], log: str) -> int:
        try:
            return proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
            raise AssertionError(f"statelink did not end:\n{self.output(log)[-3000:]}") from None

    def journal(self) -> Path:
        """The one journal of STATE/runs/."""
        (path,) = wait_until(lambda: list((self.state_dir / "runs").glob("*.jsonl")))
        return path

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(WAIT)
        self.server.kill()


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    group = Controller(tmp_path)
    yield group
    group.close()


def read(journal: Path) -> list[dict[str, Any]]:
    """The complete lines of a journal."""
    text = journal.read_text() if journal.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def has(journal: Path, event: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in read(journal)
        if e["event"] == event and all(e.get(k) == v for k, v in match.items())
    ]


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(WAIT)


def run_id_of(journal: Path) -> str:
    return str(read(journal)[0]["run"])


@pytest.mark.parametrize(
    "point", ["during_a_command", "between_steps", "during_a_wait", "during_on_abort"]
)
def test_statelink_run_killed_then_resumed_ends_as_it_would_have(
    controller: Controller, tmp_path: Path, point: str
) -> None:
    workflow = controller.workflow(MAIN_WORKFLOW, "durable")
    run = controller.statelink("run", str(workflow), log="run.log")
    journal = controller.journal()
    if point == "during_a_command":
        wait_until(lambda: executions(tmp_path, tag="first"), what="the first command to run")
    elif point == "between_steps":
        wait_until(lambda: has(journal, "reply", state="first"), what="the first reply")
    elif point == "during_a_wait":
        wait_until(lambda: has(journal, "reply", state="second"), what="the wait to begin")
    else:
        wait_until(lambda: executions(tmp_path, tag="first"), what="the first command to run")
        run.send_signal(signal.SIGTERM)
        wait_until(lambda: executions(tmp_path, tag="safe"), what="the on_abort command")
    kill(run)
    assert not has(journal, "finished")

    resume = controller.statelink("resume", run_id_of(journal), log="resume.log")
    code = controller.exit_code(resume, "resume.log")
    out = controller.output("resume.log")
    finished = has(journal, "finished")
    assert len(finished) == 1, out[-3000:]
    (resumed,) = has(journal, "resumed")
    assert resumed["pid"] == resume.pid
    assert f"run {run_id_of(journal)} resumed in state" in out
    if point == "during_on_abort":
        assert code == ek_exit("aborted"), out[-3000:]
        assert finished[0]["final"] == "aborted" and finished[0]["state"] == "stopped"
        assert resumed["pending"].get("send") == has(journal, "send", state="safe")[0]["key"]
        tags = {"first": 1, "safe": 1, "second": 0, "third": 0}
    else:
        assert code == 0, out[-3000:]
        assert finished[0]["final"] == "success" and finished[0]["state"] == "done"
        tags = {"first": 1, "second": 1, "third": 1, "safe": 0}
    # every step's command executed exactly once on the device
    ran = wait_until(lambda: len(executions(tmp_path, "end")) == sum(tags.values()) or None)
    assert ran
    for tag, count in tags.items():
        assert len(executions(tmp_path, tag=tag)) == count, (tag, executions(tmp_path))
    if point == "during_a_command":
        # sent again with the same key: the device joined the running execution
        (before, again) = has(journal, "send", state="first")
        assert before["key"] == again["key"] and resumed["pending"] == {
            "send": before["key"],
            "timeout": pytest.approx(120 - (resumed["at"] - read(journal)[0]["started"]), abs=1),
        }
        assert has(journal, "reply", state="first")[0]["result"]["finished"] is True
    if point == "during_a_wait":
        # it waited only what remained of the 3 s
        (reply,) = has(journal, "reply", state="second")
        (waited,) = has(journal, "waited")
        assert resumed["pending"]["wait"] == pytest.approx(reply["at"] + 3 - resumed["at"], abs=0.1)
        due = max(reply["at"] + 3, resumed["at"])  # at once if the resume came after it
        assert reply["at"] + 3 - 0.05 <= waited["at"] <= due + 1.0, (reply, resumed, waited)


def ek_exit(outcome: str) -> int:
    from controller.cli.run import EXIT_BY_OUTCOME

    return EXIT_BY_OUTCOME[outcome]


def test_killed_during_an_await_resumes_awaiting_and_one_controller_at_a_time(
    controller: Controller, tmp_path: Path
) -> None:
    workflow = controller.workflow(AWAIT_WORKFLOW, "awaiting")
    journal = tmp_path / "awaiting.jsonl"
    run = controller.statelink("run", str(workflow), "--journal", str(journal), log="run.log")
    wait_until(lambda: has(journal, "start"), what="the run to start")
    assert f"run {run_id_of(journal)}, journal {journal}" in wait_until(
        lambda: "journal" in controller.output("run.log") and controller.output("run.log")
    )
    kill(run)

    resume = controller.statelink("resume", str(journal), log="resume.log")
    (resumed,) = wait_until(lambda: has(journal, "resumed"), what="the resumed entry")
    started = read(journal)[0]["at"]
    assert resumed["pending"]["await"] == pytest.approx(60 - (resumed["at"] - started), abs=0.1)
    # a second resume while one drives the run: exit 2, naming the process that drives it
    second = statelink_cli("resume", str(journal), "--state-dir", str(controller.state_dir))
    assert second.returncode == 2, second.stderr
    assert f"being driven by process {resume.pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    # the resumed run awaits again: a device.state change reaches it
    with Client(controller.server.address) as client:

        def poke() -> list[dict[str, Any]]:
            if not has(journal, "notification"):
                client.call("counter.work", {"tag": "poke"})
            return has(journal, "notification")

        wait_until(poke, what="the notification to reach the resumed run")
    assert controller.exit_code(resume, "resume.log") == 0, controller.output("resume.log")
    assert has(journal, "finished")[0]["final"] == "success"
    assert len(executions(tmp_path, tag="second")) == 1

    # a finished run is not resumed: exit 2, one line saying so
    again = statelink_cli("resume", run_id_of(journal), "--state-dir", str(controller.state_dir))
    assert again.returncode == 2, again.stderr
    # (found by id? the journal is not in STATE/runs: an unknown run)
    assert "no run" in again.stderr
    again = statelink_cli("resume", str(journal), "--state-dir", str(controller.state_dir))
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"statelink resume: run {run_id_of(journal)} already finished (success)"
    )


def statelink_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=REPO,
    )


def test_workflow_runner_resume_in_python(controller: Controller, tmp_path: Path) -> None:
    """``WorkflowRunner.resume(path)``: refused while another runner drives the run (even in
    this process), continues it once that runner is gone, refused once it finished."""
    from controller.journal import JournalBusy
    from controller.resume import RunFinished
    from controller.runner import WorkflowRunner
    from statemachines.workflow import load_workflow

    spec = load_workflow(controller.workflow(MAIN_WORKFLOW, "durable"))
    state = tmp_path / "python-state"
    first = WorkflowRunner(state_dir=state)
    try:
        handle = first.start(spec)
        journal = handle.journal_path
        assert journal is not None and journal.parent == state / "runs"
        wait_until(lambda: executions(tmp_path, tag="first"), what="the first command to run")
        with WorkflowRunner(state_dir=state) as second:
            with pytest.raises(JournalBusy) as busy:
                second.resume(journal)
            assert busy.value.pid == os.getpid()
            first.close()  # stops where it is: the journal ends without "finished"
            assert handle.outcome is None and not has(journal, "finished")
            resumed = second.resume(journal)
            assert resumed.run_id == handle.run_id
            assert resumed.wait(WAIT) == "success", resumed.history[-3:]
            with pytest.raises(RunFinished, match=r"already finished \(success\)"):
                second.resume(journal)
    finally:
        first.close()
    # the crash lost the last entry: the replay makes it again, and sends nothing
    lines = journal.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["event"] == "finished"
    journal.write_text("".join(lines[:-1]))
    with WorkflowRunner(state_dir=state) as third:
        assert third.resume(journal).wait(WAIT) == "success"
    events = [e["event"] for e in read(journal)]
    assert events[-2:] == ["resumed", "finished"] and events.count("finished") == 1
    for tag in ("first", "second", "third"):
        assert len(executions(tmp_path, tag=tag)) == 1, tag
