"""DeviceMachine: the transitions machine of one device, driven as the server drives it."""

from __future__ import annotations

from pathlib import Path

import pytest

from statemachines.device import CommandNotAllowed, DeviceMachine, DeviceSpec, load_device

CONFIG = Path(__file__).resolve().parent.parent / "config" / "devices"

HW = "def ok(ctx, **params):\n    return {}\n"

MACHINE = """\
device: lab
states: [idle, busy, open, fault]
commands:
  work: {from: [idle], running: busy, to: open, handler: hw:ok}
  probe: {from: [idle, open], running: busy, handler: hw:ok}      # no `to`: back to origin
  poke: {from: [idle, open], handler: hw:ok}                      # no running, no to
  shut: {from: [open], to: idle, handler: hw:ok}                  # no running, a to
  look: {from: "*", handler: hw:ok}
  reset: {from: [fault], to: idle, handler: hw:ok}
"""


def spec_of(tmp_path: Path, text: str = MACHINE) -> DeviceSpec:
    (tmp_path / "hw.py").write_text(HW)
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    return load_device(path)


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str, str, str]] = []

    def __call__(self, state: str, previous: str, command: str) -> None:
        self.changes.append((state, previous, command))


@pytest.fixture
def changes() -> Recorder:
    return Recorder()


@pytest.fixture
def lab(tmp_path: Path, changes: Recorder) -> DeviceMachine:
    return DeviceMachine(spec_of(tmp_path), on_change=changes)


def test_starts_in_initial(lab: DeviceMachine, changes: Recorder) -> None:
    assert lab.state == "idle"
    assert changes.changes == []


def test_running_then_to(lab: DeviceMachine, changes: Recorder) -> None:
    lab.begin("work")
    assert lab.state == "busy"
    lab.succeed("work")
    assert lab.state == "open"
    assert changes.changes == [("busy", "idle", "work"), ("open", "busy", "work")]


def test_no_to_returns_to_the_origin(lab: DeviceMachine, changes: Recorder) -> None:
    lab.begin("probe")
    lab.succeed("probe")
    assert lab.state == "idle"
    lab.begin("work")
    lab.succeed("work")
    lab.begin("probe")  # from open this time
    assert lab.state == "busy"
    lab.succeed("probe")
    assert lab.state == "open"
    assert changes.changes == [
        ("busy", "idle", "probe"),
        ("idle", "busy", "probe"),
        ("busy", "idle", "work"),
        ("open", "busy", "work"),
        ("busy", "open", "probe"),
        ("open", "busy", "probe"),
    ]


def test_no_running_no_to_changes_nothing(lab: DeviceMachine, changes: Recorder) -> None:
    lab.begin("poke")
    assert lab.state == "idle"
    lab.succeed("poke")
    assert lab.state == "idle"
    assert changes.changes == []  # no change, no callback


def test_no_running_with_to(lab: DeviceMachine, changes: Recorder) -> None:
    lab.begin("work")
    lab.succeed("work")
    lab.begin("shut")
    assert lab.state == "open"  # no running state: stays put while the handler runs
    lab.succeed("shut")
    assert lab.state == "idle"
    assert changes.changes[-1] == ("idle", "open", "shut")


def test_refused_leaves_the_state_unchanged(lab: DeviceMachine, changes: Recorder) -> None:
    assert lab.allowed("work") and not lab.allowed("shut") and not lab.allowed("reset")
    with pytest.raises(CommandNotAllowed) as info:
        lab.begin("shut")
    exc = info.value
    assert (exc.device, exc.state, exc.allowed, exc.command) == ("lab", "idle", ["open"], "shut")
    assert str(exc) == "lab.shut is not allowed in state 'idle' (allowed in: open)"
    assert lab.state == "idle" and changes.changes == []


def test_running_state_refuses_other_commands(lab: DeviceMachine) -> None:
    lab.begin("work")
    assert not lab.allowed("work") and not lab.allowed("probe")
    assert lab.allowed("look") and lab.allowed("state")
    with pytest.raises(CommandNotAllowed):
        lab.begin("probe")
    assert lab.state == "busy"


def test_fail_goes_to_fault_which_only_reset_leaves(lab: DeviceMachine, changes: Recorder) -> None:
    lab.begin("work")
    lab.fail("work")
    assert lab.state == "fault"
    allowed = [name for name in lab.spec.commands if lab.allowed(name)]
    assert allowed == ["look", "reset"]  # `look` is from "*", which includes the fault state
    lab.begin("look")
    lab.succeed("look")
    assert lab.state == "fault"
    lab.begin("reset")
    lab.succeed("reset")
    assert lab.state == "idle"
    assert changes.changes == [
        ("busy", "idle", "work"),
        ("fault", "busy", "work"),
        ("idle", "fault", "reset"),
    ]


def test_fail_without_running_state(lab: DeviceMachine, changes: Recorder) -> None:
    lab.begin("poke")
    lab.fail("poke")
    assert lab.state == "fault"
    assert changes.changes == [("fault", "idle", "poke")]


def test_failed_reset_stays_in_fault(lab: DeviceMachine, changes: Recorder) -> None:
    lab.begin("poke")
    lab.fail("poke")
    lab.begin("reset")
    lab.fail("reset")
    assert lab.state == "fault"
    assert changes.changes == [("fault", "idle", "poke")]


