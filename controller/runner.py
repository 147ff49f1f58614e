"""The workflow runner: replies, errors, timeouts, timers and notifications become events.

>>> # runner = WorkflowRunner()
>>> # handle = runner.start(load_workflow("config/workflows/demo.yaml"),
>>> #                       servers={"device": "127.0.0.1:15769"})
>>> # handle.wait(60) -> "success" | "failure" | "aborted"

Journals: every run journals to ``STATE_DIR/runs/RUN_ID.jsonl`` unless told otherwise
(``journal=PATH`` or ``journal=False``), through ONE :class:`~controller.journal.JournalWriter`
per runner (group commit, no file descriptor per run); a run's effects, its durable sends and
a journal that cannot be written are :mod:`controller.run_handle`'s.

Threads: transport threads (client readers, connect threads) and the scheduler thread only
*post* events; one dispatcher thread applies every event to its run, in arrival order, so a
run is never touched by two threads. One scheduler serves every timer; one sender
(:mod:`controller.senders`) per server address serves every run. This module only
dispatches: connecting, the in-flight bound and cancelling are the sender's.

The dispatcher's queue: replies and other events are applied in arrival order and never
dropped; timers (:meth:`WorkflowRunner.post_timer`) jump the queue, so that they fire on time
behind a long one. Notifications keep their place in the order, but at most
``max_queued_notifications`` wait at a time; the await index, that bound and the
subscriptions are :mod:`controller.notifications`'.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import secrets
import ssl as ssl_module
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from statemachines.addresses import (
    BrokerUrl,
    NodeAddress,
    ServerAddress,
    format_address,
    parse_server,
)
from statemachines.workflow import CompiledWorkflow, WorkflowSpec

from .client import Client
from .client_base import BaseClient
from .client_sender import ClientSender
from .errors import ConnectionLostError, RpcError
from .journal import RUNS_DIR, JournalFile, JournalWriter, check_new_journal_path
from .notifications import MAX_QUEUED_NOTIFICATIONS, UNSUBSCRIBE_AFTER, Notifications
from .resume import go_live, load_interrupted, take_over
from .run_handle import Observer, RunHandle, describe_os_error
from .scheduler import Scheduler
from .senders import Sender
from .statedir import default_state_dir

if TYPE_CHECKING:
    from .mqtt.broker_link import BrokerLink
    from .mqtt.options import MqttOptions

log = logging.getLogger("statelink.runner")
#: the warning for a server not reachable at a run's start (the live view shows it its own way)
CONNECT_LATER = "cannot connect to %s yet: %s"

#: ``journal=`` of :meth:`WorkflowRunner.start`: None the state directory's, False none
JournalOption = str | os.PathLike[str] | Literal[False] | None

_COMPILED_CACHE = 64  #: compiled machines kept for reuse, per runner
#: how long a journal entry may wait for others to share its commit while the dispatcher is
#: busy (it commits at once when the dispatcher goes idle): fewer, larger commits under load
JOURNAL_COMMIT_DELAY = 0.005


def new_run_id(name: str) -> str:
    """``NAME-YYYYMMDDTHHMMSSZ-xxxxxxxx``: the workflow's name, the UTC start second and 8
    random hex digits. Every command of a run carries a key made from its id, so ids must not
    repeat, also between controllers sharing a device (32 random bits per second and workflow
    name; the runner also never issues one twice in the same second)."""
    return f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"


def resolve_servers(
    spec: WorkflowSpec, servers: Mapping[str, str | ServerAddress] | None = None
) -> dict[str, ServerAddress]:
    """The workflow's server addresses (``HOST:PORT`` or ``mqtt://BROKER/NODE``) with
    ``servers`` overriding some of them.

    Raises ValueError for a name the workflow does not have or a bad address.
    """
    addresses = {name: parse_server(addr) for name, addr in spec.servers.items()}
    for name, addr in (servers or {}).items():
        if name not in addresses:
            raise ValueError(
                f"workflow {spec.name} has no server named {name!r} "
                f"(servers: {', '.join(sorted(addresses)) or 'none'})"
            )
        addresses[name] = parse_server(addr)
    return addresses


@dataclass(slots=True, eq=False)
class _Event:
    """One item of the dispatcher's queue: ``fn(*args)``."""

    fn: Callable[..., object]
    args: tuple[object, ...]


_WAKE = _Event(lambda: None, ())  #: a timer is waiting in WorkflowRunner._timers
_NOTE = _Event(lambda: None, ())  #: the oldest queued notification is next


