"""virtio-blk device semantics (virtio 1.2 §5.2) over a pluggable storage.

A request is a descriptor chain: a readable 16-byte header ``virtio_blk_outhdr``
(type, ioprio, sector), the data, and one writable status byte at the very end
(§5.2.6).  Everything the guest names is checked before any I/O: data lengths
in whole sectors, sector ranges without overflow, read-only media, segment
lists for DISCARD/WRITE_ZEROES.  Guest data moves zero-copy: the storage reads
and writes straight into memoryviews of guest RAM (``os.preadv``/``os.pwritev``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pytest_virtio.errors import BackendError
from pytest_virtio.vhost_user.protocol import (
    MAX_CONFIG_SIZE,
    BlkFeature,
    BlkStatus,
    BlkType,
    TransportFeature,
)
from pytest_virtio.vhost_user.virtqueue import QueueBroken

if TYPE_CHECKING:
    from pytest_virtio.vhost_user.faults import FaultInjector
    from pytest_virtio.vhost_user.stats import Stats, Trace

__all__ = [
    "CONFIG",
    "OUTHDR",
    "SECTOR_SIZE",
    "SEGMENT",
    "BlkDevice",
    "FileStorage",
    "MemoryStorage",
    "Storage",
]

SECTOR_SIZE = 512
SECTOR_SHIFT = 9
ID_BYTES = 20  # §5.2.6: VIRTIO_BLK_ID_BYTES
OUTHDR = struct.Struct("<IIQ")  # §5.2.6 virtio_blk_outhdr: type, ioprio, sector
SEGMENT = struct.Struct("<QII")  # §5.2.6 virtio_blk_discard_write_zeroes
SEG_F_UNMAP = 1
# §5.2.4 struct virtio_blk_config as of virtio 1.2 up to write_zeroes_may_unmap + padding.
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
CONFIG_WRITEBACK_OFFSET = 32
SEG_MAX = 126  # fits QEMU's default queue-size 128 with the header and status descriptors
#: Logical block sizes a Linux guest accepts (it refuses blk_size above PAGE_SIZE).
BLOCK_SIZES = (512, 1024, 2048, 4096)
MAX_DISCARD_SECTORS = 1 << 21  # 1 GiB per segment
MAX_DISCARD_SEG = 32
DISCARD_ALIGNMENT = 8  # sectors (4 KiB)
_ZERO_CHUNK = bytes(1 << 20)


# --- storage ----------------------------------------------------------------


class Storage(ABC):
    """Backing medium: byte-addressed, sector-aligned offsets guaranteed by the caller."""

    size: int = 0

    @abstractmethod
    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Fill ``bufs`` from ``offset``; return bytes read."""

    @abstractmethod
    def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Write ``bufs`` at ``offset``; return bytes written."""

    def flush(self) -> None:  # noqa: B027 - optional hook, a no-op is right for RAM
        """Make completed writes durable (VIRTIO_BLK_T_FLUSH)."""

    def discard(self, offset: int, length: int) -> None:
        """Drop a range; contents afterwards are unspecified (§5.2.6.2). Default: zero it."""
        self.write_zeroes(offset, length, unmap=True)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Zero a range (default: plain writes of zeros)."""
        zero = memoryview(_ZERO_CHUNK)
        while length:
            n = min(length, len(zero))
            self.writev(offset, [zero[:n]])
            offset += n
            length -= n

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the medium."""

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryStorage(Storage):
    """A RAM disk; handy for unit tests and benchmarks (no syscalls on the data path)."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % SECTOR_SIZE:
            raise ValueError(f"MemoryStorage size {size} must be a positive multiple of 512")
        self.size = size
        self.data = bytearray(size)
        self._view = memoryview(self.data)

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        src = self._view
        pos = offset
        for b in bufs:
            n = len(b)
            b[:] = src[pos : pos + n]
            pos += n
        return pos - offset

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        dst = self._view
        pos = offset
        for b in bufs:
            n = len(b)
            dst[pos : pos + n] = b
            pos += n
        return pos - offset

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._view[offset : offset + length] = bytes(length)

    def close(self) -> None:
        self._view.release()


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def _libc_fallocate() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if not name:
        return None
    fn = ctypes.CDLL(name, use_errno=True).fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate()


