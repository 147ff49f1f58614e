"""The built-in GPIO actions of device configs, through gpiozero (real pins or its MockFactory).

:class:`GpioBoard` builds the gpiozero objects a :class:`~statemachines.device.DeviceSpec`
declares and runs the commands' ``gpio:`` actions on them. With ``simulate=True`` every object
lives on gpiozero's ``MockFactory`` (passed to each object as ``pin_factory``; the global
default factory is never touched) and the inputs' ``simulate:`` blocks drive the mock pins, so
a board behaves plausibly with no hardware. gpiozero is imported lazily: importing
``controller`` stays fast.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType, TracebackType
from typing import Any

from statemachines.device import GPIO_KINDS, DeviceSpec, GpioActionSpec, GpioObjectSpec
from statemachines.params import ParamError, validate_params

SPEED_OF_SOUND = 343.26  #: m/s, the value gpiozero's DistanceSensor uses
SIM_TICK = 0.01  #: seconds between two steps of the input simulation


class GpioError(RuntimeError):
    """A GPIO action could not be done (e.g. a distance sensor gave no echo in time)."""


@functools.cache
def _ranging_pin_class() -> Any:
    """A gpiozero ``MockTriggerPin`` whose echo lasts as long as a distance function says."""
    from gpiozero.pins.mock import MockTriggerPin

    class RangingTriggerPin(MockTriggerPin):
        def __init__(
            self, factory: Any, info: Any, echo_pin: Any = None, distance: Any = None
        ) -> None:
            super().__init__(factory, info, echo_pin=echo_pin)
            self.distance: Callable[[], float] = distance or (lambda: 0.5)

        def _set_state(self, value: Any) -> None:
            if value:
                self.echo_time = 2.0 * self.distance() / SPEED_OF_SOUND
            super()._set_state(value)

    return RangingTriggerPin


def _distance_function(sim: Mapping[str, Any]) -> Callable[[], float]:
    """Fixed ``distance``, or a target moving back and forth over ``range`` each ``period``."""
    if "distance" in sim:
        fixed = float(sim["distance"])
        return lambda: fixed
    low, high = sim["range"]
    period = float(sim["period"])

    def moving() -> float:
        phase = (time.monotonic() % period) / period
        return float(low + (high - low) * (1.0 - abs(2.0 * phase - 1.0)))

    return moving


class _InputSimulation:
    """Drives one simulated input's mock pin from its ``simulate:`` block."""

    def __init__(self, device: Any, spec: GpioObjectSpec, outputs: Mapping[str, Any]) -> None:
        sim = spec.simulate or {}
        pull_up = spec.options.get("pull_up")
        self.active_high = (
            (not pull_up) if pull_up is not None else bool(spec.options["active_state"])
        )
        self.pin = device.pin
        self.latched = bool(sim.get("active", False))
        self.every: float | None = sim.get("every")
        self.hold = float(sim.get("hold", 0.2))
        self.on_when = outputs.get(sim["on_when"]) if "on_when" in sim else None
        self.off_when = outputs.get(sim["off_when"]) if "off_when" in sim else None
        self.after = float(sim.get("after", 1.0))
        now = time.monotonic()
        self.next_pulse = now + self.every if self.every else None
        self.release_at: float | None = None
        self.on_since: float | None = None
        self.drive(self.latched)

    @property
    def ticking(self) -> bool:
        return self.every is not None or self.on_when is not None or self.off_when is not None

    def drive(self, active: bool) -> None:
        if active == self.active_high:
            self.pin.drive_high()
        else:
            self.pin.drive_low()

    def tick(self, now: float) -> None:
        if self.on_when is not None:
            if self.on_when.is_active:
                self.on_since = now if self.on_since is None else self.on_since
                if now - self.on_since >= self.after:
                    self.latched = True
            else:
                self.on_since = None
        if self.off_when is not None and self.off_when.is_active:
            self.latched = False
        pulsing = False
        if self.every is not None and self.next_pulse is not None:
            if now >= self.next_pulse:
                self.release_at = now + self.hold
                while self.next_pulse <= now:
                    self.next_pulse += self.every
            pulsing = self.release_at is not None and now < self.release_at
        self.drive(self.latched or pulsing)


