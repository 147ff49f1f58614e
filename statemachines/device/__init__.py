"""Devices: a device config names the device, its states and its commands; each command is
an event of the device's state machine and runs a Python handler or a built-in GPIO action.

| module | one job |
|---|---|
| ``kinds`` | the built-in GPIO kinds, one record each (``GPIO_KINDS``) |
| ``spec`` | ``DeviceSpec`` and its parts, the transition list, its ``CommandInfo``s |
| ``checker``, ``gpio_checks``, ``loader`` | config -> ``DeviceSpec``, every problem reported |
| ``machine`` | ``DeviceMachine``, a device's live state; ``CommandNotAllowed`` |

``catalog_from_discover`` is :func:`statemachines.catalog.catalog_from_discover`, re-exported.
Pure: no handler module is imported and gpiozero is never imported here (``controller``
does both).
"""

from __future__ import annotations

from ..catalog import catalog_from_discover
from .kinds import DURATION_KEYS, GPIO_KINDS, GpioKind
from .loader import COMMAND_KEYS, DEVICE_KEYS, load_device, parse_device
from .machine import CommandNotAllowed, DeviceMachine, not_allowed_message
from .spec import (
    STATE_COMMAND,
    CommandSpec,
    DeviceSpec,
    GpioActionSpec,
    GpioObjectSpec,
    HandlerRef,
    Transition,
)

__all__ = [
    "COMMAND_KEYS",
    "DEVICE_KEYS",
    "DURATION_KEYS",
    "GPIO_KINDS",
    "STATE_COMMAND",
    "CommandNotAllowed",
    "CommandSpec",
    "DeviceMachine",
    "DeviceSpec",
    "GpioActionSpec",
    "GpioKind",
    "GpioObjectSpec",
    "HandlerRef",
    "Transition",
    "catalog_from_discover",
    "load_device",
    "not_allowed_message",
    "parse_device",
]
