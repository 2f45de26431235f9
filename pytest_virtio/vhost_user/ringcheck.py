"""Opt-in split-ring invariant checker for tests under load (virtio 1.2 §2.7).

Off by default: it re-reads every used element the backend published.  When
on (``VhostUserBlkServer.enable_ring_check()``), every batch is checked for

* ``avail.idx`` moving forward by at most the queue size between two reads,
  and never more than the queue size ahead of ``used.idx`` (§2.7.6: the driver
  cannot have more chains outstanding than descriptors);
* every head taken being in range and not already outstanding, and every used
  id written being an outstanding head, completed exactly once;
* what landed in guest memory being what was meant: each used element
  (id and len) and ``used.idx`` read back equal to the values stored.

Violations are kept as readable strings (bounded), never raised: the checker
watches, the test asserts on ``violations``.
"""

from __future__ import annotations

__all__ = ["RingCheck"]

_LIMIT = 100


class RingCheck:
    """Invariants over the batches the backend serves; one instance per server."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.batches = 0
        self.requests = 0
        self._outstanding: dict[int, set[int]] = {}
        self._avail_seen: dict[int, int] = {}

    def _violate(self, text: str) -> None:
        if len(self.violations) < _LIMIT:
            self.violations.append(text)

    def forget(self, queue: int) -> None:
        """The queue was (re)configured: its indices start afresh."""
        self._outstanding.pop(queue, None)
        self._avail_seen.pop(queue, None)

    def avail(self, queue: int, avail_idx: int, used_idx: int, size: int) -> None:
        """``avail.idx`` as just read; ``used_idx`` is what the device has published."""
        prev = self._avail_seen.get(queue)
        if prev is not None and (avail_idx - prev) & 0xFFFF > size:
            self._violate(f"queue {queue}: avail.idx went from {prev} to {avail_idx}")
        if (avail_idx - used_idx) & 0xFFFF > size:
            self._violate(f"queue {queue}: avail.idx {avail_idx} is more than {size} "
                          f"ahead of used.idx {used_idx}")
        self._avail_seen[queue] = avail_idx

    def take(self, queue: int, head: int, size: int) -> None:
        """A head read from the avail ring, about to be served."""
        out = self._outstanding.setdefault(queue, set())
        if not 0 <= head < size:
            self._violate(f"queue {queue}: head {head} out of range (size {size})")
        elif head in out:
            self._violate(f"queue {queue}: head {head} taken while still outstanding")
        out.add(head)

    def published(self, queue: int, first: int, done: list[tuple[int, int]],
                  used16: memoryview, used32: memoryview, size: int) -> None:
        """``done`` = (id, len) pairs written from used slot ``first`` on, then used.idx."""
        self.batches += 1
        self.requests += len(done)
        out = self._outstanding.setdefault(queue, set())
        mask = size - 1
        for n, (head, length) in enumerate(done):
            if head not in out:
                self._violate(f"queue {queue}: used id {head} is not an outstanding head")
            out.discard(head)
            slot = (first + n) & mask
            got = (used32[1 + 2 * slot], used32[2 + 2 * slot])
            if got != (head, length):
                self._violate(f"queue {queue}: used slot {slot} holds {got}, "
                              f"stored {(head, length)}")
        idx = (first + len(done)) & 0xFFFF
        if used16[1] != idx:
            self._violate(f"queue {queue}: used.idx reads {used16[1]}, stored {idx}")
