"""One run of the workflow runner (:class:`RunHandle`) and the I/O done on its behalf
(:class:`RunEffects`, the run's ``Effects``): commands to its senders, timers to the
scheduler, journal entries to the journal and the observers.

A journaled run's ``send`` entry is on disk before its command goes out: the send happens
once the entry's durability callback came back to the dispatcher (:meth:`HandleHost.durable`:
one dispatcher event per journal batch, not one per command). A journal that cannot be
written sends the run to its ``on_abort`` path, failing with the reason "journal write
failed: ..." (:attr:`RunHandle.journal_error`); in that path its commands fail at once with
that reason (never a device command without its record).

Everything here runs on the runner's dispatcher thread, except the journal callbacks (on the
journal writer's thread: they only post or set) and :meth:`RunHandle.wait` / ``abort``.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from statemachines import errorkinds as ek
from statemachines.addresses import ServerAddress
from statemachines.workflow import CompiledWorkflow, JournalEntry, WorkflowRun
from statemachines.workflow.events import timestamp

from .journal import JournalClosed, JournalFile, JournalWriter
from .scheduler import Scheduler
from .senders import Command, Sender

__all__ = ["HandleHost", "Observer", "RunEffects", "RunHandle", "describe_os_error"]

log = logging.getLogger("statelink.runner")

Observer = Callable[["RunHandle", JournalEntry], None]


class HandleHost(Protocol):
    """What a run handle needs of its runner (:class:`~controller.runner.WorkflowRunner`)."""

    scheduler: Scheduler
    journals: JournalWriter

    def post(self, fn: Callable[..., object], /, *args: object) -> None:
        """Queue ``fn(*args)`` for the dispatcher thread (thread-safe)."""

    def post_timer(self, fn: Callable[..., object], /, *args: object) -> None:
        """Like ``post``, ahead of every queued event (thread-safe)."""

    def durable(self, handle: RunHandle, error: OSError | None) -> None:
        """The oldest of ``handle``'s unwritten ``send`` entries is on disk (``error`` None)
        or failed: call ``handle._durable_done(error)`` on the dispatcher (thread-safe)."""

    def run_finished(self, handle: RunHandle) -> None:
        """The run finished (dispatcher thread): forget it."""


def describe_os_error(error: OSError) -> str:
    """``strerror: filename`` (or the error as text): an OSError in one short phrase."""
    if error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    return error.strerror or str(error)


class RunHandle:
    """One run of a workflow: wait for it, abort it, read its state, context and history."""

    def __init__(
        self,
        runner: HandleHost,
        compiled: CompiledWorkflow,
        run_id: str,
        servers: dict[str, ServerAddress],
        senders: dict[str, Sender],
        context: Mapping[str, Any] | None,
        journal: JournalFile | None,
        observers: list[Observer],
        start_fields: Mapping[str, Any] | None = None,
    ):
        self.runner = runner
        self.run_id = run_id
        self.servers = servers
        self.journal = journal  #: None: the run is not journaled
        #: set when a journal entry could not be written (the run then goes to on_abort)
        self.journal_error: OSError | None = None
        self._senders = senders
        self._observers = observers
        self._start_fields = dict(start_fields or {})  #: added to the start entry
        #: commands whose ``send`` entry is queued, oldest first (durable in that order;
        #: rarely more than one: a list, smaller than a deque for 10,000 runs)
        self._unwritten: list[Command] = []
        # the journal callbacks of every step, bound once (not an object per entry, which
        # the garbage collector would promote and count while the entry waits for its batch)
        self._on_written = self._written
        self._on_send_written = self._send_written
        self._done = threading.Event()
        self.run: WorkflowRun = compiled.new_run(RunEffects(runner, self), run_id, context)

    @property
    def journal_path(self) -> Path | None:
        return None if self.journal is None else self.journal.path

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
        """The newest journal entries: at most ~1 MiB of them as JSON (and 2,000 entries); an
        entry over 64 KiB keeps its large values only in the journal (see ``HISTORY_BYTES``)."""
        return self.run.history

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until the run finishes (or ``timeout``); return its outcome. A journaled
        run's journal holds its ``finished`` entry by then."""
        self._done.wait(timeout)
        return self.run.outcome if self._done.is_set() else None

    def abort(self) -> None:
        """Abort: cancel the command in flight (``rpc.cancel``, so the device is free for the
        clean-up), then enter the ``on_abort`` state (if any); the outcome is "aborted"."""
        self.runner.post(self.run.abort)  # the run abandons its command: RunEffects.abandon

    def _end(self) -> None:
        """Finished (and journaled), or the runner closed: wait() returns."""
        self._done.set()

    # journal callbacks: on the journal writer's thread (they only post or set)
    def _written(self, error: OSError | None) -> None:
        if error is not None:
            self.runner.post(self._journal_failed, error, None)

    def _last_written(self, error: OSError | None) -> None:
        if error is not None and self.journal_error is None:
            self.journal_error = error
        self._end()

    def _send_written(self, error: OSError | None) -> None:
        self.runner.durable(self, error)

    # on the dispatcher thread
    def _durable_done(self, error: OSError | None) -> None:
        """The oldest unwritten ``send`` entry is on disk (or could not be written)."""
        command = self._unwritten.pop(0)
        self._send_durable(self._senders[command.server], command, error)

    def _send_durable(self, sender: Sender, command: Command, error: OSError | None) -> None:
        """The command's ``send`` entry is on disk (or could not be written)."""
        if error is not None:
            self._journal_failed(error, command)
        elif command.run.expects(command.token):
            sender.send(command)

    def _journal_failed(self, error: OSError, command: Command | None) -> None:
        if self.journal_error is None:
            self.journal_error = error
            log.error("run %s: journal write failed: %s", self.run_id, error)
        run = self.run
        if run.done:
            return
        reason = f"journal write failed: {describe_os_error(error)}"
        if run.ending is None:
            run.abort(reason)
        elif command is not None and run.expects(command.token):  # in the on_abort path
            run.on_error(command.token, ek.kind_of(ek.INTERNAL_ERROR), ek.INTERNAL_ERROR, reason)