class FileStorage(Storage):
    """A raw image file; data goes straight between the file and guest RAM."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        try:
            self.fd = os.open(self.path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as exc:
            raise BackendError(f"cannot open disk image {self.path}: {exc}") from exc
        size = os.fstat(self.fd).st_size
        self.size = size - size % SECTOR_SIZE
        #: fdatasync calls made for FLUSH: lets a test see a guest flush reach the disk.
        self.fdatasyncs = 0

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if len(bufs) <= _IOV_MAX:
            return os.preadv(self.fd, bufs, offset)
        return self._chunked(os.preadv, offset, bufs)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if len(bufs) <= _IOV_MAX:
            return os.pwritev(self.fd, bufs, offset)
        return self._chunked(os.pwritev, offset, bufs)

    def _chunked(self, op: object, offset: int, bufs: Sequence[memoryview]) -> int:
        total = 0
        for i in range(0, len(bufs), _IOV_MAX):
            part = bufs[i : i + _IOV_MAX]
            n = op(self.fd, part, offset + total)  # type: ignore[operator]
            total += n
            if n != sum(len(b) for b in part):
                break
        return total

    def flush(self) -> None:
        os.fdatasync(self.fd)
        self.fdatasyncs += 1

    def _falloc(self, mode: int, offset: int, length: int) -> bool:
        if _fallocate is None:
            return False
        return bool(_fallocate(self.fd, mode, offset, length) == 0)

    def discard(self, offset: int, length: int) -> None:
        if not self._falloc(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
            super().write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        mode = (
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if unmap
            else _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE
        )
        if not self._falloc(mode, offset, length):
            super().write_zeroes(offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- the device ----------------------------------------------------------------


class BlkDevice:
    """virtio-blk request processing and config space for one disk."""

    def __init__(
        self,
        storage: Storage,
        *,
        readonly: bool = False,
        serial: str = "pytest-virtio",
        num_queues: int = 1,
        block_size: int = SECTOR_SIZE,
        seg_max: int = SEG_MAX,
        stats: Stats | None = None,
        faults: FaultInjector | None = None,
        trace: Trace | None = None,
    ) -> None:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
        if not 1 <= seg_max <= SEG_MAX:
            raise ValueError(f"seg_max must be in 1..{SEG_MAX}, got {seg_max}")
        self.storage = storage
        self.readonly = readonly
        self.serial = serial.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
        self.num_queues = num_queues
        self.block_size = block_size
        self.seg_max = seg_max
        #: §5.2.4 blk_size: requests must be whole logical blocks (QEMU's
        #: virtio_blk_sect_range_ok answers IOERR otherwise); mask in bytes.
        self._block_mask = block_size - 1
        self.capacity = (storage.size - storage.size % block_size) >> SECTOR_SHIFT
        self.writeback = 1
        self.stats = stats
        self.faults = faults
        self.trace = trace

    # --- features and config (§5.2.3, §5.2.4) ---------------------------------

    @property
    def features(self) -> int:
        """Feature bits offered to the driver."""
        f = (
            BlkFeature.SEG_MAX
            | BlkFeature.BLK_SIZE
            | BlkFeature.FLUSH
            | BlkFeature.CONFIG_WCE
            | BlkFeature.MQ
            | BlkFeature.DISCARD
            | BlkFeature.WRITE_ZEROES
            | TransportFeature.INDIRECT_DESC
            | TransportFeature.EVENT_IDX
            | TransportFeature.VERSION_1
        )
        if self.readonly:
            f |= BlkFeature.RO
        return int(f)

    def config(self) -> bytes:
        """The whole config space, zero-padded to vhost-user's 256-byte maximum."""
        raw = CONFIG.pack(
            self.capacity, 0, self.seg_max, 0, 0, 0, self.block_size, 0, 0, 0, 0,
            self.writeback, 0, self.num_queues,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_ALIGNMENT,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,
        )
        return raw.ljust(MAX_CONFIG_SIZE, b"\0")

    def read_config(self, offset: int, size: int) -> bytes:
        return self.config()[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """Only ``writeback`` is driver-writable (§5.2.5, CONFIG_WCE)."""
        if offset <= CONFIG_WRITEBACK_OFFSET < offset + len(data):
            self.writeback = 1 if data[CONFIG_WRITEBACK_OFFSET - offset] else 0

    # --- requests (§5.2.6) ------------------------------------------------------------

    def handle(
        self,
        queue: int,
        readable: list[memoryview],
        rlen: int,
        writable: list[memoryview],
        wlen: int,
    ) -> int:
        """Serve one chain; returns the used length (bytes written incl. status)."""
        if wlen == 0:
            raise QueueBroken(f"queue {queue}: request without a writable status byte")
        last = writable[-1]
        data_in = writable[:-1] if len(last) == 1 else [*writable[:-1], last[:-1]]
        if rlen < OUTHDR.size:
            last[-1] = BlkStatus.IOERR
            self._account(queue, -1, 0, 0, BlkStatus.IOERR)
            return 1
        first = readable[0]
        if len(first) >= OUTHDR.size:
            rtype, _ioprio, sector = OUTHDR.unpack_from(first)
            data_out = readable[1:] if len(first) == OUTHDR.size else [
                first[OUTHDR.size :], *readable[1:]]
        else:
            # Split header: copy its 16 bytes only, never the data behind it.
            rtype, _ioprio, sector = OUTHDR.unpack(_head(readable, OUTHDR.size))
            data_out = _skip(readable, OUTHDR.size)
        status, written, nbytes = self._dispatch(
            rtype, sector, data_out, rlen - OUTHDR.size, data_in, wlen - 1
        )
        last[-1] = status
        self._account(queue, rtype, sector, nbytes, status)
        return written + 1

    def _account(self, queue: int, rtype: int, sector: int, nbytes: int, status: int) -> None:
        if self.stats is not None:
            self.stats.record(queue, rtype if rtype >= 0 else 15, nbytes, status)
        trace = self.trace
        if trace is not None and trace.enabled:
            trace.add(queue, rtype, sector, nbytes, status)

    def _is_readonly(self) -> bool:
        """Read-only media stay so: a fault can make a disk read-only, never writable."""
        faults = self.faults
        return self.readonly or bool(faults is not None and faults.readonly)

    def _dispatch(
        self,
        rtype: int,
        sector: int,
        data_out: list[memoryview],
        out_len: int,
        data_in: list[memoryview],
        in_len: int,
    ) -> tuple[int, int, int]:
        """Returns (status, bytes written into data_in, payload bytes for stats)."""
        if rtype == BlkType.IN:
            nbytes = in_len
        elif rtype == BlkType.OUT:
            nbytes = out_len
        else:
            nbytes = 0
        faults = self.faults
        if faults is not None and faults.active and faults.should_fail(
            rtype, sector, nbytes >> SECTOR_SHIFT
        ):
            return BlkStatus.IOERR, 0, nbytes
        try:
            if rtype == BlkType.IN:
                return self._read(sector, data_in, in_len)
            if rtype == BlkType.OUT:
                return self._write(sector, data_out, out_len)
            if rtype == BlkType.FLUSH:
                self.storage.flush()
                return BlkStatus.OK, 0, 0
            if rtype == BlkType.GET_ID:
                return self._get_id(data_in, in_len)
            if rtype in (BlkType.DISCARD, BlkType.WRITE_ZEROES):
                return self._discard_or_zero(rtype, data_out, out_len)
        except OSError:
            return BlkStatus.IOERR, 0, nbytes
        return BlkStatus.UNSUPP, 0, 0

    def _in_range(self, sector: int, nbytes: int) -> bool:
        """Sector range check written so it cannot overflow in C either (§5.2.6.1)."""
        nsec = nbytes >> SECTOR_SHIFT
        mask = self._block_mask
        return not nbytes & mask and not (sector << SECTOR_SHIFT) & mask and (
            nsec <= self.capacity and sector <= self.capacity - nsec
        )

    def _read(self, sector: int, bufs: list[memoryview], n: int) -> tuple[int, int, int]:
        if not self._in_range(sector, n):
            return BlkStatus.IOERR, 0, n
        if self.storage.readv(sector << SECTOR_SHIFT, bufs) != n:
            return BlkStatus.IOERR, 0, n
        return BlkStatus.OK, n, n

    def _write(self, sector: int, bufs: list[memoryview], n: int) -> tuple[int, int, int]:
        if self._is_readonly() or not self._in_range(sector, n):
            return BlkStatus.IOERR, 0, n
        if self.storage.writev(sector << SECTOR_SHIFT, bufs) != n:
            return BlkStatus.IOERR, 0, n
        return BlkStatus.OK, 0, n

    def _get_id(self, bufs: list[memoryview], n: int) -> tuple[int, int, int]:
        todo = min(n, ID_BYTES)
        pos = 0
        for b in bufs:
            if pos >= todo:
                break
            take = min(len(b), todo - pos)
            b[:take] = self.serial[pos : pos + take]
            pos += take
        return BlkStatus.OK, todo, 0

    def _discard_or_zero(
        self, rtype: int, bufs: list[memoryview], n: int
    ) -> tuple[int, int, int]:
        if self._is_readonly():
            return BlkStatus.IOERR, 0, 0
        if n == 0 or n % SEGMENT.size or n // SEGMENT.size > MAX_DISCARD_SEG:
            return BlkStatus.UNSUPP, 0, 0
        raw = b"".join(bufs)  # copy once: the guest may change it under us
        segments = [SEGMENT.unpack_from(raw, off) for off in range(0, n, SEGMENT.size)]
        for sector, nsec, flags in segments:
            if flags & ~SEG_F_UNMAP or (rtype == BlkType.DISCARD and flags):
                return BlkStatus.UNSUPP, 0, 0
            if nsec > MAX_DISCARD_SECTORS or not self._in_range(sector, nsec << SECTOR_SHIFT):
                return BlkStatus.IOERR, 0, 0
        total = 0
        for sector, nsec, flags in segments:
            off, length = sector << SECTOR_SHIFT, nsec << SECTOR_SHIFT
            if rtype == BlkType.DISCARD:
                self.storage.discard(off, length)
            else:
                self.storage.write_zeroes(off, length, unmap=bool(flags & SEG_F_UNMAP))
            total += length
        return BlkStatus.OK, 0, total


def _head(views: list[memoryview], n: int) -> bytes:
    """The first ``n`` bytes of ``views`` (the caller checked there are that many)."""
    out = bytearray()
    for v in views:
        out += v[: n - len(out)]
        if len(out) == n:
            break
    return bytes(out)


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """The views with their first ``n`` bytes removed."""
    out: list[memoryview] = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out
