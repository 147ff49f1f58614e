"""Devices served over real loopback sockets: states, params, faults, notifications, progress,
cancellation, serialisation per device, parallelism across devices, and GPIO pin levels on
gpiozero's MockFactory."""

from __future__ import annotations

import queue
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import WAIT, statelink, wait_until

from controller import (
    CancelledError,
    Client,
    CommandServer,
    CommandTimeoutError,
    DeviceFaultError,
    InvalidParamsError,
    NotAllowedError,
)
from controller.devices import add_device
from statemachines import errorkinds as ek
from statemachines.device import load_device

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "config" / "devices" / "demo.yaml"


@pytest.fixture
def demo() -> Iterator[tuple[CommandServer, Client]]:
    server = CommandServer(port=0, grace=0.5)
    add_device(server, load_device(DEMO), simulate=True)
    with server, Client(server.address) as client:
        yield server, client


def _device(tmp_path: Path, name: str, *, hw: str, config: str) -> Any:
    """Load device ``name`` from ``config``, with ``hw`` as its module ``<name>_hw``."""
    (tmp_path / f"{name}_hw.py").write_text(textwrap.dedent(hw))
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(config))
    return load_device(path)


def _lane_device(tmp_path: Path, name: str) -> Path:
    """A device whose `slow` command waits on a gate the test opens."""
    (tmp_path / f"{name}_hw.py").write_text(
        textwrap.dedent("""
        import threading
        gate = threading.Event()
        order = []

        def slow(ctx):
            gate.wait(10)
            order.append("slow")
            return "slow"

        def fast(ctx):
            order.append("fast")
            return "fast"
    """)
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(f"""
        device: {name}
        states: [idle, busy]
        commands:
          slow: {{from: "*", running: busy, handler: {name}_hw:slow, timeout: 20s}}
          fast: {{from: "*", handler: {name}_hw:fast}}
    """)
    )
    return path


def test_command_refused_in_wrong_state_with_documented_error(demo: Any) -> None:
    _, client = demo
    with pytest.raises(NotAllowedError) as refused:
        client.call("demo.reset")
    assert refused.value.code == ek.NOT_ALLOWED
    assert refused.value.data == {
        "device": "demo",
        "state": "idle",
        "allowed": ["fault"],
        "command": "reset",
    }
    assert client.call("demo.state") == {"device": "demo", "state": "idle"}


def test_params_validated_before_the_handler(demo: Any) -> None:
    _, client = demo
    with pytest.raises(InvalidParamsError) as exc:
        client.call("demo.calibrate", {"steps": 500})
    assert exc.value.code == ek.INVALID_PARAMS and "steps" in exc.value.message
    with pytest.raises(InvalidParamsError, match="speed"):
        client.call("demo.calibrate", {"speed": 1})
    with pytest.raises(InvalidParamsError, match="steps"):
        client.call("demo.calibrate", {"steps": "many"})
    assert client.call("demo.state")["state"] == "idle"


def test_fault_then_reset_with_ordered_state_notifications(demo: Any) -> None:
    _, client = demo
    changes: queue.Queue[dict[str, Any]] = queue.Queue()
    client.subscribe("device.state", changes.put)
    assert client.call("demo.calibrate", {"steps": 2, "delay": 0}) == {
        "steps": 2,
        "offset": pytest.approx(0.0, abs=0.1),
    }
    with pytest.raises(DeviceFaultError) as fault:
        client.call("demo.selftest", {"fail": True})
    assert fault.value.code == ek.DEVICE_FAULT and "Traceback" not in fault.value.message
    assert client.call("demo.state")["state"] == "fault"
    with pytest.raises(NotAllowedError):
        client.call("demo.calibrate")
    assert client.call("demo.reset") == {"ok": True}
    seen = [changes.get(timeout=WAIT) for _ in range(4)]
    assert [(c["previous"], c["state"], c["command"]) for c in seen] == [
        ("idle", "calibrating", "calibrate"),
        ("calibrating", "idle", "calibrate"),
        ("idle", "fault", "selftest"),
        ("fault", "idle", "reset"),
    ]
    assert all(c["device"] == "demo" for c in seen)


def test_progress_then_cancel(demo: Any) -> None:
    _, client = demo
    progress: queue.Queue[dict[str, Any]] = queue.Queue()
    client.subscribe("rpc.progress", progress.put)
    future = client.send_command("demo.calibrate", {"steps": 50, "delay": 0.2}, timeout=WAIT)
    first = progress.get(timeout=WAIT)
    assert first["id"] == future.request_id and 0 < first["progress"] <= 1
    assert client.cancel(future).result(WAIT) == {"cancelled": True}
    with pytest.raises(CancelledError) as cancelled:
        future.result(WAIT)
    assert cancelled.value.code == ek.CANCELLED
    assert client.call("demo.state")["state"] == "idle"  # cancelled is not a fault


