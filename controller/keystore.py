"""The device side's durable record of idempotency keys (SQLite, standard library only).

One :class:`KeyStore` per server, one SQLite file (``state_dir / KEYS_FILE``), one row per key:
the method, the device, a fingerprint of the params (:func:`fingerprint`), the state
(``running`` | ``done`` | ``interrupted``), the outcome (a result, or an error
``{code, message, data}``) and the created / finished times (``clock()``, wall-clock seconds).

Lifetime: :meth:`KeyStore.open` / :meth:`KeyStore.close`, or ``with KeyStore(path) as store``.
``KeyStore(None)`` keeps the keys in memory only (an in-memory SQLite database, no file, no
lock): the same contract, but nothing survives :meth:`~KeyStore.close`.

- ``open()`` creates the directory (0700) and the file (0600) when missing, takes an exclusive
  lock on ``<path>.lock`` (a second store on the same file, in this process or another, gets
  :class:`KeyStoreLocked`), switches the file to WAL mode, marks every row a previous process
  left ``running`` as ``interrupted`` (listed in :attr:`KeyStore.interrupted_at_open` as (key,
  method, device), so the server can put those devices in ``fault`` with reason
  "interrupted"), applies retention and the bound, and loads every row into memory.
- Durability: with ``fsync=True`` (default; ``synchronous=FULL``) a commit is fsynced, so it
  survives a power loss; with ``fsync=False`` (``synchronous=NORMAL``) it survives a crash or
  ``kill -9`` of the process but not of the OS: the last commits before a power loss may be
  lost (their keys then run again when retried). Group commit pays one fsync per batch.
- Reads never touch the disk: :meth:`~KeyStore.lookup` and :meth:`~KeyStore.conflicts` use
  the in-memory index, which every write call updates at once (before the write is durable).
- Writes (:meth:`~KeyStore.begin`, :meth:`~KeyStore.finish`, :meth:`~KeyStore.forget`) are
  queued to ONE writer thread with group commit: it takes everything queued, writes it in one
  transaction, commits, then calls the ``on_durable`` callbacks of that batch in queue order.
- When the writer commits: with ``max_delay=0`` (default) as soon as anything is queued. With
  ``max_delay > 0`` a write may wait up to ``max_delay`` seconds, so that more writes share its
  commit (each commit costs an fsync and a turn of the writer thread): the writer commits
  earlier when :meth:`~KeyStore.commit_soon` says that somebody waits for what is queued (the
  server does when a device's next command waits for its ``begin``), when half of
  ``max_queue`` is queued, and for :meth:`~KeyStore.flush` and ``close``.
  **Callbacks run on the writer thread**: they must be quick and must not call back into the
  store's blocking methods (``close``, ``flush``); an asyncio caller hops to its loop, e.g.
  ``on_durable=lambda error: loop.call_soon_threadsafe(done, key, error)``.
- ``begin(key, ...)`` records ``running``; the caller starts the handler only once its
  ``on_durable(None)`` has run, so a crash after a handler started always leaves a ``running``
  row, which the next ``open()`` turns into ``interrupted``.
- The queue is bounded: :meth:`~KeyStore.begin` raises :class:`KeyStoreFull` (answer ``busy``)
  when ``max_queue`` writes wait for the writer. ``finish`` and ``forget`` are never refused
  for that (each belongs to an accepted ``begin``; refusing would lose an outcome), so the
  queue holds at most ``max_queue`` + (number of running keys) writes.
- Write failures (disk full, I/O error, a lock held too long by another process): the batch is
  rolled back and logged, :attr:`KeyStore.failed` holds the error (until a later batch
  commits), :attr:`KeyStore.failures` counts such batches, and every callback of the batch is
  still called, with the error: ``on_durable(error)`` (``error`` is None on success). After a
  failed ``begin`` do not start the handler (``forget`` the key). The failed writes are retried
  with the next batch (and once more at ``close``); until one commits, the disk holds the key
  as it was: a lost ``finish`` leaves ``running`` (``interrupted`` after a restart, never a
  wrong ``done``). Nothing is dropped silently and no call waits on the disk, except
  ``open``, ``flush`` and ``close``.
- ``close()`` refuses new writes (:class:`KeyStoreClosed`), lets the writer write everything
  queued and call its callbacks, then closes the file and releases the lock. Idempotent.

Retention and bound:

- A finished record (``done`` or ``interrupted``) is dropped ``retention`` seconds after it
  finished; a ``running`` record is never dropped. Expired records are dropped at ``open()``,
  by :meth:`~KeyStore.prune`, and by ``begin()`` at most every ``min(retention / 10, 60)``
  seconds; until then :meth:`~KeyStore.lookup` already treats them as absent. Records are thus
  kept for at least ``retention`` seconds.
- Above ``max_keys`` records, ``begin()`` (and ``open()``) drops the oldest finished records
  first (oldest by creation); running records are never dropped, so the count can exceed the
  bound only while more than ``max_keys`` commands run.

All public methods are thread-safe; the server calls them from its loop thread. The file's
I/O (lock, connection, schema, recovery at open, batched writes) is :mod:`controller.keyfile`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from .keyfile import DONE as DONE  # re-exported: the public names stay importable from here
from .keyfile import INTERRUPTED as INTERRUPTED
from .keyfile import KEYS_FILE as KEYS_FILE
from .keyfile import RUNNING as RUNNING
from .keyfile import SCHEMA_VERSION as SCHEMA_VERSION
from .keyfile import KeyFile, Row
from .keyfile import KeyStoreError as KeyStoreError
from .keyfile import KeyStoreLocked as KeyStoreLocked
from .protocol import check_key as check_key  # re-exported: one key rule, the wire's
from .statedir import ensure_private_dir

log = logging.getLogger("statelink.keystore")

#: ``on_durable(error)``: ``error`` is None once the write is on disk, else why it is not
OnDurable = Callable[[BaseException | None], None]

#: a queued write: (key, row or None to delete, callback); key None is a flush barrier
_Op = tuple[str | None, Row | None, OnDurable | None]

# one encoder each: json.dumps with options builds a new encoder per call
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # NaN is not JSON


class KeyStoreFull(KeyStoreError):
    """``max_queue`` writes wait for the writer thread; answer busy."""


class KeyStoreClosed(KeyStoreFull):
    """The store is closed (or not open yet); a :class:`KeyStoreFull`, so callers answer busy."""


def fingerprint(params: Any) -> str:
    """A stable hash of ``params``: sha256 of their canonical JSON (sorted keys, no spaces).

    Equal JSON values give equal fingerprints whatever their key order; ``1`` and ``1.0``
    differ. The server must fingerprint the same form of the params (as received) every time.
    """
    text = _CANONICAL.encode(params)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Outcome(NamedTuple):
    """What an execution produced: ``result``, or ``error`` ``{code, message[, data]}``."""

    result: Any = None
    error: dict[str, Any] | None = None

    @classmethod
    def success(cls, result: Any) -> Outcome:
        return cls(result=result)

    @classmethod
    def failure(cls, code: int, message: str, data: Any = None) -> Outcome:
        error: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            error["data"] = data
        return cls(error=error)

    def to_json(self) -> str:
        if self.error is not None:
            return _COMPACT.encode({"error": self.error})
        return _COMPACT.encode({"result": self.result})

    @classmethod
    def from_json(cls, text: str) -> Outcome:
        value = json.loads(text)
        if "error" in value:
            return cls(error=value["error"])
        return cls(result=value["result"])


class Record(NamedTuple):
    """One key as the store knows it (immutable: every change makes a new record)."""

    key: str
    method: str
    device: str
    fingerprint: str
    state: str  #: RUNNING | DONE | INTERRUPTED
    outcome: Outcome | None  #: None while running, and for interrupted records
    created: float
    finished: float | None  #: None while running

    def row(self, outcome_json: str | None) -> Row:
        key, method, device, print_, state, _outcome, created, finished = self
        return (key, method, device, print_, state, outcome_json, created, finished)


class Interrupted(NamedTuple):
    """A key found ``running`` at open: its command was cut short by a stop or a crash."""

    key: str
    method: str
    device: str


class KeyStore:
    """Idempotency keys in the SQLite file ``path`` (see the module docstring for the contract).

    ``retention``: seconds a finished record is kept; ``max_keys``: records kept at most (oldest
    finished dropped first); ``max_queue``: writes that may wait for the writer before
    ``begin`` raises :class:`KeyStoreFull`; ``busy_timeout``: seconds a write waits for a
    lock another process holds on the file before it fails; ``fsync``: fsync each commit (see
    the module docstring); ``clock``: wall-clock seconds.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        retention: float = 86400.0,
        max_keys: int = 100_000,
        max_queue: int = 10_000,
        busy_timeout: float = 5.0,
        fsync: bool = True,
        max_delay: float = 0.0,
        clock: Callable[[], float] = time.time,
    ):
        if retention <= 0:
            raise ValueError("retention must be positive")
        if max_keys < 1 or max_queue < 1:
            raise ValueError("max_keys and max_queue must be at least 1")
        if max_delay < 0:
            raise ValueError("max_delay must not be negative")
        self.memory = path is None  #: in memory only: nothing survives close()
        self.path = Path(":memory:") if path is None else Path(path)
        self.retention = float(retention)
        self.max_keys = max_keys
        self.max_queue = max_queue
        self.busy_timeout = busy_timeout
        self.fsync = fsync
        self.max_delay = float(max_delay)
        self._clock = clock
        self._sweep_every = min(self.retention / 10, 60.0)
        self._next_sweep = 0.0
        self.interrupted_at_open: list[Interrupted] = []  #: set by open()
        self.commits = 0  #: transactions committed by the writer thread (open's not counted)
        self.failures = 0  #: batches that failed to commit
        self.failed: BaseException | None = None  #: error of the last batch, if it failed
        self._index: dict[str, Record] = {}  # in creation order: oldest first
        self._queue: deque[_Op] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._accepting = False
        self._writer_idle = False  # the writer waits for work: a write must notify it
        self._urgent = False  # commit_soon(): somebody waits for a write queued now
        self._first_at = 0.0  # time.monotonic() of the oldest write queued
        self._batch_limit = max(1, max_queue // 2)  # this many queued: commit now
        self._file: KeyFile | None = None
        self._writer: threading.Thread | None = None
        self._unwritten: dict[str, Row | None] = {}  # failed writes to retry (writer thread)

    # -- lifetime ------------------------------------------------------------------------

    def open(self) -> KeyStore:
        """Open (creating if needed), recover ``running`` rows, load the index; returns self."""
        if self._file is not None:
            raise KeyStoreError(f"key store {self.path} is already open")
        if not self.memory:
            try:
                ensure_private_dir(self.path.parent)
            except OSError as exc:
                raise KeyStoreError(f"cannot open key store {self.path}: {exc}") from exc
        self._file = KeyFile(
            self.path, memory=self.memory, busy_timeout=self.busy_timeout, fsync=self.fsync
        )
        try:
            self._recover_and_load()
        except BaseException:
            self._release()
            raise
        self._accepting = True
        self._writer = threading.Thread(
            target=self._write_loop, name="statelink-keystore", daemon=True
        )
        self._writer.start()
        return self

    def close(self) -> None:
        """Write everything queued (callbacks included), then close the file. Idempotent."""
        if self._writer is threading.current_thread():
            raise RuntimeError("KeyStore.close() called from an on_durable callback")
        with self._lock:
            self._accepting = False
            self._wake.notify()
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        self._release()

    def __enter__(self) -> KeyStore:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write queued so far is committed (or failed); False on timeout.

        Blocks: not for an asyncio loop thread (use ``on_durable`` there).
        """
        done = threading.Event()
        with self._lock:
            self._check_open()
            self._push(None, None, lambda _error: done.set())
            self._commit_soon()
        return done.wait(timeout)

    def commit_soon(self) -> None:
        """Somebody waits for the writes queued so far: commit them without waiting for
        ``max_delay``. Non-blocking, any thread (a no-op with ``max_delay=0``)."""
        if self.max_delay > 0:
            with self._lock:
                self._commit_soon()

    # -- reads (memory only) ---------------------------------------------------------------

    def lookup(self, key: str) -> Record | None:
        """The record of ``key``, or None (never recorded, forgotten, or expired)."""
        record = self._index.get(key)
        if record is None or self._expired(record, self._clock()):
            return None
        return record

    @staticmethod
    def conflicts(record: Record, method: str, fingerprint: str) -> bool:
        """True if ``record``'s key was used for another method or other params."""
        return record.method != method or record.fingerprint != fingerprint

    def __len__(self) -> int:
        return len(self._index)

    # -- writes (queued to the writer thread) ------------------------------------------------

    def begin(
        self,
        key: str,
        method: str,
        fingerprint: str,
        *,
        on_durable: OnDurable,
        device: str | None = None,
    ) -> Record:
        """Record ``key`` as ``running``; start the command only after ``on_durable(None)``.

        ``device`` defaults to ``method`` up to its last dot (``door.open`` -> ``door``).
        Raises ValueError for an invalid key or one already recorded (``lookup`` first),
        :class:`KeyStoreFull` when the queue is full, :class:`KeyStoreClosed` when closed.
        """
        check_key(key)
        if device is None:
            device = method.rpartition(".")[0] or method
        with self._lock:
            self._check_open()
            if len(self._queue) >= self.max_queue:
                raise KeyStoreFull(
                    f"key store queue full ({self.max_queue} writes wait for the disk)"
                )
            now = self._clock()
            existing = self._index.get(key)
            if existing is not None:
                if not self._expired(existing, now):
                    raise ValueError(f"key {key!r} is already recorded")
                del self._index[key]  # re-inserted below, as the newest record
            record = Record(key, method, device, fingerprint, RUNNING, None, now, None)
            self._index[key] = record
            dropped = self._over_bound()
            if now >= self._next_sweep:
                self._next_sweep = now + self._sweep_every
                dropped += self._expired_keys(now)
            self._drop(dropped)
            self._push(key, record.row(None), on_durable)
        return record

    def finish(
        self,
        key: str,
        outcome: Outcome,
        on_durable: OnDurable | None = None,
        *,
        encoded: str | None = None,
    ) -> Record:
        """Record the outcome of the running ``key`` (``done``). Never raises KeyStoreFull.

        The outcome is encoded here, on the caller's thread (TypeError or ValueError if it is
        not JSON), unless the caller passes ``encoded``, its :meth:`Outcome.to_json`.
        Raises KeyError if ``key`` is not recorded, ValueError if it is not running.
        """
        outcome_json = outcome.to_json() if encoded is None else encoded
        with self._lock:
            self._check_open()
            record = self._index[key]
            if record.state != RUNNING:
                raise ValueError(f"key {key!r} is {record.state}, not running")
            record = Record(
                key,
                record.method,
                record.device,
                record.fingerprint,
                DONE,
                outcome,
                record.created,
                max(self._clock(), record.created),
            )
            self._index[key] = record  # keeps its place in creation order
            self._push(key, record.row(outcome_json), on_durable)
        return record

    def forget(self, key: str) -> None:
        """Drop ``key`` (a command refused before it started); no-op if it is not recorded."""
        with self._lock:
            self._check_open()
            if self._index.pop(key, None) is not None:
                self._push(key, None, None)

    def prune(self) -> int:
        """Drop expired records now (``begin`` does it periodically); returns how many."""
        with self._lock:
            self._check_open()
            dropped = self._expired_keys(self._clock())
            self._drop(dropped)
        return len(dropped)

    # -- internals -------------------------------------------------------------------------

    def _push(self, key: str | None, row: Row | None, callback: OnDurable | None) -> None:
        """Queue one write and wake the writer if it waits and has something new to decide:
        the first write of a batch (it starts the ``max_delay`` clock), or a full batch (lock
        held)."""
        queue = self._queue
        queue.append((key, row, callback))
        if len(queue) == 1:
            self._first_at = time.monotonic()
        elif self.max_delay > 0 and len(queue) != self._batch_limit:
            return
        if self._writer_idle:
            self._wake.notify()

    def _commit_soon(self) -> None:
        """(lock held)"""
        self._urgent = True
        if self._writer_idle:
            self._wake.notify()

    def _next_batch(self) -> deque[_Op] | None:
        """The writer's wait for a batch that is due (lock held); None once closed and drained."""
        while True:
            queue = self._queue
            if not self._accepting or (queue and self.max_delay <= 0):
                break
            if not queue:
                self._urgent = False  # what it waited for was taken
                timeout = None
            elif self._urgent or len(queue) >= self._batch_limit:
                break
            else:
                timeout = self._first_at + self.max_delay - time.monotonic()
                if timeout <= 0:
                    break
            self._writer_idle = True
            self._wake.wait(timeout)
            self._writer_idle = False
        if not self._queue:
            return None  # closed and drained
        batch, self._queue = self._queue, deque()
        self._urgent = False
        return batch

    def _check_open(self) -> None:
        if not self._accepting:
            raise KeyStoreClosed(f"key store {self.path} is closed")

    def _expired(self, record: Record, now: float) -> bool:
        return record.finished is not None and record.finished + self.retention <= now

    def _expired_keys(self, now: float) -> list[str]:
        expired = []
        for record in self._index.values():
            if record.created + self.retention > now:
                break  # finished >= created: every later record is younger still
            if self._expired(record, now):
                expired.append(record.key)
        return expired

    def _over_bound(self) -> list[str]:
        excess = len(self._index) - self.max_keys
        oldest: list[str] = []
        if excess > 0:
            for record in self._index.values():
                if record.state != RUNNING:
                    oldest.append(record.key)
                    if len(oldest) == excess:
                        break
        return oldest

    def _drop(self, keys: list[str]) -> None:
        """Remove ``keys`` from the index and queue their deletion (lock held)."""
        for key in keys:
            if self._index.pop(key, None) is not None:
                self._push(key, None, None)

    def _recover_and_load(self) -> None:
        """Recover the file (``running`` rows become ``interrupted``), load the index, drop
        what is expired or over the bound (one commit)."""
        assert self._file is not None
        now = self._clock()
        self._index.clear()

        def load(rows: Iterable[Row]) -> list[str]:
            for row in rows:
                key, method, device, print_, state, outcome, created, finished = row
                self._index[key] = Record(
                    key,
                    method,
                    device,
                    print_,
                    state,
                    None if outcome is None else Outcome.from_json(outcome),
                    created,
                    finished,
                )
            dropped = self._expired_keys(now)
            for key in dropped:  # expired first: the bound counts only what remains
                self._index.pop(key, None)
            over = self._over_bound()
            for key in over:
                self._index.pop(key, None)
            return dropped + over

        try:
            running = self._file.recover_and_load(now, load)
        except KeyStoreError:
            self._index.clear()
            raise
        self.interrupted_at_open = [Interrupted(*item) for item in running]
        self._next_sweep = now + self._sweep_every
        if self.interrupted_at_open:
            log.warning(
                "%d command(s) were running when the last server stopped: %s",
                len(self.interrupted_at_open),
                ", ".join(f"{item.method} (key {item.key!r})" for item in self.interrupted_at_open),
            )

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                batch = self._next_batch()
            if batch is None:
                break
            error = self._write(batch)
            for _key, _row, callback in batch:
                if callback is not None:
                    try:
                        callback(error)
                    except Exception:
                        log.exception("key store on_durable callback failed")
        if self._unwritten and self._write(deque()) is not None:
            log.error("key store %s: closed with %d write(s) lost", self.path, len(self._unwritten))

    def _write(self, batch: deque[_Op]) -> BaseException | None:
        """Write a batch and the earlier failed writes in one transaction (last write per key
        wins); the error, if any."""
        final = self._unwritten
        self._unwritten = {}
        for key, row, _callback in batch:
            if key is not None:
                final[key] = row
        if not final:
            return None  # only flush barriers
        assert self._file is not None
        try:
            self._file.write(final)
        except Exception as exc:
            self.failures += 1
            self.failed = exc
            self._unwritten = final
            log.error("key store %s: %d write(s) failed: %s", self.path, len(final), exc)
            return exc
        self.commits += 1
        self.failed = None
        return None

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
