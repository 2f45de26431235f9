"""Split ring through the mock driver: every validation rule, notify math, wrap-around."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vhost_rig import Rig

from pytest_virtio.vhost_user.protocol import BlkType, VringAddr
from pytest_virtio.vhost_user.virtqueue import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    USED_F_NO_NOTIFY,
    need_event,
)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(size=16)
    yield r
    r.close()


def _read(rig: Rig, sector: int = 0, n: int = 512, indirect: bool = False) -> object:
    return rig.q.blk_request(BlkType.IN, sector, n, indirect=indirect)


def test_direct_and_indirect_chains(rig: Rig) -> None:
    rig.storage.data[:1024] = b"a" * 512 + b"b" * 512
    r1 = rig.q.blk_request(BlkType.IN, 0, 512)
    r2 = rig.q.blk_request(BlkType.IN, 1, 512, indirect=True)
    rig.q.publish(r1.head, r2.head)
    assert rig.run() == 2
    assert rig.q.take_used() == [(r1.head, 513), (r2.head, 513)]
    assert rig.q.data(r1) == b"a" * 512 and rig.q.data(r2) == b"b" * 512
    assert rig.q.status(r1) == rig.q.status(r2) == 0
    assert rig.calls() == 1  # one interrupt per batch
    assert not rig.vq.broken


def test_nothing_available_is_a_noop(rig: Rig) -> None:
    assert rig.run() == 0
    assert rig.calls() == 0


def test_not_ready_queue_is_not_served(rig: Rig) -> None:
    rig.vq.enabled = False
    rig.q.publish(rig.q.blk_request(BlkType.IN, 0, 512).head)
    assert rig.run() == 0
    rig.vq.enabled = True
    assert rig.run() == 1


def test_no_interrupt_flag_suppresses_call(rig: Rig) -> None:
    rig.q.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    rig.q.publish(rig.q.blk_request(BlkType.IN, 0, 512).head)
    assert rig.run() == 1
    assert rig.calls() == 0
    assert rig.q.used_flags() & USED_F_NO_NOTIFY == 0  # kicks re-enabled after draining


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [(0, 1, 0, True), (1, 1, 0, False), (5, 7, 4, True), (7, 7, 4, False),
     (0xFFFF, 0, 0xFFFE, True), (0xFFFE, 1, 0xFFFD, True), (3, 3, 3, False)],
)
def test_need_event_math(event: int, new: int, old: int, expected: bool) -> None:
    assert need_event(event, new, old) is expected


def test_event_idx_notifies_only_when_used_event_crossed() -> None:
    r = Rig(size=16, event_idx=True)
    try:
        r.q.set_used_event(5)  # driver wants an interrupt once used idx passes 5
        for _ in range(3):
            r.q.publish(r.q.blk_request(BlkType.IN, 0, 512).head)
            assert r.run() == 1
            r.q.take_used(rearm=False)
        assert r.calls() == 0
        assert r.q.avail_event() == 3  # device publishes where it wants the next kick
        for _ in range(3):
            r.q.publish(r.q.blk_request(BlkType.IN, 0, 512).head)
        assert r.run() == 3
        assert r.calls() == 1
    finally:
        r.close()


def test_index_wraparound_past_65535() -> None:
    r = Rig(size=8)
    try:
        start = 0xFFFC
        r.q.set_avail_idx(start)
        r.q.set_used_idx(start)
        r.attach(base=start)  # the backend adopts used.idx at SET_VRING_ADDR
        assert r.vq.used_idx == start
        for _ in range(3):
            heads = [r.q.blk_request(BlkType.IN, 0, 512, indirect=True).head for _ in range(5)]
            r.q.publish(*heads)
            assert r.run() == 5
            assert [u[0] for u in r.q.take_used()] == heads
            r.q.reset_alloc()
        assert r.vq.last_avail == (start + 15) & 0xFFFF == r.q.used_idx()
        assert not r.vq.broken
    finally:
        r.close()


def _assert_broken(rig: Rig, match: str) -> None:
    assert rig.run() == 0
    assert rig.vq.broken
    assert match in rig.vq.broken_reason
    assert rig.errs() == 1
    assert rig.stats.broken[0] == rig.vq.broken_reason
    # a broken queue stays dead, no further processing
    rig.q.publish(rig.q.blk_request(BlkType.IN, 0, 512).head)
    assert rig.run() == 0


def test_out_of_range_address_breaks(rig: Rig) -> None:
    rig.q.write_desc(0, 0x7FFF_0000_0000, 512, DESC_F_WRITE)
    rig.q.publish(0)
    _assert_broken(rig, "not mapped")


def test_range_straddling_end_of_memory_breaks(rig: Rig) -> None:
    rig.q.write_desc(0, rig.mem.size - 8, 16, DESC_F_WRITE)
    rig.q.publish(0)
    _assert_broken(rig, "guest range")


def test_descriptor_loop_breaks(rig: Rig) -> None:
    hdr = rig.q.alloc(16)
    rig.q.write_desc(0, hdr, 16, DESC_F_NEXT, 1)
    rig.q.write_desc(1, hdr, 16, DESC_F_NEXT, 0)
    rig.q.publish(0)
    _assert_broken(rig, "loops")


def test_next_out_of_range_breaks(rig: Rig) -> None:
    rig.q.write_desc(0, rig.q.alloc(16), 16, DESC_F_NEXT, 16)
    rig.q.publish(0)
    _assert_broken(rig, "out of range")


def test_head_out_of_range_breaks(rig: Rig) -> None:
    rig.q.publish(16)
    _assert_broken(rig, "head 16 out of range")


def test_nested_indirect_breaks(rig: Rig) -> None:
    inner = rig.q.alloc(16)
    outer = rig.q.alloc(16)
    rig.q.write_desc(0, inner, 16, DESC_F_INDIRECT, table=outer)
    rig.q.write_desc(0, outer, 16, DESC_F_INDIRECT)
    rig.q.publish(0)
    _assert_broken(rig, "nested")


@pytest.mark.parametrize(("length", "flags", "match"), [
    (0, DESC_F_INDIRECT, "length 0"),
    (24, DESC_F_INDIRECT, "length 24"),
    (16, DESC_F_INDIRECT | DESC_F_NEXT, "with NEXT"),
    (16 * 17, DESC_F_INDIRECT, "17 entries"),
])
def test_bad_indirect_descriptor_breaks(rig: Rig, length: int, flags: int, match: str) -> None:
    rig.q.write_desc(0, rig.q.alloc(16 * 17), length, flags, 1)
    rig.q.publish(0)
    _assert_broken(rig, match)


def test_indirect_not_negotiated_breaks() -> None:
    r = Rig(size=16, indirect=False)
    try:
        r.q.publish(r.q.blk_request(BlkType.IN, 0, 512, indirect=True).head)
        _assert_broken(r, "not negotiated")
    finally:
        r.close()


def test_indirect_loop_breaks(rig: Rig) -> None:
    table = rig.q.alloc(32)
    rig.q.write_desc(0, rig.q.alloc(16), 16, DESC_F_NEXT, 1, table=table)
    rig.q.write_desc(1, rig.q.alloc(16), 16, DESC_F_NEXT, 0, table=table)
    rig.q.write_desc(0, table, 32, DESC_F_INDIRECT)
    rig.q.publish(0)
    _assert_broken(rig, "loops")


def test_oversize_direct_chain_breaks(rig: Rig) -> None:
    # 16 descriptors all chained, the last pointing back: longer than the queue
    for i in range(16):
        rig.q.write_desc(i, rig.q.alloc(16), 16, DESC_F_NEXT, (i + 1) % 16)
    rig.q.publish(0)
    _assert_broken(rig, "loops")


def test_avail_index_jump_breaks(rig: Rig) -> None:
    rig.q.set_avail_idx(17)
    _assert_broken(rig, "jumped by 17")


def test_writable_before_readable_breaks(rig: Rig) -> None:
    rig.q.write_desc(0, rig.q.alloc(16), 16, DESC_F_WRITE | DESC_F_NEXT, 1)
    rig.q.write_desc(1, rig.q.alloc(16), 16, 0)
    rig.q.publish(0)
    _assert_broken(rig, "readable descriptor after writable")


def test_head_twice_in_flight_breaks(rig: Rig) -> None:
    req = rig.q.blk_request(BlkType.IN, 0, 512)
    rig.q.publish(req.head, req.head)
    assert rig.run() == 0
    assert rig.vq.broken and "already in flight" in rig.vq.broken_reason
    # the first copy was completed and reported before the queue broke
    assert rig.q.used_idx() == 1
    assert rig.calls() == 1


def test_missing_status_byte_breaks(rig: Rig) -> None:
    hdr = rig.q.alloc(16)
    rig.q.write_desc(0, hdr, 16, 0)
    rig.q.publish(0)
    _assert_broken(rig, "status")


def test_misaligned_ring_breaks(rig: Rig) -> None:
    a = rig.q.vring_addr()
    rig.vq.set_addr(VringAddr(0, 0, a.desc + 8, a.used, a.avail, 0), rig.gm)
    assert rig.vq.broken and "misaligned" in rig.vq.broken_reason


def test_ring_outside_memory_breaks(rig: Rig) -> None:
    rig.vq.set_addr(VringAddr(0, 0, 0x1000, 0x2000, 0x3000, 0), rig.gm)
    assert rig.vq.broken


def test_descriptors_may_span_regions() -> None:
    r = Rig(size=16, layout=[(0, 1 << 20), (1 << 20, 3 << 20)])
    try:
        r.storage.data[:1024] = bytes(range(256)) * 4
        gpa = (1 << 20) - 512  # a 1 KiB buffer straddling the two regions
        hdr = r.q.alloc(16)
        r.mem.write(hdr, bytes(16))  # IN, sector 0
        st = r.q.alloc(1)
        head = r.q.add_chain([(hdr, 16, False), (gpa, 1024, True), (st, 1, True)])
        r.q.publish(head)
        assert r.run() == 1
        assert r.mem.read(gpa, 1024) == bytes(r.storage.data[:1024])
    finally:
        r.close()


def test_zero_length_descriptors_are_skipped(rig: Rig) -> None:
    hdr = rig.q.alloc(16)
    rig.mem.write(hdr, bytes(16))
    st = rig.q.alloc(1)
    head = rig.q.add_chain([(hdr, 16, False), (0, 0, False), (0, 0, True), (st, 1, True)])
    rig.q.publish(head)
    assert rig.run() == 1
    assert rig.q.take_used() == [(head, 1)]


def test_set_num_validation(rig: Rig) -> None:
    from pytest_virtio.errors import ProtocolError

    for bad in (0, 3, 2048, 65536):
        with pytest.raises(ProtocolError):
            rig.vq.set_num(bad)
