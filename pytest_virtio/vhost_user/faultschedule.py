"""Fault schedules: which requests of an in-process disk fail, as data.

A :class:`Fault` names one request by its type and its 1-based ordinal among
the requests of that type the device serves after the schedule is armed
(``write#3`` is the third write), and what happens to it: the status
VIRTIO_BLK_S_IOERR (virtio 1.2 §5.2.6), or a delay before it is served.  A
:class:`Schedule` is a sorted set of faults with a short text form,
``write#3:ioerr,flush#1:ioerr``, that :meth:`Schedule.parse` reads back
exactly: a schedule printed in a failure report is the schedule replayed.
:func:`armed` puts a schedule on a :class:`~.faults.FaultInjector` for the span
of a ``with`` block and tells which of its faults fired.

Ordinals count requests in the order the device serves them.  A program that
waits for each request (``dd oflag=direct``) makes that order its own; requests
a guest has in flight together, or on several queues, count in the order they
reach the device.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from itertools import pairwise

from pytest_virtio.errors import ConfigError
from pytest_virtio.vhost_user.faults import FaultInjector, FaultRule
from pytest_virtio.vhost_user.protocol import BlkType

__all__ = ["Armed", "Fault", "FaultKind", "RequestType", "Schedule", "armed"]

log = logging.getLogger(__name__)


class RequestType(Enum):
    """The requests a fault picks from, by virtio-blk request type (virtio 1.2 §5.2.6).

    Declared in the order of the request type numbers; ``any`` (every request,
    GET_ID included) last.  Schedules sort their faults in this order.
    """

    READ = "read"  # VIRTIO_BLK_T_IN
    WRITE = "write"  # VIRTIO_BLK_T_OUT
    FLUSH = "flush"  # VIRTIO_BLK_T_FLUSH
    DISCARD = "discard"  # VIRTIO_BLK_T_DISCARD
    WRITE_ZEROES = "write-zeroes"  # VIRTIO_BLK_T_WRITE_ZEROES
    ANY = "any"

    @property
    def blk_types(self) -> frozenset[int] | None:
        """The VIRTIO_BLK_T_* numbers this type matches; None: every request."""
        return _BLK_TYPES[self]


_BLK_TYPES: dict[RequestType, frozenset[int] | None] = {
    RequestType.READ: frozenset({BlkType.IN}),
    RequestType.WRITE: frozenset({BlkType.OUT}),
    RequestType.FLUSH: frozenset({BlkType.FLUSH}),
    RequestType.DISCARD: frozenset({BlkType.DISCARD}),
    RequestType.WRITE_ZEROES: frozenset({BlkType.WRITE_ZEROES}),
    RequestType.ANY: None,
}
_TYPE_ORDER = {t: i for i, t in enumerate(RequestType)}


class FaultKind(Enum):
    """What a fault does to the request it hits."""

    #: Completed with status VIRTIO_BLK_S_IOERR and no data moved (§5.2.6).
    IOERR = "ioerr"
    #: Held ``seconds`` before it is served as usual (the queue's thread waits).
    DELAY = "delay"


_KIND_ORDER = {k: i for i, k in enumerate(FaultKind)}
GRAMMAR = ("TYPE#N:ioerr or TYPE#N:delay=SECONDS, comma-separated (TYPE one of "
           + ", ".join(t.value for t in RequestType) + "; N from 1); 'none' for no faults")
_FAULT_RE = re.compile(r"(?P<type>[a-z-]+)#(?P<ordinal>\d+):(?P<kind>[a-z]+)(?:=(?P<arg>\S+))?")


@dataclass(frozen=True)
class Fault:
    """The ``ordinal``-th request of type ``request`` after arming gets ``kind``."""

    request: RequestType
    ordinal: int
    kind: FaultKind = FaultKind.IOERR
    #: How long a DELAY holds its request; 0 for IOERR.
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.request, RequestType):
            raise ValueError(f"Fault.request must be a RequestType, got {self.request!r}")
        if not isinstance(self.kind, FaultKind):
            raise ValueError(f"Fault.kind must be a FaultKind, got {self.kind!r}")
        if isinstance(self.ordinal, bool) or not isinstance(self.ordinal, int) or (
                self.ordinal < 1):
            raise ValueError(f"Fault.ordinal counts from 1, got {self.ordinal!r}")
        if self.kind is FaultKind.DELAY:
            if not (math.isfinite(self.seconds) and self.seconds > 0):
                raise ValueError(f"a delay fault needs seconds > 0, got {self.seconds!r}")
        elif self.seconds:
            raise ValueError(f"an {self.kind.value} fault takes no seconds, got {self.seconds!r}")

    def __str__(self) -> str:
        action = self.kind.value
        if self.kind is FaultKind.DELAY:
            action += f"={self.seconds!r}"
        return f"{self.request.value}#{self.ordinal}:{action}"

    @classmethod
    def parse(cls, text: str) -> Fault:
        """The inverse of ``str(fault)``: ``write#3:ioerr``, ``read#1:delay=0.25``."""
        m = _FAULT_RE.fullmatch(text.strip())
        if m is None:
            raise ConfigError(f"fault {text!r}: not of the form {GRAMMAR}")
        try:
            request = RequestType(m["type"])
        except ValueError:
            raise ConfigError(f"fault {text!r}: unknown request type {m['type']!r}; the form is "
                              f"{GRAMMAR}") from None
        try:
            kind = FaultKind(m["kind"])
        except ValueError:
            raise ConfigError(f"fault {text!r}: unknown kind {m['kind']!r}; the form is "
                              f"{GRAMMAR}") from None
        arg = m["arg"]
        if (arg is None) != (kind is FaultKind.IOERR):
            raise ConfigError(f"fault {text!r}: the form is {GRAMMAR}")
        try:
            return cls(request, int(m["ordinal"]), kind, float(arg) if arg else 0.0)
        except ValueError as exc:
            raise ConfigError(f"fault {text!r}: {exc}") from None

    def sort_key(self) -> tuple[int, int, int, float]:
        return (_TYPE_ORDER[self.request], self.ordinal, _KIND_ORDER[self.kind], self.seconds)

    def rule(self) -> FaultRule:
        """The injector rule that fires exactly at this fault's request, once."""
        delay = self.seconds if self.kind is FaultKind.DELAY else None
        return FaultRule(types=self.request.blk_types, every=self.ordinal, remaining=1,
                         delay=delay)


