"""Fault injection for the in-process backend.

Tests provoke the error paths a driver must survive: I/O errors by sector
range, type or every Nth request, added latency (on every request or on chosen
ones), the medium turning read-only, a queue broken through the ERR eventfd.
What the guest did is counted in :mod:`.stats`; schedules of faults at chosen
requests are :mod:`.faultschedule`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pytest_virtio.errors import BackendError

__all__ = ["FaultInjector", "FaultRule"]

@dataclass(slots=True)
class FaultRule:
    """Fail matching requests with IOERR, or delay them.

    ``sectors`` is a half-open ``[start, end)`` range a request must overlap;
    ``types`` restricts by request type; ``every`` fails only every Nth match;
    ``remaining`` (if set) disarms the rule after that many failures.  With
    ``delay`` (seconds) the rule does not fail what it hits: it holds it that
    long, then the request is served as usual.
    """

    sectors: tuple[int, int] | None = None
    types: frozenset[int] | None = None
    every: int = 1
    remaining: int | None = None
    delay: float | None = None
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

    def add(self, *rules: FaultRule) -> None:
        """Arm prepared rules at once: they count requests from the same one on.

        ``FaultRule(types=..., every=3, remaining=1, delay=0.5)`` delays the third
        matching request only (unlike :meth:`add_latency`, which slows every one).
        """
        for rule in rules:
            if rule.every < 1:
                raise ValueError("every must be >= 1")
            if rule.delay is not None and rule.delay < 0:
                raise ValueError("delay must be >= 0")
        with self._lock:
            self.rules = [*self.rules, *rules]
            self._refresh()

    def remove(self, *rules: FaultRule) -> None:
        """Disarm these rules (others, latency and read-only stay as they are)."""
        with self._lock:
            self.rules = [r for r in self.rules if not any(r is x for x in rules)]
            self._refresh()

    def _add(self, rule: FaultRule) -> FaultRule:
        self.add(rule)
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
                if rule.delay is None:
                    fail = True
                else:
                    time.sleep(rule.delay)
        return fail
