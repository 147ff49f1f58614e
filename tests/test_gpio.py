"""GpioBoard on gpiozero's MockFactory: actions, simulation, and the shipped handlers."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory, MockPWMPin
from support import WAIT

from controller.gpio import GpioBoard, GpioError, _distance_function
from controller.handlers import resolve_handlers
from statemachines.device import DeviceSpec, GpioActionSpec, load_device
from statemachines.params import ParamError

CONFIG = Path(__file__).resolve().parent.parent / "config" / "devices"

BENCH = """\
device: bench
states: [idle, fault]
gpio:
  led: {kind: led, pin: 17}
  relay: {kind: digital_output, pin: 5, active_high: false}
  fan: {kind: pwm_output, pin: 18}
  glow: {kind: pwm_led, pin: 13}
  arm: {kind: servo, pin: 12}
  button: {kind: button, pin: 27}
  limit: {kind: digital_input, pin: 6}
  loose: {kind: digital_input, pin: 7, pull_up: null, active_state: false}
commands:
  light: {gpio: {object: led, action: "on"}}
"""


def spec_of(tmp_path: Path, text: str) -> DeviceSpec:
    path = tmp_path / "bench.yaml"
    path.write_text(text)
    return load_device(path)


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    factory = MockFactory()
    yield factory
    factory.reset()


@pytest.fixture
def bench(tmp_path: Path, factory: MockFactory) -> Iterator[GpioBoard]:
    with GpioBoard(spec_of(tmp_path, BENCH), pin_factory=factory) as board:
        yield board


def act(board: GpioBoard, obj: str, action: str, **params: Any) -> Any:
    return board.run(GpioActionSpec(obj, action), params)


def pin(board: GpioBoard, name: str) -> Any:
    return board.objects[name].pin


# --- outputs -------------------------------------------------------------------------------


def test_digital_output_on_off_toggle_read(bench: GpioBoard) -> None:
    led = pin(bench, "led")
    assert led.state is False
    assert act(bench, "led", "on") == {"value": 1} and led.state is True
    assert act(bench, "led", "off") == {"value": 0} and led.state is False
    assert act(bench, "led", "toggle") == {"value": 1} and led.state is True
    assert act(bench, "led", "read") == {"value": 1}


def test_active_low_output(bench: GpioBoard) -> None:
    relay = pin(bench, "relay")
    assert relay.state is True  # off = high for an active-low relay board
    assert act(bench, "relay", "on") == {"value": 1}
    assert relay.state is False


def test_blink_waiting_for_the_end(bench: GpioBoard) -> None:
    led = pin(bench, "led")
    led.clear_states()
    result = act(bench, "led", "blink", on_time=0.01, off_time=0.01, times=2, wait=True)
    assert result == {"value": 0}
    assert [s.state for s in led.states] == [False, True, False, True, False]


def test_blink_in_the_background(bench: GpioBoard) -> None:
    assert act(bench, "led", "blink", on_time=0.01, off_time=0.01) == {"blinking": True}
    assert act(bench, "led", "off") == {"value": 0}  # stops the blinking
    assert pin(bench, "led").state is False


def test_endless_blink_cannot_be_waited_for(bench: GpioBoard) -> None:
    with pytest.raises(ParamError, match="'wait': needs 'times'"):
        act(bench, "led", "blink", wait=True)


def test_pwm_set_on_toggle(bench: GpioBoard) -> None:
    fan = pin(bench, "fan")
    assert isinstance(fan, MockPWMPin)
    assert act(bench, "fan", "set", value=0.3) == {"value": 0.3}
    assert fan.state == pytest.approx(0.3)
    assert act(bench, "fan", "read") == {"value": 0.3}
    assert act(bench, "fan", "on") == {"value": 1.0} and fan.state == 1.0
    assert act(bench, "fan", "toggle") == {"value": 0.0} and fan.state == 0.0


def test_pwm_led_pulse_and_blink(bench: GpioBoard) -> None:
    glow = pin(bench, "glow")
    glow.clear_states()
    assert act(
        bench, "glow", "pulse", fade_in_time=0.02, fade_out_time=0.02, times=1, wait=True
    ) == {"value": 0.0}
    levels = [s.state for s in glow.states]
    assert max(levels) > 0.5 and levels[-1] == 0.0
    result = act(bench, "glow", "blink", on_time=0.01, off_time=0.01, times=1, wait=True)
    assert result == {"value": 0.0}


def test_pwm_value_out_of_range(bench: GpioBoard) -> None:
    with pytest.raises(ParamError, match=r"param 'value': must be <= 1, got 2"):
        act(bench, "fan", "set", value=2)


def test_servo_positions(bench: GpioBoard) -> None:
    arm = bench.objects["arm"].pwm_device.pin
    assert arm.frequency == pytest.approx(50)  # 20 ms frames
    assert act(bench, "arm", "set", value=1) == {"value": 1.0}
    assert arm.state == pytest.approx(0.002 / 0.02)  # 2 ms pulse
    assert act(bench, "arm", "min") == {"value": -1.0}
    assert arm.state == pytest.approx(0.001 / 0.02)
    assert act(bench, "arm", "mid") == {"value": 0.0}
    assert arm.state == pytest.approx(0.0015 / 0.02)
    assert act(bench, "arm", "detach") == {"value": None}
    assert act(bench, "arm", "read") == {"value": None}


def test_fixed_arguments_and_params_merge(bench: GpioBoard) -> None:
    action = GpioActionSpec("fan", "set", {"value": 0.25})
    assert bench.run(action, {}) == {"value": 0.25}
    assert bench.run(action, {"value": 0.5}) == {"value": 0.5}


# --- inputs --------------------------------------------------------------------------------


def test_button_read(bench: GpioBoard) -> None:
    button = pin(bench, "button")
    assert act(bench, "button", "read") == {"pressed": False}  # pulled up, open
    button.drive_low()
    assert act(bench, "button", "read") == {"pressed": True}
    button.drive_high()  # released (a held Button makes close() wait its hold_time)


def test_digital_input_read(bench: GpioBoard) -> None:
    assert act(bench, "limit", "read") == {"value": 0}
    pin(bench, "limit").drive_high()
    assert act(bench, "limit", "read") == {"value": 1}


def test_floating_input_with_active_state(bench: GpioBoard) -> None:
    loose = pin(bench, "loose")
    loose.drive_high()
    assert act(bench, "loose", "read") == {"value": 0}
    loose.drive_low()  # active low
    assert act(bench, "loose", "read") == {"value": 1}


def test_wait_is_bounded(bench: GpioBoard) -> None:
    assert act(bench, "button", "wait", timeout=0.01) == {"pressed": False}
    pin(bench, "button").drive_low()
    assert act(bench, "button", "wait", timeout=WAIT) == {"pressed": True}
    assert act(bench, "button", "wait", pressed=False, timeout=0.01) == {"pressed": True}
    pin(bench, "button").drive_high()
    assert act(bench, "button", "wait", pressed=False, timeout=WAIT) == {"pressed": False}
    pin(bench, "limit").drive_high()
    assert act(bench, "limit", "wait", timeout=WAIT) == {"value": 1}


# --- distance sensor -----------------------------------------------------------------------

RANGE = """\
device: ranger
states: [idle]
gpio:
  range: {kind: distance_sensor, echo: 24, trigger: 23, queue_len: 1, SIM}
