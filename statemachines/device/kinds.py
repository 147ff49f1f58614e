"""The built-in GPIO kinds: one :class:`GpioKind` record per kind, in :data:`GPIO_KINDS`.

A record is everything statelink knows about a kind: the gpiozero class (by *name*: gpiozero
is never imported here, ``controller.gpio`` looks the class up), whether its pins are PWM, its
pins, options (gpiozero keyword arguments), actions (name -> argument specs) and ``simulate:``
keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..params import ParamSpec

#: How ``controller.gpio`` drives a kind: plain or PWM outputs, inputs, the distance sensor,
#: the servo.
Family = Literal["output", "input", "distance", "servo"]


@dataclass(frozen=True)
class GpioKind:
    """A built-in GPIO object kind.

    ``gpiozero_class`` names the gpiozero class built for it; ``pwm`` says whether its pins
    are PWM (and its value a float); ``options`` are gpiozero keyword arguments; ``actions``
    map action name -> argument specs; ``simulate`` lists the keys of its ``simulate:`` block
    (None: the kind is not simulated).
    """

    name: str
    gpiozero_class: str
    family: Family
    pins: tuple[str, ...]
    options: dict[str, ParamSpec]
    actions: dict[str, dict[str, ParamSpec]]
    pwm: bool = False
    simulate: tuple[str, ...] | None = None

    @property
    def output(self) -> bool:
        """Whether the kind drives a pin (a simulated input may follow it: ``on_when``)."""
        return self.family in ("output", "servo")


def _p(
    name: str,
    type: str,
    *,
    min: float | None = None,
    max: float | None = None,
    default: Any = None,
    required: bool | None = None,
    description: str = "",
) -> ParamSpec:
    return ParamSpec(
        name=name,
        type=type,
        min=min,
        max=max,
        required=(default is None) if required is None else required,
        default=default,
        description=description,
    )


def _specs(*specs: ParamSpec) -> dict[str, ParamSpec]:
    return {spec.name: spec for spec in specs}


#: Option, argument and simulate keys given as durations ("200ms", "2s") or plain seconds.
DURATION_KEYS = frozenset(
    {
        "on_time", "off_time", "fade_in_time", "fade_out_time", "timeout", "bounce_time",
        "min_pulse_width", "max_pulse_width", "frame_width", "every", "hold", "after", "period",
    }
)  # fmt: skip

_TIMES = _p(
    "times",
    "integer",
    min=1,
    max=100000,
    required=False,
    description="how many times (absent: forever)",
)
_WAIT = _p("wait", "boolean", default=False, description="block until finished (needs times)")


def _blink(pwm: bool) -> dict[str, ParamSpec]:
    specs = [
        _p("on_time", "number", min=0.01, max=3600, default=0.5, description="seconds on"),
        _p("off_time", "number", min=0.01, max=3600, default=0.5, description="seconds off"),
    ]
    if pwm:
        specs += [
            _p("fade_in_time", "number", min=0, max=3600, default=0.0),
            _p("fade_out_time", "number", min=0, max=3600, default=0.0),
        ]
    return _specs(*specs, _TIMES, _WAIT)


_DIGITAL_OUT_OPTIONS = _specs(
    _p("active_high", "boolean", default=True),
    _p("initial_value", "boolean", default=False),
)
_DIGITAL_OUT_ACTIONS = {"on": {}, "off": {}, "toggle": {}, "blink": _blink(False), "read": {}}
_PWM_OUT_OPTIONS = _specs(
    _p("active_high", "boolean", default=True),
    _p("initial_value", "number", min=0, max=1, default=0.0),
    _p("frequency", "integer", min=1, max=100000, default=100),
)
_PWM_OUT_ACTIONS = {
    "on": {},
    "off": {},
    "toggle": {},
    "set": _specs(_p("value", "number", min=0, max=1, description="duty cycle 0..1")),
    "blink": _blink(True),
    "pulse": _specs(
        _p("fade_in_time", "number", min=0.01, max=3600, default=1.0),
        _p("fade_out_time", "number", min=0.01, max=3600, default=1.0),
        _TIMES,
        _WAIT,
    ),
    "read": {},
}
_INPUT_OPTIONS = (
    _p("active_state", "boolean", required=False, description="only with pull_up: null"),
    _p("bounce_time", "number", min=0, max=10, required=False),
)
_INPUT_SIMULATE = ("every", "hold", "on_when", "after", "off_when")
_WAIT_TIMEOUT = _p("timeout", "number", min=0.001, max=3600, default=10.0)


def _input(name: str, gpiozero_class: str, state: str, pull_up: bool) -> GpioKind:
    return GpioKind(
        name=name,
        gpiozero_class=gpiozero_class,
        family="input",
        pins=("pin",),
        options=_specs(_p("pull_up", "boolean", default=pull_up), *_INPUT_OPTIONS),
        actions={"read": {}, "wait": _specs(_p(state, "boolean", default=True), _WAIT_TIMEOUT)},
        simulate=(state, *_INPUT_SIMULATE),
    )


_KINDS = (
    GpioKind(
        "digital_output", "DigitalOutputDevice", "output", ("pin",),
        _DIGITAL_OUT_OPTIONS, _DIGITAL_OUT_ACTIONS,
    ),
    GpioKind("led", "LED", "output", ("pin",), _DIGITAL_OUT_OPTIONS, _DIGITAL_OUT_ACTIONS),
    GpioKind(
        "pwm_output", "PWMOutputDevice", "output", ("pin",),
        _PWM_OUT_OPTIONS, _PWM_OUT_ACTIONS, pwm=True,
    ),
    GpioKind("pwm_led", "PWMLED", "output", ("pin",), _PWM_OUT_OPTIONS, _PWM_OUT_ACTIONS, pwm=True),
    _input("digital_input", "DigitalInputDevice", "active", pull_up=False),
    _input("button", "Button", "pressed", pull_up=True),
    GpioKind(
        name="distance_sensor",
        gpiozero_class="DistanceSensor",
        family="distance",
        pins=("echo", "trigger"),
        options=_specs(
            _p("max_distance", "number", min=0.01, max=10, default=1.0, description="metres"),
            _p("queue_len", "integer", min=1, max=50, default=9),
        ),
        actions={"read": _specs(_p("timeout", "number", min=0.01, max=60, default=2.0))},
        simulate=("distance", "range", "period"),
    ),
    GpioKind(
        name="servo",
        gpiozero_class="Servo",
        family="servo",
        pins=("pin",),
        options=_specs(
            _p("initial_value", "number", min=-1, max=1, default=0.0),
            _p("min_pulse_width", "number", min=0.0001, max=0.1, default=0.001),
            _p("max_pulse_width", "number", min=0.0001, max=0.1, default=0.002),
            _p("frame_width", "number", min=0.001, max=0.5, default=0.02),
        ),
        actions={
            "set": _specs(_p("value", "number", min=-1, max=1, description="position -1..1")),
            "min": {},
            "mid": {},
            "max": {},
            "detach": {},
            "read": {},
        },
        pwm=True,
    ),
)  # fmt: skip

#: Kind name -> its record, in the order the docs list them.
GPIO_KINDS: dict[str, GpioKind] = {kind.name: kind for kind in _KINDS}
