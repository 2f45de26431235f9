"""A write log on an in-process disk: every completed mutating request, in order.

Crash-consistency testing (issue 28) needs what the guest's driver sent and
when each request completed: writes (sector range and data), flushes,
discards and write-zeroes, numbered in completion order.  :class:`LoggedStorage`
is a :class:`~.blk.Storage` decorator, so the device logic in ``blk.py`` does
not change: a disk is logged by wrapping its storage (opt-in per disk).

What a flush covers.  virtio 1.2 §5.2.6.2 makes a write stable once "a
VIRTIO_BLK_T_FLUSH request is sent after the write is completed and is
completed itself".  So a FLUSH record carries two numbers: ``flush_start``,
the sequence number of the last request that had completed when the flush
started, and its own ``seq``, taken when it completed.  A write is durable
once some completed flush has ``flush_start >= write.seq``.  With one queue
nothing completes while a flush runs (``flush_start == seq - 1``); with
several queues served concurrently a write may complete inside a flush, and
the two numbers keep it volatile.  "Completed" here is when the storage call
returned, just before the used element reaches the guest: a flush the
driver queued before it saw a write's completion, but that the backend
started after that write, counts as covering it (the backend cannot tell
when the driver queued a request).  So a guest that relies on a flush
covering a write it had not yet seen complete, which the spec does not
allow, is not caught; Linux's fsync and jbd2 wait for the completions first.

The log on disk, in a directory the caller names: ``index.bin`` (one
fixed-size :data:`INDEX` record per request, in sequence order),
``data.bin`` (every write's bytes, spilled straight from guest memory: the
log holds no data in memory, and at most :data:`INDEX_BATCH` index records)
and ``meta.json`` (format, disk size, and why the log broke, if it did).
:class:`RecordedLog` loads it again, in this process or a later one.

A full disk fails closed.  A write's data is spilled before the request
touches the medium, and room for its index record is reserved then too
(``posix_fallocate``, 64 KiB ahead: the index is written in batches, after
completion, so it must not be the one to find the disk full).  When either
fails, the request fails with ``OSError`` (the device answers IOERR, §5.2.6)
and the log is marked broken; every later write, flush, discard and
write-zeroes then fails the same way.  The guest therefore never holds a completion the log
lacks: a silent gap would make crash states that look exact and are not,
while an I/O error is something the guest and the test both see.  Reads
still work.  The reason is kept (``WriteLog.broken``) and raised as
:class:`WriteLogBroken` in the test's thread by ``check()`` and by anything
that builds crash states from the log.

The log is thread-safe: ``server.py`` serves every queue on one thread
today, but sequence numbers, reservations and the index are taken under one
lock so a multi-threaded server (or test) keeps exact completion order.
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_virtio.errors import BackendError
from pytest_virtio.vhost_user.blk import SECTOR_SIZE, Storage

__all__ = [
    "INDEX",
    "LogRecord",
    "LoggedStorage",
    "RecordKind",
    "RecordedLog",
    "WriteLog",
    "WriteLogBroken",
    "WriteLogCorrupt",
]

log = logging.getLogger(__name__)

FORMAT = 1
INDEX_NAME, DATA_NAME, META_NAME = "index.bin", "data.bin", "meta.json"
#: One index record: seq, kind, flags, sector, sectors, aux (a WRITE's spill
#: offset, a FLUSH's flush_start).  40 bytes, little-endian.
INDEX = struct.Struct("<QBB6xQQQ")
FLAG_UNMAP = 1
#: Index records kept in memory before they are written out.
INDEX_BATCH = 256
INDEX_CHUNK = 64 << 10  # bytes reserved ahead in index.bin
META_BYTES = 4096  # meta.json is rewritten in place within this size: no new blocks needed
_SHIFT = 9


class WriteLogBroken(BackendError):
    """The log stopped recording (full disk, failed medium): crash states would be guesses."""


class WriteLogCorrupt(BackendError):
    """A log directory that does not hold a log this code wrote."""


class RecordKind(enum.IntEnum):
    """What a completed request did to the medium (§5.2.6 request types)."""

    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 4


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One completed request, numbered from 1 in completion order.

    ``sector``/``sectors`` are 512-byte units (§5.2.6).  A WRITE's bytes sit
    at ``spill_offset`` in ``data.bin``; a FLUSH's ``flush_start`` is the seq
    of the last request completed when it started (see the module docstring).
    """

    seq: int
    kind: RecordKind
    sector: int = 0
    sectors: int = 0
    spill_offset: int = 0
    flush_start: int = 0
    unmap: bool = False

    @property
    def offset(self) -> int:
        return self.sector << _SHIFT

    @property
    def length(self) -> int:
        return self.sectors << _SHIFT

    @property
    def mutates(self) -> bool:
        """True for every kind but FLUSH: it changes sectors."""
        return self.kind is not RecordKind.FLUSH

    def pack(self) -> bytes:
        aux = self.flush_start if self.kind is RecordKind.FLUSH else self.spill_offset
        return INDEX.pack(self.seq, self.kind, FLAG_UNMAP if self.unmap else 0,
                          self.sector, self.sectors, aux)

    @classmethod
    def unpack(cls, raw: bytes | memoryview, offset: int = 0) -> LogRecord:
        seq, kind, flags, sector, sectors, aux = INDEX.unpack_from(raw, offset)
        k = RecordKind(kind)
        flush = k is RecordKind.FLUSH
        return cls(seq, k, sector, sectors, 0 if flush else aux, aux if flush else 0,
                   bool(flags & FLAG_UNMAP))


