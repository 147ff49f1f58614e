"""The journal writer's write-ahead file (:mod:`controller.journal`, ``sync="wal"``): its
records, and their replay into the journals after a crash.

A record is the lines one batch appended to one journal: ``crc32, path length, offset in the
journal, data length`` (little-endian ``<IIQI``), the journal's absolute path, the data. The
crc32 covers the rest of the header, the path and the data, so a record torn by a crash (its
batch never completed: its callbacks never ran) ends the replay.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

log = logging.getLogger("statelink.journal")

_HEADER = struct.Struct("<IIQI")  # crc32, path length, offset in the journal, data length
_HEAD = struct.Struct("<IQI")  # the header without its crc32 (which covers it)
_CRC = struct.Struct("<I")


def wal_record(name: bytes, offset: int, data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """The WAL record of ``data`` appended at ``offset`` to the journal at path ``name``
    (absolute, as bytes), in four pieces to join."""
    head = _HEAD.pack(len(name), offset, len(data))
    crc32 = zlib.crc32
    return _CRC.pack(crc32(data, crc32(name, crc32(head)))), head, name, data


def try_sync(path: Path, directory: bool = False) -> OSError | None:
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


def replay_wal(wal: Path) -> int:
    """Complete the journals from a dead process's WAL; the number of records applied."""
    data = wal.read_bytes()
    pos, applied, touched = 0, 0, set()
    while pos + _HEADER.size <= len(data):
        crc, name_len, offset, size = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
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
        try_sync(path)
    for directory in {path.parent for path in touched}:
        try_sync(directory, directory=True)
    return applied


__all__ = ["replay_wal", "try_sync", "wal_record"]
