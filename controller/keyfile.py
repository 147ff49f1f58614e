"""The SQLite file under a :class:`~controller.keystore.KeyStore` (standard library only).

One job: the file's I/O. :class:`KeyFile` takes the exclusive lock on ``<path>.lock``,
connects (WAL, ``synchronous`` FULL or NORMAL), creates or checks the schema and recovers the
rows at open (one transaction), and writes a batch of changes as few multi-row statements.
The in-memory index, the writer thread and the group-commit policy are the store's
(controller/keystore.py, whose docstring states the contract); this module keeps no state
beyond the connection and the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

KEYS_FILE = "keys.sqlite3"  #: the store's file name in the state directory
SCHEMA_VERSION = 1

# the values of the ``state`` column
RUNNING = "running"
DONE = "done"
INTERRUPTED = "interrupted"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    device TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    outcome TEXT,
    created REAL NOT NULL,
    finished REAL
)
"""
_COLUMNS = "key, method, device, fingerprint, state, outcome, created, finished"
_DELETE = "DELETE FROM keys WHERE key = ?"
#: rows per statement of a batch write (8 parameters a row, SQLite allows 32,766)
_CHUNK = 256

#: a row as written: key, method, device, fingerprint, state, outcome JSON, created, finished
Row = tuple[str, str, str, str, str, str | None, float, float | None]


class KeyStoreError(Exception):
    """The key store cannot be opened or used."""


class KeyStoreLocked(KeyStoreError):
    """Another store (this process or another one) has the file open."""


class KeyFile:
    """The open key file ``path`` (an in-memory database if ``memory``: no file, no lock).

    Opening creates the file (0600) when missing and takes the lock; raises
    :class:`KeyStoreLocked` if another store holds it, :class:`KeyStoreError` if the file
    cannot be opened. The caller creates the directory. Not thread-safe: one thread at a time
    (the store's ``open``, then its writer thread, then its ``close``).
    """

    def __init__(self, path: Path, *, memory: bool, busy_timeout: float, fsync: bool):
        self.path = path
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        if memory:
            self._conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            return
        try:
            self._lock_fd = _lock_file(path)
        except OSError as exc:
            raise KeyStoreError(f"cannot open key store {path}: {exc}") from exc
        try:
            self._conn = _connect(path, busy_timeout, fsync)
        except BaseException:
            self.close()
            raise

    def recover_and_load(
        self, now: float, load: Callable[[Iterable[Row]], list[str]]
    ) -> list[tuple[str, str, str]]:
        """Create the schema, mark ``running`` rows ``interrupted`` (finished ``now``), pass
        every row, oldest created first, to ``load``, delete the keys it returns: one
        transaction. Returns (key, method, device) of the rows that were ``running``.

        Raises :class:`KeyStoreError` (nothing committed) for a newer schema, an SQLite error,
        or a ValueError or KeyError raised by ``load``.
        """
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise KeyStoreError(
                    f"key store {self.path} has schema {version}; this statelink knows "
                    f"{SCHEMA_VERSION} (a newer statelink wrote it)"
                )
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            running: list[tuple[str, str, str]] = conn.execute(
                "SELECT key, method, device FROM keys WHERE state = ? ORDER BY created",
                (RUNNING,),
            ).fetchall()
            conn.execute(
                "UPDATE keys SET state = ?, finished = ? WHERE state = ?",
                (INTERRUPTED, now, RUNNING),
            )
            dropped = load(
                conn.execute(f"SELECT {_COLUMNS} FROM keys ORDER BY created")  # noqa: S608
            )
            conn.executemany(_DELETE, [(key,) for key in dropped])
            conn.execute("COMMIT")
        except (sqlite3.Error, ValueError, KeyError) as exc:
            raise KeyStoreError(f"cannot read key store {self.path}: {exc}") from exc
        finally:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        return running

    def write(self, changes: dict[str, Row | None]) -> None:
        """Write ``changes`` (a row, or None to delete the key) in one transaction; on an
        error roll back and raise it."""
        conn = self._connection()
        # few statements, each for many rows: sqlite3 lets go of the GIL around every step, and
        # each time the writer must wait for the loop thread to hand it back
        statements = _statements(
            [key for key, row in changes.items() if row is None],
            [row for row in changes.values() if row is not None],
        )
        try:
            if len(statements) == 1:  # one statement: a transaction of its own
                conn.execute(*statements[0])
            else:
                conn.execute("BEGIN IMMEDIATE")
                for statement in statements:
                    conn.execute(*statement)
                conn.execute("COMMIT")
        except Exception:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the connection and release the lock. Idempotent."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _connection(self) -> sqlite3.Connection:
        assert self._conn is not None, "key file is closed"
        return self._conn


def _connect(path: Path, busy_timeout: float, fsync: bool) -> sqlite3.Connection:
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    try:
        conn = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise KeyStoreError(f"cannot open key store {path}: {exc}") from exc
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise KeyStoreError(f"key store {path}: cannot use WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
    except sqlite3.Error as exc:
        conn.close()
        raise KeyStoreError(f"cannot open key store {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _statements(deletes: list[str], rows: list[Row]) -> list[tuple[str, list[Any]]]:
    """The statements (SQL, parameters) that delete ``deletes`` and write ``rows``, each
    statement for up to ``_CHUNK`` keys. A statement's key count is a power of two (the last
    key repeated: deleting or writing a row twice is writing it once), so that few distinct
    statements exist and sqlite3's cache keeps them prepared."""
    statements: list[tuple[str, list[Any]]] = []
    for i in range(0, len(deletes), _CHUNK):
        keys = _padded(deletes[i : i + _CHUNK])
        statements.append((_delete_sql(len(keys)), keys))
    for i in range(0, len(rows), _CHUNK):
        chunk = _padded(rows[i : i + _CHUNK])
        statements.append((_upsert_sql(len(chunk)), [value for row in chunk for value in row]))
    return statements


def _padded(items: list[Any]) -> list[Any]:
    """``items`` with its last item repeated up to the next power of two."""
    size = 1 << (len(items) - 1).bit_length()
    return items + [items[-1]] * (size - len(items))


@functools.cache
def _upsert_sql(count: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * count)
    return f"INSERT OR REPLACE INTO keys ({_COLUMNS}) VALUES {values}"  # noqa: S608


@functools.cache
def _delete_sql(count: int) -> str:
    return f"DELETE FROM keys WHERE key IN ({', '.join(['?'] * count)})"  # noqa: S608


def _lock_file(path: Path) -> int:
    """An exclusive, non-blocking flock on ``<path>.lock`` (created 0600); its fd holds it."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        by = f"process {holder}" if holder.isdigit() else "another store (or process)"
        raise KeyStoreLocked(f"key store {path} is in use by {by}")
    # the holder's pid, for the message another process gets (the lock itself is the flock)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
