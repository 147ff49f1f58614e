"""Writing run journals: one writer thread for every run of a controller process. Reading,
ownership and listing are :mod:`controller.journal_read`'s, re-exported here (one import).

A journal is a JSON-lines file, one entry (a ``JournalEntry`` dict) per line: ``runs/RUN_ID.jsonl``
in the state directory, or any ``--journal FILE``. One :class:`JournalWriter` per process::

    with JournalWriter(state_dir / RUNS_DIR) as writer:          # or start() ... close()
        journal = writer.create(check_new_journal_path(path))    # O_CREAT|O_EXCL: never overwrites
        writer.append(journal, entry)                            # queued, written in order
        writer.append(journal, send_entry, durable=True,         # fsynced before
                      on_durable=lambda error: post(go, error))  # on_durable(None) runs
        journal, before = writer.reopen(path, resumed_entry)     # resume; JournalBusy if driven
    read_journal(path) -> Journal; journal_owner(path) -> pid | None; list_runs(state_dir)

- ``append`` encodes the entry at once and queues it. ONE writer thread takes all that is queued
  (group commit), appends each journal's lines with one ``write`` (opened ``O_APPEND``, written,
  closed per batch: **no file descriptor is held per run**), makes the batch durable, then calls
  its callbacks in queue order, **on the writer thread** (be quick, hop to your own thread).
  When: an idle writer takes the first entry at once, and what comes during a batch goes in
  the next. With ``commit_delay`` (the runner's: 5 ms), an entry waits up to that long for
  others to share its commit, unless :meth:`~JournalWriter.commit` is called (the runner's
  dispatcher does when it goes idle: nothing more is coming) or ``batch_entries`` wait: under
  load fewer, larger commits (each costs an fsync and a wake-up of the writer), and no delay
  for a run alone.
  ``on_durable(error)``: None once written (and, if ``durable``, on disk), else an OSError
  naming the file. Bounded: beyond ``max_queue_bytes`` of queued entries ``append`` blocks until
  the writer catches up (never on the writer thread; an entry over the bound goes alone).
- ``sync="wal"`` (default): every batch's lines also go to ONE write-ahead file of the process
  (``runs/.controller-PID-TOKEN.wal``), fsynced once per batch holding a durable entry, however
  many runs it holds; the run files are fsynced at a checkpoint (the WAL past ``wal_limit``, and
  ``close``), then the WAL is emptied. After a power loss the next writer started on the
  directory first replays the WAL of every dead process into the run files. ``"files"``: each
  journal with a durable entry is fdatasynced per batch, from ``sync_threads`` threads at once.
  ``"none"``: no fsync (survives ``kill -9``, not a power loss). Why WAL: ``bench/journal_bench``
  (1,000 journals, one entry each per batch, ext4): no fsync 6 ms per batch, WAL 6 ms, per-file
  fdatasync from 16 threads 55-140 ms (70-105 us CPU each: about a whole run transition's),
  one after the other 155-220 ms.
- Failures (ENOSPC, EIO, EACCES): the journal is failed (:attr:`JournalFile.error`) and never
  written again (a torn last line stays last); its pending and later callbacks get the error;
  other journals go on. A WAL that fails makes the writer switch to ``"files"``.
- One process at a time per run: ``start`` takes ONE flock for the process,
  ``runs/.controller-PID-TOKEN.lock``, held until ``close``; ``append`` adds ``pid`` and
  ``lock`` to ``start`` and ``resumed`` entries; :func:`journal_owner` checks that lock, so a
  run whose process died (or closed its writer) is ``interrupted``. ``reopen`` writes the
  ``resumed`` entry under a flock of the journal, so two resumes of one run cannot both win.
- ``close()``: ``append`` raises :class:`JournalClosed` from then on; everything queued is
  written and synced and its callbacks run; the WAL and the lock go. Never raises.
  Counters: ``batches``, ``fsyncs``, ``entries``, ``checkpoints``, ``failures``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .journal_read import (
    OWNER_EVENTS,
    RUNS_DIR,
    Journal,
    JournalCorrupt,
    RunSummary,
    check_new_journal_path,
    journal_owner,
    list_runs,
    read_journal,
)
from .journal_wal import replay_wal, try_sync, wal_record
from .statedir import ensure_private_dir

log = logging.getLogger("statelink.journal")

#: ``on_durable(error)``: None once written (and synced, if durable), else why not
OnDurable = Callable[[OSError | None], None]


class JournalBusy(Exception):
    """Another live process drives this run (``pid``)."""

    def __init__(self, path: Path, pid: int):
        super().__init__(f"run journal {path} is being driven by process {pid}")
        self.path = path
        self.pid = pid


class JournalClosed(RuntimeError):
    """The writer is closed (or not started)."""


class JournalFile:
    """A journal the writer appends to (it holds no file descriptor). Small: one per run,
    10,000 runs at a time (its path is kept as bytes, a :class:`Path` made on demand)."""

    __slots__ = ("_name", "_new", "_size", "error")

    def __init__(self, path: str | os.PathLike[str], *, new: bool = False) -> None:
        self._name = os.fsencode(os.path.abspath(path))
        #: set when a write failed: the journal is never written again
        self.error: OSError | None = None
        self._new = new  # its directory entry is not synced yet
        # the writer thread's: the file's size once known (the writer is its only writer,
        # under the run's lock: no fstat per append)
        self._size: int | None = None

    @property
    def path(self) -> Path:
        """The journal's absolute path."""
        return Path(os.fsdecode(self._name))

    @property
    def failed(self) -> bool:
        return self.error is not None

    def __repr__(self) -> str:
        return f"JournalFile({os.fsdecode(self._name)!r}, error={self.error!r})"


