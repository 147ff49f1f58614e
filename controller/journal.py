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
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
from .statedir import ensure_private_dir

log = logging.getLogger("statelink.journal")

#: ``on_durable(error)``: None once written (and synced, if durable), else why not
OnDurable = Callable[[OSError | None], None]

_WAL_HEADER = struct.Struct("<IIQI")  # crc32, path length, offset in the journal, data length


class JournalBusy(Exception):
    """Another live process drives this run (``pid``)."""

    def __init__(self, path: Path, pid: int):
        super().__init__(f"run journal {path} is being driven by process {pid}")
        self.path = path
        self.pid = pid


class JournalClosed(RuntimeError):
    """The writer is closed (or not started)."""


@dataclass(eq=False)
class JournalFile:
    """A journal the writer appends to (it holds no file descriptor)."""

    path: Path  #: absolute
    error: OSError | None = None  #: set when a write failed: the journal is never written again
    _new: bool = field(default=False, repr=False)  # its directory entry is not synced yet

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass(eq=False, slots=True)
class _Op:
    journal: JournalFile | None  # None: a flush barrier
    data: bytes
    durable: bool
    callback: OnDurable | None


def _encode(entry: Mapping[str, Any]) -> bytes:
    try:
        return (json.dumps(entry, default=str, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:  # a lone surrogate: escaped JSON is still valid
        return (json.dumps(entry, default=str) + "\n").encode()


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` as an OSError naming the journal."""
    if exc.filename == str(path):
        return exc
    return OSError(exc.errno or errno.EIO, exc.strerror or str(exc), str(path))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _append(path: Path, data: bytes) -> int:
    """Append ``data`` to ``path`` (open, write, close); the offset it was written at."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        offset = os.fstat(fd).st_size
        _write_all(fd, data)
        return offset
    finally:
        os.close(fd)


def _try_sync(path: Path, directory: bool = False) -> OSError | None:
    """fsync a directory / fdatasync a file; the error, if any."""
    try:
        fd = os.open(path, (os.O_RDONLY if directory else os.O_WRONLY) | os.O_CLOEXEC)
        try:
            os.fsync(fd) if directory else os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return exc
    return None


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
    ):
        if sync not in ("wal", "files", "none"):
            raise ValueError(f"sync must be 'wal', 'files' or 'none', not {sync!r}")
        self.runs_dir = Path(runs_dir).absolute()
        self.sync = sync
        self.max_queue_bytes = max_queue_bytes
        self.wal_limit = wal_limit
        self.sync_threads = max(1, sync_threads)
        self.batches = self.fsyncs = self.entries = self.checkpoints = self.failures = 0
        self.owner: dict[str, Any] = {}  #: ``pid`` and ``lock``, added to start/resumed entries
        self._queue: deque[_Op] = deque()
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
        self._dirty: dict[Path, JournalFile] = {}  # written since the last checkpoint
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
                _try_sync(self.runs_dir, directory=True)  # the WAL must outlive a power loss
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
        p = Path(os.path.abspath(path))
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            info = os.stat(p)
            if not stat.S_ISREG(info.st_mode) or info.st_size:
                raise FileExistsError(
                    errno.EEXIST, f"journal exists; resume it: statelink resume {p}", str(p)
                ) from None
        return JournalFile(p, _new=True)

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
            if self._thread is not threading.current_thread():
                while (
                    self._accepting
                    and self._queued
                    and self._queued + len(data) > self.max_queue_bytes
                ):
                    self._space.wait()
            if not self._accepting:
                raise JournalClosed("the journal writer is closed")
            self._queue.append(_Op(journal, data, durable, on_durable))
            self._queued += len(data)
            self._wake.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written and synced; False on timeout."""
        done = threading.Event()
        with self._lock:
            if not self._accepting:
                raise JournalClosed("the journal writer is closed")
            self._queue.append(_Op(None, b"", True, lambda _error: done.set()))
            self._wake.notify()
        return done.wait(timeout)

    # -- the writer thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and self._accepting:
                    self._wake.wait()
                if not self._queue:
                    break
                batch, self._queue, self._queued = self._queue, deque(), 0
                self._space.notify_all()
            try:
                self._batch(batch)
            except Exception as exc:  # a bug: never leave a caller waiting
                log.exception("journal writer batch failed")
                for op in batch:
                    if op.journal is not None and op.journal.error is None:
                        op.journal.error = OSError(errno.EIO, f"journal writer: {exc}")
            self._callbacks(batch)
        self._shutdown()

    def _batch(self, batch: deque[_Op]) -> None:
        groups: dict[JournalFile, list[_Op]] = {}
        for op in batch:
            if op.journal is not None:
                groups.setdefault(op.journal, []).append(op)
        written: list[tuple[JournalFile, int, bytes]] = []
        durable = any(op.durable for op in batch)
        for journal, ops in groups.items():
            if journal.error is not None:
                continue
            data = b"".join(op.data for op in ops)
            try:
                written.append((journal, _append(journal.path, data), data))
            except OSError as exc:
                self._fail(journal, exc)
                continue
            self.entries += len(ops)
        self.batches += 1
        if self.sync == "wal" and written:
            self._write_wal(written, durable)
        if self.sync == "files" and durable:
            self._sync_files([j for j, _o, _d in written if any(op.durable for op in groups[j])])

    def _write_wal(self, written: list[tuple[JournalFile, int, bytes]], durable: bool) -> None:
        records = []
        for journal, offset, data in written:
            name = os.fsencode(journal.path)
            head = _WAL_HEADER.pack(0, len(name), offset, len(data))[4:]
            records.append(struct.pack("<I", zlib.crc32(data, zlib.crc32(name, zlib.crc32(head)))))
            records += (head, name, data)
            self._dirty[journal.path] = journal
        blob = b"".join(records)
        assert self._wal_fd is not None
        try:
            _write_all(self._wal_fd, blob)
            if durable:
                os.fdatasync(self._wal_fd)
                self.fsyncs += 1
        except OSError as exc:
            log.error("journal WAL failed (%s): syncing each journal from now on", exc)
            self.sync = "files"
            self._sync_files([journal for journal, _o, _d in written])
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
        errors = self._pool.map(_try_sync, [j.path for j in live])
        for journal, error in zip(live, errors, strict=True):
            if error is not None:
                self._fail(journal, error)
        for directory in dirs:
            if _try_sync(directory, directory=True) is not None:
                log.error("journal directory %s: fsync failed", directory)
        for journal in journals:
            journal._new = False
        self.fsyncs += len(journals) + len(dirs)

    def _checkpoint(self) -> None:
        """Sync every journal written since the last checkpoint, then empty the WAL."""
        dirty, self._dirty = list(self._dirty.values()), {}
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
    def _callbacks(batch: deque[_Op]) -> None:
        for op in batch:
            if op.callback is not None:
                try:
                    op.callback(op.journal.error if op.journal is not None else None)
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
                    _replay(wal)
                    wal.unlink()
                lock.unlink()
            except OSError:
                pass  # alive (or removed meanwhile)
            finally:
                os.close(fd)


def _replay(wal: Path) -> int:
    """Complete the journals from a dead process's WAL; the number of records applied."""
    data = wal.read_bytes()
    pos, applied, touched = 0, 0, set()
    while pos + _WAL_HEADER.size <= len(data):
        crc, name_len, offset, size = _WAL_HEADER.unpack_from(data, pos)
        start = pos + _WAL_HEADER.size
        end = start + name_len + size
        head = data[pos + 4 : start]
        name, payload = data[start : start + name_len], data[start + name_len : end]
        if end > len(data) or zlib.crc32(payload, zlib.crc32(name, zlib.crc32(head))) != crc:
            break  # a torn record: the batch never completed, its callbacks never ran
        pos = end
        path = Path(os.fsdecode(name))
        try:
            fd = os.open(path, os.O_WRONLY | (os.O_CREAT if offset == 0 else 0) | os.O_CLOEXEC)
        except OSError as exc:
            log.error("journal replay: %s: %s", path, exc)
            continue
        try:
            have = os.fstat(fd).st_size
            if offset <= have < offset + size:
                os.pwrite(fd, payload[have - offset :], have)
                touched.add(path)
                applied += 1
            elif have < offset:
                log.error("journal replay: %s is shorter than its WAL record", path)
        finally:
            os.close(fd)
    for path in touched:
        _try_sync(path)
    for directory in {path.parent for path in touched}:
        _try_sync(directory, directory=True)
    return applied


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
