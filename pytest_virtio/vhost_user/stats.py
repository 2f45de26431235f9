"""Statistics and the request trace of the in-process backend.

Tests assert on what the guest actually did: requests and bytes per type and
queue, queue depth, kicks and interrupts sent, and (when enabled) each request
in order.  Counters are written only by the backend thread; readers take a
snapshot.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple

from pytest_virtio.vhost_user.protocol import BlkStatus, BlkType

__all__ = ["Stats", "Trace", "TraceEntry"]

_NTYPES = 16  # type codes >= 15 share the last bucket ("other")


def _type_name(code: int) -> str:
    try:
        return BlkType(code).name
    except ValueError:
        return "OTHER"


class Stats:
    """Live counters, indexed ``[queue][type]``; ``to_dict()`` gives a stable snapshot."""

    def __init__(self, num_queues: int) -> None:
        self.num_queues = num_queues
        self.reset()

    def reset(self) -> None:
        n = self.num_queues
        self.requests = [[0] * _NTYPES for _ in range(n)]
        self.bytes = [[0] * _NTYPES for _ in range(n)]
        self.status = [[0] * 3 for _ in range(n)]
        self.notifications = [0] * n
        self.kicks = [0] * n
        self.high_water = [0] * n
        #: Idle re-checks (Virtqueue.idle_check) that found unkicked work or
        #: resent an owed call: 0 unless a notification was lost.
        self.idle_rechecks_found_work = [0] * n
        self.idle_calls_resent = [0] * n
        #: Idle re-checks that found an index no driver could have published (more
        #: than the ring holds): not a live ring, so left alone (see idle_check).
        self.idle_rechecks_not_a_ring = [0] * n
        self.broken: dict[int, str] = {}

    def record(self, queue: int, rtype: int, nbytes: int, status: int) -> None:
        """Count one completed request (called on the hot path)."""
        t = rtype if rtype < _NTYPES else _NTYPES - 1
        self.requests[queue][t] += 1
        self.bytes[queue][t] += nbytes
        self.status[queue][status] += 1

    def _sum_by_type(self, table: list[list[int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in table:
            for code, value in enumerate(row):
                if value:
                    name = _type_name(code)
                    out[name] = out.get(name, 0) + value
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly snapshot: totals by type plus one entry per queue."""
        queues = []
        for q in range(self.num_queues):
            queues.append(
                {
                    "requests": {_type_name(c): v for c, v in enumerate(self.requests[q]) if v},
                    "bytes": {_type_name(c): v for c, v in enumerate(self.bytes[q]) if v},
                    "status": {BlkStatus(s).name: v for s, v in enumerate(self.status[q]) if v},
                    "notifications": self.notifications[q],
                    "kicks": self.kicks[q],
                    "queue_depth_max": self.high_water[q],
                    "idle_rechecks_found_work": self.idle_rechecks_found_work[q],
                    "idle_calls_resent": self.idle_calls_resent[q],
                    "idle_rechecks_not_a_ring": self.idle_rechecks_not_a_ring[q],
                }
            )
        return {
            "requests": self._sum_by_type(self.requests),
            "bytes": self._sum_by_type(self.bytes),
            "errors": sum(row[BlkStatus.IOERR] for row in self.status),
            "unsupported": sum(row[BlkStatus.UNSUPP] for row in self.status),
            "notifications": sum(self.notifications),
            "queue_depth_max": max(self.high_water, default=0),
            "idle_rechecks_found_work": sum(self.idle_rechecks_found_work),
            "idle_calls_resent": sum(self.idle_calls_resent),
            "idle_rechecks_not_a_ring": sum(self.idle_rechecks_not_a_ring),
            "broken_queues": dict(self.broken),
            "queues": queues,
        }

    def snapshot(self) -> Stats:
        """An independent copy, for before/after comparisons in a test."""
        copy = Stats(self.num_queues)
        copy.requests = [row[:] for row in self.requests]
        copy.bytes = [row[:] for row in self.bytes]
        copy.status = [row[:] for row in self.status]
        copy.notifications = self.notifications[:]
        copy.kicks = self.kicks[:]
        copy.high_water = self.high_water[:]
        copy.idle_rechecks_found_work = self.idle_rechecks_found_work[:]
        copy.idle_calls_resent = self.idle_calls_resent[:]
        copy.idle_rechecks_not_a_ring = self.idle_rechecks_not_a_ring[:]
        copy.broken = dict(self.broken)
        return copy

    def total_requests(self, rtype: BlkType | None = None) -> int:
        if rtype is None:
            return sum(sum(row) for row in self.requests)
        return sum(row[int(rtype)] for row in self.requests)


class TraceEntry(NamedTuple):
    """One completed request: (queue, type, sector, data length, status)."""

    queue: int
    type: int
    sector: int
    length: int
    status: int


class Trace:
    """Bounded request log; off by default because it costs on the hot path."""

    def __init__(self) -> None:
        self.enabled = False
        self._entries: deque[TraceEntry] = deque(maxlen=10_000)

    def enable(self, limit: int = 10_000) -> None:
        if limit <= 0:
            raise ValueError("trace limit must be positive")
        self._entries = deque(self._entries, maxlen=limit)
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def clear(self) -> None:
        self._entries.clear()

    def add(self, queue: int, rtype: int, sector: int, length: int, status: int) -> None:
        self._entries.append(TraceEntry(queue, rtype, sector, length, status))

    @property
    def entries(self) -> list[TraceEntry]:
        return list(self._entries)
