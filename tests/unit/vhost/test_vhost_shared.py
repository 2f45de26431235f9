"""Ring fields are stored in one piece: a reader in another process never sees 0 or a mix.

This is the root cause of the lost-kick hang and the guest's "req.0:id N is
not a head!" (issue 16): ``struct.pack_into`` zeroes the field before writing
it, and the guest vCPU, running concurrently, read the 0.  The test races a
writer (this process) against a reader (a child process, like the vCPU) on a
shared memfd.  A control run with ``pack_into`` must show torn values, which
proves the race is really exercised on this host; the run through
:func:`shared.words`, the helper every ring store goes through, must show none.
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from pytest_virtio.vhost_user.shared import Fence, SharedAccessError, words

U16_VALUES = (0xABCD, 0x1234)
U32_VALUES = (0xABCD1234, 0x5678EF9A)
# Layout of the shared page (u32 words): 0 ready flag, 1 stop flag, 2 reader done,
# 4 the u32 under test; u16 word 16 (byte 32) the u16 under test.
_READER = r"""
import mmap, sys, time
fd, seconds, limit = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
mm = mmap.mmap(fd, 4096)
w32 = memoryview(mm).cast("I")
w16 = memoryview(mm).cast("H")
ok16, ok32 = set(map(int, sys.argv[4].split(","))), set(map(int, sys.argv[5].split(",")))
reads = torn = 0
w32[0] = 1
deadline = time.monotonic() + seconds
while torn < limit:
    for _ in range(2000):
        if w16[16] not in ok16:
            torn += 1
        if w32[4] not in ok32:
            torn += 1
    reads += 4000
    if time.monotonic() > deadline:
        break
w32[2] = 1
print(reads, torn)
"""


def _race(write16: Callable[[int], None], write32: Callable[[int], None],
          mm: mmap.mmap, fd: int, seconds: float, limit: int) -> tuple[int, int]:
    """Write alternating values until the child reader is done; its (reads, torn)."""
    flags = memoryview(mm).cast("I")
    flags[0] = flags[2] = 0
    write16(U16_VALUES[0])
    write32(U32_VALUES[0])
    child = subprocess.Popen(
        [sys.executable, "-c", _READER, str(fd), str(seconds), str(limit),
         ",".join(map(str, U16_VALUES)), ",".join(map(str, U32_VALUES))],
        pass_fds=[fd], stdout=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not flags[0]:
            if child.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"reader did not start (exit {child.poll()})")
            time.sleep(0.001)
        a16, b16 = U16_VALUES
        a32, b32 = U32_VALUES
        while not flags[2]:
            for _ in range(500):
                write16(a16)
                write32(a32)
                write16(b16)
                write32(b32)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        flags.release()
    reads, torn = map(int, out.split())
    return reads, torn


def test_ring_words_are_never_seen_torn_by_another_process() -> None:
    fd = os.memfd_create("pv-torn-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        mm = mmap.mmap(fd, 4096)
        base = memoryview(mm)
        try:
            # Control: the old ring writes.  Seeing zeros proves the race is real here.
            u16, u32 = struct.Struct("<H"), struct.Struct("<I")
            reads, torn = _race(lambda v: u16.pack_into(base, 32, v),
                                lambda v: u32.pack_into(base, 16, v),
                                mm, fd, seconds=5.0, limit=200)
            assert torn > 0, f"control never saw pack_into's zero in {reads} reads"
            # The helper the ring code uses: one aligned store per field.
            w16, w32 = words(base[32:34], "H"), words(base[16:20], "I")

            def store16(v: int) -> None:
                w16[0] = v

            def store32(v: int) -> None:
                w32[0] = v

            reads2, torn2 = _race(store16, store32, mm, fd, seconds=1.0, limit=1)
            assert torn2 == 0, f"{torn2} torn reads in {reads2} through shared.words"
            assert reads2 > 100_000
            w16.release()
            w32.release()
        finally:
            base.release()
            mm.close()
    finally:
        os.close(fd)


def test_words_refuses_what_cannot_be_stored_in_one_piece() -> None:
    buf = memoryview(bytearray(16))
    with pytest.raises(SharedAccessError, match="aligned"):
        words(buf[1:5], "I")
    with pytest.raises(SharedAccessError, match="whole"):
        words(buf[0:3], "H")
    with pytest.raises(SharedAccessError):
        words(memoryview(bytes(8)), "H")  # read-only
    view = words(buf[4:12], "I")
    view[1] = 0xDEADBEEF
    assert bytes(buf[8:12]) == (0xDEADBEEF).to_bytes(4, "little")
    Fence()()  # a full barrier is callable on its own as well as inline


_RING_READER = r"""
import mmap, sys, time
fd, size, used_off, seconds = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                               float(sys.argv[4]))
mm = mmap.mmap(fd, size)
w16 = memoryview(mm).cast("H")
idx_i, event_i, flag_i = used_off // 2 + 1, int(sys.argv[5]) // 2, int(sys.argv[6]) // 2
w16[flag_i] = 1
prev_idx, prev_event = w16[idx_i], w16[event_i]
reads = backwards = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for _ in range(1000):
        i, e = w16[idx_i], w16[event_i]
        # both only move forward, by less than the ring size per look
        if (i - prev_idx) & 0xFFFF > 0x8000 or (e - prev_event) & 0xFFFF > 0x8000:
            backwards += 1
        prev_idx, prev_event = i, e
    reads += 2000
