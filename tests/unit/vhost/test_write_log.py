"""The write log (issue 28 item 1): real requests through the backend, the log read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from logged_rig import LoggedRig

from pytest_virtio.vhost_user import VhostUserBlkServer
from pytest_virtio.vhost_user.blk import MemoryStorage
from pytest_virtio.vhost_user.crashstates import crash_states
from pytest_virtio.vhost_user.protocol import BlkStatus, BlkType
from pytest_virtio.vhost_user.testing import MockFrontend, MockMemory, MockSplitQueue, segments
from pytest_virtio.vhost_user.writelog import (
    INDEX,
    LoggedStorage,
    LogRecord,
    RecordedLog,
    RecordKind,
    WriteLog,
    WriteLogCorrupt,
)

ENOSPC_CHILD = Path(__file__).with_name("writelog_enospc_child.py")
W, F, D, Z = RecordKind.WRITE, RecordKind.FLUSH, RecordKind.DISCARD, RecordKind.WRITE_ZEROES


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[LoggedRig]:
    r = LoggedRig(tmp_path / "log")
    yield r
    r.log.close()
    r.close()


def test_every_completed_request_in_completion_order(rig: LoggedRig) -> None:
    a, b = os.urandom(4096), os.urandom(1024)
    assert rig.write(8, a) == BlkStatus.OK
    assert rig.write(0, b) == BlkStatus.OK
    assert rig.do(BlkType.IN, 8, 4096) == BlkStatus.OK  # reads are not logged
    assert rig.flush() == BlkStatus.OK
    assert rig.do(BlkType.DISCARD, 0, segments((16, 8, 0), (40, 8, 0))) == BlkStatus.OK
    assert rig.zeroes(24, 8, unmap=True) == BlkStatus.OK
    assert rig.write(2048, b) == BlkStatus.IOERR  # beyond the disk: refused before storage
    rig.faults.fail_type(BlkType.OUT, count=1)
    assert rig.write(0, a) == BlkStatus.IOERR  # failed by fault injection: never happened
    assert rig.flush() == BlkStatus.OK
    got = rig.log.recorded()
    assert got.records == (
        LogRecord(1, W, 8, 8, spill_offset=0),
        LogRecord(2, W, 0, 2, spill_offset=4096),
        LogRecord(3, F, flush_start=2),
        LogRecord(4, D, 16, 8),
        LogRecord(5, D, 40, 8),
        LogRecord(6, Z, 24, 8, unmap=True),
        LogRecord(7, F, flush_start=6),
    )
    assert got.data(got.record(1)) == a and got.data(got.record(2)) == b
    assert got.broken is None and rig.log.spilled == 5120


def test_reload_from_its_directory(tmp_path: Path) -> None:
    r = LoggedRig(tmp_path / "log")
    payloads = [os.urandom(512 * (i + 1)) for i in range(5)]
    for i, data in enumerate(payloads):
        assert r.write(i * 16, data) == BlkStatus.OK
    assert r.flush() == BlkStatus.OK
    live = r.log.recorded()
    r.log.close()
    r.close()
    again = RecordedLog.load(tmp_path / "log")
    assert again.records == live.records and again.closed and not live.closed
    assert [again.data(rec) for rec in again.records if rec.kind is W] == payloads
    assert again.disk_size == 1 << 20
    with pytest.raises(WriteLogCorrupt, match="already holds a log"):
        WriteLog(tmp_path / "log", 1 << 20)


def test_corrupt_index_is_named(tmp_path: Path) -> None:
    r = LoggedRig(tmp_path / "log")
    for i in range(3):
        r.write(i, b"x" * 512)
    r.log.close()
    r.close()
    index = tmp_path / "log" / "index.bin"
    raw = bytearray(index.read_bytes())
    INDEX.pack_into(raw, INDEX.size, 7, W, 0, 1, 1, 512)
    index.write_bytes(bytes(raw))
    with pytest.raises(WriteLogCorrupt, match=r"log/? ?.*index record 2: sequence number 7"):
        RecordedLog.load(tmp_path / "log")
    (tmp_path / "log" / "meta.json").write_text("{}")
    with pytest.raises(WriteLogCorrupt, match="not a format-1 write log"):
        RecordedLog.load(tmp_path / "log")


def test_index_is_on_disk_in_batches_and_at_sync(tmp_path: Path) -> None:
    r = LoggedRig(tmp_path / "log")
    for i in range(300):  # more than one batch of 256
        r.write(i, bytes([i % 256]) * 512)
    assert len(RecordedLog.load(tmp_path / "log").records) == 256
    r.log.sync()
    assert len(RecordedLog.load(tmp_path / "log").records) == 300
    r.log.close()
    r.close()


def test_spill_keeps_memory_bounded(rig: LoggedRig) -> None:
    """32 MiB written through the log while Python holds well under 1 MiB more."""
    payload = os.urandom(64 << 10)
    rig.write(0, payload)  # warm up lazily created objects
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for i in range(512):
            assert rig.write((i * 128) % 1920, payload) == BlkStatus.OK
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rig.log.spilled == 513 * len(payload)
    assert peak - base < 1 << 20, f"{peak - base} bytes held while spilling 32 MiB"
    assert os.path.getsize(rig.log.directory / "data.bin") >= 513 * len(payload)


class GatedFlush(MemoryStorage):
    """A RAM disk whose flush waits for the test: a slow cache flush on a real device."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.entered = threading.Event()
        self.release = threading.Event()

    def flush(self) -> None:
        self.entered.set()
        assert self.release.wait(10)


