"""statelink state machines (pure): config loading and validation, device and workflow machines,
diagrams. Nothing here opens a socket, starts a thread, or imports :mod:`controller`.

Imports are lazy so that the client (which only needs :mod:`statemachines.errorkinds`) does not
pay for YAML and ``transitions`` at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def config_kind(path: str | Path) -> str:
    """``"device"`` or ``"workflow"``, from the file's top-level keys.

    A device config has a top-level ``device`` key; anything else is read as a workflow (whose
    loader then reports what is wrong). Raises :class:`ConfigErrors` for unreadable YAML.
    """
    from .source import load_yaml

    data = load_yaml(path)
    if isinstance(data, dict) and "device" in data:
        return "device"
    return "workflow"


def __getattr__(name: str) -> Any:
    if name in ("ConfigError", "ConfigErrors"):
        from . import source

        return getattr(source, name)
    raise AttributeError(f"module 'statemachines' has no attribute {name!r}")


__all__ = ["ConfigError", "ConfigErrors", "config_kind"]
