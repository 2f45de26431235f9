"""Device side of a split virtqueue (virtio 1.2 §2.7).

The rings live in guest memory that the guest may scribble on at any moment,
so every index, length and address is validated before use (VHOST_USER.md
"Validate everything"): a violation marks the queue *broken*, signals the ERR
eventfd (vhost-user.rst SET_VRING_ERR) and stops the queue; it never raises
into the caller.  Requests are completed in order, one used-ring index update
and at most one call-eventfd write per batch (§2.7.7 / §2.7.10, EVENT_IDX).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from pytest_virtio.errors import ProtocolError

from .memory import GuestMemory
from .protocol import VringAddr

if TYPE_CHECKING:
    from .faults import Stats

__all__ = [
    "AVAIL_F_NO_INTERRUPT",
    "DESC",
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_WRITE",
    "USED_F_NO_NOTIFY",
    "Handler",
    "QueueBroken",
    "Virtqueue",
    "need_event",
    "ring_sizes",
]

# §2.7.5 struct virtq_desc; §2.7.6 virtq_avail; §2.7.8 virtq_used.
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768
_EVENTFD_ONE = (1).to_bytes(8, "little")

#: handler(queue_index, readable, readable_len, writable, writable_len) -> bytes written
Handler = Callable[[int, list[memoryview], int, list[memoryview], int], int]


class QueueBroken(ProtocolError):
    """The driver violated the split-ring rules; the queue cannot be trusted any more."""


def need_event(event: int, new: int, old: int) -> bool:
    """§2.7.10 ``vring_need_event``: did the index cross ``event`` going old→new?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Byte sizes of desc table, avail ring and used ring (§2.7, with event fields)."""
    return 16 * size, 6 + 2 * size, 6 + 8 * size


class Virtqueue:
    """One split virtqueue as the device sees it.

    Lifecycle follows vhost-user.rst "Starting and stopping rings": configured
    by SET_VRING_NUM/BASE/ADDR, started by SET_VRING_KICK, enabled by
    SET_VRING_ENABLE when PROTOCOL_FEATURES is negotiated, stopped by
    GET_VRING_BASE.
    """

    def __init__(self, index: int, max_size: int = 1024, stats: Stats | None = None) -> None:
        self.index = index
        self.stats = stats
        self.max_size = max_size
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.enabled = False
        self.event_idx = False
        self.indirect = False
        self.notifications = 0
        self.high_water = 0
        self.on_broken: Callable[[Virtqueue, str], None] | None = None
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._mem: GuestMemory | None = None
        self.reset()

    # --- configuration ------------------------------------------------------

    def reset(self) -> None:
        """Forget ring geometry and state; fds are the owner's business."""
        self.size = 0
        self.addr: VringAddr | None = None
        self.last_avail = 0
        self.used_idx = 0
        self.started = False
        self.broken = False
        self.broken_reason = ""
        self.detach()

    def set_num(self, num: int) -> None:
        if num == 0 or num & (num - 1) or num > min(self.max_size, MAX_QUEUE_SIZE):
            raise ProtocolError(
                f"queue {self.index}: size {num} is not a power of two <= {self.max_size}"
            )
        self.size = num

    def set_base(self, base: int) -> None:
        # Split rings: bits 0-15 carry last_avail_idx (vhost-user.rst SET_VRING_BASE).
        self.last_avail = base & 0xFFFF

    def set_addr(self, addr: VringAddr, mem: GuestMemory | None) -> None:
        """Store ring UVAs; if memory is known, map now and adopt the guest's used.idx."""
        self.addr = addr
        if mem is not None:
            self.attach(mem)
            if self._used is not None:
                self.used_idx = U16.unpack_from(self._used, 2)[0]

    def attach(self, mem: GuestMemory) -> None:
        """(Re)translate the rings into ``mem``; called again after SET_MEM_TABLE."""
        self.detach()
        self._mem = mem
        if self.addr is None or self.size == 0:
            return
        dsz, asz, usz = ring_sizes(self.size)
        a = self.addr
        try:
            if a.desc % 16 or a.avail % 2 or a.used % 4:
                raise QueueBroken(f"queue {self.index}: misaligned ring addresses")
            desc = mem.view(mem.uva_to_gpa(a.desc, dsz), dsz)
            avail = mem.view(mem.uva_to_gpa(a.avail, asz), asz)
            used = mem.view(mem.uva_to_gpa(a.used, usz), usz)
        except ProtocolError as exc:
            self.mark_broken(str(exc))
            return
        self._desc, self._avail, self._used = desc, avail, used

    def detach(self) -> None:
        """Drop every view into guest memory so the mapping can be closed."""
        for v in (self._desc, self._avail, self._used):
            if v is not None:
                v.release()
        self._desc = self._avail = self._used = None
        self._mem = None

    @property
    def ready(self) -> bool:
        """True when a kick should be serviced."""
        return (
            self.started and self.enabled and not self.broken and self._used is not None
        )

    # --- breaking ---------------------------------------------------------------

    def mark_broken(self, reason: str) -> None:
        """Stop the queue for good and tell the front-end through the ERR eventfd."""
        if self.broken:
            return
        self.broken = True
        self.broken_reason = reason
        if self.stats is not None:
            self.stats.broken[self.index] = reason
        if self.err_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.err_fd, _EVENTFD_ONE)
        if self.on_broken is not None:
            self.on_broken(self, reason)

    # --- the hot path -------------------------------------------------------------

    def _walk(self, head: int) -> tuple[list[memoryview], int, list[memoryview], int]:
        """Collect a chain's buffers (§2.7.5, §2.7.5.3 indirect), validating each step."""
        mem = self._mem
        table = self._desc
        assert mem is not None and table is not None
        tsize = self.size
        idx = head
        count = 0
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        in_indirect = any_write = False
        unpack = DESC.unpack_from
        while True:
            addr, length, flags, nxt = unpack(table, idx << 4)
            if flags & DESC_F_INDIRECT:
                if in_indirect:
                    raise QueueBroken(f"queue {self.index}: nested indirect table at head {head}")
                if not self.indirect:
                    raise QueueBroken(f"queue {self.index}: INDIRECT_DESC not negotiated")
                if flags & DESC_F_NEXT:
                    raise QueueBroken(f"queue {self.index}: indirect descriptor with NEXT")
                if length == 0 or length & 15:
                    raise QueueBroken(f"queue {self.index}: indirect table length {length}")
                tsize = length >> 4
                if tsize > self.size:
                    # §2.7.5.3.1: no chain may be longer than the queue size.
                    raise QueueBroken(f"queue {self.index}: indirect table of {tsize} entries")
                table = mem.view(addr, length)
                idx = 0
                count = 0
                in_indirect = True
                continue
            count += 1
            if count > tsize:
                raise QueueBroken(f"queue {self.index}: descriptor chain loops at head {head}")
            if flags & DESC_F_WRITE:
                any_write = True
                if length:
                    writable += mem.views(addr, length)
                    wlen += length
            elif any_write:
                raise QueueBroken(f"queue {self.index}: readable descriptor after writable")
            elif length:
                readable += mem.views(addr, length)
                rlen += length
            if not flags & DESC_F_NEXT:
                return readable, rlen, writable, wlen
            idx = nxt
            if idx >= tsize:
                raise QueueBroken(f"queue {self.index}: next index {idx} out of range")

    def drain(self, handler: Handler) -> int:
        """Serve every available chain; returns how many.  Never raises ProtocolError."""
        if not self.ready:
            return 0
        before = self.used_idx
        try:
            return self._drain(handler)
        except ProtocolError as exc:
            self.mark_broken(str(exc))
            if self.used_idx != before:
                self.notify()  # requests completed before the bad chain still count
            return 0

    def _drain(self, handler: Handler) -> int:
        avail, used = self._avail, self._used
        assert avail is not None and used is not None
        size = self.size
        mask = size - 1
        event_idx = self.event_idx
        used_event_off = 4 + 2 * size
        avail_event_off = 4 + 8 * size
        u16_unpack, u16_pack = U16.unpack_from, U16.pack_into
        elem_pack = USED_ELEM.pack_into
        walk = self._walk
        qidx = self.index
        old_used = self.used_idx
        done = 0
        if not event_idx:
            u16_pack(used, 0, USED_F_NO_NOTIFY)  # §2.7.10: we poll while draining
        while True:
            pending = (u16_unpack(avail, 2)[0] - self.last_avail) & 0xFFFF
            if pending == 0:
                # Re-enable notifications, then look again to close the race (§2.7.10).
                if event_idx:
                    u16_pack(used, avail_event_off, self.last_avail)
                else:
                    u16_pack(used, 0, 0)
                pending = (u16_unpack(avail, 2)[0] - self.last_avail) & 0xFFFF
                if pending == 0:
                    break
                if not event_idx:
                    u16_pack(used, 0, USED_F_NO_NOTIFY)
            if pending > size:
                raise QueueBroken(f"queue {qidx}: avail index jumped by {pending} (size {size})")
            if pending > self.high_water:
                self.high_water = pending
                if self.stats is not None:
                    hw = self.stats.high_water
                    hw[qidx] = max(hw[qidx], pending)
            last_avail, used_idx = self.last_avail, self.used_idx
            seen: set[int] = set()
            try:
                for _ in range(pending):
                    head = u16_unpack(avail, 4 + 2 * (last_avail & mask))[0]
                    if head >= size:
                        raise QueueBroken(f"queue {qidx}: head {head} out of range")
                    if head in seen:
                        raise QueueBroken(f"queue {qidx}: head {head} is already in flight")
                    seen.add(head)
                    readable, rlen, writable, wlen = walk(head)
                    written = handler(qidx, readable, rlen, writable, wlen)
                    elem_pack(used, 4 + 8 * (used_idx & mask), head, written)
                    last_avail = (last_avail + 1) & 0xFFFF
                    used_idx = (used_idx + 1) & 0xFFFF
                    done += 1
            finally:
                # One index update per batch, after the elements (§2.7.8); also on the
                # way out of a broken chain so completed requests are not lost.
                self.last_avail, self.used_idx = last_avail, used_idx
                u16_pack(used, 2, used_idx)
        if done:
            new = self.used_idx
            if event_idx:
                notify = need_event(u16_unpack(avail, used_event_off)[0], new, old_used)
            else:
                notify = not u16_unpack(avail, 0)[0] & AVAIL_F_NO_INTERRUPT
            if notify:
                self.notify()
        return done

    def notify(self) -> None:
        """Write the call eventfd (interrupt the guest)."""
        if self.call_fd >= 0:
            try:
                os.write(self.call_fd, _EVENTFD_ONE)
            except OSError:
                return
            self.notifications += 1
            if self.stats is not None:
                self.stats.notifications[self.index] += 1
