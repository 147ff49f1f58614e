""":class:`DeviceMachine`, a device's live state: a ``transitions`` machine running the spec's
transition list (:attr:`DeviceSpec.transitions`), and :class:`CommandNotAllowed`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from transitions import Machine

from .spec import STATE_COMMAND, DeviceSpec


def not_allowed_message(method: str, state: str, allowed: Sequence[str]) -> str:
    """The one wording of "this command cannot start in this state" (the server's
    ``not_allowed`` error says exactly this)."""
    return f"{method} is not allowed in state {state!r} (allowed in: {', '.join(allowed)})"


class CommandNotAllowed(Exception):
    """``command`` is not allowed in ``state``; ``allowed`` lists the states where it is.
    ``str()`` is :func:`not_allowed_message`."""

    def __init__(self, device: str, state: str, allowed: list[str], command: str) -> None:
        super().__init__(not_allowed_message(f"{device}.{command}", state, allowed))
        self.device = device
        self.state = state
        self.allowed = allowed
        self.command = command


class _Model:
    """The transitions model: ``state`` and each running command's origin state."""

    state: str

    def __init__(self) -> None:
        self.origins: dict[str, str] = {}


def _origin_is(command: str, origin: str) -> Callable[[Any], bool]:
    return lambda event: bool(event.model.origins.get(command) == origin)


def _remember_origin(command: str) -> Callable[[Any], None]:
    def remember(event: Any) -> None:
        event.model.origins[command] = event.transition.source

    return remember


class DeviceMachine:
    """One device's live state, a transitions.Machine built from the spec. Not thread-safe
    (the server drives it from one thread).

    Each command has five triggers: ``begin_<cmd>`` (from its allowed states to ``running``),
    ``succeed_<cmd>`` (to ``to``, or back to the origin), ``fail_<cmd>`` (to the fault state,
    or back to the origin), ``cancel_<cmd>`` (it never started: back to the origin) and
    ``interrupt_<cmd>`` (cancelled halfway: to its ``cancelled`` state, else the fault state,
    else the origin). ``on_change(state, previous, command)`` is called after every actual
    state change, in order.
    """

    def __init__(
        self, spec: DeviceSpec, on_change: Callable[[str, str, str], None] | None = None
    ) -> None:
        self.spec = spec
        self._on_change = on_change
        self._model = _Model()
        self._command_of: dict[str, str] = {}
        transitions: list[dict[str, Any]] = []
        for t in spec.transitions:
            trigger = f"{t.event}_{t.command}"
            self._command_of[trigger] = t.command
            # dest None: an internal transition (the state does not change)
            edge: dict[str, Any] = {
                "trigger": trigger,
                "source": t.source,
                "dest": t.dest if t.dest != t.source else None,
            }
            if t.event == "begin":
                edge["before"] = _remember_origin(t.command)
            if t.origin is not None:
                edge["conditions"] = [_origin_is(t.command, t.origin)]
            transitions.append(edge)
        self._machine = Machine(
            model=self._model,
            states=list(spec.states),
            transitions=transitions,
            initial=spec.initial,
            auto_transitions=False,
            send_event=True,
            after_state_change=self._changed,
            name=f"device {spec.name}",
        )

    def _changed(self, event: Any) -> None:
        source, dest = event.transition.source, event.transition.dest
        if dest is None or dest == source:
            return
        if self._on_change is not None:
            self._on_change(dest, source, self._command_of.get(event.event.name, event.event.name))

    @property
    def state(self) -> str:
        """The current state."""
        return self._model.state

    def allowed(self, command: str) -> bool:
        """Whether ``command`` may begin now (``state`` is always allowed)."""
        if command == STATE_COMMAND:
            return True
        if command not in self.spec.commands:
            return False
        return bool(self._model.may_trigger(f"begin_{command}"))  # type: ignore[attr-defined]

    def begin(self, command: str) -> None:
        """Start ``command``: raise :class:`CommandNotAllowed` (state unchanged) or move to
        its ``running`` state if it declares one. KeyError for an unknown command."""
        if command not in self.spec.commands:
            raise KeyError(command)
        if not self.allowed(command):
            raise CommandNotAllowed(
                self.spec.name, self.state, self.spec.allowed_states(command), command
            )
        self._model.trigger(f"begin_{command}")  # type: ignore[attr-defined]

    def succeed(self, command: str) -> None:
        """The handler succeeded: move to ``to``, or back to the state ``begin`` started from."""
        self._finish("succeed", command)

    def fail(self, command: str) -> None:
        """The handler failed: move to the fault state if declared, else back to the origin."""
        self._finish("fail", command)

    def cancel(self, command: str) -> None:
        """The command was cancelled (or timed out) before its action started: back to the
        origin state (it never acted)."""
        self._finish("cancel", command)

    def interrupt(self, command: str) -> None:
        """The command was cancelled while its handler ran (it acted halfway): to its
        ``cancelled`` state, else the fault state, else back to the origin."""
        self._finish("interrupt", command)

    def enter_fault(self) -> str | None:
        """Put the device in its fault state, outside any command (e.g. its last command was
        cut short by a crash): returns the state it left, or None (no fault state declared,
        or already there). ``on_change`` is not called: the caller says why."""
        fault, previous = self.spec.fault_state, self.state
        if fault is None or previous == fault or self._model.origins:
            return None
        self._machine.set_state(fault, model=self._model)
        return previous

    def _finish(self, verb: str, command: str) -> None:
        if command not in self._model.origins:
            raise RuntimeError(f"{self.spec.name}.{command} was not begun")
        trigger = f"{verb}_{command}"
        # Only another command moving the state meanwhile makes this False; the state is then
        # left as that command set it.
        if self._model.may_trigger(trigger):  # type: ignore[attr-defined]
            self._model.trigger(trigger)  # type: ignore[attr-defined]
        del self._model.origins[command]
