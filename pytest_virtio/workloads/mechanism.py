"""Mechanism metrics: what one guest I/O costs in device traps, interrupts and backend CPU.

Throughput under TCG hides what the virtio design saves: there are no VM exits,
and the host's load moves every wall-clock number.  These counts do not move
with load or accelerator, because they are properties of the driver/device
protocol, counted by QEMU itself while the workload runs:

* **traps per I/O** — guest accesses to the device's registers (port I/O or
  MMIO; under KVM each one is a VM exit).  IDE costs ~26 per 4k read (task-file
  and BMDMA registers), a virtio queue at most one notify per *batch*.
* **interrupts per I/O** — interrupts the device raised.
* **backend CPU per request** — CPU time of the in-process vhost-user backend
  thread (its per-thread clock, the figure ``/proc/self/task/TID/stat`` shows),
  for the disks pytest-virtio serves itself.

QEMU's ``log`` trace backend writes the events (``qemu-system-x86_64 -trace
help`` lists ~4,200): the log file is pointed into the guest's run directory
with HMP ``logfile`` and only the device under test's events are switched on,
with QMP ``trace-event-set-state``, for the length of the workload.  Which
events are one trap or one interrupt was checked against the memory-region
dispatch events (``memory_region_ops_read/write``) on QEMU 7.2: e.g. per IDE
4k read 8 ``ide_ioport_write`` + 4 ``ide_ioport_read`` + 4 ``ide_status_read``
+ 5 ``bmdma_read`` + 4 ``bmdma_write`` + 1 ``bmdma_addr_write`` = 26 dispatches.

A virtio queue notify that QEMU services by ioeventfd never reaches a memory
region's ops, so virtio traps are ``virtio_queue_notify`` events.  The root disk
is virtio-blk too, so virtio events are attributed per device instance (the
``vdev`` pointer they carry): the workload's device is the virtio-blk instance
whose request count is closest to the workload's own I/O count, or, for other
virtio devices, the busiest instance that is not a virtio-blk disk.  A
vhost-user disk's notifies go straight from the guest to the backend's kick
eventfd: its traps and interrupts are the backend's own kick and call counters.

Parsing is pure (:func:`count_events`); :class:`TraceWindow` does the QMP/HMP
and file I/O around one workload run.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

__all__ = [
    "PLANS",
    "BackendWindow",
    "Mechanism",
    "TracePlan",
    "TraceWindow",
    "count_events",
]

_VIRTIO_BLK_REQUESTS = frozenset({"virtio_blk_handle_read", "virtio_blk_handle_write"})
_VIRTIO_IRQS = frozenset({"virtio_notify", "virtio_notify_irqfd"})
_REGION_EVENTS = frozenset({"memory_region_ops_read", "memory_region_ops_write"})
_IOAPIC = "ioapic_set_irq"
_LINE_RE = re.compile(r"^(?:\d+@[\d.]+:)?([a-z0-9_]+) ?(.*)$")
_VDEV_RE = re.compile(r"\bvdev (0x[0-9a-f]+)")
_REGION_RE = re.compile(r"name '([^']*)'")
_IOAPIC_RE = re.compile(r"vector: (\d+) level: 1\b")


@dataclass(frozen=True)
class TracePlan:
    """Which QEMU trace events count as one trap / one interrupt of a device family."""

    traps: frozenset[str] = frozenset()
    irqs: frozenset[str] = frozenset()
    #: Memory regions whose dispatch events count as traps (devices without own events).
    regions: frozenset[str] = frozenset()
    #: Interrupts are raises of an IOAPIC pin (legacy INTx devices).
    irq_pins: frozenset[int] = frozenset()
    #: Virtio events carry ``vdev``; count one instance: ``"blk"`` the one with the
    #: most virtio-blk requests, ``"other"`` the busiest that is not a virtio-blk disk.
    virtio: str = ""
    #: The device interrupts through its legacy INTx line: ``irq_pins`` is filled at
    #: run time with the IOAPIC pin QEMU routed it to (:func:`with_pins`).
    intx: bool = False

    def events(self) -> tuple[str, ...]:
        """Every event to switch on for this plan."""
        names = set(self.traps | self.irqs)
        if self.regions:
            names |= _REGION_EVENTS
        if self.irq_pins:
            names.add(_IOAPIC)
        if self.virtio:
            names |= _VIRTIO_BLK_REQUESTS
        return tuple(sorted(names))


_IDE_TRAPS = frozenset({
    "ide_ioport_read", "ide_ioport_write", "ide_status_read", "ide_ctrl_write",
    "ide_data_readw", "ide_data_writew", "ide_data_readl", "ide_data_writel",
    "bmdma_read", "bmdma_write", "bmdma_addr_read", "bmdma_addr_write",
})  # fmt: skip

#: Device (report column) → its plan.  ``irq_pins`` of an INTx device come from
#: QMP ``query-pci`` at run time (see :func:`with_pins`).  Devices without trap
#: events of their own are counted by their register regions' dispatches, named
#: as ``info mtree`` shows them on QEMU 7.2 (NVMe's doorbells are dispatches too:
#: its ``ioeventfd`` property is off by default).
PLANS: Mapping[str, TracePlan] = {
    "ide": TracePlan(traps=_IDE_TRAPS, irq_pins=frozenset({14, 15})),
    "ahci": TracePlan(traps=frozenset({"ahci_mem_read", "ahci_mem_write"}),
                      irqs=frozenset({"ahci_irq_raise"})),
    "virtio-blk": TracePlan(traps=frozenset({"virtio_queue_notify"}), irqs=_VIRTIO_IRQS,
                            virtio="blk"),
    "virtio-scsi": TracePlan(traps=frozenset({"virtio_queue_notify"}), irqs=_VIRTIO_IRQS,
                             virtio="other"),
    "virtio-net": TracePlan(traps=frozenset({"virtio_queue_notify"}), irqs=_VIRTIO_IRQS,
                            virtio="other"),
    "nvme": TracePlan(regions=frozenset({"nvme"}),
                      irqs=frozenset({"pci_nvme_irq_msix", "pci_nvme_irq_pin"})),
    # Not "lsi-ram": the controller fetches its SCRIPTS from that RAM by DMA
    # through the same dispatch (274 per 4k read); the guest writes it only at
    # driver load.
    "lsi": TracePlan(regions=frozenset({"lsi-mmio", "lsi-io"}), intx=True),
    "e1000": TracePlan(regions=frozenset({"e1000-mmio", "e1000-io"}), intx=True),
    "rtl8139": TracePlan(regions=frozenset({"rtl8139"}), intx=True),
}


def with_pins(plan: TracePlan, pins: Iterable[int]) -> TracePlan:
    """``plan`` counting raises of ``pins`` as its interrupts."""
    return dataclasses.replace(plan, irq_pins=frozenset(pins))


@dataclass(frozen=True)
class Mechanism:
    """Counts over one workload run; ``ios`` is the workload's own I/O count."""

    ios: int
    traps: int | None = None
    irqs: int | None = None
    cpu_seconds: float | None = None
    #: Requests the CPU time was spent on (the backend's count; default: ``ios``).
    requests: int | None = None
    #: Where the counts came from: ``"qemu-trace"`` or ``"vhost-backend"``.
    source: str = ""

    def counts(self) -> dict[str, str | int | float | None]:
        """The raw counts, for a record's ``extra`` (JSON keeps what the ratios came from)."""
        counts: dict[str, str | int | float | None] = {
            "counted_ios": self.ios, "traps": self.traps, "irqs": self.irqs,
            "mechanism_source": self.source}
        if self.requests is not None:
            counts["backend_requests"] = self.requests
        return counts

    def per_io(self, count: float | None) -> float | None:
        return None if count is None or self.ios <= 0 else count / self.ios

    @property
    def traps_per_io(self) -> float | None:
        return self.per_io(self.traps)

    @property
    def irqs_per_io(self) -> float | None:
        return self.per_io(self.irqs)

    @property
    def cpu_us_per_io(self) -> float | None:
        requests = self.ios if self.requests is None else self.requests
        if self.cpu_seconds is None or requests <= 0:
            return None
        return self.cpu_seconds / requests * 1e6


