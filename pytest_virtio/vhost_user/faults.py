"""Statistics, request trace and fault injection for the in-process backend.

Tests assert on what the guest actually did (requests and bytes per type and
queue, queue depth, interrupts sent) and provoke the error paths a driver must
survive (I/O errors by sector range, type or every Nth request, added latency,
the medium turning read-only, a queue broken through the ERR eventfd).
Counters are written only by the backend thread; readers take a snapshot.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from pytest_virtio.errors import BackendError

from .blk import BlkStatus, BlkType

__all__ = ["FaultInjector", "FaultRule", "Stats", "Trace", "TraceEntry"]

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


@dataclass(slots=True)
class FaultRule:
    """Fail matching requests with IOERR.

    ``sectors`` is a half-open ``[start, end)`` range a request must overlap;
    ``types`` restricts by request type; ``every`` fails only every Nth match;
    ``remaining`` (if set) disarms the rule after that many failures.
    """

    sectors: tuple[int, int] | None = None
    types: frozenset[int] | None = None
    every: int = 1
    remaining: int | None = None
    matched: int = 0
    fired: int = 0

    def matches(self, rtype: int, sector: int, nsectors: int) -> bool:
        if self.types is not None and rtype not in self.types:
            return False
        if self.sectors is not None:
            start, end = self.sectors
            if sector >= end or sector + max(nsectors, 1) <= start:
                return False
        if self.remaining is not None and self.remaining <= 0:
            return False
        self.matched += 1
        if self.matched % self.every:
            return False
        self.fired += 1
        if self.remaining is not None:
            self.remaining -= 1
        return True


def _types(types: Iterable[int] | int | None) -> frozenset[int] | None:
    if types is None:
        return None
    if isinstance(types, int):
        return frozenset({int(types)})
    return frozenset(int(t) for t in types)


@dataclass
class _Latency:
    seconds: float
    types: frozenset[int] | None


class FaultInjector:
    """Rules the blk device consults per request; cheap when nothing is armed."""

    def __init__(self, on_break: Callable[[int], None] | None = None) -> None:
        """``on_break(index)`` is how the owning server breaks a queue on its own thread."""
        self._lock = threading.Lock()
        self.rules: list[FaultRule] = []
        self._latency: list[_Latency] = []
        self.readonly: bool | None = None  # None/False: the device's own setting
        self.active = False
        self._on_break = on_break

    def _refresh(self) -> None:
        self.active = bool(self.rules or self._latency)

    def fail_sectors(
        self, start: int, end: int, types: Iterable[int] | int | None = None,
        count: int | None = None,
    ) -> FaultRule:
        """IOERR for requests overlapping sectors ``[start, end)``."""
        if end <= start:
            raise ValueError(f"empty sector range [{start}, {end})")
        return self._add(FaultRule(sectors=(start, end), types=_types(types), remaining=count))

    def fail_type(self, types: Iterable[int] | int, count: int | None = None) -> FaultRule:
        """IOERR for every request of the given type(s)."""
        return self._add(FaultRule(types=_types(types), remaining=count))

    def fail_every(
        self, n: int, types: Iterable[int] | int | None = None, count: int | None = None
    ) -> FaultRule:
        """IOERR for every ``n``-th (matching) request."""
        if n < 1:
            raise ValueError("n must be >= 1")
        return self._add(FaultRule(types=_types(types), every=n, remaining=count))

    def _add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self.rules = [*self.rules, rule]
            self._refresh()
        return rule

    def add_latency(self, seconds: float, types: Iterable[int] | int | None = None) -> None:
        """Sleep before serving each matching request (slows the whole queue thread)."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        with self._lock:
            self._latency = [*self._latency, _Latency(seconds, _types(types))]
            self._refresh()

    def set_readonly(self, readonly: bool | None) -> None:
        """Flip the medium read-only (True) or back to its own setting (False/None).

        A disk configured read-only stays read-only: its image may be opened
        O_RDONLY, and a fault must not write to media the test declared immutable.
        """
        self.readonly = readonly

    def break_queue(self, index: int) -> None:
        """Mark queue ``index`` broken and signal its ERR eventfd (in the backend thread)."""
        if self._on_break is None:
            raise BackendError("fault injector is not attached to a running server")
        self._on_break(index)

    def clear(self) -> None:
        """Disarm every rule, latency and read-only override."""
        with self._lock:
            self.rules = []
            self._latency = []
            self.readonly = None
            self._refresh()

    def should_fail(self, rtype: int, sector: int, nsectors: int) -> bool:
        """Apply latency, then report whether a rule fails this request."""
        for lat in self._latency:
            if lat.types is None or rtype in lat.types:
                time.sleep(lat.seconds)
        fail = False
        for rule in self.rules:
            if rule.matches(rtype, sector, nsectors):
                fail = True
        return fail