def test_a_cancelled_command_that_ignores_it_and_overruns_faults_the_device(
    tmp_path: Path,
) -> None:
    """rpc.cancel on a handler that never looks at ctx: the timeout answers the call (with the
    cancelled error the client asked for), and the device faults (its hardware state is
    unknown) instead of going back to where it started while the handler still runs."""
    spec = _device(
        tmp_path,
        "stub",
        hw="""
        import threading
        release = threading.Event()

        def stubborn(ctx):
            release.wait(10)  # ignores ctx.cancelled
            return "late"

        def reset(ctx):
            return "reset"
    """,
        config="""
        device: stub
        states: [idle, busy, fault]
        commands:
          stubborn: {from: [idle], running: busy, to: idle, handler: stub_hw:stubborn,
                     timeout: 500ms}
          reset: {from: [fault], to: idle, handler: stub_hw:reset}
    """,
    )
    server = CommandServer(port=0, workers=2, grace=0.5)
    release = add_device(server, spec).handlers["stubborn"].__globals__["release"]
    with server, Client(server.address) as client:
        try:
            future = client.send_command("stub.stubborn", timeout=WAIT)
            assert client.call("stub.state")["state"] == "busy"
            assert client.cancel(future).result(WAIT) == {"cancelled": True}
            with pytest.raises(CancelledError):
                future.result(WAIT)
            assert client.call("stub.state")["state"] == "fault"
            with pytest.raises(NotAllowedError):
                client.call("stub.stubborn")
        finally:
            release.set()
        assert client.call("stub.reset") == "reset"
        assert client.call("stub.state")["state"] == "idle"


def test_commands_serialised_per_device_parallel_across_devices(tmp_path: Path) -> None:
    spec_a = load_device(_lane_device(tmp_path, "alpha"))
    spec_b = load_device(_lane_device(tmp_path, "beta"))
    server = CommandServer(port=0, workers=4, grace=0.5)
    slow = add_device(server, spec_a).handlers["slow"]
    gate, order = slow.__globals__["gate"], slow.__globals__["order"]
    add_device(server, spec_b)
    with server, Client(server.address) as client:
        try:
            slow = client.send_command("alpha.slow", timeout=WAIT)
            fast = client.send_command("alpha.fast", timeout=WAIT)
            # beta runs while alpha is blocked: devices are parallel
            assert client.call("beta.fast") == "fast"
            assert client.call("alpha.state")["state"] == "busy"
            assert not fast.done()  # queued behind alpha.slow: serialised in arrival order
        finally:
            gate.set()
        assert slow.result(WAIT) == "slow" and fast.result(WAIT) == "fast"
        assert order == ["slow", "fast"]


def test_gpio_pin_levels_follow_commands_over_sockets(demo: Any) -> None:
    server, client = demo
    led = server.devices["demo"].board.objects["led"]
    client.call("demo.led_on")
    assert led.pin.state == 1 and led.is_lit
    client.call("demo.led_off")
    assert led.pin.state == 0
    reading = client.call("demo.read_sensor")
    assert 0 <= reading["distance"] <= 2
    assert isinstance(client.call("demo.read_button")["pressed"], bool)


def test_button_reads_its_pin_level(tmp_path: Path) -> None:
    # the shipped demo simulates presses on its own thread; a copy without that block leaves the
    # button's mock pin to the test alone
    simulated = "    simulate: {pressed: false, every: 5s, hold: 500ms}"
    text = DEMO.read_text()
    assert simulated in text
    (tmp_path / "demo.yaml").write_text(text.replace(simulated, "    # no simulation"))
    (tmp_path / "demo_hw.py").write_text((DEMO.parent / "demo_hw.py").read_text())
    server = CommandServer(port=0, grace=0.5)
    add_device(server, load_device(tmp_path / "demo.yaml"), simulate=True)
    with server, Client(server.address) as client:
        button = server.devices["demo"].board.objects["button"]
        assert client.call("demo.read_button") == {"pressed": False}
        button.pin.drive_low()  # pressed (pull-up wiring)
        assert client.call("demo.read_button") == {"pressed": True}
        button.pin.drive_high()
        assert client.call("demo.read_button") == {"pressed": False}


def test_discover_describes_devices(demo: Any) -> None:
    _, client = demo
    described = client.call("rpc.discover")
    assert "devices" not in described  # OpenRPC: statelink's additions are x- prefixed
    (device,) = described["x-devices"]
    assert device["name"] == "demo" and "calibrating" in device["states"]
    methods = {m["name"]: m for m in described["methods"]}
    assert methods["demo.calibrate"]["x-allowed-states"] == ["idle"]
    assert methods["demo.calibrate"]["x-running"] == "calibrating"
    assert methods["demo.calibrate"]["x-timeout"] == 10
    assert {p["name"] for p in methods["demo.calibrate"]["params"]} == {"steps", "delay"}