commands:
  read: {gpio: {object: range, action: read}}
"""


def test_simulated_distance(tmp_path: Path, factory: MockFactory) -> None:
    # the mock echo is timed by threads (2.4 ms for 0.42 m): a median of 5 readings keeps a
    # loaded machine's scheduling delays from moving it much; the exact value is the
    # simulation's (checked without threads below)
    sim = "simulate: {distance: 0.42}"
    spec = spec_of(tmp_path, RANGE.replace("queue_len: 1, SIM", f"queue_len: 5, {sim}"))
    with GpioBoard(spec, simulate=True, pin_factory=factory) as board:
        result = board.run(spec.commands["read"].gpio, {})  # type: ignore[arg-type]
    assert result["distance"] == pytest.approx(0.42, abs=0.15)
    assert _distance_function({"distance": 0.42})() == 0.42


def test_simulated_range_moves_within_its_bounds(tmp_path: Path, factory: MockFactory) -> None:
    spec = spec_of(tmp_path, RANGE.replace("SIM", "simulate: {range: [0.3, 0.6], period: 1s}"))
    with GpioBoard(spec, simulate=True, pin_factory=factory) as board:
        result = board.run(spec.commands["read"].gpio, {})  # type: ignore[arg-type]
    assert 0.2 <= result["distance"] <= 0.7
    moving = _distance_function({"range": (0.3, 0.6), "period": 1.0})
    assert all(0.3 <= moving() <= 0.6 for _ in range(100))


@pytest.mark.filterwarnings("ignore::gpiozero.DistanceSensorNoEcho")
def test_distance_read_without_echo_times_out(tmp_path: Path, factory: MockFactory) -> None:
    spec = spec_of(tmp_path, RANGE.replace(", SIM", ""))
    expected = r"distance sensor 'range': no reading within 0\.2 s"
    with (
        GpioBoard(spec, pin_factory=factory) as board,  # mock pins, nobody answers
        pytest.raises(GpioError, match=expected),
    ):
        board.run(GpioActionSpec("range", "read"), {"timeout": 0.2})


def _capture_thread_exceptions(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    caught: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: caught.append(args.exc_value))
    return caught


def test_close_stops_sampling_before_releasing_the_trigger(
    tmp_path: Path, factory: MockFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gpiozero's DistanceSensor.close() releases the trigger before stopping its sampling
    # ("fill") thread: a sample in progress then fails on the missing trigger. Hold one sample
    # inside the trigger pulse until the sampling is told to stop, then close.
    caught = _capture_thread_exceptions(monkeypatch)
    spec = spec_of(tmp_path, RANGE.replace("SIM", "simulate: {distance: 0.42}"))
    board = GpioBoard(spec, simulate=True, pin_factory=factory)
    sensor = board.objects["range"]
    stopping = sensor._queue.stopping
    sampling = threading.Event()

    def held_distance() -> float:
        sampling.set()
        stopping.wait(WAIT)
        return 0.42

    sensor.trigger.distance = held_distance
    assert sampling.wait(WAIT)
    board.close()
    assert caught == []


def test_distance_board_starts_and_stops_cleanly(
    tmp_path: Path, factory: MockFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    caught = _capture_thread_exceptions(monkeypatch)
    spec = spec_of(tmp_path, RANGE.replace("SIM", "simulate: {range: [0.3, 0.6], period: 1s}"))
    for _ in range(10):
        with GpioBoard(spec, simulate=True, pin_factory=factory) as board:
            # a reading comes back (its accuracy, which gpiozero's mock echo timing sets, is
            # test_simulated_range_moves_within_its_bounds's business)
            assert board.run(GpioActionSpec("range", "read"), {})["distance"] > 0
    assert caught == []


# --- simulation ----------------------------------------------------------------------------

SIMULATED = """\
device: sim
states: [idle]
gpio:
  motor_up: {kind: digital_output, pin: 5}
  motor_down: {kind: digital_output, pin: 6}
  held: {kind: button, pin: 27, simulate: {pressed: true}}
  ticker: {kind: button, pin: 22, simulate: {every: 50ms, hold: 20ms}}
  top:
    kind: digital_input
    pin: 20
    simulate: {on_when: motor_up, after: 30ms, off_when: motor_down}
