"""Counting traps and interrupts from QEMU trace logs (real excerpts in data/trace/)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pytest_virtio.workloads.iperf import IperfJob
from pytest_virtio.workloads.mechanism import (
    PLANS,
    BackendWindow,
    Mechanism,
    count_events,
    with_pins,
)

DATA = Path(__file__).parent / "data" / "trace"


def lines(name: str) -> list[str]:
    return (DATA / name).read_text().splitlines()


def test_ide_counts_task_file_and_bmdma_accesses_and_irq14() -> None:
    traps, irqs = count_events(lines("ide.log"), PLANS["ide"])
    # 44 ioport reads + 87 writes + 44 alt-status + 54 bmdma reads + 43 writes + 10 PRD
    # address writes; bmdma_cmd_writeb is inside bmdma_write and must not count twice.
    assert (traps, irqs) == (282, 11)


def test_virtio_blk_counts_only_the_disk_with_the_most_requests() -> None:
    traps, irqs = count_events(lines("virtio-blk.log"), PLANS["virtio-blk"])
    assert (traps, irqs) == (122, 117)  # not the root disk's 50 notifies


def test_virtio_non_blk_device_ignores_virtio_blk_disks() -> None:
    # A virtio-scsi/-net plan never counts an instance that served virtio-blk requests.
    assert count_events(lines("virtio-blk.log"), PLANS["virtio-scsi"]) == (0, 0)
    scsi = ["virtio_queue_notify vdev 0x1 n 2 vq 0x2", "virtio_notify_irqfd vdev 0x1 vq 0x2",
            "virtio_queue_notify vdev 0x9 n 0 vq 0x3", "virtio_blk_handle_read vdev 0x9 req 0x4 "
            "sector 0 nsectors 8", "virtio_queue_notify vdev 0x1 n 2 vq 0x2"]
    assert count_events(scsi, PLANS["virtio-scsi"]) == (2, 1)


def test_region_dispatch_counts_only_the_named_region_and_pins() -> None:
    traps, irqs = count_events(lines("e1000.log"), with_pins(PLANS["e1000"], {11}))
    assert (traps, irqs) == (165, 0)
    irq = ["ioapic_set_irq vector: 11 level: 1", "ioapic_set_irq vector: 11 level: 0",
           "ioapic_set_irq vector: 4 level: 1", "1234@1.5:ioapic_set_irq vector: 11 level: 1"]
    assert count_events(irq, with_pins(PLANS["e1000"], {11})) == (0, 2)


def test_plan_events_switch_on_what_it_counts() -> None:
    assert "memory_region_ops_write" in PLANS["e1000"].events()
    assert "ioapic_set_irq" in PLANS["ide"].events()
    assert "memory_region_ops_write" not in PLANS["ide"].events()
    assert "virtio_blk_handle_read" in PLANS["virtio-net"].events()  # to exclude disks


def test_mechanism_per_io() -> None:
    m = Mechanism(ios=200, traps=100, irqs=50, cpu_seconds=0.01, requests=100)
    assert (m.traps_per_io, m.irqs_per_io) == (0.5, 0.25)
    assert m.cpu_us_per_io == pytest.approx(100.0)  # per backend request
    assert Mechanism(ios=0, traps=3).traps_per_io is None


class _Stats:
    def __init__(self) -> None:
        self.kicks, self.notifications, self.n = [0, 0], [0, 0], 0

    def total_requests(self) -> int:
        return self.n


class _Backend:
    def __init__(self) -> None:
        self.stats, self.cpu = _Stats(), 1.0

    def thread_cpu_seconds(self) -> float | None:
        return self.cpu


def test_backend_window_takes_deltas() -> None:
    backend = _Backend()
    backend.stats.kicks, backend.stats.n = [5, 1], 7
    with BackendWindow(backend) as window:
        backend.stats.kicks = [8, 2]
        backend.stats.notifications = [3, 0]
        backend.stats.n = 107
        backend.cpu = 1.02
    m = window.mechanism(ios=100)
    assert (m.traps, m.irqs, m.requests) == (4, 3, 100)
    assert m.cpu_us_per_io == pytest.approx(200.0)
    assert m.source == "vhost-backend"


def test_counting_pass_is_short_and_the_same_job() -> None:
    from pytest_virtio.guests.measure import WorkloadSpec

    long = WorkloadSpec.from_marker(("fio",), {"rw": "randread", "runtime": "5s"})
    short = long.counting()
    assert short.job == dataclasses.replace(long.job, runtime="1s")  # type: ignore[type-var]
    assert short.name == long.name
    net = WorkloadSpec.from_marker(("iperf3",), {"seconds": 3, "timeout": 60})
    assert net.counting() == WorkloadSpec("net0", IperfJob(seconds=1.0), timeout=60.0)
    tiny = WorkloadSpec.from_marker(("fio",), {"runtime": "500ms"})
    assert tiny.counting() == tiny


def test_absolute_floors_take_the_best_round_relative_takes_medians() -> None:
    from pytest_virtio.results.records import Record

    rounds = [Record("t", "ide", "w", "tcg", "m", iops, 0.0, lat_p99_ns=lat)
              for iops, lat in ((900, 3e6), (1200, 2e6), (1000, 9e6))]
    best = Record.best_of(rounds)
    assert (best.iops, best.lat_p99_ns) == (1200, 2e6)


def test_virtio_blk_instance_closest_to_the_workloads_io_count() -> None:
    # While fio is read from the root disk, the root can serve more requests than
    # a short workload on the data disk: the I/O count picks the right instance.
    root = ["virtio_blk_handle_read vdev 0xa req 0x1 sector 0 nsectors 8"] * 300
    data = ["virtio_blk_handle_read vdev 0xb req 0x2 sector 0 nsectors 8"] * 100
    notifies = (["virtio_queue_notify vdev 0xa n 0 vq 0x3"] * 300
                + ["virtio_queue_notify vdev 0xb n 0 vq 0x4"] * 40)
    lines_ = root + data + notifies
    assert count_events(lines_, PLANS["virtio-blk"], ios=100) == (40, 0)
    assert count_events(lines_, PLANS["virtio-blk"]) == (300, 0)  # without it: the busiest


def test_lsi_counts_its_registers_not_its_scripts_ram() -> None:
    """The controller's own SCRIPTS fetches from lsi-ram go through the same dispatch
    as the guest's register accesses; only the registers are traps."""
    trace = ["memory_region_ops_write cpu 0 mr 0x1 addr 0x14 value 0x20 size 1 name 'lsi-mmio'",
             "memory_region_ops_read cpu 0 mr 0x2 addr 0x100 value 0x0 size 4 name 'lsi-ram'",
             "memory_region_ops_read cpu 0 mr 0x1 addr 0x14 value 0x4 size 1 name 'lsi-mmio'",
             "ioapic_set_irq vector: 10 level: 1"]
    assert count_events(trace, with_pins(PLANS["lsi"], {10})) == (2, 1)
    assert PLANS["lsi"].intx and PLANS["rtl8139"].intx and not PLANS["nvme"].intx