w16[flag_i] = 2
print(reads, backwards)
"""


def test_drain_never_shows_the_guest_an_index_going_backwards() -> None:
    """The real Virtqueue store path, watched by a "vCPU" in another process.

    used.idx and avail_event only move forward; with pack_into's zeroing the
    watcher saw them jump back to 0 and forward again (a lost kick, a stale
    used slot walked).  The driver here is minimal (one descriptor, head 0 in
    every avail slot, a handler that writes nothing) so that the backend
    stores as often as it can.
    """
    from vhost_rig import Rig

    from pytest_virtio.vhost_user.virtqueue import DESC_F_WRITE

    size, start = 256, 0x4321  # far from 0, so a transient 0 is a big jump back
    rig = Rig(size=size, event_idx=True)
    try:
        rig.q.write_desc(0, rig.q.alloc(16), 16, DESC_F_WRITE)
        for slot in range(size):
            rig.q.set_avail_slot(slot, 0)
        rig.q.set_avail_idx(start)
        rig.q.set_used_idx(start)
        rig.attach(base=start)
        used_off = rig.mem.offset(rig.q.used_gpa)
        avail_idx_i = (rig.mem.offset(rig.q.avail_gpa) + 2) // 2
        flag_off = rig.mem.offset(rig.q.alloc(2, 2))
        w16 = memoryview(rig.mem.mm).cast("H")
        child = subprocess.Popen(
            [sys.executable, "-c", _RING_READER, str(rig.mem.fd), str(rig.mem.size),
             str(used_off), "1.5", str(used_off + 4 + 8 * size), str(flag_off)],
            pass_fds=[rig.mem.fd], stdout=subprocess.PIPE, text=True,
        )
        drain, handler = rig.vq.drain, lambda *_: 0
        try:
            deadline = time.monotonic() + 30
            while w16[flag_off // 2] != 1:
                assert child.poll() is None and time.monotonic() < deadline, "no reader"
                time.sleep(0.001)
            drains, idx = 0, start
            while w16[flag_off // 2] == 1:
                for _ in range(100):
                    idx = (idx + 1) & 0xFFFF
                    w16[avail_idx_i] = idx  # publish one more chain
                    drain(handler)
                drains += 100
            out, _ = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            w16.release()
        reads, backwards = map(int, out.split())
        assert not rig.vq.broken, rig.vq.broken_reason
        assert rig.vq.used_idx == idx and drains > 1000 and reads > 100_000
        assert backwards == 0, f"{backwards} backward index reads in {reads} ({drains} drains)"
    finally:
        rig.close()
