"""Durations in configs: ``500ms``, ``2s``, ``1m``, ``1h`` or a plain number of seconds (parse
and format)."""

from __future__ import annotations

import math
import re

#: seconds per unit; ms divides (700ms is 0.7, not 700 * 0.001 = 0.7000000000000001)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: object) -> float:
    """Return seconds as a float; raise ValueError with a readable reason otherwise.

    >>> parse_duration("500ms"), parse_duration("2s"), parse_duration("1m"), parse_duration(3)
    (0.5, 2.0, 60.0, 3.0)
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 500ms, 2s or 1m, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"a duration must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            number, unit = float(match.group(1)), match.group(2) or "s"
            return number / 1000.0 if unit == "ms" else number * _UNITS[unit]
    raise ValueError(f"expected a duration like 500ms, 2s or 1m, got {value!r}")


def format_duration(seconds: float) -> str:
    """Seconds as a config would write them.

    >>> format_duration(0.5), format_duration(2), format_duration(90), format_duration(120)
    ('500ms', '2s', '90s', '2m')
    """
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"
