"""Trap and interrupt counts for the devices counted by register-region dispatches
(NVMe, LSI, rtl8139): real guests, real fio and iperf3, counted by QEMU itself.

Why a test per plan: a region named wrongly (or a device whose registers moved)
counts zero traps, and a verdict built on zero would say emulation is free.
"""

from __future__ import annotations

import pytest

from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.measure import WorkloadSpec, count_mechanism
from pytest_virtio.workloads.mechanism import Mechanism

DISKS = [{"name": "nv", "bus": "nvme", "size": "64M"}, {"name": "sc", "bus": "lsi", "size": "64M"},
         {"name": "vb", "bus": "virtio-blk", "size": "64M"}]


def _counted(guest: Guest, kind: str, **options: object) -> Mechanism:
    spec = WorkloadSpec.from_marker((kind,), options)
    mechanism = count_mechanism(guest, spec)
    assert mechanism is not None, f"{options} was not countable"
    return mechanism


@pytest.mark.vm(disks=DISKS)
def test_nvme_and_lsi_traps_and_interrupts_are_counted(guest: Guest) -> None:
    """4k random reads at queue depth 1, one I/O in flight: NVMe costs its two
    doorbell writes (submission tail, completion head) and one MSI-X per I/O;
    the LSI controller more register accesses and an INTx raise (but not its own
    SCRIPTS fetches from its on-chip RAM, 274 per I/O when they were counted);
    the virtio-blk disk at most one notify."""
    job = {"rw": "randread", "bs": "4k", "iodepth": 1, "runtime": "2s"}
    nvme = _counted(guest, "fio", disk="nv", **job)
    lsi = _counted(guest, "fio", disk="sc", **job)
    virtio = _counted(guest, "fio", disk="vb", **job)
    print(f"traps/io nvme {nvme.traps_per_io} lsi {lsi.traps_per_io} virtio {virtio.traps_per_io}; "
          f"irqs/io nvme {nvme.irqs_per_io} lsi {lsi.irqs_per_io} virtio {virtio.irqs_per_io}")
    assert nvme.traps_per_io is not None and 1.5 <= nvme.traps_per_io <= 3
    assert nvme.irqs_per_io is not None and 0.5 <= nvme.irqs_per_io <= 1.5
    assert lsi.traps_per_io is not None and nvme.traps_per_io < lsi.traps_per_io < 10
    assert lsi.irqs_per_io is not None and lsi.irqs_per_io >= 0.5
    assert virtio.traps_per_io is not None and virtio.traps_per_io <= 1.05


@pytest.mark.vm(nics=[{"model": "rtl8139"}])
def test_rtl8139_traps_and_interrupts_are_counted(guest: Guest) -> None:
    """iperf3 through an rtl8139: register accesses and INTx raises per packet
    (below one per packet: the driver polls a batch per interrupt, NAPI); zero
    would mean the plan names regions the device does not have."""
    rtl = _counted(guest, "iperf3", nic="net0", seconds=1)
    print(f"rtl8139 traps/io {rtl.traps_per_io} irqs/io {rtl.irqs_per_io}")
    assert rtl.traps_per_io is not None and rtl.traps_per_io > 0.1
    assert rtl.irqs_per_io is not None and rtl.irqs_per_io > 0.01