@pytest.mark.parametrize(
    "body, message",
    [
        ("device: d\nstates: [a]\ncommands:\n  go: {from: [b], handler: x:y}\n", "unknown state"),
        ("device: d\nstates: [a]\ngpio:\n  l: {kind: lamp, pin: 1}\ncommands: {}\n", "lamp"),
        ("device: d\nstates: [a]\ncommands:\n  go: {from: [a]}\n", "handler"),
        ("device: d\nstates: [a]\ncolour: red\ncommands: {}\n", "colour"),
        ("device: d\nstates: [a\n", "invalid YAML"),
    ],
)
def test_serve_rejects_invalid_device_config_before_binding(
    tmp_path: Path, body: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    # port 1 would need root to bind and is never reached: the config fails first
    result = statelink("serve", "--port", "1", "--device", str(path))
    assert result.returncode == 2, result.stderr
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith(f"{path}:") and message in result.stderr
    assert int(first.split(":")[1]) >= 1


def test_graph_of_a_device_is_mermaid_by_default_and_dot_on_request() -> None:
    mermaid = statelink("graph", str(DEMO))
    assert mermaid.returncode == 0 and "stateDiagram-v2" in mermaid.stdout
    assert "calibrating" in mermaid.stdout
    dot = statelink("graph", str(DEMO), "--format", "dot")
    assert dot.returncode == 0 and dot.stdout.lstrip().startswith("digraph")


def test_a_restarted_server_reopens_gpio_and_faults_a_command_left_running(
    tmp_path: Path,
) -> None:
    spec = _device(
        tmp_path,
        "left",
        hw="""
        import threading
        release = threading.Event()

        def stubborn(ctx):
            release.wait(10)  # ignores ctx.cancelled: still running when the server stops
            return "late"

        def reset(ctx):
            return "reset"
    """,
        config="""
        device: left
        states: [idle, busy, fault]
        gpio:
          led: {kind: led, pin: 17}
        commands:
          stubborn: {from: [idle], running: busy, to: idle, handler: left_hw:stubborn,
                     timeout: 30s}
          light: {from: "*", gpio: {object: led, action: "on"}}
          reset: {from: [fault], to: idle, handler: left_hw:reset}
    """,
    )
    server = CommandServer(port=0, workers=2, grace=0.2)
    runtime = add_device(server, spec, simulate=True)
    release = runtime.handlers["stubborn"].__globals__["release"]
    try:
        with server, Client(server.address, reconnect=False) as client:
            future = client.send_command("left.stubborn", timeout=WAIT)
            assert client.call("left.state")["state"] == "busy"
            server.stop()  # the grace ends with the handler still running
            with pytest.raises(CancelledError):
                future.result(WAIT)
            assert server.devices["left"].board is None  # pins released
            server.start()
            with Client(server.address) as again:
                assert again.call("left.state")["state"] == "fault"  # its outcome is unknown
                assert again.call("left.light") is not None  # GPIO works again
                led = server.devices["left"].board.objects["led"]
                assert led.value == 1
                assert again.call("left.reset") == "reset"
                assert again.call("left.state")["state"] == "idle"
    finally:
        release.set()


def test_stop_lets_a_cancelled_handler_settle_its_device(tmp_path: Path) -> None:
    """A handler that stops when cancelled, but needs a moment to do it safely, leaves its
    device where its `cancelled:` state says (here back where it started), not faulted."""
    spec = _device(
        tmp_path,
        "careful",
        hw="""
        import threading
        started = threading.Event()

        def work(ctx):
            started.set()
            while ctx.sleep(0.01):  # False once cancelled
                pass
            threading.Event().wait(0.1)  # park the hardware safely
            return "parked"
    """,
        config="""
        device: careful
        states: [idle, working, fault]
        commands:
          work: {from: [idle], running: working, to: idle, cancelled: idle,
                 handler: careful_hw:work, timeout: 30s}
    """,
    )
    server = CommandServer(port=0, workers=2, grace=0.1)
    started = add_device(server, spec).handlers["work"].__globals__["started"]
    with server, Client(server.address, reconnect=False) as client:
        future = client.send_command("careful.work", timeout=WAIT)
        assert started.wait(WAIT)
        server.stop()
        with pytest.raises(CancelledError):
            future.result(WAIT)
    assert server.devices["careful"].state == "idle"


# -- before and after the handler starts (issue 11) --------------------------------------------
WAITER_HW = """
import threading
hold = threading.Event()
held = threading.Event()
ran = []

def block(ctx):
    held.set()
    hold.wait(10)
    return "blocked"

def move(ctx):
    ran.append("move")
    return "moved"

def travel(ctx):
    ran.append("travel")
    held.set()
    while ctx.sleep(0.01):  # False once cancelled
        pass
    return "stopped"
"""

WAITER_CONFIG = """
device: {name}
states: [idle, moving, between, fault]
commands:
  block: {{from: "*", handler: {name}_hw:block, timeout: 30s}}
  move: {{from: [idle], running: moving, to: idle, handler: {name}_hw:move, timeout: 300ms}}
  travel: {{from: [idle], running: moving, to: idle, handler: {name}_hw:travel,
           timeout: 30s {cancelled}}}
"""


def _waiters(tmp_path: Path, cancelled: str = "") -> tuple[CommandServer, Any, Any]:
    """One worker: ``blocker.block`` holds it, so ``mover``'s commands wait for it."""
    server = CommandServer(port=0, workers=1)
    blocker = add_device(
        server,
        _device(
            tmp_path,
            "blocker",
            hw=WAITER_HW,
            config=WAITER_CONFIG.format(name="blocker", cancelled=""),
        ),
    )
    mover = add_device(
        server,
        _device(
            tmp_path,
            "mover",
            hw=WAITER_HW,
            config=WAITER_CONFIG.format(name="mover", cancelled=cancelled),
        ),
    )
    return server, blocker.handlers["block"].__globals__, mover


def test_a_command_that_times_out_waiting_for_a_worker_never_runs(tmp_path: Path) -> None:
    server, blocker, mover = _waiters(tmp_path)
    hw = mover.handlers["move"].__globals__
    changes: queue.Queue[dict[str, Any]] = queue.Queue()
    try:
        with server, Client(server.address, reconnect=False) as client:
            client.subscribe("device.state", changes.put)
            blocked = client.send_command("blocker.block", timeout=WAIT)
            assert blocker["held"].wait(WAIT)
            with pytest.raises(CommandTimeoutError) as info:
                client.call("mover.move", timeout=WAIT)
            assert info.value.data["started"] is False
            assert "never ran" in info.value.message
            assert client.call("mover.state") == {
                "device": "mover",
                "state": "idle",  # back where it was: it never acted
                "reason": "timeout",
            }
            blocker["hold"].set()
            assert blocked.result(WAIT) == "blocked"
            assert client.call("mover.move") == "moved"  # the next one runs
            assert client.call("rpc.stats")["late_outcomes"] == 0
    finally:
        blocker["hold"].set()
    assert hw["ran"] == ["move"]  # once: the timed-out one never ran, not even later
    seen = [changes.get(timeout=WAIT) for _ in range(4)]
    assert [(c["previous"], c["state"], c.get("reason")) for c in seen] == [
        ("idle", "moving", None),
        ("moving", "idle", "timeout"),
        ("idle", "moving", None),
        ("moving", "idle", None),
    ]


def test_a_command_cancelled_waiting_for_a_worker_never_runs(tmp_path: Path) -> None:
    server, blocker, mover = _waiters(tmp_path)
    hw = mover.handlers["move"].__globals__
    try:
        with server, Client(server.address, reconnect=False) as client:
            blocked = client.send_command("blocker.block", timeout=WAIT)
            assert blocker["held"].wait(WAIT)
            waiting = client.send_command("mover.travel", timeout=WAIT)
            wait_until(lambda: mover.state == "moving", what="mover to wait for the worker")
            assert client.cancel(waiting).result(WAIT) == {"cancelled": True}
            with pytest.raises(CancelledError) as info:
                waiting.result(WAIT)
            assert info.value.data["started"] is False
            assert client.call("mover.state")["state"] == "idle"  # it never acted
            blocker["hold"].set()
            assert blocked.result(WAIT) == "blocked"
            assert client.call("mover.move") == "moved"
    finally:
        blocker["hold"].set()
    assert hw["ran"] == ["move"]


@pytest.mark.parametrize(
    ("cancelled", "ends_in"),
    [(", cancelled: between", "between"), ("", "fault")],
)
def test_a_command_cancelled_while_it_runs_ends_where_the_config_says(
    tmp_path: Path, cancelled: str, ends_in: str
) -> None:
    """Cancelled halfway: its `cancelled:` state, else fault (it acted, and stopped midway)."""
    server, _, mover = _waiters(tmp_path, cancelled)
    hw = mover.handlers["travel"].__globals__
    with server, Client(server.address, reconnect=False) as client:
        travelling = client.send_command("mover.travel", timeout=WAIT)
        assert hw["held"].wait(WAIT)
        assert client.cancel(travelling).result(WAIT) == {"cancelled": True}
        with pytest.raises(CancelledError) as info:
            travelling.result(WAIT)
        assert "started" not in (info.value.data or {})
        state = client.call("mover.state")
        assert state == {"device": "mover", "state": ends_in, "reason": "cancelled"}
    assert hw["ran"] == ["travel"]
