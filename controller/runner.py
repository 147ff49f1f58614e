"""The workflow runner: replies, errors, timeouts, timers and notifications become events.

>>> # runner = WorkflowRunner()
>>> # handle = runner.start(load_workflow("config/workflows/demo.yaml"),
>>> #                       servers={"device": "127.0.0.1:15769"}, journal="demo.jsonl")
>>> # handle.wait(60) -> "success" | "failure" | "aborted"

Threads: transport threads (client readers, connect threads) and the scheduler thread only
*post* events; one dispatcher thread applies every event to its run, in arrival order, so a
run is never touched by two threads. One scheduler serves every timer; one sender
(:mod:`controller.senders`) per server address serves every run. This module only
dispatches: connecting, the in-flight bound and cancelling are the sender's.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import secrets
import ssl as ssl_module
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from statemachines.addresses import Address, format_address, parse_address
from statemachines.workflow import CompiledWorkflow, JournalEntry, WorkflowRun, WorkflowSpec

from .client import Client
from .errors import ConnectionLostError, RpcError
from .scheduler import Scheduler
from .senders import Command, Sender
from .tcp_sender import TcpSender

log = logging.getLogger("statelink.runner")

Observer = Callable[["RunHandle", JournalEntry], None]

_COMPILED_CACHE = 64  #: compiled machines kept for reuse, per runner


def new_run_id(name: str) -> str:
    """``NAME-YYYYMMDDTHHMMSSZ-xxxxxxxx``: the workflow's name, the UTC start second and 8
    random hex digits. Every command of a run carries a key made from its id, so ids must not
    repeat, also between controllers sharing a device (32 random bits per second and workflow
    name; the runner also never issues one twice in the same second)."""
    return f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"


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


@dataclass(slots=True, eq=False)
class _Event:
    """One item of the dispatcher's queue: ``fn(*args)``."""

    fn: Callable[..., object]
    args: tuple[object, ...]


class RunHandle:
    """One run of a workflow: wait for it, abort it, read its state, context and history."""

    def __init__(
        self,
        runner: WorkflowRunner,
        compiled: CompiledWorkflow,
        run_id: str,
        servers: dict[str, Address],
        senders: dict[str, Sender],
        context: Mapping[str, Any] | None,
        journal: IO[str] | None,
        owns_journal: bool,
        observers: list[Observer],
    ):
        self.runner = runner
        self.run_id = run_id
        self.servers = servers
        self._senders = senders
        self._journal = journal
        self._owns_journal = owns_journal  #: opened by the runner from a path: closed when done
        self._observers = observers
        self._done = threading.Event()
        self.run: WorkflowRun = compiled.new_run(_Effects(runner, self), run_id, context)

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
    def history(self) -> list[JournalEntry]:
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

    def _end(self) -> None:
        """Finished, or the runner closed: close the journal (if ours); wait() returns."""
        if self._owns_journal and self._journal is not None:
            self._journal.close()
        self._done.set()


