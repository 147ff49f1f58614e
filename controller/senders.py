"""What the workflow runner needs from a transport: one :class:`Sender` per server address.

The runner (:mod:`controller.runner`) only dispatches events to runs. Everything that depends
on how commands reach a server (connecting, the server's in-flight bound, sending, cancelling)
sits behind this interface; :class:`controller.client_sender.ClientSender` implements it over
any client (TCP :class:`~controller.client.Client`, MQTT
:class:`~controller.mqtt.client.MqttClient`).

Threads: ``send`` and ``cancel`` are called on the runner's dispatcher thread and never block;
a sender hands every outcome back through the runner's :class:`Post`, so that the run sees
it on the dispatcher thread too. ``connect`` and ``subscribe(wait=True)`` block and are never
called on the dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from statemachines.addresses import ServerAddress
from statemachines.workflow import WorkflowRun

#: a notification handler: ``handler(params)``, on a transport thread (post, do not block)
NotificationHandler = Callable[[Any], None]


class Post(Protocol):
    """Queue ``fn(*args)`` for the dispatcher thread; thread-safe, never blocks."""

    def __call__(self, fn: Callable[..., object], /, *args: object) -> None: ...


@dataclass(slots=True, eq=False)
class Command:
    """One command a run wants sent. Its outcome goes back to the run as
    ``run.on_reply(token, result, replayed)`` or ``run.on_error(token, kind, code, message,
    data, replayed)``; an outcome that comes after a client-side timeout (which was the
    outcome the run got) goes to ``run.on_late(token, result, error, replayed)``."""

    run: WorkflowRun
    token: int
    server: str  #: the workflow's name of the server (for error messages)
    method: str
    params: Any  #: JSON params, as the run rendered them
    timeout: float
    key: str | None = None  #: the idempotency key (the run's ``command_key``): sent as is


class Sender(Protocol):
    """The runner's link to one server address."""

    @property
    def address(self) -> ServerAddress: ...

    def connect(self) -> None:
        """Connect now if not connected (blocks; never on the dispatcher thread). Raises
        ``OSError`` or :class:`~controller.errors.RpcError` when the server cannot be reached."""

    def subscribe(self, method: str, handler: NotificationHandler, *, wait: bool = True) -> None:
        """Deliver the server's notifications ``method`` to ``handler`` (``rpc.subscribe``);
        a method already subscribed keeps its handler. ``wait=True`` blocks (never on the
        dispatcher thread): connects first and raises as :meth:`connect` does. ``wait=False``
        never blocks: the subscription is made off the calling thread (failures are logged;
        notifications sent before the server has it are not delivered)."""

    def unsubscribe(self, method: str) -> None:
        """Stop delivering ``method`` (``rpc.unsubscribe``); never blocks; any thread."""

    def send(self, command: Command) -> None:
        """Dispatcher thread; never blocks: send now, or once connected or once the server's
        in-flight bound leaves room. The run gets exactly one outcome, posted to the
        dispatcher, unless it has moved on before the command could be sent (then the
        command is dropped unsent)."""

    def cancel(self, run: WorkflowRun, token: int) -> None:
        """Dispatcher thread: ``run`` left command ``token`` (abort, workflow timeout, an
        error route after a client-side timeout): ask the server to stop it if it may still
        run there (in flight, or timed out on the client side and not answered since); a
        command not yet sent is dropped. A client-side timeout alone cancels nothing: the
        run's retry sends the same key, which joins the running execution."""

    def close(self) -> None:
        """Close the connection (any thread); commands in flight end with connection lost."""


__all__ = ["Command", "NotificationHandler", "Post", "Sender"]
