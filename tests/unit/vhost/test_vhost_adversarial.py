"""An adversarial front-end and guest against the in-process backend (issue 16, items 2-3).

Part one plays a hostile front-end (vhost-user.rst) or driver: each case is a
defect found that way, and each test failed before its fix.  Cases that could
kill or wedge the process (SIGBUS, a blocked loop thread) run in a child
process (adversary.py) so a regression fails the test instead of pytest.
Part two checks the device requirements of virtio 1.2 §5.2 one by one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vhost_rig import Rig

from pytest_virtio.errors import ProtocolError
from pytest_virtio.guests.launch import start_backend
from pytest_virtio.spec import Disk
from pytest_virtio.vhost_user import BlkType, MemoryStorage, VhostUserBlkServer
from pytest_virtio.vhost_user import protocol as p
from pytest_virtio.vhost_user.blk import (
    CONFIG,
    ID_BYTES,
    SEG_F_UNMAP,
    BlkDevice,
    BlkStatus,
    FileStorage,
)
from pytest_virtio.vhost_user.protocol import Request
from pytest_virtio.vhost_user.testing import (
    MockFrontend,
    MockMemory,
    MockSplitQueue,
    QueueFds,
    segments,
)
from pytest_virtio.vhost_user.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

MiB = 1 << 20
ADVERSARY = Path(__file__).with_name("adversary.py")


def _child(case: str, timeout: float = 90) -> dict[str, Any]:
    """Run one adversary.py case in its own process; it must exit 0 and report."""
    # The child imports the same pytest_virtio as this process, wherever it comes from.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(ADVERSARY), case], capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)
    assert proc.returncode == 0, (
        f"case {case} died with status {proc.returncode} (negative: signal)\n{proc.stderr[-2000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def sock_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="vuadv", dir="/tmp") as d:
        yield os.path.join(d, "vu.sock")


@pytest.fixture
def server(sock_path: str) -> Iterator[VhostUserBlkServer]:
    srv = VhostUserBlkServer(sock_path, MemoryStorage(MiB)).start()
    yield srv
    srv.stop()


@pytest.fixture
def mem() -> Iterator[MockMemory]:
    m = MockMemory(4 * MiB, layout=[(0, MiB), (MiB, 3 * MiB)])
    yield m
    m.close()


def _connect(server: VhostUserBlkServer) -> tuple[MockFrontend, int]:
    fe = MockFrontend(server.socket_path)
    features, _ = fe.realize()
    return fe, features


def _started(server: VhostUserBlkServer, mem: MockMemory, size: int = 64
             ) -> tuple[MockFrontend, MockSplitQueue]:
    fe, features = _connect(server)
    q = MockSplitQueue(mem, size, base=0x10000, data_base=0x100000)
    fe.start(mem, [q], features)
    server.wait_running(5)
    return fe, q


def _serve(fe: MockFrontend, q: MockSplitQueue, req_head: int) -> list[tuple[int, int]]:
    q.publish(req_head)
    fe.kick()
    fe.wait_call()
    return q.take_used()


# ================================================================ item 2: defects


def test_shrunk_unsealed_memfd_is_refused_and_the_process_lives() -> None:
    out = _child("shrink_unsealed")
    assert out["served"] == 0  # nothing touched the truncated memory
    (err,) = out["errors"]
    assert err.startswith("GuestMemoryError") and "F_SEAL_SHRINK" in err
    assert "memory-backend-memfd" in err  # names the fix


def test_sealed_memfd_cannot_shrink_and_is_served() -> None:
    out = _child("shrink_sealed")
    assert not out["shrunk"]  # F_SEAL_SHRINK: ftruncate fails with EPERM
    assert out["served"] == 1 and out["status"] == BlkStatus.OK and out["errors"] == []


def test_full_blocking_call_pipe_never_stalls_the_loop() -> None:
    out = _child("call_pipe")
    assert out["completed"] == 1000, out  # was: stuck after 512 signals filled the pipe
    assert out["control_s"] is not None and out["control_s"] < 2.0
    assert out["stop_s"] is not None and out["errors"] == []


def test_front_end_stalling_mid_message_does_not_hold_up_stop() -> None:
    out = _child("stall_mid_message")
    assert out["stop_s"] is not None and out["stop_s"] < 1.0, out  # was: up to 10 s
    assert out["errors"] == []


def test_hang_up_right_after_a_kick_reports_nothing(server: VhostUserBlkServer,
                                                    mem: MockMemory) -> None:
    """300 front-ends kick and hang up at once: no stale queue event may run after teardown."""
    for i in range(300):
        fe, q = _started(server, mem)
        q.reset_alloc()
        q.publish(q.blk_request(BlkType.IN, 0, 512).head)
        fe.kick()
        fe.close()
        _wait_for(lambda: not server.connected)
        assert server.errors == [], f"try {i}: {server.errors}"
        mem.write(0x10000, bytes(0x10000))  # fresh rings for the next front-end
    assert server.connections == 300


def test_split_header_copies_16_bytes_not_the_chain() -> None:
    """Header split 8+8, then 60 x 4 MiB readable descriptors: memory stays bounded."""
    r = Rig(size=64, storage_size=MiB, layout=[(0, 8 * MiB)])
    try:
        q = r.q
        hdr = q.alloc(16)
        q.mem.write(hdr, p.U64.pack(BlkType.OUT) + p.U64.pack(0))
        big = q.alloc(4 * MiB, 4096)
        status = q.alloc(1, 1)
        bufs = [(hdr, 8, False), (hdr + 8, 8, False)]
        bufs += [(big, 4 * MiB, False)] * 60 + [(status, 1, True)]
        head = q.add_chain(bufs)
        q.publish(head)
        tracemalloc.start()
        try:
            assert r.run() == 1
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MiB, f"serving one request allocated {peak} bytes"
        assert q.mem.read(status, 1)[0] == BlkStatus.IOERR  # 240 MiB > the 1 MiB disk
    finally:
        r.close()


def _image(tmp_path: Path, size: int = MiB) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xa5" * size)
    return str(path)


def _fds_open_on(path: str) -> int:
    real = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == real:
                count += 1
        except OSError:
            pass
    return count


def test_backend_close_closes_the_image(tmp_path: Path) -> None:
    img = _image(tmp_path)
    server = start_backend(Disk(name="d0"), img, tmp_path, 1)
    assert _fds_open_on(img) == 1
    server.close()
    assert _fds_open_on(img) == 0  # was: the image fd outlived the backend
    server.close()  # idempotent


def test_readonly_disk_opens_its_image_read_only(tmp_path: Path) -> None:
    img = _image(tmp_path)
    server = start_backend(Disk(name="d0", readonly=True), img, tmp_path, 1)
    try:
        storage = server.storage
        assert isinstance(storage, FileStorage)
        assert fcntl.fcntl(storage.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert server.device.features & p.BlkFeature.RO
        server.faults.set_readonly(False)  # a fault may not make a read-only disk writable
        assert server.device._is_readonly()
    finally:
        server.close()


def test_set_vring_num_after_addr_remaps_the_ring(server: VhostUserBlkServer,
                                                  mem: MockMemory) -> None:
    """NUM 8, ADDR, NUM 64: the ring views must cover 64 entries (was: struct.error)."""
    fe, features = _connect(server)
    q = MockSplitQueue(mem, 64, base=0x10000, data_base=0x100000)
    fds = QueueFds(os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK),
                   os.eventfd(0, os.EFD_NONBLOCK))
    fe.queue_fds.append(fds)
    with fe:
        fe.send(Request.SET_FEATURES, p.U64.pack(features))
        fe.set_mem_table(mem)
        fe.send(Request.SET_VRING_NUM, p.VRING_STATE.pack(0, 8))
        fe.send(Request.SET_VRING_ADDR, p.encode_vring_addr(q.vring_addr(0)))
        fe.send(Request.SET_VRING_NUM, p.VRING_STATE.pack(0, 64))
        fe.set_vring_fd(Request.SET_VRING_KICK, 0, fds.kick)
        fe.set_vring_fd(Request.SET_VRING_CALL, 0, fds.call)
        fe.send(Request.SET_VRING_ENABLE, p.VRING_STATE.pack(0, 1))
        server.wait_running(5)
        q.free = list(range(20, 64))  # heads beyond the first 8 entries
        for _ in range(40):  # and avail slots up to 39
            q.publish(q.blk_request(BlkType.GET_ID, 0, 20, indirect=True).head)
        fe.kick()
        _wait_for(lambda: q.used_idx() == 40)
    _wait_for(lambda: not server.connected)
    server.check()


@pytest.mark.parametrize("kind", ["file", "pipe", "socket"])
def test_kick_fd_that_is_not_an_eventfd_is_a_clear_error(
        server: VhostUserBlkServer, mem: MockMemory, kind: str, tmp_path: Path) -> None:
    keep: list[Any] = []
    if kind == "file":
        f = (tmp_path / "f").open("wb")
        keep.append(f)
        fd = f.fileno()
    elif kind == "pipe":
        rd, wr = os.pipe()
        keep += [rd, wr]
        fd = rd
    else:
        a, b = socket.socketpair()
        keep += [a, b]
        fd = a.fileno()
    fe, features = _connect(server)
    with fe:
        fe.send(Request.SET_FEATURES, p.U64.pack(features))
        fe.set_vring_fd(Request.SET_VRING_KICK, 0, fd)
        _wait_for(lambda: bool(server.errors))
    (err,) = server.clear_errors()
    assert isinstance(err, ProtocolError) and "not an eventfd" in str(err), err
    for k in keep:
        k.close() if hasattr(k, "close") else os.close(k)


def test_indirect_table_may_span_adjacent_regions() -> None:
    """§2.7.5.3 puts no region limit on a table; QEMU splits RAM at arbitrary GPAs."""
    r = Rig(size=16, layout=[(0, MiB), (MiB, 3 * MiB)])
    try:
        q = r.q
        r.storage.data[:512] = b"s" * 512
        hdr, buf, status = q.alloc(16), q.alloc(512, 512), q.alloc(1, 1)
        q.mem.write(hdr, p.U64.pack(BlkType.IN) + p.U64.pack(0))
        table = MiB - 16  # first entry in region 0, the next two in region 1
        q.write_desc(0, hdr, 16, DESC_F_NEXT, 1, table=table)
        q.write_desc(1, buf, 512, DESC_F_WRITE | DESC_F_NEXT, 2, table=table)
        q.write_desc(2, status, 1, DESC_F_WRITE, 0, table=table)
        q.write_desc(0, table, 48, DESC_F_INDIRECT)
        q.publish(0)
        assert r.run() == 1 and r.errs() == 0
        assert q.take_used() == [(0, 513)]
        assert q.mem.read(status, 1)[0] == BlkStatus.OK and q.mem.read(buf, 512) == b"s" * 512
    finally:
        r.close()


# ================================================================ item 3: §5.2 conformance


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(size=64)
    yield r
    r.close()


def _do(rig: Rig, rtype: int, sector: int = 0, data: bytes | int = 0) -> tuple[Any, int, int]:
    req = rig.q.blk_request(rtype, sector, data)
    rig.q.publish(req.head)
    assert rig.run() == 1
    ((head, ulen),) = rig.q.take_used()
    assert head == req.head
    return req, ulen, rig.q.status(req)


def test_readonly_device_fails_every_write_and_writes_nothing() -> None:
    """§5.2.6.2: with VIRTIO_BLK_F_RO a write is IOERR and MUST NOT write any data."""
    r = Rig(size=16, readonly=True)
    try:
        r.storage.data[:] = b"\x5a" * len(r.storage.data)
        before = bytes(r.storage.data)
        assert _do(r, BlkType.OUT, 0, b"w" * 4096)[2] == BlkStatus.IOERR
        assert _do(r, BlkType.WRITE_ZEROES, 0, segments((0, 8, 0)))[2] == BlkStatus.IOERR
        assert _do(r, BlkType.DISCARD, 0, segments((0, 8, 0)))[2] == BlkStatus.IOERR
        r.faults.set_readonly(False)
        assert _do(r, BlkType.OUT, 0, b"w" * 512)[2] == BlkStatus.IOERR
        assert bytes(r.storage.data) == before
        assert _do(r, BlkType.IN, 0, 512)[2] == BlkStatus.OK  # reads still work
    finally:
        r.close()


@pytest.mark.parametrize("rtype", [BlkType.DISCARD, BlkType.WRITE_ZEROES])
@pytest.mark.parametrize("flags", [2, 1 << 31, SEG_F_UNMAP | 4])
def test_unknown_segment_flags_are_unsupp(rig: Rig, rtype: int, flags: int) -> None:
    """§5.2.6.2: UNSUPP for DISCARD/WRITE_ZEROES with an unknown flag; nothing changes."""
    rig.storage.data[:4096] = b"k" * 4096
    assert _do(rig, rtype, 0, segments((0, 8, flags)))[2] == BlkStatus.UNSUPP
    assert bytes(rig.storage.data[:4096]) == b"k" * 4096


def test_discard_with_unmap_flag_is_unsupp(rig: Rig) -> None:
    """§5.2.6.2: the unmap flag is only valid for WRITE_ZEROES."""
    assert _do(rig, BlkType.DISCARD, 0, segments((0, 8, SEG_F_UNMAP)))[2] == BlkStatus.UNSUPP


@pytest.mark.parametrize("flags", [0, SEG_F_UNMAP])
@pytest.mark.parametrize("backing", ["memory", "file"])
def test_reads_after_write_zeroes_return_zeroes(tmp_path: Path, flags: int, backing: str) -> None:
    """§5.2.6.2: after WRITE_ZEROES, reads of the range return zeroes (UNMAP or not)."""
    r = Rig(size=16)
    try:
        if backing == "file":
            r.dev = BlkDevice(FileStorage(_image(tmp_path)), stats=r.stats)
        _do(r, BlkType.OUT, 0, b"\xee" * 16384)
        assert _do(r, BlkType.WRITE_ZEROES, 0, segments((8, 8, flags), (24, 4, flags)))[2] == 0
        req, _, st = _do(r, BlkType.IN, 0, 16384)
        got = r.q.data(req)
        assert st == BlkStatus.OK
        assert got[4096:8192] == bytes(4096) and got[12288:14336] == bytes(2048)
        assert got[:4096] == b"\xee" * 4096 and got[14336:] == b"\xee" * 2048  # outside kept
    finally:
        r.dev.storage.close()
        r.close()


class _ObservingStorage(MemoryStorage):
    """Records what the driver could see of the ring while the device does I/O."""

    def __init__(self, size: int, q: MockSplitQueue) -> None:
        super().__init__(size)
        self.q = q
        self.seen: list[tuple[str, int, list[tuple[int, int]]]] = []
        self.status_gpa = 0

    def _look(self, what: str) -> None:
        q = self.q
        idx = q.used_idx()
        elems = [p.U64.unpack(q.mem.read(q.used_gpa + 4 + 8 * (i % q.size), 8))[0]
                 for i in range(idx)]
        self.seen.append((what, idx, [(e & 0xFFFFFFFF, e >> 32) for e in elems]))

    def readv(self, offset: int, bufs: Any) -> int:
        self._look("read")
        return super().readv(offset, bufs)

    def flush(self) -> None:
        self._look("flush")
        self.flush_status = self.q.mem.read(self.status_gpa, 1)[0]


def test_flush_is_durable_before_it_completes(rig: Rig) -> None:
    """§5.2.6: FLUSH completes only after the data is on stable storage."""
    store = _ObservingStorage(MiB, rig.q)
    rig.dev = BlkDevice(store, stats=rig.stats)
    req = rig.q.blk_request(BlkType.FLUSH)
    store.status_gpa = req.status_gpa
    rig.q.publish(req.head)
    assert rig.run() == 1
    (what, idx, _), = store.seen
    assert what == "flush" and idx == 0  # not yet used when the storage flushed
    assert store.flush_status == 0xFF  # status not yet written either
    assert rig.q.take_used() == [(req.head, 1)] and rig.q.status(req) == BlkStatus.OK


def test_file_flush_calls_fdatasync(tmp_path: Path) -> None:
    r = Rig(size=16)
    fs = FileStorage(_image(tmp_path))
    try:
        r.dev = BlkDevice(fs, stats=r.stats)
        _do(r, BlkType.OUT, 0, b"d" * 512)
        assert fs.fdatasyncs == 0
        assert _do(r, BlkType.FLUSH)[2] == BlkStatus.OK and fs.fdatasyncs == 1
    finally:
        fs.close()
        r.close()


@pytest.mark.parametrize("buf", [20, 64, 512])
def test_get_id_writes_exactly_20_bytes(rig: Rig, buf: int) -> None:
    """§5.2.6: GET_ID returns VIRTIO_BLK_ID_BYTES (20); nothing past them is touched."""
    req = rig.q.blk_request(BlkType.GET_ID, 0, buf)
    rig.q.mem.write(req.data_gpa, b"\xaa" * buf)
    rig.q.publish(req.head)
    rig.run()
    assert rig.q.take_used() == [(req.head, ID_BYTES + 1)]
    data = rig.q.data(req)
    assert data[:ID_BYTES] == b"rig-serial".ljust(ID_BYTES, b"\0")
    assert data[ID_BYTES:] == b"\xaa" * (buf - ID_BYTES)


def test_used_len_is_visible_before_used_idx(rig: Rig) -> None:
    """§2.7.8: every used element up to used.idx is complete whenever the driver looks."""
    store = _ObservingStorage(MiB, rig.q)
    rig.dev = BlkDevice(store, stats=rig.stats)
    reqs = [rig.q.blk_request(BlkType.IN, i, 512 * (i + 1)) for i in range(8)]
    rig.q.publish(*(r.head for r in reqs))
    assert rig.run() == 8
    final = dict(rig.q.take_used())
    assert len(store.seen) == 8
    for _what, idx, elems in store.seen:
        for uid, ulen in elems[:idx]:
            assert final[uid] == ulen  # never a stale or half-written element below idx


def test_spurious_notifications_are_harmless(server: VhostUserBlkServer,
                                             mem: MockMemory) -> None:
    """Kicks with nothing new, before enable and after stop: no request, no error."""
    fe, q = _started(server, mem)
    with fe:
        for _ in range(200):
            fe.kick()
        fe.get_u64(Request.GET_FEATURES)  # a round trip: the kicks were all handled
        assert q.used_idx() == 0 and fe.err_count() == 0
        assert _serve(fe, q, q.blk_request(BlkType.GET_ID, 0, 20).head)[0][1] == 21
        fe.send(Request.SET_VRING_ENABLE, p.VRING_STATE.pack(0, 0))
        fe.kick()
        fe.send(Request.SET_VRING_ENABLE, p.VRING_STATE.pack(0, 1))
        assert fe.get_vring_base(0) == 1
        fe.kick()
        fe.get_u64(Request.GET_FEATURES)
    _wait_for(lambda: not server.connected)
    server.check()
    assert server.stats.to_dict()["requests"] == {"GET_ID": 1}


# ================================================================ options (§5.2.4)


@pytest.mark.parametrize("block", [512, 4096])
def test_logical_block_size_in_config_and_enforced(block: int) -> None:
    """blk_size is offered; a request that is not whole blocks is IOERR (as QEMU does)."""
    r = Rig(size=16)
    try:
        r.dev = BlkDevice(r.storage, stats=r.stats, block_size=block)
        fields = CONFIG.unpack(r.dev.config()[: CONFIG.size])
        assert fields[6] == block and r.dev.features & p.BlkFeature.BLK_SIZE
        assert _do(r, BlkType.OUT, 8, b"a" * 4096)[2] == BlkStatus.OK
        odd = BlkStatus.OK if block == 512 else BlkStatus.IOERR
        assert _do(r, BlkType.IN, 1, 4096)[2] == odd  # sector 1: not 4 KiB aligned
        assert _do(r, BlkType.IN, 8, 512)[2] == odd  # half a 4 KiB block
        assert _do(r, BlkType.WRITE_ZEROES, 0, segments((1, 7, 0)))[2] == odd
    finally:
        r.close()


def test_block_size_and_seg_max_validated(sock_path: str) -> None:
    with pytest.raises(ValueError, match="block_size"):
        BlkDevice(MemoryStorage(4096), block_size=8192)
    srv = VhostUserBlkServer(sock_path, MemoryStorage(MiB), queue_size_max=16)
    assert CONFIG.unpack(srv.device.config()[: CONFIG.size])[2] == 14  # seg_max fits the ring

