"""Device side of a split virtqueue (virtio 1.2 §2.7).

The rings live in guest memory that the guest may scribble on at any moment,
so every index, length and address is validated before use (VHOST_USER.md
"Validate everything"): a violation marks the queue *broken*, signals the ERR
eventfd (vhost-user.rst SET_VRING_ERR) and stops the queue; it never raises
into the caller.  Requests are completed in order, one used-ring index update
and at most one call-eventfd write per batch (§2.7.7 / §2.7.10, EVENT_IDX).

The guest reads the rings while we write them: every shared field is read and
written as one aligned word, with a full fence where the notification
handshake needs one (see :mod:`.shared` for why ``struct`` cannot be used).
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pytest_virtio.errors import ProtocolError
from pytest_virtio.vhost_user.memory import GuestMemory
from pytest_virtio.vhost_user.protocol import VringAddr
from pytest_virtio.vhost_user.ringcheck import RingCheck
from pytest_virtio.vhost_user.shared import Fence, words

if TYPE_CHECKING:
    from pytest_virtio.vhost_user.stats import Stats

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

# §2.7.5 struct virtq_desc; §2.7.6 virtq_avail; §2.7.8 virtq_used.  Only the
# descriptor table (written by the driver before it publishes a chain, never
# while we read it) is decoded with struct; USED_ELEM is for mock drivers.
DESC = struct.Struct("<QIHH")
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
        self.kicks = 0
        self.high_water = 0
        #: time.monotonic() of the last kick served and the last call written
        self.last_kick = 0.0
        self.last_call = 0.0
        self.on_broken: Callable[[Virtqueue, str], None] | None = None
        self.check: RingCheck | None = None
        self.fence = Fence()
        self._desc: memoryview | None = None
        # Word views (shared.words): avail and used as u16, used elements as u32.
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._used32: memoryview | None = None
        self._views: list[memoryview] = []
        self._mem: GuestMemory | None = None
        self.reset()

    # --- configuration ------------------------------------------------------

    def reset(self) -> None:
        """Forget ring geometry and state; fds are the owner's business."""
        self.size = 0
        self.addr: VringAddr | None = None
        self.last_avail = 0
        self.used_idx = 0
        self._signalled = 0  # used_idx at the last call written
        self._idle_snap: tuple[int, ...] | None = None
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
                self.used_idx = self._signalled = self._used[1]

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
            views = self._views
            desc = mem.view(mem.uva_to_gpa(a.desc, dsz), dsz)
            views.append(desc)
            avail = mem.view(mem.uva_to_gpa(a.avail, asz), asz)
            views.append(avail)
            used = mem.view(mem.uva_to_gpa(a.used, usz), usz)
            views.append(used)
            elems = used[: usz - 2]  # flags, idx and ring; avail_event is a lone u16
            views.append(elems)
            avail16, used16, used32 = words(avail, "H"), words(used, "H"), words(elems, "I")
        except ProtocolError as exc:
            self.detach()
            self._mem = mem
            self.mark_broken(str(exc))
            return
        views += (avail16, used16, used32)
        self._desc, self._avail, self._used, self._used32 = desc, avail16, used16, used32
        if self.check is not None:
            self.check.forget(self.index)

    def detach(self) -> None:
        """Drop every view into guest memory so the mapping can be closed."""
        for v in reversed(self._views):  # casts before the views they were made from
            v.release()
        self._views = []
        self._desc = self._avail = self._used = self._used32 = None
        self._mem = None

    @property
    def ready(self) -> bool:
        """True when a kick should be serviced."""
        return (
            self.started and self.enabled and not self.broken and self._used is not None
        )

    # --- breaking ---------------------------------------------------------------

    def mark_broken(self, reason: str, *, report: bool = True) -> None:
        """Stop the queue for good and tell the front-end through the ERR eventfd.

        ``on_broken`` hears of it unless ``report`` is False (a break a test
        asked for through fault injection is not a failure).
        """
        if self.broken:
            return
        self.broken = True
        self.broken_reason = reason
        if self.stats is not None:
            self.stats.broken[self.index] = reason
        if self.err_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.err_fd, _EVENTFD_ONE)
        if report and self.on_broken is not None:
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
                table = mem.table(addr, length)
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

    def kick(self, handler: Handler) -> int:
        """The kick eventfd fired: consume it and serve the ring."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.kick_fd)
        self.kicks += 1
        self.last_kick = time.monotonic()
        if self.stats is not None:
            self.stats.kicks[self.index] += 1
        return self.drain(handler)

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
        # Indices into the word views: avail16 [flags, idx, ring..., used_event],
        # used16 [flags, idx, ..., avail_event], used32 [flags|idx, (id, len)...].
        avail, used, used32 = self._avail, self._used, self._used32
        assert avail is not None and used is not None and used32 is not None
        size = self.size
        mask = size - 1
        event_idx = self.event_idx
        used_event_i = 2 + size
        avail_event_i = 2 + 4 * size
        fence_acquire, fence_release = self.fence.acquire, self.fence.release
        check = self.check
        walk = self._walk
        qidx = self.index
        old_used = self.used_idx
        done = 0
        if not event_idx:
            used[0] = USED_F_NO_NOTIFY  # §2.7.10: we poll while draining
        while True:
            avail_idx = avail[1]
            pending = (avail_idx - self.last_avail) & 0xFFFF
            if pending == 0:
                # Re-enable notifications, then look again to close the race
                # (§2.7.10): the store must be visible before the load, hence the fence.
                if event_idx:
                    used[avail_event_i] = self.last_avail
                else:
                    used[0] = 0
                fence_acquire()
                fence_release()
                avail_idx = avail[1]
                pending = (avail_idx - self.last_avail) & 0xFFFF
                if pending == 0:
                    break
                if not event_idx:
                    used[0] = USED_F_NO_NOTIFY
            if check is not None:
                check.avail(qidx, avail_idx, self.used_idx, size)
            if pending > size:
                raise QueueBroken(f"queue {qidx}: avail index jumped by {pending} (size {size})")
            if pending > self.high_water:
                self.high_water = pending
                if self.stats is not None:
                    hw = self.stats.high_water
                    hw[qidx] = max(hw[qidx], pending)
            last_avail, used_idx = self.last_avail, self.used_idx
            seen: set[int] = set()
            taken: list[tuple[int, int]] = []
            try:
                for _ in range(pending):
                    head = avail[2 + (last_avail & mask)]
                    if head >= size:
                        raise QueueBroken(f"queue {qidx}: head {head} out of range")
                    if head in seen:
                        raise QueueBroken(f"queue {qidx}: head {head} is already in flight")
                    seen.add(head)
                    if check is not None:
                        check.take(qidx, head, size)
                    readable, rlen, writable, wlen = walk(head)
                    written = handler(qidx, readable, rlen, writable, wlen)
                    slot = 1 + 2 * (used_idx & mask)
                    used32[slot] = head
                    used32[slot + 1] = written
                    if check is not None:
                        taken.append((head, written))
                    last_avail = (last_avail + 1) & 0xFFFF
                    used_idx = (used_idx + 1) & 0xFFFF
                    done += 1
            finally:
                # One index update per batch, after the elements (§2.7.8); also on the
                # way out of a broken chain so completed requests are not lost.  x86-64
                # keeps stores in order; the fence makes that hold on any host.
                first, self.last_avail, self.used_idx = self.used_idx, last_avail, used_idx
                fence_acquire()
                fence_release()
                used[1] = used_idx
                if check is not None:
                    check.published(qidx, first, taken, used, used32, size)
        if done:
            new = self.used_idx
            fence_acquire()  # used.idx visible before used_event / flags is read (§2.7.10)
            fence_release()
            if event_idx:
                notify = need_event(avail[used_event_i], new, old_used)
            else:
                notify = not avail[0] & AVAIL_F_NO_INTERRUPT
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
            self._signalled = self.used_idx
            self.last_call = time.monotonic()
            if self.stats is not None:
                self.stats.notifications[self.index] += 1

    # --- defence in depth and diagnosis ------------------------------------------

    def _call_owed(self, used_event: int, avail_flags: int) -> bool:
        """Completions the driver asked to hear about but got no call for."""
        if self.used_idx == self._signalled:
            return False
        if self.event_idx:
            return need_event(used_event, self.used_idx, self._signalled)
        return not avail_flags & AVAIL_F_NO_INTERRUPT

    def idle_check(self, handler: Handler) -> None:
        """Called about once a second: serve work no kick announced, resend a call owed.

        Acts only if nothing moved since the previous call (same kicks, avail
        and used indices, flags and used_event), so a guest between publishing
        and kicking is not mistaken for a lost kick.  Every action is counted
        (``idle_rechecks_found_work``, ``idle_calls_resent``): with a correct
        handshake both stay 0, so a regression shows in the stats, not as a hang.
        Without EVENT_IDX a resent call may be spurious (the driver may have
        polled the used ring), which §2.7.7 tells drivers to tolerate.

        An index more than the ring holds ahead is not work: no driver can publish
        it, so the memory is no longer a live ring (firmware hands a device to the
        OS without resetting it, and the OS reuses the firmware's ring memory
        before its driver resets the device). A device reads a ring when it is
        kicked; nobody asked us to look, so that is counted
        (``idle_rechecks_not_a_ring``) and left to the next kick to judge. Seen
        as "avail index jumped by 29791" on the 4th of 5 vhost-user-blk disks,
        a queue SeaBIOS had set up and never used.
        """
        avail = self._avail
        if not self.ready or avail is None:
            self._idle_snap = None
            return
        avail_idx, flags, used_event = avail[1], avail[0], avail[2 + self.size]
        snap = (self.kicks, self.used_idx, avail_idx, flags, used_event)
        prev, self._idle_snap = self._idle_snap, snap
        if snap != prev:
            return
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending > self.size:
            if self.stats is not None:
                self.stats.idle_rechecks_not_a_ring[self.index] += 1
        elif pending:
            if self.stats is not None:
                self.stats.idle_rechecks_found_work[self.index] += 1
            self.drain(handler)
        elif self._call_owed(used_event, flags):
            if self.stats is not None:
                self.stats.idle_calls_resent[self.index] += 1
            self.notify()

    def state(self, now: float | None = None) -> dict[str, object]:
        """What the queue looks like now, for a hang report (read from any thread).

        Racy by nature (the backend thread keeps running); a ring unmapped
        meanwhile is reported as such.
        """
        now = time.monotonic() if now is None else now
        out: dict[str, object] = {
            "index": self.index, "size": self.size, "started": self.started,
            "enabled": self.enabled, "broken": self.broken_reason if self.broken else None,
            "event_idx": self.event_idx, "indirect": self.indirect,
            "last_avail": self.last_avail, "used_idx": self.used_idx,
            "used_idx_signalled": self._signalled, "kicks": self.kicks,
            "notifications": self.notifications, "queue_depth_max": self.high_water,
            "last_kick_s_ago": round(now - self.last_kick, 3) if self.last_kick else None,
            "last_call_s_ago": round(now - self.last_call, 3) if self.last_call else None,
            "kick_fd_readable": _readable(self.kick_fd),
        }
        avail, used = self._avail, self._used
        if avail is None or used is None:
            out["ring"] = "not mapped"
            return out
        try:
            size, mask = self.size, self.size - 1
            avail_idx = avail[1]
            waiting = (avail_idx - self.last_avail) & 0xFFFF
            out["ring"] = {
                "avail_idx": avail_idx, "avail_flags": avail[0],
                "used_event": avail[2 + size], "used_idx": used[1],
                "used_flags": used[0], "avail_event": used[2 + 4 * size],
                "waiting_unserved": waiting,
                "driver_outstanding": (avail_idx - used[1]) & 0xFFFF,
                "waiting_heads": [avail[2 + ((self.last_avail + i) & mask)]
                                  for i in range(min(waiting, size))],
            }
        except (ValueError, IndexError) as exc:  # released under us by a disconnect
            out["ring"] = f"unreadable: {exc}"
        return out


def _readable(fd: int) -> bool | None:
    if fd < 0:
        return None
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return None
