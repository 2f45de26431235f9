"""virtio-blk semantics (§5.2.6) through the mock ring."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from vhost_rig import Rig

from pytest_virtio.vhost_user.blk import (
    CONFIG,
    BlkDevice,
    BlkStatus,
    BlkType,
    FileStorage,
    MemoryStorage,
)
from pytest_virtio.vhost_user.protocol import BlkFeature
from pytest_virtio.vhost_user.testing import segments

SECTORS = (1 << 20) // 512


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(size=64)
    yield r
    r.close()


def _do(rig: Rig, rtype: int, sector: int = 0, data: bytes | int = 0, **kw: bool) -> tuple:
    req = rig.q.blk_request(rtype, sector, data, **kw)
    rig.q.publish(req.head)
    assert rig.run() == 1
    (used,) = rig.q.take_used()
    assert used[0] == req.head
    return req, used[1], rig.q.status(req)


def test_write_then_read(rig: Rig) -> None:
    payload = os.urandom(4096)
    _, ulen, st = _do(rig, BlkType.OUT, 8, payload, indirect=True)
    assert (st, ulen) == (BlkStatus.OK, 1)
    assert bytes(rig.storage.data[4096:8192]) == payload
    req, ulen, st = _do(rig, BlkType.IN, 8, 4096)
    assert (st, ulen) == (BlkStatus.OK, 4097)
    assert rig.q.data(req) == payload


def test_header_split_across_descriptors(rig: Rig) -> None:
    rig.storage.data[512:1024] = b"z" * 512
    req, _, st = _do(rig, BlkType.IN, 1, 512, header_split=True)
    assert st == BlkStatus.OK and rig.q.data(req) == b"z" * 512


def test_last_sector_ok_and_overflow_is_ioerr(rig: Rig) -> None:
    assert _do(rig, BlkType.IN, SECTORS - 1, 512)[2] == BlkStatus.OK
    assert _do(rig, BlkType.IN, SECTORS, 512)[2] == BlkStatus.IOERR
    assert _do(rig, BlkType.IN, SECTORS - 1, 1024)[2] == BlkStatus.IOERR
    assert _do(rig, BlkType.OUT, 2**64 - 1, b"x" * 512)[2] == BlkStatus.IOERR
    assert _do(rig, BlkType.IN, 2**63, 512)[2] == BlkStatus.IOERR


def test_partial_sector_is_ioerr(rig: Rig) -> None:
    assert _do(rig, BlkType.IN, 0, 100)[2] == BlkStatus.IOERR
    assert _do(rig, BlkType.OUT, 0, b"x" * 700)[2] == BlkStatus.IOERR


def test_flush(rig: Rig) -> None:
    _, ulen, st = _do(rig, BlkType.FLUSH)
    assert (st, ulen) == (BlkStatus.OK, 1)


def test_get_id(rig: Rig) -> None:
    req, ulen, st = _do(rig, BlkType.GET_ID, 0, 20)
    assert st == BlkStatus.OK and ulen == 21
    assert rig.q.data(req) == b"rig-serial".ljust(20, b"\0")
    req, ulen, st = _do(rig, BlkType.GET_ID, 0, 512)
    assert ulen == 21  # at most VIRTIO_BLK_ID_BYTES


def test_unknown_type_is_unsupp(rig: Rig) -> None:
    assert _do(rig, 99)[2] == BlkStatus.UNSUPP
    assert _do(rig, BlkType.GET_LIFETIME, 0, 16)[2] == BlkStatus.UNSUPP


def test_header_too_short_is_ioerr(rig: Rig) -> None:
    hdr = rig.q.alloc(8)
    st = rig.q.alloc(1)
    head = rig.q.add_chain([(hdr, 8, False), (st, 1, True)])
    rig.q.publish(head)
    assert rig.run() == 1
    assert rig.mem.read(st, 1)[0] == BlkStatus.IOERR
    assert not rig.vq.broken


def test_discard_and_write_zeroes(rig: Rig) -> None:
    rig.storage.data[:] = b"\xff" * len(rig.storage.data)
    assert _do(rig, BlkType.WRITE_ZEROES, 0, segments((2, 2, 0), (10, 1, 1)))[2] == 0
    assert bytes(rig.storage.data[1024:2048]) == bytes(1024)
    assert bytes(rig.storage.data[5120:5632]) == bytes(512)
    assert rig.storage.data[2048] == 0xFF
    assert _do(rig, BlkType.DISCARD, 0, segments((20, 8, 0)))[2] == BlkStatus.OK
    # discard with the unmap flag, or reserved flags, is UNSUPP (§5.2.6.2)
    assert _do(rig, BlkType.DISCARD, 0, segments((20, 8, 1)))[2] == BlkStatus.UNSUPP
    assert _do(rig, BlkType.WRITE_ZEROES, 0, segments((20, 8, 2)))[2] == BlkStatus.UNSUPP
    assert _do(rig, BlkType.DISCARD, 0, segments((SECTORS - 1, 2, 0)))[2] == BlkStatus.IOERR
    assert _do(rig, BlkType.DISCARD, 0, b"x" * 15)[2] == BlkStatus.UNSUPP


def test_readonly_rejects_writes() -> None:
    r = Rig(size=16, readonly=True)
    try:
        assert BlkFeature.RO & r.dev.features
        assert _do(r, BlkType.OUT, 0, b"x" * 512)[2] == BlkStatus.IOERR
        assert _do(r, BlkType.WRITE_ZEROES, 0, segments((0, 1, 0)))[2] == BlkStatus.IOERR
        assert _do(r, BlkType.DISCARD, 0, segments((0, 1, 0)))[2] == BlkStatus.IOERR
        assert _do(r, BlkType.IN, 0, 512)[2] == BlkStatus.OK
        assert _do(r, BlkType.FLUSH)[2] == BlkStatus.OK
        assert r.storage.data[0] == 0
    finally:
        r.close()


def test_config_space_layout() -> None:
    dev = BlkDevice(MemoryStorage(1 << 20), num_queues=4)
    cfg = dev.config()
    assert len(cfg) == 256 and CONFIG.size == 60
    assert int.from_bytes(cfg[0:8], "little") == SECTORS
    assert int.from_bytes(cfg[20:24], "little") == 512
    assert cfg[32] == 1  # writeback
    assert int.from_bytes(cfg[34:36], "little") == 4
    assert int.from_bytes(cfg[40:44], "little") >= 1  # max_discard_seg
    assert len(dev.read_config(0, 57)) == 57
    dev.write_config(32, b"\x00")
    assert dev.config()[32] == 0
    dev.write_config(0, b"\x01" * 40)  # only writeback is writable
    assert dev.config()[32] == 1 and dev.capacity == SECTORS


def test_file_storage_zero_copy_and_flush(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(1 << 20) + b"tail")  # size rounds down to whole sectors
    r = Rig(size=16)
    fs = FileStorage(img)
    try:
        assert fs.size == 1 << 20
        r.dev = BlkDevice(fs, stats=r.stats)
        payload = os.urandom(8192)
        assert _do(r, BlkType.OUT, 16, payload)[2] == BlkStatus.OK
        assert fs.fdatasyncs == 0
        assert _do(r, BlkType.FLUSH)[2] == BlkStatus.OK
        assert fs.fdatasyncs == 1  # FLUSH reached fdatasync
        req, _, st = _do(r, BlkType.IN, 16, 8192)
        assert st == BlkStatus.OK and r.q.data(req) == payload
        assert img.read_bytes()[8192:16384] == payload
        assert _do(r, BlkType.WRITE_ZEROES, 0, segments((16, 4, 0)))[2] == BlkStatus.OK
        assert _do(r, BlkType.DISCARD, 0, segments((20, 8, 0)))[2] == BlkStatus.OK
        assert img.read_bytes()[8192:14336] == bytes(6144)
    finally:
        fs.close()
        r.close()


def test_file_storage_readonly_and_missing(tmp_path: Path) -> None:
    from pytest_virtio.errors import BackendError

    with pytest.raises(BackendError, match="cannot open"):
        FileStorage(tmp_path / "nope")
    img = tmp_path / "ro.raw"
    img.write_bytes(bytes(4096))
    with FileStorage(img, readonly=True) as fs:
        assert fs.size == 4096


def test_storage_oserror_is_ioerr(rig: Rig) -> None:
    def boom(offset: int, bufs: object) -> int:
        raise OSError(5, "EIO")

    rig.storage.readv = boom  # type: ignore[method-assign]
    assert _do(rig, BlkType.IN, 0, 512)[2] == BlkStatus.IOERR
