"""Real guests on disks served by the in-process vhost-user-blk backend.

The unit tests play QEMU with a mock driver; these prove the backend against
Linux's virtio_blk through QEMU 7.2's vhost-user front-end: data integrity
(fio verify), what the stats and the trace say the guest did, faults as the
guest sees them, FLUSH reaching the file, a guest reset, multiqueue, a
backend restart under a running guest, and a backend exception failing the
test that caused it.

Boots are expensive under TCG, so the single-guest checks share one
module-scoped guest (smp=2, so the disk has two queues); each test leaves the
fault injector and trace as it found them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_virtio.errors import BackendError, ConfigError
from pytest_virtio.guests.boot import start_backends
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.launch import external_sockets
from pytest_virtio.spec import Disk, MachineSpec
from pytest_virtio.vhost_user import BlkStatus, BlkType, VhostUserBlkServer
from pytest_virtio.workloads.fio import FioResult, check_fio_run

SECTOR = 512


@pytest.fixture(scope="module")
def shared(boot_shared: Callable[[MachineSpec, str], Guest]) -> Guest:
    """One smp=2 guest with a 64M vhost-user-blk disk for the single-guest checks."""
    spec = MachineSpec(smp=2, disks=(Disk(name="disk0", bus="vhost-user-blk", size="64M"),))
    return boot_shared(spec, "vhost")


@pytest.fixture
def vu(shared: Guest) -> Iterator[VhostUserBlkServer]:
    """The shared guest's backend, with faults and trace reset around each test."""
    server: VhostUserBlkServer = shared.backends["disk0"]
    server.faults.clear()
    server.trace.disable()
    server.trace.clear()
    yield server
    server.faults.clear()
    server.trace.disable()
    server.check()


def _dev(g: Guest) -> str:
    return g.disk_path("disk0")


def _stats(server: VhostUserBlkServer) -> dict[str, Any]:
    return server.stats.to_dict()


def _delta(before: dict[str, Any], after: dict[str, Any], key: str, name: str) -> int:
    return int(after[key].get(name, 0)) - int(before[key].get(name, 0))


def test_virtio_blk_drives_the_vhost_user_disk(shared: Guest, vu: VhostUserBlkServer) -> None:
    """The guest's virtio_blk binds a device whose serial came from our GET_ID."""
    assert "virtio_blk" in shared.disk_drivers("disk0")
    dev = _dev(shared)
    size = shared.check(f"blockdev --getsize64 {dev}").stdout.strip()
    assert int(size) == 64 << 20 == vu.storage.size
    assert vu.stats.total_requests(BlkType.GET_ID) >= 1


def test_fio_verify_and_stats(shared: Guest, vu: VhostUserBlkServer) -> None:
    """Random 4k writes at iodepth 16 verified with crc32c; the stats account for them."""
    before = _stats(vu)
    # Size-bound, not time-bound: a runtime cap cut the verify pass short on a
    # loaded host (2012 of 2048 blocks read back at ~20 IOPS), which is not a
    # backend fault.  4M = 1024 writes, then 1024 verify reads.
    res = shared.fio(_dev(shared), rw="randwrite", bs="4k", iodepth=16,
                     size="4M", verify="crc32c")
    assert res.errors == 0 and res.verify_ok is not False, res.to_dict()
    assert res.write.total_ios == 1024
    assert res.read.total_ios == res.write.total_ios, "verify did not read every block back"
    after = _stats(vu)
    writes = _delta(before, after, "requests", "OUT")
    reads = _delta(before, after, "requests", "IN")
    # every fio write reached us (the page cache is bypassed: direct=1), and the
    # verify pass read them back
    assert writes >= res.write.total_ios
    assert reads >= res.read.total_ios
    assert _delta(before, after, "bytes", "OUT") >= res.write.io_bytes
    assert after["errors"] == before["errors"]
    assert after["queue_depth_max"] > 1, "iodepth 16 never put two requests in flight"
    assert after["notifications"] > before["notifications"]
    queued = sum(q["requests"].get("OUT", 0) for q in after["queues"])
    assert queued == after["requests"]["OUT"]


