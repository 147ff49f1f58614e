"""statelink state machines (pure): config loading and validation, device and workflow machines,
diagrams. Nothing here opens a socket, starts a thread, or imports :mod:`controller`.
"""

from __future__ import annotations

from pathlib import Path

from .source import ConfigError, ConfigErrors, load_yaml


def config_kind(path: str | Path) -> str:
    """``"device"`` or ``"workflow"``, from the file's top-level keys.

    A device config has a top-level ``device`` key; anything else is read as a workflow (whose
    loader then reports what is wrong). Raises :class:`ConfigErrors` for unreadable YAML.
    """
    data = load_yaml(path)
    if isinstance(data, dict) and "device" in data:
        return "device"
    return "workflow"


__all__ = ["ConfigError", "ConfigErrors", "config_kind"]