def test_cancel_returns_to_the_origin_not_fault(lab: DeviceMachine, changes: Recorder) -> None:
    lab.begin("work")
    lab.cancel("work")
    assert lab.state == "idle"
    lab.begin("poke")
    lab.cancel("poke")
    assert lab.state == "idle"
    assert changes.changes == [("busy", "idle", "work"), ("idle", "busy", "work")]


def test_interrupted_halfway_goes_to_cancelled_else_fault(tmp_path: Path) -> None:
    text = MACHINE.replace(
        "work: {from: [idle], running: busy, to: open, handler: hw:ok}",
        "work: {from: [idle], running: busy, to: open, cancelled: idle, handler: hw:ok}",
    )
    lab = DeviceMachine(spec_of(tmp_path, text))
    lab.begin("work")
    lab.interrupt("work")  # cancelled while its handler ran
    assert lab.state == "idle"
    lab.begin("probe")
    lab.interrupt("probe")  # no `cancelled:`: it acted halfway, so fault
    assert lab.state == "fault"
    lab.begin("reset")
    lab.cancel("reset")  # cancelled before it started: where it was
    assert lab.state == "fault"


def test_enter_fault_outside_any_command(lab: DeviceMachine, changes: Recorder) -> None:
    assert lab.enter_fault() == "idle"
    assert lab.state == "fault"
    assert lab.enter_fault() is None  # already there
    assert changes.changes == []  # the caller publishes it, with its reason
    lab.begin("reset")
    lab.succeed("reset")
    assert lab.state == "idle"


def test_without_a_fault_state_fail_returns_to_the_origin(
    tmp_path: Path, changes: Recorder
) -> None:
    text = MACHINE.replace(
        "states: [idle, busy, open, fault]", "states: [idle, busy, open, broken]"
    )
    text = text.replace("[fault]", "[broken]")
    spec = spec_of(tmp_path, text)
    assert spec.fault_state is None
    machine = DeviceMachine(spec, on_change=changes)
    machine.begin("work")
    machine.fail("work")
    assert machine.state == "idle"
    assert changes.changes == [("busy", "idle", "work"), ("idle", "busy", "work")]


def test_finish_without_begin_and_unknown_commands(lab: DeviceMachine) -> None:
    with pytest.raises(RuntimeError, match="not begun"):
        lab.succeed("work")
    with pytest.raises(KeyError):
        lab.begin("fly")
    assert not lab.allowed("fly")
    assert lab.allowed("state")


def test_each_machine_is_independent(tmp_path: Path) -> None:
    spec = spec_of(tmp_path)
    first, second = DeviceMachine(spec), DeviceMachine(spec)
    first.begin("work")
    assert (first.state, second.state) == ("busy", "idle")


def test_on_change_is_optional(tmp_path: Path) -> None:
    machine = DeviceMachine(spec_of(tmp_path))
    machine.begin("work")
    machine.succeed("work")
    assert machine.state == "open"


def test_door_cycle(changes: Recorder) -> None:
    door = DeviceMachine(load_device(CONFIG / "door.yaml"), on_change=changes)
    assert door.state == "closed"
    for command in ("open", "close"):
        door.begin(command)
        door.succeed(command)
    door.begin("open")
    door.fail("open")  # jammed
    assert door.state == "fault"
    assert not door.allowed("open") and not door.allowed("close")
    door.begin("reset")
    assert door.state == "closing"
    door.succeed("reset")
    assert door.state == "closed"
    assert [state for state, _, _ in changes.changes] == [
        "opening",
        "open",
        "closing",
        "closed",
        "opening",
        "fault",
        "closing",
        "closed",
    ]


def test_demo_calibrate_cycle() -> None:
    demo = DeviceMachine(load_device(CONFIG / "demo.yaml"))
    demo.begin("calibrate")
    assert demo.state == "calibrating"
    assert demo.allowed("read_sensor") and not demo.allowed("selftest")
    demo.cancel("calibrate")
    assert demo.state == "idle"
    demo.begin("selftest")
    demo.fail("selftest")
    assert demo.state == "fault"
    assert [n for n in demo.spec.commands if demo.allowed(n)] == [
        "led_on",
        "led_off",
        "read_button",
        "read_sensor",
        "reset",
    ]


def test_the_machine_runs_the_specs_transition_list(tmp_path: Path) -> None:
    spec = spec_of(tmp_path)
    assert spec.transitions is spec.transitions  # computed once per spec
    work = [(t.event, t.source, t.dest, t.origin) for t in spec.transitions if t.command == "work"]
    assert work == [
        ("begin", "idle", "busy", None),
        ("succeed", "busy", "open", None),
        ("cancel", "busy", "idle", "idle"),
        ("fail", "busy", "fault", None),
        ("interrupt", "busy", "fault", None),  # cancelled halfway: no `cancelled:`, so fault
    ]
    poke = {(t.event, t.source, t.dest) for t in spec.transitions if t.command == "poke"}
    assert ("succeed", "open", "open") in poke and ("fail", "idle", "fault") in poke