def test_request_trace_names_sectors(shared: Guest, vu: VhostUserBlkServer) -> None:
    """A guest write at a known offset appears in the trace with that sector and length."""
    vu.trace.enable()
    dev = _dev(shared)
    shared.check(f"dd if=/dev/urandom of={dev} bs=4096 count=2 seek=100 oflag=direct")
    shared.check(f"dd if={dev} of=/dev/null bs=4096 count=1 skip=100 iflag=direct")
    entries = vu.trace.entries
    writes = [(e.sector, e.length, e.status) for e in entries if e.type == BlkType.OUT]
    reads = [(e.sector, e.length) for e in entries if e.type == BlkType.IN]
    assert writes == [(800, 4096, BlkStatus.OK), (808, 4096, BlkStatus.OK)], entries
    assert reads == [(800, 4096)], entries
    assert {e.queue for e in entries} <= {0, 1}


def test_failed_sectors_are_eio_in_the_guest(shared: Guest, vu: VhostUserBlkServer) -> None:
    """IOERR for a sector range is EIO for the guest's dd, and the stats count it."""
    dev = _dev(shared)
    errors = _stats(vu)["errors"]
    rule = vu.faults.fail_sectors(2048, 2056)  # the 4k block at 1 MiB
    res = shared.run(f"dd if={dev} of=/dev/null bs=4096 count=1 skip=256 iflag=direct")
    assert res.rc != 0
    assert "Input/output error" in res.stdout + res.stderr, res
    assert rule.fired >= 1
    assert _stats(vu)["errors"] > errors
    # outside the range the disk still works
    shared.check(f"dd if={dev} of=/dev/null bs=4096 count=1 skip=512 iflag=direct")


def test_latency_is_seen_by_the_guest(shared: Guest, vu: VhostUserBlkServer) -> None:
    """Added latency on reads shows up in the guest's own clock."""
    dev = _dev(shared)
    vu.faults.add_latency(0.2, types=BlkType.IN)
    start = time.monotonic()
    shared.check(f"dd if={dev} of=/dev/null bs=4096 count=5 iflag=direct")
    assert time.monotonic() - start >= 1.0


def test_readonly_medium_fails_writes(shared: Guest, vu: VhostUserBlkServer) -> None:
    """Flipping the medium read-only makes the guest's writes fail, reads still work."""
    dev = _dev(shared)
    vu.faults.set_readonly(True)
    res = shared.run(f"dd if=/dev/zero of={dev} bs=4096 count=1 seek=10 oflag=direct")
    assert res.rc != 0 and "Input/output error" in res.stdout + res.stderr, res
    shared.check(f"dd if={dev} of=/dev/null bs=4096 count=1 iflag=direct")
    vu.faults.set_readonly(None)
    shared.check(f"dd if=/dev/zero of={dev} bs=4096 count=1 seek=10 oflag=direct")


def test_flush_reaches_stable_storage(shared: Guest, vu: VhostUserBlkServer) -> None:
    """The guest sees a write-back cache, so conv=fsync sends FLUSH → fdatasync."""
    dev = _dev(shared)
    cache = shared.check(f"cat /sys/block/{dev.removeprefix('/dev/')}/queue/write_cache")
    assert cache.stdout.strip() == "write back"
    flushes = vu.stats.total_requests(BlkType.FLUSH)
    syncs = vu.storage.fdatasyncs  # type: ignore[attr-defined]
    shared.check(f"dd if=/dev/urandom of={dev} bs=4096 count=4 conv=fsync")
    assert vu.stats.total_requests(BlkType.FLUSH) > flushes
    assert vu.storage.fdatasyncs > syncs  # type: ignore[attr-defined]