class RunEffects:
    """The I/O a run asks for (statemachines' ``Effects``), done on its behalf on the
    dispatcher thread: commands go to the run's senders, timers to the scheduler, journal
    entries to the journal and the observers."""

    __slots__ = ("handle", "runner")

    def __init__(self, runner: HandleHost, handle: RunHandle):
        self.runner = runner
        self.handle = handle

    def send_command(
        self, run: WorkflowRun, token: int, server: str, method: str, params: Any, timeout: float
    ) -> None:
        handle = self.handle
        command = Command(run, token, server, method, params, timeout, run.command_key)
        sender = handle._senders[server]
        if handle.journal is None:
            sender.send(command)
            return
        time_text, at = timestamp()
        entry: JournalEntry = {
            "time": time_text,
            "state": run.state,
            "event": "send",
            "server": server,
            "command": method,
            "params": params,
            "key": run.command_key,
            "attempt": run.attempt,
            "visit": run.visit,
            "timeout": timeout,
            "deadline": round(at + timeout, 3),
            "at": at,
        }
        # the command goes out once its entry is on disk: handle._durable_done, on the
        # dispatcher, which cannot run before this returns (the command is unwritten by then)
        try:
            self.runner.journals.append(
                handle.journal, entry, durable=True, on_durable=handle._on_send_written
            )
        except (JournalClosed, TypeError, ValueError) as exc:  # closed, or not JSON
            error = OSError(errno.EIO, f"cannot journal a send entry: {exc}")
            self.runner.post(handle._send_durable, sender, command, error)
        else:
            handle._unwritten.append(command)

    def start_timer(self, run: WorkflowRun, token: int, delay: float) -> None:
        self.runner.scheduler.call_later(delay, self.runner.post_timer, run.on_timer, token)

    def abandon(self, run: WorkflowRun, token: int) -> None:
        """The run leaves command ``token`` (abort, workflow timeout, an error route after a
        client-side timeout): its sender cancels it (``rpc.cancel``) if it may still run, so
        the device is free for what comes next; a timer token is nobody's."""
        for sender in set(self.handle._senders.values()):
            sender.cancel(run, token)

    def record(self, run: WorkflowRun, entry: JournalEntry) -> None:
        handle = self.handle
        entry["time"], entry["at"] = timestamp()  # one instant: a resume computes from "at"
        if handle.journal is not None:
            event = entry["event"]
            if event == "start":
                entry.update(handle._start_fields)  # type: ignore[typeddict-item]
                entry["started"] = entry["at"]
            last = event == "finished"
            self._append(entry, on_durable=handle._last_written if last else handle._on_written)
        for observer in handle._observers:
            try:
                observer(handle, entry)
            except Exception:
                log.exception("run observer failed")

    def finished(self, run: WorkflowRun) -> None:
        self.runner.run_finished(self.handle)

    def _append(
        self,
        entry: JournalEntry,
        durable: bool = False,
        on_durable: Callable[[OSError | None], None] | None = None,
    ) -> None:
        handle = self.handle
        assert handle.journal is not None
        try:
            self.runner.journals.append(
                handle.journal, entry, durable=durable, on_durable=on_durable
            )
        except (JournalClosed, TypeError, ValueError) as exc:  # closed, or not JSON
            if on_durable is not None:
                on_durable(OSError(errno.EIO, f"cannot journal a {entry['event']} entry: {exc}"))
