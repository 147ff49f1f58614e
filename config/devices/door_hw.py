"""Handlers of the garage door (config/devices/door.yaml).

Each handler gets ``ctx`` (``ctx.gpio``: the gpiozero objects by name, ``ctx.sleep``: an
interruptible wait that returns False once the command is cancelled, ``ctx.progress``,
``ctx.log``). The motor is always switched off on the way out, whatever happens.
"""

from __future__ import annotations

import time
from typing import Any

POLL = 0.05  #: seconds between two looks at the limit switches
LEAVE_TIME = 2.0  #: seconds the door may take to leave the limit switch it starts on


class DoorJammed(RuntimeError):
    """The door did not reach (or leave) a limit switch in time."""


def _stop(ctx: Any) -> None:
    ctx.gpio["motor_up"].off()
    ctx.gpio["motor_down"].off()


def _travel(ctx: Any, direction: str, max_travel: float) -> dict[str, Any]:
    """Run the motor towards ``direction`` ("open"/"closed") until its limit switch closes.

    Raises DoorJammed when the start switch is not left within LEAVE_TIME or the target switch
    not reached within ``max_travel`` seconds. Returns early (motor off) when cancelled.
    """
    motor = ctx.gpio["motor_up" if direction == "open" else "motor_down"]
    target = ctx.gpio["limit_open" if direction == "open" else "limit_closed"]
    start = ctx.gpio["limit_closed" if direction == "open" else "limit_open"]
    if target.is_active and not start.is_active:
        return {"travel": 0.0, "position": direction}
    _stop(ctx)  # never both relays at once
    began = time.monotonic()
    next_report = began + 1.0
    motor.on()
    try:
        while not target.is_active or start.is_active:
            elapsed = time.monotonic() - began
            if start.is_active and elapsed > LEAVE_TIME:
                raise DoorJammed(f"the door did not move within {LEAVE_TIME:g} s (motor or relay?)")
            if elapsed > max_travel:
                raise DoorJammed(f"the door is not {direction} after {max_travel:g} s: jammed")
            if not ctx.sleep(POLL):
                ctx.log.warning("%s cancelled after %.1f s; motor stopped", direction, elapsed)
                return {"travel": round(elapsed, 2), "position": "between", "cancelled": True}
            now = time.monotonic()
            if now >= next_report:
                ctx.progress(min(elapsed / max_travel, 0.99), f"moving, {elapsed:.0f} s")
                next_report = now + 1.0
    finally:
        motor.off()
    return {"travel": round(time.monotonic() - began, 2), "position": direction}


def open(ctx: Any, max_travel: float = 15.0) -> dict[str, Any]:
    """Open the door."""
    return _travel(ctx, "open", max_travel)


def close(ctx: Any, max_travel: float = 15.0) -> dict[str, Any]:
    """Close the door."""
    return _travel(ctx, "closed", max_travel)


def reset(ctx: Any) -> dict[str, Any]:
    """Stop the motor and bring the door to its closed position (where the machine goes)."""
    _stop(ctx)
    if ctx.gpio["limit_open"].is_active and ctx.gpio["limit_closed"].is_active:
        raise DoorJammed("both limit switches are closed: check the switches and their wiring")
    return _travel(ctx, "closed", 25.0)


def position(ctx: Any) -> dict[str, Any]:
    """Where the limit switches say the door is."""
    return {
        "open": bool(ctx.gpio["limit_open"].is_active),
        "closed": bool(ctx.gpio["limit_closed"].is_active),
    }
