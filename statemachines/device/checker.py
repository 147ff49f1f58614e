"""The base of the device config loader: collects every problem as a located
:class:`~statemachines.source.ConfigError`, and the checks every part of a config shares."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..durations import parse_duration
from ..source import ConfigError, describe_type, suggest
from ..source import line_of as _line_of

#: A gpio object or command name: an identifier.
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def listing(names: Any) -> str:
    """``"a, b, c"``, or ``"none"``: the choices an error message offers."""
    return ", ".join(str(n) for n in names) or "none"


class Checker:
    """Collects the problems found in one config file (``errors``), each at its line."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[ConfigError] = []

    def err(self, line: int, message: str) -> None:
        self.errors.append(ConfigError(self.file, line or 1, message))

    def unknown_keys(self, node: Mapping[Any, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in node:
            if key not in allowed:
                self.err(
                    _line_of(node, key),
                    f"{where}unknown key {key!r} (allowed: {', '.join(allowed)})"
                    f"{suggest(key, allowed)}",
                )

    def duration(self, node: Mapping[Any, Any], key: str, where: str) -> float | None:
        value = node.get(key)
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.err(_line_of(node, key), f"{where}'{key}': {exc}")
            return None

    def text(self, node: Mapping[Any, Any], key: str, where: str) -> str:
        value = node.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            self.err(
                _line_of(node, key), f"{where}'{key}' must be a string, got {describe_type(value)}"
            )
            return ""
        return value.strip()
