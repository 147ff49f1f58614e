"""What flows between a run and its runner besides the :class:`~.run.Effects` calls: the events
the runner reports (one dataclass each), the errors (:class:`ErrorInfo`), the journal lines
(:class:`JournalEntry`) a run writes, and the action tokens. See "The workflow run contract"
in ``docs/design.md``.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, TypedDict

from ..errorkinds import kind_of

__all__ = [
    "Ending",
    "ErrorInfo",
    "ErrorJson",
    "Failure",
    "JournalEntry",
    "Json",
    "Notified",
    "Reply",
    "Tick",
    "next_token",
    "now",
    "timestamp",
]

#: A JSON value as it comes from or goes to a server (result, params, error data).
Json = Any


class ErrorJson(TypedDict):
    """An error in a journal entry."""

    kind: str
    code: int | None
    message: str
    data: Json


class _EntryHead(TypedDict):
    time: str
    state: str
    event: str


class JournalEntry(_EntryHead, total=False):
    """One journal line of a run: ``time``, ``state`` and ``event`` always, the rest by event;
    ``at`` (epoch seconds, the instant of ``time``) on every recorded entry.

    Events: ``start`` (workflow, run, inputs; the runner adds workflow_text, workflow_file,
    servers, options, started), ``send`` (written by the runner, on disk before the command
    goes out: server, command, params, key, attempt, visit, timeout, deadline), ``reply``
    (server, command, params, key, attempt, result), ``error`` (server, command, params, key,
    attempt, error; ``retry_in`` when retried, ``unhandled`` when nothing routes it), ``late``
    (server, command, key, attempt, result or error: an outcome that came after its state was
    left or after the client-side timeout; ``state`` is the command's state), ``retry``
    (attempt), ``waited``, ``await_timeout`` (server, method, error), ``notification``
    (server, method, params), ``choice`` (choice), ``abort`` (``reason`` when it is not a plain
    abort, e.g. the journal cannot be written), ``workflow_timeout`` (timeout),
    ``expression_error`` (expression, message), ``internal_error`` (message), ``finished``
    (final, reason). ``next`` names the state the event leads to, when it leads to one.
    ``replayed`` (true, on reply, error and late entries): the server answered with the
    stored outcome of the key's earlier execution.
    """

    at: float
    next: str
    workflow: str
    run: str
    inputs: dict[str, Json]
    workflow_text: str
    workflow_file: str
    servers: dict[str, str]
    options: dict[str, Json]
    started: float
    server: str | None
    command: str | None
    method: str | None
    params: Json
    key: str
    replayed: bool
    attempt: int
    visit: int
    deadline: float
    result: Json
    error: ErrorJson
    retry_in: float
    unhandled: bool
    choice: str
    timeout: float | None
    expression: str
    message: str
    final: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class Ending:
    """How a run that entered ``on_abort`` will end, whatever final state it reaches."""

    outcome: str
    reason: str


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """One error outcome: ``kind`` (see ``errorkinds``), JSON-RPC ``code``, message, data."""

    kind: str
    code: int | None
    message: str
    data: Json = None

    @classmethod
    def of(cls, kind: str | None, code: int | None, message: str, data: Json = None) -> ErrorInfo:
        """An error outcome; ``kind`` None (or empty) is derived from ``code``."""
        if not kind:
            kind = kind_of(code) if isinstance(code, int) else "server_error"
        return cls(kind, code, message, data)

    def as_dict(self) -> ErrorJson:
        return {"kind": self.kind, "code": self.code, "message": self.message, "data": self.data}


# --- events: what the runner reports back (one object per event) --------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """The command ``token`` succeeded with ``result`` (``replayed``: a stored outcome)."""

    token: int
    result: Json
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Failure:
    """The command ``token`` failed (``replayed``: a stored outcome)."""

    token: int
    error: ErrorInfo
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """The timer ``token`` expired (or a choice state decides, with its own token)."""

    token: int


@dataclass(frozen=True, slots=True)
class Notified:
    """A notification an await state (action ``token``) waits for arrived."""

    token: int
    server: str
    method: str
    params: Json


#: Tokens are unique in the process, so a runner may key timers and calls by token alone.
next_token = itertools.count(1).__next__

_clock: tuple[int, str] = (-1, "")


def now() -> str:
    """ISO-8601 UTC with milliseconds, e.g. ``2025-01-31T12:00:00.123Z``."""
    return _iso(time.time())


def timestamp() -> tuple[str, float]:
    """The current instant as an entry's ``time`` (:func:`now`'s form) and ``at`` (epoch
    seconds, rounded to the millisecond)."""
    t = time.time()
    return _iso(t), math.floor(t * 1000) / 1000


def _iso(t: float) -> str:
    global _clock
    sec = int(t)
    cached_sec, text = _clock
    if cached_sec != sec:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _clock = (sec, text)
    return f"{text}.{int((t - sec) * 1000):03d}Z"