def test_write_completing_during_a_flush_is_not_covered_by_it(tmp_path: Path) -> None:
    """Two queues: a flush started before a write completed does not make it durable."""
    gated = GatedFlush(1 << 20)
    q0 = LoggedRig(tmp_path / "log", gated)
    q1 = LoggedRig(tmp_path / "unused", device=q0.dev)
    try:
        assert q0.write(0, b"a" * 512) == BlkStatus.OK
        flusher = threading.Thread(target=q0.flush)
        flusher.start()
        assert gated.entered.wait(10)
        assert q1.write(1, b"b" * 512) == BlkStatus.OK  # completes while the flush runs
        gated.release.set()
        flusher.join(10)
        records = q0.log.recorded().records
        assert [(r.seq, r.kind) for r in records] == [(1, W), (2, W), (3, F)]
        assert records[2].flush_start == 1  # it started when only write 1 had completed
        boundary = crash_states(q0.log.recorded(), subsets=0)[0]
        assert (boundary.cut, boundary.applied, boundary.dropped) == (3, (1,), (2,))
    finally:
        q0.log.close()
        q0.close()
        q1.close()


def test_two_threads_get_dense_sequence_numbers(tmp_path: Path) -> None:
    q0 = LoggedRig(tmp_path / "log", storage_size=1 << 20)
    q1 = LoggedRig(tmp_path / "unused", device=q0.dev)

    def writer(rig: LoggedRig, first: int) -> None:
        for i in range(200):
            assert rig.write(first + i, bytes([first % 251 + i % 4]) * 512) == BlkStatus.OK

    threads = [threading.Thread(target=writer, args=(q, n)) for q, n in ((q0, 0), (q1, 1000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    got = q0.log.recorded()
    try:
        assert [r.seq for r in got.records] == list(range(1, 401))
        for start in (0, 1000):
            mine = [r for r in got.records if start <= r.sector < start + 200]
            assert [r.sector for r in mine] == list(range(start, start + 200))  # own order
            assert all(got.data(r) == bytes([start % 251 + i % 4]) * 512
                       for i, r in enumerate(mine))
    finally:
        q0.log.close()
        q0.close()
        q1.close()


def test_storage_of_another_size_is_refused(tmp_path: Path) -> None:
    with WriteLog(tmp_path / "log", 1 << 20) as wlog, pytest.raises(ValueError, match="1048576"):
        LoggedStorage(MemoryStorage(2 << 20), wlog)


def test_full_disk_fails_the_write_and_breaks_the_log(tmp_path: Path) -> None:
    """A file-size limit (RLIMIT_FSIZE) in a child: the spill cannot grow past 256 KiB."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(ENOSPC_CHILD), str(tmp_path / "log"),
                           str(256 << 10)], capture_output=True, text=True, timeout=60,
                          check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok_writes"] == 64  # 64 x 4 KiB fill the 256 KiB spill exactly
    assert out["failed_status"] == BlkStatus.IOERR
    assert out["medium_untouched"]  # the write the log could not hold never happened
    assert out["later"] == {"write": BlkStatus.IOERR, "flush": BlkStatus.IOERR,
                            "discard": BlkStatus.IOERR, "read": BlkStatus.OK}
    assert out["broken"].startswith("spilling 4096 bytes to ") and "File too large" in out["broken"]
    assert out["check"].startswith("write log ") and "crash states cannot be built" in out["check"]
    assert out["crash_states"] == out["check"]
    reloaded = RecordedLog.load(tmp_path / "log")
    assert reloaded.broken == out["broken"]
    assert len(reloaded.records) == 64  # every write the guest saw succeed, none lost
    assert all(reloaded.data(r) == bytes([r.sector // 8 % 255 + 1]) * 4096
               for r in reloaded.records)


def test_a_served_disk_is_logged_through_the_socket(tmp_path: Path) -> None:
    """The real server, a front-end on its socket: the log is the storage it was given."""
    wlog = WriteLog(tmp_path / "log", 1 << 20)
    sock = tempfile.mkdtemp(prefix="vwl", dir="/tmp") + "/vu.sock"  # short: sun_path limit
    server = VhostUserBlkServer(sock, LoggedStorage(MemoryStorage(1 << 20), wlog)).start()
    try:
        with MockMemory(4 << 20) as mem, MockFrontend(sock) as fe:
            features, _ = fe.realize()
            q = MockSplitQueue(mem, 64)
            fe.start(mem, [q], features)
            server.wait_running(5)
            heads = [q.blk_request(BlkType.OUT, 3, b"Q" * 4096, indirect=True).head,
                     q.blk_request(BlkType.FLUSH).head]
            q.publish(*heads)
            fe.kick()
            fe.wait_call()
            assert [used[0] for used in q.take_used()] == heads
        server.check()
    finally:
        server.close()  # closes the storage: the log's index reaches the disk
        os.rmdir(os.path.dirname(sock))
    got = RecordedLog.load(tmp_path / "log")
    assert got.records == (LogRecord(1, W, 3, 8), LogRecord(2, F, flush_start=1))
    assert got.data(got.records[0]) == b"Q" * 4096
    wlog.close()


def test_recorded_reads_only_what_was_written_out(tmp_path: Path) -> None:
    """recorded() in the test's thread while the backend's thread writes the next index
    record: the half-written record (seq and kind there, sectors not yet) is not read."""
    r = LoggedRig(tmp_path / "log")
    try:
        for i in range(3):
            assert r.write(i, bytes([i]) * 512) == BlkStatus.OK
        # What a reader sees of record 4 while its pwrite is under way.
        half = INDEX.pack(4, RecordKind.WRITE, 0, 7, 1, 1536)[:10].ljust(INDEX.size, b"\0")
        with open(tmp_path / "log" / "index.bin", "r+b") as f:
            f.seek(3 * INDEX.size)
            f.write(half)
        got = r.log.recorded()
        assert [(rec.seq, rec.sectors) for rec in got.records] == [(1, 1), (2, 1), (3, 1)]
    finally:
        r.log.close()
        r.close()


def test_recorded_takes_the_meta_under_the_lock(tmp_path: Path) -> None:
    """recorded() while the backend's thread rewrites meta.json in place (as ``_break``
    does, holding the log's lock): the file is torn JSON until that pwrite ends, and a
    read of it then failed with "cannot read meta.json"."""
    r = LoggedRig(tmp_path / "log")
    meta_path = tmp_path / "log" / "meta.json"
    stop, rewrites = threading.Event(), [0]

    def rewriter() -> None:
        """Under the lock, leave meta.json as a reader sees it mid-pwrite (the first half
        of a broken log's meta over the old one), then as it was."""
        broken = {**json.loads(meta_path.read_bytes()), "broken": "medium failed " * 64}
        half = json.dumps(broken).encode()[:len(json.dumps(broken)) // 2]
        with open(meta_path, "r+b", buffering=0) as f:
            while not stop.is_set():
                with r.log._lock:
                    os.pwrite(f.fileno(), half, 0)
                    stop.wait(0.002)
                    r.log._sync_meta()
                rewrites[0] += 1
                stop.wait(0.0005)

    try:
        for i in range(3):
            assert r.write(i, bytes([i]) * 512) == BlkStatus.OK
        thread = threading.Thread(target=rewriter, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        try:
            while rewrites[0] < 100 and time.monotonic() < deadline:  # reads race them all
                got = r.log.recorded()
                assert ([rec.seq for rec in got.records], got.broken) == ([1, 2, 3], None)
        finally:
            stop.set()
            thread.join(5)
        assert rewrites[0] >= 100, f"only {rewrites[0]} rewrites in 20 s"
    finally:
        r.log.close()
        r.close()
