"""Statistics, trace and fault injection."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from vhost_rig import Rig

from pytest_virtio.errors import BackendError
from pytest_virtio.vhost_user.faults import FaultInjector
from pytest_virtio.vhost_user.protocol import BlkStatus, BlkType


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(size=64)
    yield r
    r.close()


def _status(rig: Rig, rtype: int, sector: int, data: bytes | int = 512) -> int:
    req = rig.q.blk_request(rtype, sector, data, indirect=True)
    rig.q.publish(req.head)
    rig.run()
    rig.q.take_used()
    return rig.q.status(req)


def test_stats_count_by_type_and_queue(rig: Rig) -> None:
    for _ in range(3):
        _status(rig, BlkType.IN, 0, 4096)
    _status(rig, BlkType.OUT, 0, b"x" * 1024)
    _status(rig, BlkType.IN, 10**9, 512)
    d = rig.stats.to_dict()
    assert d["requests"] == {"IN": 4, "OUT": 1}
    assert d["bytes"] == {"IN": 3 * 4096 + 512, "OUT": 1024}
    assert d["errors"] == 1
    assert d["notifications"] == 5
    assert d["queues"][0]["status"] == {"OK": 4, "IOERR": 1}
    assert rig.stats.total_requests(BlkType.IN) == 4
    snap = rig.stats.snapshot()
    _status(rig, BlkType.IN, 0)
    assert snap.total_requests() == 5 and rig.stats.total_requests() == 6


def test_queue_depth_high_water(rig: Rig) -> None:
    heads = [rig.q.blk_request(BlkType.IN, 0, 512, indirect=True).head for _ in range(7)]
    rig.q.publish(*heads)
    assert rig.run() == 7
    assert rig.stats.to_dict()["queue_depth_max"] == 7
    rig.stats.reset()
    assert rig.stats.to_dict()["requests"] == {}


def test_trace_bounded(rig: Rig) -> None:
    assert not rig.trace.enabled
    _status(rig, BlkType.IN, 1)
    assert rig.trace.entries == []
    rig.trace.enable(limit=2)
    for s in (1, 2, 3):
        _status(rig, BlkType.IN, s)
    entries = rig.trace.entries
    assert entries == [(0, 0, 2, 512, 0), (0, 0, 3, 512, 0)]
    assert entries[0].sector == 2
    rig.trace.disable()
    rig.trace.clear()
    assert rig.trace.entries == []
    with pytest.raises(ValueError):
        rig.trace.enable(0)


def test_fail_by_sector_range(rig: Rig) -> None:
    rule = rig.faults.fail_sectors(100, 108)
    assert _status(rig, BlkType.IN, 99) == BlkStatus.OK  # 99..99
    assert _status(rig, BlkType.IN, 98, 2048) == BlkStatus.IOERR  # 98..101 overlaps
    assert _status(rig, BlkType.IN, 107) == BlkStatus.IOERR
    assert _status(rig, BlkType.IN, 108) == BlkStatus.OK
    assert rule.fired == 2
    rig.faults.clear()
    assert _status(rig, BlkType.IN, 100) == BlkStatus.OK


def test_fail_by_type_with_count(rig: Rig) -> None:
    rig.faults.fail_type(BlkType.OUT, count=1)
    assert _status(rig, BlkType.IN, 0) == BlkStatus.OK
    assert _status(rig, BlkType.OUT, 0, b"x" * 512) == BlkStatus.IOERR
    assert _status(rig, BlkType.OUT, 0, b"x" * 512) == BlkStatus.OK
    rig.faults.fail_type([BlkType.FLUSH])
    assert _status(rig, BlkType.FLUSH, 0, 0) == BlkStatus.IOERR


def test_fail_every_nth(rig: Rig) -> None:
    rig.faults.fail_every(3, types=BlkType.IN)
    got = [_status(rig, BlkType.IN, 0) for _ in range(6)]
    assert got == [0, 0, 1, 0, 0, 1]
    with pytest.raises(ValueError):
        rig.faults.fail_every(0)


def test_latency(rig: Rig) -> None:
    rig.faults.add_latency(0.05, types=BlkType.IN)
    t0 = time.monotonic()
    _status(rig, BlkType.OUT, 0, b"x" * 512)
    assert time.monotonic() - t0 < 0.05
    t0 = time.monotonic()
    _status(rig, BlkType.IN, 0)
    assert time.monotonic() - t0 >= 0.05


def test_flip_readonly_at_runtime(rig: Rig) -> None:
    rig.faults.set_readonly(True)
    assert _status(rig, BlkType.OUT, 0, b"x" * 512) == BlkStatus.IOERR
    rig.faults.set_readonly(None)
    assert _status(rig, BlkType.OUT, 0, b"x" * 512) == BlkStatus.OK


def test_break_queue_needs_a_server() -> None:
    with pytest.raises(BackendError, match="not attached"):
        FaultInjector().break_queue(0)


def test_bad_rules_rejected() -> None:
    f = FaultInjector()
    with pytest.raises(ValueError):
        f.fail_sectors(5, 5)
    with pytest.raises(ValueError):
        f.add_latency(-1)
    assert not f.active
    f.fail_sectors(0, 1)
    assert f.active
