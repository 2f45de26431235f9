"""Guest memory map: the regions SET_MEM_TABLE hands us, mmapped and bounds-checked.

vhost-user.rst ("Memory region description", SET_MEM_TABLE): each region names
a guest-physical address (GPA), a size, the front-end's virtual address (UVA)
and an offset into the fd that backs it.  Descriptor addresses in the rings are
GPAs (virtio 1.2 §2.7.5); the ring addresses in SET_VRING_ADDR are UVAs.  All of
them come from untrusted parties, so every translation checks the full
``[addr, addr+len)`` range, without integer overflow, and a range may span
regions only where they are contiguous in guest-physical space.

The fds must be sealed against shrinking (``F_SEAL_SHRINK``, memfd_create(2)):
a front-end that truncates a mapped file under us makes the next access raise
SIGBUS, which would kill the whole pytest process.  QEMU's
``memory-backend-memfd`` seals by default (``seal=on``: SHRINK, GROW, SEAL),
so real guests pass; anything else is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_virtio.errors import ProtocolError
from pytest_virtio.vhost_user.protocol import MAX_REGIONS, MemRegion

__all__ = ["GuestMemory", "GuestMemoryError", "MappedRegion"]

_U64_LIMIT = 1 << 64


class GuestMemoryError(ProtocolError):
    """An address range is not (fully) inside guest memory."""


@dataclass(slots=True)
class MappedRegion:
    """One mapped region; ``view`` covers exactly ``[gpa, gpa+size)``."""

    gpa: int
    size: int
    uva: int
    end: int
    uva_end: int
    mm: mmap.mmap
    base: memoryview
    view: memoryview


def _check_sealed(region: MemRegion, fd: int) -> None:
    """Refuse an fd the front-end could still shrink under our mapping (SIGBUS)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # not a memfd (a plain or hugetlbfs file): it cannot be sealed
    if not seals & fcntl.F_SEAL_SHRINK:
        raise GuestMemoryError(
            f"region gpa={region.gpa:#x}: the fd is not sealed against shrinking "
            "(F_SEAL_SHRINK); a front-end truncating it would crash this process with "
            "SIGBUS. Back guest RAM with memory-backend-memfd (QEMU seals it: seal=on)"
        )