@dataclass(frozen=True)
class Schedule:
    """A set of faults, kept sorted (by request type, then ordinal); text ``str(schedule)``."""

    faults: tuple[Fault, ...] = ()

    def __post_init__(self) -> None:
        faults = tuple(sorted(self.faults, key=Fault.sort_key))
        for a, b in pairwise(faults):
            if a == b:
                raise ValueError(f"fault {a} appears twice in a schedule")
        object.__setattr__(self, "faults", faults)

    def __str__(self) -> str:
        return ",".join(str(f) for f in self.faults) or "none"

    def __len__(self) -> int:
        return len(self.faults)

    def __iter__(self) -> Iterator[Fault]:
        return iter(self.faults)

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """The inverse of ``str(schedule)``: ``Schedule.parse("write#3:ioerr,flush#1:ioerr")``."""
        body = text.strip()
        if body in ("", "none"):
            return cls()
        faults = tuple(Fault.parse(part) for part in body.split(","))
        try:
            return cls(faults)
        except ValueError as exc:
            raise ConfigError(f"fault schedule {text!r}: {exc}") from None


@dataclass(frozen=True)
class Armed:
    """A schedule on an injector: each fault with the rule that serves it."""

    schedule: Schedule
    rules: tuple[FaultRule, ...]

    def _where(self, fired: bool) -> Schedule:
        return Schedule(tuple(f for f, r in zip(self.schedule, self.rules, strict=True)
                              if bool(r.fired) is fired))

    @property
    def fired(self) -> Schedule:
        """The faults whose request came (so far): the ones the program met."""
        return self._where(True)

    @property
    def unfired(self) -> Schedule:
        """The faults whose request never came: the program made fewer of that type."""
        return self._where(False)


@contextmanager
def armed(injector: FaultInjector, schedule: Schedule) -> Iterator[Armed]:
    """Arm ``schedule`` on ``injector`` for the ``with`` block, then disarm it.

    Ordinals count from here, for every fault alike (the rules are armed at
    once).  Only this schedule's rules are removed on exit: a test's own
    standing rules, latency and read-only flip stay.
    """
    arm = Armed(schedule, tuple(f.rule() for f in schedule))
    injector.add(*arm.rules)
    try:
        yield arm
    finally:
        injector.remove(*arm.rules)
        log.info("fault schedule %s: fired %s", schedule, arm.fired)