@dataclass
class _Tally:
    traps: Counter[str] = field(default_factory=Counter)
    irqs: Counter[str] = field(default_factory=Counter)
    blk_requests: Counter[str] = field(default_factory=Counter)


def count_events(lines: Iterable[str], plan: TracePlan, ios: int | None = None
                 ) -> tuple[int, int]:
    """(traps, interrupts) of the plan's device in trace-log ``lines``.

    Lines of other events (the log file is shared with anything else QEMU
    logs) are ignored.  ``ios``, the workload's own I/O count, picks the
    virtio-blk instance whose request count is closest to it: the root disk can
    be the busier one while fio itself is read from it.
    """
    tally = _Tally()
    for line in lines:
        match = _LINE_RE.match(line)
        if match is None:
            continue
        event, args = match[1], match[2]
        _tally_line(tally, plan, event, args)
    if not plan.virtio:
        return tally.traps[""], tally.irqs[""]
    vdev = _pick_instance(tally, plan, ios)
    if vdev is None:
        return 0, 0
    return tally.traps[vdev], tally.irqs[vdev]


def _tally_line(tally: _Tally, plan: TracePlan, event: str, args: str) -> None:
    instance = ""
    if plan.virtio:
        found = _VDEV_RE.search(args)
        if found is None:
            return
        instance = found[1]
        if event in _VIRTIO_BLK_REQUESTS:
            tally.blk_requests[instance] += 1
    if event in plan.traps:
        tally.traps[instance] += 1
    elif event in plan.irqs:
        tally.irqs[instance] += 1
    elif event in _REGION_EVENTS and plan.regions:
        region = _REGION_RE.search(args)
        if region is not None and region[1] in plan.regions:
            tally.traps[instance] += 1
    elif event == _IOAPIC and plan.irq_pins:
        pin = _IOAPIC_RE.search(args)
        if pin is not None and int(pin[1]) in plan.irq_pins:
            tally.irqs[instance] += 1