class _AppendFile:
    """An append-only file; with ``chunk`` its space is reserved that far ahead, so
    writing into it cannot hit ENOSPC (the data file has none: reserving a
    write's room costs tmpfs a zeroed page more than the write itself, and a
    failed spill already fails the request before the medium is touched)."""

    def __init__(self, path: Path, chunk: int = 0) -> None:
        self.path = path
        self.chunk = chunk
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.reserved = 0
        self.used = 0

    def ensure(self, end: int) -> None:
        """Reserve up to ``end``: a whole chunk ahead if there is room, else exactly ``end``."""
        if end <= self.reserved or not self.chunk:
            return
        try:
            os.posix_fallocate(self.fd, self.reserved, max(end, self.reserved + self.chunk)
                               - self.reserved)
            self.reserved = max(end, self.reserved + self.chunk)
        except OSError:
            os.posix_fallocate(self.fd, self.reserved, end - self.reserved)
            self.reserved = end

    def claim(self, n: int) -> int:
        """Reserve ``n`` bytes at the end; returns their offset."""
        self.ensure(self.used + n)
        offset, self.used = self.used, self.used + n
        return offset

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_meta(fd: int, meta: dict[str, object]) -> None:
    """meta.json rewritten in place, padded to META_BYTES (json allows trailing spaces)."""
    raw = json.dumps(meta).encode()
    if len(raw) > META_BYTES:
        meta = {**meta, "broken": str(meta.get("broken"))[: META_BYTES // 2]}
        raw = json.dumps(meta).encode()
    os.pwrite(fd, raw.ljust(META_BYTES), 0)


class WriteLog:
    """Records completed requests into ``directory`` (created; an existing log is refused)."""

    def __init__(self, directory: str | os.PathLike[str], disk_size: int, *,
                 index_batch: int = INDEX_BATCH) -> None:
        if disk_size <= 0 or disk_size % SECTOR_SIZE:
            raise ValueError(f"disk_size {disk_size} must be a positive multiple of 512")
        self.directory = Path(directory)
        self.disk_size = disk_size
        self._open_files()
        self._lock = threading.Lock()
        self._batch = max(1, index_batch)
        self._pending = bytearray()
        self._seq = 0  # last sequence number given
        self._written = 0  # index records on disk
        self._begun = 0  # requests that reserved an index slot
        #: Why the log stopped recording, or None while it records.
        self.broken: str | None = None
        self._closed = False
        self._sync_meta()

    def _open_files(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / INDEX_NAME).exists():
            raise WriteLogCorrupt(f"write log {self.directory}: already holds a log; "
                                  "give each logged run its own directory")
        try:
            self._data = _AppendFile(self.directory / DATA_NAME)
            self._index = _AppendFile(self.directory / INDEX_NAME, INDEX_CHUNK)
            self._meta_fd = os.open(self.directory / META_NAME,
                                    os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            os.posix_fallocate(self._meta_fd, 0, META_BYTES)
        except OSError as exc:
            raise BackendError(f"write log {self.directory}: cannot create its files: {exc}; "
                               "give it a writable directory with room") from exc

    # --- the data path (called by LoggedStorage in the backend thread) ------------------

    @property
    def count(self) -> int:
        """Requests logged so far."""
        return self._seq

    @property
    def spilled(self) -> int:
        """Bytes of write data in ``data.bin``."""
        return self._data.used

    def begin(self, nbytes: int) -> tuple[int, int]:
        """Before a request touches the medium: room for its record, a place for its data.

        Returns (spill offset for ``nbytes``, seq of the last completed request).
        ``OSError`` (the guest sees IOERR) if the log is broken or has no room.
        """
        with self._lock:
            if self.broken is not None:
                raise OSError(errno.EIO, f"write log broken: {self.broken}")
            try:
                self._index.ensure((self._begun + 1) * INDEX.size)
                offset = self._data.claim(nbytes) if nbytes else 0
            except OSError as exc:
                self._break(f"no room for another index record: {exc}")
                raise
            self._begun += 1
            return offset, self._seq

    def spill(self, offset: int, bufs: Sequence[memoryview], nbytes: int) -> None:
        """Copy a write's data from guest memory into the reserved spill range."""
        try:
            done = os.pwritev(self._data.fd, bufs, offset)
        except OSError as exc:
            self.fail(f"spilling {nbytes} bytes to {self._data.path} failed: {exc}")
            raise
        if done != nbytes:
            self.fail(f"spilling {nbytes} bytes to {self._data.path} wrote {done}")
            raise OSError(errno.EIO, "write log spill was short")

    def complete(self, kind: RecordKind, sector: int = 0, sectors: int = 0, aux: int = 0,
                 unmap: bool = False) -> None:
        """The request completed on the medium: give it the next sequence number."""
        with self._lock:
            self._seq += 1
            self._pending += INDEX.pack(self._seq, kind, FLAG_UNMAP if unmap else 0,
                                        sector, sectors, aux)
            if len(self._pending) >= self._batch * INDEX.size:
                try:
                    self._write_index()
                except OSError as exc:  # its room was reserved: an I/O error, not ENOSPC
                    self._break(f"writing the index to {self._index.path} failed: {exc}")
                    raise

    def fail(self, reason: str) -> None:
        """Stop recording for good: ``reason`` is what ``check()`` will say."""
        with self._lock:
            self._break(reason)

    def _break(self, reason: str) -> None:
        if self.broken is not None:
            return
        self.broken = f"{reason} (after {self._seq} logged requests)"
        log.error("write log %s: broken: %s; later writes, flushes and discards fail "
                  "with an I/O error", self.directory, self.broken)
        try:
            self._write_index()
            self._sync_meta()
        except OSError as exc:
            log.error("write log %s: could not record that it broke: %s", self.directory, exc)

    def _write_index(self) -> None:
        if not self._pending:
            return
        pending, self._pending = bytes(self._pending), bytearray()
        try:
            os.pwrite(self._index.fd, pending, self._written * INDEX.size)
        except OSError:
            self._pending[:0] = pending
            raise
        self._written += len(pending) // INDEX.size

    def _meta(self) -> dict[str, object]:
        """What meta.json holds (call with the lock held)."""
        return {"format": FORMAT, "disk_size": self.disk_size, "records": self._written,
                "spilled": self._data.used, "broken": self.broken, "closed": self._closed}

    def _sync_meta(self) -> None:
        _write_meta(self._meta_fd, self._meta())

    # --- the test's side --------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`WriteLogBroken` if the log stopped recording."""
        if self.broken is not None:
            raise WriteLogBroken(f"write log {self.directory}: {self.broken}; crash states "
                                 "cannot be built from it (give the log a directory with room)")

    def sync(self) -> None:
        """Put every record so far on disk (the index and meta.json)."""
        with self._lock:
            if self._closed:
                return
            try:
                self._write_index()
                self._sync_meta()
            except OSError as exc:
                self._break(f"writing the index failed: {exc}")

    def recorded(self) -> RecordedLog:
        """Everything so far, as a loaded log (syncs first).

        Only the records written out by then are read: the backend thread may be
        writing the next batch meanwhile, and a read racing that write could see a
        record half written (its seq and kind but no sectors).  The meta is taken
        under the lock, not read from meta.json: the backend thread rewrites that
        file in place when the log breaks, and a read racing it could be torn.
        """
        self.sync()
        with self._lock:
            written, meta = self._written, self._meta()
        return RecordedLog.load(self.directory, records=written, meta=meta)

    def close(self) -> None:
        self.sync()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sync_meta()
            self._data.close()
            self._index.close()
            os.close(self._meta_fd)

    def __enter__(self) -> WriteLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LoggedStorage(Storage):
    """A :class:`~.blk.Storage` that logs every completed write, flush, discard, write-zeroes.

    Each mutating call reserves its log room first, spills the data, then
    runs on the inner medium, then takes its sequence number: a request that
    cannot be logged never reaches the medium.  A medium that fails a mutating
    call leaves those sectors undefined (§5.2.6.2: an errored write has no
    defined contents), so the log breaks; a failed flush only is not recorded.
    """

    def __init__(self, inner: Storage, log: WriteLog) -> None:
        if log.disk_size != inner.size:
            raise ValueError(f"write log {log.directory} is for a {log.disk_size}-byte disk, "
                             f"the storage has {inner.size} bytes")
        self.inner = inner
        self.log = log
        self.size = inner.size
        #: The server reads this to advertise VIRTIO_BLK_F_RO (FileStorage has it).
        self.readonly = bool(getattr(inner, "readonly", False))

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        return self.inner.readv(offset, bufs)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        nbytes = sum(len(b) for b in bufs)
        spill_at, _ = self.log.begin(nbytes)
        self.log.spill(spill_at, bufs, nbytes)
        try:
            done = self.inner.writev(offset, bufs)
        except OSError as exc:
            self._medium_failed("write", offset, nbytes, exc)
            raise
        if done != nbytes:
            self._medium_failed("write", offset, nbytes, f"short: {done} bytes")
            return done
        self.log.complete(RecordKind.WRITE, offset >> _SHIFT, nbytes >> _SHIFT, spill_at)
        return done

    def flush(self) -> None:
        _, started_after = self.log.begin(0)
        self.inner.flush()
        self.log.complete(RecordKind.FLUSH, aux=started_after)

    def discard(self, offset: int, length: int) -> None:
        self.log.begin(0)
        try:
            self.inner.discard(offset, length)
        except OSError as exc:
            self._medium_failed("discard", offset, length, exc)
            raise
        self.log.complete(RecordKind.DISCARD, offset >> _SHIFT, length >> _SHIFT)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self.log.begin(0)
        try:
            self.inner.write_zeroes(offset, length, unmap)
        except OSError as exc:
            self._medium_failed("write-zeroes", offset, length, exc)
            raise
        self.log.complete(RecordKind.WRITE_ZEROES, offset >> _SHIFT, length >> _SHIFT,
                          unmap=unmap)

    def _medium_failed(self, what: str, offset: int, length: int, why: object) -> None:
        self.log.fail(f"the medium failed a {what} of {length} bytes at byte {offset} ({why}); "
                      "those sectors are undefined")

    def close(self) -> None:
        """Close the medium and the log (its index and meta.json written; still loadable)."""
        try:
            self.log.close()
        finally:
            self.inner.close()


@dataclass(frozen=True)
class RecordedLog:
    """A log read back from its directory: records in order, and each write's data."""

    directory: Path
    disk_size: int
    records: tuple[LogRecord, ...]
    broken: str | None
    #: True if the writer closed it (else the tail after its last sync may be missing).
    closed: bool

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, records: int | None = None,
             meta: Mapping[str, object] | None = None) -> RecordedLog:
        """The log in ``directory``; with ``records``, only its first that many (what
        its writer had written out: bytes after them may be a write in progress);
        with ``meta``, that in place of ``meta.json`` (its live writer's, taken under
        its lock: the file may be mid-rewrite)."""
        path = Path(directory)
        meta = _read_meta(path) if meta is None else meta
        disk_size = _int_field(path, meta, "disk_size")
        spill_size = _file_size(path / DATA_NAME)
        got = _read_index(path, disk_size, spill_size, records)
        broken = meta.get("broken")
        return cls(path, disk_size, got, broken if isinstance(broken, str) else None,
                   meta.get("closed") is True)

    def check(self) -> None:
        if self.broken is not None:
            raise WriteLogBroken(f"write log {self.directory}: {self.broken}; crash states "
                                 "cannot be built from it (give the log a directory with room)")

    def record(self, seq: int) -> LogRecord:
        return self.records[seq - 1]

    def data(self, record: LogRecord) -> bytes:
        """A WRITE's bytes, read from ``data.bin``."""
        if record.kind is not RecordKind.WRITE:
            raise ValueError(f"record {record.seq} is a {record.kind.name}, not a WRITE")
        with open(self.directory / DATA_NAME, "rb") as f:
            f.seek(record.spill_offset)
            raw = f.read(record.length)
        if len(raw) != record.length:
            raise WriteLogCorrupt(f"write log {self.directory}: data of record {record.seq} "
                                  "is cut short")
        return raw


def _read_meta(path: Path) -> dict[str, object]:
    try:
        meta = json.loads((path / META_NAME).read_bytes())
    except (OSError, ValueError) as exc:
        raise WriteLogCorrupt(f"write log {path}: cannot read {META_NAME}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WriteLogCorrupt(f"write log {path}: not a format-{FORMAT} write log")
    return meta


def _int_field(path: Path, meta: Mapping[str, object], key: str) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or value <= 0:
        raise WriteLogCorrupt(f"write log {path}: {META_NAME} has no valid {key!r}")
    return value


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise WriteLogCorrupt(f"write log {path.parent}: {exc}") from exc


def _read_index(path: Path, disk_size: int, spill_size: int,
                limit: int | None = None) -> tuple[LogRecord, ...]:
    """Whole records in order, at most ``limit``; reserved space (seq 0) and a torn tail
    end the list."""
    with open(path / INDEX_NAME, "rb") as f:
        raw = f.read() if limit is None else f.read(limit * INDEX.size)
    records: list[LogRecord] = []
    for off in range(0, len(raw) - INDEX.size + 1, INDEX.size):
        if INDEX.unpack_from(raw, off)[0] == 0:
            break
        try:
            rec = LogRecord.unpack(raw, off)
        except ValueError as exc:
            raise WriteLogCorrupt(f"write log {path}: index record {len(records) + 1}: "
                                  f"{exc}") from exc
        _validate(path, rec, len(records) + 1, disk_size, spill_size)
        records.append(rec)
    return tuple(records)


def _validate(path: Path, rec: LogRecord, seq: int, disk_size: int, spill_size: int) -> None:
    why = None
    if rec.seq != seq:
        why = f"sequence number {rec.seq} where {seq} belongs"
    elif rec.mutates and rec.offset + rec.length > disk_size:
        why = f"sectors beyond the {disk_size}-byte disk"
    elif rec.kind is RecordKind.WRITE and rec.spill_offset + rec.length > spill_size:
        why = f"data beyond the end of {DATA_NAME}"
    elif rec.kind is RecordKind.FLUSH and rec.flush_start >= rec.seq:
        why = "a flush that started after it completed"
    if why is not None:
        raise WriteLogCorrupt(f"write log {path}: index record {seq}: {why}")
