"""The workflow runner: replies, errors, timeouts, timers and notifications become events.

>>> # runner = WorkflowRunner()
>>> # handle = runner.start(load_workflow("config/workflows/demo.yaml"),
>>> #                       servers={"device": "127.0.0.1:15769"}, journal="demo.jsonl")
>>> # handle.wait(60) -> "success" | "failure" | "aborted"

Threads: client reader threads and the scheduler thread only *post* events; one dispatcher
thread applies every event to its run, in arrival order, so a run is never touched by two
threads. One scheduler serves every timer; one client per server address serves every run.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any

from statemachines import errorkinds as ek
from statemachines.workflow import CompiledWorkflow, WorkflowRun, WorkflowSpec

from .client import Address, Client, parse_address
from .errors import ConnectionLostError, RpcError
from .scheduler import Scheduler

log = logging.getLogger("statelink.runner")

Observer = Callable[["RunHandle", dict[str, Any]], None]

_STOP = object()
_COMPILED_CACHE = 64  #: compiled machines kept for reuse, per runner


def resolve_servers(
    spec: WorkflowSpec, servers: Mapping[str, str | Address] | None = None
) -> dict[str, Address]:
    """The workflow's server addresses with ``servers`` overriding some of them.

    Raises ValueError for a name the workflow does not have or a bad address.
    """
    addresses = {name: parse_address(addr) for name, addr in spec.servers.items()}
    for name, addr in (servers or {}).items():
        if name not in addresses:
            raise ValueError(
                f"workflow {spec.name} has no server named {name!r} "
                f"(servers: {', '.join(sorted(addresses)) or 'none'})"
            )
        addresses[name] = parse_address(addr)
    return addresses


class RunHandle:
    """One run of a workflow: wait for it, abort it, read its state, context and history."""

    def __init__(
        self,
        runner: WorkflowRunner,
        run_id: str,
        servers: dict[str, Address],
        journal: IO[str] | None,
        observers: list[Observer],
    ):
        self.runner = runner
        self.run_id = run_id
        self.servers = servers
        self.run: WorkflowRun = None  # type: ignore[assignment]  # set by the runner
        self._journal = journal
        self._owns_journal = False  #: opened by the runner from a path: closed when done
        self._observers = observers
        self._done = threading.Event()
        #: requests this run has in flight: token -> (client, future); cancelled on abort
        self.inflight: dict[int, tuple[Client, Future[Any]]] = {}

    @property
    def state(self) -> str:
        return self.run.state

    @property
    def outcome(self) -> str | None:
        """``None`` while running, then ``"success"``, ``"failure"`` or ``"aborted"``."""
        return self.run.outcome

    @property
    def context(self) -> dict[str, Any]:
        return self.run.context

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.run.history

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until the run finishes (or ``timeout``); return its outcome."""
        self._done.wait(timeout)
        return self.run.outcome if self._done.is_set() else None

    def abort(self) -> None:
        """Abort: cancel the command in flight (``rpc.cancel``, so the device is free for the
        clean-up), then enter the ``on_abort`` state (if any); the outcome is "aborted"."""
        self.runner.post(self.run.abort)  # the run abandons its command: _Effects.abandon