def test_two_queues_both_carry_requests(shared: Guest, vu: VhostUserBlkServer) -> None:
    """smp=2 gives the disk two queues; fio numjobs=2 (one per CPU) uses both."""
    assert vu.num_queues == 2
    dev = _dev(shared)
    name = dev.removeprefix("/dev/")
    mq = shared.check(f"ls /sys/block/{name}/mq").stdout.split()
    assert len(mq) == 2, mq
    before = vu.stats.snapshot()
    res = shared.fio(dev, rw="randread", bs="4k", iodepth=8, runtime="2s", time_based=True,
                     numjobs=2, extra={"cpus_allowed_policy": "split", "cpus_allowed": "0-1"})
    assert res.errors == 0
    for q in range(2):
        served = sum(vu.stats.requests[q]) - sum(before.requests[q])
        assert served > 50, f"queue {q} served only {served} requests"
        assert vu.stats.kicks[q] > before.kicks[q]


def test_data_survives_a_guest_reset(shared: Guest, vu: VhostUserBlkServer) -> None:
    """Data written before a reboot reads back after it, through a re-initialised device.

    ``guest.reset()`` (QMP ``system_reset``, allowed for that one boot by
    ``set-action reboot=reset``) reboots it: the same QEMU and backend connection, the
    guest kernel boots again and virtio_blk renegotiates the device (the
    front-end stops and restarts our rings: GET_VRING_BASE, then SET_VRING_*).
    Runs last in the module because the guest's page cache and shell restart.
    """
    dev = _dev(shared)
    token = f"persist-{time.time_ns()}"
    shared.check(f"printf '%s' {token} | dd of={dev} bs=4096 seek=300 conv=sync,fsync "
                 "oflag=direct")
    connections = vu.connections
    stops = vu.messages_seen["GET_VRING_BASE"]
    shared.reset()
    out = shared.check(f"dd if={_dev(shared)} bs=4096 skip=300 count=1 iflag=direct "
                       f"2>/dev/null | head -c {len(token)}").stdout
    assert out == token
    assert vu.connections == connections  # the same front-end connection throughout
    assert vu.messages_seen["GET_VRING_BASE"] > stops  # the rings were stopped and restarted


def _start_fio_in_background(g: Guest, dev: str) -> None:
    """fio with verify in the background, so the test can act while I/O is in flight."""
    job = (f"fio --name=j --filename={dev} --rw=randwrite --bs=4k --iodepth=16 "
           "--ioengine=libaio --direct=1 --size=8M --verify=crc32c --output-format=json")
    g.check("rm -f /tmp/fio.rc /tmp/fio.json")
    g.check(f"( {job} >/tmp/fio.json 2>&1; echo $? >/tmp/fio.rc ) >/dev/null 2>&1 &")


def _wait_fio(g: Guest, timeout: float) -> FioResult:
    deadline = time.monotonic() + timeout
    while True:
        rc = g.run("cat /tmp/fio.rc 2>/dev/null").stdout.strip()
        if rc:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"background fio did not finish in {timeout}s")
        time.sleep(1.0)
    out = g.check("cat /tmp/fio.json").stdout
    return check_fio_run(int(rc), out, "")


def test_backend_restart_under_a_running_guest(make_guest: Any) -> None:
    """Stop the backend mid-fio and start it again: QEMU reconnects, I/O resumes, verify holds.

    ``reconnect=1`` makes QEMU's chardev redial the socket every second; on the
    hang-up QEMU 7.2 cannot GET_VRING_BASE, so it restores each ring's avail
    index from the used index: the requests we had not completed are handed to
    the new connection again. Observed on the new connection: the realize
    handshake (GET_FEATURES .. SET_VRING_ERR), then SET_FEATURES,
    SET_INFLIGHT_FD (the old area, no GET_INFLIGHT_FD) and the ring start
    sequence ending in SET_VRING_ENABLE; fio never sees an error.
    """
    g: Guest = make_guest(disks=[{"name": "disk0", "bus": "vhost-user-blk", "size": "32M",
                                  "reconnect": 1}])
    server: VhostUserBlkServer = g.backends["disk0"]
    dev = g.disk_path("disk0")
    _start_fio_in_background(g, dev)
    deadline = time.monotonic() + 30
    while server.stats.total_requests(BlkType.OUT) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop()
    assert not server.connected
    served = server.stats.total_requests()
    time.sleep(1.5)  # the guest keeps queueing; nothing serves it
    assert server.stats.total_requests() == served
    server.start()
    server.wait_running(timeout=30)
    res = _wait_fio(g, 120 * g.timeout_scale)
    assert res.errors == 0 and res.verify_ok is not False, res.to_dict()
    # every write completed once and every block read back intact: nothing was lost
    assert res.write.total_ios == res.read.total_ios == 2048, res.to_dict()
    assert server.messages_seen["SET_INFLIGHT_FD"] >= 2  # QEMU handed the area back
    assert server.connections >= 2
    assert server.stats.total_requests() > served
    server.check()


