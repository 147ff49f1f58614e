"""``statelink runs``: the runs of a state directory, newest first (one line each, or JSON).

Columns: run id, workflow, the state it last entered, outcome (``success``, ``failure``,
``aborted``; ``running`` while a live process drives it; ``interrupted`` when its process died:
``statelink resume RUN_ID`` continues it), started, and its last event with its time.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from .common import EXIT_OK, add_state_dir_arg, examples, state_dir_option

if TYPE_CHECKING:
    from ..journal import RunSummary
    from .common import Subparsers

#: outcomes of runs that have not finished
UNFINISHED = ("running", "interrupted")
_COLUMNS = ("RUN", "WORKFLOW", "STATE", "OUTCOME", "STARTED", "LAST EVENT")


def register(sub: Subparsers) -> None:
    runs = sub.add_parser(
        "runs",
        help="list the runs of the state directory, newest first",
        **examples("statelink runs --unfinished", "statelink runs --json"),
    )
    runs.set_defaults(handler=cmd_runs)
    add_state_dir_arg(runs, "whose runs/ to list")
    runs.add_argument(
        "--unfinished",
        action="store_true",
        help="only runs that have not finished (running, or interrupted: resumable)",
    )
    runs.add_argument("--json", action="store_true", help="one JSON array of objects")


def as_json(run: RunSummary) -> dict[str, Any]:
    """One run as ``statelink runs --json`` prints it."""
    return {
        "run": run.run_id,
        "workflow": run.workflow,
        "state": run.state,
        "outcome": run.outcome,
        "started": run.started,
        "last_event": run.last_event,
        "last_time": run.last_time,
        "pid": run.owner,
        "journal": str(run.path),
    }


def cmd_runs(args: argparse.Namespace) -> int:
    from ..journal import RUNS_DIR, list_runs

    state_dir = state_dir_option(args.state_dir)
    runs = list_runs(state_dir)
    if args.unfinished:
        runs = [run for run in runs if run.outcome in UNFINISHED]
    if args.json:
        print(json.dumps([as_json(run) for run in runs], indent=2))
        return EXIT_OK
    if not runs:
        which = "unfinished runs" if args.unfinished else "runs"
        print(f"no {which} in {state_dir / RUNS_DIR}")
        return EXIT_OK
    rows = [
        (
            run.run_id,
            run.workflow,
            run.state,
            run.outcome if run.owner is None else f"{run.outcome} (pid {run.owner})",
            run.started,
            f"{run.last_event} {run.last_time}",
        )
        for run in runs
    ]
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    for row in [_COLUMNS, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return EXIT_OK