commands:
  up: {gpio: {object: motor_up, action: "on"}}
"""


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[GpioBoard]:
    with GpioBoard(spec_of(tmp_path, SIMULATED), simulate=True) as board:
        yield board


def test_simulation_uses_its_own_mock_factory(tmp_path: Path) -> None:
    default = Device.pin_factory
    with GpioBoard(spec_of(tmp_path, SIMULATED), simulate=True) as board:
        assert isinstance(board.pin_factory, MockFactory)
        assert board.objects["held"].pin_factory is board.pin_factory
    assert Device.pin_factory is default  # the global default factory is never touched


def test_simulation_needs_a_mock_factory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MockFactory"):
        GpioBoard(spec_of(tmp_path, SIMULATED), simulate=True, pin_factory=object())


def test_simulated_initial_press(sim: GpioBoard) -> None:
    assert act(sim, "held", "read") == {"pressed": True}
    assert pin(sim, "held").state is False  # pulled up: pressed reads low


def test_simulated_periodic_presses(sim: GpioBoard) -> None:
    ticker = sim.objects["ticker"]
    assert ticker.wait_for_press(timeout=WAIT)
    assert ticker.wait_for_release(timeout=WAIT)
    assert ticker.wait_for_press(timeout=WAIT)


def test_simulated_input_follows_outputs(sim: GpioBoard) -> None:
    top = sim.objects["top"]
    assert not top.is_active
    act(sim, "motor_up", "on")
    assert top.wait_for_active(timeout=WAIT)
    act(sim, "motor_up", "off")
    assert top.is_active  # latched: the door stays up
    act(sim, "motor_down", "on")
    assert top.wait_for_inactive(timeout=WAIT)


def test_close_releases_the_pins(tmp_path: Path, factory: MockFactory) -> None:
    spec = spec_of(tmp_path, BENCH)
    board = GpioBoard(spec, pin_factory=factory)
    board.close()
    board.close()  # idempotent
    assert board.objects == {}
    with pytest.raises(GpioError, match="closed"):
        act(board, "led", "on")
    with GpioBoard(spec, pin_factory=factory) as again:  # the pins are free again
        assert act(again, "led", "on") == {"value": 1}


def test_shipped_demo_board(factory: MockFactory) -> None:
    spec = load_device(CONFIG / "demo.yaml")
    with GpioBoard(spec, simulate=True, pin_factory=factory) as board:
        assert board.run(spec.commands["led_on"].gpio, {}) == {"value": 1}  # type: ignore[arg-type]
        assert pin(board, "led").state is True
        assert board.run(spec.commands["read_button"].gpio, {}) == {"pressed": False}  # type: ignore[arg-type]
        distance = board.run(spec.commands["read_sensor"].gpio, {})["distance"]  # type: ignore[arg-type]
        assert 0.1 <= distance <= 1.6


# --- the shipped handlers ------------------------------------------------------------------


class Ctx:
    """What the server hands a handler (the interface documented in docs/devices.md)."""

    def __init__(self, gpio: Any, on_sleep: Callable[[Ctx], None] | None = None) -> None:
        self.device = "test"
        self.command = "test"
        self.gpio = gpio
        self.log = logging.getLogger("test.handler")
        self.reports: list[tuple[float, str]] = []
        self.sleeps = 0
        self._cancel = threading.Event()
        self._on_sleep = on_sleep

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def progress(self, fraction: float, message: str = "") -> None:
        self.reports.append((fraction, message))

    def sleep(self, seconds: float) -> bool:
        self.sleeps += 1
        if self._on_sleep is not None:
            self._on_sleep(self)
        return not self._cancel.wait(seconds)


@pytest.fixture
def door(factory: MockFactory) -> Iterator[tuple[DeviceSpec, GpioBoard]]:
    spec = load_device(CONFIG / "door.yaml")
    with GpioBoard(spec, pin_factory=factory) as board:  # not simulated: the test drives pins
        pin(board, "limit_closed").drive_high()  # the door starts closed
        yield spec, board


def handler(spec: DeviceSpec, command: str) -> Callable[..., Any]:
    func = resolve_handlers(spec).get(command)
    assert func is not None
    return func


def test_door_opens_until_the_limit_switch(door: tuple[DeviceSpec, GpioBoard]) -> None:
    spec, board = door

    def move(ctx: Ctx) -> None:
        assert pin(board, "motor_up").state is True and pin(board, "motor_down").state is False
        pin(board, "limit_closed").drive_low()  # the door leaves the bottom ...
        if ctx.sleeps == 2:
            pin(board, "limit_open").drive_high()  # ... and reaches the top

    ctx = Ctx(board.objects, move)
    result = handler(spec, "open")(ctx, max_travel=5)
    assert result["position"] == "open" and ctx.sleeps == 2
    assert pin(board, "motor_up").state is False  # motor off again
    assert handler(spec, "position")(ctx) == {"open": True, "closed": False}


def test_door_jam_raises_and_stops_the_motor(door: tuple[DeviceSpec, GpioBoard]) -> None:
    spec, board = door

    def leave_bottom(ctx: Ctx) -> None:
        pin(board, "limit_closed").drive_low()

    with pytest.raises(RuntimeError, match=r"the door is not open after 0.2 s: jammed"):
        handler(spec, "open")(Ctx(board.objects, leave_bottom), max_travel=0.2)
    assert pin(board, "motor_up").state is False


def test_door_that_does_not_move(
    door: tuple[DeviceSpec, GpioBoard], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, board = door
    monkeypatch.setattr(sys.modules[handler(spec, "open").__module__], "LEAVE_TIME", 0.1)
    with pytest.raises(RuntimeError, match=r"did not move within 0\.1 s"):
        handler(spec, "open")(Ctx(board.objects), max_travel=5)
    assert pin(board, "motor_up").state is False


def test_door_cancel_stops_the_motor(door: tuple[DeviceSpec, GpioBoard]) -> None:
    spec, board = door
    result = handler(spec, "open")(Ctx(board.objects, Ctx.cancel), max_travel=5)
    assert result["cancelled"] is True and result["position"] == "between"
    assert pin(board, "motor_up").state is False


def test_door_reset_drives_it_closed(door: tuple[DeviceSpec, GpioBoard]) -> None:
    spec, board = door
    pin(board, "limit_closed").drive_low()  # stuck half-way

    def arrive(ctx: Ctx) -> None:
        assert pin(board, "motor_down").state is True
        pin(board, "limit_closed").drive_high()

    assert handler(spec, "reset")(Ctx(board.objects, arrive))["position"] == "closed"
    assert pin(board, "motor_down").state is False
    pin(board, "limit_open").drive_high()  # both switches closed: wiring fault
    with pytest.raises(RuntimeError, match="both limit switches"):
        handler(spec, "reset")(Ctx(board.objects))


@pytest.fixture
def demo(factory: MockFactory) -> Iterator[tuple[DeviceSpec, GpioBoard]]:
    spec = load_device(CONFIG / "demo.yaml")
    with GpioBoard(spec, simulate=True, pin_factory=factory) as board:
        yield spec, board


def test_demo_calibrate_reports_progress(demo: tuple[DeviceSpec, GpioBoard]) -> None:
    spec, board = demo
    ctx = Ctx(board.objects)
    result = handler(spec, "calibrate")(ctx, steps=3, delay=0)
    assert result["steps"] == 3 and isinstance(result["offset"], float)
    assert ctx.reports == [(1 / 3, "step 1/3"), (2 / 3, "step 2/3"), (1.0, "step 3/3")]
    assert pin(board, "led").state is False


def test_demo_calibrate_stops_when_cancelled(demo: tuple[DeviceSpec, GpioBoard]) -> None:
    spec, board = demo

    def cancel_second(ctx: Ctx) -> None:
        if ctx.sleeps == 2:
            ctx.cancel()

    ctx = Ctx(board.objects, cancel_second)
    assert handler(spec, "calibrate")(ctx, steps=50, delay=0)["steps"] == 1
    assert len(ctx.reports) == 1


def test_demo_selftest_and_reset(demo: tuple[DeviceSpec, GpioBoard]) -> None:
    spec, board = demo
    ctx = Ctx(board.objects)
    assert handler(spec, "selftest")(ctx, fail=False) == {"ok": True}
    with pytest.raises(RuntimeError, match="fail=true"):
        handler(spec, "selftest")(ctx, fail=True)
    assert handler(spec, "reset")(ctx) == {"ok": True}
