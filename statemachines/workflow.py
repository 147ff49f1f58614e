"""Workflows: config -> :class:`WorkflowSpec` (``workflow_spec``), and the engine that runs
them, :class:`CompiledWorkflow` / :class:`WorkflowRun` (``workflow_machine``).

This module only re-exports; see ``docs/workflows.md`` for the config format and
"The workflow run contract" in ``docs/design.md`` for the engine's contract.
"""

from __future__ import annotations

from .workflow_machine import NEW_STATE, CompiledWorkflow, Effects, ErrorInfo, WorkflowRun
from .workflow_spec import (
    FINAL_OUTCOMES,
    ROUTABLE_KINDS,
    STATE_KEYS,
    TOP_KEYS,
    Choice,
    ErrorRoutes,
    RetrySpec,
    StateSpec,
    WorkflowSpec,
    check_against,
    format_duration,
    load_workflow,
    parse_address,
    parse_workflow,
)

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