class WorkflowRunner:
    """Runs workflow runs concurrently in this process. Use as a context manager."""

    def __init__(
        self,
        *,
        secret: bytes | str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        client_name: str = "statelink-runner",
    ) -> None:
        self.secret = secret
        self.ssl = ssl
        self.client_name = client_name
        self.scheduler = Scheduler("statelink-runner-timers")
        self._senders: dict[Address, TcpSender] = {}
        self._lock = threading.Lock()  #: guards _senders and _closed
        self._subscribed: set[tuple[Address, str]] = set()
        self._events: queue.SimpleQueue[_Event | None] = queue.SimpleQueue()  # None: stop
        self._compiled: dict[int, CompiledWorkflow] = {}
        self._active: dict[str, RunHandle] = {}
        self._issued: set[str] = set()  #: run ids issued in the current second
        self._issued_second = ""
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
        context: Mapping[str, Any] | None = None,
    ) -> RunHandle:
        """Start one run; returns at once (after connecting to servers not yet connected).

        ``servers`` overrides the workflow's addresses; ``context`` sets the values of the
        workflow's ``inputs`` (ValueError for a name that is not one). ``run_id`` defaults to
        a new unique one (:func:`new_run_id`); one that is running already is a ValueError.
        The run's commands carry the idempotency keys ``f"{run_id}:{visit}"``.
        """
        if self._closed:
            raise RuntimeError("the workflow runner is closed; start runs on a new one")
        compiled = self.compile(workflow)
        spec = compiled.spec
        spec.run_context(context)  # a name that is no input: fail before anything opens
        addresses = resolve_servers(spec, servers)
        senders: dict[str, Sender] = {name: self.sender(a) for name, a in addresses.items()}
        # Connect here, on the caller's thread, so that most runs find their servers ready; a
        # server that is down is connected later, off the dispatcher, when a run sends to it
        # (and its failure follows the run's own error route).
        for sender in set(senders.values()):
            try:
                sender.connect()
            except (OSError, RpcError) as exc:
                log.warning("cannot connect to %s yet: %s", format_address(sender.address), exc)
        run_id = run_id or self._new_run_id(spec.name)
        if run_id in self._active:
            raise ValueError(f"a run with the id {run_id!r} is running already")
        stream: IO[str] | None
        if journal is None or not isinstance(journal, (str, os.PathLike)):
            stream = journal
        else:
            stream = open(journal, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
        handle = RunHandle(
            self,
            compiled,
            run_id,
            addresses,
            senders,
            context,
            stream,
            stream is not journal,
            [observer] if observer else [],
        )
        self._subscribe_awaited(compiled, addresses)
        self._active[run_id] = handle
        self.post(handle.run.start)
        return handle

    def _new_run_id(self, name: str) -> str:
        with self._lock:
            for _ in range(1000):
                run_id = new_run_id(name)
                second = run_id[len(name) + 1 : len(name) + 17]
                if second != self._issued_second:
                    self._issued_second, self._issued = second, set()
                if run_id not in self._issued and run_id not in self._active:
                    self._issued.add(run_id)
                    return run_id
        raise RuntimeError("cannot find a free run id: too many runs started in one second")

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

    def post(self, fn: Callable[..., object], /, *args: object) -> None:
        """Queue ``fn(*args)`` for the dispatcher thread (thread-safe)."""
        self._events.put(_Event(fn, args))

    def sender(self, address: Address) -> TcpSender:
        """The sender of one server address (created on first use, not connected yet).
        Raises :class:`ConnectionLostError` once the runner is closed."""
        with self._lock:
            if self._closed:
                raise ConnectionLostError("the workflow runner is closed")
            sender = self._senders.get(address)
            if sender is None:
                sender = self._senders[address] = TcpSender(
                    address,
                    self.post,
                    name=self.client_name,
                    secret=self.secret,
                    ssl=self.ssl,
                    scheduler=self.scheduler,
                )
            return sender

    def client(self, address: Address) -> Client:
        """The shared client of one server address, connected on first use.

        Raises ``OSError``/:class:`RpcError` when the server cannot be reached, and
        :class:`ConnectionLostError` once the runner is closed. Connects to different
        addresses run in parallel.
        """
        return self.sender(address).client()

    def close(self) -> None:
        """Abort nothing; stop the dispatcher, the senders and the scheduler. Runs still going
        stop where they are: their journals (those opened from a path) are closed without a
        ``finished`` line, as after a crash. Abort them first to run their ``on_abort``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            senders = list(self._senders.values())
        self._events.put(None)
        self._dispatcher.join(timeout=10)
        for handle in list(self._active.values()):
            handle._end()  # wait() returns (outcome None: it never finished)
        for sender in senders:
            sender.close()
        self.scheduler.close()

    def __enter__(self) -> WorkflowRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------
    def _dispatch(self) -> None:
        events = self._events
        while True:
            event = events.get()
            if event is None:
                return
            try:
                event.fn(*event.args)
            except Exception:
                log.exception("workflow event %s failed", getattr(event.fn, "__name__", event.fn))

    def _subscribe_awaited(self, compiled: CompiledWorkflow, addresses: dict[str, Address]) -> None:
        for server, method in compiled.awaited():
            address = addresses.get(server)
            if address is None or (address, method) in self._subscribed:
                continue
            try:
                self._senders[address].subscribe(
                    method, functools.partial(self.post, self._notify_runs, address, method)
                )
            except (OSError, RpcError) as exc:
                log.warning(
                    "cannot subscribe to %s at %s: %s", method, format_address(address), exc
                )
                continue
            self._subscribed.add((address, method))

    def _notify_runs(self, address: Address, method: str, params: Any) -> None:
        for handle in list(self._active.values()):
            for server, server_address in handle.servers.items():
                if server_address == address:
                    handle.run.on_notification(server, method, params)

    def _finished(self, handle: RunHandle) -> None:
        self._active.pop(handle.run_id, None)
        handle._end()


class _Effects:
    """The I/O a run asks for (statemachines' ``Effects``), done on its behalf on the
    dispatcher thread: commands go to the run's senders, timers to the scheduler, journal
    entries to the journal and the observers."""

    __slots__ = ("handle", "runner")

    def __init__(self, runner: WorkflowRunner, handle: RunHandle):
        self.runner = runner
        self.handle = handle

    def send_command(
        self, run: WorkflowRun, token: int, server: str, method: str, params: Any, timeout: float
    ) -> None:
        self.handle._senders[server].send(
            Command(run, token, server, method, params, timeout, run.command_key)
        )

    def start_timer(self, run: WorkflowRun, token: int, delay: float) -> None:
        self.runner.scheduler.call_later(delay, self.runner.post, run.on_timer, token)

    def abandon(self, run: WorkflowRun, token: int) -> None:
        """The run leaves command ``token`` (abort, workflow timeout, an error route after a
        client-side timeout): its sender cancels it (``rpc.cancel``) if it may still run, so
        the device is free for what comes next; a timer token is nobody's."""
        for sender in set(self.handle._senders.values()):
            sender.cancel(run, token)

    def record(self, run: WorkflowRun, entry: JournalEntry) -> None:
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


__all__ = ["ConnectionLostError", "RunHandle", "WorkflowRunner", "new_run_id", "resolve_servers"]