def _stop_sampling(device: Any) -> None:
    """Stop and join a gpiozero device's background sampling thread (the ``fill`` thread of a
    ``SmoothedInputDevice``, e.g. a DistanceSensor) before the device is closed.

    gpiozero's ``DistanceSensor.close()`` releases the trigger pin *before* it stops that thread,
    so a sample in progress fails on the released trigger (``'NoneType' object has no attribute
    'pin'``) and the thread dies with a traceback. Stopped first, nothing can race the close.
    """
    queue = getattr(device, "_queue", None)
    if queue is None:
        return
    try:
        queue.stop()  # sets its stop event and joins (bounded by gpiozero: 10 s)
    except Exception:  # noqa: S110 - never started, or already gone: nothing to stop
        pass


class GpioBoard:
    """The gpiozero objects of one device. simulate=True uses gpiozero's MockFactory (never
    the global default factory: pass pin_factory= to each object).

    ``pin_factory`` None lets gpiozero choose (lgpio on a Pi), or is a fresh ``MockFactory``
    when simulating (a factory given with ``simulate=True`` must be a ``MockFactory``).
    ``run`` may be called from worker threads; ``close`` releases the pins and stops the
    simulation thread.
    """

    def __init__(
        self, spec: DeviceSpec, *, simulate: bool = False, pin_factory: Any = None
    ) -> None:
        from gpiozero.pins.mock import MockFactory

        if simulate and pin_factory is not None and not isinstance(pin_factory, MockFactory):
            raise ValueError("simulate=True needs gpiozero's MockFactory as pin_factory (or None)")
        self.spec = spec
        self.simulate = simulate
        self._own_factory = simulate and pin_factory is None
        self.pin_factory = MockFactory() if self._own_factory else pin_factory
        self._objects: dict[str, Any] = {}
        self._simulations: list[_InputSimulation] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        try:
            for name, obj in spec.gpio.items():
                self._objects[name] = self._make(obj)
            if simulate:
                self._start_simulation()
        except BaseException:
            self.close()
            raise

    @property
    def objects(self) -> Mapping[str, Any]:
        """Name -> gpiozero device (read-only view); handlers get it as ``ctx.gpio``."""
        return MappingProxyType(self._objects)

    # -- building -------------------------------------------------------------------------

    @contextmanager
    def _mock_pin_class(self, pin_class: Any) -> Iterator[None]:
        """On a MockFactory, make new pins of ``pin_class`` (PWM or not) while building."""
        from gpiozero.pins.mock import MockFactory

        factory = self.pin_factory
        if not isinstance(factory, MockFactory):
            yield
            return
        saved = factory.pin_class
        factory.pin_class = pin_class
        try:
            yield
        finally:
            factory.pin_class = saved

    def _make(self, obj: GpioObjectSpec) -> Any:
        import gpiozero
        from gpiozero.pins.mock import MockFactory, MockPin, MockPWMPin

        kind = GPIO_KINDS[obj.kind]
        cls = getattr(gpiozero, kind.gpiozero_class)
        factory = self.pin_factory
        with self._mock_pin_class(MockPWMPin if kind.pwm else MockPin):
            if kind.family != "distance":
                return cls(obj.pins["pin"], **obj.options, pin_factory=factory)
            if self.simulate and isinstance(factory, MockFactory) and obj.simulate:
                echo = factory.pin(obj.pins["echo"])
                factory.pin(
                    obj.pins["trigger"],
                    pin_class=_ranging_pin_class(),
                    echo_pin=echo,
                    distance=_distance_function(obj.simulate),
                )
            with warnings.catch_warnings():
                # "use the pigpio pin factory for more accurate readings": not actionable here
                warnings.simplefilter("ignore", gpiozero.PWMSoftwareFallback)
                return cls(
                    echo=obj.pins["echo"],
                    trigger=obj.pins["trigger"],
                    **obj.options,
                    pin_factory=factory,
                )

    def _start_simulation(self) -> None:
        outputs = {
            n: d for n, d in self._objects.items() if GPIO_KINDS[self.spec.gpio[n].kind].output
        }
        for name, obj in self.spec.gpio.items():
            if obj.simulate is not None and GPIO_KINDS[obj.kind].family == "input":
                self._simulations.append(_InputSimulation(self._objects[name], obj, outputs))
        if any(sim.ticking for sim in self._simulations):
            self._thread = threading.Thread(
                target=self._simulate, name=f"gpio-sim-{self.spec.name}", daemon=True
            )
            self._thread.start()

    def _simulate(self) -> None:
        while not self._stop.wait(SIM_TICK):
            now = time.monotonic()
            for sim in self._simulations:
                try:
                    sim.tick(now)
                except Exception:  # a closed device: the board is shutting down
                    return

    # -- actions --------------------------------------------------------------------------

    def run(self, action: GpioActionSpec, params: Mapping[str, Any] | None = None) -> Any:
        """Run a command's GPIO action with the call's (already validated) params; return a
        JSON-able result. Fixed config arguments and params are merged and checked again
        (ParamError); a failed action raises GpioError (or gpiozero's own error)."""
        if self._closed:
            raise GpioError(f"the GPIO board of {self.spec.name!r} is closed")
        spec = self.spec.gpio[action.object]
        kind = GPIO_KINDS[spec.kind]
        args = validate_params(kind.actions[action.action], {**action.options, **(params or {})})
        device = self._objects[action.object]
        name = action.action
        if kind.family == "input":
            return self._input(spec, device, name, args)
        if kind.family == "distance":
            return {"distance": self._distance(spec, device, args["timeout"])}
        if kind.family == "servo":
            return self._servo(device, name, args)
        return self._output(spec, device, name, args)

    @staticmethod
    def _value(spec: GpioObjectSpec, device: Any) -> Any:
        value = device.value
        return float(value) if GPIO_KINDS[spec.kind].pwm else int(value)

    def _output(self, spec: GpioObjectSpec, device: Any, name: str, args: dict[str, Any]) -> Any:
        if name in ("blink", "pulse"):
            wait = args.pop("wait")
            if wait and args.get("times") is None:
                raise ParamError(
                    "argument 'wait': needs 'times' (an endless blink never finishes)", "wait"
                )
            args["n"] = args.pop("times", None)
            getattr(device, name)(**args, background=not wait)
            return {"value": self._value(spec, device)} if wait else {"blinking": True}
        if name == "set":
            device.value = args["value"]
        elif name in ("on", "off", "toggle"):
            getattr(device, name)()
        return {"value": self._value(spec, device)}

    def _input(self, spec: GpioObjectSpec, device: Any, name: str, args: dict[str, Any]) -> Any:
        if name == "wait":
            wanted = args.get("pressed", args.get("active", True))
            wait = device.wait_for_active if wanted else device.wait_for_inactive
            wait(timeout=args["timeout"])
        if spec.kind == "button":
            return {"pressed": bool(device.is_pressed)}
        return {"value": int(device.value)}

    @staticmethod
    def _servo(device: Any, name: str, args: dict[str, Any]) -> Any:
        if name == "set":
            device.value = args["value"]
        elif name in ("min", "mid", "max", "detach"):
            getattr(device, name)()
        value = device.value
        return {"value": None if value is None else round(float(value), 4)}

    @staticmethod
    def _distance(spec: GpioObjectSpec, device: Any, timeout: float) -> float:
        # gpiozero's `distance` blocks until its sample queue first fills, forever if no echo
        # ever comes; wait for that (bounded) before reading.
        full = getattr(getattr(device, "_queue", None), "full", None)
        if full is not None:
            ready = bool(full.wait(timeout))
        else:  # a gpiozero without the queue internals: read on a helper thread
            box: list[float] = []
            reader = threading.Thread(target=lambda: box.append(device.distance), daemon=True)
            reader.start()
            reader.join(timeout)
            ready = bool(box)
        if not ready:
            raise GpioError(
                f"distance sensor '{spec.name}': no reading within {timeout:g} s "
                f"(check the echo pin {spec.pins['echo']} and trigger pin {spec.pins['trigger']})"
            )
        return round(float(device.distance), 3)

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the simulation and the sampling threads, then release every pin; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for sim in self._simulations:
            # release simulated inputs: a held gpiozero Button makes close() wait its hold_time
            try:
                sim.drive(False)
            except Exception:  # noqa: S112 - closing is best effort
                continue
        for device in self._objects.values():
            _stop_sampling(device)
        for device in reversed(list(self._objects.values())):
            try:
                device.close()
            except Exception:  # noqa: S112 - closing is best effort
                continue
        self._objects.clear()
        if self._own_factory and self.pin_factory is not None:
            self.pin_factory.close()

    def __enter__(self) -> GpioBoard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
