"""Handlers of the demo device (config/devices/demo.yaml).

A handler is called as ``function(ctx, **params)`` on a worker thread of the server (``async
def`` works too). ``ctx`` gives the device's GPIO objects (``ctx.gpio``), a logger
(``ctx.log``), progress reports (``ctx.progress``) and cancellation (``ctx.cancelled``,
``ctx.sleep``). What it returns (JSON-able) is the command's result; what it raises moves the
device to its fault state and becomes a ``device_fault`` error.
"""

from __future__ import annotations

import random
from typing import Any


def calibrate(ctx: Any, steps: int = 5, delay: float = 0.2) -> dict[str, Any]:
    """Take ``steps`` readings ``delay`` seconds apart; stop early when cancelled."""
    led = ctx.gpio.get("led")
    readings: list[float] = []
    if led is not None:
        led.on()  # lit while calibrating
    try:
        for step in range(1, steps + 1):
            if not ctx.sleep(delay):  # False: cancelled (rpc.cancel or the timeout)
                ctx.log.info("calibration cancelled after %d of %d steps", step - 1, steps)
                break
            readings.append(random.gauss(0.0, 0.01))  # a simulated measurement error
            ctx.progress(step / steps, f"step {step}/{steps}")
    finally:
        if led is not None:
            led.off()
    offset = round(sum(readings) / len(readings), 4) if readings else 0.0
    return {"steps": len(readings), "offset": offset}


def selftest(ctx: Any, fail: bool = False) -> dict[str, Any]:
    """Flash the LED once; raise when asked to, to show what a fault looks like."""
    led = ctx.gpio.get("led")
    if led is not None:
        led.on()
        lit = bool(led.is_lit)
        led.off()
        if not lit:
            raise RuntimeError("self-test failed: the LED did not switch on")
    if fail:
        raise RuntimeError("self-test failed (requested with fail=true)")
    return {"ok": True}


def reset(ctx: Any) -> dict[str, Any]:
    """Leave the fault state with the outputs in their safe state."""
    led = ctx.gpio.get("led")
    if led is not None:
        led.off()
    ctx.log.info("fault cleared")
    return {"ok": True}