class WorkflowRunner:
    """Runs workflow runs concurrently in this process. Use as a context manager."""

    def __init__(
        self,
        *,
        secret: bytes | str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        client_name: str = "statelink-runner",
        state_dir: str | os.PathLike[str] | None = None,
        journal_sync: str = "wal",
        mqtt: MqttOptions | None = None,
    ) -> None:
        """``state_dir`` (default :func:`~controller.statedir.default_state_dir`) holds the
        runs' journals in ``runs/``; ``journal_sync``: the journal writer's ``sync`` mode.
        ``secret``/``ssl``: for TCP servers; ``mqtt``: how to reach the brokers of
        ``mqtt://`` servers (one connection per broker, shared by its nodes).
        Raises OSError if the state directory cannot be used."""
        self.secret = secret
        self.ssl = ssl
        self.mqtt = mqtt
        self.client_name = client_name
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        #: the one journal writer of every run of this runner (closed by close())
        self.journals = JournalWriter(
            self.state_dir / RUNS_DIR, sync=journal_sync, commit_delay=JOURNAL_COMMIT_DELAY
        ).start()
        self.scheduler = Scheduler("statelink-runner-timers")
        self._senders: dict[ServerAddress, ClientSender] = {}
        self._links: dict[BrokerUrl, BrokerLink] = {}  #: one per broker, for every node
        self._lock = threading.Lock()  #: guards _senders, _links and _closed
        self._events: queue.SimpleQueue[_Event | None] = queue.SimpleQueue()  # None: stop
        self._timers: deque[_Event] = deque()  #: run before any queued event (_WAKE)
        #: runs whose oldest unwritten ``send`` entry is on disk, from the journal writer
        self._durable: deque[RunHandle] = deque()
        self._durable_posted = False
        #: the await index, the bounded notification queue, the subscriptions
        self.notifications = Notifications(
            self._senders,
            self.scheduler,
            self.post,
            functools.partial(self._events.put, _NOTE),
            lambda: threading.current_thread() is self._dispatcher,
            lambda: self._closed,
        )
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
        servers: Mapping[str, str | ServerAddress] | None = None,
        run_id: str | None = None,
        journal: JournalOption = None,
        observer: Observer | None = None,
        context: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> RunHandle:
        """Start one run; returns at once (after connecting to servers not yet connected).

        ``servers`` overrides the workflow's addresses; ``context`` sets the values of the
        workflow's ``inputs`` (ValueError for a name that is not one). ``run_id`` defaults to
        a new unique one (:func:`new_run_id`); one that is running already is a ValueError.
        The run's commands carry the idempotency keys ``f"{run_id}:{visit}"``.

        ``journal``: None (default) ``STATE_DIR/runs/RUN_ID.jsonl``, a path (a new or empty
        file: ValueError, one line, for a missing directory, a directory or a non-empty
        file), or False (none). The ``start`` entry holds what a resume needs:
        ``workflow_text`` (the spec's ``source_text``),
        the servers as resolved and ``options`` (what changes behaviour, e.g.
        ``secret_file``, ``tls_ca``; never a secret).
        """
        if self._closed:
            raise RuntimeError("the workflow runner is closed; start runs on a new one")
        compiled = self.compile(workflow)
        spec = compiled.spec
        spec.run_context(context)  # a name that is no input: fail before anything opens
        addresses = resolve_servers(spec, servers)
        path = None if journal is None or journal is False else check_new_journal_path(journal)
        senders: dict[str, Sender] = {name: self.sender(a) for name, a in addresses.items()}
        self._connect(senders)
        run_id = run_id or self._new_run_id(spec.name)
        if run_id in self._active:
            raise ValueError(f"a run with the id {run_id!r} is running already")
        journal_file = None
        if journal is not False:
            journal_file = self._create_journal(
                path or self.state_dir / RUNS_DIR / f"{run_id}.jsonl"
            )
        start_fields = {
            "workflow_text": spec.source_text,
            "workflow_file": spec.path,
            "servers": {name: format_address(a) for name, a in addresses.items()},
            "options": {"secret_file": None, "tls": self.ssl is not None, "tls_ca": None}
            | dict(options or {}),
        }
        handle = self._new_handle(
            compiled,
            run_id,
            addresses,
            senders,
            context,
            journal_file,
            [observer] if observer else [],
            start_fields,
        )
        self.notifications.subscribe_awaited(compiled, addresses)
        self._active[run_id] = handle
        self.post(handle.run.start)
        return handle

    def resume(
        self,
        path: str | os.PathLike[str],
        *,
        servers: Mapping[str, str | ServerAddress] | None = None,
        observer: Observer | None = None,
    ) -> RunHandle:
        """Continue the interrupted run of the journal at ``path`` (see :mod:`.resume`);
        ``servers`` overrides addresses the journal holds. Raises ``RunFinished`` (a
        ValueError), ``JournalBusy`` (a live process drives it), ValueError (not resumable),
        ``ConfigErrors``, OSError."""
        if self._closed:
            raise RuntimeError("the workflow runner is closed; resume runs on a new one")
        job = load_interrupted(path)
        if job.run_id in self._active:
            raise ValueError(f"a run with the id {job.run_id!r} is running already")
        compiled = self.compile(job.spec)
        addresses = resolve_servers(job.spec, {**job.servers, **(servers or {})})
        senders: dict[str, Sender] = {name: self.sender(a) for name, a in addresses.items()}
        observers = [observer] if observer else []
        handle = self._new_handle(
            compiled, job.run_id, addresses, senders, job.inputs, None, observers
        )
        plan, handle.journal = take_over(self.journals, job, compiled, handle.run)
        self._connect(senders)
        self.notifications.subscribe_awaited(compiled, addresses)
        self._active[job.run_id] = handle
        self.post(go_live, plan)
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

    def _create_journal(self, path: Path) -> JournalFile:
        try:
            return self.journals.create(path)
        except FileExistsError:
            raise ValueError(
                f"journal {path} already exists and is not an empty file; it is never overwritten"
            ) from None
        except OSError as exc:
            raise ValueError(
                f"journal {path}: cannot create it: {describe_os_error(exc)}"
            ) from None

    def _new_handle(
        self,
        compiled: CompiledWorkflow,
        run_id: str,
        servers: dict[str, ServerAddress],
        senders: dict[str, Sender],
        context: Mapping[str, Any] | None,
        journal: JournalFile | None,
        observers: list[Observer],
        start_fields: Mapping[str, Any] | None = None,
    ) -> RunHandle:
        """A new run's handle, its await changes indexed by :attr:`notifications`."""
        handle = RunHandle(
            self, compiled, run_id, servers, senders, context, journal, observers, start_fields
        )
        handle.run.on_await_change = functools.partial(self.notifications.await_changed, handle)
        return handle

    @staticmethod
    def _connect(senders: dict[str, Sender]) -> None:
        """Connect here, on the caller's thread, so that most runs find their servers ready;
        a server that is down is connected later, off the dispatcher, when a run sends to it
        (and its failure follows the run's own error route)."""
        for sender in set(senders.values()):
            try:
                sender.connect()
            except (OSError, RpcError) as exc:
                log.warning(CONNECT_LATER, format_address(sender.address), exc)

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

    def durable(self, handle: RunHandle, error: OSError | None) -> None:
        """The journal writer has written ``handle``'s oldest unwritten ``send`` entry (or
        failed to): its command goes out on the dispatcher. One dispatcher event takes all
        the runs of a batch (thread-safe; an error is an event of its own)."""
        if error is not None:
            self.post(handle._durable_done, error)
            return
        self._durable.append(handle)
        if not self._durable_posted:  # appended first: the dispatcher clears, then takes
            self._durable_posted = True
            self._events.put(_Event(self._send_durable, ()))

    def _send_durable(self) -> None:
        self._durable_posted = False
        ready = self._durable
        while ready:
            handle = ready.popleft()
            try:
                handle._durable_done(None)
            except Exception:
                log.exception("run %s: sending a journaled command failed", handle.run_id)

    def post_timer(self, fn: Callable[..., object], /, *args: object) -> None:
        """Like :meth:`post`, ahead of every queued event: for timers (thread-safe)."""
        self._timers.append(_Event(fn, args))
        self._events.put(_WAKE)

    @property
    def notifications_waiting(self) -> int:
        """Notifications queued for the dispatcher (at most ``max_queued_notifications``)."""
        return self.notifications.waiting

    @property
    def notifications_dropped(self) -> int:
        """Notifications dropped because the queue was full."""
        return self.notifications.dropped

    @property
    def max_queued_notifications(self) -> int:
        """Notifications waiting for the dispatcher at most; more are dropped (default
        :data:`~controller.notifications.MAX_QUEUED_NOTIFICATIONS`)."""
        return self.notifications.max_queued

    @max_queued_notifications.setter
    def max_queued_notifications(self, value: int) -> None:
        self.notifications.max_queued = value

    @property
    def unsubscribe_after(self) -> float:
        """Seconds after the last run awaiting a method left it before the runner
        unsubscribes (default :data:`~controller.notifications.UNSUBSCRIBE_AFTER`)."""
        return self.notifications.unsubscribe_after

    @unsubscribe_after.setter
    def unsubscribe_after(self, value: float) -> None:
        self.notifications.unsubscribe_after = value

    def sender(self, address: ServerAddress) -> ClientSender:
        """The sender of one server address (created on first use, not connected yet).
        Raises :class:`ConnectionLostError` once the runner is closed."""
        with self._lock:
            if self._closed:
                raise ConnectionLostError("the workflow runner is closed")
            sender = self._senders.get(address)
            if sender is None:
                connect = functools.partial(self._new_client, address)
                sender = self._senders[address] = ClientSender(address, self.post, connect)
            return sender

    def _new_client(self, address: ServerAddress) -> BaseClient:
        """A connected client of ``address`` (a sender's connect thread; blocks)."""
        if isinstance(address, NodeAddress):
            from .mqtt.client import MqttClient

            return MqttClient(
                address, link=self._link(address), scheduler=self.scheduler, name=self.client_name
            )
        return Client(
            address,
            name=self.client_name,
            secret=self.secret,
            ssl=self.ssl,
            scheduler=self.scheduler,
        )

    def _link(self, address: NodeAddress) -> BrokerLink:
        """The one broker connection of ``address``'s broker (connected by its first client)."""
        from .mqtt.broker_link import BrokerLink

        with self._lock:
            if self._closed:
                raise ConnectionLostError("the workflow runner is closed")
            link = self._links.get(address.broker)
            if link is None:
                link = self._links[address.broker] = BrokerLink(address.broker, self.mqtt)
            return link

    def client(self, address: ServerAddress | str) -> BaseClient:
        """The shared client of one server address (``HOST:PORT`` or
        ``mqtt://BROKER/NODE``), connected on first use.

        Raises ``OSError``/:class:`RpcError` when the server cannot be reached, and
        :class:`ConnectionLostError` once the runner is closed. Connects to different
        addresses run in parallel.
        """
        return self.sender(parse_server(address)).client()

    def close(self) -> None:
        """Abort nothing; stop the dispatcher, write out the journals, stop the senders and
        the scheduler. Runs still going stop where they are: their journals end without a
        ``finished`` line, as after a crash (``statelink resume`` continues them). Abort them
        first to run their ``on_abort``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            senders = list(self._senders.values())
            links = list(self._links.values())
        self._events.put(None)
        self._dispatcher.join(timeout=10)
        self.journals.close()  # everything queued is written; never raises
        for handle in list(self._active.values()):
            handle._end()  # wait() returns (outcome None: it never finished)
        for sender in senders:
            sender.close()
        for link in links:
            link.close()
        self.scheduler.close()

    def __enter__(self) -> WorkflowRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------
    def _dispatch(self) -> None:
        events, timers = self._events, self._timers
        commit = self.journals.commit
        while True:
            if events.empty():
                commit()  # going idle: nothing more to journal soon, no entry waits for more
            event = events.get()
            while timers:
                self._apply(timers.popleft())
            if event is None:
                return
            if event is _NOTE:
                self.notifications.deliver_next()
            elif event is not _WAKE:
                self._apply(event)

    @staticmethod
    def _apply(event: _Event) -> None:
        try:
            event.fn(*event.args)
        except Exception:
            log.exception("workflow event %s failed", getattr(event.fn, "__name__", event.fn))

    def run_finished(self, handle: RunHandle) -> None:
        """A run finished (dispatcher thread): forget it; its ``wait`` returns once its
        ``finished`` entry is written (at once without a journal)."""
        self._active.pop(handle.run_id, None)
        if handle.journal is None:
            handle._end()  # else once its finished entry is written: _last_written


__all__ = [
    "MAX_QUEUED_NOTIFICATIONS",
    "UNSUBSCRIBE_AFTER",
    "ConnectionLostError",
    "Observer",
    "RunHandle",
    "WorkflowRunner",
    "describe_os_error",
    "new_run_id",
    "resolve_servers",
]
