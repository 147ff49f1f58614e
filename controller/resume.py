"""Resuming an interrupted run (:meth:`WorkflowRunner.resume`): find and check its journal,
rebuild its workflow from the journal's ``start`` entry, write the ``resumed`` entry, and go
live on the plan of :func:`statemachines.workflow.replay.replay`.

- :func:`find_journal`: ``RUN_ID`` (``STATE_DIR/runs/RUN_ID.jsonl``) or a journal's path.
- :func:`load_interrupted`: the journal as read, its workflow and what the run started with;
  :class:`RunFinished` for a finished run, :class:`~controller.journal.JournalBusy` for one a
  live process drives.
- :func:`take_over`: the replay into the runner's run, then the ``resumed`` entry, written
  under the journal's lock (``JournalWriter.reopen``).
- :func:`go_live` (dispatcher thread): the entries the crash lost, the await index, the
  timers at their original due times, the command sent again with its key.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from statemachines.workflow import CompiledWorkflow, WorkflowRun, WorkflowSpec, parse_workflow
from statemachines.workflow.events import timestamp
from statemachines.workflow.replay import ResumePlan, replay

from .journal import (
    RUNS_DIR,
    Journal,
    JournalBusy,
    JournalFile,
    JournalWriter,
    journal_owner,
    read_journal,
)

__all__ = [
    "Interrupted",
    "JournalBusy",
    "RunFinished",
    "find_journal",
    "go_live",
    "load_interrupted",
    "take_over",
]


class RunFinished(ValueError):
    """The run finished: there is nothing to resume."""

    def __init__(self, run_id: str, outcome: str) -> None:
        super().__init__(f"run {run_id} already finished ({outcome})")
        self.run_id = run_id
        self.outcome = outcome


@dataclass(frozen=True)
class Interrupted:
    """An interrupted run as its journal tells it."""

    path: Path
    journal: Journal
    spec: WorkflowSpec  #: rebuilt from the journal's ``workflow_text``
    run_id: str
    inputs: dict[str, Any] | None
    servers: dict[str, str]  #: name -> "host:port", as the run resolved them
    options: dict[str, Any]  #: ``secret_file``, ``tls``, ``tls_ca``, ...


def find_journal(ref: str | os.PathLike[str], state_dir: str | os.PathLike[str]) -> Path:
    """The journal of ``ref``: a file path, or a run id of ``state_dir``'s ``runs/``.
    ValueError (one line) when there is neither."""
    path = Path(ref)
    if path.is_file():
        return path
    text = os.fspath(ref)
    if os.sep not in text and not text.endswith(".jsonl"):
        candidate = Path(state_dir, RUNS_DIR, f"{text}.jsonl")
        if candidate.is_file():
            return candidate
        raise ValueError(
            f"no run {text} in {Path(state_dir, RUNS_DIR)} (statelink runs lists them)"
        )
    raise ValueError(f"no run journal {path}")


def load_interrupted(path: str | os.PathLike[str]) -> Interrupted:
    """Read the journal of an interrupted run and rebuild its workflow.

    Raises :class:`RunFinished`, :class:`JournalBusy` (a live process drives it), ValueError
    (not a journal, or one that cannot be resumed; ``JournalCorrupt`` is one),
    ``ConfigErrors`` (its workflow text does not load), OSError."""
    p = Path(path)
    journal = read_journal(p)
    entries = journal.entries
    if not entries or entries[0].get("event") != "start":
        raise ValueError(f"{p} is not a run journal (no start entry): nothing to resume")
    start = entries[0]
    run_id = str(start.get("run") or p.stem)
    finished = journal.finished
    if finished is not None:
        raise RunFinished(run_id, str(finished.get("final")))
    owner = journal_owner(p)
    if owner is not None:
        raise JournalBusy(p, owner)
    text = start.get("workflow_text")
    if not isinstance(text, str):
        raise ValueError(
            f"run {run_id}: its journal does not hold the workflow's text: it cannot be resumed"
        )
    spec = parse_workflow(text, str(start.get("workflow_file") or f"{p} (workflow_text)"))
    inputs = start.get("inputs")
    servers = start.get("servers")
    options = start.get("options")
    return Interrupted(
        path=p,
        journal=journal,
        spec=spec,
        run_id=run_id,
        inputs=dict(inputs) if isinstance(inputs, dict) else None,
        servers={str(k): str(v) for k, v in servers.items()} if isinstance(servers, dict) else {},
        options=dict(options) if isinstance(options, dict) else {},
    )


def take_over(
    writer: JournalWriter, job: Interrupted, compiled: CompiledWorkflow, run: WorkflowRun
) -> tuple[ResumePlan, JournalFile]:
    """Replay the journal into ``run`` (a new run of ``compiled``, the runner's), then write
    the ``resumed`` entry (durably, under the journal's lock); the plan and the journal to
    append to. Raises ``ReplayMismatch`` (a ValueError), :class:`RunFinished` /
    :class:`JournalBusy` if that changed since :func:`load_interrupted`, ValueError if the
    journal grew meanwhile, OSError; the run is then dropped from the machine."""
    try:
        plan = replay(compiled, job.journal.entries, run=run)
        now, at = timestamp()
        resumed = {
            "event": "resumed",
            "time": now,
            "at": at,
            "state": run.state,
            "pending": plan.pending(at),
        }
        try:
            journal, before = writer.reopen(job.path, resumed)
        except ValueError as exc:
            finished = _finished_outcome(job.path)
            if finished is not None:
                raise RunFinished(job.run_id, finished) from exc
            raise
        if len(before.entries) != len(job.journal.entries):
            raise ValueError(f"run {job.run_id}: its journal changed while resuming; try again")
    except BaseException:
        if not run.done:
            compiled.release(run)
        raise
    return plan, journal


def _finished_outcome(path: Path) -> str | None:
    try:
        finished = read_journal(path).finished
    except (OSError, ValueError):
        return None
    return None if finished is None else str(finished.get("final"))


def go_live(plan: ResumePlan) -> None:
    """On the dispatcher thread, once the run has its live effects: journal the entries the
    crash lost, index the await (subscribing), arm the timers at their due times (at once if
    past), send the pending command again with its key (its ``send`` entry first)."""
    run = plan.run
    effects = run.effects
    for entry in plan.extra:
        effects.record(run, entry)
    if run.done:
        effects.finished(run)
        return
    if run.awaiting is not None and run.on_await_change is not None:
        run.on_await_change(run)
    now = time.time()
    for timer in plan.timers:
        effects.start_timer(run, timer.token, timer.remaining(now))
    send = plan.send
    if send is not None:
        effects.send_command(run, send.token, send.server, send.command, send.params, send.timeout)