#: The writer's queue holds each entry as four items in a row, not as an object of its own
#: (an object per entry that lives until its batch gets promoted by the garbage collector,
#: and the full collections it then triggers cost the dispatcher more than the rest of
#: ``append``): the journal (None: a flush barrier), the line, durable, the callback.
_OP = 4


_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)
_ASCII_ENCODER = json.JSONEncoder(default=str)
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
# ``_ENCODER``'s C encoder, built once (``json.dumps`` builds one per call): without the
# circular-reference check (``markers``), so it keeps no state between calls; a circular
# value still fails, as RecursionError, turned into the ValueError ``dumps`` raises.
_encode_dict = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(
        None, str, json.encoder.encode_basestring, None, ": ", ", ", False, False, True
    )
)


def _encode(entry: Mapping[str, Any]) -> bytes:
    """One journal line: ``json.dumps(entry, default=str, ensure_ascii=False)`` and a newline,
    as UTF-8 (a lone surrogate is written escaped: still valid JSON, the same value). Entries
    are encoded on the dispatcher thread, two per step of every run: this is its hot path."""
    try:
        if _encode_dict is None or type(entry) is not dict:
            text = _ENCODER.encode(entry)
        else:
            text = "".join(_encode_dict(entry, 0))
        return (text + "\n").encode()
    except UnicodeEncodeError:
        return (_ASCII_ENCODER.encode(entry) + "\n").encode()
    except RecursionError:
        raise ValueError("Circular reference detected (or a value nested too deep)") from None


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` as an OSError naming the journal."""
    if exc.filename == str(path):
        return exc
    return OSError(exc.errno or errno.EIO, exc.strerror or str(exc), str(path))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _append(journal: JournalFile, data: bytes) -> int:
    """Append ``data`` to ``journal`` (open, write, close); the offset it was written at."""
    fd = os.open(journal._name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        offset = journal._size
        if offset is None:
            offset = os.fstat(fd).st_size
        written = os.write(fd, data)
        if written < len(data):
            _write_all(fd, data[written:])
    finally:
        os.close(fd)
    journal._size = offset + len(data)
    return offset


class JournalWriter:
    """Appends entries to many journals from one writer thread (see the module docstring).

    ``runs_dir``: where the process lock and the WAL live (created 0700), usually
    ``state_dir / RUNS_DIR``; ``sync``: ``"wal"``, ``"files"`` or ``"none"``.
    """

    def __init__(
        self,
        runs_dir: str | os.PathLike[str],
        *,
        sync: str = "wal",
        max_queue_bytes: int = 64 << 20,
        wal_limit: int = 32 << 20,
        sync_threads: int = 8,
        commit_delay: float = 0.0,
        batch_entries: int = 1024,
    ):
        if sync not in ("wal", "files", "none"):
            raise ValueError(f"sync must be 'wal', 'files' or 'none', not {sync!r}")
        self.runs_dir = Path(runs_dir).absolute()
        self.sync = sync
        self.max_queue_bytes = max_queue_bytes
        self.wal_limit = wal_limit
        self.sync_threads = max(1, sync_threads)
        self.commit_delay = commit_delay
        self.batch_entries = max(1, batch_entries)
        self.batches = self.fsyncs = self.entries = self.checkpoints = self.failures = 0
        self.owner: dict[str, Any] = {}  #: ``pid`` and ``lock``, added to start/resumed entries
        self._queue: deque[Any] = deque()  # _OP items per entry
        self._ops = 0  # entries queued
        self._queued = 0  # bytes
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._space = threading.Condition(self._lock)
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._wal_fd: int | None = None
        self._wal_size = 0
        self._dirty: dict[JournalFile, None] = {}  # written since the last checkpoint (ordered)
        self._waiting = False  # the writer waits (for entries, or for more to share a commit)
        self._due = 0.0  # monotonic: by then the oldest queued entry is committed
        self._kicked = False  # commit() was called: write what is queued without waiting
        self._writer_ident: int | None = None
        self._pool: ThreadPoolExecutor | None = None

    # -- lifetime --------------------------------------------------------------------------------

    def start(self) -> JournalWriter:
        """Take the process lock, replay the WAL of dead processes, start the writer thread."""
        if self._thread is not None:
            raise RuntimeError("journal writer already started")
        ensure_private_dir(self.runs_dir)
        stem = f".controller-{os.getpid()}-{secrets.token_hex(4)}"
        tmp = self.runs_dir / f"{stem}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # renamed once locked: a .lock file that is not locked is always a dead process's
            lock = self.runs_dir / f"{stem}.lock"
            os.rename(tmp, lock)
            self._recover(lock)
            if self.sync == "wal":
                flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
                self._wal_fd = os.open(lock.with_suffix(".wal"), flags, 0o600)
                try_sync(self.runs_dir, directory=True)  # the WAL must outlive a power loss
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._lock_fd, self._lock_path = fd, lock
        self.owner = {"pid": os.getpid(), "lock": str(lock)}
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="statelink-journal", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Write and sync everything queued, call its callbacks, release the lock. Idempotent;
        never raises."""
        with self._lock:
            self._accepting = False
            self._wake.notify()
            self._space.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> JournalWriter:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- journals ------------------------------------------------------------------------------

    def create(self, path: str | os.PathLike[str]) -> JournalFile:
        """A new journal at ``path`` (``O_CREAT|O_EXCL``, 0600; an existing empty file is
        accepted). FileExistsError for a non-empty file, OSError if it cannot be created;
        :func:`check_new_journal_path` first gives the user's message."""
        p = os.path.abspath(path)
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            info = os.stat(p)
            if not stat.S_ISREG(info.st_mode) or info.st_size:
                raise FileExistsError(
                    errno.EEXIST, f"journal exists; resume it: statelink resume {p}", str(p)
                ) from None
        return JournalFile(p, new=True)

    def reopen(
        self, path: str | os.PathLike[str], resumed: Mapping[str, Any]
    ) -> tuple[JournalFile, Journal]:
        """Take over an interrupted run: write ``resumed`` (with ``pid``/``lock``) durably and
        return the journal to append to and the journal as it was before (torn tail dropped).

        Raises :class:`JournalBusy` if a live process drives the run, ValueError if it
        finished, :class:`JournalCorrupt`, OSError."""
        if not self._accepting:
            raise JournalClosed("start the journal writer first: the entry names its lock")
        p = Path(os.path.abspath(path))
        fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # two resumes of one run: one at a time
            before = read_journal(p)
            if not before.entries:
                raise ValueError(f"run journal {p} holds no entry: nothing to resume")
            finished = before.finished
            if finished is not None:
                raise ValueError(f"run journal {p} finished ({finished.get('final')})")
            owner = journal_owner(p)
            if owner is not None:
                raise JournalBusy(p, owner)
            if before.torn:
                os.ftruncate(fd, before.size)
            os.lseek(fd, 0, os.SEEK_END)
            _write_all(fd, _encode({**resumed, **self.owner}))
            if self.sync != "none":
                os.fdatasync(fd)
        finally:
            os.close(fd)
        return JournalFile(p), before

    def append(
        self,
        journal: JournalFile,
        entry: Mapping[str, Any],
        *,
        durable: bool = False,
        on_durable: OnDurable | None = None,
    ) -> None:
        """Queue one entry (see the module docstring). Blocks while the queue is full (never
        on the writer thread); :class:`JournalClosed` once closed; TypeError if not JSON."""
        if entry.get("event") in OWNER_EVENTS:
            entry = {**entry, **self.owner}
        data = b"" if journal.error is not None else _encode(entry)
        with self._lock:
            if (
                self._queued + len(data) > self.max_queue_bytes
                and self._queued
                and threading.get_ident() != self._writer_ident  # never block the writer
            ):
                self._kicked = True  # full: write what is queued at once
                self._wake.notify()
                while (
                    self._accepting
                    and self._queued
                    and self._queued + len(data) > self.max_queue_bytes
                ):
                    self._space.wait()
            if not self._accepting:
                raise JournalClosed("the journal writer is closed")
            self._queue.extend((journal, data, durable, on_durable))
            self._queued += len(data)
            self._ops += 1
            if self._ops == 1:
                self._due = time.monotonic() + self.commit_delay
                if self._waiting:
                    self._wake.notify()
            elif self._ops == self.batch_entries and self._waiting:
                self._wake.notify()

    def commit(self) -> None:
        """Write what is queued now, without waiting ``commit_delay`` for more entries to share
        its commit: a producer about to go idle calls this (nothing more is coming soon).
        Cheap when nothing is queued; any thread."""
        if self._queue and not self._kicked:  # unlocked peek: a stale one costs commit_delay
            with self._lock:
                self._kicked = True
                if self._waiting:
                    self._wake.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written and synced; False on timeout."""
        done = threading.Event()
        with self._lock:
            if not self._accepting:
                raise JournalClosed("the journal writer is closed")
            self._queue.extend((None, b"", True, lambda _error: done.set()))
            self._ops += 1
            self._kicked = True
            if self._waiting:
                self._wake.notify()
        return done.wait(timeout)

    # -- the writer thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        self._writer_ident = threading.get_ident()
        wake = self._wake
        while True:
            with self._lock:
                while self._accepting:
                    wait: float | None = None
                    if self._queue:
                        if self._kicked or self._ops >= self.batch_entries:
                            break
                        wait = self._due - time.monotonic()
                        if wait <= 0:
                            break
                    self._waiting = True
                    wake.wait(wait)
                    self._waiting = False
                if not self._queue:
                    break
                batch, self._queue, self._queued, self._ops = self._queue, deque(), 0, 0
                self._kicked = False
                self._space.notify_all()
            try:
                self._batch(batch)
            except Exception as exc:  # a bug: never leave a caller waiting
                log.exception("journal writer batch failed")
                for journal in list(batch)[::_OP]:
                    if journal is not None and journal.error is None:
                        journal.error = OSError(errno.EIO, f"journal writer: {exc}")
            self._callbacks(batch)
        self._shutdown()

    def _batch(self, batch: deque[Any]) -> None:
        lines: dict[JournalFile, list[bytes]] = {}  # each journal's lines, in order
        durable = False
        to_sync: set[JournalFile] = set()  # sync="files": the journals with a durable entry
        items = iter(batch)
        for journal, data, op_durable, _callback in zip(items, items, items, items, strict=True):
            if op_durable:
                durable = True
                if journal is not None and self.sync == "files":
                    to_sync.add(journal)
            if journal is not None:
                have = lines.get(journal)
                if have is None:
                    lines[journal] = [data]
                else:
                    have.append(data)
        wal = self.sync == "wal"
        written: list[JournalFile] = []
        records: list[bytes] = []  # the WAL's
        entries = 0
        for journal, chunks in lines.items():
            if journal.error is not None:
                continue
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            try:
                offset = _append(journal, data)
            except OSError as exc:
                self._fail(journal, exc)
                continue
            entries += len(chunks)
            written.append(journal)
            if wal:
                records += wal_record(journal._name, offset, data)
        self.entries += entries
        self.batches += 1
        if wal and written:
            self._write_wal(written, b"".join(records), durable)
        if self.sync == "files" and durable:
            self._sync_files([j for j in written if j in to_sync])

    def _write_wal(self, written: list[JournalFile], blob: bytes, durable: bool) -> None:
        """Append ``blob`` (the records of ``written``) to the WAL; fsync it if ``durable``."""
        self._dirty.update(dict.fromkeys(written))
        assert self._wal_fd is not None
        try:
            _write_all(self._wal_fd, blob)
            if durable:
                os.fdatasync(self._wal_fd)
                self.fsyncs += 1
        except OSError as exc:
            log.error("journal WAL failed (%s): syncing each journal from now on", exc)
            self.sync = "files"
            self._sync_files(written)
            return
        self._wal_size += len(blob)
        if self._wal_size > self.wal_limit:
            self._checkpoint()

    def _sync_files(self, journals: list[JournalFile]) -> None:
        """fdatasync ``journals`` (and the directories of new ones) from a few threads."""
        if not journals:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.sync_threads, "statelink-journal-sync")
        dirs = {j.path.parent for j in journals if j._new}
        live = [j for j in journals if j.error is None]
        errors = self._pool.map(try_sync, [j.path for j in live])
        for journal, error in zip(live, errors, strict=True):
            if error is not None:
                self._fail(journal, error)
        for directory in dirs:
            if try_sync(directory, directory=True) is not None:
                log.error("journal directory %s: fsync failed", directory)
        for journal in journals:
            journal._new = False
        self.fsyncs += len(journals) + len(dirs)

    def _checkpoint(self) -> None:
        """Sync every journal written since the last checkpoint, then empty the WAL."""
        dirty, self._dirty = list(self._dirty), {}
        self._sync_files(dirty)
        self.checkpoints += 1
        if self._wal_fd is not None:
            try:
                os.ftruncate(self._wal_fd, 0)  # replaying an old record is harmless anyway
                self._wal_size = 0
            except OSError as exc:
                log.error("journal WAL: cannot empty it: %s", exc)

    def _fail(self, journal: JournalFile, exc: OSError) -> None:
        journal.error = _named(exc, journal.path)
        self.failures += 1
        log.error("journal write failed: %s (no more entries go to it)", journal.error)

    @staticmethod
    def _callbacks(batch: deque[Any]) -> None:
        items = iter(batch)
        for journal, _data, _durable, callback in zip(items, items, items, items, strict=True):
            if callback is not None:
                try:
                    callback(journal.error if journal is not None else None)
                except Exception:
                    log.exception("journal on_durable callback failed")

    def _shutdown(self) -> None:
        """After the last batch (writer thread): checkpoint, remove the WAL, drop the lock."""
        try:
            if self.sync != "none" and self._dirty:
                self._checkpoint()
            if self._pool is not None:
                self._pool.shutdown()
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
                assert self._lock_path is not None
                self._lock_path.with_suffix(".wal").unlink()
            if self._lock_path is not None:
                self._lock_path.unlink()
        except OSError as exc:
            log.error("journal writer: closing: %s", exc)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock: our runs are interrupted now
            self._lock_fd = None

    # -- recovery --------------------------------------------------------------------------------

    def _recover(self, own: Path) -> None:
        """Replay and remove the WAL of every dead process of ``runs_dir``; remove its lock."""
        for lock in sorted(self.runs_dir.glob(".controller-*.lock")):
            if lock == own:
                continue
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                wal = lock.with_suffix(".wal")
                if wal.exists():
                    log.warning("journal: replaying %s (a controller died)", wal)
                    replay_wal(wal)
                    wal.unlink()
                lock.unlink()
            except OSError:
                pass  # alive (or removed meanwhile)
            finally:
                os.close(fd)


__all__ = [
    "OWNER_EVENTS",
    "RUNS_DIR",
    "Journal",
    "JournalBusy",
    "JournalClosed",
    "JournalCorrupt",
    "JournalFile",
    "JournalWriter",
    "OnDurable",
    "RunSummary",
    "check_new_journal_path",
    "journal_owner",
    "list_runs",
    "read_journal",
]
