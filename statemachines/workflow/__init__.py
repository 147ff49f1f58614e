"""Workflows: the public API. This package only re-exports its modules, one job each:

* :mod:`.model`: the validated spec (:class:`WorkflowSpec`, :class:`StateSpec`, ...);
* :mod:`.reader` and :mod:`.loader`: YAML -> spec, reporting every problem
  (:func:`load_workflow`, :func:`parse_workflow`);
* :mod:`.check`: a spec against the servers' command catalogs (:func:`check_against`);
* :mod:`.events`: events, errors and journal entries between a run and its runner;
* :mod:`.run`: one run (:class:`WorkflowRun`) and the :class:`Effects` it asks for;
* :mod:`.prepare`, :mod:`.history`, :mod:`.sent`: how a run takes each event, its bounded
  history, its newest commands (for their late outcomes);
* :mod:`.machine`: the engine (:class:`CompiledWorkflow`, one ``transitions`` machine).

See ``docs/workflows.md`` for the config format and "The workflow run contract" in
``docs/design.md`` for the engine's contract.
"""

from __future__ import annotations

from ..addresses import parse_address
from ..durations import format_duration
from .check import check_against
from .events import ErrorInfo, JournalEntry
from .loader import STATE_KEYS, TOP_KEYS, load_workflow, parse_workflow
from .machine import CompiledWorkflow
from .model import (
    FINAL_OUTCOMES,
    ROUTABLE_KINDS,
    Choice,
    ErrorRoutes,
    RetrySpec,
    StateSpec,
    WorkflowSpec,
)
from .run import NEW_STATE, Effects, WorkflowRun

__all__ = [
    "FINAL_OUTCOMES",
    "NEW_STATE",
    "ROUTABLE_KINDS",
    "STATE_KEYS",
    "TOP_KEYS",
    "Choice",
    "CompiledWorkflow",
    "Effects",
    "ErrorInfo",
    "ErrorRoutes",
    "JournalEntry",
    "RetrySpec",
    "StateSpec",
    "WorkflowRun",
    "WorkflowSpec",
    "check_against",
    "format_duration",
    "load_workflow",
    "parse_address",
    "parse_workflow",
]
