"""What a loaded device config is: :class:`DeviceSpec` and its parts, the device's transition
list (:class:`Transition`, computed once per spec) and its commands as
:class:`~statemachines.catalog.CommandInfo` (catalog, ``rpc.discover``).

Plain frozen dataclasses; :mod:`.loader` builds them, after checking everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from ..catalog import CommandInfo, param_rules
from ..params import ParamSpec, schema_to_json

#: Every device answers ``<device>.state`` itself; no config may declare it.
STATE_COMMAND = "state"

#: What happens to a command: it begins, then exactly one of succeed / fail / cancel /
#: interrupt. ``cancel``: it never started its action (cancelled or timed out while it waited),
#: so it goes back where it began; ``interrupt``: cancelled while its handler ran (halfway).
Event = Literal["begin", "succeed", "fail", "cancel", "interrupt"]


@dataclass(frozen=True)
class GpioObjectSpec:
    """A named GPIO object. ``pins`` maps pin roles (``pin``, or ``echo``/``trigger``) to pin
    numbers or names; ``options`` are gpiozero keyword arguments (defaults filled);
    ``simulate`` is the normalised ``simulate:`` block (durations in seconds) or None."""

    name: str
    kind: str
    pins: dict[str, int | str]
    options: dict[str, Any]
    simulate: dict[str, Any] | None
    line: int
    description: str = ""


@dataclass(frozen=True)
class GpioActionSpec:
    """A command's built-in GPIO action; ``options`` are the arguments fixed in the config."""

    object: str
    action: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HandlerRef:
    """A command's ``handler: module:function``, never imported here (see
    ``controller.handlers``). The module is looked for as a file under ``base_dir`` first
    (None: importable modules only); ``line`` is where the config names it."""

    module: str
    function: str
    base_dir: Path | None
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.function}"


@dataclass(frozen=True)
class CommandSpec:
    """One command. ``allowed_from`` None means every state; ``timeout`` is the effective one
    (the command's, else the device's, else None); exactly one of ``handler_ref``/``gpio`` is
    set. ``cancelled``: the state a command cancelled while its handler runs ends in (None:
    the fault state when declared, else back to where it began)."""

    name: str
    method: str
    allowed_from: tuple[str, ...] | None
    running: str | None
    to: str | None
    timeout: float | None
    params: dict[str, ParamSpec]
    handler_ref: HandlerRef | None
    gpio: GpioActionSpec | None
    description: str = ""
    line: int = 0
    cancelled: str | None = None


@dataclass(frozen=True)
class Transition:
    """One edge of a device's machine: ``event`` of ``command`` moves ``source`` to ``dest``
    (``dest == source``: the state does not change). ``origin`` set: the edge only applies
    when the command began in that state (a command going back where it came from)."""

    command: str
    event: Event
    source: str
    dest: str
    origin: str | None = None


@dataclass(frozen=True)
class DeviceSpec:
    """A loaded, valid device config."""

    name: str
    path: str
    states: tuple[str, ...]
    initial: str
    fault_state: str | None
    timeout: float | None
    commands: dict[str, CommandSpec]
    gpio: dict[str, GpioObjectSpec]
    description: str = ""

    def allowed_states(self, command: str) -> list[str]:
        """The states ``command`` may start in (``"*"`` expanded); KeyError if unknown."""
        if command == STATE_COMMAND:
            return list(self.states)
        allowed = self.commands[command].allowed_from
        return list(self.states) if allowed is None else list(allowed)

    @cached_property
    def transitions(self) -> tuple[Transition, ...]:
        """Every edge of the device's machine, per command in config order, per origin. The
        one list :class:`~.machine.DeviceMachine` runs and :func:`statemachines.graph.device_edges`
        draws.

        A command begins in one of its allowed states (its *origin*) and moves to ``running``
        (or stays). Success moves to ``to``, failure to the fault state (without one: back to
        the origin). Cancelled before its action started (``cancel``), it goes back to the
        origin; cancelled while its handler ran (``interrupt``), to its ``cancelled`` state,
        else the fault state, else the origin.
        """
        out: list[Transition] = []
        for name, cmd in self.commands.items():
            out += _command_transitions(name, cmd, self.allowed_states(name), self.fault_state)
        return tuple(out)

    def command_infos(self) -> list[CommandInfo]:
        """Each command as a :class:`~statemachines.catalog.CommandInfo`, in config order,
        then ``<device>.state`` (which every device answers)."""
        states = tuple(self.states)
        infos = [
            CommandInfo(
                method=cmd.method,
                device=self.name,
                command=name,
                allowed_from=tuple(self.allowed_states(name)),
                states=states,
                running=cmd.running,
                to=cmd.to,
                cancelled=cmd.cancelled,
                timeout=cmd.timeout,
                params=param_rules(schema_to_json(cmd.params)),
                description=cmd.description,
            )
            for name, cmd in self.commands.items()
        ]
        infos.append(
            CommandInfo(
                method=f"{self.name}.{STATE_COMMAND}",
                device=self.name,
                command=STATE_COMMAND,
                allowed_from=states,
                states=states,
                description="the device's current state",
            )
        )
        return infos

    def catalog(self) -> dict[str, CommandInfo]:
        """Wire method -> its :class:`~statemachines.catalog.CommandInfo` (``<device>.state``
        too): what the workflow check needs."""
        return {info.method: info for info in self.command_infos()}

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for ``rpc.discover`` (its commands:
        :meth:`CommandInfo.to_json <statemachines.catalog.CommandInfo.to_json>`)."""
        return {
            "name": self.name,
            "description": self.description,
            "states": list(self.states),
            "initial": self.initial,
            "fault": self.fault_state,
            "timeout": self.timeout,
            "commands": [info.to_json() for info in self.command_infos()],
            "gpio": {
                name: {"kind": obj.kind, **obj.pins, "description": obj.description}
                for name, obj in self.gpio.items()
            },
        }


def _command_transitions(
    name: str, cmd: CommandSpec, origins: list[str], fault: str | None
) -> list[Transition]:
    running, to = cmd.running, cmd.to
    halted = cmd.cancelled or fault  # where an interrupted command ends (None: its origin)
    out: list[Transition] = []
    if running is None:  # the state never leaves the origin but to end
        for o in origins:
            out += [
                Transition(name, "begin", o, o),
                Transition(name, "succeed", o, to or o),
                Transition(name, "cancel", o, o),
                Transition(name, "fail", o, fault or o),
                Transition(name, "interrupt", o, halted or o),
            ]
        return out
    for index, o in enumerate(origins):
        out.append(Transition(name, "begin", o, running))
        if to is None:
            out.append(Transition(name, "succeed", running, o, origin=o))
        elif index == 0:
            out.append(Transition(name, "succeed", running, to))
    out += [Transition(name, "cancel", running, o, origin=o) for o in origins]
    if fault is not None:
        out.append(Transition(name, "fail", running, fault))
    else:
        out += [Transition(name, "fail", running, o, origin=o) for o in origins]
    if halted is not None:
        out.append(Transition(name, "interrupt", running, halted))
    else:
        out += [Transition(name, "interrupt", running, o, origin=o) for o in origins]
    return out
