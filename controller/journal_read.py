"""Reading run journals: entries, torn tails, which process drives a run, the runs of a state
directory. No writing (that is :mod:`controller.journal`, which re-exports all of this).

- :func:`read_journal`: every entry; an unfinished last line (a torn write) is ignored and
  flagged; any other bad line is a :class:`JournalCorrupt` naming its line number.
- :func:`journal_owner`: the pid of the live process driving a run, from the ``pid`` and
  ``lock`` of its last ``start``/``resumed`` entry and a flock probe of that lock file; None
  when it finished or its process died (the run is ``interrupted``: resumable).
- :func:`list_runs`: ``STATE_DIR/runs/*.jsonl``, newest first, reading only the first line and
  the tail of each file (10,000 journals in well under a second).
- :func:`check_new_journal_path`: the one usage check of a ``--journal`` path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("statelink.journal")

RUNS_DIR = "runs"  #: the journals' directory in the state directory
OWNER_EVENTS = ("start", "resumed")  #: entries that name the process driving the run
_CHUNK = 16384


class JournalCorrupt(ValueError):
    """A line of a journal (not a torn last line) is not a journal entry."""


@dataclass
class Journal:
    """A journal as read: its ``entries``; ``torn`` when an unfinished last line was ignored;
    ``size``: bytes of the complete lines."""

    path: Path
    entries: list[dict[str, Any]]
    torn: bool = False
    size: int = 0

    @property
    def finished(self) -> dict[str, Any] | None:
        """The ``finished`` entry (always the last one), if the run finished."""
        last = self.entries[-1] if self.entries else None
        return last if last is not None and last.get("event") == "finished" else None


@dataclass(frozen=True)
class RunSummary:
    """One run of ``list_runs``: ``outcome`` is the ``final`` of its ``finished`` entry, or
    ``running`` (a live process drives it: ``owner``), or ``interrupted`` (resumable)."""

    run_id: str
    path: Path
    workflow: str
    state: str  #: the state the run last entered
    outcome: str
    started: str
    last_time: str
    last_event: str
    owner: int | None


def check_new_journal_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a new journal's path; ValueError (one line) if no journal can be made there:
    a missing directory, a directory, an existing non-empty file (never overwritten)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"journal {p} is a directory: give a file path")
    parent = p.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ValueError(f"journal {p}: directory {parent} {what}")
    with contextlib.suppress(FileNotFoundError):
        if p.stat().st_size > 0:
            if _is_journal(p):
                raise ValueError(
                    f"journal {p} already exists; continue that run with: statelink resume {p}"
                )
            raise ValueError(f"{p} already exists and is not empty; it is never overwritten")
    return p


def read_journal(path: str | os.PathLike[str]) -> Journal:
    """Every entry of a journal. An unfinished last line (a torn write) is ignored
    (``torn``); any other line that is not a JSON object raises :class:`JournalCorrupt`
    naming its line number. OSError if it cannot be read."""
    p = Path(path)
    data = p.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    entries = [_parse(p, number, line) for number, line in enumerate(lines, 1)]
    return Journal(p, entries, bool(tail), len(data) - len(tail))


def journal_owner(path: str | os.PathLike[str]) -> int | None:
    """The pid of the live process driving this run, or None (finished, or its process died
    or closed its writer: resumable)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        lines = _lines_back(f, size)
        last = next(lines, None)
        if last is None or _parse(Path(path), 0, last).get("event") == "finished":
            return None
        return _live_owner(_owner_entry(Path(path), f, lines, last), {})


def list_runs(state_dir: str | os.PathLike[str]) -> list[RunSummary]:
    """The runs of ``state_dir/runs`` (``*.jsonl``), newest first. Reads the first line and
    the tail of each file (more only for an unfinished run resumed long ago). Files that
    cannot be read or do not start with a ``start`` entry are skipped (logged)."""
    probes: dict[str, bool] = {}
    runs = []
    for path in Path(state_dir, RUNS_DIR).glob("*.jsonl"):
        try:
            summary = _summary(path, probes)
        except (OSError, ValueError) as exc:
            log.info("runs: skipping %s: %s", path, exc)
            continue
        if summary is not None:
            runs.append(summary)
    runs.sort(key=lambda run: (run.started, run.run_id), reverse=True)
    return runs


def _summary(path: Path, probes: dict[str, bool]) -> RunSummary | None:
    with open(path, "rb") as f:
        head = f.readline()
        if not head.endswith(b"\n"):
            return None  # being created
        start = _parse(path, 1, head)
        if start.get("event") != "start":
            raise JournalCorrupt(f"{path}:1: the first entry is not a start entry")
        size = os.fstat(f.fileno()).st_size
        lines = _lines_back(f, size)
        last = _parse(path, 0, next(lines, head))
        owner = None
        if last.get("event") == "finished":
            outcome = str(last.get("final"))
        else:
            owner = _live_owner(_owner_entry(path, f, lines, last, start), probes)
            outcome = "interrupted" if owner is None else "running"
    return RunSummary(
        run_id=str(start.get("run") or path.stem),
        path=path,
        workflow=str(start.get("workflow", "")),
        state=str(last.get("next") or last.get("state", "")),
        outcome=outcome,
        started=str(start.get("time", "")),
        last_time=str(last.get("time", "")),
        last_event=str(last.get("event", "")),
        owner=owner,
    )


def _parse(path: Path, number: int, line: bytes) -> dict[str, Any]:
    where = f"{path}:{number}" if number else f"{path} (near its end)"
    try:
        entry = json.loads(line)
    except ValueError as exc:
        raise JournalCorrupt(f"{where}: not a JSON line: {exc}") from None
    if not isinstance(entry, dict):
        raise JournalCorrupt(f"{where}: not a JSON object")
    return entry


def _is_journal(path: Path) -> bool:
    with contextlib.suppress(OSError, ValueError), open(path, "rb") as f:
        return "event" in _parse(path, 1, f.readline(65536))
    return False


def _lines_back(f: Any, size: int) -> Iterator[bytes]:
    """The complete lines of an open file, last first (a torn last line is skipped)."""
    end, rest, tail_dropped = size, b"", False
    while end > 0:
        start = max(0, end - _CHUNK)
        f.seek(start)
        parts = (f.read(end - start) + rest).split(b"\n")
        end = start
        rest = parts.pop(0) if start > 0 else b""  # a line that may begin before `start`
        if not tail_dropped:
            if not parts:
                continue  # still inside the last line
            parts.pop()  # after the last newline: b"" or a torn line
            tail_dropped = True
        yield from (line for line in reversed(parts) if line)


def _owner_entry(
    path: Path,
    f: Any,
    lines: Iterator[bytes],
    last: bytes | dict[str, Any],
    start: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The last ``start``/``resumed`` entry: ``last`` or one of ``lines`` (read backwards)."""
    entry = last if isinstance(last, dict) else _parse(path, 0, last)
    if entry.get("event") in OWNER_EVENTS:
        return entry
    for line in lines:
        if b'"resumed"' in line or (start is None and b'"start"' in line):
            entry = _parse(path, 0, line)
            if entry.get("event") in OWNER_EVENTS:
                return entry
    return start


def _live_owner(entry: dict[str, Any] | None, probes: dict[str, bool]) -> int | None:
    if not entry or not isinstance(entry.get("lock"), str):
        return None
    lock = entry["lock"]
    if lock not in probes:
        probes[lock] = _lock_held(lock)
    return int(entry["pid"]) if probes[lock] else None


def _lock_held(path: str) -> bool:
    """True if some open file (this process included) holds a flock on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops our probe's shared lock
    return False
