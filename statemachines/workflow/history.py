"""A run's newest journal entries (:attr:`WorkflowRun.history`), bounded in entries and in
bytes: large results stay in the journal, not in memory."""

from __future__ import annotations

import json
from typing import Any

from .events import JournalEntry

__all__ = ["HISTORY_BYTES", "HISTORY_ENTRY_BYTES", "HISTORY_LIMIT", "History"]

#: The history keeps the newest entries: at most twice this, trimmed to this.
HISTORY_LIMIT = 1000
#: ... and at most this many bytes of them (as JSON), the oldest dropped first.
HISTORY_BYTES = 1 << 20
#: An entry larger than this (as JSON) is kept in the history with its large values replaced
#: by a note of their size (the journal has them whole).
HISTORY_ENTRY_BYTES = 64 << 10
_BIG_FIELDS = ("result", "params", "error", "inputs", "workflow_text")
_json_size = json.JSONEncoder(default=str).encode  # len() of it: a value's size
_SMALL_FIELDS = 256  #: what an entry's other fields (names, times, numbers) take, at most


def _size(entry: JournalEntry) -> int:
    """An entry's size as JSON, near enough for the bound: its fields that can be large
    measured, the others counted as :data:`_SMALL_FIELDS` (no encoding of a whole entry on
    every step)."""
    size = _SMALL_FIELDS
    for name in _BIG_FIELDS:
        value = entry.get(name)
        if value is None or isinstance(value, (bool, int, float)):
            size += 8
        elif isinstance(value, str):
            size += len(value) + 2
        else:
            size += len(_json_size(value))
    return size


class History:
    """``entries``: the newest journal entries, oldest first (one list, trimmed in place)."""

    __slots__ = ("_bytes", "_sizes", "entries")

    def __init__(self) -> None:
        self.entries: list[JournalEntry] = []
        self._sizes: list[int] = []  #: the JSON size of each entry
        self._bytes = 0

    def add(self, entry: JournalEntry) -> None:
        """Add ``entry`` (slimmed if large), dropping the oldest entries over the bounds."""
        size = _size(entry)
        if size > HISTORY_ENTRY_BYTES:
            entry, size = _slim(entry)
        history, sizes = self.entries, self._sizes
        history.append(entry)
        sizes.append(size)
        total = self._bytes + size
        if len(history) > 2 * HISTORY_LIMIT or total > HISTORY_BYTES:
            # keep the newest entries (the newest always), at most HISTORY_LIMIT of them and
            # 3/4 of HISTORY_BYTES: trimming is rare, its cost spread over many entries
            keep, total = 1, size
            budget, most = HISTORY_BYTES * 3 // 4, min(len(history), HISTORY_LIMIT)
            while keep < most and total + sizes[-keep - 1] <= budget:
                total += sizes[-keep - 1]
                keep += 1
            del history[:-keep]
            del sizes[:-keep]
        self._bytes = total


def _slim(entry: JournalEntry) -> tuple[JournalEntry, int]:
    """A copy of ``entry`` for the history with its large values replaced by a note of their
    size; its JSON size."""
    slim: dict[str, Any] = dict(entry)
    for name in _BIG_FIELDS:
        if name in slim:
            size = len(_json_size(slim[name]))
            if size > 1024:
                slim[name] = f"({size} bytes: in the journal)"
    return slim, _size(slim)  # type: ignore[arg-type,return-value]
