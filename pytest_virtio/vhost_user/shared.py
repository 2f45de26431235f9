"""Single-store access to memory the guest reads while we write it, and a full fence.

The rings are shared with a guest vCPU that runs *concurrently* with the
backend thread, so how a field is stored matters, not only its final value:

* ``struct.Struct.pack_into`` first zeroes the destination (a ``memset`` in
  CPython's ``s_pack_internal``) and then writes the bytes, so the guest can
  read 0 in between.  A transient ``avail_event`` of 0 makes the driver's
  ``vring_need_event`` skip its kick (a lost kick: the guest waits forever);
  a transient ``used.idx`` of 0 makes it walk stale used slots ("req.0:id N
  is not a head!").  ``unpack_from`` reads little-endian fields byte by byte,
  so it can also see half of an index update.
* An element of a ``memoryview.cast("H")`` / ``cast("I")`` is read and written
  by CPython with one ``memcpy`` of the item size into a typed local
  (``Objects/memoryobject.c`` ``PACK_SINGLE``/``UNPACK_SINGLE``), which the C
  compiler emits as a single aligned load or store of that width; aligned
  loads and stores up to 8 bytes are single-copy atomic on x86-64 (Intel SDM
  vol. 3A, "Guaranteed Atomic Operations").  tests/unit/vhost/test_vhost_shared.py
  proves it with a writer and a reader in two processes.  The native order of the cast must
  be little-endian, as virtio 1.x rings are (§2.7: ``le16``/``le32``).

The event-index handshake (virtio 1.2 §2.7.10, and §2.7.7.2 for flags) is the
classic store-buffering pattern: the device stores ``avail_event`` (or clears
``used.flags``) then loads ``avail.idx``; the driver stores ``avail.idx`` then
loads ``avail_event``.  Both sides need a full (store→load) barrier between
their store and their load, or each can miss the other's update; the same
holds for ``used.idx`` against ``used_event``.  x86-64 reorders exactly this
case (a later load may pass an earlier store still in the store buffer), so a
plain Python statement sequence is not enough.  Python has no fence, so
:class:`Fence` takes and releases a private ``threading.Lock``: on Linux
CPython implements it with ``sem_trywait``/``sem_post`` (``sys.thread_info``
lock ``'semaphore'``), which POSIX lists as memory-synchronising (XBD §4.12)
and glibc implements with ``lock``-prefixed atomics, a full barrier on x86-64
(SDM vol. 3A, "Memory Ordering in P6 and More Recent Processor Families":
loads and stores are not reordered with locked instructions).  It costs
~60 ns, once per batch, not per request.  Rejected: a syscall
(``os.eventfd_write``) is not architecturally serialising and costs 6 times
more; ``ctypes`` offers no fence (``__sync_synchronize`` is a compiler
builtin, not a libc symbol); the GIL hand-over is a fence only when it
happens.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Literal

from pytest_virtio.errors import ProtocolError

__all__ = ["Fence", "SharedAccessError", "words"]


class SharedAccessError(ProtocolError):
    """A shared field cannot be accessed with single aligned loads and stores."""


def _address(view: memoryview) -> int:
    # from_buffer needs a writable buffer; the temporary export ends at once.
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def words(view: memoryview, fmt: Literal["H", "I"]) -> memoryview[int]:
    """``view`` as an array of native u16 (``"H"``) or u32 (``"I"``) words.

    Indexing the result loads or stores one whole, aligned word.  Raises
    :class:`SharedAccessError` if the host address is not aligned to the word
    size (a region mapped at an odd file offset) or the host is big-endian.
    """
    size = {"H": 2, "I": 4}[fmt]
    if sys.byteorder != "little":
        raise SharedAccessError("virtio rings are little-endian; this host is big-endian")
    if len(view) % size:
        raise SharedAccessError(f"shared area of {len(view)} bytes is not whole {size}-byte words")
    if view.readonly or _address(view) % size:
        raise SharedAccessError(
            f"shared area is not {size}-byte aligned in the host mapping (or read-only)"
        )
    return view.cast(fmt)


class Fence:
    """A full memory barrier: ``fence()``, or ``fence.acquire(); fence.release()`` inline.

    One per queue so that backends of different disks never contend for it.
    """

    __slots__ = ("acquire", "release")

    def __init__(self) -> None:
        lock = threading.Lock()
        self.acquire = lock.acquire
        self.release = lock.release

    def __call__(self) -> None:
        self.acquire()
        self.release()
