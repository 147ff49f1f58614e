"""The newest commands a run has sent (bounded), so that an outcome that comes after the run
stopped waiting for it (the state was left, or the client-side timeout already answered) is
journaled as a ``late`` entry instead of being lost."""

from __future__ import annotations

from .events import ErrorJson, JournalEntry, Json, now

__all__ = ["SENT_LIMIT", "SentCommands"]

#: commands remembered per run (the oldest forgotten first): a late outcome of an older one
#: is not journaled
SENT_LIMIT = 16


class SentCommands:
    """token -> what a ``late`` entry of that command says (state, server, command, key,
    attempt). Each command gets at most one late entry."""

    __slots__ = ("_heads",)

    def __init__(self) -> None:
        self._heads: dict[int, JournalEntry] = {}

    def __contains__(self, token: int) -> bool:
        return token in self._heads

    def add(
        self, token: int, state: str, server: str, command: str, key: str, attempt: int
    ) -> None:
        heads = self._heads
        heads[token] = {
            "time": "",
            "state": state,
            "event": "late",
            "server": server,
            "command": command,
            "key": key,
            "attempt": attempt,
        }
        if len(heads) > SENT_LIMIT:
            del heads[next(iter(heads))]  # the oldest

    def answered(self, token: int) -> None:
        """Command ``token`` got its (successful) reply: no late outcome can follow."""
        self._heads.pop(token, None)

    def late(
        self,
        token: int,
        *,
        result: Json = None,
        error: ErrorJson | None = None,
        replayed: bool = False,
    ) -> JournalEntry | None:
        """The ``late`` entry of command ``token`` (None if not remembered, or once given)."""
        head = self._heads.pop(token, None)
        if head is None:
            return None
        entry: JournalEntry = {**head, "time": now()}
        if error is not None:
            entry["error"] = error
        else:
            entry["result"] = result
        if replayed:
            entry["replayed"] = True
        return entry