class WorkflowRunner:
    """Runs workflow runs concurrently in this process. Use as a context manager."""

    def __init__(
        self,
        *,
        secret: bytes | str | None = None,
        ssl: Any = None,
        client_name: str = "statelink-runner",
    ) -> None:
        self.secret = secret
        self.ssl = ssl
        self.client_name = client_name
        self.scheduler = Scheduler("statelink-runner-timers")
        self._clients: dict[Address, Client] = {}
        self._client_lock = threading.Lock()  #: guards _clients, _address_locks, _closed
        self._address_locks: dict[Address, threading.Lock] = {}
        self._subscribed: set[tuple[Address, str]] = set()
        self._gates: dict[Address, _Gate] = {}
        #: addresses being connected off the dispatcher -> what to do once done (dispatcher)
        self._connecting: dict[
            Address, list[Callable[[Client | None, BaseException | None], None]]
        ] = {}
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._compiled: dict[int, CompiledWorkflow] = {}
        self._active: dict[str, RunHandle] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="statelink-dispatcher", daemon=True
        )
        self._dispatcher.start()

    # -- public -----------------------------------------------------------------------------
    def start(
        self,
        workflow: WorkflowSpec | CompiledWorkflow,
        *,
        servers: Mapping[str, str | Address] | None = None,
        run_id: str | None = None,
        journal: str | Path | IO[str] | None = None,
        observer: Observer | None = None,
        context: dict[str, Any] | None = None,
    ) -> RunHandle:
        """Start one run; returns at once (after connecting to servers not yet connected).

        ``servers`` overrides the workflow's addresses; ``context`` sets the values of the
        workflow's ``inputs`` (ValueError for a name that is not one).
        """
        if self._closed:
            raise RuntimeError("the workflow runner is closed; start runs on a new one")
        compiled = self.compile(workflow)
        spec = compiled.spec
        spec.run_context(context)  # a name that is no input: fail before anything opens
        addresses = resolve_servers(spec, servers)
        # Connect here, on the caller's thread, so that most runs find their clients ready; a
        # server that is down is connected later, off the dispatcher, when a run sends to it
        # (and its failure follows the run's own error route).
        for address in set(addresses.values()):
            try:
                self.client(address)
            except (OSError, RpcError) as exc:
                log.warning("cannot connect to %s:%s yet: %s", *address, exc)
        run_id = run_id or f"{spec.name}-{next(self._ids)}"
        stream: IO[str] | None
        if journal is None or hasattr(journal, "write"):
            stream = journal  # type: ignore[assignment]
        else:
            stream = open(journal, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
        handle = RunHandle(self, run_id, addresses, stream, [observer] if observer else [])
        handle._owns_journal = stream is not journal
        handle.run = compiled.new_run(_Effects(self, handle), run_id, context)
        self._subscribe_awaited(compiled, addresses)
        self._active[run_id] = handle
        self.post(handle.run.start)
        return handle

    def compile(self, workflow: WorkflowSpec | CompiledWorkflow) -> CompiledWorkflow:
        """The compiled machine of a spec, built once per spec object and reused."""
        if isinstance(workflow, CompiledWorkflow):
            return workflow
        compiled = self._compiled.get(id(workflow))
        if compiled is None or compiled.spec is not workflow:
            if len(self._compiled) >= _COMPILED_CACHE:
                del self._compiled[next(iter(self._compiled))]  # the oldest
            compiled = self._compiled[id(workflow)] = CompiledWorkflow(workflow)
        return compiled

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` for the dispatcher thread (thread-safe)."""
        self._events.put((fn, args))

    def client(self, address: Address) -> Client:
        """The shared client of one server address, connected on first use.

        Raises ``OSError``/:class:`RpcError` when the server cannot be reached, and
        :class:`ConnectionLostError` once the runner is closed. Connects to different
        addresses run in parallel: each address has its own lock.
        """
        with self._client_lock:
            client = self._clients.get(address)
            if client is not None:
                return client
            if self._closed:
                raise ConnectionLostError("the workflow runner is closed")
            lock = self._address_locks.setdefault(address, threading.Lock())
        with lock:
            with self._client_lock:
                client = self._clients.get(address)
            if client is not None:
                return client
            client = Client(
                address,
                name=self.client_name,
                secret=self.secret,
                ssl=self.ssl,
                scheduler=self.scheduler,
            )
            with self._client_lock:
                closed = self._closed
                if not closed:
                    self._clients[address] = client
            if closed:  # close() ran while connecting: nobody would close this one
                client.close()
                raise ConnectionLostError("the workflow runner is closed")
            return client

    def with_client(
        self, address: Address, then: Callable[[Client | None, BaseException | None], None]
    ) -> None:
        """Dispatcher thread: ``then(client, None)`` with the connected client of ``address``,
        or ``then(None, error)``; a connect that is needed runs on its own thread (one per
        address at a time), so an unreachable server never stalls the other runs."""
        client = self._clients.get(address)
        if client is not None:
            then(client, None)
            return
        waiting = self._connecting.get(address)
        if waiting is not None:
            waiting.append(then)
            return
        self._connecting[address] = [then]

        def connect() -> None:
            try:
                self.post(self._connected, address, self.client(address), None)
            except BaseException as exc:  # every waiting command gets an outcome
                self.post(self._connected, address, None, exc)

        threading.Thread(target=connect, name="statelink-runner-connect", daemon=True).start()

    def _connected(
        self, address: Address, client: Client | None, error: BaseException | None
    ) -> None:
        for then in self._connecting.pop(address, []):
            then(client, error)

    def gate(self, address: Address, client: Client) -> _Gate:
        """The in-flight gate of one server address (dispatcher thread)."""
        gate = self._gates.get(address)
        if gate is None:
            limit = client.server_info.get("max_inflight")
            limit = limit if isinstance(limit, int) else 256
            # a few slots stay free for the runner's own calls (rpc.subscribe, rpc.cancel)
            gate = self._gates[address] = _Gate(limit - max(1, min(8, limit // 4)))
        return gate

    def release(self, gate: _Gate) -> None:
        """A request of ``gate`` was answered: send the next waiting one (dispatcher thread)."""
        gate.inflight -= 1
        waiting = gate.waiting
        while waiting and gate.inflight < gate.limit:
            effects, run, token, *args = waiting.popleft()
            if run.expects(token):  # else the run moved on (aborted, timed out) while waiting
                effects.send_now(gate, run, token, *args)

    def close(self) -> None:
        """Abort nothing; stop the dispatcher, the clients and the scheduler. Runs still going
        stop where they are: their journals (those opened from a path) are closed without a
        ``finished`` line, as after a crash. Abort them first to run their ``on_abort``."""
        with self._client_lock:
            if self._closed:
                return
            self._closed = True
        self._events.put(_STOP)
        self._dispatcher.join(timeout=10)
        for handle in list(self._active.values()):
            if handle._owns_journal and handle._journal is not None:
                handle._journal.close()
            handle._done.set()  # wait() returns (outcome None: it never finished)
        with self._client_lock:
            clients = list(self._clients.values())
        for client in clients:
            client.close()
        self.scheduler.close()

    def __enter__(self) -> WorkflowRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------
    def _dispatch(self) -> None:
        events = self._events
        while True:
            item = events.get()
            if item is _STOP:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("workflow event %s failed", getattr(fn, "__name__", fn))

    def _subscribe_awaited(self, compiled: CompiledWorkflow, addresses: dict[str, Address]) -> None:
        for server, method in compiled.awaited():
            address = addresses.get(server)
            if address is None or (address, method) in self._subscribed:
                continue
            try:
                client = self.client(address)
                client.subscribe(
                    method, functools.partial(self._post_notification, address, method)
                )
            except (OSError, RpcError) as exc:
                log.warning("cannot subscribe to %s at %s:%s: %s", method, *address, exc)
                continue
            self._subscribed.add((address, method))

    def _post_notification(self, address: Address, method: str, params: Any) -> None:
        self.post(self._notify_runs, address, method, params)

    def _notify_runs(self, address: Address, method: str, params: Any) -> None:
        for handle in list(self._active.values()):
            for server, server_address in handle.servers.items():
                if server_address == address:
                    handle.run.on_notification(server, method, params)

    def _finished(self, handle: RunHandle) -> None:
        self._active.pop(handle.run_id, None)
        if handle._owns_journal and handle._journal is not None:
            handle._journal.close()
        handle._done.set()


class _Gate:
    """Keeps one connection's requests in flight under the server's per-connection bound
    (``max_inflight``, from ``rpc.hello``). The runs' commands beyond it wait here, in order;
    each run has at most one command in flight, so this queue is bounded by the runs.
    Dispatcher thread only."""

    __slots__ = ("inflight", "limit", "waiting")

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.inflight = 0
        self.waiting: deque[tuple[Any, ...]] = deque()


class _Effects:
    """The I/O a run asks for, done on its behalf (dispatcher thread)."""

    __slots__ = ("handle", "runner")

    def __init__(self, runner: WorkflowRunner, handle: RunHandle):
        self.runner = runner
        self.handle = handle

    def send_command(
        self, run: WorkflowRun, token: int, server: str, method: str, params: Any, timeout: float
    ) -> None:
        address = self.handle.servers[server]

        def with_client(client: Client | None, error: BaseException | None) -> None:
            if client is not None:
                self._send(run, token, address, client, method, params, timeout)
            elif isinstance(error, RpcError):
                run.on_error(token, error.kind, error.code, error.message, error.data)
            else:
                run.on_error(
                    token,
                    "connection_lost",
                    ek.CONNECTION_LOST,
                    f"cannot reach {server} at {address[0]}:{address[1]}: {error}",
                    {"server": server},
                )

        self.runner.with_client(address, with_client)

    def _send(
        self,
        run: WorkflowRun,
        token: int,
        address: Address,
        client: Client,
        method: str,
        params: Any,
        timeout: float,
    ) -> None:
        runner = self.runner
        if not run.expects(token):
            return  # the run moved on (aborted, timed out) while connecting
        gate = runner.gate(address, client)
        if gate.inflight >= gate.limit:
            # The connection is at the server's bound: wait here (at most one entry per run).
            gate.waiting.append((self, run, token, client, method, params, timeout))
            return
        self.send_now(gate, run, token, client, method, params, timeout)

    def send_now(
        self,
        gate: _Gate,
        run: WorkflowRun,
        token: int,
        client: Client,
        method: str,
        params: Any,
        timeout: float,
    ) -> None:
        runner = self.runner
        inflight = self.handle.inflight
        gate.inflight += 1

        def deliver(future: Future[Any]) -> None:
            inflight.pop(token, None)
            runner.post(runner.release, gate)
            error = future.exception()
            if error is None:
                runner.post(run.on_reply, token, future.result())
            elif isinstance(error, RpcError):
                if isinstance(error.data, dict) and error.data.get("source") == "client":
                    # Our timeout, not the server's: the command may still be running there.
                    # Cancel it, so that a retry or the next state does not queue behind it.
                    runner.post(client.cancel, future)  # not on the timer thread: it sends
                runner.post(run.on_error, token, error.kind, error.code, error.message, error.data)
            else:
                runner.post(
                    run.on_error,
                    token,
                    "internal_error",
                    ek.INTERNAL_ERROR,
                    f"{type(error).__name__}: {error}",
                    None,
                )

        future = client.send_command(method, params, timeout=timeout)
        if not future.done():
            inflight[token] = (client, future)
        future.add_done_callback(deliver)

    def start_timer(self, run: WorkflowRun, token: int, delay: float) -> None:
        self.runner.scheduler.call_later(delay, self.runner.post, run.on_timer, token)

    def abandon(self, run: WorkflowRun, token: int) -> None:
        """The run leaves command ``token`` (abort, workflow timeout): ``rpc.cancel`` it, so
        the device is free for the on_abort path. A command still waiting for a slot is
        dropped by :meth:`WorkflowRunner.release`; a timer token is in neither place."""
        entry = self.handle.inflight.get(token)
        if entry is not None and not entry[1].done():
            entry[0].cancel(entry[1])

    def record(self, run: WorkflowRun, entry: dict[str, Any]) -> None:
        handle = self.handle
        journal = handle._journal
        if journal is not None:
            try:
                journal.write(json.dumps(entry, default=str, ensure_ascii=False) + "\n")
                journal.flush()
            except (OSError, ValueError) as exc:
                log.error("journal of %s: %s", handle.run_id, exc)
        for observer in handle._observers:
            try:
                observer(handle, entry)
            except Exception:
                log.exception("run observer failed")

    def finished(self, run: WorkflowRun) -> None:
        self.runner._finished(self.handle)


__all__ = ["ConnectionLostError", "RunHandle", "WorkflowRunner", "resolve_servers"]