def _pick_instance(tally: _Tally, plan: TracePlan, ios: int | None) -> str | None:
    """The virtio device the workload drove (see the module docstring)."""
    if plan.virtio == "blk" and ios and tally.blk_requests:
        return min(tally.blk_requests, key=lambda v: abs(tally.blk_requests[v] - ios))
    if plan.virtio == "blk":
        ranked = tally.blk_requests.most_common(1)
    else:
        ranked = Counter({v: n for v, n in (tally.traps + tally.irqs).items()
                          if v not in tally.blk_requests}).most_common(1)
    return ranked[0][0] if ranked else None


# --- around one workload run (I/O) ----------------------------------------------------


class MachineLike(Protocol):
    """What a trace window needs from :class:`pytest_virtio.qemu.machine.Machine`."""

    def qmp(self, cmd: str, **args: object) -> object: ...
    def hmp(self, command: str) -> str: ...


class TraceWindow:
    """Switch a plan's events on for one workload run and count them afterwards.

    The first window of a machine points QEMU's log at ``path``; each window
    remembers where the file ended when it started, so several runs (rounds)
    on one guest each count only their own lines.
    """

    def __init__(self, machine: MachineLike, plan: TracePlan, path: Path) -> None:
        self.machine, self.plan, self.path = machine, plan, path
        self._offset = 0

    def __enter__(self) -> TraceWindow:
        if not self.path.exists():
            self.machine.hmp(f"logfile {self.path}")
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._switch(True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._switch(False)

    def _switch(self, enable: bool) -> None:
        for name in self.plan.events():
            self.machine.qmp("trace-event-set-state", name=name, enable=enable)

    def counts(self, ios: int | None = None) -> tuple[int, int]:
        """(traps, interrupts) logged since this window opened (``ios``: see count_events)."""
        if not self.path.exists():
            return 0, 0
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            text = handle.read().decode("utf-8", errors="replace")
        return count_events(text.splitlines(), self.plan, ios)


class StatsLike(Protocol):
    """The counters of :class:`pytest_virtio.vhost_user.stats.Stats` used here."""

    kicks: list[int]
    notifications: list[int]

    def total_requests(self) -> int: ...


class BackendLike(Protocol):
    """What a backend window needs from a vhost-user server."""

    @property
    def stats(self) -> StatsLike: ...  # read-only: a server's Stats is a StatsLike

    def thread_cpu_seconds(self) -> float | None: ...


class BackendWindow:
    """Kicks, calls, requests and backend-thread CPU of one vhost-user disk over a run."""

    def __init__(self, backend: BackendLike) -> None:
        self.backend = backend
        self.kicks = self.calls = self.requests = 0
        self.cpu: float | None = None

    def _now(self) -> tuple[int, int, int, float | None]:
        stats = self.backend.stats
        return (sum(stats.kicks), sum(stats.notifications), stats.total_requests(),
                self.backend.thread_cpu_seconds())

    def __enter__(self) -> BackendWindow:
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        (k0, c0, r0, cpu0), (k1, c1, r1, cpu1) = self._start, self._now()
        self.kicks, self.calls, self.requests = k1 - k0, c1 - c0, r1 - r0
        self.cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0

    def mechanism(self, ios: int) -> Mechanism:
        """Guest-side ``ios`` against the backend's kicks (traps) and calls (interrupts)."""
        return Mechanism(ios, self.kicks, self.calls, self.cpu, self.requests, "vhost-backend")
