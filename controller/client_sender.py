"""The runner's :class:`~controller.senders.Sender` for one server address, whatever its
transport: a shared client (a TCP :class:`~controller.client.Client` or a fleet node's
:class:`~controller.mqtt.client.MqttClient`, both :class:`~controller.client_base.BaseClient`),
connected off the dispatcher, behind an in-flight gate. The sender is given how to make its
client (``connect``); everything else is the same for every transport.

- **Connect**: the first command finds the client connected (the runner connects when a run
  starts) or starts one short-lived thread that connects and posts the outcome back; commands
  sent meanwhile wait for it. An unreachable server never stalls the dispatcher.
- **Gate**: the server bounds requests in flight per connection (``max_inflight`` in
  ``rpc.hello``, or in a node's status); commands beyond it wait here, in order, and go out as
  replies come back. A few slots stay free for the runner's own calls (``rpc.subscribe``,
  ``rpc.cancel``).
- **Outcomes**: a reply, an error or a client-side timeout is posted to the dispatcher once.
  After a client-side timeout (:class:`~controller.errors.ClientTimeoutError`) the command
  may still run on the server: it is *not* cancelled (a retry of the run sends the same key
  and joins it); it keeps its gate slot, its real outcome goes to ``run.on_late`` when it
  comes, and it is cancelled only if the run abandons it (:meth:`ClientSender.cancel`: an error
  route, an abort, the workflow timeout).
- A client that refuses a command at once (a fleet node that is offline: ``offline``) gives
  its outcome through the same path as any error.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from statemachines import errorkinds as ek
from statemachines.addresses import ServerAddress, format_address
from statemachines.workflow import ErrorInfo, WorkflowRun

from .client_base import BaseClient, CommandFuture, LateOutcome
from .errors import ClientTimeoutError, ConnectionLostError, RpcError
from .senders import Command, NotificationHandler, Post

log = logging.getLogger("statelink.runner")

DEFAULT_MAX_INFLIGHT = 256  #: the gate's bound when the server announces none


@dataclass(slots=True, eq=False)
class _Gate:
    """Keeps one connection's requests under the server's per-connection bound. Each run has
    at most one command in flight or waiting, so ``waiting`` is bounded by the runs."""

    limit: int
    inflight: int = 0
    waiting: deque[Command] = field(default_factory=deque)

    @classmethod
    def for_server(cls, info: Mapping[str, Any]) -> _Gate:
        bound = info.get("max_inflight")
        bound = bound if isinstance(bound, int) else DEFAULT_MAX_INFLIGHT
        # a few slots stay free for the runner's own calls (rpc.subscribe, rpc.cancel)
        return cls(max(1, bound - max(1, min(8, bound // 4))))


#: makes the sender's client, connected (blocks; raises ``OSError``/``RpcError`` when the
#: server cannot be reached)
ClientFactory = Callable[[], BaseClient]


class ClientSender:
    """One server address over one shared client made by ``connect``. ``send``/``cancel`` on
    the dispatcher only."""

    def __init__(self, address: ServerAddress, post: Post, connect: ClientFactory) -> None:
        self._address = address
        self._post = post
        self._new_client = connect
        self._client: BaseClient | None = None
        self._closed = False
        self._state_lock = threading.Lock()  #: guards _client and _closed
        self._connect_lock = threading.Lock()  #: one connect at a time (close() never waits)
        # subscriptions (any thread): what the runner wants, what the server has
        self._subs_lock = threading.Lock()
        self._subs_sync_lock = threading.Lock()  #: one thread brings _subscribed to _wanted
        self._wanted: dict[str, NotificationHandler] = {}
        self._subscribed: dict[str, Callable[[], None]] = {}  #: method -> the client's undo
        self._syncing = False  #: a background thread is syncing the subscriptions
        # dispatcher thread only:
        self._gate: _Gate | None = None
        self._awaiting_connect: list[Command] | None = None
        self._inflight: dict[tuple[WorkflowRun, int], CommandFuture] = {}
        #: timed out on the client side, real outcome not yet in (each holds its gate slot;
        #: the client reports every one of them once: bounded by the client's MAX_LATE)
        self._timed_out: dict[tuple[WorkflowRun, int], CommandFuture] = {}

    @property
    def address(self) -> ServerAddress:
        return self._address

    # -- blocking side (any thread but the dispatcher) --------------------------------------
    def client(self) -> BaseClient:
        """The connected client, connecting first if needed.

        Raises ``OSError``/:class:`RpcError` when the server cannot be reached, and
        :class:`ConnectionLostError` once the sender is closed.
        """
        client = self._client
        if client is not None:
            return client
        with self._connect_lock:
            with self._state_lock:
                if self._client is not None:
                    return self._client
                if self._closed:
                    raise ConnectionLostError("the workflow runner is closed")
            client = self._new_client()
            with self._state_lock:
                closed = self._closed
                if not closed:
                    self._client = client
            if closed:  # close() ran while connecting: nobody would close this one
                client.close()
                raise ConnectionLostError("the workflow runner is closed")
            return client

    def connect(self) -> None:
        self.client()

    def subscribe(self, method: str, handler: NotificationHandler, *, wait: bool = True) -> None:
        with self._subs_lock:
            if method in self._wanted:
                return
            self._wanted[method] = handler
            start = not wait and not self._syncing
            self._syncing = self._syncing or start
        if wait:
            self._sync_subscriptions(raising=True)
        elif start:
            threading.Thread(
                target=self._sync_in_background, name="statelink-runner-subscribe", daemon=True
            ).start()

    def unsubscribe(self, method: str) -> None:
        with self._subs_lock:
            self._wanted.pop(method, None)
            if self._syncing:
                return  # the syncing thread sees it
            unsubscribe = self._subscribed.pop(method, None)
        if unsubscribe is not None:
            unsubscribe()  # rpc.unsubscribe without waiting for its reply

    def _sync_subscriptions(self, *, raising: bool) -> bool:
        """Make the server's subscriptions what ``_wanted`` says (blocks on ``rpc.subscribe``);
        True when done, False when a subscribe failed (logged unless ``raising``)."""
        with self._subs_sync_lock:
            while True:
                with self._subs_lock:
                    extra = [m for m in self._subscribed if m not in self._wanted]
                    undo = [self._subscribed.pop(m) for m in extra]
                    missing = [(m, h) for m, h in self._wanted.items() if m not in self._subscribed]
                for unsubscribe in undo:
                    unsubscribe()
                if not missing:
                    return True
                for method, handler in missing:
                    try:
                        unsubscribe = self.client().subscribe(method, handler)
                    except (OSError, RpcError) as exc:
                        if raising:
                            with self._subs_lock:
                                self._wanted.pop(method, None)
                            raise
                        log.warning(
                            "cannot subscribe to %s at %s: %s",
                            method,
                            format_address(self._address),
                            exc,
                        )
                        return False
                    with self._subs_lock:
                        self._subscribed[method] = unsubscribe

    def _sync_in_background(self) -> None:
        while True:
            done = self._sync_subscriptions(raising=False)
            with self._subs_lock:
                settled = set(self._subscribed) == set(self._wanted)
                if settled or not done:
                    self._syncing = False
                    return

    def close(self) -> None:
        with self._state_lock:
            self._closed = True
            client = self._client
        if client is not None:
            client.close()

    # -- dispatcher side --------------------------------------------------------------------
    def send(self, command: Command) -> None:
        client = self._client
        if client is not None:
            self._admit(client, command)
            return
        waiting = self._awaiting_connect
        if waiting is not None:
            waiting.append(command)
            return
        self._awaiting_connect = [command]
        threading.Thread(
            target=self._connect_for_dispatcher, name="statelink-runner-connect", daemon=True
        ).start()

    def cancel(self, run: WorkflowRun, token: int) -> None:
        future = self._inflight.get((run, token))
        if future is not None and future.done():
            future = None  # its outcome is on its way to the run
        if future is None:
            future = self._timed_out.get((run, token))
        client = self._client
        if future is not None and client is not None:
            client.cancel(future)

    def _connect_for_dispatcher(self) -> None:
        try:
            client = self.client()
        except BaseException as exc:  # every waiting command gets an outcome
            self._post(self._connected, None, exc)
        else:
            self._post(self._connected, client, None)

    def _connected(self, client: BaseClient | None, error: BaseException | None) -> None:
        waiting, self._awaiting_connect = self._awaiting_connect or [], None
        for command in waiting:
            if client is not None:
                self._admit(client, command)
            else:
                self._unreachable(command, error)

    def _unreachable(self, command: Command, error: BaseException | None) -> None:
        run, token = command.run, command.token
        if isinstance(error, RpcError):  # e.g. unauthorized
            run.on_error(token, error.kind, error.code, error.message, error.data)
            return
        run.on_error(
            token,
            ek.kind_of(ek.CONNECTION_LOST),
            ek.CONNECTION_LOST,
            f"cannot reach {command.server} at {format_address(self._address)}: {error}",
            {"server": command.server},
        )

    def _admit(self, client: BaseClient, command: Command) -> None:
        if not command.run.expects(command.token):
            return  # the run moved on (aborted, timed out) while connecting
        gate = self._gate
        if gate is None:
            gate = self._gate = _Gate.for_server(client.server_info)
        if gate.inflight >= gate.limit:
            gate.waiting.append(command)  # at the server's bound: wait for a reply
            return
        self._send_now(client, gate, command)

    def _send_now(self, client: BaseClient, gate: _Gate, command: Command) -> None:
        gate.inflight += 1
        # both callbacks run on the reader (or timer) thread: they only post
        future = client.send_command(
            command.method,
            command.params,
            timeout=command.timeout,
            key=command.key,
            on_late=functools.partial(self._post, self._late, client, command),
        )
        self._inflight[command.run, command.token] = future
        future.add_done_callback(functools.partial(self._post, self._settled, client, command))

    def _settled(self, client: BaseClient, command: Command, future: Future[Any]) -> None:
        assert isinstance(future, CommandFuture)
        run, token = command.run, command.token
        self._inflight.pop((run, token), None)
        error = future.exception()
        if isinstance(error, ClientTimeoutError):
            # Our timeout, not the server's: the command may still run there, in its slot.
            self._timed_out[run, token] = future
        else:
            self._release(client)
        if error is None:
            run.on_reply(token, future.result(), future.replayed)
            return
        if isinstance(error, RpcError):
            run.on_error(token, error.kind, error.code, error.message, error.data, future.replayed)
        else:
            run.on_error(
                token,
                ek.kind_of(ek.INTERNAL_ERROR),
                ek.INTERNAL_ERROR,
                f"{type(error).__name__}: {error}",
                None,
            )

    def _late(self, client: BaseClient, command: Command, late: LateOutcome) -> None:
        """The real outcome of a command after its client-side timeout (or ``lost``: it
        will never come): its slot is free; the run journals it."""
        if self._timed_out.pop((command.run, command.token), None) is None:
            return
        self._release(client)
        if late.lost:
            return
        error = late.error
        info = None if error is None else ErrorInfo.of(None, error.code, error.message, error.data)
        command.run.on_late(command.token, late.result, info, late.replayed)

    def _release(self, client: BaseClient) -> None:
        """A request was answered: send the commands waiting for its slot."""
        gate = self._gate
        assert gate is not None  # created by the send being answered
        gate.inflight -= 1
        waiting = gate.waiting
        while waiting and gate.inflight < gate.limit:
            command = waiting.popleft()
            if command.run.expects(command.token):  # else the run moved on while waiting
                self._send_now(client, gate, command)


__all__ = ["ClientFactory", "ClientSender"]
