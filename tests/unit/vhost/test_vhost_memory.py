"""Guest memory map: mapping, translation bounds, spanning, overlap, close."""

from __future__ import annotations

import os

import pytest

from pytest_virtio.vhost_user.memory import GuestMemory, GuestMemoryError
from pytest_virtio.vhost_user.protocol import MemRegion
from pytest_virtio.vhost_user.testing import UVA_BASE, MockMemory, sealed_memfd

MiB = 1 << 20


@pytest.fixture
def split() -> MockMemory:
    # Like pc: a low region and a GPA-adjacent second one sharing the memfd at an offset.
    m = MockMemory(layout=[(0, MiB), (MiB, 2 * MiB), (8 * MiB, MiB)])
    yield m
    m.close()


def test_view_reads_what_driver_wrote(split: MockMemory) -> None:
    split.write(0x1234, b"hello")
    split.write(8 * MiB + 5, b"far")
    with split.guest_memory() as gm:
        assert bytes(gm.view(0x1234, 5)) == b"hello"
        assert bytes(gm.view(8 * MiB + 5, 3)) == b"far"
        gm.view(MiB + 10, 2)[:] = b"ok"
    assert split.read(MiB + 10, 2) == b"ok"


def test_unaligned_mmap_offset_is_handled() -> None:
    fd = sealed_memfd(3 * 4096)
    try:
        os.pwrite(fd, b"XYZ", 4096 + 100)
        with GuestMemory([MemRegion(0x5000, 4096, 0x1000, 4096 + 100)], [fd]) as gm:
            assert bytes(gm.view(0x5000, 3)) == b"XYZ"
    finally:
        os.close(fd)


def test_bounds(split: MockMemory) -> None:
    with split.guest_memory() as gm:
        with pytest.raises(GuestMemoryError):
            gm.view(MiB - 2, 4)  # spans two regions: not one view
        with pytest.raises(GuestMemoryError):
            gm.views(3 * MiB - 2, 4)  # runs into the hole
        with pytest.raises(GuestMemoryError):
            gm.views(5 * MiB, 1)  # in the hole
        with pytest.raises(GuestMemoryError):
            gm.views(9 * MiB, 1)  # past the end
        with pytest.raises(GuestMemoryError):
            gm.views(2**64 - 1, 2)  # would overflow
        with pytest.raises(GuestMemoryError):
            gm.view(0, -1)
        assert gm.views(5 * MiB, 0) == []


def test_views_span_adjacent_regions(split: MockMemory) -> None:
    split.write(MiB - 3, b"abc")
    split.write(MiB, b"def")
    with split.guest_memory() as gm:
        vs = gm.views(MiB - 3, 6)
        assert [len(v) for v in vs] == [3, 3]
        assert b"".join(bytes(v) for v in vs) == b"abcdef"
        del vs


def test_uva_to_gpa(split: MockMemory) -> None:
    with split.guest_memory() as gm:
        assert gm.uva_to_gpa(UVA_BASE + 0x10, 16) == 0x10
        # regions 0 and 1 are adjacent in both UVA and GPA: may span
        assert gm.uva_to_gpa(UVA_BASE + MiB - 8, 16) == MiB - 8
        # region 2 follows region 1 in UVA but not in GPA: may not span
        with pytest.raises(GuestMemoryError):
            gm.uva_to_gpa(UVA_BASE + 3 * MiB - 8, 16)
        with pytest.raises(GuestMemoryError):
            gm.uva_to_gpa(0x1000, 1)
        with pytest.raises(GuestMemoryError):
            gm.uva_to_gpa(UVA_BASE, 0)


def test_overlap_and_count_rejected() -> None:
    fd = sealed_memfd(4 * MiB)
    try:
        with pytest.raises(GuestMemoryError, match="overlap"):
            GuestMemory([MemRegion(0, 2 * MiB, 0, 0), MemRegion(MiB, MiB, 4 * MiB, 0)], [fd, fd])
        with pytest.raises(GuestMemoryError, match="overlap"):
            GuestMemory([MemRegion(0, MiB, 0, 0), MemRegion(MiB, MiB, MiB // 2, 0)], [fd, fd])
        with pytest.raises(GuestMemoryError):
            GuestMemory([], [])
        with pytest.raises(GuestMemoryError):
            GuestMemory([MemRegion(i * MiB, 4096, i * MiB, 0) for i in range(9)], [fd] * 9)
        with pytest.raises(GuestMemoryError, match="regions but"):
            GuestMemory([MemRegion(0, MiB, 0, 0)], [fd, fd])
    finally:
        os.close(fd)


def test_region_beyond_file_end_is_refused() -> None:
    # Mapping past EOF would SIGBUS on first touch and kill pytest.
    fd = sealed_memfd(MiB)
    try:
        with pytest.raises(GuestMemoryError, match="needs"):
            GuestMemory([MemRegion(0, 2 * MiB, 0, 0)], [fd])
        with pytest.raises(GuestMemoryError, match="needs"):
            GuestMemory([MemRegion(0, MiB, 0, 4096)], [fd])
    finally:
        os.close(fd)


def test_close_releases_and_tolerates_live_slices(split: MockMemory) -> None:
    gm = split.guest_memory()
    v = gm.view(0, 16)
    gm.close()  # a live slice must not make close() raise
    assert gm.closed
    with pytest.raises(GuestMemoryError):
        gm.view(0, 1)
    v.release()
    gm.close()  # idempotent