def _map_region(region: MemRegion, fd: int) -> MappedRegion:
    """mmap one region; the offset is aligned down because mmap(2) demands it."""
    _check_sealed(region, fd)  # before the size check: sealed, the size cannot drop later
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size < region.mmap_offset + region.size:
        # Touching a page past the end of a file raises SIGBUS, which would kill pytest.
        raise GuestMemoryError(
            f"region gpa={region.gpa:#x} needs {region.mmap_offset + region.size} bytes "
            f"of its fd but the file has {st.st_size}"
        )
    aligned = region.mmap_offset - region.mmap_offset % mmap.ALLOCATIONGRANULARITY
    delta = region.mmap_offset - aligned
    try:
        mm = mmap.mmap(fd, region.size + delta, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
    except (OSError, ValueError, OverflowError) as exc:
        raise GuestMemoryError(f"cannot mmap region gpa={region.gpa:#x}: {exc}") from exc
    base = memoryview(mm)
    return MappedRegion(
        gpa=region.gpa,
        size=region.size,
        uva=region.uva,
        end=region.gpa + region.size,
        uva_end=region.uva + region.size,
        mm=mm,
        base=base,
        view=base[delta : delta + region.size],
    )


def _check_layout(regions: Sequence[MemRegion]) -> None:
    if not 1 <= len(regions) <= MAX_REGIONS:
        raise GuestMemoryError(f"{len(regions)} memory regions (allowed 1..{MAX_REGIONS})")
    for r in regions:
        if r.size <= 0:
            raise GuestMemoryError(f"memory region gpa={r.gpa:#x} has size {r.size}")
        if max(r.gpa, r.uva, r.mmap_offset) + r.size > _U64_LIMIT or min(r.gpa, r.uva) < 0:
            raise GuestMemoryError(f"memory region gpa={r.gpa:#x} overflows 64 bits")
    for key in ("gpa", "uva"):
        ordered = sorted(regions, key=lambda r: getattr(r, key))
        for a, b in itertools.pairwise(ordered):
            if getattr(a, key) + a.size > getattr(b, key):
                raise GuestMemoryError(
                    f"memory regions overlap in {key} space at {getattr(b, key):#x}"
                )


class GuestMemory:
    """The guest's RAM as the front-end shared it.

    Translation results are memoryviews straight into the shared mapping, so
    ``os.preadv`` can fill guest buffers without a copy.  ``close()`` releases
    every view it created and unmaps; callers must drop their own slices first
    (the ring code does, by never keeping them past one request).
    """

    def __init__(self, regions: Sequence[MemRegion], fds: Sequence[int]) -> None:
        if len(regions) != len(fds):
            raise GuestMemoryError(f"{len(regions)} regions but {len(fds)} fds")
        _check_layout(regions)
        self._regions: list[MappedRegion] = []
        try:
            for region, fd in zip(regions, fds, strict=True):
                self._regions.append(_map_region(region, fd))
        except BaseException:
            self.close()
            raise
        self._regions.sort(key=lambda r: r.gpa)
        # Flat tuple for the hot path: (gpa, end, view) per region.
        self._fast = tuple((r.gpa, r.end, r.view) for r in self._regions)

    @property
    def regions(self) -> list[MappedRegion]:
        return list(self._regions)

    @property
    def closed(self) -> bool:
        return not self._regions

    def view(self, gpa: int, length: int) -> memoryview:
        """A single contiguous view of ``[gpa, gpa+length)``; must lie in one region."""
        for start, end, view in self._fast:
            if start <= gpa < end:
                if length < 0 or gpa + length > end:
                    break
                off = gpa - start
                return view[off : off + length]
        raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) not inside one region")

    def table(self, gpa: int, length: int) -> memoryview:
        """An indirect descriptor table (§2.7.5.3): one view, or a copy across regions.

        The spec lets a table cross any guest-physical boundary; where it spans two
        GPA-adjacent regions it is copied once (callers bound ``length``).
        """
        views = self.views(gpa, length)
        if len(views) == 1:
            return views[0]
        try:
            return memoryview(b"".join(views))
        finally:
            for v in views:
                v.release()

    def views(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering ``[gpa, gpa+length)``, which may span GPA-adjacent regions."""
        if length < 0 or gpa < 0 or gpa + length > _U64_LIMIT:
            raise GuestMemoryError(f"bad guest range [{gpa:#x}, +{length:#x})")
        for start, end, view in self._fast:
            if start <= gpa < end:
                if gpa + length <= end:
                    off = gpa - start
                    return [view[off : off + length]]
                return self._span(gpa, length)
        if length == 0:
            return []
        raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) is not mapped")

    def _span(self, gpa: int, length: int) -> list[memoryview]:
        out: list[memoryview] = []
        cursor, remaining = gpa, length
        for start, end, view in self._fast:
            if remaining == 0:
                break
            if start <= cursor < end:
                take = min(end - cursor, remaining)
                off = cursor - start
                out.append(view[off : off + take])
                cursor += take
                remaining -= take
        if remaining:
            for v in out:
                v.release()
            raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) crosses a hole")
        return out

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Translate a front-end virtual range; it may span regions adjacent in both spaces."""
        if length <= 0 or uva < 0 or uva + length > _U64_LIMIT:
            raise GuestMemoryError(f"bad front-end range [{uva:#x}, +{length:#x})")
        first = next((r for r in self._regions if r.uva <= uva < r.uva_end), None)
        if first is None:
            raise GuestMemoryError(f"front-end address {uva:#x} is not mapped")
        gpa = first.gpa + (uva - first.uva)
        cur = first
        while uva + length > cur.uva_end:
            nxt = next(
                (r for r in self._regions if r.uva == cur.uva_end and r.gpa == cur.end), None
            )
            if nxt is None:
                raise GuestMemoryError(
                    f"front-end range [{uva:#x}, +{length:#x}) leaves mapped memory"
                )
            cur = nxt
        return gpa

    def close(self) -> None:
        """Release every view and unmap; tolerates slices still held elsewhere."""
        regions, self._regions, self._fast = self._regions, [], ()
        for r in regions:
            r.view.release()
            r.base.release()
            with contextlib.suppress(BufferError):
                # A slice still alive keeps the mapping until it is collected.
                r.mm.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