def test_backend_exception_fails_the_test(make_guest: Any) -> None:
    """A bug in the backend thread surfaces as BackendError in the test, not a hang.

    The guest's read never completes (the backend dropped the connection): the
    command waiting on it fails as soon as the backend has failed, not at its
    timeout, and so does the next one; at teardown make_guest would raise it
    too, which is why the test clears it once it has seen it.
    """
    g: Guest = make_guest(disks=[{"name": "disk0", "size": "16M"}])
    server: VhostUserBlkServer = g.backends["disk0"]
    dev = g.disk_path("disk0")

    def boom(offset: int, bufs: object) -> int:
        raise RuntimeError("injected backend bug")

    server.storage.readv = boom  # type: ignore[method-assign]
    start = time.monotonic()
    with pytest.raises(BackendError, match="injected backend bug"):
        g.run(f"dd if={dev} of=/dev/null bs=4096 count=1 skip=7 iflag=direct", timeout=600)
    assert time.monotonic() - start < 120, "the command ran into its timeout"
    with pytest.raises(BackendError, match="injected backend bug"):
        g.run("true")
    assert len(server.clear_errors()) >= 1


def test_artifacts_keep_dmesg_after_a_backend_failure(make_guest: Any, tmp_path: Path) -> None:
    """The failed backend makes every guest.run raise; the failure's artifacts must still
    carry the guest's dmesg (its view of the dead disk), read over the console."""
    from pytest_virtio.plugin.fixtures import _keep_artifacts

    g: Guest = make_guest(disks=[{"name": "disk0", "size": "16M"}])
    server: VhostUserBlkServer = g.backends["disk0"]

    def boom(offset: int, bufs: object) -> int:
        raise RuntimeError("injected backend bug")

    server.storage.readv = boom  # type: ignore[method-assign]
    # The read runs in the background; whether this run or the next sees the failure
    # depends on which is first (the run's watch polls the backend while it waits).
    with contextlib.suppress(BackendError):
        g.run(f"(dd if={g.disk_path('disk0')} of=/dev/null bs=4096 count=1 iflag=direct &)")
    deadline = time.monotonic() + 60
    while not server.errors and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(BackendError, match="injected backend bug"):
        g.run("true")
    _keep_artifacts(g, tmp_path, tmp_path / "artifacts")
    dmesg = (tmp_path / "artifacts" / "dmesg.txt").read_text()
    assert "virtio" in dmesg.lower() and len(dmesg.splitlines()) > 20
    assert list((tmp_path / "artifacts").glob("vhost-state-disk0.json"))
    assert len(server.clear_errors()) >= 1


def test_external_socket_disk_gets_no_in_process_backend(tmp_path: Path) -> None:
    """``Disk(external_socket=)`` (the benchmark's qemu-storage-daemon disk): QEMU dials
    that socket and the session starts no backend of its own. No guest needed."""
    ext = Disk(name="ext", bus="vhost-user-blk", image="/x.img", external_socket="/s.sock")
    spec = MachineSpec(disks=(ext, Disk(name="own", bus="vhost-user-blk")))
    assert external_sockets(spec) == {"ext": "/s.sock"}
    img = tmp_path / "own.img"
    img.write_bytes(bytes(1 << 20))
    servers = start_backends(spec, tmp_path, {"ext": "/x.img", "own": str(img)})
    try:
        assert set(servers) == {"own"}
    finally:
        for server in servers.values():
            server.stop()
    with pytest.raises(ConfigError, match="external_socket"):
        Disk(bus="virtio-blk", external_socket="/s.sock")
